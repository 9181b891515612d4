//! Self-attention head word pairs (METHODS.md §3.2–§3.4): for each layer, head and query/key
//! dimension of the static QK circuit (RMSNorm gain folded in; RoPE, the 1/RMS scaling and any
//! q/k bias ignored), the word pairs that both strongly activate the dimension with same-signed
//! contributions and are semantically related beyond each word's own threshold.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::analysis::words::{self, Rows, WordList};
use crate::error::{Error, Result};
use crate::model::{Tokenizer, Transformer};

/// Settings of §3.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadsConfig {
    /// Words kept per dimension and side (`K = 100`).
    pub top_k: usize,
    /// The most frequent words the semantic thresholds compare against (3000).
    pub threshold_words: usize,
    /// `θ(w) = mean + z · std` (1.96).
    pub z: f64,
}

impl Default for HeadsConfig {
    fn default() -> Self {
        Self {
            top_k: 100,
            threshold_words: 3000,
            z: 1.96,
        }
    }
}

/// Where the semantic word vectors come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SemanticSource {
    /// A `word v1 v2 ...` table (GloVe format) the user opened, as §3.1 asks.
    WordVectors {
        /// The table's file name.
        name: String,
        /// Vector length.
        dim: usize,
        /// How many words of the list the table has (the rest get the zero vector).
        found: usize,
    },
    /// DEVIATION from §3.1: no table was given, so the model's own averaged input embeddings
    /// serve as the semantic vectors.
    ModelEmbeddings,
}

impl SemanticSource {
    /// One line for figures and tables.
    pub fn label(&self) -> String {
        match self {
            Self::WordVectors { name, dim, found } => {
                format!("semantic vectors: {name} ({dim}-d, {found} words found)")
            }
            Self::ModelEmbeddings => {
                "semantic vectors: the model's own input embeddings (deviation: no GloVe table given)"
                    .to_owned()
            }
        }
    }
}

/// Unit semantic vectors `ĝ` of the word list and each word's threshold `θ(w)` (§3.3 step 4).
#[derive(Clone, Debug)]
pub struct SemanticSpace {
    /// `ĝ`, `(|W|, D)`; zero rows for words without a vector.
    pub unit: Rows,
    /// `θ(w)` per word.
    pub theta: Vec<f32>,
    /// Provenance.
    pub source: SemanticSource,
}

/// Builds `ĝ` and `θ` from raw vectors: `θ(w) = mean_b ĝ_w·ĝ_b + z · std_b ĝ_w·ĝ_b` over the
/// first `threshold_words` words `b` (population std; `b` may be `w`).
pub fn semantic_space(
    vectors: Rows,
    cfg: &HeadsConfig,
    source: SemanticSource,
) -> Result<SemanticSpace> {
    let unit = vectors.normalized();
    let n_base = cfg.threshold_words.min(unit.n);
    if n_base == 0 || unit.dim == 0 {
        return Err(Error::invalid(
            "semantic vectors",
            "no words or zero-length vectors",
        ));
    }
    let all = unit.to_tensor()?;
    let base_t = all.narrow(0, 0, n_base)?.t()?.contiguous()?;
    let mut theta = Vec::with_capacity(unit.n);
    let chunk = 2048;
    let mut start = 0;
    while start < unit.n {
        let len = chunk.min(unit.n - start);
        let cos = all
            .narrow(0, start, len)?
            .matmul(&base_t)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for row in cos.chunks_exact(n_base) {
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n_base as f64;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n_base as f64;
            theta.push((mean + cfg.z * var.sqrt()) as f32);
        }
        start += len;
    }
    Ok(SemanticSpace {
        unit,
        theta,
        source,
    })
}

/// The semantic space from the model's own averaged input embeddings (the labelled fallback).
pub fn model_semantic_space(
    model: &Transformer,
    tokenizer: &Tokenizer,
    words: &WordList,
    cfg: &HeadsConfig,
) -> Result<SemanticSpace> {
    let ids = words::word_token_ids(tokenizer, &words.words)?;
    let e_i = words::mean_token_rows(&model.embed_tokens, &ids)?;
    semantic_space(e_i, cfg, SemanticSource::ModelEmbeddings)
}

/// One word pair: `"<key word>=<query word>"` and their semantic cosine.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WordPair {
    /// Key-side word (index into the word list).
    pub key: u32,
    /// Query-side word.
    pub query: u32,
    /// `ĝ_query · ĝ_key`.
    pub sim: f32,
}

