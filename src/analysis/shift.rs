//! Token distribution shift between an aligned model and its base (METHODS.md §6, Lin et al.'s
//! AlignTDS), and its use on several fine-tunes of one base (§10b).
//!
//! For a response written by the aligned model, both models are run teacher-forced over their
//! own context plus the response (one forward per model per response, §6.5, instead of
//! AlignTDS's forward per response token; [`response_tops_loop`] is that loop, kept as the
//! reference the tests compare against). Each position keeps the top 30 entries of each model;
//! the metrics of §6.2 step 3 are computed on those lists renormalised by a softmax over their
//! logits, and aggregated as §6.2 step 4 says.
//!
//! Choices the method leaves open, made here:
//! - TR uses the aligned model's top-1 `LA[0]` (as AlignTDS does), not the response token; for a
//!   greedy response they are the same. The token a position is shown and counted under (the
//!   top shifted tokens) is the response token.
//! - The response is decoded and re-encoded for the base pass (§6.2 step 2), without special
//!   tokens on either side; positions are compared up to the shorter of the two (§6.5).
//! - Tokens of the two lists are matched by vocabulary string, as AlignTDS matches token strings,
//!   so a base and a tuned model with different vocabularies still compare.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ForwardOptions, Input, KvCache, LogitsAt, NoHook, Tokenizer, Transformer};

/// Entries stored per position (AlignTDS's `k_save`).
pub const K_SAVE: usize = 30;

/// The base-model template of §6.2 step 2 (URIAL's `--enable_template`), `{input}` = the
/// user's prompt.
pub const URIAL_TEMPLATE: &str = "# Query: \n ```{input}``` \n\n \n# Answer: \n ```";

/// One entry of a position's top list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopEntry {
    /// Token id in its model's vocabulary.
    pub id: u32,
    /// Vocabulary string (what the two models' lists are matched by).
    pub token: String,
    /// The token decoded on its own (what a reader sees: `" other"` for `"Ġother"`).
    #[serde(default)]
    pub text: String,
    /// The logit.
    pub logit: f32,
    /// Probability under the full-vocabulary softmax.
    pub prob: f32,
}

/// The three classes of §6.2 step 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Category {
    /// TR = 0: the base model's top token is the aligned one.
    Unshifted,
    /// TR ∈ {1, 2}.
    Marginal,
    /// TR ≥ 3.
    Shifted,
}

impl Category {
    /// The class of a top rank.
    pub fn of(tr: usize) -> Self {
        match tr {
            0 => Self::Unshifted,
            1 | 2 => Self::Marginal,
            _ => Self::Shifted,
        }
    }

    /// Index in `[unshifted, marginal, shifted]`.
    pub fn index(self) -> usize {
        match self {
            Self::Unshifted => 0,
            Self::Marginal => 1,
            Self::Shifted => 2,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unshifted => "unshifted",
            Self::Marginal => "marginal",
            Self::Shifted => "shifted",
        }
    }
}

/// The per-position metrics of §6.2 step 3.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionMetrics {
    /// Index of `LA[0]` in `LB[:k]`, `k` when absent.
    pub tr: usize,
    /// The class of `tr`.
    pub category: Category,
    /// `Σ_{u ∈ LA∩LB} pB(u) log(pB(u)/pA(u))` (base → aligned, intersection only; can be < 0).
    pub kl: f64,
    /// `|LA ∩ LB| / |LA ∪ LB|`.
    pub jaccard: f64,
    /// `Σ_{u ∈ LA∪LB} pB(u) pA(u)`.
    pub ws: f64,
    /// `pB(LA[0])`, 0 when absent.
    pub tp: f64,
    /// `(pB(LA[0]) + pA(LB[0])) / 2`.
    pub bi_top_prob: f64,
    /// nDCG of the base list against the aligned list's ranks, over all stored entries.
    pub ndcg: f64,
}

/// Names of the per-position metrics, in [`PositionMetrics::values`] order.
pub const METRICS: [&str; 7] = ["TR", "KL", "Jaccard", "WS", "TP", "bi_top_prob", "nDCG"];

impl PositionMetrics {
    /// The metrics as numbers, in [`METRICS`] order.
    pub fn values(&self) -> [f64; 7] {
        [
            self.tr as f64,
            self.kl,
            self.jaccard,
            self.ws,
            self.tp,
            self.bi_top_prob,
            self.ndcg,
        ]
    }
}

