//! Examples and documents as token sequences, and packing them into fixed `[B, T]`
//! batches.
//!
//! A math example is `BOS question SEP answer EOS`, the answer in model digit order.
//! Several examples share a row (no example is split across rows; the tail is padding).
//! Only answer tokens are trained on: a position's target is the next token when that
//! token belongs to the answer (through `EOS`), else ignored. Text documents are packed
//! back to back instead, a document continuing in the next row when it does not fit.
//! Either way each token's position within its example or document goes with the batch
//! (document masks), unless the run asked for rows that attend across examples.

use super::corpus::Corpus;
use super::jsonl::QaPair;
use std::sync::Arc;
use super::math::{generate_in, to_model_digits, Mix, Split};
use super::tokenizer::{encode, normalize_question, BOS, EOS, PAD, SEP};
use ultramoe_kernels::loss::IGNORE;
use ultramoe_model::init::Rng;

/// The prompt tokens for a question: `BOS question SEP`.
pub fn prompt_tokens(question: &str) -> Vec<u32> {
    let mut t = vec![BOS];
    t.extend(encode(&normalize_question(question)));
    t.push(SEP);
    t
}

/// Tokens and targets of one training example.
pub fn example_tokens(question: &str, worked: &str) -> (Vec<u32>, Vec<i32>) {
    let mut toks = prompt_tokens(question);
    let answer_start = toks.len();
    toks.extend(encode(&to_model_digits(worked)));
    toks.push(EOS);
    let targets = (0..toks.len())
        .map(|p| if p + 1 >= answer_start && p + 1 < toks.len() { toks[p + 1] as i32 } else { IGNORE })
        .collect();
    (toks, targets)
}

/// Where examples come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// freshly generated problems (training split only)
    Generated {
        /// kind mix
        mix: Mix,
    },
    /// a user dataset, visited in a seeded shuffled order, epoch after epoch
    Dataset {
        /// the problems
        items: Vec<QaPair>,
    },
    /// uniformly random token ids, every position trained (throughput benchmarks)
    Random {
        /// vocabulary to draw from
        vocab: usize,
    },
    /// token documents, packed back to back (a document longer than what is left of a
    /// row continues in the next row), each position's target the document's next
    /// token where that token is trained
    Documents {
        /// the documents
        corpus: Arc<Corpus>,
        /// which of them this stream visits (indices into the corpus)
        docs: Arc<Vec<u32>>,
        /// visit them in a seeded shuffled order, epoch after epoch (else in order: the
        /// held-out stream)
        shuffle: bool,
    },
}

impl Source {
    fn shuffled_len(&self) -> Option<usize> {
        match self {
            Source::Dataset { items } => Some(items.len()),
            Source::Documents { docs, shuffle: true, .. } => Some(docs.len()),
            _ => None,
        }
    }
}

/// A stream of packed batches. Its whole position is a [`StreamPos`], so a resumed run
/// sees exactly the batches it would have seen.
#[derive(Clone, Debug)]
pub struct Batcher {
    /// source of examples
    pub source: Source,
    rng: Rng,
    order: Vec<usize>,
    cursor: usize,
    shuffle_state: u64,
    /// tokens of the current document already placed (documents)
    offset: usize,
    /// completed passes over the data
    epoch: u64,
    /// an example drawn but not yet placed, and the position from before it was drawn
    pending: Option<((Vec<u32>, Vec<i32>), StreamPos)>,
    /// give every token's position within its document, so attention stays inside
    /// documents (else rows are single sequences and packed examples see each other)
    pub doc_masks: bool,
    /// tokens placed from each of the corpus's files (documents)
    seen: Vec<u64>,
}

/// A stream position: generator state, dataset cursor, and the generator state the
/// current epoch's order was shuffled from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPos {
    /// generator state
    pub rng: u64,
    /// next index into the shuffled order
    pub cursor: usize,
    /// generator state at the last shuffle
    pub shuffle: u64,
    /// tokens of the current document already placed (documents)
    #[serde(default)]
    pub offset: usize,
    /// completed passes over the data
    #[serde(default)]
    pub epoch: u64,
}

