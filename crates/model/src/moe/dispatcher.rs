//! Token dispatch and combine. On one rank this is a permutation into expert order and
//! back; expert parallelism replaces it with an all-to-all exchange behind the same two
//! calls, which is what lets dispatch/combine overlap with computation.

use ultramoe_kernels::permute::{permute_backward, permute_forward, unpermute_backward, unpermute_forward, DispatchPlan};
use ultramoe_kernels::router::Routing;

/// What dispatch hands to combine (and both backward passes): the row plan. A typed
/// handle, not state stashed on the dispatcher.
pub struct DispatchHandle {
    /// where every (token, choice) went
    pub plan: DispatchPlan,
}

/// Single-rank dispatcher.
#[derive(Clone, Debug)]
pub struct LocalDispatcher {
    /// routed experts `E`
    pub n_experts: usize,
    /// hidden `H`
    pub hidden: usize,
}

impl LocalDispatcher {
    /// `x: [N, H]` → expert-ordered rows `[R, H]` and the handle.
    pub fn dispatch(&self, x: &[f32], r: &Routing, top_k: usize) -> (Vec<f32>, DispatchHandle) {
        let plan = DispatchPlan::new(&r.experts, top_k, self.n_experts);
        let mut xp = vec![0.0; plan.rows() * self.hidden];
        permute_forward(&mut xp, x, &plan, self.hidden);
        (xp, DispatchHandle { plan })
    }

    /// `out[t] = Σ_j w[t,j] · yp[row(t,j)]`, written into `out: [N, H]`.
    pub fn combine(&self, out: &mut [f32], yp: &[f32], weights: &[f32], hd: &DispatchHandle) {
        unpermute_forward(out, yp, weights, &hd.plan, self.hidden, false);
    }

    /// Backward of combine: returns `dyp: [R, H]` and `dweights: [N, K]`.
    pub fn combine_backward(&self, dout: &[f32], yp: &[f32], weights: &[f32], hd: &DispatchHandle) -> (Vec<f32>, Vec<f32>) {
        let mut dyp = vec![0.0; yp.len()];
        let mut dw = vec![0.0; weights.len()];
        unpermute_backward(&mut dyp, &mut dw, dout, yp, weights, &hd.plan, self.hidden);
        (dyp, dw)
    }

    /// Backward of dispatch: `dx[t] (+)= Σ_j dxp[row(t, j)]`.
    pub fn dispatch_backward(&self, dx: &mut [f32], dxp: &[f32], hd: &DispatchHandle, accumulate: bool) {
        permute_backward(dx, dxp, &hd.plan, self.hidden, accumulate);
    }
}
