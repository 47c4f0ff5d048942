//! `confab gateway`: the public web chat API (the reference's GMS). It
//! picks an instance for each new chat and, when the chat's instance dies,
//! restores the chat on another one and carries on: requests are retried
//! there (messages with their `client_msg_id`), WebSocket participants are
//! reconnected from their last seq.
//!
//! The gateway keeps no state of its own that matters: chat locations are
//! read from the session store (through any instance) and only cached;
//! tokens are signed, not stored. Two gateways with the same token secret
//! serve the same chats.

pub mod agents;
pub mod api;
pub mod discovery;
mod pages;
pub mod pool;
pub mod ratelimit;
pub mod relay;
pub mod sockets;
pub mod tokens;

use crate::config::Config;
use crate::contract::answers;
use crate::contract::internal::{self, Route};
use crate::error::ApiError;
use crate::listener::Listener;
use crate::telemetry::{events, metrics as m};
use axum::http::{Method, StatusCode};
use parking_lot::Mutex;
use pool::{Member, Pool};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest wait for an instance's answer (saves may be retried per the
/// settings). A dead or frozen instance is cut short much sooner by its
/// down token (health checks); a timeout alone does not mark an instance
/// down: it is answered 504 and the client retries with its client_msg_id.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at one request across failovers.
const ATTEMPTS: usize = 4;

/// Why a call to an instance got no answer.
#[derive(Debug)]
pub struct Unreachable(pub String);

pub struct Gateway {
    pub pool: Arc<Pool>,
    /// WebSockets open per participant (capped).
    pub sockets: sockets::SocketCount,
    /// How often a participant's WebSocket is pinged.
    pub ws_ping_interval: Duration,
    /// Presented on every call to an instance's internal API.
    pub secret: crate::contract::ClusterSecret,
    /// HTTP/1.1 to instances without the channel (crate::channel; older
    /// versions during a rolling upgrade): hyper's pooled client.
    upstream: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
    pub tokens: tokens::TokenKey,
    pub token_ttl: Duration,
    /// `gateway.agents-read-closed-chats`.
    pub agents_read_closed_chats: bool,
    /// Who may act as an agent.
    pub agents: Arc<agents::Agents>,
    pub allowed_origins: Vec<String>,
    /// chat id → instance id; a cache of the session store's locations.
    locations: Mutex<HashMap<String, String>>,
    /// One failover at a time per chat.
    relocating: crate::keyed_lock::KeyedLocks,
    /// Chats moved to another instance since start (`/status`; the metric
    /// `confab_gateway_failovers_total` counts the same).
    pub failovers: std::sync::atomic::AtomicU64,
    pub stop: CancellationToken,
}

impl Gateway {
    /// Call an instance; fails fast when the instance is found down. The
    /// answer's body is returned as it came, to be passed on unparsed.
    pub async fn call_raw(
        &self,
        member: &Member,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<(StatusCode, bytes::Bytes), Unreachable> {
        let payload = body.unwrap_or_default();
        let down = member.down_token();
        let exchange = async {
            if path.len() > crate::channel::MAX_PATH {
                return self.call_http(member, method, path, payload).await;
            }
            match member.route().await.map_err(Unreachable)? {
                pool::Route::Channel(link) => link
                    .call(&method, path, &payload)
                    .await
                    .map_err(|_| Unreachable("the channel to the instance closed".into())),
                pool::Route::Http => self.call_http(member, method, path, payload).await,
            }
        };
        tokio::select! {
            r = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange) => match r {
                Ok(answer) => answer,
                Err(_) => {
                    let body = serde_json::json!({"error": {"code": "upstream_timeout", "message": "the chat server did not answer in time; retry with the same client_msg_id"}});
                    Ok((StatusCode::GATEWAY_TIMEOUT, body.to_string().into()))
                }
            },
            _ = down.cancelled() => Err(Unreachable("instance down".into())),
        }
    }

