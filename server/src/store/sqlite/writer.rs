//! The writer thread: one per process, group-committing every operation
//! queued while the previous transaction committed, in four steps (see
//! [`Writer::run_batch`]).

use super::apply::{apply, Context, Tails};
use super::busy::{busy_wait, BUSY_SINCE, BUSY_TIMEOUT, CONTENDED, HAND_OFF};
use super::checkpoint::{checkpoint, wal_path};
use super::files::EventFiles;
use super::headers::{check_owner, select_header, Header, KnownHeaders, SESSION_COLUMNS};
use super::recent::{move_partition, partition_of, select_events_of, PARTITIONS};
use super::{unavailable, SqliteOptions};
use crate::session::{Event, EventKind, SessionState};
use crate::store::{Append, SessionRecord, StoreError, StoreResult};
use parking_lot::Mutex;
use rusqlite::{params, Connection, TransactionBehavior};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub(super) enum WriteOp {
    Create(SessionRecord, Vec<Event>),
    Append(Append),
    Claim { session_id: String, owner: String },
    Delete { session_id: String, epoch: u64 },
}

pub(super) enum WriteOutput {
    Done,
    Claimed(Box<(SessionRecord, Vec<Event>)>),
}

pub(super) type Reply = oneshot::Sender<StoreResult<WriteOutput>>;

/// The writer thread's state: its connection, and what it knows of the
/// sessions it writes.
pub(super) struct Writer {
    /// This instance's events file.
    conn: Connection,
    /// The shared file: the chats' headers (owner, epoch, state, events
    /// file).
    shared: Connection,
    /// Other events files, read by claims.
    files: EventFiles,
    /// Whose events file `conn` is (the instance's id).
    file_id: String,
    /// States of chats whose events were saved while the shared file's
    /// write lock could not be had: written with a later batch.
    unsaved_states: HashMap<String, (u64, SessionState)>,
    /// The headers appends were checked against, while the shared file
    /// has not changed.
    known: KnownHeaders,
    /// Per session: the epoch of the last write and the highest seq stored
    /// at that epoch. Valid only while the epoch is current, which the
    /// append checks first.
    tails: HashMap<String, Tail>,
    /// Per session: ids of the rows this writer put in `recent` since it
    /// last saw the table emptied, so that deleting a session finds them
    /// without a scan. Some may be stale (a rolled-back insert, a move by
    /// another process): a delete also matches the session id.
    pending: HashMap<String, Vec<i64>>,
    /// Moves of a table of `recent` this writer has seen
    /// (`recent_moves.steps`).
    steps_seen: i64,
    /// Rows this writer appended to `recent` since its last move.
    appended: usize,
    /// Chats this writer lost, whose rows may go (`drop_gone`).
    gone: Arc<Mutex<HashSet<String>>>,
    /// Operations per group commit (`confab_store_group_commit_operations`).
    group_sizes: metrics::Histogram,
    flush_rows: usize,
    busy_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tail {
    pub(super) epoch: u64,
    pub(super) last_seq: u64,
    /// Whether `pending` holds every row of the session in `recent`: the
    /// session was created or claimed by this writer (a claim moves what
    /// `recent` held first).
    pub(super) tracked: bool,
}

/// Start the writer thread of the events file at `path`, taking its
/// operations from `rx` until every sender is gone.
pub(super) fn start(
    writer: Writer,
    rx: mpsc::Receiver<(WriteOp, Reply)>,
    path: &Path,
    options: SqliteOptions,
) -> std::io::Result<()> {
    let wal = wal_path(path);
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || writer_loop(writer, rx, options.max_batch(), &wal, options.wal_limit()))?;
    Ok(())
}

