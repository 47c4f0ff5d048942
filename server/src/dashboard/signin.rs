//! Operators sign in with the admin token and get a session cookie; the
//! token itself never goes back to the browser.
//!
//! The cookie holds a random session id (256 bits) known only to this
//! process: `HttpOnly` (no script reads it), `SameSite=Strict` (no other
//! site's page sends it), `Secure` when the dashboard is reached over
//! HTTPS. Actions (every non-GET request) must also come from the
//! dashboard's own origin. Failed sign-ins are logged (event 59620) and
//! limited per client address.

use crate::auth::constant_time_eq;
use crate::error::ApiError;
use crate::telemetry::events;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const COOKIE: &str = "confab_dashboard";
/// Failed sign-ins one address may make per [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    admin_token: String,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Instant>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Gate {
    pub fn new(admin_token: String, ttl: Duration) -> Self {
        Gate {
            inner: Arc::new(Inner {
                admin_token,
                ttl,
                sessions: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A new session, valid for the configured time.
    fn open(&self) -> String {
        let mut bytes = [0u8; 32];
        if openssl::rand::rand_bytes(&mut bytes).is_err() {
            // No randomness: no sessions, rather than guessable ones.
            return String::new();
        }
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut sessions = self.inner.sessions.lock();
        let now = Instant::now();
        sessions.retain(|_, expires| *expires > now);
        sessions.insert(id.clone(), now + self.inner.ttl);
        id
    }

    fn is_valid(&self, id: &str) -> bool {
        self.inner
            .sessions
            .lock()
            .get(id)
            .is_some_and(|expires| *expires > Instant::now())
    }

    fn close(&self, id: &str) {
        self.inner.sessions.lock().remove(id);
    }

    /// Err(wait) while `addr` has used up its failed sign-ins.
    fn check_failures(&self, addr: IpAddr) -> Result<(), Duration> {
        let failures = self.inner.failures.lock();
        match failures.get(&addr) {
            Some(&(n, since)) if n >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW => {
                Err(FAILURE_WINDOW - since.elapsed())
            }
            _ => Ok(()),
        }
    }

    fn record_failure(&self, addr: IpAddr) {
        let mut failures = self.inner.failures.lock();
        if failures.len() > 10_000 {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(addr).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

/// The session id in the request's cookie, if any.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Whether the browser reached us over HTTPS (directly or through a proxy
/// that says so).
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn cookie(value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Non-GET requests must come from a page of this dashboard: the browser's
/// `Origin` must name the host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    match (host, origin) {
        (Some(host), Some(origin)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest == host),
        // No Origin: not a browser's cross-site request (browsers send one
        // with every POST), e.g. curl with the cookie.
        (Some(_), None) => true,
        _ => false,
    }
}

/// In front of every page, stream and server function: a valid session,
/// and for actions the dashboard's own origin. Pages without a session go
/// to the sign-in page; anything else gets 401.
pub async fn require(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let signed_in = session_id(req.headers()).is_some_and(|id| gate.is_valid(id));
    if !signed_in {
        let wants_page = req.method() == Method::GET
            && req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
        if wants_page {
            return Redirect::to("/signin").into_response();
        }
        return ApiError::unauthorized("sign in to the dashboard first").into_response();
    }
    if req.method() != Method::GET && !same_origin(req.headers()) {
        return ApiError::forbidden("cross-site request refused").into_response();
    }
    next.run(req).await
}

#[derive(Deserialize)]
pub struct SignIn {
    token: String,
}

pub async fn page(headers: HeaderMap, State(gate): State<Gate>) -> Response {
    if session_id(&headers).is_some_and(|id| gate.is_valid(id)) {
        return Redirect::to("/").into_response();
    }
    form(StatusCode::OK, None)
}

fn form(status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert" id="signin-error">{e}</p>"#))
        .unwrap_or_default();
    let html = format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · confab dashboard</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/pkg/dashboard.css"></head>
<body><main><form class="signin" method="post" action="/signin">
<h1>confab dashboard</h1>{error}
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button class="primary" type="submit">Sign in</button>
</form></main></body></html>"#
    );
    let mut response = (status, Html(html)).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    response
}

pub async fn sign_in(
    State(gate): State<Gate>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form_data): Form<SignIn>,
) -> Response {
    if !same_origin(&headers) {
        return ApiError::forbidden("cross-site sign-in refused").into_response();
    }
    let addr = peer.ip();
    if let Err(wait) = gate.check_failures(addr) {
        let mut response = form(
            StatusCode::TOO_MANY_REQUESTS,
            Some("Too many failed sign-ins from this address; wait a minute."),
        );
        if let Ok(v) = HeaderValue::from_str(&(wait.as_secs() + 1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    if !constant_time_eq(
        form_data.token.trim().as_bytes(),
        gate.inner.admin_token.as_bytes(),
    ) {
        gate.record_failure(addr);
        tracing::warn!(
            event_id = events::DASHBOARD_SIGNIN_REFUSED,
            client = %addr,
            "dashboard sign-in refused: wrong admin token"
        );
        return form(StatusCode::UNAUTHORIZED, Some("Wrong admin token."));
    }
    let id = gate.open();
    if id.is_empty() {
        return ApiError::unavailable("no_randomness", "cannot make a session").into_response();
    }
    tracing::info!(client = %addr, "dashboard sign-in");
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie(&id, gate.inner.ttl, over_https(&headers)),
    );
    response
}

pub async fn sign_out(State(gate): State<Gate>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return ApiError::forbidden("cross-site request refused").into_response();
    }
    if let Some(id) = session_id(&headers) {
        gate.close(id);
    }
    let mut response = Redirect::to("/signin").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie("", Duration::ZERO, over_https(&headers)),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn sessions_are_random_valid_and_closable() {
        let gate = Gate::new("t".into(), Duration::from_secs(60));
        let (a, b) = (gate.open(), gate.open());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(gate.is_valid(&a) && gate.is_valid(&b));
        assert!(!gate.is_valid("guess"));
        gate.close(&a);
        assert!(!gate.is_valid(&a));
        let expired = Gate::new("t".into(), Duration::ZERO);
        let c = expired.open();
        assert!(!expired.is_valid(&c));
    }

    #[test]
    fn failed_sign_ins_are_limited_per_address() {
        let gate = Gate::new("t".into(), Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES {
            assert!(gate.check_failures(a).is_ok());
            gate.record_failure(a);
        }
        assert!(gate.check_failures(a).is_err());
        assert!(
            gate.check_failures(b).is_ok(),
            "another address is not limited"
        );
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let h = headers(&[("cookie", "a=1; confab_dashboard=abc; b=2")]);
        assert_eq!(session_id(&h), Some("abc"));
        assert_eq!(session_id(&headers(&[("cookie", "x=1")])), None);
    }

    #[test]
    fn cross_site_actions_are_told_apart() {
        let ours = headers(&[
            ("host", "127.0.0.1:8090"),
            ("origin", "http://127.0.0.1:8090"),
        ]);
        let theirs = headers(&[
            ("host", "127.0.0.1:8090"),
            ("origin", "https://evil.example"),
        ]);
        assert!(same_origin(&ours));
        assert!(!same_origin(&theirs));
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8090")])));
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let c = cookie("abc", Duration::from_secs(60), false);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(cookie("abc", Duration::from_secs(1), true)
            .to_str()
            .unwrap()
            .ends_with("; Secure"));
    }
}
