//! The instances behind a gateway and what it knows of their health.
//!
//! Health is watched actively (`GET /status` every `health-interval`, a
//! short timeout) and passively (a refused connection or a timed-out request
//! marks the instance down at once). Every request to an instance races its
//! `down` token, so the moment an instance is found dead (or frozen), the
//! requests and WebSocket relays waiting on it fail over.

use crate::telemetry::{events, metrics as m};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Consecutive failed checks before an instance that still accepts
/// connections (but answers late or wrong) counts as down.
const FAILURES_TO_DOWN: u32 = 2;
/// How long an instance must have reported its session store unavailable,
/// in every check, before its chats are moved to one that reaches the
/// store: longer than the instances' store probe takes to notice an outage
/// (a probe each second, 2 s timeout), so that in an outage of the store
/// itself every instance reports it before any is taken for the odd one
/// out; and so that one failed request's blip moves nothing.
const STORE_LOST_FOR: Duration = Duration::from_secs(3);

pub use crate::contract::GatewayMember as MemberView;

struct Health {
    instance_id: Option<String>,
    healthy: bool,
    enabled: bool,
    sessions_active: i64,
    failures: u32,
    down: CancellationToken,
    /// Since when every check found its session store unavailable.
    store_lost_since: Option<std::time::Instant>,
}

pub struct Member {
    pub url: String,
    health: Mutex<Health>,
    /// Chats sent here since the last health check, so that a burst of new
    /// or restored chats spreads before the next check reports the counts.
    assigned: AtomicI64,
    /// The open channel to this instance (crate::channel), made on first use
    /// and again after it closes; closed when the instance is marked down,
    /// so that nothing queued for a frozen instance reaches it later.
    channel: Mutex<Option<Arc<crate::channel::Channel>>>,
    /// One channel handshake at a time.
    connecting: tokio::sync::Mutex<()>,
    /// The instance has no channel route (an older version): plain HTTP.
    http_only: AtomicBool,
    /// The instance answers no watches on its channel (an earlier
    /// version): participants' streams go over WebSockets of their own.
    no_watches: AtomicBool,
    /// Presented on every internal call and channel.
    secret: crate::contract::ClusterSecret,
    /// Registered in the session store with a recent heartbeat (always true
    /// for an instance configured by URL): one found by discovery that
    /// stops heartbeating is given no new chats.
    registered: AtomicBool,
    /// Added by discovery (crate::gateway::discovery), not configured.
    pub discovered: bool,
}

/// How the gateway reaches an instance for a request.
pub enum Route {
    Channel(Arc<crate::channel::Channel>),
    Http,
}

impl Member {
    pub fn id(&self) -> Option<String> {
        self.health.lock().instance_id.clone()
    }

    pub fn is_usable(&self) -> bool {
        let h = self.health.lock();
        h.healthy && h.enabled && h.instance_id.is_some() && self.registered.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.health.lock().healthy
    }

    /// Cancelled when this instance is found down.
    pub fn down_token(&self) -> CancellationToken {
        self.health.lock().down.clone()
    }

    fn load(&self) -> i64 {
        self.health.lock().sessions_active + self.assigned.load(Ordering::Relaxed)
    }

    /// The channel to this instance, opened if need be; `Route::Http` for
    /// an instance without one.
    pub async fn route(&self) -> Result<Route, String> {
        if self.http_only.load(Ordering::Relaxed) {
            return Ok(Route::Http);
        }
        if let Some(link) = self.open_channel() {
            return Ok(Route::Channel(link));
        }
        let _connecting = self.connecting.lock().await;
        if let Some(link) = self.open_channel() {
            return Ok(Route::Channel(link));
        }
        match crate::channel::Channel::connect(&self.url, &self.secret).await {
            Ok(link) => {
                *self.channel.lock() = Some(link.clone());
                Ok(Route::Channel(link))
            }
            Err(crate::channel::ConnectError::Unsupported) => {
                self.http_only.store(true, Ordering::Relaxed);
                Ok(Route::Http)
            }
            Err(crate::channel::ConnectError::Failed(why)) => Err(why),
        }
    }

    /// Whether participants' streams may be watches over the channel.
    pub fn takes_watches(&self) -> bool {
        !self.no_watches.load(Ordering::Relaxed)
    }

    /// The instance answered a watch 405: it has none.
    pub fn refuses_watches(&self) {
        if !self.no_watches.swap(true, Ordering::Relaxed) {
            tracing::info!(instance = %self.url, "instance takes no watches (an earlier version): participants' streams use WebSockets to it");
        }
    }

    fn open_channel(&self) -> Option<Arc<crate::channel::Channel>> {
        self.channel.lock().clone().filter(|l| !l.is_closed())
    }

