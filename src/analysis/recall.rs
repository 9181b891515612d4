//! Factual-recall mechanics (METHODS.md §9): the attribute rate — how many of the tokens the
//! subject's last position promotes at each layer (logit lens through `lm_head`) occur in a
//! description of the subject — and the extraction rate — how often the attention output, the
//! MLP output or the layer output at the last position already ranks the final prediction first.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::analysis::words::top_k_indices;
use crate::error::{Error, Result};
use crate::model::blas::blas_linear;
use crate::model::{ForwardOptions, HookPoint, Input, LogitsAt, Recorder, Tokenizer, Transformer};

/// NLTK's English stopwords (the 179 words of nltk_data `corpora/stopwords/english`), used by
/// the §9.2 cleaning rules.
pub const STOPWORDS: &[&str] = &[
    "i",
    "me",
    "my",
    "myself",
    "we",
    "our",
    "ours",
    "ourselves",
    "you",
    "you're",
    "you've",
    "you'll",
    "you'd",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "he",
    "him",
    "his",
    "himself",
    "she",
    "she's",
    "her",
    "hers",
    "herself",
    "it",
    "it's",
    "its",
    "itself",
    "they",
    "them",
    "their",
    "theirs",
    "themselves",
    "what",
    "which",
    "who",
    "whom",
    "this",
    "that",
    "that'll",
    "these",
    "those",
    "am",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "having",
    "do",
    "does",
    "did",
    "doing",
    "a",
    "an",
    "the",
    "and",
    "but",
    "if",
    "or",
    "because",
    "as",
    "until",
    "while",
    "of",
    "at",
    "by",
    "for",
    "with",
    "about",
    "against",
    "between",
    "into",
    "through",
    "during",
    "before",
    "after",
    "above",
    "below",
    "to",
    "from",
    "up",
    "down",
    "in",
    "out",
    "on",
    "off",
    "over",
    "under",
    "again",
    "further",
    "then",
    "once",
    "here",
    "there",
    "when",
    "where",
    "why",
    "how",
    "all",
    "any",
    "both",
    "each",
    "few",
    "more",
    "most",
    "other",
    "some",
    "such",
    "no",
    "nor",
    "not",
    "only",
    "own",
    "same",
    "so",
    "than",
    "too",
    "very",
    "s",
    "t",
    "can",
    "will",
    "just",
    "don",
    "don't",
    "should",
    "should've",
    "now",
    "d",
    "ll",
    "m",
    "o",
    "re",
    "ve",
    "y",
    "ain",
    "aren",
    "aren't",
    "couldn",
    "couldn't",
    "didn",
    "didn't",
    "doesn",
    "doesn't",
    "hadn",
    "hadn't",
    "hasn",
    "hasn't",
    "haven",
    "haven't",
    "isn",
    "isn't",
    "ma",
    "mightn",
    "mightn't",
    "mustn",
    "mustn't",
    "needn",
    "needn't",
    "shan",
    "shan't",
    "shouldn",
    "shouldn't",
    "wasn",
    "wasn't",
    "weren",
    "weren't",
    "won",
    "won't",
    "wouldn",
    "wouldn't",
];

/// Settings of §9.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecallConfig {
    /// Raw top tokens taken before cleaning (500; the transformer_lens port takes 50).
    pub top_raw: usize,
    /// Cleaned tokens kept (50).
    pub keep: usize,
    /// Apply the final RMSNorm before projecting for the attribute rate.
    pub attribute_final_norm: bool,
    /// Apply the final RMSNorm before projecting for the extraction rate (`--apply_layer_norm`).
    pub extraction_final_norm: bool,
}

impl Default for RecallConfig {
    fn default() -> Self {
        Self {
            top_raw: 500,
            keep: 50,
            attribute_final_norm: false,
            extraction_final_norm: false,
        }
    }
}

/// One factual prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecallProbe {
    /// Relation id (rates are averaged per relation, then across relations).
    pub relation: String,
    /// The query, ending where the answer follows.
    pub query: String,
    /// Byte range of the subject in the query.
    pub subject: (usize, usize),
    /// A description of the subject (the "wiki" text), if any.
    pub wiki: Option<String>,
}

