//! The embedded session and contact store: SQLite files in WAL mode, one
//! shared by every instance on the host, and one of events per instance.
//!
//! The shared file holds the chats' headers (owner, fencing epoch, state,
//! and which events file holds the events), final transcripts and the
//! instances' registry. Each instance saves its chats' events to its own
//! file beside it ([`events_path`]), so a save takes no lock another
//! instance waits for; the shared file is written only when a chat starts,
//! changes owner or state, or is deleted.
//!
//! Writes go through one writer thread per process that group-commits
//! (`writer`): it takes every operation queued while the previous
//! transaction was committing and runs them together, so one fsync serves
//! many chats. An append is checked against its chat's header before and
//! after its commit, so an owner whose chat was claimed meanwhile never has
//! a save acknowledged (`headers`). Events are written twice to keep disk
//! writes small (`recent`).
//!
//! The parts:
//! - `schema`: the files' tables, how they are opened and upgraded;
//! - `writer`: the writer thread and its batches; `apply`: one
//!   operation of a batch in the events file;
//! - `headers`: the chats' headers and the fence;
//! - `recent`: the two tables of events and how a transcript is read;
//! - `files`: other instances' events files, as claims read them;
//! - `checkpoint`: copying the WAL back, beside the writer;
//! - `busy`: waiting for another process's write lock;
//! - `contacts`, `registry`: the small tables off the message path.

use super::{Append, SessionRecord, SessionStore, StoreError, StoreResult};
use crate::config::Synchronous;
use crate::session::{Event, SessionState};
use async_trait::async_trait;
use busy::retry_busy;
use files::{sweep, EventFiles};
use headers::{select_header, session_from_row, SESSION_COLUMNS};
use parking_lot::Mutex;
use recent::select_events_of;
use rusqlite::{params, Connection};
use schema::{create_events_schema, create_schema, open, open_events};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use writer::{Reply, WriteOp, WriteOutput, Writer};

mod apply;
mod busy;
mod checkpoint;
mod contacts;
mod files;
mod headers;
mod recent;
mod registry;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

pub use checkpoint::{CHECKPOINT_INTERVAL, CHECKPOINT_THREAD};
pub use contacts::SqliteContactStore;
pub use registry::SqliteRegistry;
pub use schema::events_path;

/// How the store opens its file.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// How long a writer waits for another process's write lock.
    pub busy_timeout: Duration,
    /// Most operations group-committed in one transaction.
    pub max_batch: usize,
    /// WAL size at which the writer finishes the checkpoint itself. A
    /// checkpoint beside a busy writer never catches up with it, and the
    /// WAL starts over only once every frame has been copied back, so
    /// without this the WAL grows for as long as saves keep coming
    /// (gigabytes a minute under load). Also the size the WAL file is
    /// truncated to when it starts over (`journal_size_limit`).
    pub wal_limit_bytes: i64,
    /// Rows in `recent` that make the writer move them to `events`. More
    /// means fewer pages written per message, and a longer scan for a
    /// read that is not a claim.
    pub flush_rows: usize,
}

impl SqliteOptions {
    /// Most operations in one group commit (at least one).
    fn max_batch(&self) -> usize {
        self.max_batch.max(1)
    }

    /// The WAL size at which the writer finishes the checkpoint itself.
    fn wal_limit(&self) -> u64 {
        self.wal_limit_bytes.max(0) as u64
    }

