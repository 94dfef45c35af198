//! Text ↔ tokens: a model directory's `tokenizer.json` (through the `tokenizers` crate,
//! offline: byte-level BPE, unigram, WordPiece) with the chat template and special tokens
//! of its `tokenizer_config.json`, or — for a model trained here on math — the math
//! model's character tokenizer, behind one interface. Training reads documents and chats
//! through it; generation and serving encode prompts and decode answers.

use minijinja::Environment;
use serde_json::Value;
use std::path::{Path, PathBuf};
use super::batch::prompt_tokens;
use super::math::to_model_digits;
use super::tokenizer as math;

/// A chat message.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`
    pub role: String,
    /// the text
    pub content: String,
}

/// An error a user can cause: which file and what is wrong.
#[derive(Debug)]
pub struct TokenizerError {
    /// the file concerned
    pub file: PathBuf,
    /// what is wrong
    pub reason: String,
}

impl std::fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

impl std::error::Error for TokenizerError {}

/// A model's tokenizer.
pub enum TextTokenizer {
    /// the math model's characters (prompts are questions; answers are worked steps)
    Math,
    /// a Hugging Face tokenizer
    Hf(Box<HfTokenizer>),
}

/// `tokenizer.json` with what `tokenizer_config.json` adds.
pub struct HfTokenizer {
    tok: tokenizers::Tokenizer,
    /// Jinja chat template (none: plain `role: content` lines)
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// The tokenizer of a model directory: `tokenizer.json` when present, else the math
    /// tokenizer when the vocabulary can hold it.
    pub fn load(dir: &Path, vocab_size: usize) -> Result<Self, TokenizerError> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            if vocab_size >= math::VOCAB_SIZE {
                return Ok(TextTokenizer::Math);
            }
            return Err(TokenizerError {
                file,
                reason: format!("missing, and the vocabulary ({vocab_size}) is too small for the math tokenizer ({})", math::VOCAB_SIZE),
            });
        }
        Self::load_hf(dir, vocab_size)
    }

    /// The `tokenizer.json` tokenizer of a directory (no math fallback: text data needs
    /// one), with what its `tokenizer_config.json` and `generation_config.json` add.
    pub fn load_hf(dir: &Path, vocab_size: usize) -> Result<Self, TokenizerError> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(TokenizerError { file, reason: "missing: a tokenizer directory holds tokenizer.json".into() });
        }
        let tok = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError { file: file.clone(), reason: e.to_string() })?;
        let cfg_file = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_file) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| TokenizerError { file: cfg_file.clone(), reason: e.to_string() })?,
            Err(_) => Value::Null,
        };
        let template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let bos_token = token_text(cfg.get("bos_token"));
        let eos_token = token_text(cfg.get("eos_token"));
        let mut eos_ids: Vec<u32> = eos_token.iter().filter_map(|t| tok.token_to_id(t)).collect();
        // generation_config.json may name more end tokens (chat models end turns with one).
        if let Ok(s) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(g) = serde_json::from_str::<Value>(&s) {
                match g.get("eos_token_id") {
                    Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                    Some(Value::Array(a)) => eos_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                    _ => {}
                }
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        if let Some(&t) = eos_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(TokenizerError { file, reason: format!("end token {t} is outside the model's vocabulary ({vocab_size})") });
        }
        let size = tok.get_vocab_size(true);
        if size > vocab_size {
            return Err(TokenizerError { file, reason: format!("{size} tokens, more than the model's vocabulary ({vocab_size})") });
        }
        Ok(TextTokenizer::Hf(Box::new(HfTokenizer { tok, template, bos_token, eos_token, eos_ids })))
    }

    /// Tokens that end a generation.
    pub fn eos_ids(&self) -> Vec<u32> {
        match self {
            TextTokenizer::Math => vec![math::EOS],
            TextTokenizer::Hf(h) => h.eos_ids.clone(),
        }
    }

    /// The prompt of a completion request. The math model reads a question.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            TextTokenizer::Math => Ok(prompt_tokens(text)),
            TextTokenizer::Hf(h) => h.tok.encode(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string()),
        }
    }

    /// The prompt of a chat: the template applied with a generation prompt (the math
    /// model answers the last user message).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        match self {
            TextTokenizer::Math => {
                let q = messages.iter().rev().find(|m| m.role == "user").ok_or("no user message")?;
                Ok(prompt_tokens(&q.content))
            }
            TextTokenizer::Hf(h) => {
                let text = h.render_chat(messages)?;
                // The template writes the special tokens itself.
                h.tok.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
            }
        }
    }

    /// Text of generated tokens (special tokens skipped; the math model's digits in the
    /// order people read them).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            TextTokenizer::Math => to_model_digits(&math::decode(ids)),
            TextTokenizer::Hf(h) => h.tok.decode(ids, true).unwrap_or_default(),
        }
    }
}