/// A packed batch.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B·T]` token ids
    pub ids: Vec<u32>,
    /// `[B·T]` next-token targets (`IGNORE` where untrained)
    pub targets: Vec<i32>,
    /// `[B·T]` each token's position within its document (0 where one starts), when
    /// documents are packed with masks: attention stays inside each document and
    /// positions restart (`None`: each row one sequence, examples attend across)
    pub positions: Option<Vec<u32>>,
    /// rows
    pub b: usize,
    /// sequence length
    pub t: usize,
}

impl Batch {
    /// Positions with a target (not `IGNORE`).
    pub fn trained_tokens(&self) -> usize {
        self.targets.iter().filter(|&&x| x != IGNORE).count()
    }
}

impl Batcher {
    /// A stream from a source and seed (document masks on).
    pub fn new(source: Source, seed: u64) -> Self {
        let files = match &source {
            Source::Documents { corpus, .. } => corpus.files.len(),
            _ => 0,
        };
        let mut b = Batcher {
            source,
            rng: Rng::new(seed),
            order: vec![],
            cursor: 0,
            shuffle_state: 0,
            offset: 0,
            epoch: 0,
            pending: None,
            doc_masks: true,
            seen: vec![0; files],
        };
        b.reshuffle();
        b
    }

    fn raw_position(&self) -> StreamPos {
        StreamPos { rng: self.rng.state(), cursor: self.cursor, shuffle: self.shuffle_state, offset: self.offset, epoch: self.epoch }
    }

    /// Tokens placed so far from each of the corpus's files (documents; empty for
    /// other sources).
    pub fn seen(&self) -> &[u64] {
        &self.seen
    }

    /// Restores what [`Batcher::seen`] said at a checkpoint (a list of another length,
    /// from another corpus, is ignored).
    pub fn restore_seen(&mut self, seen: &[u64]) {
        if seen.len() == self.seen.len() {
            self.seen.copy_from_slice(seen);
        }
    }

    /// The position, for checkpoints: an example drawn but not yet placed counts as
    /// not drawn.
    pub fn position(&self) -> StreamPos {
        match &self.pending {
            Some((_, pos)) => *pos,
            None => self.raw_position(),
        }
    }

    /// Restores a position saved by [`Batcher::position`].
    pub fn restore(&mut self, pos: StreamPos) {
        // Rebuild the epoch's order from the generator state it was shuffled from.
        self.rng = Rng::from_state(pos.shuffle);
        self.reshuffle();
        self.rng = Rng::from_state(pos.rng);
        self.cursor = pos.cursor;
        self.offset = pos.offset;
        self.epoch = pos.epoch;
        self.pending = None;
    }

