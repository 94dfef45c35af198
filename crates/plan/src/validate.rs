//! Predictions for ultramoe's own training runs on one machine, to hold the model
//! against measured step times.
//!
//! Two descriptions of the machine:
//! - **one device** (`devices_per_node = 1`, `ultramoe calibrate`): a run of `R` ranks
//!   (threads or processes) shares that device: every rank trains `B/R` rows of each
//!   micro-batch, and the machine runs all ranks' work, so the step takes `R ×` one
//!   rank's simulated step on the whole machine (f32, no TP/PP), plus the
//!   expert-parallel exchanges: per MoE layer and micro-batch, dispatch and combine
//!   forward and backward, each moving the rank's routed rows to the other `EP − 1`
//!   ranks at the machine's copy bandwidth (`intra_node_bandwidth`).
//! - **several devices** (`ultramoe --threads T calibrate --devices-per-node D`): each
//!   rank is a device, and the run is exactly a layout the planner searches — the
//!   prediction is [`simulate`] of that layout (pipeline bubble, exposed communication
//!   and per-device memory included). Tensor-parallel runs are priced with sequence
//!   parallelism, as the trainer runs a plan's TP; a TP run without it is refused (the
//!   trainer's TP ranks then all route every token, which no planner layout does).

use crate::hardware::Hardware;
use crate::model_cost::{ModelCost, Recompute};
use crate::pipeline::PipeSchedule;
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
    /// pipeline stages
    #[serde(default = "one")]
    pub pp: usize,
    /// tensor-parallel size
    #[serde(default = "one")]
    pub tp: usize,
    /// sequence parallelism (with `tp` ≥ 2)
    #[serde(default)]
    pub sequence_parallel: bool,
    /// model chunks per pipeline rank
    #[serde(default = "one")]
    pub vpp: usize,
    /// the run's memory policy as one of the planner's recomputation modes (`None`:
    /// another policy, priced as keeping everything)
    #[serde(default)]
    pub recompute: Option<Recompute>,
    /// ZeRO-1
    #[serde(default)]
    pub zero1: bool,
    /// the pipeline schedule (GPipe runs are priced as 1F1B: the same bubble)
    #[serde(default)]
    pub schedule: PipeSchedule,
    /// what else the run measured (runs recorded before pipelines have none)
    #[serde(default)]
    pub measured: Option<Measured>,
}

fn one() -> usize {
    1
}

/// A run's measured figures besides its step time (medians over the steps after the
/// first 5).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measured {
    /// the busiest stage's idle fraction (waiting for other stages)
    pub bubble: f64,
    /// seconds of communication computation waited for
    pub exposed_comm_s: f64,
    /// the largest rank's heap peak, bytes
    pub peak_bytes: f64,
    /// the busiest expert-parallel rank's routed rows over the mean (`rank_load_imbalance`):
    /// a property of the routing, which the prediction takes as given
    #[serde(default = "one_f64")]
    pub rank_load_imbalance: f64,
}

fn one_f64() -> f64 {
    1.0
}

/// What the planner predicts for a run.
#[derive(Clone, Debug, Default)]
pub struct RunPrediction {
    /// seconds per step
    pub step_s: f64,
    /// fraction of the step in the pipeline bubble (per-device descriptions only)
    pub bubble: Option<f64>,
    /// seconds of exposed communication (per-device descriptions only)
    pub exposed_comm_s: Option<f64>,
    /// bytes one device needs (per-device descriptions only)
    pub memory_bytes: Option<f64>,
}

/// Predicted seconds per step of `run` on `hw`.
pub fn predict_run(run: &RunRecord, hw: &Hardware) -> Result<f64> {
    predict(run, hw).map(|p| p.step_s)
}

