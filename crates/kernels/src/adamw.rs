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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;

    #[test]
    fn every_vector_path_gives_the_same_bits() {
        let c = AdamWStep { beta1: 0.9, beta2: 0.95, eps: 1e-8, step_size: 3e-4, inv_bc2_sqrt: 1.3, decay: 1.0 - 3e-5 };
        for n in [1, 15, 16, 17, 100, 1000] {
            let runs = crate::isa::on_every_path(|| {
                let (mut w, mut g, mut m) = (rand_vec(n, 1), rand_vec(n, 2), rand_vec(n, 3));
                let mut v: Vec<f32> = rand_vec(n, 4).iter().map(|x| x * x).collect();
                adamw_update(&mut w, &mut g, &mut m, &mut v, c);
                assert!(g.iter().all(|&x| x == 0.0), "the gradient is consumed");
                [w, m, v].concat()
            });
            crate::testutil::same_bits(&runs, &format!("AdamW, n = {n}"));
            // and the update itself, at one element
            let (w, g, m, v) = (rand_vec(n, 1)[0], rand_vec(n, 2)[0], rand_vec(n, 3)[0], rand_vec(n, 4)[0].powi(2));
            let (m1, v1) = (0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g);
            let want = w * c.decay - c.step_size * m1 / (v1.sqrt() * c.inv_bc2_sqrt + c.eps);
            assert!((runs[0].1[0] - want).abs() <= 1e-6 * want.abs().max(1.0), "AdamW, n = {n}");
        }
    }
}
