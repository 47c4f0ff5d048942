//! Where sessions live between messages: the session store (intermediate
//! transcripts, one row per event, ownership with a fencing epoch) and the
//! contact store (final transcripts of closed chats). Backends sit behind
//! traits so the instance does not know which one it talks to.

use crate::session::{Event, SessionState};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod cassandra;
pub mod sqlite;
#[cfg(any(test, feature = "store-suite"))]
pub mod suite;

/// The stored header of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    pub intx: String,
    /// Instance that owns the session now (its location).
    pub owner_instance: String,
    /// Fencing token: bumped by every change of owner. Appends carry the
    /// epoch their writer believes current and are refused otherwise.
    pub epoch: u64,
    pub state: SessionState,
    pub subject: Option<String>,
    /// The customer's nickname, stored with the header at creation so that
    /// a listing (the agents' queue) needs no read of the transcript. None
    /// for a session stored by a version without the column.
    #[serde(default)]
    pub nickname: Option<String>,
    pub created_at_ms: i64,
}

/// Which end of a listing comes first: the agents' queue is read from both,
/// so that a flood of new chats cannot hide the oldest ones, nor a backlog
/// the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Oldest,
    Newest,
}

impl Order {
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Oldest => "oldest",
            Order::Newest => "newest",
        }
    }

    pub fn parse(s: &str) -> Option<Order> {
        match s {
            "oldest" => Some(Order::Oldest),
            "newest" => Some(Order::Newest),
            _ => None,
        }
    }
}

/// Events to add to one session, written only if `epoch` is still current.
#[derive(Debug, Clone)]
pub struct Append {
    pub session_id: String,
    pub epoch: u64,
    pub events: Vec<Event>,
    /// The session's state once these events are applied.
    pub state: SessionState,
}

/// A closed chat's final transcript, as the contact store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalTranscript {
    pub session_id: String,
    pub intx: String,
    pub closed_at_ms: i64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("session {0} not found")]
    NotFound(String),
    #[error("session {session_id} now belongs to epoch {current}; a write with epoch {attempted} is refused")]
    Fenced {
        session_id: String,
        attempted: u64,
        current: u64,
    },
    #[error("session {0} is closed")]
    Closed(String),
    #[error("session {0} already exists")]
    AlreadyExists(String),
    #[error("event conflicts with a stored event: {0}")]
    Conflict(String),
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// The stored history contradicts itself (a gap below a completed
    /// claim's cut: a row lost or expired): the chat cannot be taken over
    /// without losing acknowledged events.
    #[error("session history corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Errors worth retrying (`transcript-resend-attempts`): the store may
    /// answer next time. Fencing, closure and conflicts are final.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// `events` without any event whose `client_msg_id` an earlier one
