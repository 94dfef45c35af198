//! What a model costs per token, from its `config.json`: parameters by kind, the GEMMs of
//! each layer (as `(in, out)` widths per token), the attention core, and the activation
//! elements each layer keeps for its backward pass under each recomputation policy.
//!
//! FLOPs count a multiply-add as 2. A linear layer `in → out` costs `2·in·out` per token
//! forward and twice that backward (input and weight gradients). The attention core of a
//! causal sequence of `s` tokens costs `2·h·(d_qk + d_v)·(s+1)/2` per token forward
//! (scores and weighted values over, on average, half the sequence).

use serde::Serialize;
use ultramoe_config::ModelConfig;

/// Which saved activations are dropped after the forward pass and rebuilt in backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// keep everything
    None,
    /// drop norms' outputs, the SwiGLU activation and the attention core's
    /// intermediates (cheap to rebuild); keep every GEMM input
    Selective,
    /// keep only each layer's input; rerun the whole layer forward in backward
    Full,
}

impl Recompute {
    /// All policies, cheapest memory last.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

    /// Parses `none`, `selective` or `full`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Recompute::None),
            "selective" => Some(Recompute::Selective),
            "full" => Some(Recompute::Full),
            _ => None,
        }
    }

    /// The same policy in the trainer's vocabulary of memory ops
    /// (`ultramoe_model::policy`): what `train --plan` runs and what the planner prices.
    pub fn policy(&self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "norm+swiglu+attention",
            Recompute::Full => "full",
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

/// The attention of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionShape {
    /// `(in, out)` of each projection (tensor-parallel: every one is split `1/TP`)
    pub gemms: Vec<(usize, usize)>,
    /// heads
    pub heads: usize,
    /// query/key width per head
    pub d_qk: usize,
    /// value width per head
    pub d_v: usize,
    /// activation elements per token kept for backward: GEMM inputs and outputs that
    /// backward reads
    pub saved_gemm_io: usize,
    /// elements per token recomputable cheaply (norm outputs, RoPE, softmax statistics)
    pub saved_cheap: usize,
}

/// A model's per-token costs.
#[derive(Clone, Debug, Serialize)]
pub struct ModelCost {
    /// hidden `H`
    pub hidden: usize,
    /// vocabulary `V`
    pub vocab: usize,
    /// decoder layers
    pub layers: usize,
    /// of which MoE
    pub moe_layers: usize,
    /// attention (same shape in every layer)
    pub attention: AttentionShape,
    /// dense FFN width
    pub dense_inter: usize,
    /// routed experts `E`
    pub experts: usize,
    /// experts per token `K`
    pub top_k: usize,
    /// one expert's width
    pub expert_inter: usize,
    /// shared experts' total width
    pub shared_inter: usize,
    /// embedding parameters (`V·H`)
    pub embed_params: f64,
    /// output head parameters (0 when tied)
    pub head_params: f64,
    /// attention, norms, routers and dense/shared FFNs of all layers
    pub dense_params: f64,
    /// routed experts of all layers
    pub expert_params: f64,
}

impl ModelCost {
    /// Costs of the model `cfg` describes.
    pub fn new(cfg: &ModelConfig) -> Self {
        let h = cfg.hidden;
        let nh = cfg.n_heads;
        let attention = match &cfg.mla {
            Some(d) => {
                let dqk = d.qk_nope + d.qk_rope;
                let mut gemms = vec![];
                if d.q_lora_rank > 0 {
                    gemms.push((h, d.q_lora_rank));
                    gemms.push((d.q_lora_rank, nh * dqk));
                } else {
                    gemms.push((h, nh * dqk));
                }
                gemms.push((h, d.kv_lora_rank + d.qk_rope));
                gemms.push((d.kv_lora_rank, nh * (d.qk_nope + d.v_head)));
                gemms.push((nh * d.v_head, h));
                AttentionShape {
                    gemms,
                    heads: nh,
                    d_qk: dqk,
                    d_v: d.v_head,
                    // inputs of each projection and q, k, v, the attention output
                    saved_gemm_io: h + d.q_lora_rank + d.kv_lora_rank + nh * (2 * dqk + d.v_head) + nh * d.v_head,
                    saved_cheap: h + d.q_lora_rank + d.kv_lora_rank + d.qk_rope + 2 * nh,
                }
            }
            None => {
                let hd = cfg.head_dim;
                let kv = cfg.n_kv_heads;
                AttentionShape {
                    gemms: vec![(h, (nh + 2 * kv) * hd), (nh * hd, h)],
                    heads: nh,
                    d_qk: hd,
                    d_v: hd,
                    saved_gemm_io: h + (nh + 2 * kv) * hd + nh * hd,
                    saved_cheap: h + 2 * nh,
                }
            }
        };
        let attn_params: usize = attention.gemms.iter().map(|(i, o)| i * o).sum();
        let m = &cfg.moe;
        let moe_layers = cfg.n_moe_layers();
        let dense_layers = cfg.n_layers - moe_layers;
        let shared_inter = m.n_shared * m.expert_inter;
        let per_moe_replicated = h * m.n_experts + 3 * h * shared_inter;
        let dense_params = (cfg.n_layers * (attn_params + 2 * h) + dense_layers * 3 * h * cfg.intermediate + moe_layers * per_moe_replicated) as f64;
        let expert_params = (moe_layers * m.n_experts * 3 * h * m.expert_inter) as f64;
        let vh = (cfg.vocab_size * h) as f64;
        ModelCost {
            hidden: h,
            vocab: cfg.vocab_size,
            layers: cfg.n_layers,
            moe_layers,
            attention,
            dense_inter: cfg.intermediate,
            experts: m.n_experts,
            top_k: m.top_k,
            expert_inter: m.expert_inter,
            shared_inter,
            embed_params: vh,
            head_params: if cfg.tie_word_embeddings { 0.0 } else { vh },
            dense_params,
            expert_params,
        }
    }