    fn reshuffle(&mut self) {
        self.shuffle_state = self.rng.state();
        if let Some(n) = self.source.shuffled_len() {
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..order.len()).rev() {
                let j = self.rng.range(0, i as i64) as usize;
                order.swap(i, j);
            }
            self.order = order;
            self.cursor = 0;
        }
    }

    fn next_example(&mut self) -> ((Vec<u32>, Vec<i32>), StreamPos) {
        if let Some(p) = self.pending.take() {
            return p;
        }
        let before = self.raw_position();
        match &self.source {
            Source::Generated { mix } => {
                let mix = mix.clone();
                let kind = mix.sample(&mut self.rng);
                let p = generate_in(&mut self.rng, kind, Split::Train);
                (example_tokens(&p.question, &p.worked), before)
            }
            Source::Random { .. } | Source::Documents { .. } => unreachable!("random and document batches are drawn whole"),
            Source::Dataset { .. } => {
                if self.cursor >= self.order.len() {
                    self.epoch += 1;
                    self.reshuffle();
                }
                let Source::Dataset { items } = &self.source else { unreachable!() };
                let qa = &items[self.order[self.cursor]];
                self.cursor += 1;
                (example_tokens(&qa.question, &qa.answer), before)
            }
        }
    }

    /// The next `[b, t]` batch. Examples longer than `t` are cut (their tail untrained).
    pub fn next_batch(&mut self, b: usize, t: usize) -> Batch {
        if let Source::Random { vocab } = self.source {
            let ids: Vec<u32> = (0..b * t).map(|_| (self.rng.next_u64() % vocab as u64) as u32).collect();
            let targets = ultramoe_model::shifted_targets(&ids, t);
            return Batch { ids, targets, positions: None, b, t };
        }
        if let Source::Documents { .. } = self.source {
            return self.next_documents(b, t);
        }
        let mut ids = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        for _ in 0..b {
            let mut used = 0;
            loop {
                let ((toks, tg), before) = self.next_example();
                let fits = used + toks.len() <= t;
                if !fits && used > 0 {
                    self.pending = Some(((toks, tg), before));
                    break;
                }
                let take = toks.len().min(t - used);
                ids.extend_from_slice(&toks[..take]);
                targets.extend_from_slice(&tg[..take]);
                positions.extend(0..take as u32);
                if take < toks.len() {
                    // cut example: its last kept position has no valid next token
                    *targets.last_mut().unwrap() = IGNORE;
                }
                used += take;
                if used == t {
                    break;
                }
            }
            ids.resize(ids.len() + (t - used), PAD);
            targets.resize(targets.len() + (t - used), IGNORE);
            // (the padding is a document of its own)
            positions.extend(0..(t - used) as u32);
        }
        Batch { ids, targets, positions: self.doc_masks.then_some(positions), b, t }
    }

    /// The next `[b, t]` batch of packed documents: each row filled from the current
    /// document onward, a document that does not fit continuing in the next row (its
    /// rest a new document there, positions from 0). A position's target is the
    /// document's next token, wherever that lands, when it is trained.
    fn next_documents(&mut self, b: usize, t: usize) -> Batch {
        let Source::Documents { corpus, docs, shuffle } = &self.source else { unreachable!("documents") };
        let (corpus, docs, shuffle) = (corpus.clone(), docs.clone(), *shuffle);
        let mut ids = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        while ids.len() < b * t {
            if self.cursor >= docs.len() {
                self.epoch += 1;
                if shuffle {
                    self.reshuffle();
                }
                self.cursor = 0;
            }
            let d = docs[if shuffle { self.order[self.cursor] } else { self.cursor }] as usize;
            let doc = corpus.doc(d);
            let row_left = t - ids.len() % t;
            let take = (doc.tokens.len() - self.offset).min(row_left);
            let piece = self.offset..self.offset + take;
            ids.extend_from_slice(&doc.tokens[piece.clone()]);
            targets.extend(piece.map(|i| match doc.tokens.get(i + 1) {
                Some(&next) if doc.mask.is_none_or(|m| m[i + 1] != 0) => next as i32,
                _ => IGNORE,
            }));
            positions.extend(0..take as u32);
            if let Some(s) = self.seen.get_mut(corpus.file_of(d)) {
                *s += take as u64;
            }
            self.offset += take;
            if self.offset >= doc.tokens.len() {
                (self.cursor, self.offset) = (self.cursor + 1, 0);
            }
        }
        Batch { ids, targets, positions: self.doc_masks.then_some(positions), b, t }
    }

    /// Completed passes over the data.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cover_exactly_the_answer() {
        let (toks, tg) = example_tokens("12 + 7", "12+7=19");
        // BOS 1 2 + 7 SEP | 2 1 + 7 = 9 1 EOS
        assert_eq!(toks.len(), 6 + 7 + 1);
        let trained: Vec<u32> = tg.iter().filter(|&&x| x != IGNORE).map(|&x| x as u32).collect();
        assert_eq!(&trained[..], &toks[6..]);
    }

    #[test]
    fn resumed_stream_repeats_exactly() {
        let src = Source::Generated { mix: Mix::default() };
        let mut a = Batcher::new(src.clone(), 9);
        a.next_batch(4, 64);
        let pos = a.position();
        let expect = a.next_batch(4, 64);
        let mut b = Batcher::new(src, 9);
        b.restore(pos);
        let got = b.next_batch(4, 64);
        assert_eq!(expect.ids, got.ids);
        // A dataset across several epochs.
        let items: Vec<QaPair> = (0..7).map(|i| QaPair { question: format!("{i}+1"), answer: format!("{}", i + 1), line: i + 1 }).collect();
        let src = Source::Dataset { items };
        let mut a = Batcher::new(src.clone(), 3);
        for _ in 0..5 {
            a.next_batch(2, 16);
        }
        let pos = a.position();
        let expect: Vec<Vec<u32>> = (0..4).map(|_| a.next_batch(2, 16).ids).collect();
        let mut b = Batcher::new(src, 3);
        b.restore(pos);
        let got: Vec<Vec<u32>> = (0..4).map(|_| b.next_batch(2, 16).ids).collect();
        assert_eq!(expect, got);
    }
}
