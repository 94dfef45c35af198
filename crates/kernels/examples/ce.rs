use std::time::Instant;
use ultramoe_kernels::loss::cross_entropy_fused_backward;
fn main() {
    let (n, v) = (2048usize, 4096usize);
    let base: Vec<f32> = (0..n * v).map(|i| ((i * 7919) % 1000) as f32 * 0.001).collect();
    let targets: Vec<i32> = (0..n).map(|i| (i * 13 % v) as i32).collect();
    let mut l = base.clone();
    let reps = 10;
    let mut tot = 0.0;
    for _ in 0..reps {
        l.copy_from_slice(&base);
        let s = Instant::now();
        cross_entropy_fused_backward(&mut l, &targets, v, 1.0 / n as f32);
        tot += s.elapsed().as_secs_f64();
    }
    println!("fused CE: {:.2} ms", tot / reps as f64 * 1e3);
}
