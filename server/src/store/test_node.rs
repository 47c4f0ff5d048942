//! A CQL test node: the `kassandra` crate (a third-party in-memory
//! single-node CQL v4 server) served over real TCP on loopback — for tests,
//! benchmarks and trying `confab up --store cassandra` without a cluster.
//! It is NOT a real Cassandra: no replication, no TTL expiry, no
//! lightweight transactions, an empty `system.peers` (so schema agreement
//! cannot be awaited against it), everything lost on exit.
//!
//! `freeze` stops answering while connections stay open (a hung node);
//! `kill` closes the listener and every connection (a dead node); `resume`
//! and `restart` bring it back on the same port with the same data.

use futures_util::{SinkExt, StreamExt};
use kassandra::error::DbError;
use kassandra::frame::request::Request;
use kassandra::frame::response::error::Error;
use kassandra::frame::response::Response;
use kassandra::frame::{request_stream, response_sink};
use kassandra::KassandraSession;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct TestNode {
    pub addr: SocketAddr,
    state: Arc<Mutex<KassandraSession>>,
    frozen: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TestNode {
    /// A fresh node on a free loopback port.
    pub async fn start() -> TestNode {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the CQL test node")
    }

    /// A fresh node listening on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<TestNode> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let node = TestNode {
            addr,
            state: Arc::new(Mutex::new(KassandraSession::new())),
            frozen: Arc::new(AtomicBool::new(false)),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        node.serve(listener);
        Ok(node)
    }

    fn serve(&self, listener: TcpListener) {
        let (state, frozen, tasks) = (self.state.clone(), self.frozen.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = tokio::spawn(client(state.clone(), frozen.clone(), stream));
                tasks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(accept);
    }

    pub fn contact_point(&self) -> String {
        self.addr.to_string()
    }

    /// Stop answering; connections stay open.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Close the listener and every connection.
    pub fn kill(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }

    /// Listen again on the same port, with the data kept.
    pub async fn restart(&self) {
        self.kill();
        self.resume();
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn client(
    state: Arc<Mutex<KassandraSession>>,
    frozen: Arc<AtomicBool>,
    mut stream: TcpStream,
) {
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.split();
    let mut requests = request_stream(&mut read);
    let mut responses = response_sink(&mut write);
    while let Some(Ok((frame, opcode, data))) = requests.next().await {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let response = if frame.version.is_unsupported() {
            Response::unsupported_version()
        } else {
            catch_unwind(AssertUnwindSafe(|| {
                match Request::deserialize(opcode, &data, frame.flags) {
                    Ok(req) => handle(&state, req),
                    Err(err) => Response::Error(err),
                }
            }))
            .unwrap_or_else(|_| {
                Response::Error(Error::new(DbError::ServerError, "kassandra panicked"))
            })
        };
        if responses.send((response, frame.stream)).await.is_err() {
            break;
        }
    }
}

fn handle(state: &Mutex<KassandraSession>, request: Request<'_>) -> Response {
    let mut kass = state.lock().unwrap_or_else(PoisonError::into_inner);
    let result = match request {
        Request::StartUp(_) | Request::Register { .. } => return Response::Ready,
        Request::Options => return Response::options(),
        Request::Query(q) => kass.process(q),
        Request::Prepare(q) => kass.prepare(q),
        Request::Execute(e) => kass.execute(e),
        Request::Batch(b) => kass.process_batch(b),
        Request::AuthResponse => {
            return Response::Error(Error::new(DbError::ProtocolError, "auth unsupported"))
        }
    };
    match result {
        Ok(r) => Response::Result(r),
        Err(e) => Response::Error(e),
    }
}
