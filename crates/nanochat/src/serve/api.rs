//! The original's web API, byte for byte where a client can see it:
//!
//! - `POST /chat/completions` with `{"messages": [{"role", "content"}], "temperature"?, "top_k"?,
//!   "max_tokens"?}` streams `text/event-stream` lines `data: {"token": "...", "gpu": N}` (Python's
//!   `json.dumps` spacing, UTF-8 unescaped) and ends with `data: {"done": true}`;
//! - the original's limits, each violation a 400 `{"detail": "..."}` as FastAPI words it;
//! - `GET /health`, `GET /stats`, and `GET /` (the UI).
//!
//! Beyond the original: a failure after the stream started (time limit, engine error) is sent as
//! `data: {"error": "..."}` before the closing `done`, a full queue is a 503, and a conversation
//! too long for the model is a 400 instead of a crash. The request also takes the OpenAI API's
//! sampling fields ([`params`](super::params): `top_p`, `seed`, `frequency_penalty`,
//! `presence_penalty`, `stop`, `max_completion_tokens`). And the calculator's exchange streams as
//! `<<expr=result>>` text ([`transcript`](super::transcript)) instead of the original's raw
//! `<|python_start|>`… token names, so the UI sends a conversation back the way the model wrote
//! it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::params::{parse, SamplingFields, MAX_MAX_TOKENS, MAX_TEMPERATURE, MAX_TOP_K};
use super::transcript::{render_prompt, Segment};
use super::workers::Event;
use super::{json_response, AppState, EventBody};

pub const MAX_MESSAGES: usize = 500;
pub const MAX_MESSAGE_CHARS: usize = 8_000;
pub const MAX_TOTAL_CHARS: usize = 32_000;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessage>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    role: String,
    content: String,
}

pub async fn ui() -> Html<&'static str> {
    Html(include_str!("ui.html"))
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let workers = state.pool.workers();
    let full = state.pool.stats().full_workers.load(Ordering::SeqCst);
    Json(json!({"status": "ok", "ready": true, "workers": workers, "available_workers": workers.saturating_sub(full)}))
        .into_response()
}

pub async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let s = state.pool.stats();
    Json(json!({
        "workers": state.pool.workers(),
        "batch": state.pool.batch(),
        "busy": s.busy.load(Ordering::SeqCst),
        "peak_batch": s.peak_batch.load(Ordering::SeqCst),
        "queued": s.queued.load(Ordering::SeqCst),
        "queue_capacity": state.pool.queue_capacity(),
        "requests_served": s.requests_served.load(Ordering::SeqCst),
        "tokens_generated": s.tokens_generated.load(Ordering::SeqCst),
        "rejected_busy": s.rejected_busy.load(Ordering::SeqCst),
        "time_limit_s": state.pool.time_limit().as_secs_f64(),
    }))
    .into_response()
}

/// An error as FastAPI's `HTTPException` renders it.
fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    json_response(status, &json!({"detail": message.into()}))
}

/// The status and message for a body axum could not read as JSON. Type and syntax errors are
/// both the client's malformed request: 400, like the limits.
pub(crate) fn rejection_status(rejection: &JsonRejection) -> (StatusCode, String) {
    let status = match rejection.status() {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        other => other,
    };
    let message = match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "send the request body as JSON with the header `Content-Type: application/json`".to_string()
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
            format!("the request body is larger than the server's limit of {} bytes", super::MAX_BODY_BYTES)
        }
        other => other.body_text(),
    };
    (status, message)
}

/// The 503 of a full server.
pub(crate) fn busy_message(state: &AppState) -> String {
    format!(
        "the server is busy: all {} workers are generating {} replies each and {} requests are already waiting; \
         retry in a moment",
        state.pool.workers(),
        state.pool.batch(),
        state.pool.queue_capacity()
    )
}

