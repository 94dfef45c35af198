//! # ultramoe-schedule
//!
//! Pipeline-parallel schedules as data: for each pipeline rank, the ordered list of
//! forward and backward passes of (micro-batch, model chunk) it runs. One definition
//! serves the trainer's engine (which derives the point-to-point messages from the
//! neighbouring virtual stages) and the planner (which times the same lists), so the
//! pipeline the planner prices is the one that runs.
//!
//! Virtual stages: with `pp` ranks and `vpp` model chunks per rank, chunk `c` of rank `r`
//! is virtual stage `c·pp + r` (Megatron's interleaving), so consecutive layers go round
//! the ranks `vpp` times. A forward of micro-batch `i` at virtual stage `s > 0` needs the
//! forward of `i` at `s − 1`; a backward at `s` needs its own forward and, below the last
//! stage, the backward of `i` at `s + 1`.
//!
//! Schedules:
//! - **GPipe**: every forward, then every backward. In flight on each rank: `m·vpp`.
//! - **1F1B** (PipeDream-flush): rank `r` runs `min(pp − r − 1, m)` warm-up forwards, then
//!   alternates one forward and one backward, then drains. In flight: `min(pp − r, m)`.
//! - **Interleaved 1F1B** (`vpp > 1`; needs `m` a multiple of `pp`): forwards visit the
//!   chunks in groups of `pp` micro-batches, backwards the chunks in reverse; warm-up
//!   `(pp − r − 1)·2 + (vpp − 1)·pp` forwards (capped at `m·vpp`). In flight: warm-up + 1.
//! - **Overlapped 1F1B** (Megatron-Core's "combined 1F1B"): 1F1B (or interleaved 1F1B)
//!   with one more warm-up forward, so that in the steady state each forward is of a
//!   different micro-batch than the backward that follows it; the engine runs each such
//!   pair at once ([`Schedule::steps`]), so one micro-batch's expert all-to-all waits
//!   while the other computes. In flight: one more than the plain schedule's.
//!
//! With unit costs (a forward `f`, a backward `b`) the idle fraction of 1F1B is
//! `(pp − 1)/(m + pp − 1)` and interleaving divides the bubble by `vpp`; [`simulate`]
//! measures it for any costs.
#![deny(missing_docs)]

use std::fmt;

/// Which pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// all forwards, then all backwards (the reference)
    GPipe,
    /// one forward, one backward in the steady state (`vpp` 1), or interleaved over
    /// `vpp` model chunks per rank
    OneFOneB,
    /// 1F1B with each steady-state forward and backward run together (see the module
    /// docs)
    Overlapped,
}

impl Kind {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::GPipe => "gpipe",
            Kind::OneFOneB => "1f1b",
            Kind::Overlapped => "overlap",
        }
    }

    /// Parses [`Kind::name`].
    pub fn parse(text: &str) -> Option<Kind> {
        [Kind::GPipe, Kind::OneFOneB, Kind::Overlapped].into_iter().find(|k| k.name() == text)
    }
}

/// What a rank runs next: one pass, or a forward and a backward at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// one pass
    One(Action),
    /// a forward and a backward (of different micro-batches) together
    Pair(Action, Action),
}

/// One pass a rank runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// forward of a micro-batch through one of this rank's model chunks
    Forward {
        /// micro-batch
        mb: usize,
        /// model chunk on this rank (0-based)
        chunk: usize,
    },
    /// backward of a micro-batch through one of this rank's model chunks
    Backward {
        /// micro-batch
        mb: usize,
        /// model chunk on this rank
        chunk: usize,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward { mb, chunk } => write!(f, "F{mb}.{chunk}"),
            Action::Backward { mb, chunk } => write!(f, "B{mb}.{chunk}"),
        }
    }
}

/// A schedule's shape, or why it cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// pipeline ranks
    pub pp: usize,
    /// model chunks per rank
    pub vpp: usize,
    /// micro-batches per step
    pub micro_batches: usize,
}

