//! The chat server instance's engine: live sessions, the durable message
//! path, restoration and closing. HTTP handlers are thin wrappers over it.

use super::availability::StoreMonitor;
use crate::config::{AutoSave, SaveOnError, Settings};
use crate::error::ApiError;
use crate::session::{
    now_ms, reason, Draft, Event, EventKind, EventView, Participant, Role, SessionState,
    StateError, Transcript,
};
use crate::store::{
    Append, ContactStore, FinalTranscript, SessionRecord, SessionStore, StoreError,
};
use crate::telemetry::{events, metrics as m};
use parking_lot::RwLock;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
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
    inner: Mutex<Live>,
    push: broadcast::Sender<Arc<EventView>>,
    /// Cancelled when this instance stops hosting the session (closed,
    /// moved, shutdown): its WebSocket streams end.
    pub gone: CancellationToken,
}

struct Live {
    epoch: u64,
    transcript: Transcript,
}

impl LiveSession {
    fn new(record: &SessionRecord, transcript: Transcript) -> Arc<Self> {
        let (push, _) = broadcast::channel(PUSH_BUFFER);
        Arc::new(LiveSession {
            id: record.session_id.clone(),
            intx: record.intx.clone(),
            subject: record.subject.clone(),
            created_at_ms: record.created_at_ms,
            inner: Mutex::new(Live {
                epoch: record.epoch,
                transcript,
            }),
            push,
            gone: CancellationToken::new(),
        })
    }

    /// Events after `after` and a receiver for everything pushed later,
    /// taken under one lock so that nothing falls between them.
    pub async fn subscribe(
        &self,
        after: u64,
    ) -> (Vec<EventView>, broadcast::Receiver<Arc<EventView>>, bool) {
        let live = self.inner.lock().await;
        let backlog = live
            .transcript
            .after(after)
            .iter()
            .map(EventView::from)
            .collect();
        (
            backlog,
            self.push.subscribe(),
            live.transcript.state == SessionState::Closed,
        )
    }

    pub async fn events_after(&self, after: u64) -> Vec<EventView> {
        let live = self.inner.lock().await;
        live.transcript
            .after(after)
            .iter()
            .map(EventView::from)
            .collect()
    }

    fn has_listeners(&self) -> bool {
        self.push.receiver_count() > 0
    }

    fn publish(&self, views: impl IntoIterator<Item = EventView>) {
        if !self.has_listeners() {
            return;
        }
        for v in views {
            // No receiver is fine: nobody is connected by WebSocket.
            let _ = self.push.send(Arc::new(v));
        }
    }
}

#[derive(Debug, Default)]
pub struct Kpi {
    pub session_created: AtomicU64,
    pub session_closed: AtomicU64,
    pub session_restored: AtomicU64,
    pub message_submitted: AtomicU64,
    pub transcript_saved: AtomicU64,
    pub transcript_save_failed: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct KpiView {
    pub session_created: u64,
    pub session_closed: u64,
    pub session_restored: u64,
    pub message_submitted: u64,
    pub transcript_saved: u64,
    pub transcript_save_failed: u64,
    pub sessions_active: u64,
}

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
}

pub struct Instance {
    pub id: String,
    pub settings: Settings,
    store: Arc<dyn SessionStore>,
    contacts: Arc<dyn ContactStore>,
    pub monitor: Arc<StoreMonitor>,
    sessions: RwLock<HashMap<String, Arc<LiveSession>>>,
    /// Restores in progress, so that two requests for one session claim once.
    restoring: crate::keyed_lock::KeyedLocks,
    /// Chats closed after save errors whose closing is not stored yet. They
    /// answer "closed" here, never "not here": that would send the gateway
    /// to restore them elsewhere and bring a closed chat back.
    closing: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
    enabled: AtomicBool,
    pub kpi: Kpi,
}

