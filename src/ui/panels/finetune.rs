//! Fine-tune view: LoRA training of slot A's model on an instruction data set, with a preview
//! of the rendered examples, a measured time and memory estimate, Launch / Cancel / Resume,
//! live curves of every loss term, the validation loss, the learning rate and the throughput,
//! and "Load as B" to compare the tuned model with its base in every other view.

use std::path::PathBuf;

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};

use crate::export;
use crate::model::ModelSpec;
use crate::train::checkpoint::DataSettings;
use crate::train::dataset::PromptTemplate;
use crate::train::results::{DataPreview, EvalReport, StepReport, TrainEstimate, TrainOutput};
use crate::train::settings::{Schedule, TrainSettings, TARGETABLE};
use crate::ui::actions::{Action, PendingJob};
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::AppState;
use crate::ui::theme;
use crate::ui::widgets::file_row;
use crate::worker::train::{TrainRequest, TrainUpdate};
use crate::worker::{Event, Job, JobOutput, Slot};

/// The view's id.
const ID: &str = "finetune";

/// The jobs the view's buttons start on slot A's model.
#[derive(Clone, Debug, PartialEq)]
enum RunAsk {
    /// Render and count the data.
    Preview,
    /// Measure a few steps.
    Estimate,
    /// Launch, or resume the stopped run in this folder.
    Train(Option<PathBuf>),
}

/// What the view's buttons ask for.
#[derive(Clone, Debug, PartialEq)]
enum Ask {
    /// One of its jobs.
    Job(RunAsk),
    /// Load base + adapter into slot B (the app's load, not a job of the view).
    LoadAsB(String),
}

/// The Fine-tune view: settings in [`AppState::finetune`], the live and last run here.
#[derive(Default)]
pub struct FinetuneView {
    /// Curves, result, estimate and preview.
    pub training: TrainingView,
    /// The spec "Load as B" loaded, to confirm it once slot B holds it.
    pub loaded_as_b: Option<String>,
}

impl FinetuneView {
    fn request(state: &AppState, model: &str, resume: Option<PathBuf>) -> TrainRequest {
        let f = &state.finetune;
        let data_name = f.data_file.as_deref().map_or_else(
            || "instructions".to_owned(),
            |p| {
                p.file_stem()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
            },
        );
        TrainRequest {
            data: DataSettings {
                path: f.data_file.clone().unwrap_or_default(),
                template: f.template,
                max_len: f.max_len,
                validation_fraction: f.validation_fraction,
            },
            settings: f.settings.clone(),
            out: if resume.is_some() {
                None
            } else {
                Some(
                    f.out_dir
                        .clone()
                        .unwrap_or_else(|| crate::worker::train::new_run_dir(model, &data_name)),
                )
            },
            resume,
        }
    }

    /// Submits the job of a button: the buttons are enabled only when slot A is loaded and
    /// nothing runs, so an error here is a settings error, shown like any job's.
    fn submit(&mut self, ask: RunAsk, cx: &mut ViewCx<'_>) {
        let run_cx = RunCx {
            state: cx.state,
            slots: cx.slots,
        };
        let action = match self.ask_job(ask, &run_cx) {
            Ok((job, label)) => Action::Submit {
                owner: ID,
                job: Box::new(job),
                label,
            },
            Err(err) => Action::Error(err),
        };
        cx.actions.push(action);
    }

