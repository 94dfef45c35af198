//! `ultramoe calibrate`: measures this machine's rates — GEMM at a range of sizes, the
//! grouped expert GEMM at a range of rows per expert, the attention core, memory and
//! copy bandwidth, and a training step's fixed cost — into a hardware description the
//! planner reads (`ultramoe plan --cluster FILE`).
//!
//! Every efficiency is measured the way the planner uses it: a GEMM's forward and both
//! backward products (`3·f` FLOPs for a forward of `f`), the experts' whole forward and
//! backward (gate/up, SwiGLU, down), attention's forward and backward (priced at
//! `3.5 ×` its forward FLOPs), each divided by the measured GEMM peak.

use super::{median, CliResult};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use ultramoe_kernels::activation::{swiglu, swiglu_grad};
use ultramoe_kernels::attention::{attention_backward, attention_forward, AttnShape, Mask};
use ultramoe_kernels::gemm::{linear, linear_grad, measure_peak_flops};
use ultramoe_kernels::grouped_gemm::{grouped_linear, grouped_linear_grad};
use ultramoe_plan::hardware::{Device, Efficiency, Hardware, Network};

/// Options of `ultramoe calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Write the hardware description here (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seconds per measured point (more: steadier figures).
    #[arg(long, default_value_t = 0.3)]
    pub seconds: f64,
    /// Describe the machine as this many devices, each a rank with the `--threads`
    /// cores this calibration runs on. Memory is split between them; the all-to-all runs
    /// at the machine's copy bandwidth. Default: 1 (the whole machine is one device), or
    /// under `mpirun` its process count: `mpirun -np 2 ultramoe --threads 1 calibrate`
    /// measures each core while the other is as busy as in `mpirun -np 2 ultramoe
    /// --threads 1 train` (each process bound to its core by mpirun), and rank 0 writes.
    #[arg(long)]
    pub devices_per_node: Option<usize>,
    /// No progress bar and no phase lines (the measured figures are still printed).
    #[arg(long)]
    pub no_progress: bool,
}

/// Median seconds of `f` over repetitions filling about `budget` seconds.
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut times = vec![];
    while times.len() < 3 || (start.elapsed().as_secs_f64() < budget && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    median(times)
}

fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 9) as f32 / 8388608.0 - 0.5).collect()
}

/// A linear layer's forward and backward at `n × d_in → d_out`: efficiency of `3·2·n·d_in·d_out`.
fn gemm_point(n: usize, d_in: usize, d_out: usize, peak: f64, budget: f64) -> [f64; 2] {
    let (x, w, dy) = (filled(n * d_in, 1), filled(d_out * d_in, 2), filled(n * d_out, 3));
    let mut dw = vec![0.0; d_out * d_in];
    let t = time(budget, || {
        std::hint::black_box(linear(&x, &w, n, d_in, d_out));
        std::hint::black_box(linear_grad(&mut dw, &dy, &x, &w, n, d_in, d_out));
    });
    let f = 2.0 * (n * d_in * d_out) as f64;
    [f, 3.0 * f / t / peak]
}

/// All experts' forward and backward with `rows` rows each: keyed by one expert's
/// forward FLOPs `6·rows·H·I`.
fn grouped_point(experts: usize, rows: usize, h: usize, inter: usize, peak: f64, budget: f64) -> [f64; 2] {
    let n = experts * rows;
    let offsets: Vec<usize> = (0..=experts).map(|e| e * rows).collect();
    let (x, wgu, wd) = (filled(n * h, 4), filled(experts * 2 * inter * h, 5), filled(experts * h * inter, 6));
    let dy = filled(n * h, 7);
    let (mut dgu, mut dd) = (vec![0.0; wgu.len()], vec![0.0; wd.len()]);
    let t = time(budget, || {
        let gu = grouped_linear(&x, &wgu, &offsets, h, 2 * inter);
        let a = swiglu(&gu, inter);
        std::hint::black_box(grouped_linear(&a, &wd, &offsets, inter, h));
        let da = grouped_linear_grad(&mut dd, &dy, &a, &wd, &offsets, inter, h);
        let dg = swiglu_grad(&da, &gu, inter);
        std::hint::black_box(grouped_linear_grad(&mut dgu, &dg, &x, &wgu, &offsets, h, 2 * inter));
    });
    let per_expert = 6.0 * (rows * h * inter) as f64;
    [per_expert, 3.0 * per_expert * experts as f64 / t / peak]
}

