//! `nanochat serve`: the web chat. One axum server in front of N model workers ([`workers`]):
//!
//! - `GET /` the chat UI (`ui.html`, embedded in the binary);
//! - `POST /chat/completions`, `GET /health`, `GET /stats`: the original's API ([`api`]);
//! - `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/{id}]`: an
//!   OpenAI-compatible API ([`openai`], [`completions`]; docs/API.md lists what it supports);
//! - `GET /metrics`: Prometheus metrics ([`metrics`]).
//!
//! Around them ([`layers`]): CORS (`--cors-origin`), bearer-token auth (`--api-key`), JSON bodies
//! for every 404 and 405. Requests share their sampling fields ([`params`]); conversations are
//! rendered to tokens and replies to text by [`transcript`], with the calculator's exchange as
//! readable text.
//!
//! Throughput: each worker decodes up to `--batch` replies together (continuous batching), and a
//! conversation's next turn prefills only its new tokens (the prompt cache, `--prompt-cache-mb`).
//!
//! Safety under load: a bounded queue in front of the workers (503 when full), a time limit per
//! request, request bodies capped at 1 MB, every malformed request answered with a 4xx and a
//! message, generation cancelled when the client disconnects; and below the routes ([`conn`]):
//! header, body and idle timeouts, a cap on open connections that stalled clients cannot fill,
//! and a shutdown on SIGINT/SIGTERM that lets running replies finish, up to a deadline.

mod api;
mod completions;
pub mod conn;
mod layers;
pub mod metrics;
mod openai;
mod params;
mod prompt_cache;
mod reply;
pub mod transcript;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;

use crate::checkpoint::{ModelArgs, Source};
use crate::engine::{Engine, SamplingArgs};
use crate::model::decode::WeightFormat;
use conn::{ConnectionArgs, ConnectionLimits};
use params::{MAX_MAX_TOKENS, MAX_TEMPERATURE, MAX_TOP_K};
use workers::{Event, Pool};

/// Request bodies above this are refused (413): the largest valid request (32,000 characters of
/// messages) is far below it.
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on; use 0.0.0.0 to accept connections from other machines.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The old spelling of --port (`-p` is the prompt in `nanochat chat`); still accepted, with a
    /// note.
    #[arg(short = 'p', hide = true, conflicts_with = "port")]
    pub deprecated_port: Option<u16>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Model workers, each with its own copy of the model, generating in parallel.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Replies each worker generates together (continuous batching); 1 = one at a time.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Requests that may wait for a free slot; more get HTTP 503.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Longest time one request may take, waiting included, in seconds.
    #[arg(long, default_value_t = 300)]
    pub time_limit: u64,
    /// The sampling of a request that names none.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Precision of the workers' weights: bf16 and int8 decode faster on the CPU (fewer bytes per
    /// token) with slightly different logits; they run the native CPU path even with a GPU.
    #[arg(long, value_enum, default_value_t = WeightFormat::F32)]
    pub weights: WeightFormat,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// Memory for the prompt cache, in MB: the keys and values of recent conversations, shared by
    /// the workers, so a conversation's next turn prefills only its new tokens; 0 = off.
    #[arg(long, default_value_t = 512)]
    pub prompt_cache_mb: usize,
    /// Let browsers on this origin call the API (CORS), e.g. https://example.com; repeat it or
    /// separate origins with commas; `*` for any origin. Off by default.
    #[arg(long = "cors-origin", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Require `Authorization: Bearer KEY` on every route but the UI page and /health (the UI
    /// asks for the key). Off by default.
    #[arg(long, env = "NANOCHAT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// How the server answers, apart from its workers.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model's name in the OpenAI API.
    pub model_id: String,
    /// Replies each worker generates together.
    pub batch: usize,
    pub queue: usize,
    pub time_limit: Duration,
    pub temperature: f64,
    pub top_k: usize,
    pub max_tokens: usize,
    /// Bytes the prompt cache may hold; 0 = no prompt caching.
    pub prompt_cache_bytes: usize,
    /// Origins allowed to call the API from a browser (`*` = any); empty = no CORS.
    pub cors_origins: Vec<String>,
    /// The bearer token every request but the UI and /health must carry; `None` = open.
    pub api_key: Option<String>,
}

/// What every handler sees.
pub(crate) struct AppState {
    pool: Pool,
    config: ServerConfig,
    /// A copy of the workers' tokenizer, to render prompts on the async side.
    tokenizer: bpe::Tokenizer,
    /// Longest prompt + reply the model covers.
    max_positions: usize,
}