    /// The job of `ask` on slot A's model.
    fn ask_job(&mut self, ask: RunAsk, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        let Some(info) = &cx.slots[0].info else {
            return Err("Load the base model into slot A first".to_owned());
        };
        let model = info.display_name();
        if ask != RunAsk::Preview {
            cx.state
                .finetune
                .settings
                .validate()
                .map_err(|err| err.to_string())?;
        }
        let slot = Slot::A;
        Ok(match ask {
            RunAsk::Preview => (
                Job::PreviewData {
                    slot,
                    data: Self::request(cx.state, &model, None).data,
                },
                "Reading the training data".to_owned(),
            ),
            RunAsk::Estimate => (
                Job::EstimateTraining {
                    slot,
                    request: Box::new(Self::request(cx.state, &model, None)),
                },
                "Estimating the training run".to_owned(),
            ),
            RunAsk::Train(resume) => {
                if resume.is_none() {
                    // A new run: fresh curves, the preview and estimate stay.
                    self.training = TrainingView {
                        preview: self.training.preview.take(),
                        estimate: self.training.estimate.take(),
                        ..TrainingView::default()
                    };
                }
                (
                    Job::Train {
                        slot,
                        request: Box::new(Self::request(cx.state, &model, resume)),
                    },
                    "Training".to_owned(),
                )
            }
        })
    }
}

