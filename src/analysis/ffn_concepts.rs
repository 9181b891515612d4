//! PCA "concepts" of the feed-forward layers (METHODS.md §2): the principal directions of each
//! layer's `down_proj` value vectors, expressed as the words whose averaged `lm_head` vectors are
//! most (absolutely) cosine-similar; plus the deterministic base-vs-tuned comparison of §2.3
//! (an extension, not in the original code, and labelled so wherever it is shown).

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::analysis::words::{self, Rows, WordList};
use crate::error::{Error, Result};
use crate::model::{Tokenizer, Transformer, Weight};

/// Settings of §2.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConceptsConfig {
    /// Words kept per component (`K = 50`).
    pub top_k: usize,
    /// Components described per layer (the analysis uses `r ≤ 300`; the code computes all `d`).
    pub max_rank: usize,
}

impl Default for ConceptsConfig {
    fn default() -> Self {
        Self {
            top_k: 50,
            max_rank: 300,
        }
    }
}

/// The PCA of one matrix's rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Pca {
    /// Row length `d`.
    pub dim: usize,
    /// Explained variances `λ_r = σ_r² / (n − 1)`, largest first (all `d`; tiny negative
    /// round-off eigenvalues are clamped to 0).
    pub variances: Vec<f64>,
    /// `ρ_r = λ_r / Σ λ`.
    pub ratios: Vec<f64>,
    /// Unit principal directions, row `r` is `v_{r+1}`, `d × d` row-major. Signs are fixed so
    /// that each vector's largest-magnitude entry is positive (PC signs are otherwise arbitrary).
    pub components: Vec<f64>,
}

impl Pca {
    /// `v_{r+1}`.
    pub fn component(&self, r: usize) -> &[f64] {
        &self.components[r * self.dim..(r + 1) * self.dim]
    }
}

/// PCA of the rows of `m` (`n × d`, row-major): centre across rows, eigen-decompose
/// `C = M_cᵀ M_c / (n − 1)` in f64 (§2.2 steps 2–3).
pub fn pca_rows(m: &[f32], n: usize, d: usize) -> Result<Pca> {
    if n < 2 || d == 0 || m.len() != n * d {
        return Err(Error::invalid(
            "PCA input",
            format!(
                "need at least 2 rows of a {n}×{d} matrix, got {} values",
                m.len()
            ),
        ));
    }
    let mut mean = vec![0f64; d];
    for row in m.chunks_exact(d) {
        for (acc, &v) in mean.iter_mut().zip(row) {
            *acc += f64::from(v);
        }
    }
    for v in &mut mean {
        *v /= n as f64;
    }
    let centred = Mat::<f64>::from_fn(n, d, |i, j| f64::from(m[i * d + j]) - mean[j]);
    let scale = 1.0 / (n as f64 - 1.0);
    let cov = (centred.transpose() * &centred) * faer::Scale(scale);
    let eig = cov
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|err| Error::invalid("PCA", format!("eigen-decomposition failed: {err:?}")))?;
    let values = eig.S().column_vector();
    let vectors = eig.U();
    // faer returns ascending eigenvalues.
    let mut variances = Vec::with_capacity(d);
    let mut components = Vec::with_capacity(d * d);
    for r in (0..d).rev() {
        let lambda = values[r];
        variances.push(if lambda.is_finite() {
            lambda.max(0.0)
        } else {
            f64::NAN
        });
        let col: Vec<f64> = (0..d).map(|i| vectors[(i, r)]).collect();
        let pivot = col
            .iter()
            .copied()
            .fold(0f64, |best, v| if v.abs() > best.abs() { v } else { best });
        let sign = if pivot < 0.0 { -1.0 } else { 1.0 };
        components.extend(col.iter().map(|v| v * sign));
    }
    if variances.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "PCA",
            "the weights contain NaN or infinite values",
        ));
    }
    let total: f64 = variances.iter().sum();
    let ratios = variances
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    Ok(Pca {
        dim: d,
        variances,
        ratios,
        components,
    })
}

/// One word of a component: its index in the word list and `|v_r · e_w|`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredWord {
    /// Index into [`Concepts::words`].
    pub word: u32,
    /// Absolute cosine.
    pub score: f32,
}

/// One principal component of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// 1-based rank.
    pub rank: usize,
    /// Explained-variance ratio `ρ_r`.
    pub ratio: f64,
    /// The top-K words, best first.
    pub words: Vec<ScoredWord>,
}

/// §2 for one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerConcepts {
    /// 0-based layer.
    pub layer: usize,
    /// `ρ_r` for all `d` ranks.
    pub ratios: Vec<f64>,
    /// The first `max_rank` components with their words.
    pub components: Vec<Component>,
    /// The first `max_rank` unit directions, `max_rank × d` row-major (for the A/B alignment;
    /// cached as binary, not JSON).
    #[serde(skip)]
    pub vectors: Vec<f32>,
}

