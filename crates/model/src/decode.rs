//! The decoding pass: new tokens of several sequences through the whole model at once,
//! each attending to its own key/value cache.
//!
//! Rows of every sequence are stacked into one `[N, H]` batch, so the projections, the
//! router and the experts run one GEMM over all of them (a batch of decode steps costs
//! about what one costs while decoding is bound by reading the weights); only the
//! attention core runs per sequence, against that sequence's cache. A sequence may bring
//! one token (a decode step) or many (its prompt, or a chunk of it), in the same pass.

use crate::attention::{CachedCtx, Span};
use crate::kv_cache::SeqCache;
use crate::moe::layer::MoeCtx;
use crate::Model;
use crate::decode_weights::DecodeWeights;
use ultramoe_kernels::norm::rmsnorm_forward;

/// Which logits a cached pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// each sequence's last new row (what sampling the next token needs)
    Last,
    /// every new row
    All,
}

/// One sequence's part of a cached pass.
pub struct CachedInput<'a> {
    /// the new tokens (at least one)
    pub tokens: &'a [u32],
    /// the sequence's cache; it gains the tokens
    pub cache: &'a mut SeqCache,
}

/// The inputs of a cached pass over some of `items` (sequences, each holding a cache):
/// for each `(index, tokens)` of `picks`, in ascending index order, the item's cache
/// (through `cache_of`) with its new tokens.
pub fn pick_inputs<'a, T>(items: &'a mut [T], picks: impl IntoIterator<Item = (usize, &'a [u32])>, cache_of: impl Fn(&'a mut T) -> &'a mut SeqCache) -> Vec<CachedInput<'a>> {
    let mut rest = items.iter_mut().enumerate();
    picks
        .into_iter()
        .map(|(i, tokens)| {
            let item = rest.by_ref().find_map(|(j, x)| (j == i).then_some(x)).expect("picks ascend and are in range");
            CachedInput { tokens, cache: cache_of(item) }
        })
        .collect()
}

impl Model {
    /// Runs each sequence's new tokens after its cached prefix and appends them to its
    /// cache. Returns per sequence `[rows, V]` logits (`rows` as `which` says). The whole
    /// model must be held here (under expert parallelism every rank of the group makes
    /// the same call with its own sequences, possibly none).
    pub fn forward_cached(&self, dw: &DecodeWeights, inputs: &mut [CachedInput], which: LogitRows) -> Vec<Vec<f32>> {
        // Run on a worker of the thread pool: the pass's many short parallel sections
        // then start by work stealing instead of each waking the pool from outside and
        // blocking the caller (≈ 20–40% of a decode step on 2 cores). Not under expert
        // parallelism: a pass waiting for another rank in an exchange must not hold a
        // worker that rank (a thread of this process, maybe) needs to get there.
        if rayon::current_thread_index().is_none() && self.exchange.is_none() {
            return rayon::scope(|_| self.forward_cached(dw, inputs, which));
        }
        assert!(self.stage.holds_embedding() && self.stage.holds_head(), "a cached pass needs the whole model's stages");
        let mut spans = Vec::with_capacity(inputs.len());
        let mut positions = Vec::new();
        let mut ids = Vec::new();
        for inp in inputs.iter() {
            assert!(!inp.tokens.is_empty(), "a sequence brings at least one new token");
            assert_eq!(inp.cache.layers.len(), self.layers.len(), "the cache is shaped for this model");
            spans.push(Span { start: ids.len(), n: inp.tokens.len(), past: inp.cache.len });
            positions.extend(inp.cache.len..inp.cache.len + inp.tokens.len());
            ids.extend_from_slice(inp.tokens);
        }
        let moe = MoeCtx { exchange: self.exchange.as_deref(), chunks: 1, balance_loss: None, skew: 0.0, tp: None, batch: None, backward_pieces: 1 };
        let c = CachedCtx { spans: &spans, positions: &positions, rope: &self.rope, moe };
        let mut x = if ids.is_empty() { Vec::new() } else { self.embed_forward(&dw.w, &ids) };
        for (li, layer) in self.layers.iter().enumerate() {
            let mut caches: Vec<_> = inputs.iter_mut().map(|inp| &mut inp.cache.layers[li]).collect();
            let _p = ultramoe_kernels::profile::scope("decode.layer");
            x = layer.forward_cached(dw, x, &c, &mut caches);
        }
        for inp in inputs.iter_mut() {
            inp.cache.len += inp.tokens.len();
        }
        let h = self.cfg.hidden;
        let rows: Vec<usize> = match which {
            LogitRows::All => (0..ids.len()).collect(),
            LogitRows::Last => spans.iter().map(|s| s.start + s.n - 1).collect(),
        };
        let picked: Vec<f32> = rows.iter().flat_map(|&r| x[r * h..(r + 1) * h].iter().copied()).collect();
        let logits = self.logits_of(dw, &picked);
        let v = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(spans.len());
        let mut at = 0;
        for s in &spans {
            let take = if which == LogitRows::All { s.n } else { 1 };
            out.push(logits[at * v..(at + take) * v].to_vec());
            at += take;
        }
        out
    }

    /// Final norm and LM head of the rows `x: [n, H]` → `[n, V]`, nothing kept.
    pub fn logits_of(&self, dw: &DecodeWeights, x: &[f32]) -> Vec<f32> {
        let (h, v) = (self.cfg.hidden, self.cfg.vocab_size);
        let n = x.len() / h;
        let _p = ultramoe_kernels::profile::scope("decode.lm_head");
        let expect = "the last pipeline stage holds the final norm and the head";
        let (norm, head) = (self.final_norm.clone().expect(expect), self.lm_head.clone().expect(expect));
        let mut xn = vec![0.0; n * h];
        rmsnorm_forward(&mut xn, &mut vec![0.0; n], x, &dw.w[norm], h, self.cfg.rms_norm_eps);
        dw.linear(&head, &xn, n, h, v)
    }
}
