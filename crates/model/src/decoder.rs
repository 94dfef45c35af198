//! A decoder layer: pre-norm attention and FFN with residuals, optionally with Pangu's
//! depth-scaled sandwich norm.
//!
//! Plain:    `h = x + Attn(N₁(x))`,           `y = h + FFN(N₂(h))`
//! Sandwich: `h = x + Nₐ(Attn(N₁(x)))`,       `y = h + N_f(FFN(N₂(h)))`
//! where `Nₐ`, `N_f` are extra RMSNorms whose gains start at `c/√L` (depth-scaled), so
//! each layer's contribution to the residual stream starts small and bounded.

use crate::attention::{CachedCtx, Ctx, GqaAttention, GqaSaved, MlaAttention, MlaSaved};
use crate::mlp::{Mlp, MlpSaved};
use crate::decode_weights::DecodeWeights;
use crate::kv_cache::LayerKv;
use crate::moe::layer::{MoeLayer, MoeSaved};
use crate::params::Slot;
use crate::policy::LayerPolicy;
use crate::tensor_ops::add_into;
use std::borrow::Cow;
use ultramoe_kernels::norm::{rmsnorm_backward, rmsnorm_forward};

/// The attention of a layer.
#[derive(Clone, Debug)]
pub enum AttnBlock {
    /// grouped-query attention
    Gqa(GqaAttention),
    /// multi-head latent attention
    Mla(MlaAttention),
}

/// The feed-forward of a layer.
#[derive(Clone, Debug)]
pub enum FfnBlock {
    /// dense SwiGLU
    Dense(Mlp),
    /// mixture of experts
    Moe(MoeLayer),
}

/// Saved attention activations.
pub enum AttnSaved {
    /// GQA
    Gqa(GqaSaved),
    /// MLA
    Mla(MlaSaved),
}

/// Saved feed-forward activations.
pub enum FfnSaved {
    /// dense
    Dense(MlpSaved),
    /// MoE
    Moe(MoeSaved),
    /// nothing: the block's forward reruns in backward (the `ffn` policy); a MoE block
    /// keeps its load statistics (per expert, per slot, auxiliary loss) for the caller
    Rerun(Option<(Vec<usize>, Vec<usize>, f32)>),
}

