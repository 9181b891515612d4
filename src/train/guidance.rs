//! Instruction-vector guidance of LoRA training (Jiang et al.; METHODS.md §5.2 code version,
//! §5.4 paper version reconstructed): the reference passes, the KL terms with their closed-form
//! gradients at the logits, and the head-preservation term whose gradient enters at HOOK A.
//!
//! Per example `b` of a micro-batch of `B` (each example runs unpadded; see below):
//! - reference pass: adapters off, `IV` added to the `o_proj` output (HOOK B) of the edit layer
//!   at `t_b` (the last prompt token), scale 1; its logits at every row, as
//!   `log q = log_softmax(ref / τ)`;
//! - head-reference pass: adapters off, no IV; `z` of each listed head at `t_b`;
//! - trainable pass: adapters on (plus `s · IV` at the same place in the paper version).
//!
//! `KD(rows) = (1/B) Σ_rows Σ_v p (log p − log q)`, `p = softmax(logits / τ)`, no τ² factor
//! (the direction `F.kl_div(log_softmax(ref/τ), softmax(cur/τ))` computes). Its gradient at the
//! trainable logits `x` of a row is `(1/τ) p ⊙ (ℓ − Σ_v p ℓ)` with `ℓ = log p − log q`.
//! `kl1` = KD over the `t_b` rows, `kl2` = KD over all rows; each counts (value and gradient)
//! only above its threshold. `L_pr = Σ_i α_pr · MSE_i · [MSE_i > thr]`, `MSE_i` over `B × d_h`.
//!
//! Deviation (stated in the note and the README): FvForgetting left-pads the batch and its
//! `kl2` also sums the padding rows, whose logits depend on how the attention implementation
//! treats fully masked rows. Here every example runs without padding, so `kl2` sums the real
//! rows of each example (still divided by `B`); with equal-length examples the two agree.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::model::hooks::{Edit, EditOp, Editor, HookPoint, NoHook, Positions, Recorder};
use crate::model::transformer::{ForwardOptions, Input, LogitsAt, Transformer};
use crate::train::dataset::Example;
use crate::train::settings::GuidanceSettings;

/// Names of the loss terms of a guided run, in order (after `ce`).
pub const GUIDED_TERMS: [&str; 3] = ["kl1", "kl2", "pr"];

/// A loaded guidance: the settings, the vector and the heads to preserve.
#[derive(Clone, Debug)]
pub struct Guidance {
    /// The settings.
    pub settings: GuidanceSettings,
    /// The instruction vector, `(d,)` in the model's dtype.
    iv: Tensor,
    /// Heads `(layer, head)` whose `t_b` outputs are preserved.
    heads: Vec<(usize, usize)>,
}

/// The reference side of one example.
#[derive(Clone, Debug)]
pub struct Reference {
    /// `log_softmax(logits_ref / τ)` at every row, `(T, V)` f32.
    pub log_q: Tensor,
    /// `z` of each head at `t_b`, `(d_h,)` f32, in [`Guidance::heads`] order.
    pub z: Vec<Tensor>,
}

/// The dtype the loss is computed in: f64 for an f64 model (the tests' precision), else f32.
pub fn loss_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `t_b` of an example: the position predicting its first label, or `None` without labels.
pub fn last_prompt_position(example: &Example) -> Option<usize> {
    (1..example.ids.len())
        .find(|&t| example.is_label[t])
        .map(|t| t - 1)
}

impl Guidance {
    /// Checks the vector and the heads against the model.
    pub fn new(
        settings: GuidanceSettings,
        vector: &[f32],
        heads: Vec<(usize, usize)>,
        model: &Transformer,
    ) -> Result<Self> {
        settings.validate()?;
        let cfg = model.config();
        if vector.len() != cfg.hidden_size {
            return Err(Error::invalid(
                "instruction vector",
                format!(
                    "{} values, the model's hidden size is {}",
                    vector.len(),
                    cfg.hidden_size
                ),
            ));
        }
        if settings.layer >= cfg.num_hidden_layers {
            return Err(Error::invalid(
                "IV layer",
                format!(
                    "{} is past the model's {} layers",
                    settings.layer, cfg.num_hidden_layers
                ),
            ));
        }
        if let Some((l, h)) = heads
            .iter()
            .find(|(l, h)| *l >= cfg.num_hidden_layers || *h >= cfg.num_attention_heads)
        {
            return Err(Error::invalid(
                "instruction vector heads",
                format!(
                    "L{l}.H{h} is outside the model's {} layers × {} heads",
                    cfg.num_hidden_layers, cfg.num_attention_heads
                ),
            ));
        }
        let iv =
            Tensor::from_slice(vector, cfg.hidden_size, model.device())?.to_dtype(model.dtype())?;
        Ok(Self {
            settings,
            iv,
            heads,
        })
    }

