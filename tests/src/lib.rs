//! Black-box test harness: starts the real `confab` binary on free loopback
//! ports with a temporary data directory, talks to it over real HTTP and
//! WebSocket, and kills it with real signals. Component logs go to files in
//! the data directory; with `TEST_LOG` set they go to the terminal instead.

use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod browser;
pub mod cluster;
pub mod cql_node;
pub mod cql_proxy;
pub mod deploy;
pub mod history;
pub mod kassandra;
pub mod load;
pub mod netns;
pub mod slowlink;
pub mod sockets;
pub mod tls;
pub mod ws;

/// The `confab` binary, built once per process with the same profile as
/// the calling test (or tool), or the one named by `CONFAB_E2E_BIN`
/// (`cargo xtask test` builds it once and sets it, so that every test
/// binary runs the same build, whatever is edited meanwhile).
pub fn confab_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CONFAB_E2E_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> for tests, target/<profile>/<tool>
        // for the tools built from this crate's users (confab-bench).
        let mut profile_dir = exe.parent().expect("target/<profile>").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "confab-server",
            "--bin",
            "confab",
            "--manifest-path",
        ])
        .arg(&manifest);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the confab binary");
        assert!(status.success(), "building the confab binary failed");
        profile_dir.join("confab")
    })
}

/// A port for a test server to listen on.
/// An HTTP client builder for tests: confab's reqwest has no TLS provider
/// of its own, so the process's default (ring) is installed first.
pub fn client() -> reqwest::ClientBuilder {
    confab::tls::install_default_provider();
    reqwest::Client::builder()
}

pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive ports for test servers to listen on.
///
/// They come from below the kernel's ephemeral range and each is handed out
/// once per process. A port from `bind(0)` is an ephemeral one: the many
/// outgoing connections of a test run (and the other tests of the same
/// binary) could take it between our check and the server's bind, and the
/// server then failed to start.
pub fn free_ports(n: u16) -> u16 {
    static NEXT: OnceLock<std::sync::atomic::AtomicU32> = OnceLock::new();
    let (low, high) = listening_range();
    let span = u32::from(high - low);
    let next = NEXT.get_or_init(|| {
        std::sync::atomic::AtomicU32::new(std::process::id().wrapping_mul(7919) % span)
    });
    for _ in 0..2000 {
        let offset = next.fetch_add(u32::from(n), std::sync::atomic::Ordering::Relaxed) % span;
        let Ok(base) = u16::try_from(u32::from(low) + offset) else {
            continue;
        };
        if u32::from(base) + u32::from(n) > u32::from(high) {
            continue;
        }
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    panic!("no {n} free ports between {low} and {high}");
}

/// Ports outside the kernel's ephemeral range (`ip_local_port_range`).
fn listening_range() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if ephemeral.0 >= 12000 {
        (ephemeral.0 - 10000, ephemeral.0)
    } else {
        (ephemeral.1.saturating_add(1), 65535)
    }
}

pub fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The cluster secret of the tests' instances and gateways; the harness's
/// HTTP and WebSocket clients present it (the attack tests use clients that
/// do not).
pub const CLUSTER_SECRET: &str = "test-cluster-secret";
pub use confab::contract::CLUSTER_SECRET_HEADER;

