//! Weight matrices kept in their stored precision (f16, bf16, and GGUF's quantised blocks) and
//! expanded to f32 a tile at a time inside the products that use them.
//!
//! A frozen linear layer needs two products: the forward `x Wᵀ` and the input gradient `g W`.
//! Both are computed here tile by tile: a few rows (forward) or a block of columns (input
//! gradient) of `W` are expanded into a small f32 buffer that stays in cache, multiplied with
//! BLAS, and dropped, so a 7B model's weights stay at 2 bytes (bf16) or ~0.6 bytes (Q4_K) per
//! weight in memory. Tiles are spread over rayon's threads, each with its own buffer.
//!
//! The block layouts are ggml's (llama.cpp `ggml-common.h`, as candle's `k_quants` mirrors
//! them); each dequantiser below is checked against candle's in the tests.

use std::sync::Arc;

use half::slice::HalfBitsSliceExt;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::blas::{checked_gemm, MatView, BLAS_ENABLED};

/// A stored element format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PackedKind {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// ggml Q4_0: 32 weights, one f16 scale, 4-bit codes offset by 8.
    Q4_0,
    /// ggml Q4_1: 32 weights, f16 scale and minimum, 4-bit codes.
    Q4_1,
    /// ggml Q5_0: 32 weights, one f16 scale, 5-bit codes offset by 16.
    Q5_0,
    /// ggml Q5_1: 32 weights, f16 scale and minimum, 5-bit codes.
    Q5_1,
    /// ggml Q8_0: 32 weights, one f16 scale, 8-bit signed codes.
    Q8_0,
    /// ggml Q4_K: 256 weights in 8 sub-blocks with 6-bit scales and minima.
    Q4K,
    /// ggml Q5_K: as Q4_K with a fifth bit per weight.
    Q5K,
    /// ggml Q6_K: 256 weights in 16 sub-blocks with 8-bit scales, 6-bit codes offset by 32.
    Q6K,
}

impl PackedKind {
    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// The name users see (`bf16`, `Q4_K`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// The kind of a GGUF tensor type, or `None` for types kept dense (f32, and quantisations
    /// not listed here, which the loader expands at load).
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match dtype {
            G::F16 => Self::F16,
            G::BF16 => Self::Bf16,
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// Expands whole blocks: `bytes` holds `out.len() / block_size` blocks.
    fn expand(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Self::F16 => expand_f16(bytes, out),
            Self::Bf16 => expand_bf16(bytes, out),
            Self::Q4_0 => blocks(bytes, out, 18, 32, expand_q4_0),
            Self::Q4_1 => blocks(bytes, out, 20, 32, expand_q4_1),
            Self::Q5_0 => blocks(bytes, out, 22, 32, expand_q5_0),
            Self::Q5_1 => blocks(bytes, out, 24, 32, expand_q5_1),
            Self::Q8_0 => blocks(bytes, out, 34, 32, expand_q8_0),
            Self::Q4K => blocks(bytes, out, 144, 256, expand_q4k),
            Self::Q5K => blocks(bytes, out, 176, 256, expand_q5k),
            Self::Q6K => blocks(bytes, out, 210, 256, expand_q6k),
        }
    }
}

fn blocks(bytes: &[u8], out: &mut [f32], bb: usize, bs: usize, f: fn(&[u8], &mut [f32])) {
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        f(b, o);
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn expand_f16(bytes: &[u8], out: &mut [f32]) {
    // Gathered into u16s first so half's slice conversion (F16C when the CPU has it) applies.
    let bits: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    bits.reinterpret_cast::<half::f16>()
        .iter()
        .zip(out.iter_mut())
        .for_each(|(h, o)| *o = h.to_f32());
}

fn expand_bf16(bytes: &[u8], out: &mut [f32]) {
    for (c, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}

fn expand_q4_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = f32::from(i16::from(q & 0x0F) - 8) * d;
        out[j + 16] = f32::from(i16::from(q >> 4) - 8) * d;
    }
}