/// Softmax over the logits of a stored list (AlignTDS's `norm_prob`).
fn norm_probs(list: &[TopEntry]) -> Vec<f64> {
    let max = list
        .iter()
        .map(|e| f64::from(e.logit))
        .fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = list
        .iter()
        .map(|e| (f64::from(e.logit) - max).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// §6.2 step 3 for one position: `aligned` and `base` are the stored lists (largest first), `k`
/// the truncation of every metric but nDCG.
pub fn position_metrics(aligned: &[TopEntry], base: &[TopEntry], k: usize) -> PositionMetrics {
    let pa_all = norm_probs(aligned);
    let pb_all = norm_probs(base);
    let ka = k.min(aligned.len());
    let kb = k.min(base.len());
    let pa: BTreeMap<&str, f64> = aligned[..ka]
        .iter()
        .zip(&pa_all)
        .map(|(e, &p)| (e.token.as_str(), p))
        .collect();
    let pb: BTreeMap<&str, f64> = base[..kb]
        .iter()
        .zip(&pb_all)
        .map(|(e, &p)| (e.token.as_str(), p))
        .collect();
    let top_a = aligned.first().map(|e| e.token.as_str());
    let top_b = base.first().map(|e| e.token.as_str());
    let tr = top_a
        .and_then(|t| base[..kb].iter().position(|e| e.token == t))
        .unwrap_or(k);
    let mut kl = 0.0;
    let mut inter = 0usize;
    let mut ws = 0.0;
    for (tok, &b) in &pb {
        if let Some(&a) = pa.get(tok) {
            inter += 1;
            kl += b * (b / a).ln();
            ws += b * a;
        }
    }
    let union = pa.len() + pb.len() - inter;
    let jaccard = if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    };
    let tp = top_a.and_then(|t| pb.get(t)).copied().unwrap_or(0.0);
    let pa_of_top_b = top_b.and_then(|t| pa.get(t)).copied().unwrap_or(0.0);
    // nDCG over all stored entries (not truncated to k, as compute_dist_diff.py does).
    let gain = |i: usize| 1.0 / ((i + 2) as f64).log2();
    let relevance: BTreeMap<&str, f64> = aligned
        .iter()
        .enumerate()
        .map(|(i, e)| (e.token.as_str(), gain(i)))
        .collect();
    let dcg: f64 = base
        .iter()
        .enumerate()
        .map(|(i, e)| relevance.get(e.token.as_str()).copied().unwrap_or(0.0) * gain(i))
        .sum();
    let mut ideal: Vec<f64> = relevance.values().copied().collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal.iter().enumerate().map(|(i, r)| r * gain(i)).sum();
    PositionMetrics {
        tr,
        category: Category::of(tr),
        kl,
        jaccard,
        ws,
        tp,
        bi_top_prob: f64::midpoint(tp, pa_of_top_b),
        ndcg: if idcg > 0.0 { dcg / idcg } else { 0.0 },
    }
}

/// The `k` largest logits of `row` with their full-softmax probabilities, largest first (lower
/// id first on ties).
pub fn top_entries(row: &[f32], k: usize, tokenizer: &Tokenizer) -> Vec<TopEntry> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    let k = k.min(row.len());
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx.truncate(k);
    let tokens = tokenizer.tokens(&idx);
    idx.into_iter()
        .zip(tokens)
        .map(|(id, token)| {
            let logit = row[id as usize];
            TopEntry {
                id,
                text: tokenizer
                    .decode(&[id], false)
                    .unwrap_or_else(|_| token.clone()),
                token,
                logit,
                prob: (f64::from(logit - max).exp() / sum) as f32,
            }
        })
        .collect()
}

fn check_lengths(model: &Transformer, context: &[u32], response: &[u32]) -> Result<()> {
    if context.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let len = context.len() + response.len();
    let max = model.config().max_position_embeddings;
    if len > max {
        return Err(Error::PromptTooLong { len, max });
    }
    Ok(())
}

/// The logits predicting each response token, teacher-forced: one forward over
/// `context + response[..n-1]`, rows `n` (flat `n × V`) and `V`.
pub fn teacher_forced_logits(
    model: &Transformer,
    context: &[u32],
    response: &[u32],
) -> Result<(Vec<f32>, usize)> {
    check_lengths(model, context, response)?;
    if response.is_empty() {
        return Ok((Vec::new(), model.config().vocab_size));
    }
    let mut ids = context.to_vec();
    ids.extend_from_slice(&response[..response.len() - 1]);
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::From(context.len() - 1),
        use_lora: true,
    };
    let logits = model
        .run(Input::Ids(&input), &opts, None, &mut NoHook)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let vocab = logits.dim(1)?;
    Ok((logits.flatten_all()?.to_vec1::<f32>()?, vocab))
}

