//! The customer page (`/`), the agent page (`/agent`) and their assets.
//! Scripts and styles are files of their own, so that the Content Security
//! Policy can forbid inline code: an injected `<script>` (were any text to
//! reach the page unescaped) would not run. Every gateway answer also says
//! not to be framed (clickjacking), not to be sniffed as another type, and
//! to send no referrer to other sites.

use axum::extract::{Path, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; object-src 'none'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// name → (content type, contents)
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "chat-common.js",
        "text/javascript; charset=utf-8",
        include_str!("pages/chat-common.js"),
    ),
    (
        "chat.js",
        "text/javascript; charset=utf-8",
        include_str!("pages/chat.js"),
    ),
    (
        "agent.js",
        "text/javascript; charset=utf-8",
        include_str!("pages/agent.js"),
    ),
    (
        "pages.css",
        "text/css; charset=utf-8",
        include_str!("pages/pages.css"),
    ),
];

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Html(include_str!("pages/chat.html")) }))
        .route(
            "/agent",
            get(|| async { Html(include_str!("pages/agent.html")) }),
        )
        .route("/assets/{name}", get(asset))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => crate::error::ApiError::not_found(format!("no asset {name}")).into_response(),
    }
}

/// Middleware: the security headers on every answer.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
