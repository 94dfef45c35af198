//! Memory accounting: the predicted saved activations equal, to the byte, what each
//! architecture's forward keeps, and the predicted peak of a training step is within 5%
//! of the peak the counting allocator measures, across micro-batch sizes.

use ultramoe_kernels::memory::CountingAlloc;
use ultramoe_model::init::init_weights;
use ultramoe_model::{Model, ModelConfig};
use ultramoe_train::trainer::{DataSpec, TrainConfig, Trainer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The allocation counters and the kernels' per-thread workspaces are process-wide, so
/// the checks run in one test, in a fixed order: peaks first, on a fresh process.
#[test]
fn memory_accounting() {
    predicted_activations_are_exact_and_peaks_within_five_percent();
    recomputation_is_exact_and_saves_activations();
}

const CONFIGS: [&str; 3] = [
    r#"{"model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "max_position_embeddings": 128, "sandwich_norm": true}"#,
    r#"{"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 128}"#,
    r#"{"model_type": "mixtral", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 128}"#,
];

fn predicted_activations_are_exact_and_peaks_within_five_percent() {
    // Whatever lives before this test (kernel workspaces another test already made
    // included) is not this test's: peaks are measured above it.
    let base = ultramoe_kernels::memory::live_bytes();
    let mut runtime = None;
    for cfg in CONFIGS {
        let mut model = Model::new(ModelConfig::from_json_str(cfg).unwrap());
        // Kernel workspaces appear on the first pass and stay: measured once.
        let runtime = *runtime.get_or_insert_with(|| ultramoe_model::memory::runtime_bytes(&model));
        let arch = model.cfg.arch.model_type();
        let layers = model.layers.len();
        for (b, t, recompute) in [(2, 32, false), (8, 64, false), (16, 128, false), (16, 128, true)] {
            model.recompute = vec![recompute; layers];
            let arch = if recompute { format!("{arch}, every layer recomputed,") } else { arch.to_string() };
            let w = init_weights(&model.layout, 1);
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 256) as u32).collect();
            let fwd = model.forward(&w, &ids, b, t);
            let plan = model.memory_plan(b, t, 2, runtime);
            assert_eq!(plan.activation_bytes, fwd.activation_bytes(), "{arch} {b}×{t}: saved activations");
            drop(fwd);
            let recompute_layers = if recompute { (0..layers).collect() } else { vec![] };
            let tc = TrainConfig { steps: 3, micro_batch: b, seq_len: t, data: DataSpec::Random, warmup: 1, recompute_layers, ..TrainConfig::default() };
            let mut tr = Trainer::new(model.clone(), w, tc, 1e11).unwrap();
            let mut peak = 0;
            for _ in 0..3 {
                let s = tr.train_step().unwrap();
                assert_eq!(s.activation_bytes, plan.activation_bytes);
                peak = peak.max(s.peak_bytes - base);
            }
            let err = plan.peak_bytes as f64 / peak as f64 - 1.0;
            eprintln!("{arch} {b}×{t}: predicted peak {} measured {} ({:+.1}%)", plan.peak_bytes, peak, 100.0 * err);
            assert!(err.abs() <= 0.05, "{arch} {b}×{t}: predicted {} vs measured {peak} bytes", plan.peak_bytes);
        }
    }
}

/// Full-layer recomputation changes no number: the same loss and bitwise the same
/// gradients as keeping every activation, whichever layers are recomputed; it keeps
/// only the layers' inputs, and the prediction still holds the measured peak.
fn recomputation_is_exact_and_saves_activations() {
    for cfg in CONFIGS {
        let mut model = Model::new(ModelConfig::from_json_str(cfg).unwrap());
        let arch = model.cfg.arch.model_type();
        let (b, t) = (8, 64);
        let w = init_weights(&model.layout, 3);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 11 % 256) as u32).collect();
        let targets = ultramoe_model::shifted_targets(&ids, t);
        let n = model.layers.len();
        let mut reference: Option<(f64, Vec<f32>, usize)> = None;
        for mask in [vec![false; n], vec![true; n], (0..n).map(|i| i == n - 1).collect()] {
            model.recompute = mask.clone();
            let fwd = model.forward(&w, &ids, b, t);
            let saved = fwd.activation_bytes();
            assert_eq!(saved, model.memory_plan(b, t, 2, 0).activation_bytes, "{arch} {mask:?}");
            let mut g = vec![0.0; w.len()];
            let (loss, _) = model.backward(&w, &mut g, fwd, &targets, 1.0);
            match &reference {
                None => reference = Some((loss, g, saved)),
                Some((l0, g0, s0)) => {
                    assert_eq!(loss.to_bits(), l0.to_bits(), "{arch} {mask:?}: loss");
                    assert!(g.iter().zip(g0).all(|(a, b)| a.to_bits() == b.to_bits()), "{arch} {mask:?}: gradients differ");
                    if mask.iter().all(|&m| m) {
                        let cut = 1.0 - saved as f64 / *s0 as f64;
                        eprintln!("{arch}: full recomputation keeps {saved} of {s0} bytes ({:.0}% less)", 100.0 * cut);
                        assert!(cut >= 0.7, "{arch}: only {:.0}% less", 100.0 * cut);
                    }
                }
            }
        }
    }
}
