//! Attention's core (forward, and forward + backward) at the math MoE's shapes, causal and
//! with packed documents: `cargo run --release -p ultramoe-kernels --example attn [DOC_LEN]`.
use std::time::Instant;
use ultramoe_kernels::attention::{attention_backward, attention_forward, AttnShape, Mask};

fn main() {
    let doc: usize = std::env::args().nth(1).map_or(48, |a| a.parse().expect("DOC_LEN: a number"));
    let s = AttnShape { b: 8, t: 256, nh: 4, nkv: 4, dqk: 32, dv: 32 };
    let n = s.b * s.t;
    let q: Vec<f32> = (0..n * s.nh * s.dqk).map(|i| ((i * 7919) % 101) as f32 * 1e-3).collect();
    let k = q.clone();
    let v = vec![0.02f32; n * s.nh * s.dv];
    let dout = vec![0.01f32; n * s.nh * s.dv];
    let pos: Vec<u32> = (0..n).map(|i| ((i % s.t) % doc) as u32).collect();
    let (mut o, mut p) = (vec![0.0f32; n * s.nh * s.dv], vec![0.0f32; s.probs_len()]);
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    for (name, mask) in [("causal", Mask::Causal), ("documents", Mask::Documents(&pos))] {
        let reps = 50;
        let time = |f: &mut dyn FnMut()| {
            f();
            let st = Instant::now();
            for _ in 0..reps {
                f();
            }
            st.elapsed().as_secs_f64() / reps as f64 * 1e3
        };
        let fwd = time(&mut || attention_forward(&mut o, Some(&mut p), &q, &k, &v, s, mask, 0.1));
        let fwd_scratch = time(&mut || attention_forward(&mut o, None, &q, &k, &v, s, mask, 0.1));
        let bwd = time(&mut || attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, Some(&p), s, mask, 0.1));
        println!("{name} (documents of {doc}): forward {fwd:.2} ms (probabilities not kept {fwd_scratch:.2} ms), backward {bwd:.2} ms");
    }
}
