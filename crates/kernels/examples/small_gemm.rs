use std::time::Instant;
use ultramoe_kernels::gemm::{matmul_serial, Op};
fn main() {
    for &(m, n, k) in &[(128usize, 128usize, 32usize), (128, 32, 128), (256, 256, 48), (2048, 96, 32), (512,128,128)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let mut c = vec![0.0f32; m * n];
        let reps = 2000;
        let s = Instant::now();
        for _ in 0..reps {
            matmul_serial(&mut c, &a, Op::N, &b, Op::T, m, n, k, false, 1.0);
        }
        let t = s.elapsed().as_secs_f64() / reps as f64;
        println!("{m}x{n}x{k}: {:.1} us, {:.1} GFLOP/s", t * 1e6, 2.0 * (m * n * k) as f64 / t / 1e9);
    }
}
