//! Expert-parallel serving: rank 0 runs the batching engine; every rank holds 1/P of each
//! MoE layer's experts, and each pass's MoE layers send rank 0's tokens to the ranks
//! holding their experts. The generated tokens must be the single rank's, at 2 and 4
//! ranks (in-process ranks here; the same code runs over MPI).

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;
use ultramoe_dist::{local, ProcessGroup};
use ultramoe_kernels::qlinear::WeightFormat;
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::{Model, ModelConfig, Share};
use ultramoe_serve::engine::{follow, spawn, spawn_engine, Engine, EngineConfig, Event, Request};
use ultramoe_serve::sampling::SamplingParams;

fn dir(case: &str) -> PathBuf {
    match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf"),
    }
    .join(case)
}

fn config(case: &str) -> ModelConfig {
    let text = std::fs::read_to_string(dir(case).join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["max_position_embeddings"] = 128.into();
    ModelConfig::from_json_str(&v.to_string()).unwrap()
}

/// Greedy and seeded-sampled continuations of a few prompts through an engine.
fn generate(model: Arc<Model>, weights: Arc<DecodeWeights>, start: impl FnOnce(Arc<Model>, Arc<DecodeWeights>) -> (ultramoe_serve::engine::EngineHandle, std::thread::JoinHandle<()>)) -> Vec<Vec<u32>> {
    let v = model.cfg.vocab_size as u32;
    let (handle, join) = start(model, weights);
    let rxs: Vec<_> = (0..5u32)
        .map(|i| {
            let (tx, rx) = channel();
            let sampling = if i % 2 == 0 { SamplingParams::default() } else { SamplingParams { temperature: 0.7, seed: Some(i as u64), ..Default::default() } };
            let prompt = (0..3 + 5 * i).map(|j| (j * 7 + i * 3 + 1) % v).collect();
            handle.submit(Request { prompt, max_tokens: 20, sampling, stop_tokens: vec![], on_event: Box::new(move |e| tx.send(e).is_ok()) }).unwrap();
            rx
        })
        .collect();
    drop(handle);
    let out = rxs.into_iter().map(|rx| rx.iter().filter_map(|e| if let Event::Token(t) = e { Some(t) } else { None }).collect()).collect();
    join.join().unwrap();
    out
}

fn check(case: &'static str, p: usize) {
    let cfg = EngineConfig { max_batch: 3, max_pass_tokens: 16, ..Default::default() };
    let single = {
        let m = Model::new(config(case));
        let w = load_weights(&m, &dir(case)).unwrap();
        let dw = DecodeWeights::new(&m, w, WeightFormat::F32);
        let cfg = cfg.clone();
        generate(Arc::new(m), Arc::new(dw), move |m, w| spawn(m, w, cfg))
    };
    assert!(single.iter().all(|t| t.len() == 20));
    let ranks = local::run(p, Duration::from_secs(60), move |c| {
        let group: Arc<dyn ProcessGroup> = Arc::new(c);
        let share = Share { ep: Some(group.clone()), ..Share::whole(&config(case)) };
        let m = Model::share(config(case), share).unwrap();
        let w = load_weights(&m, &dir(case)).unwrap();
        let dw = DecodeWeights::new(&m, w, WeightFormat::F32);
        if group.rank() == 0 {
            let cfg = cfg.clone();
            let g = group.clone();
            Ok((generate(Arc::new(m), Arc::new(dw), move |m, w| spawn_engine(Engine::leading(m, w, cfg, g))), 0))
        } else {
            Ok((vec![], follow(&m, &dw, group.as_ref())?))
        }
    })
    .unwrap();
    assert_eq!(ranks[0].0, single, "{case} EP{p}: tokens differ from one rank's");
    assert!(ranks[1..].iter().all(|r| r.1 > 20), "{case} EP{p}: the followers ran the passes");
}

#[test]
fn expert_parallel_serving_gives_the_single_ranks_tokens() {
    for p in [2, 4] {
        check("qwen3_moe_tiny", p);
        check("deepseek_v3_tiny", p);
    }
}
