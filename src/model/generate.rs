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

/// A generation in progress, advanced one token at a time with [`Generator::step`], so several
/// models can stream side by side from one thread.
pub struct Generator<'m> {
    model: &'m Transformer,
    tokenizer: &'m Tokenizer,
    cfg: GenerateConfig,
    opts: ForwardOptions,
    rng: rand::rngs::StdRng,
    cache: KvCache,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
    text: String,
    /// Logits of the prompt, consumed by the first step.
    prefill_logits: Option<Tensor>,
    /// The last token, not yet fed to the model (fed lazily, so a token is streamed as soon as
    /// it is chosen).
    pending: Option<u32>,
    /// The logits the last token was chosen from.
    last_logits: Vec<f32>,
    stop_reason: Option<StopReason>,
    prefill_secs: f64,
    decode_secs: f64,
}

impl<'m> Generator<'m> {
    /// Checks the prompt and runs the prefill forward.
    pub fn new(
        model: &'m Transformer,
        tokenizer: &'m Tokenizer,
        prompt_ids: &[u32],
        cfg: &GenerateConfig,
        hook: &mut dyn Hook,
    ) -> Result<Self> {
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
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::Last,
            use_lora: cfg.use_lora,
        };
        let mut cache = KvCache::new();
        let started = Instant::now();
        let input = Tensor::new(prompt_ids, model.device())?.unsqueeze(0)?;
        let logits = model.run(Input::Ids(&input), &opts, Some(&mut cache), hook)?;
        Ok(Self {
            model,
            tokenizer,
            cfg: cfg.clone(),
            opts,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            cache,
            prompt_ids: prompt_ids.to_vec(),
            new_ids: Vec::new(),
            text: String::new(),
            prefill_logits: Some(logits),
            pending: None,
            last_logits: Vec::new(),
            stop_reason: (cfg.max_new_tokens == 0).then_some(StopReason::MaxTokens),
            prefill_secs: started.elapsed().as_secs_f64(),
            decode_secs: 0.0,
        })
    }

    /// The logits (every vocabulary entry) the last streamed token was chosen from; empty
    /// before the first step.
    pub fn last_logits(&self) -> &[f32] {
        &self.last_logits
    }

    /// Whether generation has ended.
    pub fn is_done(&self) -> bool {
        self.stop_reason.is_some()
    }

    /// Ends generation early; [`Self::finish`] then reports [`StopReason::Cancelled`].
    pub fn cancel(&mut self) {
        if self.stop_reason.is_none() {
            self.stop_reason = Some(StopReason::Cancelled);
        }
    }

    /// Chooses the next token (running the forward for the previous one first). `None` once done.
    pub fn step(&mut self, hook: &mut dyn Hook) -> Result<Option<GeneratedToken>> {
        if self.stop_reason.is_some() {
            return Ok(None);
        }
        let started = Instant::now();
        let logits = match (self.pending.take(), self.prefill_logits.take()) {
            (None, Some(logits)) => logits,
            (Some(token_id), _) => {
                let step = Tensor::new(&[token_id], self.model.device())?.unsqueeze(0)?;
                self.model
                    .run(Input::Ids(&step), &self.opts, Some(&mut self.cache), hook)?
            }
            (None, None) => return Err(Error::invalid("generator", "no logits to continue from")),
        };
        let mut last: Vec<f32> = logits
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        if self.new_ids.len() < self.cfg.min_new_tokens {
            for &id in &self.tokenizer.stop_ids {
                if let Some(logit) = last.get_mut(id as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        let token_id = pick_token(&last, &self.cfg.sampling, &mut self.rng)?;
        self.last_logits = last;
        self.new_ids.push(token_id);
        let full = self.tokenizer.decode(&self.new_ids, true)?;
        // A partial UTF-8 sequence decodes to U+FFFD; hold it back until the character completes.
        let stable = if full.ends_with('\u{FFFD}') {
            self.text.clone()
        } else {
            full
        };
        let stop_cut = self
            .cfg
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| stable.find(s.as_str()))
            .min();
        let visible = stable[..stop_cut.unwrap_or(stable.len())].to_owned();
        let text_delta = visible
            .get(self.text.len()..)
            .unwrap_or_default()
            .to_owned();
        self.text = visible;
        let context = self.model.config().max_position_embeddings;
        self.stop_reason = if self.cfg.stop_at_eos && self.tokenizer.stop_ids.contains(&token_id) {
            Some(StopReason::Eos)
        } else if stop_cut.is_some() {
            Some(StopReason::StopString)
        } else if self.new_ids.len() >= self.cfg.max_new_tokens {
            Some(StopReason::MaxTokens)
        } else if self.cache.len() + 1 >= context {
            Some(StopReason::ContextFull)
        } else {
            self.pending = Some(token_id);
            None
        };
        if self.new_ids.len() > 1 {
            self.decode_secs += started.elapsed().as_secs_f64();
        }
        Ok(Some(GeneratedToken {
            index: self.new_ids.len() - 1,
            token_id,
            text_delta,
        }))
    }

    /// The finished (or cancelled) generation.
    pub fn finish(self) -> Result<Generation> {
        let stop_reason = self.stop_reason.unwrap_or(StopReason::Cancelled);
        let text = if stop_reason == StopReason::StopString {
            self.text
        } else {
            self.tokenizer.decode(&self.new_ids, true)?
        };
        Ok(Generation {
            prompt_ids: self.prompt_ids,
            new_ids: self.new_ids,
            text,
            stop_reason,
            prefill_secs: self.prefill_secs,
            decode_secs: self.decode_secs,
        })
    }
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
    let mut generator = Generator::new(model, tokenizer, prompt_ids, cfg, hook)?;
    while let Some(token) = generator.step(hook)? {
        if on_token(&token).is_break() {
            generator.cancel();
            break;
        }
    }
    generator.finish()
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
