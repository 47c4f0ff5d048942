//! The gateway's WebSocket relay: a participant's stream continues across
//! instance failures. The relay follows the chat's instance stream from the
//! last seq it forwarded; when that stream ends for any reason but the
//! chat's closing (the instance died, was frozen, shut down, or lost the
//! chat), it relocates the chat (restoring it elsewhere if needed) and
//! reconnects after the same seq: no gap, no duplicate, and the restoration
//! notices arrive as ordinary events.

use super::pool::{Member, Route};
use super::tokens::Claims;
use super::Gateway;
use crate::channel::WatchFrame;
use crate::ws::{self, SeqFilter};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::http::StatusCode;
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

/// How one instance stream of the relay ended.
enum Outcome {
    /// The chat closed: the stream is over.
    Closed,
    /// The participant left the chat: nothing after it is theirs.
    Left,
    /// The participant went away.
    ClientGone,
    /// The instance stream ended otherwise: fail over.
    Lost,
    /// The instance refused the watch (the chat is not there, say): fail
    /// over as from a connection that could not be made.
    Refused,
    /// The instance takes no watches (an earlier version): open a
    /// WebSocket to it instead.
    NoWatches,
}

/// The chat's stream from its instance: a watch over the gateway's channel
/// to it (no descriptor of its own), or a WebSocket for instances without
/// watches (an earlier version, or `gateway.instance-channel = false`).
enum Source {
    Watch(crate::channel::Watch),
    Socket(
        Box<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
        >,
    ),
}

/// What a source yields.
enum Frame {
    Event(axum::extract::ws::Utf8Bytes),
    /// The stream ended with this close code.
    End(u16),
    Refused(axum::http::StatusCode),
    Lost,
}

/// Why a source could not be opened.
enum Refusal {
    /// The instance refused a reader who left the chat (403).
    Left,
    Failed,
}

impl Source {
    async fn open(gw: &Gateway, member: &Member, path: &str) -> Result<Source, Refusal> {
        if member.takes_watches() {
            match member.route().await {
                Ok(Route::Channel(channel)) => {
                    return channel
                        .watch(path)
                        .map(Source::Watch)
                        .map_err(|_| Refusal::Failed)
                }
                Ok(Route::Http) => {}
                Err(_) => return Err(Refusal::Failed),
            }
        }
        let url = crate::tls::websocket_url(&member.url, path);
        let request = gw
            .secret
            .websocket_request(&url)
            .map_err(|_| Refusal::Failed)?;
        match crate::tls::websocket(request, Some(ws::chat_client_config())).await {
            Ok((socket, _)) => Ok(Source::Socket(Box::new(socket))),
            Err(tungstenite::Error::Http(r)) if r.status() == StatusCode::FORBIDDEN => {
                Err(Refusal::Left)
            }
            Err(_) => Err(Refusal::Failed),
        }
    }

    async fn next(&mut self) -> Frame {
        match self {
            Source::Watch(watch) => match watch.frames.recv().await {
                Some(WatchFrame::Event(json)) => {
                    Utf8Bytes::try_from(json).map_or(Frame::Lost, Frame::Event)
                }
                Some(WatchFrame::End(code)) => Frame::End(code),
                Some(WatchFrame::Refused(status, _)) => Frame::Refused(status),
                None => Frame::Lost,
            },
            Source::Socket(socket) => loop {
                match socket.next().await {
                    Some(Ok(tungstenite::Message::Text(text))) => {
                        return Utf8Bytes::try_from(bytes::Bytes::from(text))
                            .map_or(Frame::Lost, Frame::Event)
                    }
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        return Frame::End(frame.map_or(1005, |f| u16::from(f.code)))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Frame::Lost,
                }
            },
        }
    }

    /// End the stream (dropping a watch ends it on the instance).
    async fn close(self) {
        if let Source::Socket(mut socket) = self {
            let _ = SinkExt::close(&mut socket).await;
        }
    }
}

const GAVE_UP: &str = "no instance could serve the chat";

/// After an attempt to serve the chat that failed: false once
/// [`MAX_FAILOVERS`] failed in a row, else true after a pause that grows
/// with them.
async fn pause_before_retry(failures: &mut u32) -> bool {
    *failures += 1;
    if *failures > MAX_FAILOVERS {
        return false;
    }
    tokio::time::sleep(Duration::from_millis(50 * u64::from(*failures))).await;
    true
}

