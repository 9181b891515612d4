//! What the panels ask for ([`Action`]) and the jobs the app is waiting on ([`PendingJob`]).
//! Panels push actions while drawing; the app applies them after the frame.

use std::path::PathBuf;
use std::time::Instant;

use crate::ui::dialogs::DialogKind;
use crate::ui::state::View;
use crate::worker::{Job, Slot};

/// What the user asked for this frame.
#[derive(Clone, Debug)]
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
    /// Show an error in the status area.
    Error(String),
    /// The main button of an analysis view (by id): its job on the loaded models.
    Run(&'static str),
    /// A further job a view built itself (a data preview, an estimate, a training run), owned
    /// by that view: its events and result go back to it.
    Submit {
        /// The view's id.
        owner: &'static str,
        /// The job.
        job: Box<Job>,
        /// The status line's label.
        label: String,
    },
    /// Ask where to export the current view.
    ExportDialog,
    /// Export the current view as shown: `<stem>.svg` picks the folder and the file stem.
    ExportTo(PathBuf),
    /// Show a file dialog for a data file of the analysis views.
    PickFile(DialogKind),
    /// Show a save dialog of this kind, proposing a file name.
    SaveDialog(DialogKind, String),
    /// Use this data file (`None`: back to the default).
    SetFile(DialogKind, Option<PathBuf>),
}

/// The files an export wrote, or why it failed.
pub type ExportOutcome = Result<Vec<PathBuf>, String>;

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
    /// While it waits for an earlier job: that job's label.
    pub queued_behind: Option<String>,
    /// When it reported its first progress (it has started then): the time-left estimate
    /// counts from here, not from the queue.
    pub started: Option<Instant>,
}

impl PendingJob {
    /// "about N s left" once the job has run long enough to tell.
    pub fn time_left(&self) -> Option<String> {
        let started = self.started?;
        crate::ui::widgets::time_left(started.elapsed().as_secs_f64(), self.frac?)
    }
}

/// The kinds of job the app submits, as far as the UI cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingKind {
    /// Loading a model into a slot (its loading flag is cleared when the job ends).
    Load(Slot),
    /// Generating responses.
    Generate,
    /// A job of the analysis view with this id.
    Analysis(&'static str),
    /// Unload, swap.
    Other,
}
