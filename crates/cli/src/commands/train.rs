//! `ultramoe train`.

use super::{peak_flops, CliResult};
use crate::launch::{launch, Layout, ParallelArgs};
use crate::presets::{math_train_config, MATH_MOE_CONFIG};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;
use ultramoe_dist::Mesh;
use ultramoe_model::policy::{parse_layer_list, parse_policy, LayerPolicy};
use ultramoe_model::ModelConfig;
use ultramoe_train::run_dir::{RunDir, Start};
use ultramoe_train::spec::{PipelineSchedule, RunSpec};
use ultramoe_train::trainer::{AuxLossConfig, DataSpec, Place, StepStats, TrainConfig, Trainer, Weights};

/// Options of `ultramoe train`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Model `config.json` (Hugging Face format). Default: the embedded math MoE.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Start from the model in this directory (Hugging Face layout: config.json and
    /// weights, and its tokenizer when it has one) instead of a fresh init: fine-tuning.
    /// Without --lr its recipe is a tenth of the pretraining learning rate (3e-4 down
    /// to 3e-5, 20 warmup steps).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Tokenizer directory (`tokenizer.json`, `tokenizer_config.json`) for text data
    /// (default: the --init-from model's); copied into checkpoints and the saved model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Run directory: checkpoints, metrics, final model.
    #[arg(long, default_value = "runs/train")]
    pub run_dir: PathBuf,
    /// Continue from the run directory's latest checkpoint, with its saved run
    /// specification. Flags that would change the continued run's numbers (learning
    /// rate, batch, data, model…) are refused; steps, the checkpoint interval, the
    /// layout (any PP × EP × DP), the schedule, ZeRO-1, overlap and the memory options
    /// apply.
    #[arg(long)]
    pub resume: bool,
    /// Run a layout `ultramoe plan … --json` ranked: its PP, VPP, EP, DP, micro-batch,
    /// micro-batches per step and recomputation (the plan must be for this model, and
    /// its device count is the number of ranks).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Which of the plan's layouts (0: the best).
    #[arg(long, requires = "plan")]
    pub plan_rank: Option<usize>,
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
    /// Data: `math` (generated problems), `math:add,sub,expr` (generated problems of
    /// those kinds only, at their default weights; `math:add=2,sub=1` sets relative
    /// weights), `random` (random tokens), a JSONL file of
    /// `{"question", "answer"}` problems, or text data — comma-separated `.txt` files
    /// (a document each), JSONL files of `{"text"}` documents or of `{"messages"}` chats
    /// (trained on the assistant's turns only), or one directory written by
    /// `ultramoe data prepare`.
    #[arg(long)]
    pub data: Option<String>,
    /// Fraction of the text data's documents held out for the evaluation loss.
    #[arg(long, allow_hyphen_values = true)]
    pub eval_fraction: Option<f64>,
    /// Measure the held-out loss (and perplexity) every N steps, into the metrics.
    #[arg(long, allow_hyphen_values = true)]
    pub eval_every: Option<u64>,
    /// Micro-batches of held-out documents each evaluation reads (the same ones each
    /// time; rounded up to whole steps of --grad-accum).
    #[arg(long, allow_hyphen_values = true)]
    pub eval_batches: Option<usize>,
    /// Let packed examples attend to each other (as runs before document masks did):
    /// by default attention stays inside each document and positions restart at each.
    #[arg(long)]
    pub no_doc_masks: bool,
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
    /// Keep the optimizer moments in memory (a resumed run otherwise keeps its
    /// checkpoint's --swap-moments).
    #[arg(long, conflicts_with = "swap_moments")]
    pub no_swap_moments: bool,
    /// ZeRO-1: shard the optimizer moments over the ranks holding the same weights.
    #[arg(long)]
    pub zero1: bool,
    /// Replicate the optimizer moments (a resumed run otherwise keeps its checkpoint's
    /// --zero1; checkpoints hold whole moments either way).
    #[arg(long, conflicts_with = "zero1")]
    pub no_zero1: bool,
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
    set!(max_nonfinite_steps);
    set!(eval_fraction);
    set!(eval_every);
    set!(eval_batches);
    if a.no_doc_masks {
        c.doc_masks = false;
    }
    if let Some(t) = &a.tokenizer {
        c.tokenizer = Some(t.clone());
    }
    if let Some(kind) = &a.aux_loss {
        c.aux_loss = Some(AuxLossConfig { kind: kind.clone(), coef: a.aux_loss_coef, ep_groups: a.aux_ep_groups });
    }
    if let Some(d) = &a.data {
        c.data = parse_data(d)?;
    }
    Ok(c)
}

