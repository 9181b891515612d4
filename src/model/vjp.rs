//! Batched vector–Jacobian products of the frozen decoder with respect to its input embeddings:
//! one taped forward, then one hand-written backward that carries `k` cotangents at once.
//!
//! Why not candle's autograd: a gradient for each of `k` objectives (e.g. the probability of each
//! response token, METHODS.md §1) costs `k` backward passes there, each a chain of small,
//! single-threaded element-wise ops and `T × d` products. Here the `k` cotangents ride along a
//! leading batch axis, so every weight product is one `(k·T) × d` GEMM, the weights never get a
//! gradient, the forward is shared (its activations are the [`Tape`]), and each batch stops at the
//! last position any of its cotangents touches (causality: outputs at positions `< T'` depend
//! only on inputs at positions `< T'`).
//!
//! The backward mirrors [`crate::model::transformer`] step by step (RMSNorm, rotate-half RoPE,
//! grouped-query softmax attention, SwiGLU, LoRA). Tests compare it with candle's autograd on
//! the differentiable path of the same forward.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::model::blas::{batched_matmul, gemm_views, MatView, BLAS_ENABLED};
use crate::model::config::Activation;
use crate::model::fused::{cpu_f32_contiguous, f32_data};
use crate::model::lora::Linear;
use crate::model::transformer::{DecoderLayer, RmsNorm, Transformer};
use crate::model::vexp;

/// Activations of one decoder layer, recorded by [`Transformer::run_taped`].
#[derive(Clone, Debug, Default)]
pub struct LayerTape {
    /// Residual stream entering the layer, `(1, T, d)`.
    pub(crate) x_in: Option<Tensor>,
    /// Queries after RoPE, `(1, n_heads, T, head_dim)`.
    pub(crate) q: Option<Tensor>,
    /// Keys after RoPE, `(1, n_kv, T, head_dim)`.
    pub(crate) k: Option<Tensor>,
    /// Values, `(1, n_kv, T, head_dim)`.
    pub(crate) v: Option<Tensor>,
    /// Attention probabilities, `(1, n_heads, T, T)`.
    pub(crate) probs: Option<Tensor>,
    /// Residual stream after attention, `(1, T, d)`.
    pub(crate) x_mid: Option<Tensor>,
    /// Gate projection before SiLU, `(1, T, intermediate)`.
    pub(crate) gate: Option<Tensor>,
    /// Up projection, `(1, T, intermediate)`.
    pub(crate) up: Option<Tensor>,
    /// Input of q/k/v (the first norm's output), `(1, T, d)`.
    pub(crate) n1: Option<Tensor>,
    /// Input of `o_proj` (the heads' concatenated outputs), `(1, T, n_heads · head_dim)`.
    pub(crate) z: Option<Tensor>,
    /// Input of gate/up (the second norm's output), `(1, T, d)`.
    pub(crate) n2: Option<Tensor>,
    /// Input of `down_proj`, `(1, T, intermediate)`.
    pub(crate) h: Option<Tensor>,
    /// Qwen3: the query projection before its per-head norm, `(1, T, n_heads · head_dim)`.
    pub(crate) q_proj: Option<Tensor>,
    /// Qwen3: the key projection before its per-head norm, `(1, T, n_kv · head_dim)`.
    pub(crate) k_proj: Option<Tensor>,
    /// Gemma 3, OLMo-2: `o_proj`'s output before the norm on it, `(1, T, d)`.
    pub(crate) attn_raw: Option<Tensor>,
    /// Gemma 3, OLMo-2: `down_proj`'s output before the norm on it, `(1, T, d)`.
    pub(crate) mlp_raw: Option<Tensor>,
}

/// Gradients of the LoRA adapters, accumulated by [`Transformer::input_vjp_lora`]: per layer
/// and module (`q_proj`, ...), `(dA, dB)`.
#[derive(Clone, Debug, Default)]
pub struct LoraGrads {
    /// `(layer, module) -> (dA, dB)`.
    pub grads: std::collections::BTreeMap<(usize, &'static str), (Tensor, Tensor)>,
}

impl LoraGrads {
    fn add(&mut self, layer: usize, module: &'static str, da: Tensor, db: Tensor) -> Result<()> {
        use std::collections::btree_map::Entry;
        match self.grads.entry((layer, module)) {
            Entry::Vacant(slot) => {
                slot.insert((da, db));
            }
            Entry::Occupied(mut slot) => {
                let (a, b) = slot.get();
                let sum = ((a + da)?, (b + db)?);
                slot.insert(sum);
            }
        }
        Ok(())
    }
}

/// Where [`linear_vjp`] puts adapter gradients: the sink, the layer, the module and the
/// linear's taped input `(1, T, in)`.
struct LoraTarget<'a> {
    sink: &'a mut LoraGrads,
    layer: usize,
    module: &'static str,
    input: &'a Tensor,
}

/// Everything [`Transformer::input_vjp`] needs from one forward.
#[derive(Clone, Debug, Default)]
pub struct Tape {
    pub(crate) layers: Vec<LayerTape>,
    /// Residual stream before the final norm, `(1, T, d)`.
    pub(crate) x_final: Option<Tensor>,
    /// RoPE tables of the pass, `(T, head_dim / 2)`.
    pub(crate) cos: Option<Tensor>,
    pub(crate) sin: Option<Tensor>,
    /// Gemma 3: the sliding layers' RoPE tables `(cos, sin)`.
    pub(crate) local_rope: Option<(Tensor, Tensor)>,
    /// Whether the forward applied LoRA adapters (the backward must match).
    pub(crate) use_lora: bool,
}

