//! What the gateways and the instances agree on at their seam: the limits
//! and validators both sides apply to the same input, so that a request the
//! gateway accepts is one the instance accepts too.

pub mod answers;

use crate::error::ApiError;
use crate::session::{MAX_CLIENT_MSG_ID_BYTES, MAX_NICKNAME_BYTES, MAX_TEXT_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Largest request body: a 64 KiB text JSON-escaped may take several times
/// its size; the text limit itself is checked after parsing (413).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A chat id as both sides make them; anything else names no chat (404).
pub fn check_chat_id(id: &str) -> Result<&str, ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(ApiError::not_found(format!("chat {id} not found")))
    }
}

/// The `reader` query parameter of the internal transcript and stream
/// routes: the participant the gateway reads for (from their signed token),
/// whose view ends where they left (`Transcript::read_limit`); absent for
/// the dashboard's reads. Ids are made like chat ids.
pub fn reader_param(q: &HashMap<String, String>) -> Result<Option<&str>, ApiError> {
    match q.get("reader") {
        None => Ok(None),
        Some(id) if check_chat_id(id).is_ok() => Ok(Some(id.as_str())),
        Some(id) => Err(ApiError::bad_request(format!(
            "`reader` must be a participant id, got {id:?}"
        ))),
    }
}

/// Whether `id` can be an instance's id (`server.instance-id`): letters,
/// digits, `-`, `_` and `.`, so it goes into paths and queries as it is.
pub fn is_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The `from` of a restoration (`internal::restore_from`): an instance id.
pub fn from_param(q: &HashMap<String, String>) -> Result<Option<&str>, ApiError> {
    match q.get("from") {
        None => Ok(None),
        Some(id) if is_instance_id(id) => Ok(Some(id.as_str())),
        Some(id) => Err(ApiError::bad_request(format!(
            "`from` must be an instance id (letters, digits, '-', '_' or '.'), got {id:?}"
        ))),
    }
}

/// Transcript reads answer at most this many events by default…
pub const PAGE_EVENTS: usize = 500;
/// …and at most this many when asked (`limit`).
pub const MAX_PAGE_EVENTS: usize = 1000;
/// A page also ends once its texts reach this many bytes, so that an answer
/// stays within a few MiB however large the messages.
pub const PAGE_TEXT_BYTES: usize = 1 << 20;

/// The `limit` query parameter: 1 to [`MAX_PAGE_EVENTS`], default
/// [`PAGE_EVENTS`].
pub fn limit_param(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    bounded_limit(q, PAGE_EVENTS, MAX_PAGE_EVENTS)
}

/// The `limit` query parameter: 1 to `max`, `default` when absent.
fn bounded_limit(
    q: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("`limit` must be 1 to {max}, got {v:?}"))),
    }
}

/// Most chats in one listing of the queue.
pub const MAX_QUEUE: usize = 1000;

/// The queue's `order` (`oldest`, the default, or `newest`) and `limit`
/// (1 to [`MAX_QUEUE`], all of it by default) query parameters.
pub fn queue_params(q: &HashMap<String, String>) -> Result<(crate::store::Order, usize), ApiError> {
    let order = match q.get("order") {
        None => crate::store::Order::Oldest,
        Some(v) => crate::store::Order::parse(v).ok_or_else(|| {
            ApiError::bad_request(format!("`order` must be oldest or newest, got {v:?}"))
        })?,
    };
    Ok((order, bounded_limit(q, MAX_QUEUE, MAX_QUEUE)?))
}

/// The `after` query parameter: a sequence number, 0 when absent.
pub fn after_param(q: &HashMap<String, String>) -> Result<u64, ApiError> {
    match q.get("after") {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            ApiError::bad_request(format!("`after` must be a sequence number, got {v:?}"))
        }),
    }
}

