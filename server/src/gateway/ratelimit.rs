//! Rate limits keyed by who is asking, on every route: a participant (their
//! token, whatever connection or address it comes from) for chat actions,
//! else the client's address (chat creation, the agent's calls, pages,
//! unknown routes). The address is the peer's, or, when the peer is one of
//! `gateway.trusted-proxies`, the client address that proxy reports
//! (`X-Forwarded-For`, last entry not itself a trusted proxy, or
//! `Forwarded: for=`). Over the limit: 429 `rate_limited` with Retry-After.
//!
//! A token bucket per key: `rate-limit-per-second` refill, bursts of
//! `rate-limit-burst`.

use super::tokens::TokenKey;
use crate::config::IpNet;
use crate::error::ApiError;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whose budget a request spends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Who {
    Participant(String),
    Address(IpAddr),
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Clone)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<Who, Bucket>>>,
    trusted_proxies: Arc<[IpNet]>,
    tokens: TokenKey,
    agents: Arc<super::agents::Agents>,
}

impl RateLimiter {
    pub fn new(
        per_second: u32,
        burst: u32,
        trusted_proxies: Vec<IpNet>,
        tokens: TokenKey,
        agents: Arc<super::agents::Agents>,
    ) -> Self {
        RateLimiter {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
            buckets: Arc::new(Mutex::new(HashMap::new())),
            trusted_proxies: trusted_proxies.into(),
            tokens,
            agents,
        }
    }

    /// Take one token for `key`; Err(wait) when none is left.
    pub fn take(&self, key: Who) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget keys idle long enough to have a full bucket.
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

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }

    /// The client's address: the peer's, or what a trusted proxy reports.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        // X-Forwarded-For: client, proxy1, proxy2: the last entry that is
        // not one of ours is the client as far as we can trust the chain.
        let forwarded_for: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        if let Some(ip) = forwarded_for.iter().rev().find(|ip| !self.trusted(**ip)) {
            return *ip;
        }
        let forwarded = headers
            .get(header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split([';', ','])
                    .filter_map(|p| p.trim().strip_prefix("for="))
                    .filter_map(|a| {
                        a.trim_matches('"')
                            .trim_matches(['[', ']'])
                            .parse::<IpAddr>()
                            .ok()
                    })
                    .rfind(|ip| !self.trusted(*ip))
            });
        forwarded.unwrap_or(peer)
    }

    /// Whose budget this request spends; None: no limit (an agent signed
    /// in with a credential: a contact centre's agents often share one
    /// address, and they are staff; a revoked agent's credential counts
    /// against its address).
    fn who(&self, req: &Request) -> Option<Who> {
        let bearer = crate::auth::bearer(req.headers());
        if bearer.is_some_and(|given| self.agents.authenticate(given).is_ok()) {
            return None;
        }
        let token = bearer
            .or_else(|| super::tokens::from_ws_protocol(req.headers()))
            .map(str::to_owned)
            .or_else(|| {
                req.uri()
                    .query()?
                    .split('&')
                    .find_map(|p| p.strip_prefix("token=").map(str::to_owned))
            });
        if let Some(claims) = token.and_then(|t| self.tokens.verify(&t, super::tokens::now()).ok())
        {
            return Some(Who::Participant(claims.participant_id));
        }
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip();
        Some(Who::Address(self.client_address(peer, req.headers())))
    }
}

pub async fn limit(State(limiter): State<RateLimiter>, req: Request, next: Next) -> Response {
    if let Some(who) = limiter.who(&req) {
        if let Err(wait) = limiter.take(who) {
            let secs = wait.as_secs().max(1).to_string();
            let mut response = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; slow down",
            )
            .into_response();
            if let Ok(v) = secs.parse() {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return response;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(trusted: &[&str]) -> RateLimiter {
        RateLimiter::new(
            10,
            3,
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
            TokenKey::random(),
            Arc::new(super::super::agents::Agents::new(None, None).unwrap()),
        )
    }

    #[test]
    fn a_burst_passes_then_the_bucket_refuses_until_it_refills() {
        let l = limiter(&[]);
        let a = Who::Participant("a".into());
        for _ in 0..3 {
            assert!(l.take(a.clone()).is_ok());
        }
        assert!(l.take(a.clone()).is_err());
        assert!(
            l.take(Who::Participant("b".into())).is_ok(),
            "buckets are per key"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.take(a).is_ok());
    }

    #[test]
    fn only_a_trusted_proxy_can_name_the_client() {
        let l = limiter(&["10.0.0.0/8", "::1"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.1.2.3".parse().unwrap());
        let untrusted: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            l.client_address(untrusted, &h),
            untrusted,
            "a client cannot spoof it"
        );
        let proxy: IpAddr = "10.9.9.9".parse().unwrap();
        assert_eq!(
            l.client_address(proxy, &h),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        let mut f = HeaderMap::new();
        f.insert(
            header::FORWARDED,
            "for=\"[2001:db8::1]\";proto=https".parse().unwrap(),
        );
        assert_eq!(
            l.client_address("::1".parse().unwrap(), &f),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(l.client_address(proxy, &HeaderMap::new()), proxy);
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "192.168.0.0/16".parse().unwrap();
        assert!(n.contains("192.168.4.5".parse().unwrap()));
        assert!(!n.contains("192.169.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }
}
