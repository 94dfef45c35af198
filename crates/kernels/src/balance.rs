//! Load-balancing auxiliary losses on router outputs, each computed together with its
//! gradient with respect to the router logits (the losses depend on nothing else that
//! trains, so the forward pass can finish their backward at once).
//!
//! Notation: `N` tokens, `E` experts, `K` chosen per token, `p_{t,e}` the router's
//! probability — `softmax(l_t)_e` for softmax routers, the normalised affinity
//! `s_{t,e} / Σ_j s_{t,j}` (`s = σ(l)`) for sigmoid routers, as DeepSeek-V3 defines its
//! balance loss — and `f_e = (E / (K·N)) · |{t : e ∈ topk(t)}|`, the load of expert `e`
//! relative to a perfectly even one (not differentiable; it weighs the gradient).
//!
//! - [`BalanceLoss::Switch`]: over the whole batch, `L = α · Σ_e f_e · P_e` with
//!   `P_e = (1/N) Σ_t p_{t,e}` (Switch Transformer / GShard); `L = α` when loads and
//!   probabilities are even.
//! - [`BalanceLoss::Sequence`]: the same per sequence of `T` tokens, averaged over the
//!   `B` sequences (DeepSeek-V3's sequence-wise loss).
//! - [`BalanceLoss::EpGroup`]: experts grouped into the `G` expert-parallel ranks that host
//!   them (`E/G` consecutive experts each); `L = α · Σ_g F_g P_g` with
//!   `F_g = (G/(K·N)) · |slots routed to group g|` and `P_g = Σ_{e∈g} P_e`: it balances
//!   devices, not individual experts.
//! - [`BalanceLoss::ZLoss`]: `L = β · (1/N) Σ_t (log Σ_e e^{l_{t,e}})²` (ST-MoE), keeping
//!   logits small.

use crate::router::ScoreFn;

/// Which auxiliary loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BalanceLoss {
    /// global-batch switch loss
    Switch,
    /// per-sequence balance loss over sequences of `seq_len` tokens
    Sequence {
        /// tokens per sequence
        seq_len: usize,
    },
    /// balance across `groups` expert-parallel ranks
    EpGroup {
        /// expert-parallel ranks (divides E)
        groups: usize,
    },
    /// router z-loss
    ZLoss,
}

/// Router probabilities `p: [N, E]` from logits, per [`ScoreFn`].
pub fn router_probs(logits: &[f32], e: usize, score: ScoreFn) -> Vec<f32> {
    let mut p = logits.to_vec();
    for row in p.chunks_mut(e) {
        match score {
            ScoreFn::Softmax => {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = row.iter_mut().map(|x| {
                    *x = (*x - m).exp();
                    *x
                }).sum();
                row.iter_mut().for_each(|x| *x /= z);
            }
            ScoreFn::Sigmoid => {
                row.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp()));
                let z: f32 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= z);
            }
        }
    }
    p
}

/// Backward of [`router_probs`]: `dl` from `dp` (`dl` written).
fn router_probs_backward(dl: &mut [f32], dp: &[f32], logits: &[f32], p: &[f32], e: usize, score: ScoreFn) {
    for (((dl, dp), l), p) in dl.chunks_mut(e).zip(dp.chunks(e)).zip(logits.chunks(e)).zip(p.chunks(e)) {
        // both: dx_j = p_j (dp_j − Σ_i p_i dp_i) for x the quantity p normalises
        let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
        match score {
            ScoreFn::Softmax => {
                for j in 0..e {
                    dl[j] = p[j] * (dp[j] - dot);
                }
            }
            ScoreFn::Sigmoid => {
                // p = s/Σs: ds_j = (dp_j − Σ_i p_i dp_i)/Σs; dl = ds · s(1 − s)
                let s: Vec<f32> = l.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
                let z: f32 = s.iter().sum();
                for j in 0..e {
                    dl[j] = (dp[j] - dot) / z * s[j] * (1.0 - s[j]);
                }
            }
        }
    }
}

