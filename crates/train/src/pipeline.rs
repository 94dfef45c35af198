//! The pipeline engine: runs one rank's list of a pipeline schedule
//! ([`ultramoe_schedule`]) — forwards and backwards of (micro-batch, model chunk) — for
//! one training step. Without pipeline parallelism the list is `F0 B0 F1 B1 …`, the
//! plain gradient-accumulation loop, so one engine runs every layout.
//!
//! A forward of micro-batch `i` through virtual stage `v` takes its input from the
//! embedding (`v = 0`) or from the rank holding `v − 1`, and sends its output to the rank
//! holding `v + 1` — or, at the last stage, runs the head. A backward takes its output
//! gradient from the loss (last stage) or from the rank holding `v + 1`, and sends its
//! input gradient down (or, at `v = 0`, finishes the embedding's gradient). Messages go
//! over the pipeline group with tag `2·(i·V + v) + direction`; a send returns at once, so
//! any order the schedule's simulation accepts runs without deadlock.
//!
//! Every stage runs its micro-batches' backwards in micro-batch order, so each weight's
//! gradient is accumulated in the single rank's order: a pipeline changes no gradient.
//!
//! Under the overlapped schedule the forwards run on a second thread over a second
//! expert-exchange lane while the backwards run on this one, each lane in list order and
//! the forwards at most the schedule's in-flight bound ahead: while one pass waits for
//! its all-to-all (or a message) the other computes.

use crate::data::batch::Batch;
use crate::trace::{PassKind, PassTrace};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;
use ultramoe_dist::{CommError, ProcessGroup};
use ultramoe_model::model::{ChunkForward, HeadForward};
use ultramoe_model::moe::dispatcher::{ExpertExchange, LaneClock};
use ultramoe_model::{Error, Model, PassOptions, Result};
use ultramoe_schedule::{Action, Kind, Schedule};

/// What the step's passes are told as they progress.
pub trait Hooks {
    /// Held layer `layer` ([`Model::layers`] index) finished a forward; `first` is the
    /// step's first forward.
    fn forward_layer_done(&mut self, _first: bool, _layer: usize) {}
    /// Held layer `layer` finished a backward, leaving its gradient in `g`; `last` is the
    /// last backward of that layer's chunk in the step (its gradient is complete), `final`
    /// the step's last backward.
    fn backward_layer_done(&mut self, _g: &[f32], _last: bool, _final_backward: bool, _layer: usize) {}
}

/// No hooks.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// One pipeline rank's view of a step.
pub struct Pipeline<'a> {
    /// this rank's share of the model
    pub model: &'a Model,
    /// its weights
    pub w: &'a [f32],
    /// how passes run
    pub pass: &'a PassOptions,
    /// the pipeline group (`None`: one stage)
    pub pp: Option<&'a Arc<dyn ProcessGroup>>,
    /// a second expert-parallel exchange for forwards that run beside a backward
    /// (overlapped schedule)
    pub forward_lane: Option<&'a ExpertExchange>,
    /// the thread pool the overlapped schedule's forward lane computes on (the trainer
    /// gives one whenever the schedule is overlapped; `None`: whatever pool the lane's
    /// thread reaches). The step's thread holds a worker of its own pool while it waits
    /// for the forward lane, so the lane must not need that pool.
    pub lane_pool: Option<&'a rayon::ThreadPool>,
    /// the step's micro-batches (every rank draws the same global ones)
    pub micro: &'a [Batch],
    /// this rank's rows of each micro-batch
    pub rows: Range<usize>,
    /// loss scale (`1 / target tokens of the step`)
    pub scale: f32,
    /// time this rank's lanes wait for other stages (all of them at once: idle)
    pub waits: LaneClock,
    /// the step's passes as intervals (for the pipeline timeline)
    pub trace: PassTrace,
}

