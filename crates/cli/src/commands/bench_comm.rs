//! `ultramoe bench comm`: all-to-all-v latency and bandwidth against message size.
//!
//! Under `mpirun` (build feature `mpi`) each size is timed three ways, interleaved
//! repetition by repetition so machine noise hits all three alike: ultramoe's exchange
//! as the expert-parallel dispatcher calls it (counts known from the per-expert count
//! exchange), ultramoe's general form (which first exchanges counts), and one plain
//! `MPI_Alltoallv` of the same bytes. With `--ranks N` (no mpirun) the in-process
//! backend is timed alone. A repetition's time is the slowest rank's; the figure is the
//! median over repetitions.

use super::{median, CliResult};
use clap::Args;
use std::time::{Duration, Instant};
use ultramoe_dist::{CommResult, Communicator};

/// Options of `ultramoe bench comm`.
#[derive(Args, Debug, Clone)]
pub struct BenchCommArgs {
    /// Bytes each rank sends to every other rank, one row per size.
    #[arg(long, value_delimiter = ',', default_value = "64,1024,16384,262144,1048576,4194304")]
    pub sizes: Vec<usize>,
    /// Timed repetitions per size.
    #[arg(long, default_value_t = 30)]
    pub reps: usize,
    /// Ranks as threads of this process (in-process backend) when not under mpirun.
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
}

/// A baseline exchange of bytes (plain MPI: send, counts, displacements, receive; the
/// receive side's counts equal the send side's in this benchmark), if available.
type Baseline<'a> = Option<&'a dyn Fn(&[u8], &[i32], &[i32], &mut [u8]) -> CommResult<()>>;

/// Times one repetition: barrier, run, slowest rank's seconds.
fn timed<C: Communicator>(c: &C, f: &mut dyn FnMut() -> CommResult<()>) -> CommResult<f64> {
    c.barrier()?;
    let s = Instant::now();
    f()?;
    let ns = s.elapsed().as_nanos() as u64;
    let all = c.all_gather(&[ns])?;
    Ok(*all.iter().max().unwrap_or(&ns) as f64 * 1e-9)
}

fn bench<C: Communicator>(c: &C, a: &BenchCommArgs, baseline: Baseline) -> CommResult<()> {
    let (p, r) = (c.size(), c.rank());
    if r == 0 {
        println!("all-to-all-v over {p} ranks ({}), median of {} repetitions; time = slowest rank", if baseline.is_some() { "MPI" } else { "in-process threads" }, a.reps);
        print!("{:>10} {:>12} {:>12} {:>12}", "bytes/peer", "ours µs", "+counts µs", "ours GB/s");
        if baseline.is_some() {
            print!(" {:>12} {:>12} {:>10}", "MPI µs", "MPI GB/s", "ours/MPI");
        }
        println!();
    }
    for &bytes in &a.sizes {
        let n = bytes / 4;
        let counts = vec![n; p];
        let send: Vec<f32> = (0..n * p).map(|i| (i % 977) as f32).collect();
        let send_bytes: Vec<u8> = send.iter().flat_map(|x| x.to_le_bytes()).collect();
        let byte_counts = vec![(n * 4) as i32; p];
        let displs: Vec<i32> = (0..p).map(|i| (i * n * 4) as i32).collect();
        let mut recv_bytes = vec![0u8; n * 4 * p];
        let (mut ours, mut general, mut mpi) = (vec![], vec![], vec![]);
        for rep in 0..a.reps + 2 {
            let o = timed(c, &mut || c.all_to_all_v_known(&send, &counts, &counts).map(drop))?;
            let g = timed(c, &mut || c.all_to_all_v(&send, &counts).map(drop))?;
            let m = match baseline {
                Some(f) => Some(timed(c, &mut || f(&send_bytes, &byte_counts, &displs, &mut recv_bytes))?),
                None => None,
            };
            if rep >= 2 {
                ours.push(o);
                general.push(g);
                mpi.extend(m);
            }
        }
        if r == 0 {
            // Bytes each rank puts on the wire (its own segment stays local).
            let wire = (bytes * (p - 1)) as f64;
            let (o, g) = (median(ours), median(general));
            print!("{bytes:>10} {:>12.1} {:>12.1} {:>12.2}", o * 1e6, g * 1e6, wire / o / 1e9);
            if !mpi.is_empty() {
                let m = median(mpi);
                print!(" {:>12.1} {:>12.2} {:>10.2}", m * 1e6, wire / m / 1e9, o / m);
            }
            println!();
        }
    }
    Ok(())
}

/// `ultramoe bench comm`.
pub fn run(a: BenchCommArgs) -> CliResult {
    if crate::launch::mpi_world_size().is_some() {
        return run_mpi(a);
    }
    let ranks = a.ranks.max(1);
    ultramoe_dist::local::run(ranks, Duration::from_secs(60), move |c| bench(&c, &a, None)).map(drop).map_err(|e| e.to_string())
}

#[cfg(feature = "mpi")]
fn run_mpi(a: BenchCommArgs) -> CliResult {
    let world = ultramoe_dist::mpi::world(Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let w = world.clone();
    // The plain program: counts and displacements prepared once, one MPI_Alltoallv per
    // repetition into a reused buffer.
    let plain = move |send: &[u8], sc: &[i32], sd: &[i32], recv: &mut [u8]| {
        w.raw_alltoallv(send, sc, sd, recv, sc, sd);
        Ok(())
    };
    bench(&*world, &a, Some(&plain)).map_err(|e| e.to_string())
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: BenchCommArgs) -> CliResult {
    Err(crate::launch::NO_MPI.into())
}
