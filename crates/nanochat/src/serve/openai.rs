//! An OpenAI-compatible API, so existing clients (the `openai` SDKs, chat front-ends) can talk to
//! the model: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, and (in
//! [`completions`](super::completions)) `POST /v1/completions`. docs/API.md lists every field as
//! supported, ignored or refused.
//!
//! Accepted: `model` (any name: there is one model), `messages` with `content` a string or a list
//! of `{"type": "text", "text"}` parts, roles `system`/`developer` (first message only), `user`,
//! `assistant` (with `tool_calls` of the `calculator` function, `{"expression": "..."}`) and `tool`
//! (the calculator's result); the sampling fields of [`params`](super::params) (`temperature`,
//! `top_p`, `top_k` as an extension, `seed`, `frequency_penalty`, `presence_penalty`, `stop`,
//! `max_tokens` / `max_completion_tokens`); `n` (choices from one prefill, at most `--batch`);
//! `logprobs` and `top_logprobs`; `stream` and `stream_options.include_usage`. Unknown fields are
//! ignored; `logit_bias`, a `response_format` other than text and non-text content are refused.
//! Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
//!
//! The calculator is the model's own tool, run by the server inside the reply: its exchange shows
//! in `content` as `<<expr=result>>` ([`transcript`](super::transcript)), never as special tokens.
//!
//! Usage counts the rendered prompt (`prompt_tokens`, of which `prompt_tokens_details.cached_tokens`
//! came from the prompt cache) and the generated tokens without the closing `<|assistant_end|>`
//! (`completion_tokens`, over all choices).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{busy_message, rejection_status, reply_room, MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS};
use super::params::{choices, parse, reject, Invalid, SamplingFields, MAX_TOP_LOGPROBS};
use super::reply::Gathered;
use super::transcript::{render_prompt, Segment};
use super::workers::{Event, Finish, TokenInfo};
use super::{json_response, AppState, EventBody};
use crate::engine::GenerateOptions;

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<OpenAiMessage>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    refused: Refused,
}

/// Fields that would change the output in ways the server cannot honour: refused when set.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Refused {
    logit_bias: Option<Value>,
    response_format: Option<Value>,
}