pub async fn relay(gw: Arc<Gateway>, mut client: WebSocket, chat: String, who: Claims, after: u64) {
    let mut seen = SeqFilter::after(after);
    let mut failures = 0u32;
    let mut failed: Option<Arc<Member>> = None;
    let mut frames = (tokio::time::Instant::now(), 0u32);
    // Pings keep proxies from timing the socket out, and find clients that
    // vanished without a close (a half-open TCP connection is never read).
    let mut ping = tokio::time::interval(gw.ws_ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut heard;
    loop {
        // The futures of finding the chat and opening its stream are
        // large (HTTP and TLS clients) and short-lived: boxed, they are not
        // part of the relay's own future, which every open socket keeps.
        let member = match failed.take() {
            None => Box::pin(gw.locate(&chat)).await,
            Some(f) => Box::pin(gw.relocate(&chat, &f)).await,
        };
        let member = match member {
            Ok(m) => m,
            Err(e) => {
                let code = if e.status == StatusCode::CONFLICT {
                    ws::CHAT_CLOSED
                } else {
                    ws::UNAVAILABLE
                };
                return ws::close(client, code, "chat unavailable").await;
            }
        };
        let path = crate::contract::internal::stream(&chat, seen.last(), &who.participant_id);
        let down = member.down_token();
        let opened = tokio::select! {
            r = Box::pin(Source::open(&gw, &member, &path)) => r,
            _ = down.cancelled() => Err(Refusal::Failed),
        };
        let mut source = match opened {
            Ok(source) => source,
            // A reader who left: final, not a fault to fail over from.
            Err(Refusal::Left) => return ws::close(client, ws::LEFT, "you left this chat").await,
            Err(Refusal::Failed) => {
                gw.forget(&chat);
                if !pause_before_retry(&mut failures).await {
                    return ws::close(client, ws::UNAVAILABLE, GAVE_UP).await;
                }
                failed = Some(member);
                continue;
            }
        };
        // A socket that opened is working; a watch is once it sends an
        // event (a refusal comes before any).
        let watched = matches!(source, Source::Watch(_));
        if !watched {
            failures = 0;
        }
        let mut delivered = false;
        let opened_at = tokio::time::Instant::now();
        // A slow failover sent no pings: the silence was ours, not theirs.
        heard = tokio::time::Instant::now();
        ping.reset();
        let outcome = loop {
            tokio::select! {
                biased;
                frame = source.next() => match frame {
                    Frame::Event(text) => {
                        failures = 0;
                        delivered = true;
                        if let Ok(event) = serde_json::from_str::<Peek>(&text) {
                            if !seen.admit(event.seq, event.ephemeral) {
                                continue;
                            }
                        }
                        // A participant who stops reading is dropped, not
                        // buffered for.
                        let send = client.send(Message::Text(text));
                        if !matches!(tokio::time::timeout(SEND_TIMEOUT, send).await, Ok(Ok(()))) {
                            break Outcome::ClientGone;
                        }
                    }
                    Frame::End(code) => break match code {
                        ws::CHAT_CLOSED => Outcome::Closed,
                        ws::LEFT => Outcome::Left,
                        _ => Outcome::Lost,
                    },
                    Frame::Refused(StatusCode::FORBIDDEN) => break Outcome::Left,
                    Frame::Refused(StatusCode::METHOD_NOT_ALLOWED) => break Outcome::NoWatches,
                    Frame::Refused(_) => break Outcome::Refused,
                    Frame::Lost => break Outcome::Lost,
                },
                _ = down.cancelled() => break Outcome::Lost,
                _ = gw.stop.cancelled() => {
                    source.close().await;
                    return ws::close(client, ws::GOING_AWAY, "gateway shutting down").await;
                }
                _ = ping.tick() => {
                    if heard.elapsed() > gw.ws_ping_interval * 2 {
                        source.close().await;
                        return ws::close(client, ws::GOING_AWAY, "no answer to pings").await;
                    }
                    // A revoked agent's open socket ends too, not only
                    // their next request.
                    if !super::api::still_allowed(&gw, &who) {
                        source.close().await;
                        return ws::close(client, ws::POLICY, "access revoked").await;
                    }
                    let send = client.send(Message::Ping(Default::default()));
                    if !matches!(tokio::time::timeout(SEND_TIMEOUT, send).await, Ok(Ok(()))) {
                        break Outcome::ClientGone;
                    }
                }
                incoming = client.recv() => match incoming {
                    Some(Err(e)) if ws::is_too_big(&e) => {
                        source.close().await;
                        return ws::close(client, ws::TOO_BIG, "frame too big (64 KiB at most)").await;
                    }
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Outcome::ClientGone,
                    Some(Ok(_)) => {
                        let now = tokio::time::Instant::now();
                        heard = now;
                        if now.duration_since(frames.0) > Duration::from_secs(1) {
                            frames = (now, 0);
                        }
                        frames.1 += 1;
                        if frames.1 > CLIENT_FRAMES_PER_SECOND {
                            source.close().await;
                            return ws::close(client, ws::POLICY, "too many frames").await;
                        }
                    }
                },
            }
        };
        source.close().await;
        match outcome {
            Outcome::Closed => return ws::close(client, ws::CHAT_CLOSED, "chat closed").await,
            Outcome::Left => return ws::close(client, ws::LEFT, "you left this chat").await,
            Outcome::ClientGone => return,
            Outcome::NoWatches => {
                member.refuses_watches();
                failed = None;
            }
            Outcome::Refused => {
                gw.forget(&chat);
                if !pause_before_retry(&mut failures).await {
                    return ws::close(client, ws::UNAVAILABLE, GAVE_UP).await;
                }
                failed = Some(member);
            }
            Outcome::Lost => {
                // A watch that ended at once, before any event, has not
                // served the chat: a failed attempt, with a pause and a cap
                // (not a loop of relocations).
                let stillborn =
                    watched && !delivered && opened_at.elapsed() < Duration::from_secs(1);
                if stillborn && !pause_before_retry(&mut failures).await {
                    return ws::close(client, ws::UNAVAILABLE, GAVE_UP).await;
                }
                tracing::info!(chat_id = %chat, participant = %who.participant_id, instance = ?member.id(), last_seq = seen.last(), "instance stream lost; reconnecting participant");
                gw.forget(&chat);
                failed = Some(member);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open participant socket keeps one relay future: it must not
    /// hold the large futures of finding a chat or opening its stream
    /// (unboxed, they made it 25 KB).
    #[test]
    fn a_relay_keeps_a_small_future() {
        let size = output_size(relay);
        assert!(size <= 4096, "the relay future is {size} bytes");
    }
}
