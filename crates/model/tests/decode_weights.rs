//! Quantised decoding weights keep no f32 copy of what they quantised: the matrices'
//! f32 pages go back to the operating system, so INT8 weights occupy about a quarter of
//! the f32 model's bytes (plus what stays f32: embeddings, norms, routers), and decoding
//! still reads only the quantised copies (the dequantised model is unchanged).

use ultramoe_kernels::qlinear::WeightFormat;
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::{Model, ModelConfig};

/// A Qwen3-MoE-shaped model of `hidden` (experts and FFN twice as wide) with
/// deterministic weights in [−0.5, 0.5).
fn model(hidden: usize, experts: usize) -> (Model, Vec<f32>) {
    let cfg = ModelConfig::from_json_str(&format!(
        r#"{{"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": {hidden}, "intermediate_size": {inter},
            "moe_intermediate_size": {inter}, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": {hd}, "num_experts": {experts}, "num_experts_per_tok": 2, "max_position_embeddings": 64}}"#,
        inter = 2 * hidden,
        hd = hidden / 4
    ))
    .unwrap();
    let m = Model::new(cfg);
    let w: Vec<f32> = (0..m.layout.total).map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5).collect();
    (m, w)
}

#[test]
fn quantised_weights_release_their_f32_pages() {
    let (m, w) = model(256, 8);
    let f32w = DecodeWeights::new(&m, w.clone(), WeightFormat::F32);
    assert_eq!(f32w.resident_bytes(), 4 * w.len());
    let before = DecodeWeights::new(&m, w.clone(), WeightFormat::Int8).dequantized();
    let int8 = DecodeWeights::new(&m, w.clone(), WeightFormat::Int8);
    // The dequantised model does not depend on the released pages.
    assert_eq!(int8.dequantized(), before);
    if cfg!(target_os = "linux") {
        let ratio = int8.resident_bytes() as f64 / f32w.resident_bytes() as f64;
        assert!(ratio < 0.35, "INT8 weights hold {:.2} of the f32 bytes", ratio);
    }
}

/// A model saved with its matrices in BF16 or INT8 loads back to the same quantised
/// matrices bit for bit (and, read as f32, to their dequantised values), from a file
/// about a half or a quarter the size.
#[test]
fn quantised_checkpoints_load_back_bit_for_bit() {
    let (m, w) = model(128, 4);
    let root = std::env::temp_dir().join(format!("ultramoe-quantised-{}", std::process::id()));
    ultramoe_model::checkpoint::save_weights(&m, &w, &root.join("f32"), None).unwrap();
    let f32_size = std::fs::metadata(root.join("f32/model.safetensors")).unwrap().len() as f64;
    for (fmt, ratio) in [(WeightFormat::Bf16, 0.55), (WeightFormat::Int8, 0.35)] {
        let dir = root.join(fmt.name());
        let q = DecodeWeights::new(&m, w.clone(), fmt);
        q.save(&m, &dir).unwrap();
        let size = std::fs::metadata(dir.join("model.safetensors")).unwrap().len() as f64;
        assert!(size < ratio * f32_size, "{fmt:?}: {size} bytes vs {f32_size}");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(cfg.raw["ultramoe_weights"], fmt.name());
        let back = ultramoe_model::checkpoint::load_weights(&Model::new(cfg), &dir).unwrap();
        let again = DecodeWeights::new(&m, back.clone(), fmt);
        assert_eq!(again.dequantized(), q.dequantized(), "{fmt:?}: requantised matrices differ");
        // Read as f32, the saved model is the dequantised one.
        assert_eq!(back, q.dequantized(), "{fmt:?}");
    }
    std::fs::remove_dir_all(&root).ok();
}

