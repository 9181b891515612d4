//! Knowledge view (METHODS.md §10a): question sets (the shipped relations, opened files), shots,
//! the tuned model's template, hint, labels; the base model in slot A and the tuned model in
//! slot B answer every question. Runs accumulate (load another tuned model into B and run
//! again): the histogram of ρ, the scatter of the base and tuned probability of the right
//! answer, the per-subject table of each run, and from 3 runs the partial correlation of
//! consistency and tuned accuracy given base accuracy. "Export…" writes all runs.

use std::path::PathBuf;

use eframe::egui::{self, Color32};
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints, Points};
use serde::{Deserialize, Serialize};

use crate::analysis::knowledge::{partial_correlation, KnowledgeRun, TunedTemplate};
use crate::export;
use crate::ui::actions::Action;
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::AppState;
use crate::ui::theme;
use crate::ui::widgets::{run_row, sets_and_files_ui, RunRow};
use crate::worker::knowledge::{
    KnowledgeConfig, KnowledgeSettings, QuestionSource, SHIPPED_QUESTIONS,
};
use crate::worker::{Job, JobOutput};

/// The view's persisted settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KnowledgeUi {
    /// Shipped relations ticked.
    pub shipped: Vec<String>,
    /// Question files opened.
    pub files: Vec<PathBuf>,
    /// Dev examples in the base model's prompt.
    pub shots: usize,
    /// The tuned model's prompt.
    pub template: TunedTemplate,
    /// Header line before the tuned model's question too.
    pub hint: bool,
    /// Questions per file at most; 0 = all.
    pub max_questions: usize,
    /// Choice labels, comma-separated; empty = A, B, C, ...
    pub labels: String,
}

impl Default for KnowledgeUi {
    fn default() -> Self {
        Self {
            shipped: SHIPPED_QUESTIONS
                .iter()
                .map(|(n, _, _)| (*n).to_owned())
                .collect(),
            files: Vec::new(),
            shots: 5,
            template: TunedTemplate::Chat,
            hint: false,
            max_questions: 0,
            labels: String::new(),
        }
    }
}

impl KnowledgeUi {
    /// The settings of a run.
    pub fn settings(&self) -> KnowledgeSettings {
        let mut questions: Vec<QuestionSource> = SHIPPED_QUESTIONS
            .iter()
            .filter(|(n, _, _)| self.shipped.iter().any(|s| s == n))
            .map(|(n, _, _)| QuestionSource::Shipped((*n).to_owned()))
            .collect();
        questions.extend(self.files.iter().cloned().map(QuestionSource::Path));
        KnowledgeSettings {
            questions,
            dev: Vec::new(),
            config: KnowledgeConfig {
                shots: self.shots,
                tuned_template: self.template,
                hint: self.hint,
                max_questions: (self.max_questions > 0).then_some(self.max_questions),
                labels: self
                    .labels
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
                ..KnowledgeConfig::default()
            },
        }
    }
}

/// The Knowledge view: settings in [`AppState::knowledge`], the runs here.
#[derive(Default)]
pub struct KnowledgeView {
    /// Runs of one base model and one question set, one per tuned model, oldest first.
    pub runs: Vec<KnowledgeRun>,
    /// Why earlier runs were set aside, if they were.
    pub note: Option<String>,
}

/// A colour per run.
fn run_color(i: usize) -> Color32 {
    const COLORS: [Color32; 5] = [
        theme::SLOT_B,
        theme::CATEGORY_1,
        theme::CATEGORY_2,
        theme::INSTRUCTION,
        theme::SLOT_A,
    ];
    COLORS[i % COLORS.len()]
}

