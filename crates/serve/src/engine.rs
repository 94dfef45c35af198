//! Continuous batching: one loop runs every active request's next tokens through the
//! model in one cached pass, and requests join and leave the running batch between passes.
//!
//! Each pass takes one token from every decoding sequence, then fills what remains of the
//! pass's token budget (`max_pass_tokens`) with prompt chunks of sequences still being
//! prefilled (chunked prefill: a long prompt never stalls the decoders for more than one
//! budget's worth of work). A request is admitted only when a batch slot is free and its
//! whole cache — prompt plus `max_tokens` positions — fits the cache budget beside the
//! running ones' reservations, so the cache can never outgrow its limit mid-generation.
//! Waiting requests sit in a bounded queue: submitting to a full queue fails at once.

use crate::sampling::{Sampler, SamplingParams};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use ultramoe_model::decode::{pick_inputs, LogitRows};
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::kv_cache::SeqCache;
use ultramoe_dist::{CommResult, ProcessGroup};
use ultramoe_model::Model;

/// How the engine batches and what it may hold.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// sequences decoded together at most
    pub max_batch: usize,
    /// tokens one pass runs at most (decode tokens first, then prompt chunks)
    pub max_pass_tokens: usize,
    /// bytes all key/value caches may hold together
    pub cache_bytes: usize,
    /// requests waiting for a batch slot at most; more are refused
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 16, max_pass_tokens: 256, cache_bytes: 1 << 30, max_waiting: 64 }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// an end-of-sequence token (or the caller's stop sequence)
    Stop,
    /// `max_tokens` reached
    Length,
}

impl FinishReason {
    /// The OpenAI API's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine tells a request's owner.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// the next generated token (end-of-sequence tokens are not sent)
    Token(u32),
    /// the generation ended
    Done {
        /// why
        reason: FinishReason,
        /// prompt tokens
        prompt_tokens: usize,
        /// generated tokens
        completion_tokens: usize,
    },
    /// the request cannot run (too long for the model or the cache)
    Error(String),
}

/// One generation request.
pub struct Request {
    /// prompt tokens (at least one)
    pub prompt: Vec<u32>,
    /// tokens to generate at most
    pub max_tokens: usize,
    /// how tokens are chosen
    pub sampling: SamplingParams,
    /// tokens that end the generation (not sent)
    pub stop_tokens: Vec<u32>,
    /// receives the events; returning `false` cancels the request (its owner is gone
    /// or found a stop sequence)
    pub on_event: Box<dyn FnMut(Event) -> bool + Send>,
}

/// Counters the server reports (`/metrics`).
#[derive(Default, Debug)]
pub struct EngineStats {
    /// requests waiting for a slot
    pub waiting: AtomicUsize,
    /// sequences in the running batch
    pub running: AtomicUsize,
    /// cache bytes reserved by running sequences
    pub cache_reserved_bytes: AtomicUsize,
    /// cache bytes held by running sequences
    pub cache_used_bytes: AtomicUsize,
    /// prompt tokens run
    pub prompt_tokens: AtomicU64,
    /// tokens generated
    pub generated_tokens: AtomicU64,
    /// requests finished (any reason)
    pub finished: AtomicU64,
    /// requests cancelled by their owner
    pub cancelled: AtomicU64,
    /// passes run
    pub passes: AtomicU64,
    /// time spent in passes, microseconds
    pub pass_micros: AtomicU64,
}

/// Why a submission was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// the waiting queue is full
    QueueFull,
    /// the engine has stopped
    Stopped,
}

/// Where requests are sent; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Request>,
    /// the engine's counters
    pub stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Queues a request, or refuses it at once when the queue is full.
    pub fn submit(&self, r: Request) -> Result<(), SubmitError> {
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.try_send(r).map_err(|e| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }
}

struct Running {
    req: Request,
    sampler: Sampler,
    cache: SeqCache,
    /// prompt tokens already in the cache
    prefilled: usize,
    /// prompt then generated tokens
    seen: Vec<u32>,
    generated: usize,
    reserved: usize,
}

/// The batching loop over one model.
pub struct Engine {
    model: Arc<Model>,
    weights: Arc<DecodeWeights>,
    cfg: EngineConfig,
    rx: Receiver<Request>,
    stats: Arc<EngineStats>,
    running: Vec<Running>,
    /// admitted from the queue but waiting for cache room
    held: VecDeque<Request>,
    reserved: usize,
    /// the expert-parallel group whose other ranks run every pass with this one
    /// ([`follow`]); `None` on one rank
    followers: Option<Arc<dyn ProcessGroup>>,
}

