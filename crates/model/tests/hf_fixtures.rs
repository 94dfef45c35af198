//! The numbers must match an independent implementation: Hugging Face transformers in
//! float64 (`../shared/fixtures/hf`). Logits within 1e-4 absolute, loss within 1e-5
//! relative, every gradient within 1e-3 of its tensor's largest |grad|.

use std::path::PathBuf;
use ultramoe_model::checkpoint::{load_weights, read_safetensors};
use ultramoe_model::{shifted_targets, Model, ModelConfig};

fn fixtures_dir() -> PathBuf {
    match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf"),
    }
}

fn check(case: &str) {
    let dir = fixtures_dir().join(case);
    assert!(dir.is_dir(), "fixture {} not found (set ULTRAMOE_FIXTURES)", dir.display());
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let model = Model::new(cfg);
    let w = load_weights(&model, &dir).unwrap();
    let reference = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let ids_t = &reference["input_ids"];
    let (b, t) = (ids_t.shape[0], ids_t.shape[1]);
    let ids: Vec<u32> = ids_t.i64("input_ids").unwrap().iter().map(|&x| x as u32).collect();
    let fwd = model.forward(&w, &ids, b, t);
    let ref_logits = reference["logits"].f32("logits").unwrap();
    let max_err = fwd.logits.iter().zip(ref_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_err <= 1e-4, "{case}: logits differ by {max_err}");
    let targets = shifted_targets(&ids, t);
    let (loss, count) = model.loss(&fwd, &targets);
    let ref_loss = reference["loss"].f32("loss").unwrap()[0];
    let rel = ((loss - ref_loss) / ref_loss).abs();
    assert!(rel <= 1e-5, "{case}: loss {loss} vs {ref_loss} (rel {rel})");
    let mut g = vec![0.0f32; model.layout.total];
    let (sum, c2) = model.backward(&w, &mut g, fwd, &targets, 1.0 / count as f32);
    assert_eq!(c2, count);
    assert!((sum / count as f64 - loss as f64).abs() <= 1e-5 * loss as f64, "fused loss {} vs {loss}", sum / count as f64);
    let mut checked = 0;
    for spec in &model.layout.specs {
        let r = reference[&format!("grad.{}", spec.name)].f32(&spec.name).unwrap();
        let ours = &g[spec.range()];
        let scale = r.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = ours.iter().zip(r).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err <= 1e-3 * scale.max(1e-30) || (scale == 0.0 && err == 0.0), "{case}: grad {} off by {err} (max |grad| {scale})", spec.name);
        checked += 1;
    }
    assert_eq!(checked, model.layout.specs.len());
    eprintln!("{case}: max logit err {max_err:.2e}, loss rel err {rel:.2e}, {checked} gradients checked");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check("deepseek_v3_tiny");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check("qwen3_moe_tiny");
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral_tiny");
}
