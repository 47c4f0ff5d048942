//! The public chat API (`/api/v1`, docs/public-api.md), its OpenAPI
//! document, and the customer and agent pages.

use super::{
    no_instance, passthrough, ratelimit, relay, request, tokens::Claims, Gateway, Unreachable,
};
use crate::auth::bearer;
use crate::contract::answers::{self, ErrorBody, ErrorDetail};
use crate::contract::internal::{self, Route};
use crate::contract::{
    after_param, check_chat_id, check_client_msg_id, check_nickname, check_text, limit_param,
    MAX_BODY_BYTES,
};
use crate::error::{ApiError, JsonBody};
use crate::session::Role;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(title = "confab public chat API", description = "Web chat between customers and contact-centre agents, highly available."),
    paths(create_chat, post_message, transcript, stream, join, queue, leave, renew_token),
    components(schemas(CreateChat, ChatCreated, PostMessage, MessageAccepted, TranscriptBody, EventBody, JoinChat, Joined, RenewedToken, QueueBody, QueuedChat, LeaveChat, Left, ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "participant_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "the token returned when the chat was created or joined",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "agent_credential",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "an agent's own secret (gateway.agents-file) or the shared agent credential",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChat {
    /// The customer's display name (1 to 256 bytes).
    pub nickname: String,
    pub subject: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ChatCreated {
    pub chat_id: String,
    pub participant_id: String,
    /// Bearer token for this participant in this chat.
    pub token: String,
    /// RFC 3339; renew the token before then (`POST .../token`).
    pub token_expires_at: String,
    pub instance_id: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    /// Up to 64 KiB of UTF-8.
    pub text: String,
    /// Makes the submission idempotent: a retry with the same id returns the
    /// original seq and adds nothing.
    pub client_msg_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MessageAccepted {
    pub seq: u64,
    pub duplicate: bool,
}

#[derive(Serialize, ToSchema)]
pub struct EventBody {
    pub seq: u64,
    /// message, joined, left, notice or closed
    pub kind: String,
    pub participant_id: Option<String>,
    pub nickname: Option<String>,
    pub text: Option<String>,
    pub reason: Option<String>,
    /// RFC 3339
    pub at: String,
}

#[derive(Serialize, ToSchema)]
pub struct TranscriptBody {
    pub chat_id: String,
    pub instance_id: String,
    /// waiting, active or closed
    pub state: String,
    pub events: Vec<EventBody>,
    /// Another page follows: ask again with `after` = the last seq here.
    pub more: bool,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinChat {
    pub nickname: String,
}

#[derive(Serialize, ToSchema)]
pub struct Joined {
    pub participant_id: String,
    pub token: String,
    /// RFC 3339; renew the token before then (`POST .../token`).
    pub token_expires_at: String,
    pub instance_id: String,
}

#[derive(Serialize, ToSchema)]
pub struct RenewedToken {
    pub token: String,
    /// RFC 3339
    pub token_expires_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct QueuedChat {
    pub chat_id: String,
    pub subject: Option<String>,
    /// The customer's nickname, stored with the chat at creation; null
    /// for a chat created, or a listing answered, by an older version that
    /// did not store it.
    pub nickname: Option<String>,
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct QueueBody {
    pub chats: Vec<QueuedChat>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct LeaveChat {
    /// An agent ends the chat for everyone (a customer leaving always does).
    #[serde(default)]
    pub end_chat: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Left {
    pub state: String,
}

#[derive(Clone)]
pub struct GwState {
    pub gw: Arc<Gateway>,
    pub metrics: PrometheusHandle,
}

pub fn router(
    gw: Arc<Gateway>,
    limiter: ratelimit::RateLimiter,
    metrics: PrometheusHandle,
) -> Router {
    let state = GwState { gw, metrics };
    let api = Router::new()
        .route("/api/v1/chats", post(create_chat))
        .route("/api/v1/chats/{chat_id}/messages", post(post_message))
        .route("/api/v1/chats/{chat_id}/transcript", get(transcript))
        .route("/api/v1/chats/{chat_id}/ws", get(stream))
        .route("/api/v1/chats/{chat_id}/join", post(join))
        .route("/api/v1/chats/{chat_id}/leave", post(leave))
        .route("/api/v1/chats/{chat_id}/token", post(renew_token))
        .route("/api/v1/queue", get(queue));
    let router = Router::new()
        .merge(api)
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(ApiDoc::openapi()) }),
        )
        .merge(super::pages::router())
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status))
        .route(internal::EVENTS, get(events))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn_with_state(
            limiter,
            ratelimit::limit,
        ));
    crate::error::edge_layers(router, "gateway", MAX_BODY_BYTES)
        .layer(axum::middleware::from_fn(super::pages::security_headers))
        .with_state(state)
}

async fn status(State(s): State<GwState>) -> Json<crate::contract::GatewayStatus> {
    Json(crate::contract::GatewayStatus {
        component: "gateway".into(),
        version: crate::VERSION.into(),
        pid: std::process::id(),
        failovers: s.gw.failovers.load(std::sync::atomic::Ordering::Relaxed),
        instances: s.gw.pool.views(),
    })
}

/// The gateway's numbered events (597xx) after `?after=CURSOR`, for the
/// dashboard; behind the cluster secret.
async fn events(
    State(s): State<GwState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::contract::EventsPage>, ApiError> {
    if !s.gw.secret.admits(&headers) {
        metrics::counter!(crate::telemetry::metrics::INTERNAL_AUTH_FAILURES).increment(1);
        return Err(ApiError::unauthorized("missing or wrong cluster secret"));
    }
    let after = crate::contract::after_param(&q)?;
    let (events, next) = crate::telemetry::recent::since(after, 500);
    Ok(Json(crate::contract::EventsPage { events, next }))
}

async fn metrics_text(State(s): State<GwState>) -> Response {
    crate::telemetry::metrics::render(&s.metrics)
}

/// The `Authorization: Bearer` value, read without copying every header.
pub struct Bearer(Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Bearer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Bearer(bearer(&parts.headers).map(str::to_owned)))
    }
}

/// The participant a token names, if it is genuine and for this chat.
fn participant(gw: &Gateway, token: Option<&str>, chat_id: &str) -> Result<Claims, ApiError> {
    let token = token.ok_or_else(|| {
        ApiError::unauthorized(
            "missing participant token (Authorization: Bearer <token>; on the WebSocket: the subprotocol confab.token.<token> or ?token=<token>)",
        )
    })?;
    let claims = gw
        .tokens
        .verify(token, super::tokens::now())
        .map_err(|refused| match refused {
            super::tokens::Refused::Invalid => ApiError::unauthorized("invalid participant token"),
            super::tokens::Refused::Expired => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "this token has expired; renew tokens before they expire (POST /api/v1/chats/{chat_id}/token)",
            ),
        })?;
    if claims.chat_id != chat_id {
        return Err(ApiError::forbidden("this token is not valid for this chat"));
    }
    if !still_allowed(gw, &claims) {
        return Err(ApiError::unauthorized(
            "this agent's access has been revoked",
        ));
    }
    Ok(claims)
}

