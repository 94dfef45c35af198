//! Data and expert parallelism in the training step: which rows of the global batch a
//! rank trains on, which gradients are summed over which group, and the gradient norm
//! of the whole model.
//!
//! With `world = DP × EP` ranks, every rank trains on `B/world` consecutive rows of each
//! global micro-batch. Replicated tensors (attention, norms, router, shared experts,
//! embeddings) get partial gradients on every rank, summed over the world; a routed
//! expert lives on one rank of each expert-parallel group, has already seen the tokens
//! of its whole EP group through the all-to-all, and is summed over the data-parallel
//! group (the ranks holding the same experts). The loss is normalised by the global
//! target count before the backward, so the sums are the single-rank gradient.

use std::ops::Range;
use std::time::Instant;
use ultramoe_dist::{CommError, CommResult, Mesh};
use ultramoe_model::params::ParamLayout;

use crate::optimizer::sum_squares;

/// A rank's place in the mesh and the gradient runs it reduces.
pub struct Parallel {
    /// the device mesh
    pub mesh: Mesh,
    replicated: Vec<Range<usize>>,
    experts: Vec<Range<usize>>,
    /// seconds spent in gradient reduction since the last [`Parallel::take_comm_s`]
    comm_s: f64,
}

impl Parallel {
    /// For a model laid out by `layout` (this rank's share).
    pub fn new(mesh: Mesh, layout: &ParamLayout) -> Self {
        Parallel { mesh, replicated: layout.runs(false), experts: layout.runs(true), comm_s: 0.0 }
    }

    /// This rank in the world.
    pub fn rank(&self) -> usize {
        self.mesh.world.rank()
    }

    /// Ranks in the world.
    pub fn world(&self) -> usize {
        self.mesh.world.size()
    }

    /// The rows of a global micro-batch of `b` rows that this rank trains on.
    pub fn rows(&self, b: usize) -> Range<usize> {
        let per = b / self.world();
        self.rank() * per..(self.rank() + 1) * per
    }

    /// Sums gradients over the ranks that share them (see the module docs).
    pub fn reduce_grads(&mut self, g: &mut [f32]) -> CommResult<()> {
        let start = Instant::now();
        if self.world() > 1 {
            for r in &self.replicated {
                self.mesh.world.all_reduce_f32(&mut g[r.clone()])?;
            }
        }
        if self.mesh.dp_size() > 1 {
            for r in &self.experts {
                self.mesh.dp.all_reduce_f32(&mut g[r.clone()])?;
            }
        }
        self.comm_s += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// `‖g‖₂` of the whole model after [`Parallel::reduce_grads`]: the replicated part
    /// (equal on every rank) once, plus every expert-parallel rank's experts.
    pub fn grad_norm(&mut self, g: &[f32]) -> CommResult<f32> {
        let replicated: f64 = self.replicated.iter().map(|r| sum_squares(&g[r.clone()])).sum();
        let mut experts = [self.experts.iter().map(|r| sum_squares(&g[r.clone()])).sum::<f64>()];
        let start = Instant::now();
        self.mesh.ep.all_reduce_f64(&mut experts)?;
        self.comm_s += start.elapsed().as_secs_f64();
        Ok((replicated + experts[0]).sqrt() as f32)
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

    /// Seconds of gradient-reduction communication since the last call.
    pub fn take_comm_s(&mut self) -> f64 {
        std::mem::take(&mut self.comm_s)
    }
}

/// Runs `f`, turning a communication failure raised inside the model (the dispatcher's
/// all-to-all cannot return an error through the layers, so it unwinds with the
/// [`CommError`] as payload) back into an error. Other panics continue unwinding.
pub fn catch_comm<T>(f: impl FnOnce() -> T) -> CommResult<T> {
    quiet_comm_unwinds();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => match payload.downcast::<CommError>() {
            Ok(e) => Err(*e),
            Err(other) => std::panic::resume_unwind(other),
        },
    }
}

/// Keeps the panic hook from printing a backtrace for communication failures, which are
/// reported as errors once caught.
fn quiet_comm_unwinds() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<CommError>().is_none() {
                previous(info);
            }
        }));
    });
}
