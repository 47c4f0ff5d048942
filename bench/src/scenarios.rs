//! The benchmark scenarios: a load generator for the message path, reporting figures
//! as ratios against baselines measured in the same run.
//!
//! Phases:
//! 1. raw store: the SQLite store's group-commit append rate of the same
//!    rows, with the same concurrency, no HTTP (the store's limit here);
//! 2. closed loop: `--concurrency` senders over `--sessions` chats against
//!    a real `confab server` process over loopback HTTP, as fast as
//!    acknowledgements come: acknowledged messages/s, p50/p99;
//! 3. open loop: a fixed `--rate` of messages/s, latency measured from each
//!    message's scheduled time (no coordinated omission);
//! 4. idle memory: `--idle-sessions` open chats, the server's resident memory.

use anyhow::{bail, Context};
use clap::Parser;
use confab::config::Synchronous;
use confab::session::{now_ms, Draft, Participant, Role, SessionState};
use confab::store::sqlite::{SqliteOptions, SqliteStore, CHECKPOINT_INTERVAL, CHECKPOINT_THREAD};
use confab::store::{Append, SessionRecord, SessionStore};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod sockets;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The message path against one instance, against the raw store rate.
    Message,
    /// Messages through the gateway against straight to the instance.
    Gateway,
    /// `--sessions` chats on one instance, kill -9 it, time until every
    /// chat has accepted a new message through the gateway.
    Restore,
    /// The message path on the Cassandra store (the in-memory kassandra
    /// test node, not a real Cassandra) against the SQLite store.
    Cassandra,
    /// Clusters of `--instances` instances on one host's embedded store,
    /// each behind its own gateway, against one another: messages/s,
    /// latency, CPU idle and disk writes per acknowledged message.
    Cluster,
    /// `--sockets` idle customer WebSockets through one gateway in front
    /// of the largest of `--instances`: memory and descriptors per socket
    /// on the gateway and the instances, then a fan-out of `--fanout-rate`
    /// messages/s over the chats for `--duration` (exactly-once delivery,
    /// acknowledgement-to-delivery latency).
    Sockets,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "confab-bench",
    about = "Load-generate against real confab processes"
)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Message)]
    pub scenario: Scenario,
    /// Chats to spread the messages over.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Concurrent senders (closed loop) and raw-store writers.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Length of each measured phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Offered load of the open-loop phase, messages/s (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Idle chats for the memory phase (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    pub idle_sessions: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub text_bytes: usize,
    /// SQLite synchronous mode for both the raw store and the server.
    #[arg(long, default_value = "full")]
    pub synchronous: String,
    /// Directory for the benchmark's SQLite files (default: a temporary one).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Cluster sizes the `cluster` scenario compares.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    pub instances: Vec<usize>,
    /// WebSockets the `sockets` scenario opens (one customer per chat).
    #[arg(long, default_value_t = 15_000)]
    pub sockets: usize,
    /// Messages/s of the `sockets` scenario's fan-out.
    #[arg(long, default_value_t = 1_000)]
    pub fanout_rate: u64,
}

struct Latencies(Vec<u32>);

