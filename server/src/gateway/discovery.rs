//! Instance discovery through the session store (`gateway.discover`):
//! every second the gateway reads the instances' registry
//! (crate::instance::registration), adds an instance it does not know to
//! its pool, and gives no new chats to one whose heartbeat stopped.
//!
//! Freshness is judged by whether an instance's heartbeat *changes*, on the
//! gateway's own clock, so clock skew between hosts does not matter: a
//! registration whose value has not changed for [`STALE_AFTER`] is stale.
//! A registration seen for the first time counts only if its heartbeat is
//! within [`LEFTOVER`] of the gateway's clock (a dead instance's row, left
//! behind for hours, is not taken for a live one). When the registry cannot
//! be read, nothing changes: a gateway cut off from the store keeps its
//! instances.

use super::pool::Pool;
use crate::store::{InstanceRegistry, Registration};
use crate::telemetry::events;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A heartbeat that has not changed for this long is stale: the instance
/// gets no new chats.
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// A registration first seen with a heartbeat further than this from the
/// gateway's clock is a leftover, not an instance.
pub const LEFTOVER: Duration = Duration::from_secs(60);
/// How often the registry is read.
pub const EVERY: Duration = Duration::from_secs(1);

/// What the gateway has seen of each instance's heartbeat: its value, and
/// when the gateway saw it change to a current one (None: never, such as
/// a leftover row).
#[derive(Default)]
pub struct Heartbeats {
    seen: HashMap<String, (i64, Option<Instant>)>,
}

impl Heartbeats {
    /// Take one read of the registry at `now` (`now_ms` on the gateway's
    /// clock); each registration with whether it is fresh.
    pub fn observe(
        &mut self,
        registrations: Vec<Registration>,
        now: Instant,
        now_ms: i64,
    ) -> Vec<(Registration, bool)> {
        registrations
            .into_iter()
            .map(|r| {
                // A new value counts only if it is current: a row written
                // long ago (a leftover, or one read late) is no heartbeat.
                let current =
                    (now_ms - r.heartbeat_ms).unsigned_abs() <= LEFTOVER.as_millis() as u64;
                let changed_at = match self.seen.get(&r.instance_id) {
                    Some(&(value, at)) if value == r.heartbeat_ms => at,
                    _ => current.then_some(now),
                };
                self.seen
                    .insert(r.instance_id.clone(), (r.heartbeat_ms, changed_at));
                let fresh = changed_at.is_some_and(|at| now.duration_since(at) < STALE_AFTER);
                (r, fresh)
            })
            .collect()
    }
}

/// Read the registry every [`EVERY`] until `stop`; `open` makes the
/// registry (a Cassandra connection, a SQLite file) and is tried again
/// until it succeeds, so a gateway starts while the store is down.
pub fn spawn<F, Fut>(pool: Arc<Pool>, open: F, stop: CancellationToken)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Arc<dyn InstanceRegistry>>> + Send,
{
    tokio::spawn(async move {
        let mut registry: Option<Arc<dyn InstanceRegistry>> = None;
        let mut heartbeats = Heartbeats::default();
        let mut ticker = tokio::time::interval(EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut complained = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if registry.is_none() {
                match open().await {
                    Ok(r) => registry = Some(r),
                    Err(e) => {
                        if !std::mem::replace(&mut complained, true) {
                            tracing::warn!(error = %format!("{e:#}"), "instance discovery cannot open the session store's registry yet; retrying each second");
                        }
                        continue;
                    }
                }
            }
            let Some(r) = &registry else { continue };
            match r.registrations().await {
                Ok(list) => {
                    let observed =
                        heartbeats.observe(list, Instant::now(), crate::session::now_ms());
                    apply(&pool, observed);
                }
                Err(e) => tracing::debug!(error = %e, "instance registry not read"),
            }
        }
    });
}

