//! Restoration (`session-restoration-mode = simple`): the gateway asks an
//! instance to take over a chat whose owner died; it claims the chat with a
//! new fencing epoch, reloads the transcript, announces the reconnection
//! (`left`/disconnected and `joined`/reconnected per participant) and
//! records itself as the chat's location. And the ownership sweep, which
//! releases chats that another instance took over while this one was cut
//! off.

use super::engine::Instance;
use super::error::{EngineError, EngineResult};
use super::live::LiveSession;
use crate::contract::answers::Restored;
use crate::session::{SessionState, Transcript};
use crate::store::StoreError;
use crate::telemetry::events;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

impl Instance {
    /// Take `session_id` over here. `from`: the owner that failed the
    /// gateway; the chat is then taken only while the store still names
    /// it (or this instance) as the owner, else the answer names the
    /// owner the store has now (restored there by another gateway's
    /// request) and nothing changes. This spares the gateway a location
    /// read of its own before each restoration.
    #[tracing::instrument(level = "debug", skip(self), fields(chat_id = %session_id))]
    pub async fn restore(&self, session_id: &str, from: Option<&str>) -> EngineResult<Restored> {
        if !self.settings.restoration_enabled() {
            self.stats.restore_failed();
            tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, "restoration refused: session-restoration-mode is none or transcript-auto-save is 0");
            return Err(EngineError::RestorationDisabled);
        }
        if !self.is_enabled() {
            return Err(EngineError::Disabled {
                instance: self.id.clone(),
                refused: "takes no restored chats",
            });
        }
        let result = self
            .restoring
            .run(session_id, self.restore_locked(session_id, from))
            .await;
        // A chat that is closed or gone cannot be restored, and that is no
        // failure of this instance.
        if matches!(&result, Err(e) if !e.is_closed_or_gone()) {
            self.stats.restore_failed();
        }
        result
    }

    fn restored(&self, session_id: &str, epoch: u64, restored: bool) -> Restored {
        Restored {
            session_id: session_id.to_owned(),
            instance_id: self.id.clone(),
            epoch,
            restored,
        }
    }

    async fn restore_locked(&self, session_id: &str, from: Option<&str>) -> EngineResult<Restored> {
        if self.closing.lock().contains(session_id) {
            return Err(EngineError::Closed(session_id.to_owned()));
        }
        if let Some(session) = self.sessions.get(session_id) {
            let epoch = session.epoch().await;
            match self.store.locate(session_id).await {
                Ok(Some(r)) if r.owner_instance == self.id && r.epoch == epoch => {
                    return Ok(self.restored(session_id, epoch, false));
                }
                // Its records are gone: closed elsewhere (its final
                // transcript stored), or lost under this owner (expired):
                // then it closes from what is held here. Lost too: closed
                // by this instance's own closing claim while it holds the
                // chat live (the store wrote it on finding the records
                // gone, and the save that did so lost its answer).
                Ok(r)
                    if r.as_ref().is_none_or(|r| {
                        r.state == SessionState::Closed && r.owner_instance == self.id
                    }) =>
                {
                    match self.contacts.final_transcript(session_id).await {
                        Ok(Some(_)) => self.release_moved(&session),
                        Ok(None) => {
                            let mut live = session.inner.lock().await;
                            self.close_records_lost(&session, &mut live).await;
                        }
                        Err(e) => return Err(self.store_error(e)),
                    }
                    return Err(EngineError::Closed(session_id.to_owned()));
                }
                Ok(_) => self.release_moved(&session),
                Err(e) => {
                    tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, error = %e, "restoration failed");
                    return Err(self.store_error(e));
                }
            }
        }
        if let Some(failed) = from {
            match self.store.locate(session_id).await {
                Ok(Some(r))
                    if r.owner_instance != failed
                        && r.owner_instance != self.id
                        && r.state != SessionState::Closed =>
                {
                    return Ok(Restored {
                        session_id: session_id.to_owned(),
                        instance_id: r.owner_instance,
                        epoch: r.epoch,
                        restored: false,
                    });
                }
                // Still the failed owner's (or gone, or closed: the claim
                // says so).
                Ok(_) => {}
                Err(e) => return Err(self.store_error(e)),
            }
        }
        let start = Instant::now();
        tracing::info!(event_id = events::RESTORE_STARTED, sid = %session_id, "restoring session");
        let failed = |e: &dyn std::fmt::Display| {
            tracing::warn!(event_id = events::RESTORE_FAILED, sid = %session_id, error = %e, "restoration failed");
        };
        let (record, stored) = self.store.claim(session_id, &self.id).await.map_err(|e| {
            if matches!(e, StoreError::Corrupt(_)) {
                self.stats.history_corrupt();
                tracing::error!(event_id = events::HISTORY_CORRUPT, sid = %session_id, error = %e, "restoration refused: the stored history of the chat has a gap");
            }
            failed(&e);
            self.store_error(e)
        })?;
        let transcript = Transcript::replay(record.state, stored);
        if transcript.state == SessionState::Closed {
            // Its closing was saved but the close did not finish: it stays closed.
            return Err(EngineError::Closed(session_id.to_owned()));
        }
        let drafts = transcript.restoration_drafts();
        let session = LiveSession::new(&record, transcript);
        {
            let mut live = session.inner.lock().await;
            self.append(&session, &mut live, drafts)
                .await
                .inspect_err(|e| failed(e))?;
        }
        self.host(session);
        let elapsed = start.elapsed();
        self.stats.session_restored(elapsed);
        tracing::info!(
            event_id = events::RESTORE_DONE,
            sid = %session_id,
            intx = %record.intx,
            epoch = record.epoch,
            elapsed_ms = elapsed.as_millis() as u64,
            "session restored (current sessions={})",
            self.sessions_active()
        );
        Ok(self.restored(session_id, record.epoch, true))
    }

    /// Every `interval`, check up to `batch` hosted sessions (round robin)
    /// against the store and release those another instance owns now
    /// (restored elsewhere while this one was cut off): they would otherwise
    /// stay here, feed a stale WebSocket stream and keep a drain from ending.
    pub fn spawn_ownership_sweep(
        self: &Arc<Self>,
        interval: Duration,
        batch: usize,
        stop: CancellationToken,
    ) {
        let instance = self.clone();
        let offset = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        crate::process::every(interval, stop, move || {
            let (instance, offset) = (instance.clone(), offset.clone());
            async move {
                let mut ids = instance.sessions.ids();
                if ids.is_empty() {
                    return;
                }
                ids.sort_unstable();
                let start = offset.load(std::sync::atomic::Ordering::Relaxed) % ids.len();
                let window: Vec<String> = ids
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(batch.min(ids.len()))
                    .cloned()
                    .collect();
                offset.store(start + window.len(), std::sync::atomic::Ordering::Relaxed);
                instance.sweep(window).await;
            }
        });
    }

    /// Release those of `ids` that the store says another instance owns.
    async fn sweep(&self, ids: Vec<String>) {
        let Ok(owners) = self.store.owners(&ids).await else {
            return;
        };
        for id in ids {
            let Some(session) = self.sessions.get(&id) else {
                continue;
            };
            let epoch = session.epoch().await;
            // A session of this instance whose close is finishing is no
            // longer in the store either; only moved ones go.
            let moved = owners
                .get(&id)
                .is_some_and(|(owner, e)| *owner != self.id || *e != epoch);
            if moved {
                tracing::warn!(event_id = events::SESSION_FENCED, sid = %id, "session moved to another instance; dropped here");
                self.release_moved(&session);
            }
        }
    }
}
