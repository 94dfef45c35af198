//! All routed experts of one layer as grouped GEMMs:
//! `gu = x_e · W_gu[e]ᵀ` (`[E, 2I, H]`), `a = silu(g) ⊙ u`, `y = a · W_down[e]ᵀ`
//! (`[E, H, I]`), each one call over every expert's contiguous rows.

use crate::params::Slot;
use ultramoe_kernels::activation::{swiglu, swiglu_grad};
use ultramoe_kernels::grouped_gemm::{grouped_linear, grouped_linear_grad};

/// The routed experts of one layer.
#[derive(Clone, Debug)]
pub struct GroupedExperts {
    /// every expert's fused gate/up, `[E, 2I, H]`
    pub gate_up: Slot,
    /// every expert's down projection, `[E, H, I]`
    pub down: Slot,
    /// hidden `H`
    pub hidden: usize,
    /// expert width `I`
    pub inter: usize,
}

/// Saved activations of [`GroupedExperts::forward`].
#[derive(Default)]
pub struct ExpertsSaved {
    /// `[R, 2I]`
    pub gu: Vec<f32>,
    /// `[R, I]`
    pub act: Vec<f32>,
}

impl GroupedExperts {
    /// `xp: [R, H]` grouped by `offsets` → `yp: [R, H]`.
    pub fn forward(&self, w: &[f32], xp: &[f32], offsets: &[usize]) -> (Vec<f32>, ExpertsSaved) {
        let (h, i) = (self.hidden, self.inter);
        let gu = grouped_linear(xp, &w[self.gate_up.clone()], offsets, h, 2 * i);
        let s = ExpertsSaved { act: swiglu(&gu, i), gu };
        (grouped_linear(&s.act, &w[self.down.clone()], offsets, i, h), s)
    }

    /// Backward: weight gradients into `g`; returns `dxp: [R, H]`.
    pub fn backward(&self, w: &[f32], g: &mut [f32], xp: &[f32], s: &ExpertsSaved, dyp: &[f32], offsets: &[usize]) -> Vec<f32> {
        let (h, i) = (self.hidden, self.inter);
        let dact = grouped_linear_grad(&mut g[self.down.clone()], dyp, &s.act, &w[self.down.clone()], offsets, i, h);
        let dgu = swiglu_grad(&dact, &s.gu, i);
        drop(dact);
        grouped_linear_grad(&mut g[self.gate_up.clone()], &dgu, xp, &w[self.gate_up.clone()], offsets, h, 2 * i)
    }
}
