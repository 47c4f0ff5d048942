//! The instance's HTTP surface.
//!
//! Management (docs/internal-api.md): `GET /healthz` (liveness), `GET /readyz`
//! (readiness: enabled and the session store answers), `GET /status`,
//! `GET /kpi`, `GET /metrics`, `POST /admin/disable`, `POST /admin/enable`,
//! `POST /admin/kill` (only with `server.admin-kill-enabled`), all `/admin`
//! routes behind `Authorization: Bearer <admin token>`.
//!
//! Internal chat API, for the gateway only (participants never reach an
//! instance directly; the gateway authenticates them and passes their
//! participant id):
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `POST /internal/v1/sessions` | `{nickname, subject?}` | 201 `{session_id, intx, participant_id, instance_id, epoch}`; 503 `instance_disabled` when draining |
//! | `GET /internal/v1/sessions?state=waiting` | | `{sessions: [SessionRecord]}` from the store (every instance's), each with the customer's `nickname` |
//! | `POST /internal/v1/sessions/{id}/join` | `{nickname}` | `{participant_id}` (an agent) |
//! | `POST /internal/v1/sessions/{id}/messages` | `{participant_id, text, client_msg_id?}` | `{seq, duplicate}` after the durable save |
//! | `GET /internal/v1/sessions/{id}/transcript?after=N` | | `{chat_id, instance_id, state, events}` |
//! | `GET /internal/v1/sessions/{id}/ws?after=N` | | WebSocket: one JSON event per text frame, from seq N+1 on |
//! | `POST /internal/v1/sessions/{id}/leave` | `{participant_id, end_chat?}` | `{state}` |
//! | `POST /internal/v1/sessions/{id}/restore` | | `{session_id, instance_id, epoch, restored}` |
//! | `GET /internal/v1/sessions/{id}/location` | | the stored `SessionRecord` (owner, epoch, state) |
//! | `GET /internal/v1/sessions/{id}/final-transcript?after=N` | | a closed chat's transcript from the contact store, as above with `state: closed`; 404 when the store has none |
//!
//! A session that this instance does not host (any more) answers 421
//! `not_owner`: the gateway then restores it on a live instance.

use super::error::EngineError;
use super::Instance;
use crate::auth::check_admin;
use crate::contract::answers;
use crate::contract::internal::{self, Route};
use crate::contract::paths;
use crate::contract::{
    after_param, check_chat_id, check_client_msg_id, check_nickname, check_text, limit_param,
    reader_param, MAX_BODY_BYTES,
};
use crate::contract::{InstanceStatus, StoreStatus};
use crate::error::{ApiError, JsonBody};
use crate::session::SessionState;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    pub instance: Arc<Instance>,
    pub metrics: PrometheusHandle,
    pub admin_token: Option<String>,
    pub admin_kill_enabled: bool,
    pub stop: CancellationToken,
    /// The gateways' channels (crate::channel), awaited on shutdown.
    pub channels: tokio_util::task::TaskTracker,
    /// The cluster secret every internal call must carry.
    pub wall: super::wall::Wall,
}

