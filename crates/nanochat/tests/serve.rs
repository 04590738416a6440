//! `nanochat serve` over real HTTP on 127.0.0.1, with a tiny hand-written HTTP/1.1 client so the
//! bytes on the wire are checked exactly.
//!
//! Two models: the fixture model (real weights, a real greedy reply to compare against the engine),
//! and an all-zero model whose logits are all equal, so at temperature 0 it picks token 0 forever
//! and never stops: a generation that keeps a worker busy for as long as a test needs (queue
//! full, disconnect, time limit).

mod common;
#[path = "serve/common.rs"]
mod serve_common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nanochat::engine::GenerateOptions;
use nanochat::serve::workers::{Event, Pool};
use nanochat::serve::{Server, ServerConfig};
use serde_json::{json, Value};
use serve_common::*;
use std::sync::atomic::Ordering;

#[test]
fn native_stream_is_the_engine_greedy_reply_byte_for_byte() -> Result<()> {
    let engine = fixture_engine()?;
    let (_, expected, _) = greedy(&engine, "Hello there", 12)?;
    assert!(!expected.is_empty());
    let server = start(vec![engine], 4, Duration::from_secs(60))?;
    let body = json!({"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0.0, "max_tokens": 12});
    let reply = post_json(server.addr(), "/chat/completions", &body)?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.headers.contains("content-type: text/event-stream"), "{}", reply.headers);
    let text = reply.text();
    let events = sse_events(&text)?;
    let (last, tokens) = events.split_last().context("no events")?;
    assert_eq!(*last, r#"{"done": true}"#);
    let mut streamed = String::new();
    for event in tokens {
        let token = serde_json::from_str::<Value>(event)?["token"].as_str().context("no token")?.to_string();
        // Python's json.dumps layout, exactly
        assert_eq!(*event, format!("{{\"token\": {}, \"gpu\": 0}}", Value::from(token.as_str())));
        assert!(!token.is_empty());
        streamed.push_str(&token);
    }
    assert_eq!(streamed, expected);
    server.shutdown()
}

#[test]
fn every_native_limit_is_a_400_with_a_message_and_the_server_lives_on() -> Result<()> {
    let server = start(vec![fixture_engine()?], 4, Duration::from_secs(60))?;
    let addr = server.addr();
    let user = |content: &str| json!({"role": "user", "content": content});
    let long = "x".repeat(8_001);
    let quarter = "y".repeat(8_000);
    let cases = [
        (json!({"messages": []}), "At least one message"),
        (json!({"messages": vec![user("hi"); 501]}), "Too many messages"),
        (json!({"messages": [user(&long)]}), "Message 0 is too long"),
        (json!({"messages": vec![user(&quarter); 5]}), "Total conversation is too long"),
        (json!({"messages": [user("")]}), "Message 0 has empty content"),
        (json!({"messages": [user("a"), {"role": "wizard", "content": "b"}]}), "Message 1 has invalid role"),
        (json!({"messages": [user("a"), {"role": "system", "content": "b"}]}), "Message 1 has invalid role"),
        (json!({"messages": [user("a")], "temperature": 2.5}), "Temperature must be between"),
        (json!({"messages": [user("a")], "temperature": -0.1}), "Temperature must be between"),
        (json!({"messages": [user("a")], "top_k": 201}), "top_k must be between"),
        (json!({"messages": [user("a")], "top_k": -1}), "top_k must be between"),
        (json!({"messages": [user("a")], "max_tokens": 0}), "max_tokens must be between"),
        (json!({"messages": [user("a")], "max_tokens": 4097}), "max_tokens must be between"),
        (json!({"messages": [user("a")], "temperature": "hot"}), "temperature"),
        (json!({"messages": "hello"}), "messages"),
        // 8,000 varied characters are far more tokens than the fixture model's 640 positions
        (json!({"messages": [user(&"word 123 ".repeat(800))]}), "the model reads at most"),
    ];
    for (body, message) in cases {
        let reply = post_json(addr, "/chat/completions", &body)?;
        let detail = reply.json()?["detail"].as_str().unwrap_or_default().to_string();
        assert_eq!(reply.status, 400, "{body:.80}: {detail}");
        assert!(detail.contains(message), "{detail:?} should mention {message:?}");
    }
    let malformed = request(addr, "POST", "/chat/completions", Some("application/json"), b"{\"messages\": [")?;
    assert_eq!(malformed.status, 400);
    assert!(!malformed.json()?["detail"].as_str().unwrap_or_default().is_empty());
    let form = request(addr, "POST", "/chat/completions", Some("text/plain"), b"{}")?;
    assert_eq!(form.status, 415);
    assert!(form.json()?["detail"].as_str().unwrap_or_default().contains("application/json"));
    let huge = vec![b'a'; (1 << 20) + 10];
    let huge = request(addr, "POST", "/chat/completions", Some("application/json"), &huge)?;
    assert_eq!(huge.status, 413, "{}", huge.text());
    // still serving; a lone system message is answered as a user message
    let lone = json!({"messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 2});
    assert_eq!(post_json(addr, "/chat/completions", &lone)?.status, 200);
    let ok = post_json(addr, "/chat/completions", &json!({"messages": [user("hi")], "max_tokens": 2}))?;
    assert_eq!(ok.status, 200);
    assert!(ok.text().ends_with("data: {\"done\": true}\n\n"));
    server.shutdown()
}

#[test]
fn openai_completion_streaming_and_errors() -> Result<()> {
    let engine = fixture_engine()?;
    let (prompt, expected, count) = greedy(&engine, "What is 2+2?", 10)?;
    let server = start(vec![engine], 4, Duration::from_secs(60))?;
    let addr = server.addr();

    let models = get(addr, "/v1/models")?.json()?;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "nanochat-test");

    let request = json!({
        "model": "whatever", "temperature": 0, "max_tokens": 10, "top_p": 1, "seed": 7, "user": "ignored",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}],
    });
    let reply = post_json(addr, "/v1/chat/completions", &request)?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let completion = reply.json()?;
    assert_eq!(completion["object"], "chat.completion");
    assert!(completion["id"].as_str().unwrap_or_default().starts_with("chatcmpl-"));
    assert_eq!(completion["model"], "nanochat-test");
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected.as_str());
    assert_eq!(choice["finish_reason"], if count < 10 { "stop" } else { "length" });
    let usage = &completion["usage"];
    assert_eq!(usage["prompt_tokens"], prompt.len());
    assert_eq!(usage["completion_tokens"], count);
    assert_eq!(usage["total_tokens"], prompt.len() + count);

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let reply = post_json(addr, "/v1/chat/completions", &streaming)?;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.contains("content-type: text/event-stream"));
    let text = reply.text();
    let events = sse_events(&text)?;
    let (done, chunks) = events.split_last().context("no events")?;
    assert_eq!(*done, "[DONE]");
    let chunks: Vec<Value> = chunks.iter().map(|c| serde_json::from_str(c)).collect::<Result<_, _>>()?;
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(content, expected);
    let (usage_chunk, rest) = chunks.split_last().context("no usage chunk")?;
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], count);
    assert_eq!(rest.last().context("no final chunk")?["choices"][0]["finish_reason"], choice["finish_reason"]);
    assert!(rest.iter().all(|c| c["usage"].is_null()));

    let user = || json!({"role": "user", "content": "hi"});
    let cases = [
        (json!({"messages": [user()], "top_p": 0}), "top_p"),
        (json!({"messages": [user()], "n": 5}), "n"),
        (json!({"messages": [user()], "logit_bias": {"1": 5}}), "logit_bias"),
        (json!({"messages": [user()], "stop": ["a", ""]}), "stop"),
        (json!({"messages": [user()], "frequency_penalty": 3}), "frequency_penalty"),
        (json!({"messages": [user()], "temperature": 3}), "temperature"),
        (json!({"messages": [user()], "max_completion_tokens": 0}), "max_completion_tokens"),
        (json!({"messages": [user()], "max_tokens": 5000}), "max_tokens"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0]"),
        (json!({"messages": [user(), {"role": "system", "content": "x"}]}), "messages[1]"),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), "messages[0]"),
        (json!({"messages": []}), "messages"),
    ];
    for (body, param) in cases {
        let reply = post_json(addr, "/v1/chat/completions", &body)?;
        assert_eq!(reply.status, 400, "{body}");
        let error = &reply.json()?["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], param, "{error}");
        assert!(!error["message"].as_str().unwrap_or_default().is_empty());
        assert!(error.get("code").is_some());
    }
    let malformed = request_raw(addr, b"{oops")?;
    assert_eq!(malformed.status, 400);
    assert!(!malformed.json()?["error"]["message"].as_str().unwrap_or_default().is_empty());
    server.shutdown()
}

