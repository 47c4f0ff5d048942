//! Other instances' events files, as a claim reads them, and the sweep
//! of an instance's own file at open.

use super::recent::{select_events_of, RecentRows, PARTITIONS};
use super::schema::{events_path, open_existing};
use super::SqliteOptions;
use crate::session::Event;
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Connections to the events files one thread reads: other instances'
/// (a claim reads a chat where it lives) and the shared file, where a
/// chat stored by a version before the per-instance files (no
/// `events_file`) still has its events.
pub(super) struct EventFiles {
    shared: PathBuf,
    options: SqliteOptions,
    open: HashMap<Option<String>, Connection>,
    /// Per other instance's file: its `recent_N` rows, as the last claim
    /// from it read them.
    recent: HashMap<String, RecentRows>,
}

impl EventFiles {
    pub(super) fn new(shared: &Path, options: SqliteOptions) -> Self {
        EventFiles {
            shared: shared.to_owned(),
            options,
            open: HashMap::new(),
            recent: HashMap::new(),
        }
    }

    /// The events of `ids` in another instance's file (None: the shared
    /// file), by chat.
    pub(super) fn events_of(
        &mut self,
        file_id: Option<&str>,
        ids: &[&str],
    ) -> rusqlite::Result<HashMap<String, Vec<Event>>> {
        self.get(file_id)?;
        let conn = &self.open[&file_id.map(str::to_owned)];
        let Some(file_id) = file_id else {
            return select_events_of(conn, ids, None);
        };
        select_events_of(conn, ids, Some((file_id, &mut self.recent)))
    }

    /// Drop the rows kept of files no claim has read for a while.
    pub(super) fn expire(&mut self) {
        if !self.recent.is_empty() {
            self.recent
                .retain(|_, r| r.used.elapsed() < RecentRows::KEEP);
        }
    }

    pub(super) fn get(&mut self, file_id: Option<&str>) -> rusqlite::Result<&Connection> {
        let key = file_id.map(str::to_owned);
        if !self.open.contains_key(&key) {
            let conn = match file_id {
                Some(id) => open_existing(&events_path(&self.shared, id), self.options)?,
                None => open_existing(&self.shared, self.options)?,
            };
            self.open.insert(key.clone(), conn);
        }
        Ok(&self.open[&key])
    }
}

/// Delete the rows of chats whose events are no longer in this file:
/// closed and deleted by another instance, or claimed away (their new
/// events file has a copy once the header names it). Rows of a chat
/// whose header still names this file stay, also while another
/// instance is claiming it. Claims into this file and creates run on
/// the writer's thread, so none is halfway while this runs. A scan of the
/// file, at open; while the writer runs, it deletes the rows of each chat
/// it lost ([`Writer::drop_gone`]) instead, by key.
pub(super) fn sweep(
    conn: &mut Connection,
    shared: &Path,
    file_id: &str,
) -> rusqlite::Result<usize> {
    // Attached only meanwhile: `BEGIN IMMEDIATE` takes the write lock
    // of every attached file.
    let shared = shared.to_string_lossy().into_owned();
    conn.execute("ATTACH DATABASE ?1 AS shared", params![shared])?;
    let swept = sweep_attached(conn, file_id);
    conn.execute("DETACH DATABASE shared", [])?;
    swept
}

fn sweep_attached(conn: &mut Connection, file_id: &str) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut swept = 0;
    let tables =
        std::iter::once("events".to_owned()).chain((0..PARTITIONS).map(|n| format!("recent_{n}")));
    for table in tables {
        swept += tx.execute(
            &format!(
                "DELETE FROM main.{table} WHERE session_id IN (
                     SELECT DISTINCT session_id FROM main.{table} e WHERE NOT EXISTS (
                         SELECT 1 FROM shared.sessions s
                         WHERE s.session_id = e.session_id AND s.events_file = ?1))"
            ),
            params![file_id],
        )?;
    }
    tx.commit()?;
    Ok(swept)
}
