//! Training on real text as a user runs it, on the shipped fortunes corpus: a tokenizer
//! trained on it, the corpus prepared into shards, a small MoE pretrained with a held-out
//! loss that falls, fine-tuned on chats from the pretrained model's directory, and the
//! fine-tuned model generating — plus the one-line errors of bad text data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ultramoe"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A directory removed when dropped.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("ultramoe-text-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn run(args: &[&str]) -> Output {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "ultramoe {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

fn fails(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success(), "ultramoe {} should fail", args.join(" "));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `eval_loss` of every metrics line that has one.
fn eval_losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get("eval_loss").and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn pretrain_on_prepared_shards_then_fine_tune_on_chats_and_generate() {
    let dir = temp("flow");
    let d = &dir.0;
    let (tok, shards, cfg) = (d.join("tok"), d.join("shards"), d.join("config.json"));
    let fortunes = repo().join("data/fortunes/fortunes.jsonl");
    let chats = repo().join("data/fortunes/chat.jsonl");
    run(&["tokenizer", "train", "--corpus", s(&fortunes), "--vocab-size", "512", "--out", s(&tok)]);
    let out = run(&["data", "prepare", s(&fortunes), "--tokenizer", s(&tok), "--out", s(&shards)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("821 documents"));
    std::fs::write(
        &cfg,
        r#"{"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "max_position_embeddings": 256, "eos_token_id": 2}"#,
    )
    .unwrap();
    let pre = d.join("pre");
    run(&[
        "train", "--model-config", s(&cfg), "--tokenizer", s(&tok), "--data", s(&shards), "--eval-fraction", "0.1", "--eval-every", "10",
        "--steps", "40", "--micro-batch", "4", "--seq-len", "128", "--lr", "3e-3", "--warmup", "5", "--run-dir", s(&pre), "--no-progress",
    ]);
    let evals = eval_losses(&pre);
    assert_eq!(evals.len(), 4, "{evals:?}");
    assert!(evals.windows(2).all(|w| w[1] < w[0]) && evals[3] < evals[0] - 0.1, "held-out loss falls: {evals:?}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(pre.join("model").join(f).is_file(), "{f} in the saved model");
    }
    // Fine-tune from the model directory: its tokenizer comes with it.
    let ft = d.join("ft");
    run(&[
        "train", "--init-from", s(&pre.join("model")), "--data", s(&chats), "--eval-fraction", "0.1", "--eval-every", "10",
        "--steps", "20", "--micro-batch", "4", "--seq-len", "128", "--run-dir", s(&ft), "--no-progress",
    ]);
    let evals = eval_losses(&ft);
    assert!(evals.last().unwrap() < &evals[0], "fine-tuning lowers the held-out chat loss: {evals:?}");
    // The saved model generates (a model this small may end its turn at once: the
    // command succeeding through the tokenizer and chat template it saved is the test).
    run(&["generate", "--model", s(&ft.join("model")), "--chat", "--prompt", "Tell me a fortune.", "--max-tokens", "8", "--seed", "1"]);

    // Bad text data: one line naming the file, line or field.
    let e = fails(&["train", "--model-config", s(&cfg), "--data", s(&fortunes), "--steps", "1", "--run-dir", s(&d.join("x1"))]);
    assert!(e.contains("tokenizer") && e.contains("--tokenizer DIR"), "{e}");
    let small = d.join("small.json");
    std::fs::write(&small, std::fs::read_to_string(&cfg).unwrap().replace("\"vocab_size\": 512", "\"vocab_size\": 300")).unwrap();
    let e = fails(&["train", "--model-config", s(&small), "--tokenizer", s(&tok), "--data", s(&fortunes), "--steps", "1", "--run-dir", s(&d.join("x2"))]);
    assert!(e.contains("tokenizer.json") && e.contains("more than the model's vocabulary (300)"), "{e}");
    let e = fails(&["train", "--model-config", s(&small), "--data", s(&shards), "--steps", "1", "--run-dir", s(&d.join("x3"))]);
    assert!(e.contains("more than the model's vocabulary (300)"), "{e}");
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"msgs\": []}\n").unwrap();
    let e = fails(&["train", "--model-config", s(&cfg), "--tokenizer", s(&tok), "--data", s(&bad), "--steps", "1", "--run-dir", s(&d.join("x4"))]);
    assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains("`messages`"), "{e}");
    let e = fails(&["train", "--model-config", s(&cfg), "--tokenizer", s(&tok), "--data", s(&fortunes), "--eval-every", "5", "--steps", "1", "--run-dir", s(&d.join("x5"))]);
    assert!(e.contains("eval_every") && e.contains("--eval-fraction"), "{e}");
    let e = fails(&["data", "prepare", s(&fortunes), "--tokenizer", s(d), "--out", s(&d.join("x6"))]);
    assert!(e.contains("tokenizer.json"), "{e}");
}
