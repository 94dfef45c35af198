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

/// Which saved activations are dropped after the forward pass and rebuilt in backward:
/// named sets of the trainer's memory ops (`ultramoe_model::policy`), so a planned
/// recipe is one the trainer runs. The published recipes: Megatron-Core's
/// `--recompute-modules layernorm moe_act` is `norm-act`; DeepSeek-V3's (RMSNorm and the
/// MLA up-projections recomputed, SwiGLU outputs rebuilt from their kept inputs;
/// arXiv 2412.19437 §3.2.3) and Megatron-Core's `mla_up_proj` + `layernorm` + `moe_act`
/// are `norm-act-qkv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recompute {
    /// keep everything
    None,
    /// rebuild the normed copies and the SwiGLU outputs (trainer: `norm+swiglu`)
    NormAct,
    /// `norm-act` and the attention's q, k, v from the (MLA: latent) projections
    /// (trainer: `norm+swiglu+qkv`)
    NormActQkv,
    /// `norm-act`, and keep no attention-core intermediates (trainer:
    /// `norm+swiglu+attention`)
    Selective,
    /// keep only each layer's input; rerun the whole layer forward in backward
    Full,
}

/// The trainer's memory ops a [`Recompute`] turns on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecomputeOps {
    /// normed copies
    pub norm: bool,
    /// SwiGLU outputs
    pub swiglu: bool,
    /// the attention core's forward (its intermediates)
    pub attention: bool,
    /// q, k, v
    pub qkv: bool,
    /// the whole layer
    pub full: bool,
}

impl Recompute {
    /// All policies, most memory first.
    pub const ALL: [Recompute; 5] = [Recompute::None, Recompute::NormAct, Recompute::Selective, Recompute::NormActQkv, Recompute::Full];

    /// Parses a [`Recompute::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The same policy in the trainer's vocabulary of memory ops
    /// (`ultramoe_model::policy`): what `train --plan` runs and what the planner prices.
    pub fn policy(&self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::NormAct => "norm+swiglu",
            Recompute::NormActQkv => "norm+swiglu+qkv",
            Recompute::Selective => "norm+swiglu+attention",
            Recompute::Full => "full",
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::NormAct => "norm-act",
            Recompute::NormActQkv => "norm-act-qkv",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }

    /// Every name, for messages.
    pub fn names() -> String {
        Self::ALL.map(|r| r.name()).join(", ")
    }

    /// The ops it turns on.
    pub fn ops(&self) -> RecomputeOps {
        let policy = self.policy();
        let has = |op: &str| policy.split('+').any(|o| o == op);
        RecomputeOps { norm: has("norm"), swiglu: has("swiglu"), attention: has("attention"), qkv: has("qkv"), full: has("full") }
    }
}

/// Bytes per stored activation element: `gemm_input` for tensors a GEMM reads in
/// backward (and SwiGLU inputs), `expert_output` for the routed experts' outputs the
/// combine's routing-weight gradient reads, `other` for the rest.
///
/// FP8 training (DeepSeek-V3's recipe, arXiv 2412.19437 §3.3.2) caches the GEMM inputs
/// as the FP8 copies the forward GEMMs consumed and the SwiGLU inputs in FP8; everything
/// else stays BF16. Its dispatch carries each token's routing weights to the experts
/// and returns their gradients (DeepEP's dispatch/combine interface), i.e. the weight
/// multiplies inside the expert, whose recomputed SwiGLU output gives its gradient: no
/// expert output is kept. BF16 recipes (Megatron-Core's unpermute with probabilities)
/// keep them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActivationBytes {
    /// GEMM and SwiGLU inputs
    pub gemm_input: f64,
    /// routed experts' outputs (0: not kept)
    pub expert_output: f64,
    /// everything else
    pub other: f64,
}

impl ActivationBytes {
    /// For a compute data type (`fp8`, `bf16`, `fp16`, `fp32`).
    pub fn of(dtype: &str) -> Self {
        match dtype {
            "fp32" => ActivationBytes { gemm_input: 4.0, expert_output: 4.0, other: 4.0 },
            "fp8" => ActivationBytes { gemm_input: 1.0, expert_output: 0.0, other: 2.0 },
            _ => ActivationBytes { gemm_input: 2.0, expert_output: 2.0, other: 2.0 },
        }
    }
}

