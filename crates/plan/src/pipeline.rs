//! Pipeline schedules as the planner prices them: the bubble, the micro-batches whose
//! activations a stage holds at once, the parameter copies a device keeps, and whether
//! one micro-batch's expert all-to-all runs under another's computation.
//!
//! 1F1B, interleaved 1F1B and the overlapped 1F1B are the schedules the trainer runs
//! (`ultramoe-schedule`); their formulas are checked against its lists in
//! `tests/schedule_agreement.rs`. DualPipe and DualPipeV (DeepSeek-V3, arXiv 2412.19437
//! §3.2.1, Table 2; github.com/deepseek-ai/DualPipe) are priced from their published
//! formulas, with a stage's micro-batch split as forward `F = t/3`, backward `B = 2t/3`
//! of which weight gradients `W = t/3`, and an overlapped forward-and-backward pair
//! `F&B = F + B` (its communication hidden):
//!
//! | schedule | bubble | activations (stage micro-batches) | parameters |
//! |---|---|---|---|
//! | 1F1B, VPP `v` | `(PP − 1)/v · t` | `min(PP + (PP − 1)/v, m)` (`min(PP, m)` at `v` = 1) | 1× |
//! | overlapped 1F1B | as 1F1B | 1F1B's `+ 1/v` | 1× |
//! | DualPipe | `(PP/2 − 1)(F&B + B − 3W) = (PP/2 − 1)·2t/3` | `PP + 1` | 2× |
//! | DualPipeV (`2·PP` half stages) | `(PP − 1)(F&B + B − 3W)/2 = (PP − 1)·t/3` | `PP + 1/2` | 1× |

use serde::{Deserialize, Serialize};

/// A pipeline schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipeSchedule {
    /// 1F1B, interleaved over VPP chunks when VPP > 1 (the trainer's `1f1b`)
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// 1F1B whose steady-state forward and backward run as a pair, one micro-batch's
    /// all-to-all under the other's compute (the trainer's `overlap`; Megatron-Core's
    /// combined 1F1B)
    Overlap,
    /// DeepSeek-V3's bidirectional pipeline (two parameter copies)
    DualPipe,
    /// DualPipe cut in half: one parameter copy, `2·PP` half stages
    DualPipeV,
}

impl PipeSchedule {
    /// Every schedule.
    pub const ALL: [PipeSchedule; 4] = [PipeSchedule::OneFOneB, PipeSchedule::Overlap, PipeSchedule::DualPipe, PipeSchedule::DualPipeV];

