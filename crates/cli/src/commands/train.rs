//! `ultramoe train`.

use super::{peak_flops, CliResult};
use crate::presets::{math_train_config, MATH_MOE_CONFIG};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use crate::launch::{launch, ParallelArgs};
use ultramoe_dist::Mesh;
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::init::init_weights;
use ultramoe_model::memory::CostRates;
use ultramoe_model::policy::{describe_policy, parse_layer_list, parse_policy, LayerPolicy};
use ultramoe_model::{Model, ModelConfig};
use ultramoe_train::run_dir::{RunDir, Start};
use ultramoe_train::trainer::{AuxLossConfig, DataSpec, StepStats, TrainConfig, Trainer};

/// Options of `ultramoe train`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Model `config.json` (Hugging Face format). Default: the embedded math MoE.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Start from the weights in this checkpoint directory instead of a fresh init.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Run directory: checkpoints, metrics, final model.
    #[arg(long, default_value = "runs/train")]
    pub run_dir: PathBuf,
    /// Continue from the run directory's latest checkpoint. Flags that would change the
    /// continued run's numbers (learning rate, batch, data, model…) are refused; steps,
    /// the checkpoint interval, ZeRO-1 and the memory options apply.
    #[arg(long)]
    pub resume: bool,
    /// Remove an earlier run's checkpoints, model and metrics from the run directory and
    /// start over (without it, training into a directory that holds a run is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Steps in a row with a non-finite loss or gradient norm (each update skipped)
    /// before training stops with an error.
    #[arg(long, allow_hyphen_values = true)]
    pub max_nonfinite_steps: Option<u64>,
    /// Optimizer steps.
    #[arg(long, allow_hyphen_values = true)]
    pub steps: Option<u64>,
    /// Rows per micro-batch.
    #[arg(long, allow_hyphen_values = true)]
    pub micro_batch: Option<usize>,
    /// Tokens per row.
    #[arg(long, allow_hyphen_values = true)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, allow_hyphen_values = true)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f32>,
    /// Final learning rate of the cosine decay.
    #[arg(long, allow_hyphen_values = true)]
    pub min_lr: Option<f32>,
    /// Warmup steps.
    #[arg(long, allow_hyphen_values = true)]
    pub warmup: Option<u64>,
    /// Seed (weights: seed, data: seed + 1).
    #[arg(long, allow_hyphen_values = true)]
    pub seed: Option<u64>,
    /// Data: `math` (generated problems), `random` (random tokens), or a JSONL file.
    #[arg(long)]
    pub data: Option<String>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, allow_hyphen_values = true)]
    pub save_every: Option<u64>,
    /// Aux-loss-free balancing rate for routers with a correction bias (0 = off).
    #[arg(long, allow_hyphen_values = true)]
    pub bias_update_rate: Option<f32>,
    /// Auxiliary balancing loss: switch, sequence, ep-group or z (off by default).
    #[arg(long)]
    pub aux_loss: Option<String>,
    /// Coefficient of the auxiliary loss.
    #[arg(long, default_value_t = 1e-2, allow_hyphen_values = true)]
    pub aux_loss_coef: f32,
    /// Expert-parallel groups the `ep-group` loss balances.
    #[arg(long, default_value_t = 1)]
    pub aux_ep_groups: usize,
    /// Skewed-load workload: Zipf exponent of a fixed router bias toward low-numbered experts.
    #[arg(long, allow_hyphen_values = true)]
    pub routing_skew: Option<f32>,
    /// Report per-rank loads as if experts were split over this many expert-parallel
    /// ranks (one-rank runs; under --ep the real ranks are reported).
    #[arg(long, allow_hyphen_values = true)]
    pub stats_ep: Option<usize>,
    /// Dynamic expert placement: every N steps, move (and replicate) experts so the
    /// expert-parallel ranks carry even loads, when the predicted gain beats the cost of
    /// moving (0 = off; needs --ep ≥ 2).
    #[arg(long, allow_hyphen_values = true)]
    pub placement_every: Option<u64>,
    /// Extra expert slots per expert-parallel rank, for copies of hot experts.
    #[arg(long, allow_hyphen_values = true)]
    pub redundant_experts: Option<usize>,
    /// Append per-step metrics as JSON lines to this file (default: RUN_DIR/metrics.jsonl).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Peak GFLOP/s for MFU (default: measured at start).
    #[arg(long, allow_hyphen_values = true)]
    pub peak_gflops: Option<f64>,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Memory budget for a training step (bytes, or with a unit: 512MB, 2GB, 1.5GiB):
    /// unless --recompute or --memory-policy is given, the cheapest policy that fits is
    /// chosen (selective recomputation, swapping, whole layers); when nothing fits,
    /// training does not start and the error names what does not fit.
    #[arg(long, allow_hyphen_values = true)]
    pub memory_budget: Option<String>,
    /// Decoder layers to recompute whole in backward (only their inputs kept): `all`,
    /// `none`, or indices like `0,2,3` (the same as --memory-policy full:LAYERS).
    #[arg(long)]
    pub recompute: Option<String>,
    /// What each layer frees after its forward, as OPS[:LAYERS] items: ops `norm`,
    /// `swiglu`, `attention`, `qkv`, `experts`, `ffn` (rebuilt in backward), `swap` (to
    /// the swap file), `full` (whole layer), joined by `+`; layers `all` (default) or
    /// like 0,2,5-7. E.g. "norm+swiglu+attention swap:0,1". Every policy gives the same
    /// numbers.
    #[arg(long)]
    pub memory_policy: Option<String>,
    /// Directory for swap files (default: the system's temporary directory).
    #[arg(long)]
    pub swap_dir: Option<PathBuf>,
    /// Keep the optimizer moments in a swap file during each step's forward and backward
    /// (written as the step starts, read back during the bottom layer's backward).
    #[arg(long)]
    pub swap_moments: bool,
    /// ZeRO-1: shard the optimizer moments over the ranks holding the same weights.
    #[arg(long)]
    pub zero1: bool,
    /// Sum gradients over ranks only after the whole backward pass (default: each
    /// layer's as soon as it is done, overlapping the rest of the backward).
    #[arg(long)]
    pub no_grad_overlap: bool,
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

