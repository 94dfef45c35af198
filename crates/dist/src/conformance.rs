//! Checks every backend must pass, generic over the [`Communicator`]: the in-process
//! backend runs them on world sizes 1–4 in `cargo test`, the MPI backend under `mpirun`
//! (`examples/mpi_conformance.rs`). They panic on a wrong result.

use crate::{CommResult, Communicator};

/// A deterministic value that identifies (rank, index).
fn val(rank: usize, i: usize) -> f32 {
    (rank * 1000 + i) as f32 * 0.5
}

/// One check, run by every rank of a group.
pub type Check<C> = fn(&C) -> CommResult<()>;

/// Every check, in order, with its name.
pub fn all<C: Communicator>() -> Vec<(&'static str, Check<C>)> {
    vec![
        ("all_reduce", all_reduce_sums_in_rank_order::<C>),
        ("broadcast/all_gather/reduce_scatter", broadcast_all_gather_reduce_scatter::<C>),
        ("all_to_all_v", all_to_all_v_delivers_every_segment::<C>),
        ("send/recv", point_to_point_in_a_ring::<C>),
        ("large sends both ways", large_sends_both_ways_before_receiving::<C>),
        ("split", split_makes_independent_groups::<C>),
    ]
}

/// Sums in rank order (f32 and integers).
pub fn all_reduce_sums_in_rank_order<C: Communicator>(c: &C) -> CommResult<()> {
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
}

/// Broadcast from the last rank, all-gather, reduce-scatter.
pub fn broadcast_all_gather_reduce_scatter<C: Communicator>(c: &C) -> CommResult<()> {
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
}

/// Variable-count all-to-all, including empty segments.
pub fn all_to_all_v_delivers_every_segment<C: Communicator>(c: &C) -> CommResult<()> {
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
    let again = c.all_to_all_v_known(&send, &counts, &expect_counts)?;
    assert_eq!(again, expect);
    let (rc2, _) = c.all_to_all_v(&counts, &vec![1; n])?;
    assert_eq!(rc2, expect_counts);
    Ok(())
}

/// Messages around a ring, two tags.
pub fn point_to_point_in_a_ring<C: Communicator>(c: &C) -> CommResult<()> {
    let (n, r) = (c.size(), c.rank());
    c.send(&[r as f32; 4], (r + 1) % n, 7)?;
    c.send(&[r as u64], (r + 1) % n, 8)?;
    let got: Vec<f32> = c.recv((r + n - 1) % n, 7)?;
    assert_eq!(got, vec![((r + n - 1) % n) as f32; 4]);
    let got: Vec<u64> = c.recv((r + n - 1) % n, 8)?;
    assert_eq!(got, vec![((r + n - 1) % n) as u64]);
    Ok(())
}

/// Every rank sends 4 MiB to both neighbours, in both directions, before receiving
/// anything, and the messages of one tag arrive in the order sent: pipeline stages send
/// activations forward and gradients backward at the same time, which deadlocks where a
/// send waits for its receive.
pub fn large_sends_both_ways_before_receiving<C: Communicator>(c: &C) -> CommResult<()> {
    let (n, r) = (c.size(), c.rank());
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let big = |from: usize, k: usize| -> Vec<f32> { (0..1 << 20).map(|i| (from * 7 + k * 3 + i % 5) as f32).collect() };
    for k in 0..2 {
        c.send(&big(r, k), next, 20)?;
        c.send(&big(r, k + 10), prev, 21)?;
    }
    for k in 0..2 {
        assert!(c.recv::<f32>(prev, 20)? == big(prev, k), "message {k} from the rank before");
        assert!(c.recv::<f32>(next, 21)? == big(next, k + 10), "message {k} from the rank after");
    }
    c.flush_sends()?;
    c.barrier()
}

/// Pairs of neighbouring ranks ("expert-parallel") and same-parity ranks
/// ("data-parallel") as sub-groups; on odd world sizes the last pair is a single rank.
pub fn split_makes_independent_groups<C: Communicator>(c: &C) -> CommResult<()> {
    let (n, r) = (c.size(), c.rank());
    let ep = c.split(r / 2, r)?;
    let dp = c.split(r % 2, r)?;
    let pair: Vec<usize> = (r / 2 * 2..(r / 2 * 2 + 2).min(n)).collect();
    let parity: Vec<usize> = (0..n).filter(|k| k % 2 == r % 2).collect();
    assert_eq!((ep.size(), ep.rank()), (pair.len(), r % 2));
    assert_eq!((dp.size(), dp.rank()), (parity.len(), r / 2));
    let mut a = vec![r as f32];
    ep.all_reduce_sum(&mut a)?;
    assert_eq!(a[0], pair.iter().sum::<usize>() as f32);
    let mut b = vec![r as f32];
    dp.all_reduce_sum(&mut b)?;
    assert_eq!(b[0], parity.iter().sum::<usize>() as f32);
    // key reverses the order inside a group
    let rev = c.split(0, n - 1 - r)?;
    assert_eq!(rev.rank(), n - 1 - r);
    Ok(())
}