/// The pairs of one ranked dimension of one head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DimPairs {
    /// Head.
    pub head: usize,
    /// The dimension within the head (`I[r−1]`).
    pub dim: usize,
    /// 1-based energy rank `r`.
    pub rank: usize,
    /// The energy `N[I[r−1]]`.
    pub energy: f32,
    /// Kept pairs, most similar first.
    pub pairs: Vec<WordPair>,
}

/// §3 for one layer: every head's dimensions, head-major, by rank within a head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerHeads {
    /// 0-based layer.
    pub layer: usize,
    /// Number of heads.
    pub heads: usize,
    /// `heads × d_h` entries.
    pub dims: Vec<DimPairs>,
}

impl LayerHeads {
    /// The dimensions of one head, by rank.
    pub fn head(&self, head: usize) -> impl Iterator<Item = &DimPairs> {
        self.dims.iter().filter(move |d| d.head == head)
    }
}

/// §3 for a whole model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadPairs {
    /// The word list the pairs index.
    pub words: Vec<String>,
    /// Heads per layer.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Settings.
    pub config: HeadsConfig,
    /// Provenance of the semantic vectors.
    pub source: SemanticSource,
    /// Per layer, in layer order.
    pub layers: Vec<LayerHeads>,
}

impl HeadPairs {
    /// `"key=query"` of a pair.
    pub fn pair_text(&self, pair: &WordPair) -> String {
        let word = |i: u32| self.words.get(i as usize).map_or("?", String::as_str);
        format!("{}={}", word(pair.key), word(pair.query))
    }
}

/// `W ⊙ g[None, :]` for a projection `W` `(out, d)`: the RMSNorm gain folded into its inputs
/// (§3.2: `(Wᵀ ⊙ g[:, None])ᵀ`).
fn fold_gain(weight: &Tensor, gain: &Tensor) -> Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let g = gain
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .unsqueeze(0)?;
    Ok(w.broadcast_mul(&g)?)
}

/// `W` `(heads · d_h, d)` with row `h · d_h + c` scaled by `g[c]` of a per-head norm, if any.
fn fold_head_gain(
    weight: Tensor,
    norm: Option<&crate::model::transformer::RmsNorm>,
) -> Result<Tensor> {
    let Some(norm) = norm else { return Ok(weight) };
    let g = norm.weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let head_dim = g.dim(0)?;
    let (rows, d) = weight.dims2()?;
    Ok(weight
        .reshape((rows / head_dim, head_dim, d))?
        .broadcast_mul(&g.reshape((1, head_dim, 1))?)?
        .reshape((rows, d))?)
}

/// `Hqᵀ` and `Hkᵀ` of one layer: `(h·d_h, |W|)` and `(h_kv·d_h, |W|)`, row-major, for input word
/// vectors `e_i` `(|W|, d)`.
pub fn layer_activations(
    model: &Transformer,
    layer: usize,
    e_i: &Tensor,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let l = model
        .layers
        .get(layer)
        .ok_or_else(|| Error::invalid("layer", format!("{layer} is out of range")))?;
    // The effective weights: a LoRA adapter on q/k changes the QK circuit. OLMo-2 has no norm
    // before attention: nothing to fold.
    let (wq, wk) = (
        l.self_attn.q_proj.effective_weight()?,
        l.self_attn.k_proj.effective_weight()?,
    );
    let (wq, wk) = match &l.input_layernorm {
        Some(norm) => (fold_gain(&wq, &norm.weight)?, fold_gain(&wk, &norm.weight)?),
        None => (
            wq.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            wk.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        ),
    };
    // Qwen3 and Gemma 3 normalise each head's query and key: the gain scales the rows of every
    // head as the input norm's gain scales the columns; its per-token 1/rms, like the input
    // norm's, is a positive scale per word and head and is left out (§3.2 reads directions, not
    // lengths). OLMo-2's norm spans the whole projection: its gain covers every row at once.
    let wq = fold_head_gain(wq, l.self_attn.q_norm.as_ref())?;
    let wk = fold_head_gain(wk, l.self_attn.k_norm.as_ref())?;
    let e_t = e_i.t()?.contiguous()?;
    let hq = wq.matmul(&e_t)?.flatten_all()?.to_vec1::<f32>()?;
    let hk = wk.matmul(&e_t)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((hq, hk))
}

