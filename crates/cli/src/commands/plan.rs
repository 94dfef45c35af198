//! `ultramoe plan`: searches parallel layouts for a model on a cluster and prints the
//! fastest with their time breakdown; `--validate RUN_DIR` compares the prediction for a
//! finished ultramoe run with the step time it measured.

use super::CliResult;
use clap::Args;
use std::path::{Path, PathBuf};
use ultramoe_plan::validate::{predict, Measured, RunRecord};
use ultramoe_plan::{presets, search, Fixed, Hardware, Job, ModelCost, Prediction, Recompute};

/// Options of `ultramoe plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model: a preset (pangu-ultra-moe-718b, deepseek-v3-671b, qwen3-235b-a22b,
    /// mixtral-8x22b) or a config.json (or its directory).
    #[arg(long, required_unless_present = "validate")]
    pub model: Option<String>,
    /// Cluster: a preset (atlas-800t-a2, cloudmatrix384, h800, h100, this-machine) or a
    /// hardware TOML file (`ultramoe calibrate` writes one).
    #[arg(long, default_value = "this-machine")]
    pub cluster: String,
    /// Devices in the job.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1024)]
    pub global_batch: usize,
    /// Compute data type (picks the peak and the bytes per element; default: bf16 where
    /// the cluster has a bf16 peak, else fp32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Pin search dimensions: e.g. `tp=8,pp=16,ep=32,vpp=2,mb=1,recompute=full,schedule=dualpipe` (recompute: none, norm-act, selective, norm-act-qkv, full; schedule: 1f1b, overlap — the two the trainer runs, searched by default — or dualpipe, dualpipev, priced only when named)
    #[arg(long)]
    pub fix: Option<String>,
    /// Layouts to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Price the expert-parallel all-to-all as hierarchical (one copy per remote node).
    #[arg(long)]
    pub hierarchical_a2a: bool,
    /// Busiest expert-parallel rank's routed load over the mean.
    #[arg(long, default_value_t = 1.0)]
    pub imbalance: f64,
    /// Optimizer states replicated on every data-parallel rank (default: ZeRO-1).
    #[arg(long)]
    pub no_zero1: bool,
    /// Also list this many rejected layouts with their reasons.
    #[arg(long, default_value_t = 0)]
    pub show_rejected: usize,
    /// Draw the best layouts' step-time breakdown as a bar chart: one stacked bar per
    /// layout, its layout written under it, seconds on the axis, a legend of the parts
    /// (SVG when FILE ends in `.svg`, otherwise PNG).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Compare the prediction for this finished `ultramoe train` run directory with the
    /// step time its metrics recorded (median of the steps after the first 5).
    #[arg(long)]
    pub validate: Option<PathBuf>,
}

