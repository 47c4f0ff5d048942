//! Signals to whole processes, and knowing when they took effect; and the
//! signals that stop ours (SIGTERM, Ctrl-C).
//!
//! `kill(pid, SIGSTOP)` only queues the stop: the kernel wakes one thread
//! to begin the group stop, and every thread stops when it is next
//! scheduled. On a busy host another thread of the target can go on running
//! (and answer a request) for milliseconds after kill(2) returned. Whoever
//! needs "the process is frozen now" — the supervisor's pause action, the
//! fencing tests — waits until every thread reports the stopped state.
//!
//! Also the process's descriptor limit, which bounds how many sockets a
//! gateway or an instance can hold.

use std::time::{Duration, Instant};

/// Raise the soft limit on open descriptors to the hard one (every
/// WebSocket is a descriptor, and the usual soft limit of 1,024 would cap a
/// gateway near a thousand chats). Returns the limits before and after.
pub fn raise_descriptor_limit() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = l.rlim_cur;
    if l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, l.rlim_cur))
}

/// [`raise_descriptor_limit`], said in the log.
pub fn raise_and_log_descriptor_limit() {
    match raise_descriptor_limit() {
        Ok((before, after)) if before < after => tracing::info!(
            limit = after,
            was = before,
            "open descriptor limit raised to the hard limit: at most about {after} sockets"
        ),
        Ok((_, after)) => tracing::info!(
            limit = after,
            "open descriptor limit: at most about {after} sockets (the hard limit)"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "the open descriptor limit could not be read or raised")
        }
    }
}

/// Send `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether every thread of `pid` is stopped (or the process is gone), read
/// from `/proc/<pid>/task/*/stat`.
pub fn is_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .map(|stat| matches!(thread_state(&stat), Some('T' | 't' | 'Z' | 'X')))
            .unwrap_or(true)
    })
}

/// The state letter of a `/proc/.../stat` line: the field after the
/// command name, which is in parentheses and may itself contain ") ".
fn thread_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// SIGSTOP `pid` and wait until all its threads have stopped (bounded by
/// `timeout`). True once it is frozen.
pub async fn stop(pid: u32, timeout: Duration) -> std::io::Result<bool> {
    signal(pid, libc::SIGSTOP)?;
    Ok(wait_stopped(pid, timeout).await)
}

/// Wait until every thread of `pid` has stopped (bounded by `timeout`).
pub async fn wait_stopped(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !is_stopped(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Run `tick` every `interval` (the first at once; a slow tick delays the
/// next instead of bunching them) until `stop` is cancelled: the store
/// probe, the ownership sweep and the gateway's health checks.
pub fn every<F, Fut>(interval: Duration, stop: tokio_util::sync::CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            tick().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(thread_state("42 (confab) S 1 42"), Some('S'));
        assert_eq!(thread_state("42 (we) ird) T 1 42"), Some('T'));
        assert_eq!(thread_state("garbage"), None);
    }

    #[tokio::test]
    async fn a_stopped_child_reports_every_thread_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        assert!(!is_stopped(child.id()));
        assert!(stop(child.id(), Duration::from_secs(5))
            .await
            .expect("SIGSTOP"));
        assert!(is_stopped(child.id()));
        signal(child.id(), libc::SIGCONT).expect("SIGCONT");
        let _ = child.kill();
        let _ = child.wait();
    }
}
