//! The `tunelens` binary: a subcommand runs headless; no subcommand opens the desktop app.

use std::process::ExitCode;

use clap::Parser as _;
use tunelens::cli::{self, Cli};

fn main() -> ExitCode {
    // Before anything touches candle or spawns a thread.
    tunelens::model::configure_cpu_threads();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let Some(command) = &cli.command else {
        let start = tunelens::ui::StartOptions {
            model: cli.model.clone(),
            model_b: cli.model_b.clone(),
            device: Some(cli.device),
            weights: cli.weights,
        };
        return match tunelens::ui::run_native(start) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::from(2)
            }
        };
    };
    match cli::run(&cli, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
