//! The MoE layer: `y = Σ_k w_k · Expert_{e_k}(x) + SharedExperts(x)`.

use super::dispatcher::{DispatchHandle, TokenDispatcher};
use super::experts::{ExpertsSaved, GroupedExperts};
use super::router::{AuxLoss, Router};
use crate::mlp::{Mlp, MlpSaved};
use ultramoe_kernels::router::Routing;

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
}

/// Saved activations of [`MoeLayer::forward`].
pub struct MoeSaved {
    /// routing decisions (also the per-expert load statistics)
    pub routing: Routing,
    /// auxiliary balancing loss, when configured
    pub aux: Option<AuxLoss>,
    handle: DispatchHandle,
    /// rows this rank's experts computed on
    xp: Vec<f32>,
    experts: ExpertsSaved,
    /// expert outputs for this rank's tokens, in plan order
    ys: Vec<f32>,
    shared: Option<MlpSaved>,
}

impl MoeSaved {
    /// Tokens each expert received this step.
    pub fn expert_counts(&self) -> Vec<usize> {
        self.handle.plan.counts()
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.routing.scores.len()
            + self.routing.weights.len()
            + self.routing.experts.len()
            + 2 * self.handle.plan.rows()
            + self.xp.len()
            + self.experts.gu.len()
            + self.experts.act.len()
            + self.ys.len())
            + self.shared.as_ref().map_or(0, |s| s.bytes())
    }
}

impl MoeLayer {
    /// `x: [N, H]` (normed) → `y: [N, H]`.
    pub fn forward(&self, w: &[f32], x: &[f32], n: usize) -> (Vec<f32>, MoeSaved) {
        let k = self.router.spec.top_k;
        let (routing, aux) = {
            let _p = ultramoe_kernels::profile::scope("moe.router.forward");
            self.router.forward(w, x, n)
        };
        let (xp, handle) = {
            let _p = ultramoe_kernels::profile::scope("moe.dispatch.forward");
            self.dispatcher.dispatch(x, &routing, k)
        };
        let (yp, experts) = {
            let _p = ultramoe_kernels::profile::scope("moe.experts.forward");
            self.experts.forward(w, &xp, &handle.offsets)
        };
        let mut y = vec![0.0; x.len()];
        let ys = {
            let _p = ultramoe_kernels::profile::scope("moe.combine.forward");
            self.dispatcher.combine(&mut y, yp, &routing.weights, &handle)
        };
        let shared = self.shared.as_ref().map(|m| {
            let (ys, s) = m.forward(w, x, n);
            crate::tensor_ops::add_into(&mut y, &ys);
            s
        });
        (y, MoeSaved { routing, aux, handle, xp, experts, ys, shared })
    }

    /// Backward: weight gradients into `g`; returns `dx: [N, H]`.
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], s: &MoeSaved, dy: &[f32], n: usize) -> Vec<f32> {
        let (dyp, dweights) = {
            let _p = ultramoe_kernels::profile::scope("moe.combine.backward");
            self.dispatcher.combine_backward(dy, &s.ys, &s.routing.weights, &s.handle)
        };
        let dxp = {
            let _p = ultramoe_kernels::profile::scope("moe.experts.backward");
            self.experts.backward(w, g, &s.xp, &s.experts, &dyp, &s.handle.offsets)
        };
        drop(dyp);
        let mut dx = vec![0.0; x.len()];
        {
            let _p = ultramoe_kernels::profile::scope("moe.dispatch.backward");
            self.dispatcher.dispatch_backward(&mut dx, dxp, &s.handle);
        }
        {
            let _p = ultramoe_kernels::profile::scope("moe.router.backward");
            self.router.backward(w, g, x, &s.routing, s.aux.as_ref(), &dweights, &mut dx, n);
        }
        if let (Some(m), Some(ms)) = (&self.shared, &s.shared) {
            m.backward(w, g, x, ms, dy, &mut dx, n, true);
        }
        dx
    }
}
