//! The training loop: micro-batches with gradient accumulation, clipping, AdamW on a
//! warmup + cosine schedule, per-step metrics, and checkpoints that resume exactly.
//!
//! A checkpoint directory (`RUN/checkpoints/step-NNNNNNN/`) holds `config.json` and
//! `model.safetensors` (the Hugging Face layout: loadable by transformers as is),
//! `optimizer.safetensors` (`exp_avg.<name>`, `exp_avg_sq.<name>`) and
//! `trainer_state.json` (step, optimizer step, data position, training config).
//! `RUN/checkpoints/latest` names the newest complete one and is replaced atomically
//! after the directory is fully written, so a kill mid-save leaves the previous
//! checkpoint as the latest.

use crate::data::batch::{Batcher, Source, StreamPos};
use crate::data::jsonl::read_jsonl;
use crate::data::math::Mix;
use crate::optimizer::{clip_to_norm, global_norm, AdamW, AdamWConfig};
use crate::parallel::{catch_step, Parallel};
use crate::placement::{probe_bandwidth, Balancer, Costs};
use ultramoe_model::moe::placement::Placement;
use ultramoe_model::policy::LayerPolicy;
use ultramoe_model::swap::{Prefetch, SwapFile, SwapTicket};
use crate::zero::Zero1;
use crate::schedule::Schedule;
use ultramoe_kernels::balance::BalanceLoss;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use ultramoe_dist::{CommError, Mesh};
use ultramoe_model::checkpoint::{load_weights, read_safetensors, save_model_share, write_atomic, write_safetensors, Tensor};
use ultramoe_model::{Error, Model, ModelConfig, Result};

/// Where training examples come from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum DataSpec {
    /// generated math problems (default mix)
    Math,
    /// a JSONL file of `{"question", "answer"}`
    Jsonl(PathBuf),
    /// uniformly random token ids over the model's vocabulary, every position trained
    /// (throughput benchmarks)
    Random,
}

/// Training hyper-parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// seed for weights (seed) and data (seed + 1)
    pub seed: u64,
    /// optimizer steps
    pub steps: u64,
    /// rows per micro-batch `B` (the global batch: split over data-parallel ranks)
    pub micro_batch: usize,
    /// tokens per row `T`
    pub seq_len: usize,
    /// micro-batches per step
    pub grad_accum: usize,
    /// peak learning rate
    pub lr: f32,
    /// final learning rate
    pub min_lr: f32,
    /// warmup steps
    pub warmup: u64,
    /// gradient-norm clip (0 = off)
    pub clip: f32,
    /// AdamW
    pub adamw: AdamWConfig,
    /// data source
    pub data: DataSpec,
    /// checkpoint every N steps (0 = only at the end)
    pub save_every: u64,
    /// aux-loss-free balancing rate `γ` for routers with a correction bias (0 = off)
    #[serde(default)]
    pub bias_update_rate: f32,
    /// auxiliary balancing loss added to the objective (off when `None`)
    #[serde(default)]
    pub aux_loss: Option<AuxLossConfig>,
    /// skewed-load workload: Zipf exponent of a fixed router bias (0 = off)
    #[serde(default)]
    pub routing_skew: f32,
    /// expert-parallel ranks that load statistics are reported for (experts split into
    /// this many consecutive blocks)
    #[serde(default = "one")]
    pub stats_ep: usize,
    /// ZeRO-1: shard optimizer moments over the ranks that hold the same weights
    /// (distributed runs only)
    #[serde(default)]
    pub zero1: bool,
    /// sum each layer's gradients over the ranks while the backward pass continues
    /// (distributed runs without ZeRO-1)
    #[serde(default = "yes")]
    pub overlap_grad_reduce: bool,
    /// dynamic expert placement: re-solve where experts live every N steps (0 = off;
    /// expert-parallel runs only)
    #[serde(default)]
    pub placement_every: u64,
    /// extra expert slots per expert-parallel rank, for copies of hot experts
    #[serde(default)]
    pub redundant_experts: usize,
    /// per decoder layer: what its forward keeps, recomputes in backward or swaps out
    /// (empty: keep everything; see `ultramoe_model::policy`)
    #[serde(default)]
    pub memory_policy: Vec<LayerPolicy>,
    /// directory for swap files (default: the system's temporary directory)
    #[serde(default)]
    pub swap_dir: Option<PathBuf>,
    /// keep the optimizer moments in a swap file from the first layer's forward to the
    /// bottom layer's backward of every step
    #[serde(default)]
    pub swap_moments: bool,
    /// steps in a row with a non-finite loss or gradient norm (each skipped) after
    /// which training stops with an error
    #[serde(default = "three")]
    pub max_nonfinite_steps: u64,
}

fn three() -> u64 {
    3
}

fn yes() -> bool {
    true
}

/// An auxiliary balancing loss for training.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuxLossConfig {
    /// `switch` (global batch), `sequence` (per row), `ep-group` (per expert-parallel
    /// rank) or `z` (router z-loss)
    pub kind: String,
    /// coefficient `α` (or `β` for the z-loss)
    pub coef: f32,
    /// expert-parallel groups for `ep-group`
    #[serde(default = "one")]
    pub ep_groups: usize,
}

fn one() -> usize {
    1
}

impl AuxLossConfig {
    /// The kernel's loss for sequences of `seq_len` tokens.
    pub fn kind(&self, seq_len: usize) -> Result<BalanceLoss> {
        Ok(match self.kind.as_str() {
            "switch" => BalanceLoss::Switch,
            "sequence" => BalanceLoss::Sequence { seq_len },
            "ep-group" => BalanceLoss::EpGroup { groups: self.ep_groups.max(1) },
            "z" => BalanceLoss::ZLoss,
            other => return Err(Error::field("aux_loss", format!("unknown kind `{other}` (switch, sequence, ep-group, z)"))),
        })
    }
}

