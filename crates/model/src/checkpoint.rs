//! Checkpoints in the Hugging Face safetensors layout: one `model.safetensors`, or shards
//! listed by `model.safetensors.index.json`, with the per-expert tensor names of the
//! original checkpoints, so files move between ultramoe and transformers both ways.
//!
//! Every write goes to a temporary file that is renamed into place: a kill during a save
//! leaves the previous file intact, never a truncated one.

use crate::error::{Error, Result};
use crate::model::Model;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use ultramoe_kernels::qlinear::QMatrix;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tensor read from a safetensors file, converted to a working type.
#[derive(Clone, Debug)]
pub enum TensorData {
    /// floating point (F64/F32/F16/BF16 converted to f32)
    F32(Vec<f32>),
    /// integers (I64/I32 widened to i64)
    I64(Vec<i64>),
}

/// A named tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// shape
    pub shape: Vec<usize>,
    /// values
    pub data: TensorData,
}

impl Tensor {
    /// The values as f32, or an error naming the tensor.
    pub fn f32(&self, name: &str) -> Result<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Ok(v),
            TensorData::I64(_) => Err(Error::field(name, "expected a floating-point tensor, found integers")),
        }
    }
    /// The values as i64, or an error naming the tensor.
    pub fn i64(&self, name: &str) -> Result<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Ok(v),
            TensorData::F32(_) => Err(Error::field(name, "expected an integer tensor, found floating point")),
        }
    }
}

/// Decodes one FP8 E4M3 ("fn": no infinities) value: sign, 4 exponent bits (bias 7),
/// 3 mantissa bits; exponent 0 is subnormal `m/8 · 2⁻⁶`; `S.1111.111` is NaN.
pub fn f8_e4m3_to_f32(x: u8) -> f32 {
    let sign = if x & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((x >> 3) & 0x0F) as i32;
    let m = (x & 0x07) as f32;
    if e == 0x0F && m == 7.0 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// Block size of FP8 weight scales (`quantization_config.weight_block_size`, DeepSeek-V3:
/// `[128, 128]`): `W[i, j] = q[i, j] · scale_inv[i / bᵣ, j / b_c]`.
fn fp8_block(cfg: &serde_json::Value) -> (usize, usize) {
    let b = cfg.get("quantization_config").and_then(|q| q.get("weight_block_size")).and_then(|b| b.as_array());
    match b.map(|a| a.iter().filter_map(|x| x.as_u64()).collect::<Vec<_>>()) {
        Some(v) if v.len() == 2 && v[0] > 0 && v[1] > 0 => (v[0] as usize, v[1] as usize),
        _ => (128, 128),
    }
}

fn convert(name: &str, v: &TensorView) -> Result<TensorData> {
    let b = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => TensorData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Dtype::F64 => TensorData::F32(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()),
        Dtype::BF16 => TensorData::F32(b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Dtype::F16 => TensorData::F32(b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Dtype::F8_E4M3 => TensorData::F32(b.iter().map(|&x| f8_e4m3_to_f32(x)).collect()),
        // ultramoe's INT8 checkpoints (`quantize`): the integers, scaled by `<name>_scale`
        Dtype::I8 => TensorData::F32(b.iter().map(|&x| x as i8 as f32).collect()),
        Dtype::I64 => TensorData::I64(b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
        Dtype::I32 => TensorData::I64(b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()),
        other => {
            return Err(Error::field(name, format!("dtype {other:?} is not supported (F32, F64, BF16, F16, F8_E4M3, I64, I32)")));
        }
    })
}

/// Reads every tensor of one safetensors file.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(path))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::msg(format!("not a valid safetensors file: {e}")).in_file(path))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = convert(&name, &view).map_err(|e| e.in_file(path))?;
        out.insert(name, Tensor { shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

/// The files of a checkpoint: `model.safetensors`, or the shards an index names, or a
/// single `.safetensors` path given directly.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::msg("no such checkpoint file or directory").in_file(path));
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&index))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::msg(format!("not valid JSON: {e}")).in_file(&index))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::field("weight_map", "missing or not an object").in_file(&index))?;
        let mut files: Vec<String> = vec![];
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| Error::field(tensor, format!("shard must be a file name, found {f}")).in_file(&index))?;
            // Shards live in the model directory: a name that climbs out of it, or an
            // absolute path, is refused rather than read.
            let plain = Path::new(f).components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain || f.is_empty() {
                return Err(Error::field(tensor, format!("shard `{f}` is outside the model directory")).in_file(&index));
            }
            files.push(f.to_string());
        }
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| path.join(f)).collect());
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::msg("directory holds neither model.safetensors nor model.safetensors.index.json").in_file(path))
}

