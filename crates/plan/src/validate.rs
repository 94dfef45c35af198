//! Predictions for ultramoe's own training runs on one machine, to hold the model
//! against measured step times.
//!
//! A run of `R` ranks (threads or processes) on one machine shares that machine: every
//! rank trains `B/R` rows of each micro-batch, and the machine runs all ranks' work, so
//! the step takes `R ×` one rank's simulated step on the whole machine (f32, no TP/PP),
//! plus the expert-parallel exchanges: per MoE layer and micro-batch, dispatch and
//! combine forward and backward, each moving the rank's routed rows to the other
//! `EP − 1` ranks at the machine's copy bandwidth (`intra_node_bandwidth`).

use crate::hardware::Hardware;
use crate::model_cost::{ModelCost, Recompute};
use crate::simulate::{simulate, Job, Layout};
use serde::{Deserialize, Serialize};
use ultramoe_config::{Error, ModelConfig, Result};

/// What a finished run was and how fast it went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// a label
    pub name: String,
    /// the model's `config.json`
    pub model: serde_json::Value,
    /// rows per micro-batch (all ranks together)
    pub micro_batch: usize,
    /// tokens per row
    pub seq_len: usize,
    /// micro-batches per step
    pub grad_accum: usize,
    /// ranks
    pub ranks: usize,
    /// expert-parallel size
    pub ep: usize,
    /// measured median seconds per step
    pub step_s: f64,
}

/// Predicted seconds per step of `run` on `hw`.
pub fn predict_run(run: &RunRecord, hw: &Hardware) -> Result<f64> {
    let cfg = ModelConfig::from_value(run.model.clone()).map_err(|e| Error::msg(format!("run `{}`: {e}", run.name)))?;
    let m = ModelCost::new(&cfg);
    let r = run.ranks.max(1);
    if !run.micro_batch.is_multiple_of(r) {
        return Err(Error::msg(format!("run `{}`: {} rows do not split over {r} ranks", run.name, run.micro_batch)));
    }
    let rows = run.micro_batch / r;
    let job = Job {
        devices: 1,
        seq_len: run.seq_len,
        global_batch: rows * run.grad_accum,
        dtype: "fp32".into(),
        hierarchical_a2a: false,
        imbalance: 1.0,
    };
    let layout = Layout { tp: 1, pp: 1, vpp: 1, ep: 1, dp: 1, micro_batch: rows, recompute: Recompute::None, zero1: false };
    let one = simulate(&m, hw, &job, &layout).map_err(|e| Error::msg(format!("run `{}`: {e}", run.name)))?;
    let mut step = r as f64 * (one.step_s - hw.efficiency.step_overhead) + hw.efficiency.step_overhead;
    if run.ep > 1 {
        let routed = (rows * run.seq_len * m.top_k * m.hidden) as f64 * 4.0;
        let per_layer = 4.0 * routed * (run.ep - 1) as f64 / run.ep as f64 / hw.network.intra_node_bandwidth;
        step += r as f64 * (run.grad_accum * m.moe_layers) as f64 * per_layer;
    }
    Ok(step)
}

/// Mean absolute relative error of the predictions for `runs`, and each run's
/// (predicted, measured).
pub fn mean_abs_error(runs: &[RunRecord], hw: &Hardware) -> Result<(f64, Vec<(f64, f64)>)> {
    let pairs: Vec<(f64, f64)> = runs.iter().map(|r| predict_run(r, hw).map(|p| (p, r.step_s))).collect::<Result<_>>()?;
    let mae = pairs.iter().map(|(p, m)| ((p - m) / m).abs()).sum::<f64>() / pairs.len().max(1) as f64;
    Ok((mae, pairs))
}
