//! The durable message path: creating a chat, an agent joining, posting,
//! reading the transcript, and `append`, through which every event goes:
//! numbered, saved (group-committed with other chats' saves), then applied
//! and pushed. A message is acknowledged only after its save.

use super::engine::{participant, state_error, Instance};
use super::error::{EngineError, EngineResult};
use super::live::{Live, LiveSession};
use crate::config::{AutoSave, SaveOnError};
use crate::contract::answers::{Created, Posted, TranscriptView};
use crate::session::{
    now_ms, reason, Draft, Event, EventKind, EventView, Participant, Role, SessionState, Transcript,
};
use crate::store::{Append, SessionRecord, StoreError};
use crate::telemetry::events;
use std::time::Instant;

impl Instance {
    #[tracing::instrument(level = "debug", skip(self, nickname, subject), fields(chat_id))]
    pub async fn create_session(
        &self,
        nickname: String,
        subject: Option<String>,
    ) -> EngineResult<Created> {
        if !self.is_enabled() {
            return Err(EngineError::Disabled {
                instance: self.id.clone(),
                refused: "accepts no new chats",
            });
        }
        if !self.monitor.is_available() {
            return Err(EngineError::StoreUnavailable);
        }
        let record = SessionRecord {
            session_id: uuid::Uuid::new_v4().simple().to_string(),
            intx: uuid::Uuid::new_v4().simple().to_string(),
            owner_instance: self.id.clone(),
            epoch: 1,
            state: SessionState::Waiting,
            subject,
            nickname: Some(nickname.clone()),
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
        self.host(LiveSession::new(&record, transcript));
        self.stats.session_created();
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
    pub async fn join(&self, session_id: &str, nickname: String) -> EngineResult<Participant> {
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
    ) -> EngineResult<Posted> {
        let session = self.live(session_id).await?;
        let mut live = session.inner.lock().await;
        let participant = participant(&live.transcript, session_id, participant_id)?;
        // A retry of a message whose save was given up finds it here once
        // it is settled.
        self.settle(&session, &mut live).await?;
        if !live.transcript.present.contains_key(participant_id) {
            return Err(EngineError::Left {
                chat: session_id.to_owned(),
                participant: participant_id.to_owned(),
            });
        }
        if let Some(seq) = client_msg_id
            .as_ref()
            .and_then(|c| live.transcript.client_ids.get(c))
        {
            // A retry: the same sender and text. Anything else reusing the
            // id is refused, never silently taken for a retry.
            let original = live.transcript.after(seq - 1).first();
            let same = original.is_some_and(|e| {
                e.participant_id.as_deref() == Some(participant_id)
                    && e.text.as_deref() == Some(text.as_str())
            });
            if !same {
                return Err(EngineError::ClientMsgIdReused(
                    client_msg_id.unwrap_or_default(),
                ));
            }
            return Ok(Posted {
                seq: *seq,
                duplicate: true,
            });
        }
        let t = &live.transcript;
        if t.events.len() >= self.limits.max_events
            || t.text_bytes + text.len() > self.limits.max_text_bytes
        {
            return Err(EngineError::TranscriptFull {
                chat: session_id.to_owned(),
                events: t.events.len(),
                bytes: t.text_bytes,
            });
        }
        let events = self
            .append(
                &session,
                &mut live,
                vec![Draft::message(&participant, text, client_msg_id)],
            )
            .await?;
        self.stats.message_submitted();
        Ok(Posted {
            seq: events.last().map(|e| e.seq).unwrap_or(0),
            duplicate: false,
        })
    }

    #[tracing::instrument(level = "debug", skip(self), fields(chat_id = %session_id))]
    /// A page of the transcript after `after` (at most `limit` events and
    /// about [`crate::contract::PAGE_TEXT_BYTES`] of text); `more` says
    /// whether another page follows.
    pub async fn transcript(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
        reader: Option<&str>,
    ) -> EngineResult<TranscriptView> {
        let session = match self.live(session_id).await {
            Ok(session) => session,
            // A closed chat is read from the contact store, by any instance
            // that shares it.
            // (A closing still under way has none yet: 409.)
            Err(EngineError::Closed(_)) => {
                return match self
                    .final_transcript(session_id, after, limit, reader)
                    .await
                {
                    Err(EngineError::NotFound(_)) => {
                        Err(EngineError::Closed(session_id.to_owned()))
                    }
                    answer => answer,
                };
            }
            Err(e) => return Err(e),
        };
        let live = session.inner.lock().await;
        self.view(session_id, &live.transcript, after, limit, reader)
    }

    /// A page of a closed chat's final transcript from the contact store,
    /// as `reader` may see it (all of it when None: an agent's credential,
    /// an operator). NotFound when the store has none: the chat is not
    /// closed, never existed, or closed into another host's SQLite file.
    pub async fn final_transcript(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
        reader: Option<&str>,
    ) -> EngineResult<TranscriptView> {
        match self.contacts.final_transcript(session_id).await {
            Ok(Some(t)) => {
                let transcript = Transcript::replay(SessionState::Closed, t.events);
                self.view(session_id, &transcript, after, limit, reader)
            }
            Ok(None) => Err(EngineError::NotFound(session_id.to_owned())),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// A page of `transcript` as `reader` may see it.
    fn view(
        &self,
        session_id: &str,
        transcript: &Transcript,
        after: u64,
        limit: usize,
        reader: Option<&str>,
    ) -> EngineResult<TranscriptView> {
        let left_at = match reader {
            Some(p) => transcript
                .read_limit(p)
                .map_err(|e| state_error(session_id, e))?,
            None => None,
        };
        let end = left_at.unwrap_or(u64::MAX);
        let (page, more) = transcript.page(after, limit, crate::contract::PAGE_TEXT_BYTES);
        let events: Vec<EventView> = page
            .iter()
            .take_while(|e| e.seq <= end)
            .map(EventView::from)
            .collect();
        let more = more && events.last().is_some_and(|e| e.seq < end);
        Ok(TranscriptView {
            chat_id: session_id.to_owned(),
            instance_id: self.id.clone(),
            state: transcript.state,
            events,
            more,
            left_at,
        })
    }

    /// Give `drafts` their sequence numbers, save them (auto-save), then
    /// apply and push them. Called with the session's lock held, so one
    /// session's events are saved in order; different sessions' saves share
    /// store transactions (group commit).
    pub(super) async fn append(
        &self,
        session: &LiveSession,
        live: &mut Live,
        drafts: Vec<Draft>,
    ) -> EngineResult<Vec<Event>> {
        self.settle(session, live).await?;
        let at = now_ms();
        let first = live.transcript.next_seq();
        let mut state = live.transcript.state;
        let mut events = Vec::with_capacity(drafts.len());
        for (i, d) in drafts.into_iter().enumerate() {
            let event = d.into_event(first + i as u64, at);
            state = state.after(&event);
            events.push(event);
        }
        if self.saves_enabled() {
            self.save(session, live, &events, state).await?;
        }
        self.apply(session, live, &events);
        Ok(events)
    }

    /// Store the events of a save given up (identical, under the same
    /// keys), then apply them: they may have landed already, and nothing
    /// else may take their seqs. Nothing to do when there are none.
    async fn settle(&self, session: &LiveSession, live: &mut Live) -> EngineResult<()> {
        if live.unsettled.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut live.unsettled);
        let state = events.iter().fold(live.transcript.state, |s, e| s.after(e));
        self.save(session, live, &events, state).await?;
        self.apply(session, live, &events);
        Ok(())
    }

    /// Push saved events to the transcript and to the chat's readers.
    fn apply(&self, session: &LiveSession, live: &mut Live, events: &[Event]) {
        let last_seq = events.last().map(|e| e.seq).unwrap_or(0);
        if session.has_listeners() {
            session.publish(events.iter().map(EventView::from).collect::<Vec<_>>());
        }
        for e in events {
            live.transcript.push(e.clone());
        }
        if self.settings.transcript_auto_save == AutoSave::SaveAndNotify {
            session.publish([notice(last_seq, reason::SAVE, "transcript saved")]);
        }
    }

    /// Save with `transcript-resend-attempts` retries `transcript-resend-delay`
    /// apart; then act per `transcript-save-on-error`.
    async fn save(
        &self,
        session: &LiveSession,
        live: &mut Live,
        events: &[Event],
        state: SessionState,
    ) -> EngineResult<()> {
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
                Err(StoreError::NotFound(_)) => {
                    // Closed by its new owner (whose final transcript is
                    // stored), or lost under this one: close it from here.
                    match self.contacts.final_transcript(&session.id).await {
                        Ok(Some(_)) => {
                            tracing::warn!(event_id = events::SESSION_FENCED, sid = %session.id, "write refused: session closed on another instance");
                            self.release_moved(session);
                        }
                        Ok(None) => self.close_records_lost(session, live).await,
                        // Cannot tell yet: keep the chat; the client retries.
                        Err(e) => return Err(self.store_error(e)),
                    }
                    return Err(EngineError::Closed(session.id.clone()));
                }
                Err(e @ (StoreError::Fenced { .. } | StoreError::Conflict(_))) => {
                    // Another instance owns the session now: whatever we
                    // hold is stale. Drop it; the gateway relocates.
                    tracing::warn!(event_id = events::SESSION_FENCED, sid = %session.id, error = %e, "write refused: session moved to another instance");
                    self.release_moved(session);
                    return Err(EngineError::NotOwner(session.id.clone()));
                }
                Err(e) => return Err(EngineError::from(e)),
            }
        }
        let error = last_error.map(|e| e.to_string()).unwrap_or_default();
        // On a store where the last attempt's write may have landed with
        // its answer lost, these keys are taken until the same events are
        // stored (resent before anything else).
        if self.store.failed_writes_may_land() {
            live.unsettled = events.to_vec();
        }
        self.give_up_save(session, live, &error);
        Err(EngineError::SaveFailed)
    }

    /// Every save attempt failed: tell the participants (with
    /// `transcript-save-notices`) and close the chat if the settings say so.
    fn give_up_save(&self, session: &LiveSession, live: &mut Live, error: &str) {
        self.stats.save_given_up();
        tracing::error!(
            event_id = events::SAVE_FAILED,
            sid = %session.id,
            intx = %session.intx,
            policy = ?self.settings.transcript_save_on_error,
            error = %error,
            "transcript save failed after {} attempts",
            self.settings.transcript_resend_attempts + 1
        );
        if self.settings.transcript_save_notices {
            session.publish([notice(
                live.transcript.last_seq(),
                reason::SAVE_FAIL,
                "transcript could not be saved",
            )]);
        }
        if self.settings.transcript_save_on_error == SaveOnError::Close {
            self.close_after_save_errors(session, live);
        }
    }

    /// Count one save attempt by how the store answered.
    pub(super) fn record_save(&self, start: Instant, result: &Result<(), StoreError>) {
        let took = start.elapsed();
        match result {
            Ok(()) => self.stats.save_attempt(true, took),
            // Refused (another instance owns the session, or it is closed
            // or gone): the store did its job, and this is no save error.
            Err(e) if !e.is_transient() => self.stats.save_refused(took),
            Err(_) => self.stats.save_attempt(false, took),
        }
    }
}

/// An ephemeral notice (pushed to WebSocket readers, never stored).
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