fn writer_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<(WriteOp, Reply)>,
    max_batch: usize,
    wal: &Path,
    wal_limit: u64,
) {
    BUSY_TIMEOUT.with(|t| t.set(writer.busy_timeout));
    // Ours, not SQLite's sleeping one (see `busy_wait`).
    let _ = writer.conn.busy_handler(Some(busy_wait));
    let _ = writer.shared.busy_handler(Some(busy_wait));

    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        writer.group_sizes.record(batch.len() as f64);
        let results = writer.run_batch(&batch);
        for ((_, reply), result) in batch.drain(..).zip(results) {
            let _ = reply.send(result);
        }
        // The acknowledgements are out; now a move, if due.
        let _ = writer.move_if_due();
        writer.files.expire();
        // Once the WAL starts over its file is cut back to the limit, so a
        // file above it holds that much of the current WAL. Between two of
        // our transactions nothing of ours is appended: this checkpoint
        // copies what the side thread has not, and the next transaction
        // starts the WAL over.
        if std::fs::metadata(wal).is_ok_and(|m| m.len() > wal_limit) {
            let _ = checkpoint(&writer.conn);
        }
        // Another process waited for the lock during our transaction: let
        // it have the lock before we take it again, or a writer that is
        // always ready first would starve the others.
        if CONTENDED.with(|c| c.replace(false)) {
            std::thread::sleep(HAND_OFF);
        }
    }
}

impl Writer {
    /// The writer of `file_id`'s events file (`conn`), beside the shared
    /// file at `shared_path` (`shared`). `gone`: the chats the instance
    /// released, whose rows may go.
    pub(super) fn new(
        conn: Connection,
        shared: Connection,
        shared_path: &Path,
        file_id: &str,
        options: SqliteOptions,
        gone: Arc<Mutex<HashSet<String>>>,
    ) -> Self {
        Writer {
            conn,
            shared,
            files: EventFiles::new(shared_path, options),
            file_id: file_id.to_owned(),
            unsaved_states: HashMap::new(),
            known: KnownHeaders::default(),
            tails: HashMap::new(),
            pending: HashMap::new(),
            steps_seen: 0,
            appended: 0,
            gone,
            // Registered now: shown (all buckets 0) before the first commit.
            group_sizes: metrics::histogram!(
                crate::telemetry::metrics::STORE_GROUP_COMMIT_OPERATIONS
            ),
            flush_rows: options.flush_rows.max(1),
            busy_timeout: options.busy_timeout,
        }
    }

    /// The moves so far (by any process writing this file).
    fn move_steps(conn: &Connection) -> rusqlite::Result<i64> {
        conn.prepare_cached("SELECT steps FROM recent_moves")?
            .query_row([], |r| r.get(0))
    }

    /// Tables of `recent` were emptied: forget the row ids kept for them.
    fn moved(&mut self, tables: &[usize]) {
        if !tables.is_empty() {
            self.pending
                .retain(|id, _| !tables.contains(&partition_of(id)));
        }
    }

    /// Moves by any process since this writer last looked.
    fn saw_steps(&mut self, steps: i64) {
        let new = (steps - self.steps_seen).max(0) as usize;
        let tables: Vec<usize> = (0..new.min(PARTITIONS))
            .map(|k| (self.steps_seen as usize + k) % PARTITIONS)
            .collect();
        self.moved(&tables);
        self.steps_seen = steps;
    }

