//! Token permutation into expert order and back (the dispatcher's local half).
//!
//! Routed row `r` of the permuted buffer holds token `t`'s `j`-th choice; rows are grouped
//! by expert (expert 0's rows first) and, within an expert, in token order, so each
//! expert's rows are contiguous and a grouped GEMM reads them in one pass.

use rayon::prelude::*;
use std::ops::Range;

/// Where every (token, choice) slot goes. Built once per layer per step.
#[derive(Clone, Debug, Default)]
pub struct DispatchPlan {
    /// tokens `N`
    pub n_tokens: usize,
    /// choices per token `K`
    pub top_k: usize,
    /// `[E + 1]`: expert `e` owns permuted rows `offsets[e]..offsets[e+1]`
    pub offsets: Vec<usize>,
    /// `[N·K]`: slot `t·K + j` → permuted row
    pub row_of_slot: Vec<u32>,
    /// `[N·K]`: permuted row → slot `t·K + j`
    pub slot_of_row: Vec<u32>,
}

impl DispatchPlan {
    /// Counting sort of `experts: [N, K]` (stable in token order).
    pub fn new(experts: &[u32], top_k: usize, n_experts: usize) -> Self {
        let n_slots = experts.len();
        let mut counts = vec![0usize; n_experts];
        for &e in experts {
            counts[e as usize] += 1;
        }
        let mut offsets = vec![0usize; n_experts + 1];
        for e in 0..n_experts {
            offsets[e + 1] = offsets[e] + counts[e];
        }
        let mut next = offsets.clone();
        let mut row_of_slot = vec![0u32; n_slots];
        let mut slot_of_row = vec![0u32; n_slots];
        for (slot, &e) in experts.iter().enumerate() {
            let r = next[e as usize];
            next[e as usize] += 1;
            row_of_slot[slot] = r as u32;
            slot_of_row[r] = slot as u32;
        }
        DispatchPlan { n_tokens: n_slots / top_k.max(1), top_k, offsets, row_of_slot, slot_of_row }
    }

    /// Tokens routed to each expert.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Routed rows `R = N·K`.
    pub fn rows(&self) -> usize {
        self.slot_of_row.len()
    }
}

/// Permute forward: `xp[r] = x[token(r)]`, `x: [N, H]` → `xp: [R, H]`.
pub fn permute_forward(xp: &mut [f32], x: &[f32], plan: &DispatchPlan, h: usize) {
    xp.par_chunks_mut(h).zip(plan.slot_of_row.par_iter()).for_each(|(row, &slot)| {
        let t = slot as usize / plan.top_k;
        row.copy_from_slice(&x[t * h..(t + 1) * h]);
    });
}

/// Permute backward: `dx[t] (+)= Σ_j dxp[row(t, j)]`, each token's rows summed in
/// ascending row order (see [`permute_backward_rows`]).
pub fn permute_backward(dx: &mut [f32], dxp: &[f32], plan: &DispatchPlan, h: usize, accumulate: bool) {
    if !accumulate {
        dx.fill(0.0);
    }
    permute_backward_rows(dx, dxp, plan, h, 0..plan.rows());
}

/// Permute backward over the routed rows `rows` only (`dxp` holds just those):
/// `dx[t] += dxp[r − rows.start]` for each of token `t`'s rows `r` inside `rows`.
///
/// A token's rows are added in ascending row order — expert order, not its choices'
/// order — so adding the row ranges `0..a`, `a..b`, … one after another gives the same
/// bits as adding `0..R` at once: the one-rank MoE backward works through its routed
/// rows a piece at a time.
pub fn permute_backward_rows(dx: &mut [f32], dxp: &[f32], plan: &DispatchPlan, h: usize, rows: Range<usize>) {
    assert_eq!(dxp.len(), rows.len() * h, "dxp holds exactly the rows");
    let k = plan.top_k;
    dx.par_chunks_mut(h).enumerate().for_each_init(
        || Vec::with_capacity(k),
        |mine, (t, row)| {
            mine.clear();
            mine.extend(plan.row_of_slot[t * k..(t + 1) * k].iter().map(|&r| r as usize).filter(|r| rows.contains(r)));
            mine.sort_unstable();
            for &r in mine.iter() {
                let r = r - rows.start;
                for (d, s) in row.iter_mut().zip(&dxp[r * h..(r + 1) * h]) {
                    *d += s;
                }
            }
        },
    );
}

