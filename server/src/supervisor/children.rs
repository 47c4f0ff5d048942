//! The supervised processes: started from their [`ComponentSpec`], watched
//! until they exit, signalled on request, checked to be *our* process on
//! their port, and recorded in `<data-dir>/cluster.json` (kept current: a
//! restarted instance gets its new pid).

use super::data_dir;
use super::plan::{ComponentSpec, Kind, Plan, Program};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// How long a component may take to serve its port after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a kill waits for the exit to be recorded.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct ProcInfo {
    pub id: String,
    pub url: String,
    pub pid: Option<u32>,
    pub running: bool,
    /// How the last process of this component ended, if it did.
    pub last_exit: Option<String>,
}

struct Proc {
    spec: ComponentSpec,
    info: ProcInfo,
}

pub struct Supervisor {
    pub plan: Plan,
    procs: Mutex<Vec<Proc>>,
    /// Set once the whole cluster is being stopped: exits are expected.
    stopping: AtomicBool,
    /// One writer of cluster.json at a time.
    cluster_json: Mutex<()>,
    http: reqwest::Client,
}

/// Why a component did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{id} exited during start-up ({status}); the last lines of {log}:\n{tail}")]
    Exited {
        id: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{id} did not serve {url} within {}s; the last lines of {log}:\n{tail}", START_TIMEOUT.as_secs())]
    Timeout {
        id: String,
        url: String,
        log: String,
        tail: String,
    },
    #[error("{url} is served by another process (pid {other}), not by {id} (pid {pid})")]
    Impostor {
        id: String,
        url: String,
        pid: u32,
        other: u64,
    },
    #[error("cannot start {id}: {reason}")]
    Spawn { id: String, reason: String },
    #[error("{0} is already running")]
    Running(String),
}

impl Supervisor {
    pub fn new(plan: Plan) -> Arc<Self> {
        let procs = plan
            .components
            .iter()
            .map(|spec| Proc {
                info: ProcInfo {
                    id: spec.id.clone(),
                    url: spec.url.clone(),
                    pid: None,
                    running: false,
                    last_exit: None,
                },
                spec: spec.clone(),
            })
            .collect();
        Arc::new(Supervisor {
            plan,
            procs: Mutex::new(procs),
            stopping: AtomicBool::new(false),
            cluster_json: Mutex::new(()),
            http: crate::tls::reqwest_builder()
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap_or_default(),
        })
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.procs.lock().iter().position(|p| p.info.id == id)
    }

    pub fn count(&self) -> usize {
        self.procs.lock().len()
    }

    pub fn info(&self, index: usize) -> ProcInfo {
        self.procs.lock()[index].info.clone()
    }

    pub fn infos(&self) -> Vec<ProcInfo> {
        self.procs.lock().iter().map(|p| p.info.clone()).collect()
    }

    /// Start every component, then wait until each serves its port; the
    /// first one that exits or does not come up stops the start.
    pub async fn start_all(self: &Arc<Self>) -> Result<(), StartError> {
        for i in 0..self.count() {
            self.spawn(i)?;
        }
        let waits: Vec<_> = (0..self.count()).map(|i| self.wait_ready(i)).collect();
        for result in futures_util::future::join_all(waits).await {
            result?;
        }
        Ok(())
    }

