//! [`ProcessGroup`]: the object-safe face of a [`Communicator`], for the code that
//! holds a group without caring which backend it came from (the model's expert-parallel
//! dispatcher, the trainer). [`Communicator`] is generic over the element type, which
//! keeps each backend's implementation in one place; this trait fixes the types
//! training exchanges (`f32` activations and gradients, `u64` counts, `f64` norms) so
//! groups can live behind `Arc<dyn ProcessGroup>`.

use crate::{CommResult, Communicator};
use std::sync::Arc;

/// A group of ranks, backend erased.
pub trait ProcessGroup: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Waits for every rank.
    fn barrier(&self) -> CommResult<()>;
    /// `buf ← Σ_ranks buf`.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> CommResult<()>;
    /// `buf ← Σ_ranks buf`.
    fn all_reduce_f64(&self, buf: &mut [f64]) -> CommResult<()>;
    /// `buf ← Σ_ranks buf`.
    fn all_reduce_u64(&self, buf: &mut [u64]) -> CommResult<()>;
    /// `buf ← buf of root`.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> CommResult<()>;
    /// Every rank's `input` (equal lengths) concatenated in rank order.
    fn all_gather_f32(&self, input: &[f32]) -> CommResult<Vec<f32>>;
    /// Every rank's `input` (equal lengths) concatenated in rank order.
    fn all_gather_u64(&self, input: &[u64]) -> CommResult<Vec<u64>>;
    /// This rank's chunk of `Σ_ranks input` (length divisible by the group size).
    fn reduce_scatter_f32(&self, input: &[f32]) -> CommResult<Vec<f32>>;
    /// All-to-all with variable counts (see [`Communicator::all_to_all_v`]).
    fn all_to_all_v_f32(&self, send: &[f32], counts: &[usize]) -> CommResult<(Vec<f32>, Vec<usize>)>;
    /// All-to-all with counts known on both sides (see
    /// [`Communicator::all_to_all_v_known`]).
    fn all_to_all_v_known_f32(&self, send: &[f32], send_counts: &[usize], recv_counts: &[usize]) -> CommResult<Vec<f32>>;
    /// All-to-all with variable counts (see [`Communicator::all_to_all_v`]).
    fn all_to_all_v_u64(&self, send: &[u64], counts: &[usize]) -> CommResult<(Vec<u64>, Vec<usize>)>;
    /// See [`Communicator::allows_concurrent_groups`].
    fn concurrent_groups(&self) -> bool;
    /// Sends `data` to rank `dst` with `tag`, returning at once (see
    /// [`Communicator::send`]).
    fn send_f32(&self, data: &[f32], dst: usize, tag: u32) -> CommResult<()>;
    /// Receives the next message from `src` with `tag`.
    fn recv_f32(&self, src: usize, tag: u32) -> CommResult<Vec<f32>>;
    /// Waits until every message sent has left.
    fn flush_sends(&self) -> CommResult<()>;
    /// Sub-groups, as [`Communicator::split`].
    fn split_group(&self, color: usize, key: usize) -> CommResult<Arc<dyn ProcessGroup>>;
}

