//! # ultramoe-kernels
//!
//! CPU kernels on plain `f32` buffers, each forward next to its hand-written backward
//! (llm.c style: no autograd tape, so every saved activation is explicit at the call site).
//!
//! Notation used in shape comments throughout:
//! - `N`: tokens in the batch (B·T), `B` batch rows, `T` sequence length
//! - `H`: hidden size, `I`: FFN intermediate size, `V`: vocabulary size
//! - `E`: routed experts, `K`: experts per token (top-k), `R = N·K`: routed rows
//! - `nh`: attention heads, `d`: a head's dimension
//!
//! Matrices are row-major. A linear layer's weight is stored `[out, in]` as in PyTorch,
//! so `y = x · Wᵀ`.
//!
//! Backward functions *accumulate* into parameter gradients (`+=`) so gradient
//! accumulation over micro-batches needs no extra buffer; activation gradients are
//! written or accumulated as each function documents.
#![deny(missing_docs)]

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod balance;
pub mod bandwidth;
pub mod embedding;
pub mod gemm;
pub mod gemv;
pub mod gemv_int8;
pub mod grouped_gemm;
pub mod huge;
pub mod isa;
pub mod kv_attention;
pub mod loss;
pub mod memory;
pub mod norm;
pub mod permute;
pub mod qlinear;
pub mod profile;
pub mod rope;
pub mod router;
pub mod vmath;

#[cfg(test)]
pub(crate) mod testutil;
