//! The whole causal LM: embedding → decoder layers → final RMSNorm → lm_head, with the
//! parameter layout built from the config, and explicit forward/backward.

use crate::attention::{Ctx, GqaAttention, MlaAttention};
use crate::moe::dispatcher::ExpertExchange;
use crate::moe::layer::MoeCtx;
use crate::pass::PassOptions;
use crate::stage::Stage;
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::decoder::{AttnBlock, DecoderLayer, FfnBlock, LayerSaved};
use crate::mlp::Mlp;
use crate::moe::dispatcher::TokenDispatcher;
use crate::moe::experts::GroupedExperts;
use crate::moe::experts::ExpertNames;
use crate::moe::layer::MoeLayer;
use crate::moe::placement::Placement;
use crate::moe::router::Router;
use crate::params::{fuse, Init, ParamLayout, Slot};
use crate::tensor_parallel::TensorParallel;
use crate::tensor_ops::take_cols;
use crate::swap::{Prefetch, SwapFile, SwapTicket};
use std::sync::Arc;
use ultramoe_dist::ProcessGroup;
use ultramoe_kernels::embedding::{embedding_backward, embedding_forward};
use ultramoe_kernels::gemm::{linear, linear_grad};
use ultramoe_kernels::loss::{cross_entropy_forward, cross_entropy_fused_backward, cross_entropy_fused_backward_into, IGNORE};
use ultramoe_kernels::norm::{rmsnorm_backward, rmsnorm_forward};
use crate::config::yarn_get_mscale;
use ultramoe_kernels::rope::{default_inv_freq, yarn_inv_freq, RopeLayout, RopeTable, Yarn};
use ultramoe_kernels::router::{RouterSpec, ScoreFn};

/// A model, or one rank's share of it: its config, parameter layout and layer structure.
/// Weights live outside, in a flat buffer laid out by [`Model::layout`], so the same
/// model serves any number of weight/gradient buffers. A share holds the decoder layers
/// of its pipeline stage ([`Stage`]) and, under expert parallelism, its slots of every
/// MoE layer's experts; how a pass runs is given per pass ([`PassOptions`]).
#[derive(Clone, Debug)]
pub struct Model {
    /// configuration
    pub cfg: ModelConfig,
    /// parameter table
    pub layout: ParamLayout,
    /// which layers this rank holds (the whole model without pipeline parallelism)
    pub stage: Stage,
    /// `embed_tokens`, `[V, H]`, when this rank holds the first stage
    pub embed: Option<Slot>,
    /// the decoder layers held, in model order
    pub layers: Vec<DecoderLayer>,
    /// the model-wide index of each held layer
    pub layer_ids: Vec<usize>,
    /// final norm gain, when this rank holds the last stage
    pub final_norm: Option<Slot>,
    /// `lm_head`, `[V, H]` (the embedding's slot when tied), when this rank holds the
    /// last stage
    pub lm_head: Option<Slot>,
    /// RoPE tables
    pub rope: RopeTable,
    /// the expert-parallel group this rank's experts belong to (`None`: one rank holds
    /// every expert)
    pub ep: Option<Arc<dyn ProcessGroup>>,
    /// where the expert-parallel exchanges run (with more than one expert-parallel rank)
    pub exchange: Option<Arc<ExpertExchange>>,
    /// the tensor-parallel group this rank's attention, dense FFN and shared experts are
    /// split over (`None`: not split)
    pub tp: Option<Arc<TensorParallel>>,
}

/// What a rank's share of a model is: its pipeline stage, its expert-parallel group and
/// which experts it holds, and how its exchanges cross nodes.
#[derive(Clone)]
pub struct Share {
    /// the decoder layers held
    pub stage: Stage,
    /// the expert-parallel group (`None`: every expert here)
    pub ep: Option<Arc<dyn ProcessGroup>>,
    /// which experts each expert-parallel rank holds
    pub experts: ExpertSlots,
    /// node of each expert-parallel rank (empty: one node)
    pub ep_nodes: Vec<usize>,
    /// hierarchical all-to-all over those nodes
    pub hierarchical: bool,
    /// the tensor-parallel group (`None`: nothing split)
    pub tp: Option<Arc<TensorParallel>>,
}

/// How experts are placed on the expert-parallel ranks.
#[derive(Clone, Debug)]
pub enum ExpertSlots {
    /// consecutive blocks, with this many extra slots per rank for copies
    Contiguous {
        /// redundant slots per rank
        redundant: usize,
    },
    /// as given, one placement per MoE layer of the whole model (a resumed run's)
    Placed(Vec<Placement>),
}

impl Share {
    /// The whole model on one rank.
    pub fn whole(cfg: &ModelConfig) -> Share {
        Share { stage: Stage::whole(cfg.n_layers), ep: None, experts: ExpertSlots::Contiguous { redundant: 0 }, ep_nodes: vec![], hierarchical: false, tp: None }
    }
}

/// One decoder layer's part of a forward pass.
pub enum LayerState {
    /// every activation the backward needs
    Kept(Box<LayerSaved>),
    /// only the layer's input: the backward reruns the layer's forward first (the same
    /// deterministic kernels, so the same numbers), plus what the caller reads
    Recompute {
        /// the layer's input `[N, H]`
        x: Vec<f32>,
        /// routing statistics of a MoE layer: (per expert, per slot, auxiliary loss)
        moe: Option<(Vec<usize>, Vec<usize>, f32)>,
    },
    /// the saved set with its buffers in the swap file (the routing stays)
    Swapped(Box<LayerSaved>, SwapTicket),
}

impl LayerState {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            LayerState::Kept(s) | LayerState::Swapped(s, _) => s.bytes(),
            LayerState::Recompute { x, .. } => 4 * x.len(),
        }
    }

    /// (per expert, per slot, aux loss) of a MoE layer.
    fn moe(&self) -> Option<(Vec<usize>, Vec<usize>, f32)> {
        match self {
            LayerState::Kept(s) | LayerState::Swapped(s, _) => s.ffn.moe_stats(),
            LayerState::Recompute { moe, .. } => moe.clone(),
        }
    }
}

/// What one model chunk's forward (a range of decoder layers) keeps for its backward.
pub struct ChunkForward {
    /// batch rows
    pub b: usize,
    /// sequence length
    pub t: usize,
    /// which chunk of this rank
    pub chunk: usize,
    /// packed rows: each token's position within its document (see [`Ctx::positions`])
    pub positions: Option<Vec<u32>>,
    /// per-layer saved activations (or inputs, for recomputed layers)
    pub layers: Vec<LayerState>,
    swap: Option<SwapFile>,
}

impl ChunkForward {
    /// Tokens routed to each expert, per MoE layer of the chunk (`[n_moe_layers][E]`).
    pub fn expert_counts(&self) -> Vec<Vec<usize>> {
        self.layers.iter().filter_map(|l| l.moe().map(|m| m.0)).collect()
    }

