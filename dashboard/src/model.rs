//! What the dashboard shows, as the server sends it to the browser: one
//! snapshot of the cluster per second over `/live` (server-sent events),
//! and the answers of the actions. Shared by both halves of the app.

use serde::{Deserialize, Serialize};

/// The cluster as the dashboard's server last saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// When the snapshot was taken (Unix milliseconds).
    pub at_ms: u64,
    pub instances: Vec<InstanceView>,
    pub gateways: Vec<GatewayView>,
    /// Sessions hosted across the instances that answered.
    pub chats_active: u64,
    /// Chats that no agent has taken yet.
    pub chats_waiting: u64,
    pub messages_per_s: f64,
    /// The last ten minutes, one point every `history_step_s` seconds.
    pub history: Vec<Series>,
    pub history_step_s: u32,
    /// Why the restoration test cannot run here (no way to kill an
    /// instance, no gateway, no agent credential); None when it can.
    pub test_blocked: Option<String>,
    /// The restoration test running now, if any.
    pub test_running: Option<TestRun>,
    /// Finished restoration tests, newest first.
    pub test_history: Vec<TestRun>,
    /// The rolling restart running or last run (its steps; no chats).
    pub rolling_restart: Option<TestRun>,
    /// A rolling restart needs the `confab up` supervisor.
    pub can_roll: bool,
    /// The latest numbered events across the instances, newest first.
    pub events: Vec<EventRow>,
}

/// A page of one instance's live chats.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionsView {
    pub instance: String,
    pub sessions: Vec<SessionRow>,
    /// Ask with this `after` for the next page.
    pub next: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionRow {
    pub id: String,
    pub state: String,
    /// "ana (customer), bo (agent)".
    pub participants: String,
    pub created_at_ms: u64,
    pub age_s: u64,
    pub events: u64,
}

/// One event of a chat's transcript, as the dashboard shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TranscriptLine {
    pub seq: u64,
    pub kind: String,
    pub nickname: String,
    pub text: String,
    pub reason: String,
    /// When it happened (RFC 3339, UTC).
    pub at: String,
}

/// One numbered log event of one instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    pub instance: String,
    pub at_ms: u64,
    pub level: String,
    pub event_id: u32,
    pub message: String,
    pub fields: String,
}

/// One run of the restoration test (the reference's "Run a Test").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TestRun {
    pub id: u64,
    pub started_ms: u64,
    /// Chats the run started.
    pub chats: u32,
    pub instance_killed: Option<String>,
    pub steps: Vec<TestStep>,
    /// None while it runs.
    pub verdict: Option<Verdict>,
    /// From the kill until each moved chat took a message again.
    pub resume: Option<ResumeTimes>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TestStep {
    pub name: String,
    /// How long it took; None while it runs.
    pub ms: Option<u64>,
    /// None while it runs.
    pub ok: Option<bool>,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResumeTimes {
    /// Chats that were on the killed instance.
    pub moved: u32,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl TestRun {
    pub fn verdict_label(&self) -> &'static str {
        match &self.verdict {
            None => "RUNNING",
            Some(v) if v.passed => "PASSED",
            Some(_) => "FAILED",
        }
    }
}

/// One instance's row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub url: String,
    /// Answered its last status request in time.
    pub up: bool,
    /// Why it is shown as down (timeout, refused, …).
    pub error: Option<String>,
    pub enabled: bool,
    pub sessions_active: u64,
    pub sessions_waiting: u64,
    pub messages_per_s: f64,
    /// Transcript saves' 99th percentile over the last poll interval.
    pub save_p99_ms: Option<f64>,
    pub store_backend: String,
    pub store_available: bool,
    /// When the store last changed state (event 59520 / 59521), Unix ms.
    pub store_changed_at_ms: Option<u64>,
    pub version: String,
    pub uptime_s: u64,
}

/// What an operator reads in the state column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    Down,
    Serving,
    Draining,
    SafeToStop,
}

impl InstanceView {
    pub fn state(&self) -> InstanceState {
        match (self.up, self.enabled, self.sessions_active) {
            (false, _, _) => InstanceState::Down,
            (true, true, _) => InstanceState::Serving,
            (true, false, 0) => InstanceState::SafeToStop,
            (true, false, _) => InstanceState::Draining,
        }
    }
}

impl InstanceState {
    /// In words (never colour alone).
    pub fn label(self) -> &'static str {
        match self {
            InstanceState::Down => "down",
            InstanceState::Serving => "serving",
            InstanceState::Draining => "draining",
            InstanceState::SafeToStop => "drained: safe to stop",
        }
    }

    /// The CSS class that colours it.
    pub fn class(self) -> &'static str {
        match self {
            InstanceState::Down => "bad",
            InstanceState::Serving => "good",
            InstanceState::Draining => "warn",
            InstanceState::SafeToStop => "calm",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayView {
    pub url: String,
    pub up: bool,
    pub failovers: u64,
    pub instances_healthy: Option<u64>,
}

/// One instance's recent history, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub instance: String,
    pub messages_per_s: Vec<f64>,
    pub sessions: Vec<u64>,
}

/// Formats a duration in seconds the way a row has room for.
pub fn short_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_safe_to_stop_only_when_up_disabled_and_empty() {
        let mut i = InstanceView {
            up: true,
            enabled: false,
            sessions_active: 2,
            ..Default::default()
        };
        assert_eq!(i.state(), InstanceState::Draining);
        i.sessions_active = 0;
        assert_eq!(i.state(), InstanceState::SafeToStop);
        i.up = false;
        assert_eq!(i.state(), InstanceState::Down);
        i.up = true;
        i.enabled = true;
        assert_eq!(i.state(), InstanceState::Serving);
    }

    #[test]
    fn durations_fit_a_cell() {
        assert_eq!(short_duration(5), "5s");
        assert_eq!(short_duration(125), "2m 5s");
        assert_eq!(short_duration(7260), "2h 1m");
        assert_eq!(short_duration(90000), "1d 1h");
    }
}
