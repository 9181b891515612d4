//! The desktop app (eframe/egui). Sees plain data only (`ModelInfo`, job outputs); never a
//! tensor. Model work runs on the worker thread.

pub mod actions;
pub mod app;
pub mod dialogs;
pub mod panels;
pub mod registry;
pub mod state;
pub mod theme;
pub mod widgets;

pub use app::{StartOptions, TunelensApp};

/// Opens the main window.
pub fn run_native(start: StartOptions) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("tunelens")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([720.0, 480.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "tunelens",
        options,
        Box::new(move |cc| Ok(Box::new(TunelensApp::new(cc, start)?))),
    )
    .map_err(|err| anyhow::anyhow!("cannot open the window: {err}"))
}
