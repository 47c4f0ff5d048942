//! The sessions this instance hosts now: each one's in-memory transcript
//! behind its own lock (one session's events are saved in order), a push
//! channel for its WebSocket readers, and the registry that maps chat ids
//! to them.

use super::error::EngineResult;
use crate::session::{EventView, SessionState, Transcript};
use crate::store::SessionRecord;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{broadcast, Mutex};
use tokio_util::sync::CancellationToken;

/// Pushed events buffered per session for slow WebSocket readers; a reader
/// that falls further behind catches up from the transcript.
const PUSH_BUFFER: usize = 32;

/// One session hosted by this instance.
pub struct LiveSession {
    pub id: String,
    pub intx: String,
    pub subject: Option<String>,
    pub created_at_ms: i64,
    pub(super) inner: Mutex<Live>,
    push: broadcast::Sender<Arc<EventView>>,
    /// Cancelled when this instance stops hosting the session (closed,
    /// moved, shutdown): its WebSocket streams end.
    pub gone: CancellationToken,
}

/// The mutable part of a live session, behind its lock.
pub(super) struct Live {
    pub epoch: u64,
    pub transcript: Transcript,
    /// Events whose save was given up with its outcome unknown (they may
    /// have been stored): resent, identical, before anything else is
    /// written, since a (seq, epoch) key once tried never takes other
    /// content (cassandra/README.md, "Fencing").
    pub unsettled: Vec<crate::session::Event>,
}

impl LiveSession {
    pub(super) fn new(record: &SessionRecord, transcript: Transcript) -> Arc<Self> {
        let (push, _) = broadcast::channel(PUSH_BUFFER);
        Arc::new(LiveSession {
            id: record.session_id.clone(),
            intx: record.intx.clone(),
            subject: record.subject.clone(),
            created_at_ms: record.created_at_ms,
            inner: Mutex::new(Live {
                epoch: record.epoch,
                transcript,
                unsettled: Vec::new(),
            }),
            push,
            gone: CancellationToken::new(),
        })
    }

    /// A receiver for everything pushed from now on, and whether the chat
    /// is closed already. A reader sends the stored events page by page
    /// ([`LiveSession::page`]) while the receiver holds what comes meanwhile,
    /// so it never holds more than a page of the backlog.
    pub async fn subscribe(&self) -> (broadcast::Receiver<Arc<EventView>>, bool) {
        let live = self.inner.lock().await;
        (
            self.push.subscribe(),
            live.transcript.state == SessionState::Closed,
        )
    }

    /// How far participant `reader` may read (`Transcript::read_limit`).
    pub async fn read_limit(&self, reader: &str) -> EngineResult<Option<u64>> {
        let live = self.inner.lock().await;
        live.transcript
            .read_limit(reader)
            .map_err(|e| super::engine::state_error(&self.id, e))
    }

    /// Up to `limit` stored events after `after`, ending after about
    /// `max_bytes` of text (see [`Transcript::page`]); and whether more
    /// follow.
    pub async fn page(&self, after: u64, limit: usize, max_bytes: usize) -> (Vec<EventView>, bool) {
        let live = self.inner.lock().await;
        let (page, more) = live.transcript.page(after, limit, max_bytes);
        (page.iter().map(EventView::from).collect(), more)
    }

    /// What the dashboard lists about it.
    pub async fn summary(&self) -> crate::contract::SessionSummary {
        let live = self.inner.lock().await;
        let t = &live.transcript;
        crate::contract::SessionSummary {
            session_id: self.id.clone(),
            state: t.state.as_str().to_owned(),
            created_at_ms: self.created_at_ms,
            participants: t
                .present
                .values()
                .map(|p| (p.nickname.clone(), p.role.as_str().to_owned()))
                .collect(),
            events: t.last_seq(),
        }
    }

    pub(super) async fn epoch(&self) -> u64 {
        self.inner.lock().await.epoch
    }

    pub(super) fn has_listeners(&self) -> bool {
        self.push.receiver_count() > 0
    }

    pub(super) fn publish(&self, views: impl IntoIterator<Item = EventView>) {
        if !self.has_listeners() {
            return;
        }
        for v in views {
            // No receiver is fine: nobody is connected by WebSocket.
            let _ = self.push.send(Arc::new(v));
        }
    }
}

/// Chat id → the session hosted here.
#[derive(Default)]
pub struct Registry {
    sessions: RwLock<HashMap<String, Arc<LiveSession>>>,
}

impl Registry {
    pub fn get(&self, session_id: &str) -> Option<Arc<LiveSession>> {
        self.sessions.read().get(session_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.sessions.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ids(&self) -> Vec<String> {
        self.sessions.read().keys().cloned().collect()
    }

    /// Up to `limit` sessions with ids after `after`, by id; and whether
    /// more follow.
    pub fn page(&self, after: &str, limit: usize) -> (Vec<Arc<LiveSession>>, bool) {
        let map = self.sessions.read();
        let mut ids: Vec<&String> = map.keys().filter(|id| id.as_str() > after).collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        let page = ids
            .into_iter()
            .take(limit)
            .filter_map(|id| map.get(id).cloned())
            .collect();
        (page, more)
    }

    /// Chats here that no agent has taken yet. A chat busy right now (its
    /// lock held) is not counted: this feeds a once-a-second view.
    pub fn waiting(&self) -> usize {
        self.sessions
            .read()
            .values()
            .filter(|s| {
                s.inner
                    .try_lock()
                    .is_ok_and(|l| l.transcript.state == crate::session::SessionState::Waiting)
            })
            .count()
    }

    /// Host `session`; the number of sessions hosted now.
    pub fn insert(&self, session: Arc<LiveSession>) -> usize {
        let mut map = self.sessions.write();
        map.insert(session.id.clone(), session);
        map.len()
    }

    /// Stop hosting `session` (this very one: a newer restore of the same
    /// chat stays) and end its streams. The number of sessions left, or
    /// None if it was not here.
    pub fn release(&self, session: &LiveSession) -> Option<usize> {
        let mut map = self.sessions.write();
        let here = map
            .get(&session.id)
            .is_some_and(|s| std::ptr::eq(s.as_ref(), session));
        if !here {
            return None;
        }
        if let Some(s) = map.remove(&session.id) {
            s.gone.cancel();
        }
        Some(map.len())
    }

    /// Stop hosting every session (shutdown) and end their streams.
    pub fn release_all(&self) {
        for (_, s) in self.sessions.write().drain() {
            s.gone.cancel();
        }
    }
}