/// What a step's passes produced on this rank.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// `Σ CE` over this rank's target tokens (last stage only; 0 elsewhere)
    pub ce: f64,
    /// the MoE layers' auxiliary losses, summed
    pub aux: f64,
    /// per held MoE layer, tokens routed to each expert
    pub counts: Vec<Vec<usize>>,
    /// per held MoE layer, rows routed to each expert slot
    pub slot_counts: Vec<Vec<usize>>,
    /// saved activations of the largest micro-batch (all chunks, the head included)
    pub activation_bytes: usize,
    /// seconds from the first pass to the last
    pub span_s: f64,
    /// of which waiting for another stage's activations or gradients
    pub idle_s: f64,
    /// the passes as intervals
    pub events: Vec<crate::trace::PassEvent>,
}

/// One forward's results.
struct Forwarded {
    chunk: ChunkForward,
    head: Option<HeadForward>,
}

fn comm(e: CommError) -> Error {
    Error::msg(format!("distributed run failed: {e}"))
}

/// Adds per-layer counts at `at` into a running total.
fn add_counts(total: &mut [Vec<usize>], at: usize, counts: Vec<Vec<usize>>) {
    for (acc, layer) in total[at..].iter_mut().zip(counts) {
        if acc.is_empty() {
            *acc = layer;
        } else {
            acc.iter_mut().zip(layer).for_each(|(a, x)| *a += x);
        }
    }
}

