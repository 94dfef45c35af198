//! Weight-only quantised linear layers for decoding, where each token's step reads every
//! active weight once and time is bytes over memory bandwidth: BF16 (2 bytes a weight)
//! and INT8 with one symmetric scale per output channel (1 byte a weight + 4 bytes a row).
//!
//! - BF16: the upper 16 bits of the f32, rounded to nearest even; relative error of a
//!   weight ≤ 2⁻⁸ (8 significant bits, half an ulp).
//! - INT8: row `j` scaled by `s_j = max_c |W[j,c]| / 127`, `q = round(W / s_j)` in
//!   [−127, 127]; `|W − s_j·q| ≤ s_j / 2` for every weight.
//!
//! `y = x · Wᵀ` dequantises on the fly: for a few rows of `x` (decode steps) each weight
//! row is converted in registers and multiplied into every `x` row while it is in cache
//! (a GEMV that reads the weights once; INT8 there multiplies in integers against the
//! activations rounded to 16 bits, see [`crate::gemv_int8`]); for many rows (prefill)
//! blocks of weight rows are dequantised into an f32 scratch and multiplied by the GEMM. The loops are compiled
//! for AVX-512, AVX2+FMA and the baseline and chosen at run time.

use crate::gemm::{gemm_strided, Op, Strided};
use crate::gemv::{gemv_rows_rounded, Fetch, Rows, MAX_X_ROWS as GROUP};
use crate::gemv_int8::QuantizedActivations;
use crate::huge::filled;
use rayon::prelude::*;

/// How a matrix's weights are stored for decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// as trained
    F32,
    /// bfloat16
    Bf16,
    /// int8, per-output-channel symmetric scale
    Int8,
}

impl WeightFormat {
    /// `f32`, `bf16` or `int8`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(WeightFormat::F32),
            "bf16" => Some(WeightFormat::Bf16),
            "int8" => Some(WeightFormat::Int8),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
        }
    }

    /// Bytes a weight takes (INT8's per-row scale aside).
    pub fn bytes_per_weight(&self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::Bf16 => 2,
            WeightFormat::Int8 => 1,
        }
    }
}

#[derive(Clone, Debug)]
enum QData {
    Bf16(Vec<u16>),
    Int8 { q: Vec<i8>, scale: Vec<f32> },
}

