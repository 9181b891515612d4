//! The status area: the running job with progress and elapsed time, the queue length, and the
//! last error in plain words.

use std::collections::BTreeMap;

use eframe::egui;

use crate::ui::actions::{Action, PendingJob};
use crate::ui::theme;
use crate::worker::JobId;

/// A pulsing dot: unlike `egui::Spinner` it does not ask for a new frame every frame (the app
/// repaints every 100 ms while work runs), which under software rendering cost a core that a
/// training run wanted.
fn busy_dot(ui: &mut egui::Ui) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(14.0, 14.0), egui::Sense::hover());
    let t = ui.input(|i| i.time);
    #[allow(clippy::cast_possible_truncation)]
    let phase = ((t * 3.0).sin() * 0.5 + 0.5) as f32;
    ui.painter()
        .circle_filled(rect.center(), 2.5 + 2.5 * phase, crate::ui::theme::SLOT_A);
}

/// Draws the status bar.
pub fn status_ui(
    ui: &mut egui::Ui,
    pending: &BTreeMap<JobId, PendingJob>,
    last_error: Option<&str>,
    actions: &mut Vec<Action>,
) {
    ui.horizontal(|ui| {
        if let Some(job) = pending.values().next() {
            busy_dot(ui);
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
            let elapsed = job.submitted.elapsed().as_secs_f64();
            let left = job
                .time_left()
                .map_or_else(String::new, |l| format!(", {l}"));
            ui.label(egui::RichText::new(format!("{elapsed:.1} s{left}")).color(theme::MUTED));
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
