//! Dense matrix multiply through the `gemm` crate.
//!
//! `gemm` dispatches at run time to AVX-512 micro-kernels (the `x86-v4` feature);
//! without that feature it reaches roughly 40% of this machine's peak.

use gemm::Parallelism;

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// use the matrix as stored (row-major)
    N,
    /// use its transpose
    T,
}

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting a small
/// product across threads costs more in synchronisation than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A strided view of a matrix for [`gemm_strided`]: element `(i, j)` lives at
/// `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    /// row stride in elements
    pub rs: isize,
    /// column stride in elements
    pub cs: isize,
}

impl Strided {
    /// Row-major `[rows, cols]` stored with leading dimension `ld`, used as `op`.
    pub fn row_major(ld: usize, op: Op) -> Self {
        match op {
            Op::N => Strided { rs: ld as isize, cs: 1 },
            Op::T => Strided { rs: 1, cs: ld as isize },
        }
    }
}

/// `c[m,n] = (accumulate ? c : 0) + alpha · op(a)[m,k] · op(b)[k,n]`, all row-major and
/// contiguous. `a` is stored `[m,k]` (or `[k,m]` when `ta == Op::T`), `b` is stored
/// `[k,n]` (or `[n,k]` when `tb == Op::T`). Large products use every thread.
#[allow(clippy::too_many_arguments)]
pub fn matmul(c: &mut [f32], a: &[f32], ta: Op, b: &[f32], tb: Op, m: usize, n: usize, k: usize, accumulate: bool, alpha: f32) {
    contiguous(c, a, ta, b, tb, m, n, k, accumulate, alpha, m * n * k >= PARALLEL_MIN_MACS);
}

/// Single-threaded [`matmul`], for callers that already run many products in parallel
/// (grouped GEMM over experts, attention over heads).
#[allow(clippy::too_many_arguments)]
pub fn matmul_serial(c: &mut [f32], a: &[f32], ta: Op, b: &[f32], tb: Op, m: usize, n: usize, k: usize, accumulate: bool, alpha: f32) {
    contiguous(c, a, ta, b, tb, m, n, k, accumulate, alpha, false);
}

#[allow(clippy::too_many_arguments)]
fn contiguous(c: &mut [f32], a: &[f32], ta: Op, b: &[f32], tb: Op, m: usize, n: usize, k: usize, accumulate: bool, alpha: f32, parallel: bool) {
    assert!(c.len() >= m * n, "matmul: c has {} elements, needs {}", c.len(), m * n);
    // SAFETY: `c` holds the m·n elements the product writes (asserted above).
    unsafe { product_into(c.as_mut_ptr(), a, ta, b, tb, m, n, k, accumulate, alpha, parallel) }
}

/// `c = (accumulate ? c : 0) + alpha · op(a) · op(b)` with `c` a contiguous `[m, n]` at a
/// raw pointer; checks that `a` and `b` hold their operands.
///
/// # Safety
/// `c` must point to `m·n` writable elements (readable too when `accumulate`) that alias
/// neither operand.
#[allow(clippy::too_many_arguments)]
unsafe fn product_into(c: *mut f32, a: &[f32], ta: Op, b: &[f32], tb: Op, m: usize, n: usize, k: usize, accumulate: bool, alpha: f32, parallel: bool) {
    assert!(a.len() >= m * k, "matmul: a has {} elements, needs {}", a.len(), m * k);
    assert!(b.len() >= k * n, "matmul: b has {} elements, needs {}", b.len(), k * n);
    let lda = if ta == Op::N { k } else { m };
    let ldb = if tb == Op::N { n } else { k };
    gemm_strided(
        m,
        n,
        k,
        c,
        Strided { rs: n as isize, cs: 1 },
        a.as_ptr(),
        Strided::row_major(lda, ta),
        b.as_ptr(),
        Strided::row_major(ldb, tb),
        accumulate,
        alpha,
        parallel,
    )
}

