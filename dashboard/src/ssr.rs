//! The server half: the pages, the `#[server]` functions and `/live`, over
//! a [`Backend`] that knows the cluster. Sign-in, the session cookie and
//! the embedded `/pkg/` files are the host's (`confab-server`): it wraps
//! [`router`] in its own layers.

use crate::app::{shell, App};
use crate::model::{ClusterView, SessionsView, TranscriptLine};
use axum::extract::{FromRef, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures_util::stream::Stream;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, LeptosRoutes};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the dashboard's server needs from the cluster.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The latest snapshot, and every next one.
    fn watch(&self) -> watch::Receiver<Arc<ClusterView>>;
    /// Drain (`false`) or enable (`true`) an instance.
    async fn set_enabled(&self, instance: &str, enabled: bool) -> Result<(), String>;
    /// Start a restoration test with `chats` chats; its id. It runs in the
    /// background and shows in the snapshots.
    async fn run_restoration_test(&self, chats: u32) -> Result<u64, String>;
    /// Restart every instance in turn (drain, wait up to `drain_limit_s`,
    /// stop, start, enable); runs in the background.
    async fn rolling_restart(&self, drain_limit_s: u32) -> Result<(), String>;
    /// A page of an instance's live chats, after the chat id `after`.
    async fn sessions(&self, instance: &str, after: &str) -> Result<SessionsView, String>;
    /// The whole transcript of a chat an instance hosts.
    async fn transcript(&self, instance: &str, chat: &str) -> Result<Vec<TranscriptLine>, String>;
}

pub type SharedBackend = Arc<dyn Backend>;

/// The backend, inside a `#[server]` function.
pub fn backend() -> Result<SharedBackend, ServerFnError> {
    use_context::<SharedBackend>()
        .ok_or_else(|| ServerFnError::new("the dashboard has no cluster backend"))
}

#[derive(Clone)]
struct AppState {
    options: LeptosOptions,
    backend: SharedBackend,
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.options.clone()
    }
}

/// The page at `/`, the server functions under `/api/` and `/live`.
pub fn router(backend: SharedBackend) -> Router {
    let options = LeptosOptions::builder()
        .output_name(crate::OUTPUT_NAME)
        .site_pkg_dir("pkg")
        .env(Env::PROD)
        .build();
    let routes = generate_route_list(App);
    let state = AppState {
        options: options.clone(),
        backend: backend.clone(),
    };
    Router::new()
        .route("/live", get(live))
        .leptos_routes_with_context(
            &state,
            routes,
            move || provide_context(backend.clone()),
            move || shell(options.clone()),
        )
        .with_state(state)
}

/// A strict Content-Security-Policy for a page: scripts only from here or
/// carrying this response's nonce (Leptos' hydration loader is an inline
/// module script), WebAssembly allowed to compile, styles only from the
/// stylesheet, nothing framed, forms only to this origin.
pub fn content_security_policy() {
    let (Some(nonce), Some(response)) = (
        leptos::nonce::use_nonce(),
        use_context::<leptos_axum::ResponseOptions>(),
    ) else {
        return;
    };
    let policy = format!(
        "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; \
         style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&policy) {
        response.insert_header(axum::http::header::CONTENT_SECURITY_POLICY, value);
    }
}

/// Server-sent events: the current snapshot at once, then each new one.
async fn live(State(state): State<AppState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut rx = state.backend.watch();
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let view = rx.borrow_and_update().clone();
        let event = Event::default()
            .json_data(view.as_ref())
            .unwrap_or_else(|_| Event::default().comment("unserialisable snapshot"));
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_functions_are_registered() {
        // The `inventory` registrations of a library crate can be dropped
        // by the linker; the routes would then answer 404.
        let paths: Vec<String> = leptos::server_fn::axum::server_fn_paths()
            .map(|(path, _)| path.to_string())
            .collect();
        for path in [
            "/api/cluster",
            "/api/instance-enabled",
            "/api/restoration-test",
            "/api/rolling-restart",
            "/api/sessions",
            "/api/transcript",
        ] {
            assert!(paths.iter().any(|p| p == path), "{path} not in {paths:?}");
        }
    }
}
