//! The run specification: how a training step runs, as one typed value.
//!
//! [`TrainConfig`] says *what* is trained (data, batch, optimizer, schedule of the
//! learning rate); a [`RunSpec`] says *how* a step runs: the parallel layout
//! (`PP × VPP`, `EP`, `DP`, room for `TP`), the pipeline schedule, ZeRO-1 and gradient
//! overlap, the all-to-all's kind, chunking and node map, dynamic expert placement, and
//! the memory options (policy, budget, swap). It is built once — from flags, from a plan
//! file, or from a checkpoint's saved specification plus overrides — saved with every
//! checkpoint, and handed to the trainer, which derives each rank's share of the model
//! ([`RunSpec::share`]) and the options of every pass ([`RunSpec::pass_options`]) from
//! it. No setting is pushed into the model.
//!
//! Nothing here changes the numbers of a step beyond the order of floating-point sums
//! (tests hold every layout to one rank's losses within 1e-5), which is why a resumed
//! run may take a different specification than the one it was saved with.
//!
//! [`TrainConfig`]: crate::trainer::TrainConfig

use crate::trainer::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use ultramoe_dist::Mesh;
use ultramoe_model::moe::placement::Placement;
use ultramoe_model::policy::{describe_policy, LayerPolicy};
use ultramoe_model::tensor_parallel::TensorParallel;
use ultramoe_model::{Error, ExpertSlots, ModelConfig, PassOptions, Result, Share, Stage};
use ultramoe_schedule::{build, Kind, Schedule, Shape};

/// How a training step runs (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSpec {
    /// tensor-parallel size: attention heads, dense FFN and shared experts split over
    /// `tp` ranks that train the same rows (the MoE router and routed experts run whole
    /// on each)
    pub tp: usize,
    /// sequence parallelism (with `tp` ≥ 2): norms, residuals and MoE blocks on each
    /// tensor-parallel rank's `1/tp` of the rows, all-gather and reduce-scatter around
    /// the split blocks instead of all-reduces
    pub sequence_parallel: bool,
    /// pipeline stages
    pub pp: usize,
    /// model chunks per pipeline rank (interleaved 1F1B)
    pub vpp: usize,
    /// expert-parallel size (within a stage)
    pub ep: usize,
    /// data-parallel copies of each expert (within a stage)
    pub dp: usize,
    /// decoder layers per stage (`pp` counts) or per virtual stage (`pp·vpp` counts);
    /// `None`: an even split
    pub pp_layers: Option<Vec<usize>>,
    /// the pipeline schedule
    pub schedule: PipelineSchedule,
    /// ZeRO-1: optimizer moments sharded over the ranks holding the same weights
    pub zero1: bool,
    /// gradients summed layer by layer while the backward pass continues
    pub overlap_grad_reduce: bool,
    /// token chunks each expert-parallel MoE layer pipelines against its all-to-all
    pub overlap_chunks: usize,
    /// hierarchical all-to-all over nodes
    pub hierarchical_a2a: bool,
    /// consecutive ranks per node (`None`: all ranks on one node)
    pub ranks_per_node: Option<usize>,
    /// dynamic expert placement: re-solve where experts live every N steps (0 = off)
    pub placement_every: u64,
    /// extra expert slots per expert-parallel rank, for copies of hot experts
    pub redundant_experts: usize,
    /// per decoder layer (whole model): what its forward keeps, recomputes or swaps out
    /// (empty: keep everything, or what `memory_budget` chooses)
    pub memory_policy: Vec<LayerPolicy>,
    /// bytes a rank's step may hold: when no policy is given, each rank chooses the
    /// cheapest that fits (and the run refuses to start when none does)
    pub memory_budget: Option<u64>,
    /// directory for swap files (default: the system's temporary directory)
    pub swap_dir: Option<PathBuf>,
    /// optimizer moments in a swap file during each step's forward and backward
    pub swap_moments: bool,
    /// bytes of logits the head forms at once, in its backward (0: the whole logits in
    /// the forward, kept until the backward)
    pub head_chunk_bytes: usize,
}

