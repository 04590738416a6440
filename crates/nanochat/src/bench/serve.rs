//! `nanochat bench serve`: the web server's figures that prompt caching and the new sampling
//! options are about, measured through its HTTP API on 127.0.0.1 (one worker, one slot):
//!
//! - time to first token at turn 1 and at the last turn of a conversation (`--turns` turns of
//!   `--turn-tokens` tokens each, ~2,000 tokens by the last one), with the prompt cache off and
//!   on: each turn re-sends the whole conversation, and with the cache only its new tokens are
//!   prefilled. A turn's time is that of a one-token reply (prefill, one sample, HTTP);
//! - decode tokens/s of one reply with the server's default sampling, with every new option at
//!   once (top-p, frequency and presence penalties, stop strings, a seed), with log-probabilities,
//!   and with top-p over the whole vocabulary (no top-k), from the server's own per-token latency
//!   histogram (`/metrics`), so HTTP and prefill are left out.
//!
//! The model is a random one of the `--n-layer`... flags (the issues' depth-4 shape by default),
//! with a byte-level tokenizer (one token per byte of the conversation), or `--checkpoint`'s with
//! the tokenizer of `$NANOCHAT_BASE_DIR`. A random model's flat next-token distribution is the
//! worst case for top-p without top-k (the nucleus is most of the vocabulary). Every figure is
//! the median of `--runs` runs after one warm-up. Prints a table and one JSON line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use clap::Args;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::engine::Engine;
use crate::model::decode::WeightFormat;
use crate::model::GPT;
use crate::serve::{Server, ServerConfig};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub shape: super::ModelShape,
    /// Benchmark a trained model instead: a checkpoint directory (its latest step), with the
    /// tokenizer of $NANOCHAT_BASE_DIR.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Precision of the worker's weights.
    #[arg(long, value_enum, default_value_t = WeightFormat::F32)]
    pub weights: WeightFormat,
    /// Turns of the benchmarked conversation.
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Tokens each turn adds: a user message and an assistant reply of half as many each.
    #[arg(long, default_value_t = 400)]
    pub turn_tokens: usize,
    /// Tokens of the decode runs.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Runs per measurement (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// A model and its tokenizer, from the flags.
fn load_engine(args: &ServeBenchArgs) -> Result<Engine> {
    let device = Device::Cpu;
    let (gpt, tokenizer) = match &args.checkpoint {
        Some(dir) => {
            let tokenizer = crate::tokenizer::load()?;
            let step = checkpoint::latest_step(dir)?.with_context(|| format!("no checkpoint in {}", dir.display()))?;
            let ckpt = checkpoint::load(dir, step, &device, false, Some(&tokenizer.fingerprint()))?;
            (checkpoint::model_from_checkpoint(&ckpt, &device)?.0, tokenizer)
        }
        None => {
            let bytes = (0..=255u8).map(|b| vec![b]).collect();
            let tokenizer = bpe::Tokenizer::from_tokens(bytes, bpe::DEFAULT_PATTERN)?;
            (GPT::init(&args.shape.config(), 0, &device)?.0, tokenizer)
        }
    };
    Engine::with_weights(gpt, tokenizer, args.weights)
}

/// A server of `engine` with one slot and a prompt cache of `cache_mb`.
fn start(engine: Engine, cache_mb: usize) -> Result<Server> {
    let config = ServerConfig {
        model_id: "bench".into(),
        batch: 1,
        queue: 4,
        time_limit: Duration::from_secs(3600),
        temperature: 0.6,
        top_k: 50,
        max_tokens: 16,
        prompt_cache_bytes: cache_mb << 20,
        cors_origins: Vec::new(),
        api_key: None,
    };
    Server::start("127.0.0.1", 0, vec![engine], config)
}

