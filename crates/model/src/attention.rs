//! Attention blocks: grouped-query attention (Qwen3-MoE, Mixtral; optional per-head q/k
//! RMSNorm) and multi-head latent attention (DeepSeek-V3).

use crate::params::Slot;
use crate::tensor_ops::{put_cols, take_cols};
use ultramoe_kernels::attention::{attention_backward, attention_forward_new, AttnShape, Mask};
use crate::decode_weights::DecodeWeights;
use crate::kv_cache::LayerKv;
use ultramoe_kernels::gemm::{gemm_strided, linear, linear_grad, Op, Strided};
use ultramoe_kernels::kv_attention::{kv_attention_forward_many, KvSeq, KvShape};
use ultramoe_kernels::norm::{rmsnorm_backward, rmsnorm_forward};
use rayon::prelude::*;
use ultramoe_kernels::rope::RopeTable;

/// Batch geometry and shared tables for one forward/backward.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// batch rows
    pub b: usize,
    /// sequence length
    pub t: usize,
    /// RoPE cos/sin
    pub rope: &'a RopeTable,
    /// packed rows: every token's position within its document (`[B·T]`); attention
    /// stays inside documents and RoPE restarts at each (`None`: one sequence a row)
    pub positions: Option<&'a [u32]>,
    /// keep the attention probabilities for the backward (otherwise it recomputes them
    /// block by block: the `attention` memory policy)
    pub keep_probs: bool,
    /// how the MoE layers run
    pub moe: crate::moe::layer::MoeCtx<'a>,
    /// the tensor-parallel group the attention and dense FFN are split over: their
    /// partial outputs and input gradients are summed over it
    pub tp: Option<&'a crate::tensor_parallel::TensorParallel>,
}

impl Ctx<'_> {
    /// Tokens `N = B·T`.
    pub fn n(&self) -> usize {
        self.b * self.t
    }

    /// Rows of the residual stream this rank holds: `N`, or its `N/TP` slice under
    /// sequence parallelism (attention and the dense FFN gather the whole).
    pub fn rows(&self) -> usize {
        match self.tp {
            Some(t) if t.sequence_parallel() => self.n() / t.size(),
            _ => self.n(),
        }
    }

    /// Which keys each query sees.
    fn mask(&self) -> Mask<'_> {
        self.positions.map_or(Mask::Causal, Mask::Documents)
    }

    /// RoPE on `x: [N, row_len]` (see [`RopeTable::apply`]) at each token's position:
    /// `r mod T`, or its position in its document.
    #[allow(clippy::too_many_arguments)]
    fn rotate(&self, x: &mut [f32], row_len: usize, heads: usize, head_stride: usize, offset: usize, inverse: bool) {
        match self.positions {
            Some(p) => self.rope.apply_positions(x, row_len, p, heads, head_stride, offset, inverse),
            None => self.rope.apply(x, row_len, self.t, heads, head_stride, offset, inverse),
        }
    }
}

/// One sequence's new rows in a cached (decoding) pass: rows `start..start + n` of the
/// pass's `[N, H]` input, at positions `past..past + n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// first row in the pass
    pub start: usize,
    /// new rows
    pub n: usize,
    /// positions cached before them
    pub past: usize,
}

impl Span {
    fn rows(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.n
    }
}

/// `out: [N, width]` split into each span's rows (the spans cover the rows in order).
fn span_rows<'a>(out: &'a mut [f32], spans: &[Span], width: usize) -> Vec<&'a mut [f32]> {
    let mut rest = out;
    let mut parts = Vec::with_capacity(spans.len());
    let mut row = 0;
    for span in spans {
        assert_eq!(span.start, row, "the spans cover the rows in order");
        row += span.n;
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(span.n * width);
        parts.push(mine);
        rest = tail;
    }
    parts
}

/// Geometry of a cached pass: each sequence's span, every row's position, the RoPE table.
#[derive(Clone, Copy)]
pub struct CachedCtx<'a> {
    /// the sequences' rows, in row order
    pub spans: &'a [Span],
    /// the position of every row
    pub positions: &'a [usize],
    /// RoPE cos/sin
    pub rope: &'a RopeTable,
    /// how the MoE layers run
    pub moe: crate::moe::layer::MoeCtx<'a>,
}

