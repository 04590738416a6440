//! The server over raw HTTP on 127.0.0.1, with models built in the test (no files): prompt caching
//! gives the replies of a server without it token for token, `n` choices and log-probabilities,
//! the native API's new fields and the calculator shown as text, CORS, API keys, JSON bodies on
//! 404/405, and `/metrics` parsed as Prometheus text.

mod common;
#[path = "serve/fixture.rs"]
mod fixture;
#[path = "serve/oracle.rs"]
#[allow(dead_code)]
mod oracle;
#[path = "serve/common.rs"]
#[allow(dead_code, unused_imports)]
mod serve_common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fixture::{random_engine, random_engine_on, scripted_engine, Say};
use nanochat::engine::{Backend, Engine, GenerateOptions};
use nanochat::serve::ServerConfig;
use oracle::{chat_prompt, config, expect, serve};
use serde_json::{json, Value};
use serve_common::{get, parse, post_json, sse_events, Reply};

/// A request with extra headers.
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes())?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    parse(&out)
}

/// The prompt the server renders for alternating user and assistant messages.
fn conversation_prompt(engine: &Engine, turns: &[&str]) -> Vec<u32> {
    let tok = engine.tokenizer();
    let sp = |name: &str| tok.special_id(name).unwrap_or_default();
    let mut ids = vec![tok.bos_id()];
    for (i, text) in turns.iter().enumerate() {
        let (start, end) =
            if i % 2 == 0 { ("<|user_start|>", "<|user_end|>") } else { ("<|assistant_start|>", "<|assistant_end|>") };
        ids.push(sp(start));
        ids.extend(tok.encode(text));
        ids.push(sp(end));
    }
    ids.push(sp("<|assistant_start|>"));
    ids
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[test]
fn prompt_caching_gives_the_uncached_replies_token_for_token() -> Result<()> {
    let engine = random_engine(9);
    let cached = serve(random_engine(9), config())?;
    let uncached = serve(random_engine(9), ServerConfig { prompt_cache_bytes: 0, ..config() })?;
    let users = ["Tell me a story", "Why is the sky blue?", "And then what, with numbers like 12?", "Thanks"];
    let mut turns: Vec<String> = Vec::new();
    // what the cache holds after each reply: the prompt and every generated token but the last
    let mut entries: Vec<Vec<u32>> = Vec::new();
    let mut cached_total = 0;
    let mut previous = 0;
    for (k, user) in users.iter().enumerate() {
        turns.push(user.to_string());
        let messages: Vec<Value> = turns
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": t}))
            .collect();
        let prompt = conversation_prompt(&engine, &turns.iter().map(String::as_str).collect::<Vec<_>>());
        // greedy turns and seeded sampled ones
        let (temperature, seed) = if k % 2 == 0 { (0.0, 0) } else { (1.0, 40 + k as u64) };
        let opts = GenerateOptions { max_tokens: 24, temperature, seed, top_k: Some(50), ..Default::default() };
        let want = expect(&engine, &prompt, &opts, &[])?;
        let body = json!({"messages": messages, "max_tokens": 24, "temperature": temperature, "seed": seed});
        let with = post_json(cached.addr(), "/v1/chat/completions", &body)?.json()?;
        let without = post_json(uncached.addr(), "/v1/chat/completions", &body)?.json()?;
        assert_eq!(with["choices"], without["choices"], "turn {k}: the prompt cache changed the reply");
        assert_eq!(with["choices"][0]["message"]["content"], want[0].content.as_str(), "turn {k}");
        assert_eq!(with["usage"]["prompt_tokens"], prompt.len());
        let hit = entries.iter().map(|e| common_prefix(e, &prompt)).max().unwrap_or(0).min(prompt.len() - 1);
        assert_eq!(with["usage"]["prompt_tokens_details"]["cached_tokens"], hit, "turn {k}");
        assert_eq!(without["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        // at least the previous turn's whole prompt (the reply's tokens too, where the model wrote
        // them as the tokenizer would: a random model often does not)
        assert!(hit >= previous, "turn {k}: only {hit} of {} tokens cached", prompt.len());
        previous = prompt.len();
        cached_total += hit;
        entries.push([&prompt[..], &want[0].ids[..want[0].ids.len() - 1]].concat());
        turns.push(want[0].content.clone());
    }
    let metrics = get(cached.addr(), "/metrics")?.text();
    let samples = parse_prometheus(&metrics)?;
    assert_eq!(samples.get("nanochat_prompt_tokens_cached_total"), Some(&(cached_total as f64)), "{metrics}");
    assert!(samples.get("nanochat_prompt_cache_entries").is_some_and(|&e| e >= 1.0));
    cached.shutdown()?;
    uncached.shutdown()
}

#[test]
fn n_choices_and_logprobs_over_raw_http() -> Result<()> {
    let engine = random_engine(10);
    let prompt = chat_prompt(&engine, "Hello there");
    let opts = GenerateOptions {
        num_samples: 3,
        max_tokens: 8,
        temperature: 1.0,
        top_k: Some(50),
        seed: 3,
        logprobs: Some(2),
        ..Default::default()
    };
    let want = expect(&engine, &prompt, &opts, &[])?;
    let server = serve(engine, config())?;
    let body = json!({"messages": [{"role": "user", "content": "Hello there"}], "n": 3, "temperature": 1,
        "seed": 3, "max_tokens": 8, "logprobs": true, "top_logprobs": 2});
    let reply = post_json(server.addr(), "/v1/chat/completions", &body)?.json()?;
    let too_many = post_json(server.addr(), "/v1/chat/completions", &json!({"messages": body["messages"], "n": 5}))?;
    server.shutdown()?;
    for (i, want) in want.iter().enumerate() {
        let choice = &reply["choices"][i];
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["content"], want.content.as_str());
        let content = choice["logprobs"]["content"].as_array().context("logprobs.content")?;
        assert_eq!(content.len(), want.logprobs.len());
        for (entry, lp) in content.iter().zip(&want.logprobs) {
            assert!((entry["logprob"].as_f64().unwrap_or(0.0) - lp.logprob as f64).abs() < 1e-4, "{entry}");
            assert_eq!(entry["top_logprobs"].as_array().map(Vec::len), Some(2));
            assert!(entry["bytes"].is_array() && entry["token"].is_string());
        }
    }
    assert_eq!(reply["usage"]["completion_tokens"], want.iter().map(|c| c.tokens).sum::<usize>());
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.json()?["error"]["param"], "n");
    Ok(())
}

#[test]
fn a_gpu_style_worker_serves_the_same_choices_one_request_at_a_time() -> Result<()> {
    // the candle backend (what a GPU runs) decodes one request at a time through the engine's loop
    let native = random_engine(12);
    let prompt = chat_prompt(&native, "Tell me a story");
    let opts = GenerateOptions {
        num_samples: 2,
        max_tokens: 10,
        temperature: 1.0,
        top_k: Some(50),
        seed: 4,
        logprobs: Some(1),
        ..Default::default()
    };
    let full = expect(&native, &prompt, &opts, &[])?;
    let stop: String = full[1].content.chars().skip(4).take(2).collect();
    let want = expect(&native, &prompt, &opts, &[&stop])?;
    let server = serve(random_engine_on(12, Backend::Candle), config())?;
    let body = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "n": 2, "temperature": 1,
        "seed": 4, "max_tokens": 10, "logprobs": true, "top_logprobs": 1, "stop": stop});
    let reply = post_json(server.addr(), "/v1/chat/completions", &body)?.json()?;
    server.shutdown()?;
    for (i, want) in want.iter().enumerate() {
        let choice = &reply["choices"][i];
        assert_eq!(choice["message"]["content"], want.content.as_str(), "choice {i}: {reply}");
        assert_eq!(choice["finish_reason"], want.finish);
        let content = choice["logprobs"]["content"].as_array().context("logprobs.content")?;
        assert_eq!(content.len(), want.logprobs.len());
        for (entry, lp) in content.iter().zip(&want.logprobs) {
            assert!((entry["logprob"].as_f64().unwrap_or(0.0) - lp.logprob as f64).abs() < 1e-3, "{entry}");
        }
    }
    assert_eq!(want[1].finish, "stop", "the stop string ends the second choice");
    assert_eq!(reply["usage"]["completion_tokens"], want.iter().map(|c| c.tokens).sum::<usize>());
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "no prompt cache on this backend");
    Ok(())
}

