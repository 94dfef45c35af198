//! Memory accounting and policies: the predicted saved activations equal, to the byte,
//! what each architecture's forward keeps, and the predicted peak of a training step is
//! within 5% of the peak the counting allocator measures, across micro-batch sizes and
//! memory policies; every policy (selective recomputation, swapping, whole layers)
//! gives bitwise the loss and gradients of keeping everything.

use ultramoe_kernels::memory::CountingAlloc;
use ultramoe_model::init::init_weights;
use ultramoe_model::policy::{parse_policy, LayerPolicy};
use ultramoe_model::{Model, ModelConfig, PassOptions};
use ultramoe_train::spec::RunSpec;
use ultramoe_train::trainer::{DataSpec, Place, TrainConfig, Trainer, Weights};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The allocation counters and the kernels' per-thread workspaces are process-wide, so
/// the checks run in one test, in a fixed order: peaks first, on a fresh process.
#[test]
fn memory_accounting() {
    predicted_activations_are_exact_and_peaks_within_five_percent();
    recomputation_is_exact_and_saves_activations();
    swapped_moments_change_nothing_and_are_predicted();
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
        let model = Model::new(ModelConfig::from_json_str(cfg).unwrap());
        // Kernel workspaces appear on the first pass and stay: measured once.
        let runtime = *runtime.get_or_insert_with(|| ultramoe_model::memory::runtime_bytes(&model));
        let arch = model.cfg.arch.model_type();
        let layers = model.layers.len();
        let cases = [
            (2, 32, "none"),
            (8, 64, "none"),
            (16, 128, "none"),
            (16, 128, "full"),
            (16, 128, "norm+swiglu+attention+qkv+experts"),
            (16, 128, "norm+swiglu+attention+qkv+experts swap:0"),
            (16, 128, "swap"),
            (8, 64, "attention swap:1 full:0"),
            (16, 128, "ffn+norm+attention"),
            (8, 64, "none+moments"),
            (16, 128, "norm+swiglu+attention swap:0+moments"),
        ];
        for (b, t, text) in cases {
            // `+moments`: the optimizer moments go to the swap file too.
            let (policy, swap_moments) = text.strip_suffix("+moments").map_or((text, false), |p| (p, true));
            let memory_policy = parse_policy(policy, layers).unwrap();
            let opts = PassOptions { policy: memory_policy.clone(), swap_moments, ..PassOptions::default() };
            let arch = format!("{arch} [{text}]");
            let w = init_weights(&model.layout, 1);
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 256) as u32).collect();
            // `forward_with` keeps the whole logits (its caller reads them); a training
            // step forms them in chunks in the head's backward and keeps none.
            let fwd = model.forward_with(&w, &ids, b, t, &opts);
            let whole = model.memory_plan(b, t, 2, runtime, &PassOptions { head_chunk_bytes: 0, ..opts.clone() });
            assert_eq!(whole.activation_bytes, fwd.activation_bytes(), "{arch} {b}×{t}: saved activations");
            let plan = model.memory_plan(b, t, 2, runtime, &opts);
            assert_eq!(whole.activation_bytes - plan.activation_bytes, 4 * b * t * model.cfg.vocab_size, "{arch} {b}×{t}: logits");
            drop((fwd, w));
            let tc = TrainConfig { steps: 3, micro_batch: b, seq_len: t, data: DataSpec::Random, warmup: 1, ..TrainConfig::default() };
            let spec = RunSpec { memory_policy, swap_moments, ..RunSpec::default() };
            let mut tr = Trainer::start(model.cfg.clone(), tc, spec, Weights::Seed(1), Place::alone(1e11)).unwrap();
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

/// No memory policy changes a number: the same loss and bitwise the same gradients as
/// keeping every activation, whichever op classes are recomputed, layers swapped or
/// layers recomputed whole; each policy keeps what the plan says, and whole-layer
/// recomputation keeps at least 70% less.
fn recomputation_is_exact_and_saves_activations() {
    let policies = [
        "none",
        "full",
        "full:TOP",
        "full+attention",
        "norm",
        "swiglu",
        "attention",
        "qkv",
        "experts",
        "ffn",
        "swap",
        "norm+swiglu+attention+qkv+experts",
        "norm+swiglu+attention+qkv+experts swap:0",
        "norm+qkv swap:TOP full:0",
        "ffn+norm+attention swap:0",
    ];
    for cfg in CONFIGS {
        let model = Model::new(ModelConfig::from_json_str(cfg).unwrap());
        let arch = model.cfg.arch.model_type();
        let (b, t) = (8, 64);
        let w = init_weights(&model.layout, 3);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 11 % 256) as u32).collect();
        let targets = ultramoe_model::shifted_targets(&ids, t);
        let n = model.layers.len();
        let mut reference: Option<(f64, Vec<f32>, usize)> = None;
        for text in policies {
            let text = text.replace("TOP", &(n - 1).to_string());
            // (`forward_with` keeps the whole logits: the plan of that head)
            let opts = PassOptions { policy: parse_policy(&text, n).unwrap(), head_chunk_bytes: 0, ..PassOptions::default() };
            let fwd = model.forward_with(&w, &ids, b, t, &opts);
            let saved = fwd.activation_bytes();
            assert_eq!(saved, model.memory_plan(b, t, 2, 0, &opts).activation_bytes, "{arch} [{text}]");
            let mut g = vec![0.0; w.len()];
            let (loss, _) = model.backward_with(&w, &mut g, fwd, &targets, 1.0, &opts);
            match &reference {
                None => reference = Some((loss, g, saved)),
                Some((l0, g0, s0)) => {
                    assert_eq!(loss.to_bits(), l0.to_bits(), "{arch} [{text}]: loss");
                    assert!(g.iter().zip(g0).all(|(a, b)| a.to_bits() == b.to_bits()), "{arch} [{text}]: gradients differ");
                    assert!(saved < *s0, "{arch} [{text}]: keeps {saved} bytes, no fewer than {s0}");
                    eprintln!("{arch} [{text}]: keeps {saved} of {s0} bytes ({:.0}% less)", 100.0 * (1.0 - saved as f64 / *s0 as f64));
                    if opts.policy.iter().all(|p: &LayerPolicy| p.full) {
                        let cut = 1.0 - saved as f64 / *s0 as f64;
                        assert!(cut >= 0.7, "{arch}: only {:.0}% less", 100.0 * cut);
                    }
                }
            }
        }
    }
}

/// Optimizer moments kept in a swap file during forward and backward: the same losses and
/// weights, bit for bit, as keeping them, over several steps.
fn swapped_moments_change_nothing_and_are_predicted() {
    for cfg in CONFIGS {
        let run = |swap_moments: bool| {
            let tc = TrainConfig { steps: 4, micro_batch: 4, seq_len: 32, grad_accum: 2, data: DataSpec::Random, warmup: 1, ..TrainConfig::default() };
            let spec = RunSpec { swap_moments, ..RunSpec::default() };
            let mut tr = Trainer::start(ModelConfig::from_json_str(cfg).unwrap(), tc, spec, Weights::Seed(5), Place::alone(1e11)).unwrap();
            let losses: Vec<u32> = (0..4).map(|_| tr.train_step().unwrap().loss.to_bits()).collect();
            assert_eq!(tr.opt.m.len(), tr.w.len(), "moments back after the step");
            (losses, tr.w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), tr.opt.v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert!(run(true) == run(false), "swapped moments changed the training");
    }
}