/// Every rank's actions, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// the schedule
    pub kind: Kind,
    /// its shape
    pub shape: Shape,
    /// `ranks[r]`: what rank `r` runs, in order
    pub ranks: Vec<Vec<Action>>,
}

/// Builds `kind` for `shape`. Errors name the field and the reason.
pub fn build(kind: Kind, shape: Shape) -> Result<Schedule, String> {
    let Shape { pp, vpp, micro_batches: m } = shape;
    if pp == 0 || vpp == 0 || m == 0 {
        return Err("pp, vpp and the micro-batch count must be at least 1".into());
    }
    if kind != Kind::GPipe && vpp > 1 && !m.is_multiple_of(pp) {
        return Err(format!("interleaved 1F1B needs the micro-batch count ({m}) to be a multiple of pp ({pp})"));
    }
    let extra = usize::from(kind == Kind::Overlapped);
    let ranks = (0..pp)
        .map(|r| match kind {
            Kind::GPipe => gpipe(m, vpp),
            _ if vpp == 1 => one_f_one_b(r, pp, m, extra),
            _ => interleaved(r, pp, vpp, m, extra),
        })
        .collect();
    Ok(Schedule { kind, shape, ranks })
}

fn gpipe(m: usize, vpp: usize) -> Vec<Action> {
    let mut out: Vec<Action> = (0..vpp).flat_map(|chunk| (0..m).map(move |mb| Action::Forward { mb, chunk })).collect();
    out.extend((0..vpp).rev().flat_map(|chunk| (0..m).map(move |mb| Action::Backward { mb, chunk })));
    out
}

fn one_f_one_b(r: usize, pp: usize, m: usize, extra: usize) -> Vec<Action> {
    let warmup = (pp - r - 1 + extra).min(m);
    let mut out: Vec<Action> = (0..warmup).map(|mb| Action::Forward { mb, chunk: 0 }).collect();
    for i in 0..m - warmup {
        out.push(Action::Forward { mb: warmup + i, chunk: 0 });
        out.push(Action::Backward { mb: i, chunk: 0 });
    }
    out.extend((m - warmup..m).map(|mb| Action::Backward { mb, chunk: 0 }));
    out
}

/// The `k`-th forward (or backward, chunks reversed) of an interleaved rank: micro-batches
/// in groups of `pp`, each group through every chunk before the next group.
fn interleaved_slot(k: usize, pp: usize, vpp: usize, backward: bool) -> (usize, usize) {
    let group = k / (pp * vpp);
    let chunk = (k / pp) % vpp;
    let mb = group * pp + k % pp;
    (mb, if backward { vpp - 1 - chunk } else { chunk })
}

fn interleaved(r: usize, pp: usize, vpp: usize, m: usize, extra: usize) -> Vec<Action> {
    let total = m * vpp;
    let warmup = ((pp - r - 1) * 2 + (vpp - 1) * pp + extra).min(total);
    let f = |k| {
        let (mb, chunk) = interleaved_slot(k, pp, vpp, false);
        Action::Forward { mb, chunk }
    };
    let b = |k| {
        let (mb, chunk) = interleaved_slot(k, pp, vpp, true);
        Action::Backward { mb, chunk }
    };
    let mut out: Vec<Action> = (0..warmup).map(f).collect();
    for i in 0..total - warmup {
        out.push(f(warmup + i));
        out.push(b(i));
    }
    out.extend((total - warmup..total).map(b));
    out
}

impl Schedule {
    /// Virtual stage of `chunk` on `rank`.
    pub fn stage(&self, rank: usize, chunk: usize) -> usize {
        chunk * self.shape.pp + rank
    }

    /// The most forwards rank `rank` holds activations for at once (forwards run minus
    /// backwards run, maximised over its list).
    pub fn in_flight(&self, rank: usize) -> usize {
        let mut live: usize = 0;
        let mut most = 0;
        for a in &self.ranks[rank] {
            match a {
                Action::Forward { .. } => live += 1,
                Action::Backward { .. } => live = live.saturating_sub(1),
            }
            most = most.max(live);
        }
        most
    }

