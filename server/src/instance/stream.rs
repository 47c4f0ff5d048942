//! A chat's event stream on the instance, for one reader: the backlog after
//! `after`, then every new event as it is saved, each exactly once in seq
//! order (ephemeral notices included), until the chat closes (1000), moves
//! to another instance (1012), the instance shuts down (1001) or the reader
//! leaves the chat (4001: an agent who left sees nothing after their
//! leaving, see `Transcript::read_limit`; one who has left is refused, 403).
//!
//! A gateway reads it as a watch over its channel to this instance
//! ([`ChannelWatches`], crate::channel: no socket of its own), or as a
//! WebSocket (`GET /internal/v1/sessions/{id}/ws`, for gateways without
//! watches); the stream is the same either way ([`Reader`]).

use super::error::EngineError;
use super::routes::AppState;
use super::LiveSession;
use crate::channel::Outlet;
use crate::contract::internal::Route;
use crate::contract::{after_param, check_chat_id, reader_param};
use crate::error::ApiError;
use crate::session::{EventKind, EventView};
use crate::ws::{self, SeqFilter};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

pub(super) async fn stream(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    connection: Option<axum::Extension<crate::listener::Connection>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let opened = open(&s, &id, &q).await?;
    let stop = s.stop.clone();
    Ok(ws::chat_upgrade(ws).on_upgrade(move |socket| async move {
        let open = crate::telemetry::metrics::OpenSocket::new("instance");
        push_events(Socket(socket), opened, stop).await;
        drop((connection, open));
    }))
}

/// Watches over the gateways' channels: the stream route's path and query
/// arrive in a `WATCH` frame, the events leave as channel frames.
pub(super) struct ChannelWatches(pub AppState);

impl crate::channel::Watches for ChannelWatches {
    fn watch(&self, path: String, outlet: Outlet) -> futures_util::future::BoxFuture<'static, ()> {
        let s = self.0.clone();
        Box::pin(async move {
            let opened = match watched(&path) {
                Some((id, q)) => open(&s, &id, &q).await,
                None => Err(ApiError::not_found("no such stream")),
            };
            match opened {
                Ok(opened) => push_events(Watched(outlet), opened, s.stop.clone()).await,
                Err(e) => outlet.refuse(&e),
            }
        })
    }
}

/// The chat and query of a watch's path.
fn watched(path: &str) -> Option<(String, HashMap<String, String>)> {
    let uri: axum::http::Uri = path.parse().ok()?;
    let id = Route::Stream.chat_in(uri.path())?.to_owned();
    let Query(q) = Query::<HashMap<String, String>>::try_from_uri(&uri).ok()?;
    Some((id, q))
}

/// A stream's start, checked.
struct Opened {
    session: Arc<LiveSession>,
    after: u64,
    reader: Option<String>,
}

/// Check a stream's request: the chat is here, `after` and `reader` are
/// well formed, and the reader has not left the chat.
async fn open(s: &AppState, id: &str, q: &HashMap<String, String>) -> Result<Opened, ApiError> {
    let after = after_param(q)?;
    let id = check_chat_id(id)?;
    let session = s.instance.live(id).await?;
    let reader = reader_param(q)?.map(str::to_owned);
    if let Some(p) = &reader {
        if session.read_limit(p).await?.is_some() {
            return Err(EngineError::Left {
                chat: id.to_owned(),
                participant: p.clone(),
            }
            .into());
        }
    }
    Ok(Opened {
        session,
        after,
        reader,
    })
}