/// A `[rows, cols]` weight matrix (rows = outputs) in BF16 or INT8.
#[derive(Clone, Debug)]
pub struct QMatrix {
    /// output channels
    pub rows: usize,
    /// input channels
    pub cols: usize,
    data: QData,
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 of a bfloat16.
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rows up to which the GEMV runs (more: dequantise and GEMM).
pub const GEMV_MAX_ROWS: usize = 32;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;
/// Bytes of weights the GEMV passes over once per group of `x` rows before moving on:
/// well inside the smallest L2 of the x86 cores it runs on (512 KiB).
const GEMV_SLICE_BYTES: usize = 128 << 10;

impl QMatrix {
    /// Quantises `w: [rows, cols]` (`F32` is not a quantised format).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: WeightFormat) -> Self {
        assert_eq!(w.len(), rows * cols, "a [rows, cols] matrix");
        let data = match format {
            WeightFormat::F32 => panic!("f32 weights are not quantised"),
            WeightFormat::Bf16 => QData::Bf16(filled(w.len(), |i| to_bf16(w[i]))),
            WeightFormat::Int8 => {
                let scale: Vec<f32> = w.par_chunks(cols.max(1)).map(|r| r.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0).collect();
                let inv: Vec<f32> = scale.iter().map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 }).collect();
                let q = filled(rows * cols, |i| (w[i] * inv[i / cols]).round().clamp(-127.0, 127.0) as i8);
                QData::Int8 { q, scale }
            }
        };
        QMatrix { rows, cols, data }
    }

    /// An INT8 matrix from its values `q: [rows, cols]` and per-row scales (`w ≈
    /// q·scale[row]`), as a checkpoint stores them.
    pub fn from_int8(q: Vec<i8>, scale: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert!(q.len() == rows * cols && scale.len() == rows, "a [rows, cols] matrix with a scale per row");
        QMatrix { rows, cols, data: QData::Int8 { q, scale } }
    }

    /// A BF16 matrix from its bits `[rows, cols]`.
    pub fn from_bf16(bits: Vec<u16>, rows: usize, cols: usize) -> Self {
        assert_eq!(bits.len(), rows * cols, "a [rows, cols] matrix");
        QMatrix { rows, cols, data: QData::Bf16(bits) }
    }

    /// INT8 values (row-major) and per-row scales (`w ≈ q·scale[row]`), if INT8.
    pub fn int8_parts(&self) -> Option<(&[i8], &[f32])> {
        match &self.data {
            QData::Int8 { q, scale } => Some((q, scale)),
            QData::Bf16(_) => None,
        }
    }

    /// BF16 bits (row-major), if BF16.
    pub fn bf16_bits(&self) -> Option<&[u16]> {
        match &self.data {
            QData::Bf16(v) => Some(v),
            QData::Int8 { .. } => None,
        }
    }

    /// Its format.
    pub fn format(&self) -> WeightFormat {
        match self.data {
            QData::Bf16(_) => WeightFormat::Bf16,
            QData::Int8 { .. } => WeightFormat::Int8,
        }
    }

    /// Bytes held (what a pass over every row reads).
    pub fn bytes(&self) -> usize {
        match &self.data {
            QData::Bf16(v) => 2 * v.len(),
            QData::Int8 { q, scale } => q.len() + 4 * scale.len(),
        }
    }

    /// Rows `r0..r1` as f32 into `out: [(r1 − r0), cols]`.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            QData::Bf16(v) => out.iter_mut().zip(&v[r0 * c..r1 * c]).for_each(|(o, &b)| *o = from_bf16(b)),
            QData::Int8 { q, scale } => {
                for (j, o) in (r0..r1).zip(out.chunks_mut(c)) {
                    let s = scale[j];
                    o.iter_mut().zip(&q[j * c..(j + 1) * c]).for_each(|(o, &x)| *o = x as f32 * s);
                }
            }
        }
    }

    /// The whole matrix as f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    /// Rows `r0..r1` for the GEMV.
    fn rows(&self, r0: usize, r1: usize) -> Rows<'_> {
        let c = self.cols;
        match &self.data {
            QData::Int8 { q, scale } => Rows::Int8(&q[r0 * c..r1 * c], &scale[r0..r1]),
            QData::Bf16(v) => Rows::Bf16(&v[r0 * c..r1 * c]),
        }
    }

    /// `x` rounded as this matrix's GEMV takes it (INT8: once for many blocks of
    /// [`QMatrix::linear_rows`]; other formats: nothing).
    pub fn round(&self, x: &[f32], n: usize) -> RoundedRows {
        RoundedRows::new(x, n, self.cols, matches!(self.data, QData::Int8 { .. }) && n <= GEMV_MAX_ROWS)
    }

    /// The weight rows `range` alone, on this thread: `x: [n, cols]` (rounded by
    /// [`QMatrix::round`]) → `[n, range.len()]` (one block of a product that the
    /// caller spreads over threads together with other matrices' blocks).
    pub fn linear_rows(&self, x: &[f32], rounded: &RoundedRows, n: usize, range: std::ops::Range<usize>) -> Vec<f32> {
        let (r0, len, cols) = (range.start, range.len(), self.cols);
        assert!(range.end <= self.rows, "rows within the matrix");
        assert_eq!(x.len(), n * cols, "x is [n, cols]");
        if n <= GEMV_MAX_ROWS {
            return gemv_rounded(&|a, b| self.rows(r0 + a, r0 + b), x, rounded, n, len, cols, false);
        }
        let mut w = vec![0.0f32; len * cols];
        self.dequantize_rows(range.start, range.end, &mut w);
        linear_f32(x, &w, n, cols, len, false)
    }

    /// `y = x · Wᵀ`: `x: [n, cols]` → `[n, rows]`, on every thread.
    pub fn linear(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.linear_on(x, n, true)
    }

    /// [`QMatrix::linear`] on this thread alone (`parallel = false`): for many small
    /// products run side by side, such as the experts of one decode step.
    pub fn linear_on(&self, x: &[f32], n: usize, parallel: bool) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), n * cols, "x is [n, cols]");
        if n <= GEMV_MAX_ROWS {
            return gemv(&|r0, r1| self.rows(r0, r1), x, n, rows, cols, parallel);
        }
        // Many rows: dequantise a block of weight rows, multiply it into y's columns.
        let mut y = vec![0.0f32; n * rows];
        let per = rows_per_task(rows, cols, parallel);
        let yp = SendPtr(y.as_mut_ptr());
        let task = |buf: &mut Vec<f32>, t: usize| {
            let yp = yp;
            let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
            buf.resize((r1 - r0) * cols, 0.0);
            self.dequantize_rows(r0, r1, buf);
            // SAFETY: columns r0..r1 of every y row belong to this task; buf holds
            // (r1 − r0) rows of `cols`.
            unsafe {
                gemm_strided(
                    n,
                    r1 - r0,
                    cols,
                    yp.0.add(r0),
                    Strided::row_major(rows, Op::N),
                    x.as_ptr(),
                    Strided::row_major(cols, Op::N),
                    buf.as_ptr(),
                    Strided::row_major(cols, Op::T),
                    false,
                    1.0,
                    false,
                );
            }
        };
        let tasks = rows.div_ceil(per);
        if parallel {
            (0..tasks).into_par_iter().for_each_init(Vec::new, task);
        } else {
            let mut buf = Vec::new();
            (0..tasks).for_each(|t| task(&mut buf, t));
        }
        y
    }
}

