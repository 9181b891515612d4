//! The status area: the running job with progress and elapsed time, the queue length, and the
//! last error in plain words.

use std::collections::BTreeMap;

use eframe::egui;

use crate::ui::app::{Action, PendingJob};
use crate::ui::theme;
use crate::worker::JobId;

/// Draws the status bar.
pub fn status_ui(
    ui: &mut egui::Ui,
    pending: &BTreeMap<JobId, PendingJob>,
    last_error: Option<&str>,
    actions: &mut Vec<Action>,
) {
    ui.horizontal(|ui| {
        if let Some(job) = pending.values().next() {
            ui.spinner();
            ui.label(&job.label);
            if let Some(frac) = job.frac {
                ui.add(
                    egui::ProgressBar::new(frac)
                        .desired_width(160.0)
                        .show_percentage(),
                );
            }
            if !job.message.is_empty() {
                ui.label(egui::RichText::new(&job.message).color(theme::MUTED));
            }
            ui.label(
                egui::RichText::new(format!("{:.1} s", job.submitted.elapsed().as_secs_f64()))
                    .color(theme::MUTED),
            );
            if pending.len() > 1 {
                ui.label(
                    egui::RichText::new(format!("+{} queued", pending.len() - 1))
                        .color(theme::MUTED),
                );
            }
            if ui
                .button("Cancel")
                .on_hover_text("Cancel the running job (Esc)")
                .clicked()
            {
                actions.push(Action::Stop);
            }
        } else {
            ui.label(egui::RichText::new("Ready").color(theme::MUTED));
        }
        if let Some(error) = last_error {
            ui.separator();
            ui.label(egui::RichText::new(error).color(theme::ERROR));
            if ui.small_button("×").on_hover_text("Dismiss").clicked() {
                actions.push(Action::DismissError);
            }
        }
    });
}
