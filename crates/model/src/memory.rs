//! What a training step holds in memory, predicted from the model's shapes before it
//! runs, each part attributed to an owner (layer and kind).
//!
//! Static: weights, gradients and optimizer moments (`4·P` bytes each per float kept).
//! Saved activations: exactly the buffers each layer's forward keeps for its backward
//! (one rank; dropless routing sends every token to `K` experts, so the routed rows are
//! `R = N·K` whatever the routing):
//!
//! ```text
//! decoder   x, xn₁, h, xn₂: 4·N·H      rstd₁, rstd₂: 2·N      sandwich norms: 2·(N·H + N)
//! GQA       q, o: N·nh·d   k, v: N·nkv·d   probs: B·nh·T²   (+ q/k norms: raw copies, N·(nh+nkv) rstd)
//! MLA       q_a, q_a normed: 2·N·q_lora (+N)   c_kv, normed: 2·N·kv_lora (+N)
//!           q, k: N·nh·d_qk   v, o: N·nh·d_v   probs: B·nh·T²
//! dense     gate/up N·2I, activation N·I
//! MoE       scores N·E, weights and choices 2·N·K, plan 2·R, inputs R·H, gate/up R·2I,
//!           activation R·I, outputs R·H, shared experts as dense
//! head      final x, normed x: 2·N·H, rstd N; logits N·V only without head chunks
//!           (training forms them `rows × V` at a time in the backward: `rows·(V + H)`)
//! ```
//!
//! A layer's policy ([`crate::policy`]) takes parts out: `norm` the normed copies,
//! `swiglu` the SwiGLU outputs, `attention` the probabilities and core output, `qkv` the
//! projections (MLA then keeps its rotary key, `N·d_rope`), `experts` a MoE layer's
//! routed rows and outputs `2·R·H` (one rank only), `ffn` the whole FFN block's set,
//! `swap` moves what is left to
//! the swap file (a MoE layer's routing and plans stay), `full` keeps only the input
//! `N·H`. Whatever was taken out is back while the layer's backward runs.
//!
//! The peak is the largest of these moments:
//!
//! ```text
//! end of forward    Σ_j kept_j + head (logits included, or one chunk's), + N·H as the
//!                   head's backward forms the normed input's gradient beside the
//!                   logits' gradient
//! forward of i      Σ_{j<i} kept_j + whole_i + swapped_{i−1}     (its write may still run)
//!                   + the FFN's output as it forms, N·H (MoE with shared experts: 2·N·H)
//! backward of i     Σ_{j<i} kept_j + swapped_{i−1} (prefetched below it)
//!                   + max(FFN phase_i, attention phase_i) + 2·N·H (dx, residual grad)
//!                   (+ N·H with sandwich norms: the gradient through a post-norm)
//!                   + head without logits
//! FFN phase         kept_i (all of it back from the swap file) + the FFN's rebuilt part
//!                   (xn₂, SwiGLU outputs, routed rows, or the whole block) + the FFN's
//!                   temporaries
//! attention phase   the norms' set − xn₂ + the attention's whole set (latents, q/k/v
//!                   rebuilt; the probabilities only when kept) + its temporaries
//! ```
//!
//! with temporaries MoE: `R'·max(H + 3I, 2H + 2I)` (the output's gradient, then the
//! activation's and the gate/up's; the activation's freed, then the input's; on one
//! rank the top MoE layer of a model chunk works through its routed rows in pieces of
//! at most `R' = ⌈R/4⌉`; otherwise `R' = R`), dense: `3·N·I`;
//! attention: the q/k/v gradients and their fused copy (the score gradients are formed
//! block by block, never whole). A layer recomputed whole holds its whole set in the FFN
//! phase. A swap file adds its staging buffer. Kernel workspaces and thread pools hold a
//! few megabytes more for the whole run; they are measured, not predicted
//! ([`runtime_bytes`]). The `gemm` crate packs operands into buffers of its own inside
//! large products: bounded for the head's weight gradient over a chunk (`rows·(V + H)`,
//! with a 4k vocabulary 2.1 MB over a 128-row chunk), not predicted elsewhere (8.4 MB
//! for the whole logits' 2k rows; a few hundred kilobytes inside a layer's products).

use crate::decoder::{AttnBlock, DecoderLayer, FfnBlock};
use crate::model::Model;
use crate::pass::PassOptions;
use crate::policy::{LayerPolicy, MemoryOp};
use ultramoe_schedule::Action;
use crate::swap::SwapRates;

/// A predicted memory footprint, in bytes.
#[derive(Clone, Debug, Default)]
pub struct MemoryPlan {
    /// (owner, bytes) held in memory: static parts first, then saved activations per layer
    pub items: Vec<(String, usize)>,
    /// (owner, bytes) in the swap file between forward and backward
    pub swapped: Vec<(String, usize)>,
    /// weights, gradients, optimizer moments
    pub static_bytes: usize,
    /// activations one micro-batch's forward keeps in memory
    pub activation_bytes: usize,
    /// activations in the swap file
    pub swapped_bytes: usize,
    /// temporaries beyond the kept activations at the peak (rebuilt and prefetched sets,
    /// backward buffers, the swap staging buffer)
    pub transient_bytes: usize,
    /// kernel workspaces and thread pools (measured by [`runtime_bytes`], or 0)
    pub runtime_bytes: usize,
    /// activations other micro-batches held at the peak (pipeline schedules keep
    /// several in flight)
    pub in_flight_bytes: usize,
    /// the most micro-batches in flight at once on this rank
    pub micro_batches_in_flight: usize,
    /// predicted peak
    pub peak_bytes: usize,
}