/// A running server: its address, and the handle that stops it.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// [`Server::start_with`] the default connection limits.
    pub fn start(host: &str, port: u16, engines: Vec<Engine>, config: ServerConfig) -> Result<Server> {
        Server::start_with(host, port, engines, config, ConnectionLimits::default())
    }

    /// Binds `host:port` and serves on a runtime of its own thread until [`Server::shutdown`],
    /// SIGINT or SIGTERM, with `limits` on its connections.
    pub fn start_with(
        host: &str,
        port: u16,
        engines: Vec<Engine>,
        config: ServerConfig,
        limits: ConnectionLimits,
    ) -> Result<Server> {
        let first = engines.first().context("the server needs at least one worker: pass --workers 1 or more")?;
        let tokenizer = first.tokenizer().clone();
        let max_positions = first.max_positions()?;
        let listener = std::net::TcpListener::bind((host, port))
            .with_context(|| format!("listening on {host}:{port}: pick another --port or stop what uses it"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let pool = Pool::start(engines, config.batch, config.queue, config.time_limit, config.prompt_cache_bytes)?;
        let state = Arc::new(AppState { pool, config, tokenizer, max_positions });
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("nanochat-http".into())
            .spawn(move || serve(listener, state, limits, stopped))
            .context("starting the HTTP thread")?;
        Ok(Server { addr, stop: Some(stop), thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, lets running replies finish (up to the shutdown timeout),
    /// stops the workers.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            // the server may have stopped on a signal already
            let _ = stop.send(());
        }
        self.wait()
    }

    /// Blocks until the server stops (on SIGINT/SIGTERM when nobody calls [`Server::shutdown`]).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?,
            None => Ok(()),
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    limits: ConnectionLimits,
    stopped: oneshot::Receiver<()>,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nanochat-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        conn::serve(listener, router(Arc::clone(&state)), limits, stopped).await
    })?;
    // every connection has closed, so this is the last reference to the state and its pool
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(state) = Arc::into_inner(state) {
        state.pool.shutdown();
    }
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    // `run` refuses a bad origin before it loads the model; a library caller's is reported here
    let cors = layers::cors(&state.config.cors_origins).unwrap_or_else(|e| {
        eprintln!("{e:#}: CORS stays off");
        None
    });
    let router = Router::new()
        .route("/", get(api::ui))
        .route("/health", get(api::health))
        .route("/stats", get(api::stats))
        .route("/metrics", get(metrics::metrics))
        .route("/chat/completions", post(api::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .fallback(layers::not_found)
        // after every route: it applies to the routes there are
        .method_not_allowed_fallback(layers::method_not_allowed)
        .layer(from_fn_with_state(Arc::clone(&state), layers::auth))
        .layer(from_fn_with_state(Arc::clone(&state), layers::count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    // outermost, so that preflight requests and 401s get the CORS headers too
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// `nanochat serve`: loads one engine per worker and serves until interrupted.
pub fn run(args: ServeArgs) -> Result<()> {
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(args.time_limit > 0, "--time-limit must be at least 1 second");
    // the defaults obey the limits a request's own values must meet
    anyhow::ensure!(
        (0.0..=MAX_TEMPERATURE).contains(&args.sampling.temperature),
        "--temperature must be between 0 and 2"
    );
    anyhow::ensure!(args.sampling.top_k as i64 <= MAX_TOP_K, "--top-k must be at most {MAX_TOP_K}");
    anyhow::ensure!(
        (1..=MAX_MAX_TOKENS).contains(&(args.sampling.max_tokens as i64)),
        "--max-tokens must be between 1 and {MAX_MAX_TOKENS}"
    );
    let limits = args.connections.limits()?;
    // checked before loading the model: a typo should not cost the load
    layers::cors(&args.cors_origins)?;
    let api_key = args.api_key.filter(|k| !k.is_empty());
    let mut engines = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        engines.push(args.model.load_engine(Source::Sft, args.weights)?);
    }
    let source = format!("{:?}", args.model.source.unwrap_or(Source::Sft)).to_lowercase();
    let config = ServerConfig {
        model_id: format!("nanochat-{source}-{}", args.model.model_tag.as_deref().unwrap_or("default")),
        batch: args.batch,
        queue: args.queue,
        time_limit: Duration::from_secs(args.time_limit),
        temperature: args.sampling.temperature,
        top_k: args.sampling.top_k,
        max_tokens: args.sampling.max_tokens,
        prompt_cache_bytes: args.prompt_cache_mb.saturating_mul(1 << 20),
        cors_origins: args.cors_origins,
        api_key,
    };
    let port = match args.deprecated_port {
        Some(port) => {
            eprintln!("note: `nanochat serve -p` is deprecated (in `nanochat chat`, -p is the prompt): use --port");
            port
        }
        None => args.port,
    };
    let server = Server::start_with(&args.host, port, engines, config, limits)?;
    println!(
        "nanochat serving on http://{} ({} workers, up to {} replies each, {} weights); Ctrl-C to stop",
        server.addr(),
        args.workers,
        args.batch,
        args.weights
    );
    server.wait()
}

/// A streamed response body: each worker event formatted by `format`, which also says whether it
/// was the last. Dropping it (the client disconnected) drops the receiver, which stops the worker.
pub(crate) struct EventBody<F> {
    events: UnboundedReceiver<Event>,
    format: F,
    ended: bool,
}

impl<F: FnMut(Event) -> (String, bool) + Send + Unpin + 'static> EventBody<F> {
    pub(crate) fn response(events: UnboundedReceiver<Event>, format: F) -> Response {
        let body = Body::from_stream(EventBody { events, format, ended: false });
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
        response
    }
}

impl<F: FnMut(Event) -> (String, bool) + Unpin> futures_core::Stream for EventBody<F> {
    type Item = std::result::Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match this.events.poll_recv(cx) {
                Poll::Ready(Some(event)) => {
                    let (text, last) = (this.format)(event);
                    this.ended = last;
                    // an event with nothing to send (the native API's end of a choice) is skipped
                    if !text.is_empty() || last {
                        return Poll::Ready(Some(Ok(Bytes::from(text))));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A JSON response with a status.
pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}
