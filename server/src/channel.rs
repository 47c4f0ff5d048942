//! The gateway's channel to an instance: the instance's internal HTTP API
//! carried over one WebSocket connection, many requests in flight at once.
//!
//! Over HTTP/1.1 every message costs the gateway and the instance a request
//! and an answer of their own on the wire (a write and a read each side,
//! one connection per request in flight). Here requests and answers are
//! binary frames tagged with an id; a writer sends every frame that is
//! waiting before it flushes, so under load one system call carries many.
//! The instance runs each request through its own router, so the internal
//! API, its checks and its metrics are the same either way.
//!
//! Request frame: `id` (u64, big-endian), method length (u8), method, path
//! length (u16), path (with query), body (the rest).
//! Answer frame: `id` (u64), status (u16), body (the rest).
//!
//! Failure semantics are HTTP's: a closed connection fails every request in
//! flight on it (the gateway fails over and retries with the message's
//! `client_msg_id`); an instance that stops (SIGTERM) reads no new request,
//! answers the ones it has, then closes.
//!
//! Participants' event streams travel here too (a *watch*), so that a
//! gateway holds one descriptor per participant, not two, and an instance
//! none: a request frame with method [`WATCH`] and the stream route's path
//! (`…/ws?after=N&reader=P`) is answered by any number of answer frames with
//! status [`EVENT`] (one event's JSON each), ended by one with status
//! [`END`] (the WebSocket close code, u16, then the reason), or refused
//! with an error status and its JSON body before any event. A request frame
//! with method [`UNWATCH`] and the watch's id ends it (no answer). Watches
//! end with the channel: the gateway then fails over as when an instance's
//! WebSocket drops. An instance without watches answers `WATCH` 405 (no
//! such method on the route) and the gateway opens a WebSocket instead.

use crate::error::ApiError;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket};
use axum::http::{Method, Request, StatusCode};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The instance's route for the channel.
pub const PATH: &str = "/internal/v1/channel";
/// Method of a request frame that opens a watch (see the module doc).
pub const WATCH: &str = "WATCH";
/// Method of a request frame that ends the watch with its id.
pub const UNWATCH: &str = "UNWATCH";
/// Status of an answer frame that carries one event of a watch.
pub const EVENT: u16 = 290;
/// Status of an answer frame that ends a watch.
pub const END: u16 = 291;

/// Largest answer frame (transcripts can be large).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest request frame the instance reads: a body is at most 1 MiB.
pub const MAX_REQUEST_FRAME: usize = (1 << 20) + (64 << 10);
/// Longest path a request frame carries (longer ones go over HTTP).
pub const MAX_PATH: usize = u16::MAX as usize;
/// Longest a peer may take nothing we send before the channel is given up.
const STALL: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest wait for a close handshake or for the peer to finish sending.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest wait to open a channel (a frozen instance accepts the TCP
/// connection but never answers the handshake).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A request frame; `path` is at most [`MAX_PATH`] bytes and the method at
/// most 255 (the gateway's standard methods).
pub fn encode_request(id: u64, method: &Method, path: &str, body: &[u8]) -> Bytes {
    debug_assert!(path.len() <= MAX_PATH && method.as_str().len() <= 255);
    let method = method.as_str().as_bytes();
    let mut b = BytesMut::with_capacity(8 + 1 + method.len() + 2 + path.len() + body.len());
    b.put_u64(id);
    b.put_u8(method.len() as u8);
    b.put_slice(method);
    b.put_u16(path.len() as u16);
    b.put_slice(path.as_bytes());
    b.put_slice(body);
    b.freeze()
}

pub struct RequestFrame {
    pub id: u64,
    pub method: Method,
    pub path: String,
    pub body: Bytes,
}

pub fn decode_request(mut b: Bytes) -> Option<RequestFrame> {
    if b.remaining() < 9 {
        return None;
    }
    let id = b.get_u64();
    let n = b.get_u8() as usize;
    if b.remaining() < n + 2 {
        return None;
    }
    let method = Method::from_bytes(&b.split_to(n)).ok()?;
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return None;
    }
    let path = String::from_utf8(b.split_to(n).to_vec()).ok()?;
    Some(RequestFrame {
        id,
        method,
        path,
        body: b,
    })
}