impl KnowledgeView {
    /// Keeps `run` with the earlier runs when they share its base model, questions and
    /// settings; otherwise starts the list again with it.
    pub fn add_run(&mut self, run: KnowledgeRun) {
        self.note = None;
        if let Some(first) = self.runs.first() {
            let same = first.base_model == run.base_model
                && first.files == run.files
                && first.config == run.config;
            if !same {
                self.note = Some(format!(
                    "{} earlier run(s) with another base model, questions or settings were cleared",
                    self.runs.len()
                ));
                self.runs.clear();
            }
        }
        self.runs.push(run);
    }
}

impl AnalysisView for KnowledgeView {
    fn id(&self) -> &'static str {
        "knowledge"
    }

    fn label(&self) -> &'static str {
        "Knowledge"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        if cx.slots.iter().any(|s| s.info.is_none()) {
            return Err(
                "Load the base model into slot A and the tuned model into slot B".to_owned(),
            );
        }
        let settings = cx.state.knowledge.settings();
        if settings.questions.is_empty() {
            return Err("Choose at least one question set".to_owned());
        }
        Ok((
            Job::Knowledge { settings },
            "Asking the base and the tuned model".to_owned(),
        ))
    }

    fn take(&mut self, output: JobOutput, _state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Knowledge(run) => {
                self.add_run(*run);
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        settings_ui(ui, cx, !self.runs.is_empty());
        ui.add_space(theme::SECTION_GAP);
        if self.runs.is_empty() {
            ui.label(
                egui::RichText::new(
                    "Results appear here: how far the tuned model in B keeps the base model's (A) ranking of the answers. Load another tuned model into B and run again to compare fine-tunes",
                )
                .color(theme::MUTED),
            );
            return;
        }
        egui::ScrollArea::vertical()
            .id_salt("knowledge_results")
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.label(format!(
                        "{} run(s) against {}",
                        self.runs.len(),
                        self.runs[0].base_model
                    ));
                    if ui.button("Clear runs").clicked() {
                        self.runs.clear();
                        self.note = None;
                    }
                });
                if let Some(note) = &self.note {
                    ui.label(egui::RichText::new(note).color(theme::MUTED));
                }
                results_ui(ui, &self.runs);
            });
    }

    fn export_stem(&self, _state: &AppState) -> Option<String> {
        let first = self.runs.first()?;
        Some(export::comparison_stem(
            "knowledge",
            std::iter::once(first.base_model.as_str())
                .chain(self.runs.iter().map(|r| r.tuned_model.as_str())),
            "",
        ))
    }

    fn exporter(&self, _state: &AppState) -> Option<Exporter> {
        if self.runs.is_empty() {
            return None;
        }
        let runs = self.runs.clone();
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            export::knowledge::write_knowledge(dir, stem, &runs)
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn settings_ui(ui: &mut egui::Ui, cx: &mut ViewCx<'_>, has_results: bool) {
    ui.heading("Knowledge");
    ui.label(
        egui::RichText::new(
            "Does instruction tuning keep what the base model knows? Multiple-choice questions to the base model in A (5-shot) and the tuned model in B (0-shot); per question the rank correlation and KL of their answer distributions (Ren et al. 2024; METHODS.md §10a)",
        )
        .color(theme::MUTED),
    );
    let both_loaded = cx.slots.iter().all(|s| s.info.is_some());
    let s = &mut cx.state.knowledge;
    let names: Vec<&str> = SHIPPED_QUESTIONS.iter().map(|(n, _, _)| *n).collect();
    sets_and_files_ui(
        ui,
        "Questions",
        &names,
        &mut s.shipped,
        &s.files,
        ("Open questions…", "MMLU's CSV layout (question, choices, answer letter; the subject from the file name) or JSONL of {\"question\", \"choices\", \"answer\", \"subject\"}"),
        DialogKind::QuestionFile,
        cx.actions,
    );
    ui.horizontal_wrapped(|ui| {
        let label = ui.label("Shots");
        ui.add(egui::DragValue::new(&mut s.shots).range(0..=10))
            .labelled_by(label.id);
        ui.label("Tuned prompt");
        // A tuned model without a chat template (a base checkpoint in B) cannot use one.
        let tuned_has_template = cx.slots[1]
            .info
            .as_ref()
            .is_none_or(|info| info.has_chat_template);
        if !tuned_has_template && s.template == TunedTemplate::Chat {
            s.template = TunedTemplate::Vicuna;
        }
        ui.add_enabled_ui(tuned_has_template, |ui| {
            ui.selectable_value(&mut s.template, TunedTemplate::Chat, "Chat template")
                .on_hover_text("The tuned model's own chat template, 0-shot")
                .on_disabled_hover_text("B has no chat template");
        });
        ui.selectable_value(&mut s.template, TunedTemplate::Vicuna, "Vicuna")
            .on_hover_text("The Vicuna template of the reference code, 0-shot");
        ui.selectable_value(&mut s.template, TunedTemplate::Base, "Base prompt")
            .on_hover_text(
                "The base model's 5-shot prompt: the same model in A and B gives rho = 1, KL = 0",
            );
        ui.checkbox(&mut s.hint, "Hint")
            .on_hover_text("Put the header line before the tuned model's question too");
        let label = ui.label("Questions per file");
        ui.add(egui::DragValue::new(&mut s.max_questions).range(0..=100_000))
            .labelled_by(label.id)
            .on_hover_text("0 = all");
        let label = ui.label("Labels");
        ui.add(
            egui::TextEdit::singleline(&mut s.labels)
                .desired_width(90.0)
                .hint_text("A,B,C,..."),
        )
        .labelled_by(label.id)
        .on_hover_text("Choice labels, comma-separated; empty = A, B, C, ...");
    });
    let has_questions = !s.shipped.is_empty() || !s.files.is_empty();
    run_row(
        ui,
        RunRow {
            label: "Compare knowledge",
            can_run: both_loaded && has_questions,
            has_results,
            running: cx.running,
            note: cx.note,
            hover: "Ask every question to the base model in A and the tuned model in B",
            run: Action::Run("knowledge"),
        },
        cx.actions,
    );
}

fn results_ui(ui: &mut egui::Ui, runs: &[KnowledgeRun]) {
    let half = ((ui.available_width() - 16.0) / 2.0).max(240.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.label(egui::RichText::new("Rank correlation (rho) per question").strong());
            rho_histogram_ui(ui, runs, half);
        });
        ui.vertical(|ui| {
            ui.label(egui::RichText::new("Probability of the right answer").strong());
            scatter_ui(ui, runs, half);
        });
    });
    ui.add_space(theme::SECTION_GAP);
    let pc = partial_correlation(runs);
    let text = match (pc.rho, pc.p_value) {
        (Some(r), Some(p)) => format!(
            "Partial correlation of 100*rho and tuned accuracy given base accuracy over {} runs: {r:.3} (p = {p:.3})",
            pc.runs
        ),
        _ => format!(
            "Partial correlation: {}",
            pc.note.unwrap_or_else(|| "undefined".to_owned())
        ),
    };
    ui.label(text);
    for (i, run) in runs.iter().enumerate() {
        ui.add_space(theme::SECTION_GAP);
        let o = &run.overall;
        ui.label(
            egui::RichText::new(format!(
                "{}: mean rho {:.3}, mean KL {:.4}, accuracy base {:.1}%, tuned {:.1}% ({} questions, {} prompt)",
                run.tuned_model,
                o.rho,
                o.kl,
                100.0 * o.base_accuracy,
                100.0 * o.tuned_accuracy,
                o.questions,
                run.config.tuned_template.name()
            ))
            .color(run_color(i))
            .strong(),
        );
        for note in &run.notes {
            ui.label(egui::RichText::new(note).color(theme::MUTED));
        }
        egui::Grid::new(("knowledge_subjects", i))
            .striped(true)
            .show(ui, |ui| {
                for h in [
                    "Subject",
                    "Questions",
                    "rho",
                    "KL",
                    "Cosine",
                    "Base acc",
                    "Tuned acc",
                ] {
                    ui.label(egui::RichText::new(h).strong());
                }
                ui.end_row();
                for g in run.subjects.iter().chain(std::iter::once(&run.overall)) {
                    ui.label(&g.name);
                    ui.label(g.questions.to_string());
                    ui.label(format!("{:.3}", g.rho));
                    ui.label(format!("{:.4}", g.kl));
                    ui.label(format!("{:.3}", g.cosine));
                    ui.label(format!("{:.1}%", 100.0 * g.base_accuracy));
                    ui.label(format!("{:.1}%", 100.0 * g.tuned_accuracy));
                    ui.end_row();
                }
            });
        egui::CollapsingHeader::new("Example prompts")
            .id_salt(("knowledge_prompts", i))
            .show(ui, |ui| {
                ui.label(egui::RichText::new("Base").strong());
                ui.label(egui::RichText::new(&run.example_base_prompt).monospace());
                ui.label(egui::RichText::new("Tuned").strong());
                ui.label(egui::RichText::new(&run.example_tuned_prompt).monospace());
            });
    }
}