/// `ultramoe plan`.
pub fn run(a: PlanArgs) -> CliResult {
    let hw = Hardware::load(&a.cluster).map_err(|e| e.to_string())?;
    if let Some(dir) = &a.validate {
        return validate(dir, &hw);
    }
    let name = a.model.as_deref().expect("clap requires --model");
    let cfg = presets::model(name).map_err(|e| e.to_string())?;
    let m = ModelCost::new(&cfg);
    let fixed = match &a.fix {
        Some(f) => Fixed::parse(f).map_err(|e| format!("--fix: {e}"))?,
        None => Fixed::default(),
    };
    let dtype = a.dtype.clone().unwrap_or_else(|| hw.default_dtype().to_string());
    hw.peak(&dtype).map_err(|e| format!("--dtype: {e}"))?;
    if a.devices == 0 || a.seq_len == 0 || a.global_batch == 0 {
        return Err("--devices, --seq-len and --global-batch must be positive".into());
    }
    if !(a.imbalance.is_finite() && a.imbalance >= 1.0) {
        return Err(format!("--imbalance: the busiest rank's load over the mean must be a finite number ≥ 1, found {}", a.imbalance));
    }
    let job = Job {
        devices: a.devices,
        seq_len: a.seq_len,
        global_batch: a.global_batch,
        dtype: dtype.clone(),
        hierarchical_a2a: a.hierarchical_a2a,
        imbalance: a.imbalance,
    };
    let start = std::time::Instant::now();
    let out = search(&m, &hw, &job, &fixed, !a.no_zero1);
    let took = start.elapsed().as_secs_f64();
    let best: Vec<&Prediction> = out.ranked.iter().take(a.top).collect();
    if let Some(p) = &a.image {
        draw(p, &best)?;
    }
    if a.json {
        let rejected: Vec<serde_json::Value> =
            out.rejected.iter().take(a.show_rejected).map(|(l, why)| serde_json::json!({ "layout": l, "reason": why })).collect();
        let v = serde_json::json!({
            "model": name, "model_config": cfg.raw, "cluster": hw.name, "job": job,
            "params": m.params(), "active_params": m.active_params(),
            "evaluated": out.ranked.len() + out.rejected.len(), "feasible": out.ranked.len(),
            "rejected_by_reason": out.reasons(), "best": best, "rejected": rejected,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(());
    }
    println!(
        "{name}: {:.1} B parameters ({:.1} B active) on {} × {} ({}), seq {} × {} sequences per step, {}",
        m.params() / 1e9,
        m.active_params() / 1e9,
        a.devices,
        hw.name,
        a.cluster,
        a.seq_len,
        a.global_batch,
        dtype
    );
    println!(
        "{} layouts evaluated in {:.2} s: {} feasible, {} rejected",
        out.ranked.len() + out.rejected.len(),
        took,
        out.ranked.len(),
        out.rejected.len()
    );
    for (why, n) in out.reasons() {
        println!("  rejected {n:>6}: {why}");
    }
    for (l, why) in out.rejected.iter().take(a.show_rejected) {
        println!("rejected tp {} pp {} vpp {} ep {} dp {} mb {} {} {}: {why}", l.tp, l.pp, l.vpp, l.ep, l.dp, l.micro_batch, l.recompute.name(), l.schedule.name());
    }
    if best.is_empty() {
        return Err("no layout fits; see the rejection reasons above (more devices, a smaller micro-batch or full recomputation may help)".into());
    }
    println!();
    println!(
        "{:>3} {:>3} {:>3} {:>4} {:>5} {:>3} {:>12} {:>9} {:>9} {:>11} {:>6} {:>8}  breakdown (s): compute/recompute/tp/ep/pp/dp/bubble/imbalance/optimizer",
        "tp", "pp", "vpp", "ep", "dp", "mb", "recompute", "schedule", "step s", "tokens/s", "MFU", "mem GB"
    );
    for p in &best {
        let l = &p.layout;
        let b: Vec<String> = p.breakdown.parts().iter().map(|(_, s)| format!("{s:.2}")).collect();
        println!(
            "{:>3} {:>3} {:>3} {:>4} {:>5} {:>3} {:>12} {:>9} {:>9.3} {:>11.0} {:>5.1}% {:>8.1}  {}",
            l.tp,
            l.pp,
            l.vpp,
            l.ep,
            l.dp,
            l.micro_batch,
            l.recompute.name(),
            l.schedule.name(),
            p.step_s,
            p.tokens_per_s,
            100.0 * p.mfu,
            p.memory_bytes / 1e9,
            b.join("/")
        );
    }
    Ok(())
}

/// One layout of a `plan --json` file, as `train --plan` runs it.
#[derive(Clone, Debug)]
pub struct PlanChoice {
    /// the plan file
    pub path: PathBuf,
    /// the model it was planned for (`config.json` contents)
    pub model_config: serde_json::Value,
    /// the cluster it was planned for
    pub cluster: String,
    /// devices (ranks)
    pub devices: usize,
    /// tensor-parallel size
    pub tp: usize,
    /// pipeline stages
    pub pp: usize,
    /// model chunks per pipeline rank
    pub vpp: usize,
    /// expert-parallel size
    pub ep: usize,
    /// data-parallel copies of each expert (the planner's DP over EP)
    pub dp: usize,
    /// rows per micro-batch over a stage's ranks (the planner's per-rank micro-batch ×
    /// its DP)
    pub micro_batch: usize,
    /// micro-batches per step
    pub grad_accum: usize,
    /// tokens per row
    pub seq_len: usize,
    /// the planner's recomputation
    pub recompute: String,
    /// ZeRO-1
    pub zero1: bool,
    /// the pipeline schedule (one the trainer runs)
    pub schedule: ultramoe_plan::PipeSchedule,
}

/// Reads layout `rank` (0: the best) of a `plan --json` file.
pub fn read_plan(path: &Path, rank: usize) -> CliResult<PlanChoice> {
    let where_ = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{where_}: cannot read: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{where_}: not JSON (write it with `ultramoe plan … --json`): {e}"))?;
    let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or_else(|| format!("{where_}: `{k}` missing or not a count"));
    let best = v.get("best").and_then(|b| b.as_array()).ok_or_else(|| format!("{where_}: `best` missing: not an `ultramoe plan --json` file"))?;
    let chosen = best.get(rank).ok_or_else(|| format!("--plan-rank {rank}: {where_} ranks {} layouts (0 to {})", best.len(), best.len().saturating_sub(1)))?;
    let l = chosen.get("layout").ok_or_else(|| format!("{where_}: `best[{rank}].layout` missing"))?;
    let job = v.get("job").ok_or_else(|| format!("{where_}: `job` missing"))?;
    let (tp, pp, vpp, ep, dp, mb) = (field(l, "tp")?, field(l, "pp")?, field(l, "vpp")?, field(l, "ep")?, field(l, "dp")?, field(l, "micro_batch")?);
    let schedule = match l.get("schedule").and_then(|s| s.as_str()) {
        None => ultramoe_plan::PipeSchedule::OneFOneB,
        Some(name) => ultramoe_plan::PipeSchedule::parse(name).ok_or_else(|| format!("{where_}: layout {rank}: unknown schedule `{name}`"))?,
    };
    if !schedule.runs_in_trainer() {
        return Err(format!(
            "{where_}: layout {rank} uses the {} schedule, which the planner prices but the trainer does not run; plan with --fix schedule=1f1b or schedule=overlap",
            schedule.name()
        ));
    }
    let (devices, seq_len, global) = (field(job, "devices")?, field(job, "seq_len")?, field(job, "global_batch")?);
    if dp == 0 || mb == 0 || ep == 0 || !dp.is_multiple_of(ep) || !global.is_multiple_of(dp * mb) {
        return Err(format!("{where_}: layout {rank} (dp {dp}, ep {ep}, micro-batch {mb}) does not split the global batch {global}"));
    }
    Ok(PlanChoice {
        path: path.to_path_buf(),
        model_config: v.get("model_config").cloned().ok_or_else(|| format!("{where_}: `model_config` missing: re-run `ultramoe plan … --json` with this version"))?,
        cluster: v.get("cluster").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        devices,
        tp,
        pp,
        vpp,
        ep,
        dp: dp / ep,
        micro_batch: mb * dp,
        grad_accum: global / (dp * mb),
        seq_len,
        recompute: l.get("recompute").and_then(|r| r.as_str()).unwrap_or("none").to_string(),
        zero1: l.get("zero1").and_then(|z| z.as_bool()).unwrap_or(false),
        schedule,
    })
}

impl PlanChoice {
    /// An error when the plan is not for `cfg` on `world` ranks of this machine.
    pub fn check(&self, cfg: &ultramoe_model::ModelConfig, world: usize) -> CliResult {
        let where_ = self.path.display();
        if self.model_config != cfg.raw {
            return Err(format!("{where_}: the plan is for another model than the one being trained (its `model_config` differs from --model-config)"));
        }
        if self.devices != world {
            return Err(format!("{where_}: the plan is for {} devices, but the run has {world} ranks", self.devices));
        }
        if !self.cluster.starts_with("this machine") {
            return Err(format!(
                "{where_}: the plan is for the cluster `{}`; runs here need a plan for this machine (ultramoe plan --cluster this-machine, or a file from ultramoe calibrate)",
                self.cluster
            ));
        }
        Ok(())
    }

    /// The trainer's memory policy for the planner's recomputation (one vocabulary:
    /// `selective` is the trainer's `norm+swiglu+attention`, `full` its `full`).
    pub fn memory_policy(&self, n_layers: usize) -> CliResult<Vec<ultramoe_model::policy::LayerPolicy>> {
        let r = ultramoe_plan::model_cost::Recompute::parse(&self.recompute).ok_or_else(|| format!("{}: unknown recompute `{}`", self.path.display(), self.recompute))?;
        ultramoe_model::policy::parse_policy(r.policy(), n_layers).map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// Reads a finished run: its model config, training config, layout and the medians of
/// what it measured (steps after the first 5): step time, the busiest stage's bubble,
/// exposed communication, and the largest rank's heap peak.
pub fn read_run(dir: &Path) -> CliResult<RunRecord> {
    let metrics = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).map_err(|e| format!("{}: cannot read: {e}", metrics.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{}:{}: not JSON: {e}", metrics.display(), i + 1)))
        .collect::<CliResult<_>>()?;
    if rows.len() < 8 {
        return Err(format!("{}: {} steps recorded; at least 8 needed (the first 5 are warm-up)", metrics.display(), rows.len()));
    }
    let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| format!("{}: `{k}` missing", metrics.display()));
    let steady = &rows[5..];
    let steps: Vec<f64> = steady.iter().map(|r| field(r, "step_s")).collect::<CliResult<_>>()?;
    let first = &rows[0];
    let count = |k: &str| first.get(k).and_then(|x| x.as_u64()).unwrap_or(1) as usize;
    let (ranks, ep, pp, vpp, tp) = (count("ranks"), count("ep"), count("pp"), count("vpp"), count("tp"));
    let ckpt = ultramoe_train::trainer::Trainer::latest_checkpoint(dir).ok_or_else(|| format!("{}: no checkpoint (config and training settings)", dir.display()))?;
    let cfg_path = ckpt.join("config.json");
    let model: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?)
        .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let (tc, spec) = ultramoe_train::trainer::Trainer::saved_config(&ckpt).map_err(|e| e.to_string())?;
    // The run's policy in the planner's vocabulary, when it is one of its modes.
    let n_layers = ultramoe_model::ModelConfig::from_value(model.clone()).map_err(|e| e.to_string())?.n_layers;
    let recompute = Recompute::ALL.into_iter().find(|r| {
        let p = ultramoe_model::policy::parse_policy(r.policy(), n_layers).unwrap_or_default();
        p == spec.memory_policy || (*r == Recompute::None && spec.memory_policy.is_empty())
    });
    // Per step: the busiest stage's idle fraction, the exposed communication and the
    // largest stage peak; then the medians.
    let per_step = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Option<f64> {
        let v: Option<Vec<f64>> = steady.iter().map(f).collect();
        v.map(super::median)
    };
    let list = |r: &serde_json::Value, k: &str| -> Option<Vec<f64>> { r.get(k)?.as_array()?.iter().map(|x| x.as_f64()).collect() };
    // The schedule's bubble shows on the busiest stage; a lighter stage also waits for
    // the heavier ones (stage imbalance), which the planner does not count as bubble.
    let bubble = per_step(&|r| {
        let (busy, idle) = (list(r, "stage_busy_s")?, list(r, "stage_idle_s")?);
        let s = (0..busy.len()).max_by(|&a, &b| busy[a].total_cmp(&busy[b]))?;
        Some(idle[s] / (busy[s] + idle[s]).max(1e-12))
    });
    let exposed = per_step(&|r| r.get("exposed_comm_s")?.as_f64());
    let peak = per_step(&|r| list(r, "stage_peak_bytes").and_then(|p| p.into_iter().reduce(f64::max)).or_else(|| r.get("peak_bytes")?.as_f64()));
    let imbalance = per_step(&|r| r.get("rank_load_imbalance")?.as_f64()).unwrap_or(1.0);
    let measured = match (bubble, exposed, peak) {
        (Some(bubble), Some(exposed_comm_s), Some(peak_bytes)) => Some(Measured { bubble, exposed_comm_s, peak_bytes, rank_load_imbalance: imbalance }),
        _ => None,
    };
    Ok(RunRecord {
        name: dir.display().to_string(),
        model,
        micro_batch: tc.micro_batch,
        seq_len: tc.seq_len,
        grad_accum: tc.grad_accum,
        ranks,
        ep,
        step_s: super::median(steps),
        pp,
        vpp,
        tp,
        sequence_parallel: spec.sequence_parallel,
        recompute,
        zero1: spec.zero1,
        schedule: match spec.schedule {
            ultramoe_train::spec::PipelineSchedule::Overlapped => ultramoe_plan::PipeSchedule::Overlap,
            _ => ultramoe_plan::PipeSchedule::OneFOneB,
        },
        measured,
    })
}

fn validate(dir: &Path, hw: &Hardware) -> CliResult {
    let run = read_run(dir)?;
    let p = predict(&run, hw).map_err(|e| e.to_string())?;
    let mut layout = if run.pp > 1 { format!("PP {}{} × ", run.pp, if run.vpp > 1 { format!(" (VPP {})", run.vpp) } else { String::new() }) } else { String::new() };
    if run.tp > 1 {
        layout = format!("TP {}{} × {layout}", run.tp, if run.sequence_parallel { " (SP)" } else { "" });
    }
    println!("run        {}", run.name);
    println!("layout     {} rank(s), {layout}EP {}, micro-batch {} × seq {} × accumulation {}", run.ranks, run.ep, run.micro_batch, run.seq_len, run.grad_accum);
    println!("hardware   {}", hw.name);
    println!("step       measured {:.4} s (median after 5 warm-up steps), predicted {:.4} s ({:+.1}%)", run.step_s, p.step_s, 100.0 * (p.step_s / run.step_s - 1.0));
    if let Some(m) = run.measured.as_ref().filter(|_| hw.devices_per_node > 1 && run.ep > 1) {
        println!("           (priced at the run's measured rank load imbalance {:.2})", m.rank_load_imbalance);
    }
    if let Some(m) = &run.measured {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("— (a one-device description)".to_string(), f);
        println!("bubble     measured {} of the busiest stage's step, predicted {}", pct(m.bubble), opt(p.bubble, &pct));
        println!("exposed    measured {:.4} s of communication, predicted {}", m.exposed_comm_s, opt(p.exposed_comm_s, &|x| format!("{x:.4} s")));
        println!("memory     measured {:.1} MB peak on the largest rank, predicted {}", m.peak_bytes / 1e6, opt(p.memory_bytes, &|x| format!("{:.1} MB", x / 1e6)));
    }
    if std::env::var_os("ULTRAMOE_RUN_RECORD").is_some() {
        println!("{}", serde_json::to_string(&run).unwrap());
    }
    Ok(())
}

/// A stacked bar per layout: its step time split into the breakdown's parts, the layout
/// written under it.
fn draw(path: &Path, best: &[&Prediction]) -> CliResult {
    use ultramoe_report::chart::{Bars, Chart, Format};
    let parts: Vec<String> = best.first().map_or(vec![], |p| p.breakdown.parts().iter().map(|(n, _)| n.to_string()).collect());
    let labels = best
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let l = &p.layout;
            vec![
                format!("#{}", i + 1),
                format!("TP{} PP{} VPP{}", l.tp, l.pp, l.vpp),
                format!("EP{} DP{}", l.ep, l.dp),
                format!("mb {}", l.micro_batch),
                format!("recompute {}", l.recompute.name()),
            ]
        })
        .collect();
    let chart = Chart::Bars(Bars {
        title: "Predicted step time of the best layouts, by where it goes".into(),
        y_label: "seconds per step".into(),
        labels,
        parts,
        values: best.iter().map(|p| p.breakdown.parts().iter().map(|(_, s)| *s).collect()).collect(),
    });
    chart.save(path, Format::of_path(path)).map_err(|e| e.to_string())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
