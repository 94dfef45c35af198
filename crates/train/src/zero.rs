//! ZeRO stage 1: optimizer moments sharded over the ranks that hold the same weights.
//!
//! A stage's replicated tensors (held by every rank of the stage: `W = DP × EP` ranks) are
//! packed in memory order into one vector of `R` elements, padded to `W·⌈R/W⌉`, and rank
//! `r` of the stage owns chunk `r`. A rank's
//! routed experts (`X` elements, equal on every data-parallel copy) are packed the same
//! way and chunk `d` belongs to data-parallel rank `d`. A step then:
//!
//! 1. reduce-scatters the packed gradients (stage for replicated, DP group for experts):
//!    each rank receives the summed gradient of its chunks only;
//! 2. takes the global norm from the chunks (`Σ chunk²` summed over the world: every
//!    element of the model sits in exactly one rank's chunk — under tensor parallelism,
//!    in one chunk per tensor-parallel rank, counted by the first except the slices)
//!    and clips;
//! 3. runs AdamW on its chunks (moments exist only for them: `2·(R/W + X/D)` floats
//!    instead of `2·(R + X)`);
//! 4. all-gathers the updated chunks back into every rank's weights.
//!
//! The sums and the elementwise update are those of the unsharded step, so training
//! follows the same trajectory. Checkpoints hold whole moments by tensor name: saving
//! gathers them, loading takes this rank's chunks, so a run can change its layout (and
//! switch ZeRO on or off) at any checkpoint.

use crate::optimizer::{clip_to_norm, sum_squares, AdamW, AdamWConfig};
use std::ops::Range;
use std::time::Instant;
use ultramoe_dist::{CommResult, Mesh, ProcessGroup};
use ultramoe_model::params::{Init, ParamLayout};

/// One packed family of tensors (replicated, or experts) and this rank's chunk of it.
struct Packing {
    /// ranges of the flat layout, in packing order
    runs: Vec<Range<usize>>,
    /// elements before padding
    len: usize,
    /// elements per rank
    chunk: usize,
    /// this rank's chunk index
    index: usize,
}

impl Packing {
    fn new(layout: &ParamLayout, expert: bool, ranks: usize, index: usize) -> Self {
        let runs = layout.runs(expert);
        let len = runs.iter().map(|r| r.len()).sum::<usize>();
        Packing { runs, len, chunk: len.div_ceil(ranks.max(1)), index }
    }

    /// Where flat-buffer ranges (inside this packing's runs) fall in this rank's chunk,
    /// in chunk coordinates.
    fn in_chunk(&self, flat: &[Range<usize>]) -> Vec<Range<usize>> {
        let mine = self.mine();
        let mut out = vec![];
        for f in flat {
            let mut at = 0;
            for r in &self.runs {
                if f.start >= r.start && f.end <= r.end {
                    let p = at + (f.start - r.start)..at + (f.end - r.start);
                    let (lo, hi) = (p.start.max(mine.start), p.end.min(mine.end));
                    if lo < hi {
                        out.push(lo - mine.start..hi - mine.start);
                    }
                    break;
                }
                at += r.len();
            }
        }
        out
    }

    /// This rank's chunk, in packed coordinates.
    fn mine(&self) -> Range<usize> {
        self.index * self.chunk..(self.index + 1) * self.chunk
    }

    /// The packed vector, padded with zeros to `chunk · ranks`.
    fn pack(&self, src: &[f32], ranks: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.chunk * ranks);
        for r in &self.runs {
            out.extend_from_slice(&src[r.clone()]);
        }
        out.resize(self.chunk * ranks, 0.0);
        out
    }

    /// The elements of packed range `want` (zeros past the end).
    fn slice(&self, src: &[f32], want: Range<usize>) -> Vec<f32> {
        let mut out = Vec::with_capacity(want.len());
        let mut at = 0;
        for r in &self.runs {
            let (a, b) = (want.start.max(at), want.end.min(at + r.len()));
            if a < b {
                out.extend_from_slice(&src[r.start + a - at..r.start + b - at]);
            }
            at += r.len();
        }
        out.resize(want.len(), 0.0);
        out
    }

    /// Writes a whole packed vector back into the flat layout.
    fn unpack(&self, packed: &[f32], dst: &mut [f32]) {
        let mut at = 0;
        for r in &self.runs {
            dst[r.clone()].copy_from_slice(&packed[at..at + r.len()]);
            at += r.len();
        }
    }

    /// The tensors (by their decay/frozen rule) that overlap this rank's chunk, as a
    /// layout over the chunk, so AdamW applies each element's own rule; padding is a
    /// frozen tail.
    fn chunk_layout(&self, layout: &ParamLayout, expert: bool, out: &mut ParamLayout) {
        let mine = self.mine();
        let mut at = 0;
        for s in layout.specs.iter().filter(|s| s.expert == expert) {
            let (a, b) = (mine.start.max(at), mine.end.min(at + s.len()));
            if a < b {
                let r = out.add(format!("{}[{a}..{b}]", s.name), &[b - a], Init::Constant(0.0));
                let last = out.specs.len() - 1;
                (out.specs[last].decay, out.specs[last].frozen) = (s.decay, s.frozen);
                debug_assert_eq!(r.len(), b - a);
            }
            at += s.len();
        }
        let filled = self.len.clamp(mine.start, mine.end) - mine.start;
        if filled < self.chunk {
            out.add_frozen(format!("padding.{}", if expert { "experts" } else { "replicated" }), &[self.chunk - filled], Init::Constant(0.0));
        }
    }
}