    /// Tokens routed to each expert slot (all ranks' slots, `[n_moe_layers][P·S]`): with
    /// replicas, how each expert's tokens were shared out.
    pub fn slot_counts(&self) -> Vec<Vec<usize>> {
        self.layers.iter().filter_map(|l| l.moe().map(|m| m.1)).collect()
    }

    /// Sum of the chunk's MoE layers' auxiliary balancing losses.
    pub fn aux_loss(&self) -> f32 {
        self.layers.iter().filter_map(|l| l.moe().map(|m| m.2)).sum()
    }

    /// Bytes of saved activations held in memory (not what is in the swap file).
    pub fn activation_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }
}

/// What the head's forward (final norm, `lm_head`) keeps.
pub struct HeadForward {
    /// logits `[B·T, V]` (empty when the backward forms them chunk by chunk)
    pub logits: Vec<f32>,
    x: Vec<f32>,
    rstd: Vec<f32>,
    xn: Vec<f32>,
    /// rows per chunk of the backward's logits (0: the whole `logits` above)
    chunk_rows: usize,
}

impl HeadForward {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.logits.len() + self.x.len() + self.rstd.len() + self.xn.len())
    }
}

/// Everything a whole model's forward pass keeps for the backward and for the caller.
pub struct Forward {
    /// batch rows
    pub b: usize,
    /// sequence length
    pub t: usize,
    /// input ids `[B·T]`
    pub ids: Vec<u32>,
    /// logits `[B·T, V]`
    pub logits: Vec<f32>,
    /// the decoder layers' part
    pub chunk: ChunkForward,
    head: HeadForward,
}

impl Forward {
    /// Tokens routed to each expert, per MoE layer (`[n_moe_layers][E]`).
    pub fn expert_counts(&self) -> Vec<Vec<usize>> {
        self.chunk.expert_counts()
    }

    /// Tokens routed to each expert slot, per MoE layer (see [`ChunkForward::slot_counts`]).
    pub fn slot_counts(&self) -> Vec<Vec<usize>> {
        self.chunk.slot_counts()
    }

    /// Sum of the MoE layers' auxiliary balancing losses (0 when none is configured).
    pub fn aux_loss(&self) -> f32 {
        self.chunk.aux_loss()
    }

    /// Bytes of saved activations held in memory (logits included; not what is in the
    /// swap file).
    pub fn activation_bytes(&self) -> usize {
        self.chunk.activation_bytes() + 4 * self.logits.len() + self.head.bytes()
    }
}

/// Next-token targets for `ids: [B, T]`: position `t` predicts `ids[t+1]`; the last
/// position of each row has no target.
pub fn shifted_targets(ids: &[u32], t: usize) -> Vec<i32> {
    ids.chunks(t).flat_map(|row| row[1..].iter().map(|&x| x as i32).chain(std::iter::once(IGNORE))).collect()
}

impl Model {
    /// Builds the layout and layers from a config; this rank holds every layer and
    /// expert.
    pub fn new(cfg: ModelConfig) -> Self {
        let share = Share::whole(&cfg);
        Self::share(cfg, share).expect("one rank holds the whole model")
    }

    /// This rank's share of an expert-parallel model: experts split into `ep.size()`
    /// consecutive blocks, block `ep.rank()` held here, everything else replicated.
    pub fn expert_parallel(cfg: ModelConfig, ep: Arc<dyn ProcessGroup>) -> crate::Result<Self> {
        Self::expert_parallel_redundant(cfg, ep, 0)
    }

    /// [`Model::expert_parallel`] with `redundant` extra expert slots per rank (see
    /// [`crate::moe::placement`]), which start as copies of other ranks' experts.
    pub fn expert_parallel_redundant(cfg: ModelConfig, ep: Arc<dyn ProcessGroup>, redundant: usize) -> crate::Result<Self> {
        let share = Share { ep: Some(ep), experts: ExpertSlots::Contiguous { redundant }, ..Share::whole(&cfg) };
        Self::share(cfg, share)
    }

    /// This rank's share of an expert-parallel model whose MoE layers (in order) place
    /// their experts as `placements` say (a resumed run's placement).
    pub fn expert_parallel_placed(cfg: ModelConfig, ep: Arc<dyn ProcessGroup>, placements: Vec<Placement>) -> crate::Result<Self> {
        let share = Share { ep: Some(ep), experts: ExpertSlots::Placed(placements), ..Share::whole(&cfg) };
        Self::share(cfg, share)
    }

    /// This rank's share of the model as `share` describes it (collective over the
    /// expert-parallel group when it has more than one rank: the exchange is set up).
    pub fn share(cfg: ModelConfig, share: Share) -> crate::Result<Self> {
        let n = n_moe(&cfg);
        let ranks = share.ep.as_ref().map_or(1, |g| g.size());
        if share.stage.virtual_layers.last().map(|r| r.end) != Some(cfg.n_layers) {
            return Err(crate::Error::field("num_hidden_layers", format!("a pipeline split of {} layers for a model of {}", share.stage.virtual_layers.last().map_or(0, |r| r.end), cfg.n_layers)));
        }
        let placements = match share.experts {
            _ if n == 0 => vec![],
            ExpertSlots::Contiguous { redundant } => {
                let p = Placement::contiguous(cfg.moe.n_experts, ranks, redundant).map_err(|e| crate::Error::field("n_routed_experts", e))?;
                vec![p; n]
            }
            ExpertSlots::Placed(ps) => {
                if ps.len() != n {
                    return Err(crate::Error::msg(format!("{} expert placements for {n} MoE layers", ps.len())));
                }
                if let Some(p) = ps.iter().find(|p| p.ranks != ranks || p.n_experts() != cfg.moe.n_experts) {
                    return Err(crate::Error::msg(format!(
                        "an expert placement for {} experts on {} ranks does not fit {} experts on {ranks} ranks",
                        p.n_experts(),
                        p.ranks,
                        cfg.moe.n_experts,
                    )));
                }
                ps
            }
        };
        let exchange = match &share.ep {
            Some(g) if g.size() > 1 => {
                let nodes = if share.ep_nodes.is_empty() { vec![0; g.size()] } else { share.ep_nodes.clone() };
                Some(Arc::new(ExpertExchange::new(g.clone(), nodes, share.hierarchical).map_err(crate::Error::msg)?))
            }
            _ if share.hierarchical => return Err(crate::Error::msg("a hierarchical all-to-all needs expert parallelism")),
            _ => None,
        };
        let tp = share.tp.filter(|t| t.size() > 1);
        if let Some(t) = &tp {
            check_tensor_parallel(&cfg, t.size())?;
        }
        Ok(Self::build(cfg, share.stage, share.ep, exchange, placements, tp))
    }

    /// Sums over the tensor-parallel group the gradients of the tensors every rank of it
    /// holds whole but uses only for its heads ([`crate::params::ParamSpec::tp_partial`]):
    /// once per step, after the last micro-batch's backward. Without tensor parallelism,
    /// nothing.
    pub fn sum_tensor_parallel_grads(&self, g: &mut [f32]) -> ultramoe_dist::CommResult<()> {
        let Some(tp) = &self.tp else { return Ok(()) };
        for r in self.layout.runs_where(|s| s.tp_partial) {
            tp.group().all_reduce_f32(&mut g[r])?;
        }
        Ok(())
    }

