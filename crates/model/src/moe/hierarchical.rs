//! Hierarchical all-to-all: a token crosses to each remote node once.
//!
//! Ranks of the expert-parallel group sit on `G` nodes of `L` consecutive ranks; rank
//! `(n, l)` talks across nodes only with its *rail* — the ranks `(m, l)` with the same
//! local index — and inside its node with the ranks `(n, ·)`.
//!
//! - Dispatch: the source sends each token once to the rail peer of every node holding
//!   any of the token's experts ("items"), with the token's expert ids and combine
//!   weights for that node. The peer (the item's *forwarder*) copies the row to each
//!   expert owner inside its node, which receives rows grouped by local expert as in the
//!   flat exchange.
//! - Combine: owners return outputs to the forwarder, which sums `Σ_j w_j·y_j` over the
//!   item's experts and sends one row back across the rail: the source adds one partial
//!   sum per node.
//! - Backward: the source sends `dy` once per item; the forwarder forms `w_j·dy` for each
//!   expert and `dw_j = ⟨dy, y_j⟩` (returned to the source), owners compute `dx_j`, the
//!   forwarder sums them, one row crosses back.
//!
//! Inter-node bytes per exchange: one row per (token, remote node) instead of one per
//! (token, remote expert). Results equal the flat exchange's up to the order of sums.

use std::sync::Arc;
use ultramoe_dist::{CommResult, ProcessGroup};
use super::dispatcher::{scaled, sums};
use ultramoe_kernels::permute::{transpose_blocks, transpose_counts};

/// The two sub-groups of an expert-parallel group.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    /// ranks with this rank's local index, one per node (rank = node index)
    pub rail: Arc<dyn ProcessGroup>,
    /// ranks of this rank's node (rank = local index)
    pub node: Arc<dyn ProcessGroup>,
}

impl Hierarchy {
    /// Splits an expert-parallel group whose nodes hold `per_node` consecutive ranks
    /// (collective over `ep`).
    pub fn new(ep: &dyn ProcessGroup, per_node: usize) -> CommResult<Hierarchy> {
        let r = ep.rank();
        let rail = ep.split_group(r % per_node, r / per_node)?;
        let node = ep.split_group(r / per_node, r % per_node)?;
        Ok(Hierarchy { rail, node })
    }
}

/// Everything one chunk's exchanges need, on every side (this rank is a source, a
/// forwarder and an owner at once).
pub struct HierState {
    h: usize,
    k: usize,
    /// experts per rank
    el: usize,
    /// ranks per node
    l: usize,
    // source side
    /// token of each item this rank sent, in send order (grouped by destination node)
    items: Vec<u32>,
    /// items sent to each node
    items_to: Vec<usize>,
    // forwarder side
    /// items received from each node
    items_from: Vec<usize>,
    /// per received item, `K` expert ids (−1: not on this node) then `K` weights
    meta: Vec<f32>,
    /// fan-out rows in send order (grouped by owner, then local expert): (item, slot)
    fanout: Vec<(u32, u32)>,
    /// `[L, E_local]`: fan-out rows to each owner's local experts
    fan_counts: Vec<usize>,
    // owner side
    /// `[L, E_local]`: rows received from each forwarder for each local expert
    recv_counts: Vec<usize>,
    /// `[E_local + 1]`: local expert `j` owns rows `offsets[j]..offsets[j+1]`
    pub offsets: Vec<usize>,
}

/// Source side of a dispatch: the items and their rows `[x_t ; expert ids ; weights]`.
/// Returns (items, items per node, rows).
#[allow(clippy::too_many_arguments)]
pub fn pack_items(x: &[f32], experts: &[u32], weights: &[f32], h: usize, k: usize, el: usize, l: usize, g: usize) -> (Vec<u32>, Vec<usize>, Vec<f32>) {
    let n = experts.len() / k.max(1);
    let w = h + 2 * k;
    let mut items = vec![];
    let mut items_to = vec![0; g];
    let mut rows = vec![];
    for (m, count) in items_to.iter_mut().enumerate() {
        for t in 0..n {
            let slots = &experts[t * k..(t + 1) * k];
            if !slots.iter().any(|&e| e as usize / el / l == m) {
                continue;
            }
            items.push(t as u32);
            *count += 1;
            rows.reserve(w);
            rows.extend_from_slice(&x[t * h..(t + 1) * h]);
            rows.extend(slots.iter().map(|&e| if e as usize / el / l == m { e as f32 } else { -1.0 }));
            rows.extend_from_slice(&weights[t * k..(t + 1) * k]);
        }
    }
    (items, items_to, rows)
}