    /// Close the channel: requests still queued on it are dropped (their
    /// callers have failed over) and the next request opens a new one.
    fn close_channel(&self) {
        if let Some(link) = self.channel.lock().take() {
            link.close();
        }
    }

    pub fn view(&self) -> MemberView {
        let h = self.health.lock();
        MemberView {
            url: self.url.clone(),
            instance_id: h.instance_id.clone(),
            healthy: h.healthy,
            enabled: h.enabled,
            sessions_active: h.sessions_active,
            channel: self.open_channel().is_some(),
        }
    }
}

pub struct Pool {
    /// Configured by URL, then added by discovery; never removed (a chat's
    /// owner must stay reachable by id until its chats have moved).
    members: parking_lot::RwLock<Vec<Arc<Member>>>,
    client: reqwest::Client,
    channel: bool,
    secret: crate::contract::ClusterSecret,
    /// Set by `spawn_health_checks`: how members added later are checked.
    checks: Mutex<Option<(Duration, CancellationToken)>>,
}

impl Pool {
    /// `channel`: reach the instances over the channel (crate::channel), else
    /// over HTTP only.
    pub fn new(
        urls: &[String],
        client: reqwest::Client,
        channel: bool,
        secret: &crate::contract::ClusterSecret,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool {
            members: Default::default(),
            client,
            channel,
            secret: secret.clone(),
            checks: Mutex::new(None),
        });
        for url in urls {
            pool.add(url);
        }
        pool
    }

    /// Add the instance at `url` unless it is a member already; the new
    /// member, checked from now on like the others.
    pub fn add(self: &Arc<Self>, url: &str) -> Option<Arc<Member>> {
        self.add_member(url, false)
    }

    /// [`Pool::add`] for an instance found by discovery.
    pub fn add_discovered(self: &Arc<Self>, url: &str) -> Option<Arc<Member>> {
        self.add_member(url, true)
    }

    /// Discovery saw (or stopped seeing) `member`'s heartbeat; whether that
    /// changed anything.
    pub fn set_registered(&self, member: &Member, registered: bool) -> bool {
        let changed = member.registered.swap(registered, Ordering::Relaxed) != registered;
        if changed {
            self.export();
        }
        changed
    }

    fn add_member(self: &Arc<Self>, url: &str, discovered: bool) -> Option<Arc<Member>> {
        let url = url.trim_end_matches('/');
        let member = {
            let mut members = self.members.write();
            if members.iter().any(|m| m.url == url) {
                return None;
            }
            let member = Arc::new(Member {
                url: url.to_owned(),
                health: Mutex::new(Health {
                    instance_id: None,
                    healthy: false,
                    enabled: false,
                    sessions_active: 0,
                    failures: 0,
                    down: CancellationToken::new(),
                    store_lost_since: None,
                }),
                assigned: AtomicI64::new(0),
                channel: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                http_only: AtomicBool::new(!self.channel),
                no_watches: AtomicBool::new(false),
                secret: self.secret.clone(),
                registered: AtomicBool::new(true),
                discovered,
            });
            members.push(member.clone());
            member
        };
        if let Some((interval, stop)) = self.checks.lock().clone() {
            self.spawn_check(member.clone(), interval, stop);
        }
        Some(member)
    }

    /// The members now.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.members.read().clone()
    }

    /// How many members there are: the most instances a request tries.
    pub fn member_count(&self) -> usize {
        self.members.read().len()
    }

    pub fn member_by_url(&self, url: &str) -> Option<Arc<Member>> {
        let url = url.trim_end_matches('/');
        self.members.read().iter().find(|m| m.url == url).cloned()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<Member>> {
        self.members
            .read()
            .iter()
            .find(|m| m.id().as_deref() == Some(id))
            .cloned()
    }

    pub fn views(&self) -> Vec<MemberView> {
        self.members.read().iter().map(|m| m.view()).collect()
    }

    /// The usable instance with the fewest chats; `avoid` is taken only if
    /// nothing else is usable.
    pub fn pick(&self, avoid: Option<&Member>) -> Option<Arc<Member>> {
        let members = self.members.read();
        let usable = members.iter().filter(|m| m.is_usable());
        let best = usable
            .clone()
            .filter(|m| avoid.is_none_or(|a| !std::ptr::eq(a, m.as_ref())))
            .min_by_key(|m| m.load())
            .or_else(|| usable.min_by_key(|m| m.load()))
            .cloned();
        if let Some(m) = &best {
            m.assigned.fetch_add(1, Ordering::Relaxed);
        }
        best
    }

    /// Any healthy instance (enabled or not), to ask the session store.
    pub fn any_healthy(&self, avoid: Option<&Member>) -> Option<Arc<Member>> {
        let members = self.members.read();
        let healthy = members.iter().filter(|m| m.is_healthy());
        healthy
            .clone()
            .find(|m| avoid.is_none_or(|a| !std::ptr::eq(a, m.as_ref())))
            .or_else(|| members.iter().find(|m| m.is_healthy()))
            .cloned()
    }

    /// Whether an instance other than `member` is usable (healthy, enabled,
    /// its session store available).
    fn another_reaches_the_store(&self, member: &Member) -> bool {
        self.members
            .read()
            .iter()
            .any(|m| !std::ptr::eq(m.as_ref(), member) && m.is_usable())
    }

    /// A request to `member` failed at the transport level: down at once.
    pub fn report_failure(&self, member: &Member, why: &str) {
        self.mark_down(member, why);
    }

    fn mark_down(&self, member: &Member, why: &str) {
        let mut h = member.health.lock();
        h.failures = h.failures.saturating_add(1);
        if h.healthy {
            h.healthy = false;
            h.down.cancel();
            member.close_channel();
            tracing::warn!(
                event_id = events::GATEWAY_INSTANCE_DOWN,
                instance = h.instance_id.as_deref().unwrap_or("?"),
                url = %member.url,
                reason = why,
                "instance marked down"
            );
            drop(h);
            self.export();
        }
    }

    fn export(&self) {
        let usable = self.members.read().iter().filter(|m| m.is_usable()).count();
        metrics::gauge!(m::GATEWAY_INSTANCES_HEALTHY).set(usable as f64);
    }

    /// Check one instance now.
    pub async fn check(&self, member: &Member, timeout: Duration) {
        // Chats placed from here on may be missing from the answer's count.
        let assigned_before = member.assigned.load(Ordering::Relaxed);
        let result = self
            .client
            .get(format!("{}{}", member.url, crate::contract::paths::STATUS))
            .timeout(timeout)
            .send()
            .await;
        let (status, refused) = match result {
            Ok(r) if r.status().is_success() => (
                r.json::<crate::contract::InstanceStatus>().await.ok(),
                false,
            ),
            Ok(_) => (None, false),
            Err(e) => (None, e.is_connect()),
        };
        // An instance that cannot reach the session store while another
        // can is no place for its chats: they are restored on one that can
        // (which fences it), as from an instance that is down. When it
        // reaches the store again it finds them claimed elsewhere and lets
        // them go (59608). When no instance reaches the store, the chats
        // stay where they are: moving them could not help.
        if let Some(s) = &status {
            let lost_for = {
                let mut h = member.health.lock();
                if s.store.available {
                    h.store_lost_since = None;
                    Duration::ZERO
                } else {
                    h.store_lost_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                }
            };
            if lost_for >= STORE_LOST_FOR && self.another_reaches_the_store(member) {
                self.mark_down(member, "cannot reach the session store");
                return;
            }
        }
        let Some(status) = status else {
            let failures = member.health.lock().failures + 1;
            if refused || failures >= FAILURES_TO_DOWN {
                self.mark_down(
                    member,
                    if refused {
                        "connection refused"
                    } else {
                        "health check failed"
                    },
                );
            } else {
                member.health.lock().failures = failures;
            }
            return;
        };
        let mut h = member.health.lock();
        let was_healthy = h.healthy;
        let was_enabled = h.enabled;
        h.instance_id = Some(status.instance_id);
        // Not ready for new chats when its session store is down.
        h.enabled = status.enabled && status.store.available;
        h.sessions_active = i64::try_from(status.sessions_active).unwrap_or(i64::MAX);
        h.failures = 0;
        h.healthy = true;
        // The answer counts the chats placed before it was asked for; those
        // placed while it was on its way stay counted until the next one.
        member
            .assigned
            .fetch_sub(assigned_before, Ordering::Relaxed);
        if !was_healthy {
            h.down = CancellationToken::new();
            // Back (perhaps a newer version after an upgrade): try the
            // channel, and watches on it, again.
            if self.channel {
                member.http_only.store(false, Ordering::Relaxed);
            }
            member.no_watches.store(false, Ordering::Relaxed);
            tracing::info!(
                event_id = events::GATEWAY_INSTANCE_UP,
                instance = h.instance_id.as_deref().unwrap_or("?"),
                url = %member.url,
                "instance healthy"
            );
        }
        let changed = !was_healthy || was_enabled != h.enabled;
        drop(h);
        if changed {
            self.export();
        }
    }

    /// Check every instance, and every one added later, every `interval`
    /// until `stop`.
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        *self.checks.lock() = Some((interval, stop.clone()));
        for member in self.members() {
            self.spawn_check(member, interval, stop.clone());
        }
    }

    fn spawn_check(
        self: &Arc<Self>,
        member: Arc<Member>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let timeout = (interval * 2).max(Duration::from_millis(500));
        let pool = self.clone();
        crate::process::every(interval, stop, move || {
            let (pool, member) = (pool.clone(), member.clone());
            async move { pool.check(&member, timeout).await }
        });
    }
}
