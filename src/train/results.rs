//! The plain-data results of fine-tuning as the Fine-tune view shows them and the exporters write
//! them: the prepared data set, each step and validation, a finished or stopped run, a measured
//! estimate.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::train::checkpoint::TrainerState;
use crate::train::dataset::LineIssue;

/// Counts of a prepared data set, for display.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    /// The file.
    pub path: PathBuf,
    /// Training examples.
    pub train: usize,
    /// Validation examples.
    pub validation: usize,
    /// Skipped lines with reasons.
    pub issues: Vec<LineIssue>,
    /// Examples cut at the maximum length.
    pub truncated: usize,
    /// Label (response) tokens in the training split.
    pub train_label_tokens: usize,
    /// All tokens in the training split.
    pub train_tokens: usize,
}

/// One rendered example for the data preview.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviewRow {
    /// Line in the file.
    pub line: usize,
    /// The record's format.
    pub format: String,
    /// The prompt part of the rendered text.
    pub prompt: String,
    /// The response part (what the loss is computed on).
    pub response: String,
    /// Tokens in the example.
    pub tokens: usize,
    /// Response tokens.
    pub label_tokens: usize,
}

/// A data preview: the summary and the first rendered examples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataPreview {
    /// Counts.
    pub summary: DataSummary,
    /// The first examples.
    pub rows: Vec<PreviewRow>,
}

/// The result of a run (finished or stopped).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOutput {
    /// The base model (`--model` form).
    pub base_model: String,
    /// The data set used.
    pub data: DataSummary,
    /// Steps, curves and settings.
    pub state: TrainerState,
    /// The output folder.
    pub out: Option<PathBuf>,
    /// The final adapter (PEFT format), when the run finished with an output folder.
    pub adapter_dir: Option<PathBuf>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether the run was stopped before its last step.
    pub cancelled: bool,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// A measured estimate before launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainEstimate {
    /// Median seconds per optimizer step over the measured steps.
    pub seconds_per_step: f64,
    /// Steps measured (after one warm-up step).
    pub measured_steps: usize,
    /// Estimated wall time of the whole run.
    pub total_s: f64,
    /// Growth of the process's resident memory while training, MB.
    pub extra_memory_mb: f64,
    /// Trainable parameters.
    pub trainable_params: usize,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Optimizer steps completed (1 after the first).
    pub step: usize,
    /// The total loss.
    pub loss: f64,
    /// Each loss term, in order.
    pub terms: Vec<(String, f64)>,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (prompt and response, no padding) per second.
    pub tokens_per_s: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Other per-step values with their own curves (IV-guided runs: the raw `kl1`, `kl2`,
    /// mean head MSE before weights and thresholds, and the IV scale of the trainable pass).
    #[serde(default)]
    pub metrics: Vec<(String, f64)>,
}

/// A validation result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// After this many optimizer steps.
    pub step: usize,
    /// Mean cross-entropy per validation label token.
    pub loss: f64,
}
