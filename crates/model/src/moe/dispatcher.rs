//! Token dispatch and combine. On one rank this is a permutation into expert order and
//! back. Under expert parallelism (`E` experts over `P` ranks, `E/P` consecutive experts
//! each) the same four calls also move rows between ranks:
//!
//! 1. permute local tokens into global expert order — which is rank order, since rank
//!    `p` owns experts `p·E/P..(p+1)·E/P`;
//! 2. exchange per-expert row counts (all-to-all of `E/P` counts per pair of ranks);
//! 3. all-to-all the rows; they arrive grouped by source rank, then local expert;
//! 4. regroup by local expert, then source rank, so each local expert's rows are
//!    contiguous for the grouped GEMM.
//!
//! Combine runs the same steps backwards, and the backward pass mirrors both. Because
//! ranks hold consecutive rows of the global batch, the rows an expert receives are in
//! global token order: the same order, and so the same sums, as on one rank.
//!
//! Every exchange is split into `start_*` (local work, then the exchange queued on the
//! rank's communication stream) and `finish_*` (wait, then local work), so the MoE layer
//! can compute — the shared expert, another chunk's experts — while rows travel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use super::hierarchical::{self, HierState, Hierarchy};
use ultramoe_dist::{CommError, CommResult, CommStream, Pending, ProcessGroup};
use ultramoe_kernels::permute::{
    permute_backward, permute_forward, transpose_blocks, transpose_counts, unpermute_backward, unpermute_forward, DispatchPlan,
};

/// What dispatch hands to combine (and both backward passes) for one chunk of tokens.
/// A typed handle, not state stashed on the dispatcher.
pub struct DispatchHandle {
    /// where every local (token, choice) went, in global expert order
    pub plan: DispatchPlan,
    /// `[E_local + 1]`: local expert `j` owns rows `offsets[j]..offsets[j+1]` of the
    /// buffer the experts compute on
    pub offsets: Vec<usize>,
    /// the all-to-all's shape, under expert parallelism
    exchange: Option<Exchange>,
    /// the hierarchical exchange's state, when used
    hier: Option<Arc<HierState>>,
}

/// Row counts of one dispatch's all-to-all.
struct Exchange {
    /// rows sent to each rank
    send_rows: Vec<usize>,
    /// `[P, E_local]`: rows received from each source rank for each local expert
    recv: Vec<usize>,
}

impl Exchange {
    fn recv_rows(&self, p: usize) -> Vec<usize> {
        sums(&self.recv, self.recv.len() / p)
    }
}

/// Row counts of a `[groups, width]` grid summed per group.
pub(super) fn sums(counts: &[usize], width: usize) -> Vec<usize> {
    counts.chunks(width).map(|c| c.iter().sum()).collect()
}

/// Row counts in floats (`width` per row), as the exchanges take them.
pub(super) fn scaled(rows: &[usize], width: usize) -> Vec<usize> {
    rows.iter().map(|r| r * width).collect()
}

/// What the all-to-all exchanges moved, accumulated over layers and steps (shared by
/// every MoE layer of a model; read and reset by the trainer each step).
#[derive(Debug, Default)]
pub struct ExchangeStats {
    /// time the exchanges ran on the communication stream (ns)
    nanos: AtomicU64,
    /// the passes computing at once, and how long all of them waited for exchanges:
    /// the exposed part
    pub lanes: LaneClock,
    /// bytes sent to ranks on this rank's node (itself excluded)
    intra: AtomicU64,
    /// bytes sent to ranks on other nodes
    inter: AtomicU64,
    /// bytes that would cross nodes if each token crossed to each remote node once per
    /// exchange (hierarchical all-to-all: one copy per node, fanned out there)
    inter_hierarchical: AtomicU64,
}

/// Exposed exchange time when several passes (lanes) compute at once: a lane waiting for
/// an exchange while another lane computes hides that wait, so time counts as exposed
/// only while every running lane waits — for an exchange, or for anything else
/// ([`LaneClock::waiting_elsewhere`]: a lane blocked on another stage's message hides
/// nothing). With no lane registered a single pass is assumed (its whole wait is
/// exposed).
#[derive(Debug, Default)]
pub struct LaneClock {
    state: Mutex<LaneState>,
}