/// True for checkpoint tensors that ultramoe deliberately does not use: cached RoPE
/// frequencies, and the multi-token prediction layers DeepSeek-V3 stores right after
/// its `num_hidden_layers` (as many as `num_nextn_predict_layers` says). Any other
/// layer past the config's is an error: a config with fewer layers than its checkpoint
/// would silently drop some.
fn ignorable(name: &str, cfg: &crate::ModelConfig) -> bool {
    if name.ends_with("rotary_emb.inv_freq") {
        return true;
    }
    let mtp = cfg.raw.get("num_nextn_predict_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    crate::params::layer_index(name).is_some_and(|i| i >= cfg.n_layers && i < cfg.n_layers + mtp)
}

/// Loads weights for `model` from a checkpoint directory or file into a new flat buffer.
/// Every tensor must be present with its exact shape; unknown tensors are errors.
pub fn load_weights(model: &Model, path: &Path) -> Result<Vec<f32>> {
    Ok(load_weights_keeping(model, path, None)?.0)
}

/// Which tensors to keep as stored: those `wanted` names that the checkpoint holds in
/// `format` (BF16, or INT8 with its per-row `<name>_scale`).
pub struct Keep<'a> {
    /// the decoding format
    pub format: ultramoe_kernels::qlinear::WeightFormat,
    /// the tensors decoding would quantise to it
    pub wanted: &'a dyn Fn(&str) -> bool,
}

impl Keep<'_> {
    fn takes(&self, name: &str, dtype: Dtype) -> bool {
        use ultramoe_kernels::qlinear::WeightFormat;
        let stored = match dtype {
            Dtype::I8 => WeightFormat::Int8,
            Dtype::BF16 => WeightFormat::Bf16,
            _ => return false,
        };
        stored == self.format && (self.wanted)(name)
    }
}

