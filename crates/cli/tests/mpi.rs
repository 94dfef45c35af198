//! `ultramoe train` under `mpirun` (build feature `mpi`; `.ci/run` runs these with
//! OpenMPI installed): the MPI backend gives the single-rank run, and a failing rank
//! ends the whole job with its name instead of hanging.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::{Model, ModelConfig};

const CONFIG: &str = r#"{"model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 2,
    "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "max_position_embeddings": 64}"#;

fn scratch(name: &str) -> PathBuf {
    scratch_for(name, CONFIG)
}

/// A fresh directory holding `config` as its `config.json`.
fn scratch_for(name: &str, config: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultramoe-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), config).unwrap();
    d
}

fn train_args(dir: &Path, steps: u64) -> Vec<String> {
    let s = format!(
        "train --model-config {} --run-dir {} --steps {steps} --micro-batch 8 --seq-len 32 --grad-accum 2 --warmup 3 --no-progress --peak-gflops 100",
        dir.join("config.json").display(),
        dir.join("run").display()
    );
    s.split(' ').map(String::from).collect()
}

fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()]).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

/// Two runs of the same length agree: every step's loss within 1e-5 relative, and the
/// saved models (however sharded) tensor by tensor within 1e-5 relative L2.
fn assert_same_run(one: &Path, two: &Path) {
    let (a, b) = (losses(one), losses(two));
    assert_eq!(a.len(), b.len(), "rank 0 alone writes the metrics");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(((x - y) / x).abs() <= 1e-5, "step {}: {x} vs {y}", i + 1);
    }
    let model = Model::new(ModelConfig::from_file(&one.join("config.json")).unwrap());
    let w1 = load_weights(&model, &one.join("run/model")).unwrap();
    let w2 = load_weights(&model, &two.join("run/model")).unwrap();
    for s in &model.layout.specs {
        let (a, b) = (&w1[s.range()], &w2[s.range()]);
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        assert!(diff / norm <= 1e-5, "{}: relative difference {:.2e}", s.name, diff / norm);
    }
}

#[test]
fn mpi_expert_parallel_matches_one_rank() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let one = scratch("one");
    let st = Command::new(exe).args(train_args(&one, 30)).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let two = scratch("two");
    let st = mpirun(2).arg(exe).args(train_args(&two, 30)).args(["--ep", "2"]).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 30);
    assert_eq!(b.len(), 30, "rank 0 alone writes the metrics");
    assert!(two.join("run/model/model-00002-of-00002.safetensors").is_file());
    assert_same_run(&one, &two);
    let _ = std::fs::remove_dir_all(one);
    let _ = std::fs::remove_dir_all(two);
}

/// Pipeline parallelism over processes: `mpirun -np 4 … --pp 2 --ep 2` (uneven stages of
/// 1 and 2 layers) and the overlapped schedule at `--pp 2` give the single rank's run.
#[test]
fn mpi_pipeline_matches_one_rank() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let one = scratch("pp-one");
    let st = Command::new(exe).args(train_args(&one, 30)).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let four = scratch("pp-four");
    let st = mpirun(4).arg(exe).args(train_args(&four, 30)).args(["--pp", "2", "--ep", "2", "--pp-layers", "1,2", "--threads", "1"]).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(four.join("run/model/model-00004-of-00004.safetensors").is_file());
    assert_same_run(&one, &four);
    let two = scratch("pp-overlap");
    let st = mpirun(2).arg(exe).args(train_args(&two, 30)).args(["--pp", "2", "--pp-layers", "2,1", "--schedule", "overlap", "--mpi-wait", "sleep"]).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert_same_run(&one, &two);
    for d in [one, four, two] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Runs `c` to success (its stderr in the failure).
fn succeed(c: &mut Command) {
    let st = c.output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
}

