//! The training head formed in row chunks (final norm → LM head → cross-entropy →
//! backward, `rows × V` logits at a time) against the whole-logits path. A row's
//! logits, loss and input gradient sum over the hidden and vocabulary sizes, which
//! chunks do not split: they are the whole path's bits wherever this machine's GEMM
//! gives a row the same bits whatever rows share the product (checked here first; the
//! comparison falls back to a tolerance otherwise). The LM head's weight gradient sums
//! over rows chunk by chunk, so it matches up to rounding.

use ultramoe_kernels::gemm::linear;
use ultramoe_model::init::{init_weights, Rng};
use ultramoe_model::{shifted_targets, Model, ModelConfig, PassOptions};

fn model(vocab: usize) -> Model {
    let json = format!(
        r#"{{ "model_type": "qwen3_moe", "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "num_experts": 4,
            "num_experts_per_tok": 2, "vocab_size": {vocab}, "max_position_embeddings": 64, "rms_norm_eps": 1e-6 }}"#
    );
    Model::new(ModelConfig::from_json_str(&json).unwrap())
}

/// Whether `linear` gives every row the same bits computed `rows` at a time as all at once.
fn gemm_rows_independent(x: &[f32], w: &[f32], n: usize, h: usize, v: usize, rows: usize) -> bool {
    let whole = linear(x, w, n, h, v);
    (0..n).step_by(rows).all(|r0| {
        let r1 = (r0 + rows).min(n);
        let r1 = if n - r1 == 1 { n } else { r1 };
        linear(&x[r0 * h..r1 * h], w, r1 - r0, h, v).iter().zip(&whole[r0 * v..r1 * v]).all(|(a, b)| a.to_bits() == b.to_bits())
    })
}

fn close(a: &[f32], b: &[f32], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-3), "{what} {i}: {x} vs {y}");
    }
}

#[test]
fn chunked_head_matches_the_whole_logits() {
    let (v, h) = (300, 24);
    let m = model(v);
    let w: Vec<f32> = init_weights(&m.layout, 3).iter().map(|x| x * 20.0).collect();
    let (b, t) = (4, 37);
    let n = b * t;
    let mut rng = Rng::new(7);
    let x: Vec<f32> = (0..n * h).map(|_| rng.normal() as f32).collect();
    let ids: Vec<u32> = (0..n).map(|_| rng.range(0, v as i64 - 1) as u32).collect();
    let targets = shifted_targets(&ids, t); // the last position of each row has none
    let scale = 1.0 / 100.0;
    let (norm, lm) = (m.final_norm.clone().unwrap(), m.lm_head.clone().unwrap());
    // Whole logits.
    let mut g_whole = vec![0.0f32; m.layout.total];
    let mut head = m.head_forward(&w, x.clone());
    assert_eq!(head.logits.len(), n * v);
    let whole_bytes = head.bytes();
    let (loss_w, count_w, dx_w) = m.head_backward(&w, &mut g_whole, &mut head, &targets, scale);
    // 16 rows at a time (148 rows: 8 chunks of 16 and one of 20), and 21 (7 of 21 and
    // a last row that joins the chunk before it).
    for rows in [16, 21] {
        let opts = PassOptions { head_chunk_bytes: 4 * v * rows, ..PassOptions::default() };
        assert_eq!(opts.head_chunk_rows(n, v), Some(rows));
        let mut g = vec![0.0f32; m.layout.total];
        let mut head = m.head_forward_for_training(&w, x.clone(), &opts);
        assert!(head.logits.is_empty());
        assert_eq!(whole_bytes - head.bytes(), 4 * n * v, "the forward keeps no logits");
        let (loss, count) = {
            let (loss, count, dx) = m.head_backward(&w, &mut g, &mut head, &targets, scale);
            // (the head's GEMM input is the normed x; x of the same shapes shows how
            // the GEMM rounds as well)
            if gemm_rows_independent(&x, &w[lm.clone()], n, h, v, rows) {
                assert!(dx.iter().zip(&dx_w).all(|(a, b)| a.to_bits() == b.to_bits()), "input gradient differs ({rows} rows)");
                assert!(g[norm.clone()].iter().zip(&g_whole[norm.clone()]).all(|(a, b)| a.to_bits() == b.to_bits()));
                assert_eq!(loss.to_bits(), loss_w.to_bits());
            } else {
                eprintln!("this machine's GEMM rounds a row by the rows beside it: comparing within 1e-5");
                close(&dx, &dx_w, "input gradient");
                close(&g[norm.clone()], &g_whole[norm.clone()], "final norm gradient");
                assert!((loss - loss_w).abs() <= 1e-9 * loss_w.abs());
            }
            (loss, count)
        };
        assert_eq!(count, count_w);
        assert_eq!(count, n - b);
        assert!(loss.is_finite() && loss > 0.0);
        close(&g[lm.clone()], &g_whole[lm.clone()], "lm_head gradient");
        assert!(g[lm.clone()].iter().any(|x| *x != 0.0));
        // Nothing outside the head is touched.
        assert!(g.iter().enumerate().all(|(i, x)| lm.contains(&i) || norm.contains(&i) || *x == 0.0));
    }
    // One chunk covering every row is the whole path exactly, head weight included.
    let one = PassOptions { head_chunk_bytes: 4 * v * n, ..PassOptions::default() };
    let mut g_one = vec![0.0f32; m.layout.total];
    let mut head = m.head_forward_for_training(&w, x, &one);
    let (loss_1, _, dx_1) = m.head_backward(&w, &mut g_one, &mut head, &targets, scale);
    assert_eq!(loss_1.to_bits(), loss_w.to_bits());
    assert!(dx_1.iter().zip(&dx_w).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(g_one.iter().zip(&g_whole).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn the_memory_plan_keeps_no_logits_with_chunks() {
    let v = 4096;
    let m = model(v);
    let (b, t) = (16, 64);
    let chunked = m.memory_plan(b, t, 2, 0, &PassOptions::default());
    let whole = m.memory_plan(b, t, 2, 0, &PassOptions { head_chunk_bytes: 0, ..PassOptions::default() });
    assert_eq!(whole.activation_bytes - chunked.activation_bytes, 4 * b * t * v);
    assert!(chunked.peak_bytes < whole.peak_bytes);
    // 2 MiB of logits per chunk: 128 rows of a 4,096-token vocabulary; never one row.
    assert_eq!(PassOptions::default().head_chunk_rows(b * t, v), Some(128));
    assert_eq!(PassOptions::default().head_chunk_rows(2 * b * t, v), Some(128));
    assert_eq!(PassOptions::default().head_chunk_rows(100, v), Some(100));
    assert_eq!(PassOptions::default().head_chunk_rows(1000, 1 << 22), Some(2));
    assert_eq!(PassOptions { head_chunk_bytes: 0, ..PassOptions::default() }.head_chunk_rows(100, v), None);
}