pub fn check_nickname(nickname: &str) -> Result<String, ApiError> {
    let n = nickname.trim();
    if n.is_empty() {
        return Err(ApiError::bad_request("`nickname` must not be empty"));
    }
    if n.len() > MAX_NICKNAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "`nickname` is longer than {MAX_NICKNAME_BYTES} bytes"
        )));
    }
    if let Some(c) = n.chars().find(|&c| c.is_control() || is_bidi_control(c)) {
        return Err(ApiError::bad_request(format!(
            "`nickname` may not contain control or text-direction characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(n.to_owned())
}

/// The characters that reorder how text around them is displayed (they
/// can make a nickname read as someone else's).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

pub fn check_text(text: &str) -> Result<(), ApiError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::too_large(format!(
            "`text` is {} bytes; the limit is {MAX_TEXT_BYTES}",
            text.len()
        )));
    }
    if text.trim().is_empty() {
        return Err(ApiError::bad_request("`text` must not be empty"));
    }
    // Newlines and tabs are text; NUL, ESC, BEL and the rest are not.
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
    {
        return Err(ApiError::bad_request(format!(
            "`text` may not contain control characters other than newline and tab (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

pub fn check_client_msg_id(id: &Option<String>) -> Result<(), ApiError> {
    match id {
        Some(id) if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID_BYTES => {
            Err(ApiError::bad_request(format!(
                "`client_msg_id` must be 1 to {MAX_CLIENT_MSG_ID_BYTES} bytes"
            )))
        }
        _ => Ok(()),
    }
}

/// Every error code an instance or a gateway answers with
/// (`{"error": {"code", "message"}}`): a gateway passes an instance's code
/// on only if it is one of these, so both sides speak one vocabulary.
pub const ERROR_CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "chat_closed",
    "conflict",
    "client_msg_id_reused",
    "participant_left",
    "transcript_full",
    "restoration_disabled",
    "too_large",
    "unsupported_media_type",
    "upgrade_required",
    "not_owner",
    "rate_limited",
    "internal",
    "store_corrupt",
    "instance_disabled",
    "store_unavailable",
    "save_failed",
    "no_instance",
    "upstream_timeout",
    "upstream_error",
];

/// `code` as one of [`ERROR_CODES`], if it is one.
pub fn error_code(code: &str) -> Option<&'static str> {
    ERROR_CODES.iter().find(|c| **c == code).copied()
}

/// The header that carries the cluster secret on every call to an
/// instance's internal API and channel (`Authorization` is the admin's and
/// the participants' on the same servers).
pub const CLUSTER_SECRET_HEADER: &str = "confab-cluster-secret";

/// Marks a request that arrived on an authenticated channel: the channel
/// checked the secret once, at its upgrade.
#[derive(Debug, Clone, Copy)]
pub struct ChannelAuthenticated;

/// The cluster secret, as a caller presents it and an instance checks it.
#[derive(Clone)]
pub struct ClusterSecret(std::sync::Arc<str>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(…)")
    }
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Self {
        ClusterSecret(secret.into())
    }

    /// The header value a caller sends.
    pub fn header_value(&self) -> axum::http::HeaderValue {
        axum::http::HeaderValue::from_str(&self.0)
            .unwrap_or_else(|_| axum::http::HeaderValue::from_static(""))
    }

    /// A WebSocket handshake request for `url` carrying the secret.
    pub fn websocket_request(
        &self,
        url: &str,
    ) -> Result<
        tokio_tungstenite::tungstenite::handshake::client::Request,
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert(CLUSTER_SECRET_HEADER, self.header_value());
        Ok(request)
    }

    /// Whether `headers` carry this secret (compared in constant time).
    pub fn admits(&self, headers: &axum::http::HeaderMap) -> bool {
        headers
            .get(CLUSTER_SECRET_HEADER)
            .is_some_and(|given| crate::auth::constant_time_eq(given.as_bytes(), self.0.as_bytes()))
    }
}

/// The internal chat routes (docs/internal-api.md): the instance's router
/// registers [`Route::pattern`], the gateway calls [`Route::path`]; both
/// come from this one table, so the two sides cannot drift apart.
pub mod internal {
    /// `POST` creates a chat; `GET ?state=waiting` lists waiting chats.
    pub const SESSIONS: &str = "/internal/v1/sessions";
    /// `GET ?after=CURSOR` on a gateway: its numbered events, for the
    /// dashboard (an [`super::EventsPage`]).
    pub const EVENTS: &str = "/internal/v1/events";

    /// The per-chat routes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Route {
        Join,
        Messages,
        Transcript,
        Stream,
        Leave,
        Restore,
        Location,
        FinalTranscript,
    }

    impl Route {
        pub const ALL: [Route; 8] = [
            Route::Join,
            Route::Messages,
            Route::Transcript,
            Route::Stream,
            Route::Leave,
            Route::Restore,
            Route::Location,
            Route::FinalTranscript,
        ];

        /// The router's pattern, `{id}` standing for the chat.
        pub const fn pattern(self) -> &'static str {
            match self {
                Route::Join => "/internal/v1/sessions/{id}/join",
                Route::Messages => "/internal/v1/sessions/{id}/messages",
                Route::Transcript => "/internal/v1/sessions/{id}/transcript",
                Route::Stream => "/internal/v1/sessions/{id}/ws",
                Route::Leave => "/internal/v1/sessions/{id}/leave",
                Route::Restore => "/internal/v1/sessions/{id}/restore",
                Route::Location => "/internal/v1/sessions/{id}/location",
                Route::FinalTranscript => "/internal/v1/sessions/{id}/final-transcript",
            }
        }

        /// The chat a path of this route names (not checked).
        pub fn chat_in(self, path: &str) -> Option<&str> {
            let (before, after) = self.pattern().split_once("{id}")?;
            path.strip_prefix(before)?.strip_suffix(after)
        }

        /// The path for one chat (its id is checked by the caller:
        /// [`super::check_chat_id`] allows no `/`, `?` or `%`).
        pub fn path(self, chat_id: &str) -> String {
            self.pattern().replace("{id}", chat_id)
        }
    }

    /// Waiting chats, from the session store: `limit` of them from the
    /// `order` end.
    pub fn waiting(order: crate::store::Order, limit: usize) -> String {
        format!(
            "{SESSIONS}?state=waiting&order={}&limit={limit}",
            order.as_str()
        )
    }

    /// A page of a chat's transcript, as participant `reader` may see it
    /// (an id from a signed token: [`super::reader_param`] checks it).
    pub fn transcript_page(chat_id: &str, after: u64, limit: usize, reader: &str) -> String {
        format!(
            "{}?after={after}&limit={limit}&reader={reader}",
            Route::Transcript.path(chat_id)
        )
    }

    /// Restore a chat on the instance asked, as its owner `failed` did not
    /// serve it (an instance id: letters, digits, `-`, `_`, `.`). The
    /// instance takes the chat only while the store names `failed` (or
    /// the instance itself) as its owner; restored elsewhere since, the
    /// answer names that owner and nothing changes.
    pub fn restore_from(chat_id: &str, failed: &str) -> String {
        format!("{}?from={failed}", Route::Restore.path(chat_id))
    }

    /// A page of a closed chat's final transcript from the contact store,
    /// whole (an agent's credential reads it).
    pub fn final_transcript_page(chat_id: &str, after: u64, limit: usize) -> String {
        format!(
            "{}?after={after}&limit={limit}",
            Route::FinalTranscript.path(chat_id)
        )
    }

    /// A chat's event stream from `after` on, for participant `reader`.
    pub fn stream(chat_id: &str, after: u64, reader: &str) -> String {
        format!(
            "{}?after={after}&reader={reader}",
            Route::Stream.path(chat_id)
        )
    }
}