    /// The tensor-parallel split blocks of held layer `i` (attention; a dense MLP or
    /// shared experts): each all-reduces its output forward and its input's gradient
    /// backward.
    pub fn tp_split_blocks(&self, i: usize) -> usize {
        match &self.layers[i].ffn {
            FfnBlock::Dense(_) => 2,
            // (under sequence parallelism the MoE block runs on the slice, whole)
            FfnBlock::Moe(m) => 1 + (m.shared.is_some() && !self.tp.as_ref().is_some_and(|t| t.sequence_parallel())) as usize,
        }
    }

    /// This rank's expert-parallel index and the group size (`(0, 1)` without EP).
    pub fn ep_rank_size(&self) -> (usize, usize) {
        self.ep.as_ref().map_or((0, 1), |g| (g.rank(), g.size()))
    }

    fn build(cfg: ModelConfig, stage: Stage, ep: Option<Arc<dyn ProcessGroup>>, exchange: Option<Arc<ExpertExchange>>, placements: Vec<Placement>, tp: Option<Arc<TensorParallel>>) -> Self {
        let mut placements = placements.into_iter();
        let mut lay = ParamLayout::default();
        // Tensor parallelism (Megatron): attention split by heads, dense FFN and shared
        // experts by intermediate columns; norms, router, routed experts, embedding and
        // head replicated. MLA's low-rank down-projections and their norms stay whole on
        // every rank (they are small: splitting them would add a collective per layer
        // for a few percent of the layer's FLOPs); their gradients are partial.
        let t = tp.as_ref().map_or(1, |t| t.size());
        lay.set_tensor_parallel(tp.as_ref().map_or(0, |t| t.rank()), t);
        // Sequence parallelism: norms and whole MoE blocks (router, routed and shared
        // experts) run on each rank's slice of the rows, so their weights stay whole on
        // every rank with partial gradients; the MoE blocks then need no collective of
        // the tensor-parallel group at all.
        let sp = tp.as_ref().is_some_and(|t| t.sequence_parallel());
        let hidden = cfg.hidden;
        let norm = |lay: &mut ParamLayout, name: String, init: Init| if sp { lay.add_tp_partial(name, &[hidden], init) } else { lay.add(name, &[hidden], init) };
        let (h, v, l) = (cfg.hidden, cfg.vocab_size, cfg.n_layers);
        let std = if cfg.tiny_init {
            // TinyInit (Pangu Ultra): σ = √(1 / (2·H·L)), scaled by width and depth.
            (1.0 / (2.0 * h as f64 * l as f64)).sqrt() as f32
        } else {
            cfg.initializer_range
        };
        let normal = Init::Normal(std);
        let ones = Init::Constant(1.0);
        let rank = ep.as_ref().map_or(0, |g| g.rank());
        lay.set_stage(stage.embedding_holder(), stage.holds_embedding());
        // Vocabulary-parallel embedding and head: rows `rank·V/t..` on each rank.
        let embed = lay.add_split("model.embed_tokens.weight".into(), &[v, h], 0, normal);
        let embed_here = stage.holds_embedding().then_some(embed.clone());
        let mut layers = Vec::with_capacity(l);
        let mut layer_ids = vec![];
        for i in 0..l {
            // Every layer is registered (the logical list names the whole model);
            // only the stage's own get buffer space and are kept.
            lay.set_stage(stage.holder(i), stage.holds(i));
            let p = format!("model.layers.{i}.");
            let attn_norm = norm(&mut lay, format!("{p}input_layernorm.weight"), ones);
            let attn = match &cfg.mla {
                Some(d) => {
                    let nh = cfg.n_heads;
                    let dqk = d.qk_nope + d.qk_rope;
                    let q_a = if d.q_lora_rank > 0 {
                        lay.add_tp_partial(format!("{p}self_attn.q_a_proj.weight"), &[d.q_lora_rank, h], normal)
                    } else {
                        lay.add_split(format!("{p}self_attn.q_proj.weight"), &[nh * dqk, h], 0, normal)
                    };
                    let kv_a = lay.add_tp_partial(format!("{p}self_attn.kv_a_proj_with_mqa.weight"), &[d.kv_lora_rank + d.qk_rope, h], normal);
                    let (q_a_norm, q_b) = if d.q_lora_rank > 0 {
                        (
                            Some(lay.add_tp_partial(format!("{p}self_attn.q_a_layernorm.weight"), &[d.q_lora_rank], ones)),
                            Some(lay.add_split(format!("{p}self_attn.q_b_proj.weight"), &[nh * dqk, d.q_lora_rank], 0, normal)),
                        )
                    } else {
                        (None, None)
                    };
                    let kv_a_norm = lay.add_tp_partial(format!("{p}self_attn.kv_a_layernorm.weight"), &[d.kv_lora_rank], ones);
                    let kv_b = lay.add_split(format!("{p}self_attn.kv_b_proj.weight"), &[nh * (d.qk_nope + d.v_head), d.kv_lora_rank], 0, normal);
                    let o = lay.add_split(format!("{p}self_attn.o_proj.weight"), &[h, nh * d.v_head], 1, normal);
                    let nh = nh / t;
                    AttnBlock::Mla(MlaAttention {
                        a: fuse(&[q_a, kv_a]),
                        q_a_norm,
                        q_b,
                        kv_a_norm,
                        kv_b,
                        o,
                        hidden: h,
                        nh,
                        q_lora: d.q_lora_rank,
                        kv_lora: d.kv_lora_rank,
                        nope: d.qk_nope,
                        rope_dim: d.qk_rope,
                        dv: d.v_head,
                        eps: cfg.rms_norm_eps,
                        scale: cfg.attention_scale(),
                    })
                }
                None => {
                    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
                    // Each rank takes nh/t query heads and the nkv/t key/value heads
                    // they share (t divides both, so no group is cut).
                    let q = lay.add_split(format!("{p}self_attn.q_proj.weight"), &[nh * hd, h], 0, normal);
                    let k = lay.add_split(format!("{p}self_attn.k_proj.weight"), &[nkv * hd, h], 0, normal);
                    let vv = lay.add_split(format!("{p}self_attn.v_proj.weight"), &[nkv * hd, h], 0, normal);
                    let o = lay.add_split(format!("{p}self_attn.o_proj.weight"), &[h, nh * hd], 1, normal);
                    let (q_norm, k_norm) = if cfg.arch == Arch::Qwen3Moe {
                        (
                            Some(lay.add_tp_partial(format!("{p}self_attn.q_norm.weight"), &[hd], ones)),
                            Some(lay.add_tp_partial(format!("{p}self_attn.k_norm.weight"), &[hd], ones)),
                        )
                    } else {
                        (None, None)
                    };
                    let (nh, nkv) = (nh / t, nkv / t);
                    AttnBlock::Gqa(GqaAttention {
                        qkv: fuse(&[q, k, vv]),
                        o,
                        q_norm,
                        k_norm,
                        hidden: h,
                        nh,
                        nkv,
                        hd,
                        eps: cfg.rms_norm_eps,
                        scale: cfg.attention_scale(),
                    })
                }
            };
            let ffn_norm = norm(&mut lay, format!("{p}post_attention_layernorm.weight"), ones);
            let ffn = if cfg.moe_layers[i] {
                let placement = placements.next().expect("one placement per MoE layer");
                if sp {
                    let first = lay.specs.len();
                    lay.set_tensor_parallel(0, 1);
                    let moe = build_moe(&mut lay, &cfg, &p, normal, rank, placement);
                    lay.set_tensor_parallel(tp.as_ref().map_or(0, |t| t.rank()), t);
                    lay.mark_tp_partial(first);
                    FfnBlock::Moe(moe)
                } else {
                    FfnBlock::Moe(build_moe(&mut lay, &cfg, &p, normal, rank, placement))
                }
            } else {
                FfnBlock::Dense(build_mlp(&mut lay, &format!("{p}mlp."), ["gate_proj", "up_proj", "down_proj"], h, cfg.intermediate, normal, t))
            };
            let sandwich = cfg.sandwich_norm.then(|| {
                // Depth-scaled sandwich norm: post-norm gains start at 1/√L.
                let gain = Init::Constant((1.0 / (l as f64).sqrt()) as f32);
                [
                    norm(&mut lay, format!("{p}post_self_attn_layernorm.weight"), gain),
                    norm(&mut lay, format!("{p}post_mlp_layernorm.weight"), gain),
                ]
            });
            if stage.holds(i) {
                layers.push(DecoderLayer { attn_norm, attn, ffn_norm, ffn, sandwich, hidden: h, eps: cfg.rms_norm_eps });
                layer_ids.push(i);
            }
        }
        lay.set_stage(stage.head_holder(), stage.holds_head());
        let final_norm = norm(&mut lay, "model.norm.weight".into(), ones);
        let lm_head = if cfg.tie_word_embeddings {
            lay.aliases.insert("lm_head.weight".into(), "model.embed_tokens.weight".into());
            embed.clone()
        } else {
            lay.add_split("lm_head.weight".into(), &[v, h], 0, normal)
        };
        let head = stage.holds_head();
        let rope = build_rope(&cfg);
        Model {
            cfg,
            layout: lay,
            embed: embed_here,
            layers,
            layer_ids,
            final_norm: head.then_some(final_norm),
            lm_head: head.then_some(lm_head),
            rope,
            ep,
            exchange,
            tp,
            stage,
        }
    }

