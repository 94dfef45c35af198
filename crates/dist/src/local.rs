//! The in-process backend: `N` ranks as threads, exchanging through shared memory.
//!
//! Every collective is one rendezvous: each rank deposits its contribution, the last to
//! arrive opens the round for reading, each rank computes its result from the shared
//! deposits, and the last reader closes the round. Results are computed identically on
//! every rank (reductions in rank order), so they are bitwise equal across ranks.

use crate::{CommError, CommResult, Communicator, Scalar};
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a rank waits for the others before declaring the job stuck.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a waiting rank re-checks for failures raised in other groups.
const POLL: Duration = Duration::from_millis(20);

type Deposit = Arc<dyn Any + Send + Sync>;

/// State shared by every group of one job: the first failure.
#[derive(Default)]
struct World {
    failed: Mutex<Option<CommError>>,
}

impl World {
    fn failure(&self) -> Option<CommError> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn fail(&self, e: CommError) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }
}

#[derive(Default)]
struct State {
    /// round being collected (`reading == false`) or read (`reading == true`)
    reading: bool,
    deposits: Vec<Option<Deposit>>,
    arrived: usize,
    readers_done: usize,
    /// ranks whose handle is gone
    exited: Vec<bool>,
    mailboxes: HashMap<(usize, usize, u32), VecDeque<Deposit>>,
}

/// One group's rendezvous.
struct Group {
    size: usize,
    /// world ranks of the members, by group rank
    world_ranks: Vec<usize>,
    state: Mutex<State>,
    cv: Condvar,
}

/// A rank's handle on a group of the in-process backend.
pub struct LocalComm {
    rank: usize,
    group: Arc<Group>,
    world: Arc<World>,
    timeout: Duration,
}

impl LocalComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.group.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn world_rank(&self, r: usize) -> usize {
        self.group.world_ranks[r]
    }

    /// Waits on the group's condition until `ready` holds, a failure is raised, a rank
    /// that is needed has left, or the timeout passes.
    fn wait<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        what: &str,
        mut ready: impl FnMut(&State) -> bool,
        missing: impl Fn(&State) -> Vec<usize>,
    ) -> CommResult<MutexGuard<'a, State>> {
        let start = Instant::now();
        loop {
            if ready(&st) {
                return Ok(st);
            }
            if let Some(e) = self.world.failure() {
                return Err(e);
            }
            let gone: Vec<usize> = missing(&st).into_iter().filter(|&r| st.exited[r]).collect();
            if let Some(&r) = gone.first() {
                let e = CommError { rank: Some(self.world_rank(r)), reason: format!("left the job while others waited in {what}") };
                self.world.fail(e.clone());
                self.group.cv.notify_all();
                return Err(e);
            }
            if start.elapsed() > self.timeout {
                let m: Vec<usize> = missing(&st).into_iter().map(|r| self.world_rank(r)).collect();
                let e = CommError {
                    rank: m.first().copied(),
                    reason: format!("did not reach {what} within {:.0} s (waiting for ranks {m:?})", self.timeout.as_secs_f64()),
                };
                self.world.fail(e.clone());
                self.group.cv.notify_all();
                return Err(e);
            }
            st = self.group.cv.wait_timeout(st, POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The rendezvous: deposits `mine`, returns every rank's deposit in rank order.
    fn exchange<T: Send + Sync + 'static>(&self, what: &str, mine: T) -> CommResult<Vec<Arc<T>>> {
        let n = self.group.size;
        let st = self.lock();
        // A previous round may still be being read by slower ranks.
        let mut st = self.wait(st, what, |s| !s.reading, |_| vec![])?;
        if st.deposits.len() != n {
            st.deposits = vec![None; n];
        }
        st.deposits[self.rank] = Some(Arc::new(mine));
        st.arrived += 1;
        if st.arrived == n {
            st.reading = true;
            self.group.cv.notify_all();
        }
        let mut st = self.wait(st, what, |s| s.reading, |s| (0..n).filter(|&r| s.deposits[r].is_none()).collect())?;
        let all: Vec<Arc<T>> = st
            .deposits
            .iter()
            .map(|d| d.clone().expect("every rank deposited").downcast::<T>().expect("ranks called the same collective"))
            .collect();
        st.readers_done += 1;
        if st.readers_done == n {
            st.deposits.iter_mut().for_each(|d| *d = None);
            st.arrived = 0;
            st.readers_done = 0;
            st.reading = false;
            self.group.cv.notify_all();
        }
        Ok(all)
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.exited[self.rank] = true;
        if std::thread::panicking() {
            self.world.fail(CommError { rank: Some(self.world_rank(self.rank)), reason: "panicked".into() });
        }
        drop(st);
        self.group.cv.notify_all();
    }
}