/// One `confab server` process.
pub struct Server {
    pub id: String,
    pub port: u16,
    pub url: String,
    pub log: PathBuf,
    pub db: PathBuf,
    sets: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// Start an instance named `id` on the SQLite file `db`, with extra
    /// `--set section.option=value` overrides.
    pub async fn start(dir: &Path, id: &str, db: &Path, sets: &[&str]) -> Server {
        let port = free_port();
        let mut server = Server {
            id: id.to_owned(),
            port,
            url: format!("http://127.0.0.1:{port}"),
            log: dir.join(format!("{id}.log")),
            db: db.to_owned(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(confab_bin());
        cmd.arg("--log-format")
            .arg("json")
            .arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--instance-id")
            .arg(&self.id)
            .arg("--sqlite-path")
            .arg(&self.db)
            .arg("--admin-token")
            .arg(ADMIN_TOKEN)
            .arg("--set")
            .arg(format!("cluster.secret={CLUSTER_SECRET}"));
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        cmd.stdin(Stdio::null());
        if !test_log() {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("log file");
            cmd.stdout(log.try_clone().expect("log handle")).stderr(log);
        }
        self.child = Some(cmd.spawn().expect("starting confab server"));
        if !self.wait_healthy().await {
            let log = self.log_text();
            assert!(
                log.contains("binding"),
                "{} exited at start-up:\n{log}",
                self.id
            );
            // Its port was taken meanwhile: another one.
            self.port = free_port();
            self.url = format!("http://127.0.0.1:{}", self.port);
            Box::pin(self.spawn()).await;
        }
    }

    /// Wait until *this* process serves its port: /status must name our
    /// pid, so that another test's server that happened to get the same
    /// free port is never mistaken for ours. False if the process exited
    /// (its port was taken): the caller picks another port.
    async fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = client().build().expect("an HTTP client");
        let pid = self.pid() as u64;
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if let Ok(r) = client.get(format!("{}/status", self.url)).send().await {
                if let Ok(status) = r.json::<Value>().await {
                    if status["pid"].as_u64() == Some(pid) {
                        return true;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become healthy:\n{}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        confab::process::signal(self.pid() as u32, sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) failed: {e}", self.pid()));
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP, and wait until every thread has stopped: kill(2) returns
    /// before a busy process is frozen (see `confab::process`).
    pub async fn pause(&self) {
        let stopped = confab::process::stop(self.pid() as u32, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("SIGSTOP {}: {e}", self.id));
        assert!(stopped, "{} did not stop within 10 s of SIGSTOP", self.id);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM, then wait for the exit (bounded) and return its code.
    pub async fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit after SIGTERM", self.id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start again on the same port after a kill or stop.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines (JSON) whose `event_id` is `id`.
    pub fn events(&self, id: u64) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event_id"].as_u64() == Some(id))
            .collect()
    }

    pub fn internal(&self, path: &str) -> String {
        format!("{}/internal/v1{path}", self.url)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A paused child cannot die of SIGKILL until continued on some
            // kernels' bookkeeping; continue it first.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
            }
        }
        self.kill();
    }
}

/// A JSON answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok(self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "expected success, got {} {}",
            self.status,
            self.body
        );
        self.body
    }

    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

#[derive(Clone)]
pub struct Http {
    pub client: reqwest::Client,
}

impl Default for Http {
    fn default() -> Self {
        Http::with(client())
    }
}

impl Http {
    /// Trusting `ca_pem` only.
    pub fn trusting(ca_pem: &[u8]) -> Http {
        let ca = reqwest::Certificate::from_pem(ca_pem).expect("a PEM CA certificate");
        Http::with(client().tls_certs_only([ca]))
    }

    fn with(builder: reqwest::ClientBuilder) -> Http {
        Http {
            client: builder
                .timeout(Duration::from_secs(30))
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::HeaderName::from_static(CLUSTER_SECRET_HEADER),
                    reqwest::header::HeaderValue::from_static(CLUSTER_SECRET),
                )]))
                .build()
                .expect("http client"),
        }
    }
}

impl Http {
    async fn answer(r: reqwest::Result<reqwest::Response>) -> Result<Answer, String> {
        let r = r.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let text = r.text().await.map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }

    pub async fn try_post(
        &self,
        url: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Answer, String> {
        let mut req = self.client.post(url).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await).await
    }

    pub async fn post(&self, url: &str, body: &Value, token: Option<&str>) -> Answer {
        self.try_post(url, body, token)
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    pub async fn post_raw(&self, url: &str, body: Vec<u8>, token: Option<&str>) -> Answer {
        let mut req = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await)
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    pub async fn try_get(&self, url: &str, token: Option<&str>) -> Result<Answer, String> {
        let mut req = self.client.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await).await
    }

