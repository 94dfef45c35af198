//! Memory accounting: the predicted saved activations equal, to the byte, what each
//! architecture's forward keeps, and the predicted peak of a training step is within 5%
//! of the peak the counting allocator measures, across micro-batch sizes.

use ultramoe_kernels::memory::CountingAlloc;
use ultramoe_model::init::init_weights;
use ultramoe_model::{Model, ModelConfig};
use ultramoe_train::trainer::{DataSpec, TrainConfig, Trainer};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

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

#[test]
fn predicted_activations_are_exact_and_peaks_within_five_percent() {
    let mut runtime = None;
    for cfg in CONFIGS {
        let model = Model::new(ModelConfig::from_json_str(cfg).unwrap());
        // Kernel workspaces appear on the first pass and stay: measured once.
        let runtime = *runtime.get_or_insert_with(|| ultramoe_model::memory::runtime_bytes(&model));
        let arch = model.cfg.arch.model_type();
        for (b, t) in [(2, 32), (8, 64), (16, 128)] {
            let w = init_weights(&model.layout, 1);
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 256) as u32).collect();
            let fwd = model.forward(&w, &ids, b, t);
            let plan = model.memory_plan(b, t, 2, runtime);
            assert_eq!(plan.activation_bytes, fwd.activation_bytes(), "{arch} {b}×{t}: saved activations");
            drop(fwd);
            let tc = TrainConfig { steps: 3, micro_batch: b, seq_len: t, data: DataSpec::Random, warmup: 1, ..TrainConfig::default() };
            let mut tr = Trainer::new(model.clone(), w, tc, 1e11).unwrap();
            let mut peak = 0;
            for _ in 0..3 {
                let s = tr.train_step().unwrap();
                assert_eq!(s.activation_bytes, plan.activation_bytes);
                peak = peak.max(s.peak_bytes);
            }
            let err = plan.peak_bytes as f64 / peak as f64 - 1.0;
            eprintln!("{arch} {b}×{t}: predicted peak {} measured {} ({:+.1}%)", plan.peak_bytes, peak, 100.0 * err);
            assert!(err.abs() <= 0.05, "{arch} {b}×{t}: predicted {} vs measured {peak} bytes", plan.peak_bytes);
        }
    }
}