/// Who keeps a part of a layer's activations; named only when a plan is printed (the
/// policy search evaluates thousands of plans and reads their totals alone).
#[derive(Clone, Copy)]
enum Owner {
    /// a layer recomputed whole: its input
    Input(usize),
    /// a part of a layer (`routing`: what stays when the rest is swapped) under `policy`
    Part { layer: usize, part: &'static str, routing: bool, policy: LayerPolicy },
}

impl Owner {
    fn name(&self) -> String {
        match *self {
            Owner::Input(id) => format!("layer {id} input (recomputed in backward)"),
            Owner::Part { layer, part, routing, policy } => {
                let tag = if policy.keeps_all() { String::new() } else { format!(" [{}]", policy.describe()) };
                format!("layer {layer} {part}{}{tag}", if routing { " routing" } else { "" })
            }
        }
    }
}

/// One layer's bytes under its policy.
struct LayerBytes {
    /// kept between forward and backward: (owner, bytes)
    kept: Vec<(Owner, usize)>,
    /// in the swap file
    swapped: usize,
    /// the whole set, as the layer's forward makes it
    whole: usize,
    /// held during its backward: the larger of the FFN's phase and the attention's (the
    /// FFN's set dropped), each with its temporaries
    backward: usize,
}

impl LayerBytes {
    fn kept_total(&self) -> usize {
        self.kept.iter().map(|k| k.1).sum()
    }
}

/// A block's floats: the whole saved set, and what each op class frees.
#[derive(Default)]
struct Block {
    whole: usize,
    norm: usize,
    swiglu: usize,
    attention: usize,
    qkv: usize,
    experts: usize,
    /// the whole set goes under `ffn` (the feed-forward block)
    rerun: bool,
    /// floats that stay in memory when the layer swaps
    unswappable: usize,
}

impl Block {
    fn kept(&self, p: &LayerPolicy) -> usize {
        if p.ffn && self.rerun {
            return 0;
        }
        let off = |on: bool, f: usize| if on { f } else { 0 };
        self.whole - off(p.norm, self.norm) - off(p.swiglu, self.swiglu) - off(p.attention, self.attention) - off(p.qkv, self.qkv)
            - off(p.experts, self.experts)
    }

    fn unswappable(&self, p: &LayerPolicy) -> usize {
        if p.ffn && self.rerun {
            0
        } else {
            self.unswappable
        }
    }
}

/// Floats of a dense (or shared-expert) SwiGLU MLP over `rows`: (whole, act).
fn mlp_floats(rows: usize, inter: usize) -> (usize, usize) {
    (3 * rows * inter, rows * inter)
}

fn norm_block(l: &DecoderLayer, n: usize) -> Block {
    let h = l.hidden;
    let sandwich = if l.sandwich.is_some() { 2 * (n * h + n) } else { 0 };
    Block { whole: 4 * n * h + 2 * n + sandwich, norm: 2 * n * h, ..Default::default() }
}

/// The attention block's floats and its backward temporaries (floats), with `qkv` on or
/// off (MLA keeps its rotary key only for `qkv`).
fn attention_block(l: &DecoderLayer, b: usize, t: usize, qkv: bool) -> (Block, usize) {
    let n = b * t;
    match &l.attn {
        AttnBlock::Gqa(a) => {
            let (qw, kw) = (a.nh * a.hd, a.nkv * a.hd);
            let qk_norm = if a.q_norm.is_some() { n * (qw + kw) + n * (a.nh + a.nkv) } else { 0 };
            let probs = b * a.nh * t * t;
            let proj = n * qw + 2 * n * kw + qk_norm;
            let core = probs + n * qw;
            (Block { whole: proj + core, attention: probs, qkv: proj, ..Default::default() }, n * (qw + 2 * kw) * 2)
        }
        AttnBlock::Mla(a) => {
            let dqk = a.nope + a.rope_dim;
            let (qa, qa_n) = if a.q_lora > 0 { (n * a.q_lora + n, n * a.q_lora) } else { (0, 0) };
            let (ckv, ckv_n) = (n * a.kv_lora + n, n * a.kv_lora);
            let q = n * a.nh * dqk;
            let (k, v) = (n * a.nh * dqk, n * a.nh * a.dv);
            let kpe = if qkv { n * a.rope_dim } else { 0 };
            let probs = b * a.nh * t * t;
            let core = probs + n * a.nh * a.dv;
            let rebuilt_qkv = k + v + if a.q_lora > 0 { q } else { 0 };
            let block = Block {
                whole: qa + qa_n + ckv + ckv_n + q + k + v + kpe + core,
                norm: qa_n + ckv_n,
                attention: probs,
                qkv: rebuilt_qkv,
                ..Default::default()
            };
            (block, n * a.nh * (2 * dqk + a.dv) * 2)
        }
    }
}

/// The feed-forward block's floats, its backward temporaries (floats) and its name.
fn ffn_block(l: &DecoderLayer, n: usize, self_local: bool, pieces: usize) -> (Block, usize, &'static str) {
    let h = l.hidden;
    match &l.ffn {
        FfnBlock::Dense(m) => {
            let (whole, act) = mlp_floats(n, m.inter);
            (Block { whole, swiglu: act, rerun: true, ..Default::default() }, n * 3 * m.inter, "dense FFN")
        }
        FfnBlock::Moe(m) => {
            let (e, k, ie) = (m.placement.n_experts(), m.router.spec.top_k, m.experts.inter);
            let r = n * k;
            let (shared, shared_act) = m.shared.as_ref().map_or((0, 0), |s| mlp_floats(n, s.inter));
            let routing = n * e + 2 * n * k + 2 * r;
            // On one rank the routed rows and expert outputs can be rebuilt locally.
            let local = self_local;
            let block = Block {
                whole: routing + r * (2 * h + 3 * ie) + shared,
                swiglu: r * ie + shared_act,
                experts: if local { 2 * r * h } else { 0 },
                rerun: true,
                unswappable: routing,
                ..Default::default()
            };
            // One rank may work through the routed rows in pieces (`Model::moe_backward_pieces`).
            let tmp_rows = if local { crate::moe::experts::backward_piece_rows(r, pieces) } else { r };
            // dyp, dact then dgu (dact dropped), then dxp: `R'·max(H + 3I, 2H + 2I)`.
            (block, tmp_rows * (h + (3 * ie).max(h + 2 * ie)), "MoE")
        }
    }
}

impl Model {
    /// One layer's bytes over `b × t` tokens under policy `p`.
    fn layer_bytes(&self, i: usize, b: usize, t: usize, p: &LayerPolicy) -> LayerBytes {
        let l = &self.layers[i];
        let n = b * t;
        let norms = norm_block(l, n);
        let (attn, attn_tmp) = attention_block(l, b, t, p.qkv && !p.full);
        let (ffn, ffn_tmp, kind) = ffn_block(l, n, self.ep.is_none(), self.moe_backward_pieces(i));
        // The attention probabilities are never made whole under `attention`, nor in the
        // first forward of a layer recomputed whole.
        let probs = if p.attention { attn.attention } else { 0 };
        let total = norms.whole + attn.whole + ffn.whole;
        // As its forward ends the layer also holds the FFN's output while it forms
        // (`N·H`), and a MoE layer's shared experts' output before it is added (`N·H`).
        let shared_out = matches!(&l.ffn, FfnBlock::Moe(m) if m.shared.is_some());
        let out = n * l.hidden * (1 + usize::from(shared_out));
        let whole = 4 * (total + out - if p.full { attn.attention } else { probs });
        // Backward: the FFN's part is rebuilt first (xn₂, SwiGLU outputs); then the FFN's
        // set and xn₂ go and the attention's part is rebuilt (xn₁, latents, q/k/v).
        let xn = n * l.hidden;
        let (ffn_phase, attention_phase) = if p.full {
            let rerun = 4 * (total - probs);
            (rerun, rerun - 4 * (ffn.whole + xn))
        } else {
            // FFN phase: xn₂ back, xn₁ still out; attention phase: xn₂ gone, xn₁ back.
            let ffn_phase = norms.kept(p) + if p.norm { xn } else { 0 } + attn.kept(p) + ffn.whole;
            let attention_phase = norms.whole - xn + attn.whole - probs;
            (4 * ffn_phase, 4 * attention_phase)
        };
        // Sandwich norms: each block's backward also holds the gradient through its
        // post-norm (`N·H`) beside the layer's output gradient.
        let post_norm_grad = if l.sandwich.is_some() { 4 * xn } else { 0 };
        let backward = post_norm_grad + (ffn_phase + 4 * ffn_tmp).max(attention_phase + 4 * attn_tmp);
        let id = self.layer_ids[i];
        if p.full {
            let kept = vec![(Owner::Input(id), 4 * n * l.hidden)];
            return LayerBytes { kept, swapped: 0, whole, backward };
        }
        let policy = *p;
        let parts = [("norms and residuals", &norms), ("attention", &attn), (kind, &ffn)];
        if p.swap {
            let swapped = parts.iter().map(|(_, blk)| 4 * (blk.kept(p) - blk.unswappable(p))).sum();
            let kept = parts
                .iter()
                .filter(|(_, blk)| blk.unswappable(p) > 0)
                .map(|(part, blk)| (Owner::Part { layer: id, part, routing: true, policy }, 4 * blk.unswappable(p)))
                .collect();
            return LayerBytes { kept, swapped, whole, backward };
        }
        let kept = parts.iter().map(|(part, blk)| (Owner::Part { layer: id, part, routing: false, policy }, 4 * blk.kept(p))).collect();
        LayerBytes { kept, swapped: 0, whole, backward }
    }

