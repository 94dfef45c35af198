//! Model configuration from a Hugging Face `config.json` (deepseek_v3, qwen3_moe, mixtral),
//! resolved into one typed [`ModelConfig`] that the layers read.
//!
//! Field names mirror the checkpoint's config. Both spellings of the RoPE block are
//! accepted: `rope_scaling` (older) and `rope_parameters` (newer, which may also carry
//! `rope_theta`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Supported architectures (`model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// DeepSeek-V3: MLA attention, sigmoid router with correction bias, shared experts
    DeepseekV3,
    /// Qwen3-MoE: GQA with q/k RMSNorm, softmax router
    Qwen3Moe,
    /// Mixtral: GQA, softmax over the top-k logits
    Mixtral,
}

impl Arch {
    /// The `model_type` string.
    pub fn model_type(&self) -> &'static str {
        match self {
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
        }
    }
}

/// RoPE frequency schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `θ^(−2i/d)`
    Default,
    /// positions divided by `factor`
    Linear {
        /// position divisor
        factor: f64,
    },
    /// YaRN (context extension by blending interpolation and extrapolation)
    Yarn {
        /// extension factor
        factor: f64,
        /// `beta_fast`
        beta_fast: f64,
        /// `beta_slow`
        beta_slow: f64,
        /// `mscale` (absent: transformers' default path)
        mscale: Option<f64>,
        /// `mscale_all_dim`
        mscale_all_dim: f64,
        /// `original_max_position_embeddings`
        original_max_position: f64,
        /// explicit `attention_factor`, if given
        attention_factor: Option<f64>,
        /// `truncate` (default true)
        truncate: bool,
    },
}

