//! Text generation with a KV cache: greedy or nucleus sampling, stop on EOS or stop strings,
//! a streaming per-token callback that can cancel, and hooks applied on every step.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::hooks::Hook;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{ForwardOptions, Input, KvCache, LogitsAt, Transformer};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Sampling {
    /// The most likely token (ties go to the lowest id, as `torch.argmax`).
    Greedy,
    /// Nucleus sampling.
    Sample {
        /// Logits are divided by this before the softmax (> 0).
        temperature: f64,
        /// Keep the smallest set of tokens whose probability reaches this (0 < top_p ≤ 1).
        top_p: f64,
        /// Seed of the random generator; the same seed gives the same text.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// The EOS ids are masked until this many tokens exist (transformers' `min_new_tokens`).
    pub min_new_tokens: usize,
    /// Greedy or sampling.
    pub sampling: Sampling,
    /// Stop when the text contains one of these (the stop string is cut from the text).
    pub stop_strings: Vec<String>,
    /// Stop at the tokenizer's EOS ids.
    pub stop_at_eos: bool,
    /// Apply attached LoRA adapters.
    pub use_lora: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            min_new_tokens: 0,
            sampling: Sampling::Greedy,
            stop_strings: Vec::new(),
            stop_at_eos: true,
            use_lora: true,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An EOS token was produced.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

/// One streamed token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratedToken {
    /// 0-based index among the new tokens.
    pub index: usize,
    /// The token id.
    pub token_id: u32,
    /// Text this token added to the response (may be empty for a partial UTF-8 sequence).
    pub text_delta: String,
}

/// The result of a generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The prompt ids fed to the model.
    pub prompt_ids: Vec<u32>,
    /// Generated ids (an EOS that ended generation included, as in transformers).
    pub new_ids: Vec<u32>,
    /// The response text (special tokens skipped, stop string removed).
    pub text: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Seconds for the prompt forward.
    pub prefill_secs: f64,
    /// Seconds for the one-token steps.
    pub decode_secs: f64,
}

/// Picks the next token from last-position logits.
pub fn pick_token(
    logits: &[f32],
    sampling: &Sampling,
    rng: &mut rand::rngs::StdRng,
) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::invalid("logits", "empty vocabulary"));
    }
    match sampling {
        Sampling::Greedy => Ok(argmax(logits)),
        Sampling::Sample {
            temperature, top_p, ..
        } => {
            let temperature = *temperature;
            let top_p = *top_p;
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::invalid(
                    "temperature",
                    format!("{temperature} must be > 0"),
                ));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::invalid(
                    "top_p",
                    format!("{top_p} must be in (0, 1]"),
                ));
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(u32, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, (f64::from(l - max) / temperature).exp()))
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = 0.0;
            let mut cut = probs.len();
            for (i, p) in probs.iter().enumerate() {
                kept += p.1 / total;
                if kept >= top_p {
                    cut = i + 1;
                    break;
                }
            }
            probs.truncate(cut);
            let mass: f64 = probs.iter().map(|p| p.1).sum();
            let mut target = rng.random::<f64>() * mass;
            for (id, p) in &probs {
                target -= p;
                if target <= 0.0 {
                    return Ok(*id);
                }
            }
            Ok(probs.last().map_or(0, |p| p.0))
        }
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates a continuation of `prompt_ids`, calling `on_token` for each new token; return
/// `ControlFlow::Break` from it to stop (the partial generation is returned, marked cancelled).
pub fn generate(
    model: &Transformer,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    cfg: &GenerateConfig,
    hook: &mut dyn Hook,
    on_token: &mut dyn FnMut(&GeneratedToken) -> ControlFlow<()>,
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let context = model.config().max_position_embeddings;
    if prompt_ids.len() >= context {
        return Err(Error::PromptTooLong {
            len: prompt_ids.len(),
            max: context,
        });
    }
    let seed = match cfg.sampling {
        Sampling::Sample { seed, .. } => seed,
        Sampling::Greedy => 0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::Last,
        use_lora: cfg.use_lora,
    };
    let mut cache = KvCache::new();
    let started = Instant::now();
    let input = Tensor::new(prompt_ids, model.device())?.unsqueeze(0)?;
    let mut logits = model.run(Input::Ids(&input), &opts, Some(&mut cache), hook)?;
    let prefill_secs = started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    let mut new_ids: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut stop_reason = StopReason::MaxTokens;
    while new_ids.len() < cfg.max_new_tokens {
        let mut last: Vec<f32> = logits
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        if new_ids.len() < cfg.min_new_tokens {
            for &id in &tokenizer.stop_ids {
                if let Some(logit) = last.get_mut(id as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        let token_id = pick_token(&last, &cfg.sampling, &mut rng)?;
        new_ids.push(token_id);
        let is_eos = cfg.stop_at_eos && tokenizer.stop_ids.contains(&token_id);
        let full = tokenizer.decode(&new_ids, true)?;
        // A partial UTF-8 sequence decodes to U+FFFD; hold it back until the character completes.
        let stable = if full.ends_with('\u{FFFD}') {
            text.clone()
        } else {
            full
        };
        let mut delta = stable.get(text.len()..).unwrap_or_default().to_owned();
        let mut hit_stop = false;
        if let Some(cut) = cfg
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| stable.find(s.as_str()))
            .min()
        {
            hit_stop = true;
            stable
                .get(text.len().min(cut)..cut)
                .unwrap_or_default()
                .clone_into(&mut delta);
            stable[..cut].clone_into(&mut text);
        } else {
            text = stable;
        }
        let event = GeneratedToken {
            index: new_ids.len() - 1,
            token_id,
            text_delta: delta,
        };
        if on_token(&event).is_break() {
            stop_reason = StopReason::Cancelled;
            break;
        }
        if is_eos {
            stop_reason = StopReason::Eos;
            break;
        }
        if hit_stop {
            stop_reason = StopReason::StopString;
            break;
        }
        if new_ids.len() >= cfg.max_new_tokens {
            break;
        }
        if cache.len() + 1 > context {
            stop_reason = StopReason::ContextFull;
            break;
        }
        let step = Tensor::new(&[token_id], model.device())?.unsqueeze(0)?;
        logits = model.run(Input::Ids(&step), &opts, Some(&mut cache), hook)?;
    }
    if stop_reason != StopReason::StopString {
        text = tokenizer.decode(&new_ids, true)?;
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        new_ids,
        text,
        stop_reason,
        prefill_secs,
        decode_secs: decode_started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let logits = [5.0f32, 4.0, -10.0, -10.0];
        let sampling = Sampling::Sample {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // top_p 0.5: only the most likely token survives.
        for _ in 0..20 {
            assert_eq!(pick_token(&logits, &sampling, &mut rng).unwrap(), 0);
        }
        let wide = Sampling::Sample {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let draw = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| pick_token(&logits, &wide, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert!(draw(3).contains(&1));
        assert!(pick_token(
            &logits,
            &Sampling::Sample {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0
            },
            &mut rng
        )
        .is_err());
    }
}