/// `--data`: `math`, `math:KIND[=WEIGHT],…`, `random`, a problems JSONL file, or text data paths.
fn parse_data(d: &str) -> CliResult<DataSpec> {
    Ok(match d {
        "math" => DataSpec::Math,
        "random" => DataSpec::Random,
        kinds if kinds.starts_with("math:") => {
            let names: Vec<String> = kinds["math:".len()..].split(',').map(|k| k.trim().to_string()).collect();
            ultramoe_train::data::math::Mix::only(&names).map_err(|e| format!("--{e}"))?;
            DataSpec::MathKinds(names)
        }
        list => {
            let paths: Vec<PathBuf> = list.split(',').map(|p| PathBuf::from(p.trim())).collect();
            if let Some(p) = paths.iter().find(|p| !p.exists()) {
                return Err(format!("--data: `{}` is neither `math`, `random` nor an existing file or directory", p.display()));
            }
            match &paths[..] {
                [p] if p.is_file() && p.extension().is_some_and(|e| e == "jsonl") => {
                    match ultramoe_train::data::corpus::jsonl_kind(p).map_err(|e| e.to_string())? {
                        ultramoe_train::data::corpus::JsonlKind::Problems => DataSpec::Jsonl(p.clone()),
                        _ => DataSpec::Documents(paths),
                    }
                }
                _ => DataSpec::Documents(paths),
            }
        }
    })
}

/// What a run is, resolved once from the flags (and a resumed run's checkpoint, or a
/// plan) before any rank starts: the model, the training config and the run
/// specification every rank builds its trainer from.
#[derive(Clone)]
pub struct Resolved {
    /// the model config (a fresh run; a resumed run reads its checkpoint's)
    pub model: Option<ModelConfig>,
    /// what is trained
    pub tc: TrainConfig,
    /// how a step runs
    pub spec: RunSpec,
    /// the checkpoint to resume from
    pub resume: Option<PathBuf>,
}