/// The sharded optimizer of one rank.
pub struct Zero1 {
    replicated: Packing,
    experts: Packing,
    /// tensor-parallel slices (inside `replicated`)
    split: Vec<Range<usize>>,
    /// AdamW over `[replicated chunk ; expert chunk]`
    pub opt: AdamW,
    /// seconds in reduce-scatter/all-gather since the last [`Zero1::take_comm_s`]
    comm_s: f64,
}

/// `reduce_scatter` that skips empty families (every rank skips alike: the sizes are
/// equal across the group).
fn reduce_scatter(g: &dyn ProcessGroup, packed: &[f32]) -> CommResult<Vec<f32>> {
    if packed.is_empty() {
        return Ok(vec![]);
    }
    g.reduce_scatter_f32(packed)
}

/// `all_gather` that skips empty families.
fn all_gather(g: &dyn ProcessGroup, chunk: &[f32]) -> CommResult<Vec<f32>> {
    if chunk.is_empty() {
        return Ok(vec![]);
    }
    g.all_gather_f32(chunk)
}

impl Zero1 {
    /// Shards for this rank of `mesh`, for a model laid out by `layout`.
    pub fn new(layout: &ParamLayout, mesh: &Mesh, cfg: AdamWConfig) -> Self {
        let replicated = Packing::new(layout, false, mesh.stage.size(), mesh.stage.rank());
        let experts = Packing::new(layout, true, mesh.dp_size(), mesh.dp.rank());
        let mut chunk = ParamLayout::default();
        replicated.chunk_layout(layout, false, &mut chunk);
        experts.chunk_layout(layout, true, &mut chunk);
        Zero1 { opt: AdamW::new(&chunk, cfg), replicated, experts, split: layout.runs_where(|s| s.split.is_some()), comm_s: 0.0 }
    }

    /// Moment floats this rank holds, and what it would hold unsharded.
    pub fn moment_floats(&self) -> (usize, usize) {
        (2 * (self.replicated.chunk + self.experts.chunk), 2 * (self.replicated.len + self.experts.len))
    }

    /// One optimizer step from the unreduced local gradients `g` (left zeroed); returns
    /// the global gradient norm before clipping.
    /// `duplicates` are non-primary copies of replicated experts, left out of the norm.
    pub fn step(&mut self, mesh: &Mesh, w: &mut [f32], g: &mut [f32], lr: f32, clip: f32, duplicates: &[Range<usize>]) -> CommResult<f32> {
        let (wn, dn) = (mesh.stage.size(), mesh.dp_size());
        let start = Instant::now();
        let mut grad = reduce_scatter(mesh.stage.as_ref(), &self.replicated.pack(g, wn))?;
        let rc = grad.len();
        grad.extend(reduce_scatter(mesh.dp.as_ref(), &self.experts.pack(g, dn))?);
        g.fill(0.0);
        let copies: f64 = self.experts.in_chunk(duplicates).into_iter().map(|r| sum_squares(&grad[rc + r.start..rc + r.end])).sum();
        // Under tensor parallelism each slice lies in one chunk of its own rank's
        // stage; what every tensor-parallel rank holds alike is counted by one of them.
        let sq = if mesh.counts_once() {
            sum_squares(&grad) - copies
        } else {
            self.replicated.in_chunk(&self.split).into_iter().map(|r| sum_squares(&grad[r])).sum()
        };
        let mut sq = [sq];
        mesh.world.all_reduce_f64(&mut sq)?;
        self.comm_s += start.elapsed().as_secs_f64();
        let norm = sq[0].sqrt() as f32;
        if !norm.is_finite() {
            // Every rank has the same norm: all skip the update (the trainer reports it).
            return Ok(norm);
        }
        clip_to_norm(&mut grad, norm, clip);
        let mut chunk = self.replicated.slice(w, self.replicated.mine());
        chunk.extend(self.experts.slice(w, self.experts.mine()));
        self.opt.step(&mut chunk, &mut grad, lr);
        let rc = self.replicated.chunk;
        let start = Instant::now();
        self.replicated.unpack(&all_gather(mesh.stage.as_ref(), &chunk[..rc])?, w);
        self.experts.unpack(&all_gather(mesh.dp.as_ref(), &chunk[rc..])?, w);
        self.comm_s += start.elapsed().as_secs_f64();
        Ok(norm)
    }

    /// Seconds of communication since the last call.
    pub fn take_comm_s(&mut self) -> f64 {
        std::mem::take(&mut self.comm_s)
    }

    /// Whole moments `(m, v)` in the flat layout, gathered from every rank's chunks
    /// (collective: every rank must call it).
    pub fn gather_moments(&self, mesh: &Mesh, total: usize) -> CommResult<(Vec<f32>, Vec<f32>)> {
        let rc = self.replicated.chunk;
        let mut out = (vec![0.0; total], vec![0.0; total]);
        for (src, dst) in [(&self.opt.m, &mut out.0), (&self.opt.v, &mut out.1)] {
            self.replicated.unpack(&all_gather(mesh.stage.as_ref(), &src[..rc])?, dst);
            self.experts.unpack(&all_gather(mesh.dp.as_ref(), &src[rc..])?, dst);
        }
        Ok(out)
    }

    /// Takes this rank's chunks of whole moments given in the flat layout.
    pub fn set_moments(&mut self, m: &[f32], v: &[f32]) {
        for (src, dst) in [(m, &mut self.opt.m), (v, &mut self.opt.v)] {
            let mut c = self.replicated.slice(src, self.replicated.mine());
            c.extend(self.experts.slice(src, self.experts.mine()));
            dst.copy_from_slice(&c);
        }
    }
}