/// The raw strided product `c = (accumulate ? c : 0) + alpha · a · b` with `a: [m,k]`,
/// `b: [k,n]`, `c: [m,n]` given as pointers and strides.
///
/// # Safety
/// Every element `(i, j)` reachable through each pointer and its strides must lie in
/// one live allocation, and `c` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    cs: Strided,
    a: *const f32,
    as_: Strided,
    b: *const f32,
    bs: Strided,
    accumulate: bool,
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *c.offset(i as isize * cs.rs + j as isize * cs.cs) = 0.0;
                }
            }
        }
        return;
    }
    let par = if parallel { Parallelism::Rayon(0) } else { Parallelism::None };
    // gemm computes dst := alpha_dst·dst + beta·lhs·rhs, reading dst only when asked.
    gemm::gemm(
        m, n, k, c, cs.cs, cs.rs, accumulate, a, as_.cs, as_.rs, b, bs.cs, bs.rs, 1.0f32, alpha, false,
        false, false, par,
    );
}

/// `alpha · op(a)[m,k] · op(b)[k,n]` into a new `[m, n]` buffer. The buffer is never
/// zero-filled first: the product writes every element through a raw pointer before the
/// vector takes its length, so no step pays to clear memory it is about to overwrite.
#[allow(clippy::too_many_arguments)]
pub fn matmul_new(a: &[f32], ta: Op, b: &[f32], tb: Op, m: usize, n: usize, k: usize, alpha: f32) -> Vec<f32> {
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the allocation holds m·n elements; the product writes each exactly once
    // (no accumulation, so nothing is read) before set_len.
    unsafe {
        product_into(c.as_mut_ptr(), a, ta, b, tb, m, n, k, false, alpha, m * n * k >= PARALLEL_MIN_MACS);
        c.set_len(m * n);
    }
    c
}

/// A linear layer's forward, `x[n, in] · w[out, in]ᵀ`, into a new buffer.
pub fn linear(x: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    matmul_new(x, Op::N, w, Op::T, n, d_out, d_in, 1.0)
}

/// Backward of [`linear`]: returns `dx = dy · w` and accumulates `dw += dyᵀ · x`.
pub fn linear_grad(dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    matmul(dw, dy, Op::T, x, Op::N, d_out, d_in, n, true, 1.0);
    matmul_new(dy, Op::N, w, Op::N, n, d_in, d_out, 1.0)
}

/// Naive triple loop, the reference every fast path is tested against.
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    c: &mut [f32],
    a: &[f32],
    ta: Op,
    b: &[f32],
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    alpha: f32,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta == Op::N { a[i * k + p] } else { a[p * m + i] };
                let bv = if tb == Op::N { b[p * n + j] } else { b[j * k + p] };
                s += av as f64 * bv as f64;
            }
            let v = alpha * s as f32;
            c[i * n + j] = if accumulate { c[i * n + j] + v } else { v };
        }
    }
}

/// Backward of a linear layer `y = x · wᵀ` into existing buffers: `dx (+)= dy · w` (accumulated when `accumulate_dx`),
/// `dw += dyᵀ · x`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate_dx: bool,
) {
    if let Some(dx) = dx {
        matmul(dx, dy, Op::N, w, Op::N, n, d_in, d_out, accumulate_dx, 1.0);
    }
    matmul(dw, dy, Op::T, x, Op::N, d_out, d_in, n, true, 1.0);
}

/// Measures this machine's dense f32 GEMM rate (FLOP/s) on `n×n×n` products for about
/// `seconds`, using every thread of the current pool. The MFU denominator.
pub fn measure_peak_flops(n: usize, seconds: f64) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b = a.clone();
    let mut c = vec![0.0f32; n * n];
    matmul(&mut c, &a, Op::N, &b, Op::T, n, n, n, false, 1.0); // warm-up
    // The fastest call: a noisy neighbour slows some calls, never speeds one up, so the
    // best of many is the machine's rate (a mean over the window was once 20% low,
    // and MFU read 125.9%).
    let start = std::time::Instant::now();
    let (mut iters, mut best) = (0u64, f64::INFINITY);
    while start.elapsed().as_secs_f64() < seconds || iters < 3 {
        let t = std::time::Instant::now();
        matmul(&mut c, &a, Op::N, &b, Op::T, n, n, n, false, 1.0);
        best = best.min(t.elapsed().as_secs_f64());
        iters += 1;
    }
    2.0 * (n * n * n) as f64 / best
}