    /// Start component `index` (which must not be running).
    pub fn spawn(self: &Arc<Self>, index: usize) -> Result<u32, StartError> {
        let (spec, running) = {
            let procs = self.procs.lock();
            (procs[index].spec.clone(), procs[index].info.running)
        };
        if running {
            return Err(StartError::Running(spec.id));
        }
        let spawn_error = |e: std::io::Error| StartError::Spawn {
            id: spec.id.clone(),
            reason: e.to_string(),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(spawn_error)?;
        let mut cmd = match &spec.program {
            Program::Confab {
                subcommand,
                config_file,
            } => {
                let mut cmd = Command::new(std::env::current_exe().map_err(spawn_error)?);
                cmd.arg("--log-format")
                    .arg(self.plan.log_format.name())
                    .arg(subcommand)
                    .arg("--config")
                    .arg(config_file);
                // The component's file is its whole configuration: no
                // CONFAB_… variable of ours may override what it says.
                for (name, _) in std::env::vars_os() {
                    if name.to_string_lossy().starts_with("CONFAB_") {
                        cmd.env_remove(name);
                    }
                }
                cmd
            }
            Program::External { path, args } => {
                let mut cmd = Command::new(path);
                cmd.args(args);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error)?)
            .stderr(log);
        let mut child = cmd.spawn().map_err(spawn_error)?;
        let Some(pid) = child.id() else {
            return Err(StartError::Spawn {
                id: spec.id,
                reason: "it exited at once".into(),
            });
        };
        {
            let mut procs = self.procs.lock();
            procs[index].info.pid = Some(pid);
            procs[index].info.running = true;
        }
        self.write_cluster_json();
        let sup = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let clean = status.as_ref().is_ok_and(|s| s.success());
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown: {e}"),
            };
            {
                let mut procs = sup.procs.lock();
                // A restart may already have replaced this process.
                if procs[index].info.pid != Some(pid) {
                    return;
                }
                procs[index].info.running = false;
                procs[index].info.last_exit = Some(status.clone());
            }
            if clean || sup.stopping.load(Ordering::SeqCst) {
                tracing::info!(component = %spec.id, pid, %status, "component exited");
            } else {
                tracing::warn!(component = %spec.id, pid, %status, "component exited");
            }
            sup.write_cluster_json();
        });
        Ok(pid)
    }

    /// Wait until component `index` serves its port as the process we
    /// started (its `/status` names our child's pid).
    pub async fn wait_ready(&self, index: usize) -> Result<u32, StartError> {
        let spec = self.procs.lock()[index].spec.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let info = self.info(index);
            let Some(pid) = info.pid.filter(|_| info.running) else {
                return Err(StartError::Exited {
                    id: spec.id.clone(),
                    status: info.last_exit.unwrap_or_else(|| "not started".into()),
                    log: spec.log.display().to_string(),
                    tail: log_tail(&spec.log, 12),
                });
            };
            match self.serving_pid(&spec).await {
                Some(Some(p)) if p == u64::from(pid) => return Ok(pid),
                Some(Some(other)) => {
                    return Err(StartError::Impostor {
                        id: spec.id.clone(),
                        url: spec.url.clone(),
                        pid,
                        other,
                    })
                }
                Some(None) => return Ok(pid),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout {
                    id: spec.id.clone(),
                    url: spec.url.clone(),
                    log: spec.log.display().to_string(),
                    tail: log_tail(&spec.log, 12),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// None: not serving yet. Some(Some(pid)): served by that process.
    /// Some(None): served, by a program that does not tell its pid.
    async fn serving_pid(&self, spec: &ComponentSpec) -> Option<Option<u64>> {
        match spec.kind {
            Kind::Instance | Kind::Gateway | Kind::Dashboard => {
                let answer = self
                    .http
                    .get(format!("{}/status", spec.url))
                    .send()
                    .await
                    .ok()?;
                if !answer.status().is_success() {
                    return None; // not serving (or refusing) yet: ask again
                }
                let status: Value = answer.json().await.ok()?;
                // Ours names its pid; an answer without one is not ours.
                Some(Some(status["pid"].as_u64().unwrap_or(0)))
            }
            Kind::Prometheus => {
                let answer = self
                    .http
                    .get(format!("{}/-/ready", spec.url))
                    .send()
                    .await
                    .ok()?;
                answer.status().is_success().then_some(None)
            }
        }
    }

    /// Send `sig` to component `index` if it runs; its pid if it did.
    pub fn signal(&self, index: usize, sig: i32) -> Option<u32> {
        let info = self.info(index);
        let pid = info.pid.filter(|_| info.running)?;
        crate::process::signal(pid, sig).ok()?;
        Some(pid)
    }

    /// SIGKILL component `index` if it runs, and wait until its exit is
    /// recorded, so that a `start` right after finds it stopped. A process
    /// already reaped whose exit is not yet recorded still counts: kill(2)
    /// then fails, and the wait is what is left to do. Its pid, and whether
    /// the exit was seen in time.
    pub async fn kill(&self, index: usize) -> Option<(u32, bool)> {
        let info = self.info(index);
        let pid = info.pid.filter(|_| info.running)?;
        if let Err(e) = crate::process::signal(pid, libc::SIGKILL) {
            tracing::debug!(component = %info.id, pid, error = %e, "SIGKILL found it gone");
        }
        Some((pid, self.wait_exit(index, pid, KILL_WAIT).await))
    }

    /// Wait until the process `pid` of component `index` has exited.
    pub async fn wait_exit(&self, index: usize, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info(index);
            if info.pid != Some(pid) || !info.running {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM everything (waking frozen ones first), SIGKILL what is still
    /// there after the grace period, and wait for every exit to be recorded.
    pub async fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let count = self.count();
        let mut pids = Vec::new();
        for i in 0..count {
            self.signal(i, libc::SIGCONT);
            if let Some(pid) = self.signal(i, libc::SIGTERM) {
                pids.push((i, pid));
            }
        }
        for (i, pid) in pids {
            if !self.wait_exit(i, pid, STOP_GRACE).await {
                tracing::warn!(component = %self.info(i).id, pid, "still running after SIGTERM; killing it");
                self.kill(i).await;
            }
        }
        self.write_cluster_json();
    }

    pub fn cluster_json(&self) -> Value {
        let plan = &self.plan;
        let infos = self.infos();
        let instances: Vec<Value> = self
            .procs
            .lock()
            .iter()
            .filter(|p| p.spec.kind == Kind::Instance)
            .map(|p| json!({"id": p.info.id, "url": p.info.url, "pid": p.info.pid, "running": p.info.running}))
            .collect();
        json!({
            "gateway": plan.gateway_url,
            "dashboard": plan.dashboard_url,
            "supervisor": plan.supervisor_url(),
            "admin_token": plan.admin_token,
            "token_secret_file": plan.token_secret_file,
            "cluster_secret_file": plan.cluster_secret_file,
            "agent_credential": plan.agent_credential,
            "store": plan.store().name(),
            "instances": instances,
            "components": infos,
        })
    }

    pub fn write_cluster_json(&self) {
        let _writer = self.cluster_json.lock();
        let path = self.plan.data_dir.join("cluster.json");
        let text = serde_json::to_string_pretty(&self.cluster_json()).unwrap_or_default();
        if let Err(e) = data_dir::write_private(&path, &text) {
            tracing::warn!(path = %path.display(), error = %e, "could not write cluster.json");
        }
    }
}

/// The last `n` lines of a component's log, JSON lines shown as
/// `LEVEL message` so that the reason reads at a glance.
pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(v) if v["message"].is_string() => format!(
                "  {} {}",
                v["level"].as_str().unwrap_or(""),
                v["message"].as_str().unwrap_or("")
            ),
            _ => format!("  {line}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
