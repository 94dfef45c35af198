//! Moving experts between expert-parallel ranks, and keeping replicated experts one
//! expert.
//!
//! A migration ([`migrate`]) is one all-to-all over the expert-parallel group: a slot
//! whose new expert its rank did not hold receives that expert's weights (and optimizer
//! moments: any number of buffers laid out like the weights) from the expert's primary
//! holder; a slot whose expert stays on its rank takes it from the rank's own old copy.
//! Slot tensors are then renamed, so checkpoints keep naming logical experts.
//!
//! Replicas of one expert see different tokens, so their gradients differ; summing them
//! over the copies ([`sum_replica_grads`]) before the optimizer step gives every copy
//! the whole expert's gradient: `∂L/∂W_e = Σ_copies ∂L/∂W_(e,copy)`. With identical
//! weights, gradients and moments, every copy takes the identical update.

use super::layer::MoeLayer;
use super::placement::Placement;
use crate::params::ParamLayout;
use std::ops::Range;
use ultramoe_dist::{CommResult, ProcessGroup};

/// Floats one expert occupies in one buffer (gate/up and down).
fn expert_floats(layer: &MoeLayer) -> usize {
    layer.experts.slot_ranges(0).iter().map(|r| r.len()).sum()
}

/// Moves `layer`'s experts to placement `new` in every buffer of `bufs` (collective over
/// the expert-parallel group `g`; every rank passes the same `new`). Returns the floats
/// this rank received.
pub fn migrate(layer: &mut MoeLayer, layout: &mut ParamLayout, new: Placement, bufs: &mut [&mut [f32]], g: &dyn ProcessGroup) -> CommResult<usize> {
    let old = layer.placement.clone();
    let (me, p, s) = (g.rank(), g.size(), old.slots_per_rank);
    assert_eq!((new.ranks, new.slots_per_rank), (p, s), "a migration keeps the slot grid");
    let one = expert_floats(layer);
    let per = one * bufs.len();
    // Slots that fetch their expert from another rank: (destination rank, slot, expert).
    let fetches: Vec<(usize, usize, usize)> = (0..p * s)
        .map(|slot| (slot / s, slot % s, new.slot_expert[slot]))
        .filter(|&(d, _, e)| old.slot_on(d, e).is_none())
        .collect();
    let mut send = vec![];
    let mut send_counts = vec![0; p];
    let mut recv_counts = vec![0; p];
    for &(d, _, e) in &fetches {
        let src = old.owner(e);
        if src == me {
            let j = old.slot_on(me, e).expect("the owner holds its expert") % s;
            for b in bufs.iter() {
                for r in layer.experts.slot_ranges(j) {
                    send.extend_from_slice(&b[r]);
                }
            }
            send_counts[d] += per;
        }
        if d == me {
            recv_counts[src] += per;
        }
    }
    let received = g.all_to_all_v_known_f32(&send, &send_counts, &recv_counts)?;
    // Where each source's block starts in `received` (blocks in source-rank order, each
    // in this rank's slot order, as the senders iterate).
    let mut cursor: Vec<usize> = recv_counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect();
    // Old contents of this rank's slots, before any is overwritten.
    let ranges: Vec<[Range<usize>; 2]> = (0..s).map(|j| layer.experts.slot_ranges(j)).collect();
    let before: Vec<Vec<Vec<f32>>> =
        bufs.iter().map(|b| ranges.iter().map(|[gu, dn]| [&b[gu.clone()], &b[dn.clone()]].concat()).collect()).collect();
    for (j, slot_ranges) in ranges.iter().enumerate() {
        let e = new.slot_expert[me * s + j];
        match old.slot_on(me, e) {
            Some(slot) => {
                for (b, old_slots) in bufs.iter_mut().zip(&before) {
                    write_slot(b, slot_ranges, &old_slots[slot % s]);
                }
            }
            None => {
                let src = old.owner(e);
                for b in bufs.iter_mut() {
                    write_slot(b, slot_ranges, &received[cursor[src]..cursor[src] + one]);
                    cursor[src] += one;
                }
            }
        }
    }
    // Rename the slot tensors and record who holds and saves each expert now.
    let names = layer.experts.names.clone();
    let mut pairs = vec![];
    for j in 0..s {
        let (a, b) = (old.slot_expert[me * s + j], new.slot_expert[me * s + j]);
        if a != b {
            pairs.extend((0..3).map(|w| (names.tensor(a, w), names.tensor(b, w))));
        }
    }
    layout.rename(&pairs);
    for e in 0..new.n_experts() {
        for w in 0..3 {
            layout.set_holder(&names.tensor(e, w), new.slot_on(me, e).is_some(), new.owner(e));
        }
    }
    layer.placement = new;
    Ok(recv_counts.iter().sum())
}

/// Writes one expert's `[gate/up, down]` floats into a slot's two ranges.
fn write_slot(buf: &mut [f32], ranges: &[Range<usize>; 2], src: &[f32]) {
    let (gu, dn) = src.split_at(ranges[0].len());
    buf[ranges[0].clone()].copy_from_slice(gu);
    buf[ranges[1].clone()].copy_from_slice(dn);
}

/// Sums the gradients of every replicated expert over its copies, for all `layers` in
/// one all-reduce over the expert-parallel group `g`. Ranks without a copy add zeros,
/// and the sum runs in rank order, so every copy receives bitwise the same gradient.
pub fn sum_replica_grads(layers: &[&MoeLayer], grads: &mut [f32], g: &dyn ProcessGroup) -> CommResult<()> {
    let me = g.rank();
    // (layer, expert, this rank's slot) for every replicated expert, in a fixed order.
    let mut entries: Vec<(usize, usize, Option<usize>)> = vec![];
    for (li, l) in layers.iter().enumerate() {
        let pl = &l.placement;
        for e in (0..pl.n_experts()).filter(|&e| pl.replicas(e).len() > 1) {
            entries.push((li, e, pl.slot_on(me, e).map(|s| s % pl.slots_per_rank)));
        }
    }
    if entries.is_empty() {
        return Ok(());
    }
    let per: Vec<usize> = layers.iter().map(|l| expert_floats(l)).collect();
    let mut buf = vec![0.0f32; entries.iter().map(|&(li, _, _)| per[li]).sum()];
    let mut at = 0;
    for &(li, _, slot) in &entries {
        if let Some(j) = slot {
            let mut o = at;
            for r in layers[li].experts.slot_ranges(j) {
                buf[o..o + r.len()].copy_from_slice(&grads[r.clone()]);
                o += r.len();
            }
        }
        at += per[li];
    }
    g.all_reduce_f32(&mut buf)?;
    let mut at = 0;
    for &(li, _, slot) in &entries {
        if let Some(j) = slot {
            let [gu, dn] = layers[li].experts.slot_ranges(j);
            write_slot(grads, &[gu, dn], &buf[at..at + per[li]]);
        }
        at += per[li];
    }
    Ok(())
}

/// Flat-buffer ranges of this rank's non-primary copies (rank `me`): counted once in the
/// gradient norm through their primary, and not saved.
pub fn duplicate_ranges(layer: &MoeLayer, me: usize) -> Vec<Range<usize>> {
    layer.placement.duplicate_slots(me).into_iter().flat_map(|j| layer.experts.slot_ranges(j)).collect()
}