pub fn router(state: AppState) -> Router {
    let internal = Router::new()
        .route(internal::SESSIONS, post(create_session).get(list_sessions))
        .route(Route::Join.pattern(), post(join))
        .route(Route::Messages.pattern(), post(post_message))
        .route(Route::Transcript.pattern(), get(transcript))
        .route(Route::FinalTranscript.pattern(), get(final_transcript))
        .route(Route::Stream.pattern(), get(super::stream::stream))
        .route(Route::Leave.pattern(), post(leave))
        .route(Route::Restore.pattern(), post(restore))
        .route(Route::Location.pattern(), get(location));
    let app = Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .route(paths::READYZ, get(readyz))
        .route(paths::STATUS, get(status))
        .route(paths::KPI, get(kpi))
        .route(paths::METRICS, get(metrics))
        .route(paths::ADMIN_DISABLE, post(disable))
        .route(paths::ADMIN_ENABLE, post(enable))
        .route(paths::ADMIN_KILL, post(kill))
        .route(paths::ADMIN_EVENTS, get(events))
        .route(paths::ADMIN_SESSIONS, get(admin_sessions))
        .route(paths::ADMIN_TRANSCRIPT, get(admin_transcript))
        .merge(internal)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::wall::guard,
        ));
    let app = crate::error::edge_layers(app, "instance", MAX_BODY_BYTES).with_state(state.clone());
    // The gateways' channel runs each request through the routes above.
    let routes = app.clone();
    app.route(
        crate::channel::PATH,
        get(
            move |headers: axum::http::HeaderMap,
                  connection: Option<axum::Extension<crate::listener::Connection>>,
                  ws: axum::extract::WebSocketUpgrade| {
                channel(headers, connection, ws, routes.clone(), state.clone())
            },
        ),
    )
}

/// A gateway's channel (crate::channel).
async fn channel(
    headers: axum::http::HeaderMap,
    connection: Option<axum::Extension<crate::listener::Connection>>,
    ws: axum::extract::WebSocketUpgrade,
    routes: Router,
    state: AppState,
) -> Response {
    // Browsers send an Origin with every WebSocket and apply no CORS to it:
    // a web page must not reach the internal API this way. The gateway
    // sends none.
    if headers.contains_key(axum::http::header::ORIGIN) {
        return ApiError::forbidden("the gateway channel takes no browser connections")
            .into_response();
    }
    if let Err(e) = state.wall.check(&headers, crate::channel::PATH) {
        return e.into_response();
    }
    let watches: Arc<dyn crate::channel::Watches> =
        Arc::new(super::stream::ChannelWatches(state.clone()));
    let (stop, channels) = (state.stop, state.channels);
    ws.max_message_size(crate::channel::MAX_REQUEST_FRAME)
        .on_upgrade(move |socket| {
            channels.track_future(async move {
                crate::channel::serve(socket, routes, Some(watches), stop).await;
                drop(connection);
            })
        })
}

async fn readyz(State(s): State<AppState>) -> Response {
    let ready = s.instance.is_enabled() && s.instance.monitor.is_available();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "ready": ready,
            "enabled": s.instance.is_enabled(),
            "store_available": s.instance.monitor.is_available(),
        })),
    )
        .into_response()
}

async fn status(State(s): State<AppState>) -> Json<InstanceStatus> {
    let i = &s.instance;
    Json(InstanceStatus {
        instance_id: i.id.clone(),
        enabled: i.is_enabled(),
        sessions_active: i.sessions_active() as u64,
        sessions_waiting: i.sessions_waiting() as u64,
        store: StoreStatus {
            backend: i.monitor.backend().into(),
            available: i.monitor.is_available(),
            changed_at_ms: i.monitor.changed_at_ms(),
        },
        version: crate::VERSION.into(),
        pid: std::process::id(),
        uptime_s: i.started.elapsed().as_secs(),
        admin_kill_enabled: s.admin_kill_enabled,
    })
}

async fn kpi(State(s): State<AppState>) -> Json<super::stats::KpiView> {
    Json(s.instance.kpi_view())
}

async fn metrics(State(s): State<AppState>) -> Response {
    crate::telemetry::metrics::render(&s.metrics)
}

async fn disable(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_admin(&headers, s.admin_token.as_deref())?;
    s.instance.set_enabled(false);
    Ok(Json(
        json!({"enabled": false, "sessions_active": s.instance.sessions_active()}),
    ))
}

async fn enable(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_admin(&headers, s.admin_token.as_deref())?;
    s.instance.set_enabled(true);
    Ok(Json(
        json!({"enabled": true, "sessions_active": s.instance.sessions_active()}),
    ))
}