impl Pipeline<'_> {
    fn stages(&self) -> usize {
        self.model.stage.virtual_stages()
    }

    /// Message tag of micro-batch `mb` at virtual stage `v`, forward (0) or backward (1).
    fn tag(&self, mb: usize, v: usize, backward: bool) -> u32 {
        (2 * (mb * self.stages() + v) + usize::from(backward)) as u32
    }

    fn holder(&self, v: usize) -> usize {
        v % self.model.stage.ranks
    }

    /// Receives micro-batch `mb`'s message from virtual stage `src_v` for a pass of
    /// `chunk`.
    fn recv(&self, src_v: usize, tag: u32, mb: usize, chunk: usize) -> Result<Vec<f32>> {
        let g = self.pp.expect("a pipeline of several stages has a group");
        let _p = ultramoe_kernels::profile::scope("pipeline.recv");
        self.trace.span(PassKind::Wait, mb, chunk, || self.idle(|| g.recv_f32(self.holder(src_v), tag))).map_err(comm)
    }

    /// Runs `wait`, for another stage or the other lane: the stage's idle clock, and time
    /// in which this lane hides none of the other lane's exchanges.
    fn idle<T>(&self, wait: impl FnOnce() -> T) -> T {
        match self.model.exchange.as_deref() {
            Some(ex) => self.waits.waiting(|| ex.stats.lanes.waiting_elsewhere(wait)),
            None => self.waits.waiting(wait),
        }
    }

    fn send(&self, dst_v: usize, data: &[f32], tag: u32, mb: usize, chunk: usize) -> Result<()> {
        let g = self.pp.expect("a pipeline of several stages has a group");
        let _p = ultramoe_kernels::profile::scope("pipeline.send");
        self.trace.span(PassKind::Send, mb, chunk, || g.send_f32(data, self.holder(dst_v), tag)).map_err(comm)
    }

    /// This rank's token ids of micro-batch `mb`.
    fn ids(&self, mb: usize) -> &[u32] {
        let t = self.micro[mb].t;
        &self.micro[mb].ids[self.rows.start * t..self.rows.end * t]
    }

    /// This rank's document positions of micro-batch `mb` (packed rows).
    fn positions(&self, mb: usize) -> Option<&[u32]> {
        let t = self.micro[mb].t;
        self.micro[mb].positions.as_deref().map(|p| &p[self.rows.start * t..self.rows.end * t])
    }

    fn targets(&self, mb: usize) -> &[i32] {
        let t = self.micro[mb].t;
        &self.micro[mb].targets[self.rows.start * t..self.rows.end * t]
    }

    fn forward(&self, mb: usize, chunk: usize, ex: Option<&ExpertExchange>, done: &mut dyn FnMut(usize)) -> Result<Forwarded> {
        let _p = ultramoe_kernels::profile::scope("forward");
        self.trace.span(PassKind::Forward, mb, chunk, || {
            let v = self.model.stage.virtual_stage(chunk);
            let (b, t) = (self.rows.len(), self.micro[mb].t);
            let x = if v == 0 { self.model.embed_forward(self.w, self.ids(mb)) } else { self.recv(v - 1, self.tag(mb, v, false), mb, chunk)? };
            let (y, cf) = self.model.chunk_forward(self.w, x, chunk, b, t, self.positions(mb), self.pass, ex, done);
            let head = if v + 1 == self.stages() {
                Some(self.model.head_forward_for_training(self.w, y, self.pass))
            } else {
                self.send(v + 1, &y, self.tag(mb, v + 1, false), mb, chunk)?;
                None
            };
            Ok(Forwarded { chunk: cf, head })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        g: &mut [f32],
        mb: usize,
        fwd: Forwarded,
        ex: Option<&ExpertExchange>,
        done: &mut dyn FnMut(&[f32], usize),
    ) -> Result<f64> {
        let _p = ultramoe_kernels::profile::scope("backward");
        let chunk = fwd.chunk.chunk;
        self.trace.span(PassKind::Backward, mb, chunk, || {
            let v = self.model.stage.virtual_stage(chunk);
            let mut ce = 0.0;
            let dy = match fwd.head {
                Some(mut head) => {
                    let (loss, _, dx) = self.model.head_backward(self.w, g, &mut head, self.targets(mb), self.scale);
                    ce = loss;
                    dx
                }
                None => self.recv(v + 1, self.tag(mb, v, true), mb, chunk)?,
            };
            let dx = self.model.chunk_backward(self.w, g, fwd.chunk, dy, self.pass, ex, done);
            if v == 0 {
                self.model.embed_backward(g, &dx, self.ids(mb));
            } else {
                self.send(v - 1, &dx, self.tag(mb, v - 1, true), mb, chunk)?;
            }
            Ok(ce)
        })
    }

    /// Runs this rank's list of `schedule`, accumulating gradients into `g`: in order,
    /// or — under the overlapped schedule — as two lanes (see [`Pipeline::run_lanes`]).
    pub fn run(&self, schedule: &Schedule, g: &mut [f32], hooks: &mut dyn Hooks) -> Result<StepOutput> {
        let rank = self.model.stage.rank;
        let actions = &schedule.ranks[rank];
        let start = Instant::now();
        let mut tally = Tally::new(self.model);
        let ce = match schedule.kind {
            Kind::Overlapped => self.run_lanes(actions, schedule.in_flight_bound(rank), g, hooks, &mut tally)?,
            _ => self.run_in_order(actions, g, hooks, &mut tally)?,
        };
        Ok(StepOutput {
            ce,
            aux: tally.aux,
            counts: tally.counts,
            slot_counts: tally.slot_counts,
            activation_bytes: tally.most_bytes,
            span_s: start.elapsed().as_secs_f64(),
            idle_s: self.waits.take_exposed(),
            events: self.trace.take(),
        })
    }

    /// The chunks whose last backward in `actions` is of micro-batch `mb`, and the
    /// step's last backward: when hooks learn that gradients are complete.
    fn last_backwards(&self, actions: &[Action]) -> (Vec<Option<usize>>, Option<(usize, usize)>) {
        let last = (0..self.model.stage.vpp)
            .map(|c| actions.iter().filter_map(|a| match a { Action::Backward { mb, chunk } if *chunk == c => Some(*mb), _ => None }).next_back())
            .collect();
        let fin = actions.iter().rev().find_map(|a| match a { Action::Backward { mb, chunk } => Some((*mb, *chunk)), _ => None });
        (last, fin)
    }

    /// Every action in list order on this thread.
    /// Returns `Σ CE` of the backwards.
    fn run_in_order(&self, actions: &[Action], g: &mut [f32], hooks: &mut dyn Hooks, tally: &mut Tally) -> Result<f64> {
        let (last_backward, fin) = self.last_backwards(actions);
        let mut live: HashMap<(usize, usize), Forwarded> = HashMap::new();
        let (mut first, mut ce) = (true, 0.0);
        for a in actions {
            match *a {
                Action::Forward { mb, chunk } => {
                    let is_first = std::mem::take(&mut first);
                    let f = self.forward(mb, chunk, self.model.exchange.as_deref(), &mut |l| hooks.forward_layer_done(is_first, l))?;
                    tally.record(mb, &f);
                    live.insert((mb, chunk), f);
                }
                Action::Backward { mb, chunk } => {
                    let f = live.remove(&(mb, chunk)).expect("a backward follows its forward");
                    let (last, fin) = (last_backward[chunk] == Some(mb), fin == Some((mb, chunk)));
                    ce += self.backward(g, mb, f, self.model.exchange.as_deref(), &mut |g, l| hooks.backward_layer_done(g, last, fin, l))?;
                    tally.done(mb);
                }
            }
        }
        debug_assert!(live.is_empty(), "every forward has had its backward");
        Ok(ce)
    }

    /// The overlapped schedule: the forwards of `actions` on a second thread over the
    /// second exchange lane, the backwards on this one, each lane in list order (so each
    /// lane's collectives match on every rank of the expert-parallel group), the
    /// forwards at most `bound` micro-batch chunks ahead of the backwards (the
    /// schedule's in-flight bound). While one lane waits for an all-to-all or a message
    /// the other computes. Gradients accumulate in the backward lane, in list order: the
    /// same numbers as running the list in order.
    fn run_lanes(&self, actions: &[Action], bound: usize, g: &mut [f32], hooks: &mut dyn Hooks, tally: &mut Tally) -> Result<f64> {
        let (last_backward, fin) = self.last_backwards(actions);
        let forwards: Vec<(usize, usize)> = actions.iter().filter_map(|a| match *a { Action::Forward { mb, chunk } => Some((mb, chunk)), _ => None }).collect();
        let backwards: Vec<(usize, usize)> = actions.iter().filter_map(|a| match *a { Action::Backward { mb, chunk } => Some((mb, chunk)), _ => None }).collect();
        let model = self.model;
        let lane = self.forward_lane.or(model.exchange.as_deref());
        let stats = model.exchange.as_ref().map(|e| e.stats.clone());
        let lanes = |on: bool| {
            for clock in stats.iter().map(|s| &s.lanes).chain([&self.waits]) {
                if on {
                    clock.start_lane()
                } else {
                    clock.end_lane()
                }
            }
        };
        struct Shared {
            ready: HashMap<(usize, usize), Forwarded>,
            in_flight: usize,
            /// a lane failed: the other stops waiting
            failed: bool,
        }
        let shared = std::sync::Mutex::new(Shared { ready: HashMap::new(), in_flight: 0, failed: false });
        let cv = std::sync::Condvar::new();
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        // A lane's end: off the clocks, and — when it failed — the other lane told.
        let lane_ended = |ok: bool| {
            lanes(false);
            if !ok {
                lock().failed = true;
                cv.notify_all();
            }
        };
        // (forward hooks are not called on the forward lane: the swapped moments' write
        // is then waited for when they are read back, after the step's passes)
        let (forward_out, backward_out) = std::thread::scope(|s| {
            lanes(true);
            lanes(true);
            let forward_lane = std::thread::Builder::new()
                .name("ultramoe-forward-lane".into())
                .spawn_scoped(s, || {
                    let body = || -> Result<Tally> {
                        crate::trace::set_lane(1);
                        let mut t = Tally::new(model);
                        for &(mb, chunk) in &forwards {
                            let admitted = self.idle(|| {
                                let mut st = cv.wait_while(lock(), |st| st.in_flight >= bound && !st.failed).unwrap_or_else(|e| e.into_inner());
                                st.in_flight += usize::from(!st.failed);
                                !st.failed
                            });
                            if !admitted {
                                return Ok(t);
                            }
                            let f = self.forward(mb, chunk, lane, &mut |_| {})?;
                            t.record(mb, &f);
                            lock().ready.insert((mb, chunk), f);
                            cv.notify_all();
                        }
                        Ok(t)
                    };
                    match self.lane_pool {
                        Some(pool) => pool.install(|| guarded(body, lane_ended)),
                        None => guarded(body, lane_ended),
                    }
                })
                .expect("start the forward lane");
            let body = || -> Result<f64> {
                let mut ce = 0.0;
                for &(mb, chunk) in &backwards {
                    let ready = self.idle(|| cv.wait_while(lock(), |st| !st.ready.contains_key(&(mb, chunk)) && !st.failed).unwrap_or_else(|e| e.into_inner()).ready.remove(&(mb, chunk)));
                    let Some(f) = ready else { return Ok(ce) };
                    let (last, fin) = (last_backward[chunk] == Some(mb), fin == Some((mb, chunk)));
                    ce += self.backward(g, mb, f, model.exchange.as_deref(), &mut |g, l| hooks.backward_layer_done(g, last, fin, l))?;
                    lock().in_flight -= 1;
                    cv.notify_all();
                }
                Ok(ce)
            };
            let b = guarded(body, lane_ended);
            let f = forward_lane.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (f, b)
        });
        // A panic (a failed all-to-all unwinds with its error) continues on this thread,
        // where the trainer turns it back into an error.
        let ce = backward_out.unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        let forward_tally = forward_out.unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        tally.merge(forward_tally);
        Ok(ce)
    }
}

/// Runs a lane's `body`, catching a panic (a failed all-to-all unwinds with its error),
/// then tells `ended` whether it succeeded.
fn guarded<T>(body: impl FnOnce() -> Result<T>, ended: impl Fn(bool)) -> std::thread::Result<Result<T>> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    ended(matches!(r, Ok(Ok(_))));
    r
}

