//! Data and expert parallelism in the training step: which rows of the global batch a
//! rank trains on, which gradients are summed over which group, and the gradient norm
//! of the whole model.
//!
//! With `world = DP × PP × EP` ranks, every rank of a pipeline stage (`DP × EP` of them)
//! trains on `B/(DP·EP)` consecutive rows of each global micro-batch. A stage's
//! replicated tensors (attention, norms, router, shared experts, embeddings) get partial
//! gradients on every rank of the stage, summed over the stage group; a routed expert
//! lives on one rank of each expert-parallel group, has already seen the tokens of its
//! whole EP group through the all-to-all, and is summed over the data-parallel group
//! (the ranks holding the same experts). The loss is normalised by the global target
//! count before the backward, so the sums are the single-rank gradient.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;
use ultramoe_dist::{CommError, CommResult, CommStream, Mesh, Pending, ProcessGroup};
use ultramoe_model::params::{layer_index, ParamLayout};
use ultramoe_model::swap::SwapError;
use ultramoe_model::Error;

use crate::optimizer::sum_squares;

/// One layer's (replicated, expert) gradient runs.
type LayerRuns = (Vec<Range<usize>>, Vec<Range<usize>>);

/// A gradient reduction in flight: the summed values of one range.
type Reduction = Pending<CommResult<Vec<f32>>>;

/// A rank's place in the mesh and the gradient runs it reduces.
pub struct Parallel {
    /// the device mesh
    pub mesh: Mesh,
    replicated: Vec<Range<usize>>,
    experts: Vec<Range<usize>>,
    /// tensor-parallel slices (part of `replicated`): their squares are summed over the
    /// tensor-parallel group in the gradient norm
    split: Vec<Range<usize>>,
    /// per decoder layer, its (replicated, expert) runs: reduced as soon as the backward
    /// pass finishes the layer
    per_layer: Vec<LayerRuns>,
    /// the gradient stream (when reductions overlap the backward pass)
    stream: Option<Arc<CommStream>>,
    /// reductions in flight: the range and its summed values
    pending: Vec<(Range<usize>, Reduction)>,
    started: Vec<bool>,
    /// seconds spent in gradient reduction since the last [`Parallel::take_comm_s`]
    comm_s: f64,
    /// of which the compute thread waited for
    exposed_s: f64,
}

impl Parallel {
    /// For a model laid out by `layout` (this rank's share). With `overlap`, gradient
    /// reductions run on their own stream while the backward pass continues (when the
    /// backend allows two groups to communicate at once).
    pub fn new(mesh: Mesh, layout: &ParamLayout, overlap: bool) -> Self {
        let n_layers = layout.specs.iter().filter_map(|s| layer_index(&s.name)).max().map_or(0, |l| l + 1);
        let per_layer = (0..n_layers)
            .map(|i| {
                let here = |s: &ultramoe_model::params::ParamSpec| layer_index(&s.name) == Some(i);
                (layout.runs_where(|s| here(s) && !s.expert), layout.runs_where(|s| here(s) && s.expert))
            })
            .collect();
        let overlap = overlap && mesh.world.size() > 1 && mesh.world.concurrent_groups();
        Parallel {
            replicated: layout.runs(false),
            experts: layout.runs(true),
            split: layout.runs_where(|s| s.split.is_some()),
            per_layer,
            stream: overlap.then(|| CommStream::new("ultramoe-grad-stream")),
            pending: vec![],
            started: vec![false; n_layers],
            mesh,
            comm_s: 0.0,
            exposed_s: 0.0,
        }
    }

    /// True when gradient reductions overlap the backward pass.
    pub fn overlaps_reduction(&self) -> bool {
        self.stream.is_some()
    }

    /// Queues the reduction of `ranges` of `g` over `group` on the gradient stream.
    fn submit(&mut self, g: &[f32], ranges: &[Range<usize>], group: &Arc<dyn ProcessGroup>) {
        let Some(stream) = &self.stream else { return };
        for r in ranges {
            let mut data = g[r.clone()].to_vec();
            let group = group.clone();
            let job = stream.submit(move || group.all_reduce_f32(&mut data).map(|_| data));
            self.pending.push((r.clone(), job));
        }
    }

    /// Called when the backward pass has finished decoder layer `i`: starts summing its
    /// gradients while earlier layers compute.
    pub fn layer_done(&mut self, g: &[f32], i: usize) {
        if self.stream.is_none() || self.started[i] {
            return;
        }
        self.started[i] = true;
        let (rep, exp) = self.per_layer[i].clone();
        let (stage, dp) = (self.mesh.stage.clone(), self.mesh.dp.clone());
        if stage.size() > 1 {
            self.submit(g, &rep, &stage);
        }
        if dp.size() > 1 {
            self.submit(g, &exp, &dp);
        }
    }

    /// This rank in the world.
    pub fn rank(&self) -> usize {
        self.mesh.world.rank()
    }

    /// Ranks in the world.
    pub fn world(&self) -> usize {
        self.mesh.world.size()
    }

    /// The rows of a global micro-batch of `b` rows that this rank trains on (its share
    /// of its stage's).
    pub fn rows(&self, b: usize) -> Range<usize> {
        let (k, n) = (self.mesh.stage.rank(), self.mesh.stage.size());
        let per = b / n;
        k * per..(k + 1) * per
    }

    /// Sums gradients over the ranks that share them (see the module docs): what
    /// [`Parallel::layer_done`] started is waited for, the rest reduced now.
    pub fn reduce_grads(&mut self, g: &mut [f32]) -> CommResult<()> {
        if self.stream.is_some() {
            return self.finish_overlapped(g);
        }
        let start = Instant::now();
        if self.mesh.stage.size() > 1 {
            for r in &self.replicated {
                self.mesh.stage.all_reduce_f32(&mut g[r.clone()])?;
            }
        }
        if self.mesh.dp_size() > 1 {
            for r in &self.experts {
                self.mesh.dp.all_reduce_f32(&mut g[r.clone()])?;
            }
        }
        let t = start.elapsed().as_secs_f64();
        self.comm_s += t;
        self.exposed_s += t;
        Ok(())
    }

