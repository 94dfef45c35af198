//! The OpenAI-compatible HTTP API over the batching engine (axum on tokio):
//! `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true` as
//! server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! Every request body is checked field by field, and a bad one gets a 4xx JSON error that
//! names the field (`{"error": {"message", "type", "param"}}`); a full queue gets 429 at
//! once; a request that runs past the time limit is cancelled (504, or an error event on a
//! stream); bodies above the size limit get 413. A client that goes away cancels its
//! generation (the engine notices its channel is closed at the next token).

use crate::engine::{EngineHandle, Event, FinishReason, Request, SubmitError};
use crate::sampling::SamplingParams;
use crate::tokenizer::{Message, TextStream, TextTokenizer};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// the model's name in the API
    pub model_name: String,
    /// a request's whole time limit
    pub request_timeout: Duration,
    /// largest request body accepted
    pub max_body_bytes: usize,
    /// `max_tokens` when a request gives none
    pub default_max_tokens: usize,
}

/// Time-to-first-token histogram bucket bounds, seconds.
const TTFT_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct HttpStats {
    requests: AtomicU64,
    ok: AtomicU64,
    client_errors: AtomicU64,
    rejected_busy: AtomicU64,
    timeouts: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    ttft_micros: AtomicU64,
}

impl HttpStats {
    fn first_token(&self, since: Instant) {
        let s = since.elapsed().as_secs_f64();
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            if s <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
        self.ttft_micros.fetch_add((s * 1e6) as u64, Ordering::Relaxed);
    }
}

/// What every handler shares.
pub struct AppState {
    engine: EngineHandle,
    tok: Arc<TextTokenizer>,
    cfg: ServerConfig,
    max_position: usize,
    created: u64,
    stats: HttpStats,
}

impl AppState {
    /// The state of a server over `engine` for a model of `max_position` positions.
    pub fn new(engine: EngineHandle, tok: Arc<TextTokenizer>, cfg: ServerConfig, max_position: usize) -> Arc<Self> {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Arc::new(AppState { engine, tok, cfg, max_position, created, stats: HttpStats::default() })
    }
}

/// An API error: status, message, type and the field concerned.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
}

impl ApiError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: Some(param.to_string()) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError { status: StatusCode::NOT_FOUND, message: "no such route".into(), kind: "invalid_request_error", param: None }
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": s.cfg.model_name, "object": "model", "created": s.created, "owned_by": "ultramoe"}]}))
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    use std::fmt::Write;
    let e = &s.engine.stats;
    let h = &s.stats;
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    line("ultramoe_requests_total", "counter", "HTTP generation requests received.", h.requests.load(Ordering::Relaxed) as f64);
    line("ultramoe_requests_ok_total", "counter", "Generation requests answered in full.", h.ok.load(Ordering::Relaxed) as f64);
    line("ultramoe_requests_invalid_total", "counter", "Requests refused with a 4xx for their content.", h.client_errors.load(Ordering::Relaxed) as f64);
    line("ultramoe_requests_rejected_busy_total", "counter", "Requests refused with 429 (queue full).", h.rejected_busy.load(Ordering::Relaxed) as f64);
    line("ultramoe_requests_timed_out_total", "counter", "Requests cancelled at the time limit.", h.timeouts.load(Ordering::Relaxed) as f64);
    line("ultramoe_queue_waiting", "gauge", "Requests waiting for a batch slot.", e.waiting.load(Ordering::Relaxed) as f64);
    line("ultramoe_batch_running", "gauge", "Sequences in the running batch.", e.running.load(Ordering::Relaxed) as f64);
    line("ultramoe_kv_cache_used_bytes", "gauge", "Key/value cache bytes held.", e.cache_used_bytes.load(Ordering::Relaxed) as f64);
    line("ultramoe_kv_cache_reserved_bytes", "gauge", "Key/value cache bytes reserved by running sequences.", e.cache_reserved_bytes.load(Ordering::Relaxed) as f64);
    line("ultramoe_prompt_tokens_total", "counter", "Prompt tokens run.", e.prompt_tokens.load(Ordering::Relaxed) as f64);
    line("ultramoe_generated_tokens_total", "counter", "Tokens generated.", e.generated_tokens.load(Ordering::Relaxed) as f64);
    line("ultramoe_requests_cancelled_total", "counter", "Generations cancelled (client gone or stop sequence).", e.cancelled.load(Ordering::Relaxed) as f64);
    line("ultramoe_passes_total", "counter", "Batched model passes run.", e.passes.load(Ordering::Relaxed) as f64);
    line("ultramoe_pass_seconds_total", "counter", "Time in model passes.", e.pass_micros.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(out, "# HELP ultramoe_time_to_first_token_seconds From request arrival to the first generated token.");
    let _ = writeln!(out, "# TYPE ultramoe_time_to_first_token_seconds histogram");
    for (b, bound) in h.ttft_buckets.iter().zip(TTFT_BUCKETS) {
        let _ = writeln!(out, "ultramoe_time_to_first_token_seconds_bucket{{le=\"{bound}\"}} {}", b.load(Ordering::Relaxed));
    }
    let count = h.ttft_count.load(Ordering::Relaxed);
    let _ = writeln!(out, "ultramoe_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "ultramoe_time_to_first_token_seconds_sum {}", h.ttft_micros.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(out, "ultramoe_time_to_first_token_seconds_count {count}");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// What both generation endpoints read besides their prompt.
struct Common {
    /// as given (`None`: the server's default, within the model's positions)
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn number(v: &Value, field: &str) -> Result<Option<f64>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid(field, format!("`{field}` must be a number, not {}", type_name(other)))),
    }
}