/// The numbered events after `?after=CURSOR` (at most `limit`, 500 by
/// default), for the dashboard.
async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::contract::EventsPage>, ApiError> {
    check_admin(&headers, s.admin_token.as_deref())?;
    let after = after_param(&q)?;
    let limit = match q.get("limit") {
        None => 500,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::telemetry::recent::CAPACITY).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`limit` must be 1 to {}, got {v:?}",
                    crate::telemetry::recent::CAPACITY
                ))
            })?,
    };
    let (events, next) = crate::telemetry::recent::since(after, limit);
    Ok(Json(crate::contract::EventsPage { events, next }))
}

/// The chats hosted here, by id, a page at a time (`after`, `limit` up to
/// 500, default 100): never the whole table at once on a busy instance.
async fn admin_sessions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::contract::SessionsPage>, ApiError> {
    check_admin(&headers, s.admin_token.as_deref())?;
    let after = q.get("after").map(String::as_str).unwrap_or("");
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("`limit` must be 1 to 500, got {v:?}")))?,
    };
    let (page, more) = s.instance.sessions.page(after, limit);
    let mut sessions = Vec::with_capacity(page.len());
    for session in &page {
        sessions.push(session.summary().await);
    }
    let next = more
        .then(|| sessions.last().map(|s| s.session_id.clone()))
        .flatten();
    Ok(Json(crate::contract::SessionsPage { sessions, next }))
}

/// A hosted chat's transcript for an operator (admin token): the same
/// pages as the internal route; a closed chat's final transcript from the
/// contact store.
async fn admin_transcript(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<answers::AdminTranscript>, ApiError> {
    check_admin(&headers, s.admin_token.as_deref())?;
    let id = check_chat_id(&id)?;
    let (after, limit) = (after_param(&q)?, limit_param(&q)?);
    let Some(session) = s.instance.sessions.get(id) else {
        // Not hosted here: a closed chat is read from the contact store.
        let view = s
            .instance
            .final_transcript(id, after, limit, None)
            .await
            .map_err(|e| match e {
                EngineError::NotFound(_) => ApiError::not_found(format!(
                    "chat {id} is not hosted here and the contact store has no final transcript of it"
                )),
                e => e.into(),
            })?;
        return Ok(Json(answers::AdminTranscript {
            chat_id: view.chat_id,
            events: view.events,
            more: view.more,
        }));
    };
    let (events, more) = session
        .page(after, limit, crate::contract::PAGE_TEXT_BYTES)
        .await;
    Ok(Json(answers::AdminTranscript {
        chat_id: id.to_owned(),
        events,
        more,
    }))
}

/// SIGKILL this process (restoration tests in a real deployment). Off unless
/// `server.admin-kill-enabled = true`.
async fn kill(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_admin(&headers, s.admin_token.as_deref())?;
    if !s.admin_kill_enabled {
        return Err(ApiError::forbidden(
            "the kill endpoint is off (server.admin-kill-enabled = false)",
        ));
    }
    tracing::warn!(instance = %s.instance.id, "killing this instance with SIGKILL on admin request");
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    });
    Ok(Json(json!({"killed": std::process::id()})))
}

/// Run a state-changing operation to its end even if the caller goes away
/// (a client timeout drops the handler): a save that committed must reach
/// the in-memory transcript, a close must finish.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::spawn(work)
        .await
        .map_err(|e| ApiError::internal("chat operation failed", &e))??)
}

/// The engine's answers in HTTP: the status and code each refusal gets.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            EngineError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            EngineError::Closed(_) => (StatusCode::CONFLICT, "chat_closed"),
            EngineError::NotOwner(_) => (StatusCode::MISDIRECTED_REQUEST, "not_owner"),
            EngineError::NotParticipant { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            EngineError::Left { .. } => (StatusCode::FORBIDDEN, "participant_left"),
            EngineError::Disabled { .. } => (StatusCode::SERVICE_UNAVAILABLE, "instance_disabled"),
            EngineError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            EngineError::SaveFailed => (StatusCode::SERVICE_UNAVAILABLE, "save_failed"),
            EngineError::RestorationDisabled => (StatusCode::CONFLICT, "restoration_disabled"),
            EngineError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            EngineError::Corrupt => (StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt"),
            EngineError::ClientMsgIdReused(_) => (StatusCode::CONFLICT, "client_msg_id_reused"),
            EngineError::TranscriptFull { .. } => (StatusCode::CONFLICT, "transcript_full"),
        };
        ApiError::new(status, code, message)
    }
}