/// Tensor parallelism under MPI, on DeepSeek-V3- (MLA, shared experts), Qwen3-MoE- (q/k
/// norms) and Mixtral-shaped models: TP 2 alone and TP 2 × PP 2 × EP 2 on eight
/// processes (with and without sequence parallelism) give the single-rank run, and the
/// saved model is whole tensors.
#[test]
fn mpi_tensor_parallel_matches_one_rank() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let qwen3 = r#"{"model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": true, "max_position_embeddings": 64}"#;
    let mixtral = r#"{"model_type": "mixtral", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 64}"#;
    for (kind, config) in [("deepseek", CONFIG), ("qwen3", qwen3), ("mixtral", mixtral)] {
        let one = scratch_for(&format!("tp-{kind}-one"), config);
        succeed(Command::new(exe).args(train_args(&one, 30)));
        let two = scratch_for(&format!("tp-{kind}-two"), config);
        succeed(mpirun(2).arg(exe).args(train_args(&two, 30)).args(["--tp", "2", "--threads", "1"]));
        assert!(two.join("run/model/model.safetensors").is_file(), "one file of whole tensors");
        assert_same_run(&one, &two);
        let mut dirs = vec![one.clone(), two];
        for sp in [&[][..], &["--sequence-parallel"][..]] {
            let eight = scratch_for(&format!("tp-{kind}-eight{}", sp.len()), config);
            let layout = ["--tp", "2", "--pp", "2", "--ep", "2", "--pp-layers", "1,2", "--threads", "1", "--mpi-wait", "sleep"];
            succeed(mpirun(8).arg(exe).args(train_args(&eight, 30)).args(layout).args(sp));
            assert_same_run(&one, &eight);
            dirs.push(eight);
        }
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Each pipeline stage's measured heap peak (one process per rank) is within 5% of
/// what `ultramoe memory --pp` predicts for it, micro-batches in flight included.
#[test]
fn mpi_pipeline_stage_peaks_match_the_prediction() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let dir = scratch("pp-memory");
    let batch = ["--micro-batch", "16", "--seq-len", "128", "--grad-accum", "4"];
    let out = Command::new(exe).args(["--threads", "1", "memory", "--pp", "2"]).args(batch).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let predicted: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("predicted peak"))
        .map(|l| l.trim().trim_end_matches("MB").trim().parse::<f64>().unwrap() * 1e6)
        .collect();
    assert_eq!(predicted.len(), 2, "a prediction per stage");
    let run = dir.join("run");
    let st = mpirun(2)
        .arg(exe)
        .args(["--threads", "1", "train", "--pp", "2", "--steps", "3", "--no-progress", "--peak-gflops", "100", "--run-dir"])
        .arg(&run)
        .args(batch)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut measured = vec![0f64; 2];
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for (m, x) in measured.iter_mut().zip(v["stage_peak_bytes"].as_array().unwrap()) {
            *m = m.max(x.as_f64().unwrap());
        }
    }
    for (s, (p, m)) in predicted.iter().zip(&measured).enumerate() {
        eprintln!("stage {s}: predicted {:.1} MB, measured {:.1} MB ({:+.1}%)", p / 1e6, m / 1e6, 100.0 * (p / m - 1.0));
        assert!((p / m - 1.0).abs() <= 0.05, "stage {s}: predicted {p} vs measured {m}");
    }
    assert!(measured[0] > measured[1], "the first stage holds more micro-batches in flight");
    let _ = std::fs::remove_dir_all(dir);
}