/// An INT8-saved model loads on each expert-parallel rank: the other ranks' experts and
/// their scales are skipped, and this rank's experts get the dequantised values.
#[test]
fn quantised_checkpoints_load_as_expert_parallel_shares() {
    let (m, w) = model(128, 4);
    let dir = std::env::temp_dir().join(format!("ultramoe-quantised-ep-{}", std::process::id()));
    let q = DecodeWeights::new(&m, w, WeightFormat::Int8);
    q.save(&m, &dir).unwrap();
    let whole = q.dequantized();
    let dir2 = dir.clone();
    let ok = ultramoe_dist::local::run(2, std::time::Duration::from_secs(30), move |comm| {
        let cfg = ModelConfig::from_file(&dir2.join("config.json")).unwrap();
        let share = ultramoe_model::Share { ep: Some(std::sync::Arc::new(comm)), ..ultramoe_model::Share::whole(&cfg) };
        let part = Model::share(cfg, share).unwrap();
        let got = ultramoe_model::checkpoint::load_weights(&part, &dir2).unwrap();
        // Loaded for decoding, the matrices taken as stored.
        let decoding = DecodeWeights::load(&part, &dir2, WeightFormat::Int8).unwrap().dequantized();
        // Every tensor this rank holds has the value the whole model has under its name.
        let full = Model::new(ModelConfig::from_file(&dir2.join("config.json")).unwrap());
        Ok(part.layout.specs.iter().all(|s| {
            let want = &whole[full.layout.get(&s.name).unwrap().range()];
            got[s.range()] == *want && decoding[s.range()] == *want
        }))
    })
    .unwrap();
    assert_eq!(ok, vec![true, true]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Loaded for decoding in the format it was saved in, a quantised model takes its
/// matrices as stored (never as f32 on the way): the same matrices, bit for bit, as the
/// model that saved them. Loaded in another format, or from f32, every matrix is read as
/// f32 and converted: the same as converting the f32 load.
#[test]
fn decoding_weights_load_quantised_matrices_as_stored() {
    let (m, w) = model(128, 4);
    let root = std::env::temp_dir().join(format!("ultramoe-load-stored-{}", std::process::id()));
    ultramoe_model::checkpoint::save_weights(&m, &w, &root.join("f32"), None).unwrap();
    for fmt in [WeightFormat::Bf16, WeightFormat::Int8] {
        let dir = root.join(fmt.name());
        let q = DecodeWeights::new(&m, w.clone(), fmt);
        q.save(&m, &dir).unwrap();
        // Every matrix tensor comes back as stored, its f32 range never written.
        let keep = ultramoe_model::checkpoint::Keep { format: fmt, wanted: &|_: &str| true };
        let (raw, stored) = ultramoe_model::checkpoint::load_weights_keeping(&m, &dir, Some(keep)).unwrap();
        let matrices: Vec<_> = m.layout.specs.iter().filter(|s| s.name.ends_with("proj.weight") || s.name == "lm_head.weight").collect();
        assert!(matrices.len() > 10 && stored.len() == matrices.len(), "{fmt:?}: {} stored of {}", stored.len(), matrices.len());
        assert!(matrices.iter().all(|s| stored.contains_key(&s.name) && raw[s.range()].iter().all(|&x| x == 0.0)), "{fmt:?}");
        let loaded = DecodeWeights::load(&m, &dir, fmt).unwrap();
        assert_eq!(loaded.dequantized(), q.dequantized(), "{fmt:?}");
        // (the released f32 pages may differ by a partial page at each matrix's ends: the
        // two buffers need not share an alignment)
        let slack = 2 * 4096 * matrices.len();
        assert!(loaded.resident_bytes().abs_diff(q.resident_bytes()) <= slack, "{fmt:?}: {} vs {}", loaded.resident_bytes(), q.resident_bytes());
        let x: Vec<f32> = (0..3 * 128).map(|i| (i as f32 * 0.37).sin()).collect();
        let head = m.lm_head.as_ref().unwrap();
        assert_eq!(loaded.linear(head, &x, 3, 128, 512), q.linear(head, &x, 3, 128, 512), "{fmt:?}");
        // Other formats and the f32 checkpoint: read as f32, then converted.
        for (from, to) in [(dir.clone(), WeightFormat::F32), (dir.clone(), other(fmt)), (root.join("f32"), fmt)] {
            let via_f32 = DecodeWeights::new(&m, ultramoe_model::checkpoint::load_weights(&m, &from).unwrap(), to);
            let direct = DecodeWeights::load(&m, &from, to).unwrap();
            assert_eq!(direct.dequantized(), via_f32.dequantized(), "{from:?} as {to:?}");
        }
    }
    std::fs::remove_dir_all(&root).ok();
}

fn other(f: WeightFormat) -> WeightFormat {
    if f == WeightFormat::Int8 {
        WeightFormat::Bf16
    } else {
        WeightFormat::Int8
    }
}

/// A stored matrix is checked as a converted one is: an INT8 weight needs its scales, one
/// per row and finite, and a BF16 weight finite values — each error names the tensor.
#[test]
fn stored_matrices_are_checked() {
    use safetensors::tensor::{Dtype, TensorView};
    let (m, w) = model(128, 4);
    let root = std::env::temp_dir().join(format!("ultramoe-stored-bad-{}", std::process::id()));
    let name = "model.layers.0.mlp.experts.1.down_proj.weight";
    for (fmt, case) in [(WeightFormat::Int8, "no scale"), (WeightFormat::Int8, "nan scale"), (WeightFormat::Bf16, "inf")] {
        let dir = root.join(case.replace(' ', "-"));
        DecodeWeights::new(&m, w.clone(), fmt).save(&m, &dir).unwrap();
        let file = dir.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
            st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
        let scale = format!("{name}_scale");
        match case {
            "no scale" => tensors.retain(|t| t.0 != scale),
            "nan scale" => tensors.iter_mut().filter(|t| t.0 == scale).for_each(|t| t.3[..4].copy_from_slice(&f32::NAN.to_le_bytes())),
            _ => tensors.iter_mut().filter(|t| t.0 == name).for_each(|t| t.3[..2].copy_from_slice(&0x7f80u16.to_le_bytes())),
        }
        let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
        let err = DecodeWeights::load(&m, &dir, fmt).err().unwrap_or_else(|| panic!("{case}: loaded")).to_string();
        assert!(err.contains(name), "{case}: {err}");
        assert!(err.contains(if case == "no scale" { "without" } else { "not finite" }), "{case}: {err}");
    }
    std::fs::remove_dir_all(&root).ok();
}
