//! Time of one decoding step's cached attention over a batch of sequences, per layer:
//! `kv_decode [SEQS] [PAST]` (Qwen3-MoE-shaped heads: 16 query, 4 key/value, 64 wide).
use std::time::Instant;
use ultramoe_kernels::kv_attention::{kv_attention_forward_many, KvSeq, KvShape};

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).map_or(d, |a| a.parse().expect("a number"));
    let (seqs, past) = (arg(1, 16), arg(2, 160));
    let (nh, nkv, d) = (16, 4, 64);
    let len = past + 1;
    let fill = |n: usize, s: usize| (0..n).map(|i| ((i * 7919 + s) % 255) as f32 / 255.0 - 0.5).collect::<Vec<f32>>();
    let q: Vec<Vec<f32>> = (0..seqs).map(|s| fill(nh * d, s)).collect();
    let k: Vec<Vec<f32>> = (0..seqs).map(|s| fill(len * nkv * d, s + 100)).collect();
    let v: Vec<Vec<f32>> = (0..seqs).map(|s| fill(len * nkv * d, s + 200)).collect();
    let mut outs: Vec<Vec<f32>> = (0..seqs).map(|_| vec![0.0; nh * d]).collect();
    let shape = KvShape { n: 1, past, nh, nkv, dqk: d, dv: d, k_stride: nkv * d, v_stride: nkv * d };
    let reps = 2000;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            let mut batch: Vec<KvSeq> = outs.iter_mut().enumerate().map(|(s, out)| KvSeq { out, q: &q[s], k: &k[s], v: &v[s], shape }).collect();
            kv_attention_forward_many(&mut batch, 0.125);
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    std::hint::black_box(&outs);
    let fma = (seqs * nh * len * 2 * d) as f64;
    println!("{seqs} sequences, {len} keys: {:.1} µs per layer ({:.1} GFMA/s)", best * 1e6, fma / best / 1e9);
}
