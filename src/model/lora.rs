//! Linear layers with frozen base weights and optional LoRA adapters (Hu et al., 2021,
//! arXiv 2106.09685; tensor names and scaling as in Hugging Face PEFT).
//!
//! Base weights are plain tensors and never receive gradients. On CPU f32 the product `x W^T`
//! goes through OpenBLAS ([`crate::model::blas`]); elsewhere, differentiable passes use
//! [`frozen_matmul`]. Both are custom ops whose backward computes only the input gradient `g W`:
//! candle's own matmul backward always computes the weight gradient too, which on a frozen model
//! is pure waste (about 2x the backward cost). Adapters are ordinary tensors (typically `Var`s
//! during training), so their gradients flow as usual.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::model::weight::Weight;

/// A LoRA adapter `ΔW = scale · B A`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `A`, `(r, in)`.
    pub a: Tensor,
    /// `B`, `(out, r)`; zero at initialisation, so the adapted model equals the base model.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// Dropout on the adapter's input during training (PEFT's `lora_dropout`).
    pub dropout: Option<LoraDropout>,
}

/// SplitMix64: a tiny, seedable generator whose output is the same on every platform.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)` with 24 random bits.
    #[allow(clippy::cast_precision_loss)]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A uniform index in `0..n`.
    #[allow(clippy::cast_possible_truncation)]
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Seed value that switches [`LoraDropout`] off.
pub const DROPOUT_OFF: u64 = u64::MAX;

/// Inverted dropout on the input of one adapter, `B A dropout(x)` as in PEFT. The mask is a
/// pure function of the shared `seed` (set by the trainer before each forward, [`DROPOUT_OFF`]
/// for evaluation) and the adapter's `id`, so a run is reproducible and can be resumed exactly.
#[derive(Clone, Debug)]
pub struct LoraDropout {
    /// Drop probability.
    pub p: f32,
    /// Distinguishes the adapters of one model.
    pub id: u64,
    /// The current pass's seed, shared by all adapters of a trainer.
    pub seed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl LoraDropout {
    /// `x ⊙ mask / (1 − p)` for the current seed, or `None` when dropout is off.
    fn apply(&self, x2: &Tensor) -> Result<Option<Tensor>> {
        match self.mask(x2.shape(), x2.device())? {
            Some(mask) => Ok(Some(x2.mul(&mask.to_dtype(x2.dtype())?)?)),
            None => Ok(None),
        }
    }

    /// The mask (entries 0 or `1/(1 − p)`) for an input of `shape` under the current seed, or
    /// `None` when dropout is off. The same seed and shape always give the same mask.
    pub fn mask(
        &self,
        shape: &candle_core::Shape,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        let seed = self.seed.load(std::sync::atomic::Ordering::Relaxed);
        if seed == DROPOUT_OFF || self.p <= 0.0 {
            return Ok(None);
        }
        let mut rng = SplitMix64(seed ^ self.id.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..shape.elem_count())
            .map(|_| if rng.next_f32() < self.p { 0.0 } else { keep })
            .collect();
        Ok(Some(Tensor::from_vec(mask, shape.clone(), device)?))
    }
}

impl LoraAdapter {
    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }
}

/// `y = x W^T + b`, plus `scale · x A^T B^T` when an adapter is attached and enabled.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `W`, `(out, in)`: dense, or kept as stored.
    pub weight: Weight,
    /// Optional bias, `(out,)`.
    pub bias: Option<Tensor>,
    /// Optional adapter.
    pub lora: Option<LoraAdapter>,
}

/// Per-pass switches for [`Linear::forward`].
#[derive(Clone, Copy, Debug)]
pub struct LinearMode {
    /// Build the autograd graph (gradients reach the input, never the frozen weight).
    pub differentiable: bool,
    /// Apply attached adapters.
    pub use_lora: bool,
}