/// Roles a chat line may use.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

impl TextTokenizer {
    /// Tokens in the vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Math => math::VOCAB_SIZE,
            TextTokenizer::Hf(h) => h.tok.get_vocab_size(true),
        }
    }

    /// A pretraining document: its text as the tokenizer encodes it (with whatever its
    /// post-processor adds, such as a BOS token), then the document end token
    /// (`<|endoftext|>` when the vocabulary has it, else the first end token), so a model
    /// learns where documents end (and generation stops there).
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            TextTokenizer::Math => {
                let mut ids = vec![math::BOS];
                ids.extend(math::encode(text));
                ids.push(math::EOS);
                Ok(ids)
            }
            TextTokenizer::Hf(h) => {
                let mut ids = h.tok.encode(text, true).map_err(|e| e.to_string())?.get_ids().to_vec();
                ids.extend(h.tok.token_to_id("<|endoftext|>").or(h.eos_ids.first().copied()));
                Ok(ids)
            }
        }
    }

    /// A conversation for fine-tuning: the chat template's tokens, and for each token
    /// whether it is trained as a target — the assistant's turns only (each from the end
    /// of the prompt that opens it to the end of its turn, end token included).
    pub fn encode_chat_for_training(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>), String> {
        let TextTokenizer::Hf(h) = self else {
            return Err("the math tokenizer has no chat template (train on {\"question\", \"answer\"} lines instead)".into());
        };
        if let Some(m) = messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
            return Err(format!("role `{}` is not one of {}", m.role, ROLES.join(", ")));
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("no assistant message: nothing to train on".into());
        }
        let text = h.render(messages, false)?;
        // Byte ranges of the assistant turns: what rendering the turn adds to the
        // conversation before it with the assistant's turn opened.
        let mut spans = vec![];
        for i in (0..messages.len()).filter(|&i| messages[i].role == "assistant") {
            let before = h.render(&messages[..i], true)?;
            let through = h.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(format!("the chat template does not render message {} as an extension of the ones before it", i + 1));
            }
            spans.push(before.len()..through.len());
        }
        let enc = h.tok.encode(text.as_str(), false).map_err(|e| e.to_string())?;
        let trained = enc.get_offsets().iter().map(|&(a, b)| b > a && spans.iter().any(|s| s.contains(&a))).collect();
        Ok((enc.get_ids().to_vec(), trained))
    }

    /// Bytes at the end of decoded text that later tokens may still change: the math
    /// model writes numbers least significant digit first, so a trailing run of digits
    /// reads in order only once it ends.
    pub fn unsettled_tail(&self, text: &str) -> usize {
        match self {
            TextTokenizer::Math => text.bytes().rev().take_while(u8::is_ascii_digit).count(),
            TextTokenizer::Hf(_) => 0,
        }
    }
}