impl Refused {
    pub(super) fn check(&self) -> Result<(), Invalid> {
        if self.logit_bias.as_ref().is_some_and(|b| b.as_object().is_none_or(|b| !b.is_empty())) {
            return Err(reject("logit_bias is not supported: omit it", "logit_bias"));
        }
        if self.response_format.as_ref().is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")) {
            return Err(reject(
                "only response_format {\"type\": \"text\"} is supported: the model cannot be constrained to JSON",
                "response_format",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct OpenAiMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ToolCall {
    function: FunctionCall,
}

#[derive(Debug, Deserialize)]
struct FunctionCall {
    name: String,
    arguments: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamOptions {
    pub(super) include_usage: Option<bool>,
}

/// An error in OpenAI's shape.
pub(super) fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Response {
    let kind = match status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => "server_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "invalid_request_error",
    };
    json_response(status, &json!({"error": {"message": message.into(), "type": kind, "param": param, "code": null}}))
}

pub(super) fn invalid(invalid: Invalid) -> Response {
    let param = (!invalid.param.is_empty()).then_some(invalid.param.as_str());
    error(StatusCode::BAD_REQUEST, invalid.message, param)
}

/// The answer to a body that is not JSON.
pub(super) fn rejected(rejection: &JsonRejection) -> Response {
    let (status, message) = rejection_status(rejection);
    error(status, message, None)
}

fn model_object(state: &AppState) -> Value {
    json!({"id": state.config.model_id, "object": "model", "created": 0, "owned_by": "nanochat"})
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, &json!({"object": "list", "data": [model_object(&state)]}))
}

pub async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id != state.config.model_id {
        let message = format!("the model '{id}' does not exist: this server serves '{}'", state.config.model_id);
        let body = json!({"error": {
            "message": message, "type": "invalid_request_error", "param": "model", "code": "model_not_found",
        }});
        return json_response(StatusCode::NOT_FOUND, &body);
    }
    json_response(StatusCode::OK, &model_object(&state))
}

/// The calculator's expression in a tool call's arguments.
fn calculator_call(call: &ToolCall, i: usize) -> Result<String, Invalid> {
    let param = format!("messages[{i}].tool_calls");
    if call.function.name != "calculator" {
        return Err(reject(
            format!("message {i} calls the tool '{}': the model's only tool is 'calculator'", call.function.name),
            &param,
        ));
    }
    let arguments: Value = serde_json::from_str(&call.function.arguments).unwrap_or(Value::Null);
    match arguments.get("expression").and_then(Value::as_str) {
        Some(expr) => Ok(expr.to_string()),
        None => Err(reject(
            format!("message {i}: the calculator's arguments must be a JSON object {{\"expression\": \"...\"}}"),
            &param,
        )),
    }
}

/// The messages as conversation segments, or why not.
fn read_messages(messages: Vec<OpenAiMessage>) -> Result<Vec<Segment>, Invalid> {
    if messages.is_empty() {
        return Err(reject("messages must hold at least one message", "messages"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(reject(format!("too many messages: at most {MAX_MESSAGES} per request"), "messages"));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut total = 0;
    // whether the message before was an assistant tool call or a tool result
    let mut after_call = false;
    for (i, message) in messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        let text = match message.content {
            Some(Content::Text(text)) => Some(text),
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
                Some(text)
            }
            None => None,
        };
        let calls = message.tool_calls.unwrap_or_default();
        let chars = text.as_deref().map_or(0, |t| t.chars().count());
        if chars > MAX_MESSAGE_CHARS {
            return Err(reject(format!("message {i} is too long: at most {MAX_MESSAGE_CHARS} characters"), &param));
        }
        total += chars;
        let was_after_call = std::mem::replace(&mut after_call, false);
        match (message.role.as_str(), text) {
            ("system" | "developer", Some(text)) if i == 0 => out.push(Segment::System(text)),
            ("system" | "developer", _) if i > 0 => {
                return Err(reject(format!("message {i}: a system message may only come first"), &param))
            }
            ("user", Some(text)) => out.push(Segment::User(text)),
            ("assistant", text) if text.is_some() || !calls.is_empty() => {
                out.push(Segment::Assistant(text.unwrap_or_default()));
                for call in &calls {
                    let expr = calculator_call(call, i)?;
                    total += expr.chars().count();
                    out.push(Segment::Call(expr));
                }
                after_call = !calls.is_empty();
            }
            ("tool", Some(text)) if was_after_call => {
                out.push(Segment::Result(text));
                after_call = true;
            }
            ("tool", Some(_)) => {
                return Err(reject(
                    format!("message {i}: a tool message must follow an assistant message with tool_calls"),
                    &param,
                ))
            }
            ("system" | "developer" | "user" | "assistant" | "tool", None) => {
                return Err(reject(format!("message {i} has no content"), &param))
            }
            (other, _) => {
                return Err(reject(
                    format!("message {i} has role '{other}': use 'system', 'developer', 'user', 'assistant' or 'tool'"),
                    &param,
                ))
            }
        }
    }
    if total > MAX_TOTAL_CHARS {
        return Err(reject(format!("the conversation is too long: at most {MAX_TOTAL_CHARS} characters"), "messages"));
    }
    Ok(out)
}

/// The 503 of a full server.
pub(super) fn busy(state: &AppState) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, busy_message(state), None);
    response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

/// Everything a chat or text completion request asks for, read and checked.
pub(super) struct Asked {
    pub(super) opts: GenerateOptions,
    pub(super) stop: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
}

impl Asked {
    pub(super) fn read(
        value: &Value,
        state: &AppState,
        n: Option<i64>,
        stream: Option<bool>,
        stream_options: Option<&StreamOptions>,
    ) -> Result<Asked, Invalid> {
        let sampling = parse::<SamplingFields>(value)?.resolve(&state.config)?;
        let mut opts = sampling.opts;
        opts.num_samples = choices(n, state.pool.batch())?;
        Ok(Asked {
            opts,
            stop: sampling.stop,
            stream: stream.unwrap_or(false),
            include_usage: stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        })
    }

    /// Fits `max_tokens` into the model's positions after the prompt.
    pub(super) fn fit(&mut self, state: &AppState, prompt_len: usize) -> Result<(), Invalid> {
        let room = reply_room(state, prompt_len).map_err(|message| reject(message, "messages"))?;
        self.opts.max_tokens = self.opts.max_tokens.min(room);
        Ok(())
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let value = match body {
        Ok(Json(value)) => value,
        Err(rejection) => return rejected(&rejection),
    };
    let req = match parse::<ChatRequest>(&value) {
        Ok(req) => req,
        Err(e) => return invalid(e),
    };
    let mut asked = match Asked::read(&value, &state, req.n, req.stream, req.stream_options.as_ref()) {
        Ok(asked) => asked,
        Err(e) => return invalid(e),
    };
    if let Err(e) = req.refused.check() {
        return invalid(e);
    }
    let top = req.top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
        return invalid(reject(format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"), "top_logprobs"));
    }
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return invalid(reject("top_logprobs needs logprobs set to true", "top_logprobs"));
    }
    asked.opts.logprobs = (req.logprobs == Some(true)).then_some(top as usize);
    let segments = match read_messages(req.messages) {
        Ok(segments) => segments,
        Err(e) => return invalid(e),
    };
    let prompt = match render_prompt(&state.tokenizer, &segments) {
        Ok(prompt) => prompt,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None),
    };
    let prompt_tokens = prompt.len();
    if let Err(e) = asked.fit(&state, prompt_tokens) {
        return invalid(e);
    }
    let n = asked.opts.num_samples;
    let with_logprobs = asked.opts.logprobs.is_some();
    let (stream, include_usage) = (asked.stream, asked.include_usage);
    let mut events = match state.pool.submit(prompt, asked.opts, asked.stop) {
        Ok(events) => events,
        Err(_) => return busy(&state),
    };
    let head = Head::new("chatcmpl", &state);
    let tok = state.tokenizer.clone();
    if stream {
        let mut chunks = ChatChunks { head, n, prompt_tokens, include_usage, with_logprobs, tok, started: false };
        return EventBody::response(events, move |event| chunks.format(event));
    }
    let reply = match Gathered::read(&mut events, n).await {
        Ok(reply) => reply,
        Err(message) => return error(StatusCode::INTERNAL_SERVER_ERROR, message, None),
    };
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let content: Vec<Value> = reply.logprobs[i].iter().map(|t| chat_logprob(&tok, t)).collect();
            json!({
                "index": i,
                "message": {"role": "assistant", "content": reply.text[i], "refusal": null},
                "logprobs": with_logprobs.then(|| json!({"content": content, "refusal": null})),
                "finish_reason": finish_reason(reply.finish[i]),
            })
        })
        .collect();
    let body = json!({
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": choices,
        "usage": usage(prompt_tokens, reply.completion_tokens, reply.cached_tokens),
    });
    json_response(StatusCode::OK, &body)
}

