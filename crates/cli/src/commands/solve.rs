//! `ultramoe solve "PROBLEM"`.

use super::{load_math_for_decoding, CliResult, WeightsArg};
use crate::solver::solve_checked;
use clap::Args;
use std::path::PathBuf;

/// Options of `ultramoe solve`.
#[derive(Args, Debug)]
pub struct SolveArgs {
    /// The problem, typed as a person would (`347 + 589`, `What is 523 minus 178?`,
    /// `(16 + 29) * (14 - 8)`, `Solve for x: 3x - 7 = 11`, `d/dx (3x^4 - 2x^2 + 7x - 5)`,
    /// `Integrate 6x^2 + 4x dx`, `Solve x^2 - 5x + 6 = 0`, `Solve: 2x + y = 7, x - y = 2`).
    /// A question of a kind the model was not trained on is refused.
    #[arg(allow_hyphen_values = true)]
    pub problem: String,
    /// Model directory (default: runs/demo/model if present — for the kinds it was trained
    /// on — else the shipped model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show the worked answer above the final answer.
    #[arg(long)]
    pub show_work: bool,
    /// Weight format the model decodes with (default: the format the model was saved in
    /// by `ultramoe quantize`, else f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Where the kind has a check (equations, quadratics, systems: substituting the
    /// answer; division: multiplying back; integrals: differentiating back), resample an
    /// answer that fails it up to N times (0: the greedy answer as it is).
    #[arg(long, default_value_t = 4)]
    pub check_retries: usize,
}

/// `ultramoe solve`.
pub fn run(a: SolveArgs) -> CliResult {
    if a.problem.trim().is_empty() {
        return Err("the problem is empty".into());
    }
    let dir = a.model.clone().unwrap_or_else(crate::default_model_dir);
    let (mut model, mut w) = load_math_for_decoding(&dir, a.weights)?;
    fits(&model, &a.problem)?;
    // A question of a kind no model was trained on gets a refusal, not a made-up answer…
    let kind = ultramoe_train::data::math::scope::classify(&a.problem).map_err(|why| format!("cannot answer `{}`: {why}", a.problem.trim()))?;
    // …and so does one of a kind this model was not trained on (`demo` trains some kinds).
    // Without `--model`, the shipped model answers what the demo's did not learn.
    if let Some(kinds) = ultramoe_train::data::math::trained_kinds(&dir)? {
        if !kinds.contains(&kind) {
            let trained = kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
            if a.model.is_some() {
                return Err(format!(
                    "cannot answer `{}`: the model in {} was trained on {trained} only, not {} (the shipped model, models/math-moe, was)",
                    a.problem.trim(),
                    dir.display(),
                    kind.name()
                ));
            }
            eprintln!("({} was trained on {trained} only; the shipped model answers this {} question)", dir.display(), kind.name());
            (model, w) = load_math_for_decoding(&crate::shipped_model_dir(), a.weights)?;
            fits(&model, &a.problem)?;
        }
    }
    let checked = solve_checked(&model, &w, std::slice::from_ref(&a.problem), a.check_retries).remove(0);
    let s = &checked.solution;
    if s.answer.trim().is_empty() {
        return Err(format!("the model gave no answer (its output: `{}`)", s.worked));
    }
    if a.json {
        println!("{}", serde_json::to_string(&checked).expect("solution serialises"));
        return Ok(());
    }
    if a.show_work {
        let steps = s.worked.split_once('|').map_or(s.worked.as_str(), |(steps, _)| steps);
        for step in steps.split(';') {
            println!("  {step}");
        }
    }
    if !s.complete {
        eprintln!("warning: the model did not finish its answer");
    }
    if checked.verified == Some(false) {
        eprintln!("warning: the answer fails its check ({} answers drawn); it is probably wrong", checked.attempts);
    }
    println!("{}", s.answer);
    Ok(())
}

/// The prompt and at least a short answer must fit the model's positions.
fn fits(model: &ultramoe_model::Model, problem: &str) -> CliResult {
    let tokens = ultramoe_train::data::batch::prompt_tokens(problem).len();
    let room = model.cfg.max_position.saturating_sub(8);
    if tokens > room {
        return Err(format!(
            "the problem is {tokens} tokens long; this model reads at most {room} to leave room for an answer (max_position_embeddings {})",
            model.cfg.max_position
        ));
    }
    Ok(())
}