/// The attention core's forward and backward, as a fraction of peak at `3.5 ×` its
/// forward FLOPs `2·h·(d_qk + d_v)·(T+1)/2` per token.
fn attention_point(b: usize, t: usize, nh: usize, d: usize, peak: f64, budget: f64) -> f64 {
    let s = AttnShape { b, t, nh, nkv: nh, dqk: d, dv: d };
    let n = b * t;
    let (q, k, v, dout) = (filled(n * nh * d, 8), filled(n * nh * d, 9), filled(n * nh * d, 10), filled(n * nh * d, 11));
    let scale = 1.0 / (d as f32).sqrt();
    // Buffers are allocated per call, as the attention layers do.
    let secs = time(budget, || {
        let (mut out, mut probs) = (vec![0.0; n * nh * d], vec![0.0; s.probs_len()]);
        attention_forward(&mut out, Some(&mut probs), &q, &k, &v, s, Mask::Causal, scale);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, Some(&probs), s, Mask::Causal, scale);
        std::hint::black_box((out, dq, dk, dv));
    });
    let fwd = 2.0 * (nh * 2 * d) as f64 * (t as f64 + 1.0) / 2.0 * n as f64;
    3.5 * fwd / secs / peak
}

/// Bytes per second the model's elementwise kernels reach: RMSNorm forward and backward
/// on `[2048, 128]` with fresh output buffers, as the layers call it (5 arrays of 4-byte
/// elements touched per element: x, y forward; dy, x, dx backward).
fn memory_bandwidth(budget: f64) -> f64 {
    use ultramoe_kernels::norm::{rmsnorm_backward, rmsnorm_forward};
    let (n, d) = (2048, 128);
    let (x, w, dy) = (filled(n * d, 12), filled(d, 13), filled(n * d, 14));
    let mut dw = vec![0.0; d];
    let t = time(budget, || {
        let (mut y, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        rmsnorm_forward(&mut y, &mut rstd, &x, &w, d, 1e-6);
        let mut dx = vec![0.0; n * d];
        rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, d, false);
        std::hint::black_box((y, dx));
    });
    5.0 * 4.0 * (n * d) as f64 / t
}

/// Seconds per parameter of the trainer's optimizer step (gradient norm, clipping,
/// AdamW) over 8M parameters in 256 tensors of 32K (MoE models are many expert tensors).
fn optimizer_s_per_param(budget: f64) -> f64 {
    use ultramoe_model::params::{Init, ParamLayout};
    use ultramoe_train::optimizer::{clip_to_norm, global_norm, AdamW, AdamWConfig};
    let n = 1 << 23;
    let mut layout = ParamLayout::default();
    for i in 0..256 {
        layout.add(format!("w{i}"), &[32, 1024], Init::Constant(0.0));
    }
    let mut opt = AdamW::new(&layout, AdamWConfig::default());
    let mut w = filled(n, 15);
    // The step zeroes the gradient; later steps see zeros, which cost the same.
    let mut g = filled(n, 16);
    let t = time(budget, || {
        let norm = global_norm(&g);
        clip_to_norm(&mut g, norm, 1.0);
        opt.step(&mut w, &mut g, 1e-3);
    });
    t / n as f64
}

/// Bytes per second a rank sends in an in-process all-to-all of 2 ranks (the trainer's
/// probe: 1 MiB per peer, best of three).
fn copy_bandwidth() -> CliResult<f64> {
    let rates = ultramoe_dist::local::run(2, std::time::Duration::from_secs(60), |c| {
        let g: std::sync::Arc<dyn ultramoe_dist::ProcessGroup> = std::sync::Arc::new(c);
        ultramoe_train::placement::probe_bandwidth(g.as_ref())
    })
    .map_err(|e| e.to_string())?;
    Ok(rates[0])
}

