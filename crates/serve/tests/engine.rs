//! The batching engine: requests decoded together (joining and leaving the batch, long
//! prompts prefilled in chunks, a cache budget that makes some wait) get exactly the
//! tokens each gets alone; a full queue refuses at once; a cancelled request leaves; an
//! end token stops a request and is not sent.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use ultramoe_kernels::qlinear::WeightFormat;
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::kv_cache::SeqCache;
use ultramoe_model::{Model, ModelConfig};
use ultramoe_serve::engine::{spawn, Engine, EngineConfig, Event, FinishReason, Request, SubmitError};
use ultramoe_serve::sampling::SamplingParams;

fn fixture_model(case: &str) -> (Arc<Model>, Arc<DecodeWeights>) {
    let dir = match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf"),
    }
    .join(case);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["max_position_embeddings"] = 128.into();
    let m = Model::new(ModelConfig::from_json_str(&v.to_string()).unwrap());
    let w = load_weights(&m, &dir).unwrap();
    let dw = DecodeWeights::new(&m, w, WeightFormat::F32);
    (Arc::new(m), Arc::new(dw))
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams, stop: Vec<u32>) -> (Request, Receiver<Event>) {
    let (tx, rx) = channel();
    (Request { prompt, max_tokens, sampling, stop_tokens: stop, on_event: Box::new(move |e| tx.send(e).is_ok()) }, rx)
}

/// The tokens of a finished request and its end.
fn collect(rx: Receiver<Event>) -> (Vec<u32>, Event) {
    let mut toks = vec![];
    for e in rx {
        match e {
            Event::Token(t) => toks.push(t),
            end => return (toks, end),
        }
    }
    panic!("the engine dropped a request without ending it")
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    (0..10).map(|i| (0..(2 + 7 * i) as u32).map(|j| (j * 5 + i as u32 * 11 + 1) % vocab as u32).collect()).collect()
}

fn run_all(m: &Arc<Model>, w: &Arc<DecodeWeights>, cfg: EngineConfig, sampling: &[SamplingParams], max_tokens: usize) -> Vec<Vec<u32>> {
    let (handle, join) = spawn(m.clone(), w.clone(), cfg);
    let rxs: Vec<_> = prompts(m.cfg.vocab_size)
        .into_iter()
        .zip(sampling)
        .map(|(p, s)| {
            let (r, rx) = request(p, max_tokens, s.clone(), vec![]);
            handle.submit(r).unwrap();
            rx
        })
        .collect();
    drop(handle);
    let out = rxs.into_iter().map(|rx| collect(rx).0).collect();
    join.join().unwrap();
    out
}

#[test]
fn batched_requests_get_the_tokens_they_get_alone() {
    for case in ["qwen3_moe_tiny", "deepseek_v3_tiny"] {
        let (m, w) = fixture_model(case);
        // Greedy for some, seeded sampling for others.
        let sampling: Vec<SamplingParams> = (0..10)
            .map(|i| if i % 2 == 0 { SamplingParams::default() } else { SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, seed: Some(i), ..Default::default() } })
            .collect();
        let alone = run_all(&m, &w, EngineConfig { max_batch: 1, ..Default::default() }, &sampling, 24);
        assert!(alone.iter().all(|t| t.len() == 24));
        // Four at a time, passes of at most 8 tokens (prompts up to 65 tokens arrive in
        // chunks), and a cache budget that holds about three requests' reservations.
        let per_token = SeqCache::bytes_per_token(&m);
        let batched = EngineConfig { max_batch: 4, max_pass_tokens: 8, cache_bytes: 3 * 90 * per_token, max_waiting: 16 };
        assert_eq!(run_all(&m, &w, batched, &sampling, 24), alone, "{case}: batched decoding changed some request's tokens");
        let wide = EngineConfig { max_batch: 10, max_pass_tokens: 1000, ..Default::default() };
        assert_eq!(run_all(&m, &w, wide, &sampling, 24), alone, "{case}: one wide batch changed some request's tokens");
    }
}

#[test]
fn end_tokens_stop_and_are_not_sent() {
    let (m, w) = fixture_model("qwen3_moe_tiny");
    let p = prompts(m.cfg.vocab_size).remove(3);
    let (handle, join) = spawn(m.clone(), w.clone(), EngineConfig::default());
    let (r, rx) = request(p.clone(), 30, SamplingParams::default(), vec![]);
    handle.submit(r).unwrap();
    let (free, end) = collect(rx);
    assert_eq!(end, Event::Done { reason: FinishReason::Length, prompt_tokens: p.len(), completion_tokens: 30 });
    // Stop at the fifth token's value: everything before its first appearance is sent.
    let stop = free[4];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let (r, rx) = request(p.clone(), 30, SamplingParams::default(), vec![stop]);
    handle.submit(r).unwrap();
    let (toks, end) = collect(rx);
    assert_eq!(toks, free[..first].to_vec());
    assert_eq!(end, Event::Done { reason: FinishReason::Stop, prompt_tokens: p.len(), completion_tokens: first });
    drop(handle);
    join.join().unwrap();
}

#[test]
fn a_full_queue_refuses_and_a_cancelled_request_leaves() {
    let (m, w) = fixture_model("qwen3_moe_tiny");
    // Not started yet: the queue fills up to its bound and then refuses.
    let (engine, handle) = Engine::new(m.clone(), w.clone(), EngineConfig { max_batch: 1, max_waiting: 3, ..Default::default() });
    let mut rxs = vec![];
    for _ in 0..3 {
        let (r, rx) = request(vec![1, 2, 3], 5, SamplingParams::default(), vec![]);
        handle.submit(r).unwrap();
        rxs.push(rx);
    }
    let (r, _rx) = request(vec![1, 2, 3], 5, SamplingParams::default(), vec![]);
    assert_eq!(handle.submit(r).unwrap_err(), SubmitError::QueueFull);
    assert_eq!(handle.stats.waiting.load(std::sync::atomic::Ordering::SeqCst), 3);
    // The owner of the second goes away: its request ends after at most one token.
    drop(rxs.remove(1));
    let join = std::thread::spawn(move || engine.run());
    for rx in rxs {
        assert_eq!(collect(rx).0.len(), 5);
    }
    assert_eq!(handle.stats.cancelled.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(handle);
    join.join().unwrap();
}

#[test]
fn requests_that_cannot_run_get_an_error() {
    let (m, w) = fixture_model("qwen3_moe_tiny");
    let per_token = SeqCache::bytes_per_token(&m);
    let (handle, join) = spawn(m.clone(), w.clone(), EngineConfig { cache_bytes: 50 * per_token, ..Default::default() });
    for (prompt, max_tokens, what) in [(vec![1; 100], 40, "positions"), (vec![1; 40], 20, "cache budget"), (vec![1, 5000], 4, "vocabulary"), (vec![], 4, "no tokens")] {
        let (r, rx) = request(prompt, max_tokens, SamplingParams::default(), vec![]);
        handle.submit(r).unwrap();
        match collect(rx) {
            (t, Event::Error(e)) if t.is_empty() => assert!(e.contains(what), "{e}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    drop(handle);
    join.join().unwrap();
}