    /// All parameters.
    pub fn params(&self) -> f64 {
        self.embed_params + self.head_params + self.dense_params + self.expert_params
    }

    /// Parameters one token activates (its top-k experts only).
    pub fn active_params(&self) -> f64 {
        let per_expert = (3 * self.hidden * self.expert_inter) as f64;
        self.params() - self.expert_params + (self.moe_layers * self.top_k) as f64 * per_expert
    }

    /// Forward FLOPs per token of one layer's attention projections.
    pub fn attention_gemm_flops(&self) -> f64 {
        self.attention.gemms.iter().map(|(i, o)| 2.0 * (i * o) as f64).sum()
    }

    /// Forward FLOPs per token of one layer's attention core at sequence length `s`.
    pub fn attention_core_flops(&self, s: usize) -> f64 {
        let a = &self.attention;
        2.0 * (a.heads * (a.d_qk + a.d_v)) as f64 * (s as f64 + 1.0) / 2.0
    }

    /// Forward FLOPs per token of one MoE layer's routed experts.
    pub fn routed_flops(&self) -> f64 {
        6.0 * (self.top_k * self.hidden * self.expert_inter) as f64
    }

    /// Forward FLOPs per token of one MoE layer's router and shared experts.
    pub fn moe_replicated_flops(&self) -> f64 {
        2.0 * (self.hidden * self.experts) as f64 + 6.0 * (self.hidden * self.shared_inter) as f64
    }

    /// Forward FLOPs per token of a dense FFN.
    pub fn dense_flops(&self) -> f64 {
        6.0 * (self.hidden * self.dense_inter) as f64
    }

    /// Forward FLOPs per token of the output head.
    pub fn head_flops(&self) -> f64 {
        2.0 * (self.hidden * self.vocab) as f64
    }

    /// Training FLOPs per token of the whole model (forward + backward = 3 × forward,
    /// no recomputation) at sequence length `s`: the MFU numerator.
    pub fn train_flops_per_token(&self, s: usize) -> f64 {
        let dense_layers = self.layers - self.moe_layers;
        let per_layer = self.attention_gemm_flops() + self.attention_core_flops(s);
        let fwd = self.layers as f64 * per_layer
            + dense_layers as f64 * self.dense_flops()
            + self.moe_layers as f64 * (self.routed_flops() + self.moe_replicated_flops())
            + self.head_flops();
        3.0 * fwd
    }

    /// Activation elements per token one layer keeps for backward under `policy`
    /// (before tensor-parallel splitting), for a MoE layer (`moe`) or a dense one.
    pub fn saved_elements(&self, moe: bool, policy: Recompute) -> f64 {
        let h = self.hidden;
        let a = &self.attention;
        let (ffn_io, ffn_cheap) = if moe {
            // per routed copy: permuted input, gate/up output, expert output; the SwiGLU
            // output is cheap; shared experts likewise; router scores
            let k = self.top_k;
            let io = self.experts + k * (h + 2 * self.expert_inter + h) + h + 2 * self.shared_inter;
            (io, h + k * self.expert_inter + self.shared_inter)
        } else {
            (h + 2 * self.dense_inter, h + self.dense_inter)
        };
        match policy {
            Recompute::None => (a.saved_gemm_io + a.saved_cheap + ffn_io + ffn_cheap) as f64,
            Recompute::Selective => (a.saved_gemm_io + ffn_io) as f64,
            Recompute::Full => h as f64,
        }
    }
}
