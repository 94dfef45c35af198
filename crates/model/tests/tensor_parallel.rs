//! Tensor-parallel layers against one rank: a transformer-shaped block (a column- then
//! a row-parallel pair twice, like attention's QKV/output and the MLP's up/down) and a
//! vocabulary-parallel head with its cross-entropy, at TP 2 and 4, with and without
//! sequence parallelism: the same loss and gradients as the unsplit layers (1e-5), and
//! the bytes the collectives move equal the planner's formula exactly.

use std::sync::Arc;
use std::time::Duration;
use ultramoe_dist::local;
use ultramoe_kernels::gemm::{linear, linear_backward};
use ultramoe_kernels::loss::cross_entropy_fused_backward;
use ultramoe_model::tensor_parallel::TensorParallel;

const N: usize = 8; // tokens
const H: usize = 12; // hidden
const I: usize = 16; // inner width of each pair
const V: usize = 20; // vocabulary

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
        })
        .collect()
}

struct Weights {
    up: [Vec<f32>; 2],   // [I, H] each, column-parallel
    down: [Vec<f32>; 2], // [H, I] each, row-parallel
    head: Vec<f32>,      // [V, H], vocabulary-parallel
}

fn weights() -> Weights {
    Weights { up: [values(I * H, 1), values(I * H, 2)], down: [values(H * I, 3), values(H * I, 4)], head: values(V * H, 5) }
}

fn targets() -> Vec<i32> {
    (0..N).map(|i| if i == 3 { -1 } else { ((i * 7 + 2) % V) as i32 }).collect()
}

/// Loss and every gradient, on one rank with the plain kernels: `x ← x + down(tanh(up(x)))`
/// twice, then the head and the mean cross-entropy.
struct Grads {
    loss: f64,
    dx: Vec<f32>,
    up: [Vec<f32>; 2],
    down: [Vec<f32>; 2],
    head: Vec<f32>,
}

fn reference(w: &Weights, x0: &[f32]) -> Grads {
    let mut xs = vec![x0.to_vec()];
    let mut acts = vec![];
    for p in 0..2 {
        let x = xs.last().unwrap();
        let a: Vec<f32> = linear(x, &w.up[p], N, H, I).iter().map(|v| v.tanh()).collect();
        let y = linear(&a, &w.down[p], N, I, H);
        xs.push(x.iter().zip(&y).map(|(a, b)| a + b).collect());
        acts.push(a);
    }
    let x = xs.last().unwrap();
    let mut logits = linear(x, &w.head, N, H, V);
    let t = targets();
    let count = t.iter().filter(|&&v| v >= 0).count();
    let (sum, _) = cross_entropy_fused_backward(&mut logits, &t, V, 1.0 / count as f32);
    let mut g = Grads { loss: sum / count as f64, dx: vec![0.0; N * H], up: [vec![0.0; I * H], vec![0.0; I * H]], down: [vec![0.0; H * I], vec![0.0; H * I]], head: vec![0.0; V * H] };
    let mut dx = vec![0.0; N * H];
    linear_backward(Some(&mut dx), &mut g.head, &logits, x, &w.head, N, H, V, false);
    for p in (0..2).rev() {
        let a = &acts[p];
        let mut da = vec![0.0; N * I];
        linear_backward(Some(&mut da), &mut g.down[p], &dx, a, &w.down[p], N, I, H, false);
        let dpre: Vec<f32> = da.iter().zip(a).map(|(d, a)| d * (1.0 - a * a)).collect();
        let mut dxi = vec![0.0; N * H];
        linear_backward(Some(&mut dxi), &mut g.up[p], &dpre, &xs[p], &w.up[p], N, H, I, false);
        dx = dx.iter().zip(&dxi).map(|(a, b)| a + b).collect();
    }
    g.dx = dx;
    g
}

/// The same on `t` ranks: each returns its loss, its share of `dx` (its rows under
/// sequence parallelism, all of it otherwise), its gradient slices, and the bytes its
/// collectives moved in the two pairs alone and in all.
struct RankOut {
    loss: f64,
    dx: Vec<f32>,
    up: [Vec<f32>; 2],
    down: [Vec<f32>; 2],
    head: Vec<f32>,
    layer_bytes: u64,
}

