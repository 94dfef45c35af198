//! Router scoring and top-k expert selection, with the backward to the router logits.
//!
//! Three families, as the checkpoints define them:
//! - softmax scores `p = softmax(l)` over all experts, top-k by `p`, optionally
//!   renormalised `w_j = p_j / Σ_top p` (Qwen3-MoE; Mixtral is softmax + renormalise,
//!   which equals a softmax over the top-k logits);
//! - sigmoid scores `s = σ(l)` (DeepSeek-V3): experts are *chosen* by `s + bias`
//!   (the aux-loss-free correction bias), optionally restricted to the best `topk_group`
//!   of `n_group` groups (a group scores the sum of its two best biased scores), while the
//!   *weights* use the unbiased `s`: `w_j = c · s_j / (Σ_top s + 1e-20)` when renormalised,
//!   else `c · s_j`, with `c = routed_scaling_factor`.

use rayon::prelude::*;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFn {
    /// softmax over all experts
    Softmax,
    /// independent sigmoid per expert
    Sigmoid,
}

/// Everything that decides routing except the logits.
#[derive(Clone, Debug)]
pub struct RouterSpec {
    /// score function
    pub score: ScoreFn,
    /// routed experts `E`
    pub n_experts: usize,
    /// experts per token `K`
    pub top_k: usize,
    /// expert groups (1 = no group limit)
    pub n_group: usize,
    /// groups a token may use
    pub topk_group: usize,
    /// divide the chosen weights by their sum
    pub renormalize: bool,
    /// multiply the final weights (`routed_scaling_factor`)
    pub scaling: f32,
}

/// Result of routing `N` tokens.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// chosen experts `[N, K]`, best first
    pub experts: Vec<u32>,
    /// combine weights `[N, K]`
    pub weights: Vec<f32>,
    /// scores `[N, E]` (softmax probabilities or sigmoids), saved for backward
    pub scores: Vec<f32>,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k_indices(vals: &[f32], k: usize, out: &mut [u32]) {
    let mut chosen = 0usize;
    let mut used = [false; 1024];
    let big = vals.len() > used.len();
    let mut used_vec = if big { vec![false; vals.len()] } else { Vec::new() };
    while chosen < k {
        let mut best = usize::MAX;
        for (i, v) in vals.iter().enumerate() {
            let taken = if big { used_vec[i] } else { used[i] };
            if !taken && (best == usize::MAX || *v > vals[best]) {
                best = i;
            }
        }
        if big {
            used_vec[best] = true
        } else {
            used[best] = true
        }
        out[chosen] = best as u32;
        chosen += 1;
    }
}

/// Tokens a parallel routing task takes at least.
const ROUTE_ROWS_PER_TASK: usize = 32;

/// Routes `logits: [N, E]`. `bias: [E]` (sigmoid routers only) shifts the choice, never
/// the weights.
pub fn route_forward(logits: &[f32], bias: Option<&[f32]>, spec: &RouterSpec) -> Routing {
    let (e, k) = (spec.n_experts, spec.top_k);
    let n = logits.len() / e;
    let mut r = Routing { experts: vec![0; n * k], weights: vec![0.0; n * k], scores: vec![0.0; n * e] };
    r.scores
        .par_chunks_mut(e)
        .zip(r.experts.par_chunks_mut(k))
        .zip(r.weights.par_chunks_mut(k))
        .zip(logits.par_chunks(e))
        // (a decode step's few rows on this thread: starting tasks cost more than them)
        .with_min_len(ROUTE_ROWS_PER_TASK)
        // (one choice buffer per task, not an allocation per token)
        .for_each_init(Vec::new, |choice: &mut Vec<f32>, (((sc, ex), w), l)| {
            match spec.score {
                ScoreFn::Softmax => {
                    let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut z = 0.0;
                    for (s, x) in sc.iter_mut().zip(l) {
                        *s = (x - max).exp();
                        z += *s;
                    }
                    sc.iter_mut().for_each(|s| *s /= z);
                    top_k_indices(sc, k, ex);
                }
                ScoreFn::Sigmoid => {
                    for (s, x) in sc.iter_mut().zip(l) {
                        *s = sigmoid(*x);
                    }
                    choice.clear();
                    match bias {
                        Some(b) => choice.extend(sc.iter().zip(b).map(|(s, b)| s + b)),
                        None => choice.extend_from_slice(sc),
                    }
                    if spec.n_group > 1 && spec.topk_group < spec.n_group {
                        let per = e / spec.n_group;
                        let group_score: Vec<f32> = choice
                            .chunks(per)
                            .map(|g| {
                                let mut best = [0u32; 2];
                                top_k_indices(g, 2.min(per), &mut best[..2.min(per)]);
                                best[..2.min(per)].iter().map(|&i| g[i as usize]).sum()
                            })
                            .collect();
                        let mut keep = vec![0u32; spec.topk_group];
                        top_k_indices(&group_score, spec.topk_group, &mut keep);
                        for (gi, g) in choice.chunks_mut(per).enumerate() {
                            if !keep.contains(&(gi as u32)) {
                                // transformers masks dropped groups with 0.0, not −∞
                                g.fill(0.0);
                            }
                        }
                    }
                    top_k_indices(choice, k, ex);
                }
            }
            for (wj, &x) in w.iter_mut().zip(ex.iter()) {
                *wj = sc[x as usize];
            }
            if spec.renormalize {
                let eps = if spec.score == ScoreFn::Sigmoid { 1e-20 } else { 0.0 };
                let d: f32 = w.iter().sum::<f32>() + eps;
                w.iter_mut().for_each(|x| *x /= d);
            }
            w.iter_mut().for_each(|x| *x *= spec.scaling);
        });
    r
}

