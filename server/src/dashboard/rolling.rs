//! Rolling restart of a `confab up` cluster, the reference's N+1 upgrade
//! done by the dashboard: for each instance in turn, drain it, wait until
//! it carries no chat (or until the operator's time limit, after which
//! SIGTERM moves its remaining chats: the instance releases them on the
//! way out and the gateways restore them elsewhere at their next request),
//! stop it, start it through the supervisor, enable it. Chats keep going
//! throughout; each step shows as it runs.

use super::cluster::Cluster;
use super::restoration::{Recorder, Step};
use confab_dashboard::model::{TestRun, Verdict};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest wait for an instance to drain that an operator may set.
pub const MAX_DRAIN_LIMIT_S: u32 = 3600;

pub fn start(cluster: &Arc<Cluster>, drain_limit_s: u32) -> Result<(), String> {
    if !(1..=MAX_DRAIN_LIMIT_S).contains(&drain_limit_s) {
        return Err(format!(
            "the drain time limit must be 1 to {MAX_DRAIN_LIMIT_S} s, got {drain_limit_s}"
        ));
    }
    if cluster.supervisor.is_none() {
        return Err(
            "a rolling restart needs the confab up supervisor (dashboard.supervisor)".into(),
        );
    }
    let ids: Vec<String> = cluster
        .latest()
        .instances
        .iter()
        .map(|i| i.id.clone())
        .collect();
    if cluster.latest().instances.iter().filter(|i| i.up).count() < 2 {
        return Err("a rolling restart needs at least two serving instances".into());
    }
    {
        let mut tests = cluster.tests.lock();
        if tests.rolling_active {
            return Err("a rolling restart is running already".into());
        }
        if tests.running.is_some() {
            return Err("a restoration test is running: wait for it to end".into());
        }
        tests.rolling_active = true;
        tests.rolling = Some(TestRun {
            started_ms: crate::session::now_ms() as u64,
            ..Default::default()
        });
    }
    cluster.poke.notify_one();
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let rec = Recorder::rolling(cluster.clone());
        let limit = Duration::from_secs(drain_limit_s.into());
        let result = restart_each(&cluster, &rec, &ids, limit).await;
        let verdict = match result {
            Ok(()) => Verdict {
                passed: true,
                reason: format!("{} instance(s) restarted one by one", ids.len()),
            },
            Err(reason) => Verdict {
                passed: false,
                reason,
            },
        };
        tracing::info!(passed = verdict.passed, reason = %verdict.reason, "rolling restart finished");
        rec.update(|run| run.verdict = Some(verdict));
        cluster.tests.lock().rolling_active = false;
        cluster.poke.notify_one();
    });
    Ok(())
}

async fn restart_each(
    cluster: &Cluster,
    rec: &Recorder,
    ids: &[String],
    limit: Duration,
) -> Result<(), String> {
    for id in ids {
        rec.step(format!("Drain {id}"), async {
            cluster.set_enabled(id, false).await?;
            Ok(((), "takes no new chats".into()))
        })
        .await?;
        rec.step(
            format!("Wait for {id} to empty"),
            drained(cluster, id, limit),
        )
        .await?;
        rec.step(format!("Stop {id}"), async {
            cluster.supervise(id, "stop").await?;
            Ok(((), "SIGTERM: its remaining chats move".into()))
        })
        .await?;
        rec.step(format!("Start {id}"), async {
            cluster.supervise(id, "start").await?;
            Ok(((), "serving".into()))
        })
        .await?;
        rec.step(format!("Enable {id}"), async {
            cluster.set_enabled(id, true).await?;
            Ok(((), "takes new chats".into()))
        })
        .await?;
    }
    Ok(())
}

/// Until the instance carries no chat, or the limit: then its chats move
/// when it stops.
async fn drained(cluster: &Cluster, id: &str, limit: Duration) -> Step<()> {
    let started = Instant::now();
    let mut rx = cluster.watch();
    loop {
        let left = rx
            .borrow_and_update()
            .instances
            .iter()
            .find(|i| i.id == id)
            .map(|i| (i.up, i.sessions_active));
        match left {
            Some((true, 0)) => return Ok(((), "0 chats: safe to stop".into())),
            Some((true, n)) if started.elapsed() >= limit => {
                return Ok((
                    (),
                    format!(
                        "{n} chat(s) left after {} s: they move when it stops",
                        limit.as_secs()
                    ),
                ))
            }
            Some((false, _)) => return Err(format!("{id} is down")),
            _ => {}
        }
        let wait = limit
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        let _ = tokio::time::timeout(wait, rx.changed()).await;
    }
}
