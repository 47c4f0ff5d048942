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
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
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

/// WebSocket close codes: 1000 chat closed, 1001 instance shutting down,
/// 1012 session moved (reconnect through the gateway).
async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

async fn push_events(
    mut socket: WebSocket,
    session: Arc<LiveSession>,
    after: u64,
    stop: CancellationToken,
) {
    let (backlog, mut rx, closed) = session.subscribe(after).await;
    let mut last = after;
    for v in backlog {
        last = v.seq;
        if send_event(&mut socket, &v).await.is_err() {
            return;
        }
    }
    if closed {
        return close(socket, 1000, "chat closed").await;
    }
    loop {
        tokio::select! {
            biased;
            r = rx.recv() => match r {
                Ok(v) => {
                    if !v.ephemeral {
                        if v.seq <= last {
                            continue;
                        }
                        last = v.seq;
                    }
                    if send_event(&mut socket, &v).await.is_err() {
                        return;
                    }
                    if v.kind == EventKind::Closed {
                        return close(socket, 1000, "chat closed").await;
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    for v in session.events_after(last).await {
                        last = v.seq;
                        if send_event(&mut socket, &v).await.is_err() {
                            return;
                        }
                        if v.kind == EventKind::Closed {
                            return close(socket, 1000, "chat closed").await;
                        }
                    }
                }
                Err(RecvError::Closed) => return close(socket, 1012, "session moved").await,
            },
            _ = session.gone.cancelled() => return close(socket, 1012, "session moved").await,
            _ = stop.cancelled() => return close(socket, 1001, "instance shutting down").await,
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
