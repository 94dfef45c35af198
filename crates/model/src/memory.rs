//! What a training step holds in memory, predicted from the model's shapes before it
//! runs, each part attributed to an owner (layer and kind).
//!
//! Static: weights, gradients and optimizer moments (`4·P` bytes each per float kept).
//! Saved activations: exactly the buffers each layer's forward keeps for its backward
//! (one rank; dropless routing sends every token to `K` experts, so the routed rows are
//! `R = N·K` whatever the routing):
//!
//! ```text
//! decoder   x, xn₁, h, xn₂: 4·N·H      rstd₁, rstd₂: 2·N      sandwich norms: 2·(N·H + N)
//! GQA       q, o: N·nh·d   k, v: N·nkv·d   probs: B·nh·T²   (+ q/k norms: raw copies, N·(nh+nkv) rstd)
//! MLA       q_a, q_a normed: 2·N·q_lora (+N)   c_kv, normed: 2·N·kv_lora (+N)
//!           q, k: N·nh·d_qk   v, o: N·nh·d_v   probs: B·nh·T²
//! dense     gate/up N·2I, activation N·I
//! MoE       scores N·E, weights and choices 2·N·K, plan 2·R, inputs R·H, gate/up R·2I,
//!           activation R·I, outputs R·H, shared experts as dense
//! head      final x, normed x: 2·N·H, rstd N, logits N·V
//! ```
//!
//! A layer recomputed in backward ([`Model::recompute`]) keeps only its input `N·H`; its
//! whole set returns while its backward runs.
//!
//! The peak comes either at the end of the forward pass (everything saved, logits
//! included) or early in the backward pass, when the logits have been consumed and the
//! top layer's backward works (a recomputed layer's rebuilt set included): its input
//! gradient, the residual gradient and the
//! largest block's temporaries (MoE: `R·(2H + 3I)`; attention: the q/k/v gradients and
//! their fused copy — the score gradients are formed block by block, never whole).
//! Kernel workspaces and thread pools hold a few megabytes more for the whole run; they
//! are measured, not predicted ([`runtime_bytes`]).

use crate::decoder::{AttnBlock, FfnBlock};
use crate::model::Model;

/// A predicted memory footprint, in bytes.
#[derive(Clone, Debug, Default)]
pub struct MemoryPlan {
    /// (owner, bytes), static parts first, then saved activations per layer
    pub items: Vec<(String, usize)>,
    /// weights, gradients, optimizer moments
    pub static_bytes: usize,
    /// activations saved by one micro-batch's forward
    pub activation_bytes: usize,
    /// temporaries beyond the saved activations at the peak
    pub transient_bytes: usize,
    /// kernel workspaces and thread pools (measured by [`runtime_bytes`], or 0)
    pub runtime_bytes: usize,
    /// predicted peak
    pub peak_bytes: usize,
}

/// Floats of one dense (or shared-expert) MLP's saved activations per token.
fn mlp_floats(inter: usize) -> usize {
    3 * inter
}

