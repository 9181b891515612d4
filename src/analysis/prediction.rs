//! Prediction consistency on paraphrased factual probes (METHODS.md §8): per relation, how often
//! the answers to the templates of one fact agree (consistency), are right (accuracy), and agree
//! while right (acc-consistency), macro-averaged over relations; and the spread of accuracy across
//! paraphrased task instructions (§8.4).

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use candle_nn::ops::log_softmax;
use serde::{Deserialize, Serialize};

use crate::analysis::stats::{self, Summary};
use crate::error::{Error, Result};
use crate::model::generate::{generate, GenerateConfig};
use crate::model::{ForwardOptions, Input, KvCache, LogitsAt, NoHook, Tokenizer, Transformer};

/// One fact: subject, gold object, other accepted surface forms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// The subject `[X]`.
    pub subject: String,
    /// The object `[Y]`.
    pub object: String,
    /// Other correct answers.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// A relation: templates ending where the object would follow, and its facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    /// Short id.
    pub relation: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
    /// Query prefixes with `[X]`; the object follows the text directly.
    pub templates: Vec<String>,
    /// Facts.
    pub facts: Vec<Fact>,
}

/// A probe file (`sample_prompts/facts.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactSet {
    /// Paraphrased task instructions for §8.4.
    #[serde(default)]
    pub instructions: Vec<String>,
    /// Relations.
    pub relations: Vec<Relation>,
}

impl FactSet {
    /// Checks the §8.1 rules: `[X]` once per template, no `[Y]` (templates stop before the
    /// object), at least one fact. Errors name the relation and template.
    pub fn validate(&self) -> Result<()> {
        if self.relations.is_empty() {
            return Err(Error::invalid("facts", "no relations"));
        }
        for r in &self.relations {
            for t in &r.templates {
                if t.matches("[X]").count() != 1 || t.contains("[Y]") {
                    return Err(Error::invalid(
                        format!("relation `{}` template", r.relation),
                        format!("`{t}` must contain [X] once and stop where [Y] would start"),
                    ));
                }
            }
            if r.facts.is_empty() {
                return Err(Error::invalid(
                    format!("relation `{}`", r.relation),
                    "no facts",
                ));
            }
        }
        Ok(())
    }
}

/// The query of a template for a subject: `[X]` replaced, right-stripped.
pub fn query(template: &str, subject: &str) -> String {
    template.replace("[X]", subject).trim_end().to_owned()
}

/// SQuAD-style normalisation (§8.2 a): lower-case, punctuation removed, the articles a/an/the
/// dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// §8.2 (a): correct when the normalised prediction starts with a normalised gold answer.
pub fn is_correct(pred: &str, golds: &[&str]) -> bool {
    let p = normalize(pred);
    golds.iter().any(|g| {
        let g = normalize(g);
        !g.is_empty() && p.starts_with(&g)
    })
}

/// §8.2 (a): the comparison key of a generated answer: cut at the first newline or ".", then
/// normalised.
pub fn answer_key(pred: &str) -> String {
    let cut = pred.find(['\n', '.']).map_or(pred, |at| &pred[..at]);
    normalize(cut)
}

/// §8.3 metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Agreeing template pairs / all pairs.
    pub consistency: f64,
    /// Correct predictions / templates.
    pub accuracy: f64,
    /// Pairs that agree and are correct / all pairs.
    pub acc_consistency: f64,
}

/// §8.3 for one tuple's predictions (keys) and their correctness; `None` with fewer than two.
pub fn tuple_metrics(keys: &[String], correct: &[bool]) -> Option<Metrics> {
    let n = keys.len();
    if n < 2 || correct.len() != n {
        return None;
    }
    let pairs = (n * (n - 1) / 2) as f64;
    let (mut agree, mut agree_correct) = (0usize, 0usize);
    for i in 0..n {
        for j in i + 1..n {
            if keys[i] == keys[j] {
                agree += 1;
                if correct[i] {
                    agree_correct += 1;
                }
            }
        }
    }
    Some(Metrics {
        consistency: agree as f64 / pairs,
        accuracy: correct.iter().filter(|&&c| c).count() as f64 / n as f64,
        acc_consistency: agree_correct as f64 / pairs,
    })
}

/// How answers are predicted (§8.2); recorded with every result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PredictionMode {
    /// (b) the relation's object with the highest summed log-probability.
    Candidates,
    /// (a) greedy generation of up to this many tokens.
    Generative {
        /// Token budget (the reference uses 50).
        max_new_tokens: usize,
    },
}

/// One answered query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Template index.
    pub template: usize,
    /// The prediction (candidate text or generated text).
    pub prediction: String,
    /// Its comparison key.
    pub key: String,
    /// Whether it is right.
    pub correct: bool,
}

/// The answers and metrics of one fact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FactResult {
    /// Subject.
    pub subject: String,
    /// Gold object.
    pub object: String,
    /// One answer per template.
    pub answers: Vec<Answer>,
    /// §8.3 metrics.
    pub metrics: Metrics,
}

/// One relation's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelationResult {
    /// Relation id.
    pub relation: String,
    /// Tuple metrics averaged over the facts.
    pub metrics: Metrics,
    /// Per fact.
    pub facts: Vec<FactResult>,
}

/// §8 for one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictionResult {
    /// Mode used.
    pub mode: PredictionMode,
    /// Instruction prefixed to every query, if any.
    pub instruction: Option<String>,
    /// Per relation (those with at least two templates).
    pub relations: Vec<RelationResult>,
    /// Macro average over relations.
    pub macro_avg: Metrics,
    /// Standard deviation across relations.
    pub macro_std: Metrics,
}