    /// The name on the command line and in plans.
    pub fn name(self) -> &'static str {
        match self {
            PipeSchedule::OneFOneB => "1f1b",
            PipeSchedule::Overlap => "overlap",
            PipeSchedule::DualPipe => "dualpipe",
            PipeSchedule::DualPipeV => "dualpipev",
        }
    }

    /// Parses [`PipeSchedule::name`].
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == text)
    }

    /// Every name, for messages.
    pub fn names() -> String {
        Self::ALL.map(|s| s.name()).join(", ")
    }

    /// Whether the trainer runs it (`train --plan`).
    pub fn runs_in_trainer(self) -> bool {
        matches!(self, PipeSchedule::OneFOneB | PipeSchedule::Overlap)
    }

    /// Whether steady-state micro-batches run in overlapped pairs whose expert
    /// all-to-all hides under the other micro-batch's compute.
    pub fn pairs_micro_batches(self) -> bool {
        !matches!(self, PipeSchedule::OneFOneB)
    }

    /// Why the schedule cannot run `pp` stages with `vpp` chunks over `m` micro-batches,
    /// if it cannot.
    pub fn check(self, pp: usize, vpp: usize, m: usize) -> Result<(), String> {
        match self {
            PipeSchedule::OneFOneB | PipeSchedule::Overlap => Ok(()),
            PipeSchedule::DualPipe | PipeSchedule::DualPipeV => {
                if vpp > 1 {
                    Err(format!("{} runs its own chunks (vpp 1, not {vpp})", self.name()))
                } else if pp < 2 || !pp.is_multiple_of(2) {
                    Err(format!("{} needs an even pp ≥ 2, not {pp}", self.name()))
                } else if m < 2 * pp {
                    Err(format!("{} needs at least 2·pp = {} micro-batches, not {m}", self.name(), 2 * pp))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Seconds a step loses to the bubble, for a stage's forward + backward of one
    /// micro-batch taking `t_mb` (the table in the module docs).
    pub fn bubble(self, pp: usize, vpp: usize, t_mb: f64) -> f64 {
        if pp <= 1 {
            return 0.0;
        }
        match self {
            PipeSchedule::OneFOneB | PipeSchedule::Overlap => pipeline_bubble(pp, vpp, t_mb),
            PipeSchedule::DualPipe => (pp as f64 / 2.0 - 1.0) * 2.0 * t_mb / 3.0,
            PipeSchedule::DualPipeV => (pp - 1) as f64 * t_mb / 3.0,
        }
    }

    /// Stage micro-batches of activations the busiest device holds at once.
    pub fn in_flight(self, pp: usize, vpp: usize, m: usize) -> f64 {
        match self {
            PipeSchedule::OneFOneB => micro_batches_in_flight(pp, vpp, m),
            PipeSchedule::Overlap if pp == 1 => 1.0,
            PipeSchedule::Overlap => (micro_batches_in_flight(pp, vpp, m) + 1.0 / vpp as f64).min(m as f64),
            PipeSchedule::DualPipe => (pp + 1) as f64,
            PipeSchedule::DualPipeV => pp as f64 + 0.5,
        }
    }

    /// Copies of its stage's parameters a device keeps.
    pub fn parameter_copies(self) -> f64 {
        match self {
            PipeSchedule::DualPipe => 2.0,
            _ => 1.0,
        }
    }
}

/// Seconds 1F1B loses to the pipeline bubble: `(PP − 1)/VPP` micro-batch times
/// (interleaving over `VPP` chunks divides it). Checked against the schedules the
/// trainer runs (`ultramoe-schedule`) in `tests/schedule_agreement.rs`.
pub fn pipeline_bubble(pp: usize, vpp: usize, t_mb: f64) -> f64 {
    (pp - 1) as f64 / vpp as f64 * t_mb
}

/// Activations a device sends forward (and gradients it sends backward) per micro-batch:
/// one from each of its model chunks whose successor lives on another device — `VPP` on
/// a device in the middle of the pipeline, 0 without one. Checked against the schedules
/// in `tests/schedule_agreement.rs`.
pub fn sends_per_micro_batch(pp: usize, vpp: usize) -> usize {
    if pp <= 1 {
        0
    } else {
        vpp
    }
}

/// Micro-batches of a stage's layers whose activations the first stage holds at once
/// under 1F1B: `min(PP, m)`; interleaved `PP + (PP − 1)/VPP`, i.e. the factor
/// `1 + (PP−1)/(PP·VPP)` of Korthikanti et al. (2022). Checked against the schedules
/// in `tests/schedule_agreement.rs`.
pub fn micro_batches_in_flight(pp: usize, vpp: usize, micro: usize) -> f64 {
    match (pp, vpp) {
        (1, _) => 1.0,
        (_, 1) => (pp as f64).min(micro as f64),
        _ => (pp as f64 * (1.0 + (pp - 1) as f64 / (pp * vpp) as f64)).min(micro as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dualpipe_formulas_and_limits() {
        // PP 16, t = 3: DualPipe (8 − 1)·2 = 14, DualPipeV 15·1 = 15, 1F1B 15·3 = 45.
        assert_eq!(PipeSchedule::DualPipe.bubble(16, 1, 3.0), 14.0);
        assert_eq!(PipeSchedule::DualPipeV.bubble(16, 1, 3.0), 15.0);
        assert_eq!(PipeSchedule::OneFOneB.bubble(16, 1, 3.0), 45.0);
        assert_eq!(PipeSchedule::OneFOneB.bubble(16, 3, 3.0), 15.0);
        assert_eq!(PipeSchedule::DualPipe.in_flight(16, 1, 64), 17.0);
        assert_eq!(PipeSchedule::DualPipeV.in_flight(16, 1, 64), 16.5);
        assert_eq!(PipeSchedule::DualPipe.parameter_copies(), 2.0);
        assert_eq!(PipeSchedule::DualPipeV.parameter_copies(), 1.0);
        assert!(PipeSchedule::DualPipe.check(16, 1, 32).is_ok());
        for (pp, vpp, m, why) in [(3, 1, 12, "even pp"), (4, 2, 16, "vpp 1"), (4, 1, 7, "2·pp = 8")] {
            let e = PipeSchedule::DualPipe.check(pp, vpp, m).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        for s in PipeSchedule::ALL {
            assert_eq!(PipeSchedule::parse(s.name()), Some(s));
            assert_eq!(s.bubble(1, 1, 3.0), 0.0);
        }
        assert!(PipeSchedule::OneFOneB.runs_in_trainer() && PipeSchedule::Overlap.runs_in_trainer());
        assert!(!PipeSchedule::DualPipe.runs_in_trainer() && !PipeSchedule::DualPipeV.runs_in_trainer());
    }
}
