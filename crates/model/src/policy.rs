//! What each decoder layer keeps from its forward pass for its backward pass.
//!
//! By default a layer keeps every activation its backward reads. A [`LayerPolicy`] frees
//! some of them after the forward and gets them back at the start of the layer's
//! backward, either by recomputing them (the same deterministic kernels on the same
//! inputs, so the same bits) or by reading them back from a swap file
//! ([`crate::swap`]). The op classes, cheapest first:
//!
//! | class       | freed after forward                                  | rebuilt in backward from            |
//! |-------------|------------------------------------------------------|-------------------------------------|
//! | `norm`      | normed copies `xn₁`, `xn₂` (MLA: normed latents too)  | the norms' inputs (one RMSNorm pass) |
//! | `swiglu`    | `silu(g) ⊙ u` of dense, shared and routed experts    | the kept gate/up projections        |
//! | `attention` | the attention core's probabilities `B·nh·T²` (never kept whole) | `q`, `k`, `v`, block by block inside the core's backward (flash-attention style) |
//! | `ffn`       | the whole feed-forward block's set (MoE: routing, rows, expert and shared-expert activations; the load statistics stay) | the block's forward again (under expert parallelism with its all-to-alls) |
//! | `experts`   | a MoE layer's routed rows `R·H` and expert outputs `R·H` (one rank only: under expert parallelism they come from other ranks and stay) | the token permutation and the experts' down-projection |
//! | `qkv`       | `q`, `k`, `v` (GQA: raw and normed q/k too)            | the projections (MLA: the up-projections from the latents) |
//! | `full`      | everything but the layer's input                      | the layer's whole forward           |
//! | `swap`      | whatever is still kept goes to the swap file          | a read, prefetched while the layer above computes its backward |

use serde::{Deserialize, Serialize};

/// The memory policy of one decoder layer (all off: keep everything).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPolicy {
    /// recompute the whole layer (only its input is kept; of the other fields only
    /// `attention` still applies, to the rerun)
    #[serde(default)]
    pub full: bool,
    /// rebuild normed copies from the norms' inputs
    #[serde(default)]
    pub norm: bool,
    /// rebuild SwiGLU outputs from the gate/up projections
    #[serde(default)]
    pub swiglu: bool,
    /// keep no attention probabilities: the core's backward recomputes them block by
    /// block from q, k
    #[serde(default)]
    pub attention: bool,
    /// rebuild q, k, v by the attention's input projections
    #[serde(default)]
    pub qkv: bool,
    /// rebuild a MoE layer's routed rows and expert outputs (one rank only)
    #[serde(default)]
    pub experts: bool,
    /// rerun the whole feed-forward block (dense or MoE) in backward
    #[serde(default)]
    pub ffn: bool,
    /// move what the layer still keeps to the swap file until its backward
    #[serde(default)]
    pub swap: bool,
}

/// One choice a policy can make for a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryOp {
    /// see [`LayerPolicy::norm`]
    Norm,
    /// see [`LayerPolicy::swiglu`]
    Swiglu,
    /// see [`LayerPolicy::attention`]
    Attention,
    /// see [`LayerPolicy::qkv`]
    Qkv,
    /// see [`LayerPolicy::experts`]
    Experts,
    /// see [`LayerPolicy::ffn`]
    Ffn,
    /// see [`LayerPolicy::swap`]
    Swap,
    /// see [`LayerPolicy::full`]
    Full,
}

impl MemoryOp {
    /// Every op, cheapest class first.
    pub const ALL: [MemoryOp; 8] = [
        MemoryOp::Norm,
        MemoryOp::Swiglu,
        MemoryOp::Attention,
        MemoryOp::Qkv,
        MemoryOp::Experts,
        MemoryOp::Ffn,
        MemoryOp::Swap,
        MemoryOp::Full,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MemoryOp::Norm => "norm",
            MemoryOp::Swiglu => "swiglu",
            MemoryOp::Attention => "attention",
            MemoryOp::Qkv => "qkv",
            MemoryOp::Experts => "experts",
            MemoryOp::Ffn => "ffn",
            MemoryOp::Swap => "swap",
            MemoryOp::Full => "full",
        }
    }

    /// The op named `name`.
    pub fn from_name(name: &str) -> Option<MemoryOp> {
        MemoryOp::ALL.into_iter().find(|o| o.name() == name)
    }
}

impl LayerPolicy {
    /// Whether `op` is on.
    pub fn has(&self, op: MemoryOp) -> bool {
        match op {
            MemoryOp::Norm => self.norm,
            MemoryOp::Swiglu => self.swiglu,
            MemoryOp::Attention => self.attention,
            MemoryOp::Qkv => self.qkv,
            MemoryOp::Experts => self.experts,
            MemoryOp::Ffn => self.ffn,
            MemoryOp::Swap => self.swap,
            MemoryOp::Full => self.full,
        }
    }