/// Which pipeline schedule runs (see [`ultramoe_schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipelineSchedule {
    /// every forward, then every backward (the reference)
    #[serde(rename = "gpipe")]
    GPipe,
    /// 1F1B (interleaved when `vpp > 1`)
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// 1F1B whose steady-state forward and backward run together, so one micro-batch's
    /// all-to-all waits while the other computes
    #[serde(rename = "overlap")]
    Overlapped,
}

impl PipelineSchedule {
    /// The schedule crate's kind.
    pub fn kind(self) -> Kind {
        match self {
            PipelineSchedule::GPipe => Kind::GPipe,
            PipelineSchedule::OneFOneB => Kind::OneFOneB,
            PipelineSchedule::Overlapped => Kind::Overlapped,
        }
    }

    /// Parses `gpipe`, `1f1b` or `overlap`.
    pub fn parse(text: &str) -> Option<PipelineSchedule> {
        match Kind::parse(text)? {
            Kind::GPipe => Some(PipelineSchedule::GPipe),
            Kind::OneFOneB => Some(PipelineSchedule::OneFOneB),
            Kind::Overlapped => Some(PipelineSchedule::Overlapped),
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        self.kind().name()
    }
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            tp: 1,
            sequence_parallel: false,
            pp: 1,
            vpp: 1,
            ep: 1,
            dp: 1,
            pp_layers: None,
            schedule: PipelineSchedule::OneFOneB,
            zero1: false,
            overlap_grad_reduce: true,
            overlap_chunks: ultramoe_model::pass::DEFAULT_OVERLAP_CHUNKS,
            hierarchical_a2a: false,
            ranks_per_node: None,
            placement_every: 0,
            redundant_experts: 0,
            memory_policy: vec![],
            memory_budget: None,
            swap_dir: None,
            swap_moments: false,
            head_chunk_bytes: ultramoe_model::pass::DEFAULT_HEAD_CHUNK_BYTES,
        }
    }
}

impl RunSpec {
    /// Ranks the layout needs: `TP × PP × EP × DP`.
    pub fn world(&self) -> usize {
        self.tp * self.pp * self.ep * self.dp
    }

    /// Ranks that hold one pipeline stage's slice (`DP × EP`): each trains `1/(DP·EP)` of
    /// every micro-batch's rows (with its tensor-parallel peers).
    pub fn stage_ranks(&self) -> usize {
        self.dp * self.ep
    }

    /// `PP 2 × EP 2 × DP 1` style (`EP 2 × DP 1` without a pipeline), with VPP and the
    /// schedule when they matter.
    pub fn describe(&self) -> String {
        let mut s = if self.pp > 1 { format!("PP {} × EP {} × DP {}", self.pp, self.ep, self.dp) } else { format!("EP {} × DP {}", self.ep, self.dp) };
        if self.tp > 1 {
            s = format!("TP {}{} × {s}", self.tp, if self.sequence_parallel { " (SP)" } else { "" });
        }
        if self.vpp > 1 {
            s += &format!(" (VPP {})", self.vpp);
        }
        if self.pp > 1 || self.schedule == PipelineSchedule::Overlapped {
            s += &format!(", {} schedule", self.schedule.name());
        }
        s
    }

