//! `x W^T` for frozen weights through OpenBLAS's `cblas_sgemm` (cargo feature `openblas`, on by
//! default), as a candle custom op whose backward reaches the input only.
//!
//! Why: on the 2-core CPUs this tool targets, candle's own matmul (the `gemm` crate) reached
//! ~150 GFLOP/s on the demo model's layer shapes against ~215 for OpenBLAS, and for one-token
//! decoding (`m = 1`) it spent ~110 µs per 576×1536 product against ~30 µs, which made decoding
//! 30% slower than PyTorch. Only CPU f32 products use BLAS; every other device or dtype, and
//! builds without the feature, use candle's matmul through [`crate::model::lora::frozen_matmul`].
//!
//! Threads: OpenBLAS is set to one thread, and large products are split into blocks of output
//! columns across rayon's pool, the pool candle's and our own kernels use (see `ffi`). On the
//! 2-core AMD EPYC of 2026-11-30 this took the 128-token forward from ~300 to ~255 ms.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::fused::contiguous_f32;

#[cfg(feature = "openblas")]
#[allow(unsafe_code)]
mod ffi {
    use std::sync::Once;

    use rayon::prelude::*;

    use super::MatView;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    #[link(name = "openblas")]
    extern "C" {
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn cblas_sgemv(
            layout: i32,
            trans: i32,
            m: i32,
            n: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            x: *const f32,
            incx: i32,
            beta: f32,
            y: *mut f32,
            incy: i32,
        );
        fn openblas_set_num_threads(n: i32);
    }

    /// Products with fewer multiply-adds than this run on one thread.
    const SPLIT_MIN_MACS: usize = 1 << 18;
    /// Column blocks handed to threads are multiples of this (OpenBLAS's kernels work on
    /// 16-wide panels of f32).
    const SPLIT_ALIGN: usize = 16;

    /// OpenBLAS runs single-threaded; products are split across rayon's threads here instead.
    ///
    /// Why: OpenBLAS's own threads busy-wait (`sched_yield`) between calls, where they fight
    /// rayon's and candle's workers for the cores during the element-wise work between products,
    /// and its 2-thread split of the demo model's shapes reached only ~1.6x of one thread. Giving
    /// each rayon thread a block of output columns keeps one pool of workers for everything.
    fn single_threaded_blas() {
        static ONCE: Once = Once::new();
        // SAFETY: sets OpenBLAS's thread count; called once, before any product runs.
        ONCE.call_once(|| unsafe { openblas_set_num_threads(1) });
    }

    /// A pointer shared by the threads of one split product; each writes disjoint columns.
    #[derive(Clone, Copy)]
    struct Shared<T>(T);
    // SAFETY: the pointers are read by several threads (inputs) or written at disjoint elements
    // (the output's column blocks) while the borrow they come from is held by the caller.
    unsafe impl<T> Send for Shared<T> {}
    // SAFETY: as above.
    unsafe impl<T> Sync for Shared<T> {}

    impl<T: Copy> Shared<T> {
        /// The pointer (a method, so closures capture the whole `Shared`, not its field).
        fn get(self) -> T {
            self.0
        }
    }

