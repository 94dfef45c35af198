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
    let KvShape { n, nh, nkv, dqk, dv, k_stride, v_stride, past } = s;
    let len = s.len();
    assert_eq!(out.len(), n * nh * dv, "output is [n, nh·dv]");
    assert_eq!(q.len(), n * nh * dqk, "queries are [n, nh·dqk]");
    assert!(nkv > 0 && nh % nkv == 0, "key/value heads divide query heads");
    assert!(len == 0 || k.len() >= (len - 1) * k_stride + nkv * dqk, "keys cover every visible position");
    assert!(len == 0 || v.len() >= (len - 1) * v_stride + nkv * dv, "values cover every visible position");
    if n == 0 {
        return;
    }
    let group = nh / nkv;
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..nh).into_par_iter().for_each_init(
        || vec![0.0f32; n * len],
        |p, h| {
            let g = h / group;
            let out_ptr = out_ptr;
            // SAFETY: Q rows stay in `q` (n rows of nh·dqk, head h); K/V positions
            // 0..len lie inside the asserted lengths; P is n × len.
            unsafe {
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
            }
            for i in 0..n {
                let row = &mut p[i * len..(i + 1) * len];
                let visible = past + i + 1;
                let max = vmath::max(&row[..visible]);
                let sum = vmath::exp_shifted_sum(&mut row[..visible], max);
                vmath::scale(&mut row[..visible], 1.0 / sum);
                row[visible..].fill(0.0);
            }
            // SAFETY: the output columns of head h in every row belong to this task.
            unsafe {
                gemm_strided(
                    n,
                    dv,
                    len,
                    out_ptr.0.add(h * dv),
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
        },
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
    }
}
