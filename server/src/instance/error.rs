//! Why the engine refused or failed an operation, in the engine's own
//! terms. Only the HTTP layer (`routes`) turns these into status codes and
//! JSON; the engine knows nothing of HTTP.

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("chat {0} not found")]
    NotFound(String),
    #[error("chat {0} is closed")]
    Closed(String),
    /// The chat lives (or must be restored) on another instance: this one
    /// was fenced or never owned it. The gateway relocates on this answer.
    #[error("session {0} is not owned by this instance")]
    NotOwner(String),
    #[error("participant {participant} is not in chat {chat}")]
    NotParticipant { chat: String, participant: String },
    /// The participant left the chat: their token no longer posts in it.
    #[error("participant {participant} left chat {chat}")]
    Left { chat: String, participant: String },
    #[error("instance {instance} is disabled and {refused}")]
    Disabled {
        instance: String,
        refused: &'static str,
    },
    #[error("the session store is unavailable")]
    StoreUnavailable,
    /// Every save attempt failed; `transcript-save-on-error` was applied.
    #[error(
        "the message could not be saved and was not accepted; retry with the same client_msg_id"
    )]
    SaveFailed,
    #[error("session restoration is off on this instance (session-restoration-mode = none or transcript-auto-save = 0)")]
    RestorationDisabled,
    /// A `client_msg_id` already taken by another message (another sender
    /// or another text): not a retry, and not accepted.
    #[error("client_msg_id {0:?} belongs to another message in this chat; use a new id for a new message")]
    ClientMsgIdReused(String),
    /// The chat holds as many events or as much text as it may.
    #[error("chat {chat} is full ({events} events, {bytes} bytes of text); start a new chat")]
    TranscriptFull {
        chat: String,
        events: usize,
        bytes: usize,
    },
    /// The store refused in a way none of the above describes.
    #[error("{0}")]
    Conflict(String),
    /// What the store holds for the chat contradicts itself or cannot be
    /// read (the details go to the log, not to the client).
    #[error("the stored record of this chat is damaged; the instance's log has the details")]
    Corrupt,
}

impl EngineError {
    /// A chat that is closed or gone: no failure of this instance when a
    /// restore finds it so.
    pub fn is_closed_or_gone(&self) -> bool {
        matches!(self, EngineError::Closed(_) | EngineError::NotFound(_))
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => EngineError::NotFound(id),
            StoreError::Closed(id) => EngineError::Closed(id),
            StoreError::Fenced { session_id, .. } => EngineError::NotOwner(session_id),
            e @ (StoreError::AlreadyExists(_) | StoreError::Conflict(_)) => {
                EngineError::Conflict(e.to_string())
            }
            StoreError::Corrupt(what) => {
                tracing::error!(error = %what, "the session or contact store holds a damaged record");
                EngineError::Corrupt
            }
            StoreError::Unavailable(reason) => {
                tracing::warn!(error = %reason, "session store unavailable");
                EngineError::StoreUnavailable
            }
        }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;
