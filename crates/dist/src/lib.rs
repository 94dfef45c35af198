//! # ultramoe-dist
//!
//! The communication layer of distributed training. [`Communicator`] is the one API the
//! trainer and the expert-parallel dispatcher talk to: collectives (all-reduce,
//! reduce-scatter, all-gather, all-to-all with variable counts, broadcast, barrier),
//! point-to-point messages, and sub-groups by [`Communicator::split`] (as
//! `MPI_Comm_split`). Backends: [`local`] runs N ranks as threads of one process and
//! exchanges through shared memory — no system dependencies, what most tests use; `mpi`
//! (cargo feature `mpi`) runs one rank per process under `mpirun`. Model and trainer
//! code holds groups as `Arc<dyn` [`ProcessGroup`]`>` and the job's [`Mesh`].
//!
//! Reductions add contributions in rank order on every rank, so all ranks hold
//! bitwise-identical results and a run is reproducible for a given world size.
//!
//! Failure is an error value, never a hang: when a rank dies (its thread panics or its
//! communicator is dropped mid-job) or a collective waits longer than the timeout, every
//! other rank's pending and later calls return a [`CommError`] naming the rank and why.
#![deny(missing_docs)]

pub mod conformance;
pub mod group;
pub mod local;
pub mod stream;
#[cfg(feature = "mpi")]
pub mod mpi;

pub use group::{Mesh, ProcessGroup};
pub use stream::{CommStream, Pending};

use std::fmt;

/// The concrete type behind a [`Scalar`], for backends that must name it (MPI's
/// datatypes and reduction operations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalarKind {
    /// `f32`
    F32,
    /// `f64`
    F64,
    /// `u32`
    U32,
    /// `u64` (and `usize`, which is 64 bits on every supported target)
    U64,
    /// `i64`
    I64,
}

/// Element types that can travel through a communicator.
pub trait Scalar: Copy + Default + Send + Sync + 'static + std::ops::Add<Output = Self> {
    /// which type this is
    const KIND: ScalarKind;
}
impl Scalar for f32 {
    const KIND: ScalarKind = ScalarKind::F32;
}
impl Scalar for f64 {
    const KIND: ScalarKind = ScalarKind::F64;
}
impl Scalar for u32 {
    const KIND: ScalarKind = ScalarKind::U32;
}
impl Scalar for u64 {
    const KIND: ScalarKind = ScalarKind::U64;
}
impl Scalar for i64 {
    const KIND: ScalarKind = ScalarKind::I64;
}
#[cfg(target_pointer_width = "64")]
impl Scalar for usize {
    const KIND: ScalarKind = ScalarKind::U64;
}

/// Why a communication failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommError {
    /// the rank the failure is about (the one that died or misbehaved), if known
    pub rank: Option<usize>,
    /// what happened
    pub reason: String,
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(r) => write!(f, "rank {r}: {}", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

impl std::error::Error for CommError {}

/// Result of a communication.
pub type CommResult<T> = Result<T, CommError>;

/// A group of ranks that communicate. Every collective must be called by every rank of
/// the group, in the same order.
pub trait Communicator: Sized + Send {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Waits for every rank.
    fn barrier(&self) -> CommResult<()>;
    /// `buf ← Σ_ranks buf` (summed in rank order on every rank).
    fn all_reduce_sum<T: Scalar>(&self, buf: &mut [T]) -> CommResult<()>;
    /// `buf ← buf of root` on every rank.
    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> CommResult<()>;
    /// Concatenation of every rank's `input` (equal lengths), in rank order.
    fn all_gather<T: Scalar>(&self, input: &[T]) -> CommResult<Vec<T>>;
    /// Sums every rank's `input` (equal lengths, divisible by the group size) and returns
    /// this rank's slice of the sum: chunk `rank` of `size` equal chunks.
    fn reduce_scatter_sum<T: Scalar>(&self, input: &[T]) -> CommResult<Vec<T>>;
    /// All-to-all with variable counts: `send` holds consecutive segments for ranks
    /// `0..size` of lengths `send_counts`; returns the segments addressed to this rank,
    /// concatenated in source-rank order, with their lengths.
    fn all_to_all_v<T: Scalar>(&self, send: &[T], send_counts: &[usize]) -> CommResult<(Vec<T>, Vec<usize>)>;
    /// All-to-all when both sides' counts are already known (`recv_counts[s]` elements
    /// arrive from rank `s`): saves the count exchange, as the expert-parallel dispatcher
    /// knows every count after its per-expert count exchange. Returns the received
    /// segments in source-rank order.
    fn all_to_all_v_known<T: Scalar>(&self, send: &[T], send_counts: &[usize], recv_counts: &[usize]) -> CommResult<Vec<T>> {
        let (recv, counts) = self.all_to_all_v(send, send_counts)?;
        if counts != recv_counts {
            return Err(CommError { rank: Some(self.rank()), reason: format!("all_to_all_v: expected counts {recv_counts:?}, got {counts:?}") });
        }
        Ok(recv)
    }
    /// True when different groups may communicate at the same time from different
    /// threads (the gradient stream alongside the expert-parallel stream).
    fn allows_concurrent_groups(&self) -> bool {
        true
    }
    /// Sends `data` to rank `dst` with a `tag`. Returns at once (the data is copied), so
    /// ranks that send to each other before receiving never wait on each other.
    fn send<T: Scalar>(&self, data: &[T], dst: usize, tag: u32) -> CommResult<()>;
    /// Receives the next message from `src` with `tag` (messages of one sender and tag
    /// arrive in the order sent).
    fn recv<T: Scalar>(&self, src: usize, tag: u32) -> CommResult<Vec<T>>;
    /// Waits until every message this rank sent has left (its buffers freed).
    fn flush_sends(&self) -> CommResult<()> {
        Ok(())
    }
    /// Splits the group: ranks with equal `color` form a new group, ordered by `key`
    /// (ties by current rank). Every rank must call it.
    fn split(&self, color: usize, key: usize) -> CommResult<Self>;
}
