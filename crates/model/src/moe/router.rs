//! The router: `logits = x · W_gateᵀ`, then scoring and top-k (see
//! [`ultramoe_kernels::router`] for the formulas of each family).

use crate::params::Slot;
use crate::tensor_parallel::TensorParallel;
use ultramoe_kernels::gemm::{linear, linear_backward};
use ultramoe_kernels::balance::{balance_loss, balance_loss_shared, BalanceLoss, SharedBatch};
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

/// An auxiliary loss's value and its gradient with respect to the router logits
/// `[N, E]`, both computed in the forward pass.
pub struct AuxLoss {
    /// `coef · L`
    pub loss: f32,
    /// `d(coef · L)/dlogits`
    pub dlogits: Vec<f32>,
}

impl Router {
    /// `x: [N, H]` → routing decisions for each token, and `coef · kind` of the
    /// auxiliary balancing loss when `aux` gives one. `skew` (testing and benchmarks;
    /// 0 = off) adds a fixed Zipf bias `−s · ln(e + 1)` to expert `e`'s logit, so
    /// low-numbered experts are hot by design.
    ///
    /// `batch`: the tensor-parallel group whose ranks share the batch's tokens (sequence
    /// parallelism): the balancing loss then weighs this rank's tokens by the loads of the
    /// whole batch, and its value is the whole batch's on every rank.
    pub fn forward(&self, w: &[f32], x: &[f32], n: usize, aux: Option<(BalanceLoss, f32)>, skew: f32, batch: Option<&TensorParallel>) -> (Routing, Option<AuxLoss>) {
        let e = self.spec.n_experts;
        let mut logits = linear(x, &w[self.weight.clone()], n, self.hidden, e);
        if skew != 0.0 {
            let bias: Vec<f32> = (0..e).map(|j| -skew * ((j + 1) as f32).ln()).collect();
            logits.chunks_mut(e).for_each(|row| row.iter_mut().zip(&bias).for_each(|(l, b)| *l += b));
        }
        let r = route_forward(&logits, self.bias.as_ref().map(|b| &w[b.clone()]), &self.spec);
        let aux = aux.map(|(kind, coef)| {
            let mut dlogits = vec![0.0; n * e];
            let Some(tp) = batch else {
                let loss = balance_loss(&logits, &r.experts, e, self.spec.top_k, self.spec.score, kind, coef, &mut dlogits);
                return AuxLoss { loss, dlogits };
            };
            let mut sum = |v: &mut [f32]| tp.sum_in_pass(v);
            let shared = SharedBatch { ranks: tp.size(), sum: &mut sum };
            let mut loss = [balance_loss_shared(&logits, &r.experts, e, self.spec.top_k, self.spec.score, kind, coef, &mut dlogits, Some(shared))];
            tp.sum_in_pass(&mut loss);
            AuxLoss { loss: loss[0], dlogits }
        });
        (r, aux)
    }

    /// Inference: `x: [N, H]` → routing decisions, no auxiliary loss. The logits go
    /// through the decoding GEMV when `N` is a decode step's few rows (the GEMM's
    /// packing and threads took 0.12 ms for 16 rows × 64 experts × 1,024, ~2% of a
    /// 16-sequence decode step); many rows take the GEMM as in training.
    pub fn forward_infer(&self, w: &[f32], x: &[f32], n: usize) -> Routing {
        let e = self.spec.n_experts;
        let logits = ultramoe_kernels::qlinear::linear_f32(x, &w[self.weight.clone()], n, self.hidden, e, true);
        route_forward(&logits, self.bias.as_ref().map(|b| &w[b.clone()]), &self.spec)
    }

    /// Backward from the combine weights' gradient `dweights: [N, K]`: router weight
    /// gradient into `g`, input gradient added to `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], r: &Routing, aux: Option<&AuxLoss>, dweights: &[f32], dx: &mut [f32], n: usize) {
        let e = self.spec.n_experts;
        let mut dlogits = vec![0.0; n * e];
        route_backward(&mut dlogits, dweights, r, &self.spec);
        if let Some(a) = aux {
            dlogits.iter_mut().zip(&a.dlogits).for_each(|(d, x)| *d += x);
        }
        linear_backward(Some(dx), &mut g[self.weight.clone()], &dlogits, x, &w[self.weight.clone()], n, self.hidden, e, true);
    }
}
