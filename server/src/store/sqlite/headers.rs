//! The chats' headers in the shared file (owner, epoch, state, events
//! file), and the checks an append makes against them: the fence.

use crate::session::SessionState;
use crate::store::{SessionRecord, StoreError, StoreResult};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;

/// A session's header in the shared file, and which events file holds its
/// events (None: the shared file itself, for a chat stored by a version
/// before the per-instance files).
pub(super) struct Header {
    pub(super) record: SessionRecord,
    pub(super) events_file: Option<String>,
}

impl Header {
    pub(super) fn is_in(&self, file_id: &str) -> bool {
        self.events_file.as_deref() == Some(file_id)
    }
}

/// The headers of the chats a writer appends to, as it last read them from
/// the shared file. They hold while no other connection has committed to
/// that file (its `data_version` is unchanged) and the writer has not
/// written headers itself since: an append is then checked, before and
/// after its commit, without a read of its own, one read transaction per
/// batch serving all of them.
#[derive(Default)]
pub(super) struct KnownHeaders {
    /// The shared file's `data_version` when `headers` were read.
    version: Option<i64>,
    /// By session id; None: no such session.
    pub(super) headers: HashMap<String, Option<Header>>,
}

impl KnownHeaders {
    /// Most headers kept: a writer with more chats reads some again.
    const MAX: usize = 100_000;

    /// Whether the headers still hold in `tx`'s view of the shared file;
    /// if not, they are dropped and the version is `tx`'s.
    pub(super) fn is_current(&mut self, tx: &Connection) -> rusqlite::Result<bool> {
        let version = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.version == Some(version) {
            return Ok(true);
        }
        self.headers.clear();
        self.version = Some(version);
        Ok(false)
    }

    /// Read, in one read transaction, the headers of `ids` not known.
    pub(super) fn refresh<'a>(
        &mut self,
        shared: &mut Connection,
        ids: impl Iterator<Item = &'a str>,
    ) -> rusqlite::Result<()> {
        let tx = shared.transaction()?;
        self.is_current(&tx)?;
        if self.headers.len() > Self::MAX {
            self.headers.clear();
        }
        for id in ids {
            if !self.headers.contains_key(id) {
                let header = select_header(&tx, id)?;
                self.headers.insert(id.to_owned(), header);
            }
        }
        tx.commit()
    }

    /// The writer changed headers itself (its own commits leave
    /// `data_version` as it was).
    pub(super) fn forget(&mut self) {
        self.version = None;
        self.headers.clear();
    }
}

pub(super) fn select_header(
    conn: &Connection,
    session_id: &str,
) -> rusqlite::Result<Option<Header>> {
    // Built once: every append reads its header twice.
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("SELECT {SESSION_COLUMNS}, events_file FROM sessions WHERE session_id = ?1")
    });
    conn.prepare_cached(&SQL)?
        .query_row(params![session_id], |r| {
            Ok(Header {
                record: session_from_row(r)?,
                events_file: r.get(8)?,
            })
        })
        .optional()
}

/// Whether a writer of `file_id` at epoch `attempted` may save the
/// session: the epoch is current, the chat open, and its events are in
/// this writer's file.
pub(super) fn check_owner(
    session_id: &str,
    attempted: u64,
    header: Option<&Header>,
    file_id: &str,
) -> StoreResult<()> {
    let header = header.ok_or_else(|| StoreError::NotFound(session_id.to_owned()))?;
    check_epoch(
        session_id,
        attempted,
        (header.record.epoch, header.record.state),
    )?;
    if !header.is_in(file_id) {
        return Err(StoreError::Fenced {
            session_id: session_id.to_owned(),
            attempted,
            current: header.record.epoch,
        });
    }
    Ok(())
}

fn check_epoch(
    session_id: &str,
    attempted: u64,
    (current, state): (u64, SessionState),
) -> StoreResult<()> {
    if current != attempted {
        return Err(StoreError::Fenced {
            session_id: session_id.to_owned(),
            attempted,
            current,
        });
    }
    if state == SessionState::Closed {
        return Err(StoreError::Closed(session_id.to_owned()));
    }
    Ok(())
}

pub(super) fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    let state: String = r.get(4)?;
    Ok(SessionRecord {
        session_id: r.get(0)?,
        intx: r.get(1)?,
        owner_instance: r.get(2)?,
        epoch: r.get::<_, i64>(3)? as u64,
        state: SessionState::parse(&state).unwrap_or(SessionState::Closed),
        subject: r.get(5)?,
        created_at_ms: r.get(6)?,
        nickname: r.get(7)?,
    })
}

/// The columns `session_from_row` reads, in its order.
pub(super) const SESSION_COLUMNS: &str =
    "session_id, intx, owner_instance, epoch, state, subject, created_at, nickname";