/// [`load_weights`], except that the tensors `keep` takes are returned as stored (by
/// name, each a `[rows, cols]` quantised matrix of the decoding kernels) and their part of the flat buffer is never written: a zeroed allocation
/// the operating system gives pages to only when touched, so an INT8 or BF16
/// checkpoint loads for decoding at its own size, never as f32 first. Each kept tensor
/// is checked as a placed one is (shape, finite values, an INT8 scale per row).
pub fn load_weights_keeping(model: &Model, path: &Path, keep: Option<Keep>) -> Result<(Vec<f32>, HashMap<String, QMatrix>)> {
    // The weights (kept tensors at their stored size), and one file's bytes at a time
    // (a single-file checkpoint: the whole model again); each tensor is converted
    // straight into its place.
    let files = checkpoint_files(path)?;
    let largest_file = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len() as usize).max().unwrap_or(0);
    let kept: usize = match &keep {
        Some(k) => model.layout.specs.iter().filter(|s| (k.wanted)(&s.name)).map(|s| s.range().len()).sum(),
        None => 0,
    };
    let kept_bytes = keep.as_ref().map_or(0, |k| k.format.bytes_per_weight() * kept);
    let needed = 4 * (model.layout.total - kept) + kept_bytes + largest_file;
    crate::memory::check_available(needed, || format!("loading a model of {}", model.size_fields())).map_err(|e| e.in_file(path))?;
    let mut w = vec![0.0f32; model.layout.total];
    let mut stored: HashMap<String, QMatrix> = HashMap::new();
    // INT8 tensors kept, waiting for their scales (possibly in another shard)
    let mut int8_kept: Vec<(String, Vec<i8>, PathBuf)> = vec![];
    let mut seen = vec![false; model.layout.specs.len()];
    let index: HashMap<&str, usize> = model.layout.specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    // FP8 checkpoints (DeepSeek-V3) store `<name>_scale_inv` beside each quantised
    // weight (a scale per 128×128 block), INT8 ones (`ultramoe quantize`) `<name>_scale`
    // (one per row), possibly in another shard: those pairs are gathered first and
    // placed at the end; every other tensor is placed as it is read.
    let mut deferred: BTreeMap<String, (Tensor, PathBuf, bool)> = BTreeMap::new();
    let mut placed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let (br, bc) = fp8_block(&model.cfg.raw);
    let mut place = |name: &str, t: &Tensor, file: &Path, scale: Option<(&str, &Tensor, &Path, bool)>| -> Result<()> {
        let Some(&i) = index.get(name) else {
            return Err(Error::field(name, format!("unexpected tensor for a {} model with this config", model.cfg.arch.model_type())).in_file(file));
        };
        let spec = &model.layout.specs[i];
        let whole = spec.whole_shape();
        if t.shape != whole {
            return Err(Error::field(name, format!("shape {:?} does not match the config's {:?}", t.shape, whole)).in_file(file));
        }
        // A tensor-parallel slice is dequantised whole, then cut (the scales' blocks
        // follow the whole tensor).
        let mut sliced = Vec::new();
        let dst: &mut [f32] = if spec.split.is_some() {
            sliced = t.f32(name).map_err(|e| e.in_file(file))?.to_vec();
            &mut sliced
        } else {
            let dst = &mut w[spec.range()];
            dst.copy_from_slice(t.f32(name).map_err(|e| e.in_file(file))?);
            dst
        };
        if let Some((key, s, sfile, per_row)) = scale {
            let (rows, cols) = (whole[0], whole.get(1).copied().unwrap_or(1));
            let (sr, sc) = if per_row { (rows, 1) } else { (rows.div_ceil(br), cols.div_ceil(bc)) };
            if s.shape != [sr, sc] {
                let blocks = if per_row { "one per row".to_string() } else { format!("{br}×{bc} blocks") };
                return Err(Error::field(key, format!("shape {:?}, expected {:?} for {blocks}", s.shape, [sr, sc])).in_file(sfile));
            }
            let sv = s.f32(key)?;
            if per_row {
                dst.chunks_mut(cols).zip(sv).for_each(|(row, &k)| row.iter_mut().for_each(|x| *x *= k));
            } else {
                for r in 0..rows {
                    for c in 0..cols {
                        dst[r * cols + c] *= sv[(r / br) * sc + c / bc];
                    }
                }
            }
        }
        // A NaN or Inf weight would turn every loss and answer into NaN.
        let bad = count_nonfinite(dst);
        if bad > 0 {
            return Err(Error::field(name, format!("{bad} of {} values are not finite (NaN or Inf)", dst.len())).in_file(file));
        }
        if let Some(split) = spec.split {
            w[spec.range()].copy_from_slice(&split.take(&sliced, &whole));
        }
        seen[i] = true;
        Ok(())
    };
    for file in files {
        let bytes = std::fs::read(&file).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(&file))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::msg(format!("not a valid safetensors file: {e}")).in_file(&file))?;
        // In name order, so the first error a file has is the same every time.
        let mut listed = st.tensors();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in listed {
            // Tensors another expert-parallel rank holds (and their FP8 or INT8 scales) are
            // skipped.
            let remote = model.layout.is_remote(name.strip_suffix("_scale_inv").or_else(|| name.strip_suffix("_scale")).unwrap_or(&name));
            if remote || ignorable(&name, &model.cfg) || model.layout.aliases.contains_key(&name) {
                continue;
            }
            let fp8 = view.dtype() == Dtype::F8_E4M3;
            let int8 = view.dtype() == Dtype::I8;
            let spec = index.get(name.as_str()).map(|&i| &model.layout.specs[i]);
            let keepable = spec.is_some_and(|s| s.split.is_none() && view.shape() == s.whole_shape());
            if keepable && keep.as_ref().is_some_and(|k| k.takes(&name, view.dtype())) {
                let b = view.data();
                let rows = view.shape().first().copied().unwrap_or(1);
                if int8 {
                    int8_kept.push((name.clone(), b.iter().map(|&x| x as i8).collect(), file.clone()));
                } else {
                    let bits: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                    // exponent all ones: BF16's infinities and NaNs
                    let bad = bits.iter().filter(|&&x| x & 0x7f80 == 0x7f80).count();
                    if bad > 0 {
                        return Err(Error::field(&name, format!("{bad} of {} values are not finite (NaN or Inf)", bits.len())).in_file(&file));
                    }
                    stored.insert(name.clone(), QMatrix::from_bf16(bits, rows, b.len() / 2 / rows.max(1)));
                }
                placed.insert(name);
                continue;
            }
            let data = convert(&name, &view).map_err(|e| e.in_file(&file))?;
            // INT8 scales are per row: [rows] as written, [rows, 1] as the check reads them.
            let shape = if name.ends_with("_scale") && view.shape().len() == 1 { vec![view.shape()[0], 1] } else { view.shape().to_vec() };
            let t = Tensor { shape, data };
            if fp8 || int8 || name.ends_with("_scale_inv") || name.ends_with("_scale") {
                deferred.insert(name, (t, file.clone(), fp8 || int8));
            } else {
                place(&name, &t, &file, None)?;
                placed.insert(name);
            }
        }
    }
    for (name, (t, file, quantised)) in &deferred {
        if let Some(base) = name.strip_suffix("_scale_inv").or_else(|| name.strip_suffix("_scale")) {
            if deferred.contains_key(base) || placed.contains(base) {
                continue;
            }
        }
        let scale = if *quantised {
            let (key, per_row) = if deferred.contains_key(&format!("{name}_scale")) { (format!("{name}_scale"), true) } else { (format!("{name}_scale_inv"), false) };
            let (s, sfile, _) = deferred.get(&key).ok_or_else(|| Error::field(name, format!("quantised weight without `{key}`")).in_file(file))?;
            Some((key, s, sfile, per_row))
        } else {
            None
        };
        place(name, t, file, scale.as_ref().map(|(k, s, f, r)| (k.as_str(), *s, f.as_path(), *r)))?;
    }
    for (name, q, file) in int8_kept {
        let key = format!("{name}_scale");
        let (s, sfile, _) = deferred.get(&key).ok_or_else(|| Error::field(&name, format!("quantised weight without `{key}`")).in_file(&file))?;
        let rows = model.layout.specs[index[name.as_str()]].whole_shape()[0];
        if s.shape != [rows, 1] {
            return Err(Error::field(&key, format!("shape {:?}, expected [{rows}] (one per row)", s.shape)).in_file(sfile));
        }
        let scale = s.f32(&key)?.to_vec();
        let bad = count_nonfinite(&scale);
        if bad > 0 {
            return Err(Error::field(&key, format!("{bad} of {} values are not finite (NaN or Inf)", scale.len())).in_file(sfile));
        }
        let cols = q.len() / rows.max(1);
        stored.insert(name, QMatrix::from_int8(q, scale, rows, cols));
    }
    for name in stored.keys() {
        seen[index[name.as_str()]] = true;
    }
    drop(deferred);
    let missing: Vec<&str> = model.layout.specs.iter().zip(&seen).filter(|(_, s)| !**s).map(|(p, _)| p.name.as_str()).collect();
    if !missing.is_empty() {
        let more = if missing.len() > 3 { format!(" and {} more", missing.len() - 3) } else { String::new() };
        return Err(Error::msg(format!("checkpoint is missing tensor(s) {}{more}", missing[..missing.len().min(3)].join(", "))).in_file(path));
    }
    crate::memory::return_freed_heap();
    Ok((w, stored))
}