/// Log-probabilities of each candidate continuation (token ids) after `prefix`, summed over the
/// candidate's tokens: the prefix runs once, its KV cache is repeated for every candidate.
pub fn candidate_logprobs(
    model: &Transformer,
    prefix: &[u32],
    candidates: &[Vec<u32>],
) -> Result<Vec<f64>> {
    if prefix.is_empty() || candidates.iter().any(Vec::is_empty) {
        return Err(Error::invalid(
            "candidate scoring",
            "empty prefix or candidate",
        ));
    }
    let device = model.device();
    let mut cache = KvCache::new();
    let last = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::Last,
        use_lora: true,
    };
    let input = Tensor::new(prefix, device)?.unsqueeze(0)?;
    let first = model.run(Input::Ids(&input), &last, Some(&mut cache), &mut NoHook)?;
    let first = log_softmax(&first.squeeze(0)?.squeeze(0)?.to_dtype(DType::F32)?, 0)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let mut scores: Vec<f64> = candidates
        .iter()
        .map(|c| f64::from(first[c[0] as usize]))
        .collect();
    let longer: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].len() > 1)
        .collect();
    if longer.is_empty() {
        return Ok(scores);
    }
    // Every candidate but its last token, right-padded (causal: padding is never attended to).
    let width = longer
        .iter()
        .map(|&i| candidates[i].len() - 1)
        .max()
        .unwrap_or(1);
    let mut ids = Vec::with_capacity(longer.len() * width);
    for &i in &longer {
        let c = &candidates[i];
        ids.extend_from_slice(&c[..c.len() - 1]);
        ids.extend(std::iter::repeat_n(c[0], width - (c.len() - 1)));
    }
    let input = Tensor::from_vec(ids, (longer.len(), width), device)?;
    let mut batch_cache = cache.repeat_batch(longer.len())?;
    let all = ForwardOptions {
        logits: LogitsAt::All,
        ..last
    };
    let logits = model.run(
        Input::Ids(&input),
        &all,
        Some(&mut batch_cache),
        &mut NoHook,
    )?;
    let logp = log_softmax(&logits.to_dtype(DType::F32)?, 2)?.to_device(&Device::Cpu)?;
    let vocab = logp.dim(2)?;
    let logp = logp.flatten_all()?.to_vec1::<f32>()?;
    for (row, &i) in longer.iter().enumerate() {
        let c = &candidates[i];
        for (t, &id) in c.iter().enumerate().skip(1) {
            let at = (row * width + (t - 1)) * vocab + id as usize;
            scores[i] += f64::from(logp[at]);
        }
    }
    Ok(scores)
}

/// How the candidates of §8.2 (b) are scored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scoring {
    /// [`score_queries`]: queries of equal prefix length in one batch, their shared prefix run
    /// once, candidates extended a token at a time for all queries together, and candidates
    /// that can no longer win left unfinished. The default.
    #[default]
    Batched,
    /// [`candidate_logprobs`] per query: one forward pair each (the reference the batched path
    /// is tested against).
    PerQuery,
}

/// Rows (queries × candidates still being extended) per forward of [`score_queries`]; bounds
/// the KV caches held at once (and the stems run together).
const MAX_ROWS: usize = 256;

/// Queries per prefix forward of [`score_queries`].
const MAX_QUERIES: usize = 64;