/// §3.3 steps 2–6 for one head, from its activations `hq`, `hk` (`d_h` rows of `|W|` values:
/// row `c` is dimension `c` over all words).
pub fn head_dims(
    head: usize,
    hq: &[f32],
    hk: &[f32],
    head_dim: usize,
    sem: &SemanticSpace,
    cfg: &HeadsConfig,
) -> Result<Vec<DimPairs>> {
    let n_words = sem.unit.n;
    if hq.len() != head_dim * n_words || hk.len() != head_dim * n_words {
        return Err(Error::invalid(
            "head activations",
            format!("expected {head_dim}×{n_words} values per side"),
        ));
    }
    // Step 2: energies, dimensions by decreasing energy (stable for ties).
    let energy: Vec<f64> = (0..head_dim)
        .map(|c| {
            let sq = |row: &[f32]| {
                row.iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
            };
            sq(&hq[c * n_words..(c + 1) * n_words]) + sq(&hk[c * n_words..(c + 1) * n_words])
        })
        .collect();
    let mut order: Vec<usize> = (0..head_dim).collect();
    order.sort_by(|&a, &b| energy[b].total_cmp(&energy[a]).then(a.cmp(&b)));

    // Step 3: top-K words per side by |activation|, with their signed values.
    let k = cfg.top_k.min(n_words);
    let tops: Vec<(Vec<u32>, Vec<u32>)> = order
        .par_iter()
        .map(|&c| {
            let q = &hq[c * n_words..(c + 1) * n_words];
            let kk = &hk[c * n_words..(c + 1) * n_words];
            (
                words::top_k_indices(n_words, k, |i| q[i].abs()),
                words::top_k_indices(n_words, k, |i| kk[i].abs()),
            )
        })
        .collect();

    // Step 5: K×K cosines for every dimension of the head in one batched product.
    let dim = sem.unit.dim;
    let gather = |side: usize| {
        let mut out = Vec::with_capacity(head_dim * k * dim);
        for top in &tops {
            let ids = if side == 0 { &top.0 } else { &top.1 };
            for &w in ids {
                out.extend_from_slice(sem.unit.row(w as usize));
            }
        }
        out
    };
    let gq = Tensor::from_vec(gather(0), (head_dim, k, dim), &Device::Cpu)?;
    let gk = Tensor::from_vec(gather(1), (head_dim, k, dim), &Device::Cpu)?;
    let sims = gq
        .matmul(&gk.transpose(1, 2)?.contiguous()?)?
        .flatten_all()?
        .to_vec1::<f32>()?;

    let dims = order
        .par_iter()
        .zip(tops.par_iter())
        .enumerate()
        .map(|(r, (&c, (tq, tk)))| {
            let s = &sims[r * k * k..(r + 1) * k * k];
            let mut pairs = Vec::new();
            for (i, &wq) in tq.iter().enumerate() {
                let aq = hq[c * n_words + wq as usize];
                for (j, &wk) in tk.iter().enumerate() {
                    let ak = hk[c * n_words + wk as usize];
                    let sim = s[i * k + j];
                    let co_occurs = sim > sem.theta[wq as usize] && sim > sem.theta[wk as usize];
                    let same_sign = aq * ak > 0.0;
                    if co_occurs && same_sign && sim > 0.0 && wq != wk {
                        pairs.push(WordPair {
                            key: wk,
                            query: wq,
                            sim,
                        });
                    }
                }
            }
            // Step 6: most similar first; ties keep the flattened (query, key) order.
            pairs.sort_by(|a, b| b.sim.total_cmp(&a.sim));
            DimPairs {
                head,
                dim: c,
                rank: r + 1,
                energy: energy[c] as f32,
                pairs,
            }
        })
        .collect();
    Ok(dims)
}

