//! Fused CPU kernels for the inference path (no backward): a causal softmax that skips masked
//! entries instead of adding `-inf` and exponentiating them, and SiLU(gate) · up in one pass.
//!
//! Why: at 128 tokens on the demo model, candle's separate scale, mask-add and softmax cost
//! ~350 µs per layer and SiLU·up ~230 µs; these kernels do the same arithmetic in one pass over
//! the data, split across cores. Differentiable passes keep candle's ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, StorageRef, Tensor,
};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::transformer::RowPositions;
use crate::model::vexp;

/// Tensors smaller than this are not worth splitting across threads.
const PAR_MIN_ELEMS: usize = 16_384;
/// Elements per parallel task of [`silu_mul`].
const CHUNK: usize = 8192;

/// The f32 elements of a contiguous CPU storage, or an error naming the custom op `op`.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only")
    };
    Ok(&data[start..end])
}

/// The tensors made contiguous, or `None` when any is not a CPU f32 tensor (the fused kernels
/// then give way to candle ops).
pub(crate) fn cpu_f32_contiguous(tensors: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    if tensors
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let owned: candle_core::Result<Vec<Tensor>> = tensors.iter().map(|t| t.contiguous()).collect();
    Ok(Some(owned?))
}

/// The f32 elements behind the storage guards of contiguous CPU f32 tensors.
pub(crate) fn f32_data<'g>(guards: &'g [(StorageRef<'_>, &Layout)]) -> Result<Vec<&'g [f32]>> {
    guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(cpu) => Ok(contiguous_f32(cpu, layout, "fused kernel")?),
            _ => Err(Error::invalid("fused kernel", "expects CPU tensors")),
        })
        .collect()
}

/// Runs `f` on the f32 elements of CPU f32 tensors without copying them (each is made
/// contiguous first, which is free for a contiguous one or a row range of it). `Ok(None)`
/// when one of them is not a CPU f32 tensor.
pub fn with_f32_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<Option<R>> {
    let Some(owned) = cpu_f32_contiguous(tensors)? else {
        return Ok(None);
    };
    let guards: Vec<_> = owned.iter().map(Tensor::storage_and_layout).collect();
    f(&f32_data(&guards)?).map(Some)
}

/// Softmax over the last axis of `scores` `(.., T, T_kv)` with causal masking for queries at
/// absolute positions `offset..offset+T` (and an optional sliding window); masked entries are 0.
/// Returns `None` when the kernel does not apply (not CPU f32).
pub fn causal_softmax(
    scores: &Tensor,
    offset: usize,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    if !scores.device().is_cpu() || scores.dtype() != DType::F32 || scores.rank() < 2 {
        return Ok(None);
    }
    let scores = scores.contiguous()?;
    let seq_len = scores.dim(scores.rank() - 2)?;
    Ok(Some(scores.apply_op1_no_bwd(&CausalSoftmax {
        seq_len,
        offset,
        window,
    })?))
}

struct CausalSoftmax {
    seq_len: usize,
    offset: usize,
    window: Option<usize>,
}

