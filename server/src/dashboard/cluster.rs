//! The dashboard's view of the cluster: every second it asks each instance
//! and gateway for its status (each with its own timeout, all at once, so
//! a frozen instance shows as down without holding up the others) and
//! publishes one [`ClusterView`] that every open page receives.
//!
//! Rates come from differences between polls: messages/s from the
//! instance's `message_submitted` KPI, the save latency's 99th percentile
//! from the buckets of `confab_transcript_save_duration_seconds`.

use crate::contract::{
    internal, paths, ClusterSecret, EventsPage, GatewayStatus, InstanceStatus, Kpi, SessionsPage,
    CLUSTER_SECRET_HEADER,
};
use confab_dashboard::model::{
    ClusterView, EventRow, GatewayView, InstanceView, Series, SessionRow, SessionsView,
    TranscriptLine,
};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// One chart point every this many polls (of one second)…
const HISTORY_STEP: u32 = 5;
/// …and ten minutes of them.
const HISTORY_POINTS: usize = 120;
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Numbered events kept (newest) across the instances.
const EVENTS_KEPT: usize = 500;

const SAVE_BUCKETS: &str = "confab_transcript_save_duration_seconds_bucket{";

pub struct Cluster {
    pub client: reqwest::Client,
    instances: Vec<String>,
    pub gateways: Vec<String>,
    pub supervisor: Option<String>,
    pub admin_token: String,
    pub agent_credential: Option<String>,
    pub state_dir: Option<std::path::PathBuf>,
    /// Reads the gateways' events (`/internal/v1/events`).
    cluster_secret: Option<ClusterSecret>,
    pub tests: Mutex<super::restoration::Tests>,
    timeout: Duration,
    /// Taken on shutdown: every `/live` stream then ends.
    tx: Mutex<Option<watch::Sender<Arc<ClusterView>>>>,
    rx: watch::Receiver<Arc<ClusterView>>,
    state: Mutex<PollState>,
    /// Wakes the poller early (after an action).
    pub poke: Notify,
}

#[derive(Default)]
struct PollState {
    /// Per instance URL: what the last poll saw, for rates.
    last: HashMap<String, Sample>,
    /// Per instance URL: its id when last seen, for a row that is down.
    ids: HashMap<String, String>,
    /// Instance ids whose `/admin/kill` is on.
    killable: std::collections::HashSet<String>,
    /// Per instance URL: (pid, cursor) of its event stream; a new pid
    /// starts from the beginning.
    event_cursors: HashMap<String, (u32, u64)>,
    events: VecDeque<EventRow>,
    history: HashMap<String, (VecDeque<f64>, VecDeque<u64>)>,
    /// Per instance URL: the message count at the last chart point.
    point_base: HashMap<String, (Instant, u64)>,
    polls: u32,
}

struct Sample {
    at: Instant,
    messages: u64,
    save_buckets: Vec<(f64, u64)>,
}

/// What one poll of one instance returned.
struct Polled {
    status: Result<InstanceStatus, String>,
    kpi: Option<Kpi>,
    buckets: Vec<(f64, u64)>,
    events: Option<EventsPage>,
}

/// Where the cluster is and what the dashboard may present to it.
pub struct Settings {
    pub instances: Vec<String>,
    pub gateways: Vec<String>,
    pub supervisor: Option<String>,
    pub admin_token: String,
    pub agent_credential: Option<String>,
    pub state_dir: Option<std::path::PathBuf>,
    pub cluster_secret: Option<String>,
    pub timeout: Duration,
}

impl Cluster {
    pub fn new(client: reqwest::Client, settings: Settings) -> Arc<Self> {
        let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
        let Settings {
            instances,
            gateways,
            supervisor,
            admin_token,
            agent_credential,
            state_dir,
            cluster_secret,
            timeout,
        } = settings;
        Arc::new(Cluster {
            client,
            instances,
            gateways,
            supervisor,
            admin_token,
            tests: Mutex::new(super::restoration::Tests::load(state_dir.as_ref())),
            agent_credential,
            cluster_secret: cluster_secret.as_deref().map(ClusterSecret::new),
            state_dir,
            timeout,
            tx: Mutex::new(Some(tx)),
            rx,
            state: Mutex::new(PollState::default()),
            poke: Notify::new(),
        })
    }