fn integer(v: &Value, field: &str) -> Result<Option<i64>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(Value::Number(n)) if n.is_u64() => Err(ApiError::invalid(field, format!("`{field}` is too large: {n}"))),
        Some(other) => Err(ApiError::invalid(field, format!("`{field}` must be an integer, not {}", type_name(other)))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| ApiError { status: e.status(), message: format!("the body cannot be read: {}", e.body_text()), kind: "invalid_request_error", param: Some("body".into()) })?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body", format!("the body must be a JSON object, not {}", type_name(&v))));
    }
    Ok(v)
}

impl AppState {
    fn common(&self, v: &Value, chat: bool) -> Result<Common, ApiError> {
        match v.get("model") {
            Some(Value::String(m)) if *m == self.cfg.model_name => {}
            Some(Value::String(m)) => {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!("the model `{m}` does not exist; this server serves `{}`", self.cfg.model_name),
                    kind: "invalid_request_error",
                    param: Some("model".into()),
                })
            }
            None => return Err(ApiError::invalid("model", "`model` is required")),
            Some(other) => return Err(ApiError::invalid("model", format!("`model` must be a string, not {}", type_name(other)))),
        }
        let tokens_field = if chat && v.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
        let max_tokens = match integer(v, tokens_field)? {
            None => None,
            Some(n) if n < 1 => return Err(ApiError::invalid(tokens_field, format!("`{tokens_field}` must be at least 1, not {n}"))),
            Some(n) => Some(n as usize),
        };
        if let Some(n) = integer(v, "n")? {
            if n != 1 {
                return Err(ApiError::invalid("n", format!("only n = 1 is supported, not {n}")));
            }
        }
        let top_k = match integer(v, "top_k")? {
            None | Some(-1) => 0,
            Some(k) if k < 0 => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off), 0 (off) or positive, not {k}"))),
            Some(k) => k as usize,
        };
        let seed = match integer(v, "seed")? {
            Some(s) if s < 0 => return Err(ApiError::invalid("seed", format!("`seed` must not be negative, not {s}"))),
            s => s.map(|s| s as u64),
        };
        let sampling = SamplingParams {
            temperature: number(v, "temperature")?.unwrap_or(1.0) as f32,
            top_k,
            top_p: number(v, "top_p")?.unwrap_or(1.0) as f32,
            min_p: number(v, "min_p")?.unwrap_or(0.0) as f32,
            repetition_penalty: number(v, "repetition_penalty")?.unwrap_or(1.0) as f32,
            seed,
        };
        sampling.check().map_err(|(field, why)| ApiError::invalid(field, format!("`{field}`: {why}")))?;
        let stop = match v.get("stop") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.len() <= 16 => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("stop", "`stop` must hold strings only")))
                .collect::<Result<_, _>>()?,
            Some(Value::Array(a)) => return Err(ApiError::invalid("stop", format!("at most 16 stop sequences, not {}", a.len()))),
            Some(other) => return Err(ApiError::invalid("stop", format!("`stop` must be a string or an array of strings, not {}", type_name(other)))),
        };
        let stream = match v.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(ApiError::invalid("stream", format!("`stream` must be a boolean, not {}", type_name(other)))),
        };
        let include_usage = v.pointer("/stream_options/include_usage").and_then(|x| x.as_bool()).unwrap_or(false);
        Ok(Common { max_tokens, sampling, stop, stream, include_usage })
    }

    /// Queues a generation; its events arrive on the returned channel.
    fn start(&self, prompt: Vec<u32>, c: &Common) -> Result<UnboundedReceiver<Event>, ApiError> {
        let room = self.max_position.saturating_sub(prompt.len());
        if room == 0 {
            return Err(ApiError::invalid("prompt", format!("the prompt ({} tokens) fills the model's {} positions", prompt.len(), self.max_position)));
        }
        let max_tokens = match c.max_tokens {
            Some(n) if n > room => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("the prompt ({} tokens) plus max_tokens ({n}) exceeds the model's {} positions", prompt.len(), self.max_position),
                ))
            }
            Some(n) => n,
            None => self.cfg.default_max_tokens.min(room),
        };
        let (tx, rx) = unbounded_channel();
        let req = Request {
            prompt,
            max_tokens,
            sampling: c.sampling.clone(),
            stop_tokens: self.tok.eos_ids(),
            on_event: Box::new(move |e| tx.send(e).is_ok()),
        };
        match self.engine.submit(req) {
            Ok(()) => Ok(rx),
            Err(SubmitError::QueueFull) => {
                self.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
                Err(ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: "the server is at capacity; retry later".into(),
                    kind: "rate_limit_error",
                    param: None,
                })
            }
            Err(SubmitError::Stopped) => Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the server is shutting down".into(),
                kind: "server_error",
                param: None,
            }),
        }
    }
}

