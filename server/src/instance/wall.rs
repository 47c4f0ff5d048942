//! The instance's inner wall. Instances are reached by gateways, the
//! dashboard and operators' tools, never by browsers or participants:
//! - every call on the internal API (`/internal/…`, the per-chat WebSocket
//!   and the gateways' channel) carries the cluster secret, compared in
//!   constant time; without it: 401, counted and logged (event 59616, at
//!   most one line a second, with how many were refused since);
//! - a request with an `Origin` (a browser) is refused (403);
//! - a body that is not JSON is refused (415), so that no cross-site form
//!   post or stray client can reach a handler.
//!
//! Requests that arrive on an authenticated channel carry
//! [`ChannelAuthenticated`]: the channel checked the secret at its upgrade.

use super::routes::AppState;
use crate::contract::{ChannelAuthenticated, ClusterSecret};
use crate::error::ApiError;
use crate::telemetry::{events, metrics as m};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster secret and the record of refusals.
#[derive(Clone)]
pub struct Wall {
    secret: ClusterSecret,
    refusals: Arc<Refusals>,
}

struct Refusals {
    last_logged: Mutex<Option<Instant>>,
    since_logged: AtomicU64,
}

impl Wall {
    pub fn new(secret: ClusterSecret) -> Self {
        metrics::counter!(m::INTERNAL_AUTH_FAILURES).absolute(0);
        Wall {
            secret,
            refusals: Arc::new(Refusals {
                last_logged: Mutex::new(None),
                since_logged: AtomicU64::new(0),
            }),
        }
    }

    /// 401 unless `headers` carry the cluster secret.
    pub fn check(&self, headers: &HeaderMap, path: &str) -> Result<(), ApiError> {
        if self.secret.admits(headers) {
            return Ok(());
        }
        metrics::counter!(m::INTERNAL_AUTH_FAILURES).increment(1);
        let refused = self.refusals.since_logged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.refusals.last_logged.lock();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            self.refusals.since_logged.store(0, Ordering::Relaxed);
            tracing::warn!(
                event_id = events::INTERNAL_AUTH_REFUSED,
                path,
                refused,
                "internal API call refused: missing or wrong cluster secret"
            );
        }
        Err(ApiError::unauthorized(
            "this is a confab instance's internal API: the cluster secret is missing or wrong",
        ))
    }
}

/// Middleware over every route of the instance.
pub async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match admit(&s.wall, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn admit(wall: &Wall, req: &Request) -> Result<(), ApiError> {
    let headers = req.headers();
    if headers.contains_key(header::ORIGIN) {
        return Err(ApiError::forbidden(
            "a confab instance takes no browser requests; use the gateway",
        ));
    }
    crate::error::refuse_non_json(headers)?;
    let path = req.uri().path();
    let internal = path.starts_with("/internal/");
    if internal && req.extensions().get::<ChannelAuthenticated>().is_none() {
        wall.check(headers, path)?;
    }
    Ok(())
}