/// §2 for a whole model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Concepts {
    /// Hidden size `d`.
    pub dim: usize,
    /// The word list the words index.
    pub words: Vec<String>,
    /// Settings.
    pub config: ConceptsConfig,
    /// Per layer, in layer order.
    pub layers: Vec<LayerConcepts>,
}

impl Concepts {
    /// The words of a component, as text.
    pub fn component_words(&self, component: &Component) -> Vec<&str> {
        component
            .words
            .iter()
            .map(|w| self.words.get(w.word as usize).map_or("?", String::as_str))
            .collect()
    }
}

/// The unit output-space word vectors `E_o` (§2.2.4): averaged `lm_head` rows of `" " + w`.
pub fn output_word_vectors(
    model: &Transformer,
    tokenizer: &Tokenizer,
    words: &WordList,
) -> Result<Rows> {
    let ids = words::word_token_ids(tokenizer, &words.words)?;
    let unembed = model.lm_head.effective_weight()?;
    Ok(words::mean_token_rows(&Weight::Dense(unembed), &ids)?.normalized())
}

/// Describes the PCA of one value matrix `M` (`n × d`) by words: §2.2 steps 2–6, with `e_o` the
/// unit word vectors `(|W|, d)`.
pub fn layer_concepts(
    layer: usize,
    m: &[f32],
    n: usize,
    e_o: &Tensor,
    cfg: &ConceptsConfig,
) -> Result<LayerConcepts> {
    let (n_words, d) = e_o.dims2()?;
    let pca = pca_rows(m, n, d)?;
    let ranks = cfg.max_rank.min(d);
    let vectors: Vec<f32> = pca.components[..ranks * d]
        .iter()
        .map(|&v| v as f32)
        .collect();
    let v = Tensor::from_slice(&vectors, (ranks, d), &Device::Cpu)?;
    let scores = v
        .matmul(&e_o.t()?)?
        .abs()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let components = (0..ranks)
        .map(|r| {
            let row = &scores[r * n_words..(r + 1) * n_words];
            let top = words::top_k_indices(n_words, cfg.top_k, |i| row[i]);
            Component {
                rank: r + 1,
                ratio: pca.ratios[r],
                words: top
                    .into_iter()
                    .map(|w| ScoredWord {
                        word: w,
                        score: row[w as usize],
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(LayerConcepts {
        layer,
        ratios: pca.ratios,
        components,
        vectors,
    })
}

/// §2 for every layer of `model`. `progress` gets the fraction done and each finished layer;
/// breaking it cancels ([`Error::Cancelled`]).
pub fn ffn_concepts(
    model: &Transformer,
    tokenizer: &Tokenizer,
    words: &WordList,
    cfg: &ConceptsConfig,
    progress: &mut dyn FnMut(f32, &LayerConcepts) -> ControlFlow<()>,
) -> Result<Concepts> {
    if cfg.top_k == 0 || cfg.max_rank == 0 {
        return Err(Error::invalid(
            "concepts settings",
            "top-K and ranks must be at least 1",
        ));
    }
    let e_o = output_word_vectors(model, tokenizer, words)?.to_tensor()?;
    let n_layers = model.layers.len();
    let mut layers = Vec::with_capacity(n_layers);
    for (l, layer) in model.layers.iter().enumerate() {
        // HF stores down_proj as (d, d_ff); M = W_downᵀ has one row per neuron. An adapter on
        // down_proj changes the value vectors: read the effective weight.
        let w = &layer.mlp.down_proj.effective_weight()?;
        // Gemma 3 and OLMo-2 normalise the MLP output before the residual add: value vector i
        // reaches the stream as `v_i ⊙ g` times a positive scale per token, so the gain is
        // folded into the rows of W_down (the direction is what §2 reads).
        let w = &match &layer.mlp_out_norm {
            None => w.clone(),
            Some(norm) => w.broadcast_mul(&norm.weight.to_dtype(w.dtype())?.unsqueeze(1)?)?,
        };
        let (d, d_ff) = w.dims2()?;
        let m = w
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        debug_assert_eq!(m.len(), d * d_ff);
        let result = layer_concepts(l, &m, d_ff, &e_o, cfg)?;
        let flow = progress((l + 1) as f32 / n_layers as f32, &result);
        layers.push(result);
        if flow.is_break() {
            return Err(Error::Cancelled);
        }
    }
    Ok(Concepts {
        dim: model.config().hidden_size,
        words: words.words.clone(),
        config: cfg.clone(),
        layers,
    })
}

/// The §2.3 comparison of one layer (extension, NOT in the original method): for each tuned
/// component `r`, the base component `s` with the largest `|v_r^tuned · v_s^base|`, that value,
/// and the Jaccard overlap of the two top-word sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerAlignment {
    /// 0-based layer.
    pub layer: usize,
    /// Per tuned rank `r` (index `r − 1`): the best base rank `s` (1-based).
    pub best_match: Vec<usize>,
    /// `rot_r = max_s |v_r^tuned · v_s^base|`; low values mean the direction rotated.
    pub alignment: Vec<f64>,
    /// Jaccard overlap of the top-word sets of tuned `r` and base `best_match[r]`.
    pub jaccard: Vec<f64>,
}

/// Compares one layer of a tuned model with the same layer of its base (§2.3 b, c), over the
/// ranks both describe. Both must use the same word list.
pub fn align_layer(base: &LayerConcepts, tuned: &LayerConcepts, dim: usize) -> LayerAlignment {
    let rb = base.components.len().min(base.vectors.len() / dim.max(1));
    let rt = tuned.components.len().min(tuned.vectors.len() / dim.max(1));
    let mut best_match = Vec::with_capacity(rt);
    let mut alignment = Vec::with_capacity(rt);
    let mut jaccard = Vec::with_capacity(rt);
    for r in 0..rt {
        let vr = &tuned.vectors[r * dim..(r + 1) * dim];
        let (mut best, mut best_cos) = (0usize, -1f64);
        for s in 0..rb {
            let vs = &base.vectors[s * dim..(s + 1) * dim];
            let cos = vr
                .iter()
                .zip(vs)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>()
                .abs();
            if cos > best_cos {
                best = s;
                best_cos = cos;
            }
        }
        best_match.push(best + 1);
        alignment.push(best_cos.max(0.0));
        jaccard.push(if rb == 0 {
            0.0
        } else {
            word_jaccard(&tuned.components[r].words, &base.components[best].words)
        });
    }
    LayerAlignment {
        layer: tuned.layer,
        best_match,
        alignment,
        jaccard,
    }
}

fn word_jaccard(a: &[ScoredWord], b: &[ScoredWord]) -> f64 {
    let a: std::collections::BTreeSet<u32> = a.iter().map(|w| w.word).collect();
    let b: std::collections::BTreeSet<u32> = b.iter().map(|w| w.word).collect();
    let union = a.union(&b).count();
    if union == 0 {
        return 0.0;
    }
    a.intersection(&b).count() as f64 / union as f64
}

/// Aligns every layer both results have (same word list required).
pub fn align(base: &Concepts, tuned: &Concepts) -> Result<Vec<LayerAlignment>> {
    if base.dim != tuned.dim {
        return Err(Error::invalid(
            "concepts comparison",
            format!("hidden sizes differ ({} vs {})", base.dim, tuned.dim),
        ));
    }
    if base.words != tuned.words {
        return Err(Error::invalid(
            "concepts comparison",
            "the two results use different word lists",
        ));
    }
    Ok(base
        .layers
        .iter()
        .zip(&tuned.layers)
        .map(|(b, t)| align_layer(b, t, base.dim))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    /// METHODS.md §2.5.
    #[test]
    fn worked_example() -> Result<()> {
        let m = [2f32, 0.0, 4.0, 0.0, 0.0, 1.0, 2.0, 1.0];
        let pca = pca_rows(&m, 4, 2)?;
        let sigma: Vec<f64> = pca.variances.iter().map(|l| (l * 3.0).sqrt()).collect();
        assert!((sigma[0] - 2.9208).abs() < 1e-4, "{sigma:?}");
        assert!((sigma[1] - 0.6847).abs() < 1e-4, "{sigma:?}");
        assert!((pca.ratios[0] - 0.9479).abs() < 1e-4);
        assert!((pca.ratios[1] - 0.0521).abs() < 1e-4);
        let v1 = pca.component(0);
        assert!((v1[0].abs() - 0.9665).abs() < 1e-4 && (v1[1].abs() - 0.2567).abs() < 1e-4);
        assert!(v1[0] * v1[1] < 0.0, "v1 = ±[0.9665, −0.2567]");

        // Words alpha, beta, gamma, delta as unit vectors.
        let g = [-1f32, 0.033];
        let gn = (g[0] * g[0] + g[1] * g[1]).sqrt();
        let e = [
            1.0,
            0.0,
            0.0,
            1.0,
            g[0] / gn,
            g[1] / gn,
            std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
        ];
        let e_o = Tensor::from_slice(&e, (4, 2), &Device::Cpu)?;
        let cfg = ConceptsConfig {
            top_k: 2,
            max_rank: 2,
        };
        let layer = layer_concepts(0, &m, 4, &e_o, &cfg)?;
        let words = |r: usize| {
            layer.components[r]
                .words
                .iter()
                .map(|w| w.word)
                .collect::<Vec<_>>()
        };
        assert_eq!(words(0), vec![2, 0], "PC1: gamma, alpha");
        assert_eq!(words(1), vec![1, 3], "PC2: beta, delta");
        assert!((layer.components[0].words[0].score - 0.9745).abs() < 1e-3);
        assert!((layer.components[0].words[1].score - 0.9665).abs() < 1e-4);
        Ok(())
    }

    fn random_matrix(seed: u64, n: usize, d: usize) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * d).map(|_| rng.random::<f32>() - 0.5).collect()
    }

    #[test]
    fn ratios_sum_to_one_and_components_are_orthonormal() -> Result<()> {
        let (n, d) = (40, 7);
        let pca = pca_rows(&random_matrix(1, n, d), n, d)?;
        assert!((pca.ratios.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(pca.variances.windows(2).all(|w| w[0] >= w[1]));
        for r in 0..d {
            for s in 0..d {
                let dot: f64 = pca
                    .component(r)
                    .iter()
                    .zip(pca.component(s))
                    .map(|(a, b)| a * b)
                    .sum();
                let want = if r == s { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-10, "v{r}·v{s} = {dot}");
            }
        }
        Ok(())
    }

    #[test]
    fn variances_match_the_trace() -> Result<()> {
        // Σλ equals the total variance of the centred columns.
        let (n, d) = (25, 5);
        let m = random_matrix(2, n, d);
        let pca = pca_rows(&m, n, d)?;
        let mut total = 0.0;
        for j in 0..d {
            let col: Vec<f64> = (0..n).map(|i| f64::from(m[i * d + j])).collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            total += col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
        }
        assert!((pca.variances.iter().sum::<f64>() - total).abs() < 1e-10);
        Ok(())
    }

    #[test]
    fn rank_one_matrix_recovers_its_direction() -> Result<()> {
        let (n, d) = (200, 6);
        let c = [0.3f32, -1.0, 2.0, 0.5, 0.0, -0.7];
        let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut m = Vec::with_capacity(n * d);
        for _ in 0..n {
            let u: f32 = rng.random::<f32>() * 4.0 - 2.0;
            m.extend(
                c.iter()
                    .map(|&ci| u * ci + (rng.random::<f32>() - 0.5) * 1e-3),
            );
        }
        let pca = pca_rows(&m, n, d)?;
        let dot: f64 = pca
            .component(0)
            .iter()
            .zip(c)
            .map(|(v, ci)| v * f64::from(ci / norm))
            .sum();
        assert!(dot.abs() > 0.99999, "|v1·c| = {dot}");
        assert!(pca.ratios[0] > 0.9999);
        Ok(())
    }

    #[test]
    fn flipping_signs_changes_no_result() -> Result<()> {
        let (n, d, w) = (30, 4, 9);
        let m = random_matrix(4, n, d);
        let neg: Vec<f32> = m.iter().map(|v| -v).collect();
        let e = Rows {
            n: w,
            dim: d,
            data: random_matrix(5, w, d),
        }
        .normalized()
        .to_tensor()?;
        let cfg = ConceptsConfig {
            top_k: 3,
            max_rank: 4,
        };
        let a = layer_concepts(0, &m, n, &e, &cfg)?;
        let b = layer_concepts(0, &neg, n, &e, &cfg)?;
        assert_eq!(a.components.len(), b.components.len());
        for (ca, cb) in a.components.iter().zip(&b.components) {
            assert!((ca.ratio - cb.ratio).abs() < 1e-12);
            let ids = |c: &Component| c.words.iter().map(|w| w.word).collect::<Vec<_>>();
            assert_eq!(ids(ca), ids(cb));
        }
        Ok(())
    }

    #[test]
    fn identical_layers_align_perfectly_and_bad_input_is_an_error() -> Result<()> {
        let (n, d, w) = (30, 4, 9);
        let m = random_matrix(6, n, d);
        let e = Rows {
            n: w,
            dim: d,
            data: random_matrix(7, w, d),
        }
        .normalized()
        .to_tensor()?;
        let layer = layer_concepts(0, &m, n, &e, &ConceptsConfig::default())?;
        let al = align_layer(&layer, &layer, d);
        assert_eq!(al.best_match, vec![1, 2, 3, 4]);
        assert!(al.alignment.iter().all(|a| (a - 1.0).abs() < 1e-6));
        assert!(al.jaccard.iter().all(|j| (j - 1.0).abs() < 1e-12));
        assert!(pca_rows(&m, 1, d).is_err());
        assert!(pca_rows(&[f32::NAN; 8], 4, 2).is_err());
        Ok(())
    }
}