#[derive(Debug, Default)]
struct LaneState {
    running: usize,
    waiting: usize,
    /// running lanes blocked on something other than this clock's waits (another
    /// stage's message, the other lane): they compute nothing either
    elsewhere: usize,
    /// every running lane has been waiting since
    since: Option<Instant>,
    exposed: Duration,
}

impl LaneState {
    /// Starts or stops the clock as the counts now say.
    fn settle(&mut self) {
        let all_wait = self.waiting > 0 && self.waiting + self.elsewhere >= self.running.max(1);
        match (all_wait, self.since) {
            (true, None) => self.since = Some(Instant::now()),
            (false, Some(t)) => {
                self.exposed += t.elapsed();
                self.since = None;
            }
            _ => {}
        }
    }
}

impl LaneClock {
    fn with(&self, f: impl FnOnce(&mut LaneState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        st.settle();
    }

    /// A pass starts computing on its own thread.
    pub fn start_lane(&self) {
        self.with(|s| s.running += 1);
    }

    /// A pass started by [`LaneClock::start_lane`] is done.
    pub fn end_lane(&self) {
        self.with(|s| s.running = s.running.saturating_sub(1));
    }

    /// Runs `wait` (a wait for an exchange), counting it exposed while no other lane
    /// computes.
    pub fn waiting<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.with(|s| s.waiting += 1);
        let v = wait();
        self.with(|s| s.waiting -= 1);
        v
    }

    /// Runs `wait`, a wait of a running lane that is not this clock's kind: while it
    /// lasts the lane computes nothing, so it does not hide this clock's waits.
    pub fn waiting_elsewhere<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.with(|s| s.elsewhere += 1);
        let v = wait();
        self.with(|s| s.elsewhere -= 1);
        v
    }

    /// Exposed seconds since the last call.
    pub fn take_exposed(&self) -> f64 {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = st.since {
            st.exposed += t.elapsed();
            st.since = Some(Instant::now());
        }
        std::mem::take(&mut st.exposed).as_secs_f64()
    }
}

/// A snapshot of [`ExchangeStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExchangeTotals {
    /// seconds the exchanges ran (on the communication stream)
    pub seconds: f64,
    /// seconds computation waited for them (not hidden by overlap)
    pub exposed_seconds: f64,
    /// bytes sent within the node
    pub intra_node_bytes: u64,
    /// bytes sent across nodes
    pub inter_node_bytes: u64,
    /// inter-node bytes a hierarchical all-to-all would send for the same routing
    pub inter_node_bytes_hierarchical: u64,
}

impl ExchangeStats {
    /// Returns the totals since the last call and resets them.
    pub fn take(&self) -> ExchangeTotals {
        ExchangeTotals {
            seconds: self.nanos.swap(0, Ordering::Relaxed) as f64 * 1e-9,
            exposed_seconds: self.lanes.take_exposed(),
            intra_node_bytes: self.intra.swap(0, Ordering::Relaxed),
            inter_node_bytes: self.inter.swap(0, Ordering::Relaxed),
            inter_node_bytes_hierarchical: self.inter_hierarchical.swap(0, Ordering::Relaxed),
        }
    }
}

/// Moves tokens to their experts and back: what a MoE layer is (its expert slots and
/// width). The exchange it runs over is given per pass ([`TokenDispatcher::over`]).
#[derive(Clone, Debug)]
pub struct TokenDispatcher {
    /// routed expert slots `E` (all ranks together)
    pub n_experts: usize,
    /// hidden `H`
    pub hidden: usize,
}

