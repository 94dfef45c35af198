//! `ultramoe memory`: the memory of a training step, predicted before it runs — weights,
//! gradients, optimizer moments, each layer's saved activations, the backward pass's
//! temporaries and the kernels' workspaces — and, with `--measure`, checked against the
//! counting allocator over a few real steps.

use super::CliResult;
use crate::presets::MATH_MOE_CONFIG;
use clap::Args;
use std::path::PathBuf;
use ultramoe_model::init::init_weights;
use ultramoe_model::memory::{runtime_bytes, MemoryPlan};
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
    /// Decoder layers recomputed in backward: `all`, `none`, or indices like `0,2,3`.
    #[arg(long)]
    pub recompute: Option<String>,
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
    let layers = match &a.recompute {
        Some(r) => super::train::parse_layers(r, model.layers.len())?,
        None => vec![],
    };
    model.set_recompute_layers(&layers);
    let runtime = runtime_bytes(&model);
    let plan = model.memory_plan(a.micro_batch, a.seq_len, 2, runtime);
    print_plan(&plan, &a);
    if a.measure {
        let w = init_weights(&model.layout, 1);
        let tc = TrainConfig {
            steps: 3,
            micro_batch: a.micro_batch,
            seq_len: a.seq_len,
            data: DataSpec::Random,
            warmup: 1,
            recompute_layers: layers,
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

fn print_plan(p: &MemoryPlan, a: &MemoryArgs) {
    println!(
        "training step, micro-batch {} × {} tokens, f32, AdamW, recomputing {}",
        a.micro_batch,
        a.seq_len,
        a.recompute.as_deref().unwrap_or("none")
    );
    if a.detail {
        for (owner, bytes) in &p.items {
            println!("  {owner:<45} {:>10.2} MB", *bytes as f64 / MB);
        }
        println!();
    }
    println!("weights + gradients + moments {:>10.1} MB", p.static_bytes as f64 / MB);
    println!("saved activations             {:>10.1} MB", p.activation_bytes as f64 / MB);
    println!("backward temporaries          {:>10.1} MB", p.transient_bytes as f64 / MB);
    println!("kernel workspaces (measured)  {:>10.1} MB", p.runtime_bytes as f64 / MB);
    println!("predicted peak                {:>10.1} MB", p.peak_bytes as f64 / MB);
}
