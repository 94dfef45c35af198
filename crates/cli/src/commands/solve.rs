//! `ultramoe solve "PROBLEM"`.

use super::{load_math_for_decoding, CliResult, WeightsArg};
use crate::solver::solve_batch;
use clap::Args;
use std::path::PathBuf;

/// Options of `ultramoe solve`.
#[derive(Args, Debug)]
pub struct SolveArgs {
    /// The problem, typed as a person would (`347 + 589`, `58 * 73`, `Solve for x: 3x - 7 = 11`,
    /// `-5 - -5`).
    #[arg(allow_hyphen_values = true)]
    pub problem: String,
    /// Model directory (default: runs/demo/model if present, else the shipped model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show the worked answer above the final answer.
    #[arg(long)]
    pub show_work: bool,
    /// Weight format the model decodes with.
    #[arg(long, value_enum, default_value_t)]
    pub weights: WeightsArg,
}

/// `ultramoe solve`.
pub fn run(a: SolveArgs) -> CliResult {
    if a.problem.trim().is_empty() {
        return Err("the problem is empty".into());
    }
    let dir = a.model.unwrap_or_else(crate::default_model_dir);
    let (model, w) = load_math_for_decoding(&dir, a.weights)?;
    // The prompt and at least a short answer must fit the model's positions.
    let tokens = ultramoe_train::data::batch::prompt_tokens(&a.problem).len();
    let room = model.cfg.max_position.saturating_sub(8);
    if tokens > room {
        return Err(format!(
            "the problem is {tokens} tokens long; this model reads at most {room} to leave room for an answer (max_position_embeddings {})",
            model.cfg.max_position
        ));
    }
    let s = solve_batch(&model, &w, std::slice::from_ref(&a.problem)).remove(0);
    if s.answer.trim().is_empty() {
        return Err(format!("the model gave no answer (its output: `{}`)", s.worked));
    }
    if a.json {
        println!("{}", serde_json::to_string(&s).expect("solution serialises"));
        return Ok(());
    }
    if a.show_work {
        for step in s.worked.split(';') {
            println!("  {step}");
        }
    }
    if !s.complete {
        eprintln!("warning: the model did not finish its answer");
    }
    println!("{}", s.answer);
    Ok(())
}
