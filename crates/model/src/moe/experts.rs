//! All routed experts of one layer as grouped GEMMs:
//! `gu = x_e · W_gu[e]ᵀ` (`[E, 2I, H]`), `a = silu(g) ⊙ u`, `y = a · W_down[e]ᵀ`
//! (`[E, H, I]`), each one call over every expert's contiguous rows.

use crate::params::Slot;
use ultramoe_kernels::activation::{swiglu, swiglu_grad};
use ultramoe_kernels::grouped_gemm::{grouped_input_grad, grouped_linear, grouped_weight_grad};

/// Checkpoint names of a layer's expert tensors: `{prefix}{e}.{proj}.weight`.
#[derive(Clone, Debug)]
pub struct ExpertNames {
    /// e.g. `model.layers.3.mlp.experts.`
    pub prefix: String,
    /// gate, up and down projection names (`gate_proj`, `up_proj`, `down_proj`, or
    /// Mixtral's `w1`, `w3`, `w2`)
    pub proj: [String; 3],
}

impl ExpertNames {
    /// Name of expert `e`'s gate (`which = 0`), up (1) or down (2) projection.
    pub fn tensor(&self, e: usize, which: usize) -> String {
        format!("{}{e}.{}.weight", self.prefix, self.proj[which])
    }
}

/// The routed experts this rank holds in one layer: one per slot (see
/// [`super::placement`]; without expert parallelism slot `e` is expert `e`).
#[derive(Clone, Debug)]
pub struct GroupedExperts {
    /// every slot's fused gate/up, `[S, 2I, H]`
    pub gate_up: Slot,
    /// every slot's down projection, `[S, H, I]`
    pub down: Slot,
    /// hidden `H`
    pub hidden: usize,
    /// expert width `I`
    pub inter: usize,
    /// checkpoint names
    pub names: ExpertNames,
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
    /// Flat-buffer ranges of slot `j`'s gate/up and down weights.
    pub fn slot_ranges(&self, j: usize) -> [std::ops::Range<usize>; 2] {
        let (gu, dn) = (2 * self.inter * self.hidden, self.hidden * self.inter);
        [self.gate_up.start + j * gu..self.gate_up.start + (j + 1) * gu, self.down.start + j * dn..self.down.start + (j + 1) * dn]
    }

    /// `xp: [R, H]` grouped by `offsets` → `yp: [R, H]`.
    pub fn forward(&self, w: &[f32], xp: &[f32], offsets: &[usize]) -> (Vec<f32>, ExpertsSaved) {
        let (h, i) = (self.hidden, self.inter);
        let gu = grouped_linear(xp, &w[self.gate_up.clone()], offsets, h, 2 * i);
        let s = ExpertsSaved { act: swiglu(&gu, i), gu };
        (self.down(w, &s.act, offsets), s)
    }

    /// Inference forward through decoding weights: `xp: [R, H]` grouped by `offsets` →
    /// `yp: [R, H]` (an empty slot's weights are not read). With few rows per slot
    /// (decoding) the slots run side by side, one thread each; with many, one after
    /// another on every thread.
    pub fn forward_infer(&self, dw: &crate::decode_weights::DecodeWeights, xp: &[f32], offsets: &[usize]) -> Vec<f32> {
        use rayon::prelude::*;
        let (h, i) = (self.hidden, self.inter);
        let busy: Vec<usize> = (0..offsets.len() - 1).filter(|&j| offsets[j + 1] > offsets[j]).collect();
        let few = busy.iter().all(|&j| offsets[j + 1] - offsets[j] <= 8);
        let one = |j: usize, parallel: bool| {
            let (r0, r1) = (offsets[j], offsets[j + 1]);
            let [gu, dn] = self.slot_ranges(j);
            let act = swiglu(&dw.linear_on(&gu, &xp[r0 * h..r1 * h], r1 - r0, h, 2 * i, parallel), i);
            dw.linear_on(&dn, &act, r1 - r0, i, h, parallel)
        };
        let outs: Vec<Vec<f32>> = if few { busy.par_iter().map(|&j| one(j, false)).collect() } else { busy.iter().map(|&j| one(j, true)).collect() };
        let mut yp = vec![0.0; xp.len()];
        for (&j, y) in busy.iter().zip(outs) {
            yp[offsets[j] * h..offsets[j + 1] * h].copy_from_slice(&y);
        }
        yp
    }

    /// The down-projection `y = a · W_down[e]ᵀ` over every slot's rows.
    pub fn down(&self, w: &[f32], act: &[f32], offsets: &[usize]) -> Vec<f32> {
        grouped_linear(act, &w[self.down.clone()], offsets, self.inter, self.hidden)
    }

    /// Rebuilds `act = silu(g) ⊙ u` from the kept gate/up projections (freed by the
    /// `swiglu` policy).
    pub fn restore_act(&self, s: &mut ExpertsSaved) {
        if s.act.is_empty() && !s.gu.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.swiglu");
            s.act = swiglu(&s.gu, self.inter);
        }
    }

    /// The input half of the backward (zero-bubble's "B"): `dact = dyp · W_down[e]`,
    /// `dgu = swiglu'(gu) ⊙ dact`, `dxp = dgu · W_gu[e]`. Returns `dxp: [R, H]` and `dgu:
    /// [R, 2I]`, which [`Self::backward_weights`] needs. Under expert parallelism `dxp`
    /// travels back to the tokens' ranks while the weight half runs.
    pub fn backward_input(&self, w: &[f32], s: &ExpertsSaved, dyp: &[f32], offsets: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (h, i) = (self.hidden, self.inter);
        let dact = grouped_input_grad(dyp, &w[self.down.clone()], offsets, i, h);
        let dgu = swiglu_grad(&dact, &s.gu, i);
        drop(dact);
        (grouped_input_grad(&dgu, &w[self.gate_up.clone()], offsets, h, 2 * i), dgu)
    }

    /// The weight half (zero-bubble's "W"): `g_down[e] += dyp_eᵀ · act_e`, `g_gu[e] +=
    /// dgu_eᵀ · xp_e` — the same sums in the same order as the whole backward, so the
    /// split changes no bit.
    pub fn backward_weights(&self, g: &mut [f32], xp: &[f32], s: &ExpertsSaved, dyp: &[f32], dgu: &[f32], offsets: &[usize]) {
        let (h, i) = (self.hidden, self.inter);
        grouped_weight_grad(&mut g[self.down.clone()], dyp, &s.act, offsets, i, h);
        grouped_weight_grad(&mut g[self.gate_up.clone()], dgu, xp, offsets, h, 2 * i);
    }
}
