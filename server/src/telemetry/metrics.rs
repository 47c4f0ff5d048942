//! Every metric confab exports (docs/operations.md, "Metrics"), with its
//! buckets. Names are Prometheus-style, in base units, and never labelled by
//! session.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const SESSIONS_CREATED: &str = "confab_sessions_created_total";
pub const SESSIONS_CLOSED: &str = "confab_sessions_closed_total";
pub const SESSIONS_RESTORED: &str = "confab_sessions_restored_total";
pub const SESSIONS_ACTIVE: &str = "confab_sessions_active";
pub const MESSAGES_SUBMITTED: &str = "confab_messages_submitted_total";
pub const TRANSCRIPT_SAVES: &str = "confab_transcript_saves_total";
pub const TRANSCRIPT_SAVE_FAILURES: &str = "confab_transcript_save_failures_total";
pub const TRANSCRIPT_SAVE_DURATION: &str = "confab_transcript_save_duration_seconds";
pub const RESTORE_DURATION: &str = "confab_restore_duration_seconds";
pub const MESSAGE_ACK_DURATION: &str = "confab_message_ack_duration_seconds";
pub const RESTORE_FAILURES: &str = "confab_restore_failures_total";
pub const STORE_HISTORY_CORRUPT: &str = "confab_store_history_corrupt_total";
pub const STORE_AVAILABLE: &str = "confab_store_available";
pub const STORE_STATUS_TRANSITIONS: &str = "confab_store_status_transitions_total";
pub const STORE_GROUP_COMMIT_OPERATIONS: &str = "confab_store_group_commit_operations";
pub const INSTANCE_ENABLED: &str = "confab_instance_enabled";
pub const BUILD_INFO: &str = "confab_build_info";
pub const GATEWAY_FAILOVERS: &str = "confab_gateway_failovers_total";
pub const GATEWAY_INSTANCES_HEALTHY: &str = "confab_gateway_instances_healthy";
pub const GATEWAY_FAILOVER_DURATION: &str = "confab_gateway_failover_duration_seconds";
pub const WEBSOCKET_CONNECTIONS: &str = "confab_websocket_connections";
pub const HTTP_REQUESTS: &str = "confab_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "confab_http_request_duration_seconds";
pub const INTERNAL_AUTH_FAILURES: &str = "confab_internal_auth_failures_total";
pub const HTTP_CONNECTIONS_OPEN: &str = "confab_http_connections_open";
pub const HTTP_CONNECTIONS_REFUSED: &str = "confab_http_connections_refused_total";

/// Save latency buckets; 0.02 s is the save objective.
const SAVE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Restore latency buckets; 3 s is the restoration objective.
const RESTORE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0,
];
/// Operations per group commit of the embedded store; the writer takes at
/// most `max-batch` (512 by default).
const GROUP_COMMIT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide recorder (once) and return its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(TRANSCRIPT_SAVE_DURATION.into()),
                    SAVE_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RESTORE_DURATION.into()),
                        RESTORE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(HTTP_REQUEST_DURATION.into()),
                        HTTP_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(GATEWAY_FAILOVER_DURATION.into()),
                        RESTORE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(MESSAGE_ACK_DURATION.into()),
                        SAVE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(STORE_GROUP_COMMIT_OPERATIONS.into()),
                        GROUP_COMMIT_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist in tests; the handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Describe the metrics so `/metrics` carries HELP lines.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SESSIONS_CREATED, "Sessions created on this instance.");
    describe_counter!(SESSIONS_CLOSED, "Sessions closed on this instance.");
    describe_counter!(SESSIONS_RESTORED, "Sessions this instance restored.");
    describe_gauge!(SESSIONS_ACTIVE, "Sessions hosted now.");
    describe_counter!(MESSAGES_SUBMITTED, "Messages accepted.");
    describe_counter!(
        TRANSCRIPT_SAVES,
        "Transcript save attempts by result (ok, error); a write refused because another instance owns the session is neither."
    );
    describe_counter!(
        TRANSCRIPT_SAVE_FAILURES,
        "Saves given up after every transcript-resend-attempts retry: the sender got an error."
    );
    describe_histogram!(
        TRANSCRIPT_SAVE_DURATION,
        Unit::Seconds,
        "One transcript save, store round trip included."
    );
    describe_histogram!(
        MESSAGE_ACK_DURATION,
        Unit::Seconds,
        "A message from its request to its acknowledgement, every save attempt and retry included (acknowledged messages)."
    );
    describe_histogram!(
        RESTORE_DURATION,
        Unit::Seconds,
        "Restore request to session live."
    );
    describe_counter!(RESTORE_FAILURES, "Restore requests that failed.");
    describe_counter!(
        STORE_HISTORY_CORRUPT,
        "Restorations refused because the stored history of the chat has a gap below a completed claim's cut (event 59617)."
    );
    describe_gauge!(STORE_AVAILABLE, "1 when the session store answers, else 0.");
    describe_counter!(
        STORE_STATUS_TRANSITIONS,
        "Session store availability transitions by new status."
    );
    describe_histogram!(
        STORE_GROUP_COMMIT_OPERATIONS,
        "Saves committed together by the embedded (SQLite) store's writer: one fsync each group; small groups under load mean more fsyncs and pages written per message."
    );
    describe_gauge!(INSTANCE_ENABLED, "1 enabled, 0 disabled (draining).");
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_counter!(
        GATEWAY_FAILOVERS,
        "Failovers by result: ok (the chat was restored on another instance) or failed (no instance could restore it; event 59703)."
    );
    describe_histogram!(
        GATEWAY_FAILOVER_DURATION,
        Unit::Seconds,
        "From the gateway finding a chat's instance gone to the chat live on another (successful failovers)."
    );
    describe_gauge!(
        WEBSOCKET_CONNECTIONS,
        "Participants' WebSockets open now (the gateway's public ones; an instance's per-chat streams)."
    );
    describe_gauge!(
        GATEWAY_INSTANCES_HEALTHY,
        "Instances the gateway considers healthy and enabled."
    );
    describe_counter!(
        INTERNAL_AUTH_FAILURES,
        "Calls on the internal API or channel refused for a missing or wrong cluster secret."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by component, route template, method and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration by component, route template, method and status."
    );
    describe_gauge!(
        HTTP_CONNECTIONS_OPEN,
        "Connections this listener serves now (WebSockets included)."
    );
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "Connections closed before a request: reason per_address (over http.max-connections-per-address) or tls_handshake (failed or too slow)."
    );
    metrics::gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
    PROCESS.describe();
    PROCESS.collect();
}

