//! Softmax cross-entropy over the vocabulary.

use rayon::prelude::*;

/// Target id meaning "no target at this position" (the last position of each row,
/// padding): it contributes neither loss nor gradient.
pub const IGNORE: i32 = -1;

/// Forward: per-row `lse = log Σ_v exp(logits[v])` into `lse: [N]`; returns the mean of
/// `lse − logits[target]` over positions whose target is not [`IGNORE`] (0 if none) and
/// that count. Rows are summed in order, so the result is independent of scheduling.
pub fn cross_entropy_forward(lse: &mut [f32], logits: &[f32], targets: &[i32], v: usize) -> (f32, usize) {
    let per_row: Vec<(f64, usize)> = lse
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .map(|((l, row), &t)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|x| (x - max).exp()).sum();
            *l = max + s.ln();
            if t == IGNORE {
                (0.0f64, 0usize)
            } else {
                ((*l - row[t as usize]) as f64, 1)
            }
        })
        .collect();
    let (sum, count) = per_row.iter().fold((0.0f64, 0usize), |a, b| (a.0 + b.0, a.1 + b.1));
    if count == 0 {
        (0.0, 0)
    } else {
        ((sum / count as f64) as f32, count)
    }
}

/// Backward, in place: `logits` becomes `dlogits = scale · (softmax(logits) − onehot(target))`
/// on rows with a target and zero elsewhere. For the mean loss `scale = dloss / count`.
pub fn cross_entropy_backward_inplace(logits: &mut [f32], lse: &[f32], targets: &[i32], v: usize, scale: f32) {
    logits.par_chunks_mut(v).zip(lse.par_iter()).zip(targets.par_iter()).for_each(|((row, &l), &t)| {
        if t == IGNORE {
            row.fill(0.0);
            return;
        }
        for x in row.iter_mut() {
            *x = (*x - l).exp() * scale;
        }
        row[t as usize] -= scale;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn cross_entropy_backward_matches_finite_differences() {
        let (n, v) = (4, 6);
        let logits: Vec<f32> = rand_vec(n * v, 1).iter().map(|x| x * 2.0).collect();
        let targets = [2, IGNORE, 0, 5];
        let mut lse = vec![0.0; n];
        let (loss, count) = cross_entropy_forward(&mut lse, &logits, &targets, v);
        assert_eq!(count, 3);
        assert!(loss > 0.0);
        let mut d = logits.clone();
        cross_entropy_backward_inplace(&mut d, &lse, &targets, v, 1.0 / count as f32);
        let num = numeric_grad(&logits, 1e-3, |l| {
            let mut lse = vec![0.0; n];
            cross_entropy_forward(&mut lse, l, &targets, v).0 as f64
        });
        assert_close(&d, &num, 1e-3, "dlogits");
    }
}