/// The tokens of a native stream, joined.
fn native_text(reply: &Reply) -> Result<String> {
    let text = reply.text();
    let events = sse_events(&text)?;
    ensure!(events.last() == Some(&r#"{"done": true}"#), "{text}");
    let mut out = String::new();
    for event in &events[..events.len() - 1] {
        out.push_str(serde_json::from_str::<Value>(event)?["token"].as_str().context("a token event")?);
    }
    Ok(out)
}

#[test]
fn the_native_api_takes_the_new_fields_and_shows_the_calculator_as_text() -> Result<()> {
    let engine = random_engine(11);
    let prompt = chat_prompt(&engine, "What is a cache?");
    let opts = GenerateOptions {
        max_tokens: 16,
        temperature: 1.0,
        top_p: 0.8,
        top_k: Some(50),
        seed: 9,
        ..Default::default()
    };
    let full = expect(&engine, &prompt, &opts, &[])?;
    // a stop string of the last character of one token and the first of the next, found nowhere
    // earlier: it is only seen once both tokens are in
    let chars: Vec<char> = full[0].content.chars().collect();
    let stop = full[0]
        .offsets
        .windows(3)
        .filter(|w| w[0] < w[1] && w[1] < w[2])
        .map(|w| (w[1], chars[w[1] - 1..=w[1]].iter().collect::<String>()))
        .find(|(at, stop)| {
            let byte = chars[..at - 1].iter().map(|c| c.len_utf8()).sum::<usize>();
            full[0].content.find(stop.as_str()) == Some(byte)
        })
        .map(|(_, stop)| stop)
        .context("no stop string straddles two tokens")?;
    let want = expect(&engine, &prompt, &opts, &[&stop])?;
    let server = serve(engine, config())?;
    let body = json!({"messages": [{"role": "user", "content": "What is a cache?"}], "temperature": 1,
        "top_p": 0.8, "seed": 9, "stop": stop, "max_tokens": 16});
    let reply = post_json(server.addr(), "/chat/completions", &body)?;
    assert_eq!(native_text(&reply)?, want[0].content);
    assert!(want[0].content.len() < full[0].content.len());
    let bad = post_json(server.addr(), "/chat/completions", &json!({"messages": body["messages"], "top_p": 0}))?;
    assert_eq!(bad.status, 400);
    assert!(bad.json()?["detail"].as_str().unwrap_or_default().contains("top_p"));
    server.shutdown()?;

    let script = [
        Say::Text("The sum is"),
        Say::Special("<|python_start|>"),
        Say::Text("12+34"),
        Say::Special("<|python_end|>"),
        Say::Text("!"),
    ];
    let server = serve(scripted_engine(&script), config())?;
    let body = json!({"messages": [{"role": "user", "content": "What is 12+34?"}], "max_tokens": 64});
    let reply = native_text(&post_json(server.addr(), "/chat/completions", &body)?)?;
    assert_eq!(reply, "The sum is<<12+34=46>>!");
    server.shutdown()
}

#[test]
fn cors_is_off_by_default_and_answers_preflights_when_on() -> Result<()> {
    let origin = ("Origin", "https://app.example");
    let server = serve(random_engine(1), config())?;
    let reply = raw(server.addr(), "GET", "/v1/models", &[origin], "")?;
    assert_eq!(reply.status, 200);
    assert!(!reply.headers.contains("access-control-allow-origin"), "{}", reply.headers);
    server.shutdown()?;

    let on = ServerConfig { cors_origins: vec!["https://app.example".into()], api_key: Some("k".into()), ..config() };
    let server = serve(random_engine(1), on)?;
    let preflight = [
        origin,
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization,content-type"),
    ];
    let reply = raw(server.addr(), "OPTIONS", "/v1/chat/completions", &preflight, "")?;
    assert!(reply.status == 200 || reply.status == 204, "preflight: {}", reply.status);
    assert!(reply.headers.contains("access-control-allow-origin: https://app.example"), "{}", reply.headers);
    assert!(reply.headers.contains("access-control-allow-methods"), "{}", reply.headers);
    assert!(reply.headers.contains("authorization"), "{}", reply.headers);
    // a real request from the origin, and even its 401, carry the header a browser needs
    let ok = raw(server.addr(), "GET", "/v1/models", &[origin, ("Authorization", "Bearer k")], "")?;
    assert!(ok.status == 200 && ok.headers.contains("access-control-allow-origin: https://app.example"));
    let refused = raw(server.addr(), "GET", "/v1/models", &[origin], "")?;
    assert!(refused.status == 401 && refused.headers.contains("access-control-allow-origin"));
    let other = raw(server.addr(), "GET", "/health", &[("Origin", "https://evil.example")], "")?;
    assert!(!other.headers.contains("access-control-allow-origin"), "{}", other.headers);
    server.shutdown()
}

#[test]
fn an_api_key_guards_every_route_but_the_ui_and_health() -> Result<()> {
    let server = serve(random_engine(2), ServerConfig { api_key: Some("sekrit".into()), ..config() })?;
    let addr = server.addr();
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#;
    let json = ("Content-Type", "application/json");
    for (method, path, body) in
        [("GET", "/v1/models", ""), ("POST", "/v1/chat/completions", chat), ("GET", "/metrics", "")]
    {
        for auth in [None, Some("Bearer wrong"), Some("sekrit")] {
            let mut headers = vec![json];
            headers.extend(auth.map(|a| ("Authorization", a)));
            let reply = raw(addr, method, path, &headers, body)?;
            assert_eq!(reply.status, 401, "{method} {path} with {auth:?}");
            assert!(reply.headers.contains("www-authenticate: bearer"));
            let body = reply.json()?;
            if path.starts_with("/v1") {
                assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
                assert_eq!(body["error"]["type"], "invalid_request_error");
                assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty());
            } else {
                assert!(body["detail"].as_str().unwrap_or_default().contains("API key"), "{body}");
            }
        }
        let reply = raw(addr, method, path, &[json, ("Authorization", "Bearer sekrit")], body)?;
        assert_eq!(reply.status, 200, "{method} {path} with the key: {}", reply.text());
    }
    let native = raw(addr, "POST", "/chat/completions", &[json], chat)?;
    assert_eq!(native.status, 401);
    assert!(native.json()?["detail"].is_string());
    assert_eq!(get(addr, "/")?.status, 200);
    assert_eq!(get(addr, "/health")?.status, 200);
    server.shutdown()
}

#[test]
fn unknown_paths_and_methods_get_json_bodies() -> Result<()> {
    let server = serve(random_engine(3), config())?;
    let addr = server.addr();
    let nope = get(addr, "/nope")?;
    assert_eq!((nope.status, nope.json()?), (404, json!({"detail": "Not Found"})));
    let v1 = get(addr, "/v1/nope")?;
    assert_eq!(v1.status, 404);
    assert_eq!(v1.json()?["error"]["type"], "not_found_error");
    let method = get(addr, "/v1/chat/completions")?;
    assert_eq!(method.status, 405);
    assert!(method.headers.contains("allow: post"), "{}", method.headers);
    assert!(!method.json()?["error"]["message"].as_str().unwrap_or_default().is_empty());
    let native = post_json(addr, "/health", &json!({}))?;
    assert_eq!((native.status, native.json()?), (405, json!({"detail": "Method Not Allowed"})));
    let model = get(addr, "/v1/models/nanochat-test")?.json()?;
    assert_eq!(model["id"], "nanochat-test");
    let missing = get(addr, "/v1/models/gpt-5")?;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()?["error"]["code"], "model_not_found");
    server.shutdown()
}