/// The planner's prediction for `run` on `hw` (see the module docs for the two kinds of
/// machine description).
pub fn predict(run: &RunRecord, hw: &Hardware) -> Result<RunPrediction> {
    let cfg = ModelConfig::from_value(run.model.clone()).map_err(|e| Error::msg(format!("run `{}`: {e}", run.name)))?;
    // ultramoe trains no multi-token-prediction module, whatever the config names.
    let m = ModelCost { mtp_layers: 0, ..ModelCost::new(&cfg) };
    let r = run.ranks.max(1);
    if hw.devices_per_node > 1 {
        if r > hw.devices_per_node {
            return Err(Error::msg(format!("run `{}`: {r} ranks on a machine of {} devices", run.name, hw.devices_per_node)));
        }
        let tp = run.tp.max(1);
        // The planner prices tensor parallelism as the trainer runs a plan: with sequence
        // parallelism, each TP rank routing its `1/TP` of the tokens. Without it the
        // trainer's TP ranks all route every token (the MoE block is not split), which
        // the planner has no layout for.
        if tp > 1 && !run.sequence_parallel {
            return Err(Error::msg(format!("run `{}`: tensor parallelism without --sequence-parallel is not priced (the planner's TP splits the MoE block's tokens)", run.name)));
        }
        let per_stage = r / run.pp.max(1) / tp;
        if per_stage == 0 || r != per_stage * run.pp.max(1) * tp || !run.micro_batch.is_multiple_of(per_stage) {
            return Err(Error::msg(format!("run `{}`: {} rows do not split over {per_stage} data-parallel ranks per stage", run.name, run.micro_batch)));
        }
        let imbalance = run.measured.as_ref().map_or(1.0, |m| m.rank_load_imbalance.max(1.0));
        let job = Job { devices: r, seq_len: run.seq_len, global_batch: run.micro_batch * run.grad_accum, dtype: "fp32".into(), hierarchical_a2a: false, imbalance };
        let layout = Layout {
            tp,
            pp: run.pp.max(1),
            vpp: run.vpp.max(1),
            ep: run.ep.max(1),
            dp: per_stage,
            micro_batch: run.micro_batch / per_stage,
            recompute: run.recompute.unwrap_or(Recompute::None),
            zero1: run.zero1,
            schedule: run.schedule,
        };
        let p = simulate(&m, hw, &job, &layout).map_err(|e| Error::msg(format!("run `{}`: {e}", run.name)))?;
        let b = &p.breakdown;
        return Ok(RunPrediction {
            step_s: p.step_s,
            bubble: Some(b.bubble / p.step_s),
            exposed_comm_s: Some(b.ep_comm + b.pp_comm + b.dp_comm + b.tp_comm),
            memory_bytes: Some(p.memory_bytes),
        });
    }
    if run.tp > 1 || run.pp > 1 {
        return Err(Error::msg(format!("run `{}`: pipeline and tensor-parallel runs need a description of several devices (ultramoe --threads 1 calibrate --devices-per-node R)", run.name)));
    }
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
    let layout = Layout { tp: 1, pp: 1, vpp: 1, ep: 1, dp: 1, micro_batch: rows, recompute: Recompute::None, zero1: false, schedule: PipeSchedule::OneFOneB };
    let one = simulate(&m, hw, &job, &layout).map_err(|e| Error::msg(format!("run `{}`: {e}", run.name)))?;
    let mut step = r as f64 * (one.step_s - hw.efficiency.step_overhead) + hw.efficiency.step_overhead;
    if run.ep > 1 {
        let routed = (rows * run.seq_len * m.top_k * m.hidden) as f64 * 4.0;
        let per_layer = 4.0 * routed * (run.ep - 1) as f64 / run.ep as f64 / hw.network.intra_node_bandwidth;
        step += r as f64 * (run.grad_accum * m.moe_layers) as f64 * per_layer;
    }
    Ok(RunPrediction { step_s: step, ..RunPrediction::default() })
}

/// Mean absolute relative error of the predictions for `runs`, and each run's
/// (predicted, measured).
pub fn mean_abs_error(runs: &[RunRecord], hw: &Hardware) -> Result<(f64, Vec<(f64, f64)>)> {
    let pairs: Vec<(f64, f64)> = runs.iter().map(|r| predict_run(r, hw).map(|p| (p, r.step_s))).collect::<Result<_>>()?;
    let mae = pairs.iter().map(|(p, m)| ((p - m) / m).abs()).sum::<f64>() / pairs.len().max(1) as f64;
    Ok((mae, pairs))
}
