//! The INT8 decode GEMV in integers: `out[j, i] = s_j · Σ_b d_ib · Σ_{c ∈ b} W[j, c] · q_ic`,
//! where the activations `x` are rounded to 16-bit integers per block `b` of
//! [`BLOCK`] columns, `q_ic = round(x_ic / d_ib)` with `d_ib = max_{c ∈ b} |x_ic| / 32767`.
//!
//! Why: widening each INT8 weight to f32 (sign-extend, convert, multiply-add) costs three
//! vector operations per 16 weights, which held one Zen 5 core to ~39 GB/s of weights in
//! L2 — no faster than two cores read memory. In integers a single multiply-add of 16-bit
//! pairs (`vpdpwssd` with AVX-512 VNNI; `vpmaddwd` + `vpaddd` otherwise) covers 32 (16 on
//! AVX2) weights after one sign extension, so the kernel waits only on memory.
//!
//! What it costs in accuracy: rounding `x` moves each product by at most half a step,
//! so `|out − exact| ≤ s_j · Σ_b (d_ib / 2) · Σ_{c ∈ b} |W[j, c]|` — for a block whose
//! largest activation is 100× a typical one, the typical one is still rounded to 0.3%
//! of itself, finer than the weights' own rounding (half a step of `max |W| / 127`).
//! The integer sums are exact: a lane adds at most `2 · BLOCK / 16` products of
//! `|W| ≤ 127` and `|q| ≤ 32767` before the block is folded into f32 (≤ 2.7 · 10⁸ < 2³¹).

/// Columns per activation scale: long enough that folding the block's integer sums into
/// f32 costs ~10% of the block's multiply-adds, short enough that an outlier coarsens only
/// its own block.
pub const BLOCK: usize = 512;

/// `x: [n, cols]` rounded to 16-bit integers, one scale per row and block.
pub struct QuantizedActivations {
    q: Vec<i16>,
    scale: Vec<f32>,
    blocks: usize,
}

impl QuantizedActivations {
    /// Rounds `x: [n, cols]` block by block (NaN or infinity in a block makes its scale
    /// NaN, so the outputs show it).
    pub fn new(x: &[f32], n: usize, cols: usize) -> Self {
        assert_eq!(x.len(), n * cols, "x is [n, cols]");
        let blocks = cols.div_ceil(BLOCK);
        let mut q = vec![0i16; n * cols];
        let mut scale = vec![0.0f32; n * blocks];
        for i in 0..n {
            for b in 0..blocks {
                let (c0, c1) = (i * cols + b * BLOCK, i * cols + ((b + 1) * BLOCK).min(cols));
                let max = x[c0..c1].iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let finite = x[c0..c1].iter().all(|v| v.is_finite());
                if max == 0.0 || !finite {
                    // All zero: zero integers. Non-finite: keep the NaN visible in the
                    // output through the scale rather than rounding it away.
                    scale[i * blocks + b] = if finite { 0.0 } else { f32::NAN };
                    continue;
                }
                let d = max / 32767.0;
                scale[i * blocks + b] = d;
                let inv = 1.0 / d;
                for (qc, &xc) in q[c0..c1].iter_mut().zip(&x[c0..c1]) {
                    *qc = (xc * inv).round().clamp(-32767.0, 32767.0) as i16;
                }
            }
        }
        QuantizedActivations { q, scale, blocks }
    }

    /// What the kernel multiplies by: `x` as it was rounded, `[n, cols]`.
    pub fn dequantize(&self, n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols).map(|k| self.q[k] as f32 * self.scale[(k / cols) * self.blocks + (k % cols) / BLOCK]).collect()
    }
}

