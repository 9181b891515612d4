//! A frozen weight matrix: a dense tensor (the default, and the reference the tests compare
//! against) or a [`PackedMatrix`] kept as stored (`--weights stored`).
//!
//! Every use of a base weight goes through the four products here: the forward `x Wᵀ`, the
//! input gradient `g W`, a row lookup (embeddings), and a full expansion for the analyses that
//! read whole matrices (FFN concepts, head word pairs, `W_O`), which expand one matrix at a
//! time and drop it.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::blas::{blas_linear, frozen_input_grad};
use crate::model::packed::{PackedKind, PackedMatrix};

/// How base weights are held in memory, as a user names it (`f32`, `stored`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightStorage {
    /// Expanded to the load dtype (f32 by default) at load: the reference.
    #[default]
    F32,
    /// Kept as stored: f16/bf16 at 2 bytes, GGUF's quantised blocks as they are; expanded a
    /// tile at a time inside each product (CPU only).
    Stored,
}

impl WeightStorage {
    /// The name used by the CLI and the settings file.
    pub fn label(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Stored => "stored",
        }
    }
}

impl std::str::FromStr for WeightStorage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "stored" => Ok(Self::Stored),
            other => Err(Error::invalid(
                "weights",
                format!("`{other}` (expected f32 or stored)"),
            )),
        }
    }
}

/// A frozen `(out, in)` matrix.
#[derive(Clone, Debug)]
pub enum Weight {
    /// A tensor in the model's dtype on its device.
    Dense(Tensor),
    /// Kept as stored, on the CPU; products compute in f32.
    Packed(PackedMatrix),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Self::Dense(t)
    }
}

impl Weight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(t) => Ok(t.dims2()?),
            Self::Packed(p) => Ok(p.dims()),
        }
    }

    /// Rows (output features, or vocabulary entries).
    pub fn rows(&self) -> usize {
        match self {
            Self::Dense(t) => t.dims().first().copied().unwrap_or(0),
            Self::Packed(p) => p.dims().0,
        }
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        match self {
            Self::Dense(t) => t.dims().get(1).copied().unwrap_or(0),
            Self::Packed(p) => p.dims().1,
        }
    }

    /// The dtype products compute in (f32 for packed weights).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Packed(_) => DType::F32,
        }
    }

    /// The device products run on.
    pub fn device(&self) -> Device {
        match self {
            Self::Dense(t) => t.device().clone(),
            Self::Packed(_) => Device::Cpu,
        }
    }

    /// How the weight is held, for the Models view (`f32`, `bf16`, `Q4_K`, ...).
    pub fn label(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Packed(p) => p.kind().label().to_owned(),
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Packed(p) => p.bytes(),
        }
    }

    /// Whether two weights share their memory (tied embeddings, fused projections).
    pub fn shares_storage(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Packed(a), Self::Packed(b)) => a.shares_storage(b),
            (Self::Dense(a), Self::Dense(b)) => a.id() == b.id(),
            _ => false,
        }
    }

    /// The whole matrix as a tensor: the dense tensor itself, or a packed one expanded to f32
    /// on the CPU (for the analyses that read weights rather than run the model).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Packed(p) => {
                let (rows, cols) = p.dims();
                let data = p.expand_rows(0, rows)?;
                Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
            }
        }
    }

    /// The tensor a checkpoint writer stores: a dense weight as it is; a packed one expanded,
    /// back in f16/bf16 for those kinds (exact) and in f32 for quantised blocks.
    pub fn for_saving(&self) -> Result<Tensor> {
        let t = self.dense()?;
        match self {
            Self::Packed(p) if p.kind() == PackedKind::F16 => Ok(t.to_dtype(DType::F16)?),
            Self::Packed(p) if p.kind() == PackedKind::Bf16 => Ok(t.to_dtype(DType::BF16)?),
            _ => Ok(t),
        }
    }

    /// Rows `start..start + len` (Phi-3's fused projections), sharing memory.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        match self {
            Self::Dense(t) => Ok(Self::Dense(t.narrow(0, start, len)?)),
            Self::Packed(p) => Ok(Self::Packed(p.narrow_rows(start, len)?)),
        }
    }

    /// Rows `ids` (`(n,)` u32), `(n, in)`: an embedding lookup that expands only those rows.
    pub fn index_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.index_select(ids, 0)?),
            Self::Packed(p) => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let data = p.gather_rows(&ids)?;
                Ok(Tensor::from_vec(
                    data,
                    (ids.len(), p.dims().1),
                    &Device::Cpu,
                )?)
            }
        }
    }

    /// The same kind of weight holding `merged` (f32, `(out, in)`): a dense weight keeps its
    /// dtype, a packed f16/bf16 one is packed again (rounded once, as a dense one is), and a
    /// quantised one becomes dense f32 (re-quantising would add error).
    pub fn replaced_by(&self, merged: &Tensor) -> Result<Self> {
        match self {
            Self::Dense(t) => Ok(Self::Dense(merged.to_dtype(t.dtype())?)),
            Self::Packed(p) if matches!(p.kind(), PackedKind::F16 | PackedKind::Bf16) => {
                let (rows, cols) = merged.dims2()?;
                let values = merged
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(Self::Packed(PackedMatrix::from_f32(
                    p.kind(),
                    rows,
                    cols,
                    &values,
                )?))
            }
            Self::Packed(_) => Ok(Self::Dense(merged.to_dtype(DType::F32)?)),
        }
    }

    /// `x Wᵀ` for `x` `(rows, in)`; with `differentiable`, the result carries a backward to
    /// `x` only (`g W`), never to `W`.
    pub fn linear(&self, x2: &Tensor, differentiable: bool) -> Result<Tensor> {
        match self {
            Self::Dense(w) => match blas_linear(x2, w)? {
                Some(ys) => Ok(ys),
                None if differentiable => crate::model::lora::frozen_matmul(x2, w),
                None => Ok(x2.matmul(&w.t()?)?),
            },
            Self::Packed(p) => {
                let (m, k) = x2.dims2()?;
                if !x2.device().is_cpu() {
                    return Err(Error::invalid(
                        "weights",
                        "weights kept as stored run on the CPU only",
                    ));
                }
                let x = x2
                    .detach()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if x.len() != m * k || k != p.dims().1 {
                    return Err(Error::invalid(
                        "linear input",
                        format!("{k} features for a {:?} weight", p.dims()),
                    ));
                }
                let ys = Tensor::from_vec(p.xwt(&x, m)?, (m, p.dims().0), &Device::Cpu)?;
                if !differentiable {
                    return Ok(ys);
                }
                crate::model::lora::with_input_grad(x2, &ys, self.clone())
            }
        }
    }

    /// `g W` for `g` `(.., out)`: `(.., in)`, the input gradient of [`Weight::linear`].
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) if g.rank() == 2 => Ok(frozen_input_grad(g, w)?),
            Self::Dense(w) => {
                let dims = g.dims().to_vec();
                let Some((&out, lead)) = dims.split_last() else {
                    return Err(Error::invalid("gradient", "scalar gradient"));
                };
                let rows: usize = lead.iter().product();
                let dx = frozen_input_grad(&g.reshape((rows, out))?, w)?;
                let mut out_dims = lead.to_vec();
                out_dims.push(self.cols());
                Ok(dx.reshape(out_dims)?)
            }
            Self::Packed(p) => packed_input_grad(p, g),
        }
    }
}

