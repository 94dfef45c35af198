//! The decode GEMV: `out[j, i] = s_j · Σ_c W[j, c] · x[i, c]` for a block of weight rows
//! stored as f32, BF16 or INT8 (scale `s_j`; 1 otherwise) against up to four rows of `x`.
//!
//! Each weight is read once, widened to f32 in registers (INT8: sign-extend then
//! convert; BF16: zero-extend and shift into the upper half) and multiplied into every
//! `x` row while it is in a register. With one or two `x` rows, a row of weights at a
//! time with four accumulators per `x` row, so consecutive fused multiply-adds do not
//! wait on each other; with three or four, a tile of weight rows at a time with one
//! accumulator per (weight row, `x` row), so each loaded vector feeds several products.
//! Weights read from memory are prefetched 2 KiB ahead, line by line. AVX-512 (16 lanes) and AVX2+FMA
//! (8 lanes) versions are written with intrinsics and chosen at run time; a scalar loop
//! serves any other CPU.

use crate::gemv_int8::{gemv_int8, QuantizedActivations};

/// A block of weight rows, `[rows, cols]`.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// f32 weights
    F32(&'a [f32]),
    /// bfloat16 bits
    Bf16(&'a [u16]),
    /// int8 weights and one scale per row
    Int8(&'a [i8], &'a [f32]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::F32(w) => w.len(),
            Rows::Bf16(w) => w.len(),
            Rows::Int8(w, _) => w.len(),
        }
    }

    /// Bytes one weight takes.
    pub fn bytes_per_weight(&self) -> usize {
        match self {
            Rows::F32(_) => 4,
            Rows::Bf16(_) => 2,
            Rows::Int8(..) => 1,
        }
    }

    /// Where the weights start.
    fn byte_ptr(&self) -> *const i8 {
        match self {
            Rows::F32(w) => w.as_ptr() as *const i8,
            Rows::Bf16(w) => w.as_ptr() as *const i8,
            Rows::Int8(w, _) => w.as_ptr(),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            Rows::F32(w) => w[i],
            Rows::Bf16(w) => f32::from_bits((w[i] as u32) << 16),
            Rows::Int8(w, _) => w[i] as f32,
        }
    }

    #[inline(always)]
    fn scale(&self, j: usize) -> f32 {
        match self {
            Rows::Int8(_, s) => s[j],
            _ => 1.0,
        }
    }
}

/// Rows of `x` one call multiplies (more x rows with fewer weight rows per tile, 2 × 8
/// against 4 × 4, ran a 16-sequence projection 1.4× slower on a Zen 5).
pub const MAX_X_ROWS: usize = 4;

/// `out: [rows, n]` for `x: [n, cols]`, `n ≤` [`MAX_X_ROWS`].
pub fn gemv_rows(w: Rows, x: &[f32], n: usize, cols: usize, out: &mut [f32]) {
    let rounded = matches!(w, Rows::Int8(..)).then(|| QuantizedActivations::new(x, n, cols));
    gemv_rows_rounded(w, x, rounded.as_ref(), n, cols, out, Fetch::Memory)
}

/// Where a product's weights are expected to come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// memory: each row's weights are asked for 2 KiB ahead of their use
    Memory,
    /// a cache, because the caller has just multiplied them into other rows of `x`:
    /// asking ahead only costs there (in L2, 8–15% of a Zen 5 core's rate with three or
    /// four x rows of f32 weights, 7% with BF16)
    Cached,
}

