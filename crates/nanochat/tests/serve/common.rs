//! Fixtures and a tiny HTTP/1.1 client for tests/serve.rs: the models, a server on 127.0.0.1:0,
//! requests with exact bytes, SSE parsing, `/stats` polling and the load generator.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use nanochat::engine::{Engine, GenerateOptions};
use nanochat::model::{GPTConfig, GPT};
use nanochat::serve::transcript::ReplyText;
use nanochat::serve::{Server, ServerConfig};
use serde_json::{json, Value};

pub use crate::common::{fixture_engine, tokenizer};

/// Large enough that each token costs real time, all zeros so greedy decoding never stops.
pub fn endless_engine() -> Result<Engine> {
    let config = GPTConfig {
        sequence_len: 512,
        vocab_size: 1024,
        n_layer: 6,
        n_head: 4,
        n_kv_head: 4,
        n_embd: 512,
        rotary: Default::default(),
    };
    Engine::new(GPT::new(&config, VarBuilder::zeros(DType::F32, &Device::Cpu))?, tokenizer()?)
}

pub fn config(queue: usize, time_limit: Duration) -> ServerConfig {
    ServerConfig {
        model_id: "nanochat-test".into(),
        batch: 4,
        queue,
        time_limit,
        temperature: 0.0,
        top_k: 50,
        max_tokens: 16,
        prompt_cache_bytes: 64 << 20,
        cors_origins: Vec::new(),
        api_key: None,
    }
}

pub fn start(engines: Vec<Engine>, queue: usize, time_limit: Duration) -> Result<Server> {
    Server::start("127.0.0.1", 0, engines, config(queue, time_limit))
}

/// A complete HTTP response.
pub struct Reply {
    pub status: u16,
    /// Header lines, lowercased.
    pub headers: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request and leaves the connection open for reading.
pub fn send(addr: SocketAddr, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes())?;
    // the server may answer (413) and close before reading a huge body: the reply still counts
    let _ = stream.write_all(body);
    Ok(stream)
}

pub fn request(addr: SocketAddr, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Result<Reply> {
    let mut stream = send(addr, method, path, content_type, body)?;
    let mut raw = Vec::new();
    // a reset after the full reply (server closed with unread body bytes) is not an error here
    if let Err(e) = stream.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    parse(&raw)
}

pub fn parse(raw: &[u8]) -> Result<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    Ok(Reply { status, headers: head, body })
}

