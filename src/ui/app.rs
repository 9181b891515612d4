//! The eframe application: owns the persisted [`AppState`], the worker handle and what the
//! worker reported. `logic` ingests events and input; `ui` only draws; panels push [`Action`]s
//! that become jobs after the frame. Never touches a tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;

use crate::analysis::attribution::{
    by_words, set_instruction_mask, AttributionConfig, Instructions,
};
use crate::analysis::consistency::Pooling;
use crate::analysis::ffn_concepts::ConceptsConfig;
use crate::analysis::head_pairs::HeadsConfig;
use crate::analysis::types::Attribution;
use crate::export;
use crate::model::generate::StopReason;
use crate::model::{DeviceChoice, ModelInfo, ModelSpec};
use crate::samples::{self, SampleSet};
use crate::train::checkpoint::DataSettings;
use crate::ui::dialogs::{DialogKind, Dialogs};
use crate::ui::panels;
use crate::ui::panels::finetune::TrainingView;
use crate::ui::state::{AppState, InstructionSource, View};
use crate::ui::theme;
use crate::ui::widgets::status;
use crate::wordfiles::WordSource;
use crate::worker::consistency::{ConsistencyOutput, ConsistencySettings, Measures};
use crate::worker::job::SlotAttribution;
use crate::worker::train::TrainRequest;
use crate::worker::weights::{ConceptsOutput, HeadsOutput};
use crate::worker::{self, Event, Job, JobId, JobOutput, Slot, WorkerHandle};

/// What the user asked for this frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Load a model folder or `.gguf` file into a slot.
    Open {
        /// Target slot.
        slot: Slot,
        /// The path.
        path: PathBuf,
    },
    /// Load a recent spec (`PATH` or `BASE+ADAPTER`) into a slot.
    OpenSpec {
        /// Target slot.
        slot: Slot,
        /// The spec.
        spec: String,
    },
    /// Apply a PEFT adapter folder on top of the slot's base model.
    AddAdapter {
        /// Target slot.
        slot: Slot,
        /// Adapter folder.
        path: PathBuf,
    },
    /// Show a native file dialog.
    Dialog {
        /// Target slot.
        slot: Slot,
        /// What to pick.
        kind: DialogKind,
    },
    /// Empty a slot.
    Unload(Slot),
    /// Exchange slots A and B.
    Swap,
    /// Generate with every loaded model.
    Generate,
    /// Cancel the running job.
    Stop,
    /// Switch view.
    Show(View),
    /// Hide the last error.
    DismissError,
    /// Attribute the prompt with every loaded model.
    Attribute,
    /// Mark or unmark a prompt word (or token) of one attribution as an instruction word.
    ToggleInstruction {
        /// Index into the results (A, then B).
        result: usize,
        /// Row as shown (a word or a token, by the view's level).
        row: usize,
    },
    /// Ask where to export the attribution.
    ExportDialog,
    /// Export the attribution as shown: `<stem>.svg` picks the folder and the file stem.
    ExportTo(PathBuf),
    /// FFN concepts of every loaded model.
    RunConcepts,
    /// Head word pairs of every loaded model.
    RunHeads,
    /// Consistency measures of every loaded model.
    RunConsistency,
    /// Show a file dialog for a data file of the analysis views.
    PickFile(DialogKind),
    /// Use this data file (`None`: back to the default).
    SetFile(DialogKind, Option<PathBuf>),
    /// Render and count the fine-tuning data.
    PreviewTrainingData,
    /// Measure a few training steps.
    EstimateTraining,
    /// Merge the last run's adapter into its base and write a Hugging Face folder here.
    SaveMerged(PathBuf),
    /// Launch a training run of slot A's model, or resume the run in this folder.
    Train {
        /// A stopped run's folder.
        resume: Option<PathBuf>,
    },
}

/// The files an export wrote, or why it failed.
pub type ExportOutcome = Result<Vec<PathBuf>, String>;

/// The attributions of the last run, with display caches.
#[derive(Clone, Debug)]
pub struct AttributionResults {
    /// The prompt they explain.
    pub prompt: String,
    /// Token-level results, one per model, with the user's instruction marks.
    pub results: Vec<SlotAttribution>,
    words: Vec<Attribution>,
}

impl AttributionResults {
    /// Wraps finished results.
    pub fn new(prompt: String, results: Vec<SlotAttribution>) -> Self {
        let words = results
            .iter()
            .map(|r| by_words(&r.attribution, &AttributionConfig::default()))
            .collect();
        Self {
            prompt,
            results,
            words,
        }
    }

    /// Result `index` at word or token level.
    pub fn shown(&self, index: usize, word_level: bool) -> &Attribution {
        if word_level {
            &self.words[index]
        } else {
            &self.results[index].attribution
        }
    }

