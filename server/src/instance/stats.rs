//! The instance's KPI counters (`GET /kpi`, named as in the reference) and
//! their Prometheus metrics, recorded together: one call per thing that
//! happened, so that the two can never drift apart.
//!
//! The KPIs follow the reference's drain check: `session_created -
//! session_closed` is the number of sessions hosted here, so a restored
//! session counts as taken on (created) and a session that moved to another
//! instance as let go (closed). The metrics follow Prometheus' meaning:
//! `confab_sessions_created_total` counts chats created here,
//! `confab_sessions_restored_total` restorations, and
//! `confab_sessions_closed_total` chats that ended here.

use crate::telemetry::metrics as m;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Stats {
    session_created: AtomicU64,
    session_closed: AtomicU64,
    session_restored: AtomicU64,
    message_submitted: AtomicU64,
    transcript_saved: AtomicU64,
    transcript_save_failed: AtomicU64,
}

pub use crate::contract::Kpi as KpiView;

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// Every metric of the instance exported from the start, at zero.
    pub fn new() -> Self {
        metrics::gauge!(m::INSTANCE_ENABLED).set(1.0);
        metrics::gauge!(m::SESSIONS_ACTIVE).set(0.0);
        metrics::gauge!(m::WEBSOCKET_CONNECTIONS, "component" => "instance").set(0.0);
        for result in ["ok", "error"] {
            metrics::counter!(m::TRANSCRIPT_SAVES, "result" => result).absolute(0);
        }
        for name in [
            m::SESSIONS_CREATED,
            m::SESSIONS_CLOSED,
            m::SESSIONS_RESTORED,
            m::MESSAGES_SUBMITTED,
            m::RESTORE_FAILURES,
            m::TRANSCRIPT_SAVE_FAILURES,
            m::STORE_HISTORY_CORRUPT,
        ] {
            metrics::counter!(name).absolute(0);
        }
        for name in [
            m::TRANSCRIPT_SAVE_DURATION,
            m::RESTORE_DURATION,
            m::MESSAGE_ACK_DURATION,
        ] {
            // Registered now, so that /metrics shows them (all buckets 0)
            // before the first save or restore, not "no data".
            let _ = metrics::histogram!(name);
        }
        Stats::default()
    }

    pub fn session_created(&self) {
        bump(&self.session_created);
        metrics::counter!(m::SESSIONS_CREATED).increment(1);
    }

    /// A session restored here: taken on, and a restoration.
    pub fn session_restored(&self, took: Duration) {
        bump(&self.session_created);
        bump(&self.session_restored);
        metrics::counter!(m::SESSIONS_RESTORED).increment(1);
        metrics::histogram!(m::RESTORE_DURATION).record(took.as_secs_f64());
    }

    pub fn restore_failed(&self) {
        metrics::counter!(m::RESTORE_FAILURES).increment(1);
    }

    pub fn session_closed(&self) {
        bump(&self.session_closed);
        metrics::counter!(m::SESSIONS_CLOSED).increment(1);
    }

    /// A session that moved to another instance: let go here (a KPI), but
    /// not closed (no metric: the chat goes on elsewhere).
    pub fn session_moved_away(&self) {
        bump(&self.session_closed);
    }

    pub fn message_submitted(&self) {
        bump(&self.message_submitted);
        metrics::counter!(m::MESSAGES_SUBMITTED).increment(1);
    }

    /// One save attempt that the store answered (`ok`) or failed (`error`).
    pub fn save_attempt(&self, ok: bool, took: Duration) {
        metrics::histogram!(m::TRANSCRIPT_SAVE_DURATION).record(took.as_secs_f64());
        metrics::counter!(m::TRANSCRIPT_SAVES, "result" => if ok { "ok" } else { "error" })
            .increment(1);
        bump(if ok {
            &self.transcript_saved
        } else {
            &self.transcript_save_failed
        });
    }

    /// A save attempt that the store refused (the chat moved, closed or is
    /// gone): the store did its job, so it is neither `ok` nor `error`.
    pub fn save_refused(&self, took: Duration) {
        metrics::histogram!(m::TRANSCRIPT_SAVE_DURATION).record(took.as_secs_f64());
    }

    /// A restoration refused: the stored history has a gap (event 59617).
    pub fn history_corrupt(&self) {
        metrics::counter!(m::STORE_HISTORY_CORRUPT).increment(1);
    }

    /// A save given up after every retry: the sender got an error.
    pub fn save_given_up(&self) {
        metrics::counter!(m::TRANSCRIPT_SAVE_FAILURES).increment(1);
    }

    pub fn sessions_hosted(&self, n: usize) {
        metrics::gauge!(m::SESSIONS_ACTIVE).set(n as f64);
    }

    pub fn enabled(&self, enabled: bool) {
        metrics::gauge!(m::INSTANCE_ENABLED).set(if enabled { 1.0 } else { 0.0 });
    }

    pub fn view(&self, sessions_active: usize) -> KpiView {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KpiView {
            session_created: get(&self.session_created),
            session_closed: get(&self.session_closed),
            session_restored: get(&self.session_restored),
            message_submitted: get(&self.message_submitted),
            transcript_saved: get(&self.transcript_saved),
            transcript_save_failed: get(&self.transcript_save_failed),
            sessions_active: sessions_active as u64,
        }
    }
}