/// A model (28M parameters, 8 MoE layers) whose weights and gradients alone exceed a
/// 200 MB budget on one rank, whatever the memory policy, trains at PP 4 under that
/// budget per rank: each stage chooses its own policy for the micro-batches it keeps in
/// flight, every stage's measured heap peak stays under the budget and within 5% of
/// its predicted peak.
#[test]
fn mpi_a_model_too_big_for_one_rank_trains_at_pp4_under_its_budget() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let dir = scratch("pp-budget");
    let bench = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/pipeline-bench/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bench).unwrap()).unwrap();
    for (k, v) in [("hidden_size", 256), ("intermediate_size", 1024), ("moe_intermediate_size", 256), ("n_routed_experts", 16), ("q_lora_rank", 128), ("kv_lora_rank", 64), ("qk_nope_head_dim", 32), ("qk_rope_head_dim", 32), ("v_head_dim", 64)] {
        cfg[k] = v.into();
    }
    let config = dir.join("big.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let budget = 200e6;
    let args = |run: &str| -> Vec<String> {
        let s = format!("--threads 1 train --model-config {} --run-dir {} --micro-batch 8 --seq-len 128 --grad-accum 8 --steps 2 --memory-budget 200MB --no-progress --peak-gflops 100", config.display(), dir.join(run).display());
        s.split(' ').map(String::from).collect()
    };
    for extra in [&[][..], &["--swap-moments"][..]] {
        let one = Command::new(exe).args(args("one")).args(extra).output().unwrap();
        let err = String::from_utf8_lossy(&one.stderr);
        assert!(!one.status.success() && err.contains("--memory-budget") && err.contains("exceed"), "one rank {extra:?}: {err}");
    }
    let st = mpirun(4).arg(exe).args(args("pp4")).args(["--pp", "4"]).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let text = std::fs::read_to_string(dir.join("pp4/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let bytes = |k: &str| -> Vec<f64> { last[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let (measured, predicted) = (bytes("stage_peak_bytes"), bytes("stage_predicted_peak_bytes"));
    assert_eq!(measured.len(), 4);
    for (s, (m, p)) in measured.iter().zip(&predicted).enumerate() {
        eprintln!("stage {s}: predicted {:.1} MB, measured {:.1} MB ({:+.1}%)", p / 1e6, m / 1e6, 100.0 * (p / m - 1.0));
        assert!(*m <= budget, "stage {s}: measured {m} over the budget");
        assert!((p / m - 1.0).abs() <= 0.05, "stage {s}: predicted {p} vs measured {m}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Dynamic placement with a redundant slot per rank, on skewed routing, with sleepy
/// MPI waits: the same losses and final model as one rank, while experts moved.
#[test]
fn mpi_dynamic_placement_matches_one_rank() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let skew = ["--routing-skew", "1"];
    let one = scratch("place-one");
    let st = Command::new(exe).args(train_args(&one, 20)).args(skew).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let two = scratch("place-two");
    let placed = ["--ep", "2", "--placement-every", "5", "--redundant-experts", "1", "--mpi-wait", "sleep"];
    let st = mpirun(2).arg(exe).args(train_args(&two, 20)).args(skew).args(placed).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert_same_run(&one, &two);
    let moved: u64 = std::fs::read_to_string(two.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["experts_moved"].as_u64().unwrap())
        .sum();
    assert!(moved > 0, "experts moved");
    let _ = std::fs::remove_dir_all(one);
    let _ = std::fs::remove_dir_all(two);
}

#[test]
fn mpi_ranks_with_different_configs_stop_naming_the_rank() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let dir = scratch("mismatch");
    let start = Instant::now();
    // MPMD: rank 1 gets another learning rate.
    let out = mpirun(1)
        .arg(exe)
        .args(train_args(&dir, 5))
        .args(["--lr", "1e-3", ":", "-np", "1", exe])
        .args(train_args(&dir, 5))
        .args(["--lr", "2e-3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rank 1: started with a different model or training configuration"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mpi_a_killed_rank_ends_the_job() {
    let exe = env!("CARGO_BIN_EXE_ultramoe");
    let dir = scratch("killed");
    let mut job = mpirun(2).arg(exe).args(train_args(&dir, 1_000_000)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until training runs, then kill one rank's process.
    let metrics = dir.join("run/metrics.jsonl");
    let start = Instant::now();
    while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
        assert!(start.elapsed() < Duration::from_secs(60), "training did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = Command::new("pgrep").args(["-f", &dir.join("run").display().to_string()]).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&pids.stdout).split_whitespace().map(String::from).collect();
    let rank_pids: Vec<&String> = pids.iter().filter(|p| **p != job.id().to_string()).collect();
    assert!(rank_pids.len() >= 2, "rank processes: {pids:?}");
    let killed = Instant::now();
    Command::new("kill").args(["-9", rank_pids[rank_pids.len() - 1]]).status().unwrap();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "the job did not end within 30 s of a rank dying");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("rank") && (err.contains("signal 9") || err.contains("Killed")), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A greedy completion from `ultramoe serve` started by `cmd` (the binary or mpirun
/// with it already named), with `extra` flags; the server is stopped with SIGTERM.
fn served_completion(mut cmd: Command, extra: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/math-moe");
    let body = br#"{"model": "m", "prompt": "58 * 73", "max_tokens": 40, "temperature": 0}"#;
    let mut child = cmd.args(["serve", "--port", "0", "--served-model-name", "m", "--model"]).arg(&model).args(extra).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.split("http://127.0.0.1:").nth(1).and_then(|s| s.split(' ').next()).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no address in `{line}`"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let json = out.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|_| panic!("{out}"));
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// `mpirun -np 2 ultramoe serve --ep 2`: rank 0 answers HTTP, each rank holds half of
/// every MoE layer's experts; a greedy completion is the single process's.
#[test]
fn expert_parallel_serving_under_mpirun_answers_as_one_process() {
    let one = served_completion(Command::new(env!("CARGO_BIN_EXE_ultramoe")), &[]);
    assert!(one.contains('='), "a worked answer: {one}");
    let mut two = mpirun(2);
    two.arg(env!("CARGO_BIN_EXE_ultramoe"));
    assert_eq!(served_completion(two, &["--ep", "2"]), one, "EP 2 under mpirun differs from one process");
}
