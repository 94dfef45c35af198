//! The `ultramoe` binary end to end: the verification door reproduces the fixtures,
//! user mistakes get one clear line and a non-zero exit, and the shipped model solves.

use std::path::{Path, PathBuf};
use std::process::Command;
use ultramoe_model::checkpoint::read_safetensors;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ultramoe"));
    c.arg("--threads").arg("2");
    c
}

fn fixtures() -> PathBuf {
    match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf"),
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultramoe-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs and expects failure with a single-line error mentioning every `needle`.
/// Decodes a PNG file, checks it is `w × h` as its header says and not blank (a
/// chart: thousands of inked pixels in several colours); returns its size.
fn assert_png_chart(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width, info.height);
    assert!(w >= 300 && h >= 200, "{}: {w} × {h}", path.display());
    let px = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    let inked = pixels.iter().filter(|p| p.iter().any(|&c| c < 250)).count();
    let colours: std::collections::HashSet<&[u8]> = pixels.iter().copied().collect();
    assert!(inked > 2000 && colours.len() > 5, "{}: blank ({inked} inked pixels, {} colours)", path.display(), colours.len());
    (w, h)
}

/// An SVG file's text, checked to hold each of `texts` as a text element's content.
fn assert_svg_text(path: &Path, texts: &[&str]) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(svg.starts_with("<svg"), "{}", path.display());
    for t in texts {
        let t = t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;");
        assert!(svg.contains(&format!(">\n{t}\n<")) || svg.contains(&format!(">{t}<")), "{}: no text `{t}`", path.display());
    }
}

fn expect_error(args: &[&str], needles: &[&str]) {
    // Each in a directory of its own: a command that gets as far as the default run
    // directory (`runs/train`) must not meet another test's lock there, nor write into
    // the source tree.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let cwd = tmp(&format!("expect-error-{}", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let out = bin().current_dir(&cwd).args(args).output().unwrap();
    let _ = std::fs::remove_dir_all(&cwd);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let line = err.lines().last().unwrap_or("");
    for n in needles {
        assert!(line.contains(n), "{args:?}: error `{line}` does not mention `{n}`");
    }
}

#[test]
fn grad_reproduces_the_reference_fixture() {
    for case in ["deepseek_v3_tiny", "qwen3_moe_tiny", "mixtral_tiny"] {
        let dir = fixtures().join(case);
        let out = tmp(case).join("grad.safetensors");
        let st = bin()
            .args(["grad", "--model"])
            .arg(&dir)
            .arg("--input-ids")
            .arg(dir.join("reference.safetensors"))
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        let ours = read_safetensors(&out).unwrap();
        let reference = read_safetensors(&dir.join("reference.safetensors")).unwrap();
        let l = ours["loss"].f32("loss").unwrap()[0];
        let r = reference["loss"].f32("loss").unwrap()[0];
        assert!(((l - r) / r).abs() < 1e-5, "{case}: loss {l} vs {r}");
        let mut grads = 0;
        for (name, t) in &reference {
            if let Some(p) = name.strip_prefix("grad.") {
                let ours = ours[name].f32(name).unwrap();
                let rv = t.f32(name).unwrap();
                let scale = rv.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let err = ours.iter().zip(rv).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err <= 1e-3 * scale || scale == 0.0, "{case}: {p}");
                grads += 1;
            }
        }
        assert!(grads > 30);
    }
}