/// Where a model's expert-parallel exchanges run: the group, the stream its exchanges
/// run on (one per group, shared by every layer, so exchanges keep one order on every
/// rank), which node each rank is on, the traffic counters, and the hierarchical
/// all-to-all's sub-groups when it is used. Built once per run; a second, independent
/// lane ([`ExpertExchange::lane`]) lets two passes exchange at the same time.
#[derive(Debug)]
pub struct ExpertExchange {
    /// the expert-parallel group
    pub group: Arc<dyn ProcessGroup>,
    /// the communication stream its exchanges run on
    pub stream: Arc<CommStream>,
    /// node of each expert-parallel rank (all 0: one node)
    pub node_of: Vec<usize>,
    /// traffic counters (shared by the lanes of one model)
    pub stats: Arc<ExchangeStats>,
    /// rail and node groups, when the all-to-all is hierarchical
    pub hierarchy: Option<Hierarchy>,
}

impl ExpertExchange {
    /// An exchange over `group` (more than one rank), whose ranks sit on the nodes
    /// `node_of` says; hierarchical over those nodes when `hierarchical` (collective over
    /// `group`: it splits rail and node groups).
    pub fn new(group: Arc<dyn ProcessGroup>, node_of: Vec<usize>, hierarchical: bool) -> Result<ExpertExchange, String> {
        let p = group.size();
        if node_of.len() != p {
            return Err(format!("{} node entries for {p} expert-parallel ranks", node_of.len()));
        }
        let hierarchy = if hierarchical {
            let per_node = node_of.iter().filter(|&&n| n == node_of[0]).count();
            let regular = node_of.iter().enumerate().all(|(r, &n)| n == node_of[0] + r / per_node);
            if per_node < 2 || per_node >= p || !p.is_multiple_of(per_node) || !regular {
                return Err(format!(
                    "a hierarchical all-to-all needs several nodes of several ranks: {per_node} ranks per node over {p} expert-parallel ranks"
                ));
            }
            Some(Hierarchy::new(group.as_ref(), per_node).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(ExpertExchange { group, stream: CommStream::new("ultramoe-ep-stream"), node_of, stats: Arc::default(), hierarchy })
    }

    /// A second lane over the same ranks: its own copy of the group (and of the
    /// hierarchy's groups) and its own stream, sharing the traffic counters. Exchanges
    /// of two lanes may run at once from two threads (collective over the group).
    pub fn lane(&self) -> Result<ExpertExchange, String> {
        let r = self.group.rank();
        let group = self.group.split_group(0, r).map_err(|e| e.to_string())?;
        let mut lane = ExpertExchange::new(group, self.node_of.clone(), self.hierarchy.is_some())?;
        lane.stats = self.stats.clone();
        Ok(lane)
    }
}

/// A [`TokenDispatcher`] over one pass's exchange (`None`: one rank holds every expert).
pub struct Dispatch<'a> {
    n_experts: usize,
    hidden: usize,
    ep: Option<(&'a Arc<dyn ProcessGroup>, &'a Arc<CommStream>)>,
    node_of: &'a [usize],
    stats: Option<&'a ExchangeStats>,
    hierarchy: Option<&'a Hierarchy>,
}

/// An exchange in flight, or a result already at hand (one rank: nothing to exchange).
pub enum Ticket<T> {
    /// available now
    Ready(T),
    /// queued on the communication stream
    Flying(Pending<CommResult<T>>),
}

/// A dispatch in flight: the local plan, and the rows on their way.
pub struct Dispatching {
    plan: DispatchPlan,
    flight: Flight,
}

enum Flight {
    /// received per-expert counts `[P, E_local]` and rows (grouped by source rank)
    Flat { send_rows: Vec<usize>, rows: Ticket<(Vec<usize>, Vec<f32>)> },
    Hier(Ticket<(Vec<f32>, HierState)>),
}

/// A combine in flight.
pub enum Combining {
    /// expert outputs on their way back, in plan order
    Flat(Ticket<Vec<f32>>),
    /// per-item partial sums, and the forwarder's per-expert outputs
    Hier(Ticket<(Vec<f32>, Vec<f32>)>),
}

/// A combine backward in flight.
pub enum CombineBack {
    /// output gradients on their way to the experts, and `dweights` (already known)
    Flat(Ticket<Vec<f32>>, Vec<f32>),
    /// the experts' output gradients and per-item `dweights`
    Hier(Ticket<(Vec<f32>, Vec<f32>)>),
}

/// A failed exchange ends the step: the payload is the [`CommError`], which the trainer
/// catches at the step boundary and reports (a dead peer cannot be recovered from
/// mid-layer, and unwinding frees every buffer on the way out).
fn fatal(e: CommError) -> ! {
    std::panic::panic_any(e)
}

impl TokenDispatcher {
    /// The dispatcher over `ex` for one pass.
    pub fn over<'a>(&self, ex: Option<&'a ExpertExchange>) -> Dispatch<'a> {
        Dispatch {
            n_experts: self.n_experts,
            hidden: self.hidden,
            ep: ex.map(|e| (&e.group, &e.stream)),
            node_of: ex.map_or(&[0][..], |e| &e.node_of),
            stats: ex.map(|e| e.stats.as_ref()),
            hierarchy: ex.and_then(|e| e.hierarchy.as_ref()),
        }
    }
}