impl Tape {
    /// Sequences recorded (the batch of the taped forward).
    pub fn batch(&self) -> usize {
        self.x_final
            .as_ref()
            .and_then(|x| x.dim(0).ok())
            .unwrap_or(1)
    }

    /// Positions recorded.
    pub fn seq_len(&self) -> usize {
        self.x_final
            .as_ref()
            .and_then(|x| x.dim(1).ok())
            .unwrap_or(0)
    }
}

fn taped<'a>(slot: Option<&'a Tensor>, what: &str) -> Result<&'a Tensor> {
    slot.ok_or_else(|| {
        Error::invalid(
            "tape",
            format!("the forward recorded no {what} (not a taped forward)"),
        )
    })
}

/// First `len` positions of a taped `(1, .., T, ..)` tensor along `dim`.
fn first(t: &Tensor, dim: usize, len: usize) -> Result<Tensor> {
    Ok(t.narrow(dim, 0, len)?)
}

impl Transformer {
    /// Gradients with respect to the input embeddings for `k` cotangents on the final-norm
    /// hidden states: `cot` is `(k, T', d)` over positions `0..T'` of the taped sequence
    /// (`T' ≤ T`); the result is `(k, T', d)`, row `b` being `cot[b]ᵀ ∂h/∂x`.
    pub fn input_vjp(&self, tape: &Tape, cot: &Tensor) -> Result<Tensor> {
        self.input_vjp_lora(tape, cot, None)
    }

    /// [`Transformer::input_vjp`] that also accumulates the gradients of every attached LoRA
    /// adapter into `sink` (one cotangent per taped sequence: `cot` is `(b, T', d)` for a tape
    /// of `b` sequences). The frozen weights get
    /// no gradient; dropout masks are regenerated from the adapters' current seed, so the
    /// backward must run before the seed changes.
    pub fn input_vjp_lora(
        &self,
        tape: &Tape,
        cot: &Tensor,
        sink: Option<&mut LoraGrads>,
    ) -> Result<Tensor> {
        self.input_vjp_with(tape, cot, sink, &[])
    }