/// A training step's fixed costs, from models too small to compute: the median step with
/// 1 and with 5 decoder layers gives the cost per layer (their difference / 4) and the
/// rest of the step. Returns (per step, per layer).
fn fixed_costs() -> CliResult<(f64, f64)> {
    let one = tiny_step(1)?;
    let five = tiny_step(5)?;
    let per_layer = ((five - one) / 4.0).max(0.0);
    Ok(((one - per_layer).max(0.0), per_layer))
}

/// Median step time of a tiny MoE with `layers` decoder layers (1 × 4 tokens, 60 steps).
fn tiny_step(layers: usize) -> CliResult<f64> {
    let cfg = format!(
        r#"{{"model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "moe_intermediate_size": 4,
            "num_hidden_layers": {layers}, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8, "num_experts": 2,
            "num_experts_per_tok": 1, "max_position_embeddings": 16}}"#
    );
    median_step(&cfg, 1, 4, 60, 0)
}

/// Median step of the trainer on `config` (one rank, random data) over `steps` steps
/// after `skip` warm-up steps.
fn median_step(config: &str, micro_batch: usize, seq_len: usize, steps: usize, skip: usize) -> CliResult<f64> {
    use ultramoe_model::ModelConfig;
    use ultramoe_train::spec::RunSpec;
    use ultramoe_train::trainer::{DataSpec, Place, TrainConfig, Trainer, Weights};
    let cfg = ModelConfig::from_json_str(config).map_err(|e| e.to_string())?;
    let tc = TrainConfig { steps: (skip + steps) as u64, micro_batch, seq_len, data: DataSpec::Random, warmup: 1, ..TrainConfig::default() };
    let mut tr = Trainer::start(cfg, tc, RunSpec::default(), Weights::Seed(1), Place::alone(1e11)).map_err(|e| e.to_string())?;
    let times: Vec<f64> = (0..skip + steps).map(|_| tr.train_step().map(|s| s.step_s)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    Ok(median(times[skip..].to_vec()))
}

/// Reference models for the elementwise rate: one with grouped-query attention, one with
/// multi-head latent attention (neither is a model `plan --validate` is checked on).
const REFERENCES: [&str; 2] = [
    r#"{"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16,
        "num_experts_per_tok": 2, "max_position_embeddings": 256, "decoder_sparse_step": 1, "mlp_only_layers": []}"#,
    r#"{"model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 2, "first_k_dense_replace": 0, "num_attention_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "max_position_embeddings": 256}"#,
];

/// The fraction of the RMSNorm bandwidth the layers' elementwise work reaches as a whole
/// (splits, RoPE, norms, activations, fresh buffers): on each reference model the
/// planner's prediction is `A + B/f` in this fraction `f` (everything else fixed), solved
/// for the measured step; the geometric mean over the references.
fn elementwise_fraction(hw: &Hardware, log: &dyn Fn(String)) -> CliResult<f64> {
    use ultramoe_plan::validate::{predict_run, RunRecord};
    let mut logs = vec![];
    for cfg in REFERENCES {
        let measured = median_step(cfg, 8, 128, 20, 5)?;
        let run = RunRecord {
            name: "reference".into(),
            model: serde_json::from_str(cfg).map_err(|e| e.to_string())?,
            micro_batch: 8,
            seq_len: 128,
            grad_accum: 1,
            ranks: 1,
            ep: 1,
            step_s: measured,
            pp: 1,
            vpp: 1,
            tp: 1,
            sequence_parallel: false,
            recompute: None,
            zero1: false,
            schedule: Default::default(),
            measured: None,
        };
        let at = |f: f64| {
            let mut h = hw.clone();
            h.efficiency.memory = f;
            predict_run(&run, &h).map_err(|e| e.to_string())
        };
        let (t1, t2) = (at(1.0)?, at(2.0)?);
        let b = 2.0 * (t1 - t2);
        let a = t1 - b;
        let f = if measured > a && b > 0.0 { (b / (measured - a)).clamp(0.05, 2.0) } else { 2.0 };
        log(format!("  reference {}: {:.1} ms measured, elementwise at {:.2} of the RMSNorm rate", if logs.is_empty() { "GQA" } else { "MLA" }, measured * 1e3, f));
        logs.push(f.ln());
    }
    Ok((logs.iter().sum::<f64>() / logs.len() as f64).exp())
}

