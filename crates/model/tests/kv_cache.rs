//! Decoding with a key/value cache against recomputing the whole prefix for every token:
//! greedy decoding must produce the same 64 tokens, with every step's logits within 1e-4
//! of the recomputed ones — for DeepSeek-V3 (MLA with and without a query LoRA, with
//! YaRN), Qwen3-MoE and Mixtral. The fixtures' transformers-checked weights are used where
//! the shape allows; MLA decodes with absorbed up-projections, so this also checks the
//! absorption algebra. Chunked prefill and batches of sequences of different lengths
//! must give each sequence what it gets alone.

use serde_json::Value;
use std::path::PathBuf;
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::decode::{CachedInput, LogitRows};
use ultramoe_model::init::init_weights;
use ultramoe_model::kv_cache::SeqCache;
use ultramoe_model::{Model, ModelConfig};

const NEW_TOKENS: usize = 64;

fn fixture(case: &str) -> PathBuf {
    match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf"),
    }
    .join(case)
}

/// The fixture's config with room for the prompt and 64 new tokens, edited by `edit`.
fn config(case: &str, edit: impl FnOnce(&mut Value)) -> ModelConfig {
    let text = std::fs::read_to_string(fixture(case).join("config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["max_position_embeddings"] = 128.into();
    edit(&mut v);
    ModelConfig::from_json_str(&v.to_string()).unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32
}

/// Greedy decoding by recomputing the whole prefix: the tokens and each step's logits.
fn recomputed(m: &Model, w: &[f32], prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let v = m.cfg.vocab_size;
    let mut seq = prompt.to_vec();
    let mut logits = vec![];
    for _ in 0..steps {
        let t = seq.len();
        let fwd = m.forward(w, &seq, 1, t);
        let last = fwd.logits[(t - 1) * v..t * v].to_vec();
        seq.push(argmax(&last));
        logits.push(last);
    }
    (seq[prompt.len()..].to_vec(), logits)
}

/// Greedy decoding with a cache, the prompt prefilled `chunk` tokens at a time.
fn cached(m: &Model, w: &[f32], prompt: &[u32], steps: usize, chunk: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = SeqCache::new(m);
    let mut last = vec![];
    for part in prompt.chunks(chunk) {
        last = m.forward_cached(w, &mut [CachedInput { tokens: part, cache: &mut cache }], LogitRows::Last).remove(0);
    }
    let (mut tokens, mut logits) = (vec![], vec![]);
    for _ in 0..steps {
        let next = argmax(&last);
        tokens.push(next);
        logits.push(std::mem::take(&mut last));
        last = m.forward_cached(w, &mut [CachedInput { tokens: &[next], cache: &mut cache }], LogitRows::Last).remove(0);
    }
    assert_eq!(cache.len, prompt.len() + steps);
    assert_eq!(cache.bytes(), cache.len * SeqCache::bytes_per_token(m));
    (tokens, logits)
}

fn prompt(m: &Model, len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + seed * 13 + 3) % m.cfg.vocab_size as u32).collect()
}

fn check(name: &str, m: &Model, w: &[f32]) {
    let p = prompt(m, 9, 1);
    let (want, want_logits) = recomputed(m, w, &p, NEW_TOKENS);
    assert!(want.iter().collect::<std::collections::HashSet<_>>().len() > 1, "{name}: a degenerate model (one token repeated)");
    for chunk in [p.len(), 4, 1] {
        let (got, logits) = cached(m, w, &p, NEW_TOKENS, chunk);
        let err = logits.iter().zip(&want_logits).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0f32, f32::max);
        assert!(err <= 1e-4, "{name} (prefill chunks of {chunk}): logits differ by {err}");
        assert_eq!(got, want, "{name} (prefill chunks of {chunk}): tokens differ");
        let top = want_logits.iter().flatten().fold(0.0f32, |a, x| a.max(x.abs()));
        eprintln!("{name}, prefill chunks of {chunk}: {NEW_TOKENS} tokens equal, max logit error {err:.2e} (max |logit| {top:.2})");
    }
}

fn fixture_model(case: &str, edit: impl FnOnce(&mut Value)) -> (Model, Vec<f32>) {
    let m = Model::new(config(case, edit));
    let w = load_weights(&m, &fixture(case)).unwrap();
    (m, w)
}

#[test]
fn deepseek_v3_mla_with_query_lora_decodes_as_recomputed() {
    let (m, w) = fixture_model("deepseek_v3_tiny", |_| {});
    check("deepseek-v3", &m, &w);
}

#[test]
fn deepseek_v3_mla_with_yarn_decodes_as_recomputed() {
    let (m, w) = fixture_model("deepseek_v3_tiny", |v| {
        v["rope_parameters"] = serde_json::json!({
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0
        });
    });
    check("deepseek-v3 yarn", &m, &w);
}

#[test]
fn deepseek_v3_mla_without_query_lora_decodes_as_recomputed() {
    let m = Model::new(config("deepseek_v3_tiny", |v| v["q_lora_rank"] = Value::Null));
    assert!(m.layout.get("model.layers.0.self_attn.q_proj.weight").is_some());
    // Initial weights scaled up so the logits are far from uniform.
    let w: Vec<f32> = init_weights(&m.layout, 11).iter().map(|x| x * 4.0).collect();
    check("deepseek-v3 without q-lora", &m, &w);
}

#[test]
fn qwen3_moe_decodes_as_recomputed() {
    let (m, w) = fixture_model("qwen3_moe_tiny", |_| {});
    check("qwen3-moe", &m, &w);
}

#[test]
fn mixtral_decodes_as_recomputed() {
    let (m, w) = fixture_model("mixtral_tiny", |_| {});
    check("mixtral", &m, &w);
}

/// Sequences of different lengths in one pass — some prefilling, some decoding, joining
/// and leaving between passes — each get the tokens they get alone.
#[test]
fn a_batch_of_sequences_gives_each_what_it_gets_alone() {
    for case in ["deepseek_v3_tiny", "qwen3_moe_tiny"] {
        let (m, w) = fixture_model(case, |_| {});
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(&m, 3 + 4 * i, i as u32)).collect();
        let steps = 20;
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| cached(&m, &w, p, steps, p.len()).0).collect();
        // Sequence i joins at pass 2·i; a prompt arrives whole.
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| SeqCache::new(&m)).collect();
        let mut out: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
        let mut pass = 0;
        while out.iter().any(|o| o.len() < steps) {
            let feed: Vec<(usize, Vec<u32>)> = (0..prompts.len())
                .filter(|&i| pass >= 2 * i && out[i].len() < steps)
                .map(|i| (i, if caches[i].len == 0 { prompts[i].clone() } else { vec![*out[i].last().unwrap()] }))
                .collect();
            let mut inputs: Vec<CachedInput> = Vec::new();
            let mut rest: &mut [SeqCache] = &mut caches;
            let mut taken = 0;
            for (i, toks) in &feed {
                let (_, tail) = rest.split_at_mut(i - taken);
                let (one, tail) = tail.split_at_mut(1);
                inputs.push(CachedInput { tokens: toks, cache: &mut one[0] });
                rest = tail;
                taken = i + 1;
            }
            let logits = m.forward_cached(&w, &mut inputs, LogitRows::Last);
            for ((i, _), l) in feed.iter().zip(logits) {
                out[*i].push(argmax(&l));
            }
            pass += 1;
        }
        assert_eq!(out, alone, "{case}: batched decoding differs from decoding alone");
    }
}