pub fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").context("truncated chunk size")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end])?.trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).context("truncated chunk")?);
        data = &data[size + 2..];
    }
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Result<Reply> {
    request(addr, "POST", path, Some("application/json"), body.to_string().as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Reply> {
    request(addr, "GET", path, None, b"")
}

/// The prompt the server renders for one user message, and the engine's greedy reply to it:
/// its text as the server streams it and how many tokens it took.
pub fn greedy(engine: &Engine, question: &str, max_tokens: usize) -> Result<(Vec<u32>, String, usize)> {
    let tok = engine.tokenizer();
    let special = |name: &str| tok.special_id(name).context(name.to_string());
    let prompt = [
        vec![tok.bos_id(), special("<|user_start|>")?],
        tok.encode(question),
        vec![special("<|user_end|>")?, special("<|assistant_start|>")?],
    ]
    .concat();
    let opts =
        GenerateOptions { num_samples: 1, max_tokens, temperature: 0.0, top_k: None, seed: 0, ..Default::default() };
    let (reply, count) = reply_text(engine, &prompt, &opts)?;
    Ok((prompt, reply, count))
}

/// The reply the engine generates on its own for `prompt`, as the server streams it, and its
/// number of tokens.
pub fn reply_text(engine: &Engine, prompt: &[u32], opts: &GenerateOptions) -> Result<(String, usize)> {
    let mut text = ReplyText::new(engine);
    let (mut reply, mut count) = (String::new(), 0);
    for step in engine.generate(prompt, opts)? {
        let token = step?.0[0];
        if engine.specials().is_stop(token) {
            break;
        }
        count += 1;
        reply.push_str(&text.push(token));
    }
    reply.push_str(&text.finish());
    Ok((reply, count))
}

/// Splits an SSE body into its `data: ` payloads, checking the framing.
pub fn sse_events(body: &str) -> Result<Vec<&str>> {
    let Some(body) = body.strip_suffix("\n\n") else { bail!("the stream does not end with a blank line: {body:?}") };
    body.split("\n\n")
        .map(|event| event.strip_prefix("data: ").with_context(|| format!("not a data line: {event:?}")))
        .collect()
}

/// Starts a streaming request to the endless model and waits until its first token arrives.
pub fn start_endless_stream(addr: SocketAddr) -> Result<TcpStream> {
    let body = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": 4096});
    let mut stream = send(addr, "POST", "/chat/completions", Some("application/json"), body.to_string().as_bytes())?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("\"token\"") {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(stream)
}

pub fn stats(addr: SocketAddr) -> Result<Value> {
    get(addr, "/stats")?.json()
}

/// Polls `/stats` until `done` holds, for at most `limit`.
pub fn wait_for(addr: SocketAddr, limit: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let start = Instant::now();
    loop {
        let stats = stats(addr)?;
        if done(&stats) {
            return Ok(stats);
        }
        if start.elapsed() > limit {
            bail!("stats never got there: {stats}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A base dir holding the fixture tokenizer and the fixture weights as SFT checkpoint d2, step 5.
pub fn base_dir() -> Result<tempfile::TempDir> {
    let base = tempfile::tempdir()?;
    crate::common::fixture_checkpoint(base.path(), "chatsft_checkpoints")?;
    Ok(base)
}

/// What a load run saw.
pub struct Load {
    pub streams: usize,
    pub errors: Vec<String>,
    pub ttft: Vec<Duration>,
    /// Text events received.
    pub tokens: usize,
    pub elapsed: Duration,
}

/// `clients` threads each stream replies back to back for `duration`; every stream must end with
/// `done`.
pub fn load(addr: SocketAddr, clients: usize, duration: Duration, max_tokens: usize) -> Load {
    let started = Instant::now();
    let runs: Vec<_> = (0..clients)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut ttft, mut errors, mut tokens, mut streams) = (Vec::new(), Vec::new(), 0, 0);
                while started.elapsed() < duration {
                    let body = json!({
                        "messages": [{"role": "user", "content": format!("Tell me a story, number {i}")}],
                        "temperature": 1.0, "max_tokens": max_tokens,
                    });
                    match one_stream(addr, &body) {
                        Ok((first, n)) => {
                            ttft.extend(first);
                            tokens += n;
                            streams += 1;
                        }
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
                (ttft, errors, tokens, streams)
            })
        })
        .collect();
    let mut total = Load { streams: 0, errors: Vec::new(), ttft: Vec::new(), tokens: 0, elapsed: Duration::ZERO };
    for run in runs {
        match run.join() {
            Ok((ttft, errors, tokens, streams)) => {
                total.ttft.extend(ttft);
                total.errors.extend(errors);
                total.tokens += tokens;
                total.streams += streams;
            }
            Err(_) => total.errors.push("a client thread panicked".into()),
        }
    }
    total.elapsed = started.elapsed();
    total.ttft.sort();
    total
}

/// One streamed reply: the time to its first token (none if the reply was empty) and its number
/// of token events.
pub fn one_stream(addr: SocketAddr, body: &Value) -> Result<(Option<Duration>, usize)> {
    let started = Instant::now();
    let mut stream = send(addr, "POST", "/chat/completions", Some("application/json"), body.to_string().as_bytes())?;
    let (mut raw, mut buf, mut first) = (Vec::new(), [0u8; 4096], None);
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first.is_none() && buf[..n].windows(8).any(|w| w == b"\"token\":") {
            first = Some(started.elapsed());
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let reply = parse(&raw)?;
    anyhow::ensure!(reply.status == 200, "status {}: {}", reply.status, reply.text());
    let text = reply.text();
    let events = sse_events(&text)?;
    anyhow::ensure!(events.last() == Some(&r#"{"done": true}"#), "no done: {text}");
    Ok((first, events.len() - 1))
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}