/// Parses Prometheus' text format strictly: every sample's metric declared by `# TYPE` first,
/// names and labels well formed, histograms cumulative and ending in `+Inf` = `_count`. Returns
/// the samples without labels by name (labelled ones by `name{labels}`).
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>> {
    let name_ok = |n: &str| {
        n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), Some(_)) => ensure!(name_ok(name), "bad name in {line:?}"),
                (Some("TYPE"), Some(name), Some(kind)) => {
                    ensure!(["counter", "gauge", "histogram"].contains(&kind), "{line:?}");
                    ensure!(types.insert(name.to_string(), kind.to_string()).is_none(), "declared twice: {line:?}");
                }
                _ => anyhow::bail!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("no value in {line:?}"))?;
        let value: f64 =
            if value == "+Inf" { f64::INFINITY } else { value.parse().with_context(|| line.to_string())? };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, Some(rest.strip_suffix('}').with_context(|| format!("{line:?}"))?)),
            None => (series, None),
        };
        ensure!(name_ok(name), "bad metric name in {line:?}");
        for label in labels.into_iter().flat_map(|l| l.split(',')) {
            let (key, quoted) = label.split_once('=').with_context(|| format!("bad label in {line:?}"))?;
            ensure!(name_ok(key) && quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'), "{line:?}");
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| types.get(*b).is_some_and(|k| k == "histogram"));
        let declared = base.unwrap_or(name);
        ensure!(types.contains_key(declared), "{name} sampled before its # TYPE");
        if name.ends_with("_bucket") {
            buckets.entry(declared.to_string()).or_default().push(value);
        }
        samples.insert(series.to_string(), value);
    }
    for (name, counts) in &buckets {
        ensure!(counts.windows(2).all(|w| w[0] <= w[1]), "{name}: buckets not cumulative: {counts:?}");
        let count = samples.get(&format!("{name}_count")).copied();
        ensure!(counts.last().copied() == count, "{name}: +Inf bucket {:?} vs count {count:?}", counts.last());
    }
    Ok(samples)
}