/// Resolves the run: fresh from the flags (over the default recipe), or from the
/// checkpoint `latest` with the flags as overrides — those that would change the
/// continued run's numbers are refused, the others (layout, schedule, memory…) apply.
pub fn resolve(a: &TrainArgs, latest: Option<&Path>) -> CliResult<Resolved> {
    let world = a.parallel.world();
    let plan = match &a.plan {
        Some(p) => Some(crate::commands::plan::read_plan(p, a.plan_rank.unwrap_or(0))?),
        None => None,
    };
    if let Some(dir) = latest {
        refuse_contradictions(a, dir)?;
        if plan.is_some() {
            return Err("--plan starts a new run with the plan's batch; it cannot be combined with --resume".into());
        }
        let (saved_tc, saved_spec) = Trainer::saved_config(dir).map_err(|e| e.to_string())?;
        let mut tc = saved_tc;
        if let Some(s) = a.steps {
            tc.steps = s;
        }
        if let Some(n) = a.save_every {
            tc.save_every = n;
        }
        if let Some(n) = a.max_nonfinite_steps {
            tc.max_nonfinite_steps = n;
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
        let layout = if !a.parallel.sets_layout() && saved_spec.world() == world {
            Layout { tp: saved_spec.tp, pp: saved_spec.pp, ep: saved_spec.ep, dp: saved_spec.dp }
        } else {
            a.parallel.layout_for(world)?
        };
        let spec = spec_from_args(saved_spec, a, layout, cfg.n_layers)?;
        return Ok(Resolved { model: None, tc, spec, resume: Some(dir.to_path_buf()) });
    }
    let cfg = match (&a.model_config, &a.init_from) {
        (Some(p), _) => ModelConfig::from_file(p),
        (None, Some(dir)) => ModelConfig::from_file(&dir.join("config.json")),
        (None, None) => ModelConfig::from_json_str(MATH_MOE_CONFIG),
    }
    .map_err(|e| e.to_string())?;
    let mut base = math_train_config();
    if let Some(dir) = &a.init_from {
        // Fine-tuning: the model's own tokenizer, and a tenth of the learning rate.
        if dir.join("tokenizer.json").is_file() {
            base.tokenizer = Some(dir.clone());
        }
        (base.lr, base.min_lr, base.warmup) = (3e-4, 3e-5, 20);
    }
    let mut tc = apply_overrides(base, a)?;
    let spec = match &plan {
        Some(p) => {
            if a.parallel.sets_layout() || a.parallel.vpp.is_some() || a.micro_batch.is_some() || a.grad_accum.is_some() || a.seq_len.is_some() {
                return Err("--plan gives the layout and the batch: drop --pp, --vpp, --ep, --dp, --micro-batch, --grad-accum and --seq-len".into());
            }
            p.check(&cfg, world)?;
            (tc.micro_batch, tc.grad_accum, tc.seq_len) = (p.micro_batch, p.grad_accum, p.seq_len);
            let schedule = if p.schedule == ultramoe_plan::PipeSchedule::Overlap { PipelineSchedule::Overlapped } else { PipelineSchedule::OneFOneB };
            // The planner prices tensor parallelism with sequence parallelism (every
            // activation split over TP).
            let base = RunSpec { memory_policy: p.memory_policy(cfg.n_layers)?, zero1: p.zero1, schedule, sequence_parallel: p.tp > 1, ..RunSpec::default() };
            let mut spec = spec_from_args(base, a, Layout { tp: p.tp, pp: p.pp, ep: p.ep, dp: p.dp }, cfg.n_layers)?;
            spec.vpp = p.vpp;
            spec
        }
        None => spec_from_args(RunSpec::default(), a, a.parallel.layout_for(world)?, cfg.n_layers)?,
    };
    tc.validate_for(&cfg).map_err(|e| e.to_string())?;
    spec.validate(&cfg, &tc, world).map_err(|e| e.to_string())?;
    Ok(Resolved { model: Some(cfg), tc, spec, resume: None })
}

/// The run specification: `base` (the defaults, a plan's, or a resumed run's saved
/// one) with the flags given applied, laid out as `layout`. A schedule, chunk split
/// or VPP of the base carries over only while the pipeline keeps its shape.
pub fn spec_from_args(base: RunSpec, a: &TrainArgs, layout: Layout, n_layers: usize) -> CliResult<RunSpec> {
    let p = &a.parallel;
    if p.sequence_parallel && layout.tp < 2 {
        return Err("--sequence-parallel splits rows over tensor-parallel ranks: give --tp 2 or more".into());
    }
    let same_pipeline = layout.pp == base.pp;
    let vpp = p.vpp.unwrap_or(if same_pipeline { base.vpp } else { 1 });
    let pp_layers = match &p.pp_layers {
        Some(text) => Some(parse_counts(text)?),
        None if same_pipeline && vpp == base.vpp => base.pp_layers.clone(),
        None => None,
    };
    let schedule = match &p.schedule {
        Some(name) => PipelineSchedule::parse(name).ok_or_else(|| format!("--schedule `{name}`: expected gpipe, 1f1b or overlap"))?,
        None => base.schedule,
    };
    let mut spec = RunSpec {
        tp: layout.tp,
        // (sound to keep or drop at any tensor-parallel size: the numbers are the same)
        sequence_parallel: (p.sequence_parallel || base.sequence_parallel) && layout.tp > 1,
        pp: layout.pp,
        ep: layout.ep,
        dp: layout.dp,
        vpp,
        pp_layers,
        schedule,
        zero1: (base.zero1 || a.zero1) && !a.no_zero1,
        overlap_grad_reduce: base.overlap_grad_reduce && !a.no_grad_overlap,
        overlap_chunks: p.overlap_chunks.unwrap_or(base.overlap_chunks),
        hierarchical_a2a: base.hierarchical_a2a || p.hierarchical_a2a,
        ranks_per_node: p.ranks_per_node.or(base.ranks_per_node),
        placement_every: a.placement_every.unwrap_or(base.placement_every),
        redundant_experts: a.redundant_experts.unwrap_or(base.redundant_experts),
        swap_moments: (base.swap_moments || a.swap_moments) && !a.no_swap_moments,
        swap_dir: a.swap_dir.clone().or(base.swap_dir.clone()),
        ..base
    };
    if let Some(policy) = policy_from_args(a.memory_policy.as_deref(), a.recompute.as_deref(), n_layers)? {
        spec.memory_policy = policy;
    }
    if let Some(b) = &a.memory_budget {
        spec.memory_budget = Some(parse_bytes(b)? as u64);
    }
    Ok(spec)
}

/// Parses `3,4,4,3`.
fn parse_counts(text: &str) -> CliResult<Vec<usize>> {
    text.split(',')
        .map(|c| c.trim().parse::<usize>().map_err(|_| format!("--pp-layers `{text}`: expected layer counts like 3,4,4,3")))
        .collect()
}

/// Builds this rank's trainer for the resolved run, on `mesh` (or alone; `threads`:
/// the ranks are threads of this process).
pub fn make_trainer(a: &TrainArgs, run: &Resolved, mesh: Option<Mesh>, threads: bool) -> CliResult<Trainer> {
    let peak = peak_flops(a.peak_gflops);
    let place = match mesh {
        Some(m) => Place::on(m, peak, threads),
        None => Place::alone(peak),
    };
    let lead = place.mesh.as_ref().is_none_or(|m| m.world.rank() == 0);
    if let Some(dir) = &run.resume {
        let (tc, spec) = (run.tc.clone(), run.spec.clone());
        let tr = Trainer::resume(dir, place, &mut |t, s| {
            (*t, *s) = (tc.clone(), spec.clone());
            Ok(())
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
    let cfg = run.model.clone().expect("a fresh run has its model config");
    let weights = match &a.init_from {
        Some(dir) => Weights::From(dir.clone()),
        None => Weights::Seed(run.tc.seed),
    };
    Trainer::start(cfg, run.tc.clone(), run.spec.clone(), weights, place).map_err(|e| e.to_string())
}

/// On `--resume`, flags that would change the numbers of the continued run are refused
/// (naming the flag, the value given and the checkpoint's): every training-config field
/// but steps, the checkpoint interval and the non-finite step limit. The run
/// specification's (layout, schedule, memory, overlap…) apply.
fn refuse_contradictions(a: &TrainArgs, dir: &Path) -> CliResult {
    if a.init_from.is_some() {
        return Err("--init-from starts a new run from a model; it cannot be combined with --resume".into());
    }
    if let Some(p) = &a.model_config {
        let given = ModelConfig::from_file(p).map_err(|e| e.to_string())?;
        let saved = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
        if given.raw != saved.raw {
            return Err(format!("--resume: --model-config {} differs from the checkpoint's config.json ({})", p.display(), dir.display()));
        }
    }
    let (saved, _) = Trainer::saved_config(dir).map_err(|e| e.to_string())?;
    let asked = apply_overrides(saved.clone(), a)?;
    let (saved_v, asked_v) = (serde_json::to_value(&saved).unwrap_or_default(), serde_json::to_value(&asked).unwrap_or_default());
    const APPLIES: [&str; 3] = ["steps", "save_every", "max_nonfinite_steps"];
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

/// A wall-clock end for a one-rank run's training (`demo`): the step count is planned
/// again from the run's own step rate, which reads the machine better than a short probe
/// before it (on a shared Zen 4 EPYC a probe read 9.2–10.7 steps/s in four tries, long
/// runs 10.9–12).
pub struct Deadline {
    /// when the last step should end
    pub end: Instant,
    /// at most this many steps in all
    pub max_steps: u64,
}

impl Deadline {
    /// The share of the remaining time a plan fills (the rest absorbs a slower stretch).
    pub const MARGIN: f64 = 0.97;

    /// Steps in all when `done` are taken and `remaining_s` are left at `rate` steps/s:
    /// `S = done + ⌊MARGIN · rate · remaining⌋`, at least one more step, at most
    /// `max_steps`.
    pub fn steps(&self, done: u64, rate: f64, remaining_s: f64) -> u64 {
        let more = (Self::MARGIN * rate * remaining_s.max(0.0)).floor() as u64;
        (done + more).clamp(done + 1, self.max_steps.max(done + 1))
    }
}

/// What the loop does after a step under a deadline.
#[derive(Debug, PartialEq)]
enum Pace {
    Keep,
    /// the run takes this many steps in all now (at the rate given)
    Replan {
        steps: u64,
        rate: f64,
    },
    /// the deadline passed: the run ends at this step
    Stop,
}

/// A deadline followed through one training loop: the step count is planned again at
/// fixed fractions of the time from the loop's start to the end, from the slower of the
/// rate since the loop's 10th step (the first pay for page faults) and the rate since the
/// last plan (a machine can slow down: on a shared Zen 4 the last 1,500 of 9,531 steps
/// ran 30% slower than the rest). Early plans set the length while the cosine has hardly
/// moved; late ones move its end where the rate is close to its floor
/// (`η − η_min = (η_peak − η_min)(1 + cos πp)/2`: 2.4% of the range at `p = 0.9`).
struct Pacer<'a> {
    deadline: &'a Deadline,
    loop_start: Instant,
    first_step: u64,
    /// (time, step) at the loop's 10th step, and at the last plan
    warm: Option<(Instant, u64)>,
    last: Option<(Instant, u64)>,
    /// index into `PLAN_AT` of the next plan
    next: usize,
}

impl<'a> Pacer<'a> {
    const WARM_STEPS: u64 = 10;
    /// Fractions of the window at which the length is planned again (the first not
    /// before a minute, unless the window is shorter than two).
    const PLAN_AT: [f64; 8] = [0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95];

    fn new(deadline: &'a Deadline, first_step: u64, loop_start: Instant) -> Self {
        Pacer { deadline, loop_start, first_step, warm: None, last: None, next: 0 }
    }

    /// What to do once `step` of `total` has ended at `now`.
    fn after_step(&mut self, step: u64, total: u64, now: Instant) -> Pace {
        if now >= self.deadline.end && step < total {
            return Pace::Stop;
        }
        if step == self.first_step + Self::WARM_STEPS {
            self.warm = Some((now, step));
            self.last = self.warm;
        }
        let window = self.deadline.end.saturating_duration_since(self.loop_start).as_secs_f64();
        let elapsed = now.saturating_duration_since(self.loop_start).as_secs_f64();
        let due = |at: f64| elapsed >= (at * window).max(60f64.min(0.5 * window));
        let (Some((t0, s0)), Some((t1, s1))) = (self.warm, self.last) else { return Pace::Keep };
        if step <= s1 || !Self::PLAN_AT.get(self.next).is_some_and(|&at| due(at)) {
            return Pace::Keep;
        }
        // Once for all the points passed since the last step.
        while Self::PLAN_AT.get(self.next).is_some_and(|&at| due(at)) {
            self.next += 1;
        }
        let rate_since = |t: Instant, s: u64| (step - s) as f64 / now.saturating_duration_since(t).as_secs_f64();
        let rate = rate_since(t0, s0).min(rate_since(t1, s1));
        self.last = Some((now, step));
        match self.deadline.steps(step, rate, self.deadline.end.saturating_duration_since(now).as_secs_f64()) {
            steps if steps == total => Pace::Keep,
            steps => Pace::Replan { steps, rate },
        }
    }
}

/// Trains to the configured step count with a progress bar (or log lines), saving
/// checkpoints and the final model under the run directory; with a deadline, the count is
/// planned again from the run's step rate so that training ends by it. Returns the last
/// step's statistics.
pub fn train_loop(
    tr: &mut Trainer,
    run_dir: &Path,
    metrics: Option<&Path>,
    progress: bool,
    continues: bool,
    deadline: Option<&Deadline>,
) -> CliResult<Option<StepStats>> {
    std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: cannot create run directory: {e}", run_dir.display()))?;
    let lead = tr.is_lead();
    if lead {
        let metrics_path = metrics.map(Path::to_path_buf).unwrap_or_else(|| run_dir.join("metrics.jsonl"));
        tr.log_metrics_to(&metrics_path, continues).map_err(|e| e.to_string())?;
    }
    let mut total = tr.cfg.steps;
    let bar = if progress && lead {
        let b = ProgressBar::new(total);
        b.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
        b.set_position(tr.step);
        Some(b)
    } else {
        None
    };
    let mut last = None;
    let mut tokens_per_s = Vec::new();
    let mut eval = String::new();
    let mut pacer = deadline.map(|d| Pacer::new(d, tr.step, Instant::now()));
    while tr.step < total {
        let s = tr.train_step().map_err(|e| e.to_string())?;
        if let Some(p) = &mut pacer {
            if s.ranks > 1 {
                return Err("a training deadline needs a run of one rank (each rank would plan its own length)".into());
            }
            let line = match p.after_step(s.step, total, Instant::now()) {
                Pace::Keep => None,
                Pace::Replan { steps, rate } => {
                    tr.set_total_steps(steps).map_err(|e| e.to_string())?;
                    let line = format!("{rate:.1} steps/s at step {}: {total} → {steps} steps to end on time", s.step);
                    total = steps;
                    Some(line)
                }
                Pace::Stop => {
                    let line = format!("the deadline passed at step {} of {total}: training ends here", s.step);
                    total = s.step;
                    Some(line)
                }
            };
            if let Some(line) = line {
                match &bar {
                    Some(b) => {
                        b.set_length(total);
                        b.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
        }
        tokens_per_s.push(s.tokens_per_s);
        if let (Some(l), Some(p)) = (s.eval_loss, s.eval_perplexity) {
            eval = format!(" | eval loss {l:.4} (perplexity {p:.1})");
        }
        let msg = format!("loss {:.4}{eval} | {:.0} tok/s | MFU {:.1}% | expert imbalance {:.2}", s.loss, s.tokens_per_s, 100.0 * s.mfu, s.expert_imbalance);
        match &bar {
            Some(b) => {
                b.set_position(s.step);
                b.set_message(msg);
            }
            None => {
                if lead && (s.step.is_multiple_of(10) || s.step == 1 || s.step == total || s.eval_loss.is_some()) {
                    eprintln!("step {}/{} {msg}", s.step, total);
                }
            }
        }
        // A step whose update was skipped is not saved: the newest checkpoint stays one
        // from before a run of non-finite steps, and pruning never drops it for copies.
        if tr.cfg.save_every > 0 && s.step.is_multiple_of(tr.cfg.save_every) && s.step < total && !s.skipped {
            if let Some(b) = &bar {
                b.set_message(format!("saving the checkpoint of step {} …", s.step));
            }
            tr.save_checkpoint(run_dir, 2).map_err(|e| e.to_string())?;
        }
        last = Some(s);
    }
    if let Some(b) = &bar {
        b.set_message("saving the final checkpoint and model …");
    }
    tr.save_checkpoint(run_dir, 2).map_err(|e| e.to_string())?;
    tr.save_model(&run_dir.join("model")).map_err(|e| e.to_string())?;
    if let Some(b) = &bar {
        b.finish();
    }
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
    a.parallel.check()?;
    if let Some(g) = a.peak_gflops {
        if !(g.is_finite() && g > 0.0) {
            return Err(format!("--peak-gflops: must be a finite positive number, found {g}"));
        }
    }
    if let (Some(plan), None, None) = (&a.plan, a.parallel.ranks, crate::launch::mpi_world_size()) {
        // A plan's devices run as threads of this process unless mpirun starts them.
        a.parallel.ranks = Some(crate::commands::plan::read_plan(plan, a.plan_rank.unwrap_or(0))?.devices);
    }
    if a.parallel.print_schedule {
        let run = resolve(&a, None)?;
        let s = run.spec.schedule_for(&run.tc).map_err(|e| format!("--grad-accum: {e}"))?;
        let pairs = if run.spec.schedule == PipelineSchedule::Overlapped { ", F+B run together" } else { "" };
        println!("{}, {} micro-batches: F<micro-batch>.<chunk> forward, B backward{pairs}", run.spec.describe(), run.tc.grad_accum);
        print!("{}", s.render());
        for r in 0..run.spec.pp {
            println!("rank {r}: forwards awaiting their backward at most {}", s.in_flight(r));
        }
        return Ok(());
    }
    if a.parallel.is_parallel() && a.peak_gflops.is_none() {
        // Measure once, before the ranks start competing for the cores.
        a.peak_gflops = Some(peak_flops(None) / 1e9);
    }
    let start = match (a.resume, a.overwrite) {
        (true, true) => return Err("--overwrite starts over; it cannot be combined with --resume".into()),
        (true, false) => Start::Resume,
        (false, true) => Start::Overwrite,
        (false, false) => Start::Fresh,
    };
    // The process that writes run-wide files holds the run's lock (under mpirun: rank 0).
    let run_dir = RunDir::open(&a.run_dir, start, crate::launch::mpi_world_rank().is_none_or(|r| r == 0)).map_err(|e| e.to_string())?;
    let resolved = resolve(&a, run_dir.latest.as_deref())?;
    let layout = Layout { tp: resolved.spec.tp, pp: resolved.spec.pp, ep: resolved.spec.ep, dp: resolved.spec.dp };
    let p = a.parallel.clone();
    let result = launch(&p, layout, move |mesh, threads| train_rank(&a, &resolved, mesh, threads));
    drop(run_dir);
    result
}

fn train_rank(a: &TrainArgs, run: &Resolved, mesh: Option<Mesh>, threads: bool) -> CliResult {
    let mut tr = make_trainer(a, run, mesh, threads)?;
    // A resumed run's metrics file is that run's (kept up to the checkpoint's step; all
    // of it dropped when no checkpoint was written yet).
    let continues = a.resume;
    if !tr.is_lead() {
        return train_loop(&mut tr, &a.run_dir, a.metrics.as_deref(), false, continues, None).map(|_| ());
    }
    let spec = &tr.spec;
    if let Some(p) = &tr.parallel {
        let overlap = p.overlaps_reduction();
        eprintln!(
            "{} ranks: {}; {} all-to-all; gradient reduction {}",
            p.world(),
            spec.describe(),
            if spec.hierarchical_a2a { "hierarchical" } else { "flat" },
            if overlap { "overlaps the backward pass" } else { "after the backward pass" }
        );
        if spec.pp > 1 {
            let stage = spec.stage(&tr.model.cfg, 0).map_err(|e| e.to_string())?;
            eprintln!("pipeline: layers per stage {} ({} micro-batches a step)", stage.describe(), tr.cfg.grad_accum);
        }
        let params = tr.model.layout.total as f64 * 4.0 / 1e6;
        match &tr.zero {
            Some(z) => {
                let (mine, whole) = z.moment_floats();
                eprintln!("rank 0: {params:.1} MB of weights, {:.1} MB of optimizer moments (ZeRO-1; {:.1} MB unsharded)", mine as f64 * 4e-6, whole as f64 * 4e-6);
            }
            None => eprintln!("rank 0: {params:.1} MB of weights, {:.1} MB of optimizer moments", 2.0 * params),
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
    train_loop(&mut tr, &a.run_dir, a.metrics.as_deref(), !a.no_progress, continues, None)?;
    // Per process: in-process ranks share one table, MPI ranks print their own.
    let phases = ultramoe_kernels::profile::take();
    if !phases.is_empty() {
        let who = crate::launch::mpi_world_rank().map_or(String::new(), |r| format!("rank {r}: "));
        let steps = tr.cfg.steps.max(1) as f64;
        eprintln!("{who}phases (ULTRAMOE_PROFILE, inclusive, per step, every step and rank of this process):");
        for (name, secs, calls) in phases {
            eprintln!("{who}  {name:<26} {:>8.2} ms  ({:.0} calls/step)", 1e3 * secs / steps, calls as f64 / steps);
        }
    }
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

pub use ultramoe_train::budget::cost_rates;

#[cfg(test)]
mod tests {
    use super::{Deadline, Pace, Pacer};
    use std::time::{Duration, Instant};

    #[test]
    fn a_deadline_plans_the_steps_its_time_buys_within_bounds() {
        let d = Deadline { end: Instant::now(), max_steps: 40_000 };
        // 1,000 done, 11 steps/s for 800 s: 1,000 + ⌊0.97 · 8,800⌋
        assert_eq!(d.steps(1_000, 11.0, 800.0), 1_000 + 8_536);
        assert_eq!(d.steps(1_000, 100.0, 800.0), 40_000, "at most max_steps");
        assert_eq!(d.steps(1_000, 11.0, -5.0), 1_001, "past the end: one more step");
        assert_eq!(d.steps(40_000, 11.0, 100.0), 40_001, "never fewer than the steps taken");
    }

    /// Steps at `rate(step)` steps/s from a loop started at `t0`, the pacer asked after
    /// each: the steps at which it planned, with the length, and where the run ended.
    fn paced(window_s: f64, first_total: u64, rate: impl Fn(u64) -> f64) -> (Vec<(u64, u64)>, u64, f64) {
        let t0 = Instant::now();
        let d = Deadline { end: t0 + Duration::from_secs_f64(window_s), max_steps: 1_000_000 };
        let mut p = Pacer::new(&d, 0, t0);
        let (mut total, mut step, mut t, mut plans) = (first_total, 0, 0.0, vec![]);
        while step < total {
            t += 1.0 / rate(step);
            step += 1;
            match p.after_step(step, total, t0 + Duration::from_secs_f64(t)) {
                Pace::Keep => {}
                Pace::Replan { steps, .. } => {
                    plans.push((step, steps));
                    total = steps;
                }
                Pace::Stop => total = step,
            }
        }
        (plans, step, t)
    }

    #[test]
    fn a_paced_run_fills_its_window_from_a_low_first_guess_and_ends_by_it() {
        // 10 steps/s for 900 s, first guessed at 7,000: eight plans, the first at 90 s.
        let (plans, steps, t) = paced(900.0, 7_000, |_| 10.0);
        assert_eq!(plans.len(), 8, "{plans:?}");
        assert!((895..=905).contains(&plans[0].0), "the first plan at 10% of the window: {plans:?}");
        assert!(t <= 900.0 && t > 0.95 * 900.0, "ended at {t} s after {steps} steps");
    }

    #[test]
    fn a_run_that_slows_down_is_shortened_and_stopped_at_the_deadline() {
        // 12 steps/s, then 6 from step 7,000 (a neighbour): later plans shorten the run
        // and it still ends by the deadline.
        let (plans, steps, t) = paced(900.0, 10_000, |s| if s < 7_000 { 12.0 } else { 6.0 });
        assert!(plans.windows(2).any(|w| w[1].1 < w[0].1), "no plan shortened the run: {plans:?}");
        assert!(t <= 900.0 + 1.0 / 6.0, "ended at {t} s after {steps} steps");
        // A slowdown after the last plan: the deadline stops the run.
        let (_, steps, t) = paced(900.0, 10_000, |s| if s < 10_200 { 12.0 } else { 1.0 });
        assert!(t <= 901.0, "ended at {t} s after {steps} steps");
    }
}
