//! An OpenAI-compatible API, so existing clients (the `openai` SDKs, chat front-ends) can talk to
//! the model: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! Accepted: `model` (any name: there is one model), `messages` with `content` a string or a list
//! of `{"type": "text", "text"}` parts, roles `system`/`developer` (first message only), `user`,
//! `assistant`; `temperature` (0–2), `top_p` only as 1 (nanochat samples with top-k, which may be
//! given as the extension field `top_k`), `n` only as 1, `max_tokens` / `max_completion_tokens`,
//! `stream`, `stream_options.include_usage`, `seed`. Unknown fields are ignored. The limits are the
//! native API's; every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
//!
//! Usage counts the rendered prompt (`prompt_tokens`) and the generated tokens without the closing
//! `<|assistant_end|>` (`completion_tokens`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{busy_message, rejection_status, reply_room, MAX_MAX_TOKENS, MAX_MESSAGES, MAX_MESSAGE_CHARS};
use super::api::{MAX_TEMPERATURE, MAX_TOP_K, MAX_TOTAL_CHARS};
use super::workers::{Event, Finish};
use super::{json_response, render_prompt, AppState, EventBody, Speaker};
use crate::engine::GenerateOptions;

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    messages: Vec<OpenAiMessage>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    n: Option<i64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    seed: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct OpenAiMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    include_usage: Option<bool>,
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Response {
    let kind = match status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => "server_error",
        _ => "invalid_request_error",
    };
    json_response(status, &json!({"error": {"message": message.into(), "type": kind, "param": param, "code": null}}))
}

fn invalid(message: impl Into<String>, param: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message, Some(param))
}

/// A 400 to answer: its message and the request field at fault.
struct Invalid {
    message: String,
    param: String,
}

fn reject(message: impl Into<String>, param: &str) -> Invalid {
    Invalid { message: message.into(), param: param.to_string() }
}

impl Invalid {
    fn response(self) -> Response {
        invalid(self.message, &self.param)
    }
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let model = json!({"id": state.config.model_id, "object": "model", "created": 0, "owned_by": "nanochat"});
    json_response(StatusCode::OK, &json!({"object": "list", "data": [model]}))
}

/// The messages as (speaker, text), or why not.
fn read_messages(messages: Vec<OpenAiMessage>) -> Result<Vec<(Speaker, String)>, Invalid> {
    if messages.is_empty() {
        return Err(reject("messages must hold at least one message", "messages"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(reject(format!("too many messages: at most {MAX_MESSAGES} per request"), "messages"));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut total = 0;
    for (i, message) in messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        let speaker = match message.role.as_str() {
            "system" | "developer" if i == 0 => Speaker::System,
            "user" => Speaker::User,
            "assistant" => Speaker::Assistant,
            "system" | "developer" => {
                return Err(reject(format!("message {i}: a system message may only come first"), &param))
            }
            other => {
                return Err(reject(
                    format!(
                        "message {i} has role '{other}': use 'system', 'developer', 'user' or 'assistant' (no tools)"
                    ),
                    &param,
                ))
            }
        };
        let text = match message.content {
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        _ => {
                            return Err(reject(
                                format!("message {i}: only content parts of type 'text' with a 'text' are supported"),
                                &param,
                            ))
                        }
                    }
                }
                text
            }
            None => return Err(reject(format!("message {i} has no content"), &param)),
        };
        let chars = text.chars().count();
        if chars > MAX_MESSAGE_CHARS {
            return Err(reject(format!("message {i} is too long: at most {MAX_MESSAGE_CHARS} characters"), &param));
        }
        total += chars;
        out.push((speaker, text));
    }
    if total > MAX_TOTAL_CHARS {
        return Err(reject(format!("the conversation is too long: at most {MAX_TOTAL_CHARS} characters"), "messages"));
    }
    Ok(out)
}