fn request_raw(addr: SocketAddr, body: &[u8]) -> Result<Reply> {
    request(addr, "POST", "/v1/chat/completions", Some("application/json"), body)
}

#[test]
fn health_stats_and_ui() -> Result<()> {
    let engine = fixture_engine()?;
    let (_, _, count) = greedy(&engine, "Hello there", 5)?;
    let server = start(vec![engine], 4, Duration::from_secs(60))?;
    let addr = server.addr();
    let health = get(addr, "/health")?.json()?;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["available_workers"], 1);
    let body = json!({"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 5});
    for _ in 0..2 {
        assert_eq!(post_json(addr, "/chat/completions", &body)?.status, 200);
    }
    let stats = get(addr, "/stats")?.json()?;
    assert_eq!(stats["workers"], 1);
    assert_eq!(stats["busy"], 0);
    assert_eq!(stats["queued"], 0);
    assert_eq!(stats["requests_served"], 2);
    assert_eq!(stats["tokens_generated"], 2 * count);
    let ui = get(addr, "/")?;
    assert_eq!(ui.status, 200);
    assert!(ui.headers.contains("content-type: text/html"));
    assert!(ui.text().contains("/chat/completions"));
    server.shutdown()
}

#[test]
fn a_full_queue_is_a_503_and_a_disconnect_frees_the_worker() -> Result<()> {
    let one_at_a_time = ServerConfig { batch: 1, ..config(1, Duration::from_secs(60)) };
    let server = Server::start("127.0.0.1", 0, vec![endless_engine()?], one_at_a_time)?;
    let addr = server.addr();
    let running = start_endless_stream(addr)?;
    // the second request waits in the queue of one
    let body = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": 4096});
    let queued = send(addr, "POST", "/chat/completions", Some("application/json"), body.to_string().as_bytes())?;
    wait_for(addr, Duration::from_secs(10), |s| s["busy"] == 1 && s["queued"] == 1)?;
    let refused = post_json(addr, "/chat/completions", &body)?;
    assert_eq!(refused.status, 503);
    assert!(refused.headers.contains("retry-after"));
    assert!(refused.json()?["detail"].as_str().unwrap_or_default().contains("busy"));
    let refused = post_json(addr, "/v1/chat/completions", &body)?;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()?["error"]["type"], "server_error");

    // hanging up on both frees the worker before either reply of 4,096 tokens is complete
    drop(running);
    drop(queued);
    let after = wait_for(addr, Duration::from_secs(20), |s| s["busy"] == 0 && s["queued"] == 0)?;
    assert!(after["tokens_generated"].as_u64().unwrap_or(u64::MAX) < 4096, "{after}");
    let quick = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": 3});
    let started = Instant::now();
    let served = post_json(addr, "/chat/completions", &quick)?;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(sse_events(&served.text())?.len(), 3 + 1);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(stats(addr)?["rejected_busy"], 2);
    server.shutdown()
}