/// Multi-head latent attention dimensions (DeepSeek-V3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlaDims {
    /// `q_lora_rank` (0: queries projected directly, no low-rank path)
    pub q_lora_rank: usize,
    /// `kv_lora_rank`
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`
    pub qk_nope: usize,
    /// `qk_rope_head_dim`
    pub qk_rope: usize,
    /// `v_head_dim`
    pub v_head: usize,
}

/// Routed-expert settings of the MoE layers.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeDims {
    /// routed experts `E`
    pub n_experts: usize,
    /// experts per token `K`
    pub top_k: usize,
    /// one expert's FFN width
    pub expert_inter: usize,
    /// shared experts (their FFNs are fused into one of width `n_shared · expert_inter`)
    pub n_shared: usize,
    /// renormalise the chosen weights
    pub norm_topk_prob: bool,
    /// weight multiplier
    pub routed_scaling_factor: f32,
    /// expert groups
    pub n_group: usize,
    /// groups per token
    pub topk_group: usize,
}

/// Everything the model needs, resolved and validated.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// architecture
    pub arch: Arch,
    /// vocabulary `V`
    pub vocab_size: usize,
    /// hidden `H`
    pub hidden: usize,
    /// dense FFN width
    pub intermediate: usize,
    /// decoder layers `L`
    pub n_layers: usize,
    /// query heads
    pub n_heads: usize,
    /// key/value heads (GQA)
    pub n_kv_heads: usize,
    /// head dimension (GQA)
    pub head_dim: usize,
    /// MLA dimensions (DeepSeek-V3 only)
    pub mla: Option<MlaDims>,
    /// MoE settings
    pub moe: MoeDims,
    /// which layers are MoE (the rest are dense)
    pub moe_layers: Vec<bool>,
    /// RMSNorm epsilon
    pub rms_norm_eps: f32,
    /// RoPE base
    pub rope_theta: f64,
    /// RoPE schedule
    pub rope_scaling: RopeScaling,
    /// DeepSeek `rope_interleave`
    pub rope_interleave: bool,
    /// positions the RoPE table covers
    pub max_position: usize,
    /// lm_head shares the embedding matrix
    pub tie_word_embeddings: bool,
    /// init std (`initializer_range`)
    pub initializer_range: f32,
    /// Pangu depth-scaled sandwich norm (opt-in `sandwich_norm: true`)
    pub sandwich_norm: bool,
    /// Pangu TinyInit (opt-in `tiny_init: true`)
    pub tiny_init: bool,
    /// the config as read, written back unchanged next to saved checkpoints
    pub raw: Value,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// The largest value a size field may take. Sizes are multiplied together when
/// parameters and activations are laid out: with every field at most `2^24`
/// (and the counts below), no product overflows, and what does not fit in memory is
/// caught by the memory checks with a number rather than by an allocation failure.
const MAX_SIZE: u64 = 1 << 24;

/// Fields that count things rather than measure widths, with their own limits (far above
/// any published model: DeepSeek-V3 has 61 layers and 256 experts).
fn limit(key: &str) -> u64 {
    match key {
        "num_hidden_layers" | "num_attention_heads" | "num_key_value_heads" | "n_shared_experts" => 4096,
        "n_routed_experts" | "num_experts" | "num_local_experts" | "num_experts_per_tok" | "n_group" | "topk_group" => 65536,
        "max_position_embeddings" => 1 << 31,
        _ => MAX_SIZE,
    }
}

fn bounded(key: &str, x: &Value) -> Result<usize> {
    let n = x.as_u64().ok_or_else(|| Error::field(key, format!("must be a non-negative integer, found {x}")))?;
    if n > limit(key) {
        return Err(Error::field(key, format!("{n} exceeds the supported maximum {}", limit(key))));
    }
    Ok(n as usize)
}

fn req_usize(v: &Value, key: &str) -> Result<usize> {
    let x = get(v, key).ok_or_else(|| Error::field(key, "missing (required for this model type)"))?;
    bounded(key, x)
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => bounded(key, x).map(Some),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => Err(Error::field(key, format!("must be a finite number, found {x}"))),
        },
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x.as_bool().map(Some).ok_or_else(|| Error::field(key, format!("must be true or false, found {x}"))),
    }
}

/// The first of several spellings of one field that is present.
fn first_usize(v: &Value, keys: &[&str]) -> Result<Option<usize>> {
    for k in keys {
        if let Some(x) = opt_usize(v, k)? {
            return Ok(Some(x));
        }
    }
    Ok(None)
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(path))?;
        Self::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::msg(format!("not valid JSON: {e}")))?;
        Self::from_value(v)
    }

    /// Validates a parsed config.
    pub fn from_value(v: Value) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::msg("config must be a JSON object"));
        }
        let mt = get(&v, "model_type")
            .and_then(|x| x.as_str())
            .ok_or_else(|| Error::field("model_type", "missing; expected deepseek_v3, qwen3_moe or mixtral"))?;
        let arch = match mt {
            "deepseek_v3" => Arch::DeepseekV3,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mixtral" => Arch::Mixtral,
            other => {
                return Err(Error::field(
                    "model_type",
                    format!("unknown model type `{other}`; supported: deepseek_v3, qwen3_moe, mixtral"),
                ))
            }
        };
        let hidden = req_usize(&v, "hidden_size")?;
        let n_layers = req_usize(&v, "num_hidden_layers")?;
        let n_heads = req_usize(&v, "num_attention_heads")?;
        let vocab_size = req_usize(&v, "vocab_size")?;
        let n_kv_heads = opt_usize(&v, "num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = opt_usize(&v, "head_dim")?.unwrap_or(if n_heads > 0 { hidden / n_heads } else { 0 });
        let intermediate = opt_usize(&v, "intermediate_size")?.unwrap_or(0);
        let n_experts = first_usize(&v, &["n_routed_experts", "num_experts", "num_local_experts"])?
            .ok_or_else(|| Error::field("n_routed_experts", "missing (also looked for num_experts, num_local_experts)"))?;
        let top_k = req_usize(&v, "num_experts_per_tok")?;
        let expert_inter = match arch {
            Arch::Mixtral => intermediate,
            _ => req_usize(&v, "moe_intermediate_size")?,
        };
        let n_shared = match arch {
            Arch::DeepseekV3 => opt_usize(&v, "n_shared_experts")?.unwrap_or(0),
            _ => 0,
        };
        let norm_topk_prob = match arch {
            Arch::Mixtral => true,
            _ => opt_bool(&v, "norm_topk_prob")?.unwrap_or(arch == Arch::DeepseekV3),
        };
        let routed_scaling_factor = match arch {
            Arch::DeepseekV3 => opt_f64(&v, "routed_scaling_factor")?.unwrap_or(1.0) as f32,
            _ => 1.0,
        };
        let (n_group, topk_group) = match arch {
            Arch::DeepseekV3 => (opt_usize(&v, "n_group")?.unwrap_or(1), opt_usize(&v, "topk_group")?.unwrap_or(1)),
            _ => (1, 1),
        };
        if arch == Arch::DeepseekV3 {
            if let Some(s) = get(&v, "scoring_func").and_then(|x| x.as_str()) {
                if s != "sigmoid" {
                    return Err(Error::field("scoring_func", format!("`{s}` is not supported for deepseek_v3 (sigmoid only)")));
                }
            }
        }
        let moe_layers: Vec<bool> = match arch {
            Arch::DeepseekV3 => {
                let k = opt_usize(&v, "first_k_dense_replace")?.unwrap_or(0);
                let freq = opt_usize(&v, "moe_layer_freq")?.unwrap_or(1).max(1);
                (0..n_layers).map(|i| i >= k && i % freq == 0).collect()
            }
            Arch::Qwen3Moe => {
                let step = opt_usize(&v, "decoder_sparse_step")?.unwrap_or(1);
                let only: Vec<usize> = match get(&v, "mlp_only_layers") {
                    None => vec![],
                    Some(x) => x
                        .as_array()
                        .and_then(|a| a.iter().map(|i| i.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| Error::field("mlp_only_layers", "must be a list of layer indices"))?,
                };
                (0..n_layers).map(|i| !only.contains(&i) && n_experts > 0 && step > 0 && (i + 1) % step == 0).collect()
            }
            Arch::Mixtral => vec![true; n_layers],
        };
        let mla = if arch == Arch::DeepseekV3 {
            Some(MlaDims {
                q_lora_rank: opt_usize(&v, "q_lora_rank")?.unwrap_or(0),
                kv_lora_rank: req_usize(&v, "kv_lora_rank")?,
                qk_nope: req_usize(&v, "qk_nope_head_dim")?,
                qk_rope: req_usize(&v, "qk_rope_head_dim")?,
                v_head: req_usize(&v, "v_head_dim")?,
            })
        } else {
            None
        };
        // RoPE: rope_parameters (new) or rope_scaling (old); theta may live in either place.
        let rope_block = get(&v, "rope_parameters").or_else(|| get(&v, "rope_scaling")).cloned();
        let rope_theta = match rope_block.as_ref().and_then(|b| get(b, "rope_theta")).and_then(|x| x.as_f64()) {
            Some(t) => t,
            None => opt_f64(&v, "rope_theta")?.unwrap_or(10000.0),
        };
        let max_position = opt_usize(&v, "max_position_embeddings")?.unwrap_or(4096);
        let rope_scaling = match &rope_block {
            None => RopeScaling::Default,
            Some(b) => parse_rope_block(b, max_position).map_err(|e| Error {
                field: e.field.map(|f| format!("rope_parameters.{f}")),
                ..e
            })?,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden,
            intermediate,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            mla,
            moe: MoeDims {
                n_experts,
                top_k,
                expert_inter,
                n_shared,
                norm_topk_prob,
                routed_scaling_factor,
                n_group,
                topk_group,
            },
            moe_layers,
            rms_norm_eps: opt_f64(&v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            rope_interleave: arch == Arch::DeepseekV3 && opt_bool(&v, "rope_interleave")?.unwrap_or(true),
            max_position,
            tie_word_embeddings: opt_bool(&v, "tie_word_embeddings")?.unwrap_or(false),
            initializer_range: opt_f64(&v, "initializer_range")?.unwrap_or(0.02) as f32,
            sandwich_norm: opt_bool(&v, "sandwich_norm")?.unwrap_or(false),
            tiny_init: opt_bool(&v, "tiny_init")?.unwrap_or(false),
            raw: v,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let positive = |f: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(Error::field(f, format!("must be a finite positive number, found {x}")))
            }
        };
        positive("rms_norm_eps", self.rms_norm_eps as f64)?;
        positive("rope_theta", self.rope_theta)?;
        positive("routed_scaling_factor", self.moe.routed_scaling_factor as f64)?;
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(Error::field("initializer_range", format!("must be a finite non-negative number, found {}", self.initializer_range)));
        }
        match &self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => positive("rope_parameters.factor", *factor)?,
            RopeScaling::Yarn { factor, beta_fast, beta_slow, original_max_position, attention_factor, .. } => {
                positive("rope_parameters.factor", *factor)?;
                positive("rope_parameters.beta_fast", *beta_fast)?;
                positive("rope_parameters.beta_slow", *beta_slow)?;
                positive("rope_parameters.original_max_position_embeddings", *original_max_position)?;
                if let Some(a) = attention_factor {
                    positive("rope_parameters.attention_factor", *a)?;
                }
            }
        }
        // Expert matrices are laid out one by one: bound how many there are in all.
        let expert_layers = self.moe_layers.iter().filter(|&&m| m).count();
        if expert_layers * (self.moe.n_experts + self.moe.n_shared) > 1 << 22 {
            return Err(Error::field(
                "n_routed_experts",
                format!("{} experts in each of {expert_layers} MoE layers exceed the supported 4,194,304 expert matrices", self.moe.n_experts),
            ));
        }
        let pos = |f: &str, x: usize| if x == 0 { Err(Error::field(f, "must be positive")) } else { Ok(()) };
        pos("hidden_size", self.hidden)?;
        pos("num_hidden_layers", self.n_layers)?;
        pos("num_attention_heads", self.n_heads)?;
        pos("vocab_size", self.vocab_size)?;
        pos("num_key_value_heads", self.n_kv_heads)?;
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::field(
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads = {}", self.n_kv_heads, self.n_heads),
            ));
        }
        let m = &self.moe;
        if self.moe_layers.iter().any(|&x| x) {
            pos("n_routed_experts", m.n_experts)?;
            pos("num_experts_per_tok", m.top_k)?;
            pos("moe_intermediate_size", m.expert_inter)?;
            if m.top_k > m.n_experts {
                return Err(Error::field(
                    "num_experts_per_tok",
                    format!("{} exceeds the number of experts ({})", m.top_k, m.n_experts),
                ));
            }
            if m.n_group == 0 || !m.n_experts.is_multiple_of(m.n_group) {
                return Err(Error::field("n_group", format!("{} must divide n_routed_experts = {}", m.n_group, m.n_experts)));
            }
            if m.topk_group == 0 || m.topk_group > m.n_group {
                return Err(Error::field("topk_group", format!("{} must be in 1..={}", m.topk_group, m.n_group)));
            }
            if m.topk_group * (m.n_experts / m.n_group) < m.top_k {
                return Err(Error::field("topk_group", "the chosen groups hold fewer experts than num_experts_per_tok"));
            }
        }
        if self.moe_layers.iter().any(|&x| !x) {
            pos("intermediate_size", self.intermediate)?;
        }
        match &self.mla {
            Some(d) => {
                pos("kv_lora_rank", d.kv_lora_rank)?;
                pos("v_head_dim", d.v_head)?;
                if d.qk_rope % 2 != 0 || d.qk_rope == 0 {
                    return Err(Error::field("qk_rope_head_dim", "must be a positive even number"));
                }
            }
            None => {
                if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
                    return Err(Error::field("head_dim", "must be a positive even number"));
                }
            }
        }
        Ok(())
    }

    /// Query/key head dimension used by attention.
    pub fn qk_head_dim(&self) -> usize {
        self.mla.as_ref().map_or(self.head_dim, |d| d.qk_nope + d.qk_rope)
    }

    /// Value head dimension.
    pub fn v_head_dim(&self) -> usize {
        self.mla.as_ref().map_or(self.head_dim, |d| d.v_head)
    }

    /// Rotary dimensions per head.
    pub fn rope_dim(&self) -> usize {
        self.mla.as_ref().map_or(self.head_dim, |d| d.qk_rope)
    }

    /// Softmax scale `1/√d_qk`, times `mscale²` for DeepSeek YaRN with `mscale_all_dim`
    /// (transformers: `scaling = d^-0.5 · m · m`, `m = 0.1·mscale_all_dim·ln(factor) + 1`).
    pub fn attention_scale(&self) -> f32 {
        let mut s = (self.qk_head_dim() as f64).powf(-0.5);
        if self.arch == Arch::DeepseekV3 {
            if let RopeScaling::Yarn { factor, mscale_all_dim, .. } = self.rope_scaling {
                if mscale_all_dim != 0.0 {
                    let m = yarn_get_mscale(factor, mscale_all_dim);
                    s *= m * m;
                }
            }
        }
        s as f32
    }

    /// Number of MoE layers.
    pub fn n_moe_layers(&self) -> usize {
        self.moe_layers.iter().filter(|&&x| x).count()
    }
}

/// YaRN's attention magnitude correction `0.1·m·ln(s) + 1` for scale `s > 1` (else 1).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse_rope_block(b: &Value, max_position: usize) -> Result<RopeScaling> {
    let kind = get(b, "rope_type").or_else(|| get(b, "type")).and_then(|x| x.as_str()).unwrap_or("default");
    let factor = || opt_f64(b, "factor")?.ok_or_else(|| Error::field("factor", "missing"));
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "yarn" => {
            let mut factor = factor()?;
            let original = opt_f64(b, "original_max_position_embeddings")?;
            // transformers: when the config names the pretraining length, the ratio of the
            // current to the original length is the factor used for the mscale defaults.
            if let Some(o) = original {
                if o > 0.0 && (max_position as f64 / o) > 1.0 && opt_f64(b, "factor")?.is_none() {
                    factor = max_position as f64 / o;
                }
            }
            RopeScaling::Yarn {
                factor,
                beta_fast: opt_f64(b, "beta_fast")?.unwrap_or(32.0),
                beta_slow: opt_f64(b, "beta_slow")?.unwrap_or(1.0),
                mscale: opt_f64(b, "mscale")?,
                mscale_all_dim: opt_f64(b, "mscale_all_dim")?.unwrap_or(0.0),
                original_max_position: original.unwrap_or(max_position as f64),
                attention_factor: opt_f64(b, "attention_factor")?,
                truncate: opt_bool(b, "truncate")?.unwrap_or(true),
            }
        }
        other => return Err(Error::field("rope_type", format!("`{other}` is not supported (default, linear, yarn)"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_mscale_formula() {
        assert!((yarn_get_mscale(40.0, 1.0) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
        assert_eq!(yarn_get_mscale(1.0, 1.0), 1.0);
    }
}
