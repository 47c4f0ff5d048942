//! The gateway's WebSocket relay: a participant's stream continues across
//! instance failures. The relay follows the chat's instance stream from the
//! last seq it forwarded; when that stream ends for any reason but the
//! chat's closing (the instance died, was frozen, shut down, or lost the
//! chat), it relocates the chat (restoring it elsewhere if needed) and
//! reconnects after the same seq: no gap, no duplicate, and the restoration
//! notices arrive as ordinary events.

use super::tokens::Claims;
use super::Gateway;
use crate::ws::{self, SeqFilter};
use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite;

/// Relocations in a row without a working upstream before giving up.
const MAX_FAILOVERS: u32 = 10;
/// How long a participant's socket may take a frame before it is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames a client may send per second (they carry nothing we need).
const CLIENT_FRAMES_PER_SECOND: u32 = 20;

/// What the relay reads of an instance's event (crate::session::EventView)
/// to forward it exactly once.
#[derive(serde::Deserialize)]
struct Peek {
    seq: u64,
    #[serde(default)]
    ephemeral: bool,
}

enum Upstream {
    /// The chat closed: the stream is over.
    Closed,
    /// The participant left the chat: nothing after it is theirs.
    Left,
    /// The participant went away.
    ClientGone,
    /// The instance stream ended otherwise: fail over.
    Lost,
}

pub async fn relay(gw: Arc<Gateway>, mut client: WebSocket, chat: String, who: Claims, after: u64) {
    let mut seen = SeqFilter::after(after);
    let mut failures = 0;
    let mut failed: Option<Arc<super::pool::Member>> = None;
    let mut frames = (tokio::time::Instant::now(), 0u32);
    // Pings keep proxies from timing the socket out, and find clients that
    // vanished without a close (a half-open TCP connection is never read).
    let mut ping = tokio::time::interval(gw.ws_ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut heard;
    loop {
        let member = match failed.take() {
            None => gw.locate(&chat).await,
            Some(f) => gw.relocate(&chat, &f).await,
        };
        let member = match member {
            Ok(m) => m,
            Err(e) => {
                let code = if e.status == axum::http::StatusCode::CONFLICT {
                    ws::CHAT_CLOSED
                } else {
                    ws::UNAVAILABLE
                };
                return ws::close(client, code, "chat unavailable").await;
            }
        };
        let url = crate::tls::websocket_url(
            &member.url,
            &crate::contract::internal::stream(&chat, seen.last(), &who.participant_id),
        );
        let down = member.down_token();
        let connected = tokio::select! {
            r = async {
                let request = gw.secret.websocket_request(&url).ok()?;
                Some(crate::tls::websocket(request, Some(ws::chat_client_config())).await)
            } => r,
            _ = down.cancelled() => None,
        };
        // The instance refuses a reader who left (403): final, not a fault
        // to fail over from.
        if let Some(Err(tungstenite::Error::Http(refused))) = &connected {
            if refused.status() == axum::http::StatusCode::FORBIDDEN {
                return ws::close(client, ws::LEFT, "you left this chat").await;
            }
        }
        let Some(Ok((upstream, _))) = connected else {
            failures += 1;
            if failures > MAX_FAILOVERS {
                return ws::close(client, ws::UNAVAILABLE, "no instance could serve the chat")
                    .await;
            }
            gw.forget(&chat);
            failed = Some(member);
            tokio::time::sleep(Duration::from_millis(50 * failures as u64)).await;
            continue;
        };
        failures = 0;
        // A slow failover sent no pings: the silence was ours, not theirs.
        heard = tokio::time::Instant::now();
        ping.reset();
        let (mut up_tx, mut up_rx) = upstream.split();
        let outcome = loop {
            tokio::select! {
                biased;
                msg = up_rx.next() => match msg {
                    Some(Ok(tungstenite::Message::Text(text))) => {
                        if let Ok(event) = serde_json::from_str::<Peek>(&text) {
                            if !seen.admit(event.seq, event.ephemeral) {
                                continue;
                            }
                        }
                        // A participant who stops reading is dropped, not
                        // buffered for.
                        let send = client.send(Message::Text(text.as_str().into()));
                        if !matches!(tokio::time::timeout(SEND_TIMEOUT, send).await, Ok(Ok(()))) {
                            break Upstream::ClientGone;
                        }
                    }
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                        break match code {
                            ws::CHAT_CLOSED => Upstream::Closed,
                            ws::LEFT => Upstream::Left,
                            _ => Upstream::Lost,
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break Upstream::Lost,
                },
                _ = down.cancelled() => break Upstream::Lost,
                _ = gw.stop.cancelled() => {
                    let _ = up_tx.close().await;
                    return ws::close(client, ws::GOING_AWAY, "gateway shutting down").await;
                }
                _ = ping.tick() => {
                    if heard.elapsed() > gw.ws_ping_interval * 2 {
                        let _ = up_tx.close().await;
                        return ws::close(client, ws::GOING_AWAY, "no answer to pings").await;
                    }
                    // A revoked agent's open socket ends too, not only
                    // their next request.
                    if !super::api::still_allowed(&gw, &who) {
                        let _ = up_tx.close().await;
                        return ws::close(client, ws::POLICY, "access revoked").await;
                    }
                    let send = client.send(Message::Ping(Default::default()));
                    if !matches!(tokio::time::timeout(SEND_TIMEOUT, send).await, Ok(Ok(()))) {
                        break Upstream::ClientGone;
                    }
                }
                incoming = client.recv() => match incoming {
                    Some(Err(e)) if ws::is_too_big(&e) => {
                        let _ = up_tx.close().await;
                        return ws::close(client, ws::TOO_BIG, "frame too big (64 KiB at most)").await;
                    }
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Upstream::ClientGone,
                    Some(Ok(_)) => {
                        let now = tokio::time::Instant::now();
                        heard = now;
                        if now.duration_since(frames.0) > Duration::from_secs(1) {
                            frames = (now, 0);
                        }
                        frames.1 += 1;
                        if frames.1 > CLIENT_FRAMES_PER_SECOND {
                            let _ = up_tx.close().await;
                            return ws::close(client, ws::POLICY, "too many frames").await;
                        }
                    }
                },
            }
        };
        let _ = up_tx.close().await;
        match outcome {
            Upstream::Closed => return ws::close(client, ws::CHAT_CLOSED, "chat closed").await,
            Upstream::Left => return ws::close(client, ws::LEFT, "you left this chat").await,
            Upstream::ClientGone => return,
            Upstream::Lost => {
                tracing::info!(chat_id = %chat, participant = %who.participant_id, instance = ?member.id(), last_seq = seen.last(), "instance stream lost; reconnecting participant");
                gw.forget(&chat);
                failed = Some(member);
            }
        }
    }
}
