//! Closing a chat: the `closed` event is saved, the final transcript goes
//! to the contact store, the intermediate records are deleted, and event
//! 59245 is logged. When the contact store or the session store does not
//! answer, the rest is finished in the background (bounded retries), so
//! that the participants are not kept waiting and nothing is lost.

use super::engine::{participant, Instance};
use super::error::EngineResult;
use super::live::{Live, LiveSession};
use crate::session::{now_ms, reason, Draft, EventView, Role, SessionState};
use crate::store::{Append, FinalTranscript};
use crate::telemetry::events;
use std::future::Future;
use std::time::Duration;

/// How often a background retry tries before it gives up (and logs so).
const BACKGROUND_TRIES: usize = 600;

impl Instance {
    /// A participant leaves. The chat closes when the customer leaves or an
    /// agent ends it.
    #[tracing::instrument(level = "debug", skip(self), fields(chat_id = %session_id))]
    pub async fn leave(
        &self,
        session_id: &str,
        participant_id: &str,
        end_chat: bool,
    ) -> EngineResult<SessionState> {
        let session = self.live(session_id).await?;
        let mut live = session.inner.lock().await;
        let participant = participant(&live.transcript, session_id, participant_id)?;
        let present = live.transcript.present.contains_key(participant_id);
        let closes = participant.role == Role::Customer || end_chat;
        if !closes {
            if present {
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
        if present {
            drafts.push(Draft::left(&participant, reason::LEFT));
        }
        drafts.push(Draft::closed(why));
        self.append(&session, &mut live, drafts).await?;
        self.finish_close(&session, &live).await;
        Ok(SessionState::Closed)
    }

    /// Close the chats hosted here that waited longer than `timeout` with no
    /// agent (reason `no-agent`): the customer is told, the final
    /// transcript is stored, and the queue no longer shows a chat nobody
    /// will answer.
    pub async fn expire_waiting(&self, timeout: Duration) {
        let cutoff = now_ms() - i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        for id in self.sessions.ids() {
            let Some(session) = self.sessions.get(&id) else {
                continue;
            };
            if session.created_at_ms > cutoff {
                continue;
            }
            let mut live = session.inner.lock().await;
            if live.transcript.state != SessionState::Waiting {
                continue;
            }
            let closing = vec![Draft::closed(reason::NO_AGENT)];
            match self.append(&session, &mut live, closing).await {
                Ok(_) => {
                    tracing::info!(sid = %session.id, waited_s = timeout.as_secs(), "waiting chat closed: no agent took it");
                    self.finish_close(&session, &live).await;
                }
                Err(e) => {
                    tracing::warn!(sid = %session.id, error = %e, "could not close a chat that waited too long")
                }
            }
        }
    }

    /// After the `closed` event is saved: final transcript to the contact
    /// store, intermediate rows deleted, event 59245.
    async fn finish_close(&self, session: &LiveSession, live: &Live) {
        let final_transcript = final_transcript(session, live);
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
        self.release_closed(session);
    }

    /// Release a closed session and count it (event 59245).
    fn release_closed(&self, session: &LiveSession) {
        let Some(current) = self.release(session) else {
            // Closed before it went live here (a restore whose first save failed).
            return;
        };
        self.stats.session_closed();
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

    /// `transcript-save-on-error = close`: close without a final update, as
    /// the reference does. The closing event is pushed to participants now
    /// and written to the session store as soon as it answers again, so
    /// that no other instance restores the chat meanwhile.
    pub(super) fn close_after_save_errors(&self, session: &LiveSession, live: &mut Live) {
        // The events given up go first, under their own keys: they may
        // have landed, and the closing event must not take their seqs.
        let mut events = std::mem::take(&mut live.unsettled);
        let closed = Draft::closed(reason::SAVE_ERROR_CLOSE)
            .into_event(live.transcript.next_seq() + events.len() as u64, now_ms());
        events.push(closed);
        self.spawn_closing_save(Append {
            session_id: session.id.clone(),
            epoch: live.epoch,
            events: events.clone(),
            state: SessionState::Closed,
        });
        session.publish(events.iter().map(EventView::from).collect::<Vec<_>>());
        for e in events {
            live.transcript.push(e);
        }
        self.release_closed(session);
    }

    /// The store no longer has the chat's records though this instance
    /// still owns it (they expired): close it from what is held here. The
    /// participants get a `closed` event (reason `records-lost`), the
    /// transcript so far goes to the contact store as the final one, and
    /// the chat is let go (event 59618). Nothing acknowledged is lost: the
    /// transcript held here has every acknowledged event.
    pub(super) async fn close_records_lost(&self, session: &LiveSession, live: &mut Live) {
        let closed =
            Draft::closed(reason::RECORDS_LOST).into_event(live.transcript.next_seq(), now_ms());
        session.publish([EventView::from(&closed)]);
        live.transcript.push(closed);
        live.unsettled.clear();
        tracing::error!(
            event_id = events::RECORDS_LOST,
            sid = %session.id,
            events = live.transcript.events.len(),
            "the session store lost the records of a live chat; closed, final transcript stored from memory"
        );
        let transcript = final_transcript(session, live);
        // Stored now if the contact store answers; else the chat answers
        // "closed" (not "not found") while the background retries run.
        if self
            .contacts
            .save_final_transcript(transcript.clone())
            .await
            .is_err()
        {
            self.closing.lock().insert(session.id.clone());
            let (contacts, closing) = (self.contacts.clone(), self.closing.clone());
            let delay = self
                .settings
                .transcript_resend_delay
                .max(Duration::from_secs(1));
            tokio::spawn(async move {
                if !keep_storing(&*contacts, &transcript, delay).await {
                    tracing::error!(event_id = events::FINAL_TRANSCRIPT_ABANDONED, sid = %transcript.session_id, "gave up storing the final transcript of a chat whose records were lost");
                }
                closing.lock().remove(&transcript.session_id);
            });
        }
        self.release_closed(session);
    }

    /// Keep trying to store a closed chat's final transcript (then delete its
    /// intermediate records) while the contact store is down.
    fn spawn_final_save(&self, transcript: FinalTranscript, epoch: u64) {
        let (contacts, store) = (self.contacts.clone(), self.store.clone());
        let delay = self
            .settings
            .transcript_resend_delay
            .max(Duration::from_secs(1));
        tokio::spawn(async move {
            // The foreground has just tried: wait before the first retry.
            tokio::time::sleep(delay).await;
            if keep_storing(&*contacts, &transcript, delay).await {
                let _ = store.delete_session(&transcript.session_id, epoch).await;
                tracing::info!(sid = %transcript.session_id, "final transcript stored after retries");
            } else {
                tracing::error!(event_id = events::FINAL_TRANSCRIPT_ABANDONED, sid = %transcript.session_id, "gave up storing the final transcript; intermediate records kept for recovery");
            }
        });
    }

    /// Keep trying to store a session's closing (after a save failure closed
    /// it) until the store takes it or the session moved on. Meanwhile the
    /// chat answers "closed" here.
    fn spawn_closing_save(&self, append: Append) {
        let (store, closing) = (self.store.clone(), self.closing.clone());
        let delay = self
            .settings
            .transcript_resend_delay
            .max(Duration::from_millis(100));
        closing.lock().insert(append.session_id.clone());
        tokio::spawn(async move {
            // Stored, or refused (another instance owns it now, or it is
            // gone): either way no longer ours to answer for.
            let settled = keep_trying(delay, || async {
                match store.append_events(append.clone()).await {
                    Err(e) if e.is_transient() => false,
                    Err(e) => {
                        tracing::error!(event_id = events::CLOSING_REFUSED, sid = %append.session_id, error = %e, "the closing of a session closed after save errors was refused by the store");
                        true
                    }
                    Ok(()) => true,
                }
            })
            .await;
            if settled {
                closing.lock().remove(&append.session_id);
            } else {
                // It stays "closed" here for as long as this process lives.
                tracing::error!(event_id = events::CLOSING_ABANDONED, sid = %append.session_id, "gave up storing the closing of a session closed after save errors");
            }
        });
    }
}

/// Run `attempt` until it reports done, `delay` apart, at most
/// [`BACKGROUND_TRIES`] times. True once done.
async fn keep_trying<F, Fut>(delay: Duration, mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..BACKGROUND_TRIES {
        if attempt().await {
            return true;
        }
        tokio::time::sleep(delay).await;
    }
    false
}

/// A closing chat's final transcript: what it holds now.
fn final_transcript(session: &LiveSession, live: &Live) -> FinalTranscript {
    FinalTranscript {
        session_id: session.id.clone(),
        intx: session.intx.clone(),
        closed_at_ms: now_ms(),
        events: live.transcript.events.clone(),
    }
}

/// Store `transcript` in the contact store, trying again `delay` apart
/// ([`keep_trying`]); whether it was stored.
async fn keep_storing(
    contacts: &dyn crate::store::ContactStore,
    transcript: &FinalTranscript,
    delay: Duration,
) -> bool {
    keep_trying(delay, || async {
        contacts
            .save_final_transcript(transcript.clone())
            .await
            .is_ok()
    })
    .await
}