    /// Move the next table of `recent` once this writer has appended
    /// `flush_rows / PARTITIONS` rows since its last move. Counted in
    /// memory: a count in the file (AUTOINCREMENT's `sqlite_sequence`)
    /// cost every commit one more page written.
    fn move_if_due(&mut self) -> rusqlite::Result<()> {
        let every = (self.flush_rows / PARTITIONS).max(1);
        if self.appended < every {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let steps = Self::move_steps(&tx)?;
        move_partition(&tx, steps as usize % PARTITIONS)?;
        tx.prepare_cached("UPDATE recent_moves SET steps = ?1")?
            .execute(params![steps + 1])?;
        tx.commit()?;
        self.appended = 0;
        self.saw_steps(steps + 1);
        self.drop_gone(steps as usize % PARTITIONS)?;
        Ok(())
    }

    /// Delete the rows of the chats this writer lost (refused, or released
    /// by the instance) whose table of `recent` has just moved, so that all
    /// their rows are in `events`, if their header no longer names this
    /// file. A full sweep scanned the whole file (0.5 s with 300,000 rows,
    /// a p99 of 520 ms in the open loop).
    fn drop_gone(&mut self, moved: usize) -> rusqlite::Result<()> {
        let now: Vec<String> = {
            let mut gone = self.gone.lock();
            let now = gone
                .iter()
                .filter(|id| partition_of(id) == moved)
                .cloned()
                .collect();
            gone.retain(|id| partition_of(id) != moved);
            now
        };
        if now.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for id in now {
            let here = select_header(&self.shared, &id)?.is_some_and(|h| h.is_in(&self.file_id));
            if !here {
                tx.prepare_cached("DELETE FROM events WHERE session_id = ?1")?
                    .execute(params![id])?;
            }
        }
        tx.commit()
    }

    /// A batch in four steps, so that saves take no lock but their own
    /// file's:
    /// 1. claims and deletes change the chats' headers in the shared file
    ///    (from then on the old owner's saves are refused);
    /// 2. claims read their chats' events where they are;
    /// 3. one transaction in this instance's events file saves the new
    ///    events and the claims' copies; each append checks the header
    ///    before it writes;
    /// 4. the shared file records new chats, the claims' new events file
    ///    and changed states, and every append's epoch is checked again:
    ///    a claim that bumped it between the check and the commit read the
    ///    events file before this commit (if the process was frozen in
    ///    between) and would not have them, so the append is refused.
    fn run_batch(&mut self, batch: &[(WriteOp, Reply)]) -> Vec<StoreResult<WriteOutput>> {
        BUSY_SINCE.with(|s| s.set(None));
        let mut results: Vec<Option<StoreResult<WriteOutput>>> =
            batch.iter().map(|_| None).collect();
        let headers = self.take_headers(batch, &mut results);
        // The claims' chats, by the file that holds them, each file read
        // once.
        let mut by_file: HashMap<Option<&str>, Vec<(usize, &str)>> = HashMap::new();
        for (&i, header) in &headers {
            if let WriteOp::Claim { session_id, .. } = &batch[i].0 {
                let file = header.events_file.as_deref();
                by_file.entry(file).or_default().push((i, session_id));
            }
        }
        let mut copies: HashMap<usize, Vec<Event>> = HashMap::new();
        for (file, claims) in by_file {
            let ids: Vec<&str> = claims.iter().map(|(_, id)| *id).collect();
            let read = match file {
                Some(id) if id == self.file_id => select_events_of(&self.conn, &ids, None),
                other => self.files.events_of(other, &ids),
            };
            for (i, id) in claims {
                match &read {
                    Ok(events) => {
                        copies.insert(i, events.get(id).cloned().unwrap_or_default());
                    }
                    Err(e) => results[i] = Some(Err(unavailable(e))),
                }
            }
        }
        let mut learned: HashMap<String, Tail> = HashMap::new();
        let mut state_changes = Vec::new();
        let ran: Vec<usize> = (0..batch.len()).filter(|&i| results[i].is_none()).collect();
        match self.save(
            batch,
            &headers,
            &copies,
            &mut results,
            &mut learned,
            &mut state_changes,
        ) {
            Ok(moved) => {
                self.moved(&moved);
                self.appended += ran
                    .iter()
                    .filter(|&&i| matches!(results[i], Some(Ok(_))))
                    .map(|&i| match &batch[i].0 {
                        WriteOp::Create(_, events) => events.len(),
                        WriteOp::Append(a) => a.events.len(),
                        _ => 0,
                    })
                    .sum::<usize>();
            }
            Err(e) => {
                for &i in &ran {
                    results[i] = Some(Err(unavailable(&e)));
                }
                learned.clear();
            }
        }
        self.confirm(batch, &headers, &mut results, &state_changes);
        for (id, tail) in learned {
            if tail.epoch == 0 {
                self.tails.remove(&id);
            } else {
                self.tails.insert(id, tail);
            }
        }
        results
            .into_iter()
            .zip(batch)
            .map(|(result, (op, _))| {
                let result = result.unwrap_or_else(|| Err(unavailable("not run")));
                if let (
                    Err(e),
                    WriteOp::Append(Append { session_id, .. })
                    | WriteOp::Claim { session_id, .. }
                    | WriteOp::Create(SessionRecord { session_id, .. }, _),
                ) = (&result, op)
                {
                    // What this writer learned of the chat may not hold.
                    self.tails.remove(session_id);
                    if matches!(e, StoreError::Fenced { .. } | StoreError::NotFound(_)) {
                        self.gone.lock().insert(session_id.clone());
                    }
                }
                result
            })
            .collect()
    }

    /// Step 1: in one transaction of the shared file, a claim bumps the
    /// epoch and names the new owner (the events file stays the old one
    /// until the copy is saved); a delete removes the header if its epoch
    /// is current. The headers as found (a claim's with the new epoch).
    fn take_headers(
        &mut self,
        batch: &[(WriteOp, Reply)],
        results: &mut [Option<StoreResult<WriteOutput>>],
    ) -> HashMap<usize, Header> {
        let mut taken = HashMap::new();
        let changes = |op: &WriteOp| matches!(op, WriteOp::Claim { .. } | WriteOp::Delete { .. });
        if !batch.iter().any(|(op, _)| changes(op)) {
            return taken;
        }
        let outcome = (|| -> rusqlite::Result<Vec<(usize, StoreResult<Header>)>> {
            let tx = self
                .shared
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut found = Vec::new();
            for (i, (op, _)) in batch.iter().enumerate() {
                let verdict = match op {
                    WriteOp::Claim { session_id, owner } => match select_header(&tx, session_id)? {
                        None => Err(StoreError::NotFound(session_id.clone())),
                        Some(h) if h.record.state == SessionState::Closed => {
                            Err(StoreError::Closed(session_id.clone()))
                        }
                        Some(mut h) => {
                            h.record.epoch += 1;
                            h.record.owner_instance = owner.clone();
                            tx.prepare_cached(
                                "UPDATE sessions SET epoch = ?2, owner_instance = ?3, claimed_epoch = ?2
                                 WHERE session_id = ?1",
                            )?
                            .execute(params![session_id, h.record.epoch as i64, owner])?;
                            Ok(h)
                        }
                    },
                    WriteOp::Delete { session_id, epoch } => {
                        match select_header(&tx, session_id)? {
                            None => Err(StoreError::NotFound(session_id.clone())),
                            // A closed session is deleted too: closing precedes
                            // deletion.
                            Some(h) if h.record.epoch != *epoch => Err(StoreError::Fenced {
                                session_id: session_id.clone(),
                                attempted: *epoch,
                                current: h.record.epoch,
                            }),
                            Some(h) => {
                                tx.prepare_cached("DELETE FROM sessions WHERE session_id = ?1")?
                                    .execute(params![session_id])?;
                                Ok(h)
                            }
                        }
                    }
                    _ => continue,
                };
                found.push((i, verdict));
            }
            tx.commit()?;
            Ok(found)
        })();
        self.known.forget();
        match outcome {
            Ok(found) => {
                for (i, verdict) in found {
                    match verdict {
                        Ok(header) => {
                            taken.insert(i, header);
                        }
                        Err(e) => results[i] = Some(Err(e)),
                    }
                }
            }
            Err(e) => {
                for (i, (op, _)) in batch.iter().enumerate() {
                    if changes(op) {
                        results[i] = Some(Err(unavailable(&e)));
                    }
                }
            }
        }
        taken
    }

    /// Step 3: one transaction in this instance's events file for every
    /// operation step 1 did not answer, each in a savepoint when it may
    /// fail after it has written. The tables of `recent` moved first.
    fn save(
        &mut self,
        batch: &[(WriteOp, Reply)],
        headers: &HashMap<usize, Header>,
        copies: &HashMap<usize, Vec<Event>>,
        results: &mut [Option<StoreResult<WriteOutput>>],
        learned: &mut HashMap<String, Tail>,
        state_changes: &mut Vec<usize>,
    ) -> rusqlite::Result<Vec<usize>> {
        let appending = batch
            .iter()
            .enumerate()
            .filter_map(|(i, (op, _))| match op {
                WriteOp::Append(a) if results[i].is_none() => Some(a.session_id.as_str()),
                _ => None,
            });
        self.known.refresh(&mut self.shared, appending)?;
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // A claim's copy replaces what this file holds of the chat, which
        // is then all in `events`: its table of `recent` moves first.
        let mut moved: Vec<usize> = copies
            .keys()
            .filter(|&&i| results[i].is_none() && !headers[&i].is_in(&self.file_id))
            .filter_map(|&i| match &batch[i].0 {
                WriteOp::Claim { session_id, .. } => Some(partition_of(session_id)),
                _ => None,
            })
            .collect();
        moved.sort_unstable();
        moved.dedup();
        for &n in &moved {
            move_partition(&tx, n)?;
        }
        for (i, (op, _)) in batch.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let context = Context {
                shared: &self.shared,
                file_id: &self.file_id,
                header: headers.get(&i),
                known: &self.known.headers,
                copy: copies.get(&i),
                changes_state: Cell::new(false),
            };
            let single_write = matches!(op, WriteOp::Append(a) if a.events.len() == 1 && a.events[0].kind == EventKind::Message);
            let mut tails = Tails {
                known: &self.tails,
                learned: &mut *learned,
                pending: &mut self.pending,
            };
            let result = if single_write {
                apply(&tx, op, &mut tails, &context)
            } else {
                let before = tails.learned.clone();
                match tx.savepoint() {
                    Err(e) => Err(unavailable(e)),
                    Ok(mut sp) => match apply(&sp, op, &mut tails, &context) {
                        Ok(out) => sp.commit().map(|_| out).map_err(unavailable),
                        Err(e) => {
                            let _ = sp.rollback();
                            *tails.learned = before;
                            Err(e)
                        }
                    },
                }
            };
            if result.is_ok() && context.changes_state.get() {
                state_changes.push(i);
            }
            results[i] = Some(result);
        }
        tx.commit()?;
        Ok(moved)
    }

