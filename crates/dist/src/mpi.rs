//! The MPI backend (cargo feature `mpi`): one rank per process, started by `mpirun`,
//! through rsmpi over the system's MPI (OpenMPI on Debian).
//!
//! Data moves as bytes (`MPI_BYTE`) except in reductions, which need the element type
//! for `MPI_SUM`. Reductions are MPI's own (`MPI_Allreduce`, `MPI_Reduce_scatter_block`):
//! every rank receives the same result, which keeps replicated weights identical.
//!
//! Failure: MPI calls block without a timeout, so a watchdog thread per process watches
//! the collective in flight. A call that makes no progress for the timeout (a peer is
//! stalled or gone) prints which rank waited in which operation and aborts the whole job
//! (`MPI_Abort`). A process that dies is reported by `mpirun`, which ends the job.
//!
//! Waiting: MPI waits by polling, which burns a core. When ranks outnumber the cores (or
//! each rank has a CPU quota, as in `scripts/emulated-devices.sh`) that core is the one
//! a busy rank needs, so [`MpiComm::sleep_when_idle`] switches the all-to-all, the
//! all-reduce and the barrier to their non-blocking forms, polled with
//! [`MPI_Test`](mpi::request::Request::test): spinning for the first [`SPIN`], then
//! sleeping between polls — [`NAP`] at first, doubling up to [`LONGEST_NAP`] while the
//! wait goes on, so a long wait (a slow link) costs a few polls a millisecond instead of
//! twenty.

use crate::{CommError, CommResult, Communicator, Scalar, ScalarKind};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::request::{Request, Scope};
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Destination as _, Root as _, Source as _};
use mpi::Threading;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// MPI stays initialised while any handle lives; the last one finalises it.
struct Runtime {
    _universe: mpi::environment::Universe,
    watch: Watch,
    /// MPI_THREAD_MULTIPLE was granted
    multiple: bool,
    /// wait for collectives by polling with sleeps instead of MPI's busy wait
    sleepy: AtomicBool,
}

/// How long a sleepy wait spins before it starts to sleep (short exchanges stay fast).
pub const SPIN: Duration = Duration::from_micros(50);
/// How long a sleepy wait first sleeps between polls.
pub const NAP: Duration = Duration::from_micros(50);
/// The longest sleep between polls of one wait.
pub const LONGEST_NAP: Duration = Duration::from_micros(400);

/// The sleeps between polls of one wait: [`NAP`], doubling up to [`LONGEST_NAP`].
struct Naps(Duration);

impl Naps {
    fn new() -> Naps {
        Naps(NAP)
    }

    /// Spins during the first [`SPIN`] of a wait started at `start`, then sleeps.
    fn take(&mut self, start: Instant) {
        if start.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(self.0);
            self.0 = (self.0 * 2).min(LONGEST_NAP);
        }
    }
}

/// Polls a non-blocking operation to completion: spinning for [`SPIN`], then sleeping
/// between tests ([`Naps`]), so a waiting rank leaves the core to others.
fn wait_gently<'a, R: ?Sized, S: Scope<'a>>(mut req: Request<'a, R, S>) {
    let start = Instant::now();
    let mut naps = Naps::new();
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => req = r,
        }
        naps.take(start);
    }
}

/// What the watchdog looks at. Updating it costs two relaxed atomic stores and an
/// increment per call (no clock read): it sits on every exchange.
struct Watch {
    /// calls entered so far
    calls: AtomicU64,
    /// a call is in flight
    busy: AtomicBool,
    /// which operation, as an [`Op`]
    op: AtomicUsize,
}

/// The operations the watchdog can name.
#[derive(Clone, Copy)]
enum Op {
    Barrier,
    AllReduce,
    Broadcast,
    AllGather,
    ReduceScatter,
    AllToAllV,
    AllToAllVCounts,
    Send,
    Recv,
    Split,
}

const OP_NAMES: [&str; 10] =
    ["barrier", "all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all_v", "all_to_all_v counts", "send", "recv", "split"];

/// Clears the watch when an operation returns.
struct InFlight<'a>(&'a Watch);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Relaxed);
    }
}

impl Watch {
    fn enter(&self, op: Op) -> InFlight<'_> {
        self.op.store(op as usize, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.busy.store(true, Ordering::Relaxed);
        InFlight(self)
    }
}

