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
//!
//! A batch can be shared out over `R` ranks ([`SharedBatch`]: sequence parallelism gives
//! each tensor-parallel rank `N/R` of the tokens, whole sequences for the sequence-wise
//! loss): each rank then computes its share of `L` — the shares sum to the batch's `L` —
//! and its tokens' gradient, with `N`, the loads `f` (summed over the ranks) and the
//! sequence count those of the whole batch.

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
    balance_loss_shared(logits, experts, e, k, score, kind, coef, dlogits, None)
}

/// How a batch's tokens are shared out over ranks: this rank holds `1/ranks` of them,
/// and `sum` adds a vector over the ranks in place (every rank calls it alike).
pub struct SharedBatch<'a> {
    /// ranks sharing the batch, each with the same number of tokens
    pub ranks: usize,
    /// element-wise sum over the ranks
    pub sum: &'a mut dyn FnMut(&mut [f32]),
}

/// [`balance_loss`] over this rank's share of a batch (`None`: the whole batch): returns
/// this rank's share of `coef · L` (the shares sum to the batch's) and writes its
/// tokens' gradient. The loads are summed over the ranks; for
/// [`BalanceLoss::Sequence`] each rank must hold whole sequences.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss_shared(
    logits: &[f32],
    experts: &[u32],
    e: usize,
    k: usize,
    score: ScoreFn,
    kind: BalanceLoss,
    coef: f32,
    dlogits: &mut [f32],
    mut shared: Option<SharedBatch>,
) -> f32 {
    let n_local = logits.len() / e;
    let ranks = shared.as_ref().map_or(1, |s| s.ranks.max(1));
    // the batch's token count
    let n = n_local * ranks;
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
        BalanceLoss::Sequence { seq_len } => (0..n_local).step_by(seq_len.max(1)).map(|a| (a, (a + seq_len).min(n_local))).collect(),
        _ => vec![(0, n_local)],
    };
    // The batch's segments: every rank holds as many whole sequences, or a share of the
    // one global segment.
    let (n_segments, whole) = match kind {
        BalanceLoss::Sequence { .. } => ((segments.len() * ranks) as f32, false),
        _ => (1.0, true),
    };
    let groups = match kind {
        BalanceLoss::EpGroup { groups } => groups.max(1),
        _ => e,
    };
    let per = e / groups;
    let mut dp = vec![0.0f32; n_local * e];
    let mut loss = 0.0f64;
    for &(a, b) in &segments {
        // the segment's length in the batch (the global segment spans every rank)
        let len = if whole { n as f32 } else { (b - a) as f32 };
        // F_g: group load relative to even, from the chosen experts (counts exact in f32)
        let mut count = vec![0.0f32; groups];
        for &x in &experts[a * k..b * k] {
            count[x as usize / per] += 1.0;
        }
        if let (true, Some(s)) = (whole, shared.as_mut()) {
            (s.sum)(&mut count);
        }
        let f: Vec<f32> = count.iter().map(|&c| groups as f32 * c / (k as f32 * len)).collect();
        // P_g: mean probability mass of the group
        let mut pg = vec![0.0f32; groups];
        for t in a..b {
            for j in 0..e {
                pg[j / per] += p[t * e + j] / len;
            }
        }
        // (with the global segment shared, `pg` holds this rank's tokens' part of P_g:
        // the ranks' `Σ f·pg` add up to the segment's)
        let seg_loss: f32 = f.iter().zip(&pg).map(|(a, b)| a * b).sum();
        loss += seg_loss as f64 / n_segments as f64;
        // dL/dp_{t,j} = coef · F_{g(j)} / (len · n_segments)
        for t in a..b {
            for j in 0..e {
                dp[t * e + j] = coef * f[j / per] / (len * n_segments);
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

    const KINDS: [BalanceLoss; 4] = [BalanceLoss::Switch, BalanceLoss::Sequence { seq_len: 4 }, BalanceLoss::EpGroup { groups: 3 }, BalanceLoss::ZLoss];

    /// Random logits for `n` tokens over `e` experts and the router's top-`k` choices.
    fn routed(n: usize, e: usize, k: usize, score: ScoreFn, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let logits: Vec<f32> = rand_vec(n * e, seed).iter().map(|x| 2.0 * x).collect();
        let spec = RouterSpec { score, n_experts: e, top_k: k, n_group: 1, topk_group: 1, renormalize: true, scaling: 1.0 };
        let experts = route_forward(&logits, None, &spec).experts;
        (logits, experts)
    }

    #[test]
    fn every_balance_loss_matches_finite_differences() {
        let (n, e, k) = (12, 6, 2);
        for score in [ScoreFn::Softmax, ScoreFn::Sigmoid] {
            let (logits, experts) = routed(n, e, k, score, 3);
            for kind in KINDS {
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

    /// A batch shared by two ranks (halves of its rows, whole sequences each): the two
    /// shares add up to the whole batch's loss and each half's gradient is the whole
    /// batch's rows.
    #[test]
    fn shares_of_a_batch_add_up_to_the_whole_batch() {
        let (n, e, k) = (16, 6, 2);
        for score in [ScoreFn::Softmax, ScoreFn::Sigmoid] {
            let (logits, experts) = routed(n, e, k, score, 5);
            for kind in KINDS {
                let mut whole_dl = vec![0.0; n * e];
                let whole = balance_loss(&logits, &experts, e, k, score, kind, 0.7, &mut whole_dl);
                let half = |r: usize| (&logits[r * n / 2 * e..(r + 1) * n / 2 * e], &experts[r * n / 2 * k..(r + 1) * n / 2 * k]);
                // First each rank's own vector (what it contributes to the sum), then the
                // shares with the other rank's added.
                let mut own: Vec<Vec<f32>> = vec![];
                for r in 0..2 {
                    let (l, x) = half(r);
                    let mut keep = |v: &mut [f32]| own.push(v.to_vec());
                    balance_loss_shared(l, x, e, k, score, kind, 0.7, &mut vec![0.0; n / 2 * e], Some(SharedBatch { ranks: 2, sum: &mut keep }));
                }
                let (mut total, mut dl) = (0.0, vec![]);
                for r in 0..2 {
                    let (l, x) = half(r);
                    let other = own.get(1 - r).cloned();
                    let mut add = |v: &mut [f32]| v.iter_mut().zip(other.as_ref().unwrap()).for_each(|(a, b)| *a += b);
                    let mut d = vec![0.0; n / 2 * e];
                    total += balance_loss_shared(l, x, e, k, score, kind, 0.7, &mut d, Some(SharedBatch { ranks: 2, sum: &mut add }));
                    dl.extend(d);
                }
                assert!((total - whole).abs() <= 1e-6 * whole.abs(), "{score:?} {kind:?}: shares {total} vs {whole}");
                assert_close(&dl, &whole_dl, 1e-6, &format!("{score:?} {kind:?}"));
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