impl<C: Communicator + Sync + 'static> ProcessGroup for C {
    fn rank(&self) -> usize {
        Communicator::rank(self)
    }
    fn size(&self) -> usize {
        Communicator::size(self)
    }
    fn barrier(&self) -> CommResult<()> {
        Communicator::barrier(self)
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> CommResult<()> {
        self.all_reduce_sum(buf)
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> CommResult<()> {
        self.all_reduce_sum(buf)
    }
    fn all_reduce_u64(&self, buf: &mut [u64]) -> CommResult<()> {
        self.all_reduce_sum(buf)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> CommResult<()> {
        self.broadcast(buf, root)
    }
    fn all_gather_f32(&self, input: &[f32]) -> CommResult<Vec<f32>> {
        self.all_gather(input)
    }
    fn all_gather_u64(&self, input: &[u64]) -> CommResult<Vec<u64>> {
        self.all_gather(input)
    }
    fn reduce_scatter_f32(&self, input: &[f32]) -> CommResult<Vec<f32>> {
        self.reduce_scatter_sum(input)
    }
    fn all_to_all_v_f32(&self, send: &[f32], counts: &[usize]) -> CommResult<(Vec<f32>, Vec<usize>)> {
        self.all_to_all_v(send, counts)
    }
    fn all_to_all_v_known_f32(&self, send: &[f32], send_counts: &[usize], recv_counts: &[usize]) -> CommResult<Vec<f32>> {
        self.all_to_all_v_known(send, send_counts, recv_counts)
    }
    fn all_to_all_v_u64(&self, send: &[u64], counts: &[usize]) -> CommResult<(Vec<u64>, Vec<usize>)> {
        self.all_to_all_v(send, counts)
    }
    fn concurrent_groups(&self) -> bool {
        self.allows_concurrent_groups()
    }
    fn send_f32(&self, data: &[f32], dst: usize, tag: u32) -> CommResult<()> {
        self.send(data, dst, tag)
    }
    fn recv_f32(&self, src: usize, tag: u32) -> CommResult<Vec<f32>> {
        self.recv(src, tag)
    }
    fn flush_sends(&self) -> CommResult<()> {
        Communicator::flush_sends(self)
    }
    fn split_group(&self, color: usize, key: usize) -> CommResult<Arc<dyn ProcessGroup>> {
        Ok(Arc::new(self.split(color, key)?))
    }
}

/// The device mesh of a job: `world = DP × PP × EP` ranks, expert-parallel ranks
/// innermost, then pipeline stages, then data-parallel copies
/// (`rank = (dp_rank · PP + pp_rank) · EP + ep_rank`). An expert-parallel group — the
/// ranks that exchange tokens every MoE layer — sits on neighbouring ranks (one node,
/// when ranks are placed node by node), and the ranks of one pipeline are `EP` apart.
#[derive(Clone)]
pub struct Mesh {
    /// every rank
    pub world: Arc<dyn ProcessGroup>,
    /// the ranks sharing one copy of a stage's experts between them (token exchange)
    pub ep: Arc<dyn ProcessGroup>,
    /// the ranks holding the same experts of the same stage (expert gradients are
    /// summed over it)
    pub dp: Arc<dyn ProcessGroup>,
    /// the ranks holding the same pipeline stage and the same tensor-parallel slice
    /// (`DP × EP`; replicated gradients are summed over it); the world without pipeline
    /// or tensor parallelism
    pub stage: Arc<dyn ProcessGroup>,
    /// the ranks splitting one copy of a stage's attention and dense layers between them
    /// (consecutive world ranks: the innermost dimension); every one of them trains the
    /// same rows
    pub tp: Arc<dyn ProcessGroup>,
    /// the stages of this rank's pipeline (same data- and expert-parallel index), in
    /// stage order: activations and their gradients travel along it
    pub pp: Arc<dyn ProcessGroup>,
    /// consecutive world ranks per node (machine): traffic between nodes is what the
    /// intra/inter-node statistics separate
    pub ranks_per_node: usize,
}

impl Mesh {
    /// Splits `world` into the EP and DP groups (no pipeline). `ep` must divide the
    /// world size.
    pub fn new(world: Arc<dyn ProcessGroup>, ep: usize) -> CommResult<Mesh> {
        Mesh::pipelined(world, 1, ep)
    }

    /// Splits `world` into pipelines of `pp` stages, each stage's ranks into
    /// expert-parallel groups of `ep`. `pp · ep` must divide the world size.
    pub fn pipelined(world: Arc<dyn ProcessGroup>, pp: usize, ep: usize) -> CommResult<Mesh> {
        Mesh::layout(world, 1, pp, ep)
    }

    /// Splits `world` into `DP × PP × EP × TP`, tensor-parallel ranks innermost (on one
    /// node, where its per-layer collectives belong), then expert-parallel, pipeline and
    /// data-parallel: world rank `((d·PP + s)·EP + e)·TP + τ`. The tensor-parallel ranks
    /// of one `(d, s, e)` hold the same experts (the MoE layers run whole on each); the
    /// expert-parallel group of `τ` exchanges tokens among the ranks of its slice.
    /// `tp · pp · ep` must divide the world size.
    pub fn layout(world: Arc<dyn ProcessGroup>, tp: usize, pp: usize, ep: usize) -> CommResult<Mesh> {
        let (r, n) = (world.rank(), world.size());
        if ep == 0 || pp == 0 || tp == 0 || n % (tp * ep * pp) != 0 {
            let mut what = vec![];
            for (flag, v) in [("--tp", tp), ("--pp", pp)] {
                if v != 1 {
                    what.push(format!("{flag} {v}"));
                }
            }
            what.push(format!("--ep {ep}"));
            return Err(crate::CommError { rank: None, reason: format!("{} does not divide {n} ranks", what.join(" × ")) });
        }
        let (tau, e, s, d) = (r % tp, (r / tp) % ep, (r / (tp * ep)) % pp, r / (tp * ep * pp));
        let tp_group = world.split_group(r / tp, tau)?;
        let ep_group = world.split_group((d * pp + s) * tp + tau, e)?;
        let dp_group = world.split_group((s * ep + e) * tp + tau, d)?;
        let stage = world.split_group(s * tp + tau, d * ep + e)?;
        let pp_group = world.split_group((d * ep + e) * tp + tau, s)?;
        Ok(Mesh { world, ep: ep_group, dp: dp_group, stage, tp: tp_group, pp: pp_group, ranks_per_node: n })
    }

    /// The same mesh with nodes of `ranks_per_node` consecutive ranks.
    pub fn with_nodes(mut self, ranks_per_node: usize) -> Mesh {
        self.ranks_per_node = ranks_per_node.max(1);
        self
    }

    /// The node of each rank of this rank's expert-parallel group.
    pub fn ep_nodes(&self) -> Vec<usize> {
        // Expert-parallel ranks are `TP` world ranks apart.
        let stride = self.tp.size();
        let first = self.world.rank() - self.ep.rank() * stride;
        (0..self.ep.size()).map(|k| (first + k * stride) / self.ranks_per_node).collect()
    }

    /// Checks that every rank holds the same `value` (a configuration, as text): ranks
    /// that disagree would run mis-sized collectives, so the job stops at once, naming the
    /// first rank that differs from rank 0.
    pub fn agree(&self, what: &str, value: &str) -> CommResult<()> {
        // FNV-1a: a fingerprint, not a security measure.
        let hash = value.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let all = self.world.all_gather_u64(&[hash])?;
        match all.iter().position(|&h| h != all[0]) {
            Some(r) => Err(crate::CommError { rank: Some(r), reason: format!("started with a different {what} than rank 0") }),
            None => Ok(()),
        }
    }

    /// Expert-parallel size.
    pub fn ep_size(&self) -> usize {
        self.ep.size()
    }
    /// Data-parallel size (copies of each expert).
    pub fn dp_size(&self) -> usize {
        self.dp.size()
    }
    /// Pipeline stages.
    pub fn pp_size(&self) -> usize {
        self.pp.size()
    }
    /// Tensor-parallel size.
    pub fn tp_size(&self) -> usize {
        self.tp.size()
    }
    /// True on the first rank of each pipeline stage (of its first tensor-parallel
    /// slice): the rank that reports the stage's figures.
    pub fn stage_lead(&self) -> bool {
        self.stage.rank() == 0 && self.tp.rank() == 0
    }
    /// True on one rank of each tensor-parallel group (its rank 0): the rank whose
    /// copies of the group's shared results (losses, loads, timings) are counted in sums
    /// over the world.
    pub fn counts_once(&self) -> bool {
        self.tp.rank() == 0
    }
}

impl std::fmt::Debug for dyn ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup(rank {} of {})", self.rank(), self.size())
    }
}
