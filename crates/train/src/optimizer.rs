//! AdamW with decoupled weight decay (Loshchilov & Hutter), and global-norm clipping.
//!
//! With gradient `g`, step `t` (from 1), learning rate `η` and decay `λ`:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`,
//! `w ← w − η·(m̂/(√v̂ + ε) + λ·w)`; `λ` applies to matrices only (norm gains and
//! biases are not decayed), frozen buffers are never touched.

use rayon::prelude::*;
use ultramoe_kernels::adamw::{adamw_update, AdamWStep};
use ultramoe_model::params::ParamLayout;

/// A contiguous piece of the flat buffer with one decay rule.
#[derive(Clone, Copy, Debug)]
struct Segment {
    start: usize,
    end: usize,
    decay: bool,
    frozen: bool,
}

/// Hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// β₁
    pub beta1: f32,
    /// β₂
    pub beta2: f32,
    /// ε
    pub eps: f32,
    /// λ (decoupled)
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// Optimizer state: both moments in the parameter layout, and the step count.
pub struct AdamW {
    /// hyper-parameters
    pub cfg: AdamWConfig,
    /// first moment
    pub m: Vec<f32>,
    /// second moment
    pub v: Vec<f32>,
    /// steps taken
    pub t: u64,
    segments: Vec<Segment>,
}

/// Pieces of at most this many elements are updated as one parallel task.
const SEGMENT: usize = 1 << 16;

impl AdamW {
    /// Zero moments for `layout`.
    pub fn new(layout: &ParamLayout, cfg: AdamWConfig) -> Self {
        let mut segments = Vec::new();
        for s in &layout.specs {
            let mut a = s.offset;
            while a < s.offset + s.len() {
                let b = (a + SEGMENT).min(s.offset + s.len());
                segments.push(Segment { start: a, end: b, decay: s.decay, frozen: s.frozen });
                a = b;
            }
        }
        AdamW { cfg, m: vec![0.0; layout.total], v: vec![0.0; layout.total], t: 0, segments }
    }

    /// One update of `w` from `g` at learning rate `lr`; leaves `g` zeroed (frozen
    /// tensors' gradients included), ready for the next step's accumulation.
    pub fn step(&mut self, w: &mut [f32], g: &mut [f32], lr: f32) {
        self.t += 1;
        let c = self.cfg.clone();
        let bc1 = 1.0 - (c.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (c.beta2 as f64).powi(self.t as i32);
        let (step_size, inv_bc2_sqrt) = ((lr as f64 / bc1) as f32, (1.0 / bc2.sqrt()) as f32);
        let mut wv = split_segments(w, &self.segments);
        let mut mv = split_segments(&mut self.m, &self.segments);
        let mut vv = split_segments(&mut self.v, &self.segments);
        let mut gv = split_segments(g, &self.segments);
        wv.par_iter_mut().zip(mv.par_iter_mut()).zip(vv.par_iter_mut()).zip(gv.par_iter_mut()).zip(self.segments.par_iter()).for_each(
            |((((w, m), v), g), s)| {
                if s.frozen {
                    g.fill(0.0);
                    return;
                }
                let k = AdamWStep {
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    step_size,
                    inv_bc2_sqrt,
                    decay: if s.decay { 1.0 - lr * c.weight_decay } else { 1.0 },
                };
                adamw_update(w, g, m, v, k);
            },
        );
    }
}

fn split_segments<'a>(mut buf: &'a mut [f32], segs: &[Segment]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(segs.len());
    let mut pos = 0;
    for s in segs {
        let (_, rest) = buf.split_at_mut(s.start - pos);
        let (piece, rest) = rest.split_at_mut(s.end - s.start);
        out.push(piece);
        buf = rest;
        pos = s.end;
    }
    out
}

/// `Σ g²` over a buffer in f64. Partial sums are combined in a fixed order, so the
/// result does not depend on thread scheduling.
pub fn sum_squares(g: &[f32]) -> f64 {
    let parts: Vec<f64> = g.par_chunks(SEGMENT).map(|c| c.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>()).collect();
    parts.iter().sum::<f64>()
}

/// `‖g‖₂` over the whole buffer.
pub fn global_norm(g: &[f32]) -> f32 {
    sum_squares(g).sqrt() as f32
}

/// Scales `g` by `max_norm / norm` when `norm` (the gradient's global norm, possibly
/// over several ranks) exceeds `max_norm > 0`.
pub fn clip_to_norm(g: &mut [f32], norm: f32, max_norm: f32) {
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        g.par_chunks_mut(SEGMENT).for_each(|c| c.iter_mut().for_each(|x| *x *= s));
    }
}

/// Scales `g` so its norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(g: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(g);
    clip_to_norm(g, norm, max_norm);
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use ultramoe_model::params::Init;

    #[test]
    fn adamw_matches_the_formula_and_skips_frozen() {
        let mut lay = ParamLayout::default();
        lay.add("w".into(), &[2, 2], Init::Constant(0.0));
        lay.add("gain".into(), &[2], Init::Constant(1.0));
        lay.add_frozen("bias".into(), &[1], Init::Constant(0.0));
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.5 };
        let mut opt = AdamW::new(&lay, cfg.clone());
        let mut w = vec![1.0, -2.0, 0.5, 3.0, 1.0, 1.0, 7.0];
        let g = vec![0.1, 0.2, -0.3, 0.0, 1.0, -1.0, 5.0];
        let w0 = w.clone();
        let mut consumed = g.clone();
        opt.step(&mut w, &mut consumed, 0.01);
        assert!(consumed.iter().all(|&x| x == 0.0), "the step leaves the gradient cleared");
        for i in 0..6 {
            // first step: m̂ = g, v̂ = g², so the update is g/(|g| + ε)
            let decay = if i < 4 { 1.0 - 0.01 * 0.5 } else { 1.0 };
            let expect = w0[i] * decay - 0.01 * g[i] / (g[i].abs() + 1e-8);
            assert!((w[i] - expect).abs() < 1e-6, "{i}: {} vs {expect}", w[i]);
        }
        assert_eq!(w[6], 7.0, "frozen buffer changed");
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
    }
}