    /// Flips the instruction mark of shown row `row` (a whole word at word level) and updates
    /// the score.
    pub fn toggle(&mut self, index: usize, row: usize, word_level: bool) {
        let Some(result) = self.results.get_mut(index) else {
            return;
        };
        let a = &mut result.attribution;
        let tokens = if word_level {
            match self.words[index].input_words.get(row) {
                Some(word) => word.start..word.end,
                None => return,
            }
        } else {
            row..row + 1
        };
        let mut mask = a
            .instruction_mask
            .clone()
            .unwrap_or_else(|| vec![false; a.input_ids.len()]);
        let Some(current) = mask.get(tokens.clone()) else {
            return;
        };
        let marked = !current.iter().any(|&m| m);
        mask[tokens].iter_mut().for_each(|m| *m = marked);
        set_instruction_mask(a, Some(mask));
        self.words[index] = by_words(a, &AttributionConfig::default());
    }
}

/// How the app starts: models to preload and the compute device (from the command line).
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Loaded into slot A at start.
    pub model: Option<String>,
    /// Loaded into slot B at start.
    pub model_b: Option<String>,
    /// Where models are loaded (`None` keeps the saved choice).
    pub device: Option<DeviceChoice>,
}

/// What a slot shows.
#[derive(Clone, Debug, Default)]
pub struct SlotView {
    /// The loaded model, if any.
    pub info: Option<ModelInfo>,
    /// A load into this slot is queued or running.
    pub loading: bool,
}

/// One model's response in the Prompt view.
#[derive(Clone, Debug, Default)]
pub struct ResponseView {
    /// Text so far.
    pub text: String,
    /// Tokens so far.
    pub tokens: usize,
    /// Set when the generation ended.
    pub stop_reason: Option<StopReason>,
    /// Decode speed of the finished generation.
    pub tokens_per_sec: Option<f64>,
    /// Prompt tokens fed to the model.
    pub prompt_tokens: usize,
}

/// A submitted job, as the status area describes it.
#[derive(Clone, Debug)]
pub struct PendingJob {
    /// Shown in the status area ("Loading model.gguf into slot A").
    pub label: String,
    /// When it was submitted.
    pub submitted: Instant,
    /// Last reported progress, 0..=1.
    pub frac: Option<f32>,
    /// Last progress message.
    pub message: String,
    /// What kind of job it is.
    pub kind: PendingKind,
}

/// The kinds of job the app submits, as far as the UI cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingKind {
    /// Loading a model into a slot (its loading flag is cleared when the job ends).
    Load(Slot),
    /// Generating responses.
    Generate,
    /// Attributing.
    Attribute,
    /// FFN concepts.
    Concepts,
    /// Head pairs.
    Heads,
    /// Consistency measures.
    Consistency,
    /// Training, its estimate, or the data preview.
    Train,
    /// Unload, swap.
    Other,
}

/// The application.
pub struct TunelensApp {
    /// Persisted state.
    pub state: AppState,
    /// Slots A and B.
    pub slots: [SlotView; 2],
    /// Responses of A and B.
    pub responses: [ResponseView; 2],
    /// Jobs submitted and not yet ended, in submission order.
    pub pending: BTreeMap<JobId, PendingJob>,
    /// The last error, in plain words.
    pub last_error: Option<String>,
    /// Built-in sample prompts.
    pub samples: Vec<SampleSet>,
    /// The last attribution run.
    pub attribution: Option<AttributionResults>,
    /// The last FFN-concepts run.
    pub concepts: Option<Box<ConceptsOutput>>,
    /// The last head-pairs run.
    pub heads: Option<Box<HeadsOutput>>,
    /// The last consistency run.
    pub consistency: Option<Box<ConsistencyOutput>>,
    /// The current or last training run.
    pub training: TrainingView,
    /// What the last export wrote (or why it failed).
    pub export_note: Option<String>,
    exports: (
        crossbeam_channel::Sender<ExportOutcome>,
        crossbeam_channel::Receiver<ExportOutcome>,
    ),
    worker: WorkerHandle,
    dialogs: Dialogs,
    actions: Vec<Action>,
    ctx: egui::Context,
}

/// The job of `kind` among `pending`, if any (a free function so the UI can borrow the map
/// beside `&mut` state).
fn running_in(pending: &BTreeMap<JobId, PendingJob>, kind: PendingKind) -> Option<&PendingJob> {
    pending.values().find(|p| p.kind == kind)
}