/// The stored top lists of every response position, teacher-forced (§6.5).
pub fn response_tops(
    model: &Transformer,
    tokenizer: &Tokenizer,
    context: &[u32],
    response: &[u32],
    k_save: usize,
) -> Result<Vec<Vec<TopEntry>>> {
    let (logits, vocab) = teacher_forced_logits(model, context, response)?;
    Ok(logits
        .chunks(vocab.max(1))
        .map(|row| top_entries(row, k_save, tokenizer))
        .collect())
}

/// The stored top lists as AlignTDS computes them: one full forward per response token over
/// the context and the tokens before it. The reference of [`response_tops`] (tests, benchmark).
pub fn response_tops_loop(
    model: &Transformer,
    tokenizer: &Tokenizer,
    context: &[u32],
    response: &[u32],
    k_save: usize,
) -> Result<Vec<Vec<TopEntry>>> {
    check_lengths(model, context, response)?;
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::Last,
        use_lora: true,
    };
    let mut ids = context.to_vec();
    let mut out = Vec::with_capacity(response.len());
    for &next in response {
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let row = model
            .run(Input::Ids(&input), &opts, None, &mut NoHook)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        out.push(top_entries(&row, k_save, tokenizer));
        ids.push(next);
    }
    Ok(out)
}

/// Settings of a shift analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShiftConfig {
    /// Truncation `k` of TR and the list metrics (AlignTDS's HTML view uses 10).
    pub k: usize,
    /// Entries kept per position for display (the metrics use [`K_SAVE`]).
    pub keep: usize,
}

impl Default for ShiftConfig {
    fn default() -> Self {
        Self { k: 10, keep: 10 }
    }
}

impl ShiftConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 || self.k > K_SAVE {
            return Err(Error::invalid(
                "k",
                format!(
                    "{} is outside 1..={K_SAVE} (the entries stored per position)",
                    self.k
                ),
            ));
        }
        Ok(())
    }
}

/// One model of a shift pass: the network, its tokenizer and its context ids.
#[derive(Clone, Copy)]
pub struct ShiftSide<'a> {
    /// The network.
    pub model: &'a Transformer,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The context the response follows (the aligned model's chat prompt, or the base
    /// template), already tokenized.
    pub context: &'a [u32],
}

/// The shift of one response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseShift {
    /// The response text.
    pub response: String,
    /// The response's tokens as text pieces (the aligned tokenization; concatenated they give
    /// the decoded response).
    pub pieces: Vec<String>,
    /// Context ids of the aligned pass.
    pub aligned_context: Vec<u32>,
    /// Response ids of the aligned pass.
    pub aligned_ids: Vec<u32>,
    /// Context ids of the base pass.
    pub base_context: Vec<u32>,
    /// Response ids of the base pass (decoded, re-encoded).
    pub base_ids: Vec<u32>,
    /// The aligned model's top entries per position (`keep` of them).
    pub aligned_top: Vec<Vec<TopEntry>>,
    /// The base model's top entries per position.
    pub base_top: Vec<Vec<TopEntry>>,
    /// The metrics per compared position (the shorter of the two tokenizations).
    pub positions: Vec<PositionMetrics>,
}

/// The text pieces of `ids`: piece `t` is what decoding `ids[..=t]` adds to decoding `ids[..t]`
/// (so multi-byte characters split over tokens land on the token that completes them).
pub fn pieces(tokenizer: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(ids.len());
    let mut prev = String::new();
    for t in 0..ids.len() {
        let text = tokenizer.decode(&ids[..=t], false)?;
        let piece = match text.strip_prefix(prev.as_str()) {
            Some(rest) => rest.to_owned(),
            None => tokenizer.decode(&ids[t..=t], false)?,
        };
        out.push(piece);
        prev = text;
    }
    Ok(out)
}

