//! Packed rows with document masks: several documents share a row, attention never
//! crosses a document boundary and positions restart at each document. Every document of
//! a packed row must get the logits it gets alone, and the packed row's gradient must be
//! the sum of the documents' gradients (within 1e-5 of the largest), for DeepSeek-V3
//! (MLA, YaRN where the fixture has it), Qwen3-MoE and Mixtral — in the fixtures' shapes,
//! with every policy that recomputes attention too.

use serde_json::Value;
use std::path::PathBuf;
use ultramoe_kernels::loss::IGNORE;
use ultramoe_model::init::{init_weights, Rng};
use ultramoe_model::policy::LayerPolicy;
use ultramoe_model::{Model, ModelConfig, PassOptions};

fn config(case: &str) -> ModelConfig {
    let dir = match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf"),
    };
    let text = std::fs::read_to_string(dir.join(case).join("config.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    ModelConfig::from_json_str(&v.to_string()).unwrap()
}

/// Next-token targets inside one document (its last token has none).
fn doc_targets(doc: &[u32]) -> Vec<i32> {
    (0..doc.len()).map(|i| doc.get(i + 1).map_or(IGNORE, |&x| x as i32)).collect()
}

/// Logits and gradient of `Σ CE` over `rows` rows of `t` tokens.
fn run(m: &Model, w: &[f32], ids: &[u32], targets: &[i32], positions: Option<&[u32]>, rows: usize, t: usize, opts: &PassOptions) -> (Vec<f32>, Vec<f32>) {
    let fwd = m.forward_packed(w, ids, positions, rows, t, opts);
    let logits = fwd.logits.clone();
    let mut g = vec![0.0; w.len()];
    m.backward_with(w, &mut g, fwd, targets, 1.0, opts);
    (logits, g)
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |a, b| a.max(b.abs()))
}

fn check(case: &str) {
    let m = Model::new(config(case));
    let v = m.cfg.vocab_size;
    // Larger weights than the init make attention's mixing visible in the logits.
    let w: Vec<f32> = init_weights(&m.layout, 3).iter().map(|x| x * 4.0).collect();
    let mut rng = Rng::new(17);
    // Two rows of 24: documents of 7, 11, 6 tokens in the first, 24 in the second.
    let t = 24;
    let lens = [vec![7, 11, 6], vec![24]];
    let mut docs: Vec<Vec<u32>> = vec![];
    let (mut ids, mut targets, mut positions) = (vec![], vec![], vec![]);
    for row in &lens {
        for &n in row {
            let doc: Vec<u32> = (0..n).map(|_| rng.range(0, v as i64 - 1) as u32).collect();
            ids.extend(&doc);
            targets.extend(doc_targets(&doc));
            positions.extend(0..n as u32);
            docs.push(doc);
        }
    }
    let with = |p: LayerPolicy| PassOptions { policy: vec![p; m.cfg.n_layers], ..PassOptions::default() };
    let recompute_attention = with(LayerPolicy { attention: true, ..Default::default() });
    let recompute_layers = with(LayerPolicy { full: true, ..Default::default() });
    for opts in [PassOptions::default(), recompute_attention, recompute_layers] {
        let (logits, g) = run(&m, &w, &ids, &targets, Some(&positions), 2, t, &opts);
        let mut g_sum = vec![0.0f32; w.len()];
        let mut row0 = 0;
        for doc in &docs {
            let (l, gd) = run(&m, &w, doc, &doc_targets(doc), None, 1, doc.len(), &opts);
            let packed = &logits[row0 * v..(row0 + doc.len()) * v];
            let scale = max_abs(&l).max(1.0);
            let err = packed.iter().zip(&l).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= 1e-5 * scale, "{case}: a document of {} tokens: logits differ by {err} (largest {scale})", doc.len());
            g_sum.iter_mut().zip(&gd).for_each(|(a, b)| *a += b);
            row0 += doc.len();
        }
        let scale = max_abs(&g_sum);
        let err = g.iter().zip(&g_sum).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "{case}: packed gradient differs from the documents' sum by {err} (largest {scale})");
        // And the mask matters: without it the packed documents see each other.
        let (cross, _) = run(&m, &w, &ids, &targets, None, 2, t, &opts);
        let moved = cross.iter().zip(&logits).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(moved > 1e-3 * max_abs(&logits), "{case}: cross-document attention changed nothing ({moved})");
    }
}

#[test]
fn packed_documents_match_each_alone_deepseek_v3() {
    check("deepseek_v3_tiny");
}

#[test]
fn packed_documents_match_each_alone_qwen3_moe() {
    check("qwen3_moe_tiny");
}

#[test]
fn packed_documents_match_each_alone_mixtral() {
    check("mixtral_tiny");
}
