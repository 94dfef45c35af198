//! Starting the ranks of a distributed job: as threads of this process (`--ranks N`,
//! the in-process backend) or, when started by `mpirun` in a build with the `mpi`
//! feature, one rank per process. Either way every rank runs the same function with its
//! [`Mesh`]; a failing rank ends the whole job with an error naming it.

use crate::commands::CliResult;
use clap::Args;
use std::sync::Arc;
use std::time::Duration;
use ultramoe_dist::{local, CommError, Mesh, ProcessGroup};

/// Parallelism options shared by the commands that train.
#[derive(Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Ranks to run as threads of this process (in-process backend). Under `mpirun`
    /// the ranks are MPI's processes instead.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Expert-parallel size: each rank holds 1/EP of every layer's experts (default:
    /// all ranks, or ranks / DP when --dp is given).
    #[arg(long)]
    pub ep: Option<usize>,
    /// Data-parallel size: copies of each expert (ranks / EP).
    #[arg(long)]
    pub dp: Option<usize>,
    /// Consecutive ranks per node (machine), for the intra/inter-node traffic figures
    /// (default: all ranks on one node).
    #[arg(long)]
    pub ranks_per_node: Option<usize>,
    /// Hierarchical all-to-all: a token crosses to each remote node once and is fanned
    /// out to its experts inside that node (needs several nodes of several ranks).
    #[arg(long)]
    pub hierarchical_a2a: bool,
    /// Token chunks each expert-parallel MoE layer pipelines against its all-to-all, so
    /// exchanges run while other chunks compute (1: no overlap).
    #[arg(long, default_value_t = ultramoe_model::model::DEFAULT_OVERLAP_CHUNKS)]
    pub overlap_chunks: usize,
    /// Seconds a rank waits for the others before the job is declared stuck.
    #[arg(long, default_value_t = 30)]
    pub comm_timeout: u64,
    /// How MPI ranks wait for collectives: `spin` (MPI's busy wait: lowest latency),
    /// `sleep` (poll, sleeping between polls: leaves the core to busy ranks), or `auto`
    /// (sleep when this machine's ranks outnumber the cores a rank may use).
    #[arg(long, value_enum, default_value_t = MpiWait::Auto)]
    pub mpi_wait: MpiWait,
}

/// See [`ParallelArgs::mpi_wait`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpiWait {
    /// sleep when ranks outnumber cores
    Auto,
    /// busy wait
    Spin,
    /// poll with sleeps
    Sleep,
}

impl ParallelArgs {
    /// True when more than one rank will run.
    pub fn is_parallel(&self) -> bool {
        self.ranks > 1 || mpi_world_size().is_some_and(|n| n > 1)
    }

    /// The expert-parallel size for a world of `n` ranks.
    fn ep_for(&self, n: usize) -> CliResult<usize> {
        let ep = match (self.ep, self.dp) {
            (Some(ep), _) => ep,
            (None, Some(dp)) if dp > 0 && n.is_multiple_of(dp) => n / dp,
            (None, Some(dp)) => return Err(format!("--dp {dp} does not divide {n} ranks")),
            (None, None) => n,
        };
        if ep == 0 || !n.is_multiple_of(ep) {
            return Err(format!("--ep {ep} does not divide {n} ranks"));
        }
        if let Some(dp) = self.dp {
            if dp * ep != n {
                return Err(format!("--ep {ep} × --dp {dp} must equal the {n} ranks"));
            }
        }
        Ok(ep)
    }
}

/// Ranks in the MPI job this process belongs to, if it was started by `mpirun`.
pub fn mpi_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// This process's rank in the MPI job, if it was started by `mpirun`.
pub fn mpi_world_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Ranks MPI started on this process's host (OpenMPI's local size), when known.
#[cfg(feature = "mpi")]
fn local_ranks() -> Option<usize> {
    std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok()?.parse().ok()
}

/// Runs `f` on every rank (or once, with no mesh, for a single rank) and returns rank
/// 0's result.
pub fn launch<T: Send + 'static>(p: &ParallelArgs, f: impl Fn(Option<Mesh>) -> CliResult<T> + Send + Sync + 'static) -> CliResult<T> {
    for (flag, v) in [("--ranks", Some(p.ranks)), ("--overlap-chunks", Some(p.overlap_chunks)), ("--ranks-per-node", p.ranks_per_node), ("--ep", p.ep), ("--dp", p.dp)] {
        if v == Some(0) {
            return Err(format!("{flag}: must be at least 1, found 0"));
        }
    }
    if p.comm_timeout == 0 {
        return Err("--comm-timeout: must be at least 1 second, found 0".into());
    }
    let timeout = Duration::from_secs(p.comm_timeout);
    if let Some(n) = mpi_world_size() {
        if p.ranks > 1 {
            return Err("--ranks runs ranks as threads; under mpirun the ranks are MPI's processes (drop --ranks)".into());
        }
        return launch_mpi(p, n, timeout, f);
    }
    if p.ranks <= 1 && p.ep.unwrap_or(1) == 1 && p.dp.unwrap_or(1) == 1 {
        return f(None);
    }
    let ep = p.ep_for(p.ranks)?;
    let rpn = p.ranks_per_node;
    let f = Arc::new(f);
    let results = local::run(p.ranks, timeout, move |c| {
        let rank = ultramoe_dist::Communicator::rank(&c);
        let world: Arc<dyn ProcessGroup> = Arc::new(c);
        let mesh = Mesh::new(world, ep)?;
        let mesh = match rpn {
            Some(r) => mesh.with_nodes(r),
            None => mesh,
        };
        f(Some(mesh)).map_err(|reason| CommError { rank: Some(rank), reason })
    })
    .map_err(|e| e.to_string())?;
    results.into_iter().next().ok_or_else(|| "no ranks ran".to_string())
}

#[cfg(feature = "mpi")]
fn launch_mpi<T>(p: &ParallelArgs, n: usize, timeout: Duration, f: impl Fn(Option<Mesh>) -> CliResult<T>) -> CliResult<T> {
    let world = ultramoe_dist::mpi::world(timeout).map_err(|e| e.to_string())?;
    let rank = ultramoe_dist::Communicator::rank(&*world);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    world.sleep_when_idle(match p.mpi_wait {
        MpiWait::Spin => false,
        MpiWait::Sleep => true,
        MpiWait::Auto => local_ranks().unwrap_or(n) > cores,
    });
    let result = p
        .ep_for(n)
        .and_then(|ep| Mesh::new(world, ep).map_err(|e| e.to_string()))
        .map(|m| m.with_nodes(p.ranks_per_node.unwrap_or_else(|| local_ranks().unwrap_or(n))))
        .and_then(|mesh| f(Some(mesh)));
    result.or_else(|e| {
        // End every rank now: the others may be waiting on this one in a collective.
        eprintln!("ultramoe: error: rank {rank}: {e}");
        ultramoe_dist::mpi::abort(1)
    })
}

/// What a build without the `mpi` feature says when started by `mpirun`.
#[cfg(not(feature = "mpi"))]
pub const NO_MPI: &str = "started by mpirun, but this ultramoe was built without MPI: rebuild with `cargo build --release --features mpi`";

#[cfg(not(feature = "mpi"))]
fn launch_mpi<T>(_: &ParallelArgs, _: usize, _: Duration, _: impl Fn(Option<Mesh>) -> CliResult<T>) -> CliResult<T> {
    Err(NO_MPI.into())
}

