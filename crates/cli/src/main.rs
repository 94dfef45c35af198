//! `ultramoe`: train, evaluate, solve, benchmark and verify MoE models on CPU.

mod commands;
mod launch;
mod presets;
mod progress;
mod solver;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Every heap allocation counted, for the memory figures in the metrics
/// (`peak_bytes`) and `ultramoe memory`.
#[global_allocator]
static ALLOC: ultramoe_kernels::memory::CountingAlloc = ultramoe_kernels::memory::CountingAlloc;

/// Mixture-of-Experts training and serving on CPUs.
#[derive(Parser)]
#[command(name = "ultramoe", version, about, long_about = None)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (the embedded math MoE by default) and save checkpoints.
    Train(commands::train::TrainArgs),
    /// Accuracy per problem kind on held-out generated problems (or a JSONL file), answers compared as mathematics.
    Eval(commands::eval::EvalArgs),
    /// Solve one math problem (arithmetic to systems and calculus); the final answer is printed alone on the last line, or a one-line refusal.
    Solve(commands::solve::SolveArgs),
    /// Generate text from a prompt with a KV cache, streamed as it is produced.
    Generate(commands::generate::GenerateArgs),
    /// Interactive chat with a model (its chat template; streamed replies).
    Chat(commands::generate::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming,
    /// /v1/models, /health, /metrics) with continuous batching.
    Serve(commands::serve::ServeArgs),
    /// Write a model directory with freshly initialised weights (Hugging Face layout).
    Init(commands::init::InitArgs),
    /// Save a model with its matrices in BF16 or INT8 (`--weights`), which decoding then
    /// loads as they are.
    Quantize(commands::quantize::QuantizeArgs),
    /// Tokenizers: `train` a byte-level BPE on text files.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::TokenizerCommand),
    /// Training data: `prepare` tokenizes text files into memory-mapped shards.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Train the default math MoE with a live progress bar, save it, solve samples.
    Demo(commands::demo::DemoArgs),
    /// Benchmarks: training-step throughput (`train`), decoding (`decode`), grouped vs dense GEMM (`gemm`), all-to-all (`comm`).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Forward + backward on given input ids; writes logits, loss and every gradient.
    Grad(commands::grad::GradArgs),
    /// Charts of a run (loss, throughput, memory, expert load, imbalance, communication,
    /// pipeline timeline) as PNG or SVG with an index.html, and a short summary.
    Report(commands::report::ReportArgs),
    /// Simulate MoE training at any scale and rank parallel layouts (TP/PP/VPP/EP/DP,
    /// micro-batch, recomputation); `--validate RUN_DIR` checks a finished run.
    Plan(commands::plan::PlanArgs),
    /// Measure this machine's GEMM, expert GEMM, attention, memory and copy rates into a
    /// hardware description for `plan`.
    Calibrate(commands::calibrate::CalibrateArgs),
    /// Predict a training step's memory (weights, moments, each layer's activations)
    /// before it runs; `--measure` checks it against real steps.
    Memory(commands::memory::MemoryArgs),
}

/// Keeps freed memory in the process for reuse. A training step allocates and frees the
/// same large activation buffers every step; by default glibc serves each from fresh
/// `mmap` pages and returns them on free, so every step pays page faults and zeroing
/// for its whole working set (about a tenth of the step time on the benchmark model).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_MAX: i32 = -4;
    const M_ARENA_MAX: i32 = -8;
    // SAFETY: mallopt only adjusts allocator tuning; called before any threads start.
    unsafe {
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
        // Worker threads' own arenas are trimmed on free regardless of the threshold;
        // one shared arena keeps their buffers too (allocation is rare and large here).
        mallopt(M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// A command whose reader went away (`ultramoe memory --detail | head`) ends quietly,
/// as Unix tools do, instead of panicking in `println!` on the closed pipe. Not for
/// commands that talk over sockets (`serve`, and `train` / `bench` under mpirun), where
/// a peer's closed connection must come back as an error, not end the process.
#[cfg(unix)]
fn end_quietly_on_closed_stdout() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: restores the default disposition of one signal, before any threads start.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn end_quietly_on_closed_stdout() {}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Train(_) | Command::Bench(_) | Command::Chat(_)) {
        end_quietly_on_closed_stdout();
    }
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global() {
        eprintln!("ultramoe: cannot start {threads} threads: {e}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Train(a) => commands::train::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Solve(a) => commands::solve::run(a),
        Command::Demo(a) => commands::demo::run(a),
        Command::Generate(a) => commands::generate::run_generate(a),
        Command::Chat(a) => commands::generate::run_chat(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Tokenizer(a) => commands::tokenizer::run(a),
        Command::Data(a) => commands::data::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Grad(a) => commands::grad::run(a),
        Command::Report(a) => commands::report::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Calibrate(a) => commands::calibrate::run(a),
        Command::Memory(a) => commands::memory::run(a),
    };
    if let Err(e) = result {
        eprintln!("ultramoe: error: {e}");
        std::process::exit(1);
    }
}

/// The model used when `--model` is not given: the demo's output if it exists, else the
/// checkpoint shipped in the repository.
pub fn default_model_dir() -> PathBuf {
    let demo = PathBuf::from("runs/demo/model");
    if demo.join("config.json").is_file() {
        return demo;
    }
    shipped_model_dir()
}

/// The checkpoint shipped in the repository (`models/math-moe`), trained on every kind.
pub fn shipped_model_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/math-moe"))
}
