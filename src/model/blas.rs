//! `x W^T` for frozen weights through OpenBLAS's `cblas_sgemm` (cargo feature `openblas`, on by
//! default), as a candle custom op whose backward reaches the input only.
//!
//! Why: on the 2-core CPUs this tool targets, candle's own matmul (the `gemm` crate) reached
//! ~150 GFLOP/s on the demo model's layer shapes against ~215 for OpenBLAS, and for one-token
//! decoding (`m = 1`) it spent ~110 µs per 576×1536 product against ~30 µs, which made decoding
//! 30% slower than PyTorch. Only CPU f32 products use BLAS; every other device or dtype, and
//! builds without the feature, use candle's matmul through [`crate::model::lora::frozen_matmul`].

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::error::Result;
use crate::model::fused::contiguous_f32;

#[cfg(feature = "openblas")]
#[allow(unsafe_code)]
mod ffi {
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
    }

    /// `out (m×n) = alpha · a (m×k) · b`, with `b` stored `(k×n)` or, when `transpose_b`, `(n×k)`;
    /// all row-major and contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        a: &[f32],
        b: &[f32],
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        transpose_b: bool,
        alpha: f32,
    ) -> candle_core::Result<()> {
        if a.len() != m * k || b.len() != n * k || out.len() != m * n {
            candle_core::bail!("blas: buffer sizes do not match {m}x{k} · {k}x{n}");
        }
        let (Ok(mi), Ok(ni), Ok(ki)) = (i32::try_from(m), i32::try_from(n), i32::try_from(k))
        else {
            candle_core::bail!("blas: dimensions exceed i32");
        };
        let (trans, ldb) = if transpose_b {
            (TRANS, ki)
        } else {
            (NO_TRANS, ni)
        };
        // SAFETY: the slices hold exactly m×k, k×n and m×n elements (checked above), row-major
        // with the leading dimensions passed, and `out` aliases neither input.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                trans,
                mi,
                ni,
                ki,
                alpha,
                a.as_ptr(),
                ki,
                b.as_ptr(),
                ldb,
                0.0,
                out.as_mut_ptr(),
                ni,
            );
        }
        Ok(())
    }

    /// `c = alpha · op(a) · op(b) + beta · c` on row-major views (bounds checked by the caller,
    /// [`super::gemm_views`]).
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_views(
        alpha: f32,
        a: &[f32],
        av: super::MatView,
        b: &[f32],
        bv: super::MatView,
        beta: f32,
        c: &mut [f32],
        cv: super::MatView,
    ) -> candle_core::Result<()> {
        let k = if av.transposed { av.rows } else { av.cols };
        let dims = [cv.rows, cv.cols, k, av.ld, bv.ld, cv.ld].map(i32::try_from);
        let [Ok(m), Ok(n), Ok(k), Ok(lda), Ok(ldb), Ok(ldc)] = dims else {
            candle_core::bail!("blas: dimensions exceed i32");
        };
        let flag = |t: bool| if t { TRANS } else { NO_TRANS };
        // SAFETY: `super::gemm_views` checked that each view lies inside its slice with the
        // given leading dimension and that the shapes agree; `c` is a distinct &mut slice.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                flag(av.transposed),
                flag(bv.transposed),
                m,
                n,
                k,
                alpha,
                a.as_ptr().add(av.offset),
                lda,
                b.as_ptr().add(bv.offset),
                ldb,
                beta,
                c.as_mut_ptr().add(cv.offset),
                ldc,
            );
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
        let (Ok(m), Ok(n), Ok(k)) = (i32::try_from(m), i32::try_from(n), i32::try_from(k)) else {
            candle_core::bail!("blas-linear: dimensions exceed i32");
        };
        if m == 1 {
            // One row (decoding): OpenBLAS 0.3.21's sgemm does not forward to gemv, which is
            // ~3x faster here. SAFETY: `w` is n×k row-major, `x` has k and `out` n elements.
            unsafe {
                cblas_sgemv(
                    ROW_MAJOR,
                    NO_TRANS,
                    n,
                    k,
                    1.0,
                    w.as_ptr(),
                    k,
                    x.as_ptr(),
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    1,
                );
            }
            return Ok(());
        }
        // SAFETY: the slices are exactly m×k, n×k and m×n (checked above), row-major with the
        // leading dimensions passed, and `out` is not aliased by `x` or `w`.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                m,
                n,
                k,
                1.0,
                x.as_ptr(),
                k,
                w.as_ptr(),
                k,
                0.0,
                out.as_mut_ptr(),
                n,
            );
        }
        Ok(())
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
    ) -> candle_core::Result<()> {
        candle_core::bail!("blas: built without the openblas feature")
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        _a: &[f32],
        _b: &[f32],
        _out: &mut [f32],
        _m: usize,
        _n: usize,
        _k: usize,
        _t: bool,
        _alpha: f32,
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
    Ok(ffi::sgemm_views(alpha, a, av, b, bv, beta, c, cv)?)
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
        let mut out = vec![0f32; batch * m * n];
        for i in 0..batch {
            ffi::sgemm(
                &a[i * m * k..(i + 1) * m * k],
                &b[i * k * n..(i + 1) * k * n],
                &mut out[i * m * n..(i + 1) * m * n],
                m,
                n,
                k,
                self.transpose_b,
                self.alpha,
            )?;
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
