//! Where each routed expert lives under expert parallelism, with redundant copies.
//!
//! Each of the `P` expert-parallel ranks has `S = E/P + R` expert *slots*; slot `j` of
//! rank `r` is global slot `r·S + j`. A [`Placement`] says which logical expert every
//! slot holds, and which share of that expert's tokens it takes. Every expert has at
//! least one slot and never two on the same rank; a hot expert may hold several
//! (replicas), and a token choosing it goes to one of them, in proportion to their
//! shares (a smooth weighted round-robin, so the split is exact to a token). Replicas hold identical weights: their gradients are summed
//! over the copies before the optimizer step, so the model stays the same model and
//! placement changes nothing but which rank computes what.
//!
//! [`solve`] picks a placement for predicted per-expert loads, minimising the busiest
//! rank's load (EPLB-style): replica counts by repeatedly giving a spare slot to the
//! expert with the highest load per copy, then copies packed heaviest first onto the
//! least loaded rank that has a free slot and no copy of that expert yet. Ranks are then
//! relabelled and slots ordered to keep experts where they already are, so a migration
//! moves as little as possible. Finally each replicated expert's shares are
//! water-filled over its copies' ranks: with `O_r` the rest of rank `r`'s load, the
//! shares are `s_r = max(0, λ − O_r)` with `Σ s_r = load_e`, repeated over the experts
//! until the ranks settle (coordinate descent on the busiest rank's load).

/// The slot → expert map of one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// expert-parallel ranks `P`
    pub ranks: usize,
    /// slots per rank `S`
    pub slots_per_rank: usize,
    /// logical expert held by each global slot `r·S + j`
    pub slot_expert: Vec<usize>,
    /// fraction of its expert's tokens each slot takes (the copies of one expert sum to 1)
    pub share: Vec<f64>,
    /// per logical expert, its global slots in ascending order (the first is the
    /// *primary*: its rank saves the expert to checkpoints)
    replicas: Vec<Vec<usize>>,
}

impl Placement {
    /// Builds a placement from its slot map, checking the invariants (every expert
    /// placed, no rank holding an expert twice).
    pub fn new(ranks: usize, n_experts: usize, slot_expert: Vec<usize>) -> Result<Self, String> {
        if ranks == 0 || !slot_expert.len().is_multiple_of(ranks) {
            return Err(format!("{} slots cannot be split evenly over {ranks} ranks", slot_expert.len()));
        }
        let s = slot_expert.len() / ranks;
        let mut replicas = vec![Vec::new(); n_experts];
        for (slot, &e) in slot_expert.iter().enumerate() {
            let Some(list) = replicas.get_mut(e) else { return Err(format!("slot {slot} holds expert {e} of only {n_experts}")) };
            if list.iter().any(|&o| o / s == slot / s) {
                return Err(format!("rank {} holds expert {e} twice", slot / s));
            }
            list.push(slot);
        }
        if let Some(e) = replicas.iter().position(|r| r.is_empty()) {
            return Err(format!("expert {e} has no slot"));
        }
        let share = slot_expert.iter().map(|&e| 1.0 / replicas[e].len() as f64).collect();
        Ok(Placement { ranks, slots_per_rank: s, slot_expert, share, replicas })
    }

    /// Sets each slot's share of its expert's tokens (checked: non-negative, each
    /// expert's copies summing to 1).
    pub fn with_shares(mut self, share: Vec<f64>) -> Result<Self, String> {
        if share.len() != self.n_slots() || share.iter().any(|&x| !(0.0..=1.0).contains(&x)) {
            return Err(format!("{} shares in [0, 1] expected for {} slots", self.n_slots(), self.n_slots()));
        }
        for (e, reps) in self.replicas.iter().enumerate() {
            let sum: f64 = reps.iter().map(|&s| share[s]).sum();
            if (sum - 1.0).abs() > 1e-6 {
                return Err(format!("the shares of expert {e}'s copies sum to {sum}, not 1"));
            }
        }
        self.share = share;
        Ok(self)
    }

