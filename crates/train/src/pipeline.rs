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
//! Under the overlapped schedule a steady-state pair (a forward and a backward of
//! different micro-batches) runs at once: the backward on this thread over the model's
//! expert exchange, the forward on a second thread over a second exchange lane, so
//! while one pass waits for its all-to-all the other computes.

use crate::data::batch::Batch;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ultramoe_dist::{CommError, ProcessGroup};
use ultramoe_model::model::{ChunkForward, HeadForward};
use ultramoe_model::moe::dispatcher::ExpertExchange;
use ultramoe_model::{Error, Model, PassOptions, Result};
use ultramoe_schedule::{Action, Step};

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
    /// the step's micro-batches (every rank draws the same global ones)
    pub micro: &'a [Batch],
    /// this rank's rows of each micro-batch
    pub rows: Range<usize>,
    /// loss scale (`1 / target tokens of the step`)
    pub scale: f32,
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
}

/// One forward's results.
struct Forwarded {
    chunk: ChunkForward,
    head: Option<HeadForward>,
    waited: Duration,
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

    fn recv(&self, src_v: usize, tag: u32) -> Result<(Vec<f32>, Duration)> {
        let g = self.pp.expect("a pipeline of several stages has a group");
        let t = Instant::now();
        let _p = ultramoe_kernels::profile::scope("pipeline.recv");
        let x = g.recv_f32(self.holder(src_v), tag).map_err(comm)?;
        Ok((x, t.elapsed()))
    }

    fn send(&self, dst_v: usize, data: &[f32], tag: u32) -> Result<()> {
        let g = self.pp.expect("a pipeline of several stages has a group");
        let _p = ultramoe_kernels::profile::scope("pipeline.send");
        g.send_f32(data, self.holder(dst_v), tag).map_err(comm)
    }

    /// This rank's token ids of micro-batch `mb`.
    fn ids(&self, mb: usize) -> &[u32] {
        let t = self.micro[mb].t;
        &self.micro[mb].ids[self.rows.start * t..self.rows.end * t]
    }

    fn targets(&self, mb: usize) -> &[i32] {
        let t = self.micro[mb].t;
        &self.micro[mb].targets[self.rows.start * t..self.rows.end * t]
    }

    fn forward(&self, mb: usize, chunk: usize, ex: Option<&ExpertExchange>, done: &mut dyn FnMut(usize)) -> Result<Forwarded> {
        let _p = ultramoe_kernels::profile::scope("forward");
        let v = self.model.stage.virtual_stage(chunk);
        let (b, t) = (self.rows.len(), self.micro[mb].t);
        let (x, waited) = if v == 0 { (self.model.embed_forward(self.w, self.ids(mb)), Duration::ZERO) } else { self.recv(v - 1, self.tag(mb, v, false))? };
        let (y, cf) = self.model.chunk_forward(self.w, x, chunk, b, t, self.pass, ex, done);
        let head = if v + 1 == self.stages() {
            Some(self.model.head_forward(self.w, y))
        } else {
            self.send(v + 1, &y, self.tag(mb, v + 1, false))?;
            None
        };
        Ok(Forwarded { chunk: cf, head, waited })
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        g: &mut [f32],
        mb: usize,
        fwd: Forwarded,
        ex: Option<&ExpertExchange>,
        done: &mut dyn FnMut(&[f32], usize),
    ) -> Result<(f64, Duration)> {
        let _p = ultramoe_kernels::profile::scope("backward");
        let v = self.model.stage.virtual_stage(fwd.chunk.chunk);
        let (mut ce, mut waited) = (0.0, Duration::ZERO);
        let dy = match fwd.head {
            Some(mut head) => {
                let (loss, _, dx) = self.model.head_backward(self.w, g, &mut head, self.targets(mb), self.scale);
                ce = loss;
                dx
            }
            None => {
                let (dy, w) = self.recv(v + 1, self.tag(mb, v, true))?;
                waited = w;
                dy
            }
        };
        let dx = self.model.chunk_backward(self.w, g, fwd.chunk, dy, self.pass, ex, done);
        if v == 0 {
            self.model.embed_backward(g, &dx, self.ids(mb));
        } else {
            self.send(v - 1, &dx, self.tag(mb, v - 1, true))?;
        }
        Ok((ce, waited))
    }

