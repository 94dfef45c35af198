//! GFLOP/s of the decoding products with several rows of x (the dense projections and
//! the LM head of a batch of sequences), f32 and BF16 weights, on all threads: many
//! matrices read in turn, so the weights come from memory as in a decode step.
use std::time::Instant;
use ultramoe_kernels::qlinear::{linear_f32, QMatrix, WeightFormat};

fn main() {
    let n: usize = std::env::args().nth(1).map_or(16, |a| a.parse().expect("x rows"));
    for (rows, cols, copies) in [(1536usize, 1024usize, 48usize), (1024, 1024, 64), (32000, 1024, 3)] {
        let w: Vec<f32> = (0..rows * cols * copies).map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5).collect();
        let x: Vec<f32> = (0..n * cols).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let q: Vec<QMatrix> = (0..copies).map(|k| QMatrix::quantize(&w[k * rows * cols..(k + 1) * rows * cols], rows, cols, WeightFormat::Bf16)).collect();
        let flop = 2.0 * (n * rows * cols * copies) as f64;
        for fmt in ["f32", "bf16"] {
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t = Instant::now();
                for k in 0..copies {
                    let y = match fmt {
                        "f32" => linear_f32(&x, &w[k * rows * cols..(k + 1) * rows * cols], n, cols, rows, true),
                        _ => q[k].linear(&x, n),
                    };
                    std::hint::black_box(y);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("{rows:6}x{cols:<5} x{copies:<3} {fmt:5} x rows {n:2}: {:7.3} ms  {:6.1} GFLOP/s", best * 1e3, flop / best / 1e9);
        }
    }
}
