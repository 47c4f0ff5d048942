//! A chat's WebSocket on the instance (`GET /internal/v1/sessions/{id}/ws`,
//! opened by the gateway for each participant's socket): the backlog after
//! `after`, then every new event as it is saved, each exactly once in seq
//! order (ephemeral notices included), until the chat closes (1000), moves
//! to another instance (1012), the instance shuts down (1001) or the reader
//! leaves the chat (4001: an agent who left sees nothing after their
//! leaving, see `Transcript::read_limit`; one who has left is refused, 403).

use super::error::EngineError;
use super::routes::AppState;
use super::LiveSession;
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
    let after = after_param(&q)?;
    let id = check_chat_id(&id)?;
    let session = s.instance.live(id).await?;
    let reader = reader_param(&q)?.map(str::to_owned);
    if let Some(p) = &reader {
        if session.read_limit(p).await?.is_some() {
            return Err(EngineError::Left {
                chat: id.to_owned(),
                participant: p.clone(),
            }
            .into());
        }
    }
    let stop = s.stop.clone();
    Ok(ws::chat_upgrade(ws).on_upgrade(move |socket| async move {
        let open = crate::telemetry::metrics::OpenSocket::new("instance");
        push_events(socket, session, after, reader, stop).await;
        drop((connection, open));
    }))
}

async fn push_events(
    mut socket: WebSocket,
    session: Arc<LiveSession>,
    after: u64,
    reader: Option<String>,
    stop: CancellationToken,
) {
    let (mut rx, closed) = session.subscribe().await;
    let mut seen = SeqFilter::after(after);
    match send_stored(&mut socket, &session, &mut seen, u64::MAX).await {
        Sent::All => {}
        Sent::Closed => return ws::close(socket, ws::CHAT_CLOSED, "chat closed").await,
        Sent::Gone => return,
    }
    if closed {
        return ws::close(socket, ws::CHAT_CLOSED, "chat closed").await;
    }
    loop {
        tokio::select! {
            biased;
            r = rx.recv() => match r {
                Ok(v) => {
                    if !seen.admit(v.seq, v.ephemeral) {
                        continue;
                    }
                    if send_event(&mut socket, &v).await.is_err() {
                        return;
                    }
                    if v.kind == EventKind::Closed {
                        return ws::close(socket, ws::CHAT_CLOSED, "chat closed").await;
                    }
                    if v.kind == EventKind::Left && v.participant_id.is_some() && v.participant_id == reader {
                        // The reader's own leaving (not a restoration's
                        // disconnect, after which they are back): what
                        // they may still see (the closing, if they ended
                        // the chat), then the end of their stream.
                        let limit = match &reader {
                            Some(p) => session.read_limit(p).await.ok().flatten(),
                            None => None,
                        };
                        if let Some(limit) = limit {
                            return match send_stored(&mut socket, &session, &mut seen, limit).await {
                                Sent::All => ws::close(socket, ws::LEFT, "you left this chat").await,
                                Sent::Closed => ws::close(socket, ws::CHAT_CLOSED, "chat closed").await,
                                Sent::Gone => {}
                            };
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => match send_stored(&mut socket, &session, &mut seen, u64::MAX).await {
                    Sent::All => {}
                    Sent::Closed => return ws::close(socket, ws::CHAT_CLOSED, "chat closed").await,
                    Sent::Gone => return,
                },
                Err(RecvError::Closed) => return ws::close(socket, ws::MOVED, "session moved").await,
            },
            _ = session.gone.cancelled() => return ws::close(socket, ws::MOVED, "session moved").await,
            _ = stop.cancelled() => return ws::close(socket, ws::GOING_AWAY, "instance shutting down").await,
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
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

enum Sent {
    /// Every stored event after the mark went out.
    All,
    /// The chat's closing went out.
    Closed,
    /// The reader is gone (or stopped reading).
    Gone,
}

/// Send the stored events after `seen` up to seq `limit`, a page at a time.
async fn send_stored(
    socket: &mut WebSocket,
    session: &LiveSession,
    seen: &mut SeqFilter,
    limit: u64,
) -> Sent {
    loop {
        let (page, more) = session
            .page(seen.last(), BACKLOG_PAGE, BACKLOG_PAGE_BYTES)
            .await;
        for v in page.iter().take_while(|v| v.seq <= limit) {
            seen.admit(v.seq, false);
            if send_event(socket, v).await.is_err() {
                return Sent::Gone;
            }
            if v.kind == EventKind::Closed {
                return Sent::Closed;
            }
        }
        if !more || seen.last() >= limit {
            return Sent::All;
        }
    }
}

async fn send_event(socket: &mut WebSocket, v: &EventView) -> Result<(), ()> {
    let text = serde_json::to_string(v).unwrap_or_default();
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}
