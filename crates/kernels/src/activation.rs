//! SwiGLU on a fused gate/up buffer: row `r` of `gu: [n, 2I]` holds the gate projection
//! in columns `0..I` and the up projection in `I..2I`; `a = silu(g) ⊙ u` with
//! `silu(g) = g · σ(g)`.

use crate::vmath::{multiversion, sigmoid};
use rayon::prelude::*;
use std::mem::MaybeUninit;

multiversion! {
    fn swiglu_row_uninit(a: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32]) {
        for i in 0..a.len() {
            a[i].write(g[i] * sigmoid(g[i]) * u[i]);
        }
    }
}

multiversion! {
    fn swiglu_row_backward_uninit(dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>], da: &[f32], g: &[f32], u: &[f32]) {
        for i in 0..da.len() {
            let s = sigmoid(g[i]);
            du[i].write(da[i] * g[i] * s);
            dg[i].write(da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
        }
    }
}

/// Forward: `a[n, I] = silu(gu[:, :I]) ⊙ gu[:, I:]` into a new buffer, written without
/// clearing it first.
pub fn swiglu(gu: &[f32], inter: usize) -> Vec<f32> {
    let n = gu.len() / (2 * inter);
    let mut a: Vec<f32> = Vec::with_capacity(n * inter);
    a.spare_capacity_mut()[..n * inter].par_chunks_mut(inter * 64).zip(gu.par_chunks(2 * inter * 64)).for_each(|(a, gu)| {
        for (ar, gur) in a.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
            let (g, u) = gur.split_at(inter);
            swiglu_row_uninit(ar, g, u);
        }
    });
    // SAFETY: every one of the n·I elements was written above.
    unsafe { a.set_len(n * inter) };
    a
}

/// Backward: `dg = da ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = da ⊙ silu(g)`, into a new
/// `[n, 2I]` buffer, written without clearing it first.
pub fn swiglu_grad(da: &[f32], gu: &[f32], inter: usize) -> Vec<f32> {
    let n = gu.len() / (2 * inter);
    let mut dgu: Vec<f32> = Vec::with_capacity(n * 2 * inter);
    dgu.spare_capacity_mut()[..n * 2 * inter]
        .par_chunks_mut(2 * inter * 64)
        .zip(da.par_chunks(inter * 64))
        .zip(gu.par_chunks(2 * inter * 64))
        .for_each(|((dgu, da), gu)| {
            for ((dr, dar), gur) in dgu.chunks_mut(2 * inter).zip(da.chunks(inter)).zip(gu.chunks(2 * inter)) {
                let (g, u) = gur.split_at(inter);
                let (dg, du) = dr.split_at_mut(inter);
                swiglu_row_backward_uninit(dg, du, dar, g, u);
            }
        });
    // SAFETY: every one of the n·2I elements was written above.
    unsafe { dgu.set_len(n * 2 * inter) };
    dgu
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn every_vector_path_gives_the_same_bits() {
        for n in [1, 15, 16, 17, 100, 1000] {
            let (g, u, da): (Vec<f32>, _, _) = (rand_vec(n, 1).iter().map(|v| v * 6.0).collect(), rand_vec(n, 2), rand_vec(n, 3));
            let runs = crate::isa::on_every_path(|| {
                let mut a = vec![MaybeUninit::uninit(); n];
                swiglu_row_uninit(&mut a, &g, &u);
                let (mut dg, mut du) = (vec![MaybeUninit::uninit(); n], vec![MaybeUninit::uninit(); n]);
                swiglu_row_backward_uninit(&mut dg, &mut du, &da, &g, &u);
                // SAFETY: each row function writes all n elements.
                [a, dg, du].iter().flat_map(|x| x.iter().map(|v| unsafe { v.assume_init() })).collect()
            });
            same_bits(&runs, &format!("SwiGLU rows, n = {n}"));
        }
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let (n, i) = (4, 5);
        let gu: Vec<f32> = rand_vec(n * 2 * i, 1).iter().map(|v| v * 3.0).collect();
        let g = rand_vec(n * i, 2);
        let dgu = swiglu_grad(&g, &gu, i);
        let num = numeric_grad(&gu, 1e-3, |gu| dot64(&swiglu(gu, i), &g));
        assert_close(&dgu, &num, 2e-3, "dgu");
        // and the forward against its formula
        let a = swiglu(&gu, i);
        for r in 0..n {
            for j in 0..i {
                let (gv, u) = (gu[r * 2 * i + j], gu[r * 2 * i + i + j]);
                assert!((a[r * i + j] - gv / (1.0 + (-gv).exp()) * u).abs() < 1e-6);
            }
        }
    }
}