/// Computes `coef · L` and its gradient `dlogits: [N, E]` (written) for the chosen
/// experts `experts: [N, K]`.
pub fn balance_loss(logits: &[f32], experts: &[u32], e: usize, k: usize, score: ScoreFn, kind: BalanceLoss, coef: f32, dlogits: &mut [f32]) -> f32 {
    let n = logits.len() / e;
    if kind == BalanceLoss::ZLoss {
        let mut loss = 0.0f64;
        for (row, dl) in logits.chunks(e).zip(dlogits.chunks_mut(e)) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
            let lse = m + z.ln();
            loss += (lse as f64).powi(2);
            // d(lse²)/dl = 2·lse·softmax(l)
            for (d, x) in dl.iter_mut().zip(row) {
                *d = coef * 2.0 * lse * (x - lse).exp() / n as f32;
            }
        }
        return coef * (loss / n as f64) as f32;
    }
    let p = router_probs(logits, e, score);
    // Token ranges over which loads and mean probabilities are taken.
    let segments: Vec<(usize, usize)> = match kind {
        BalanceLoss::Sequence { seq_len } => (0..n).step_by(seq_len.max(1)).map(|a| (a, (a + seq_len).min(n))).collect(),
        _ => vec![(0, n)],
    };
    let groups = match kind {
        BalanceLoss::EpGroup { groups } => groups.max(1),
        _ => e,
    };
    let per = e / groups;
    let mut dp = vec![0.0f32; n * e];
    let mut loss = 0.0f64;
    for &(a, b) in &segments {
        let len = (b - a) as f32;
        // F_g: group load relative to even, from the chosen experts
        let mut count = vec![0usize; groups];
        for &x in &experts[a * k..b * k] {
            count[x as usize / per] += 1;
        }
        let f: Vec<f32> = count.iter().map(|&c| groups as f32 * c as f32 / (k as f32 * len)).collect();
        // P_g: mean probability mass of the group
        let mut pg = vec![0.0f32; groups];
        for t in a..b {
            for j in 0..e {
                pg[j / per] += p[t * e + j] / len;
            }
        }
        let seg_loss: f32 = f.iter().zip(&pg).map(|(a, b)| a * b).sum();
        loss += seg_loss as f64 / segments.len() as f64;
        // dL/dp_{t,j} = coef · F_{g(j)} / (len · n_segments)
        for t in a..b {
            for j in 0..e {
                dp[t * e + j] = coef * f[j / per] / (len * segments.len() as f32);
            }
        }
    }
    router_probs_backward(dlogits, &dp, logits, &p, e, score);
    coef * loss as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{route_forward, RouterSpec};
    use crate::testutil::*;

    #[test]
    fn every_balance_loss_matches_finite_differences() {
        let (n, e, k) = (12, 6, 2);
        for score in [ScoreFn::Softmax, ScoreFn::Sigmoid] {
            let logits: Vec<f32> = rand_vec(n * e, 3).iter().map(|x| 2.0 * x).collect();
            let spec = RouterSpec { score, n_experts: e, top_k: k, n_group: 1, topk_group: 1, renormalize: true, scaling: 1.0 };
            let experts = route_forward(&logits, None, &spec).experts;
            for kind in [BalanceLoss::Switch, BalanceLoss::Sequence { seq_len: 4 }, BalanceLoss::EpGroup { groups: 3 }, BalanceLoss::ZLoss] {
                let mut dl = vec![0.0; n * e];
                let loss = balance_loss(&logits, &experts, e, k, score, kind, 0.7, &mut dl);
                assert!(loss > 0.0);
                // The loads are held fixed (they are counts of the chosen experts).
                let num = numeric_grad(&logits, 1e-3, |l| {
                    let mut scratch = vec![0.0; n * e];
                    balance_loss(l, &experts, e, k, score, kind, 0.7, &mut scratch) as f64
                });
                assert_close(&dl, &num, 3e-3, &format!("{score:?} {kind:?}"));
            }
        }
    }

    #[test]
    fn balanced_routing_gives_the_minimum_switch_loss() {
        // Uniform probabilities and perfectly even loads: Σ_e f_e P_e = Σ_e 1 · 1/E = 1.
        let (n, e, k) = (8, 4, 2);
        let logits = vec![0.0f32; n * e];
        let experts: Vec<u32> = (0..n * k).map(|i| (i % e) as u32).collect();
        let mut dl = vec![0.0; n * e];
        let l = balance_loss(&logits, &experts, e, k, ScoreFn::Softmax, BalanceLoss::Switch, 1.0, &mut dl);
        assert!((l - 1.0).abs() < 1e-6);
        let l = balance_loss(&logits, &experts, e, k, ScoreFn::Softmax, BalanceLoss::EpGroup { groups: 2 }, 1.0, &mut dl);
        assert!((l - 1.0).abs() < 1e-6, "{l}");
        // With uniform probabilities the loss is the same for any load: only the
        // probabilities carry gradient, and they are already even.
        let skewed: Vec<u32> = (0..n * k).map(|i| (i % 2) as u32).collect();
        let l = balance_loss(&logits, &skewed, e, k, ScoreFn::Softmax, BalanceLoss::EpGroup { groups: 2 }, 1.0, &mut dl);
        assert!((l - 1.0).abs() < 1e-6, "uniform probabilities make every load cost the same: {l}");
    }
}
