//! Which decoder layers a pipeline rank holds.
//!
//! With `pp` pipeline ranks and `vpp` model chunks per rank there are `pp·vpp` virtual
//! stages, each a contiguous range of decoder layers in model order. Virtual stage
//! `v = c·pp + r` is chunk `c` of rank `r` (Megatron's interleaving), so consecutive
//! layers go round the ranks `vpp` times. The embedding belongs to virtual stage 0
//! (rank 0), the final norm, head and loss to the last one (rank `pp − 1`).
//!
//! By default every virtual stage gets `L/(pp·vpp)` layers (which must divide); a split
//! can be given per rank (`pp` counts, each rank's count divided evenly over its `vpp`
//! chunks) or per virtual stage (`pp·vpp` counts) — the reference systems give the
//! first and last stages fewer layers, since those also hold the embedding and the head.

use std::ops::Range;

/// A pipeline split of the decoder layers, seen from one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// this rank's pipeline index
    pub rank: usize,
    /// pipeline ranks
    pub ranks: usize,
    /// model chunks per rank
    pub vpp: usize,
    /// the layers of every virtual stage, in model order
    pub virtual_layers: Vec<Range<usize>>,
}

impl Stage {
    /// One rank holding every layer (no pipeline).
    #[allow(clippy::single_range_in_vec_init)]
    pub fn whole(n_layers: usize) -> Stage {
        Stage { rank: 0, ranks: 1, vpp: 1, virtual_layers: vec![0..n_layers] }
    }

    /// Rank `rank`'s view of `n_layers` split over `pp` ranks × `vpp` chunks, evenly or
    /// as `counts` says (per rank, or per virtual stage). `Err` names what does not fit.
    pub fn split(n_layers: usize, pp: usize, vpp: usize, rank: usize, counts: Option<&[usize]>) -> Result<Stage, String> {
        let virtual_stages = pp * vpp;
        if pp == 0 || vpp == 0 {
            return Err("pp and vpp must be at least 1".into());
        }
        if rank >= pp {
            return Err(format!("pipeline rank {rank} of {pp}"));
        }
        let per_virtual: Vec<usize> = match counts {
            None => {
                if !n_layers.is_multiple_of(virtual_stages) {
                    let hint = balanced(n_layers, pp).iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
                    let what = if vpp > 1 { format!("{pp} stages × {vpp} chunks") } else { format!("{pp} stages") };
                    return Err(format!("{n_layers} layers do not split evenly over {what}; give the layers of each stage with --pp-layers (e.g. {hint})"));
                }
                vec![n_layers / virtual_stages; virtual_stages]
            }
            Some(c) if c.len() == virtual_stages => c.to_vec(),
            Some(c) if c.len() == pp => {
                // Each rank's count over its chunks: virtual stage c·pp + r gets rank r's
                // share of chunk c.
                let mut v = vec![0; virtual_stages];
                for (r, &n) in c.iter().enumerate() {
                    if !n.is_multiple_of(vpp) {
                        return Err(format!("stage {r}'s {n} layers do not split over {vpp} chunks (give {virtual_stages} counts, one per chunk)"));
                    }
                    for ch in 0..vpp {
                        v[ch * pp + r] = n / vpp;
                    }
                }
                v
            }
            Some(c) => {
                let want = if vpp > 1 { format!("{pp} (one per stage) or {virtual_stages} (one per chunk)") } else { pp.to_string() };
                return Err(format!("{} counts for {pp} stages; expected {want}", c.len()));
            }
        };
        if let Some(i) = per_virtual.iter().position(|&c| c == 0) {
            return Err(format!("virtual stage {i} would hold no layer (every stage needs at least one)"));
        }
        let total: usize = per_virtual.iter().sum();
        if total != n_layers {
            return Err(format!("the counts add up to {total} layers, but the model has {n_layers}"));
        }
        let mut at = 0;
        let virtual_layers = per_virtual
            .iter()
            .map(|&c| {
                at += c;
                at - c..at
            })
            .collect();
        Ok(Stage { rank, ranks: pp, vpp, virtual_layers })
    }