impl FfnSaved {
    /// (per expert, per slot, aux loss) of a MoE block.
    pub fn moe_stats(&self) -> Option<(Vec<usize>, Vec<usize>, f32)> {
        match self {
            FfnSaved::Moe(m) => Some((m.expert_counts(), m.slot_counts(), m.aux.as_ref().map_or(0.0, |a| a.loss))),
            FfnSaved::Rerun(stats) => stats.clone(),
            FfnSaved::Dense(_) => None,
        }
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// `input_layernorm`
    pub attn_norm: Slot,
    /// attention
    pub attn: AttnBlock,
    /// `post_attention_layernorm` (the pre-FFN norm in HF naming)
    pub ffn_norm: Slot,
    /// FFN
    pub ffn: FfnBlock,
    /// sandwich post-norms `[after attention, after FFN]`
    pub sandwich: Option<[Slot; 2]>,
    /// hidden `H`
    pub hidden: usize,
    /// norm epsilon
    pub eps: f32,
}

/// A normed tensor and what its RMSNorm saved.
#[derive(Default)]
struct Normed {
    input: Vec<f32>,
    rstd: Vec<f32>,
}

/// Saved activations of one layer.
pub struct LayerSaved {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    attn: AttnSaved,
    attn_post: Option<Normed>,
    h: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    /// FFN activations (MoE routing statistics live here)
    pub ffn: FfnSaved,
    ffn_post: Option<Normed>,
}

impl LayerSaved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let v = |x: &Vec<f32>| 4 * x.len();
        let nb = |n: &Option<Normed>| n.as_ref().map_or(0, |n| v(&n.input) + v(&n.rstd));
        v(&self.x)
            + v(&self.rstd1)
            + v(&self.xn1)
            + v(&self.h)
            + v(&self.rstd2)
            + v(&self.xn2)
            + nb(&self.attn_post)
            + nb(&self.ffn_post)
            + match &self.attn {
                AttnSaved::Gqa(s) => s.bytes(),
                AttnSaved::Mla(s) => s.bytes(),
            }
            + match &self.ffn {
                FfnSaved::Dense(s) => s.bytes(),
                FfnSaved::Moe(s) => s.bytes(),
                FfnSaved::Rerun(_) => 0,
            }
    }

    /// Frees what `p` rebuilds in backward (all but `full`, `swap` — the model's — and
    /// `attention`, whose probabilities the forward never keeps). The rotary key MLA
    /// keeps for `qkv` goes unless `qkv` is on.
    pub fn release(&mut self, p: &LayerPolicy) {
        if p.norm {
            (self.xn1, self.xn2) = Default::default();
            if let AttnSaved::Mla(a) = &mut self.attn {
                a.release_norm();
            }
        }
        if p.ffn {
            self.ffn = FfnSaved::Rerun(self.ffn.moe_stats());
        }
        match &mut self.ffn {
            FfnSaved::Moe(m) if p.experts => m.release_rows(),
            _ => {}
        }
        if p.swiglu {
            match &mut self.ffn {
                FfnSaved::Dense(m) => m.act = Vec::new(),
                FfnSaved::Moe(m) => m.release_act(),
                FfnSaved::Rerun(_) => {}
            }
        }
        match &mut self.attn {
            AttnSaved::Gqa(a) if p.qkv => a.release_qkv(),
            AttnSaved::Gqa(_) => {}
            AttnSaved::Mla(a) => a.release_qkv(p.qkv),
        }
    }

    /// Every buffer, in a fixed order: what a swap writes out and reads back.
    pub fn buffers_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![&mut self.x, &mut self.rstd1, &mut self.xn1, &mut self.h, &mut self.rstd2, &mut self.xn2];
        for n in [&mut self.attn_post, &mut self.ffn_post].into_iter().flatten() {
            out.extend([&mut n.input, &mut n.rstd]);
        }
        match &mut self.attn {
            AttnSaved::Gqa(a) => out.extend(a.buffers_mut()),
            AttnSaved::Mla(a) => out.extend(a.buffers_mut()),
        }
        match &mut self.ffn {
            FfnSaved::Dense(m) => out.extend(m.buffers_mut()),
            FfnSaved::Moe(m) => out.extend(m.buffers_mut()),
            FfnSaved::Rerun(_) => {}
        }
        out
    }

    /// Moves every buffer out (for the swap file), leaving them empty.
    pub fn take_buffers(&mut self) -> Vec<Vec<f32>> {
        self.buffers_mut().into_iter().map(std::mem::take).collect()
    }

    /// Puts back what [`Self::take_buffers`] took, in the same order.
    pub fn put_buffers(&mut self, bufs: Vec<Vec<f32>>) {
        let slots = self.buffers_mut();
        assert_eq!(slots.len(), bufs.len(), "swapped buffers do not match the layer");
        for (slot, b) in slots.into_iter().zip(bufs) {
            *slot = b;
        }
    }
}

