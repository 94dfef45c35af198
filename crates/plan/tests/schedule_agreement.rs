//! The planner prices the pipeline the trainer runs: its bubble and in-flight formulas
//! equal what the schedules of `ultramoe-schedule` give when simulated.

use ultramoe_plan::pipeline::sends_per_micro_batch;
use ultramoe_plan::PipeSchedule;
use ultramoe_schedule::{build, simulate, Kind, Shape};

/// 1F1B (interleaved at VPP > 1) and the overlapped 1F1B, PP 1–8 (the overlapped one
/// from 2), VPP 1–4, several micro-batch counts; the overlapped schedule timed one pass
/// at a time, as a pair's two passes share the rank's cores.
#[test]
fn bubble_and_in_flight_match_the_schedules() {
    // A micro-batch's pass through all of a rank's layers: forward 1, backward 2 (split
    // evenly over its chunks).
    let (f, b) = (1.0, 2.0);
    for (kind, planned_as, first_pp) in [(Kind::OneFOneB, PipeSchedule::OneFOneB, 1), (Kind::Overlapped, PipeSchedule::Overlap, 2)] {
        for pp in first_pp..=8 {
            for vpp in 1..=4 {
                for m in [pp, 2 * pp, 4 * pp, 8 * pp] {
                    let s = build(kind, Shape { pp, vpp, micro_batches: m }).unwrap();
                    let t = simulate(&s, f / vpp as f64, b / vpp as f64, 0.0).unwrap();
                    let bubble = t.makespan - m as f64 * (f + b);
                    let predicted = planned_as.bubble(pp, vpp, f + b);
                    assert!((bubble - predicted).abs() < 1e-9, "{kind:?} pp {pp} vpp {vpp} m {m}: simulated bubble {bubble}, planner {predicted}");
                    // Rank 0 holds the most; in units of a whole stage's micro-batch.
                    let held = s.in_flight(0) as f64 / vpp as f64;
                    let planned = planned_as.in_flight(pp, vpp, m);
                    assert!((held - planned).abs() < 1e-9, "{kind:?} pp {pp} vpp {vpp} m {m}: schedule holds {held}, planner {planned}");
                }
            }
        }
    }
}

/// The sends the planner prices per micro-batch are the forwards whose next model chunk
/// (virtual stage `chunk·PP + rank + 1`) lives on another rank, counted on a middle rank
/// of every schedule the trainer runs.
#[test]
fn pipeline_sends_match_the_schedules() {
    for kind in [Kind::GPipe, Kind::OneFOneB, Kind::Overlapped] {
        for pp in 2..=8 {
            for vpp in 1..=4 {
                let m = 2 * pp;
                let s = build(kind, Shape { pp, vpp, micro_batches: m }).unwrap();
                let last = pp * vpp - 1;
                let rank = (pp - 1) / 2;
                let sends = s.ranks[rank].iter().filter(|a| matches!(a, ultramoe_schedule::Action::Forward { chunk, .. } if chunk * pp + rank < last)).count();
                assert_eq!(sends, m * sends_per_micro_batch(pp, vpp), "{kind:?} pp {pp} vpp {vpp}");
            }
        }
    }
    assert_eq!(sends_per_micro_batch(1, 1), 0);
}