/// A send in flight (`MPI_Isend`): its request and the buffer it reads, owned here
/// until the request completes.
struct Sending {
    request: mpi::ffi::MPI_Request,
    data: *mut [u8],
}

// SAFETY: the request is an opaque handle and the buffer is owned by this value alone;
// both are only touched under the communicator's `sends` lock.
unsafe impl Send for Sending {}

impl Sending {
    /// True (and the buffer freed) once the send has completed; with `block`, waits.
    fn finished(&mut self, block: bool) -> bool {
        let mut flag = 0;
        // SAFETY: the request is live (completed requests are removed at once) and the
        // buffer it reads is still owned here.
        unsafe {
            if block {
                mpi::ffi::MPI_Wait(&mut self.request, mpi::ffi::RSMPI_STATUS_IGNORE);
                flag = 1;
            } else {
                mpi::ffi::MPI_Test(&mut self.request, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE);
            }
            if flag != 0 {
                drop(Box::from_raw(self.data));
            }
        }
        flag != 0
    }
}

/// A rank's handle on an MPI communicator.
pub struct MpiComm {
    // Field order matters: the communicator is freed before the runtime can finalise.
    comm: SimpleCommunicator,
    /// point-to-point sends still in flight: `send` returns at once, as in the
    /// in-process backend, so two ranks sending to each other never deadlock
    sends: std::sync::Mutex<Vec<Sending>>,
    rt: Arc<Runtime>,
}

impl MpiComm {
    /// Frees the buffers of completed sends; with `block`, waits for every send.
    fn reap_sends(&self, block: bool) {
        let mut sends = self.sends.lock().unwrap_or_else(|e| e.into_inner());
        sends.retain_mut(|s| !s.finished(block));
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // A send's buffer must outlive its request; the communicator must outlive both.
        self.reap_sends(true);
    }
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `world`).
// Pipeline parallelism sends and receives from the compute threads while exchanges run
// on streams; the trainer requires MPI_THREAD_MULTIPLE for it.
// Under SERIALIZED ultramoe has one thread inside MPI at a time: the expert-parallel
// stream runs the exchanges while the main thread waits for them, the main thread's own
// collectives come after every pending exchange was waited for, and the gradient stream
// (a second thread in MPI) is only used when `allows_concurrent_groups` reports
// MPI_THREAD_MULTIPLE. The handle itself is an opaque communicator id.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

/// Initialises MPI and returns this process's handle on `MPI_COMM_WORLD`. A collective
/// that waits longer than `timeout` aborts the job with a message naming this rank.
pub fn world(timeout: Duration) -> CommResult<Arc<MpiComm>> {
    let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| CommError { rank: None, reason: "MPI was already initialised".into() })?;
    // Exchanges run on a communication-stream thread while the main thread waits, one
    // thread inside MPI at a time: MPI_THREAD_SERIALIZED is the least that allows it.
    if provided < Threading::Serialized {
        return Err(CommError { rank: None, reason: format!("the MPI library provides only {provided:?} threading; ultramoe needs MPI_THREAD_SERIALIZED or better") });
    }
    let comm = universe.world();
    let rt = Arc::new(Runtime {
        _universe: universe,
        watch: Watch { calls: AtomicU64::new(0), busy: AtomicBool::new(false), op: AtomicUsize::new(0) },
        multiple: provided == Threading::Multiple,
        sleepy: AtomicBool::new(false),
    });
    let rank = comm.rank();
    let weak = Arc::downgrade(&rt);
    std::thread::Builder::new()
        .name("mpi-watchdog".into())
        .spawn(move || {
            // The same call still in flight since `stuck.1`: (call number, first seen).
            let mut stuck: Option<(u64, Instant)> = None;
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let Some(rt) = weak.upgrade() else { return };
                let (busy, call) = (rt.watch.busy.load(Ordering::Relaxed), rt.watch.calls.load(Ordering::Relaxed));
                stuck = match stuck {
                    Some((c, since)) if busy && c == call => Some((c, since)),
                    _ if busy => Some((call, Instant::now())),
                    _ => None,
                };
                if let Some((_, since)) = stuck.filter(|(_, since)| since.elapsed() > timeout) {
                    let op = OP_NAMES[rt.watch.op.load(Ordering::Relaxed).min(OP_NAMES.len() - 1)];
                    eprintln!(
                        "ultramoe: error: rank {rank}: no progress for {} s in {op}: another rank is stalled or gone; aborting the job",
                        since.elapsed().as_secs()
                    );
                    SimpleCommunicator::world().abort(1);
                }
            }
        })
        .map_err(|e| CommError { rank: Some(rank as usize), reason: format!("cannot start the watchdog: {e}") })?;
    Ok(Arc::new(MpiComm { comm, sends: Default::default(), rt }))
}

