//! How every confab listener (instance, gateway, dashboard) accepts and
//! serves connections: TLS when configured, a cap on connections per client
//! address, and nginx-style timeouts, so that a slow or hostile client holds
//! a bounded share of the process.
//!
//! `axum::serve` has none of these (hyper's header timeout needs a timer it
//! does not set, and its HTTP-version detection waits for a client's first
//! byte with no timeout), so connections are served here with hyper's
//! HTTP/1.1 connection builder, the way axum's "serve with hyper" example
//! does:
//!
//! - **header timeout** (`http.header-timeout`): a request's head must have
//!   arrived this long after the connection opened or the previous answer
//!   was written; it is also how long an idle keep-alive connection stays
//!   open (hyper runs one timer for both), and it bounds the TLS handshake;
//! - **body timeout** (`http.body-timeout`): a wall-clock deadline on reading
//!   a whole request body, so a body trickled a byte at a time ends;
//! - **connections per address** (`http.max-connections-per-address`): one
//!   more is answered 503 (plain HTTP) or closed (TLS) at once; addresses
//!   [`Listener::exempt`] names (a gateway's trusted proxies) are not
//!   counted, and an instance's listener is [`Listener::uncapped`].
//!
//! WebSockets leave these rules once upgraded: their liveness is the
//! protocol's own pings and the per-socket read deadlines (crate::ws).

use crate::config::{HttpConfig, IpNet};
use crate::telemetry::metrics as m;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The answer to a connection over the per-address cap (plain HTTP only:
/// over TLS there is no channel to write it on before a handshake).
static OVER_CAP: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": "too many connections from this address; retry when one has closed",
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// How long a stopping listener waits for the requests in flight.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Open connections per client address.
#[derive(Default)]
struct Counts(parking_lot::Mutex<HashMap<IpAddr, usize>>);

/// A counted connection; uncounted when the last holder drops it.
struct Slot {
    counts: Arc<Counts>,
    ip: Option<IpAddr>,
    component: &'static str,
}

/// What the cap counts by: the address, or for IPv6 its /64 (one client's
/// usual allocation, which it can spread connections over).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

impl Counts {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize, component: &'static str) -> Option<Slot> {
        let ip = client_key(ip);
        let mut counts = self.0.lock();
        let n = counts.entry(ip).or_insert(0);
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.clone(),
            ip: Some(ip),
            component,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut counts = self.counts.0.lock();
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
        metrics::gauge!(m::HTTP_CONNECTIONS_OPEN, "component" => self.component).decrement(1.0);
    }
}

/// The connection a request came on, in its extensions. A WebSocket handler
/// keeps it for the socket's life, so an upgraded connection stays counted
/// against its address after hyper has let go of it.
#[derive(Clone)]
pub struct Connection(#[allow(dead_code)] Arc<Slot>);

/// A bound listener with its rules.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: Duration,
    body_timeout: Duration,
    per_address: usize,
    exempt: Vec<IpNet>,
    component: &'static str,
}

