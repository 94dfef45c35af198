//! `ultramoe demo`: train the default math MoE, save it, then solve sample problems.

use super::eval::{evaluate, parse_kinds};
use super::train::{make_trainer, resolve, train_loop, TrainArgs};
use super::{load_math_for_decoding, CliResult, WeightsArg};
use crate::solver::solve_batch;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use ultramoe_train::data::math::Kind;
use ultramoe_train::run_dir::{RunDir, Start};

/// Options of `ultramoe demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Run directory (an earlier demo's run there is replaced).
    #[arg(long, default_value = "runs/demo")]
    pub run_dir: PathBuf,
    /// Optimizer steps (default: the preset's).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Problems per kind in the closing evaluation (0 to skip).
    #[arg(long, default_value_t = 200)]
    pub eval_n: usize,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}


/// `ultramoe demo`.
pub fn run(a: DemoArgs) -> CliResult {
    let start = Instant::now();
    let targs = TrainArgs {
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
        data: None,
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
    let resolved = resolve(&targs, None)?;
    let mut tr = make_trainer(&targs, &resolved, None, false)?;
    eprintln!(
        "training the default math MoE ({:.2}M parameters, {} experts top-{}) for {} steps",
        tr.model.n_params() as f64 / 1e6,
        tr.model.cfg.moe.n_experts,
        tr.model.cfg.moe.top_k,
        tr.cfg.steps
    );
    train_loop(&mut tr, &a.run_dir, None, !a.no_progress, false)?;
    drop(run);
    let train_s = start.elapsed().as_secs_f64();
    let model_dir = a.run_dir.join("model");
    let (model, w) = load_math_for_decoding(&model_dir, Some(WeightsArg::F32))?;
    println!("\nsample problems:");
    let qs: Vec<String> = Kind::ALL.iter().map(|k| k.example().to_string()).collect();
    for s in solve_batch(&model, &w, &qs) {
        println!("  {:<48} → {}", s.question, s.answer);
    }
    if a.eval_n > 0 {
        println!("\nexact-match accuracy on {} unseen problems per kind:", a.eval_n);
        let kinds = parse_kinds("all")?;
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
    Ok(())
}
