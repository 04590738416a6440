//! What the API should answer, computed without the server: the engine's own generation, the
//! reply text as the server renders it, and stop strings applied the plain way (cut the whole
//! text at the first occurrence); plus servers of the fixture models and the runner of the
//! official `openai` client.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nanochat::engine::{Engine, GenerateOptions, TokenLogprob};
use nanochat::serve::transcript::ReplyText;
use nanochat::serve::{Server, ServerConfig};
use serde_json::Value;

/// The server's settings in these tests: greedy, 16 tokens, 4 slots, a 64 MB prompt cache.
pub fn config() -> ServerConfig {
    ServerConfig {
        model_id: "nanochat-test".into(),
        batch: 4,
        queue: 8,
        time_limit: Duration::from_secs(60),
        temperature: 0.0,
        top_k: 50,
        max_tokens: 16,
        prompt_cache_bytes: 64 << 20,
        cors_origins: Vec::new(),
        api_key: None,
    }
}

pub fn serve(engine: Engine, config: ServerConfig) -> Result<Server> {
    Server::start("127.0.0.1", 0, vec![engine], config)
}

/// The prompt the server renders for one user message.
pub fn chat_prompt(engine: &Engine, question: &str) -> Vec<u32> {
    let tok = engine.tokenizer();
    let special = |name: &str| tok.special_id(name).unwrap_or_default();
    [
        vec![tok.bos_id(), special("<|user_start|>")],
        tok.encode(question),
        vec![special("<|user_end|>"), special("<|assistant_start|>")],
    ]
    .concat()
}

/// One choice as the API should return it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub content: String,
    pub finish: &'static str,
    /// Tokens generated, without the closing stop token.
    pub tokens: usize,
    /// Every generated token (the closing one included): what the model read afterwards.
    pub ids: Vec<u32>,
    /// Log-probabilities of the tokens whose text is returned.
    pub logprobs: Vec<TokenLogprob>,
    /// Where each of those tokens' text starts, in characters: the text before the first text
    /// that appeared when the token came (a token that only starts a character adds none).
    pub offsets: Vec<usize>,
}

/// The engine's choices for `prompt`, rendered and cut at the first stop string.
pub fn expect(engine: &Engine, prompt: &[u32], opts: &GenerateOptions, stops: &[&str]) -> Result<Vec<Choice>> {
    let n = opts.num_samples;
    let mut texts: Vec<ReplyText> = (0..n).map(|_| ReplyText::new(engine)).collect();
    let mut pieces = vec![Vec::<String>::new(); n];
    let mut ids = vec![Vec::new(); n];
    let mut logprobs = vec![Vec::new(); n];
    let mut ended = vec![false; n];
    let mut generation = engine.generate(prompt, opts)?;
    while let Some(step) = generation.next() {
        let (column, _) = step?;
        for (i, &token) in column.iter().enumerate() {
            if ended[i] {
                continue;
            }
            ids[i].push(token);
            if engine.specials().is_stop(token) {
                ended[i] = true;
                continue;
            }
            pieces[i].push(texts[i].push(token));
            logprobs[i].extend(generation.logprobs().get(i).cloned());
        }
    }
    let mut choices = Vec::new();
    for i in 0..n {
        let model_stopped = ended[i];
        if let Some(last) = pieces[i].last_mut() {
            last.push_str(&texts[i].finish());
        }
        // the first token after which the text holds a stop string
        let mut text = String::new();
        let mut cut = None;
        for (j, piece) in pieces[i].iter().enumerate() {
            text.push_str(piece);
            if let Some(at) = stops.iter().filter_map(|s| text.find(s)).min() {
                cut = Some((j, at));
                break;
            }
        }
        let offsets: Vec<usize> =
            pieces[i].iter().scan(0, |chars, p| Some(std::mem::replace(chars, *chars + p.chars().count()))).collect();
        let choice = match cut {
            Some((j, at)) => {
                // tokens whose text starts before the cut keep their log-probabilities
                let starts: Vec<usize> =
                    pieces[i].iter().scan(0, |len, p| Some(std::mem::replace(len, *len + p.len()))).collect();
                let kept = starts.iter().take(j + 1).filter(|&&s| s < at).count();
                Choice {
                    content: text[..at].to_string(),
                    finish: "stop",
                    tokens: j + 1,
                    ids: ids[i][..=j].to_vec(),
                    logprobs: logprobs[i][..kept.min(logprobs[i].len())].to_vec(),
                    offsets: offsets[..kept].to_vec(),
                }
            }
            None => Choice {
                content: pieces[i].concat(),
                finish: if model_stopped { "stop" } else { "length" },
                tokens: pieces[i].len(),
                ids: ids[i].clone(),
                logprobs: logprobs[i].clone(),
                offsets,
            },
        };
        choices.push(choice);
    }
    Ok(choices)
}

/// Whether the official client can run here; without it the SDK tests skip, unless CI requires
/// them (NANOCHAT_REQUIRE_OPENAI).
pub fn has_openai_client() -> bool {
    let found = Command::new("python3").args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("NANOCHAT_REQUIRE_OPENAI").is_none(), "the openai Python package is not installed");
        eprintln!("skipped: `pip install openai` to run the official client against the server");
    }
    found
}

/// Runs `plan` (see tests/serve/openai_features.py) with the official client against `server`.
pub fn run_plan(server: &Server, plan: &Value) -> Result<Vec<Value>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve/openai_features.py");
    let base = format!("http://{}/v1", server.addr());
    let out = Command::new("python3").arg(script).arg(base).arg(plan.to_string()).output()?;
    anyhow::ensure!(out.status.success(), "the client failed: {}", String::from_utf8_lossy(&out.stderr));
    let seen: Vec<Value> = serde_json::from_slice(&out.stdout).context("the client's output")?;
    anyhow::ensure!(seen.len() == plan.as_array().map_or(0, Vec::len), "one result per call");
    Ok(seen)
}
