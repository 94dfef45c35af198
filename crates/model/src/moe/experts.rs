//! All routed experts of one layer as grouped GEMMs:
//! `gu = x_e · W_gu[e]ᵀ` (`[E, 2I, H]`), `a = silu(g) ⊙ u`, `y = a · W_down[e]ᵀ`
//! (`[E, H, I]`), each one call over every expert's contiguous rows.

use crate::params::Slot;
use std::ops::Range;
use ultramoe_kernels::activation::{swiglu, swiglu_grad};
use ultramoe_kernels::grouped_gemm::{grouped_input_grad, grouped_linear, grouped_weight_grad};
use ultramoe_kernels::qlinear::{RoundedRows, GEMV_MAX_ROWS};

/// Weights a block of an expert's matrix holds in the decode step's shared passes: 256
/// KiB of f32 weights, a few blocks per expert.
const EXPERT_BLOCK_WEIGHTS: usize = 1 << 16;

/// Writes `part: [rows, cols.len()]` into the columns `cols` of `out: [rows, width]`.
fn place_columns(out: &mut [f32], width: usize, cols: &Range<usize>, part: &[f32]) {
    for (row, p) in out.chunks_mut(width).zip(part.chunks(cols.len())) {
        row[cols.clone()].copy_from_slice(p);
    }
}

/// Checkpoint names of a layer's expert tensors: `{prefix}{e}.{proj}.weight`.
#[derive(Clone, Debug)]
pub struct ExpertNames {
    /// e.g. `model.layers.3.mlp.experts.`
    pub prefix: String,
    /// gate, up and down projection names (`gate_proj`, `up_proj`, `down_proj`, or
    /// Mixtral's `w1`, `w3`, `w2`)
    pub proj: [String; 3],
}

impl ExpertNames {
    /// Name of expert `e`'s gate (`which = 0`), up (1) or down (2) projection.
    pub fn tensor(&self, e: usize, which: usize) -> String {
        format!("{}{e}.{}.weight", self.prefix, self.proj[which])
    }
}

/// Pieces the one-rank backward of a chunk's top MoE layer works through its routed
/// rows in ([`crate::model::Model::moe_backward_pieces`]), so the experts' backward
/// temporaries — output and input gradients `2H`, SwiGLU gradients `3I` floats a row —
/// are held for about a quarter of the rows at once instead of all `R = N·K`. With
/// four, a piece still holds hundreds of rows per expert on the shapes trained here.
pub const BACKWARD_PIECES: usize = 4;

/// The most rows one of `pieces` backward pieces holds, of `r` routed rows: `⌈r / pieces⌉`.
pub fn backward_piece_rows(r: usize, pieces: usize) -> usize {
    r.div_ceil(pieces.max(1)).max(1)
}

/// Contiguous routed rows and the consecutive slots they belong to.
#[derive(Clone, Debug, PartialEq)]
pub struct RowPiece {
    /// rows of the whole `[R, ·]` buffers
    pub rows: Range<usize>,
    /// the slots whose rows these are (possibly only some of the first and last slot's)
    pub slots: Range<usize>,
    /// `slots.len() + 1` offsets of each slot's rows within the piece, from 0
    pub offsets: Vec<usize>,
}

/// Cuts the rows grouped by `offsets` (`[S + 1]`) into pieces of at most `cap` rows,
/// at slot boundaries wherever a slot's rows fit, inside a slot only when its rows
/// alone exceed `cap` (then its weight gradient sums over two products).
pub fn row_pieces(offsets: &[usize], cap: usize) -> Vec<RowPiece> {
    let (total, slots) = (*offsets.last().unwrap_or(&0), offsets.len().saturating_sub(1));
    let cap = cap.max(1);
    let mut pieces = Vec::new();
    let mut r0 = 0;
    while r0 < total {
        let limit = r0 + cap;
        let r1 = offsets.iter().copied().filter(|&o| o > r0 && o <= limit).max().unwrap_or(limit.min(total));
        let first = (0..slots).find(|&s| offsets[s + 1] > r0).expect("rows remain, so a slot holds them");
        let last = (0..slots).rfind(|&s| offsets[s] < r1).expect("the piece has rows");
        let offsets = (first..=last + 1).map(|s| offsets[s].clamp(r0, r1) - r0).collect();
        pieces.push(RowPiece { rows: r0..r1, slots: first..last + 1, offsets });
        r0 = r1;
    }
    pieces
}

