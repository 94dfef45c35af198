//! `ultramoe report RUN_DIR`: expert-load statistics of a run, and a heat map of every
//! expert's load over the steps written as `RUN_DIR/expert_load.png`.

use super::CliResult;
use crate::png::encode_rgb;
use clap::Args;
use std::path::PathBuf;

/// Options of `ultramoe report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run directory with `metrics.jsonl` (from `ultramoe train`).
    pub run_dir: PathBuf,
    /// Output image (default: RUN_DIR/expert_load.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Diverging colour map of a load ratio (load / mean load): 0 → dark blue, 1 → white,
/// ≥ 2 → dark red.
fn colour(ratio: f64) -> [u8; 3] {
    let t = (ratio / 2.0).clamp(0.0, 1.0);
    let (lo, mid, hi) = ([33.0, 64.0, 154.0], [247.0, 247.0, 247.0], [178.0, 24.0, 43.0]);
    let (a, b, u) = if t < 0.5 { (lo, mid, t * 2.0) } else { (mid, hi, (t - 0.5) * 2.0) };
    [0, 1, 2].map(|i| (a[i] + (b[i] - a[i]) * u).round() as u8)
}

/// `ultramoe report`.
pub fn run(a: ReportArgs) -> CliResult {
    let path = a.run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    // steps × layers × experts
    let mut loads: Vec<Vec<Vec<f64>>> = Vec::new();
    let mut rank_imb: Vec<f64> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{}:{}: not valid JSON: {e}", path.display(), i + 1))?;
        let counts: Vec<Vec<f64>> = v
            .get("expert_counts")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .ok_or_else(|| format!("{}:{}: `expert_counts`: missing or not a list of lists", path.display(), i + 1))?;
        rank_imb.push(v.get("rank_load_imbalance").and_then(|x| x.as_f64()).unwrap_or(1.0));
        loads.push(counts);
    }
    let steps = loads.len();
    let (layers, experts) = match loads.first() {
        Some(l) if !l.is_empty() => (l.len(), l[0].len()),
        _ => return Err(format!("{}: no MoE expert counts recorded", path.display())),
    };
    // Image: one band of `experts` rows per layer; columns are steps, binned to ≤ 1000.
    let cols = steps.min(1000);
    let (cell_w, cell_h, gap) = ((1000 / cols).clamp(1, 8), 6, 4);
    let width = cols * cell_w;
    let height = layers * (experts * cell_h + gap) - gap;
    let mut rgb = vec![255u8; width * height * 3];
    for c in 0..cols {
        let (s0, s1) = (c * steps / cols, ((c + 1) * steps / cols).max(c * steps / cols + 1));
        for l in 0..layers {
            let mut avg = vec![0.0; experts];
            for step in &loads[s0..s1] {
                for (e, x) in step[l].iter().enumerate() {
                    avg[e] += x / (s1 - s0) as f64;
                }
            }
            let mean = avg.iter().sum::<f64>() / experts as f64;
            for (e, x) in avg.iter().enumerate() {
                let px = colour(if mean > 0.0 { x / mean } else { 1.0 });
                for y in 0..cell_h {
                    for xx in 0..cell_w {
                        let (row, col) = (l * (experts * cell_h + gap) + e * cell_h + y, c * cell_w + xx);
                        rgb[(row * width + col) * 3..(row * width + col) * 3 + 3].copy_from_slice(&px);
                    }
                }
            }
        }
    }
    let out = a.out.unwrap_or_else(|| a.run_dir.join("expert_load.png"));
    std::fs::write(&out, encode_rgb(width, height, &rgb)).map_err(|e| format!("{}: cannot write: {e}", out.display()))?;
    let ratio = |step: &Vec<Vec<f64>>| {
        step.iter()
            .map(|l| {
                let mean = l.iter().sum::<f64>() / l.len() as f64;
                l.iter().cloned().fold(0.0, f64::max) / mean.max(1e-12)
            })
            .fold(0.0, f64::max)
    };
    let window = (steps / 10).max(1);
    let avg = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let first: Vec<f64> = loads[..window].iter().map(ratio).collect();
    let last: Vec<f64> = loads[steps - window..].iter().map(ratio).collect();
    println!("{steps} steps, {layers} MoE layers × {experts} experts");
    println!("expert imbalance (busiest / mean, worst layer): first {window} steps {:.2}, last {window} steps {:.2}", avg(&first), avg(&last));
    println!(
        "rank load imbalance: first {window} steps {:.2}, last {window} steps {:.2}",
        avg(&rank_imb[..window]),
        avg(&rank_imb[steps - window..])
    );
    println!("heat map (rows: experts per layer, columns: steps; blue idle, white even, red hot): {}", out.display());
    Ok(())
}