impl Dispatch<'_> {
    fn ranks(&self) -> usize {
        self.ep.map_or(1, |(g, _)| g.size())
    }

    /// The traffic counters (only exchanges count, and they need an exchange).
    fn stats(&self) -> &ExchangeStats {
        self.stats.expect("exchanges run over an expert exchange")
    }

    /// True when rows travel between ranks.
    pub fn exchanges(&self) -> bool {
        self.ep.is_some()
    }

    /// Waits for a ticket, recording how long the exchange ran and how long this thread
    /// was blocked.
    fn finish<T>(&self, t: Ticket<T>) -> T {
        match t {
            Ticket::Ready(v) => v,
            Ticket::Flying(p) => {
                let stats = self.stats();
                let d = stats.lanes.waiting(|| p.wait());
                stats.nanos.fetch_add((d.busy_s * 1e9) as u64, Ordering::Relaxed);
                d.value.unwrap_or_else(|e| fatal(e))
            }
        }
    }

    /// Starts dispatching tokens `x: [N, H]` whose choices are `experts: [N, K]` with
    /// combine weights `weights: [N, K]`.
    pub fn start_dispatch(&self, x: &[f32], experts: &[u32], weights: &[f32], top_k: usize) -> Dispatching {
        let h = self.hidden;
        let plan = DispatchPlan::new(experts, top_k, self.n_experts);
        if let (Some((g, stream)), Some(hy)) = (self.ep, self.hierarchy) {
            let el = self.n_experts / self.ranks();
            let (l, nodes) = (hy.node.size(), hy.rail.size());
            self.count_hierarchical(experts, top_k, el, g.rank());
            let (items, items_to, rows) = hierarchical::pack_items(x, experts, weights, h, top_k, el, l, nodes);
            let hy = hy.clone();
            let job = stream.submit(move || hierarchical::dispatch(&hy, items, items_to, rows, h, top_k, el));
            return Dispatching { plan, flight: Flight::Hier(Ticket::Flying(job)) };
        }
        let mut xs = vec![0.0; plan.rows() * h];
        permute_forward(&mut xs, x, &plan, h);
        let Some((g, stream)) = self.ep else {
            let send_rows = vec![plan.rows()];
            return Dispatching { flight: Flight::Flat { rows: Ticket::Ready((plan.counts(), xs)), send_rows }, plan };
        };
        let (p, el) = (self.ranks(), self.n_experts / self.ranks());
        let counts = plan.counts();
        let send_rows = sums(&counts, el);
        self.count_hierarchical(experts, top_k, el, g.rank());
        self.count_bytes(g.rank(), &send_rows);
        let (g, send) = (g.clone(), send_rows.clone());
        let job = stream.submit(move || {
            let counts64: Vec<u64> = counts.iter().map(|&c| c as u64).collect();
            let (recv, _) = g.all_to_all_v_u64(&counts64, &vec![el; p])?;
            let recv: Vec<usize> = recv.into_iter().map(|c| c as usize).collect();
            let rows = g.all_to_all_v_known_f32(&xs, &scaled(&send, h), &scaled(&sums(&recv, el), h))?;
            Ok((recv, rows))
        });
        Dispatching { plan, flight: Flight::Flat { send_rows, rows: Ticket::Flying(job) } }
    }

    /// Waits for a dispatch: the rows this rank's experts compute on, grouped by local
    /// expert, and the handle.
    pub fn finish_dispatch(&self, d: Dispatching) -> (Vec<f32>, DispatchHandle) {
        let (send_rows, rows) = match d.flight {
            Flight::Hier(t) => {
                let (xp, st) = self.finish(t);
                self.count_hier(&st, self.hidden + 2 * st.top_k(), self.hidden);
                let st = Arc::new(st);
                let offsets = st.offsets.clone();
                return (xp, DispatchHandle { plan: d.plan, offsets, exchange: None, hier: Some(st) });
            }
            Flight::Flat { send_rows, rows } => (send_rows, rows),
        };
        let (recv, rows) = self.finish(rows);
        if self.ep.is_none() {
            let offsets = d.plan.offsets.clone();
            return (rows, DispatchHandle { plan: d.plan, offsets, exchange: None, hier: None });
        }
        let (p, el) = (self.ranks(), self.n_experts / self.ranks());
        let mut offsets = vec![0usize; el + 1];
        for j in 0..el {
            offsets[j + 1] = offsets[j] + (0..p).map(|s| recv[s * el + j]).sum::<usize>();
        }
        let xp = transpose_blocks(&rows, &recv, p, el, self.hidden);
        (xp, DispatchHandle { plan: d.plan, offsets, exchange: Some(Exchange { send_rows, recv }), hier: None })
    }

    /// Starts returning the experts' outputs `yp` to be combined.
    pub fn start_combine(&self, yp: Vec<f32>, hd: &DispatchHandle) -> Combining {
        match (&hd.hier, self.ep, self.hierarchy) {
            (Some(st), Some((_, stream)), Some(hy)) => {
                let (st, hy) = (st.clone(), hy.clone());
                Combining::Hier(Ticket::Flying(stream.submit(move || st.combine(&hy, &yp))))
            }
            _ => Combining::Flat(self.start_return(yp, hd)),
        }
    }

    /// Waits for a combine and adds `Σ_j w[t,j] · y_{t,j}` into `out: [N, H]`. Returns
    /// what the combine's backward needs.
    pub fn finish_combine(&self, c: Combining, hd: &DispatchHandle, out: &mut [f32], weights: &[f32]) -> Vec<f32> {
        match c {
            Combining::Flat(t) => {
                let ys = self.finish(t);
                unpermute_forward(out, &ys, weights, &hd.plan, self.hidden, true);
                ys
            }
            Combining::Hier(t) => {
                let (partials, yf) = self.finish(t);
                let st = hd.hier.as_ref().expect("hierarchical handle");
                self.count_hier(st, self.hidden, self.hidden);
                st.add_items(out, &partials);
                yf
            }
        }
    }

    /// Starts the combine's backward from `dout: [N, H]`.
    pub fn start_combine_backward(&self, dout: &[f32], saved: &Arc<Vec<f32>>, weights: &[f32], hd: &DispatchHandle) -> CombineBack {
        match (&hd.hier, self.ep, self.hierarchy) {
            (Some(st), Some((_, stream)), Some(hy)) => {
                let (st, hy, saved) = (st.clone(), hy.clone(), saved.clone());
                let dy_items = st.item_rows(dout);
                CombineBack::Hier(Ticket::Flying(stream.submit(move || st.combine_backward(&hy, &dy_items, &saved))))
            }
            _ => {
                let (dys, dw) = self.combine_backward(dout, saved, weights, hd);
                CombineBack::Flat(self.start_to_experts(dys, hd), dw)
            }
        }
    }

    /// Waits for the combine's backward: the experts' output gradients (grouped by local
    /// expert); `dweights: [N, K]` is written.
    pub fn finish_combine_backward(&self, cb: CombineBack, hd: &DispatchHandle, dweights: &mut [f32]) -> Vec<f32> {
        match cb {
            CombineBack::Flat(t, dw) => {
                dweights.copy_from_slice(&dw);
                self.finish_to_experts(t, hd)
            }
            CombineBack::Hier(t) => {
                let (dyp, dw_items) = self.finish(t);
                let st = hd.hier.as_ref().expect("hierarchical handle");
                self.count_hier(st, self.hidden + st.top_k(), self.hidden);
                dweights.fill(0.0);
                st.add_dweights(dweights, &dw_items);
                dyp
            }
        }
    }

    /// Starts sending the experts' input gradients back to the tokens' ranks.
    pub fn start_dispatch_backward(&self, dxp: Vec<f32>, hd: &DispatchHandle) -> Ticket<Vec<f32>> {
        match (&hd.hier, self.ep, self.hierarchy) {
            (Some(st), Some((_, stream)), Some(hy)) => {
                let (st, hy) = (st.clone(), hy.clone());
                Ticket::Flying(stream.submit(move || st.dispatch_backward(&hy, &dxp)))
            }
            _ => self.start_return(dxp, hd),
        }
    }

    /// Waits for the dispatch's backward and adds the input gradients into `dx: [N, H]`.
    pub fn finish_dispatch_backward(&self, t: Ticket<Vec<f32>>, hd: &DispatchHandle, dx: &mut [f32]) {
        let rows = self.finish(t);
        match &hd.hier {
            Some(st) => {
                self.count_hier(st, self.hidden, self.hidden);
                st.add_items(dx, &rows);
            }
            None => self.dispatch_backward(dx, &rows, hd),
        }
    }

    /// Counts one hierarchical exchange: `inter_w` floats per item to another node and
    /// `intra_w` per fan-out row to another rank of the node.
    fn count_hier(&self, st: &HierState, inter_w: usize, intra_w: usize) {
        let Some((g, _)) = self.ep else { return };
        let l = st.ranks_per_node();
        let (inter, intra) = st.traffic(g.rank() / l, g.rank() % l);
        self.stats().inter.fetch_add(4 * (inter * inter_w) as u64, Ordering::Relaxed);
        self.stats().intra.fetch_add(4 * (intra * intra_w) as u64, Ordering::Relaxed);
    }

    /// Starts sending expert-grouped rows (outputs, or input gradients) back to the
    /// ranks whose tokens they are; [`TokenDispatcher::finish`] gives them in plan order.
    fn start_return(&self, rows: Vec<f32>, hd: &DispatchHandle) -> Ticket<Vec<f32>> {
        let (Some((g, stream)), Some(x)) = (self.ep, &hd.exchange) else { return Ticket::Ready(rows) };
        let (p, h) = (self.ranks(), self.hidden);
        let el = x.recv.len() / p;
        let by_source = transpose_blocks(&rows, &transpose_counts(&x.recv, p, el), el, p, h);
        drop(rows);
        let back = x.recv_rows(p);
        let (send, recv) = (scaled(&back, h), scaled(&x.send_rows, h));
        self.count_bytes(g.rank(), &back);
        let g = g.clone();
        Ticket::Flying(stream.submit(move || g.all_to_all_v_known_f32(&by_source, &send, &recv)))
    }

    /// Starts sending plan-ordered rows (output gradients) to the experts' ranks;
    /// [`TokenDispatcher::finish_to_experts`] gives them grouped by local expert.
    fn start_to_experts(&self, rows: Vec<f32>, hd: &DispatchHandle) -> Ticket<Vec<f32>> {
        let (Some((g, stream)), Some(x)) = (self.ep, &hd.exchange) else { return Ticket::Ready(rows) };
        let (p, h) = (self.ranks(), self.hidden);
        let (send, recv) = (scaled(&x.send_rows, h), scaled(&x.recv_rows(p), h));
        self.count_bytes(g.rank(), &x.send_rows);
        let g = g.clone();
        Ticket::Flying(stream.submit(move || g.all_to_all_v_known_f32(&rows, &send, &recv)))
    }

    /// Waits for [`TokenDispatcher::start_to_experts`]: rows grouped by local expert.
    fn finish_to_experts(&self, t: Ticket<Vec<f32>>, hd: &DispatchHandle) -> Vec<f32> {
        let rows = self.finish(t);
        match &hd.exchange {
            Some(x) => transpose_blocks(&rows, &x.recv, self.ranks(), x.recv.len() / self.ranks(), self.hidden),
            None => rows,
        }
    }

    /// Backward of combine: `dys` (plan order) and `dweights: [N, K]`.
    fn combine_backward(&self, dout: &[f32], ys: &[f32], weights: &[f32], hd: &DispatchHandle) -> (Vec<f32>, Vec<f32>) {
        let mut dys = vec![0.0; ys.len()];
        let mut dw = vec![0.0; weights.len()];
        unpermute_backward(&mut dys, &mut dw, dout, ys, weights, &hd.plan, self.hidden);
        (dys, dw)
    }

    /// Backward of dispatch from plan-ordered `dxs`: `dx[t] += Σ_j dxs[row(t, j)]`.
    fn dispatch_backward(&self, dx: &mut [f32], dxs: &[f32], hd: &DispatchHandle) {
        permute_backward(dx, dxs, &hd.plan, self.hidden, true);
    }

    /// Counts what a hierarchical dispatch would send across nodes: each token once per
    /// remote node holding any of its experts, `H` floats each.
    fn count_hierarchical(&self, experts: &[u32], top_k: usize, el: usize, me: usize) {
        let home = self.node_of[me];
        if self.node_of.iter().all(|&n| n == home) {
            return; // one node: nothing crosses
        }
        let mut crossings = 0u64;
        let mut nodes: Vec<usize> = Vec::with_capacity(top_k);
        for choice in experts.chunks(top_k.max(1)) {
            nodes.clear();
            nodes.extend(choice.iter().map(|&e| self.node_of[e as usize / el]).filter(|&n| n != home));
            nodes.sort_unstable();
            nodes.dedup();
            crossings += nodes.len() as u64;
        }
        // Four exchanges per layer and step (dispatch, combine, and their backwards), each
        // crossing the same way: the combine returns one partial sum per remote node.
        self.stats().inter_hierarchical.fetch_add(4 * crossings * 4 * self.hidden as u64, Ordering::Relaxed);
    }

    /// Counts the bytes of one exchange sending `rows[d]` rows to each rank `d`.
    fn count_bytes(&self, me: usize, rows: &[usize]) {
        for (dst, &n) in rows.iter().enumerate().filter(|&(d, _)| d != me) {
            let counter = if self.node_of[dst] == self.node_of[me] { &self.stats().intra } else { &self.stats().inter };
            counter.fetch_add(4 * (n * self.hidden) as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod lane_clock_tests {
    use super::LaneClock;
    use std::time::Duration;

    fn nap() {
        std::thread::sleep(Duration::from_millis(30));
    }

    /// A wait is exposed alone, hidden while another lane computes, and exposed again
    /// while the other lane is blocked on something else.
    #[test]
    fn waits_count_as_exposed_only_while_no_lane_computes() {
        let alone = LaneClock::default();
        alone.waiting(nap);
        assert!(alone.take_exposed() >= 0.025, "a single pass's wait is exposed");

        let two = LaneClock::default();
        two.start_lane();
        two.start_lane();
        std::thread::scope(|s| {
            s.spawn(|| two.waiting(nap));
            // the other lane computes meanwhile
            nap();
        });
        assert_eq!(two.take_exposed(), 0.0, "hidden by the computing lane");
        // Both inside their waits at once for at least a nap (the barriers make sure).
        let both_in = std::sync::Barrier::new(2);
        let both_out = std::sync::Barrier::new(2);
        let hold = || {
            both_in.wait();
            nap();
            both_out.wait();
        };
        std::thread::scope(|s| {
            s.spawn(|| two.waiting(hold));
            // the other lane waits for another stage, computing nothing
            two.waiting_elsewhere(hold);
        });
        assert!(two.take_exposed() >= 0.025, "a blocked lane hides nothing");
    }
}