    /// The starting placement: rank `r` holds experts `r·E/P..(r+1)·E/P` in its first
    /// slots, and its `redundant` extra slots copy the experts that follow its block
    /// (wrapping), which live on other ranks. With `redundant = 0` slot ids equal expert
    /// ids, exactly the layout without placement.
    pub fn contiguous(n_experts: usize, ranks: usize, redundant: usize) -> Result<Self, String> {
        let per = n_experts / ranks.max(1);
        if per * ranks != n_experts {
            return Err(format!("{n_experts} experts cannot be split evenly over {ranks} expert-parallel ranks"));
        }
        if redundant > 0 && redundant + per > n_experts {
            return Err(format!(
                "{redundant} redundant slots per rank leave room for an expert twice on one rank (at most {} with {n_experts} experts over {ranks} ranks)",
                n_experts - per
            ));
        }
        let mut map = Vec::with_capacity(ranks * (per + redundant));
        for r in 0..ranks {
            map.extend(r * per..(r + 1) * per);
            map.extend((0..redundant).map(|j| ((r + 1) * per + j) % n_experts));
        }
        Placement::new(ranks, n_experts, map)
    }

    /// Logical experts `E`.
    pub fn n_experts(&self) -> usize {
        self.replicas.len()
    }

    /// Global slots `P·S`.
    pub fn n_slots(&self) -> usize {
        self.slot_expert.len()
    }

    /// True when slot ids are expert ids (no redundancy, contiguous blocks): routing needs
    /// no translation.
    pub fn is_identity(&self) -> bool {
        self.slot_expert.iter().enumerate().all(|(s, &e)| s == e)
    }

    /// Global slots holding expert `e`, primary first.
    pub fn replicas(&self, e: usize) -> &[usize] {
        &self.replicas[e]
    }

    /// The rank that saves expert `e` (holds its primary copy).
    pub fn owner(&self, e: usize) -> usize {
        self.replicas[e][0] / self.slots_per_rank
    }

    /// The experts held by rank `r`'s slots, in slot order.
    pub fn rank_experts(&self, r: usize) -> &[usize] {
        &self.slot_expert[r * self.slots_per_rank..(r + 1) * self.slots_per_rank]
    }

    /// Slot of rank `r` holding expert `e`, if any.
    pub fn slot_on(&self, r: usize, e: usize) -> Option<usize> {
        self.replicas[e].iter().copied().find(|s| s / self.slots_per_rank == r)
    }

    /// Slots of rank `r` that hold a non-primary copy (their gradient is not counted
    /// again in the gradient norm, and they are not saved).
    pub fn duplicate_slots(&self, r: usize) -> Vec<usize> {
        (0..self.slots_per_rank).filter(|&j| self.replicas[self.slot_expert[r * self.slots_per_rank + j]][0] != r * self.slots_per_rank + j).collect()
    }

    /// Translates top-k choices of logical experts into global slots. A replicated
    /// expert's choices are dealt to its copies by smooth weighted round-robin: each
    /// choice adds every copy's share to its credit and goes to the copy with the most
    /// credit, which then pays 1. After `n` choices a copy with share `s` has taken
    /// `s·n` of them, give or take one, on every source rank.
    pub fn route(&self, experts: &[u32]) -> Vec<u32> {
        let mut credit: Vec<Vec<f64>> = vec![vec![]; self.n_experts()];
        experts
            .iter()
            .map(|&e| {
                let reps = &self.replicas[e as usize];
                if reps.len() == 1 {
                    return reps[0] as u32;
                }
                let c = &mut credit[e as usize];
                c.resize(reps.len(), 0.0);
                let mut best = 0;
                for (i, &slot) in reps.iter().enumerate() {
                    c[i] += self.share[slot];
                    if c[i] > c[best] {
                        best = i;
                    }
                }
                c[best] -= 1.0;
                reps[best] as u32
            })
            .collect()
    }

