//! `ultramoe bench decode`: prefill and decode tokens per second of a model directory for
//! each weight format and batch size, against the memory-bandwidth limit measured in the
//! same run (bytes of weights one decoded token reads over the read bandwidth).

use super::{load_model, median, CliResult, WeightsArg};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use ultramoe_kernels::bandwidth::measure_read_bandwidth;
use ultramoe_model::decode::{CachedInput, LogitRows};
use ultramoe_model::decode_weights::DecodeWeights;
use ultramoe_model::kv_cache::SeqCache;
use ultramoe_model::Model;
use ultramoe_serve::sampling::argmax;

/// Options of `ultramoe bench decode`.
#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    /// Model directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Weight formats, comma-separated (f32, bf16, int8).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,int8")]
    pub weights: Vec<WeightsArg>,
    /// Sequences decoded together, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Every sequence starts from one prompt, prefilled once and its cache copied, and is
    /// fed random tokens while decoding, not its own greedy choice (which would keep the
    /// copies identical): the workload of `llama-batched-bench -pps`. The sequences'
    /// states then differ little, so their tokens pick far fewer distinct experts than
    /// independent prompts' do.
    #[arg(long)]
    pub shared_prompt: bool,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One timed generation: prefill seconds and decode seconds.
fn run_once(model: &Model, w: &DecodeWeights, batch: usize, prompt: usize, tokens: usize, seed: u32, shared: bool) -> (f64, f64) {
    let v = model.cfg.vocab_size as u32;
    let prefilled = if shared { 1 } else { batch };
    let prompts: Vec<Vec<u32>> =
        (0..prefilled).map(|b| (0..prompt as u32).map(|i| (i * 2654435761u32.wrapping_add(seed) + b as u32 * 97 + 1) % v).collect()).collect();
    let mut caches: Vec<SeqCache> = (0..prefilled).map(|_| SeqCache::new(model)).collect();
    let t = Instant::now();
    let mut last: Vec<u32> = {
        let mut inputs: Vec<CachedInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| CachedInput { tokens: p, cache: c }).collect();
        model.forward_cached(w, &mut inputs, LogitRows::Last).iter().map(|z| argmax(z)).collect()
    };
    let prefill = t.elapsed().as_secs_f64();
    if shared {
        caches.resize(batch, caches[0].clone());
        last.resize(batch, last[0]);
    }
    // The shared prompt's copies are fed tokens from a 32-bit LCG (Numerical Recipes'
    // constants), one stream for the whole run.
    let mut lcg = seed.wrapping_mul(2654435761).wrapping_add(12345);
    let mut random_token = move || {
        lcg = lcg.wrapping_mul(1664525).wrapping_add(1013904223);
        (lcg >> 8) % v
    };
    ultramoe_kernels::profile::take();
    let t = Instant::now();
    for _ in 0..tokens {
        let toks: Vec<[u32; 1]> = last.iter().map(|&x| [x]).collect();
        let mut inputs: Vec<CachedInput> = toks.iter().zip(caches.iter_mut()).map(|(p, c)| CachedInput { tokens: p, cache: c }).collect();
        let logits = model.forward_cached(w, &mut inputs, LogitRows::Last);
        last = if shared { (0..batch).map(|_| random_token()).collect() } else { logits.iter().map(|z| argmax(z)).collect() };
    }
    let decode = t.elapsed().as_secs_f64();
    let phases = ultramoe_kernels::profile::take();
    if !phases.is_empty() {
        eprintln!("decode phases (ULTRAMOE_PROFILE, inclusive, per decode step of the batch):");
        for (name, secs, calls) in phases {
            eprintln!("  {name:<26} {:>8.3} ms  ({} calls/step)", 1e3 * secs / tokens as f64, calls / tokens as u64);
        }
    }
    (prefill, decode)
}

/// `ultramoe bench decode`.
pub fn run(a: BenchDecodeArgs) -> CliResult {
    if a.batch.contains(&0) || a.prompt == 0 || a.tokens == 0 || a.reps == 0 {
        return Err("--batch, --prompt, --tokens and --reps must be at least 1".into());
    }
    let (model, w) = load_model(&a.model)?;
    if a.prompt + a.tokens > model.cfg.max_position {
        return Err(format!("--prompt + --tokens ({}) exceeds the model's {} positions", a.prompt + a.tokens, model.cfg.max_position));
    }
    let threads = rayon::current_num_threads();
    eprintln!(
        "{}: {:.1} M parameters ({:.1} M active per token), {threads} threads, CPU {} ({})",
        a.model.display(),
        model.n_params() as f64 / 1e6,
        model.active_params() as f64 / 1e6,
        super::bench::cpu_name(),
        ultramoe_kernels::gemm::vector_isa()
    );
    if !a.json {
        println!("| weights | batch | prefill tok/s | decode tok/s | bytes/token | bandwidth GB/s | limit tok/s | decode / limit |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    for fmt in &a.weights {
        let dw = DecodeWeights::new(&model, w.clone(), fmt.format());
        let bytes = dw.bytes_per_token(&model);
        for &b in &a.batch {
            run_once(&model, &dw, b, a.prompt.min(8), 2, 0, a.shared_prompt); // warm-up
            let mut pre = vec![];
            let mut dec = vec![];
            let mut bws = vec![];
            for r in 0..a.reps {
                // Bandwidth measured beside each run: a shared machine's drifts.
                bws.push(measure_read_bandwidth(1 << 30, 3));
                let (p, d) = run_once(&model, &dw, b, a.prompt, a.tokens, r as u32 + 1, a.shared_prompt);
                pre.push((if a.shared_prompt { 1 } else { b } * a.prompt) as f64 / p);
                dec.push((b * a.tokens) as f64 / d);
            }
            let (pre, dec, bw) = (median(pre), median(dec), median(bws));
            let limit = bw / bytes as f64;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"weights": fmt.format().name(), "batch": b, "prompt": a.prompt, "shared_prompt": a.shared_prompt, "tokens": a.tokens,
                        "prefill_tok_s": pre, "decode_tok_s": dec, "bytes_per_token": bytes, "read_bandwidth_gb_s": bw / 1e9,
                        "limit_tok_s": limit, "decode_over_limit": dec / limit / b as f64 * if b == 1 { 1.0 } else { b as f64 }})
                );
            } else {
                let ratio = if b == 1 { format!("{:.0}%", 100.0 * dec / limit) } else { "—".into() };
                println!("| {} | {b} | {pre:.1} | {dec:.1} | {:.1} MB | {:.1} | {limit:.1} | {ratio} |", fmt.format().name(), bytes as f64 / 1e6, bw / 1e9);
            }
        }
    }
    Ok(())
}