impl AnalysisView for FinetuneView {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> &'static str {
        "Fine-tune"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        self.ask_job(RunAsk::Train(None), cx)
    }

    fn on_event(&mut self, event: &Event) {
        if let Event::Train { update, .. } = event {
            self.training.update(update.clone());
        }
    }

    fn take(&mut self, output: JobOutput, _state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Trained(out) => self.training.finished(*out),
            JobOutput::TrainEstimated(estimate) => self.training.estimate = Some(estimate),
            JobOutput::DataPreview(preview) => self.training.preview = Some(*preview),
            other => return Err(other),
        }
        Ok(())
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let ctx = FinetuneCtx {
            base: cx.slots[0]
                .info
                .as_ref()
                .map(crate::model::ModelInfo::display_name),
            running: cx.running,
            view: &self.training,
            note: cx.note,
            load_as_b: self.loaded_as_b.as_ref().map(|spec| {
                let b = cx.slots[1].info.as_ref();
                if b.is_some_and(|info| ModelSpec::parse(&info.source) == ModelSpec::parse(spec)) {
                    "Loaded in slot B: every view now compares it with A".to_owned()
                } else if cx.slots[1].loading {
                    "Loading into slot B…".to_owned()
                } else {
                    "Sent to slot B".to_owned()
                }
            }),
        };
        match finetune_ui(ui, &mut cx.state.finetune, &ctx, cx.actions) {
            None => {}
            Some(Ask::LoadAsB(spec)) => {
                cx.actions.push(Action::OpenSpec {
                    slot: Slot::B,
                    spec: spec.clone(),
                });
                self.loaded_as_b = Some(spec);
            }
            Some(Ask::Job(ask)) => self.submit(ask, cx),
        }
    }

    fn export_stem(&self, _state: &AppState) -> Option<String> {
        let out = self.training.result.as_ref()?;
        Some(export::default_file_stem("training", &out.base_model, ""))
    }

    fn exporter(&self, _state: &AppState) -> Option<Exporter> {
        let out = self.training.result.clone()?;
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            export::views::write_training(dir, stem, &out)
        }))
    }

    fn picked(&mut self, kind: DialogKind, path: PathBuf) -> Option<(Job, String)> {
        if kind != DialogKind::MergedOutput {
            return None;
        }
        let result = self.training.result.as_ref()?;
        let adapter = result.adapter_dir.clone()?;
        let spec = ModelSpec {
            base: ModelSpec::parse(&result.base_model).base,
            adapter: Some(adapter),
        };
        Some((
            Job::SaveMerged { spec, out: path },
            "Saving the merged model".to_owned(),
        ))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Persisted settings of the view.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FinetuneUi {
    /// Data file; `None` = the shipped set.
    pub data_file: Option<PathBuf>,
    /// Output folder; `None` = a new folder under the runs folder.
    pub out_dir: Option<PathBuf>,
    /// Template.
    pub template: PromptTemplate,
    /// Longest example.
    pub max_len: usize,
    /// Validation fraction.
    pub validation_fraction: f64,
    /// Trainer settings.
    pub settings: TrainSettings,
}

impl Default for FinetuneUi {
    fn default() -> Self {
        let data = DataSettings::default();
        Self {
            data_file: None,
            out_dir: None,
            template: data.template,
            max_len: data.max_len,
            validation_fraction: data.validation_fraction,
            settings: TrainSettings::default(),
        }
    }
}

/// What the view shows of the current or last run (not persisted).
#[derive(Clone, Debug, Default)]
pub struct TrainingView {
    /// Loss term names.
    pub terms: Vec<String>,
    /// Steps so far.
    pub steps: Vec<StepReport>,
    /// Validations so far.
    pub evals: Vec<EvalReport>,
    /// Steps in the run.
    pub total: usize,
    /// Checkpoints written: step and folder.
    pub checkpoints: Vec<(usize, PathBuf)>,
    /// The last run's result.
    pub result: Option<TrainOutput>,
    /// The last estimate.
    pub estimate: Option<TrainEstimate>,
    /// The last data preview.
    pub preview: Option<DataPreview>,
}

impl TrainingView {
    /// Applies a worker update.
    pub fn update(&mut self, update: TrainUpdate) {
        match update {
            TrainUpdate::Started { done, total, terms } => {
                self.total = total;
                self.terms = terms;
                self.result = None;
                // A resumed run keeps the curves up to its checkpoint.
                self.steps.retain(|s| s.step <= done);
                self.evals.retain(|e| e.step <= done);
                if done == 0 {
                    self.checkpoints.clear();
                }
            }
            TrainUpdate::Step(report) => self.steps.push(report),
            TrainUpdate::Eval(report) => self.evals.push(report),
            TrainUpdate::Saved { step, dir } => self.checkpoints.push((step, dir)),
        }
    }

    /// Takes the finished (or stopped) run's result; its full history replaces the live one.
    pub fn finished(&mut self, out: TrainOutput) {
        self.steps.clone_from(&out.state.history);
        self.evals.clone_from(&out.state.evals);
        self.total = out.state.settings.steps;
        self.result = Some(out);
    }
}

fn number_row<T: egui::emath::Numeric>(
    ui: &mut egui::Ui,
    label: &str,
    value: &mut T,
    range: std::ops::RangeInclusive<T>,
    speed: f64,
) {
    let l = ui.label(label);
    ui.add(egui::DragValue::new(value).range(range).speed(speed))
        .labelled_by(l.id);
    ui.end_row();
}

fn settings_grid(ui: &mut egui::Ui, s: &mut FinetuneUi) {
    egui::Grid::new("finetune_settings")
        .num_columns(4)
        .spacing([12.0, 4.0])
        .show(ui, |ui| {
            let t = &mut s.settings;
            let l = ui.label("Steps");
            ui.add(egui::DragValue::new(&mut t.steps).range(1..=1_000_000))
                .labelled_by(l.id);
            let l = ui.label("Learning rate");
            ui.add(
                egui::DragValue::new(&mut t.learning_rate)
                    .range(1e-7..=1.0)
                    .speed(1e-5)
                    .custom_formatter(|v, _| format!("{v:.1e}")),
            )
            .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Batch size");
            ui.add(egui::DragValue::new(&mut t.batch_size).range(1..=256))
                .labelled_by(l.id);
            let l = ui.label("Gradient accumulation");
            ui.add(egui::DragValue::new(&mut t.grad_accum).range(1..=256))
                .labelled_by(l.id);
            ui.end_row();
            ui.label("Schedule");
            ui.horizontal(|ui| {
                for schedule in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
                    ui.selectable_value(&mut t.schedule, schedule, schedule.name());
                }
            });
            let l = ui.label("Warm-up steps");
            ui.add(egui::DragValue::new(&mut t.warmup_steps).range(0..=100_000))
                .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("LoRA rank");
            ui.add(egui::DragValue::new(&mut t.lora.rank).range(1..=256))
                .labelled_by(l.id);
            let l = ui.label("LoRA alpha");
            ui.add(egui::DragValue::new(&mut t.lora.alpha).range(0.5..=1024.0))
                .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("LoRA dropout");
            ui.add(
                egui::DragValue::new(&mut t.lora.dropout)
                    .range(0.0..=0.9)
                    .speed(0.01),
            )
            .labelled_by(l.id);
            let l = ui.label("Gradient clip");
            ui.add(
                egui::DragValue::new(&mut t.max_grad_norm)
                    .range(0.0..=100.0)
                    .speed(0.05),
            )
            .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Weight decay");
            ui.add(
                egui::DragValue::new(&mut t.weight_decay)
                    .range(0.0..=1.0)
                    .speed(0.001),
            )
            .labelled_by(l.id);
            let l = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut t.seed)).labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Validate every");
            ui.add(egui::DragValue::new(&mut t.eval_every).range(0..=100_000))
                .labelled_by(l.id);
            let l = ui.label("Checkpoint every");
            ui.add(egui::DragValue::new(&mut t.save_every).range(0..=100_000))
                .labelled_by(l.id);
            ui.end_row();
        });
    ui.horizontal_wrapped(|ui| {
        ui.label("Target modules");
        for module in TARGETABLE {
            let mut on = s.settings.lora.targets.iter().any(|t| t == module);
            if ui.checkbox(&mut on, module).changed() {
                if on {
                    s.settings.lora.targets.push(module.to_owned());
                } else {
                    s.settings.lora.targets.retain(|t| t != module);
                }
            }
        }
    });
    egui::Grid::new("finetune_data")
        .num_columns(2)
        .spacing([12.0, 4.0])
        .show(ui, |ui| {
            ui.label("Template");
            ui.horizontal(|ui| {
                ui.selectable_value(
                    &mut s.template,
                    PromptTemplate::Chat,
                    "Model's chat template",
                );
                ui.selectable_value(
                    &mut s.template,
                    PromptTemplate::Definition,
                    "Definition / Input / Output (§5.1)",
                );
            });
            ui.end_row();
            number_row(
                ui,
                "Max tokens per example",
                &mut s.max_len,
                8..=32_768,
                1.0,
            );
            number_row(
                ui,
                "Validation fraction",
                &mut s.validation_fraction,
                0.0..=0.5,
                0.01,
            );
        });
}

