//! A MoE layer's one-rank backward worked through its routed rows in pieces (as the top
//! MoE layer of a model chunk runs it, to hold the experts' temporaries for a quarter
//! of the rows) against the same backward over all rows at once.

use ultramoe_model::decoder::FfnBlock;
use ultramoe_model::init::{init_weights, Rng};
use ultramoe_model::moe::layer::MoeCtx;
use ultramoe_model::{Model, ModelConfig};

/// Within 1e-5 of the largest magnitude (a piece that cuts inside an expert's rows sums
/// its weight gradient over two products: rounding, where terms cancel, is relative to
/// the terms, not to the sum).
fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "{what} {i}: {x} vs {y}");
    }
}

#[test]
fn pieces_give_the_whole_backward() {
    // Shared experts on (DeepSeek-V3) and off (Qwen3-MoE); 8 experts, top-3.
    for body in [
        r#""model_type": "deepseek_v3", "first_k_dense_replace": 0, "n_routed_experts": 8, "n_shared_experts": 1,
           "moe_intermediate_size": 12, "kv_lora_rank": 8, "q_lora_rank": 0, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
           "v_head_dim": 4, "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "scoring_func": "sigmoid""#,
        r#""model_type": "qwen3_moe", "num_experts": 8, "moe_intermediate_size": 12, "head_dim": 6, "num_key_value_heads": 2"#,
    ] {
        let json = format!(
            r#"{{ {body}, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_experts_per_tok": 3, "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-6 }}"#
        );
        let m = Model::new(ModelConfig::from_json_str(&json).unwrap());
        let FfnBlock::Moe(moe) = &m.layers[0].ffn else { panic!("a MoE layer") };
        let w: Vec<f32> = init_weights(&m.layout, 3).iter().map(|x| x * 10.0).collect();
        let (n, h) = (101, 24);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..n * h).map(|_| rng.normal() as f32).collect();
        let dy: Vec<f32> = (0..n * h).map(|_| rng.normal() as f32).collect();
        let (_, saved) = moe.forward(&w, &x, n, &MoeCtx::local());
        let backward = |pieces: usize| {
            let mut g = vec![0.0f32; m.layout.total];
            let dx = moe.backward(&w, &mut g, &x, &saved, &dy, n, &MoeCtx { backward_pieces: pieces, ..MoeCtx::local() });
            (dx, g)
        };
        let (dx_whole, g_whole) = backward(1);
        assert!(g_whole.iter().any(|v| *v != 0.0) && dx_whole.iter().any(|v| *v != 0.0));
        // 303 routed rows: 4 pieces of ≤ 76, 7 of ≤ 44, and more pieces than experts
        // (every piece then cuts inside an expert's rows).
        for pieces in [4, 7, 20] {
            let (dx, g) = backward(pieces);
            close(&dx, &dx_whole, &format!("input gradient, {pieces} pieces"));
            close(&g, &g_whole, &format!("weight gradients, {pieces} pieces"));
        }
    }
}
