//! Weight bytes per second of the decode GEMV on one thread: a matrix that stays in L2
//! (what the kernel can do) and many matrices read in turn from memory (what memory
//! allows), at a square shape and at the two expert shapes of the decode benchmark's
//! model, for 1 to 4 rows of activations; INT8 both in integers (rounded activations)
//! and widened to f32.
use std::time::Instant;
use ultramoe_kernels::gemv::{gemv_rows_rounded, Fetch, Rows};
use ultramoe_kernels::gemv_int8::QuantizedActivations;

fn rate(rows: usize, cols: usize, fmt: &str, copies: usize, reps: usize, xrows: usize) -> f64 {
    let n = rows * cols;
    let f: Vec<f32> = (0..n * copies).map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5).collect();
    let b: Vec<u16> = f.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    let q: Vec<i8> = (0..n * copies).map(|i| ((i * 31) % 255) as i32 as i8).collect();
    let s = vec![0.01f32; rows];
    let x: Vec<f32> = (0..xrows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
    let rounded = QuantizedActivations::new(&x, xrows, cols);
    let mut out = vec![0.0f32; rows * xrows];
    let (bytes, int) = match fmt {
        "f32" => (4 * n, false),
        "bf16" => (2 * n, false),
        "int8" => (n, true),
        _ => (n, false),
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for r in 0..reps {
            let k = r % copies;
            let w = match fmt {
                "f32" => Rows::F32(&f[k * n..(k + 1) * n]),
                "bf16" => Rows::Bf16(&b[k * n..(k + 1) * n]),
                _ => Rows::Int8(&q[k * n..(k + 1) * n], &s),
            };
            gemv_rows_rounded(w, &x, int.then_some(&rounded), xrows, cols, &mut out, if copies == 1 { Fetch::Cached } else { Fetch::Memory });
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    std::hint::black_box(&out);
    bytes as f64 / best / 1e9
}

fn main() {
    let xrows: Vec<usize> = std::env::args().nth(1).map_or(vec![1], |a| a.split(',').map(|v| v.parse().expect("x rows: 1 to 4")).collect());
    for (rows, cols) in [(1024, 1024), (512, 1024), (1024, 256)] {
        for fmt in ["f32", "bf16", "int8", "int8-as-f32"] {
            for &n in &xrows {
                let bpe = match fmt {
                    "f32" => 4,
                    "bf16" => 2,
                    _ => 1,
                };
                let hot = rate(rows * 256 / (rows * cols * bpe / 1024).max(256), cols, fmt, 1, 2000, n);
                let copies = (128 << 20) / (rows * cols * bpe);
                let cold = rate(rows, cols, fmt, copies, copies * 2, n);
                println!("{rows:5}x{cols:<5} {fmt:12} x rows {n}  in L2 {hot:6.1} GB/s   from memory {cold:6.1} GB/s");
            }
        }
    }
}
