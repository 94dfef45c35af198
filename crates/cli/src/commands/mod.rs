//! One module per subcommand.

pub mod bench;
pub mod bench_comm;
pub mod bench_decode;
pub mod calibrate;
pub mod data;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod init;
pub mod grad;
pub mod memory;
pub mod plan;
pub mod quantize;
pub mod report;
pub mod serve;
pub mod solve;
pub mod tokenizer;
pub mod train;

use std::path::Path;
use ultramoe_kernels::qlinear::WeightFormat;
use ultramoe_model::checkpoint::load_weights;
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::{Model, ModelConfig};

/// Errors shown to the user: one line, already with context.
pub type CliResult<T = ()> = Result<T, String>;

/// Loads a model directory (`config.json` + safetensors weights).
pub fn load_model(dir: &Path) -> CliResult<(Model, Vec<f32>)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
    let model = Model::new(cfg);
    let w = load_weights(&model, dir).map_err(|e| e.to_string())?;
    Ok((model, w))
}

/// Loads a model that will read and write the math tokenizer's tokens.
pub fn load_math_model(dir: &Path) -> CliResult<(Model, Vec<f32>)> {
    let (model, w) = load_model(dir)?;
    let need = ultramoe_train::data::tokenizer::VOCAB_SIZE;
    if model.cfg.vocab_size < need {
        return Err(format!(
            "{}: `vocab_size`: {} is smaller than the math tokenizer's {need} tokens; this model was not trained by `ultramoe train` on math data",
            dir.join("config.json").display(),
            model.cfg.vocab_size
        ));
    }
    Ok((model, w))
}

/// Weight formats for decoding (`--weights`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsArg {
    /// as trained
    #[default]
    F32,
    /// bfloat16 (2 bytes a weight)
    Bf16,
    /// int8 with a scale per output channel (1 byte a weight)
    Int8,
}

impl WeightsArg {
    /// The kernels' format.
    pub fn format(self) -> WeightFormat {
        match self {
            WeightsArg::F32 => WeightFormat::F32,
            WeightsArg::Bf16 => WeightFormat::Bf16,
            WeightsArg::Int8 => WeightFormat::Int8,
        }
    }
}

/// Loads a model directory for decoding, its matrices converted to `weights` (default:
/// the format `ultramoe quantize` saved it in, else f32): the whole model, or under
/// expert parallelism over `ep` this rank's share of the experts.
pub fn load_for_decoding(dir: &Path, weights: Option<WeightsArg>, ep: Option<std::sync::Arc<dyn ultramoe_dist::ProcessGroup>>) -> CliResult<(Model, DecodeWeights)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
    let weights = resolve_format(weights, &cfg, dir)?;
    let model = match ep {
        Some(g) => Model::share(cfg.clone(), ultramoe_model::Share { ep: Some(g), ..ultramoe_model::Share::whole(&cfg) }).map_err(|e| e.to_string())?,
        None => Model::new(cfg),
    };
    let dw = DecodeWeights::load(&model, dir, weights.format()).map_err(|e| e.to_string())?;
    Ok((model, dw))
}

/// The format a model directory's matrices were saved in (`"ultramoe_weights"` in its
/// config, written by `ultramoe quantize`; f32 without it).
pub fn saved_format(cfg: &ModelConfig) -> ultramoe_model::Result<WeightsArg> {
    match cfg.raw.get("ultramoe_weights") {
        None => Ok(WeightsArg::F32),
        Some(v) => match v.as_str() {
            Some("f32") => Ok(WeightsArg::F32),
            Some("bf16") => Ok(WeightsArg::Bf16),
            Some("int8") => Ok(WeightsArg::Int8),
            _ => Err(ultramoe_model::Error::field("ultramoe_weights", format!("{v}: expected \"f32\", \"bf16\" or \"int8\""))),
        },
    }
}

/// `weights` when given, else the format the model directory was saved in.
fn resolve_format(weights: Option<WeightsArg>, cfg: &ModelConfig, dir: &Path) -> CliResult<WeightsArg> {
    match weights {
        Some(w) => Ok(w),
        None => saved_format(cfg).map_err(|e| e.in_file(&dir.join("config.json")).to_string()),
    }
}

/// [`load_math_model`] for decoding, its matrices converted as [`load_for_decoding`]'s.
pub fn load_math_for_decoding(dir: &Path, weights: Option<WeightsArg>) -> CliResult<(Model, DecodeWeights)> {
    let (model, w) = load_math_model(dir)?;
    let weights = resolve_format(weights, &model.cfg, dir)?;
    let dw = DecodeWeights::new(&model, w, weights.format());
    Ok((model, dw))
}

/// The median (upper middle for an even count) of a non-empty list of measurements.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak GEMM FLOP/s for MFU, measured briefly unless given.
pub fn peak_flops(given_gflops: Option<f64>) -> f64 {
    match given_gflops {
        Some(g) => g * 1e9,
        None => ultramoe_kernels::gemm::measure_peak_flops(1024, 0.5),
    }
}
