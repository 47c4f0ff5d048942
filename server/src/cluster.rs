//! `confab up`: a local HA cluster in one command. N instances (separate
//! processes, so that kill -9 is real), the gateway and the dashboard, on
//! one SQLite file under `--data-dir`, supervised: a dead instance stays
//! dead until asked (so a kill -9 test sees the failover), Ctrl-C or SIGTERM
//! stops everything.
//!
//! Supervisor API (`Authorization: Bearer <admin token>`):
//! `GET /cluster`, `POST /instances/{id}/kill` (SIGKILL), `.../stop`
//! (SIGTERM), `.../pause` (SIGSTOP), `.../resume` (SIGCONT), `.../restart`.

use crate::error::ApiError;
use crate::instance::routes::check_admin;
use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of chat server instances.
    #[arg(long, default_value_t = 3)]
    pub instances: usize,
    /// Where the SQLite store, logs, secrets and cluster.json go.
    #[arg(long, default_value = ".confab")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 8080)]
    pub gateway_port: u16,
    #[arg(long, default_value_t = 8090)]
    pub dashboard_port: u16,
    /// Instance i listens on instance-base-port + i - 1.
    #[arg(long, default_value_t = 7001)]
    pub instance_base_port: u16,
    /// The supervisor API (kill, restart) for tests and the dashboard.
    #[arg(long, default_value_t = 8070)]
    pub supervisor_port: u16,
    /// Session store: sqlite or cassandra.
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// Cassandra contact points (HOST:PORT,…) with --store cassandra.
    #[arg(long, value_delimiter = ',')]
    pub cassandra_contact_points: Vec<String>,
    /// Admin token (default: a new random one, shown in the banner).
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Agent credential for the agent page (default: random).
    #[arg(long, env = "CONFAB_AGENT_CREDENTIAL", hide_env_values = true)]
    pub agent_credential: Option<String>,
    /// Extra `section.option=value` settings for every component.
    #[arg(long = "set", value_name = "SECTION.OPTION=VALUE")]
    pub overrides: Vec<String>,
    /// Also start a real Prometheus (the `prometheus` binary, if installed)
    /// scraping every component with confab's alert rules.
    #[arg(long)]
    pub with_prometheus: bool,
    #[arg(long, default_value_t = 9090)]
    pub prometheus_port: u16,
    /// Log format of the components.
    #[arg(long, default_value = "json")]
    pub component_log_format: String,
}

#[derive(Debug, Clone, Serialize)]
struct ProcInfo {
    id: String,
    url: String,
    pid: Option<u32>,
    running: bool,
}

struct Proc {
    info: ProcInfo,
    /// None: this `confab` binary.
    program: Option<PathBuf>,
    args: Vec<String>,
    log: PathBuf,
}

struct Supervisor {
    args: UpArgs,
    admin_token: String,
    agent_credential: String,
    token_secret_file: PathBuf,
    gateway_url: String,
    dashboard_url: String,
    supervisor_url: String,
    procs: Mutex<Vec<Proc>>,
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Supervisor {
    fn spawn(self: &Arc<Self>, index: usize) -> anyhow::Result<()> {
        let (program, args, log, id) = {
            let procs = self.procs.lock();
            let p = &procs[index];
            (
                p.program.clone(),
                p.args.clone(),
                p.log.clone(),
                p.info.id.clone(),
            )
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let program = match program {
            Some(p) => p,
            None => std::env::current_exe()?,
        };
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .env("CONFAB_ADMIN_TOKEN", &self.admin_token)
            .env("CONFAB_GATEWAY_AGENT_CREDENTIAL", &self.agent_credential)
            .env("CONFAB_GATEWAY_ADMIN_TOKEN", &self.admin_token)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut child: Child = cmd.spawn().with_context(|| format!("starting {id}"))?;
        let pid = child.id();
        {
            let mut procs = self.procs.lock();
            procs[index].info.pid = pid;
            procs[index].info.running = true;
        }
        self.write_cluster_json();
        let sup = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let mut procs = sup.procs.lock();
            // A restart may already have replaced this process.
            if procs[index].info.pid == pid {
                procs[index].info.running = false;
                drop(procs);
                tracing::warn!(component = %id, pid, status = ?status.ok(), "component exited");
                sup.write_cluster_json();
            }
        });
        Ok(())
    }