/// Whether an agent's token still names an agent who may act: theirs if
/// it names one, the shared credential's for tokens of earlier gateways
/// (which name none). Customers' tokens always are.
pub fn still_allowed(gw: &Gateway, claims: &Claims) -> bool {
    match (&claims.agent, claims.role) {
        (Some(agent), _) => gw.agents.active(agent),
        (None, Role::Agent) => gw.agents.active(super::agents::SHARED),
        (None, _) => true,
    }
}

/// The agent the request's credential belongs to.
fn agent(gw: &Gateway, headers: &HeaderMap) -> Result<String, ApiError> {
    let given = bearer(headers).ok_or_else(|| {
        ApiError::unauthorized("missing agent credential (Authorization: Bearer <credential>)")
    })?;
    gw.agents
        .authenticate(given)
        .map_err(|refused| match refused {
            super::agents::Refused::Off => ApiError::unauthorized(
                "agent access is off: no agent credential or agents file is configured",
            ),
            super::agents::Refused::Unknown => ApiError::unauthorized("wrong agent credential"),
        })
}

/// A token for `claims`' participant that expires `gateway.token-ttl` from
/// now, and that time (RFC 3339).
fn issue(gw: &Gateway, claims: Claims) -> (String, String) {
    let expires_at = super::tokens::now() + gw.token_ttl.as_secs().max(1);
    let token = gw.tokens.issue(&Claims {
        expires_at: Some(expires_at),
        ..claims
    });
    let at = crate::session::format_ms(i64::try_from(expires_at * 1000).unwrap_or(i64::MAX));
    (token, at)
}