    /// A plain-text GET (metrics, pages).
    /// The sum of the series of `/metrics` at `base_url` whose line starts
    /// with `name` (labels included in it or not), 0 if none.
    pub async fn metric(&self, base_url: &str, name: &str) -> f64 {
        let text = self.text(&format!("{base_url}/metrics")).await;
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    pub async fn text(&self, url: &str) -> String {
        let r = self
            .client
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        r.text().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    pub async fn get(&self, url: &str, token: Option<&str>) -> Answer {
        self.try_get(url, token)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }
}

/// Typed calls on an instance's internal API.
impl Http {
    pub async fn create_session(&self, s: &Server, nickname: &str) -> (String, String) {
        let b = self
            .post(
                &s.internal("/sessions"),
                &json!({"nickname": nickname}),
                None,
            )
            .await
            .ok();
        (
            b["session_id"].as_str().expect("session_id").to_owned(),
            b["participant_id"]
                .as_str()
                .expect("participant_id")
                .to_owned(),
        )
    }

    pub async fn send(
        &self,
        s: &Server,
        chat: &str,
        pid: &str,
        text: &str,
        client_msg_id: Option<&str>,
    ) -> Answer {
        let mut body = json!({"participant_id": pid, "text": text});
        if let Some(c) = client_msg_id {
            body["client_msg_id"] = json!(c);
        }
        self.post(
            &s.internal(&format!("/sessions/{chat}/messages")),
            &body,
            None,
        )
        .await
    }

    pub async fn restore(&self, s: &Server, chat: &str) -> Answer {
        self.post(
            &s.internal(&format!("/sessions/{chat}/restore")),
            &json!({}),
            None,
        )
        .await
    }

    pub async fn transcript(&self, s: &Server, chat: &str) -> Answer {
        self.get(&s.internal(&format!("/sessions/{chat}/transcript")), None)
            .await
    }

    /// Every event of a chat's transcript, read page by page.
    pub async fn events(&self, s: &Server, chat: &str) -> Vec<Value> {
        self.all_pages(&s.internal(&format!("/sessions/{chat}/transcript")), None)
            .await["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A transcript read to its last page (`more` false): the last page's
    /// answer with every page's events.
    pub async fn all_pages(&self, url: &str, token: Option<&str>) -> Value {
        let mut events = Vec::new();
        let mut after = 0;
        loop {
            let mut page = self.get(&format!("{url}?after={after}"), token).await.ok();
            let got = page["events"].as_array().cloned().unwrap_or_default();
            after = got.last().and_then(|e| e["seq"].as_u64()).unwrap_or(after);
            events.extend(got);
            if page["more"] != true {
                page["events"] = Value::Array(events);
                return page;
            }
        }
    }

    pub async fn kpi(&self, s: &Server) -> Value {
        self.get(&format!("{}/kpi", s.url), None).await.ok()
    }
}

/// The stale-owner hazard (README, "How a message is kept"), end to end:
/// `a` owns a new chat and acknowledges "before the pause"; `a` is paused
/// (SIGSTOP) with a write queued in its socket; the chat is restored on `b`,
/// which acknowledges "new owner"; `a` resumes. Returns the chat, its participant and the stale write's answer.
pub async fn paused_owner_writes_after_restore(
    http: &Http,
    a: &Server,
    b: &Server,
) -> (String, String, Answer) {
    let (chat, pid) = http.create_session(a, "Ann").await;
    http.send(a, &chat, &pid, "before the pause", None)
        .await
        .ok();
    a.pause().await;
    let stale = {
        let (http, url, pid) = (
            http.clone(),
            a.internal(&format!("/sessions/{chat}/messages")),
            pid.clone(),
        );
        tokio::spawn(async move {
            http.post(
                &url,
                &serde_json::json!({"participant_id": pid, "text": "stale write"}),
                None,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    http.restore(b, &chat).await.ok();
    http.send(b, &chat, &pid, "new owner", None).await.ok();
    a.resume();
    let answer = stale.await.expect("the stale write's task");
    (chat, pid, answer)
}

/// Run `confab args…` to its end (start-up failures): exit code, stderr.
pub fn run_confab(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(confab_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .env("CONFAB_CLUSTER_SECRET", CLUSTER_SECRET);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run confab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bytes a process or thread has caused to be written to storage since
/// it started (`write_bytes` of its /proc directory's `io`: counted when a
/// page is dirtied, so the WAL, the checkpoints, temporary files).
pub fn io_write_bytes(proc_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(proc_dir.join("io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Message texts of a transcript, in order.
pub fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == "message")
        .filter_map(|e| e["text"].as_str().map(str::to_owned))
        .collect()
}

/// A temporary data directory kept on failure when `TEST_KEEP` is set.
pub fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("confab-e2e-")
        .tempdir()
        .expect("temp dir");
    if std::env::var_os("TEST_KEEP").is_some() {
        eprintln!("data dir: {}", dir.path().display());
    }
    dir
}

/// The token secret of the tests' gateways.
pub const TOKEN_SECRET: &str = "e2e";

/// The command line of a test gateway listening on `listen` in front of
/// `instances` (their URLs): the cluster secret, [`TOKEN_SECRET`], health
/// checks every 200 ms, no rate limit to speak of.
pub fn gateway_args(listen: &str, instances: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--log-format", "json", "gateway", "--listen", listen]
        .map(String::from)
        .into();
    args.extend(["--instance".into(), instances.join(",")]);
    for set in [
        format!("cluster.secret={CLUSTER_SECRET}"),
        format!("gateway.token-secret={TOKEN_SECRET}"),
        "gateway.rate-limit-per-second=100000".into(),
        "gateway.rate-limit-burst=100000".into(),
        "gateway.health-interval=200ms".into(),
    ] {
        args.extend(["--set".into(), set]);
    }
    args
}

/// A `confab gateway` process on loopback in front of `instances` (their
/// URLs), as [`gateway_args`] says.
pub struct Gateway {
    pub url: String,
    pub log: PathBuf,
    child: Child,
}

impl Gateway {
    /// Start it, and wait until it sees every instance healthy.
    pub async fn start(dir: &Path, instances: &[&str]) -> Gateway {
        let port = free_port();
        let log = dir.join(format!("gateway-{port}.log"));
        let out = std::fs::File::create(&log).expect("gateway log");
        let child = Command::new(confab_bin())
            .args(gateway_args(&format!("127.0.0.1:{port}"), instances))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("starting confab gateway");
        let gateway = Gateway {
            url: format!("http://127.0.0.1:{port}"),
            log,
            child,
        };
        let http = client().build().expect("an HTTP client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = match http.get(format!("{}/status", gateway.url)).send().await {
                Ok(r) => r.json::<Value>().await.ok().map_or(0, |s| {
                    s["instances"]
                        .as_array()
                        .map_or(0, |a| a.iter().filter(|i| i["healthy"] == true).count())
                }),
                Err(_) => 0,
            };
            if healthy == instances.len() {
                return gateway;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway does not see its instances:\n{}",
                std::fs::read_to_string(&gateway.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A counter (or gauge) of its `/metrics`, 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        Http::default().metric(&self.url, name).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
