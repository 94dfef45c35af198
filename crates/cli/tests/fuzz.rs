//! Fuzzing with proptest (property tests over generated inputs; cargo-fuzz needs a
//! nightly toolchain, which these machines cannot fetch): the config parser, the
//! safetensors header and loader, the JSONL reader, the problem normaliser and
//! `solve`'s whole input path never panic, and what they accept holds their invariants.
//!
//! In the test suite each target runs a fixed number of cases from fixed seeds. A longer
//! run: `ULTRAMOE_FUZZ_SECONDS=600 cargo test --release -p ultramoe --test fuzz --
//! --test-threads 1 --nocapture` runs every target for that many seconds, seed after
//! seed, and prints how many cases each ran.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use ultramoe_model::checkpoint::{load_weights, read_safetensors, save_weights};
use ultramoe_model::init::init_weights;
use ultramoe_model::{Model, ModelConfig};
use ultramoe_train::data::batch::{example_tokens, prompt_tokens};
use ultramoe_train::data::jsonl::read_jsonl;
use ultramoe_train::data::math::{check::verify, grade::answers_match, scope::classify};
use ultramoe_train::data::tokenizer::{normalize_question, VOCAB_SIZE};

const PRESET: &str = include_str!("../presets/math-moe.json");

/// Runs `test` on `cases` inputs from `strategy`, and on as many more rounds (new seeds)
/// as `ULTRAMOE_FUZZ_SECONDS` allows. A failing input is shrunk and reported with its
/// round, whose seed reproduces it.
fn fuzz<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let seconds: u64 = std::env::var("ULTRAMOE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (start, mut total) = (Instant::now(), 0u64);
    for round in 0u64.. {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&round.to_le_bytes());
        seed[8..16].copy_from_slice(&(name.len() as u64 * 0x9E37_79B9).to_le_bytes());
        let config = Config { cases, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz target {name}, round {round}: {e}");
        }
        total += cases as u64;
        if Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("fuzz {name}: {total} cases in {:.0} s, no failure", start.elapsed().as_secs_f64());
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultramoe-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Any JSON value, small: the kinds a config field might wrongly hold.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![Just(1e-300), Just(1e300), Just(-0.0), Just(0.5), Just(3.0e38), Just(1e39)].prop_map(|f: f64| json!(f)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from), prop::collection::btree_map("[a-z_]{1,10}", inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect()))]
    })
}

#[test]
fn config_parser() {
    let base: Value = serde_json::from_str(PRESET).unwrap();
    let keys: Vec<String> = base.as_object().unwrap().keys().cloned().chain(["rope_scaling", "num_experts", "num_local_experts", "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq"].map(String::from)).collect();
    let types = prop_oneof![Just("deepseek_v3"), Just("qwen3_moe"), Just("mixtral")];
    let mutated = (types, prop::collection::vec((prop::sample::select(keys), json_value()), 1..4)).prop_map(move |(t, edits)| {
        let mut v = base.clone();
        v["model_type"] = json!(t);
        for (k, val) in edits {
            v[k.as_str()] = val;
        }
        v.to_string()
    });
    let text = prop_oneof![3 => mutated, 1 => ".{0,200}", 1 => "[{}\\[\\]\":,0-9a-z_. -]{0,120}"];
    fuzz("config_parser", 2000, text, |t| {
        if let Ok(c) = ModelConfig::from_json_str(&t) {
            // What is accepted is in range: the layers can be laid out without overflow.
            prop_assert!(c.hidden > 0 && c.hidden <= 1 << 24 && c.vocab_size <= 1 << 24 && c.n_layers <= 4096);
            prop_assert!(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0 && c.rope_theta.is_finite() && c.rope_theta > 0.0);
            prop_assert!(c.moe.top_k <= c.moe.n_experts.max(c.moe.top_k * (c.n_moe_layers() == 0) as usize));
        }
        Ok(())
    });
}

/// A small model saved to a directory: the loader's valid input, to be broken.
fn small_checkpoint() -> (Model, Vec<u8>, String) {
    let cfg = r#"{"model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "moe_intermediate_size": 4,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_experts": 2,
        "num_experts_per_tok": 1, "max_position_embeddings": 16}"#;
    let model = Model::new(ModelConfig::from_json_str(cfg).unwrap());
    let w = init_weights(&model.layout, 3);
    let dir = scratch("small");
    save_weights(&model, &w, &dir, None).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    (model, bytes, config)
}

