//! Instruction-vector guidance of LoRA training (Jiang et al.; METHODS.md §5.2 code version,
//! §5.4 paper version reconstructed): the reference passes, the KL terms with their closed-form
//! gradients at the logits, and the head-preservation term whose gradient enters at HOOK A.
//!
//! Per example `b` of a micro-batch of `B`:
//! - reference pass: adapters off, `IV` added to the `o_proj` output (HOOK B) of the edit layer
//!   at `t_b` (the last prompt token), scale 1; its logits at every row;
//! - head-reference pass: adapters off, no IV; `z` of each listed head at `t_b`;
//! - trainable pass: adapters on (plus `s · IV` at the same place in the paper version), the
//!   micro-batch right-padded in one forward.
//!
//! `KD(rows) = (1/B) Σ_rows Σ_v p (log p − log q)`, `p = softmax(logits / τ)`, no τ² factor
//! (the direction `F.kl_div(log_softmax(ref/τ), softmax(cur/τ))` computes). Its gradient at the
//! trainable logits `x` of a row is `(1/τ) p ⊙ (ℓ − Σ_v p ℓ)` with `ℓ = log p − log q`.
//! `kl1` = KD over the `t_b` rows, `kl2` = KD over all rows; each counts (value and gradient)
//! only above its threshold. `L_pr = Σ_i α_pr · MSE_i · [MSE_i > thr]`, `MSE_i` over `B × d_h`.
//!
//! Deviation (stated in the note and the README): FvForgetting left-pads the batch and its
//! `kl2` also sums the padding rows, whose logits depend on how the attention implementation
//! treats fully masked rows. Here padding rows are left out (the reference passes run each
//! example unpadded, the trainable pass pads on the right, where causal attention keeps the
//! padding out of every real row), so `kl2` sums the real rows of each example (still divided
//! by `B`); with equal-length examples the two agree.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::model::fused::with_f32_slices;
use crate::model::hooks::{Chain, Edit, EditOp, Editor, HookPoint, NoHook, Positions, Recorder};
use crate::model::transformer::{ForwardOptions, Input, KvCache, LogitsAt, Transformer};
use crate::model::vexp;
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
    /// The reference side of examples already seen, shared by clones (see [`RefCache`]).
    cache: std::sync::Arc<std::sync::Mutex<RefCache>>,
}

/// Reference passes do not depend on the adapters being trained (they run the frozen model),
/// so each example's reference is computed once per run and reused in later epochs: its
/// final-norm hidden states (`T × d`, from which the logits are one product away) and its
/// head outputs, within a memory budget; examples past the budget are recomputed each time.
#[derive(Debug, Default)]
pub struct RefCache {
    entries: std::collections::HashMap<(usize, Vec<u32>), (Tensor, Vec<Tensor>)>,
    bytes: usize,
    /// Largest total size kept.
    pub budget: usize,
    /// Lookups answered from the cache.
    pub hits: usize,
}

/// The default memory budget of [`RefCache`]: 1 GiB.
pub const REF_CACHE_BUDGET: usize = 1 << 30;