/// Grouped-query attention with optional q/k norm.
#[derive(Clone, Debug)]
pub struct GqaAttention {
    /// fused `[q_proj; k_proj; v_proj]`, `[(nh + 2·nkv)·d, H]`
    pub qkv: Slot,
    /// `o_proj`, `[H, nh·d]`
    pub o: Slot,
    /// per-head q RMSNorm gain `[d]` (Qwen3)
    pub q_norm: Option<Slot>,
    /// per-head k RMSNorm gain `[d]`
    pub k_norm: Option<Slot>,
    /// hidden `H`
    pub hidden: usize,
    /// query heads
    pub nh: usize,
    /// key/value heads
    pub nkv: usize,
    /// head dimension
    pub hd: usize,
    /// norm epsilon
    pub eps: f32,
    /// softmax scale
    pub scale: f32,
}

/// What [`GqaAttention::forward`] saves for backward.
#[derive(Default)]
pub struct GqaSaved {
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    rstd_q: Vec<f32>,
    rstd_k: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    o: Vec<f32>,
}

impl GqaSaved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * [&self.q_raw, &self.k_raw, &self.rstd_q, &self.rstd_k, &self.q, &self.k, &self.v, &self.probs, &self.o]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
    }

    /// Frees q, k, v and what their norms kept (the `qkv` policy).
    pub fn release_qkv(&mut self) {
        *self = GqaSaved { probs: std::mem::take(&mut self.probs), o: std::mem::take(&mut self.o), ..Default::default() };
    }

    /// The buffers, for swapping.
    pub fn buffers_mut(&mut self) -> [&mut Vec<f32>; 9] {
        [&mut self.q_raw, &mut self.k_raw, &mut self.rstd_q, &mut self.rstd_k, &mut self.q, &mut self.k, &mut self.v, &mut self.probs, &mut self.o]
    }
}

/// The attention core's forward into fresh buffers: `(probs, out)`, the probabilities
/// empty unless `keep`.
fn core_forward(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape, mask: Mask, scale: f32, keep: bool) -> (Vec<f32>, Vec<f32>) {
    let _p = ultramoe_kernels::profile::scope("attention.core.forward");
    attention_forward_new(q, k, v, sh, mask, scale, keep)
}

/// The attention core's backward, reading the saved probabilities or, when none were
/// kept, recomputing them block by block.
#[allow(clippy::too_many_arguments)]
fn core_backward(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], d_o: &[f32], q: &[f32], k: &[f32], v: &[f32], probs: &[f32], sh: AttnShape, mask: Mask, scale: f32) {
    let _p = ultramoe_kernels::profile::scope("attention.core.backward");
    attention_backward(dq, dk, dv, d_o, q, k, v, (!probs.is_empty()).then_some(probs), sh, mask, scale);
}

impl GqaAttention {
    fn shape(&self, c: &Ctx) -> AttnShape {
        AttnShape { b: c.b, t: c.t, nh: self.nh, nkv: self.nkv, dqk: self.hd, dv: self.hd }
    }