    /// The schedule's stated bound on [`Schedule::in_flight`] for `rank` (see the module
    /// docs): what the memory prediction multiplies a micro-batch's activations by.
    pub fn in_flight_bound(&self, rank: usize) -> usize {
        let Shape { pp, vpp, micro_batches: m } = self.shape;
        match self.kind {
            Kind::GPipe => m * vpp,
            Kind::OneFOneB if vpp == 1 => (pp - rank).min(m),
            Kind::OneFOneB => ((pp - rank - 1) * 2 + (vpp - 1) * pp + 1).min(m * vpp),
            Kind::Overlapped if vpp == 1 => (pp - rank + 1).min(m),
            Kind::Overlapped => ((pp - rank - 1) * 2 + (vpp - 1) * pp + 2).min(m * vpp),
        }
    }

    /// What rank `rank` runs, in order: its actions, with each steady-state forward and
    /// the backward after it joined into a [`Step::Pair`] under [`Kind::Overlapped`]
    /// (never a forward and a backward of the same micro-batch and chunk).
    pub fn steps(&self, rank: usize) -> Vec<Step> {
        let acts = &self.ranks[rank];
        let mut out = Vec::with_capacity(acts.len());
        let mut i = 0;
        while i < acts.len() {
            match (self.kind, acts[i], acts.get(i + 1)) {
                (Kind::Overlapped, f @ Action::Forward { mb, chunk }, Some(&b @ Action::Backward { mb: bm, chunk: bc })) if (mb, chunk) != (bm, bc) => {
                    out.push(Step::Pair(f, b));
                    i += 2;
                }
                (_, a, _) => {
                    out.push(Step::One(a));
                    i += 1;
                }
            }
        }
        out
    }

    /// One line per rank: `rank r: F0.0 F1.0 B0.0 …` (micro-batch.chunk); a forward and
    /// backward run together print as `F2.0+B0.0`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for r in 0..self.ranks.len() {
            let list: Vec<String> = self
                .steps(r)
                .iter()
                .map(|st| match st {
                    Step::One(a) => a.to_string(),
                    Step::Pair(f, b) => format!("{f}+{b}"),
                })
                .collect();
            s += &format!("rank {r}: {}\n", list.join(" "));
        }
        s
    }
}

/// What running a schedule with fixed pass costs gives.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// per rank, per action in list order: (start, end)
    pub spans: Vec<Vec<(f64, f64)>>,
    /// time from the first start to the last end
    pub makespan: f64,
}

impl Timeline {
    /// Fraction of the makespan rank `r` is idle.
    pub fn idle_fraction(&self, r: usize) -> f64 {
        let busy: f64 = self.spans[r].iter().map(|(a, b)| b - a).sum();
        1.0 - busy / self.makespan
    }
}

