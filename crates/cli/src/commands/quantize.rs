//! `ultramoe quantize`: a model directory saved with its matrices in BF16 or INT8, so
//! decoding loads a file half or a quarter the size and needs no conversion choice.

use super::{CliResult, WeightsArg};
use clap::Args;
use std::path::PathBuf;
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::{Model, ModelConfig};

/// Options of `ultramoe quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model directory to read (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Format of the projection, expert and head matrices (embeddings, norms and routers
    /// stay f32).
    #[arg(long, value_enum)]
    pub weights: WeightsArg,
    /// Directory to write: config.json (marked with the format), model.safetensors, and
    /// the source's other files (tokenizer, generation config).
    #[arg(long)]
    pub out: PathBuf,
}

/// `ultramoe quantize`.
pub fn run(a: QuantizeArgs) -> CliResult {
    if a.weights == WeightsArg::F32 {
        return Err("--weights: f32 is not a quantised format (bf16 or int8)".into());
    }
    if a.out.canonicalize().ok().is_some_and(|o| a.model.canonicalize().ok() == Some(o)) {
        return Err(format!("--out {}: the same directory as --model; write the quantised model elsewhere", a.out.display()));
    }
    let cfg = ModelConfig::from_file(&a.model.join("config.json")).map_err(|e| e.to_string())?;
    let model = Model::new(cfg);
    let w = load_weights(&model, &a.model).map_err(|e| e.to_string())?;
    let dw = DecodeWeights::new(&model, w, a.weights.format());
    dw.save(&model, &a.out).map_err(|e| e.to_string())?;
    // The tokenizer and the rest travel with the weights.
    let entries = std::fs::read_dir(&a.model).map_err(|e| format!("{}: {e}", a.model.display()))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        let weights = n.ends_with(".safetensors") || n == "model.safetensors.index.json" || n == "config.json";
        if e.path().is_file() && !weights && !n.starts_with('.') {
            std::fs::copy(e.path(), a.out.join(&name)).map_err(|err| format!("{}: cannot copy: {err}", e.path().display()))?;
        }
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let before: u64 = std::fs::read_dir(&a.model).map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors")).map(|e| size(&e.path())).sum()).unwrap_or(0);
    println!(
        "wrote {} ({} matrices): {:.1} MB of weights, from {:.1} MB",
        a.out.display(),
        a.weights.format().name(),
        size(&a.out.join("model.safetensors")) as f64 / 1e6,
        before as f64 / 1e6
    );
    Ok(())
}
