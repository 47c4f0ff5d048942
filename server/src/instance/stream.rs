//! A chat's WebSocket on the instance (`GET /internal/v1/sessions/{id}/ws`,
//! opened by the gateway for each participant's socket): the backlog after
//! `after`, then every new event as it is saved, each exactly once in seq
//! order (ephemeral notices included), until the chat closes (1000), moves
//! to another instance (1012) or the instance shuts down (1001).

use super::routes::AppState;
use super::LiveSession;
use crate::contract::{after_param, check_chat_id};
use crate::error::ApiError;
use crate::session::{EventKind, EventView};
use crate::ws::{self, SeqFilter};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

pub(super) async fn stream(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let after = after_param(&q)?;
    let session = s.instance.live(check_chat_id(&id)?).await?;
    let stop = s.stop.clone();
    Ok(ws
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| push_events(socket, session, after, stop)))
}

async fn push_events(
    mut socket: WebSocket,
    session: Arc<LiveSession>,
    after: u64,
    stop: CancellationToken,
) {
    let (backlog, mut rx, closed) = session.subscribe(after).await;
    let mut seen = SeqFilter::after(after);
    for v in backlog {
        seen.admit(v.seq, false);
        if send_event(&mut socket, &v).await.is_err() {
            return;
        }
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
                }
                Err(RecvError::Lagged(_)) => {
                    for v in session.events_after(seen.last()).await {
                        seen.admit(v.seq, false);
                        if send_event(&mut socket, &v).await.is_err() {
                            return;
                        }
                        if v.kind == EventKind::Closed {
                            return ws::close(socket, ws::CHAT_CLOSED, "chat closed").await;
                        }
                    }
                }
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

async fn send_event(socket: &mut WebSocket, v: &EventView) -> Result<(), axum::Error> {
    let text = serde_json::to_string(v).unwrap_or_default();
    socket.send(Message::Text(text.into())).await
}
