//! Per-connection rate limit (token bucket keyed by the peer's address and
//! port, i.e. one TCP connection). Over the limit: 429 with Retry-After.

use crate::error::ApiError;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Clone)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<SocketAddr, Bucket>>>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        RateLimiter {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Take one token for `key`; Err(wait) when none is left.
    pub fn take(&self, key: SocketAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget connections idle long enough to have a full bucket.
            let full_after = Duration::from_secs_f64(self.burst / self.per_second);
            buckets.retain(|_, b| now.duration_since(b.last) < full_after);
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.last).as_secs_f64() * self.per_second).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        }
    }
}

pub async fn limit(State(limiter): State<RateLimiter>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Some(peer) = peer {
        if let Err(wait) = limiter.take(peer) {
            let secs = wait.as_secs().max(1).to_string();
            let mut response = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests on this connection; slow down",
            )
            .into_response();
            if let Ok(v) = secs.parse() {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
            return response;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_bucket_refuses_until_it_refills() {
        let l = RateLimiter::new(10, 3);
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        for _ in 0..3 {
            assert!(l.take(a).is_ok());
        }
        assert!(l.take(a).is_err());
        assert!(l.take(b).is_ok(), "buckets are per connection");
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.take(a).is_ok());
    }
}