fn check_counts(counts: &[usize], n: usize, len: usize) -> CommResult<()> {
    if counts.len() != n || counts.iter().sum::<usize>() != len {
        return Err(CommError {
            rank: None,
            reason: format!("all_to_all_v: {} counts summing to {} for {n} ranks and {len} elements", counts.len(), counts.iter().sum::<usize>()),
        });
    }
    Ok(())
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn barrier(&self) -> CommResult<()> {
        self.exchange("barrier", ()).map(|_| ())
    }

    fn all_reduce_sum<T: Scalar>(&self, buf: &mut [T]) -> CommResult<()> {
        let all = self.exchange("all_reduce", buf.to_vec())?;
        if all.iter().any(|v| v.len() != buf.len()) {
            return Err(CommError { rank: None, reason: "all_reduce: ranks passed buffers of different lengths".into() });
        }
        for (i, x) in buf.iter_mut().enumerate() {
            let mut s = T::default();
            for v in &all {
                s = s + v[i];
            }
            *x = s;
        }
        Ok(())
    }

    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> CommResult<()> {
        let mine = if self.rank == root { buf.to_vec() } else { Vec::new() };
        let all = self.exchange("broadcast", mine)?;
        if all[root].len() != buf.len() {
            return Err(CommError { rank: Some(root), reason: "broadcast: buffer lengths differ from the root's".into() });
        }
        buf.copy_from_slice(&all[root]);
        Ok(())
    }

    fn all_gather<T: Scalar>(&self, input: &[T]) -> CommResult<Vec<T>> {
        let all = self.exchange("all_gather", input.to_vec())?;
        Ok(all.iter().flat_map(|v| v.iter().copied()).collect())
    }

    fn reduce_scatter_sum<T: Scalar>(&self, input: &[T]) -> CommResult<Vec<T>> {
        let n = self.group.size;
        if !input.len().is_multiple_of(n) {
            return Err(CommError { rank: None, reason: format!("reduce_scatter: {} elements do not split over {n} ranks", input.len()) });
        }
        let chunk = input.len() / n;
        let all = self.exchange("reduce_scatter", input.to_vec())?;
        let lo = self.rank * chunk;
        Ok((lo..lo + chunk)
            .map(|i| {
                let mut s = T::default();
                for v in &all {
                    s = s + v[i];
                }
                s
            })
            .collect())
    }

    fn all_to_all_v<T: Scalar>(&self, send: &[T], send_counts: &[usize]) -> CommResult<(Vec<T>, Vec<usize>)> {
        check_counts(send_counts, self.group.size, send.len())?;
        let all = self.exchange("all_to_all_v", (send.to_vec(), send_counts.to_vec()))?;
        let mut out = Vec::new();
        let mut counts = Vec::with_capacity(all.len());
        for peer in &all {
            let (data, c) = (&peer.0, &peer.1);
            let off: usize = c[..self.rank].iter().sum();
            out.extend_from_slice(&data[off..off + c[self.rank]]);
            counts.push(c[self.rank]);
        }
        Ok((out, counts))
    }

    fn send<T: Scalar>(&self, data: &[T], dst: usize, tag: u32) -> CommResult<()> {
        let mut st = self.lock();
        let d: Deposit = Arc::new(data.to_vec());
        st.mailboxes.entry((self.rank, dst, tag)).or_default().push_back(d);
        drop(st);
        self.group.cv.notify_all();
        Ok(())
    }

    fn recv<T: Scalar>(&self, src: usize, tag: u32) -> CommResult<Vec<T>> {
        let key = (src, self.rank, tag);
        let st = self.lock();
        let mut st = self.wait(st, "recv", |s| s.mailboxes.get(&key).is_some_and(|q| !q.is_empty()), |_| vec![src])?;
        let d = st.mailboxes.get_mut(&key).and_then(|q| q.pop_front()).expect("message present");
        d.downcast::<Vec<T>>()
            .map(|v| v.as_ref().clone())
            .map_err(|_| CommError { rank: Some(self.world_rank(src)), reason: "sent a different element type".into() })
    }

    fn split(&self, color: usize, key: usize) -> CommResult<Self> {
        let all = self.exchange("split", (color, key))?;
        let mut members: Vec<(usize, usize)> = all.iter().enumerate().filter(|(_, ck)| ck.0 == color).map(|(r, ck)| (ck.1, r)).collect();
        members.sort();
        let my_rank = members.iter().position(|&(_, r)| r == self.rank).expect("self is a member");
        // The group's first member creates it; everyone picks up its leader's.
        let created = (my_rank == 0).then(|| {
            Arc::new(Group {
                size: members.len(),
                world_ranks: members.iter().map(|&(_, r)| self.world_rank(r)).collect(),
                state: Mutex::new(State { exited: vec![false; members.len()], ..State::default() }),
                cv: Condvar::new(),
            })
        });
        let groups = self.exchange("split", created)?;
        let leader = members[0].1;
        let group = groups[leader].as_ref().clone().expect("leader created the group");
        Ok(LocalComm { rank: my_rank, group, world: self.world.clone(), timeout: self.timeout })
    }
}