/// carries: a store that does not refuse a reused id at write time keeps
/// the first on reading.
pub(crate) fn first_of_each_client_msg_id(events: Vec<Event>) -> Vec<Event> {
    let mut seen = std::collections::HashSet::new();
    events
        .into_iter()
        .filter(|e| {
            e.client_msg_id
                .as_ref()
                .is_none_or(|c| seen.insert(c.clone()))
        })
        .collect()
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// "sqlite" or "cassandra": the `store` label of the metrics.
    fn backend(&self) -> &'static str;

    /// Whether a write that failed as unavailable (a timeout) may have been
    /// applied all the same. Then the owner resends exactly those events
    /// before writing anything else (their keys are taken). SQLite rolls a
    /// failed transaction back: no.
    fn failed_writes_may_land(&self) -> bool {
        false
    }

    /// Create a session owned by `record.owner_instance` at `record.epoch`,
    /// with its first events.
    async fn create_session(&self, record: SessionRecord, events: Vec<Event>) -> StoreResult<()>;

    /// Append events if `append.epoch` is the session's current epoch. The
    /// events' sequence numbers must be new: nothing stored is overwritten.
    async fn append_events(&self, append: Append) -> StoreResult<()>;

    /// Take ownership for `new_owner`: bump the epoch, record the new
    /// location, and return the session with its whole transcript.
    async fn claim(
        &self,
        session_id: &str,
        new_owner: &str,
    ) -> StoreResult<(SessionRecord, Vec<Event>)>;

    /// The session header alone (where it lives now).
    async fn locate(&self, session_id: &str) -> StoreResult<Option<SessionRecord>>;

    /// The session and its transcript, without changing anything.
    async fn load(&self, session_id: &str) -> StoreResult<Option<(SessionRecord, Vec<Event>)>>;

    /// Sessions in `state` (all when None), by creation time in `order`,
    /// at most `limit`.
    async fn list_sessions(
        &self,
        state: Option<SessionState>,
        order: Order,
        limit: usize,
    ) -> StoreResult<Vec<SessionRecord>>;

    /// Remove a session and its events (after the final transcript is
    /// stored), if `epoch` is still current.
    async fn delete_session(&self, session_id: &str, epoch: u64) -> StoreResult<()>;

    /// A cheap round trip, for availability probes.
    async fn ping(&self) -> StoreResult<()>;

    /// This handle will not write `session_id` again (it moved to another
    /// instance): forget what is kept in memory for it.
    fn release(&self, _session_id: &str) {}

    /// Owner and epoch of each of `session_ids` that still exists (the
    /// instance's ownership sweep). One `locate` each unless a backend can
    /// do better.
    async fn owners(
        &self,
        session_ids: &[String],
    ) -> StoreResult<std::collections::HashMap<String, (String, u64)>> {
        let mut out = std::collections::HashMap::new();
        for id in session_ids {
            if let Some(r) = self.locate(id).await? {
                out.insert(id.clone(), (r.owner_instance, r.epoch));
            }
        }
        Ok(out)
    }
}

#[async_trait]
pub trait ContactStore: Send + Sync + 'static {
    /// Store a final transcript; storing the same session twice keeps the first.
    async fn save_final_transcript(&self, transcript: FinalTranscript) -> StoreResult<()>;
    async fn final_transcript(&self, session_id: &str) -> StoreResult<Option<FinalTranscript>>;
}

/// An instance as it registers itself in the session store, so that
/// gateways find every instance without a list of URLs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub instance_id: String,
    /// Where others reach it (`server.advertise-url`).
    pub url: String,
    /// Takes new chats (not drained).
    pub enabled: bool,
    /// When it last wrote this, by its own clock (ms since the Unix epoch).
    /// Readers judge freshness by whether it changes, not by comparing
    /// clocks.
    pub heartbeat_ms: i64,
}

/// The instances' registry, kept in the session store.
#[async_trait]
pub trait InstanceRegistry: Send + Sync + 'static {
    /// Write (or overwrite) an instance's registration.
    async fn register(&self, registration: &Registration) -> StoreResult<()>;
    /// Every registration, live or not: readers decide which are fresh.
    async fn registrations(&self) -> StoreResult<Vec<Registration>>;
}

/// The instances' registry of the session store `config` names (its
/// `[server]` store options and `[cassandra]`), for a gateway to discover
/// instances with.
pub async fn open_registry(
    config: std::sync::Arc<crate::config::Config>,
) -> anyhow::Result<std::sync::Arc<dyn InstanceRegistry>> {
    use anyhow::Context;
    let server = &config.server;
    Ok(match server.store {
        crate::config::StoreBackend::Cassandra => std::sync::Arc::new(
            cassandra::registry::CassandraRegistry::new(
                cassandra::open_session(&config.cassandra).await?,
                &config.cassandra,
            )
            .await?,
        ),
        crate::config::StoreBackend::Sqlite => std::sync::Arc::new(
            sqlite::SqliteRegistry::open(&server.sqlite_path, sqlite::SqliteOptions::of(server))
                .with_context(|| {
                    format!("opening the registry in {}", server.sqlite_path.display())
                })?,
        ),
    })
}