    /// Step 4, in the shared file: a write transaction when there is
    /// something to record, else a read. When the write cannot be had
    /// (another process holds the lock past the busy timeout), new chats
    /// and claims fail, appends are checked by a read, and their states
    /// wait for a later batch.
    fn confirm(
        &mut self,
        batch: &[(WriteOp, Reply)],
        headers: &HashMap<usize, Header>,
        results: &mut [Option<StoreResult<WriteOutput>>],
        state_changes: &[usize],
    ) {
        let saved_now: Vec<bool> = results.iter().map(|r| matches!(r, Some(Ok(_)))).collect();
        let saved = |i: usize| saved_now[i];
        let writes = batch.iter().enumerate().any(|(i, (op, _))| {
            saved(i)
                && match op {
                    WriteOp::Create(..) => true,
                    WriteOp::Claim { .. } => !headers[&i].is_in(&self.file_id),
                    _ => false,
                }
        }) || !state_changes.is_empty()
            || !self.unsaved_states.is_empty();
        let appends = batch
            .iter()
            .enumerate()
            .any(|(i, (op, _))| saved(i) && matches!(op, WriteOp::Append(_)));
        if !writes && !appends {
            return;
        }
        let verdicts = if writes {
            self.confirm_in(batch, headers, results, state_changes, true)
                .or_else(|e| {
                    // New chats and claims need the write; appends only a read.
                    for (i, (op, _)) in batch.iter().enumerate() {
                        if saved(i) && !matches!(op, WriteOp::Append(_) | WriteOp::Delete { .. }) {
                            results[i] = Some(Err(unavailable(&e)));
                        }
                    }
                    for &i in state_changes {
                        if let WriteOp::Append(a) = &batch[i].0 {
                            self.unsaved_states
                                .insert(a.session_id.clone(), (a.epoch, a.state));
                        }
                    }
                    self.confirm_in(batch, headers, results, &[], false)
                })
        } else {
            self.confirm_in(batch, headers, results, &[], false)
        };
        match verdicts {
            Ok(verdicts) => {
                for (i, verdict) in verdicts {
                    results[i] = Some(verdict.map(|()| WriteOutput::Done));
                }
            }
            Err(e) => {
                for (i, (op, _)) in batch.iter().enumerate() {
                    if saved(i) && matches!(op, WriteOp::Append(_)) {
                        results[i] = Some(Err(unavailable(&e)));
                    }
                }
            }
        }
    }