#[test]
fn metrics_are_prometheus_text_that_counts_what_happened() -> Result<()> {
    let server = serve(random_engine(4), config())?;
    let addr = server.addr();
    let body = json!({"messages": [{"role": "user", "content": "Count"}], "max_tokens": 5, "temperature": 0});
    for _ in 0..2 {
        assert_eq!(post_json(addr, "/v1/chat/completions", &body)?.status, 200);
    }
    assert_eq!(post_json(addr, "/chat/completions", &body)?.status, 200);
    assert_eq!(get(addr, "/nope")?.status, 404);
    let reply = get(addr, "/metrics")?;
    server.shutdown()?;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.contains("content-type: text/plain; version=0.0.4"), "{}", reply.headers);
    let text = reply.text();
    let s = parse_prometheus(&text)?;
    let at = |key: &str| s.get(key).copied().with_context(|| format!("no {key} in\n{text}"));
    assert_eq!(at(r#"nanochat_http_requests_total{route="/v1/chat/completions",status="200"}"#)?, 2.0);
    assert_eq!(at(r#"nanochat_http_requests_total{route="/chat/completions",status="200"}"#)?, 1.0);
    assert_eq!(at(r#"nanochat_http_requests_total{route="unmatched",status="404"}"#)?, 1.0);
    assert_eq!(at("nanochat_requests_completed_total")?, 3.0);
    // the random model never stops early: 5 tokens each
    assert_eq!(at("nanochat_generation_tokens_total")?, 15.0);
    assert_eq!(at("nanochat_time_to_first_token_seconds_count")?, 3.0);
    // the first token of each reply has no predecessor
    assert_eq!(at("nanochat_time_per_output_token_seconds_count")?, 12.0);
    assert_eq!(at("nanochat_slots")?, 4.0);
    assert_eq!(at("nanochat_queue_depth")?, 0.0);
    assert_eq!(at("nanochat_slots_active")?, 0.0);
    let prompt = chat_prompt(&random_engine(4), "Count").len() as f64;
    assert_eq!(at("nanochat_prompt_tokens_total")?, 3.0 * prompt);
    // requests 2 and 3 find request 1's conversation: all but its last prompt token
    assert_eq!(at("nanochat_prompt_tokens_cached_total")?, 2.0 * (prompt - 1.0));
    Ok(())
}