/// The dispatch exchange (run on the communication stream): items across the rail,
/// fan-out inside the node. Returns the owner's rows grouped by local expert and the
/// chunk's state.
#[allow(clippy::too_many_arguments)]
pub fn dispatch(hy: &Hierarchy, items: Vec<u32>, items_to: Vec<usize>, rows: Vec<f32>, h: usize, k: usize, el: usize) -> CommResult<(Vec<f32>, HierState)> {
    let (g, l) = (hy.rail.size(), hy.node.size());
    let w = h + 2 * k;
    let to64: Vec<u64> = items_to.iter().map(|&c| c as u64).collect();
    let (from, _) = hy.rail.all_to_all_v_u64(&to64, &vec![1; g])?;
    let items_from: Vec<usize> = from.into_iter().map(|c| c as usize).collect();
    let got = hy.rail.all_to_all_v_known_f32(&rows, &scaled(&items_to, w), &scaled(&items_from, w))?;
    drop(rows);
    // Forwarder: one row per (item, expert on this node), grouped by owner then expert.
    let n_items = got.len() / w;
    let mut meta = Vec::with_capacity(n_items * 2 * k);
    let mut fan: Vec<(usize, u32, u32)> = vec![]; // (owner·el + local expert, item, slot)
    for i in 0..n_items {
        let row = &got[i * w..(i + 1) * w];
        meta.extend_from_slice(&row[h..]);
        for j in 0..k {
            let e = row[h + j];
            if e >= 0.0 {
                let e = e as usize;
                fan.push((((e / el) % l) * el + e % el, i as u32, j as u32));
            }
        }
    }
    fan.sort_by_key(|&(dest, i, j)| (dest, i, j));
    let mut fan_counts = vec![0usize; l * el];
    let mut out = Vec::with_capacity(fan.len() * h);
    for &(dest, i, _) in &fan {
        fan_counts[dest] += 1;
        out.extend_from_slice(&got[i as usize * w..i as usize * w + h]);
    }
    drop(got);
    let fanout: Vec<(u32, u32)> = fan.into_iter().map(|(_, i, j)| (i, j)).collect();
    // Owner: counts, then rows, regrouped by local expert.
    let fc64: Vec<u64> = fan_counts.iter().map(|&c| c as u64).collect();
    let (rc, _) = hy.node.all_to_all_v_u64(&fc64, &vec![el; l])?;
    let recv_counts: Vec<usize> = rc.into_iter().map(|c| c as usize).collect();
    let rows = hy.node.all_to_all_v_known_f32(&out, &scaled(&sums(&fan_counts, el), h), &scaled(&sums(&recv_counts, el), h))?;
    let xp = transpose_blocks(&rows, &recv_counts, l, el, h);
    let mut offsets = vec![0usize; el + 1];
    for j in 0..el {
        offsets[j + 1] = offsets[j] + (0..l).map(|s| recv_counts[s * el + j]).sum::<usize>();
    }
    let st = HierState { h, k, el, l, items, items_to, items_from, meta, fanout, fan_counts, recv_counts, offsets };
    Ok((xp, st))
}

impl HierState {
    /// Inter-node rows this rank sends per exchange (items to other nodes), and the
    /// intra-node rows (fan-out to other ranks of the node).
    pub fn traffic(&self, node: usize, local: usize) -> (usize, usize) {
        let inter = self.items_to.iter().enumerate().filter(|&(m, _)| m != node).map(|(_, c)| c).sum();
        let intra = sums(&self.fan_counts, self.el).iter().enumerate().filter(|&(o, _)| o != local).map(|(_, c)| c).sum();
        (inter, intra)
    }

    /// Owner rows (grouped by local expert) → forwarder rows in fan-out order.
    fn to_forwarders(&self, hy: &Hierarchy, rows: &[f32]) -> CommResult<Vec<f32>> {
        let (h, l, el) = (self.h, self.l, self.el);
        let by_forwarder = transpose_blocks(rows, &transpose_counts(&self.recv_counts, l, el), el, l, h);
        hy.node.all_to_all_v_known_f32(&by_forwarder, &scaled(&sums(&self.recv_counts, el), h), &scaled(&sums(&self.fan_counts, el), h))
    }

    /// Forwarder rows in fan-out order → owners' rows grouped by local expert.
    fn to_owners(&self, hy: &Hierarchy, rows: &[f32]) -> CommResult<Vec<f32>> {
        let (h, l, el) = (self.h, self.l, self.el);
        let got = hy.node.all_to_all_v_known_f32(rows, &scaled(&sums(&self.fan_counts, el), h), &scaled(&sums(&self.recv_counts, el), h))?;
        Ok(transpose_blocks(&got, &self.recv_counts, l, el, h))
    }

    /// Forwarder per-item rows (width `w`) → back to the sources, in their item order.
    fn to_sources(&self, hy: &Hierarchy, rows: &[f32], w: usize) -> CommResult<Vec<f32>> {
        hy.rail.all_to_all_v_known_f32(rows, &scaled(&self.items_from, w), &scaled(&self.items_to, w))
    }