fn apply_overrides(mut c: TrainConfig, a: &TrainArgs) -> CliResult<TrainConfig> {
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = a.$field.clone() {
                c.$field = v;
            }
        };
    }
    set!(steps);
    set!(micro_batch);
    set!(seq_len);
    set!(grad_accum);
    set!(lr);
    set!(min_lr);
    set!(warmup);
    set!(seed);
    set!(save_every);
    set!(bias_update_rate);
    set!(routing_skew);
    set!(stats_ep);
    set!(placement_every);
    set!(redundant_experts);
    set!(max_nonfinite_steps);
    c.zero1 |= a.zero1;
    c.overlap_grad_reduce &= !a.no_grad_overlap;
    if let Some(kind) = &a.aux_loss {
        c.aux_loss = Some(AuxLossConfig { kind: kind.clone(), coef: a.aux_loss_coef, ep_groups: a.aux_ep_groups });
    }
    if let Some(d) = &a.data {
        c.data = match d.as_str() {
            "math" => DataSpec::Math,
            "random" => DataSpec::Random,
            path => {
                let p = PathBuf::from(path);
                if !p.is_file() {
                    return Err(format!("--data: `{path}` is neither `math`, `random` nor an existing JSONL file"));
                }
                DataSpec::Jsonl(p)
            }
        };
    }
    Ok(c)
}