    /// Checks the specification against the model, the training config and the ranks
    /// there are: every error names the field and the reason.
    pub fn validate(&self, cfg: &ModelConfig, tc: &TrainConfig, world: usize) -> Result<()> {
        for (field, v) in [("tp", self.tp), ("pp", self.pp), ("vpp", self.vpp), ("ep", self.ep), ("dp", self.dp), ("overlap_chunks", self.overlap_chunks)] {
            if v == 0 {
                return Err(Error::field(field, "must be at least 1, found 0"));
            }
        }
        if self.world() != world {
            let tp = if self.tp > 1 { format!("tp {} × ", self.tp) } else { String::new() };
            return Err(Error::field("ranks", format!("{world} ranks, but the layout needs {tp}pp {} × ep {} × dp {} = {}", self.pp, self.ep, self.dp, self.world())));
        }
        if self.tp > 1 {
            if self.hierarchical_a2a {
                return Err(Error::field("hierarchical_a2a", "a hierarchical all-to-all with tensor parallelism is not built yet; use tp 1"));
            }
            ultramoe_model::model::check_tensor_parallel(cfg, self.tp)?;
        }
        if self.sequence_parallel {
            if self.tp < 2 {
                return Err(Error::field("sequence_parallel", "sequence parallelism splits rows over tensor-parallel ranks: it needs tp 2 or more"));
            }
            let rows = tc.micro_batch / self.stage_ranks().max(1) * tc.seq_len;
            if !rows.is_multiple_of(self.tp) {
                return Err(Error::field("sequence_parallel", format!("a rank's {rows} tokens per micro-batch do not split over {} tensor-parallel ranks", self.tp)));
            }
            // The sequence-wise loss is taken per sequence: each rank's slice of the
            // rows must hold whole sequences.
            let sequences = tc.micro_batch / self.stage_ranks().max(1);
            if tc.aux_loss.as_ref().is_some_and(|a| a.kind == "sequence") && !sequences.is_multiple_of(self.tp) {
                return Err(Error::field(
                    "aux_loss",
                    format!("the sequence-wise loss with sequence parallelism needs whole sequences on each rank: a rank's {sequences} sequences per micro-batch do not split over {} tensor-parallel ranks", self.tp),
                ));
            }
        }
        if self.pp > cfg.n_layers {
            return Err(Error::field("pp", format!("{} stages for {} layers", self.pp, cfg.n_layers)));
        }
        if self.vpp > 1 && self.pp == 1 {
            return Err(Error::field("vpp", "interleaving needs pipeline parallelism (pp ≥ 2)"));
        }
        Stage::split(cfg.n_layers, self.pp, self.vpp, 0, self.pp_layers.as_deref()).map_err(|e| Error::field(self.split_field(), e))?;
        let m = tc.grad_accum;
        if self.pp > 1 && m < self.pp {
            return Err(Error::field("grad_accum", format!("{m} micro-batches cannot fill {} pipeline stages (give at least {})", self.pp, self.pp)));
        }
        if self.schedule == PipelineSchedule::Overlapped && m < 2 {
            return Err(Error::field("grad_accum", "the overlapped schedule pairs micro-batches: it needs at least 2"));
        }
        self.schedule_for(tc).map_err(|e| Error::field("grad_accum", e))?;
        let rows = self.stage_ranks();
        if !tc.micro_batch.is_multiple_of(rows) {
            return Err(Error::field("micro_batch", format!("{} rows cannot be split evenly over {rows} ranks per stage (ep × dp)", tc.micro_batch)));
        }
        if self.pp > 1 && cfg.tie_word_embeddings {
            return Err(Error::field("tie_word_embeddings", "a tied embedding and head on different pipeline stages is not supported; train this model with pp 1"));
        }
        if (self.placement_every > 0 || self.redundant_experts > 0) && self.ep < 2 {
            return Err(Error::field("placement_every", "dynamic expert placement and redundant experts need expert parallelism (ep 2 or more)"));
        }
        if cfg.n_moe_layers() > 0 && !cfg.moe.n_experts.is_multiple_of(self.ep) {
            return Err(Error::field("ep", format!("{} expert-parallel ranks do not divide {} experts", self.ep, cfg.moe.n_experts)));
        }
        if self.memory_policy.len() > cfg.n_layers {
            return Err(Error::field("memory_policy", format!("{} layer policies for {} layers", self.memory_policy.len(), cfg.n_layers)));
        }
        if let Some(r) = self.ranks_per_node {
            if r == 0 {
                return Err(Error::field("ranks_per_node", "must be at least 1, found 0"));
            }
        }
        if self.hierarchical_a2a {
            // Expert-parallel groups are consecutive ranks: nodes of `per_node` ranks cut
            // each into whole nodes when `per_node` divides it.
            let per_node = self.ranks_per_node.unwrap_or(world).min(self.ep);
            if per_node < 2 || per_node >= self.ep || !self.ep.is_multiple_of(per_node) {
                return Err(Error::field(
                    "hierarchical_a2a",
                    format!(
                        "a hierarchical all-to-all (--hierarchical-a2a) needs several nodes of several ranks: {} ranks per node over {} expert-parallel ranks (set --ranks-per-node)",
                        self.ranks_per_node.unwrap_or(world),
                        self.ep
                    ),
                ));
            }
        }
        Ok(())
    }

