//! A hookable decoder for the LLaMA family (LLaMA, Mistral, SmolLM, TinyLlama, Qwen2/3, Phi-3)
//! and its relatives with norms placed differently (Gemma 2/3, OLMo-2).
//!
//! Follows the Hugging Face transformers `modeling_llama.py` forward exactly (METHODS.md §0.1):
//! pre-norm blocks, rotate-half RoPE, grouped-query attention, SwiGLU MLP, final RMSNorm, and
//! `lm_head` (tied or not). The other families switch parts on through the config: q/k norms,
//! norms on the sub-layer outputs, GeGLU, Gemma's embedding scale, per-layer windows and RoPE
//! bases, and Gemma 2's soft-capping (each as its transformers modeling file does it). GGUF
//! checkpoints are converted to this layout at load time (LLaMA's q/k rows are un-permuted), so
//! one forward serves every format.
//!
//! Each forward chooses between a fast path (candle's fused RoPE, softmax and RMSNorm, which do
//! not propagate gradients) and a differentiable path (hand-written equivalents, and
//! [`crate::model::lora::frozen_matmul`] so frozen weights receive no gradient).

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::blas::batched_matmul;
use crate::model::config::{rope_inv_freq, rope_inv_freq_local, Activation, ModelConfig};
use crate::model::fused::{causal_attention, causal_softmax, silu_mul};
use crate::model::hooks::{Hook, HookPoint, NoHook};
use crate::model::lora::{Linear, LinearMode};
use crate::model::vjp::{LayerTape, Tape};
use crate::model::weight::Weight;

/// Which positions get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every position, `(b, T, V)`.
    All,
    /// The last position only, `(b, 1, V)`.
    Last,
    /// Positions `start..` of this call, `(b, T - start, V)` (e.g. only the response positions
    /// an attribution needs).
    From(usize),
    /// None: the forward returns the final-norm hidden states `(b, T, d)`.
    None,
}

/// Per-pass settings.
#[derive(Clone, Copy, Debug)]
pub struct ForwardOptions {
    /// Use autograd-safe ops (slower); needed whenever gradients are taken.
    pub differentiable: bool,
    /// Which positions get logits.
    pub logits: LogitsAt,
    /// Apply attached LoRA adapters.
    pub use_lora: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            differentiable: false,
            logits: LogitsAt::All,
            use_lora: true,
        }
    }
}

