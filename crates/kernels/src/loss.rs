//! Softmax cross-entropy over the vocabulary.

use crate::vmath;
use rayon::prelude::*;

/// Target id meaning "no target at this position" (the last position of each row,
/// padding): it contributes neither loss nor gradient.
pub const IGNORE: i32 = -1;

fn lse_row(row: &[f32], scratch: &mut Vec<f32>) -> f32 {
    let max = vmath::max(row);
    scratch.clear();
    scratch.extend_from_slice(row);
    max + vmath::exp_shifted_sum(scratch, max).ln()
}

/// Forward: per-row `lse = log Σ_v exp(logits[v])` into `lse: [N]`; returns the mean of
/// `lse − logits[target]` over positions whose target is not [`IGNORE`] (0 if none) and
/// that count. Rows are summed in order, so the result is independent of scheduling.
pub fn cross_entropy_forward(lse: &mut [f32], logits: &[f32], targets: &[i32], v: usize) -> (f32, usize) {
    let per_row: Vec<(f64, usize)> = lse
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .map_init(Vec::new, |scratch, ((l, row), &t)| {
            *l = lse_row(row, scratch);
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

/// Fused loss and backward, in place: `logits` becomes
/// `dlogits = scale · (softmax(logits) − onehot(target))` on rows with a target and zero
/// elsewhere (for the mean loss `scale = 1/count`). Returns `(Σ CE, count)` over rows with
/// a target, summed in row order. One exponential per logit: the forward's `e^(x−max)`
/// is kept and normalised into the gradient.
pub fn cross_entropy_fused_backward(logits: &mut [f32], targets: &[i32], v: usize, scale: f32) -> (f64, usize) {
    let mut total = (0.0, 0);
    cross_entropy_fused_backward_into(logits, targets, v, scale, &mut total);
    total
}

/// [`cross_entropy_fused_backward`] over some rows, adding their `(Σ CE, count)` into
/// `total` row by row in order: rows handled in chunks sum to the same bits as all rows
/// at once.
pub fn cross_entropy_fused_backward_into(logits: &mut [f32], targets: &[i32], v: usize, scale: f32, total: &mut (f64, usize)) {
    let per_row: Vec<(f64, usize)> = logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == IGNORE {
                row.fill(0.0);
                return (0.0, 0);
            }
            let target_logit = row[t as usize];
            let max = vmath::max(row);
            let sum = vmath::exp_shifted_sum(row, max);
            vmath::scale(row, scale / sum);
            row[t as usize] -= scale;
            ((max + sum.ln() - target_logit) as f64, 1)
        })
        .collect();
    *total = per_row.iter().fold(*total, |a, b| (a.0 + b.0, a.1 + b.1));
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
        let (sum, c2) = cross_entropy_fused_backward(&mut d, &targets, v, 1.0 / count as f32);
        assert_eq!(c2, count);
        assert!((sum / count as f64 - loss as f64).abs() < 1e-6);
        let num = numeric_grad(&logits, 1e-3, |l| {
            let mut lse = vec![0.0; n];
            cross_entropy_forward(&mut lse, l, &targets, v).0 as f64
        });
        assert_close(&d, &num, 1e-3, "dlogits");
    }
}
