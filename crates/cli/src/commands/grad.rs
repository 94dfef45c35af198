//! `ultramoe grad`: the verification door. Reads `input_ids` (int64 `[B, T]`) from a
//! safetensors file, runs forward and backward with labels = input_ids, and writes
//! `logits`, `loss` and `grad.<name>` for every checkpoint tensor — the format of the
//! reference fixtures, so any implementation can be held against ours.

use super::{load_model, CliResult};
use clap::Args;
use std::path::PathBuf;
use ultramoe_model::checkpoint::{read_safetensors, write_safetensors};
use ultramoe_model::shifted_targets;

/// Options of `ultramoe grad`.
#[derive(Args, Debug)]
pub struct GradArgs {
    /// Model directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file with `input_ids`, int64 `[B, T]`.
    #[arg(long)]
    pub input_ids: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

/// `ultramoe grad`.
pub fn run(a: GradArgs) -> CliResult {
    let (model, w) = load_model(&a.model)?;
    let inputs = read_safetensors(&a.input_ids).map_err(|e| e.to_string())?;
    let t = inputs.get("input_ids").ok_or_else(|| format!("{}: `input_ids`: missing", a.input_ids.display()))?;
    let ids64 = t.i64("input_ids").map_err(|e| e.in_file(&a.input_ids).to_string())?;
    if t.shape.len() != 2 || t.shape[1] < 2 {
        return Err(format!("{}: `input_ids`: shape {:?} is not [B, T] with T ≥ 2", a.input_ids.display(), t.shape));
    }
    let (b, tt) = (t.shape[0], t.shape[1]);
    if tt > model.cfg.max_position {
        return Err(format!("{}: `input_ids`: T = {tt} exceeds max_position_embeddings = {}", a.input_ids.display(), model.cfg.max_position));
    }
    let v = model.cfg.vocab_size as i64;
    if let Some(bad) = ids64.iter().find(|&&x| x < 0 || x >= v) {
        return Err(format!("{}: `input_ids`: token {bad} is outside the vocabulary (0..{v})", a.input_ids.display()));
    }
    let ids: Vec<u32> = ids64.iter().map(|&x| x as u32).collect();
    let fwd = model.forward(&w, &ids, b, tt);
    let logits = fwd.logits.clone();
    let targets = shifted_targets(&ids, tt);
    let (loss, count) = model.loss(&fwd, &targets);
    let mut g = vec![0.0f32; model.layout.total];
    model.backward(&w, &mut g, fwd, &targets, 1.0 / count.max(1) as f32);
    let loss_v = [loss];
    let mut out: Vec<(String, Vec<usize>, &[f32])> =
        vec![("logits".into(), vec![b, tt, model.cfg.vocab_size], &logits), ("loss".into(), vec![], &loss_v)];
    for s in &model.layout.specs {
        out.push((format!("grad.{}", s.name), s.shape.clone(), &g[s.range()]));
    }
    write_safetensors(&a.out, &out, None).map_err(|e| e.to_string())?;
    eprintln!("loss {loss:.6}; wrote logits, loss and {} gradients to {}", model.layout.specs.len(), a.out.display());
    Ok(())
}