#[test]
fn safetensors_header_and_loader() {
    let (model, good, config) = small_checkpoint();
    let n = good.len();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // Edits: overwrite bytes (in the header more often), truncate, or a new header length.
    let edit = prop_oneof![
        4 => (0..8 + header_len, any::<u8>()).prop_map(|(i, b)| (0, i, b as u64)),
        2 => (0..n, any::<u8>()).prop_map(|(i, b)| (0, i, b as u64)),
        1 => (0..n).prop_map(|i| (1, i, 0)),
        1 => any::<u64>().prop_map(|l| (2, 0, l)),
    ];
    let dir = scratch("loader");
    std::fs::write(dir.join("config.json"), &config).unwrap();
    fuzz("safetensors_loader", 1500, prop::collection::vec(edit, 1..6), |edits| {
        let mut bytes = good.clone();
        for (kind, i, v) in edits {
            match kind {
                0 if i < bytes.len() => bytes[i] = v as u8,
                1 => bytes.truncate(i),
                2 if bytes.len() >= 8 => bytes[..8].copy_from_slice(&v.to_le_bytes()),
                _ => {}
            }
        }
        let file = dir.join("model.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let _ = read_safetensors(&file);
        if let Ok(w) = load_weights(&model, &dir) {
            prop_assert_eq!(w.len(), model.layout.total);
            prop_assert!(w.iter().all(|x| x.is_finite()), "a loaded weight is not finite");
        }
        Ok(())
    });
}

#[test]
fn jsonl_reader() {
    let line = prop_oneof![
        2 => ("[0-9 +*()x=-]{0,30}", "-?[0-9]{0,8}").prop_map(|(q, a)| json!({"question": q, "answer": a}).to_string()),
        1 => (".{0,40}", json_value()).prop_map(|(q, a)| json!({"question": q, "answer": a}).to_string()),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => ".{0,60}",
        1 => Just(String::new()),
    ];
    let dir = scratch("jsonl");
    fuzz("jsonl_reader", 2000, prop::collection::vec(line, 0..8), |lines| {
        let path = dir.join("data.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        match read_jsonl(&path) {
            Ok(items) => {
                prop_assert!(!items.is_empty());
                for qa in items {
                    prop_assert!(qa.line >= 1 && qa.line <= lines.len());
                    let (toks, targets) = example_tokens(&qa.question, &qa.answer);
                    prop_assert_eq!(toks.len(), targets.len());
                    prop_assert!(toks.iter().all(|&t| (t as usize) < VOCAB_SIZE));
                }
            }
            // Errors name the file.
            Err(e) => prop_assert!(e.contains(path.to_str().unwrap()), "{}", e),
        }
        Ok(())
    });
}

#[test]
fn problem_normaliser() {
    let text = prop_oneof![
        2 => "(What is |Compute |Solve for x: |Calculate )?[0-9 +*×x÷−()=.-]{0,30}\\??",
        2 => "(d/dx|Differentiate|Integrate|∫_?[0-9-]{0,2}\\^?[0-9]{0,2}|Solve|Find the roots of|Find f'\\(x\\) if f\\(x\\) =) ?[0-9 +*^xy²³()=,.sincoexpd-]{0,30}( from -?[0-9] to [0-9])?( dx)?",
        1 => ".{0,80}",
        1 => "\\PC{0,40}",
    ];
    fuzz("problem_normaliser", 5000, text, |q| {
        let n = normalize_question(&q);
        prop_assert!(n.len() <= 4 * q.len() + 12);
        let toks = prompt_tokens(&q);
        prop_assert!(toks.iter().all(|&t| (t as usize) < VOCAB_SIZE));
        // Reading the question's form, checking a candidate and grading never panic.
        let _ = classify(&q);
        let _ = verify(&q, "x = 1 or x = 2");
        let _ = verify(&q, "3x^2 + C");
        let _ = answers_match(&q, "x = 3, y = 1");
        let _ = answers_match(&q, "2x sin(x) + C");
        Ok(())
    });
}

#[test]
fn solve_input_path() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/math-moe");
    let text = prop_oneof![
        3 => "-?[0-9 +*x×()=-]{0,24}",
        1 => ".{0,30}",
        1 => "[ \\t]{0,3}",
    ];
    // (An argument cannot hold a NUL byte.)
    fuzz("solve_input", 24, text.prop_map(|q| q.replace('\0', " ")), |q| {
        let out = Command::new(exe).args(["--threads", "1", "solve", "--model"]).arg(&model).arg(&q).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!err.contains("panicked"), "{:?}: {}", q, err);
        match out.status.code() {
            Some(0) => prop_assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "{:?}: exit 0 without an answer", q),
            // 1: our errors; 2: the argument parser's (a problem of `--` is the end of
            // options, as everywhere: `solve -- --` passes it).
            Some(1 | 2) => prop_assert_eq!(err.lines().filter(|l| l.starts_with("ultramoe: error:") || l.starts_with("error:")).count(), 1, "{:?}: {}", q, err),
            other => prop_assert!(false, "{:?}: exit {:?}: {}", q, other, err),
        }
        Ok(())
    });
}
