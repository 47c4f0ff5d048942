//! The embedded session and contact store: one SQLite file in WAL mode,
//! shared by every instance on the host.
//!
//! Writes go through one writer thread per process that group-commits: it
//! takes every operation queued while the previous transaction was
//! committing and runs them all in one `BEGIN IMMEDIATE` transaction, each
//! inside its own savepoint so that one refused operation (a fenced append)
//! does not undo the others. One fsync thus serves many sessions. Across
//! processes, SQLite's write lock serialises the transactions, and the epoch
//! check runs inside the same transaction as the insert, so a stale owner can
//! never write after a newer owner has claimed the session.
//!
//! Events are written twice, and that is what keeps disk writes small. A
//! commit writes whole 4 KiB pages: with events keyed by (session, seq), a
//! group commit of 40 messages to 40 chats touched 40 leaf pages (and as
//! many of a `client_msg_id` index), 23–28 KB written per 100-byte message
//! once the checkpoint copied them back. So a message goes first to one of
//! the `recent_N` tables (`PARTITIONS` of them, by chat), in arrival order, whose
//! rows of one commit share their pages; the tables move to `events` one
//! at a time in sorted inserts, and a claim moves its chat's table first,
//! so each chat's rows of an interval fill its pages together (3.5–5.8 KB
//! written per message, `confab-bench --scenario cluster`). Reads that are
//! not claims take both tables; deleting a session finds its rows in
//! `recent_N` by the ids its writer kept. Uniqueness of (session,
//! seq) is checked against the writer's memory of each session's last seq
//! (kept per epoch, so a claim elsewhere invalidates it); a `client_msg_id`
//! counts once on reading, as in the Cassandra store, and the owner
//! instance refuses a reused one before it gets here.

use super::{
    Append, ContactStore, FinalTranscript, InstanceRegistry, Registration, SessionRecord,
    SessionStore, StoreError, StoreResult,
};
use crate::config::Synchronous;
use crate::session::{Event, EventKind, Role, SessionState};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    session_id     TEXT PRIMARY KEY,
    intx           TEXT NOT NULL,
    owner_instance TEXT NOT NULL,
    epoch          INTEGER NOT NULL,
    state          TEXT NOT NULL,
    subject        TEXT,
    created_at     INTEGER NOT NULL,
    nickname       TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, created_at);
CREATE TABLE IF NOT EXISTS final_transcripts (
    session_id TEXT PRIMARY KEY,
    intx       TEXT NOT NULL,
    closed_at  INTEGER NOT NULL,
    transcript TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS instances (
    instance_id  TEXT PRIMARY KEY,
    url          TEXT NOT NULL,
    enabled      INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The tables of an events file (and of the shared file, where a version
/// before the per-instance files kept every chat's events), beside
/// `events` and the `recent_N` tables.
const EVENTS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS recent_moves (
    one        INTEGER PRIMARY KEY CHECK (one = 1),
    steps      INTEGER NOT NULL,
    moved_upto INTEGER NOT NULL
);
INSERT OR IGNORE INTO recent_moves VALUES (1, 0, 0);
";

/// `recent` is split into this many tables by a hash of the session id,
/// moved one at a time. A move's cost grows with the chats it touches (a
/// page each): one move of every chat's rows held the lock for ~100 ms
/// with 1,000 chats, which showed as a p99 of 100 ms at 5,000 msgs/s
/// offered (16 ms before). Each table gathers its rows over the last
/// `flush_rows` appends, so a chat's rows still fill its pages together.
/// The price: a commit rewrites up to this many tail pages instead of one.
const PARTITIONS: usize = 4;

/// One table of `recent` (`recent_0` …) and its statements.
struct Partition {
    create: String,
    insert: String,
    last_seq: String,
    delete_row: String,
    delete_session: String,
    /// Every row, with its session id (a batch of claims reads the table
    /// once).
    scan: String,
    /// Every row, sorted by session and seq, into `events`, then none
    /// left.
    move_all: [String; 2],
}

/// An event row's columns with their types, in `events` and in `recent_N`.
const EVENT_COLUMN_TYPES: &str = "
    session_id     TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    participant_id TEXT,
    nickname       TEXT,
    text           TEXT,
    reason         TEXT,
    role           TEXT,
    client_msg_id  TEXT,
    at             INTEGER NOT NULL";

/// The columns of an event row, in `events` and in `recent_N`.
const EVENT_COLUMNS: &str =
    "session_id, seq, kind, participant_id, nickname, text, reason, role, client_msg_id, at";
/// The columns `select_events` reads.
const READ_COLUMNS: &str =
    "seq, kind, participant_id, nickname, text, reason, role, client_msg_id, at";

fn partitions() -> &'static [Partition] {
    static PARTS: std::sync::LazyLock<Vec<Partition>> = std::sync::LazyLock::new(|| {
        (0..PARTITIONS)
            .map(|n| {
                let t = format!("recent_{n}");
                Partition {
                    create: format!(
                        "CREATE TABLE IF NOT EXISTS {t} (
                            id INTEGER PRIMARY KEY, {EVENT_COLUMN_TYPES})"
                    ),
                    insert: format!(
                        "INSERT INTO {t} ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                    ),
                    last_seq: format!(
                        "SELECT max(coalesce((SELECT max(seq) FROM events WHERE session_id = ?1), 0),
                                    coalesce((SELECT max(seq) FROM {t} WHERE session_id = ?1), 0))"
                    ),
                    delete_row: format!("DELETE FROM {t} WHERE id = ?1 AND session_id = ?2"),
                    delete_session: format!("DELETE FROM {t} WHERE session_id = ?1"),
                    scan: format!("SELECT session_id, {READ_COLUMNS} FROM {t}"),
                    move_all: [
                        format!(
                            "INSERT OR IGNORE INTO events ({EVENT_COLUMNS})
                             SELECT {EVENT_COLUMNS} FROM {t} ORDER BY session_id, seq, id"
                        ),
                        format!("DELETE FROM {t}"),
                    ],
                }
            })
            .collect()
    });
    &PARTS
}

/// The table of `recent` a session's rows go to: FNV-1a of its id, the
/// same in every process.
fn partition_of(session_id: &str) -> usize {
    let hash = session_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % PARTITIONS as u64) as usize
}

/// Move one table of `recent` into `events`.
fn move_partition(conn: &Connection, n: usize) -> rusqlite::Result<()> {
    for sql in &partitions()[n].move_all {
        conn.prepare_cached(sql)?.execute([])?;
    }
    Ok(())
}

