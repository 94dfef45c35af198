//! The report of a training run: charts of its `metrics.jsonl` (and of
//! `pipeline_timeline.json` where the trainer wrote one), an `index.html` that shows
//! them, and a short text summary.

use crate::chart::{Chart, Format, HeatMap, HeatPanel, Lines, Series, Span, Timeline, PALETTE};
use serde_json::Value;
use std::path::{Path, PathBuf};
use ultramoe_config::{Error, Result};
use ultramoe_train::trace::{PassEvent, PassKind};
use ultramoe_train::trainer::{rank_load_imbalance, rank_loads};

/// Steps whose throughput is left out of the medians (the first steps warm caches and
/// the allocator).
const WARMUP_STEPS: usize = 5;

/// MoE layers per heat-map image (more go to further images).
const LAYERS_PER_IMAGE: usize = 8;

/// Columns of a heat map at most (steps are averaged into this many bins).
const MAX_COLUMNS: usize = 160;

/// What [`write_report`] wrote.
#[derive(Debug)]
pub struct Report {
    /// each chart's file and title, in the order `index.html` shows them
    pub charts: Vec<(PathBuf, String)>,
    /// `index.html`
    pub index: PathBuf,
    /// the summary's lines (also written as `summary.txt`)
    pub summary: Vec<String>,
}

/// One step's record of `metrics.jsonl`.
struct Step<'a>(&'a Value);

impl Step<'_> {
    fn f(&self, key: &str) -> Option<f64> {
        self.0.get(key)?.as_f64()
    }
    fn list(&self, key: &str) -> Option<Vec<f64>> {
        self.0.get(key)?.as_array()?.iter().map(|x| x.as_f64()).collect()
    }
    fn table(&self, key: &str) -> Option<Vec<Vec<usize>>> {
        serde_json::from_value(self.0.get(key)?.clone()).ok()
    }
}

/// Reads `metrics.jsonl`: one JSON object per line, each with a `step`.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::msg(format!("cannot read: {e}")).in_file(path))?;
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| Error::msg(format!("line {}: not valid JSON: {e}", i + 1)).in_file(path))?;
        if v.get("step").and_then(Value::as_f64).is_none() {
            return Err(Error::field("step", format!("line {}: missing or not a number", i + 1)).in_file(path));
        }
        steps.push(v);
    }
    if steps.is_empty() {
        return Err(Error::msg("no steps recorded").in_file(path));
    }
    Ok(steps)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// A series of `value` against the step, over the steps that have it.
fn series(steps: &[Value], name: &str, value: impl Fn(&Step) -> Option<f64>) -> Option<Series> {
    let points: Vec<(f64, f64)> = steps.iter().filter_map(|v| Some((Step(v).f("step")?, value(&Step(v))?))).collect();
    (!points.is_empty()).then(|| Series { name: name.into(), points })
}

fn lines(title: &str, y_label: &str, series: Vec<Option<Series>>) -> Option<Chart> {
    let series: Vec<Series> = series.into_iter().flatten().collect();
    (!series.is_empty()).then(|| Chart::Lines(Lines { title: title.into(), x_label: "step".into(), y_label: y_label.into(), series }))
}

/// Per MoE layer, the per-expert load of each column of steps over the layer's mean
/// expert load in that column (1 = even).
fn load_panels(counts: &[Vec<Vec<usize>>]) -> Vec<HeatPanel> {
    let (steps, layers) = (counts.len(), counts.first().map_or(0, |c| c.len()));
    let cols = steps.min(MAX_COLUMNS);
    (0..layers)
        .map(|l| {
            let experts = counts[0][l].len();
            let cells = (0..cols)
                .map(|c| {
                    let (s0, s1) = (c * steps / cols, ((c + 1) * steps / cols).max(c * steps / cols + 1));
                    let mut sum = vec![0.0; experts];
                    for step in &counts[s0..s1] {
                        for (e, &x) in step.get(l).into_iter().flatten().enumerate().take(experts) {
                            sum[e] += x as f64;
                        }
                    }
                    let m = mean(&sum);
                    sum.iter().map(|x| if m > 0.0 { x / m } else { 1.0 }).collect()
                })
                .collect();
            HeatPanel { title: format!("MoE layer {l}"), cells }
        })
        .collect()
}