#[test]
fn user_errors_are_one_clear_line() {
    let d = tmp("errors");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let unknown = write("unknown.json", r#"{"model_type": "llama", "hidden_size": 8}"#);
    expect_error(&["train", "--model-config", unknown.to_str().unwrap(), "--steps", "1"], &["unknown.json", "model_type", "llama"]);
    let bad_heads = write(
        "heads.json",
        r#"{"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3,
            "num_key_value_heads": 2, "vocab_size": 10, "num_local_experts": 2, "num_experts_per_tok": 1}"#,
    );
    expect_error(&["train", "--model-config", bad_heads.to_str().unwrap()], &["heads.json", "num_key_value_heads"]);
    let not_json = write("broken.json", "{ not json");
    expect_error(&["train", "--model-config", not_json.to_str().unwrap()], &["broken.json", "JSON"]);
    expect_error(&["train", "--data", "math:add,calculus", "--steps", "1"], &["--data", "`calculus`", "derivative"]);
    expect_error(&["demo", "--kinds", "add,love", "--steps", "1"], &["--kinds", "`love`"]);
    expect_error(&["demo", "--minutes", "0"], &["--minutes"]);
    let jsonl = write("data.jsonl", "{\"question\": \"1+1\", \"answer\": \"2\"}\n{\"question\": 5}\n");
    expect_error(&["eval", "--file", jsonl.to_str().unwrap()], &["data.jsonl: line 2", "question"]);
    // A checkpoint whose tensors do not match its config.
    let ck = d.join("ckpt");
    std::fs::create_dir_all(&ck).unwrap();
    let fx = fixtures().join("mixtral_tiny");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(20);
    std::fs::write(ck.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fx.join("model.safetensors"), ck.join("model.safetensors")).unwrap();
    expect_error(&["solve", "1+1", "--model", ck.to_str().unwrap()], &["model.safetensors", "w1.weight", "shape"]);
    std::fs::write(ck.join("model.safetensors"), b"garbage").unwrap();
    expect_error(&["solve", "1+1", "--model", ck.to_str().unwrap()], &["model.safetensors", "safetensors"]);
    expect_error(&["solve", "1+1", "--model", "/nonexistent/dir"], &["/nonexistent/dir"]);
    expect_error(&["solve", "1+1", "--model", fx.to_str().unwrap()], &["config.json", "vocab_size"]);
}

#[test]
fn train_then_resume_then_solve_round_trip() {
    let run = tmp("run");
    let cfg = fixtures().join("deepseek_v3_tiny/config.json");
    // The fixture's vocabulary (97) is smaller than the math tokenizer's: training on
    // math data must refuse rather than index out of range.
    expect_error(&["train", "--model-config", cfg.to_str().unwrap(), "--steps", "2", "--seq-len", "32", "--run-dir", run.to_str().unwrap()], &["vocab"]);
    let ok = bin()
        .args(["train", "--steps", "4", "--micro-batch", "2", "--seq-len", "64", "--save-every", "2", "--no-progress", "--peak-gflops", "100"])
        .arg("--run-dir")
        .arg(&run)
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(run.join("model/model.safetensors").is_file());
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["step", "loss", "lr", "tokens_per_s", "mfu", "expert_counts", "rank_load_imbalance", "aux_loss"] {
        assert!(first.get(key).is_some(), "metrics lack `{key}`");
    }
    let resumed = bin()
        .args(["train", "--resume", "--steps", "6", "--no-progress", "--peak-gflops", "100"])
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert!(resumed.status.success());
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 6);
    // The report: every chart index.html shows decodes and is drawn; as SVG, the axis
    // titles and legend entries are there as text.
    let report = bin().arg("report").arg(&run).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    assert!(String::from_utf8_lossy(&report.stdout).contains("6 steps"));
    let index = std::fs::read_to_string(run.join("report/index.html")).unwrap();
    let images: Vec<&str> = index.split("<img src=\"").skip(1).map(|s| s.split('"').next().unwrap()).collect();
    for name in ["loss.png", "learning_rate.png", "grad_norm.png", "throughput.png", "mfu.png", "memory.png", "expert_load.png", "pipeline_timeline.png"] {
        assert!(images.contains(&name), "index.html lacks {name}: {images:?}");
    }
    for name in &images {
        assert_png_chart(&run.join("report").join(name));
    }
    assert!(std::fs::read_to_string(run.join("report/summary.txt")).unwrap().contains("6 steps"));
    let svg_dir = tmp("report-svg");
    let report = bin().args(["report", "--format", "svg", "--out"]).arg(&svg_dir).arg(&run).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    // Every chart index.html shows holds its title, and every chart against the step
    // names that axis.
    let index = std::fs::read_to_string(svg_dir.join("index.html")).unwrap();
    let charts: Vec<(&str, &str)> =
        index.split("<h2>").skip(1).map(|c| (c.split("</h2>").next().unwrap(), c.split("<img src=\"").nth(1).unwrap().split('"').next().unwrap())).collect();
    assert!(charts.len() >= 8, "{index}");
    for (title, file) in &charts {
        let title = title.replace("&amp;", "&");
        assert_svg_text(&svg_dir.join(file), &[title.as_str()]);
        if !file.starts_with("pipeline_timeline") {
            assert_svg_text(&svg_dir.join(file), &["step"]);
        }
    }
    assert_svg_text(&svg_dir.join("loss.svg"), &["Loss", "step", "cross-entropy (nats / token)", "training loss"]);
    assert_svg_text(&svg_dir.join("throughput.svg"), &["step", "tokens / s (all ranks)", "tokens/s"]);
    assert_svg_text(&svg_dir.join("expert_load.svg"), &["MoE layer 0", "MoE layer 2", "expert", "step", "tokens / mean tokens per expert"]);
    expect_error(&["report", "--format", "gif", run.to_str().unwrap()], &["--format", "png or svg"]);
    expect_error(&["report", svg_dir.to_str().unwrap()], &["metrics.jsonl", "cannot read"]);
    let out = bin().args(["solve", "12 + 7", "--json", "--model"]).arg(run.join("model")).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("answer").is_some() && v.get("worked").is_some());
}

