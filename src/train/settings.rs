//! Training settings as the Fine-tune view and the CLI edit them: the LoRA adapter's shape and
//! placement, the learning-rate schedules, and every trainer setting with its validation
//! (defaults of METHODS.md §5.3). Plain data: the UI imports these without the trainer.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Modules a LoRA adapter can target.
pub const TARGETABLE: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Adapter shape and placement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha`; the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter input while training.
    pub dropout: f32,
    /// Target modules, e.g. `q_proj`, `v_proj`.
    pub targets: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: vec!["q_proj".to_owned(), "v_proj".to_owned()],
        }
    }
}

/// Learning-rate schedule after warm-up (Hugging Face `get_scheduler` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Schedule {
    /// Constant.
    #[default]
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// Name for the CLI and settings files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        }
    }

    /// Parses [`Schedule::name`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "constant" => Some(Self::Constant),
            "linear" => Some(Self::Linear),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }
}

/// Every training setting. Defaults follow METHODS.md §5.3 (r 8, alpha 16, dropout 0.1,
/// `q_proj,v_proj`, AdamW, lr 1e-4, constant schedule, batch 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Adapter settings.
    pub lora: LoraSettings,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Linear warm-up steps from 0.
    pub warmup_steps: usize,
    /// Optimizer steps in the run.
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Validation every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Seed of initialisation, order and dropout.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            lora: LoraSettings::default(),
            learning_rate: 1e-4,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            steps: 200,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            eval_every: 20,
            save_every: 50,
            seed: 42,
        }
    }
}

impl TrainSettings {
    /// Checks ranges; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("rank", self.lora.rank),
            ("steps", self.steps),
            ("batch size", self.batch_size),
            ("gradient accumulation", self.grad_accum),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid(name, "must be at least 1"));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid("learning rate", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(Error::invalid("LoRA dropout", "must be in [0, 1)"));
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return Err(Error::invalid("LoRA alpha", "must be a positive number"));
        }
        if self.lora.targets.is_empty() {
            return Err(Error::invalid("target modules", "name at least one module"));
        }
        for target in &self.lora.targets {
            if !TARGETABLE.contains(&target.as_str()) {
                return Err(Error::invalid(
                    "target modules",
                    format!(
                        "unknown module `{target}` (one of {})",
                        TARGETABLE.join(", ")
                    ),
                ));
            }
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(Error::invalid("max grad norm", "must be 0 or positive"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid("weight decay", "must be 0 or positive"));
        }
        Ok(())
    }

    /// The learning rate used by optimizer step `step` (0-based).
    #[allow(clippy::cast_precision_loss)]
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        let lr = self.learning_rate;
        if step < self.warmup_steps {
            return lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let done = (step - self.warmup_steps) as f64;
        match self.schedule {
            Schedule::Constant => lr,
            Schedule::Linear => lr * ((span - done) / span).max(0.0),
            Schedule::Cosine => {
                lr * (0.5 * (1.0 + (std::f64::consts::PI * done / span).cos())).max(0.0)
            }
        }
    }
}
