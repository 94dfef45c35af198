//! `ultramoe data prepare`: text data tokenized once into memory-mapped shards.

use super::CliResult;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use ultramoe_train::data::corpus::{Corpus, DEFAULT_SHARD_TOKENS};
use ultramoe_train::data::text::TextTokenizer;

/// Data commands.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize text files (`.txt`: a document each) or JSONL files (`{"text"}`
    /// documents, or `{"messages"}` chats) into a shard directory that `train --data`
    /// memory-maps: a corpus larger than RAM streams, and no rank tokenizes.
    Prepare(PrepareArgs),
}

/// Options of `ultramoe data prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Files to tokenize, in order (repeatable).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Tokenizer directory (`tokenizer.json`, `tokenizer_config.json`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Directory to write the shards and their `index.json` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per shard (documents are never split between shards).
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,
}

/// `ultramoe data …`.
pub fn run(c: DataCommand) -> CliResult {
    match c {
        DataCommand::Prepare(a) => {
            if a.shard_tokens == 0 {
                return Err("--shard-tokens: must be at least 1".into());
            }
            let tok = TextTokenizer::load_hf(&a.tokenizer, usize::MAX).map_err(|e| e.to_string())?;
            let corpus = Corpus::read(&a.files, &tok).map_err(|e| e.to_string())?;
            corpus.write_shards(&a.out, a.shard_tokens).map_err(|e| e.to_string())?;
            println!(
                "{} documents, {} tokens ({}) from {} file(s) → {}",
                corpus.docs(),
                corpus.tokens(),
                if corpus.chat { "chats: assistant tokens trained" } else { "documents" },
                corpus.files.len(),
                a.out.display()
            );
            Ok(())
        }
    }
}
