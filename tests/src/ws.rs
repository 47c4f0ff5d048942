//! A WebSocket client that collects pushed events.

use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Events received on one WebSocket, read by a background task.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Option<Value>>,
    /// The close code, once the server closed the stream.
    pub closed_with: Option<u16>,
}

impl EventStream {
    /// Connect to a chat's stream (an instance's or the gateway's), with
    /// the harness's cluster secret.
    pub async fn connect(url: &str) -> Result<EventStream, String> {
        Self::connect_with(url, None).await
    }

    /// [`EventStream::connect`] over `wss://` with `tls` (one that trusts
    /// a test CA).
    pub async fn connect_with(
        url: &str,
        tls: Option<tokio_tungstenite::Connector>,
    ) -> Result<EventStream, String> {
        let request = confab::contract::ClusterSecret::new(crate::CLUSTER_SECRET)
            .websocket_request(url)
            .map_err(|e| e.to_string())?;
        let (socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, tls)
                .await
                .map_err(|e| e.to_string())?;
        let (_, mut read) = socket.split();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(msg) = read.next().await {
                match msg {
                    Ok(Message::Text(t)) => {
                        if let Ok(v) = serde_json::from_str(&t) {
                            let _ = tx.send(Some(v));
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                        let _ = tx.send(Some(serde_json::json!({"__close": code})));
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(None);
        });
        Ok(EventStream {
            rx,
            closed_with: None,
        })
    }

    /// The next event, or None when the stream ended or `timeout` passed.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(timeout, self.rx.recv()).await {
                Ok(Some(Some(v))) => {
                    if let Some(code) = v.get("__close").and_then(Value::as_u64) {
                        self.closed_with = Some(code as u16);
                        continue;
                    }
                    return Some(v);
                }
                _ => return None,
            }
        }
    }

    /// Read until an event matches `pred` (returning it), or time out.
    pub async fn until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.next(left).await?;
            if pred(&v) {
                return Some(v);
            }
        }
    }
}
