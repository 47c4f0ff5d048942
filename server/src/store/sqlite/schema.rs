//! The files and their tables: the shared file (chats' headers, final
//! transcripts, the instances' registry) and each instance's events
//! file, how they are opened, and how a file of an older version is
//! brought up to this one.

use super::busy::is_busy;
use super::recent::{partitions, EVENT_COLUMN_TYPES};
use super::SqliteOptions;
use rusqlite::Connection;
use std::path::{Path, PathBuf};

pub(super) const SCHEMA: &str = "
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

pub(super) fn open(path: &Path, options: SqliteOptions) -> rusqlite::Result<Connection> {
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
pub(super) const EVENTS_PAGE_SIZE: i64 = 1024;

/// Open (creating if needed) an instance's own events file. The page size
/// applies to a new file only (it must be set before the switch to WAL,
/// which writes the file's header): a file created by an earlier version
/// keeps its 4 KiB pages.
pub(super) fn open_events(path: &Path, options: SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "page_size", EVENTS_PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    tune(conn, options)
}

/// A connection to another instance's events file, which must exist: a
/// missing one is an error, not a new empty file.
pub(super) fn open_existing(path: &Path, options: SqliteOptions) -> rusqlite::Result<Connection> {
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

pub(super) fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
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
pub(super) fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
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
pub(super) fn create_events_schema(conn: &Connection) -> rusqlite::Result<()> {
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