/// A successful instance answer passed on as it came; an error re-issued.
fn raw_answer(status: StatusCode, body: bytes::Bytes) -> Result<Response, ApiError> {
    if status.is_success() {
        Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
    } else {
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Err(passthrough(status, &parsed))
    }
}

/// A successful instance answer as the contract's type; an error re-issued.
fn answer<T: serde::de::DeserializeOwned>(status: StatusCode, body: Value) -> Result<T, ApiError> {
    if !status.is_success() {
        return Err(passthrough(status, &body));
    }
    T::deserialize(body).map_err(|e| {
        tracing::error!(error = %e, "an instance's answer does not match the internal contract");
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the chat server's answer could not be read",
        )
    })
}

/// Start a chat: an enabled, healthy instance with the fewest chats gets it.
#[utoipa::path(post, path = "/api/v1/chats", request_body = CreateChat,
    responses((status = 201, body = ChatCreated), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, description = "no instance available", body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "create"))]
async fn create_chat(
    State(s): State<GwState>,
    JsonBody(b): JsonBody<CreateChat>,
) -> Result<Response, ApiError> {
    let nickname = check_nickname(&b.nickname)?;
    let body = request(&answers::CreateSession {
        nickname,
        subject: b.subject,
    });
    let gw = &s.gw;
    for _ in 0..gw.pool.member_count().max(1) {
        let member = gw.pool.pick(None).ok_or_else(no_instance)?;
        match gw
            .call(&member, Method::POST, internal::SESSIONS, body.clone())
            .await
        {
            Ok((StatusCode::CREATED, created)) => {
                let created: answers::Created = answer(StatusCode::CREATED, created)?;
                let (token, token_expires_at) = issue(
                    gw,
                    Claims {
                        chat_id: created.session_id.clone(),
                        participant_id: created.participant_id.clone(),
                        role: Role::Customer,
                        expires_at: None,
                        agent: None,
                    },
                );
                let reply = ChatCreated {
                    chat_id: created.session_id,
                    participant_id: created.participant_id,
                    token,
                    token_expires_at,
                    instance_id: created.instance_id,
                };
                return Ok((StatusCode::CREATED, Json(reply)).into_response());
            }
            // Draining or its store is down: try the next instance.
            Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => continue,
            Ok((status, body)) => return Err(passthrough(status, &body)),
            Err(Unreachable(why)) => gw.pool.report_failure(&member, &why),
        }
    }
    Err(no_instance())
}

/// Send a message; answered only after the message is durably saved.
#[utoipa::path(post, path = "/api/v1/chats/{chat_id}/messages", request_body = PostMessage,
    params(("chat_id" = String, Path)), security(("participant_token" = [])),
    responses((status = 200, body = MessageAccepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "messages", chat_id = %chat_id))]