    /// The held layers of this rank's model chunk `chunk`, as indices into
    /// [`Model::layers`].
    pub fn chunk_layers(&self, chunk: usize) -> std::ops::Range<usize> {
        let r = &self.stage.chunks()[chunk];
        let lo = self.layer_ids.iter().position(|&i| i == r.start).expect("the chunk's layers are held");
        lo..lo + r.len()
    }

    /// Pieces layer `i`'s one-rank MoE backward works through its routed rows in: four
    /// for the top MoE layer of its model chunk, whose backward runs while every
    /// layer's activations are still held (without a memory policy, the step's peak);
    /// one (the whole buffers, a little faster) below it, where the layers above have
    /// usually freed more than the pieces would save. The memory plan counts either.
    pub fn moe_backward_pieces(&self, i: usize) -> usize {
        let is_moe = |j: &usize| matches!(self.layers[*j].ffn, FfnBlock::Moe(_));
        let top = (0..self.stage.vpp).map(|c| self.chunk_layers(c)).find(|r| r.contains(&i)).and_then(|r| r.rev().find(is_moe));
        if top == Some(i) {
            crate::moe::experts::BACKWARD_PIECES
        } else {
            1
        }
    }

    /// The context a pass over `b × t` tokens runs layers in, on `exchange`.
    fn ctx<'a>(&'a self, b: usize, t: usize, positions: Option<&'a [u32]>, opts: &PassOptions, exchange: Option<&'a ExpertExchange>) -> Ctx<'a> {
        let tp = self.tp.as_deref();
        let moe_tp = tp.filter(|t| !t.sequence_parallel());
        let batch = tp.filter(|t| t.sequence_parallel());
        let moe =
            MoeCtx { exchange, chunks: opts.overlap_chunks.max(1), balance_loss: opts.balance_loss, skew: opts.routing_skew, tp: moe_tp, batch, backward_pieces: 1 };
        Ctx { b, t, rope: &self.rope, positions, keep_probs: true, moe, tp }
    }

    /// Forward over `ids: [B, T]` (row-major), keeping everything for the backward.
    pub fn forward(&self, w: &[f32], ids: &[u32], b: usize, t: usize) -> Forward {
        self.forward_with(w, ids, b, t, &PassOptions::default())
    }

    /// [`Model::forward`] under `opts` (this rank must hold the whole model).
    pub fn forward_with(&self, w: &[f32], ids: &[u32], b: usize, t: usize, opts: &PassOptions) -> Forward {
        self.forward_packed(w, ids, None, b, t, opts)
    }

    /// [`Model::forward_with`] over packed rows: `positions` gives every token's position
    /// within its document (0 where one starts; `None`: one sequence a row). Attention
    /// never crosses a document boundary and RoPE restarts at each.
    pub fn forward_packed(&self, w: &[f32], ids: &[u32], positions: Option<&[u32]>, b: usize, t: usize, opts: &PassOptions) -> Forward {
        let x = self.embed_forward(w, ids);
        let (x, chunk) = self.chunk_forward(w, x, 0, b, t, positions, opts, self.exchange.as_deref(), &mut |_| {});
        let mut head = self.head_forward(w, x);
        // The caller reads the logits from the forward; the head keeps the rest.
        let logits = std::mem::take(&mut head.logits);
        Forward { b, t, ids: ids.to_vec(), logits, chunk, head }
    }

    /// The embedding of `ids` (this rank must hold the first stage): `[N, H]`.
    pub fn embed_forward(&self, w: &[f32], ids: &[u32]) -> Vec<f32> {
        let h = self.cfg.hidden;
        let slot = self.embed.clone().expect("the first pipeline stage holds the embedding");
        let mut x = vec![0.0; ids.len() * h];
        match &self.tp {
            None => embedding_forward(&mut x, &w[slot], ids, h),
            Some(tp) => {
                // Each rank fills the rows of the ids in its vocabulary slice; the sum
                // over the group has every row once.
                let (v0, vl) = self.vocab_slice();
                let table = &w[slot];
                for (row, &id) in x.chunks_mut(h).zip(ids) {
                    if let Some(r) = (id as usize).checked_sub(v0).filter(|&r| r < vl) {
                        row.copy_from_slice(&table[r * h..(r + 1) * h]);
                    }
                }
                // (this rank's rows of the sum under sequence parallelism)
                x = tp.sum_partial(x);
            }
        }
        x
    }

    /// This rank's `(first id, count)` of the vocabulary (all of it without tensor
    /// parallelism): the embedding's and the head's rows it holds.
    pub fn vocab_slice(&self) -> (usize, usize) {
        let v = self.cfg.vocab_size;
        self.tp.as_ref().map_or((0, v), |t| (t.rank() * v / t.size(), v / t.size()))
    }

    /// Rows of logits the head forms at once in a training step's backward (0: the whole
    /// logits, formed in the forward). Under tensor parallelism always in the backward
    /// (chunked or not), where each rank forms its vocabulary slice only.
    pub fn head_chunk_rows(&self, opts: &PassOptions, n: usize) -> usize {
        let rows = opts.head_chunk_rows(n, self.vocab_slice().1);
        match &self.tp {
            Some(_) => rows.unwrap_or(n.max(1)),
            None => rows.unwrap_or(0),
        }
    }

    /// Forward of this rank's model chunk `chunk` from its input `x: [B·T, H]`, calling
    /// `layer_done(i)` as soon as held layer `i` ([`Model::layers`] index) is done.
    /// Returns the chunk's output and what its backward needs.
    #[allow(clippy::too_many_arguments)]
    pub fn chunk_forward(
        &self,
        w: &[f32],
        mut x: Vec<f32>,
        chunk: usize,
        b: usize,
        t: usize,
        positions: Option<&[u32]>,
        opts: &PassOptions,
        exchange: Option<&ExpertExchange>,
        layer_done: &mut dyn FnMut(usize),
    ) -> (Vec<f32>, ChunkForward) {
        if let Some(p) = positions {
            assert_eq!(p.len(), b * t, "one document position per token");
        }
        let base = self.ctx(b, t, positions, opts, exchange);
        assert_eq!(x.len(), base.rows() * self.cfg.hidden, "the chunk's input must be B·T rows of H (this rank's slice of them under sequence parallelism)");
        let held = self.chunk_layers(chunk);
        let mut saved: Vec<LayerState> = Vec::with_capacity(held.len());
        // The swap file (and its staging buffer) exists from the pass's start when any
        // layer swaps, so the memory it takes does not depend on when a layer is reached.
        let swapping = held.clone().any(|i| opts.layer(self.layer_ids[i]).swaps());
        let mut swap: Option<SwapFile> = swapping
            .then(|| SwapFile::create(&opts.swap_dir).unwrap_or_else(|e| panic!("swap file in {}: {e}", opts.swap_dir.display())));
        // A swapped layer whose write may still be running: it has the next layer's
        // forward to finish, then it is waited for, so the memory a step holds does not
        // depend on the disk.
        let mut writing: Option<usize> = None;
        let wait = |swap: &Option<SwapFile>, state: &mut LayerState| {
            if let (Some(f), LayerState::Swapped(_, t)) = (swap, state) {
                let _w = ultramoe_kernels::profile::scope("swap.wait");
                f.wait_written(t);
            }
        };
        for i in held {
            let layer = &self.layers[i];
            let p = opts.layer(self.layer_ids[i]);
            // (a layer recomputed whole keeps nothing of this pass, probabilities included)
            let c = Ctx { keep_probs: !p.full && !p.attention, ..base };
            let input = p.full.then(|| x.clone());
            let (y, mut s) = layer.forward(w, x, &c);
            let state = if let Some(x) = input {
                let moe = LayerState::Kept(Box::new(s)).moe();
                LayerState::Recompute { x, moe }
            } else if p.swap {
                s.release(&p);
                let f = swap.as_mut().expect("created at the pass's start");
                let ticket = f.write(s.take_buffers());
                LayerState::Swapped(Box::new(s), ticket)
            } else {
                s.release(&p);
                LayerState::Kept(Box::new(s))
            };
            if let Some(j) = writing.take() {
                wait(&swap, &mut saved[j]);
            }
            if p.swaps() {
                writing = Some(saved.len());
            }
            saved.push(state);
            x = y;
            layer_done(i);
        }
        if let Some(j) = writing {
            wait(&swap, &mut saved[j]);
        }
        (x, ChunkForward { b, t, chunk, positions: positions.map(<[u32]>::to_vec), layers: saved, swap })
    }

    /// The head's forward from the last layer's output `x: [N, H]` (this rank must hold
    /// the last stage): final norm and logits.
    pub fn head_forward(&self, w: &[f32], x: Vec<f32>) -> HeadForward {
        let mut head = self.final_norm_forward(w, x);
        let _p = ultramoe_kernels::profile::scope("lm_head.forward");
        let (h, v) = (self.cfg.hidden, self.cfg.vocab_size);
        let (n, vl) = (head.xn.len() / h, self.vocab_slice().1);
        head.logits = linear(&head.xn, &w[self.head_slots().1], n, h, vl);
        if let Some(tp) = &self.tp {
            // A caller that reads logits gets them whole: the slices gathered
            // (training's head never does this; see `head_forward_for_training`).
            let parts = tp.gather_in_pass(&head.logits);
            let mut whole = vec![0.0; n * v];
            for (r, part) in parts.chunks(n * vl).enumerate() {
                for (dst, src) in whole.chunks_mut(v).zip(part.chunks(vl)) {
                    dst[r * vl..(r + 1) * vl].copy_from_slice(src);
                }
            }
            head.logits = whole;
        }
        head
    }

    /// The head's forward in a training step under `opts`: with a head chunk size (the
    /// default) only the final norm runs now, and [`Model::head_backward`] forms the
    /// logits, the loss and their gradient a chunk of rows at a time; otherwise as
    /// [`Model::head_forward`].
    pub fn head_forward_for_training(&self, w: &[f32], x: Vec<f32>, opts: &PassOptions) -> HeadForward {
        let n = x.len() / self.cfg.hidden;
        match self.head_chunk_rows(opts, n) {
            0 => self.head_forward(w, x),
            chunk_rows => HeadForward { chunk_rows, ..self.final_norm_forward(w, x) },
        }
    }

    /// The final RMSNorm of `x`, kept for the head's backward (no logits yet).
    fn final_norm_forward(&self, w: &[f32], x: Vec<f32>) -> HeadForward {
        let _p = ultramoe_kernels::profile::scope("final_norm.forward");
        let h = self.cfg.hidden;
        let n = x.len() / h;
        let mut xn = vec![0.0; n * h];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&mut xn, &mut rstd, &x, &w[self.head_slots().0], h, self.cfg.rms_norm_eps);
        // The vocabulary-parallel head reads every row (gathered under sequence
        // parallelism; `x` and `rstd` stay this rank's rows).
        let xn = match &self.tp {
            Some(tp) => tp.rows_whole(xn),
            None => xn,
        };
        HeadForward { logits: vec![], x, rstd, xn, chunk_rows: 0 }
    }

    fn head_slots(&self) -> (Slot, Slot) {
        let expect = "the last pipeline stage holds the final norm and the head";
        (self.final_norm.clone().expect(expect), self.lm_head.clone().expect(expect))
    }

    /// Mean cross-entropy over positions with a target, and that count. Leaves
    /// `fwd.logits` intact. (Training gets the loss from [`Model::backward`] instead,
    /// which computes it fused with the gradient.)
    pub fn loss(&self, fwd: &Forward, targets: &[i32]) -> (f32, usize) {
        let _p = ultramoe_kernels::profile::scope("loss");
        let mut lse = vec![0.0; fwd.b * fwd.t];
        cross_entropy_forward(&mut lse, &fwd.logits, targets, self.cfg.vocab_size)
    }

    /// Backward of `scale · Σ_{positions with a target} CE` (for the mean loss,
    /// `scale = 1/count`). Consumes the forward; accumulates gradients into `g`.
    /// Returns `(Σ CE, count)` over the positions with a target.
    pub fn backward(&self, w: &[f32], g: &mut [f32], fwd: Forward, targets: &[i32], scale: f32) -> (f64, usize) {
        self.backward_with(w, g, fwd, targets, scale, &PassOptions::default())
    }

    /// [`Model::backward`] under `opts` (the forward's own).
    pub fn backward_with(&self, w: &[f32], g: &mut [f32], fwd: Forward, targets: &[i32], scale: f32, opts: &PassOptions) -> (f64, usize) {
        let Forward { ids, chunk, mut head, logits, .. } = fwd;
        // The loss's gradient is formed in place of the logits.
        head.logits = logits;
        let (loss, count, dx) = self.head_backward(w, g, &mut head, targets, scale);
        drop(head);
        let dx = self.chunk_backward(w, g, chunk, dx, opts, self.exchange.as_deref(), &mut |_, _| {});
        self.embed_backward(g, &dx, &ids);
        (loss, count)
    }

    /// The head's backward for `scale · Σ CE` over `targets`: gradients of the final
    /// norm and `lm_head` into `g`. Returns `(Σ CE, count, dx)` with `dx: [N, H]` the
    /// gradient of the last layer's output. The logits are consumed.
    pub fn head_backward(&self, w: &[f32], g: &mut [f32], head: &mut HeadForward, targets: &[i32], scale: f32) -> (f64, usize, Vec<f32>) {
        let _p = ultramoe_kernels::profile::scope("lm_head.backward");
        let (h, v) = (self.cfg.hidden, self.cfg.vocab_size);
        let (norm, lm) = self.head_slots();
        let n = head.x.len() / h;
        let (loss, count, dxn) = if let Some(tp) = &self.tp {
            self.head_backward_vocab_parallel(tp, w, g, head, targets, scale)
        } else if head.chunk_rows == 0 {
            let mut dlogits = std::mem::take(&mut head.logits);
            let (loss, count) = cross_entropy_fused_backward(&mut dlogits, targets, v, scale);
            let dxn = linear_grad(&mut g[lm.clone()], &dlogits, &head.xn, &w[lm], n, h, v);
            (loss, count, dxn)
        } else {
            // Rows r0..r1 at a time: logits = xn·Wᵀ, then in place dlogits, then
            // dxn = dlogits·W and dW += dlogitsᵀ·xn. A row's logits, loss and dxn sum
            // over the hidden and vocabulary sizes, which chunks do not split: they are
            // the whole path's bits wherever the GEMM's result for a row does not
            // depend on how many rows share the product (the loss adds row by row in
            // order). dW sums over rows chunk by chunk, so it differs from one product
            // over all rows by rounding.
            // A one-row chunk would take the GEMM's matrix-vector path, which rounds
            // differently: a last row on its own joins the chunk before it.
            let mut dxn = vec![0.0; n * h];
            let mut total = (0.0, 0);
            let mut r0 = 0;
            while r0 < n {
                let r1 = match (r0 + head.chunk_rows).min(n) {
                    r1 if n - r1 == 1 => n,
                    r1 => r1,
                };
                let xn = &head.xn[r0 * h..r1 * h];
                let mut dlogits = linear(xn, &w[lm.clone()], r1 - r0, h, v);
                cross_entropy_fused_backward_into(&mut dlogits, &targets[r0..r1], v, scale, &mut total);
                let d = linear_grad(&mut g[lm.clone()], &dlogits, xn, &w[lm.clone()], r1 - r0, h, v);
                dxn[r0 * h..r1 * h].copy_from_slice(&d);
                r0 = r1;
            }
            (total.0, total.1, dxn)
        };
        let mut dx = vec![0.0; n * h];
        rmsnorm_backward(&mut dx, &mut g[norm.clone()], &dxn, &head.x, &w[norm], &head.rstd, h, false);
        (loss, count, dx)
    }

    /// [`Model::head_backward`]'s logits, loss and `dxn` over this rank's vocabulary
    /// slice, `chunk_rows` rows at a time (all rows when the forward formed whole logits,
    /// whose slice is taken): the vocabulary-parallel cross-entropy
    /// ([`TensorParallel::vocab_parallel_cross_entropy`]), then `dxn` — partial over the
    /// slices — summed over the group. No rank forms more than its slice.
    fn head_backward_vocab_parallel(&self, tp: &TensorParallel, w: &[f32], g: &mut [f32], head: &mut HeadForward, targets: &[i32], scale: f32) -> (f64, usize, Vec<f32>) {
        let (h, v) = (self.cfg.hidden, self.cfg.vocab_size);
        let (v0, vl) = self.vocab_slice();
        let lm = self.head_slots().1;
        let n = head.xn.len() / h;
        let whole = std::mem::take(&mut head.logits);
        let rows = if head.chunk_rows == 0 { n.max(1) } else { head.chunk_rows };
        let mut dxn = vec![0.0; n * h];
        let (mut loss, mut count) = (0.0, 0);
        let mut r0 = 0;
        while r0 < n {
            // (a last row on its own joins the chunk before it, as without TP)
            let r1 = match (r0 + rows).min(n) {
                r1 if n - r1 == 1 => n,
                r1 => r1,
            };
            let xn = &head.xn[r0 * h..r1 * h];
            let mut dlogits = if whole.is_empty() { linear(xn, &w[lm.clone()], r1 - r0, h, vl) } else { take_cols(&whole[r0 * v..r1 * v], v, v0, vl) };
            let (l, c) = tp.vocab_parallel_cross_entropy(&mut dlogits, &targets[r0..r1], v0, vl, scale).unwrap_or_else(|e| std::panic::panic_any(e));
            (loss, count) = (loss + l, count + c);
            let d = linear_grad(&mut g[lm.clone()], &dlogits, xn, &w[lm.clone()], r1 - r0, h, vl);
            dxn[r0 * h..r1 * h].copy_from_slice(&d);
            r0 = r1;
        }
        (loss, count, tp.sum_partial(dxn))
    }

    /// Backward of model chunk `fwd.chunk` from the gradient of its output `dy`;
    /// weight gradients into `g`. Returns the gradient of the chunk's input. Calls
    /// `layer_done(g, i)` as soon as held layer `i`'s gradients are complete (layers
    /// finish last to first), so their reduction can start while earlier layers still
    /// compute. `opts` and `exchange` must be the forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn chunk_backward(
        &self,
        w: &[f32],
        g: &mut [f32],
        mut fwd: ChunkForward,
        mut dx: Vec<f32>,
        opts: &PassOptions,
        exchange: Option<&ExpertExchange>,
        layer_done: &mut dyn FnMut(&[f32], usize),
    ) -> Vec<f32> {
        let positions = fwd.positions.take();
        let c = self.ctx(fwd.b, fwd.t, positions.as_deref(), opts, exchange);
        let swap = fwd.swap.take();
        let mut states = std::mem::take(&mut fwd.layers);
        // The read of the layer below, started while this layer's backward runs.
        let mut prefetched: Option<Prefetch> = None;
        for i in self.chunk_layers(fwd.chunk).rev() {
            let layer = &self.layers[i];
            let state = states.pop().expect("one saved state per layer");
            let s = match state {
                LayerState::Kept(s) => *s,
                LayerState::Recompute { x, .. } => {
                    let _p = ultramoe_kernels::profile::scope("recompute.forward");
                    // With `attention` too, the rerun keeps no probabilities either.
                    let keep_probs = !opts.layer(self.layer_ids[i]).attention;
                    layer.forward(w, x, &Ctx { keep_probs, ..c }).1
                }
                LayerState::Swapped(mut s, mut t) => {
                    let f = swap.as_ref().expect("a swapped layer has a swap file");
                    let _w = ultramoe_kernels::profile::scope("swap.wait");
                    let p = prefetched.take().unwrap_or_else(|| f.prefetch(&mut t));
                    s.put_buffers(f.finish(p));
                    *s
                }
            };
            if let (Some(f), Some(LayerState::Swapped(_, t))) = (&swap, states.last_mut()) {
                prefetched = Some(f.prefetch(t));
            }
            let c = Ctx { moe: MoeCtx { backward_pieces: self.moe_backward_pieces(i), ..c.moe }, ..c };
            dx = layer.backward(w, g, s, dx, &c);
            layer_done(g, i);
        }
        // Frozen buffers (the router correction bias) take no gradient.
        for spec in self.layout.specs.iter().filter(|s| s.frozen) {
            g[spec.range()].fill(0.0);
        }
        dx
    }

    /// The embedding's backward from the first layer's input gradient `dx` (this rank
    /// must hold the first stage).
    pub fn embed_backward(&self, g: &mut [f32], dx: &[f32], ids: &[u32]) {
        let slot = self.embed.clone().expect("the first pipeline stage holds the embedding");
        let h = self.cfg.hidden;
        if self.tp.is_none() {
            return embedding_backward(&mut g[slot], dx, ids, h);
        }
        // The rows of this rank's vocabulary slice.
        let (v0, vl) = self.vocab_slice();
        let dx = match &self.tp {
            Some(tp) => tp.rows_whole_ref(dx),
            None => std::borrow::Cow::Borrowed(dx),
        };
        let table = &mut g[slot];
        for (row, &id) in dx.chunks(h).zip(ids) {
            if let Some(r) = (id as usize).checked_sub(v0).filter(|&r| r < vl) {
                table[r * h..(r + 1) * h].iter_mut().zip(row).for_each(|(d, x)| *d += x);
            }
        }
    }

    /// All-to-all traffic since the last call (zero without expert parallelism).
    pub fn take_exchange_totals(&self) -> crate::moe::dispatcher::ExchangeTotals {
        self.exchange.as_ref().map(|e| e.stats.take()).unwrap_or_default()
    }

    /// The model-wide MoE-layer index of each held MoE layer, in order.
    pub fn moe_ids(&self) -> Vec<usize> {
        let global: Vec<usize> = (0..self.cfg.n_layers).filter(|&i| self.cfg.moe_layers[i]).collect();
        self.layer_ids.iter().filter_map(|i| global.iter().position(|g| g == i)).collect()
    }

    /// Every MoE layer's expert placement, in layer order.
    pub fn placements(&self) -> Vec<&Placement> {
        self.moe_layers().map(|m| &m.placement).collect()
    }

    fn moe_layers(&self) -> impl Iterator<Item = &MoeLayer> {
        self.layers.iter().filter_map(|l| match &l.ffn {
            FfnBlock::Moe(m) => Some(m),
            _ => None,
        })
    }

    /// Moves MoE layer `i` (counting MoE layers only) to placement `new`, carrying every
    /// buffer in `bufs` (weights, optimizer moments) along (collective over the
    /// expert-parallel group). Returns the floats this rank received.
    pub fn migrate(&mut self, i: usize, new: Placement, bufs: &mut [&mut [f32]]) -> ultramoe_dist::CommResult<usize> {
        let Some(g) = self.ep.clone() else { return Ok(0) };
        let layer = self
            .layers
            .iter_mut()
            .filter_map(|l| match &mut l.ffn {
                FfnBlock::Moe(m) => Some(m),
                _ => None,
            })
            .nth(i)
            .expect("an MoE layer index");
        crate::moe::replicas::migrate(layer, &mut self.layout, new, bufs, g.as_ref())
    }

    /// Sums replicated experts' gradients over their copies (collective over the
    /// expert-parallel group; nothing to do without replicas).
    pub fn sum_replica_grads(&self, g: &mut [f32]) -> ultramoe_dist::CommResult<()> {
        let Some(group) = &self.ep else { return Ok(()) };
        let layers: Vec<&MoeLayer> = self.moe_layers().collect();
        crate::moe::replicas::sum_replica_grads(&layers, g, group.as_ref())
    }

    /// This rank's flat-buffer ranges holding non-primary expert copies.
    pub fn duplicate_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let me = self.ep_rank_size().0;
        self.moe_layers().flat_map(|m| crate::moe::replicas::duplicate_ranges(m, me)).collect()
    }

    /// Total parameters of the whole model (all expert-parallel ranks together).
    pub fn n_params(&self) -> usize {
        self.layout.logical.iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }

    /// Parameters a token touches (routed experts counted `K` of `E` times), for FLOP
    /// accounting: `6 · active · tokens` plus attention.
    pub fn active_params(&self) -> usize {
        let m = &self.cfg.moe;
        let per_expert = 3 * self.cfg.hidden * m.expert_inter;
        let inactive = self.cfg.n_moe_layers() * (m.n_experts - m.top_k.min(m.n_experts)) * per_expert;
        let embed = self.cfg.vocab_size * self.cfg.hidden;
        // The embedding lookup does no multiply-adds; a tied lm_head still does.
        let embed_free = if self.cfg.tie_word_embeddings { 0 } else { embed };
        self.n_params() - inactive - embed_free
    }

    /// Training FLOPs for one step over `n = B·T` tokens: `6 · active_params · n` for
    /// the matmuls plus causal attention `6 · L · nh · T · (d_qk + d_v) · n` (forward
    /// `2·T²·(d_qk+d_v)/2` per head per row, ×3 for backward).
    pub fn train_flops(&self, b: usize, t: usize) -> f64 {
        let n = (b * t) as f64;
        let att = 6.0
            * self.cfg.n_layers as f64
            * self.cfg.n_heads as f64
            * t as f64
            * (self.cfg.qk_head_dim() + self.cfg.v_head_dim()) as f64
            * n
            / 2.0;
        6.0 * self.active_params() as f64 * n + att
    }
}