    /// The same split seen from pipeline rank `rank`.
    pub fn for_rank(&self, rank: usize) -> Stage {
        Stage { rank, ..self.clone() }
    }

    /// Layers of each of this rank's chunks, chunk 0 first.
    pub fn chunks(&self) -> Vec<Range<usize>> {
        (0..self.vpp).map(|c| self.virtual_layers[c * self.ranks + self.rank].clone()).collect()
    }

    /// Virtual stage of this rank's chunk `c`.
    pub fn virtual_stage(&self, c: usize) -> usize {
        c * self.ranks + self.rank
    }

    /// Virtual stages in the pipeline.
    pub fn virtual_stages(&self) -> usize {
        self.virtual_layers.len()
    }

    /// The pipeline rank that holds decoder layer `layer`.
    pub fn holder(&self, layer: usize) -> usize {
        let v = self.virtual_layers.iter().position(|r| r.contains(&layer)).expect("a layer of the model");
        v % self.ranks
    }

    /// The pipeline rank that holds the embedding (virtual stage 0).
    pub fn embedding_holder(&self) -> usize {
        0
    }

    /// The pipeline rank that holds the final norm, head and loss (the last virtual
    /// stage).
    pub fn head_holder(&self) -> usize {
        (self.virtual_stages() - 1) % self.ranks
    }

    /// True when this rank holds layer `layer`.
    pub fn holds(&self, layer: usize) -> bool {
        self.holder(layer) == self.rank
    }

    /// True when this rank holds the embedding.
    pub fn holds_embedding(&self) -> bool {
        self.embedding_holder() == self.rank
    }

    /// True when this rank holds the head.
    pub fn holds_head(&self) -> bool {
        self.head_holder() == self.rank
    }

    /// Layers per virtual stage, e.g. `3,4,4,3`.
    pub fn describe(&self) -> String {
        self.virtual_layers.iter().map(|r| r.len().to_string()).collect::<Vec<_>>().join(",")
    }
}

/// `n` layers over `pp` stages as evenly as possible, the extra layers in the middle
/// stages (the first and last also hold the embedding and the head).
pub fn balanced(n: usize, pp: usize) -> Vec<usize> {
    let pp = pp.max(1);
    let mut c = vec![n / pp; pp];
    let extra = n % pp;
    // middle stages first: 1, 2, …, pp−2, then the ends
    let order: Vec<usize> = (1..pp.saturating_sub(1)).chain([0, pp - 1]).collect();
    for &i in order.iter().take(extra) {
        c[i] += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_uneven_and_interleaved_splits() {
        let s = Stage::split(8, 2, 2, 1, None).unwrap();
        assert_eq!(s.virtual_layers, vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(s.chunks(), vec![2..4, 6..8]);
        assert_eq!((s.holder(5), s.holds(7), s.head_holder()), (0, true, 1));
        let u = Stage::split(14, 4, 1, 0, Some(&[3, 4, 4, 3])).unwrap();
        assert_eq!(u.chunks(), vec![0..3]);
        assert_eq!(u.for_rank(3).chunks(), vec![11..14]);
        let per_rank = Stage::split(8, 2, 2, 0, Some(&[2, 6])).unwrap();
        assert_eq!(per_rank.virtual_layers, vec![0..1, 1..4, 4..5, 5..8]);
        assert!(Stage::split(3, 2, 1, 0, None).unwrap_err().contains("--pp-layers (e.g. 2,1)"));
        assert!(Stage::split(4, 2, 1, 0, Some(&[1, 2])).unwrap_err().contains("add up to 3"));
        assert!(Stage::split(4, 2, 1, 0, Some(&[4, 0])).unwrap_err().contains("no layer"));
        assert!(Stage::split(6, 2, 2, 0, Some(&[3, 3])).unwrap_err().contains("do not split over 2 chunks"));
        assert_eq!(balanced(14, 4), vec![3, 4, 4, 3]);
        assert_eq!(balanced(3, 2), vec![2, 1]);
    }
}
