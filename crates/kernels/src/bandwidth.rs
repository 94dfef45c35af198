//! Memory read bandwidth as decoding sees it: every thread summing its share of an array
//! much larger than the caches, with enough accumulators that the adds never wait on each
//! other, so only the reads limit it. Decoding one token reads every active weight once, so
//! `bandwidth / bytes per token` bounds decode tokens per second.

use rayon::prelude::*;

/// Bytes per second read, the best of `passes` over `bytes` (rounded to whole KiB).
pub fn measure_read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let n = (bytes / 4).max(1 << 16) / 4096 * 4096;
    let a: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 13) as f32).collect();
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        let t = std::time::Instant::now();
        let s: f32 = a.par_chunks(1 << 16).map(sum4).sum();
        std::hint::black_box(s);
        best = best.max(4.0 * n as f64 / t.elapsed().as_secs_f64());
    }
    best
}

crate::vmath::multiversion! {
    /// Σ x with 64 independent accumulators, prefetching 2 KiB ahead as the decode GEMV
    /// does (both then reach the same rate).
    fn sum4(x: &[f32]) -> f32 {
        let mut acc = [[0.0f32; 16]; 4];
        let chunks = x.chunks_exact(64);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: prefetching never faults, whatever the address.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch((c.as_ptr() as *const i8).wrapping_add(2048), _MM_HINT_T0);
            }
            for (s, a) in acc.iter_mut().enumerate() {
                for l in 0..16 {
                    a[l] += c[s * 16 + l];
                }
            }
        }
        acc.iter().flatten().sum::<f32>() + rest
    }
}
