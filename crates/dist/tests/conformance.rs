//! The conformance suite (`ultramoe_dist::conformance`) on the in-process backend, on
//! world sizes 1–4, and its failure behaviour.

use std::time::{Duration, Instant};
use ultramoe_dist::conformance;
use ultramoe_dist::local::{run, LocalComm};
use ultramoe_dist::Communicator;

#[test]
fn every_check_passes_on_every_size() {
    for n in [1, 2, 3, 4] {
        for (name, check) in conformance::all::<LocalComm>() {
            run(n, Duration::from_secs(10), move |c| check(&c)).unwrap_or_else(|e| panic!("{name} on {n} ranks: {e}"));
        }
    }
}

#[test]
fn a_dying_rank_ends_the_job_with_its_name() {
    let start = Instant::now();
    let err = run(3, Duration::from_secs(20), |c| {
        if c.rank() == 1 {
            panic!("simulated crash");
        }
        let mut x = vec![1.0f32];
        c.all_reduce_sum(&mut x)?;
        Ok(())
    })
    .unwrap_err();
    assert_eq!(err.rank, Some(1), "{err}");
    assert!(err.reason.contains("panicked"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5), "failure took {:?}", start.elapsed());
}

#[test]
fn a_rank_that_leaves_early_or_stalls_is_named() {
    let err = run(2, Duration::from_secs(20), |c| {
        if c.rank() == 0 {
            return Ok(()); // skips the collective and exits
        }
        c.barrier()
    })
    .unwrap_err();
    assert_eq!(err.rank, Some(0), "{err}");
    assert!(err.reason.contains("left"), "{err}");
    let start = Instant::now();
    let err = run(2, Duration::from_millis(300), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(());
        }
        c.barrier()
    })
    .unwrap_err();
    assert_eq!(err.rank, Some(1), "{err}");
    assert!(err.reason.contains("did not reach"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
}