/// The input of a forward: token ids `(b, T)` (u32) or input embeddings `(b, T, d)`.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Token ids, `(b, T)`.
    Ids(&'a Tensor),
    /// Input embeddings, `(b, T, d)` (e.g. a `Var` for gradient attribution).
    Embeds(&'a Tensor),
    /// The residual stream entering layer `layer` (`h^(layer)`, `(b, T, d)`): the forward runs
    /// layers `layer..L` only. With a KV cache it continues the cached sequence; the cache must
    /// hold the earlier tokens of every layer from `layer` on (layers below are left as they
    /// were). A change at the last position of layer `l` leaves everything before layer `l` and
    /// every earlier position unchanged, so an intervention there needs only this partial pass
    /// (the instruction-vector analysis, METHODS.md §4).
    Resid {
        /// The first layer to run.
        layer: usize,
        /// `h^(layer)`, `(b, T, d)`.
        xs: &'a Tensor,
    },
}

/// Keys and values of earlier tokens, per layer, for incremental decoding.
///
/// A cache filled by [`Transformer::run_rows`] holds rows of different lengths side by side:
/// each row's padding slots are marked and never attended to, and each row's next token takes
/// the position after its own last real token.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Positions of the held keys, `(b, len)` row-major, `-1` for padding; `None` when every
    /// row holds the positions `0..len`.
    key_pos: Option<Vec<i32>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Sequences (rows) held; 0 when empty.
    pub fn rows(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(0).ok())
            .unwrap_or(0)
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of a one-sequence prefix repeated for a batch of `n` continuations (e.g. the
    /// candidate answers to one query, scored in one pass after the shared prefix ran once).
    pub fn repeat_batch(&self, n: usize) -> Result<Self> {
        if self
            .layers
            .iter()
            .flatten()
            .any(|(k, _)| k.dims().first() != Some(&1))
        {
            return Err(crate::error::Error::invalid(
                "KV cache",
                "only a one-sequence cache can be repeated",
            ));
        }
        self.select_rows(&vec![0; n])
    }

    /// Every layer's keys and values through `f`.
    fn map_layers(
        &self,
        f: impl Fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Vec<Option<(Tensor, Tensor)>>> {
        self.layers
            .iter()
            .map(|layer| layer.as_ref().map(|(k, v)| f(k, v)).transpose())
            .collect()
    }

    /// The number of real (not padding) tokens of each of `b` rows.
    fn real_lens(&self, b: usize) -> Result<Vec<usize>> {
        match &self.key_pos {
            None => Ok(vec![self.len; b]),
            Some(pos) => {
                if self.len == 0 || pos.len() != b * self.len {
                    return Err(Error::invalid(
                        "KV cache",
                        format!("{} rows held, {b} continued", pos.len() / self.len.max(1)),
                    ));
                }
                Ok(pos
                    .chunks(self.len)
                    .map(|row| row.iter().filter(|&&p| p >= 0).count())
                    .collect())
            }
        }
    }

    /// The rows of several caches of one model, in order, as one cache: shorter caches are
    /// padded at the end (the padding marked, so it is never attended to).
    pub fn concat(caches: &[&Self]) -> Result<Self> {
        let len = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let layers = caches.iter().map(|c| c.layers.len()).max().unwrap_or(0);
        let mut out = Self {
            layers: vec![None; layers],
            len,
            key_pos: Some(Vec::new()),
        };
        let mut rows = Vec::with_capacity(caches.len());
        for c in caches {
            let b = c.rows();
            if b == 0 {
                continue;
            }
            if c.layers.len() != layers || c.layers.iter().any(Option::is_none) {
                return Err(Error::invalid(
                    "KV cache",
                    "caches of different models cannot be joined",
                ));
            }
            let pos = match &c.key_pos {
                Some(pos) => pos.clone(),
                None => (0..b).flat_map(|_| 0..c.len as i32).collect(),
            };
            if let Some(all) = out.key_pos.as_mut() {
                for row in pos.chunks(c.len.max(1)).take(b) {
                    all.extend_from_slice(row);
                    all.extend(std::iter::repeat_n(-1, len - c.len));
                }
            }
            rows.push((c, b));
        }
        for layer in 0..layers {
            let mut ks = Vec::with_capacity(rows.len());
            let mut vs = Vec::with_capacity(rows.len());
            for (c, _) in &rows {
                if let Some((k, v)) = &c.layers[layer] {
                    ks.push(k.pad_with_zeros(2, 0, len - c.len)?);
                    vs.push(v.pad_with_zeros(2, 0, len - c.len)?);
                }
            }
            if !ks.is_empty() {
                out.layers[layer] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
            }
        }
        if rows.is_empty() {
            return Ok(Self::new());
        }
        Ok(out)
    }

    /// The same rows with each row's real keys moved to the front and the columns that are
    /// padding in every row dropped (keys keep their positions, so every continuation is
    /// unchanged): a padded cache continued for many steps stays as short as its longest row.
    pub fn compact(&self) -> Result<Self> {
        let Some(pos) = &self.key_pos else {
            return Ok(self.clone());
        };
        let b = pos.len() / self.len.max(1);
        let kept: Vec<Vec<u32>> = pos
            .chunks(self.len.max(1))
            .map(|row| {
                (0..row.len() as u32)
                    .filter(|&j| row[j as usize] >= 0)
                    .collect()
            })
            .collect();
        let len = kept.iter().map(Vec::len).max().unwrap_or(0);
        if len == self.len || len == 0 {
            return Ok(self.clone());
        }
        let mut idx = Vec::with_capacity(b * len);
        let mut key_pos = Vec::with_capacity(b * len);
        for (r, cols) in kept.iter().enumerate() {
            for i in 0..len {
                // Padding points at column 0; its position marks it.
                let j = cols.get(i).copied();
                idx.push(j.unwrap_or(0));
                key_pos.push(j.map_or(-1, |j| pos[r * self.len + j as usize]));
            }
        }
        let layers = self.map_layers(|k, v| {
            let (kb, heads, _, hd) = k.dims4()?;
            let index = Tensor::from_slice(&idx, (kb, 1, len, 1), k.device())?
                .broadcast_as((kb, heads, len, hd))?
                .contiguous()?;
            Ok((
                k.contiguous()?.gather(&index, 2)?,
                v.contiguous()?.gather(&index, 2)?,
            ))
        })?;
        Ok(Self {
            layers,
            len,
            key_pos: Some(key_pos),
        })
    }

    /// The first `n` tokens of a cache whose rows all hold positions `0..len` (not padded):
    /// what it held before the later tokens were added, in each layer it holds. A pass that
    /// starts at a layer (`Input::Resid`) fills only the layers from there on.
    pub fn truncate(&self, n: usize) -> Result<Self> {
        if self.key_pos.is_some() || n > self.len {
            return Err(Error::invalid(
                "KV cache",
                format!(
                    "cannot keep the first {n} of {} tokens of a padded or shorter cache",
                    self.len
                ),
            ));
        }
        Ok(Self {
            layers: self.map_layers(|k, v| Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)))?,
            len: n,
            key_pos: None,
        })
    }

    /// A cache whose row `i` is row `rows[i]` of this one (rows may repeat): the continuations
    /// of several sequences, each continued by any number of rows.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let layers = self.map_layers(|k, v| {
            let batch = k.dim(0)?;
            if let Some(&bad) = rows.iter().find(|&&r| r as usize >= batch) {
                return Err(crate::error::Error::invalid(
                    "KV cache",
                    format!("row {bad} of a cache of {batch} rows"),
                ));
            }
            let idx = Tensor::from_slice(rows, rows.len(), k.device())?;
            Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))
        })?;
        let key_pos = self.key_pos.as_ref().map(|pos| {
            rows.iter()
                .flat_map(|&r| &pos[r as usize * self.len..(r as usize + 1) * self.len])
                .copied()
                .collect()
        });
        Ok(Self {
            layers,
            len: self.len,
            key_pos,
        })
    }
}

