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
#[derive(Args, Clone, Debug, Default)]
pub struct ParallelArgs {
    /// Ranks to run as threads of this process (in-process backend; default 1, or a
    /// plan's device count). Under `mpirun` the ranks are MPI's processes instead.
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Tensor-parallel size: attention heads, dense FFN, shared experts, embedding and
    /// head (by vocabulary) split over TP consecutive ranks that train the same rows
    /// (MoE routers and routed experts run whole on each; heads, key/value heads, FFN
    /// widths and the vocabulary must divide).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Sequence parallelism (with --tp): norms, residuals and MoE blocks on each
    /// tensor-parallel rank's share of the rows; all-gather and reduce-scatter instead of
    /// all-reduces (the same bytes, 1/TP of those activations per rank).
    #[arg(long)]
    pub sequence_parallel: bool,
    /// Pipeline stages: each rank holds a contiguous range of the decoder layers (the
    /// first stage also the embedding, the last the head and loss).
    #[arg(long)]
    pub pp: Option<usize>,
    /// Model chunks per pipeline rank (interleaved 1F1B: rank r holds virtual stages
    /// r, r + PP, …); the micro-batch count must be a multiple of PP.
    #[arg(long)]
    pub vpp: Option<usize>,
    /// Decoder layers of each pipeline stage (PP counts, e.g. 3,4,4,3) or of each
    /// virtual stage (PP × VPP counts); default an even split.
    #[arg(long)]
    pub pp_layers: Option<String>,
    /// Pipeline schedule: `1f1b` (interleaved with --vpp), `gpipe` (all forwards, then
    /// all backwards), or `overlap` (1F1B with each steady-state forward and backward run
    /// together, so one micro-batch's all-to-all hides under the other's compute).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Print every pipeline rank's schedule (F<micro-batch>.<chunk>, B…; pairs run
    /// together as F…+B…) and exit.
    #[arg(long)]
    pub print_schedule: bool,
    /// Expert-parallel size within a stage: each rank holds 1/EP of its layers' experts
    /// (default: the stage's ranks, or those / DP when --dp is given).
    #[arg(long)]
    pub ep: Option<usize>,
    /// Data-parallel size: copies of each expert within a stage (stage ranks / EP).
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
    /// exchanges run while other chunks compute (1: no overlap; default 2).
    #[arg(long)]
    pub overlap_chunks: Option<usize>,
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
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MpiWait {
    /// sleep when ranks outnumber cores
    #[default]
    Auto,
    /// busy wait
    Spin,
    /// poll with sleeps
    Sleep,
}

/// A job's layout: tensor-parallel, pipeline, expert-parallel and data-parallel sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// tensor-parallel size
    pub tp: usize,
    /// pipeline stages
    pub pp: usize,
    /// expert-parallel size
    pub ep: usize,
    /// data-parallel size
    pub dp: usize,
}

impl ParallelArgs {
    /// Checks the flags' own values (every command that launches calls it first).
    pub fn check(&self) -> CliResult {
        for (flag, v) in [("--ranks", self.ranks), ("--overlap-chunks", self.overlap_chunks), ("--ranks-per-node", self.ranks_per_node), ("--tp", self.tp), ("--pp", self.pp), ("--vpp", self.vpp), ("--ep", self.ep), ("--dp", self.dp)] {
            if v == Some(0) {
                return Err(format!("{flag}: must be at least 1, found 0"));
            }
        }
        if self.comm_timeout == 0 {
            return Err("--comm-timeout: must be at least 1 second, found 0".into());
        }
        Ok(())
    }

    /// Ranks in the job: MPI's processes under `mpirun`, else `--ranks` (default 1).
    pub fn world(&self) -> usize {
        mpi_world_size().unwrap_or(self.ranks.unwrap_or(1))
    }

    /// True when more than one rank will run.
    pub fn is_parallel(&self) -> bool {
        self.world() > 1
    }

    /// True when a layout flag (--tp, --pp, --ep, --dp) was given.
    pub fn sets_layout(&self) -> bool {
        self.tp.is_some() || self.pp.is_some() || self.ep.is_some() || self.dp.is_some()
    }

