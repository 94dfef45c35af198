//! `ultramoe memory`: the memory of a training step, predicted before it runs — weights,
//! gradients, optimizer moments, each layer's saved activations under its memory policy,
//! what goes to the swap file, the backward pass's temporaries and the kernels'
//! workspaces — and, with `--measure`, checked against the counting allocator over a few
//! real steps. With `--memory-budget` it chooses the policy the trainer would.

use super::train::{cost_rates, parse_bytes, policy_from_args};
use super::{peak_flops, CliResult};
use crate::presets::MATH_MOE_CONFIG;
use clap::Args;
use std::path::PathBuf;
use ultramoe_model::memory::{runtime_bytes, MemoryPlan};
use ultramoe_model::policy::describe_policy;
use ultramoe_model::{Model, ModelConfig, PassOptions, Share};
use ultramoe_train::spec::{PipelineSchedule, RunSpec};
use ultramoe_train::trainer::{DataSpec, Place, TrainConfig, Trainer, Weights};

/// Options of `ultramoe memory`.
#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Model `config.json` (default: the embedded math MoE).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Rows per micro-batch (of a pipeline stage: all its ranks together).
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Micro-batches per step (a pipeline's micro-batches: with --pp the schedule keeps
    /// several in flight on each stage).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Pipeline stages: predict each stage's peak.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Model chunks per pipeline rank (interleaved 1F1B).
    #[arg(long, default_value_t = 1)]
    pub vpp: usize,
    /// Decoder layers of each stage (or virtual stage), as for `train`.
    #[arg(long)]
    pub pp_layers: Option<String>,
    /// Pipeline schedule: 1f1b, gpipe or overlap.
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Decoder layers recomputed whole in backward: `all`, `none`, or indices like `0,2,3`.
    #[arg(long)]
    pub recompute: Option<String>,
    /// Per-layer policy, as for `train`: e.g. "norm+swiglu+attention swap:0,1".
    #[arg(long)]
    pub memory_policy: Option<String>,
    /// Choose the cheapest policy that fits this budget (per rank, unless a policy is
    /// given), and report the largest micro-batch that fits with and without it.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Directory for swap files (default: the system's temporary directory).
    #[arg(long)]
    pub swap_dir: Option<PathBuf>,
    /// The optimizer moments wait in a swap file during forward and backward.
    #[arg(long)]
    pub swap_moments: bool,
    /// Print every owner (each layer's parts), not only the totals.
    #[arg(long)]
    pub detail: bool,
    /// Also run 3 training steps and compare the measured peak with the prediction
    /// (one stage; a pipeline's per-rank peaks are in `train`'s metrics under mpirun).
    #[arg(long)]
    pub measure: bool,
    /// No progress bar for `--measure` (there is none when stderr is not a terminal either).
    #[arg(long)]
    pub no_progress: bool,
}

const MB: f64 = 1e6;

