//! Grouped GEMM: one call computes every expert's linear layer over its contiguous rows.
//!
//! Expert `e` owns rows `offsets[e]..offsets[e+1]` of `x: [R, in]` and the weight
//! `w[e]: [out, in]`; the forward is `y_e = x_e · w_eᵀ`. The call allocates nothing per
//! expert or per token: it splits the output into disjoint per-expert views and runs the
//! experts' products in parallel (largest first, so the longest product starts early),
//! each on one thread, falling back to multi-threaded products when a single expert holds
//! most of the rows.

use crate::gemm::{matmul, matmul_serial, Op};
use rayon::prelude::*;

/// Splits `buf` into consecutive chunks of `rows[e] · width` elements.
fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// True when one expert holds more than half the rows: running experts side by side
/// would leave the other cores idle, so each product is given all threads instead.
fn dominated(offsets: &[usize]) -> bool {
    let total = *offsets.last().unwrap_or(&0);
    offsets.windows(2).any(|w| 2 * (w[1] - w[0]) > total)
}

/// Expert order, largest row count first.
fn largest_first(offsets: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..offsets.len() - 1).collect();
    order.sort_by_key(|&e| std::cmp::Reverse(offsets[e + 1] - offsets[e]));
    order
}

/// Forward: `y[offsets[e]..offsets[e+1]] = x_e · w[e]ᵀ`, `w: [E, out, in]`.
pub fn grouped_linear_forward(y: &mut [f32], x: &[f32], w: &[f32], offsets: &[usize], d_in: usize, d_out: usize) {
    let ys = split_rows(y, offsets, d_out);
    if dominated(offsets) {
        for (e, ye) in ys.into_iter().enumerate() {
            let n = offsets[e + 1] - offsets[e];
            let xe = &x[offsets[e] * d_in..offsets[e + 1] * d_in];
            matmul(ye, xe, Op::N, &w[e * d_out * d_in..(e + 1) * d_out * d_in], Op::T, n, d_out, d_in, false, 1.0);
        }
        return;
    }
    let mut tasks: Vec<(usize, &mut [f32])> = ys.into_iter().enumerate().collect();
    let order = largest_first(offsets);
    tasks.sort_by_key(|(e, _)| order.iter().position(|o| o == e));
    tasks.into_par_iter().with_max_len(1).for_each(|(e, ye)| {
        let n = offsets[e + 1] - offsets[e];
        let xe = &x[offsets[e] * d_in..offsets[e + 1] * d_in];
        matmul_serial(ye, xe, Op::N, &w[e * d_out * d_in..(e + 1) * d_out * d_in], Op::T, n, d_out, d_in, false, 1.0);
    });
}

/// Backward: `dx_e = dy_e · w[e]` (written, when `dx` is given) and `dw[e] += dy_eᵀ · x_e`.
#[allow(clippy::too_many_arguments)]
pub fn grouped_linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    offsets: &[usize],
    d_in: usize,
    d_out: usize,
) {
    let n_exp = offsets.len() - 1;
    let mut dxs: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => split_rows(dx, offsets, d_in).into_iter().map(Some).collect(),
        None => (0..n_exp).map(|_| None).collect(),
    };
    let dws: Vec<&mut [f32]> = dw.chunks_mut(d_out * d_in).collect();
    let one = |e: usize, dxe: Option<&mut [f32]>, dwe: &mut [f32], serial: bool| {
        let n = offsets[e + 1] - offsets[e];
        let dye = &dy[offsets[e] * d_out..offsets[e + 1] * d_out];
        let xe = &x[offsets[e] * d_in..offsets[e + 1] * d_in];
        let we = &w[e * d_out * d_in..(e + 1) * d_out * d_in];
        let mm = if serial { matmul_serial } else { matmul };
        if let Some(dxe) = dxe {
            mm(dxe, dye, Op::N, we, Op::N, n, d_in, d_out, false, 1.0);
        }
        mm(dwe, dye, Op::T, xe, Op::N, d_out, d_in, n, true, 1.0);
    };
    if dominated(offsets) {
        for (e, (dxe, dwe)) in dxs.drain(..).zip(dws).enumerate() {
            one(e, dxe, dwe, false);
        }
        return;
    }
    let mut tasks: Vec<(usize, Option<&mut [f32]>, &mut [f32])> =
        dxs.drain(..).zip(dws).enumerate().map(|(e, (a, b))| (e, a, b)).collect();
    let order = largest_first(offsets);
    tasks.sort_by_key(|(e, _, _)| order.iter().position(|o| o == e));
    tasks.into_par_iter().with_max_len(1).for_each(|(e, dxe, dwe)| one(e, dxe, dwe, true));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::matmul_reference;
    use crate::testutil::*;

    #[test]
    fn grouped_matches_per_expert_reference() {
        let (d_in, d_out) = (24, 40);
        for offsets in [vec![0, 5, 5, 17, 30], vec![0, 0, 100, 103, 104]] {
            let e = offsets.len() - 1;
            let r = *offsets.last().unwrap();
            let x = rand_vec(r * d_in, 1);
            let w = rand_vec(e * d_out * d_in, 2);
            let dy = rand_vec(r * d_out, 3);
            let mut y = vec![0.0; r * d_out];
            grouped_linear_forward(&mut y, &x, &w, &offsets, d_in, d_out);
            let mut dx = vec![0.0; r * d_in];
            let mut dw = vec![0.5; e * d_out * d_in];
            grouped_linear_backward(Some(&mut dx), &mut dw, &dy, &x, &w, &offsets, d_in, d_out);
            for ex in 0..e {
                let (a, b) = (offsets[ex], offsets[ex + 1]);
                let n = b - a;
                let we = &w[ex * d_out * d_in..(ex + 1) * d_out * d_in];
                let mut yr = vec![0.0; n * d_out];
                matmul_reference(&mut yr, &x[a * d_in..b * d_in], Op::N, we, Op::T, n, d_out, d_in, false, 1.0);
                assert_close(&y[a * d_out..b * d_out], &yr, 1e-4, "y");
                let mut dxr = vec![0.0; n * d_in];
                matmul_reference(&mut dxr, &dy[a * d_out..b * d_out], Op::N, we, Op::N, n, d_in, d_out, false, 1.0);
                assert_close(&dx[a * d_in..b * d_in], &dxr, 1e-4, "dx");
                let mut dwr = vec![0.5; d_out * d_in];
                matmul_reference(&mut dwr, &dy[a * d_out..b * d_out], Op::T, &x[a * d_in..b * d_in], Op::N, d_out, d_in, n, true, 1.0);
                assert_close(&dw[ex * d_out * d_in..(ex + 1) * d_out * d_in], &dwr, 1e-4, "dw");
            }
        }
    }
}