#[test]
fn a_disconnect_also_cancels_a_non_streaming_openai_request() -> Result<()> {
    let server = start(vec![endless_engine()?], 0, Duration::from_secs(60))?;
    let addr = server.addr();
    let body = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": 4096});
    let waiting = send(addr, "POST", "/v1/chat/completions", Some("application/json"), body.to_string().as_bytes())?;
    wait_for(addr, Duration::from_secs(10), |s| s["busy"] == 1 && s["tokens_generated"].as_u64() > Some(0))?;
    drop(waiting);
    let after = wait_for(addr, Duration::from_secs(20), |s| s["busy"] == 0)?;
    assert!(after["tokens_generated"].as_u64().unwrap_or(u64::MAX) < 4096, "{after}");
    server.shutdown()
}

#[test]
fn the_time_limit_ends_a_reply_with_an_error_event() -> Result<()> {
    let server = start(vec![endless_engine()?], 1, Duration::from_millis(300))?;
    let addr = server.addr();
    let body = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": 600});
    let started = Instant::now();
    let reply = post_json(addr, "/chat/completions", &body)?;
    assert!(started.elapsed() < Duration::from_secs(20));
    let text = reply.text();
    let events = sse_events(&text)?;
    assert_eq!(events.last().copied(), Some(r#"{"done": true}"#));
    let error: Value = serde_json::from_str(events[events.len() - 2])?;
    assert!(error["error"].as_str().unwrap_or_default().contains("time limit"), "{error}");
    let openai = post_json(addr, "/v1/chat/completions", &body)?;
    assert_eq!(openai.status, 500);
    assert!(openai.json()?["error"]["message"].as_str().unwrap_or_default().contains("time limit"));
    server.shutdown()
}

#[test]
fn the_binary_serves_a_checkpoint_and_stops_gracefully_on_sigterm() -> Result<()> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let base = base_dir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(["serve", "--port", "0", "--workers", "2", "-t", "0"])
        .env("NANOCHAT_BASE_DIR", base.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut banner = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut banner)?;
    let addr: SocketAddr = banner
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no address in {banner:?}"))?
        .parse()?;
    assert!(banner.contains("2 workers"), "{banner}");
    let health = get(addr, "/health")?.json()?;
    assert_eq!(health["workers"], 2);
    let body = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4});
    let reply = post_json(addr, "/v1/chat/completions", &body)?.json()?;
    assert_eq!(reply["model"], "nanochat-sft-default");
    assert_eq!(reply["object"], "chat.completion");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            child.kill()?;
            bail!("the server did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("terminated"), "{stderr}");
    Ok(())
}

