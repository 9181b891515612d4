//! The logit lens: the residual stream after every layer read out through the final norm and
//! the unembedding (METHODS.md §9's read-out, `U · norm(h^(l+1))`), at one position. Run for a
//! base and a tuned model on the tuned model's token, it shows where in depth each model comes
//! to that choice. At the last layer the read-out is the model's own logits.

use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::results::Slot;
use crate::error::{Error, Result};
use crate::model::{ForwardOptions, HookPoint, Input, LogitsAt, Recorder, Tokenizer, Transformer};

/// The read-out of one layer's output at the lens position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LensPoint {
    /// The layer whose output `h^(layer+1)` is read.
    pub layer: usize,
    /// Rank of the target token (1 = the top token).
    pub rank: usize,
    /// Probability of the target token (softmax over the vocabulary).
    pub prob: f32,
    /// The top token of this layer's read-out (decoded text).
    pub top_token: String,
    /// Its probability.
    pub top_prob: f32,
}

/// A lens of one model at one position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LensCurve {
    /// The position read (0-based, in this model's ids).
    pub position: usize,
    /// The token at that position (the last one the model has seen), decoded.
    pub token_at: String,
    /// The target token's id in this model's vocabulary.
    pub target_id: u32,
    /// The target token (vocabulary string).
    pub target: String,
    /// The target token decoded (what a reader sees).
    #[serde(default)]
    pub target_text: String,
    /// One point per layer.
    pub points: Vec<LensPoint>,
}

/// Rank (1-based: 1 + the number of larger entries) of `row[target]` and its softmax
/// probability.
fn rank_and_prob(row: &[f32], target: usize) -> (usize, f32, usize, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    let value = row[target];
    let rank = 1 + row.iter().filter(|&&v| v > value).count();
    let top = row
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i);
    let prob = |v: f32| (f64::from(v - max).exp() / sum) as f32;
    (rank, prob(value), top, prob(row[top]))
}