/// The management routes every instance serves (docs/internal-api.md),
/// named once for the instance's router and its clients (the dashboard,
/// `confab up`).
pub mod paths {
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const STATUS: &str = "/status";
    pub const KPI: &str = "/kpi";
    pub const METRICS: &str = "/metrics";
    pub const ADMIN_DISABLE: &str = "/admin/disable";
    pub const ADMIN_ENABLE: &str = "/admin/enable";
    pub const ADMIN_KILL: &str = "/admin/kill";
    pub const ADMIN_EVENTS: &str = "/admin/events";
    /// `GET`: the chats hosted here, a page at a time.
    pub const ADMIN_SESSIONS: &str = "/admin/sessions";
    /// `GET`: one hosted chat's transcript, a page at a time.
    pub const ADMIN_TRANSCRIPT: &str = "/admin/sessions/{id}/transcript";

    /// [`ADMIN_TRANSCRIPT`] for one chat.
    pub fn admin_transcript(chat_id: &str) -> String {
        ADMIN_TRANSCRIPT.replace("{id}", chat_id)
    }
}

/// One chat hosted by an instance (`GET /admin/sessions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub session_id: String,
    pub state: String,
    pub created_at_ms: i64,
    /// Present now: nickname and role.
    pub participants: Vec<(String, String)>,
    /// Events in its transcript.
    pub events: u64,
}