/// The official `openai` Python client, streaming and not, when it is installed (`pip install
/// openai`); set NANOCHAT_REQUIRE_OPENAI=1 to make its absence a failure rather than a skip.
#[test]
fn the_official_openai_python_client_works_against_v1() -> Result<()> {
    use std::process::Command;

    let has_client = Command::new("python3").args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has_client {
        assert!(std::env::var_os("NANOCHAT_REQUIRE_OPENAI").is_none(), "the openai Python package is not installed");
        common::skipped(
            "the_official_openai_python_client_works_against_v1",
            "`pip install openai` to run the official client against the server",
        );
        return Ok(());
    }
    let engine = fixture_engine()?;
    // the system message joins the user's after a blank line
    let (prompt, expected, count) = greedy(&engine, "Be brief.\n\nWhat is 2+2?", 8)?;
    let server = start(vec![engine], 4, Duration::from_secs(60))?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve/openai_client.py");
    let out = Command::new("python3").arg(script).arg(format!("http://{}/v1", server.addr())).output()?;
    server.shutdown()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout)?;
    let usage =
        json!({"prompt_tokens": prompt.len(), "completion_tokens": count, "total_tokens": prompt.len() + count});
    let finish = if count < 8 { "stop" } else { "length" };
    assert_eq!(seen["models"], json!(["nanochat-test"]));
    assert_eq!(seen["content"], expected.as_str());
    assert_eq!(seen["finish_reason"], finish);
    assert_eq!(seen["usage"]["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(seen["usage"]["completion_tokens"], usage["completion_tokens"]);
    assert_eq!(seen["stream_content"], expected.as_str());
    assert_eq!(seen["stream_finish_reason"], finish);
    assert_eq!(seen["stream_usage"]["total_tokens"], usage["total_tokens"]);
    assert_eq!(seen["refused"]["status"], 400);
    assert!(seen["refused"]["message"].as_str().unwrap_or_default().contains("logit_bias"), "{seen}");
    Ok(())
}

#[test]
fn concurrent_streams_all_complete() -> Result<()> {
    let server = start(vec![fixture_engine()?, fixture_engine()?], 16, Duration::from_secs(60))?;
    let run = load(server.addr(), 8, Duration::from_millis(1500), 16);
    server.shutdown()?;
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    assert!(run.streams >= 8 && run.tokens > 0);
    Ok(())
}

/// The load test behind docs/BENCHMARKS.md: `NANOCHAT_LOAD_CLIENTS` (32) streaming clients for
/// `NANOCHAT_LOAD_SECS` (30) against `NANOCHAT_LOAD_WORKERS` (2) workers of the fixture model, each
/// decoding `NANOCHAT_LOAD_BATCH` (8) replies together.
/// Run it with `cargo test -p nanochat --test serve load_test -- --ignored --nocapture`.
#[test]
#[ignore = "a 30 s load test; run it on purpose"]
fn load_test() -> Result<()> {
    let var = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (clients, secs, workers, batch) = (
        var("NANOCHAT_LOAD_CLIENTS", 32),
        var("NANOCHAT_LOAD_SECS", 30),
        var("NANOCHAT_LOAD_WORKERS", 2),
        var("NANOCHAT_LOAD_BATCH", 8),
    );
    let engines = (0..workers).map(|_| fixture_engine()).collect::<Result<Vec<_>>>()?;
    let config = ServerConfig { batch, ..config(clients, Duration::from_secs(120)) };
    let server = Server::start("127.0.0.1", 0, engines, config)?;
    let run = load(server.addr(), clients, Duration::from_secs(secs as u64), 64);
    // the server's own count: stream events are text pieces, not always one per token
    let tokens = stats(server.addr())?["tokens_generated"].as_u64().unwrap_or_default();
    server.shutdown()?;
    println!(
        "{clients} clients, {workers} workers × batch {batch}, {:.1} s: {} streams, {} errors, {} tokens, {:.0} tokens/s, \
         time to first token p50 {:.1} ms p99 {:.1} ms",
        run.elapsed.as_secs_f64(),
        run.streams,
        run.errors.len(),
        tokens,
        tokens as f64 / run.elapsed.as_secs_f64(),
        percentile(&run.ttft, 0.5).as_secs_f64() * 1e3,
        percentile(&run.ttft, 0.99).as_secs_f64() * 1e3,
    );
    assert!(run.errors.is_empty(), "{:?}", &run.errors[..run.errors.len().min(5)]);
    Ok(())
}

/// The UI in headless Chromium (Debian `chromium` and `chromium-driver`, `pip install selenium`):
/// streaming, regenerate, edit, Shift+Enter, `/temperature`, no HTML injection, a screenshot, the
/// stop button. Skipped
/// when those are missing unless NANOCHAT_REQUIRE_BROWSER=1.
#[test]
fn the_ui_works_in_a_real_browser() -> Result<()> {
    use std::process::Command;

    let has_selenium =
        Command::new("python3").args(["-c", "import selenium"]).output().is_ok_and(|o| o.status.success());
    let has_chromium = ["/usr/bin/chromium", "/usr/bin/chromedriver"].iter().all(|p| std::path::Path::new(p).exists());
    if !(has_selenium && has_chromium) {
        assert!(
            std::env::var_os("NANOCHAT_REQUIRE_BROWSER").is_none(),
            "chromium, chromium-driver or selenium missing"
        );
        common::skipped(
            "the_ui_works_in_a_real_browser",
            "apt-get install chromium chromium-driver && pip install selenium to run the browser test",
        );
        return Ok(());
    }
    let engine = fixture_engine()?;
    let (_, hello, _) = greedy(&engine, "Hello\nthere", 16)?;
    let (_, sum, _) = greedy(&engine, "What is 2+2?", 16)?;
    let server = start(vec![engine], 4, Duration::from_secs(60))?;
    let screenshot = std::env::temp_dir().join("nanochat-serve-ui.png");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve/browser_test.py");
    let out =
        Command::new("python3").arg(script).arg(format!("http://{}/", server.addr())).arg(&screenshot).output()?;
    server.shutdown()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout)?;
    println!("{seen:#}\nscreenshot: {}", screenshot.display());
    assert!(seen["notes"][0].as_str().unwrap_or_default().contains("temperature set to 0"), "{seen}");
    assert_eq!(seen["question"], "Hello\nthere");
    assert_eq!(seen["first"].as_str().map(str::trim), Some(hello.trim()));
    assert_eq!(seen["regenerated"], seen["first"]);
    assert_eq!(seen["edited"], "What is 2+2?");
    assert_eq!(seen["replies"][0].as_str().map(str::trim), Some(sum.trim()));
    assert_eq!(seen["injected"], "<img src=x onerror=alert(1)><b>bold</b>");
    assert_eq!(seen["markup_elements"], 0);
    assert!(std::fs::metadata(&screenshot)?.len() > 1000);

    // Stop mid-reply: the browser drops the stream and the worker is freed before the 4,096-token reply ends
    let long_replies = ServerConfig { max_tokens: 4096, ..config(0, Duration::from_secs(60)) };
    let server = Server::start("127.0.0.1", 0, vec![endless_engine()?], long_replies)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve/browser_test.py");
    let out = Command::new("python3").arg(script).arg(format!("http://{}/", server.addr())).arg("stop").output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(seen["sent"], json!(["go"]));
    assert_eq!(seen["replies"].as_array().map(Vec::len), Some(1), "{seen}");
    let after = wait_for(server.addr(), Duration::from_secs(20), |s| s["busy"] == 0)?;
    assert!(after["tokens_generated"].as_u64().unwrap_or(u64::MAX) < 4096, "{after}");
    server.shutdown()
}