/// §3 for every layer, handing each finished layer to `sink` (with the fraction done) instead
/// of keeping it: a 7B model has 32×32×128 dimensions. Breaking `sink` cancels.
#[allow(clippy::too_many_arguments)]
pub fn head_pairs_streamed(
    model: &Transformer,
    tokenizer: &Tokenizer,
    words: &WordList,
    sem: &SemanticSpace,
    cfg: &HeadsConfig,
    sink: &mut dyn FnMut(f32, LayerHeads) -> ControlFlow<()>,
) -> Result<()> {
    if cfg.top_k == 0 {
        return Err(Error::invalid("heads settings", "top-K must be at least 1"));
    }
    if sem.unit.n != words.len() {
        return Err(Error::invalid(
            "semantic vectors",
            format!("{} vectors for {} words", sem.unit.n, words.len()),
        ));
    }
    let model_cfg = model.config();
    let (heads, kv_heads, head_dim) = (
        model_cfg.num_attention_heads,
        model_cfg.num_key_value_heads,
        model_cfg.head_dim,
    );
    let n_rep = (heads / kv_heads.max(1)).max(1);
    let ids = words::word_token_ids(tokenizer, &words.words)?;
    let e_i = words::mean_token_rows(&model.embed_tokens, &ids)?.to_tensor()?;
    let n_words = words.len();
    let n_layers = model.layers.len();
    for layer in 0..n_layers {
        let (hq, hk) = layer_activations(model, layer, &e_i)?;
        let mut dims = Vec::with_capacity(heads * head_dim);
        for head in 0..heads {
            // GQA: query head `h` reads KV head `h / n_rep` (repeat_interleave).
            let kv = head / n_rep;
            let q = &hq[head * head_dim * n_words..(head + 1) * head_dim * n_words];
            let k = &hk[kv * head_dim * n_words..(kv + 1) * head_dim * n_words];
            dims.extend(head_dims(head, q, k, head_dim, sem, cfg)?);
        }
        let frac = (layer + 1) as f32 / n_layers as f32;
        if sink(frac, LayerHeads { layer, heads, dims }).is_break() {
            return Err(Error::Cancelled);
        }
    }
    Ok(())
}

