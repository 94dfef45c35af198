//! Text data: tokenization against the Python `tokenizers` package, documents and chats
//! into packed batches (targets never cross a document, positions restart, only the
//! assistant's tokens trained), memory-mapped shards equal to the text they came from,
//! errors that name the file, line or field — and a run on text that, interrupted and
//! resumed (also under another layout), sees exactly the samples of the uninterrupted run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use ultramoe_dist::{local, Mesh, ProcessGroup};
use ultramoe_kernels::loss::IGNORE;
use ultramoe_model::ModelConfig;
use ultramoe_train::data::batch::{Batcher, Source};
use ultramoe_train::data::corpus::Corpus;
use ultramoe_train::data::text::{train_bpe, Message, TextTokenizer};
use ultramoe_train::spec::RunSpec;
use ultramoe_train::trainer::{DataSpec, Place, TrainConfig, Trainer, Weights};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers").join(name)
}

fn fortunes() -> PathBuf {
    repo().join("data/fortunes/fortunes.jsonl")
}

fn chats() -> PathBuf {
    repo().join("data/fortunes/chat.jsonl")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultramoe-text-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A byte-level BPE with the ChatML template, trained here on the fortunes.
fn chatml_tokenizer(dir: &Path) -> TextTokenizer {
    train_bpe(&[fortunes()], 1000, dir).unwrap();
    TextTokenizer::load(dir, 1000).unwrap()
}

#[test]
fn tokenization_equals_the_python_tokenizers_package() {
    for name in ["bpe", "unigram", "wordpiece"] {
        let tok = TextTokenizer::load(&fixture(name), 1 << 20).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap();
        let cases = expected["cases"].as_array().unwrap();
        assert!(cases.len() > 500);
        let mut ids_checked = 0;
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let got = tok.encode_prompt(text).unwrap();
            assert_eq!(got, want, "{name}: {text:?}");
            ids_checked += want.len();
        }
        assert!(ids_checked > 10_000, "{name}: {ids_checked} ids");
    }
}

#[test]
fn documents_pack_without_crossing_and_positions_restart() {
    let tok = TextTokenizer::load(&fixture("bpe"), 1000).unwrap();
    let corpus = Arc::new(Corpus::read(&[fortunes()], &tok).unwrap());
    assert_eq!(corpus.docs(), 821);
    let docs: Vec<u32> = (0..corpus.docs() as u32).collect();
    let mut b = Batcher::new(Source::Documents { corpus: corpus.clone(), docs: Arc::new(docs), shuffle: false }, 1);
    // In order: the rows, read back to back, are the documents back to back.
    let (rows, t) = (4, 64);
    let mut stream = vec![];
    let mut targets = vec![];
    let mut positions = vec![];
    for _ in 0..20 {
        let batch = b.next_batch(rows, t);
        stream.extend(batch.ids);
        targets.extend(batch.targets);
        positions.extend(batch.positions.unwrap());
    }
    let mut at = 0;
    let mut d = 0;
    while at < stream.len() {
        let doc = corpus.doc(d);
        let n = doc.tokens.len().min(stream.len() - at);
        assert_eq!(&stream[at..at + n], &doc.tokens[..n], "document {d}");
        for i in 0..n {
            // A target is the document's next token; its last token has none.
            let want = doc.tokens.get(i + 1).map_or(IGNORE, |&x| x as i32);
            assert_eq!(targets[at + i], want, "document {d} token {i}");
            // Positions count from the document's start, or from the row's start for
            // a document continued from the row before.
            let row_start = (at + i) / t * t;
            let piece_start = at.max(row_start);
            assert_eq!(positions[at + i] as usize, at + i - piece_start, "document {d} token {i}");
        }
        at += n;
        d += 1;
    }
    assert!(d > 20, "{d} documents read");
    // A plain text file is one document (its end token last), beside JSONL documents.
    let dir = temp("txt");
    let txt = dir.join("book.txt");
    std::fs::write(&txt, "Call me Ishmael.\n\nSome years ago — never mind how long precisely — I went to sea.\n").unwrap();
    let both = Corpus::read(&[txt.clone(), fortunes()], &tok).unwrap();
    assert_eq!((both.docs(), both.files.len(), both.files[0].docs), (822, 2, 1));
    let mut want = tok.encode_prompt(&std::fs::read_to_string(&txt).unwrap()).unwrap();
    want.push(0); // <|endoftext|>
    assert_eq!(both.doc(0).tokens, &want[..]);
    assert_eq!(both.doc(1).tokens, corpus.doc(0).tokens);
    assert_eq!(both.file_of(0), 0);
    assert_eq!(both.file_of(1), 1);
    let chat_and_text = Corpus::read(&[txt, chats()], &tok).unwrap_err().to_string();
    assert!(chat_and_text.contains("cannot be mixed"), "{chat_and_text}");
    std::fs::remove_dir_all(&dir).unwrap();
    // Without document masks the rows carry no positions (one sequence a row).
    let mut cross = b.clone();
    cross.doc_masks = false;
    assert!(cross.next_batch(2, 16).positions.is_none());
}