fn expand_q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = f32::from(q & 0x0F) * d + m;
        out[j + 16] = f32::from(q >> 4) * d + m;
    }
}

fn expand_q5_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        out[j] = f32::from(i16::from((q & 0x0F) | h0) - 16) * d;
        out[j + 16] = f32::from(i16::from((q >> 4) | h1) - 16) * d;
    }
}

fn expand_q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        out[j] = f32::from((q & 0x0F) | h0) * d + m;
        out[j + 16] = f32::from((q >> 4) | h1) * d + m;
    }
}

#[allow(clippy::cast_possible_wrap)]
fn expand_q8_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn expand_q4k(b: &[u8], out: &mut [f32]) {
    expand_k_scaled(b, out, &b[16..144], None);
}

fn expand_q5k(b: &[u8], out: &mut [f32]) {
    expand_k_scaled(b, out, &b[48..176], Some(&b[16..48]));
}

/// Q4_K and Q5_K share their layout up to the codes: f16 `d`, `dmin`, twelve bytes of 6-bit
/// scales and minima, then (Q5_K only) 32 bytes of fifth bits `qh`, then the 4-bit codes `qs`.
/// Sub-block pair `j` holds 64 weights: low nibbles, then high nibbles, each with its own
/// scale and minimum; Q5_K adds 16 where bit `2j` (low) or `2j + 1` (high) of `qh[l]` is set.
fn expand_k_scaled(b: &[u8], out: &mut [f32], qs: &[u8], qh: Option<&[u8]>) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    for (j, (q, y)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        for (l, &q) in q.iter().enumerate() {
            let (h1, h2) = match qh {
                Some(qh) => (
                    if qh[l] & u1 != 0 { 16 } else { 0 },
                    if qh[l] & u2 != 0 { 16 } else { 0 },
                ),
                None => (0, 0),
            };
            y[l] = d1 * f32::from((q & 0x0F) + h1) - m1;
            y[l + 32] = d2 * f32::from((q >> 4) + h2) - m2;
        }
    }
}

#[allow(clippy::cast_possible_wrap)]
fn expand_q6k(b: &[u8], out: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = half_at(b, 208);
    for (n, y) in out.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = &sc_all[8 * n..8 * n + 8];
        let scale = |i: usize| d * f32::from(sc[i] as i8);
        for l in 0..32 {
            let is = l / 16;
            let code = |low: u8, shift: u32| -> f32 {
                f32::from(i16::from(low | (((qh[l] >> shift) & 3) << 4)) - 32)
            };
            y[l] = scale(is) * code(ql[l] & 0x0F, 0);
            y[l + 32] = scale(is + 2) * code(ql[l + 32] & 0x0F, 2);
            y[l + 64] = scale(is + 4) * code(ql[l] >> 4, 4);
            y[l + 96] = scale(is + 6) * code(ql[l + 32] >> 4, 6);
        }
    }
}

/// Elements per forward tile (rows × columns of `W` expanded at once): 512 KiB of f32.
const TILE_ELEMS: usize = 1 << 17;

/// A `(rows, cols)` matrix held as stored. Cheap to clone (the bytes are shared); row ranges
/// ([`PackedMatrix::narrow_rows`]) share them too.
#[derive(Clone)]
pub struct PackedMatrix {
    kind: PackedKind,
    rows: usize,
    cols: usize,
    /// Row `r` of this matrix is row `first_row + r` of `data`.
    first_row: usize,
    data: Arc<Vec<u8>>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({} {}x{})",
            self.kind.label(),
            self.rows,
            self.cols
        )
    }
}

