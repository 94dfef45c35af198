//! RMSNorm: `y = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)`, one row at a time.

use rayon::prelude::*;

/// Rows per parallel task: enough work to amortise scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// Forward. `x: [n, d]`, `w: [d]` → `y: [n, d]`, `rstd: [n]` (saved for backward).
pub fn rmsnorm_forward(y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], d: usize, eps: f32) {
    let rpt = rows_per_task(d);
    y.par_chunks_mut(d * rpt)
        .zip(rstd.par_chunks_mut(rpt))
        .zip(x.par_chunks(d * rpt))
        .for_each(|((y, rs), x)| {
            for ((yr, r), xr) in y.chunks_mut(d).zip(rs.iter_mut()).zip(x.chunks(d)) {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *o = xv * *r * wv;
                }
            }
        });
}

/// Backward of [`rmsnorm_forward`]. With `x̂ = x·rstd` and `g = w ⊙ dy`:
/// `dx = rstd · (g − x̂ · mean(g ⊙ x̂))` (written, or added when `accumulate`),
/// `dw += Σ_rows dy ⊙ x̂`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    d: usize,
    accumulate: bool,
) {
    let rpt = rows_per_task(d);
    let dw_parts: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * rpt)
        .zip(dy.par_chunks(d * rpt))
        .zip(x.par_chunks(d * rpt))
        .zip(rstd.par_chunks(rpt))
        .map(|(((dx, dy), x), rs)| {
            let mut dw_local = vec![0.0f32; d];
            for (((dxr, dyr), xr), &r) in dx.chunks_mut(d).zip(dy.chunks(d)).zip(x.chunks(d)).zip(rs) {
                // One running sum in index order (its order is part of the numbers, so
                // it stays scalar); the element-wise loops beside it vectorise.
                let mut dot = 0.0f32;
                for ((&wi, &dyi), &xi) in w.iter().zip(dyr).zip(xr) {
                    dot += wi * dyi * (xi * r);
                }
                for ((acc, &dyi), &xi) in dw_local.iter_mut().zip(dyr).zip(xr) {
                    *acc += dyi * (xi * r);
                }
                let mean = dot / d as f32;
                let grads = w.iter().zip(dyr).zip(xr).map(|((&wi, &dyi), &xi)| r * (wi * dyi - xi * r * mean));
                if accumulate {
                    dxr.iter_mut().zip(grads).for_each(|(o, v)| *o += v);
                } else {
                    dxr.iter_mut().zip(grads).for_each(|(o, v)| *o = v);
                }
            }
            dw_local
        })
        .collect();
    for part in dw_parts {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (n, d) = (3, 7);
        let x = rand_vec(n * d, 1);
        let w = rand_vec(d, 2);
        let g = rand_vec(n * d, 3);
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; n * d];
            let mut r = vec![0.0; n];
            rmsnorm_forward(&mut y, &mut r, x, w, d, 1e-6);
            dot64(&y, &g)
        };
        let mut y = vec![0.0; n * d];
        let mut r = vec![0.0; n];
        rmsnorm_forward(&mut y, &mut r, &x, &w, d, 1e-6);
        let mut dx = vec![0.0; n * d];
        let mut dw = vec![0.0; d];
        rmsnorm_backward(&mut dx, &mut dw, &g, &x, &w, &r, d, false);
        assert_close(&dx, &numeric_grad(&x, 1e-3, |x| loss(x, &w)), 2e-3, "dx");
        assert_close(&dw, &numeric_grad(&w, 1e-3, |w| loss(&x, w)), 2e-3, "dw");
    }
}
