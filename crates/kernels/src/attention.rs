//! Causal scaled-dot-product attention with grouped-query heads.
//!
//! For each batch row `b` and query head `h` (key/value head `g = h / (nh / nkv)`):
//! `S = scale · Q_h K_gᵀ` (`[T, T]`), `P = softmax(S + causal mask)` row-wise,
//! `O_h = P V_g`. `P` is either saved for the backward (`B·nh·T²` floats, the attention's
//! largest activation) or not kept at all: then the forward forms each head's `P` in a
//! per-task scratch buffer and the backward recomputes it block by block, just before
//! using it (flash-attention style; the same code on the same inputs, so the same bits).
//!
//! Packed rows ([`Mask::Documents`]): several documents share a row, and a query sees
//! only the keys of its own document: query `i` at position `pos_i` within its document
//! sees keys `i − pos_i ..= i`. The masked probabilities are exact zeros, so the
//! backward (`dS = P ⊙ …`) needs no mask of its own.

use crate::gemm::{gemm_strided, Op, Strided};
use crate::vmath;
use std::mem::MaybeUninit;
use rayon::prelude::*;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// batch rows
    pub b: usize,
    /// sequence length
    pub t: usize,
    /// query heads
    pub nh: usize,
    /// key/value heads (divides `nh`)
    pub nkv: usize,
    /// query/key head dimension
    pub dqk: usize,
    /// value head dimension
    pub dv: usize,
}

impl AttnShape {
    /// Elements of the saved probabilities `[B, nh, T, T]`.
    pub fn probs_len(&self) -> usize {
        self.b * self.nh * self.t * self.t
    }
}

/// Which keys a query sees.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// every earlier key of the row
    Causal,
    /// `[B·T]` positions within each token's document (0 where a document starts):
    /// keys of the same document only
    Documents(&'a [u32]),
}

impl Mask<'_> {
    /// The first key row `i` of batch row `bi` sees (within the row).
    fn first_key(&self, bi: usize, t: usize, i: usize) -> usize {
        match self {
            Mask::Causal => 0,
            Mask::Documents(pos) => i - (pos[bi * t + i] as usize).min(i),
        }
    }

    /// The first key any query row of `r0..r1` sees: the block's products start there,
    /// since every key left of it is masked for all of the block's rows (with packed
    /// documents most of a row's causal prefix is other documents').
    fn block_first_key(&self, bi: usize, t: usize, r0: usize, r1: usize) -> usize {
        match self {
            Mask::Causal => 0,
            Mask::Documents(_) => (r0..r1).map(|i| self.first_key(bi, t, i)).min().unwrap_or(r0),
        }
    }
}

/// Query rows per causal block.
const ROW_BLOCK: usize = 64;

/// A raw pointer that may cross threads; every use writes a region no other task touches.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `P[r0..r1, 0..r1]` of one head into rows `r0..r1` of `p: [T, T]` (zero outside each
/// row's keys): `scale · Q_h K_g[first..r1]ᵀ` by one GEMM, `first` the block's first visible key
/// ([`Mask::block_first_key`]), then a row softmax; returns `first`. The forward and the
/// backward's recomputation both call this, so they produce the same bits. `p` may be
/// uninitialised: rows `r0..r1` are whole when it returns.
#[allow(clippy::too_many_arguments)]
fn probs_block(p: &mut [MaybeUninit<f32>], r0: usize, r1: usize, q: &[f32], k: &[f32], s: AttnShape, mask: Mask, bi: usize, h: usize, scale: f32) -> usize {
    let AttnShape { t, nh, nkv, dqk, .. } = s;
    let g = h / (nh / nkv);
    let row0 = bi * t;
    let first = mask.block_first_key(bi, t, r0, r1);
    // SAFETY: Q/K views stay inside row block `bi` and head `h`/`g`; rows r0..r1,
    // columns first..r1 of `p` (t wide) are inside it.
    unsafe {
        gemm_strided(
            r1 - r0,
            r1 - first,
            dqk,
            p.as_mut_ptr().add(r0 * t + first).cast::<f32>(),
            Strided { rs: t as isize, cs: 1 },
            q.as_ptr().add((row0 + r0) * nh * dqk + h * dqk),
            Strided::row_major(nh * dqk, Op::N),
            k.as_ptr().add((row0 + first) * nkv * dqk + g * dqk),
            Strided::row_major(nkv * dqk, Op::T),
            false,
            scale,
            false,
        );
    }
    for i in r0..r1 {
        let row = &mut p[i * t..(i + 1) * t];
        let lo = mask.first_key(bi, t, i);
        // SAFETY: the product above wrote columns first..r1 of this row, and
        // first ≤ lo ≤ i < r1.
        let keys = unsafe { &mut *(&mut row[lo..=i] as *mut [MaybeUninit<f32>] as *mut [f32]) };
        let max = vmath::max(keys);
        let sum = vmath::exp_shifted_sum(keys, max);
        vmath::scale(keys, 1.0 / sum);
        row[..lo].fill(MaybeUninit::new(0.0));
        row[i + 1..].fill(MaybeUninit::new(0.0));
    }
    first
}