/// Ends the whole job at once (after an error on this rank), so no peer waits for it.
pub fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

fn bytes<T: Scalar>(v: &[T]) -> &[u8] {
    // SAFETY: every Scalar is a plain number type without padding or invalid bit patterns.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bytes_mut<T: Scalar>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes`; any byte pattern is a valid value of these types.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

fn vec_from_bytes<T: Scalar>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    bytes_mut(&mut v).copy_from_slice(&b[..n * std::mem::size_of::<T>()]);
    v
}

/// Runs `f` on the buffers viewed as their concrete element type.
macro_rules! typed {
    ($kind:expr, $send:expr, $recv:expr, |$s:ident, $r:ident| $body:expr) => {{
        // SAFETY: `KIND` names the type behind `T` exactly (usize is u64 on 64-bit).
        unsafe {
            match $kind {
                ScalarKind::F32 => {
                    let ($s, $r) = (cast::<_, f32>($send), cast_mut::<_, f32>($recv));
                    $body
                }
                ScalarKind::F64 => {
                    let ($s, $r) = (cast::<_, f64>($send), cast_mut::<_, f64>($recv));
                    $body
                }
                ScalarKind::U32 => {
                    let ($s, $r) = (cast::<_, u32>($send), cast_mut::<_, u32>($recv));
                    $body
                }
                ScalarKind::U64 => {
                    let ($s, $r) = (cast::<_, u64>($send), cast_mut::<_, u64>($recv));
                    $body
                }
                ScalarKind::I64 => {
                    let ($s, $r) = (cast::<_, i64>($send), cast_mut::<_, i64>($recv));
                    $body
                }
            }
        }
    }};
}

unsafe fn cast<T, U>(v: &[T]) -> &[U] {
    std::slice::from_raw_parts(v.as_ptr() as *const U, v.len())
}

unsafe fn cast_mut<T, U>(v: &mut [T]) -> &mut [U] {
    std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut U, v.len())
}

fn count(n: usize, rank: usize) -> CommResult<i32> {
    i32::try_from(n).map_err(|_| CommError { rank: Some(rank), reason: format!("message of {n} bytes exceeds MPI's 2 GiB count limit") })
}

/// Ranks' worth of counts and displacements kept on the stack.
const STACK_LAYOUT: usize = 64;

/// Counts and displacements of one side of an exchange. The stack variant is large on
/// purpose: it replaces an allocation per exchange.
#[allow(clippy::large_enum_variant)]
enum Layout {
    Stack([i32; STACK_LAYOUT], usize),
    Heap(Vec<i32>),
}

impl Layout {
    fn as_mut(&mut self) -> &mut [i32] {
        match self {
            Layout::Stack(a, n) => &mut a[..*n],
            Layout::Heap(v) => v,
        }
    }
}

impl std::ops::Deref for Layout {
    type Target = [i32];
    fn deref(&self) -> &[i32] {
        match self {
            Layout::Stack(a, n) => &a[..*n],
            Layout::Heap(v) => v,
        }
    }
}

impl MpiComm {
    /// Byte counts and displacements, `[counts; P] ++ [displacements; P]`, on the stack
    /// for groups of up to 32 ranks (at small sizes the bookkeeping is what separates us
    /// from a bare `MPI_Alltoallv`).
    fn byte_layout(&self, counts: &[usize], size: usize) -> CommResult<Layout> {
        let p = self.size();
        if counts.len() != p {
            return Err(CommError { rank: Some(self.rank()), reason: format!("all_to_all_v: {} counts for {p} ranks", counts.len()) });
        }
        let mut v = if 2 * p <= STACK_LAYOUT { Layout::Stack([0; STACK_LAYOUT], 2 * p) } else { Layout::Heap(vec![0; 2 * p]) };
        let buf = v.as_mut();
        let mut at = 0usize;
        for (i, &c) in counts.iter().enumerate() {
            buf[i] = count(c * size, self.rank())?;
            buf[p + i] = count(at, self.rank())?;
            at += c * size;
        }
        count(at, self.rank())?;
        Ok(v)
    }