    /// Predicts the memory of a training step over a micro-batch of `b × t` tokens with
    /// `moments` optimizer floats per parameter (AdamW: 2), under `opts` (policy,
    /// swapped moments), one micro-batch at a time through this rank's layers.
    /// `runtime` is what [`runtime_bytes`] measured (0 to leave it out).
    pub fn memory_plan(&self, b: usize, t: usize, moments: usize, runtime: usize, opts: &PassOptions) -> MemoryPlan {
        let chunks = self.stage.vpp;
        let mut actions: Vec<Action> = (0..chunks).map(|chunk| Action::Forward { mb: 0, chunk }).collect();
        actions.extend((0..chunks).rev().map(|chunk| Action::Backward { mb: 0, chunk }));
        self.memory_plan_scheduled(b, t, moments, runtime, opts, &actions)
    }

    /// [`Model::memory_plan`] for this rank running `actions` (its list of a pipeline
    /// schedule): the activations of every micro-batch in flight are held at once, and
    /// the peak is the largest moment of any action (see the module docs) on top of what
    /// the other micro-batches hold then. A stage that is not the last sends its
    /// output (and, above the first, its input gradient) as a copy: `N·H` more at the end
    /// of a pass.
    pub fn memory_plan_scheduled(&self, b: usize, t: usize, moments: usize, runtime: usize, opts: &PassOptions, actions: &[Action]) -> MemoryPlan {
        self.plan_scheduled(b, t, moments, runtime, opts, actions, true)
    }

