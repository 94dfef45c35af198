//! One training step of one layout, simulated: time per micro-batch on the busiest
//! pipeline stage, the pipeline bubble, exposed communication, the optimizer step, and
//! the memory each device needs. A layout that cannot run says why.
//!
//! Devices are ordered TP innermost, then DP, then PP, so tensor-parallel groups sit
//! inside a node and an expert-parallel group (EP consecutive ranks of the TP × DP
//! plane) spans `⌈EP / devices_per_node⌉` nodes. A device computes `1/TP` of its
//! micro-batch's dense work and, on average, `1/TP` of its routed rows
//! (`mb·s·K/TP`, spread over its `E/EP` experts).
//!
//! Time of one micro-batch on a stage (forward + backward):
//! `Σ_GEMMs 3·f / (peak·eff(f))` + attention core `(1 + 2.5)·f / (peak·eff_attn)` +
//! elementwise traffic `3·bytes / (bw·eff_mem)`, plus a fixed cost per layer,
//! recomputation, and the exposed TP and EP collectives. A step is `m·t_mb` plus the
//! schedule's bubble ([`crate::pipeline`]: `(PP−1)/VPP·t` for 1F1B with `m`
//! micro-batches interleaved over VPP virtual stages, `t` a stage's micro-batch without
//! the head, which only the last stage carries), exposed DP traffic, the optimizer
//! step and a fixed host overhead. Schedules that pair micro-batches (overlapped 1F1B,
//! DualPipe) hide a steady-state pair's all-to-all under its compute, which then runs on
//! the share of the device the communication kernels leave (`efficiency.comm_sm_share`).
//! Collectives: ring all-reduce `2(n−1)/n·B / bw`, all-to-all `B·(n−1)/n / bw` (the
//! slower of the intra- and inter-node parts), each plus a latency.

use crate::hardware::{interpolate, Hardware};
use crate::model_cost::{ActivationBytes, ModelCost, Recompute};
use crate::pipeline::{sends_per_micro_batch, PipeSchedule};
use serde::Serialize;

/// A parallel layout and its per-device batch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Layout {
    /// tensor parallel
    pub tp: usize,
    /// pipeline stages
    pub pp: usize,
    /// virtual stages per device (interleaved 1F1B)
    pub vpp: usize,
    /// expert parallel (within the TP × DP plane)
    pub ep: usize,
    /// data parallel
    pub dp: usize,
    /// sequences per micro-batch
    pub micro_batch: usize,
    /// recomputation
    pub recompute: Recompute,
    /// optimizer states sharded over data-parallel ranks
    pub zero1: bool,
    /// pipeline schedule
    pub schedule: PipeSchedule,
}

/// What is being trained, on how much.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    /// devices
    pub devices: usize,
    /// tokens per sequence
    pub seq_len: usize,
    /// sequences per step
    pub global_batch: usize,
    /// compute data type: `bf16`/`fp16` (mixed precision), `fp32`, or `fp8` (FP8 GEMMs —
    /// forward, input and weight gradients — with attention, elementwise work and stored
    /// activations in BF16, as DeepSeek-V3 trained); picks the peaks and bytes per element
    pub dtype: String,
    /// hierarchical all-to-all (one copy per remote node, fanned out there)
    pub hierarchical_a2a: bool,
    /// busiest expert-parallel rank's routed load over the mean (1 = balanced)
    pub imbalance: f64,
}

/// Where a step's time goes (seconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    /// forward + backward computation
    pub compute: f64,
    /// recomputation
    pub recompute: f64,
    /// exposed tensor-parallel collectives
    pub tp_comm: f64,
    /// exposed expert-parallel all-to-all
    pub ep_comm: f64,
    /// pipeline sends
    pub pp_comm: f64,
    /// exposed data-parallel gradient traffic
    pub dp_comm: f64,
    /// pipeline bubble
    pub bubble: f64,
    /// the busiest expert rank's extra routed work
    pub imbalance: f64,
    /// optimizer step and fixed overhead
    pub optimizer: f64,
}

impl Breakdown {
    /// The parts as (name, seconds).
    pub fn parts(&self) -> [(&'static str, f64); 9] {
        [
            ("compute", self.compute),
            ("recompute", self.recompute),
            ("tp comm", self.tp_comm),
            ("ep comm", self.ep_comm),
            ("pp comm", self.pp_comm),
            ("dp comm", self.dp_comm),
            ("bubble", self.bubble),
            ("imbalance", self.imbalance),
            ("optimizer", self.optimizer),
        ]
    }
}

/// A feasible layout's predicted step.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// the layout
    pub layout: Layout,
    /// seconds per step
    pub step_s: f64,
    /// tokens per second (all devices)
    pub tokens_per_s: f64,
    /// model FLOP utilisation (against the BF16 peak under FP8 training)
    pub mfu: f64,
    /// peak memory per device (bytes)
    pub memory_bytes: f64,
    /// of which activations
    pub activation_bytes: f64,
    /// where the time goes
    pub breakdown: Breakdown,
}