    /// [`Transformer::input_vjp_lora`] with extra cotangents on the heads' concatenated outputs
    /// (HOOK A, the input of `o_proj`): `z_cots` holds `(layer, (k, T_z, n_heads · head_dim))`
    /// with `T_z ≥ T'`, added to the gradient that reaches `z` of that layer from above. A loss
    /// on head outputs (the head-preservation term of METHODS.md §5.2) enters here.
    pub fn input_vjp_with(
        &self,
        tape: &Tape,
        cot: &Tensor,
        mut sink: Option<&mut LoraGrads>,
        z_cots: &[(usize, Tensor)],
    ) -> Result<Tensor> {
        let (k_sz, t_len, hidden) = cot.dims3()?;
        let cfg = self.config();
        if hidden != cfg.hidden_size || t_len == 0 || t_len > tape.seq_len() {
            return Err(Error::invalid(
                "cotangent",
                format!(
                    "shape {:?} does not fit a taped sequence of {} positions and hidden size {}",
                    cot.dims(),
                    tape.seq_len(),
                    cfg.hidden_size
                ),
            ));
        }
        let tape_batch = tape.batch();
        if tape_batch > 1 && k_sz != tape_batch {
            return Err(Error::invalid(
                "cotangent",
                format!(
                    "a tape of {tape_batch} sequences takes one cotangent per sequence, got {k_sz}"
                ),
            ));
        }
        if sink.is_some() && tape_batch == 1 && k_sz != 1 {
            return Err(Error::invalid(
                "cotangent",
                "adapter gradients need exactly one cotangent per taped sequence",
            ));
        }
        if tape.layers.len() != self.layers.len() {
            return Err(Error::invalid(
                "tape",
                format!(
                    "{} layers recorded, the model has {}",
                    tape.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        let use_lora = tape.use_lora;
        let cos = first(taped(tape.cos.as_ref(), "RoPE table")?, 0, t_len)?.contiguous()?;
        let sin = first(taped(tape.sin.as_ref(), "RoPE table")?, 0, t_len)?.contiguous()?;
        let neg_sin = sin.neg()?;
        let local = match &tape.local_rope {
            Some((cos, sin)) => {
                let cos = first(cos, 0, t_len)?.contiguous()?;
                let neg_sin = first(sin, 0, t_len)?.contiguous()?.neg()?;
                Some((cos, neg_sin))
            }
            None => None,
        };
        let x_final = first(taped(tape.x_final.as_ref(), "final residual")?, 1, t_len)?;
        let mut grad = rms_norm_vjp(&self.norm, &x_final, cot)?;
        // A norm on a sub-layer's output (Gemma 3, OLMo-2) takes the residual gradient back to
        // the sub-layer's raw output.
        let out_norm_vjp = |norm: &Option<RmsNorm>, raw: &Option<Tensor>, g: &Tensor| match norm {
            None => Ok(g.clone()),
            Some(norm) => rms_norm_vjp(
                norm,
                &first(
                    taped(raw.as_ref(), "sub-layer output before its norm")?,
                    1,
                    t_len,
                )?,
                g,
            ),
        };
        for (layer_idx, (layer, lt)) in self.layers.iter().zip(&tape.layers).enumerate().rev() {
            // MLP: h = x_mid + N_mo(down(act(gate(n)) ⊙ up(n))), n = N_2(x_mid).
            let d_mlp = out_norm_vjp(&layer.mlp_out_norm, &lt.mlp_raw, &grad)?;
            let gate = first(taped(lt.gate.as_ref(), "gate projection")?, 1, t_len)?;
            let up = first(taped(lt.up.as_ref(), "up projection")?, 1, t_len)?;
            let inputs = match sink {
                Some(_) => Some((
                    first(taped(lt.n2.as_ref(), "second norm")?, 1, t_len)?,
                    first(taped(lt.h.as_ref(), "MLP hidden")?, 1, t_len)?,
                )),
                None => None,
            };
            let d_hidden = linear_vjp(
                &layer.mlp.down_proj,
                &d_mlp,
                use_lora,
                lora_target(
                    &mut sink,
                    layer_idx,
                    "down_proj",
                    inputs.as_ref().map(|i| &i.1),
                ),
            )?;
            let (d_gate, d_up) = glu_vjp(cfg.hidden_act, &gate, &up, &d_hidden)?;
            let d_normed = (linear_vjp(
                &layer.mlp.gate_proj,
                &d_gate,
                use_lora,
                lora_target(
                    &mut sink,
                    layer_idx,
                    "gate_proj",
                    inputs.as_ref().map(|i| &i.0),
                ),
            )? + linear_vjp(
                &layer.mlp.up_proj,
                &d_up,
                use_lora,
                lora_target(
                    &mut sink,
                    layer_idx,
                    "up_proj",
                    inputs.as_ref().map(|i| &i.0),
                ),
            )?)?;
            let x_mid = first(taped(lt.x_mid.as_ref(), "mid residual")?, 1, t_len)?;
            grad = match &layer.post_attention_layernorm {
                Some(norm) => rms_norm_vjp_add(norm, &x_mid, &d_normed, &grad)?,
                None => (grad + d_normed)?,
            };

            // Attention: x_mid = x_in + N_ao(o(attn(N_1(x_in)))).
            let d_attn = out_norm_vjp(&layer.attn_out_norm, &lt.attn_raw, &grad)?;
            let (cos, neg_sin) = match &local {
                Some((cos, neg_sin)) if cfg.local_rope(layer_idx) => (cos, neg_sin),
                _ => (&cos, &neg_sin),
            };
            let z_cot = z_cots
                .iter()
                .filter(|(l, _)| *l == layer_idx)
                .map(|(_, t)| t.narrow(1, 0, t_len))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let d_normed = self.attention_vjp(
                layer_idx,
                layer,
                lt,
                &d_attn,
                cos,
                neg_sin,
                use_lora,
                sink.as_deref_mut(),
                &z_cot,
            )?;
            let x_in = first(taped(lt.x_in.as_ref(), "layer input")?, 1, t_len)?;
            grad = match &layer.input_layernorm {
                Some(norm) => rms_norm_vjp_add(norm, &x_in, &d_normed, &grad)?,
                None => (grad + d_normed)?,
            };
            debug_assert_eq!(grad.dims(), &[k_sz, t_len, hidden]);
        }
        Ok(grad)
    }

    /// The attention block's VJP from its output gradient `(k, T', d)` to the gradient on its
    /// (normed) input `(k, T', d)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_vjp(
        &self,
        layer_idx: usize,
        layer: &DecoderLayer,
        lt: &LayerTape,
        d_out: &Tensor,
        cos: &Tensor,
        neg_sin: &Tensor,
        use_lora: bool,
        mut sink: Option<&mut LoraGrads>,
        z_cot: &[Tensor],
    ) -> Result<Tensor> {
        let cfg = self.config();
        let (k_sz, t_len, _) = d_out.dims3()?;
        let n_heads = cfg.num_attention_heads;
        let n_kv = cfg.num_key_value_heads;
        let head_dim = cfg.head_dim;
        let scale = cfg.attn_scale();
        let attn = &layer.self_attn;
        let inputs = match sink {
            Some(_) => Some((
                first(taped(lt.n1.as_ref(), "first norm")?, 1, t_len)?,
                first(taped(lt.z.as_ref(), "head outputs")?, 1, t_len)?,
            )),
            None => None,
        };

        // (k, T', n_heads · head_dim)
        let d_z = linear_vjp(
            &attn.o_proj,
            d_out,
            use_lora,
            lora_target(
                &mut sink,
                layer_idx,
                "o_proj",
                inputs.as_ref().map(|i| &i.1),
            ),
        )?;
        let mut d_z = d_z;
        for extra in z_cot {
            d_z = (d_z + extra.to_dtype(d_out.dtype())?)?;
        }
        let dims = AttnDims {
            k_sz,
            t_len,
            n_heads,
            n_kv,
            head_dim,
            scale,
            softcap: cfg.attn_logit_softcapping,
        };
        let tape_batch = taped(lt.q.as_ref(), "queries")?.dim(0)?;
        let (d_q, d_k, d_v) = if tape_batch == 1 {
            attention_core_any(lt, &d_z, cos, neg_sin, dims)?
        } else {
            // A batch of sequences (one cotangent each): the attention core per sequence,
            // every linear product above and below it batched over all of them.
            let mut parts = (Vec::new(), Vec::new(), Vec::new());
            for b in 0..tape_batch {
                let one = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                    Ok(match t {
                        Some(t) => Some(t.narrow(0, b, 1)?),
                        None => None,
                    })
                };
                let lt_b = LayerTape {
                    q: one(&lt.q)?,
                    k: one(&lt.k)?,
                    v: one(&lt.v)?,
                    probs: one(&lt.probs)?,
                    ..LayerTape::default()
                };
                let dims_b = AttnDims { k_sz: 1, ..dims };
                let (dq, dk, dv) =
                    attention_core_any(&lt_b, &d_z.narrow(0, b, 1)?, cos, neg_sin, dims_b)?;
                parts.0.push(dq);
                parts.1.push(dk);
                parts.2.push(dv);
            }
            (
                Tensor::cat(&parts.0, 0)?,
                Tensor::cat(&parts.1, 0)?,
                Tensor::cat(&parts.2, 0)?,
            )
        };
        // The q/k norms (per head, or over the projection in OLMo-2) sit between the projections
        // and RoPE: their backward takes the gradient on the normalised queries and keys to the
        // projections' outputs.
        let head_norm_vjp = |norm: &Option<RmsNorm>,
                             taped_x: &Option<Tensor>,
                             d: Tensor,
                             heads: usize|
         -> Result<Tensor> {
            let Some(norm) = norm else { return Ok(d) };
            let x = first(
                taped(taped_x.as_ref(), "projection before the head norm")?,
                1,
                t_len,
            )?;
            if norm.weight.dim(0)? == heads * head_dim {
                return rms_norm_vjp(norm, &x, &d);
            }
            let (b, t) = (x.dim(0)?, x.dim(1)?);
            let x = x.reshape((b, t, heads, head_dim))?;
            let (k, t2, _) = d.dims3()?;
            let d4 = d.reshape((k, t2, heads, head_dim))?;
            Ok(rms_norm_vjp(norm, &x, &d4)?.reshape((k, t2, heads * head_dim))?)
        };
        let d_q = head_norm_vjp(&attn.q_norm, &lt.q_proj, d_q, n_heads)?;
        let d_k = head_norm_vjp(&attn.k_norm, &lt.k_proj, d_k, n_kv)?;
        let n1 = inputs.as_ref().map(|i| &i.0);
        let d_in = (linear_vjp(
            &attn.q_proj,
            &d_q,
            use_lora,
            lora_target(&mut sink, layer_idx, "q_proj", n1),
        )? + linear_vjp(
            &attn.k_proj,
            &d_k,
            use_lora,
            lora_target(&mut sink, layer_idx, "k_proj", n1),
        )?)?;
        Ok((d_in
            + linear_vjp(
                &attn.v_proj,
                &d_v,
                use_lora,
                lora_target(&mut sink, layer_idx, "v_proj", n1),
            )?)?)
    }
}

/// [`attention_core_blas`] where it applies, else [`attention_core`] (one taped sequence).
fn attention_core_any(
    lt: &LayerTape,
    d_z: &Tensor,
    cos: &Tensor,
    neg_sin: &Tensor,
    dims: AttnDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    if dims.softcap.is_some() {
        return attention_core(lt, d_z, cos, neg_sin, dims);
    }
    match attention_core_blas(lt, d_z, cos, neg_sin, dims)? {
        Some(grads) => Ok(grads),
        None => attention_core(lt, d_z, cos, neg_sin, dims),
    }
}

/// A [`LoraTarget`] when there is a sink and a taped input.
fn lora_target<'a>(
    sink: &'a mut Option<&mut LoraGrads>,
    layer: usize,
    module: &'static str,
    input: Option<&'a Tensor>,
) -> Option<LoraTarget<'a>> {
    match (sink.as_deref_mut(), input) {
        (Some(sink), Some(input)) => Some(LoraTarget {
            sink,
            layer,
            module,
            input,
        }),
        _ => None,
    }
}