impl HfTokenizer {
    /// The chat template's text for `messages`, ending with the assistant's turn opened.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, String> {
        self.render(messages, true)
    }

    /// The chat template's text for `messages`, with the assistant's turn opened at the
    /// end when `generation_prompt`.
    pub fn render(&self, messages: &[Message], generation_prompt: bool) -> Result<String, String> {
        let Some(template) = &self.template else {
            let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
            if generation_prompt {
                s.push_str("assistant:");
            }
            return Ok(s);
        };
        let mut env = Environment::new();
        // Templates written for Python's Jinja call string methods (`.strip()`,
        // `.startswith()`, …): the Python-compatibility shims provide them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| format!("chat template: {e}"))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| format!("chat template: {e}"))
    }
}

/// Special tokens of a tokenizer made by [`train_bpe`]: end of text, then ChatML's turn
/// markers.
pub const TRAINED_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML (as Qwen's models use it): each turn `<|im_start|>role\ncontent<|im_end|>\n`,
/// then the assistant's turn opened.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Trains a byte-level BPE tokenizer of `vocab_size` tokens on text files and writes
/// `tokenizer.json` and `tokenizer_config.json` (ChatML template; `<|im_end|>` ends a
/// turn, `<|endoftext|>` a document) into `out`. Byte-level: any text encodes, nothing is
/// unknown. Text files are read whole; JSONL files by their `text` fields or their chats'
/// message contents.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize, out: &Path) -> Result<(), TokenizerError> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder};
    let err = |file: &Path, reason: String| TokenizerError { file: file.to_path_buf(), reason };
    let min = 256 + TRAINED_SPECIALS.len();
    if vocab_size < min {
        return Err(err(out, format!("a vocabulary of {vocab_size} cannot hold the 256 bytes and {} special tokens", TRAINED_SPECIALS.len())));
    }
    for f in files {
        if !f.is_file() {
            return Err(err(f, "not a readable file".into()));
        }
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(TRAINED_SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::normalizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::new(false, true, true)))
        .build()
        .map_err(|e| err(out, e.to_string()))?;
    // Text files as they are; JSONL files by their documents' text or chats' contents
    // (not their JSON syntax).
    let mut texts: Vec<String> = vec![];
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| err(f, format!("cannot read: {e}")))?;
        if f.extension().is_none_or(|e| e != "jsonl") {
            texts.push(text);
            continue;
        }
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| err(f, format!("line {}: not valid JSON: {e}", i + 1)))?;
            match (v.get("text"), v.get("messages")) {
                (Some(Value::String(t)), _) => texts.push(t.clone()),
                (_, Some(Value::Array(msgs))) => texts.extend(msgs.iter().filter_map(|m| m.get("content").and_then(|c| c.as_str())).map(str::to_string)),
                _ => return Err(err(f, format!("line {}: expected a `text` string or a `messages` list", i + 1))),
            }
        }
    }
    if texts.iter().all(|t| t.trim().is_empty()) {
        return Err(err(&files[0], "no text to learn from".into()));
    }
    tok.train(&mut trainer, texts.iter()).map_err(|e| err(&files[0], format!("training: {e}")))?;
    std::fs::create_dir_all(out).map_err(|e| err(out, e.to_string()))?;
    let file = out.join("tokenizer.json");
    tok.save(&file, false).map_err(|e| err(&file, e.to_string()))?;
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 1 << 20,
    });
    let file = out.join("tokenizer_config.json");
    std::fs::write(&file, serde_json::to_string_pretty(&cfg).expect("json")).map_err(|e| err(&file, e.to_string()))?;
    // Generation ends at a document's end as well as at a turn's.
    let ends: Vec<u32> = ["<|endoftext|>", "<|im_end|>"].iter().filter_map(|t| tok.token_to_id(t)).collect();
    let file = out.join("generation_config.json");
    let gen = serde_json::json!({ "eos_token_id": ends });
    std::fs::write(&file, serde_json::to_string_pretty(&gen).expect("json")).map_err(|e| err(&file, e.to_string()))
}
