//! `ultramoe bench`: throughput figures, with medians over repeated runs.

use super::{median, CliResult};
use crate::progress::Progress;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Instant;
use ultramoe_kernels::gemm::{linear, linear_grad, measure_peak_flops};
use ultramoe_kernels::grouped_gemm::{grouped_linear, grouped_linear_grad};
use ultramoe_model::init::Rng;
use ultramoe_model::ModelConfig;
use ultramoe_train::spec::RunSpec;
use ultramoe_train::trainer::{DataSpec, Place, TrainConfig, Trainer, Weights};

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Training-step throughput (forward + backward + AdamW) on a config.json.
    Train(BenchTrainArgs),
    /// Grouped GEMM over experts against one dense GEMM of the same total size.
    Gemm(BenchGemmArgs),
    /// Prefill and decode tokens/s of a model directory per weight format and batch size,
    /// against the memory-bandwidth limit measured alongside.
    Decode(super::bench_decode::BenchDecodeArgs),
    /// All-to-all-v latency and bandwidth against message size (vs plain MPI under mpirun).
    Comm(super::bench_comm::BenchCommArgs),
}

/// Options of `ultramoe bench train`.
#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Model config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// Rows per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// A baseline's seconds per step to compare with (e.g. PyTorch's, measured on this machine).
    #[arg(long)]
    pub baseline_step_s: Option<f64>,
    /// Memory policy, as for `train` (e.g. "norm+swiglu+attention swap:0").
    #[arg(long)]
    pub memory_policy: Option<String>,
    /// Directory for swap files (default: the system's temporary directory).
    #[arg(long)]
    pub swap_dir: Option<PathBuf>,
    /// No progress bar (there is none when stderr is not a terminal either).
    #[arg(long)]
    pub no_progress: bool,
    /// The head's logits whole (formed in the forward and kept to the backward) instead
    /// of 2 MiB row chunks in the backward: the unfused baseline.
    #[arg(long)]
    pub whole_logits: bool,
}

/// Options of `ultramoe bench gemm`.
#[derive(Args, Debug)]
pub struct BenchGemmArgs {
    /// Routed rows (tokens × top-k).
    #[arg(long, default_value_t = 8192)]
    pub rows: usize,
    /// Experts.
    #[arg(long, default_value_t = 16)]
    pub experts: usize,
    /// Input width (hidden size).
    #[arg(long, default_value_t = 256)]
    pub d_in: usize,
    /// Output width (2 × expert FFN width for the fused gate/up).
    #[arg(long, default_value_t = 256)]
    pub d_out: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
}

/// `ultramoe bench …`.
pub fn run(c: BenchCommand) -> CliResult {
    match c {
        BenchCommand::Train(a) => bench_train(a),
        BenchCommand::Gemm(a) => bench_gemm(a),
        BenchCommand::Comm(a) => super::bench_comm::run(a),
        BenchCommand::Decode(a) => super::bench_decode::run(a),
    }
}

fn bench_train(a: BenchTrainArgs) -> CliResult {
    let cfg = ModelConfig::from_file(&a.config).map_err(|e| e.to_string())?;
    let memory_policy = super::train::policy_from_args(a.memory_policy.as_deref(), None, cfg.n_layers)?.unwrap_or_default();
    let head_chunk_bytes = if a.whole_logits { 0 } else { ultramoe_model::pass::DEFAULT_HEAD_CHUNK_BYTES };
    let spec = RunSpec { memory_policy, swap_dir: a.swap_dir.clone(), head_chunk_bytes, ..RunSpec::default() };
    let tc = TrainConfig { steps: (a.steps + a.warmup) as u64, micro_batch: a.batch, seq_len: a.seq, data: DataSpec::Random, warmup: 1, ..TrainConfig::default() };
    // The step's size is checked against the machine (by the trainer) before the peak
    // is measured.
    tc.validate_for(&cfg).map_err(|e| e.to_string())?;
    let peak = measure_peak_flops(1024, 1.0);
    let mut tr = Trainer::start(cfg, tc, spec, Weights::Seed(1), Place::alone(peak)).map_err(|e| e.to_string())?;
    let bar = Progress::new("bench train", (a.warmup + a.steps) as u64, !a.no_progress);
    bar.doing("warm-up");
    for _ in 0..a.warmup {
        tr.train_step().map_err(|e| e.to_string())?;
        bar.done_one();
    }
    bar.doing("measured steps");
    ultramoe_kernels::profile::take();
    let mut times = Vec::with_capacity(a.steps);
    let mut mfus = Vec::with_capacity(a.steps);
    let mut peak_bytes = 0;
    for _ in 0..a.steps {
        let s = tr.train_step().map_err(|e| e.to_string())?;
        times.push(s.step_s);
        mfus.push(s.mfu);
        peak_bytes = peak_bytes.max(s.peak_bytes);
        bar.done_one();
    }
    bar.finish();
    let med = median(times.clone());
    let tokens = (a.batch * a.seq) as f64;
    println!("model          {} ({:.2}M params, {:.2}M active)", a.config.display(), tr.model.n_params() as f64 / 1e6, tr.model.active_params() as f64 / 1e6);
    println!("cpu            {}; vector ISA {}", cpu_name(), ultramoe_kernels::gemm::vector_isa());
    println!("step           batch {} × seq {} = {} tokens, f32, {} threads", a.batch, a.seq, tokens, rayon::current_num_threads());
    println!("step time      median {:.4} s (min {:.4}, max {:.4}, {} steps)", med, times.iter().cloned().fold(f64::MAX, f64::min), times.iter().cloned().fold(0.0, f64::max), a.steps);
    println!("throughput     {:.0} tokens/s", tokens / med);
    println!("GEMM peak      {:.1} GFLOP/s (measured now: the fastest of a second of 1024³ f32 products)", peak / 1e9);
    println!("model FLOPs    {:.2} GFLOP/step", tr.model.train_flops(a.batch, a.seq) / 1e9);
    println!("MFU            {:.1}% (median)", 100.0 * median(mfus));
    println!("memory policy  {}", ultramoe_model::policy::describe_policy(&tr.pass.policy));
    if peak_bytes > 0 {
        println!("peak memory    {:.1} MB (heap, counted)", peak_bytes as f64 / 1e6);
    }
    if let Some(b) = a.baseline_step_s {
        println!("vs baseline    {:.2}× ({b:.3} s/step baseline)", b / med);
    }
    let phases = ultramoe_kernels::profile::take();
    if !phases.is_empty() {
        println!("phases (ULTRAMOE_PROFILE, inclusive, per step):");
        for (name, secs, calls) in phases {
            println!("  {name:<26} {:>8.2} ms  ({} calls/step)", 1e3 * secs / a.steps as f64, calls / a.steps as u64);
        }
    }
    Ok(())
}