async fn create_session(
    State(s): State<AppState>,
    JsonBody(b): JsonBody<answers::CreateSession>,
) -> Result<Response, ApiError> {
    let nickname = check_nickname(&b.nickname)?;
    if b.subject.as_ref().is_some_and(|s| s.len() > 1024) {
        return Err(ApiError::bad_request("`subject` is longer than 1024 bytes"));
    }
    let instance = s.instance.clone();
    let created =
        detached(async move { instance.create_session(nickname, b.subject).await }).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_sessions(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<answers::Sessions>, ApiError> {
    let state = match q.get("state") {
        None => None,
        Some(v) => Some(SessionState::parse(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`state` must be waiting, active or closed, got {v:?}"
            ))
        })?),
    };
    let (order, limit) = crate::contract::queue_params(&q)?;
    let sessions = s
        .instance
        .store()
        .list_sessions(state, order, limit)
        .await?;
    Ok(Json(answers::Sessions { sessions }))
}

async fn join(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<answers::JoinSession>,
) -> Result<Json<answers::Joined>, ApiError> {
    let nickname = check_nickname(&b.nickname)?;
    check_chat_id(&id)?;
    let instance = s.instance.clone();
    let agent = detached(async move { instance.join(&id, nickname).await }).await?;
    Ok(Json(answers::Joined {
        participant_id: agent.participant_id,
    }))
}

async fn post_message(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<answers::PostMessage>,
) -> Result<Json<answers::Posted>, ApiError> {
    check_text(&b.text)?;
    check_client_msg_id(&b.client_msg_id)?;
    check_chat_id(&id)?;
    let instance = s.instance.clone();
    let started = std::time::Instant::now();
    let posted = detached(async move {
        instance
            .post_message(&id, &b.participant_id, b.text, b.client_msg_id)
            .await
    })
    .await?;
    metrics::histogram!(crate::telemetry::metrics::MESSAGE_ACK_DURATION)
        .record(started.elapsed().as_secs_f64());
    Ok(Json(posted))
}

async fn transcript(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<answers::TranscriptView>, ApiError> {
    let (after, limit) = (after_param(&q)?, limit_param(&q)?);
    Ok(Json(
        s.instance
            .transcript(check_chat_id(&id)?, after, limit, reader_param(&q)?)
            .await?,
    ))
}

async fn final_transcript(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<answers::TranscriptView>, ApiError> {
    let (after, limit) = (after_param(&q)?, limit_param(&q)?);
    Ok(Json(
        s.instance
            .final_transcript(check_chat_id(&id)?, after, limit, None)
            .await?,
    ))
}

async fn leave(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<answers::LeaveSession>,
) -> Result<Json<answers::Left>, ApiError> {
    check_chat_id(&id)?;
    let instance = s.instance.clone();
    let state =
        detached(async move { instance.leave(&id, &b.participant_id, b.end_chat).await }).await?;
    Ok(Json(answers::Left { state }))
}

async fn restore(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<answers::Restored>, ApiError> {
    check_chat_id(&id)?;
    let from = crate::contract::from_param(&q)?.map(str::to_owned);
    let instance = s.instance.clone();
    Ok(Json(
        detached(async move { instance.restore(&id, from.as_deref()).await }).await?,
    ))
}

async fn location(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<answers::Location>, ApiError> {
    let id = check_chat_id(&id)?;
    s.instance
        .store()
        .locate(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("chat {id} not found")))
}