    /// `c = alpha · op(a) · op(b) + beta · c` on row-major views (bounds and shapes checked by
    /// the caller, [`super::gemm_views`]). Large products are split into column blocks of `c`
    /// across rayon's threads unless `split` is false.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_views(
        alpha: f32,
        a: &[f32],
        av: MatView,
        b: &[f32],
        bv: MatView,
        beta: f32,
        c: &mut [f32],
        cv: MatView,
        split: bool,
    ) -> candle_core::Result<()> {
        single_threaded_blas();
        let (m, n) = (cv.rows, cv.cols);
        let k = if av.transposed { av.rows } else { av.cols };
        if [m, n, k, av.ld, bv.ld, cv.ld]
            .iter()
            .any(|&d| i32::try_from(d).is_err())
        {
            candle_core::bail!("blas: dimensions exceed i32");
        }
        let threads = rayon::current_num_threads();
        let parts = if split && threads > 1 && m * n * k >= SPLIT_MIN_MACS {
            threads.min(n.div_ceil(SPLIT_ALIGN))
        } else {
            1
        };
        let (a_ptr, b_ptr, c_ptr) = (
            Shared(a.as_ptr()),
            Shared(b.as_ptr()),
            Shared(c.as_mut_ptr()),
        );
        let flag = |t: bool| if t { TRANS } else { NO_TRANS };
        let block = |cols: std::ops::Range<usize>| {
            // Columns `cols` of op(b) are rows of b as stored when b is used transposed.
            let b_offset = if bv.transposed {
                bv.offset + cols.start * bv.ld
            } else {
                bv.offset + cols.start
            };
            // SAFETY: the caller checked that every view lies inside its slice with its leading
            // dimension and that the shapes agree (dimensions fit i32, checked above); the
            // column block `cols` of c and of op(b) lies inside those views, and concurrent
            // blocks write disjoint columns of c, which no input aliases.
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    flag(av.transposed),
                    flag(bv.transposed),
                    m as i32,
                    cols.len() as i32,
                    k as i32,
                    alpha,
                    a_ptr.get().add(av.offset),
                    av.ld as i32,
                    b_ptr.get().add(b_offset),
                    bv.ld as i32,
                    beta,
                    c_ptr.get().add(cv.offset + cols.start),
                    cv.ld as i32,
                );
            }
        };
        if parts <= 1 {
            block(0..n);
        } else {
            let width = n.div_ceil(parts).div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN;
            (0..parts).into_par_iter().for_each(|p| {
                let start = (p * width).min(n);
                let end = (start + width).min(n);
                if start < end {
                    block(start..end);
                }
            });
        }
        Ok(())
    }

    /// `out (m×n) = x (m×k) · w (n×k)^T`, all row-major and contiguous.
    pub fn sgemm_xwt(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> candle_core::Result<()> {
        if x.len() != m * k || w.len() != n * k || out.len() != m * n {
            candle_core::bail!("blas-linear: buffer sizes do not match {m}x{k} · ({n}x{k})^T");
        }
        if k == 0 || out.is_empty() {
            // An empty sum (or nothing to compute); BLAS refuses a zero leading dimension.
            out.fill(0.0);
            return Ok(());
        }
        if m != 1 {
            return sgemm_views(
                1.0,
                x,
                MatView::new(0, m, k, k),
                w,
                MatView::new(0, n, k, k).t(),
                0.0,
                out,
                MatView::new(0, m, n, n),
                true,
            );
        }
        // One row (decoding): OpenBLAS 0.3.21's sgemm does not forward to gemv, which is ~3x
        // faster here. Rows of `w` are split across threads; each writes its own part of `out`.
        single_threaded_blas();
        let Ok(k_i) = i32::try_from(k) else {
            candle_core::bail!("blas-linear: dimensions exceed i32");
        };
        let threads = rayon::current_num_threads();
        let rows = if threads > 1 && n * k >= SPLIT_MIN_MACS / 4 {
            n.div_ceil(threads).div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN
        } else {
            n.max(1)
        };
        out.par_chunks_mut(rows)
            .zip(w.par_chunks(rows * k))
            .try_for_each(|(out, w)| {
                let Ok(n) = i32::try_from(out.len()) else {
                    candle_core::bail!("blas-linear: dimensions exceed i32");
                };
                // SAFETY: `w` holds `out.len()` rows of k elements, row-major; `x` has k and
                // `out` `out.len()` elements; `out` is not aliased.
                unsafe {
                    cblas_sgemv(
                        ROW_MAJOR,
                        NO_TRANS,
                        n,
                        k_i,
                        1.0,
                        w.as_ptr(),
                        k_i,
                        x.as_ptr(),
                        1,
                        0.0,
                        out.as_mut_ptr(),
                        1,
                    );
                }
                Ok(())
            })
    }
}

#[cfg(not(feature = "openblas"))]
mod ffi {
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_views(
        _alpha: f32,
        _a: &[f32],
        _av: super::MatView,
        _b: &[f32],
        _bv: super::MatView,
        _beta: f32,
        _c: &mut [f32],
        _cv: super::MatView,
        _split: bool,
    ) -> candle_core::Result<()> {
        candle_core::bail!("blas: built without the openblas feature")
    }

    pub fn sgemm_xwt(
        _x: &[f32],
        _w: &[f32],
        _out: &mut [f32],
        _m: usize,
        _n: usize,
        _k: usize,
    ) -> candle_core::Result<()> {
        candle_core::bail!("blas-linear: built without the openblas feature")
    }
}

/// A matrix inside a row-major buffer: `rows × cols` elements from `offset`, rows `ld` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatView {
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Rows as stored.
    pub rows: usize,
    /// Columns as stored.
    pub cols: usize,
    /// Distance between rows (the leading dimension), `≥ cols`.
    pub ld: usize,
    /// Use the stored matrix transposed in a product.
    pub transposed: bool,
}