/// `GET /admin/sessions?after=ID&limit=N`: hosted chats ordered by id,
/// after `ID`; `next` is the `after` of the following page, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionsPage {
    pub sessions: Vec<SessionSummary>,
    pub next: Option<String>,
}

/// One numbered log event (`GET /admin/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentEvent {
    /// Grows by one per event of this process: ask `?after=<cursor>`.
    pub cursor: u64,
    pub at_ms: u64,
    pub level: String,
    pub event_id: u32,
    pub message: String,
    /// The event's other fields, `name=value` separated by spaces.
    pub fields: String,
}

/// `GET /admin/events?after=CURSOR&limit=N`: the events after the cursor,
/// oldest first, and the cursor to ask from next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<RecentEvent>,
    pub next: u64,
}

/// An instance's `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub instance_id: String,
    pub enabled: bool,
    pub sessions_active: u64,
    /// Chats here that no agent has taken yet.
    #[serde(default)]
    pub sessions_waiting: u64,
    pub store: StoreStatus,
    pub version: String,
    pub pid: u32,
    #[serde(default)]
    pub uptime_s: u64,
    /// `POST /admin/kill` is on (`server.admin-kill-enabled`).
    #[serde(default)]
    pub admin_kill_enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub backend: String,
    pub available: bool,
    /// When the status last changed (59520 / 59521), Unix ms.
    #[serde(default)]
    pub changed_at_ms: Option<u64>,
}

/// An instance's `GET /kpi`, named as in the reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Kpi {
    pub session_created: u64,
    pub session_closed: u64,
    pub session_restored: u64,
    pub message_submitted: u64,
    pub transcript_saved: u64,
    pub transcript_save_failed: u64,
    pub sessions_active: u64,
}

/// A gateway's `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub component: String,
    pub version: String,
    pub pid: u32,
    /// Chats moved to another instance since the gateway started.
    #[serde(default)]
    pub failovers: u64,
    pub instances: Vec<GatewayMember>,
}

/// One instance as a gateway sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayMember {
    pub url: String,
    pub instance_id: Option<String>,
    pub healthy: bool,
    pub enabled: bool,
    pub sessions_active: i64,
    /// Requests go over an open channel (crate::channel), not HTTP.
    pub channel: bool,
}

#[cfg(test)]
mod route_tests {
    use super::internal::{self, Route};

    #[test]
    fn every_chat_route_is_under_sessions_and_takes_the_chat_id() {
        for route in Route::ALL {
            let path = route.path("c-1");
            assert!(
                path.starts_with(&format!("{}/c-1/", internal::SESSIONS)),
                "{path}"
            );
            assert!(!path.contains('{'), "{path}");
        }
        assert_eq!(
            internal::transcript_page("c", 3, 10, "p"),
            "/internal/v1/sessions/c/transcript?after=3&limit=10&reader=p"
        );
        assert_eq!(
            internal::stream("c", 0, "p"),
            "/internal/v1/sessions/c/ws?after=0&reader=p"
        );
        for route in Route::ALL {
            assert_eq!(route.chat_in(&route.path("c-1")), Some("c-1"));
        }
        assert_eq!(Route::Stream.chat_in("/internal/v1/sessions/c/join"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_direction_characters_are_refused() {
        assert!(check_text("two\nlines\tand a tab\r\n").is_ok());
        for bad in ["nul\0", "esc\u{1b}[31m", "bell\u{7}", "del\u{7f}"] {
            assert_eq!(check_text(bad).unwrap_err().status, 400, "{bad:?}");
        }
        assert!(check_nickname("Ann-Marie O'Neil").is_ok());
        assert!(check_nickname("Zoë 李").is_ok());
        for bad in ["evil\u{202E}gnp.exe", "a\u{2066}b", "tab\tname", "nl\nname"] {
            assert_eq!(check_nickname(bad).unwrap_err().status, 400, "{bad:?}");
        }
    }
}