    /// The layout for a world of `n` ranks: the flags', with the expert-parallel size
    /// taking the stage's ranks the others leave.
    pub fn layout_for(&self, n: usize) -> CliResult<Layout> {
        self.check()?;
        let (tp, pp) = (self.tp.unwrap_or(1), self.pp.unwrap_or(1));
        if !n.is_multiple_of(tp * pp) {
            let what = if tp > 1 { format!("--tp {tp} × --pp {pp}") } else { format!("--pp {pp}") };
            return Err(format!("{what} does not divide {n} ranks"));
        }
        let stage = n / (tp * pp);
        let ep = match (self.ep, self.dp) {
            (Some(ep), _) => ep,
            (None, Some(dp)) if stage.is_multiple_of(dp) => stage / dp,
            (None, Some(dp)) => return Err(format!("--dp {dp} does not divide the {stage} ranks of a stage")),
            (None, None) => stage,
        };
        if !stage.is_multiple_of(ep) {
            return Err(format!("--ep {ep} does not divide the {stage} ranks of a stage ({n} ranks over {pp} pipeline stages)"));
        }
        let dp = stage / ep;
        if self.dp.is_some_and(|d| d != dp) {
            return Err(format!("--tp {tp} × --pp {pp} × --ep {ep} × --dp {} must equal the {n} ranks", self.dp.unwrap_or(1)));
        }
        Ok(Layout { tp, pp, ep, dp })
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

/// Runs `f` on every rank of `layout` (or once, with no mesh, for a single rank) and
/// returns rank 0's result. `f` learns whether the ranks are threads of this process.
pub fn launch<T: Send + 'static>(p: &ParallelArgs, layout: Layout, f: impl Fn(Option<Mesh>, bool) -> CliResult<T> + Send + Sync + 'static) -> CliResult<T> {
    p.check()?;
    let timeout = Duration::from_secs(p.comm_timeout);
    if let Some(n) = mpi_world_size() {
        if p.ranks.is_some_and(|r| r > 1) {
            return Err("--ranks runs ranks as threads; under mpirun the ranks are MPI's processes (drop --ranks)".into());
        }
        return launch_mpi(p, layout, n, timeout, f);
    }
    let n = p.ranks.unwrap_or(1);
    if n <= 1 {
        return f(None, false);
    }
    let rpn = p.ranks_per_node;
    let f = Arc::new(f);
    let results = local::run(n, timeout, move |c| {
        let rank = ultramoe_dist::Communicator::rank(&c);
        let world: Arc<dyn ProcessGroup> = Arc::new(c);
        let mesh = Mesh::layout(world, layout.tp, layout.pp, layout.ep)?;
        let mesh = match rpn {
            Some(r) => mesh.with_nodes(r),
            None => mesh,
        };
        f(Some(mesh), true).map_err(|reason| CommError { rank: Some(rank), reason })
    })
    .map_err(|e| e.to_string())?;
    results.into_iter().next().ok_or_else(|| "no ranks ran".to_string())
}

#[cfg(feature = "mpi")]
fn launch_mpi<T>(p: &ParallelArgs, layout: Layout, n: usize, timeout: Duration, f: impl Fn(Option<Mesh>, bool) -> CliResult<T>) -> CliResult<T> {
    let world = ultramoe_dist::mpi::world(timeout).map_err(|e| e.to_string())?;
    let rank = ultramoe_dist::Communicator::rank(&*world);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    world.sleep_when_idle(match p.mpi_wait {
        MpiWait::Spin => false,
        MpiWait::Sleep => true,
        MpiWait::Auto => local_ranks().unwrap_or(n) > cores,
    });
    let result = Mesh::layout(world, layout.tp, layout.pp, layout.ep)
        .map_err(|e| e.to_string())
        .map(|m| m.with_nodes(p.ranks_per_node.unwrap_or_else(|| local_ranks().unwrap_or(n))))
        .and_then(|mesh| f(Some(mesh), false));
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
fn launch_mpi<T>(_: &ParallelArgs, _: Layout, _: usize, _: Duration, _: impl Fn(Option<Mesh>, bool) -> CliResult<T>) -> CliResult<T> {
    Err(NO_MPI.into())
}