/// Weight rows per task: a few tasks per thread, each at least 32 rows, so a task's
/// start costs little against its reads (all rows when serial).
fn rows_per_task(rows: usize, cols: usize, parallel: bool) -> usize {
    if !parallel {
        return rows.max(1);
    }
    let tasks = 4 * rayon::current_num_threads();
    let min = (MIN_TASK_WEIGHTS / cols.max(1)).max(ROWS_PER_TASK);
    rows.div_ceil(tasks).max(min).next_multiple_of(4)
}

/// Weights a parallel GEMV task reads at least.
const MIN_TASK_WEIGHTS: usize = 1 << 15;

/// The GEMV over `rows` weight rows given block by block by `block(r0, r1)`, for `n ≤ 32`
/// rows of `x` (in groups of up to 4): `[n, rows]`.
fn gemv<'a>(block: &(dyn Fn(usize, usize) -> Rows<'a> + Sync), x: &[f32], n: usize, rows: usize, cols: usize, parallel: bool) -> Vec<f32> {
    let rounded = RoundedRows::new(x, n, cols, matches!(block(0, 0), Rows::Int8(..)));
    gemv_rounded(block, x, &rounded, n, rows, cols, parallel)
}

/// The rows of `x` rounded for the INT8 GEMV, group of x rows by group (nothing for
/// other formats): made once for a product that is computed in blocks of weight rows.
pub struct RoundedRows(Vec<Option<QuantizedActivations>>);

impl RoundedRows {
    /// `x: [n, cols]`, rounded if `int8`.
    pub fn new(x: &[f32], n: usize, cols: usize, int8: bool) -> Self {
        RoundedRows(
            (0..n)
                .step_by(GROUP)
                .map(|g0| int8.then(|| QuantizedActivations::new(&x[g0 * cols..(g0 + GROUP).min(n) * cols], GROUP.min(n - g0), cols)))
                .collect(),
        )
    }
}

/// [`gemv`] given `x`'s rounding.
fn gemv_rounded<'a>(
    block: &(dyn Fn(usize, usize) -> Rows<'a> + Sync),
    x: &[f32],
    rounded: &RoundedRows,
    n: usize,
    rows: usize,
    cols: usize,
    parallel: bool,
) -> Vec<f32> {
    let mut y = vec![0.0f32; n * rows];
    if n == 0 || rows == 0 {
        return y;
    }
    let per = rows_per_task(rows, cols, parallel);
    let rounded = &rounded.0;
    // More than one group of x rows: every group passes over the same weight rows, so
    // they go in slices that stay in L2 between the passes (whole tasks did not: the
    // LM head's tasks are megabytes, and each group read them from memory again).
    let slice = (GEMV_SLICE_BYTES / (cols.max(1) * block(0, 0).bytes_per_weight())).max(4);
    // Per task a [rows_in_task, n] block, then placed into y's columns.
    let task = |t: usize| {
        let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
        if n <= GROUP {
            let mut out = vec![0.0f32; (r1 - r0) * n];
            gemv_rows_rounded(block(r0, r1), x, rounded[0].as_ref(), n, cols, &mut out, Fetch::Memory);
            return out;
        }
        let mut out = vec![0.0f32; (r1 - r0) * n];
        let mut part = vec![0.0f32; slice.min(r1 - r0) * GROUP];
        for s0 in (r0..r1).step_by(slice) {
            let s1 = (s0 + slice).min(r1);
            for g0 in (0..n).step_by(GROUP) {
                let g = GROUP.min(n - g0);
                let part = &mut part[..(s1 - s0) * g];
                // (the first group reads the slice from memory, the others from L2)
                let fetch = if g0 == 0 { Fetch::Memory } else { Fetch::Cached };
                gemv_rows_rounded(block(s0, s1), &x[g0 * cols..(g0 + g) * cols], rounded[g0 / GROUP].as_ref(), g, cols, part, fetch);
                for j in 0..s1 - s0 {
                    let at = (s0 - r0 + j) * n + g0;
                    out[at..at + g].copy_from_slice(&part[j * g..(j + 1) * g]);
                }
            }
        }
        out
    };
    let tasks = rows.div_ceil(per);
    let blocks: Vec<Vec<f32>> = if parallel { (0..tasks).into_par_iter().map(task).collect() } else { (0..tasks).map(task).collect() };
    for (t, b) in blocks.iter().enumerate() {
        for (j, row) in b.chunks(n).enumerate() {
            for (i, v) in row.iter().enumerate() {
                y[i * rows + t * per + j] = *v;
            }
        }
    }
    y
}