impl TrainConfig {
    /// Checks every number a step uses: rates finite and in range, sizes positive and
    /// small enough that `micro_batch · seq_len · grad_accum` tokens can be counted.
    pub fn validate(&self) -> Result<()> {
        let finite = |field: &str, x: f32, lo: f32, lo_ok: bool, what: &str| {
            if x.is_finite() && (x > lo || (lo_ok && x == lo)) {
                Ok(())
            } else {
                Err(Error::field(field, format!("must be a finite number {what}, found {x}")))
            }
        };
        finite("lr", self.lr, 0.0, false, "> 0")?;
        finite("min_lr", self.min_lr, 0.0, true, "≥ 0")?;
        if self.min_lr > self.lr {
            return Err(Error::field("min_lr", format!("{} exceeds the peak learning rate {}", self.min_lr, self.lr)));
        }
        finite("clip", self.clip, 0.0, true, "≥ 0 (0: no clipping)")?;
        finite("bias_update_rate", self.bias_update_rate, 0.0, true, "≥ 0")?;
        finite("routing_skew", self.routing_skew, 0.0, true, "≥ 0")?;
        finite("adamw.eps", self.adamw.eps, 0.0, false, "> 0")?;
        finite("adamw.weight_decay", self.adamw.weight_decay, 0.0, true, "≥ 0")?;
        for (field, b) in [("adamw.beta1", self.adamw.beta1), ("adamw.beta2", self.adamw.beta2)] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                return Err(Error::field(field, format!("must be in [0, 1), found {b}")));
            }
        }
        if let Some(a) = &self.aux_loss {
            finite("aux_loss_coef", a.coef, 0.0, true, "≥ 0")?;
        }
        if self.micro_batch == 0 || self.grad_accum == 0 {
            return Err(Error::field(if self.micro_batch == 0 { "micro_batch" } else { "grad_accum" }, "must be positive"));
        }
        // Tokens are counted (and activations sized) in machine words: bound a step.
        let tokens = (self.micro_batch as u128) * (self.seq_len as u128) * (self.grad_accum as u128);
        if tokens > 1 << 40 {
            return Err(Error::field("micro_batch", format!("{} × {} × {} tokens a step is beyond any machine", self.micro_batch, self.seq_len, self.grad_accum)));
        }
        if self.max_nonfinite_steps == 0 {
            return Err(Error::field("max_nonfinite_steps", "must be at least 1"));
        }
        Ok(())
    }

    /// [`TrainConfig::validate`], and what must agree with the model: the rows fit its
    /// positions, its vocabulary holds the data's tokens, the expert counts divide.
    pub fn validate_for(&self, model: &ModelConfig) -> Result<()> {
        self.validate()?;
        if self.seq_len < 2 {
            return Err(Error::field("seq_len", format!("must be at least 2, found {}", self.seq_len)));
        }
        if self.seq_len > model.max_position {
            return Err(Error::field("max_position_embeddings", format!("seq-len {} exceeds the model's {} positions", self.seq_len, model.max_position)));
        }
        let experts = model.moe.n_experts;
        if self.stats_ep == 0 || (experts > 0 && !experts.is_multiple_of(self.stats_ep)) {
            return Err(Error::field("stats_ep", format!("{} ranks do not divide {experts} experts", self.stats_ep)));
        }
        if self.data != DataSpec::Random && model.vocab_size < crate::data::tokenizer::VOCAB_SIZE {
            let need = crate::data::tokenizer::VOCAB_SIZE;
            let msg = format!("{} is smaller than the math tokenizer's {need} tokens; use a config with vocab_size ≥ {need}", model.vocab_size);
            return Err(Error::field("vocab_size", msg));
        }
        if let Some(a) = &self.aux_loss {
            if let BalanceLoss::EpGroup { groups } = a.kind(self.seq_len)? {
                if !experts.is_multiple_of(groups) {
                    return Err(Error::field("aux_loss", format!("{groups} expert-parallel groups do not divide {experts} experts")));
                }
            }
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 1234,
            steps: 100,
            micro_batch: 8,
            seq_len: 128,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 20,
            clip: 1.0,
            adamw: AdamWConfig::default(),
            data: DataSpec::Math,
            save_every: 0,
            bias_update_rate: 0.0,
            aux_loss: None,
            routing_skew: 0.0,
            stats_ep: 1,
            zero1: false,
            overlap_grad_reduce: true,
            placement_every: 0,
            redundant_experts: 0,
            memory_policy: vec![],
            swap_dir: None,
            swap_moments: false,
            max_nonfinite_steps: 3,
        }
    }
}

/// What one optimizer step measured.
#[derive(Clone, Debug, Serialize)]
pub struct StepStats {
    /// step number (1-based: steps completed)
    pub step: u64,
    /// ranks in the run
    pub ranks: usize,
    /// expert-parallel size
    pub ep: usize,
    /// mean loss over the step's target tokens
    pub loss: f32,
    /// the loss or gradient norm was not finite, so no update was made
    pub skipped: bool,
    /// learning rate used
    pub lr: f32,
    /// auxiliary balancing loss (0 when none is configured)
    pub aux_loss: f32,
    /// gradient norm before clipping
    pub grad_norm: f32,
    /// tokens processed (`B·T·accum`)
    pub tokens: usize,
    /// wall time of the step
    pub step_s: f64,
    /// throughput
    pub tokens_per_s: f64,
    /// model FLOP utilisation against the measured GEMM peak
    pub mfu: f64,
    /// seconds of communication: expert-parallel all-to-all plus gradient reduction
    /// (this rank; 0 on one rank)
    pub comm_s: f64,
    /// seconds of communication not hidden behind computation: the time the compute
    /// thread waited for all-to-all exchanges, plus gradient reduction (not overlapped)
    pub exposed_comm_s: f64,
    /// seconds the all-to-all exchanges ran, on the communication stream (this rank)
    pub a2a_s: f64,
    /// seconds the compute thread waited for them (`a2a_s` minus what overlap hid)
    pub a2a_exposed_s: f64,
    /// all-to-all bytes sent between ranks of one node (all ranks)
    pub a2a_bytes_intra_node: u64,
    /// all-to-all bytes sent between nodes (all ranks)
    pub a2a_bytes_inter_node: u64,
    /// inter-node bytes a hierarchical all-to-all would send for the same routing (each
    /// token crossing to each remote node once per exchange; all ranks). Predicted from
    /// the routing: the exchange itself is still flat.
    pub a2a_bytes_inter_node_hierarchical: u64,
    /// per MoE layer, tokens routed to each expert
    pub expert_counts: Vec<Vec<usize>>,
    /// max over layers of (busiest expert's tokens / mean tokens per expert)
    pub expert_imbalance: f64,
    /// per MoE layer, routed rows each expert-parallel rank computed on (under expert
    /// parallelism: its slots' rows, replicas included; on one rank: as if the experts
    /// were split into `stats_ep` consecutive blocks)
    pub rank_counts: Vec<Vec<usize>>,
    /// `Σ_layers max_rank_load / Σ_layers mean_rank_load`: how much longer the MoE part
    /// of a step takes than with perfectly even ranks
    pub rank_load_imbalance: f64,
    /// most heap bytes live at once during the step (weights, gradients, moments,
    /// activations, buffers: exact, from the counting allocator; 0 when the binary does
    /// not install it)
    pub peak_bytes: usize,
    /// bytes of activations saved for backward by the largest micro-batch forward
    pub activation_bytes: usize,
    /// expert slots that received another expert after this step (dynamic placement)
    pub experts_moved: usize,
    /// `rank_load_imbalance` the placement in force predicts from the load average
    /// (dynamic placement; 0 when off)
    pub predicted_rank_load_imbalance: f64,
}