impl Instance {
    pub fn new(
        id: String,
        settings: Settings,
        store: Arc<dyn SessionStore>,
        contacts: Arc<dyn ContactStore>,
        monitor: Arc<StoreMonitor>,
    ) -> Arc<Self> {
        metrics::gauge!(m::INSTANCE_ENABLED).set(1.0);
        metrics::gauge!(m::SESSIONS_ACTIVE).set(0.0);
        for result in ["ok", "error"] {
            metrics::counter!(m::TRANSCRIPT_SAVES, "result" => result).absolute(0);
        }
        metrics::counter!(m::SESSIONS_CREATED).absolute(0);
        metrics::counter!(m::SESSIONS_CLOSED).absolute(0);
        metrics::counter!(m::SESSIONS_RESTORED).absolute(0);
        metrics::counter!(m::MESSAGES_SUBMITTED).absolute(0);
        metrics::counter!(m::RESTORE_FAILURES).absolute(0);
        metrics::counter!(m::TRANSCRIPT_SAVE_FAILURES).absolute(0);
        Arc::new(Instance {
            id,
            settings,
            store,
            contacts,
            monitor,
            sessions: RwLock::new(HashMap::new()),
            restoring: Default::default(),
            closing: Default::default(),
            enabled: AtomicBool::new(true),
            kpi: Kpi::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    pub fn sessions_active(&self) -> usize {
        self.sessions.read().len()
    }

    pub fn set_enabled(&self, enabled: bool) {
        let was = self.enabled.swap(enabled, Ordering::SeqCst);
        metrics::gauge!(m::INSTANCE_ENABLED).set(if enabled { 1.0 } else { 0.0 });
        if was != enabled {
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
    }

    pub fn kpi_view(&self) -> KpiView {
        let k = &self.kpi;
        KpiView {
            session_created: k.session_created.load(Ordering::Relaxed),
            session_closed: k.session_closed.load(Ordering::Relaxed),
            session_restored: k.session_restored.load(Ordering::Relaxed),
            message_submitted: k.message_submitted.load(Ordering::Relaxed),
            transcript_saved: k.transcript_saved.load(Ordering::Relaxed),
            transcript_save_failed: k.transcript_save_failed.load(Ordering::Relaxed),
            sessions_active: self.sessions_active() as u64,
        }
    }

    fn saves_enabled(&self) -> bool {
        self.settings.transcript_auto_save != AutoSave::Off
    }

    /// The live session, or why it is not here: 404 if it does not exist,
    /// 409 if closed, 421 if it lives (or must be restored) elsewhere.
    pub async fn live(&self, session_id: &str) -> Result<Arc<LiveSession>, ApiError> {
        if let Some(s) = self.sessions.read().get(session_id) {
            return Ok(s.clone());
        }
        if self.closing.lock().contains(session_id) {
            return Err(ApiError::closed(session_id));
        }
        match self.store.locate(session_id).await {
            // A closed chat's intermediate records are gone; its final
            // transcript tells it apart from a chat that never existed.
            Ok(None) => match self.contacts.final_transcript(session_id).await {
                Ok(Some(_)) => Err(ApiError::closed(session_id)),
                _ => Err(ApiError::not_found(format!("chat {session_id} not found"))),
            },
            Ok(Some(r)) if r.state == SessionState::Closed => Err(ApiError::closed(session_id)),
            Ok(Some(_)) => Err(ApiError::not_owner(session_id)),
            Err(e) => Err(self.store_error(e)),
        }
    }

    fn store_error(&self, e: StoreError) -> ApiError {
        if e.is_transient() {
            self.monitor.report_failure(&e);
        }
        ApiError::from(e)
    }

    fn insert_live(&self, session: Arc<LiveSession>) {
        let mut map = self.sessions.write();
        map.insert(session.id.clone(), session);
        metrics::gauge!(m::SESSIONS_ACTIVE).set(map.len() as f64);
    }

    /// Stop hosting `session` (this very one: a newer restore of the same
    /// chat stays). The number of sessions left, or None if it was not here.
    fn remove_live(&self, session: &LiveSession) -> Option<usize> {
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
        let n = map.len();
        metrics::gauge!(m::SESSIONS_ACTIVE).set(n as f64);
        Some(n)
    }

    /// A session left for another instance (fenced, or found moved): the
    /// KPI difference `session_created - session_closed` counts it out, as
    /// it counted it in when this instance created or restored it.
    fn let_go(&self, session: &LiveSession) {
        if self.remove_live(session).is_some() {
            self.kpi.session_closed.fetch_add(1, Ordering::Relaxed);
            self.check_drained();
        }
    }

    fn check_drained(&self) {
        if !self.is_enabled() && self.sessions_active() == 0 {
            tracing::info!(
                event_id = events::DRAIN_COMPLETE,
                instance = %self.id,
                "drain complete: disabled instance hosts no sessions (current sessions=0)"
            );
        }
    }

    #[tracing::instrument(level = "debug", skip(self, nickname, subject), fields(chat_id))]
    pub async fn create_session(
        &self,
        nickname: String,
        subject: Option<String>,
    ) -> Result<Created, ApiError> {
        if !self.is_enabled() {
            return Err(ApiError::unavailable(
                "instance_disabled",
                format!("instance {} is disabled and accepts no new chats", self.id),
            ));
        }
        if !self.monitor.is_available() {
            return Err(ApiError::unavailable(
                "store_unavailable",
                "the session store is unavailable",
            ));
        }
        let record = SessionRecord {
            session_id: uuid::Uuid::new_v4().simple().to_string(),
            intx: uuid::Uuid::new_v4().simple().to_string(),
            owner_instance: self.id.clone(),
            epoch: 1,
            state: SessionState::Waiting,
            subject,
            created_at_ms: now_ms(),
        };
        tracing::Span::current().record("chat_id", record.session_id.as_str());
        let customer = Participant {
            participant_id: uuid::Uuid::new_v4().simple().to_string(),
            nickname,
            role: Role::Customer,
        };
        let joined = Draft::joined(&customer, None).into_event(1, record.created_at_ms);
        // The header is stored even with auto-save off: it is the chat's
        // location for the gateway. Events are saved only with auto-save on.
        let stored_events = if self.saves_enabled() {
            vec![joined.clone()]
        } else {
            vec![]
        };
        let start = Instant::now();
        self.store
            .create_session(record.clone(), stored_events)
            .await
            .map_err(|e| self.store_error(e))?;
        self.record_save(start, &Ok(()));
        let mut transcript = Transcript::new();
        transcript.push(joined);
        let session = LiveSession::new(&record, transcript);
        self.insert_live(session);
        self.kpi.session_created.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::SESSIONS_CREATED).increment(1);
        tracing::info!(
            event_id = events::SESSION_CREATED,
            sid = %record.session_id,
            intx = %record.intx,
            "session created (current sessions={})",
            self.sessions_active()
        );
        Ok(Created {
            session_id: record.session_id,
            intx: record.intx,
            participant_id: customer.participant_id,
            instance_id: self.id.clone(),
            epoch: record.epoch,
        })
    }

    #[tracing::instrument(level = "debug", skip(self, nickname), fields(chat_id = %session_id))]
    pub async fn join(&self, session_id: &str, nickname: String) -> Result<Participant, ApiError> {
        let session = self.live(session_id).await?;
        let mut live = session.inner.lock().await;
        live.transcript
            .check_open()
            .map_err(|e| state_error(session_id, e))?;
        let agent = Participant {
            participant_id: uuid::Uuid::new_v4().simple().to_string(),
            nickname,
            role: Role::Agent,
        };
        self.append(&session, &mut live, vec![Draft::joined(&agent, None)])
            .await?;
        Ok(agent)
    }

    #[tracing::instrument(level = "debug", skip(self, text, client_msg_id), fields(chat_id = %session_id))]
    pub async fn post_message(
        &self,
        session_id: &str,
        participant_id: &str,
        text: String,
        client_msg_id: Option<String>,
    ) -> Result<Posted, ApiError> {
        let session = self.live(session_id).await?;
        let mut live = session.inner.lock().await;
        let participant = live
            .transcript
            .check_participant(participant_id)
            .map_err(|e| state_error(session_id, e))?
            .clone();
        if let Some(seq) = client_msg_id
            .as_ref()
            .and_then(|c| live.transcript.client_ids.get(c))
        {
            return Ok(Posted {
                seq: *seq,
                duplicate: true,
            });
        }
        let events = self
            .append(
                &session,
                &mut live,
                vec![Draft::message(&participant, text, client_msg_id)],
            )
            .await?;
        self.kpi.message_submitted.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::MESSAGES_SUBMITTED).increment(1);
        Ok(Posted {
            seq: events.last().map(|e| e.seq).unwrap_or(0),
            duplicate: false,
        })
    }

    pub async fn transcript(
        &self,
        session_id: &str,
        after: u64,
    ) -> Result<TranscriptView, ApiError> {
        let session = self.live(session_id).await?;
        let live = session.inner.lock().await;
        Ok(TranscriptView {
            chat_id: session_id.to_owned(),
            instance_id: self.id.clone(),
            state: live.transcript.state,
            events: live
                .transcript
                .after(after)
                .iter()
                .map(EventView::from)
                .collect(),
        })
    }

    /// A participant leaves. The chat closes when the customer leaves or an
    /// agent ends it.
    #[tracing::instrument(level = "debug", skip(self), fields(chat_id = %session_id))]
    pub async fn leave(
        &self,
        session_id: &str,
        participant_id: &str,
        end_chat: bool,
    ) -> Result<SessionState, ApiError> {
        let session = self.live(session_id).await?;
        let mut live = session.inner.lock().await;
        let participant = live
            .transcript
            .check_participant(participant_id)
            .map_err(|e| state_error(session_id, e))?
            .clone();
        let closes = participant.role == Role::Customer || end_chat;
        if !closes {
            if live.transcript.present.contains_key(participant_id) {
                self.append(
                    &session,
                    &mut live,
                    vec![Draft::left(&participant, reason::LEFT)],
                )
                .await?;
            }
            return Ok(live.transcript.state);
        }
        let why = if participant.role == Role::Customer {
            reason::CUSTOMER_LEFT
        } else {
            reason::AGENT_ENDED
        };
        let mut drafts = Vec::new();
        if live.transcript.present.contains_key(participant_id) {
            drafts.push(Draft::left(&participant, reason::LEFT));
        }
        drafts.push(Draft::closed(why));
        self.append(&session, &mut live, drafts).await?;
        self.finish_close(&session, &live).await;
        Ok(SessionState::Closed)
    }

    /// After the `closed` event is saved: final transcript to the contact
    /// store, intermediate rows deleted, event 59245.
    async fn finish_close(&self, session: &LiveSession, live: &Live) {
        let final_transcript = FinalTranscript {
            session_id: session.id.clone(),
            intx: session.intx.clone(),
            closed_at_ms: now_ms(),
            events: live.transcript.events.clone(),
        };
        let mut saved = false;
        for attempt in 0..=self.settings.transcript_resend_attempts {
            match self
                .contacts
                .save_final_transcript(final_transcript.clone())
                .await
            {
                Ok(()) => {
                    saved = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(event_id = events::SAVE_RETRY, sid = %session.id, attempt, error = %e, "final transcript save failed");
                    tokio::time::sleep(self.settings.transcript_resend_delay).await;
                }
            }
        }
        if saved {
            // Intermediate records go only once the final transcript is safe.
            if let Err(e) = self.store.delete_session(&session.id, live.epoch).await {
                tracing::warn!(sid = %session.id, error = %e, "could not delete intermediate records of a closed session");
            }
        } else {
            tracing::error!(event_id = events::SAVE_FAILED, sid = %session.id, "final transcript not stored yet; retrying in the background, intermediate records kept");
            self.spawn_final_save(final_transcript, live.epoch);
        }
        self.retire(session);
    }

    /// Forget a closed session and count it.
    fn retire(&self, session: &LiveSession) {
        let Some(current) = self.remove_live(session) else {
            // Closed before it went live here (a restore whose first save failed).
            return;
        };
        self.kpi.session_closed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::SESSIONS_CLOSED).increment(1);
        tracing::info!(
            event_id = events::SESSION_DELETED,
            sid = %session.id,
            intx = %session.intx,
            "deleting session with sid={} and intx={} (current sessions={})",
            session.id,
            session.intx,
            current
        );
        self.check_drained();
    }

    /// Give `drafts` their sequence numbers, save them (auto-save), then
    /// apply and push them. Called with the session's lock held, so one
    /// session's events are saved in order; different sessions' saves share
    /// store transactions (group commit).
    async fn append(
        &self,
        session: &LiveSession,
        live: &mut Live,
        drafts: Vec<Draft>,
    ) -> Result<Vec<Event>, ApiError> {
        let at = now_ms();
        let first = live.transcript.next_seq();
        let mut state = live.transcript.state;
        let mut events = Vec::with_capacity(drafts.len());
        for (i, d) in drafts.into_iter().enumerate() {
            state = match d.kind {
                EventKind::Closed => SessionState::Closed,
                EventKind::Joined
                    if d.role == Some(Role::Agent) && state != SessionState::Closed =>
                {
                    SessionState::Active
                }
                _ => state,
            };
            events.push(d.into_event(first + i as u64, at));
        }
        if self.saves_enabled() {
            self.save(session, live, &events, state).await?;
        }
        let last_seq = events.last().map(|e| e.seq).unwrap_or(0);
        if session.has_listeners() {
            session.publish(events.iter().map(EventView::from).collect::<Vec<_>>());
        }
        for e in &events {
            live.transcript.push(e.clone());
        }
        if self.settings.transcript_auto_save == AutoSave::SaveAndNotify {
            session.publish([notice(last_seq, reason::SAVE, "transcript saved")]);
        }
        Ok(events)
    }

    /// Save with `transcript-resend-attempts` retries `transcript-resend-delay`
    /// apart; then act per `transcript-save-on-error`.
    async fn save(
        &self,
        session: &LiveSession,
        live: &mut Live,
        events: &[Event],
        state: SessionState,
    ) -> Result<(), ApiError> {
        let attempts = self.settings.transcript_resend_attempts;
        let mut last_error = None;
        for attempt in 0..=attempts {
            if attempt > 0 {
                tokio::time::sleep(self.settings.transcript_resend_delay).await;
            }
            let start = Instant::now();
            let result = self
                .store
                .append_events(Append {
                    session_id: session.id.clone(),
                    epoch: live.epoch,
                    events: events.to_vec(),
                    state,
                })
                .await;
            self.record_save(start, &result);
            match result {
                Ok(()) => {
                    self.monitor.report_success();
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    self.monitor.report_failure(&e);
                    tracing::warn!(
                        event_id = events::SAVE_RETRY,
                        sid = %session.id,
                        attempt = attempt + 1,
                        of = attempts + 1,
                        error = %e,
                        "transcript save failed"
                    );
                    last_error = Some(e);
                }
                Err(
                    e @ (StoreError::Fenced { .. }
                    | StoreError::Conflict(_)
                    | StoreError::NotFound(_)),
                ) => {
                    // Another instance owns the session now: whatever we
                    // hold is stale. Drop it; the gateway relocates.
                    tracing::warn!(event_id = events::SESSION_FENCED, sid = %session.id, error = %e, "write refused: session moved to another instance");
                    self.let_go(session);
                    return Err(ApiError::not_owner(&session.id));
                }
                Err(e) => return Err(ApiError::from(e)),
            }
        }
        let error = last_error.map(|e| e.to_string()).unwrap_or_default();
        metrics::counter!(m::TRANSCRIPT_SAVE_FAILURES).increment(1);
        tracing::error!(
            event_id = events::SAVE_FAILED,
            sid = %session.id,
            intx = %session.intx,
            policy = ?self.settings.transcript_save_on_error,
            error = %error,
            "transcript save failed after {} attempts",
            attempts + 1
        );
        if self.settings.transcript_save_notices {
            session.publish([notice(
                live.transcript.last_seq(),
                reason::SAVE_FAIL,
                "transcript could not be saved",
            )]);
        }
        if self.settings.transcript_save_on_error == SaveOnError::Close {
            // Close without a final update, as the reference does. The
            // closing event is pushed to participants now and written to the
            // session store as soon as it answers again, so that no other
            // instance restores the chat meanwhile.
            let closed = Draft::closed(reason::SAVE_ERROR_CLOSE)
                .into_event(live.transcript.next_seq(), now_ms());
            self.spawn_tombstone(Append {
                session_id: session.id.clone(),
                epoch: live.epoch,
                events: vec![closed.clone()],
                state: SessionState::Closed,
            });
            session.publish([EventView::from(&closed)]);
            live.transcript.push(closed);
            self.retire(session);
        }
        Err(ApiError::unavailable(
            "save_failed",
            "the message could not be saved and was not accepted; retry with the same client_msg_id",
        ))
    }

    /// Keep trying to store a closed chat's final transcript (then delete its
    /// intermediate records) while the contact store is down.
    fn spawn_final_save(&self, transcript: FinalTranscript, epoch: u64) {
        let (contacts, store) = (self.contacts.clone(), self.store.clone());
        let delay = self
            .settings
            .transcript_resend_delay
            .max(std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            for _ in 0..600 {
                tokio::time::sleep(delay).await;
                if contacts
                    .save_final_transcript(transcript.clone())
                    .await
                    .is_ok()
                {
                    let _ = store.delete_session(&transcript.session_id, epoch).await;
                    tracing::info!(sid = %transcript.session_id, "final transcript stored after retries");
                    return;
                }
            }
            tracing::error!(event_id = events::FINAL_TRANSCRIPT_ABANDONED, sid = %transcript.session_id, "gave up storing the final transcript; intermediate records kept for recovery");
        });
    }

