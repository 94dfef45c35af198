//! # ultramoe-config
//!
//! A model's shape from its Hugging Face `config.json` (deepseek_v3, qwen3_moe, mixtral),
//! resolved and validated into one typed [`ModelConfig`], and the one error type users
//! see (file, field, reason). No numerics: the model crate builds layers from it and the
//! planner prices them, without either depending on the other.
#![deny(missing_docs)]

pub mod config;
pub mod error;

pub use config::{Arch, MlaDims, MoeDims, ModelConfig, RopeScaling};
pub use error::{Error, Result};
