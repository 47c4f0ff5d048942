//! What the engine answers, serialised as-is as the internal API's JSON
//! bodies.

use crate::session::{EventView, SessionState};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Created {
    pub session_id: String,
    pub intx: String,
    pub participant_id: String,
    pub instance_id: String,
    pub epoch: u64,
}

#[derive(Debug, Serialize)]
pub struct Posted {
    pub seq: u64,
    /// True when this `client_msg_id` had already been accepted: nothing was added.
    pub duplicate: bool,
}

#[derive(Debug, Serialize)]
pub struct Restored {
    pub session_id: String,
    pub instance_id: String,
    pub epoch: u64,
    /// False when the session was already live here and nothing changed.
    pub restored: bool,
}

#[derive(Debug, Serialize)]
pub struct TranscriptView {
    pub chat_id: String,
    pub instance_id: String,
    pub state: SessionState,
    pub events: Vec<EventView>,
    /// Another page follows: ask again with `after` = the last seq here.
    pub more: bool,
}