    pub fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }

    pub fn latest(&self) -> Arc<ClusterView> {
        self.rx.borrow().clone()
    }

    /// No more views: the streams following them end.
    pub fn close(&self) {
        self.tx.lock().take();
    }

    /// The URL of the instance with this id (as last seen).
    pub fn url_of(&self, id: &str) -> Option<String> {
        self.latest()
            .instances
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.url.clone())
    }

    /// The URL of the instance with this id, polling once more if the last
    /// view does not know it (an instance that was not up yet).
    pub async fn find(&self, id: &str) -> Result<String, String> {
        if let Some(url) = self.url_of(id) {
            return Ok(url);
        }
        self.poll().await;
        self.url_of(id)
            .ok_or_else(|| format!("no instance {id} in this cluster"))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: String) -> Result<T, String> {
        let answer = self
            .client
            .get(&url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        if !answer.status().is_success() {
            return Err(format!("answered {}", answer.status()));
        }
        answer.json().await.map_err(|e| describe(&e))
    }

    async fn poll_instance(&self, url: &str, cursor: u64) -> Polled {
        let events = async {
            let answer = self
                .client
                .get(format!("{url}{}?after={cursor}", paths::ADMIN_EVENTS))
                .bearer_auth(&self.admin_token)
                .timeout(self.timeout)
                .send()
                .await
                .ok()?;
            answer.json::<EventsPage>().await.ok()
        };
        let (status, kpi, metrics, events) = tokio::join!(
            self.get_json::<InstanceStatus>(format!("{url}{}", paths::STATUS)),
            self.get_json::<Kpi>(format!("{url}{}", paths::KPI)),
            self.get_text(format!("{url}{}", paths::METRICS)),
            events,
        );
        Polled {
            status,
            kpi: kpi.ok(),
            buckets: metrics.map(|m| save_buckets(&m)).unwrap_or_default(),
            events,
        }
    }

    async fn get_text(&self, url: String) -> Result<String, String> {
        let answer = self
            .client
            .get(&url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        answer.text().await.map_err(|e| describe(&e))
    }

    /// Where each component's event stream was left.
    fn cursors(&self, urls: &[String]) -> Vec<u64> {
        let state = self.state.lock();
        urls.iter()
            .map(|u| state.event_cursors.get(u).map_or(0, |&(_, c)| c))
            .collect()
    }

    /// One poll of everything, instances and gateways at once; publishes
    /// the new view.
    pub async fn poll(&self) {
        let instances = futures_util::future::join_all(
            self.instances
                .iter()
                .zip(self.cursors(&self.instances))
                .map(|(u, c)| self.poll_instance(u, c)),
        );
        let gateways = futures_util::future::join_all(
            self.gateways
                .iter()
                .zip(self.cursors(&self.gateways))
                .map(|(u, c)| self.poll_gateway(u, c)),
        );
        let (instances, gateways) = tokio::join!(instances, gateways);
        let view = Arc::new(self.build(instances, gateways));
        if let Some(tx) = self.tx.lock().as_ref() {
            tx.send_replace(view);
        }
    }

    /// A gateway's status, and its numbered events (597xx) when the
    /// dashboard has the cluster secret they are behind.
    async fn poll_gateway(
        &self,
        url: &str,
        cursor: u64,
    ) -> (Result<GatewayStatus, String>, Option<EventsPage>) {
        let events = async {
            let secret = self.cluster_secret.as_ref()?;
            let answer = self
                .client
                .get(format!("{url}{}?after={cursor}", internal::EVENTS))
                .header(CLUSTER_SECRET_HEADER, secret.header_value())
                .timeout(self.timeout)
                .send()
                .await
                .ok()?;
            answer.json::<EventsPage>().await.ok()
        };
        tokio::join!(
            self.get_json::<GatewayStatus>(format!("{url}{}", paths::STATUS)),
            events
        )
    }

    fn build(
        &self,
        polled: Vec<Polled>,
        gateways: Vec<(Result<GatewayStatus, String>, Option<EventsPage>)>,
    ) -> ClusterView {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.polls += 1;
        let take_point = state.polls % HISTORY_STEP == 1;
        let mut rows = Vec::new();
        for (url, p) in self.instances.iter().zip(polled) {
            let row = match p.status {
                Ok(status) => {
                    state.ids.insert(url.clone(), status.instance_id.clone());
                    take_events(&mut state, url, status.pid, &status.instance_id, p.events);
                    if status.admin_kill_enabled {
                        state.killable.insert(status.instance_id.clone());
                    } else {
                        state.killable.remove(&status.instance_id);
                    }
                    let messages = p.kpi.as_ref().map(|k| k.message_submitted);
                    let (rate, p99) = match (state.last.get(url), messages) {
                        (Some(last), Some(m)) => {
                            let secs = now.duration_since(last.at).as_secs_f64().max(0.001);
                            (
                                m.saturating_sub(last.messages) as f64 / secs,
                                percentile(&last.save_buckets, &p.buckets, 0.99),
                            )
                        }
                        _ => (0.0, None),
                    };
                    if let Some(m) = messages {
                        state.last.insert(
                            url.clone(),
                            Sample {
                                at: now,
                                messages: m,
                                save_buckets: p.buckets,
                            },
                        );
                    }
                    InstanceView {
                        id: status.instance_id,
                        url: url.clone(),
                        up: true,
                        error: None,
                        enabled: status.enabled,
                        sessions_active: status.sessions_active,
                        sessions_waiting: status.sessions_waiting,
                        messages_per_s: rate,
                        save_p99_ms: p99.map(|s| s * 1000.0),
                        store_backend: status.store.backend,
                        store_available: status.store.available,
                        store_changed_at_ms: status.store.changed_at_ms,
                        version: status.version,
                        uptime_s: status.uptime_s,
                    }
                }
                Err(e) => {
                    state.last.remove(url);
                    InstanceView {
                        id: state.ids.get(url).cloned().unwrap_or_else(|| url.clone()),
                        url: url.clone(),
                        up: false,
                        error: Some(e),
                        ..Default::default()
                    }
                }
            };
            rows.push(row);
        }
        if take_point {
            for row in &rows {
                let total = state.last.get(&row.url).map(|s| s.messages);
                let rate = match (state.point_base.get(&row.url), total) {
                    (Some(&(at, base)), Some(m)) => {
                        m.saturating_sub(base) as f64
                            / now.duration_since(at).as_secs_f64().max(0.001)
                    }
                    _ => row.messages_per_s,
                };
                match total {
                    Some(m) => state.point_base.insert(row.url.clone(), (now, m)),
                    None => state.point_base.remove(&row.url),
                };
                let (rates, sessions) = state.history.entry(row.url.clone()).or_default();
                rates.push_back(if row.up { rate } else { 0.0 });
                sessions.push_back(row.sessions_active);
                while rates.len() > HISTORY_POINTS {
                    rates.pop_front();
                    sessions.pop_front();
                }
            }
        }
        let history = rows
            .iter()
            .filter_map(|r| {
                state.history.get(&r.url).map(|(rates, sessions)| Series {
                    instance: r.id.clone(),
                    messages_per_s: rates.iter().copied().collect(),
                    sessions: sessions.iter().copied().collect(),
                })
            })
            .collect();
        let named = self.gateways.len() > 1;
        let gateways =
            self.gateways
                .iter()
                .zip(gateways)
                .enumerate()
                .map(|(n, (url, (g, events)))| {
                    if let Ok(g) = &g {
                        let source = if named {
                            format!("gateway-{}", n + 1)
                        } else {
                            "gateway".into()
                        };
                        take_events(&mut state, url, g.pid, &source, events);
                    }
                    (url, g)
                })
                .map(|(url, g)| match g {
                    Ok(g) => GatewayView {
                        url: url.clone(),
                        up: true,
                        failovers: g.failovers,
                        instances_healthy: Some(
                            g.instances.iter().filter(|i| i.healthy).count() as u64
                        ),
                    },
                    Err(_) => GatewayView {
                        url: url.clone(),
                        ..Default::default()
                    },
                })
                .collect();
        let test_blocked = self.blocked(&rows, &state.killable);
        let (test_running, test_history, rolling_restart) = {
            let tests = self.tests.lock();
            (
                tests.running.clone(),
                tests.history.clone(),
                tests.rolling.clone(),
            )
        };
        let mut events: Vec<EventRow> = state.events.iter().cloned().collect();
        events.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
        ClusterView {
            events,
            rolling_restart,
            can_roll: self.supervisor.is_some(),
            test_blocked,
            test_running,
            test_history,
            at_ms: crate::session::now_ms() as u64,
            chats_active: rows.iter().map(|r| r.sessions_active).sum(),
            chats_waiting: rows.iter().map(|r| r.sessions_waiting).sum(),
            messages_per_s: rows.iter().map(|r| r.messages_per_s).sum(),
            instances: rows,
            gateways,
            history,
            history_step_s: HISTORY_STEP * POLL_INTERVAL.as_secs() as u32,
        }
    }

    /// Why the restoration test cannot run, in words for its button.
    fn blocked(
        &self,
        rows: &[InstanceView],
        killable: &std::collections::HashSet<String>,
    ) -> Option<String> {
        if self.gateways.is_empty() {
            return Some(
                "no gateway configured (dashboard.gateways): the test chats go through one".into(),
            );
        }
        if self.agent_credential.is_none() {
            return Some("no agent credential configured (dashboard.agent-credential): the test joins its chats as an agent".into());
        }
        if self.supervisor.is_none()
            && !rows
                .iter()
                .filter(|r| r.up)
                .all(|r| killable.contains(&r.id))
        {
            return Some("cannot kill an instance: no confab up supervisor (dashboard.supervisor), and /admin/kill is off on the instances (server.admin-kill-enabled)".into());
        }
        if rows.iter().filter(|r| r.up && r.enabled).count() < 2 {
            return Some(
                "needs two instances that serve: one to kill, one to take its chats".into(),
            );
        }
        None
    }

    /// The latest test-blocking reason, for the server function.
    pub fn test_blocked(&self) -> Option<String> {
        self.latest().test_blocked.clone()
    }

    /// kill -9 an instance: through the supervisor, else its `/admin/kill`.
    pub async fn kill(&self, id: &str) -> Result<(), String> {
        let request = match &self.supervisor {
            Some(sup) => self.client.post(format!("{sup}/instances/{id}/kill")),
            None => {
                let url = self.find(id).await?;
                self.client.post(format!("{url}{}", paths::ADMIN_KILL))
            }
        };
        let answer = request
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match answer {
            Ok(a) if a.status().is_success() => {}
            Ok(a) => return Err(format!("the kill was refused: {}", a.status())),
            // An instance killing itself may not finish its answer.
            Err(_) if self.supervisor.is_none() => {}
            Err(e) => return Err(format!("the kill failed: {}", describe(&e))),
        }
        if self.supervisor.is_none() {
            // `/admin/kill` answers first and dies a moment later: the
            // test must not go on while the instance still serves.
            let url = self.find(id).await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while self
                .client
                .get(format!("{url}{}", paths::HEALTHZ))
                .timeout(Duration::from_millis(200))
                .send()
                .await
                .is_ok()
            {
                if Instant::now() > deadline {
                    return Err(format!("{id} still answers 10 s after /admin/kill"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tracing::warn!(
            instance = id,
            "killed with SIGKILL from the dashboard (restoration test)"
        );
        self.poke.notify_one();
        Ok(())
    }

    /// Start a killed instance again (supervisor only): Ok(false) when
    /// there is no supervisor to do it.
    pub async fn restart(&self, id: &str) -> Result<bool, String> {
        if self.supervisor.is_none() {
            return Ok(false);
        }
        self.supervise(id, "start").await.map(|()| true)
    }

    /// Ask the supervisor to `start` or `stop` an instance; answered once
    /// done (started: serving; stopped: exited).
    pub async fn supervise(&self, id: &str, action: &str) -> Result<(), String> {
        let Some(sup) = &self.supervisor else {
            return Err("no confab up supervisor".into());
        };
        let answer = self
            .client
            .post(format!("{sup}/instances/{id}/{action}"))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(70))
            .send()
            .await
            .map_err(|e| format!("the supervisor: {}", describe(&e)))?;
        if !answer.status().is_success() {
            let why = answer
                .json::<crate::contract::answers::ErrorBody>()
                .await
                .map(|b| b.error.message)
                .unwrap_or_default();
            return Err(format!("the supervisor could not {action} it: {why}"));
        }
        self.poke.notify_one();
        Ok(())
    }

    /// Drain (`enabled = false`) or enable one instance through its admin
    /// API; the next view follows at once.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), String> {
        let url = self.find(id).await?;
        let path = if enabled {
            paths::ADMIN_ENABLE
        } else {
            paths::ADMIN_DISABLE
        };
        let answer = self
            .client
            .post(format!("{url}{path}"))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("{id}: {}", describe(&e)))?;
        if !answer.status().is_success() {
            return Err(format!("{id} answered {}", answer.status()));
        }
        tracing::info!(instance = id, enabled, "set from the dashboard");
        self.poke.notify_one();
        Ok(())
    }
}

impl Cluster {
    /// A page of an instance's live chats (its admin listing).
    pub async fn sessions(&self, id: &str, after: &str) -> Result<SessionsView, String> {
        let url = self.find(id).await?;
        let answer = self
            .admin_get(id, &format!("{url}{}", paths::ADMIN_SESSIONS), after)
            .await?;
        if !answer.status().is_success() {
            return Err(format!("{id} answered {}", answer.status()));
        }
        let page: SessionsPage = answer.json().await.map_err(|e| describe(&e))?;
        Ok(SessionsView {
            instance: id.to_owned(),
            next: page.next,
            sessions: page
                .sessions
                .into_iter()
                .map(|s| SessionRow {
                    id: s.session_id,
                    state: s.state,
                    participants: s
                        .participants
                        .iter()
                        .map(|(nick, role)| format!("{nick} ({role})"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    created_at_ms: s.created_at_ms.max(0) as u64,
                    age_s: (crate::session::now_ms() - s.created_at_ms).max(0) as u64 / 1000,
                    events: s.events,
                })
                .collect(),
        })
    }

    /// GET one page of an instance's admin listing, after `after`.
    async fn admin_get(
        &self,
        id: &str,
        url: &str,
        after: impl serde::Serialize,
    ) -> Result<reqwest::Response, String> {
        self.client
            .get(url)
            .query(&[("after", after)])
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("{id}: {}", describe(&e)))
    }

    /// A hosted chat's whole transcript, page by page.
    pub async fn transcript(&self, id: &str, chat: &str) -> Result<Vec<TranscriptLine>, String> {
        crate::contract::check_chat_id(chat).map_err(|_| format!("no chat {chat}"))?;
        let url = self.find(id).await?;
        let mut lines = Vec::new();
        let mut after = 0u64;
        loop {
            let page_url = format!("{url}{}", paths::admin_transcript(chat));
            let answer = self.admin_get(id, &page_url, after).await?;
            if !answer.status().is_success() {
                return Err(format!("{id} answered {} for chat {chat}", answer.status()));
            }
            let page: crate::contract::answers::AdminTranscript =
                answer.json().await.map_err(|e| describe(&e))?;
            let empty = page.events.is_empty();
            lines.extend(page.events.into_iter().map(|e| TranscriptLine {
                seq: e.seq,
                kind: e.kind.as_str().to_owned(),
                nickname: e.nickname.unwrap_or_default(),
                text: e.text.unwrap_or_default(),
                reason: e.reason.unwrap_or_default(),
                at: e.at,
            }));
            after = lines.last().map_or(after, |l| l.seq);
            if !page.more || empty {
                return Ok(lines);
            }
        }
    }
}

/// Add what one component's event page brought, following its cursor. A
/// new process numbers its events from 1 again: what was asked with the old
/// process's cursor is dropped, and the next poll starts from the beginning.
fn take_events(state: &mut PollState, url: &str, pid: u32, source: &str, page: Option<EventsPage>) {
    let same_process = state
        .event_cursors
        .get(url)
        .is_none_or(|&(known, _)| known == pid);
    let mut next = 0;
    if same_process {
        next = state.event_cursors.get(url).map_or(0, |&(_, c)| c);
        if let Some(page) = page {
            next = page.next;
            for e in page.events {
                state.events.push_front(EventRow {
                    instance: source.to_owned(),
                    at_ms: e.at_ms,
                    level: e.level,
                    event_id: e.event_id,
                    message: e.message,
                    fields: e.fields,
                });
            }
            while state.events.len() > EVENTS_KEPT {
                state.events.pop_back();
            }
        }
    }
    state.event_cursors.insert(url.to_owned(), (pid, next));
}

/// Why a request failed, in a few words for the row.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        "connection refused".into()
    } else if e.is_decode() {
        "unreadable answer".into()
    } else {
        "request failed".into()
    }
}

/// The cumulative save-duration buckets `(le, count)` of an exposition.
fn save_buckets(exposition: &str) -> Vec<(f64, u64)> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix(SAVE_BUCKETS))
        .filter_map(|rest| {
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest.rsplit(' ').next()?.trim().parse::<f64>().ok()? as u64;
            Some((le, count))
        })
        .collect()
}