    /// One request over plain HTTP/1.1 (an instance without the channel).
    async fn call_http(
        &self,
        member: &Member,
        method: Method,
        path: &str,
        payload: bytes::Bytes,
    ) -> Result<(StatusCode, bytes::Bytes), Unreachable> {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", member.url))
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .header(
                crate::contract::CLUSTER_SECRET_HEADER,
                self.secret.header_value(),
            )
            .body(http_body_util::Full::new(payload))
            .map_err(|e| Unreachable(e.to_string()))?;
        let response = self
            .upstream
            .request(request)
            .await
            .map_err(|e| Unreachable(e.to_string()))?;
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|e| Unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// [`Gateway::call_raw`] with the answer parsed as JSON.
    pub async fn call(
        &self,
        member: &Member,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<(StatusCode, Value), Unreachable> {
        let (status, bytes) = self.call_raw(member, method, path, body).await?;
        let body = serde_json::from_slice(&bytes)
            .map_err(|e| Unreachable(format!("answer is not JSON: {e}")))?;
        Ok((status, body))
    }

    fn cached(&self, chat: &str) -> Option<Arc<Member>> {
        let id = self.locations.lock().get(chat).cloned()?;
        self.pool.by_id(&id)
    }

    fn remember(&self, chat: &str, member: &Member) {
        if let Some(id) = member.id() {
            let mut map = self.locations.lock();
            if map.len() > 200_000 {
                map.clear();
            }
            map.insert(chat.to_owned(), id);
        }
    }

    pub fn forget(&self, chat: &str) {
        self.locations.lock().remove(chat);
    }

    /// Where a chat lives: the cached location, else the session store's.
    /// A chat the store does not know is answered by any instance (404, or
    /// 409 when it was closed).
    pub async fn locate(&self, chat: &str) -> Result<Arc<Member>, ApiError> {
        if let Some(m) = self.cached(chat) {
            if m.is_healthy() {
                return Ok(m);
            }
            return self.relocate(chat, &m).await;
        }
        // Any instance can read the session store; one that just died (and
        // is not marked down yet) is marked now and the next one asked.
        for _ in 0..self.pool.member_count().max(1) {
            let any = self.pool.any_healthy(None).ok_or_else(no_instance)?;
            match self
                .call(&any, Method::GET, &Route::Location.path(chat), None)
                .await
            {
                Ok((StatusCode::OK, record)) => {
                    let owner = serde_json::from_value::<answers::Location>(record)
                        .map(|r| r.owner_instance)
                        .unwrap_or_default();
                    return match self.pool.by_id(&owner) {
                        Some(m) if m.is_healthy() => {
                            self.remember(chat, &m);
                            Ok(m)
                        }
                        // Its owner is gone: restore it now.
                        Some(m) => self.relocate(chat, &m).await,
                        None => self.relocate(chat, &any).await,
                    };
                }
                Ok(_) => return Ok(any),
                Err(Unreachable(why)) => self.pool.report_failure(&any, &why),
            }
        }
        Err(ApiError::unavailable(
            "no_instance",
            "no chat server instance answered",
        ))
    }

    /// The chat's instance `failed` did not serve it: find where it lives
    /// now, or restore it on a live instance.
    pub async fn relocate(&self, chat: &str, failed: &Member) -> Result<Arc<Member>, ApiError> {
        self.relocating
            .run(chat, self.relocate_locked(chat, failed))
            .await
    }

    async fn relocate_locked(&self, chat: &str, failed: &Member) -> Result<Arc<Member>, ApiError> {
        let failed_id = failed.id();
        // Another request may have moved it while we waited.
        if let Some(m) = self.cached(chat) {
            if m.id() != failed_id && m.is_healthy() {
                return Ok(m);
            }
        }
        // The instance asked takes the chat only while the store names the
        // failed owner (`restore_from`); restored elsewhere since (another
        // gateway's request), it names that owner instead. Named down too,
        // the chat is taken regardless.
        let mut from = failed_id.clone();
        let started = std::time::Instant::now();
        for _ in 0..self.pool.member_count().max(1) + 1 {
            let Some(target) = self.pool.pick(Some(failed)) else {
                break;
            };
            let path = match &from {
                Some(f) => internal::restore_from(chat, f),
                None => Route::Restore.path(chat),
            };
            match self.call(&target, Method::POST, &path, None).await {
                Ok((StatusCode::OK, body)) => {
                    let restored = serde_json::from_value::<answers::Restored>(body).ok();
                    let elsewhere = restored
                        .as_ref()
                        .map(|r| r.instance_id.clone())
                        .filter(|owner| Some(owner) != target.id().as_ref());
                    if let Some(owner) = elsewhere {
                        match self.pool.by_id(&owner).filter(|m| m.is_healthy()) {
                            Some(m) => {
                                self.remember(chat, &m);
                                return Ok(m);
                            }
                            None => {
                                from = None;
                                continue;
                            }
                        }
                    }
                    self.remember(chat, &target);
                    if let Some(restored) = restored.filter(|r| r.restored) {
                        metrics::counter!(m::GATEWAY_FAILOVERS, "result" => "ok").increment(1);
                        metrics::histogram!(m::GATEWAY_FAILOVER_DURATION)
                            .record(started.elapsed().as_secs_f64());
                        self.failovers
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            event_id = events::GATEWAY_FAILOVER,
                            chat_id = chat,
                            from = failed_id.as_deref().unwrap_or("?"),
                            to = restored.instance_id,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "chat moved to another instance"
                        );
                    }
                    return Ok(target);
                }
                Ok((status, body))
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        || status == StatusCode::MISDIRECTED_REQUEST =>
                {
                    tracing::warn!(chat_id = chat, instance = ?target.id(), answer = %body, "restore refused; trying another instance");
                    continue;
                }
                Ok((status, body)) => return Err(passthrough(status, &body)),
                Err(Unreachable(why)) => {
                    self.pool.report_failure(&target, &why);
                    continue;
                }
            }
        }
        metrics::counter!(m::GATEWAY_FAILOVERS, "result" => "failed").increment(1);
        tracing::error!(
            event_id = events::GATEWAY_FAILOVER_FAILED,
            chat_id = chat,
            "no instance could restore the chat"
        );
        Err(no_instance())
    }

    /// Send a chat request to the chat's instance, failing over as needed.
    pub async fn on_chat(
        &self,
        chat: &str,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<(StatusCode, Value, Arc<Member>), ApiError> {
        let (status, bytes, member) = self.on_chat_raw(chat, method, path, body).await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, body, member))
    }