/// The routed experts this rank holds in one layer: one per slot (see
/// [`super::placement`]; without expert parallelism slot `e` is expert `e`).
#[derive(Clone, Debug)]
pub struct GroupedExperts {
    /// every slot's fused gate/up, `[S, 2I, H]`
    pub gate_up: Slot,
    /// every slot's down projection, `[S, H, I]`
    pub down: Slot,
    /// hidden `H`
    pub hidden: usize,
    /// expert width `I`
    pub inter: usize,
    /// checkpoint names
    pub names: ExpertNames,
}

/// Saved activations of [`GroupedExperts::forward`].
#[derive(Default)]
pub struct ExpertsSaved {
    /// `[R, 2I]`
    pub gu: Vec<f32>,
    /// `[R, I]`
    pub act: Vec<f32>,
}

impl GroupedExperts {
    /// Flat-buffer ranges of slot `j`'s gate/up and down weights.
    pub fn slot_ranges(&self, j: usize) -> [Range<usize>; 2] {
        self.slots_span(&(j..j + 1))
    }

    /// Flat-buffer ranges of the gate/up and down weights of the consecutive `slots`.
    fn slots_span(&self, slots: &Range<usize>) -> [Range<usize>; 2] {
        let (gu, dn) = (2 * self.inter * self.hidden, self.hidden * self.inter);
        [self.gate_up.start + slots.start * gu..self.gate_up.start + slots.end * gu, self.down.start + slots.start * dn..self.down.start + slots.end * dn]
    }

    /// `xp: [R, H]` grouped by `offsets` → `yp: [R, H]`.
    pub fn forward(&self, w: &[f32], xp: &[f32], offsets: &[usize]) -> (Vec<f32>, ExpertsSaved) {
        let (h, i) = (self.hidden, self.inter);
        let gu = grouped_linear(xp, &w[self.gate_up.clone()], offsets, h, 2 * i);
        let s = ExpertsSaved { act: swiglu(&gu, i), gu };
        (self.down(w, &s.act, offsets), s)
    }