/// Unpermute (combine) forward: `out[t] (+)= Σ_j w[t, j] · yp[row(t, j)]`.
pub fn unpermute_forward(out: &mut [f32], yp: &[f32], weights: &[f32], plan: &DispatchPlan, h: usize, accumulate: bool) {
    out.par_chunks_mut(h).enumerate().for_each(|(t, row)| {
        if !accumulate {
            row.fill(0.0);
        }
        for j in 0..plan.top_k {
            let slot = t * plan.top_k + j;
            let r = plan.row_of_slot[slot] as usize;
            let w = weights[slot];
            for (d, s) in row.iter_mut().zip(&yp[r * h..(r + 1) * h]) {
                *d += w * s;
            }
        }
    });
}

/// Unpermute backward: `dyp[r] = w[slot(r)] · dout[token(r)]` (written) and
/// `dw[slot(r)] = ⟨dout[token(r)], yp[r]⟩` (written).
pub fn unpermute_backward(dyp: &mut [f32], dweights: &mut [f32], dout: &[f32], yp: &[f32], weights: &[f32], plan: &DispatchPlan, h: usize) {
    unpermute_backward_rows(dyp, dweights, dout, yp, weights, plan, h, 0..plan.rows());
}

/// [`unpermute_backward`] over the routed rows `rows` only: `dyp` and `yp` hold just
/// those rows, and only their slots of `dw` are written.
#[allow(clippy::too_many_arguments)]
pub fn unpermute_backward_rows(
    dyp: &mut [f32],
    dweights: &mut [f32],
    dout: &[f32],
    yp: &[f32],
    weights: &[f32],
    plan: &DispatchPlan,
    h: usize,
    rows: Range<usize>,
) {
    assert!(dyp.len() == rows.len() * h && yp.len() == dyp.len(), "dyp and yp hold exactly the rows");
    let slots = &plan.slot_of_row[rows];
    let dw_by_row: Vec<f32> = dyp
        .par_chunks_mut(h)
        .zip(yp.par_chunks(h))
        .zip(slots.par_iter())
        .map(|((drow, yrow), &slot)| {
            let t = slot as usize / plan.top_k;
            let w = weights[slot as usize];
            let g = &dout[t * h..(t + 1) * h];
            let mut dot = 0.0f32;
            for ((d, y), gv) in drow.iter_mut().zip(yrow).zip(g) {
                *d = w * gv;
                dot += gv * y;
            }
            dot
        })
        .collect();
    for (&slot, dw) in slots.iter().zip(dw_by_row) {
        dweights[slot as usize] = dw;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn plan_groups_rows_by_expert_in_token_order() {
        let experts = [2, 0, 0, 1, 2, 1];
        let plan = DispatchPlan::new(&experts, 2, 3);
        assert_eq!(plan.counts(), vec![2, 2, 2]);
        assert_eq!(plan.slot_of_row, vec![1, 2, 3, 5, 0, 4]);
        for (slot, &r) in plan.row_of_slot.iter().enumerate() {
            assert_eq!(plan.slot_of_row[r as usize] as usize, slot);
        }
    }

    #[test]
    fn combine_backward_matches_finite_differences() {
        let (n, k, h, e) = (4, 2, 3, 3);
        let experts = [0, 1, 2, 0, 1, 2, 0, 2];
        let plan = DispatchPlan::new(&experts, k, e);
        let yp = rand_vec(n * k * h, 1);
        let w = rand_vec(n * k, 2);
        let g = rand_vec(n * h, 3);
        let f = |yp: &[f32], w: &[f32]| {
            let mut out = vec![0.0; n * h];
            unpermute_forward(&mut out, yp, w, &plan, h, false);
            dot64(&out, &g)
        };
        let mut dyp = vec![0.0; yp.len()];
        let mut dw = vec![0.0; w.len()];
        unpermute_backward(&mut dyp, &mut dw, &g, &yp, &w, &plan, h);
        assert_close(&dyp, &numeric_grad(&yp, 1e-3, |y| f(y, &w)), 1e-3, "dyp");
        assert_close(&dw, &numeric_grad(&w, 1e-3, |w| f(&yp, w)), 1e-3, "dw");
        let x = rand_vec(n * h, 4);
        let gp = rand_vec(n * k * h, 5);
        let mut dx = vec![0.0; n * h];
        permute_backward(&mut dx, &gp, &plan, h, false);
        let num = numeric_grad(&x, 1e-3, |x| {
            let mut xp = vec![0.0; n * k * h];
            permute_forward(&mut xp, x, &plan, h);
            dot64(&xp, &gp)
        });
        assert_close(&dx, &num, 1e-3, "dx");
    }

    #[test]
    fn row_ranges_one_after_another_give_the_whole_buffer_bits() {
        let (n, k, h, e) = (37, 3, 5, 6);
        let mut rng = 7u64;
        let experts: Vec<u32> = (0..n)
            .flat_map(|_| {
                let mut picks: Vec<u32> = Vec::new();
                while picks.len() < k {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let c = ((rng >> 33) % e as u64) as u32;
                    if !picks.contains(&c) {
                        picks.push(c);
                    }
                }
                picks
            })
            .collect();
        let plan = DispatchPlan::new(&experts, k, e);
        let r = plan.rows();
        let (dout, yp, w, dxp) = (rand_vec(n * h, 1), rand_vec(r * h, 2), rand_vec(n * k, 3), rand_vec(r * h, 4));
        let base = rand_vec(n * h, 5);
        let (mut dyp, mut dw, mut dx) = (vec![0.0; r * h], vec![0.0; n * k], base.clone());
        unpermute_backward(&mut dyp, &mut dw, &dout, &yp, &w, &plan, h);
        permute_backward(&mut dx, &dxp, &plan, h, true);
        for cuts in [vec![0, r], vec![0, 1, 40, 41, r], vec![0, 17, 60, 99, r]] {
            let (mut dyp_p, mut dw_p, mut dx_p) = (vec![0.0; r * h], vec![0.0; n * k], base.clone());
            for c in cuts.windows(2) {
                let rows = c[0]..c[1];
                let span = rows.start * h..rows.end * h;
                unpermute_backward_rows(&mut dyp_p[span.clone()], &mut dw_p, &dout, &yp[span.clone()], &w, &plan, h, rows.clone());
                permute_backward_rows(&mut dx_p, &dxp[span], &plan, h, rows);
            }
            assert_eq!(dyp_p, dyp, "output gradients, cuts {cuts:?}");
            assert_eq!(dw_p, dw, "weight gradients, cuts {cuts:?}");
            assert_eq!(dx_p, dx, "input gradients, cuts {cuts:?}");
        }
        // ascending rows: token 0's sum is its rows' in row order
        let mut mine: Vec<usize> = plan.row_of_slot[..k].iter().map(|&r| r as usize).collect();
        mine.sort();
        let mut want = base[..h].to_vec();
        for r in mine {
            for (d, s) in want.iter_mut().zip(&dxp[r * h..(r + 1) * h]) {
                *d += s;
            }
        }
        assert_eq!(&dx[..h], &want[..]);
    }
}

/// Regroups row blocks: `src` holds blocks in `[a][b]` order, block `(i, j)` being
/// `counts[i·nb + j]` rows of width `h`; the result holds the same blocks in `[b][a]`
/// order. Expert parallelism needs it twice: rows arrive from the all-to-all grouped by
/// source rank then local expert, and the grouped GEMM wants them by local expert then
/// source rank (Megatron's "sort chunks by index"). The inverse is the same call with
/// the transposed counts and `(nb, na)`.
pub fn transpose_blocks(src: &[f32], counts: &[usize], na: usize, nb: usize, h: usize) -> Vec<f32> {
    assert_eq!(counts.len(), na * nb, "one count per block");
    let mut start = vec![0usize; na * nb];
    let mut acc = 0;
    for (s, &c) in start.iter_mut().zip(counts) {
        *s = acc;
        acc += c;
    }
    assert_eq!(acc * h, src.len(), "counts must cover the buffer");
    let mut out = Vec::with_capacity(src.len());
    for j in 0..nb {
        for i in 0..na {
            let (s, c) = (start[i * nb + j], counts[i * nb + j]);
            out.extend_from_slice(&src[s * h..(s + c) * h]);
        }
    }
    out
}

/// `counts` of an `[a][b]` block grid, as the `[b][a]` grid.
pub fn transpose_counts(counts: &[usize], na: usize, nb: usize) -> Vec<usize> {
    (0..nb * na).map(|k| counts[(k % na) * nb + k / na]).collect()
}

#[cfg(test)]
mod block_tests {
    use super::*;

    #[test]
    fn transpose_blocks_round_trips() {
        // 2 sources × 3 experts, width 2; rows labelled by (source, expert, index).
        let counts = [1, 0, 2, 3, 1, 0];
        let mut src = vec![];
        for i in 0..2 {
            for j in 0..3 {
                for r in 0..counts[i * 3 + j] {
                    let label = (100 * i + 10 * j + r) as f32;
                    src.extend([label, -label]);
                }
            }
        }
        let t = transpose_blocks(&src, &counts, 2, 3, 2);
        let labels: Vec<f32> = t.chunks(2).map(|r| r[0]).collect();
        assert_eq!(labels, vec![0.0, 100.0, 101.0, 102.0, 110.0, 20.0, 21.0]);
        let back = transpose_blocks(&t, &transpose_counts(&counts, 2, 3), 3, 2, 2);
        assert_eq!(back, src);
    }
}
