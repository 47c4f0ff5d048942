//! A fault-injecting TCP proxy in front of a CQL node (the test node or a
//! real one), for one client. While told to, it
//! - drops the node's RESULT frames: the client sees timeouts for writes
//!   that were applied (a coordinator that wrote to the replicas and then
//!   went quiet);
//! - holds the node's RESULT frames for a while: answers that come after
//!   the client gave up on them;
//! - holds the client's requests for a while before they reach the node:
//!   writes applied late, after the client gave up on them (a mutation
//!   stuck in a coordinator's queue).
//!
//! Other answers (READY, SUPPORTED for the driver's keep-alives, EVENT)
//! are never dropped or held themselves, so the connections stay up; every
//! frame keeps its place in its direction (one behind a held frame waits
//! for it). CQL protocol v4 framing: a 9-byte header (version, flags,
//! stream, opcode, body length), then the body. A test tool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const RESULT: u8 = 0x08;

pub struct CqlProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    drop_results: AtomicBool,
    dropped: AtomicU64,
    /// Milliseconds to hold RESULT frames / requests; 0: none.
    hold_results_ms: AtomicU64,
    hold_requests_ms: AtomicU64,
    held_results: AtomicU64,
    held_requests: AtomicU64,
}

impl CqlProxy {
    /// Listen on a free loopback port and forward to `upstream` (host:port).
    pub async fn start(upstream: &str) -> CqlProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State::default());
        let upstream = upstream.to_owned();
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(node) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = node.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (node_read, node_write) = node.into_split();
                tokio::spawn(relay(
                    client_read,
                    node_write,
                    shared.clone(),
                    Way::Requests,
                ));
                tokio::spawn(relay(node_read, client_write, shared.clone(), Way::Answers));
            }
        });
        CqlProxy {
            addr,
            state,
            accept,
        }
    }

    pub fn contact_point(&self) -> String {
        self.addr.to_string()
    }

    /// From now on drop (or again pass) the node's RESULT frames.
    pub fn drop_answers(&self, on: bool) {
        self.state.drop_results.store(on, Ordering::SeqCst);
    }

    /// RESULT frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::SeqCst)
    }

    /// From now on hold the node's RESULT frames this long (ZERO: no more).
    pub fn hold_answers(&self, by: Duration) {
        let ms = by.as_millis() as u64;
        self.state.hold_results_ms.store(ms, Ordering::SeqCst);
    }

    /// From now on hold the client's requests this long before they reach
    /// the node (ZERO: no more).
    pub fn hold_requests(&self, by: Duration) {
        let ms = by.as_millis() as u64;
        self.state.hold_requests_ms.store(ms, Ordering::SeqCst);
    }

    /// Answers and requests held so far.
    pub fn held(&self) -> (u64, u64) {
        (
            self.state.held_results.load(Ordering::SeqCst),
            self.state.held_requests.load(Ordering::SeqCst),
        )
    }
}

impl Drop for CqlProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Requests,
    Answers,
}

/// Copy frames one way, one at a time: a RESULT frame dropped while
/// `drop_results` is on; a frame held while its way's hold is set (RESULT
/// frames only, on the answers' way) is written once its time has come,
/// after every frame before it.
async fn relay<R, W>(mut from: R, to: W, state: Arc<State>, way: Way)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (queue, mut due) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        let mut to = to;
        while let Some((at, frame)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let mut header = [0u8; 9];
    loop {
        if from.read_exact(&mut header).await.is_err() {
            break;
        }
        let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        let mut frame = header.to_vec();
        frame.resize(9 + length, 0);
        if from.read_exact(&mut frame[9..]).await.is_err() {
            break;
        }
        let result = header[4] == RESULT;
        if way == Way::Answers && result && state.drop_results.load(Ordering::SeqCst) {
            state.dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let (hold, held) = match way {
            Way::Requests => (&state.hold_requests_ms, &state.held_requests),
            Way::Answers => (&state.hold_results_ms, &state.held_results),
        };
        let ms = if way == Way::Answers && !result {
            0
        } else {
            hold.load(Ordering::SeqCst)
        };
        if ms > 0 {
            held.fetch_add(1, Ordering::SeqCst);
        }
        if queue
            .send((Instant::now() + Duration::from_millis(ms), frame))
            .is_err()
        {
            break;
        }
    }
    drop(queue);
    let _ = writer.await;
}
