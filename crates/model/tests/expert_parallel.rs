//! Expert parallelism changes where experts run, not what the model computes: the
//! logits, loss and gradients of P ranks (each holding E/P experts and B/P rows of the
//! batch, tokens crossing ranks by all-to-all) equal one rank's on the whole batch.

use std::sync::Arc;
use std::time::Duration;
use ultramoe_dist::{local, ProcessGroup};
use ultramoe_model::init::{init_weights, Rng};
use ultramoe_model::{shifted_targets, Model, ModelConfig, PassOptions, Share};

fn config(model_type: &str) -> ModelConfig {
    let base = match model_type {
        "deepseek_v3" => r#""model_type": "deepseek_v3", "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
            "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 3, "q_lora_rank": 10, "kv_lora_rank": 6,
            "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 5, "n_routed_experts": 8, "num_experts_per_tok": 3,
            "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.7, "norm_topk_prob": true"#,
        "qwen3_moe" => r#""model_type": "qwen3_moe", "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "num_experts": 4,
            "num_experts_per_tok": 2, "norm_topk_prob": true"#,
        _ => unreachable!(),
    };
    let json = format!(r#"{{ {base}, "vocab_size": 37, "max_position_embeddings": 64, "rms_norm_eps": 1e-6 }}"#);
    ModelConfig::from_json_str(&json).unwrap()
}

/// Logits may differ from one rank's by this fraction of the largest logit. The ranks
/// multiply other row counts than one rank does (at EP 4 a rank may send an expert a
/// single row), and the gemm crate's kernels for those shapes round differently on some
/// CPUs (measured on an AVX2-only EPYC: 4 of 40 tokens off by 2.4e-5 of the largest
/// logit, the rest bitwise equal); the ×20 weights amplify one rounding through three
/// layers. A routing or dispatch error moves logits by a large fraction of their size.
const LOGIT_TOLERANCE: f32 = 1e-4;

/// Logits and named gradients of one rank's share.
struct Result {
    logits: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
}

fn run(model: &Model, ids: &[u32], b: usize, t: usize, count: usize, chunks: usize) -> Result {
    // Larger weights than the 0.02 init spread the routing over every expert.
    let w: Vec<f32> = init_weights(&model.layout, 5).iter().map(|x| x * 20.0).collect();
    let opts = PassOptions { overlap_chunks: chunks, ..PassOptions::default() };
    let fwd = model.forward_with(&w, ids, b, t, &opts);
    let logits = fwd.logits.clone();
    let mut g = vec![0.0; model.layout.total];
    model.backward_with(&w, &mut g, fwd, &shifted_targets(ids, t), 1.0 / count as f32, &opts);
    let grads = model.layout.specs.iter().map(|s| (s.name.clone(), g[s.range()].to_vec())).collect();
    Result { logits, grads }
}

/// This rank's share of an expert-parallel model over `group`, its ranks on the nodes
/// `nodes` says, with a hierarchical all-to-all when `hierarchical`.
fn share(cfg: ultramoe_model::ModelConfig, group: Arc<dyn ProcessGroup>, nodes: Vec<usize>, hierarchical: bool) -> Model {
    let share = Share { ep: Some(group), ep_nodes: nodes, hierarchical, ..Share::whole(&cfg) };
    Model::share(cfg, share).unwrap()
}

fn check(model_type: &'static str, p: usize) {
    for chunks in [1, 3] {
        check_chunks(model_type, p, chunks);
    }
}

/// EP over `p` ranks with the MoE layers pipelined in `chunks` token chunks.
fn check_chunks(model_type: &'static str, p: usize, chunks: usize) {
    let (b, t) = (4, 10);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.range(0, 36) as u32).collect();
    let count = shifted_targets(&ids, t).iter().filter(|&&x| x >= 0).count();
    let single = run(&Model::new(config(model_type)), &ids, b, t, count, 1);
    let ids2 = ids.clone();
    let shares = local::run(p, Duration::from_secs(30), move |c| {
        let group: Arc<dyn ProcessGroup> = Arc::new(c);
        let model = Model::expert_parallel(config(model_type), group.clone()).unwrap();
        let rows = b / p;
        let r = group.rank();
        let mut s = run(&model, &ids2[r * rows * t..(r + 1) * rows * t], rows, t, count, chunks);
        // Replicated tensors' gradients are partial sums over each rank's rows.
        for (name, g) in &mut s.grads {
            if !name.contains(".experts.") {
                group.all_reduce_f32(g)?;
            }
        }
        Ok(s)
    })
    .unwrap();
    let logits: Vec<f32> = shares.iter().flat_map(|s| s.logits.clone()).collect();
    let scale = single.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (a, b) in logits.iter().zip(&single.logits) {
        assert!((a - b).abs() <= LOGIT_TOLERANCE * scale, "{model_type} EP{p}: logit {a} vs {b}");
    }
    let mut seen = 0;
    for (name, g1) in &single.grads {
        let owners: Vec<&Vec<f32>> = shares.iter().filter_map(|s| s.grads.iter().find(|(n, _)| n == name).map(|(_, g)| g)).collect();
        let expected_owners = if name.contains(".experts.") { 1 } else { p };
        assert_eq!(owners.len(), expected_owners, "{name} held by {} ranks", owners.len());
        // f32 sums over a different split of rows (GEMM blocking changes with the row
        // count): agreement to 1e-3 of the tensor's largest gradient, as for the fixtures.
        let scale = g1.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for gp in owners {
            for (a, b) in gp.iter().zip(g1) {
                assert!((a - b).abs() <= 1e-3 * scale, "{model_type} EP{p}: {name} grad {a} vs {b} (max {scale})");
            }
        }
        seen += 1;
    }
    assert_eq!(seen, Model::new(config(model_type)).layout.specs.len());
}