/// The endpoint a response is shaped for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn completion_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    let r = (|| {
        let v = parse_body(body)?;
        let c = s.common(&v, false)?;
        let prompt = match v.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
            Some(Value::Array(_)) => return Err(ApiError::invalid("prompt", "`prompt` as an array must hold exactly one string")),
            None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
            Some(other) => return Err(ApiError::invalid("prompt", format!("`prompt` must be a string, not {}", type_name(other)))),
        };
        let tokens = s.tok.encode_prompt(&prompt).map_err(|e| ApiError::invalid("prompt", e))?;
        if tokens.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` has no tokens"));
        }
        Ok((c, tokens))
    })();
    respond(s, r, Kind::Completion).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    let r = (|| {
        let v = parse_body(body)?;
        let c = s.common(&v, true)?;
        let Some(Value::Array(list)) = v.get("messages") else {
            return Err(ApiError::invalid("messages", "`messages` must be an array of {role, content}"));
        };
        if list.is_empty() {
            return Err(ApiError::invalid("messages", "`messages` is empty"));
        }
        let mut messages = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).ok_or_else(|| ApiError::invalid(&format!("messages[{i}].role"), "each message needs a string `role`"))?;
            if !["system", "user", "assistant", "developer"].contains(&role) {
                return Err(ApiError::invalid(&format!("messages[{i}].role"), format!("unknown role `{role}` (system, developer, user, assistant)")));
            }
            let content = match m.get("content") {
                Some(Value::String(t)) => t.clone(),
                // Content parts: the text parts joined.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                        (Some("text"), Some(t)) => Ok(t.to_string()),
                        _ => Err(ApiError::invalid(&format!("messages[{i}].content"), "only text content parts are supported")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                _ => return Err(ApiError::invalid(&format!("messages[{i}].content"), "each message needs `content` as a string or text parts")),
            };
            messages.push(Message { role: if role == "developer" { "system".into() } else { role.into() }, content });
        }
        let tokens = s.tok.encode_chat(&messages).map_err(|e| ApiError::invalid("messages", e))?;
        Ok((c, tokens))
    })();
    respond(s, r, Kind::Chat).await
}

async fn respond(s: Arc<AppState>, parsed: Result<(Common, Vec<u32>), ApiError>, kind: Kind) -> Response {
    let arrived = Instant::now();
    let (c, tokens) = match parsed {
        Ok(x) => x,
        Err(e) => {
            s.stats.client_errors.fetch_add(1, Ordering::Relaxed);
            return e.into_response();
        }
    };
    let prompt_len = tokens.len();
    let rx = match s.start(tokens, &c) {
        Ok(rx) => rx,
        Err(e) => {
            if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
                s.stats.client_errors.fetch_add(1, Ordering::Relaxed);
            }
            return e.into_response();
        }
    };
    let gen = Generation { s: s.clone(), rx, text: TextStream::new(c.stop.clone()), deadline: arrived + s.cfg.request_timeout, arrived, first: true, prompt_len };
    if c.stream {
        stream_response(gen, kind, c.include_usage).into_response()
    } else {
        whole_response(gen, kind).await
    }
}

/// A running generation as the HTTP side sees it.
struct Generation {
    s: Arc<AppState>,
    rx: UnboundedReceiver<Event>,
    text: TextStream,
    deadline: Instant,
    arrived: Instant,
    first: bool,
    prompt_len: usize,
}

/// What the next engine events amount to, in text.
enum Step {
    Text(String),
    Finished { text: String, reason: FinishReason, prompt: usize, completion: usize },
    Failed(ApiError),
}

impl Generation {
    async fn next(&mut self, completion_so_far: &mut usize) -> Step {
        loop {
            let ev = match tokio::time::timeout_at(self.deadline.into(), self.rx.recv()).await {
                Err(_) => {
                    self.s.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.rx.close();
                    return Step::Failed(ApiError {
                        status: StatusCode::GATEWAY_TIMEOUT,
                        message: format!("the request ran past the time limit of {} s", self.s.cfg.request_timeout.as_secs_f64()),
                        kind: "timeout",
                        param: None,
                    });
                }
                Ok(None) => {
                    return Step::Failed(ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: "the engine stopped".into(), kind: "server_error", param: None })
                }
                Ok(Some(ev)) => ev,
            };
            match ev {
                Event::Token(id) => {
                    if self.first {
                        self.first = false;
                        self.s.stats.first_token(self.arrived);
                    }
                    *completion_so_far += 1;
                    let piece = self.text.push(&self.s.tok, id);
                    if piece.stopped {
                        // Cancels the engine's sequence at its next token.
                        self.rx.close();
                        return Step::Finished { text: piece.text, reason: FinishReason::Stop, prompt: self.prompt_len, completion: *completion_so_far };
                    }
                    if !piece.text.is_empty() {
                        return Step::Text(piece.text);
                    }
                }
                Event::Done { reason, prompt_tokens, completion_tokens } => {
                    let text = self.text.finish(&self.s.tok);
                    return Step::Finished { text, reason, prompt: prompt_tokens, completion: completion_tokens };
                }
                Event::Error(msg) => return Step::Failed(ApiError::invalid("prompt", msg)),
            }
        }
    }
}

async fn whole_response(mut g: Generation, kind: Kind) -> Response {
    let mut text = String::new();
    let mut n = 0;
    loop {
        match g.next(&mut n).await {
            Step::Text(t) => text.push_str(&t),
            Step::Failed(e) => return e.into_response(),
            Step::Finished { text: t, reason, prompt, completion } => {
                text.push_str(&t);
                g.s.stats.ok.fetch_add(1, Ordering::Relaxed);
                let (id, model, created) = (completion_id(kind), g.s.cfg.model_name.clone(), unix_now());
                let choice = match kind {
                    Kind::Completion => json!({"index": 0, "text": text, "finish_reason": reason.as_str(), "logprobs": null}),
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason.as_str(), "logprobs": null}),
                };
                let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
                return Json(json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage(prompt, completion)})).into_response();
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn stream_response(g: Generation, kind: Kind, include_usage: bool) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let (id, model, created) = (completion_id(kind), g.s.cfg.model_name.clone(), unix_now());
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let usage_id = id.clone();
    let chunk = move |delta: Option<&str>, finish: Option<&str>, role: bool| -> SseEvent {
        let choice = match kind {
            Kind::Completion => json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": null}),
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), "assistant".into());
                }
                if let Some(t) = delta {
                    d.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": d, "finish_reason": finish, "logprobs": null})
            }
        };
        SseEvent::default().data(json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]}).to_string())
    };
    let usage_chunk = {
        let (id, model) = (usage_id, g.s.cfg.model_name.clone());
        move |u: Value| SseEvent::default().data(json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": u}).to_string())
    };
    // State: the generation, whether it is over, the completion count so far.
    let start = if kind == Kind::Chat { vec![chunk(Some(""), None, true)] } else { vec![] };
    let head = futures_util::stream::iter(start.into_iter().map(Ok));
    let body = futures_util::stream::unfold((g, false, 0usize), move |(mut g, over, mut n)| {
        let chunk = chunk.clone();
        let usage_chunk = usage_chunk.clone();
        async move {
            if over {
                return None;
            }
            let events = match g.next(&mut n).await {
                Step::Text(t) => vec![chunk(Some(&t), None, false)],
                Step::Finished { text, reason, prompt, completion } => {
                    g.s.stats.ok.fetch_add(1, Ordering::Relaxed);
                    let mut v = vec![];
                    if !text.is_empty() {
                        v.push(chunk(Some(&text), None, false));
                    }
                    v.push(chunk(None, Some(reason.as_str()), false));
                    if include_usage {
                        v.push(usage_chunk(usage(prompt, completion)));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    return Some((v, (g, true, n)));
                }
                Step::Failed(e) => {
                    let body = json!({"error": {"message": e.message, "type": e.kind, "param": e.param}});
                    return Some((vec![SseEvent::default().data(body.to_string()), SseEvent::default().data("[DONE]")], (g, true, n)));
                }
            };
            Some((events, (g, false, n)))
        }
    });
    use futures_util::StreamExt;
    let body = body.flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok)));
    Sse::new(head.chain(body)).keep_alive(KeepAlive::default())
}

/// Serves until `shutdown` completes, then stops taking connections and lets the
/// requests in flight finish.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
