//! `confab dashboard`: the operator dashboard's server. The pages and their
//! server functions are the `confab-dashboard` crate's (Leptos, rendered
//! here and hydrated in the browser); this module gives them the cluster
//! ([`cluster::Cluster`], polled once a second), the sign-in in front of
//! everything, and the browser half embedded in the binary under `/pkg/`.
//!
//! | route | who |
//! | --- | --- |
//! | `GET /healthz`, `GET /status` | anyone (liveness; `confab up` reads the pid) |
//! | `GET /signin`, `POST /signin`, `GET /pkg/…` | anyone |
//! | `GET /`, `GET /live` (server-sent events), `POST /api/…`, `POST /signout` | signed-in operators |

pub mod cluster;
mod restoration;
mod rolling;
mod signin;

use crate::config::Config;
use crate::error::ApiError;
use crate::listener::Listener;
use anyhow::Context;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cluster::Cluster;
use confab_dashboard::model::{ClusterView, SessionsView, TranscriptLine};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the Leptos side calls (`confab_dashboard::ssr::Backend`).
struct Backend(Arc<Cluster>);

#[async_trait::async_trait]
impl confab_dashboard::ssr::Backend for Backend {
    fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.0.watch()
    }

    async fn set_enabled(&self, instance: &str, enabled: bool) -> Result<(), String> {
        self.0.set_enabled(instance, enabled).await
    }

    async fn run_restoration_test(&self, chats: u32) -> Result<u64, String> {
        restoration::start(&self.0, chats)
    }

    async fn rolling_restart(&self, drain_limit_s: u32) -> Result<(), String> {
        rolling::start(&self.0, drain_limit_s)
    }

    async fn sessions(&self, instance: &str, after: &str) -> Result<SessionsView, String> {
        self.0.sessions(instance, after).await
    }

    async fn transcript(&self, instance: &str, chat: &str) -> Result<Vec<TranscriptLine>, String> {
        self.0.transcript(instance, chat).await
    }
}

pub fn router(cluster: Arc<Cluster>, gate: signin::Gate) -> Router {
    let signed_in = confab_dashboard::ssr::router(Arc::new(Backend(cluster)))
        .route("/signout", post(signin::sign_out).with_state(gate.clone()))
        .layer(axum::middleware::from_fn_with_state(
            gate.clone(),
            signin::require,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status))
        .route("/signin", get(signin::page).post(signin::sign_in))
        .route("/pkg/{*file}", get(asset))
        .with_state(gate.clone())
        .merge(signed_in)
        .fallback(|| async { ApiError::not_found("no such page") })
        .layer(axum::middleware::from_fn(security_headers))
}

async fn status() -> Json<serde_json::Value> {
    Json(json!({
        "component": "dashboard",
        "version": crate::VERSION,
        "pid": std::process::id(),
    }))
}

/// A file of the browser half, gzipped when the browser takes it.
async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(asset) = confab_dashboard_assets::find(&file) else {
        return ApiError::not_found(format!("no file {file}")).into_response();
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut response = if gzip {
        let mut r = asset.gzip.into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.raw.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(confab_dashboard_assets::mime(&file)),
    );
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Every answer: not framed by other sites, no sniffing, no referrer to
/// other sites. (The pages' Content-Security-Policy carries a per-response
/// nonce: `confab_dashboard::ssr::content_security_policy`.)
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        // Not `no-referrer`: browsers then send `Origin: null` with form
        // posts, and the origin check refuses the sign-in.
        HeaderValue::from_static("same-origin"),
    );
    response
}

pub struct Application {
    listener: Listener,
    router: Router,
    cluster: Arc<Cluster>,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let d = &config.dashboard;
        let admin_token = d.admin_token.clone().context(
            "no admin token: set dashboard.admin-token or dashboard.admin-token-file (operators sign in with it)",
        )?;
        if d.instances.is_empty() {
            anyhow::bail!("no instances configured: set dashboard.instances (e.g. --instance http://127.0.0.1:7001)");
        }
        if !confab_dashboard_assets::BUILT {
            tracing::warn!("this binary was built with CONFAB_SKIP_WASM: the dashboard's pages will not come alive in the browser");
        }
        crate::tls::install_client(&config.http)?;
        let client = crate::tls::reqwest_builder()
            .connect_timeout(d.instance_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()?;
        let cluster = Cluster::new(
            client,
            cluster::Settings {
                instances: d.instances.clone(),
                gateways: d.gateways.clone(),
                supervisor: d.supervisor.clone(),
                admin_token: admin_token.clone(),
                agent_credential: d.agent_credential.clone(),
                state_dir: d.state_dir.clone(),
                cluster_secret: config.cluster.secret.clone(),
                timeout: d.instance_timeout,
            },
        );
        let gate = signin::Gate::new(admin_token, d.session_ttl);
        let router = router(cluster.clone(), gate);
        let listener = Listener::bind("dashboard", d.listen, &config.http).await?;
        Ok(Application {
            listener,
            router,
            cluster,
        })
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            cluster,
        } = self;
        let stop = CancellationToken::new();
        cluster.poll().await;
        let poller = {
            let (cluster, stop) = (cluster.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(cluster::POLL_INTERVAL) => {}
                        _ = cluster.poke.notified() => {}
                    }
                    cluster.poll().await;
                }
            })
        };
        tracing::info!(addr = %listener.local_addr()?, "dashboard started");
        let (stopping, closing) = (stop.clone(), cluster.clone());
        listener
            .serve(router, async move {
                shutdown.await;
                tracing::info!("dashboard stopping");
                stopping.cancel();
                // Ends the pages' `/live` streams, which would hold the
                // graceful shutdown open.
                closing.close();
            })
            .await?;
        stop.cancel();
        let _ = poller.await;
        Ok(())
    }
}
