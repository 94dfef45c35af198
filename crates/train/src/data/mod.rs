//! Training data: the math problem generator and its tokenizer, user JSONL problems,
//! text and chat corpora through a model's tokenizer (or pre-tokenized shards), and the
//! packing of examples and documents into `[B, T]` token batches with document masks.

pub mod batch;
pub mod corpus;
pub mod jsonl;
pub mod math;
pub mod text;
pub mod tokenizer;
