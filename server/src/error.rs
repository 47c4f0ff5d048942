//! HTTP errors as JSON `{"error": {"code", "message"}}` with the right
//! status, and a JSON body extractor whose rejections answer the same way
//! (bad JSON is a 400, a body over the limit a 413).

use crate::store::StoreError;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn closed(session_id: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "chat_closed",
            format!("chat {session_id} is closed"),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// The session lives on another instance now (this one was fenced or
    /// never owned it). The gateway relocates the chat on this answer.
    pub fn not_owner(session_id: &str) -> Self {
        Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            "not_owner",
            format!("session {session_id} is not owned by this instance"),
        )
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    pub fn internal(context: &str, err: &dyn std::error::Error) -> Self {
        // Logged once here, with its cause chain; the client gets no internals.
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// The JSON body: `{"error": {"code", "message"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound(id) => ApiError::not_found(format!("chat {id} not found")),
            StoreError::Closed(id) => ApiError::closed(id),
            StoreError::Fenced { session_id, .. } => ApiError::not_owner(session_id),
            StoreError::AlreadyExists(_) | StoreError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Corrupt(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "history_corrupt",
                e.to_string(),
            ),
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "session store unavailable");
                ApiError::unavailable("store_unavailable", "the session store is unavailable")
            }
        }
    }
}

/// `Json<T>` whose every rejection is a JSON error: malformed JSON, invalid
/// UTF-8 and missing fields are 400; an oversized body is 413.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rejection) => {
                let status = rejection.status();
                return Err(if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large("request body too large")
                } else if body_timed_out(&rejection) {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request body did not arrive within http.body-timeout",
                    )
                } else {
                    ApiError::new(status, "bad_request", rejection.body_text())
                });
            }
        };
        if std::str::from_utf8(&bytes).is_err() {
            return Err(ApiError::bad_request("request body is not valid UTF-8"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {}", plain_serde(&e))))
    }
}

/// Whether reading a body failed on the listener's body deadline
/// (crate::listener).
fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// How much of a refused oversized body is read (and dropped) before the
/// 413 goes out, and for how long at most.
const DRAIN_BYTES: usize = 16 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Middleware: a request that declares a body over `limit` bytes is
/// answered 413 `too_large` without being handled. Its body is read and
/// dropped first (up to 16 MiB, 5 s): a server that answers and closes
/// while the client is still sending makes the client's kernel see a reset,
/// and the client gets "connection reset" instead of the JSON error.
pub async fn refuse_oversized(
    limit: usize,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_none_or(|n| n <= limit as u64) {
        return next.run(req).await;
    }
    let mut body = req.into_body().into_data_stream();
    let drain = async {
        let mut read = 0;
        while read < DRAIN_BYTES {
            match futures_util::StreamExt::next(&mut body).await {
                Some(Ok(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    ApiError::too_large(format!("request body over {limit} bytes")).into_response()
}

fn has_body(headers: &axum::http::HeaderMap) -> bool {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    declared.is_some_and(|n| n > 0) || headers.contains_key(axum::http::header::TRANSFER_ENCODING)
}

/// Whether a request with a body declares JSON (a charset may follow).
pub fn declares_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// 415 for a body that is not declared JSON.
pub fn refuse_non_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if has_body(headers) && !declares_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be JSON (Content-Type: application/json)",
        ));
    }
    Ok(())
}

/// Middleware: 415 for a request body that is not declared JSON (no
/// cross-site form post reaches a handler without a CORS preflight).
pub async fn json_only(req: Request, next: axum::middleware::Next) -> Response {
    match refuse_non_json(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The HTTP edge every listener shares, outermost first: request metrics
/// (by route template), the body size limit (413 before the handler),
/// JSON-only bodies (415), every error answered in JSON.
pub fn edge_layers<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    component: &'static str,
    max_body: usize,
) -> axum::Router<S> {
    router
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(json_only))
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_oversized(max_body, req, next)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            crate::telemetry::metrics::track_http(component, req, next)
        }))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
}

/// A serde error as a client should read it: without the names of our
/// types (`expected struct CreateBody` becomes `expected a JSON object`).
fn plain_serde(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest
        .find("expected struct ")
        .or_else(|| rest.find("expected enum "))
    {
        out.push_str(&rest[..i]);
        out.push_str("expected a JSON object");
        let after = &rest[i..];
        let name_start = after.find(' ').map(|k| k + 1).unwrap_or(0);
        let name_start = name_start + after[name_start..].find(' ').map(|k| k + 1).unwrap_or(0);
        let name_len = after[name_start..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len() - name_start);
        rest = &after[name_start + name_len..];
    }
    out.push_str(rest);
    out
}

/// Middleware: every error answer is JSON `{"error": {"code", "message"}}`,
/// including those axum makes itself (405 method not allowed, a path
/// segment that does not parse, a refused WebSocket upgrade), which come
/// as plain text or empty.
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        _ if status.is_client_error() => "bad_request",
        _ => "internal",
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    let json = ApiError::new(status, code, message).into_response();
    let (json_parts, json_body) = json.into_parts();
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, json_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_do_not_name_our_types() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct CreateBody {
            nickname: String,
        }
        let e = serde_json::from_str::<CreateBody>("\"text\"").unwrap_err();
        let plain = plain_serde(&e);
        assert!(!plain.contains("CreateBody"), "{plain}");
        assert!(plain.contains("expected a JSON object"), "{plain}");
        let e = serde_json::from_str::<CreateBody>("{}").unwrap_err();
        assert_eq!(plain_serde(&e), e.to_string(), "other messages are kept");
    }
}
