//! The planner against ultramoe's own training runs on this machine: nine runs (five
//! model shapes with MLA and GQA attention, micro-batches from 4 × 64 to 16 × 128 tokens,
//! gradient accumulation, expert parallelism over 2 and 4 ranks), their measured median
//! step times recorded with the calibration of the same machine. The predictions must
//! stay within 10% mean absolute error (vTrain reports 8.4% on one node).
//!
//! Reproduce the data: `ultramoe calibrate --out hw.toml`, train each run for 25 steps,
//! then `ULTRAMOE_RUN_RECORD=1 ultramoe plan --validate RUN_DIR --cluster hw.toml`
//! (README, "Planner").

use ultramoe_plan::validate::{mean_abs_error, RunRecord};
use ultramoe_plan::Hardware;

fn records(jsonl: &str) -> Vec<RunRecord> {
    jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Prints each run's prediction and holds the mean absolute error to 10%; the runs must
/// really differ (model, batch shape and layout).
fn hold_to_ten_percent(runs: &[RunRecord], hw: &Hardware) {
    let (mae, pairs) = mean_abs_error(runs, hw).unwrap();
    for (r, (p, m)) in runs.iter().zip(&pairs) {
        eprintln!("{:<64} measured {:.4} s  predicted {:.4} s  {:+.1}%", r.name, m, p, 100.0 * (p / m - 1.0));
    }
    eprintln!("mean absolute error {:.1}%", 100.0 * mae);
    assert!(mae <= 0.10, "mean absolute error {:.1}%", 100.0 * mae);
    let mut shapes: Vec<String> = runs
        .iter()
        .map(|r| {
            let m = &r.model;
            let layout = format!("{} {} {} {} {}", r.tp, r.pp, r.vpp, r.ep, r.ranks);
            format!("{} {} {} {} {} {} {layout}", m["model_type"], m["hidden_size"], m["num_hidden_layers"], r.micro_batch, r.seq_len, r.grad_accum)
        })
        .collect();
    shapes.sort();
    shapes.dedup();
    assert_eq!(shapes.len(), runs.len(), "two runs of the same shape and layout");
}

#[test]
fn predictions_for_own_runs_are_within_ten_percent() {
    let hw = Hardware::load(concat!(env!("CARGO_MANIFEST_DIR"), "/hardware/this-machine.toml")).unwrap();
    let runs = records(include_str!("data/own-runs.jsonl"));
    assert!(runs.len() >= 6, "at least six configurations");
    hold_to_ten_percent(&runs, &hw);
}

/// The planner against runs on this machine described as two devices (one core each,
/// `mpirun -np 2 ultramoe --threads 1`), where each run is exactly a layout the planner
/// searches: data, expert, tensor (with sequence parallelism) and pipeline parallelism
/// (1F1B and interleaved), five model shapes, with and without accumulation. Recorded
/// by `ULTRAMOE_RUN_RECORD=1 ultramoe plan --validate RUN_DIR --cluster two-devices.toml`
/// after 25 steps each (README, "Planner").
#[test]
fn per_device_predictions_with_pipeline_and_tensor_parallel_runs_are_within_ten_percent() {
    let hw = Hardware::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/two-devices.toml")).unwrap();
    assert_eq!(hw.devices_per_node, 2);
    let runs = records(include_str!("data/own-runs-devices.jsonl"));
    assert!(runs.len() >= 12, "at least twelve runs");
    assert!(runs.iter().filter(|r| r.pp > 1).count() >= 3 && runs.iter().any(|r| r.vpp > 1), "pipeline runs, interleaved among them");
    assert!(runs.iter().filter(|r| r.tp > 1).count() >= 3, "tensor-parallel runs");
    assert!(runs.iter().any(|r| r.tp == 1 && r.pp == 1 && r.ep == 1) && runs.iter().any(|r| r.ep > 1), "data- and expert-parallel runs");
    hold_to_ten_percent(&runs, &hw);
    // Memory per device (the largest rank's heap peak) against the planner's.
    let mut worst: f64 = 0.0;
    for r in &runs {
        let p = ultramoe_plan::validate::predict(r, &hw).unwrap().memory_bytes.unwrap();
        let m = r.measured.as_ref().unwrap().peak_bytes;
        eprintln!("{:<64} peak {:.1} MB  predicted {:.1} MB  {:+.1}%", r.name, m / 1e6, p / 1e6, 100.0 * (p / m - 1.0));
        worst = worst.max((p / m - 1.0).abs());
    }
    eprintln!("worst memory error {:.1}%", 100.0 * worst);
}

/// Tensor parallelism without sequence parallelism is not a layout the planner prices
/// (its TP splits the MoE block's tokens; the trainer's TP ranks then all route every
/// token): refused in one line rather than mispriced.
#[test]
fn tensor_parallel_runs_without_sequence_parallelism_are_refused() {
    let hw = Hardware::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/two-devices.toml")).unwrap();
    let mut run: RunRecord = serde_json::from_str(include_str!("data/own-runs-devices.jsonl").lines().find(|l| l.contains("\"tp\": 2")).unwrap()).unwrap();
    run.sequence_parallel = false;
    let e = ultramoe_plan::validate::predict_run(&run, &hw).unwrap_err().to_string();
    assert!(e.contains("sequence-parallel"), "{e}");
}