    /// Per-item rows at the source (width `w`) → to the forwarders.
    fn to_forwarders_rail(&self, hy: &Hierarchy, rows: &[f32], w: usize) -> CommResult<Vec<f32>> {
        hy.rail.all_to_all_v_known_f32(rows, &scaled(&self.items_to, w), &scaled(&self.items_from, w))
    }

    fn weight(&self, i: usize, j: usize) -> f32 {
        self.meta[i * 2 * self.k + self.k + j]
    }

    fn n_received(&self) -> usize {
        self.items_from.iter().sum()
    }

    /// Combine exchange: owners' outputs `yp` → per-item partial sums at the source.
    /// Returns (partials `[items, H]`, the forwarder's per-expert outputs for backward).
    pub fn combine(&self, hy: &Hierarchy, yp: &[f32]) -> CommResult<(Vec<f32>, Vec<f32>)> {
        let h = self.h;
        let yf = self.to_forwarders(hy, yp)?;
        let mut partial = vec![0.0f32; self.n_received() * h];
        for (r, &(i, j)) in self.fanout.iter().enumerate() {
            let wgt = self.weight(i as usize, j as usize);
            let dst = &mut partial[i as usize * h..(i as usize + 1) * h];
            dst.iter_mut().zip(&yf[r * h..(r + 1) * h]).for_each(|(d, y)| *d += wgt * y);
        }
        Ok((self.to_sources(hy, &partial, h)?, yf))
    }

    /// Adds the partial sums into `out: [N, H]` (this chunk's tokens).
    pub fn add_items(&self, out: &mut [f32], partials: &[f32]) {
        let h = self.h;
        for (idx, &t) in self.items.iter().enumerate() {
            let dst = &mut out[t as usize * h..(t as usize + 1) * h];
            dst.iter_mut().zip(&partials[idx * h..(idx + 1) * h]).for_each(|(d, p)| *d += p);
        }
    }

    /// The item rows of `dy: [N, H]` (one per item, in send order).
    pub fn item_rows(&self, dy: &[f32]) -> Vec<f32> {
        let h = self.h;
        self.items.iter().flat_map(|&t| dy[t as usize * h..(t as usize + 1) * h].iter().copied()).collect()
    }

    /// Combine backward exchange: the sources' per-item `dy` rows → owners' `dyp` (grouped
    /// by local expert) and the source's `dw` per item and slot (`[items, K]`).
    pub fn combine_backward(&self, hy: &Hierarchy, dy_items: &[f32], yf: &[f32]) -> CommResult<(Vec<f32>, Vec<f32>)> {
        let (h, k) = (self.h, self.k);
        let dyi = self.to_forwarders_rail(hy, dy_items, h)?;
        let mut dyf = vec![0.0f32; self.fanout.len() * h];
        let mut dw = vec![0.0f32; self.n_received() * k];
        for (r, &(i, j)) in self.fanout.iter().enumerate() {
            let (i, j) = (i as usize, j as usize);
            let d = &dyi[i * h..(i + 1) * h];
            let wgt = self.weight(i, j);
            dyf[r * h..(r + 1) * h].iter_mut().zip(d).for_each(|(o, x)| *o = wgt * x);
            dw[i * k + j] = d.iter().zip(&yf[r * h..(r + 1) * h]).map(|(a, b)| a * b).sum();
        }
        let dw_items = self.to_sources(hy, &dw, k)?;
        Ok((self.to_owners(hy, &dyf)?, dw_items))
    }

    /// Adds per-item `dw` (`[items, K]`) into `dweights: [N, K]`.
    pub fn add_dweights(&self, dweights: &mut [f32], dw_items: &[f32]) {
        let k = self.k;
        for (idx, &t) in self.items.iter().enumerate() {
            let dst = &mut dweights[t as usize * k..(t as usize + 1) * k];
            dst.iter_mut().zip(&dw_items[idx * k..(idx + 1) * k]).for_each(|(d, x)| *d += x);
        }
    }

    /// Dispatch backward exchange: owners' `dxp` → per-item sums at the source.
    pub fn dispatch_backward(&self, hy: &Hierarchy, dxp: &[f32]) -> CommResult<Vec<f32>> {
        let h = self.h;
        let dxf = self.to_forwarders(hy, dxp)?;
        let mut per_item = vec![0.0f32; self.n_received() * h];
        for (r, &(i, _)) in self.fanout.iter().enumerate() {
            let dst = &mut per_item[i as usize * h..(i as usize + 1) * h];
            dst.iter_mut().zip(&dxf[r * h..(r + 1) * h]).for_each(|(d, x)| *d += x);
        }
        self.to_sources(hy, &per_item, h)
    }

    /// Choices per token.
    pub fn top_k(&self) -> usize {
        self.k
    }

    /// Ranks per node.
    pub fn ranks_per_node(&self) -> usize {
        self.l
    }
}
