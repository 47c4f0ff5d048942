//! The supervisor API (admin token as Bearer), for tests, scripts and the
//! dashboard: `GET /cluster`, `POST /instances/{id}/{action}` with `kill`
//! (SIGKILL), `stop` (SIGTERM, answered once it exited), `pause` (SIGSTOP, answered once frozen),
//! `resume` (SIGCONT), `start` (a component that is not running) and
//! `restart` (SIGKILL, then start; answered once it serves again).

use super::children::{StartError, Supervisor};
use crate::auth::check_admin;
use crate::error::ApiError;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/cluster", get(cluster))
        .route("/instances/{id}/{action}", post(act))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(sup)
}

async fn cluster(
    State(sup): State<Arc<Supervisor>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&headers, Some(&sup.plan.admin_token))?;
    Ok(Json(sup.cluster_json()))
}

fn start_failed(e: StartError) -> ApiError {
    match e {
        StartError::Running(id) => ApiError::new(
            StatusCode::CONFLICT,
            "already_running",
            format!("{id} is already running"),
        ),
        other => ApiError::new(StatusCode::BAD_GATEWAY, "start_failed", other.to_string()),
    }
}

async fn act(
    State(sup): State<Arc<Supervisor>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&headers, Some(&sup.plan.admin_token))?;
    let index = sup
        .index_of(&id)
        .ok_or_else(|| ApiError::not_found(format!("no component {id}")))?;
    let not_running = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!("{id} is not running"),
        )
    };
    let sig = match action.as_str() {
        "kill" => {
            let (pid, exited) = sup.kill(index).await.ok_or_else(not_running)?;
            tracing::warn!(component = %id, pid, "killed with SIGKILL on request");
            return Ok(Json(
                json!({"id": id, "action": action, "pid": pid, "exited": exited}),
            ));
        }
        "stop" => libc::SIGTERM,
        "pause" => libc::SIGSTOP,
        "resume" => libc::SIGCONT,
        "start" | "restart" => {
            if action == "restart" {
                // The old process must be gone before its port is free.
                sup.kill(index).await;
            }
            sup.spawn(index).map_err(start_failed)?;
            let pid = sup.wait_ready(index).await.map_err(start_failed)?;
            return Ok(Json(json!({"id": id, "action": action, "pid": pid})));
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown action {other:?}: kill, stop, pause, resume, start or restart"
            )))
        }
    };
    let pid = sup.signal(index, sig).ok_or_else(not_running)?;
    if sig == libc::SIGTERM {
        // Answer once it has exited (it finishes its in-flight requests
        // first), so that a `start` right after finds it stopped.
        let exited = sup.wait_exit(index, pid, Duration::from_secs(15)).await;
        return Ok(Json(
            json!({"id": id, "action": action, "pid": pid, "exited": exited}),
        ));
    }
    if sig == libc::SIGSTOP {
        // Answer once it is frozen, not merely signalled (see crate::process).
        let stopped = crate::process::wait_stopped(pid, Duration::from_secs(5)).await;
        return Ok(Json(
            json!({"id": id, "action": action, "pid": pid, "stopped": stopped}),
        ));
    }
    Ok(Json(json!({"id": id, "action": action, "pid": pid})))
}
