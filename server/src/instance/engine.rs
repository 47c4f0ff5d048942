//! The chat server instance's engine: the state every operation shares,
//! and where a chat is when it is not live here. The operations live by
//! concern: [`super::messages`] (creating chats, joining, the durable
//! message path), [`super::closing`], [`super::restoration`] (and the
//! ownership sweep). HTTP handlers are thin wrappers over them.

use super::availability::StoreMonitor;
use super::error::{EngineError, EngineResult};
use super::live::{LiveSession, Registry};
use super::stats::{KpiView, Stats};
use crate::config::{AutoSave, Settings};
use crate::session::{Participant, SessionState, StateError, Transcript};
use crate::store::{ContactStore, SessionStore, StoreError};
use crate::telemetry::events;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What one chat may hold: a customer cannot make a chat (and the instance
/// that hosts it) grow without bound.
#[derive(Debug, Clone, Copy)]
pub struct TranscriptLimits {
    pub max_events: usize,
    pub max_text_bytes: usize,
}

pub struct Instance {
    pub id: String,
    pub settings: Settings,
    pub limits: TranscriptLimits,
    pub(super) store: Arc<dyn SessionStore>,
    pub(super) contacts: Arc<dyn ContactStore>,
    pub monitor: Arc<StoreMonitor>,
    pub(super) sessions: Registry,
    /// Restores in progress, so that two requests for one session claim once.
    pub(super) restoring: crate::keyed_lock::KeyedLocks,
    /// Chats closed after save errors whose closing is not stored yet. They
    /// answer "closed" here, never "not here": that would send the gateway
    /// to restore them elsewhere and bring a closed chat back.
    pub(super) closing: Arc<parking_lot::Mutex<HashSet<String>>>,
    enabled: AtomicBool,
    pub(super) stats: Stats,
    pub started: std::time::Instant,
}

impl Instance {
    pub fn new(
        id: String,
        settings: Settings,
        limits: TranscriptLimits,
        store: Arc<dyn SessionStore>,
        contacts: Arc<dyn ContactStore>,
        monitor: Arc<StoreMonitor>,
    ) -> Arc<Self> {
        Arc::new(Instance {
            id,
            settings,
            limits,
            store,
            contacts,
            monitor,
            sessions: Registry::default(),
            restoring: Default::default(),
            closing: Default::default(),
            enabled: AtomicBool::new(true),
            stats: Stats::new(),
            started: std::time::Instant::now(),
        })
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    pub fn sessions_active(&self) -> usize {
        self.sessions.len()
    }

    pub fn sessions_waiting(&self) -> usize {
        self.sessions.waiting()
    }

    pub fn set_enabled(&self, enabled: bool) {
        let was = self.enabled.swap(enabled, Ordering::SeqCst);
        self.stats.enabled(enabled);
        if was == enabled {
            return;
        }
        if enabled {
            tracing::info!(event_id = events::INSTANCE_ENABLED, instance = %self.id, "instance enabled: accepting new chats");
        } else {
            tracing::info!(
                event_id = events::INSTANCE_DISABLED,
                instance = %self.id,
                sessions = self.sessions_active(),
                "instance disabled: no new chats, current chats continue"
            );
            self.check_drained();
        }
    }

    pub fn kpi_view(&self) -> KpiView {
        self.stats.view(self.sessions_active())
    }

    pub(super) fn saves_enabled(&self) -> bool {
        self.settings.transcript_auto_save != AutoSave::Off
    }

    /// The live session, or why it is not here: not found, closed, or
    /// living (or to be restored) elsewhere.
    pub async fn live(&self, session_id: &str) -> EngineResult<Arc<LiveSession>> {
        if let Some(s) = self.sessions.get(session_id) {
            return Ok(s);
        }
        if self.closing.lock().contains(session_id) {
            return Err(EngineError::Closed(session_id.to_owned()));
        }
        match self.store.locate(session_id).await {
            // A closed chat's intermediate records are gone; its final
            // transcript tells it apart from a chat that never existed.
            Ok(None) => match self.contacts.final_transcript(session_id).await {
                Ok(Some(_)) => Err(EngineError::Closed(session_id.to_owned())),
                _ => Err(EngineError::NotFound(session_id.to_owned())),
            },
            Ok(Some(r)) if r.state == SessionState::Closed => {
                Err(EngineError::Closed(session_id.to_owned()))
            }
            Ok(Some(_)) => Err(EngineError::NotOwner(session_id.to_owned())),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// A store error as the engine reports it; a transient one also tells
    /// the availability monitor.
    pub(super) fn store_error(&self, e: StoreError) -> EngineError {
        if e.is_transient() {
            self.monitor.report_failure(&e);
        }
        EngineError::from(e)
    }

    /// Host `session` here.
    pub(super) fn host(&self, session: Arc<LiveSession>) {
        let n = self.sessions.insert(session);
        self.stats.sessions_hosted(n);
    }

    /// Stop hosting `session`: the number left, None if it was not here.
    pub(super) fn release(&self, session: &LiveSession) -> Option<usize> {
        let n = self.sessions.release(session)?;
        self.stats.sessions_hosted(n);
        Some(n)
    }

    /// Release a session that left for another instance (fenced, or found
    /// moved): counted out, as it was counted in when created or restored.
    pub(super) fn release_moved(&self, session: &LiveSession) {
        if self.release(session).is_some() {
            self.store.release(&session.id);
            self.stats.session_moved_away();
            self.check_drained();
        }
    }

    /// Release every session without touching the store (shutdown): they
    /// stay restorable elsewhere; WebSocket streams end.
    pub fn release_all(&self) {
        self.sessions.release_all();
        self.stats.sessions_hosted(0);
    }

    pub(super) fn check_drained(&self) {
        if !self.is_enabled() && self.sessions.is_empty() {
            tracing::info!(
                event_id = events::DRAIN_COMPLETE,
                instance = %self.id,
                "drain complete: disabled instance hosts no sessions (current sessions=0)"
            );
        }
    }
}

/// The participant `participant_id` of chat `session_id`, if they may act
/// in it now.
pub(super) fn participant(
    transcript: &Transcript,
    session_id: &str,
    participant_id: &str,
) -> EngineResult<Participant> {
    transcript
        .check_participant(participant_id)
        .cloned()
        .map_err(|e| state_error(session_id, e))
}

/// A refusal of the session state machine, for chat `session_id`.
pub(super) fn state_error(session_id: &str, e: StateError) -> EngineError {
    match e {
        StateError::Closed => EngineError::Closed(session_id.to_owned()),
        StateError::NotParticipant(participant) => EngineError::NotParticipant {
            chat: session_id.to_owned(),
            participant,
        },
    }
}
