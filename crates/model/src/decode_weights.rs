//! A model's weights as decoding reads them: the flat f32 buffer, and every projection
//! and expert matrix also in BF16 or INT8 when asked (`--weights`), multiplied by the
//! fused dequantising kernels of [`ultramoe_kernels::qlinear`]. A quantised matrix's f32
//! values are given back to the operating system once converted
//! ([`ultramoe_kernels::huge::release_pages`]): INT8 weights hold about a byte a
//! weight, not five.
//!
//! Quantised: attention projections (GQA's fused q/k/v and output; MLA's fused
//! down-projection, query up-projection and output), dense and shared-expert MLPs, every
//! routed expert, and the LM head. Kept in f32: embeddings (a row lookup), norms, router
//! gates (small, and the expert choice is sensitive to them), and MLA's `kv_b`, which the
//! absorbed attention reads per head.

use crate::attention::MlaAttention;
use crate::decoder::{AttnBlock, DecoderLayer, FfnBlock};
use crate::mlp::Mlp;
use crate::params::Slot;
use crate::Model;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use ultramoe_kernels::qlinear::{linear_f32, QMatrix, RoundedRows, WeightFormat};

/// Weights for decoding.
pub struct DecodeWeights {
    /// every weight in f32, at the model's layout offsets
    pub w: Vec<f32>,
    /// the format of the quantised matrices (`F32`: none)
    pub format: WeightFormat,
    /// quantised matrices by their slot's start
    q: HashMap<usize, (Slot, QMatrix)>,
    /// bytes of `w` given back to the operating system (the quantised matrices' pages)
    released: usize,
}

/// `(slot, rows, cols)` of every matrix decoding multiplies by, in the model's order.
fn matrices(model: &Model) -> Vec<(Slot, usize, usize)> {
    let mut out: Vec<_> = model.layers.iter().flat_map(layer_matrices).collect();
    if let Some(head) = &model.lm_head {
        out.push((head.clone(), model.cfg.vocab_size, model.cfg.hidden));
    }
    out
}

/// The matrices of one decoder layer.
fn layer_matrices(l: &DecoderLayer) -> Vec<(Slot, usize, usize)> {
    let mut out = vec![];
    let mlp = |m: &Mlp, out: &mut Vec<(Slot, usize, usize)>| {
        out.push((m.gate_up.clone(), 2 * m.inter, m.hidden));
        out.push((m.down.clone(), m.hidden, m.inter));
    };
    {
        match &l.attn {
            AttnBlock::Gqa(a) => {
                out.push((a.qkv.clone(), (a.nh + 2 * a.nkv) * a.hd, a.hidden));
                out.push((a.o.clone(), a.hidden, a.nh * a.hd));
            }
            AttnBlock::Mla(a) => {
                let MlaAttention { hidden, nh, q_lora, kv_lora, nope, rope_dim, dv, .. } = *a;
                let q_in = if q_lora > 0 { q_lora } else { nh * (nope + rope_dim) };
                out.push((a.a.clone(), q_in + kv_lora + rope_dim, hidden));
                if let Some(qb) = &a.q_b {
                    out.push((qb.clone(), nh * (nope + rope_dim), q_lora));
                }
                out.push((a.o.clone(), hidden, nh * dv));
            }
        }
        match &l.ffn {
            FfnBlock::Dense(m) => mlp(m, &mut out),
            FfnBlock::Moe(m) => {
                if let Some(s) = &m.shared {
                    mlp(s, &mut out);
                }
                let e = &m.experts;
                let slots = e.gate_up.len() / (2 * e.inter * e.hidden).max(1);
                for j in 0..slots {
                    let [gu, dn] = e.slot_ranges(j);
                    out.push((gu, 2 * e.inter, e.hidden));
                    out.push((dn, e.hidden, e.inter));
                }
            }
        }
    }
    out
}