    /// [`Model::memory_plan_scheduled`]; `named`: list the owners (`items`, `swapped`),
    /// which the policy search, evaluating thousands of plans for their totals, skips.
    #[allow(clippy::too_many_arguments)]
    fn plan_scheduled(&self, b: usize, t: usize, moments: usize, runtime: usize, opts: &PassOptions, actions: &[Action], named: bool) -> MemoryPlan {
        let n = b * t;
        let h = self.cfg.hidden;
        let p = self.layout.total;
        let mut items = vec![("weights".to_string(), 4 * p), ("gradients".to_string(), 4 * p)];
        let moment_bytes = 4 * moments * p;
        let mut swapped = vec![];
        let swap_moments = opts.swap_moments;
        if swap_moments {
            swapped.push(("optimizer moments".to_string(), moment_bytes));
        } else {
            items.push(("optimizer moments".to_string(), moment_bytes));
        }
        let static_bytes = 4 * 2 * p + if swap_moments { 0 } else { moment_bytes };
        let layers: Vec<LayerBytes> = (0..self.layers.len()).map(|i| self.layer_bytes(i, b, t, &opts.layer(self.layer_ids[i]))).collect();
        let head = self.stage.holds_head();
        // The head keeps its input, normed input and rstd; with chunks (training's
        // default) its backward forms `rows × V` logits at a time (and their `rows × H`
        // input gradient before it joins the whole), otherwise the forward keeps all
        // `N × V` logits until the backward turns them into their gradient.
        // The weight gradient's product `dW += dlogitsᵀ·xn` over a chunk lets the `gemm`
        // crate pack its operands into buffers of its own: a `kc × V` block of dlogitsᵀ
        // (prepacked whole when V is at most two of its row blocks, which depends on
        // the CPU's caches) and a `kc × H` block of xn, with kc the chunk's rows (at most
        // `HEAD_CHUNK_MAX_ROWS`): at most `rows·(V + H)` floats; the bound is planned.
        // (Under tensor parallelism each rank forms its vocabulary slice, in the
        // backward.)
        let v = self.vocab_slice().1;
        let (head_kept, logits, head_chunk) = match (head, self.head_chunk_rows(opts, n)) {
            (false, _) => (0, 0, 0),
            (true, 0) => (4 * (2 * n * h + n), 4 * n * v, 0),
            // (a last row on its own joins the chunk before it)
            (true, rows) => (4 * (2 * n * h + n), 0, 4 * (rows + usize::from(n > rows && n % rows == 1)) * (v + h)),
        };
        let xh = 4 * n * h;
        let last_chunk = self.stage.vpp - 1;
        let chunk_ranges: Vec<std::ops::Range<usize>> = (0..self.stage.vpp).map(|c| self.chunk_layers(c)).collect();
        // What one micro-batch's pass through chunk c keeps until its backward.
        let hold = |c: usize| {
            let kept: usize = layers[chunk_ranges[c].clone()].iter().map(LayerBytes::kept_total).sum();
            kept + if c == last_chunk { head_kept + logits } else { 0 }
        };
        // Swapped moments are out from the first layer's forward of the step to the
        // bottom layer's backward of its last backward pass (read back during it when
        // there is a layer above it in that chunk).
        let first_forward = actions.iter().position(|a| matches!(a, Action::Forward { .. }));
        let last_backward = actions.iter().rposition(|a| matches!(a, Action::Backward { .. }));
        let mut held = 0usize;
        let mut in_flight = 0usize;
        let (mut dynamic, mut at_peak_others, mut most_in_flight) = (0usize, 0usize, 0usize);
        let mut note = |moment: usize, others: usize, dynamic: &mut usize| {
            if moment > *dynamic {
                *dynamic = moment;
                at_peak_others = others;
            }
        };
        for (k, a) in actions.iter().enumerate() {
            match *a {
                Action::Forward { chunk, .. } => {
                    let others = held;
                    let mut below = held;
                    for (j, i) in chunk_ranges[chunk].clone().enumerate() {
                        let l = &layers[i];
                        let neighbour = if j > 0 { layers[i - 1].swapped } else { 0 };
                        let moments_out = if Some(k) == first_forward && j == 0 && swap_moments { moment_bytes } else { 0 };
                        note(below + l.whole + neighbour + moments_out, others, &mut dynamic);
                        below += l.kept_total();
                    }
                    if chunk == last_chunk && head {
                        below += head_kept + logits;
                    } else {
                        // the output and its copy on its way to the next stage
                        note(below + 2 * xh, others, &mut dynamic);
                    }
                    held = below;
                    in_flight += 1;
                    most_in_flight = most_in_flight.max(in_flight);
                }
                Action::Backward { chunk, .. } => {
                    held -= hold(chunk);
                    in_flight -= 1;
                    let base = held;
                    let kept: Vec<usize> = layers[chunk_ranges[chunk].clone()].iter().map(LayerBytes::kept_total).collect();
                    let all: usize = kept.iter().sum();
                    if chunk == last_chunk && head {
                        // the head's backward forms the normed input's gradient beside
                        // the logits' gradient (in place of the logits, or a chunk of it);
                        // over a chunk the GEMM's packed copies of the weight gradient's
                        // operands take at most as much again (see `head_chunk`)
                        note(base + all + head_kept + logits + 2 * head_chunk + xh, base, &mut dynamic);
                    } else {
                        // the output's gradient, received
                        note(base + all + xh, base, &mut dynamic);
                    }
                    let range = chunk_ranges[chunk].clone();
                    for (j, i) in range.clone().enumerate().rev() {
                        let l = &layers[i];
                        let below = base + kept[..j].iter().sum::<usize>();
                        let neighbour = if j > 0 { layers[i - 1].swapped } else { 0 };
                        let moments_in = if Some(k) == last_backward && j == 0 && swap_moments && range.len() > 1 { moment_bytes } else { 0 };
                        note(below + neighbour + l.backward + 2 * xh + moments_in, base, &mut dynamic);
                    }
                    if self.stage.virtual_stage(chunk) > 0 {
                        // the input's gradient and its copy on its way to the stage below
                        note(base + 2 * xh, base, &mut dynamic);
                    }
                }
            }
        }
        // The optimizer step holds the moments again, and none of the step's activations.
        if swap_moments {
            dynamic = dynamic.max(moment_bytes);
        }
        let act = layers.iter().map(LayerBytes::kept_total).sum::<usize>() + head_kept + logits;
        let layers_swap = layers.iter().any(|l| l.swapped > 0);
        for (i, l) in layers.into_iter().enumerate() {
            if l.swapped > 0 {
                swapped.push((if named { format!("layer {}", self.layer_ids[i]) } else { String::new() }, l.swapped));
            }
            if named {
                items.extend(l.kept.into_iter().map(|(owner, bytes)| (owner.name(), bytes)));
            }
        }
        if head {
            items.push((if logits > 0 { "final norm and logits" } else { "final norm (logits formed in chunks)" }.to_string(), head_kept + logits));
        }
        if at_peak_others > 0 {
            items.push((format!("other micro-batches in flight (up to {most_in_flight} at once)"), at_peak_others));
        }
        // One staging buffer per swap file: the forward's, the moments'.
        let staging = crate::swap::STAGING_BYTES * (usize::from(layers_swap) + usize::from(swap_moments));
        if staging > 0 {
            items.push(("swap staging buffer".to_string(), staging));
        }
        if runtime > 0 {
            items.push(("kernel workspaces and thread pools (measured)".to_string(), runtime));
        }
        let held_at_peak = act.max(at_peak_others);
        MemoryPlan {
            items,
            swapped_bytes: swapped.iter().map(|s| s.1).sum(),
            swapped,
            static_bytes,
            activation_bytes: act,
            in_flight_bytes: at_peak_others,
            micro_batches_in_flight: most_in_flight,
            transient_bytes: dynamic.saturating_sub(held_at_peak) + staging,
            runtime_bytes: runtime,
            peak_bytes: static_bytes + dynamic + staging + runtime,
        }
    }