    /// Keep trying to store a session's closing (after a save failure closed
    /// it) until the store takes it or the session moved on.
    fn spawn_tombstone(&self, append: Append) {
        let (store, closing) = (self.store.clone(), self.closing.clone());
        let delay = self
            .settings
            .transcript_resend_delay
            .max(std::time::Duration::from_millis(100));
        closing.lock().insert(append.session_id.clone());
        tokio::spawn(async move {
            // Stored, or refused (another instance owns it now, or it is
            // gone): either way no longer ours to answer for.
            let mut settled = false;
            for _ in 0..600 {
                match store.append_events(append.clone()).await {
                    Err(e) if e.is_transient() => tokio::time::sleep(delay).await,
                    result => {
                        if let Err(e) = result {
                            tracing::error!(event_id = events::CLOSING_REFUSED, sid = %append.session_id, error = %e, "the closing of a session closed after save errors was refused by the store");
                        }
                        settled = true;
                        break;
                    }
                }
            }
            if settled {
                closing.lock().remove(&append.session_id);
            } else {
                // It stays "closed" here for as long as this process lives.
                tracing::error!(event_id = events::CLOSING_ABANDONED, sid = %append.session_id, "gave up storing the closing of a session closed after save errors");
            }
        });
    }

    fn record_save(&self, start: Instant, result: &Result<(), StoreError>) {
        metrics::histogram!(m::TRANSCRIPT_SAVE_DURATION).record(start.elapsed().as_secs_f64());
        let ok = match result {
            Ok(()) => true,
            // Refused (another instance owns the session, or it is closed
            // or gone): the store did its job, and this is no save error.
            Err(e) if !e.is_transient() => return,
            Err(_) => false,
        };
        let result = if ok { "ok" } else { "error" };
        metrics::counter!(m::TRANSCRIPT_SAVES, "result" => result).increment(1);
        let counter = if ok {
            &self.kpi.transcript_saved
        } else {
            &self.kpi.transcript_save_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Restore a session here (the gateway asks after its owner died): take
    /// ownership with a new epoch, reload the transcript, announce the
    /// reconnection, and record this instance as the chat's location.
    #[tracing::instrument(level = "debug", skip(self), fields(chat_id = %session_id))]
    pub async fn restore(&self, session_id: &str) -> Result<Restored, ApiError> {
        if !self.settings.restoration_enabled() {
            metrics::counter!(m::RESTORE_FAILURES).increment(1);
            tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, "restoration refused: session-restoration-mode is none or transcript-auto-save is 0");
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "restoration_disabled",
                "session restoration is off on this instance (session-restoration-mode = none or transcript-auto-save = 0)",
            ));
        }
        if !self.is_enabled() {
            return Err(ApiError::unavailable(
                "instance_disabled",
                format!(
                    "instance {} is disabled and takes no restored chats",
                    self.id
                ),
            ));
        }
        let result = self
            .restoring
            .run(session_id, self.restore_locked(session_id))
            .await;
        // A chat that is closed or gone cannot be restored, and that is no
        // failure of this instance.
        if matches!(&result, Err(e) if !matches!(e.code, "chat_closed" | "not_found")) {
            metrics::counter!(m::RESTORE_FAILURES).increment(1);
        }
        result
    }

    async fn restore_locked(&self, session_id: &str) -> Result<Restored, ApiError> {
        if self.closing.lock().contains(session_id) {
            return Err(ApiError::closed(session_id));
        }
        let existing = self.sessions.read().get(session_id).cloned();
        if let Some(session) = existing {
            let epoch = session.inner.lock().await.epoch;
            match self.store.locate(session_id).await {
                Ok(Some(r)) if r.owner_instance == self.id && r.epoch == epoch => {
                    return Ok(Restored {
                        session_id: session_id.to_owned(),
                        instance_id: self.id.clone(),
                        epoch,
                        restored: false,
                    })
                }
                Ok(_) => self.let_go(&session),
                Err(e) => {
                    tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, error = %e, "restoration failed");
                    return Err(self.store_error(e));
                }
            }
        }
        let start = Instant::now();
        tracing::info!(event_id = events::RESTORE_STARTED, sid = %session_id, "restoring session");
        let (record, stored) = self.store.claim(session_id, &self.id).await.map_err(|e| {
            tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, error = %e, "restoration failed");
            self.store_error(e)
        })?;
        let transcript = Transcript::replay(record.state, stored);
        if transcript.state == SessionState::Closed {
            // Its closing was saved but the close did not finish: it stays closed.
            return Err(ApiError::closed(session_id));
        }
        let drafts = transcript.restoration_drafts();
        let session = LiveSession::new(&record, transcript);
        {
            let mut live = session.inner.lock().await;
            self.append(&session, &mut live, drafts).await.inspect_err(|e| {
                tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, error = %e, "restoration failed");
            })?;
        }
        self.insert_live(session);
        // Hosted here now: counted in, as a created session is.
        self.kpi.session_created.fetch_add(1, Ordering::Relaxed);
        let elapsed = start.elapsed();
        metrics::histogram!(m::RESTORE_DURATION).record(elapsed.as_secs_f64());
        metrics::counter!(m::SESSIONS_RESTORED).increment(1);
        self.kpi.session_restored.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            event_id = events::RESTORE_DONE,
            sid = %session_id,
            intx = %record.intx,
            epoch = record.epoch,
            elapsed_ms = elapsed.as_millis() as u64,
            "session restored (current sessions={})",
            self.sessions_active()
        );
        Ok(Restored {
            session_id: session_id.to_owned(),
            instance_id: self.id.clone(),
            epoch: record.epoch,
            restored: true,
        })
    }

    /// Every `interval`, check up to `batch` hosted sessions (round robin)
    /// against the store and let go of those another instance owns now
    /// (restored elsewhere while this one was cut off): they would otherwise
    /// stay here, feed a stale WebSocket stream and keep a drain from ending.
    pub fn spawn_ownership_sweep(
        self: &Arc<Self>,
        interval: std::time::Duration,
        batch: usize,
        stop: CancellationToken,
    ) {
        let instance = self.clone();
        tokio::spawn(async move {
            let mut offset = 0usize;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let mut ids: Vec<String> = instance.sessions.read().keys().cloned().collect();
                if ids.is_empty() {
                    continue;
                }
                ids.sort_unstable();
                offset %= ids.len();
                let window: Vec<String> = ids
                    .iter()
                    .cycle()
                    .skip(offset)
                    .take(batch.min(ids.len()))
                    .cloned()
                    .collect();
                offset += window.len();
                let Ok(owners) = instance.store.owners(&window).await else {
                    continue;
                };
                for id in window {
                    let Some(session) = instance.sessions.read().get(&id).cloned() else {
                        continue;
                    };
                    let epoch = session.inner.lock().await.epoch;
                    let mine = owners
                        .get(&id)
                        .is_some_and(|(owner, e)| *owner == instance.id && *e == epoch);
                    // A session of this instance whose close is finishing is
                    // no longer in the store either; only moved ones go.
                    let moved = owners.get(&id).is_some_and(|_| !mine);
                    if moved {
                        tracing::warn!(event_id = events::SESSION_FENCED, sid = %id, "session moved to another instance; dropped here");
                        instance.let_go(&session);
                    }
                }
            }
        });
    }

    /// Drop every live session without touching the store (shutdown): the
    /// sessions stay restorable elsewhere; WebSocket streams end.
    pub fn release_all(&self) {
        let mut map = self.sessions.write();
        for (_, s) in map.drain() {
            s.gone.cancel();
        }
        metrics::gauge!(m::SESSIONS_ACTIVE).set(0.0);
    }
}

fn notice(seq: u64, why: &str, text: &str) -> EventView {
    EventView {
        seq,
        kind: EventKind::Notice,
        participant_id: None,
        nickname: None,
        text: Some(text.to_owned()),
        reason: Some(why.to_owned()),
        at: crate::session::format_ms(now_ms()),
        ephemeral: true,
    }
}

fn state_error(session_id: &str, e: StateError) -> ApiError {
    match e {
        StateError::Closed => ApiError::closed(session_id),
        StateError::NotParticipant(p) => {
            ApiError::forbidden(format!("participant {p} is not in chat {session_id}"))
        }
    }
}