/// Runs `s` with a forward taking `forward` and a backward `backward` time units (per
/// chunk) and messages taking `transfer`: each action starts when its rank is free and
/// its inputs have arrived. `Err` names a dependency no order can satisfy (a deadlock)
/// or an action that is missing, repeated, or runs before its inputs exist.
pub fn simulate(s: &Schedule, forward: f64, backward: f64, transfer: f64) -> Result<Timeline, String> {
    let Shape { pp, vpp, micro_batches: m } = s.shape;
    let stages = pp * vpp;
    // Completion times of every (mb, stage) forward and backward, once run.
    let mut f_done = vec![vec![None::<f64>; stages]; m];
    let mut b_done = vec![vec![None::<f64>; stages]; m];
    let mut next = vec![0usize; pp];
    let mut free = vec![0.0f64; pp];
    let mut spans: Vec<Vec<(f64, f64)>> = vec![vec![]; pp];
    for (r, acts) in s.ranks.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        for a in acts {
            let (mb, chunk) = match *a {
                Action::Forward { mb, chunk } | Action::Backward { mb, chunk } => (mb, chunk),
            };
            if mb >= m || chunk >= vpp || !seen.insert(*a) {
                return Err(format!("rank {r}: action {a} is out of range or repeated"));
            }
        }
        if acts.len() != 2 * m * vpp {
            return Err(format!("rank {r}: {} actions, expected {}", acts.len(), 2 * m * vpp));
        }
    }
    let total: usize = s.ranks.iter().map(Vec::len).sum();
    let mut run = 0;
    while run < total {
        let mut progressed = false;
        for r in 0..pp {
            let Some(&a) = s.ranks[r].get(next[r]) else { continue };
            let ready = match a {
                Action::Forward { mb, chunk } => {
                    let st = s.stage(r, chunk);
                    if st == 0 {
                        Some(0.0)
                    } else {
                        f_done[mb][st - 1].map(|t| t + transfer)
                    }
                }
                Action::Backward { mb, chunk } => {
                    let st = s.stage(r, chunk);
                    let own = f_done[mb][st];
                    let above = if st + 1 == stages { own } else { b_done[mb][st + 1].map(|t| t + transfer) };
                    own.zip(above).map(|(x, y)| x.max(y))
                }
            };
            let Some(ready) = ready else { continue };
            let (start, cost) = (free[r].max(ready), if matches!(a, Action::Forward { .. }) { forward } else { backward });
            let end = start + cost;
            match a {
                Action::Forward { mb, chunk } => f_done[mb][s.stage(r, chunk)] = Some(end),
                Action::Backward { mb, chunk } => b_done[mb][s.stage(r, chunk)] = Some(end),
            }
            free[r] = end;
            spans[r].push((start, end));
            next[r] += 1;
            run += 1;
            progressed = true;
        }
        if !progressed {
            let stuck: Vec<String> = (0..pp).filter_map(|r| s.ranks[r].get(next[r]).map(|a| format!("rank {r} at {a}"))).collect();
            return Err(format!("deadlock: {}", stuck.join(", ")));
        }
    }
    let makespan = free.iter().cloned().fold(0.0, f64::max);
    Ok(Timeline { spans, makespan })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_runs_every_pass_once_after_its_inputs_within_its_bound() {
        let mut checked = 0;
        for pp in 1..=8 {
            for vpp in 1..=4 {
                for m in [1, 2, 3, 4, 5, 8, 12, 16, 17, 32] {
                    for kind in [Kind::GPipe, Kind::OneFOneB, Kind::Overlapped] {
                        let shape = Shape { pp, vpp, micro_batches: m };
                        let s = match build(kind, shape) {
                            Ok(s) => s,
                            Err(e) => {
                                assert!(kind != Kind::GPipe && vpp > 1 && m % pp != 0, "{shape:?}: {e}");
                                continue;
                            }
                        };
                        // Exactly once each, dependencies satisfiable (the simulation
                        // checks both, and that each backward follows its forward).
                        simulate(&s, 1.0, 2.0, 0.0).unwrap_or_else(|e| panic!("{kind:?} {shape:?}: {e}\n{}", s.render()));
                        for r in 0..pp {
                            let f = s.ranks[r].iter().filter(|a| matches!(a, Action::Forward { .. })).count();
                            assert_eq!(f, m * vpp, "{kind:?} {shape:?} rank {r}");
                            assert!(s.in_flight(r) <= s.in_flight_bound(r), "{kind:?} {shape:?} rank {r}: {} > {}", s.in_flight(r), s.in_flight_bound(r));
                            // Each rank's own backward of a chunk comes after its forward.
                            for (i, a) in s.ranks[r].iter().enumerate() {
                                if let Action::Backward { mb, chunk } = *a {
                                    assert!(s.ranks[r][..i].contains(&Action::Forward { mb, chunk }), "{kind:?} {shape:?} rank {r}: {a} before its forward");
                                }
                            }
                            // Steps cover the actions in order; a pair never joins a
                            // backward to its own forward.
                            let flat: Vec<Action> = s
                                .steps(r)
                                .into_iter()
                                .flat_map(|st| match st {
                                    Step::One(a) => vec![a],
                                    Step::Pair(f, b) => {
                                        let (Action::Forward { mb, chunk }, Action::Backward { mb: bm, chunk: bc }) = (f, b) else { panic!("pair {f} {b}") };
                                        assert!((mb, chunk) != (bm, bc));
                                        vec![f, b]
                                    }
                                })
                                .collect();
                            assert_eq!(flat, s.ranks[r]);
                        }
                        checked += 1;
                    }
                }
            }
        }
        // 8 × 4 × 10 shapes, three kinds, less the interleaved ones that need m % pp = 0.
        assert_eq!(checked, 484 + 484 - 320);
    }

    #[test]
    fn one_f_one_b_holds_pp_minus_rank_micro_batches() {
        let s = build(Kind::OneFOneB, Shape { pp: 4, vpp: 1, micro_batches: 8 }).unwrap();
        let held: Vec<usize> = (0..4).map(|r| s.in_flight(r)).collect();
        assert_eq!(held, vec![4, 3, 2, 1]);
        assert_eq!(s.render().lines().next().unwrap(), "rank 0: F0.0 F1.0 F2.0 F3.0 B0.0 F4.0 B1.0 F5.0 B2.0 F6.0 B3.0 F7.0 B4.0 B5.0 B6.0 B7.0");
        let g = build(Kind::GPipe, Shape { pp: 4, vpp: 1, micro_batches: 8 }).unwrap();
        assert_eq!(g.in_flight(0), 8);
        // Overlapped: one more warm-up forward; the last rank pairs F(i+1) with B(i).
        let o = build(Kind::Overlapped, Shape { pp: 4, vpp: 1, micro_batches: 8 }).unwrap();
        assert_eq!((0..4).map(|r| o.in_flight(r)).collect::<Vec<_>>(), vec![5, 4, 3, 2]);
        assert_eq!(o.render().lines().nth(3).unwrap(), "rank 3: F0.0 F1.0+B0.0 F2.0+B1.0 F3.0+B2.0 F4.0+B3.0 F5.0+B4.0 F6.0+B5.0 F7.0+B6.0 B7.0");
    }

    #[test]
    fn bubbles_follow_the_formulas() {
        // Unit costs with backward = forward: 1F1B's idle fraction is (p−1)/(m+p−1) on
        // every rank; interleaving over v chunks divides the bubble (p−1) by v.
        for (pp, m) in [(2, 4), (4, 8), (4, 16), (8, 32)] {
            let s = build(Kind::OneFOneB, Shape { pp, vpp: 1, micro_batches: m }).unwrap();
            let t = simulate(&s, 1.0, 1.0, 0.0).unwrap();
            let formula = (pp - 1) as f64 / (m + pp - 1) as f64;
            for r in 0..pp {
                assert!((t.idle_fraction(r) - formula).abs() < 1e-9, "pp {pp} m {m} rank {r}: {} vs {formula}", t.idle_fraction(r));
            }
            for vpp in [2, 4] {
                let s = build(Kind::OneFOneB, Shape { pp, vpp, micro_batches: m }).unwrap();
                let t = simulate(&s, 1.0 / vpp as f64, 1.0 / vpp as f64, 0.0).unwrap();
                // Work per rank is 2m; the bubble (p−1)·2/v.
                let expected = 2.0 * (pp - 1) as f64 / vpp as f64 / (2.0 * m as f64 + 2.0 * (pp - 1) as f64 / vpp as f64);
                assert!((t.idle_fraction(0) - expected).abs() < 1e-9, "pp {pp} vpp {vpp} m {m}: {} vs {expected}", t.idle_fraction(0));
            }
        }
    }

    #[test]
    fn shapes_that_cannot_run_are_refused() {
        assert!(build(Kind::OneFOneB, Shape { pp: 4, vpp: 2, micro_batches: 6 }).unwrap_err().contains("multiple of pp"));
        assert!(build(Kind::GPipe, Shape { pp: 0, vpp: 1, micro_batches: 6 }).is_err());
        // A hand-made order that deadlocks is caught.
        let mut s = build(Kind::OneFOneB, Shape { pp: 2, vpp: 1, micro_batches: 2 }).unwrap();
        s.ranks[1].swap(0, 1);
        assert!(simulate(&s, 1.0, 2.0, 0.0).unwrap_err().contains("deadlock"));
    }
}
