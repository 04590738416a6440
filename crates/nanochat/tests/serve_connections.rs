//! The server's connection layer (`serve/conn.rs`) against slow, stalled and numerous clients,
//! and its shutdown: a stalled client is disconnected after the timeout; many stalled
//! connections do not stop `/health`; beyond the cap, with every connection busy, a new one gets
//! a 503 at once; streams in flight at shutdown complete; a SIGTERM'd server with a stalled
//! client exits within its deadline, and at once on a second signal.

mod common;
// shared with serve.rs, which uses more of it
#[allow(dead_code)]
#[path = "serve/common.rs"]
mod serve_common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nanochat::serve::conn::ConnectionLimits;
use nanochat::serve::Server;
use serde_json::json;
use serve_common::*;

fn limits(header_timeout: u64, body_timeout: u64, max_connections: usize, shutdown_timeout: u64) -> ConnectionLimits {
    ConnectionLimits {
        header_timeout: Duration::from_secs(header_timeout),
        body_timeout: Duration::from_secs(body_timeout),
        max_connections,
        shutdown_timeout: Duration::from_secs(shutdown_timeout),
    }
}

fn start_with(engine: nanochat::engine::Engine, limits: ConnectionLimits) -> Result<Server> {
    Server::start_with("127.0.0.1", 0, vec![engine], config(8, Duration::from_secs(120)), limits)
}

/// Connects and sends `bytes`, leaving the request unfinished.
fn stall(addr: SocketAddr, bytes: &[u8]) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(bytes)?;
    Ok(stream)
}

/// Reads until the server closes the connection (or `limit` passes): what it sent and when it
/// closed, counted from `since`.
fn read_until_closed(stream: &mut TcpStream, since: Instant, limit: Duration) -> Result<(Vec<u8>, Duration)> {
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((got, since.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // a reset is a close too
            Err(_) => return Ok((got, since.elapsed())),
        }
        if since.elapsed() > limit {
            bail!("still open after {limit:?}; received {:?}", String::from_utf8_lossy(&got));
        }
    }
}