/// Add fresh instances the pool lacks; mark the members discovery added
/// fresh or not. Rows are merged by URL (an instance renamed, or an address
/// reused, leaves an old row behind with the same URL): a URL is fresh if
/// any row of it is. A discovered member whose row is gone is stale; a
/// member configured by URL is left alone.
fn apply(pool: &Arc<Pool>, observed: Vec<(Registration, bool)>) {
    let mut by_url: HashMap<String, (bool, String)> = HashMap::new();
    for (r, fresh) in observed {
        let url = r.url.trim_end_matches('/').to_owned();
        let entry = by_url.entry(url).or_insert((false, r.instance_id.clone()));
        if fresh && !entry.0 {
            *entry = (true, r.instance_id);
        }
    }
    for (url, (fresh, id)) in &by_url {
        if *fresh && pool.member_by_url(url).is_none() && pool.add_discovered(url).is_some() {
            tracing::info!(event_id = events::GATEWAY_INSTANCE_DISCOVERED, instance = %id, url = %url, "instance discovered");
        }
    }
    for member in pool.members().into_iter().filter(|m| m.discovered) {
        let fresh = by_url.get(&member.url).is_some_and(|(fresh, _)| *fresh);
        if !pool.set_registered(&member, fresh) {
            continue;
        }
        let id = member.id().unwrap_or_default();
        if fresh {
            tracing::info!(event_id = events::GATEWAY_INSTANCE_REGISTRATION, instance = %id, url = %member.url, "instance heartbeat back");
        } else {
            tracing::warn!(event_id = events::GATEWAY_INSTANCE_REGISTRATION, instance = %id, url = %member.url, "instance heartbeat stopped: no new chats");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str, heartbeat_ms: i64) -> Registration {
        Registration {
            instance_id: id.into(),
            url: format!("http://{id}:7001"),
            enabled: true,
            heartbeat_ms,
        }
    }

    fn fresh(observed: &[(Registration, bool)], id: &str) -> bool {
        observed
            .iter()
            .find(|(r, _)| r.instance_id == id)
            .map(|(_, f)| *f)
            .unwrap()
    }

    #[test]
    fn a_heartbeat_that_stops_changing_goes_stale_and_comes_back_when_it_changes() {
        let mut h = Heartbeats::default();
        let t0 = Instant::now();
        let wall = 1_700_000_000_000;
        // Seen for the first time with a current heartbeat: fresh.
        assert!(fresh(&h.observe(vec![reg("a", wall)], t0, wall), "a"));
        // Changing each second: fresh.
        for s in 1..10 {
            let o = h.observe(
                vec![reg("a", wall + s * 1000)],
                t0 + Duration::from_secs(s as u64),
                wall,
            );
            assert!(fresh(&o, "a"));
        }
        // Stops at 9 s: fresh until 5 s after the last change, then stale.
        let stuck = wall + 9000;
        assert!(fresh(
            &h.observe(vec![reg("a", stuck)], t0 + Duration::from_secs(13), wall),
            "a"
        ));
        assert!(!fresh(
            &h.observe(vec![reg("a", stuck)], t0 + Duration::from_secs(14), wall),
            "a"
        ));
        // Changes again: fresh at once.
        assert!(fresh(
            &h.observe(
                vec![reg("a", stuck + 1)],
                t0 + Duration::from_secs(20),
                wall
            ),
            "a"
        ));
    }

    #[test]
    fn clocks_are_not_compared_except_to_tell_a_leftover() {
        let mut h = Heartbeats::default();
        let t0 = Instant::now();
        let wall = 1_700_000_000_000;
        // An instance whose clock runs 30 s ahead: fresh, and stays fresh
        // while it changes.
        let ahead = wall + 30_000;
        assert!(fresh(
            &h.observe(vec![reg("ahead", ahead)], t0, wall),
            "ahead"
        ));
        assert!(fresh(
            &h.observe(
                vec![reg("ahead", ahead + 1000)],
                t0 + Duration::from_secs(6),
                wall
            ),
            "ahead"
        ));
        // A row left by an instance dead for an hour: stale from the start
        // (also right after the gateway started), and again when it changes
        // to another old value; fresh if it ever heartbeats again.
        let old = wall - 3_600_000;
        assert!(!fresh(&h.observe(vec![reg("old", old)], t0, wall), "old"));
        assert!(!fresh(
            &h.observe(vec![reg("old", old + 1)], t0, wall),
            "old"
        ));
        assert!(fresh(
            &h.observe(vec![reg("old", wall)], t0 + Duration::from_secs(1), wall),
            "old"
        ));
    }
}
