//! `ultramoe tokenizer train`: a byte-level BPE tokenizer from a text corpus.

use super::CliResult;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Tokenizer commands.
#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on text files; writes tokenizer.json and
    /// tokenizer_config.json (ChatML chat template) into --out.
    Train(TrainTokenizerArgs),
}

/// Options of `ultramoe tokenizer train`.
#[derive(Args, Debug)]
pub struct TrainTokenizerArgs {
    /// Text files to learn from (repeatable).
    #[arg(long, required = true)]
    pub corpus: Vec<PathBuf>,
    /// Tokens in the vocabulary (bytes and special tokens included).
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Directory to write into (a model directory, typically).
    #[arg(long)]
    pub out: PathBuf,
}

/// `ultramoe tokenizer …`.
pub fn run(c: TokenizerCommand) -> CliResult {
    match c {
        TokenizerCommand::Train(a) => {
            ultramoe_serve::tokenizer::train_bpe(&a.corpus, a.vocab_size, &a.out).map_err(|e| e.to_string())?;
            println!("wrote {} and {}", a.out.join("tokenizer.json").display(), a.out.join("tokenizer_config.json").display());
            Ok(())
        }
    }
}
