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
use crate::train::forgetting::ForgettingReport;
use crate::train::results::{DataPreview, EvalReport, StepReport, TrainEstimate, TrainOutput};
use crate::train::settings::{
    GuidanceMode, GuidanceSettings, Progressive, Schedule, TrainSettings, TARGETABLE,
};
use crate::train::stages::{Stage, StagePlan};
use crate::ui::actions::{Action, PendingJob};
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::AppState;
use crate::ui::theme;
use crate::ui::widgets::file_row;
use crate::worker::forgetting::ForgettingRequest;
use crate::worker::train::{StagesOutput, TrainRequest, TrainUpdate};
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
    /// Run the stage list (or continue it in this folder).
    Stages(Option<PathBuf>),
    /// Evaluate forgetting on the base and each stage of the last run.
    Forgetting,
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
    /// The last continual run.
    pub stages_result: Option<StagesOutput>,
    /// The last forgetting evaluation.
    pub forgetting: Option<ForgettingReport>,
    /// The guidance vector's description, read from its `.json`: path and text.
    iv_info: Option<(PathBuf, String)>,
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
            settings: f.train_settings(),
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
        if matches!(ask, RunAsk::Estimate | RunAsk::Train(None)) {
            cx.state
                .finetune
                .train_settings()
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
            RunAsk::Stages(resume) => {
                let plan = StagePlan {
                    stages: cx.state.finetune.stages.clone(),
                };
                plan.validate().map_err(|err| err.to_string())?;
                let out = resume.unwrap_or_else(|| {
                    cx.state
                        .finetune
                        .out_dir
                        .clone()
                        .unwrap_or_else(|| crate::worker::train::new_run_dir(&model, "stages"))
                });
                self.training = TrainingView::default();
                self.stages_result = None;
                (
                    Job::TrainStages {
                        slot,
                        plan: Box::new(plan),
                        out,
                    },
                    "Training the stages".to_owned(),
                )
            }
            RunAsk::Forgetting => {
                let stages = self.evaluated_stages();
                let f = &cx.state.finetune;
                (
                    Job::Forgetting {
                        slot,
                        request: Box::new(ForgettingRequest {
                            sets: f.eval_sets.clone(),
                            stages,
                            max_items: f.eval_max_items,
                        }),
                    },
                    "Evaluating forgetting".to_owned(),
                )
            }
        })
    }

    /// The stages "Evaluate forgetting" scores after the base: the last continual run's
    /// finished stages, else the last single run's adapter.
    fn evaluated_stages(&self) -> Vec<(String, PathBuf)> {
        if let Some(out) = &self.stages_result {
            return out
                .adapters
                .iter()
                .enumerate()
                .map(|(i, dir)| {
                    let name = out.names.get(i).cloned().unwrap_or_default();
                    (format!("{} {name}", i + 1), dir.clone())
                })
                .collect();
        }
        self.training
            .result
            .as_ref()
            .and_then(|r| r.adapter_dir.clone())
            .map(|dir| vec![("tuned".to_owned(), dir)])
            .unwrap_or_default()
    }

    /// The description of the chosen guidance vector (read once per path).
    fn iv_info(&mut self, path: &std::path::Path) -> &str {
        if self.iv_info.as_ref().is_none_or(|(p, _)| p != path) {
            let text = iv_description(path);
            self.iv_info = Some((path.to_path_buf(), text));
        }
        self.iv_info.as_ref().map_or("", |(_, t)| t.as_str())
    }
}