/// RMSNorm with gain: `x / sqrt(mean(x²) + eps) ⊙ g`, computed in f32 as in transformers.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Gain `g`, `(d,)`.
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNorm {
    fn forward(&self, xs: &Tensor, differentiable: bool) -> Result<Tensor> {
        if !differentiable && xs.dtype() == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(
                &xs.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        let dtype = xs.dtype();
        // Half precision is normalised in f32 (as transformers does); f32 and f64 stay as they are.
        let compute = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let xs = xs.to_dtype(compute)?;
        let inv_rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normed = xs.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// Self-attention of one layer.
#[derive(Clone, Debug)]
pub struct Attention {
    /// `W_Q`.
    pub q_proj: Linear,
    /// `W_K`.
    pub k_proj: Linear,
    /// `W_V`.
    pub v_proj: Linear,
    /// `W_O`.
    pub o_proj: Linear,
    /// RMSNorm of the queries before RoPE: per head, gain `(head_dim,)` (Qwen3, Gemma 3), or
    /// over the whole projection, gain `(n_heads · head_dim,)` (OLMo-2).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm of the keys before RoPE, per head or over the whole projection as `q_norm`.
    pub k_norm: Option<RmsNorm>,
}

/// SwiGLU MLP of one layer.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `W_gate`.
    pub gate_proj: Linear,
    /// `W_up`.
    pub up_proj: Linear,
    /// `W_down`.
    pub down_proj: Linear,
}

/// One decoder layer: `x_mid = x + N_ao(attn(N_1(x)))`, `x_out = x_mid + N_mo(mlp(N_2(x_mid)))`,
/// where a norm the family lacks is the identity (LLaMA has no `N_ao`/`N_mo`; OLMo-2 has no
/// `N_1`/`N_2`). The `AttnOut` and `MlpOut` hooks see what is added to the residual stream (after
/// `N_ao`/`N_mo`), so `h[l+1] = h[l] + attn[l] + mlp[l]` holds in every family; with a post-norm,
/// `o_proj`'s output (the sum of the heads' `W_O` slices, §4) is the input of `N_ao`, not `attn[l]`.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// Norm before attention (`g_1`); `None` in OLMo-2.
    pub input_layernorm: Option<RmsNorm>,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP (`g_2`; Gemma's `pre_feedforward_layernorm`); `None` in OLMo-2.
    pub post_attention_layernorm: Option<RmsNorm>,
    /// MLP.
    pub mlp: Mlp,
    /// Norm on the attention output before the residual add (Gemma's and OLMo-2's
    /// `post_attention_layernorm`).
    pub attn_out_norm: Option<RmsNorm>,
    /// Norm on the MLP output before the residual add (`post_feedforward_layernorm`).
    pub mlp_out_norm: Option<RmsNorm>,
}

/// The full decoder.
#[derive(Clone, Debug)]
pub struct Transformer {
    cfg: ModelConfig,
    /// `E_in`, `(V, d)`.
    pub embed_tokens: Weight,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm (`g_final`).
    pub norm: RmsNorm,
    /// `U`, `(V, d)`; shares storage with `embed_tokens` when tied.
    pub lm_head: Linear,
    inv_freq: Tensor,
    /// Gemma 3's sliding layers: RoPE with the local base.
    inv_freq_local: Option<Tensor>,
    device: Device,
}

/// Everything a layer needs that is shared across layers of one forward.
struct PassCtx {
    mode: LinearMode,
    cos: Tensor,
    sin: Tensor,
    /// The local RoPE tables of Gemma 3's sliding layers.
    local: Option<(Tensor, Tensor)>,
    /// Additive masks `(T, T_kv)` by window (`None` for a single query token that sees every
    /// key): one per distinct window of the model's layers.
    masks: Vec<(Option<usize>, Option<Tensor>)>,
    /// Absolute position of the first query token (tokens already in the KV cache).
    offset: usize,
    /// Per-row positions of a padded batch; `None` for a dense one.
    rows: Option<RowPositions>,
}

/// The positions of a padded batch ([`Transformer::run_rows`]), `-1` marking padding: a query
/// sees the keys of its row whose position is at most its own (and inside its window).
#[derive(Clone, Debug)]
pub(crate) struct RowPositions {
    /// New tokens per row, `T`.
    pub seq: usize,
    /// Keys per row (cached, then new), `S`.
    pub kv_len: usize,
    /// Positions of the new tokens, `(b, T)` row-major.
    pub query: std::sync::Arc<Vec<i32>>,
    /// Positions of every key, `(b, S)` row-major.
    pub key: std::sync::Arc<Vec<i32>>,
}

impl RowPositions {
    /// Whether query `t` of row `b` sees key `j`. A padding query sees only its own key, so its
    /// output stays finite (it is never read).
    pub fn visible(&self, b: usize, t: usize, j: usize, window: Option<usize>) -> bool {
        let q = self.query[b * self.seq + t];
        if q < 0 {
            return j == self.kv_len - self.seq + t;
        }
        let k = self.key[b * self.kv_len + j];
        k >= 0 && k <= q && window.is_none_or(|w| ((q - k) as usize) < w)
    }
}

impl PassCtx {
    /// The RoPE tables of layer `layer`.
    fn rope(&self, cfg: &ModelConfig, layer: usize) -> (&Tensor, &Tensor) {
        match &self.local {
            Some((cos, sin)) if cfg.local_rope(layer) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }

    /// The additive mask for a window.
    fn mask(&self, window: Option<usize>) -> Option<&Tensor> {
        self.masks
            .iter()
            .find(|(w, _)| *w == window)
            .and_then(|(_, m)| m.as_ref())
    }
}

impl Transformer {
    /// Assembles a model from parts; `embed_tokens` must be `(V, d)`.
    pub fn new(
        cfg: ModelConfig,
        embed_tokens: impl Into<Weight>,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
        lm_head: Linear,
    ) -> Result<Self> {
        let embed_tokens = embed_tokens.into();
        let device = embed_tokens.device();
        let inv_freq = rope_inv_freq(&cfg);
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), &device)?;
        let inv_freq_local = rope_inv_freq_local(&cfg)
            .map(|f| Tensor::from_vec(f, (1, half), &device))
            .transpose()?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
            device,
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Every weight matrix: embeddings, each layer's projections, and `lm_head`.
    pub fn weight_matrices(&self) -> Vec<&Weight> {
        let mut all = vec![&self.embed_tokens];
        for layer in &self.layers {
            all.extend(layer.linears().map(|l| &l.weight));
        }
        all.push(&self.lm_head.weight);
        all
    }

    /// Bytes the base weights hold in memory: matrices as held (a tied `lm_head` counted
    /// once), norms and biases. Adapters are not counted.
    pub fn resident_bytes(&self) -> usize {
        let matrices = self.weight_matrices();
        let (head, rest) = matrices.split_last().unzip();
        let mut total: usize = rest.unwrap_or_default().iter().map(|w| w.bytes()).sum();
        if let Some(head) = head.filter(|h| !h.shares_storage(&self.embed_tokens)) {
            total += head.bytes();
        }
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut small: Vec<&Tensor> = vec![&self.norm.weight];
        for layer in &self.layers {
            let norms = [
                &layer.input_layernorm,
                &layer.post_attention_layernorm,
                &layer.attn_out_norm,
                &layer.mlp_out_norm,
                &layer.self_attn.q_norm,
                &layer.self_attn.k_norm,
            ];
            small.extend(norms.into_iter().flatten().map(|n| &n.weight));
            small.extend(layer.linears().into_iter().filter_map(|l| l.bias.as_ref()));
        }
        total + small.into_iter().map(bytes).sum::<usize>()
    }

    /// How the weights are held: the dtype (`f32`), or `as stored (…)` with the kinds present.
    pub fn weights_label(&self) -> String {
        let matrices = self.weight_matrices();
        if !matrices.iter().any(|w| matches!(w, Weight::Packed(_))) {
            return format!("{:?}", self.dtype()).to_lowercase();
        }
        let mut kinds: Vec<String> = matrices.iter().map(|w| w.label()).collect();
        kinds.sort();
        kinds.dedup();
        format!("as stored ({})", kinds.join(", "))
    }

    /// Looks up input embeddings for ids `(b, T)`, giving `(b, T, d)`: the residual stream
    /// entering layer 0 (Gemma's `√d` scale included, so [`Input::Embeds`] takes the same).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b_sz, seq_len) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let xs = self.embed_tokens.index_rows(&flat)?;
        let xs = xs.reshape((b_sz, seq_len, self.cfg.hidden_size))?;
        if !self.cfg.scale_embeddings {
            return Ok(xs);
        }
        // transformers multiplies by `√d` rounded to the weights' dtype.
        let scale = Tensor::new(&[(self.cfg.hidden_size as f64).sqrt()], &self.device)?
            .to_dtype(xs.dtype())?;
        Ok(xs.broadcast_mul(&scale)?)
    }

    /// Logits at every position for ids `(b, T)`, on the fast path.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_hooked(ids, &mut NoHook)
    }

    /// Logits at every position for ids `(b, T)`, calling `hook` at every hook point.
    pub fn forward_hooked(&self, ids: &Tensor, hook: &mut dyn Hook) -> Result<Tensor> {
        self.run(Input::Ids(ids), &ForwardOptions::default(), None, hook)
    }

    /// The general forward: ids or embeddings in; logits (or final hidden states) out.
    /// With a `cache`, the input continues the cached sequence and the cache is extended.
    pub fn run(
        &self,
        input: Input<'_>,
        opts: &ForwardOptions,
        cache: Option<&mut KvCache>,
        hook: &mut dyn Hook,
    ) -> Result<Tensor> {
        self.run_inner(input, opts, cache, hook, None, None, None)
    }

    /// A fast forward of a right-padded batch of ids `(b, T)` in which row `r` has `lens[r]`
    /// real tokens (`0..=T`; the rest are padding, any valid id): each row continues its own
    /// row of `cache` (whose rows may themselves hold different numbers of real tokens), its
    /// tokens take the positions after its own last real one, and no real token attends to
    /// padding. [`LogitsAt::Last`] gives each row's last real token (rows with no new token
    /// give an unspecified row). The cache is extended with the padding marked.
    ///
    /// Sequences of different lengths thus share one forward: every weight matrix is streamed
    /// once for all of them. Inference only (`opts.differentiable` is refused). A padded cache
    /// can also be continued through [`Transformer::run`] (rows of equal new length); a hook
    /// there sees positions counted from the padded cache's length, not each row's.
    pub fn run_rows(
        &self,
        ids: &Tensor,
        lens: &[usize],
        opts: &ForwardOptions,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        if lens.len() != b || lens.iter().any(|&l| l > seq) {
            return Err(Error::invalid(
                "padded batch",
                format!("{} lengths for {b} rows of {seq} tokens", lens.len()),
            ));
        }
        if opts.differentiable {
            return Err(Error::invalid(
                "padded batch",
                "differentiable passes take equal-length rows",
            ));
        }
        self.run_inner(
            Input::Ids(ids),
            opts,
            Some(cache),
            &mut NoHook,
            None,
            None,
            Some(lens),
        )
    }

    /// Runs layers up to (not including) `end` and returns the residual stream entering layer
    /// `end`, `(b, T, d)`, skipping the rest of the model: for passes that only read early
    /// activations through a hook. With a cache, the layers from `end` on are left holding the
    /// earlier tokens only, so the cache must not be continued afterwards.
    pub fn run_until(
        &self,
        input: Input<'_>,
        opts: &ForwardOptions,
        cache: Option<&mut KvCache>,
        hook: &mut dyn Hook,
        end: usize,
    ) -> Result<Tensor> {
        self.run_inner(input, opts, cache, hook, None, Some(end), None)
    }

    /// A fast (non-differentiable) forward that also records the activations
    /// [`Transformer::input_vjp`] needs; returns the final-norm hidden states `(b, T, d)`. One
    /// sequence (`b = 1`) takes any number of cotangents in the backward; a batch takes one per
    /// sequence (LoRA training).
    pub fn run_taped(&self, input: Input<'_>, use_lora: bool) -> Result<(Tensor, Tape)> {
        self.run_taped_hooked(input, use_lora, &mut NoHook)
    }

    /// [`Transformer::run_taped`] calling `hook` at every hook point. A hook that adds a
    /// constant (a steering vector) leaves the backward as it is; the tape records the edited
    /// activations.
    pub fn run_taped_hooked(
        &self,
        input: Input<'_>,
        use_lora: bool,
        hook: &mut dyn Hook,
    ) -> Result<(Tensor, Tape)> {
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::None,
            use_lora,
        };
        if matches!(input, Input::Resid { .. }) {
            return Err(Error::invalid(
                "taped forward",
                "starts at the embeddings, not at a layer",
            ));
        }
        let mut tape = Tape::default();
        let hidden = self.run_inner(input, &opts, None, hook, Some(&mut tape), None, None)?;
        tape.use_lora = use_lora;
        Ok((hidden, tape))
    }

    // The pass's optional parts (cache, hook, tape, early end, padded lengths) are what its
    // public entry points choose among.
    #[allow(clippy::too_many_arguments)]
    fn run_inner(
        &self,
        input: Input<'_>,
        opts: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
        hook: &mut dyn Hook,
        mut tape: Option<&mut Tape>,
        end: Option<usize>,
        lens: Option<&[usize]>,
    ) -> Result<Tensor> {
        let offset = cache.as_ref().map_or(0, |c| c.len);
        hook.set_position_offset(offset);
        let mut first_layer = 0;
        let mut xs = match input {
            Input::Resid { layer, xs } => {
                let (_, _, hidden) = xs.dims3()?;
                if hidden != self.cfg.hidden_size || layer > self.layers.len() {
                    return Err(Error::invalid(
                        "residual input",
                        format!(
                            "hidden size {hidden} at layer {layer}; the model has {} and {} layers",
                            self.cfg.hidden_size,
                            self.layers.len()
                        ),
                    ));
                }
                first_layer = layer;
                xs.to_dtype(self.dtype())?
            }
            Input::Ids(ids) => {
                if ids.dtype() != DType::U32 {
                    return Err(Error::invalid("token ids", "expected u32 ids"));
                }
                self.check_ids(ids)?;
                self.embed(ids)?
            }
            Input::Embeds(embeds) => {
                let (_, _, hidden) = embeds.dims3()?;
                if hidden != self.cfg.hidden_size {
                    return Err(Error::invalid(
                        "input embeddings",
                        format!(
                            "hidden size {hidden}, the model's is {}",
                            self.cfg.hidden_size
                        ),
                    ));
                }
                embeds.to_dtype(self.dtype())?
            }
        };
        let (b_sz, seq_len, _) = xs.dims3()?;
        if seq_len == 0 {
            return Err(Error::EmptyPrompt);
        }
        // A padded batch, or any continuation of a padded cache: positions per row.
        let padded = lens.is_some() || cache.as_ref().is_some_and(|c| c.key_pos.is_some());
        let rows = if padded {
            if opts.differentiable || tape.is_some() {
                return Err(Error::invalid(
                    "padded batch",
                    "differentiable and taped passes take equal-length rows",
                ));
            }
            let full = vec![seq_len; b_sz];
            let lens = lens.unwrap_or(&full);
            let held = match cache.as_deref() {
                Some(c) if c.len > 0 => c.real_lens(b_sz)?,
                _ => vec![0; b_sz],
            };
            if let Some((r, _)) = held
                .iter()
                .zip(lens)
                .enumerate()
                .find(|(_, (h, l))| *h + *l > self.cfg.max_position_embeddings)
            {
                return Err(Error::PromptTooLong {
                    len: held[r] + lens[r],
                    max: self.cfg.max_position_embeddings,
                });
            }
            Some(Self::row_positions(cache.as_deref(), &held, lens, seq_len))
        } else {
            if offset + seq_len > self.cfg.max_position_embeddings {
                return Err(Error::PromptTooLong {
                    len: offset + seq_len,
                    max: self.cfg.max_position_embeddings,
                });
            }
            None
        };
        if first_layer == 0 {
            xs = replace_if(hook, HookPoint::Embed, xs)?;
        }
        let pass = self.pass_ctx(*opts, offset, seq_len, rows)?;
        if let Some(cache) = cache.as_deref_mut() {
            if cache.layers.len() != self.layers.len() {
                cache.layers = vec![None; self.layers.len()];
            }
        }
        for (layer_idx, layer) in self.layers.iter().enumerate().skip(first_layer) {
            if end.is_some_and(|e| layer_idx >= e) {
                return Ok(xs);
            }
            let layer_cache = match cache.as_deref_mut() {
                Some(c) => Some(&mut c.layers[layer_idx]),
                None => None,
            };
            let layer_tape = match tape.as_deref_mut() {
                Some(t) => {
                    t.layers.push(LayerTape::default());
                    t.layers.last_mut()
                }
                None => None,
            };
            xs = layer.forward(
                layer_idx,
                &xs,
                &self.cfg,
                &pass,
                layer_cache,
                hook,
                *opts,
                layer_tape,
            )?;
        }
        if end.is_some() {
            return Ok(xs);
        }
        if let Some(tape) = tape {
            tape.x_final = Some(xs.clone());
            tape.cos = Some(pass.cos.clone());
            tape.sin = Some(pass.sin.clone());
            tape.local_rope.clone_from(&pass.local);
        }
        let last_real = pass.rows.as_ref().map(|_| lens.map(<[usize]>::to_vec));
        if let Some(cache) = cache {
            cache.len = offset + seq_len;
            if let Some(rows) = &pass.rows {
                cache.key_pos = Some(rows.key.as_ref().clone());
            }
        }
        match opts.logits {
            LogitsAt::Last => {
                if let Some(Some(lens)) = last_real {
                    // Each row's last real token.
                    let idx: Vec<u32> = lens
                        .iter()
                        .enumerate()
                        .map(|(r, &l)| (r * seq_len + l.max(1) - 1) as u32)
                        .collect();
                    let idx = Tensor::from_vec(idx, b_sz, xs.device())?;
                    let d = xs.dim(2)?;
                    xs = xs
                        .reshape((b_sz * seq_len, d))?
                        .index_select(&idx, 0)?
                        .unsqueeze(1)?;
                } else if seq_len > 1 {
                    xs = xs.narrow(1, seq_len - 1, 1)?;
                }
            }
            LogitsAt::From(start) if start > 0 => {
                if start >= seq_len {
                    return Err(Error::invalid(
                        "logits",
                        format!("start {start} is past the {seq_len} positions"),
                    ));
                }
                xs = xs.narrow(1, start, seq_len - start)?;
            }
            _ => {}
        }
        let xs = self.norm.forward(&xs, opts.differentiable)?;
        let xs = replace_if(hook, HookPoint::FinalNorm, xs)?;
        if opts.logits == LogitsAt::None {
            return Ok(xs);
        }
        let logits = self.softcap_logits(self.lm_head.forward(&xs, pass.mode)?)?;
        replace_if(hook, HookPoint::Logits, logits)
    }

    /// Gemma 2's final soft-capping `cap · tanh(l / cap)` (the identity elsewhere).
    fn softcap_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.cfg.final_logit_softcapping {
            None => Ok(logits),
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
        }
    }

    /// The gradient on the logits before Gemma 2's final soft-capping, from the gradient `d` on
    /// the capped `logits` this model returned: `d ⊙ (1 − (logits / cap)²)`. Every backward that
    /// goes from logits to hidden states through `lm_head` passes here first.
    pub fn logit_softcap_vjp(&self, logits: &Tensor, d: &Tensor) -> Result<Tensor> {
        match self.cfg.final_logit_softcapping {
            None => Ok(d.clone()),
            Some(cap) => {
                let t = (logits.to_dtype(d.dtype())? / cap)?;
                Ok(d.mul(&t.sqr()?.affine(-1.0, 1.0)?)?)
            }
        }
    }

    /// The final RMSNorm of hidden states `(.., d)`, on the fast path: with
    /// [`Transformer::lm_logits`], the read-out of a residual stream (a logit lens).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm.forward(hidden, false)
    }

    /// Logits of final-norm hidden states `(.., d)` (as [`LogitsAt::None`] returns them).
    pub fn lm_logits(&self, hidden: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        self.softcap_logits(self.lm_head.forward(
            hidden,
            LinearMode {
                differentiable: opts.differentiable,
                use_lora: opts.use_lora,
            },
        )?)
    }

    /// The positions of a padded pass: row `r` holds `held[r]` real tokens in `cache` and
    /// continues with `lens[r]` of the `seq_len` new ones.
    fn row_positions(
        cache: Option<&KvCache>,
        held: &[usize],
        lens: &[usize],
        seq_len: usize,
    ) -> RowPositions {
        let b = lens.len();
        let cached = cache.map_or(0, |c| c.len);
        let query: Vec<i32> = held
            .iter()
            .zip(lens)
            .flat_map(|(&h, &l)| (0..seq_len).map(move |t| if t < l { (h + t) as i32 } else { -1 }))
            .collect();
        let old: Vec<i32> = match cache.and_then(|c| c.key_pos.as_ref()) {
            Some(pos) => pos.clone(),
            None => (0..b).flat_map(|_| 0..cached as i32).collect(),
        };
        let kv_len = cached + seq_len;
        let mut key = Vec::with_capacity(b * kv_len);
        for r in 0..b {
            key.extend_from_slice(&old[r * cached..(r + 1) * cached]);
            key.extend_from_slice(&query[r * seq_len..(r + 1) * seq_len]);
        }
        RowPositions {
            seq: seq_len,
            kv_len,
            query: std::sync::Arc::new(query),
            key: std::sync::Arc::new(key),
        }
    }

    fn pass_ctx(
        &self,
        opts: ForwardOptions,
        offset: usize,
        seq_len: usize,
        rows: Option<RowPositions>,
    ) -> Result<PassCtx> {
        let dtype = self.dtype();
        // Dense: `(T, 1)` positions `offset..`; padded: `(b, T, 1)` per row (padding at 0).
        let positions = match &rows {
            None => {
                let p: Vec<f32> = (offset..offset + seq_len).map(|p| p as f32).collect();
                Tensor::from_vec(p, (seq_len, 1), &self.device)?
            }
            Some(rows) => {
                let p: Vec<f32> = rows.query.iter().map(|&p| p.max(0) as f32).collect();
                let b = p.len() / seq_len;
                Tensor::from_vec(p, (b, seq_len, 1), &self.device)?
            }
        };
        let tables = |inv_freq: &Tensor| -> Result<(Tensor, Tensor)> {
            let freqs = positions.broadcast_mul(inv_freq)?; // (.., seq_len, head_dim / 2)
            Ok((
                freqs.cos()?.to_dtype(dtype)?.contiguous()?,
                freqs.sin()?.to_dtype(dtype)?.contiguous()?,
            ))
        };
        let (cos, sin) = tables(&self.inv_freq)?;
        let local = self.inv_freq_local.as_ref().map(tables).transpose()?;
        let mut masks = Vec::new();
        for layer in 0..self.layers.len() {
            let window = self.cfg.window(layer);
            if !masks.iter().any(|(w, _)| *w == window) {
                let mask = match &rows {
                    None => self.mask(seq_len, offset, window)?,
                    Some(rows) => Some(self.row_mask(rows, window)?),
                };
                masks.push((window, mask));
            }
        }
        Ok(PassCtx {
            mode: LinearMode {
                differentiable: opts.differentiable,
                use_lora: opts.use_lora,
            },
            cos,
            sin,
            local,
            masks,
            offset,
            rows,
        })
    }

    /// The additive mask `(b, 1, T, S)` of a padded pass.
    fn row_mask(&self, rows: &RowPositions, window: Option<usize>) -> Result<Tensor> {
        let b = rows.query.len() / rows.seq;
        let mut values = vec![f32::NEG_INFINITY; b * rows.seq * rows.kv_len];
        for (i, v) in values.iter_mut().enumerate() {
            let (r, rest) = (i / (rows.seq * rows.kv_len), i % (rows.seq * rows.kv_len));
            if rows.visible(r, rest / rows.kv_len, rest % rows.kv_len, window) {
                *v = 0.0;
            }
        }
        let mask = Tensor::from_vec(values, (b, 1, rows.seq, rows.kv_len), &self.device)?;
        Ok(mask.to_dtype(self.dtype())?)
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(Error::invalid(
                "token id",
                format!("{max} is outside the vocabulary of {}", self.cfg.vocab_size),
            ));
        }
        Ok(())
    }

    /// Causal (and sliding-window) additive mask for `seq_len` queries after `offset` cached keys.
    fn mask(&self, seq_len: usize, offset: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let kv_len = offset + seq_len;
        if seq_len == 1 && window.is_none_or(|w| kv_len <= w) {
            return Ok(None);
        }
        let mut values = vec![0f32; seq_len * kv_len];
        for i in 0..seq_len {
            let query_pos = offset + i;
            for j in 0..kv_len {
                let future = j > query_pos;
                let outside = window.is_some_and(|w| query_pos >= j + w);
                if future || outside {
                    values[i * kv_len + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(values, (seq_len, kv_len), &self.device)?;
        Ok(Some(mask.to_dtype(self.dtype())?))
    }
}

/// Calls the hook and takes its replacement, checking the shape.
fn replace_if(hook: &mut dyn Hook, point: HookPoint, xs: Tensor) -> Result<Tensor> {
    match hook.on(point, &xs)? {
        None => Ok(xs),
        Some(new) => {
            if new.dims() != xs.dims() {
                return Err(Error::invalid(
                    "hook replacement",
                    format!(
                        "{point:?} expects shape {:?}, got {:?}",
                        xs.dims(),
                        new.dims()
                    ),
                ));
            }
            Ok(new)
        }
    }
}

impl DecoderLayer {
    /// The seven projections: q, k, v, o, gate, up, down.
    pub fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        layer_idx: usize,
        xs: &Tensor,
        cfg: &ModelConfig,
        pass: &PassCtx,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        hook: &mut dyn Hook,
        opts: ForwardOptions,
        mut tape: Option<&mut LayerTape>,
    ) -> Result<Tensor> {
        let residual = replace_if(hook, HookPoint::ResidPre(layer_idx), xs.clone())?;
        if let Some(tape) = tape.as_deref_mut() {
            tape.x_in = Some(residual.clone());
        }
        let normed = match &self.input_layernorm {
            Some(norm) => norm.forward(&residual, opts.differentiable)?,
            None => residual.clone(),
        };
        if let Some(tape) = tape.as_deref_mut() {
            tape.n1 = Some(normed.clone());
        }
        let attn = self.self_attn.forward(
            layer_idx,
            &normed,
            cfg,
            pass,
            cache,
            hook,
            tape.as_deref_mut(),
        )?;
        let attn = match &self.attn_out_norm {
            Some(norm) => {
                if let Some(tape) = tape.as_deref_mut() {
                    tape.attn_raw = Some(attn.clone());
                }
                norm.forward(&attn, opts.differentiable)?
            }
            None => attn,
        };
        let attn = replace_if(hook, HookPoint::AttnOut(layer_idx), attn)?;
        let xs = replace_if(hook, HookPoint::ResidMid(layer_idx), (residual + attn)?)?;
        let normed = match &self.post_attention_layernorm {
            Some(norm) => norm.forward(&xs, opts.differentiable)?,
            None => xs.clone(),
        };
        if let Some(tape) = tape.as_deref_mut() {
            tape.x_mid = Some(xs.clone());
            tape.n2 = Some(normed.clone());
        }
        let mlp = self
            .mlp
            .forward(&normed, pass.mode, cfg.hidden_act, tape.as_deref_mut())?;
        let mlp = match &self.mlp_out_norm {
            Some(norm) => {
                if let Some(tape) = tape {
                    tape.mlp_raw = Some(mlp.clone());
                }
                norm.forward(&mlp, opts.differentiable)?
            }
            None => mlp,
        };
        let mlp = replace_if(hook, HookPoint::MlpOut(layer_idx), mlp)?;
        replace_if(hook, HookPoint::ResidPost(layer_idx), (xs + mlp)?)
    }
}

impl Mlp {
    fn forward(
        &self,
        xs: &Tensor,
        mode: LinearMode,
        act: Activation,
        mut tape: Option<&mut LayerTape>,
    ) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs, mode)?;
        let up = self.up_proj.forward(xs, mode)?;
        if let Some(tape) = tape.as_deref_mut() {
            tape.gate = Some(gate.clone());
            tape.up = Some(up.clone());
        }
        let fused = (!mode.differentiable && act == Activation::Silu)
            .then(|| silu_mul(&gate, &up))
            .transpose()?
            .flatten();
        let hidden = match (fused, act) {
            (Some(hidden), _) => hidden,
            (None, Activation::Silu) => (gate.silu()? * up)?,
            // candle's `gelu` is the tanh approximation, as `gelu_pytorch_tanh`.
            (None, Activation::GeluTanh) => (gate.gelu()? * up)?,
        };
        if let Some(tape) = tape {
            tape.h = Some(hidden.clone());
        }
        self.down_proj.forward(&hidden, mode)
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        layer_idx: usize,
        xs: &Tensor,
        cfg: &ModelConfig,
        pass: &PassCtx,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        hook: &mut dyn Hook,
        mut tape: Option<&mut LayerTape>,
    ) -> Result<Tensor> {
        let (b_sz, seq_len, _) = xs.dims3()?;
        let n_heads = cfg.num_attention_heads;
        let n_kv = cfg.num_key_value_heads;
        let head_dim = cfg.head_dim;
        let n_rep = n_heads / n_kv;
        let q = self.q_proj.forward(xs, pass.mode)?;
        let k = self.k_proj.forward(xs, pass.mode)?;
        let v = self.v_proj.forward(xs, pass.mode)?;
        if let Some(tape) = tape.as_deref_mut() {
            if self.q_norm.is_some() || self.k_norm.is_some() {
                tape.q_proj = Some(q.clone());
                tape.k_proj = Some(k.clone());
            }
        }
        // Per head (the gain spans head_dim) or over the whole projection (OLMo-2).
        let head_norm = |norm: &Option<RmsNorm>, t: Tensor, heads: usize| -> Result<Tensor> {
            match norm {
                None => Ok(t),
                Some(norm) if norm.weight.dim(0)? == heads * head_dim => {
                    norm.forward(&t, pass.mode.differentiable)
                }
                Some(norm) => norm
                    .forward(
                        &t.reshape((b_sz, seq_len, heads, head_dim))?,
                        pass.mode.differentiable,
                    )?
                    .reshape((b_sz, seq_len, heads * head_dim))
                    .map_err(Into::into),
            }
        };
        let q = head_norm(&self.q_norm, q, n_heads)?;
        let k = head_norm(&self.k_norm, k, n_kv)?;
        // (b_sz, n_heads, seq_len, head_dim)
        let q = q
            .reshape((b_sz, seq_len, n_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        // (b_sz, n_kv, seq_len, head_dim)
        let k = k
            .reshape((b_sz, seq_len, n_kv, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b_sz, seq_len, n_kv, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let (cos, sin) = pass.rope(cfg, layer_idx);
        let (q, k) = if pass.mode.differentiable {
            (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        if let Some(tape) = tape.as_deref_mut() {
            tape.q = Some(q.clone());
            tape.k = Some(k.clone());
            tape.v = Some(v.clone());
        }
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((k_prev, v_prev)) => (
                        Tensor::cat(&[&k_prev, &k], 2)?,
                        Tensor::cat(&[&v_prev, &v], 2)?,
                    ),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let kv_len = k.dim(2)?;
        let scale = cfg.attn_scale();
        let window = cfg.window(layer_idx);
        let fast = !pass.mode.differentiable;
        // Inference with no hook on the pattern: a fused kernel that never forms it.
        let softcap = cfg.attn_logit_softcapping;
        let fused = (fast
            && softcap.is_none()
            && tape.is_none()
            && !hook.wants(HookPoint::AttnPattern(layer_idx)))
        .then(|| causal_attention(&q, &k, &v, scale as f32, window, pass.rows.clone()))
        .transpose()?
        .flatten();
        if let Some(z) = fused {
            let z = z.reshape((b_sz, seq_len, n_heads, head_dim))?;
            let z = replace_if(hook, HookPoint::HeadOut(layer_idx), z)?;
            let z = z.reshape((b_sz, seq_len, n_heads * head_dim))?;
            return self.o_proj.forward(&z, pass.mode);
        }
        // Grouped-query attention without copying k and v: the n_rep query heads that share a
        // kv head are stacked along the sequence axis.
        // (b_sz, n_kv, n_rep * seq_len, head_dim)
        let q = q.reshape((b_sz, n_kv, n_rep * seq_len, head_dim))?;
        // Inference: BLAS products (scale folded in) and a fused causal softmax. Differentiable
        // passes, and devices or dtypes the kernels do not cover, use candle's ops.
        let scores = match fast
            .then(|| batched_matmul(&q, &k, true, scale as f32))
            .transpose()?
            .flatten()
        {
            Some(scores) => scores,
            None => (q.matmul(&k.t()?)? * scale)?,
        };
        // (b_sz, n_heads, seq_len, kv_len)
        let scores = scores.reshape((b_sz, n_heads, seq_len, kv_len))?;
        // Gemma 2: soft-capped before the mask.
        let scores = match softcap {
            None => scores,
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        };
        let fused = (fast && pass.rows.is_none())
            .then(|| causal_softmax(&scores, pass.offset, window))
            .transpose()?
            .flatten();
        let probs = if let Some(probs) = fused {
            probs
        } else {
            let scores = match pass.mask(window) {
                None => scores,
                Some(mask) => scores.broadcast_add(mask)?,
            };
            if fast {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            }
        };
        let probs = replace_if(hook, HookPoint::AttnPattern(layer_idx), probs)?;
        if let Some(tape) = tape.as_deref_mut() {
            tape.probs = Some(probs.clone());
        }
        // (b_sz, n_kv, n_rep * seq_len, kv_len)
        let probs = probs.reshape((b_sz, n_kv, n_rep * seq_len, kv_len))?;
        // (b_sz, n_kv, n_rep * seq_len, head_dim)
        let z = match fast
            .then(|| batched_matmul(&probs, &v, false, 1.0))
            .transpose()?
            .flatten()
        {
            Some(z) => z,
            None => probs.matmul(&v)?,
        };
        // (b_sz, seq_len, n_heads, head_dim)
        let z = z
            .reshape((b_sz, n_heads, seq_len, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let z = replace_if(hook, HookPoint::HeadOut(layer_idx), z)?;
        let z = z.reshape((b_sz, seq_len, n_heads * head_dim))?;
        if let Some(tape) = tape {
            tape.z = Some(z.clone());
        }
        self.o_proj.forward(&z, pass.mode)
    }
}