#[test]
fn deepseek_v3_expert_parallel_matches_one_rank() {
    check("deepseek_v3", 2);
    check("deepseek_v3", 4);
}

#[test]
fn qwen3_moe_expert_parallel_matches_one_rank() {
    check("qwen3_moe", 2);
    check("qwen3_moe", 4);
}

#[test]
fn experts_must_split_evenly() {
    let err = local::run(3, Duration::from_secs(30), |c| {
        let group: Arc<dyn ProcessGroup> = Arc::new(c);
        Ok(Model::expert_parallel(config("qwen3_moe"), group).err().map(|e| e.to_string()))
    })
    .unwrap();
    assert!(err[0].as_deref().unwrap_or("").contains("n_routed_experts"), "{err:?}");
}

#[test]
fn exchange_bytes_are_counted_by_node() {
    // 4 ranks on two "nodes" {0, 1} and {2, 3}.
    let (b, t, h) = (4usize, 10usize, 24u64);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.range(0, 36) as u32).collect();
    let per_rank = local::run(4, Duration::from_secs(30), move |c| {
        let group: Arc<dyn ProcessGroup> = Arc::new(c);
        let model = share(config("qwen3_moe"), group.clone(), vec![0, 0, 1, 1], false);
        let r = group.rank();
        let rows = &ids[r * t..(r + 1) * t];
        let w: Vec<f32> = init_weights(&model.layout, 5).iter().map(|x| x * 20.0).collect();
        let fwd = model.forward(&w, rows, 1, t);
        let counts = fwd.expert_counts();
        let mut g = vec![0.0; model.layout.total];
        model.backward(&w, &mut g, fwd, &shifted_targets(rows, t), 0.1);
        Ok((r, counts, model.take_exchange_totals()))
    })
    .unwrap();
    // Each (token, expert) pair on another rank crosses four times (dispatch, combine and
    // their backwards; sent once by each side), `H` floats per row: over all ranks the
    // bytes sent equal 4 · 4 · H · (pairs between ranks), split by whether the two ranks
    // share a node.
    let (mut same, mut other) = (0u64, 0u64);
    let mut totals = ultramoe_model::moe::dispatcher::ExchangeTotals::default();
    for (r, counts, x) in &per_rank {
        // qwen3 config: 4 experts, one per rank.
        for layer in counts {
            for (e, &n) in layer.iter().enumerate().filter(|&(e, _)| e != *r) {
                if e / 2 == r / 2 {
                    same += n as u64
                } else {
                    other += n as u64
                }
            }
        }
        assert!(x.seconds > 0.0);
        totals.intra_node_bytes += x.intra_node_bytes;
        totals.inter_node_bytes += x.inter_node_bytes;
        totals.inter_node_bytes_hierarchical += x.inter_node_bytes_hierarchical;
    }
    assert!(same > 0 && other > 0, "routing reaches both nodes");
    assert_eq!(totals.intra_node_bytes, 4 * 4 * h * same);
    assert_eq!(totals.inter_node_bytes, 4 * 4 * h * other);
    // With top-2 over 4 experts, a token sometimes picks both experts of the remote
    // node: then it crosses once instead of twice.
    assert!(totals.inter_node_bytes_hierarchical <= totals.inter_node_bytes);
    assert!(totals.inter_node_bytes_hierarchical >= totals.inter_node_bytes / 2);
}

