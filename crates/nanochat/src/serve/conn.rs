//! The server's connection layer: accepting, the time a client may take, how many connections
//! may be open, and stopping. Everything below the routes; the handlers never see it.
//!
//! - Timeouts. A client has [`ConnectionLimits::header_timeout`] to send a request's headers,
//!   counted from when the connection opens or the previous reply ends, so it also closes an idle
//!   kept-alive connection (hyper's header read timeout); then [`ConnectionLimits::body_timeout`]
//!   to send the body, which is read here in full (at most [`MAX_BODY_BYTES`]) before the handler
//!   runs (408 and a closed connection when it is late, 413 when it is too long).
//! - A cap on open connections, below the descriptor limit so that accepting never fails for
//!   lack of descriptors. A new connection beyond it takes the place of the oldest one that is
//!   not in a request (still sending headers, or idle between requests); when every one is in a
//!   request, it gets a 503 at once. So stalled clients, however many, cannot starve `/health`.
//! - Stopping. On [`Server::shutdown`](super::Server::shutdown), SIGTERM or SIGINT the listener
//!   closes, idle connections close, and requests in flight (streams included) have
//!   [`ConnectionLimits::shutdown_timeout`] to finish; then every connection is closed. A second
//!   SIGTERM or SIGINT closes them at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tower::ServiceExt;

use super::{json_response, MAX_BODY_BYTES};

/// `nanochat serve`'s connection flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// Seconds a client has to send a request's headers, from connecting or from the end of its
    /// previous reply (so also how long an idle kept-alive connection stays open).
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body once its headers are in.
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// Connections open at once; a new one beyond it replaces the oldest one not in a request,
    /// or gets a 503 [default: 1024, or less to stay below the open-files limit].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds that replies in progress get to finish after SIGTERM or SIGINT before every
    /// connection is closed (a second signal closes them at once).
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

impl ConnectionArgs {
    pub fn limits(&self) -> Result<ConnectionLimits> {
        anyhow::ensure!(self.header_timeout > 0, "--header-timeout must be at least 1 second");
        anyhow::ensure!(self.body_timeout > 0, "--body-timeout must be at least 1 second");
        let max_connections = match self.max_connections {
            Some(0) => anyhow::bail!("--max-connections must be at least 1"),
            Some(n) => n,
            None => DEFAULT_MAX_CONNECTIONS.min(descriptor_budget()),
        };
        Ok(ConnectionLimits {
            header_timeout: Duration::from_secs(self.header_timeout),
            body_timeout: Duration::from_secs(self.body_timeout),
            max_connections,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
        })
    }
}

/// What [`ConnectionArgs`] configure, as the server uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS.min(descriptor_budget()),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Descriptors kept for everything but connections (runtime, files, pipes).
const RESERVED_DESCRIPTORS: u64 = 64;

/// How many connections the open-files limit leaves room for.
fn descriptor_budget() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: limit is a valid rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return DEFAULT_MAX_CONNECTIONS;
    }
    let budget = if limit.rlim_cur > 2 * RESERVED_DESCRIPTORS {
        limit.rlim_cur - RESERVED_DESCRIPTORS
    } else {
        limit.rlim_cur / 2
    };
    usize::try_from(budget).unwrap_or(DEFAULT_MAX_CONNECTIONS).max(1)
}

/// The open connections: whether each is in a request, and how to close it.
#[derive(Default)]
struct Registry {
    /// By connection number, so the first is the oldest.
    open: Mutex<BTreeMap<u64, Entry>>,
}

struct Entry {
    /// Requests in progress on it (from the handler's call to the end of its reply's body).
    busy: Arc<AtomicUsize>,
    abort: AbortHandle,
}

impl Registry {
    fn len(&self) -> usize {
        self.open.lock().map(|open| open.len()).unwrap_or(0)
    }

    /// Closes the oldest connection that is not in a request; false when every one is.
    fn evict_oldest_idle(&self) -> bool {
        let Ok(mut open) = self.open.lock() else { return false };
        let idle = open.iter().find(|(_, e)| e.busy.load(Ordering::SeqCst) == 0).map(|(id, _)| *id);
        match idle.and_then(|id| open.remove(&id)) {
            Some(entry) => {
                entry.abort.abort();
                true
            }
            None => false,
        }
    }
}

/// Removes its connection from the registry when the connection's task ends (or is aborted).
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.open.lock() {
            open.remove(&self.id);
        }
    }
}