/// Summed log-probabilities of candidate continuations for many queries at once: query `q` has
/// the prefix `queries[q].0` and the candidates `sets[queries[q].1]`; the result has one score
/// per candidate of its set, equal to [`candidate_logprobs`] of that query (within float
/// rounding; tested to 1e-5).
///
/// Every forward streams all the weights, so the work is cut into few, wide forwards of rows
/// of different lengths ([`Transformer::run_rows`]: right padding, per-row positions, padding
/// never attended to), and no token is run twice where queries share it:
/// 1. the prefix all queries share (BOS, an instruction) runs once;
/// 2. each query's *stem* — the prefix it shares with other queries, chosen to minimise its
///    share of the work (for a template, its words before the subject) — runs once for all the
///    queries that share it, stems of similar length in one padded forward;
/// 3. the rest of each query runs on top of its stem's cache, queries of similar remaining
///    length together;
/// 4. candidates then grow a token per step, the candidates of several batches in one forward
///    (a pool of rows in one padded cache, stepped once enough rows wait), candidates that
///    share their first tokens sharing the rows that score them.
///
/// With `prune`, a candidate whose partial score is already below the best finished candidate
/// of its query stops (log-probabilities only fall as tokens are added, so it cannot become
/// the argmax) and its score is `-inf`: the argmax, and the score of every candidate that could
/// still win, are unchanged.
pub fn score_queries(
    model: &Transformer,
    queries: &[(Vec<u32>, usize)],
    sets: &[Vec<Vec<u32>>],
    prune: bool,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<Vec<Vec<f64>>> {
    for (q, (prefix, set)) in queries.iter().enumerate() {
        let Some(cands) = sets.get(*set) else {
            return Err(Error::invalid(
                "candidate scoring",
                format!("query {q} names candidate set {set} of {}", sets.len()),
            ));
        };
        if prefix.is_empty() || cands.iter().any(Vec::is_empty) {
            return Err(Error::invalid(
                "candidate scoring",
                format!("query {q}: empty prefix or candidate"),
            ));
        }
    }
    let mut scores: Vec<Vec<f64>> = queries
        .iter()
        .map(|(_, set)| vec![0.0; sets[*set].len()])
        .collect();
    if queries.is_empty() {
        return Ok(scores);
    }
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::None,
        use_lora: true,
    };
    let device = model.device();
    // 1. The prefix every query starts with; one token of each query is left for step 3.
    let min_len = queries.iter().map(|q| q.0.len()).min().unwrap_or(1);
    let global = common_prefix(queries.iter().map(|q| q.0.as_slice()), min_len - 1);
    let mut global_cache = KvCache::new();
    if global > 0 {
        let input = Tensor::new(&queries[0].0[..global], device)?.unsqueeze(0)?;
        model.run(
            Input::Ids(&input),
            &opts,
            Some(&mut global_cache),
            &mut NoHook,
        )?;
    }
    // 2. Stems, in blocks of at most MAX_ROWS distinct stems (queries in token order).
    let prefixes: Vec<&[u32]> = queries.iter().map(|q| q.0.as_slice()).collect();
    let mut order: Vec<usize> = (0..queries.len()).collect();
    order.sort_by(|&a, &b| prefixes[a].cmp(prefixes[b]));
    let stem = stem_lengths(&prefixes, &order, global);
    let multi = |q: usize| sets[queries[q].1].iter().filter(|c| c.len() > 1).count();
    let mut best = vec![f64::NEG_INFINITY; queries.len()];
    let mut pool = Pool::default();
    let mut done = 0usize;
    let mut at = 0usize;
    while at < order.len() {
        // The block: consecutive queries (token order) until MAX_ROWS distinct stems. A query
        // with an empty stem (no shared prefix and no BOS) has no stem row.
        let mut stems: Vec<&[u32]> = Vec::new();
        let mut stem_of: Vec<(usize, Option<u32>)> = Vec::new();
        while at < order.len() {
            let q = order[at];
            let key = &prefixes[q][..stem[q]];
            let k = if key.is_empty() {
                None
            } else if let Some(k) = stems.iter().rposition(|s| *s == key) {
                Some(k)
            } else if stems.len() < MAX_ROWS {
                stems.push(key);
                Some(stems.len() - 1)
            } else {
                break;
            };
            stem_of.push((q, k.map(|k| k as u32)));
            at += 1;
        }
        let stem_cache = run_stems(model, &stems, global, &global_cache)?;
        // 3–4. Batches of queries of similar remaining length.
        stem_of.sort_by_key(|&(q, k)| (k.is_some(), prefixes[q].len() - stem[q], k));
        let rest: Vec<usize> = stem_of
            .iter()
            .map(|&(q, _)| prefixes[q].len() - stem[q])
            .collect();
        let rows: Vec<usize> = stem_of.iter().map(|&(q, _)| multi(q)).collect();
        // Each batch also adds to the candidate steps' forwards.
        let batches = partition(&rest, 2.0 * FORWARD_TOKENS, |r| {
            r.len() <= MAX_QUERIES
                && rows[r.clone()].iter().sum::<usize>() <= MAX_ROWS
                && stem_of[r.start].1.is_some() == stem_of[r.end - 1].1.is_some()
        });
        for batch in batches {
            let chunk: Vec<usize> = stem_of[batch.clone()].iter().map(|&(q, _)| q).collect();
            let parents: Vec<u32> = stem_of[batch].iter().filter_map(|&(_, k)| k).collect();
            let cache = match &stem_cache {
                Some(c) if !parents.is_empty() => c.select_rows(&parents)?,
                _ => KvCache::new(),
            };
            let (cache, live) = start_chunk(
                model,
                queries,
                sets,
                &chunk,
                &stem,
                cache,
                &mut scores,
                &mut best,
            )?;
            pool.add(&cache, live)?;
            drop(cache);
            // Steps run once enough rows wait, so each takes rows of several batches.
            while pool.live.len() >= MAX_ROWS / 4 {
                pool.step(model, queries, sets, &mut scores, &mut best, prune)?;
            }
            done += chunk.len();
            if progress(done as f32 / queries.len() as f32).is_break() {
                return Err(Error::Cancelled);
            }
        }
    }
    while !pool.live.is_empty() {
        pool.step(model, queries, sets, &mut scores, &mut best, prune)?;
    }
    Ok(scores)
}

/// What one more forward costs beyond its tokens, in tokens: every forward streams (and BLAS
/// packs) all the weights. On the demo model a one-token forward takes ~33 ms and wide forwards
/// ~2.2–2.8 ms a token.
const FORWARD_TOKENS: f64 = 12.0;

