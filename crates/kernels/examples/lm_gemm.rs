//! The LM head's three products at the bench config's shape (2,048 rows, hidden 256,
//! vocabulary 4,096), over all rows at once and in row chunks as the fused head runs them:
//! `cargo run --release -p ultramoe-kernels --example lm_gemm [CHUNK_ROWS]`.
use std::time::Instant;
use ultramoe_kernels::gemm::{matmul, Op};

fn time(name: &str, f: &mut dyn FnMut(), flops: f64) {
    f();
    let reps = 10;
    let s = Instant::now();
    for _ in 0..reps {
        f();
    }
    let dt = s.elapsed().as_secs_f64() / reps as f64;
    println!("{name:<44} {:6.2} ms  {:4.0} GFLOP/s", dt * 1e3, flops / dt / 1e9);
}

fn main() {
    let chunk: usize = std::env::args().nth(1).map_or(128, |a| a.parse().expect("CHUNK_ROWS: a number"));
    let (n, h, v) = (2048usize, 256usize, 4096usize);
    let dl = vec![0.01f32; n * v];
    let x = vec![0.02f32; n * h];
    let w = vec![0.03f32; v * h];
    let mut dx = vec![0.0f32; n * h];
    let mut dw = vec![0.0f32; v * h];
    let mut lg = vec![0.0f32; n * v];
    let f = 2.0 * (n * h * v) as f64;
    for rows in [n, chunk] {
        let per = |r0: usize| r0..(r0 + rows).min(n);
        println!("{} rows at a time:", rows);
        time(
            "  logits = x wᵀ",
            &mut || {
                for r in (0..n).step_by(rows).map(per) {
                    matmul(&mut lg[r.start * v..r.end * v], &x[r.start * h..r.end * h], Op::N, &w, Op::T, r.len(), v, h, false, 1.0)
                }
            },
            f,
        );
        time(
            "  dx = dlogits w",
            &mut || {
                for r in (0..n).step_by(rows).map(per) {
                    matmul(&mut dx[r.start * h..r.end * h], &dl[r.start * v..r.end * v], Op::N, &w, Op::N, r.len(), h, v, false, 1.0)
                }
            },
            f,
        );
        time(
            "  dw += dlogitsᵀ x",
            &mut || {
                for r in (0..n).step_by(rows).map(per) {
                    matmul(&mut dw, &dl[r.start * v..r.end * v], Op::T, &x[r.start * h..r.end * h], Op::N, v, h, r.len(), true, 1.0)
                }
            },
            f,
        );
    }
}