    /// Runs `steps` (this rank's schedule), accumulating gradients into `g`.
    pub fn run(&self, steps: &[Step], g: &mut [f32], hooks: &mut dyn Hooks) -> Result<StepOutput> {
        let start = Instant::now();
        let model = self.model;
        // Held MoE layers before each chunk's first, to place its counts.
        let chunks = model.stage.vpp;
        let moe_before: Vec<usize> = (0..chunks)
            .map(|c| model.layers[..model.chunk_layers(c).start].iter().filter(|l| matches!(l.ffn, ultramoe_model::decoder::FfnBlock::Moe(_))).count())
            .collect();
        let n_moe = model.layers.iter().filter(|l| matches!(l.ffn, ultramoe_model::decoder::FfnBlock::Moe(_))).count();
        let mut out = StepOutput { counts: vec![vec![]; n_moe], slot_counts: vec![vec![]; n_moe], ..StepOutput::default() };
        let actions: Vec<Action> = steps.iter().flat_map(|s| match *s {
            Step::One(a) => vec![a],
            Step::Pair(f, b) => vec![f, b],
        }).collect();
        // The last backward of each chunk completes its layers' gradients.
        let last_backward: Vec<Option<usize>> = (0..chunks)
            .map(|c| actions.iter().filter_map(|a| match a { Action::Backward { mb, chunk } if *chunk == c => Some(*mb), _ => None }).next_back())
            .collect();
        let final_mb_chunk = actions.iter().rev().find_map(|a| match a { Action::Backward { mb, chunk } => Some((*mb, *chunk)), _ => None });
        let mut live: HashMap<(usize, usize), Forwarded> = HashMap::new();
        let mut bytes: HashMap<usize, usize> = HashMap::new();
        let mut first = true;
        let mut idle = Duration::ZERO;
        let record = |out: &mut StepOutput, bytes: &mut HashMap<usize, usize>, mb: usize, f: &Forwarded| {
            let c = f.chunk.chunk;
            out.aux += f.chunk.aux_loss() as f64;
            add_counts(&mut out.counts, moe_before[c], f.chunk.expert_counts());
            add_counts(&mut out.slot_counts, moe_before[c], f.chunk.slot_counts());
            let b = bytes.entry(mb).or_default();
            *b += f.chunk.activation_bytes() + f.head.as_ref().map_or(0, |h| h.bytes());
            out.activation_bytes = out.activation_bytes.max(*b);
        };
        for step in steps {
            match *step {
                Step::One(Action::Forward { mb, chunk }) => {
                    let is_first = std::mem::take(&mut first);
                    let f = self.forward(mb, chunk, model.exchange.as_deref(), &mut |l| hooks.forward_layer_done(is_first, l))?;
                    idle += f.waited;
                    record(&mut out, &mut bytes, mb, &f);
                    live.insert((mb, chunk), f);
                }
                Step::One(Action::Backward { mb, chunk }) => {
                    let f = live.remove(&(mb, chunk)).expect("a backward follows its forward");
                    let (last, fin) = (last_backward[chunk] == Some(mb), final_mb_chunk == Some((mb, chunk)));
                    let (ce, waited) = self.backward(g, mb, f, model.exchange.as_deref(), &mut |g, l| hooks.backward_layer_done(g, last, fin, l))?;
                    out.ce += ce;
                    idle += waited;
                    bytes.remove(&mb);
                }
                Step::Pair(Action::Forward { mb: fm, chunk: fc }, Action::Backward { mb, chunk }) => {
                    let f = live.remove(&(mb, chunk)).expect("a backward follows its forward");
                    let (last, fin) = (last_backward[chunk] == Some(mb), final_mb_chunk == Some((mb, chunk)));
                    let stats = model.exchange.as_ref().map(|e| e.stats.clone());
                    let lanes = |on: bool| {
                        if let Some(s) = &stats {
                            if on {
                                s.lanes.start_lane()
                            } else {
                                s.lanes.end_lane()
                            }
                        }
                    };
                    // (the step's first forward is a warm-up forward, never in a pair)
                    let lane = self.forward_lane.or(model.exchange.as_deref());
                    let (forwarded, backward) = std::thread::scope(|s| {
                        lanes(true);
                        lanes(true);
                        let fwd = std::thread::Builder::new()
                            .name("ultramoe-forward-lane".into())
                            .spawn_scoped(s, || {
                                let r = self.forward(fm, fc, lane, &mut |_| {});
                                lanes(false);
                                r
                            })
                            .expect("start the forward lane");
                        let b = self.backward(g, mb, f, model.exchange.as_deref(), &mut |g, l| hooks.backward_layer_done(g, last, fin, l));
                        lanes(false);
                        let f = fwd.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                        (f, b)
                    });
                    let (ce, waited_b) = backward?;
                    let forwarded = forwarded?;
                    // Both lanes start by waiting for their inputs: the rank is idle
                    // while both wait.
                    idle += waited_b.min(forwarded.waited);
                    out.ce += ce;
                    bytes.remove(&mb);
                    record(&mut out, &mut bytes, fm, &forwarded);
                    live.insert((fm, fc), forwarded);
                }
                Step::Pair(..) => unreachable!("a pair is a forward then a backward"),
            }
        }
        debug_assert!(live.is_empty(), "every forward has had its backward");
        out.span_s = start.elapsed().as_secs_f64();
        out.idle_s = idle.as_secs_f64();
        Ok(out)
    }
}