/// §6.2 steps 1-3 for one response: the aligned pass, the base pass over the decoded and
/// re-encoded response, and the metrics per position.
pub fn shift_response(
    aligned: ShiftSide<'_>,
    base: ShiftSide<'_>,
    response: &str,
    cfg: &ShiftConfig,
) -> Result<ResponseShift> {
    cfg.validate()?;
    let aligned_ids = aligned.tokenizer.encode(response, false)?;
    if aligned_ids.is_empty() {
        return Err(Error::invalid("response", "the response is empty"));
    }
    let final_text = aligned.tokenizer.decode(&aligned_ids, false)?;
    let base_ids = base.tokenizer.encode(&final_text, false)?;
    let a_tops = response_tops(
        aligned.model,
        aligned.tokenizer,
        aligned.context,
        &aligned_ids,
        K_SAVE,
    )?;
    let b_tops = response_tops(base.model, base.tokenizer, base.context, &base_ids, K_SAVE)?;
    let positions = a_tops
        .iter()
        .zip(&b_tops)
        .map(|(a, b)| position_metrics(a, b, cfg.k))
        .collect();
    let keep = |tops: Vec<Vec<TopEntry>>| -> Vec<Vec<TopEntry>> {
        tops.into_iter()
            .map(|mut l| {
                l.truncate(cfg.keep.max(cfg.k));
                l
            })
            .collect()
    };
    Ok(ResponseShift {
        response: final_text,
        pieces: pieces(aligned.tokenizer, &aligned_ids)?,
        aligned_context: aligned.context.to_vec(),
        aligned_ids,
        base_context: base.context.to_vec(),
        base_ids,
        aligned_top: keep(a_tops),
        base_top: keep(b_tops),
        positions,
    })
}

/// A token's shift statistics over all responses (§6.2 step 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShiftedToken {
    /// The token's text (the response piece).
    pub token: String,
    /// Positions where it was shifted.
    pub shifted: usize,
    /// Positions where it occurred.
    pub occurrences: usize,
    /// `shifted / occurrences`.
    pub ratio: f64,
}

/// The means of every metric at one response position `t`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionMeans {
    /// The position index.
    pub t: usize,
    /// Responses long enough to have it.
    pub n: usize,
    /// Mean of each metric, in [`METRICS`] order.
    pub means: [f64; 7],
    /// Fraction of the responses shifted / marginal at `t`.
    pub shifted: f64,
    /// Fraction marginal.
    pub marginal: f64,
}

/// Bins of the relative-position histogram.
pub const RELATIVE_BINS: usize = 10;

/// The aggregates of §6.2 step 4 over a set of responses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShiftSummary {
    /// Positions compared, over all responses.
    pub positions: usize,
    /// Counts of unshifted, marginal and shifted positions.
    pub counts: [usize; 3],
    /// The same as fractions of `positions`.
    pub ratios: [f64; 3],
    /// The most often shifted tokens (most shifted first, then by ratio), at most 50.
    pub top_shifted: Vec<ShiftedToken>,
    /// `t / len` of every shifted position.
    pub relative_positions: Vec<f64>,
    /// Per bin of `t / len` (tenths): counts of unshifted, marginal and shifted positions.
    pub relative_bins: Vec<[usize; 3]>,
    /// Mean metrics by position index.
    pub by_position: Vec<PositionMeans>,
}

impl ShiftSummary {
    /// The shifted fraction of each relative-position bin (`NaN` for an empty bin).
    pub fn shifted_by_relative_position(&self) -> Vec<f64> {
        self.relative_bins
            .iter()
            .map(|c| {
                let n = c.iter().sum::<usize>();
                if n == 0 {
                    f64::NAN
                } else {
                    c[2] as f64 / n as f64
                }
            })
            .collect()
    }
}