impl DecodeWeights {
    /// `w` laid out for `model`, its matrices converted to `format`.
    pub fn new(model: &Model, w: Vec<f32>, format: WeightFormat) -> Self {
        Self::assemble(model, w, format, |_, _, _, _| None)
    }

    /// `w` laid out for `model`, each matrix in `format`: the one `stored` gives (it may
    /// also write the matrix's f32 values into `w`), else `w`'s values converted.
    fn assemble(model: &Model, mut w: Vec<f32>, format: WeightFormat, mut stored: impl FnMut(&mut [f32], &Slot, usize, usize) -> Option<QMatrix>) -> Self {
        assert_eq!(w.len(), model.layout.total, "weights laid out for this model");
        let mut q: HashMap<usize, (Slot, QMatrix)> = HashMap::new();
        if format != WeightFormat::F32 {
            for (slot, rows, cols) in matrices(model) {
                let m = stored(&mut w, &slot, rows, cols).unwrap_or_else(|| QMatrix::quantize(&w[slot.clone()], rows, cols, format));
                q.insert(slot.start, (slot, m));
            }
        }
        // Decoding reads a quantised matrix only through its copy (`linear_on`,
        // `dequantized`, `matrix_bytes`), so its f32 pages go back.
        let released = q.values().map(|(slot, _)| ultramoe_kernels::huge::release_pages(&mut w[slot.clone()])).sum();
        DecodeWeights { w, format, q, released }
    }

    /// The model saved at `path`, its matrices in `format`. A matrix whose tensors the
    /// checkpoint stores in that format (`ultramoe quantize`'s INT8 or BF16, or a BF16
    /// Hugging Face checkpoint read as BF16) is taken as stored — bit for bit, and never
    /// as f32 on the way: the load's peak is about the stored matrices, the f32 rest and
    /// one shard. Any other matrix is read as f32 and converted as [`Self::new`] does.
    pub fn load(model: &Model, path: &Path, format: WeightFormat) -> crate::Result<Self> {
        use crate::checkpoint::{load_weights, load_weights_keeping, Keep};
        if format == WeightFormat::F32 {
            return Ok(Self::new(model, load_weights(model, path)?, format));
        }
        // The tensors inside each matrix, by the matrix's start, in buffer order (a fused
        // matrix's parts are consecutive rows of it).
        let mut by_start: Vec<&crate::params::ParamSpec> = model.layout.specs.iter().collect();
        by_start.sort_by_key(|s| s.range().start);
        let parts: HashMap<usize, Vec<&crate::params::ParamSpec>> = matrices(model)
            .into_iter()
            .map(|(slot, _, _)| {
                let first = by_start.partition_point(|s| s.range().start < slot.start);
                (slot.start, by_start[first..].iter().take_while(|s| s.range().end <= slot.end).copied().collect())
            })
            .collect();
        let inside: std::collections::HashSet<&str> = parts.values().flatten().map(|s| s.name.as_str()).collect();
        let (w, mut stored) = load_weights_keeping(model, path, Some(Keep { format, wanted: &|name: &str| inside.contains(name) }))?;
        Ok(Self::assemble(model, w, format, |w, slot, rows, cols| {
            let specs = &parts[&slot.start];
            let covered = specs.iter().map(|s| s.range().len()).sum::<usize>() == slot.len();
            if !(covered && specs.iter().all(|s| stored.contains_key(&s.name))) {
                // Part of it came as f32 (or not at all in this format): its stored parts
                // dequantised into place, and the whole converted.
                for s in specs {
                    if let Some(part) = stored.remove(&s.name) {
                        w[s.range()].copy_from_slice(&part.dequantize());
                    }
                }
                return None;
            }
            let taken: Vec<QMatrix> = specs.iter().map(|s| stored.remove(&s.name).expect("checked above")).collect();
            Some(match format {
                WeightFormat::Int8 => {
                    let (mut qs, mut scales) = (Vec::with_capacity(slot.len()), Vec::with_capacity(rows));
                    for (q, scale) in taken.iter().filter_map(|t| t.int8_parts()) {
                        qs.extend_from_slice(q);
                        scales.extend_from_slice(scale);
                    }
                    QMatrix::from_int8(qs, scales, rows, cols)
                }
                _ => QMatrix::from_bf16(taken.iter().filter_map(|t| t.bf16_bits()).flatten().copied().collect(), rows, cols),
            })
        }))
    }