impl Latencies {
    fn percentile(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let idx = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(self.0[idx] as u64)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Our own scratch directory goes when the run ends, whatever the
    // scenario or outcome (a run writes gigabytes); a given one is kept.
    let (dir, _scratch) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let tmp = tempfile::Builder::new().prefix("confab-bench-").tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let synchronous = match args.synchronous.as_str() {
        "off" => Synchronous::Off,
        "normal" => Synchronous::Normal,
        "full" => Synchronous::Full,
        "extra" => Synchronous::Extra,
        other => bail!("--synchronous must be off, normal, full or extra, got {other:?}"),
    };
    let text = "x".repeat(args.text_bytes);
    println!("# confab bench ({:?})\n", args.scenario);
    println!("machine: {}", machine());
    if args.scenario == Scenario::Sockets {
        println!(
            "settings: {} sockets, fan-out of {} msgs/s for {:?}, {}-byte messages, synchronous={}\n",
            args.sockets, args.fanout_rate, args.duration, args.text_bytes, args.synchronous
        );
    } else {
        println!(
            "settings: {} chats, {} concurrent senders, {:?} per phase, {}-byte messages, synchronous={}\n",
            args.sessions, args.concurrency, args.duration, args.text_bytes, args.synchronous
        );
    }

    match args.scenario {
        Scenario::Message => {}
        Scenario::Gateway => return gateway_cost(&dir, &args, &text).await,
        Scenario::Restore => return restoration(&dir, &args).await,
        Scenario::Cassandra => return cassandra_vs_sqlite(&dir, &args, &text).await,
        Scenario::Cluster => return clusters(&dir, &args, &text).await,
        Scenario::Sockets => return sockets::sockets(&dir, &args, &text).await,
    }
    let raw = raw_store_rate(&dir.join("raw.db"), synchronous, &args, &text).await?;
    println!("raw SQLite group-commit appends: {raw:.0} rows/s (no HTTP)");

    let db = dir.join("server.db");
    let _ = std::fs::remove_file(&db);
    let mut server = ServerProcess::instance(&db, &args.synchronous, "bench", free_port()?).await?;
    let client = client_builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let chats = create_chats(&client, &server.url, args.sessions).await?;

    // Warm up (connections, caches, the WAL) before measuring.
    let warm_up = BenchArgs {
        duration: Duration::from_secs(2),
        ..args.clone()
    };
    closed_loop(&client, &chats, &warm_up, &text).await;
    let (rate, mut lat) = closed_loop(&client, &chats, &args, &text).await;
    println!(
        "closed loop over HTTP: {rate:.0} acknowledged messages/s, p50 {}, p99 {}; {:.2} of the raw store rate",
        ms(lat.percentile(0.5)),
        ms(lat.percentile(0.99)),
        rate / raw
    );

    if args.rate > 0 {
        let (achieved, mut lat, errors) = open_loop(&client, &chats, &args, &text).await;
        println!(
            "open loop at {} msgs/s offered: {achieved:.0} acknowledged/s, p50 {}, p99 {}, p99.9 {}, {errors} errors",
            args.rate,
            ms(lat.percentile(0.5)),
            ms(lat.percentile(0.99)),
            ms(lat.percentile(0.999))
        );
    }

    if args.idle_sessions > 0 {
        let before = server.rss_kib();
        create_chats(&client, &server.url, args.idle_sessions).await?;
        let after = server.rss_kib();
        println!(
            "idle memory: {} open chats in total, server RSS {:.1} MiB (was {:.1} MiB before the {} idle chats)",
            args.sessions + args.idle_sessions,
            after as f64 / 1024.0,
            before as f64 / 1024.0,
            args.idle_sessions
        );
    }
    server.stop();
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM")
}

/// The store alone: `concurrency` writers appending one message event per
/// call to `sessions` chats, as the instance does for each message.
async fn raw_store_rate(
    path: &Path,
    synchronous: Synchronous,
    args: &BenchArgs,
    text: &str,
) -> anyhow::Result<f64> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(confab::store::sqlite::events_path(path, "bench"));
    let store = Arc::new(SqliteStore::open(
        path,
        "bench",
        SqliteOptions {
            synchronous,
            ..SqliteOptions::default()
        },
    )?);
    let participant = Participant {
        participant_id: "p".into(),
        nickname: "bench".into(),
        role: Role::Customer,
    };
    let mut ids = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let record = SessionRecord {
            session_id: format!("raw-{i}"),
            intx: format!("intx-{i}"),
            owner_instance: "bench".into(),
            epoch: 1,
            state: SessionState::Waiting,
            subject: None,
            nickname: Some(participant.nickname.clone()),
            created_at_ms: now_ms(),
        };
        store.create_session(record, vec![]).await?;
        ids.push(Arc::new(AtomicU64::new(1)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (store, stop, done, ids) = (store.clone(), stop.clone(), done.clone(), ids.clone());
        let participant = participant.clone();
        let text = text.to_owned();
        let sessions = args.sessions;
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let s = i % sessions;
                i += args_concurrency_stride(sessions);
                let seq = ids[s].fetch_add(1, Ordering::Relaxed);
                let event = Draft::message(&participant, text.clone(), Some(format!("c{seq}")))
                    .into_event(seq, now_ms());
                let r = store
                    .append_events(Append {
                        session_id: format!("raw-{s}"),
                        epoch: 1,
                        events: vec![event],
                        state: SessionState::Waiting,
                    })
                    .await;
                if r.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// Writers walk the chats with a stride so two writers rarely share one
/// chat (a chat's events are sequential).
fn args_concurrency_stride(sessions: usize) -> usize {
    if sessions > 1 {
        7919 % sessions.max(1) + 1
    } else {
        1
    }
}

struct ServerProcess {
    child: Child,
    url: String,
}

/// The cluster secret of the benchmark's instances and gateways.
const CLUSTER_SECRET: &str = "bench-cluster-secret";

/// An HTTP client that presents the cluster secret (the direct-to-instance
/// figures call the instances' internal API).
fn client_builder() -> reqwest::ClientBuilder {
    confab_e2e::client().default_headers(reqwest::header::HeaderMap::from_iter([(
        reqwest::header::HeaderName::from_static(confab::contract::CLUSTER_SECRET_HEADER),
        reqwest::header::HeaderValue::from_static(CLUSTER_SECRET),
    )]))
}

/// A listening port, picked as the tests pick them: below the kernel's
/// ephemeral range, each handed out once (a `bind(0)` port could be taken
/// by an outgoing connection before the server binds it).
fn free_port() -> anyhow::Result<u16> {
    Ok(confab_e2e::free_port())
}

impl ServerProcess {
    /// Run `confab <args>` listening on `port`; wait for its /healthz.
    async fn spawn(args: &[String], port: u16) -> anyhow::Result<Self> {
        let child = Command::new(confab_e2e::confab_bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .env("CONFAB_CLUSTER_SECRET", CLUSTER_SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting a confab component")?;
        let url = format!("http://127.0.0.1:{port}");
        let client = confab_e2e::client().build().unwrap();
        for _ in 0..400 {
            if client.get(format!("{url}/healthz")).send().await.is_ok() {
                return Ok(ServerProcess { child, url });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!(
            "a benchmark component did not start: confab {}",
            args.join(" ")
        )
    }

    async fn instance(db: &Path, synchronous: &str, id: &str, port: u16) -> anyhow::Result<Self> {
        let sets = [format!("server.sqlite-synchronous={synchronous}")];
        Self::instance_with(db, id, port, &sets).await
    }

    async fn instance_with(
        db: &Path,
        id: &str,
        port: u16,
        sets: &[String],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec![
            "server".into(),
            "--instance-id".into(),
            id.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--sqlite-path".into(),
            db.display().to_string(),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        Self::spawn(&args, port).await
    }

    async fn gateway(instances: &[String], port: u16) -> anyhow::Result<Self> {
        Self::gateway_with(instances, port, true).await
    }

    /// A gateway; `channel`: over the instance channel, else HTTP only.
    async fn gateway_with(instances: &[String], port: u16, channel: bool) -> anyhow::Result<Self> {
        let args: Vec<String> = vec![
            "gateway".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--instance".into(),
            instances.join(","),
            "--set".into(),
            "gateway.rate-limit-per-second=1000000".into(),
            "--set".into(),
            "gateway.rate-limit-burst=1000000".into(),
            "--set".into(),
            "gateway.token-secret=bench".into(),
            "--set".into(),
            format!("gateway.instance-channel={channel}"),
            // The load generator is one address with many connections.
            "--set".into(),
            "http.max-connections-per-address=0".into(),
        ];
        Self::spawn(&args, port).await
    }

    fn rss_kib(&self) -> u64 {
        confab_e2e::sockets::rss_kib(self.child.id())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where one chat's messages go: straight to its instance (with the
/// participant id) or through the gateway (with the participant's token).
#[derive(Clone)]
struct Chat {
    messages_url: String,
    participant_id: Option<String>,
    token: Option<String>,
    /// The instance the chat was created on.
    instance: Option<String>,
}

async fn create_chats(client: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<Vec<Chat>> {
    create_chats_at(client, url, n, false).await
}

/// `n` chats through the instance's internal API or the gateway's public one.
async fn create_chats_at(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    gateway: bool,
) -> anyhow::Result<Vec<Chat>> {
    use futures_util::StreamExt;
    let mut chats = Vec::with_capacity(n);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for i in 0..n {
        let client = client.clone();
        let url = url.to_owned();
        pending.push(async move {
            let create = if gateway {
                format!("{url}/api/v1/chats")
            } else {
                format!("{url}/internal/v1/sessions")
            };
            let r: Value = client
                .post(create)
                .json(&json!({"nickname": format!("bench {i}")}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(if gateway {
                let id = r["chat_id"].as_str().unwrap_or_default();
                Chat {
                    messages_url: format!("{url}/api/v1/chats/{id}/messages"),
                    participant_id: None,
                    token: r["token"].as_str().map(str::to_owned),
                    instance: r["instance_id"].as_str().map(str::to_owned),
                }
            } else {
                let id = r["session_id"].as_str().unwrap_or_default();
                Chat {
                    messages_url: format!("{url}/internal/v1/sessions/{id}/messages"),
                    participant_id: r["participant_id"].as_str().map(str::to_owned),
                    token: None,
                    instance: r["instance_id"].as_str().map(str::to_owned),
                }
            })
        });
        if pending.len() >= 64 {
            if let Some(r) = pending.next().await {
                chats.push(r?);
            }
        }
    }
    while let Some(r) = pending.next().await {
        chats.push(r?);
    }
    Ok(chats)
}

async fn send_answer(
    client: &reqwest::Client,
    chat: &Chat,
    text: &str,
    cmid: String,
) -> reqwest::Result<reqwest::Response> {
    let mut body = json!({"text": text, "client_msg_id": cmid});
    if let Some(p) = &chat.participant_id {
        body["participant_id"] = json!(p);
    }
    let mut req = client.post(&chat.messages_url).json(&body);
    if let Some(t) = &chat.token {
        req = req.bearer_auth(t);
    }
    req.send().await
}

/// Send one message; true when it was acknowledged as a new message (an
/// answer for a `client_msg_id` already stored is no acknowledgement of
/// work done, and would flatter the figures).
async fn send(client: &reqwest::Client, chat: &Chat, text: &str, cmid: String) -> bool {
    let Ok(r) = send_answer(client, chat, text, cmid).await else {
        return false;
    };
    if !r.status().is_success() {
        return false;
    }
    matches!(r.bytes().await, Ok(b) if !b.windows(16).any(|w| w == b"\"duplicate\":true"))
}

/// A prefix that makes the `client_msg_id`s of one load phase unique across
/// the phases and rounds of a run.
fn phase_nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

async fn closed_loop(
    client: &reqwest::Client,
    chats: &[Chat],
    args: &BenchArgs,
    text: &str,
) -> (f64, Latencies) {
    let stop = Arc::new(AtomicBool::new(false));
    let chats = Arc::new(chats.to_vec());
    let nonce = phase_nonce();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (client, chats, stop, text, nonce) = (
            client.clone(),
            chats.clone(),
            stop.clone(),
            text.to_owned(),
            nonce.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let chat = &chats[i % chats.len()];
                i += args_concurrency_stride(chats.len());
                let t = Instant::now();
                if send(&client, chat, &text, format!("{nonce}-w{w}-{n}")).await {
                    lat.push(t.elapsed().as_micros() as u32);
                }
                n += 1;
            }
            lat
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all.len() as f64 / elapsed.as_secs_f64(), Latencies(all))
}

async fn open_loop(
    client: &reqwest::Client,
    chats: &[Chat],
    args: &BenchArgs,
    text: &str,
) -> (f64, Latencies, u64) {
    // Each worker owns a slice of the schedule: message k is due at
    // start + k / rate; lateness counts in the latency.
    let workers = args.concurrency.max(1) as u64;
    let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let chats = Arc::new(chats.to_vec());
    let errors = Arc::new(AtomicU64::new(0));
    let nonce = phase_nonce();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, chats, text, errors, nonce) = (
            client.clone(),
            chats.clone(),
            text.to_owned(),
            errors.clone(),
            nonce.clone(),
        );
        let rate = args.rate;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = w;
            while k < total {
                let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let chat = &chats[(k as usize * 7919) % chats.len()];
                if send(&client, chat, &text, format!("{nonce}-o{k}")).await {
                    lat.push(due.elapsed().as_micros() as u32);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                k += workers;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = start.elapsed();
    (
        all.len() as f64 / elapsed.as_secs_f64(),
        Latencies(all),
        errors.load(Ordering::Relaxed),
    )
}

/// Acknowledged messages/s through the gateway against straight to the
/// instance, in the same run, on the same instance: through a gateway on
/// the instance channel (the default) and through one on HTTP only.
async fn gateway_cost(dir: &Path, args: &BenchArgs, text: &str) -> anyhow::Result<()> {
    let db = dir.join("gateway.db");
    let _ = std::fs::remove_file(&db);
    let instance = ServerProcess::instance(&db, &args.synchronous, "bench", free_port()?).await?;
    let urls = std::slice::from_ref(&instance.url);
    let gateway = ServerProcess::gateway_with(urls, free_port()?, true).await?;
    let http_gateway = ServerProcess::gateway_with(urls, free_port()?, false).await?;
    let client = client_builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let direct_chats = create_chats_at(&client, &instance.url, args.sessions, false).await?;
    let via_chats = create_chats_at(&client, &gateway.url, args.sessions, true).await?;
    let http_chats = create_chats_at(&client, &http_gateway.url, args.sessions, true).await?;
    // Alternate the targets in short rounds so that a noisy neighbour
    // weighs on all alike.
    let rates = compare(
        &client,
        args,
        text,
        &[
            Target::new("straight to the instance", &direct_chats, &[&instance]),
            Target::new("through the gateway", &via_chats, &[&instance]),
            Target::new("through a gateway on HTTP only", &http_chats, &[&instance]),
        ],
    )
    .await;
    let (direct, via, via_http) = (rates[0], rates[1], rates[2]);
    println!("gateway / direct: {:.2}", via / direct);
    println!(
        "gateway on HTTP only (gateway.instance-channel = false) / direct: {:.2}",
        via_http / direct
    );
    Ok(())
}

/// The reference's kill -9 test at scale: `--sessions` active chats on one
/// instance, SIGKILL, and the time until each has accepted a new message
/// through the gateway (which restores it on the other instance).
async fn restoration(dir: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let db = dir.join("restore.db");
    let _ = std::fs::remove_file(&db);
    let (port_a, port_b) = (free_port()?, free_port()?);
    let mut a = ServerProcess::instance(&db, &args.synchronous, "inst-a", port_a).await?;
    let urls = [a.url.clone(), format!("http://127.0.0.1:{port_b}")];
    let gateway = ServerProcess::gateway(&urls, free_port()?).await?;
    let client = client_builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    // Only A is up: every chat lands there.
    let chats = create_chats_at(&client, &gateway.url, args.sessions, true).await?;
    for chat in &chats {
        if !send(&client, chat, "before the kill", "before".into()).await {
            bail!("a message before the kill was refused");
        }
    }
    let _b = ServerProcess::instance(&db, &args.synchronous, "inst-b", port_b).await?;
    // Let the gateway see B.
    for _ in 0..200 {
        let s: Value = client
            .get(format!("{}/status", gateway.url))
            .send()
            .await?
            .json()
            .await?;
        let healthy = s["instances"]
            .as_array()
            .map(|l| l.iter().filter(|i| i["healthy"] == true).count())
            .unwrap_or(0);
        if healthy == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    a.stop(); // SIGKILL
    let start = Instant::now();
    let chats = Arc::new(chats);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, chats, next) = (client.clone(), chats.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            let mut failures = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(chat) = chats.get(i) else { break };
                // Retried with the same id until accepted, as a client would.
                loop {
                    match send_answer(&client, chat, "after the kill", "after".into()).await {
                        Ok(r) if r.status().is_success() => break,
                        _ => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    if start.elapsed() > Duration::from_secs(120) {
                        break;
                    }
                }
                times.push(start.elapsed().as_micros() as u32);
            }
            (times, failures)
        }));
    }
    let mut times = Vec::new();
    let mut retries = 0;
    for t in tasks {
        let (t, f) = t.await?;
        times.extend(t);
        retries += f;
    }
    let all = start.elapsed();
    // Every chat holds each message exactly once.
    let mut lost_or_duplicated = 0;
    for chat in chats.iter() {
        let url = chat.messages_url.replace("/messages", "/transcript");
        let t: Value = client
            .get(url)
            .bearer_auth(chat.token.as_deref().unwrap_or_default())
            .send()
            .await?
            .json()
            .await?;
        let texts: Vec<&str> = t["events"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter(|e| e["kind"] == "message")
                    .filter_map(|e| e["text"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if texts != ["before the kill", "after the kill"] {
            lost_or_duplicated += 1;
        }
    }
    let mut lat = Latencies(times);
    let metrics = client
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await?
        .text()
        .await?;
    let failovers = series_sum(&metrics, confab::telemetry::metrics::GATEWAY_FAILOVERS);
    println!(
        "restoration of {} chats after kill -9 ({failovers} gateway failovers): all accepted a new message within {:.2} s (p50 {}, p99 {}); {} client retries; {} chats lost or duplicated a message",
        chats.len(),
        all.as_secs_f64(),
        ms(lat.percentile(0.5)),
        ms(lat.percentile(0.99)),
        retries,
        lost_or_duplicated
    );
    drop(gateway);
    Ok(())
}

/// Acknowledged messages/s and latency on the Cassandra store (the kassandra
/// test node in this process) against the SQLite store, alternating rounds.
async fn cassandra_vs_sqlite(dir: &Path, args: &BenchArgs, text: &str) -> anyhow::Result<()> {
    let node = confab_e2e::cql_node::TestNode::start().await;
    let keyspace = "confab_bench";
    let sets = vec![
        "server.store=cassandra".to_string(),
        format!("cassandra.contact-points={}", node.addr),
        format!("cassandra.keyspace={keyspace}"),
        "cassandra.local-dc=".into(),
        "cassandra.await-schema-agreement=false".into(),
    ];
    let config = confab::config::Layers::default()
        .with_overrides(sets.iter().map(String::as_str))?
        .resolve()?;
    confab::store::cassandra::connect_and_init(&config.cassandra, false).await?;
    let db = dir.join("cassandra-bench.db");
    let _ = std::fs::remove_file(&db);
    let on_cassandra =
        ServerProcess::instance_with(&db, "bench-cassandra", free_port()?, &sets).await?;
    let on_sqlite = ServerProcess::instance(
        &dir.join("sqlite-bench.db"),
        &args.synchronous,
        "bench-sqlite",
        free_port()?,
    )
    .await?;
    let client = client_builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let cassandra_chats = create_chats_at(&client, &on_cassandra.url, args.sessions, false).await?;
    let sqlite_chats = create_chats_at(&client, &on_sqlite.url, args.sessions, false).await?;
    println!("(kassandra: an in-memory single-node CQL server in the benchmark process, NOT a real Cassandra; each Cassandra save is a write plus a quorum read-back)");
    let rates = compare(
        &client,
        args,
        text,
        &[
            Target::new("SQLite store", &sqlite_chats, &[&on_sqlite]),
            Target::new(
                "Cassandra store (test node)",
                &cassandra_chats,
                &[&on_cassandra],
            ),
        ],
    )
    .await;
    let (s_rate, c_rate) = (rates[0], rates[1]);
    println!("Cassandra / SQLite: {:.2}", c_rate / s_rate);
    Ok(())
}

/// Long enough for the store's checkpoint thread to copy back what the
/// rounds before wrote (it looks every `CHECKPOINT_INTERVAL`).
const SETTLE: Duration = CHECKPOINT_INTERVAL.saturating_mul(3);

/// Closed loops against the targets in alternating short rounds, so that a
/// noisy neighbour weighs on all alike; prints each round and the totals,
/// returns the mean rates.
async fn compare(
    client: &reqwest::Client,
    args: &BenchArgs,
    text: &str,
    targets: &[Target<'_>],
) -> Vec<f64> {
    let n = targets.len();
    // The database grows during a run and the host's load changes, so the
    // order alternates (A B, B A, …): no target is always measured later.
    let rounds = 4;
    let round = BenchArgs {
        duration: args.duration / rounds,
        ..args.clone()
    };
    let warm_up = BenchArgs {
        duration: Duration::from_secs(2),
        ..args.clone()
    };
    for target in targets {
        closed_loop(client, target.chats, &warm_up, text).await;
    }
    // A round's disk writes go on after it: the checkpoint copies its pages
    // back up to a checkpoint interval later, maybe during another target's
    // round. So they are counted for each target over the whole run, from
    // after the warm-up's have settled to after the last round's have: its
    // processes write little else meanwhile (an instance's heartbeat, once a
    // second, comes to a few bytes per message).
    tokio::time::sleep(SETTLE).await;
    let mut written = Vec::new();
    for target in targets {
        written.push(Costs::read(client, target).await);
    }
    let mut rates = vec![0.0; n];
    let mut latencies: Vec<Latencies> = (0..n).map(|_| Latencies(Vec::new())).collect();
    let mut costs: Vec<Costs> = (0..n).map(|_| Costs::default()).collect();
    for r in 1..=rounds {
        let mut line = format!("round {r}:");
        let order: Vec<usize> = if r % 2 == 1 {
            (0..n).collect()
        } else {
            (0..n).rev().collect()
        };
        for i in order {
            let Target { name, chats, .. } = &targets[i];
            let before = Costs::read(client, &targets[i]).await;
            let (rate, l) = closed_loop(client, chats, &round, text).await;
            let after = Costs::read(client, &targets[i]).await;
            costs[i].add(&before, &after, l.0.len() as u64);
            latencies[i].0.extend(l.0);
            rates[i] += rate / rounds as f64;
            line.push_str(&format!(" {name} {rate:.0}/s;"));
        }
        println!("{line}");
    }
    tokio::time::sleep(SETTLE).await;
    for (i, target) in targets.iter().enumerate() {
        costs[i].written(&written[i], &Costs::read(client, target).await);
    }
    for (i, target) in targets.iter().enumerate() {
        println!(
            "{}: {:.0} acknowledged messages/s, p50 {}, p99 {}; {}",
            target.name,
            rates[i],
            ms(latencies[i].percentile(0.5)),
            ms(latencies[i].percentile(0.99)),
            costs[i]
        );
    }
    rates
}

/// One side of a comparison: its chats, and the processes whose disk
/// writes and group commits count against it (the instances: they hold the
/// store).
struct Target<'a> {
    name: &'a str,
    chats: &'a [Chat],
    pids: Vec<u32>,
    /// The instances' `/metrics`.
    metrics: Vec<String>,
}

impl<'a> Target<'a> {
    fn new(name: &'a str, chats: &'a [Chat], processes: &[&ServerProcess]) -> Self {
        Target {
            name,
            chats,
            pids: processes.iter().map(|p| p.child.id()).collect(),
            metrics: processes
                .iter()
                .map(|p| format!("{}/metrics", p.url))
                .collect(),
        }
    }
}

/// What the measured rounds of one target cost the machine: CPU time left
/// idle (of all cores, from /proc/stat) and bytes the target's processes
/// sent to storage (`write_bytes` of /proc/PID/io, counted when a page is
/// dirtied; over the whole run, see `compare`) per acknowledged message, with the part the SQLite store's
/// checkpoint thread wrote (copying the WAL back into the database; the
/// rest is mostly the writer's WAL), and the saves per group commit of an
/// embedded store (`confab_store_group_commit_operations`: one fsync per
/// group).
#[derive(Default)]
struct Costs {
    idle_ticks: u64,
    all_ticks: u64,
    write_bytes: u64,
    checkpoint_bytes: u64,
    messages: u64,
    /// Group commits, and the saves they carried.
    commits: f64,
    committed: f64,
}

impl Costs {
    async fn read(client: &reqwest::Client, target: &Target<'_>) -> Costs {
        let (idle_ticks, all_ticks) = cpu_ticks();
        let mut costs = Costs {
            idle_ticks,
            all_ticks,
            write_bytes: target.pids.iter().map(|&pid| write_bytes(pid)).sum(),
            checkpoint_bytes: target.pids.iter().map(|&pid| checkpoint_bytes(pid)).sum(),
            ..Costs::default()
        };
        let name = confab::telemetry::metrics::STORE_GROUP_COMMIT_OPERATIONS;
        for url in &target.metrics {
            let Ok(answer) = client.get(url).send().await else {
                continue;
            };
            let text = answer.text().await.unwrap_or_default();
            costs.commits += series_sum(&text, &format!("{name}_count"));
            costs.committed += series_sum(&text, &format!("{name}_sum"));
        }
        costs
    }

    /// The disk writes between `before` and `after`.
    fn written(&mut self, before: &Costs, after: &Costs) {
        self.write_bytes = after.write_bytes.saturating_sub(before.write_bytes);
        self.checkpoint_bytes = after
            .checkpoint_bytes
            .saturating_sub(before.checkpoint_bytes);
    }

    /// A round's CPU, messages and group commits.
    fn add(&mut self, before: &Costs, after: &Costs, messages: u64) {
        self.idle_ticks += after.idle_ticks.saturating_sub(before.idle_ticks);
        self.all_ticks += after.all_ticks.saturating_sub(before.all_ticks);
        self.messages += messages;
        self.commits += (after.commits - before.commits).max(0.0);
        self.committed += (after.committed - before.committed).max(0.0);
    }
}

/// The sum of a series' samples in a Prometheus text page, whatever their
/// labels (0 if absent).
fn series_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

impl std::fmt::Display for Costs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_message = |bytes: u64| bytes as f64 / self.messages.max(1) as f64;
        write!(
            f,
            "CPU idle {:.0} %, {:.0} bytes written per message",
            100.0 * self.idle_ticks as f64 / self.all_ticks.max(1) as f64,
            per_message(self.write_bytes)
        )?;
        if self.checkpoint_bytes > 0 {
            write!(
                f,
                " ({:.0} by checkpoints)",
                per_message(self.checkpoint_bytes)
            )?;
        }
        if self.commits > 0.0 {
            write!(
                f,
                ", {:.1} saves per group commit",
                self.committed / self.commits
            )?;
        }
        Ok(())
    }
}

/// Idle (idle + iowait) and total ticks of all cores since boot.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (idle, ticks.iter().sum())
}

/// Bytes a process has caused to be written to storage since it started.
fn write_bytes(pid: u32) -> u64 {
    confab_e2e::io_write_bytes(Path::new(&format!("/proc/{pid}"))).unwrap_or(0)
}

/// Bytes the SQLite store's checkpoint threads of a process have caused
/// to be written (the kernel shows a thread's name cut to 15 bytes).
fn checkpoint_bytes(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|task| task.path())
        .filter(|task| {
            std::fs::read_to_string(task.join("comm"))
                .is_ok_and(|name| CHECKPOINT_THREAD.starts_with(name.trim_end()))
        })
        .filter_map(|task| confab_e2e::io_write_bytes(&task))
        .sum()
}

/// The reference's N+1 question on one host: does a cluster of more
/// instances on the embedded store carry more messages, or fewer? Each
/// size gets its own store file, instances and gateway; the clusters take
/// turns at the load in alternating rounds.
async fn clusters(dir: &Path, args: &BenchArgs, text: &str) -> anyhow::Result<()> {
    let client = client_builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let mut clusters = Vec::new();
    for &n in &args.instances {
        let db = dir.join(format!("cluster-{n}.db"));
        let mut instances = Vec::new();
        for k in 1..=n {
            let id = format!("c{n}-i{k}");
            instances
                .push(ServerProcess::instance(&db, &args.synchronous, &id, free_port()?).await?);
        }
        let urls: Vec<String> = instances.iter().map(|i| i.url.clone()).collect();
        let gateway = ServerProcess::gateway(&urls, free_port()?).await?;
        let chats = create_chats_at(&client, &gateway.url, args.sessions, true).await?;
        clusters.push((
            format!("{n} instance(s) through the gateway"),
            instances,
            gateway,
            chats,
        ));
    }
    let targets: Vec<Target<'_>> = clusters
        .iter()
        .map(|(name, instances, _, chats)| {
            let processes: Vec<&ServerProcess> = instances.iter().collect();
            Target::new(name, chats, &processes)
        })
        .collect();
    let rates = compare(&client, args, text, &targets).await;
    if let [first, .., last] = rates.as_slice() {
        println!(
            "{} instances / {} instance(s): {:.2}",
            args.instances.last().unwrap_or(&0),
            args.instances.first().unwrap_or(&0),
            last / first
        );
    }
    Ok(())
}
