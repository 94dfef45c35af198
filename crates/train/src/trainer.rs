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

use crate::data::batch::{Batch, Batcher, Source, StreamPos};
use crate::data::corpus::Corpus;
use crate::data::text::TextTokenizer;
use crate::data::jsonl::read_jsonl;
use crate::data::math::Mix;
use crate::optimizer::{clip_to_norm, global_norm, AdamW, AdamWConfig};
use crate::parallel::{catch_step, Parallel};
use crate::pipeline::{Hooks, Pipeline};
use crate::placement::{probe_bandwidth, Balancer, Costs};
use crate::spec::{PipelineSchedule as ScheduleKind, RunSpec};
use crate::trace::{PassEvent, EVENT_WORDS};
use ultramoe_model::init::init_weights;
use ultramoe_model::moe::dispatcher::ExpertExchange;
use ultramoe_model::moe::placement::Placement;
use ultramoe_model::swap::{Prefetch, SwapFile, SwapTicket};
use ultramoe_model::PassOptions;
use ultramoe_schedule::Schedule as PipelineSchedule;
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
    /// generated math problems of these kinds only (`Kind::name`, or `name=weight`),
    /// each at its weight in the default mix unless one is given
    MathKinds(Vec<String>),
    /// a JSONL file of `{"question", "answer"}`
    Jsonl(PathBuf),
    /// uniformly random token ids over the model's vocabulary, every position trained
    /// (throughput benchmarks)
    Random,
    /// text or JSONL documents (`{"text"}` lines, or `{"messages"}` chats trained on the
    /// assistant's turns) through the run's tokenizer, or one directory of pre-tokenized
    /// shards
    Documents(Vec<PathBuf>),
}

/// Training hyper-parameters: what is trained (how a step runs is a
/// [`RunSpec`](crate::spec::RunSpec)).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// seed for weights (seed) and data (seed + 1)
    pub seed: u64,
    /// optimizer steps
    pub steps: u64,
    /// rows per micro-batch `B` (the global batch: split over each pipeline stage's
    /// expert- and data-parallel ranks)
    pub micro_batch: usize,
    /// tokens per row `T`
    pub seq_len: usize,
    /// micro-batches per step (a pipeline's micro-batches)
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
    /// steps in a row with a non-finite loss or gradient norm (each skipped) after
    /// which training stops with an error
    #[serde(default = "three")]
    pub max_nonfinite_steps: u64,
    /// the tokenizer's directory (`tokenizer.json`, `tokenizer_config.json`) for text
    /// data; copied into every checkpoint and the final model
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// packed rows keep attention inside each document and restart positions at each
    /// (false: the rows are single sequences whose examples see each other — what runs
    /// saved before document masks did)
    #[serde(default)]
    pub doc_masks: bool,
    /// documents held out of training for the evaluation loss (fraction of the corpus)
    #[serde(default)]
    pub eval_fraction: f64,
    /// evaluate the held-out loss every N steps (0: never)
    #[serde(default)]
    pub eval_every: u64,
    /// micro-batches the held-out loss is measured on (always the same ones)
    #[serde(default = "four")]
    pub eval_batches: usize,
}

fn three() -> u64 {
    3
}