/// Replies of `n` requests submitted at once to a pool of one worker generating `batch` together:
/// each reply's text and the largest batch the worker decoded.
fn pool_replies(batch: usize, prompts: &[Vec<u32>], opts: &[GenerateOptions]) -> Result<(Vec<String>, u64)> {
    let pool = Pool::start(vec![fixture_engine()?], batch, prompts.len(), Duration::from_secs(60), 0)?;
    let receivers = prompts
        .iter()
        .zip(opts)
        .map(|(p, o)| pool.submit(p.clone(), o.clone(), Vec::new()).map_err(|_| anyhow::anyhow!("busy")))
        .collect::<Result<Vec<_>>>()?;
    let mut replies = Vec::new();
    for mut rx in receivers {
        let mut text = String::new();
        loop {
            match rx.blocking_recv().context("the stream ended without Done")? {
                Event::Text { text: piece, .. } => text.push_str(&piece),
                Event::End { .. } => {}
                Event::Done { .. } => break,
                Event::Error(e) => anyhow::bail!(e),
            }
        }
        replies.push(text);
    }
    let peak = pool.stats().peak_batch.load(Ordering::SeqCst) as u64;
    pool.shutdown();
    Ok((replies, peak))
}

#[test]
fn batched_replies_are_the_engine_replies_whatever_they_are_batched_with() -> Result<()> {
    let engine = fixture_engine()?;
    let questions = ["Hello there", "What is 2+2?", "Tell me a story", "Why is the sky blue?", "Hi", "Count to ten"];
    let prompts: Vec<Vec<u32>> =
        questions.iter().map(|q| greedy(&engine, q, 1).map(|(p, _, _)| p)).collect::<Result<_>>()?;
    // sampled replies of different lengths, each with its own seed, one greedy
    let opts: Vec<GenerateOptions> = (0..prompts.len())
        .map(|i| GenerateOptions {
            num_samples: 1,
            max_tokens: 20 + 7 * i,
            temperature: if i == 2 { 0.0 } else { 1.0 },
            top_k: if i % 2 == 0 { Some(50) } else { None },
            seed: 1000 + i as u64,
            ..Default::default()
        })
        .collect();
    let expected: Vec<String> =
        prompts.iter().zip(&opts).map(|(p, o)| reply_text(&engine, p, o).map(|r| r.0)).collect::<Result<_>>()?;
    let (batched, peak) = pool_replies(4, &prompts, &opts)?;
    assert_eq!(batched, expected, "batched replies differ from the engine's");
    assert!(peak >= 2, "the worker never decoded two replies together (peak {peak})");
    assert!(peak <= 4, "more replies than slots in one step (peak {peak})");
    let (single, peak) = pool_replies(1, &prompts, &opts)?;
    assert_eq!(single, expected);
    assert_eq!(peak, 1);
    Ok(())
}