/// `ultramoe calibrate`.
pub fn run(a: CalibrateArgs) -> CliResult {
    // Under mpirun every process measures at once (so each core is measured beside busy
    // neighbours, as in training); rank 0 reports and writes.
    let devices = a.devices_per_node.or(crate::launch::mpi_world_size()).unwrap_or(1);
    if devices == 0 {
        return Err("--devices-per-node: must be at least 1, found 0".into());
    }
    if crate::launch::mpi_world_rank().is_some_and(|r| r > 0) {
        return measure(&a, devices).map(|_| ());
    }
    let text = measure(&a, devices)?;
    match &a.out {
        Some(p) => {
            std::fs::write(p, &text).map_err(|e| format!("{}: cannot write: {e}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// The hardware description's text, from measurements of this machine described as
/// `devices` devices (progress on stderr, from MPI rank 0 only).
fn measure(a: &CalibrateArgs, devices: usize) -> CliResult<String> {
    let b = a.seconds;
    let quiet = crate::launch::mpi_world_rank().is_some_and(|r| r > 0);
    let bar = crate::progress::Progress::new("calibrate", 7, !a.no_progress);
    // Measured figures above the bar; phases as its message.
    macro_rules! eprintln {
        ($($t:tt)*) => {
            if !quiet {
                bar.log(format!($($t)*))
            }
        };
    }
    let mut phases = 0;
    let mut phase = |what: &str| {
        if phases > 0 {
            bar.done_one();
        }
        phases += 1;
        bar.doing(what);
        if !quiet && !a.no_progress && !bar.shown() {
            std::eprintln!("{what} ...");
        }
    };
    phase("measuring the GEMM peak");
    let peak = measure_peak_flops(1024, 4.0 * b);
    eprintln!("  {:.1} GFLOP/s", peak / 1e9);
    phase("GEMM efficiency by size");
    // Token counts and widths as transformer layers have them, skinny ones included (a
    // GEMM with a 32-wide side runs far below a square one of the same FLOPs).
    let shapes = [
        (64, 32, 32),
        (256, 64, 64),
        (2048, 32, 128),
        (2048, 128, 48),
        (2048, 128, 128),
        (2048, 128, 384),
        (2048, 256, 512),
        (4096, 256, 1024),
        (4096, 512, 2048),
        (8192, 1024, 2048),
    ];
    let gemm: Vec<[f64; 2]> = shapes.iter().map(|&(n, i, o)| gemm_point(n, i, o, peak, b)).collect();
    for p in &gemm {
        eprintln!("  {:>10.3e} FLOPs per call: {:.1}% of peak", p[0], 100.0 * p[1]);
    }
    phase("grouped expert GEMM by rows per expert");
    let grouped: Vec<[f64; 2]> = [(16, 4, 64, 32), (16, 16, 128, 96), (16, 64, 128, 96), (16, 64, 256, 128), (16, 256, 256, 512), (16, 512, 256, 512), (8, 2048, 512, 512)]
        .iter()
        .map(|&(e, r, h, i)| grouped_point(e, r, h, i, peak, b))
        .collect();
    for p in &grouped {
        eprintln!("  {:>10.3e} FLOPs per expert: {:.1}% of peak", p[0], 100.0 * p[1]);
    }
    // The 1024³ peak is a short measurement; when a point ran faster, the fastest rate
    // seen is the peak and every fraction is rescaled to it.
    let best = gemm.iter().chain(&grouped).map(|p| p[1]).fold(1.0, f64::max);
    let peak = peak * best;
    let rescale = |v: Vec<[f64; 2]>| by_flops(v.into_iter().map(|[f, e]| [f, e / best]).collect());
    let (gemm, grouped) = (rescale(gemm), rescale(grouped));
    phase("attention core");
    let att: Vec<f64> = [(8, 128, 4, 32), (4, 256, 8, 32), (8, 64, 4, 16)].iter().map(|&(bb, t, nh, d)| attention_point(bb, t, nh, d, peak, b)).collect();
    let attention = att.iter().sum::<f64>() / att.len() as f64;
    eprintln!("  {:.1}% of peak (mean of {} shapes)", 100.0 * attention, att.len());
    phase("memory and copy bandwidth");
    let mem = memory_bandwidth(b);
    let copy = copy_bandwidth()?;
    eprintln!("  memory {:.1} GB/s, in-process all-to-all {:.1} GB/s per rank", mem / 1e9, copy / 1e9);
    let opt_s = optimizer_s_per_param(b);
    eprintln!("  optimizer step {:.2} ns per parameter", opt_s * 1e9);
    phase("fixed cost of a training step");
    let (overhead, per_layer) = fixed_costs()?;
    eprintln!("  {:.2} ms per step, {:.3} ms per layer and micro-batch", overhead * 1e3, per_layer * 1e3);
    // The machine's cores (not this process's: mpirun binds each process to one).
    let cores = std::fs::read_to_string("/proc/cpuinfo").map_or(0, |t| t.lines().filter(|l| l.starts_with("processor")).count());
    let cores = if cores > 0 { cores } else { std::thread::available_parallelism().map_or(1, |c| c.get()) };
    let name = match devices {
        1 => format!("this machine ({cores} cores, f32, calibrated)"),
        d => format!("this machine ({cores} cores as {d} devices of {} thread(s), f32, calibrated)", rayon::current_num_threads()),
    };
    let hw = Hardware {
        name,
        source: "ultramoe calibrate".into(),
        devices_per_node: devices,
        device: Device { peak_flops: BTreeMap::from([("fp32".to_string(), peak)]), memory_bytes: total_memory().unwrap_or(16e9) / devices as f64, memory_bandwidth: mem, memory_reserved: None },
        network: Network {
            intra_node_bandwidth: copy,
            intra_node_latency: 5e-6,
            // one machine: no inter-node link of its own; 1 Gbit/s Ethernet assumed
            inter_node_bandwidth: 0.125e9,
            inter_node_latency: 50e-6,
        },
        efficiency: Efficiency {
            gemm,
            grouped_gemm: grouped,
            attention,
            fp8_gemm: 1.0,
            // set below from the reference models
            memory: 1.0,
            optimizer: 28.0 / opt_s / mem,
            network: 1.0,
            ep_overlap: 0.0,
            dp_overlap: 0.0,
            tp_overlap: 0.0,
            // ranks are threads or processes of one CPU: no cores set aside for messages
            comm_sm_share: 0.0,
            step_overhead: overhead,
            layer_overhead: per_layer,
            // measured as `layer_overhead` (the CPU is both host and device)
            host_layer: 0.0,
        },
    };
    phase("elementwise work on reference models");
    let mut hw = hw;
    hw.efficiency.memory = elementwise_fraction(&hw, &|line| {
        if !quiet {
            bar.log(line)
        }
    })?;
    Ok(format!("# Measured by `ultramoe calibrate` ({} s per point).\n{}", b, hw.to_toml()))
}

/// Points sorted by FLOPs (equal FLOPs: the first kept).
fn by_flops(mut pts: Vec<[f64; 2]>) -> Vec<[f64; 2]> {
    pts.sort_by(|a, b| a[0].total_cmp(&b[0]));
    pts.dedup_by(|a, b| a[0] == b[0]);
    pts
}

/// Physical memory from /proc/meminfo.
fn total_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}
