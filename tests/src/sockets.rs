//! Many customer WebSockets at once, for the connection-scale test and
//! `confab-bench --scenario sockets`: each socket reads its chat's events,
//! checks that every stored event comes exactly once and in seq order, and
//! records when each message arrived, so that the time from a message's
//! acknowledgement to its delivery can be measured.
//!
//! The client side keeps its own sockets small (4 KiB read buffers), so
//! that tens of thousands fit in the load generator.

use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// One chat a socket subscribes to: its stream URL (`ws://…/ws?after=0`)
/// and the participant token offered as the subprotocol.
#[derive(Clone)]
pub struct Subscription {
    pub url: String,
    pub token: String,
}

/// What the sockets saw, shared by all of them and by the senders.
#[derive(Default)]
pub struct Book {
    /// (socket, seq) → when the message was acknowledged or delivered,
    /// whichever came first; the second removes it and records the time
    /// between them (0 when delivery came first).
    pending: Mutex<HashMap<(usize, u64), Mark>>,
    latencies_us: Mutex<Vec<u32>>,
    /// Sockets that received their chat's first event.
    pub opened: AtomicUsize,
    /// Message events delivered.
    pub delivered: AtomicU64,
    /// Messages acknowledged to the senders.
    pub acknowledged: AtomicU64,
    /// Stored events that came again, or out of seq order.
    pub duplicates: AtomicU64,
    /// Sockets closed by the server, and how (code → count).
    pub closes: Mutex<HashMap<u16, usize>>,
    /// `joined`/`reconnected` events received (a restoration elsewhere
    /// after the chat's instance died), and when the last one came.
    pub reconnected: AtomicUsize,
    pub last_reconnected: Mutex<Option<Instant>>,
}

enum Mark {
    Acknowledged(Instant),
    Delivered(Instant),
}

impl Book {
    /// A sender's acknowledgement of message `seq` to socket `socket`'s chat.
    pub fn acknowledged(&self, socket: usize, seq: u64) {
        self.acknowledged.fetch_add(1, Ordering::Relaxed);
        self.meet(socket, seq, Mark::Acknowledged(Instant::now()));
    }

    fn delivered(&self, socket: usize, seq: u64) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.meet(socket, seq, Mark::Delivered(Instant::now()));
    }

    fn meet(&self, socket: usize, seq: u64, mark: Mark) {
        let mut pending = self.pending.lock();
        let latency = match (pending.remove(&(socket, seq)), &mark) {
            (None, _) => {
                pending.insert((socket, seq), mark);
                return;
            }
            (Some(Mark::Acknowledged(at)), Mark::Delivered(now)) => now.duration_since(at),
            (Some(Mark::Delivered(_)), Mark::Acknowledged(_)) => Duration::ZERO,
            // The same side twice: a duplicate delivery (counted by the
            // socket) or a repeated acknowledgement; keep the first.
            (Some(first), _) => {
                pending.insert((socket, seq), first);
                return;
            }
        };
        drop(pending);
        self.latencies_us
            .lock()
            .push(latency.as_micros().min(u32::MAX as u128) as u32);
    }

    /// Acknowledged messages not delivered (yet).
    pub fn undelivered(&self) -> usize {
        self.pending
            .lock()
            .values()
            .filter(|m| matches!(m, Mark::Acknowledged(_)))
            .count()
    }

    /// Forget the latencies recorded so far (a new phase begins).
    pub fn clear_latencies(&self) {
        self.latencies_us.lock().clear();
    }

    /// The `p` quantile (0 to 1) of acknowledgement-to-delivery times.
    pub fn latency(&self, p: f64) -> Duration {
        let mut l = self.latencies_us.lock().clone();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort_unstable();
        let idx = ((l.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(l[idx] as u64)
    }

    pub fn closed(&self) -> usize {
        self.closes.lock().values().sum()
    }
}

/// Open a socket for each subscription, `concurrency` handshakes at a
/// time; each reads until its server closes it. Returns once every socket
/// received its chat's first event, or `limit` passed (then the count that
/// did is in `book.opened`).
pub async fn open(
    subscriptions: &[Subscription],
    book: &Arc<Book>,
    concurrency: usize,
    limit: Duration,
) -> usize {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let deadline = Instant::now() + limit;
    for (i, s) in subscriptions.iter().enumerate() {
        let Ok(permit) = semaphore.clone().acquire_owned().await else {
            break;
        };
        let (book, s) = (book.clone(), s.clone());
        tokio::spawn(async move {
            read(i, &s, &book, permit).await;
        });
        if Instant::now() > deadline {
            break;
        }
    }
    while book.opened.load(Ordering::Relaxed) < subscriptions.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    book.opened.load(Ordering::Relaxed)
}

async fn read(i: usize, s: &Subscription, book: &Book, permit: tokio::sync::OwnedSemaphorePermit) {
    let Ok(mut request) = s.url.as_str().into_client_request() else {
        return;
    };
    let Ok(protocol) = format!("confab.token.{}", s.token).parse() else {
        return;
    };
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let socket =
        match tokio_tungstenite::connect_async_with_config(request, Some(config), false).await {
            Ok((socket, _)) => socket,
            Err(_) => return,
        };
    let (_write, mut frames) = socket.split();
    let mut permit = Some(permit);
    let mut last = 0u64;
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let Ok(event) = serde_json::from_str::<Peek>(&text) else {
                    continue;
                };
                if permit.take().is_some() {
                    book.opened.fetch_add(1, Ordering::Relaxed);
                }
                if event.ephemeral {
                    continue;
                }
                if event.seq <= last {
                    book.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                last = event.seq;
                if event.kind == "message" {
                    book.delivered(i, event.seq);
                }
                if event.kind == "joined" && event.reason.as_deref() == Some("reconnected") {
                    *book.last_reconnected.lock() = Some(Instant::now());
                    book.reconnected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Message::Close(frame)) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                *book.closes.lock().entry(code).or_default() += 1;
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[derive(serde::Deserialize)]
struct Peek {
    seq: u64,
    kind: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    ephemeral: bool,
}

/// A process's resident memory, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// A process's open file descriptors.
pub fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Raise this process's soft descriptor limit to its hard one; the limit
/// now.
pub fn raise_descriptor_limit() -> u64 {
    confab::process::raise_descriptor_limit().map_or(0, |(_, now)| now)
}