/// Shapes of one attention backward.
#[derive(Clone, Copy, Debug)]
struct AttnDims {
    k_sz: usize,
    t_len: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    scale: f64,
    /// Gemma 2's attention soft-capping.
    softcap: Option<f64>,
}

/// From `dz` `(k, T', n_heads · hd)` (the gradient on the heads' concatenated outputs) to the
/// gradients on the projections `q` `(k, T', n_heads · hd)`, `k` and `v` `(k, T', n_kv · hd)`,
/// RoPE undone; candle ops, any device and dtype.
fn attention_core(
    lt: &LayerTape,
    d_z: &Tensor,
    cos: &Tensor,
    neg_sin: &Tensor,
    dims: AttnDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let AttnDims {
        k_sz,
        t_len,
        n_heads,
        n_kv,
        head_dim,
        scale,
        softcap,
    } = dims;
    let n_rep = n_heads / n_kv;
    // (k, T', n_heads, head_dim)
    let d_z = d_z.reshape((k_sz, t_len, n_heads, head_dim))?;
    // The k cotangents are stacked into the rows of per-head products, so each product is
    // one matmul per head over k·T' rows, and the taped activations are never copied k times.
    // (n_heads, k·T', head_dim)
    let d_z_rows =
        d_z.permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((n_heads, k_sz * t_len, head_dim))?;
    // (n_heads, T', k·head_dim)
    let d_z_cols =
        d_z.permute((2, 1, 0, 3))?
            .contiguous()?
            .reshape((n_heads, t_len, k_sz * head_dim))?;
    let repeat_kv = |t: &Tensor| -> Result<Tensor> {
        // (1, n_kv, T', hd) -> (n_heads, T', hd), head h reading kv head h / n_rep.
        Ok(t.squeeze(0)?
            .unsqueeze(1)?
            .broadcast_as((n_kv, n_rep, t_len, head_dim))?
            .reshape((n_heads, t_len, head_dim))?)
    };
    // (n_heads, T', T')
    let probs = taped(lt.probs.as_ref(), "attention pattern")?
        .squeeze(0)?
        .narrow(1, 0, t_len)?
        .narrow(2, 0, t_len)?
        .contiguous()?;
    let q = first(taped(lt.q.as_ref(), "queries")?, 2, t_len)?
        .squeeze(0)?
        .contiguous()?;
    let k = repeat_kv(&first(taped(lt.k.as_ref(), "keys")?, 2, t_len)?)?;
    let v = repeat_kv(&first(taped(lt.v.as_ref(), "values")?, 2, t_len)?)?;

    // z = P v  →  dP = dz vᵀ; (n_heads, k, T', T')
    let d_probs = bmm(&d_z_rows, &v.contiguous()?, true)?.reshape((n_heads, k_sz, t_len, t_len))?;
    // P = softmax(S)  →  dS = P ⊙ (dP − Σ_j dP ⊙ P)
    let p4 = probs.unsqueeze(1)?; // (n_heads, 1, T', T')
    let row_dot = d_probs.broadcast_mul(&p4)?.sum_keepdim(D::Minus1)?;
    let d_scores = d_probs.broadcast_sub(&row_dot)?.broadcast_mul(&p4)?;
    // Gemma 2: S = cap · tanh(S_raw / cap)  →  dS_raw = dS ⊙ (1 − (S / cap)²), with S_raw
    // recomputed from the taped queries and keys.
    let d_scores = match softcap {
        None => d_scores,
        Some(cap) => {
            let raw = (bmm(&q, &k.contiguous()?, true)? * scale)?; // (n_heads, T', T')
            let slope = (raw / cap)?.tanh()?.sqr()?.affine(-1.0, 1.0)?;
            d_scores.broadcast_mul(&slope.unsqueeze(1)?)?
        }
    };
    // S = scale · q kᵀ  →  dq = scale · dS k; (n_heads, k, T', hd)
    let d_q = (bmm(
        &d_scores.reshape((n_heads, k_sz * t_len, t_len))?,
        &k.contiguous()?,
        false,
    )? * scale)?
        .reshape((n_heads, k_sz, t_len, head_dim))?;
    // dk = scale · dSᵀ q, with rows (key position, cotangent); (n_heads, T', k, hd)
    let d_k = (bmm(
        &d_scores
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .reshape((n_heads, t_len * k_sz, t_len))?,
        &q,
        false,
    )? * scale)?
        .reshape((n_heads, t_len, k_sz, head_dim))?;
    // dv = Pᵀ dz; (n_heads, T', k, hd)
    let d_v = bmm(&probs.t()?.contiguous()?, &d_z_cols, false)?
        .reshape((n_heads, t_len, k_sz, head_dim))?;
    // Query heads sharing a kv head add their key and value gradients; (n_kv, T', k, hd)
    let sum_groups = |t: Tensor| -> Result<Tensor> {
        Ok(t.reshape((n_kv, n_rep, t_len, k_sz, head_dim))?.sum(1)?)
    };
    let (d_k, d_v) = (sum_groups(d_k)?, sum_groups(d_v)?);
    // RoPE is a rotation per position; its transpose rotates by −θ.
    let d_q = candle_nn::rotary_emb::rope(&d_q.contiguous()?, cos, neg_sin)?;
    let d_k = candle_nn::rotary_emb::rope_thd(&d_k.contiguous()?, cos, neg_sin)?;
    // -> (k, T', heads · hd)
    let d_q =
        d_q.permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((k_sz, t_len, n_heads * head_dim))?;
    let kv_flat = |t: Tensor| -> Result<Tensor> {
        Ok(t.permute((2, 1, 0, 3))?
            .contiguous()?
            .reshape((k_sz, t_len, n_kv * head_dim))?)
    };
    let (d_k, d_v) = (kv_flat(d_k)?, kv_flat(d_v)?);
    Ok((d_q, d_k, d_v))
}

