//! `ultramoe serve`: the OpenAI-compatible HTTP server over a model directory.

use super::{load_for_decoding, CliResult, WeightsArg};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use crate::launch::{launch, Layout, ParallelArgs};
use ultramoe_dist::ProcessGroup;
use ultramoe_serve::engine::{follow, spawn, spawn_engine, Engine, EngineConfig};
use ultramoe_serve::http::{serve, AppState, ServerConfig};
use ultramoe_serve::tokenizer::TextTokenizer;

/// Options of `ultramoe serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory (config.json, safetensors, and tokenizer.json unless it is a math model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight format to decode with (converted on load; default: the format the model
    /// was saved in by `ultramoe quantize`, else f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model's name in the API (default: the directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Tokens one model pass runs at most (decode steps first, then prompt chunks).
    #[arg(long, default_value_t = 256)]
    pub max_pass_tokens: usize,
    /// Megabytes all key/value caches may hold together.
    #[arg(long, default_value_t = 1024)]
    pub kv_cache_mb: usize,
    /// Requests waiting for a batch slot at most; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: usize,
    /// A request's time limit, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Largest request body, kilobytes (larger: 413).
    #[arg(long, default_value_t = 1024)]
    pub max_body_kb: usize,
    /// max_tokens when a request gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Expert-parallel serving over this many ranks (MPI's processes under `mpirun`, or
    /// threads with --ranks): rank 0 answers HTTP, every rank holds 1/EP of each MoE
    /// layer's experts, and each decode step's MoE layers exchange tokens between them.
    #[arg(long)]
    pub ep: Option<usize>,
    /// Ranks to run as threads of this process (with --ep; under mpirun the ranks are
    /// MPI's processes).
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Seconds a rank waits for the others before the job is declared stuck.
    #[arg(long, default_value_t = 60)]
    pub comm_timeout: u64,
}

/// `ultramoe serve`.
pub fn run(a: ServeArgs) -> CliResult {
    if a.ranks.is_some_and(|r| r == 0) || a.ep.is_some_and(|e| e == 0) {
        return Err("--ranks and --ep must be at least 1".into());
    }
    if a.max_batch == 0 || a.max_pass_tokens == 0 || a.kv_cache_mb == 0 || a.default_max_tokens == 0 {
        return Err("--max-batch, --max-pass-tokens, --kv-cache-mb and --default-max-tokens must be at least 1".into());
    }
    if !(a.request_timeout.is_finite() && a.request_timeout > 0.0) {
        return Err(format!("--request-timeout: {} is not a positive number of seconds", a.request_timeout));
    }
    let p = ParallelArgs { ranks: a.ranks, ep: a.ep, comm_timeout: a.comm_timeout, ..ParallelArgs::default() };
    let world = p.world();
    if world == 1 && a.ep.is_none_or(|e| e == 1) {
        return serve_rank(&a, None);
    }
    if a.ep != Some(world) {
        return Err(format!("--ep {} must equal the number of ranks ({world}): every rank holds a share of the experts", a.ep.map_or("(missing)".into(), |e| e.to_string())));
    }
    let a = Arc::new(a);
    launch(&p, Layout { tp: 1, pp: 1, ep: world, dp: 1 }, move |mesh, _| serve_rank(&a, mesh.map(|m| m.ep)))
}

/// One rank of serving: the HTTP server and the engine on rank 0 (the only rank without
/// expert parallelism); on the others, its experts following rank 0's passes.
fn serve_rank(a: &ServeArgs, ep: Option<Arc<dyn ProcessGroup>>) -> CliResult {
    let dir = a.model.clone().unwrap_or_else(crate::default_model_dir);
    let (model, w) = load_for_decoding(&dir, a.weights, ep.clone())?;
    if let Some(g) = ep.as_ref().filter(|g| g.rank() > 0) {
        follow(&model, &w, g.as_ref()).map_err(|e| e.to_string())?;
        return Ok(());
    }
    let tok = TextTokenizer::load(&dir, model.cfg.vocab_size).map_err(|e| e.to_string())?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(&dir).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "model".into())
    });
    let max_position = model.cfg.max_position;
    let engine_cfg = EngineConfig { max_batch: a.max_batch, max_pass_tokens: a.max_pass_tokens, cache_bytes: a.kv_cache_mb << 20, max_waiting: a.max_waiting };
    let (model, w) = (Arc::new(model), Arc::new(w));
    let (engine, join) = match ep {
        Some(g) => spawn_engine(Engine::leading(model, w, engine_cfg, g)),
        None => spawn(model, w, engine_cfg),
    };
    let cfg = ServerConfig {
        model_name: name.clone(),
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        max_body_bytes: a.max_body_kb << 10,
        default_max_tokens: a.default_max_tokens,
    };
    let state = AppState::new(engine, Arc::new(tok), cfg, max_position);
    // The HTTP side only waits on sockets and channels; the engine thread and rayon's
    // pool do the compute.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    let (host, port) = (a.host.clone(), a.port);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await.map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("serving `{name}` on http://{addr} (OpenAI API under /v1; Ctrl-C stops after the requests in flight)");
        serve(listener, state, shutdown_signal()).await.map_err(|e| e.to_string())
    })?;
    // Every handle is gone with the server: the engine finishes and stops.
    join.join().map_err(|_| "the engine thread panicked".to_string())?;
    eprintln!("stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