    /// Turns `op` on or off.
    pub fn set_to(&mut self, op: MemoryOp, on: bool) {
        let field = match op {
            MemoryOp::Norm => &mut self.norm,
            MemoryOp::Swiglu => &mut self.swiglu,
            MemoryOp::Attention => &mut self.attention,
            MemoryOp::Qkv => &mut self.qkv,
            MemoryOp::Experts => &mut self.experts,
            MemoryOp::Ffn => &mut self.ffn,
            MemoryOp::Swap => &mut self.swap,
            MemoryOp::Full => &mut self.full,
        };
        *field = on;
    }

    /// Turns `op` on.
    pub fn set(&mut self, op: MemoryOp) {
        self.set_to(op, true);
    }

    /// True when the layer writes its saved set to the swap file (`swap`, and not
    /// recomputed whole: such a layer keeps only its input).
    pub fn swaps(&self) -> bool {
        self.swap && !self.full
    }

    /// True when the layer keeps everything.
    pub fn keeps_all(&self) -> bool {
        *self == LayerPolicy::default()
    }

    /// The ops that are on, e.g. `norm+swiglu+swap` (`keep` when none).
    pub fn describe(&self) -> String {
        let on: Vec<&str> = MemoryOp::ALL.into_iter().filter(|&o| self.has(o)).map(MemoryOp::name).collect();
        if on.is_empty() {
            "keep".to_string()
        } else {
            on.join("+")
        }
    }
}

/// Parses a policy for `layers` decoder layers from items like `norm+swiglu` (every
/// layer), `attention:0,1` or `swap:0-2` (those layers), `full:all`, separated by
/// spaces or semicolons. `none` (or an empty text) keeps everything.
pub fn parse_policy(text: &str, layers: usize) -> Result<Vec<LayerPolicy>, String> {
    let mut out = vec![LayerPolicy::default(); layers];
    for item in text.split([' ', ';']).map(str::trim).filter(|s| !s.is_empty()) {
        if item == "none" {
            continue;
        }
        let (ops, which) = item.split_once(':').unwrap_or((item, "all"));
        let which = parse_layer_list(which, layers)?;
        for op in ops.split('+') {
            let op = MemoryOp::from_name(op.trim()).ok_or_else(|| {
                let names: Vec<&str> = MemoryOp::ALL.iter().map(|o| o.name()).collect();
                format!("`{item}`: unknown op `{op}` (expected one of {})", names.join(", "))
            })?;
            for &l in &which {
                out[l].set(op);
            }
        }
    }
    Ok(out)
}

/// `all`, or layer indices and ranges below `layers`: `0,2,5-7`.
pub fn parse_layer_list(text: &str, layers: usize) -> Result<Vec<usize>, String> {
    if text == "all" {
        return Ok((0..layers).collect());
    }
    let mut out = vec![];
    for part in text.split(',').map(str::trim) {
        let bad = || format!("`{text}`: expected `all` or layer indices like 0,2,5-7");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().map_err(|_| bad())?, b.parse::<usize>().map_err(|_| bad())?),
            None => {
                let a = part.parse::<usize>().map_err(|_| bad())?;
                (a, a)
            }
        };
        if let Some(l) = [a, b].into_iter().find(|&l| l >= layers) {
            return Err(format!("layer {l} does not exist (the model has {layers})"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A policy as text [`parse_policy`] reads back: each distinct layer setting with its
/// layers, e.g. `norm+swiglu:0-3 swap:0,1`… (grouped per op), `none` when all keep.
pub fn describe_policy(policy: &[LayerPolicy]) -> String {
    let items: Vec<String> = MemoryOp::ALL
        .into_iter()
        .filter_map(|op| {
            let layers: Vec<usize> = (0..policy.len()).filter(|&l| policy[l].has(op)).collect();
            (!layers.is_empty()).then(|| {
                if layers.len() == policy.len() {
                    op.name().to_string()
                } else {
                    format!("{}:{}", op.name(), layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","))
                }
            })
        })
        .collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        let p = parse_policy("norm+swiglu attention:0,1 swap:0-1;full:3 experts:2", 4).unwrap();
        assert!(p.iter().all(|l| l.norm && l.swiglu));
        assert!(p[0].attention && p[1].attention && !p[2].attention);
        assert!(p[0].swap && p[1].swap && !p[2].swap && p[3].full && p[2].experts && !p[1].experts);
        assert_eq!(parse_policy(&describe_policy(&p), 4).unwrap(), p);
        assert_eq!(describe_policy(&parse_policy("none", 2).unwrap()), "none");
        assert!(parse_policy("norm:4", 4).unwrap_err().contains("layer 4 does not exist"));
        assert!(parse_policy("nrom", 4).unwrap_err().contains("unknown op `nrom`"));
        assert!(parse_policy("swap:x", 4).unwrap_err().contains("expected `all`"));
    }
}
