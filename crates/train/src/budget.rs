//! A rank's memory budget: the cheapest memory options that fit it (when the run gives
//! no policy), or a one-line refusal naming what does not fit.
//!
//! Each rank decides for its own layers and its own schedule (a pipeline's first stage
//! holds more micro-batches in flight than its last), so under pipeline parallelism the
//! stages may choose different policies; the choice changes no number.

use crate::spec::RunSpec;
use std::path::Path;
use ultramoe_model::memory::{runtime_bytes, CostRates};
use ultramoe_model::policy::describe_policy;
use ultramoe_model::{Error, Model, PassOptions, Result};
use ultramoe_schedule::Action;

/// Cost rates for choosing a memory policy: the GEMM peak and the swap file's bandwidth
/// in `dir`, measured now (a directory that cannot hold a swap file rules swapping out,
/// with a warning).
pub fn cost_rates(dir: &Path, peak: f64) -> CostRates {
    let swap = ultramoe_model::swap::probe(dir, 64 << 20)
        .map_err(|e| eprintln!("warning: swap directory {}: {e}; the memory policy will not swap", dir.display()))
        .ok();
    CostRates::from_peak(peak, swap)
}

/// How far under the budget a choice aims: the predicted peak's error against measured
/// heaps (`tests/memory.rs`, the MPI per-stage test) stays within ±2%, so a step chosen
/// to fit `0.98 · budget` by prediction also fits `budget` when it runs.
pub const PREDICTION_MARGIN: f64 = 0.02;

/// The bytes a choice aims at under `budget`: `(1 − PREDICTION_MARGIN) · budget`.
pub fn aim(budget: usize) -> usize {
    (budget as f64 * (1.0 - PREDICTION_MARGIN)) as usize
}

/// The cheapest options for `pass` whose predicted peak fits [`aim`]`(budget)` (or, when
/// nothing does, `budget` itself); `Err` with the most frugal options tried when nothing
/// fits either.
#[allow(clippy::too_many_arguments)]
pub fn choose(model: &Model, pass: &PassOptions, rows: usize, t: usize, runtime: usize, budget: usize, rates: &CostRates, actions: &[Action]) -> std::result::Result<PassOptions, PassOptions> {
    model.choose_policy(rows, t, 2, runtime, aim(budget), rates, pass, actions).or_else(|_| model.choose_policy(rows, t, 2, runtime, budget, rates, pass, actions))
}

/// The kernel workspaces a rank's step adds to its prediction: measured by a trial pass
/// through this rank's share; under expert parallelism that pass would need every rank
/// of the group, so they are left out (0).
pub fn workspace_bytes(model: &Model) -> usize {
    if model.exchange.is_none() {
        runtime_bytes(model)
    } else {
        0
    }
}

/// The options this rank's step runs with under `budget` bytes: `pass` as it is when the
/// run gives a policy, otherwise the cheapest that fits ([`Model::choose_policy`]), said
/// on `report` ranks; `runtime` is [`workspace_bytes`]. `Err` when the step's predicted
/// peak still exceeds the budget, naming the largest owners and the largest micro-batch
/// that would fit.
#[allow(clippy::too_many_arguments)]
pub fn fit(model: &Model, spec: &RunSpec, pass: &PassOptions, rows: usize, t: usize, actions: &[Action], runtime: usize, budget: usize, peak_flops: f64, report: bool) -> Result<PassOptions> {
    let mut pass = pass.clone();
    if spec.memory_policy.is_empty() {
        let rates = cost_rates(&pass.swap_dir, peak_flops);
        // When nothing fits, the most frugal options tried go to the check below, which
        // names what does not fit.
        let chosen = choose(model, &pass, rows, t, runtime, budget, &rates, actions);
        if let (true, Ok(p)) = (report, &chosen) {
            if p.policy.iter().any(|l| !l.keeps_all()) || (p.swap_moments && !pass.swap_moments) {
                let cost = model.policy_cost(rows, t, p, &rates);
                let moments = if p.swap_moments { ", optimizer moments swapped" } else { "" };
                let stage = if model.stage.ranks > 1 { format!(" (stage {})", model.stage.rank) } else { String::new() };
                eprintln!("--memory-budget{stage}: memory policy `{}`{moments} to fit (estimated cost {:.1} ms a micro-batch)", describe_policy(&p.policy), 1e3 * cost);
            }
        }
        pass = chosen.unwrap_or_else(|most| most);
    }
    let plan = model.memory_plan_scheduled(rows, t, 2, runtime, &pass, actions);
    if plan.peak_bytes <= budget {
        return Ok(pass);
    }
    let mut owners = plan.items.clone();
    owners.sort_by_key(|o| std::cmp::Reverse(o.1));
    let top: Vec<String> = owners.iter().take(3).map(|(o, b)| format!("{o} {:.1} MB", *b as f64 / 1e6)).collect();
    let fits = model.largest_micro_batch(t, 2, runtime, aim(budget), rows - 1, &pass, actions);
    let per_stage = spec.stage_ranks();
    let advice = match fits {
        Some(r) => format!("with memory policy `{}` the largest micro-batch that fits is {} rows", describe_policy(&pass.policy), r * per_stage),
        None if plan.static_bytes > budget => "weights, gradients and moments alone exceed it".to_string(),
        None => format!("not even one row per rank fits with memory policy `{}`", describe_policy(&pass.policy)),
    };
    let stage = if model.stage.ranks > 1 { format!(" (pipeline stage {} of {})", model.stage.rank, model.stage.ranks) } else { String::new() };
    Err(Error::msg(
        format!(
            "memory budget (--memory-budget): a step{stage} needs {:.1} MB (weights, gradients and moments {:.1} MB, saved activations {:.1} MB, temporaries {:.1} MB, kernel workspaces {:.1} MB) > {:.1} MB; largest: {}; {advice}",
            plan.peak_bytes as f64 / 1e6,
            plan.static_bytes as f64 / 1e6,
            (plan.activation_bytes + plan.in_flight_bytes) as f64 / 1e6,
            plan.transient_bytes as f64 / 1e6,
            plan.runtime_bytes as f64 / 1e6,
            budget as f64 / 1e6,
            top.join(", "),
        ),
    ))
}
