//! Step 3 of a batch: one operation applied in the instance's events
//! file, against what the writer knows of each chat's last seq.

use super::headers::{check_owner, select_header, Header};
use super::recent::{insert_row, partition_of, partitions, EVENT_COLUMNS};
use super::unavailable;
use super::writer::{Tail, WriteOp, WriteOutput};
use crate::session::Event;
use crate::store::{StoreError, StoreResult};
use rusqlite::{params, Connection};
use std::cell::Cell;
use std::collections::HashMap;

/// What an operation of step 3 needs besides its own file.
pub(super) struct Context<'a> {
    pub(super) shared: &'a Connection,
    pub(super) file_id: &'a str,
    /// A claim's or a delete's header, as step 1 left it.
    pub(super) header: Option<&'a Header>,
    /// Appends' headers, as read before this transaction.
    pub(super) known: &'a HashMap<String, Option<Header>>,
    /// A claim's events, as step 2 read them.
    pub(super) copy: Option<&'a Vec<Event>>,
    /// Set by an append whose state differs from the header's.
    pub(super) changes_state: Cell<bool>,
}

/// The tails the writer knew before this batch, and what the batch has
/// learned so far (an epoch of 0: the session is gone).
pub(super) struct Tails<'a> {
    pub(super) known: &'a HashMap<String, Tail>,
    pub(super) learned: &'a mut HashMap<String, Tail>,
    pub(super) pending: &'a mut HashMap<String, Vec<i64>>,
}

impl Tails<'_> {
    /// What this writer knows of `session_id` at `epoch` (the current
    /// one), or, the first time, what the tables say.
    pub(super) fn tail(
        &self,
        conn: &Connection,
        session_id: &str,
        epoch: u64,
    ) -> StoreResult<Tail> {
        let known = self
            .learned
            .get(session_id)
            .or_else(|| self.known.get(session_id));
        if let Some(tail) = known.filter(|t| t.epoch == epoch) {
            return Ok(*tail);
        }
        conn.prepare_cached(&partitions()[partition_of(session_id)].last_seq)
            .and_then(|mut st| st.query_row(params![session_id], |r| r.get::<_, i64>(0)))
            .map(|n| Tail {
                epoch,
                last_seq: n.max(0) as u64,
                tracked: false,
            })
            .map_err(unavailable)
    }

    fn learn(&mut self, session_id: &str, tail: Tail) {
        self.learned.insert(session_id.to_owned(), tail);
    }

    pub(super) fn forget(&mut self, session_id: &str) {
        self.pending.remove(session_id);
        let gone = Tail {
            epoch: 0,
            last_seq: 0,
            tracked: false,
        };
        self.learn(session_id, gone);
    }

    /// Where this writer keeps the ids of `session_id`'s rows in `recent`.
    pub(super) fn rows(&mut self, session_id: &str) -> &mut Vec<i64> {
        self.pending.entry(session_id.to_owned()).or_default()
    }
}

