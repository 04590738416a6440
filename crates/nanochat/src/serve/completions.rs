//! `POST /v1/completions`: OpenAI's text completion, the API for base models. The prompt is plain
//! text, `<|bos|>` first as every pretraining document starts, and the model continues it (or a
//! list of token ids, taken as they are). The sampling fields, `n`, streaming and the usage are the
//! chat API's ([`openai`](super::openai)); `logprobs` is the number of alternatives per token (0 to
//! 20) and comes back in this API's own form (`tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`); `echo` puts the prompt before the completion. One prompt per request; `suffix`
//! (insertion), `best_of` above `n`, `echo` with `logprobs`, `logit_bias` are refused.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::api::MAX_TOTAL_CHARS;
use super::openai::{busy, error, finish_reason, finite, invalid, rejected, stream_error, token_text, usage};
use super::openai::{Asked, Head, Refused, StreamOptions};
use super::params::{parse, reject, Invalid, MAX_TOP_LOGPROBS};
use super::reply::Gathered;
use super::workers::{Event, TokenInfo};
use super::{json_response, AppState, EventBody};

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
    #[serde(flatten)]
    refused: Refused,
}

/// OpenAI's four prompt forms; only one prompt per request is served.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// The prompt's ids and its text (what `echo` repeats).
fn read_prompt(prompt: Prompt, tok: &bpe::Tokenizer) -> Result<(Vec<u32>, String), Invalid> {
    let one = || reject("send one prompt per request (a string or a list of token ids)", "prompt");
    let text = |text: String| {
        if text.chars().count() > MAX_TOTAL_CHARS {
            return Err(reject(format!("the prompt is too long: at most {MAX_TOTAL_CHARS} characters"), "prompt"));
        }
        Ok(([vec![tok.bos_id()], tok.encode(&text)].concat(), text))
    };
    let ids = |ids: Vec<u32>| {
        if ids.is_empty() {
            return Err(reject("the prompt has no tokens", "prompt"));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
            return Err(reject(format!("token {bad} is outside the vocabulary of {}", tok.vocab_size()), "prompt"));
        }
        let text = tok.decode(&ids);
        Ok((ids, text))
    };
    match prompt {
        Prompt::Text(s) => text(s),
        Prompt::Texts(mut list) if list.len() == 1 => text(list.remove(0)),
        Prompt::IdLists(mut list) if list.len() == 1 => ids(list.remove(0)),
        Prompt::Ids(list) => ids(list),
        Prompt::Texts(_) | Prompt::IdLists(_) => Err(one()),
    }
}

pub async fn completions(State(state): State<Arc<AppState>>, body: Result<Json<Value>, JsonRejection>) -> Response {
    let value = match body {
        Ok(Json(value)) => value,
        Err(rejection) => return rejected(&rejection),
    };
    let req = match parse::<CompletionRequest>(&value) {
        Ok(req) => req,
        Err(e) => return invalid(e),
    };
    let mut asked = match Asked::read(&value, &state, req.n, req.stream, req.stream_options.as_ref()) {
        Ok(asked) => asked,
        Err(e) => return invalid(e),
    };
    if let Err(e) = check(&req, asked.opts.num_samples) {
        return invalid(e);
    }
    let echo = req.echo.unwrap_or(false);
    asked.opts.logprobs = req.logprobs.map(|top| top as usize);
    let (prompt, prompt_text) = match read_prompt(req.prompt, &state.tokenizer) {
        Ok(prompt) => prompt,
        Err(e) => return invalid(e),
    };
    let prompt_tokens = prompt.len();
    if let Err(mut e) = asked.fit(&state, prompt_tokens) {
        e.param = "prompt".into();
        return invalid(e);
    }
    let n = asked.opts.num_samples;
    let with_logprobs = asked.opts.logprobs.is_some();
    let (stream, include_usage) = (asked.stream, asked.include_usage);
    let mut events = match state.pool.submit(prompt, asked.opts, asked.stop) {
        Ok(events) => events,
        Err(_) => return busy(&state),
    };
    let echoed = if echo { prompt_text } else { String::new() };
    let chunks = Chunks {
        head: Head::new("cmpl", &state),
        tok: state.tokenizer.clone(),
        n,
        prompt_tokens,
        include_usage,
        with_logprobs,
        echo_chars: echoed.chars().count(),
        echoed,
        started: false,
    };
    if stream {
        let mut chunks = chunks;
        return EventBody::response(events, move |event| chunks.format(event));
    }
    let reply = match Gathered::read(&mut events, n).await {
        Ok(reply) => reply,
        Err(message) => return error(StatusCode::INTERNAL_SERVER_ERROR, message, None),
    };
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let mut logprobs = Logprobs::default();
            logprobs.extend(&chunks.tok, &reply.logprobs[i], chunks.echo_chars);
            json!({
                "index": i,
                "text": format!("{}{}", chunks.echoed, reply.text[i]),
                "logprobs": with_logprobs.then(|| logprobs.to_json()),
                "finish_reason": finish_reason(reply.finish[i]),
            })
        })
        .collect();
    let usage = usage(prompt_tokens, reply.completion_tokens, reply.cached_tokens);
    json_response(StatusCode::OK, &chunks.object(json!(choices), Some(usage)))
}