    /// Inference forward through decoding weights: `xp: [R, H]` grouped by `offsets` →
    /// `yp: [R, H]` (an empty slot's weights are not read). With few rows per slot
    /// (decoding) the slots run side by side, one thread each; with many, one after
    /// another on every thread.
    pub fn forward_infer(&self, dw: &crate::decode_weights::DecodeWeights, xp: &[f32], offsets: &[usize]) -> Vec<f32> {
        use rayon::prelude::*;
        let (h, i) = (self.hidden, self.inter);
        let busy: Vec<usize> = (0..offsets.len() - 1).filter(|&j| offsets[j + 1] > offsets[j]).collect();
        let few = busy.iter().all(|&j| offsets[j + 1] - offsets[j] <= 8);
        let one = |j: usize, parallel: bool| {
            let (r0, r1) = (offsets[j], offsets[j + 1]);
            let [gu, dn] = self.slot_ranges(j);
            let act = swiglu(&dw.linear_on(&gu, &xp[r0 * h..r1 * h], r1 - r0, h, 2 * i, parallel), i);
            dw.linear_on(&dn, &act, r1 - r0, i, h, parallel)
        };
        let mut yp = vec![0.0; xp.len()];
        let most = busy.iter().map(|&j| offsets[j + 1] - offsets[j]).max().unwrap_or(0);
        // (beyond the GEMV's rows an expert's products dequantise and take the GEMM,
        // expert by expert)
        if few || most > GEMV_MAX_ROWS {
            let outs: Vec<Vec<f32>> = if few { busy.par_iter().map(|&j| one(j, false)).collect() } else { busy.iter().map(|&j| one(j, true)).collect() };
            for (&j, y) in busy.iter().zip(outs) {
                yp[offsets[j] * h..offsets[j + 1] * h].copy_from_slice(&y);
            }
            return yp;
        }
        // Some expert has more than a few of a decode step's rows (sequences that share
        // a prompt agree on their experts): the gate/up products of every busy expert,
        // cut in blocks of weight rows, in one parallel pass, then the down products
        // likewise — two parallel passes a layer instead of two per busy expert (~20 a
        // layer, each split over the threads: 16 shared-prompt sequences decoded
        // 1.2× faster this way).
        let rows_of = |j: usize| offsets[j]..offsets[j + 1];
        let blocks = |j: usize, d_out: usize, d_in: usize| {
            let per = (EXPERT_BLOCK_WEIGHTS / d_in).clamp(1, d_out);
            (0..d_out.div_ceil(per)).map(move |b| (j, b * per..((b + 1) * per).min(d_out)))
        };
        let blocks_of = |tasks: &[(usize, Range<usize>)], f: &(dyn Fn(usize, Range<usize>) -> Vec<f32> + Sync)| -> Vec<Vec<f32>> {
            tasks.par_iter().map(|(j, cols)| f(*j, cols.clone())).collect()
        };
        // (gate/up per busy expert, `[rows, 2I]`, then `act = silu(gate) ⊙ up`)
        // (INT8: each expert's rows rounded once, not once a block)
        let x_of = |j: usize| &xp[rows_of(j).start * h..rows_of(j).end * h];
        let rounded: Vec<RoundedRows> = (0..offsets.len() - 1).map(|j| dw.round(&self.slot_ranges(j)[0], x_of(j), rows_of(j).len(), h)).collect();
        let tasks: Vec<_> = busy.iter().flat_map(|&j| blocks(j, 2 * i, h)).collect();
        let parts = blocks_of(&tasks, &|j, cols| dw.linear_rows(&self.slot_ranges(j)[0], x_of(j), &rounded[j], rows_of(j).len(), h, 2 * i, cols));
        let mut gu: Vec<Vec<f32>> = (0..offsets.len() - 1).map(|j| vec![0.0; rows_of(j).len() * 2 * i]).collect();
        for ((j, cols), part) in tasks.iter().zip(parts) {
            place_columns(&mut gu[*j], 2 * i, cols, &part);
        }
        let act: Vec<Vec<f32>> = gu.iter().map(|g| swiglu(g, i)).collect();
        let rounded: Vec<RoundedRows> = (0..offsets.len() - 1).map(|j| dw.round(&self.slot_ranges(j)[1], &act[j], rows_of(j).len(), i)).collect();
        let tasks: Vec<_> = busy.iter().flat_map(|&j| blocks(j, h, i)).collect();
        let parts = blocks_of(&tasks, &|j, cols| dw.linear_rows(&self.slot_ranges(j)[1], &act[j], &rounded[j], rows_of(j).len(), i, h, cols));
        for ((j, cols), part) in tasks.iter().zip(parts) {
            let r = rows_of(*j);
            place_columns(&mut yp[r.start * h..r.end * h], h, cols, &part);
        }
        yp
    }

    /// The down-projection `y = a · W_down[e]ᵀ` over every slot's rows.
    pub fn down(&self, w: &[f32], act: &[f32], offsets: &[usize]) -> Vec<f32> {
        grouped_linear(act, &w[self.down.clone()], offsets, self.inter, self.hidden)
    }

