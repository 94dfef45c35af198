//! `ultramoe generate` and `ultramoe chat`: text from a model directory, streamed as it
//! is generated, through the same batching engine and tokenizer as `ultramoe serve`.

use super::{load_for_decoding, CliResult, WeightsArg};
use clap::Args;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use ultramoe_serve::engine::{spawn, EngineConfig, EngineHandle, Event, Request};
use ultramoe_serve::sampling::SamplingParams;
use ultramoe_serve::tokenizer::{Message, TextStream, TextTokenizer};

/// How tokens are chosen and when generation stops.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Softmax temperature (0: always the most probable token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most probable tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most probable tokens whose probability mass reaches this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the most probable token's probability.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens already in the prompt or the output (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler (default: a fresh one).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> CliResult<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        p.check().map_err(|(field, why)| format!("--{}: {why}", field.replace('_', "-")))?;
        if self.max_tokens == 0 {
            return Err("--max-tokens: must be at least 1".into());
        }
        Ok(p)
    }
}

/// Options of `ultramoe generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, and tokenizer.json unless it is a math model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight format to decode with (converted on load; default: the format the model
    /// was saved in by `ultramoe quantize`, else f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// The prompt (a question for the math model).
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Options of `ultramoe chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight format to decode with (converted on load; default: the format the model
    /// was saved in by `ultramoe quantize`, else f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// A loaded model behind a running engine.
struct Loaded {
    engine: EngineHandle,
    tok: TextTokenizer,
    max_position: usize,
}

fn load(dir: Option<PathBuf>, weights: Option<WeightsArg>) -> CliResult<Loaded> {
    let dir = dir.unwrap_or_else(crate::default_model_dir);
    let (model, w) = load_for_decoding(&dir, weights, None)?;
    let tok = TextTokenizer::load(&dir, model.cfg.vocab_size).map_err(|e| e.to_string())?;
    let max_position = model.cfg.max_position;
    let (engine, _join) = spawn(Arc::new(model), Arc::new(w), EngineConfig { max_batch: 1, ..EngineConfig::default() });
    Ok(Loaded { engine, tok, max_position })
}

/// Generates from `prompt`, printing text as it becomes final; returns the whole text.
fn stream(l: &Loaded, prompt: Vec<u32>, s: &SamplingArgs) -> CliResult<String> {
    let max_tokens = s.max_tokens.min(l.max_position.saturating_sub(prompt.len()));
    if max_tokens == 0 {
        return Err(format!("the prompt ({} tokens) fills the model's {} positions", prompt.len(), l.max_position));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let req = Request {
        prompt,
        max_tokens,
        sampling: s.params()?,
        stop_tokens: l.tok.eos_ids(),
        on_event: Box::new(move |e| tx.send(e).is_ok()),
    };
    l.engine.submit(req).map_err(|e| format!("the engine refused the request: {e:?}"))?;
    let mut text = TextStream::new(s.stop.clone());
    let mut all = String::new();
    let mut out = std::io::stdout().lock();
    let mut show = |t: &str, all: &mut String| {
        all.push_str(t);
        let _ = write!(out, "{t}");
        let _ = out.flush();
    };
    loop {
        match rx.recv().map_err(|_| "the engine stopped")? {
            Event::Token(id) => {
                let piece = text.push(&l.tok, id);
                show(&piece.text, &mut all);
                if piece.stopped {
                    break;
                }
            }
            Event::Done { .. } => {
                let rest = text.finish(&l.tok);
                show(&rest, &mut all);
                break;
            }
            Event::Error(e) => return Err(e),
        }
    }
    println!();
    Ok(all)
}

/// `ultramoe generate`.
pub fn run_generate(a: GenerateArgs) -> CliResult {
    a.sampling.params()?;
    let l = load(a.model, a.weights)?;
    let prompt = if a.chat {
        l.tok.encode_chat(&[Message { role: "user".into(), content: a.prompt.clone() }])?
    } else {
        l.tok.encode_prompt(&a.prompt)?
    };
    stream(&l, prompt, &a.sampling).map(|_| ())
}

/// `ultramoe chat`.
pub fn run_chat(a: ChatArgs) -> CliResult {
    a.sampling.params()?;
    let l = load(a.model, a.weights)?;
    let mut history: Vec<Message> = a.system.iter().map(|s| Message { role: "system".into(), content: s.clone() }).collect();
    let stdin = std::io::stdin();
    eprintln!("chat: type a message and press Enter; an empty line or end of input quits");
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| e.to_string())? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(Message { role: "user".into(), content: line.trim().to_string() });
        let prompt = l.tok.encode_chat(&history)?;
        let reply = stream(&l, prompt, &a.sampling)?;
        history.push(Message { role: "assistant".into(), content: reply });
    }
}