pub fn encode_answer(id: u64, status: StatusCode, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(10 + body.len());
    b.put_u64(id);
    b.put_u16(status.as_u16());
    b.put_slice(body);
    b.freeze()
}

fn encode_frame(id: u64, status: u16, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(10 + body.len());
    b.put_u64(id);
    b.put_u16(status);
    b.put_slice(body);
    b.freeze()
}

/// The method of a request frame, without decoding the rest.
fn method_of(frame: &[u8]) -> Option<&[u8]> {
    let n = *frame.get(8)? as usize;
    frame.get(9..9 + n)
}

pub fn decode_answer(mut b: Bytes) -> Option<(u64, StatusCode, Bytes)> {
    if b.remaining() < 10 {
        return None;
    }
    let id = b.get_u64();
    let status = StatusCode::from_u16(b.get_u16()).ok()?;
    Some((id, status, b))
}

/// What an instance does with a watch: serve the event stream at `path`
/// (the stream route's path and query) into `outlet` until the stream ends
/// or the outlet is cancelled.
pub trait Watches: Send + Sync + 'static {
    fn watch(&self, path: String, outlet: Outlet) -> futures_util::future::BoxFuture<'static, ()>;
}

/// Instance side: where one watch's frames go.
pub struct Outlet {
    id: u64,
    out: mpsc::UnboundedSender<Bytes>,
    cancel: CancellationToken,
}

impl Outlet {
    /// One event (its JSON); fails once the channel is gone.
    pub fn event(&self, json: &[u8]) -> Result<(), ChannelClosed> {
        self.out
            .send(encode_frame(self.id, EVENT, json))
            .map_err(|_| ChannelClosed)
    }

    /// The end of the stream, with a WebSocket close code and reason.
    pub fn end(&self, code: u16, reason: &str) {
        let mut body = Vec::with_capacity(2 + reason.len());
        body.extend_from_slice(&code.to_be_bytes());
        body.extend_from_slice(reason.as_bytes());
        let _ = self.out.send(encode_frame(self.id, END, &body));
    }

    /// The watch is refused (before any event).
    pub fn refuse(&self, e: &ApiError) {
        let _ = self.out.send(encode_answer(
            self.id,
            e.status,
            e.body().to_string().as_bytes(),
        ));
    }

