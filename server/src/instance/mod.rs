//! `confab server`: one chat server instance.

pub mod availability;
mod closing;
mod engine;
pub mod error;
mod live;
mod messages;
pub mod registration;
mod restoration;
pub mod routes;
pub mod stats;
mod stream;
pub mod wall;

use crate::config::{Config, StoreBackend};
use crate::listener::Listener;
use crate::store::cassandra::contacts::CassandraContactStore;
use crate::store::cassandra::registry::CassandraRegistry;
use crate::store::sqlite::{SqliteContactStore, SqliteOptions, SqliteRegistry, SqliteStore};
use crate::store::{ContactStore, InstanceRegistry, SessionStore};
use crate::telemetry::{events, metrics as m};
use anyhow::Context;
use availability::StoreMonitor;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use engine::Instance;
pub use error::EngineError;
pub use live::LiveSession;

/// How long shutdown waits for in-flight requests (and their saves).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A built instance: bound to its port, ready to serve.
pub struct Application {
    listener: Listener,
    router: axum::Router,
    instance: Arc<Instance>,
    stop: CancellationToken,
    channels: tokio_util::task::TaskTracker,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let server = &config.server;
        // Before the stores, which register their own metrics.
        let handle = m::install();
        m::describe();
        let sqlite = SqliteOptions::of(server);
        // One Cassandra session for both stores, when either is there.
        let cassandra = if server.store == StoreBackend::Cassandra
            || server.contact_store == StoreBackend::Cassandra
        {
            Some(crate::store::cassandra::open_session(&config.cassandra).await?)
        } else {
            None
        };
        let init_hint = || {
            format!(
                "preparing statements in keyspace {} (run `confab cassandra init`?)",
                config.cassandra.keyspace
            )
        };
        let store: Arc<dyn SessionStore> = match (server.store, &cassandra) {
            (StoreBackend::Cassandra, Some(session)) => Arc::new(
                crate::store::cassandra::CassandraStore::new(session.clone(), &config.cassandra)
                    .await
                    .with_context(init_hint)?,
            ),
            _ => Arc::new(
                SqliteStore::open(&server.sqlite_path, &server.instance_id, sqlite).with_context(
                    || {
                        format!(
                            "opening the SQLite session store {}",
                            server.sqlite_path.display()
                        )
                    },
                )?,
            ),
        };
        let registry: Arc<dyn InstanceRegistry> = match (server.store, &cassandra) {
            (StoreBackend::Cassandra, Some(session)) => Arc::new(
                CassandraRegistry::new(session.clone(), &config.cassandra)
                    .await
                    .with_context(init_hint)?,
            ),
            _ => Arc::new(
                SqliteRegistry::open(&server.sqlite_path, sqlite).with_context(|| {
                    format!("opening the registry in {}", server.sqlite_path.display())
                })?,
            ),
        };
        let contacts: Arc<dyn ContactStore> = match (server.contact_store, &cassandra) {
            (StoreBackend::Cassandra, Some(session)) => Arc::new(
                CassandraContactStore::new(session.clone(), &config.cassandra)
                    .await
                    .with_context(init_hint)?,
            ),
            _ => {
                let path = server
                    .contact_store_path
                    .clone()
                    .unwrap_or_else(|| server.sqlite_path.clone());
                Arc::new(
                    SqliteContactStore::open(&path, sqlite)
                        .with_context(|| format!("opening the contact store {}", path.display()))?,
                )
            }
        };
        let stop = CancellationToken::new();
        let monitor = StoreMonitor::new(store.backend());
        monitor.spawn_probe(
            store.clone(),
            Duration::from_secs(1),
            Duration::from_secs(2),
            stop.clone(),
        );
        let instance = Instance::new(
            server.instance_id.clone(),
            config.settings.clone(),
            engine::TranscriptLimits {
                max_events: server.max_transcript_events,
                max_text_bytes: server.max_transcript_bytes,
            },
            store,
            contacts,
            monitor,
        );
        instance.spawn_ownership_sweep(Duration::from_secs(5), 2000, stop.clone());
        let timeout = server.waiting_timeout;
        if !timeout.is_zero() {
            let expiring = instance.clone();
            let every = (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
            crate::process::every(every, stop.clone(), move || {
                let instance = expiring.clone();
                async move { instance.expire_waiting(timeout).await }
            });
        }
        let listener = Listener::bind("instance", server.listen, &config.http)
            .await?
            .uncapped();
        match registration::advertised_url(
            server.advertise_url.as_deref(),
            listener.local_addr()?,
            config.http.scheme(),
        ) {
            Some(url) => {
                registration::spawn_heartbeat(instance.clone(), registry, url, stop.clone())
            }
            None => tracing::warn!(
                listen = %server.listen,
                "not registered for discovery: set server.advertise-url to the URL gateways reach this instance at"
            ),
        }
        let channels = tokio_util::task::TaskTracker::new();
        let router = routes::router(routes::AppState {
            instance: instance.clone(),
            metrics: handle,
            admin_token: server.admin_token.clone(),
            admin_kill_enabled: server.admin_kill_enabled,
            stop: stop.clone(),
            channels: channels.clone(),
            wall: wall::Wall::new(crate::contract::ClusterSecret::new(
                config.cluster_secret()?,
            )),
        });
        Ok(Application {
            listener,
            router,
            instance,
            stop,
            channels,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve until `shutdown` resolves; then stop accepting, end WebSocket
    /// streams, let in-flight requests finish their saves (bounded), exit.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            instance,
            stop,
            channels,
        } = self;
        tracing::info!(
            event_id = events::INSTANCE_STARTED,
            instance = %instance.id,
            addr = %listener.local_addr()?,
            version = crate::VERSION,
            "instance started"
        );
        let signalled = stop.clone();
        let id = instance.id.clone();
        let serve = listener.serve(router, async move {
            shutdown.await;
            tracing::info!(event_id = events::INSTANCE_STOPPING, instance = %id, "instance stopping: finishing in-flight requests");
            signalled.cancel();
        });
        let stopped = stop.clone();
        // HTTP requests and the gateways' channels finish what they read.
        let serve = async move {
            serve.await?;
            channels.close();
            channels.wait().await;
            anyhow::Ok(())
        };
        tokio::select! {
            r = serve => r?,
            _ = async { stopped.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                tracing::warn!("shutdown grace period over; exiting with requests in flight");
            }
        }
        instance.release_all();
        Ok(())
    }
}
