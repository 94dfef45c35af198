//! `ultramoe demo`: train the default math MoE, save it, then solve sample problems.

use super::eval::{evaluate, parse_kinds};
use super::train::{make_trainer, resolve, train_loop, Deadline, TrainArgs};
use super::{load_math_for_decoding, CliResult, WeightsArg};
use crate::solver::solve_batch;
use clap::Args;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use ultramoe_train::data::math::Kind;
use ultramoe_train::run_dir::{RunDir, Start};

/// Options of `ultramoe demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Run directory (an earlier demo's run there is replaced).
    #[arg(long, default_value = "runs/demo")]
    pub run_dir: PathBuf,
    /// Optimizer steps (default: as many as fit `--minutes` at this machine's step rate,
    /// measured before the run and again from the run's own steps, which may lengthen or
    /// shorten it).
    #[arg(long)]
    pub steps: Option<u64>,
    /// The time budget of the whole demo — training, saving and the closing evaluation —
    /// from which the step count is set when `--steps` is not given.
    #[arg(long, default_value_t = 15.0)]
    pub minutes: f64,
    /// Kinds of problems to train (comma-separated, or `all`). The default is the
    /// arithmetic, expressions and linear equations, which 15 minutes on two Zen 5 cores
    /// train to their accuracy floors (a slower machine buys fewer steps); `all` adds word
    /// problems, calculus, quadratics and systems, which the shipped model learned in
    /// 36,000 steps.
    #[arg(long, default_value = DEMO_KINDS)]
    pub kinds: String,
    /// Problems per kind in the closing evaluation (0 to skip).
    #[arg(long, default_value_t = 200)]
    pub eval_n: usize,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// The kinds `demo` trains by default.
const DEMO_KINDS: &str = "add,sub,mul,div,expr,equation";

/// Seconds of the budget kept for saving the model and the closing evaluation.
const AFTER_TRAINING_S: f64 = 30.0;

/// Steps the default kinds needed to reach their accuracy floors (add, sub, mul ≥ 99%,
/// expr ≥ 95%, equation ≥ 98% over 500 problems each): 14,000 did on a Zen 5; 7,000
/// (add/sub 98.0%, expr 93.8%, equation 95.6%) and 6,000 did not, nor did re-weighting
/// the kinds or a higher learning rate at 6,000, nor micro-batch 4 (twice the steps at
/// the same tokens/s) at 20,000 of its steps (sub 98.8%, equation 97.6%). At 8,300 (a
/// Zen 4 EPYC's 15 minutes) six runs — this mix, four re-weighted, micro-batch 4 —
/// each missed one to four floors by at most 2.8 points (README, "**Math.**").
const FLOOR_STEPS: u64 = 14_000;

/// At most this many steps, however fast the machine (the default recipe's schedule
/// was tuned up to ~36,000).
const MAX_STEPS: u64 = 40_000;