fn curve(points: impl Iterator<Item = (f64, f64)>) -> PlotPoints<'static> {
    points
        .filter(|p| p.1.is_finite())
        .map(|(x, y)| [x, y])
        .collect::<PlotPoints<'static>>()
}

/// A grid or read-out number with as many decimals as its step needs (`0.0001`, `0.00005`,
/// `12`, `2.5`), never `0.000` for a small non-zero value.
fn grid_number(value: f64, step: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    let step = if step > 0.0 && step.is_finite() {
        step
    } else {
        value.abs()
    };
    let decimals = (-step.log10().floor()).clamp(0.0, 10.0) as usize;
    if value.abs() >= 1e6 || value.abs() < 1e-6 {
        return format!("{value:.1e}");
    }
    format!("{value:.decimals$}")
}

/// One titled curve panel of the live training plots.
struct CurvePanel<'a> {
    id: &'a str,
    title: &'a str,
    /// Whether the y axis starts at 0.
    from_zero: bool,
    legend: bool,
}

fn curve_panel(
    ui: &mut egui::Ui,
    panel: &CurvePanel<'_>,
    size: egui::Vec2,
    x_max: f64,
    add: impl FnOnce(&mut egui_plot::PlotUi<'_>),
) {
    ui.vertical(|ui| {
        ui.label(egui::RichText::new(panel.title).strong());
        let mut plot = Plot::new(panel.id)
            .allow_scroll(false)
            .width(size.x)
            .height(size.y)
            .include_x(0.0)
            .include_x(x_max)
            .x_axis_label("step")
            .y_axis_label(panel.title)
            .x_axis_formatter(|mark, _| grid_number(mark.value, mark.step_size))
            .y_axis_formatter(|mark, _| grid_number(mark.value, mark.step_size));
        if panel.from_zero {
            plot = plot.include_y(0.0);
        }
        if panel.legend {
            plot = plot.legend(Legend::default());
        }
        plot.show(ui, add);
    });
}

fn curves_ui(ui: &mut egui::Ui, view: &TrainingView) {
    let size = egui::vec2((ui.available_width() / 2.0 - 12.0).max(220.0), 200.0);
    let steps = &view.steps;
    let x_max = view.total.max(1) as f64;
    let series = |name: &str, value: fn(&StepReport) -> f64, color: egui::Color32| {
        Line::new(
            name.to_owned(),
            curve(steps.iter().map(|s| (s.step as f64, value(s)))),
        )
        .color(color)
    };
    ui.horizontal(|ui| {
        let loss = CurvePanel {
            id: "train_loss",
            title: "Loss",
            from_zero: false,
            legend: true,
        };
        curve_panel(ui, &loss, size, x_max, |plot| {
            plot.line(series("train", |s| s.loss, theme::SLOT_A));
            if view.terms.len() > 1 {
                for (i, name) in view.terms.iter().enumerate() {
                    plot.line(
                        Line::new(
                            name.clone(),
                            curve(steps.iter().map(|s| {
                                (s.step as f64, s.terms.get(i).map_or(f64::NAN, |t| t.1))
                            })),
                        )
                        .color(theme::LOSS_TERMS[i % theme::LOSS_TERMS.len()]),
                    );
                }
            }
            if !view.evals.is_empty() {
                let points = || curve(view.evals.iter().map(|e| (e.step as f64, e.loss)));
                plot.line(Line::new("validation", points()).color(theme::SLOT_B));
                plot.points(
                    Points::new("validation", points())
                        .radius(3.0)
                        .color(theme::SLOT_B),
                );
            }
        });
        let lr = CurvePanel {
            id: "train_lr",
            title: "Learning rate",
            from_zero: true,
            legend: false,
        };
        curve_panel(ui, &lr, size, x_max, |plot| {
            plot.line(series("learning rate", |s| s.learning_rate, theme::BAR));
        });
    });
    ui.horizontal(|ui| {
        let tps = CurvePanel {
            id: "train_tps",
            title: "Tokens per second",
            from_zero: true,
            legend: false,
        };
        curve_panel(ui, &tps, size, x_max, |plot| {
            plot.line(series("tokens/s", |s| s.tokens_per_s, theme::BAR));
        });
        let grad = CurvePanel {
            id: "train_grad",
            title: "Gradient norm (before clipping)",
            from_zero: true,
            legend: false,
        };
        curve_panel(ui, &grad, size, x_max, |plot| {
            plot.line(series("grad norm", |s| s.grad_norm, theme::BAR));
        });
    });
}

fn preview_ui(ui: &mut egui::Ui, preview: &DataPreview) {
    let s = &preview.summary;
    ui.label(format!(
        "{} training / {} validation examples, {} training tokens ({} trained on){}",
        s.train,
        s.validation,
        s.train_tokens,
        s.train_label_tokens,
        if s.truncated > 0 {
            format!(", {} cut at the maximum length", s.truncated)
        } else {
            String::new()
        }
    ));
    if !s.issues.is_empty() {
        egui::CollapsingHeader::new(format!("{} lines skipped", s.issues.len()))
            .id_salt("finetune_issues")
            .show(ui, |ui| {
                for issue in s.issues.iter().take(50) {
                    ui.label(egui::RichText::new(issue.to_string()).color(theme::ERROR));
                }
            });
    }
    egui::ScrollArea::vertical()
        .id_salt("finetune_preview")
        .max_height(220.0)
        .show(ui, |ui| {
            for row in &preview.rows {
                ui.horizontal_wrapped(|ui| {
                    ui.label(
                        egui::RichText::new(format!(
                            "line {} · {} · {} tokens, {} trained",
                            row.line, row.format, row.tokens, row.label_tokens
                        ))
                        .color(theme::MUTED),
                    );
                });
                // One text with two styles, so the template's line breaks stay where they are.
                let mut job = egui::text::LayoutJob::default();
                let font = egui::TextStyle::Monospace.resolve(ui.style());
                job.append(
                    &row.prompt,
                    0.0,
                    egui::TextFormat::simple(font.clone(), theme::MUTED),
                );
                job.append(
                    row.response.trim_end(),
                    0.0,
                    egui::TextFormat::simple(font, ui.visuals().strong_text_color()),
                );
                ui.label(job);
                ui.separator();
            }
        });
}

/// Everything the view needs besides its settings.
pub struct FinetuneCtx<'a> {
    /// Slot A's model name, when loaded.
    pub base: Option<String>,
    /// The run or estimate in progress.
    pub running: Option<&'a PendingJob>,
    /// The curves and last result.
    pub view: &'a TrainingView,
    /// Export status line.
    pub note: Option<&'a str>,
    /// What became of "Load as B", once pressed.
    pub load_as_b: Option<String>,
}

