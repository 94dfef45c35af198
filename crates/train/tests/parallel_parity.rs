//! Expert and data parallelism give the single-rank training run: on the same seed and
//! global batch, every layout's loss at each of 30 steps and its final weights match one
//! rank's within 1e-5 (relative), and a checkpoint written under one layout resumes
//! under another on the identical loss curve.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use ultramoe_dist::{local, Mesh, ProcessGroup};
use ultramoe_model::init::init_weights;
use ultramoe_model::{Model, ModelConfig};
use ultramoe_train::trainer::{DataSpec, TrainConfig, Trainer};

const STEPS: u64 = 30;

fn model_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
            "moe_intermediate_size": 16, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 2,
            "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "max_position_embeddings": 64}"#,
    )
    .unwrap()
}

fn train_config(steps: u64) -> TrainConfig {
    TrainConfig {
        steps,
        // divisible by 1, 2, 3 and 4 ranks
        micro_batch: 12,
        seq_len: 32,
        grad_accum: 2,
        warmup: 3,
        lr: 3e-3,
        data: DataSpec::Math,
        bias_update_rate: 1e-3,
        save_every: 0,
        ..TrainConfig::default()
    }
}

/// Losses of every step and the final weights by tensor name (rank 0's view of the
/// replicated tensors plus every rank's experts).
struct Run {
    losses: Vec<f32>,
    weights: HashMap<String, Vec<f32>>,
    /// expert slots migrated (dynamic placement)
    moved: usize,
    /// rank load imbalance of every step
    imbalance: Vec<f64>,
}

fn weights_of(tr: &Trainer) -> HashMap<String, Vec<f32>> {
    tr.model.layout.specs.iter().map(|s| (s.name.clone(), tr.w[s.range()].to_vec())).collect()
}

fn single(steps: u64) -> Run {
    let model = Model::new(model_config());
    let w = init_weights(&model.layout, 7);
    let mut tr = Trainer::new(model, w, train_config(steps), 1e11).unwrap();
    let losses = (0..steps).map(|_| tr.train_step().unwrap().loss).collect();
    Run { losses, weights: weights_of(&tr), moved: 0, imbalance: vec![] }
}

/// Runs `ranks` ranks with expert-parallel size `ep` up to step `stop` of a `steps`-step
/// schedule; `resume` starts from a checkpoint, `save` writes one at the end.
fn parallel(ranks: usize, ep: usize, steps: u64, stop: u64, resume: Option<&Path>, save: Option<&Path>) -> Run {
    parallel_with(ranks, ep, steps, stop, resume, save, false)
}

/// [`parallel`], with ZeRO-1 when `zero1`.
fn parallel_with(ranks: usize, ep: usize, steps: u64, stop: u64, resume: Option<&Path>, save: Option<&Path>, zero1: bool) -> Run {
    parallel_opts(ranks, ep, steps, stop, resume, save, Opts { zero1, ..Opts::default() })
}

/// Layout options of a parallel run.
#[derive(Clone, Copy)]
struct Opts {
    zero1: bool,
    /// gradient reduction overlapping the backward pass
    overlap: bool,
    /// hierarchical all-to-all over nodes of this many ranks
    hierarchical: Option<usize>,
    /// dynamic placement: decide every N steps, with R redundant slots per rank
    placement: Option<(u64, usize)>,
    /// skewed routing (Zipf exponent)
    skew: f32,
    /// memory policy (`ultramoe_model::policy` text)
    policy: &'static str,
    /// optimizer moments in a swap file during forward and backward
    swap_moments: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { zero1: false, overlap: true, hierarchical: None, placement: None, skew: 0.0, policy: "none", swap_moments: false }
    }
}

