//! The conformance suite every backend must pass. Each check runs on several world
//! sizes; the in-process backend runs it here (an MPI backend runs the same checks).

use std::time::{Duration, Instant};
use ultramoe_dist::local::{run, LocalComm};
use ultramoe_dist::{CommResult, Communicator};

/// A deterministic value that identifies (rank, index).
fn val(rank: usize, i: usize) -> f32 {
    (rank * 1000 + i) as f32 * 0.5
}

fn on_all_sizes(check: fn(LocalComm) -> CommResult<()>) {
    for n in [1, 2, 3, 4] {
        run(n, Duration::from_secs(10), check).unwrap_or_else(|e| panic!("world size {n}: {e}"));
    }
}

#[test]
fn all_reduce_sums_in_rank_order() {
    on_all_sizes(|c| {
        let n = c.size();
        let mut buf: Vec<f32> = (0..7).map(|i| val(c.rank(), i)).collect();
        c.all_reduce_sum(&mut buf)?;
        for (i, x) in buf.iter().enumerate() {
            let expect: f32 = (0..n).map(|r| val(r, i)).fold(0.0, |a, b| a + b);
            assert_eq!(*x, expect);
        }
        let mut ints = vec![c.rank() as u64 + 1; 3];
        c.all_reduce_sum(&mut ints)?;
        assert_eq!(ints, vec![(n * (n + 1) / 2) as u64; 3]);
        Ok(())
    });
}

#[test]
fn broadcast_all_gather_reduce_scatter() {
    on_all_sizes(|c| {
        let (n, r) = (c.size(), c.rank());
        let mut b: Vec<f32> = if r == n - 1 { vec![3.0, 1.0, 4.0] } else { vec![0.0; 3] };
        c.broadcast(&mut b, n - 1)?;
        assert_eq!(b, vec![3.0, 1.0, 4.0]);
        let g = c.all_gather(&[val(r, 0), val(r, 1)])?;
        let expect: Vec<f32> = (0..n).flat_map(|p| [val(p, 0), val(p, 1)]).collect();
        assert_eq!(g, expect);
        let input: Vec<f32> = (0..2 * n).map(|i| val(r, i)).collect();
        let mine = c.reduce_scatter_sum(&input)?;
        let expect: Vec<f32> = (2 * r..2 * r + 2).map(|i| (0..n).map(|p| val(p, i)).fold(0.0, |a, b| a + b)).collect();
        assert_eq!(mine, expect);
        c.barrier()
    });
}

#[test]
fn all_to_all_v_delivers_every_segment() {
    on_all_sizes(|c| {
        let (n, r) = (c.size(), c.rank());
        // rank r sends (r + d) % 3 elements to rank d, each tagged with (r, d, k)
        let counts: Vec<usize> = (0..n).map(|d| (r + d) % 3).collect();
        let send: Vec<f32> = (0..n).flat_map(|d| (0..counts[d]).map(move |k| (r * 100 + d * 10 + k) as f32)).collect();
        let (recv, rc) = c.all_to_all_v(&send, &counts)?;
        let expect_counts: Vec<usize> = (0..n).map(|s| (s + r) % 3).collect();
        assert_eq!(rc, expect_counts);
        let expect: Vec<f32> = (0..n).flat_map(|s| (0..(s + r) % 3).map(move |k| (s * 100 + r * 10 + k) as f32)).collect();
        assert_eq!(recv, expect);
        // counts travel as integers too
        let (rc2, _) = c.all_to_all_v(&counts, &vec![1; n])?;
        assert_eq!(rc2, expect_counts);
        Ok(())
    });
}

#[test]
fn point_to_point_in_a_ring() {
    on_all_sizes(|c| {
        let (n, r) = (c.size(), c.rank());
        c.send(&[r as f32; 4], (r + 1) % n, 7)?;
        c.send(&[r as u64], (r + 1) % n, 8)?;
        let got: Vec<f32> = c.recv((r + n - 1) % n, 7)?;
        assert_eq!(got, vec![((r + n - 1) % n) as f32; 4]);
        let got: Vec<u64> = c.recv((r + n - 1) % n, 8)?;
        assert_eq!(got, vec![((r + n - 1) % n) as u64]);
        Ok(())
    });
}

#[test]
fn split_makes_independent_groups() {
    run(4, Duration::from_secs(10), |c| {
        let r = c.rank();
        // Two "expert-parallel" groups {0,1}, {2,3} and two "data-parallel" groups {0,2}, {1,3}.
        let ep = c.split(r / 2, r)?;
        let dp = c.split(r % 2, r)?;
        assert_eq!((ep.size(), ep.rank()), (2, r % 2));
        assert_eq!((dp.size(), dp.rank()), (2, r / 2));
        let mut a = vec![r as f32];
        ep.all_reduce_sum(&mut a)?;
        assert_eq!(a[0], if r < 2 { 1.0 } else { 5.0 });
        let mut b = vec![r as f32];
        dp.all_reduce_sum(&mut b)?;
        assert_eq!(b[0], if r % 2 == 0 { 2.0 } else { 4.0 });
        // key reverses the order inside a group
        let rev = c.split(0, 3 - r)?;
        assert_eq!(rev.rank(), 3 - r);
        Ok(())
    })
    .unwrap();
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
