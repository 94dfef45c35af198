//! A run interrupted by a checkpoint and resumed continues with exactly the losses of an
//! uninterrupted run: weights, optimizer moments, step, schedule and data position all
//! come back.

use ultramoe_model::ModelConfig;
use ultramoe_train::spec::RunSpec;
use ultramoe_train::trainer::{DataSpec, Place, TrainConfig, Trainer, Weights};

fn tiny() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
            "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
            "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "max_position_embeddings": 64}"#,
    )
    .unwrap()
}

fn config() -> TrainConfig {
    TrainConfig {
        steps: 8,
        micro_batch: 3,
        seq_len: 48,
        grad_accum: 2,
        warmup: 2,
        lr: 3e-3,
        data: DataSpec::Math,
        bias_update_rate: 1e-3,
        ..TrainConfig::default()
    }
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses() {
    let start = || Trainer::start(tiny(), config(), RunSpec::default(), Weights::Seed(7), Place::alone(1e11)).unwrap();
    let mut full = start();
    let expect: Vec<f32> = (0..8).map(|_| full.train_step().unwrap().loss).collect();
    assert!(expect[7] < expect[0], "loss should fall: {expect:?}");

    let dir = std::env::temp_dir().join(format!("ultramoe-resume-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut first = start();
    let mut got: Vec<f32> = (0..3).map(|_| first.train_step().unwrap().loss).collect();
    first.save_checkpoint(&dir, 2).unwrap();
    drop(first);
    let ckpt = Trainer::latest_checkpoint(&dir).expect("latest checkpoint");
    let mut resumed = Trainer::resume(&ckpt, Place::alone(1e11), &mut |_, _| Ok(())).unwrap();
    assert_eq!(resumed.step, 3);
    got.extend((3..8).map(|_| resumed.train_step().unwrap().loss));
    assert_eq!(got, expect, "resumed losses differ");
    assert_eq!(resumed.w, full.w, "final weights differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_lengthened_in_its_warmup_repeats_one_planned_that_long_and_resumes_with_its_length() {
    let start = |steps| Trainer::start(tiny(), TrainConfig { steps, ..config() }, RunSpec::default(), Weights::Seed(7), Place::alone(1e11)).unwrap();
    let mut planned = start(8);
    let expect: Vec<f32> = (0..8).map(|_| planned.train_step().unwrap().loss).collect();

    // The warmup's rates do not depend on the length, so a run told its length after
    // one warmup step takes exactly the steps of one that knew it from the start.
    let mut lengthened = start(4);
    let mut got = vec![lengthened.train_step().unwrap().loss];
    lengthened.set_total_steps(8).unwrap();
    assert!(lengthened.set_total_steps(1).is_err(), "a length not past the steps taken");
    got.extend((1..4).map(|_| lengthened.train_step().unwrap().loss));

    let dir = std::env::temp_dir().join(format!("ultramoe-retarget-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    lengthened.save_checkpoint(&dir, 2).unwrap();
    drop(lengthened);
    let mut resumed = Trainer::resume(&Trainer::latest_checkpoint(&dir).unwrap(), Place::alone(1e11), &mut |_, _| Ok(())).unwrap();
    assert_eq!(resumed.cfg.steps, 8, "the checkpoint keeps the new length");
    got.extend((4..8).map(|_| resumed.train_step().unwrap().loss));
    assert_eq!(got, expect, "a lengthened run's losses differ from the planned one's");
    assert_eq!(resumed.w, planned.w);
    std::fs::remove_dir_all(&dir).unwrap();
}