    fn cluster_json(&self) -> Value {
        let procs = self.procs.lock();
        let instances: Vec<Value> = procs
            .iter()
            .filter(|p| p.info.id.starts_with("inst-"))
            .map(|p| json!({"id": p.info.id, "url": p.info.url, "pid": p.info.pid, "running": p.info.running}))
            .collect();
        let components: Vec<&ProcInfo> = procs.iter().map(|p| &p.info).collect();
        json!({
            "gateway": self.gateway_url,
            "dashboard": self.dashboard_url,
            "supervisor": self.supervisor_url,
            "admin_token": self.admin_token,
            "token_secret_file": self.token_secret_file,
            "agent_credential": self.agent_credential,
            "store": self.args.store,
            "instances": instances,
            "components": components,
        })
    }

    fn write_cluster_json(&self) {
        let path = self.args.data_dir.join("cluster.json");
        let tmp = self.args.data_dir.join("cluster.json.tmp");
        let text = serde_json::to_string_pretty(&self.cluster_json()).unwrap_or_default();
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_err()
        {
            tracing::warn!(path = %path.display(), "could not write cluster.json");
        }
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.procs.lock().iter().position(|p| p.info.id == id)
    }

    fn signal(&self, index: usize, sig: i32) -> Option<u32> {
        let procs = self.procs.lock();
        let p = &procs[index];
        let pid = p.info.pid.filter(|_| p.info.running)?;
        // SAFETY: kill(2) on a child we spawned.
        unsafe {
            libc::kill(pid as i32, sig);
        }
        Some(pid)
    }

