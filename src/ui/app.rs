//! The eframe application: owns the persisted [`AppState`], the worker handle, the analysis
//! views of the registry and what the worker reported. `logic` ingests events and input; `ui`
//! only draws; panels push [`Action`]s that become jobs after the frame. Never touches a tensor.
//! There is no per-analysis code here: navigation, jobs, results and export loop over
//! [`registry::builtin`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;

use crate::model::generate::StopReason;
use crate::model::{DeviceChoice, ModelInfo, ModelSpec};
use crate::samples::{self, SampleSet};
use crate::ui::actions::{Action, ExportOutcome, PendingJob, PendingKind};
use crate::ui::dialogs::{DialogKind, DialogOutcome, Dialogs};
use crate::ui::panels;
use crate::ui::registry::{self, AnalysisView, RunCx, ViewCx};
use crate::ui::state::{AppState, View};
use crate::ui::theme;
use crate::ui::widgets::file_browser::{Closed, FileBrowser};
use crate::ui::widgets::status;
use crate::worker::{self, Event, Job, JobId, JobOutput, Slot, WorkerHandle};

/// How the app starts: models to preload and the compute device (from the command line).
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Loaded into slot A at start.
    pub model: Option<String>,
    /// Loaded into slot B at start.
    pub model_b: Option<String>,
    /// Where models are loaded (`None` keeps the saved choice).
    pub device: Option<DeviceChoice>,
    /// How weights are held (`None` keeps the saved choice).
    pub weights: Option<crate::model::WeightStorage>,
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
    /// How the generation was steered, if it was.
    pub steering: Option<String>,
    /// The text of each token, in order (for the live token shift colours).
    pub pieces: Vec<String>,
    /// The live shift class of each token, when A scores B's tokens.
    pub shifts: Vec<Option<crate::analysis::shift::Category>>,
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
    /// The analysis views, in navigation order ([`registry::builtin`]).
    pub analyses: Vec<Box<dyn AnalysisView>>,
    /// What the last export wrote (or why it failed).
    pub export_note: Option<String>,
    exports: (
        crossbeam_channel::Sender<ExportOutcome>,
        crossbeam_channel::Receiver<ExportOutcome>,
    ),
    /// The built-in file dialog, while open: for which slot and kind.
    pub browser: Option<(Slot, DialogKind, FileBrowser)>,
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

