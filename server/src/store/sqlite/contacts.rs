//! Final transcripts in SQLite (by default the session store's own file).

use super::busy::{busy_wait, retry_busy, BUSY_TIMEOUT};
use super::schema::{create_schema, open};
use super::{unavailable, SqliteOptions};
use crate::store::{ContactStore, FinalTranscript, StoreResult};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Final transcripts in SQLite (by default the session store's own file).
pub struct SqliteContactStore {
    conn: Arc<Mutex<Connection>>,
    busy_timeout: Duration,
}

/// A connection of its own to the session store's file (or another), for
/// the small tables off the message path: final transcripts, the
/// instances' registry.
pub(super) fn open_side(
    path: &Path,
    options: SqliteOptions,
) -> StoreResult<Arc<Mutex<Connection>>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
    }
    let deadline = std::time::Instant::now() + options.busy_timeout;
    let mut conn = retry_busy(deadline, || {
        let conn = open(path, options)?;
        create_schema(&conn)?;
        Ok(conn)
    })
    .map_err(unavailable)?;
    // Waits for the write lock as the session writers do: with SQLite's
    // sleeping handler it lost the lock to them again and again, and a
    // chat's close waited for its final transcript.
    conn.busy_handler(Some(busy_wait)).map_err(unavailable)?;
    Ok(Arc::new(Mutex::new(conn)))
}

impl SqliteContactStore {
    pub fn open(path: &Path, options: SqliteOptions) -> StoreResult<Self> {
        Ok(SqliteContactStore {
            conn: open_side(path, options)?,
            busy_timeout: options.busy_timeout,
        })
    }
}

#[async_trait]
impl ContactStore for SqliteContactStore {
    async fn save_final_transcript(&self, t: FinalTranscript) -> StoreResult<()> {
        let (conn, busy_timeout) = (self.conn.clone(), self.busy_timeout);
        let body = serde_json::to_string(&t.events).map_err(unavailable)?;
        tokio::task::spawn_blocking(move || {
            BUSY_TIMEOUT.with(|t| t.set(busy_timeout));
            conn.lock().execute(
                "INSERT INTO final_transcripts (session_id, intx, closed_at, transcript)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![t.session_id, t.intx, t.closed_at_ms, body],
            )
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        Ok(())
    }

    async fn final_transcript(&self, session_id: &str) -> StoreResult<Option<FinalTranscript>> {
        let conn = self.conn.clone();
        let id = session_id.to_owned();
        let row = tokio::task::spawn_blocking(move || {
            conn.lock()
                .query_row(
                    "SELECT session_id, intx, closed_at, transcript FROM final_transcripts WHERE session_id = ?1",
                    params![id],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?)),
                )
                .optional()
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        row.map(|(session_id, intx, closed_at_ms, body)| {
            Ok(FinalTranscript {
                session_id,
                intx,
                closed_at_ms,
                events: serde_json::from_str(&body).map_err(unavailable)?,
            })
        })
        .transpose()
    }
}
