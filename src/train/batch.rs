//! Micro-batches of tokenised examples: right-padded ids and the positions that predict labels.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::train::dataset::Example;

/// A micro-batch: right-padded ids and the flat indices of the positions that predict labels.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(b, T)` u32 ids.
    pub ids: Tensor,
    /// Flat indices `b·T + t` of positions `t` whose next token is a label.
    pub positions: Tensor,
    /// The label at each of those positions.
    pub targets: Tensor,
    /// Number of label tokens.
    pub label_tokens: usize,
    /// Number of non-padding tokens.
    pub tokens: usize,
}

/// Builds a right-padded batch. Causal attention means padding after a sequence never affects
/// its positions, so no attention mask is needed.
pub fn make_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let max_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if max_len < 2 {
        return Err(Error::invalid("batch", "examples need at least two tokens"));
    }
    let mut ids = Vec::with_capacity(examples.len() * max_len);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut tokens = 0;
    for (row, example) in examples.iter().enumerate() {
        ids.extend_from_slice(&example.ids);
        ids.extend(std::iter::repeat_n(pad_id, max_len - example.ids.len()));
        tokens += example.ids.len();
        for t in 1..example.ids.len() {
            if example.is_label[t] {
                #[allow(clippy::cast_possible_truncation)]
                positions.push((row * max_len + t - 1) as u32);
                targets.push(example.ids[t]);
            }
        }
    }
    let label_tokens = targets.len();
    if label_tokens == 0 {
        return Err(Error::invalid("batch", "no label tokens"));
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), max_len), device)?,
        positions: Tensor::from_vec(positions, label_tokens, device)?,
        targets: Tensor::from_vec(targets, label_tokens, device)?,
        label_tokens,
        tokens,
    })
}