    /// Fires when the gateway ends the watch or the channel closes.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

/// Instance side: serve requests (and watches, with `watches`) from one
/// gateway through `router` until the connection closes or `stop` fires;
/// on stop, answer what was read, then close.
pub async fn serve(
    socket: WebSocket,
    router: axum::Router,
    watches: Option<Arc<dyn Watches>>,
    stop: CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut queue) = mpsc::unbounded_channel::<Bytes>();
    let watching: Arc<Mutex<HashMap<u64, CancellationToken>>> = Default::default();
    // Reader and writer are one future: when it is dropped, the socket goes.
    // A gateway that takes nothing any more ends the channel: the reader
    // stops too, and every watch ends with the queue.
    let stalled = CancellationToken::new();
    let writer_stalled = stalled.clone();
    let writer = async move {
        if write_batched(&mut queue, &mut sink, Message::Binary, |_| true)
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(LINGER, sink.close()).await;
        } else {
            writer_stalled.cancel();
        }
    };
    let reader = async move {
        loop {
            let message = tokio::select! {
                m = stream.next() => m,
                _ = stop.cancelled() => break,
                _ = stalled.cancelled() => break,
            };
            let frame = match message {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => break,
            };
            let Some(call) = decode_request(frame) else {
                tracing::warn!("malformed frame on the gateway channel; closing it");
                break;
            };
            if call.method.as_str() == UNWATCH {
                if let Some(cancel) = watching.lock().remove(&call.id) {
                    cancel.cancel();
                }
                continue;
            }
            if let (WATCH, Some(watches)) = (call.method.as_str(), &watches) {
                let cancel = CancellationToken::new();
                watching.lock().insert(call.id, cancel.clone());
                let outlet = Outlet {
                    id: call.id,
                    out: out.clone(),
                    cancel,
                };
                let (serving, watching) = (watches.watch(call.path, outlet), watching.clone());
                tokio::spawn(async move {
                    serving.await;
                    watching.lock().remove(&call.id);
                });
                continue;
            }
            let (router, out) = (router.clone(), out.clone());
            // Its own task, as an HTTP request has: it finishes (and its
            // save is acknowledged) even if the channel closes meanwhile.
            tokio::spawn(async move {
                let (status, body) = answer(router, call.method, &call.path, call.body).await;
                let _ = out.send(encode_answer(call.id, status, &body));
            });
        }
        // Watches end with the channel (each drops its sender)…
        for (_, cancel) in watching.lock().drain() {
            cancel.cancel();
        }
        // …and the writer ends once every request task has sent its answer.
        drop(out);
        stream
    };
    let (mut stream, ()) = tokio::join!(reader, writer);
    // Read (and drop: unanswered, they fail over) what the gateway sent
    // meanwhile until it answers the close, so that closing with unread
    // data does not reset the connection and lose answers already sent.
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Send the queued frames until the queue closes: every frame waiting at
/// that moment goes out before one flush (one write for many under load).
/// Frames for which `keep` is false are dropped unsent. Fails when the
/// socket fails, or when the peer takes nothing for [`STALL`]: a peer that
/// stopped reading (frozen, cut off without a reset) is gone, and what is
/// queued for it (watches' events keep coming) must not grow without end.
async fn write_batched<S, M>(
    queue: &mut mpsc::UnboundedReceiver<Bytes>,
    sink: &mut S,
    message: fn(Bytes) -> M,
    keep: impl Fn(&Bytes) -> bool,
) -> Result<(), ()>
where
    S: futures_util::Sink<M> + Unpin,
{
    async fn within<T, E>(op: impl std::future::Future<Output = Result<T, E>>) -> Result<T, ()> {
        match tokio::time::timeout(STALL, op).await {
            Ok(Ok(t)) => Ok(t),
            _ => Err(()),
        }
    }
    while let Some(frame) = queue.recv().await {
        if keep(&frame) {
            within(sink.feed(message(frame))).await?;
        }
        while let Ok(frame) = queue.try_recv() {
            if keep(&frame) {
                within(sink.feed(message(frame))).await?;
            }
        }
        within(sink.flush()).await?;
    }
    Ok(())
}

async fn answer(
    router: axum::Router,
    method: Method,
    path: &str,
    body: Bytes,
) -> (StatusCode, Bytes) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .header(axum::http::header::CONTENT_LENGTH, body.len())
        .body(Body::from(body));
    let mut request = match request {
        Ok(r) => r,
        Err(e) => return error_answer(ApiError::bad_request(e.to_string())),
    };
    // The channel checked the cluster secret when it opened.
    request
        .extensions_mut()
        .insert(crate::contract::ChannelAuthenticated);
    let Ok(response) = router.oneshot(request).await;
    let status = response.status();
    // Room for the answer frame's header within the gateway's limit.
    match axum::body::to_bytes(response.into_body(), MAX_FRAME - 16).await {
        Ok(body) => (status, body),
        Err(e) => error_answer(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "too_large",
            format!("the answer could not be sent on the gateway channel: {e}"),
        )),
    }
}

fn error_answer(e: ApiError) -> (StatusCode, Bytes) {
    (e.status, e.body().to_string().into())
}

type Waiting = Mutex<Option<HashMap<u64, oneshot::Sender<(StatusCode, Bytes)>>>>;
type Watching = Mutex<Option<HashMap<u64, mpsc::UnboundedSender<WatchFrame>>>>;

/// Gateway side: what a watch receives.
#[derive(Debug)]
pub enum WatchFrame {
    /// One event's JSON.
    Event(Bytes),
    /// The stream ended with this WebSocket close code.
    End(u16),
    /// The instance refused the watch (status and JSON error body).
    Refused(StatusCode, Bytes),
}

