//! Small row/column copies between fused activation buffers (`[N, width]`, row-major).

use rayon::prelude::*;

/// `dst[r, 0..w] = src[r, col..col + w]` for every row; `src` rows are `src_w` wide.
pub fn take_cols(src: &[f32], src_w: usize, col: usize, w: usize) -> Vec<f32> {
    let rows = src.len() / src_w;
    let mut dst = vec![0.0; rows * w];
    dst.par_chunks_mut(w).zip(src.par_chunks(src_w)).for_each(|(d, s)| d.copy_from_slice(&s[col..col + w]));
    dst
}

/// `dst[r, col..col + w] = src[r, 0..w]` for every row.
pub fn put_cols(dst: &mut [f32], dst_w: usize, col: usize, src: &[f32], w: usize) {
    dst.par_chunks_mut(dst_w).zip(src.par_chunks(w)).for_each(|(d, s)| d[col..col + w].copy_from_slice(s));
}

/// `a += b` elementwise, in parallel chunks of the vectorised kernel.
pub fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(4096).zip(b.par_chunks(4096)).for_each(|(x, y)| ultramoe_kernels::vmath::add_assign(x, y));
}