/// [`gemv_rows`] given `x` already rounded for INT8 weights (`rounded`, from `x`: for
/// callers that multiply the same rows into many blocks of weights); ignored otherwise.
pub fn gemv_rows_rounded(w: Rows, x: &[f32], rounded: Option<&QuantizedActivations>, n: usize, cols: usize, out: &mut [f32], fetch: Fetch) {
    let rows = w.len() / cols.max(1);
    assert!((1..=MAX_X_ROWS).contains(&n), "1 to {MAX_X_ROWS} rows of x");
    assert_eq!(x.len(), n * cols, "x is [n, cols]");
    assert_eq!(out.len(), rows * n, "out is [rows, n]");
    if let Rows::Int8(q, s) = w {
        assert_eq!(s.len(), rows, "one scale per row");
        // In integers where the CPU allows (activations rounded to 16 bits per block).
        if let Some(xq) = rounded {
            if gemv_int8(q, s, xq, n, cols, out) {
                return;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::isa::avx512_built() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths were checked above.
            unsafe { x86::avx512(w, x, n, cols, out, fetch) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { x86::avx2(w, x, n, cols, out, fetch) };
            return;
        }
    }
    scalar(w, x, n, cols, out);
}

fn scalar(w: Rows, x: &[f32], n: usize, cols: usize, out: &mut [f32]) {
    let rows = w.len() / cols.max(1);
    for j in 0..rows {
        for i in 0..n {
            // (in f64: this path is for CPUs without vectors, where speed matters less)
            let s: f64 = (0..cols).map(|c| w.get(j * cols + c) as f64 * x[i * cols + c] as f64).sum();
            out[j * n + i] = (s * w.scale(j) as f64) as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::sum8;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Fetch, Rows};
    use std::arch::x86_64::*;

    /// How far ahead of the weights being read the GEMV asks for them: the hardware
    /// prefetcher alone left a thread at ~15 GB/s from DRAM, with this ~19 (2 KiB beat
    /// 0.5, 1 and 4 KiB on the Xeon measured).
    const PREFETCH_BYTES: usize = 2048;

    macro_rules! kernel {
        ($name:ident, $feat:literal, $lanes:expr, $acc_wide:literal, $tile:literal, $vec:ty, $zero:ident, $fmadd:ident, $loadx:ident, $add:ident, $reduce:ident, $f32:ident, $bf16:ident, $int8:ident) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(w: Rows, x: &[f32], n: usize, cols: usize, out: &mut [f32], fetch: Fetch) {
                match n {
                    1 => body::<1, 4>(w, x, cols, out),
                    2 => body::<2, 4>(w, x, cols, out),
                    3 => tiled::<3, $tile>(w, x, cols, out, fetch),
                    _ => tiled::<4, $tile>(w, x, cols, out, fetch),
                }
                #[target_feature(enable = $feat)]
                unsafe fn tiled<const N: usize, const TILE: usize>(w: Rows, x: &[f32], cols: usize, out: &mut [f32], fetch: Fetch) {
                    // (one kernel per format and fetch: chosen inside the loop, they cost
                    // a branch and reloaded pointers every vector)
                    match (w, fetch) {
                        (Rows::F32(v), Fetch::Memory) => tiled_with::<N, TILE, true, _>(w, |at| $f32(v.as_ptr().add(at)), x, cols, out),
                        (Rows::F32(v), Fetch::Cached) => tiled_with::<N, TILE, false, _>(w, |at| $f32(v.as_ptr().add(at)), x, cols, out),
                        (Rows::Bf16(v), Fetch::Memory) => tiled_with::<N, TILE, true, _>(w, |at| $bf16(v.as_ptr().add(at)), x, cols, out),
                        (Rows::Bf16(v), Fetch::Cached) => tiled_with::<N, TILE, false, _>(w, |at| $bf16(v.as_ptr().add(at)), x, cols, out),
                        (Rows::Int8(v, _), _) => tiled_with::<N, TILE, true, _>(w, |at| $int8(v.as_ptr().add(at)), x, cols, out),
                    }
                }
                /// `TILE` weight rows at a time against all `N` x rows: `TILE · N`
                /// accumulators, one chain each, so a loaded weight vector feeds `N`
                /// products and a loaded x vector `TILE` (one row at a time, `N + 1`
                /// loads fed `N` products: half the multiply-add rate in L2 with 4 x
                /// rows on a Zen 5). `TILE` is 3 with AVX-512: at 4 × 4 LLVM kept an
                /// accumulator on the stack (~70 against ~96 GB/s of f32 weights).
                #[target_feature(enable = $feat)]
                unsafe fn tiled_with<const N: usize, const TILE: usize, const PREFETCH: bool, L: Fn(usize) -> $vec>(
                    w: Rows,
                    load: L,
                    x: &[f32],
                    cols: usize,
                    out: &mut [f32],
                ) {
                    const LANES: usize = $lanes;
                    let rows = w.len() / cols;
                    let tiled_rows = rows / TILE * TILE;
                    let vectors = cols / LANES * LANES;
                    let xp = x.as_ptr();
                    let bytes_per_weight = w.bytes_per_weight();
                    let first = w.byte_ptr();
                    if rows < TILE {
                        return body::<N, $acc_wide>(w, x, cols, out);
                    }
                    // Rows left over are the last tile again, shifted back: a row's sum
                    // does not depend on the rows beside it, so every row comes out the
                    // same however the caller cuts the matrix into blocks.
                    let last = (tiled_rows < rows).then_some(rows - TILE);
                    for j0 in (0..tiled_rows).step_by(TILE).chain(last) {
                        let mut acc: [[$vec; N]; TILE] = [[$zero(); N]; TILE];
                        let mut c = 0;
                        while c < vectors {
                            // (each row's weights 2 KiB ahead, a line at a time)
                            if PREFETCH && (c * bytes_per_weight) % 64 == 0 {
                                for r in 0..TILE {
                                    _mm_prefetch(first.wrapping_add(((j0 + r) * cols + c) * bytes_per_weight + PREFETCH_BYTES), _MM_HINT_T0);
                                }
                            }
                            let mut wv = [$zero(); TILE];
                            for r in 0..TILE {
                                wv[r] = load((j0 + r) * cols + c);
                            }
                            for i in 0..N {
                                let xv = $loadx(xp.add(i * cols + c));
                                for r in 0..TILE {
                                    acc[r][i] = $fmadd(wv[r], xv, acc[r][i]);
                                }
                            }
                            c += LANES;
                        }
                        for r in 0..TILE {
                            let j = j0 + r;
                            for i in 0..N {
                                let mut s = $reduce(acc[r][i]);
                                for cc in vectors..cols {
                                    s += w.get(j * cols + cc) * x[i * cols + cc];
                                }
                                out[j * N + i] = s * w.scale(j);
                            }
                        }
                    }
                }
                /// `ACC` accumulators per `x` row, each fed every `ACC`-th vector of
                /// weights: a fused multiply-add waits ~4 cycles for the one before it
                /// on the same accumulator, so with `ACC` chains a core retires at most
                /// `ACC · LANES` weights per 4 cycles (on a Zen 5 core in L2, INT8
                /// widened to f32: two chains ~31 GB/s, four ~39; f32: ~99 → 104–116).
                #[target_feature(enable = $feat)]
                unsafe fn body<const N: usize, const ACC: usize>(w: Rows, x: &[f32], cols: usize, out: &mut [f32]) {
                    const LANES: usize = $lanes;
                    let rows = w.len() / cols;
                    let step = ACC * LANES;
                    let full = cols / step * step;
                    let vectors = cols / LANES * LANES;
                    let bytes_per_weight = w.bytes_per_weight();
                    let xp = x.as_ptr();
                    let load = |at: usize| match w {
                        Rows::F32(v) => $f32(v.as_ptr().add(at)),
                        Rows::Bf16(v) => $bf16(v.as_ptr().add(at)),
                        Rows::Int8(v, _) => $int8(v.as_ptr().add(at)),
                    };
                    for j in 0..rows {
                        let base = j * cols;
                        let mut acc: [[$vec; N]; ACC] = [[$zero(); N]; ACC];
                        let mut c = 0;
                        while c < full {
                            let here = match w {
                                Rows::F32(v) => v.as_ptr().add(base + c) as *const i8,
                                Rows::Bf16(v) => v.as_ptr().add(base + c) as *const i8,
                                Rows::Int8(v, _) => v.as_ptr().add(base + c),
                            };
                            for line in (0..step * bytes_per_weight).step_by(64) {
                                _mm_prefetch(here.wrapping_add(PREFETCH_BYTES + line), _MM_HINT_T0);
                            }
                            for (a, acc) in acc.iter_mut().enumerate() {
                                let wv = load(base + c + a * LANES);
                                for (i, acc) in acc.iter_mut().enumerate() {
                                    *acc = $fmadd(wv, $loadx(xp.add(i * cols + c + a * LANES)), *acc);
                                }
                            }
                            c += step;
                        }
                        while c < vectors {
                            let wv = load(base + c);
                            for (i, acc) in acc[0].iter_mut().enumerate() {
                                *acc = $fmadd(wv, $loadx(xp.add(i * cols + c)), *acc);
                            }
                            c += LANES;
                        }
                        for i in 0..N {
                            let mut v = acc[0][i];
                            for acc in &acc[1..] {
                                v = $add(v, acc[i]);
                            }
                            let mut s = $reduce(v);
                            for cc in vectors..cols {
                                s += w.get(base + cc) * x[i * cols + cc];
                            }
                            out[j * N + i] = s * w.scale(j);
                        }
                    }
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn f32x16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn bf16x16(p: *const u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16))
    }
    #[inline(always)]
    unsafe fn int8x16(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn f32x8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn bf16x8(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
    }
    #[inline(always)]
    unsafe fn int8x8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    /// The sum of a vector's eight lanes.
    #[inline(always)]
    pub unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    kernel!(
        avx512,
        "avx512f",
        16,
        4,
        3,
        __m512,
        _mm512_setzero_ps,
        _mm512_fmadd_ps,
        _mm512_loadu_ps,
        _mm512_add_ps,
        _mm512_reduce_add_ps,
        f32x16,
        bf16x16,
        int8x16
    );
    kernel!(avx2, "avx2,fma", 8, 2, 2, __m256, _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_add_ps, sum8, f32x8, bf16x8, int8x8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Every path (the one chosen here, and the scalar one) against a plain f64 sum,
    /// with column counts that leave tails.
    #[test]
    fn matches_the_plain_sum_for_every_format_and_row_count() {
        for cols in [16, 33, 64, 100, 200, 1030] {
            let rows = 5;
            // f32 sums drift like the square root of their length.
            let tol = 1e-5 * (cols as f32 / 100.0).sqrt().max(1.0);
            let wf = rand_vec(rows * cols, 1);
            let wb: Vec<u16> = wf.iter().map(|&v| crate::qlinear::to_bf16(v)).collect();
            let wq: Vec<i8> = wf.iter().map(|&v| (v * 127.0).round() as i8).collect();
            let sc: Vec<f32> = (0..rows).map(|j| 0.01 * (j + 1) as f32).collect();
            for n in 1..=MAX_X_ROWS {
                let x = rand_vec(n * cols, 2 + n as u64);
                for w in [Rows::F32(&wf), Rows::Bf16(&wb), Rows::Int8(&wq, &sc)] {
                    let want: Vec<f32> = (0..rows * n)
                        .map(|k| {
                            let (j, i) = (k / n, k % n);
                            ((0..cols).map(|c| w.get(j * cols + c) as f64 * x[i * cols + c] as f64).sum::<f64>() * w.scale(j) as f64) as f32
                        })
                        .collect();
                    let mut got = vec![0.0; rows * n];
                    gemv_rows(w, &x, n, cols, &mut got);
                    // Where the integer kernel runs, INT8 goes there: it multiplies the
                    // rounded activations (its own test bounds the rounding).
                    let mut int = vec![0.0; rows * n];
                    match w {
                        Rows::Int8(q, s) if gemv_int8(q, s, &QuantizedActivations::new(&x, n, cols), n, cols, &mut int) => {
                            assert_eq!(got, int, "gemv_rows takes the integer kernel")
                        }
                        _ => assert_close(&got, &want, tol, "gemv"),
                    }
                    let mut got = vec![0.0; rows * n];
                    scalar(w, &x, n, cols, &mut got);
                    assert_close(&got, &want, tol, "scalar");
                    // Every vector path this CPU can run, not only the one chosen.
                    #[cfg(target_arch = "x86_64")]
                    {
                        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                            for fetch in [Fetch::Memory, Fetch::Cached] {
                                let mut got = vec![0.0; rows * n];
                                // SAFETY: the CPU has AVX2 and FMA; lengths as gemv_rows checks.
                                unsafe { x86::avx2(w, &x, n, cols, &mut got, fetch) };
                                assert_close(&got, &want, tol, "avx2");
                            }
                        }
                        if std::arch::is_x86_feature_detected!("avx512f") {
                            for fetch in [Fetch::Memory, Fetch::Cached] {
                                let mut got = vec![0.0; rows * n];
                                // SAFETY: as above, for AVX-512F.
                                unsafe { x86::avx512(w, &x, n, cols, &mut got, fetch) };
                                assert_close(&got, &want, tol, "avx512");
                            }
                        }
                    }
                }
            }
        }
    }
}