    /// One transaction of step 4: the verdicts that replace step 3's
    /// answers (a claim's answer stays when it is confirmed).
    fn confirm_in(
        &mut self,
        batch: &[(WriteOp, Reply)],
        headers: &HashMap<usize, Header>,
        results: &[Option<StoreResult<WriteOutput>>],
        state_changes: &[usize],
        write: bool,
    ) -> rusqlite::Result<Vec<(usize, StoreResult<()>)>> {
        let behavior = if write {
            TransactionBehavior::Immediate
        } else {
            TransactionBehavior::Deferred
        };
        let tx = self.shared.transaction_with_behavior(behavior)?;
        // Unchanged since step 3 read the headers: every append's check
        // holds as it was (a claim since then has changed the file).
        let unchanged = !write && self.known.is_current(&tx)?;
        let mut verdicts = Vec::new();
        let set_state =
            "UPDATE sessions SET state = ?3 WHERE session_id = ?1 AND epoch = ?2 AND state <> ?3";
        for (i, (op, _)) in batch.iter().enumerate() {
            if !matches!(results[i], Some(Ok(_))) {
                continue;
            }
            match op {
                WriteOp::Create(record, _) if write => {
                    let inserted = tx
                        .prepare_cached(&format!(
                            "INSERT INTO sessions ({SESSION_COLUMNS}, events_file)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING"
                        ))?
                        .execute(params![
                            record.session_id,
                            record.intx,
                            record.owner_instance,
                            record.epoch as i64,
                            record.state.as_str(),
                            record.subject,
                            record.created_at_ms,
                            record.nickname,
                            self.file_id
                        ])?;
                    if inserted == 0 {
                        let exists = StoreError::AlreadyExists(record.session_id.clone());
                        verdicts.push((i, Err(exists)));
                    }
                }
                WriteOp::Claim { session_id, .. } if write && !headers[&i].is_in(&self.file_id) => {
                    let epoch = headers[&i].record.epoch;
                    let moved = tx
                        .prepare_cached(
                            "UPDATE sessions SET events_file = ?3 WHERE session_id = ?1 AND epoch = ?2",
                        )?
                        .execute(params![session_id, epoch as i64, self.file_id])?;
                    if moved == 0 {
                        let current = select_header(&tx, session_id)?.map_or(0, |h| h.record.epoch);
                        let fenced = StoreError::Fenced {
                            session_id: session_id.clone(),
                            attempted: epoch,
                            current,
                        };
                        verdicts.push((i, Err(fenced)));
                    }
                }
                WriteOp::Append(a) => {
                    let header = match self.known.headers.get(&a.session_id) {
                        Some(known) if unchanged => known.as_ref(),
                        _ => {
                            let header = select_header(&tx, &a.session_id)?;
                            self.known
                                .headers
                                .entry(a.session_id.clone())
                                .insert_entry(header)
                                .into_mut()
                                .as_ref()
                        }
                    };
                    let verdict = check_owner(&a.session_id, a.epoch, header, &self.file_id);
                    if verdict.is_ok() && state_changes.contains(&i) {
                        tx.prepare_cached(set_state)?.execute(params![
                            a.session_id,
                            a.epoch as i64,
                            a.state.as_str()
                        ])?;
                    }
                    verdicts.push((i, verdict));
                }
                _ => {}
            }
        }
        if write {
            for (id, (epoch, state)) in &self.unsaved_states {
                tx.prepare_cached(set_state)?.execute(params![
                    id,
                    *epoch as i64,
                    state.as_str()
                ])?;
            }
        }
        tx.commit()?;
        if write {
            self.unsaved_states.clear();
            self.known.forget();
        }
        Ok(verdicts)
    }
}
