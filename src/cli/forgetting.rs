//! `tunelens forgetting`: the forgetting evaluation of METHODS.md §5.5 on a base model and the
//! stages built on it, with the figure and tables of the Fine-tune view's export.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::cli::{Cli, ModelArg};
use crate::train::forgetting::ForgettingReport;
use crate::worker::forgetting::{load_sets, ForgettingRequest};
use crate::worker::{Job, JobOutput, Slot};

/// `tunelens forgetting`.
#[derive(Debug, Args)]
pub struct ForgettingArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A stage's adapter (PEFT folder), in order; stage k is the base with adapters 1..k merged
    /// (as `tunelens train --stages` built them). Repeat for every stage.
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Evaluation sets: JSON lists of {"input", "output"} (FvForgetting's format) or
    /// {"name", "kind", "max_new_tokens", "post", "items"}; default: the shipped sets
    /// (general, icl, task-present-past, task-singular-plural).
    #[arg(long = "sets", num_args = 1..)]
    sets: Vec<PathBuf>,
    /// At most N items per set (0: all).
    #[arg(long, default_value_t = 0)]
    max_items: usize,
    /// Write the figure (SVG, PNG), the tables (CSV) and the JSON into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the `--out` files.
    #[arg(long, default_value = "forgetting")]
    stem: String,
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{:.1}", 100.0 * x))
}

/// The readable report: per stage the three scores, the probabilities and the forgetting.
pub fn text_report(report: &ForgettingReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# forgetting (METHODS.md §5.5), ROUGE-L F1 and probabilities in %, decoding {}",
        report.decoding
    );
    let _ = writeln!(
        s,
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8}   forgetting (general / icl / task)",
        "model", "general", "icl", "task", "P_know", "P_inst"
    );
    let base = report.models.first();
    for m in &report.models {
        let f = base.map_or([None; 3], |b| m.forgetting(b));
        let _ = writeln!(
            s,
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8}   {} / {} / {}",
            m.label,
            opt(m.general),
            opt(m.icl),
            opt(m.task),
            opt(Some(m.p_know)),
            opt(m.p_inst),
            opt(f[0]),
            opt(f[1]),
            opt(f[2])
        );
    }
    for m in &report.models {
        let _ = writeln!(s, "\n## {}", m.label);
        for set in &m.sets {
            let _ = writeln!(
                s,
                "{:<24} {:<8} {:>4} items  ROUGE-L {:>5}  P_know {:>5}  P_inst {:>5}",
                set.name,
                set.kind.name(),
                set.items,
                opt(Some(set.score)),
                opt(Some(set.p_know)),
                opt(set.p_inst)
            );
        }
    }
    s
}

pub(super) fn run(cli: &Cli, args: &ForgettingArgs) -> anyhow::Result<()> {
    let request = ForgettingRequest {
        sets: args.sets.clone(),
        stages: args
            .adapters
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("stage {}", i + 1), p.clone()))
            .collect(),
        max_items: args.max_items,
    };
    // Bad set files fail before the model loads.
    load_sets(&request)?;
    let output = super::run_with_progress(cli, &args.model.model, None, |_| Job::Forgetting {
        slot: Slot::A,
        request: Box::new(request),
    })?;
    let JobOutput::Forgetting(report) = output else {
        anyhow::bail!("the forgetting job returned another result");
    };
    super::print_report(cli, report.as_ref(), text_report)?;
    if let Some(dir) = &args.out {
        for path in crate::export::forgetting::write_forgetting(dir, &args.stem, &report)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
