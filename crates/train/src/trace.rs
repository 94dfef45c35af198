//! A step's passes as intervals on this rank's clock — forwards, backwards, waits for
//! another stage's message, sends — for the pipeline timeline of `ultramoe report`.
//!
//! Recording costs one lock and one push per interval (a few dozen per step): it is
//! always on, and the trainer gathers the stages' traces of one step.

use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::Mutex;
use std::time::Instant;

/// What an interval was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassKind {
    /// a forward of one micro-batch through one model chunk
    Forward,
    /// its backward
    Backward,
    /// inside a pass: waiting for another stage's activations or gradients
    Wait,
    /// inside a pass: handing activations or gradients to another stage
    Send,
}

impl PassKind {
    const ALL: [PassKind; 4] = [PassKind::Forward, PassKind::Backward, PassKind::Wait, PassKind::Send];

    /// A small code for the trainer's numeric gather.
    pub fn code(self) -> usize {
        self as usize
    }

    /// The kind of a [`PassKind::code`].
    pub fn from_code(c: usize) -> Option<PassKind> {
        PassKind::ALL.get(c).copied()
    }
}

/// One interval of a rank's step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PassEvent {
    /// pipeline stage (filled in by the gather; 0 on the rank itself)
    pub stage: usize,
    /// 0: the main lane (every pass, or the backwards under the overlapped schedule);
    /// 1: the overlapped schedule's forward lane
    pub lane: usize,
    /// what it was
    pub kind: PassKind,
    /// micro-batch
    pub mb: usize,
    /// model chunk (virtual stage `chunk · PP + stage`)
    pub chunk: usize,
    /// seconds since the step's passes began, on this rank's clock
    pub start_s: f64,
    /// end, likewise
    pub end_s: f64,
}

/// Numbers per event in the gather: stage, lane, kind, mb, chunk, start, end, present.
pub const EVENT_WORDS: usize = 8;

impl PassEvent {
    /// The event as [`EVENT_WORDS`] numbers (the last is 1: present).
    pub fn to_words(&self) -> [f64; EVENT_WORDS] {
        [self.stage as f64, self.lane as f64, self.kind.code() as f64, self.mb as f64, self.chunk as f64, self.start_s, self.end_s, 1.0]
    }

    /// An event from [`PassEvent::to_words`] (`None` for an empty slot).
    pub fn from_words(w: &[f64]) -> Option<PassEvent> {
        (w.len() == EVENT_WORDS && w[7] == 1.0).then_some(())?;
        Some(PassEvent {
            stage: w[0] as usize,
            lane: w[1] as usize,
            kind: PassKind::from_code(w[2] as usize)?,
            mb: w[3] as usize,
            chunk: w[4] as usize,
            start_s: w[5],
            end_s: w[6],
        })
    }
}

thread_local! {
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as lane `lane` for the events it records.
pub(crate) fn set_lane(lane: usize) {
    LANE.with(|l| l.set(lane));
}

/// The intervals of one step on one rank.
#[derive(Debug)]
pub struct PassTrace {
    start: Instant,
    events: Mutex<Vec<PassEvent>>,
}

impl Default for PassTrace {
    fn default() -> Self {
        PassTrace { start: Instant::now(), events: Mutex::new(Vec::new()) }
    }
}

impl PassTrace {
    /// Runs `f`, recording it as an interval of `kind` for (`mb`, `chunk`) on the calling
    /// thread's lane.
    pub fn span<T>(&self, kind: PassKind, mb: usize, chunk: usize, f: impl FnOnce() -> T) -> T {
        let t0 = self.start.elapsed().as_secs_f64();
        let out = f();
        let end_s = self.start.elapsed().as_secs_f64();
        let lane = LANE.with(|l| l.get());
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(PassEvent { stage: 0, lane, kind, mb, chunk, start_s: t0, end_s });
        out
    }

    /// The recorded intervals, in the order they ended.
    pub fn take(&self) -> Vec<PassEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_nest_in_time_and_carry_their_lane() {
        let t = PassTrace::default();
        t.span(PassKind::Forward, 3, 1, || t.span(PassKind::Wait, 3, 1, || std::thread::sleep(std::time::Duration::from_millis(2))));
        std::thread::scope(|s| {
            s.spawn(|| {
                set_lane(1);
                t.span(PassKind::Backward, 0, 0, || ());
            });
        });
        let e = t.take();
        assert_eq!(e.len(), 3);
        let (wait, fwd, bwd) = (e[0], e[1], e[2]);
        assert_eq!((wait.kind, fwd.kind, bwd.kind), (PassKind::Wait, PassKind::Forward, PassKind::Backward));
        assert!(fwd.start_s <= wait.start_s && wait.end_s <= fwd.end_s);
        assert!(wait.end_s - wait.start_s >= 0.002);
        assert_eq!((fwd.lane, bwd.lane, fwd.mb, fwd.chunk), (0, 1, 3, 1));
        assert!(t.take().is_empty());
    }

    #[test]
    fn events_survive_the_numeric_gather() {
        let e = PassEvent { stage: 2, lane: 1, kind: PassKind::Send, mb: 7, chunk: 1, start_s: 0.25, end_s: 0.5 };
        assert_eq!(PassEvent::from_words(&e.to_words()), Some(e));
        assert_eq!(PassEvent::from_words(&[0.0; EVENT_WORDS]), None);
    }
}
