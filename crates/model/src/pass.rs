//! How a forward and backward pass runs — as opposed to what the model is ([`Model`]).
//!
//! A run builds one [`PassOptions`] (from its run specification) and hands it to every
//! pass; the model keeps no run settings of its own. None of these options changes a
//! number of the forward or the gradients except the two that change the objective
//! (`balance_loss`) or the workload (`routing_skew`): memory policies rebuild what they
//! free with the same kernels, and token chunking only reorders sums inside each
//! expert's weight gradient.
//!
//! [`Model`]: crate::Model

use crate::policy::LayerPolicy;
use std::path::PathBuf;
use ultramoe_kernels::balance::BalanceLoss;

/// Token chunks an expert-parallel MoE layer pipelines against its all-to-all.
pub const DEFAULT_OVERLAP_CHUNKS: usize = 2;

/// Bytes of logits a training step's head forms at once by default (2 MiB: 128 rows of
/// a 4,096-token vocabulary); the whole `[B·T, V]` logits and their gradient never
/// exist. Why not more: the `gemm` crate packs the logits' gradient for the head's
/// weight gradient `dW += dlogitsᵀ · xn` into a buffer of its own that grows with the
/// chunk (measured on a Zen 5, 4k vocabulary: 2.1 MB at 128 rows, 6.3 MB at 256), and
/// that product runs no slower over 16 chunks of 128 rows than over 8 of 256 (10.9 vs
/// 11.0 ms a 2,048-row step).
pub const DEFAULT_HEAD_CHUNK_BYTES: usize = 2 << 20;

/// Most rows of a head chunk, whatever the vocabulary. The `gemm` crate blocks a
/// product's inner dimension in `kc ≥ min(k, 512)` (more on CPUs with larger L1
/// caches): over at most 512 rows `dW += dlogitsᵀ · xn` is one block on every CPU, so
/// the packed copies it makes are at most `rows·(V + H)` floats — a bound the memory
/// plan can hold on any machine — where a small vocabulary's 2 MiB would be thousands
/// of rows.
pub const HEAD_CHUNK_MAX_ROWS: usize = 512;

/// Settings of a forward and backward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct PassOptions {
    /// per decoder layer of the whole model (by global index): what its forward keeps,
    /// recomputes or swaps out for its backward; layers past the end keep everything
    pub policy: Vec<LayerPolicy>,
    /// where swap files go (layers with [`LayerPolicy::swap`], optimizer moments)
    pub swap_dir: PathBuf,
    /// the optimizer moments wait in a swap file from the first layer's forward to the
    /// bottom layer's backward (the trainer moves them; the memory plan counts them)
    pub swap_moments: bool,
    /// token chunks each expert-parallel MoE layer pipelines against its all-to-all
    /// (1: no overlap)
    pub overlap_chunks: usize,
    /// auxiliary balancing loss added to each MoE layer's objective, and its coefficient
    /// (already divided by the micro-batches and ranks that each add a share)
    pub balance_loss: Option<(BalanceLoss, f32)>,
    /// skewed-load workload: Zipf exponent of a fixed router bias (0 = off)
    pub routing_skew: f32,
    /// training: the head forms logits, loss and their gradient this many bytes of
    /// logits at a time, in its backward (0: the whole logits in the forward, kept until
    /// the backward)
    pub head_chunk_bytes: usize,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            policy: vec![],
            swap_dir: std::env::temp_dir(),
            swap_moments: false,
            overlap_chunks: DEFAULT_OVERLAP_CHUNKS,
            balance_loss: None,
            routing_skew: 0.0,
            head_chunk_bytes: DEFAULT_HEAD_CHUNK_BYTES,
        }
    }
}

impl PassOptions {
    /// Rows per head chunk for `n` rows of a `v`-token vocabulary (`None`: the whole
    /// logits at once): `max(2, min(head_chunk_bytes / 4v, 512))` (one row would take
    /// the GEMM's matrix-vector path; see [`HEAD_CHUNK_MAX_ROWS`]), at most `n`.
    pub fn head_chunk_rows(&self, n: usize, v: usize) -> Option<usize> {
        (self.head_chunk_bytes > 0).then(|| (self.head_chunk_bytes / (4 * v.max(1))).min(HEAD_CHUNK_MAX_ROWS).max(2).min(n.max(1)))
    }

    /// The policy of decoder layer `layer` (global index).
    pub fn layer(&self, layer: usize) -> LayerPolicy {
        self.policy.get(layer).copied().unwrap_or_default()
    }

    /// The same options with `policy` for the layers.
    pub fn with_policy(&self, policy: Vec<LayerPolicy>) -> PassOptions {
        PassOptions { policy, ..self.clone() }
    }

    /// True when some layer swaps (not counting layers recomputed whole, which keep
    /// only their input).
    pub fn swaps_layers(&self) -> bool {
        self.policy.iter().any(LayerPolicy::swaps)
    }
}
