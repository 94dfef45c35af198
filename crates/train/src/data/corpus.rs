//! Documents for pretraining and fine-tuning, as token ids: read from text files, JSONL
//! (`{"text"}` documents or `{"messages"}` chats) through the model's tokenizer, or from
//! pre-tokenized shards that are memory-mapped (a corpus larger than RAM streams).
//!
//! A shard directory (`ultramoe data prepare`) holds `index.json` and, per shard,
//! `tokens-NNNNN.bin` (little-endian `u32` ids), `docs-NNNNN.bin` (little-endian `u64`
//! end offset of each document within the shard) and, for chats, `mask-NNNNN.bin` (one
//! byte a token: 1 where the token is trained as a target). Documents never straddle
//! shards. The index names the files the documents came from and how many documents and
//! tokens each gave, so a run can say how much of which file it has seen.

use super::text::{Message, TextTokenizer};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use ultramoe_model::{Error, Result};

/// The shard format's name in `index.json`.
pub const SHARD_FORMAT: &str = "ultramoe-shards-1";

/// Tokens per shard that `data prepare` aims for (1 GiB of ids).
pub const DEFAULT_SHARD_TOKENS: u64 = 1 << 28;

/// Owned or memory-mapped little-endian values.
enum Buf<T: 'static> {
    Owned(Vec<T>),
    Mapped { map: Mmap, len: usize },
}

impl<T: Copy> Buf<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            // SAFETY: the map is page-aligned (so aligned for T), holds exactly `len`
            // values (checked when mapped), and lives as long as `self`; any bit
            // pattern is a valid u8/u32/u64.
            Buf::Mapped { map, len } => unsafe { std::slice::from_raw_parts(map.as_ptr() as *const T, *len) },
        }
    }
}

/// Maps `file` as `len` values of `T` (its size must match exactly).
fn map_values<T: Copy>(file: &Path, len: usize) -> Result<Buf<T>> {
    let f = std::fs::File::open(file).map_err(|e| Error::msg(format!("cannot open: {e}")).in_file(file))?;
    let size = f.metadata().map_err(|e| Error::msg(e.to_string()).in_file(file))?.len();
    let want = (len * std::mem::size_of::<T>()) as u64;
    if size != want {
        return Err(Error::msg(format!("{size} bytes, but the index says {len} values ({want} bytes)")).in_file(file));
    }
    if len == 0 {
        return Ok(Buf::Owned(vec![]));
    }
    if cfg!(target_endian = "big") {
        return Err(Error::msg("shards are little-endian; this machine is not").in_file(file));
    }
    // SAFETY: the file is only read; a shard changed while mapped is the user's doing
    // (as with any memory-mapped dataset) and can at worst give other token ids, which
    // are range-checked when the shard is opened.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::msg(format!("cannot map: {e}")).in_file(file))?;
    Ok(Buf::Mapped { map, len })
}

/// One shard's documents.
struct Shard {
    tokens: Buf<u32>,
    /// end offset of each document in `tokens`
    ends: Buf<u64>,
    /// per token: trained as a target (chats); `None`: every token
    mask: Option<Buf<u8>>,
}

impl Shard {
    fn doc(&self, i: usize) -> Range<usize> {
        let ends = self.ends.as_slice();
        let start = if i == 0 { 0 } else { ends[i - 1] as usize };
        start..ends[i] as usize
    }
}

/// Where a corpus's documents came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// the file as given
    pub name: String,
    /// documents it gave (consecutive, in corpus order)
    pub docs: u64,
    /// tokens it gave
    pub tokens: u64,
}

/// A shard's entry in `index.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ShardEntry {
    tokens_file: String,
    docs_file: String,
    mask_file: Option<String>,
    tokens: u64,
    docs: u64,
}

/// `index.json` of a shard directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Index {
    format: String,
    /// the tokenizer's vocabulary the ids were made with
    vocab_size: usize,
    /// chats: only assistant tokens are trained
    chat: bool,
    shards: Vec<ShardEntry>,
    files: Vec<SourceFile>,
}

/// Token documents.
pub struct Corpus {
    shards: Vec<Shard>,
    /// global index of each shard's first document, then the total
    first_doc: Vec<usize>,
    /// the files, in document order
    pub files: Vec<SourceFile>,
    /// the tokenizer vocabulary the ids come from (every id is below it)
    pub vocab_size: usize,
    /// whether the documents are chats (trained on assistant tokens only)
    pub chat: bool,
}