/// Builds a trainer from the arguments on one rank of `mesh`, or alone: resumed from
/// `latest` (the run directory's newest checkpoint, see [`RunDir`]) or fresh.
pub fn make_trainer(a: &TrainArgs, latest: Option<&Path>, mesh: Option<Mesh>) -> CliResult<Trainer> {
    let peak = peak_flops(a.peak_gflops);
    let lead = mesh.as_ref().is_none_or(|m| m.world.rank() == 0);
    let world = mesh.as_ref().map_or(1, |m| m.world.size());
    if let Some(dir) = latest {
        refuse_contradictions(a, dir)?;
        let tr = Trainer::resume_prepared(dir, peak, mesh, &mut |model, tc| {
            if let Some(s) = a.steps {
                tc.steps = s;
            }
            tc.zero1 |= a.zero1;
            tc.overlap_grad_reduce &= !a.no_grad_overlap;
            if let Some(n) = a.save_every {
                tc.save_every = n;
            }
            apply_memory_args(a, model, tc, lead, peak, world).map_err(ultramoe_model::Error::msg)
        })
        .map_err(|e| e.to_string())?;
        if lead {
            eprintln!("resuming from {} at step {}", dir.display(), tr.step);
        }
        return Ok(tr);
    }
    if a.resume && lead {
        eprintln!("no checkpoint in {}; starting fresh", a.run_dir.display());
    }
    let cfg = match &a.model_config {
        Some(p) => ModelConfig::from_file(p),
        None => ModelConfig::from_json_str(MATH_MOE_CONFIG),
    }
    .map_err(|e| e.to_string())?;
    let mut tc = apply_overrides(math_train_config(), a)?;
    tc.validate_for(&cfg).map_err(|e| e.to_string())?;
    let mut model = match &mesh {
        Some(m) => Model::expert_parallel_redundant(cfg, m.ep.clone(), tc.redundant_experts).map_err(|e| e.to_string())?,
        None => Model::new(cfg),
    };
    apply_memory_args(a, &mut model, &mut tc, lead, peak, world)?;
    let w = match &a.init_from {
        Some(dir) => load_weights(&model, dir).map_err(|e| e.to_string())?,
        None => init_weights(&model.layout, tc.seed),
    };
    Trainer::with_mesh(model, w, tc, peak, mesh).map_err(|e| e.to_string())
}

/// The memory options (`--memory-policy`, `--recompute`, `--swap-dir`, `--swap-moments`,
/// `--memory-budget`) applied to a model and its training config, fresh or resumed
/// (policies change no number, so a resumed run may take new ones); then the step's
/// predicted peak is checked against the budget and against what the machine has,
/// before any weights are allocated.
fn apply_memory_args(a: &TrainArgs, model: &mut Model, tc: &mut TrainConfig, lead: bool, peak: f64, world: usize) -> CliResult {
    if let Some(policy) = policy_from_args(a.memory_policy.as_deref(), a.recompute.as_deref(), model.layers.len())? {
        tc.memory_policy = policy;
    }
    if let Some(dir) = &a.swap_dir {
        tc.swap_dir = Some(dir.clone());
        model.swap_dir = dir.clone();
    }
    tc.swap_moments |= a.swap_moments;
    model.swap_moments = tc.swap_moments;
    model.policy = tc.memory_policy.clone();
    let rows = (tc.micro_batch / world.max(1)).max(1);
    // Before anything runs: the size alone (weights, moments, activations) against the
    // machine, so a huge config or micro-batch is one line, not an allocation failure.
    // Ranks that are threads of this process share its memory.
    let here = if crate::launch::mpi_world_size().is_some() { 1 } else { world };
    model.check_step_fits_machine(rows, tc.seq_len, here).map_err(|e| e.to_string())?;
    if let Some(budget) = &a.memory_budget {
        // Kernel workspaces count against the budget too (measured on one rank; under
        // expert parallelism a trial pass would need every rank, so they are left out).
        let runtime = if model.ep.is_none() { ultramoe_model::memory::runtime_bytes(model) } else { 0 };
        let budget = parse_bytes(budget)?;
        if a.memory_policy.is_none() && a.recompute.is_none() {
            let rates = cost_rates(&model.swap_dir, peak);
            // When nothing fits, the most frugal policy tried goes to the check below,
            // which names what does not fit.
            let chosen = model.choose_policy(rows, tc.seq_len, 2, runtime, budget, &rates);
            if let (true, Ok(p)) = (lead, &chosen) {
                if p.iter().any(|p| !p.keeps_all()) || (model.swap_moments && !tc.swap_moments) {
                    let cost = model.policy_cost(rows, tc.seq_len, p, &rates);
                    let moments = if model.swap_moments { ", optimizer moments swapped" } else { "" };
                    eprintln!("--memory-budget: memory policy `{}`{moments} to fit (estimated cost {:.1} ms a micro-batch)", describe_policy(p), 1e3 * cost);
                }
            }
            tc.memory_policy = chosen.unwrap_or_else(|most| most);
            tc.swap_moments = model.swap_moments;
        }
        model.policy = tc.memory_policy.clone();
        check_budget(model, budget, rows, world, tc.seq_len, runtime)?;
    }
    Ok(())
}