    /// [`Gateway::on_chat`] with the answer's body unparsed.
    pub async fn on_chat_raw(
        &self,
        chat: &str,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<(StatusCode, bytes::Bytes, Arc<Member>), ApiError> {
        let mut failed: Option<Arc<Member>> = None;
        for _ in 0..ATTEMPTS {
            let member = match failed.take() {
                None => self.locate(chat).await?,
                Some(f) => self.relocate(chat, &f).await?,
            };
            match self
                .call_raw(&member, method.clone(), path, body.clone())
                .await
            {
                Ok((StatusCode::MISDIRECTED_REQUEST, _)) => {
                    self.forget(chat);
                    failed = Some(member);
                }
                Ok((status, body)) => return Ok((status, body, member)),
                Err(Unreachable(why)) => {
                    self.pool.report_failure(&member, &why);
                    self.forget(chat);
                    failed = Some(member);
                }
            }
        }
        Err(no_instance())
    }
}

pub fn no_instance() -> ApiError {
    ApiError::unavailable("no_instance", "no chat server instance is available")
}

/// A JSON request body for an instance.
pub fn request(body: &impl serde::Serialize) -> Option<bytes::Bytes> {
    serde_json::to_vec(body).ok().map(bytes::Bytes::from)
}

/// An instance's JSON error, passed on with its status.
pub fn passthrough(status: StatusCode, body: &Value) -> ApiError {
    let error = answers::ErrorBody::deserialize(body).ok().map(|b| b.error);
    let code = error
        .as_ref()
        .and_then(|e| crate::contract::error_code(&e.code))
        .unwrap_or("upstream_error");
    if status == StatusCode::UNAUTHORIZED {
        // The instance refused this gateway (its cluster secret), not the
        // participant: say so, without blaming the client's credentials.
        tracing::error!("an instance refused this gateway's cluster secret: check cluster.secret");
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the chat server refused this gateway; the operator has been told",
        );
    }
    let message = error
        .map(|e| e.message)
        .unwrap_or_else(|| "the chat server refused the request".into());
    ApiError::new(status, code, message)
}

