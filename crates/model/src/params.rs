//! The parameter layout: every checkpoint tensor is a named view into one flat `f32`
//! buffer (llm.c style), and gradients and optimizer moments reuse the same layout, so
//! an optimizer step is one loop over one slice.
//!
//! Registration order *is* the memory order. Layers register tensors that are used
//! together consecutively, so they form one fused matrix without copies:
//! `q_proj, k_proj, v_proj` → one `[(nh + 2·nkv)·d, H]` QKV weight; an expert's
//! `gate_proj, up_proj` → one `[2I, H]` weight, and all experts' in a row → `[E, 2I, H]`
//! for the grouped GEMM.

use std::collections::HashMap;
use std::ops::Range;

/// How a tensor is initialised for a fresh model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// normal(0, std)
    Normal(f32),
    /// every element = value (norm gains, biases)
    Constant(f32),
}

/// One named tensor in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// checkpoint name, e.g. `model.layers.0.self_attn.q_proj.weight`
    pub name: String,
    /// shape as stored in the checkpoint
    pub shape: Vec<usize>,
    /// start in the flat buffer
    pub offset: usize,
    /// initialisation for a fresh model
    pub init: Init,
    /// receives weight decay (matrices yes; norms, biases no)
    pub decay: bool,
    /// receives no gradient and no optimizer update (`e_score_correction_bias`)
    pub frozen: bool,
    /// a routed expert's weight (one slot of [`crate::moe::placement`]): under expert
    /// parallelism held by some ranks of each expert-parallel group, its gradient summed
    /// over the data-parallel group (and over its copies, when replicated)
    pub expert: bool,
    /// this rank's slice of a tensor split over the tensor-parallel group (`shape` is
    /// the slice's; the checkpoint holds the whole tensor)
    pub split: Option<TpSplit>,
    /// replicated over the tensor-parallel group but used inside a split block (MLA's
    /// down-projections and their norms, Qwen3's per-head q/k norms): each rank's
    /// gradient is its heads' part, summed over the group once per step
    /// ([`crate::Model::sum_tensor_parallel_grads`])
    pub tp_partial: bool,
}

/// Where a tensor-parallel rank's slice of a tensor lies: part `rank` of `parts` equal
/// parts along dimension `dim` (0: rows — column-parallel; 1: columns — row-parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpSplit {
    /// the split dimension
    pub dim: usize,
    /// this rank's part
    pub rank: usize,
    /// parts (the tensor-parallel size)
    pub parts: usize,
}

impl TpSplit {
    /// The whole tensor's shape from the slice's.
    pub fn whole_shape(&self, local: &[usize]) -> Vec<usize> {
        let mut s = local.to_vec();
        s[self.dim] *= self.parts;
        s
    }

    /// The slice's shape from the whole tensor's (`None` when `parts` does not divide it).
    pub fn local_shape(&self, whole: &[usize]) -> Option<Vec<usize>> {
        let mut s = whole.to_vec();
        if !s[self.dim].is_multiple_of(self.parts) {
            return None;
        }
        s[self.dim] /= self.parts;
        Some(s)
    }

    /// `(outer, whole run, slice run)`: the tensor is `outer` rows of contiguous runs,
    /// of which this slice takes `slice run` elements at `rank · slice run`.
    fn runs(&self, whole: &[usize]) -> (usize, usize, usize) {
        let outer: usize = whole[..self.dim].iter().product();
        let run: usize = whole[self.dim..].iter().product();
        (outer, run, run / self.parts)
    }

    /// This rank's slice of the whole tensor `src` (shape `whole`).
    pub fn take(&self, src: &[f32], whole: &[usize]) -> Vec<f32> {
        let (outer, run, part) = self.runs(whole);
        (0..outer).flat_map(|o| src[o * run + self.rank * part..o * run + (self.rank + 1) * part].iter().copied()).collect()
    }

    /// Writes rank `rank`'s slice `part_data` into its place in the whole tensor `dst`.
    pub fn put_as(&self, rank: usize, dst: &mut [f32], part_data: &[f32], whole: &[usize]) {
        TpSplit { rank, ..*self }.put(dst, part_data, whole)
    }

    /// Writes this rank's slice `part_data` into its place in the whole tensor `dst`.
    pub fn put(&self, dst: &mut [f32], part_data: &[f32], whole: &[usize]) {
        let (outer, run, part) = self.runs(whole);
        for o in 0..outer {
            dst[o * run + self.rank * part..o * run + (self.rank + 1) * part].copy_from_slice(&part_data[o * part..(o + 1) * part]);
        }
    }
}

impl ParamSpec {
    /// Element count.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for a zero-sized tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The checkpoint tensor's shape: `shape`, or the whole of a tensor-parallel slice.
    pub fn whole_shape(&self) -> Vec<usize> {
        self.split.map_or_else(|| self.shape.clone(), |p| p.whole_shape(&self.shape))
    }