#[test]
fn shipped_model_solves_from_a_fresh_clone() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/math-moe");
    for (q, a) in [
        ("347 + 589", "936"),
        ("58 * 73", "4234"),
        ("What is 523 minus 178?", "345"),
        ("Solve for x: -4x + 9 = -31", "10"),
        ("What is 12 + 7?", "19"),
        ("Solve x^2 - 5x + 6 = 0", "x = 2 or x = 3"),
    ] {
        let out = bin().args(["solve", q, "--model"]).arg(&model).output().unwrap();
        assert!(out.status.success(), "{q}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().last().unwrap_or(""), a, "{q}");
    }
    // Negative operands reach the model rather than the argument parser.
    let out = bin().args(["solve", "-5 - -5", "--model"]).arg(&model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn questions_outside_the_training_get_one_line_refusals() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/math-moe");
    for (q, why) in [
        ("what is love", "not a kind of question"),
        ("1/0", "division by zero"),
        ("integrate sin(x)^2 dx", "polynomials"),
        ("Solve x^2 + 1 = 0", "whole numbers"),
        ("123456789 + 1", "numbers"),
    ] {
        let out = bin().args(["solve", q, "--model"]).arg(&model).output().unwrap();
        assert!(!out.status.success(), "{q} was answered: {}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty(), "{q}: no answer on stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{q}: {err}");
        assert!(err.contains("cannot answer") && err.contains(why), "{q}: {err}");
    }
}

/// A time budget too short for the default kinds' accuracy floors is said before the
/// training starts, with the budget that would buy the steps they needed.
#[test]
fn a_short_demo_says_its_accuracy_floors_need_more_minutes() {
    let run = tmp("short-demo");
    let out = bin().args(["demo", "--minutes", "0.75", "--eval-n", "0", "--no-progress", "--run-dir"]).arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("steps fit the 0.75-minute budget"), "{err}");
    assert!(err.contains("accuracy floors by 14000 steps") && err.contains("--minutes "), "{err}");
    assert!(run.join("model/config.json").exists());
}

/// A model trained on some kinds (`--data math:…`, as `demo` trains) says so in its
/// directory, and `solve` refuses the other kinds in one line instead of guessing.
#[test]
fn a_model_trained_on_some_kinds_refuses_the_others() {
    let run = tmp("some-kinds");
    let out = bin().args(["train", "--data", "math:add,sub", "--steps", "2", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = run.join("model");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("math_kinds.json")).unwrap()).unwrap();
    assert_eq!(saved["kinds"], serde_json::json!(["add", "sub"]));
    let out = bin().args(["solve", "d/dx (3x^2 + 2x)", "--model"]).arg(&model).output().unwrap();
    assert!(!out.status.success() && out.stdout.is_empty(), "answered: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("trained on add, sub only, not derivative"), "{err}");
    // Without --model, where runs/demo/model is such a model, the shipped model answers.
    let cwd = tmp("some-kinds-cwd");
    std::fs::create_dir_all(cwd.join("runs/demo")).unwrap();
    std::fs::rename(&model, cwd.join("runs/demo/model")).unwrap();
    let out = bin().current_dir(&cwd).args(["solve", "d/dx (3x^2 + 2x)"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("trained on add, sub only; the shipped model answers this derivative question"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6x + 2");
}

#[test]
fn expert_parallel_train_on_threads_then_resume_on_one_rank() {
    let run = tmp("ep");
    let args = ["train", "--steps", "3", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100"];
    let out = bin().args(args).args(["--ranks", "2", "--ep", "2", "--zero1", "--run-dir"]).arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 ranks: EP 2 × DP 1; flat all-to-all"), "{err}");
    assert!(run.join("model/model-00002-of-00002.safetensors").is_file());
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3, "rank 0 alone writes the metrics");
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["comm_s", "exposed_comm_s", "a2a_s", "a2a_exposed_s", "a2a_bytes_intra_node", "a2a_bytes_inter_node"] {
        assert!(first.get(key).is_some(), "metrics lack `{key}`");
    }
    assert!(first["a2a_bytes_intra_node"].as_u64().unwrap() > 0);
    // The two-shard checkpoint continues on one rank.
    let out = bin().args(["train", "--resume", "--steps", "4", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 4);
    // ZeRO-1 switched on and off at a resume, and kept by the next one.
    let resume = |steps: &str, extra: &[&str]| {
        let out = bin().args(["train", "--resume", "--ranks", "2", "--no-progress", "--peak-gflops", "100", "--steps", steps]).args(extra).arg("--run-dir").arg(&run).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        err.contains("(ZeRO-1;")
    };
    assert!(resume("5", &["--zero1"]), "--zero1 applies at a resume");
    assert!(resume("6", &[]), "a resume keeps the checkpoint's ZeRO-1");
    assert!(!resume("7", &["--no-zero1"]), "--no-zero1 applies at a resume");
    expect_error(&["train", "--ranks", "3", "--ep", "2", "--steps", "1"], &["--ep 2", "3 ranks"]);
    expect_error(&["train", "--ranks", "2", "--hierarchical-a2a", "--steps", "1"], &["--hierarchical-a2a", "ranks per node"]);
    expect_error(&["train", "--ranks", "2", "--ep", "2", "--micro-batch", "3", "--steps", "1"], &["micro_batch", "2 ranks"]);
}

#[test]
fn plan_ranks_layouts_and_explains_rejections() {
    let out = bin()
        .args(["plan", "--model", "deepseek-v3-671b", "--cluster", "h800", "--devices", "2048", "--seq-len", "4096", "--global-batch", "15360", "--json", "--top", "3", "--show-rejected", "5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let best = v["best"].as_array().unwrap();
    assert_eq!(best.len(), 3);
    assert!(best[0]["step_s"].as_f64().unwrap() <= best[1]["step_s"].as_f64().unwrap(), "fastest first");
    let l = &best[0]["layout"];
    let devices = l["tp"].as_u64().unwrap() * l["pp"].as_u64().unwrap() * l["dp"].as_u64().unwrap();
    assert_eq!(devices, 2048);
    // within what an H800 lets a layout use
    let d = ultramoe_plan::Hardware::load("h800").unwrap().device;
    assert!(best[0]["memory_bytes"].as_f64().unwrap() <= d.memory_bytes - d.reserved_bytes());
    for r in v["rejected"].as_array().unwrap() {
        assert!(!r["reason"].as_str().unwrap().is_empty(), "every rejected layout says why");
    }
    assert!(v["rejected_by_reason"].as_object().unwrap().keys().any(|k| k.contains("GB per device")), "memory rejections are reported");
    // Pinned dimensions, a breakdown image, and clear errors.
    let dir = tmp("plan");
    let img = dir.join("breakdown.png");
    let out = bin()
        .args(["plan", "--model", "qwen3-235b-a22b", "--cluster", "h100", "--devices", "256", "--seq-len", "4096", "--global-batch", "512", "--fix", "tp=4,ep=8", "--image"])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().filter(|l| l.trim_start().starts_with("4 ")).count() >= 1, "{text}");
    assert_png_chart(&img);
    let svg = dir.join("breakdown.svg");
    let out = bin()
        .args(["plan", "--model", "qwen3-235b-a22b", "--cluster", "h100", "--devices", "256", "--seq-len", "4096", "--global-batch", "512", "--fix", "tp=4,ep=8", "--top", "3", "--image"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The layout under each bar, seconds on the axis, every part in the legend.
    assert_svg_text(&svg, &["#1", "#3", "EP8 DP16", "seconds per step", "compute", "recompute", "ep comm", "bubble", "optimizer"]);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("TP4 PP"));
    expect_error(&["plan", "--model", "no-such-model", "--devices", "8"], &["no-such-model", "preset"]);
    // Every preset with the command's own defaults (this machine's cluster has no bf16
    // peak: the default data type follows the cluster). On one CPU nothing fits, and
    // the answer says why.
    for model in ["deepseek-v3-671b", "pangu-ultra-moe-718b", "qwen3-235b-a22b", "mixtral-8x22b"] {
        let out = bin().args(["plan", "--model", model]).output().unwrap();
        let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("fp32") && text.contains("layouts evaluated"), "{model}: {text}{err}");
        assert!(out.status.success() || (err.contains("no layout fits") && text.contains("GB per device")), "{model}: {err}");
    }
    expect_error(&["plan", "--model", "mixtral-8x22b", "--cluster", "h100", "--devices", "8", "--fix", "tp=three"], &["--fix", "tp=three"]);
    expect_error(&["plan", "--model", "mixtral-8x22b", "--cluster", "h100", "--devices", "8", "--dtype", "int4"], &["--dtype", "int4"]);
    // Eight H100s cannot hold 141 B parameters with their optimizer states.
    expect_error(&["plan", "--model", "mixtral-8x22b", "--cluster", "h100", "--devices", "8", "--seq-len", "4096", "--global-batch", "64"], &["no layout fits"]);
}

#[test]
fn plan_validates_a_finished_run() {
    let run = tmp("validate");
    let out = bin().args(["train", "--steps", "10", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin().args(["plan", "--validate"]).arg(&run).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("measured") && text.contains("predicted"), "{text}");
    expect_error(&["plan", "--validate", "/nonexistent-run"], &["metrics.jsonl"]);
}

#[test]
fn mfu_never_reads_above_100_percent() {
    // A peak far below what any step reaches: the first step proves it low, the peak is
    // raised to the step's rate (said once), and no step's MFU exceeds 1.
    let run = tmp("mfu");
    let out = bin()
        .args(["train", "--steps", "3", "--micro-batch", "4", "--seq-len", "32", "--no-progress", "--peak-gflops", "0.001", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("above the GEMM peak used for MFU").count(), 1, "{err}");
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let mfu = v["mfu"].as_f64().unwrap();
        assert!(mfu > 0.0 && mfu <= 1.0, "{line}");
    }
}

#[test]
fn calibrate_writes_a_hardware_file_plan_reads() {
    let dir = tmp("calibrate");
    let hw = dir.join("hw.toml");
    let out = bin().args(["calibrate", "--seconds", "0.01", "--out"]).arg(&hw).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&hw).unwrap();
    assert!(text.contains("[efficiency]") && text.contains("grouped_gemm"), "{text}");
    let out = bin().args(["plan", "--model", "mixtral-8x22b", "--cluster"]).arg(&hw).args(["--devices", "1", "--dtype", "fp32", "--seq-len", "64", "--global-batch", "1"]).output().unwrap();
    // One CPU cannot hold Mixtral-8x22B: the answer is a reasoned refusal, not a crash.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no layout fits"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("GB per device"));
}

#[test]
fn memory_predicts_the_measured_peak_and_guards_the_budget() {
    let out = bin().args(["memory", "--micro-batch", "8", "--seq-len", "64", "--measure"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pct: f64 = text
        .lines()
        .find(|l| l.starts_with("measured peak"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|r| r.split('%').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no measured peak in {text}"));
    assert!(pct.abs() <= 5.0, "prediction off by {pct}%: {text}");
    let run = tmp("budget");
    // Whether a budget fits can depend on the swap directory (a disk can take every
    // layer's activations): here swapping is ruled out by a directory that cannot hold a
    // swap file, so the outcome is the same on tmpfs and on a disk.
    let no_swap = run.join("not-a-directory");
    std::fs::write(&no_swap, b"").unwrap();
    expect_error(
        &["train", "--steps", "1", "--micro-batch", "64", "--memory-budget", "150MB", "--no-progress", "--swap-dir", no_swap.to_str().unwrap(), "--run-dir", run.to_str().unwrap()],
        &["--memory-budget", "150.0 MB", "largest micro-batch that fits"],
    );
    // A budget below the weights, gradients and moments: nothing fits, swap or not.
    expect_error(
        &["train", "--steps", "1", "--micro-batch", "64", "--memory-budget", "1MB", "--no-progress", "--run-dir", run.to_str().unwrap()],
        &["--memory-budget", "1.0 MB", "alone exceed it"],
    );
    expect_error(&["train", "--steps", "1", "--memory-budget", "lots", "--run-dir", run.to_str().unwrap()], &["--memory-budget", "lots"]);
    expect_error(&["train", "--steps", "1", "--recompute", "9", "--run-dir", run.to_str().unwrap()], &["--recompute", "layer 9"]);
    expect_error(&["train", "--steps", "1", "--memory-policy", "swiglu+nrom", "--run-dir", run.to_str().unwrap()], &["--memory-policy", "unknown op `nrom`"]);
    expect_error(&["train", "--steps", "1", "--memory-policy", "swap:0", "--swap-dir", "/nonexistent/swap", "--run-dir", run.to_str().unwrap()], &["swap_dir", "/nonexistent/swap"]);
    // A policy with a swapped layer, predicted and then measured.
    let args = ["memory", "--micro-batch", "8", "--seq-len", "64", "--memory-policy", "norm+swiglu+attention swap:0,1", "--swap-moments", "--measure", "--detail"];
    let out = bin().args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("layer 1 in the swap file") && text.contains("optimizer moments in the swap file"), "{text}");
    assert!(text.contains("measured peak"), "{text}");
    // A budget the plain step exceeds: a policy is chosen to fit, and training runs.
    let fit = tmp("budget-fit");
    let out = bin()
        .args(["train", "--steps", "2", "--micro-batch", "24", "--memory-budget", "150MB", "--no-progress", "--peak-gflops", "100", "--data", "random", "--run-dir"])
        .arg(&fit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("--memory-budget: memory policy"), "{err}");
    let last: serde_json::Value = serde_json::from_str(std::fs::read_to_string(fit.join("metrics.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    assert!(last["peak_bytes"].as_u64().unwrap() < 150_000_000, "{last}");
    let out = bin().args(["train", "--steps", "1", "--micro-batch", "4", "--seq-len", "32", "--memory-budget", "1GB", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert!(first["peak_bytes"].as_u64().unwrap() > first["activation_bytes"].as_u64().unwrap());
}

#[test]
fn pipeline_train_prints_its_schedule_resumes_elsewhere_and_refuses_bad_layouts() {
    let run = tmp("pp");
    let args = ["train", "--steps", "3", "--micro-batch", "4", "--seq-len", "32", "--grad-accum", "4", "--no-progress", "--peak-gflops", "100"];
    let out = bin().args(args).args(["--ranks", "2", "--pp", "2", "--schedule", "overlap", "--run-dir"]).arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 ranks: PP 2 × EP 1 × DP 1, overlap schedule") && err.contains("layers per stage 2,2"), "{err}");
    // Two stages' shards in the Hugging Face layout, and the metrics name the layout
    // and time each stage.
    assert!(run.join("model/model-00002-of-00002.safetensors").is_file());
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!((first["pp"].as_u64(), first["schedule"].as_str()), (Some(2), Some("overlap")));
    assert_eq!(first["stage_busy_s"].as_array().unwrap().len(), 2);
    assert_eq!(first["stage_idle_s"].as_array().unwrap().len(), 2);
    // The last step's timeline: both stages, each micro-batch's forward on the forward
    // lane and its backward on the other, the later stage waiting for activations.
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("pipeline_timeline.json")).unwrap()).unwrap();
    assert_eq!((t["step"].as_u64(), t["stages"].as_u64()), (Some(3), Some(2)));
    let events = t["events"].as_array().unwrap();
    for stage in 0..2 {
        let count = |kind: &str, lane: u64| events.iter().filter(|e| e["stage"] == stage && e["kind"] == kind && e["lane"] == lane).count();
        assert_eq!((count("forward", 1), count("backward", 0)), (4, 4), "stage {stage}: {t}");
        assert!(events.iter().filter(|e| e["stage"] == stage).all(|e| e["start_s"].as_f64().unwrap() <= e["end_s"].as_f64().unwrap()));
    }
    assert!(events.iter().any(|e| e["stage"] == 1 && e["kind"] == "wait"), "{t}");
    let svg_dir = tmp("pp-report");
    let report = bin().args(["report", "--format", "svg", "--out"]).arg(&svg_dir).arg(&run).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    assert_svg_text(
        &svg_dir.join("pipeline_timeline.svg"),
        &["stage 0 forwards", "stage 0 backwards", "stage 1 forwards", "stage 1 backwards", "forward", "backward", "waiting for another stage"],
    );
    assert_svg_text(&svg_dir.join("memory.svg"), &["stage 0 measured (its first rank's process)", "stage 1 predicted (one rank)"]);
    // The saved specification continues (the same world: the same pipeline) …
    let out = bin().args(["train", "--resume", "--steps", "4", "--ranks", "2", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("PP 2 × EP 1 × DP 1, overlap schedule"), "{err}");
    // … and one rank takes the two-stage checkpoint; a change of micro-batch is refused.
    let out = bin().args(["train", "--resume", "--steps", "5", "--no-progress", "--peak-gflops", "100", "--run-dir"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 5);
    let resume = ["train", "--resume", "--steps", "6", "--micro-batch", "8", "--run-dir", run.to_str().unwrap()];
    expect_error(&resume, &["--micro-batch 8", "contradicts"]);
    // The schedule as data.
    let out = bin().args(["train", "--ranks", "4", "--pp", "4", "--grad-accum", "8", "--print-schedule"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("rank 0: F0.0 F1.0 F2.0 F3.0 B0.0 F4.0 B1.0") && text.contains("rank 3: forwards awaiting their backward at most 1"), "{text}");
    // Layouts that cannot run: one line each, naming the field.
    let t = ["train", "--steps", "1", "--no-progress"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { t.iter().chain(extra).copied().collect() };
    expect_error(&with(&["--ranks", "3", "--pp", "2"]), &["--pp 2", "3 ranks"]);
    expect_error(&with(&["--ranks", "3", "--pp", "3", "--grad-accum", "3"]), &["pp", "do not split evenly", "--pp-layers"]);
    expect_error(&with(&["--ranks", "2", "--pp", "2", "--pp-layers", "1,2"]), &["pp_layers", "add up to 3"]);
    expect_error(&with(&["--ranks", "2", "--pp", "2", "--vpp", "3", "--grad-accum", "2"]), &["pp", "2 stages × 3 chunks"]);
    expect_error(&with(&["--ranks", "2", "--pp", "2", "--vpp", "2", "--grad-accum", "3"]), &["grad_accum", "multiple of pp"]);
    expect_error(&with(&["--ranks", "4", "--pp", "4", "--grad-accum", "2"]), &["grad_accum", "2 micro-batches cannot fill 4 pipeline stages"]);
    expect_error(&with(&["--ranks", "2", "--pp", "2", "--schedule", "zigzag"]), &["--schedule `zigzag`"]);
    expect_error(&with(&["--pp", "0"]), &["--pp", "at least 1"]);
}

#[test]
fn train_runs_the_layout_a_plan_ranks_and_refuses_a_plan_for_something_else() {
    let dir = tmp("plan-run");
    let model = dir.join("config.json");
    std::fs::write(
        &model,
        r#"{"model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
            "moe_intermediate_size": 16, "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 2,
            "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "max_position_embeddings": 64}"#,
    )
    .unwrap();
    let plan = |cluster: &str, fix: &str, out: &Path| {
        let p = bin()
            .args(["plan", "--model", model.to_str().unwrap(), "--cluster", cluster, "--devices", "2", "--seq-len", "32", "--global-batch", "16", "--fix", fix, "--json"])
            .output()
            .unwrap();
        assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
        std::fs::write(out, &p.stdout).unwrap();
    };
    let file = dir.join("plan.json");
    plan("this-machine", "tp=1,pp=2,mb=2", &file);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let best = &v["best"][0]["layout"];
    assert_eq!(best["pp"], 2);
    // The plan's two devices run as two threads, with its layout and batch.
    let run = dir.join("run");
    let out = bin()
        .args(["train", "--model-config", model.to_str().unwrap(), "--plan", file.to_str().unwrap(), "--steps", "2", "--no-progress", "--peak-gflops", "100", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 ranks: PP 2 × EP 1 × DP 1"), "{err}");
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    // planner micro-batch 2 × DP 1 rows, 16 / 2 = 8 micro-batches of 32 tokens
    assert_eq!((first["pp"].as_u64(), first["tokens"].as_u64()), (Some(2), Some(2 * 8 * 32)));
    let m = model.to_str().unwrap();
    let f = file.to_str().unwrap();
    expect_error(&["train", "--plan", f, "--steps", "1"], &["plan is for another model"]);
    expect_error(&["train", "--model-config", m, "--plan", f, "--ranks", "4", "--steps", "1"], &["2 devices", "4 ranks"]);
    expect_error(&["train", "--model-config", m, "--plan", f, "--plan-rank", "999", "--steps", "1"], &["--plan-rank 999"]);
    expect_error(&["train", "--model-config", m, "--plan", f, "--pp", "1", "--steps", "1"], &["--plan gives the layout"]);
    // A schedule the planner prices but the trainer does not run is refused by name.
    let dual = dir.join("dualpipe.json");
    plan("this-machine", "tp=1,pp=2,mb=2,schedule=dualpipe", &dual);
    expect_error(&["train", "--model-config", m, "--plan", dual.to_str().unwrap(), "--steps", "1"], &["dualpipe", "does not run"]);
    // A tensor-parallel plan runs as planned (its two devices split each layer). The
    // preset counts this machine as one device per node, so tensor parallelism (kept
    // inside a node) is planned on a copy that puts two ranks on it.
    let two_per_node = dir.join("two-per-node.toml");
    let preset = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../plan/hardware/this-machine.toml")).unwrap();
    std::fs::write(&two_per_node, preset.replace("devices_per_node = 1", "devices_per_node = 2").replace("name = \"this machine", "name = \"this machine, two ranks")).unwrap();
    let tp = dir.join("tp.json");
    plan(two_per_node.to_str().unwrap(), "tp=2,pp=1,mb=2", &tp);
    let run = dir.join("run-tp");
    let out = bin()
        .args(["train", "--model-config", m, "--plan", tp.to_str().unwrap(), "--steps", "2", "--no-progress", "--peak-gflops", "100", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("2 ranks: TP 2 (SP) × EP 1 × DP 1"), "{err}");
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["tp"].as_u64(), Some(2));
    let h800 = dir.join("h800.json");
    plan("h800", "tp=1", &h800);
    expect_error(&["train", "--model-config", m, "--plan", h800.to_str().unwrap(), "--steps", "1"], &["cluster", "this machine"]);
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{}").unwrap();
    expect_error(&["train", "--model-config", m, "--plan", junk.to_str().unwrap(), "--steps", "1"], &["junk.json", "best"]);
}

#[test]
fn quantize_saves_a_model_that_decodes_as_saved() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/math-moe");
    let dir = tmp("quantize");
    let out = dir.join("int8");
    let q = bin().args(["quantize", "--model"]).arg(&model).args(["--weights", "int8", "--out"]).arg(&out).output().unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let size = |p: PathBuf| std::fs::metadata(p).unwrap().len() as f64;
    assert!(size(out.join("model.safetensors")) < 0.35 * size(model.join("model.safetensors")));
    // Without --weights the saved model decodes as INT8: the tokens the original gives
    // converted to INT8 on load.
    let run = |dir: &Path, extra: &[&str]| {
        let o = bin().args(["generate", "--model"]).arg(dir).args(["--prompt", "523 - 178", "--max-tokens", "80"]).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let saved = run(&out, &[]);
    assert_eq!(saved, run(&model, &["--weights", "int8"]));
    assert!(saved.contains("345"), "{saved}");
    // `solve` reads the saved model in its format too.
    let solved = bin().args(["solve", "--model"]).arg(&out).arg("What is 523 minus 178?").output().unwrap();
    assert!(solved.status.success(), "{}", String::from_utf8_lossy(&solved.stderr));
    assert_eq!(String::from_utf8_lossy(&solved.stdout).trim(), "345");
    // The saved format is read from config.json when --weights is not given.
    let cfg_path = out.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains("\"ultramoe_weights\": \"int8\""), "{text}");
    std::fs::write(&cfg_path, text.replace("\"ultramoe_weights\": \"int8\"", "\"ultramoe_weights\": \"int4\"")).unwrap();
    expect_error(&["generate", "--model", out.to_str().unwrap(), "--prompt", "1 + 1"], &["config.json", "ultramoe_weights", "int4"]);
    expect_error(&["solve", "--model", out.to_str().unwrap(), "1 + 1"], &["config.json", "ultramoe_weights", "int4"]);
    let m = model.to_str().unwrap();
    expect_error(&["quantize", "--model", m, "--weights", "f32", "--out", out.to_str().unwrap()], &["--weights", "f32"]);
    expect_error(&["quantize", "--model", m, "--weights", "int8", "--out", m], &["--out", "same directory"]);
}
