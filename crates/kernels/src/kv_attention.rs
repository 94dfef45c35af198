//! Attention of a sequence's new query rows against its cached keys and values: the
//! decoding (and chunked-prefill) form of [`crate::attention::attention_forward`].
//!
//! New row `i` of `n` sits at position `past + i` and sees the `past + i + 1` keys before
//! and at it: for query head `h` (key/value head `g = h / (nh / nkv)`),
//! `S = scale · Q_h K_gᵀ` (`[n, past + n]`), `P = softmax(S)` row-wise over each row's
//! visible prefix, `O_h = P V_g`. Keys and values are read through row strides, so a
//! cache may hold them side by side (MLA's latent serves as both key and value).

use crate::gemm::{gemm_strided, Op, Strided};
use crate::vmath;
use rayon::prelude::*;

/// Shapes and strides of one cached-attention call.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    /// new query rows
    pub n: usize,
    /// positions already cached before them
    pub past: usize,
    /// query heads
    pub nh: usize,
    /// key/value heads (divides `nh`)
    pub nkv: usize,
    /// query/key head dimension
    pub dqk: usize,
    /// value head dimension
    pub dv: usize,
    /// elements between consecutive positions' keys
    pub k_stride: usize,
    /// elements between consecutive positions' values
    pub v_stride: usize,
}

impl KvShape {
    /// Keys visible to the last new row: `past + n`.
    pub fn len(&self) -> usize {
        self.past + self.n
    }

    /// True without new rows.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// A raw pointer that may cross threads; every use writes a region no other task touches.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `q: [n, nh·dqk]`; key of position `j`, head `g` at `k[j·k_stride + g·dqk ..][..dqk]`,
/// its value at `v[j·v_stride + g·dv ..][..dv]` (positions `0..past + n`) →
/// `out: [n, nh·dv]`.
pub fn kv_attention_forward(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: KvShape, scale: f32) {
    kv_attention_forward_many(&mut [KvSeq { out, q, k, v, shape: s }], scale)
}

/// Query rows up to which a head is computed by dot products and multiply-adds, not GEMM.
const DIRECT_ROWS: usize = 4;

/// `p[j] = scale · q·k_j` for every `j < p.len()`, key `j` at `k[j·stride..][..q.len()]`.
/// Written with intrinsics: the compiler turned the portable dot product of a 64-wide
/// head into two-lane pieces (one decoding layer's attention over 16 sequences of 161
/// keys took 238 µs on a Zen 5 that way, 160 with these, 120 with the value sums below
/// in registers too: the `kv_decode` example).
fn scores(p: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
    if p.is_empty() {
        return;
    }
    assert!(k.len() >= (p.len() - 1) * stride + q.len(), "keys cover every score");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::isa::avx512_built() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the keys' extent was checked above.
            unsafe { x86::scores_avx512(p, q, k, stride, scale) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { x86::scores_avx2(p, q, k, stride, scale) };
            return;
        }
    }
    scores_plain(p, q, k, stride, scale);
}

/// `o = Σ_j p_j v_j`, value `j` at `v[j·stride..][..o.len()]`; with intrinsics the sums
/// stay in registers across the values (the portable loop stored `o` after every one).
fn weighted_sum(o: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
    o.fill(0.0);
    if p.is_empty() {
        return;
    }
    assert!(v.len() >= (p.len() - 1) * stride + o.len(), "values cover every weight");
    #[cfg(target_arch = "x86_64")]
    {
        if o.len() <= 64 && crate::isa::avx512_built() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the values' extent was checked above.
            unsafe { x86::weighted_sum_avx512(o, p, v, stride) };
            return;
        }
    }
    for (j, &pj) in p.iter().enumerate() {
        for (o, x) in o.iter_mut().zip(&v[j * stride..]) {
            *o += pj * x;
        }
    }
}

