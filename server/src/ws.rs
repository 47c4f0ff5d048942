//! What both legs of a chat's WebSocket stream share (instance → gateway →
//! participant): the close codes, closing with one, and the rule that
//! forwards each stored event exactly once, in seq order, across
//! reconnections (ephemeral notices have no seq of their own and always
//! pass).

use axum::extract::ws::{CloseFrame, Message, WebSocket};

/// The chat closed: the stream is over.
pub const CHAT_CLOSED: u16 = 1000;
/// The server (instance or gateway) is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the rules (too many frames).
pub const POLICY: u16 = 1008;
/// No instance could serve the chat.
pub const UNAVAILABLE: u16 = 1011;
/// The chat moved to another instance: reconnect through the gateway.
pub const MOVED: u16 = 1012;
/// The client sent a frame over the size limit.
pub const TOO_BIG: u16 = 1009;
/// The reader left the chat: nothing after their leaving is theirs to see.
pub const LEFT: u16 = 4001;

/// Largest message a participant (or the gateway, upstream) may send on a
/// chat's WebSocket.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The read buffer of each chat WebSocket, both legs. tungstenite
/// allocates and zeroes a socket's whole read buffer when it opens (128 KiB
/// by default), which was most of what an idle socket cost; the peers of
/// these sockets send small frames (pings, pongs, closes), and the buffer
/// still grows for a larger one.
pub const READ_BUFFER: usize = 4 * 1024;

/// A chat WebSocket's server side, sized as above.
pub fn chat_upgrade(
    ws: axum::extract::ws::WebSocketUpgrade,
) -> axum::extract::ws::WebSocketUpgrade {
    ws.read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
}

/// A chat WebSocket's client side (the gateway's leg to an instance).
pub fn chat_client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
}

/// Whether a receive failed because the peer's frame or message was over
/// the limit (tungstenite's capacity error), which deserves close 1009
/// rather than a dropped connection.
pub fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
}

/// Send a close frame with `code` and `reason`; errors mean the peer is gone.
pub async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Forwards stored events after a seq exactly once.
#[derive(Debug, Clone, Copy)]
pub struct SeqFilter {
    last: u64,
}

impl SeqFilter {
    /// Only events after `after` pass.
    pub fn after(after: u64) -> Self {
        SeqFilter { last: after }
    }

    /// Whether an event passes; a stored one moves the mark.
    pub fn admit(&mut self, seq: u64, ephemeral: bool) -> bool {
        if ephemeral {
            return true;
        }
        if seq <= self.last {
            return false;
        }
        self.last = seq;
        true
    }

    /// The last stored seq that passed.
    pub fn last(&self) -> u64 {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stored_event_passes_once_and_notices_always() {
        let mut f = SeqFilter::after(2);
        assert!(!f.admit(1, false));
        assert!(!f.admit(2, false));
        assert!(f.admit(3, false));
        assert!(!f.admit(3, false));
        assert!(f.admit(3, true), "an ephemeral notice repeats the last seq");
        assert!(f.admit(4, false));
        assert_eq!(f.last(), 4);
    }
}
