//! The router: `logits = x · W_gateᵀ`, then scoring and top-k (see
//! [`ultramoe_kernels::router`] for the formulas of each family).

use crate::params::Slot;
use ultramoe_kernels::gemm::{linear, linear_backward};
use ultramoe_kernels::router::{route_backward, route_forward, Routing, RouterSpec};

/// A router over `E` experts.
#[derive(Clone, Debug)]
pub struct Router {
    /// `gate.weight`, `[E, H]`
    pub weight: Slot,
    /// `gate.e_score_correction_bias`, `[E]` (sigmoid routers): shifts the choice only
    pub bias: Option<Slot>,
    /// scoring and selection rules
    pub spec: RouterSpec,
    /// hidden `H`
    pub hidden: usize,
}

impl Router {
    /// `x: [N, H]` → routing decisions for each token.
    pub fn forward(&self, w: &[f32], x: &[f32], n: usize) -> Routing {
        let e = self.spec.n_experts;
        let logits = linear(x, &w[self.weight.clone()], n, self.hidden, e);
        route_forward(&logits, self.bias.as_ref().map(|b| &w[b.clone()]), &self.spec)
    }

    /// Backward from the combine weights' gradient `dweights: [N, K]`: router weight
    /// gradient into `g`, input gradient added to `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], r: &Routing, dweights: &[f32], dx: &mut [f32], n: usize) {
        let e = self.spec.n_experts;
        let mut dlogits = vec![0.0; n * e];
        route_backward(&mut dlogits, dweights, r, &self.spec);
        linear_backward(Some(dx), &mut g[self.weight.clone()], &dlogits, x, &w[self.weight.clone()], n, self.hidden, e, true);
    }
}