/// Forward. `q: [N, nh·dqk]`, `k: [N, nkv·dqk]`, `v: [N, nkv·dv]` → `out: [N, nh·dv]`;
/// `probs: [B, nh, T, T]` (zero above the diagonal) when given, for the backward;
/// without it each head's probabilities live only in a scratch buffer.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], probs: Option<&mut [f32]>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape, mask: Mask, scale: f32) {
    attention_forward_uninit(as_uninit(out), probs.map(as_uninit), q, k, v, s, mask, scale);
}

/// [`attention_forward`] into new buffers `(probs, out)`, `probs` empty unless `keep`.
/// Every element of both is written, so they are not zeroed first (a zeroed `probs` is
/// `B·nh·T²` floats of memset a layer: 4 MB on the math MoE's step).
pub fn attention_forward_new(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, mask: Mask, scale: f32, keep: bool) -> (Vec<f32>, Vec<f32>) {
    let mut probs: Vec<MaybeUninit<f32>> = Vec::with_capacity(if keep { s.probs_len() } else { 0 });
    let mut out: Vec<MaybeUninit<f32>> = Vec::with_capacity(s.b * s.t * s.nh * s.dv);
    // SAFETY: MaybeUninit needs no initialisation; the lengths are the capacities.
    unsafe {
        probs.set_len(probs.capacity());
        out.set_len(out.capacity());
    }
    attention_forward_uninit(&mut out, keep.then_some(&mut probs[..]), q, k, v, s, mask, scale);
    // SAFETY: the forward wrote every element of both (see `attention_forward_uninit`).
    unsafe { (assume_init(probs), assume_init(out)) }
}

/// A written buffer's floats.
///
/// # Safety
/// Every element of `v` must be initialised.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity())
}

