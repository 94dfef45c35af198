//! `ultramoe serve` as a user runs it: a model directory made by `ultramoe init` with a
//! tokenizer from `ultramoe tokenizer train`, served on a free port and driven by the
//! official OpenAI Python client (`scripts/openai-client-check.py`), by 64 concurrent
//! streaming clients (`scripts/serve-load.py`), by malformed requests, over capacity, and
//! stopped with SIGTERM while a stream is in flight.
//!
//! Needs `python3` with the `openai` package (`.ci/run` installs it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

/// A small Qwen3-MoE with a trained byte-level BPE tokenizer.
fn model_dir() -> TempDir {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("ultramoe-serve-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = r#"{"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "mlp_only_layers": [0], "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let words: Vec<&str> = "the router sends each token to two experts of eight and weights their outputs".split(' ').collect();
    let corpus: String = (0..3000).map(|i| format!("{}{}", words[(i * 7 + i / 13) % words.len()], if i % 12 == 11 { "\n" } else { " " })).collect();
    std::fs::write(d.join("corpus.txt"), corpus).unwrap();
    let model = d.join("model");
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(bin().args(["init", "--config"]).arg(d.join("config.json")).arg("--out").arg(&model));
    ok(bin().args(["tokenizer", "train", "--vocab-size", "400", "--corpus"]).arg(d.join("corpus.txt")).arg("--out").arg(&model));
    TempDir(d)
}

/// A running server and its port; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &Path, extra: &[&str]) -> Server {
    let mut child = bin()
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--port", "0", "--served-model-name", "tiny"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let port = line.split("http://127.0.0.1:").nth(1).and_then(|s| s.split(' ').next()).and_then(|p| p.parse().ok());
    let port = port.unwrap_or_else(|| panic!("no address in `{line}`"));
    Server { child, port }
}

/// One HTTP/1.1 request; the status and the body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // A refused body may close the connection before it is all sent.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in `{text}`"));
    (status, text.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn python(script: &str, args: &[String]) -> (bool, String) {
    let have = Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    assert!(have, "these tests drive the server with the OpenAI Python client: `python3 -m pip install openai` (.ci/run does)");
    let out = Command::new("python3").arg(repo().join("scripts").join(script)).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn json_field(text: &str, key: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|_| panic!("not JSON: {text}"));
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {text}"))
}

#[test]
fn serves_the_openai_api_to_its_client_under_load_and_refuses_bad_requests() {
    let dir = model_dir();
    let server = start(&dir.0.join("model"), &[]);
    let base = format!("http://127.0.0.1:{}", server.port);
    let (ok, out) = python("openai-client-check.py", &[base.clone(), "tiny".into()]);
    assert!(ok, "{out}");

    // Bad requests: each a 4xx whose JSON names the problem; the server keeps serving.
    let cases: [(&str, &[u8], u16, &str); 8] = [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", br#"{"model": "tiny", "prompt": 7}"#, 400, "\"param\":\"prompt\""),
        ("/v1/completions", br#"{"model": "tiny", "prompt": "a", "max_tokens": "ten"}"#, 400, "\"param\":\"max_tokens\""),
        ("/v1/completions", br#"{"model": "tiny", "prompt": "a", "max_tokens": 100000}"#, 400, "positions"),
        ("/v1/completions", br#"{"model": "tiny", "prompt": "a", "temperature": -2}"#, 400, "\"param\":\"temperature\""),
        ("/v1/chat/completions", br#"{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}"#, 400, "messages[0].role"),
        ("/v1/chat/completions", br#"{"model": "other", "messages": [{"role": "user", "content": "x"}]}"#, 404, "does not exist"),
        ("/v1/nothing", b"{}", 404, "no such route"),
    ];
    for (path, body, status, says) in cases {
        let (s, text) = http(server.port, "POST", path, body);
        assert_eq!(s, status, "{path} {}: {text}", String::from_utf8_lossy(body));
        assert!(text.contains(says) && text.contains("\"error\""), "{text}");
    }
    let huge = vec![b'a'; 3 << 20];
    let (s, text) = http(server.port, "POST", "/v1/completions", &huge);
    assert_eq!(s, 413, "{text}");
    assert_eq!(http(server.port, "GET", "/health", b"").0, 200);

    // 64 concurrent streaming clients: none fails, none is refused (64 fit the queue).
    let (ok, out) = python("serve-load.py", &[base.clone(), "tiny".into(), "--clients".into(), "64".into(), "--seconds".into(), "4".into()]);
    assert!(ok, "{out}");
    assert_eq!(json_field(&out, "requests_failed"), 0.0, "{out}");
    assert!(json_field(&out, "requests_ok") >= 64.0, "{out}");
    let (_, metrics) = http(server.port, "GET", "/metrics", b"");
    assert!(metrics.contains("ultramoe_generated_tokens_total") && metrics.contains("ultramoe_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), "{metrics}");
}

#[test]
fn over_capacity_answers_429_and_keeps_serving() {
    let dir = model_dir();
    let server = start(&dir.0.join("model"), &["--max-batch", "1", "--max-waiting", "1"]);
    let base = format!("http://127.0.0.1:{}", server.port);
    let (ok, out) = python("serve-load.py", &[base, "tiny".into(), "--clients".into(), "12".into(), "--seconds".into(), "3".into(), "--max-tokens".into(), "48".into()]);
    assert!(ok, "{out}");
    assert!(json_field(&out, "refused_429") > 0.0, "{out}");
    assert!(json_field(&out, "requests_ok") > 0.0, "{out}");
    let (s, _) = http(server.port, "POST", "/v1/completions", br#"{"model": "tiny", "prompt": "the", "max_tokens": 3}"#);
    assert_eq!(s, 200);
}

#[test]
fn sigterm_lets_the_stream_in_flight_finish() {
    let dir = model_dir();
    let mut server = start(&dir.0.join("model"), &[]);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = br#"{"model": "tiny", "prompt": "the router", "max_tokens": 200, "temperature": 1, "seed": 1, "stream": true}"#;
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    // Wait for the first event, then ask the server to stop.
    while !line.starts_with("data:") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the stream closed before its first event");
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    assert!(rest.contains("\"finish_reason\":\"length\"") || rest.contains("\"finish_reason\":\"stop\""), "{rest}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit {status:?}");
    // New connections are refused once it has stopped.
    assert!(TcpStream::connect(("127.0.0.1", server.port)).is_err());
}

#[test]
fn expert_parallel_serving_answers_as_one_rank() {
    let dir = model_dir();
    let body = br#"{"model": "tiny", "prompt": "the router sends each", "max_tokens": 24, "temperature": 0}"#;
    let text = |extra: &[&str]| {
        let server = start(&dir.0.join("model"), extra);
        let (s, out) = http(server.port, "POST", "/v1/completions", body);
        assert_eq!(s, 200, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let one = text(&[]);
    for ep in ["2", "4"] {
        assert_eq!(text(&["--ep", ep, "--ranks", ep]), one, "EP {ep}");
    }
}