/// Gateway side: one open watch; dropping it ends the watch on the
/// instance. Its frames stop (`None`) when the channel closes.
pub struct Watch {
    id: u64,
    channel: Arc<Channel>,
    pub frames: mpsc::UnboundedReceiver<WatchFrame>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let open = self
            .channel
            .watching
            .lock()
            .as_mut()
            .and_then(|w| w.remove(&self.id))
            .is_some();
        if open {
            let unwatch = Method::from_bytes(UNWATCH.as_bytes()).unwrap_or(Method::DELETE);
            let _ = self
                .channel
                .out
                .send(encode_request(self.id, &unwatch, "", b""));
        }
    }
}

/// Gateway side: one open channel to an instance.
pub struct Channel {
    out: mpsc::UnboundedSender<Bytes>,
    /// Requests sent and not yet answered; None once the link is closed.
    waiting: Arc<Waiting>,
    /// Open watches; None once the link is closed.
    watching: Arc<Watching>,
    next_id: AtomicU64,
    closed: CancellationToken,
}

/// Why a request on a link got no answer.
#[derive(Debug)]
pub struct ChannelClosed;

/// Why a link could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// The instance has no channel route (an older version): use HTTP.
    Unsupported,
    Failed(String),
}

impl Channel {
    /// Open a channel to the instance at `base` (`http://host:port`).
    pub async fn connect(
        base: &str,
        secret: &crate::contract::ClusterSecret,
    ) -> Result<Arc<Channel>, ConnectError> {
        let url = crate::tls::websocket_url(base, PATH);
        let request = secret
            .websocket_request(&url)
            .map_err(|e| ConnectError::Failed(e.to_string()))?;
        let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME);
        config.max_frame_size = Some(MAX_FRAME);
        let connect = crate::tls::websocket(request, Some(config));
        let (socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ConnectError::Failed("the channel handshake timed out".into()))?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r)
                    if r.status() == StatusCode::NOT_FOUND =>
                {
                    ConnectError::Unsupported
                }
                tokio_tungstenite::tungstenite::Error::Http(r)
                    if r.status() == StatusCode::UNAUTHORIZED =>
                {
                    ConnectError::Failed(
                        "the instance refused the cluster secret (401): check cluster.secret"
                            .into(),
                    )
                }
                e => ConnectError::Failed(e.to_string()),
            })?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut queue) = mpsc::unbounded_channel::<Bytes>();
        let waiting: Arc<Waiting> = Arc::new(Mutex::new(Some(HashMap::new())));
        let watching: Arc<Watching> = Arc::new(Mutex::new(Some(HashMap::new())));
        let closed = CancellationToken::new();
        let link = Arc::new(Channel {
            out,
            waiting: waiting.clone(),
            watching: watching.clone(),
            next_id: AtomicU64::new(1),
            closed: closed.clone(),
        });
        use tokio_tungstenite::tungstenite::Message as M;
        let (writer_closed, writer_waiting, writer_watching) =
            (closed.clone(), waiting.clone(), watching.clone());
        tokio::spawn(async move {
            // A request whose caller gave up (timeout, failover) is not sent,
            // nor a watch already ended; an unwatch always is.
            let wanted = |frame: &Bytes| {
                let Some(id) = frame
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                else {
                    return false;
                };
                let pending = |m: Option<bool>| m.unwrap_or(false);
                pending(writer_waiting.lock().as_ref().map(|w| w.contains_key(&id)))
                    || pending(writer_watching.lock().as_ref().map(|w| w.contains_key(&id)))
                    || method_of(frame) == Some(UNWATCH.as_bytes())
            };
            tokio::select! {
                _ = write_batched(&mut queue, &mut sink, M::Binary, wanted) => {}
                _ = writer_closed.cancelled() => {}
            }
            writer_closed.cancel();
            let _ = tokio::time::timeout(LINGER, sink.close()).await;
        });
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = stream.next() => m,
                    _ = closed.cancelled() => break,
                };
                match message {
                    Some(Ok(M::Binary(frame))) => {
                        let Some((id, status, body)) = decode_answer(frame) else {
                            break;
                        };
                        let waiter = waiting.lock().as_mut().and_then(|w| w.remove(&id));
                        if let Some(w) = waiter {
                            let _ = w.send((status, body));
                        } else {
                            deliver(&watching, id, status, body);
                        }
                    }
                    Some(Ok(M::Ping(_) | M::Pong(_) | M::Frame(_))) => {}
                    _ => break,
                }
            }
            closed.cancel();
            // Every request still waiting fails, every watch ends: their
            // senders are dropped.
            waiting.lock().take();
            watching.lock().take();
        });
        Ok(link)
    }

    /// Open a watch of the stream at `path` (the stream route's path and
    /// query).
    pub fn watch(self: &Arc<Self>, path: &str) -> Result<Watch, ChannelClosed> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, frames) = mpsc::unbounded_channel();
        match self.watching.lock().as_mut() {
            Some(w) => w.insert(id, tx),
            None => return Err(ChannelClosed),
        };
        let watch = Watch {
            id,
            channel: self.clone(),
            frames,
        };
        let method = Method::from_bytes(WATCH.as_bytes()).map_err(|_| ChannelClosed)?;
        self.out
            .send(encode_request(id, &method, path, b""))
            .map_err(|_| ChannelClosed)?;
        Ok(watch)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Close the link: requests waiting on it fail, queued ones are dropped.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Send a request and wait for its answer; fails when the link closes
    /// first. Dropping the future forgets the request (its answer, if any,
    /// is discarded).
    pub async fn call(
        &self,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<(StatusCode, Bytes), ChannelClosed> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.waiting.lock().as_mut() {
            Some(w) => w.insert(id, tx),
            None => return Err(ChannelClosed),
        };
        let forget = Forget {
            waiting: &self.waiting,
            id,
        };
        if self
            .out
            .send(encode_request(id, method, path, body))
            .is_err()
        {
            return Err(ChannelClosed);
        }
        let answer = rx.await.map_err(|_| ChannelClosed);
        drop(forget);
        answer
    }
}