pub struct Application {
    listener: Listener,
    router: axum::Router,
    gateway: Arc<Gateway>,
    health_interval: Duration,
    /// The store configuration discovery reads the registry with.
    discover: Option<Config>,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let g = &config.gateway;
        if g.instances.is_empty() && !g.discover {
            anyhow::bail!("no instances configured: set gateway.instances (e.g. --instance http://127.0.0.1:7001), or gateway.discover = true to find them in the session store");
        }
        let agents = Arc::new(agents::Agents::new(
            g.agent_credential.clone(),
            g.agents_file.clone(),
        )?);
        let tokens = match &g.token_secret {
            Some(s) => tokens::TokenKey::new(s.as_bytes()),
            None => {
                tracing::warn!("gateway.token-secret is not set: tokens are valid for this gateway process only");
                tokens::TokenKey::random()
            }
        };
        crate::tls::install_client(&config.http)?;
        let client = crate::tls::reqwest_builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let handle = m::install();
        m::describe();
        for result in ["ok", "failed"] {
            metrics::counter!(m::GATEWAY_FAILOVERS, "result" => result).absolute(0);
        }
        metrics::gauge!(m::WEBSOCKET_CONNECTIONS, "component" => "gateway").set(0.0);
        let _ = metrics::histogram!(m::GATEWAY_FAILOVER_DURATION);
        metrics::gauge!(m::GATEWAY_INSTANCES_HEALTHY).set(0.0);
        let secret = crate::contract::ClusterSecret::new(config.cluster_secret()?);
        let pool = Pool::new(&g.instances, client, g.instance_channel, &secret);
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(500)));
        connector.set_nodelay(true);
        // `https://` instance URLs need the connector to pass them on.
        connector.enforce_http(false);
        let connector = crate::tls::https_connector(connector);
        let upstream =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
        let gateway = Arc::new(Gateway {
            pool,
            sockets: sockets::SocketCount::new(g.max_sockets_per_participant),
            ws_ping_interval: g.ws_ping_interval,
            secret,
            upstream,
            tokens,
            token_ttl: g.token_ttl,
            agents_read_closed_chats: g.agents_read_closed_chats,
            agents: agents.clone(),
            allowed_origins: g.allowed_origins.clone(),
            locations: Mutex::new(HashMap::new()),
            relocating: Default::default(),
            failovers: Default::default(),
            stop: CancellationToken::new(),
        });
        let limiter = ratelimit::RateLimiter::new(
            g.rate_limit_per_second,
            g.rate_limit_burst,
            g.trusted_proxies.clone(),
            gateway.tokens.clone(),
            agents.clone(),
        );
        let router = api::router(gateway.clone(), limiter, handle);
        let listener = Listener::bind("gateway", g.listen, &config.http)
            .await?
            .exempt(g.trusted_proxies.clone());
        Ok(Application {
            listener,
            router,
            gateway,
            health_interval: g.health_interval,
            discover: g.discover.then(|| config.clone()),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            gateway,
            health_interval,
            discover,
        } = self;
        // First checks before serving, so the first chat finds instances.
        for member in gateway.pool.members() {
            gateway
                .pool
                .check(&member, Duration::from_millis(500))
                .await;
        }
        gateway
            .pool
            .spawn_health_checks(health_interval, gateway.stop.clone());
        if let Some(config) = discover {
            let config = Arc::new(config);
            discovery::spawn(
                gateway.pool.clone(),
                move || crate::store::open_registry(config.clone()),
                gateway.stop.clone(),
            );
        }
        tracing::info!(addr = %listener.local_addr()?, instances = gateway.pool.member_count(), "gateway started");
        let stop = gateway.stop.clone();
        listener
            .serve(router, async move {
                shutdown.await;
                tracing::info!("gateway stopping");
                stop.cancel();
            })
            .await?;
        Ok(())
    }
}