/// Counts of ρ in 20 bins over [-1, 1], one overlaid bar chart per run.
fn rho_histogram_ui(ui: &mut egui::Ui, runs: &[KnowledgeRun], width: f32) {
    const BINS: usize = 20;
    let w = 2.0 / BINS as f64;
    let counts_of = |run: &KnowledgeRun| {
        let mut counts = [0usize; BINS];
        for q in run.questions.iter().filter(|q| q.rho.is_finite()) {
            let b = ((q.rho + 1.0) / w) as usize;
            counts[b.min(BINS - 1)] += 1;
        }
        counts
    };
    // Headroom above the tallest bar, so it does not touch the frame under the legend.
    let tallest = runs
        .iter()
        .flat_map(|r| counts_of(r).into_iter())
        .max()
        .unwrap_or(1);
    Plot::new("knowledge_rho")
        .width(width)
        .height(200.0)
        .allow_scroll(false)
        .include_x(-1.0)
        .include_x(1.0)
        .include_y(0.0)
        .include_y(tallest as f64 * 1.25)
        .x_axis_label("rho")
        .y_axis_label("questions")
        .legend(Legend::default())
        .show(ui, |plot| {
            for (i, run) in runs.iter().enumerate() {
                let counts = counts_of(run);
                let bars: Vec<Bar> = counts
                    .iter()
                    .enumerate()
                    .map(|(b, &n)| Bar::new(-1.0 + (b as f64 + 0.5) * w, n as f64).width(w))
                    .collect();
                plot.bar_chart(
                    BarChart::new(run.tuned_model.clone(), bars)
                        .color(run_color(i).gamma_multiply(0.6)),
                );
            }
        });
}

/// Base (x) against tuned (y) probability of the right answer, one point per question.
fn scatter_ui(ui: &mut egui::Ui, runs: &[KnowledgeRun], width: f32) {
    Plot::new("knowledge_scatter")
        .width(width)
        .height(200.0)
        .allow_scroll(false)
        .include_x(0.0)
        .include_x(1.0)
        .include_y(0.0)
        .include_y(1.0)
        .x_axis_label("base model")
        .y_axis_label("tuned model")
        .legend(Legend::default())
        .show(ui, |plot| {
            plot.line(
                Line::new("equal", PlotPoints::from(vec![[0.0, 0.0], [1.0, 1.0]]))
                    .color(theme::MUTED),
            );
            for (i, run) in runs.iter().enumerate() {
                let points: Vec<[f64; 2]> = run
                    .questions
                    .iter()
                    .filter_map(|q| Some([*q.base.get(q.answer)?, *q.tuned.get(q.answer)?]))
                    .collect();
                plot.points(
                    Points::new(run.tuned_model.clone(), PlotPoints::from(points))
                        .radius(2.5)
                        .color(run_color(i)),
                );
            }
        });
}