/// The reference side of one example.
#[derive(Clone, Debug)]
pub struct Reference {
    /// The reference logits at every row, `(T, V)` (f32, or f64 for an f64 model).
    pub logits: Tensor,
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
            cache: std::sync::Arc::new(std::sync::Mutex::new(RefCache {
                budget: REF_CACHE_BUDGET,
                ..RefCache::default()
            })),
        })
    }

    /// Sets the reference cache's budget in bytes (0 turns it off).
    pub fn set_cache_budget(&self, bytes: usize) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.budget = bytes;
            if cache.bytes > bytes {
                cache.entries.clear();
                cache.bytes = 0;
            }
        }
    }

    /// How many reference lookups the cache answered.
    pub fn cache_hits(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.hits)
    }

    /// The heads preserved by `L_pr`.
    pub fn heads(&self) -> &[(usize, usize)] {
        &self.heads
    }

    /// Whether the head-preservation term is on.
    pub fn preserves_heads(&self) -> bool {
        self.settings.pr_alpha > 0.0 && !self.heads.is_empty()
    }

    /// The heads `L_pr` covers: the vector's heads, or none when the term is off.
    pub fn preserved_heads(&self) -> &[(usize, usize)] {
        if self.preserves_heads() {
            &self.heads
        } else {
            &[]
        }
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
    ///
    /// Causality makes most of the work shared. Both passes are the same below the edit layer
    /// `ℓ` (the IV enters at `ℓ`'s `o_proj` output), so every row runs once up to `ℓ`; from
    /// there the IV pass runs to the logits, and the head pass (no IV) only for row `t_b` and
    /// only as far as the last listed head above `ℓ`, continuing the IV pass's keys and values
    /// of the rows before `t_b` (the IV enters at `t_b`, so they are the same without it).
    /// Heads at or below `ℓ` are read from the shared part (`z` of layer `ℓ` is taken before
    /// the IV is added).
    pub fn reference(&self, model: &Transformer, ids: &Tensor, t_b: usize) -> Result<Reference> {
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let mut refs = self.references(model, &[(ids, t_b)])?;
        refs.pop()
            .ok_or_else(|| Error::invalid("reference", "no reference pass ran"))
    }

    /// [`Guidance::reference`] for several examples (`(ids, t_b)` each): the examples that share
    /// a length and a `t_b` run their passes as one batch (larger products than one sequence
    /// at a time), each cached on its own.
    pub fn references(
        &self,
        model: &Transformer,
        examples: &[(Vec<u32>, usize)],
    ) -> Result<Vec<Reference>> {
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::All,
            use_lora: false,
        };
        let mut found: Vec<Option<(Tensor, Vec<Tensor>)>> = examples
            .iter()
            .map(|(ids, t_b)| {
                self.cache.lock().ok().and_then(|mut c| {
                    let hit = c.entries.get(&(*t_b, ids.clone())).cloned();
                    if hit.is_some() {
                        c.hits += 1;
                    }
                    hit
                })
            })
            .collect();
        // The misses, grouped by (t_b, length).
        let mut groups: std::collections::BTreeMap<(usize, usize), Vec<usize>> =
            std::collections::BTreeMap::new();
        for (i, (ids, t_b)) in examples.iter().enumerate() {
            if found[i].is_none() {
                groups.entry((*t_b, ids.len())).or_default().push(i);
            }
        }
        for ((t_b, len), members) in groups {
            let flat: Vec<u32> = members
                .iter()
                .flat_map(|&i| examples[i].0.iter().copied())
                .collect();
            let ids = Tensor::from_vec(flat, (members.len(), len), model.device())?;
            let (hidden, z) = self.reference_hidden(model, &ids, t_b)?;
            for (row, &i) in members.iter().enumerate() {
                let entry = (hidden.get(row)?, z[row].clone());
                if let Ok(mut c) = self.cache.lock() {
                    let bytes = entry.0.elem_count() * entry.0.dtype().size_in_bytes()
                        + entry.1.iter().map(|t| t.elem_count() * 8).sum::<usize>();
                    if c.bytes + bytes <= c.budget {
                        c.bytes += bytes;
                        c.entries
                            .insert((t_b, examples[i].0.clone()), entry.clone());
                    }
                }
                found[i] = Some(entry);
            }
        }
        found
            .into_iter()
            .map(|entry| {
                let (hidden, z) =
                    entry.ok_or_else(|| Error::invalid("reference", "an example was not run"))?;
                let logits = model.lm_logits(&hidden, &opts)?;
                Ok(Reference {
                    logits: logits.to_dtype(loss_dtype(model.dtype()))?,
                    z,
                })
            })
            .collect()
    }

    /// The reference passes themselves, for `b` sequences of one length sharing `t_b` (`ids`
    /// `(b, T)`): final-norm hidden states `(b, T, d)` and, per sequence, the heads' outputs.
    fn reference_hidden(
        &self,
        model: &Transformer,
        ids: &Tensor,
        t_b: usize,
    ) -> Result<(Tensor, Vec<Vec<Tensor>>)> {
        let seq_len = ids.dim(1)?;
        if t_b >= seq_len {
            return Err(Error::invalid(
                "last prompt position",
                format!("{t_b} is past the {seq_len} tokens"),
            ));
        }
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::All,
            use_lora: false,
        };
        let hidden_opts = ForwardOptions {
            logits: LogitsAt::None,
            ..opts
        };
        let layer = self.settings.layer;
        let heads = self.preserved_heads();
        let head_points = |keep: &dyn Fn(usize) -> bool| -> Vec<HookPoint> {
            heads
                .iter()
                .filter(|&&(l, _)| keep(l))
                .map(|&(l, _)| HookPoint::HeadOut(l))
                .collect()
        };
        // Every row up to the edit layer: the same in both passes.
        let mut below = Recorder::new(head_points(&|l| l < layer));
        let resid = model.run_until(Input::Ids(ids), &hidden_opts, None, &mut below, layer)?;
        // The IV pass from there, keeping the keys and values of the layers it runs.
        let mut at = Recorder::new(head_points(&|l| l == layer));
        let mut editor = self.edit(t_b, 1.0)?;
        let mut iv_cache = KvCache::new();
        let hidden = {
            let mut chain = Chain(vec![&mut at, &mut editor]);
            model.run(
                Input::Resid { layer, xs: &resid },
                &hidden_opts,
                Some(&mut iv_cache),
                &mut chain,
            )?
        };
        let mut above = Recorder::new(head_points(&|l| l > layer));
        if let Some(end) = heads
            .iter()
            .map(|&(l, _)| l + 1)
            .max()
            .filter(|&e| e > layer + 1)
        {
            // Only row t_b's head outputs are read, and they depend on rows ≤ t_b alone; rows
            // before t_b are the same without the IV (it enters at t_b), so the head pass
            // continues the IV pass's keys and values of those rows with row t_b.
            let mut cache = if t_b > 0 {
                iv_cache.truncate(t_b)?
            } else {
                KvCache::new()
            };
            let row = resid.narrow(1, t_b, 1)?;
            model.run_until(
                Input::Resid { layer, xs: &row },
                &hidden_opts,
                Some(&mut cache),
                &mut above,
                end,
            )?;
        }
        let batch = ids.dim(0)?;
        let mut z = vec![Vec::with_capacity(heads.len()); batch];
        for &(l, h) in heads {
            let recorder = match l.cmp(&layer) {
                std::cmp::Ordering::Less => &below,
                std::cmp::Ordering::Equal => &at,
                std::cmp::Ordering::Greater => &above,
            };
            // (b, rows, h, d_h): every row below and at the edit layer, row t_b alone above.
            let out = recorder.get(HookPoint::HeadOut(l))?;
            let row = if l > layer { 0 } else { t_b };
            for (b, z_b) in z.iter_mut().enumerate() {
                z_b.push(
                    out.get(b)?
                        .get(row)?
                        .get(h)?
                        .to_dtype(loss_dtype(model.dtype()))?,
                );
            }
        }
        Ok((hidden, z))
    }

    /// A hook for the trainable pass of a right-padded batch: `scale · IV` added to the edit
    /// layer's `o_proj` output at each row's `t_b` (`t_b[b]`), or nothing without a scale.
    pub fn trainable_hook(
        &self,
        t_b: &[usize],
        scale: Option<f64>,
    ) -> Result<Box<dyn crate::model::hooks::Hook>> {
        Ok(match scale {
            Some(s) => Box::new(AddAtRows {
                point: HookPoint::AttnOut(self.settings.layer),
                rows: t_b.to_vec(),
                value: (&self.iv * s)?,
            }),
            None => Box::new(NoHook),
        })
    }
}