#[test]
fn hierarchical_all_to_all_matches_flat_and_crosses_nodes_once_per_token() {
    // 4 ranks on two "nodes" {0, 1} and {2, 3}; deepseek config: 8 experts top-3, so
    // tokens often pick several experts on one node.
    let (b, t) = (4usize, 10usize);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.range(0, 36) as u32).collect();
    let count = shifted_targets(&ids, t).iter().filter(|&&x| x >= 0).count();
    let single = run(&Model::new(config("deepseek_v3")), &ids, b, t, count, 1);
    for chunks in [1, 2] {
        let ids2 = ids.clone();
        let out = local::run(4, Duration::from_secs(30), move |c| {
            let group: Arc<dyn ProcessGroup> = Arc::new(c);
            let model = share(config("deepseek_v3"), group.clone(), vec![0, 0, 1, 1], true);
            let r = group.rank();
            let mut s = run(&model, &ids2[r * t..(r + 1) * t], 1, t, count, chunks);
            for (name, g) in &mut s.grads {
                if !name.contains(".experts.") {
                    group.all_reduce_f32(g)?;
                }
            }
            Ok((s, model.take_exchange_totals()))
        })
        .unwrap();
        let logits: Vec<f32> = out.iter().flat_map(|(s, _)| s.logits.clone()).collect();
        let scale = single.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in logits.iter().zip(&single.logits) {
            assert!((a - b).abs() <= LOGIT_TOLERANCE * scale, "hierarchical, {chunks} chunks: logit {a} vs {b}");
        }
        for (name, g1) in &single.grads {
            let gscale = g1.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            for (s, _) in &out {
                if let Some((_, gp)) = s.grads.iter().find(|(n, _)| n == name) {
                    for (a, b) in gp.iter().zip(g1) {
                        assert!((a - b).abs() <= 1e-3 * gscale, "hierarchical: {name} grad {a} vs {b}");
                    }
                }
            }
        }
        // Inter-node bytes: exactly the routing's prediction (one row per token and remote
        // node per exchange) plus the metadata rows carry: 2K floats on the dispatch
        // (expert ids, weights) and K on the combine backward (dweights).
        let (h, k) = (24u64, 3u64);
        let actual: u64 = out.iter().map(|(_, x)| x.inter_node_bytes).sum();
        let predicted: u64 = out.iter().map(|(_, x)| x.inter_node_bytes_hierarchical).sum();
        assert!(predicted > 0);
        assert_eq!(actual * 4 * h, predicted * (4 * h + 3 * k), "actual {actual}, predicted {predicted}");
    }
}
