//! The instances' registry in the session store's file.

use super::busy::BUSY_TIMEOUT;
use super::contacts::open_side;
use super::{unavailable, SqliteOptions};
use crate::store::{InstanceRegistry, Registration, StoreResult};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The instances' registry in the session store's file: every instance of
/// the host, and a gateway on the same host, read and write it.
pub struct SqliteRegistry {
    conn: Arc<Mutex<Connection>>,
    busy_timeout: Duration,
}

impl SqliteRegistry {
    pub fn open(path: &Path, options: SqliteOptions) -> StoreResult<Self> {
        Ok(SqliteRegistry {
            conn: open_side(path, options)?,
            busy_timeout: options.busy_timeout,
        })
    }
}

#[async_trait]
impl InstanceRegistry for SqliteRegistry {
    async fn register(&self, r: &Registration) -> StoreResult<()> {
        let (conn, busy_timeout, r) = (self.conn.clone(), self.busy_timeout, r.clone());
        tokio::task::spawn_blocking(move || {
            BUSY_TIMEOUT.with(|t| t.set(busy_timeout));
            conn.lock().execute(
                "INSERT INTO instances (instance_id, url, enabled, heartbeat_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (instance_id) DO UPDATE SET url = excluded.url, enabled = excluded.enabled, heartbeat_ms = excluded.heartbeat_ms",
                params![r.instance_id, r.url, r.enabled, r.heartbeat_ms],
            )
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        Ok(())
    }

    async fn registrations(&self) -> StoreResult<Vec<Registration>> {
        let (conn, busy_timeout) = (self.conn.clone(), self.busy_timeout);
        tokio::task::spawn_blocking(move || {
            BUSY_TIMEOUT.with(|t| t.set(busy_timeout));
            let conn = conn.lock();
            let mut stmt = conn
                .prepare_cached("SELECT instance_id, url, enabled, heartbeat_ms FROM instances")?;
            let rows = stmt.query_map([], |r| {
                Ok(Registration {
                    instance_id: r.get(0)?,
                    url: r.get(1)?,
                    enabled: r.get(2)?,
                    heartbeat_ms: r.get(3)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}