fn post(agent: &ureq::Agent, server: &Server, path: &str, body: &Value) -> Result<Value> {
    let url = format!("http://{}{path}", server.addr());
    let mut response = agent.post(&url).header("Content-Type", "application/json").send(body.to_string())?;
    let text = response.body_mut().read_to_string()?;
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

/// Text of about `tokens` tokens, different for every `(run, turn, who)`.
fn filler(tok: &bpe::Tokenizer, tokens: usize, seed: &str) -> String {
    const WORDS: [&str; 12] =
        ["cache", "model", "turn", "prompt", "token", "reply", "the", "a", "fast", "server", "again", "more"];
    let mut text = seed.to_string();
    let mut i = seed.len();
    while tok.encode(&text).len() < tokens {
        text.push(' ');
        text.push_str(WORDS[i % WORDS.len()]);
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    text
}

/// Seconds of a one-token reply at each turn of a fresh conversation (`run` makes it differ from
/// the other runs', so no run finds another's in the cache), and the tokens cached at the last.
fn conversation(
    agent: &ureq::Agent,
    server: &Server,
    tok: &bpe::Tokenizer,
    args: &ServeBenchArgs,
    run: usize,
) -> Result<(Vec<f64>, u64)> {
    let half = args.turn_tokens / 2;
    let mut messages = Vec::new();
    let (mut times, mut cached) = (Vec::new(), 0);
    for turn in 0..args.turns {
        messages.push(json!({"role": "user", "content": filler(tok, half, &format!("run {run} turn {turn} user"))}));
        let body = json!({"messages": messages, "max_tokens": 1, "temperature": 0});
        let started = Instant::now();
        let reply = post(agent, server, "/v1/chat/completions", &body)?;
        times.push(started.elapsed().as_secs_f64());
        ensure!(reply.get("error").is_none(), "the server refused the conversation: {reply}");
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
        messages
            .push(json!({"role": "assistant", "content": filler(tok, half, &format!("run {run} turn {turn} reply"))}));
    }
    Ok((times, cached))
}

/// The server's mean time per output token so far: (sum, count) of its histogram.
fn token_latency(agent: &ureq::Agent, server: &Server) -> Result<(f64, f64)> {
    let url = format!("http://{}/metrics", server.addr());
    let text = agent.get(&url).call()?.body_mut().read_to_string()?;
    let value = |name: &str| -> Result<f64> {
        let line = text.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in /metrics"))?;
        Ok(line[name.len()..].trim().parse()?)
    };
    Ok((value("nanochat_time_per_output_token_seconds_sum ")?, value("nanochat_time_per_output_token_seconds_count ")?))
}

pub fn run(args: &ServeBenchArgs) -> Result<()> {
    ensure!(args.runs > 0 && args.turns > 0, "--runs and --turns must be at least 1");
    // statuses are the caller's to read; nothing here waits for the outside longer than a run
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into();
    let mut ttft = Vec::new();
    let mut cached_last = 0;
    for cache_mb in [0, 512] {
        let engine = load_engine(args)?;
        let tok = engine.tokenizer().clone();
        let server = start(engine, cache_mb)?;
        let mut first = Vec::new();
        let mut last = Vec::new();
        // run 0 warms up
        for run in 0..=args.runs {
            let (times, cached) = conversation(&agent, &server, &tok, args, run)?;
            if run > 0 {
                first.push(times[0]);
                last.push(*times.last().unwrap_or(&0.0));
                cached_last = cached_last.max(cached);
            }
        }
        server.shutdown()?;
        ttft.push((cache_mb > 0, super::median(&mut first) * 1e3, super::median(&mut last) * 1e3));
    }

    let settings = [
        ("defaults (temperature 0.6, top-k 50)", json!({})),
        (
            "top-p 0.9, penalties 0.5, 2 stop strings, seed",
            json!({"top_p": 0.9, "frequency_penalty": 0.5, "presence_penalty": 0.5, "stop": ["\n\nUser:", "###"], "seed": 1}),
        ),
        ("defaults + logprobs (top 5)", json!({"logprobs": true, "top_logprobs": 5})),
        ("top-p 0.9 without top-k", json!({"top_p": 0.9, "top_k": 0})),
    ];
    let server = start(load_engine(args)?, 0)?;
    let mut decode = Vec::new();
    for (name, extra) in &settings {
        let mut body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": args.decode_tokens});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let mut rates = Vec::new();
        for run in 0..=args.runs {
            let before = token_latency(&agent, &server)?;
            let reply = post(&agent, &server, "/v1/chat/completions", &body)?;
            ensure!(reply.get("error").is_none(), "{name}: {reply}");
            let after = token_latency(&agent, &server)?;
            let (secs, tokens) = (after.0 - before.0, after.1 - before.1);
            if run > 0 && tokens > 0.0 {
                rates.push(tokens / secs);
            }
        }
        decode.push((*name, super::median(&mut rates)));
    }
    server.shutdown()?;

    let last = args.turns;
    println!("time to first token, {last} turns of ~{} tokens (ms, median of {}):", args.turn_tokens, args.runs);
    println!("{:<18} {:>10} {:>10}", "prompt cache", "turn 1", format!("turn {last}"));
    for (on, first, last) in &ttft {
        println!("{:<18} {:>10.1} {:>10.1}", if *on { "on" } else { "off" }, first, last);
    }
    println!("(cached tokens at turn {last}: {cached_last})");
    println!("decode tokens/s at batch 1:");
    for (name, rate) in &decode {
        println!("  {name:<48} {rate:>8.1}");
    }
    let result = json!({
        "bench": "serve",
        "model": args.checkpoint.as_ref().map_or_else(|| format!("random {:?}", args.shape.config()), |p| p.display().to_string()),
        "weights": args.weights.name(),
        "turns": args.turns,
        "turn_tokens": args.turn_tokens,
        "ttft_ms": ttft.iter().map(|(on, first, last)| json!({"prompt_cache": on, "turn_1": first, "turn_last": last})).collect::<Vec<_>>(),
        "cached_tokens_last_turn": cached_last,
        "decode_tok_s": decode.iter().map(|(name, rate)| json!({"settings": name, "tok_s": rate})).collect::<Vec<_>>(),
    });
    println!("{result}");
    Ok(())
}