/// §6.2 step 4 over responses.
pub fn summarize(responses: &[ResponseShift]) -> ShiftSummary {
    let mut s = ShiftSummary {
        relative_bins: vec![[0; 3]; RELATIVE_BINS],
        ..ShiftSummary::default()
    };
    let mut tokens: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let max_len = responses
        .iter()
        .map(|r| r.positions.len())
        .max()
        .unwrap_or(0);
    let mut sums = vec![([0.0f64; 7], 0usize, 0usize, 0usize); max_len];
    for r in responses {
        let len = r.positions.len();
        for (t, m) in r.positions.iter().enumerate() {
            let c = m.category.index();
            s.counts[c] += 1;
            s.positions += 1;
            let rel = t as f64 / len as f64;
            let bin = ((rel * RELATIVE_BINS as f64) as usize).min(RELATIVE_BINS - 1);
            s.relative_bins[bin][c] += 1;
            if m.category == Category::Shifted {
                s.relative_positions.push(rel);
            }
            if let Some(piece) = r.pieces.get(t) {
                let entry = tokens.entry(piece.as_str()).or_default();
                entry.1 += 1;
                if m.category == Category::Shifted {
                    entry.0 += 1;
                }
            }
            let slot = &mut sums[t];
            for (acc, v) in slot.0.iter_mut().zip(m.values()) {
                *acc += v;
            }
            slot.1 += 1;
            match m.category {
                Category::Shifted => slot.2 += 1,
                Category::Marginal => slot.3 += 1,
                Category::Unshifted => {}
            }
        }
    }
    if s.positions > 0 {
        for (r, c) in s.ratios.iter_mut().zip(s.counts) {
            *r = c as f64 / s.positions as f64;
        }
    }
    let mut top: Vec<ShiftedToken> = tokens
        .into_iter()
        .filter(|(_, (shifted, _))| *shifted > 0)
        .map(|(token, (shifted, occurrences))| ShiftedToken {
            token: token.to_owned(),
            shifted,
            occurrences,
            ratio: shifted as f64 / occurrences as f64,
        })
        .collect();
    top.sort_by(|a, b| {
        b.shifted
            .cmp(&a.shifted)
            .then(b.ratio.total_cmp(&a.ratio))
            .then(a.token.cmp(&b.token))
    });
    top.truncate(50);
    s.top_shifted = top;
    s.by_position = sums
        .into_iter()
        .enumerate()
        .map(|(t, (sum, n, shifted, marginal))| PositionMeans {
            t,
            n,
            means: sum.map(|v| v / n.max(1) as f64),
            shifted: shifted as f64 / n.max(1) as f64,
            marginal: marginal as f64 / n.max(1) as f64,
        })
        .collect();
    s
}

/// Runs [`shift_response`] over `items` (each an aligned context, a base context and a
/// response), reporting progress; stops when `progress` says so.
pub fn shift_responses(
    aligned: (&Transformer, &Tokenizer),
    base: (&Transformer, &Tokenizer),
    items: &[(Vec<u32>, Vec<u32>, String)],
    cfg: &ShiftConfig,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<Vec<ResponseShift>> {
    let mut out = Vec::with_capacity(items.len());
    for (i, (a_ctx, b_ctx, response)) in items.iter().enumerate() {
        if progress(i as f32 / items.len().max(1) as f32).is_break() {
            return Err(Error::Cancelled);
        }
        out.push(shift_response(
            ShiftSide {
                model: aligned.0,
                tokenizer: aligned.1,
                context: a_ctx,
            },
            ShiftSide {
                model: base.0,
                tokenizer: base.1,
                context: b_ctx,
            },
            response,
            cfg,
        )?);
    }
    Ok(out)
}

/// Live shift while the aligned model generates: the base model follows the response one
/// cached decode step per token and scores each new token as it streams (the Prompt view's
/// live mode). Per token it gives what [`shift_response`] gives at that position when both
/// models share a tokenizer (tested); with different tokenizers the token is fed to the base
/// model as its own id of the same vocabulary string, else re-encoded from its text.
pub struct LiveScorer<'m> {
    model: &'m Transformer,
    tokenizer: &'m Tokenizer,
    cache: KvCache,
    logits: Vec<f32>,
    k: usize,
}

impl<'m> LiveScorer<'m> {
    /// Runs the base model over its context (`base_context`, e.g. the URIAL template of the
    /// prompt).
    pub fn new(
        model: &'m Transformer,
        tokenizer: &'m Tokenizer,
        base_context: &[u32],
        k: usize,
    ) -> Result<Self> {
        check_lengths(model, base_context, &[])?;
        let mut scorer = Self {
            model,
            tokenizer,
            cache: KvCache::new(),
            logits: Vec::new(),
            k: k.clamp(1, K_SAVE),
        };
        scorer.feed(base_context)?;
        Ok(scorer)
    }

