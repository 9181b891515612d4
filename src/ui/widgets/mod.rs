//! Reusable widgets over plain data.

pub mod file_browser;
pub mod heatmap;
pub mod plot;
pub mod status;

use eframe::egui;

use crate::ui::actions::{Action, PendingJob};
use crate::ui::dialogs::DialogKind;
use crate::ui::theme;

/// `text` cut to at most `max` characters by replacing its middle with `…` (a path keeps its
/// root and its file name).
pub fn shorten_middle(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max || max < 3 {
        return text.to_owned();
    }
    let keep = max - 1;
    let head = keep / 2;
    let tail = keep - head;
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

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

/// What the run row shows.
pub struct RunRow<'a> {
    /// Button text.
    pub label: &'a str,
    /// Whether a model is loaded.
    pub can_run: bool,
    /// Whether there is something to export.
    pub has_results: bool,
    /// The job running for this view.
    pub running: Option<&'a PendingJob>,
    /// Export status.
    pub note: Option<&'a str>,
    /// Hover text of the button.
    pub hover: &'a str,
    /// What the button does.
    pub run: Action,
}

/// A data-set row: a checkbox per shipped name (ticked ones in `shipped`), the names of the
/// files opened, "Open…" (a file dialog of `kind`) and "Clear files". Used by every view that
/// takes shipped sets and the user's own files.
#[allow(clippy::too_many_arguments)]
pub fn sets_and_files_ui(
    ui: &mut egui::Ui,
    label: &str,
    names: &[&str],
    shipped: &mut Vec<String>,
    files: &[std::path::PathBuf],
    open: (&str, &str),
    kind: DialogKind,
    actions: &mut Vec<Action>,
) {
    ui.horizontal_wrapped(|ui| {
        ui.label(label);
        for &name in names {
            let mut on = shipped.iter().any(|x| x == name);
            if ui.checkbox(&mut on, name).changed() {
                if on {
                    shipped.push(name.to_owned());
                } else {
                    shipped.retain(|x| x != name);
                }
            }
        }
        for path in files {
            ui.label(
                egui::RichText::new(
                    path.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                )
                .strong(),
            )
            .on_hover_text(path.display().to_string());
        }
        if ui.button(open.0).on_hover_text(open.1).clicked() {
            actions.push(Action::PickFile(kind));
        }
        if !files.is_empty() && ui.button("Clear files").clicked() {
            actions.push(Action::SetFile(kind, None));
        }
    });
}

/// "about 40 s left", from the time a job has run and the fraction it reports done; `None`
/// before there is enough to go on (under 2 s, or under 2 % done).
pub fn time_left(elapsed_s: f64, frac: f32) -> Option<String> {
    let frac = f64::from(frac);
    if elapsed_s < 2.0 || !(0.02..1.0).contains(&frac) {
        return None;
    }
    let left = elapsed_s * (1.0 - frac) / frac;
    Some(if left < 90.0 {
        format!("about {:.0} s left", left.max(1.0))
    } else if left < 5400.0 {
        format!("about {:.0} min left", left / 60.0)
    } else {
        format!("about {:.1} h left", left / 3600.0)
    })
}

/// A view's job: "queued behind …" while it waits, else its progress, message and Cancel.
pub fn job_progress(ui: &mut egui::Ui, job: &PendingJob, actions: &mut Vec<Action>) {
    if let Some(first) = &job.queued_behind {
        ui.label(egui::RichText::new(format!("queued behind {first}")).color(theme::MUTED));
        return;
    }
    ui.add(
        egui::ProgressBar::new(job.frac.unwrap_or(0.0))
            .desired_width(180.0)
            .show_percentage(),
    );
    ui.label(egui::RichText::new(&job.message).color(theme::MUTED));
    if let Some(left) = job.time_left() {
        ui.label(egui::RichText::new(left).color(theme::MUTED));
    }
    if ui.button("Cancel").clicked() {
        actions.push(Action::Stop);
    }
}

/// Run button, progress and cancel, export.
pub fn run_row(ui: &mut egui::Ui, row: RunRow<'_>, actions: &mut Vec<Action>) {
    let RunRow {
        label,
        can_run,
        has_results,
        running,
        note,
        hover,
        run,
    } = row;
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_run && running.is_none(), egui::Button::new(label))
            .on_hover_text(hover)
            .on_disabled_hover_text("Load a model first, or wait for the running job")
            .clicked()
        {
            actions.push(run);
        }
        if let Some(job) = running {
            job_progress(ui, job, actions);
        }
        ui.separator();
        if ui
            .add_enabled(has_results, egui::Button::new("Export…"))
            .on_hover_text("Save the figure (SVG, PNG) and the data (CSV, JSON)")
            .clicked()
        {
            actions.push(Action::ExportDialog);
        }
        if let Some(note) = note {
            ui.label(egui::RichText::new(note).color(theme::MUTED));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{shorten_middle, time_left};

    #[test]
    fn time_left_extrapolates_the_rate() {
        assert_eq!(time_left(1.0, 0.5), None, "too early");
        assert_eq!(time_left(10.0, 0.01), None, "too little done");
        assert_eq!(time_left(10.0, 1.0), None, "done");
        assert_eq!(time_left(10.0, 0.5).as_deref(), Some("about 10 s left"));
        assert_eq!(time_left(60.0, 0.25).as_deref(), Some("about 3 min left"));
    }

    #[test]
    fn long_paths_keep_both_ends() {
        assert_eq!(shorten_middle("/a/b", 10), "/a/b");
        let long = "/home/researcher/checkpoints/llama-2-7b-chat-hf+/runs/lora-rank-8/adapter";
        let short = shorten_middle(long, 30);
        assert_eq!(short.chars().count(), 30);
        assert!(short.starts_with("/home/research") && short.ends_with("rank-8/adapter"));
        assert!(short.contains('…'));
    }
}