    /// The largest micro-batch of `t`-token rows, up to `limit`, whose step fits `budget`
    /// bytes under `opts`, running `actions` (`None`: not even one row).
    #[allow(clippy::too_many_arguments)]
    pub fn largest_micro_batch(&self, t: usize, moments: usize, runtime: usize, budget: usize, limit: usize, opts: &PassOptions, actions: &[Action]) -> Option<usize> {
        (1..=limit).take_while(|&b| self.memory_plan_scheduled(b, t, moments, runtime, opts, actions).peak_bytes <= budget).last()
    }

    /// Estimated extra seconds per micro-batch of running `b × t` tokens through this
    /// rank's layers under `opts` (policy, swapped moments) rather than keeping
    /// everything (see [`CostRates`]).
    pub fn policy_cost(&self, b: usize, t: usize, opts: &PassOptions, rates: &CostRates) -> f64 {
        let n = b * t;
        let forward: Vec<f64> = (0..self.layers.len()).map(|i| self.layer_forward_seconds(i, b, t, rates)).collect();
        let mut cost = 0.0;
        if let (true, Some(s)) = (opts.swap_moments, &rates.swap) {
            // AdamW's two moments: the write hides behind the first layer's forward, the
            // read behind the bottom layer's backward (≈ twice its forward).
            let bottom = forward.first().copied().unwrap_or(0.0);
            cost += s.exposed_seconds(4.0 * 2.0 * self.layout.total as f64, bottom);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = &opts.layer(self.layer_ids[i]);
            if p.full {
                cost += forward[i] + if p.attention { self.attention_scores_flops(i, b, t) / rates.attention_flops } else { 0.0 };
                continue;
            }
            let norms = norm_block(l, n);
            let (attn, _) = attention_block(l, b, t, p.qkv);
            let (ffn, _, _) = ffn_block(l, n, self.ep.is_none(), 1);
            // Elementwise rebuilds stream their input and output once: RMSNorm reads the
            // input and writes the copy (a fresh buffer: its first touch costs about one
            // more half pass); SwiGLU reads 2 floats and writes 1 per output, with an exp
            // (counted as one more pass).
            if p.norm {
                cost += 12.0 * (norms.norm + attn.norm) as f64 / rates.bytes;
            }
            if p.swiglu && !p.ffn {
                cost += 4.0 * 4.0 * (ffn.swiglu) as f64 / rates.bytes;
            }
            if p.attention {
                // Q·Kᵀ and the softmax again, inside the core's backward, less the
                // probabilities the forward no longer writes out and the backward no
                // longer reads (what is left is at least a tenth of the recomputation).
                let scores = self.attention_scores_flops(i, b, t) / rates.attention_flops;
                cost += (scores - 8.0 * attn.attention as f64 / rates.bytes).max(0.1 * scores);
            }
            if p.qkv {
                // The projections' GEMMs, and q/k/v written out again (RoPE, head split).
                cost += self.qkv_flops(i, n) / rates.flops + 4.0 * attn.qkv as f64 / rates.bytes;
            }
            if p.ffn {
                // The block's forward again: its GEMMs and its saved set written anew.
                cost += 2.0 * (n * self.ffn_weights(i)) as f64 / rates.flops + 4.0 * ffn.whole as f64 / rates.bytes;
            } else if let (true, FfnBlock::Moe(m)) = (p.experts && ffn.experts > 0, &l.ffn) {
                // The permutation copies R·H floats in and out; the down-projection is
                // 2·R·I·H FLOPs.
                let r = n * m.router.spec.top_k;
                cost += 8.0 * (r * l.hidden) as f64 / rates.bytes + 2.0 * (r * m.experts.inter * l.hidden) as f64 / rates.flops;
            }
            if p.swap {
                // Writes run behind the next layer's forward, reads (prefetched) behind
                // the backward of the layer above; the top layer hides neither.
                let bytes = self.layer_bytes(i, b, t, p).swapped as f64;
                let above = forward.get(i + 1).copied().unwrap_or(0.0);
                // (without a usable swap directory the op is never chosen; priced high)
                cost += rates.swap.map_or(1e9, |s| s.exposed_seconds(bytes, above));
            }
        }
        cost
    }

    /// (heads, d_qk, d_v, keys per query) of layer `i`'s attention core (causal, in
    /// 64-row blocks: a row block sees (T + 64)/2 keys on average).
    fn attention_dims(&self, i: usize, t: usize) -> (f64, f64, f64, f64) {
        let (nh, dqk, dv) = match &self.layers[i].attn {
            AttnBlock::Gqa(a) => (a.nh, a.hd, a.hd),
            AttnBlock::Mla(a) => (a.nh, a.nope + a.rope_dim, a.dv),
        };
        (nh as f64, dqk as f64, dv as f64, (t as f64 + 64.0).min(2.0 * t as f64) / 2.0)
    }

    /// FLOPs of layer `i`'s attention core forward: `2·B·nh·T·keys·(d_qk + d_v)`.
    fn attention_core_flops(&self, i: usize, b: usize, t: usize) -> f64 {
        let (nh, dqk, dv, keys) = self.attention_dims(i, t);
        2.0 * (b * t) as f64 * nh * keys * (dqk + dv)
    }