    fn split_field(&self) -> &'static str {
        if self.pp_layers.is_some() {
            "pp_layers"
        } else {
            "pp"
        }
    }

    /// The pipeline schedule of every pipeline rank for `tc`'s micro-batches.
    pub fn schedule_for(&self, tc: &TrainConfig) -> std::result::Result<Schedule, String> {
        build(self.schedule.kind(), Shape { pp: self.pp, vpp: self.vpp, micro_batches: tc.grad_accum })
    }

    /// The pipeline split seen from pipeline rank `rank`.
    pub fn stage(&self, cfg: &ModelConfig, rank: usize) -> Result<Stage> {
        Stage::split(cfg.n_layers, self.pp, self.vpp, rank, self.pp_layers.as_deref()).map_err(|e| Error::field(self.split_field(), e))
    }

    /// This rank's share of the model on `mesh` (or alone), its experts placed as
    /// `placed` says (a resumed run's placement) or in contiguous blocks.
    pub fn share(&self, cfg: &ModelConfig, mesh: Option<&Mesh>, placed: Option<Vec<Placement>>) -> Result<Share> {
        let stage = self.stage(cfg, mesh.map_or(0, |m| m.pp.rank()))?;
        let experts = match placed {
            Some(p) => ExpertSlots::Placed(p),
            None => ExpertSlots::Contiguous { redundant: self.redundant_experts },
        };
        Ok(Share {
            stage,
            ep: mesh.map(|m| m.ep.clone()),
            experts,
            ep_nodes: mesh.map(|m| m.ep_nodes()).unwrap_or_default(),
            hierarchical: self.hierarchical_a2a,
            tp: mesh.filter(|m| m.tp_size() > 1).map(|m| std::sync::Arc::new(TensorParallel::new(m.tp.clone(), self.sequence_parallel))),
        })
    }

    /// The options of every pass of this run (the memory policy as given; a budget's
    /// choice is made by the trainer, per rank).
    pub fn pass_options(&self, tc: &TrainConfig) -> Result<PassOptions> {
        let balance_loss = match &tc.aux_loss {
            // Each micro-batch and each rank of a stage contributes its share of the
            // step's mean.
            Some(a) => Some((a.kind(tc.seq_len)?, a.coef / (tc.grad_accum.max(1) * self.stage_ranks()) as f32)),
            None => None,
        };
        Ok(PassOptions {
            policy: self.memory_policy.clone(),
            swap_dir: self.swap_dir.clone().unwrap_or_else(std::env::temp_dir),
            swap_moments: self.swap_moments,
            overlap_chunks: self.overlap_chunks,
            balance_loss,
            routing_skew: tc.routing_skew,
            head_chunk_bytes: self.head_chunk_bytes,
        })
    }

    /// The memory options in words, for messages.
    pub fn describe_memory(&self) -> String {
        let mut s = describe_policy(&self.memory_policy);
        if self.swap_moments {
            s += ", optimizer moments swapped";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layers: usize) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type": "mixtral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": {layers},
                "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 32}}"#
        ))
        .unwrap()
    }

    #[test]
    fn bad_layouts_are_one_line_errors_naming_the_field() {
        let tc = TrainConfig { micro_batch: 8, grad_accum: 4, ..TrainConfig::default() };
        let ok = RunSpec { pp: 2, ep: 2, ..RunSpec::default() };
        ok.validate(&cfg(4), &tc, 4).unwrap();
        let cases: Vec<(RunSpec, usize, usize, &str)> = vec![
            (ok.clone(), 4, 8, "ranks"),
            (RunSpec { pp: 3, ..RunSpec::default() }, 4, 3, "--pp-layers"),
            (RunSpec { pp: 2, pp_layers: Some(vec![1, 2]), ..RunSpec::default() }, 4, 2, "pp_layers"),
            (RunSpec { pp: 2, vpp: 3, ..RunSpec::default() }, 4, 2, "pp"),
            (RunSpec { pp: 1, vpp: 2, ..RunSpec::default() }, 4, 1, "vpp"),
            (RunSpec { pp: 8, ..RunSpec::default() }, 4, 8, "pp"),
            (RunSpec { pp: 4, ..RunSpec::default() }, 4, 4, "grad_accum"),
            (RunSpec { ep: 3, ..RunSpec::default() }, 4, 3, "micro_batch"),
            (RunSpec { tp: 2, ..RunSpec::default() }, 4, 4, "ranks"),
            (RunSpec { tp: 4, ..RunSpec::default() }, 4, 4, "num_attention_heads"),
            (RunSpec { tp: 2, hierarchical_a2a: true, ..RunSpec::default() }, 4, 2, "hierarchical_a2a"),
            (RunSpec { sequence_parallel: true, ..RunSpec::default() }, 4, 1, "sequence_parallel"),
            (RunSpec { placement_every: 5, ..RunSpec::default() }, 4, 1, "placement_every"),
        ];
        for (spec, layers, world, field) in cases {
            let tc = if field == "grad_accum" { TrainConfig { grad_accum: 2, ..tc.clone() } } else { tc.clone() };
            let e = spec.validate(&cfg(layers), &tc, world).unwrap_err().to_string();
            assert!(e.contains(field) && !e.contains('\n'), "{spec:?}: {e}");
        }
        // interleaving needs the micro-batches in groups of pp
        let e = RunSpec { pp: 2, vpp: 2, ..RunSpec::default() }.validate(&cfg(4), &TrainConfig { grad_accum: 3, ..tc.clone() }, 2).unwrap_err();
        assert!(e.to_string().contains("multiple of pp"), "{e}");
    }

    /// The sequence-wise balancing loss under sequence parallelism needs whole sequences
    /// on each tensor-parallel rank; the batch-wide losses do not.
    #[test]
    fn the_sequence_wise_loss_needs_whole_sequences_per_rank_under_sequence_parallelism() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "mixtral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 32}"#,
        )
        .unwrap();
        let spec = RunSpec { tp: 2, sequence_parallel: true, ..RunSpec::default() };
        let tc = |micro_batch: usize, kind: &str| TrainConfig {
            micro_batch,
            seq_len: 16,
            aux_loss: Some(crate::trainer::AuxLossConfig { kind: kind.into(), coef: 0.01, ep_groups: 1 }),
            ..TrainConfig::default()
        };
        spec.validate(&cfg, &tc(4, "sequence"), 2).unwrap();
        spec.validate(&cfg, &tc(3, "switch"), 2).unwrap();
        let e = spec.validate(&cfg, &tc(3, "sequence"), 2).unwrap_err().to_string();
        assert!(e.contains("aux_loss") && e.contains("whole sequences") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn a_spec_survives_json_and_fills_defaults() {
        let s = RunSpec { pp: 4, vpp: 2, pp_layers: Some(vec![3, 5, 5, 3]), schedule: PipelineSchedule::Overlapped, ..RunSpec::default() };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"overlap\""), "{text}");
        assert_eq!(serde_json::from_str::<RunSpec>(&text).unwrap(), s);
        let partial: RunSpec = serde_json::from_str(r#"{"pp": 2}"#).unwrap();
        assert_eq!(partial, RunSpec { pp: 2, ..RunSpec::default() });
    }
}
