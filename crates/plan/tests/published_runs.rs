//! The planner against published training runs (`tests/data/published-runs.toml`, each
//! with its source): at the run's layout, recipe and schedule, the predicted throughput
//! within the run's tolerance and the predicted memory within the device's capacity.
//! Runs without a tolerance are printed, not held (the README lists them).

use serde::Deserialize;
use ultramoe_plan::{presets, search, Fixed, Hardware, Job, ModelCost, Recompute};

#[derive(Deserialize)]
struct Runs {
    run: Vec<Run>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Run {
    name: String,
    source: String,
    model: String,
    cluster: String,
    devices: usize,
    seq_len: usize,
    global_batch: usize,
    dtype: String,
    hierarchical_a2a: bool,
    layout: String,
    tokens_per_s: f64,
    tolerance: Option<f64>,
}

fn runs() -> Vec<Run> {
    toml::from_str::<Runs>(include_str!("data/published-runs.toml")).unwrap().run
}

fn job(r: &Run) -> Job {
    Job { devices: r.devices, seq_len: r.seq_len, global_batch: r.global_batch, dtype: r.dtype.clone(), hierarchical_a2a: r.hierarchical_a2a, imbalance: 1.0 }
}

#[test]
fn published_runs_are_predicted_within_their_tolerance() {
    let mut failures = vec![];
    for r in runs() {
        let m = ModelCost::new(&presets::model(&r.model).unwrap());
        let hw = Hardware::load(&r.cluster).unwrap();
        let fixed = Fixed::parse(&r.layout).unwrap();
        let out = search(&m, &hw, &job(&r), &fixed, true);
        let Some(best) = out.ranked.first() else {
            let why: Vec<&String> = out.rejected.iter().map(|(_, w)| w).take(2).collect();
            eprintln!("{}: no feasible layout ({why:?})", r.name);
            if r.tolerance.is_some() {
                failures.push(format!("{}: rejected", r.name));
            }
            continue;
        };
        let err = best.tokens_per_s / r.tokens_per_s - 1.0;
        eprintln!(
            "{}: published {:.0} tokens/s, predicted {:.0} ({:+.1}%), {:.1} GB of {:.0} GB, recompute {}",
            r.name,
            r.tokens_per_s,
            best.tokens_per_s,
            100.0 * err,
            best.memory_bytes / 1e9,
            hw.device.memory_bytes / 1e9,
            best.layout.recompute.name()
        );
        if let Some(tol) = r.tolerance {
            if err.abs() > tol || best.memory_bytes > hw.device.memory_bytes {
                failures.push(format!("{}: {:+.1}% (tolerance {:.0}%), {:.1} GB", r.name, 100.0 * err, 100.0 * tol, best.memory_bytes / 1e9));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// At DeepSeek-V3's published layout, the planner chooses a recipe that keeps most
/// activations (as the real run did on 80 GB devices), not full recomputation.
#[test]
fn deepseek_v3_is_planned_without_full_recomputation() {
    let r = runs().into_iter().find(|r| r.model == "deepseek-v3-671b").unwrap();
    let m = ModelCost::new(&presets::model(&r.model).unwrap());
    let hw = Hardware::load(&r.cluster).unwrap();
    let fixed = Fixed::parse("tp=1,pp=16,vpp=1,ep=64,mb=1,schedule=dualpipe").unwrap();
    let out = search(&m, &hw, &job(&r), &fixed, true);
    let best = &out.ranked[0];
    assert_ne!(best.layout.recompute, Recompute::Full);
    assert!(best.memory_bytes <= hw.device.memory_bytes);
    // Keeping everything does not fit: the recipe's recomputation is needed.
    assert!(out.rejected.iter().any(|(l, _)| l.recompute == Recompute::None));
}

/// DualPipe keeps two copies of its stage's parameters and optimizer states, DualPipeV
/// one: the states differ by exactly one copy (memory less activations less the
/// all-to-all buffers `2·mb·s·K·H` at 1.5 bytes under FP8).
#[test]
fn dualpipe_keeps_two_parameter_copies() {
    let r = runs().into_iter().find(|r| r.model == "deepseek-v3-671b").unwrap();
    let m = ModelCost::new(&presets::model(&r.model).unwrap());
    let hw = Hardware::load(&r.cluster).unwrap();
    let at = |s: &str| {
        let out = search(&m, &hw, &job(&r), &Fixed::parse(&format!("tp=1,pp=16,vpp=1,ep=64,mb=1,recompute=full,schedule={s}")).unwrap(), true);
        let p = &out.ranked[0];
        p.memory_bytes - p.activation_bytes
    };
    let buffers = 2.0 * (4096 * 8 * 7168) as f64 * 1.5;
    let (two, one) = (at("dualpipe") - buffers, at("dualpipev") - buffers);
    assert!((two / one - 2.0).abs() < 1e-9, "{two} vs {one}");
}