    /// Exchanges into a new typed buffer, written by MPI directly (no zeroing first, no
    /// copy after: at megabyte sizes either would cost as much as the transfer).
    /// `s` and `r` are [`MpiComm::byte_layout`]s.
    fn receive_into_new<T: Scalar>(&self, send: &[T], s: &[i32], r: &[i32]) -> CommResult<Vec<T>> {
        let p = self.size();
        let total = r[p - 1] as usize + r[2 * p - 1] as usize;
        if s[p - 1] as usize + s[2 * p - 1] as usize != std::mem::size_of_val(send) {
            return Err(CommError { rank: Some(self.rank()), reason: "all_to_all_v: counts do not cover the send buffer".into() });
        }
        let n = total / std::mem::size_of::<T>();
        let mut recv: Vec<T> = Vec::with_capacity(n.max(1));
        // SAFETY: the receive counts cover exactly `n` elements, every byte of which
        // MPI writes before returning; the vector's length is set only afterwards, so no
        // unwritten element is ever read. Scalars have no invalid bit patterns and no
        // destructors. The capacity is at least 1, so the receive buffer never aliases
        // an empty send buffer (OpenMPI rejects send == receive).
        unsafe {
            let buf = std::slice::from_raw_parts_mut(recv.as_mut_ptr() as *mut u8, total.max(1));
            let pad = [0u8; 1];
            let send = if send.is_empty() { &pad[..] } else { bytes(send) };
            let _w = self.rt.watch.enter(Op::AllToAllV);
            let sp = Partition::new(send, &s[..p], &s[p..]);
            let mut rp = PartitionMut::new(buf, &r[..p], &r[p..]);
            if self.sleepy() {
                mpi::request::scope(|sc| wait_gently(self.comm.immediate_all_to_all_varcount_into(sc, &sp, &mut rp)));
            } else {
                self.comm.all_to_all_varcount_into(&sp, &mut rp);
            }
            recv.set_len(n);
        }
        Ok(recv)
    }

    /// Waits for the all-to-all, all-reduce and barrier by polling with sleeps (`true`)
    /// or by MPI's own busy wait (`false`, the default): for every communicator of this
    /// process. See the module docs.
    pub fn sleep_when_idle(&self, on: bool) {
        self.rt.sleepy.store(on, Ordering::Relaxed);
    }

    fn sleepy(&self) -> bool {
        self.rt.sleepy.load(Ordering::Relaxed)
    }

