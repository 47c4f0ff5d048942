//! The instance's registration in the session store: its id, the URL
//! others reach it at, whether it takes new chats, and a heartbeat each
//! second. Gateways with `gateway.discover` read the registry to find every
//! instance without a list of URLs, notice a new one within a heartbeat or
//! two, and give no new chats to one whose heartbeat stops.

use super::Instance;
use crate::store::{InstanceRegistry, Registration};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often an instance writes its registration.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The URL to register: the configured one, else the bound address when
/// others can reach it (not 0.0.0.0 or ::).
pub fn advertised_url(configured: Option<&str>, bound: SocketAddr, scheme: &str) -> Option<String> {
    match configured {
        Some(url) => Some(url.to_owned()),
        None if bound.ip().is_unspecified() => None,
        None => Some(format!("{scheme}://{bound}")),
    }
}

/// Write the registration every [`HEARTBEAT`] until `stop`. A failed write
/// is logged at debug level only: the store's availability probe raises
/// the alarm (59520) for an unreachable store.
pub fn spawn_heartbeat(
    instance: Arc<Instance>,
    registry: Arc<dyn InstanceRegistry>,
    url: String,
    stop: CancellationToken,
) {
    tracing::info!(instance = %instance.id, url, "registering in the session store for gateways to discover");
    crate::process::every(HEARTBEAT, stop, move || {
        let (instance, registry) = (instance.clone(), registry.clone());
        let registration = Registration {
            instance_id: instance.id.clone(),
            url: url.clone(),
            enabled: instance.is_enabled(),
            heartbeat_ms: crate::session::now_ms(),
        };
        async move {
            if let Err(e) = registry.register(&registration).await {
                tracing::debug!(error = %e, "heartbeat not written");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_url_is_the_configured_one_or_a_reachable_bound_address() {
        let bound: SocketAddr = "10.1.2.3:7001".parse().unwrap();
        assert_eq!(
            advertised_url(None, bound, "https").as_deref(),
            Some("https://10.1.2.3:7001")
        );
        assert_eq!(
            advertised_url(Some("http://chat-1.internal:7001"), bound, "http").as_deref(),
            Some("http://chat-1.internal:7001")
        );
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        assert_eq!(advertised_url(None, any, "http"), None);
        let v6: SocketAddr = "[::]:7001".parse().unwrap();
        assert_eq!(advertised_url(None, v6, "http"), None);
    }
}
