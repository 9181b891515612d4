//! Reusable widgets over plain data.

pub mod heatmap;
pub mod plot;
pub mod status;

use eframe::egui;

use crate::ui::app::Action;
use crate::ui::dialogs::DialogKind;

/// A data-file row: label, the chosen file's name (or what is used by default), "Open…",
/// and "Default" to go back to the default.
pub fn file_row(
    ui: &mut egui::Ui,
    label: &str,
    current: Option<&std::path::Path>,
    default: &str,
    kind: DialogKind,
    actions: &mut Vec<Action>,
) {
    ui.horizontal(|ui| {
        ui.label(label);
        let shown = current
            .and_then(|p| p.file_name())
            .map_or_else(|| default.to_owned(), |n| n.to_string_lossy().into_owned());
        ui.label(egui::RichText::new(shown).strong());
        if ui.button("Open…").clicked() {
            actions.push(Action::PickFile(kind));
        }
        if current.is_some() && ui.button("Default").clicked() {
            actions.push(Action::SetFile(kind, None));
        }
    });
}