/// An answer frame for a watch, to its receiver; the watch is forgotten
/// when it ends (or its receiver is gone).
fn deliver(watching: &Watching, id: u64, status: StatusCode, body: Bytes) {
    let mut watching = watching.lock();
    let Some(w) = watching.as_mut() else { return };
    let frame = match status.as_u16() {
        EVENT => {
            if w.get(&id)
                .is_some_and(|tx| tx.send(WatchFrame::Event(body)).is_err())
            {
                w.remove(&id);
            }
            return;
        }
        END => WatchFrame::End(
            body.get(..2)
                .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
        ),
        _ => WatchFrame::Refused(status, body),
    };
    if let Some(tx) = w.remove(&id) {
        let _ = tx.send(frame);
    }
}

/// Removes a request's waiter when its caller gives up (timeout, failover).
struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.waiting.lock().as_mut() {
            w.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = encode_request(
            7,
            &Method::POST,
            "/internal/v1/sessions/a/messages?x=1",
            b"{\"t\":1}",
        );
        let r = decode_request(f).expect("a request frame");
        assert_eq!(
            (r.id, r.method, r.path.as_str(), &r.body[..]),
            (
                7,
                Method::POST,
                "/internal/v1/sessions/a/messages?x=1",
                &b"{\"t\":1}"[..]
            )
        );
        let a = encode_answer(9, StatusCode::CONFLICT, b"{}");
        assert_eq!(
            decode_answer(a),
            Some((9, StatusCode::CONFLICT, Bytes::from_static(b"{}")))
        );
    }

    #[test]
    fn truncated_frames_are_refused() {
        let f = encode_request(7, &Method::GET, "/x", b"");
        for n in 0..f.len() - 1 {
            assert!(decode_request(f.slice(..n)).is_none(), "{n} bytes");
        }
        assert!(decode_answer(Bytes::from_static(b"123456789")).is_none());
    }

    /// A server on loopback: `routes` plus the channel route when `channel`;
    /// `stop` stops it as SIGTERM does, `kill` drops its channels' sockets
    /// as the death of the process does.
    async fn server(channel: bool, stop: CancellationToken, kill: CancellationToken) -> String {
        server_with(channel, None, stop, kill).await
    }

    async fn server_with(
        channel: bool,
        watches: Option<Arc<dyn Watches>>,
        stop: CancellationToken,
        kill: CancellationToken,
    ) -> String {
        use axum::routing::{get, post};
        let routes = axum::Router::new()
            .route("/echo", post(|body: Bytes| async move { body }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    "slow"
                }),
            )
            .route("/teapot", get(|| async { StatusCode::IM_A_TEAPOT }));
        let app = if channel {
            let inner = routes.clone();
            routes.route(
                PATH,
                get(move |ws: axum::extract::WebSocketUpgrade| {
                    let (inner, stop, kill) = (inner.clone(), stop.clone(), kill.clone());
                    let watches = watches.clone();
                    async move {
                        ws.on_upgrade(move |s| async move {
                            tokio::select! {
                                _ = serve(s, inner, watches, stop) => {}
                                _ = kill.cancelled() => {}
                            }
                        })
                    }
                }),
            )
        } else {
            routes
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        url
    }

    /// A `/slow` request (300 ms) on `link`, given time to reach the server.
    async fn slow_call(
        link: &Arc<Channel>,
    ) -> tokio::task::JoinHandle<Result<(StatusCode, Bytes), ChannelClosed>> {
        let link = link.clone();
        let call = tokio::spawn(async move { link.call(&Method::GET, "/slow", b"").await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        call
    }

    #[tokio::test]
    async fn requests_and_answers_cross_the_channel_concurrently() {
        let url = server(true, CancellationToken::new(), CancellationToken::new()).await;
        let link = Channel::connect(&url, &crate::contract::ClusterSecret::new("test"))
            .await
            .expect("a channel");
        let calls = (0..50).map(|i| {
            let link = link.clone();
            async move {
                let body = format!("{{\"n\":{i}}}");
                let (status, answer) = link
                    .call(&Method::POST, "/echo", body.as_bytes())
                    .await
                    .expect("an answer");
                assert_eq!((status, &answer[..]), (StatusCode::OK, body.as_bytes()));
            }
        });
        futures_util::future::join_all(calls).await;
        let (status, _) = link
            .call(&Method::GET, "/teapot", b"")
            .await
            .expect("an answer");
        assert_eq!(status, StatusCode::IM_A_TEAPOT);
        let (status, _) = link
            .call(&Method::GET, "/nowhere", b"")
            .await
            .expect("an answer");
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// Watches of "/count/N": the events 1..=N, then the end (1000);
    /// "/forever": one event, then nothing until unwatched; anything else
    /// refused (404).
    struct Counting(Arc<AtomicU64>);

    impl Watches for Counting {
        fn watch(
            &self,
            path: String,
            outlet: Outlet,
        ) -> futures_util::future::BoxFuture<'static, ()> {
            let unwatched = self.0.clone();
            Box::pin(async move {
                if let Some(n) = path
                    .strip_prefix("/count/")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    for i in 1..=n {
                        let _ = outlet.event(format!("{{\"seq\":{i}}}").as_bytes());
                    }
                    outlet.end(1000, "done");
                } else if path == "/forever" {
                    let _ = outlet.event(b"{}");
                    outlet.cancelled().await;
                    unwatched.fetch_add(1, Ordering::Relaxed);
                } else {
                    outlet.refuse(&ApiError::not_found("no such stream"));
                }
            })
        }
    }

    async fn frame(watch: &mut Watch) -> Option<WatchFrame> {
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.frames.recv())
            .await
            .expect("a frame in time")
    }

    #[tokio::test]
    async fn watches_carry_events_then_their_end_beside_requests() {
        let unwatched = Arc::new(AtomicU64::new(0));
        let kill = CancellationToken::new();
        let url = server_with(
            true,
            Some(Arc::new(Counting(unwatched.clone()))),
            CancellationToken::new(),
            kill.clone(),
        )
        .await;
        let link = Channel::connect(&url, &crate::contract::ClusterSecret::new("test"))
            .await
            .expect("a channel");
        let mut counted = link.watch("/count/3").unwrap();
        for i in 1..=3 {
            match frame(&mut counted).await {
                Some(WatchFrame::Event(json)) => {
                    assert_eq!(&json[..], format!("{{\"seq\":{i}}}").as_bytes())
                }
                other => panic!("event {i}: {other:?}"),
            }
        }
        assert!(matches!(
            frame(&mut counted).await,
            Some(WatchFrame::End(1000))
        ));
        let mut refused = link.watch("/nowhere").unwrap();
        assert!(matches!(
            frame(&mut refused).await,
            Some(WatchFrame::Refused(StatusCode::NOT_FOUND, _))
        ));
        // Requests go on beside the watches.
        let (status, _) = link.call(&Method::GET, "/teapot", b"").await.unwrap();
        assert_eq!(status, StatusCode::IM_A_TEAPOT);
        // Dropping a watch ends it on the server.
        let mut forever = link.watch("/forever").unwrap();
        assert!(matches!(
            frame(&mut forever).await,
            Some(WatchFrame::Event(_))
        ));
        drop(forever);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while unwatched.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the server saw the unwatch");
        // A watch ends (no frame) when the channel goes, as with kill -9.
        let mut open = link.watch("/forever").unwrap();
        assert!(matches!(frame(&mut open).await, Some(WatchFrame::Event(_))));
        kill.cancel();
        assert!(frame(&mut open).await.is_none());
    }

    #[tokio::test]
    async fn a_server_without_the_route_is_reached_over_http() {
        let url = server(false, CancellationToken::new(), CancellationToken::new()).await;
        assert!(matches!(
            Channel::connect(&url, &crate::contract::ClusterSecret::new("test")).await,
            Err(ConnectError::Unsupported)
        ));
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        assert!(matches!(
            Channel::connect(&url, &crate::contract::ClusterSecret::new("test")).await,
            Err(ConnectError::Failed(_))
        ));
    }

    #[tokio::test]
    async fn a_stopping_server_answers_what_it_read_then_closes() {
        let stop = CancellationToken::new();
        let url = server(true, stop.clone(), CancellationToken::new()).await;
        let link = Channel::connect(&url, &crate::contract::ClusterSecret::new("test"))
            .await
            .expect("a channel");
        let slow = slow_call(&link).await;
        stop.cancel();
        let (status, body) = slow.await.unwrap().expect("answered before the close");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow"[..]));
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !link.is_closed() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the channel closes");
        assert!(link.call(&Method::GET, "/teapot", b"").await.is_err());
    }

    #[tokio::test]
    async fn closing_a_link_fails_its_requests_and_the_next_ones() {
        let url = server(true, CancellationToken::new(), CancellationToken::new()).await;
        let link = Channel::connect(&url, &crate::contract::ClusterSecret::new("test"))
            .await
            .expect("a channel");
        let slow = slow_call(&link).await;
        // What the gateway does when it marks the instance down.
        link.close();
        assert!(slow.await.unwrap().is_err(), "a waiting request fails");
        assert!(link.is_closed());
        assert!(link.call(&Method::GET, "/teapot", b"").await.is_err());
    }

    #[tokio::test]
    async fn requests_in_flight_fail_when_the_server_goes() {
        let kill = CancellationToken::new();
        let url = server(true, CancellationToken::new(), kill.clone()).await;
        let link = Channel::connect(&url, &crate::contract::ClusterSecret::new("test"))
            .await
            .expect("a channel");
        let slow = slow_call(&link).await;
        // Its end of the channel goes, as with kill -9.
        kill.cancel();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), slow)
            .await
            .expect("not left hanging")
            .unwrap();
        assert!(result.is_err(), "{result:?}");
    }
}