    async fn stop_all(&self) {
        let count = self.procs.lock().len();
        for i in 0..count {
            self.signal(i, libc::SIGCONT);
            self.signal(i, libc::SIGTERM);
        }
        for _ in 0..100 {
            if !self.procs.lock().iter().any(|p| p.info.running) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in 0..count {
            self.signal(i, libc::SIGKILL);
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.instances == 0 {
        anyhow::bail!("--instances must be at least 1");
    }
    if args.store != "sqlite" && args.store != "cassandra" {
        anyhow::bail!("--store must be sqlite or cassandra, got {:?}", args.store);
    }
    std::fs::create_dir_all(args.data_dir.join("logs"))
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let args = UpArgs { data_dir, ..args };
    let admin_token = args.admin_token.clone().unwrap_or_else(random_token);
    let agent_credential = args.agent_credential.clone().unwrap_or_else(random_token);
    let db = args.data_dir.join("confab.db");
    let log_format = args.component_log_format.clone();
    let mut procs = Vec::new();
    let mut instance_urls = Vec::new();
    for i in 1..=args.instances {
        let id = format!("inst-{i}");
        let port = args.instance_base_port + i as u16 - 1;
        let url = format!("http://127.0.0.1:{port}");
        instance_urls.push(url.clone());
        let mut a = vec![
            "--log-format".to_owned(),
            log_format.clone(),
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--instance-id".into(),
            id.clone(),
            "--store".into(),
            args.store.clone(),
            "--sqlite-path".into(),
            db.display().to_string(),
        ];
        if !args.cassandra_contact_points.is_empty() {
            a.push("--set".into());
            a.push(format!(
                "cassandra.contact-points={}",
                args.cassandra_contact_points.join(",")
            ));
        }
        for o in &args.overrides {
            a.push("--set".into());
            a.push(o.clone());
        }
        procs.push(Proc {
            info: ProcInfo {
                id: id.clone(),
                url,
                pid: None,
                running: false,
            },
            program: None,
            args: a,
            log: args.data_dir.join("logs").join(format!("{id}.log")),
        });
    }
    let gateway_url = format!("http://127.0.0.1:{}", args.gateway_port);
    procs.push(Proc {
        info: ProcInfo {
            id: "gateway".into(),
            url: gateway_url.clone(),
            pid: None,
            running: false,
        },
        args: vec![
            "--log-format".into(),
            log_format.clone(),
            "gateway".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", args.gateway_port),
            "--instance".into(),
            instance_urls.join(","),
        ],
        program: None,
        log: args.data_dir.join("logs").join("gateway.log"),
    });
    // The gateways' token secret, in a file only we can read: a second
    // gateway started by hand (`--set gateway.token-secret-file=…`) serves
    // the same chats.
    let token_secret_file = args.data_dir.join("token-secret");
    if !token_secret_file.exists() {
        std::fs::write(&token_secret_file, random_token())?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_secret_file, std::fs::Permissions::from_mode(0o600))?;
    }
    if let Some(gw) = procs.last_mut() {
        gw.args.push("--set".into());
        gw.args.push(format!(
            "gateway.token-secret-file={}",
            token_secret_file.display()
        ));
        // The same overrides reach every component; each reads its section.
        for o in &args.overrides {
            gw.args.push("--set".into());
            gw.args.push(o.clone());
        }
    }
    if args.store == "cassandra" {
        init_cassandra(&args).await?;
    }
    let prometheus_yml = write_prometheus_config(&args, &instance_urls)?;
    if args.with_prometheus {
        match which("prometheus") {
            Some(bin) => procs.push(Proc {
                info: ProcInfo {
                    id: "prometheus".into(),
                    url: format!("http://127.0.0.1:{}", args.prometheus_port),
                    pid: None,
                    running: false,
                },
                program: Some(bin),
                args: vec![
                    format!("--config.file={}", prometheus_yml.display()),
                    format!("--storage.tsdb.path={}", args.data_dir.join("prometheus").display()),
                    format!("--web.listen-address=127.0.0.1:{}", args.prometheus_port),
                    "--web.enable-lifecycle".into(),
                ],
                log: args.data_dir.join("logs").join("prometheus.log"),
            }),
            None => eprintln!(
                "warning: --with-prometheus: no `prometheus` binary on PATH (Debian: apt-get install prometheus); continuing without it"
            ),
        }
    }
    let supervisor_url = format!("http://127.0.0.1:{}", args.supervisor_port);
    let dashboard_url = format!("http://127.0.0.1:{}", args.dashboard_port);
    let sup = Arc::new(Supervisor {
        admin_token,
        agent_credential,
        token_secret_file,
        gateway_url,
        dashboard_url,
        supervisor_url,
        procs: Mutex::new(procs),
        args,
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", sup.args.supervisor_port))
        .await
        .with_context(|| format!("binding the supervisor port {}", sup.args.supervisor_port))?;
    let count = sup.procs.lock().len();
    for i in 0..count {
        sup.spawn(i)?;
    }
    wait_until_healthy(&sup).await;
    print_banner(&sup);
    let router = Router::new()
        .route("/cluster", get(cluster))
        .route("/instances/{id}/{action}", post(act))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(sup.clone());
    let stopping = sup.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            crate::instance::shutdown_signal().await;
            println!("stopping the cluster…");
            stopping.stop_all().await;
        })
        .await?;
    println!("cluster stopped");
    Ok(())
}

/// Create the keyspace and tables (idempotent) before the instances start.
async fn init_cassandra(args: &UpArgs) -> anyhow::Result<()> {
    let mut layers = crate::config::Layers::default().with_env(std::env::vars());
    layers = layers.with_overrides(args.overrides.iter().map(String::as_str))?;
    if !args.cassandra_contact_points.is_empty() {
        layers = layers.with(
            "cassandra.contact-points",
            args.cassandra_contact_points.join(","),
        )?;
    }
    let config = layers.resolve()?;
    let c = &config.cassandra;
    let session = crate::store::cassandra::connect(c)
        .await
        .with_context(|| format!("connecting to Cassandra at {}", c.contact_points.join(",")))?;
    crate::store::cassandra::init_schema(&session, &c.keyspace, false).await?;
    println!(
        "Cassandra keyspace {} ready at {}",
        c.keyspace,
        c.contact_points.join(",")
    );
    Ok(())
}

/// The alert rules, shipped inside the binary so `confab up` works anywhere.
const ALERT_RULES: &str = include_str!("../../alerts/confab-rules.yml");

/// Write `<data-dir>/prometheus.yml` (targets: every instance as job
/// `confab`, the gateway as `confab-gateway`) and the alert rules beside it.
fn write_prometheus_config(args: &UpArgs, instance_urls: &[String]) -> anyhow::Result<PathBuf> {
    let rules = args.data_dir.join("confab-rules.yml");
    std::fs::write(&rules, ALERT_RULES)?;
    let targets: Vec<String> = instance_urls
        .iter()
        .map(|u| format!("'{}'", u.trim_start_matches("http://")))
        .collect();
    let text = [
        "# Written by `confab up`: scrape every component of the local cluster.".to_owned(),
        "global:".into(),
        "  scrape_interval: 5s".into(),
        "  evaluation_interval: 5s".into(),
        "rule_files:".into(),
        format!("  - {}", rules.display()),
        "scrape_configs:".into(),
        "  - job_name: confab".into(),
        "    static_configs:".into(),
        format!("      - targets: [{}]", targets.join(", ")),
        "  - job_name: confab-gateway".into(),
        "    static_configs:".into(),
        format!("      - targets: ['127.0.0.1:{}']", args.gateway_port),
        String::new(),
    ]
    .join("\n");
    let path = args.data_dir.join("prometheus.yml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

async fn wait_until_healthy(sup: &Supervisor) {
    let client = reqwest::Client::new();
    let urls: Vec<(String, String)> = sup
        .procs
        .lock()
        .iter()
        .map(|p| (p.info.id.clone(), p.info.url.clone()))
        .collect();
    for (id, url) in urls {
        let mut ok = false;
        for _ in 0..400 {
            if client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !ok {
            eprintln!("warning: {id} did not become healthy; see its log");
        }
    }
}

fn print_banner(sup: &Supervisor) {
    let a = &sup.args;
    println!();
    println!(
        "confab cluster is up ({} instances, {} store)",
        a.instances, a.store
    );
    println!();
    println!("  customer chat page   {}/", sup.gateway_url);
    println!("  agent page           {}/agent", sup.gateway_url);
    println!(
        "  public API           {}/api/v1  (OpenAPI: /api/v1/openapi.json)",
        sup.gateway_url
    );
    println!(
        "  dashboard            {} (reserved: the dashboard is not part of this build yet)",
        sup.dashboard_url
    );
    println!("  supervisor API       {}", sup.supervisor_url);
    if let Some(p) = sup.procs.lock().iter().find(|p| p.info.id == "prometheus") {
        println!("  Prometheus           {}", p.info.url);
    }
    println!(
        "  Prometheus config    {}/prometheus.yml",
        a.data_dir.display()
    );
    println!("  admin token          {}", sup.admin_token);
    println!("  agent credential     {}", sup.agent_credential);
    println!();
    for p in sup.procs.lock().iter() {
        println!(
            "  {:<10} {:<24} pid {}",
            p.info.id,
            p.info.url,
            p.info.pid.map(|p| p.to_string()).unwrap_or("-".into())
        );
    }
    println!();
    println!("  data       {}", a.data_dir.display());
    println!("  logs       {}/logs/<component>.log", a.data_dir.display());
    println!("  cluster    {}/cluster.json", a.data_dir.display());
    println!();
    println!("Ctrl-C stops everything.");
}

async fn cluster(
    State(sup): State<Arc<Supervisor>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&headers, Some(&sup.admin_token))?;
    Ok(Json(sup.cluster_json()))
}

async fn act(
    State(sup): State<Arc<Supervisor>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&headers, Some(&sup.admin_token))?;
    let index = sup
        .index_of(&id)
        .ok_or_else(|| ApiError::not_found(format!("no component {id}")))?;
    let sig = match action.as_str() {
        "kill" => libc::SIGKILL,
        "stop" => libc::SIGTERM,
        "pause" => libc::SIGSTOP,
        "resume" => libc::SIGCONT,
        "restart" => {
            if let Some(pid) = sup.signal(index, libc::SIGKILL) {
                // Wait for the old process to go, so its port is free.
                for _ in 0..200 {
                    if sup.procs.lock()[index].info.pid != Some(pid)
                        || !sup.procs.lock()[index].info.running
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            sup.spawn(index)
                .map_err(|e| ApiError::internal("restart failed", e.as_ref()))?;
            let url = sup.procs.lock()[index].info.url.clone();
            let client = reqwest::Client::new();
            for _ in 0..400 {
                if client.get(format!("{url}/healthz")).send().await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            return Ok(Json(
                json!({"id": id, "action": action, "pid": sup.procs.lock()[index].info.pid}),
            ));
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown action {other:?}: kill, stop, pause, resume or restart"
            )))
        }
    };
    let pid = sup.signal(index, sig).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_running",
            format!("{id} is not running"),
        )
    })?;
    if sig == libc::SIGKILL {
        tracing::warn!(component = %id, pid, "killed with SIGKILL on request");
    }
    if sig == libc::SIGSTOP {
        // Answer once it is frozen, not merely signalled (see crate::process).
        let stopped = crate::process::wait_stopped(pid, Duration::from_secs(5)).await;
        return Ok(Json(
            json!({"id": id, "action": action, "pid": pid, "stopped": stopped}),
        ));
    }
    Ok(Json(json!({"id": id, "action": action, "pid": pid})))
}
