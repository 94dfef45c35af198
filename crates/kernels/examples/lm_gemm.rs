use std::time::Instant;
use ultramoe_kernels::gemm::{matmul, Op};
fn t(name: &str, f: &mut dyn FnMut(), flops: f64) {
    f();
    let reps = 10;
    let s = Instant::now();
    for _ in 0..reps { f(); }
    let dt = s.elapsed().as_secs_f64() / reps as f64;
    println!("{name:<40} {:.2} ms  {:.0} GF/s", dt * 1e3, flops / dt / 1e9);
}
fn main() {
    let (n, h, v) = (2048usize, 256usize, 4096usize);
    let dl = vec![0.01f32; n * v];
    let x = vec![0.02f32; n * h];
    let w = vec![0.03f32; v * h];
    let mut dx = vec![0.0f32; n * h];
    let mut dw = vec![0.0f32; v * h];
    let mut dwt = vec![0.0f32; h * v];
    let f = 2.0 * (n * h * v) as f64;
    t("dx = dl[n,v] w[v,h]", &mut || matmul(&mut dx, &dl, Op::N, &w, Op::N, n, h, v, false, 1.0), f);
    t("dw += dl^T[v,n] x[n,h]", &mut || matmul(&mut dw, &dl, Op::T, &x, Op::N, v, h, n, true, 1.0), f);
    t("dw^T += x^T[h,n] dl[n,v] (as [h,v])", &mut || matmul(&mut dwt, &x, Op::T, &dl, Op::N, h, v, n, true, 1.0), f);
    let mut lg = vec![0.0f32; n * v];
    t("logits = x w^T", &mut || matmul(&mut lg, &x, Op::N, &w, Op::T, n, v, h, false, 1.0), f);
}