/// Serves `app` on `listener` until `stopped` resolves or a signal arrives, then stops as the
/// module header says.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stopped: oneshot::Receiver<()>,
) -> Result<()> {
    let mut signals = Signals::new();
    let registry = Arc::new(Registry::default());
    let (shutdown, shutting_down) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            signal = signals.next() => {
                eprintln!("{signal}: finishing the replies in progress (up to {} s), then stopping", limits.shutdown_timeout.as_secs());
                break;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // out of descriptors (another part of the process used them): free one
                        // and let the backlog wait a moment rather than spin
                        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                            registry.evict_oldest_idle();
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if registry.len() >= limits.max_connections && !registry.evict_oldest_idle() {
                    refuse(stream);
                    continue;
                }
                next_id += 1;
                let busy = Arc::new(AtomicUsize::new(0));
                let registered = Registered { registry: Arc::clone(&registry), id: next_id };
                let connection = connection(stream, app.clone(), limits.clone(), Arc::clone(&busy), shutting_down.clone());
                let abort = tasks.spawn(async move {
                    let _registered = registered;
                    connection.await
                });
                if let Ok(mut open) = registry.open.lock() {
                    open.insert(next_id, Entry { busy, abort });
                }
            }
        }
    }
    drop(listener);
    let _ = shutdown.send(true);
    let drained = async { while tasks.join_next().await.is_some() {} };
    tokio::select! {
        _ = drained => {}
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            eprintln!("closing the {} connections still open after {} s", registry.len(), limits.shutdown_timeout.as_secs());
        }
        signal = signals.next() => eprintln!("{signal} again: closing every connection now"),
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// How long a refused connection may take to receive its 503 and close.
const REFUSAL_TIME: Duration = Duration::from_millis(500);

/// Answers a connection beyond the cap with a 503 and closes it, in the background and for at
/// most [`REFUSAL_TIME`]. What the client sent is read and dropped before closing, so that the
/// close is not a reset that could destroy the reply before the client reads it.
fn refuse(stream: TcpStream) {
    let body = r#"{"error": {"message": "Too many open connections: try again shortly", "type": "server_busy"}}"#;
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: \
         1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(tokio::time::timeout(REFUSAL_TIME, async move {
        let mut rest = reply.as_bytes();
        while !rest.is_empty() {
            if stream.writable().await.is_err() {
                return;
            }
            match stream.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        // end our side, then drain theirs until they close (or the time is up)
        let Ok(stream) = stream.into_std() else { return };
        if stream.shutdown(std::net::Shutdown::Write).is_err() {
            return;
        }
        let Ok(stream) = TcpStream::from_std(stream) else { return };
        let mut sink = [0u8; 4096];
        while stream.readable().await.is_ok() {
            match stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }));
}

/// One connection: HTTP/1.1 with the header timeout, each request's body read under the body
/// timeout, `busy` counting the requests in progress; a graceful close when `shutting_down` turns.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    busy: Arc<AtomicUsize>,
    mut shutting_down: watch::Receiver<bool>,
) {
    let body_timeout = limits.body_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (app, busy) = (app.clone(), Arc::clone(&busy));
        async move { Ok::<_, Infallible>(handle(app, request, body_timeout, busy).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            // a client error, a timeout or a reset ends the connection; nothing to report
            _ = connection.as_mut() => return,
            changed = shutting_down.changed(), if !closing => {
                closing = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Reads the request's body in full under the body timeout, then runs the app; the reply's body
/// keeps the connection counted busy until it is sent or dropped.
async fn handle(
    app: Router,
    request: Request<Incoming>,
    body_timeout: Duration,
    busy: Arc<AtomicUsize>,
) -> Response<Body> {
    let guard = Busy::new(busy);
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(body_timeout, axum::body::to_bytes(Body::new(body), MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let e = e.into_inner();
            return if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                let message = format!("Request body too large: at most {MAX_BODY_BYTES} bytes");
                closing(error(StatusCode::PAYLOAD_TOO_LARGE, &message, "invalid_request_error"))
            } else {
                closing(error(
                    StatusCode::BAD_REQUEST,
                    &format!("Could not read the request body: {e}"),
                    "invalid_request_error",
                ))
            };
        }
        Err(_) => {
            let message = format!("The request body did not arrive within {} s", body_timeout.as_secs());
            return closing(error(StatusCode::REQUEST_TIMEOUT, &message, "timeout"));
        }
    };
    let request = Request::from_parts(parts, Body::from(body));
    let response = match app.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    response.map(|body| Body::new(Tracked { body, _busy: guard }))
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({"error": {"message": message, "type": kind}}))
}

/// A reply after which the connection closes (the request's body was not read to its end).
fn closing(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// One request in progress on a connection, for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reply body that holds its request's [`Busy`] until it is done.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// SIGTERM and SIGINT, each wait returning the next one's name. Where signals cannot be set up
/// (no signal driver), it waits for ever: the other ways to stop remain.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals { term: signal(SignalKind::terminate()).ok(), interrupt: signal(SignalKind::interrupt()).ok() }
    }

    fn next(&mut self) -> impl Future<Output = &'static str> + '_ {
        let Signals { term, interrupt } = self;
        async move {
            tokio::select! {
                _ = wait(term) => "terminated",
                _ = wait(interrupt) => "interrupted",
            }
        }
    }
}

async fn wait(signal: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(signal) = signal {
        if signal.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}