/// Columns added since the first version of `SCHEMA`: (table, column,
/// type). A file created by an older version gets them at open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("sessions", "nickname", "TEXT"),
    ("sessions", "events_file", "TEXT"),
    ("sessions", "claimed_epoch", "INTEGER"),
];

/// Keeps instances of a version before the events files from claiming a
/// chat that lives in one: such an instance would read the chat's events
/// from the shared file, find none of them, and restore it with its
/// transcript lost. It claims with the same `UPDATE` as this version but
/// knows nothing of `claimed_epoch`, which this version sets to the new
/// epoch in the same statement; the trigger lives in the file, so the old
/// code runs it too. Its claim fails (restoration failed), and the
/// gateway restores the chat on an upgraded instance: instances of one
/// host's file can be upgraded one at a time (N+1).
const OLDER_VERSIONS_GATE: &str = "
CREATE TRIGGER IF NOT EXISTS claims_of_an_older_version
BEFORE UPDATE OF epoch ON sessions
WHEN OLD.events_file IS NOT NULL AND NEW.claimed_epoch IS NOT NEW.epoch
BEGIN
    SELECT RAISE(ABORT, 'this chat is stored in an events file by a newer version of confab: upgrade this instance');
END;
";

/// How often the WAL is copied back into the database file. Each
/// checkpoint writes the pages changed since the last one, and the tail
/// pages of `recent` change with every commit: checkpoints every 10 ms
/// while saves kept coming wrote them again a hundred times a second
/// (3.1 → 2.9 KB written per message at 200 ms with one instance, 4.7 →
/// 4.2 KB with three, `confab-bench --scenario cluster`).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// WAL size that triggers a checkpoint (SQLite's own default is ~4 MB).
const CHECKPOINT_WAL_BYTES: u64 = 4 * 1024 * 1024;

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

fn open(path: &Path, options: SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    tune(conn, options)
}

/// The page size of a new events file. SQLite writes whole pages, and a
/// group commit writes the tail page of each `recent_N` table it appends
/// to (and, when one fills, the pages that allocate the next): with 4 KiB
/// pages that was most of a message's disk writes. Measured with
/// `confab-bench --scenario cluster`: 2.8 → 2.0–2.3 KB written per
/// message with one instance, 4.1 → 3.1–3.4 KB with three; 2 KiB pages
/// wrote about as much, 512-byte pages more (2.4 / 3.7 KB: more page
/// splits) and doubled the p99.
const EVENTS_PAGE_SIZE: i64 = 1024;

/// The name of the thread that copies the WAL back into the events file
/// (the benchmark reports its disk writes apart).
pub const CHECKPOINT_THREAD: &str = "sqlite-checkpoint";

/// Open (creating if needed) an instance's own events file. The page size
/// applies to a new file only (it must be set before the switch to WAL,
/// which writes the file's header): a file created by an earlier version
/// keeps its 4 KiB pages.
fn open_events(path: &Path, options: SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "page_size", EVENTS_PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    tune(conn, options)
}

/// A connection to another instance's events file, which must exist: a
/// missing one is an error, not a new empty file.
fn open_existing(path: &Path, options: SqliteOptions) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    tune(Connection::open_with_flags(path, flags)?, options)
}

fn tune(conn: Connection, options: SqliteOptions) -> rusqlite::Result<Connection> {
    conn.busy_timeout(options.busy_timeout)?;
    conn.pragma_update(None, "synchronous", options.synchronous.pragma())?;
    // Keep the hot part of the file in memory: lookups of the session row
    // on every append otherwise read pages back from the OS.
    conn.pragma_update(None, "cache_size", -65536)?;
    // The move from `recent` sorts its rows: in memory, not in a file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
    )
}

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut st = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = st.query_map([], |r| r.get::<_, String>("name"))?;
    for name in names {
        if name? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Create the tables, and add to those of a file made by an older version
/// the columns it lacks. Run under [`retry_busy`]: instances that open one
/// file together may all find a column missing; the first adds it, the
/// others' `ALTER TABLE` then fails ("duplicate column name") and the
/// column is found on looking again.
fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    create_events_schema(conn)?;
    for (table, column, ty) in ADDED_COLUMNS {
        if has_column(conn, table, column)? {
            continue;
        }
        match conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}")) {
            Ok(()) => {}
            Err(e) if !is_busy(&e) && has_column(conn, table, column)? => {}
            Err(e) => return Err(e),
        }
    }
    conn.execute_batch(OLDER_VERSIONS_GATE)
}

/// The tables of an events file.
fn create_events_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(EVENTS_SCHEMA)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS events ({EVENT_COLUMN_TYPES},
            PRIMARY KEY (session_id, seq)) WITHOUT ROWID;
         DROP INDEX IF EXISTS events_client_msg_id;"
    ))?;
    for partition in partitions() {
        conn.execute_batch(&partition.create)?;
    }
    Ok(())
}

/// The file that holds the events of the chats whose transcripts
/// `file_id` (an instance's id) writes, beside the shared file:
/// `confab.db` → `confab.db.events-inst-1`. Bytes other than ASCII
/// letters, digits, `-` and `_` are written `%XX`, so two ids never share
/// a file.
pub fn events_path(shared: &Path, file_id: &str) -> PathBuf {
    let mut name = shared
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".events-");
    for b in file_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(char::from(b).to_string());
        } else {
            name.push(format!("%{b:02X}"));
        }
    }
    shared.with_file_name(name)
}

/// Connections to the events files one thread reads: other instances'
/// (a claim reads a chat where it lives) and the shared file, where a
/// chat stored by a version before the per-instance files (no
/// `events_file`) still has its events.
struct EventFiles {
    shared: PathBuf,
    options: SqliteOptions,
    open: HashMap<Option<String>, Connection>,
    /// Per other instance's file: its `recent_N` rows, as the last claim
    /// from it read them.
    recent: HashMap<String, RecentRows>,
}

/// The `recent_N` rows of another instance's events file, by chat, kept
/// while that file's `data_version` holds (nothing committed to it since:
/// its instance is dead, or saved nothing). A dead instance's chats are
/// claimed over many batches, and each batch scanned the tables again: 18 %
/// of the claimant's CPU, restoring 10,000 chats. The rows are read whole
/// (every table, every row decoded) only when a claim finds the file at
/// the version the claim before it saw: a file that changes between
/// batches (a live instance's, drained) is scanned for the claimed chats
/// only, as before.
struct RecentRows {
    /// The file's `data_version` when last read.
    version: i64,
    /// Every row, by chat; None: not read whole at `version`.
    by_chat: Option<HashMap<String, Vec<Event>>>,
    used: std::time::Instant,
}

impl RecentRows {
    /// Kept this long after their last use, then dropped.
    const KEEP: Duration = Duration::from_secs(10);

