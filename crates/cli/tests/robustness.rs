//! The binary under hostile-but-ordinary use: hundreds of malformed configs, checkpoints,
//! data files, flags and problems each end with a non-zero exit and one error line that
//! names the file or field and the reason — no panic, no abort, no allocation failure;
//! and a training killed at random moments (mid-save included) always resumes from its
//! `latest` checkpoint to the very weights of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ultramoe_model::checkpoint::{read_safetensors, write_safetensors, Tensor, TensorData};

const PRESET: &str = include_str!("../presets/math-moe.json");

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_ultramoe")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultramoe-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shipped_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/math-moe")
}

/// One hostile input: the command line and what its error line must mention.
struct Case {
    args: Vec<String>,
    needles: Vec<String>,
}

fn case(args: &[&str], needles: &[&str]) -> Case {
    Case { args: args.iter().map(|s| s.to_string()).collect(), needles: needles.iter().map(|s| s.to_string()).collect() }
}

/// Runs one case (killed after 60 s) and says what is wrong with its outcome, if anything.
fn check(c: &Case) -> Option<String> {
    let mut child = Command::new(exe())
        .arg("--threads")
        .arg("1")
        .args(&c.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            return Some(format!("{:?}: still running after 60 s (bad input accepted?)", c.args));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap();
    let fail = |why: &str| Some(format!("{:?}: {why}\n{err}", c.args));
    match status.code() {
        None => return fail("killed by a signal (abort?)"),
        Some(0) => return fail("exit 0 on bad input"),
        Some(_) => {}
    }
    if err.contains("panicked") || err.contains("memory allocation") || err.contains("RUST_BACKTRACE") {
        return fail("panicked or aborted");
    }
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ultramoe: error:") || l.starts_with("error:")).collect();
    if errors.len() != 1 {
        return fail("expected exactly one error line");
    }
    let line = errors[0];
    for n in &c.needles {
        if !line.contains(n.as_str()) {
            return fail(&format!("the error line does not mention `{n}`"));
        }
    }
    None
}

/// Bad values for config fields: (field, value, what the error must name).
fn config_mutations() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let mut v = vec![];
    for f in ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "moe_intermediate_size", "kv_lora_rank", "v_head_dim", "n_routed_experts", "num_experts_per_tok"] {
        for bad in [json!(0), json!(-1), json!(2.5), json!("64"), json!(true), json!([1]), json!({}), json!(1e30), json!(99_999_999_999u64)] {
            v.push((f, bad));
        }
    }
    for (f, bad) in [
        ("qk_rope_head_dim", json!(3)),
        ("qk_rope_head_dim", json!(0)),
        ("num_hidden_layers", json!(5000)),
        ("num_experts_per_tok", json!(9)),
        ("n_routed_experts", json!(100_000)),
        ("n_group", json!(3)),
        ("n_group", json!(0)),
        ("topk_group", json!(0)),
        ("topk_group", json!(99)),
        ("rms_norm_eps", json!(-1)),
        ("rms_norm_eps", json!(0)),
        ("rms_norm_eps", json!("tiny")),
        ("rms_norm_eps", json!(1e39)),
        ("rope_parameters", json!({"rope_theta": 0.0, "rope_type": "default"})),
        ("rope_parameters", json!({"rope_theta": -5.0, "rope_type": "default"})),
        ("rope_parameters", json!({"rope_type": "ntk"})),
        ("rope_parameters", json!({"rope_type": "linear", "factor": -2.0})),
        ("rope_parameters", json!({"rope_type": "linear"})),
        ("rope_parameters", json!({"rope_type": "yarn", "factor": 0.0})),
        ("routed_scaling_factor", json!(0)),
        ("routed_scaling_factor", json!(-1.5)),
        ("initializer_range", json!(-1)),
        ("max_position_embeddings", json!(-1)),
        ("max_position_embeddings", json!(64)),
        ("model_type", json!("llama")),
        ("model_type", json!(5)),
        ("scoring_func", json!("softmax")),
        ("tie_word_embeddings", json!("yes")),
        ("first_k_dense_replace", json!(-1)),
        ("num_key_value_heads", json!(0)),
    ] {
        v.push((f, bad));
    }
    v
}