/// Draws the Fine-tune view; returns what its run buttons asked for.
fn finetune_ui(
    ui: &mut egui::Ui,
    settings: &mut FinetuneUi,
    ctx: &FinetuneCtx<'_>,
    actions: &mut Vec<Action>,
) -> Option<Ask> {
    let mut ask = None;
    ui.heading("Fine-tune");
    ui.label(
        egui::RichText::new(
            "LoRA on slot A's model (frozen base, adapters on the chosen modules); the tuned model loads as B for every other view.",
        )
        .color(theme::MUTED),
    );
    let view = ctx.view;
    let busy = ctx.running.is_some();
    egui::ScrollArea::vertical()
        .id_salt("finetune_scroll")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label("Base model");
                match &ctx.base {
                    Some(name) => ui.label(egui::RichText::new(name).strong()),
                    None => ui.label(egui::RichText::new("load a model into slot A").color(theme::ERROR)),
                };
            });
            file_row(
                ui,
                "Dataset",
                settings.data_file.as_deref(),
                "shipped set (sample_prompts/instructions.jsonl)",
                DialogKind::TrainData,
                actions,
            );
            file_row(
                ui,
                "Output folder",
                settings.out_dir.as_deref(),
                "a new folder under the runs folder",
                DialogKind::TrainOutput,
                actions,
            );
            ui.add_space(4.0);
            settings_grid(ui, settings);
            ui.horizontal(|ui| {
                if ui.button("Defaults").clicked() {
                    let keep = (settings.data_file.clone(), settings.out_dir.clone());
                    *settings = FinetuneUi::default();
                    (settings.data_file, settings.out_dir) = keep;
                }
                let ready = ctx.base.is_some() && !busy;
                if ui
                    .add_enabled(ready, egui::Button::new("Preview data"))
                    .clicked()
                {
                    ask = Some(Ask::Job(RunAsk::Preview));
                }
                if ui
                    .add_enabled(ready, egui::Button::new("Estimate"))
                    .on_hover_text("Runs a few steps and extrapolates time and memory")
                    .clicked()
                {
                    ask = Some(Ask::Job(RunAsk::Estimate));
                }
                if ui
                    .add_enabled(ready, egui::Button::new("Launch"))
                    .on_disabled_hover_text("Load a model into slot A, or wait for the running job")
                    .clicked()
                {
                    ask = Some(Ask::Job(RunAsk::Train(None)));
                }
                let resumable = view
                    .result
                    .as_ref()
                    .filter(|r| r.cancelled)
                    .and_then(|r| r.out.clone());
                if ui
                    .add_enabled(ready && resumable.is_some(), egui::Button::new("Resume"))
                    .clicked()
                {
                    ask = Some(Ask::Job(RunAsk::Train(resumable)));
                }
                if let Some(first) = ctx.running.and_then(|j| j.queued_behind.as_ref()) {
                    ui.label(egui::RichText::new(format!("queued behind {first}")).color(theme::MUTED));
                } else if let Some(job) = ctx.running {
                    if ui.button("Cancel").clicked() {
                        actions.push(Action::Stop);
                    }
                    let frac = if view.total > 0 && job.label.starts_with("Training") {
                        view.steps.last().map_or(0.0, |s| s.step as f32 / view.total as f32)
                    } else {
                        job.frac.unwrap_or(0.0)
                    };
                    ui.add(
                        egui::ProgressBar::new(frac)
                            .desired_width(160.0)
                            .show_percentage(),
                    );
                }
            });
            if let Some(e) = &view.estimate {
                ui.label(format!(
                    "Estimate: {:.2} s per step (median of {} measured), so {:.1} min for {} steps; about {:.0} MB more memory; {} trainable parameters",
                    e.seconds_per_step,
                    e.measured_steps,
                    e.seconds_per_step * settings.settings.steps as f64 / 60.0,
                    settings.settings.steps,
                    e.extra_memory_mb,
                    e.trainable_params
                ));
            }
            if let Some(preview) = &view.preview {
                egui::CollapsingHeader::new("Data preview")
                    .id_salt("finetune_preview_header")
                    .default_open(true)
                    .show(ui, |ui| preview_ui(ui, preview));
            }
            ui.add_space(theme::SECTION_GAP);
            if let Some(last) = view.steps.last() {
                ui.horizontal_wrapped(|ui| {
                    ui.label(
                        egui::RichText::new(format!(
                            "step {}/{} · loss {:.4}{} · lr {:.2e} · {:.2} s/step · {:.0} tokens/s",
                            last.step,
                            view.total,
                            last.loss,
                            view.evals
                                .last()
                                .map_or_else(String::new, |e| format!(" · validation {:.4}", e.loss)),
                            last.learning_rate,
                            last.seconds,
                            last.tokens_per_s
                        ))
                        .strong(),
                    );
                });
                curves_ui(ui, view);
            } else if !busy {
                ui.label(egui::RichText::new("Curves appear here while a run trains").color(theme::MUTED));
            }
            if let Some(result) = &view.result {
                ui.horizontal_wrapped(|ui| {
                    let status = if result.cancelled {
                        format!("Stopped after step {}; Resume continues from its checkpoint.", result.state.step)
                    } else {
                        format!("Finished {} steps in {:.0} s.", result.state.step, result.seconds)
                    };
                    ui.label(status);
                    if let Some(dir) = &result.adapter_dir {
                        ui.label(egui::RichText::new(format!("Adapter: {}", dir.display())).color(theme::MUTED));
                        if ui.button("Load as B").clicked() {
                            ask = Some(Ask::LoadAsB(format!("{}+{}", result.base_model, dir.display())));
                        }
                        if let Some(status) = &ctx.load_as_b {
                            ui.label(egui::RichText::new(status).color(theme::MUTED));
                        }
                    }
                    if result.adapter_dir.is_some() && ui.button("Save merged model…").clicked() {
                        actions.push(Action::Dialog {
                            slot: Slot::A,
                            kind: DialogKind::MergedOutput,
                        });
                    }
                    if ui.button("Export…").clicked() {
                        actions.push(Action::ExportDialog);
                    }
                    if let Some(note) = ctx.note {
                        ui.label(egui::RichText::new(note).color(theme::MUTED));
                    }
                });
            }
            if let Some((step, dir)) = view.checkpoints.last() {
                ui.label(
                    egui::RichText::new(format!("Last checkpoint: step {step}, {}", dir.display()))
                        .color(theme::MUTED),
                );
            }
        });
    ask
}