/// Index of a slot in the per-slot arrays.
pub fn slot_index(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

impl TunelensApp {
    /// Creates the app, restoring persisted state, and queues the preloads.
    pub fn new(cc: &eframe::CreationContext<'_>, start: StartOptions) -> std::io::Result<Self> {
        theme::apply(&cc.egui_ctx);
        let mut state: AppState = cc
            .storage
            .and_then(|storage| eframe::get_value(storage, eframe::APP_KEY))
            .unwrap_or_default();
        if let Some(device) = start.device {
            state.device = device;
        }
        let ctx = cc.egui_ctx.clone();
        let worker = worker::spawn({
            let ctx = ctx.clone();
            move || ctx.request_repaint()
        })?;
        let mut app = Self {
            state,
            slots: Default::default(),
            responses: Default::default(),
            pending: BTreeMap::new(),
            last_error: None,
            samples: samples::builtin(),
            attribution: None,
            concepts: None,
            heads: None,
            consistency: None,
            training: TrainingView::default(),
            export_note: None,
            exports: crossbeam_channel::unbounded(),
            worker,
            dialogs: Dialogs::default(),
            actions: Vec::new(),
            ctx,
        };
        for (slot, spec) in [(Slot::A, start.model), (Slot::B, start.model_b)] {
            if let Some(spec) = spec {
                app.actions.push(Action::OpenSpec { slot, spec });
            }
        }
        app.apply_actions();
        Ok(app)
    }

    /// Loads a model from `path` into `slot`: the code path of the file dialog, drag and drop
    /// and the recent list.
    pub fn open_path(&mut self, slot: Slot, path: &Path) {
        self.actions.push(Action::Open {
            slot,
            path: path.to_path_buf(),
        });
        self.apply_actions();
    }

    /// Queues an action as a panel would (tests use this for dialogs they cannot click).
    pub fn push_action(&mut self, action: Action) {
        self.actions.push(action);
        self.apply_actions();
    }

    /// The pending job of `kind`, if any.
    pub fn running(&self, kind: PendingKind) -> Option<&PendingJob> {
        running_in(&self.pending, kind)
    }

    /// Whether a generation is running.
    pub fn is_generating(&self) -> bool {
        self.running(PendingKind::Generate).is_some()
    }

    fn submit(&mut self, job: Job, label: String, kind: PendingKind) {
        match self.worker.submit(job) {
            Ok(job_id) => {
                self.pending.insert(
                    job_id,
                    PendingJob {
                        label,
                        submitted: Instant::now(),
                        frac: None,
                        message: String::new(),
                        kind,
                    },
                );
                if let PendingKind::Load(slot) = kind {
                    self.slots[slot_index(slot)].loading = true;
                }
            }
            Err(worker::Busy) => {
                self.last_error = Some(
                    "Busy: too many jobs are queued; wait for the current one to finish".to_owned(),
                );
            }
        }
    }

    fn load(&mut self, slot: Slot, spec: ModelSpec) {
        let name = spec_name(&spec);
        let job = Job::LoadModel {
            slot,
            spec,
            device: self.state.device,
            dtype: crate::model::WeightDtype::F32,
        };
        self.submit(
            job,
            format!("Loading {name} into slot {slot:?}"),
            PendingKind::Load(slot),
        );
    }

    fn apply_actions(&mut self) {
        for action in std::mem::take(&mut self.actions) {
            match action {
                Action::Open { slot, path } => self.load(
                    slot,
                    ModelSpec {
                        base: path,
                        adapter: None,
                    },
                ),
                Action::OpenSpec { slot, spec } => self.load(slot, ModelSpec::parse(&spec)),
                Action::AddAdapter { slot, path } => {
                    let Some(info) = &self.slots[slot_index(slot)].info else {
                        self.last_error = Some(format!(
                            "Load a base model into slot {slot:?} before adding an adapter"
                        ));
                        continue;
                    };
                    let base = ModelSpec::parse(&info.source).base;
                    self.load(
                        slot,
                        ModelSpec {
                            base,
                            adapter: Some(path),
                        },
                    );
                }
                Action::Dialog { slot, kind } => {
                    let ctx = self.ctx.clone();
                    if let Err(err) = self.dialogs.open(slot, kind, move || ctx.request_repaint()) {
                        self.last_error = Some(format!("Cannot open a file dialog: {err}"));
                    }
                }
                Action::Unload(slot) => self.submit(
                    Job::Unload { slot },
                    format!("Unloading slot {slot:?}"),
                    PendingKind::Other,
                ),
                Action::Swap => {
                    self.submit(
                        Job::SwapSlots,
                        "Swapping slots A and B".to_owned(),
                        PendingKind::Other,
                    );
                }
                Action::Generate => self.generate(),
                Action::Stop => self.worker.cancel(),
                Action::Show(view) => self.state.view = view,
                Action::DismissError => self.last_error = None,
                Action::Attribute => self.attribute(),
                Action::ToggleInstruction { result, row } => {
                    let word_level = self.state.attribution.word_level;
                    if let Some(results) = &mut self.attribution {
                        results.toggle(result, row, word_level);
                    }
                }
                Action::ExportDialog => {
                    let ctx = self.ctx.clone();
                    let name = format!("{}.svg", self.export_stem());
                    if let Err(err) = self.dialogs.save(name, move || ctx.request_repaint()) {
                        self.last_error = Some(format!("Cannot open a file dialog: {err}"));
                    }
                }
                Action::ExportTo(path) => self.export_to(&path),
                Action::RunConcepts => self.run_weights(PendingKind::Concepts),
                Action::RunHeads => self.run_weights(PendingKind::Heads),
                Action::RunConsistency => self.run_consistency(),
                Action::PreviewTrainingData => self.preview_training_data(),
                Action::EstimateTraining => self.train(None, true),
                Action::Train { resume } => self.train(resume, false),
                Action::SaveMerged(out) => self.save_merged(out),
                Action::PickFile(kind) => {
                    let ctx = self.ctx.clone();
                    if let Err(err) = self
                        .dialogs
                        .open(Slot::A, kind, move || ctx.request_repaint())
                    {
                        self.last_error = Some(format!("Cannot open a file dialog: {err}"));
                    }
                }
                Action::SetFile(kind, path) => match kind {
                    DialogKind::WordList => self.state.weights.words_file = path,
                    DialogKind::WordVectors => self.state.weights.vectors_file = path,
                    DialogKind::PairsFile => self.state.consistency.pairs_file = path,
                    DialogKind::FactsFile => self.state.consistency.facts_file = path,
                    DialogKind::TrainData => self.state.finetune.data_file = path,
                    DialogKind::TrainOutput => self.state.finetune.out_dir = path,
                    DialogKind::MergedOutput
                    | DialogKind::ModelFolder
                    | DialogKind::GgufFile
                    | DialogKind::AdapterFolder
                    | DialogKind::ExportFile => {}
                },
            }
        }
    }

    /// The loaded slots, when there is one and a prompt to run; otherwise says why.
    fn runnable_slots(&mut self) -> Option<Vec<Slot>> {
        let slots: Vec<Slot> = [Slot::A, Slot::B]
            .into_iter()
            .filter(|&s| self.slots[slot_index(s)].info.is_some())
            .collect();
        if slots.is_empty() {
            self.last_error = Some("Load a model into slot A or B first".to_owned());
            return None;
        }
        if self.state.prompt.trim().is_empty() {
            self.last_error = Some("The prompt is empty".to_owned());
            return None;
        }
        Some(slots)
    }

    fn generate(&mut self) {
        let Some(slots) = self.runnable_slots() else {
            return;
        };
        if self.is_generating() {
            return;
        }
        for &slot in &slots {
            self.responses[slot_index(slot)] = ResponseView::default();
        }
        let job = Job::Generate {
            slots,
            prompt: self.state.prompt.clone(),
            chat: self.state.chat,
            cfg: self.state.gen.to_config(),
        };
        self.submit(job, "Generating".to_owned(), PendingKind::Generate);
    }

    fn attribute(&mut self) {
        let Some(slots) = self.runnable_slots() else {
            return;
        };
        let settings = &self.state.attribution;
        if settings.pin_response && settings.response.trim().is_empty() {
            self.last_error = Some("The pinned response is empty".to_owned());
            return;
        }
        if self.running(PendingKind::Attribute).is_some() {
            return;
        }
        let instructions = match settings.instructions {
            InstructionSource::Auto => Instructions::Auto,
            InstructionSource::Off => Instructions::Spans(Vec::new()),
            InstructionSource::Typed => Instructions::Spans(
                settings
                    .spans
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
        };
        let job = Job::Attribute {
            slots,
            prompt: self.state.prompt.clone(),
            response: settings
                .pin_response
                .then(|| settings.response.trim().to_owned()),
            chat: self.state.chat,
            instructions,
            max_new_tokens: settings.max_new_tokens,
        };
        self.submit(job, "Attributing".to_owned(), PendingKind::Attribute);
    }

    /// The loaded slots, or an error saying none is.
    fn loaded_slots(&mut self) -> Option<Vec<Slot>> {
        let slots: Vec<Slot> = [Slot::A, Slot::B]
            .into_iter()
            .filter(|&s| self.slots[slot_index(s)].info.is_some())
            .collect();
        if slots.is_empty() {
            self.last_error = Some("Load a model into slot A or B first".to_owned());
            return None;
        }
        Some(slots)
    }

    fn run_weights(&mut self, kind: PendingKind) {
        let Some(slots) = self.loaded_slots() else {
            return;
        };
        if self.running(kind).is_some() {
            return;
        }
        let w = &self.state.weights;
        let words = w
            .words_file
            .clone()
            .map_or(WordSource::Builtin, WordSource::File);
        let (job, label) = if kind == PendingKind::Concepts {
            (
                Job::Concepts {
                    slots,
                    words,
                    config: ConceptsConfig {
                        top_k: w.concepts_top_k,
                        max_rank: w.concepts_ranks,
                    },
                },
                "Computing FFN concepts",
            )
        } else {
            (
                Job::Heads {
                    slots,
                    words,
                    vectors: w.vectors_file.clone(),
                    config: HeadsConfig {
                        top_k: w.heads_top_k,
                        ..HeadsConfig::default()
                    },
                    group_size: w.group_size,
                },
                "Computing head word pairs",
            )
        };
        self.submit(job, label.to_owned(), kind);
    }

    fn run_consistency(&mut self) {
        let Some(slots) = self.loaded_slots() else {
            return;
        };
        if self.running(PendingKind::Consistency).is_some() {
            return;
        }
        let c = &self.state.consistency;
        let settings = ConsistencySettings {
            pairs: c.pairs_file.clone(),
            facts: c.facts_file.clone(),
            pooling: if c.last_token {
                Pooling::Last
            } else {
                Pooling::Mean
            },
            measures: Measures {
                spread: c.spread,
                ..Measures::ALL
            },
            ..ConsistencySettings::default()
        };
        self.submit(
            Job::Consistency { slots, settings },
            "Running consistency measures".to_owned(),
            PendingKind::Consistency,
        );
    }

    fn training_request(&self, resume: Option<PathBuf>) -> TrainRequest {
        let f = &self.state.finetune;
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
                        .unwrap_or_else(crate::worker::train::new_run_dir),
                )
            },
            resume,
        }
    }

    fn save_merged(&mut self, out: PathBuf) {
        let Some(result) = &self.training.result else {
            return;
        };
        let Some(adapter) = result.adapter_dir.clone() else {
            self.last_error = Some("The run has no final adapter yet".to_owned());
            return;
        };
        let spec = ModelSpec {
            base: ModelSpec::parse(&result.base_model).base,
            adapter: Some(adapter),
        };
        self.submit(
            Job::SaveMerged { spec, out },
            "Saving the merged model".to_owned(),
            PendingKind::Train,
        );
    }

    fn preview_training_data(&mut self) {
        if self.slots[0].info.is_none() || self.running(PendingKind::Train).is_some() {
            return;
        }
        let data = self.training_request(None).data;
        self.submit(
            Job::PreviewData {
                slot: Slot::A,
                data,
            },
            "Reading the training data".to_owned(),
            PendingKind::Train,
        );
    }

    /// Launches (or resumes) a training run, or only measures a few steps of it.
    fn train(&mut self, resume: Option<PathBuf>, estimate_only: bool) {
        if self.slots[0].info.is_none() {
            self.last_error = Some("Load the base model into slot A first".to_owned());
            return;
        }
        if self.running(PendingKind::Train).is_some() {
            return;
        }
        if let Err(err) = self.state.finetune.settings.validate() {
            self.last_error = Some(err.to_string());
            return;
        }
        let request = Box::new(self.training_request(resume));
        let (job, label) = if estimate_only {
            (
                Job::EstimateTraining {
                    slot: Slot::A,
                    request,
                },
                "Estimating the training run",
            )
        } else {
            if request.resume.is_none() {
                self.training = TrainingView {
                    preview: self.training.preview.take(),
                    estimate: self.training.estimate.take(),
                    ..TrainingView::default()
                };
            }
            (
                Job::Train {
                    slot: Slot::A,
                    request,
                },
                "Training",
            )
        };
        self.submit(job, label.to_owned(), PendingKind::Train);
    }

    /// The default export file stem: view, models and the first prompt words.
    fn export_stem(&self) -> String {
        let models = |names: Vec<&str>| names.join("_vs_");
        match self.state.view {
            View::Concepts => {
                if let Some(out) = &self.concepts {
                    let names = out.results.iter().map(|r| r.model.as_str()).collect();
                    return export::default_file_stem(
                        "concepts",
                        &models(names),
                        &format!("layer {}", self.state.weights.layer),
                    );
                }
            }
            View::Heads => {
                if let Some(out) = &self.heads {
                    let names = out.results.iter().map(|r| r.model.as_str()).collect();
                    return export::default_file_stem("heads", &models(names), "");
                }
            }
            View::Consistency => {
                if let Some(out) = &self.consistency {
                    let names = out.results.iter().map(|r| r.model.as_str()).collect();
                    return export::default_file_stem("consistency", &models(names), "");
                }
            }
            View::Finetune => {
                if let Some(out) = &self.training.result {
                    return export::default_file_stem("training", &out.base_model, "");
                }
            }
            View::Models | View::Prompt | View::Attribution => {}
        }
        let Some(results) = &self.attribution else {
            return "attribution".to_owned();
        };
        let models: Vec<&str> = results.results.iter().map(|r| r.model.as_str()).collect();
        export::default_file_stem("attribution", &models.join("_vs_"), &results.prompt)
    }

    /// Exports the attribution as shown (word or token level) next to `path`: its folder and
    /// file stem name the five files. Runs on a named thread; the note reports the outcome.
    pub fn export_to(&mut self, path: &Path) {
        if matches!(
            self.state.view,
            View::Concepts | View::Heads | View::Consistency | View::Finetune
        ) {
            self.export_view(path);
            return;
        }
        let Some(results) = &self.attribution else {
            self.last_error = Some("Nothing to export: run an attribution first".to_owned());
            return;
        };
        let word_level = self.state.attribution.word_level;
        let items: Vec<(String, Attribution)> = results
            .results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    format!("{:?}: {}", r.slot, r.model),
                    results.shown(i, word_level).clone(),
                )
            })
            .collect();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let stem = path
            .file_stem()
            .map_or_else(|| self.export_stem(), |s| s.to_string_lossy().into_owned());
        let tx = self.exports.0.clone();
        let ctx = self.ctx.clone();
        self.export_note = Some("Exporting…".to_owned());
        let spawned = std::thread::Builder::new()
            .name("export".to_owned())
            .spawn(move || {
                let refs: Vec<(String, &Attribution)> =
                    items.iter().map(|(l, a)| (l.clone(), a)).collect();
                let outcome =
                    export::write_attribution(&dir, &stem, &refs).map_err(|err| err.to_string());
                // The app may have closed; nothing to do then.
                let _ = tx.send(outcome);
                ctx.request_repaint();
            });
        if let Err(err) = spawned {
            self.export_note = None;
            self.last_error = Some(format!("Cannot start the export: {err}"));
        }
    }

    /// Exports the Concepts, Heads or Consistency view on a named thread.
    fn export_view(&mut self, path: &Path) {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let stem = path
            .file_stem()
            .map_or_else(|| self.export_stem(), |s| s.to_string_lossy().into_owned());
        let view = self.state.view;
        let (wl, cl) = (self.state.weights.layer, self.state.consistency.layer);
        let concepts = self.concepts.clone();
        let heads = self.heads.clone();
        let consistency = self.consistency.clone();
        let training = self.training.result.clone();
        let ready = match view {
            View::Concepts => concepts.is_some(),
            View::Heads => heads.is_some(),
            View::Consistency => consistency.is_some(),
            View::Finetune => training.is_some(),
            View::Models | View::Prompt | View::Attribution => false,
        };
        if !ready {
            self.last_error = Some("Nothing to export: run the analysis first".to_owned());
            return;
        }
        let tx = self.exports.0.clone();
        let ctx = self.ctx.clone();
        self.export_note = Some("Exporting…".to_owned());
        let spawned = std::thread::Builder::new()
            .name("export".to_owned())
            .spawn(move || {
                if let (View::Finetune, Some(t)) = (view, &training) {
                    let outcome = export::views::write_training(&dir, &stem, t)
                        .map_err(|err| err.to_string());
                    let _ = tx.send(outcome);
                    ctx.request_repaint();
                    return;
                }
                let outcome = match (view, concepts, heads, consistency) {
                    (View::Concepts, Some(c), _, _) => {
                        export::views::write_concepts(&dir, &stem, &c, wl)
                    }
                    (View::Heads, _, Some(h), _) => export::views::write_heads(&dir, &stem, &h, wl),
                    (_, _, _, Some(c)) => export::views::write_consistency(&dir, &stem, &c, cl),
                    _ => Ok(Vec::new()),
                }
                .map_err(|err| err.to_string());
                let _ = tx.send(outcome);
                ctx.request_repaint();
            });
        if let Err(err) = spawned {
            self.export_note = None;
            self.last_error = Some(format!("Cannot start the export: {err}"));
        }
    }

    fn ingest(&mut self, event: Event) {
        match event {
            Event::Progress {
                job_id,
                frac,
                message,
            } => {
                if let Some(p) = self.pending.get_mut(&job_id) {
                    p.frac = Some(frac);
                    p.message = message;
                }
            }
            Event::Token { slot, token, .. } => {
                let response = &mut self.responses[slot_index(slot)];
                response.text.push_str(&token.text_delta);
                response.tokens = token.index + 1;
            }
            Event::Train { update, .. } => self.training.update(update),
            Event::Finished { job_id, output } => {
                self.pending.remove(&job_id);
                self.finished(output);
            }
            Event::Cancelled { job_id } => {
                // The user asked for it: not an error.
                let label = self.end_pending(job_id);
                log::info!("{label}: cancelled");
            }
            Event::Failed { job_id, error } => {
                let label = self.end_pending(job_id);
                log::warn!("{label} failed: {error}");
                self.last_error = Some(if label.is_empty() {
                    error
                } else {
                    format!("{label} failed: {error}")
                });
            }
        }
    }

    /// Forgets an ended job; returns its label (empty when it was unknown).
    fn end_pending(&mut self, job_id: JobId) -> String {
        self.pending.remove(&job_id).map_or_else(String::new, |p| {
            if let PendingKind::Load(slot) = p.kind {
                self.slots[slot_index(slot)].loading = false;
            }
            p.label
        })
    }

    fn finished(&mut self, output: JobOutput) {
        match output {
            JobOutput::Loaded { slot, info } => {
                self.state.remember(&info.source);
                let view = &mut self.slots[slot_index(slot)];
                view.info = Some(*info);
                view.loading = false;
            }
            JobOutput::Unloaded { slot } => self.slots[slot_index(slot)] = SlotView::default(),
            JobOutput::Swapped { a, b } => {
                self.slots[0].info = a.map(|i| *i);
                self.slots[1].info = b.map(|i| *i);
                self.responses.swap(0, 1);
            }
            JobOutput::Generated(outputs) => {
                for out in outputs {
                    let response = &mut self.responses[slot_index(out.slot)];
                    response.text = out.new_text;
                    response.tokens = out.new_ids.len();
                    response.stop_reason = Some(out.stop_reason);
                    response.prompt_tokens = out.prompt_ids.len();
                    response.tokens_per_sec = (out.decode_secs > 0.0)
                        .then(|| out.new_ids.len().saturating_sub(1) as f64 / out.decode_secs);
                }
            }
            JobOutput::Attributed(results) => {
                self.attribution =
                    Some(AttributionResults::new(self.state.prompt.clone(), results));
                self.export_note = None;
            }
            // The CLI shows these.
            JobOutput::Tokens(_) | JobOutput::Forward(_) => {}
            JobOutput::Concepts(out) => {
                self.concepts = Some(out);
                self.export_note = None;
            }
            JobOutput::Heads(out) => {
                self.heads = Some(out);
                self.state.weights.head = None;
                self.export_note = None;
            }
            JobOutput::Consistency(out) => {
                self.consistency = Some(out);
                self.export_note = None;
            }
            JobOutput::Trained(out) => {
                self.training.finished(*out);
                self.export_note = None;
            }
            JobOutput::TrainEstimated(estimate) => self.training.estimate = Some(estimate),
            JobOutput::DataPreview(preview) => self.training.preview = Some(*preview),
            JobOutput::SavedMerged { out, merged } => {
                self.export_note = Some(format!(
                    "Merged {merged} adapted layers into {}",
                    out.display()
                ));
            }
        }
    }

    fn handle_input(&mut self, ctx: &egui::Context) {
        let (open, generate, stop, dropped) = ctx.input(|i| {
            (
                i.modifiers.command && i.key_pressed(egui::Key::O),
                i.modifiers.command && i.key_pressed(egui::Key::Enter),
                i.key_pressed(egui::Key::Escape),
                i.raw
                    .dropped_files
                    .iter()
                    .map(|f| f.path().to_path_buf())
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect::<Vec<_>>(),
            )
        });
        if open {
            let slot = self.first_free_slot();
            self.actions.push(Action::Dialog {
                slot,
                kind: DialogKind::GgufFile,
            });
        }
        if generate {
            self.actions.push(Action::Generate);
        }
        if stop {
            self.actions.push(Action::Stop);
        }
        for path in dropped {
            self.dropped(path);
        }
    }

    /// A dropped folder or file: an adapter goes onto slot B if loaded (else A); a model fills the
    /// first empty slot (B when both are full).
    fn dropped(&mut self, path: PathBuf) {
        if path.join("adapter_config.json").exists() {
            let slot = if self.slots[1].info.is_some() {
                Slot::B
            } else {
                Slot::A
            };
            self.actions.push(Action::AddAdapter { slot, path });
        } else {
            let slot = self.first_free_slot();
            self.actions.push(Action::Open { slot, path });
        }
    }

    fn first_free_slot(&self) -> Slot {
        if self.slots[0].info.is_none() && !self.slots[0].loading {
            Slot::A
        } else {
            Slot::B
        }
    }
}