/// The §9.2 cleaning of decoded tokens: whitespace and `▁` stripped; stopwords (lower-cased)
/// and strings of at most 2 characters dropped (`None`).
pub fn clean_token<S: std::hash::BuildHasher>(
    decoded: &str,
    stop: &HashSet<&str, S>,
) -> Option<String> {
    let t = decoded.trim().trim_matches('\u{2581}').trim();
    if t.chars().count() <= 2 || stop.contains(t.to_lowercase().as_str()) {
        None
    } else {
        Some(t.to_owned())
    }
}

/// The cleaned token set of a description (§9.2 step 4).
pub fn wiki_set(
    tokenizer: &Tokenizer,
    text: &str,
    vocab: &[Option<String>],
) -> Result<HashSet<String>> {
    let ids = tokenizer.encode(text, false)?;
    Ok(ids
        .iter()
        .filter_map(|&id| vocab.get(id as usize).cloned().flatten())
        .collect())
}

/// `AR = 100 · |top ∩ wiki| / |top|`; `None` when the cleaned list is empty.
pub fn attribute_rate<S: std::hash::BuildHasher>(
    top: &[String],
    wiki: &HashSet<String, S>,
) -> Option<f64> {
    if top.is_empty() {
        return None;
    }
    let hits = top.iter().filter(|t| wiki.contains(*t)).count();
    Some(100.0 * hits as f64 / top.len() as f64)
}

/// §9 per layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecallResult {
    /// Settings.
    pub config: RecallConfig,
    /// Probes given.
    pub probes: usize,
    /// Attribute rate per layer (mean over probes with a description), percent.
    pub attribute_rate: Vec<f64>,
    /// Probes that entered the attribute rate.
    pub attribute_probes: usize,
    /// Extraction rate of the attention output per layer, percent (per relation, then averaged).
    pub extraction_attn: Vec<f64>,
    /// Extraction rate of the MLP output per layer, percent.
    pub extraction_mlp: Vec<f64>,
    /// Extraction rate of the layer output per layer, percent.
    pub extraction_out: Vec<f64>,
}

/// Decoded, cleaned vocabulary (`None` for dropped tokens), computed once per tokenizer and
/// vocabulary size in a process (decoding every id took a noticeable part of a §9 run).
pub fn clean_vocab(
    tokenizer: &Tokenizer,
    vocab_size: usize,
) -> Result<std::sync::Arc<Vec<Option<String>>>> {
    use std::hash::{Hash, Hasher};
    use std::sync::{Arc, Mutex, OnceLock};
    type Vocab = Arc<Vec<Option<String>>>;
    static CACHE: OnceLock<Mutex<HashMap<u64, Vocab>>> = OnceLock::new();
    // The key: every vocabulary entry (sorted by id) and the size asked for.
    let mut entries: Vec<(u32, String)> = tokenizer
        .inner()
        .get_vocab(true)
        .into_iter()
        .map(|(token, id)| (id, token))
        .collect();
    entries.sort_unstable();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    entries.hash(&mut hasher);
    vocab_size.hash(&mut hasher);
    let key = hasher.finish();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(hit) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(hit);
    }
    let stop: HashSet<&str> = STOPWORDS.iter().copied().collect();
    let vocab: Vec<Option<String>> = (0..vocab_size as u32)
        .map(|id| Ok(clean_token(&tokenizer.decode(&[id], false)?, &stop)))
        .collect::<Result<_>>()?;
    let vocab = Arc::new(vocab);
    if let Ok(mut c) = cache.lock() {
        c.insert(key, vocab.clone());
    }
    Ok(vocab)
}

/// `x / sqrt(mean(x²) + eps) ⊙ g` of the model's final norm, rows of `x` `(n, d)`.
fn final_norm(model: &Transformer, x: &Tensor) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + model.norm.eps)?
        .sqrt()?
        .recip()?;
    let g = model
        .norm
        .weight
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(&g.unsqueeze(0)?)?)
}

/// `U x` for rows `x` `(n, d)` on the CPU, as `(n, V)` values; `u` is the unembedding `(V, d)`
/// (with any adapter merged), in f32 on the CPU.
fn project(model: &Transformer, u: &Tensor, x: &Tensor, norm: bool) -> Result<(Vec<f32>, usize)> {
    let x = if norm {
        final_norm(model, x)?
    } else {
        x.clone()
    };
    let proj = match blas_linear(&x, u)? {
        Some(p) => p,
        None => x.matmul(&u.t()?)?,
    };
    let vocab = proj.dim(1)?;
    Ok((proj.flatten_all()?.to_vec1::<f32>()?, vocab))
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// How the extraction events (`argmax U·o == y*`, §9.3) are decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExtractionCheck {
    /// Screen first: project the rows on a few hundred sampled tokens (the batch's final
    /// top tokens and an even sample of the vocabulary). A row where a sampled token beats `y*`
    /// by more than [`SCREEN_MARGIN`] has no event; only the other rows get the full
    /// vocabulary projection. The default: most events are "no" (`y*` ranks far down at most
    /// layers), and the margin is far above the rounding of the two products, so the events
    /// are those of [`ExtractionCheck::Full`] (tested).
    #[default]
    Screened,
    /// Every row projected on the whole vocabulary (the reference).
    Full,
}