/// The KV cache of `stems` (each starting with the `global` tokens held by `global_cache`), row
/// `k` for stem `k`: stems of similar length run together, the groups' caches joined. `None`
/// when there are no stems.
fn run_stems(
    model: &Transformer,
    stems: &[&[u32]],
    global: usize,
    global_cache: &KvCache,
) -> Result<Option<KvCache>> {
    if stems.is_empty() {
        return Ok(None);
    }
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::None,
        use_lora: true,
    };
    let mut by_width: Vec<usize> = (0..stems.len()).collect();
    by_width.sort_by_key(|&k| stems[k].len());
    let widths: Vec<usize> = by_width.iter().map(|&k| stems[k].len() - global).collect();
    let mut parts = Vec::new();
    for group in partition(&widths, FORWARD_TOKENS, |r| r.len() <= MAX_ROWS) {
        let ks = &by_width[group.clone()];
        let width = widths[group.end - 1];
        // A stem is never empty, so with no global prefix every group has tokens to run.
        let mut cache = if global > 0 {
            global_cache.repeat_batch(ks.len())?
        } else {
            KvCache::new()
        };
        if width > 0 {
            let lens = &widths[group];
            let ids = padded_ids(ks.iter().map(|&k| &stems[k][global..]), width);
            let input = Tensor::from_vec(ids, (ks.len(), width), model.device())?;
            model.run_rows(&input, lens, &opts, &mut cache)?;
        }
        parts.push(cache);
    }
    let joined = KvCache::concat(&parts.iter().collect::<Vec<_>>())?;
    // Rows are in width order; put stem `k` at row `k`.
    let mut row_of = vec![0u32; stems.len()];
    for (row, &k) in by_width.iter().enumerate() {
        row_of[k] = row as u32;
    }
    Ok(Some(joined.select_rows(&row_of)?))
}

/// Splits items whose lengths `lens` ascend (within each run that `fits` allows together) into
/// consecutive groups, minimising `Σ (fixed + n · width)` over the groups, `n` a group's items
/// and `width` its longest: the tokens of padded forwards plus what each forward costs beyond
/// them. `fits` says whether a range may be one group (it must accept every single item, and
/// every sub-range of a range it accepts).
fn partition(
    lens: &[usize],
    fixed: f64,
    fits: impl Fn(std::ops::Range<usize>) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let n = lens.len();
    let mut best = vec![f64::INFINITY; n + 1];
    let mut from = vec![0usize; n + 1];
    best[0] = 0.0;
    for j in 1..=n {
        let mut wide = 0;
        for i in (0..j).rev() {
            if i + 1 < j && !fits(i..j) {
                break;
            }
            wide = wide.max(lens[i]);
            let cost = best[i] + fixed + ((j - i) * wide) as f64;
            if cost < best[j] {
                best[j] = cost;
                from[j] = i;
            }
        }
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        groups.push(from[j]..j);
        j = from[j];
    }
    groups.reverse();
    groups
}

/// The stem length of every query (see [`score_queries`]): among the lengths from `global` to
/// one short of the query, the one that minimises `(L − global) / r(L) + (len − L)`, the
/// query's share of the stem's tokens plus its own remaining tokens, where `r(L)` is how many
/// queries start with its first `L` tokens. `order` holds the queries in token order.
fn stem_lengths(prefixes: &[&[u32]], order: &[usize], global: usize) -> Vec<usize> {
    let n = order.len();
    // Tokens shared by neighbours in token order.
    let lcp: Vec<usize> = order
        .windows(2)
        .map(|w| common_prefix([prefixes[w[0]], prefixes[w[1]]].into_iter(), usize::MAX))
        .collect();
    let mut stem = vec![global; prefixes.len()];
    for (i, &q) in order.iter().enumerate() {
        let len = prefixes[q].len();
        let (mut lo, mut hi) = (i, i);
        let mut best = (len - global) as f64;
        for l in (global + 1..len).rev() {
            // Queries sharing the first `l` tokens form a run around `i`.
            while lo > 0 && lcp[lo - 1] >= l {
                lo -= 1;
            }
            while hi + 1 < n && lcp[hi] >= l {
                hi += 1;
            }
            let r = (hi - lo + 1) as f64;
            let cost = (l - global) as f64 / r + (len - l) as f64;
            if cost < best - 1e-9 {
                best = cost;
                stem[q] = l;
            }
        }
    }
    stem
}

/// Rows of token ids right-padded to `width` (padding repeats a row's first token).
fn padded_ids<'a>(rows: impl Iterator<Item = &'a [u32]>, width: usize) -> Vec<u32> {
    let mut ids = Vec::new();
    for row in rows {
        ids.extend_from_slice(row);
        let pad = row.first().copied().unwrap_or(0);
        ids.extend(std::iter::repeat_n(pad, width - row.len()));
    }
    ids
}

/// The number of leading tokens all `prefixes` share, at most `cap`.
fn common_prefix<'a>(mut prefixes: impl Iterator<Item = &'a [u32]>, cap: usize) -> usize {
    let Some(first) = prefixes.next() else {
        return 0;
    };
    prefixes.fold(cap.min(first.len()), |n, p| {
        first[..n].iter().zip(p).take_while(|(x, y)| x == y).count()
    })
}

/// Log-softmax of logits `(n, 1, V)` as `n` rows of `V` values on the CPU.
fn log_probs(logits: &Tensor) -> Result<(Vec<f32>, usize)> {
    let logp = log_softmax(&logits.squeeze(1)?.to_dtype(DType::F32)?, 1)?;
    let vocab = logp.dim(1)?;
    Ok((
        logp.to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        vocab,
    ))
}