/// The `q` quantile of what was observed between two snapshots of the same
/// cumulative buckets: the upper bound of the bucket it falls in (as
/// Prometheus' `histogram_quantile` without interpolation); None when
/// nothing was observed.
fn percentile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let old = before
                .iter()
                .find(|(l, _)| *l == le)
                .map(|&(_, n)| n)
                .unwrap_or(0);
            (le, n.saturating_sub(old))
        })
        .collect();
    let total = deltas.iter().map(|&(_, n)| n).max()?;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    let (le, _) = deltas.iter().find(|&&(_, n)| n >= rank)?;
    Some(if le.is_finite() {
        *le
    } else {
        // Beyond the largest bucket: say the largest finite bound.
        deltas
            .iter()
            .rev()
            .find(|(l, _)| l.is_finite())
            .map(|&(l, _)| l)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_latency_percentile_from_bucket_deltas() {
        let text = "# TYPE x histogram\n\
            confab_transcript_save_duration_seconds_bucket{le=\"0.001\"} 10\n\
            confab_transcript_save_duration_seconds_bucket{le=\"0.005\"} 90\n\
            confab_transcript_save_duration_seconds_bucket{le=\"0.025\"} 99\n\
            confab_transcript_save_duration_seconds_bucket{le=\"+Inf\"} 100\n\
            confab_transcript_save_duration_seconds_sum 0.3\n";
        let after = save_buckets(text);
        assert_eq!(after.len(), 4);
        assert_eq!(percentile(&[], &after, 0.5), Some(0.005));
        assert_eq!(percentile(&[], &after, 0.99), Some(0.025));
        assert_eq!(percentile(&after, &after, 0.99), None, "nothing new");
        let before = vec![(0.001, 10), (0.005, 90), (0.025, 90), (f64::INFINITY, 90)];
        // Since `before`, 9 saves up to 25 ms and one beyond every bucket.
        assert_eq!(percentile(&before, &after, 0.5), Some(0.025));
        assert_eq!(percentile(&before, &after, 1.0), Some(0.025));
    }
}