    fn feed(&mut self, ids: &[u32]) -> Result<()> {
        let len = self.cache.len() + ids.len();
        let max = self.model.config().max_position_embeddings;
        if len > max {
            return Err(Error::PromptTooLong { len, max });
        }
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::Last,
            use_lora: true,
        };
        self.logits = self
            .model
            .run(
                Input::Ids(&input),
                &opts,
                Some(&mut self.cache),
                &mut NoHook,
            )?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(())
    }

    /// Scores the aligned model's token `token_id` (chosen from `aligned_logits`, in
    /// `aligned_tokenizer`'s vocabulary) against the base model's next-token distribution,
    /// then feeds the token to the base model.
    pub fn score(
        &mut self,
        aligned_logits: &[f32],
        aligned_tokenizer: &Tokenizer,
        token_id: u32,
    ) -> Result<PositionMetrics> {
        let a = top_entries(aligned_logits, K_SAVE, aligned_tokenizer);
        let b = top_entries(&self.logits, K_SAVE, self.tokenizer);
        let metrics = position_metrics(&a, &b, self.k);
        let token = aligned_tokenizer.tokens(&[token_id]).concat();
        let ids = if let Some(id) = self.tokenizer.token_to_id(&token) {
            vec![id]
        } else {
            let text = aligned_tokenizer.decode(&[token_id], false)?;
            self.tokenizer.encode(&text, false)?
        };
        if !ids.is_empty() {
            self.feed(&ids)?;
        }
        Ok(metrics)
    }
}

// The plain data of a run as the worker, the CLI, the views and the exports share it.

/// Where the responses come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShiftData {
    /// A shipped prompt set by name (`sample_prompts/`, e.g. `open_qa`); B writes the
    /// responses.
    Shipped(String),
    /// A prompt file (prompts separated by `---` lines, or one per line; or JSONL with a
    /// `prompt`, `instruction` or `pure_input` field); B writes the responses.
    Prompts(PathBuf),
    /// AlignTDS / URIAL JSON: a list of `{id, pure_input, input, output: [o]}` with the
    /// aligned model's responses.
    AlignTds(PathBuf),
}

impl ShiftData {
    /// A short name for titles and file stems.
    pub fn label(&self) -> String {
        match self {
            Self::Shipped(name) => name.clone(),
            Self::Prompts(p) | Self::AlignTds(p) => p
                .file_stem()
                .map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into()),
        }
    }
}

/// The base model's context (§6.2 step 2).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseTemplate {
    /// URIAL's `# Query: ... # Answer:` template ([`URIAL_TEMPLATE`]).
    #[default]
    Urial,
    /// The prompt as it is.
    Raw,
    /// A text file with `{input}` where the prompt goes.
    File(PathBuf),
}

impl BaseTemplate {
    /// Parses `urial`, `raw` or a file path.
    pub fn parse(text: &str) -> Self {
        match text {
            "urial" => Self::Urial,
            "raw" => Self::Raw,
            path => Self::File(PathBuf::from(path)),
        }
    }
}

/// Settings of a shift run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShiftSettings {
    /// The responses.
    pub data: ShiftData,
    /// The base model's context.
    pub base_template: BaseTemplate,
    /// `k` and the entries kept for display.
    pub config: ShiftConfig,
    /// New tokens of B's greedy responses (prompt sets only).
    pub max_new_tokens: usize,
    /// At most this many items (`None`: all).
    pub max_items: Option<usize>,
}

impl Default for ShiftSettings {
    fn default() -> Self {
        Self {
            data: ShiftData::Shipped("open_qa".to_owned()),
            base_template: BaseTemplate::Urial,
            config: ShiftConfig::default(),
            max_new_tokens: 96,
            max_items: None,
        }
    }
}

/// One record: a prompt, and the aligned model's response when the data has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShiftRecord {
    /// The record's id.
    pub id: String,
    /// The user's prompt (`pure_input`).
    pub prompt: String,
    /// The prompt already in the aligned model's template (AlignTDS's `input`), if given.
    pub input: Option<String>,
    /// The response, if given.
    pub output: Option<String>,
}

/// One analysed record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShiftItem {
    /// The record's id.
    pub id: String,
    /// The user's prompt.
    pub prompt: String,
    /// The shift of its response.
    pub shift: ResponseShift,
}

/// One tuned model against the base: every response and the aggregates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShiftRun {
    /// The base model (A).
    pub base_model: String,
    /// The tuned model (B).
    pub tuned_model: String,
    /// The settings.
    pub settings: ShiftSettings,
    /// The analysed responses.
    pub items: Vec<ShiftItem>,
    /// §6.2 step 4.
    pub summary: ShiftSummary,
    /// Whether the run was stopped before the last record (the items so far are kept).
    pub cancelled: bool,
    /// Where the time went.
    pub timings: ShiftTimings,
}