/// Adds `value` `(d,)` at position `rows[b]` of batch row `b` of one hook point.
struct AddAtRows {
    point: HookPoint,
    rows: Vec<usize>,
    value: Tensor,
}

impl crate::model::hooks::Hook for AddAtRows {
    fn on(&mut self, point: HookPoint, xs: &Tensor) -> Result<Option<Tensor>> {
        if point != self.point {
            return Ok(None);
        }
        let (b_sz, t_len, _) = xs.dims3()?;
        if b_sz != self.rows.len() || self.rows.iter().any(|&t| t >= t_len) {
            return Err(Error::invalid(
                "IV rows",
                format!("{} rows for a batch of {b_sz} × {t_len}", self.rows.len()),
            ));
        }
        let mut mask = vec![0f32; b_sz * t_len];
        for (b, &t) in self.rows.iter().enumerate() {
            mask[b * t_len + t] = 1.0;
        }
        let mask = Tensor::from_vec(mask, (b_sz, t_len, 1), xs.device())?.to_dtype(xs.dtype())?;
        let value = self.value.to_dtype(xs.dtype())?;
        Ok(Some(xs.broadcast_add(&mask.broadcast_mul(&value)?)?))
    }

    fn wants(&self, point: HookPoint) -> bool {
        point == self.point
    }
}