/// Where a stream's events go.
trait Reader: Send {
    /// One event; an error when the reader is gone or does not take it.
    async fn send(&mut self, v: &EventView) -> Result<(), ()>;
    async fn close(self, code: u16, reason: &'static str);
    /// Resolves when the reader goes away.
    async fn gone(&mut self);
}

/// A reader on a WebSocket of its own.
struct Socket(WebSocket);

impl Reader for Socket {
    async fn send(&mut self, v: &EventView) -> Result<(), ()> {
        let text = serde_json::to_string(v).unwrap_or_default();
        match tokio::time::timeout(SEND_TIMEOUT, self.0.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    async fn close(self, code: u16, reason: &'static str) {
        ws::close(self.0, code, reason).await
    }

    async fn gone(&mut self) {
        loop {
            match self.0.recv().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// A reader at the other end of a gateway's channel: a slow participant is
/// the gateway's to drop, the channel's queue takes every event.
struct Watched(Outlet);

impl Reader for Watched {
    async fn send(&mut self, v: &EventView) -> Result<(), ()> {
        let json = serde_json::to_vec(v).unwrap_or_default();
        self.0.event(&json).map_err(|_| ())
    }

    async fn close(self, code: u16, reason: &'static str) {
        self.0.end(code, reason)
    }

    async fn gone(&mut self) {
        self.0.cancelled().await
    }
}

async fn push_events<R: Reader>(mut socket: R, opened: Opened, stop: CancellationToken) {
    let Opened {
        session,
        after,
        reader,
    } = opened;
    let reader = reader.as_deref();
    let (mut rx, closed) = session.subscribe().await;
    let mut seen = SeqFilter::after(after);
    // The backlog holds the reader's leaving if they left since they asked.
    if let Some(end) = catch_up(&mut socket, &session, &mut seen, reader).await {
        return end.close(socket).await;
    }
    if closed {
        return socket.close(ws::CHAT_CLOSED, "chat closed").await;
    }
    loop {
        tokio::select! {
            biased;
            r = rx.recv() => match r {
                Ok(v) => {
                    if !seen.admit(v.seq, v.ephemeral) {
                        continue;
                    }
                    if socket.send(&v).await.is_err() {
                        return;
                    }
                    if v.kind == EventKind::Closed {
                        return socket.close(ws::CHAT_CLOSED, "chat closed").await;
                    }
                    if own_leaving(&v, reader) {
                        if let Some(end) = after_leaving(&mut socket, &session, &mut seen, reader).await {
                            return end.close(socket).await;
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    if let Some(end) = catch_up(&mut socket, &session, &mut seen, reader).await {
                        return end.close(socket).await;
                    }
                }
                Err(RecvError::Closed) => return socket.close(ws::MOVED, "session moved").await,
            },
            _ = session.gone.cancelled() => return socket.close(ws::MOVED, "session moved").await,
            _ = stop.cancelled() => return socket.close(ws::GOING_AWAY, "instance shutting down").await,
            _ = socket.gone() => return,
        }
    }
}

/// Stored events a reader is sent at a time (catching up at connection or
/// after falling behind): what one reader holds of the backlog at most.
const BACKLOG_PAGE: usize = 100;
/// …and at most about this much text.
const BACKLOG_PAGE_BYTES: usize = 256 << 10;

/// A reader that takes no frame for this long is dropped, not buffered for.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How a stream ends once the events say so.
enum End {
    /// After the chat's closing.
    Closed,
    /// After the reader's own leaving.
    Left,
    /// The reader is gone (or stopped reading).
    Gone,
}

impl End {
    async fn close<R: Reader>(self, socket: R) {
        match self {
            End::Closed => socket.close(ws::CHAT_CLOSED, "chat closed").await,
            End::Left => socket.close(ws::LEFT, "you left this chat").await,
            End::Gone => {}
        }
    }
}

enum Sent {
    /// Every stored event after the mark went out.
    All,
    /// The chat's closing went out.
    Closed,
    /// The reader's own `left` event went out (perhaps a restoration's
    /// disconnect, after which they are back).
    OwnLeft,
    /// The reader is gone (or stopped reading).
    Gone,
}

/// Whether `v` is `reader`'s own `left` event.
fn own_leaving(v: &EventView, reader: Option<&str>) -> bool {
    v.kind == EventKind::Left && reader.is_some() && v.participant_id.as_deref() == reader
}

/// Send the stored events after `seen`, a page at a time; the end of the
/// stream if they hold it (the chat's closing, the reader's leaving).
async fn catch_up<R: Reader>(
    socket: &mut R,
    session: &LiveSession,
    seen: &mut SeqFilter,
    reader: Option<&str>,
) -> Option<End> {
    loop {
        match send_stored(socket, session, seen, u64::MAX, reader).await {
            Sent::All => return None,
            Sent::Closed => return Some(End::Closed),
            Sent::Gone => return Some(End::Gone),
            Sent::OwnLeft => {
                if let Some(end) = after_leaving(socket, session, seen, reader).await {
                    return Some(end);
                }
            }
        }
    }
}

/// After the reader's own `left` event: if they left for good, what they
/// may still see (the closing, if they ended the chat) and the end of
/// their stream; None after a restoration's disconnect (they are back).
async fn after_leaving<R: Reader>(
    socket: &mut R,
    session: &LiveSession,
    seen: &mut SeqFilter,
    reader: Option<&str>,
) -> Option<End> {
    let limit = session.read_limit(reader?).await.ok().flatten()?;
    Some(
        match send_stored(socket, session, seen, limit, None).await {
            Sent::All | Sent::OwnLeft => End::Left,
            Sent::Closed => End::Closed,
            Sent::Gone => End::Gone,
        },
    )
}

/// Send the stored events after `seen` up to seq `limit`, a page at a
/// time, stopping after the chat's closing or `reader`'s own leaving.
async fn send_stored<R: Reader>(
    socket: &mut R,
    session: &LiveSession,
    seen: &mut SeqFilter,
    limit: u64,
    reader: Option<&str>,
) -> Sent {
    loop {
        let (page, more) = session
            .page(seen.last(), BACKLOG_PAGE, BACKLOG_PAGE_BYTES)
            .await;
        for v in page.iter().take_while(|v| v.seq <= limit) {
            seen.admit(v.seq, false);
            if socket.send(v).await.is_err() {
                return Sent::Gone;
            }
            if v.kind == EventKind::Closed {
                return Sent::Closed;
            }
            if own_leaving(v, reader) {
                return Sent::OwnLeft;
            }
        }
        if !more || seen.last() >= limit {
            return Sent::All;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open stream keeps one of these futures.
    #[test]
    fn a_stream_keeps_a_small_future() {
        for (reader, size) in [
            ("watch", output_size(push_events::<Watched>)),
            ("socket", output_size(push_events::<Socket>)),
        ] {
            assert!(size <= 4096, "a {reader} stream's future is {size} bytes");
        }
    }
}