/// A sampled token decides "no event" only when its logit exceeds `y*`'s by more than this,
/// relative to the larger magnitude (at least 1): f32 products of a few thousand terms round
/// at about 1e-6 of that.
pub const SCREEN_MARGIN: f32 = 1e-4;

/// Tokens of the even vocabulary sample used to screen extraction rows.
const SCREEN_SAMPLE: usize = 256;

/// Final top tokens of each probe added to the screening sample.
const SCREEN_TOP: usize = 16;

/// Extraction events of rows `x` `(n, d)`: `argmax U x_r == want[r]`. `sample` holds token
/// ids to screen with (it must hold every `want`), or is empty for the full projection of
/// every row. Returns the events and the number of rows the screen decided.
fn extraction_events(
    model: &Transformer,
    u: &Tensor,
    x: &Tensor,
    want: &[u32],
    sample: &[u32],
    norm: bool,
) -> Result<(Vec<bool>, usize)> {
    let x = if norm {
        final_norm(model, x)?
    } else {
        x.clone()
    };
    let n = want.len();
    let mut undecided: Vec<usize> = (0..n).collect();
    let mut events = vec![false; n];
    if !sample.is_empty() {
        let ids = Tensor::new(sample, &Device::Cpu)?;
        let (p, k) = project(model, &u.index_select(&ids, 0)?, &x, false)?;
        undecided.retain(|&r| {
            let row = &p[r * k..(r + 1) * k];
            let Ok(at) = sample.binary_search(&want[r]) else {
                return true;
            };
            let t = row[at];
            let beaten = row
                .iter()
                .any(|&v| v - t > SCREEN_MARGIN * v.abs().max(t.abs()).max(1.0));
            !beaten
        });
    }
    let screened = n - undecided.len();
    if !undecided.is_empty() {
        let rows = Tensor::new(
            undecided.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let (p, v) = project(model, u, &x.index_select(&rows, 0)?, false)?;
        for (i, &r) in undecided.iter().enumerate() {
            events[r] = argmax(&p[i * v..(i + 1) * v]) == want[r] as usize;
        }
    }
    Ok((events, screened))
}

/// §9 for one model over `probes` (normally the known facts), in right-padded batches, with
/// the screened extraction check.
pub fn factual_recall(
    model: &Transformer,
    tokenizer: &Tokenizer,
    probes: &[RecallProbe],
    cfg: &RecallConfig,
    batch_size: usize,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<RecallResult> {
    factual_recall_with(
        model,
        tokenizer,
        probes,
        cfg,
        batch_size,
        ExtractionCheck::default(),
        progress,
    )
}

/// [`factual_recall`] with a chosen extraction check. The subject's states are projected once
/// per distinct token prefix (templates that open with the subject share them) and only for
/// probes with a description (the others never enter the attribute rate).
pub fn factual_recall_with(
    model: &Transformer,
    tokenizer: &Tokenizer,
    probes: &[RecallProbe],
    cfg: &RecallConfig,
    batch_size: usize,
    check: ExtractionCheck,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<RecallResult> {
    let n_layers = model.layers.len();
    let dim = model.config().hidden_size;
    let vocab_size = model.lm_head.weight.rows();
    let vocab = clean_vocab(tokenizer, vocab_size)?;
    let u = model
        .lm_head
        .effective_weight()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    // Per probe: ids and the last subject token (by character offsets, so the subject is found
    // as the prompt tokenized it, §9.5).
    let mut encoded = Vec::with_capacity(probes.len());
    for (i, p) in probes.iter().enumerate() {
        let enc = tokenizer
            .inner()
            .encode(p.query.as_str(), true)
            .map_err(|e| Error::Tokenizer(format!("probe {}: {e}", i + 1)))?;
        let ids = enc.get_ids().to_vec();
        let subject_last = enc
            .get_offsets()
            .iter()
            .rposition(|&(start, end)| end > start && start < p.subject.1)
            .ok_or_else(|| {
                Error::invalid(
                    "probe",
                    format!("probe {}: subject not found in `{}`", i + 1, p.query),
                )
            })?;
        if ids.is_empty() {
            return Err(Error::invalid("probe", format!("probe {} is empty", i + 1)));
        }
        encoded.push((ids, subject_last));
    }
    let mut ar_sum = vec![0f64; n_layers];
    let mut ar_n = 0usize;
    // The cleaned top tokens per layer of each subject prefix (the ids up to the last subject
    // token): the state there depends on nothing after it.
    let mut tops: HashMap<Vec<u32>, Vec<Vec<String>>> = HashMap::new();
    // The cleaned token set of each description (a subject's templates share it).
    let mut wikis: HashMap<&str, HashSet<String>> = HashMap::new();
    // Extraction events per relation: (relation, [attn, mlp, out] per layer counts, probes).
    let mut relations: Vec<(String, Vec<[usize; 3]>, usize)> = Vec::new();
    let pad = tokenizer.eos.as_ref().map_or(0, |(_, id)| *id);
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::None,
        use_lora: true,
    };
    let batch_size = batch_size.max(1);
    let n_batches = probes.len().div_ceil(batch_size);
    // Probes of equal token length together, so the right-padding costs little.
    let mut idx: Vec<usize> = (0..probes.len()).collect();
    idx.sort_by_key(|&i| encoded[i].0.len());
    for (b, batch) in idx.chunks(batch_size).enumerate() {
        let width = batch.iter().map(|&i| encoded[i].0.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(batch.len() * width);
        for &i in batch {
            ids.extend_from_slice(&encoded[i].0);
            ids.extend(std::iter::repeat_n(pad, width - encoded[i].0.len()));
        }
        let input = Tensor::from_vec(ids, (batch.len(), width), model.device())?;
        let points: Vec<HookPoint> = (0..n_layers)
            .flat_map(|l| {
                [
                    HookPoint::AttnOut(l),
                    HookPoint::MlpOut(l),
                    HookPoint::ResidPost(l),
                ]
            })
            .collect();
        let mut rec = Recorder::new(points);
        model.run(Input::Ids(&input), &opts, None, &mut rec)?;
        let take = |point: HookPoint| -> Result<Vec<f32>> {
            Ok(rec
                .get(point)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        // Gather rows: per layer, [subject states of new prefixes; last-position attn, mlp,
        // out] of each probe.
        let nb = batch.len();
        let mut fresh: Vec<(usize, Vec<u32>)> = Vec::new();
        for (row, &i) in batch.iter().enumerate() {
            let (ids, s) = &encoded[i];
            let key = ids[..=*s].to_vec();
            if probes[i].wiki.is_some()
                && !tops.contains_key(&key)
                && !fresh.iter().any(|f| f.1 == key)
            {
                fresh.push((row, key));
            }
        }
        let nf = fresh.len();
        let mut subject_rows = Vec::with_capacity(n_layers * nf * dim);
        let mut last_rows = [Vec::new(), Vec::new(), Vec::new()];
        for l in 0..n_layers {
            let acts = [
                take(HookPoint::AttnOut(l))?,
                take(HookPoint::MlpOut(l))?,
                take(HookPoint::ResidPost(l))?,
            ];
            let at = |row: usize, t: usize| (row * width + t) * dim;
            for (row, key) in &fresh {
                let s = key.len() - 1;
                subject_rows.extend_from_slice(&acts[2][at(*row, s)..at(*row, s) + dim]);
            }
            for (row, &i) in batch.iter().enumerate() {
                let last = encoded[i].0.len() - 1;
                for (m, a) in acts.iter().enumerate() {
                    last_rows[m].extend_from_slice(&a[at(row, last)..at(row, last) + dim]);
                }
            }
        }
        let rows = |v: Vec<f32>, n: usize| Tensor::from_vec(v, (n, dim), &Device::Cpu);
        // The cleaned top tokens of each new prefix, per layer.
        if nf > 0 {
            let (subject_proj, v) = project(
                model,
                &u,
                &rows(subject_rows, n_layers * nf)?,
                cfg.attribute_final_norm,
            )?;
            for (f, (_, key)) in fresh.into_iter().enumerate() {
                let per_layer = (0..n_layers)
                    .map(|l| {
                        let row_proj = &subject_proj[(l * nf + f) * v..(l * nf + f + 1) * v];
                        top_k_indices(v, cfg.top_raw, |t| row_proj[t])
                            .into_iter()
                            .filter_map(|t| vocab.get(t as usize).cloned().flatten())
                            .take(cfg.keep)
                            .collect()
                    })
                    .collect();
                tops.insert(key, per_layer);
            }
        }
        // Final prediction y*: the last layer's output through the final norm and lm_head.
        let final_out = last_rows[2][(n_layers - 1) * nb * dim..].to_vec();
        let (final_logits, v) = project(model, &u, &rows(final_out, nb)?, true)?;
        let y_star: Vec<u32> = (0..nb)
            .map(|row| argmax(&final_logits[row * v..(row + 1) * v]) as u32)
            .collect();
        let sample = match check {
            ExtractionCheck::Full => Vec::new(),
            ExtractionCheck::Screened => {
                let mut sample: Vec<u32> = (0..v)
                    .step_by(v.div_ceil(SCREEN_SAMPLE).max(1))
                    .map(|t| t as u32)
                    .collect();
                for row in 0..nb {
                    let logits = &final_logits[row * v..(row + 1) * v];
                    sample.extend(top_k_indices(v, SCREEN_TOP, |t| logits[t]));
                }
                sample.extend(&y_star);
                sample.sort_unstable();
                sample.dedup();
                sample
            }
        };
        let want: Vec<u32> = (0..n_layers).flat_map(|_| y_star.iter().copied()).collect();
        let mut events = Vec::with_capacity(3);
        for m in last_rows {
            let (e, _) = extraction_events(
                model,
                &u,
                &rows(m, n_layers * nb)?,
                &want,
                &sample,
                cfg.extraction_final_norm,
            )?;
            events.push(e);
        }
        for (row, &i) in batch.iter().enumerate() {
            let p = &probes[i];
            let r = if let Some(r) = relations.iter().position(|r| r.0 == p.relation) {
                r
            } else {
                relations.push((p.relation.clone(), vec![[0; 3]; n_layers], 0));
                relations.len() - 1
            };
            relations[r].2 += 1;
            for l in 0..n_layers {
                for (m, e) in events.iter().enumerate() {
                    if e[l * nb + row] {
                        relations[r].1[l][m] += 1;
                    }
                }
            }
            let Some(text) = &p.wiki else { continue };
            let wiki = match wikis.entry(text.as_str()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(wiki_set(tokenizer, text, &vocab)?),
            };
            let (ids, s) = &encoded[i];
            let Some(top) = tops.get(&ids[..=*s]) else {
                continue;
            };
            let rates: Vec<Option<f64>> = top.iter().map(|t| attribute_rate(t, wiki)).collect();
            if rates.iter().all(Option::is_some) {
                for (sum, r) in ar_sum.iter_mut().zip(rates) {
                    *sum += r.unwrap_or(0.0);
                }
                ar_n += 1;
            }
        }
        if progress((b + 1) as f32 / n_batches.max(1) as f32).is_break() {
            return Err(Error::Cancelled);
        }
    }
    let extraction = |m: usize| -> Vec<f64> {
        (0..n_layers)
            .map(|l| {
                let per_rel: Vec<f64> = relations
                    .iter()
                    .filter(|r| r.2 > 0)
                    .map(|r| 100.0 * r.1[l][m] as f64 / r.2 as f64)
                    .collect();
                per_rel.iter().sum::<f64>() / per_rel.len().max(1) as f64
            })
            .collect()
    };
    Ok(RecallResult {
        config: cfg.clone(),
        probes: probes.len(),
        attribute_rate: ar_sum
            .iter()
            .map(|s| if ar_n == 0 { -1.0 } else { s / ar_n as f64 })
            .collect(),
        attribute_probes: ar_n,
        extraction_attn: extraction(0),
        extraction_mlp: extraction(1),
        extraction_out: extraction(2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    fn probes() -> Vec<RecallProbe> {
        let make = |q: &str, subject: &str, wiki: Option<&str>| {
            let start = q.find(subject).unwrap_or(0);
            RecallProbe {
                relation: "r".into(),
                query: q.into(),
                subject: (start, start + subject.len()),
                wiki: wiki.map(str::to_owned),
            }
        };
        vec![
            make(
                "the capital of france is",
                "france",
                Some("paris is the capital city of france"),
            ),
            make("the cat sat on the", "cat", None),
            make("the river in paris is", "paris", Some("the city of paris")),
        ]
    }

    #[test]
    fn stopwords_are_nltks() {
        assert_eq!(STOPWORDS.len(), 179);
        let unique: HashSet<_> = STOPWORDS.iter().collect();
        assert_eq!(unique.len(), 179);
    }

    #[test]
    fn extraction_of_the_last_layer_output_with_the_final_norm_is_total() -> Result<()> {
        let m = tiny_model(8, &tiny_options(DType::F32))?;
        let cfg = RecallConfig {
            extraction_final_norm: true,
            ..RecallConfig::default()
        };
        let r = factual_recall(&m.model, &m.tokenizer, &probes(), &cfg, 2, &mut |_| {
            ControlFlow::Continue(())
        })?;
        let last = r.extraction_out.len() - 1;
        assert!(
            (r.extraction_out[last] - 100.0).abs() < 1e-9,
            "{:?}",
            r.extraction_out
        );
        assert_eq!(r.attribute_rate.len(), 3);
        // Batched and one-by-one agree.
        let one = factual_recall(&m.model, &m.tokenizer, &probes(), &cfg, 1, &mut |_| {
            ControlFlow::Continue(())
        })?;
        assert_eq!(one.extraction_attn, r.extraction_attn);
        for (a, b) in one.attribute_rate.iter().zip(&r.attribute_rate) {
            assert!((a - b).abs() < 1e-9);
        }
        Ok(())
    }

    #[test]
    fn screened_extraction_events_equal_the_full_projection() -> Result<()> {
        let m = tiny_model(8, &tiny_options(DType::F32))?;
        let u = m.model.lm_head.effective_weight()?.to_dtype(DType::F32)?;
        let (v, d) = u.dims2()?;
        // Rows whose wanted token is the argmax, rows where it ranks low, and near-ties.
        let x = Tensor::randn(0f32, 1.0, (40, d), &Device::Cpu)?;
        let (full, _) = project(&m.model, &u, &x, false)?;
        let want: Vec<u32> = (0..40)
            .map(|r| {
                let row = &full[r * v..(r + 1) * v];
                let order = top_k_indices(v, v, |t| row[t]);
                order[[0, 1, v / 2, v - 1][r % 4]]
            })
            .collect();
        let mut sample: Vec<u32> = (0..v as u32)
            .step_by(3)
            .chain(want.iter().copied())
            .collect();
        sample.sort_unstable();
        sample.dedup();
        for norm in [false, true] {
            let (reference, none) = extraction_events(&m.model, &u, &x, &want, &[], norm)?;
            let (screened, decided) = extraction_events(&m.model, &u, &x, &want, &sample, norm)?;
            assert_eq!(none, 0);
            assert_eq!(screened, reference);
            assert!(decided >= 10, "the screen decided {decided} of 40 rows");
            if !norm {
                assert_eq!(reference.iter().filter(|e| **e).count(), 10);
            }
        }
        // Whole runs: the screened check gives the reference's rates.
        for cfg in [
            RecallConfig::default(),
            RecallConfig {
                extraction_final_norm: true,
                ..RecallConfig::default()
            },
        ] {
            let run = |check| {
                factual_recall_with(
                    &m.model,
                    &m.tokenizer,
                    &probes(),
                    &cfg,
                    2,
                    check,
                    &mut |_| ControlFlow::Continue(()),
                )
            };
            assert_eq!(run(ExtractionCheck::Screened)?, run(ExtractionCheck::Full)?);
        }
        Ok(())
    }

    #[test]
    fn attribute_rate_is_100_when_the_description_holds_every_token() -> Result<()> {
        let m = tiny_model(8, &tiny_options(DType::F32))?;
        let vocab = clean_vocab(&m.tokenizer, 64)?;
        let all: HashSet<String> = vocab.iter().flatten().cloned().collect();
        let top: Vec<String> = vocab.iter().flatten().take(5).cloned().collect();
        assert_eq!(attribute_rate(&top, &all), Some(100.0));
        assert_eq!(attribute_rate(&[], &all), None);
        let stop: HashSet<&str> = STOPWORDS.iter().copied().collect();
        assert_eq!(clean_token(" The", &stop), None);
        assert_eq!(clean_token("\u{2581}ox", &stop), None);
        assert_eq!(clean_token(" Paris ", &stop).as_deref(), Some("Paris"));
        Ok(())
    }
}