/// A document: its tokens and which of them are trained as targets.
pub struct Doc<'a> {
    /// token ids
    pub tokens: &'a [u32],
    /// per token, 1 where trained (`None`: all)
    pub mask: Option<&'a [u8]>,
}

/// What kind of documents a JSONL file holds, by its first line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonlKind {
    /// `{"text": ...}`
    Text,
    /// `{"messages": [{"role", "content"}, …]}`
    Chat,
    /// `{"question", "answer"}` (the math model's problems)
    Problems,
}

/// The kind of a JSONL file, from its first non-blank line.
pub fn jsonl_kind(path: &Path) -> Result<JsonlKind> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(path))?;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::msg(format!("line {}: not valid JSON: {e}", i + 1)).in_file(path))?;
        return Ok(if v.get("messages").is_some() {
            JsonlKind::Chat
        } else if v.get("text").is_some() {
            JsonlKind::Text
        } else if v.get("question").is_some() {
            JsonlKind::Problems
        } else {
            return Err(Error::msg(format!("line {}: expected a `text`, `messages` or `question` field", i + 1)).in_file(path));
        });
    }
    Err(Error::msg("empty: no documents").in_file(path))
}

/// Documents being built in memory.
#[derive(Default)]
struct Builder {
    tokens: Vec<u32>,
    ends: Vec<u64>,
    mask: Vec<u8>,
    files: Vec<SourceFile>,
}

impl Builder {
    fn push(&mut self, ids: &[u32], trained: Option<&[bool]>) {
        self.tokens.extend_from_slice(ids);
        if let Some(t) = trained {
            self.mask.extend(t.iter().map(|&x| x as u8));
        }
        self.ends.push(self.tokens.len() as u64);
    }
}

/// Reads one text or JSONL file into `b` with `tok`.
fn read_file(b: &mut Builder, path: &Path, tok: &TextTokenizer, chat: bool) -> Result<()> {
    let (docs0, tokens0) = (b.ends.len(), b.tokens.len());
    let text = std::fs::read_to_string(path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(path))?;
    let at = |line: usize, what: String| Error::msg(format!("line {line}: {what}")).in_file(path);
    if path.extension().is_some_and(|e| e == "jsonl") {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(i + 1, format!("not valid JSON: {e}")))?;
            if chat {
                let msgs = v.get("messages").ok_or_else(|| at(i + 1, "`messages`: missing (the file's first line is a chat)".into()))?;
                let msgs: Vec<Message> =
                    serde_json::from_value(msgs.clone()).map_err(|e| at(i + 1, format!("`messages`: expected a list of {{\"role\", \"content\"}} objects: {e}")))?;
                let (ids, trained) = tok.encode_chat_for_training(&msgs).map_err(|e| at(i + 1, e))?;
                b.push(&ids, Some(&trained));
            } else {
                let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| at(i + 1, "`text`: missing or not a string".into()))?;
                let ids = tok.encode_document(t).map_err(|e| at(i + 1, e))?;
                b.push(&ids, None);
            }
        }
    } else {
        // A plain text file is one document (split across rows as needed).
        if chat {
            return Err(Error::msg("plain text cannot be mixed with chat files").in_file(path));
        }
        let ids = tok.encode_document(&text).map_err(|e| Error::msg(e).in_file(path))?;
        b.push(&ids, None);
    }
    let docs = (b.ends.len() - docs0) as u64;
    if docs == 0 {
        return Err(Error::msg("empty: no documents").in_file(path));
    }
    b.files.push(SourceFile { name: path.display().to_string(), docs, tokens: (b.tokens.len() - tokens0) as u64 });
    Ok(())
}

impl Corpus {
    /// Tokenizes text files (`.txt`: one document each) and JSONL files (`{"text"}` a
    /// document a line, or `{"messages"}` a chat a line — not both kinds in one run).
    pub fn read(files: &[PathBuf], tok: &TextTokenizer) -> Result<Corpus> {
        let mut chat = None;
        for f in files {
            let is_chat = f.extension().is_some_and(|e| e == "jsonl") && match jsonl_kind(f)? {
                JsonlKind::Chat => true,
                JsonlKind::Text => false,
                JsonlKind::Problems => return Err(Error::msg("`question`/`answer` problems are the math model's data: give the file alone as --data").in_file(f)),
            };
            if chat.is_some_and(|c| c != is_chat) {
                return Err(Error::msg("chat and plain documents cannot be mixed in one run").in_file(f));
            }
            chat = Some(is_chat);
        }
        let chat = chat.ok_or_else(|| Error::msg("no data files given"))?;
        let mut b = Builder::default();
        for f in files {
            read_file(&mut b, f, tok, chat)?;
        }
        Ok(Corpus::from_builder(b, tok.vocab_size(), chat))
    }