    /// The heads preserved by `L_pr`.
    pub fn heads(&self) -> &[(usize, usize)] {
        &self.heads
    }

    /// Whether the head-preservation term is on.
    pub fn preserves_heads(&self) -> bool {
        self.settings.pr_alpha > 0.0 && !self.heads.is_empty()
    }

    /// The IV's scale in the trainable pass at optimizer step `step` of `steps` (`None` in the
    /// code version, which adds it to the reference pass only).
    pub fn trainable_scale(&self, step: usize, steps: usize) -> Option<f64> {
        self.settings.progressive.map(|p| p.scale(step, steps))
    }

    /// The edit adding `scale · IV` to the `o_proj` output of the edit layer at `t_b`.
    pub fn edit(&self, t_b: usize, scale: f64) -> Result<Editor> {
        let value = if (scale - 1.0).abs() < f64::EPSILON {
            self.iv.clone()
        } else {
            (&self.iv * scale)?
        };
        #[allow(clippy::cast_possible_wrap)]
        Ok(Editor::new(vec![Edit {
            point: HookPoint::AttnOut(self.settings.layer),
            positions: Positions::List(vec![t_b as isize]),
            heads: None,
            op: EditOp::Add(value),
        }]))
    }

    /// The two reference passes of one example (`ids` `(1, T)`), adapters off, no graph.
    /// With the head term on, the head pass runs first and the IV pass continues from its
    /// residual stream at the edit layer (the layers below are the same in both).
    pub fn reference(&self, model: &Transformer, ids: &Tensor, t_b: usize) -> Result<Reference> {
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::All,
            use_lora: false,
        };
        let layer = self.settings.layer;
        let mut z = Vec::new();
        let mut editor = self.edit(t_b, 1.0)?;
        let logits = if self.preserves_heads() {
            let mut points: Vec<HookPoint> = self
                .heads
                .iter()
                .map(|&(l, _)| HookPoint::HeadOut(l))
                .collect();
            points.push(HookPoint::ResidPre(layer));
            let mut recorder = Recorder::new(points);
            let head_opts = ForwardOptions {
                logits: LogitsAt::None,
                ..opts
            };
            model.run(Input::Ids(ids), &head_opts, None, &mut recorder)?;
            for &(l, h) in &self.heads {
                // (1, T, h, d_h) -> (d_h,)
                let head = recorder
                    .get(HookPoint::HeadOut(l))?
                    .get(0)?
                    .get(t_b)?
                    .get(h)?
                    .to_dtype(loss_dtype(model.dtype()))?;
                z.push(head);
            }
            let resid = recorder.get(HookPoint::ResidPre(layer))?.clone();
            model.run(Input::Resid { layer, xs: &resid }, &opts, None, &mut editor)?
        } else {
            model.run(Input::Ids(ids), &opts, None, &mut editor)?
        };
        let scaled = (logits.squeeze(0)?.to_dtype(loss_dtype(model.dtype()))? / self.settings.tau)?;
        Ok(Reference {
            log_q: candle_nn::ops::log_softmax(&scaled, D::Minus1)?,
            z,
        })
    }

    /// A hook for the trainable pass: the progressive IV, or nothing.
    pub fn trainable_hook(
        &self,
        t_b: usize,
        scale: Option<f64>,
    ) -> Result<Box<dyn crate::model::hooks::Hook>> {
        Ok(match scale {
            Some(s) => Box::new(self.edit(t_b, s)?),
            None => Box::new(NoHook),
        })
    }
}

