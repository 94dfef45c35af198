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

#[test]
fn predictions_for_own_runs_are_within_ten_percent() {
    let hw = Hardware::load(concat!(env!("CARGO_MANIFEST_DIR"), "/hardware/this-machine.toml")).unwrap();
    let runs: Vec<RunRecord> = include_str!("data/own-runs.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(runs.len() >= 6, "at least six configurations");
    let (mae, pairs) = mean_abs_error(&runs, &hw).unwrap();
    for (r, (p, m)) in runs.iter().zip(&pairs) {
        eprintln!("{:<45} measured {:.4} s  predicted {:.4} s  {:+.1}%", r.name, m, p, 100.0 * (p / m - 1.0));
    }
    eprintln!("mean absolute error {:.1}%", 100.0 * mae);
    assert!(mae <= 0.10, "mean absolute error {:.1}%", 100.0 * mae);
    // The runs really differ: model, batch shape and layout.
    let mut shapes: Vec<String> = runs.iter().map(|r| format!("{} {} {} {} {} {} {}", r.model["model_type"], r.model["hidden_size"], r.model["num_hidden_layers"], r.micro_batch, r.seq_len, r.grad_accum, r.ep)).collect();
    shapes.sort();
    shapes.dedup();
    assert_eq!(shapes.len(), runs.len());
}
