//! Factual-recall mechanics (METHODS.md §9): the attribute rate — how many of the tokens the
//! subject's last position promotes at each layer (logit lens through `lm_head`) occur in a
//! description of the subject — and the extraction rate — how often the attention output, the
//! MLP output or the layer output at the last position already ranks the final prediction first.

use std::collections::HashSet;
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
    use std::collections::HashMap;
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

/// §9 for one model over `probes` (normally the known facts), in right-padded batches.
pub fn factual_recall(
    model: &Transformer,
    tokenizer: &Tokenizer,
    probes: &[RecallProbe],
    cfg: &RecallConfig,
    batch_size: usize,
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
    let idx: Vec<usize> = (0..probes.len()).collect();
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
        // Gather rows: per layer, [subject states; last-position attn, mlp, out] of each probe.
        let nb = batch.len();
        let mut subject_rows = Vec::with_capacity(n_layers * nb * dim);
        let mut last_rows = [Vec::new(), Vec::new(), Vec::new()];
        for l in 0..n_layers {
            let acts = [
                take(HookPoint::AttnOut(l))?,
                take(HookPoint::MlpOut(l))?,
                take(HookPoint::ResidPost(l))?,
            ];
            for (row, &i) in batch.iter().enumerate() {
                let (ids, s) = &encoded[i];
                let at = |t: usize| (row * width + t) * dim;
                subject_rows.extend_from_slice(&acts[2][at(*s)..at(*s) + dim]);
                for (m, a) in acts.iter().enumerate() {
                    last_rows[m].extend_from_slice(&a[at(ids.len() - 1)..at(ids.len() - 1) + dim]);
                }
            }
        }
        let rows = |v: Vec<f32>| Tensor::from_vec(v, (n_layers * nb, dim), &Device::Cpu);
        // Final prediction y*: the last layer's output through the final norm and lm_head.
        let (subject_proj, v) = project(model, &u, &rows(subject_rows)?, cfg.attribute_final_norm)?;
        let final_out = last_rows[2][(n_layers - 1) * nb * dim..].to_vec();
        let (final_logits, _) = project(
            model,
            &u,
            &Tensor::from_vec(final_out, (nb, dim), &Device::Cpu)?,
            true,
        )?;
        let mut proj = Vec::with_capacity(3);
        for m in last_rows {
            proj.push(project(model, &u, &rows(m)?, cfg.extraction_final_norm)?.0);
        }
        for (row, &i) in batch.iter().enumerate() {
            let p = &probes[i];
            let y_star = argmax(&final_logits[row * v..(row + 1) * v]);
            let r = if let Some(r) = relations.iter().position(|r| r.0 == p.relation) {
                r
            } else {
                relations.push((p.relation.clone(), vec![[0; 3]; n_layers], 0));
                relations.len() - 1
            };
            relations[r].2 += 1;
            for l in 0..n_layers {
                let at = (l * nb + row) * v;
                for (m, pm) in proj.iter().enumerate() {
                    if argmax(&pm[at..at + v]) == y_star {
                        relations[r].1[l][m] += 1;
                    }
                }
            }
            let Some(wiki) = &p.wiki else { continue };
            let wiki = wiki_set(tokenizer, wiki, &vocab)?;
            let mut rates = Vec::with_capacity(n_layers);
            for l in 0..n_layers {
                let row_proj = &subject_proj[(l * nb + row) * v..(l * nb + row + 1) * v];
                let top: Vec<String> = top_k_indices(v, cfg.top_raw, |t| row_proj[t])
                    .into_iter()
                    .filter_map(|t| vocab.get(t as usize).cloned().flatten())
                    .take(cfg.keep)
                    .collect();
                rates.push(attribute_rate(&top, &wiki));
            }
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