    /// The options an instance's `[server]` section gives.
    pub fn of(server: &crate::config::ServerConfig) -> Self {
        SqliteOptions {
            synchronous: server.sqlite_synchronous,
            busy_timeout: server.sqlite_busy_timeout,
            max_batch: server.max_batch,
            ..SqliteOptions::default()
        }
    }
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            max_batch: 512,
            wal_limit_bytes: 256 * 1024 * 1024,
            flush_rows: 16384,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The SQLite session store.
pub struct SqliteStore {
    path: PathBuf,
    file_id: String,
    /// Chats released by the instance, for the writer to delete.
    gone: Arc<Mutex<HashSet<String>>>,
    writer: mpsc::Sender<(WriteOp, Reply)>,
    reader: Arc<Mutex<Readers>>,
}

/// The connections of the store's readers: the shared file, and the
/// events files.
struct Readers {
    shared: Connection,
    files: EventFiles,
}

impl SqliteStore {
    /// Open (creating if needed) the store whose shared file is `path`,
    /// for the instance `file_id`, whose saves go to its own events file
    /// ([`events_path`]).
    pub fn open(path: &Path, file_id: &str, options: SqliteOptions) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        // Instances that start together on a new file race to switch it to
        // WAL and to create (or upgrade) the schema; SQLite answers "locked"
        // at once to some of those steps instead of waiting, so they are
        // retried.
        let deadline = std::time::Instant::now() + options.busy_timeout;
        let shared = retry_busy(deadline, || {
            let conn = open(path, options)?;
            create_schema(&conn)?;
            Ok(conn)
        })
        .map_err(unavailable)?;
        let own = events_path(path, file_id);
        let conn = retry_busy(deadline, || {
            let conn = open_events(&own, options)?;
            create_events_schema(&conn)?;
            // Checkpoints run beside the writer, not inside its commits, so
            // that copying the WAL back into the database never delays a
            // save.
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            conn.pragma_update(None, "journal_size_limit", options.wal_limit_bytes)?;
            Ok(conn)
        })
        .map_err(unavailable)?;
        let mut conn = conn;
        retry_busy(deadline, || sweep(&mut conn, path, file_id)).map_err(unavailable)?;
        let reader = retry_busy(deadline, || open(path, options)).map_err(unavailable)?;
        let checkpointer = retry_busy(deadline, || open(&own, options)).map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(options.max_batch() * 4);
        let alive = tx.downgrade();
        checkpoint::start(checkpointer, &own, options, move || {
            alive.upgrade().is_some()
        })
        .map_err(unavailable)?;
        let gone = Arc::new(Mutex::new(HashSet::new()));
        let writer = Writer::new(conn, shared, path, file_id, options, gone.clone());
        writer::start(writer, rx, &own, options).map_err(unavailable)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            file_id: file_id.to_owned(),
            gone,
            writer: tx,
            reader: Arc::new(Mutex::new(Readers {
                shared: reader,
                files: EventFiles::new(path, options),
            })),
        })
    }

    /// The shared file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This instance's events file.
    pub fn events_path(&self) -> PathBuf {
        events_path(&self.path, &self.file_id)
    }

    async fn write(&self, op: WriteOp) -> StoreResult<WriteOutput> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send((op, tx))
            .await
            .map_err(|_| unavailable("the writer thread has stopped"))?;
        rx.await
            .map_err(|_| unavailable("the writer thread has stopped"))?
    }

    /// A read of the shared file.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.read_files(move |r| f(&r.shared)).await
    }

    /// A read of the shared file and the events files.
    async fn read_files<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Readers) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&mut reader.lock()))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "sqlite", op = "create_session", chat_id = %record.session_id))]
    async fn create_session(&self, record: SessionRecord, events: Vec<Event>) -> StoreResult<()> {
        self.write(WriteOp::Create(record, events))
            .await
            .map(|_| ())
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "sqlite", op = "append_events", chat_id = %append.session_id))]
    async fn append_events(&self, append: Append) -> StoreResult<()> {
        self.write(WriteOp::Append(append)).await.map(|_| ())
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "sqlite", op = "claim", chat_id = %session_id))]
    async fn claim(
        &self,
        session_id: &str,
        new_owner: &str,
    ) -> StoreResult<(SessionRecord, Vec<Event>)> {
        match self
            .write(WriteOp::Claim {
                session_id: session_id.to_owned(),
                owner: new_owner.to_owned(),
            })
            .await?
        {
            WriteOutput::Claimed(loaded) => Ok(*loaded),
            WriteOutput::Done => Err(unavailable("claim returned no session")),
        }
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "sqlite", op = "locate", chat_id = %session_id))]
    async fn locate(&self, session_id: &str) -> StoreResult<Option<SessionRecord>> {
        let id = session_id.to_owned();
        self.read(move |c| Ok(select_header(c, &id)?.map(|h| h.record)))
            .await
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "sqlite", op = "load", chat_id = %session_id))]
    async fn load(&self, session_id: &str) -> StoreResult<Option<(SessionRecord, Vec<Event>)>> {
        let id = session_id.to_owned();
        self.read_files(move |r| {
            // The header, then the events from its events file. A claim
            // that copied the chat to another file meanwhile shows as a
            // changed header: read again.
            let mut header = select_header(&r.shared, &id)?;
            for _ in 0..8 {
                let Some(h) = header else {
                    return Ok(None);
                };
                let conn = r.files.get(h.events_file.as_deref())?;
                let events = select_events_of(conn, &[&id], None)?
                    .remove(&id)
                    .unwrap_or_default();
                let again = select_header(&r.shared, &id)?;
                if again.as_ref().map(|a| &a.events_file) == Some(&h.events_file) {
                    return Ok(Some((h.record, events)));
                }
                header = again;
            }
            Err(rusqlite::Error::InvalidQuery)
        })
        .await
    }

    #[tracing::instrument(
        level = "debug",
        name = "store",
        skip_all,
        fields(backend = "sqlite", op = "list_sessions")
    )]
    async fn list_sessions(
        &self,
        state: Option<SessionState>,
        order: super::Order,
        limit: usize,
    ) -> StoreResult<Vec<SessionRecord>> {
        let direction = match order {
            super::Order::Oldest => "ASC",
            super::Order::Newest => "DESC",
        };
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE (?1 IS NULL OR state = ?1) ORDER BY created_at {direction} LIMIT ?2"
            ))?;
            let rows = st.query_map(params![state.map(SessionState::as_str), limit as i64], session_from_row)?;
            rows.collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "sqlite", op = "delete_session", chat_id = %session_id))]
    async fn delete_session(&self, session_id: &str, epoch: u64) -> StoreResult<()> {
        self.write(WriteOp::Delete {
            session_id: session_id.to_owned(),
            epoch,
        })
        .await
        .map(|_| ())
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    fn release(&self, session_id: &str) {
        self.gone.lock().insert(session_id.to_owned());
    }

    #[tracing::instrument(
        level = "debug",
        name = "store",
        skip_all,
        fields(backend = "sqlite", op = "owners")
    )]
    async fn owners(
        &self,
        session_ids: &[String],
    ) -> StoreResult<std::collections::HashMap<String, (String, u64)>> {
        let ids = session_ids.to_vec();
        self.read(move |c| {
            let mut out = std::collections::HashMap::new();
            for chunk in ids.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(",");
                let mut st = c.prepare(&format!(
                    "SELECT session_id, owner_instance, epoch FROM sessions WHERE session_id IN ({marks})"
                ))?;
                let rows = st.query_map(rusqlite::params_from_iter(chunk.iter()), |r| {
                    Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, i64>(2)? as u64)))
                })?;
                for row in rows {
                    let (id, owner) = row?;
                    out.insert(id, owner);
                }
            }
            Ok(out)
        })
        .await
    }
}