/// §3 for every layer, collected.
pub fn head_pairs(
    model: &Transformer,
    tokenizer: &Tokenizer,
    words: &WordList,
    sem: &SemanticSpace,
    cfg: &HeadsConfig,
    progress: &mut dyn FnMut(f32, &LayerHeads) -> ControlFlow<()>,
) -> Result<HeadPairs> {
    let mut layers = Vec::new();
    head_pairs_streamed(model, tokenizer, words, sem, cfg, &mut |frac, layer| {
        let flow = progress(frac, &layer);
        layers.push(layer);
        flow
    })?;
    let model_cfg = model.config();
    Ok(HeadPairs {
        words: words.words.clone(),
        heads: model_cfg.num_attention_heads,
        head_dim: model_cfg.head_dim,
        config: cfg.clone(),
        source: sem.source.clone(),
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    /// Semantic space with given unit vectors and a fixed threshold for every word.
    fn space(vectors: Vec<f32>, dim: usize, theta: f32) -> SemanticSpace {
        let n = vectors.len() / dim;
        SemanticSpace {
            unit: Rows {
                n,
                dim,
                data: vectors,
            }
            .normalized(),
            theta: vec![theta; n],
            source: SemanticSource::ModelEmbeddings,
        }
    }

    /// METHODS.md §3.6: words translate, french, cat, dog; `d_h = 2`, K = 2.
    #[test]
    fn worked_example() -> Result<()> {
        // Rows are dimensions, columns the words (translate, french, cat, dog).
        let hq = [3.0, 0.2, 0.0, 0.1, 0.1, 0.0, 1.0, -0.5];
        let hk = [0.1, 2.0, 0.0, 0.3, 0.0, 0.0, -0.8, 0.9];
        // Semantic vectors: translate ~ french, cat ~ dog.
        let sem = space(vec![1.0, 0.1, 0.9, 0.2, 0.0, 1.0, 0.1, 0.9], 2, 0.5);
        let cfg = HeadsConfig {
            top_k: 2,
            ..HeadsConfig::default()
        };
        let dims = head_dims(0, &hq, &hk, 2, &sem, &cfg)?;
        assert_eq!(dims[0].dim, 0, "dim 0 has rank 1");
        assert!((dims[0].energy - 13.15).abs() < 1e-4);
        assert!((dims[1].energy - 2.71).abs() < 1e-4);
        let text = |d: &DimPairs| {
            let names = ["translate", "french", "cat", "dog"];
            d.pairs
                .iter()
                .map(|p| format!("{}={}", names[p.key as usize], names[p.query as usize]))
                .collect::<Vec<_>>()
        };
        // Rank 1: (q translate, k french) kept; (french, french) dropped as identical; the
        // pairs with dog fail the semantic threshold.
        assert_eq!(text(&dims[0]), vec!["french=translate"]);
        // Rank 2: (cat, dog) and (dog, cat) are eligible; (cat, cat), (dog, dog) have negative
        // products.
        let mut rank2 = text(&dims[1]);
        rank2.sort();
        assert_eq!(rank2, vec!["cat=dog", "dog=cat"]);
        Ok(())
    }

    #[test]
    fn thresholds_and_signs_filter_pairs() -> Result<()> {
        let hq = [3.0, 0.2, 0.0, 0.1, 0.1, 0.0, 1.0, -0.5];
        let hk = [0.1, 2.0, 0.0, 0.3, 0.0, 0.0, -0.8, 0.9];
        let vectors = vec![1.0, 0.1, 0.9, 0.2, 0.0, 1.0, 0.1, 0.9];
        let cfg = HeadsConfig {
            top_k: 2,
            ..HeadsConfig::default()
        };
        // A threshold above every cosine keeps nothing.
        let strict = head_dims(0, &hq, &hk, 2, &space(vectors.clone(), 2, 1.0), &cfg)?;
        assert!(strict.iter().all(|d| d.pairs.is_empty()));
        // Flipping the sign of one side's dimension 1 flips which pairs have a positive product.
        let mut hk_neg = hk;
        hk_neg[4..].iter_mut().for_each(|v| *v = -*v);
        let flipped = head_dims(0, &hq, &hk_neg, 2, &space(vectors, 2, 0.5), &cfg)?;
        assert!(
            flipped[1].pairs.is_empty(),
            "(cat,dog),(dog,cat) now have negative products"
        );
        Ok(())
    }

    #[test]
    fn energy_is_invariant_to_permuting_words() -> Result<()> {
        let hq = [3.0, 0.2, 0.0, 0.1, 0.1, 0.0, 1.0, -0.5];
        let hk = [0.1, 2.0, 0.0, 0.3, 0.0, 0.0, -0.8, 0.9];
        let perm = [2usize, 0, 3, 1];
        let permute = |m: &[f32]| {
            let mut out = Vec::new();
            for c in 0..2 {
                out.extend(perm.iter().map(|&w| m[c * 4 + w]));
            }
            out
        };
        let sem = space(vec![1.0; 8], 2, 0.0);
        let cfg = HeadsConfig::default();
        let a = head_dims(0, &hq, &hk, 2, &sem, &cfg)?;
        let b = head_dims(0, &permute(&hq), &permute(&hk), 2, &sem, &cfg)?;
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.dim, y.dim);
            assert!((x.energy - y.energy).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn folded_activations_match_the_gained_projection() -> Result<()> {
        let loaded = tiny_model(7, &tiny_options(DType::F32))?;
        let model = &loaded.model;
        let d = model.config().hidden_size;
        let e = Tensor::from_vec(
            (0..3 * d)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<_>>(),
            (3, d),
            &Device::Cpu,
        )?;
        let (hq, _) = layer_activations(model, 1, &e)?;
        // Reference: (e ⊙ g) W_Qᵀ, transposed.
        let l = &model.layers[1];
        let reference = e
            .broadcast_mul(
                &l.input_layernorm
                    .as_ref()
                    .ok_or_else(|| Error::invalid("layer", "no input norm"))?
                    .weight
                    .unsqueeze(0)?,
            )?
            .matmul(&l.self_attn.q_proj.weight.dense()?.t()?)?
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let max = hq
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "{max}");
        Ok(())
    }

    #[test]
    fn tiny_model_runs_every_layer_and_head() -> Result<()> {
        let loaded = tiny_model(3, &tiny_options(DType::F32))?;
        let words = WordList::parse(
            "cat\t5\ndog\t4\nsea\t3\ntree\t2\nhouse\t1\nbook\t1\nred\t1\nblue\t1\n",
        )
        .map_err(|(_, m)| Error::invalid("words", m))?;
        let cfg = HeadsConfig {
            top_k: 4,
            threshold_words: 5,
            z: 0.0,
        };
        let sem = model_semantic_space(&loaded.model, &loaded.tokenizer, &words, &cfg)?;
        let mut seen = 0;
        let result = head_pairs(
            &loaded.model,
            &loaded.tokenizer,
            &words,
            &sem,
            &cfg,
            &mut |_, _| {
                seen += 1;
                ControlFlow::Continue(())
            },
        )?;
        let mc = loaded.model.config();
        assert_eq!(seen, mc.num_hidden_layers);
        for layer in &result.layers {
            assert_eq!(layer.dims.len(), mc.num_attention_heads * mc.head_dim);
            for d in &layer.dims {
                assert!(d.pairs.windows(2).all(|w| w[0].sim >= w[1].sim));
                assert!(d.pairs.iter().all(|p| p.key != p.query && p.sim > 0.0));
            }
        }
        let cancelled = head_pairs(
            &loaded.model,
            &loaded.tokenizer,
            &words,
            &sem,
            &cfg,
            &mut |_, _| ControlFlow::Break(()),
        );
        assert!(matches!(cancelled, Err(Error::Cancelled)));
        Ok(())
    }
}