/// Tokens per expert-parallel rank when `E` experts are split into `ranks` consecutive
/// blocks.
pub fn rank_loads(counts: &[Vec<usize>], ranks: usize) -> Vec<Vec<usize>> {
    counts
        .iter()
        .map(|c| {
            let per = c.len().div_ceil(ranks.max(1)).max(1);
            c.chunks(per).map(|b| b.iter().sum()).collect()
        })
        .collect()
}

/// Rows per rank from per-slot rows, `slots` consecutive slots per rank.
pub fn slot_rank_loads(slot_counts: &[Vec<usize>], slots: usize) -> Vec<Vec<usize>> {
    slot_counts.iter().map(|c| c.chunks(slots.max(1)).map(|b| b.iter().sum()).collect()).collect()
}

/// `Σ_layers max / Σ_layers mean` of per-rank loads (1 = perfectly even).
pub fn rank_load_imbalance(loads: &[Vec<usize>]) -> f64 {
    let loads: Vec<Vec<f64>> = loads.iter().map(|l| l.iter().map(|&x| x as f64).collect()).collect();
    ultramoe_model::moe::placement::layers_imbalance(&loads)
}

/// Busiest expert over mean expert load, maximised over layers (1 = perfectly even).
pub fn expert_imbalance(counts: &[Vec<usize>]) -> f64 {
    counts
        .iter()
        .map(|c| {
            let mean = c.iter().sum::<usize>() as f64 / c.len().max(1) as f64;
            if mean > 0.0 {
                *c.iter().max().unwrap_or(&0) as f64 / mean
            } else {
                1.0
            }
        })
        .fold(1.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_loads_sum_blocks_of_experts() {
        let counts = vec![vec![10, 0, 5, 5], vec![4, 4, 4, 4]];
        let loads = rank_loads(&counts, 2);
        assert_eq!(loads, vec![vec![10, 10], vec![8, 8]]);
        assert_eq!(rank_load_imbalance(&loads), 1.0);
        let loads = rank_loads(&counts, 4);
        // (10 + 4) / (5 + 4)
        assert!((rank_load_imbalance(&loads) - 14.0 / 9.0).abs() < 1e-12);
        assert!((expert_imbalance(&counts) - 2.0).abs() < 1e-12);
    }
}

/// Adds per-layer counts into a running total (empty: takes them).
fn accumulate(total: &mut Vec<Vec<usize>>, counts: Vec<Vec<usize>>) {
    if total.is_empty() {
        *total = counts;
        return;
    }
    for (acc, layer) in total.iter_mut().zip(counts) {
        acc.iter_mut().zip(layer).for_each(|(a, x)| *a += x);
    }
}

fn comm_error(e: CommError) -> Error {
    Error::msg(format!("distributed run failed: {e}"))
}

/// Saved alongside the weights.
#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    optimizer_step: u64,
    data_position: StreamPos,
    config: TrainConfig,
    /// dynamic placement: each MoE layer's slot → expert map
    #[serde(default)]
    placement: Option<PlacementState>,
}

/// Where the experts were and the load average, so a resumed run continues exactly.
#[derive(Serialize, Deserialize)]
struct PlacementState {
    ranks: usize,
    slot_expert: Vec<Vec<usize>>,
    #[serde(default)]
    share: Vec<Vec<f64>>,
    load: Vec<Vec<f64>>,
}

/// A training run in progress.
pub struct Trainer {
    /// the model
    pub model: Model,
    /// weights
    pub w: Vec<f32>,
    g: Vec<f32>,
    /// optimizer
    pub opt: AdamW,
    /// learning-rate schedule
    pub sched: Schedule,
    /// hyper-parameters
    pub cfg: TrainConfig,
    /// data stream
    pub batcher: Batcher,
    /// steps completed
    pub step: u64,
    /// FLOP/s taken as 100% MFU
    pub peak_flops: f64,
    /// this rank's place in a distributed run (`None`: one rank)
    pub parallel: Option<Parallel>,
    /// the sharded optimizer, with ZeRO-1 (then `opt` is empty)
    pub zero: Option<Zero1>,
    /// dynamic expert placement, when on
    pub balancer: Option<Balancer>,
    /// all-to-all bytes per second between expert-parallel ranks (measured at the start
    /// when placement is on)
    ep_bandwidth: f64,
    /// steps in a row whose update was skipped (non-finite loss or gradient norm)
    skipped_in_a_row: u64,
    metrics: Option<std::fs::File>,
    metrics_path: PathBuf,
}

