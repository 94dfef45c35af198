//! SwiGLU on a fused gate/up buffer: row `r` of `gu: [n, 2I]` holds the gate projection
//! in columns `0..I` and the up projection in `I..2I`; `a = silu(g) ⊙ u` with
//! `silu(g) = g · σ(g)`.

use rayon::prelude::*;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Forward: `a[n, I] = silu(gu[:, :I]) ⊙ gu[:, I:]`.
pub fn swiglu_forward(a: &mut [f32], gu: &[f32], inter: usize) {
    a.par_chunks_mut(inter * 64).zip(gu.par_chunks(2 * inter * 64)).for_each(|(a, gu)| {
        for (ar, gur) in a.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
            let (g, u) = gur.split_at(inter);
            for i in 0..inter {
                ar[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        }
    });
}

/// Backward: `dg = da ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = da ⊙ silu(g)`, written into
/// `dgu[n, 2I]`.
pub fn swiglu_backward(dgu: &mut [f32], da: &[f32], gu: &[f32], inter: usize) {
    dgu.par_chunks_mut(2 * inter * 64)
        .zip(da.par_chunks(inter * 64))
        .zip(gu.par_chunks(2 * inter * 64))
        .for_each(|((dgu, da), gu)| {
            for ((dr, dar), gur) in dgu.chunks_mut(2 * inter).zip(da.chunks(inter)).zip(gu.chunks(2 * inter)) {
                let (g, u) = gur.split_at(inter);
                let (dg, du) = dr.split_at_mut(inter);
                for i in 0..inter {
                    let s = sigmoid(g[i]);
                    let silu = g[i] * s;
                    du[i] = dar[i] * silu;
                    dg[i] = dar[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let (n, i) = (4, 5);
        let gu: Vec<f32> = rand_vec(n * 2 * i, 1).iter().map(|v| v * 3.0).collect();
        let g = rand_vec(n * i, 2);
        let mut dgu = vec![0.0; n * 2 * i];
        swiglu_backward(&mut dgu, &g, &gu, i);
        let num = numeric_grad(&gu, 1e-3, |gu| {
            let mut a = vec![0.0; n * i];
            swiglu_forward(&mut a, gu, i);
            dot64(&a, &g)
        });
        assert_close(&dgu, &num, 2e-3, "dgu");
    }
}