    /// FLOPs of layer `i`'s attention scores alone: `2·B·nh·T·keys·d_qk`.
    fn attention_scores_flops(&self, i: usize, b: usize, t: usize) -> f64 {
        let (nh, dqk, _, keys) = self.attention_dims(i, t);
        2.0 * (b * t) as f64 * nh * keys * dqk
    }

    /// FLOPs of layer `i`'s q/k/v projections (MLA: the up-projections) over `n` tokens.
    fn qkv_flops(&self, i: usize, n: usize) -> f64 {
        let per_token = match &self.layers[i].attn {
            AttnBlock::Gqa(a) => a.hidden * (a.nh + 2 * a.nkv) * a.hd,
            AttnBlock::Mla(a) => a.q_lora * a.nh * (a.nope + a.rope_dim) + a.kv_lora * a.nh * (a.nope + a.dv),
        };
        2.0 * (n * per_token) as f64
    }

    /// Weights each token meets in layer `i`'s feed-forward block (router included).
    fn ffn_weights(&self, i: usize) -> usize {
        let l = &self.layers[i];
        let h = l.hidden;
        match &l.ffn {
            FfnBlock::Dense(m) => 3 * h * m.inter,
            FfnBlock::Moe(m) => {
                m.router.spec.top_k * 3 * h * m.experts.inter + m.shared.as_ref().map_or(0, |s| 3 * h * s.inter) + h * m.placement.n_experts()
            }
        }
    }

    /// Seconds of layer `i`'s forward over `b × t` tokens: its GEMMs (active weights,
    /// `2·N` FLOPs each) and attention core.
    fn layer_forward_seconds(&self, i: usize, b: usize, t: usize, rates: &CostRates) -> f64 {
        let l = &self.layers[i];
        let n = b * t;
        let h = l.hidden;
        let attn_weights = match &l.attn {
            AttnBlock::Gqa(a) => h * (a.nh + 2 * a.nkv) * a.hd + a.nh * a.hd * h,
            AttnBlock::Mla(a) => {
                let q_in = if a.q_lora > 0 { a.q_lora } else { a.nh * (a.nope + a.rope_dim) };
                h * (q_in + a.kv_lora + a.rope_dim) + a.nh * a.dv * h
            }
        };
        2.0 * (n * (attn_weights + self.ffn_weights(i))) as f64 / rates.flops
            + self.qkv_flops(i, n) / rates.flops
            + self.attention_core_flops(i, b, t) / rates.attention_flops
    }

    /// The cheapest memory options (by [`Model::policy_cost`]) under which a step over
    /// `b × t` tokens running `actions` fits `budget` bytes, starting from `opts`.
    /// A greedy fill adds the change with the largest peak reduction per second of cost
    /// (the kept activations when no change lowers the peak) — an op on a held layer, or
    /// the optimizer moments to the swap file — until the step fits, then drops every
    /// chosen change that is not needed, dearest first. Greedy covers are not optimal, so
    /// fills run (the reduction counted in full, and only up to what is still over the
    /// budget: the first favours large changes, the second small ones; each from the
    /// start and from the moments in the swap file), the cheapest kept. Then exchanges:
    /// dearest first, each chosen change is taken out and forbidden and the step filled
    /// again from there, kept when cheaper — passes until one finds nothing, at most
    /// three (a fill from a nearly fitting step adds a few changes, so a pass costs a
    /// few fills: 8 s for a 61-layer model on a Zen 5). A pure function of its
    /// arguments: `Ok` with the options chosen, `Err` with the most frugal ones tried
    /// when nothing fits.
    #[allow(clippy::too_many_arguments)]
    pub fn choose_policy(
        &self,
        b: usize,
        t: usize,
        moments: usize,
        runtime: usize,
        budget: usize,
        rates: &CostRates,
        opts: &PassOptions,
        actions: &[Action],
    ) -> Result<PassOptions, PassOptions> {
        let mut start = opts.clone();
        start.policy.resize(self.cfg.n_layers.max(start.policy.len()), LayerPolicy::default());
        let search = PolicySearch { model: self, b, t, moments, runtime, budget, rates, actions, start };
        let cost = |c: &PassOptions| search.cost(c);
        // Fills from the start, and from the moments already in the swap file (one
        // large change a greedy fill weighs badly against the small ones it needs too).
        let mut starts = vec![search.start.clone()];
        if !search.start.swap_moments && rates.swap.is_some() {
            starts.push(PassOptions { swap_moments: true, ..search.start.clone() });
        }
        let mut fits: Vec<PassOptions> = vec![];
        let mut frugal = None;
        for from in &starts {
            for capped in [false, true] {
                match search.fill(from.clone(), capped, None) {
                    Ok(c) => fits.push(c),
                    Err(c) => frugal = frugal.or(Some(c)),
                }
            }
        }
        let Some(mut chosen) = fits.into_iter().min_by(|a, c| cost(a).total_cmp(&cost(c))) else {
            return Err(frugal.expect("at least one fill ran"));
        };
        // Exchanges, until a pass finds none (at most a few passes).
        for _pass in 0..3 {
            let before = cost(&chosen);
            for change in search.dearest_first(&chosen) {
                if !search.changes(&chosen).contains(&change) {
                    continue;
                }
                for capped in [false, true] {
                    if let Ok(trial) = search.fill(search.without(&chosen, change), capped, Some(change)) {
                        if cost(&trial) < cost(&chosen) - 1e-12 {
                            chosen = trial;
                        }
                    }
                }
            }
            if cost(&chosen) >= before - 1e-12 {
                break;
            }
        }
        Ok(chosen)
    }
}

/// One change a policy search can make: an op on a layer, or the moments to the swap file.
type PolicyChange = Option<(usize, MemoryOp)>;

/// The fixed inputs of [`Model::choose_policy`]'s search.
struct PolicySearch<'a> {
    model: &'a Model,
    b: usize,
    t: usize,
    moments: usize,
    runtime: usize,
    budget: usize,
    rates: &'a CostRates,
    actions: &'a [Action],
    start: PassOptions,
}