/// Creates the `n` handles of a new job (one per rank, to be moved into its thread).
pub fn world(n: usize, timeout: Duration) -> Vec<LocalComm> {
    let group = Arc::new(Group {
        size: n,
        world_ranks: (0..n).collect(),
        state: Mutex::new(State { exited: vec![false; n], ..State::default() }),
        cv: Condvar::new(),
    });
    let world = Arc::new(World::default());
    (0..n).map(|rank| LocalComm { rank, group: group.clone(), world: world.clone(), timeout }).collect()
}

/// Runs `f` on `n` ranks, one thread each, and returns every rank's result in rank
/// order. A rank that panics or fails makes the whole job return the first error.
///
/// Each rank runs on a thread pool of its own share of the caller's (`threads / n`
/// workers, at least one), as a process has its own cores: its kernels split their work
/// among its workers directly — from a thread outside any pool every parallel kernel
/// hands its work over and sleeps until it is done — and a rank that waits for another
/// never holds a worker the other needs, which on one shared pool it could.
pub fn run<T: Send + 'static>(n: usize, timeout: Duration, f: impl Fn(LocalComm) -> CommResult<T> + Send + Sync + 'static) -> CommResult<Vec<T>> {
    let f = Arc::new(f);
    let workers = (rayon::current_num_threads() / n.max(1)).max(1);
    let handles: Vec<_> = world(n, timeout)
        .into_iter()
        .map(|c| {
            let f = f.clone();
            let rank = c.rank;
            std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(workers).thread_name(move |i| format!("rank-{rank}-worker-{i}")).build();
                    match pool {
                        Ok(pool) => pool.install(|| f(c)),
                        Err(e) => Err(CommError { rank: Some(rank), reason: format!("cannot start its threads: {e}") }),
                    }
                })
                .expect("spawn rank thread")
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    let mut first_err: Option<CommError> = None;
    for (rank, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                let e = CommError { rank: Some(rank), reason: format!("panicked: {}", msg.unwrap_or_default()) };
                // A panic is the root cause; prefer it over the errors it caused elsewhere.
                if first_err.as_ref().is_none_or(|f| f.rank != Some(rank)) {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
