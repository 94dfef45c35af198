//! Tensor parallelism, Megatron style: the linear layers and the cross-entropy a TP
//! group of `t` ranks splits, forward beside backward, with the bytes each collective
//! moves counted.
//!
//! - **Column-parallel** `y = x·Wᵀ`, `W: [out, in]` split by output rows: each rank
//!   computes its `out/t` columns of `y` from the whole `x`. Backward: `dW_r = dy_rᵀ·x`,
//!   and `dx = Σ_r dy_r·W_r`, an all-reduce.
//! - **Row-parallel**, `W` split by input columns: each rank multiplies its `in/t` slice
//!   of `x` (the column-parallel layer's output) and the partial products are summed,
//!   an all-reduce. Backward: `dx_r = dy·W_r`, `dW_r = dyᵀ·x_r`, no collective.
//! - **Sequence parallelism**: outside the two (norms, residuals) each rank keeps only
//!   its `n/t` rows. The column layer all-gathers its input rows (backward:
//!   reduce-scatter), the row layer reduce-scatters its output (backward: all-gather),
//!   so the all-reduces become an all-gather plus a reduce-scatter of the same bytes.
//! - **Vocabulary-parallel cross-entropy**: each rank holds the logits of its `V/t`
//!   vocabulary slice; the row maxima, the sums of `e^(x−max)` and the target logits
//!   are combined across the group (`n` floats each), so no rank holds a whole row.
//!
//! Traffic per rank (ring algorithms): an all-reduce of `B` bytes moves
//! `2(t−1)/t·B`, an all-gather or a reduce-scatter whose whole result is `B` bytes moves
//! `(t−1)/t·B`. Each split block of a decoder layer (attention: column QKV + row
//! output; a dense MLP or shared experts: column gate/up + row down) moves twice the
//! all-reduce of its `n·H` activations per micro-batch, forward and backward, with or
//! without sequence parallelism — `ultramoe_plan::simulate::tp_bytes_per_layer`; the
//! vocabulary-parallel embedding and head, `tp_bytes_vocab`; both tested equal to what
//! the model's passes count here.
//!
//! The decoder layers call [`TensorParallel::rows_whole`] and
//! [`TensorParallel::sum_partial`] around their split blocks (the `*_in_pass` forms:
//! inside a pass a failed collective unwinds, like the expert exchange's, and the
//! trainer turns it back into an error); the linears here are the same algebra as
//! standalone functions, tested against one rank.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use ultramoe_dist::{CommResult, ProcessGroup};
use ultramoe_kernels::gemm::{linear, linear_backward};
use ultramoe_kernels::loss::IGNORE;

/// A tensor-parallel group and what its collectives have moved.
pub struct TensorParallel {
    group: Arc<dyn ProcessGroup>,
    sequence_parallel: bool,
    bytes: AtomicU64,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel {{ rank: {}, size: {}, sequence_parallel: {} }}", self.rank(), self.size(), self.sequence_parallel)
    }
}

impl TensorParallel {
    /// The group `group`, with sequence parallelism when `sequence_parallel`.
    pub fn new(group: Arc<dyn ProcessGroup>, sequence_parallel: bool) -> Self {
        TensorParallel { group, sequence_parallel, bytes: AtomicU64::new(0) }
    }

    /// Ranks in the group (`t`).
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Whether activations outside the split layers are sequence slices.
    pub fn sequence_parallel(&self) -> bool {
        self.sequence_parallel
    }

    /// This rank's `[start, start + len)` of a dimension of `n` (named `field` in the
    /// error when `t` does not divide it).
    pub fn slice(&self, n: usize, field: &str) -> Result<(usize, usize), String> {
        let t = self.size();
        if !n.is_multiple_of(t) {
            return Err(format!("{field}: tensor parallelism {t} does not divide {n}"));
        }
        Ok((self.rank() * n / t, n / t))
    }

    /// Bytes this rank's collectives have moved (ring algorithms; see the module docs).
    pub fn traffic_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The group.
    pub fn group(&self) -> &Arc<dyn ProcessGroup> {
        &self.group
    }

    /// Sums `buf` over the group inside a pass (counted like every collective here): a
    /// failure unwinds with the [`ultramoe_dist::CommError`] as payload, as the
    /// dispatcher's exchanges do, and the trainer turns it back into an error.
    pub fn sum_in_pass(&self, buf: &mut [f32]) {
        let _p = ultramoe_kernels::profile::scope("tp.all_reduce");
        self.all_reduce(buf).unwrap_or_else(|e| std::panic::panic_any(e))
    }

