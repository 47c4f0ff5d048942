//! A CQL test node: the `kassandra` crate (a third-party in-memory
//! single-node CQL v4 server) served over real TCP on loopback — for tests,
//! benchmarks and trying `confab up --store cassandra` without a cluster
//! (`cargo run -p confab-e2e --bin cql-test-node`). A test tool, not part of
//! the product.
//! It is NOT a real Cassandra: no replication, no TTL expiry, no
//! lightweight transactions, an empty `system.peers` (so schema agreement
//! cannot be awaited against it), everything lost on exit.
//!
//! `freeze` stops answering while connections stay open (a hung node);
//! `kill` closes the listener and every connection (a dead node); `resume`
//! and `restart` bring it back on the same port with the same data.
//!
//! kassandra speaks neither TLS nor authentication; this node adds both in
//! front of it, as a real cluster configured for them would behave
//! (`Security`): client-to-node TLS with a self-signed certificate that
//! doubles as the CA file, and the `PasswordAuthenticator` SASL PLAIN
//! handshake (AUTHENTICATE → AUTH_RESPONSE → AUTH_SUCCESS, or error 0x0100
//! "bad credentials"; nothing else is answered before it).

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use kassandra::error::DbError;
use kassandra::frame::request::{Request, RequestOpcode};
use kassandra::frame::response::error::Error;
use kassandra::frame::response::{Response, ResponseOpcode};
use kassandra::frame::{raw_response_sink, request_stream, FrameFlags, FrameParams};
use kassandra::KassandraSession;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The authenticator a password-protected Cassandra announces.
pub const PASSWORD_AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";

/// What a client must get through before its first query.
#[derive(Clone, Default)]
pub struct Security {
    /// Client-to-node TLS.
    pub tls: Option<TlsIdentity>,
    /// Username and password (`PasswordAuthenticator`).
    pub credentials: Option<(String, String)>,
}

/// A self-signed certificate for 127.0.0.1 / localhost and its key; the
/// certificate is also the CA file a client trusts.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    acceptor: Arc<SslAcceptor>,
}

impl TlsIdentity {
    /// A fresh EC P-256 key and a self-signed certificate valid for a day.
    pub fn generate() -> Result<TlsIdentity, openssl::error::ErrorStack> {
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::PKey;
        use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
        use openssl::x509::{X509Builder, X509NameBuilder};

        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_text("CN", "confab CQL test node")?;
        let name = name.build();
        let mut cert = X509Builder::new()?;
        cert.set_version(2)?;
        let serial =
            BigNum::from_slice(&uuid::Uuid::new_v4().as_bytes()[..8])?.to_asn1_integer()?;
        cert.set_serial_number(&serial)?;
        cert.set_subject_name(&name)?;
        cert.set_issuer_name(&name)?;
        cert.set_pubkey(&key)?;
        cert.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
        cert.set_not_after(Asn1Time::days_from_now(1)?.as_ref())?;
        cert.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&cert.x509v3_context(None, None))?;
        cert.append_extension(san)?;
        cert.sign(&key, MessageDigest::sha256())?;
        let cert = cert.build();
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        acceptor.set_private_key(&key)?;
        acceptor.set_certificate(&cert)?;
        acceptor.check_private_key()?;
        Ok(TlsIdentity {
            cert_pem: cert.to_pem()?,
            acceptor: Arc::new(acceptor.build()),
        })
    }
}