/// What the forwards of a step report: auxiliary losses (summed in forward order), loads
/// per held MoE layer, and the largest micro-batch's saved activations.
struct Tally {
    moe_before: Vec<usize>,
    aux: f64,
    counts: Vec<Vec<usize>>,
    slot_counts: Vec<Vec<usize>>,
    bytes: HashMap<usize, usize>,
    most_bytes: usize,
}

impl Tally {
    fn new(model: &Model) -> Tally {
        let is_moe = |l: &ultramoe_model::decoder::DecoderLayer| matches!(l.ffn, ultramoe_model::decoder::FfnBlock::Moe(_));
        // Held MoE layers before each chunk's first, to place its counts.
        let moe_before = (0..model.stage.vpp).map(|c| model.layers[..model.chunk_layers(c).start].iter().filter(|l| is_moe(l)).count()).collect();
        let n = model.layers.iter().filter(|l| is_moe(l)).count();
        Tally { moe_before, aux: 0.0, counts: vec![vec![]; n], slot_counts: vec![vec![]; n], bytes: HashMap::new(), most_bytes: 0 }
    }

    fn record(&mut self, mb: usize, f: &Forwarded) {
        let c = f.chunk.chunk;
        self.aux += f.chunk.aux_loss() as f64;
        add_counts(&mut self.counts, self.moe_before[c], f.chunk.expert_counts());
        add_counts(&mut self.slot_counts, self.moe_before[c], f.chunk.slot_counts());
        let b = self.bytes.entry(mb).or_default();
        *b += f.chunk.activation_bytes() + f.head.as_ref().map_or(0, |h| h.bytes());
        self.most_bytes = self.most_bytes.max(*b);
    }

    fn done(&mut self, mb: usize) {
        self.bytes.remove(&mb);
    }

    fn merge(&mut self, other: Tally) {
        self.aux += other.aux;
        for (i, c) in other.counts.into_iter().enumerate() {
            add_counts(&mut self.counts, i, vec![c]);
        }
        for (i, c) in other.slot_counts.into_iter().enumerate() {
            add_counts(&mut self.slot_counts, i, vec![c]);
        }
        self.most_bytes = self.most_bytes.max(other.most_bytes);
    }
}