    /// Range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// A range of the flat buffer that a layer reads as one (possibly fused) tensor.
pub type Slot = Range<usize>;

/// A tensor of the whole model, whether or not this rank holds it.
#[derive(Clone, Debug)]
pub struct LogicalTensor {
    /// checkpoint name
    pub name: String,
    /// shape
    pub shape: Vec<usize>,
    /// initialisation
    pub init: Init,
    /// held in this rank's buffer (false: another expert-parallel rank or pipeline
    /// stage holds it)
    pub local: bool,
    /// the expert-parallel rank that holds (and saves) it; 0 for replicated tensors
    pub owner: usize,
    /// the pipeline rank whose stage holds it
    pub stage: usize,
    /// this rank's slice, when split over the tensor-parallel group (`shape` is whole)
    pub split: Option<TpSplit>,
}

/// The table of all tensors.
#[derive(Clone, Debug, Default)]
pub struct ParamLayout {
    /// tensors in memory order
    pub specs: Vec<ParamSpec>,
    /// every tensor of the whole model in registration order, including those that
    /// live on other expert-parallel ranks — so a rank initialises its share exactly as
    /// a single rank would (same random stream) and knows which checkpoint tensors to
    /// skip
    pub logical: Vec<LogicalTensor>,
    remote: std::collections::HashSet<String>,
    /// routed experts' tensors: position in `logical`
    owners: HashMap<String, usize>,
    /// total elements
    pub total: usize,
    index: HashMap<String, usize>,
    /// checkpoint names that alias another tensor (tied `lm_head.weight`)
    pub aliases: HashMap<String, String>,
    /// the pipeline rank holding what is registered now, and whether it is this rank
    /// ([`ParamLayout::set_stage`])
    stage: usize,
    elsewhere: bool,
    /// (this rank, ranks) of the tensor-parallel group ([`ParamLayout::add_split`])
    tp: (usize, usize),
}

impl ParamLayout {
    /// Tensors registered from now on belong to pipeline rank `stage`'s part of the
    /// model; when that is not this rank (`here` false) they are recorded in the logical
    /// list only (so initialisation draws the same stream and checkpoints name them) and
    /// their slots are empty.
    pub fn set_stage(&mut self, stage: usize, here: bool) {
        self.stage = stage;
        self.elsewhere = !here;
    }

    /// Tensors registered with [`ParamLayout::add_split`] from now on are split over a
    /// tensor-parallel group of `ranks`, this rank holding part `rank`.
    pub fn set_tensor_parallel(&mut self, rank: usize, ranks: usize) {
        self.tp = (rank, ranks.max(1));
    }

    /// Ranks of the tensor-parallel group tensors are split over.
    pub fn tensor_parallel_size(&self) -> usize {
        self.tp.1.max(1)
    }

    /// Appends a tensor; returns its range.
    pub fn add(&mut self, name: String, shape: &[usize], init: Init) -> Slot {
        self.add_sliced(name, shape, init, None)
    }

    /// Appends a tensor split along `dim` over the tensor-parallel group
    /// ([`ParamLayout::set_tensor_parallel`]): this rank holds its part (a plain tensor
    /// without tensor parallelism). The caller has checked that the group divides it.
    pub fn add_split(&mut self, name: String, shape: &[usize], dim: usize, init: Init) -> Slot {
        let (rank, parts) = self.tp;
        let split = (parts > 1).then_some(TpSplit { dim, rank, parts });
        self.add_sliced(name, shape, init, split)
    }

    /// Appends a tensor replicated over the tensor-parallel group whose gradient is
    /// partial on each rank (see [`ParamSpec::tp_partial`]).
    pub fn add_tp_partial(&mut self, name: String, shape: &[usize], init: Init) -> Slot {
        let r = self.add(name, shape, init);
        if !self.elsewhere && self.tp.1 > 1 {
            let last = self.specs.len() - 1;
            self.specs[last].tp_partial = true;
        }
        r
    }

    /// Marks every tensor held from spec `first` on as replicated with partial
    /// gradients under tensor parallelism (see [`ParamSpec::tp_partial`]).
    pub fn mark_tp_partial(&mut self, first: usize) {
        if self.tp.1 > 1 {
            self.specs[first..].iter_mut().for_each(|s| s.tp_partial = true);
        }
    }

    fn add_sliced(&mut self, name: String, shape: &[usize], init: Init, split: Option<TpSplit>) -> Slot {
        if self.elsewhere {
            self.add_logical(name, shape, init, false, 0);
            return self.total..self.total;
        }
        let decay = shape.len() >= 2;
        let local = split.map_or_else(|| shape.to_vec(), |s| s.local_shape(shape).expect("the tensor-parallel size divides the split dimension"));
        let spec = ParamSpec { name: name.clone(), shape: local, offset: self.total, init, decay, frozen: false, expert: false, split, tp_partial: false };
        let r = spec.range();
        self.logical.push(LogicalTensor { name: name.clone(), shape: shape.to_vec(), init, local: true, owner: 0, stage: self.stage, split });
        self.total += spec.len();
        self.index.insert(name, self.specs.len());
        self.specs.push(spec);
        r
    }

