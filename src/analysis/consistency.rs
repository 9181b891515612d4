//! Representation consistency under paraphrase (METHODS.md §7): per layer, the cosine distances
//! between pooled hidden states of paraphrase pairs and of non-paraphrase pairs, their means and
//! the relative difference `RD = (mean_N δ − mean_P δ) / mean_N δ`.
//!
//! Sentences are run in right-padded batches: with causal attention a token never sees the
//! padding after it, and RoPE positions start at 0 for every row, so each row's states equal its
//! unbatched forward (tested).

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ForwardOptions, HookPoint, Input, LogitsAt, Recorder, Tokenizer, Transformer};

/// How token states become one vector per sentence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Pooling {
    /// Mean over the non-special tokens (BOS and padding excluded) — the §7.2 default.
    #[default]
    Mean,
    /// The last token.
    Last,
}

/// Pooled per-layer representations `r(s) = pool(h^(l+1)(s))` (layer outputs, no final norm).
#[derive(Clone, Debug, PartialEq)]
pub struct Representations {
    /// Layers.
    pub layers: usize,
    /// Sentences.
    pub n: usize,
    /// Hidden size.
    pub dim: usize,
    /// `layers × n × dim`, row-major.
    pub data: Vec<f32>,
}

impl Representations {
    /// The vector of sentence `i` at layer `l`.
    pub fn get(&self, layer: usize, i: usize) -> &[f32] {
        let at = (layer * self.n + i) * self.dim;
        &self.data[at..at + self.dim]
    }
}

/// Token ids of each sentence with the tokenizer's own special tokens, and the first position
/// that is not a special token (1 after a BOS).
fn encode_all(tokenizer: &Tokenizer, sentences: &[String]) -> Result<Vec<(Vec<u32>, usize)>> {
    let bos = tokenizer.bos.as_ref().map(|(_, id)| *id);
    sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ids = tokenizer.encode(s, true)?;
            let start = usize::from(ids.first().is_some_and(|&id| Some(id) == bos));
            if ids.len() <= start {
                return Err(Error::invalid(
                    "sentence",
                    format!("sentence {} is empty", i + 1),
                ));
            }
            Ok((ids, start))
        })
        .collect()
}

/// Runs `sentences` through `model` in right-padded batches of `batch_size` (sorted by length
/// to waste little padding) and pools every layer's output. `progress` gets the fraction done;
/// breaking it cancels.
pub fn representations(
    model: &Transformer,
    tokenizer: &Tokenizer,
    sentences: &[String],
    pooling: Pooling,
    batch_size: usize,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<Representations> {
    let encoded = encode_all(tokenizer, sentences)?;
    let n_layers = model.layers.len();
    let dim = model.config().hidden_size;
    let max_len = model.config().max_position_embeddings;
    if let Some((i, (ids, _))) = encoded
        .iter()
        .enumerate()
        .find(|(_, (ids, _))| ids.len() > max_len)
    {
        return Err(Error::invalid(
            "sentence",
            format!(
                "sentence {} has {} tokens, more than the model's context of {max_len}",
                i + 1,
                ids.len()
            ),
        ));
    }
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| encoded[i].0.len());
    let mut data = vec![0f32; n_layers * encoded.len() * dim];
    let batch_size = batch_size.max(1);
    let pad = tokenizer.eos.as_ref().map_or(0, |(_, id)| *id);
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::None,
        use_lora: true,
    };
    let n_batches = order.len().div_ceil(batch_size);
    for (b, batch) in order.chunks(batch_size).enumerate() {
        let width = batch.iter().map(|&i| encoded[i].0.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(batch.len() * width);
        for &i in batch {
            let row = &encoded[i].0;
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad, width - row.len()));
        }
        let input = Tensor::from_vec(ids, (batch.len(), width), model.device())?;
        let mut rec = Recorder::new((0..n_layers).map(HookPoint::ResidPost));
        model.run(Input::Ids(&input), &opts, None, &mut rec)?;
        for l in 0..n_layers {
            let states = rec
                .get(HookPoint::ResidPost(l))?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (row, &i) in batch.iter().enumerate() {
                let (ids, start) = &encoded[i];
                let out =
                    &mut data[(l * encoded.len() + i) * dim..(l * encoded.len() + i + 1) * dim];
                let token =
                    |t: usize| &states[(row * width + t) * dim..(row * width + t + 1) * dim];
                match pooling {
                    Pooling::Last => out.copy_from_slice(token(ids.len() - 1)),
                    Pooling::Mean => {
                        let mut acc = vec![0f64; dim];
                        for t in *start..ids.len() {
                            for (a, &v) in acc.iter_mut().zip(token(t)) {
                                *a += f64::from(v);
                            }
                        }
                        let count = (ids.len() - start) as f64;
                        for (o, a) in out.iter_mut().zip(acc) {
                            *o = (a / count) as f32;
                        }
                    }
                }
            }
        }
        if progress((b + 1) as f32 / n_batches as f32).is_break() {
            return Err(Error::Cancelled);
        }
    }
    Ok(Representations {
        layers: n_layers,
        n: encoded.len(),
        dim,
        data,
    })
}

