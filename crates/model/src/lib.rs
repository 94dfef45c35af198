//! # ultramoe-model
//!
//! MoE causal language models — DeepSeek-V3 (MLA, sigmoid routing with correction bias,
//! group-limited top-k, shared experts), Qwen3-MoE (GQA with q/k norm) and Mixtral —
//! configured by a Hugging Face `config.json`, with explicit forward and backward passes
//! and safetensors checkpoints in the standard per-expert layout.
#![deny(missing_docs)]

pub mod attention;
pub mod checkpoint;
pub mod decode;
pub mod decode_weights;
pub mod decoder;
pub mod init;
pub mod kv_cache;
pub mod memory;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod params;
pub mod pass;
pub mod policy;
pub mod stage;
pub mod swap;
pub mod tensor_ops;
pub mod tensor_parallel;

pub use ultramoe_config::{config, error};
pub use ultramoe_config::{Arch, Error, ModelConfig, Result};
pub use model::{shifted_targets, ExpertSlots, Forward, Model, Share};
pub use pass::PassOptions;
pub use stage::Stage;