/// A SwiGLU MLP of width `inter`, split over `t` tensor-parallel ranks (gate and up by
/// rows — column-parallel — down by columns — row-parallel).
#[allow(clippy::too_many_arguments)]
fn build_mlp(lay: &mut ParamLayout, prefix: &str, names: [&str; 3], h: usize, inter: usize, init: Init, t: usize) -> Mlp {
    let g = lay.add_split(format!("{prefix}{}.weight", names[0]), &[inter, h], 0, init);
    let u = lay.add_split(format!("{prefix}{}.weight", names[1]), &[inter, h], 0, init);
    let d = lay.add_split(format!("{prefix}{}.weight", names[2]), &[h, inter], 1, init);
    Mlp { gate_up: fuse(&[g, u]), down: d, hidden: h, inter: inter / t }
}

/// Refuses a tensor-parallel size that does not divide what it splits, naming the
/// config field.
pub fn check_tensor_parallel(cfg: &ModelConfig, t: usize) -> crate::Result<()> {
    let mut dims = vec![("num_attention_heads", cfg.n_heads)];
    if cfg.mla.is_none() {
        dims.push(("num_key_value_heads", cfg.n_kv_heads));
    }
    if cfg.moe_layers.iter().any(|m| !m) {
        dims.push(("intermediate_size", cfg.intermediate));
    }
    if n_moe(cfg) > 0 && cfg.moe.n_shared > 0 {
        dims.push(("n_shared_experts × moe_intermediate_size", cfg.moe.n_shared * cfg.moe.expert_inter));
    }
    // The embedding and head split the vocabulary evenly (pad it, as Megatron's
    // `--make-vocab-size-divisible-by` does, for other sizes).
    dims.push(("vocab_size", cfg.vocab_size));
    match dims.into_iter().find(|(_, n)| !n.is_multiple_of(t)) {
        Some((field, n)) => Err(crate::Error::field(field, format!("tensor parallelism {t} does not divide {n}"))),
        None => Ok(()),
    }
}