fn four() -> usize {
    4
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
        if !(self.eval_fraction.is_finite() && (0.0..1.0).contains(&self.eval_fraction)) {
            return Err(Error::field("eval_fraction", format!("must be in [0, 1), found {}", self.eval_fraction)));
        }
        if self.eval_batches == 0 {
            return Err(Error::field("eval_batches", "must be at least 1"));
        }
        if self.eval_every > 0 && !matches!(self.data, DataSpec::Documents(_)) {
            return Err(Error::field("eval_every", "the held-out loss is measured on text data (--data FILES); the math model has `eval`"));
        }
        if self.eval_every > 0 && self.eval_fraction == 0.0 {
            return Err(Error::field("eval_every", "no documents are held out: give --eval-fraction too"));
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
        if matches!(self.data, DataSpec::Math | DataSpec::MathKinds(_) | DataSpec::Jsonl(_)) && model.vocab_size < crate::data::tokenizer::VOCAB_SIZE {
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
            max_nonfinite_steps: 3,
            tokenizer: None,
            doc_masks: true,
            eval_fraction: 0.0,
            eval_every: 0,
            eval_batches: 4,
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
    /// tensor-parallel size
    pub tp: usize,
    /// expert-parallel size
    pub ep: usize,
    /// pipeline stages
    pub pp: usize,
    /// model chunks per pipeline rank
    pub vpp: usize,
    /// data-parallel copies (within a stage)
    pub dp: usize,
    /// the pipeline schedule
    pub schedule: &'static str,
    /// per pipeline stage: seconds its passes computed (the step's span less the waits
    /// for other stages' activations and gradients), from the stage's first rank
    pub stage_busy_s: Vec<f64>,
    /// per pipeline stage: seconds of the pipeline's makespan (from the step's first pass
    /// to the last stage's last) it did not compute: the bubble, and any wait for
    /// slower stages
    pub stage_idle_s: Vec<f64>,
    /// per pipeline stage: the most heap bytes its first rank's process held during the
    /// step (ranks that are threads of one process share its count)
    pub stage_peak_bytes: Vec<usize>,
    /// per pipeline stage: the peak its first rank's memory plan predicts for the step
    /// (weights, gradients, moments, saved activations of the micro-batches in flight,
    /// temporaries; kernel workspaces too when `--memory-budget` measured them, which
    /// it does except under expert parallelism)
    pub stage_predicted_peak_bytes: Vec<usize>,
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
    /// mean cross-entropy on the held-out documents (steps that evaluate)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f32>,
    /// `exp(eval_loss)`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f32>,
    /// completed passes over the training data
    pub epoch: u64,
    /// tokens placed in rows from each data file so far (text data)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens_seen: Vec<u64>,
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

fn comm_error(e: CommError) -> Error {
    Error::msg(format!("distributed run failed: {e}"))
}


/// Saved alongside the weights.
#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    optimizer_step: u64,
    data_position: StreamPos,
    /// tokens placed from each data file (text data)
    #[serde(default)]
    data_seen: Vec<u64>,
    config: TrainConfig,
    /// how the step ran (absent in checkpoints from before the run specification: the
    /// run settings then sit in `config`)
    #[serde(default)]
    spec: Option<RunSpec>,
    /// dynamic placement, in checkpoints from before per-stage placement files
    #[serde(default)]
    placement: Option<PlacementState>,
}

/// Where one stage's experts were and the load average, so a resumed run continues
/// exactly (`placement-SSSSS-of-PPPPP.json`, one per pipeline stage).
#[derive(Serialize, Deserialize)]
struct PlacementState {
    ranks: usize,
    /// the model-wide MoE-layer index of each entry (absent: every MoE layer, in order)
    #[serde(default)]
    moe_layers: Option<Vec<usize>>,
    slot_expert: Vec<Vec<usize>>,
    #[serde(default)]
    share: Vec<Vec<f64>>,
    load: Vec<Vec<f64>>,
}

/// How a fresh run's weights start.
pub enum Weights {
    /// drawn from this seed (every layout draws the single rank's weights)
    Seed(u64),
    /// read from a model or checkpoint directory (the Hugging Face layout)
    From(PathBuf),
}

/// Where a run is: its ranks (`mesh`, `None` alone), the FLOP/s that count as 100% MFU,
/// and how many of its ranks share this process's memory (threads of the in-process
/// backend; 1 under MPI).
pub struct Place {
    /// the device mesh (`None`: one rank)
    pub mesh: Option<Mesh>,
    /// FLOP/s taken as 100% MFU (and the rate memory-policy costs are priced at)
    pub peak_flops: f64,
    /// ranks in this process
    pub ranks_here: usize,
}

impl Place {
    /// One rank alone.
    pub fn alone(peak_flops: f64) -> Place {
        Place { mesh: None, peak_flops, ranks_here: 1 }
    }

    /// A rank of `mesh` (threads of this process when `threads`).
    pub fn on(mesh: Mesh, peak_flops: f64, threads: bool) -> Place {
        let ranks_here = if threads { mesh.world.size() } else { 1 };
        Place { mesh: Some(mesh), peak_flops, ranks_here }
    }

    fn world(&self) -> usize {
        self.mesh.as_ref().map_or(1, |m| m.world.size())
    }
}

/// A training run in progress.
pub struct Trainer {
    /// this rank's share of the model
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
    /// how a step runs
    pub spec: RunSpec,
    /// the options every pass runs with (the spec's, with a memory budget's choice)
    pub pass: PassOptions,
    /// the pipeline schedule of every pipeline rank
    pub pipeline: PipelineSchedule,
    /// data stream
    pub batcher: Batcher,
    /// the held-out documents (text data with `eval_fraction` > 0)
    eval_source: Option<Source>,
    /// this rank's predicted step peak (bytes), from its memory plan
    pub predicted_peak: usize,
    /// steps completed
    pub step: u64,
    /// FLOP/s taken as 100% MFU
    pub peak_flops: f64,
    /// MFU's peak once a step ran faster than `peak_flops` (the fastest step's rate)
    mfu_peak: Option<f64>,
    /// this rank's place in a distributed run (`None`: one rank)
    pub parallel: Option<Parallel>,
    /// the sharded optimizer, with ZeRO-1 (then `opt` is empty)
    pub zero: Option<Zero1>,
    /// dynamic expert placement, when on
    pub balancer: Option<Balancer>,
    /// a second expert exchange, for forwards that run beside a backward (overlapped
    /// schedule)
    forward_lane: Option<ExpertExchange>,
    /// the forward lane's own thread pool (overlapped schedule), as many workers as the
    /// step's (see [`on_pool_worker`])
    lane_pool: Option<rayon::ThreadPool>,
    /// all-to-all bytes per second between expert-parallel ranks (measured at the start
    /// when placement is on)
    ep_bandwidth: f64,
    /// steps in a row whose update was skipped (non-finite loss or gradient norm)
    skipped_in_a_row: u64,
    /// whether a step is moved onto a worker of the thread pool (see [`on_pool_worker`]):
    /// when this rank is alone in its process (ranks that are threads of one process
    /// already run on a pool of their own, `ultramoe_dist::local::run`)
    steps_on_pool: bool,
    metrics: Option<std::fs::File>,
    metrics_path: PathBuf,
}

/// The training stream's source and, for documents with some held out, the held-out
/// stream's.
fn sources_for(cfg: &TrainConfig, vocab: usize) -> Result<(Source, Option<Source>)> {
    let DataSpec::Documents(paths) = &cfg.data else { return Ok((source_for(&cfg.data, vocab, cfg.seq_len)?, None)) };
    let tok = match &cfg.tokenizer {
        Some(dir) => Some(TextTokenizer::load_hf(dir, vocab).map_err(|e| Error::field("tokenizer", e.reason).in_file(&e.file))?),
        None => None,
    };
    let corpus = Corpus::load(paths, tok.as_ref())?;
    if corpus.vocab_size > vocab {
        return Err(Error::field("vocab_size", format!("the data's tokenizer has {} tokens, more than the model's vocabulary ({vocab})", corpus.vocab_size))
            .in_file(&paths[0]));
    }
    let (train, eval) = corpus.split(cfg.eval_fraction);
    // (a stream of empty documents would never fill a row)
    if train.iter().all(|&d| corpus.doc(d as usize).tokens.is_empty()) {
        return Err(Error::msg("the training documents hold no tokens").in_file(&paths[0]));
    }
    let corpus = std::sync::Arc::new(corpus);
    let eval = (!eval.is_empty()).then(|| Source::Documents { corpus: corpus.clone(), docs: std::sync::Arc::new(eval), shuffle: false });
    Ok((Source::Documents { corpus, docs: std::sync::Arc::new(train), shuffle: true }, eval))
}

fn source_for(data: &DataSpec, vocab: usize, seq_len: usize) -> Result<Source> {
    Ok(match data {
        DataSpec::Math => Source::Generated { mix: Mix::default() },
        DataSpec::MathKinds(names) => Source::Generated { mix: Mix::only(names).map_err(Error::msg)? },
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
        DataSpec::Documents(_) => unreachable!("documents are read by sources_for"),
    })
}

/// Tensors a stage's share holds, by rank in the pipeline, to name files.
fn pipeline_files(prefix: &str, model: &Model, shards: usize) -> String {
    let index = ultramoe_model::checkpoint::share_index(model);
    if shards == 1 {
        format!("{prefix}.safetensors")
    } else {
        format!("{prefix}-{:05}-of-{shards:05}.safetensors", index + 1)
    }
}

impl Trainer {
    /// A fresh run: `model_cfg` trained as `cfg` says, laid out and run as `spec` says,
    /// on this rank of `place` (every rank calls it alike). Weights start as `weights`
    /// says; the run checks its layout, its memory against `spec.memory_budget` (choosing
    /// a policy when none is given) and against the machine before allocating them.
    pub fn start(model_cfg: ModelConfig, cfg: TrainConfig, spec: RunSpec, weights: Weights, place: Place) -> Result<Self> {
        let mut tr = Self::assemble(model_cfg, cfg, spec, &place, None, &mut |model| match &weights {
            Weights::Seed(seed) => Ok(init_weights(&model.layout, *seed)),
            Weights::From(dir) => load_weights(model, dir),
        })?;
        tr.parallel_start(place)?;
        Ok(tr)
    }

    /// Builds this rank's trainer (weights from `weights`, moments zero) without the
    /// distributed parts that need every rank's model ([`Trainer::parallel_start`]).
    fn assemble(
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        spec: RunSpec,
        place: &Place,
        placed: Option<Vec<Placement>>,
        weights: &mut dyn FnMut(&Model) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        cfg.validate_for(&model_cfg)?;
        spec.validate(&model_cfg, &cfg, place.world())?;
        if let Some(m) = &place.mesh {
            if m.tp_size() != spec.tp || m.pp_size() != spec.pp || m.ep_size() != spec.ep || m.dp_size() != spec.dp {
                return Err(Error::msg(format!(
                    "the mesh is TP {} × PP {} × EP {} × DP {} but the run specification asks for {}",
                    m.tp_size(),
                    m.pp_size(),
                    m.ep_size(),
                    m.dp_size(),
                    spec.describe()
                )));
            }
            let text = [serde_json::to_string(&model_cfg.raw), serde_json::to_string(&cfg), serde_json::to_string(&spec)].map(|t| t.unwrap_or_default()).concat();
            m.agree("model or training configuration (or run specification)", &text).map_err(comm_error)?;
        }
        let share = spec.share(&model_cfg, place.mesh.as_ref(), placed)?;
        let model = Model::share(model_cfg, share)?;
        let pipeline = spec.schedule_for(&cfg).map_err(|e| Error::field("grad_accum", e))?;
        let pp_rank = model.stage.rank;
        let rows = cfg.micro_batch / spec.stage_ranks();
        let mut pass = spec.pass_options(&cfg)?;
        let actions = pipeline.ranks[pp_rank].clone();
        // Before anything runs: the size alone (weights, moments, activations) against
        // the machine, so a huge config or micro-batch is one line, not an allocation
        // failure. Ranks that are threads of this process share its memory.
        model.check_step_fits_machine(rows, cfg.seq_len, place.ranks_here, &pass, &actions)?;
        // Kernel workspaces are measured (a trial pass, with weight-sized buffers) only
        // when a budget needs them.
        let runtime = if spec.memory_budget.is_some() { crate::budget::workspace_bytes(&model) } else { 0 };
        if let Some(budget) = spec.memory_budget {
            let report = place.mesh.as_ref().is_none_or(|m| m.stage_lead());
            pass = crate::budget::fit(&model, &spec, &pass, rows, cfg.seq_len, &actions, runtime, budget as usize, place.peak_flops, report)?;
        }
        let predicted_peak = model.memory_plan_scheduled(rows, cfg.seq_len, 2, runtime, &pass, &actions).peak_bytes;
        if pass.swap_moments || pass.swaps_layers() {
            ultramoe_model::swap::check_dir(&pass.swap_dir).map_err(|e| Error::field("swap_dir", e))?;
        }
        let w = weights(&model)?;
        let (source, eval_source) = sources_for(&cfg, model.cfg.vocab_size)?;
        let mut batcher = Batcher::new(source, cfg.seed + 1);
        batcher.doc_masks = cfg.doc_masks;
        let sched = Schedule { peak: cfg.lr, min: cfg.min_lr, warmup: cfg.warmup, total: cfg.steps };
        let g = vec![0.0; model.layout.total];
        let opt = AdamW::new(&model.layout, cfg.adamw.clone());
        // A step's thread waits on peers and streams, none of which computes with a
        // pool, and on the overlapped schedule's forward lane, which computes on a pool
        // of its own, as many workers as the step's pool (a rank that is one of several
        // threads of this process runs on a pool of its share of the cores).
        let steps_on_pool = place.ranks_here == 1;
        let lane_pool = match spec.schedule == ScheduleKind::Overlapped {
            true => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(rayon::current_num_threads())
                    .thread_name(|i| format!("ultramoe-lane-{i}"))
                    .build()
                    .map_err(|e| Error::msg(format!("cannot start the forward lane's threads: {e}")))?,
            ),
            false => None,
        };
        Ok(Trainer {
            model,
            w,
            g,
            opt,
            sched,
            cfg,
            spec,
            pass,
            pipeline,
            batcher,
            eval_source,
            predicted_peak,
            step: 0,
            peak_flops: place.peak_flops,
            mfu_peak: None,
            parallel: None,
            zero: None,
            balancer: None,
            forward_lane: None,
            lane_pool,
            ep_bandwidth: 0.0,
            skipped_in_a_row: 0,
            steps_on_pool,
            metrics: None,
            metrics_path: PathBuf::new(),
        })
    }

    /// The distributed parts (collective: every rank calls it): gradient reduction,
    /// ZeRO-1 shards (the moments then live there only), the overlapped schedule's
    /// second exchange lane, and the link measurement dynamic placement prices moves
    /// with.
    fn parallel_start(&mut self, place: Place) -> Result<()> {
        let Some(mesh) = place.mesh else {
            self.balancer = None;
            return Ok(());
        };
        if self.spec.pp > 1 && !mesh.pp.concurrent_groups() {
            return Err(Error::msg("pipeline parallelism sends activations while exchanges run on other threads: the MPI library must provide MPI_THREAD_MULTIPLE"));
        }
        if self.spec.zero1 {
            self.zero = Some(Zero1::new(&self.model.layout, &mesh, self.cfg.adamw.clone()));
            self.opt = AdamW::new(&ultramoe_model::params::ParamLayout::default(), self.cfg.adamw.clone());
        }
        if let (ScheduleKind::Overlapped, Some(ex)) = (self.spec.schedule, &self.model.exchange) {
            self.forward_lane = Some(ex.lane().map_err(Error::msg)?);
        }
        self.parallel = Some(Parallel::new(mesh, &self.model.layout, self.spec.overlap_grad_reduce && !self.spec.zero1));
        if self.spec.placement_every > 0 {
            self.balancer = Some(Balancer::new(self.spec.placement_every));
            let p = self.parallel.as_ref().expect("just set");
            self.ep_bandwidth = probe_bandwidth(p.mesh.ep.as_ref()).map_err(comm_error)?;
        }
        Ok(())
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

    /// Runs one optimizer step over `grad_accum` micro-batches (through the pipeline
    /// schedule). In a distributed run every rank must call it; a failed exchange is an
    /// error naming the rank.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.where_steps_run(Trainer::step_here)
    }

    /// Runs `f` on the thread a step runs on: a pool worker when [`Trainer::steps_on_pool`],
    /// else the caller's (a worker of its rank's pool under `ultramoe_dist::local::run`).
    fn where_steps_run<R: Send>(&mut self, f: impl FnOnce(&mut Trainer) -> R + Send) -> R {
        match self.steps_on_pool {
            true => on_pool_worker(|| f(self)),
            false => f(self),
        }
    }

    fn step_here(&mut self) -> Result<StepStats> {
        let start = Instant::now();
        ultramoe_kernels::memory::reset_peak();
        let (b, t) = (self.cfg.micro_batch, self.cfg.seq_len);
        // Every rank draws the same global micro-batches and trains on its rows.
        let micro: Vec<_> = (0..self.cfg.grad_accum).map(|_| self.batcher.next_batch(b, t)).collect();
        let total_targets: usize = micro.iter().map(Batch::trained_tokens).sum();
        let scale = 1.0 / total_targets.max(1) as f32;
        let rows = self.parallel.as_ref().map_or(0..b, |p| p.rows(b));
        // `g` is zero here: it starts zeroed and every optimizer step clears it.
        // Swapped moments leave now; the write is waited for once the first layer's
        // forward is done, and the read starts when the bottom layer's backward does.
        let moments = match self.pass.swap_moments {
            true => Some(self.moments_out()?),
            false => None,
        };
        let pp = self.parallel.as_ref().filter(|p| p.mesh.pp_size() > 1).map(|p| p.mesh.pp.clone());
        let pipe = Pipeline {
            model: &self.model,
            w: &self.w,
            pass: &self.pass,
            pp: pp.as_ref(),
            forward_lane: self.forward_lane.as_ref(),
            lane_pool: self.lane_pool.as_ref(),
            micro: &micro,
            rows,
            scale,
            waits: Default::default(),
            trace: Default::default(),
        };
        // Gradient reductions start layer by layer during the last backward of each
        // layer (ZeRO-1 reduce-scatters in the optimizer step instead, and has no
        // gradient stream).
        let overlap = self.parallel.as_mut().filter(|p| p.overlaps_reduction());
        let mut hooks = StepHooks { layer_ids: &self.model.layer_ids, overlap, moments, reading: None };
        let mut out = catch_step(|| pipe.run(&self.pipeline, &mut self.g, &mut hooks))??;
        let events = std::mem::take(&mut out.events);
        let StepHooks { moments, mut reading, .. } = hooks;
        if let Some(g) = &pp {
            g.flush_sends().map_err(comm_error)?;
        }
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
        // Σ CE, Σ aux, then all-to-all bytes (intra, inter, inter if hierarchical), then
        // each stage's busy seconds and span (from its first rank).
        let stages = self.spec.pp;
        let mut sums = vec![0.0f64; 5 + 2 * stages];
        sums[0] = out.ce;
        sums[1] = out.aux;
        sums[2] = x.intra_node_bytes as f64;
        sums[3] = x.inter_node_bytes as f64;
        sums[4] = x.inter_node_bytes_hierarchical as f64;
        let stage_lead = self.parallel.as_ref().is_none_or(|p| p.mesh.stage_lead());
        if stage_lead {
            let s = self.model.stage.rank;
            sums[5 + s] = out.span_s - out.idle_s;
            sums[5 + stages + s] = out.span_s;
        }
        // Loads of every MoE layer of the model (a stage fills its own).
        let (mut counts, mut slot_counts) = self.global_counts(out.counts, out.slot_counts);
        // A tensor-parallel group's ranks computed the same losses and pass times: one
        // of them counts them; and the same expert loads, unless sequence parallelism
        // gave each its own rows. (Each rank's all-to-all bytes moved: all count.)
        if self.parallel.as_ref().is_some_and(|p| !p.mesh.counts_once()) {
            sums[0] = 0.0;
            sums[1] = 0.0;
            sums[5..].fill(0.0);
            if !self.spec.sequence_parallel {
                counts.iter_mut().chain(slot_counts.iter_mut()).flatten().for_each(|c| *c = 0);
            }
        }
        let opt_scope = ultramoe_kernels::profile::scope("optimizer");
        let mut comm_s = x.seconds;
        let mut exposed_s = x.exposed_seconds;
        let lr = self.sched.lr(self.step);
        if let Some(p) = &mut self.parallel {
            // Reductions still in flight on the gradient stream use the stage group:
            // finish them before this thread uses it.
            if self.zero.is_none() {
                p.reduce_grads(&mut self.g).map_err(comm_error)?;
            }
            // Tensors every tensor-parallel rank holds whole but used for its heads only
            // (linear, so after the stage's sum alike).
            self.model.sum_tensor_parallel_grads(&mut self.g).map_err(comm_error)?;
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
        let [stage_peak_bytes, stage_predicted_peak_bytes] = self.per_stage([ultramoe_kernels::memory::peak_bytes(), self.predicted_peak])?;
        let busy = sums[5..5 + stages].to_vec();
        let makespan = sums[5 + stages..].iter().cloned().fold(0.0, f64::max);
        let step_s = start.elapsed().as_secs_f64();
        let evaluates = self.cfg.eval_every > 0 && (self.step % self.cfg.eval_every == 0 || self.step == self.cfg.steps);
        let eval_loss = if evaluates { self.eval_loss()? } else { None };
        let tokens = b * t * self.cfg.grad_accum;
        let flops = self.model.train_flops(b, t) * self.cfg.grad_accum as f64;
        // A step faster than the peak proves the peak low (it was measured beside a busy
        // neighbour, or ranks share cores): MFU's peak is at least what a step reached,
        // so MFU never reads above 100%. (Only MFU's: the placement's costs keep the
        // measured figure, which every rank shares, so that every rank decides alike.)
        let rate = flops / step_s;
        if rate > self.mfu_peak.unwrap_or(self.peak_flops) {
            if self.is_lead() && self.mfu_peak.is_none() {
                eprintln!(
                    "warning: step {} ran at {:.1} GFLOP/s, above the GEMM peak used for MFU ({:.1} GFLOP/s): MFU's peak is raised to it (pass --peak-gflops to fix it)",
                    self.step,
                    rate / 1e9,
                    self.peak_flops / 1e9
                );
            }
            self.mfu_peak = Some(rate);
        }
        let rank_counts = match self.slots_per_rank() {
            Some(per) => slot_rank_loads(&slot_counts, per),
            None => rank_loads(&counts, self.cfg.stats_ep),
        };
        let stats = StepStats {
            step: self.step,
            ranks: self.parallel.as_ref().map_or(1, |p| p.world()),
            tp: self.spec.tp,
            ep: self.spec.ep,
            pp: self.spec.pp,
            vpp: self.spec.vpp,
            dp: self.spec.dp,
            schedule: self.spec.schedule.name(),
            stage_busy_s: busy.clone(),
            // A stage is idle for the pipeline's whole makespan (the longest stage's
            // span) less its own passes: waiting at the start and at the end included.
            stage_idle_s: busy.iter().map(|b| (makespan - b).max(0.0)).collect(),
            stage_peak_bytes,
            stage_predicted_peak_bytes,
            loss,
            skipped,
            lr,
            aux_loss: sums[1] as f32,
            grad_norm,
            tokens,
            step_s,
            tokens_per_s: tokens as f64 / step_s,
            mfu: rate / self.mfu_peak.unwrap_or(self.peak_flops),
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
            activation_bytes: out.activation_bytes,
            experts_moved,
            predicted_rank_load_imbalance: predicted,
            eval_loss,
            eval_perplexity: eval_loss.map(f32::exp),
            epoch: self.batcher.epoch(),
            tokens_seen: self.batcher.seen().to_vec(),
        };
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{}", serde_json::to_string(&stats).unwrap_or_default())
                .map_err(|e| Error::msg(format!("cannot write metrics: {e}")).in_file(&self.metrics_path))?;
        }
        if self.step == self.cfg.steps {
            self.write_timeline(events)?;
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

    /// The mean cross-entropy over the first `eval_batches` micro-batches (rounded up to
    /// whole steps of `grad_accum`) of the held-out documents — always the same ones —
    /// or `None` when none are held out. A collective: every rank calls it. Without a
    /// pipeline each micro-batch runs forward only; a pipeline runs the step's own
    /// schedule into the gradient buffer, which is cleared after. No weight, moment or
    /// routing statistic changes.
    pub fn eval_loss(&mut self) -> Result<Option<f32>> {
        self.where_steps_run(Trainer::eval_loss_here)
    }

    fn eval_loss_here(&mut self) -> Result<Option<f32>> {
        let Some(source) = self.eval_source.clone() else { return Ok(None) };
        let mut batcher = Batcher::new(source, 0);
        batcher.doc_masks = self.cfg.doc_masks;
        let (b, t, m) = (self.cfg.micro_batch, self.cfg.seq_len, self.cfg.grad_accum);
        let rows = self.parallel.as_ref().map_or(0..b, |p| p.rows(b));
        let pp = self.parallel.as_ref().filter(|p| p.mesh.pp_size() > 1).map(|p| p.mesh.pp.clone());
        let (mut ce, mut count) = (0.0f64, 0usize);
        for _ in 0..self.cfg.eval_batches.div_ceil(m) {
            let micro: Vec<Batch> = (0..m).map(|_| batcher.next_batch(b, t)).collect();
            count += micro.iter().map(Batch::trained_tokens).sum::<usize>();
            if pp.is_none() {
                // This rank's rows of each micro-batch, forward only.
                for mb in &micro {
                    let span = rows.start * t..rows.end * t;
                    let positions = mb.positions.as_ref().map(|p| &p[span.clone()]);
                    let fwd = catch_step(|| self.model.forward_packed(&self.w, &mb.ids[span.clone()], positions, rows.len(), t, &self.pass))?;
                    let (mean, n) = self.model.loss(&fwd, &mb.targets[span.clone()]);
                    ce += mean as f64 * n as f64;
                }
                continue;
            }
            let pipe = Pipeline {
                model: &self.model,
                w: &self.w,
                pass: &self.pass,
                pp: pp.as_ref(),
                forward_lane: self.forward_lane.as_ref(),
                lane_pool: self.lane_pool.as_ref(),
                micro: &micro,
                rows: rows.clone(),
                scale: 1.0,
                waits: Default::default(),
                trace: Default::default(),
            };
            ce += catch_step(|| pipe.run(&self.pipeline, &mut self.g, &mut crate::pipeline::NoHooks))??.ce;
            if let Some(g) = &pp {
                g.flush_sends().map_err(comm_error)?;
            }
            self.g.fill(0.0);
        }
        self.model.take_exchange_totals();
        // Every rank counted the same targets; the CE is spread over the ranks (one rank
        // of each tensor-parallel group counts its group's).
        let once = self.parallel.as_ref().is_none_or(|p| p.mesh.counts_once());
        let mut sum = [if once { ce } else { 0.0 }];
        if let Some(p) = &mut self.parallel {
            p.sum(&mut sum).map_err(comm_error)?;
        }
        Ok(Some((sum[0] / count.max(1) as f64) as f32))
    }

    /// Per-expert and per-slot loads of every MoE layer of the model, from this rank's
    /// held layers' (zeros for the layers of other stages, which the sum over the world
    /// fills in).
    fn global_counts(&self, held: Vec<Vec<usize>>, held_slots: Vec<Vec<usize>>) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
        let n = self.model.cfg.n_moe_layers();
        let e = self.model.cfg.moe.n_experts;
        let slots = self.slots_per_rank().map_or(e, |per| per * self.spec.ep);
        let mut counts = vec![vec![0; e]; n];
        let mut slot_counts = vec![vec![0; slots]; n];
        for ((i, c), s) in self.model.moe_ids().into_iter().zip(held).zip(held_slots) {
            if !c.is_empty() {
                counts[i] = c;
            }
            if !s.is_empty() {
                slot_counts[i] = s;
            }
        }
        (counts, slot_counts)
    }

    /// Every stage's passes of this step (its first rank's), gathered in one collective
    /// and written beside the metrics as `pipeline_timeline.json` for `ultramoe report`.
    /// Each stage's times are on its own clock from the start of its passes; the stages
    /// start a step together (after the previous step's collectives), within the
    /// collectives' skew.
    fn write_timeline(&self, events: Vec<PassEvent>) -> Result<()> {
        let stages = self.spec.pp;
        // A pass records itself and at most one wait and one send.
        let per = 3 * self.pipeline.ranks.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut words = vec![0.0f64; stages * per * EVENT_WORDS];
        if self.parallel.as_ref().is_none_or(|p| p.mesh.stage_lead()) {
            let s = self.model.stage.rank;
            for (i, e) in events.iter().take(per).enumerate() {
                let at = (s * per + i) * EVENT_WORDS;
                words[at..at + EVENT_WORDS].copy_from_slice(&PassEvent { stage: s, ..*e }.to_words());
            }
        }
        if let Some(p) = self.parallel.as_ref().filter(|p| p.mesh.pp_size() > 1) {
            p.mesh.world.all_reduce_f64(&mut words).map_err(comm_error)?;
        }
        if self.metrics.is_none() {
            return Ok(());
        }
        let events: Vec<PassEvent> = words.chunks(EVENT_WORDS).filter_map(PassEvent::from_words).collect();
        let v = serde_json::json!({
            "step": self.step, "schedule": self.spec.schedule.name(), "stages": stages, "vpp": self.spec.vpp,
            "micro_batches": self.cfg.grad_accum, "events": events,
        });
        let path = self.metrics_path.with_file_name("pipeline_timeline.json");
        std::fs::write(&path, serde_json::to_string(&v).unwrap_or_default()).map_err(|e| Error::msg(format!("cannot write: {e}")).in_file(&path))
    }

    /// Each of `values` as every pipeline stage's first rank has it: one list per value,
    /// one entry per stage (one collective over the world when there are several stages).
    fn per_stage<const N: usize>(&self, values: [usize; N]) -> Result<[Vec<usize>; N]> {
        let Some(p) = self.parallel.as_ref().filter(|p| p.mesh.pp_size() > 1) else { return Ok(values.map(|v| vec![v])) };
        let stages = p.mesh.pp_size();
        let mut all = vec![0u64; N * stages];
        if p.mesh.stage_lead() {
            for (i, v) in values.iter().enumerate() {
                all[i * stages + self.model.stage.rank] = *v as u64;
            }
        }
        p.mesh.world.all_reduce_u64(&mut all).map_err(comm_error)?;
        Ok(std::array::from_fn(|i| all[i * stages..(i + 1) * stages].iter().map(|&x| x as usize).collect()))
    }

    /// Expert slots per expert-parallel rank under expert parallelism (every MoE layer
    /// of the model alike, whichever this rank's stage holds).
    fn slots_per_rank(&self) -> Option<usize> {
        (self.spec.ep > 1).then(|| self.model.cfg.moe.n_experts / self.spec.ep + self.spec.redundant_experts)
    }

    /// Aux-loss-free balancing (DeepSeek-V3): after each step every expert's correction
    /// bias moves by `γ · sign(mean load − its load)`, so overloaded experts become less
    /// likely to be chosen. The bias only affects which experts are chosen, never the
    /// combine weights, so the loss being optimised is unchanged. `counts` covers every
    /// MoE layer of the model; this rank moves its stage's.
    fn update_router_bias(&mut self, counts: &[Vec<usize>]) {
        let rate = self.cfg.bias_update_rate;
        let moe = self.model.layers.iter().filter_map(|l| match &l.ffn {
            ultramoe_model::decoder::FfnBlock::Moe(m) => Some(m),
            _ => None,
        });
        for (m, i) in moe.zip(self.model.moe_ids()) {
            let Some(slot) = &m.router.bias else { continue };
            let c = &counts[i];
            let mean = c.iter().sum::<usize>() as f32 / c.len().max(1) as f32;
            for (b, &n) in self.w[slot.clone()].iter_mut().zip(c) {
                *b += rate * (mean - n as f32).signum() * ((mean - n as f32) != 0.0) as i32 as f32;
            }
        }
    }

    /// Dynamic placement after a step: folds the step's global expert loads of this
    /// stage's MoE layers into the average and, on decision steps, migrates the layers
    /// where moving pays (weights and optimizer moments travel together). Returns the
    /// slots that changed expert and the placement's predicted rank imbalance.
    fn rebalance(&mut self, counts: &[Vec<usize>]) -> Result<(usize, f64)> {
        let Some(b) = &mut self.balancer else { return Ok((0, 0.0)) };
        let held: Vec<Vec<usize>> = self.model.moe_ids().into_iter().map(|i| counts[i].clone()).collect();
        b.observe(&held);
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
        // Every stage moves and predicts its own layers: the run's figures are the sums
        // over the stages (from each stage's first rank).
        let (max, mean) = b.predicted_load_sums(&self.model.placements());
        let mut sums = [moved as f64, max, mean];
        if let Some(p) = &self.parallel {
            if !p.mesh.stage_lead() {
                sums = [0.0; 3];
            }
            p.mesh.world.all_reduce_f64(&mut sums).map_err(comm_error)?;
        }
        let imbalance = if sums[2] > 0.0 { sums[1] / sums[2] } else { 1.0 };
        Ok((sums[0] as usize, imbalance))
    }

    /// Starts writing the optimizer moments to a new swap file (their memory is freed
    /// when the first layer's forward is done and the write is waited for).
    fn moments_out(&mut self) -> Result<(SwapFile, SwapTicket)> {
        let dir = self.pass.swap_dir.clone();
        let mut f = SwapFile::create(&dir).map_err(|e| Error::field("swap_dir", format!("{}: {e}", dir.display())))?;
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

    /// Sets how many steps the run takes in all, the learning-rate schedule's `S` with
    /// it: the steps already taken keep their rates, the cosine stretches or shrinks
    /// over what remains. For a run whose length follows the wall clock (`demo`); every
    /// rank of a run must set the same count, as each steps its own schedule.
    pub fn set_total_steps(&mut self, steps: u64) -> Result<()> {
        if steps <= self.step {
            return Err(Error::field("steps", format!("{steps} is not past the {} steps already taken", self.step)));
        }
        self.cfg.steps = steps;
        self.sched.total = steps;
        Ok(())
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
    /// data-parallel copy of each (stage, expert-parallel rank).
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
        if self.is_lead() {
            self.copy_tokenizer(dir)?;
            if let DataSpec::MathKinds(names) = &self.cfg.data {
                crate::data::math::write_trained_kinds(dir, names).map_err(|e| Error::msg(format!("cannot write the trained kinds: {e}")).in_file(dir))?;
            }
        }
        self.barrier()
    }

    /// Copies the run's tokenizer files (if it has a tokenizer) into `dir`, so a saved
    /// model or checkpoint is a whole Hugging Face model directory.
    fn copy_tokenizer(&self, dir: &Path) -> Result<()> {
        let Some(from) = &self.cfg.tokenizer else { return Ok(()) };
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
            let src = from.join(name);
            if src.is_file() && src != dir.join(name) {
                std::fs::copy(&src, dir.join(name)).map_err(|e| Error::msg(format!("cannot copy {}: {e}", src.display())).in_file(dir))?;
            }
        }
        Ok(())
    }

    /// Writes a checkpoint under `run_dir/checkpoints/` and points `latest` at it; keeps
    /// the newest `keep` checkpoints. In a distributed run every rank must call it: each
    /// writes its share (weights and moments of its stage's tensors and experts; the
    /// first expert-parallel rank of each stage also the replicated ones), the first
    /// rank of each stage its experts' placement, rank 0 the run state, and `latest`
    /// moves only after all shares are down.
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
            use ultramoe_model::checkpoint::{gather_splits, held_tensors, saved_by, writes_tensor_parallel_share};
            // Under tensor parallelism (collectives over its group) the slices are
            // gathered and the group's first rank writes whole tensors.
            save_model_share(&self.model, &self.w, &dir)?;
            let k = self.ep().0;
            let (whole_m, whole_v) = (gather_splits(&self.model, m)?, gather_splits(&self.model, v)?);
            let writes = writes_tensor_parallel_share(&self.model);
            let keep = |s: &ultramoe_model::params::ParamSpec| saved_by(&self.model.layout, s, k);
            let mut tensors = Vec::with_capacity(2 * self.model.layout.specs.len());
            for (prefix, buf, whole) in [("exp_avg", m, &whole_m), ("exp_avg_sq", v, &whole_v)] {
                tensors.extend(held_tensors(&self.model, buf, whole, keep).into_iter().map(|(name, shape, data)| (format!("{prefix}.{name}"), shape, data)));
            }
            let shards = self.ep().1 * self.model.stage.ranks;
            if writes {
                write_safetensors(&dir.join(pipeline_files("optimizer", &self.model, shards)), &tensors, None)?;
            }
            if let (Some(b), 0, true) = (&self.balancer, k, writes) {
                let state = PlacementState {
                    ranks: self.ep().1,
                    moe_layers: Some(self.model.moe_ids()),
                    slot_expert: self.model.placements().iter().map(|p| p.slot_expert.clone()).collect(),
                    share: self.model.placements().iter().map(|p| p.share.clone()).collect(),
                    load: b.load.clone(),
                };
                let (s, stages) = (self.model.stage.rank, self.model.stage.ranks);
                let file = dir.join(format!("placement-{:05}-of-{stages:05}.json", s + 1));
                write_atomic(&file, serde_json::to_string_pretty(&state).unwrap().as_bytes())?;
            }
        }
        self.barrier()?;
        if self.is_lead() {
            let state = TrainerState {
                step: self.step,
                optimizer_step: self.optimizer_steps(),
                data_position: self.batcher.position(),
                data_seen: self.batcher.seen().to_vec(),
                config: self.cfg.clone(),
                spec: Some(self.spec.clone()),
                placement: None,
            };
            write_atomic(&dir.join("trainer_state.json"), serde_json::to_string_pretty(&state).unwrap().as_bytes())?;
            self.copy_tokenizer(&dir)?;
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

    /// The training config and run specification a checkpoint was saved with (for a
    /// checkpoint from before run specifications: the run settings its config held).
    pub fn saved_config(dir: &Path) -> Result<(TrainConfig, RunSpec)> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&state_path))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::msg(format!("not a trainer state: {e}")).in_file(&state_path))?;
        let state: TrainerState = serde_json::from_value(value.clone()).map_err(|e| Error::msg(format!("not a trainer state: {e}")).in_file(&state_path))?;
        let spec = match state.spec {
            Some(s) => s,
            None => serde_json::from_value(value["config"].clone()).map_err(|e| Error::msg(format!("not a trainer state: {e}")).in_file(&state_path))?,
        };
        Ok((state.config, spec))
    }

    /// Resumes from a checkpoint directory: weights, moments, step, data position, the
    /// training config and the run specification, which `adjust` may change first (the
    /// layout to the ranks at hand, steps, memory options…: whatever leaves the numbers
    /// alone — the caller refuses the rest). The checkpoint may have been written under
    /// any layout, with or without ZeRO-1: tensors are found by name in whatever shards
    /// hold them, and each rank takes its share.
    pub fn resume(dir: &Path, place: Place, adjust: &mut dyn FnMut(&mut TrainConfig, &mut RunSpec) -> Result<()>) -> Result<Self> {
        let state_path = dir.join("trainer_state.json");
        let state = read_state(dir)?;
        let (mut cfg, mut spec) = Self::saved_config(dir)?;
        let cfg_model = ModelConfig::from_file(&dir.join("config.json"))?;
        adjust(&mut cfg, &mut spec)?;
        if spec.ep < 2 {
            // Placement is an expert-parallel matter: one rank holds every expert once.
            (spec.placement_every, spec.redundant_experts) = (0, 0);
        }
        // The saved placement continues when the expert-parallel size is unchanged;
        // otherwise experts start from contiguous blocks (names, not slots, find them).
        let saved = read_placements(dir, state.placement)?;
        let placed = match saved {
            Some(p) if p.ranks == spec.ep && p.slot_expert.len() == cfg_model.n_moe_layers() => Some(p),
            _ => None,
        };
        let placements = match &placed {
            Some(p) => {
                let e = cfg_model.moe.n_experts;
                let ps = p
                    .slot_expert
                    .iter()
                    .enumerate()
                    .map(|(i, map)| {
                        let pl = Placement::new(spec.ep, e, map.clone())?;
                        match p.share.get(i).filter(|s| !s.is_empty()) {
                            Some(sh) => pl.with_shares(sh.clone()),
                            None => Ok(pl),
                        }
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::field("placement", e).in_file(&state_path))?;
                Some(ps)
            }
            None => None,
        };
        if let (Some(ps), true) = (&placements, spec.redundant_experts == 0) {
            // A placement saved with redundant slots keeps them.
            if let Some(p) = ps.first() {
                spec.redundant_experts = p.slots_per_rank - p.n_experts() / p.ranks;
            }
        }
        let mut tr = Self::assemble(cfg_model, cfg, spec, &place, placements, &mut |model| load_weights(model, dir))?;
        tr.parallel_start(place)?;
        let moments = read_optimizer_shards(dir)?;
        let total = tr.model.layout.total;
        let (mut m, mut v) = (vec![0.0; total], vec![0.0; total]);
        for s in &tr.model.layout.specs {
            for (prefix, buf) in [("exp_avg.", &mut m), ("exp_avg_sq.", &mut v)] {
                let key = format!("{prefix}{}", s.name);
                let (t, file) = moments.get(&key).ok_or_else(|| Error::field(&key, "missing optimizer state").in_file(dir))?;
                // Saved whole: a tensor-parallel rank takes its slice.
                let whole = s.whole_shape();
                if t.shape != whole {
                    return Err(Error::field(&key, format!("shape {:?} does not match {:?}", t.shape, whole)).in_file(file));
                }
                let values = t.f32(&key).map_err(|e| e.in_file(file))?;
                let bad = ultramoe_model::checkpoint::count_nonfinite(values);
                if bad > 0 {
                    return Err(Error::field(&key, format!("{bad} of {} values are not finite (NaN or Inf)", values.len())).in_file(file));
                }
                match s.split {
                    Some(p) => buf[s.range()].copy_from_slice(&p.take(values, &whole)),
                    None => buf[s.range()].copy_from_slice(values),
                }
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
        tr.batcher.restore_seen(&state.data_seen);
        if let (Some(b), Some(p)) = (&mut tr.balancer, placed) {
            b.load = tr.model.moe_ids().into_iter().filter_map(|i| p.load.get(i).cloned()).collect();
        }
        Ok(tr)
    }
}

/// What the trainer does as the step's passes progress: waits for the swapped moments'
/// write after the first layer's forward, starts reading them back during the bottom
/// layer's last backward, and starts each layer's gradient reduction once its last
/// backward is done.
struct StepHooks<'a> {
    layer_ids: &'a [usize],
    overlap: Option<&'a mut Parallel>,
    moments: Option<(SwapFile, SwapTicket)>,
    reading: Option<Prefetch>,
}

impl Hooks for StepHooks<'_> {
    fn forward_layer_done(&mut self, first: bool, layer: usize) {
        if let (true, 0, Some((f, ticket))) = (first, layer, &mut self.moments) {
            f.wait_written(ticket);
        }
    }

    fn backward_layer_done(&mut self, g: &[f32], last: bool, final_backward: bool, layer: usize) {
        if let (true, Some(p)) = (last, self.overlap.as_deref_mut()) {
            p.layer_done(g, self.layer_ids[layer]);
        }
        if let (true, 1, Some((f, ticket))) = (final_backward, layer, &mut self.moments) {
            self.reading = Some(f.prefetch(ticket));
        }
    }
}