impl DecoderLayer {
    fn norm(&self, w: &[f32], gain: &Slot, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0.0; x.len()];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&mut y, &mut rstd, x, &w[gain.clone()], self.hidden, self.eps);
        (y, rstd)
    }

    /// Applies a sandwich post-norm in place when the layer has one, keeping its input for
    /// the backward ([`Self::post_norm_backward`]).
    fn post_norm(&self, w: &[f32], gain: Option<&Slot>, out: &mut Vec<f32>, n: usize) -> Option<Normed> {
        gain.map(|gain| {
            let (y, rstd) = self.norm(w, gain, out, n);
            Normed { input: std::mem::replace(out, y), rstd }
        })
    }

    /// `x: [N, H]` → `y: [N, H]` (under sequence parallelism this rank's `N/TP` rows of
    /// each).
    pub fn forward(&self, w: &[f32], x: Vec<f32>, c: &Ctx) -> (Vec<f32>, LayerSaved) {
        let n = c.rows();
        let (xn1, rstd1) = self.norm(w, &self.attn_norm, &x, n);
        // The split attention reads every row (gathered under sequence parallelism).
        let xn1 = match c.tp {
            Some(tp) => tp.rows_whole(xn1),
            None => xn1,
        };
        let (a, attn) = match &self.attn {
            AttnBlock::Gqa(m) => {
                let (y, s) = m.forward(w, &xn1, c);
                (y, AttnSaved::Gqa(s))
            }
            AttnBlock::Mla(m) => {
                let (y, s) = m.forward(w, &xn1, c);
                (y, AttnSaved::Mla(s))
            }
        };
        // Row-parallel output projection: each tensor-parallel rank holds its heads' part.
        let mut a = match c.tp {
            Some(tp) => tp.sum_partial(a),
            None => a,
        };
        let attn_post = self.post_norm(w, self.sandwich.as_ref().map(|[sa, _]| sa), &mut a, n);
        let mut h = a;
        add_into(&mut h, &x);
        let (xn2, rstd2) = self.norm(w, &self.ffn_norm, &h, n);
        let xn2 = self.ffn_input(xn2, c);
        let (f, ffn) = self.ffn_forward(w, &xn2, c);
        let mut f = match (c.tp, &self.ffn) {
            (Some(tp), FfnBlock::Dense(_)) => tp.sum_partial(f),
            _ => f,
        };
        let ffn_post = self.post_norm(w, self.sandwich.as_ref().map(|[_, sf]| sf), &mut f, n);
        let mut y = f;
        add_into(&mut y, &h);
        (y, LayerSaved { x, rstd1, xn1, attn, attn_post, h, rstd2, xn2, ffn, ffn_post })
    }

    /// Decoding forward of new rows `x: [N, H]`, each sequence's rows attending to its
    /// cache (which gains them); nothing is kept for a backward. The FFN runs on all
    /// rows together, as in training.
    pub fn forward_cached(&self, dw: &DecodeWeights, x: Vec<f32>, c: &CachedCtx, caches: &mut [&mut LayerKv]) -> Vec<f32> {
        let (n, w) = (c.positions.len(), &dw.w[..]);
        let (xn1, _) = self.norm(w, &self.attn_norm, &x, n);
        let mut a = match &self.attn {
            AttnBlock::Gqa(m) => m.forward_cached(dw, &xn1, c, caches),
            AttnBlock::Mla(m) => m.forward_cached(dw, &xn1, c, caches),
        };
        drop(xn1);
        self.post_norm(w, self.sandwich.as_ref().map(|[sa, _]| sa), &mut a, n);
        let mut h = a;
        add_into(&mut h, &x);
        drop(x);
        let (xn2, _) = self.norm(w, &self.ffn_norm, &h, n);
        let mut f = match &self.ffn {
            FfnBlock::Dense(m) => m.forward_infer(dw, &xn2, n),
            FfnBlock::Moe(m) => m.forward_infer(dw, &xn2, n, &c.moe),
        };
        self.post_norm(w, self.sandwich.as_ref().map(|[_, sf]| sf), &mut f, n);
        let mut y = f;
        add_into(&mut y, &h);
        y
    }

    /// The FFN block's input from this rank's normed rows: a split dense FFN reads every
    /// row (gathered under sequence parallelism); a MoE block runs on the rows held.
    fn ffn_input(&self, xn2: Vec<f32>, c: &Ctx) -> Vec<f32> {
        match (c.tp, &self.ffn) {
            (Some(tp), FfnBlock::Dense(_)) => tp.rows_whole(xn2),
            _ => xn2,
        }
    }

    /// The FFN block's forward: its output and saved set.
    fn ffn_forward(&self, w: &[f32], xn2: &[f32], c: &Ctx) -> (Vec<f32>, FfnSaved) {
        let n = xn2.len() / self.hidden;
        match &self.ffn {
            FfnBlock::Dense(m) => {
                let (y, s) = m.forward(w, xn2, n);
                (y, FfnSaved::Dense(s))
            }
            FfnBlock::Moe(m) => {
                let (y, s) = m.forward(w, xn2, n, &c.moe);
                (y, FfnSaved::Moe(s))
            }
        }
    }

    /// Rebuilds what [`LayerSaved::release`] freed for the FFN's backward (`xn₂`, the
    /// block's set or the SwiGLU outputs and routed rows), with the forward's own kernels
    /// on the same inputs (so the same bits).
    fn restore_ffn(&self, w: &[f32], s: &mut LayerSaved, c: &Ctx) {
        if s.xn2.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.norm");
            let (xn2, rstd2) = self.norm(w, &self.ffn_norm, &s.h, c.rows());
            (s.xn2, s.rstd2) = (self.ffn_input(xn2, c), rstd2);
        }
        if let FfnSaved::Rerun(_) = s.ffn {
            let _p = ultramoe_kernels::profile::scope("recompute.ffn");
            s.ffn = self.ffn_forward(w, &s.xn2, c).1;
        }
        match (&self.ffn, &mut s.ffn) {
            (FfnBlock::Dense(m), FfnSaved::Dense(ms)) => m.restore_act(ms),
            (FfnBlock::Moe(m), FfnSaved::Moe(ms)) => m.restore(w, &s.xn2, ms),
            _ => unreachable!("saved FFN activations do not match the layer"),
        }
    }

    /// Rebuilds what [`LayerSaved::release`] freed for the attention's backward: `xn₁`,
    /// then q/k/v (the attention probabilities are the core backward's own business).
    fn restore_attention(&self, w: &[f32], s: &mut LayerSaved, c: &Ctx) {
        if s.xn1.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.norm");
            let (xn1, rstd1) = self.norm(w, &self.attn_norm, &s.x, c.rows());
            s.xn1 = match c.tp {
                Some(tp) => tp.rows_whole(xn1),
                None => xn1,
            };
            s.rstd1 = rstd1;
        }
        match (&self.attn, &mut s.attn) {
            (AttnBlock::Gqa(m), AttnSaved::Gqa(ms)) => m.restore(w, &s.xn1, ms, c),
            (AttnBlock::Mla(m), AttnSaved::Mla(ms)) => m.restore(w, ms, c),
            _ => unreachable!("saved attention activations do not match the layer"),
        }
    }

    /// Backward through a sandwich post-norm when the layer has one; without it the
    /// gradient passes through unchanged (borrowed, not copied).
    fn post_norm_backward<'a>(&self, w: &[f32], g: &mut [f32], gain: Option<&Slot>, saved: Option<&Normed>, dy: &'a [f32]) -> Cow<'a, [f32]> {
        match (gain, saved) {
            (Some(gain), Some(p)) => {
                let mut d = vec![0.0; dy.len()];
                rmsnorm_backward(&mut d, &mut g[gain.clone()], dy, &p.input, &w[gain.clone()], &p.rstd, self.hidden, false);
                Cow::Owned(d)
            }
            _ => Cow::Borrowed(dy),
        }
    }

    /// Backward from `dy: [N, H]`; weight gradients into `g`; returns `dx: [N, H]`.
    /// Consumes the saved set: what a policy freed is rebuilt block by block (the FFN's
    /// just before its backward, the attention's after the FFN's set is dropped), so the
    /// layer never holds both blocks' rebuilt parts at once.
    pub fn backward(&self, w: &[f32], g: &mut [f32], mut s: LayerSaved, dy: Vec<f32>, c: &Ctx) -> Vec<f32> {
        let hd = self.hidden;
        self.restore_ffn(w, &mut s, c);
        // y = h + post(f): the residual passes dy to h unchanged.
        let df = self.post_norm_backward(w, g, self.sandwich.as_ref().map(|[_, sf]| sf), s.ffn_post.as_ref(), &dy);
        // (the block's input rows: every row for a split dense FFN)
        let n = s.xn2.len() / hd;
        let dxn2 = match (&self.ffn, &s.ffn) {
            (FfnBlock::Dense(m), FfnSaved::Dense(ms)) => {
                let df = match c.tp {
                    Some(tp) => tp.rows_whole_ref(&df),
                    None => Cow::Borrowed(&df[..]),
                };
                let mut dx = vec![0.0; n * hd];
                m.backward(w, g, &s.xn2, ms, &df, &mut dx, n, false);
                match c.tp {
                    Some(tp) => tp.sum_partial(dx),
                    None => dx,
                }
            }
            (FfnBlock::Moe(m), FfnSaved::Moe(ms)) => m.backward(w, g, &s.xn2, ms, &df, n, &c.moe),
            _ => unreachable!("saved FFN activations do not match the layer"),
        };
        // The FFN's saved set is done with.
        s.ffn = FfnSaved::Dense(MlpSaved::default());
        s.xn2 = Vec::new();
        s.ffn_post = None;
        let mut dh = dy;
        rmsnorm_backward(&mut dh, &mut g[self.ffn_norm.clone()], &dxn2, &s.h, &w[self.ffn_norm.clone()], &s.rstd2, hd, true);
        drop(dxn2);
        self.restore_attention(w, &mut s, c);
        let da = self.post_norm_backward(w, g, self.sandwich.as_ref().map(|[sa, _]| sa), s.attn_post.as_ref(), &dh);
        // (every row for the split attention: gathered under sequence parallelism)
        let da_rows = match c.tp {
            Some(tp) => tp.rows_whole_ref(&da),
            None => Cow::Borrowed(&da[..]),
        };
        let dxn1 = match (&self.attn, &s.attn) {
            (AttnBlock::Gqa(m), AttnSaved::Gqa(ms)) => m.backward(w, g, &s.xn1, ms, &da_rows, c),
            (AttnBlock::Mla(m), AttnSaved::Mla(ms)) => m.backward(w, g, &s.xn1, ms, &da_rows, c),
            _ => unreachable!("saved attention activations do not match the layer"),
        };
        drop(da_rows);
        drop(da);
        let dxn1 = match c.tp {
            Some(tp) => tp.sum_partial(dxn1),
            None => dxn1,
        };
        let mut dx = dh;
        rmsnorm_backward(&mut dx, &mut g[self.attn_norm.clone()], &dxn1, &s.x, &w[self.attn_norm.clone()], &s.rstd1, hd, true);
        dx
    }
}