/// Per-row `KL(softmax(x/τ) ‖ q)` of trainable logits `x` `(n, V)` against `log q` `(n, V)`,
/// `(n,)`, and its gradient with respect to `x`, `(n, V)`, in closed form (in `log q`'s dtype).
pub fn kd_rows(logits: &Tensor, log_q: &Tensor, tau: f64) -> Result<(Tensor, Tensor)> {
    let x = (logits.to_dtype(log_q.dtype())? / tau)?;
    let log_p = candle_nn::ops::log_softmax(&x, D::Minus1)?;
    let p = log_p.exp()?;
    let ell = (&log_p - log_q)?;
    let kl = (&p * &ell)?.sum_keepdim(D::Minus1)?;
    let grad = ((p * ell.broadcast_sub(&kl)?)? / tau)?;
    Ok((kl.squeeze(D::Minus1)?, grad))
}

/// The same per-row KL on candle's autograd graph (the tests' reference).
pub fn kd_rows_autograd(logits: &Tensor, log_q: &Tensor, tau: f64) -> Result<Tensor> {
    let x = (logits.to_dtype(log_q.dtype())? / tau)?;
    let log_p = candle_nn::ops::log_softmax(&x, D::Minus1)?;
    Ok((log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?)
}

/// The loss terms of one micro-batch from its per-example parts, with the thresholds applied:
/// returns `(kl1, kl2, pr)` contributions (α-weighted, 0 below threshold) and the raw values
/// `(kl1, kl2, mean MSE)`, and the multipliers `(c1, c2, c_pr[i])` of each term's gradient
/// (`α / B` when active, else 0; per head `α_pr · 2 / (B d_h)`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchTerms {
    /// `α1 · kl1 · [kl1 > thr]`.
    pub kl1: f64,
    /// `α2 · kl2 · [kl2 > thr]`.
    pub kl2: f64,
    /// `Σ_i α_pr · MSE_i · [MSE_i > thr]`.
    pub pr: f64,
    /// `kl1` before weighting.
    pub kl1_raw: f64,
    /// `kl2` before weighting.
    pub kl2_raw: f64,
    /// Mean of the heads' MSE before weighting.
    pub mse_raw: f64,
    /// Multiplier of the per-row KL gradient at the `t_b` rows.
    pub c1: f64,
    /// Multiplier of the per-row KL gradient at every row.
    pub c2: f64,
    /// Per head, the multiplier of `(z_cur − z_ref)` in the gradient at HOOK A.
    pub c_pr: Vec<f64>,
}