/// Backward to the logits: writes `dlogits: [N, E]` from `dweights: [N, K]`.
///
/// Softmax: with `dp_j = c·(dw_j − Σ_k dw_k w_k/c)/S` on the top-k when renormalised
/// (`S = Σ_top p`), else `c·dw_j`, and zero elsewhere: `dl_i = p_i (dp_i − Σ_j p_j dp_j)`.
/// Sigmoid: `ds_j = c/D · (dw_j − Σ_k dw_k s_k / D)` (`D = Σ_top s + 1e-20`) when
/// renormalised, else `c·dw_j`; `dl_j = ds_j · s_j (1 − s_j)`.
pub fn route_backward(dlogits: &mut [f32], dweights: &[f32], r: &Routing, spec: &RouterSpec) {
    let (e, k) = (spec.n_experts, spec.top_k);
    dlogits
        .par_chunks_mut(e)
        .zip(dweights.par_chunks(k))
        .zip(r.scores.par_chunks(e))
        .zip(r.experts.par_chunks(k))
        // (buffers per task, not allocations per token)
        .for_each_init(|| (Vec::with_capacity(k), vec![0.0f32; k]), |(picked, dsel): &mut (Vec<f32>, Vec<f32>), (((dl, dw), sc), ex)| {
            let c = spec.scaling;
            picked.clear();
            picked.extend(ex.iter().map(|&x| sc[x as usize]));
            if spec.renormalize {
                let eps = if spec.score == ScoreFn::Sigmoid { 1e-20 } else { 0.0 };
                let d: f32 = picked.iter().sum::<f32>() + eps;
                let dot: f32 = dw.iter().zip(picked.iter()).map(|(a, b)| a * b).sum::<f32>() / d;
                for j in 0..k {
                    dsel[j] = c / d * (dw[j] - dot);
                }
            } else {
                for j in 0..k {
                    dsel[j] = c * dw[j];
                }
            }
            dl.fill(0.0);
            match spec.score {
                ScoreFn::Softmax => {
                    let dot: f32 = dsel.iter().zip(picked.iter()).map(|(a, b)| a * b).sum();
                    for (i, x) in dl.iter_mut().enumerate() {
                        *x = -sc[i] * dot;
                    }
                    for (j, &x) in ex.iter().enumerate() {
                        dl[x as usize] += sc[x as usize] * dsel[j];
                    }
                }
                ScoreFn::Sigmoid => {
                    for (j, &x) in ex.iter().enumerate() {
                        let s = sc[x as usize];
                        dl[x as usize] += dsel[j] * s * (1.0 - s);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn specs() -> Vec<RouterSpec> {
        let base = RouterSpec {
            score: ScoreFn::Softmax,
            n_experts: 8,
            top_k: 3,
            n_group: 1,
            topk_group: 1,
            renormalize: false,
            scaling: 1.0,
        };
        vec![
            base.clone(),
            RouterSpec { renormalize: true, ..base.clone() },
            RouterSpec { score: ScoreFn::Sigmoid, scaling: 2.5, ..base.clone() },
            RouterSpec { score: ScoreFn::Sigmoid, renormalize: true, scaling: 2.5, n_group: 4, topk_group: 2, ..base },
        ]
    }

    #[test]
    fn routing_backward_matches_finite_differences() {
        let n = 5;
        for spec in specs() {
            let logits: Vec<f32> = rand_vec(n * 8, 7).iter().map(|x| x * 3.0).collect();
            let bias = rand_vec(8, 8);
            let b = (spec.score == ScoreFn::Sigmoid).then_some(&bias[..]);
            let g = rand_vec(n * 3, 9);
            let r = route_forward(&logits, b, &spec);
            let mut dl = vec![0.0; n * 8];
            route_backward(&mut dl, &g, &r, &spec);
            // Finite differences hold the expert choice fixed (it is piecewise constant).
            let num = numeric_grad(&logits, 1e-3, |l| {
                let r2 = route_forward(l, b, &spec);
                assert_eq!(r2.experts, r.experts, "step crossed a routing decision");
                dot64(&r2.weights, &g)
            });
            assert_close(&dl, &num, 2e-3, &format!("{spec:?}"));
        }
    }

    #[test]
    fn group_limit_and_bias_change_only_the_choice() {
        let spec = RouterSpec {
            score: ScoreFn::Sigmoid,
            n_experts: 4,
            top_k: 1,
            n_group: 2,
            topk_group: 1,
            renormalize: false,
            scaling: 1.0,
        };
        // Expert 0 has the best score, but the bias pushes expert 3 ahead.
        let logits = [2.0, 0.0, 0.0, 1.0];
        let r = route_forward(&logits, Some(&[0.0, 0.0, 0.0, 1.5]), &spec);
        assert_eq!(r.experts, vec![3]);
        assert!((r.weights[0] - sigmoid(1.0)).abs() < 1e-6, "weight must use the unbiased score");
        let r = route_forward(&logits, None, &spec);
        assert_eq!(r.experts, vec![0]);
    }
}