/// On `--resume`, flags that would change the numbers of the continued run are refused
/// (naming the flag, the value given and the checkpoint's); steps, checkpoint interval,
/// ZeRO-1, gradient overlap and the memory options apply.
fn refuse_contradictions(a: &TrainArgs, dir: &Path) -> CliResult {
    if a.init_from.is_some() {
        return Err("--init-from starts a new run from a model; it cannot be combined with --resume".into());
    }
    if a.overwrite {
        return Err("--overwrite starts over; it cannot be combined with --resume".into());
    }
    if let Some(p) = &a.model_config {
        let given = ModelConfig::from_file(p).map_err(|e| e.to_string())?;
        let saved = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
        if given.raw != saved.raw {
            return Err(format!("--resume: --model-config {} differs from the checkpoint's config.json ({})", p.display(), dir.display()));
        }
    }
    let saved = Trainer::saved_config(dir).map_err(|e| e.to_string())?;
    let asked = apply_overrides(saved.clone(), a)?;
    let (saved_v, asked_v) = (serde_json::to_value(&saved).unwrap_or_default(), serde_json::to_value(&asked).unwrap_or_default());
    const APPLIES: [&str; 7] = ["steps", "save_every", "zero1", "overlap_grad_reduce", "memory_policy", "swap_dir", "swap_moments"];
    if let (Some(s), Some(q)) = (saved_v.as_object(), asked_v.as_object()) {
        for (key, given) in q {
            if APPLIES.contains(&key.as_str()) || s.get(key) == Some(given) {
                continue;
            }
            // Single-precision settings read back through f64: print them as given.
            let show = |v: &serde_json::Value| match v.as_f64() {
                Some(x) if v.is_f64() => (x as f32).to_string(),
                _ => v.to_string(),
            };
            return Err(format!(
                "--resume: --{} {} contradicts the checkpoint's {} ({}); it would change the continued run — start a new run instead",
                key.replace('_', "-"),
                show(given),
                s.get(key).map_or("(unset)".to_string(), show),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Trains to the configured step count with a progress bar (or log lines), saving
/// checkpoints and the final model under the run directory. Returns the last step's
/// statistics.
pub fn train_loop(tr: &mut Trainer, run_dir: &Path, metrics: Option<&Path>, progress: bool, continues: bool) -> CliResult<Option<StepStats>> {
    std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: cannot create run directory: {e}", run_dir.display()))?;
    let lead = tr.is_lead();
    if lead {
        let metrics_path = metrics.map(Path::to_path_buf).unwrap_or_else(|| run_dir.join("metrics.jsonl"));
        tr.log_metrics_to(&metrics_path, continues).map_err(|e| e.to_string())?;
    }
    let total = tr.cfg.steps;
    let bar = if progress && lead {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(tr.step);
        Some(b)
    } else {
        None
    };
    let mut last = None;
    let mut tokens_per_s = Vec::new();
    while tr.step < total {
        let s = tr.train_step().map_err(|e| e.to_string())?;
        tokens_per_s.push(s.tokens_per_s);
        let msg = format!(
            "loss {:.4} | {:.0} tok/s | MFU {:.1}% | expert imbalance {:.2}",
            s.loss,
            s.tokens_per_s,
            100.0 * s.mfu,
            s.expert_imbalance
        );
        match &bar {
            Some(b) => {
                b.set_position(s.step);
                b.set_message(msg);
            }
            None => {
                if lead && (s.step.is_multiple_of(10) || s.step == 1 || s.step == total) {
                    eprintln!("step {}/{} {msg}", s.step, total);
                }
            }
        }
        // A step whose update was skipped is not saved: the newest checkpoint stays one
        // from before a run of non-finite steps, and pruning never drops it for copies.
        if tr.cfg.save_every > 0 && s.step.is_multiple_of(tr.cfg.save_every) && s.step < total && !s.skipped {
            tr.save_checkpoint(run_dir, 2).map_err(|e| e.to_string())?;
        }
        last = Some(s);
    }
    if let Some(b) = &bar {
        b.finish();
    }
    tr.save_checkpoint(run_dir, 2).map_err(|e| e.to_string())?;
    tr.save_model(&run_dir.join("model")).map_err(|e| e.to_string())?;
    if !tokens_per_s.is_empty() && lead {
        tokens_per_s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        eprintln!(
            "trained to step {} — median {:.0} tokens/s; model saved to {}",
            tr.step,
            tokens_per_s[tokens_per_s.len() / 2],
            run_dir.join("model").display()
        );
    }
    Ok(last)
}

/// `ultramoe train`.
pub fn run(mut a: TrainArgs) -> CliResult {
    if a.parallel.is_parallel() && a.peak_gflops.is_none() {
        // Measure once, before the ranks start competing for the cores.
        a.peak_gflops = Some(peak_flops(None) / 1e9);
    }
    if let Some(g) = a.peak_gflops {
        if !(g.is_finite() && g > 0.0) {
            return Err(format!("--peak-gflops: must be a finite positive number, found {g}"));
        }
    }
    let start = match (a.resume, a.overwrite) {
        (true, true) => return Err("--overwrite starts over; it cannot be combined with --resume".into()),
        (true, false) => Start::Resume,
        (false, true) => Start::Overwrite,
        (false, false) => Start::Fresh,
    };
    // The process that writes run-wide files holds the run's lock (under mpirun: rank 0).
    let run = RunDir::open(&a.run_dir, start, crate::launch::mpi_world_rank().is_none_or(|r| r == 0)).map_err(|e| e.to_string())?;
    let latest = run.latest.clone();
    let p = a.parallel.clone();
    let result = launch(&p, move |mesh| train_rank(&a, latest.as_deref(), mesh));
    drop(run);
    result
}

fn train_rank(a: &TrainArgs, latest: Option<&Path>, mesh: Option<Mesh>) -> CliResult {
    let layout = mesh.as_ref().map(|m| (m.world.size(), m.ep_size(), m.dp_size()));
    let mut tr = make_trainer(a, latest, mesh)?;
    tr.model.set_overlap_chunks(a.parallel.overlap_chunks);
    if a.parallel.hierarchical_a2a {
        let per_node = tr.parallel.as_ref().map_or(1, |p| p.mesh.ranks_per_node);
        tr.model.set_hierarchical(per_node).map_err(|e| format!("--hierarchical-a2a: {e}"))?;
    }
    if !tr.is_lead() {
        return train_loop(&mut tr, &a.run_dir, a.metrics.as_deref(), false, a.resume).map(|_| ());
    }
    if let Some((n, ep, dp)) = layout {
        let overlap = tr.parallel.as_ref().is_some_and(|p| p.overlaps_reduction());
        eprintln!(
            "{n} ranks: expert-parallel {ep} × data-parallel {dp}; {} all-to-all; gradient reduction {}",
            if a.parallel.hierarchical_a2a { "hierarchical" } else { "flat" },
            if overlap { "overlaps the backward pass" } else { "after the backward pass" }
        );
        let params = tr.model.layout.total as f64 * 4.0 / 1e6;
        match &tr.zero {
            Some(z) => {
                let (mine, whole) = z.moment_floats();
                eprintln!("per rank: {params:.1} MB of weights, {:.1} MB of optimizer moments (ZeRO-1; {:.1} MB unsharded)", mine as f64 * 4e-6, whole as f64 * 4e-6);
            }
            None => eprintln!("per rank: {params:.1} MB of weights, {:.1} MB of optimizer moments", 2.0 * params),
        }
    }
    eprintln!(
        "model: {} with {:.2}M parameters ({:.2}M active per token); {} steps of {}×{}×{} tokens",
        tr.model.cfg.arch.model_type(),
        tr.model.n_params() as f64 / 1e6,
        tr.model.active_params() as f64 / 1e6,
        tr.cfg.steps,
        tr.cfg.micro_batch,
        tr.cfg.seq_len,
        tr.cfg.grad_accum
    );
    train_loop(&mut tr, &a.run_dir, a.metrics.as_deref(), !a.no_progress, a.resume)?;
    Ok(())
}

/// Parses `2GB`, `512MB`, `1.5GiB`, `100000` (bytes).
pub fn parse_bytes(text: &str) -> CliResult<usize> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.trim().parse().map_err(|_| format!("--memory-budget `{text}`: not a size (e.g. 2GB, 512MB, 1.5GiB)"))?;
    if !(x.is_finite() && x > 0.0) {
        return Err(format!("--memory-budget `{text}`: must be a positive size (e.g. 2GB, 512MB, 1.5GiB)"));
    }
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("--memory-budget `{text}`: unknown unit `{unit}` (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    Ok((x * scale) as usize)
}

/// Errors before training when a step's predicted peak (this rank's share of the model,
/// `micro_batch / world` rows) exceeds `budget`, naming the largest owners and the
/// largest micro-batch that would fit.
fn check_budget(model: &Model, budget: usize, rows: usize, world: usize, seq_len: usize, runtime: usize) -> CliResult {
    let plan = model.memory_plan(rows, seq_len, 2, runtime);
    if plan.peak_bytes <= budget {
        return Ok(());
    }
    let mut owners = plan.items.clone();
    owners.sort_by(|a, b| b.1.cmp(&a.1));
    let top: Vec<String> = owners.iter().take(3).map(|(o, b)| format!("{o} {:.1} MB", *b as f64 / 1e6)).collect();
    let fits = model.largest_micro_batch(seq_len, 2, runtime, budget, rows - 1);
    let advice = match fits {
        Some(r) => format!("with memory policy `{}` the largest micro-batch that fits is {} rows", describe_policy(&model.policy), r * world),
        None if plan.static_bytes > budget => "weights, gradients and moments alone exceed it".to_string(),
        None => format!("not even one row per rank fits with memory policy `{}`", describe_policy(&model.policy)),
    };
    Err(format!(
        "--memory-budget: a step needs {:.1} MB (weights, gradients and moments {:.1} MB, saved activations {:.1} MB, temporaries {:.1} MB, kernel workspaces {:.1} MB) > {:.1} MB; largest: {}; {advice}",
        plan.peak_bytes as f64 / 1e6,
        plan.static_bytes as f64 / 1e6,
        plan.activation_bytes as f64 / 1e6,
        plan.transient_bytes as f64 / 1e6,
        plan.runtime_bytes as f64 / 1e6,
        budget as f64 / 1e6,
        top.join(", "),
    ))
}

/// The policy `--memory-policy` and `--recompute` ask for (`None` when neither is given):
/// the layers `--recompute` names are recomputed whole.
pub fn policy_from_args(policy: Option<&str>, recompute: Option<&str>, layers: usize) -> CliResult<Option<Vec<LayerPolicy>>> {
    if policy.is_none() && recompute.is_none() {
        return Ok(None);
    }
    let mut out = parse_policy(policy.unwrap_or("none"), layers).map_err(|e| format!("--memory-policy {e}"))?;
    for l in parse_layers(recompute.unwrap_or("none"), layers)? {
        out[l] = LayerPolicy { full: true, ..Default::default() };
    }
    Ok(Some(out))
}

/// Parses `--recompute`: `all`, `none` or layer indices like `0,2,5-7`.
pub fn parse_layers(text: &str, layers: usize) -> CliResult<Vec<usize>> {
    if text == "none" {
        return Ok(vec![]);
    }
    parse_layer_list(text, layers).map_err(|e| format!("--recompute {e}"))
}

/// Cost rates for choosing a memory policy: the GEMM peak and the swap file's bandwidth
/// in `dir`, measured now (a directory that cannot hold a swap file rules swapping out,
/// with a warning).
pub fn cost_rates(dir: &std::path::Path, peak: f64) -> CostRates {
    let swap = ultramoe_model::swap::probe(dir, 64 << 20)
        .map_err(|e| eprintln!("warning: swap directory {}: {e}; the memory policy will not swap", dir.display()))
        .ok();
    CostRates::from_peak(peak, swap)
}