/// The sampling settings, or why not.
fn read_options(req: &CompletionRequest, state: &AppState) -> Result<GenerateOptions, Invalid> {
    let temperature = req.temperature.unwrap_or(state.config.temperature);
    if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
        return Err(reject(format!("temperature must be between 0 and {MAX_TEMPERATURE}"), "temperature"));
    }
    if req.top_p.is_some_and(|p| p != 1.0) {
        return Err(reject("top_p is not supported: omit it or set it to 1 (use top_k to narrow sampling)", "top_p"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(reject("only n = 1 is supported: send one request per completion", "n"));
    }
    let top_k = req.top_k.unwrap_or(state.config.top_k as i64);
    if !(0..=MAX_TOP_K).contains(&top_k) {
        return Err(reject(format!("top_k must be between 0 and {MAX_TOP_K} (0 = no limit)"), "top_k"));
    }
    let (max_tokens, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (m, "max_completion_tokens"),
        (None, Some(m)) => (m, "max_tokens"),
        (None, None) => (state.config.max_tokens as i64, "max_tokens"),
    };
    if !(1..=MAX_MAX_TOKENS).contains(&max_tokens) {
        return Err(reject(format!("{param} must be between 1 and {MAX_MAX_TOKENS}"), param));
    }
    Ok(GenerateOptions {
        num_samples: 1,
        max_tokens: max_tokens as usize,
        temperature,
        top_k: Some(top_k as usize),
        // the same seed gives the same reply; without one every request draws its own
        seed: req.seed.map_or_else(rand::random, |s| s as u64),
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(rejection) => {
            let (status, message) = rejection_status(&rejection);
            return error(status, message, None);
        }
    };
    let mut opts = match read_options(&req, &state) {
        Ok(opts) => opts,
        Err(invalid) => return invalid.response(),
    };
    let stream = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let messages = match read_messages(req.messages) {
        Ok(messages) => messages,
        Err(invalid) => return invalid.response(),
    };
    let prompt = match render_prompt(&state.tokenizer, &messages) {
        Ok(prompt) => prompt,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    };
    let prompt_tokens = prompt.len();
    match reply_room(&state, prompt_tokens) {
        Ok(room) => opts.max_tokens = opts.max_tokens.min(room),
        Err(message) => return invalid(message, "messages"),
    }
    let mut events = match state.pool.submit(prompt, opts) {
        Ok(events) => events,
        Err(_) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, busy_message(&state), None);
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
    };
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = state.config.model_id.clone();
    if stream {
        let mut chunks = Chunks { id, created, model, prompt_tokens, include_usage, started: false };
        return EventBody::response(events, move |event| chunks.format(event));
    }
    let mut content = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text { text, .. } => content.push_str(&text),
            Event::Error(message) => return error(StatusCode::INTERNAL_SERVER_ERROR, message, None),
            Event::Done { completion_tokens, finish } => {
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": null,
                        "finish_reason": finish_reason(finish),
                    }],
                    "usage": usage(prompt_tokens, completion_tokens),
                });
                return json_response(StatusCode::OK, &body);
            }
        }
    }
    error(StatusCode::INTERNAL_SERVER_ERROR, "the model worker stopped without finishing the reply", None)
}

fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Formats a streamed reply as `chat.completion.chunk` events: the role first, then one chunk per
/// text piece, the finish reason, the usage when asked, and `data: [DONE]`.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
    started: bool,
}

impl Chunks {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        // with include_usage every chunk carries the field, null until the last one
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        format!("data: {chunk}\n\n")
    }

    fn delta(&self, delta: Value, finish: Option<&str>) -> String {
        self.chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]), None)
    }

    fn format(&mut self, event: Event) -> (String, bool) {
        let mut out = String::new();
        if !self.started {
            self.started = true;
            out.push_str(&self.delta(json!({"role": "assistant", "content": ""}), None));
        }
        let last = match event {
            Event::Text { text, .. } => {
                out.push_str(&self.delta(json!({"content": text}), None));
                false
            }
            Event::Done { completion_tokens, finish } => {
                out.push_str(&self.delta(json!({}), Some(finish_reason(finish))));
                if self.include_usage {
                    out.push_str(&self.chunk(json!([]), Some(usage(self.prompt_tokens, completion_tokens))));
                }
                true
            }
            Event::Error(message) => {
                let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                out.push_str(&format!("data: {error}\n\n"));
                true
            }
        };
        if last {
            out.push_str("data: [DONE]\n\n");
        }
        (out, last)
    }
}
