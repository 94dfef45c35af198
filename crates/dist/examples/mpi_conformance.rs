//! The conformance suite on the MPI backend:
//! `mpirun -np 4 target/release/examples/mpi_conformance` (build with `--features mpi`).
//! Runs every check twice: with MPI's busy waits, then with sleepy waits
//! ([`ultramoe_dist::mpi::MpiComm::sleep_when_idle`]). Prints one line per check on rank
//! 0; exits non-zero if any check fails.

use std::time::Duration;
use ultramoe_dist::{conformance, Communicator};

fn main() {
    let world = ultramoe_dist::mpi::world(Duration::from_secs(30)).unwrap_or_else(|e| {
        eprintln!("mpi_conformance: {e}");
        std::process::exit(1)
    });
    for (sleepy, wait) in [(false, "spin"), (true, "sleep")] {
        world.sleep_when_idle(sleepy);
        for (name, check) in conformance::all::<ultramoe_dist::mpi::MpiComm>() {
            if let Err(e) = check(&world) {
                eprintln!("mpi_conformance: {name} ({wait} waits): {e}");
                ultramoe_dist::mpi::abort(1);
            }
            if world.rank() == 0 {
                println!("ok  {name} on {} ranks, {wait} waits", world.size());
            }
        }
    }
}