/// One tensor a layer keeps for its backward, per token.
#[derive(Clone, Copy, Debug)]
struct Saved {
    elements: usize,
    kind: Stored,
    /// which op frees it (`Kept`: only `full` does)
    freed_by: Freed,
}

/// Which width of [`ActivationBytes`] a tensor is stored at.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stored {
    GemmInput,
    ExpertOutput,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Freed {
    Kept,
    Norm,
    Swiglu,
    Qkv,
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
    /// indices in `gemms` of the projections that produce q, k, v from their inputs
    /// (what the `qkv` op reruns)
    pub qkv_gemms: Vec<usize>,
    /// MLA: latent elements per token kept as the latent norms' inputs (`q_lora +
    /// kv_lora + rope`); GQA 0
    pub latents: usize,
    /// MLA: their normed copies (`q_lora + kv_lora`); GQA 0
    pub latents_normed: usize,
    /// q, k, v elements per token (MLA `nh·(2·d_qk + d_v)`, GQA `(nh + 2·kv)·hd`)
    pub qkv_elements: usize,
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
    /// multi-token-prediction modules trained with the model (DeepSeek-V3's
    /// `num_nextn_predict_layers`): each one more MoE decoder layer and one more pass
    /// of the shared output head, on the last pipeline stage
    pub mtp_layers: usize,
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
    /// group-limited routing (DeepSeek-V3's node-limited routing): the experts form
    /// `n_group` groups and a token's experts lie in at most `topk_group` of them
    /// (`(1, 1)`: no limit)
    pub route_groups: (usize, usize),
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
                let mut qkv_gemms = vec![];
                if d.q_lora_rank > 0 {
                    gemms.push((h, d.q_lora_rank));
                    qkv_gemms.push(gemms.len());
                    gemms.push((d.q_lora_rank, nh * dqk));
                } else {
                    gemms.push((h, nh * dqk));
                }
                gemms.push((h, d.kv_lora_rank + d.qk_rope));
                qkv_gemms.push(gemms.len());
                gemms.push((d.kv_lora_rank, nh * (d.qk_nope + d.v_head)));
                gemms.push((nh * d.v_head, h));
                AttentionShape {
                    gemms,
                    heads: nh,
                    d_qk: dqk,
                    d_v: d.v_head,
                    qkv_gemms,
                    latents: d.q_lora_rank + d.kv_lora_rank + d.qk_rope,
                    latents_normed: d.q_lora_rank + d.kv_lora_rank,
                    qkv_elements: nh * (2 * dqk + d.v_head),
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
                    qkv_gemms: vec![0],
                    latents: 0,
                    latents_normed: 0,
                    qkv_elements: (nh + 2 * kv) * hd,
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
            mtp_layers: cfg.raw.get("num_nextn_predict_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
            moe_layers,
            attention,
            dense_inter: cfg.intermediate,
            experts: m.n_experts,
            top_k: m.top_k,
            expert_inter: m.expert_inter,
            shared_inter,
            route_groups: (m.n_group.max(1), m.topk_group.max(1)),
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

    /// What one layer keeps per token for backward with nothing recomputed (before
    /// tensor-parallel splitting), for a MoE layer (`moe`) or a dense one:
    ///
    /// | tensor | elements | freed by |
    /// |---|---|---|
    /// | layer input `x` (first norm's input) | `H` | `full` only |
    /// | normed `x` | `H` | `norm` |
    /// | MLA latents `c_q`, `c_kv` (+ rotary key) | `q_lora + kv_lora + rope` | `full` only |
    /// | their normed copies | `q_lora + kv_lora` | `norm` |
    /// | q, k, v | `nh·(2·d_qk + d_v)` (GQA `(nh + 2·kv)·hd`) | `qkv` |
    /// | attention output | `nh·d_v` | `full` only |
    /// | softmax statistics (fp32) | `2·nh` | `full` only |
    /// | residual (second norm's input), normed copy | `H`, `H` | —, `norm` |
    /// | router scores | `E` | — |
    /// | routed rows, gate/up outputs, SwiGLU outputs, expert outputs | `K·H`, `K·2I`, `K·I`, `K·H` | —, —, `swiglu`, — |
    /// | shared experts' gate/up and SwiGLU outputs | `2·I_s`, `I_s` | —, `swiglu` |
    /// | dense FFN's gate/up and SwiGLU outputs | `2·I_d`, `I_d` | —, `swiglu` |
    fn saved(&self, moe: bool) -> Vec<Saved> {
        use {Freed::*, Stored::*};
        let h = self.hidden;
        let a = &self.attention;
        let t = |elements, kind, freed_by| Saved { elements, kind, freed_by };
        let mut v = vec![t(h, Other, Kept), t(h, GemmInput, Norm)];
        v.push(t(a.latents, Other, Kept));
        v.push(t(a.latents_normed, GemmInput, Norm));
        v.push(t(a.qkv_elements, Other, Qkv));
        v.push(t(a.heads * a.d_v, GemmInput, Kept));
        v.push(t(2 * a.heads, Other, Kept));
        v.push(t(h, Other, Kept));
        v.push(t(h, GemmInput, Norm));
        if moe {
            let (k, i) = (self.top_k, self.expert_inter);
            v.push(t(self.experts, Other, Kept));
            v.push(t(k * h, GemmInput, Kept));
            v.push(t(k * 2 * i + 2 * self.shared_inter, GemmInput, Kept));
            v.push(t(k * i + self.shared_inter, GemmInput, Swiglu));
            v.push(t(k * h, ExpertOutput, Kept));
        } else {
            v.push(t(2 * self.dense_inter, GemmInput, Kept));
            v.push(t(self.dense_inter, GemmInput, Swiglu));
        }
        v
    }

    /// Activation elements per token one layer keeps for backward under `policy`
    /// (before tensor-parallel splitting); see [`ModelCost::saved_bytes`].
    pub fn saved_elements(&self, moe: bool, policy: Recompute) -> f64 {
        self.saved_bytes(moe, policy, ActivationBytes { gemm_input: 1.0, expert_output: 1.0, other: 1.0 })
    }

    /// Activation bytes per token one layer keeps for backward under `policy` (before
    /// tensor-parallel splitting): the table of `saved` less what the policy frees
    /// (`full`: the layer input only).
    pub fn saved_bytes(&self, moe: bool, policy: Recompute, bytes: ActivationBytes) -> f64 {
        let ops = policy.ops();
        if ops.full {
            return self.hidden as f64 * bytes.other;
        }
        let width = |kind: Stored| match kind {
            Stored::GemmInput => bytes.gemm_input,
            Stored::ExpertOutput => bytes.expert_output,
            Stored::Other => bytes.other,
        };
        self.saved(moe)
            .iter()
            .filter(|s| match s.freed_by {
                Freed::Kept => true,
                Freed::Norm => !ops.norm,
                Freed::Swiglu => !ops.swiglu,
                Freed::Qkv => !ops.qkv,
            })
            .map(|s| s.elements as f64 * width(s.kind))
            .sum()
    }

    /// Forward FLOPs per token of the projections that rebuild q, k, v (MLA: the
    /// up-projections from the latents; GQA: the fused q/k/v projection).
    pub fn qkv_flops(&self) -> f64 {
        self.attention.qkv_gemms.iter().map(|&g| 2.0 * (self.attention.gemms[g].0 * self.attention.gemms[g].1) as f64).sum()
    }

    /// Elements per token the `norm` op rereads and rewrites (every RMSNorm's input).
    pub fn norm_elements(&self) -> f64 {
        (2 * self.hidden + self.attention.latents_normed) as f64
    }

    /// Elements per token the `swiglu` op reads (gate and up) and writes.
    pub fn swiglu_elements(&self, moe: bool) -> f64 {
        3.0 * if moe { (self.top_k * self.expert_inter + self.shared_inter) as f64 } else { self.dense_inter as f64 }
    }
}