    fn from_builder(b: Builder, vocab_size: usize, chat: bool) -> Corpus {
        let shard = Shard { tokens: Buf::Owned(b.tokens), ends: Buf::Owned(b.ends), mask: chat.then_some(Buf::Owned(b.mask)) };
        let n = shard.ends.as_slice().len();
        Corpus { shards: vec![shard], first_doc: vec![0, n], files: b.files, vocab_size, chat }
    }

    /// Opens a shard directory written by [`Corpus::write_shards`], mapping its files;
    /// every size, offset and id is checked against the index.
    pub fn open_shards(dir: &Path) -> Result<Corpus> {
        let index_file = dir.join("index.json");
        let text = std::fs::read_to_string(&index_file).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&index_file))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| Error::msg(format!("not a shard index: {e}")).in_file(&index_file))?;
        if index.format != SHARD_FORMAT {
            return Err(Error::field("format", format!("`{}`, expected `{SHARD_FORMAT}`", index.format)).in_file(&index_file));
        }
        let (mut shards, mut first_doc) = (vec![], vec![0]);
        for (k, e) in index.shards.iter().enumerate() {
            let name_ok = |n: &str| !n.is_empty() && !n.contains('/') && !n.contains('\\') && n != "." && n != "..";
            for n in [&e.tokens_file, &e.docs_file].into_iter().chain(e.mask_file.as_ref()) {
                if !name_ok(n) {
                    return Err(Error::field(format!("shards[{k}]"), format!("`{n}` is not a file name in the shard directory")).in_file(&index_file));
                }
            }
            if e.mask_file.is_some() != index.chat {
                return Err(Error::field(format!("shards[{k}].mask_file"), "chat shards have a mask file, others none").in_file(&index_file));
            }
            let tokens = map_values::<u32>(&dir.join(&e.tokens_file), e.tokens as usize)?;
            let ends = map_values::<u64>(&dir.join(&e.docs_file), e.docs as usize)?;
            let mask = match &e.mask_file {
                Some(m) => Some(map_values::<u8>(&dir.join(m), e.tokens as usize)?),
                None => None,
            };
            let docs_path = dir.join(&e.docs_file);
            let mut prev = 0;
            for (i, &end) in ends.as_slice().iter().enumerate() {
                if end < prev || end > e.tokens {
                    return Err(Error::msg(format!("document {i} ends at {end}, outside {prev}..={}", e.tokens)).in_file(&docs_path));
                }
                prev = end;
            }
            if prev != e.tokens {
                return Err(Error::msg(format!("the documents cover {prev} of the shard's {} tokens", e.tokens)).in_file(&docs_path));
            }
            if let Some(pos) = tokens.as_slice().iter().position(|&t| t as usize >= index.vocab_size) {
                return Err(Error::msg(format!("token {pos} is id {}, outside the index's vocabulary ({})", tokens.as_slice()[pos], index.vocab_size))
                    .in_file(&dir.join(&e.tokens_file)));
            }
            first_doc.push(first_doc[k] + e.docs as usize);
            shards.push(Shard { tokens, ends, mask });
        }
        let total: u64 = index.files.iter().map(|f| f.docs).sum();
        if total as usize != *first_doc.last().expect("starts with 0") {
            return Err(Error::field("files", format!("the files give {total} documents, the shards hold {}", first_doc.last().unwrap())).in_file(&index_file));
        }
        if total == 0 {
            return Err(Error::msg("no documents").in_file(&index_file));
        }
        Ok(Corpus { shards, first_doc, files: index.files, vocab_size: index.vocab_size, chat: index.chat })
    }

    /// Reads `--data` paths: shard directories (alone) or text/JSONL files (tokenized
    /// with `tok`, which they need).
    pub fn load(paths: &[PathBuf], tok: Option<&TextTokenizer>) -> Result<Corpus> {
        match paths {
            [dir] if dir.is_dir() => Corpus::open_shards(dir),
            _ => {
                if let Some(d) = paths.iter().find(|p| p.is_dir()) {
                    return Err(Error::msg("a shard directory is read alone (prepare one from all the files instead)").in_file(d));
                }
                let tok = tok.ok_or_else(|| Error::field("tokenizer", "text and JSONL data need a tokenizer (--tokenizer DIR, or --init-from a model that has one)"))?;
                Corpus::read(paths, tok)
            }
        }
    }

    /// Writes the corpus as a shard directory of about `shard_tokens` tokens a shard.
    pub fn write_shards(&self, dir: &Path, shard_tokens: u64) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::msg(format!("cannot create: {e}")).in_file(dir))?;
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::msg(format!("cannot write: {e}")).in_file(&p))
        };
        let mut entries = vec![];
        let (mut tokens, mut ends, mut mask) = (Vec::<u8>::new(), Vec::<u8>::new(), Vec::<u8>::new());
        let (mut n_tok, mut n_doc) = (0u64, 0u64);
        let mut flush = |tokens: &mut Vec<u8>, ends: &mut Vec<u8>, mask: &mut Vec<u8>, n_tok: &mut u64, n_doc: &mut u64| -> Result<()> {
            let k = entries.len();
            let e = ShardEntry {
                tokens_file: format!("tokens-{k:05}.bin"),
                docs_file: format!("docs-{k:05}.bin"),
                mask_file: self.chat.then(|| format!("mask-{k:05}.bin")),
                tokens: *n_tok,
                docs: *n_doc,
            };
            write(&e.tokens_file, tokens)?;
            write(&e.docs_file, ends)?;
            if let Some(m) = &e.mask_file {
                write(m, mask)?;
            }
            entries.push(e);
            tokens.clear();
            ends.clear();
            mask.clear();
            (*n_tok, *n_doc) = (0, 0);
            Ok(())
        };
        for i in 0..self.docs() {
            let d = self.doc(i);
            if n_doc > 0 && n_tok + d.tokens.len() as u64 > shard_tokens {
                flush(&mut tokens, &mut ends, &mut mask, &mut n_tok, &mut n_doc)?;
            }
            tokens.extend(d.tokens.iter().flat_map(|t| t.to_le_bytes()));
            n_tok += d.tokens.len() as u64;
            n_doc += 1;
            ends.extend(n_tok.to_le_bytes());
            if let Some(m) = d.mask {
                mask.extend_from_slice(m);
            }
        }
        if n_doc > 0 {
            flush(&mut tokens, &mut ends, &mut mask, &mut n_tok, &mut n_doc)?;
        }
        let index = Index { format: SHARD_FORMAT.into(), vocab_size: self.vocab_size, chat: self.chat, shards: entries, files: self.files.clone() };
        // The index goes last: a directory without one is no shard directory.
        write("index.json", serde_json::to_string_pretty(&index).expect("json").as_bytes())
    }

    /// Documents.
    pub fn docs(&self) -> usize {
        *self.first_doc.last().expect("starts with 0")
    }

    /// Tokens in all documents.
    pub fn tokens(&self) -> u64 {
        self.files.iter().map(|f| f.tokens).sum()
    }

    /// Document `i`.
    pub fn doc(&self, i: usize) -> Doc<'_> {
        let s = self.first_doc.partition_point(|&f| f <= i) - 1;
        let shard = &self.shards[s];
        let r = shard.doc(i - self.first_doc[s]);
        Doc { tokens: &shard.tokens.as_slice()[r.clone()], mask: shard.mask.as_ref().map(|m| &m.as_slice()[r]) }
    }

    /// The file document `i` came from (index into [`Corpus::files`]).
    pub fn file_of(&self, i: usize) -> usize {
        let mut start = 0u64;
        for (k, f) in self.files.iter().enumerate() {
            start += f.docs;
            if (i as u64) < start {
                return k;
            }
        }
        self.files.len() - 1
    }

    /// Splits the documents into training and held-out ones: document `i` is held out
    /// when `hash(i) / 2⁶⁴ < fraction` (a fixed hash, so every run over the same corpus
    /// holds out the same documents). At least one document trains; with a fraction
    /// above 0 at least one is held out when there are two or more.
    pub fn split(&self, fraction: f64) -> (Vec<u32>, Vec<u32>) {
        let n = self.docs();
        let held = |i: usize| (splitmix(i as u64) as f64) < fraction * 2f64.powi(64);
        let (mut train, mut eval): (Vec<u32>, Vec<u32>) = (0..n as u32).partition(|&i| !held(i as usize));
        if train.is_empty() {
            train.push(eval.remove(0));
        }
        if fraction > 0.0 && eval.is_empty() && train.len() > 1 {
            eval.push(train.pop().expect("two or more"));
        }
        (train, eval)
    }
}

/// SplitMix64's finaliser: a fixed, well-mixed hash of a document index.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl std::fmt::Debug for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Corpus({} documents, {} tokens, {} files{})", self.docs(), self.tokens(), self.files.len(), if self.chat { ", chats" } else { "" })
    }
}
