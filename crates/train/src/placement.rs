//! Dynamic expert placement: when to move experts, and where to.
//!
//! Every step the global per-expert token counts update a moving average per MoE layer,
//! `load ← (1 − α)·load + α·counts` (α = [`LOAD_EMA`]). Every `K` steps each layer's
//! placement is re-solved for that predicted load
//! ([`ultramoe_model::moe::placement::solve`]) and the layer migrates only when the time
//! it is expected to save before the next decision beats the time the move costs:
//!
//! ```text
//! gain = (max_rank_load(current) − max_rank_load(new)) / DP · t_row · K
//! cost = max_rank(fetched slots) · 3 · 4·P_expert / bandwidth
//! ```
//!
//! where loads are rows per step (summed over the data-parallel copies, hence `/DP`),
//! `t_row = 18·H·I / peak` is a routed row's expert work (forward `6·H·I` FLOPs, backward
//! twice that), `P_expert = 3·H·I` the parameters of one expert moved with its two AdamW
//! moments, and the bandwidth what [`probe_bandwidth`] measured between the
//! expert-parallel ranks when the run started. (The step's own all-to-all timings are
//! no guide: under imbalance they are mostly waiting for the busiest rank.)

use std::time::Instant;
use ultramoe_dist::{CommResult, ProcessGroup};
use ultramoe_model::moe::placement::{imbalance, layers_load_sums, solve, Placement};

/// Weight of the newest step in the load average.
pub const LOAD_EMA: f64 = 0.25;

/// A new placement is taken only if it lowers the layer's predicted rank imbalance by at
/// least this much (small gains are noise in the load average, not worth a move).
pub const MIN_IMPROVEMENT: f64 = 0.02;

/// Bytes per second assumed for a migration when none was measured.
const DEFAULT_BANDWIDTH: f64 = 1e9;

/// Bytes per second one rank sends in an all-to-all over `g`: 1 MiB to every peer, each
/// rank's best of three after a barrier, averaged over the ranks (every rank returns the
/// same figure, so every rank takes the same decisions).
pub fn probe_bandwidth(g: &dyn ProcessGroup) -> CommResult<f64> {
    let p = g.size();
    if p < 2 {
        return Ok(0.0);
    }
    let per = 1 << 18; // floats: 1 MiB
    let send = vec![1.0f32; per * p];
    let counts = vec![per; p];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        g.barrier()?;
        let t = Instant::now();
        g.all_to_all_v_known_f32(&send, &counts, &counts)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mut total = [best];
    g.all_reduce_f64(&mut total)?;
    let mean = total[0] / p as f64;
    Ok((4 * per * (p - 1)) as f64 / mean.max(1e-9))
}

/// The load history and the decision rule.
#[derive(Clone, Debug)]
pub struct Balancer {
    /// decide every `every` steps
    pub every: u64,
    /// per MoE layer, the moving average of tokens per expert
    pub load: Vec<Vec<f64>>,
}

/// One layer's decision.
#[derive(Clone, Debug)]
pub struct Move {
    /// MoE layer index
    pub layer: usize,
    /// the placement to migrate to
    pub placement: Placement,
    /// predicted `max/mean` rank load before and after
    pub imbalance: (f64, f64),
}

/// What a decision needs to know about the machine and the model.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// hidden size `H`
    pub hidden: usize,
    /// expert width `I`
    pub inter: usize,
    /// FLOP/s of the machine
    pub peak_flops: f64,
    /// all-to-all bytes per second a rank sends ([`probe_bandwidth`]; 0: unknown)
    pub bandwidth: f64,
    /// data-parallel copies whose counts are summed in the loads
    pub dp: usize,
}

impl Balancer {
    /// A balancer deciding every `every` steps.
    pub fn new(every: u64) -> Self {
        Balancer { every, load: vec![] }
    }

    /// Folds one step's global counts (per MoE layer, per expert) into the average.
    pub fn observe(&mut self, counts: &[Vec<usize>]) {
        if self.load.is_empty() {
            self.load = counts.iter().map(|c| c.iter().map(|&x| x as f64).collect()).collect();
            return;
        }
        for (avg, c) in self.load.iter_mut().zip(counts) {
            avg.iter_mut().zip(c).for_each(|(a, &x)| *a = (1.0 - LOAD_EMA) * *a + LOAD_EMA * x as f64);
        }
    }

    /// The two sums of the predicted rank imbalance `Σ_layers max / Σ_layers mean` of
    /// `placements` for the load average, so that pipeline stages holding different
    /// layers can add theirs before dividing.
    pub fn predicted_load_sums(&self, placements: &[&Placement]) -> (f64, f64) {
        let loads: Vec<Vec<f64>> = placements.iter().zip(&self.load).map(|(p, l)| p.rank_loads(l)).collect();
        layers_load_sums(&loads)
    }

    /// The layers worth migrating after step `step` (every rank computes the same
    /// answer from the same global inputs).
    pub fn decide(&self, step: u64, placements: &[&Placement], c: Costs) -> Vec<Move> {
        if self.every == 0 || !step.is_multiple_of(self.every) || self.load.is_empty() {
            return vec![];
        }
        let t_row = 18.0 * (c.hidden * c.inter) as f64 / c.peak_flops.max(1.0);
        let bandwidth = if c.bandwidth > 0.0 { c.bandwidth } else { DEFAULT_BANDWIDTH };
        let expert_bytes = 3.0 * 4.0 * (3 * c.hidden * c.inter) as f64;
        let mut out = vec![];
        for (layer, (cur, load)) in placements.iter().zip(&self.load).enumerate() {
            let new = solve(load, cur);
            let (before, after) = (cur.rank_loads(load), new.rank_loads(load));
            let peak = |r: &[f64]| r.iter().cloned().fold(0.0, f64::max);
            let gain = (peak(&before) - peak(&after)) / c.dp.max(1) as f64 * t_row * self.every as f64;
            let fetched = new.fetches_per_rank(cur).into_iter().max().unwrap_or(0);
            let cost = fetched as f64 * expert_bytes / bandwidth;
            let (ib, ia) = (imbalance(&before), imbalance(&after));
            // A change of shares alone moves nothing and costs nothing.
            if ib - ia >= MIN_IMPROVEMENT && gain > cost {
                out.push(Move { layer, placement: new, imbalance: (ib, ia) });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_only_when_it_pays() {
        let mut b = Balancer::new(10);
        let counts = vec![(0..8).map(|e| 4000 / (e + 1)).collect::<Vec<usize>>()];
        b.observe(&counts);
        let start = Placement::contiguous(8, 4, 1).unwrap();
        let fast = Costs { hidden: 256, inter: 512, peak_flops: 1e11, bandwidth: 1e9, dp: 1 };
        assert!(b.decide(7, &[&start], fast).is_empty(), "not a decision step");
        let moves = b.decide(10, &[&start], fast);
        assert_eq!(moves.len(), 1);
        assert!(moves[0].imbalance.0 > 1.5 && moves[0].imbalance.1 < 1.1, "{:?}", moves[0].imbalance);
        // A link so slow that moving costs more than it saves: stay.
        let slow = Costs { bandwidth: 1e3, ..fast };
        assert!(b.decide(10, &[&start], slow).is_empty());
        // Already balanced: nothing to gain.
        let placed = moves[0].placement.clone();
        assert!(b.decide(20, &[&placed], fast).is_empty());
        // The average moves toward new counts.
        b.observe(&[vec![0; 8]]);
        assert!((b.load[0][0] - 4000.0 * (1.0 - LOAD_EMA)).abs() < 1e-9);
    }
}