async fn post_message(
    State(s): State<GwState>,
    Path(chat_id): Path<String>,
    Bearer(token): Bearer,
    JsonBody(b): JsonBody<PostMessage>,
) -> Result<Response, ApiError> {
    check_chat_id(&chat_id)?;
    let who = participant(&s.gw, token.as_deref(), &chat_id)?;
    check_text(&b.text)?;
    check_client_msg_id(&b.client_msg_id)?;
    // Without a client id, the gateway gives one, so that its own retry
    // after a failover cannot add the message twice.
    let client_msg_id = b
        .client_msg_id
        .unwrap_or_else(|| format!("gw-{}", uuid::Uuid::new_v4().simple()));
    let body = request(&answers::PostMessage {
        participant_id: who.participant_id,
        text: b.text,
        client_msg_id: Some(client_msg_id),
    });
    let (status, body, _) =
        s.gw.on_chat_raw(
            &chat_id,
            Method::POST,
            &Route::Messages.path(&chat_id),
            body,
        )
        .await?;
    raw_answer(status, body)
}

/// The transcript after a seq; a closed chat's from the contact store (its
/// participants' tokens, or the agents' credential for closed chats).
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/transcript",
    params(("chat_id" = String, Path), ("after" = Option<u64>, Query, description = "only events after this seq"), ("limit" = Option<usize>, Query, description = "at most this many events (1-1000, default 500); a page also ends after about 1 MiB of text")), security(("participant_token" = []), ("agent_credential" = [])),
    responses((status = 200, body = TranscriptBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "transcript", chat_id = %chat_id))]
async fn transcript(
    State(s): State<GwState>,
    Path(chat_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Bearer(token): Bearer,
) -> Result<Response, ApiError> {
    check_chat_id(&chat_id)?;
    let who = match participant(&s.gw, token.as_deref(), &chat_id) {
        Ok(who) => who,
        // An agent's credential reads closed chats (the contact history).
        Err(refused) => match token.as_deref().map(|t| s.gw.agents.authenticate(t)) {
            Some(Ok(_)) if s.gw.agents_read_closed_chats => {
                let (after, limit) = (after_param(&q)?, limit_param(&q)?);
                return final_transcript(&s.gw, &chat_id, after, limit).await;
            }
            _ => return Err(refused),
        },
    };
    let (after, limit) = (after_param(&q)?, limit_param(&q)?);
    let (status, body, _) =
        s.gw.on_chat_raw(
            &chat_id,
            Method::GET,
            &internal::transcript_page(&chat_id, after, limit, &who.participant_id),
            None,
        )
        .await?;
    raw_answer(status, body)
}

/// A closed chat's final transcript, read from the contact store (shared by
/// every instance with Cassandra) by an instance that can: usable ones
/// first; one that answers 503, or 404 without confab's error body (an
/// earlier version without the route), is passed over for the next.
async fn final_transcript(
    gw: &Gateway,
    chat_id: &str,
    after: u64,
    limit: usize,
) -> Result<Response, ApiError> {
    let path = internal::final_transcript_page(chat_id, after, limit);
    let mut members = gw.pool.members();
    members.retain(|m| m.is_healthy());
    members.sort_by_key(|m| !m.is_usable());
    let mut last = None;
    for member in members {
        match gw.call_raw(&member, Method::GET, &path, None).await {
            Ok((StatusCode::NOT_FOUND, body)) if is_error_code(&body, "not_found") => {
                return Err(ApiError::not_found(format!(
                    "chat {chat_id} has no final transcript: an agent's credential reads closed chats; join an open chat to read it"
                )))
            }
            Ok((status, body))
                if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::NOT_FOUND =>
            {
                last = Some((status, body));
            }
            Ok((status, body)) => return raw_answer(status, body),
            Err(Unreachable(why)) => gw.pool.report_failure(&member, &why),
        }
    }
    match last {
        Some((status, body)) if status == StatusCode::SERVICE_UNAVAILABLE => {
            raw_answer(status, body)
        }
        _ => Err(no_instance()),
    }
}

/// Whether an instance's error answer carries `code`.
fn is_error_code(body: &[u8], code: &str) -> bool {
    serde_json::from_slice::<ErrorBody>(body).is_ok_and(|b| b.error.code == code)
}

/// Live events over WebSocket, one JSON event per text frame, from seq
/// `after`+1. The gateway keeps the stream going across instance failures.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/ws",
    params(("chat_id" = String, Path), ("token" = Option<String>, Query, description = "the participant token, unless offered as the subprotocol confab.token.<token> (preferred: kept out of URLs)"), ("after" = Option<u64>, Query)),
    responses((status = 101, description = "WebSocket upgrade"), (status = 401, body = ErrorBody), (status = 403, description = "token for another chat or Origin not allowed", body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "ws", chat_id = %chat_id))]