/// A short name for a spec: the file or folder name (with the adapter's).
pub fn spec_name(spec: &ModelSpec) -> String {
    let name = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    match &spec.adapter {
        None => name(&spec.base),
        Some(adapter) => format!("{} + {}", name(&spec.base), name(adapter)),
    }
}

impl eframe::App for TunelensApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        let events: Vec<Event> = self.worker.events().collect();
        for event in events {
            self.ingest(event);
        }
        while let Ok((slot, kind, picked)) = self.dialogs.rx.try_recv() {
            if let Some(path) = picked {
                self.actions.push(match kind {
                    DialogKind::AdapterFolder => Action::AddAdapter { slot, path },
                    DialogKind::ModelFolder | DialogKind::GgufFile => Action::Open { slot, path },
                    DialogKind::ExportFile => Action::ExportTo(path),
                    DialogKind::MergedOutput => Action::SaveMerged(path),
                    DialogKind::WordList
                    | DialogKind::WordVectors
                    | DialogKind::PairsFile
                    | DialogKind::FactsFile
                    | DialogKind::TrainData
                    | DialogKind::TrainOutput => Action::SetFile(kind, Some(path)),
                });
            }
        }
        while let Ok(outcome) = self.exports.1.try_recv() {
            match outcome {
                Ok(paths) => {
                    let dir = paths
                        .first()
                        .and_then(|p| p.parent())
                        .map_or_else(String::new, |d| d.display().to_string());
                    self.export_note = Some(format!("Exported {} files to {dir}", paths.len()));
                }
                Err(err) => {
                    self.export_note = None;
                    self.last_error = Some(format!("Export failed: {err}"));
                }
            }
        }
        self.handle_input(ctx);
        self.apply_actions();
        if !self.pending.is_empty() {
            // Keep frames coming while work runs (elapsed time, progress); events also wake us.
            ctx.request_repaint_after(Duration::from_millis(100));
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let mut actions = Vec::new();
        egui::Panel::bottom("status").show(ui, |ui| {
            status::status_ui(ui, &self.pending, self.last_error.as_deref(), &mut actions);
        });
        egui::Panel::left("nav")
            .exact_size(theme::NAV_WIDTH)
            .show(ui, |ui| {
                ui.add_space(theme::SECTION_GAP);
                ui.heading("tunelens");
                ui.add_space(theme::SECTION_GAP);
                for view in View::ALL {
                    if ui
                        .selectable_label(self.state.view == view, view.label())
                        .clicked()
                    {
                        actions.push(Action::Show(view));
                    }
                }
            });
        let generating = self.is_generating();
        egui::CentralPanel::default_margins().show(ui, |ui| match self.state.view {
            View::Models => {
                panels::models::models_ui(ui, &self.slots, &self.state.recent, &mut actions);
            }
            View::Prompt => panels::prompt::prompt_ui(
                ui,
                &mut self.state,
                &self.samples,
                &self.slots,
                &self.responses,
                generating,
                &mut actions,
            ),
            View::Attribution => panels::attribution::attribution_ui(
                ui,
                &mut self.state,
                &self.slots,
                self.attribution.as_ref(),
                running_in(&self.pending, PendingKind::Attribute),
                self.export_note.as_deref(),
                &mut actions,
            ),
            View::Concepts => panels::weights::concepts_ui(
                ui,
                &mut self.state.weights,
                self.slots.iter().any(|s| s.info.is_some()),
                self.concepts.as_deref(),
                running_in(&self.pending, PendingKind::Concepts),
                self.export_note.as_deref(),
                &mut actions,
            ),
            View::Heads => panels::weights::heads_ui(
                ui,
                &mut self.state.weights,
                self.slots.iter().any(|s| s.info.is_some()),
                self.heads.as_deref(),
                running_in(&self.pending, PendingKind::Heads),
                self.export_note.as_deref(),
                &mut actions,
            ),
            View::Consistency => panels::consistency::consistency_ui(
                ui,
                &mut self.state.consistency,
                self.slots.iter().any(|s| s.info.is_some()),
                self.consistency.as_deref(),
                running_in(&self.pending, PendingKind::Consistency),
                self.export_note.as_deref(),
                &mut actions,
            ),
            View::Finetune => {
                let ctx = panels::finetune::FinetuneCtx {
                    base: self.slots[0].info.as_ref().map(ModelInfo::display_name),
                    running: running_in(&self.pending, PendingKind::Train),
                    view: &self.training,
                    note: self.export_note.as_deref(),
                };
                panels::finetune::finetune_ui(ui, &mut self.state.finetune, &ctx, &mut actions);
            }
        });
        self.actions.extend(actions);
        self.apply_actions();
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.state);
    }
}
