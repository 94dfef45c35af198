//! The MoE layer: `y = Σ_k w_k · Expert_{e_k}(x) + SharedExperts(x)`.
//!
//! Under expert parallelism the tokens are split into `chunks` contiguous pieces and the
//! layer is a small pipeline, so every all-to-all runs while something else computes:
//!
//! ```text
//! forward:   start dispatch(0..C) · shared(chunk 0)        ← hides dispatch 0
//!            for c: finish dispatch c · experts(c) · start combine c
//!                                                        ← experts(c) hides dispatch c+1
//!                                                          and combine c−1
//!            shared(chunks 1..C)                          ← hides the last combine
//!            finish combines
//! backward:  the mirror image (combine-backward exchanges first, expert backward per
//!            chunk, the shared expert's backward at both ends)
//! ```
//!
//! Chunking changes only the order of sums inside each expert's weight gradient; on one
//! rank (`chunks = 1`, nothing to exchange) the layer runs straight through.

use super::dispatcher::{Combining, DispatchHandle, ExpertExchange, TokenDispatcher};
use super::experts::{backward_piece_rows, row_pieces, ExpertsSaved, GroupedExperts};
use super::placement::Placement;
use super::router::{AuxLoss, Router};
use crate::mlp::{Mlp, MlpSaved};
use std::ops::Range;
use std::sync::Arc;
use ultramoe_kernels::balance::BalanceLoss;
use ultramoe_kernels::permute::{permute_backward_rows, unpermute_backward_rows};
use ultramoe_kernels::router::Routing;

/// How a MoE layer runs in one pass (see [`crate::pass::PassOptions`]).
#[derive(Clone, Copy, Debug)]
pub struct MoeCtx<'a> {
    /// the expert-parallel exchange (`None`: this rank holds every expert)
    pub exchange: Option<&'a ExpertExchange>,
    /// token chunks pipelined against the all-to-all (1: no overlap)
    pub chunks: usize,
    /// auxiliary balancing loss and its coefficient
    pub balance_loss: Option<(BalanceLoss, f32)>,
    /// skewed-load workload's Zipf exponent (0 = off)
    pub skew: f32,
    /// the tensor-parallel group the shared experts are split over (their partial
    /// outputs and input gradients summed over it); the router and routed experts run
    /// whole on every rank of it
    pub tp: Option<&'a crate::tensor_parallel::TensorParallel>,
    /// the tensor-parallel group whose ranks share the batch's tokens (sequence
    /// parallelism): the balancing loss weighs this rank's tokens by the whole batch's
    /// loads
    pub batch: Option<&'a crate::tensor_parallel::TensorParallel>,
    /// pieces the one-rank backward works through the routed rows in (1: all at once;
    /// see [`super::experts::BACKWARD_PIECES`])
    pub backward_pieces: usize,
}

impl MoeCtx<'_> {
    /// One rank, no balancing loss, no skew.
    pub fn local() -> MoeCtx<'static> {
        MoeCtx { exchange: None, chunks: 1, balance_loss: None, skew: 0.0, tp: None, batch: None, backward_pieces: 1 }
    }
}

/// One MoE feed-forward block.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    /// gating
    pub router: Router,
    /// token movement
    pub dispatcher: TokenDispatcher,
    /// routed experts
    pub experts: GroupedExperts,
    /// shared experts, fused into one MLP (DeepSeek)
    pub shared: Option<Mlp>,
    /// which expert each slot of each expert-parallel rank holds
    pub placement: Placement,
}

/// One chunk's saved activations.
struct Part {
    /// the chunk's tokens
    tokens: Range<usize>,
    handle: DispatchHandle,
    /// rows this rank's experts computed on
    xp: Vec<f32>,
    experts: ExpertsSaved,
    /// what the combine's backward needs: expert outputs for the chunk's tokens in plan
    /// order (flat), or the forwarder's per-expert outputs (hierarchical)
    ys: Arc<Vec<f32>>,
    shared: Option<MlpSaved>,
}