/// `ultramoe memory`.
pub fn run(a: MemoryArgs) -> CliResult {
    let cfg = match &a.model_config {
        Some(p) => ModelConfig::from_file(p),
        None => ModelConfig::from_json_str(MATH_MOE_CONFIG),
    }
    .map_err(|e| e.to_string())?;
    if a.micro_batch == 0 || a.seq_len < 2 {
        return Err("--micro-batch must be positive and --seq-len at least 2".into());
    }
    if a.seq_len > cfg.max_position {
        return Err(format!("--seq-len {} exceeds the model's {} positions", a.seq_len, cfg.max_position));
    }
    if a.measure && a.pp > 1 {
        return Err("--measure runs one stage; a pipeline's per-rank peaks are measured by `mpirun -np N ultramoe train --pp P` (metrics: stage_peak_bytes)".into());
    }
    let pp_layers = match &a.pp_layers {
        Some(t) => Some(t.split(',').map(|c| c.trim().parse::<usize>().map_err(|_| format!("--pp-layers `{t}`: expected counts like 3,4,4,3"))).collect::<CliResult<Vec<_>>>()?),
        None => None,
    };
    let schedule = PipelineSchedule::parse(&a.schedule).ok_or_else(|| format!("--schedule `{}`: expected gpipe, 1f1b or overlap", a.schedule))?;
    let given = policy_from_args(a.memory_policy.as_deref(), a.recompute.as_deref(), cfg.n_layers)?;
    let spec = RunSpec {
        pp: a.pp,
        vpp: a.vpp,
        pp_layers,
        schedule,
        memory_policy: given.clone().unwrap_or_default(),
        memory_budget: a.memory_budget.as_deref().map(parse_bytes).transpose()?.map(|b| b as u64),
        swap_dir: a.swap_dir.clone(),
        swap_moments: a.swap_moments,
        ..RunSpec::default()
    };
    let tc = TrainConfig { micro_batch: a.micro_batch, seq_len: a.seq_len, grad_accum: a.grad_accum, data: DataSpec::Random, ..TrainConfig::default() };
    spec.validate(&cfg, &tc, spec.world()).map_err(|e| e.to_string())?;
    let pipeline = spec.schedule_for(&tc)?;
    let (b, t) = (a.micro_batch, a.seq_len);
    let base = spec.pass_options(&tc).map_err(|e| e.to_string())?;
    let before = ultramoe_kernels::memory::live_bytes();
    let mut last = None;
    for r in 0..spec.pp {
        let model = Model::share(cfg.clone(), spec.share(&cfg, None, None).map(|s| Share { stage: s.stage.for_rank(r), ..s }).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let actions = &pipeline.ranks[r];
        // Workspaces are measured by running the stage: only where it fits this machine
        // (a prediction for a larger model leaves them out). Every stage's trial pass
        // runs in this process and finds the workspaces of the stages before it: each
        // stage is charged all made so far (at most a little more than its own).
        let fits = model.check_step_fits_machine(1, 2, 1, &base, actions);
        let runtime = if fits.is_ok() {
            runtime_bytes(&model);
            ultramoe_kernels::memory::live_bytes().saturating_sub(before)
        } else {
            0
        };
        let mut pass = base.clone();
        let mut rates = None;
        if let Some(budget) = spec.memory_budget {
            let budget = budget as usize;
            let r = cost_rates(&pass.swap_dir, peak_flops(None));
            if given.is_none() {
                pass = ultramoe_train::budget::choose(&model, &pass, b, t, runtime, budget, &r, actions).unwrap_or_else(|most| most);
            }
            let largest = |p: &PassOptions| model.largest_micro_batch(t, 2, runtime, ultramoe_train::budget::aim(budget), 4096, p, actions);
            let plain = PassOptions { policy: vec![], swap_moments: false, ..pass.clone() };
            let fits = |r: Option<usize>| r.map_or("none".to_string(), |r| r.to_string());
            println!(
                "budget {:.1} MB: largest micro-batch keeping everything {}, with this policy {}",
                budget as f64 / MB,
                fits(largest(&plain)),
                fits(largest(&pass))
            );
            rates = Some(r);
        }
        let plan = model.memory_plan_scheduled(b, t, 2, runtime, &pass, actions);
        if spec.pp > 1 {
            println!("pipeline stage {r} of {} (layers {}), {} schedule: micro-batches in flight up to {}", spec.pp, describe_chunks(&model), spec.schedule.name(), plan.micro_batches_in_flight);
        }
        print_plan(&plan, &pass, &a);
        if let Some(r) = rates {
            println!("estimated cost of the policy  {:>10.1} ms a micro-batch", 1e3 * model.policy_cost(b, t, &pass, &r));
        }
        if fits.is_err() {
            println!("(kernel workspaces not measured: the model does not fit this machine)");
        }
        if r + 1 < spec.pp {
            println!();
        }
        last = Some((model, pass, plan));
    }
    if a.measure {
        let (model, pass, plan) = last.expect("one stage");
        model.check_step_fits_machine(b, t, 1, &pass, &pipeline.ranks[0]).map_err(|e| format!("--measure: {e}"))?;
        let measured_spec = RunSpec { memory_policy: pass.policy.clone(), memory_budget: None, swap_moments: pass.swap_moments, ..spec };
        let tc = TrainConfig { steps: 3, warmup: 1, ..tc };
        // These steps report memory, not MFU: a GEMM peak no step can pass (1 EFLOP/s)
        // keeps the trainer's "step above the peak" warning out of the output.
        let mut tr = Trainer::start(cfg, tc, measured_spec, Weights::Seed(1), Place::alone(1e18)).map_err(|e| e.to_string())?;
        let mut peak = 0;
        let mut act = 0;
        let bar = crate::progress::Progress::new("memory --measure", 3, !a.no_progress);
        bar.doing("training steps");
        for _ in 0..3 {
            let s = tr.train_step().map_err(|e| e.to_string())?;
            peak = peak.max(s.peak_bytes);
            act = s.activation_bytes;
            bar.done_one();
        }
        bar.finish();
        println!();
        println!("measured peak      {:>10.1} MB over 3 steps ({:+.1}% predicted vs measured)", peak as f64 / MB, 100.0 * (plan.peak_bytes as f64 / peak as f64 - 1.0));
        println!("measured saved     {:>10.1} MB of activations (predicted {:.1} MB)", act as f64 / MB, plan.activation_bytes as f64 / MB);
    }
    Ok(())
}

/// A stage's layers, e.g. `0-3` or `0-1, 4-5`.
fn describe_chunks(model: &Model) -> String {
    model.stage.chunks().iter().map(|r| if r.len() == 1 { r.start.to_string() } else { format!("{}-{}", r.start, r.end - 1) }).collect::<Vec<_>>().join(", ")
}

fn print_plan(p: &MemoryPlan, pass: &PassOptions, a: &MemoryArgs) {
    let moments = if pass.swap_moments { ", optimizer moments swapped" } else { "" };
    println!("training step, micro-batch {} × {} tokens, f32, AdamW, memory policy `{}`{moments}", a.micro_batch, a.seq_len, describe_policy(&pass.policy));
    if a.detail {
        for (owner, bytes) in &p.items {
            println!("  {owner:<55} {:>10.2} MB", *bytes as f64 / MB);
        }
        for (owner, bytes) in &p.swapped {
            println!("  {:<55} {:>10.2} MB", format!("{owner} in the swap file (not in memory)"), *bytes as f64 / MB);
        }
        println!();
    }
    let what = if pass.swap_moments { "weights + gradients          " } else { "weights + gradients + moments" };
    println!("{what} {:>10.1} MB", p.static_bytes as f64 / MB);
    println!("saved activations in memory   {:>10.1} MB", p.activation_bytes as f64 / MB);
    if p.in_flight_bytes > 0 {
        println!("other micro-batches in flight {:>10.1} MB (at the peak)", p.in_flight_bytes as f64 / MB);
    }
    if p.swapped_bytes > 0 {
        println!("in the swap file              {:>10.1} MB (in {})", p.swapped_bytes as f64 / MB, pass.swap_dir.display());
    }
    println!("temporaries at the peak       {:>10.1} MB", p.transient_bytes as f64 / MB);
    println!("kernel workspaces (measured)  {:>10.1} MB", p.runtime_bytes as f64 / MB);
    println!("predicted peak                {:>10.1} MB", p.peak_bytes as f64 / MB);
}
