//! The embedded default: a small DeepSeek-V3-architecture math MoE and how to train it.

use ultramoe_train::optimizer::AdamWConfig;
use ultramoe_train::trainer::{DataSpec, TrainConfig};

/// `config.json` of the default math model (MLA, 8 routed experts top-2 + 1 shared,
/// first layer dense).
pub const MATH_MOE_CONFIG: &str = include_str!("../presets/math-moe.json");

/// Training recipe of the default math model.
pub fn math_train_config() -> TrainConfig {
    TrainConfig {
        seed: 1234,
        steps: 6000,
        micro_batch: 8,
        seq_len: 256,
        grad_accum: 1,
        lr: 3e-3,
        min_lr: 1e-4,
        warmup: 100,
        clip: 1.0,
        adamw: AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.05 },
        data: DataSpec::Math,
        save_every: 500,
        bias_update_rate: 1e-3,
        aux_loss: None,
        routing_skew: 0.0,
        stats_ep: 1,
        max_nonfinite_steps: 3,
        tokenizer: None,
        doc_masks: true,
        eval_fraction: 0.0,
        eval_every: 0,
        eval_batches: 4,
    }
}
