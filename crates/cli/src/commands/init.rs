//! `ultramoe init`: a model directory with freshly initialised weights, in the Hugging
//! Face layout (config.json + safetensors), for benchmarks and serving tests.

use super::CliResult;
use clap::Args;
use std::path::PathBuf;
use ultramoe_model::checkpoint::save_weights;
use ultramoe_model::init::init_weights;
use ultramoe_model::{Model, ModelConfig};

/// Options of `ultramoe init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// The model's config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// Directory to write (created; existing weights there are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Initialisation seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Split the weights into safetensors shards of at most this many megabytes.
    #[arg(long)]
    pub shard_mb: Option<usize>,
}

/// `ultramoe init`.
pub fn run(a: InitArgs) -> CliResult {
    let cfg = ModelConfig::from_file(&a.config).map_err(|e| e.to_string())?;
    let model = Model::new(cfg);
    ultramoe_model::memory::check_available(4 * model.layout.total, || format!("{}: the weights ({:.1} M parameters)", a.config.display(), model.n_params() as f64 / 1e6))
        .map_err(|e| e.to_string())?;
    let w = init_weights(&model.layout, a.seed);
    save_weights(&model, &w, &a.out, a.shard_mb.map(|m| m << 20)).map_err(|e| e.to_string())?;
    println!("wrote {} ({:.1} M parameters) to {}", a.config.display(), model.n_params() as f64 / 1e6, a.out.display());
    Ok(())
}