pub(super) fn apply(
    conn: &Connection,
    op: &WriteOp,
    tails: &mut Tails<'_>,
    context: &Context<'_>,
) -> StoreResult<WriteOutput> {
    let taken = || {
        context
            .header
            .ok_or_else(|| unavailable("the header was not taken"))
    };
    match op {
        WriteOp::Create(record, events) => {
            // Step 4 inserts the header, and refuses a second one; this
            // refuses before writing the common case of a create sent
            // again.
            if select_header(context.shared, &record.session_id)
                .map_err(unavailable)?
                .is_some()
            {
                return Err(StoreError::AlreadyExists(record.session_id.clone()));
            }
            let rows = tails.rows(&record.session_id);
            let last_seq = insert_events(conn, &record.session_id, 0, events, rows)?;
            let tail = Tail {
                epoch: record.epoch,
                last_seq,
                tracked: true,
            };
            tails.learn(&record.session_id, tail);
            Ok(WriteOutput::Done)
        }
        WriteOp::Append(a) => {
            let header = context
                .known
                .get(&a.session_id)
                .ok_or_else(|| unavailable("the header was not read"))?
                .as_ref();
            check_owner(&a.session_id, a.epoch, header, context.file_id)?;
            if header.is_some_and(|h| h.record.state != a.state) {
                context.changes_state.set(true);
            }
            let mut tail = tails.tail(conn, &a.session_id, a.epoch)?;
            let rows = tails.rows(&a.session_id);
            tail.last_seq = insert_events(conn, &a.session_id, tail.last_seq, &a.events, rows)?;
            tails.learn(&a.session_id, tail);
            Ok(WriteOutput::Done)
        }
        WriteOp::Claim { session_id, .. } => {
            let header = taken()?;
            let events = context
                .copy
                .ok_or_else(|| unavailable("the events were not read"))?;
            let here = header.is_in(context.file_id);
            if !here {
                // What this file still holds of the chat (from an earlier
                // stay here, or a save refused meanwhile) makes way for the
                // copy. Its table of `recent` has moved: all is in `events`.
                conn.prepare_cached("DELETE FROM events WHERE session_id = ?1")
                    .and_then(|mut st| st.execute(params![session_id]))
                    .map_err(unavailable)?;
                let mut st = conn
                    .prepare_cached(&format!(
                        "INSERT INTO events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                    ))
                    .map_err(unavailable)?;
                for e in events {
                    insert_row(&mut st, session_id, e).map_err(unavailable)?;
                }
                tails.pending.remove(session_id);
            }
            let tail = Tail {
                epoch: header.record.epoch,
                last_seq: events.last().map_or(0, |e| e.seq),
                // Copied: nothing of it is in `recent`. Read in place: its
                // rows there may be another writer's.
                tracked: !here,
            };
            tails.learn(session_id, tail);
            Ok(WriteOutput::Claimed(Box::new((
                header.record.clone(),
                events.clone(),
            ))))
        }
        WriteOp::Delete { session_id, epoch } => {
            // Step 1 removed the header. Its rows go from this file when
            // they are here; rows elsewhere are swept by their file's
            // writer.
            if taken()?.is_in(context.file_id) {
                // By id when this writer wrote them all, else by a scan.
                let tail = tails.tail(conn, session_id, *epoch)?;
                let rows = std::mem::take(tails.rows(session_id));
                let partition = &partitions()[partition_of(session_id)];
                if tail.tracked {
                    let mut st = conn
                        .prepare_cached(&partition.delete_row)
                        .map_err(unavailable)?;
                    for id in rows {
                        st.execute(params![id, session_id]).map_err(unavailable)?;
                    }
                } else {
                    conn.prepare_cached(&partition.delete_session)
                        .and_then(|mut st| st.execute(params![session_id]))
                        .map_err(unavailable)?;
                }
                conn.prepare_cached("DELETE FROM events WHERE session_id = ?1")
                    .and_then(|mut st| st.execute(params![session_id]))
                    .map_err(unavailable)?;
            }
            tails.forget(session_id);
            Ok(WriteOutput::Done)
        }
    }
}

/// Insert `events` into `recent` after a stored `last_seq`; each must
/// come after the one before it. The new last seq; the rows' ids are
/// added to `rows`.
fn insert_events(
    conn: &Connection,
    session_id: &str,
    mut last_seq: u64,
    events: &[Event],
    rows: &mut Vec<i64>,
) -> StoreResult<u64> {
    let mut st = conn
        .prepare_cached(&partitions()[partition_of(session_id)].insert)
        .map_err(unavailable)?;
    for e in events {
        if e.seq <= last_seq {
            return Err(StoreError::Conflict(format!(
                "session {session_id} seq {} is already stored (the last is {last_seq})",
                e.seq
            )));
        }
        insert_row(&mut st, session_id, e).map_err(unavailable)?;
        rows.push(conn.last_insert_rowid());
        last_seq = e.seq;
    }
    Ok(last_seq)
}