/// Ring all-reduce over `n` devices of `bytes` each.
fn all_reduce_s(bytes: f64, n: usize, bw: f64, lat: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    2.0 * (n - 1) as f64 / n as f64 * bytes / bw + 2.0 * (n - 1) as f64 * lat
}

/// Bytes one rank's tensor-parallel collectives move for one decoder layer and one
/// micro-batch of `tokens`, forward and backward (ring algorithms), for a layer of
/// `blocks` split blocks (attention; the dense MLP or the shared experts): each block
/// all-reduces its `tokens·H` output forward and its input's gradient backward,
/// `blocks · 2 · 2(t−1)/t · tokens·H·bytes`. Sequence parallelism swaps each all-reduce
/// for an all-gather and a reduce-scatter of the same total. The planner prices two
/// blocks per layer (Megatron's layer); `ultramoe_model::tensor_parallel` counts what its
/// collectives move and is tested equal to this, layer by layer.
pub fn tp_bytes_per_layer(tokens: f64, hidden: usize, elem_bytes: f64, tp: usize, blocks: usize) -> f64 {
    if tp <= 1 {
        return 0.0;
    }
    blocks as f64 * 2.0 * 2.0 * (tp - 1) as f64 / tp as f64 * tokens * hidden as f64 * elem_bytes
}

/// Bytes one rank's tensor-parallel collectives move for the vocabulary-parallel
/// embedding and head per micro-batch of `tokens`: the embedding's output and the head
/// input's gradient all-reduced (`2 · 2(t−1)/t · tokens·H·bytes`), and the
/// cross-entropy's row statistics in f32 — the maxima all-gathered (`(t−1) · tokens ·
/// 4`), the sums of exponentials and the target logits all-reduced (`2 · 2(t−1)/t ·
/// tokens · 4`). `ultramoe_model::tensor_parallel` is tested equal to it.
pub fn tp_bytes_vocab(tokens: f64, hidden: usize, elem_bytes: f64, tp: usize) -> f64 {
    if tp <= 1 {
        return 0.0;
    }
    let all_reduce = 2.0 * (tp - 1) as f64 / tp as f64;
    2.0 * all_reduce * tokens * hidden as f64 * elem_bytes + (tp - 1) as f64 * tokens * 4.0 + 2.0 * all_reduce * tokens * 4.0
}

/// Bytes per element of activations and weights for a data type.
fn elem_bytes(dtype: &str) -> f64 {
    match dtype {
        "fp32" => 4.0,
        _ => 2.0,
    }
}

/// Bytes of training state per parameter: `(replicated part, shardable optimizer part)`.
/// Mixed precision: bf16 weight + fp32 gradient, and fp32 master copy + two fp32
/// moments; FP8 (DeepSeek-V3's recipe, §3.3.3): the moments in BF16; fp32: weight +
/// gradient, and two moments.
fn state_bytes(dtype: &str) -> (f64, f64) {
    match dtype {
        "fp32" => (8.0, 8.0),
        "fp8" => (6.0, 8.0),
        _ => (6.0, 12.0),
    }
}

