//! Native file dialogs (rfd), run on a named thread so the UI never blocks; the chosen path comes
//! back over a channel and goes through the same code as a typed or dropped path.

use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender};

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
}

/// A finished dialog: the slot it was for, what it picked, and the path (None if cancelled).
pub type DialogResult = (Slot, DialogKind, Option<PathBuf>);

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

    fn show(
        &self,
        slot: Slot,
        kind: DialogKind,
        default_name: String,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("file_dialog".to_owned())
            .spawn(move || {
                let dialog = rfd::FileDialog::new();
                let picked = match kind {
                    DialogKind::ModelFolder => dialog
                        .set_title("Open a Hugging Face model folder")
                        .pick_folder(),
                    DialogKind::AdapterFolder => dialog
                        .set_title("Open a PEFT LoRA adapter folder")
                        .pick_folder(),
                    DialogKind::GgufFile => dialog
                        .set_title("Open a GGUF model")
                        .add_filter("GGUF", &["gguf"])
                        .pick_file(),
                    DialogKind::WordList => dialog
                        .set_title("Open a word list (word<TAB>frequency)")
                        .pick_file(),
                    DialogKind::WordVectors => dialog
                        .set_title("Open word vectors (GloVe text format)")
                        .pick_file(),
                    DialogKind::PairsFile => dialog
                        .set_title("Open paraphrase pairs (sentence1, sentence2, label)")
                        .pick_file(),
                    DialogKind::FactsFile => dialog
                        .set_title("Open factual probes (JSON)")
                        .add_filter("JSON", &["json"])
                        .pick_file(),
                    DialogKind::TrainData => dialog
                        .set_title(
                            "Open instruction data (JSONL: Alpaca, chat or prompt/completion)",
                        )
                        .add_filter("JSON lines", &["jsonl", "json"])
                        .pick_file(),
                    DialogKind::TrainOutput => dialog
                        .set_title("Choose the training output folder")
                        .pick_folder(),
                    DialogKind::MergedOutput => dialog
                        .set_title("Choose an empty folder for the merged model")
                        .pick_folder(),
                    DialogKind::ExportFile => dialog
                        .set_title("Export the figure and data")
                        .set_file_name(default_name.as_str())
                        .add_filter("SVG figure (PNG, CSV and JSON beside it)", &["svg"])
                        .save_file(),
                };
                // The UI may have closed; nothing to do then.
                let _ = tx.send((slot, kind, picked));
                wake();
            })?;
        Ok(())
    }
}