/// Step 3 of [`score_queries`] for the queries of `chunk`, whose first `stem[q]` tokens are in
/// `cache` (one row per query of `chunk`): the rest of each query in one padded forward, the
/// first token of every candidate scored (`scores`, and `best` for one-token candidates).
/// Returns the cache and the candidates still to grow (their rows are the queries' rows).
#[allow(clippy::too_many_arguments)]
fn start_chunk(
    model: &Transformer,
    queries: &[(Vec<u32>, usize)],
    sets: &[Vec<Vec<u32>>],
    chunk: &[usize],
    stem: &[usize],
    mut cache: KvCache,
    scores: &mut [Vec<f64>],
    best: &mut [f64],
) -> Result<(KvCache, Vec<Growing>)> {
    let rests: Vec<&[u32]> = chunk.iter().map(|&q| &queries[q].0[stem[q]..]).collect();
    let lens: Vec<usize> = rests.iter().map(|r| r.len()).collect();
    let width = lens.iter().copied().max().unwrap_or(1);
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::Last,
        use_lora: true,
    };
    let ids = padded_ids(rests.iter().copied(), width);
    let input = Tensor::from_vec(ids, (chunk.len(), width), model.device())?;
    let logits = model.run_rows(&input, &lens, &opts, &mut cache)?;
    let (logp, vocab) = log_probs(&logits)?;
    let mut live = Vec::new();
    for (i, &q) in chunk.iter().enumerate() {
        let row = &logp[i * vocab..(i + 1) * vocab];
        for (c, cand) in sets[queries[q].1].iter().enumerate() {
            scores[q][c] = f64::from(row[cand[0] as usize]);
            if cand.len() == 1 {
                best[q] = best[q].max(scores[q][c]);
            } else {
                live.push(Growing {
                    query: q,
                    cand: c,
                    row: i as u32,
                    depth: 1,
                });
            }
        }
    }
    Ok((cache, live))
}

/// A candidate still growing: its query, its index in the query's set, its row in the pool's
/// cache, and how many of its tokens are scored.
#[derive(Clone, Copy, Debug)]
struct Growing {
    query: usize,
    cand: usize,
    row: u32,
    depth: usize,
}

/// Step 4 of [`score_queries`]: the candidates still growing, of every batch started so far,
/// in one padded cache, so each step's forward takes the rows of several batches together
/// (rows of one query are always at the same depth).
#[derive(Default)]
struct Pool {
    cache: KvCache,
    live: Vec<Growing>,
}

impl Pool {
    /// Adds a batch's growing candidates, whose rows are rows of `cache`.
    fn add(&mut self, cache: &KvCache, mut live: Vec<Growing>) -> Result<()> {
        if live.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<u32> = live.iter().map(|g| g.row).collect();
        rows.sort_unstable();
        rows.dedup();
        let fresh = cache.select_rows(&rows)?.compact()?;
        let offset = if self.live.is_empty() {
            self.cache = fresh;
            0
        } else {
            let held = self.cache.rows();
            self.cache = KvCache::concat(&[&self.cache.compact()?, &fresh])?;
            held
        };
        for g in &mut live {
            g.row = (offset + rows.partition_point(|&r| r < g.row)) as u32;
        }
        self.live.extend(live);
        Ok(())
    }

    /// Scores one more token of every growing candidate (after dropping, with `prune`, those
    /// below their query's best finished candidate).
    fn step(
        &mut self,
        model: &Transformer,
        queries: &[(Vec<u32>, usize)],
        sets: &[Vec<Vec<u32>>],
        scores: &mut [Vec<f64>],
        best: &mut [f64],
        prune: bool,
    ) -> Result<()> {
        let cand = |g: &Growing| &sets[queries[g.query].1][g.cand];
        self.live.retain(|g| {
            let keep = !prune || scores[g.query][g.cand] >= best[g.query];
            if !keep {
                scores[g.query][g.cand] = f64::NEG_INFINITY;
            }
            keep
        });
        if self.live.is_empty() {
            return Ok(());
        }
        // One row per distinct (parent row, token): candidates with a common start share it.
        let mut nodes: Vec<(u32, u32)> = Vec::new();
        let mut index: std::collections::HashMap<(u32, u32), usize> =
            std::collections::HashMap::new();
        let node_of: Vec<usize> = self
            .live
            .iter()
            .map(|g| {
                let key = (g.row, cand(g)[g.depth - 1]);
                *index.entry(key).or_insert_with(|| {
                    nodes.push(key);
                    nodes.len() - 1
                })
            })
            .collect();
        let parents: Vec<u32> = nodes.iter().map(|n| n.0).collect();
        let tokens: Vec<u32> = nodes.iter().map(|n| n.1).collect();
        let mut cache = self.cache.select_rows(&parents)?;
        let input = Tensor::from_vec(tokens, (nodes.len(), 1), model.device())?;
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::Last,
            use_lora: true,
        };
        let logits = model.run(Input::Ids(&input), &opts, Some(&mut cache), &mut NoHook)?;
        let (logp, vocab) = log_probs(&logits)?;
        for (g, &k) in self.live.iter_mut().zip(&node_of) {
            let tokens = &sets[queries[g.query].1][g.cand];
            scores[g.query][g.cand] += f64::from(logp[k * vocab + tokens[g.depth] as usize]);
            g.row = k as u32;
            g.depth += 1;
            if tokens.len() == g.depth {
                best[g.query] = best[g.query].max(scores[g.query][g.cand]);
            }
        }
        self.live
            .retain(|g| sets[queries[g.query].1][g.cand].len() > g.depth);
        self.cache = cache;
        Ok(())
    }
}