/// The field an error about `f` names (the RoPE block's own fields are nested).
fn named(f: &str, value: &serde_json::Value) -> String {
    match f {
        "rope_parameters" => {
            let o = value.as_object().unwrap();
            if o.get("rope_theta").is_some() {
                "rope_theta".into()
            } else {
                "rope_".into()
            }
        }
        // 64 positions cannot hold the default 128-token rows.
        "max_position_embeddings" if value == &serde_json::json!(64) => "max_position".into(),
        other => other.into(),
    }
}

fn config_cases(dir: &Path) -> Vec<Case> {
    let base: serde_json::Value = serde_json::from_str(PRESET).unwrap();
    let mut out = vec![];
    for (i, (field, bad)) in config_mutations().into_iter().enumerate() {
        let mut v = base.clone();
        v[field] = bad.clone();
        let path = dir.join(format!("config-{i}.json"));
        std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        let p = path.to_str().unwrap().to_string();
        let run = dir.join(format!("run-config-{i}"));
        let need = named(field, &bad);
        out.push(Case {
            args: ["train", "--model-config", &p, "--steps", "1", "--no-progress", "--peak-gflops", "100", "--run-dir", run.to_str().unwrap()].map(String::from).to_vec(),
            needles: vec![need.clone()],
        });
        // The seq-len check belongs to training, not to a prediction of a given length.
        if need != "max_position" {
            out.push(Case { args: ["memory", "--model-config", &p, "--seq-len", "32"].map(String::from).to_vec(), needles: vec![need] });
        }
    }
    // Whole files that are not configs.
    let texts: [(&str, &[u8]); 7] = [
        ("empty", b""),
        ("not-json", b"hidden_size = 64"),
        ("array", b"[1, 2, 3]"),
        ("truncated", &PRESET.as_bytes()[..200]),
        ("binary", &[0xff, 0xfe, 0x00, 0x13, 0x37]),
        ("no-type", br#"{"hidden_size": 64}"#),
        ("null", b"null"),
    ];
    for (name, bytes) in texts {
        let path = dir.join(format!("bad-{name}.json"));
        std::fs::write(&path, bytes).unwrap();
        let p = path.to_str().unwrap();
        out.push(case(&["train", "--model-config", p, "--steps", "1", "--run-dir", dir.join(format!("run-{name}")).to_str().unwrap()], &[p]));
        out.push(case(&["memory", "--model-config", p], &[p]));
    }
    let missing = dir.join("missing.json");
    out.push(case(&["train", "--model-config", missing.to_str().unwrap(), "--run-dir", dir.join("run-missing").to_str().unwrap()], &["missing.json"]));
    out.push(case(&["memory", "--model-config", dir.to_str().unwrap()], &[dir.to_str().unwrap()]));
    out
}

/// Checkpoint directories broken one way each: (name, directory, what the error names).
fn broken_checkpoints(dir: &Path) -> Vec<(String, PathBuf, String)> {
    let src = shipped_model();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let tensors = read_safetensors(&src.join("model.safetensors")).unwrap();
    let mut out = vec![];
    let mut make = |name: &str, cfg: Option<&str>, files: Vec<(&str, Vec<u8>)>, needle: &str| {
        let d = dir.join(format!("ckpt-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        if let Some(c) = cfg {
            std::fs::write(d.join("config.json"), c).unwrap();
        }
        for (f, bytes) in files {
            std::fs::write(d.join(f), bytes).unwrap();
        }
        out.push((name.to_string(), d, needle.to_string()));
    };
    let bytes_of = |t: &std::collections::BTreeMap<String, Tensor>| -> Vec<u8> {
        let tmp = dir.join(format!("tmp-{}.safetensors", t.len()));
        let list: Vec<(String, Vec<usize>, &[f32])> = t
            .iter()
            .map(|(n, t)| match &t.data {
                TensorData::F32(v) => (n.clone(), t.shape.clone(), &v[..]),
                TensorData::I64(_) => unreachable!(),
            })
            .collect();
        write_safetensors(&tmp, &list, None).unwrap();
        std::fs::read(&tmp).unwrap()
    };
    let good = std::fs::read(src.join("model.safetensors")).unwrap();
    let embed = "model.embed_tokens.weight";
    make("empty", None, vec![], "config.json");
    make("no-weights", Some(&config), vec![], "neither model.safetensors");
    make("garbage", Some(&config), vec![("model.safetensors", b"hello, world".to_vec())], "not a valid safetensors file");
    make("truncated", Some(&config), vec![("model.safetensors", good[..good.len() / 2].to_vec())], "not a valid safetensors file");
    let mut huge = (1u64 << 60).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    make("huge-header", Some(&config), vec![("model.safetensors", huge)], "not a valid safetensors file");
    let mut junk = 10u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"{{{{{{{{{{");
    make("header-not-json", Some(&config), vec![("model.safetensors", junk)], "not a valid safetensors file");
    for (name, value) in [("nan", f32::NAN), ("inf", f32::INFINITY), ("neg-inf", f32::NEG_INFINITY)] {
        let mut t = tensors.clone();
        if let TensorData::F32(v) = &mut t.get_mut(embed).unwrap().data {
            v[7] = value;
        }
        make(&format!("weights-{name}"), Some(&config), vec![("model.safetensors", bytes_of(&t))], "not finite");
    }
    let mut t = tensors.clone();
    t.remove("model.norm.weight");
    make("missing-tensor", Some(&config), vec![("model.safetensors", bytes_of(&t))], "missing tensor");
    let mut t = tensors.clone();
    t.insert("model.layers.0.bogus.weight".into(), Tensor { shape: vec![2], data: TensorData::F32(vec![0.0, 1.0]) });
    make("extra-tensor", Some(&config), vec![("model.safetensors", bytes_of(&t))], "model.layers.0.bogus.weight");
    let mut t = tensors.clone();
    let e = t.get_mut("model.layers.0.self_attn.q_a_proj.weight").unwrap();
    e.shape = vec![e.shape[1], e.shape[0]];
    make("shape", Some(&config), vec![("model.safetensors", bytes_of(&t))], "shape");
    // A config with 3 layers and a checkpoint with 4: a layer would be dropped.
    let mut c: serde_json::Value = serde_json::from_str(&config).unwrap();
    c["num_hidden_layers"] = serde_json::json!(3);
    make("fewer-layers", Some(&c.to_string()), vec![("model.safetensors", good.clone())], "model.layers.3");
    let mut c: serde_json::Value = serde_json::from_str(&config).unwrap();
    c["num_hidden_layers"] = serde_json::json!(5);
    make("more-layers", Some(&c.to_string()), vec![("model.safetensors", good.clone())], "model.layers.4");
    let mut c: serde_json::Value = serde_json::from_str(&config).unwrap();
    c["vocab_size"] = serde_json::json!(64);
    make("small-vocab", Some(&c.to_string()), vec![("model.safetensors", good.clone())], "lm_head.weight");
    make("bad-config", Some("{\"model_type\": \"deepseek_v3\""), vec![("model.safetensors", good.clone())], "config.json");
    let index = |shard: &str| format!(r#"{{"metadata": {{}}, "weight_map": {{"{embed}": "{shard}"}}}}"#).into_bytes();
    make("index-escape", Some(&config), vec![("model.safetensors.index.json", index("../../x.safetensors"))], "outside the model directory");
    make("index-absolute", Some(&config), vec![("model.safetensors.index.json", index("/etc/passwd"))], "outside the model directory");
    make("index-missing-shard", Some(&config), vec![("model.safetensors.index.json", index("model-00001-of-00002.safetensors"))], "model-00001-of-00002.safetensors");
    make("index-not-object", Some(&config), vec![("model.safetensors.index.json", br#"{"weight_map": [1, 2]}"#.to_vec())], "weight_map");
    make("index-not-json", Some(&config), vec![("model.safetensors.index.json", b"{weight_map".to_vec())], "model.safetensors.index.json");
    make("index-number", Some(&config), vec![("model.safetensors.index.json", format!(r#"{{"weight_map": {{"{embed}": 5}}}}"#).into_bytes())], embed);
    // Integers where weights belong.
    let ints = {
        let tmp = dir.join("ints.safetensors");
        let data: Vec<u8> = (0..4i64).flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, 2], &data).unwrap();
        std::fs::write(&tmp, safetensors::serialize(vec![("model.norm.weight", view)], None).unwrap()).unwrap();
        std::fs::read(&tmp).unwrap()
    };
    make("int-tensor", Some(&config), vec![("model.safetensors", ints)], "model.norm.weight");
    out
}

fn checkpoint_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    for (name, d, needle) in broken_checkpoints(dir) {
        let p = d.to_str().unwrap().to_string();
        out.push(case(&["solve", "--model", &p, "12 + 7"], &[&needle]));
        out.push(case(&["eval", "--model", &p, "--n", "1", "--kinds", "add"], &[&needle]));
        let run = dir.join(format!("run-init-{name}"));
        // --init-from reads weights for the embedded config: the config-only breakages
        // (its own config.json) do not apply there.
        if !["empty", "fewer-layers", "more-layers", "small-vocab", "bad-config"].contains(&name.as_str()) {
            out.push(case(&["train", "--init-from", &p, "--steps", "1", "--peak-gflops", "100", "--no-progress", "--run-dir", run.to_str().unwrap()], &[&needle]));
        }
    }
    out
}

fn data_cases(dir: &Path) -> Vec<Case> {
    let long = format!(r#"{{"question": "{}", "answer": "1"}}"#, "1+".repeat(150) + "1");
    let files: Vec<(&str, String, &str)> = vec![
        ("not-json", "this is not json\n".into(), "line 1: not valid JSON"),
        ("no-question", r#"{"answer": "3"}"#.into(), "question"),
        ("no-answer", r#"{"question": "1+2"}"#.into(), "answer"),
        ("answer-object", r#"{"question": "1+2", "answer": {"v": 3}}"#.into(), "answer"),
        ("question-number", r#"{"question": 12, "answer": "3"}"#.into(), "question"),
        ("empty", String::new(), "empty: no"),
        ("blank-lines", "\n\n   \n".into(), "empty: no"),
        ("second-line-bad", "{\"question\": \"1+2\", \"answer\": \"3\"}\n{\"question\": \"1+\"\n".into(), "line 2"),
        ("too-long", long.clone(), "longer than seq-len"),
        ("array", "[1, 2]".into(), "question"),
    ];
    let mut out = vec![];
    for (name, text, needle) in files {
        let path = dir.join(format!("data-{name}.jsonl"));
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let run = dir.join(format!("run-data-{name}"));
        out.push(case(&["train", "--data", p, "--steps", "1", "--peak-gflops", "100", "--no-progress", "--run-dir", run.to_str().unwrap()], &[needle]));
        if name != "too-long" {
            out.push(case(&["eval", "--file", p, "--model", shipped_model().to_str().unwrap()], &[needle]));
        }
    }
    out.push(case(&["train", "--data", "/nonexistent/data.jsonl", "--run-dir", dir.join("run-nodata").to_str().unwrap()], &["--data"]));
    out
}

fn flag_cases(dir: &Path) -> Vec<Case> {
    let run = |n: &str| dir.join(format!("run-flag-{n}")).to_str().unwrap().to_string();
    let train = |n: &str, extra: &[&str], needle: &str| {
        let r = run(n);
        let mut args = vec!["train", "--steps", "1", "--no-progress", "--peak-gflops", "100", "--run-dir", &r];
        args.extend_from_slice(extra);
        case(&args, &[needle])
    };
    let mut out = vec![];
    for (i, lr) in ["nan", "inf", "-inf", "-1", "0", "1e39", "abc", ""].iter().enumerate() {
        out.push(train(&format!("lr{i}"), &["--lr", lr], "lr"));
    }
    for (i, v) in ["nan", "-1", "1"].iter().enumerate() {
        out.push(train(&format!("minlr{i}"), &["--min-lr", v], "min_lr"));
    }
    for (i, v) in ["0", "-1", "abc", "1000000000000", "99999999999999999999999"].iter().enumerate() {
        out.push(train(&format!("mb{i}"), &["--micro-batch", v], "micro"));
    }
    for (i, v) in ["0", "1", "100000"].iter().enumerate() {
        out.push(train(&format!("seq{i}"), &["--seq-len", v], if *v == "100000" { "max_position" } else { "seq" }));
    }
    out.push(train("accum0", &["--grad-accum", "0"], "grad_accum"));
    out.push(train("steps-neg", &["--steps", "-1"], "--steps"));
    out.push(train("warmup", &["--warmup", "x"], "--warmup"));
    out.push(train("aux", &["--aux-loss", "bogus"], "aux_loss"));
    for (i, v) in ["nan", "-1", "inf"].iter().enumerate() {
        out.push(train(&format!("auxcoef{i}"), &["--aux-loss", "switch", "--aux-loss-coef", v], "aux_loss_coef"));
        out.push(train(&format!("skew{i}"), &["--routing-skew", v], "routing_skew"));
        out.push(train(&format!("bias{i}"), &["--bias-update-rate", v], "bias_update_rate"));
        out.push(train(&format!("peak{i}"), &["--peak-gflops", v], "--peak-gflops"));
    }
    out.push(train("aux-groups", &["--aux-loss", "ep-group", "--aux-ep-groups", "3"], "aux_loss"));
    out.push(train("stats0", &["--stats-ep", "0"], "stats_ep"));
    out.push(train("stats3", &["--stats-ep", "3"], "stats_ep"));
    out.push(train("ranks0", &["--ranks", "0"], "--ranks"));
    out.push(train("ep3", &["--ranks", "2", "--ep", "3"], "--ep"));
    out.push(train("dp0", &["--ranks", "2", "--dp", "0"], "--dp"));
    out.push(train("epdp", &["--ranks", "4", "--ep", "2", "--dp", "3"], "--dp"));
    out.push(train("chunks0", &["--overlap-chunks", "0"], "--overlap-chunks"));
    out.push(train("timeout0", &["--comm-timeout", "0"], "--comm-timeout"));
    out.push(train("placement", &["--placement-every", "5"], "expert parallelism"));
    out.push(train("redundant", &["--redundant-experts", "1"], "expert parallelism"));
    out.push(train("hier", &["--ranks", "2", "--hierarchical-a2a", "--micro-batch", "4"], "--hierarchical-a2a"));
    for (i, (v, needle)) in [("lots", "lots"), ("-5MB", "-5MB"), ("1XB", "XB"), ("", "--memory-budget")].iter().enumerate() {
        out.push(train(&format!("budget{i}"), &["--memory-budget", v], needle));
    }
    out.push(train("policy", &["--memory-policy", "swiglu+nrom"], "nrom"));
    out.push(train("policy-layer", &["--memory-policy", "norm:9"], "9"));
    out.push(train("recompute", &["--recompute", "9"], "layer 9"));
    out.push(train("swapdir", &["--memory-policy", "swap:0", "--swap-dir", "/nonexistent/swap"], "swap_dir"));
    out.push(train("nonfinite0", &["--max-nonfinite-steps", "0"], "max_nonfinite_steps"));
    out.push(train("resume-overwrite", &["--resume", "--overwrite"], "--overwrite"));
    out.push(train("unknown", &["--bogus-flag"], "--bogus-flag"));
    out.push(train("wait", &["--mpi-wait", "maybe"], "maybe"));
    // An earlier run in the directory: refused without --resume/--overwrite, and the
    // resumed run refuses flags that contradict it.
    let done = run("done");
    let first = Command::new(exe()).args(["--threads", "1", "train", "--steps", "2", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100", "--run-dir", &done]).output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let again = |extra: &[&str], needle: &str| {
        let mut args = vec!["train", "--steps", "3", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100", "--run-dir", &done];
        args.extend_from_slice(extra);
        case(&args, &[needle])
    };
    out.push(again(&[], "--resume or start over with --overwrite"));
    out.push(again(&["--resume", "--lr", "1e-4"], "--lr 0.0001 contradicts"));
    out.push(again(&["--resume", "--micro-batch", "8"], "--micro-batch"));
    out.push(again(&["--resume", "--seed", "9"], "--seed"));
    out.push(again(&["--resume", "--data", "random"], "--data"));
    out.push(again(&["--resume", "--init-from", shipped_model().to_str().unwrap()], "--init-from"));
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/skew-bench/config.json");
    out.push(again(&["--resume", "--model-config", other.to_str().unwrap()], "--model-config"));
    // A broken `latest` is an error, not a fresh start over the old checkpoints.
    let broken = run("broken");
    let ok = Command::new(exe()).args(["--threads", "1", "train", "--steps", "1", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100", "--run-dir", &broken]).output().unwrap();
    assert!(ok.status.success());
    std::fs::write(Path::new(&broken).join("checkpoints/latest"), "step-0000042").unwrap();
    out.push(case(&["train", "--resume", "--steps", "2", "--run-dir", &broken], &["step-0000042"]));
    out
}

fn other_command_cases(dir: &Path) -> Vec<Case> {
    let model = shipped_model();
    let m = model.to_str().unwrap();
    let mut out = vec![
        case(&["solve", "--model", m, ""], &["empty"]),
        case(&["solve", "--model", m, "   "], &["empty"]),
        case(&["solve", "--model", m, &"1+".repeat(5000)], &["tokens long"]),
        case(&["solve", "--model", m, &"Ж".repeat(3000)], &["tokens long"]),
        case(&["solve", "--model", "/nonexistent/model", "1+1"], &["/nonexistent/model"]),
        case(&["eval", "--model", m, "--kinds", "calculus"], &["calculus"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--devices", "0"], &["--devices"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--seq-len", "0"], &["--seq-len"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--global-batch", "0"], &["--global-batch"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--imbalance", "nan"], &["--imbalance"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--imbalance", "0.5"], &["--imbalance"]),
        case(&["plan", "--model", "gpt-17"], &["gpt-17"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--cluster", "/nonexistent/hw.toml"], &["/nonexistent/hw.toml"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--fix", "tp=banana"], &["--fix"]),
        case(&["plan", "--model", "deepseek-v3-671b", "--dtype", "fp4"], &["fp4"]),
        case(&["plan", "--validate", "/nonexistent/run"], &["/nonexistent/run"]),
        case(&["memory", "--micro-batch", "0"], &["--micro-batch"]),
        case(&["memory", "--seq-len", "1"], &["--seq-len"]),
        case(&["memory", "--seq-len", "100000"], &["--seq-len"]),
        case(&["memory", "--memory-budget", "lots"], &["lots"]),
        case(&["memory", "--memory-policy", "bogus"], &["bogus"]),
        case(&["memory", "--recompute", "99"], &["99"]),
        case(&["grad", "--model", "/nonexistent/m", "--input-ids", "x.safetensors", "--out", "y.safetensors"], &["/nonexistent/m"]),
        case(&["report", "/nonexistent/run"], &["/nonexistent/run"]),
    ];
    // A huge config: one line naming the sizes, before anything is allocated.
    let mut big: serde_json::Value = serde_json::from_str(PRESET).unwrap();
    big["hidden_size"] = serde_json::json!(10_000_000);
    let p = dir.join("huge.json");
    std::fs::write(&p, big.to_string()).unwrap();
    let p = p.to_str().unwrap();
    out.push(case(&["train", "--model-config", p, "--peak-gflops", "100", "--run-dir", dir.join("run-huge").to_str().unwrap()], &["hidden_size 10000000", "available"]));
    out.push(case(&["memory", "--model-config", p, "--measure"], &["hidden_size 10000000", "available"]));
    out.push(case(&["train", "--micro-batch", "1000000000", "--peak-gflops", "100", "--run-dir", dir.join("run-hugebatch").to_str().unwrap()], &["1000000000 rows", "available"]));
    out
}

#[test]
fn hostile_inputs_each_get_one_error_line() {
    let dir = scratch("hostile");
    let mut cases = config_cases(&dir);
    cases.extend(checkpoint_cases(&dir));
    cases.extend(data_cases(&dir));
    cases.extend(flag_cases(&dir));
    cases.extend(other_command_cases(&dir));
    assert!(cases.len() >= 200, "only {} hostile inputs", cases.len());
    // Two at a time: most fail within milliseconds.
    let (a, b) = cases.split_at(cases.len() / 2);
    let failures: Vec<String> = std::thread::scope(|s| {
        let h = s.spawn(|| a.iter().filter_map(check).collect::<Vec<_>>());
        let mut f: Vec<String> = b.iter().filter_map(check).collect();
        f.extend(h.join().unwrap());
        f
    });
    eprintln!("{} hostile inputs, {} mishandled", cases.len(), failures.len());
    assert!(failures.is_empty(), "{} of {} hostile inputs mishandled:\n{}", failures.len(), cases.len(), failures.join("\n---\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every tensor of two safetensors files, bit for bit.
fn same_bits(a: &Path, b: &Path) -> bool {
    let (x, y) = (read_safetensors(a).unwrap(), read_safetensors(b).unwrap());
    x.len() == y.len()
        && x.iter().all(|(n, t)| match (&t.data, y.get(n).map(|u| &u.data)) {
            (TensorData::F32(p), Some(TensorData::F32(q))) => p.len() == q.len() && p.iter().zip(q).all(|(a, b)| a.to_bits() == b.to_bits()),
            _ => false,
        })
}

#[test]
fn training_killed_at_random_moments_resumes_bitwise() {
    let dir = scratch("kill");
    let train = |run: &Path, resume: bool| {
        let mut c = Command::new(exe());
        c.args(["--threads", "1", "train", "--steps", "8", "--save-every", "1", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100", "--run-dir"]);
        c.arg(run).stdout(Stdio::null()).stderr(Stdio::piped());
        if resume {
            c.arg("--resume");
        }
        c
    };
    let reference = dir.join("reference");
    let out = train(&reference, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Kill moments tied to the run's progress, not to the clock: after step k's metrics
    // line (k = 0…7 in turn: before anything, or just as step k's checkpoint is being
    // written) plus 0–60 ms from a fixed sequence, landing before, during or after saves.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let (mut mid_run, mut trials) = (0, 0);
    for trial in 0..20 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let extra = Duration::from_micros((state >> 11) % 60_000);
        let run = dir.join(format!("trial-{trial}"));
        let mut child = train(&run, false).spawn().unwrap();
        let lines = || std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
        let waited = Instant::now();
        while lines() < trial % 8 && child.try_wait().unwrap().is_none() {
            assert!(waited.elapsed() < Duration::from_secs(120), "trial {trial}: the run made no progress");
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(extra);
        let at = waited.elapsed();
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let saved = std::fs::read_to_string(run.join("checkpoints/latest")).ok();
        if !finished && saved.is_some() {
            mid_run += 1;
        }
        // `latest` loads (or there is none yet), and the resumed run ends on the very
        // weights of the uninterrupted one.
        let out = train(&run, true).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "trial {trial} (killed after {at:?}, latest {saved:?}): resume failed: {err}");
        assert!(same_bits(&reference.join("model/model.safetensors"), &run.join("model/model.safetensors")), "trial {trial}: resumed weights differ");
        // The metrics read as one run: each step once.
        let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<u64>>(), "trial {trial}: metrics steps");
        trials += 1;
        let _ = std::fs::remove_dir_all(&run);
    }
    eprintln!("{trials} kill trials, {mid_run} killed mid-run after a checkpoint");
    // Kills after step 2's line (k = 2…6) always find step 1's checkpoint committed.
    assert!(mid_run >= 8, "only {mid_run} of {trials} kills landed mid-run");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_swap_file_that_cannot_be_written_is_an_error_not_a_panic() {
    // A full disk, emulated by a file-size limit (SIGXFSZ ignored, so the write fails
    // with EFBIG instead of killing the process).
    let dir = scratch("swapfull");
    let swap = dir.join("swap");
    std::fs::create_dir_all(&swap).unwrap();
    let script = format!(
        "trap '' XFSZ; ulimit -f 2000; exec {} --threads 1 train --steps 2 --memory-policy swap:0 --swap-dir {} --no-progress --peak-gflops 100 --run-dir {}",
        exe(),
        swap.display(),
        dir.join("run").display()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().last().unwrap_or("");
    assert!(line.starts_with("ultramoe: error:") && line.contains("swap_dir") && line.contains(swap.to_str().unwrap()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let dir = scratch("diverge");
    for (name, extra) in [("one-rank", &[][..]), ("zero1", &["--ranks", "2", "--zero1"][..])] {
        let run = dir.join(name);
        let out = Command::new(exe())
            .args(["--threads", "2", "train", "--lr", "1e30", "--steps", "20", "--save-every", "1", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100", "--run-dir"])
            .arg(&run)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        let line = err.lines().last().unwrap_or("");
        let step: u64 = line.split("step ").nth(1).and_then(|r| r.split(':').next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{name}: {line}"));
        assert!(line.contains("not finite") && step <= 6, "{name}: {line}");
        // The newest checkpoint predates the non-finite steps, and holds only finite numbers.
        let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
        let ckpt = run.join("checkpoints").join(latest.trim());
        let saved: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
        assert!(saved < step, "{name}: checkpoint {saved} vs stop at {step}");
        let files: Vec<PathBuf> = std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
        assert!(files.len() >= 2, "{files:?}");
        for f in files {
            for (n, t) in read_safetensors(&f).unwrap() {
                if let TensorData::F32(v) = &t.data {
                    assert!(v.iter().all(|x| x.is_finite()), "{name}: {n} in {} holds non-finite values", f.display());
                }
            }
        }
        // Every step's metrics line says whether its update was skipped.
        let skipped = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("\"skipped\":true")).count();
        assert!(skipped >= 1, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_training_on_a_busy_run_directory_is_refused_naming_the_holder() {
    let dir = scratch("busy");
    let run = dir.join("run");
    let mut first = Command::new(exe())
        .args(["--threads", "1", "train", "--steps", "100000", "--micro-batch", "2", "--seq-len", "16", "--no-progress", "--peak-gflops", "100", "--run-dir"])
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it trains (it holds the lock from before its first step).
    let start = Instant::now();
    while std::fs::metadata(run.join("metrics.jsonl")).map_or(true, |m| m.len() == 0) {
        assert!(start.elapsed() < Duration::from_secs(60), "the first training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    for extra in [&[][..], &["--resume"][..], &["--overwrite"][..]] {
        let out = Command::new(exe()).args(["--threads", "1", "train", "--steps", "1", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).args(extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(&format!("pid {}", first.id())), "{extra:?}: {err}");
    }
    let _ = first.kill();
    let _ = first.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