fn split_run(t: usize, sp: bool) -> Vec<RankOut> {
    local::run(t, Duration::from_secs(30), move |comm| {
        let tp = TensorParallel::new(Arc::new(comm), sp);
        let w = weights();
        let x0 = values(N * H, 9);
        let (i0, il) = tp.slice(I, "intermediate_size").unwrap();
        let (v0, vl) = tp.slice(V, "vocab_size").unwrap();
        let (r0, rl) = if sp { tp.slice(N, "tokens").unwrap() } else { (0, N) };
        let up: Vec<Vec<f32>> = w.up.iter().map(|m| m[i0 * H..(i0 + il) * H].to_vec()).collect();
        let down: Vec<Vec<f32>> = w.down.iter().map(|m| ultramoe_model::tensor_ops::take_cols(m, I, i0, il)).collect();
        let head = w.head[v0 * H..(v0 + vl) * H].to_vec();
        // Forward: x is this rank's rows (all rows without sequence parallelism).
        let mut xs = vec![x0[r0 * H..(r0 + rl) * H].to_vec()];
        let mut saved = vec![];
        for p in 0..2 {
            let x = xs.last().unwrap();
            let (pre, x_full) = tp.column_forward(x, &up[p], H, il)?;
            let a: Vec<f32> = pre.iter().map(|v| v.tanh()).collect();
            let y = tp.row_forward(&a, &down[p], il, H)?;
            xs.push(x.iter().zip(&y).map(|(a, b)| a + b).collect());
            saved.push((x_full, a));
        }
        let (mut logits, x_head) = tp.column_forward(xs.last().unwrap(), &head, H, vl)?;
        let tg = targets();
        let count = tg.iter().filter(|&&v| v >= 0).count();
        let (sum, _) = tp.vocab_parallel_cross_entropy(&mut logits, &tg, v0, vl, 1.0 / count as f32)?;
        let mut g_head = vec![0.0; vl * H];
        let mut dx = tp.column_backward(&logits, &x_head, &head, &mut g_head, H, vl)?;
        let before_layer = tp.traffic_bytes();
        let mut g_up = [vec![0.0; il * H], vec![0.0; il * H]];
        let mut g_down = [vec![0.0; H * il], vec![0.0; H * il]];
        for p in (0..2).rev() {
            let (x_full, a) = &saved[p];
            let da = tp.row_backward(&dx, a, &down[p], &mut g_down[p], il, H)?;
            let dpre: Vec<f32> = da.iter().zip(a).map(|(d, a)| d * (1.0 - a * a)).collect();
            let dxi = tp.column_backward(&dpre, x_full, &up[p], &mut g_up[p], H, il)?;
            dx = dx.iter().zip(&dxi).map(|(a, b)| a + b).collect();
        }
        let backward_layer = tp.traffic_bytes() - before_layer;
        // The forward of the two pairs moved the same bytes as their backward.
        Ok(RankOut { loss: sum / count as f64, dx, up: g_up, down: g_down, head: g_head, layer_bytes: 2 * backward_layer })
    })
    .unwrap()
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn split_layers_give_the_unsplit_loss_and_gradients_and_move_the_planned_bytes() {
    let w = weights();
    let r = reference(&w, &values(N * H, 9));
    for t in [2, 4] {
        for sp in [false, true] {
            let outs = split_run(t, sp);
            let (il, vl, rl) = (I / t, V / t, if sp { N / t } else { N });
            for (k, o) in outs.iter().enumerate() {
                let what = format!("tp {t} sp {sp} rank {k}");
                assert!((o.loss - r.loss).abs() <= 1e-5 * r.loss.abs(), "{what}: loss {} vs {}", o.loss, r.loss);
                let rows = if sp { k * rl..(k + 1) * rl } else { 0..N };
                close(&o.dx, &r.dx[rows.start * H..rows.end * H], &format!("{what} dx"));
                for p in 0..2 {
                    close(&o.up[p], &r.up[p][k * il * H..(k + 1) * il * H], &format!("{what} up{p}"));
                    close(&o.down[p], &ultramoe_model::tensor_ops::take_cols(&r.down[p], I, k * il, il), &format!("{what} down{p}"));
                }
                close(&o.head, &r.head[k * vl * H..(k + 1) * vl * H], &format!("{what} head"));
                // One layer's TP traffic, forward and backward, in f32: the planner's
                // formula to the byte.
                let planned = ultramoe_plan::simulate::tp_bytes_per_layer(N as f64, H, 4.0, t, 2);
                assert_eq!(o.layer_bytes as f64, planned, "{what}: traffic");
            }
        }
    }
}

#[test]
fn a_split_that_does_not_divide_names_the_field() {
    let outs = local::run(3, Duration::from_secs(10), |comm| {
        let tp = TensorParallel::new(Arc::new(comm), false);
        Ok(tp.slice(16, "num_attention_heads").unwrap_err())
    })
    .unwrap();
    assert!(outs[0].contains("num_attention_heads") && outs[0].contains("3") && outs[0].contains("16"), "{}", outs[0]);
}

// ---- The whole model split over a tensor-parallel group ----------------------------
//
// The transformers fixtures (DeepSeek-V3 with MLA and shared experts, Qwen3-MoE with
// q/k norms, Mixtral; vocabularies padded to a multiple of 4) at TP 2 and 4 against the
// same model on one rank: logits, loss and every gradient (the slices gathered whole)
// agree to 1e-5 of their largest value, with and without memory policies that rerun the
// split blocks; the bytes the collectives move equal the planner's formulas (layer by
// layer, plus the vocabulary-parallel embedding, head and cross-entropy); the slices
// save as whole tensors that load at any other TP size.

use std::path::PathBuf;
use ultramoe_dist::ProcessGroup;
use ultramoe_model::checkpoint::{load_weights, read_safetensors, save_model_share, save_weights};
use ultramoe_model::policy::LayerPolicy;
use ultramoe_model::{shifted_targets, Model, ModelConfig, PassOptions, Share};

fn fixture(case: &str) -> PathBuf {
    match std::env::var("ULTRAMOE_FIXTURES") {
        Ok(p) => PathBuf::from(p).join(case),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf").join(case),
    }
}

/// The fixture `case` with its vocabulary padded to a multiple of 4 (tensor
/// parallelism splits the vocabulary evenly, and the fixtures' sizes are prime): the
/// fixture's weights plus a few embedding and head rows no input uses, drawn small.
/// Written to a fresh directory, which the caller removes.
fn padded(case: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let src = fixture(case);
    let cfg = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let mut raw = cfg.raw.clone();
    raw["vocab_size"] = (4 * cfg.vocab_size.div_ceil(4)).into();
    let (one, big) = (Model::new(cfg), Model::new(ModelConfig::from_json_str(&raw.to_string()).unwrap()));
    let w = load_weights(&one, &src).unwrap();
    let extra = values(big.layout.total, 11);
    let mut wp = vec![0.0; big.layout.total];
    for s in &big.layout.specs {
        let from = &w[one.layout.get(&s.name).unwrap().range()];
        let to = &mut wp[s.range()];
        to[..from.len()].copy_from_slice(from);
        to[from.len()..].iter_mut().zip(&extra[s.offset + from.len()..]).for_each(|(d, x)| *d = 0.05 * x);
    }
    let out = std::env::temp_dir().join(format!("ultramoe-tp-{case}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    save_weights(&big, &wp, &out, None).unwrap();
    out
}

fn fixture_batch(dir: &std::path::Path) -> (Vec<u32>, usize, usize) {
    let reference = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let ids_t = &reference["input_ids"];
    (ids_t.i64("input_ids").unwrap().iter().map(|&x| x as u32).collect(), ids_t.shape[0], ids_t.shape[1])
}

/// What a rank's pass gives: logits, loss, every held tensor's (name, whole shape,
/// split, gradient) and the bytes its tensor-parallel collectives moved.
struct Pass {
    logits: Vec<f32>,
    loss: f32,
    grads: Vec<(String, Vec<usize>, Option<ultramoe_model::params::TpSplit>, Vec<f32>)>,
    tp_bytes: u64,
    planned: f64,
}

fn pass(model: &Model, w: &[f32], ids: &[u32], b: usize, t: usize, opts: &PassOptions) -> Pass {
    let fwd = model.forward_with(w, ids, b, t, opts);
    let logits = fwd.logits.clone();
    let targets = shifted_targets(ids, t);
    let (loss, count) = model.loss(&fwd, &targets);
    let mut g = vec![0.0; model.layout.total];
    model.backward_with(w, &mut g, fwd, &targets, 1.0 / count as f32, opts);
    model.sum_tensor_parallel_grads(&mut g).unwrap();
    let grads = model
        .layout
        .specs
        .iter()
        .map(|s| (s.name.clone(), s.whole_shape(), s.split, g[s.range()].to_vec()))
        .collect();
    let (tp_bytes, tp) = model.tp.as_ref().map_or((0, 1), |x| (x.traffic_bytes(), x.size()));
    let n = (b * t) as f64;
    let layers: f64 = (0..model.layers.len()).map(|i| ultramoe_plan::simulate::tp_bytes_per_layer(n, model.cfg.hidden, 4.0, tp, model.tp_split_blocks(i))).sum();
    // `forward_with` also hands the caller whole logits: every rank's slice gathered.
    let logits_gathered = (tp - 1) as f64 * n * (model.cfg.vocab_size / tp) as f64 * 4.0;
    let planned = layers + ultramoe_plan::simulate::tp_bytes_vocab(n, model.cfg.hidden, 4.0, tp) + if tp > 1 { logits_gathered } else { 0.0 };
    Pass { logits, loss, grads, tp_bytes, planned }
}

fn tp_model(cfg: ModelConfig, group: Arc<dyn ProcessGroup>) -> ultramoe_model::Result<Model> {
    sp_model(cfg, group, false)
}

/// The share of a tensor-parallel group, with sequence parallelism when `sp`.
fn sp_model(cfg: ModelConfig, group: Arc<dyn ProcessGroup>, sp: bool) -> ultramoe_model::Result<Model> {
    let share = Share { tp: Some(Arc::new(TensorParallel::new(group, sp))), ..Share::whole(&cfg) };
    Model::share(cfg, share)
}

fn assert_close(a: &[f32], b: &[f32], rel: f32, what: &str) {
    let scale = b.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(a.len() == b.len() && err <= rel * scale, "{what}: off by {err} (largest {scale}, {} vs {} values)", a.len(), b.len());
}

/// The fixture `case` at TP `t` under `policy` against one rank.
fn check_tp(case: &'static str, t: usize, policy: Vec<LayerPolicy>) {
    check_tp_sp(case, t, policy.clone(), false);
    check_tp_sp(case, t, policy, true);
}

/// [`check_tp`] with sequence parallelism when `sp`.
fn check_tp_sp(case: &'static str, t: usize, policy: Vec<LayerPolicy>, sp: bool) {
    let dir = padded(case);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (ids, b, tt) = fixture_batch(&fixture(case));
    let opts = PassOptions { policy, ..PassOptions::default() };
    let single = Model::new(cfg.clone());
    let reference = pass(&single, &load_weights(&single, &dir).unwrap(), &ids, b, tt, &PassOptions::default());
    let (ids2, opts2, dir2) = (ids.clone(), opts.clone(), dir.clone());
    let ranks = local::run(t, Duration::from_secs(60), move |c| {
        let model = sp_model(ModelConfig::from_file(&dir2.join("config.json")).unwrap(), Arc::new(c), sp).unwrap();
        let w = load_weights(&model, &dir2).unwrap();
        Ok(pass(&model, &w, &ids2, b, tt, &opts2))
    })
    .unwrap();
    let label = format!("{case} TP {t}{}", if sp { " SP" } else { "" });
    for (r, p) in ranks.iter().enumerate() {
        assert_close(&p.logits, &reference.logits, 1e-5, &format!("{label} rank {r} logits"));
        assert!(((p.loss - reference.loss) / reference.loss).abs() <= 1e-5, "{label}: loss {} vs {}", p.loss, reference.loss);
        if opts.policy.is_empty() {
            assert_eq!(p.tp_bytes, p.planned.round() as u64, "{label} rank {r}: bytes moved vs the planner's formula");
            assert!(p.tp_bytes > 0);
        }
    }
    // Every tensor of the single-rank model, from the slices or from each rank's copy.
    for (name, shape, _, g1) in &reference.grads {
        let copies: Vec<_> = ranks.iter().map(|p| p.grads.iter().find(|x| &x.0 == name).unwrap_or_else(|| panic!("{label}: {name} not held"))).collect();
        assert_eq!(&copies[0].1, shape, "{label}: {name} whole shape");
        match copies[0].2 {
            Some(split) => {
                let mut whole = vec![0.0; g1.len()];
                for (rank, c) in copies.iter().enumerate() {
                    assert_eq!(c.2, Some(ultramoe_model::params::TpSplit { rank, ..split }), "{label}: {name} slice of rank {rank}");
                    split.put_as(rank, &mut whole, &c.3, shape);
                }
                assert_close(&whole, g1, 1e-5, &format!("{label}: {name} gradient (gathered)"));
            }
            None => {
                for (rank, c) in copies.iter().enumerate() {
                    assert_close(&c.3, g1, 1e-5, &format!("{label}: {name} gradient on rank {rank}"));
                }
            }
        }
    }
    assert_eq!(ranks[0].grads.len(), reference.grads.len(), "{label}: the same tensors");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn policies(layers: usize) -> Vec<LayerPolicy> {
    // Layer 0 reruns whole (its collectives too); the rest rebuild norms, SwiGLU, q/k/v
    // and the attention probabilities, and layer 1 reruns its FFN block.
    (0..layers)
        .map(|i| match i {
            0 => LayerPolicy { full: true, ..LayerPolicy::default() },
            1 => LayerPolicy { norm: true, swiglu: true, qkv: true, attention: true, ffn: true, ..LayerPolicy::default() },
            _ => LayerPolicy { norm: true, swiglu: true, qkv: true, attention: true, ..LayerPolicy::default() },
        })
        .collect()
}

#[test]
fn deepseek_v3_tensor_parallel_matches_one_rank() {
    check_tp("deepseek_v3_tiny", 2, vec![]);
    check_tp("deepseek_v3_tiny", 4, vec![]);
    check_tp("deepseek_v3_tiny", 2, policies(3));
}

#[test]
fn qwen3_moe_tensor_parallel_matches_one_rank() {
    check_tp("qwen3_moe_tiny", 2, vec![]);
    check_tp("qwen3_moe_tiny", 2, policies(2));
}

#[test]
fn mixtral_tensor_parallel_matches_one_rank() {
    check_tp("mixtral_tiny", 2, vec![]);
    check_tp("mixtral_tiny", 2, policies(2));
}

#[test]
fn tensor_parallel_sizes_that_do_not_divide_name_the_field() {
    for (case, t, field) in [("qwen3_moe_tiny", 4, "num_key_value_heads"), ("mixtral_tiny", 3, "num_attention_heads"), ("deepseek_v3_tiny", 2, "vocab_size")] {
        let dir = fixture(case);
        let errors = local::run(t, Duration::from_secs(30), move |c| {
            Ok(tp_model(ModelConfig::from_file(&dir.join("config.json")).unwrap(), Arc::new(c)).err().map(|e| e.to_string()))
        })
        .unwrap();
        let e = errors[0].clone().unwrap_or_default();
        assert!(e.contains(field) && !e.contains('\n'), "{case} TP {t}: {e:?}");
    }
}

#[test]
fn a_tensor_parallel_share_saves_whole_tensors_that_load_at_any_size() {
    let dir = padded("deepseek_v3_tiny");
    let out = std::env::temp_dir().join(format!("ultramoe-tp-save-{}", std::process::id()));
    let (dir2, out2) = (dir.clone(), out.clone());
    local::run(2, Duration::from_secs(60), move |c| {
        let model = tp_model(ModelConfig::from_file(&dir2.join("config.json")).unwrap(), Arc::new(c)).unwrap();
        let w = load_weights(&model, &dir2).unwrap();
        save_model_share(&model, &w, &out2).unwrap();
        Ok(())
    })
    .unwrap();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let single = Model::new(cfg.clone());
    // TP 2 → TP 1: bit for bit the weights it was given.
    assert_eq!(load_weights(&single, &out).unwrap(), load_weights(&single, &dir).unwrap());
    // TP 2 → TP 4: each rank's slices are those of the original tensors.
    let (dir4, out4) = (dir.clone(), out.clone());
    let same = local::run(4, Duration::from_secs(60), move |c| {
        let model = tp_model(ModelConfig::from_file(&dir4.join("config.json")).unwrap(), Arc::new(c)).unwrap();
        Ok(load_weights(&model, &out4).unwrap() == load_weights(&model, &dir4).unwrap() && model.layout.specs.iter().any(|s| s.split.is_some()))
    })
    .unwrap();
    assert_eq!(same, vec![true; 4]);
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