fn as_uninit(x: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; only initialised values are written through the result.
    unsafe { &mut *(x as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// The forward, writing every element of `out` and of `probs` (each row's keys by the
/// products, every other entry as zero).
#[allow(clippy::too_many_arguments)]
fn attention_forward_uninit(out: &mut [MaybeUninit<f32>], probs: Option<&mut [MaybeUninit<f32>]>, q: &[f32], k: &[f32], v: &[f32], s: AttnShape, mask: Mask, scale: f32) {
    let AttnShape { b, t, nh, nkv, dv, .. } = s;
    assert_eq!(out.len(), b * t * nh * dv);
    if let Mask::Documents(pos) = mask {
        assert_eq!(pos.len(), b * t, "one document position per token");
    }
    let group = nh / nkv;
    let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
    let head = |p: &mut [MaybeUninit<f32>], bh: usize| {
        let (bi, h) = (bh / nh, bh % nh);
        let g = h / group;
        let row0 = bi * t;
        // Capture the whole wrapper (Send), not its raw-pointer field.
        let out_ptr = out_ptr;
        // Causal blocking: query rows r0..r1 only see keys lo..r1, so each row block
        // multiplies against that range alone (causal: ≈ (1 + B/T)/2 of the full
        // product; packed documents of length L: ≈ (B + L)/T).
        for r0 in (0..t).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(t);
            let lo = probs_block(p, r0, r1, q, k, s, mask, bi, h, scale);
            // SAFETY: the output view covers rows r0..r1 of `bi`, columns of head `h`,
            // written by this task only; V stays inside row block `bi`, head `g`.
            unsafe {
                gemm_strided(
                    r1 - r0,
                    dv,
                    r1 - lo,
                    out_ptr.0.add((row0 + r0) * nh * dv + h * dv),
                    Strided::row_major(nh * dv, Op::N),
                    p.as_ptr().add(r0 * t + lo).cast::<f32>(),
                    Strided::row_major(t, Op::N),
                    v.as_ptr().add((row0 + lo) * nkv * dv + g * dv),
                    Strided::row_major(nkv * dv, Op::N),
                    false,
                    1.0,
                    false,
                );
            }
        }
    };
    match probs {
        Some(probs) => {
            assert_eq!(probs.len(), s.probs_len());
            probs.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| head(p, bh));
        }
        None => (0..b * nh).into_par_iter().for_each_init(|| vec![MaybeUninit::new(0.0f32); t * t], |p, bh| head(p, bh)),
    }
}

/// Backward of [`attention_forward`]; writes (not accumulates) `dq`, `dk`, `dv`:
/// `dV_g = Σ_h Pᵀ dO_h`, `dP = dO_h V_gᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`,
/// `dQ_h = scale · dS K_g`, `dK_g = scale · Σ_h dSᵀ Q_h`. `probs`: what the forward saved,
/// or `None` to recompute each row block of `P` just before it is used.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dvv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: Option<&[f32]>,
    s: AttnShape,
    mask: Mask,
    scale: f32,
) {
    let AttnShape { b, t, nh, nkv, dqk, dv } = s;
    let group = nh / nkv;
    // dK and dV accumulate over query heads and row blocks.
    dk.fill(0.0);
    dvv.fill(0.0);
    let (dq_p, dk_p, dv_p) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dvv.as_mut_ptr()));
    let scratch = if probs.is_some() { 0 } else { t * t };
    (0..b * nkv).into_par_iter().for_each_init(
        || (vec![0.0f32; t * t], vec![0.0f32; scratch]),
        |(dp, pbuf), bg| {
            let (bi, g) = (bg / nkv, bg % nkv);
            let row0 = bi * t;
            // Capture the whole wrappers (Send), not their raw-pointer fields.
            let (dq_p, dk_p, dv_p) = (dq_p, dk_p, dv_p);
            for h in g * group..(g + 1) * group {
                for r0 in (0..t).step_by(ROW_BLOCK) {
                    let r1 = (r0 + ROW_BLOCK).min(t);
                    // keys lo..r1: left of lo every probability of the block is zero
                    let (p, lo): (&[f32], usize) = match probs {
                        Some(probs) => (&probs[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t], mask.block_first_key(bi, t, r0, r1)),
                        None => {
                            let lo = probs_block(as_uninit(pbuf), r0, r1, q, k, s, mask, bi, h, scale);
                            (&pbuf[..], lo)
                        }
                    };
                    // SAFETY: dq rows of (bi, h) and dk/dv rows of (bi, g) belong to this task.
                    unsafe {
                        let do_ptr = dout.as_ptr().add((row0 + r0) * nh * dv + h * dv);
                        let do_s = Strided::row_major(nh * dv, Op::N);
                        // dV_g[lo..r1] += P[r0..r1, lo..r1]ᵀ dO_h[r0..r1]
                        gemm_strided(
                            r1 - lo,
                            dv,
                            r1 - r0,
                            dv_p.0.add((row0 + lo) * nkv * dv + g * dv),
                            Strided::row_major(nkv * dv, Op::N),
                            p.as_ptr().add(r0 * t + lo),
                            Strided::row_major(t, Op::T),
                            do_ptr,
                            do_s,
                            true,
                            1.0,
                            false,
                        );
                        // dP[r0..r1, lo..r1] = dO_h[r0..r1] V_g[lo..r1]ᵀ
                        gemm_strided(
                            r1 - r0,
                            r1 - lo,
                            dv,
                            dp.as_mut_ptr().add(r0 * t + lo),
                            Strided { rs: t as isize, cs: 1 },
                            do_ptr,
                            do_s,
                            v.as_ptr().add((row0 + lo) * nkv * dv + g * dv),
                            Strided::row_major(nkv * dv, Op::T),
                            false,
                            1.0,
                            false,
                        );
                    }
                    for i in r0..r1 {
                        let pr = &p[i * t + lo..i * t + i + 1];
                        let dr = &mut dp[i * t + lo..i * t + r1];
                        let n = i + 1 - lo;
                        let dot = vmath::dot(pr, &dr[..n]);
                        for j in 0..n {
                            dr[j] = pr[j] * (dr[j] - dot);
                        }
                        dr[n..].fill(0.0);
                    }
                    unsafe {
                        // dQ_h[r0..r1] = scale · dS[r0..r1, lo..r1] K_g[lo..r1]
                        gemm_strided(
                            r1 - r0,
                            dqk,
                            r1 - lo,
                            dq_p.0.add((row0 + r0) * nh * dqk + h * dqk),
                            Strided::row_major(nh * dqk, Op::N),
                            dp.as_ptr().add(r0 * t + lo),
                            Strided::row_major(t, Op::N),
                            k.as_ptr().add((row0 + lo) * nkv * dqk + g * dqk),
                            Strided::row_major(nkv * dqk, Op::N),
                            false,
                            scale,
                            false,
                        );
                        // dK_g[lo..r1] += scale · dS[r0..r1, lo..r1]ᵀ Q_h[r0..r1]
                        gemm_strided(
                            r1 - lo,
                            dqk,
                            r1 - r0,
                            dk_p.0.add((row0 + lo) * nkv * dqk + g * dqk),
                            Strided::row_major(nkv * dqk, Op::N),
                            dp.as_ptr().add(r0 * t + lo),
                            Strided::row_major(t, Op::T),
                            q.as_ptr().add((row0 + r0) * nh * dqk + h * dqk),
                            Strided::row_major(nh * dqk, Op::N),
                            true,
                            scale,
                            false,
                        );
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
        let AttnShape { b, t, nh, nkv, dqk, dv } = s;
        let mut out = vec![0.0; b * t * nh * dv];
        for bi in 0..b {
            for h in 0..nh {
                let g = h / (nh / nkv);
                for i in 0..t {
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..dqk).map(|d| q[(bi * t + i) * nh * dqk + h * dqk + d] as f64 * k[(bi * t + j) * nkv * dqk + g * dqk + d] as f64).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..dv {
                        let o: f64 = (0..=i).map(|j| (sc[j] - m).exp() / z * v[(bi * t + j) * nkv * dv + g * dv + d] as f64).sum();
                        out[(bi * t + i) * nh * dv + h * dv + d] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_and_backward_matches_finite_differences() {
        let s = AttnShape { b: 2, t: 70, nh: 4, nkv: 2, dqk: 3, dv: 2 };
        let n = s.b * s.t;
        let q = rand_vec(n * s.nh * s.dqk, 1);
        let k = rand_vec(n * s.nkv * s.dqk, 2);
        let v = rand_vec(n * s.nkv * s.dv, 3);
        let g = rand_vec(n * s.nh * s.dv, 4);
        let scale = 0.7;
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0.0; n * s.nh * s.dv];
            let mut p = vec![0.0; s.probs_len()];
            attention_forward(&mut out, Some(&mut p), q, k, v, s, Mask::Causal, scale);
            (out, p)
        };
        let (out, p) = run(&q, &k, &v);
        assert_close(&out, &naive(&q, &k, &v, s, scale), 1e-5, "attention forward");
        // Without saved probabilities: the same output, and the backward (recomputing
        // them block by block) gives the same bits as the one reading them.
        let mut out2 = vec![0.0; out.len()];
        attention_forward(&mut out2, None, &q, &k, &v, s, Mask::Causal, scale);
        assert!(bits_equal(&out, &out2), "forward without saved probabilities");
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&mut dq, &mut dk, &mut dv, &g, &q, &k, &v, Some(&p), s, Mask::Causal, scale);
        let (mut dq2, mut dk2, mut dv2) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&mut dq2, &mut dk2, &mut dv2, &g, &q, &k, &v, None, s, Mask::Causal, scale);
        for (a, b, what) in [(&dq, &dq2, "dq"), (&dk, &dk2, "dk"), (&dv, &dv2, "dv")] {
            assert!(bits_equal(a, b), "{what} with recomputed probabilities");
        }
        assert_close(&dq, &numeric_grad(&q, 1e-3, |x| dot64(&run(x, &k, &v).0, &g)), 2e-3, "dq");
        assert_close(&dk, &numeric_grad(&k, 1e-3, |x| dot64(&run(&q, x, &v).0, &g)), 2e-3, "dk");
        assert_close(&dv, &numeric_grad(&v, 1e-3, |x| dot64(&run(&q, &k, x).0, &g)), 2e-3, "dv");
    }

    /// Same length and bitwise the same floats.
    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// `attention_forward_new` skips zeroing its buffers: the forward must write every
    /// element of the output and of the probabilities. Buffers first filled with NaN
    /// come out whole and bitwise as zero-filled ones do, for both masks, with rows not
    /// a multiple of the 64-row block.
    #[test]
    fn the_forward_writes_every_element() {
        for t in [70usize, 130] {
            let s = AttnShape { b: 2, t, nh: 4, nkv: 2, dqk: 3, dv: 2 };
            let n = s.b * t;
            let (q, k, v) = (rand_vec(n * s.nh * s.dqk, 11), rand_vec(n * s.nkv * s.dqk, 12), rand_vec(n * s.nkv * s.dv, 13));
            let pos: Vec<u32> = (0..n).map(|i| ((i % t) % 45) as u32).collect();
            for mask in [Mask::Causal, Mask::Documents(&pos)] {
                let (mut out0, mut p0) = (vec![0.0; n * s.nh * s.dv], vec![0.0; s.probs_len()]);
                attention_forward(&mut out0, Some(&mut p0), &q, &k, &v, s, mask, 0.6);
                let (mut out1, mut p1) = (vec![f32::NAN; out0.len()], vec![f32::NAN; p0.len()]);
                attention_forward(&mut out1, Some(&mut p1), &q, &k, &v, s, mask, 0.6);
                assert!(bits_equal(&out0, &out1) && bits_equal(&p0, &p1), "t {t}: an element the forward does not write");
                let (p2, out2) = attention_forward_new(&q, &k, &v, s, mask, 0.6, true);
                assert!(bits_equal(&out0, &out2) && bits_equal(&p0, &p2), "t {t}: attention_forward_new");
                let (none, out3) = attention_forward_new(&q, &k, &v, s, mask, 0.6, false);
                assert!(none.is_empty() && bits_equal(&out0, &out3), "t {t}: attention_forward_new without probabilities");
            }
        }
    }

    #[test]
    fn documents_in_a_row_attend_only_to_themselves() {
        // Rows holding several documents, against each document run alone: 25, 40, 5 in
        // 70 (the second spans the 64-row block boundary); 30, 100, 70 in 200 (a whole
        // block inside one document, blocks starting mid-document); one document filling
        // the row (exactly the causal mask).
        for lens in [vec![25usize, 40, 5], vec![30, 100, 70], vec![130]] {
            documents_attend_only_to_themselves(&lens);
        }
    }

    fn documents_attend_only_to_themselves(lens: &[usize]) {
        let s = AttnShape { b: 1, t: lens.iter().sum(), nh: 4, nkv: 2, dqk: 3, dv: 2 };
        let n = s.t;
        let q = rand_vec(n * s.nh * s.dqk, 5);
        let k = rand_vec(n * s.nkv * s.dqk, 6);
        let v = rand_vec(n * s.nkv * s.dv, 7);
        let g = rand_vec(n * s.nh * s.dv, 8);
        let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let scale = 0.7;
        let mut out = vec![0.0; n * s.nh * s.dv];
        let mut p = vec![0.0; s.probs_len()];
        attention_forward(&mut out, Some(&mut p), &q, &k, &v, s, Mask::Documents(&pos), scale);
        // The saved probabilities are exact zeros outside each query's own document's
        // keys (the backward reads them as they are).
        for (h, ph) in p.chunks(n * n).enumerate() {
            for i in 0..n {
                let first = i - pos[i] as usize;
                let outside = ph[i * n..i * n + first].iter().chain(&ph[i * n + i + 1..(i + 1) * n]);
                assert!(outside.into_iter().all(|&x| x == 0.0), "head {h} row {i}: a key outside its document");
            }
        }
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&mut dq, &mut dk, &mut dv, &g, &q, &k, &v, Some(&p), s, Mask::Documents(&pos), scale);
        // Recomputing the probabilities applies the same mask: the same bits.
        let (mut dq2, mut dk2, mut dv2) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&mut dq2, &mut dk2, &mut dv2, &g, &q, &k, &v, None, s, Mask::Documents(&pos), scale);
        for (a, b, what) in [(&dq, &dq2, "dq"), (&dk, &dk2, "dk"), (&dv, &dv2, "dv")] {
            assert!(bits_equal(a, b), "{what} with recomputed probabilities");
        }
        let mut r0 = 0;
        for &l in lens {
            let sd = AttnShape { t: l, ..s };
            let rows = |x: &[f32], w: usize| x[r0 * w..(r0 + l) * w].to_vec();
            let (qd, kd, vd, gd) = (rows(&q, s.nh * s.dqk), rows(&k, s.nkv * s.dqk), rows(&v, s.nkv * s.dv), rows(&g, s.nh * s.dv));
            let mut od = vec![0.0; l * s.nh * s.dv];
            attention_forward(&mut od, None, &qd, &kd, &vd, sd, Mask::Causal, scale);
            assert_close(&rows(&out, s.nh * s.dv), &od, 1e-6, "document output");
            assert_close(&rows(&out, s.nh * s.dv), &naive(&qd, &kd, &vd, sd, scale), 1e-5, "document output (naive)");
            let (mut a, mut b, mut c) = (vec![0.0; qd.len()], vec![0.0; kd.len()], vec![0.0; vd.len()]);
            attention_backward(&mut a, &mut b, &mut c, &gd, &qd, &kd, &vd, None, sd, Mask::Causal, scale);
            assert_close(&rows(&dq, s.nh * s.dqk), &a, 1e-6, "document dq");
            assert_close(&rows(&dk, s.nkv * s.dqk), &b, 1e-6, "document dk");
            assert_close(&rows(&dv, s.nkv * s.dv), &c, 1e-6, "document dv");
            r0 += l;
        }
    }
}
