//! `ultramoe eval`: exact-match accuracy.

use super::{load_math_for_decoding, CliResult, WeightsArg};
use ultramoe_model::decode_weights::DecodeWeights;
use crate::solver::{answers_match, check_and_resample, solve_batch};
use crate::progress::Progress;
use clap::Args;
use std::path::{Path, PathBuf};
use ultramoe_model::init::Rng;
use ultramoe_model::Model;
use ultramoe_train::data::jsonl::read_jsonl;
use ultramoe_train::data::math::{generate_in, Kind, Split};

/// Options of `ultramoe eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory (default: runs/demo/model if present, else the shipped model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL file of `{"question", "answer"}` to score instead of generated problems.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Problem kinds to generate, comma-separated, or `all`: add, sub, mul, div, expr,
    /// equation, word, derivative, product, chain, integral, definite, quadratic, system
    /// (default: the kinds the model was trained on — all but for a `demo` model).
    #[arg(long)]
    pub kinds: Option<String>,
    /// Problems per kind.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Seed of the evaluation problems (always from the held-out split).
    #[arg(long, default_value_t = 987_654_321)]
    pub seed: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Print each wrong answer.
    #[arg(long)]
    pub show_errors: bool,
    /// No progress bar (there is none when stderr is not a terminal either).
    #[arg(long)]
    pub no_progress: bool,
    /// Weight format the model decodes with (default: the format the model was saved in
    /// by `ultramoe quantize`, else f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Also score with checking: answers of kinds that have a check (equations,
    /// quadratics, systems, division, indefinite integrals) that fail it are resampled
    /// up to N times; both accuracies are printed.
    #[arg(long, default_value_t = 0)]
    pub check_retries: usize,
}

/// One accuracy figure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Score {
    /// what was scored
    pub name: String,
    /// correct answers
    pub correct: usize,
    /// problems
    pub total: usize,
    /// correct / total
    pub accuracy: f64,
    /// correct / total after checking and resampling (when asked for)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_accuracy: Option<f64>,
}

/// Scores `(question, expected)` pairs (and again after checking, with
/// `check_retries > 0`).
pub fn score(model: &Model, w: &DecodeWeights, name: &str, items: &[(String, String)], show_errors: bool, check_retries: usize) -> Score {
    let qs: Vec<String> = items.iter().map(|(q, _)| q.clone()).collect();
    let sols = solve_batch(model, w, &qs);
    let checked_accuracy = (check_retries > 0).then(|| {
        let checked = check_and_resample(model, w, sols.clone(), check_retries);
        let right = checked.iter().zip(items).filter(|(c, (_, e))| answers_match(&c.solution.answer, e)).count();
        right as f64 / items.len().max(1) as f64
    });
    let mut correct = 0;
    for (s, (_, e)) in sols.iter().zip(items) {
        if answers_match(&s.answer, e) {
            correct += 1;
        } else if show_errors {
            eprintln!("  ✗ {} → {} (expected {e}; work: {})", s.question, s.answer, s.worked);
        }
    }
    Score { name: name.to_string(), correct, total: items.len(), accuracy: correct as f64 / items.len().max(1) as f64, checked_accuracy }
}

/// Held-out problems of one kind: the test split, which training never draws from.
pub fn generated(kind: Kind, n: usize, seed: u64) -> Vec<(String, String)> {
    let mut rng = Rng::new(seed ^ (kind as u64 + 1).wrapping_mul(0x9E37_79B9));
    (0..n).map(|_| generate_in(&mut rng, kind, Split::Test)).map(|p| (p.question, p.answer)).collect()
}

/// Scores a model directory over kinds or a file (a progress bar per kind when
/// `progress`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(dir: &Path, file: Option<&Path>, kinds: &[Kind], n: usize, seed: u64, show_errors: bool, progress: bool, weights: Option<WeightsArg>, check_retries: usize) -> CliResult<Vec<Score>> {
    if let Some(f) = file {
        let items: Vec<(String, String)> = read_jsonl(f)?.into_iter().map(|q| (q.question, q.answer)).collect();
        let (model, w) = load_math_for_decoding(dir, weights)?;
        let bar = Progress::new("eval", 1, progress);
        bar.doing(format!("{} problems of {}", items.len(), f.display()));
        return Ok(vec![score(&model, &w, &f.display().to_string(), &items, show_errors, check_retries)]);
    }
    let (model, w) = load_math_for_decoding(dir, weights)?;
    let bar = Progress::new("eval", kinds.len() as u64, progress);
    let scores = kinds
        .iter()
        .map(|k| {
            bar.doing(format!("{n} {} problems", k.name()));
            let s = score(&model, &w, k.name(), &generated(*k, n, seed), show_errors, check_retries);
            bar.done_one();
            s
        })
        .collect();
    Ok(scores)
}

/// Parses `--kinds` (`all` for every kind).
pub fn parse_kinds(s: &str) -> CliResult<Vec<Kind>> {
    if s.trim() == "all" {
        return Ok(Kind::ALL.to_vec());
    }
    s.split(',')
        .map(|k| {
            Kind::from_name(k.trim()).ok_or_else(|| {
                format!("--kinds: unknown kind `{k}` (known: {})", Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "))
            })
        })
        .collect()
}

/// `ultramoe eval`.
pub fn run(a: EvalArgs) -> CliResult {
    let dir = a.model.clone().unwrap_or_else(crate::default_model_dir);
    let kinds = match &a.kinds {
        Some(k) => parse_kinds(k)?,
        None => ultramoe_train::data::math::trained_kinds(&dir)?.unwrap_or_else(|| Kind::ALL.to_vec()),
    };
    let scores = evaluate(&dir, a.file.as_deref(), &kinds, a.n, a.seed, a.show_errors, !a.no_progress, a.weights, a.check_retries)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&scores).unwrap());
    } else {
        for s in &scores {
            match s.checked_accuracy {
                Some(c) => println!("{:<10} {:>6.1}%  ({}/{})  checked {:>6.1}%", s.name, 100.0 * s.accuracy, s.correct, s.total, 100.0 * c),
                None => println!("{:<10} {:>6.1}%  ({}/{})", s.name, 100.0 * s.accuracy, s.correct, s.total),
            }
        }
    }
    Ok(())
}