/// Per-row `KL(softmax(x/τ) ‖ softmax(r/τ))` of trainable logits `x` `(n, V)` against
/// reference logits `r` `(n, V)`, `(n,)`, and its gradient with respect to `x`, `(n, V)`, in
/// closed form. On the CPU in f32 one fused pass per row (rows split across cores): the
/// separate candle ops cost about as much as the transformer body at 128 rows of a 49k
/// vocabulary. Elsewhere (f64, GPU) candle's ops, which the tests compare it with.
pub fn kd_rows(logits: &Tensor, ref_logits: &Tensor, tau: f64) -> Result<(Tensor, Tensor)> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && ref_logits.dtype() == DType::F32
    {
        return kd_rows_cpu(logits, ref_logits, tau);
    }
    let dtype = loss_dtype(logits.dtype());
    let log_q = candle_nn::ops::log_softmax(&(ref_logits.to_dtype(dtype)? / tau)?, D::Minus1)?;
    let x = (logits.to_dtype(dtype)? / tau)?;
    let log_p = candle_nn::ops::log_softmax(&x, D::Minus1)?;
    let p = log_p.exp()?;
    let ell = (&log_p - log_q)?;
    let kl = (&p * &ell)?.sum_keepdim(D::Minus1)?;
    let grad = ((p * ell.broadcast_sub(&kl)?)? / tau)?;
    Ok((kl.squeeze(D::Minus1)?, grad))
}

/// `log Σ exp(row / τ)` (`inv_tau = 1/τ > 0`), with `buf` (the row's length) as scratch.
fn log_sum_exp(row: &[f32], inv_tau: f32, buf: &mut [f32]) -> f32 {
    let m = vexp::max(row) * inv_tau;
    for (b, &v) in buf.iter_mut().zip(row) {
        *b = v * inv_tau - m;
    }
    vexp::exp_in_place(buf);
    m + vexp::sum_f64(buf).ln() as f32
}

fn kd_rows_cpu(logits: &Tensor, ref_logits: &Tensor, tau: f64) -> Result<(Tensor, Tensor)> {
    use rayon::prelude::*;
    let (n, v) = logits.dims2()?;
    if ref_logits.dims() != [n, v] {
        return Err(Error::invalid(
            "reference logits",
            format!("shape {:?}, expected {:?}", ref_logits.dims(), [n, v]),
        ));
    }
    let x = logits.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let r = ref_logits.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    #[allow(clippy::cast_possible_truncation)]
    let inv_tau = (1.0 / tau) as f32;
    let mut grad = vec![0f32; n * v];
    let kl: Vec<f32> = grad
        .par_chunks_mut(v.max(1))
        .zip(x.par_chunks(v.max(1)))
        .zip(r.par_chunks(v.max(1)))
        .map_init(
            || vec![0f32; v],
            |p, ((g, xr), rr)| {
                let lse_x = log_sum_exp(xr, inv_tau, p);
                let lse_r = log_sum_exp(rr, inv_tau, p);
                // g = ℓ = log p − log q, then p, KL = Σ p ℓ, and g = p (ℓ − KL) / τ.
                for (((pv, gv), &xv), &rv) in p.iter_mut().zip(g.iter_mut()).zip(xr).zip(rr) {
                    *pv = xv * inv_tau - lse_x;
                    *gv = *pv - (rv * inv_tau - lse_r);
                }
                vexp::exp_in_place(p);
                let kl = vexp::dot_f64(p, g) as f32;
                for (gv, &pv) in g.iter_mut().zip(p.iter()) {
                    *gv = pv * (*gv - kl) * inv_tau;
                }
                kl
            },
        )
        .collect();
    let device = logits.device();
    Ok((
        Tensor::from_vec(kl, n, device)?,
        Tensor::from_vec(grad, (n, v), device)?,
    ))
}

/// Per-row KL values of [`kd_rows`] (no gradient), with the row statistics the fused
/// gradient of [`logit_grads`] reuses.
#[derive(Clone, Debug, Default)]
pub struct KlRows {
    /// `KL_t`, per row.
    pub kl: Vec<f64>,
    /// `log Σ exp(x/τ)` and `log Σ exp(r/τ)` per row (CPU f32 path only).
    lse: Vec<(f32, f32)>,
}