async fn stream(
    State(s): State<GwState>,
    Path(chat_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    connection: Option<axum::Extension<crate::listener::Connection>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    check_chat_id(&chat_id)?;
    // The token: as a subprotocol (kept out of URLs and proxy logs) or in
    // the query string.
    let offered = super::tokens::from_ws_protocol(&headers).map(str::to_owned);
    let token = offered.as_deref().or(q.get("token").map(String::as_str));
    let who = participant(&s.gw, token, &chat_id)?;
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let same_origin = origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest == host);
        let allowed = same_origin || s.gw.allowed_origins.iter().any(|a| a == origin || a == "*");
        if !allowed {
            return Err(ApiError::forbidden(format!(
                "origin {origin} is not allowed"
            )));
        }
    }
    let after = after_param(&q)?;
    let held = s.gw.sockets.hold(&who.participant_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this participant has {} WebSockets open already; close one first",
                s.gw.sockets.max()
            ),
        )
    })?;
    // Resolve the chat before upgrading, so unknown or closed chats get a
    // plain HTTP error.
    s.gw.locate(&chat_id).await?;
    let gw = s.gw.clone();
    // A client that offered the token as a subprotocol must see it chosen.
    let ws = match offered {
        Some(t) => ws.protocols([format!("{}{t}", super::tokens::WS_TOKEN_PROTOCOL)]),
        None => ws,
    };
    Ok(
        crate::ws::chat_upgrade(ws).on_upgrade(move |socket| async move {
            let open = crate::telemetry::metrics::OpenSocket::new("gateway");
            relay::relay(gw, socket, chat_id, who, after).await;
            drop((held, connection, open));
        }),
    )
}

/// An agent joins a chat.
#[utoipa::path(post, path = "/api/v1/chats/{chat_id}/join", request_body = JoinChat,
    params(("chat_id" = String, Path)), security(("agent_credential" = [])),
    responses((status = 200, body = Joined), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "join", chat_id = %chat_id))]
async fn join(
    State(s): State<GwState>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<JoinChat>,
) -> Result<Json<Joined>, ApiError> {
    check_chat_id(&chat_id)?;
    let agent_id = agent(&s.gw, &headers)?;
    let nickname = check_nickname(&b.nickname)?;
    let (status, body, member) =
        s.gw.on_chat(
            &chat_id,
            Method::POST,
            &Route::Join.path(&chat_id),
            request(&answers::JoinSession { nickname }),
        )
        .await?;
    let answers::Joined { participant_id } = answer(status, body)?;
    let (token, token_expires_at) = issue(
        &s.gw,
        Claims {
            chat_id,
            participant_id: participant_id.clone(),
            role: Role::Agent,
            expires_at: None,
            agent: Some(agent_id),
        },
    );
    Ok(Json(Joined {
        participant_id,
        token,
        token_expires_at,
        instance_id: member.id().unwrap_or_default(),
    }))
}

/// A fresh token for the bearer's participant (an active client renews its
/// token before it expires). An expired token cannot be renewed.
#[utoipa::path(post, path = "/api/v1/chats/{chat_id}/token",
    params(("chat_id" = String, Path)), security(("participant_token" = [])),
    responses((status = 200, body = RenewedToken), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "token", chat_id = %chat_id))]
