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
                let planned = ultramoe_plan::simulate::tp_bytes_per_layer(N as f64, H, 4.0, t);
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