#[test]
fn chats_train_only_the_assistant_turns() {
    let dir = temp("chat");
    let tok = chatml_tokenizer(&dir);
    let msgs = vec![
        Message { role: "system".into(), content: "Be brief.".into() },
        Message { role: "user".into(), content: "Who said this? A horse!".into() },
        Message { role: "assistant".into(), content: "Shakespeare".into() },
        Message { role: "user".into(), content: "And this?".into() },
        Message { role: "assistant".into(), content: "Mark Twain".into() },
    ];
    let (ids, trained) = tok.encode_chat_for_training(&msgs).unwrap();
    let kept: Vec<u32> = ids.iter().zip(&trained).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
    let TextTokenizer::Hf(_) = &tok else { panic!("a Hugging Face tokenizer") };
    // Each assistant turn's content and its end-of-turn token, nothing else.
    let end = tok.encode_prompt("<|im_end|>").unwrap();
    let mut want = tok.encode_prompt("Shakespeare").unwrap();
    want.extend(&end);
    want.extend(tok.encode_prompt("\n").unwrap());
    want.extend(tok.encode_prompt("Mark Twain").unwrap());
    want.extend(&end);
    want.extend(tok.encode_prompt("\n").unwrap());
    assert_eq!(kept, want);
    // The corpus turns that into targets: a trained token is a target of the one before.
    let corpus = Arc::new(Corpus::read(&[chats()], &tok).unwrap());
    assert!(corpus.chat);
    let mut b = Batcher::new(Source::Documents { corpus: corpus.clone(), docs: Arc::new(vec![0]), shuffle: false }, 1);
    let doc = corpus.doc(0);
    let n = doc.tokens.len();
    let batch = b.next_batch(1, n);
    for i in 0..n {
        let want = if i + 1 < n && doc.mask.unwrap()[i + 1] == 1 { doc.tokens[i + 1] as i32 } else { IGNORE };
        assert_eq!(batch.targets[i], want);
    }
    // (the user's turn trains nothing; the assistant's does)
    assert!(batch.targets[..6].iter().all(|&x| x == IGNORE) && batch.targets.iter().any(|&x| x != IGNORE));
    // Bad chats: one line naming the file, the line and what is wrong.
    let bad = dir.join("bad.jsonl");
    for (line, want) in [
        (r#"{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#, "role `wizard`"),
        (r#"{"text": "not a chat"}"#, "`messages`: missing"),
        (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, "no assistant message"),
        (r#"{"messages": "hello"}"#, "`messages`: expected a list"),
    ] {
        let first = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
        std::fs::write(&bad, format!("{first}\n{line}\n")).unwrap();
        let e = Corpus::read(&[bad.clone()], &tok).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains(want), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shards_hold_the_same_documents_and_check_their_index() {
    let dir = temp("shards");
    let tok = TextTokenizer::load(&fixture("unigram"), 1 << 20).unwrap();
    let text = Corpus::read(&[fortunes()], &tok).unwrap();
    // Small shards: documents spread over several files.
    text.write_shards(&dir, 4000).unwrap();
    let shards = Corpus::open_shards(&dir).unwrap();
    let n_shards = std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("tokens-")).count();
    assert!(n_shards > 3, "{n_shards} shards");
    assert_eq!((shards.docs(), shards.tokens(), &shards.files), (text.docs(), text.tokens(), &text.files));
    for i in 0..text.docs() {
        assert_eq!(shards.doc(i).tokens, text.doc(i).tokens, "document {i}");
    }
    // The same shuffled stream from either.
    let (a, b) = (Arc::new(text), Arc::new(shards));
    let all = Arc::new((0..a.docs() as u32).collect::<Vec<_>>());
    let mut sa = Batcher::new(Source::Documents { corpus: a.clone(), docs: all.clone(), shuffle: true }, 5);
    let mut sb = Batcher::new(Source::Documents { corpus: b, docs: all, shuffle: true }, 5);
    for _ in 0..30 {
        assert_eq!(sa.next_batch(3, 100).ids, sb.next_batch(3, 100).ids);
    }
    // An index that does not match its shards, or ids outside its vocabulary.
    let index = dir.join("index.json");
    let good = std::fs::read_to_string(&index).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["shards"][1]["tokens"] = (v["shards"][1]["tokens"].as_u64().unwrap() + 1).into();
    std::fs::write(&index, v.to_string()).unwrap();
    let e = Corpus::open_shards(&dir).unwrap_err().to_string();
    assert!(e.contains("tokens-00001.bin") && e.contains("bytes, but the index says"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["files"][0]["docs"] = 5.into();
    std::fs::write(&index, v.to_string()).unwrap();
    let e = Corpus::open_shards(&dir).unwrap_err().to_string();
    assert!(e.contains("index.json") && e.contains("`files`"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["vocab_size"] = 10.into();
    std::fs::write(&index, v.to_string()).unwrap();
    let e = Corpus::open_shards(&dir).unwrap_err().to_string();
    assert!(e.contains("tokens-00000.bin") && e.contains("outside the index's vocabulary"), "{e}");
    std::fs::write(&index, &good).unwrap();
    let docs = dir.join("docs-00002.bin");
    let mut bytes = std::fs::read(&docs).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&docs, bytes).unwrap();
    let e = Corpus::open_shards(&dir).unwrap_err().to_string();
    assert!(e.contains("docs-00002.bin") && e.contains("document 0 ends at"), "{e}");
    // An empty corpus.
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = Corpus::read(&[empty], &tok).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("no documents"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn model(vocab: usize) -> ModelConfig {
    ModelConfig::from_json_str(&format!(
        r#"{{"model_type": "qwen3_moe", "vocab_size": {vocab}, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
            "num_experts_per_tok": 2, "max_position_embeddings": 64}}"#
    ))
    .unwrap()
}

fn text_config(steps: u64) -> TrainConfig {
    TrainConfig {
        steps,
        micro_batch: 4,
        seq_len: 48,
        grad_accum: 2,
        warmup: 2,
        lr: 3e-3,
        data: DataSpec::Documents(vec![fortunes()]),
        tokenizer: Some(fixture("bpe")),
        eval_fraction: 0.05,
        eval_every: 3,
        eval_batches: 2,
        ..TrainConfig::default()
    }
}

/// Per step: the loss, the held-out loss, the data position and the tokens seen.
type Trace = Vec<(f32, Option<f32>, String, Vec<u64>)>;

/// Trains `spec` (ranks as threads) from a fresh start or `resume` to step `stop`,
/// saving a checkpoint into `save` at the end.
fn run(spec: RunSpec, stop: u64, resume: Option<&Path>, save: Option<&Path>) -> Trace {
    let (world, pp, ep) = (spec.world(), spec.pp, spec.ep);
    let (resume, save) = (resume.map(Path::to_path_buf), save.map(Path::to_path_buf));
    let body = move |mesh: Option<Mesh>| -> Trace {
        let place = match mesh {
            Some(m) => Place::on(m, 1e11, true),
            None => Place::alone(1e11),
        };
        let mut tr = match &resume {
            Some(dir) => Trainer::resume(dir, place, &mut |_, s| {
                (s.pp, s.ep, s.dp) = (spec.pp, spec.ep, spec.dp);
                Ok(())
            })
            .unwrap(),
            None => Trainer::start(model(1000), text_config(8), spec.clone(), Weights::Seed(3), place).unwrap(),
        };
        let mut trace = vec![];
        while tr.step < stop {
            let s = tr.train_step().unwrap();
            trace.push((s.loss, s.eval_loss, format!("{:?}", tr.batcher.position()), s.tokens_seen.clone()));
        }
        if let Some(d) = &save {
            tr.save_checkpoint(d, 1).unwrap();
        }
        trace
    };
    if world == 1 {
        return body(None);
    }
    let runs = local::run(world, Duration::from_secs(120), move |c| {
        let w: Arc<dyn ProcessGroup> = Arc::new(c);
        Ok(body(Some(Mesh::pipelined(w, pp, ep)?)))
    })
    .unwrap();
    runs[0].clone()
}

#[test]
fn an_interrupted_text_run_resumes_at_the_exact_sample_under_any_layout() {
    let full = run(RunSpec::default(), 8, None, None);
    assert!(full[7].0 < full[0].0, "the loss falls: {:?}", full.iter().map(|s| s.0).collect::<Vec<_>>());
    let evals: Vec<f32> = full.iter().filter_map(|s| s.1).collect();
    assert_eq!(evals.len(), 3, "held-out loss at steps 3, 6 and 8");
    assert!(evals[2] < evals[0], "held-out loss falls: {evals:?}");
    let dir = temp("resume");
    let first = run(RunSpec::default(), 3, None, Some(&dir));
    assert_eq!(first[..], full[..3]);
    let ckpt = Trainer::latest_checkpoint(&dir).unwrap();
    // The checkpoint is a model directory with the tokenizer.
    assert!(ckpt.join("tokenizer.json").is_file());
    // One rank: bitwise the same losses, positions and counts.
    let again = run(RunSpec::default(), 8, Some(&ckpt), None);
    assert_eq!(again[..], full[3..]);
    // Other layouts: the same samples (positions and counts), losses and held-out losses
    // within rounding (a pipeline measures the held-out loss through its schedule, the
    // others forward only).
    for spec in [
        RunSpec { ep: 2, dp: 1, ..RunSpec::default() },
        RunSpec { ep: 1, dp: 2, ..RunSpec::default() },
        RunSpec { pp: 2, ep: 1, dp: 1, ..RunSpec::default() },
    ] {
        let other = run(spec.clone(), 8, Some(&ckpt), None);
        for (i, (a, b)) in other.iter().zip(&full[3..]).enumerate() {
            assert_eq!((&a.2, &a.3), (&b.2, &b.3), "{}: step {}: data position", spec.describe(), i + 4);
            assert!((a.0 - b.0).abs() <= 1e-5 * b.0, "{}: step {}: loss {} vs {}", spec.describe(), i + 4, a.0, b.0);
            assert_eq!(a.1.is_some(), b.1.is_some());
            if let (Some(x), Some(y)) = (a.1, b.1) {
                assert!((x - y).abs() <= 1e-5 * y, "{}: step {}: held-out loss {x} vs {y}", spec.describe(), i + 4);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let e = Trainer::start(model(500), text_config(2), RunSpec::default(), Weights::Seed(1), Place::alone(1e11)).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("1000 tokens, more than the model's vocabulary (500)"), "{e}");
}