/// The logit lens of `model` over `ids` at `position`, tracking `target` (an id of this
/// model's vocabulary; `None`: the model's own top token at the position, i.e. the token it
/// would generate next).
pub fn logit_lens(
    model: &Transformer,
    tokenizer: &Tokenizer,
    ids: &[u32],
    position: usize,
    target: Option<u32>,
) -> Result<LensCurve> {
    if ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if position >= ids.len() {
        return Err(Error::invalid(
            "position",
            format!("{position} is past the last token ({})", ids.len() - 1),
        ));
    }
    let max = model.config().max_position_embeddings;
    if position + 1 > max {
        return Err(Error::PromptTooLong {
            len: position + 1,
            max,
        });
    }
    let n_layers = model.layers.len();
    let input = Tensor::new(&ids[..=position], model.device())?.unsqueeze(0)?;
    let mut rec = Recorder::new((0..n_layers).map(HookPoint::ResidPost));
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::None,
        use_lora: true,
    };
    model.run(Input::Ids(&input), &opts, None, &mut rec)?;
    let rows = (0..n_layers)
        .map(|l| {
            Ok(rec
                .get(HookPoint::ResidPost(l))?
                .i((0, position))?
                .unsqueeze(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let hidden = Tensor::cat(&rows, 0)?; // (L, d)
    let logits = model
        .lm_logits(&model.final_norm(&hidden)?, &opts)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let vocab = logits.first().map_or(0, Vec::len);
    let target = match target {
        Some(t) if (t as usize) < vocab => t as usize,
        Some(t) => {
            return Err(Error::invalid(
                "target token",
                format!("{t} is outside the vocabulary of {vocab}"),
            ))
        }
        None => logits.last().map_or(0, |row| rank_and_prob(row, 0).2),
    };
    let points = logits
        .iter()
        .enumerate()
        .map(|(layer, row)| {
            let (rank, prob, top, top_prob) = rank_and_prob(row, target);
            LensPoint {
                layer,
                rank,
                prob,
                top_token: tokenizer
                    .decode(&[top as u32], false)
                    .unwrap_or_else(|_| tokenizer.tokens(&[top as u32]).concat()),
                top_prob,
            }
        })
        .collect();
    Ok(LensCurve {
        position,
        token_at: tokenizer.decode(&ids[position..=position], false)?,
        target_id: target as u32,
        target: tokenizer.tokens(&[target as u32]).concat(),
        target_text: tokenizer
            .decode(&[target as u32], false)
            .unwrap_or_default(),
        points,
    })
}

/// What the lens reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LensRequest {
    /// A prompt as each model renders it, at a token position (`None`: the last).
    Prompt {
        /// The prompt.
        prompt: String,
        /// With the chat template.
        chat: bool,
        /// The position (0-based, in the rendered ids).
        position: Option<usize>,
    },
    /// Given ids of each model (a shift run's context and response up to a position), read at
    /// their last position, tracking B's token `target`.
    Ids {
        /// A's ids.
        a: Vec<u32>,
        /// B's ids.
        b: Vec<u32>,
        /// B's token at that position (an id of B's vocabulary; of A's when only A is
        /// loaded).
        target: u32,
    },
}

/// The lens of each loaded model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LensOutput {
    /// The tracked token (B's choice; A's own when only A is loaded).
    pub target: String,
    /// One curve per model: its slot, its name, the curve.
    pub curves: Vec<(Slot, String, LensCurve)>,
}

impl LensOutput {
    /// The tracked token as a reader sees it (decoded by the last model's tokenizer).
    pub fn target_text(&self) -> &str {
        self.curves
            .last()
            .map_or(self.target.as_str(), |(_, _, c)| c.target_text.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    #[test]
    fn the_last_layer_reads_out_the_models_own_logits() -> Result<()> {
        let m = tiny_model(4, &tiny_options(DType::F32))?;
        let ids = m.tokenizer.encode("the cat sat on the mat", true)?;
        let position = 3;
        let input = Tensor::new(ids.as_slice(), m.model.device())?.unsqueeze(0)?;
        let logits = m
            .model
            .forward(&input)?
            .i((0, position))?
            .to_vec1::<f32>()?;
        let own_top = rank_and_prob(&logits, 0).2;
        let curve = logit_lens(&m.model, &m.tokenizer, &ids, position, None)?;
        assert_eq!(curve.points.len(), m.model.layers.len());
        assert_eq!(curve.target_id as usize, own_top);
        let last = curve.points.last().ok_or(Error::EmptyPrompt)?;
        assert_eq!(last.rank, 1);
        // The probability of every token agrees with the forward's logits at the last layer.
        for target in [0u32, 7, 20, own_top as u32] {
            let c = logit_lens(&m.model, &m.tokenizer, &ids, position, Some(target))?;
            let (rank, prob, _, _) = rank_and_prob(&logits, target as usize);
            let last = c.points.last().ok_or(Error::EmptyPrompt)?;
            assert_eq!(last.rank, rank);
            assert!((last.prob - prob).abs() < 1e-6, "{} vs {prob}", last.prob);
        }
        Ok(())
    }

    #[test]
    fn positions_outside_the_prompt_are_errors() -> Result<()> {
        let m = tiny_model(4, &tiny_options(DType::F32))?;
        let ids = m.tokenizer.encode("the cat", true)?;
        assert!(logit_lens(&m.model, &m.tokenizer, &ids, ids.len(), None).is_err());
        assert!(logit_lens(&m.model, &m.tokenizer, &[], 0, None).is_err());
        assert!(logit_lens(&m.model, &m.tokenizer, &ids, 0, Some(1 << 20)).is_err());
        Ok(())
    }

    #[test]
    fn ranks_count_larger_entries() {
        let (rank, prob, top, top_prob) = rank_and_prob(&[1.0, 3.0, 2.0, 3.0], 2);
        assert_eq!(rank, 3);
        assert_eq!(top, 1);
        assert!(prob > 0.0 && prob < top_prob);
    }
}