    fn read_all(conn: &Connection) -> rusqlite::Result<HashMap<String, Vec<Event>>> {
        let mut by_chat = HashMap::new();
        scan_recent(conn, 0..PARTITIONS, &mut by_chat, true)?;
        Ok(by_chat)
    }
}

/// The rows of the `recent_N` tables `tables` into `out`, by chat: every
/// chat's (`every`), or only those of the chats `out` holds already (the
/// others' rows are not decoded).
fn scan_recent(
    conn: &Connection,
    tables: impl IntoIterator<Item = usize>,
    out: &mut HashMap<String, Vec<Event>>,
    every: bool,
) -> rusqlite::Result<()> {
    for n in tables {
        let mut st = conn.prepare_cached(&partitions()[n].scan)?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let events = if every {
                Some(out.entry(id).or_default())
            } else {
                out.get_mut(&id)
            };
            if let Some(events) = events {
                events.push(event_from_row(r, 1)?);
            }
        }
    }
    Ok(())
}

impl EventFiles {
    fn new(shared: &Path, options: SqliteOptions) -> Self {
        EventFiles {
            shared: shared.to_owned(),
            options,
            open: HashMap::new(),
            recent: HashMap::new(),
        }
    }

    /// The events of `ids` in another instance's file (None: the shared
    /// file), by chat.
    fn events_of(
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
    fn expire(&mut self) {
        if !self.recent.is_empty() {
            self.recent
                .retain(|_, r| r.used.elapsed() < RecentRows::KEEP);
        }
    }

    fn get(&mut self, file_id: Option<&str>) -> rusqlite::Result<&Connection> {
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
fn sweep(conn: &mut Connection, shared: &Path, file_id: &str) -> rusqlite::Result<usize> {
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

/// `f` again while SQLite answers busy or locked, until `deadline`.
fn retry_busy<T>(
    deadline: std::time::Instant,
    mut f: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    loop {
        match f() {
            Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

enum WriteOp {
    Create(SessionRecord, Vec<Event>),
    Append(Append),
    Claim { session_id: String, owner: String },
    Delete { session_id: String, epoch: u64 },
}

enum WriteOutput {
    Done,
    Claimed(Box<(SessionRecord, Vec<Event>)>),
}

type Reply = oneshot::Sender<StoreResult<WriteOutput>>;

/// The SQLite session store.
pub struct SqliteStore {
    path: PathBuf,
    file_id: String,
    /// Chats released by the instance, for the writer to delete.
    gone: Arc<Mutex<std::collections::HashSet<String>>>,
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
        let max_batch = options.max_batch.max(1);
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
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let alive = tx.downgrade();
        let wal = PathBuf::from(format!("{}-wal", own.display()));
        let wal_limit = options.wal_limit_bytes.max(0) as u64;
        let checkpoint_bytes = CHECKPOINT_WAL_BYTES.min(wal_limit / 4);
        let writer_wal = wal.clone();
        std::thread::Builder::new()
            .name(CHECKPOINT_THREAD.into())
            .spawn(move || {
                while alive.upgrade().is_some() {
                    // Only when the WAL has grown: a checkpoint holds locks
                    // that other instances' writers may wait on (for the
                    // busy timeout, if this process is frozen meanwhile).
                    // Above the limit the writer finishes the checkpoint;
                    // ours would only hold the lock it needs.
                    let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                    if (checkpoint_bytes..=wal_limit).contains(&size) {
                        let _ = checkpoint(&checkpointer);
                    }
                    std::thread::sleep(CHECKPOINT_INTERVAL);
                }
            })
            .map_err(unavailable)?;
        let (shared_path, writer_file_id) = (path.to_owned(), file_id.to_owned());
        let gone = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let writer_gone = gone.clone();
        // Registered now: shown (all buckets 0) before the first commit.
        let group_sizes =
            metrics::histogram!(crate::telemetry::metrics::STORE_GROUP_COMMIT_OPERATIONS);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let writer = Writer {
                    conn,
                    shared,
                    files: EventFiles::new(&shared_path, options),
                    file_id: writer_file_id,
                    unsaved_states: HashMap::new(),
                    known: KnownHeaders::default(),
                    tails: HashMap::new(),
                    pending: HashMap::new(),
                    steps_seen: 0,
                    appended: 0,
                    gone: writer_gone,
                    group_sizes,
                    flush_rows: options.flush_rows.max(1),
                    busy_timeout: options.busy_timeout,
                };
                writer_loop(writer, rx, max_batch, &writer_wal, wal_limit)
            })
            .map_err(unavailable)?;
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

/// The writer thread's state: its connection, and what it knows of the
/// sessions it writes.
struct Writer {
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
    gone: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Operations per group commit (`confab_store_group_commit_operations`).
    group_sizes: metrics::Histogram,
    flush_rows: usize,
    busy_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    epoch: u64,
    last_seq: u64,
    /// Whether `pending` holds every row of the session in `recent`: the
    /// session was created or claimed by this writer (a claim moves what
    /// `recent` held first).
    tracked: bool,
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

thread_local! {
    /// How long the writer waits for another process's write lock.
    static BUSY_TIMEOUT: Cell<Duration> = const { Cell::new(Duration::from_secs(5)) };
    /// When the current wait for the lock began.
    static BUSY_SINCE: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
    /// Whether this thread had to wait for the lock since it last looked.
    static CONTENDED: Cell<bool> = const { Cell::new(false) };
}

/// Poll interval while another process holds the write lock, and the
/// pause a writer that found the lock contended leaves before taking it
/// again.
const HAND_OFF: Duration = Duration::from_micros(100);

/// The writer's busy handler. SQLite's own sleeps 1, 2, 5, 10 … up to 100
/// ms between tries, while a group commit holds the lock for a millisecond
/// or two: three processes on one file spent most of their time asleep
/// beside a free lock (throughput fell 2.4× from one instance to three).
/// This one tries again every 100 µs, until the busy timeout.
fn busy_wait(count: i32) -> bool {
    let now = std::time::Instant::now();
    let since = match BUSY_SINCE.with(Cell::get) {
        Some(since) if count > 0 => since,
        _ => {
            BUSY_SINCE.with(|s| s.set(Some(now)));
            CONTENDED.with(|c| c.set(true));
            now
        }
    };
    if now.duration_since(since) >= BUSY_TIMEOUT.with(Cell::get) {
        return false;
    }
    std::thread::sleep(HAND_OFF);
    true
}

/// A passive checkpoint: copy back what no reader still needs. The
/// number of frames in the WAL.
fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

impl Writer {
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

/// A session's header in the shared file, and which events file holds its
/// events (None: the shared file itself, for a chat stored by a version
/// before the per-instance files).
struct Header {
    record: SessionRecord,
    events_file: Option<String>,
}

impl Header {
    fn is_in(&self, file_id: &str) -> bool {
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
struct KnownHeaders {
    /// The shared file's `data_version` when `headers` were read.
    version: Option<i64>,
    /// By session id; None: no such session.
    headers: HashMap<String, Option<Header>>,
}

impl KnownHeaders {
    /// Most headers kept: a writer with more chats reads some again.
    const MAX: usize = 100_000;

    /// Whether the headers still hold in `tx`'s view of the shared file;
    /// if not, they are dropped and the version is `tx`'s.
    fn is_current(&mut self, tx: &Connection) -> rusqlite::Result<bool> {
        let version = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.version == Some(version) {
            return Ok(true);
        }
        self.headers.clear();
        self.version = Some(version);
        Ok(false)
    }

    /// Read, in one read transaction, the headers of `ids` not known.
    fn refresh<'a>(
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
    fn forget(&mut self) {
        self.version = None;
        self.headers.clear();
    }
}

fn select_header(conn: &Connection, session_id: &str) -> rusqlite::Result<Option<Header>> {
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
fn check_owner(
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

/// What an operation of step 3 needs besides its own file.
struct Context<'a> {
    shared: &'a Connection,
    file_id: &'a str,
    /// A claim's or a delete's header, as step 1 left it.
    header: Option<&'a Header>,
    /// Appends' headers, as read before this transaction.
    known: &'a HashMap<String, Option<Header>>,
    /// A claim's events, as step 2 read them.
    copy: Option<&'a Vec<Event>>,
    /// Set by an append whose state differs from the header's.
    changes_state: Cell<bool>,
}

/// The tails the writer knew before this batch, and what the batch has
/// learned so far (an epoch of 0: the session is gone).
struct Tails<'a> {
    known: &'a HashMap<String, Tail>,
    learned: &'a mut HashMap<String, Tail>,
    pending: &'a mut HashMap<String, Vec<i64>>,
}

impl Tails<'_> {
    /// What this writer knows of `session_id` at `epoch` (the current
    /// one), or, the first time, what the tables say.
    fn tail(&self, conn: &Connection, session_id: &str, epoch: u64) -> StoreResult<Tail> {
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

    fn forget(&mut self, session_id: &str) {
        self.pending.remove(session_id);
        let gone = Tail {
            epoch: 0,
            last_seq: 0,
            tracked: false,
        };
        self.learn(session_id, gone);
    }

    /// Where this writer keeps the ids of `session_id`'s rows in `recent`.
    fn rows(&mut self, session_id: &str) -> &mut Vec<i64> {
        self.pending.entry(session_id.to_owned()).or_default()
    }
}

fn apply(
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

/// One event row, by a statement whose parameters are [`EVENT_COLUMNS`].
fn insert_row(
    st: &mut rusqlite::CachedStatement<'_>,
    session_id: &str,
    e: &Event,
) -> rusqlite::Result<usize> {
    st.execute(params![
        session_id,
        e.seq as i64,
        e.kind.as_str(),
        e.participant_id,
        e.nickname,
        e.text,
        e.reason,
        e.role.map(Role::as_str),
        e.client_msg_id,
        e.at_ms
    ])
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

fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
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
const SESSION_COLUMNS: &str =
    "session_id, intx, owner_instance, epoch, state, subject, created_at, nickname";

/// An event from [`READ_COLUMNS`], starting at column `at`.
fn event_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Event> {
    let kind: String = r.get(at + 1)?;
    let role: Option<String> = r.get(at + 6)?;
    Ok(Event {
        seq: r.get::<_, i64>(at)? as u64,
        kind: EventKind::parse(&kind).unwrap_or(EventKind::Notice),
        participant_id: r.get(at + 2)?,
        nickname: r.get(at + 3)?,
        text: r.get(at + 4)?,
        reason: r.get(at + 5)?,
        role: role.as_deref().and_then(Role::parse),
        client_msg_id: r.get(at + 7)?,
        at_ms: r.get(at + 8)?,
    })
}

/// The events of `ids` in the file of `conn`, by chat, in seq order (a
/// seq or a `client_msg_id` counts once), in one read transaction: from
/// `events` by key, and from `recent_N` by one scan of each table they use,
/// not one per chat (a restoration of 10,000 chats from a dead instance's
/// file scanned its table 10,000 times: 3.97 s), or from the rows kept of
/// them (`recent`: another instance's file, whose rows this thread keeps
/// by file id).
fn select_events_of(
    conn: &Connection,
    ids: &[&str],
    recent: Option<(&str, &mut HashMap<String, RecentRows>)>,
) -> rusqlite::Result<HashMap<String, Vec<Event>>> {
    conn.execute_batch("BEGIN")?;
    let read = (|| {
        // First in the transaction: the version of the snapshot read.
        let recent = match recent {
            Some((file_id, kept)) => {
                let version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
                Some((file_id, kept, version))
            }
            None => None,
        };
        let mut out: HashMap<String, Vec<Event>> = ids
            .iter()
            .map(|id| ((*id).to_owned(), Vec::new()))
            .collect();
        static FROM_EVENTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {READ_COLUMNS} FROM events WHERE session_id = ?1 ORDER BY seq")
        });
        let mut st = conn.prepare_cached(&FROM_EVENTS)?;
        for (id, events) in out.iter_mut() {
            let rows = st.query_map(params![id], |r| event_from_row(r, 0))?;
            for row in rows {
                events.push(row?);
            }
        }
        // Unchanged since the last claim from it: its rows, read whole
        // once.
        let whole = match recent {
            Some((file_id, kept, version)) => match kept.entry(file_id.to_owned()) {
                Entry::Occupied(e) if e.get().version == version => {
                    let kept = e.into_mut();
                    kept.used = std::time::Instant::now();
                    if kept.by_chat.is_none() {
                        kept.by_chat = Some(RecentRows::read_all(conn)?);
                    }
                    kept.by_chat.as_ref()
                }
                entry => {
                    entry.insert_entry(RecentRows {
                        version,
                        by_chat: None,
                        used: std::time::Instant::now(),
                    });
                    None
                }
            },
            None => None,
        };
        match whole {
            Some(by_chat) => {
                for (id, events) in out.iter_mut() {
                    events.extend(by_chat.get(id).into_iter().flatten().cloned());
                }
            }
            None => {
                let mut tables: Vec<usize> = ids.iter().map(|id| partition_of(id)).collect();
                tables.sort_unstable();
                tables.dedup();
                scan_recent(conn, tables, &mut out, false)?;
            }
        }
        for events in out.values_mut() {
            // Stable: a seq in both tables keeps its `events` row.
            events.sort_by_key(|e| e.seq);
            events.dedup_by_key(|e| e.seq);
            *events = super::first_of_each_client_msg_id(std::mem::take(events));
        }
        Ok(out)
    })();
    conn.execute_batch("COMMIT")?;
    read
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

/// Final transcripts in SQLite (by default the session store's own file).
pub struct SqliteContactStore {
    conn: Arc<Mutex<Connection>>,
    busy_timeout: Duration,
}

/// A connection of its own to the session store's file (or another), for
/// the small tables off the message path: final transcripts, the
/// instances' registry.
fn open_side(path: &Path, options: SqliteOptions) -> StoreResult<Arc<Mutex<Connection>>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("confab-sqlite-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("confab.db")
    }

    /// Two instances' stores, `a` and `c`, on a new file, and a chat of
    /// `a`'s holding one message ("one").
    struct TwoInstances {
        path: PathBuf,
        options: SqliteOptions,
        a: SqliteStore,
        c: SqliteStore,
        chat: SessionRecord,
    }

    impl TwoInstances {
        async fn new(name: &str, busy_timeout: Duration) -> Self {
            use crate::store::suite::{message, new_record};
            let path = temp_db(name);
            let options = SqliteOptions {
                busy_timeout,
                ..SqliteOptions::default()
            };
            let a = SqliteStore::open(&path, "a", options).unwrap();
            let c = SqliteStore::open(&path, "c", options).unwrap();
            let chat = new_record("inst-a");
            a.create_session(chat.clone(), vec![message(1, "one", Some("m1"))])
                .await
                .unwrap();
            TwoInstances {
                path,
                options,
                a,
                c,
                chat,
            }
        }
    }

    /// Appends are checked against headers read once per batch, trusted
    /// while the shared file's `data_version` holds: that must change with
    /// a commit by any other connection, and the headers read again then.
    #[test]
    fn known_headers_go_stale_when_another_connection_commits() {
        let path = temp_db("known-headers");
        let options = SqliteOptions::default();
        let mut mine = open(&path, options).unwrap();
        create_schema(&mine).unwrap();
        let other = open(&path, options).unwrap();
        let insert = format!(
            "INSERT INTO sessions ({SESSION_COLUMNS}, events_file) VALUES ('s', 'i', 'a', 1, 'open', '', 0, '', 'a')"
        );
        other.execute_batch(&insert).unwrap();
        let mut known = KnownHeaders::default();
        known.refresh(&mut mine, ["s"].into_iter()).unwrap();
        assert_eq!(known.headers["s"].as_ref().unwrap().record.epoch, 1);
        assert!(known.is_current(&mine).unwrap(), "nothing committed since");
        // A claim elsewhere.
        other
            .execute_batch("UPDATE sessions SET epoch = 2, owner_instance = 'b', claimed_epoch = 2")
            .unwrap();
        assert!(
            !known.is_current(&mine).unwrap(),
            "a commit by another connection"
        );
        assert!(known.headers.is_empty());
        known.refresh(&mut mine, ["s"].into_iter()).unwrap();
        assert_eq!(known.headers["s"].as_ref().unwrap().record.epoch, 2);
        assert!(known.is_current(&mine).unwrap());
    }

    /// Instances started together (`confab up`) open the same new file at
    /// once: every one of them must get the store ("database is locked"
    /// stopped one in a loaded test run).
    #[tokio::test]
    async fn stores_opened_together_on_a_new_file_all_open() {
        for round in 0..20 {
            let path = temp_db(&format!("together-{round}"));
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|i| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let options = SqliteOptions::default();
                        SqliteStore::open(&path, &format!("inst-{i}"), options)?;
                        SqliteContactStore::open(&path, options).map(|_| ())
                    })
                })
                .collect();
            for opener in openers {
                let result = opener.join().unwrap();
                assert!(result.is_ok(), "round {round}: {:?}", result.err());
            }
        }
    }

    /// A file made by a version without `sessions.nickname` is upgraded at
    /// open, also by instances that open it at once (one adds the column,
    /// the others find it); its sessions read back without a nickname, and
    /// an older version's insert (without the column) still works.
    #[tokio::test]
    async fn a_file_of_an_older_version_gets_the_new_columns_at_open() {
        let old_schema = SCHEMA.replace(",\n    nickname       TEXT\n", "\n");
        assert_ne!(old_schema, SCHEMA, "the old schema lacks the column");
        let old_insert = "INSERT INTO sessions (session_id, intx, owner_instance, epoch, state, subject, created_at)
                          VALUES (?1, 'intx', 'inst-old', 1, 'waiting', NULL, ?2)";
        for round in 0..20 {
            let path = temp_db(&format!("upgrade-{round}"));
            {
                let conn = open(&path, SqliteOptions::default()).unwrap();
                conn.execute_batch(&old_schema).unwrap();
                assert!(!has_column(&conn, "sessions", "nickname").unwrap());
                conn.execute(old_insert, params!["old-1", 1]).unwrap();
            }
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|i| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let options = SqliteOptions::default();
                        if i % 2 == 0 {
                            SqliteStore::open(&path, &format!("inst-{i}"), options).map(|_| ())
                        } else {
                            SqliteContactStore::open(&path, options).map(|_| ())
                        }
                    })
                })
                .collect();
            for opener in openers {
                let result = opener.join().unwrap();
                assert!(result.is_ok(), "round {round}: {:?}", result.err());
            }
            let store = SqliteStore::open(&path, "inst-new", SqliteOptions::default()).unwrap();
            let old = store.locate("old-1").await.unwrap().expect("kept");
            assert_eq!(
                (old.owner_instance.as_str(), old.nickname),
                ("inst-old", None)
            );
            // An instance of the older version, still running, inserts.
            store
                .read(move |c| c.execute(old_insert, params!["old-2", 2]))
                .await
                .unwrap();
            assert_eq!(store.locate("old-2").await.unwrap().unwrap().nickname, None);
            let record = crate::store::suite::new_record("inst-new");
            store.create_session(record.clone(), vec![]).await.unwrap();
            let waiting = store
                .list_sessions(Some(SessionState::Waiting), crate::store::Order::Oldest, 10)
                .await
                .unwrap();
            let nicknames: Vec<_> = waiting
                .iter()
                .map(|r| (r.session_id.as_str(), r.nickname.as_deref()))
                .collect();
            assert_eq!(
                nicknames,
                [
                    ("old-1", None),
                    ("old-2", None),
                    (record.session_id.as_str(), record.nickname.as_deref())
                ]
            );
        }
    }

    #[tokio::test]
    async fn sqlite_passes_the_store_suite() {
        let path = temp_db("suite");
        // Rows move from `recent` to `events` every third row: the suite's
        // reads and claims meet both tables, in every mix.
        let options = SqliteOptions {
            max_batch: 64,
            flush_rows: 3,
            ..SqliteOptions::default()
        };
        let open = |id| SqliteStore::open(&path, id, options).unwrap();
        crate::store::suite::run_all(&open("a"), &open("b")).await;
        let contacts = SqliteContactStore::open(&path, options).unwrap();
        crate::store::suite::contact_store(&contacts).await;
        crate::store::suite::registry(&SqliteRegistry::open(&path, options).unwrap()).await;
    }

    /// Two writers append to their chats as fast as they can while a
    /// third takes over the first one's chats one after the other, with
    /// rows moving between the tables all the while. Each claim sees
    /// every append acknowledged before it, once and in order; every
    /// append after it is fenced. A refused append may show up, once: the
    /// one whose owner committed it in its own file before the claim read
    /// that file, and found the epoch bumped just after (refused, because
    /// the owner cannot tell that from a commit the claim did not see).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_during_full_speed_appends_see_every_acknowledged_event() {
        use crate::store::suite::{append, message, new_record};
        let path = temp_db("claims-under-load");
        let options = SqliteOptions {
            synchronous: Synchronous::Normal,
            flush_rows: 50,
            ..SqliteOptions::default()
        };
        let [a, b, c] =
            ["a", "b", "c"].map(|id| Arc::new(SqliteStore::open(&path, id, options).unwrap()));
        let mut chats = Vec::new();
        for store in [&a, &b] {
            for _ in 0..20 {
                let record = new_record("writer");
                store.create_session(record.clone(), vec![]).await.unwrap();
                chats.push((store.clone(), record));
            }
        }
        // Per chat: the seqs acknowledged, until the first refusal.
        let writers: Vec<_> = chats
            .iter()
            .map(|(store, record)| {
                let (store, record) = (store.clone(), record.clone());
                tokio::spawn(async move {
                    let mut acknowledged = vec![];
                    for seq in 2..400u64 {
                        let event = message(seq, &format!("m{seq}"), Some(&format!("c{seq}")));
                        match store.append_events(append(&record, 1, vec![event])).await {
                            Ok(()) => acknowledged.push(seq),
                            Err(StoreError::Fenced { .. }) => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    (record.session_id, acknowledged)
                })
            })
            .collect();
        let mut claimed = HashMap::new();
        for (_, record) in chats.iter().take(20) {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let (header, events) = c.claim(&record.session_id, "claimant").await.unwrap();
            assert_eq!(header.epoch, 2);
            claimed.insert(record.session_id.clone(), events);
        }
        let (mut cut_short, mut refused_seen) = (0, 0);
        for writer in writers {
            let (id, acknowledged) = writer.await.unwrap();
            cut_short += usize::from(claimed.contains_key(&id) && acknowledged.len() < 398);
            let (_, stored) = c.load(&id).await.unwrap().unwrap();
            let stored: Vec<u64> = stored.iter().map(|e| e.seq).collect();
            match claimed.get(&id) {
                // Claimed: what the claim read is exactly what was
                // acknowledged before it, and all that is stored.
                Some(events) => {
                    let seen: Vec<u64> = events.iter().map(|e| e.seq).collect();
                    let refused = acknowledged.last().map_or(2, |last| last + 1);
                    let with_refused: Vec<u64> =
                        acknowledged.iter().copied().chain([refused]).collect();
                    assert!(
                        seen == acknowledged || seen == with_refused,
                        "chat {id}: claim saw {seen:?}, acknowledged {acknowledged:?}"
                    );
                    assert_eq!(stored, seen, "chat {id}");
                    refused_seen += usize::from(seen == with_refused);
                }
                None => {
                    assert_eq!(acknowledged, (2..400).collect::<Vec<_>>());
                    assert_eq!(stored, acknowledged, "chat {id}");
                }
            }
        }
        println!(
            "{cut_short} of 20 chats claimed while their owner was writing; \
             {refused_seen} claims saw a refused append"
        );
        assert!(cut_short > 0, "no claim met an owner still writing");
    }

    /// Closing a chat deletes its rows at once, also those still waiting
    /// in `recent` (found by the ids this writer kept). Closed by another
    /// instance, its rows go at the next sweep of the owner's events file
    /// (here, at open).
    #[tokio::test]
    async fn deleting_a_session_removes_its_rows_from_both_tables() {
        use crate::store::suite::{append, message, new_record};
        let path = temp_db("delete");
        let options = SqliteOptions {
            flush_rows: 8,
            ..SqliteOptions::default()
        };
        let (a, b) = (
            SqliteStore::open(&path, "a", options).unwrap(),
            SqliteStore::open(&path, "b", options).unwrap(),
        );
        async fn count(store: &SqliteStore, table: &'static str, id: String) -> StoreResult<i64> {
            let table = match table {
                "recent" => format!("recent_{}", partition_of(&id)),
                other => other.to_owned(),
            };
            let sql = format!("SELECT count(*) FROM {table} WHERE session_id = ?1");
            let conn = open_existing(&store.events_path(), SqliteOptions::default())
                .map_err(unavailable)?;
            conn.query_row(&sql, [id], |r| r.get::<_, i64>(0))
                .map_err(unavailable)
        }
        for deleter in ["owner", "another writer"] {
            let record = new_record("inst-a");
            let other = new_record("inst-a");
            a.create_session(record.clone(), vec![]).await.unwrap();
            a.create_session(other.clone(), vec![]).await.unwrap();
            a.append_events(append(&other, 1, vec![message(1, "kept", None)]))
                .await
                .unwrap();
            // Until some rows have moved to `events` and the last wait in
            // `recent` (a move takes one of its tables every other row).
            let id = record.session_id.clone();
            for seq in 1..=100 {
                let event = message(seq, "x", None);
                a.append_events(append(&record, 1, vec![event]))
                    .await
                    .unwrap();
                // A move runs after a batch's answers are out; the next
                // batch waits for it, and one that appends nothing starts
                // no move.
                let barrier = new_record("barrier");
                a.create_session(barrier, vec![]).await.unwrap();
                if count(&a, "recent", id.clone()).await.unwrap() > 0
                    && count(&a, "events", id.clone()).await.unwrap() > 0
                {
                    break;
                }
            }
            assert!(count(&a, "recent", id.clone()).await.unwrap() > 0);
            assert!(count(&a, "events", id.clone()).await.unwrap() > 0);
            let store = if deleter == "owner" { &a } else { &b };
            store.delete_session(&id, 1).await.unwrap();
            assert_eq!(a.load(&id).await.unwrap(), None, "{deleter}");
            if deleter != "owner" {
                assert!(count(&a, "events", id.clone()).await.unwrap() > 0);
                // The owner's writer sweeps its file at open.
                SqliteStore::open(&path, "a", options).unwrap();
            }
            assert_eq!(
                count(&a, "recent", id.clone()).await.unwrap(),
                0,
                "{deleter}"
            );
            assert_eq!(count(&a, "events", id).await.unwrap(), 0, "{deleter}");
            let (_, kept) = a.load(&other.session_id).await.unwrap().unwrap();
            assert_eq!(kept.len(), 1, "{deleter}: another chat's rows stay");
        }
    }

    /// An instance frozen in the middle of a save holds its events file's
    /// write lock: another instance still takes its chats over, at once
    /// (a claim only reads that file), with every acknowledged event, and
    /// the frozen one's saves are refused from then on. Its rows left
    /// behind go when its writer opens the file again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_takes_a_chat_from_an_instance_frozen_holding_its_file() {
        use crate::store::suite::{append, message};
        let TwoInstances {
            path,
            options,
            a,
            c,
            chat: record,
        } = TwoInstances::new("frozen", Duration::from_millis(200)).await;
        a.append_events(append(&record, 1, vec![message(2, "two", Some("m2"))]))
            .await
            .unwrap();
        // As if `a`'s writer had stopped inside a transaction.
        let frozen = open_existing(&a.events_path(), options).unwrap();
        frozen.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = std::time::Instant::now();
        let (header, events) = c.claim(&record.session_id, "inst-c").await.unwrap();
        let took = started.elapsed();
        assert_eq!(header.epoch, 2);
        let texts: Vec<_> = events
            .iter()
            .map(|e| e.text.clone().unwrap_or_default())
            .collect();
        assert_eq!(texts, ["one", "two"]);
        assert!(
            took < options.busy_timeout,
            "the claim waited {took:?} for the frozen file"
        );
        frozen.execute_batch("ROLLBACK").unwrap();
        let refused = a
            .append_events(append(&record, 1, vec![message(3, "late", Some("m3"))]))
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Fenced { .. }), "{refused}");
        c.append_events(append(&record, 2, vec![message(3, "three", Some("m3"))]))
            .await
            .unwrap();
        let (_, stored) = a.load(&record.session_id).await.unwrap().unwrap();
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[2].text.as_deref(), Some("three"));
        // `a`'s copy of the chat goes when its writer opens the file.
        drop(a);
        let has_rows = || {
            let conn = open_existing(&events_path(&path, "a"), options).unwrap();
            let recent = partition_of(&record.session_id);
            conn.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE session_id = ?1)
                         OR EXISTS (SELECT 1 FROM recent_{recent} WHERE session_id = ?1)"
                ),
                params![record.session_id],
                |r| r.get::<_, bool>(0),
            )
            .unwrap()
        };
        assert!(has_rows(), "no rows left in a's file before its sweep");
        SqliteStore::open(&path, "a", options).unwrap();
        assert!(!has_rows(), "rows left in a's file after its sweep");
    }

    /// Claims keep the `recent_N` rows of the file they read from while
    /// that file is unchanged (read whole at the second claim that finds
    /// it so); a save to it since must be seen by the next claim, whether
    /// the rows were kept whole or not.
    #[tokio::test]
    async fn claims_from_a_file_see_what_was_saved_to_it_since_the_last_claim() {
        use crate::store::suite::{append, message, new_record, texts};
        let TwoInstances { a, c, chat, .. } =
            TwoInstances::new("recent-rows", SqliteOptions::default().busy_timeout).await;
        let mut chats = vec![chat];
        for _ in 0..4 {
            let r = new_record("inst-a");
            a.create_session(r.clone(), vec![message(1, "one", Some("m1"))])
                .await
                .unwrap();
            chats.push(r);
        }
        let claim = |r: &SessionRecord| {
            let (c, id) = (&c, r.session_id.clone());
            async move { c.claim(&id, "inst-c").await.unwrap().1 }
        };
        // Claims one after another with nothing saved between them: the
        // second reads the rows whole, the third uses them.
        for r in &chats[..3] {
            assert_eq!(texts(&claim(r).await), ["one"]);
        }
        // Saved since: the rows kept whole are stale.
        a.append_events(append(&chats[3], 1, vec![message(2, "two", Some("m2"))]))
            .await
            .unwrap();
        assert_eq!(texts(&claim(&chats[3]).await), ["one", "two"]);
        // Saved between two claims that did not read the rows whole.
        a.append_events(append(&chats[4], 1, vec![message(2, "two", Some("m2"))]))
            .await
            .unwrap();
        assert_eq!(texts(&claim(&chats[4]).await), ["one", "two"]);
    }

    /// New events files get small pages; one an earlier version created
    /// keeps its 4 KiB pages (SQLite cannot change them in WAL mode), and
    /// claims read across files of both sizes.
    #[tokio::test]
    async fn a_new_events_file_gets_small_pages_and_an_earlier_one_keeps_its_own() {
        use crate::store::suite::{append, message, new_record, texts};
        let path = temp_db("page-size");
        let page_size = |id: &str| -> i64 {
            let conn = open_existing(&events_path(&path, id), SqliteOptions::default()).unwrap();
            conn.query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        // The file of instance `a`, as an earlier version created it.
        let old = open(&events_path(&path, "a"), SqliteOptions::default()).unwrap();
        create_events_schema(&old).unwrap();
        drop(old);
        let a = SqliteStore::open(&path, "a", SqliteOptions::default()).unwrap();
        let c = SqliteStore::open(&path, "c", SqliteOptions::default()).unwrap();
        assert_eq!((page_size("a"), page_size("c")), (4096, EVENTS_PAGE_SIZE));

        let (from_a, from_c) = (new_record("inst-a"), new_record("inst-c"));
        a.create_session(from_a.clone(), vec![message(1, "a1", Some("a1"))])
            .await
            .unwrap();
        c.create_session(from_c.clone(), vec![message(1, "c1", Some("c1"))])
            .await
            .unwrap();
        // Each claims the other's chat: 4 KiB pages into 1 KiB, and back.
        let (claimed, events) = c.claim(&from_a.session_id, "inst-c").await.unwrap();
        assert_eq!(texts(&events), ["a1"]);
        let more = vec![message(2, "a2", Some("a2"))];
        c.append_events(append(&claimed, claimed.epoch, more))
            .await
            .unwrap();
        let (_, events) = a.claim(&from_c.session_id, "inst-a").await.unwrap();
        assert_eq!(texts(&events), ["c1"]);
        let (_, events) = a.claim(&from_a.session_id, "inst-a").await.unwrap();
        assert_eq!(texts(&events), ["a1", "a2"]);
    }

    /// An instance of a version before the events files, still running
    /// on the file during an N+1 upgrade, claims with this statement. It
    /// must be refused a chat stored in an events file (it would restore
    /// it without its transcript), and still take a chat of its own
    /// layout; this version's claims are unchanged.
    #[tokio::test]
    async fn an_older_version_cannot_claim_a_chat_stored_in_an_events_file() {
        let old_claim = "UPDATE sessions SET epoch = ?2, owner_instance = ?3 WHERE session_id = ?1";
        let TwoInstances {
            path,
            options,
            a,
            c,
            chat: record,
        } = TwoInstances::new("older-claims", SqliteOptions::default().busy_timeout).await;
        let old = open_existing(&path, options).unwrap();
        let refused = old
            .execute(old_claim, params![record.session_id, 2, "inst-old"])
            .unwrap_err();
        assert!(refused.to_string().contains("newer version"), "{refused}");
        let header = a.locate(&record.session_id).await.unwrap().unwrap();
        assert_eq!(
            (header.epoch, header.owner_instance.as_str()),
            (1, "inst-a")
        );
        // Claims of this version go on, from the older one's chats too.
        let (claimed, events) = c.claim(&record.session_id, "inst-c").await.unwrap();
        assert_eq!((claimed.epoch, events.len()), (2, 1));
        old.execute(
            "INSERT INTO sessions (session_id, intx, owner_instance, epoch, state, subject, created_at)
             VALUES ('old-1', 'intx', 'inst-old', 1, 'waiting', NULL, 0)",
            [],
        )
        .unwrap();
        old.execute(old_claim, params!["old-1", 2, "inst-old-2"])
            .unwrap();
        let (claimed, _) = c.claim("old-1", "inst-c").await.unwrap();
        assert_eq!(claimed.epoch, 3);
        let refused = old
            .execute(old_claim, params!["old-1", 4, "inst-old"])
            .unwrap_err();
        assert!(refused.to_string().contains("newer version"), "{refused}");
    }

    /// A state change waits in the writer's memory while another process
    /// holds the shared file's lock; a claim in that window reads the old
    /// state from the header. The restored chat must still have the state
    /// its events reached, the header must get it from the claimant, and
    /// the old owner's late write must not undo it.
    #[tokio::test]
    async fn a_state_change_kept_waiting_for_the_lock_survives_a_claim() {
        use crate::session::{Draft, Participant, Transcript};
        use crate::store::suite::{append, message, new_record};
        let TwoInstances {
            path,
            options,
            a,
            c: b,
            chat: record,
        } = TwoInstances::new("late-state", Duration::from_millis(100)).await;
        let agent = Participant {
            participant_id: "agent".into(),
            nickname: "Bob".into(),
            role: Role::Agent,
        };
        let joined = Draft::joined(&agent, None).into_event(2, crate::session::now_ms());
        let active = Append {
            state: SessionState::Active,
            ..append(&record, 1, vec![joined])
        };
        let holder = open_existing(&path, options).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        a.append_events(active).await.unwrap();
        holder.execute_batch("ROLLBACK").unwrap();
        let (header, events) = b.claim(&record.session_id, "inst-b").await.unwrap();
        assert_eq!(header.state, SessionState::Waiting, "the header is stale");
        let mut restored = Transcript::replay(header.state, events);
        assert_eq!(restored.state, SessionState::Active);
        b.append_events(Append {
            state: restored.state,
            ..append(&record, 2, vec![message(3, "back", Some("m3"))])
        })
        .await
        .unwrap();
        let located = b.locate(&record.session_id).await.unwrap().unwrap();
        assert_eq!(located.state, SessionState::Active, "the claimant's save");
        // The new owner closes the chat; then `a`'s next batch writes the
        // state it kept (active), under the old epoch: it must not reopen it.
        let closed = Draft::closed(crate::session::reason::CUSTOMER_LEFT)
            .into_event(4, crate::session::now_ms());
        restored.push(closed.clone());
        b.append_events(Append {
            state: restored.state,
            ..append(&record, 2, vec![closed])
        })
        .await
        .unwrap();
        let other = new_record("inst-a");
        a.create_session(other, vec![message(1, "x", None)])
            .await
            .unwrap();
        let located = a.locate(&record.session_id).await.unwrap().unwrap();
        assert_eq!((located.epoch, located.state), (2, SessionState::Closed));
    }

    /// Saves without a pause must not grow the WAL without bound: the
    /// side checkpointer alone never catches up with a busy writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_continuous_saves() {
        use crate::store::suite::{append, message, new_record};
        use std::sync::atomic::{AtomicI64, Ordering};
        let path = temp_db("wal");
        let limit = 1024 * 1024;
        let store = Arc::new(
            SqliteStore::open(
                &path,
                "test",
                SqliteOptions {
                    synchronous: Synchronous::Normal,
                    wal_limit_bytes: limit,
                    ..SqliteOptions::default()
                },
            )
            .unwrap(),
        );
        let mut records = Vec::new();
        for _ in 0..200 {
            let record = new_record("test");
            store.create_session(record.clone(), vec![]).await.unwrap();
            records.push(record);
        }
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let largest = Arc::new(AtomicI64::new(0));
        let watching = {
            let (wal, largest) = (wal.clone(), largest.clone());
            tokio::spawn(async move {
                loop {
                    let size = std::fs::metadata(&wal).map(|m| m.len() as i64).unwrap_or(0);
                    largest.fetch_max(size, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        // Each session's messages in order; all sessions at once.
        let writers: Vec<_> = records
            .iter()
            .map(|record| {
                let (store, record) = (store.clone(), record.clone());
                tokio::spawn(async move {
                    for seq in 1..=150u64 {
                        let event = message(seq, &"x".repeat(200), None);
                        store
                            .append_events(append(&record, 1, vec![event]))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        watching.abort();
        // 30,000 saves' worth of pages went through the WAL (over 100 MB);
        // it may overshoot the limit by a few group commits, not by the
        // whole run.
        let largest = largest.load(Ordering::Relaxed);
        assert!(
            largest < 16 * limit,
            "the WAL grew to {largest} bytes with a limit of {limit}"
        );
        println!("largest WAL: {largest} bytes, limit {limit}");
        let (_, events) = store.load(&records[7].session_id).await.unwrap().unwrap();
        assert_eq!(events.len(), 150);
    }
}