/// Shape invariant of the fused kernels: `f32_data` returns one slice per tensor.
fn wrong_arity() -> Error {
    Error::invalid("fused backward", "tensor count mismatch")
}

/// [`attention_core`] on CPU f32 through strided BLAS products on the taped buffers, without
/// the copies and strided element-wise passes candle needs for the same layouts (which took
/// ~70% of the attention backward). `None` where BLAS does not apply.
fn attention_core_blas(
    lt: &LayerTape,
    d_z: &Tensor,
    cos: &Tensor,
    neg_sin: &Tensor,
    dims: AttnDims,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !BLAS_ENABLED {
        return Ok(None);
    }
    let AttnDims {
        k_sz,
        t_len,
        n_heads,
        n_kv,
        head_dim: hd,
        scale,
        ..
    } = dims;
    let n_rep = n_heads / n_kv;
    let probs = taped(lt.probs.as_ref(), "attention pattern")?;
    let t_full = probs.dim(D::Minus1)?;
    let tensors = [
        probs,
        taped(lt.q.as_ref(), "queries")?,
        taped(lt.k.as_ref(), "keys")?,
        taped(lt.v.as_ref(), "values")?,
        d_z,
        cos,
        neg_sin,
    ];
    let Some(owned) = cpu_f32_contiguous(&tensors)? else {
        return Ok(None);
    };
    let guards: Vec<_> = owned.iter().map(Tensor::storage_and_layout).collect();
    let data = f32_data(&guards)?;
    let &[p, q, k, v, dz, cos, neg_sin] = data.as_slice() else {
        return Err(wrong_arity());
    };
    let rows = k_sz * t_len;
    let mut d_q = vec![0f32; rows * n_heads * hd];
    let mut d_k = vec![0f32; rows * n_kv * hd];
    let mut d_v = vec![0f32; rows * n_kv * hd];
    let mut d_s = vec![0f32; rows * t_len];
    // Regrouped copies for the key and value products.
    let mut d_s_t = vec![0f32; rows * t_len];
    let mut dz_t = vec![0f32; rows * hd];
    let mut dv_t = vec![0f32; rows * hd];
    let scale = scale as f32;
    let view = MatView::new;
    for h in 0..n_heads {
        let g = h / n_rep;
        let dz_h = view(h * hd, rows, hd, n_heads * hd);
        let kv_g = view(g * t_full * hd, t_len, hd, hd);
        // z = P v  →  dP = dz vᵀ for all k cotangents at once; (k·T', T')
        gemm_views(
            1.0,
            dz,
            dz_h,
            v,
            kv_g.t(),
            0.0,
            &mut d_s,
            view(0, rows, t_len, t_len),
        )?;
        // dS = P ⊙ (dP − Σ_j dP ⊙ P); keys after the query have P = 0.
        for (r, d_row) in d_s.chunks_exact_mut(t_len).enumerate() {
            let query = r % t_len;
            let p_at = (h * t_full + query) * t_full;
            let p_row = &p[p_at..=p_at + query];
            let dot: f32 = p_row.iter().zip(d_row.iter()).map(|(a, b)| a * b).sum();
            for (d, &pv) in d_row.iter_mut().zip(p_row) {
                *d = pv * (*d - dot);
            }
            d_row[query + 1..].fill(0.0);
        }
        // dq = scale · dS k
        gemm_views(
            scale,
            &d_s,
            view(0, rows, t_len, t_len),
            k,
            kv_g,
            0.0,
            &mut d_q,
            view(h * hd, rows, hd, n_heads * hd),
        )?;
        // dk += scale · dS_bᵀ q for every cotangent b in one product: dS is
        // regrouped as (query, b, key) so its transpose has rows (b, key),
        // exactly the rows of d_k (the heads of a group add up).
        for (b, block) in d_s.chunks_exact(t_len * t_len).enumerate() {
            for (query, row) in block.chunks_exact(t_len).enumerate() {
                let at = query * rows + b * t_len;
                d_s_t[at..at + t_len].copy_from_slice(row);
            }
        }
        gemm_views(
            scale,
            &d_s_t,
            view(0, t_len, rows, rows).t(),
            q,
            view(h * t_full * hd, t_len, hd, hd),
            1.0,
            &mut d_k,
            view(g * hd, rows, hd, n_kv * hd),
        )?;
        // dv += Pᵀ dz_b for every b in one product: dz regrouped as
        // (query, b·hd), the result (key, b·hd) added into d_v.
        for b in 0..k_sz {
            for query in 0..t_len {
                let from = (b * t_len + query) * n_heads * hd + h * hd;
                let at = query * k_sz * hd + b * hd;
                dz_t[at..at + hd].copy_from_slice(&dz[from..from + hd]);
            }
        }
        gemm_views(
            1.0,
            p,
            view(h * t_full * t_full, t_len, t_len, t_full).t(),
            &dz_t,
            view(0, t_len, k_sz * hd, k_sz * hd),
            0.0,
            &mut dv_t,
            view(0, t_len, k_sz * hd, k_sz * hd),
        )?;
        for b in 0..k_sz {
            for key in 0..t_len {
                let from = key * k_sz * hd + b * hd;
                let at = (b * t_len + key) * n_kv * hd + g * hd;
                for (out, &add) in d_v[at..at + hd].iter_mut().zip(&dv_t[from..from + hd]) {
                    *out += add;
                }
            }
        }
    }
    // RoPE is a rotation per position; its transpose rotates by −θ.
    rotate_rows(&mut d_q, t_len, n_heads, hd, cos, neg_sin);
    rotate_rows(&mut d_k, t_len, n_kv, hd, cos, neg_sin);
    let device = d_z.device();
    Ok(Some((
        Tensor::from_vec(d_q, (k_sz, t_len, n_heads * hd), device)?,
        Tensor::from_vec(d_k, (k_sz, t_len, n_kv * hd), device)?,
        Tensor::from_vec(d_v, (k_sz, t_len, n_kv * hd), device)?,
    )))
}

