//! Token embedding lookup.

use rayon::prelude::*;

/// Forward: `x[t] = table[ids[t]]`, `table: [V, H]`, `x: [N, H]`.
pub fn embedding_forward(x: &mut [f32], table: &[f32], ids: &[u32], h: usize) {
    x.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(row, &id)| {
        let id = id as usize;
        row.copy_from_slice(&table[id * h..(id + 1) * h]);
    });
}

/// Backward: `dtable[ids[t]] += dx[t]`. Serial: rows of repeated ids would race.
pub fn embedding_backward(dtable: &mut [f32], dx: &[f32], ids: &[u32], h: usize) {
    for (row, &id) in dx.chunks(h).zip(ids) {
        let id = id as usize;
        for (d, v) in dtable[id * h..(id + 1) * h].iter_mut().zip(row) {
            *d += v;
        }
    }
}