impl PolicySearch<'_> {
    /// (peak, kept activations) of a candidate.
    fn memory(&self, c: &PassOptions) -> (usize, usize) {
        let plan = self.model.plan_scheduled(self.b, self.t, self.moments, self.runtime, c, self.actions, false);
        (plan.peak_bytes, plan.activation_bytes)
    }

    fn cost(&self, c: &PassOptions) -> f64 {
        self.model.policy_cost(self.b, self.t, c, self.rates)
    }

    fn with(&self, policy: &[LayerPolicy], swap_moments: bool) -> PassOptions {
        PassOptions { policy: policy.to_vec(), swap_moments, ..self.start.clone() }
    }

    /// The changes `c` makes beyond the start (the ones the caller asked for stay).
    fn changes(&self, c: &PassOptions) -> Vec<PolicyChange> {
        let mut out = vec![];
        for &l in &self.model.layer_ids {
            for op in MemoryOp::ALL.into_iter().filter(|&op| c.policy[l].has(op) && !self.start.policy[l].has(op)) {
                out.push(Some((l, op)));
            }
        }
        if c.swap_moments && !self.start.swap_moments {
            out.push(None);
        }
        out
    }

    /// `c`'s changes, dearest first by what each costs on its own.
    fn dearest_first(&self, c: &PassOptions) -> Vec<PolicyChange> {
        let plain = vec![LayerPolicy::default(); c.policy.len()];
        let alone = |change: PolicyChange| match change {
            Some((l, op)) => {
                let mut p = plain.clone();
                p[l].set(op);
                self.cost(&self.with(&p, false))
            }
            None => self.cost(&self.with(&plain, true)),
        };
        let mut ops: Vec<(f64, PolicyChange)> = self.changes(c).into_iter().map(|ch| (alone(ch), ch)).collect();
        ops.sort_by(|a, b| b.0.total_cmp(&a.0));
        ops.into_iter().map(|(_, ch)| ch).collect()
    }

    /// `c` without `change`.
    fn without(&self, c: &PassOptions, change: PolicyChange) -> PassOptions {
        let mut out = c.clone();
        match change {
            Some((l, MemoryOp::Full)) => out.policy[l] = self.start.policy[l],
            Some((l, op)) => out.policy[l].set_to(op, false),
            None => out.swap_moments = false,
        }
        out
    }

    /// The greedy fill from `from`, never making the change `forbid`, then its pruning.
    /// `capped`: a reduction counts only up to what is still over the budget.
    fn fill(&self, from: PassOptions, capped: bool, forbid: Option<PolicyChange>) -> Result<PassOptions, PassOptions> {
        let mut chosen = from;
        loop {
            let (peak, act) = self.memory(&chosen);
            if peak <= self.budget {
                break;
            }
            let cost = self.cost(&chosen);
            let mut trials: Vec<PassOptions> = vec![];
            if !chosen.swap_moments && self.rates.swap.is_some() && forbid != Some(None) {
                trials.push(self.with(&chosen.policy, true));
            }
            for &l in &self.model.layer_ids {
                for op in MemoryOp::ALL {
                    // A layer recomputed whole can still leave out its probabilities.
                    let p = chosen.policy[l];
                    if (p.full && op != MemoryOp::Attention) || p.has(op) || (op == MemoryOp::Swap && self.rates.swap.is_none()) || forbid == Some(Some((l, op))) {
                        continue;
                    }
                    let mut trial = chosen.policy.clone();
                    if op == MemoryOp::Full {
                        trial[l] = LayerPolicy { full: true, attention: p.attention, ..Default::default() };
                    } else {
                        trial[l].set(op);
                    }
                    trials.push(self.with(&trial, chosen.swap_moments));
                }
            }
            let mut best: Option<(bool, f64, PassOptions)> = None;
            for trial in trials {
                let (tp, ta) = self.memory(&trial);
                let by_peak = tp < peak;
                let gain = match (by_peak, capped) {
                    (true, true) => (peak - tp).min(peak - self.budget),
                    (true, false) => peak - tp,
                    (false, _) => act.saturating_sub(ta),
                };
                if gain == 0 {
                    continue;
                }
                let score = gain as f64 / (self.cost(&trial) - cost).max(1e-9);
                if best.as_ref().is_none_or(|(bp, bs, _)| (by_peak, score) > (*bp, *bs)) {
                    best = Some((by_peak, score, trial));
                }
            }
            match best {
                Some((_, _, next)) => chosen = next,
                None => return Err(chosen),
            }
        }
        // Drop what is not needed, dearest first (what the caller asked for stays).
        for change in self.dearest_first(&chosen) {
            let trial = self.without(&chosen, change);
            if self.memory(&trial).0 <= self.budget {
                chosen = trial;
            }
        }
        Ok(chosen)
    }
}

/// Machine rates the policy costs are estimated with.
#[derive(Clone, Copy, Debug)]
pub struct CostRates {
    /// FLOP/s the GEMMs achieve
    pub flops: f64,
    /// FLOP/s the attention core achieves (small per-head GEMMs and a softmax)
    pub attention_flops: f64,
    /// bytes/s an elementwise pass streams
    pub bytes: f64,
    /// the swap file's bandwidth and CPU cost (`None`: no usable swap directory)
    pub swap: Option<SwapRates>,
}

impl CostRates {
    /// Rates from a GEMM peak (FLOP/s) and the swap file's measured rates: GEMMs at
    /// 40% of peak and the attention core at 20% (what training steps here achieve), and
    /// elementwise passes at the memory bandwidth measured by a 64 MB copy (best of 3).
    pub fn from_peak(peak_flops: f64, swap: Option<SwapRates>) -> CostRates {
        // Both buffers touched first: the copy is timed, not the page faults.
        let src = vec![1.0f32; 16 << 20];
        let mut dst = vec![0.5f32; 16 << 20];
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let bytes = 2.0 * 4.0 * src.len() as f64 / best.max(1e-9);
        CostRates { flops: 0.4 * peak_flops, attention_flops: 0.2 * peak_flops, bytes, swap }
    }
}