/// Rotate-half RoPE with tables `(T', hd/2)` applied in place to rows `(k·T', heads · hd)`:
/// `(x₁, x₂) → (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`.
fn rotate_rows(buf: &mut [f32], t_len: usize, heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (r, row) in buf.chunks_exact_mut(heads * hd).enumerate() {
        let t = r % t_len;
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Batched `a b` (or `a bᵀ`), through BLAS on CPU f32 (candle's matmul reached ~30 GFLOP/s on
/// these per-head shapes).
fn bmm(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    if let Some(product) = batched_matmul(a, b, transpose_b, 1.0)? {
        return Ok(product);
    }
    Ok(if transpose_b {
        a.matmul(&b.t()?)?
    } else {
        a.matmul(b)?
    })
}

/// `y = x W^T (+ b) (+ s · B A drop(x))` → `dx = dy W (+ s · drop(dy B A))`, for `dy` of shape
/// `(k, T, out)`; with a `target`, also `dB += s · dyᵀ (drop(x) Aᵀ)` and
/// `dA += s · (dy B)ᵀ drop(x)` (one cotangent).
fn linear_vjp(
    linear: &Linear,
    d_out: &Tensor,
    use_lora: bool,
    target: Option<LoraTarget<'_>>,
) -> Result<Tensor> {
    let (k_sz, t_len, out) = d_out.dims3()?;
    let d2 = d_out.reshape((k_sz * t_len, out))?.contiguous()?;
    let mut d_in = linear.weight.input_grad(&d2)?;
    if use_lora {
        if let Some(lora) = &linear.lora {
            // Detached: trained adapters are `Var`s, and ops on them would record an autograd
            // graph holding this backward's activations (and, through the optimizer's
            // moments, every earlier step's).
            let (a, b) = (lora.a.detach(), lora.b.detach());
            let dy_b = d2.matmul(&b)?; // (k·T, r)
            let mut delta = (dy_b.matmul(&a)? * lora.scale)?;
            let mask = match &lora.dropout {
                Some(dropout) => dropout
                    .mask(delta.shape(), delta.device())?
                    .map(|m| m.to_dtype(delta.dtype()))
                    .transpose()?,
                None => None,
            };
            if let Some(mask) = &mask {
                delta = delta.mul(mask)?;
            }
            if let Some(target) = target {
                let rows = target.input.dim(0)? * t_len;
                let x = target.input.reshape((rows, linear.in_features()))?;
                let x = match &mask {
                    Some(mask) => x.mul(mask)?,
                    None => x,
                };
                let u = x.matmul(&a.t()?)?; // (T, r)
                let d_b = (d2.t()?.matmul(&u)? * lora.scale)?;
                let d_a = (dy_b.t()?.matmul(&x)? * lora.scale)?;
                target.sink.add(target.layer, target.module, d_a, d_b)?;
            }
            d_in = (d_in + delta)?;
        }
    }
    Ok(d_in.reshape((k_sz, t_len, linear.in_features()))?)
}

/// `h = act(g) ⊙ u` → `(dg, du) = (dh ⊙ u ⊙ act'(g), dh ⊙ act(g))`, for the taped `g`, `u`
/// `(1, T', I)` and `dh` `(k, T', I)`.
fn glu_vjp(
    act: Activation,
    gate: &Tensor,
    up: &Tensor,
    d_hidden: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match act {
        Activation::Silu => swiglu_vjp(gate, up, d_hidden),
        Activation::GeluTanh => geglu_vjp(gate, up, d_hidden),
    }
}

/// [`glu_vjp`] for tanh-GELU: `gelu(g) = g Φ̃(g)`, `Φ̃(g) = (1 + tanh u) / 2`,
/// `u = c (g + 0.044715 g³)`, `c = √(2/π)`, so `gelu'(g) = Φ̃(g) + g (1 − tanh² u) c (1 + 3 ·
/// 0.044715 g²) / 2`. Computed in f32 from the taped gate.
fn geglu_vjp(gate: &Tensor, up: &Tensor, d_hidden: &Tensor) -> Result<(Tensor, Tensor)> {
    let dtype = d_hidden.dtype();
    // In f64: exact for f64 models, and the f32 result rounds once.
    let g = gate.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let (act, slope): (Vec<f64>, Vec<f64>) = g
        .iter()
        .map(|&g| {
            let tanh = (c * (g + 0.044_715 * g * g * g)).tanh();
            let phi = 0.5 * (1.0 + tanh);
            let slope = phi + 0.5 * g * (1.0 - tanh * tanh) * c * (1.0 + 3.0 * 0.044_715 * g * g);
            (g * phi, slope)
        })
        .unzip();
    let shape = gate.dims().to_vec();
    let device = gate.device();
    let act = Tensor::from_vec(act, shape.clone(), device)?.to_dtype(dtype)?;
    let slope = Tensor::from_vec(slope, shape, device)?.to_dtype(dtype)?;
    let up_slope = (up.to_dtype(dtype)? * slope)?;
    Ok((
        d_hidden.broadcast_mul(&up_slope)?,
        d_hidden.broadcast_mul(&act)?,
    ))
}

/// `h = silu(g) ⊙ u` → `(dg, du) = (dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), dh ⊙ silu(g))`, for the
/// taped `g`, `u` `(1, T', I)` and `dh` `(k, T', I)`. One fused pass on CPU f32 (candle's
/// chain of broadcast ops took ~8% of the backward); candle ops elsewhere.
fn swiglu_vjp(gate: &Tensor, up: &Tensor, d_hidden: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(owned) = cpu_f32_contiguous(&[gate, up, d_hidden])? {
        let guards: Vec<_> = owned.iter().map(Tensor::storage_and_layout).collect();
        let data = f32_data(&guards)?;
        let &[g, u, dh] = data.as_slice() else {
            return Err(wrong_arity());
        };
        let plane = g.len();
        let mut d_gate = vec![0f32; dh.len()];
        let mut d_up = vec![0f32; dh.len()];
        // Per (t, i): dh-independent factors once, then each cotangent.
        let mut neg_exp: Vec<f32> = g.iter().map(|&g| -g).collect();
        vexp::exp_in_place(&mut neg_exp);
        let factors: Vec<(f32, f32)> = g
            .iter()
            .zip(u)
            .zip(&neg_exp)
            .map(|((&g, &u), &e)| {
                let sig = 1.0 / (1.0 + e);
                (u * sig * (1.0 + g * (1.0 - sig)), g * sig)
            })
            .collect();
        for ((dh_b, dg_b), du_b) in dh
            .chunks_exact(plane)
            .zip(d_gate.chunks_exact_mut(plane))
            .zip(d_up.chunks_exact_mut(plane))
        {
            for (((&dh, dg), du), &(a, silu)) in dh_b.iter().zip(dg_b).zip(du_b).zip(&factors) {
                *dg = dh * a;
                *du = dh * silu;
            }
        }
        let shape = d_hidden.dims().to_vec();
        let device = d_hidden.device();
        return Ok((
            Tensor::from_vec(d_gate, shape.clone(), device)?,
            Tensor::from_vec(d_up, shape, device)?,
        ));
    }
    let sig = candle_nn::ops::sigmoid(&gate.contiguous()?)?;
    let silu = (gate * &sig)?;
    // d silu / d gate = σ(g) (1 + g (1 − σ(g)))
    let dsilu = (&sig * ((gate * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
    let up_dsilu = (up * dsilu)?;
    Ok((
        d_hidden.broadcast_mul(&up_dsilu)?,
        d_hidden.broadcast_mul(&silu)?,
    ))
}

/// `acc + rms_norm_vjp(norm, x, d_out)`, fused into one pass on CPU f32.
fn rms_norm_vjp_add(norm: &RmsNorm, x: &Tensor, d_out: &Tensor, acc: &Tensor) -> Result<Tensor> {
    if let Some(owned) = cpu_f32_contiguous(&[x, &norm.weight, d_out, acc])? {
        let guards: Vec<_> = owned.iter().map(Tensor::storage_and_layout).collect();
        let data = f32_data(&guards)?;
        let &[xs, w, dy, acc_data] = data.as_slice() else {
            return Err(wrong_arity());
        };
        let hidden = w.len();
        let plane = xs.len();
        let eps = norm.eps as f32;
        let inv_rms: Vec<f32> = xs
            .chunks_exact(hidden)
            .map(|row| {
                let mean = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
                1.0 / (mean + eps).sqrt()
            })
            .collect();
        let mut out = acc_data.to_vec();
        for (dy_b, out_b) in dy.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
            for (((dy_r, out_r), x_r), &r) in dy_b
                .chunks_exact(hidden)
                .zip(out_b.chunks_exact_mut(hidden))
                .zip(xs.chunks_exact(hidden))
                .zip(&inv_rms)
            {
                let dot: f32 = dy_r
                    .iter()
                    .zip(w)
                    .zip(x_r)
                    .map(|((d, w), x)| d * w * x)
                    .sum();
                let coeff = r * r * r * dot / hidden as f32;
                for (((o, d), w), x) in out_r.iter_mut().zip(dy_r).zip(w).zip(x_r) {
                    *o += r * d * w - x * coeff;
                }
            }
        }
        return Ok(Tensor::from_vec(out, acc.dims(), acc.device())?);
    }
    Ok((acc + rms_norm_vjp(norm, x, d_out)?)?)
}

/// `y = g ⊙ x r`, `r = (mean(x²) + eps)^(-1/2)` → `dx = r (dy ⊙ g) − x r³ Σ(dy ⊙ g ⊙ x) / d`;
/// `x` is the taped `(1, T, d)`, `d_out` is `(k, T, d)`.
fn rms_norm_vjp(norm: &RmsNorm, x: &Tensor, d_out: &Tensor) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + norm.eps)?
        .sqrt()?
        .recip()?; // (1, T, 1)
    let gy = d_out.broadcast_mul(&norm.weight)?; // (k, T, d)
    let dot = gy.broadcast_mul(x)?.sum_keepdim(D::Minus1)?; // (k, T, 1)
    let coeff = dot.broadcast_mul(&(r.powf(3.0)? / hidden as f64)?)?; // (k, T, 1)
    Ok((gy.broadcast_mul(&r)? - x.broadcast_mul(&coeff)?)?)
}