/// Applies §5.2's weights and thresholds to sums over the `batch` examples: `kl1_sum` and
/// `kl2_sum` are `Σ_b` of the per-example KL sums, `sq_sums[i]` is `Σ_b ‖z_cur − z_ref‖²` of
/// head `i`, `head_dim` is `d_h`.
#[allow(clippy::cast_precision_loss)]
pub fn batch_terms(
    settings: &GuidanceSettings,
    batch: usize,
    kl1_sum: f64,
    kl2_sum: f64,
    sq_sums: &[f64],
    head_dim: usize,
) -> BatchTerms {
    let b = batch.max(1) as f64;
    let kl1_raw = kl1_sum / b;
    let kl2_raw = kl2_sum / b;
    let thr = settings.kl_threshold;
    let on1 = settings.kl_alpha1 > 0.0 && kl1_raw > thr;
    let on2 = settings.kl_alpha2 > 0.0 && kl2_raw > thr;
    let denom = b * head_dim.max(1) as f64;
    let mut pr = 0.0;
    let mut c_pr = Vec::with_capacity(sq_sums.len());
    let mut mse_total = 0.0;
    for &sq in sq_sums {
        let mse = sq / denom;
        mse_total += mse;
        if settings.pr_alpha > 0.0 && mse > settings.mse_threshold {
            pr += settings.pr_alpha * mse;
            c_pr.push(settings.pr_alpha * 2.0 / denom);
        } else {
            c_pr.push(0.0);
        }
    }
    BatchTerms {
        kl1: if on1 {
            settings.kl_alpha1 * kl1_raw
        } else {
            0.0
        },
        kl2: if on2 {
            settings.kl_alpha2 * kl2_raw
        } else {
            0.0
        },
        pr,
        kl1_raw,
        kl2_raw,
        mse_raw: if sq_sums.is_empty() {
            0.0
        } else {
            mse_total / sq_sums.len() as f64
        },
        c1: if on1 { settings.kl_alpha1 / b } else { 0.0 },
        c2: if on2 { settings.kl_alpha2 / b } else { 0.0 },
        c_pr,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::settings::Progressive;

    #[test]
    fn kd_matches_the_worked_example() -> anyhow::Result<()> {
        // METHODS.md §5.6: new = [2, 0, −1], ref = [1, 1, −1], τ = 2 gives KL = 0.09628.
        let dev = Device::Cpu;
        let new = Tensor::new(&[[2f32, 0.0, -1.0]], &dev)?;
        let reference = Tensor::new(&[[1f32, 1.0, -1.0]], &dev)?;
        let log_q = candle_nn::ops::log_softmax(&(reference / 2.0)?, D::Minus1)?;
        let p = candle_nn::ops::softmax(&(&new / 2.0)?, D::Minus1)?.to_vec2::<f32>()?;
        for (got, want) in p[0].iter().zip([0.6285f32, 0.2312, 0.1402]) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        let (kl, _) = kd_rows(&new, &log_q, 2.0)?;
        let kl = kl.to_vec1::<f32>()?[0];
        assert!((kl - 0.09628).abs() < 5e-5, "{kl}");
        Ok(())
    }

    #[test]
    fn kd_gradient_matches_autograd_and_finite_differences() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::new(&[[0.3f64, -1.2, 2.0, 0.1], [1.0, 1.0, -0.5, 0.0]], &dev)?;
        let q = Tensor::new(&[[0.5f64, 0.5, -1.0, 2.0], [0.0, 0.2, 0.1, -0.3]], &dev)?;
        let tau = 2.0;
        let log_q = candle_nn::ops::log_softmax(&(q / tau)?, D::Minus1)?.to_dtype(DType::F32)?;
        let (_, grad) = kd_rows(x.as_tensor(), &log_q, tau)?;
        let auto = kd_rows_autograd(x.as_tensor(), &log_q, tau)?.sum_all()?;
        let store = auto.backward()?;
        let reference = store
            .get(x.as_tensor())
            .expect("gradient")
            .to_dtype(DType::F32)?;
        let diff = (grad - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn thresholds_zero_a_term_and_its_gradient() {
        let s = GuidanceSettings::code("iv.safetensors".into());
        // kl1 = 0.08 (below 0.1), kl2 = 0.3, one head above and one below 0.01.
        let t = batch_terms(&s, 2, 0.16, 0.6, &[0.1, 0.001], 4);
        assert_eq!(t.kl1, 0.0);
        assert_eq!(t.c1, 0.0);
        assert!((t.kl1_raw - 0.08).abs() < 1e-12);
        assert!((t.kl2 - 0.1 * 0.3).abs() < 1e-12);
        assert!((t.c2 - 0.1 / 2.0).abs() < 1e-12);
        assert!((t.pr - 0.1 / 8.0).abs() < 1e-12);
        assert_eq!(t.c_pr[1], 0.0);
        assert!((t.c_pr[0] - 2.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn progressive_scales_go_from_one_to_zero() {
        assert!((Progressive::Linear.scale(0, 10) - 1.0).abs() < 1e-12);
        assert!((Progressive::Linear.scale(5, 10) - 0.5).abs() < 1e-12);
        assert!((Progressive::Cosine.scale(5, 10) - 0.5).abs() < 1e-12);
        assert!(Progressive::Cosine.scale(10, 10).abs() < 1e-12);
        assert_eq!(Progressive::Step(0.3).scale(2, 10), 1.0);
        assert_eq!(Progressive::Step(0.3).scale(3, 10), 0.0);
        assert_eq!(
            Progressive::parse("step:0.25"),
            Some(Progressive::Step(0.25))
        );
        assert_eq!(Progressive::parse("cosine"), Some(Progressive::Cosine));
        assert_eq!(Progressive::parse("step:2"), None);
        assert_eq!(Progressive::parse("exp"), None);
    }
}