impl Model {
    /// Predicts the memory of a training step over a micro-batch of `b × t` tokens with
    /// `moments` optimizer floats per parameter (AdamW: 2).
    /// `runtime` is what [`runtime_bytes`] measured (0 to leave it out).
    pub fn memory_plan(&self, b: usize, t: usize, moments: usize, runtime: usize) -> MemoryPlan {
        let n = b * t;
        let (h, v) = (self.cfg.hidden, self.cfg.vocab_size);
        let p = self.layout.total;
        let mut items = vec![
            ("weights".to_string(), 4 * p),
            ("gradients".to_string(), 4 * p),
            ("optimizer moments".to_string(), 4 * moments * p),
        ];
        let static_bytes = 4 * (2 + moments) * p;
        let mut act = 0;
        let mut largest_block = 0usize;
        let mut rebuilt = 0usize;
        for (i, l) in self.layers.iter().enumerate() {
            let sandwich = if l.sandwich.is_some() { 2 * (n * h + n) } else { 0 };
            let norms = 4 * (4 * n * h + 2 * n + sandwich);
            let (attn, attn_ws) = match &l.attn {
                AttnBlock::Gqa(a) => {
                    let (qw, kw) = (a.nh * a.hd, a.nkv * a.hd);
                    let qk_norm = if a.q_norm.is_some() { n * (qw + kw) + n * (a.nh + a.nkv) } else { 0 };
                    let probs = b * a.nh * t * t;
                    (4 * (2 * n * qw + 2 * n * kw + probs + qk_norm), 4 * n * (qw + 2 * kw) * 2)
                }
                AttnBlock::Mla(a) => {
                    let dqk = a.nope + a.rope_dim;
                    let qa = if a.q_lora > 0 { 2 * n * a.q_lora + n } else { 0 };
                    let probs = b * a.nh * t * t;
                    let f = qa + 2 * n * a.kv_lora + n + 2 * n * a.nh * dqk + 2 * n * a.nh * a.dv + probs;
                    (4 * f, 4 * n * a.nh * (2 * dqk + a.dv) * 2)
                }
            };
            let (ffn, ffn_ws, kind) = match &l.ffn {
                FfnBlock::Dense(m) => (4 * n * mlp_floats(m.inter), 4 * n * 3 * m.inter, "dense FFN"),
                FfnBlock::Moe(m) => {
                    let (e, k, ie) = (m.placement.n_experts(), m.router.spec.top_k, m.experts.inter);
                    let r = n * k;
                    let shared = m.shared.as_ref().map_or(0, |s| n * mlp_floats(s.inter));
                    let f = n * e + 2 * n * k + 2 * r + r * (2 * h + 3 * ie) + shared;
                    (4 * f, 4 * r * (2 * h + 3 * ie), "MoE")
                }
            };
            if self.recompute.get(i).copied().unwrap_or(false) {
                // Only the input stays; the whole set comes back during this layer's
                // backward.
                items.push((format!("layer {i} input (recomputed in backward)"), 4 * n * h));
                act += 4 * n * h;
                // (its kept input becomes part of the rebuilt set, not an extra copy)
                rebuilt = rebuilt.max(norms + attn + ffn - 4 * n * h);
            } else {
                items.push((format!("layer {i} norms and residuals"), norms));
                items.push((format!("layer {i} attention"), attn));
                items.push((format!("layer {i} {kind}"), ffn));
                act += norms + attn + ffn;
            }
            largest_block = largest_block.max(attn_ws).max(ffn_ws);
        }
        let logits = 4 * n * v;
        let head = 4 * (2 * n * h + n) + logits;
        items.push(("final norm and logits".to_string(), head));
        act += head;
        // Backward of the top layer: dx and the residual gradient beside the block's own
        // temporaries; the logits are gone by then.
        let backward = largest_block + 4 * 2 * n * h + rebuilt;
        let transient = backward.saturating_sub(logits);
        if runtime > 0 {
            items.push(("kernel workspaces and thread pools (measured)".to_string(), runtime));
        }
        MemoryPlan {
            items,
            static_bytes,
            activation_bytes: act,
            transient_bytes: transient,
            runtime_bytes: runtime,
            peak_bytes: static_bytes + act + transient + runtime,
        }
    }
}

/// Heap bytes the kernels keep after running `model` (per-thread workspaces, pools):
/// measured with three forward and backward passes of 4 × 16 tokens on zero weights
/// (enough work for every worker thread to take part), everything else freed again.
/// Needs the counting allocator ([`ultramoe_kernels::memory`]); call it before anything
/// else has run the kernels, or it measures 0.
pub fn runtime_bytes(model: &Model) -> usize {
    let before = ultramoe_kernels::memory::live_bytes();
    let (b, t) = (4, model.cfg.max_position.clamp(2, 16));
    for _ in 0..3 {
        let w = vec![0.0f32; model.layout.total];
        let mut g = vec![0.0f32; model.layout.total];
        let ids: Vec<u32> = (0..b * t).map(|i| (i % model.cfg.vocab_size) as u32).collect();
        let fwd = model.forward(&w, &ids, b, t);
        let targets = crate::model::shifted_targets(&ids, t);
        model.backward(&w, &mut g, fwd, &targets, 1.0);
    }
    ultramoe_kernels::memory::live_bytes().saturating_sub(before)
}