impl Engine {
    /// An engine and the handle requests reach it by.
    pub fn new(model: Arc<Model>, weights: Arc<DecodeWeights>, cfg: EngineConfig) -> (Engine, EngineHandle) {
        let (tx, rx) = sync_channel(cfg.max_waiting.max(1));
        let stats = Arc::new(EngineStats::default());
        let e = Engine { model, weights, cfg, rx, stats: stats.clone(), running: vec![], held: VecDeque::new(), reserved: 0, followers: None };
        (e, EngineHandle { tx, stats })
    }

    /// An engine on rank 0 of an expert-parallel group: every pass it tells the other
    /// ranks (each running [`follow`]) to run the pass with it, so the MoE layers'
    /// exchanges send this rank's tokens to the experts the others hold.
    pub fn leading(model: Arc<Model>, weights: Arc<DecodeWeights>, cfg: EngineConfig, group: Arc<dyn ProcessGroup>) -> (Engine, EngineHandle) {
        assert_eq!(group.rank(), 0, "the leader is rank 0 of the group");
        let (mut e, h) = Engine::new(model, weights, cfg);
        e.followers = Some(group);
        (e, h)
    }

    /// Tells the followers what comes next.
    fn signal(&self, s: Signal) {
        if let Some(g) = &self.followers {
            let mut c = [s as u8 as f32];
            g.broadcast_f32(&mut c, 0).unwrap_or_else(|e| panic!("expert-parallel serving: the followers are gone: {e}"));
        }
    }

    /// Blocks until a request arrives (or every handle is gone). With followers, a
    /// heartbeat every second keeps their wait within the collectives' time limit.
    fn wait_for_request(&self) -> Result<Request, TryRecvError> {
        if self.followers.is_none() {
            return self.rx.recv().map_err(|_| TryRecvError::Disconnected);
        }
        loop {
            match self.rx.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(r) => return Ok(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => self.signal(Signal::Idle),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(TryRecvError::Disconnected),
            }
        }
    }

    /// Runs until every handle is dropped and every request is done.
    pub fn run(mut self) {
        while self.admit(self.running.is_empty()) {
            if !self.running.is_empty() {
                self.pass();
            }
        }
        while !self.running.is_empty() {
            self.pass();
        }
        self.signal(Signal::Stop);
    }

    /// Bytes a request's cache may reach.
    fn reservation(&self, r: &Request) -> usize {
        (r.prompt.len() + r.max_tokens) * SeqCache::bytes_per_token(&self.model)
    }