/// The pipeline timeline of `pipeline_timeline.json`, if the run wrote one.
fn timeline(run_dir: &Path) -> Result<Option<Chart>> {
    let path = run_dir.join("pipeline_timeline.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::msg(format!("not valid JSON: {e}")).in_file(&path))?;
    let events: Vec<PassEvent> = v
        .get("events")
        .cloned()
        .and_then(|e| serde_json::from_value(e).ok())
        .ok_or_else(|| Error::field("events", "missing or not a list of pass intervals").in_file(&path))?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (stages, vpp) = (num("stages").max(1) as usize, num("vpp").max(1));
    let two_lanes = |s: usize| events.iter().any(|e| e.stage == s && e.lane == 1);
    let mut rows = Vec::new();
    let mut row_of = std::collections::HashMap::new();
    for s in 0..stages {
        if two_lanes(s) {
            row_of.insert((s, 1), rows.len());
            rows.push(format!("stage {s} forwards"));
            row_of.insert((s, 0), rows.len());
            rows.push(format!("stage {s} backwards"));
        } else {
            row_of.insert((s, 0), rows.len());
            rows.push(format!("stage {s}"));
        }
    }
    let kinds = vec![
        ("forward".to_string(), PALETTE[0]),
        ("backward".to_string(), PALETTE[1]),
        ("waiting for another stage".to_string(), plotters::style::RGBColor(150, 150, 150)),
        ("send".to_string(), PALETTE[4]),
    ];
    // Passes first, the waits and sends inside them on top.
    let mut ordered = events.clone();
    ordered.sort_by_key(|e| matches!(e.kind, PassKind::Wait | PassKind::Send));
    let spans = ordered
        .iter()
        .filter_map(|e| {
            let row = *row_of.get(&(e.stage, e.lane))?;
            let name = |p: &str| if vpp > 1 { format!("{p}{}.{}", e.mb, e.chunk) } else { format!("{p}{}", e.mb) };
            let text = match e.kind {
                PassKind::Forward => name("F"),
                PassKind::Backward => name("B"),
                _ => String::new(),
            };
            Some(Span { row, start: e.start_s, end: e.end_s, kind: e.kind.code(), text })
        })
        .collect();
    let title = format!(
        "Pipeline timeline of step {} ({}, {stages} stage(s){}, {} micro-batches)",
        num("step"),
        v.get("schedule").and_then(Value::as_str).unwrap_or("?"),
        if vpp > 1 { format!(" × {vpp} chunks") } else { String::new() },
        num("micro_batches")
    );
    Ok(Some(Chart::Timeline(Timeline { title, x_label: "seconds since the step's passes began (each stage's clock)".into(), rows, kinds, spans })))
}

/// Every chart of the run, with its file stem.
fn charts(run_dir: &Path, steps: &[Value]) -> Result<Vec<(String, Chart)>> {
    let mut out: Vec<(String, Option<Chart>)> = Vec::new();
    let nonzero = |key: &str| steps.iter().any(|v| Step(v).f(key).is_some_and(|x| x != 0.0));
    out.push((
        "loss".into(),
        lines(
            "Loss",
            "cross-entropy (nats / token)",
            vec![
                series(steps, "training loss", |s| s.f("loss")),
                series(steps, "held-out loss", |s| s.f("eval_loss")),
                if nonzero("aux_loss") { series(steps, "auxiliary balancing loss", |s| s.f("aux_loss")) } else { None },
            ],
        ),
    ));
    out.push(("heldout_accuracy".into(), lines("Held-out accuracy", "accuracy (%)", vec![series(steps, "held-out accuracy", |s| Some(100.0 * s.f("eval_accuracy")?))])));
    out.push(("learning_rate".into(), lines("Learning rate", "learning rate", vec![series(steps, "learning rate", |s| s.f("lr"))])));
    out.push(("grad_norm".into(), lines("Gradient norm (before clipping)", "global L2 norm", vec![series(steps, "gradient norm", |s| s.f("grad_norm"))])));
    out.push(("throughput".into(), lines("Throughput", "tokens / s (all ranks)", vec![series(steps, "tokens/s", |s| s.f("tokens_per_s"))])));
    out.push(("mfu".into(), lines("Model FLOP utilisation", "MFU (% of the measured GEMM peak)", vec![series(steps, "MFU", |s| Some(100.0 * s.f("mfu")?))])));
    // Heap bytes are counted per process: a stage's figure is its first rank's process
    // (under `--ranks` in one process, every rank's together).
    let stages = steps.iter().filter_map(|v| Step(v).list("stage_peak_bytes")).map(|l| l.len()).max().unwrap_or(0);
    let mut memory = vec![];
    if stages <= 1 {
        memory.push(series(steps, "measured (rank 0's process)", |s| Some(s.f("peak_bytes")? / 1e6)));
    }
    for st in 0..stages {
        let name = |what: &str| if stages > 1 { format!("stage {st} {what}") } else { what.to_string() };
        if stages > 1 {
            memory.push(series(steps, &name("measured (its first rank's process)"), |s| Some(s.list("stage_peak_bytes")?.get(st)? / 1e6)));
        }
        memory.push(series(steps, &name("predicted (one rank)"), |s| s.list("stage_predicted_peak_bytes")?.get(st).filter(|&&x| x > 0.0).map(|x| x / 1e6)));
    }
    out.push(("memory".into(), lines("Peak memory per step", "heap bytes (MB)", memory)));

    let counts: Vec<Vec<Vec<usize>>> = steps.iter().filter_map(|v| Step(v).table("expert_counts")).filter(|c| !c.is_empty()).collect();
    if counts.len() == steps.len() && counts[0].iter().all(|l| !l.is_empty()) {
        let (first, last) = (Step(&steps[0]).f("step").unwrap_or(1.0), Step(&steps[steps.len() - 1]).f("step").unwrap_or(1.0));
        let panels = load_panels(&counts);
        let files = panels.len().div_ceil(LAYERS_PER_IMAGE);
        for (k, group) in panels.chunks(LAYERS_PER_IMAGE).enumerate() {
            let stem = if files == 1 { "expert_load".to_string() } else { format!("expert_load_{}-{}", k * LAYERS_PER_IMAGE, k * LAYERS_PER_IMAGE + group.len() - 1) };
            let heat = HeatMap {
                title: "Tokens routed to each expert, relative to the layer's mean".into(),
                x_label: "step".into(),
                y_label: "expert".into(),
                x_range: (first - 0.5, last + 0.5),
                panels: group.to_vec(),
                scale_label: "tokens / mean tokens per expert".into(),
            };
            out.push((stem, Some(Chart::Heat(heat))));
        }
    }
    // Rank imbalance: as the experts were placed, and as contiguous blocks would have been.
    let ranks = steps.iter().filter_map(|v| Step(v).table("rank_counts")).map(|c| c.first().map_or(0, |l| l.len())).max().unwrap_or(0);
    if ranks > 1 {
        let contiguous = |s: &Step| Some(rank_load_imbalance(&rank_loads(&s.table("expert_counts")?, ranks)));
        let placed = series(steps, "as placed", |s| s.f("rank_load_imbalance"));
        let blocks = series(steps, "contiguous expert blocks (no placement)", contiguous);
        let differ = match (&placed, &blocks) {
            (Some(a), Some(b)) => a.points.iter().zip(&b.points).any(|(p, q)| (p.1 - q.1).abs() > 1e-9),
            _ => false,
        };
        let predicted = if nonzero("predicted_rank_load_imbalance") { series(steps, "predicted by the placement", |s| s.f("predicted_rank_load_imbalance").filter(|&x| x > 0.0)) } else { None };
        out.push((
            "rank_imbalance".into(),
            lines(&format!("Load imbalance over {ranks} expert-parallel ranks"), "busiest rank / mean rank (tokens)", vec![placed, if differ { blocks } else { None }, predicted]),
        ));
    }
    if nonzero("comm_s") {
        out.push((
            "communication".into(),
            lines(
                "Communication per step",
                "seconds",
                vec![
                    series(steps, "exposed (compute waited)", |s| s.f("exposed_comm_s")),
                    series(steps, "hidden behind compute", |s| Some((s.f("comm_s")? - s.f("exposed_comm_s")?).max(0.0))),
                    if nonzero("a2a_s") { series(steps, "of which all-to-all, exposed", |s| s.f("a2a_exposed_s")) } else { None },
                ],
            ),
        ));
    }
    out.push(("pipeline_timeline".into(), timeline(run_dir)?));
    Ok(out.into_iter().filter_map(|(stem, c)| Some((stem, c?))).collect())
}

/// The summary's lines.
fn summary(steps: &[Value]) -> Vec<String> {
    let n = steps.len();
    let s = |i: usize| Step(&steps[i]);
    let mut out = vec![];
    let layers = s(0).table("expert_counts").map(|c| (c.len(), c.first().map_or(0, |l| l.len())));
    out.push(match layers {
        Some((l, e)) if l > 0 => format!("{n} steps, {l} MoE layers × {e} experts"),
        _ => format!("{n} steps"),
    });
    if let (Some(a), Some(b)) = (s(0).f("loss"), s(n - 1).f("loss")) {
        out.push(format!("loss {a:.4} at step {} → {b:.4} at step {}", s(0).f("step").unwrap_or(0.0), s(n - 1).f("step").unwrap_or(0.0)));
    }
    let after = |key: &str| median(steps.iter().skip(WARMUP_STEPS.min(n.saturating_sub(1))).filter_map(|v| Step(v).f(key)).collect());
    let (tps, mfu) = (after("tokens_per_s"), after("mfu"));
    if tps.is_finite() {
        out.push(format!("throughput {tps:.0} tokens/s, MFU {:.1}% (medians after {} warm-up steps)", 100.0 * mfu, WARMUP_STEPS.min(n.saturating_sub(1))));
    }
    let peak = |v: &Value| Step(v).list("stage_peak_bytes").and_then(|l| l.into_iter().reduce(f64::max)).or_else(|| Step(v).f("peak_bytes"));
    let peak = steps.iter().filter_map(peak).fold(0.0, f64::max);
    if peak > 0.0 {
        out.push(format!("peak memory {:.1} MB (the largest stage's first rank's process)", peak / 1e6));
    }
    let window = (n / 10).max(1);
    let avg = |key: &str, r: std::ops::Range<usize>| mean(&steps[r].iter().filter_map(|v| Step(v).f(key)).collect::<Vec<_>>());
    if s(0).f("expert_imbalance").is_some() {
        out.push(format!(
            "expert imbalance (busiest / mean, worst layer): first {window} steps {:.2}, last {window} steps {:.2}",
            avg("expert_imbalance", 0..window),
            avg("expert_imbalance", n - window..n)
        ));
    }
    if s(0).f("rank_load_imbalance").is_some() {
        out.push(format!(
            "rank load imbalance: first {window} steps {:.2}, last {window} steps {:.2}",
            avg("rank_load_imbalance", 0..window),
            avg("rank_load_imbalance", n - window..n)
        ));
    }
    let comm: f64 = steps.iter().filter_map(|v| Step(v).f("comm_s")).sum();
    if comm > 0.0 {
        let exposed: f64 = steps.iter().filter_map(|v| Step(v).f("exposed_comm_s")).sum();
        out.push(format!("communication {comm:.3} s in all, {:.1}% hidden behind compute", 100.0 * (1.0 - exposed / comm).max(0.0)));
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Writes the report of the run in `run_dir` into `out_dir` (created if needed): one
/// image per chart in `format`, `summary.txt` and `index.html`.
pub fn write_report(run_dir: &Path, out_dir: &Path, format: Format) -> Result<Report> {
    let steps = read_metrics(&run_dir.join("metrics.jsonl"))?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::msg(format!("cannot create the report directory: {e}")).in_file(out_dir))?;
    let mut written = Vec::new();
    for (stem, chart) in charts(run_dir, &steps)? {
        let path = out_dir.join(format!("{stem}.{}", format.extension()));
        chart.save(&path, format)?;
        written.push((path, chart.title().to_string()));
    }
    let summary = summary(&steps);
    let text = summary.join("\n") + "\n";
    let txt = out_dir.join("summary.txt");
    std::fs::write(&txt, &text).map_err(|e| Error::msg(format!("cannot write: {e}")).in_file(&txt))?;
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ultramoe report: {0}</title></head>\n<body style=\"font-family: sans-serif; max-width: 1150px\">\n<h1>Run {0}</h1>\n<pre>{1}</pre>\n",
        html_escape(&run_dir.display().to_string()),
        html_escape(&text)
    );
    for (path, title) in &written {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        html += &format!("<h2>{}</h2>\n<img src=\"{}\" alt=\"{}\" style=\"max-width: 100%\">\n", html_escape(title), html_escape(name), html_escape(title));
    }
    html += "</body></html>\n";
    let index = out_dir.join("index.html");
    std::fs::write(&index, html).map_err(|e| Error::msg(format!("cannot write: {e}")).in_file(&index))?;
    Ok(Report { charts: written, index, summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_are_relative_to_each_columns_mean() {
        // two steps, one layer, two experts: (3, 1) then (1, 3) → each column averages
        // one step; the mean is 2.
        let counts = vec![vec![vec![3, 1]], vec![vec![1, 3]]];
        let p = load_panels(&counts);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].cells, vec![vec![1.5, 0.5], vec![0.5, 1.5]]);
    }

    #[test]
    fn many_steps_are_averaged_into_bins() {
        let counts: Vec<Vec<Vec<usize>>> = (0..2 * MAX_COLUMNS).map(|i| vec![vec![i % 2, 1 - i % 2]]).collect();
        let p = load_panels(&counts);
        assert_eq!(p[0].cells.len(), MAX_COLUMNS);
        // every bin holds one step of each kind: even
        assert!(p[0].cells.iter().all(|c| c == &vec![1.0, 1.0]));
    }

    #[test]
    fn medians_skip_non_finite_values() {
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