/// Per-row `KL(softmax(x/τ) ‖ softmax(r/τ))` values only (no gradient), as [`kd_rows`].
pub fn kl_values(logits: &Tensor, ref_logits: &Tensor, tau: f64) -> Result<KlRows> {
    use rayon::prelude::*;
    let (n, v) = logits.dims2()?;
    if ref_logits.dims() != [n, v] {
        return Err(Error::invalid(
            "reference logits",
            "shape differs from the logits",
        ));
    }
    #[allow(clippy::cast_possible_truncation)]
    let inv_tau = (1.0 / tau) as f32;
    let fused = with_f32_slices(&[logits, ref_logits], |data| {
        let &[x, r] = data else {
            return Err(Error::invalid("kl values", "two tensors expected"));
        };
        let rows: Vec<(f64, (f32, f32))> = x
            .par_chunks(v.max(1))
            .zip(r.par_chunks(v.max(1)))
            .map_init(
                || (vec![0f32; v], vec![0f32; v]),
                |(p, ell), (xr, rr)| {
                    let lse_x = log_sum_exp(xr, inv_tau, p);
                    let lse_r = log_sum_exp(rr, inv_tau, p);
                    let shift = lse_r - lse_x;
                    for (((pv, lv), &xv), &rv) in p.iter_mut().zip(ell.iter_mut()).zip(xr).zip(rr) {
                        *pv = xv * inv_tau - lse_x;
                        *lv = (xv - rv) * inv_tau + shift;
                    }
                    vexp::exp_in_place(p);
                    (vexp::dot_f64(p, ell), (lse_x, lse_r))
                },
            )
            .collect();
        let (kl, lse) = rows.into_iter().unzip();
        Ok(KlRows { kl, lse })
    })?;
    if let Some(rows) = fused {
        return Ok(rows);
    }
    let (kl, _) = kd_rows(logits, ref_logits, tau)?;
    Ok(KlRows {
        kl: kl.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        lse: Vec::new(),
    })
}

/// What one example's loss asks of the rows of its trainable logits `(T, V)`.
#[derive(Clone, Copy, Debug)]
pub struct RowLoss<'a> {
    /// `w_t`, the weight of row `t`'s KL term (one per row).
    pub kl_weight: &'a [f64],
    /// `(t, y_t)`: the rows with a next-token label, and the label.
    pub labels: &'a [(usize, u32)],
    /// The weight of each label row's cross-entropy.
    pub ce_norm: f64,
}

impl RowLoss<'_> {
    /// The rows whose gradient can be non-zero, ascending: every label row and every row with
    /// a KL weight.
    #[must_use]
    pub fn active_rows(&self) -> Vec<usize> {
        let mut rows: Vec<usize> = self.labels.iter().map(|&(t, _)| t).collect();
        rows.extend(
            self.kl_weight
                .iter()
                .enumerate()
                .filter(|&(_, &w)| w != 0.0)
                .map(|(t, _)| t),
        );
        rows.sort_unstable();
        rows.dedup();
        rows
    }
}

/// [`logit_grads`]'s result.
#[derive(Clone, Debug)]
pub struct LogitGrads {
    /// The gradient at the requested rows, `(rows, V)`, in the loss dtype.
    pub grad: Tensor,
    /// `Σ_t CE_t` over the label rows (unweighted).
    pub ce_sum: f64,
}

/// Per row of [`logit_grads`]'s fused pass: row, KL weight / τ, KL, `(lse_x, lse_r)`, label.
type FusedRow = (usize, f32, f32, (f32, f32), Option<usize>);