#[test]
fn admission_is_bounded_by_slots_plus_queue() -> Result<()> {
    // one worker decoding 2 replies together, 1 more waiting: the 4th concurrent request is refused
    let config = ServerConfig { batch: 2, max_tokens: 600, ..config(1, Duration::from_secs(60)) };
    let server = Server::start("127.0.0.1", 0, vec![endless_engine()?], config)?;
    let addr = server.addr();
    let mut streams = (0..2).map(|_| start_endless_stream(addr)).collect::<Result<Vec<_>>>()?;
    let long = json!({"messages": [{"role": "user", "content": "go"}], "temperature": 0, "max_tokens": 4096});
    streams.push(send(addr, "POST", "/chat/completions", Some("application/json"), long.to_string().as_bytes())?);
    wait_for(addr, Duration::from_secs(10), |s| s["busy"] == 2 && s["queued"] == 1)?;
    // the worker counts itself full at its next step, a moment after the admissions /stats shows
    let start = Instant::now();
    let mut health = get(addr, "/health")?.json()?;
    while health["available_workers"] != 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        health = get(addr, "/health")?.json()?;
    }
    assert_eq!(health["available_workers"], 0, "{health}");
    let body = json!({"messages": [{"role": "user", "content": "go"}], "max_tokens": 5});
    assert_eq!(post_json(addr, "/chat/completions", &body)?.status, 503);
    drop(streams);
    let after = wait_for(addr, Duration::from_secs(20), |s| s["busy"] == 0 && s["queued"] == 0)?;
    assert_eq!(after["peak_batch"], 2, "{after}");
    assert_eq!(get(addr, "/health")?.json()?["available_workers"], 1);
    server.shutdown()
}