pub struct TestNode {
    pub addr: SocketAddr,
    state: Arc<Mutex<KassandraSession>>,
    frozen: Arc<AtomicBool>,
    security: Security,
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
        Self::start_secured(addr, Security::default()).await
    }

    /// A fresh node on `addr` that requires TLS and/or credentials.
    pub async fn start_secured(addr: SocketAddr, security: Security) -> std::io::Result<TestNode> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let node = TestNode {
            addr,
            state: Arc::new(Mutex::new(KassandraSession::new())),
            frozen: Arc::new(AtomicBool::new(false)),
            security,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        node.serve(listener);
        Ok(node)
    }

    fn serve(&self, listener: TcpListener) {
        let (state, frozen, tasks) = (self.state.clone(), self.frozen.clone(), self.tasks.clone());
        let security = self.security.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = tokio::spawn(connection(
                    state.clone(),
                    frozen.clone(),
                    security.clone(),
                    stream,
                ));
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

/// One client connection: the TLS handshake if required, then frames.
async fn connection(
    state: Arc<Mutex<KassandraSession>>,
    frozen: Arc<AtomicBool>,
    security: Security,
    stream: TcpStream,
) {
    let _ = stream.set_nodelay(true);
    let credentials = security.credentials.clone();
    match &security.tls {
        None => client(state, frozen, credentials, stream).await,
        Some(tls) => {
            let Ok(ssl) = Ssl::new(tls.acceptor.context()) else {
                return;
            };
            let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, stream) else {
                return;
            };
            if Pin::new(&mut stream).accept().await.is_err() {
                // Not TLS, or the client refused our certificate.
                return;
            }
            client(state, frozen, credentials, stream).await
        }
    }
}

async fn client(
    state: Arc<Mutex<KassandraSession>>,
    frozen: Arc<AtomicBool>,
    credentials: Option<(String, String)>,
    stream: impl AsyncRead + AsyncWrite,
) {
    let (read, write) = tokio::io::split(stream);
    let mut requests = request_stream(read);
    let mut responses = raw_response_sink(write);
    let mut authenticated = credentials.is_none();
    while let Some(Ok((frame, opcode, data))) = requests.next().await {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reply = if frame.version.is_unsupported() {
            encode(Response::unsupported_version())
        } else if let Some((user, password)) = credentials.as_ref().filter(|_| !authenticated) {
            match opcode {
                RequestOpcode::Options => encode(Response::options()),
                RequestOpcode::Startup => (ResponseOpcode::Authenticate, {
                    let mut b = BytesMut::new();
                    b.put_u16(PASSWORD_AUTHENTICATOR.len() as u16);
                    b.put_slice(PASSWORD_AUTHENTICATOR.as_bytes());
                    b.freeze()
                }),
                RequestOpcode::AuthResponse
                    if sasl_plain(&data) == Some((user.as_str(), password.as_str())) =>
                {
                    authenticated = true;
                    // [bytes] null: no final token.
                    (ResponseOpcode::AuthSuccess, Bytes::from_static(&[0xff; 4]))
                }
                RequestOpcode::AuthResponse => encode(Response::Error(Error::new(
                    DbError::AuthenticationError,
                    "Provided username and/or password are incorrect",
                ))),
                _ => encode(Response::Error(Error::new(
                    DbError::ProtocolError,
                    "authentication required",
                ))),
            }
        } else {
            encode(
                catch_unwind(AssertUnwindSafe(|| {
                    match Request::deserialize(opcode, &data, frame.flags) {
                        Ok(req) => handle(&state, req),
                        Err(err) => Response::Error(err),
                    }
                }))
                .unwrap_or_else(|_| {
                    Response::Error(Error::new(DbError::ServerError, "kassandra panicked"))
                }),
            )
        };
        let (opcode, body) = reply;
        let params = FrameParams {
            version: frame.version,
            flags: FrameFlags::empty(),
            stream: frame.stream,
        };
        if responses.send((params, opcode, body)).await.is_err() {
            break;
        }
    }
}

/// A response's opcode and body.
fn encode(response: Response) -> (ResponseOpcode, Bytes) {
    let mut body = BytesMut::new();
    let mut flags = FrameFlags::empty();
    if response.serialize(&mut body, &mut flags).is_err() {
        return encode(Response::Error(Error::new(
            DbError::ServerError,
            "response could not be encoded",
        )));
    }
    let opcode = ResponseOpcode::try_from(response.opcode()).unwrap_or(ResponseOpcode::Error);
    (opcode, body.freeze())
}

/// The user and password of a SASL PLAIN token (`[bytes]` of
/// `authzid \0 user \0 password`).
fn sasl_plain(data: &[u8]) -> Option<(&str, &str)> {
    let len = usize::try_from(i32::from_be_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    let token = std::str::from_utf8(data.get(4..4 + len)?).ok()?;
    let mut parts = token.split('\0');
    let (_authzid, user, password) = (parts.next()?, parts.next()?, parts.next()?);
    Some((user, password))
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