/// Saved activations of [`MoeLayer::forward`].
pub struct MoeSaved {
    /// routing decisions (also the per-expert load statistics)
    pub routing: Routing,
    /// auxiliary balancing loss, when configured
    pub aux: Option<AuxLoss>,
    parts: Vec<Part>,
    n_experts: usize,
    /// one rank, one chunk: the routed rows are a permutation of the input and the
    /// outputs come straight from the experts, so both can be rebuilt locally
    local: bool,
}

impl MoeSaved {
    /// Tokens each logical expert received (from this rank).
    pub fn expert_counts(&self) -> Vec<usize> {
        let mut out = vec![0; self.n_experts];
        self.routing.experts.iter().for_each(|&e| out[e as usize] += 1);
        out
    }

    /// Tokens each expert slot received (from this rank): what each rank computes on.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut out = vec![0; self.parts[0].handle.plan.offsets.len() - 1];
        for p in &self.parts {
            out.iter_mut().zip(p.handle.plan.counts()).for_each(|(a, c)| *a += c);
        }
        out
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let parts: usize = self
            .parts
            .iter()
            .map(|p| {
                4 * (2 * p.handle.plan.rows() + p.xp.len() + p.experts.gu.len() + p.experts.act.len() + p.ys.len())
                    + p.shared.as_ref().map_or(0, |s| s.bytes())
            })
            .sum();
        4 * (self.routing.scores.len() + self.routing.weights.len() + self.routing.experts.len()) + parts
    }

    /// Frees the routed rows and the expert outputs when they can be rebuilt locally
    /// (the `experts` policy; under expert parallelism they stay).
    pub fn release_rows(&mut self) {
        if self.local {
            for p in &mut self.parts {
                p.xp = Vec::new();
                p.ys = Arc::default();
            }
        }
    }

    /// Frees the SwiGLU outputs of the routed and shared experts (the `swiglu` policy).
    pub fn release_act(&mut self) {
        for p in &mut self.parts {
            p.experts.act = Vec::new();
            if let Some(s) = &mut p.shared {
                s.act = Vec::new();
            }
        }
    }

    /// The row buffers, for swapping (the routing and the dispatch plans stay).
    pub fn buffers_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![];
        for p in &mut self.parts {
            out.push(&mut p.xp);
            out.push(&mut p.experts.gu);
            out.push(&mut p.experts.act);
            out.push(Arc::get_mut(&mut p.ys).expect("combine outputs are not shared once the forward is done"));
            if let Some(s) = &mut p.shared {
                out.extend(s.buffers_mut());
            }
        }
        out
    }
}

/// `n` tokens in `c` contiguous, nearly equal chunks (none empty unless `n` is 0).
fn chunk_ranges(n: usize, c: usize) -> Vec<Range<usize>> {
    let c = c.clamp(1, n.max(1));
    (0..c).map(|i| i * n / c..(i + 1) * n / c).collect()
}