impl PackedMatrix {
    /// Wraps `data`, rows of `cols` weights in `kind`'s blocks, after checking its length.
    pub fn new(kind: PackedKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if cols % kind.block_size() != 0 {
            return Err(Error::invalid(
                "packed weight",
                format!(
                    "{cols} columns are not whole {} blocks of {}",
                    kind.label(),
                    kind.block_size()
                ),
            ));
        }
        let expected = rows * cols / kind.block_size() * kind.block_bytes();
        if data.len() != expected {
            return Err(Error::invalid(
                "packed weight",
                format!(
                    "{} bytes for a {rows}x{cols} {} matrix (expected {expected})",
                    data.len(),
                    kind.label()
                ),
            ));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            first_row: 0,
            data: Arc::new(data),
        })
    }

    /// Packs f32 values `(rows, cols)` as f16 or bf16 (round to nearest even).
    pub fn from_f32(kind: PackedKind, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        let bits: Vec<u16> = match kind {
            PackedKind::F16 => values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect(),
            PackedKind::Bf16 => values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect(),
            other => {
                return Err(Error::invalid(
                    "packed weight",
                    format!("cannot pack f32 values as {}", other.label()),
                ))
            }
        };
        Self::new(
            kind,
            rows,
            cols,
            bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        )
    }

    /// The element format.
    pub fn kind(&self) -> PackedKind {
        self.kind
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_size() * self.kind.block_bytes()
    }

    /// Bytes this matrix's rows occupy (a row range counts only its rows).
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// Whether two matrices share their bytes (tied embeddings, fused projections).
    pub fn shares_storage(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// Rows `start..start + len`, sharing the bytes.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.rows {
            return Err(Error::invalid(
                "packed weight",
                format!("rows {start}..{} of {}", start + len, self.rows),
            ));
        }
        Ok(Self {
            rows: len,
            first_row: self.first_row + start,
            ..self.clone()
        })
    }

    /// A copy with row `i` taken from row `order[i]` (GGUF's q/k un-permutation).
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(Error::invalid("packed weight", "row order does not fit"));
        }
        let mut data = Vec::with_capacity(self.bytes());
        for &r in order {
            data.extend_from_slice(self.row_slice(r, 0, self.cols));
        }
        Self::new(self.kind, self.rows, self.cols, data)
    }

    /// The stored bytes of columns `c0..c1` (whole blocks) of row `r`.
    fn row_slice(&self, r: usize, c0: usize, c1: usize) -> &[u8] {
        let (bs, bb) = (self.kind.block_size(), self.kind.block_bytes());
        let start = (self.first_row + r) * self.row_bytes();
        &self.data[start + c0 / bs * bb..start + c1 / bs * bb]
    }

    /// Expands rows `r0..r1`, columns `c0..c1` (whole blocks) into `out`, row-major.
    fn expand_into(&self, r0: usize, r1: usize, c0: usize, c1: usize, out: &mut [f32]) {
        let width = c1 - c0;
        for (r, o) in (r0..r1).zip(out.chunks_exact_mut(width)) {
            self.kind.expand(self.row_slice(r, c0, c1), o);
        }
    }

    /// Rows `r0..r1` in f32, row-major.
    pub fn expand_rows(&self, r0: usize, r1: usize) -> Result<Vec<f32>> {
        if r0 > r1 || r1 > self.rows {
            return Err(Error::invalid(
                "packed weight",
                format!("rows {r0}..{r1} of {}", self.rows),
            ));
        }
        let mut out = vec![0f32; (r1 - r0) * self.cols];
        out.par_chunks_mut(self.cols.max(1) * 64)
            .enumerate()
            .for_each(|(i, o)| {
                let a = r0 + i * 64;
                self.expand_into(a, a + o.len() / self.cols.max(1), 0, self.cols, o);
            });
        Ok(out)
    }

    /// Rows `ids` in f32, `(ids.len(), cols)` row-major (an embedding lookup).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            return Err(Error::invalid(
                "token id",
                format!("{bad} is outside the {}-row matrix", self.rows),
            ));
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols.max(1))) {
            let r = id as usize;
            self.expand_into(r, r + 1, 0, self.cols, o);
        }
        Ok(out)
    }

    /// `x Wᵀ` for `x` `(m, cols)` row-major: `(m, rows)` row-major.
    pub fn xwt(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.rows, self.cols);
        if x.len() != m * k {
            return Err(Error::invalid(
                "packed product",
                format!("input of {} values is not {m}x{k}", x.len()),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(vec![0f32; m * n]);
        }
        // Tiles of `rows` rows of W; tile t fills rows of yᵀ (n, m), so tiles write disjoint
        // chunks: yᵀ[tile] = W[tile] xᵀ.
        let rows = (TILE_ELEMS / k.max(1)).clamp(16, n.max(16));
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(rows * m)
            .enumerate()
            .try_for_each_init(Vec::new, |buf, (t, out)| {
                let r0 = t * rows;
                let len = out.len() / m;
                buf.resize(len * k, 0.0);
                self.expand_into(r0, r0 + len, 0, k, buf);
                tile_gemm(
                    buf,
                    MatView::new(0, len, k, k),
                    x,
                    MatView::new(0, m, k, k).t(),
                    0.0,
                    out,
                    MatView::new(0, len, m, m),
                )
            })?;
        Ok(transpose(&yt, n, m))
    }

    /// `g W` for `g` `(m, rows)` row-major: `(m, cols)` row-major (the input gradient of
    /// `x Wᵀ`).
    pub fn gw(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.rows, self.cols);
        if g.len() != m * n {
            return Err(Error::invalid(
                "packed product",
                format!("gradient of {} values is not {m}x{n}", g.len()),
            ));
        }
        if m == 0 || k == 0 {
            return Ok(vec![0f32; m * k]);
        }
        // Column blocks of W (whole stored blocks) fill rows of dxᵀ (k, m); within a block,
        // row tiles of W accumulate: dxᵀ[c] += W[r, c]ᵀ gᵀ[r].
        let bs = self.kind.block_size();
        let threads = rayon::current_num_threads().max(1);
        let width = k.div_ceil(4 * threads).div_ceil(bs).max(1) * bs;
        let rows = (TILE_ELEMS / width).clamp(16, n.max(16));
        let mut dxt = vec![0f32; k * m];
        dxt.par_chunks_mut(width * m)
            .enumerate()
            .try_for_each_init(Vec::new, |buf, (c, out)| {
                let c0 = c * width;
                let w = out.len() / m;
                for r0 in (0..n).step_by(rows) {
                    let r1 = (r0 + rows).min(n);
                    buf.resize((r1 - r0) * w, 0.0);
                    self.expand_into(r0, r1, c0, c0 + w, buf);
                    tile_gemm(
                        buf,
                        MatView::new(0, r1 - r0, w, w).t(),
                        g,
                        MatView::new(r0, m, r1 - r0, n).t(),
                        if r0 == 0 { 0.0 } else { 1.0 },
                        out,
                        MatView::new(0, w, m, m),
                    )?;
                }
                Ok::<(), Error>(())
            })?;
        Ok(transpose(&dxt, k, m))
    }
}