#[test]
fn a_client_that_stalls_its_headers_is_disconnected_after_the_header_timeout() -> Result<()> {
    let server = start_with(fixture_engine()?, limits(1, 30, 64, 5))?;
    let start = Instant::now();
    let mut partial = stall(server.addr(), b"GET /health HTTP/1.1\r\nHost: x\r\n")?;
    let mut silent = stall(server.addr(), b"")?;
    for stream in [&mut partial, &mut silent] {
        let (_, closed_after) = read_until_closed(stream, start, Duration::from_secs(10))?;
        assert!(closed_after >= Duration::from_millis(900), "closed after {closed_after:?}, before the timeout");
        assert!(closed_after < Duration::from_secs(5), "closed after {closed_after:?}");
    }
    server.shutdown()
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() -> Result<()> {
    let server = start_with(fixture_engine()?, limits(1, 30, 64, 5))?;
    let mut stream = stall(server.addr(), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let start = Instant::now();
    let (reply, closed_after) = read_until_closed(&mut stream, start, Duration::from_secs(10))?;
    // the reply came at once, and the connection stayed open (kept alive) until the timeout
    assert_eq!(parse(&reply)?.status, 200);
    assert!(closed_after >= Duration::from_millis(900), "closed after {closed_after:?}");
    assert!(closed_after < Duration::from_secs(5), "closed after {closed_after:?}");
    server.shutdown()
}

#[test]
fn a_client_that_stalls_its_body_gets_a_408_and_is_disconnected() -> Result<()> {
    let server = start_with(fixture_engine()?, limits(10, 1, 64, 5))?;
    let start = Instant::now();
    let head = "POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \
                100\r\n\r\n{\"messages\"";
    let mut stream = stall(server.addr(), head.as_bytes())?;
    let (reply, closed_after) = read_until_closed(&mut stream, start, Duration::from_secs(10))?;
    let reply = parse(&reply)?;
    assert_eq!(reply.status, 408, "{}", reply.text());
    assert!(reply.json()?["error"]["message"].as_str().unwrap_or_default().contains("did not arrive"));
    assert!(closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(5), "{closed_after:?}");
    server.shutdown()
}

#[test]
fn many_stalled_connections_do_not_stop_health() -> Result<()> {
    // the stalled clients would hold their connections for a minute; the cap is 16
    let server = start_with(fixture_engine()?, limits(60, 60, 16, 5))?;
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(stall(server.addr(), b"GET /health HTTP/1.1\r\nHost: x\r\n")?);
    }
    let start = Instant::now();
    let health = get(server.addr(), "/health")?;
    assert_eq!(health.status, 200, "{}", health.text());
    assert!(start.elapsed() < Duration::from_secs(2), "/health took {:?}", start.elapsed());
    // the oldest stalled connections made room: at most the cap are still open
    let mut open = 0;
    for stream in &mut stalled {
        stream.set_read_timeout(Some(Duration::from_millis(20)))?;
        if matches!(stream.read(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    assert!(open <= 16, "{open} stalled connections still open under a cap of 16");
    server.shutdown()
}

/// Starts a streamed request for `max_tokens` tokens of the endless model and waits for its first
/// token; returns the connection and what has arrived so far.
fn stream_started(addr: SocketAddr, max_tokens: usize) -> Result<(TcpStream, Vec<u8>)> {
    let body = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": max_tokens});
    let mut stream = send(addr, "POST", "/chat/completions", Some("application/json"), body.to_string().as_bytes())?;
    let (mut seen, mut buf) = (Vec::new(), [0u8; 1024]);
    while !String::from_utf8_lossy(&seen).contains("\"token\"") {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    Ok((stream, seen))
}

#[test]
fn beyond_the_cap_with_every_connection_busy_a_new_one_gets_a_503_at_once() -> Result<()> {
    let server = start_with(endless_engine()?, limits(10, 10, 2, 5))?;
    let busy = [stream_started(server.addr(), 4096)?, stream_started(server.addr(), 4096)?];
    let start = Instant::now();
    let refused = get(server.addr(), "/health")?;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.json()?["error"]["message"].as_str().unwrap_or_default().contains("Too many open connections"));
    assert!(start.elapsed() < Duration::from_secs(1), "the refusal took {:?}", start.elapsed());
    // once the streams are gone, their places are free again
    drop(busy);
    let start = Instant::now();
    while get(server.addr(), "/health").map(|r| r.status).ok() != Some(200) {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "the cap never freed up");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.shutdown()
}

#[test]
fn streams_in_flight_at_shutdown_complete_and_new_connections_are_refused() -> Result<()> {
    let server = start_with(endless_engine()?, limits(10, 10, 64, 60))?;
    let addr = server.addr();
    let (mut stream, mut raw) = stream_started(addr, 60)?;
    let stopping = std::thread::spawn(move || {
        let start = Instant::now();
        server.shutdown().map(|()| start.elapsed())
    });
    // the listener closes while the stream runs on
    let start = Instant::now();
    while TcpStream::connect(addr).is_ok() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "still accepting after shutdown began");
        std::thread::sleep(Duration::from_millis(10));
    }
    stream.read_to_end(&mut raw)?;
    let reply = parse(&raw)?;
    let text = reply.text();
    let events = sse_events(&text)?;
    assert_eq!(events.last(), Some(&r#"{"done": true}"#), "the stream was cut: {text}");
    assert_eq!(events.len() - 1, 60, "every token of the reply arrived");
    let took = stopping.join().map_err(|_| anyhow::anyhow!("shutdown panicked"))??;
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
    Ok(())
}

#[test]
fn shutdown_closes_what_is_still_open_at_the_deadline() -> Result<()> {
    let server = start_with(endless_engine()?, limits(600, 600, 64, 1))?;
    let (mut stream, mut raw) = stream_started(server.addr(), 4096)?;
    let _stalled = stall(server.addr(), b"GET /health HTTP/1.1\r\n")?;
    let start = Instant::now();
    server.shutdown()?;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?} with a 1 s deadline");
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.read_to_end(&mut raw);
    assert!(!String::from_utf8_lossy(&raw).contains("\"done\""), "an endless stream cannot have finished");
    Ok(())
}

/// `nanochat serve` on the fixture checkpoint with `flags`; returns the child and its address.
fn serve_binary(base: &std::path::Path, flags: &[&str]) -> Result<(Child, SocketAddr)> {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(["serve", "--port", "0"])
        .args(flags)
        .env("NANOCHAT_BASE_DIR", base)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut banner = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut banner)?;
    let addr = banner
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no address in {banner:?}"))?
        .parse()?;
    Ok((child, addr))
}

fn signal(child: &Child, name: &str) -> Result<()> {
    anyhow::ensure!(Command::new("kill").args([name, &child.id().to_string()]).status()?.success());
    Ok(())
}

/// Waits up to `limit` for the child to exit; its status, stderr and how long it took.
fn exits_within(child: &mut Child, limit: Duration) -> Result<(std::process::ExitStatus, String, Duration)> {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            child.kill()?;
            bail!("the server was still running {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    Ok((status, stderr, start.elapsed()))
}

#[test]
fn sigterm_with_a_stalled_client_exits_within_the_deadline() -> Result<()> {
    let base = base_dir()?;
    let (mut child, addr) = serve_binary(base.path(), &["--shutdown-timeout", "2", "--header-timeout", "600"])?;
    let _stalled = stall(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n")?;
    // a request in flight whose body never comes: the shutdown has to wait for it, until the deadline
    let _in_flight = stall(
        addr,
        b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    )?;
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, "-TERM")?;
    let (status, stderr, took) = exits_within(&mut child, Duration::from_secs(10))?;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("terminated"), "{stderr}");
    assert!(took < Duration::from_secs(6), "took {took:?} with a 2 s deadline: {stderr}");
    Ok(())
}

#[test]
fn a_second_signal_stops_the_server_at_once() -> Result<()> {
    let base = base_dir()?;
    let flags = ["--shutdown-timeout", "600", "--body-timeout", "600"];
    let (mut child, addr) = serve_binary(base.path(), &flags)?;
    let _in_flight = stall(
        addr,
        b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    )?;
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, "-TERM")?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait()?.is_none(), "the first signal waits for the request in flight");
    signal(&child, "-INT")?;
    let (status, stderr, took) = exits_within(&mut child, Duration::from_secs(10))?;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("again"), "{stderr}");
    assert!(took < Duration::from_secs(3), "took {took:?} after the second signal: {stderr}");
    Ok(())
}