/// How many of `v` are NaN or infinite.
pub fn count_nonfinite(v: &[f32]) -> usize {
    v.iter().filter(|x| !x.is_finite()).count()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes named f32 tensors to `path` atomically (temporary file, then rename).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors.iter().map(|(n, s, d)| (n.clone(), s.clone(), f32_bytes(d))).collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::field(n, e.to_string()))?)))
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, metadata).map_err(|e| Error::msg(e.to_string()).in_file(path))?;
    write_atomic(path, &data)
}

/// Writes bytes to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::msg(format!("cannot create directory: {e}")).in_file(dir))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|s| s.to_str()).unwrap_or("checkpoint")));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::msg(format!("cannot create: {e}")).in_file(&tmp))?;
    let written = f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| Error::msg(format!("cannot write: {e}")).in_file(&tmp));
    let placed = written.and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::msg(format!("cannot rename into place: {e}")).in_file(path)));
    if placed.is_err() {
        // A full disk or a failed rename leaves no partial temporary behind.
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

/// Every tensor-parallel slice of `w` (a buffer in the model's layout: weights, or an
/// optimizer moment), gathered whole (name → (whole shape, values)); empty without
/// tensor parallelism. Collective over the tensor-parallel
/// group: every rank of it calls this, with the same layout.
pub fn gather_splits(model: &Model, w: &[f32]) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>> {
    let mut out = HashMap::new();
    let Some(tp) = &model.tp else { return Ok(out) };
    for s in &model.layout.specs {
        let Some(split) = s.split else { continue };
        let parts = tp.group().all_gather_f32(&w[s.range()]).map_err(|e| Error::msg(format!("gathering {} over the tensor-parallel group: {e}", s.name)))?;
        let whole_shape = split.whole_shape(&s.shape);
        let mut whole = vec![0.0; parts.len()];
        for (rank, part) in parts.chunks(s.len()).enumerate() {
            split.put_as(rank, &mut whole, part, &whole_shape);
        }
        out.insert(s.name.clone(), (whole_shape, whole));
    }
    Ok(out)
}

/// `(name, shape, values)` of the tensors `keep` selects, tensor-parallel slices
/// replaced by their whole tensors from `whole`.
pub fn held_tensors<'a>(model: &Model, w: &'a [f32], whole: &'a HashMap<String, (Vec<usize>, Vec<f32>)>, keep: impl Fn(&crate::params::ParamSpec) -> bool) -> Vec<(String, Vec<usize>, &'a [f32])> {
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = model
        .layout
        .specs
        .iter()
        .filter(|s| keep(s))
        .map(|s| match whole.get(&s.name) {
            Some((shape, data)) => (s.name.clone(), shape.clone(), &data[..]),
            None => (s.name.clone(), s.shape.clone(), &w[s.range()]),
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// True on the rank of its tensor-parallel group that writes files (rank 0).
pub fn writes_tensor_parallel_share(model: &Model) -> bool {
    model.tp.as_ref().is_none_or(|t| t.rank() == 0)
}

/// Saves `config.json` and the weights to `dir` in the Hugging Face layout. With
/// `max_shard_bytes`, tensors are split over `model-0000i-of-0000n.safetensors` files
/// plus `model.safetensors.index.json`; otherwise one `model.safetensors`. Under tensor
/// parallelism every rank of the group calls it: the slices are gathered and the
/// group's rank 0 writes whole tensors.
pub fn save_weights(model: &Model, w: &[f32], dir: &Path, max_shard_bytes: Option<usize>) -> Result<()> {
    let whole = gather_splits(model, w)?;
    if !writes_tensor_parallel_share(model) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::msg(format!("cannot create directory: {e}")).in_file(dir))?;
    let cfg_text = serde_json::to_string_pretty(&model.cfg.raw).expect("config serialises");
    write_atomic(&dir.join("config.json"), cfg_text.as_bytes())?;
    let tensors = held_tensors(model, w, &whole, |_| true);
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let Some(limit) = max_shard_bytes else {
        return write_safetensors(&dir.join("model.safetensors"), &tensors, meta);
    };
    let mut shards: Vec<Vec<(String, Vec<usize>, &[f32])>> = vec![vec![]];
    let mut size = 0usize;
    for t in tensors {
        let b = 4 * t.2.len();
        if size + b > limit && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += b;
        shards.last_mut().unwrap().push(t);
    }
    let n = shards.len();
    let mut entries = vec![];
    for (i, shard) in shards.iter().enumerate() {
        write_safetensors(&dir.join(shard_file(i, n)), shard, meta.clone())?;
        entries.extend(shard.iter().map(|(name, _, d)| (name.clone(), i, d.len())));
    }
    write_index(dir, &entries, n)
}

/// `model-0000i-of-0000n.safetensors` for shard `i` (0-based) of `n`.
pub fn shard_file(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// Writes `model.safetensors.index.json` for `(name, shard, elements)` entries.
fn write_index(dir: &Path, entries: &[(String, usize, usize)], n: usize) -> Result<()> {
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (name, shard, len) in entries {
        weight_map.insert(name.clone(), serde_json::Value::String(shard_file(*shard, n)));
        total += 4 * len;
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_atomic(&dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap().as_bytes())?;
    // A single-file checkpoint left from an earlier save would shadow nothing (the index
    // wins) but would confuse a reader; remove it.
    let _ = std::fs::remove_file(dir.join("model.safetensors"));
    Ok(())
}

/// True for the tensors expert-parallel rank `ep_rank` saves: the experts whose primary
/// copy it holds, and on rank 0 also every replicated tensor.
pub fn saved_by(layout: &crate::params::ParamLayout, spec: &crate::params::ParamSpec, ep_rank: usize) -> bool {
    if spec.expert {
        layout.owner(&spec.name) == ep_rank
    } else {
        ep_rank == 0
    }
}

/// Saves this rank's share of the model to `dir`. Without expert or pipeline
/// parallelism that is the whole model ([`save_weights`]). Otherwise, with `S` pipeline
/// stages of `P` expert-parallel ranks, the rank of stage `s` and expert-parallel index
/// `k` writes shard `s·P + k` of `S·P` with its stage's experts whose primary copy it
/// holds (index 0 also the stage's replicated tensors), and the first writes
/// `config.json` and the index naming every tensor's shard: the Hugging Face sharded
/// layout, which loads as one model under any layout. Called by one rank of each
/// (stage, expert-parallel index) pair (the other data-parallel copies hold the same
/// values).
pub fn save_model_share(model: &Model, w: &[f32], dir: &Path) -> Result<()> {
    let (k, p) = model.ep_rank_size();
    let (s, stages) = (model.stage.rank, model.stage.ranks);
    if p == 1 && stages == 1 {
        return save_weights(model, w, dir, None);
    }
    let whole = gather_splits(model, w)?;
    if !writes_tensor_parallel_share(model) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::msg(format!("cannot create directory: {e}")).in_file(dir))?;
    let tensors = held_tensors(model, w, &whole, |t| saved_by(&model.layout, t, k));
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let shards = stages * p;
    write_safetensors(&dir.join(shard_file(share_index(model), shards)), &tensors, meta)?;
    if k == 0 && s == 0 {
        let cfg_text = serde_json::to_string_pretty(&model.cfg.raw).expect("config serialises");
        write_atomic(&dir.join("config.json"), cfg_text.as_bytes())?;
        let entries: Vec<(String, usize, usize)> =
            model.layout.logical.iter().map(|t| (t.name.clone(), t.stage * p + t.owner, t.shape.iter().product())).collect();
        write_index(dir, &entries, shards)?;
    }
    Ok(())
}

/// This rank's shard of a saved share: `stage · P + ep_rank` (see [`save_model_share`]),
/// and how many shards the layout writes.
pub fn share_index(model: &Model) -> usize {
    let (k, p) = model.ep_rank_size();
    model.stage.rank * p + k
}