async fn renew_token(
    State(s): State<GwState>,
    Path(chat_id): Path<String>,
    Bearer(token): Bearer,
) -> Result<Json<RenewedToken>, ApiError> {
    check_chat_id(&chat_id)?;
    let claims = participant(&s.gw, token.as_deref(), &chat_id)?;
    if claims.expires_at.is_none() {
        // A token of an earlier gateway never expires; renewing it would
        // turn it into one that escapes nothing but looks new.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "token_not_renewable",
            "this token has no expiry (issued by an earlier gateway) and cannot be renewed",
        ));
    }
    // An agent who left keeps no token for the chat. Only the instance
    // knows who left; when it cannot say (the chat closed, or no instance
    // answers), the token is renewed: every use is checked there again.
    if let Ok((status, body, _)) =
        s.gw.on_chat(
            &chat_id,
            Method::GET,
            &internal::transcript_page(&chat_id, u64::MAX, 1, &claims.participant_id),
            None,
        )
        .await
    {
        let view: Result<answers::TranscriptView, _> = answer(status, body);
        match view {
            Ok(answers::TranscriptView {
                left_at: Some(_), ..
            }) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "participant_left",
                    "you left this chat; its token cannot be renewed",
                ))
            }
            Err(e) if e.status == StatusCode::FORBIDDEN => return Err(e),
            _ => {}
        }
    }
    let (token, token_expires_at) = issue(&s.gw, claims);
    Ok(Json(RenewedToken {
        token,
        token_expires_at,
    }))
}

/// Chats waiting for an agent: `limit` of them (at most 1,000) from the
/// oldest end (`order=oldest`, the default) or the newest (`order=newest`).
#[utoipa::path(get, path = "/api/v1/queue", security(("agent_credential" = [])),
    params(("order" = Option<String>, Query, description = "oldest (default) or newest"), ("limit" = Option<u32>, Query, description = "1 to 1000 (default 1000)")),
    responses((status = 200, body = QueueBody), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "queue"))]
async fn queue(
    State(s): State<GwState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<QueueBody>, ApiError> {
    agent(&s.gw, &headers)?;
    let (order, limit) = crate::contract::queue_params(&q)?;
    let member = s.gw.pool.any_healthy(None).ok_or_else(no_instance)?;
    let (status, body) =
        s.gw.call(&member, Method::GET, &internal::waiting(order, limit), None)
            .await
            .map_err(|_| no_instance())?;
    let answers::Sessions { sessions } = answer(status, body)?;
    let chats = sessions
        .into_iter()
        .map(|r| QueuedChat {
            chat_id: r.session_id,
            subject: r.subject,
            nickname: r.nickname,
            created_at: crate::session::format_ms(r.created_at_ms),
        })
        .collect();
    Ok(Json(QueueBody { chats }))
}

/// Leave the chat. A customer leaving closes it; an agent closes it with `end_chat`.
#[utoipa::path(post, path = "/api/v1/chats/{chat_id}/leave", request_body = LeaveChat,
    params(("chat_id" = String, Path)), security(("participant_token" = [])),
    responses((status = 200, body = Left), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[tracing::instrument(level = "debug", name = "gateway", skip_all, fields(route = "leave", chat_id = %chat_id))]
async fn leave(
    State(s): State<GwState>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Left>, ApiError> {
    check_chat_id(&chat_id)?;
    let who = participant(&s.gw, bearer(&headers), &chat_id)?;
    // The body is optional: empty means {}.
    let leave: LeaveChat = if body.iter().all(u8::is_ascii_whitespace) {
        LeaveChat::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let end_chat = leave.end_chat;
    let (status, body, _) =
        s.gw.on_chat(
            &chat_id,
            Method::POST,
            &Route::Leave.path(&chat_id),
            request(&answers::LeaveSession {
                participant_id: who.participant_id,
                end_chat,
            }),
        )
        .await?;
    s.gw.forget(&chat_id);
    let answers::Left { state } = answer(status, body)?;
    Ok(Json(Left {
        state: state.as_str().to_owned(),
    }))
}
