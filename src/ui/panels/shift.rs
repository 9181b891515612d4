//! Token shift view (METHODS.md §6, §10b): the tuned model's (B) responses as tokens coloured
//! by how far the base model (A) would have been from picking them; both models' top-10 at a
//! clicked token; the ratio table of every run kept (several fine-tunes of one base side by
//! side); shifted ratio by relative position and any metric by position; the most shifted
//! tokens; the logit lens of both models at the clicked token (or at any position of the
//! Prompt view's prompt); "Explain this token" opens the Attribution view on the response up
//! to that token.

use std::path::PathBuf;

use eframe::egui::{self, Color32, RichText};
use serde::{Deserialize, Serialize};

use crate::analysis::lens::{LensOutput, LensRequest};
use crate::analysis::shift::{
    BaseTemplate, Category, ShiftConfig, ShiftData, ShiftItem, ShiftRun, ShiftSettings, TopEntry,
    METRICS, RELATIVE_BINS,
};
use crate::export;
use crate::ui::actions::Action;
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::{AppState, View};
use crate::ui::theme;
use crate::ui::widgets::plot::{line_plot_ui, Dash, Series};
use crate::ui::widgets::{run_row, RunRow};
use crate::worker::{Job, JobOutput, Slot};

/// The base model's context as the view offers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemplateChoice {
    /// URIAL's template.
    #[default]
    Urial,
    /// The raw prompt.
    Raw,
    /// A template file.
    File,
}

/// The view's persisted settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShiftUi {
    /// The shipped prompt set used when no file is open.
    pub shipped: String,
    /// A prompt file or AlignTDS JSON (`.json` is read as AlignTDS).
    pub data_file: Option<PathBuf>,
    /// The base model's context.
    pub template: TemplateChoice,
    /// The template file of [`TemplateChoice::File`].
    pub template_file: Option<PathBuf>,
    /// `k`.
    pub k: usize,
    /// New tokens of B's responses.
    pub max_new_tokens: usize,
    /// Prompts or records at most.
    pub max_items: usize,
    /// The metric of the by-position plot (an index into [`METRICS`], or its length for the
    /// shifted fraction).
    pub metric: usize,
    /// The lens position in the Prompt view's prompt.
    pub lens_position: usize,
    /// Live mode: colour B's tokens in the Prompt view by their shift against A as they
    /// stream.
    pub live: bool,
}

impl Default for ShiftUi {
    fn default() -> Self {
        Self {
            shipped: "open_qa".to_owned(),
            data_file: None,
            template: TemplateChoice::Urial,
            template_file: None,
            k: 10,
            max_new_tokens: 96,
            max_items: 20,
            metric: METRICS.len(),
            lens_position: 0,
            live: false,
        }
    }
}

impl ShiftUi {
    /// The settings of a run, or why there are none.
    pub fn settings(&self) -> Result<ShiftSettings, String> {
        let data = match &self.data_file {
            Some(p) if p.extension().is_some_and(|e| e == "json") => ShiftData::AlignTds(p.clone()),
            Some(p) => ShiftData::Prompts(p.clone()),
            None => ShiftData::Shipped(self.shipped.clone()),
        };
        let base_template = match self.template {
            TemplateChoice::Urial => BaseTemplate::Urial,
            TemplateChoice::Raw => BaseTemplate::Raw,
            TemplateChoice::File => BaseTemplate::File(
                self.template_file
                    .clone()
                    .ok_or("Open a template file, or pick URIAL or raw")?,
            ),
        };
        Ok(ShiftSettings {
            data,
            base_template,
            config: ShiftConfig {
                k: self.k.clamp(1, crate::analysis::shift::K_SAVE),
                ..ShiftConfig::default()
            },
            max_new_tokens: self.max_new_tokens.max(1),
            max_items: Some(self.max_items.max(1)),
        })
    }
}