/// What every response object of one request repeats.
pub(super) struct Head {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
}

impl Head {
    pub(super) fn new(prefix: &str, state: &AppState) -> Head {
        Head {
            id: format!("{prefix}-{:016x}", rand::random::<u64>()),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            model: state.config.model_id.clone(),
        }
    }
}

pub(super) fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

pub(super) fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// A token as OpenAI's logprobs show it: its text (lossy for a token that is part of a character;
/// a special token by its name) and its bytes.
pub(super) fn token_text(tok: &bpe::Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.decode_bytes(&[id]);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// OpenAI reports impossible tokens as -9999 rather than -infinity (not valid JSON).
pub(super) fn finite(logprob: f32) -> f32 {
    logprob.max(-9999.0)
}

/// One token in the chat API's `logprobs.content` form.
fn chat_logprob(tok: &bpe::Tokenizer, info: &TokenInfo) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (token, bytes) = token_text(tok, id);
        json!({"token": token, "logprob": finite(logprob), "bytes": bytes})
    };
    let mut value = entry(info.logprob.token, info.logprob.logprob);
    value["top_logprobs"] = info.logprob.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
    value
}

/// Formats a streamed reply as `chat.completion.chunk` events: the role of every choice first,
/// then one chunk per text piece, each choice's finish reason, the usage when asked, and
/// `data: [DONE]`.
struct ChatChunks {
    head: Head,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    with_logprobs: bool,
    tok: bpe::Tokenizer,
    started: bool,
}

impl ChatChunks {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.head.id,
            "object": "chat.completion.chunk",
            "created": self.head.created,
            "model": self.head.model,
            "choices": choices,
        });
        // with include_usage every chunk carries the field, null until the last one
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        format!("data: {chunk}\n\n")
    }

    fn delta(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> String {
        self.chunk(json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]), None)
    }

    fn format(&mut self, event: Event) -> (String, bool) {
        let mut out = String::new();
        if !std::mem::replace(&mut self.started, true) {
            for index in 0..self.n {
                out.push_str(&self.delta(index, json!({"role": "assistant", "content": ""}), Value::Null, None));
            }
        }
        let last = match event {
            Event::Text { index, text, logprobs, .. } => {
                let lp = self.with_logprobs.then(
                    || json!({"content": logprobs.iter().map(|t| chat_logprob(&self.tok, t)).collect::<Vec<_>>()}),
                );
                out.push_str(&self.delta(index, json!({"content": text}), lp.unwrap_or(Value::Null), None));
                false
            }
            Event::End { index, finish } => {
                out.push_str(&self.delta(index, json!({}), Value::Null, Some(finish_reason(finish))));
                false
            }
            Event::Done { completion_tokens, cached_tokens } => {
                if self.include_usage {
                    let usage = usage(self.prompt_tokens, completion_tokens, cached_tokens);
                    out.push_str(&self.chunk(json!([]), Some(usage)));
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

/// An error in the middle of a stream, as an SSE event in OpenAI's error shape.
pub(super) fn stream_error(message: &str) -> String {
    let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
    format!("data: {error}\n\n")
}