fn bench_gemm(a: BenchGemmArgs) -> CliResult {
    if a.experts == 0 || a.rows == 0 {
        return Err("--experts and --rows must be positive".into());
    }
    // Uneven but realistic expert loads: multinomial draws with random expert weights.
    let mut rng = Rng::new(7);
    let weights: Vec<f64> = (0..a.experts).map(|_| 0.5 + rng.uniform()).collect();
    let total_w: f64 = weights.iter().sum();
    let mut counts = vec![0usize; a.experts];
    for _ in 0..a.rows {
        let mut u = rng.uniform() * total_w;
        let mut e = 0;
        while e + 1 < a.experts && u >= weights[e] {
            u -= weights[e];
            e += 1;
        }
        counts[e] += 1;
    }
    let mut offsets = vec![0usize];
    for c in &counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    let x: Vec<f32> = (0..a.rows * a.d_in).map(|i| ((i * 7919) % 13) as f32 * 0.01).collect();
    let w: Vec<f32> = (0..a.experts * a.d_out * a.d_in).map(|i| ((i * 104729) % 17) as f32 * 0.01).collect();
    let dy: Vec<f32> = (0..a.rows * a.d_out).map(|i| ((i * 31) % 11) as f32 * 0.01).collect();
    let mut dw = vec![0.0f32; a.experts * a.d_out * a.d_in];
    let flops = 2.0 * (a.rows * a.d_in * a.d_out) as f64;
    let time = |f: &mut dyn FnMut()| {
        f();
        median((0..a.reps).map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        }).collect())
    };
    // The training path on both sides: outputs in fresh buffers, weight gradients accumulated.
    let g_fwd = time(&mut || drop(grouped_linear(&x, &w, &offsets, a.d_in, a.d_out)));
    let g_bwd = time(&mut || drop(grouped_linear_grad(&mut dw, &dy, &x, &w, &offsets, a.d_in, a.d_out)));
    let w0 = &w[..a.d_out * a.d_in];
    let d_fwd = time(&mut || drop(linear(&x, w0, a.rows, a.d_in, a.d_out)));
    let dw0 = &mut dw[..a.d_out * a.d_in];
    let d_bwd = time(&mut || drop(linear_grad(dw0, &dy, &x, w0, a.rows, a.d_in, a.d_out)));
    println!("grouped GEMM: {} rows over {} experts (loads {}..{}), {}→{}, {} threads", a.rows, a.experts, counts.iter().min().unwrap(), counts.iter().max().unwrap(), a.d_in, a.d_out, rayon::current_num_threads());
    println!("                 grouped        dense      grouped/dense");
    println!("forward   {:>10.1} GF/s {:>10.1} GF/s {:>10.2}", flops / g_fwd / 1e9, flops / d_fwd / 1e9, d_fwd / g_fwd);
    println!("backward  {:>10.1} GF/s {:>10.1} GF/s {:>10.2}", 2.0 * flops / g_bwd / 1e9, 2.0 * flops / d_bwd / 1e9, d_bwd / g_bwd);
    Ok(())
}

/// The CPU's model name from /proc/cpuinfo (the architecture elsewhere).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|n| n.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