/// The CPU's vector instruction sets the kernels can use, as people name them (the
/// paths are chosen at run time; AVX-512 only in a build with the `avx512` feature).
pub fn vector_isa() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let mut parts = vec![];
        if has!("avx512f") {
            let mut x = "AVX-512".to_string();
            let ext: Vec<&str> = [(has!("avx512bf16"), "BF16"), (has!("avx512fp16"), "FP16"), (has!("avx512vnni"), "VNNI")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
            if !ext.is_empty() {
                x += &format!(" ({})", ext.join(", "));
            }
            if !crate::isa::avx512_built() {
                x += " unused: built without the avx512 feature";
            }
            parts.push(x);
        }
        if has!("avx2") && has!("fma") {
            parts.push("AVX2+FMA".into());
        }
        if parts.is_empty() {
            parts.push("SSE2".into());
        }
        parts.join(", ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, rand_vec};

    #[test]
    fn matmul_matches_reference_for_all_transposes() {
        let (m, n, k) = (37, 53, 71);
        let a = rand_vec(m * k, 1);
        let b = rand_vec(k * n, 2);
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                for acc in [false, true] {
                    let init = rand_vec(m * n, 3);
                    let mut c = init.clone();
                    let mut r = init.clone();
                    matmul(&mut c, &a, ta, &b, tb, m, n, k, acc, 0.5);
                    matmul_reference(&mut r, &a, ta, &b, tb, m, n, k, acc, 0.5);
                    assert_close(&c, &r, 1e-4, "matmul");
                }
            }
        }
        // Large enough to take the multi-threaded path.
        let (m, n, k) = (128, 96, 80);
        let a = rand_vec(m * k, 4);
        let b = rand_vec(n * k, 5);
        let mut c = vec![0.0; m * n];
        let mut r = vec![0.0; m * n];
        matmul(&mut c, &a, Op::N, &b, Op::T, m, n, k, false, 1.0);
        matmul_reference(&mut r, &a, Op::N, &b, Op::T, m, n, k, false, 1.0);
        assert_close(&c, &r, 1e-4, "parallel matmul");
    }

    #[test]
    fn new_buffer_products_match_the_clearing_ones() {
        let (n, di, dout) = (70, 33, 45);
        let x = rand_vec(n * di, 1);
        let w = rand_vec(dout * di, 2);
        let mut y = vec![0.0; n * dout];
        matmul(&mut y, &x, Op::N, &w, Op::T, n, dout, di, false, 1.0);
        assert_eq!(y, linear(&x, &w, n, di, dout));
        let dy = rand_vec(n * dout, 3);
        let (mut dx, mut dw) = (vec![0.0; n * di], vec![0.1; dout * di]);
        linear_backward(Some(&mut dx), &mut dw, &dy, &x, &w, n, di, dout, false);
        let mut dw2 = vec![0.1; dout * di];
        assert_eq!(dx, linear_grad(&mut dw2, &dy, &x, &w, n, di, dout));
        assert_eq!(dw, dw2);
        assert!(matmul_new(&[], Op::N, &[], Op::N, 3, 2, 0, 1.0).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn zero_inner_dimension_clears_or_keeps() {
        let mut c = vec![3.0; 6];
        matmul(&mut c, &[], Op::N, &[], Op::N, 2, 3, 0, true, 1.0);
        assert_eq!(c, vec![3.0; 6]);
        matmul(&mut c, &[], Op::N, &[], Op::N, 2, 3, 0, false, 1.0);
        assert_eq!(c, vec![0.0; 6]);
    }
}
