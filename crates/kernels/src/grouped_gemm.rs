//! Grouped GEMM: one call computes every expert's linear layer over its contiguous rows.
//!
//! Expert `e` owns rows `offsets[e]..offsets[e+1]` of `x: [R, in]` and the weight
//! `w[e]: [out, in]`; the forward is `y_e = x_e · w_eᵀ`. The call allocates nothing per
//! expert or per token: it splits the output into disjoint per-expert views and runs the
//! experts' products in parallel (largest first, so the longest product starts early),
//! each on one thread, falling back to multi-threaded products when a single expert holds
//! most of the rows.

use crate::gemm::{gemm_strided, matmul, matmul_serial, Op, Strided};
use rayon::prelude::*;

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

/// A raw pointer that may cross threads; each task writes only its expert's rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out[offsets[e]..offsets[e+1]] = a_e · op(w[e])` into a new `[R, width]` buffer for every
/// expert, never zero-filled: the experts' row ranges tile `0..R`, so every element is
/// written before the vector takes its length. `w[e]` is `[w_rows, w_cols]`; `tw`
/// chooses `a_e · w[e]ᵀ` (forward) or `a_e · w[e]` (input gradient).
fn grouped_new(a: &[f32], a_w: usize, w: &[f32], w_rows: usize, w_cols: usize, tw: Op, offsets: &[usize]) -> Vec<f32> {
    let r = *offsets.last().unwrap_or(&0);
    let width = if tw == Op::T { w_rows } else { w_cols };
    let inner = a_w;
    assert!(a.len() >= r * a_w && w.len() >= (offsets.len() - 1) * w_rows * w_cols);
    let mut out: Vec<f32> = Vec::with_capacity(r * width);
    let base = SendPtr(out.as_mut_ptr());
    let one = |e: usize, parallel: bool| {
        // Capture the whole wrapper (Send), not its raw-pointer field.
        let base = base;
        let n = offsets[e + 1] - offsets[e];
        // SAFETY: expert e reads its rows of `a` and its weight block (bounds asserted
        // above) and writes rows offsets[e]..offsets[e+1] of `out`, disjoint from every
        // other expert's and inside the allocation of r·width elements.
        unsafe {
            gemm_strided(
                n,
                width,
                inner,
                base.0.add(offsets[e] * width),
                Strided { rs: width as isize, cs: 1 },
                a.as_ptr().add(offsets[e] * a_w),
                Strided::row_major(a_w, Op::N),
                w.as_ptr().add(e * w_rows * w_cols),
                Strided::row_major(w_cols, tw),
                false,
                1.0,
                parallel,
            );
        }
    };
    if dominated(offsets) {
        (0..offsets.len() - 1).for_each(|e| one(e, true));
    } else {
        largest_first(offsets).into_par_iter().with_max_len(1).for_each(|e| one(e, false));
    }
    // SAFETY: every row of every expert, hence all r·width elements, was written.
    unsafe { out.set_len(r * width) };
    out
}

/// `y_e = x_e · w[e]ᵀ` for every expert into a new `[R, out]` buffer (`w: [E, out, in]`).
pub fn grouped_linear(x: &[f32], w: &[f32], offsets: &[usize], d_in: usize, d_out: usize) -> Vec<f32> {
    grouped_new(x, d_in, w, d_out, d_in, Op::T, offsets)
}

/// Backward of [`grouped_linear`]: returns `dx_e = dy_e · w[e]` and accumulates
/// `dw[e] += dy_eᵀ · x_e`.
pub fn grouped_linear_grad(dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], offsets: &[usize], d_in: usize, d_out: usize) -> Vec<f32> {
    grouped_weight_grad(dw, dy, x, offsets, d_in, d_out);
    grouped_input_grad(dy, w, offsets, d_in, d_out)
}

/// The input half of [`grouped_linear_grad`]: `dx_e = dy_e · w[e]` into a new `[R, in]`
/// buffer. Split from the weight half so an exchange of `dx` can travel while the
/// weight gradients are computed.
pub fn grouped_input_grad(dy: &[f32], w: &[f32], offsets: &[usize], d_in: usize, d_out: usize) -> Vec<f32> {
    grouped_new(dy, d_out, w, d_out, d_in, Op::N, offsets)
}

/// The weight half of [`grouped_linear_grad`]: `dw[e] += dy_eᵀ · x_e` for every expert.
pub fn grouped_weight_grad(dw: &mut [f32], dy: &[f32], x: &[f32], offsets: &[usize], d_in: usize, d_out: usize) {
    let one = |e: usize, dwe: &mut [f32], serial: bool| {
        let n = offsets[e + 1] - offsets[e];
        let dye = &dy[offsets[e] * d_out..offsets[e + 1] * d_out];
        let xe = &x[offsets[e] * d_in..offsets[e + 1] * d_in];
        let mm = if serial { matmul_serial } else { matmul };
        mm(dwe, dye, Op::T, xe, Op::N, d_out, d_in, n, true, 1.0);
    };
    let dws: Vec<&mut [f32]> = dw.chunks_mut(d_out * d_in).collect();
    if dominated(offsets) {
        dws.into_iter().enumerate().for_each(|(e, dwe)| one(e, dwe, false));
        return;
    }
    let mut tasks: Vec<(usize, &mut [f32])> = dws.into_iter().enumerate().collect();
    let order = largest_first(offsets);
    tasks.sort_by_key(|(e, _)| order.iter().position(|o| o == e));
    tasks.into_par_iter().with_max_len(1).for_each(|(e, dwe)| one(e, dwe, true));
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
            let y = grouped_linear(&x, &w, &offsets, d_in, d_out);
            let mut dw = vec![0.5; e * d_out * d_in];
            let dx = grouped_linear_grad(&mut dw, &dy, &x, &w, &offsets, d_in, d_out);
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