impl MoeLayer {
    /// `x: [N, H]` (normed) → `y: [N, H]`.
    pub fn forward(&self, w: &[f32], x: &[f32], n: usize, c: &MoeCtx) -> (Vec<f32>, MoeSaved) {
        let (k, h) = (self.router.spec.top_k, self.dispatcher.hidden);
        let d = self.dispatcher.over(c.exchange);
        let (routing, aux) = {
            let _p = ultramoe_kernels::profile::scope("moe.router.forward");
            self.router.forward(w, x, n, c.balance_loss, c.skew, c.batch)
        };
        // Choices of logical experts → slots (a replicated expert's tokens shared out).
        let slots = match d.exchanges() {
            true if !self.placement.is_identity() => Some(self.placement.route(&routing.experts)),
            _ => None,
        };
        let targets = slots.as_deref().unwrap_or(&routing.experts);
        let ranges = chunk_ranges(n, if d.exchanges() { c.chunks } else { 1 });
        let rows = |r: &Range<usize>| r.start * h..r.end * h;
        let choices = |r: &Range<usize>| r.start * k..r.end * k;
        let shared = |r: &Range<usize>| self.shared.as_ref().map(|m| m.forward(w, &x[rows(r)], r.len()));
        let mut dispatching: Vec<_> = {
            let _p = ultramoe_kernels::profile::scope("moe.dispatch.forward");
            ranges
                .iter()
                .map(|r| Some(d.start_dispatch(&x[rows(r)], &targets[choices(r)], &routing.weights[choices(r)], k)))
                .collect()
        };
        let mut shared_out = vec![shared(&ranges[0])];
        let mut parts = Vec::with_capacity(ranges.len());
        let mut returning: Vec<Combining> = Vec::with_capacity(ranges.len());
        for (c, r) in ranges.iter().enumerate() {
            let (xp, handle) = {
                let _p = ultramoe_kernels::profile::scope("moe.dispatch.forward");
                d.finish_dispatch(dispatching[c].take().expect("each chunk dispatched once"))
            };
            let (yp, experts) = {
                let _p = ultramoe_kernels::profile::scope("moe.experts.forward");
                self.experts.forward(w, &xp, &handle.offsets)
            };
            returning.push(d.start_combine(yp, &handle));
            parts.push(Part { tokens: r.clone(), handle, xp, experts, ys: Arc::default(), shared: None });
        }
        shared_out.extend(ranges[1..].iter().map(shared));
        let mut y = vec![0.0; x.len()];
        let _p = ultramoe_kernels::profile::scope("moe.combine.forward");
        for ((part, ticket), sh) in parts.iter_mut().zip(returning).zip(shared_out) {
            let out = &mut y[rows(&part.tokens)];
            part.ys = Arc::new(d.finish_combine(ticket, &part.handle, out, &routing.weights[choices(&part.tokens)]));
            if let Some((mut ys, saved)) = sh {
                if let Some(tp) = c.tp {
                    tp.sum_in_pass(&mut ys);
                }
                crate::tensor_ops::add_into(out, &ys);
                part.shared = Some(saved);
            }
        }
        let local = !d.exchanges() && parts.len() == 1;
        (y, MoeSaved { routing, aux, parts, n_experts: self.placement.n_experts(), local })
    }

    /// Inference forward through decoding weights (nothing kept): `x: [N, H]` (normed) →
    /// `y: [N, H]`. Under expert parallelism every rank of the group calls it together
    /// (with its own rows, possibly none): the dispatcher exchanges the rows.
    pub fn forward_infer(&self, dw: &crate::decode_weights::DecodeWeights, x: &[f32], n: usize, c: &MoeCtx) -> Vec<f32> {
        let k = self.router.spec.top_k;
        let d = self.dispatcher.over(c.exchange);
        let routing = {
            let _p = ultramoe_kernels::profile::scope("decode.moe.router");
            self.router.forward_infer(&dw.w, x, n)
        };
        let slots = match d.exchanges() {
            true if !self.placement.is_identity() => Some(self.placement.route(&routing.experts)),
            _ => None,
        };
        let targets = slots.as_deref().unwrap_or(&routing.experts);
        let dispatching = d.start_dispatch(x, targets, &routing.weights, k);
        let shared = {
            let _p = ultramoe_kernels::profile::scope("decode.moe.shared");
            self.shared.as_ref().map(|m| m.forward_infer(dw, x, n))
        };
        let (xp, handle) = d.finish_dispatch(dispatching);
        let yp = {
            let _p = ultramoe_kernels::profile::scope("decode.moe.experts");
            self.experts.forward_infer(dw, &xp, &handle.offsets)
        };
        let returning = d.start_combine(yp, &handle);
        let mut y = vec![0.0; x.len()];
        d.finish_combine(returning, &handle, &mut y, &routing.weights);
        if let Some(ys) = shared {
            crate::tensor_ops::add_into(&mut y, &ys);
        }
        y
    }

