//! `confab bench`: a load generator for the message path, reporting figures
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

use crate::config::Synchronous;
use crate::session::{now_ms, Draft, Participant, Role, SessionState};
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::{Append, SessionRecord, SessionStore};
use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
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
    let tmp;
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("confab-bench-{}", std::process::id()));
            tmp
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
    println!("# confab bench\n");
    println!("machine: {}", machine());
    println!(
        "settings: {} chats, {} concurrent senders, {:?} per phase, {}-byte messages, synchronous={}\n",
        args.sessions, args.concurrency, args.duration, args.text_bytes, args.synchronous
    );

    let raw = raw_store_rate(&dir.join("raw.db"), synchronous, &args, &text).await?;
    println!("raw SQLite group-commit appends: {raw:.0} rows/s (no HTTP)");

    let db = dir.join("server.db");
    let _ = std::fs::remove_file(&db);
    let mut server = ServerProcess::start(&db, &args.synchronous).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let chats = create_chats(&client, &server.url, args.sessions).await?;

    let (rate, mut lat) = closed_loop(&client, &server.url, &chats, &args, &text).await;
    println!(
        "closed loop over HTTP: {rate:.0} acknowledged messages/s, p50 {}, p99 {}; {:.2} of the raw store rate",
        ms(lat.percentile(0.5)),
        ms(lat.percentile(0.99)),
        rate / raw
    );

    if args.rate > 0 {
        let (achieved, mut lat, errors) =
            open_loop(&client, &server.url, &chats, &args, &text).await;
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
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
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
    let store = Arc::new(SqliteStore::open(
        path,
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

impl ServerProcess {
    async fn start(db: &Path, synchronous: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(std::env::current_exe()?)
            .args(["server", "--instance-id", "bench", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--sqlite-path")
            .arg(db)
            .arg("--set")
            .arg(format!("server.sqlite-synchronous={synchronous}"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting confab server")?;
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if client.get(format!("{url}/healthz")).send().await.is_ok() {
                return Ok(ServerProcess { child, url });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("the benchmark server did not start")
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
            })
            .unwrap_or(0)
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

/// (chat id, participant id)
type Chat = (String, String);

async fn create_chats(client: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<Vec<Chat>> {
    let mut chats = Vec::with_capacity(n);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for i in 0..n {
        let client = client.clone();
        let url = format!("{url}/internal/v1/sessions");
        pending.push(async move {
            let r: Value = client
                .post(url)
                .json(&json!({"nickname": format!("bench {i}")}))
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok((
                r["session_id"].as_str().unwrap_or_default().to_owned(),
                r["participant_id"].as_str().unwrap_or_default().to_owned(),
            ))
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

async fn send(client: &reqwest::Client, url: &str, chat: &Chat, text: &str, cmid: String) -> bool {
    let r = client
        .post(format!("{url}/internal/v1/sessions/{}/messages", chat.0))
        .json(&json!({"participant_id": chat.1, "text": text, "client_msg_id": cmid}))
        .send()
        .await;
    matches!(r, Ok(r) if r.status().is_success())
}

async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    chats: &[Chat],
    args: &BenchArgs,
    text: &str,
) -> (f64, Latencies) {
    let stop = Arc::new(AtomicBool::new(false));
    let chats = Arc::new(chats.to_vec());
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (client, url, chats, stop, text) = (
            client.clone(),
            url.to_owned(),
            chats.clone(),
            stop.clone(),
            text.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let chat = &chats[i % chats.len()];
                i += args_concurrency_stride(chats.len());
                let t = Instant::now();
                if send(&client, &url, chat, &text, format!("w{w}-{n}")).await {
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
    url: &str,
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
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, url, chats, text, errors) = (
            client.clone(),
            url.to_owned(),
            chats.clone(),
            text.to_owned(),
            errors.clone(),
        );
        let rate = args.rate;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = w;
            while k < total {
                let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let chat = &chats[(k as usize * 7919) % chats.len()];
                if send(&client, &url, chat, &text, format!("o{k}")).await {
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