/// `δ(a, b) = 1 − cos(a, b)`; a zero vector gives distance 1 (cosine 0).
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let denom = (na * nb).sqrt();
    if denom == 0.0 {
        1.0
    } else {
        1.0 - dot / denom
    }
}

/// `RD = (mean_N − mean_P) / mean_N`; NaN when `mean_N = 0` (§7.2 step 4).
pub fn relative_difference(mean_para: f64, mean_non: f64) -> f64 {
    if mean_non == 0.0 || !mean_non.is_finite() {
        f64::NAN
    } else {
        (mean_non - mean_para) / mean_non
    }
}

/// A labelled sentence pair (MRPC style).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabeledPair {
    /// First sentence.
    pub sentence1: String,
    /// Second sentence.
    pub sentence2: String,
    /// Whether they are paraphrases.
    pub label: bool,
}

/// Parses pairs from TSV (`sentence1<TAB>sentence2<TAB>label`, optional header) or JSONL
/// (`{"sentence1", "sentence2", "label"}`), told apart by the first non-blank character.
/// Errors carry the 1-based line.
pub fn parse_pairs(text: &str) -> std::result::Result<Vec<LabeledPair>, (usize, String)> {
    let jsonl = text.trim_start().starts_with('{');
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let pair = if jsonl {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| (n + 1, crate::error::json_message(&e)))?;
            let text = |key: &str| {
                value
                    .get(key)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
                    .ok_or((n + 1, format!("missing text field `{key}`")))
            };
            let label = match value.get("label") {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::Number(x)) if x.as_u64() == Some(1) => true,
                Some(serde_json::Value::Number(x)) if x.as_u64() == Some(0) => false,
                Some(serde_json::Value::String(s)) if s == "1" || s == "0" => s == "1",
                _ => return Err((n + 1, "field `label` must be 0 or 1".to_owned())),
            };
            LabeledPair {
                sentence1: text("sentence1")?,
                sentence2: text("sentence2")?,
                label,
            }
        } else {
            let fields: Vec<&str> = line.split('\t').collect();
            if n == 0 && fields.get(2).is_some_and(|f| f.trim() == "label") {
                continue; // header
            }
            let [s1, s2, label] = fields.as_slice() else {
                return Err((
                    n + 1,
                    format!("expected 3 tab-separated fields, found {}", fields.len()),
                ));
            };
            let label = match label.trim() {
                "1" => true,
                "0" => false,
                other => return Err((n + 1, format!("label `{other}` is not 0 or 1"))),
            };
            LabeledPair {
                sentence1: (*s1).to_owned(),
                sentence2: (*s2).to_owned(),
                label,
            }
        };
        if pair.sentence1.trim().is_empty() || pair.sentence2.trim().is_empty() {
            return Err((n + 1, "empty sentence".to_owned()));
        }
        pairs.push(pair);
    }
    if !pairs.iter().any(|p| p.label) || pairs.iter().all(|p| p.label) {
        return Err((
            0,
            "need both paraphrase (1) and non-paraphrase (0) pairs".to_owned(),
        ));
    }
    Ok(pairs)
}

/// §7 at one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerConsistency {
    /// 0-based layer.
    pub layer: usize,
    /// `δ` of each paraphrase pair.
    pub para: Vec<f32>,
    /// `δ` of each non-paraphrase pair.
    pub non: Vec<f32>,
    /// Mean paraphrase distance.
    pub mean_para: f64,
    /// Mean non-paraphrase distance.
    pub mean_non: f64,
    /// Relative difference (NaN when undefined).
    pub rd: f64,
}

/// §7 for one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyResult {
    /// Pooling used.
    pub pooling: Pooling,
    /// Pairs (paraphrase, non-paraphrase).
    pub counts: (usize, usize),
    /// Per layer.
    pub layers: Vec<LayerConsistency>,
}

/// Unique sentences of `pairs` and each pair's indices into them.
pub fn unique_sentences(pairs: &[LabeledPair]) -> (Vec<String>, Vec<(usize, usize)>) {
    let mut index = std::collections::HashMap::new();
    let mut sentences = Vec::new();
    let mut at = |s: &str| -> usize {
        *index.entry(s.to_owned()).or_insert_with(|| {
            sentences.push(s.to_owned());
            sentences.len() - 1
        })
    };
    let idx = pairs
        .iter()
        .map(|p| (at(&p.sentence1), at(&p.sentence2)))
        .collect();
    (sentences, idx)
}