    /// Rebuilds what [`MoeSaved::release_act`] and [`MoeSaved::release_rows`] freed
    /// (`x`: the layer's input): the SwiGLU outputs, then the routed rows (the same
    /// permutation) and the expert outputs (the same down-projection).
    pub fn restore(&self, w: &[f32], x: &[f32], s: &mut MoeSaved) {
        for p in &mut s.parts {
            self.experts.restore_act(&mut p.experts);
            if let (Some(m), Some(ms)) = (&self.shared, &mut p.shared) {
                m.restore_act(ms);
            }
            // (under expert parallelism an empty `xp` only means no rows came here)
            if s.local && p.xp.is_empty() && p.handle.plan.rows() > 0 {
                let _p = ultramoe_kernels::profile::scope("recompute.experts");
                p.xp = vec![0.0; p.handle.plan.rows() * self.dispatcher.hidden];
                ultramoe_kernels::permute::permute_forward(&mut p.xp, x, &p.handle.plan, self.dispatcher.hidden);
                p.ys = Arc::new(self.experts.down(w, &p.experts.act, &p.handle.offsets));
            }
        }
    }

    /// Backward: weight gradients into `g`; returns `dx: [N, H]`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], s: &MoeSaved, dy: &[f32], n: usize, c: &MoeCtx) -> Vec<f32> {
        if s.local {
            return self.backward_local(w, g, x, s, dy, n, c);
        }
        let (k, h) = (self.router.spec.top_k, self.dispatcher.hidden);
        let d = self.dispatcher.over(c.exchange);
        let rows = |r: &Range<usize>| r.start * h..r.end * h;
        let choices = |r: &Range<usize>| r.start * k..r.end * k;
        let mut dweights = vec![0.0; n * k];
        let mut to_experts = Vec::with_capacity(s.parts.len());
        {
            let _p = ultramoe_kernels::profile::scope("moe.combine.backward");
            for p in &s.parts {
                let weights = &s.routing.weights[choices(&p.tokens)];
                to_experts.push(d.start_combine_backward(&dy[rows(&p.tokens)], &p.ys, weights, &p.handle));
            }
        }
        let mut dx = vec![0.0; x.len()];
        // Split shared experts give each tensor-parallel rank a partial input gradient:
        // it is kept apart, summed over the group and then added.
        let mut shared_dx = if c.tp.is_some() && self.shared.is_some() { vec![0.0; x.len()] } else { Vec::new() };
        let shared_backward = |p: &Part, g: &mut [f32], dx: &mut [f32], shared_dx: &mut [f32]| {
            if let (Some(m), Some(ms)) = (&self.shared, &p.shared) {
                let into = if shared_dx.is_empty() { dx } else { shared_dx };
                m.backward(w, g, &x[rows(&p.tokens)], ms, &dy[rows(&p.tokens)], &mut into[rows(&p.tokens)], p.tokens.len(), true);
            }
        };
        shared_backward(&s.parts[0], g, &mut dx, &mut shared_dx);
        let mut returning = Vec::with_capacity(s.parts.len());
        for (p, t) in s.parts.iter().zip(to_experts) {
            let dyp = d.finish_combine_backward(t, &p.handle, &mut dweights[choices(&p.tokens)]);
            // The input gradients first, so they travel back while the weight gradients
            // (half the experts' backward) are computed.
            let _p = ultramoe_kernels::profile::scope("moe.experts.backward");
            let slots = 0..p.handle.offsets.len() - 1;
            let (dxp, dgu) = self.experts.backward_input(w, &p.experts.gu, &dyp, slots.clone(), &p.handle.offsets);
            returning.push(d.start_dispatch_backward(dxp, &p.handle));
            self.experts.backward_weights(g, &p.xp, &p.experts.act, &dyp, &dgu, slots, &p.handle.offsets);
        }
        for p in &s.parts[1..] {
            shared_backward(p, g, &mut dx, &mut shared_dx);
        }
        if let Some(tp) = c.tp.filter(|_| !shared_dx.is_empty()) {
            tp.sum_in_pass(&mut shared_dx);
            crate::tensor_ops::add_into(&mut dx, &shared_dx);
        }
        {
            let _p = ultramoe_kernels::profile::scope("moe.dispatch.backward");
            for (p, t) in s.parts.iter().zip(returning) {
                d.finish_dispatch_backward(t, &p.handle, &mut dx[rows(&p.tokens)]);
            }
        }
        let _p = ultramoe_kernels::profile::scope("moe.router.backward");
        self.router.backward(w, g, x, &s.routing, s.aux.as_ref(), &dweights, &mut dx, n);
        dx
    }

    /// The backward on one rank (one chunk, nothing to exchange): the shared experts,
    /// then the routed rows a piece at a time ([`row_pieces`], at most `⌈R/P⌉` rows
    /// each for `P = c.backward_pieces`) — combine backward, the experts' input half,
    /// the piece's rows added into `dx`, the weight half — so the experts' temporaries
    /// are held for a piece, not for all `R` rows. Each row's gradient is the one the
    /// whole buffers give; `dx` adds each token's rows in ascending order either way.
    #[allow(clippy::too_many_arguments)]
    fn backward_local(&self, w: &[f32], g: &mut [f32], x: &[f32], s: &MoeSaved, dy: &[f32], n: usize, c: &MoeCtx) -> Vec<f32> {
        let (k, h, i) = (self.router.spec.top_k, self.dispatcher.hidden, self.experts.inter);
        let p = &s.parts[0];
        let plan = &p.handle.plan;
        let mut dx = vec![0.0; x.len()];
        if let (Some(m), Some(ms)) = (&self.shared, &p.shared) {
            // Split shared experts give each tensor-parallel rank a partial input
            // gradient: summed over the group before it joins `dx`.
            match c.tp {
                Some(tp) => {
                    let mut shared_dx = vec![0.0; x.len()];
                    m.backward(w, g, x, ms, dy, &mut shared_dx, n, true);
                    tp.sum_in_pass(&mut shared_dx);
                    crate::tensor_ops::add_into(&mut dx, &shared_dx);
                }
                None => m.backward(w, g, x, ms, dy, &mut dx, n, true),
            }
        }
        let mut dweights = vec![0.0; n * k];
        for piece in row_pieces(&p.handle.offsets, backward_piece_rows(plan.rows(), c.backward_pieces)) {
            let (rows_h, rows_i) = (piece.rows.start * h..piece.rows.end * h, piece.rows.start * i..piece.rows.end * i);
            let mut dyp = vec![0.0; rows_h.len()];
            {
                let _p = ultramoe_kernels::profile::scope("moe.combine.backward");
                unpermute_backward_rows(&mut dyp, &mut dweights, dy, &p.ys[rows_h.clone()], &s.routing.weights, plan, h, piece.rows.clone());
            }
            let _p = ultramoe_kernels::profile::scope("moe.experts.backward");
            let gu = &p.experts.gu[2 * rows_i.start..2 * rows_i.end];
            let (dxp, dgu) = self.experts.backward_input(w, gu, &dyp, piece.slots.clone(), &piece.offsets);
            permute_backward_rows(&mut dx, &dxp, plan, h, piece.rows.clone());
            drop(dxp);
            self.experts.backward_weights(g, &p.xp[rows_h], &p.experts.act[rows_i], &dyp, &dgu, piece.slots, &piece.offsets);
        }
        let _p = ultramoe_kernels::profile::scope("moe.router.backward");
        self.router.backward(w, g, x, &s.routing, s.aux.as_ref(), &dweights, &mut dx, n);
        dx
    }
}
