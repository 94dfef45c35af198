//! Checkpoints round-trip in the Hugging Face layout, single-file and sharded, and keep
//! the fixtures' tensor names.

use std::path::PathBuf;
use ultramoe_model::checkpoint::{checkpoint_files, load_weights, read_safetensors, save_weights};
use ultramoe_model::init::init_weights;
use ultramoe_model::{Model, ModelConfig};

fn fixture(case: &str) -> PathBuf {
    match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p).join(case),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf").join(case),
    }
}

#[test]
fn save_and_load_round_trip_single_and_sharded() {
    for case in ["deepseek_v3_tiny", "qwen3_moe_tiny", "mixtral_tiny"] {
        let dir = fixture(case);
        let model = Model::new(ModelConfig::from_file(&dir.join("config.json")).unwrap());
        let w = load_weights(&model, &dir).unwrap();
        // Same tensor names and shapes as the transformers checkpoint.
        let original = read_safetensors(&dir.join("model.safetensors")).unwrap();
        assert_eq!(original.len(), model.layout.specs.len());
        for s in &model.layout.specs {
            assert_eq!(original[&s.name].shape, s.shape, "{}", s.name);
        }
        let out = std::env::temp_dir().join(format!("ultramoe-ckpt-{case}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        save_weights(&model, &w, &out.join("single"), None).unwrap();
        assert_eq!(load_weights(&model, &out.join("single")).unwrap(), w);
        save_weights(&model, &w, &out.join("sharded"), Some(20_000)).unwrap();
        let files = checkpoint_files(&out.join("sharded")).unwrap();
        assert!(files.len() > 2, "{case}: expected several shards, got {}", files.len());
        assert_eq!(load_weights(&model, &out.join("sharded")).unwrap(), w);
        // The config travels with the weights and no temporary files are left behind.
        let again = ModelConfig::from_file(&out.join("sharded/config.json")).unwrap();
        assert_eq!(again.raw, model.cfg.raw);
        let leftovers: Vec<_> = std::fs::read_dir(out.join("sharded")).unwrap().filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Encodes f32 → FP8 E4M3 by searching the 256 codes (test helper).
fn to_f8(x: f32) -> u8 {
    (0u8..=255).filter(|&c| !ultramoe_model::checkpoint::f8_e4m3_to_f32(c).is_nan())
        .min_by(|&a, &b| {
            let (fa, fb) = (ultramoe_model::checkpoint::f8_e4m3_to_f32(a), ultramoe_model::checkpoint::f8_e4m3_to_f32(b));
            (fa - x).abs().partial_cmp(&(fb - x).abs()).unwrap()
        })
        .unwrap()
}

#[test]
fn fp8_block_scaled_weights_are_dequantised() {
    use safetensors::tensor::{Dtype, TensorView};
    use ultramoe_model::checkpoint::f8_e4m3_to_f32;
    assert_eq!(f8_e4m3_to_f32(0x38), 1.0);
    assert_eq!(f8_e4m3_to_f32(0xC0), -2.0);
    assert_eq!(f8_e4m3_to_f32(0x7E), 448.0);
    assert_eq!(f8_e4m3_to_f32(0x01), 2f32.powi(-9));
    assert!(f8_e4m3_to_f32(0x7F).is_nan());
    // Quantise the Mixtral fixture's matrices with 16×16 blocks and check the load.
    let dir = fixture("mixtral_tiny");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]});
    let model = Model::new(ModelConfig::from_value(cfg.clone()).unwrap());
    let w = load_weights(&model, &dir).unwrap();
    let mut stored: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
    let mut expect = w.clone();
    for s in &model.layout.specs {
        let v = &w[s.range()];
        if s.shape.len() == 2 && !s.name.contains("embed") && !s.name.contains("lm_head") {
            let (rows, cols) = (s.shape[0], s.shape[1]);
            let (sr, sc) = (rows.div_ceil(16), cols.div_ceil(16));
            let mut scale = vec![0.0f32; sr * sc];
            for r in 0..rows {
                for c in 0..cols {
                    let k = (r / 16) * sc + c / 16;
                    scale[k] = scale[k].max(v[r * cols + c].abs() / 448.0);
                }
            }
            let q: Vec<u8> = (0..rows * cols).map(|i| to_f8(v[i] / scale[(i / cols / 16) * sc + (i % cols) / 16])).collect();
            for i in 0..rows * cols {
                expect[s.offset + i] = f8_e4m3_to_f32(q[i]) * scale[(i / cols / 16) * sc + (i % cols) / 16];
            }
            stored.push((s.name.clone(), Dtype::F8_E4M3, s.shape.clone(), q));
            stored.push((format!("{}_scale_inv", s.name), Dtype::F32, vec![sr, sc], scale.iter().flat_map(|x| x.to_le_bytes()).collect()));
        } else {
            stored.push((s.name.clone(), Dtype::F32, s.shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()));
        }
    }
    let out = std::env::temp_dir().join(format!("ultramoe-fp8-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let views: Vec<(String, TensorView)> = stored.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    let got = load_weights(&model, &out).unwrap();
    assert_eq!(got, expect);
    // FP8 is lossy but close: relative error of a matrix below 1/16 (3 mantissa bits).
    let s = model.layout.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    let (num, den) = got[s.range()].iter().zip(&w[s.range()]).fold((0.0, 0.0), |a, (g, o)| (a.0 + (g - o).powi(2), a.1 + o * o));
    assert!((num / den).sqrt() < 1.0 / 16.0);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn fresh_init_is_seeded() {
    let cfg = ModelConfig::from_file(&fixture("qwen3_moe_tiny").join("config.json")).unwrap();
    let model = Model::new(cfg);
    assert_eq!(init_weights(&model.layout, 3), init_weights(&model.layout, 3));
    assert_ne!(init_weights(&model.layout, 3), init_weights(&model.layout, 4));
}