impl Listener {
    /// Bind `addr` with the `[http]` rules.
    pub async fn bind(
        component: &'static str,
        addr: SocketAddr,
        http: &HttpConfig,
    ) -> anyhow::Result<Listener> {
        use anyhow::Context;
        let tls = match http.tls_identity() {
            Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                cert, key,
            )?)),
            None => None,
        };
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        for reason in ["per_address", "tls_handshake"] {
            metrics::counter!(m::HTTP_CONNECTIONS_REFUSED, "component" => component, "reason" => reason)
                .absolute(0);
        }
        metrics::gauge!(m::HTTP_CONNECTIONS_OPEN, "component" => component).set(0.0);
        Ok(Listener {
            tcp,
            tls,
            header_timeout: http.header_timeout,
            body_timeout: http.body_timeout,
            per_address: http.max_connections_per_address,
            exempt: Vec::new(),
            component,
        })
    }

    /// Connections from `nets` (a gateway's trusted proxies, which carry
    /// many clients each) are not capped.
    pub fn exempt(mut self, nets: Vec<IpNet>) -> Self {
        self.exempt = nets;
        self
    }

    /// No per-address cap: an instance's clients are its gateways, each of
    /// which holds a connection per subscribed client (crate::gateway::relay)
    /// and would meet any cap a public listener has.
    pub fn uncapped(mut self) -> Self {
        self.per_address = 0;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serve `router` until `shutdown` resolves; then stop accepting and
    /// wait for the requests in flight (upgraded WebSockets excepted: their
    /// owners end them).
    pub async fn serve(
        self,
        router: axum::Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let counts = Arc::new(Counts::default());
        let (connections, stopping) = (TaskTracker::new(), CancellationToken::new());
        // HTTP/1.1 only: hyper-util's auto-detecting builder waits for a
        // client's first bytes with no timeout at all, and the clients here
        // (browsers behind the gateway, the components) speak HTTP/1.1.
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        let builder = Arc::new(builder);
        let shutdown = std::pin::pin!(shutdown);
        let mut shutdown = shutdown;
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(component = self.component, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let slot = if self.exempt.iter().any(|n| n.contains(peer.ip())) {
                Some(Slot {
                    counts: counts.clone(),
                    ip: None,
                    component: self.component,
                })
            } else {
                counts.take(peer.ip(), self.per_address, self.component)
            };
            let Some(slot) = slot.map(|s| Connection(Arc::new(s))) else {
                metrics::counter!(m::HTTP_CONNECTIONS_REFUSED, "component" => self.component, "reason" => "per_address")
                    .increment(1);
                if self.tls.is_none() {
                    tokio::spawn(refuse(stream));
                }
                continue;
            };
            metrics::gauge!(m::HTTP_CONNECTIONS_OPEN, "component" => self.component).increment(1.0);
            let _ = stream.set_nodelay(true);
            let service = service(router.clone(), peer, slot.clone(), self.body_timeout);
            let (builder, tls, stopping) = (builder.clone(), self.tls.clone(), stopping.clone());
            let (handshake, component) = (self.header_timeout, self.component);
            connections.spawn(async move {
                let _slot = slot;
                match tls {
                    None => serve_connection(stream, service, &builder, stopping).await,
                    Some(acceptor) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(handshake, acceptor.accept(stream)).await
                        else {
                            metrics::counter!(m::HTTP_CONNECTIONS_REFUSED, "component" => component, "reason" => "tls_handshake")
                                .increment(1);
                            return;
                        };
                        serve_connection(stream, service, &builder, stopping).await
                    }
                }
            });
        }
        drop(self.tcp);
        stopping.cancel();
        connections.close();
        // Bounded: a client that stops reading its answer would hold the
        // wait forever (there is no write timeout on a response).
        if tokio::time::timeout(SHUTDOWN_WAIT, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                component = self.component,
                open = connections.len(),
                "connections still open at shutdown; closing them"
            );
        }
        Ok(())
    }
}

/// The router as a hyper service for one connection: the peer address for
/// `ConnectInfo` and the [`Connection`] in every request's extensions, the
/// body deadline on every request.
fn service(
    router: axum::Router,
    peer: SocketAddr,
    connection: Connection,
    body_timeout: Duration,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone,
> {
    let service = tower::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
        let mut req = req.map(|body| {
            axum::body::Body::new(tower_http::timeout::DeadlineBody::new(body_timeout, body))
        });
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(connection.clone());
        router.clone().oneshot(req)
    });
    hyper_util::service::TowerToHyperService::new(service)
}

/// One connection until it ends; once `stopping`, it finishes the request
/// in flight and closes.
async fn serve_connection<I, S>(
    io: I,
    service: S,
    builder: &hyper::server::conn::http1::Builder,
    stopping: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopping.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&OVER_CAP)).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::client_key;
    use std::net::IpAddr;

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix() {
        let key = |s: &str| client_key(s.parse::<IpAddr>().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    }
}
