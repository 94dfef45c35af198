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

#[test]
fn fresh_init_is_seeded() {
    let cfg = ModelConfig::from_file(&fixture("qwen3_moe_tiny").join("config.json")).unwrap();
    let model = Model::new(cfg);
    assert_eq!(init_weights(&model.layout, 3), init_weights(&model.layout, 3));
    assert_ne!(init_weights(&model.layout, 3), init_weights(&model.layout, 4));
}
