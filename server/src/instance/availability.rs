//! Session-store availability: one status per instance, fed by real
//! requests and a periodic probe with a timeout (so that a frozen store,
//! whose connections stay open but never answer, is caught like a dead one).
//! Each transition is logged once (59520 / 59521 for Cassandra, as the
//! reference does) and exported as `confab_store_available{store}`.

use crate::store::{SessionStore, StoreError};
use crate::telemetry::{events, metrics as m};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct StoreMonitor {
    backend: &'static str,
    available: AtomicBool,
    /// When the status last changed (Unix ms; 0: never since start).
    changed_at_ms: std::sync::atomic::AtomicU64,
}

impl StoreMonitor {
    pub fn new(backend: &'static str) -> Arc<Self> {
        metrics::gauge!(m::STORE_AVAILABLE, "store" => backend).set(1.0);
        for status in ["available", "unavailable"] {
            metrics::counter!(m::STORE_STATUS_TRANSITIONS, "store" => backend, "status" => status)
                .absolute(0);
        }
        Arc::new(StoreMonitor {
            backend,
            available: AtomicBool::new(true),
            changed_at_ms: Default::default(),
        })
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::SeqCst)
    }

    /// When the status last changed (the last 59520 / 59521), if it has.
    pub fn changed_at_ms(&self) -> Option<u64> {
        Some(self.changed_at_ms.load(Ordering::SeqCst)).filter(|&ms| ms > 0)
    }

    pub fn report_success(&self) {
        self.set(true, None);
    }

    pub fn report_failure(&self, error: &StoreError) {
        self.set(false, Some(error));
    }

    fn set(&self, available: bool, error: Option<&StoreError>) {
        if self.available.swap(available, Ordering::SeqCst) == available {
            return;
        }
        self.changed_at_ms
            .store(crate::session::now_ms() as u64, Ordering::SeqCst);
        let status = if available {
            "AVAILABLE"
        } else {
            "UNAVAILABLE"
        };
        metrics::gauge!(m::STORE_AVAILABLE, "store" => self.backend).set(if available {
            1.0
        } else {
            0.0
        });
        metrics::counter!(m::STORE_STATUS_TRANSITIONS, "store" => self.backend, "status" => status.to_ascii_lowercase())
            .increment(1);
        let error = error.map(|e| e.to_string()).unwrap_or_default();
        if self.backend == "cassandra" {
            let event_id = if available {
                events::CASSANDRA_AVAILABLE
            } else {
                events::CASSANDRA_UNAVAILABLE
            };
            if available {
                tracing::info!(
                    event_id,
                    store = self.backend,
                    "Cassandra status changed to \"{status}\""
                );
            } else {
                tracing::error!(event_id, store = self.backend, error = %error, "Cassandra status changed to \"{status}\"");
            }
        } else if available {
            tracing::info!(
                event_id = events::STORE_STATUS_CHANGED,
                store = self.backend,
                "Session store status changed to \"{status}\""
            );
        } else {
            tracing::error!(event_id = events::STORE_STATUS_CHANGED, store = self.backend, error = %error, "Session store status changed to \"{status}\"");
        }
    }

    /// Probe the store every `interval`; a probe that takes longer than
    /// `timeout` counts as a failure.
    pub fn spawn_probe(
        self: &Arc<Self>,
        store: Arc<dyn SessionStore>,
        interval: Duration,
        timeout: Duration,
        stop: CancellationToken,
    ) {
        let monitor = self.clone();
        crate::process::every(interval, stop, move || {
            let (monitor, store) = (monitor.clone(), store.clone());
            async move {
                match tokio::time::timeout(timeout, store.ping()).await {
                    Ok(Ok(())) => monitor.report_success(),
                    Ok(Err(e)) => monitor.report_failure(&e),
                    Err(_) => monitor.report_failure(&StoreError::Unavailable(format!(
                        "no answer within {} ms",
                        timeout.as_millis()
                    ))),
                }
            }
        });
    }
}
