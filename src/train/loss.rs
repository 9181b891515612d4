//! The training loss as a sum of named terms, each reported on its own curve. Today the only
//! term is the causal-LM cross-entropy on response tokens; the instruction-vector terms of
//! METHODS.md §5.2 go here beside it.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::transformer::Transformer;
use crate::train::batch::Batch;

/// What a loss term sees: the batch and the trainable model's outputs on it.
pub struct LossContext<'a> {
    /// The model (adapters enabled).
    pub model: &'a Transformer,
    /// The micro-batch.
    pub batch: &'a Batch,
    /// Final-norm hidden states `(b, T, d)`, on the autograd graph.
    pub hidden: &'a Tensor,
    /// Logits at the label positions `(n, V)`, on the autograd graph.
    pub logits: &'a Tensor,
}

/// One named term of the training loss.
pub trait LossTerm: Send {
    /// Name on its curve (`ce`, `kl1`, ...).
    fn name(&self) -> &str;
    /// The term's value, a scalar on the autograd graph.
    fn compute(&mut self, ctx: &LossContext<'_>) -> Result<Tensor>;
}

/// Mean cross-entropy over the label tokens.
pub struct CrossEntropy;

impl LossTerm for CrossEntropy {
    fn name(&self) -> &'static str {
        "ce"
    }

    fn compute(&mut self, ctx: &LossContext<'_>) -> Result<Tensor> {
        cross_entropy(ctx.logits, &ctx.batch.targets)
    }
}

/// Mean of `−log softmax(logits)[target]` over rows, computed in f32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = if logits.dtype() == DType::F64 {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}
