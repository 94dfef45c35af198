//! Training data: the math problem generator, the tokenizer, user JSONL files, and the
//! packing of examples into `[B, T]` token batches with answer-only targets.

pub mod batch;
pub mod jsonl;
pub mod math;
pub mod tokenizer;