/// `ultramoe demo`.
pub fn run(a: DemoArgs) -> CliResult {
    let start = Instant::now();
    let kinds = parse_kinds(&a.kinds)?;
    if !(a.minutes.is_finite() && a.minutes > 0.0) {
        return Err(format!("--minutes: {} is not a positive number of minutes", a.minutes));
    }
    let data =
        Some(if a.kinds.trim() == "all" { "math".to_string() } else { format!("math:{}", kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")) });
    let mut targs = TrainArgs {
        model_config: None,
        init_from: None,
        tokenizer: None,
        eval_fraction: None,
        eval_every: None,
        eval_batches: None,
        no_doc_masks: false,
        run_dir: a.run_dir.clone(),
        resume: false,
        overwrite: true,
        max_nonfinite_steps: None,
        steps: a.steps,
        micro_batch: None,
        seq_len: None,
        grad_accum: None,
        lr: None,
        min_lr: None,
        warmup: None,
        seed: None,
        data,
        save_every: None,
        bias_update_rate: None,
        aux_loss: None,
        aux_loss_coef: 0.0,
        aux_ep_groups: 1,
        routing_skew: None,
        stats_ep: None,
        placement_every: None,
        memory_budget: None,
        recompute: None,
        memory_policy: None,
        swap_dir: None,
        swap_moments: false,
        redundant_experts: None,
        metrics: None,
        peak_gflops: None,
        no_progress: a.no_progress,
        zero1: false,
        no_grad_overlap: false,
        no_zero1: false,
        no_swap_moments: false,
        plan: None,
        plan_rank: None,
        parallel: crate::launch::ParallelArgs { overlap_chunks: Some(1), comm_timeout: 30, ..Default::default() },
    };
    // The demo starts over each time: an earlier demo's run is replaced.
    let run = RunDir::open(&a.run_dir, Start::Overwrite, true).map_err(|e| e.to_string())?;
    let mut deadline = None;
    if targs.steps.is_none() {
        let rate = step_rate(&targs)?;
        // The probe's rate gives the run a first length; the run plans it again from its
        // own rate (`Deadline`), and stops at the deadline whatever the plan.
        let d = Deadline { end: start + Duration::from_secs_f64((a.minutes * 60.0 - AFTER_TRAINING_S).max(0.0)), max_steps: MAX_STEPS };
        let steps = d.steps(0, rate, d.end.saturating_duration_since(Instant::now()).as_secs_f64());
        eprintln!("{rate:.1} steps/s: {steps} steps fit the {}-minute budget", a.minutes);
        if steps < FLOOR_STEPS && same_kinds(&kinds, &parse_kinds(DEMO_KINDS)?) {
            // minutes = (steps / (margin · rate) + the saving and evaluation + the rate probe) / 60
            let need = (FLOOR_STEPS as f64 / (Deadline::MARGIN * rate) + AFTER_TRAINING_S + start.elapsed().as_secs_f64()) / 60.0;
            eprintln!(
                "note: the default kinds reached their accuracy floors by {FLOOR_STEPS} steps (7,000 fell short), so expect less accuracy here; `--minutes {}` buys about {FLOOR_STEPS}",
                need.ceil()
            );
        }
        targs.steps = Some(steps);
        deadline = Some(d);
    }
    let resolved = resolve(&targs, None)?;
    let mut tr = make_trainer(&targs, &resolved, None, false)?;
    eprintln!(
        "training the default math MoE ({:.2}M parameters, {} experts top-{}) for {} steps",
        tr.model.n_params() as f64 / 1e6,
        tr.model.cfg.moe.n_experts,
        tr.model.cfg.moe.top_k,
        tr.cfg.steps
    );
    train_loop(&mut tr, &a.run_dir, None, !a.no_progress, false, deadline.as_ref())?;
    drop(run);
    let train_s = start.elapsed().as_secs_f64();
    let model_dir = a.run_dir.join("model");
    let (model, w) = load_math_for_decoding(&model_dir, Some(WeightsArg::F32))?;
    println!("\nsample problems:");
    let qs: Vec<String> = kinds.iter().map(|k| k.example().to_string()).collect();
    for s in solve_batch(&model, &w, &qs) {
        println!("  {:<48} → {}", s.question, s.answer);
    }
    if a.eval_n > 0 {
        println!("\nexact-match accuracy on {} unseen problems per kind:", a.eval_n);
        for s in evaluate(&model_dir, None, &kinds, a.eval_n, 987_654_321, false, !a.no_progress, Some(WeightsArg::F32), 0)? {
            println!("  {:<10} {:>6.1}%", s.name, 100.0 * s.accuracy);
        }
    }
    println!(
        "\ntrained in {:.0} s, total {:.0} s; try: cargo run --release -- solve \"58 * 73\" --model {}",
        train_s,
        start.elapsed().as_secs_f64(),
        model_dir.display()
    );
    if kinds.len() < Kind::ALL.len() {
        println!(
            "(`solve` without --model answers the kinds this model was not trained on — derivatives, integrals, quadratics, systems — with the shipped model)"
        );
    }
    Ok(())
}

/// Whether two lists name the same kinds, in whatever order.
fn same_kinds(a: &[Kind], b: &[Kind]) -> bool {
    a.iter().all(|k| b.contains(k)) && b.iter().all(|k| a.contains(k))
}

/// This machine's optimizer steps per second on the demo's recipe: a throwaway trainer's
/// steps after the first 10 (which pay for page faults and warm caches), timed in windows
/// of 10 steps; the rate is the median window's, so a window slowed by a neighbour
/// counts for less (a probe of 30 steps timed as one once read 9.2 steps/s on a shared
/// machine that then trained at 10.9, and the demo ended four minutes early).
fn step_rate(targs: &TrainArgs) -> CliResult<f64> {
    const SKIP: u64 = 10;
    const WINDOW: u64 = 10;
    const WINDOWS: u64 = 5;
    let probe = TrainArgs { steps: Some(SKIP + WINDOW * WINDOWS), no_progress: true, ..targs.clone() };
    let mut tr = make_trainer(&probe, &resolve(&probe, None)?, None, false)?;
    eprint!("measuring this machine's step rate … ");
    for _ in 0..SKIP {
        tr.train_step().map_err(|e| e.to_string())?;
    }
    let mut seconds = Vec::with_capacity(WINDOWS as usize);
    for _ in 0..WINDOWS {
        let t = Instant::now();
        for _ in 0..WINDOW {
            tr.train_step().map_err(|e| e.to_string())?;
        }
        seconds.push(t.elapsed().as_secs_f64());
    }
    Ok(WINDOW as f64 / super::median(seconds))
}