impl Linear {
    /// A layer without adapter.
    pub fn new(weight: impl Into<Weight>, bias: Option<Tensor>) -> Self {
        Self {
            weight: weight.into(),
            bias,
            lora: None,
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.cols()
    }

    /// The weight this layer applies when its adapter is on: `W + scale · B A` (computed in
    /// f32, so a bf16/f16 base is rounded once, not once per term) when an adapter is attached,
    /// else `W` itself. Every analysis that reads weights rather than running the model (the
    /// FFN concepts, the head word pairs, the instruction vectors' `W_O`) goes through this, so
    /// "base + adapter" is analysed as the model the forward runs.
    pub fn effective_weight(&self) -> Result<Tensor> {
        let weight = self.weight.dense()?;
        let Some(lora) = &self.lora else {
            return Ok(weight);
        };
        let device = weight.device();
        let b = lora.b.detach().to_dtype(DType::F32)?.to_device(device)?;
        let a = lora.a.detach().to_dtype(DType::F32)?.to_device(device)?;
        let delta = (b.matmul(&a)? * lora.scale)?;
        Ok((weight.to_dtype(DType::F32)? + delta)?)
    }

    /// Attaches (or replaces) an adapter after checking its shapes.
    pub fn attach(&mut self, adapter: LoraAdapter) -> Result<()> {
        let (r_a, in_a) = adapter.a.dims2()?;
        let (out_b, r_b) = adapter.b.dims2()?;
        if r_a != r_b || in_a != self.in_features() || out_b != self.out_features() {
            return Err(Error::invalid(
                "LoRA adapter",
                format!(
                    "A {:?} and B {:?} do not fit a {}x{} layer",
                    adapter.a.dims(),
                    adapter.b.dims(),
                    self.out_features(),
                    self.in_features()
                ),
            ));
        }
        self.lora = Some(adapter);
        Ok(())
    }

    /// Applies the layer to `xs` of shape `(.., in)`.
    pub fn forward(&self, xs: &Tensor, mode: LinearMode) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let Some((&in_dim, lead)) = dims.split_last() else {
            return Err(Error::invalid("linear input", "scalar input"));
        };
        let rows: usize = lead.iter().product();
        let x2 = xs.reshape((rows, in_dim))?;
        let mut ys = self.weight.linear(&x2, mode.differentiable)?;
        if let Some(bias) = &self.bias {
            ys = ys.broadcast_add(bias)?;
        }
        if mode.use_lora {
            if let Some(lora) = &self.lora {
                let dropped = match &lora.dropout {
                    Some(dropout) => dropout.apply(&x2)?,
                    None => None,
                };
                let x_in = dropped.as_ref().unwrap_or(&x2);
                let delta = x_in.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
                ys = (ys + (delta * lora.scale)?)?;
            }
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        Ok(ys.reshape(out_dims)?)
    }
}

/// `x W^T` for a frozen `W`: the result carries a backward to `x` only.
pub fn frozen_matmul(x2: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // Compute the product off the graph, then attach a node that passes it through unchanged and
    // whose backward is `g W`.
    let ys = x2.detach().matmul(&weight.t()?)?.contiguous()?;
    with_input_grad(x2, &ys, Weight::Dense(weight.clone()))
}

/// `ys = x2 Wᵀ`, computed off the graph, as a result whose backward reaches `x2` only, as
/// `g W` (dense or packed `W`).
pub(crate) fn with_input_grad(x2: &Tensor, ys: &Tensor, weight: Weight) -> Result<Tensor> {
    Ok(x2.apply_op2(ys, FrozenLinear { weight })?)
}

/// The custom op behind [`frozen_matmul`]: forward returns its second argument (the product
/// already computed), backward maps the output gradient `g` to `g W` for the first argument.
struct FrozenLinear {
    weight: Weight,
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l2.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: the precomputed product must be contiguous")
        };
        let storage = match s2 {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            _ => candle_core::bail!("frozen-linear: unsupported dtype"),
        };
        Ok((storage, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage as _;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let input_grad = self
            .weight
            .input_grad(grad_res)
            .map_err(|err| candle_core::Error::Msg(format!("frozen-linear backward: {err}")))?;
        Ok((Some(input_grad), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn frozen_matmul_gradient_matches_plain_matmul() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 2.0]], &dev)?; // (2, 3)
        let x = Var::new(&[[0.3f32, -0.2, 0.7], [1.0, 2.0, -1.0]], &dev)?; // (2, 3)
        let plain = x.as_tensor().matmul(&w.t()?)?;
        let frozen = frozen_matmul(x.as_tensor(), &w)?;
        assert_eq!(plain.to_vec2::<f32>()?, frozen.to_vec2::<f32>()?);
        let coeff = Tensor::new(&[[1f32, -2.0], [0.5, 3.0]], &dev)?;
        let g_plain = (plain * &coeff)?.sum_all()?.backward()?;
        let g_frozen = (frozen * &coeff)?.sum_all()?.backward()?;
        let a = g_plain.get(&x).unwrap().to_vec2::<f32>()?;
        let b = g_frozen.get(&x).unwrap().to_vec2::<f32>()?;
        assert_eq!(a, b);
        // The frozen path never produces a gradient for the weight.
        assert!(g_frozen.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn zero_b_adapter_is_identity_and_disabling_works() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev)?;
        let mut lin = Linear::new(w, None);
        let x = Tensor::new(&[[[1f32, -1.0]]], &dev)?;
        let on = LinearMode {
            differentiable: false,
            use_lora: true,
        };
        let off = LinearMode {
            use_lora: false,
            ..on
        };
        let base = lin.forward(&x, off)?;
        lin.attach(LoraAdapter {
            a: Tensor::ones((2, 2), candle_core::DType::F32, &dev)?,
            b: Tensor::zeros((3, 2), candle_core::DType::F32, &dev)?,
            scale: 2.0,
            dropout: None,
        })?;
        assert_eq!(
            lin.forward(&x, on)?.to_vec3::<f32>()?,
            base.to_vec3::<f32>()?
        );
        lin.lora.as_mut().unwrap().b = Tensor::ones((3, 2), candle_core::DType::F32, &dev)?;
        let x2 = Tensor::new(&[[[1f32, 2.0]]], &dev)?;
        let with = lin.forward(&x2, on)?.flatten_all()?.to_vec1::<f32>()?;
        let without = lin.forward(&x2, off)?.flatten_all()?.to_vec1::<f32>()?;
        // delta = 2 * (x·1 + x·1 per rank) = 2 * 2 * 3 = 12 on every output.
        for (a, b) in with.iter().zip(&without) {
            assert!((a - b - 12.0).abs() < 1e-6);
        }
        // The effective weight applies the same map: x (W + 2·B A)ᵀ.
        let eff = lin.effective_weight()?;
        let by_weight = x2
            .reshape((1, 2))?
            .matmul(&eff.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in with.iter().zip(&by_weight) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(lin
            .attach(LoraAdapter {
                a: Tensor::ones((2, 5), candle_core::DType::F32, &dev)?,
                b: Tensor::ones((3, 2), candle_core::DType::F32, &dev)?,
                scale: 1.0,
                dropout: None,
            })
            .is_err());
        Ok(())
    }
}
