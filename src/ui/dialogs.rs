//! Native file dialogs (rfd), run on a named thread so the UI never blocks; the chosen path comes
//! back over a channel and goes through the same code as a typed or dropped path. When the
//! system dialog cannot open, the app says so and shows its own
//! ([`crate::ui::widgets::file_browser`]).

use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender};

use crate::ui::widgets::file_browser::BrowseMode;
use crate::worker::Slot;

/// What a dialog picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogKind {
    /// A Hugging Face model folder.
    ModelFolder,
    /// A `.gguf` file.
    GgufFile,
    /// A PEFT adapter folder.
    AdapterFolder,
    /// Where to export a figure and its data.
    ExportFile,
    /// A `word<TAB>freq` word list.
    WordList,
    /// A GloVe-format word-vector table.
    WordVectors,
    /// Paraphrase pairs (TSV or JSONL).
    PairsFile,
    /// Factual probes (JSON).
    FactsFile,
    /// Instruction data for fine-tuning (JSONL).
    TrainData,
    /// The output folder of a training run.
    TrainOutput,
    /// Where to write a merged model.
    MergedOutput,
    /// An in-context task (JSON list of input/output pairs).
    TaskFile,
    /// A saved instruction vector to steer with.
    IvFile,
    /// Where to save an instruction vector.
    IvSave,
    /// The instruction vector that guides fine-tuning.
    GuidanceIv,
    /// A forgetting evaluation set (JSON).
    EvalSet,
    /// A continual-training stage plan to open (JSON).
    StagePlanOpen,
    /// Multiple-choice questions (MMLU CSV or JSONL) for knowledge consistency.
    QuestionFile,
    /// Where to save the stage plan (JSON).
    StagePlanSave,
    /// Responses for the token shift: a prompt file, or AlignTDS / URIAL JSON.
    ShiftData,
    /// The base model's template for the token shift (text with `{input}`).
    ShiftTemplate,
}

/// How a dialog ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialogOutcome {
    /// The system dialog closed: the path, or `None` when cancelled.
    Picked(Option<PathBuf>),
    /// The system dialog could not open (it "closed" faster than a person can cancel, as rfd
    /// does without an xdg desktop portal), or the built-in dialog was asked for: the app
    /// shows its own. Carries the proposed file name of a save dialog.
    Unavailable(String),
}

/// A finished dialog: the slot it was for, what it picked, and how it ended.
pub type DialogResult = (Slot, DialogKind, DialogOutcome);

/// A system dialog that returns nothing within this time did not open.
const FALLBACK_WITHIN: std::time::Duration = std::time::Duration::from_millis(400);

/// Whether `TUNELENS_FILE_DIALOG=builtin` asks for the app's own dialog.
fn builtin_requested() -> bool {
    std::env::var("TUNELENS_FILE_DIALOG").is_ok_and(|v| v.eq_ignore_ascii_case("builtin"))
}

impl DialogKind {
    /// The dialog's title.
    pub fn title(self) -> &'static str {
        match self {
            Self::ModelFolder => "Open a Hugging Face model folder",
            Self::AdapterFolder => "Open a PEFT LoRA adapter folder",
            Self::GgufFile => "Open a GGUF model",
            Self::WordList => "Open a word list (word<TAB>frequency)",
            Self::WordVectors => "Open word vectors (GloVe text format)",
            Self::PairsFile => "Open paraphrase pairs (sentence1, sentence2, label)",
            Self::FactsFile => "Open factual probes (JSON)",
            Self::TrainData => "Open instruction data (JSONL: Alpaca, chat or prompt/completion)",
            Self::TrainOutput => "Choose the training output folder",
            Self::MergedOutput => "Choose an empty folder for the merged model",
            Self::ExportFile => "Export the figure and data",
            Self::TaskFile => "Open an in-context task (JSON list of {\"input\", \"output\"})",
            Self::IvFile => "Open a saved instruction vector (.safetensors)",
            Self::IvSave => "Save the instruction vector (.safetensors, with a .json beside it)",
            Self::GuidanceIv => "Open the instruction vector that guides training (.safetensors)",
            Self::EvalSet => "Open an evaluation set (JSON list of {\"input\", \"output\"})",
            Self::StagePlanOpen => "Open a stage plan (JSON)",
            Self::QuestionFile => "Open multiple-choice questions (MMLU CSV or JSONL)",
            Self::StagePlanSave => "Save the stage plan (JSON)",
            Self::ShiftData => "Open prompts (text, JSONL) or AlignTDS responses (JSON)",
            Self::ShiftTemplate => "Open a base-model template (text with {input})",
        }
    }

    /// What the built-in dialog picks for this kind.
    pub fn browse_mode(self, default_name: &str) -> BrowseMode {
        match self {
            Self::ModelFolder | Self::AdapterFolder | Self::TrainOutput | Self::MergedOutput => {
                BrowseMode::OpenFolder
            }
            Self::GgufFile => BrowseMode::OpenFile(vec!["gguf"]),
            Self::FactsFile | Self::TaskFile | Self::EvalSet | Self::StagePlanOpen => {
                BrowseMode::OpenFile(vec!["json"])
            }
            Self::IvFile | Self::GuidanceIv => BrowseMode::OpenFile(vec!["safetensors"]),
            Self::TrainData => BrowseMode::OpenFile(vec!["jsonl", "json"]),
            Self::QuestionFile => BrowseMode::OpenFile(vec!["csv", "jsonl", "json"]),
            Self::ShiftData => BrowseMode::OpenFile(vec!["json", "jsonl", "txt"]),
            Self::WordList | Self::WordVectors | Self::PairsFile | Self::ShiftTemplate => {
                BrowseMode::OpenFile(vec![])
            }
            Self::ExportFile | Self::IvSave | Self::StagePlanSave => {
                BrowseMode::Save(default_name.to_owned())
            }
        }
    }
}