    /// Predicted load per rank when expert `e` carries `load[e]`, split over its
    /// copies by their shares.
    pub fn rank_loads(&self, load: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.ranks];
        for (slot, &e) in self.slot_expert.iter().enumerate() {
            out[slot / self.slots_per_rank] += load[e] * self.share[slot];
        }
        out
    }

    /// Water-fills every replicated expert's shares over its copies' ranks for `load`
    /// (see the module docs), `rounds` passes over the experts.
    fn balance_shares(&mut self, load: &[f64], rounds: usize) {
        let s = self.slots_per_rank;
        let mut rank = self.rank_loads(load);
        let mut hot: Vec<usize> = (0..self.n_experts()).filter(|&e| self.replicas[e].len() > 1 && load[e] > 0.0).collect();
        hot.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
        for _ in 0..rounds {
            for &e in &hot {
                let reps = &self.replicas[e];
                let others: Vec<f64> = reps.iter().map(|&slot| rank[slot / s] - load[e] * self.share[slot]).collect();
                let level = water_level(&others, load[e]);
                for (&slot, &o) in reps.iter().zip(&others) {
                    let part = (level - o).max(0.0);
                    self.share[slot] = part / load[e];
                    rank[slot / s] = o + part;
                }
            }
        }
    }

    /// Slots whose expert differs from `old`'s: each one's weights and optimizer state
    /// must be fetched (from this rank's own copy when it had one).
    pub fn moved_slots(&self, old: &Placement) -> usize {
        self.fetches_per_rank(old).iter().sum()
    }

    /// Per rank, the slots whose expert it did not hold under `old` (what it must fetch
    /// from another rank to move there).
    pub fn fetches_per_rank(&self, old: &Placement) -> Vec<usize> {
        (0..self.ranks).map(|r| self.rank_experts(r).iter().filter(|&&e| old.slot_on(r, e).is_none()).count()).collect()
    }
}

/// The level `λ` with `Σ_r max(0, λ − others[r]) = amount`: pouring `amount` onto
/// columns of heights `others` fills them to `λ`.
fn water_level(others: &[f64], amount: f64) -> f64 {
    let mut h = others.to_vec();
    h.sort_by(|a, b| a.total_cmp(b));
    let mut sum = 0.0;
    for m in 0..h.len() {
        sum += h[m];
        let level = (amount + sum) / (m + 1) as f64;
        if m + 1 == h.len() || level <= h[m + 1] {
            return level;
        }
    }
    amount // no columns: unreachable for an expert with copies
}

/// `max / mean` of per-rank loads (1 = perfectly even).
pub fn imbalance(rank_loads: &[f64]) -> f64 {
    layers_imbalance(std::slice::from_ref(&rank_loads.to_vec()))
}

/// `Σ_layers max / Σ_layers mean` of per-rank loads, one list per layer: how much longer
/// the MoE part of a step takes than with perfectly even ranks (1 = even).
pub fn layers_imbalance(layers: &[Vec<f64>]) -> f64 {
    let (max, mean) = layers_load_sums(layers);
    if mean > 0.0 {
        max / mean
    } else {
        1.0
    }
}

/// `(Σ_layers max, Σ_layers mean)` of per-rank loads: the two sums of
/// [`layers_imbalance`], which pipeline stages holding different layers add up.
pub fn layers_load_sums(layers: &[Vec<f64>]) -> (f64, f64) {
    let (mut max, mut mean) = (0.0, 0.0);
    for l in layers {
        max += l.iter().cloned().fold(0.0, f64::max);
        mean += l.iter().sum::<f64>() / l.len().max(1) as f64;
    }
    (max, mean)
}

