//! The key/value cache of one sequence: what decoding keeps per layer so each new token
//! attends to the past without recomputing it.
//!
//! - GQA keeps each position's keys (normed, rotated) and values per key/value head:
//!   `2 · nkv · head_dim` floats per token per layer.
//! - MLA keeps only the normed compressed latent and the rotated shared rotary key:
//!   `kv_lora_rank + qk_rope_head_dim` floats per token per layer (576 at DeepSeek-V3's
//!   shape), and decodes with the up-projections absorbed into the query and the output
//!   ([`crate::attention::MlaAttention::forward_cached`]).

use crate::decoder::AttnBlock;
use crate::model::Model;

/// One layer's cache.
#[derive(Clone, Debug)]
pub enum LayerKv {
    /// grouped-query attention: `k`, `v`, each `[L, nkv·head_dim]`
    Gqa {
        /// keys after the q/k norm and the rotation
        k: Vec<f32>,
        /// values
        v: Vec<f32>,
    },
    /// latent attention: `[L, kv_lora + rope]`, each position's normed latent then its
    /// rotated rotary key
    Mla {
        /// the latent rows
        latent: Vec<f32>,
    },
}

/// The cache of one sequence over the layers a model holds, and how many positions it
/// covers.
#[derive(Clone, Debug)]
pub struct SeqCache {
    /// per held layer, in [`Model::layers`] order
    pub layers: Vec<LayerKv>,
    /// positions cached
    pub len: usize,
}

impl SeqCache {
    /// An empty cache shaped for `model`'s layers.
    pub fn new(model: &Model) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|l| match l.attn {
                AttnBlock::Gqa(_) => LayerKv::Gqa { k: vec![], v: vec![] },
                AttnBlock::Mla(_) => LayerKv::Mla { latent: vec![] },
            })
            .collect();
        SeqCache { layers, len: 0 }
    }

    /// Bytes of cached values (not the spare capacity).
    pub fn bytes(&self) -> usize {
        4 * self
            .layers
            .iter()
            .map(|l| match l {
                LayerKv::Gqa { k, v } => k.len() + v.len(),
                LayerKv::Mla { latent } => latent.len(),
            })
            .sum::<usize>()
    }

    /// Bytes one more cached position costs over `model`'s held layers.
    pub fn bytes_per_token(model: &Model) -> usize {
        4 * model
            .layers
            .iter()
            .map(|l| match &l.attn {
                AttnBlock::Gqa(a) => 2 * a.nkv * a.hd,
                AttnBlock::Mla(a) => a.kv_lora + a.rope_dim,
            })
            .sum::<usize>()
    }
}