    /// One bare `MPI_Alltoallv` of bytes with counts and displacements given: what a
    /// plain MPI program calls, and the baseline `ultramoe bench comm` compares against.
    pub fn raw_alltoallv(&self, send: &[u8], sc: &[i32], sd: &[i32], recv: &mut [u8], rc: &[i32], rd: &[i32]) {
        let sp = Partition::new(send, sc, sd);
        let mut rp = PartitionMut::new(recv, rc, rd);
        self.comm.all_to_all_varcount_into(&sp, &mut rp);
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn barrier(&self) -> CommResult<()> {
        let _w = self.rt.watch.enter(Op::Barrier);
        if self.sleepy() {
            wait_gently(self.comm.immediate_barrier());
        } else {
            self.comm.barrier();
        }
        Ok(())
    }

    fn all_reduce_sum<T: Scalar>(&self, buf: &mut [T]) -> CommResult<()> {
        count(std::mem::size_of_val(buf), self.rank())?;
        let input = buf.to_vec();
        let _w = self.rt.watch.enter(Op::AllReduce);
        if self.sleepy() {
            typed!(T::KIND, &input[..], buf, |s, r| mpi::request::scope(|sc| wait_gently(self.comm.immediate_all_reduce_into(
                sc,
                s,
                r,
                SystemOperation::sum()
            ))));
        } else {
            typed!(T::KIND, &input[..], buf, |s, r| self.comm.all_reduce_into(s, r, SystemOperation::sum()));
        }
        Ok(())
    }

    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> CommResult<()> {
        count(std::mem::size_of_val(buf), self.rank())?;
        let _w = self.rt.watch.enter(Op::Broadcast);
        self.comm.process_at_rank(root as i32).broadcast_into(bytes_mut(buf));
        Ok(())
    }

    fn all_gather<T: Scalar>(&self, input: &[T]) -> CommResult<Vec<T>> {
        let mut out = vec![T::default(); input.len() * self.size()];
        count(std::mem::size_of_val(&out[..]), self.rank())?;
        let _w = self.rt.watch.enter(Op::AllGather);
        self.comm.all_gather_into(bytes(input), bytes_mut(&mut out));
        Ok(out)
    }

    fn reduce_scatter_sum<T: Scalar>(&self, input: &[T]) -> CommResult<Vec<T>> {
        let p = self.size();
        if !input.len().is_multiple_of(p) {
            return Err(CommError { rank: Some(self.rank()), reason: format!("reduce_scatter: {} elements over {p} ranks", input.len()) });
        }
        count(std::mem::size_of_val(input), self.rank())?;
        let mut out = vec![T::default(); input.len() / p];
        let _w = self.rt.watch.enter(Op::ReduceScatter);
        typed!(T::KIND, input, &mut out[..], |s, r| self.comm.reduce_scatter_block_into(s, r, SystemOperation::sum()));
        Ok(out)
    }

    fn all_to_all_v<T: Scalar>(&self, send: &[T], send_counts: &[usize]) -> CommResult<(Vec<T>, Vec<usize>)> {
        let (p, size) = (self.size(), std::mem::size_of::<T>());
        let s = self.byte_layout(send_counts, size)?;
        let mut counts = vec![0i32; p];
        {
            let _w = self.rt.watch.enter(Op::AllToAllVCounts);
            if self.sleepy() {
                mpi::request::scope(|sc| wait_gently(self.comm.immediate_all_to_all_into(sc, &s[..p], &mut counts[..])));
            } else {
                self.comm.all_to_all_into(&s[..p], &mut counts[..]);
            }
        }
        let counts: Vec<usize> = counts.into_iter().map(|c| c as usize / size).collect();
        let r = self.byte_layout(&counts, size)?;
        Ok((self.receive_into_new(send, &s, &r)?, counts))
    }

    fn all_to_all_v_known<T: Scalar>(&self, send: &[T], send_counts: &[usize], recv_counts: &[usize]) -> CommResult<Vec<T>> {
        let size = std::mem::size_of::<T>();
        let (s, r) = (self.byte_layout(send_counts, size)?, self.byte_layout(recv_counts, size)?);
        self.receive_into_new(send, &s, &r)
    }

    fn send<T: Scalar>(&self, data: &[T], dst: usize, tag: u32) -> CommResult<()> {
        count(std::mem::size_of_val(data), self.rank())?;
        self.reap_sends(false);
        // The copy is owned by the request until it completes (`reap_sends`).
        let buf: &'static [u8] = Box::leak(bytes(data).to_vec().into_boxed_slice());
        let _w = self.rt.watch.enter(Op::Send);
        let request = self.comm.process_at_rank(dst as i32).immediate_send_with_tag(mpi::request::StaticScope, buf, tag as i32);
        // SAFETY: the request is completed (tested or waited) before its buffer is freed,
        // and before this communicator is dropped.
        let (request, data, _) = unsafe { request.into_raw() };
        self.sends.lock().unwrap_or_else(|e| e.into_inner()).push(Sending { request, data: data as *const [u8] as *mut [u8] });
        Ok(())
    }

    fn recv<T: Scalar>(&self, src: usize, tag: u32) -> CommResult<Vec<T>> {
        let _w = self.rt.watch.enter(Op::Recv);
        let from = self.comm.process_at_rank(src as i32);
        if self.sleepy() {
            // Wait for the message without spinning: probe, sleeping between probes.
            let start = Instant::now();
            let mut naps = Naps::new();
            while from.immediate_probe_with_tag(tag as i32).is_none() {
                self.reap_sends(false);
                naps.take(start);
            }
        }
        let (b, _) = from.receive_vec_with_tag::<u8>(tag as i32);
        self.reap_sends(false);
        Ok(vec_from_bytes(&b))
    }

    fn flush_sends(&self) -> CommResult<()> {
        self.reap_sends(true);
        Ok(())
    }

    fn allows_concurrent_groups(&self) -> bool {
        self.rt.multiple
    }

    fn split(&self, color: usize, key: usize) -> CommResult<Self> {
        let _w = self.rt.watch.enter(Op::Split);
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| CommError { rank: Some(self.rank()), reason: "MPI_Comm_split returned no communicator".into() })?;
        Ok(MpiComm { comm, sends: Default::default(), rt: self.rt.clone() })
    }
}