fn build_moe(lay: &mut ParamLayout, cfg: &ModelConfig, p: &str, init: Init, rank: usize, placement: Placement) -> MoeLayer {
    let m = &cfg.moe;
    let h = cfg.hidden;
    let (block, names) = match cfg.arch {
        Arch::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    };
    let weight = lay.add(format!("{p}{block}.gate.weight"), &[m.n_experts, h], init);
    let bias = (cfg.arch == Arch::DeepseekV3)
        .then(|| lay.add_frozen(format!("{p}{block}.gate.e_score_correction_bias"), &[m.n_experts], Init::Constant(0.0)));
    // This rank's slots hold the experts the placement gives it (gate and up of each
    // slot side by side, then every slot's down projection: the grouped GEMM's [S, 2I, H]
    // and [S, H, I]). The whole model's expert tensors are recorded in expert order, so
    // initialisation draws the same stream on every rank and checkpoints see every expert.
    let proj = names;
    let names = ExpertNames { prefix: format!("{p}{block}.experts."), proj: names.map(String::from) };
    let mut gu = Vec::with_capacity(2 * placement.slots_per_rank);
    let mut down = Vec::with_capacity(placement.slots_per_rank);
    for &e in placement.rank_experts(rank) {
        gu.push(lay.add_slot(names.tensor(e, 0), &[m.expert_inter, h], init));
        gu.push(lay.add_slot(names.tensor(e, 1), &[m.expert_inter, h], init));
    }
    for &e in placement.rank_experts(rank) {
        down.push(lay.add_slot(names.tensor(e, 2), &[h, m.expert_inter], init));
    }
    let held = |e: usize| placement.slot_on(rank, e).is_some();
    for e in 0..m.n_experts {
        lay.add_logical(names.tensor(e, 0), &[m.expert_inter, h], init, held(e), placement.owner(e));
        lay.add_logical(names.tensor(e, 1), &[m.expert_inter, h], init, held(e), placement.owner(e));
    }
    for e in 0..m.n_experts {
        lay.add_logical(names.tensor(e, 2), &[h, m.expert_inter], init, held(e), placement.owner(e));
    }
    let t = lay.tensor_parallel_size();
    let shared = (m.n_shared > 0).then(|| build_mlp(lay, &format!("{p}{block}.shared_experts."), proj, h, m.n_shared * m.expert_inter, init, t));
    let spec = RouterSpec {
        score: if cfg.arch == Arch::DeepseekV3 { ScoreFn::Sigmoid } else { ScoreFn::Softmax },
        n_experts: m.n_experts,
        top_k: m.top_k,
        n_group: m.n_group,
        topk_group: m.topk_group,
        renormalize: m.norm_topk_prob,
        scaling: m.routed_scaling_factor,
    };
    MoeLayer {
        router: Router { weight, bias, spec, hidden: h },
        dispatcher: TokenDispatcher { n_experts: placement.n_slots(), hidden: h },
        experts: GroupedExperts { gate_up: fuse(&gu), down: fuse(&down), hidden: h, inter: m.expert_inter, names },
        placement,
        shared,
    }
}