    /// Bytes the weights occupy: `w` less its released pages, plus the quantised copies.
    pub fn resident_bytes(&self) -> usize {
        4 * self.w.len() - self.released + self.q.values().map(|(_, m)| m.bytes()).sum::<usize>()
    }

    /// `y = x · W[slot]ᵀ` for `x: [n, d_in]`, `W: [d_out, d_in]`, through the quantised
    /// copy when there is one.
    pub fn linear(&self, slot: &Slot, x: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
        self.linear_on(slot, x, n, d_in, d_out, true)
    }

    /// [`DecodeWeights::linear`] on this thread alone unless `parallel`.
    pub fn linear_on(&self, slot: &Slot, x: &[f32], n: usize, d_in: usize, d_out: usize, parallel: bool) -> Vec<f32> {
        match self.q.get(&slot.start) {
            Some((s, m)) if s == slot => {
                debug_assert_eq!((m.rows, m.cols), (d_out, d_in));
                m.linear_on(x, n, parallel)
            }
            _ => linear_f32(x, &self.w[slot.clone()], n, d_in, d_out, parallel),
        }
    }

    /// `x` rounded as `slot`'s matrix takes it (see [`QMatrix::round`]), for
    /// [`DecodeWeights::linear_rows`].
    pub fn round(&self, slot: &Slot, x: &[f32], n: usize, d_in: usize) -> RoundedRows {
        match self.q.get(&slot.start) {
            Some((s, m)) if s == slot => m.round(x, n),
            _ => RoundedRows::new(x, n, d_in, false),
        }
    }

    /// The output rows `rows` of [`DecodeWeights::linear`], on this thread alone: `[n,
    /// rows.len()]`; `rounded` from [`DecodeWeights::round`].
    #[allow(clippy::too_many_arguments)]
    pub fn linear_rows(&self, slot: &Slot, x: &[f32], rounded: &RoundedRows, n: usize, d_in: usize, d_out: usize, rows: Range<usize>) -> Vec<f32> {
        match self.q.get(&slot.start) {
            Some((s, m)) if s == slot => {
                debug_assert_eq!((m.rows, m.cols), (d_out, d_in));
                m.linear_rows(x, rounded, n, rows)
            }
            _ => {
                debug_assert!(rows.end <= d_out);
                let w = &self.w[slot.start + rows.start * d_in..slot.start + rows.end * d_in];
                linear_f32(x, w, n, d_in, rows.len(), false)
            }
        }
    }

    /// The f32 weights with every quantised matrix replaced by its dequantised values:
    /// what the quantised model computes, for the f32 kernels.
    pub fn dequantized(&self) -> Vec<f32> {
        let mut w = self.w.clone();
        for (slot, m) in self.q.values() {
            w[slot.clone()].copy_from_slice(&m.dequantize());
        }
        w
    }

    /// Bytes a pass through `slot`'s matrix reads.
    pub fn matrix_bytes(&self, slot: &Slot) -> usize {
        match self.q.get(&slot.start) {
            Some((s, m)) if s == slot => m.bytes(),
            _ => 4 * slot.len(),
        }
    }