/// `(rows, cols)` row-major → `(cols, rows)` row-major.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    if rows == 1 || cols == 1 {
        return a.to_vec();
    }
    let mut out = vec![0f32; a.len()];
    for (r, row) in a.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

/// `c = op(a) op(b) + beta c` on one thread: OpenBLAS when built with it, else a plain loop
/// (builds without OpenBLAS are the slow fallback everywhere).
fn tile_gemm(
    a: &[f32],
    av: MatView,
    b: &[f32],
    bv: MatView,
    beta: f32,
    c: &mut [f32],
    cv: MatView,
) -> Result<()> {
    if BLAS_ENABLED {
        return checked_gemm(1.0, a, av, b, bv, beta, c, cv, false);
    }
    let at = |v: MatView, s: &[f32], i: usize, j: usize| -> f32 {
        if v.transposed {
            s[v.offset + j * v.ld + i]
        } else {
            s[v.offset + i * v.ld + j]
        }
    };
    let k = if av.transposed { av.rows } else { av.cols };
    for i in 0..cv.rows {
        for j in 0..cv.cols {
            let mut acc = 0f32;
            for p in 0..k {
                acc += at(av, a, i, p) * at(bv, b, p, j);
            }
            let slot = &mut c[cv.offset + i * cv.ld + j];
            *slot = acc + if beta == 0.0 { 0.0 } else { beta * *slot };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::model::lora::SplitMix64(seed);
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    /// Quantises `w` with candle and wraps its bytes; returns candle's own dequantisation.
    fn packed(kind: GgmlDType, w: &[f32], rows: usize, cols: usize) -> (PackedMatrix, Vec<f32>) {
        let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, kind).unwrap();
        let reference = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bytes = q.data().unwrap().to_vec();
        let kind = PackedKind::from_ggml(kind).unwrap();
        (
            PackedMatrix::new(kind, rows, cols, bytes).unwrap(),
            reference,
        )
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    const KINDS: [GgmlDType; 10] = [
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    #[test]
    fn every_kind_expands_exactly_as_candle_dequantises() {
        let (rows, cols) = (5, 512);
        let w = seeded(rows * cols, 7);
        for kind in KINDS {
            let (p, reference) = packed(kind, &w, rows, cols);
            let ours = p.expand_rows(0, rows).unwrap();
            // Bit-identical: the f32 path dequantises with candle, and the stored path must
            // give the very same weights.
            assert!(
                ours.iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kind:?}"
            );
            let gathered = p.gather_rows(&[3, 0, 3]).unwrap();
            assert_eq!(&gathered[..cols], &reference[3 * cols..4 * cols]);
            assert_eq!(&gathered[cols..2 * cols], &reference[..cols]);
            assert!(p.gather_rows(&[5]).is_err());
        }
    }

    /// Forward and input-gradient products on each kind equal the f32 products of the expanded
    /// weights; shapes are chosen to cross tile edges (rows not a multiple of the tile, several
    /// column blocks).
    #[test]
    fn tile_products_equal_dense_products_for_every_kind() {
        let (rows, cols) = (300, 1024);
        let w = seeded(rows * cols, 11);
        for m in [1usize, 7] {
            let x = seeded(m * cols, 3);
            let g = seeded(m * rows, 5);
            for kind in KINDS {
                let (p, dense) = packed(kind, &w, rows, cols);
                let y = p.xwt(&x, m).unwrap();
                let mut y_ref = vec![0f32; m * rows];
                for i in 0..m {
                    for r in 0..rows {
                        y_ref[i * rows + r] = (0..cols)
                            .map(|c| f64::from(x[i * cols + c]) * f64::from(dense[r * cols + c]))
                            .sum::<f64>() as f32;
                    }
                }
                assert!(max_diff(&y, &y_ref) < 1e-3, "{kind:?} forward, m = {m}");
                let dx = p.gw(&g, m).unwrap();
                let mut dx_ref = vec![0f32; m * cols];
                for i in 0..m {
                    for c in 0..cols {
                        dx_ref[i * cols + c] = (0..rows)
                            .map(|r| f64::from(g[i * rows + r]) * f64::from(dense[r * cols + c]))
                            .sum::<f64>() as f32;
                    }
                }
                assert!(
                    max_diff(&dx, &dx_ref) < 1e-3,
                    "{kind:?} input gradient, m = {m}"
                );
            }
        }
    }

    #[test]
    fn row_ranges_and_permutations_share_or_copy_rows() {
        let (rows, cols) = (8, 64);
        let w = seeded(rows * cols, 1);
        let (p, dense) = packed(GgmlDType::Q8_0, &w, rows, cols);
        let part = p.narrow_rows(2, 3).unwrap();
        assert!(part.shares_storage(&p));
        assert_eq!(part.bytes(), 3 * p.bytes() / 8);
        assert_eq!(part.expand_rows(0, 3).unwrap(), dense[2 * cols..5 * cols]);
        assert!(p.narrow_rows(6, 3).is_err());
        let order = [7, 6, 5, 4, 3, 2, 1, 0];
        let reversed = p.permute_rows(&order).unwrap();
        assert_eq!(reversed.expand_rows(0, 1).unwrap(), dense[7 * cols..]);
        assert!(PackedMatrix::new(PackedKind::Q4K, 2, 100, vec![0; 10]).is_err());
        assert!(PackedMatrix::new(PackedKind::Q8_0, 2, 64, vec![0; 10]).is_err());
    }
}
