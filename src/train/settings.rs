//! Training settings as the Fine-tune view and the CLI edit them: the LoRA adapter's shape and
//! placement, the learning-rate schedules, and every trainer setting with its validation
//! (defaults of METHODS.md §5.3). Plain data: the UI imports these without the trainer.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Modules a LoRA adapter can target.
pub use crate::model::adapter::LORA_MODULES as TARGETABLE;

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
    /// Instruction-vector guidance (METHODS.md §5.2/§5.4); `None` trains plain LoRA.
    #[serde(default)]
    pub guidance: Option<GuidanceSettings>,
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
            guidance: None,
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
        if let Some(guidance) = &self.guidance {
            guidance.validate()?;
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

/// Which description of IV-guided training a run follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum GuidanceMode {
    /// The released FvForgetting code (§5.2): IV in the reference pass only, `kl1`, `kl2`
    /// and head preservation, each above its threshold.
    #[default]
    Code,
    /// The paper's description, reconstructed (§5.4): the IV added to the trainable pass with
    /// a scale going 1 → 0, and the IV-based KL (`kl2`) with λ = 0.05.
    Paper,
}

impl GuidanceMode {
    /// Name in the UI.
    pub fn label(self) -> &'static str {
        match self {
            Self::Code => "IV-guided (code)",
            Self::Paper => "IV-guided (paper, reconstructed)",
        }
    }
}

/// How the IV's scale in the trainable pass goes from 1 to 0 over a run (§5.4).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Progressive {
    /// `s = 1 − step/steps`.
    Linear,
    /// `s = (1 + cos(π · step/steps)) / 2`.
    Cosine,
    /// `s = 1` before `fraction · steps`, then 0.
    Step(f64),
}

impl Progressive {
    /// The scale at optimizer step `step` (0-based) of `steps`.
    #[allow(clippy::cast_precision_loss)]
    pub fn scale(self, step: usize, steps: usize) -> f64 {
        let frac = (step as f64 / steps.max(1) as f64).clamp(0.0, 1.0);
        match self {
            Self::Linear => 1.0 - frac,
            Self::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
            Self::Step(at) => {
                if frac < at {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// `linear`, `cosine` or `step:F`.
    pub fn name(self) -> String {
        match self {
            Self::Linear => "linear".to_owned(),
            Self::Cosine => "cosine".to_owned(),
            Self::Step(at) => format!("step:{at}"),
        }
    }

    /// Parses [`Progressive::name`].
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "linear" => Some(Self::Linear),
            "cosine" => Some(Self::Cosine),
            other => {
                let at: f64 = other.strip_prefix("step:")?.trim().parse().ok()?;
                (0.0..=1.0).contains(&at).then_some(Self::Step(at))
            }
        }
    }
}

/// IV-guided training settings (METHODS.md §5.2, defaults of §5.3 and §5.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuidanceSettings {
    /// Code or paper version.
    pub mode: GuidanceMode,
    /// The saved instruction vector (`.safetensors` with its `.json`); its head list is the
    /// head-preservation list.
    pub iv_path: std::path::PathBuf,
    /// The layer whose `o_proj` output (HOOK B) gets the IV at `t_b`.
    pub layer: usize,
    /// α1, weight of `kl1` (the `t_b` rows).
    pub kl_alpha1: f64,
    /// α2, weight of `kl2` (all rows).
    pub kl_alpha2: f64,
    /// α_pr, weight of each head's preservation MSE.
    pub pr_alpha: f64,
    /// Temperature τ of both KL terms.
    pub tau: f64,
    /// A KL term counts only above this value.
    pub kl_threshold: f64,
    /// A head's MSE counts only above this value.
    pub mse_threshold: f64,
    /// The IV in the trainable pass with a decaying scale (paper version); `None` in the code
    /// version.
    pub progressive: Option<Progressive>,
}

impl GuidanceSettings {
    /// The code version's settings (seq0 of FvForgetting: α1 20, α2 0.1, α_pr 1, layer 9).
    pub fn code(iv_path: std::path::PathBuf) -> Self {
        Self {
            mode: GuidanceMode::Code,
            iv_path,
            layer: 9,
            kl_alpha1: 20.0,
            kl_alpha2: 0.1,
            pr_alpha: 1.0,
            tau: 2.0,
            kl_threshold: 0.1,
            mse_threshold: 0.01,
            progressive: None,
        }
    }

    /// The paper's description, reconstructed: the IV in the trainable pass with a linear
    /// 1 → 0 scale, and λ·KL with λ = 0.05 over all rows, no threshold, no `kl1`, no head
    /// term (the paper names neither).
    pub fn paper(iv_path: std::path::PathBuf) -> Self {
        Self {
            mode: GuidanceMode::Paper,
            kl_alpha1: 0.0,
            kl_alpha2: 0.05,
            pr_alpha: 0.0,
            kl_threshold: 0.0,
            progressive: Some(Progressive::Linear),
            ..Self::code(iv_path)
        }
    }

    /// Checks ranges; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if self.iv_path.as_os_str().is_empty() {
            return Err(Error::invalid(
                "instruction vector",
                "choose a saved vector (.safetensors) for IV-guided training",
            ));
        }
        let weights = [
            ("kl alpha1", self.kl_alpha1),
            ("kl alpha2", self.kl_alpha2),
            ("pr alpha", self.pr_alpha),
            ("kl threshold", self.kl_threshold),
            ("mse threshold", self.mse_threshold),
        ];
        for (name, value) in weights {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::invalid(name, "must be 0 or positive"));
            }
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(Error::invalid("tau", "must be a positive number"));
        }
        if let Some(Progressive::Step(at)) = self.progressive {
            if !(0.0..=1.0).contains(&at) {
                return Err(Error::invalid("progressive step", "must be in [0, 1]"));
            }
        }
        Ok(())
    }
}