/// The folder and file stem an export path names (`<dir>/<stem>.svg`).
fn export_target(path: &Path) -> (PathBuf, Option<String>) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    (dir, stem)
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
        if let Some(weights) = start.weights {
            state.weight_storage = weights;
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
            analyses: registry::builtin(),
            export_note: None,
            exports: crossbeam_channel::unbounded(),
            browser: None,
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

    /// The analysis view of type `T` (for tests and typed access).
    pub fn view<T: AnalysisView>(&self) -> Option<&T> {
        self.analyses
            .iter()
            .find_map(|a| a.as_any().downcast_ref::<T>())
    }

    /// The index of the analysis view with this id.
    fn analysis_index(&self, id: &str) -> Option<usize> {
        self.analyses.iter().position(|a| a.id() == id)
    }

    /// The analysis view shown now, if the current view is one.
    fn current_analysis(&self) -> Option<usize> {
        match &self.state.view {
            View::Analysis(id) => self.analysis_index(id),
            View::Models | View::Prompt => None,
        }
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
                        queued_behind: None,
                        started: None,
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
            weights: self.state.weight_storage,
        };
        self.submit(
            job,
            format!("Loading {name} into slot {slot:?}"),
            PendingKind::Load(slot),
        );
    }

    /// The main job of analysis `id`, unless one of its jobs is already running.
    fn run_analysis(&mut self, id: &str) {
        let Some(index) = self.analysis_index(id) else {
            log::warn!("no analysis view `{id}`");
            return;
        };
        let owner = self.analyses[index].id();
        if self.running(PendingKind::Analysis(owner)).is_some() {
            return;
        }
        let cx = RunCx {
            state: &self.state,
            slots: &self.slots,
        };
        match self.analyses[index].job(&cx) {
            Ok((job, label)) => self.submit(job, label, PendingKind::Analysis(owner)),
            Err(err) => self.last_error = Some(err),
        }
    }

    /// Shows the built-in file dialog, starting in the working folder.
    pub fn open_browser(&mut self, slot: Slot, kind: DialogKind, default_name: &str) {
        let start = std::env::current_dir().unwrap_or_default();
        let browser = FileBrowser::new(kind.title(), kind.browse_mode(default_name), &start);
        self.browser = Some((slot, kind, browser));
    }

    fn open_dialog(&mut self, slot: Slot, kind: DialogKind) {
        let ctx = self.ctx.clone();
        if let Err(err) = self.dialogs.open(slot, kind, move || ctx.request_repaint()) {
            self.last_error = Some(format!("Cannot open a file dialog: {err}"));
        }
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
                Action::Dialog { slot, kind } => self.open_dialog(slot, kind),
                Action::PickFile(kind) => self.open_dialog(Slot::A, kind),
                Action::SaveDialog(kind, name) => {
                    let ctx = self.ctx.clone();
                    if let Err(err) = self
                        .dialogs
                        .save_as(kind, name, move || ctx.request_repaint())
                    {
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
                Action::Error(err) => self.last_error = Some(err),
                Action::Run(id) => self.run_analysis(id),
                Action::Submit { owner, job, label } => {
                    if self.running(PendingKind::Analysis(owner)).is_none() {
                        self.submit(*job, label, PendingKind::Analysis(owner));
                    }
                }
                Action::ExportDialog => self.export_dialog(),
                Action::ExportTo(path) => self.export_to(&path),
                Action::SetFile(kind, path) => self.state.set_file(kind, path),
            }
        }
    }

    fn generate(&mut self) {
        let cx = RunCx {
            state: &self.state,
            slots: &self.slots,
        };
        let slots = match cx.loaded_with_prompt() {
            Ok(slots) => slots,
            Err(err) => {
                self.last_error = Some(err);
                return;
            }
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
            steer: self.state.steer.request(),
            live_shift: (self.state.shift.live && self.slots.iter().all(|s| s.info.is_some()))
                .then_some(self.state.shift.k.clamp(1, crate::analysis::shift::K_SAVE)),
        };
        self.submit(job, "Generating".to_owned(), PendingKind::Generate);
    }

    /// Asks where to export the current view, proposing its default file name.
    fn export_dialog(&mut self) {
        let stem = self
            .current_analysis()
            .and_then(|i| self.analyses[i].export_stem(&self.state));
        let Some(stem) = stem else {
            self.last_error = Some("Nothing to export: run the analysis first".to_owned());
            return;
        };
        let ctx = self.ctx.clone();
        if let Err(err) = self
            .dialogs
            .save(format!("{stem}.svg"), move || ctx.request_repaint())
        {
            self.last_error = Some(format!("Cannot open a file dialog: {err}"));
        }
    }

    /// Exports the current view as shown next to `path`: its folder and file stem name the
    /// files (the same writer the CLI's `--out` calls). Runs on a named thread; the note reports
    /// the outcome.
    pub fn export_to(&mut self, path: &Path) {
        let Some(index) = self.current_analysis() else {
            self.last_error = Some("Nothing to export in this view".to_owned());
            return;
        };
        let analysis = &self.analyses[index];
        let (Some(writer), Some(default_stem)) = (
            analysis.exporter(&self.state),
            analysis.export_stem(&self.state),
        ) else {
            self.last_error = Some("Nothing to export: run the analysis first".to_owned());
            return;
        };
        let (dir, stem) = export_target(path);
        let stem = stem.unwrap_or(default_stem);
        let tx = self.exports.0.clone();
        let ctx = self.ctx.clone();
        self.export_note = Some("Exporting…".to_owned());
        let spawned = std::thread::Builder::new()
            .name("export".to_owned())
            .spawn(move || {
                let outcome = writer(&dir, &stem).map_err(|err| format!("{err:#}"));
                // The app may have closed; nothing to do then.
                let _ = tx.send(outcome);
                ctx.request_repaint();
            });
        if let Err(err) = spawned {
            self.export_note = None;
            self.last_error = Some(format!("Cannot start the export: {err}"));
        }
    }

    /// The analysis view that owns a pending job of `kind`.
    fn owner(&mut self, kind: Option<PendingKind>) -> Option<&mut Box<dyn AnalysisView>> {
        let Some(PendingKind::Analysis(id)) = kind else {
            return None;
        };
        self.analyses.iter_mut().find(|a| a.id() == id)
    }

    fn ingest(&mut self, event: Event) {
        let kind = self.pending.get(&event.job_id()).map(|p| p.kind);
        match event {
            Event::Progress {
                job_id,
                frac,
                message,
            } => {
                if let Some(p) = self.pending.get_mut(&job_id) {
                    p.frac = Some(frac);
                    p.message = message;
                    p.started.get_or_insert_with(Instant::now);
                }
            }
            Event::Token { slot, token, .. } => {
                let response = &mut self.responses[slot_index(slot)];
                response.text.push_str(&token.text_delta);
                response.tokens = token.index + 1;
                response.pieces.push(token.text_delta);
            }
            Event::TokenShift {
                index, category, ..
            } => {
                let shifts = &mut self.responses[slot_index(Slot::B)].shifts;
                if shifts.len() <= index {
                    shifts.resize(index + 1, None);
                }
                shifts[index] = Some(category);
            }
            Event::Train { .. } | Event::Layer { .. } | Event::Partial { .. } => {
                if let Some(view) = self.owner(kind) {
                    view.on_event(&event);
                }
            }
            Event::Finished { job_id, output } => {
                self.pending.remove(&job_id);
                // A success clears the last error: it no longer describes the app's state.
                self.last_error = None;
                self.finished(kind, output);
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

    /// A finished job's output: an analysis job's goes to its view, the rest is the app's.
    fn finished(&mut self, kind: Option<PendingKind>, output: JobOutput) {
        if let Some(PendingKind::Analysis(id)) = kind {
            let Some(index) = self.analysis_index(id) else {
                return;
            };
            match self.analyses[index].take(output, &mut self.state) {
                Ok(()) => self.export_note = None,
                // A view's own side jobs (saving a merged model) end with app-level outputs.
                Err(other) => self.finished(None, other),
            }
            return;
        }
        match output {
            JobOutput::Loaded { slot, info } => {
                self.state.remember(&info.source);
                // A base model without a chat template (e.g. Gemma-3 270M pt) cannot render
                // one: start its analyses on the raw prompt instead of failing on the first run.
                if !info.has_chat_template {
                    self.state.chat = false;
                }
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
                    response.steering = out.steering;
                }
            }
            JobOutput::SavedMerged { out, merged } => {
                self.export_note = Some(format!(
                    "Merged {merged} adapted layers into {}",
                    out.display()
                ));
            }
            JobOutput::SavedIv(paths) => {
                self.export_note = paths
                    .first()
                    .map(|p| format!("Saved the vector to {} (and its .json)", p.display()));
            }
            // The CLI shows these.
            JobOutput::Tokens(_) | JobOutput::Forward(_) => {}
            // Analysis outputs reach their view above; one without a pending owner (a job
            // the app no longer tracks) is dropped.
            JobOutput::Attributed(_)
            | JobOutput::Concepts(_)
            | JobOutput::Heads(_)
            | JobOutput::Consistency(_)
            | JobOutput::InstructionVectors(_)
            | JobOutput::Knowledge(_)
            | JobOutput::Shift(_)
            | JobOutput::Lens(_)
            | JobOutput::Trained(_)
            | JobOutput::TrainEstimated(_)
            | JobOutput::Forgetting(_)
            | JobOutput::StagesTrained(_)
            | JobOutput::DataPreview(_) => log::warn!("an analysis result without its view"),
        }
    }

    /// A path picked in a dialog (tests call it in place of a system dialog).
    pub fn picked(&mut self, slot: Slot, kind: DialogKind, path: PathBuf) {
        let action = match kind {
            DialogKind::AdapterFolder => Action::AddAdapter { slot, path },
            DialogKind::ModelFolder | DialogKind::GgufFile => Action::Open { slot, path },
            DialogKind::ExportFile => Action::ExportTo(path),
            DialogKind::WordList
            | DialogKind::WordVectors
            | DialogKind::PairsFile
            | DialogKind::FactsFile
            | DialogKind::TrainData
            | DialogKind::TrainOutput
            | DialogKind::TaskFile
            | DialogKind::GuidanceIv
            | DialogKind::EvalSet
            | DialogKind::StagePlanOpen
            | DialogKind::StagePlanSave
            | DialogKind::QuestionFile
            | DialogKind::ShiftData
            | DialogKind::ShiftTemplate
            | DialogKind::IvFile => Action::SetFile(kind, Some(path)),
            // Kinds only an analysis view asks for: the current view's answer.
            DialogKind::MergedOutput | DialogKind::IvSave => {
                let Some(index) = self.current_analysis() else {
                    return;
                };
                let owner = self.analyses[index].id();
                if let Some((job, label)) = self.analyses[index].picked(kind, path) {
                    self.actions.push(Action::Submit {
                        owner,
                        job: Box::new(job),
                        label,
                    });
                }
                return;
            }
        };
        self.actions.push(action);
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
        while let Ok((slot, kind, outcome)) = self.dialogs.rx.try_recv() {
            match outcome {
                DialogOutcome::Picked(Some(path)) => self.picked(slot, kind, path),
                DialogOutcome::Picked(None) => {}
                DialogOutcome::Unavailable(default_name) => {
                    if std::env::var_os("TUNELENS_FILE_DIALOG").is_none() {
                        self.last_error = Some(
                            "The system file dialog did not open (no xdg desktop portal?): \
                             using the built-in one"
                                .to_owned(),
                        );
                    }
                    self.open_browser(slot, kind, &default_name);
                }
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
        // The worker runs jobs in order: every job but the first waits behind it.
        let first = self.pending.values().next().map(|p| p.label.clone());
        for (i, job) in self.pending.values_mut().enumerate() {
            job.queued_behind = if i == 0 { None } else { first.clone() };
        }
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
                let fixed = [(View::Models, "Models"), (View::Prompt, "Prompt")];
                let analyses = self
                    .analyses
                    .iter()
                    .map(|a| (View::analysis(a.id()), a.label()));
                for (view, label) in fixed.into_iter().chain(analyses) {
                    if ui
                        .selectable_label(self.state.view == view, label)
                        .clicked()
                    {
                        actions.push(Action::Show(view));
                    }
                }
            });
        let generating = self.is_generating();
        let current = self.current_analysis();
        egui::CentralPanel::default_margins().show(ui, |ui| match (&self.state.view, current) {
            (View::Prompt, _) => panels::prompt::prompt_ui(
                ui,
                &mut self.state,
                &self.samples,
                &self.slots,
                &self.responses,
                generating,
                &mut actions,
            ),
            (View::Analysis(_), Some(index)) => {
                let analysis = &mut self.analyses[index];
                let mut cx = ViewCx {
                    state: &mut self.state,
                    slots: &self.slots,
                    running: running_in(&self.pending, PendingKind::Analysis(analysis.id())),
                    note: self.export_note.as_deref(),
                    actions: &mut actions,
                };
                analysis.ui(ui, &mut cx);
            }
            // Models, and a saved view id this build does not have.
            (View::Models | View::Analysis(_), _) => {
                panels::models::models_ui(
                    ui,
                    &self.slots,
                    &self.state.recent,
                    &mut self.state.weight_storage,
                    &mut actions,
                );
            }
        });
        if let Some((slot, kind, browser)) = &mut self.browser {
            let (slot, kind) = (*slot, *kind);
            if let Some(closed) = browser.ui(ui.ctx()) {
                self.browser = None;
                if let Closed::Picked(path) = closed {
                    self.picked(slot, kind, path);
                }
            }
        }
        self.actions.extend(actions);
        self.apply_actions();
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.state);
    }
}