    /// Queues every range no layer started (embeddings, final norm, head; or all of
    /// them when the hook was not used), then waits for every reduction and writes the
    /// sums back.
    fn finish_overlapped(&mut self, g: &mut [f32]) -> CommResult<()> {
        let done: Vec<Range<usize>> = self.pending.iter().map(|(r, _)| r.clone()).collect();
        let outside = |runs: &[Range<usize>]| -> Vec<Range<usize>> {
            runs.iter().flat_map(|r| split_out(r.clone(), &done)).collect()
        };
        let (rest_rep, rest_exp) = (outside(&self.replicated), outside(&self.experts));
        let (stage, dp) = (self.mesh.stage.clone(), self.mesh.dp.clone());
        if stage.size() > 1 {
            self.submit(g, &rest_rep, &stage);
        }
        if dp.size() > 1 {
            self.submit(g, &rest_exp, &dp);
        }
        for (r, job) in std::mem::take(&mut self.pending) {
            let d = job.wait();
            self.comm_s += d.busy_s;
            self.exposed_s += d.exposed_s;
            g[r].copy_from_slice(&d.value?);
        }
        self.started.iter_mut().for_each(|s| *s = false);
        Ok(())
    }

    /// `‖g‖₂` of the whole model after [`Parallel::reduce_grads`]: per stage, the
    /// replicated part (equal on every rank of the stage) once plus every
    /// expert-parallel rank's experts, leaving out `duplicates` (non-primary copies of
    /// replicated experts, counted at their primary), plus the other tensor-parallel
    /// ranks' slices; then summed over the stages.
    pub fn grad_norm(&mut self, g: &[f32], duplicates: &[Range<usize>]) -> CommResult<f32> {
        let mut replicated: f64 = self.replicated.iter().map(|r| sum_squares(&g[r.clone()])).sum();
        if self.mesh.tp_size() > 1 {
            let mut split = [self.split.iter().map(|r| sum_squares(&g[r.clone()])).sum::<f64>()];
            let local = split[0];
            self.mesh.tp.all_reduce_f64(&mut split)?;
            replicated += split[0] - local;
        }
        let copies: f64 = duplicates.iter().map(|r| sum_squares(&g[r.clone()])).sum();
        let mut experts = [self.experts.iter().map(|r| sum_squares(&g[r.clone()])).sum::<f64>() - copies];
        let start = Instant::now();
        self.mesh.ep.all_reduce_f64(&mut experts)?;
        let mut stage = [replicated + experts[0]];
        if self.mesh.pp_size() > 1 {
            self.mesh.pp.all_reduce_f64(&mut stage)?;
        }
        let t = start.elapsed().as_secs_f64();
        self.comm_s += t;
        self.exposed_s += t;
        Ok(stage[0].sqrt() as f32)
    }

    /// Sums per-rank counts over the world.
    pub fn sum_counts(&mut self, counts: &mut [Vec<usize>]) -> CommResult<()> {
        let mut flat: Vec<u64> = counts.iter().flatten().map(|&c| c as u64).collect();
        self.mesh.world.all_reduce_u64(&mut flat)?;
        let mut it = flat.into_iter();
        counts.iter_mut().flatten().for_each(|c| *c = it.next().unwrap_or(0) as usize);
        Ok(())
    }

    /// Sums scalars over the world.
    pub fn sum(&mut self, xs: &mut [f64]) -> CommResult<()> {
        self.mesh.world.all_reduce_f64(xs)
    }

    /// Seconds of gradient-reduction communication since the last call, and how many
    /// of them the compute thread waited for.
    pub fn take_comm_s(&mut self) -> (f64, f64) {
        (std::mem::take(&mut self.comm_s), std::mem::take(&mut self.exposed_s))
    }
}

/// The parts of `r` outside every range in `taken` (which are disjoint, and each either
/// inside `r` or disjoint from it).
fn split_out(r: Range<usize>, taken: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut inside: Vec<&Range<usize>> = taken.iter().filter(|t| t.start >= r.start && t.end <= r.end).collect();
    inside.sort_by_key(|t| t.start);
    let mut out = vec![];
    let mut at = r.start;
    for t in inside {
        if t.start > at {
            out.push(at..t.start);
        }
        at = t.end;
    }
    if at < r.end {
        out.push(at..r.end);
    }
    out
}

/// Runs a forward or backward pass `f`, turning the failures raised inside the model
/// back into errors: a failed all-to-all (the dispatcher cannot return an error through
/// the layers, so it unwinds with the [`CommError`] as payload) and a failed swap-file
/// transfer ([`SwapError`], likewise). Other panics continue unwinding.
pub fn catch_step<T>(f: impl FnOnce() -> T) -> Result<T, Error> {
    quiet_step_unwinds();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => match payload.downcast::<CommError>() {
            Ok(e) => Err(Error::msg(format!("distributed run failed: {e}"))),
            Err(other) => match other.downcast::<SwapError>() {
                Ok(e) => Err(Error::field("swap_dir", e.to_string())),
                Err(other) => std::panic::resume_unwind(other),
            },
        },
    }
}

/// Keeps the panic hook from printing a backtrace for the failures [`catch_step`]
/// reports as errors.
fn quiet_step_unwinds() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            if p.downcast_ref::<CommError>().is_none() && p.downcast_ref::<SwapError>().is_none() {
                previous(info);
            }
        }));
    });
}