fn scores_plain(p: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
    for (j, s) in p.iter_mut().enumerate() {
        *s = scale * vmath::dot(q, &k[j * stride..j * stride + q.len()]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::scores`] on 16 lanes, two accumulators per key.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores_avx512(p: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
        let d = q.len();
        let qp = q.as_ptr();
        for (j, s) in p.iter_mut().enumerate() {
            let row = k.as_ptr().add(j * stride);
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut c = 0;
            while c + 32 <= d {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c)), _mm512_loadu_ps(row.add(c)), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c + 16)), _mm512_loadu_ps(row.add(c + 16)), a1);
                c += 32;
            }
            if c + 16 <= d {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c)), _mm512_loadu_ps(row.add(c)), a0);
                c += 16;
            }
            let mut t = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for cc in c..d {
                t += *qp.add(cc) * *row.add(cc);
            }
            *s = scale * t;
        }
    }

    /// [`super::weighted_sum`] for `o.len() ≤ 64`: four 16-lane sums in registers, the
    /// last masked to the width.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_sum_avx512(o: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
        let d = o.len();
        let mask = |i: usize| -> __mmask16 {
            let left = d.saturating_sub(16 * i).min(16);
            ((1u32 << left) - 1) as __mmask16
        };
        let m = [mask(0), mask(1), mask(2), mask(3)];
        let mut acc = [_mm512_setzero_ps(); 4];
        for (j, &pj) in p.iter().enumerate() {
            let row = v.as_ptr().add(j * stride);
            let w = _mm512_set1_ps(pj);
            for i in 0..4 {
                if m[i] != 0 {
                    acc[i] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m[i], row.add(16 * i)), acc[i]);
                }
            }
        }
        for i in 0..4 {
            if m[i] != 0 {
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(16 * i), m[i], acc[i]);
            }
        }
    }

    /// [`super::scores`] on 8 lanes, two accumulators per key.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_avx2(p: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
        let d = q.len();
        let qp = q.as_ptr();
        for (j, s) in p.iter_mut().enumerate() {
            let row = k.as_ptr().add(j * stride);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 16 <= d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(row.add(c)), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c + 8)), _mm256_loadu_ps(row.add(c + 8)), a1);
                c += 16;
            }
            if c + 8 <= d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(row.add(c)), a0);
                c += 8;
            }
            let mut t = crate::gemv::sum8(_mm256_add_ps(a0, a1));
            for cc in c..d {
                t += *qp.add(cc) * *row.add(cc);
            }
            *s = scale * t;
        }
    }
}

/// One query row `q` of one head against the first `visible` keys (key `j` at
/// `k[j·k_stride..]`, value at `v[j·v_stride..]`): `o = Σ_j p_j v_j / Σ_j p_j` with
/// `p_j = e^(s_j − max s)`, `s_j = scale · q·k_j`; `p` is scratch.
#[allow(clippy::too_many_arguments)]
fn attend_row(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], k_stride: usize, v_stride: usize, visible: usize, scale: f32, p: &mut Vec<f32>) {
    p.clear();
    p.resize(visible, 0.0);
    scores(p, q, k, k_stride, scale);
    let max = vmath::max(p);
    let sum = vmath::exp_shifted_sum(p, max);
    weighted_sum(o, p, v, v_stride);
    vmath::scale(o, 1.0 / sum);
}

/// One sequence's operands of [`kv_attention_forward_many`], as [`kv_attention_forward`]
/// takes them.
pub struct KvSeq<'a> {
    /// `[n, nh·dv]`
    pub out: &'a mut [f32],
    /// `[n, nh·dqk]`
    pub q: &'a [f32],
    /// keys of positions `0..past + n`
    pub k: &'a [f32],
    /// values of positions `0..past + n`
    pub v: &'a [f32],
    /// shapes and strides
    pub shape: KvShape,
}

/// [`kv_attention_forward`] for many sequences in one parallel pass over every
/// (sequence, head) pair. A decoding step of a batch calls this once per layer: a
/// parallel pass per sequence with a head per task cost more in starting the tasks than
/// the heads' work (one row against a few hundred keys).
pub fn kv_attention_forward_many(seqs: &mut [KvSeq], scale: f32) {
    for s in seqs.iter() {
        let KvShape { n, nh, nkv, dqk, dv, k_stride, v_stride, .. } = s.shape;
        let len = s.shape.len();
        assert_eq!(s.out.len(), n * nh * dv, "output is [n, nh·dv]");
        assert_eq!(s.q.len(), n * nh * dqk, "queries are [n, nh·dqk]");
        assert!(nkv > 0 && nh % nkv == 0, "key/value heads divide query heads");
        assert!(len == 0 || s.k.len() >= (len - 1) * k_stride + nkv * dqk, "keys cover every visible position");
        assert!(len == 0 || s.v.len() >= (len - 1) * v_stride + nkv * dv, "values cover every visible position");
    }
    let outs: Vec<SendPtr> = seqs.iter_mut().map(|s| SendPtr(s.out.as_mut_ptr())).collect();
    let seqs: &[KvSeq] = seqs;
    let tasks: Vec<(usize, usize)> = seqs.iter().enumerate().filter(|(_, s)| s.shape.n > 0).flat_map(|(i, s)| (0..s.shape.nh).map(move |h| (i, h))).collect();
    tasks.into_par_iter().for_each_init(Vec::new, |p, (i, h)| {
        let s = &seqs[i];
        // SAFETY: the lengths were checked above; head h's output columns of this
        // sequence's rows belong to this task alone.
        unsafe { head(outs[i], s.q, s.k, s.v, s.shape, scale, h, p) }
    });
}

/// Query head `h` of one sequence: `S = scale · Q_h K_gᵀ`, the causal softmax, `O_h = P V_g`
/// into `out`'s columns `h·dv..(h+1)·dv`; `p` is scratch for `P`.
///
/// # Safety
/// The operands have the lengths [`kv_attention_forward_many`] checks, and no other
/// thread writes head `h`'s columns of `out` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn head(out: SendPtr, q: &[f32], k: &[f32], v: &[f32], s: KvShape, scale: f32, h: usize, p: &mut Vec<f32>) {
    let KvShape { n, past, nh, nkv, dqk, dv, k_stride, v_stride } = s;
    let len = s.len();
    let g = h / (nh / nkv);
    if n <= DIRECT_ROWS {
        // Decoding: a few rows, each a dot product per visible key and a multiply-add of
        // each value row (two GEMM calls cost more to set up than this head's work).
        for i in 0..n {
            let o = std::slice::from_raw_parts_mut(out.0.add(i * nh * dv + h * dv), dv);
            let qi = &q[i * nh * dqk + h * dqk..][..dqk];
            attend_row(o, qi, &k[g * dqk..], &v[g * dv..], k_stride, v_stride, past + i + 1, scale, p);
        }
        return;
    }
    p.clear();
    p.resize(n * len, 0.0);
    gemm_strided(
        n,
        len,
        dqk,
        p.as_mut_ptr(),
        Strided { rs: len as isize, cs: 1 },
        q.as_ptr().add(h * dqk),
        Strided::row_major(nh * dqk, Op::N),
        k.as_ptr().add(g * dqk),
        Strided::row_major(k_stride, Op::T),
        false,
        scale,
        false,
    );
    for i in 0..n {
        let row = &mut p[i * len..(i + 1) * len];
        let visible = past + i + 1;
        let max = vmath::max(&row[..visible]);
        let sum = vmath::exp_shifted_sum(&mut row[..visible], max);
        vmath::scale(&mut row[..visible], 1.0 / sum);
        row[visible..].fill(0.0);
    }
    gemm_strided(
        n,
        dv,
        len,
        out.0.add(h * dv),
        Strided::row_major(nh * dv, Op::N),
        p.as_ptr(),
        Strided::row_major(len, Op::N),
        v.as_ptr().add(g * dv),
        Strided::row_major(v_stride, Op::N),
        false,
        1.0,
        false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{attention_forward, AttnShape};
    use crate::testutil::*;

    /// Prefill of `p` rows then the rest one or a few at a time gives each row what the
    /// whole causal attention gives it.
    #[test]
    fn cached_rows_match_whole_causal_attention() {
        let (t, nh, nkv, dqk, dv) = (11, 4, 2, 6, 5);
        let q = rand_vec(t * nh * dqk, 1);
        let k = rand_vec(t * nkv * dqk, 2);
        let v = rand_vec(t * nkv * dv, 3);
        let mut whole = vec![0.0; t * nh * dv];
        attention_forward(&mut whole, None, &q, &k, &v, AttnShape { b: 1, t, nh, nkv, dqk, dv }, crate::attention::Mask::Causal, 0.4);
        for steps in [vec![4, 1, 1, 3, 2], vec![1; 11], vec![11]] {
            let mut past = 0;
            for n in steps {
                let s = KvShape { n, past, nh, nkv, dqk, dv, k_stride: nkv * dqk, v_stride: nkv * dv };
                let mut out = vec![0.0; n * nh * dv];
                let qs = &q[past * nh * dqk..(past + n) * nh * dqk];
                kv_attention_forward(&mut out, qs, &k[..(past + n) * nkv * dqk], &v[..(past + n) * nkv * dv], s, 0.4);
                assert_close(&out, &whole[past * nh * dv..(past + n) * nh * dv], 1e-5, "cached rows");
                past += n;
            }
        }
    }

    /// Keys and values read through strides from one interleaved buffer.
    #[test]
    fn strided_keys_and_values_share_a_buffer() {
        let (t, nh, d) = (5, 3, 4);
        let q = rand_vec(t * nh * d, 4);
        let kv = rand_vec(t * 2 * d, 5); // per position [k | v]
        let k: Vec<f32> = kv.chunks(2 * d).flat_map(|r| r[..d].to_vec()).collect();
        let v: Vec<f32> = kv.chunks(2 * d).flat_map(|r| r[d..].to_vec()).collect();
        let mut a = vec![0.0; t * nh * d];
        let mut b = vec![0.0; t * nh * d];
        kv_attention_forward(&mut a, &q, &k, &v, KvShape { n: t, past: 0, nh, nkv: 1, dqk: d, dv: d, k_stride: d, v_stride: d }, 0.5);
        kv_attention_forward(&mut b, &q, &kv, &kv[d..], KvShape { n: t, past: 0, nh, nkv: 1, dqk: d, dv: d, k_stride: 2 * d, v_stride: 2 * d }, 0.5);
        assert_close(&a, &b, 0.0, "strided");
        // The same through the decoding path (two new rows after three cached).
        let (mut a, mut b) = (vec![0.0; 2 * nh * d], vec![0.0; 2 * nh * d]);
        kv_attention_forward(&mut a, &q[3 * nh * d..], &k, &v, KvShape { n: 2, past: 3, nh, nkv: 1, dqk: d, dv: d, k_stride: d, v_stride: d }, 0.5);
        kv_attention_forward(
            &mut b,
            &q[3 * nh * d..],
            &kv,
            &kv[d..],
            KvShape { n: 2, past: 3, nh, nkv: 1, dqk: d, dv: d, k_stride: 2 * d, v_stride: 2 * d },
            0.5,
        );
        assert_close(&a, &b, 0.0, "strided, decoding");
    }

    /// Every vector path of the decoding scores and value sums this CPU can run, not only
    /// the one chosen, against the portable loops, at widths that leave tails.
    #[test]
    fn decoding_kernels_match_the_plain_loops_on_every_path() {
        for d in [8, 17, 64, 100] {
            let (keys, stride) = (9, d + 3);
            let q = rand_vec(d, 1);
            let k = rand_vec(keys * stride, 2);
            let mut want = vec![0.0; keys];
            scores_plain(&mut want, &q, &k, stride, 0.7);
            let mut got = vec![0.0; keys];
            scores(&mut got, &q, &k, stride, 0.7);
            assert_close(&got, &want, 1e-5, "scores");
            let p = rand_vec(keys, 3);
            let mut plain = vec![0.0; d.min(64)];
            for (j, &pj) in p.iter().enumerate() {
                for (o, x) in plain.iter_mut().zip(&k[j * stride..]) {
                    *o += pj * x;
                }
            }
            let mut sum = vec![f32::NAN; d.min(64)];
            weighted_sum(&mut sum, &p, &k, stride);
            assert_close(&sum, &plain, 1e-5, "weighted sum");
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    let mut got = vec![0.0; keys];
                    // SAFETY: the CPU has AVX2 and FMA; the keys cover every score.
                    unsafe { x86::scores_avx2(&mut got, &q, &k, stride, 0.7) };
                    assert_close(&got, &want, 1e-5, "scores, AVX2");
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    let mut got = vec![0.0; keys];
                    // SAFETY: as above, for AVX-512F.
                    unsafe { x86::scores_avx512(&mut got, &q, &k, stride, 0.7) };
                    assert_close(&got, &want, 1e-5, "scores, AVX-512");
                    let mut sum = vec![0.0; d.min(64)];
                    // SAFETY: as above; the values cover every weight, o.len() ≤ 64.
                    unsafe { x86::weighted_sum_avx512(&mut sum, &p, &k, stride) };
                    assert_close(&sum, &plain, 1e-5, "weighted sum, AVX-512");
                }
            }
        }
    }

    /// Sequences of different lengths and row counts (decoding rows and a prefill chunk)
    /// in one call get exactly what each gets alone.
    #[test]
    fn many_sequences_at_once_equal_each_alone() {
        let (nh, nkv, dqk, dv) = (4, 2, 8, 6);
        let cases = [(1, 0), (1, 9), (3, 5), (7, 2), (0, 4)]; // (new rows, past)
        let data: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(c, &(n, past))| {
                let len = n + past;
                (rand_vec(n * nh * dqk, 10 + c as u64), rand_vec(len * nkv * dqk, 20 + c as u64), rand_vec(len * nkv * dv, 30 + c as u64))
            })
            .collect();
        let shape = |n, past| KvShape { n, past, nh, nkv, dqk, dv, k_stride: nkv * dqk, v_stride: nkv * dv };
        let alone: Vec<Vec<f32>> = cases
            .iter()
            .zip(&data)
            .map(|(&(n, past), (q, k, v))| {
                let mut out = vec![0.0; n * nh * dv];
                kv_attention_forward(&mut out, q, k, v, shape(n, past), 0.3);
                out
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = cases.iter().map(|&(n, _)| vec![f32::NAN; n * nh * dv]).collect();
        let mut seqs: Vec<KvSeq> =
            outs.iter_mut().zip(&cases).zip(&data).map(|((out, &(n, past)), (q, k, v))| KvSeq { out, q, k, v, shape: shape(n, past) }).collect();
        kv_attention_forward_many(&mut seqs, 0.3);
        assert_eq!(outs, alone);
    }
}