/// A placement of `load.len()` experts on `ranks` ranks of `slots_per_rank` slots that
/// minimises the busiest rank's predicted load (greedy; see the module docs), keeping
/// experts in `current`'s slots where it can.
pub fn solve(load: &[f64], current: &Placement) -> Placement {
    let (e, p, s) = (load.len(), current.ranks, current.slots_per_rank);
    // 1. Replica counts: each spare slot to the expert with the highest load per copy.
    let mut copies = vec![1usize; e];
    for _ in 0..p * s - e {
        let best = (0..e).filter(|&x| copies[x] < p).max_by(|&a, &b| {
            (load[a] / copies[a] as f64).total_cmp(&(load[b] / copies[b] as f64)).then(b.cmp(&a))
        });
        match best {
            Some(x) => copies[x] += 1,
            None => break,
        }
    }
    // Spare slots no expert can use (every expert on every rank) cannot happen when
    // S ≤ E, which `contiguous` guarantees.
    // 2. Pack copies heaviest first onto the least loaded rank with room and no copy yet.
    let mut items: Vec<(usize, f64)> = (0..e).flat_map(|x| std::iter::repeat_n((x, load[x] / copies[x] as f64), copies[x])).collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut held: Vec<Vec<usize>> = vec![Vec::with_capacity(s); p];
    let mut rank_load = vec![0.0f64; p];
    for (x, l) in items {
        let pick = (0..p)
            .filter(|&r| held[r].len() < s && !held[r].contains(&x))
            .min_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)));
        let r = match pick {
            Some(r) => r,
            None => {
                // The only free slots are on ranks that already hold `x`: move another
                // expert `y` from a rank without `x` to the free slot, and take its place.
                let free = (0..p).find(|&r| held[r].len() < s).expect("slots = copies");
                let (q, i) = (0..p)
                    .filter(|&q| !held[q].contains(&x))
                    .find_map(|q| held[q].iter().position(|y| !held[free].contains(y)).map(|i| (q, i)))
                    .expect("an expert to swap exists while S ≤ E");
                let y = held[q].remove(i);
                let ly = load[y] / copies[y] as f64;
                rank_load[q] -= ly;
                rank_load[free] += ly;
                held[free].push(y);
                q
            }
        };
        held[r].push(x);
        rank_load[r] += l;
    }
    // 3. Relabel ranks to keep experts in place: each new set goes to the free old rank
    // sharing the most experts with it (largest overlaps first).
    let mut pairs: Vec<(usize, usize, usize)> = Vec::with_capacity(p * p);
    for (n, set) in held.iter().enumerate() {
        for r in 0..p {
            let common = set.iter().filter(|&&x| current.slot_on(r, x).is_some()).count();
            pairs.push((common, n, r));
        }
    }
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let (mut rank_of, mut taken) = (vec![usize::MAX; p], vec![false; p]);
    for (_, n, r) in pairs {
        if rank_of[n] == usize::MAX && !taken[r] {
            rank_of[n] = r;
            taken[r] = true;
        }
    }
    // 4. Within a rank, an expert it already held keeps its slot; the rest fill the gaps.
    let mut map = vec![usize::MAX; p * s];
    for (n, set) in held.iter().enumerate() {
        let r = rank_of[n];
        let mut rest = vec![];
        for &x in set {
            match current.slot_on(r, x) {
                Some(slot) => map[slot] = x,
                None => rest.push(x),
            }
        }
        let mut free = (r * s..(r + 1) * s).filter(|&slot| map[slot] == usize::MAX).collect::<Vec<_>>().into_iter();
        for x in rest {
            map[free.next().expect("a rank holds S experts")] = x;
        }
    }
    let mut out = Placement::new(p, e, map).expect("the solver keeps the placement invariants");
    out.balance_shares(load, 32);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_without_redundancy_is_the_identity() {
        let p = Placement::contiguous(8, 4, 0).unwrap();
        assert!(p.is_identity());
        assert_eq!(p.route(&[0, 7, 3]), vec![0, 7, 3]);
        assert_eq!(p.owner(5), 2);
        let r = Placement::contiguous(8, 4, 1).unwrap();
        assert_eq!(r.rank_experts(0), &[0, 1, 2]);
        assert_eq!(r.rank_experts(3), &[6, 7, 0]);
        assert_eq!(r.replicas(0), &[0, 11]);
        // expert 6 sits first in rank 2's spare slot (8), so rank 3's slot 0 (9) is a copy
        assert_eq!(r.duplicate_slots(3), vec![0, 2]);
        assert!(Placement::contiguous(8, 4, 7).is_err());
        assert!(Placement::new(2, 3, vec![0, 0, 1, 2]).is_err(), "expert twice on a rank");
        assert!(Placement::new(2, 3, vec![0, 1, 1, 0]).is_err(), "expert 2 unplaced");
    }

    #[test]
    fn replicated_choices_follow_the_shares() {
        let r = Placement::contiguous(4, 2, 1).unwrap(); // rank 0: 0 1 2, rank 1: 2 3 0
        assert_eq!(r.route(&[0, 0, 0, 1]), vec![0, 5, 0, 1]);
        // expert 0: a quarter to slot 0, three quarters to slot 5
        let r = r.with_shares(vec![0.25, 1.0, 0.5, 0.5, 1.0, 0.75]).unwrap();
        let slots = r.route(&[0; 400]);
        assert_eq!(slots.iter().filter(|&&s| s == 0).count(), 100);
        assert_eq!(slots.iter().filter(|&&s| s == 5).count(), 300);
        assert!(Placement::contiguous(4, 2, 1).unwrap().with_shares(vec![0.5; 6]).is_err(), "expert 1's shares sum to 0.5");
    }

    #[test]
    fn two_hot_experts_fill_every_rank_evenly() {
        // Two experts take all the tokens, six take none: 12 slots on 4 ranks leave 6
        // for the hot pair, 3 copies each — even only with unequal shares.
        let load = [768.0, 768.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let p = solve(&load, &Placement::contiguous(8, 4, 1).unwrap());
        assert!(imbalance(&p.rank_loads(&load)) < 1.001, "{:?}", p.rank_loads(&load));
    }

    #[test]
    fn solver_balances_a_zipf_load() {
        // load ∝ 1/(e+1), 16 experts on 4 ranks with 2 spare slots each
        let load: Vec<f64> = (0..16).map(|e| 1000.0 / (e as f64 + 1.0)).collect();
        let start = Placement::contiguous(16, 4, 2).unwrap();
        let before = imbalance(&Placement::contiguous(16, 4, 0).unwrap().rank_loads(&load));
        let p = solve(&load, &start);
        let after = imbalance(&p.rank_loads(&load));
        assert!(before > 2.0, "{before}");
        assert!(after < 1.05, "{after}");
        assert!(p.replicas(0).len() >= 3, "the hottest expert is replicated");
        // Solving again for the same load moves nothing.
        let again = solve(&load, &p);
        assert_eq!(again.moved_slots(&p), 0);
        // Invariants held by construction (Placement::new checked them).
        assert_eq!(p.n_slots(), 24);
    }

    #[test]
    fn solver_handles_tight_slots() {
        // S = E: every rank holds every expert, nothing to decide.
        let load = vec![5.0, 1.0, 1.0];
        let p = solve(&load, &Placement::contiguous(3, 3, 2).unwrap());
        assert!((0..3).all(|r| { let mut v = p.rank_experts(r).to_vec(); v.sort(); v == [0, 1, 2] }));
        // Random loads on many shapes keep the invariants.
        let mut seed = 7u64;
        for &(e, ranks, red) in &[(8, 4, 1), (8, 2, 3), (12, 4, 2), (6, 3, 4), (64, 8, 4)] {
            let load: Vec<f64> = (0..e)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 33) % 1000) as f64
                })
                .collect();
            let p = solve(&load, &Placement::contiguous(e, ranks, red).unwrap());
            let flat = imbalance(&Placement::contiguous(e, ranks, 0).unwrap().rank_loads(&load));
            assert!(imbalance(&p.rank_loads(&load)) <= flat + 1e-9);
        }
    }
}