    /// Every rank's `part` in rank order, inside a pass (counted; a failure unwinds as
    /// [`TensorParallel::sum_in_pass`]'s does).
    pub fn gather_in_pass(&self, part: &[f32]) -> Vec<f32> {
        let _p = ultramoe_kernels::profile::scope("tp.all_gather");
        self.all_gather(part).unwrap_or_else(|e| std::panic::panic_any(e))
    }

    /// This rank's rows of the sum over the group of `whole` (`[n, d]` → `[n/t, d]`),
    /// inside a pass: sequence parallelism's reduce-scatter (counted; a failure unwinds
    /// as [`TensorParallel::sum_in_pass`]'s does).
    pub fn scatter_sum_in_pass(&self, whole: &[f32]) -> Vec<f32> {
        let _p = ultramoe_kernels::profile::scope("tp.reduce_scatter");
        self.reduce_scatter(whole).unwrap_or_else(|e| std::panic::panic_any(e))
    }

    /// Under sequence parallelism, every rank's rows in order (an all-gather); otherwise
    /// `rows` itself.
    pub fn rows_whole(&self, rows: Vec<f32>) -> Vec<f32> {
        if self.sequence_parallel {
            self.gather_in_pass(&rows)
        } else {
            rows
        }
    }

    /// [`TensorParallel::rows_whole`] of borrowed rows: gathered under sequence
    /// parallelism, otherwise borrowed as they are (no copy).
    pub fn rows_whole_ref<'a>(&self, rows: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        if self.sequence_parallel {
            std::borrow::Cow::Owned(self.gather_in_pass(rows))
        } else {
            std::borrow::Cow::Borrowed(rows)
        }
    }

    /// The sum over the group of a split block's partial result `[n, d]`: this rank's
    /// rows of it under sequence parallelism (a reduce-scatter), all of it otherwise
    /// (an all-reduce).
    pub fn sum_partial(&self, mut partial: Vec<f32>) -> Vec<f32> {
        if self.sequence_parallel {
            self.scatter_sum_in_pass(&partial)
        } else {
            self.sum_in_pass(&mut partial);
            partial
        }
    }

    fn count(&self, ring_bytes: f64) {
        self.bytes.fetch_add(ring_bytes.round() as u64, Ordering::Relaxed);
    }

    fn all_reduce(&self, buf: &mut [f32]) -> CommResult<()> {
        let t = self.size() as f64;
        self.count(2.0 * (t - 1.0) / t * (4 * buf.len()) as f64);
        self.group.all_reduce_f32(buf)
    }

    fn all_gather(&self, part: &[f32]) -> CommResult<Vec<f32>> {
        let t = self.size() as f64;
        self.count((t - 1.0) / t * (4 * part.len()) as f64 * t);
        self.group.all_gather_f32(part)
    }

    fn reduce_scatter(&self, whole: &[f32]) -> CommResult<Vec<f32>> {
        let t = self.size() as f64;
        self.count((t - 1.0) / t * (4 * whole.len()) as f64);
        self.group.reduce_scatter_f32(whole)
    }

    /// Column-parallel forward: `x` is `[n, d_in]` (with sequence parallelism this
    /// rank's `[n/t, d_in]` rows, gathered first); returns this rank's `[n, d_out/t]`
    /// output and the whole input its backward reads.
    pub fn column_forward(&self, x: &[f32], w_local: &[f32], d_in: usize, d_out_local: usize) -> CommResult<(Vec<f32>, Vec<f32>)> {
        let x_full = if self.sequence_parallel { self.all_gather(x)? } else { x.to_vec() };
        let n = x_full.len() / d_in;
        Ok((linear(&x_full, w_local, n, d_in, d_out_local), x_full))
    }

    /// Column-parallel backward: accumulates `dw_local += dy_localᵀ·x_full` and returns
    /// `dx` summed over the group (`[n, d_in]`, or this rank's rows under sequence
    /// parallelism).
    pub fn column_backward(&self, dy_local: &[f32], x_full: &[f32], w_local: &[f32], dw_local: &mut [f32], d_in: usize, d_out_local: usize) -> CommResult<Vec<f32>> {
        let n = x_full.len() / d_in;
        let mut dx = vec![0.0; n * d_in];
        linear_backward(Some(&mut dx), dw_local, dy_local, x_full, w_local, n, d_in, d_out_local, false);
        if self.sequence_parallel {
            self.reduce_scatter(&dx)
        } else {
            self.all_reduce(&mut dx)?;
            Ok(dx)
        }
    }

    /// Row-parallel forward: `x_local` is this rank's `[n, d_in/t]` columns; returns
    /// `y = Σ_r x_r·W_rᵀ`, `[n, d_out]` (this rank's `[n/t, d_out]` rows under sequence
    /// parallelism).
    pub fn row_forward(&self, x_local: &[f32], w_local: &[f32], d_in_local: usize, d_out: usize) -> CommResult<Vec<f32>> {
        let n = x_local.len() / d_in_local;
        let mut y = linear(x_local, w_local, n, d_in_local, d_out);
        if self.sequence_parallel {
            return self.reduce_scatter(&y);
        }
        self.all_reduce(&mut y)?;
        Ok(y)
    }

    /// Row-parallel backward: `dy` as the forward returned it; accumulates
    /// `dw_local += dyᵀ·x_local` and returns `dx_local = dy·W_local`.
    pub fn row_backward(&self, dy: &[f32], x_local: &[f32], w_local: &[f32], dw_local: &mut [f32], d_in_local: usize, d_out: usize) -> CommResult<Vec<f32>> {
        let dy_full = if self.sequence_parallel { self.all_gather(dy)? } else { dy.to_vec() };
        let n = x_local.len() / d_in_local;
        let mut dx = vec![0.0; n * d_in_local];
        linear_backward(Some(&mut dx), dw_local, &dy_full, x_local, w_local, n, d_in_local, d_out, false);
        Ok(dx)
    }

    /// Vocabulary-parallel cross-entropy, fused with its backward: `logits` is this
    /// rank's `[n, v_local]` slice of the vocabulary starting at `vocab_start`; it becomes
    /// `scale·(softmax − onehot(target))` for those columns. Returns `(Σ CE, count)` over
    /// rows whose target is not [`IGNORE`].
    ///
    /// `CE = log Σ_v e^(x_v − m) + m − x_target` with `m` the row's maximum over the whole
    /// vocabulary: three collectives of `n` floats (the maxima gathered, the sums and the
    /// target logits all-reduced).
    pub fn vocab_parallel_cross_entropy(&self, logits: &mut [f32], targets: &[i32], vocab_start: usize, v_local: usize, scale: f32) -> CommResult<(f64, usize)> {
        use rayon::prelude::*;
        use ultramoe_kernels::vmath;
        let n = targets.len();
        let owned = |t: i32| t != IGNORE && (vocab_start..vocab_start + v_local).contains(&(t as usize));
        let local_max: Vec<f32> = logits.par_chunks(v_local).map(vmath::max).collect();
        let maxima = self.all_gather(&local_max)?;
        let row_max: Vec<f32> = (0..n).map(|i| (0..self.size()).map(|r| maxima[r * n + i]).fold(f32::NEG_INFINITY, f32::max)).collect();
        // The target's logit is read before the row turns into `e^(x − max)`; one
        // exponential per logit, kept and normalised into the gradient below.
        let mut target_logit: Vec<f32> = targets.iter().enumerate().map(|(i, &t)| if owned(t) { logits[i * v_local + t as usize - vocab_start] } else { 0.0 }).collect();
        let mut sums: Vec<f32> = logits.par_chunks_mut(v_local).zip(&row_max).map(|(r, &m)| vmath::exp_shifted_sum(r, m)).collect();
        self.all_reduce(&mut sums)?;
        self.all_reduce(&mut target_logit)?;
        // `dlogits = scale · (e^(x − max)/Σ − onehot)`; rows without a target are zero.
        logits.par_chunks_mut(v_local).zip(targets.par_iter()).zip(sums.par_iter()).for_each(|((row, &t), &sum)| {
            if t == IGNORE {
                row.fill(0.0);
                return;
            }
            let inv = 1.0 / sum;
            let hit = owned(t).then(|| t as usize - vocab_start);
            let p_hit = hit.map(|j| row[j] * inv);
            row.iter_mut().for_each(|x| *x = scale * (*x * inv));
            if let (Some(j), Some(p)) = (hit, p_hit) {
                row[j] = scale * (p - 1.0);
            }
        });
        let (mut total, mut count) = (0.0f64, 0usize);
        for i in (0..n).filter(|&i| targets[i] != IGNORE) {
            total += (sums[i].ln() + row_max[i] - target_logit[i]) as f64;
            count += 1;
        }
        Ok((total, count))
    }
}