    /// Bytes one decoded token reads at most from the weights of `model`: every matrix
    /// but the routed experts in full, the routed experts as `top_k` of each MoE layer's
    /// experts (the active share), plus the token's embedding row and the norms.
    pub fn bytes_per_token(&self, model: &Model) -> usize {
        let mut total = 4 * model.cfg.hidden;
        for l in &model.layers {
            let mut experts = vec![];
            if let FfnBlock::Moe(m) = &l.ffn {
                let e = &m.experts;
                let slots = e.gate_up.len() / (2 * e.inter * e.hidden).max(1);
                let bytes: usize = (0..slots).map(|j| e.slot_ranges(j).iter().map(|r| self.matrix_bytes(r)).sum::<usize>()).sum();
                total += bytes * m.router.spec.top_k / slots.max(1);
                experts = (0..slots).flat_map(|j| e.slot_ranges(j)).collect();
            }
            for (slot, _, _) in layer_matrices(l) {
                if !experts.contains(&slot) {
                    total += self.matrix_bytes(&slot);
                }
            }
        }
        total + model.lm_head.as_ref().map_or(0, |h| self.matrix_bytes(h))
    }

    /// Saves the model to `dir` in the Hugging Face layout with its matrices in this
    /// format: BF16 tensors as BF16; INT8 ones as `I8` with `<name>_scale` (`F32`, one per
    /// row: `w ≈ q·scale`), which [`crate::checkpoint::load_weights`] reads back (other
    /// tools do not know that pair); everything else in f32. `config.json` gains
    /// `"ultramoe_weights": "<format>"`. Loading the saved model and converting it to the
    /// same format gives these matrices bit for bit.
    pub fn save(&self, model: &Model, dir: &Path) -> crate::Result<()> {
        use crate::checkpoint::write_atomic;
        use crate::Error;
        use safetensors::tensor::{Dtype, TensorView};
        std::fs::create_dir_all(dir).map_err(|e| Error::msg(format!("cannot create directory: {e}")).in_file(dir))?;
        let mut cfg = model.cfg.raw.clone();
        if let Some(o) = cfg.as_object_mut() {
            o.insert("ultramoe_weights".into(), self.format.name().into());
        }
        write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&cfg).expect("config serialises").as_bytes())?;
        let slots: Vec<&(Slot, QMatrix)> = self.q.values().collect();
        // (name, dtype, shape, bytes)
        let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
        for spec in &model.layout.specs {
            let r = spec.range();
            let inside = slots.iter().find(|(slot, _)| slot.start <= r.start && r.end <= slot.end);
            let Some((slot, m)) = inside else {
                if slots.iter().any(|(slot, _)| slot.start < r.end && r.start < slot.end) {
                    return Err(Error::field(&spec.name, "spans several quantised matrices; cannot be saved quantised"));
                }
                out.push((spec.name.clone(), Dtype::F32, spec.shape.clone(), self.w[r].iter().flat_map(|x| x.to_le_bytes()).collect()));
                continue;
            };
            let cols = m.cols;
            let (row0, rows) = ((r.start - slot.start) / cols, r.len() / cols);
            let (a, b) = (row0 * cols, (row0 + rows) * cols);
            if let Some((q, scale)) = m.int8_parts() {
                out.push((spec.name.clone(), Dtype::I8, spec.shape.clone(), q[a..b].iter().map(|&x| x as u8).collect()));
                let sc: Vec<u8> = scale[row0..row0 + rows].iter().flat_map(|x| x.to_le_bytes()).collect();
                out.push((format!("{}_scale", spec.name), Dtype::F32, vec![rows], sc));
            } else if let Some(bits) = m.bf16_bits() {
                out.push((spec.name.clone(), Dtype::BF16, spec.shape.clone(), bits[a..b].iter().flat_map(|x| x.to_le_bytes()).collect()));
            }
        }
        out.sort_by(|x, y| x.0.cmp(&y.0));
        let views = out
            .iter()
            .map(|(n, d, shape, b)| Ok((n.clone(), TensorView::new(*d, shape.clone(), b).map_err(|e| Error::field(n, e.to_string()))?)))
            .collect::<crate::Result<Vec<_>>>()?;
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let path = dir.join("model.safetensors");
        let data = safetensors::serialize(views, meta).map_err(|e| Error::msg(e.to_string()).in_file(&path))?;
        write_atomic(&path, &data)
    }
}
