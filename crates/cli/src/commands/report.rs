//! `ultramoe report RUN_DIR`: charts of a run (loss, learning rate, gradient norm,
//! throughput and MFU, memory, expert load per MoE layer, rank imbalance,
//! communication, the pipeline timeline of the last step), an `index.html` showing them,
//! and a short summary.

use super::CliResult;
use clap::Args;
use std::path::PathBuf;
use ultramoe_report::chart::Format;

/// Options of `ultramoe report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run directory with `metrics.jsonl` (from `ultramoe train`).
    pub run_dir: PathBuf,
    /// Directory for the charts, `index.html` and `summary.txt` (default: RUN_DIR/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Image format: png or svg.
    #[arg(long, default_value = "png")]
    pub format: String,
}

/// `ultramoe report`.
pub fn run(a: ReportArgs) -> CliResult {
    let format = Format::parse(&a.format).map_err(|e| e.to_string())?;
    let out = a.out.unwrap_or_else(|| a.run_dir.join("report"));
    let report = ultramoe_report::run::write_report(&a.run_dir, &out, format).map_err(|e| e.to_string())?;
    for line in &report.summary {
        println!("{line}");
    }
    println!("{} charts ({}) and {}:", report.charts.len(), format.extension(), report.index.display());
    for (path, title) in &report.charts {
        println!("  {:<28} {title}", path.file_name().and_then(|n| n.to_str()).unwrap_or_default());
    }
    Ok(())
}