/// The Token shift view: the runs kept, the response and token shown, the last lens.
#[derive(Default)]
pub struct ShiftView {
    /// Every run since the last "Clear runs", oldest first.
    pub runs: Vec<ShiftRun>,
    /// The run shown.
    pub run: usize,
    /// The response shown.
    pub item: usize,
    /// The clicked token.
    pub token: Option<usize>,
    /// The last logit lens, with what it was taken on.
    pub lens: Option<(String, Box<LensOutput>)>,
}

impl AnalysisView for ShiftView {
    fn id(&self) -> &'static str {
        "shift"
    }

    fn label(&self) -> &'static str {
        "Token shift"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        if cx.slots.iter().any(|s| s.info.is_none()) {
            return Err("Load the base model into slot A and the tuned model into B".to_owned());
        }
        let settings = cx.state.shift.settings()?;
        Ok((
            Job::Shift {
                settings: Box::new(settings),
            },
            "Measuring the token distribution shift".to_owned(),
        ))
    }

    fn take(&mut self, output: JobOutput, _state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Shift(run) => {
                self.runs.push(*run);
                self.run = self.runs.len() - 1;
                self.item = 0;
                self.token = None;
                Ok(())
            }
            JobOutput::Lens(lens) => {
                let what = match (&self.token, self.current_item()) {
                    (Some(t), Some(item)) => format!("token {t} of response {}", item.id),
                    _ => "the prompt".to_owned(),
                };
                self.lens = Some((what, lens));
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        settings_ui(ui, cx, !self.runs.is_empty());
        ui.add_space(theme::SECTION_GAP);
        egui::ScrollArea::vertical()
            .id_salt("shift_results")
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if self.runs.is_empty() {
                    ui.label(
                        RichText::new(
                            "Results appear here: B's responses coloured by where A would have picked another token, the ratios, and where shifts sit",
                        )
                        .color(theme::MUTED),
                    );
                    ui.add_space(theme::SECTION_GAP);
                    self.lens_ui(ui, cx);
                } else {
                    self.results_ui(ui, cx);
                }
            });
    }

    fn export_stem(&self, _state: &AppState) -> Option<String> {
        if let Some(run) = self.runs.last() {
            return Some(export::comparison_stem(
                "shift",
                [run.base_model.as_str(), run.tuned_model.as_str()],
                &run.settings.data.label(),
            ));
        }
        let (_, lens) = self.lens.as_ref()?;
        Some(export::comparison_stem(
            "lens",
            lens.curves.iter().map(|(_, model, _)| model.as_str()),
            lens.target_text(),
        ))
    }

    /// The runs (figure, tables, HTML, JSON) and, when there is one, the last logit lens as
    /// `<stem>_lens.*`.
    fn exporter(&self, _state: &AppState) -> Option<Exporter> {
        if self.runs.is_empty() && self.lens.is_none() {
            return None;
        }
        let runs = self.runs.clone();
        let lens = self.lens.as_ref().map(|(_, l)| l.as_ref().clone());
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            let mut written = Vec::new();
            if !runs.is_empty() {
                written.extend(export::shift::write_shift(dir, stem, &runs)?);
            }
            if let Some(lens) = &lens {
                let lens_stem = if runs.is_empty() {
                    stem.to_owned()
                } else {
                    format!("{stem}_lens")
                };
                written.extend(export::shift::write_lens(dir, &lens_stem, lens)?);
            }
            Ok(written)
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn settings_ui(ui: &mut egui::Ui, cx: &mut ViewCx<'_>, has_results: bool) {
    ui.heading("Token shift");
    ui.label(
        RichText::new(
            "At which tokens of the tuned model's responses would the base model have picked something else? A = base, B = tuned (Lin et al., AlignTDS; METHODS.md §6)",
        )
        .color(theme::MUTED),
    );
    let both_loaded = cx.slots.iter().all(|s| s.info.is_some());
    let s = &mut cx.state.shift;
    ui.horizontal_wrapped(|ui| {
        let responses_label = ui.label("Responses");
        match &s.data_file {
            Some(path) => {
                ui.label(
                    RichText::new(path.file_name().unwrap_or_default().to_string_lossy())
                        .strong(),
                )
                .on_hover_text(path.display().to_string());
                if ui.button("Use a shipped set").clicked() {
                    cx.actions.push(Action::SetFile(DialogKind::ShiftData, None));
                }
            }
            None => {
                egui::ComboBox::from_id_salt("shift_set")
                    .selected_text(format!("{} (B answers)", s.shipped))
                    .show_ui(ui, |ui| {
                        for set in crate::samples::builtin() {
                            ui.selectable_value(&mut s.shipped, set.name.to_owned(), set.name)
                                .on_hover_text(set.description);
                        }
                    })
                    .response
                    .labelled_by(responses_label.id);
            }
        }
        if ui
            .button("Open…")
            .on_hover_text(
                "Prompts B answers greedily (text or JSONL), or responses in AlignTDS / URIAL JSON ({id, pure_input, input, output})",
            )
            .clicked()
        {
            cx.actions.push(Action::PickFile(DialogKind::ShiftData));
        }
    });
    ui.horizontal_wrapped(|ui| {
        ui.label("Base context");
        ui.selectable_value(&mut s.template, TemplateChoice::Urial, "URIAL")
            .on_hover_text("# Query: ```prompt``` # Answer: ``` (§6.2 step 2)");
        ui.selectable_value(&mut s.template, TemplateChoice::Raw, "Raw prompt");
        if ui
            .selectable_value(&mut s.template, TemplateChoice::File, "Template file")
            .clicked()
            && s.template_file.is_none()
        {
            cx.actions.push(Action::PickFile(DialogKind::ShiftTemplate));
        }
        if s.template == TemplateChoice::File {
            if let Some(path) = &s.template_file {
                ui.label(RichText::new(path.file_name().unwrap_or_default().to_string_lossy()))
                    .on_hover_text(path.display().to_string());
            }
        }
        ui.separator();
        let label = ui.label("k");
        ui.add(egui::DragValue::new(&mut s.k).range(1..=30))
            .labelled_by(label.id)
            .on_hover_text("TR counts ranks within the base model's top k; marginal = rank 1 or 2, shifted = 3 or more");
        let label = ui.label("New tokens");
        ui.add(egui::DragValue::new(&mut s.max_new_tokens).range(1..=1024))
            .labelled_by(label.id);
        let label = ui.label("Responses");
        ui.add(egui::DragValue::new(&mut s.max_items).range(1..=10_000))
            .labelled_by(label.id);
    });
    run_row(
        ui,
        RunRow {
            label: "Measure shift",
            can_run: both_loaded,
            has_results,
            running: cx.running,
            note: cx.note,
            hover: "B answers each prompt (or the file's responses are read); both models are run teacher-forced over them. Each run is kept, so load another fine-tune into B and run again to compare",
            run: Action::Run("shift"),
        },
        cx.actions,
    );
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else {
        format!("{:.1}%", 100.0 * x)
    }
}

fn run_color(i: usize) -> Color32 {
    theme::RUNS[i % theme::RUNS.len()]
}

fn top_table(ui: &mut egui::Ui, id: &str, title: &str, list: Option<&Vec<TopEntry>>) {
    ui.vertical(|ui| {
        ui.label(RichText::new(title).strong());
        egui::Grid::new(id).striped(true).show(ui, |ui| {
            for (i, e) in list.into_iter().flatten().take(10).enumerate() {
                ui.label(format!("{}", i + 1));
                ui.monospace(format!("{:?}", e.text));
                ui.label(format!("{:.3}", e.prob));
                ui.end_row();
            }
        });
    });
}

impl ShiftView {
    fn current_item(&self) -> Option<&ShiftItem> {
        self.runs.get(self.run)?.items.get(self.item)
    }

    fn results_ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        // The ratio table of every run.
        ui.horizontal(|ui| {
            ui.label(RichText::new("Runs").strong());
            if ui
                .button("Clear runs")
                .on_hover_text("Forget every run shown here")
                .clicked()
            {
                self.runs.clear();
                self.run = 0;
                self.item = 0;
                self.token = None;
            }
        });
        if self.runs.is_empty() {
            return;
        }
        egui::Grid::new("shift_ratios")
            .striped(true)
            .show(ui, |ui| {
                for h in [
                    "",
                    "tuned (B)",
                    "base (A)",
                    "responses",
                    "positions",
                    "unshifted",
                    "marginal",
                    "shifted",
                ] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for (i, run) in self.runs.iter().enumerate() {
                    ui.radio_value(&mut self.run, i, format!("{}", i + 1));
                    ui.colored_label(run_color(i), &run.tuned_model);
                    ui.label(&run.base_model);
                    ui.label(format!(
                        "{}{}",
                        run.items.len(),
                        if run.cancelled { " (stopped)" } else { "" }
                    ));
                    ui.label(run.summary.positions.to_string());
                    for r in run.summary.ratios {
                        ui.label(pct(r));
                    }
                    ui.end_row();
                }
            });
        self.run = self.run.min(self.runs.len() - 1);
        ui.add_space(theme::SECTION_GAP);
        // Where shifts sit: by relative position, and a metric by position; one curve per run.
        let per_run = |points: &dyn Fn(&ShiftRun) -> Vec<(f64, f64)>| -> Vec<Series> {
            self.runs
                .iter()
                .enumerate()
                .map(|(i, run)| Series {
                    name: format!("{} {}", i + 1, run.tuned_model),
                    color: run_color(i),
                    points: points(run),
                    dash: Dash::Solid,
                })
                .collect()
        };
        let relative = per_run(&|run| {
            run.summary
                .shifted_by_relative_position()
                .iter()
                .enumerate()
                .map(|(b, &v)| ((b as f64 + 0.5) / RELATIVE_BINS as f64, 100.0 * v))
                .collect()
        });
        let metric = cx.state.shift.metric.min(METRICS.len());
        let metric_name = if metric == METRICS.len() {
            "shifted (%)"
        } else {
            METRICS[metric]
        };
        let by_position = per_run(&|run| {
            run.summary
                .by_position
                .iter()
                .map(|p| {
                    let v = if metric == METRICS.len() {
                        100.0 * p.shifted
                    } else {
                        p.means[metric]
                    };
                    (p.t as f64, v)
                })
                .collect()
        });
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("By position");
            let s = &mut cx.state.shift;
            egui::ComboBox::from_id_salt("shift_metric")
                .selected_text(metric_name)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut s.metric, METRICS.len(), "shifted (%)");
                    for (i, m) in METRICS.iter().enumerate() {
                        ui.selectable_value(&mut s.metric, i, *m);
                    }
                })
                .response
                .labelled_by(label.id);
        });
        ui.columns(2, |cols| {
            line_plot_ui(
                &mut cols[0],
                "Shifted ratio by relative position",
                &relative,
                "t / response length",
                "shifted (%)",
                false,
            );
            line_plot_ui(
                &mut cols[1],
                "Metric by position",
                &by_position,
                "response position t",
                metric_name,
                false,
            );
        });
        ui.add_space(theme::SECTION_GAP);
        self.response_ui(ui, cx);
        // The lens next to the token it was taken at.
        ui.add_space(theme::SECTION_GAP);
        self.lens_ui(ui, cx);
        ui.add_space(theme::SECTION_GAP);
        let Some(run) = self.runs.get(self.run) else {
            return;
        };
        ui.label(RichText::new(format!("Most shifted tokens of run {}", self.run + 1)).strong());
        egui::Grid::new("shift_tokens")
            .striped(true)
            .show(ui, |ui| {
                for h in ["token", "shifted", "occurrences", "ratio"] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for t in run.summary.top_shifted.iter().take(15) {
                    ui.monospace(format!("{:?}", t.token));
                    ui.label(t.shifted.to_string());
                    ui.label(t.occurrences.to_string());
                    ui.label(pct(t.ratio));
                    ui.end_row();
                }
            });
    }

    fn response_ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let Some(run) = self.runs.get(self.run) else {
            return;
        };
        if run.items.is_empty() {
            ui.label(RichText::new("This run has no responses").color(theme::MUTED));
            return;
        }
        self.item = self.item.min(run.items.len() - 1);
        ui.horizontal_wrapped(|ui| {
            let label = ui.label(RichText::new("Response").strong());
            let before = self.item;
            egui::ComboBox::from_id_salt("shift_item")
                .selected_text(short(&run.items[self.item].prompt, 60))
                .width(420.0)
                .show_ui(ui, |ui| {
                    for (i, item) in run.items.iter().enumerate() {
                        ui.selectable_value(&mut self.item, i, short(&item.prompt, 80));
                    }
                })
                .response
                .labelled_by(label.id);
            if before != self.item {
                self.token = None;
            }
            ui.label(RichText::new("   ").background_color(theme::SHIFT_MARGINAL))
                .on_hover_text("marginal: A ranks B's token 2nd or 3rd");
            ui.label("marginal");
            ui.label(RichText::new("   ").background_color(theme::SHIFT_SHIFTED))
                .on_hover_text("shifted: A ranks B's token 4th or lower");
            ui.label("shifted");
        });
        let item = &run.items[self.item];
        ui.label(RichText::new(&item.prompt).color(theme::MUTED));
        let mut clicked = None;
        ui.horizontal_wrapped(|ui| {
            ui.spacing_mut().item_spacing.x = 0.0;
            for (t, piece) in item.shift.pieces.iter().enumerate() {
                let category = item.shift.positions.get(t).map(|m| m.category);
                let mut text = RichText::new(piece.replace('\n', " ")).monospace();
                text = match category {
                    Some(Category::Marginal) => text
                        .background_color(theme::SHIFT_MARGINAL)
                        .color(Color32::BLACK),
                    Some(Category::Shifted) => text
                        .background_color(theme::SHIFT_SHIFTED)
                        .color(Color32::WHITE),
                    _ => text,
                };
                if self.token == Some(t) {
                    text = text.underline().strong();
                }
                let tr = item.shift.positions.get(t).map_or(0, |m| m.tr);
                let response = ui
                    .add(egui::Label::new(text).sense(egui::Sense::click()))
                    .on_hover_text(format!(
                        "t = {t}, TR = {tr}; B: {}; A: {}",
                        top3(item.shift.aligned_top.get(t)),
                        top3(item.shift.base_top.get(t))
                    ));
                if response.clicked() {
                    clicked = Some(t);
                }
                if piece.contains('\n') {
                    ui.end_row();
                }
            }
        });
        if let Some(t) = clicked {
            self.token = Some(t);
        }
        let Some(t) = self.token.filter(|&t| t < item.shift.pieces.len()) else {
            ui.label(
                RichText::new("Click a token for both models' top 10 there, the logit lens, or its attribution")
                    .color(theme::MUTED),
            );
            return;
        };
        ui.add_space(6.0);
        if let Some(m) = item.shift.positions.get(t) {
            ui.label(format!(
                "Token {t} {:?}: {}  (TR {}, KL {:.4}, Jaccard {:.3}, WS {:.4}, TP {:.4}, nDCG {:.3})",
                item.shift.pieces[t],
                m.category.name(),
                m.tr,
                m.kl,
                m.jaccard,
                m.ws,
                m.tp,
                m.ndcg
            ));
        }
        ui.horizontal(|ui| {
            top_table(
                ui,
                "shift_top_b",
                "B (tuned) top 10",
                item.shift.aligned_top.get(t),
            );
            ui.add_space(24.0);
            top_table(
                ui,
                "shift_top_a",
                "A (base) top 10",
                item.shift.base_top.get(t),
            );
        });
        ui.horizontal(|ui| {
            let busy = cx.running.is_some();
            if ui
                .add_enabled(!busy, egui::Button::new("Lens at this token"))
                .on_hover_text("Rank and probability of B's token at every layer of A and of B (each layer's residual stream through the final norm and the unembedding)")
                .clicked()
            {
                let b_len = item.shift.aligned_ids.len().min(t);
                let a_len = item.shift.base_ids.len().min(t);
                let mut a = item.shift.base_context.clone();
                a.extend_from_slice(&item.shift.base_ids[..a_len]);
                let mut b = item.shift.aligned_context.clone();
                b.extend_from_slice(&item.shift.aligned_ids[..b_len]);
                // B's token: the response token at t (B's own greedy choice when B wrote
                // the response).
                let target = item.shift.aligned_ids.get(t).copied().unwrap_or_default();
                cx.actions.push(Action::Submit {
                    owner: "shift",
                    job: Box::new(Job::Lens {
                        slots: vec![Slot::A, Slot::B],
                        request: Box::new(LensRequest::Ids { a, b, target }),
                    }),
                    label: "Logit lens of A and B".to_owned(),
                });
            }
            if ui
                .button("Explain this token")
                .on_hover_text("Open the Attribution view on this prompt with the response pinned up to this token: its last column is this token")
                .clicked()
            {
                let response: String = item.shift.pieces[..=t].concat();
                cx.state.prompt.clone_from(&item.prompt);
                cx.state.chat = true;
                cx.state.attribution.pin_response = true;
                cx.state.attribution.response = response;
                cx.actions.push(Action::Show(View::analysis("attribution")));
                cx.actions.push(Action::Run("attribution"));
            }
        });
    }

    fn lens_ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        ui.label(RichText::new("Logit lens").strong());
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Prompt view's prompt, token position");
            ui.add(egui::DragValue::new(&mut cx.state.shift.lens_position).range(0..=100_000))
                .labelled_by(label.id)
                .on_hover_text("0-based token position in the rendered prompt (the Prompt view's chat setting applies)");
            let position = cx.state.shift.lens_position;
            let any = cx.any_loaded();
            if ui
                .add_enabled(any && cx.running.is_none(), egui::Button::new("Lens of the prompt"))
                .on_hover_text("Where in depth each model comes to B's next token at this position")
                .clicked()
            {
                let slots: Vec<Slot> = [Slot::A, Slot::B]
                    .into_iter()
                    .zip(cx.slots.iter())
                    .filter(|(_, v)| v.info.is_some())
                    .map(|(s, _)| s)
                    .collect();
                self.token = None;
                cx.actions.push(Action::Submit {
                    owner: "shift",
                    job: Box::new(Job::Lens {
                        slots,
                        request: Box::new(LensRequest::Prompt {
                            prompt: cx.state.prompt.clone(),
                            chat: cx.state.chat,
                            position: Some(position),
                        }),
                    }),
                    label: "Logit lens of the prompt".to_owned(),
                });
            }
        });
        let Some((what, lens)) = &self.lens else {
            return;
        };
        ui.label(format!("{:?} at {what}", lens.target_text()));
        let series = |prob: bool| -> Vec<Series> {
            lens.curves
                .iter()
                .map(|(slot, model, curve)| Series {
                    name: format!("{slot:?} {model}"),
                    color: theme::slot_color(*slot),
                    points: curve
                        .points
                        .iter()
                        .map(|p| {
                            (
                                p.layer as f64,
                                if prob {
                                    f64::from(p.prob)
                                } else {
                                    p.rank as f64
                                },
                            )
                        })
                        .collect(),
                    dash: Dash::Solid,
                })
                .collect()
        };
        ui.columns(2, |cols| {
            line_plot_ui(
                &mut cols[0],
                "Lens rank",
                &series(false),
                "layer",
                "rank (log)",
                true,
            );
            line_plot_ui(
                &mut cols[1],
                "Lens probability",
                &series(true),
                "layer",
                "probability",
                false,
            );
        });
    }
}

fn top3(list: Option<&Vec<TopEntry>>) -> String {
    list.map(|l| {
        l.iter()
            .take(3)
            .map(|e| format!("{:?} {:.2}", e.text, e.prob))
            .collect::<Vec<_>>()
            .join(", ")
    })
    .unwrap_or_default()
}

fn short(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}...")
    }
}