    /// The input projection: `q`, `k` (normed when configured, then rotated) and `v`.
    fn project(&self, w: &[f32], x: &[f32], c: &Ctx) -> GqaSaved {
        let (n, h, hd) = (c.n(), self.hidden, self.hd);
        let (qw, kw) = (self.nh * hd, self.nkv * hd);
        let width = qw + 2 * kw;
        let qkv = linear(x, &w[self.qkv.clone()], n, h, width);
        let mut s = GqaSaved {
            q: take_cols(&qkv, width, 0, qw),
            k: take_cols(&qkv, width, qw, kw),
            v: take_cols(&qkv, width, qw + kw, kw),
            ..Default::default()
        };
        drop(qkv);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            s.q_raw = std::mem::take(&mut s.q);
            s.k_raw = std::mem::take(&mut s.k);
            s.q = vec![0.0; n * qw];
            s.k = vec![0.0; n * kw];
            s.rstd_q = vec![0.0; n * self.nh];
            s.rstd_k = vec![0.0; n * self.nkv];
            rmsnorm_forward(&mut s.q, &mut s.rstd_q, &s.q_raw, &w[qn.clone()], hd, self.eps);
            rmsnorm_forward(&mut s.k, &mut s.rstd_k, &s.k_raw, &w[kn.clone()], hd, self.eps);
        }
        c.rotate(&mut s.q, qw, self.nh, hd, 0, false);
        c.rotate(&mut s.k, kw, self.nkv, hd, 0, false);
        s
    }

    /// `x: [N, H]` (normed) → `y: [N, H]`.
    pub fn forward(&self, w: &[f32], x: &[f32], c: &Ctx) -> (Vec<f32>, GqaSaved) {
        let _p = ultramoe_kernels::profile::scope("attention.forward");
        let mut s = self.project(w, x, c);
        (s.probs, s.o) = core_forward(&s.q, &s.k, &s.v, self.shape(c), c.mask(), self.scale, c.keep_probs);
        (linear(&s.o, &w[self.o.clone()], c.n(), self.nh * self.hd, self.hidden), s)
    }

    /// Rebuilds what the `qkv` policy freed (`x`: the block's input).
    pub fn restore(&self, w: &[f32], x: &[f32], s: &mut GqaSaved, c: &Ctx) {
        if s.q.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.qkv");
            *s = GqaSaved { probs: std::mem::take(&mut s.probs), o: std::mem::take(&mut s.o), ..self.project(w, x, c) };
        }
    }

    /// Backward: accumulates weight gradients into `g`, returns `dx: [N, H]`.
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], s: &GqaSaved, dy: &[f32], c: &Ctx) -> Vec<f32> {
        let _p = ultramoe_kernels::profile::scope("attention.backward");
        let (n, h, hd) = (c.n(), self.hidden, self.hd);
        let (qw, kw) = (self.nh * hd, self.nkv * hd);
        let width = qw + 2 * kw;
        let d_o = linear_grad(&mut g[self.o.clone()], dy, &s.o, &w[self.o.clone()], n, qw, h);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * qw], vec![0.0; n * kw], vec![0.0; n * kw]);
        core_backward(&mut dq, &mut dk, &mut dv, &d_o, &s.q, &s.k, &s.v, &s.probs, self.shape(c), c.mask(), self.scale);
        c.rotate(&mut dq, qw, self.nh, hd, 0, true);
        c.rotate(&mut dk, kw, self.nkv, hd, 0, true);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            let mut dq_raw = vec![0.0; n * qw];
            let mut dk_raw = vec![0.0; n * kw];
            rmsnorm_backward(&mut dq_raw, &mut g[qn.clone()], &dq, &s.q_raw, &w[qn.clone()], &s.rstd_q, hd, false);
            rmsnorm_backward(&mut dk_raw, &mut g[kn.clone()], &dk, &s.k_raw, &w[kn.clone()], &s.rstd_k, hd, false);
            dq = dq_raw;
            dk = dk_raw;
        }
        let mut dqkv = vec![0.0; n * width];
        put_cols(&mut dqkv, width, 0, &dq, qw);
        put_cols(&mut dqkv, width, qw, &dk, kw);
        put_cols(&mut dqkv, width, qw + kw, &dv, kw);
        linear_grad(&mut g[self.qkv.clone()], &dqkv, x, &w[self.qkv.clone()], n, h, width)
    }

    /// Decoding forward of new rows `x: [N, H]` (normed) against each sequence's cache,
    /// which gains the rows' keys and values: → `y: [N, H]`.
    pub fn forward_cached(&self, dw: &DecodeWeights, x: &[f32], c: &CachedCtx, caches: &mut [&mut LayerKv]) -> Vec<f32> {
        let _p = ultramoe_kernels::profile::scope("attention.forward_cached");
        let (n, h, hd) = (c.positions.len(), self.hidden, self.hd);
        let (qw, kw) = (self.nh * hd, self.nkv * hd);
        let width = qw + 2 * kw;
        let qkv = {
            let _p = ultramoe_kernels::profile::scope("decode.attn.proj");
            dw.linear(&self.qkv, x, n, h, width)
        };
        let (mut q, mut k, v) = (take_cols(&qkv, width, 0, qw), take_cols(&qkv, width, qw, kw), take_cols(&qkv, width, qw + kw, kw));
        drop(qkv);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            let mut rstd = vec![0.0; n * self.nh];
            let raw = q.clone();
            rmsnorm_forward(&mut q, &mut rstd, &raw, &dw.w[qn.clone()], hd, self.eps);
            let raw = k.clone();
            rmsnorm_forward(&mut k, &mut rstd[..n * self.nkv], &raw, &dw.w[kn.clone()], hd, self.eps);
        }
        c.rope.apply_at(&mut q, qw, c.positions, self.nh, hd, 0);
        c.rope.apply_at(&mut k, kw, c.positions, self.nkv, hd, 0);
        let mut o = vec![0.0; n * qw];
        let _core = ultramoe_kernels::profile::scope("decode.attn.core");
        for (span, cache) in c.spans.iter().zip(caches.iter_mut()) {
            let LayerKv::Gqa { k: ck, v: cv } = &mut **cache else { panic!("a GQA layer needs a GQA cache") };
            assert_eq!(ck.len(), span.past * kw, "the cache holds the span's past");
            ck.extend_from_slice(&k[span.start * kw..(span.start + span.n) * kw]);
            cv.extend_from_slice(&v[span.start * kw..(span.start + span.n) * kw]);
        }
        let mut seqs = Vec::with_capacity(c.spans.len());
        for ((span, cache), out) in c.spans.iter().zip(caches.iter()).zip(span_rows(&mut o, c.spans, qw)) {
            let LayerKv::Gqa { k: ck, v: cv } = &**cache else { unreachable!("checked above") };
            let shape = KvShape { n: span.n, past: span.past, nh: self.nh, nkv: self.nkv, dqk: hd, dv: hd, k_stride: kw, v_stride: kw };
            seqs.push(KvSeq { out, q: &q[span.start * qw..(span.start + span.n) * qw], k: ck, v: cv, shape });
        }
        kv_attention_forward_many(&mut seqs, self.scale);
        drop(seqs);
        drop(_core);
        let _p = ultramoe_kernels::profile::scope("decode.attn.proj");
        dw.linear(&self.o, &o, n, qw, self.hidden)
    }
}

