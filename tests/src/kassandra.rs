//! The CQL test node: the `kassandra` crate (an in-memory single-node CQL v4
//! server) served over real TCP on loopback, with the failures the outage
//! tests need: `freeze` (connections stay open, nothing is answered — a hung
//! node) and `kill` (the listener and every connection close — a dead node),
//! then `resume` / `restart` on the same port with the same data.
//!
//! With `CONFAB_TEST_CASSANDRA=host:port` the tests use that real cluster
//! instead (freeze/kill tests then need a node they may stop, and are run
//! only against the test node).

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
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the CQL test node");
        let addr = listener.local_addr().expect("its address");
        let node = TestNode {
            addr,
            state: Arc::new(Mutex::new(KassandraSession::new())),
            frozen: Arc::new(AtomicBool::new(false)),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        node.serve(listener);
        node
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

/// Where Cassandra tests run: a real cluster named by
/// `CONFAB_TEST_CASSANDRA=host:port`, else a fresh test node.
pub enum Node {
    Real(String),
    Test(TestNode),
}

impl Node {
    pub async fn get() -> Node {
        match std::env::var("CONFAB_TEST_CASSANDRA") {
            Ok(addr) if !addr.is_empty() => {
                println!(
                    "Cassandra tests against the real cluster at {addr} (CONFAB_TEST_CASSANDRA)"
                );
                Node::Real(addr)
            }
            _ => {
                let node = TestNode::start().await;
                println!("Cassandra tests against the kassandra test node at {} (set CONFAB_TEST_CASSANDRA=host:port for a real cluster)", node.addr);
                Node::Test(node)
            }
        }
    }

    pub fn contact_point(&self) -> String {
        match self {
            Node::Real(a) => a.clone(),
            Node::Test(n) => n.contact_point(),
        }
    }

    pub fn test_node(&self) -> Option<&TestNode> {
        match self {
            Node::Test(n) => Some(n),
            Node::Real(_) => None,
        }
    }
}

/// Create a throwaway keyspace with confab's schema; its name.
pub async fn init_keyspace(contact_point: &str) -> String {
    let keyspace = format!(
        "confab_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let config = cassandra_config(contact_point, &keyspace);
    let session = confab::store::cassandra::connect(&config)
        .await
        .expect("connect to the CQL node");
    confab::store::cassandra::init_schema(&session, &keyspace, false)
        .await
        .expect("create the schema");
    keyspace
}

/// Test set-up for kassandra's known gap: its system.peers is empty, so the
/// driver's automatic schema-agreement wait is off against the test node
/// (a real cluster, CONFAB_TEST_CASSANDRA, keeps it on).
pub fn schema_agreement() -> &'static str {
    match std::env::var("CONFAB_TEST_CASSANDRA") {
        Ok(a) if !a.is_empty() => "true",
        _ => "false",
    }
}

pub fn cassandra_config(contact_point: &str, keyspace: &str) -> confab::config::CassandraConfig {
    confab::config::Layers::default()
        .with("cassandra.contact-points", contact_point)
        .and_then(|l| l.with("cassandra.keyspace", keyspace))
        .and_then(|l| l.with("cassandra.reconnect-timeout", "2s"))
        .and_then(|l| l.with("cassandra.await-schema-agreement", schema_agreement()))
        .and_then(|l| {
            l.with(
                "cassandra.local-dc",
                std::env::var("CONFAB_TEST_CASSANDRA_DC").unwrap_or_default(),
            )
        })
        .and_then(|l| l.resolve())
        .expect("test Cassandra configuration")
        .cassandra
}