/// Every stage's saved placement, merged by MoE layer (`legacy`: a trainer state's
/// from before per-stage files). `None` when the run had no dynamic placement.
fn read_placements(dir: &Path, legacy: Option<PlacementState>) -> Result<Option<PlacementState>> {
    if legacy.is_some() {
        return Ok(legacy);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::msg(format!("cannot read directory: {e}")).in_file(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("placement-") && n.ends_with(".json")))
        .collect();
    files.sort();
    let mut merged: Option<PlacementState> = None;
    // per MoE layer: (slot → expert, shares, load average)
    type Entry = (Vec<usize>, Vec<f64>, Vec<f64>);
    let mut entries: std::collections::BTreeMap<usize, Entry> = Default::default();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&f))?;
        let p: PlacementState = serde_json::from_str(&text).map_err(|e| Error::msg(format!("not a placement: {e}")).in_file(&f))?;
        let ids = p.moe_layers.clone().unwrap_or_else(|| (0..p.slot_expert.len()).collect());
        for (k, i) in ids.into_iter().enumerate() {
            let share = p.share.get(k).cloned().unwrap_or_default();
            let load = p.load.get(k).cloned().unwrap_or_default();
            entries.insert(i, (p.slot_expert[k].clone(), share, load));
        }
        merged = Some(PlacementState { ranks: p.ranks, moe_layers: None, slot_expert: vec![], share: vec![], load: vec![] });
    }
    Ok(merged.map(|mut m| {
        // Layers listed by index 0..n; a gap (a stage without a file) leaves the list
        // short, and the resumed run starts from contiguous blocks.
        for (i, (map, share, load)) in entries {
            if i != m.slot_expert.len() {
                break;
            }
            m.slot_expert.push(map);
            m.share.push(share);
            m.load.push(load);
        }
        m
    }))
}

/// A checkpoint's `trainer_state.json`.
fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&state_path))?;
    serde_json::from_str(&text).map_err(|e| Error::msg(format!("not a trainer state: {e}")).in_file(&state_path))
}

/// Every optimizer tensor of a checkpoint, from `optimizer.safetensors` or the
/// per-rank `optimizer-*-of-*.safetensors` shards, with its file.
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

/// Runs `f` on a thread of rayon's pool and waits for it. A step's kernels split their
/// work with rayon; called from outside the pool, each split hands its work to the
/// workers and puts the caller to sleep until they finish — a futex wake and wait per
/// kernel, hundreds a step (measured on the math MoE: 317 K context switches in 300
/// steps against 37 K on a worker; with one worker thread the hand-offs were 16% of the
/// step). On a worker the kernels split with the other workers directly. Only where
/// nothing else this step waits for needs the pool: a thread that waits while holding
/// the only free worker would wait for ever.
fn on_pool_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
