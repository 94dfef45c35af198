//! Tokenizers: a byte-level BPE trained here, read back through `tokenizer.json` and
//! `tokenizer_config.json` — round trips, the chat template, end tokens, and text
//! streamed token by token with stop sequences.

use std::path::PathBuf;
use ultramoe_serve::tokenizer::{train_bpe, Message, TextStream, TextTokenizer, TRAINED_SPECIALS};

fn corpus(dir: &std::path::Path) -> PathBuf {
    let words = ["the", "expert", "router", "sends", "each", "token", "to", "two", "experts", "of", "eight", "and", "weights", "their", "outputs", "π≈3.14159", "naïve", "日本語"];
    let mut text = String::new();
    let mut s = 12345u64;
    for line in 0..400 {
        for _ in 0..12 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(words[(s >> 33) as usize % words.len()]);
            text.push(' ');
        }
        text.push_str(&format!("{line}\n"));
    }
    let f = dir.join("corpus.txt");
    std::fs::write(&f, text).unwrap();
    f
}

fn trained() -> (tempdir::Dir, TextTokenizer) {
    let dir = tempdir::Dir::new();
    let f = corpus(dir.path());
    train_bpe(&[f], 400, dir.path()).unwrap();
    let tok = TextTokenizer::load(dir.path(), 512).unwrap();
    (dir, tok)
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!("ultramoe-tok-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn trained_bpe_round_trips_any_text() {
    let (_d, tok) = trained();
    for text in ["the router sends each token", "unseen wörds ∑ and emoji 🙂", "  spaces\tand\nnewlines "] {
        let ids = tok.encode_prompt(text).unwrap();
        assert!(ids.iter().all(|&t| t < 400));
        assert_eq!(tok.decode(&ids), text);
    }
    // Merges were learnt: a frequent word is one token.
    assert_eq!(tok.encode_prompt("experts").unwrap().len(), 1);
}

#[test]
fn chat_template_renders_and_ends_turns_with_its_token() {
    let (d, tok) = trained();
    let msgs = [Message { role: "system".into(), content: " be brief ".into() }, Message { role: "user".into(), content: "route it".into() }];
    let TextTokenizer::Hf(h) = &tok else { panic!("a tokenizer.json model") };
    let text = h.render_chat(&msgs).unwrap();
    assert_eq!(text, "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nroute it<|im_end|>\n<|im_start|>assistant\n");
    let ids = tok.encode_chat(&msgs).unwrap();
    let im_start = 1; // the specials come first, in their order
    assert_eq!(ids.iter().filter(|&&t| t == im_start).count(), 3, "special tokens are single tokens: {ids:?}");
    // The end of a turn, and (from the generation_config.json it writes) of a document.
    assert_eq!(tok.eos_ids(), vec![0, 2]);
    assert_eq!(TRAINED_SPECIALS[..], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    // generation_config.json adds end tokens to the tokenizer_config.json's one.
    std::fs::write(d.path().join("generation_config.json"), r#"{"eos_token_id": [1]}"#).unwrap();
    assert_eq!(TextTokenizer::load(d.path(), 512).unwrap().eos_ids(), vec![1, 2]);
    // A tokenizer larger than the model's vocabulary is refused, naming the file.
    let e = TextTokenizer::load(d.path(), 300).err().expect("refused").to_string();
    assert!(e.contains("tokenizer.json") && e.contains("300"), "{e}");
}

#[test]
fn streamed_text_is_the_whole_text_and_stops_before_a_stop_sequence() {
    let (_d, tok) = trained();
    let text = "each token 日本語 goes to two experts of eight";
    let ids = tok.encode_prompt(text).unwrap();
    let mut s = TextStream::new(vec![]);
    let mut out: String = ids.iter().map(|&t| s.push(&tok, t).text).collect();
    out.push_str(&s.finish(&tok));
    assert_eq!(out, text);
    // Stops at "two", which arrives over several tokens; nothing of it is sent.
    let mut s = TextStream::new(vec!["two ex".into()]);
    let mut sent = String::new();
    let mut stopped = false;
    for &t in &ids {
        let p = s.push(&tok, t);
        sent.push_str(&p.text);
        if p.stopped {
            stopped = true;
            break;
        }
    }
    assert!(stopped);
    assert_eq!(sent, "each token 日本語 goes to ");
}

#[test]
fn the_math_tokenizer_streams_numbers_in_reading_order() {
    let tok = TextTokenizer::Math;
    // The model writes 4060 as 0604 (least significant digit first).
    let ids = ultramoe_train::data::tokenizer::encode("85*07=0604");
    let mut s = TextStream::new(vec![]);
    let mut out: String = ids.iter().map(|&t| s.push(&tok, t).text).collect();
    out.push_str(&s.finish(&tok));
    assert_eq!(out, "58*70=4060");
}
