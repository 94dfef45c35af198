//! The fused AdamW element update (the optimizer's whole inner loop, vectorised).

use crate::vmath::multiversion;

/// Constants of one AdamW step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// β₁
    pub beta1: f32,
    /// β₂
    pub beta2: f32,
    /// ε
    pub eps: f32,
    /// `η / (1 − β₁ᵗ)`
    pub step_size: f32,
    /// `1 / √(1 − β₂ᵗ)`
    pub inv_bc2_sqrt: f32,
    /// `1 − ηλ` (1 where no decay applies)
    pub decay: f32,
}

multiversion! {
    /// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `w ← w·(1−ηλ) − η/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`, and `g ← 0`: the gradient is
    /// consumed, so the next step accumulates into a cleared buffer without a separate
    /// pass over it.
    pub fn adamw_update(w: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], c: AdamWStep) {
        let n = w.len().min(g.len()).min(m.len()).min(v.len());
        let (w, g, m, v) = (&mut w[..n], &mut g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i];
            g[i] = 0.0;
            let mi = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
            let vi = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            w[i] = w[i] * c.decay - c.step_size * mi / (vi.sqrt() * c.inv_bc2_sqrt + c.eps);
        }
    }
}
