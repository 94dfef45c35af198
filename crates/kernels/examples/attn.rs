use std::time::Instant;
use ultramoe_kernels::attention::{attention_forward, AttnShape, Mask};
fn main() {
    let s = AttnShape { b: 8, t: 256, nh: 4, nkv: 4, dqk: 48, dv: 32 };
    let n = s.b * s.t;
    let q = vec![0.01f32; n * s.nh * s.dqk];
    let k = q.clone();
    let v = vec![0.02f32; n * s.nh * s.dv];
    let mut o = vec![0.0f32; n * s.nh * s.dv];
    let mut p = vec![0.0f32; s.probs_len()];
    for _ in 0..3 { attention_forward(&mut o, Some(&mut p), &q, &k, &v, s, Mask::Causal, 0.1); }
    let reps = 50;
    let st = Instant::now();
    for _ in 0..reps { attention_forward(&mut o, Some(&mut p), &q, &k, &v, s, Mask::Causal, 0.1); }
    println!("attention fwd: {:.2} ms", st.elapsed().as_secs_f64() / reps as f64 * 1e3);
}