impl MatView {
    /// A view of `rows × cols` from `offset` with row stride `ld`.
    pub fn new(offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            offset,
            rows,
            cols,
            ld,
            transposed: false,
        }
    }

    /// The same view, used transposed.
    #[must_use]
    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    fn fits(self, len: usize) -> bool {
        self.cols <= self.ld
            && self.ld > 0
            && (self.rows == 0
                || self.cols == 0
                || self.offset + (self.rows - 1) * self.ld + self.cols <= len)
    }
}

/// `c = alpha · op(a) · op(b) + beta · c` on strided views of row-major buffers, where `op`
/// transposes views marked [`MatView::t`]. BLAS only: errors in builds without it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_views(
    alpha: f32,
    a: &[f32],
    av: MatView,
    b: &[f32],
    bv: MatView,
    beta: f32,
    c: &mut [f32],
    cv: MatView,
) -> Result<()> {
    checked_gemm(alpha, a, av, b, bv, beta, c, cv, true)
}

/// [`gemm_views`], split across rayon's threads only when `split` (callers that already run one
/// product per thread pass `false`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn checked_gemm(
    alpha: f32,
    a: &[f32],
    av: MatView,
    b: &[f32],
    bv: MatView,
    beta: f32,
    c: &mut [f32],
    cv: MatView,
    split: bool,
) -> Result<()> {
    let (m, k) = if av.transposed {
        (av.cols, av.rows)
    } else {
        (av.rows, av.cols)
    };
    let (k_b, n) = if bv.transposed {
        (bv.cols, bv.rows)
    } else {
        (bv.rows, bv.cols)
    };
    if k != k_b || cv.rows != m || cv.cols != n || cv.transposed {
        return Err(crate::error::Error::invalid(
            "matrix product",
            format!("{m}x{k} · {k_b}x{n} into {}x{}", cv.rows, cv.cols),
        ));
    }
    if !(av.fits(a.len()) && bv.fits(b.len()) && cv.fits(c.len())) {
        return Err(crate::error::Error::invalid(
            "matrix product",
            "a view reaches outside its buffer",
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    Ok(ffi::sgemm_views(alpha, a, av, b, bv, beta, c, cv, split)?)
}

/// Whether this build routes CPU f32 products through BLAS.
pub const BLAS_ENABLED: bool = cfg!(feature = "openblas");

/// `x2 W^T` with `x2` of shape `(rows, in)` and `weight` `(out, in)`, on BLAS when possible.
/// Returns `None` when BLAS does not apply (not CPU, not f32, or built without the feature).
pub fn blas_linear(x2: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if !BLAS_ENABLED
        || !x2.device().is_cpu()
        || x2.dtype() != DType::F32
        || weight.dtype() != DType::F32
    {
        return Ok(None);
    }
    let x2 = x2.contiguous()?;
    let weight = weight.contiguous()?;
    Ok(Some(x2.apply_op2(
        &weight,
        BlasLinear {
            weight: weight.clone(),
        },
    )?))
}

/// The input gradient of `x W^T` for a frozen `W`: `g W` (through BLAS on CPU f32). Shared by
/// every frozen-linear op's backward; the weight itself never gets a gradient.
pub(crate) fn frozen_input_grad(grad: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    match batched_matmul(grad, weight, false, 1.0) {
        Ok(Some(input_grad)) => Ok(input_grad),
        Ok(None) => grad.matmul(weight),
        Err(err) => candle_core::bail!("frozen-linear backward: {err}"),
    }
}

struct BlasLinear {
    weight: Tensor,
}

impl CustomOp2 for BlasLinear {
    fn name(&self) -> &'static str {
        "blas-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "blas-linear")?;
        let w = contiguous_f32(s2, l2, "blas-linear")?;
        let (m, k) = l1.shape().dims2()?;
        let (n, k_w) = l2.shape().dims2()?;
        if k != k_w {
            candle_core::bail!("blas-linear: input has {k} features, weight expects {k_w}")
        }
        let mut out = vec![0f32; m * n];
        ffi::sgemm_xwt(x, w, &mut out, m, n, k)?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(frozen_input_grad(grad_res, &self.weight)?), None))
    }
}

/// `alpha · a · b` (or `alpha · a · bᵀ` with `transpose_b`) over matching leading (batch) dims:
/// `a` is `(.., m, k)`, `b` is `(.., k, n)` or `(.., n, k)`. For inference only (no backward).
/// Returns `None` when BLAS does not apply (not CPU f32, or built without the feature).
pub fn batched_matmul(
    a: &Tensor,
    b: &Tensor,
    transpose_b: bool,
    alpha: f32,
) -> Result<Option<Tensor>> {
    if !BLAS_ENABLED || !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    let a = a.contiguous()?;
    let b = b.contiguous()?;
    Ok(Some(a.apply_op2_no_bwd(
        &b,
        &BatchedMatmul { transpose_b, alpha },
    )?))
}