impl CausalSoftmax {
    fn row(&self, row_idx: usize, src: &[f32], dst: &mut [f32]) {
        let query_pos = self.offset + row_idx % self.seq_len;
        let hi = (query_pos + 1).min(src.len());
        let lo = self
            .window
            .map_or(0, |w| (query_pos + 1).saturating_sub(w))
            .min(hi);
        let visible = &src[lo..hi];
        let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        dst[..lo].fill(0.0);
        dst[hi..].fill(0.0);
        if max == f32::NEG_INFINITY {
            dst[lo..hi].fill(0.0);
            return;
        }
        for (d, &s) in dst[lo..hi].iter_mut().zip(visible) {
            *d = s - max;
        }
        vexp::exp_in_place(&mut dst[lo..hi]);
        let sum = dst[lo..hi].iter().sum::<f32>();
        let inv = 1.0 / sum;
        for d in &mut dst[lo..hi] {
            *d *= inv;
        }
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "causal-softmax")?;
        let dims = layout.shape().dims();
        let row_len = dims[dims.len() - 1];
        let mut out = vec![0f32; src.len()];
        if row_len > 0 {
            if src.len() >= PAR_MIN_ELEMS {
                out.par_chunks_mut(row_len)
                    .zip(src.par_chunks(row_len))
                    .enumerate()
                    .for_each(|(r, (dst, row))| self.row(r, row, dst));
            } else {
                for (r, (dst, row)) in out.chunks_mut(row_len).zip(src.chunks(row_len)).enumerate()
                {
                    self.row(r, row, dst);
                }
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Query rows per block of [`causal_attention`]: keys past a block's last query are skipped.
const ATTN_ROW_BLOCK: usize = 32;

/// Causal multi-head attention for inference on CPU f32, without forming the pattern:
/// `z_h = softmax(scale · q_h k_gᵀ + causal mask) v_g` for every head `h`, where `g = h / n_rep`
/// is its key/value group. `q` is `(b, H, T, hd)`, `k` and `v` are `(b, G, S, hd)` with the `T`
/// queries at absolute positions `S - T ..` (keys before them come from a KV cache); an optional
/// sliding window limits how far back a query sees. Returns `z` as `(b, T, H·hd)` — the layout
/// `o_proj` takes — or `None` where the kernel does not apply (not CPU f32, or no BLAS).
///
/// Why: the unfused path forms the `(b, H, T, S)` pattern, runs the softmax over it in a pass
/// of its own, multiplies the masked half of every score matrix, and transposes `z` afterwards;
/// here each head's query rows are cut into blocks, one task each, and a block multiplies only
/// the keys its queries can see.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
    rows: Option<RowPositions>,
) -> Result<Option<Tensor>> {
    if !crate::model::blas::BLAS_ENABLED
        || !q.device().is_cpu()
        || [q, k, v].iter().any(|t| t.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(q.apply_op3_no_bwd(
        &k,
        &v,
        &CausalAttention {
            scale,
            window,
            rows,
        },
    )?))
}

struct CausalAttention {
    scale: f32,
    window: Option<usize>,
    /// Per-row positions of a padded batch (keys are then masked by position, not by index).
    rows: Option<RowPositions>,
}

/// Sizes of one [`causal_attention`] call.
#[derive(Clone, Copy)]
struct AttnDims {
    n_rep: usize,
    seq: usize,
    kv_len: usize,
    head_dim: usize,
}

impl CausalAttention {
    /// Visible keys `lo..hi` of the query at row `row` (absolute position `S - T + row`).
    fn visible(&self, dims: AttnDims, row: usize) -> (usize, usize) {
        let pos = dims.kv_len - dims.seq + row;
        // Padded rows: a key's index can run ahead of its position, so the window is applied
        // by position, per entry.
        let lo = match (&self.rows, self.window) {
            (None, Some(w)) => (pos + 1).saturating_sub(w),
            _ => 0,
        };
        (lo, pos + 1)
    }

    /// Rows `r0..r1` of `z` `(T, hd)` of one head, from its queries `(T, hd)` and its group's
    /// keys and values `(S, hd)`; only the keys these queries can see are multiplied.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        dims: AttnDims,
        batch_row: usize,
        rows: std::ops::Range<usize>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>> {
        use crate::model::blas::{checked_gemm, MatView};
        let hd = dims.head_dim;
        let (r0, n_rows) = (rows.start, rows.len());
        let (lo, _) = self.visible(dims, r0);
        let (_, hi) = self.visible(dims, rows.end - 1);
        let cols = hi - lo;
        // scores = scale · q[rows] · k[lo..hi]ᵀ
        let mut scores = vec![0f32; n_rows * cols];
        checked_gemm(
            self.scale,
            q,
            MatView::new(r0 * hd, n_rows, hd, hd),
            k,
            MatView::new(lo * hd, cols, hd, hd).t(),
            0.0,
            &mut scores,
            MatView::new(0, n_rows, cols, cols),
            false,
        )?;
        for (i, row) in scores.chunks_mut(cols).enumerate() {
            let (row_lo, row_hi) = self.visible(dims, r0 + i);
            let (a, b) = (row_lo - lo, row_hi - lo);
            if let Some(pos) = &self.rows {
                for (j, x) in row.iter_mut().enumerate().take(b).skip(a) {
                    if !pos.visible(batch_row, r0 + i, lo + j, self.window) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let max = row[a..b].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            if max == f32::NEG_INFINITY {
                row[a..b].fill(0.0);
                continue;
            }
            for x in &mut row[a..b] {
                *x -= max;
            }
            vexp::exp_in_place(&mut row[a..b]);
            let sum = row[a..b].iter().sum::<f32>();
            let inv = 1.0 / sum;
            for x in &mut row[a..b] {
                *x *= inv;
            }
        }
        // z[rows] = probs · v[lo..hi]
        let mut z = vec![0f32; n_rows * hd];
        checked_gemm(
            1.0,
            &scores,
            MatView::new(0, n_rows, cols, cols),
            v,
            MatView::new(lo * hd, cols, hd, hd),
            0.0,
            &mut z,
            MatView::new(0, n_rows, hd, hd),
            false,
        )?;
        Ok(z)
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "causal-attention")?;
        let k = contiguous_f32(s2, l2, "causal-attention")?;
        let v = contiguous_f32(s3, l3, "causal-attention")?;
        let (b_sz, heads, seq, head_dim) = l1.shape().dims4()?;
        let (b_k, groups, kv_len, hd_k) = l2.shape().dims4()?;
        if l3.shape() != l2.shape()
            || b_k != b_sz
            || hd_k != head_dim
            || groups == 0
            || heads % groups != 0
            || kv_len < seq
        {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let dims = AttnDims {
            n_rep: heads / groups,
            seq,
            kv_len,
            head_dim,
        };
        let (q_len, kv_size) = (seq * head_dim, kv_len * head_dim);
        // One task per head and block of query rows (later blocks see more keys).
        let blocks = seq.div_ceil(ATTN_ROW_BLOCK);
        let z_blocks: Vec<Vec<f32>> = (0..b_sz * heads * blocks)
            .into_par_iter()
            .map(|task| {
                let (head_task, block) = (task / blocks, task % blocks);
                let (bi, h) = (head_task / heads, head_task % heads);
                let g = bi * groups + h / dims.n_rep;
                let r0 = block * ATTN_ROW_BLOCK;
                self.block(
                    dims,
                    bi,
                    r0..(r0 + ATTN_ROW_BLOCK).min(seq),
                    &q[head_task * q_len..(head_task + 1) * q_len],
                    &k[g * kv_size..(g + 1) * kv_size],
                    &v[g * kv_size..(g + 1) * kv_size],
                )
            })
            .collect::<Result<_>>()
            .map_err(|err| candle_core::Error::Msg(format!("causal-attention: {err}")))?;
        // Blocks of (b, H, T, hd) → (b, T, H·hd)
        let mut out = vec![0f32; b_sz * seq * heads * head_dim];
        for (task, z) in z_blocks.iter().enumerate() {
            let (head_task, block) = (task / blocks, task % blocks);
            let (bi, h) = (head_task / heads, head_task % heads);
            for (i, z_row) in z.chunks(head_dim).enumerate() {
                let t = block * ATTN_ROW_BLOCK + i;
                let at = ((bi * seq + t) * heads + h) * head_dim;
                out[at..at + head_dim].copy_from_slice(z_row);
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((b_sz, seq, heads * head_dim)),
        ))
    }
}

/// `silu(gate) * up`, elementwise, for same-shape tensors. `None` when not CPU f32.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !gate.device().is_cpu()
        || gate.dtype() != DType::F32
        || up.dtype() != DType::F32
        || gate.dims() != up.dims()
    {
        return Ok(None);
    }
    let gate = gate.contiguous()?;
    let up = up.contiguous()?;
    Ok(Some(gate.apply_op2_no_bwd(&up, &SiluMul)?))
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "silu-mul")?;
        let u = contiguous_f32(s2, l2, "silu-mul")?;
        let mut out = vec![0f32; g.len()];
        let kernel = |(o, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
            for (o, &g) in o.iter_mut().zip(g) {
                *o = -g;
            }
            vexp::exp_in_place(o);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + *o) * u;
            }
        };
        if g.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(kernel);
        } else {
            kernel((&mut out, (g, u)));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn causal_softmax_matches_mask_then_softmax() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // (b=1, h=2, T=3, T_kv=5): 2 cached positions, then 3 queries; sliding window of 4.
        let scores = Tensor::arange(0f32, 30.0, &dev)?
            .reshape((1, 2, 3, 5))?
            .sin()?;
        for window in [None, Some(4)] {
            let mut mask = vec![0f32; 15];
            for i in 0..3 {
                for j in 0..5 {
                    let q = 2 + i;
                    if j > q || window.is_some_and(|w| q >= j + w) {
                        mask[i * 5 + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (3, 5), &dev)?;
            let reference = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
            let ours = causal_softmax(&scores, 2, window)?.unwrap();
            assert!(max_diff(&ours, &reference) < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn causal_attention_matches_the_pattern_path() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // 2 sequences, 4 heads in 2 groups, 37 queries after 3 cached keys (more than one row
        // block), head_dim 8; with and without a sliding window.
        let (b, heads, groups, seq, kv_len, hd) =
            (2usize, 4usize, 2usize, 37usize, 40usize, 8usize);
        let q = Tensor::arange(0f32, (b * heads * seq * hd) as f32, &dev)?
            .affine(0.37, 0.1)?
            .sin()?
            .reshape((b, heads, seq, hd))?;
        let k = Tensor::arange(0f32, (b * groups * kv_len * hd) as f32, &dev)?
            .affine(0.23, -0.4)?
            .cos()?
            .reshape((b, groups, kv_len, hd))?;
        let v = Tensor::arange(0f32, (b * groups * kv_len * hd) as f32, &dev)?
            .affine(0.11, 0.3)?
            .sin()?
            .reshape((b, groups, kv_len, hd))?;
        let scale = 1.0 / (hd as f32).sqrt();
        for window in [None, Some(6)] {
            let ours = causal_attention(&q, &k, &v, scale, window, None)?;
            assert_eq!(ours.is_some(), crate::model::blas::BLAS_ENABLED);
            let Some(ours) = ours else {
                return Ok(());
            };
            assert_eq!(ours.dims(), &[b, seq, heads * hd]);
            let mut mask = vec![0f32; seq * kv_len];
            for i in 0..seq {
                for j in 0..kv_len {
                    let pos = kv_len - seq + i;
                    if j > pos || window.is_some_and(|w| pos >= j + w) {
                        mask[i * kv_len + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (seq, kv_len), &dev)?;
            let mut per_head = Vec::new();
            for h in 0..heads {
                let (qh, kg, vg) = (
                    q.narrow(1, h, 1)?,
                    k.narrow(1, h / 2, 1)?,
                    v.narrow(1, h / 2, 1)?,
                );
                let scores = (qh.matmul(&kg.t()?)? * f64::from(scale))?.broadcast_add(&mask)?;
                let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
                per_head.push(probs.matmul(&vg)?); // (b, 1, T, hd)
            }
            let reference =
                Tensor::cat(&per_head, 1)?
                    .transpose(1, 2)?
                    .reshape((b, seq, heads * hd))?;
            assert!(max_diff(&ours, &reference) < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn silu_mul_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for n in [7usize, 40_000] {
            let g = Tensor::arange(0f32, n as f32, &dev)?.affine(0.001, -3.0)?;
            let u = Tensor::arange(0f32, n as f32, &dev)?.affine(-0.002, 1.0)?;
            let reference = (g.silu()? * &u)?;
            assert!(max_diff(&silu_mul(&g, &u)?.unwrap(), &reference) < 1e-5);
        }
        Ok(())
    }
}