/// `process_*` metrics (CPU seconds, resident memory, open and max file
/// descriptors, start time: restarts show on dashboards), read at each
/// scrape.
static PROCESS: std::sync::LazyLock<metrics_process::Collector> =
    std::sync::LazyLock::new(metrics_process::Collector::default);

/// Counts one open participant WebSocket while it lives.
pub struct OpenSocket(&'static str);

impl OpenSocket {
    pub fn new(component: &'static str) -> Self {
        metrics::gauge!(WEBSOCKET_CONNECTIONS, "component" => component).increment(1.0);
        OpenSocket(component)
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        metrics::gauge!(WEBSOCKET_CONNECTIONS, "component" => self.0).decrement(1.0);
    }
}

/// `GET /metrics`: the Prometheus text format.
pub fn render(handle: &PrometheusHandle) -> axum::response::Response {
    use axum::response::IntoResponse;
    PROCESS.collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Metric handles per (component, route, method, status), made once: the
/// request path then only bumps them, with no label allocation.
struct HttpSeries {
    component: &'static str,
    route: String,
    method: String,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

type SeriesMap = parking_lot::RwLock<std::collections::HashMap<u64, Vec<HttpSeries>>>;

fn with_series(
    component: &'static str,
    route: &str,
    method: &str,
    status: u16,
    f: impl Fn(&HttpSeries),
) {
    use std::hash::{Hash, Hasher};
    static SERIES: OnceLock<SeriesMap> = OnceLock::new();
    let series = SERIES.get_or_init(Default::default);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (component, route, method, status).hash(&mut h);
    let key = h.finish();
    let matches = |s: &&HttpSeries| {
        s.component == component && s.route == route && s.method == method && s.status == status
    };
    if let Some(s) = series.read().get(&key).and_then(|v| v.iter().find(matches)) {
        return f(s);
    }
    let mut map = series.write();
    let bucket = map.entry(key).or_default();
    if bucket.iter().find(matches).is_none() {
        bucket.push(HttpSeries {
            component,
            route: route.to_owned(),
            method: method.to_owned(),
            status,
            requests: metrics::counter!(HTTP_REQUESTS, "component" => component, "route" => route.to_owned(), "method" => method.to_owned(), "status" => status.to_string()),
            duration: metrics::histogram!(HTTP_REQUEST_DURATION, "component" => component, "route" => route.to_owned(), "method" => method.to_owned(), "status" => status.to_string()),
        });
    }
    if let Some(s) = bucket.iter().find(matches) {
        f(s);
    }
}

/// The method as a label: the standard ones by name, anything else `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Axum middleware recording request counts and durations by route template.
pub async fn track_http(
    component: &'static str,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    // Labels come from closed sets only: a made-up method or path must not
    // become a series of its own.
    let method = method_label(req.method());
    let start = std::time::Instant::now();
    let response = next.run(req).await;
    let route = route.as_ref().map(|r| r.as_str()).unwrap_or("unmatched");
    let elapsed = start.elapsed().as_secs_f64();
    with_series(component, route, method, response.status().as_u16(), |s| {
        s.requests.increment(1);
        s.duration.record(elapsed);
    });
    response
}