    /// Appends a tensor that takes no gradient step (a buffer in PyTorch terms).
    pub fn add_frozen(&mut self, name: String, shape: &[usize], init: Init) -> Slot {
        let r = self.add(name, shape, init);
        if self.elsewhere {
            return r;
        }
        let last = self.specs.len() - 1;
        self.specs[last].frozen = true;
        self.specs[last].decay = false;
        r
    }

    /// Appends one slot's tensor of a routed expert (see [`crate::moe::placement`]): in
    /// the buffer, but not in the logical list, which [`ParamLayout::add_logical`] fills
    /// in expert order whatever slot each expert sits in.
    pub fn add_slot(&mut self, name: String, shape: &[usize], init: Init) -> Slot {
        if self.elsewhere {
            return self.total..self.total;
        }
        let spec = ParamSpec { name: name.clone(), shape: shape.to_vec(), offset: self.total, init, decay: true, frozen: false, expert: true, split: None, tp_partial: false };
        let r = spec.range();
        self.total += spec.len();
        self.index.insert(name, self.specs.len());
        self.specs.push(spec);
        r
    }

    /// Records a routed expert's tensor of the whole model: held here (`local`) or not,
    /// saved by expert-parallel rank `owner`.
    pub fn add_logical(&mut self, name: String, shape: &[usize], init: Init, local: bool, owner: usize) {
        let local = local && !self.elsewhere;
        if !local {
            self.remote.insert(name.clone());
        }
        self.owners.insert(name.clone(), self.logical.len());
        self.logical.push(LogicalTensor { name, shape: shape.to_vec(), init, local, owner, stage: self.stage, split: None });
    }

    /// Renames slot tensors (`(old, new)` pairs, applied together, so names may swap).
    pub fn rename(&mut self, pairs: &[(String, String)]) {
        let idx: Vec<usize> = pairs.iter().map(|(old, _)| self.index.remove(old).expect("renaming a held tensor")).collect();
        for ((_, new), i) in pairs.iter().zip(idx) {
            self.specs[i].name = new.clone();
            self.index.insert(new.clone(), i);
        }
    }

    /// Updates where a routed expert's tensor lives: held here or not, saved by `owner`.
    pub fn set_holder(&mut self, name: &str, local: bool, owner: usize) {
        let i = self.owners[name];
        self.logical[i].local = local;
        self.logical[i].owner = owner;
        if local {
            self.remote.remove(name);
        } else {
            self.remote.insert(name.to_string());
        }
    }

    /// The expert-parallel rank that saves tensor `name` (0 for replicated tensors).
    pub fn owner(&self, name: &str) -> usize {
        self.owners.get(name).map_or(0, |&i| self.logical[i].owner)
    }

    /// Maximal runs of consecutive tensors that are (`expert = true`) or are not routed
    /// experts' weights: what one collective call can reduce in place.
    pub fn runs(&self, expert: bool) -> Vec<Range<usize>> {
        self.runs_where(|s| s.expert == expert)
    }

    /// Maximal runs of consecutive tensors (in memory order) for which `keep` holds.
    pub fn runs_where(&self, keep: impl Fn(&ParamSpec) -> bool) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for s in self.specs.iter().filter(|s| keep(s)) {
            match out.last_mut() {
                Some(r) if r.end == s.offset => r.end = s.offset + s.len(),
                _ => out.push(s.range()),
            }
        }
        out
    }

    /// The pipeline rank that holds tensor `name` (0 when unknown).
    pub fn stage_of(&self, name: &str) -> usize {
        self.logical.iter().find(|t| t.name == name).map_or(0, |t| t.stage)
    }

    /// True for a tensor of the whole model that this rank does not hold.
    pub fn is_remote(&self, name: &str) -> bool {
        self.remote.contains(name)
    }

    /// Looks a tensor up by checkpoint name.
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.index.get(name).map(|&i| &self.specs[i])
    }

    /// Parameter count (aliases counted once).
    pub fn n_params(&self) -> usize {
        self.total
    }
}

/// The decoder layer a checkpoint tensor belongs to (`model.layers.{i}.…`), if any.
pub fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Joins consecutive slots into one (they must be adjacent).
pub fn fuse(parts: &[Slot]) -> Slot {
    for w in parts.windows(2) {
        assert_eq!(w[0].end, w[1].start, "fused tensors must be registered consecutively");
    }
    parts[0].start..parts[parts.len() - 1].end
}
