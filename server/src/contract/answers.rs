//! The bodies of the internal chat routes ([`super::internal`]), requests
//! and answers, as one set of types: the instance deserialises the requests
//! and serialises the answers, the gateway does the reverse with the same
//! structs, so neither side reads the other's JSON by field name.

use crate::session::{EventView, SessionState};
use crate::store::SessionRecord;
use serde::{Deserialize, Serialize};

/// `POST /internal/v1/sessions`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    pub nickname: String,
    #[serde(default)]
    pub subject: Option<String>,
}

/// `POST …/join`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSession {
    pub nickname: String,
}

/// `POST …/messages`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    pub participant_id: String,
    pub text: String,
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

/// `POST …/leave`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveSession {
    pub participant_id: String,
    #[serde(default)]
    pub end_chat: bool,
}

/// The answer to [`CreateSession`] (201).
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    pub session_id: String,
    pub intx: String,
    pub participant_id: String,
    pub instance_id: String,
    pub epoch: u64,
}

/// The answer to [`JoinSession`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Joined {
    pub participant_id: String,
}

/// The answer to [`PostMessage`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Posted {
    pub seq: u64,
    /// True when this `client_msg_id` had already been accepted: nothing was added.
    pub duplicate: bool,
}

/// The answer to [`LeaveSession`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Left {
    pub state: SessionState,
}

/// The answer to `POST …/restore`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Restored {
    pub session_id: String,
    pub instance_id: String,
    pub epoch: u64,
    /// False when the session was already live here and nothing changed.
    pub restored: bool,
}

/// A page of `GET …/transcript`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TranscriptView {
    pub chat_id: String,
    pub instance_id: String,
    pub state: SessionState,
    pub events: Vec<EventView>,
    /// Another page follows: ask again with `after` = the last seq here.
    pub more: bool,
    /// The reader (an agent) left this chat while it went on: their view
    /// ends at this seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at: Option<u64>,
}

/// A page of an instance's `GET /admin/sessions/{id}/transcript` (what the
/// dashboard shows of a hosted chat).
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminTranscript {
    pub chat_id: String,
    pub events: Vec<EventView>,
    pub more: bool,
}

/// `GET /internal/v1/sessions?state=…`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Sessions {
    pub sessions: Vec<SessionRecord>,
}

/// `GET …/location`: the stored header.
pub type Location = SessionRecord;

/// Every error answer, the gateway's and the instances':
/// `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