/// MoE layers in a config.
fn n_moe(cfg: &ModelConfig) -> usize {
    cfg.moe_layers.iter().filter(|&&m| m).count()
}

pub use crate::pass::DEFAULT_OVERLAP_CHUNKS;

fn build_rope(cfg: &ModelConfig) -> RopeTable {
    let dim = cfg.rope_dim();
    let layout = if cfg.rope_interleave { RopeLayout::Interleaved } else { RopeLayout::Half };
    let (inv, att) = match &cfg.rope_scaling {
        RopeScaling::Default => (default_inv_freq(dim, cfg.rope_theta), 1.0),
        RopeScaling::Linear { factor } => (default_inv_freq(dim, cfg.rope_theta).into_iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Yarn { factor, beta_fast, beta_slow, mscale, mscale_all_dim, original_max_position, attention_factor, truncate } => {
            // transformers: attention_factor defaults to mscale(s, mscale)/mscale(s, mscale_all_dim)
            // when both are given, else 0.1·ln(s) + 1.
            let att = attention_factor.unwrap_or_else(|| match mscale {
                Some(m) if *m != 0.0 && *mscale_all_dim != 0.0 => yarn_get_mscale(*factor, *m) / yarn_get_mscale(*factor, *mscale_all_dim),
                _ => yarn_get_mscale(*factor, 1.0),
            });
            let y = Yarn {
                factor: *factor,
                beta_fast: *beta_fast,
                beta_slow: *beta_slow,
                original_max_position: *original_max_position,
                attention_factor: att,
                truncate: *truncate,
            };
            (yarn_inv_freq(dim, cfg.rope_theta, &y), att)
        }
    };
    RopeTable::new(&inv, cfg.max_position, att, layout)
}