    /// Moves requests into the batch while slots and cache room allow; blocks for one when
    /// `wait`. Returns false once every handle is gone and nothing is queued.
    fn admit(&mut self, wait: bool) -> bool {
        let mut open = true;
        loop {
            if self.running.len() >= self.cfg.max_batch {
                return open;
            }
            let r = match self.held.pop_front() {
                Some(r) => r,
                None => {
                    let got = if wait && self.running.is_empty() { self.wait_for_request() } else { self.rx.try_recv() };
                    match got {
                        Ok(r) => {
                            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                            r
                        }
                        Err(TryRecvError::Empty) => return true,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            if self.held.is_empty() {
                                return false;
                            }
                            continue;
                        }
                    }
                }
            };
            if let Some(r) = self.reject(r) {
                let need = self.reservation(&r);
                if self.reserved + need > self.cfg.cache_bytes && !self.running.is_empty() {
                    // Wait for running sequences to free room; keep the queue's order.
                    self.held.push_front(r);
                    return open;
                }
                self.start(r, need);
            }
        }
    }

    /// Ends a request that can never run with an error; passes the rest through.
    fn reject(&self, mut r: Request) -> Option<Request> {
        let max = self.model.cfg.max_position;
        let need = self.reservation(&r);
        let why = if r.prompt.is_empty() {
            Some("the prompt has no tokens".to_string())
        } else if r.prompt.len() + r.max_tokens > max {
            Some(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's {max} positions",
                r.prompt.len(),
                r.max_tokens
            ))
        } else if need > self.cfg.cache_bytes {
            Some(format!("its cache ({need} bytes) exceeds the whole cache budget ({} bytes)", self.cfg.cache_bytes))
        } else if let Some(&t) = r.prompt.iter().find(|&&t| t as usize >= self.model.cfg.vocab_size) {
            Some(format!("token {t} is outside the vocabulary ({})", self.model.cfg.vocab_size))
        } else {
            None
        };
        match why {
            Some(w) => {
                (r.on_event)(Event::Error(w));
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => Some(r),
        }
    }

    fn start(&mut self, req: Request, reserved: usize) {
        self.reserved += reserved;
        self.stats.cache_reserved_bytes.store(self.reserved, Ordering::Relaxed);
        let sampler = Sampler::new(req.sampling.clone());
        let seen = req.prompt.clone();
        self.running.push(Running { sampler, cache: SeqCache::new(&self.model), prefilled: 0, seen, generated: 0, reserved, req });
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
    }

    /// One cached pass over the batch, then sampling and retirement.
    fn pass(&mut self) {
        let t0 = Instant::now();
        // Decode tokens first, then prompt chunks within the budget.
        let mut budget = self.cfg.max_pass_tokens.max(1);
        let mut feed: Vec<(usize, std::ops::Range<usize>)> = vec![];
        for (i, s) in self.running.iter().enumerate() {
            if s.prefilled == s.req.prompt.len() {
                feed.push((i, 0..0));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = s.req.prompt.len() - s.prefilled;
            if left > 0 && (budget > 0 || feed.is_empty()) {
                let n = left.min(budget.max(1));
                feed.push((i, s.prefilled..s.prefilled + n));
                budget = budget.saturating_sub(n);
            }
        }
        feed.sort_by_key(|f| f.0);
        let tokens: Vec<Vec<u32>> = feed
            .iter()
            .map(|(i, r)| {
                let s = &self.running[*i];
                if r.is_empty() {
                    vec![*s.seen.last().expect("a decoding sequence has tokens")]
                } else {
                    s.req.prompt[r.clone()].to_vec()
                }
            })
            .collect();
        self.signal(Signal::Pass);
        let logits = {
            let picks = feed.iter().zip(&tokens).map(|((i, _), t)| (*i, &t[..]));
            let mut inputs = pick_inputs(&mut self.running, picks, |s| &mut s.cache);
            self.model.forward_cached(&self.weights, &mut inputs, LogitRows::Last)
        };
        let mut done = vec![];
        for (((i, range), mut z), toks) in feed.into_iter().zip(logits).zip(&tokens) {
            let s = &mut self.running[i];
            if !range.is_empty() {
                s.prefilled = range.end;
                self.stats.prompt_tokens.fetch_add(toks.len() as u64, Ordering::Relaxed);
                if s.prefilled < s.req.prompt.len() {
                    continue;
                }
            }
            let tok = s.sampler.sample(&mut z, &s.seen);
            s.seen.push(tok);
            s.generated += 1;
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let finish = if s.req.stop_tokens.contains(&tok) {
                Some(FinishReason::Stop)
            } else if !(s.req.on_event)(Event::Token(tok)) {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                done.push(i);
                continue;
            } else if s.generated >= s.req.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = finish {
                let completion_tokens = s.generated - usize::from(reason == FinishReason::Stop && s.req.stop_tokens.contains(&tok));
                (s.req.on_event)(Event::Done { reason, prompt_tokens: s.req.prompt.len(), completion_tokens });
                done.push(i);
            }
        }
        for &i in done.iter().rev() {
            let s = self.running.remove(i);
            self.reserved -= s.reserved;
            self.stats.finished.fetch_add(1, Ordering::Relaxed);
        }
        let used: usize = self.running.iter().map(|s| s.cache.bytes()).sum();
        self.stats.cache_used_bytes.store(used, Ordering::Relaxed);
        self.stats.cache_reserved_bytes.store(self.reserved, Ordering::Relaxed);
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats.pass_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// What the leader of expert-parallel serving tells its followers before each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Signal {
    /// serving is over
    Stop = 0,
    /// run one pass
    Pass = 1,
    /// nothing to do yet (a heartbeat)
    Idle = 2,
}

/// Runs a follower rank of expert-parallel serving: its share of every MoE layer's
/// experts serves the leader's tokens, one pass whenever the leader runs one, until the
/// leader stops. The follower brings no sequences of its own.
pub fn follow(model: &Model, weights: &DecodeWeights, group: &dyn ProcessGroup) -> CommResult<usize> {
    let mut passes = 0;
    loop {
        let mut c = [0.0f32];
        group.broadcast_f32(&mut c, 0)?;
        match c[0] as u8 {
            x if x == Signal::Stop as u8 => return Ok(passes),
            x if x == Signal::Pass as u8 => {
                model.forward_cached(weights, &mut [], LogitRows::Last);
                passes += 1;
            }
            _ => {}
        }
    }
}

/// Starts an engine on its own thread; it stops when every handle is dropped and its
/// requests are done.
pub fn spawn(model: Arc<Model>, weights: Arc<DecodeWeights>, cfg: EngineConfig) -> (EngineHandle, std::thread::JoinHandle<()>) {
    spawn_engine(Engine::new(model, weights, cfg))
}

/// Starts a built engine on its own thread.
pub fn spawn_engine((engine, handle): (Engine, EngineHandle)) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let join = std::thread::Builder::new().name("ultramoe-engine".into()).spawn(move || engine.run()).expect("spawn the engine thread");
    (handle, join)
}