/// The fields this API refuses or bounds.
fn check(req: &CompletionRequest, n: usize) -> Result<(), Invalid> {
    req.refused.check()?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(reject("suffix (text insertion) is not supported: the model only continues text", "suffix"));
    }
    if req.best_of.is_some_and(|b| b != n as i64) {
        return Err(reject("best_of is not supported beyond n: ask for n choices and pick one", "best_of"));
    }
    if req.logprobs.is_some_and(|l| !(0..=MAX_TOP_LOGPROBS).contains(&l)) {
        return Err(reject(format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}"), "logprobs"));
    }
    if req.echo == Some(true) && req.logprobs.is_some() {
        return Err(reject("echo with logprobs is not supported (no log-probabilities for the prompt)", "echo"));
    }
    Ok(())
}

/// Log-probabilities in the completions API's form, column by column.
#[derive(Debug, Clone, Default)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Map<String, Value>>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    fn extend(&mut self, tok: &bpe::Tokenizer, infos: &[TokenInfo], offset: usize) {
        for info in infos {
            self.tokens.push(token_text(tok, info.logprob.token).0);
            self.token_logprobs.push(finite(info.logprob.logprob));
            let top = info.logprob.top.iter().map(|&(id, lp)| (token_text(tok, id).0, json!(finite(lp))));
            self.top_logprobs.push(top.collect());
            self.text_offset.push(offset + info.offset);
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// Formats the response objects of one request, whole or streamed: `text_completion` objects
/// (streamed: one per text piece, then each choice's finish reason, the usage when asked, and
/// `data: [DONE]`).
struct Chunks {
    head: Head,
    tok: bpe::Tokenizer,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    with_logprobs: bool,
    /// The prompt, when `echo` asks for it before each choice's text.
    echoed: String,
    echo_chars: usize,
    started: bool,
}

impl Chunks {
    fn object(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut object = json!({
            "id": self.head.id,
            "object": "text_completion",
            "created": self.head.created,
            "model": self.head.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            object["usage"] = usage;
        }
        object
    }

    fn chunk(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> String {
        let choice = json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]);
        format!("data: {}\n\n", self.object(choice, None))
    }

    fn format(&mut self, event: Event) -> (String, bool) {
        let mut out = String::new();
        if !std::mem::replace(&mut self.started, true) && !self.echoed.is_empty() {
            for index in 0..self.n {
                out.push_str(&self.chunk(index, &self.echoed, Value::Null, None));
            }
        }
        let last = match event {
            Event::Text { index, text, logprobs, .. } => {
                let lp = self.with_logprobs.then(|| {
                    let mut lp = Logprobs::default();
                    lp.extend(&self.tok, &logprobs, self.echo_chars);
                    lp.to_json()
                });
                out.push_str(&self.chunk(index, &text, lp.unwrap_or(Value::Null), None));
                false
            }
            Event::End { index, finish } => {
                out.push_str(&self.chunk(index, "", Value::Null, Some(finish_reason(finish))));
                false
            }
            Event::Done { completion_tokens, cached_tokens } => {
                if self.include_usage {
                    let usage = usage(self.prompt_tokens, completion_tokens, cached_tokens);
                    out.push_str(&format!("data: {}\n\n", self.object(json!([]), Some(usage))));
                }
                true
            }
            Event::Error(message) => {
                out.push_str(&stream_error(&message));
                true
            }
        };
        if last {
            out.push_str("data: [DONE]\n\n");
        }
        (out, last)
    }
}