/// Distances and RD per layer from representations of the pairs' sentences.
pub fn pair_consistency(
    reps: &Representations,
    pairs: &[LabeledPair],
    idx: &[(usize, usize)],
    pooling: Pooling,
) -> ConsistencyResult {
    let layers = (0..reps.layers)
        .map(|l| {
            let (mut para, mut non) = (Vec::new(), Vec::new());
            for (p, &(a, b)) in pairs.iter().zip(idx) {
                let d = cosine_distance(reps.get(l, a), reps.get(l, b)) as f32;
                if p.label {
                    para.push(d);
                } else {
                    non.push(d);
                }
            }
            let mean =
                |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64;
            let (mean_para, mean_non) = (mean(&para), mean(&non));
            LayerConsistency {
                layer: l,
                rd: relative_difference(mean_para, mean_non),
                para,
                non,
                mean_para,
                mean_non,
            }
        })
        .collect();
    let n_para = pairs.iter().filter(|p| p.label).count();
    ConsistencyResult {
        pooling,
        counts: (n_para, pairs.len() - n_para),
        layers,
    }
}

/// §7 end to end for one model.
pub fn representation_consistency(
    model: &Transformer,
    tokenizer: &Tokenizer,
    pairs: &[LabeledPair],
    pooling: Pooling,
    batch_size: usize,
    progress: &mut dyn FnMut(f32) -> ControlFlow<()>,
) -> Result<ConsistencyResult> {
    let (sentences, idx) = unique_sentences(pairs);
    let reps = representations(model, tokenizer, &sentences, pooling, batch_size, progress)?;
    Ok(pair_consistency(&reps, pairs, &idx, pooling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    fn sentences() -> Vec<String> {
        [
            "the cat sat on the mat",
            "a dog",
            "translate this text to french",
            "the red house",
            "why",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn batched_and_unbatched_representations_agree() -> Result<()> {
        let m = tiny_model(4, &tiny_options(DType::F32))?;
        for pooling in [Pooling::Mean, Pooling::Last] {
            let one = representations(
                &m.model,
                &m.tokenizer,
                &sentences(),
                pooling,
                1,
                &mut |_| ControlFlow::Continue(()),
            )?;
            let many = representations(
                &m.model,
                &m.tokenizer,
                &sentences(),
                pooling,
                4,
                &mut |_| ControlFlow::Continue(()),
            )?;
            let max = one
                .data
                .iter()
                .zip(&many.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "{pooling:?}: {max}");
        }
        Ok(())
    }

    #[test]
    fn identical_sentences_have_zero_distance_and_identical_models_equal_rd() -> Result<()> {
        let m = tiny_model(5, &tiny_options(DType::F32))?;
        let pairs = vec![
            LabeledPair {
                sentence1: "the cat sat".into(),
                sentence2: "the cat sat".into(),
                label: true,
            },
            LabeledPair {
                sentence1: "a red book".into(),
                sentence2: "a blue book".into(),
                label: true,
            },
            LabeledPair {
                sentence1: "the cat sat".into(),
                sentence2: "why is the sea cold".into(),
                label: false,
            },
        ];
        let a = representation_consistency(
            &m.model,
            &m.tokenizer,
            &pairs,
            Pooling::Mean,
            2,
            &mut |_| ControlFlow::Continue(()),
        )?;
        let b = representation_consistency(
            &m.model,
            &m.tokenizer,
            &pairs,
            Pooling::Mean,
            3,
            &mut |_| ControlFlow::Continue(()),
        )?;
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            assert!(
                la.para[0].abs() < 1e-6,
                "identical sentences: δ = {}",
                la.para[0]
            );
            assert!((la.rd - lb.rd).abs() < 1e-6, "same model, RD difference 0");
        }
        assert_eq!(a.counts, (2, 1));
        Ok(())
    }

    #[test]
    fn rd_follows_its_definition() {
        assert!((relative_difference(0.2, 0.5) - 0.6).abs() < 1e-12);
        assert!(
            relative_difference(0.0, 0.0).is_nan(),
            "an input-blind encoder gives 0/0"
        );
        assert!(cosine_distance(&[1.0, 0.0], &[1.0, 0.0]).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 2.0]) - 1.0).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[-1.0, 0.0]) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn pairs_parse_from_tsv_and_jsonl_with_line_numbers() {
        let tsv = "sentence1\tsentence2\tlabel\na b\tb a\t1\nc d\te f\t0\n";
        assert_eq!(parse_pairs(tsv).map(|p| p.len()), Ok(2));
        let jsonl = "{\"sentence1\":\"a\",\"sentence2\":\"b\",\"label\":1}\n{\"sentence1\":\"c\",\"sentence2\":\"d\",\"label\":false}\n";
        assert_eq!(parse_pairs(jsonl).map(|p| p.len()), Ok(2));
        assert_eq!(
            parse_pairs("a\tb\t1\nc\td\tmaybe\n").map_err(|e| e.0),
            Err(2)
        );
        assert_eq!(parse_pairs("a\tb\n").map_err(|e| e.0), Err(1));
        assert_eq!(
            parse_pairs("a\tb\t1\n").map_err(|e| e.0),
            Err(0),
            "needs both labels"
        );
        assert_eq!(
            parse_pairs("{\"sentence1\":\"a\",\"label\":1}\n").map_err(|e| e.0),
            Err(1)
        );
    }
}