/// `g W` for a packed `W`, any leading dimensions.
fn packed_input_grad(p: &PackedMatrix, g: &Tensor) -> Result<Tensor> {
    let dims = g.dims().to_vec();
    let Some((&out, lead)) = dims.split_last() else {
        return Err(Error::invalid("gradient", "scalar gradient"));
    };
    let (rows, cols) = p.dims();
    if out != rows {
        return Err(Error::invalid(
            "gradient",
            format!("{out} features for a {rows}-row weight"),
        ));
    }
    let m: usize = lead.iter().product();
    let dtype = g.dtype();
    let values = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let dx = p.gw(&values, m)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(cols);
    Ok(Tensor::from_vec(dx, out_dims, &Device::Cpu)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Var;

    use super::*;

    #[test]
    fn packed_linear_matches_dense_forward_and_autograd() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let dense = Weight::Dense(q.dequantize(&dev)?);
        let packed = Weight::Packed(PackedMatrix::new(
            PackedKind::Q8_0,
            48,
            64,
            q.data()?.to_vec(),
        )?);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 64), &dev)?)?;
        let coeff = Tensor::randn(0f32, 1.0, (3, 48), &dev)?;
        let yd = dense.linear(x.as_tensor(), true)?;
        let yp = packed.linear(x.as_tensor(), true)?;
        let diff = (&yd - &yp)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "forward {diff}");
        let gd = (yd * &coeff)?.sum_all()?.backward()?;
        let gp = (yp * &coeff)?.sum_all()?.backward()?;
        let (Some(gd), Some(gp)) = (gd.get(&x), gp.get(&x)) else {
            anyhow::bail!("no input gradient")
        };
        let diff = (gd - gp)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "input gradient {diff}");
        let g3 = coeff.reshape((1, 3, 48))?;
        let diff = (dense.input_grad(&g3)? - packed.input_grad(&g3)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "batched input gradient {diff}");
        let ids = Tensor::new(&[5u32, 0, 47], &dev)?;
        let diff = (dense.index_rows(&ids)? - packed.index_rows(&ids)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff == 0.0);
        assert_eq!(packed.bytes(), 48 * 64 / 32 * 34);
        assert_eq!(packed.label(), "Q8_0");
        assert!(packed.index_rows(&Tensor::new(&[48u32], &dev)?).is_err());
        Ok(())
    }
}