/// Simulates `layout`; `Err` says why it cannot run.
pub fn simulate(m: &ModelCost, hw: &Hardware, job: &Job, l: &Layout) -> Result<Prediction, String> {
    let (tp, pp, vpp, ep, dp, mb) = (l.tp, l.pp, l.vpp.max(1), l.ep, l.dp, l.micro_batch);
    let dpn = hw.devices_per_node;
    if tp * pp * dp != job.devices {
        return Err(format!("tp {tp} × pp {pp} × dp {dp} ≠ {} devices", job.devices));
    }
    if tp > dpn {
        return Err(format!("tp {tp} spans nodes ({dpn} devices per node)"));
    }
    if !m.attention.heads.is_multiple_of(tp) {
        return Err(format!("tp {tp} does not divide {} heads", m.attention.heads));
    }
    if pp > m.layers {
        return Err(format!("pp {pp} exceeds {} layers", m.layers));
    }
    // A multi-token-prediction module is one more decoder layer to place.
    let stage_layers = (m.layers + m.mtp_layers).div_ceil(pp);
    if vpp > 1 && (pp == 1 || !stage_layers.is_multiple_of(vpp)) {
        return Err(format!("vpp {vpp} does not divide {stage_layers} layers per stage"));
    }
    if m.moe_layers > 0 && (!m.experts.is_multiple_of(ep) || !(dp * tp).is_multiple_of(ep)) {
        return Err(format!("ep {ep} must divide {} experts and tp × dp = {}", m.experts, dp * tp));
    }
    if !job.global_batch.is_multiple_of(dp * mb) {
        return Err(format!("global batch {} is not a multiple of dp {dp} × micro-batch {mb}", job.global_batch));
    }
    let micro = job.global_batch / (dp * mb);
    if pp > 1 && micro < pp {
        return Err(format!("{micro} micro-batches cannot fill {pp} pipeline stages"));
    }
    l.schedule.check(pp, vpp, micro)?;
    let peak = hw.peak(&job.dtype).map_err(|e| e.to_string())?;
    // Attention's core runs in BF16 under FP8 training; MFU is against the BF16 peak too.
    let dense_dtype = if job.dtype == "fp8" { "bf16" } else { job.dtype.as_str() };
    let core_peak = hw.peak(dense_dtype).map_err(|e| e.to_string())?;
    let eb = elem_bytes(dense_dtype);
    let act_bytes = ActivationBytes::of(&job.dtype);
    let e = &hw.efficiency;
    let net = e.network.max(1e-3);
    let (h, s) = (m.hidden as f64, job.seq_len);
    let n = (mb * s) as f64; // tokens per micro-batch per DP rank
    // FP8 GEMMs reach `fp8_gemm` of the fraction the curves give BF16 ones.
    let peak = if job.dtype == "fp8" { peak * e.fp8_gemm } else { peak };
    let gemm = |f: f64| 3.0 * f / (peak * interpolate(&e.gemm, f));
    let mem_bw = hw.device.memory_bandwidth * e.memory;

    // One layer, one micro-batch, forward + backward, on one device.
    let attn_gemms: f64 = m.attention.gemms.iter().map(|&(i, o)| gemm(2.0 * n * (i * o) as f64 / tp as f64)).sum();
    let core_f = m.attention_core_flops(s) * n / tp as f64;
    let attn_core = 3.5 * core_f / (core_peak * e.attention);
    let dense_ffn = gemm(n * m.dense_flops() / 3.0 / tp as f64) * 3.0;
    let routed_rows = n * m.top_k as f64 / tp as f64;
    let per_expert_rows = routed_rows * ep as f64 / m.experts.max(1) as f64;
    let per_expert_f = 6.0 * per_expert_rows * h * m.expert_inter as f64;
    let routed = if m.moe_layers > 0 { 3.0 * routed_rows * 6.0 * h * m.expert_inter as f64 / (peak * interpolate(&e.grouped_gemm, per_expert_f)) } else { 0.0 };
    let shared = gemm(n * 2.0 * h * m.shared_inter as f64 / tp as f64) * 3.0 + gemm(2.0 * n * h * m.experts as f64 / tp as f64);
    // Elementwise traffic: every saved element written once forward, read and its
    // gradient written backward.
    let elementwise = |moe: bool| 3.0 * m.saved_elements(moe, Recompute::None) * n / tp as f64 * eb / mem_bw;
    let fwd = |x: f64| x / 3.0;
    let moe_layer = attn_gemms + attn_core + routed + shared + elementwise(true);
    let dense_layer = attn_gemms + attn_core + dense_ffn + elementwise(false);
    // Rebuilding in backward: RMSNorm and SwiGLU are one read-and-write pass each over
    // their inputs; q, k, v the forward of their projections; the attention core its
    // forward; `full` the layer's forward.
    let ops = l.recompute.ops();
    let recompute_of = |layer_t: f64, moe: bool| {
        if ops.full {
            return fwd(layer_t);
        }
        let pass = |elements: f64| elements * n / tp as f64 * eb / mem_bw;
        let mut t = 0.0;
        if ops.norm {
            t += pass(2.0 * m.norm_elements());
        }
        if ops.swiglu {
            t += pass(m.swiglu_elements(moe));
        }
        if ops.qkv {
            t += fwd(gemm(n * m.qkv_flops() / tp as f64));
        }
        if ops.attention {
            t += fwd(attn_core);
        }
        t
    };
    // The busiest stage: the heavier kind of layer throughout, plus the head.
    let (layer_t, moe_stage) = if m.moe_layers > 0 { (moe_layer, true) } else { (dense_layer, false) };
    let head = (1 + m.mtp_layers) as f64 * (gemm(2.0 * n * h * m.vocab as f64 / tp as f64) + 4.0 * n * (m.vocab / tp) as f64 * 4.0 / mem_bw);
    // Paired micro-batches compute on what the all-to-all kernels leave of the device.
    let paired = l.schedule.pairs_micro_batches() && pp > 1 && moe_stage && ep > 1;
    let slowdown = if paired { 1.0 / (1.0 - e.comm_sm_share).max(0.05) } else { 1.0 };
    // A layer takes the longer of its device time and the host time that issues it.
    let layer_device = (layer_t * slowdown).max(e.host_layer);
    let stage_compute = stage_layers as f64 * (layer_device + e.layer_overhead) + head * slowdown;
    let stage_recompute = stage_layers as f64 * recompute_of(layer_t, moe_stage);
    let stage_imbalance = if moe_stage { stage_layers as f64 * routed * (job.imbalance - 1.0).max(0.0) } else { 0.0 };

    // Tensor parallel: 2 collectives forward, 2 backward per layer, of n·H elements
    // (all-reduces, or all-gather + reduce-scatter pairs under sequence parallelism:
    // the same bytes, twice the messages).
    let bw_intra = hw.network.intra_node_bandwidth * net;
    let bw_inter = hw.network.inter_node_bandwidth * net;
    let tp_latency = if tp > 1 { 4.0 * 2.0 * (tp - 1) as f64 * hw.network.intra_node_latency } else { 0.0 };
    let tp_layer = tp_bytes_per_layer(n, m.hidden, eb, tp, 2) / bw_intra + tp_latency;
    // (the embedding's share on the first stage and the head's on the last: half each)
    let tp_vocab = if tp > 1 { tp_bytes_vocab(n, m.hidden, eb, tp) / 2.0 / bw_intra + 2.0 * (tp - 1) as f64 * hw.network.intra_node_latency } else { 0.0 };
    let tp_exposed = (stage_layers as f64 * tp_layer + tp_vocab) * (1.0 - e.tp_overlap);
    // Expert parallel: dispatch and combine, forward and backward, per MoE layer.
    // FP8 training dispatches in FP8 and combines in BF16, and likewise backward
    // (DeepSeek-V3 §3.3.2): 1.5 bytes per element on average.
    let a2a_b = if job.dtype == "fp8" { 1.5 } else { eb };
    let ep_layer = if moe_stage && ep > 1 {
        let sent = routed_rows * h * a2a_b * (ep - 1) as f64 / ep as f64;
        let local = ep.min(dpn);
        let nodes = ep.div_ceil(dpn);
        let inter_frac = (ep - local) as f64 / (ep - 1) as f64;
        let (intra_b, inter_b) = if job.hierarchical_a2a && nodes > 1 {
            // each token crosses once to each remote node holding one of its experts,
            // then fans out inside that node
            let g = nodes as f64;
            let k = m.top_k as f64;
            // A token's k experts land on `g(1 − (1 − 1/g)^k)` distinct nodes when
            // uniform; with one routing group per node (node-limited routing) on
            // exactly `topk_group` of them.
            let (groups, limit) = m.route_groups;
            let remote_nodes = if groups == nodes && limit < groups {
                limit as f64 * (g - 1.0) / g
            } else {
                (g - 1.0) * (1.0 - (1.0 - 1.0 / g).powf(k))
            };
            (sent * (1.0 - inter_frac) + routed_rows * h * a2a_b * (local - 1) as f64 / local as f64, n / tp as f64 * h * a2a_b * remote_nodes)
        } else {
            (sent * (1.0 - inter_frac), sent * inter_frac)
        };
        let lat = if nodes > 1 { hw.network.inter_node_latency } else { hw.network.intra_node_latency };
        4.0 * ((intra_b / bw_intra).max(inter_b / bw_inter) + 2.0 * lat)
    } else {
        0.0
    };
    let plain_ep = stage_layers as f64 * ep_layer * (1.0 - e.ep_overlap);
    // Paired: the steady state hides the all-to-all up to the pair's compute; the
    // warm-up and cool-down micro-batches (PP of the m) run unpaired.
    let ep_exposed = if paired {
        let steady = (stage_layers as f64 * ep_layer - stage_compute).max(0.0);
        let unpaired = (pp as f64 / micro as f64).min(1.0);
        unpaired * plain_ep + (1.0 - unpaired) * steady
    } else {
        plain_ep
    };
    // Pipeline: an activation forward and a gradient backward per micro-batch at each
    // of the device's chunk boundaries (VPP of each under interleaving).
    let pp_bw = if dp * tp >= dpn { bw_inter } else { bw_intra };
    let pp_mb = 2.0 * sends_per_micro_batch(pp, vpp) as f64 * (n * h * eb / tp as f64 / pp_bw + hw.network.inter_node_latency);
    let t_mb = stage_compute + stage_recompute + stage_imbalance + tp_exposed + ep_exposed + pp_mb;
    // The busiest stage runs every micro-batch; the fill and drain around it are the
    // other stages' passes, which do not carry the head (it lives on the last stage):
    // 1F1B's `(PP − 1)/VPP · t` is priced with `t = t_mb − t_head`.
    let bubble = l.schedule.bubble(pp, vpp, t_mb - head * slowdown);

    // Parameters on the busiest device and its data-parallel traffic.
    let stage_frac = stage_layers as f64 / m.layers as f64;
    let copies = l.schedule.parameter_copies();
    let replicated = copies * (m.dense_params * stage_frac / tp as f64 + (m.embed_params + m.head_params) / tp as f64 / if pp > 1 { 2.0 } else { 1.0 });
    let experts = copies * m.expert_params * stage_frac / ep as f64;
    let edp = (dp * tp / ep.max(1)).max(1);
    let (keep, shard) = state_bytes(&job.dtype);
    let states = replicated * (keep + if l.zero1 { shard / dp as f64 } else { shard })
        + experts * (keep + if l.zero1 { shard / edp as f64 } else { shard });
    let dp_bw = if tp * dp > dpn { bw_inter } else { bw_intra };
    let grad_b = if job.dtype == "fp32" { 4.0 } else { 2.0 };
    let dp_traffic = all_reduce_s(replicated * grad_b, dp, dp_bw, hw.network.inter_node_latency)
        + all_reduce_s(experts * grad_b, edp, dp_bw, hw.network.inter_node_latency);
    let dp_exposed = dp_traffic * (1.0 - e.dp_overlap);
    // AdamW reads weight, gradient and two moments and writes three: ~7 floats each.
    let opt_params = if l.zero1 { replicated / dp as f64 + experts / edp as f64 } else { replicated + experts };
    let optimizer = opt_params * 28.0 / (hw.device.memory_bandwidth * e.optimizer) + e.step_overhead;

    // Memory: states, activations of the micro-batches in flight, logits, buffers.
    let in_flight = l.schedule.in_flight(pp, vpp, micro);
    let per_layer_act = m.saved_bytes(moe_stage, l.recompute, act_bytes) * n / tp as f64;
    // The logits (at the activation width: a fused cross-entropy upcasts chunk by
    // chunk) live on the last stage, which holds one micro-batch in flight under 1F1B;
    // DualPipe's first rank also runs the last stage.
    let logits = n * (m.vocab / tp) as f64 * eb;
    let layers_act = per_layer_act * stage_layers as f64;
    let activations = match l.schedule {
        _ if pp == 1 => layers_act + logits,
        PipeSchedule::DualPipe | PipeSchedule::DualPipeV => layers_act * in_flight + logits,
        _ => (layers_act * in_flight).max(layers_act * l.schedule.in_flight(1, vpp, micro) + logits),
    };
    let buffers = if ep > 1 { 2.0 * routed_rows * h * a2a_b } else { 0.0 };
    let memory = states + activations + buffers;
    let usable = hw.device.memory_bytes - hw.device.reserved_bytes();
    if memory > usable {
        return Err(format!(
            "needs {:.1} GB per device (states {:.1}, activations {:.1}) > {:.1} GB usable",
            memory / 1e9,
            states / 1e9,
            activations / 1e9,
            usable / 1e9
        ));
    }

    let micro_f = micro as f64;
    let step = micro_f * t_mb + bubble + dp_exposed + optimizer;
    let tokens = (job.global_batch * s) as f64;
    let breakdown = Breakdown {
        compute: micro_f * stage_compute,
        recompute: micro_f * stage_recompute,
        tp_comm: micro_f * tp_exposed,
        ep_comm: micro_f * ep_exposed,
        pp_comm: micro_f * pp_mb,
        dp_comm: dp_exposed,
        bubble,
        imbalance: micro_f * stage_imbalance,
        optimizer,
    };
    Ok(Prediction {
        layout: *l,
        step_s: step,
        tokens_per_s: tokens / step,
        mfu: m.train_flops_per_token(s) * tokens / (step * job.devices as f64 * core_peak),
        memory_bytes: memory,
        activation_bytes: activations,
        breakdown,
    })
}
