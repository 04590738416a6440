//! What wraps every route of the server:
//!
//! - CORS (`--cors-origin`, off by default): browsers on the listed origins may call the API,
//!   preflight requests included (tower-http's `CorsLayer`);
//! - bearer-token auth (`--api-key` or `NANOCHAT_API_KEY`, off by default): every route but the UI
//!   (`/`) and `/health` needs `Authorization: Bearer KEY`; a missing or wrong key is a 401 in
//!   OpenAI's shape under `/v1` and FastAPI's elsewhere, with `WWW-Authenticate: Bearer`;
//! - counting: every answered request by route and status, for `/metrics`;
//! - JSON bodies for unknown paths (404) and methods (405), in OpenAI's shape under `/v1`, as
//!   FastAPI words them (`{"detail": "Not Found"}`) elsewhere.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::json;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::openai::error;
use super::{json_response, AppState};

/// Paths served without the API key: the UI page itself (it asks for the key when the API
/// refuses it) and the health check.
const PUBLIC: [&str; 2] = ["/", "/health"];

/// The CORS layer for `origins` (`*` for any), or `None` when CORS is off.
pub fn cors(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/')).map_err(|_| {
                    anyhow::anyhow!("--cors-origin {o:?} is not a valid origin (e.g. https://example.com)")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(values)
    };
    let methods = [Method::GET, Method::POST, Method::OPTIONS];
    // the headers a preflight asks for are echoed: a `*` would not cover Authorization
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(methods)
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(std::time::Duration::from_secs(600));
    Ok(Some(layer))
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// Lets a request through when no key is set, its path is public or it carries the key.
pub async fn auth(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(key) = &state.config.api_key else { return next.run(request).await };
    if PUBLIC.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match given.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) if same_key(token.trim().as_bytes(), key.as_bytes()) => next.run(request).await,
        found => {
            let message = match found {
                Some(_) => "incorrect API key: send the server's key as `Authorization: Bearer KEY`",
                None => "this server needs an API key: send it as `Authorization: Bearer KEY`",
            };
            let mut response = if request.uri().path().starts_with("/v1") {
                let body = json!({"error": {
                    "message": message, "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
                }});
                json_response(StatusCode::UNAUTHORIZED, &body)
            } else {
                json_response(StatusCode::UNAUTHORIZED, &json!({"detail": message}))
            };
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Counts the request by the route it matched and the status it got.
pub async fn count(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_string();
    let response = next.run(request).await;
    state.pool.stats().count_request(&route, response.status().as_u16());
    response
}

/// The answer to a path no route serves.
pub async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/v1") {
        let message = format!("no route {}: the API is /v1/chat/completions, /v1/completions, /v1/models", uri.path());
        return error(StatusCode::NOT_FOUND, message, None);
    }
    json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"}))
}

/// The answer to a method a route does not serve (axum adds the `Allow` header).
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    if uri.path().starts_with("/v1") {
        let message = format!("{method} is not allowed on {}", uri.path());
        return error(StatusCode::METHOD_NOT_ALLOWED, message, None);
    }
    json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"detail": "Method Not Allowed"}))
}
