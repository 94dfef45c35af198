//! # ultramoe-train
//!
//! Training for ultramoe models: AdamW with decoupled weight decay, warmup + cosine
//! schedule, gradient accumulation and clipping, math data with worked answers, and a
//! trainer whose checkpoints resume to the identical loss curve.
#![deny(missing_docs)]

pub mod data;
pub mod budget;
pub mod optimizer;
pub mod parallel;
pub mod pipeline;
pub mod placement;
pub mod run_dir;
pub mod schedule;
pub mod spec;
pub mod trace;
pub mod trainer;
pub mod zero;