fn source_for(data: &DataSpec, vocab: usize, seq_len: usize) -> Result<Source> {
    Ok(match data {
        DataSpec::Math => Source::Generated { mix: Mix::default() },
        DataSpec::Jsonl(p) => {
            let items = read_jsonl(p).map_err(Error::msg)?;
            // An example longer than a row would be cut and lose (part of) its answer,
            // which is all that is trained: refuse it rather than train on nothing.
            for qa in &items {
                let n = crate::data::batch::example_tokens(&qa.question, &qa.answer).0.len();
                if n > seq_len {
                    return Err(Error::msg(format!(
                        "line {}: the example is {n} tokens, longer than seq-len {seq_len} (shorten it or raise --seq-len)",
                        qa.line
                    ))
                    .in_file(p));
                }
            }
            Source::Dataset { items }
        }
        DataSpec::Random => Source::Random { vocab },
    })
}

impl Trainer {
    /// A fresh run on one rank: weights from `w`, data from `cfg.data`.
    pub fn new(model: Model, w: Vec<f32>, cfg: TrainConfig, peak_flops: f64) -> Result<Self> {
        Self::with_mesh(model, w, cfg, peak_flops, None)
    }

    /// A fresh run on one rank of `mesh` (or one rank alone): `model` must be this rank's
    /// share ([`Model::expert_parallel`] over `mesh.ep`), `w` its weights.
    pub fn with_mesh(mut model: Model, w: Vec<f32>, cfg: TrainConfig, peak_flops: f64, mesh: Option<Mesh>) -> Result<Self> {
        cfg.validate_for(&model.cfg)?;
        let world = mesh.as_ref().map_or(1, |m| m.world.size());
        if let Some(m) = &mesh {
            if model.ep_rank_size().1 != m.ep_size() {
                return Err(Error::msg(format!(
                    "the model is split over {} expert-parallel ranks but the mesh has {}",
                    model.ep_rank_size().1,
                    m.ep_size()
                )));
            }
            if !cfg.micro_batch.is_multiple_of(world) {
                return Err(Error::field("micro_batch", format!("{} rows cannot be split evenly over {world} ranks", cfg.micro_batch)));
            }
        }
        let ep = mesh.as_ref().map_or(1, |m| m.ep_size());
        if (cfg.placement_every > 0 || cfg.redundant_experts > 0) && ep < 2 {
            return Err(Error::msg("dynamic expert placement and redundant experts need expert parallelism (--ep 2 or more)"));
        }
        if let Some(p) = model.placements().first() {
            let held = p.slots_per_rank - p.n_experts() / p.ranks;
            if held != cfg.redundant_experts {
                return Err(Error::msg(format!(
                    "the model has {held} redundant expert slots per rank but the training config asks for {}",
                    cfg.redundant_experts
                )));
            }
        }
        if let Some(m) = &mesh {
            let text = format!("{}{}", serde_json::to_string(&model.cfg.raw).unwrap_or_default(), serde_json::to_string(&cfg).unwrap_or_default());
            m.agree("model or training configuration", &text).map_err(comm_error)?;
        }
        if let Some(a) = &cfg.aux_loss {
            let kind = a.kind(cfg.seq_len)?;
            // Each micro-batch and each rank contributes its share of the step's mean.
            model.set_balance_loss(Some((kind, a.coef / (cfg.grad_accum.max(1) * world) as f32)));
        }
        model.set_routing_skew(cfg.routing_skew);
        if !cfg.memory_policy.is_empty() {
            if cfg.memory_policy.len() != model.layers.len() {
                let msg = format!("{} layer policies for {} layers", cfg.memory_policy.len(), model.layers.len());
                return Err(Error::field("memory_policy", msg));
            }
            model.policy = cfg.memory_policy.clone();
        }
        if let Some(dir) = &cfg.swap_dir {
            model.swap_dir = dir.clone();
        }
        model.swap_moments = cfg.swap_moments;
        if cfg.swap_moments || model.policy.iter().any(|p| p.swap && !p.full) {
            ultramoe_model::swap::check_dir(&model.swap_dir).map_err(|e| Error::field("swap_dir", e))?;
        }
        let source = source_for(&cfg.data, model.cfg.vocab_size, cfg.seq_len)?;
        let batcher = Batcher::new(source, cfg.seed + 1);
        let zero = match &mesh {
            Some(m) if cfg.zero1 => Some(Zero1::new(&model.layout, m, cfg.adamw.clone())),
            _ => None,
        };
        // With ZeRO-1 the moments live in the shards only.
        let full = ultramoe_model::params::ParamLayout::default();
        let opt = AdamW::new(if zero.is_some() { &full } else { &model.layout }, cfg.adamw.clone());
        let sched = Schedule { peak: cfg.lr, min: cfg.min_lr, warmup: cfg.warmup, total: cfg.steps };
        let g = vec![0.0; model.layout.total];
        if let Some(m) = &mesh {
            model.set_nodes(m.ep_nodes());
        }
        let parallel = mesh.map(|m| Parallel::new(m, &model.layout, cfg.overlap_grad_reduce && !cfg.zero1));
        let balancer = (cfg.placement_every > 0).then(|| Balancer::new(cfg.placement_every));
        let ep_bandwidth = match (&balancer, &parallel) {
            (Some(_), Some(p)) => probe_bandwidth(p.mesh.ep.as_ref()).map_err(comm_error)?,
            _ => 0.0,
        };
        Ok(Trainer { model, w, g, opt, sched, cfg, batcher, step: 0, peak_flops, parallel, zero, balancer, ep_bandwidth, skipped_in_a_row: 0, metrics: None, metrics_path: PathBuf::new() })
    }

