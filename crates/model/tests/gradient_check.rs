//! Finite-difference checks of the whole model's backward pass, for every architecture
//! and for the Pangu options (depth-scaled sandwich norm, TinyInit), on configs other
//! than the fixtures'.
//!
//! The check is directional: for a random direction `d`,
//! `(L(w + εd) − L(w − εd)) / 2ε ≈ ⟨∇L, d⟩`. One scalar per direction is robust in f32
//! and exercises every parameter at once.

use ultramoe_kernels::balance::BalanceLoss;
use ultramoe_model::init::{init_weights, Rng};
use ultramoe_model::{shifted_targets, Model, ModelConfig, PassOptions};

fn config(model_type: &str, extra: &str) -> ModelConfig {
    let base = match model_type {
        "deepseek_v3" => r#""model_type": "deepseek_v3", "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
            "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 3, "q_lora_rank": 10, "kv_lora_rank": 6,
            "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 5, "n_routed_experts": 6, "num_experts_per_tok": 2,
            "n_shared_experts": 2, "n_group": 3, "topk_group": 2, "routed_scaling_factor": 1.7, "norm_topk_prob": true,
            "rope_interleave": true"#,
        "deepseek_v3_nolora" => r#""model_type": "deepseek_v3", "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
            "num_hidden_layers": 2, "first_k_dense_replace": 0, "num_attention_heads": 2, "q_lora_rank": null, "kv_lora_rank": 6,
            "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 3, "n_routed_experts": 4, "num_experts_per_tok": 3,
            "n_shared_experts": 0, "norm_topk_prob": false, "rope_interleave": false,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0}"#,
        "qwen3_moe" => r#""model_type": "qwen3_moe", "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "num_experts": 5,
            "num_experts_per_tok": 2, "norm_topk_prob": false, "mlp_only_layers": [1], "rope_theta": 1000.0"#,
        "mixtral" => r#""model_type": "mixtral", "hidden_size": 24, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "num_local_experts": 3, "num_experts_per_tok": 2"#,
        _ => unreachable!(),
    };
    let json = format!(r#"{{ {base}, "vocab_size": 37, "max_position_embeddings": 64, "rms_norm_eps": 1e-6 {extra} }}"#);
    ModelConfig::from_json_str(&json).unwrap()
}

/// Objective (cross-entropy plus any auxiliary balancing loss) and the routing it took
/// (per-layer expert loads).
fn loss(model: &Model, w: &[f32], ids: &[u32], b: usize, t: usize, opts: &PassOptions) -> (f64, Vec<Vec<usize>>) {
    let fwd = model.forward_with(w, ids, b, t, opts);
    (model.loss(&fwd, &shifted_targets(ids, t)).0 as f64 + fwd.aux_loss() as f64, fwd.expert_counts())
}

fn check(model_type: &str, extra: &str) {
    check_with(model_type, extra, None)
}