/// Seconds spent in a shift run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShiftTimings {
    /// Generating B's responses.
    pub generate_s: f64,
    /// The two teacher-forced passes and the metrics.
    pub shift_s: f64,
}

impl ShiftRun {
    /// "tuned vs base".
    pub fn title(&self) -> String {
        format!("{} vs {}", self.tuned_model, self.base_model)
    }
}

#[cfg(test)]
// Exact comparisons are intended: identical lists give exactly 0 and 1.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    fn list(entries: &[(&str, f32)]) -> Vec<TopEntry> {
        entries
            .iter()
            .enumerate()
            .map(|(i, &(token, logit))| TopEntry {
                id: i as u32,
                token: token.to_owned(),
                text: token.to_owned(),
                logit,
                prob: 0.0,
            })
            .collect()
    }

    #[test]
    fn worked_example_of_the_method() {
        // METHODS.md §6.4.
        let base = list(&[("the", 3.0), ("a", 2.5), ("Sure", 1.0), ("I", 0.5)]);
        let aligned = list(&[("Sure", 4.0), ("the", 2.0), ("I", 1.0), ("Hello", 0.2)]);
        let m = position_metrics(&aligned, &base, 10);
        assert_eq!(m.tr, 2);
        assert_eq!(m.category, Category::Marginal);
        assert!((m.jaccard - 0.6).abs() < 1e-12);
        assert!((m.kl - 0.6953).abs() < 5e-5, "KL {}", m.kl);
        assert!((m.ws - 0.1248).abs() < 5e-5, "WS {}", m.ws);
        assert!((m.tp - 0.0742).abs() < 5e-5, "TP {}", m.tp);
        // pA(the) = .1121, so bi_top_prob = (.0742 + .1121) / 2.
        assert!((m.bi_top_prob - f64::midpoint(0.0742, 0.1121)).abs() < 1e-4);
        assert!(m.ndcg > 0.0 && m.ndcg < 1.0);
        // k = 2 truncates LB to [the, a]: LA[0] = Sure is absent.
        let m2 = position_metrics(&aligned, &base, 2);
        assert_eq!(m2.tr, 2);
        assert_eq!(m2.category, Category::Marginal);
        assert_eq!(m2.tp, 0.0);
        let m1 = position_metrics(&aligned, &base, 1);
        assert_eq!(m1.tr, 1);
        let far = list(&[
            ("x", 1.0),
            ("y", 0.5),
            ("z", 0.2),
            ("w", 0.1),
            ("Sure", 0.0),
        ]);
        let m3 = position_metrics(&aligned, &far, 10);
        assert_eq!(m3.tr, 4);
        assert_eq!(m3.category, Category::Shifted);
    }

    #[test]
    fn identical_lists_are_unshifted_with_zero_kl() {
        let l = list(&[("a", 2.0), ("b", 1.0), ("c", 0.5)]);
        let m = position_metrics(&l, &l, 10);
        assert_eq!(m.tr, 0);
        assert_eq!(m.kl, 0.0);
        assert_eq!(m.jaccard, 1.0);
        assert!((m.ndcg - 1.0).abs() < 1e-12);
    }

    #[test]
    fn teacher_forcing_equals_the_per_token_loop() -> Result<()> {
        let m = tiny_model(3, &tiny_options(DType::F32))?;
        let context = m.tokenizer.encode("the cat sat on", true)?;
        let response = m.tokenizer.encode(" the mat and the dog ran", false)?;
        let fast = response_tops(&m.model, &m.tokenizer, &context, &response, K_SAVE)?;
        let slow = response_tops_loop(&m.model, &m.tokenizer, &context, &response, K_SAVE)?;
        assert_eq!(fast.len(), response.len());
        assert_eq!(fast.len(), slow.len());
        for (f, s) in fast.iter().zip(&slow) {
            assert_eq!(f.len(), s.len());
            for (a, b) in f.iter().zip(s) {
                assert!((a.logit - b.logit).abs() <= 1e-5 * (1.0 + b.logit.abs()));
                assert!((a.prob - b.prob).abs() <= 1e-5);
            }
            // The order can only differ between near-equal logits.
            let ids_f: Vec<u32> = f.iter().map(|e| e.id).collect();
            let ids_s: Vec<u32> = s.iter().map(|e| e.id).collect();
            if ids_f != ids_s {
                let gap = f
                    .iter()
                    .zip(s)
                    .filter(|(a, b)| a.id != b.id)
                    .map(|(a, b)| (a.logit - b.logit).abs())
                    .fold(0.0f32, f32::max);
                assert!(gap < 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn the_same_model_twice_is_never_shifted() -> Result<()> {
        let m = tiny_model(5, &tiny_options(DType::F32))?;
        let context = m.tokenizer.encode("the dog ran to", true)?;
        let side = ShiftSide {
            model: &m.model,
            tokenizer: &m.tokenizer,
            context: &context,
        };
        let r = shift_response(side, side, " the park and sat", &ShiftConfig::default())?;
        assert!(!r.positions.is_empty());
        for p in &r.positions {
            assert_eq!(p.tr, 0);
            assert_eq!(p.kl, 0.0);
            assert_eq!(p.jaccard, 1.0);
        }
        assert_eq!(r.pieces.concat(), r.response);
        let s = summarize(std::slice::from_ref(&r));
        assert_eq!(s.counts, [r.positions.len(), 0, 0]);
        assert_eq!(s.ratios[0], 1.0);
        assert!(s.top_shifted.is_empty());
        Ok(())
    }

    #[test]
    fn different_models_shift_and_tr_stays_within_k() -> Result<()> {
        let a = tiny_model(5, &tiny_options(DType::F32))?;
        let b = tiny_model(6, &tiny_options(DType::F32))?;
        let ca = a.tokenizer.encode("the dog ran to", true)?;
        let cb = b.tokenizer.encode("# Query: the dog ran to", true)?;
        let cfg = ShiftConfig { k: 5, keep: 10 };
        let r = shift_response(
            ShiftSide {
                model: &a.model,
                tokenizer: &a.tokenizer,
                context: &ca,
            },
            ShiftSide {
                model: &b.model,
                tokenizer: &b.tokenizer,
                context: &cb,
            },
            " the park and the cat sat on the mat",
            &cfg,
        )?;
        assert!(r.positions.iter().all(|p| p.tr <= cfg.k));
        assert!(r.positions.iter().any(|p| p.tr > 0));
        assert!(r.aligned_top.iter().all(|l| l.len() == 10));
        let s = summarize(&[r.clone(), r]);
        assert_eq!(s.counts.iter().sum::<usize>(), s.positions);
        assert!((s.ratios.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(s.relative_bins.iter().flatten().sum::<usize>(), s.positions);
        assert!(s.by_position.iter().all(|p| p.n == 2));
        Ok(())
    }

    #[test]
    fn live_scores_equal_the_teacher_forced_positions() -> Result<()> {
        let a = tiny_model(5, &tiny_options(DType::F32))?;
        let b = tiny_model(6, &tiny_options(DType::F32))?;
        let ca = a.tokenizer.encode("the dog ran to", true)?;
        let cb = b.tokenizer.encode("the cat sat on", true)?;
        let response = "the park and the cat sat on the mat";
        let cfg = ShiftConfig::default();
        let fixed = shift_response(
            ShiftSide {
                model: &a.model,
                tokenizer: &a.tokenizer,
                context: &ca,
            },
            ShiftSide {
                model: &b.model,
                tokenizer: &b.tokenizer,
                context: &cb,
            },
            response,
            &cfg,
        )?;
        // The aligned model's logits at each response position, then the live scorer.
        let (logits, vocab) = teacher_forced_logits(&a.model, &ca, &fixed.aligned_ids)?;
        let mut live = LiveScorer::new(&b.model, &b.tokenizer, &cb, cfg.k)?;
        for (t, row) in logits.chunks(vocab).enumerate() {
            let m = live.score(row, &a.tokenizer, fixed.aligned_ids[t])?;
            let f = &fixed.positions[t];
            assert_eq!(m.tr, f.tr, "position {t}");
            assert!((m.kl - f.kl).abs() < 1e-5 && (m.ndcg - f.ndcg).abs() < 1e-9);
        }
        Ok(())
    }

    #[test]
    fn bad_settings_and_empty_responses_are_errors() -> Result<()> {
        assert!(ShiftConfig { k: 0, keep: 10 }.validate().is_err());
        assert!(ShiftConfig { k: 31, keep: 10 }.validate().is_err());
        let m = tiny_model(5, &tiny_options(DType::F32))?;
        let context = m.tokenizer.encode("the dog", true)?;
        let side = ShiftSide {
            model: &m.model,
            tokenizer: &m.tokenizer,
            context: &context,
        };
        assert!(shift_response(side, side, "", &ShiftConfig::default()).is_err());
        Ok(())
    }
}