/// Opens dialogs off the UI thread.
pub struct Dialogs {
    tx: Sender<DialogResult>,
    /// Finished dialogs.
    pub rx: Receiver<DialogResult>,
}

impl Default for Dialogs {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self { tx, rx }
    }
}

impl Dialogs {
    /// Shows a dialog; `wake` is called when it closes (to repaint the UI).
    pub fn open(
        &self,
        slot: Slot,
        kind: DialogKind,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        self.show(slot, kind, String::new(), wake)
    }

    /// Shows a save dialog for an export, proposing `default_name`.
    pub fn save(
        &self,
        default_name: String,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        self.show(Slot::A, DialogKind::ExportFile, default_name, wake)
    }

    /// Shows a save dialog of `kind`, proposing `default_name`.
    pub fn save_as(
        &self,
        kind: DialogKind,
        default_name: String,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        self.show(Slot::A, kind, default_name, wake)
    }

    fn show(
        &self,
        slot: Slot,
        kind: DialogKind,
        default_name: String,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        let tx = self.tx.clone();
        if builtin_requested() {
            let _ = tx.send((slot, kind, DialogOutcome::Unavailable(default_name)));
            wake();
            return Ok(());
        }
        std::thread::Builder::new()
            .name("file_dialog".to_owned())
            .spawn(move || {
                let started = std::time::Instant::now();
                let dialog = rfd::FileDialog::new().set_title(kind.title());
                let picked = match kind {
                    DialogKind::ModelFolder
                    | DialogKind::AdapterFolder
                    | DialogKind::TrainOutput
                    | DialogKind::MergedOutput => dialog.pick_folder(),
                    DialogKind::GgufFile => dialog.add_filter("GGUF", &["gguf"]).pick_file(),
                    DialogKind::WordList
                    | DialogKind::WordVectors
                    | DialogKind::PairsFile
                    | DialogKind::ShiftTemplate => dialog.pick_file(),
                    DialogKind::FactsFile
                    | DialogKind::TaskFile
                    | DialogKind::EvalSet
                    | DialogKind::StagePlanOpen => dialog.add_filter("JSON", &["json"]).pick_file(),
                    DialogKind::StagePlanSave => dialog
                        .set_file_name(default_name.as_str())
                        .add_filter("JSON", &["json"])
                        .save_file(),
                    DialogKind::IvFile | DialogKind::GuidanceIv => dialog
                        .add_filter("Instruction vector", &["safetensors"])
                        .pick_file(),
                    DialogKind::IvSave => dialog
                        .set_file_name(default_name.as_str())
                        .add_filter("Instruction vector", &["safetensors"])
                        .save_file(),
                    DialogKind::TrainData => dialog
                        .add_filter("JSON lines", &["jsonl", "json"])
                        .pick_file(),
                    DialogKind::ShiftData => dialog
                        .add_filter("Prompts or responses", &["json", "jsonl", "txt"])
                        .pick_file(),
                    DialogKind::QuestionFile => dialog
                        .add_filter("Questions", &["csv", "jsonl", "json"])
                        .pick_file(),
                    DialogKind::ExportFile => dialog
                        .set_file_name(default_name.as_str())
                        .add_filter("SVG figure (PNG, CSV and JSON beside it)", &["svg"])
                        .save_file(),
                };
                let outcome = if picked.is_none() && started.elapsed() < FALLBACK_WITHIN {
                    log::warn!("the system file dialog did not open; using the built-in one");
                    DialogOutcome::Unavailable(default_name)
                } else {
                    DialogOutcome::Picked(picked)
                };
                // The UI may have closed; nothing to do then.
                let _ = tx.send((slot, kind, outcome));
                wake();
            })?;
        Ok(())
    }
}