/// [`parallel_with`], with every layout option.
fn parallel_opts(ranks: usize, ep: usize, steps: u64, stop: u64, resume: Option<&Path>, save: Option<&Path>, o: Opts) -> Run {
    let Opts { zero1, overlap, hierarchical, placement, skew, policy, swap_moments } = o;
    let (every, redundant) = placement.unwrap_or((0, 0));
    let (resume, save) = (resume.map(Path::to_path_buf), save.map(Path::to_path_buf));
    let runs = local::run(ranks, Duration::from_secs(60), move |c| {
        let world: Arc<dyn ProcessGroup> = Arc::new(c);
        let mesh = Mesh::new(world, ep)?;
        let per_node = hierarchical.unwrap_or(ranks);
        let mesh = mesh.with_nodes(per_node);
        let mut tr = match &resume {
            Some(dir) => Trainer::resume_with_mesh(dir, 1e11, Some(steps), Some(mesh), Some(zero1)).unwrap(),
            None => {
                let model = Model::expert_parallel_redundant(model_config(), mesh.ep.clone(), redundant).unwrap();
                let w = init_weights(&model.layout, 7);
                let cfg = TrainConfig {
                    zero1,
                    overlap_grad_reduce: overlap,
                    placement_every: every,
                    redundant_experts: redundant,
                    routing_skew: skew,
                    memory_policy: ultramoe_model::policy::parse_policy(policy, model.layers.len()).unwrap(),
                    swap_moments,
                    ..train_config(steps)
                };
                // A slow machine (peak 1 GFLOP/s) makes every balancing move worth its cost.
                Trainer::with_mesh(model, w, cfg, if every > 0 { 1e9 } else { 1e11 }, Some(mesh)).unwrap()
            }
        };
        if let Some(n) = hierarchical {
            tr.model.set_hierarchical(n).unwrap();
        }
        assert_eq!(tr.zero.is_some(), zero1);
        if resume.is_none() {
            assert_eq!(tr.parallel.as_ref().unwrap().overlaps_reduction(), overlap && !zero1);
        }
        if let Some(z) = &tr.zero {
            // Each rank holds about 1/ranks of the replicated moments and 1/DP of its experts'.
            let (mine, whole) = z.moment_floats();
            assert!(mine < whole && tr.opt.m.is_empty(), "{mine} of {whole}");
        }
        let mut losses = vec![];
        let mut moved = 0;
        let mut imbalance = vec![];
        while tr.step < stop {
            let s = tr.train_step().unwrap();
            losses.push(s.loss);
            moved += s.experts_moved;
            imbalance.push(s.rank_load_imbalance);
        }
        if let Some(run_dir) = &save {
            tr.save_checkpoint(run_dir, 1).unwrap();
        }
        Ok(Run { losses, weights: weights_of(&tr), moved, imbalance })
    })
    .unwrap();
    // Replicated tensors must be identical on every rank.
    let mut weights: HashMap<String, Vec<f32>> = HashMap::new();
    let mut losses = runs[0].losses.clone();
    let (moved, imbalance) = (runs[0].moved, runs[0].imbalance.clone());
    for r in runs {
        assert_eq!(r.losses, losses, "every rank reports the same global loss");
        for (name, w) in r.weights {
            if let Some(prev) = weights.get(&name) {
                assert_eq!(prev, &w, "{name} differs between ranks");
            }
            weights.insert(name, w);
        }
        losses = r.losses;
    }
    Run { losses, weights, moved, imbalance }
}