/// For every head `h < nh`: `out_h = a_h · B_h` with `out_h: [n, m]` at column
/// `h · out_step` of rows `out_rs` apart, `a_h: [n, k]` at column `h · a_step` of rows
/// `a_rs` apart, and `B_h: [k, m]` (as `bs` says) starting `h · b_step` into `b`.
#[allow(clippy::too_many_arguments)]
fn per_head(nh: usize, n: usize, m: usize, k: usize, out: &mut [f32], out_step: usize, out_rs: usize, a: &[f32], a_step: usize, a_rs: usize, b: &[f32], b_step: usize, bs: Strided, parallel: bool) {
    if n == 0 {
        return;
    }
    assert!(out.len() >= (n - 1) * out_rs + (nh - 1) * out_step + m, "the output views lie inside `out`");
    assert!(a.len() >= (n - 1) * a_rs + (nh - 1) * a_step + k, "the input views lie inside `a`");
    let b_reach = (k as isize - 1) * bs.rs + (m as isize - 1) * bs.cs;
    assert!(b.len() as isize > (nh - 1) as isize * b_step as isize + b_reach, "the weight views lie inside `b`");
    for h in 0..nh {
        // SAFETY: the asserts above bound every view; `out` does not alias `a` or `b`.
        unsafe {
            gemm_strided(
                n,
                m,
                k,
                out.as_mut_ptr().add(h * out_step),
                Strided::row_major(out_rs, Op::N),
                a.as_ptr().add(h * a_step),
                Strided::row_major(a_rs, Op::N),
                b.as_ptr().add(h * b_step),
                bs,
                false,
                1.0,
                parallel,
            );
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3).
///
/// `a = x·W_aᵀ` splits into the query input `q_a` (`q_lora_rank` wide, or the full query
/// when there is no query LoRA), the compressed KV `c` (`kv_lora_rank`) and the shared
/// rotary key `k_pe` (`qk_rope_head_dim`). Then `q = W_qb · norm(q_a)` per head
/// `[nope | rope]`, `[k_nope | v] = W_kvb · norm(c)` per head, `k = [k_nope | rope(k_pe)]`
/// (the one rotary key broadcast to every head) and `q`'s rope part is rotated too.
#[derive(Clone, Debug)]
pub struct MlaAttention {
    /// fused `[q_a_proj (or q_proj); kv_a_proj_with_mqa]`
    pub a: Slot,
    /// `q_a_layernorm` gain (with query LoRA)
    pub q_a_norm: Option<Slot>,
    /// `q_b_proj` (with query LoRA)
    pub q_b: Option<Slot>,
    /// `kv_a_layernorm` gain
    pub kv_a_norm: Slot,
    /// `kv_b_proj`, `[nh·(nope + v), kv_lora_rank]`
    pub kv_b: Slot,
    /// `o_proj`, `[H, nh·v]`
    pub o: Slot,
    /// hidden `H`
    pub hidden: usize,
    /// heads
    pub nh: usize,
    /// `q_lora_rank` (0 = none)
    pub q_lora: usize,
    /// `kv_lora_rank`
    pub kv_lora: usize,
    /// `qk_nope_head_dim`
    pub nope: usize,
    /// `qk_rope_head_dim`
    pub rope_dim: usize,
    /// `v_head_dim`
    pub dv: usize,
    /// norm epsilon
    pub eps: f32,
    /// softmax scale
    pub scale: f32,
}

/// What [`MlaAttention::forward`] saves for backward.
#[derive(Default)]
pub struct MlaSaved {
    qa: Vec<f32>,
    rstd_qa: Vec<f32>,
    qa_n: Vec<f32>,
    ckv: Vec<f32>,
    rstd_kv: Vec<f32>,
    ckv_n: Vec<f32>,
    /// the shared rotary key before rotation (kept only to rebuild `k` under `qkv`)
    kpe: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    o: Vec<f32>,
}

impl MlaSaved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * [
            &self.qa, &self.rstd_qa, &self.qa_n, &self.ckv, &self.rstd_kv, &self.ckv_n, &self.kpe, &self.q, &self.k, &self.v,
            &self.probs, &self.o,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
    }

    /// Frees the normed latents (the `norm` policy).
    pub fn release_norm(&mut self) {
        (self.qa_n, self.ckv_n) = Default::default();
    }

    /// Frees what the up-projections made (the `qkv` policy): `k`, `v`, and `q` when it
    /// comes from a query LoRA (without one `q` is the down-projection itself and stays).
    /// Otherwise frees the rotary key kept to rebuild them.
    pub fn release_qkv(&mut self, on: bool) {
        if !on {
            self.kpe = Vec::new();
            return;
        }
        if !self.qa.is_empty() {
            self.q = Vec::new();
        }
        (self.k, self.v) = Default::default();
    }

    /// The buffers, for swapping.
    pub fn buffers_mut(&mut self) -> [&mut Vec<f32>; 12] {
        [
            &mut self.qa, &mut self.rstd_qa, &mut self.qa_n, &mut self.ckv, &mut self.rstd_kv, &mut self.ckv_n, &mut self.kpe,
            &mut self.q, &mut self.k, &mut self.v, &mut self.probs, &mut self.o,
        ]
    }
}

impl MlaAttention {
    fn dqk(&self) -> usize {
        self.nope + self.rope_dim
    }
    fn q_in(&self) -> usize {
        if self.q_lora > 0 {
            self.q_lora
        } else {
            self.nh * self.dqk()
        }
    }
    fn a_width(&self) -> usize {
        self.q_in() + self.kv_lora + self.rope_dim
    }
    fn shape(&self, c: &Ctx) -> AttnShape {
        AttnShape { b: c.b, t: c.t, nh: self.nh, nkv: self.nh, dqk: self.dqk(), dv: self.dv }
    }

    /// Per head: `k = [k_nope | k_pe]`, `v` from the `kv_b` output `[k_nope | v]`, one
    /// pass over rows.
    fn split_kv(&self, k: &mut [f32], v: &mut [f32], kv: &[f32], kpe: &[f32]) {
        let (nh, nope, dv, rd) = (self.nh, self.nope, self.dv, self.rope_dim);
        let dqk = nope + rd;
        k.par_chunks_mut(nh * dqk)
            .zip(v.par_chunks_mut(nh * dv))
            .zip(kv.par_chunks(nh * (nope + dv)))
            .zip(kpe.par_chunks(rd))
            .for_each(|(((k, v), kv), kpe)| {
                for h in 0..nh {
                    let src = &kv[h * (nope + dv)..(h + 1) * (nope + dv)];
                    k[h * dqk..h * dqk + nope].copy_from_slice(&src[..nope]);
                    k[h * dqk + nope..(h + 1) * dqk].copy_from_slice(kpe);
                    v[h * dv..(h + 1) * dv].copy_from_slice(&src[nope..]);
                }
            });
    }

    /// Backward of [`Self::split_kv`]: `dkv` per head `[dk_nope | dv]`, and
    /// `dk_pe = Σ_heads dk_rope` (one rotary key feeds every head).
    fn merge_kv_grad(&self, dkv: &mut [f32], dkpe: &mut [f32], dk: &[f32], dv: &[f32]) {
        let (nh, nope, dvh, rd) = (self.nh, self.nope, self.dv, self.rope_dim);
        let dqk = nope + rd;
        dkv.par_chunks_mut(nh * (nope + dvh))
            .zip(dkpe.par_chunks_mut(rd))
            .zip(dk.par_chunks(nh * dqk))
            .zip(dv.par_chunks(nh * dvh))
            .for_each(|(((dkv, dkpe), dk), dv)| {
                dkpe.fill(0.0);
                for h in 0..nh {
                    let dst = &mut dkv[h * (nope + dvh)..(h + 1) * (nope + dvh)];
                    dst[..nope].copy_from_slice(&dk[h * dqk..h * dqk + nope]);
                    dst[nope..].copy_from_slice(&dv[h * dvh..(h + 1) * dvh]);
                    for (a, b) in dkpe.iter_mut().zip(&dk[h * dqk + nope..(h + 1) * dqk]) {
                        *a += b;
                    }
                }
            });
    }

    /// The down-projection: the query input, the compressed KV and the shared rotary key;
    /// without a query LoRA the query input is `q` itself (rotated here).
    fn latents(&self, w: &[f32], x: &[f32], c: &Ctx) -> MlaSaved {
        let (n, h, nh, dqk) = (c.n(), self.hidden, self.nh, self.dqk());
        let (aw, qin) = (self.a_width(), self.q_in());
        let a = linear(x, &w[self.a.clone()], n, h, aw);
        let mut s = MlaSaved {
            qa: take_cols(&a, aw, 0, qin),
            ckv: take_cols(&a, aw, qin, self.kv_lora),
            kpe: take_cols(&a, aw, qin + self.kv_lora, self.rope_dim),
            ..Default::default()
        };
        if self.q_b.is_none() {
            s.q = std::mem::take(&mut s.qa);
            c.rotate(&mut s.q, nh * dqk, nh, dqk, self.nope, false);
        }
        s
    }

    /// RMSNorms of the latents (the query's only with a query LoRA).
    fn norm_latents(&self, w: &[f32], s: &mut MlaSaved, n: usize) {
        if let Some(qn) = &self.q_a_norm {
            s.qa_n = vec![0.0; n * self.q_lora];
            s.rstd_qa = vec![0.0; n];
            rmsnorm_forward(&mut s.qa_n, &mut s.rstd_qa, &s.qa, &w[qn.clone()], self.q_lora, self.eps);
        }
        s.ckv_n = vec![0.0; n * self.kv_lora];
        s.rstd_kv = vec![0.0; n];
        rmsnorm_forward(&mut s.ckv_n, &mut s.rstd_kv, &s.ckv, &w[self.kv_a_norm.clone()], self.kv_lora, self.eps);
    }

    /// The up-projections: `q` from the normed query latent (with a query LoRA), `k`, `v`
    /// from the normed KV latent and the rotary key, rotated.
    fn up_project(&self, w: &[f32], s: &mut MlaSaved, c: &Ctx) {
        let (n, nh, dqk) = (c.n(), self.nh, self.dqk());
        if let Some(qb) = &self.q_b {
            s.q = linear(&s.qa_n, &w[qb.clone()], n, self.q_lora, nh * dqk);
            c.rotate(&mut s.q, nh * dqk, nh, dqk, self.nope, false);
        }
        let kvw = nh * (self.nope + self.dv);
        let kv = linear(&s.ckv_n, &w[self.kv_b.clone()], n, self.kv_lora, kvw);
        s.k = vec![0.0; n * nh * dqk];
        s.v = vec![0.0; n * nh * self.dv];
        self.split_kv(&mut s.k, &mut s.v, &kv, &s.kpe);
        drop(kv);
        c.rotate(&mut s.k, nh * dqk, nh, dqk, self.nope, false);
    }

    /// `x: [N, H]` (normed) → `y: [N, H]`. The saved set keeps the rotary key; the
    /// caller frees it ([`MlaSaved::release_qkv`]) unless `q`, `k`, `v` are to be rebuilt.
    pub fn forward(&self, w: &[f32], x: &[f32], c: &Ctx) -> (Vec<f32>, MlaSaved) {
        let _p = ultramoe_kernels::profile::scope("attention.forward");
        let mut s = self.latents(w, x, c);
        self.norm_latents(w, &mut s, c.n());
        self.up_project(w, &mut s, c);
        (s.probs, s.o) = core_forward(&s.q, &s.k, &s.v, self.shape(c), c.mask(), self.scale, c.keep_probs);
        (linear(&s.o, &w[self.o.clone()], c.n(), self.nh * self.dv, self.hidden), s)
    }

    /// Rebuilds what the `norm` and `qkv` policies freed.
    pub fn restore(&self, w: &[f32], s: &mut MlaSaved, c: &Ctx) {
        if s.ckv_n.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.norm");
            self.norm_latents(w, s, c.n());
        }
        if s.k.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.qkv");
            self.up_project(w, s, c);
        }
    }

    /// Decoding forward of new rows `x: [N, H]` (normed) against each sequence's latent
    /// cache, which gains the rows' normed latents and rotated rotary keys: → `y: [N, H]`.
    ///
    /// The up-projections are absorbed (DeepSeek-V2 §2.1.2): with `W_kb_h` and `W_vb_h`
    /// head `h`'s key and value rows of `kv_b`, `q_nope_h · (W_kb_h c) = (W_kb_hᵀ q_nope_h) · c`
    /// and `Σ_j p_j W_vb_h c_j = W_vb_h Σ_j p_j c_j`, so every head attends over the
    /// shared cache rows `[c | k_pe]` with the query `[W_kb_hᵀ q_nope_h | q_pe_h]` (one
    /// key/value head of width `kv_lora + rope`, values the first `kv_lora`) and its
    /// output is lifted by `W_vb_h` afterwards. Neither keys nor values per head are formed.
    pub fn forward_cached(&self, dw: &DecodeWeights, x: &[f32], c: &CachedCtx, caches: &mut [&mut LayerKv]) -> Vec<f32> {
        let _p = ultramoe_kernels::profile::scope("attention.forward_cached");
        let (n, h, nh, dqk) = (c.positions.len(), self.hidden, self.nh, self.dqk());
        let (aw, qin, kvl, rd, nope, dv) = (self.a_width(), self.q_in(), self.kv_lora, self.rope_dim, self.nope, self.dv);
        let a = dw.linear(&self.a, x, n, h, aw);
        let qa = take_cols(&a, aw, 0, qin);
        let ckv = take_cols(&a, aw, qin, kvl);
        let mut kpe = take_cols(&a, aw, qin + kvl, rd);
        drop(a);
        let mut q = match (&self.q_a_norm, &self.q_b) {
            (Some(qn), Some(qb)) => {
                let mut qa_n = vec![0.0; n * qin];
                rmsnorm_forward(&mut qa_n, &mut vec![0.0; n], &qa, &dw.w[qn.clone()], qin, self.eps);
                dw.linear(qb, &qa_n, n, qin, nh * dqk)
            }
            _ => qa,
        };
        c.rope.apply_at(&mut q, nh * dqk, c.positions, nh, dqk, nope);
        let mut ckv_n = vec![0.0; n * kvl];
        rmsnorm_forward(&mut ckv_n, &mut vec![0.0; n], &ckv, &dw.w[self.kv_a_norm.clone()], kvl, self.eps);
        c.rope.apply_at(&mut kpe, rd, c.positions, 1, rd, 0);
        let dl = kvl + rd;
        let kv_b = &dw.w[self.kv_b.clone()];
        let parallel = n >= 32;
        // Absorbed queries `[N, nh, kv_lora + rope]`.
        let mut qlat = vec![0.0; n * nh * dl];
        // q_lat_h = q_nope_h · W_kb_h (W_kb_h: head h's nope rows of kv_b).
        per_head(nh, n, kvl, nope, &mut qlat, dl, nh * dl, &q, dqk, nh * dqk, kv_b, (nope + dv) * kvl, Strided::row_major(kvl, Op::N), parallel);
        for hh in 0..nh {
            for r in 0..n {
                let dst = r * nh * dl + hh * dl + kvl;
                qlat[dst..dst + rd].copy_from_slice(&q[r * nh * dqk + hh * dqk + nope..r * nh * dqk + (hh + 1) * dqk]);
            }
        }
        drop(q);
        let mut olat = vec![0.0; n * nh * kvl];
        for (span, cache) in c.spans.iter().zip(caches.iter_mut()) {
            let LayerKv::Mla { latent } = &mut **cache else { panic!("an MLA layer needs a latent cache") };
            assert_eq!(latent.len(), span.past * dl, "the cache holds the span's past");
            for r in span.rows() {
                latent.extend_from_slice(&ckv_n[r * kvl..(r + 1) * kvl]);
                latent.extend_from_slice(&kpe[r * rd..(r + 1) * rd]);
            }
        }
        let mut seqs = Vec::with_capacity(c.spans.len());
        for ((span, cache), out) in c.spans.iter().zip(caches.iter()).zip(span_rows(&mut olat, c.spans, nh * kvl)) {
            let LayerKv::Mla { latent } = &**cache else { unreachable!("checked above") };
            let shape = KvShape { n: span.n, past: span.past, nh, nkv: 1, dqk: dl, dv: kvl, k_stride: dl, v_stride: dl };
            let rows = span.rows();
            seqs.push(KvSeq { out, q: &qlat[rows.start * nh * dl..rows.end * nh * dl], k: latent, v: latent, shape });
        }
        kv_attention_forward_many(&mut seqs, self.scale);
        drop(seqs);
        // o_h = o_lat_h · W_vb_hᵀ (W_vb_h: head h's dv rows of kv_b after its nope rows).
        let mut o = vec![0.0; n * nh * dv];
        per_head(nh, n, dv, kvl, &mut o, dv, nh * dv, &olat, kvl, nh * kvl, &kv_b[nope * kvl..], (nope + dv) * kvl, Strided::row_major(kvl, Op::T), parallel);
        dw.linear(&self.o, &o, n, nh * dv, h)
    }

    /// Backward: accumulates weight gradients into `g`, returns `dx: [N, H]`.
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], s: &MlaSaved, dy: &[f32], c: &Ctx) -> Vec<f32> {
        let _p = ultramoe_kernels::profile::scope("attention.backward");
        let (n, h, nh, dqk) = (c.n(), self.hidden, self.nh, self.dqk());
        let (aw, qin) = (self.a_width(), self.q_in());
        let d_o = linear_grad(&mut g[self.o.clone()], dy, &s.o, &w[self.o.clone()], n, nh * self.dv, h);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * nh * dqk], vec![0.0; n * nh * dqk], vec![0.0; n * nh * self.dv]);
        core_backward(&mut dq, &mut dk, &mut dv, &d_o, &s.q, &s.k, &s.v, &s.probs, self.shape(c), c.mask(), self.scale);
        drop(d_o);
        c.rotate(&mut dq, nh * dqk, nh, dqk, self.nope, true);
        c.rotate(&mut dk, nh * dqk, nh, dqk, self.nope, true);
        let mut da = vec![0.0; n * aw];
        // Key/value path: gather per-head gradients back into the kv_b output layout, and
        // sum the rotary-key gradient over heads (one k_pe feeds them all).
        let kvw = nh * (self.nope + self.dv);
        let mut dkv = vec![0.0; n * kvw];
        let mut dkpe = vec![0.0; n * self.rope_dim];
        self.merge_kv_grad(&mut dkv, &mut dkpe, &dk, &dv);
        let dckv_n = linear_grad(&mut g[self.kv_b.clone()], &dkv, &s.ckv_n, &w[self.kv_b.clone()], n, self.kv_lora, kvw);
        let mut dckv = vec![0.0; n * self.kv_lora];
        rmsnorm_backward(&mut dckv, &mut g[self.kv_a_norm.clone()], &dckv_n, &s.ckv, &w[self.kv_a_norm.clone()], &s.rstd_kv, self.kv_lora, false);
        put_cols(&mut da, aw, qin, &dckv, self.kv_lora);
        put_cols(&mut da, aw, qin + self.kv_lora, &dkpe, self.rope_dim);
        // Query path.
        match (&self.q_a_norm, &self.q_b) {
            (Some(qn), Some(qb)) => {
                let dqa_n = linear_grad(&mut g[qb.clone()], &dq, &s.qa_n, &w[qb.clone()], n, qin, nh * dqk);
                let mut dqa = vec![0.0; n * qin];
                rmsnorm_backward(&mut dqa, &mut g[qn.clone()], &dqa_n, &s.qa, &w[qn.clone()], &s.rstd_qa, qin, false);
                put_cols(&mut da, aw, 0, &dqa, qin);
            }
            _ => put_cols(&mut da, aw, 0, &dq, qin),
        }
        linear_grad(&mut g[self.a.clone()], &da, x, &w[self.a.clone()], n, h, aw)
    }
}
