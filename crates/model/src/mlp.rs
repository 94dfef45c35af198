//! Dense SwiGLU feed-forward: `y = W_down · (silu(W_gate x) ⊙ W_up x)`, with gate and up
//! fused into one `[2I, H]` weight. Used for dense layers and shared experts.

use crate::params::Slot;
use ultramoe_kernels::activation::{swiglu, swiglu_grad};
use ultramoe_kernels::gemm::{linear, linear_backward, linear_grad};

/// A SwiGLU MLP.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// fused `[gate_proj; up_proj]`, `[2I, H]`
    pub gate_up: Slot,
    /// `down_proj`, `[H, I]`
    pub down: Slot,
    /// hidden `H`
    pub hidden: usize,
    /// width `I`
    pub inter: usize,
}

/// Saved activations of [`Mlp::forward`].
#[derive(Default)]
pub struct MlpSaved {
    /// gate/up projections `[N, 2I]`
    pub gu: Vec<f32>,
    /// `silu(g) ⊙ u`, `[N, I]`
    pub act: Vec<f32>,
}

impl MlpSaved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.gu.len() + self.act.len())
    }

    /// The buffers, for swapping.
    pub fn buffers_mut(&mut self) -> [&mut Vec<f32>; 2] {
        [&mut self.gu, &mut self.act]
    }
}

impl Mlp {
    /// Inference forward through decoding weights (nothing kept): `x: [N, H]` → `[N, H]`.
    pub fn forward_infer(&self, dw: &crate::decode_weights::DecodeWeights, x: &[f32], n: usize) -> Vec<f32> {
        let (h, i) = (self.hidden, self.inter);
        let gu = dw.linear(&self.gate_up, x, n, h, 2 * i);
        dw.linear(&self.down, &swiglu(&gu, i), n, i, h)
    }

    /// `x: [N, H]` → `y: [N, H]`.
    pub fn forward(&self, w: &[f32], x: &[f32], n: usize) -> (Vec<f32>, MlpSaved) {
        let _p = ultramoe_kernels::profile::scope("mlp.forward");
        let (h, i) = (self.hidden, self.inter);
        let gu = linear(x, &w[self.gate_up.clone()], n, h, 2 * i);
        let s = MlpSaved { act: swiglu(&gu, i), gu };
        (linear(&s.act, &w[self.down.clone()], n, i, h), s)
    }

    /// Rebuilds `act = silu(g) ⊙ u` from the kept gate/up projections (freed by the
    /// `swiglu` policy).
    pub fn restore_act(&self, s: &mut MlpSaved) {
        if s.act.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.swiglu");
            s.act = swiglu(&s.gu, self.inter);
        }
    }

    /// Backward: weight gradients into `g`; `dx` written, or added when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, w: &[f32], g: &mut [f32], x: &[f32], s: &MlpSaved, dy: &[f32], dx: &mut [f32], n: usize, accumulate: bool) {
        let _p = ultramoe_kernels::profile::scope("mlp.backward");
        let (h, i) = (self.hidden, self.inter);
        let dact = linear_grad(&mut g[self.down.clone()], dy, &s.act, &w[self.down.clone()], n, i, h);
        let dgu = swiglu_grad(&dact, &s.gu, i);
        linear_backward(Some(dx), &mut g[self.gate_up.clone()], &dgu, x, &w[self.gate_up.clone()], n, h, 2 * i, accumulate);
    }
}