/// The gradient of one example's loss at the rows `rows` (ascending; they must include
/// [`RowLoss::active_rows`], every other row's gradient being zero) of its trainable logits
/// `x` `(T, V)`: `w_t · ∂KL_t/∂x_t` (`kl` from [`kl_values`] on the same logits) plus
/// `ce_norm · (softmax(x_t) − onehot(y_t))` at each label row, and the label rows' summed
/// cross-entropy. On the CPU in f32 one fused pass per row over the tensors' own memory;
/// elsewhere candle's ops.
pub fn logit_grads(
    logits: &Tensor,
    ref_logits: &Tensor,
    tau: f64,
    kl: &KlRows,
    loss: &RowLoss<'_>,
    rows: &[usize],
) -> Result<LogitGrads> {
    let (n, v) = logits.dims2()?;
    let RowLoss {
        kl_weight,
        labels,
        ce_norm,
    } = *loss;
    if kl_weight.len() != n
        || kl.kl.len() != n
        || labels.iter().any(|&(t, y)| t >= n || y as usize >= v)
    {
        return Err(Error::invalid(
            "loss rows",
            "rows or labels outside the logits",
        ));
    }
    if rows.windows(2).any(|w| w[0] >= w[1])
        || rows.last().is_some_and(|&t| t >= n)
        || loss
            .active_rows()
            .iter()
            .any(|t| rows.binary_search(t).is_err())
    {
        return Err(Error::invalid(
            "loss rows",
            "the requested rows leave out a row with a gradient",
        ));
    }
    let device = logits.device();
    if kl.lse.len() == n {
        let mut target = vec![None; n];
        for &(t, y) in labels {
            target[t] = Some(y as usize);
        }
        #[allow(clippy::cast_possible_truncation)]
        let (inv_tau, norm) = ((1.0 / tau) as f32, ce_norm as f32);
        #[allow(clippy::cast_possible_truncation)]
        let per_row: Vec<FusedRow> = rows
            .iter()
            .map(|&t| {
                (
                    t,
                    (kl_weight[t] / tau) as f32,
                    kl.kl[t] as f32,
                    kl.lse[t],
                    target[t],
                )
            })
            .collect();
        let fused = with_f32_slices(&[logits, ref_logits], |data| {
            use rayon::prelude::*;
            let &[x, r] = data else {
                return Err(Error::invalid("logit gradients", "two tensors expected"));
            };
            let mut grad = vec![0f32; rows.len() * v];
            let ce_sum: f64 = grad
                .par_chunks_mut(v.max(1))
                .zip(per_row.par_iter())
                .map_init(
                    || vec![0f32; v],
                    |buf, (g, &(t, w, kl, (lse_x, lse_r), y))| {
                        let xr = &x[t * v..(t + 1) * v];
                        let rr = &r[t * v..(t + 1) * v];
                        if w != 0.0 {
                            let shift = lse_r - lse_x;
                            for (gv, &xv) in g.iter_mut().zip(xr) {
                                *gv = xv * inv_tau - lse_x;
                            }
                            vexp::exp_in_place(g);
                            for (gv, (&xv, &rv)) in g.iter_mut().zip(xr.iter().zip(rr)) {
                                *gv *= w * ((xv - rv) * inv_tau + shift - kl);
                            }
                        }
                        let Some(y) = y else { return 0.0 };
                        let lse = log_sum_exp(xr, 1.0, buf);
                        for (b, &xv) in buf.iter_mut().zip(xr) {
                            *b = xv - lse;
                        }
                        vexp::exp_in_place(buf);
                        for (gv, &b) in g.iter_mut().zip(buf.iter()) {
                            *gv += norm * b;
                        }
                        g[y] -= norm;
                        f64::from(lse - xr[y])
                    },
                )
                .sum();
            Ok(LogitGrads {
                grad: Tensor::from_vec(grad, (rows.len(), v), device)?,
                ce_sum,
            })
        })?;
        if let Some(out) = fused {
            return Ok(out);
        }
    }
    let dtype = loss_dtype(logits.dtype());
    let (_, kd) = kd_rows(logits, ref_logits, tau)?;
    let weights = Tensor::from_vec(kl_weight.to_vec(), (n, 1), device)?.to_dtype(dtype)?;
    let mut grad = kd.broadcast_mul(&weights)?;
    let mut ce_sum = 0.0;
    if !labels.is_empty() {
        #[allow(clippy::cast_possible_truncation)]
        let label_rows: Vec<u32> = labels.iter().map(|&(t, _)| t as u32).collect();
        let targets: Vec<u32> = labels.iter().map(|&(_, y)| y).collect();
        let label_rows = Tensor::from_vec(label_rows, labels.len(), device)?;
        let targets = Tensor::from_vec(targets, (labels.len(), 1), device)?;
        let picked = logits.to_dtype(dtype)?.index_select(&label_rows, 0)?;
        let log_probs = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
        ce_sum = -log_probs
            .gather(&targets, 1)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let probs = log_probs.exp()?;
        let ones = Tensor::ones((labels.len(), 1), dtype, device)?;
        let onehot = probs.zeros_like()?.scatter_add(&targets, &ones, 1)?;
        grad = grad.index_add(&label_rows, &((probs - onehot)? * ce_norm)?, 0)?;
    }
    if rows.len() < n {
        #[allow(clippy::cast_possible_truncation)]
        let keep: Vec<u32> = rows.iter().map(|&t| t as u32).collect();
        grad = grad.index_select(&Tensor::from_vec(keep, rows.len(), device)?, 0)?;
    }
    Ok(LogitGrads { grad, ce_sum })
}