    /// Rebuilds `act = silu(g) ⊙ u` from the kept gate/up projections (freed by the
    /// `swiglu` policy).
    pub fn restore_act(&self, s: &mut ExpertsSaved) {
        if s.act.is_empty() && !s.gu.is_empty() {
            let _p = ultramoe_kernels::profile::scope("recompute.swiglu");
            s.act = swiglu(&s.gu, self.inter);
        }
    }

    /// The input half of the backward (zero-bubble's "B") for the consecutive `slots`,
    /// whose rows `dyp` and `gu` hold, grouped by `offsets` (`slots.len() + 1` of them,
    /// from 0): `dact = dyp · W_down[e]`, `dgu = swiglu'(gu) ⊙ dact`, `dxp = dgu ·
    /// W_gu[e]`. Returns `dxp: [rows, H]` and `dgu: [rows, 2I]`, which
    /// [`Self::backward_weights`] needs. Under expert parallelism `dxp` travels back to
    /// the tokens' ranks while the weight half runs.
    pub fn backward_input(&self, w: &[f32], gu: &[f32], dyp: &[f32], slots: Range<usize>, offsets: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (h, i) = (self.hidden, self.inter);
        let [w_gu, w_down] = self.slots_span(&slots);
        let dact = grouped_input_grad(dyp, &w[w_down], offsets, i, h);
        let dgu = swiglu_grad(&dact, gu, i);
        drop(dact);
        (grouped_input_grad(&dgu, &w[w_gu], offsets, h, 2 * i), dgu)
    }

    /// The weight half (zero-bubble's "W") for the same `slots` and rows: `g_down[e] +=
    /// dyp_eᵀ · act_e`, `g_gu[e] += dgu_eᵀ · xp_e` — the same sums in the same order as
    /// the whole backward, so the split changes no bit.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_weights(&self, g: &mut [f32], xp: &[f32], act: &[f32], dyp: &[f32], dgu: &[f32], slots: Range<usize>, offsets: &[usize]) {
        let (h, i) = (self.hidden, self.inter);
        let [g_gu, g_down] = self.slots_span(&slots);
        grouped_weight_grad(&mut g[g_down], dyp, act, offsets, i, h);
        grouped_weight_grad(&mut g[g_gu], dgu, xp, offsets, h, 2 * i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_pieces_cover_every_row_once_and_cut_inside_a_slot_only_when_it_must() {
        // slot rows: 3, 0, 5, 2, 9, 1
        let offsets = [0, 3, 3, 8, 10, 19, 20];
        let pieces = row_pieces(&offsets, 5);
        let rows: Vec<_> = pieces.iter().map(|p| p.rows.clone()).collect();
        assert_eq!(rows, vec![0..3, 3..8, 8..10, 10..15, 15..20]);
        assert_eq!(pieces[4].offsets, vec![0, 4, 5]);
        for p in &pieces {
            assert!(p.rows.len() <= 5);
            assert_eq!(p.offsets.len(), p.slots.len() + 1);
            assert_eq!((p.offsets[0], *p.offsets.last().unwrap()), (0, p.rows.len()));
            // each slot's rows inside the piece are its rows of the whole buffer
            for (j, s) in p.slots.clone().enumerate() {
                let whole = offsets[s].max(p.rows.start)..offsets[s + 1].min(p.rows.end);
                assert_eq!(p.offsets[j] + p.rows.start..p.offsets[j + 1] + p.rows.start, whole);
                assert!(!whole.is_empty() || (s > p.slots.start && s + 1 < p.slots.end), "empty slots only inside a piece");
            }
        }
        assert_eq!(pieces[3].slots, 4..5);
        assert_eq!(pieces[1].slots, 2..3);
        // one piece when everything fits; none without rows
        assert_eq!(row_pieces(&offsets, 20).len(), 1);
        assert!(row_pieces(&[0, 0, 0], 4).is_empty());
        assert_eq!(backward_piece_rows(8192, 4), 2048);
        assert_eq!(backward_piece_rows(9, 4), 3);
        assert_eq!(backward_piece_rows(9, 1), 9);
    }
}