/// Batched products with fewer multiply-adds in all than this run on one thread.
const PAR_BATCH_MIN_MACS: usize = 1 << 18;

struct BatchedMatmul {
    transpose_b: bool,
    alpha: f32,
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "blas-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, "blas-batched-matmul")?;
        let b = contiguous_f32(s2, l2, "blas-batched-matmul")?;
        let (a_dims, b_dims) = (l1.shape().dims(), l2.shape().dims());
        let rank = a_dims.len();
        if rank < 2 || b_dims.len() != rank || a_dims[..rank - 2] != b_dims[..rank - 2] {
            candle_core::bail!("blas-batched-matmul: shapes {a_dims:?} and {b_dims:?} do not batch")
        }
        let (m, k) = (a_dims[rank - 2], a_dims[rank - 1]);
        let (k_b, n) = if self.transpose_b {
            (b_dims[rank - 1], b_dims[rank - 2])
        } else {
            (b_dims[rank - 2], b_dims[rank - 1])
        };
        if k != k_b {
            candle_core::bail!("blas-batched-matmul: inner dimensions {k} and {k_b} differ")
        }
        let batch: usize = a_dims[..rank - 2].iter().product();
        if a.len() != batch * m * k || b.len() != batch * k * n {
            candle_core::bail!("blas-batched-matmul: buffer sizes do not match the shapes")
        }
        let mut out = vec![0f32; batch * m * n];
        let b_view = if self.transpose_b {
            MatView::new(0, n, k, k).t()
        } else {
            MatView::new(0, k, n, n)
        };
        let product = |i: usize, out: &mut [f32], split: bool| {
            ffi::sgemm_views(
                self.alpha,
                &a[i * m * k..(i + 1) * m * k],
                MatView::new(0, m, k, k),
                &b[i * k * n..(i + 1) * k * n],
                b_view,
                0.0,
                out,
                MatView::new(0, m, n, n),
                split,
            )
        };
        if m * n == 0 {
            // Nothing to compute (and no chunks to split the output into).
        } else if batch > 1 && batch * m * n * k >= PAR_BATCH_MIN_MACS {
            // Many small products (attention heads): one per task, each on one thread.
            out.par_chunks_mut(m * n)
                .enumerate()
                .try_for_each(|(i, out)| product(i, out, false))?;
        } else {
            for (i, out) in out.chunks_mut(m * n).enumerate() {
                product(i, out, true)?;
            }
        }
        let mut dims = a_dims[..rank - 2].to_vec();
        dims.extend([m, n]);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn blas_matches_candle_matmul_and_backward() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[0.3f32, -0.2, 0.7], [1.0, 2.0, -1.0]], &dev)?;
        let w = Tensor::new(
            &[
                [1f32, 2.0, 3.0],
                [-1.0, 0.5, 2.0],
                [0.0, 1.0, -1.0],
                [2.0, 2.0, 2.0],
            ],
            &dev,
        )?;
        let y = blas_linear(x.as_tensor(), &w)?;
        assert_eq!(y.is_some(), BLAS_ENABLED);
        let Some(y) = y else {
            return Ok(());
        };
        let reference = x.as_tensor().matmul(&w.t()?)?;
        let diff = (y.clone() - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let coeff = Tensor::new(&[[1f32, -2.0, 0.5, 1.0], [0.5, 3.0, -1.0, 2.0]], &dev)?;
        let g_blas = (y * &coeff)?.sum_all()?.backward()?;
        let g_ref = (reference * &coeff)?.sum_all()?.backward()?;
        let a = g_blas.get(&x).unwrap().to_vec2::<f32>()?;
        let b = g_ref.get(&x).unwrap().to_vec2::<f32>()?;
        for (ra, rb) in a.iter().zip(&b) {
            for (va, vb) in ra.iter().zip(rb) {
                assert!((va - vb).abs() < 1e-6);
            }
        }
        assert!(g_blas.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn strided_views_multiply_and_refuse_out_of_bounds() -> anyhow::Result<()> {
        // a: the 2x3 block at column 1 of a 2x5 buffer; b: 2x3 stored, used transposed.
        let a = [9f32, 1.0, 2.0, 3.0, 9.0, 9.0, 4.0, 5.0, 6.0, 9.0];
        let b = [1f32, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut c = [1f32; 4];
        let result = gemm_views(
            2.0,
            &a,
            MatView::new(1, 2, 3, 5),
            &b,
            MatView::new(0, 2, 3, 3).t(),
            1.0,
            &mut c,
            MatView::new(0, 2, 2, 2),
        );
        if !BLAS_ENABLED {
            assert!(result.is_err());
            return Ok(());
        }
        result?;
        // [1 2 3; 4 5 6] · [1 2; 0 1; -1 0] = [-2 4; -2 13]; 2·that + 1
        assert!(c
            .iter()
            .zip([-3.0, 9.0, -3.0, 27.0])
            .all(|(x, y)| (x - y).abs() < 1e-6));
        let past_end = gemm_views(
            1.0,
            &a,
            MatView::new(6, 2, 3, 5),
            &b,
            MatView::new(0, 2, 3, 3).t(),
            0.0,
            &mut c,
            MatView::new(0, 2, 2, 2),
        );
        assert!(past_end.is_err());
        Ok(())
    }

    /// Products large enough to be split across threads (odd sizes, so the column blocks are
    /// uneven), on views inside larger buffers with `beta`, and the one-row (gemv) path.
    #[test]
    fn split_products_match_candle() -> anyhow::Result<()> {
        if !BLAS_ENABLED {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (m, n, k) = (33usize, 101usize, 90usize);
        let a = Tensor::arange(0f32, (m * k) as f32, &dev)?
            .affine(0.013, -0.5)?
            .sin()?;
        let b = Tensor::arange(0f32, (n * k) as f32, &dev)?
            .affine(0.029, 0.2)?
            .cos()?;
        let (a_data, b_data) = (a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        let a2 = a.reshape((m, k))?;
        let b_nk = b.reshape((n, k))?;
        // c: an m×n block at column 3 of an m×(n+5) buffer of ones; c = 2·a·bᵀ + 0.5·c.
        let ld = n + 5;
        let mut c = vec![1f32; m * ld];
        gemm_views(
            2.0,
            &a_data,
            MatView::new(0, m, k, k),
            &b_data,
            MatView::new(0, n, k, k).t(),
            0.5,
            &mut c,
            MatView::new(3, m, n, ld),
        )?;
        let reference = ((a2.matmul(&b_nk.t()?)? * 2.0)? + 0.5)?.to_vec2::<f32>()?;
        for (i, row) in reference.iter().enumerate() {
            assert!(c[i * ld..i * ld + 3]
                .iter()
                .all(|x| x.to_bits() == 1f32.to_bits()));
            assert!(c[i * ld + 3 + n..(i + 1) * ld]
                .iter()
                .all(|x| x.to_bits() == 1f32.to_bits()));
            for (j, want) in row.iter().enumerate() {
                assert!((c[i * ld + 3 + j] - want).abs() < 1e-3, "({i},{j})");
            }
        }
        // b stored k×n (not transposed).
        let b_kn = b_nk.t()?.contiguous()?;
        let mut c2 = vec![0f32; m * n];
        gemm_views(
            1.0,
            &a_data,
            MatView::new(0, m, k, k),
            &b_kn.flatten_all()?.to_vec1::<f32>()?,
            MatView::new(0, k, n, n),
            0.0,
            &mut c2,
            MatView::new(0, m, n, n),
        )?;
        let reference = a2.matmul(&b_kn)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(c2.iter().zip(&reference).all(|(x, y)| (x - y).abs() < 1e-3));
        // One row through the linear op: x (1×k) · wᵀ with w (n×k), n·k large enough to split.
        let (n, k) = (300usize, 250usize);
        let w = Tensor::arange(0f32, (n * k) as f32, &dev)?
            .affine(0.007, 0.1)?
            .sin()?
            .reshape((n, k))?;
        let x = Tensor::arange(0f32, k as f32, &dev)?
            .affine(0.05, -1.0)?
            .reshape((1, k))?;
        let ours = blas_linear(&x, &w)?.unwrap();
        let reference = x.matmul(&w.t()?)?;
        assert!((ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
        Ok(())
    }

    #[test]
    fn batched_matmul_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 24.0, &dev)?
            .reshape((2, 3, 4))?
            .affine(0.1, -1.0)?;
        let b = Tensor::arange(0f32, 40.0, &dev)?
            .reshape((2, 5, 4))?
            .affine(0.05, 0.3)?;
        let Some(ours) = batched_matmul(&a, &b, true, 0.5)? else {
            return Ok(());
        };
        let reference = (a.matmul(&b.t()?)? * 0.5)?;
        assert!((ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let bt = b.t()?.contiguous()?; // (2, 4, 5)
        let ours = batched_matmul(&a, &bt, false, 1.0)?.unwrap();
        assert!(
            (ours - a.matmul(&bt)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                < 1e-5
        );
        Ok(())
    }
}