/// "task, made with MODEL, best layer L, heads L14.H3 …" from a vector's `.json`, or why not.
fn iv_description(path: &std::path::Path) -> String {
    if path.as_os_str().is_empty() {
        return "choose a saved vector (Instruction vector view: Save vector…)".to_owned();
    }
    let json = crate::ivfile::meta_path(&crate::ivfile::vector_path(path));
    let meta = std::fs::read_to_string(&json)
        .map_err(|e| format!("{}: {e}", json.display()))
        .and_then(|t| {
            serde_json::from_str::<crate::ivfile::IvMeta>(&t)
                .map_err(|e| format!("{}: not a vector description ({e})", json.display()))
        });
    match meta {
        Err(err) => err,
        Ok(m) => {
            let heads: Vec<String> = m
                .head_list
                .iter()
                .map(|(l, h)| format!("L{l}.H{h}"))
                .collect();
            let best = m
                .evaluation
                .as_ref()
                .map_or_else(String::new, |e| format!(", best layer {}", e.best_layer));
            format!(
                "{}, made with {}{best}, |IV| {:.2}, heads {}",
                m.task,
                m.model,
                m.norm,
                heads.join(" ")
            )
        }
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
            JobOutput::StagesTrained(out) => {
                if let Some((_, run)) = out.runs.last() {
                    self.training.finished(run.clone());
                }
                self.stages_result = Some(*out);
            }
            JobOutput::Forgetting(report) => self.forgetting = Some(*report),
            other => return Err(other),
        }
        Ok(())
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let iv_path = cx.state.finetune.guidance.iv_path.clone();
        let iv_info = self.iv_info(&iv_path).to_owned();
        let ctx = FinetuneCtx {
            iv_info,
            stages_result: self.stages_result.as_ref(),
            forgetting: self.forgetting.as_ref(),
            base_source: cx.slots[0].info.as_ref().map(|i| i.source.clone()),
            base: cx.slots[0]
                .info
                .as_ref()
                .map(crate::model::ModelInfo::display_name),
            base_has_template: cx.slots[0]
                .info
                .as_ref()
                .is_none_or(|info| info.has_chat_template),
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
        match &self.training.result {
            Some(out) => Some(export::default_file_stem("training", &out.base_model, "")),
            None => self.forgetting.as_ref().map(|_| "forgetting".to_owned()),
        }
    }

    /// The curves (`<stem>.*`) and, after "Evaluate forgetting", the forgetting figure and
    /// tables (`<stem>_forgetting.*`): what `tunelens train` and `tunelens forgetting --out`
    /// write.
    fn exporter(&self, _state: &AppState) -> Option<Exporter> {
        let out = self.training.result.clone();
        let report = self.forgetting.clone();
        if out.is_none() && report.is_none() {
            return None;
        }
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            let mut written = Vec::new();
            if let Some(out) = &out {
                written.extend(export::views::write_training(dir, stem, out)?);
            }
            if let Some(report) = &report {
                let stem = format!("{stem}_forgetting");
                written.extend(export::forgetting::write_forgetting(dir, &stem, report)?);
            }
            Ok(written)
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
    /// Guidance: none, or the code or paper version.
    pub guidance_mode: Option<GuidanceMode>,
    /// Guidance settings (kept while guidance is off).
    pub guidance: GuidanceSettings,
    /// The continual stage list.
    pub stages: Vec<Stage>,
    /// Evaluation sets of "Evaluate forgetting" (empty: the shipped sets).
    pub eval_sets: Vec<PathBuf>,
    /// At most this many items per evaluation set (0: all).
    pub eval_max_items: usize,
    /// Result of the last plan open or save.
    #[serde(skip)]
    pub plan_note: Option<String>,
}

impl FinetuneUi {
    /// The trainer settings with the chosen guidance.
    pub fn train_settings(&self) -> TrainSettings {
        let mut settings = self.settings.clone();
        settings.guidance = self.guidance_mode.map(|mode| GuidanceSettings {
            mode,
            ..self.guidance.clone()
        });
        settings
    }

    /// The current data and settings as a new stage.
    pub fn as_stage(&self) -> Stage {
        let name = self
            .data_file
            .as_deref()
            .and_then(std::path::Path::file_stem)
            .map_or_else(
                || "instructions".to_owned(),
                |s| s.to_string_lossy().into_owned(),
            );
        Stage {
            name,
            data: DataSettings {
                path: self.data_file.clone().unwrap_or_default(),
                template: self.template,
                max_len: self.max_len,
                validation_fraction: self.validation_fraction,
            },
            settings: self.train_settings(),
        }
    }
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
            guidance_mode: None,
            guidance: GuidanceSettings::code(PathBuf::new()),
            stages: Vec::new(),
            eval_sets: Vec::new(),
            eval_max_items: 0,
            plan_note: None,
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
    /// The stage of a continual run being trained: index, count, name.
    pub stage: Option<(usize, usize, String)>,
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
            TrainUpdate::Stage { index, total, name } => {
                self.stage = Some((index, total, name));
                self.steps.clear();
                self.evals.clear();
                self.checkpoints.clear();
            }
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

fn settings_grid(ui: &mut egui::Ui, s: &mut FinetuneUi, base_has_template: bool) {
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
                // A base checkpoint without a chat template trains on the §5.1 template.
                if !base_has_template && s.template == PromptTemplate::Chat {
                    s.template = PromptTemplate::Definition;
                }
                ui.add_enabled_ui(base_has_template, |ui| {
                    ui.selectable_value(
                        &mut s.template,
                        PromptTemplate::Chat,
                        "Model's chat template",
                    )
                    .on_disabled_hover_text("slot A's model has no chat template");
                });
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

fn drag_f64(
    ui: &mut egui::Ui,
    label: &str,
    value: &mut f64,
    range: std::ops::RangeInclusive<f64>,
    speed: f64,
) {
    let l = ui.label(label);
    ui.add(egui::DragValue::new(value).range(range).speed(speed))
        .labelled_by(l.id);
}

/// The guidance section: none / code / paper, the vector, and every weight of §5.2 and §5.4.
fn guidance_ui(ui: &mut egui::Ui, s: &mut FinetuneUi, iv_info: &str, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        ui.label("Guidance");
        let before = s.guidance_mode;
        ui.selectable_value(&mut s.guidance_mode, None, "none (plain LoRA)");
        ui.selectable_value(&mut s.guidance_mode, Some(GuidanceMode::Code), GuidanceMode::Code.label())
            .on_hover_text("FvForgetting's released code (METHODS.md §5.2): the IV in the reference pass, kl1 + kl2 + head preservation");
        ui.selectable_value(&mut s.guidance_mode, Some(GuidanceMode::Paper), GuidanceMode::Paper.label())
            .on_hover_text("The paper's description, reconstructed (§5.4): progressive IV in the trainable pass, λ·KL with λ = 0.05; not in the released code");
        if s.guidance_mode != before {
            if let Some(mode) = s.guidance_mode {
                // The preset of the version, keeping the vector and the edit layer.
                let (path, layer) = (s.guidance.iv_path.clone(), s.guidance.layer);
                s.guidance = match mode {
                    GuidanceMode::Code => GuidanceSettings::code(path),
                    GuidanceMode::Paper => GuidanceSettings::paper(path),
                };
                s.guidance.layer = layer;
            }
        }
    });
    if s.guidance_mode.is_none() {
        return;
    }
    let path = (!s.guidance.iv_path.as_os_str().is_empty()).then_some(s.guidance.iv_path.as_path());
    ui.horizontal(|ui| {
        ui.label("Instruction vector");
        let name = path.and_then(|p| p.file_name()).map_or_else(
            || "none chosen".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        ui.label(egui::RichText::new(name).strong());
        if ui.button("Open…").clicked() {
            actions.push(Action::PickFile(DialogKind::GuidanceIv));
        }
    });
    ui.label(egui::RichText::new(iv_info).color(theme::MUTED));
    let g = &mut s.guidance;
    egui::Grid::new("finetune_guidance")
        .num_columns(4)
        .spacing([12.0, 4.0])
        .show(ui, |ui| {
            let l = ui.label("Edit layer");
            ui.add(egui::DragValue::new(&mut g.layer).range(0..=200))
                .labelled_by(l.id)
                .on_hover_text(
                    "The IV is added to this layer's o_proj output at the last prompt token",
                );
            drag_f64(ui, "τ", &mut g.tau, 0.1..=20.0, 0.05);
            ui.end_row();
            drag_f64(
                ui,
                "α1 (kl1, t_b rows)",
                &mut g.kl_alpha1,
                0.0..=1000.0,
                0.1,
            );
            drag_f64(
                ui,
                "α2 (kl2, all rows)",
                &mut g.kl_alpha2,
                0.0..=100.0,
                0.01,
            );
            ui.end_row();
            drag_f64(ui, "α_pr (each head)", &mut g.pr_alpha, 0.0..=100.0, 0.05);
            drag_f64(ui, "KL threshold", &mut g.kl_threshold, 0.0..=10.0, 0.01);
            ui.end_row();
            drag_f64(ui, "MSE threshold", &mut g.mse_threshold, 0.0..=10.0, 0.001);
            ui.end_row();
        });
    ui.horizontal(|ui| {
        ui.label("IV in the trainable pass");
        let step = match g.progressive {
            Some(Progressive::Step(at)) => at,
            _ => 0.5,
        };
        ui.selectable_value(&mut g.progressive, None, "off");
        ui.selectable_value(
            &mut g.progressive,
            Some(Progressive::Linear),
            "linear 1 to 0",
        );
        ui.selectable_value(
            &mut g.progressive,
            Some(Progressive::Cosine),
            "cosine 1 to 0",
        );
        ui.selectable_value(&mut g.progressive, Some(Progressive::Step(step)), "step");
        if let Some(Progressive::Step(at)) = &mut g.progressive {
            let l = ui.label("at");
            ui.add(egui::DragValue::new(at).range(0.0..=1.0).speed(0.01))
                .labelled_by(l.id)
                .on_hover_text("The scale is 1 until this fraction of the run, then 0");
        }
    });
}

/// The continual stage list: rows with their data and vector, add / remove / reorder, open and
/// save a plan, run it.
fn stages_ui(
    ui: &mut egui::Ui,
    s: &mut FinetuneUi,
    ready: bool,
    actions: &mut Vec<Action>,
) -> Option<Ask> {
    let mut ask = None;
    let mut remove = None;
    let mut swap = None;
    let n = s.stages.len();
    for (i, stage) in s.stages.iter_mut().enumerate() {
        ui.horizontal(|ui| {
            let l = ui.label(format!("Stage {}", i + 1));
            ui.add(egui::TextEdit::singleline(&mut stage.name).desired_width(140.0))
                .labelled_by(l.id);
            let data = stage.data.path.file_name().map_or_else(
                || "shipped set".to_owned(),
                |n| n.to_string_lossy().into_owned(),
            );
            let guidance = stage.settings.guidance.as_ref().map_or_else(
                || "plain LoRA".to_owned(),
                |g| {
                    format!(
                        "{} with {}",
                        g.mode.label(),
                        g.iv_path
                            .file_name()
                            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                    )
                },
            );
            ui.label(
                egui::RichText::new(format!(
                    "{data} · {} steps · {guidance}",
                    stage.settings.steps
                ))
                .color(theme::MUTED),
            );
            if ui.add_enabled(i > 0, egui::Button::new("Up")).clicked() {
                swap = Some(i);
            }
            if ui
                .add_enabled(i + 1 < n, egui::Button::new("Down"))
                .clicked()
            {
                swap = Some(i + 1);
            }
            if ui.button("Remove").clicked() {
                remove = Some(i);
            }
        });
    }
    if let Some(i) = swap {
        s.stages.swap(i - 1, i);
    }
    if let Some(i) = remove {
        s.stages.remove(i);
    }
    ui.horizontal_wrapped(|ui| {
        if ui
            .button("Add stage from the settings above")
            .on_hover_text("The data file, template, settings and guidance above become the next stage")
            .clicked()
        {
            let stage = s.as_stage();
            s.stages.push(stage);
        }
        if ui.button("Open plan…").clicked() {
            actions.push(Action::PickFile(DialogKind::StagePlanOpen));
        }
        if ui.add_enabled(!s.stages.is_empty(), egui::Button::new("Save plan…")).clicked() {
            actions.push(Action::SaveDialog(DialogKind::StagePlanSave, "stages.json".to_owned()));
        }
        if ui
            .add_enabled(ready && !s.stages.is_empty(), egui::Button::new("Run stages"))
            .on_hover_text("Each stage trains a fresh LoRA on the model with the earlier stages merged (METHODS.md §5.3)")
            .clicked()
        {
            ask = Some(Ask::Job(RunAsk::Stages(None)));
        }
        if let Some(note) = &s.plan_note {
            ui.label(egui::RichText::new(note).color(theme::MUTED));
        }
    });
    ask
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{:.1}", 100.0 * x))
}

/// The forgetting table and plot: general / in-context / task score, `P_know` and `P_inst`
/// by stage, base first, and the forgetting of each stage.
fn forgetting_ui(ui: &mut egui::Ui, report: &ForgettingReport) {
    ui.label(
        egui::RichText::new(format!(
            "ROUGE-L F1 of greedy answers and length-normalised probabilities, in %; forgetting = base − stage. Decoding: {}",
            report.decoding
        ))
        .color(theme::MUTED),
    );
    let base = report.models.first();
    egui::Grid::new("forgetting_table")
        .striped(true)
        .num_columns(9)
        .spacing([14.0, 3.0])
        .show(ui, |ui| {
            for head in [
                "stage",
                "general",
                "in-context",
                "task",
                "P_know",
                "P_inst",
                "Δ general",
                "Δ in-context",
                "Δ task",
            ] {
                ui.label(egui::RichText::new(head).strong());
            }
            ui.end_row();
            for m in &report.models {
                let f = base.map_or([None; 3], |b| m.forgetting(b));
                ui.label(&m.label);
                for v in [
                    m.general,
                    m.icl,
                    m.task,
                    Some(m.p_know),
                    m.p_inst,
                    f[0],
                    f[1],
                    f[2],
                ] {
                    ui.label(pct(v));
                }
                ui.end_row();
            }
        });
    let size = egui::vec2((ui.available_width() / 2.0 - 12.0).max(220.0), 180.0);
    let series = |get: &dyn Fn(&crate::train::forgetting::ModelScores) -> Option<f64>| {
        curve(
            report
                .models
                .iter()
                .enumerate()
                .filter_map(|(i, m)| get(m).map(|v| (i as f64, 100.0 * v))),
        )
    };
    let x_max = report.models.len().saturating_sub(1).max(1) as f64;
    ui.horizontal(|ui| {
        let scores = CurvePanel {
            id: "forgetting_scores",
            x_label: "stage",
            title: "Score (%)",
            from_zero: true,
            legend: true,
        };
        curve_panel(ui, &scores, size, x_max, |plot| {
            plot.line(Line::new("general", series(&|m| m.general)).color(theme::LOSS_TERMS[0]));
            plot.line(Line::new("in-context", series(&|m| m.icl)).color(theme::LOSS_TERMS[1]));
            plot.line(Line::new("task", series(&|m| m.task)).color(theme::LOSS_TERMS[2]));
        });
        let probs = CurvePanel {
            id: "forgetting_probs",
            x_label: "stage",
            title: "Answer probability (%)",
            from_zero: true,
            legend: true,
        };
        curve_panel(ui, &probs, size, x_max, |plot| {
            plot.line(Line::new("P_know", series(&|m| Some(m.p_know))).color(theme::SLOT_A));
            plot.line(Line::new("P_inst", series(&|m| m.p_inst)).color(theme::SLOT_B));
        });
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
    /// The x axis's title.
    x_label: &'a str,
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
            .x_axis_label(panel.x_label)
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
            x_label: "step",
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
            x_label: "step",
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
            x_label: "step",
            title: "Tokens per second",
            from_zero: true,
            legend: false,
        };
        curve_panel(ui, &tps, size, x_max, |plot| {
            plot.line(series("tokens/s", |s| s.tokens_per_s, theme::BAR));
        });
        let grad = CurvePanel {
            id: "train_grad",
            x_label: "step",
            title: "Gradient norm (before clipping)",
            from_zero: true,
            legend: false,
        };
        curve_panel(ui, &grad, size, x_max, |plot| {
            plot.line(series("grad norm", |s| s.grad_norm, theme::BAR));
        });
    });
    let metric_names: Vec<String> = steps
        .first()
        .map(|s| s.metrics.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    if !metric_names.is_empty() {
        // The raw terms before weights and thresholds, and the IV scale of the trainable pass.
        let raw = CurvePanel {
            id: "train_guidance",
            x_label: "step",
            title: "Raw guidance terms",
            from_zero: true,
            legend: true,
        };
        curve_panel(
            ui,
            &raw,
            egui::vec2(size.x * 2.0 + 12.0, size.y),
            x_max,
            |plot| {
                for (i, name) in metric_names.iter().enumerate() {
                    plot.line(
                        Line::new(
                            name.clone(),
                            curve(steps.iter().map(|s| {
                                let v = s
                                    .metrics
                                    .iter()
                                    .find(|(n, _)| n == name)
                                    .map_or(f64::NAN, |m| m.1);
                                (s.step as f64, v)
                            })),
                        )
                        .color(theme::LOSS_TERMS[(i + 1) % theme::LOSS_TERMS.len()]),
                    );
                }
            },
        );
    }
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
    /// Whether slot A's model has a chat template (true while none is loaded).
    pub base_has_template: bool,
    /// The run or estimate in progress.
    pub running: Option<&'a PendingJob>,
    /// The curves and last result.
    pub view: &'a TrainingView,
    /// Export status line.
    pub note: Option<&'a str>,
    /// What became of "Load as B", once pressed.
    pub load_as_b: Option<String>,
    /// The guidance vector's description.
    pub iv_info: String,
    /// The last continual run.
    pub stages_result: Option<&'a StagesOutput>,
    /// The last forgetting evaluation.
    pub forgetting: Option<&'a ForgettingReport>,
    /// Slot A's `--model` form, for "Load as B" of a stage.
    pub base_source: Option<String>,
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
            settings_grid(ui, settings, ctx.base_has_template);
            ui.add_space(4.0);
            guidance_ui(ui, settings, &ctx.iv_info, actions);
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
            egui::CollapsingHeader::new(format!("Continual stages ({})", settings.stages.len()))
                .id_salt("finetune_stages")
                .default_open(!settings.stages.is_empty())
                .show(ui, |ui| {
                    if let Some(a) = stages_ui(ui, settings, ctx.base.is_some() && !busy, actions) {
                        ask = Some(a);
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
            if let Some((index, total, name)) = &view.stage {
                ui.label(egui::RichText::new(format!("Stage {} of {total}: {name}", index + 1)).strong());
            }
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
            if let Some(out) = ctx.stages_result {
                ui.add_space(theme::SECTION_GAP);
                ui.label(egui::RichText::new(format!("Continual run in {}", out.out.display())).strong());
                for (i, combined) in out.combined.iter().enumerate() {
                    ui.horizontal(|ui| {
                        let name = out.names.get(i).map_or("", String::as_str);
                        ui.label(format!("after stage {} ({name})", i + 1));
                        if ui.button("Load as B").on_hover_text("The base with every stage up to this one merged").clicked() {
                            if let Some(base) = &ctx.base_source {
                                ask = Some(Ask::LoadAsB(format!("{base}+{}", combined.display())));
                            }
                        }
                    });
                }
                if out.cancelled {
                    let resume = out.out.clone();
                    if ui.add_enabled(ctx.base.is_some() && !busy, egui::Button::new("Continue the stages")).clicked() {
                        ask = Some(Ask::Job(RunAsk::Stages(Some(resume))));
                    }
                }
            }
            ui.add_space(theme::SECTION_GAP);
            ui.horizontal_wrapped(|ui| {
                let can_eval = ctx.base.is_some() && !busy && (ctx.stages_result.is_some() || view.result.as_ref().is_some_and(|r| r.adapter_dir.is_some()));
                if ui
                    .add_enabled(can_eval, egui::Button::new("Evaluate forgetting"))
                    .on_hover_text("General, in-context and task scores and P_know / P_inst of the base and each stage (METHODS.md §5.5)")
                    .on_disabled_hover_text("Finish a run or a continual run first")
                    .clicked()
                {
                    ask = Some(Ask::Job(RunAsk::Forgetting));
                }
                let sets = if settings.eval_sets.is_empty() {
                    "shipped sets (general, icl, task-present-past, task-singular-plural)".to_owned()
                } else {
                    settings
                        .eval_sets
                        .iter()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                ui.label(egui::RichText::new(sets).color(theme::MUTED));
                if ui.button("Add set…").clicked() {
                    actions.push(Action::PickFile(DialogKind::EvalSet));
                }
                if !settings.eval_sets.is_empty() && ui.button("Shipped sets").clicked() {
                    actions.push(Action::SetFile(DialogKind::EvalSet, None));
                }
                let l = ui.label("items per set");
                ui.add(egui::DragValue::new(&mut settings.eval_max_items).range(0..=100_000))
                    .labelled_by(l.id)
                    .on_hover_text("0: all items");
            });
            if let Some(report) = ctx.forgetting {
                forgetting_ui(ui, report);
                if ui.button("Export…").clicked() {
                    actions.push(Action::ExportDialog);
                }
            }
        });
    ask
}