/// The original's checks, in its order and words (except `top_k`, where 0 means no limit).
fn validate(req: &ChatRequest, fields: &SamplingFields) -> Result<(), String> {
    if req.messages.is_empty() {
        return Err("At least one message is required".into());
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(format!("Too many messages. Maximum {MAX_MESSAGES} messages allowed per request"));
    }
    let mut total = 0;
    for (i, message) in req.messages.iter().enumerate() {
        if message.content.is_empty() {
            return Err(format!("Message {i} has empty content"));
        }
        let chars = message.content.chars().count();
        if chars > MAX_MESSAGE_CHARS {
            return Err(format!("Message {i} is too long. Maximum {MAX_MESSAGE_CHARS} characters allowed per message"));
        }
        total += chars;
    }
    if total > MAX_TOTAL_CHARS {
        return Err(format!("Total conversation is too long. Maximum {MAX_TOTAL_CHARS} characters allowed"));
    }
    for (i, message) in req.messages.iter().enumerate() {
        let system_first = i == 0 && message.role == "system";
        if !(system_first || message.role == "user" || message.role == "assistant") {
            return Err(format!(
                "Message {i} has invalid role. Must be 'user' or 'assistant' ('system' only as the first message)"
            ));
        }
    }
    if let Some(t) = fields.temperature {
        if !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(format!("Temperature must be between 0.0 and {MAX_TEMPERATURE:.1}"));
        }
    }
    if let Some(k) = fields.top_k {
        if !(0..=MAX_TOP_K).contains(&k) {
            return Err(format!("top_k must be between 0 and {MAX_TOP_K} (0 = no limit)"));
        }
    }
    if let Some(m) = fields.max_tokens {
        if !(1..=MAX_MAX_TOKENS).contains(&m) {
            return Err(format!("max_tokens must be between 1 and {MAX_MAX_TOKENS}"));
        }
    }
    Ok(())
}

/// Room left for the reply after a prompt of `prompt_len` tokens, or the 400 message when none.
pub(crate) fn reply_room(state: &AppState, prompt_len: usize) -> Result<usize, String> {
    match state.max_positions.checked_sub(prompt_len) {
        Some(room) if room > 0 => Ok(room),
        _ => Err(format!(
            "the conversation is {prompt_len} tokens but the model reads at most {} in all: \
             start a new conversation or drop earlier messages",
            state.max_positions
        )),
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let value = match body {
        Ok(Json(value)) => value,
        Err(rejection) => {
            let (status, message) = rejection_status(&rejection);
            return detail(status, message);
        }
    };
    let read = parse::<ChatRequest>(&value).and_then(|req| Ok((req, parse::<SamplingFields>(&value)?)));
    let (req, fields) = match read {
        Ok(read) => read,
        Err(invalid) => return detail(StatusCode::BAD_REQUEST, invalid.message),
    };
    if let Err(message) = validate(&req, &fields) {
        return detail(StatusCode::BAD_REQUEST, message);
    }
    let segments: Vec<Segment> = req
        .messages
        .into_iter()
        .map(|m| match m.role.as_str() {
            "system" => Segment::System(m.content),
            "user" => Segment::User(m.content),
            _ => Segment::Assistant(m.content),
        })
        .collect();
    let prompt = match render_prompt(&state.tokenizer, &segments) {
        Ok(prompt) => prompt,
        Err(e) => return detail(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let room = match reply_room(&state, prompt.len()) {
        Ok(room) => room,
        Err(message) => return detail(StatusCode::BAD_REQUEST, message),
    };
    // as the original: a fresh seed per request, unless the request names one
    let mut sampling = match fields.resolve(&state.config) {
        Ok(sampling) => sampling,
        Err(invalid) => return detail(StatusCode::BAD_REQUEST, invalid.message),
    };
    sampling.opts.max_tokens = sampling.opts.max_tokens.min(room);
    let events = match state.pool.submit(prompt, sampling.opts, sampling.stop) {
        Ok(events) => events,
        Err(_) => {
            let mut response = detail(StatusCode::SERVICE_UNAVAILABLE, busy_message(&state));
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
    };
    EventBody::response(events, native_event)
}

/// One event as the original's SSE lines; JSON strings as serde writes them, which matches
/// Python's `json.dumps(..., ensure_ascii=False)`, with Python's `", "` / `": "` spacing.
fn native_event(event: Event) -> (String, bool) {
    const DONE: &str = "data: {\"done\": true}\n\n";
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    match event {
        Event::Text { text, worker, .. } if !text.is_empty() => {
            (format!("data: {{\"token\": {}, \"gpu\": {worker}}}\n\n", quote(&text)), false)
        }
        Event::Text { .. } | Event::End { .. } => (String::new(), false),
        Event::Done { .. } => (DONE.to_string(), true),
        Event::Error(message) => (format!("data: {{\"error\": {}}}\n\n{DONE}", quote(&message)), true),
    }
}