fn check_with(model_type: &str, extra: &str, aux: Option<(BalanceLoss, f32)>) {
    let model = Model::new(config(model_type, extra));
    let opts = PassOptions { balance_loss: aux, ..PassOptions::default() };
    let w = init_weights(&model.layout, 5);
    // Larger weights than the 0.02 init make every path's gradient visible.
    let w: Vec<f32> = w.iter().zip(model.layout.specs.iter().flat_map(|s| std::iter::repeat_n(s.shape.len(), s.len())))
        .map(|(x, rank)| if rank >= 2 { x * 10.0 } else { *x })
        .collect();
    let (b, t) = (2, 9);
    let mut rng = Rng::new(11);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.range(0, 36) as u32).collect();
    let targets = shifted_targets(&ids, t);
    let fwd = model.forward_with(&w, &ids, b, t, &opts);
    let (_, count) = model.loss(&fwd, &targets);
    let mut g = vec![0.0f32; w.len()];
    model.backward_with(&w, &mut g, fwd, &targets, 1.0 / count as f32, &opts);
    let frozen: Vec<bool> = model.layout.specs.iter().flat_map(|s| std::iter::repeat_n(s.frozen, s.len())).collect();
    let base_routing = loss(&model, &w, &ids, b, t, &opts).1;
    let mut checked = 0;
    for dir in 0..40 {
        let d: Vec<f32> = frozen.iter().map(|&f| if f { 0.0 } else { rng.normal() as f32 }).collect();
        let eps = 3e-4f32;
        let wp: Vec<f32> = w.iter().zip(&d).map(|(a, b)| a + eps * b).collect();
        let wm: Vec<f32> = w.iter().zip(&d).map(|(a, b)| a - eps * b).collect();
        let ((lp, rp), (lm, rm)) = (loss(&model, &wp, &ids, b, t, &opts), loss(&model, &wm, &ids, b, t, &opts));
        // Top-k routing is piecewise constant: a step that changes a decision has no
        // derivative to compare with, so such directions are skipped.
        if rp != base_routing || rm != base_routing {
            continue;
        }
        let numeric = (lp - lm) / (2.0 * eps as f64);
        let analytic: f64 = g.iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
        // Tolerance: 1% plus the f32 rounding of two loss evaluations, 4·ε_f32·|L|/(2ε).
        let floor = 4.0 * f32::EPSILON as f64 * lp.abs() / (2.0 * eps as f64);
        let err = (numeric - analytic).abs();
        assert!(
            err <= 1e-2 * analytic.abs() + floor,
            "{model_type}{extra} direction {dir}: numeric {numeric} vs analytic {analytic} (err {err}, floor {floor})"
        );
        checked += 1;
        if checked == 4 {
            break;
        }
    }
    assert!(checked >= 3, "{model_type}{extra}: only {checked} directions kept the routing fixed");
}

#[test]
fn deepseek_v3_with_group_limited_routing_and_shared_experts() {
    check("deepseek_v3", "");
}

#[test]
fn deepseek_v3_without_query_lora_with_yarn() {
    check("deepseek_v3_nolora", "");
}

#[test]
fn qwen3_moe_with_dense_layer_and_gqa() {
    check("qwen3_moe", "");
}

#[test]
fn mixtral_with_mqa() {
    check("mixtral", "");
}

#[test]
fn balancing_losses_join_the_objective() {
    check_with("deepseek_v3", "", Some((BalanceLoss::Switch, 0.5)));
    check_with("deepseek_v3", "", Some((BalanceLoss::EpGroup { groups: 3 }, 0.5)));
    check_with("qwen3_moe", "", Some((BalanceLoss::Sequence { seq_len: 9 }, 0.5)));
    check_with("mixtral", "", Some((BalanceLoss::ZLoss, 0.05)));
}

#[test]
fn sandwich_norm_and_tiny_init() {
    for mt in ["deepseek_v3", "qwen3_moe", "mixtral"] {
        check(mt, r#", "sandwich_norm": true, "tiny_init": true"#);
    }
}

#[test]
fn sandwich_norm_gains_start_depth_scaled_and_tiny_init_shrinks_std() {
    let plain = Model::new(config("qwen3_moe", ""));
    let pangu = Model::new(config("qwen3_moe", r#", "sandwich_norm": true, "tiny_init": true"#));
    let w = init_weights(&pangu.layout, 1);
    let gain = pangu.layout.get("model.layers.2.post_mlp_layernorm.weight").expect("sandwich norm registered");
    assert!(w[gain.range()].iter().all(|&x| (x - 1.0 / 3f32.sqrt()).abs() < 1e-6), "gain must start at 1/sqrt(L)");
    let std = |m: &Model, w: &[f32]| {
        let s = m.layout.get("model.layers.0.self_attn.q_proj.weight").unwrap();
        let v = &w[s.range()];
        (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
    };
    let expect = (1.0 / (2.0 * 24.0 * 3.0f32)).sqrt();
    assert!((std(&pangu, &w) - expect).abs() < 0.25 * expect, "TinyInit std {} vs {expect}", std(&pangu, &w));
    assert!((std(&plain, &init_weights(&plain.layout, 1)) - 0.02).abs() < 0.005);
}