/// Heap bytes the kernels keep after running `model` (per-thread workspaces, pools):
/// measured with three forward and backward passes of 4 × 16 tokens on zero weights
/// through this rank's share (its stage's layers; the embedding and head where it holds
/// them) and one more driven by every worker thread, everything else freed again.
/// Needs the counting allocator ([`ultramoe_kernels::memory`]); call it before anything
/// else has run the kernels, or it measures 0. A share under expert parallelism cannot
/// run alone (its passes exchange with the other ranks): measure the whole model then.
pub fn runtime_bytes(model: &Model) -> usize {
    let before = ultramoe_kernels::memory::live_bytes();
    let (b, t) = (4, model.cfg.max_position.clamp(2, 16));
    for _ in 0..3 {
        model.trial_pass(b, t);
    }
    // Which worker threads run the small products (and so make their thread-local GEMM
    // buffers) depends on scheduling: every worker drives one pass itself too.
    rayon::broadcast(|_| model.trial_pass(b, t));
    ultramoe_kernels::memory::live_bytes().saturating_sub(before)
}

impl Model {
    /// One forward and backward of `b × t` tokens through this rank's share on zero
    /// weights (a stage without the embedding starts from zero activations, one without
    /// the head from a zero gradient), to make the kernels' workspaces.
    fn trial_pass(&self, b: usize, t: usize) {
        let n = b * t;
        let w = vec![0.0f32; self.layout.total];
        let mut g = vec![0.0f32; self.layout.total];
        let ids: Vec<u32> = (0..n).map(|i| (i % self.cfg.vocab_size) as u32).collect();
        let opts = PassOptions::default();
        let mut x = if self.stage.holds_embedding() { self.embed_forward(&w, &ids) } else { vec![0.0; n * self.cfg.hidden] };
        let mut chunks = vec![];
        for c in 0..self.stage.vpp {
            let (y, f) = self.chunk_forward(&w, x, c, b, t, None, &opts, self.exchange.as_deref(), &mut |_| {});
            chunks.push(f);
            x = y;
        }
        let mut dy = if self.stage.holds_head() {
            let mut head = self.head_forward_for_training(&w, x, &opts);
            let targets = crate::model::shifted_targets(&ids, t);
            self.head_backward(&w, &mut g, &mut head, &targets, 1.0).2
        } else {
            vec![0.0; n * self.cfg.hidden]
        };
        for f in chunks.into_iter().rev() {
            dy = self.chunk_backward(&w, &mut g, f, dy, &opts, self.exchange.as_deref(), &mut |_, _| {});
        }
        if self.stage.holds_embedding() {
            self.embed_backward(&mut g, &dy, &ids);
        }
    }
}

/// Bytes this process can still allocate without swapping or being killed: the kernel's
/// `MemAvailable`, or less when a cgroup (v2 `memory.max` − `memory.current`) limits the
/// process more tightly. `None` where neither can be read (not Linux).
pub fn available_bytes() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok().and_then(|s| s.trim().parse::<usize>().ok());
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Gives the heap's free memory back to the operating system (glibc's `malloc_trim`):
/// after a load that converted tensors one by one, the freed buffers would otherwise
/// stay resident in the allocator's arenas (a 3.7 GB model served from 10.7 GB). Other
/// C libraries return large frees on their own; there it does nothing.
pub fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// An error when `bytes` more than [`available_bytes`] would be needed for `what`
/// (`what` names the config fields or flags that set the size).
pub fn check_available(bytes: usize, what: impl FnOnce() -> String) -> crate::Result<()> {
    match available_bytes() {
        Some(avail) if bytes > avail => Err(crate::Error::msg(format!(
            "{} needs {:.1} GB, but this machine has {:.1} GB available",
            what(),
            bytes as f64 / 1e9,
            avail as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

impl Model {
    /// An error naming the sizes when a training step over `rows × seq_len` tokens on
    /// each of `ranks_here` ranks in this process (weights, gradients, moments and the
    /// step's peak of activations: [`Model::memory_plan`] without kernel workspaces)
    /// would need more memory than the machine has available — checked before anything
    /// is allocated, so a huge config or micro-batch is one line, not an allocation
    /// failure or an out-of-memory kill.
    pub fn check_step_fits_machine(&self, rows: usize, seq_len: usize, ranks_here: usize, opts: &PassOptions, actions: &[Action]) -> crate::Result<()> {
        let plan = self.memory_plan_scheduled(rows, seq_len, 2, 0, opts, actions);
        check_available(plan.peak_bytes.saturating_mul(ranks_here.max(1)), || {
            format!(
                "a training step of {rows} rows × seq-len {seq_len}{} on a model of {} (weights, gradients and moments {:.1} GB, saved activations {:.1} GB a rank)",
                if ranks_here > 1 { format!(" on each of {ranks_here} ranks") } else { String::new() },
                self.size_fields(),
                plan.static_bytes as f64 / 1e9,
                plan.activation_bytes as f64 / 1e9
            )
        })
    }

    /// The config fields that size the weights, for error messages.
    pub fn size_fields(&self) -> String {
        let c = &self.cfg;
        let mut s = format!("hidden_size {}, num_hidden_layers {}, vocab_size {}", c.hidden, c.n_layers, c.vocab_size);
        if c.moe_layers.iter().any(|&m| !m) {
            s += &format!(", intermediate_size {}", c.intermediate);
        }
        if c.n_moe_layers() > 0 {
            s += &format!(", n_routed_experts {} of moe_intermediate_size {}", c.moe.n_experts, c.moe.expert_inter);
        }
        format!("{s}: {:.3} B parameters", self.layout.total as f64 / 1e9)
    }
}