    /// Appends one JSON object per step to `path`. Continuing a run (`continues`: the
    /// file is that run's), the lines written for steps after this trainer's (the run
    /// was killed after its last checkpoint, or before its first) and a line cut off by
    /// a kill are dropped first: the file reads as one run.
    pub fn log_metrics_to(&mut self, path: &Path, continues: bool) -> Result<()> {
        if let Some(text) = std::fs::read_to_string(path).ok().filter(|_| continues) {
            let step_of = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64()));
            let kept: Vec<&str> = text.lines().filter(|l| step_of(l).is_some_and(|s| s <= self.step)).collect();
            if kept.len() != text.lines().count() {
                let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
                write_atomic(path, body.as_bytes())?;
            }
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::msg(format!("cannot open metrics file: {e}")).in_file(path))?;
        self.metrics = Some(f);
        self.metrics_path = path.to_path_buf();
        Ok(())
    }

    /// Runs one optimizer step over `grad_accum` micro-batches. In a distributed run
    /// every rank must call it; a failed exchange is an error naming the rank.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let start = Instant::now();
        ultramoe_kernels::memory::reset_peak();
        let (b, t) = (self.cfg.micro_batch, self.cfg.seq_len);
        // Every rank draws the same global micro-batches and trains on its rows.
        let micro: Vec<_> = (0..self.cfg.grad_accum).map(|_| self.batcher.next_batch(b, t)).collect();
        let total_targets: usize =
            micro.iter().map(|m| m.targets.iter().filter(|&&x| x != ultramoe_kernels::loss::IGNORE).count()).sum();
        let scale = 1.0 / total_targets.max(1) as f32;
        let rows = self.parallel.as_ref().map_or(0..b, |p| p.rows(b));
        let (r0, r1, bl) = (rows.start * t, rows.end * t, rows.len());
        // `g` is zero here: it starts zeroed and every optimizer step clears it.
        let mut sums = [0.0f64; 5]; // Σ CE, Σ aux, then all-to-all bytes (intra, inter, inter if hierarchical)
        let mut counts: Vec<Vec<usize>> = vec![];
        let mut slot_counts: Vec<Vec<usize>> = vec![];
        let mut activation_bytes = 0;
        // Swapped moments leave now; the write is waited for once the first layer's
        // forward is done, and the read starts when the bottom layer's backward does.
        let mut moments = match self.cfg.swap_moments {
            true => Some(self.moments_out()?),
            false => None,
        };
        let mut reading: Option<Prefetch> = None;
        let (model, w, g) = (&self.model, &self.w, &mut self.g);
        // Gradient reductions start layer by layer during the last micro-batch's backward
        // (ZeRO-1 reduce-scatters in the optimizer step instead, and has no gradient stream).
        let mut overlap = self.parallel.as_mut().filter(|p| p.overlaps_reduction());
        let last = micro.len() - 1;
        catch_step(|| {
            for (i, mb) in micro.iter().enumerate() {
                let fwd = {
                    let _p = ultramoe_kernels::profile::scope("forward");
                    model.forward_hooked(w, &mb.ids[r0..r1], bl, t, &mut |layer| {
                        if let (0, Some((f, ticket))) = (layer, &mut moments) {
                            f.wait_written(ticket);
                        }
                    })
                };
                sums[1] += fwd.aux_loss() as f64;
                activation_bytes = activation_bytes.max(fwd.activation_bytes());
                accumulate(&mut counts, fwd.expert_counts());
                accumulate(&mut slot_counts, fwd.slot_counts());
                let _p = ultramoe_kernels::profile::scope("backward");
                let targets = &mb.targets[r0..r1];
                sums[0] += if i == last {
                    model
                        .backward_hooked(w, g, fwd, targets, scale, &mut |g, layer| {
                            if let Some(p) = overlap.as_deref_mut() {
                                p.layer_done(g, layer);
                            }
                            if let (1, Some((f, ticket))) = (layer, &mut moments) {
                                reading = Some(f.prefetch(ticket));
                            }
                        })
                        .0
                } else {
                    model.backward(w, g, fwd, targets, scale).0
                };
            }
        })?;
        if let Some((f, mut ticket)) = moments {
            let _p = ultramoe_kernels::profile::scope("swap.wait");
            let back = catch_step(|| {
                let read = reading.take().unwrap_or_else(|| f.prefetch(&mut ticket));
                f.finish(read)
            })?;
            let [m, v]: [Vec<f32>; 2] = back.try_into().expect("two moment buffers");
            let opt = self.stepping_optimizer();
            (opt.m, opt.v) = (m, v);
        }
        let x = self.model.take_exchange_totals();
        sums[2] = x.intra_node_bytes as f64;
        sums[3] = x.inter_node_bytes as f64;
        sums[4] = x.inter_node_bytes_hierarchical as f64;
        let opt_scope = ultramoe_kernels::profile::scope("optimizer");
        let mut comm_s = x.seconds;
        let mut exposed_s = x.exposed_seconds;
        let lr = self.sched.lr(self.step);
        if let Some(p) = &mut self.parallel {
            // Reductions still in flight on the gradient stream use the world group:
            // finish them before this thread uses it.
            if self.zero.is_none() {
                p.reduce_grads(&mut self.g).map_err(comm_error)?;
            }
            // Replicated experts: every copy gets the whole expert's gradient (linear, so
            // before or after the data-parallel sum alike).
            self.model.sum_replica_grads(&mut self.g).map_err(comm_error)?;
            let n = counts.len();
            counts.append(&mut slot_counts);
            p.sum_counts(&mut counts).map_err(comm_error)?;
            slot_counts = counts.split_off(n);
            p.sum(&mut sums).map_err(comm_error)?;
        }
        let clip = self.cfg.clip;
        // Every rank holds the same summed loss, so every rank decides alike.
        let loss = (sums[0] / total_targets.max(1) as f64) as f32;
        // Non-primary expert copies are left out of the norm (their primary counts).
        let duplicates = self.model.duplicate_ranges();
        let grad_norm = match (&mut self.parallel, &mut self.zero) {
            // A non-finite loss: no update (ZeRO-1 would otherwise step its shards first).
            (_, Some(_)) if !loss.is_finite() => {
                self.g.fill(0.0);
                f32::NAN
            }
            (Some(p), Some(z)) => {
                let norm = z.step(&p.mesh, &mut self.w, &mut self.g, lr, clip, &duplicates).map_err(comm_error)?;
                let c = z.take_comm_s();
                comm_s += c;
                exposed_s += c;
                norm
            }
            (Some(p), None) => {
                let norm = p.grad_norm(&self.g, &duplicates).map_err(comm_error)?;
                let (busy, waited) = p.take_comm_s();
                comm_s += busy;
                exposed_s += waited;
                norm
            }
            (None, _) => global_norm(&self.g),
        };
        // A non-finite loss or gradient norm skips the update (ZeRO-1 skipped its own);
        // a run that keeps producing them stops, naming the step.
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        if skipped {
            self.g.fill(0.0);
        } else if self.zero.is_none() {
            // ZeRO-1 clipped and stepped its shard above; otherwise the whole buffer here.
            clip_to_norm(&mut self.g, grad_norm, clip);
            self.opt.step(&mut self.w, &mut self.g, lr);
        }
        drop(opt_scope);
        self.step += 1;
        self.skipped_in_a_row = if skipped { self.skipped_in_a_row + 1 } else { 0 };
        let (experts_moved, predicted) = if skipped {
            (0, 0.0)
        } else {
            if self.cfg.bias_update_rate > 0.0 {
                self.update_router_bias(&counts);
            }
            self.rebalance(&counts)?
        };
        let step_s = start.elapsed().as_secs_f64();
        let tokens = b * t * self.cfg.grad_accum;
        let flops = self.model.train_flops(b, t) * self.cfg.grad_accum as f64;
        let rank_counts = match self.model.placements().first() {
            Some(p) if p.ranks > 1 => slot_rank_loads(&slot_counts, p.slots_per_rank),
            _ => rank_loads(&counts, self.cfg.stats_ep),
        };
        let stats = StepStats {
            step: self.step,
            ranks: self.parallel.as_ref().map_or(1, |p| p.world()),
            ep: self.ep().1,
            loss,
            skipped,
            lr,
            aux_loss: sums[1] as f32,
            grad_norm,
            tokens,
            step_s,
            tokens_per_s: tokens as f64 / step_s,
            mfu: flops / step_s / self.peak_flops,
            comm_s,
            exposed_comm_s: exposed_s,
            a2a_s: x.seconds,
            a2a_exposed_s: x.exposed_seconds,
            a2a_bytes_intra_node: sums[2] as u64,
            a2a_bytes_inter_node: sums[3] as u64,
            a2a_bytes_inter_node_hierarchical: sums[4] as u64,
            expert_imbalance: expert_imbalance(&counts),
            rank_load_imbalance: rank_load_imbalance(&rank_counts),
            rank_counts,
            expert_counts: counts,
            peak_bytes: ultramoe_kernels::memory::peak_bytes(),
            activation_bytes,
            experts_moved,
            predicted_rank_load_imbalance: predicted,
        };
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{}", serde_json::to_string(&stats).unwrap_or_default())
                .map_err(|e| Error::msg(format!("cannot write metrics: {e}")).in_file(&self.metrics_path))?;
        }
        if skipped {
            let limit = self.cfg.max_nonfinite_steps;
            if self.skipped_in_a_row >= limit {
                return Err(Error::msg(format!(
                    "step {}: loss {loss}, gradient norm {grad_norm}: not finite for {limit} step(s) in a row (updates skipped); \
                     training stopped (lower the learning rate or check the data)",
                    self.step
                )));
            }
            if self.is_lead() {
                eprintln!("warning: step {}: loss {loss}, gradient norm {grad_norm}: not finite; the update is skipped", self.step);
            }
        }
        Ok(stats)
    }

    /// Aux-loss-free balancing (DeepSeek-V3): after each step every expert's correction
    /// bias moves by `γ · sign(mean load − its load)`, so overloaded experts become less
    /// likely to be chosen. The bias only affects which experts are chosen, never the
    /// combine weights, so the loss being optimised is unchanged.
    fn update_router_bias(&mut self, counts: &[Vec<usize>]) {
        let rate = self.cfg.bias_update_rate;
        let moe = self.model.layers.iter().filter_map(|l| match &l.ffn {
            ultramoe_model::decoder::FfnBlock::Moe(m) => Some(m),
            _ => None,
        });
        for (m, c) in moe.zip(counts) {
            let Some(slot) = &m.router.bias else { continue };
            let mean = c.iter().sum::<usize>() as f32 / c.len().max(1) as f32;
            for (b, &n) in self.w[slot.clone()].iter_mut().zip(c) {
                *b += rate * (mean - n as f32).signum() * ((mean - n as f32) != 0.0) as i32 as f32;
            }
        }
    }

    /// Dynamic placement after a step: folds the step's global expert loads into the
    /// average and, on decision steps, migrates the layers where moving pays (weights
    /// and optimizer moments travel together). Returns the slots that changed expert and
    /// the placement's predicted rank imbalance.
    fn rebalance(&mut self, counts: &[Vec<usize>]) -> Result<(usize, f64)> {
        let Some(b) = &mut self.balancer else { return Ok((0, 0.0)) };
        b.observe(counts);
        let dp = self.parallel.as_ref().map_or(1, |p| p.mesh.dp_size());
        let m = &self.model.cfg.moe;
        let costs = Costs { hidden: self.model.cfg.hidden, inter: m.expert_inter, peak_flops: self.peak_flops, bandwidth: self.ep_bandwidth, dp };
        let moves = b.decide(self.step, &self.model.placements(), costs);
        let mut moved = 0;
        if !moves.is_empty() {
            let _p = ultramoe_kernels::profile::scope("placement.migrate");
            // ZeRO-1 moments come together first (collective), move, and are re-sharded.
            let gathered = match (&self.zero, &self.parallel) {
                (Some(z), Some(p)) => Some(z.gather_moments(&p.mesh, self.model.layout.total).map_err(comm_error)?),
                _ => None,
            };
            let (mut zm, mut zv) = gathered.unwrap_or_default();
            for mv in moves {
                moved += mv.placement.moved_slots(self.model.placements()[mv.layer]);
                let (m, v) = if self.zero.is_some() { (&mut zm, &mut zv) } else { (&mut self.opt.m, &mut self.opt.v) };
                self.model.migrate(mv.layer, mv.placement, &mut [&mut self.w, m, v]).map_err(comm_error)?;
            }
            if let Some(z) = &mut self.zero {
                z.set_moments(&zm, &zv);
            }
        }
        let b = self.balancer.as_ref().expect("placement is on");
        Ok((moved, b.predicted_imbalance(&self.model.placements())))
    }

    /// Starts writing the optimizer moments to a new swap file (their memory is freed
    /// once written).
    fn moments_out(&mut self) -> Result<(SwapFile, SwapTicket)> {
        let mut f = SwapFile::create(&self.model.swap_dir).map_err(|e| Error::field("swap_dir", format!("{}: {e}", self.model.swap_dir.display())))?;
        let opt = self.stepping_optimizer();
        let ticket = f.write(vec![std::mem::take(&mut opt.m), std::mem::take(&mut opt.v)]);
        Ok((f, ticket))
    }

    /// The AdamW that steps this rank's parameters: ZeRO-1's shard, or the whole one.
    fn stepping_optimizer(&mut self) -> &mut AdamW {
        self.zero.as_mut().map_or(&mut self.opt, |z| &mut z.opt)
    }

    /// Optimizer steps taken.
    pub fn optimizer_steps(&self) -> u64 {
        self.zero.as_ref().map_or(self.opt.t, |z| z.opt.t)
    }

    /// This rank's expert-parallel index and size.
    fn ep(&self) -> (usize, usize) {
        self.model.ep_rank_size()
    }

    /// True on the rank that writes run-wide files (rank 0 of the world).
    pub fn is_lead(&self) -> bool {
        self.parallel.as_ref().is_none_or(|p| p.rank() == 0)
    }

    /// True on the ranks that write their share of a checkpoint: the first
    /// data-parallel copy of each expert-parallel rank.
    fn writes_share(&self) -> bool {
        self.parallel.as_ref().is_none_or(|p| p.mesh.dp.rank() == 0)
    }

    fn barrier(&self) -> Result<()> {
        match &self.parallel {
            Some(p) => p.mesh.world.barrier().map_err(comm_error),
            None => Ok(()),
        }
    }

    /// An error (on every rank alike) when any of `bufs` holds a NaN or an infinity:
    /// nothing non-finite is ever saved, so the last checkpoint stays the last good one.
    fn check_finite(&self, bufs: &[(&str, &[f32])]) -> Result<()> {
        let mut bad: Vec<u64> = bufs.iter().map(|(_, b)| ultramoe_model::checkpoint::count_nonfinite(b) as u64).collect();
        if let Some(p) = &self.parallel {
            p.mesh.world.all_reduce_u64(&mut bad).map_err(comm_error)?;
        }
        match bufs.iter().zip(&bad).find(|(_, &n)| n > 0) {
            None => Ok(()),
            Some(((what, b), n)) => {
                let first = self.model.layout.specs.iter().find(|s| b.get(s.range()).is_some_and(|x| x.iter().any(|v| !v.is_finite())));
                let name = first.map_or(String::new(), |s| format!(" (first in `{}`)", s.name));
                Err(Error::msg(format!("step {}: {what} hold {n} non-finite values{name}; nothing saved", self.step)))
            }
        }
    }

    /// Saves the model (every rank's share) to `dir` in the Hugging Face layout. Every
    /// rank must call it; it returns when the directory is complete.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        self.check_finite(&[("weights", &self.w)])?;
        if self.writes_share() {
            save_model_share(&self.model, &self.w, dir)?;
        }
        self.barrier()
    }

    /// Writes a checkpoint under `run_dir/checkpoints/` and points `latest` at it; keeps
    /// the newest `keep` checkpoints. In a distributed run every rank must call it: each
    /// writes its share (weights and moments of its experts; rank 0 also the replicated
    /// tensors), rank 0 the run state, and `latest` moves only after all shares are down.
    pub fn save_checkpoint(&self, run_dir: &Path, keep: usize) -> Result<PathBuf> {
        let root = run_dir.join("checkpoints");
        let name = format!("step-{:07}", self.step);
        let dir = root.join(&name);
        // ZeRO-1 shards come together first (a collective: before any rank branches).
        let gathered = match (&self.zero, &self.parallel) {
            (Some(z), Some(p)) => Some(z.gather_moments(&p.mesh, self.model.layout.total).map_err(comm_error)?),
            _ => None,
        };
        let (m, v) = gathered.as_ref().map_or((&self.opt.m[..], &self.opt.v[..]), |(m, v)| (&m[..], &v[..]));
        self.check_finite(&[("weights", &self.w), ("exp_avg", m), ("exp_avg_sq", v)])?;
        if self.writes_share() {
            save_model_share(&self.model, &self.w, &dir)?;
            let (k, p) = self.ep();
            let mut tensors = Vec::with_capacity(2 * self.model.layout.specs.len());
            for s in self.model.layout.specs.iter().filter(|s| ultramoe_model::checkpoint::saved_by(&self.model.layout, s, k)) {
                tensors.push((format!("exp_avg.{}", s.name), s.shape.clone(), &m[s.range()]));
                tensors.push((format!("exp_avg_sq.{}", s.name), s.shape.clone(), &v[s.range()]));
            }
            let file = if p == 1 { "optimizer.safetensors".to_string() } else { format!("optimizer-{:05}-of-{p:05}.safetensors", k + 1) };
            write_safetensors(&dir.join(file), &tensors, None)?;
        }
        self.barrier()?;
        if self.is_lead() {
            let state = TrainerState {
                step: self.step,
                optimizer_step: self.optimizer_steps(),
                data_position: self.batcher.position(),
                config: self.cfg.clone(),
                placement: self.balancer.as_ref().map(|b| PlacementState {
                    ranks: self.ep().1,
                    slot_expert: self.model.placements().iter().map(|p| p.slot_expert.clone()).collect(),
                    share: self.model.placements().iter().map(|p| p.share.clone()).collect(),
                    load: b.load.clone(),
                }),
            };
            write_atomic(&dir.join("trainer_state.json"), serde_json::to_string_pretty(&state).unwrap().as_bytes())?;
            write_atomic(&root.join("latest"), name.as_bytes())?;
            // Prune older checkpoints (never the one just written).
            let mut all: Vec<String> = std::fs::read_dir(&root)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            all.retain(|n| n.starts_with("step-"));
            all.sort();
            let excess = all.len().saturating_sub(keep.max(1));
            for old in all.into_iter().take(excess) {
                if old != name {
                    let _ = std::fs::remove_dir_all(root.join(old));
                }
            }
        }
        self.barrier()?;
        Ok(dir)
    }

    /// The newest complete checkpoint of a run, if any.
    pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
        crate::run_dir::latest_checkpoint(run_dir).ok().flatten()
    }

    /// Resumes from a checkpoint directory: weights, moments, step, data position and
    /// the training config (with `steps` optionally extended).
    pub fn resume(dir: &Path, peak_flops: f64, steps: Option<u64>) -> Result<Self> {
        Self::resume_with_mesh(dir, peak_flops, steps, None, None)
    }

    /// [`Trainer::resume`] on one rank of `mesh`. The checkpoint may have been written
    /// under any expert- and data-parallel layout, with or without ZeRO-1: tensors are
    /// found by name in whatever shards hold them, and each rank takes its share.
    /// `zero1` switches ZeRO-1 on or off for the continued run (`None`: as saved).
    pub fn resume_with_mesh(dir: &Path, peak_flops: f64, steps: Option<u64>, mesh: Option<Mesh>, zero1: Option<bool>) -> Result<Self> {
        Self::resume_prepared(dir, peak_flops, mesh, &mut |_, cfg| {
            if let Some(s) = steps {
                cfg.steps = s;
            }
            if let Some(z) = zero1 {
                cfg.zero1 = z;
            }
            Ok(())
        })
    }

    /// The training config a checkpoint was saved with.
    pub fn saved_config(dir: &Path) -> Result<TrainConfig> {
        Ok(read_state(dir)?.config)
    }

    /// [`Trainer::resume_with_mesh`] with the continued run's settings given by
    /// `prepare`, called with this rank's model (before any weights are read) and the
    /// saved config: it may change what does not change the numbers (steps, memory
    /// policy, ZeRO-1) — the caller is responsible for refusing anything else.
    pub fn resume_prepared(dir: &Path, peak_flops: f64, mesh: Option<Mesh>, prepare: &mut dyn FnMut(&mut Model, &mut TrainConfig) -> Result<()>) -> Result<Self> {
        let state_path = dir.join("trainer_state.json");
        let state = read_state(dir)?;
        let cfg_model = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut cfg = state.config;
        let ep = mesh.as_ref().map_or(1, |m| m.ep_size());
        if ep < 2 {
            // Placement is an expert-parallel matter: one rank holds every expert once.
            (cfg.placement_every, cfg.redundant_experts) = (0, 0);
        }
        // The saved placement continues when the expert-parallel size is unchanged;
        // otherwise experts start from contiguous blocks (names, not slots, find them).
        let placed = state.placement.as_ref().filter(|p| p.ranks == ep);
        let model = match &mesh {
            Some(m) => match placed {
                Some(p) => {
                    let e = cfg_model.moe.n_experts;
                    let ps = p
                        .slot_expert
                        .iter()
                        .enumerate()
                        .map(|(i, map)| {
                            let pl = Placement::new(ep, e, map.clone())?;
                            match p.share.get(i) {
                                Some(sh) => pl.with_shares(sh.clone()),
                                None => Ok(pl),
                            }
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| Error::field("placement", e).in_file(&state_path))?;
                    Model::expert_parallel_placed(cfg_model, m.ep.clone(), ps)?
                }
                None => Model::expert_parallel_redundant(cfg_model, m.ep.clone(), cfg.redundant_experts)?,
            },
            None => Model::new(cfg_model),
        };
        let mut model = model;
        prepare(&mut model, &mut cfg)?;
        let w = load_weights(&model, dir)?;
        let mut tr = Trainer::with_mesh(model, w, cfg, peak_flops, mesh)?;
        let moments = read_optimizer_shards(dir)?;
        let total = tr.model.layout.total;
        let (mut m, mut v) = (vec![0.0; total], vec![0.0; total]);
        for s in &tr.model.layout.specs {
            for (prefix, buf) in [("exp_avg.", &mut m), ("exp_avg_sq.", &mut v)] {
                let key = format!("{prefix}{}", s.name);
                let (t, file) = moments.get(&key).ok_or_else(|| Error::field(&key, "missing optimizer state").in_file(dir))?;
                if t.shape != s.shape {
                    return Err(Error::field(&key, format!("shape {:?} does not match {:?}", t.shape, s.shape)).in_file(file));
                }
                let values = t.f32(&key).map_err(|e| e.in_file(file))?;
                let bad = ultramoe_model::checkpoint::count_nonfinite(values);
                if bad > 0 {
                    return Err(Error::field(&key, format!("{bad} of {} values are not finite (NaN or Inf)", values.len())).in_file(file));
                }
                buf[s.range()].copy_from_slice(values);
            }
        }
        match &mut tr.zero {
            Some(z) => {
                z.set_moments(&m, &v);
                z.opt.t = state.optimizer_step;
            }
            None => {
                (tr.opt.m, tr.opt.v) = (m, v);
                tr.opt.t = state.optimizer_step;
            }
        }
        tr.step = state.step;
        tr.batcher.restore(state.data_position);
        if let (Some(b), Some(p)) = (&mut tr.balancer, placed) {
            b.load = p.load.clone();
        }
        Ok(tr)
    }
}

/// A checkpoint's `trainer_state.json`.
fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&state_path))?;
    serde_json::from_str(&text).map_err(|e| Error::msg(format!("not a trainer state: {e}")).in_file(&state_path))
}

/// Every optimizer tensor of a checkpoint, from `optimizer.safetensors` or the
/// per-expert-parallel-rank `optimizer-*-of-*.safetensors` shards, with its file.
fn read_optimizer_shards(dir: &Path) -> Result<std::collections::BTreeMap<String, (Tensor, PathBuf)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::msg(format!("cannot read directory: {e}")).in_file(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("optimizer") && n.ends_with(".safetensors")))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::msg("no optimizer state (optimizer*.safetensors)").in_file(dir));
    }
    let mut out = std::collections::BTreeMap::new();
    for f in files {
        for (name, t) in read_safetensors(&f)? {
            out.insert(name, (t, f.clone()));
        }
    }
    Ok(out)
}
