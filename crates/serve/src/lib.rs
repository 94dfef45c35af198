//! # ultramoe-serve
//!
//! Generation and serving: KV-cached decoding of many sequences with continuous
//! batching and chunked prefill ([`engine`]), sampling ([`sampling`]), tokenizers and
//! chat templates ([`tokenizer`]), and an OpenAI-compatible HTTP server ([`http`]).
#![deny(missing_docs)]

pub mod engine;
pub mod http;
pub mod sampling;
pub mod tokenizer;
