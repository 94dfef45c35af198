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
use ultramoe_model::init::init_weights;
use ultramoe_model::memory::{runtime_bytes, MemoryPlan};
use ultramoe_model::policy::describe_policy;
use ultramoe_model::{Model, ModelConfig};
use ultramoe_train::trainer::{DataSpec, TrainConfig, Trainer};

/// Options of `ultramoe memory`.
#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Model `config.json` (default: the embedded math MoE).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Decoder layers recomputed whole in backward: `all`, `none`, or indices like `0,2,3`.
    #[arg(long)]
    pub recompute: Option<String>,
    /// Per-layer policy, as for `train`: e.g. "norm+swiglu+attention swap:0,1".
    #[arg(long)]
    pub memory_policy: Option<String>,
    /// Choose the cheapest policy that fits this budget (unless a policy is given), and
    /// report the largest micro-batch that fits with and without it.
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
    /// Also run 3 training steps and compare the measured peak with the prediction.
    #[arg(long)]
    pub measure: bool,
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
    let mut model = Model::new(cfg);
    if let Some(dir) = &a.swap_dir {
        model.swap_dir = dir.clone();
    }
    model.swap_moments = a.swap_moments;
    let given = policy_from_args(a.memory_policy.as_deref(), a.recompute.as_deref(), model.layers.len())?;
    if let Some(p) = &given {
        model.policy = p.clone();
    }
    // Workspaces are measured by running the model: only where it fits this machine
    // (a prediction for a larger model leaves them out).
    let fits = model.check_step_fits_machine(1, 2, 1);
    let runtime = if fits.is_ok() { runtime_bytes(&model) } else { 0 };
    let (b, t) = (a.micro_batch, a.seq_len);
    let largest = |m: &Model, budget: usize| m.largest_micro_batch(t, 2, runtime, budget, 4096);
    let mut rates = None;
    if let Some(budget) = &a.memory_budget {
        let budget = parse_bytes(budget)?;
        let r = cost_rates(&model.swap_dir, peak_flops(None));
        if given.is_none() {
            model.policy = model.choose_policy(b, t, 2, runtime, budget, &r).unwrap_or_else(|most| most);
        }
        let chosen = (model.policy.clone(), model.swap_moments);
        model.set_recompute_layers(&[]);
        model.swap_moments = false;
        let plain = largest(&model, budget);
        (model.policy, model.swap_moments) = chosen;
        let fits = |r: Option<usize>| r.map_or("none".to_string(), |r| r.to_string());
        println!(
            "budget {:.1} MB: largest micro-batch keeping everything {}, with this policy {}",
            budget as f64 / MB,
            fits(plain),
            fits(largest(&model, budget))
        );
        rates = Some(r);
    }
    let plan = model.memory_plan(b, t, 2, runtime);
    print_plan(&plan, &model, &a);
    if let Some(r) = rates {
        println!("estimated cost of the policy  {:>10.1} ms a micro-batch", 1e3 * model.policy_cost(b, t, &model.policy, &r));
    }
    if fits.is_err() {
        println!("(kernel workspaces not measured: the model does not fit this machine)");
    }
    if a.measure {
        model.check_step_fits_machine(b, t, 1).map_err(|e| format!("--measure: {e}"))?;
        let w = init_weights(&model.layout, 1);
        let tc = TrainConfig {
            steps: 3,
            micro_batch: b,
            seq_len: t,
            data: DataSpec::Random,
            warmup: 1,
            memory_policy: model.policy.clone(),
            swap_dir: Some(model.swap_dir.clone()),
            swap_moments: model.swap_moments,
            ..TrainConfig::default()
        };
        let mut tr = Trainer::new(model, w, tc, 1e11).map_err(|e| e.to_string())?;
        let mut peak = 0;
        let mut act = 0;
        for _ in 0..3 {
            let s = tr.train_step().map_err(|e| e.to_string())?;
            peak = peak.max(s.peak_bytes);
            act = s.activation_bytes;
        }
        println!();
        println!("measured peak      {:>10.1} MB over 3 steps ({:+.1}% predicted vs measured)", peak as f64 / MB, 100.0 * (plan.peak_bytes as f64 / peak as f64 - 1.0));
        println!("measured saved     {:>10.1} MB of activations (predicted {:.1} MB)", act as f64 / MB, plan.activation_bytes as f64 / MB);
    }
    Ok(())
}

fn print_plan(p: &MemoryPlan, model: &Model, a: &MemoryArgs) {
    let moments = if model.swap_moments { ", optimizer moments swapped" } else { "" };
    println!("training step, micro-batch {} × {} tokens, f32, AdamW, memory policy `{}`{moments}", a.micro_batch, a.seq_len, describe_policy(&model.policy));
    if a.detail {
        for (owner, bytes) in &p.items {
            println!("  {owner:<55} {:>10.2} MB", *bytes as f64 / MB);
        }
        for (owner, bytes) in &p.swapped {
            println!("  {:<55} {:>10.2} MB", format!("{owner} in the swap file (not in memory)"), *bytes as f64 / MB);
        }
        println!();
    }
    let what = if model.swap_moments { "weights + gradients          " } else { "weights + gradients + moments" };
    println!("{what} {:>10.1} MB", p.static_bytes as f64 / MB);
    println!("saved activations in memory   {:>10.1} MB", p.activation_bytes as f64 / MB);
    if p.swapped_bytes > 0 {
        println!("in the swap file              {:>10.1} MB (in {})", p.swapped_bytes as f64 / MB, model.swap_dir.display());
    }
    println!("temporaries at the peak       {:>10.1} MB", p.transient_bytes as f64 / MB);
    println!("kernel workspaces (measured)  {:>10.1} MB", p.runtime_bytes as f64 / MB);
    println!("predicted peak                {:>10.1} MB", p.peak_bytes as f64 / MB);
}