/// The same per-row KL on candle's autograd graph (the tests' reference).
pub fn kd_rows_autograd(logits: &Tensor, ref_logits: &Tensor, tau: f64) -> Result<Tensor> {
    let dtype = loss_dtype(logits.dtype());
    let log_q = candle_nn::ops::log_softmax(&(ref_logits.to_dtype(dtype)? / tau)?, D::Minus1)?;
    let x = (logits.to_dtype(dtype)? / tau)?;
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
#[allow(clippy::float_cmp)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::settings::Progressive;

    /// The shared-prefix reference passes equal two plain full passes with adapters off: the
    /// logits of one with the IV added at `t_b`, and `z` at `t_b` of one without (heads below,
    /// at and above the edit layer).
    #[test]
    fn reference_passes_equal_plain_full_passes() -> anyhow::Result<()> {
        use crate::model::hooks::Recorder;
        use crate::model::tiny::{tiny_model, tiny_options};
        let m = tiny_model(4, &tiny_options(DType::F32))?;
        let model = &m.model;
        let d = model.config().hidden_size;
        let iv: Vec<f32> = (0..d).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let mut settings = GuidanceSettings::code("iv.safetensors".into());
        settings.layer = 1;
        let heads = vec![(0, 1), (1, 3), (2, 0), (2, 2)];
        let guidance = Guidance::new(settings, &iv, heads.clone(), model)?;
        guidance.set_cache_budget(0);
        let ids = Tensor::new(&[[1u32, 9, 20, 33, 40, 12, 50, 7, 3, 18]], &Device::Cpu)?;
        // t_b = 0: the head pass has no earlier rows to continue.
        for t_b in [4, 0] {
            let got = guidance.reference(model, &ids, t_b)?;
            let off = ForwardOptions {
                differentiable: false,
                logits: LogitsAt::All,
                use_lora: false,
            };
            let mut editor = guidance.edit(t_b, 1.0)?;
            let logits = model
                .run(Input::Ids(&ids), &off, None, &mut editor)?
                .squeeze(0)?;
            let diff = (logits - &got.logits)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "logits differ by {diff}");
            let mut rec = Recorder::new((0..3).map(HookPoint::HeadOut));
            model.run(Input::Ids(&ids), &off, None, &mut rec)?;
            for (&(l, h), z) in heads.iter().zip(&got.z) {
                let want = rec.get(HookPoint::HeadOut(l))?.get(0)?.get(t_b)?.get(h)?;
                let diff = (want - z)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "z of L{l}.H{h} differs by {diff}");
            }
        }
        // Several examples at once (two share a length and t_b and run as one batch): each
        // equals its own single pass.
        let examples = vec![
            (vec![1u32, 9, 20, 33, 40, 12, 50, 7, 3, 18], 4),
            (vec![1u32, 5, 6, 33, 41, 12, 2, 7, 30, 18], 4),
            (vec![1u32, 5, 6, 33, 41, 12, 2], 2),
        ];
        let batched = guidance.references(model, &examples)?;
        for ((ids, t_b), got) in examples.iter().zip(&batched) {
            let one =
                guidance.reference(model, &Tensor::new(ids.as_slice(), &Device::Cpu)?, *t_b)?;
            let diff = (&one.logits - &got.logits)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "batched logits differ by {diff}");
            for (a, b) in one.z.iter().zip(&got.z) {
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "batched z differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn kd_matches_the_worked_example() -> anyhow::Result<()> {
        // METHODS.md §5.6: new = [2, 0, −1], ref = [1, 1, −1], τ = 2 gives KL = 0.09628.
        let dev = Device::Cpu;
        let new = Tensor::new(&[[2f32, 0.0, -1.0]], &dev)?;
        let reference = Tensor::new(&[[1f32, 1.0, -1.0]], &dev)?;
        let p = candle_nn::ops::softmax(&(&new / 2.0)?, D::Minus1)?.to_vec2::<f32>()?;
        for (got, want) in p[0].iter().zip([0.6285f32, 0.2312, 0.1402]) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        let q = candle_nn::ops::softmax(&(&reference / 2.0)?, D::Minus1)?.to_vec2::<f32>()?;
        for (got, want) in q[0].iter().zip([0.4223f32, 0.4223, 0.1554]) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        // The fused f32 kernel and the f64 candle path.
        let (kl, _) = kd_rows(&new, &reference, 2.0)?;
        let kl = kl.to_vec1::<f32>()?[0];
        assert!((kl - 0.09628).abs() < 5e-6, "{kl}");
        let (kl64, _) = kd_rows(
            &new.to_dtype(DType::F64)?,
            &reference.to_dtype(DType::F64)?,
            2.0,
        )?;
        assert!((kl64.to_vec1::<f64>()?[0] - 0.09628).abs() < 5e-6);
        Ok(())
    }

    #[test]
    fn kd_gradient_matches_autograd_and_finite_differences() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::new(&[[0.3f64, -1.2, 2.0, 0.1], [1.0, 1.0, -0.5, 0.0]], &dev)?;
        let q = Tensor::new(&[[0.5f64, 0.5, -1.0, 2.0], [0.0, 0.2, 0.1, -0.3]], &dev)?;
        let tau = 2.0;
        let (kl, grad) = kd_rows(x.as_tensor(), &q, tau)?;
        let auto = kd_rows_autograd(x.as_tensor(), &q, tau)?;
        let store = auto.sum_all()?.backward()?;
        let reference = store.get(x.as_tensor()).expect("gradient");
        let diff = (&grad - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        // The fused f32 kernels agree with the f64 path.
        let (x32, q32) = (x.as_tensor().to_dtype(DType::F32)?, q.to_dtype(DType::F32)?);
        let (kl32, grad32) = kd_rows(&x32, &q32, tau)?;
        let dk = (kl32.to_dtype(DType::F64)? - &kl)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        let dg = (grad32.to_dtype(DType::F64)? - &grad)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(dk < 1e-6 && dg < 1e-6, "{dk} {dg}");
        let rows = kl_values(&x32, &q32, tau)?;
        for (a, b) in rows.kl.iter().zip(kl.to_vec1::<f64>()?) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // The fused gradient with per-row weights and a CE row.
        let loss = RowLoss {
            kl_weight: &[0.5, 2.0],
            labels: &[(1, 3)],
            ce_norm: 0.25,
        };
        let fused = logit_grads(&x32, &q32, tau, &rows, &loss, &[0, 1])?;
        let plain = logit_grads(
            x.as_tensor(),
            &q,
            tau,
            &kl_values(x.as_tensor(), &q, tau)?,
            &loss,
            &[0, 1],
        )?;
        let df = (fused.grad.to_dtype(DType::F64)? - &plain.grad)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(df < 1e-6, "{df}");
        // The CE of row 1's label, both ways, against its definition.
        let row1 = x.as_tensor().get(1)?.to_vec1::<f64>()?;
        let lse = row1.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((plain.ce_sum - (lse - row1[3])).abs() < 1e-12);
        assert!((fused.ce_sum - plain.ce_sum).abs() < 1e-5);
        // Only the rows with a gradient: row 0 has no label, so with no KL weight it drops
        // out, and asking for fewer rows than have a gradient is refused.
        let ce_only = RowLoss {
            kl_weight: &[0.0, 0.0],
            ..loss
        };
        assert_eq!(ce_only.active_rows(), vec![1]);
        for (logits, reference, rows) in [
            (&x32, &q32, &rows),
            (x.as_tensor(), &q, &kl_values(x.as_tensor(), &q, tau)?),
        ] {
            let one = logit_grads(logits, reference, tau, rows, &ce_only, &[1])?;
            let both = logit_grads(logits, reference, tau, rows, &ce_only, &[0, 1])?;
            assert_eq!(one.grad.dims(), &[1, 4]);
            let d = (one.grad.get(0)? - both.grad.get(1)?)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            assert!(d < 1e-7, "{d}");
            assert_eq!(
                both.grad
                    .get(0)?
                    .abs()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
                0.0
            );
            assert!(logit_grads(logits, reference, tau, rows, &loss, &[1]).is_err());
            assert!(logit_grads(logits, reference, tau, rows, &loss, &[1, 0]).is_err());
        }
        // Central finite differences of the summed KL.
        let base = x.as_tensor().to_vec2::<f64>()?;
        let h = 1e-6;
        for (i, j) in [(0, 0), (0, 2), (1, 3)] {
            let shifted = |delta: f64| -> anyhow::Result<f64> {
                let mut v = base.clone();
                v[i][j] += delta;
                let t = Tensor::new(v, &dev)?;
                Ok(kd_rows(&t, &q, tau)?.0.sum_all()?.to_scalar::<f64>()?)
            };
            let fd = (shifted(h)? - shifted(-h)?) / (2.0 * h);
            let g = reference.to_vec2::<f64>()?[i][j];
            assert!((fd - g).abs() < 1e-7, "({i},{j}) {fd} vs {g}");
        }
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