/// The index of the highest score (the last of equal ones, as `Iterator::max_by`).
fn argmax(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

fn mean_metrics(ms: &[Metrics]) -> (Metrics, Metrics) {
    let col = |f: fn(&Metrics) -> f64| ms.iter().map(f).collect::<Vec<_>>();
    let s = |v: Vec<f64>| -> Summary { stats::summarize(&v) };
    let (c, a, ac) = (
        s(col(|m| m.consistency)),
        s(col(|m| m.accuracy)),
        s(col(|m| m.acc_consistency)),
    );
    (
        Metrics {
            consistency: c.mean,
            accuracy: a.mean,
            acc_consistency: ac.mean,
        },
        Metrics {
            consistency: c.std,
            accuracy: a.std,
            acc_consistency: ac.std,
        },
    )
}

/// §8 for one model: every template of every fact answered in `mode`, with `instruction` (if
/// any) on the line before each query; candidates scored in batches ([`Scoring::Batched`]).
/// `progress` gets the fraction done; breaking cancels.
pub fn prediction_consistency(
    model: &Transformer,
    tokenizer: &Tokenizer,
    facts: &FactSet,
    mode: PredictionMode,
    instruction: Option<&str>,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<PredictionResult> {
    prediction_consistency_with(
        model,
        tokenizer,
        facts,
        mode,
        instruction,
        Scoring::Batched,
        progress,
    )
}

/// [`prediction_consistency`] with the candidate scoring chosen (the per-query path is the
/// reference of the tests and the benchmark).
pub fn prediction_consistency_with(
    model: &Transformer,
    tokenizer: &Tokenizer,
    facts: &FactSet,
    mode: PredictionMode,
    instruction: Option<&str>,
    scoring: Scoring,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<PredictionResult> {
    facts.validate()?;
    let relations_used: Vec<&Relation> = facts
        .relations
        .iter()
        .filter(|r| r.templates.len() >= 2)
        .collect();
    // Each relation's distinct objects (the candidates of §8.2 b) and their ids.
    let mut objects: Vec<Vec<&str>> = Vec::with_capacity(relations_used.len());
    let mut sets: Vec<Vec<Vec<u32>>> = Vec::with_capacity(relations_used.len());
    // Every query: (relation, fact, template, prefix ids), in result order.
    let mut queries: Vec<(usize, usize, usize, Vec<u32>)> = Vec::new();
    for (r, rel) in relations_used.iter().enumerate() {
        let mut objs: Vec<&str> = Vec::new();
        for f in &rel.facts {
            if !objs.contains(&f.object.as_str()) {
                objs.push(&f.object);
            }
        }
        if mode == PredictionMode::Candidates {
            sets.push(
                objs.iter()
                    .map(|o| tokenizer.encode(&format!(" {o}"), false))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        objects.push(objs);
        for (f, fact) in rel.facts.iter().enumerate() {
            for (t, template) in rel.templates.iter().enumerate() {
                let q = query(template, &fact.subject);
                let text = match instruction {
                    Some(ins) => format!("{ins}\n{q}"),
                    None => q,
                };
                queries.push((r, f, t, tokenizer.encode(&text, true)?));
            }
        }
    }
    let total = queries.len().max(1) as f32;
    // The prediction of every query, in order.
    let predictions: Vec<String> = match (mode, scoring) {
        (PredictionMode::Candidates, Scoring::Batched) => {
            let batch: Vec<(Vec<u32>, usize)> =
                queries.iter().map(|q| (q.3.clone(), q.0)).collect();
            score_queries(model, &batch, &sets, true, progress)?
                .iter()
                .zip(&queries)
                .map(|(s, q)| objects[q.0][argmax(s)].to_owned())
                .collect()
        }
        (PredictionMode::Candidates, Scoring::PerQuery) => {
            let mut out = Vec::with_capacity(queries.len());
            for (n, q) in queries.iter().enumerate() {
                let s = candidate_logprobs(model, &q.3, &sets[q.0])?;
                out.push(objects[q.0][argmax(&s)].to_owned());
                if progress((n + 1) as f32 / total).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            out
        }
        (PredictionMode::Generative { max_new_tokens }, _) => {
            let cfg = GenerateConfig {
                max_new_tokens,
                stop_strings: vec!["\n".to_owned()],
                ..GenerateConfig::default()
            };
            let mut out = Vec::with_capacity(queries.len());
            for (n, q) in queries.iter().enumerate() {
                let g = generate(model, tokenizer, &q.3, &cfg, &mut NoHook, &mut |_| {
                    ControlFlow::Continue(())
                })?;
                out.push(g.text.trim().trim_end_matches('.').trim().to_owned());
                if progress((n + 1) as f32 / total).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            out
        }
    };
    let mut predictions = predictions.into_iter();
    let mut relations = Vec::with_capacity(relations_used.len());
    for rel in &relations_used {
        let mut fact_results = Vec::with_capacity(rel.facts.len());
        for fact in &rel.facts {
            let golds: Vec<&str> = std::iter::once(fact.object.as_str())
                .chain(fact.aliases.iter().map(String::as_str))
                .collect();
            let mut answers = Vec::with_capacity(rel.templates.len());
            for t in 0..rel.templates.len() {
                let pred = predictions.next().unwrap_or_default();
                answers.push(match mode {
                    PredictionMode::Candidates => Answer {
                        template: t,
                        correct: golds.contains(&pred.as_str()),
                        key: pred.clone(),
                        prediction: pred,
                    },
                    PredictionMode::Generative { .. } => Answer {
                        template: t,
                        correct: is_correct(&pred, &golds),
                        key: answer_key(&pred),
                        prediction: pred,
                    },
                });
            }
            let keys: Vec<String> = answers.iter().map(|a| a.key.clone()).collect();
            let correct: Vec<bool> = answers.iter().map(|a| a.correct).collect();
            let metrics = tuple_metrics(&keys, &correct).unwrap_or_default();
            fact_results.push(FactResult {
                subject: fact.subject.clone(),
                object: fact.object.clone(),
                answers,
                metrics,
            });
        }
        let per_fact: Vec<Metrics> = fact_results.iter().map(|f| f.metrics).collect();
        relations.push(RelationResult {
            relation: rel.relation.clone(),
            metrics: mean_metrics(&per_fact).0,
            facts: fact_results,
        });
    }
    let per_relation: Vec<Metrics> = relations.iter().map(|r| r.metrics).collect();
    let (macro_avg, macro_std) = mean_metrics(&per_relation);
    Ok(PredictionResult {
        mode,
        instruction: instruction.map(str::to_owned),
        relations,
        macro_avg,
        macro_std,
    })
}

/// §8.4: the macro accuracy under each paraphrased instruction, and its spread.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstructionSpread {
    /// `(instruction, macro accuracy)` per instruction.
    pub accuracies: Vec<(String, f64)>,
    /// Mean, std (sample), count.
    pub summary: Summary,
    /// Lowest accuracy.
    pub min: f64,
    /// Highest accuracy.
    pub max: f64,
    /// `max − min`.
    pub range: f64,
}

/// Summarises per-instruction accuracies.
pub fn instruction_spread(accuracies: Vec<(String, f64)>) -> InstructionSpread {
    let values: Vec<f64> = accuracies.iter().map(|a| a.1).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    InstructionSpread {
        summary: stats::summarize(&values),
        min,
        max,
        range: max - min,
        accuracies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    /// METHODS.md §8.5.
    #[test]
    fn worked_example() {
        let keys: Vec<String> = ["Paris", "Paris", "Lyon", "Paris"]
            .map(String::from)
            .to_vec();
        let correct: Vec<bool> = keys.iter().map(|k| k == "Paris").collect();
        let m = tuple_metrics(&keys, &correct).expect("4 templates");
        assert!((m.consistency - 0.5).abs() < 1e-12);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        assert!((m.acc_consistency - 0.5).abs() < 1e-12);
        let constant = vec!["x".to_owned(); 5];
        let m = tuple_metrics(&constant, &[false; 5]).expect("5 templates");
        assert!(
            (m.consistency - 1.0).abs() < 1e-12,
            "a constant predictor is consistent"
        );
        assert!(tuple_metrics(&constant[..1], &[true]).is_none());
    }

    #[test]
    fn normalisation_and_prefix_match() {
        assert_eq!(
            normalize("  The Eiffel-Tower, in PARIS! "),
            "eiffeltower in paris"
        );
        assert!(is_correct("Paris, the capital", &["paris"]));
        assert!(is_correct("an apple a day", &["Apple"]));
        assert!(!is_correct("Lyon", &["Paris", "City of Light"]));
        assert_eq!(answer_key("Paris. It is big"), "paris");
        assert_eq!(answer_key("the Seine\nriver"), "seine");
    }

    #[test]
    fn candidate_scores_match_full_forwards() -> Result<()> {
        let m = tiny_model(6, &tiny_options(DType::F32))?;
        let prefix = [5u32, 7, 9];
        let candidates = vec![vec![10u32], vec![11, 12], vec![13, 14, 15]];
        let fast = candidate_logprobs(&m.model, &prefix, &candidates)?;
        for (c, &score) in candidates.iter().zip(&fast) {
            let ids: Vec<u32> = prefix.iter().chain(c).copied().collect();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = m.model.forward(&input)?.squeeze(0)?;
            let logp = log_softmax(&logits, 1)?.to_vec2::<f32>()?;
            let reference: f64 = c
                .iter()
                .enumerate()
                .map(|(t, &id)| f64::from(logp[prefix.len() - 1 + t][id as usize]))
                .sum();
            assert!((score - reference).abs() < 1e-4, "{score} vs {reference}");
        }
        Ok(())
    }

    /// Queries of several lengths (some sharing a start), candidate sets with shared first
    /// tokens and long candidates: the batched scores equal the per-query ones; with pruning,
    /// the argmax and every score left finite are unchanged.
    #[test]
    fn batched_scores_equal_per_query_scores() -> Result<()> {
        let m = tiny_model(6, &tiny_options(DType::F32))?;
        let sets = vec![
            vec![
                vec![10u32],
                vec![11, 12],
                vec![11, 13, 14],
                vec![15, 16, 17, 18],
            ],
            vec![vec![20u32], vec![21], vec![22, 23]],
        ];
        let queries: Vec<(Vec<u32>, usize)> = vec![
            (vec![1, 5, 7, 9], 0),
            (vec![1, 5, 7, 8], 0),
            (vec![1, 5, 3, 2], 1),
            (vec![1, 4], 0),
            (vec![1, 4, 6, 2, 9, 9], 1),
            (vec![2, 4, 6, 2, 9, 9], 0),
            (vec![7], 0),
        ];
        let reference: Vec<Vec<f64>> = queries
            .iter()
            .map(|(p, s)| candidate_logprobs(&m.model, p, &sets[*s]))
            .collect::<Result<_>>()?;
        let mut go = |_| ControlFlow::Continue(());
        let full = score_queries(&m.model, &queries, &sets, false, &mut go)?;
        let pruned = score_queries(&m.model, &queries, &sets, true, &mut go)?;
        for ((r, f), p) in reference.iter().zip(&full).zip(&pruned) {
            for (a, b) in r.iter().zip(f) {
                assert!((a - b).abs() < 1e-5, "{r:?} vs {f:?}");
            }
            assert_eq!(argmax(r), argmax(p), "{r:?} vs pruned {p:?}");
            for (a, b) in r.iter().zip(p) {
                assert!(b.is_infinite() || (a - b).abs() < 1e-5, "{r:?} vs {p:?}");
            }
        }
        assert!(
            pruned.iter().flatten().any(|s| s.is_infinite()),
            "some candidate is left unfinished: {pruned:?}"
        );
        // Behind a shared instruction (run once per call), with template words that the queries
        // of a batch share beyond it.
        let instructed: Vec<(Vec<u32>, usize)> = queries
            .iter()
            .map(|(p, s)| ([1u32, 30, 31, 32].iter().chain(p).copied().collect(), *s))
            .collect();
        let full = score_queries(&m.model, &instructed, &sets, false, &mut go)?;
        for ((p, s), f) in instructed.iter().zip(&full) {
            let r = candidate_logprobs(&m.model, p, &sets[*s])?;
            for (a, b) in r.iter().zip(f) {
                assert!((a - b).abs() < 1e-5, "{r:?} vs {f:?}");
            }
        }
        assert_eq!(
            common_prefix(instructed.iter().map(|q| q.0.as_slice()), 9),
            4
        );
        assert_eq!(
            common_prefix(instructed.iter().map(|q| q.0.as_slice()), 2),
            2
        );
        assert_eq!(common_prefix(queries.iter().map(|q| q.0.as_slice()), 9), 0);
        let bad = score_queries(&m.model, &[(vec![], 0)], &sets, true, &mut go);
        assert!(bad.is_err(), "an empty prefix is refused");
        let mut stop = |_| ControlFlow::Break(());
        assert!(matches!(
            score_queries(&m.model, &queries, &sets, true, &mut stop),
            Err(Error::Cancelled)
        ));
        Ok(())
    }

    /// Many templates × subjects (more queries than one batch takes, stems of several lengths
    /// and subjects of one to three tokens, behind an instruction): every score equals the
    /// query's own forward pair within 1e-5 relative.
    #[test]
    fn template_batches_equal_per_query_scores() -> Result<()> {
        let m = tiny_model(8, &tiny_options(DType::F32))?;
        let sets = vec![vec![vec![10u32], vec![11, 12], vec![13, 14, 15]]];
        let templates: [(&[u32], &[u32]); 3] =
            [(&[20, 21, 22], &[23]), (&[], &[24, 25]), (&[26], &[])];
        let mut queries = Vec::new();
        for s in 0..30u32 {
            let subject: Vec<u32> = (0..=s % 3).map(|i| 30 + (s * 7 + i * 3) % 30).collect();
            for (before, after) in templates {
                let ids: Vec<u32> = [1u32, 2, 3]
                    .iter()
                    .chain(before)
                    .chain(&subject)
                    .chain(after)
                    .copied()
                    .collect();
                queries.push((ids, 0usize));
            }
        }
        assert!(queries.len() > MAX_QUERIES);
        let mut go = |_| ControlFlow::Continue(());
        let batched = score_queries(&m.model, &queries, &sets, false, &mut go)?;
        for ((p, set), got) in queries.iter().zip(&batched) {
            let want = candidate_logprobs(&m.model, p, &sets[*set])?;
            for (a, b) in want.iter().zip(got) {
                // Within 1e-5 relative: f32 sums of a few dozen terms, blocked differently.
                assert!(
                    (a - b).abs() < 1e-5 * a.abs().max(1.0),
                    "{p:?}: {want:?} vs {got:?}"
                );
            }
        }
        Ok(())
    }

    /// Stems: the prefix a query shares where sharing saves work; none for a query that
    /// shares nothing beyond the global prefix.
    #[test]
    fn stems_and_partitions() {
        let qs: Vec<Vec<u32>> = vec![
            vec![1, 5, 7, 9],
            vec![1, 5, 7, 8],
            vec![1, 5, 7, 3, 3],
            vec![1, 4],
            vec![1, 6, 2],
        ];
        let prefixes: Vec<&[u32]> = qs.iter().map(Vec::as_slice).collect();
        let mut order: Vec<usize> = (0..qs.len()).collect();
        order.sort_by(|&a, &b| prefixes[a].cmp(prefixes[b]));
        assert_eq!(stem_lengths(&prefixes, &order, 1), vec![3, 3, 3, 1, 1]);
        assert_eq!(stem_lengths(&prefixes, &order, 0), vec![3, 3, 3, 1, 1]);
        // Short rows apart from long ones when a forward costs less than the padding.
        let lens = [1, 1, 2, 9, 9, 9];
        assert_eq!(partition(&lens, 3.0, |_| true), vec![0..3, 3..6]);
        assert_eq!(partition(&lens, 100.0, |_| true), vec![0..6]);
        assert_eq!(partition(&lens, 100.0, |r| r.len() <= 4), vec![0..3, 3..6]);
        assert_eq!(
            partition(&lens, 100.0, |r| r.len() <= 2),
            vec![0..2, 2..4, 4..6]
        );
        assert!(partition(&[], 1.0, |_| true).is_empty());
    }

    #[test]
    fn validation_names_the_relation() {
        let bad = FactSet {
            instructions: vec![],
            relations: vec![Relation {
                relation: "capital".into(),
                description: String::new(),
                templates: vec!["The capital of [X] is [Y]".into()],
                facts: vec![],
            }],
        };
        let err = bad.validate().expect_err("has [Y]").to_string();
        assert!(err.contains("capital"), "{err}");
    }
}