/// `y = x · Wᵀ` for f32 `w: [rows, cols]`: the register-blocked GEMV for up to 32 rows
/// of `x` (which reads each weight once), the GEMM otherwise; on this thread alone
/// unless `parallel`.
pub fn linear_f32(x: &[f32], w: &[f32], n: usize, cols: usize, rows: usize, parallel: bool) -> Vec<f32> {
    if n > GEMV_MAX_ROWS || n == 0 {
        if parallel {
            return crate::gemm::linear(x, w, n, cols, rows);
        }
        let mut y = vec![0.0; n * rows];
        crate::gemm::matmul_serial(&mut y, x, Op::N, w, Op::T, n, rows, cols, false, 1.0);
        return y;
    }
    assert_eq!(w.len(), rows * cols, "w is [rows, cols]");
    assert_eq!(x.len(), n * cols, "x is [n, cols]");
    gemv(&|r0, r1| Rows::F32(&w[r0 * cols..r1 * cols]), x, n, rows, cols, parallel)
}

/// A raw pointer that may cross threads; every use writes a region no other task touches.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::linear;
    use crate::testutil::*;

    #[test]
    fn quantisation_error_is_within_its_bound() {
        let (rows, cols) = (37, 70);
        let w: Vec<f32> = rand_vec(rows * cols, 1).iter().enumerate().map(|(i, x)| x * (1.0 + (i / cols) as f32)).collect();
        let q8 = QMatrix::quantize(&w, rows, cols, WeightFormat::Int8).dequantize();
        for (r, (a, b)) in w.chunks(cols).zip(q8.chunks(cols)).enumerate() {
            let s = a.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= s / 2.0 * 1.0001, "row {r}: {x} vs {y} (scale {s})");
            }
        }
        let b16 = QMatrix::quantize(&w, rows, cols, WeightFormat::Bf16).dequantize();
        for (x, y) in w.iter().zip(&b16) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-8), "{x} vs {y}");
        }
        assert_eq!(to_bf16(1.0), 0x3F80);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    /// The fused kernels give the product with the dequantised matrix (up to summation
    /// order, and for INT8 in the GEMV the activations' 16-bit rounding, which
    /// `gemv_int8`'s test bounds) for every row count: the GEMV groups (1–32 rows) and
    /// the GEMM path.
    #[test]
    fn fused_products_equal_the_dequantised_product() {
        // (1000 × 512: more weights than one L2 slice, so more than four x rows pass
        // over each slice in turn, serially and within parallel tasks)
        for (rows, cols) in [(70, 45), (33, 128), (1, 16), (64, 7), (1000, 512)] {
            let w = rand_vec(rows * cols, 2);
            for fmt in [WeightFormat::Int8, WeightFormat::Bf16] {
                let q = QMatrix::quantize(&w, rows, cols, fmt);
                let dq = q.dequantize();
                for n in [1, 2, 3, 4, 5, 8, 9, 20, 33, 40] {
                    let x = rand_vec(n * cols, 3 + n as u64);
                    let want = linear(&x, &dq, n, cols, rows);
                    let got = q.linear(&x, n);
                    assert_close(&got, &want, 2e-5 * (cols as f32).sqrt(), &format!("{fmt:?} {rows}x{cols} n={n}"));
                    let f = linear_f32(&x, &w, n, cols, rows, true);
                    assert_close(&linear_f32(&x, &w, n, cols, rows, false), &f, 1e-6, "serial");
                    assert_close(&q.linear_on(&x, n, false), &got, 1e-6, "serial");
                    // a block of weight rows alone gives those columns of the product
                    let (r0, r1) = (rows / 3, rows - rows / 4);
                    let part = q.linear_rows(&x, &q.round(&x, n), n, r0..r1);
                    let cols_of: Vec<f32> = got.chunks(rows).flat_map(|y| y[r0..r1].to_vec()).collect();
                    assert_close(&part, &cols_of, 1e-6, &format!("{fmt:?} rows {r0}..{r1} n={n}"));
                    assert_close(&f, &linear(&x, &w, n, cols, rows), 2e-5 * (cols as f32).sqrt(), &format!("f32 {rows}x{cols} n={n}"));
                }
            }
        }
    }
}