/// `out: [rows, n]` for INT8 `w: [rows, cols]` with one scale per row, `n ≤ 4` rows of
/// `x` rounded by [`QuantizedActivations`]. `false` when this CPU has no vector path for
/// it (the caller then multiplies in f32).
pub fn gemv_int8(w: &[i8], w_scale: &[f32], x: &QuantizedActivations, n: usize, cols: usize, out: &mut [f32]) -> bool {
    let rows = w.len() / cols.max(1);
    assert!((1..=4).contains(&n), "1 to 4 rows of x");
    assert_eq!(x.q.len(), n * cols, "x is [n, cols]");
    assert_eq!(w_scale.len(), rows, "one scale per row");
    assert_eq!(out.len(), rows * n, "out is [rows, n]");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx512 = crate::isa::avx512_built() && has!("avx512f") && has!("avx512bw");
        if avx512 && has!("avx512vnni") {
            // SAFETY: the CPU has the features the kernel is compiled for; lengths checked.
            unsafe { x86::avx512_vnni(w, w_scale, x, n, cols, out) };
            return true;
        }
        if avx512 {
            // SAFETY: as above.
            unsafe { x86::avx512(w, w_scale, x, n, cols, out) };
            return true;
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            unsafe { x86::avx2(w, w_scale, x, n, cols, out) };
            return true;
        }
    }
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantizedActivations, BLOCK};
    use crate::gemv::sum8;
    use std::arch::x86_64::*;

    /// As in the f32 GEMV: weights 2 KiB ahead of the ones being read are asked for.
    const PREFETCH_BYTES: usize = 2048;
    /// Integer accumulators per `x` row (independent chains of multiply-adds).
    const ACC: usize = 4;

    macro_rules! kernel {
        ($name:ident, $feat:literal, $lanes:expr, $ivec:ty, $fvec:ty, $zeroi:ident, $zerof:ident, $widen:ident, $loadx:ident, $dot:ident, $addi:ident, $cvt:ident, $fmadd:ident, $set1:ident, $reduce:ident) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(w: &[i8], s: &[f32], x: &QuantizedActivations, n: usize, cols: usize, out: &mut [f32]) {
                match n {
                    1 => body::<1>(w, s, x, cols, out),
                    2 => body::<2>(w, s, x, cols, out),
                    3 => body::<3>(w, s, x, cols, out),
                    _ => body::<4>(w, s, x, cols, out),
                }
                #[target_feature(enable = $feat)]
                unsafe fn body<const N: usize>(w: &[i8], s: &[f32], x: &QuantizedActivations, cols: usize, out: &mut [f32]) {
                    // `LANES` weights per widened vector (16-bit lanes).
                    const LANES: usize = $lanes;
                    let rows = w.len() / cols;
                    let (wp, xp) = (w.as_ptr(), x.q.as_ptr());
                    for j in 0..rows {
                        let row = wp.add(j * cols);
                        let mut f: [$fvec; N] = [$zerof(); N];
                        let mut tail = [0.0f32; N];
                        for b in 0..x.blocks {
                            let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(cols));
                            let vectors = c0 + (c1 - c0) / LANES * LANES;
                            let mut acc: [[$ivec; N]; ACC] = [[$zeroi(); N]; ACC];
                            let mut c = c0;
                            while c + ACC * LANES <= vectors {
                                _mm_prefetch(row.add(c).wrapping_add(PREFETCH_BYTES) as *const i8, _MM_HINT_T0);
                                _mm_prefetch(row.add(c).wrapping_add(PREFETCH_BYTES + 64) as *const i8, _MM_HINT_T0);
                                for (a, acc) in acc.iter_mut().enumerate() {
                                    let wv = $widen(row.add(c + a * LANES));
                                    for (i, acc) in acc.iter_mut().enumerate() {
                                        *acc = $dot(*acc, wv, $loadx(xp.add(i * cols + c + a * LANES)));
                                    }
                                }
                                c += ACC * LANES;
                            }
                            while c < vectors {
                                let wv = $widen(row.add(c));
                                for (i, acc) in acc[0].iter_mut().enumerate() {
                                    *acc = $dot(*acc, wv, $loadx(xp.add(i * cols + c)));
                                }
                                c += LANES;
                            }
                            for i in 0..N {
                                let mut v = acc[0][i];
                                for acc in &acc[1..] {
                                    v = $addi(v, acc[i]);
                                }
                                let d = x.scale[i * x.blocks + b];
                                f[i] = $fmadd($cvt(v), $set1(d), f[i]);
                                let rest: i32 = (vectors..c1).map(|c| *row.add(c) as i32 * *xp.add(i * cols + c) as i32).sum();
                                tail[i] += rest as f32 * d;
                            }
                        }
                        for i in 0..N {
                            out[j * N + i] = ($reduce(f[i]) + tail[i]) * s[j];
                        }
                    }
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn widen32(p: *const i8) -> __m512i {
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load32(p: *const i16) -> __m512i {
        _mm512_loadu_si512(p as *const __m512i)
    }
    #[inline(always)]
    unsafe fn dot_vnni(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        _mm512_dpwssd_epi32(acc, a, b)
    }
    #[inline(always)]
    unsafe fn dot512(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
    }
    #[inline(always)]
    unsafe fn widen16(p: *const i8) -> __m256i {
        _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load16(p: *const i16) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline(always)]
    unsafe fn dot256(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }

    #[rustfmt::skip]
    kernel!(avx512_vnni, "avx512f,avx512bw,avx512vnni", 32, __m512i, __m512, _mm512_setzero_si512, _mm512_setzero_ps, widen32, load32, dot_vnni, _mm512_add_epi32, _mm512_cvtepi32_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_reduce_add_ps);
    #[rustfmt::skip]
    kernel!(avx512, "avx512f,avx512bw", 32, __m512i, __m512, _mm512_setzero_si512, _mm512_setzero_ps, widen32, load32, dot512, _mm512_add_epi32, _mm512_cvtepi32_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_reduce_add_ps);
    #[rustfmt::skip]
    kernel!(avx2, "avx2,fma", 16, __m256i, __m256, _mm256_setzero_si256, _mm256_setzero_ps, widen16, load16, dot256, _mm256_add_epi32, _mm256_cvtepi32_ps, _mm256_fmadd_ps, _mm256_set1_ps, sum8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Against f64 sums: every vector path this CPU has equals the product with the
    /// rounded activations (to f32 summation), and lies within the stated bound of the
    /// product with the activations as given — with tails, several blocks, and one
    /// block holding an outlier 100× the rest.
    #[test]
    fn equals_the_rounded_product_and_stays_within_its_bound() {
        for cols in [16, 33, 100, 512, 700, 1030, 2048] {
            let rows = 5;
            let wf = rand_vec(rows * cols, 1);
            let w: Vec<i8> = wf.iter().map(|&v| (v * 127.0).round().clamp(-127.0, 127.0) as i8).collect();
            let s: Vec<f32> = (0..rows).map(|j| 0.01 * (j + 1) as f32).collect();
            for n in 1..=4 {
                let mut x = rand_vec(n * cols, 2 + n as u64);
                x[cols / 3] *= 100.0;
                let xq = QuantizedActivations::new(&x, n, cols);
                let xr = xq.dequantize(n, cols);
                let dot = |j: usize, i: usize, x: &[f32]| (0..cols).map(|c| w[j * cols + c] as f64 * x[i * cols + c] as f64).sum::<f64>() * s[j] as f64;
                let mut paths: Vec<(&str, Vec<f32>)> = Vec::new();
                let mut got = vec![0.0; rows * n];
                if gemv_int8(&w, &s, &xq, n, cols, &mut got) {
                    paths.push(("chosen", got));
                }
                #[cfg(target_arch = "x86_64")]
                {
                    use std::arch::is_x86_feature_detected as has;
                    type Kernel = unsafe fn(&[i8], &[f32], &QuantizedActivations, usize, usize, &mut [f32]);
                    let mut run = |name, f: Kernel| {
                        let mut got = vec![0.0; rows * n];
                        // SAFETY: called only where the CPU has the kernel's features.
                        unsafe { f(&w, &s, &xq, n, cols, &mut got) };
                        paths.push((name, got));
                    };
                    if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                        run("avx512_vnni", x86::avx512_vnni);
                    }
                    if has!("avx512f") && has!("avx512bw") {
                        run("avx512", x86::avx512);
                    }
                    if has!("avx2") && has!("fma") {
                        run("avx2", x86::avx2);
                    }
                }
                for (name, got) in &paths {
                    for (k, &out) in got.iter().enumerate() {
                        let (j, i) = (k / n, k % n);
                        let rounded = dot(j, i, &xr);
                        assert!((out as f64 - rounded).abs() <= 1e-5 * rounded.abs().max(1.0), "{name} cols {cols} n {n} [{k}]: {out} vs {rounded}");
                        // |out − exact| ≤ s_j Σ_b (d_b / 2) Σ_{c∈b} |W_jc| (+ f32 rounding).
                        let bound: f64 = (0..cols)
                            .map(|c| {
                                let d = xq.scale[i * xq.blocks + c / BLOCK] as f64;
                                (w[j * cols + c] as f64).abs() * d / 2.0
                            })
                            .sum::<f64>()
                            * s[j] as f64;
                        let exact = dot(j, i, &x);
                        let off = (out as f64 - exact).abs();
                        assert!(off <= bound * 1.0001 + 1e-5 * exact.abs().max(1.0), "{name} cols {cols} n {n} [{k}]: {out} vs {exact} (bound {bound})");
                    }
                }
            }
        }
    }

    #[test]
    fn zero_blocks_give_zero_and_nan_stays_visible() {
        let (rows, cols, n) = (3, 600, 1);
        let w = vec![5i8; rows * cols];
        let s = vec![1.0f32; rows];
        let mut x = vec![0.0f32; cols];
        x[550] = 2.0;
        let mut got = vec![0.0; rows];
        if gemv_int8(&w, &s, &QuantizedActivations::new(&x, n, cols), n, cols, &mut got) {
            assert_eq!(got, vec![10.0; rows]);
            x[3] = f32::NAN;
            gemv_int8(&w, &s, &QuantizedActivations::new(&x, n, cols), n, cols, &mut got);
            assert!(got.iter().all(|v| v.is_nan()), "{got:?}");
        }
    }
}