fn assert_close(label: &str, got: &Run, want: &Run) {
    assert_eq!(got.losses.len(), want.losses.len(), "{label}: step count");
    for (i, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(((a - b) / b).abs() <= 1e-5, "{label}: step {} loss {a} vs {b}", i + 1);
    }
    assert_eq!(got.weights.len(), want.weights.len(), "{label}: tensors");
    // Per tensor, ‖w − w_ref‖₂ ≤ 1e-5 · ‖w_ref‖₂.
    let mut worst = (0.0f64, String::new());
    for (name, w1) in &want.weights {
        let w2 = &got.weights[name];
        let diff: f64 = w2.iter().zip(w1).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = w1.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        if diff / norm > worst.0 {
            worst = (diff / norm, name.clone());
        }
    }
    eprintln!("{label}: worst relative weight difference {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 <= 1e-5, "{label}: {} differs by {:.2e} (relative L2)", worst.1, worst.0);
}

#[test]
fn expert_and_data_parallel_runs_match_one_rank() {
    let reference = single(STEPS);
    assert!(reference.losses[STEPS as usize - 1] < reference.losses[0], "training makes progress");
    let ep2 = parallel(2, 2, STEPS, STEPS, None, None);
    assert_close("2 ranks, EP 2", &ep2, &reference);
    // Memory policies hold under expert parallelism: the same bits as keeping everything.
    let policy = Opts { policy: "norm+swiglu+attention+qkv+experts swap:0 ffn:1 full:2", ..Opts::default() };
    let with_policy = parallel_opts(2, 2, STEPS, STEPS, None, None, policy);
    assert_eq!(with_policy.losses, ep2.losses, "EP 2 with a memory policy: losses");
    assert!(with_policy.weights == ep2.weights, "EP 2 with a memory policy: weights differ");
    assert_close("4 ranks, EP 4", &parallel(4, 4, STEPS, STEPS, None, None), &reference);
    assert_close("4 ranks, EP 2 × DP 2", &parallel(4, 2, STEPS, STEPS, None, None), &reference);
    assert_close("2 ranks, DP 2", &parallel(2, 1, STEPS, STEPS, None, None), &reference);
    assert_close("4 ranks, EP 2 × DP 2, reduction after backward", &parallel_opts(4, 2, STEPS, STEPS, None, None, Opts { overlap: false, ..Opts::default() }), &reference);
    let zero = parallel_with(4, 2, STEPS, STEPS, None, None, true);
    assert_close("4 ranks, EP 2 × DP 2, ZeRO-1", &zero, &reference);
    // The moment shards through a swap file: the same bits.
    let swapped = parallel_opts(4, 2, STEPS, STEPS, None, None, Opts { zero1: true, swap_moments: true, ..Opts::default() });
    assert!(swapped.losses == zero.losses && swapped.weights == zero.weights, "ZeRO-1 with swapped moments differs");
    assert_close("2 ranks, DP 2, ZeRO-1", &parallel_with(2, 1, STEPS, STEPS, None, None, true), &reference);
    assert_close("3 ranks, DP 3, ZeRO-1 (uneven chunks)", &parallel_with(3, 1, STEPS, STEPS, None, None, true), &reference);
    let hier = Opts { hierarchical: Some(2), ..Opts::default() };
    assert_close("4 ranks, EP 4, hierarchical all-to-all over 2 nodes", &parallel_opts(4, 4, STEPS, STEPS, None, None, hier), &reference);
}

/// Continues a 10-step checkpoint on one rank to step 20 and checks the whole curve
/// (`first`'s losses, then these) against the single-rank reference.
fn resume_on_one_rank(label: &str, ckpt: &Path, first: &Run, reference: &Run) {
    let mut tr = Trainer::resume(ckpt, 1e11, Some(20)).unwrap();
    let rest: Vec<f32> = (10..20).map(|_| tr.train_step().unwrap().loss).collect();
    let run = Run { losses: [first.losses.clone(), rest].concat(), weights: weights_of(&tr), moved: 0, imbalance: vec![] };
    assert_close(label, &run, reference);
}

#[test]
fn zero1_checkpoints_reshard_too() {
    let reference = single(20);
    let dir = std::env::temp_dir().join(format!("ultramoe-zero-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = parallel_with(4, 2, 20, 10, None, Some(&dir), true);
    let ckpt = Trainer::latest_checkpoint(&dir).expect("checkpoint written");
    for (ranks, ep, zero1) in [(4, 4, true), (2, 2, false)] {
        let rest = parallel_with(ranks, ep, 20, 20, Some(&ckpt), None, zero1);
        let run = Run { losses: [first.losses.clone(), rest.losses].concat(), weights: rest.weights, moved: 0, imbalance: vec![] };
        assert_close(&format!("ZeRO-1 EP 2 × DP 2 → {ranks} ranks EP {ep}, ZeRO-1 {zero1}"), &run, &reference);
    }
    resume_on_one_rank("ZeRO-1 EP 2 × DP 2 → 1 rank", &ckpt, &first, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_reshards_between_layouts() {
    let reference = single(20);
    let dir = std::env::temp_dir().join(format!("ultramoe-reshard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // 10 steps at EP 4, saved as four expert shards.
    let first = parallel(4, 4, 20, 10, None, Some(&dir));
    let ckpt = Trainer::latest_checkpoint(&dir).expect("checkpoint written");
    assert!(ckpt.join("model-00004-of-00004.safetensors").is_file());
    // ... continued at EP 2, at EP 2 × DP 2, and on one rank.
    for (ranks, ep) in [(2, 2), (4, 2)] {
        let rest = parallel(ranks, ep, 20, 20, Some(&ckpt), None);
        let run = Run { losses: [first.losses.clone(), rest.losses].concat(), weights: rest.weights, moved: 0, imbalance: vec![] };
        assert_close(&format!("EP 4 → {ranks} ranks EP {ep}"), &run, &reference);
    }
    resume_on_one_rank("EP 4 → 1 rank", &ckpt, &first, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failures_end_the_job_naming_the_rank() {
    // Ranks started with different configurations stop before training.
    let err = local::run(2, Duration::from_secs(30), |c| {
        let world: Arc<dyn ProcessGroup> = Arc::new(c);
        let mesh = Mesh::new(world, 2)?;
        let model = Model::expert_parallel(model_config(), mesh.ep.clone()).unwrap();
        let w = init_weights(&model.layout, 7);
        let mut cfg = train_config(5);
        cfg.lr *= 1.0 + mesh.world.rank() as f32;
        Ok(Trainer::with_mesh(model, w, cfg, 1e11, Some(mesh)).err().map(|e| e.to_string()))
    })
    .unwrap();
    assert!(err[1].as_deref().unwrap_or("").contains("rank 1: started with a different"), "{err:?}");
    // A rank that dies mid-run: the others' steps fail promptly with its rank.
    let start = std::time::Instant::now();
    let err = local::run(2, Duration::from_secs(30), |c| {
        let world: Arc<dyn ProcessGroup> = Arc::new(c);
        let mesh = Mesh::new(world, 2)?;
        let rank = mesh.world.rank();
        let model = Model::expert_parallel(model_config(), mesh.ep.clone()).unwrap();
        let w = init_weights(&model.layout, 7);
        let mut tr = Trainer::with_mesh(model, w, train_config(5), 1e11, Some(mesh)).unwrap();
        tr.train_step().unwrap();
        if rank == 1 {
            panic!("simulated crash");
        }
        let e = tr.train_step().expect_err("the peer is gone");
        assert!(e.to_string().contains("rank 1"), "{e}");
        Ok(())
    })
    .expect_err("the job fails");
    assert_eq!(err.rank, Some(1), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "failure took {:?}", start.elapsed());
}

/// 50 steps at EP 4 on skewed routing: with dynamic placement (every 5 steps, one
/// redundant slot per rank) the losses and final weights are those of the run without
/// it, while the ranks' loads even out.
#[test]
fn dynamic_placement_changes_nothing_but_speed() {
    const N: u64 = 50;
    let skewed = Opts { skew: 1.0, ..Opts::default() };
    let off = parallel_opts(4, 4, N, N, None, None, skewed);
    let on = parallel_opts(4, 4, N, N, None, None, Opts { placement: Some((5, 1)), ..skewed });
    assert!(on.moved > 0, "experts moved");
    assert_close("EP 4, dynamic placement vs none", &on, &off);
    let tail = |r: &Run| r.imbalance[40..].iter().sum::<f64>() / 10.0;
    eprintln!("rank load imbalance, last 10 steps: {:.3} without placement, {:.3} with", tail(&off), tail(&on));
    assert!(tail(&off) >= 1.5, "the workload is skewed: {}", tail(&off));
    assert!(tail(&on) <= 1.15, "placement evens the ranks: {}", tail(&on));
    // With ZeRO-1 at EP 2 × DP 2 (moments sharded, gathered for the move) too.
    let zero = Opts { zero1: true, ..skewed };
    let zoff = parallel_opts(4, 2, 30, 30, None, None, zero);
    let zon = parallel_opts(4, 2, 30, 30, None, None, Opts { placement: Some((5, 1)), ..zero });
    assert!(zon.moved > 0);
    assert_close("EP 2 × DP 2 ZeRO-1, dynamic placement vs none", &zon, &zoff);
}

/// A checkpoint written after experts moved names logical experts: it continues under
/// the same placement, at another expert-parallel size, and on one rank, all on the
/// uninterrupted run's curve.
#[test]
fn placed_checkpoints_load_under_any_layout() {
    let dir = std::env::temp_dir().join(format!("ultramoe-placed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = Opts { skew: 1.0, placement: Some((5, 1)), ..Opts::default() };
    let whole = parallel_opts(4, 4, 20, 20, None, None, opts);
    let first = parallel_opts(4, 4, 20, 10, None, Some(&dir), opts);
    assert!(first.moved > 0, "experts moved before the checkpoint");
    let ckpt = Trainer::latest_checkpoint(&dir).expect("checkpoint written");
    // Every expert saved exactly once, in the Hugging Face sharded layout.
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("model.safetensors.index.json")).unwrap()).unwrap();
    let names = index["weight_map"].as_object().unwrap();
    let mut saved = 0;
    for k in 1..=4 {
        let f = ckpt.join(format!("model-{k:05}-of-00004.safetensors"));
        saved += ultramoe_model::checkpoint::read_safetensors(&f).unwrap().len();
    }
    assert_eq!(saved, names.len(), "no tensor saved twice");
    for (ranks, ep, o) in [(4, 4, opts), (2, 2, Opts { skew: 1.0, ..Opts::default() })] {
        let rest = parallel_opts(ranks, ep, 20, 20, Some(&ckpt), None, o);
        let run = Run { losses: [first.losses.clone(), rest.losses].concat(), weights: rest.weights, moved: 0, imbalance: vec![] };
        assert_close(&format!("placed EP 4 → {ranks} ranks EP {ep}"), &run, &whole);
    }
    let mut tr = Trainer::resume(&ckpt, 1e11, Some(20)).unwrap();
    let rest: Vec<f32> = (10..20).map(|_| tr.train_step().unwrap().loss).collect();
    let run = Run { losses: [first.losses.clone(), rest].concat(), weights: weights_of(&tr), moved: 0, imbalance: vec![] };
    assert_close("placed EP 4 → 1 rank", &run, &whole);
    let _ = std::fs::remove_dir_all(&dir);
}
