//! A fault-injecting TCP proxy in front of a CQL node (the test node or a
//! real one), for one client: every request goes through to the node, and
//! while told to, the proxy drops the node's RESULT frames, so the client
//! sees timeouts for writes that were applied: the lost answer of a real
//! cluster (a coordinator that wrote to the replicas and then went quiet).
//! Other frames (READY, SUPPORTED for the driver's keep-alives, EVENT)
//! still pass, so the connections stay up. CQL protocol v4 framing: a
//! 9-byte header (version, flags, stream, opcode, body length), then the
//! body. A test tool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
                let (mut client_read, client_write) = client.into_split();
                let (node_read, mut node_write) = node.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut node_write).await;
                });
                tokio::spawn(answers(node_read, client_write, shared.clone()));
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
}

impl Drop for CqlProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copy the node's frames to the client, one at a time, but for the RESULT
/// frames dropped while `drop_results` is on.
async fn answers(
    mut node: tokio::net::tcp::OwnedReadHalf,
    mut client: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let mut header = [0u8; 9];
    loop {
        if node.read_exact(&mut header).await.is_err() {
            return;
        }
        let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        let mut body = vec![0u8; length];
        if node.read_exact(&mut body).await.is_err() {
            return;
        }
        if header[4] == RESULT && state.drop_results.load(Ordering::SeqCst) {
            state.dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if client.write_all(&header).await.is_err() || client.write_all(&body).await.is_err() {
            return;
        }
    }
}
