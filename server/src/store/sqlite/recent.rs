//! Events written twice, and how a chat's events are read back.
//!
//! SQLite writes whole pages. With events keyed by (chat, seq), a group
//! commit of 40 messages to 40 chats touched 40 leaf pages (and as many of
//! a `client_msg_id` index): 23–28 KB written per 100-byte message once
//! the checkpoint copied them back. So a message goes first to one of the
//! `recent_N` tables ([`PARTITIONS`] of them, by chat), in arrival order,
//! where the rows of one commit share their pages; the tables move to
//! `events` one at a time in sorted inserts, and a claim moves its chat's
//! table first, so each chat's rows of an interval fill its pages
//! together (2.0–3.4 KB written per message with 1 KiB pages,
//! `confab-bench --scenario cluster`; the README's "How a message is
//! kept" has the breakdown). Reads that are not claims take both tables;
//! deleting a chat finds its rows in `recent_N` by the ids its writer
//! kept. Uniqueness of (chat, seq) is checked against the writer's memory
//! of each chat's last seq (kept per epoch, so a claim elsewhere
//! invalidates it); a `client_msg_id` counts once on reading, as in the
//! Cassandra store, and the owner instance refuses a reused one before it
//! gets here.

use crate::session::{Event, EventKind, Role};
use rusqlite::{params, Connection};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Duration;

/// `recent` is split into this many tables by a hash of the session id,
/// moved one at a time. A move's cost grows with the chats it touches (a
/// page each): one move of every chat's rows held the lock for ~100 ms
/// with 1,000 chats, which showed as a p99 of 100 ms at 5,000 msgs/s
/// offered (16 ms before). Each table gathers its rows over the last
/// `flush_rows` appends, so a chat's rows still fill its pages together.
/// The price: a commit rewrites up to this many tail pages instead of one.
pub(super) const PARTITIONS: usize = 4;

/// One table of `recent` (`recent_0` …) and its statements.
pub(super) struct Partition {
    pub(super) create: String,
    pub(super) insert: String,
    pub(super) last_seq: String,
    pub(super) delete_row: String,
    pub(super) delete_session: String,
    /// Every row, with its session id (a batch of claims reads the table
    /// once).
    pub(super) scan: String,
    /// Every row, sorted by session and seq, into `events`, then none
    /// left.
    pub(super) move_all: [String; 2],
}

/// An event row's columns with their types, in `events` and in `recent_N`.
pub(super) const EVENT_COLUMN_TYPES: &str = "
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
pub(super) const EVENT_COLUMNS: &str =
    "session_id, seq, kind, participant_id, nickname, text, reason, role, client_msg_id, at";
/// The columns `select_events` reads.
const READ_COLUMNS: &str =
    "seq, kind, participant_id, nickname, text, reason, role, client_msg_id, at";

pub(super) fn partitions() -> &'static [Partition] {
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
pub(super) fn partition_of(session_id: &str) -> usize {
    let hash = session_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % PARTITIONS as u64) as usize
}

/// Move one table of `recent` into `events`.
pub(super) fn move_partition(conn: &Connection, n: usize) -> rusqlite::Result<()> {
    for sql in &partitions()[n].move_all {
        conn.prepare_cached(sql)?.execute([])?;
    }
    Ok(())
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
pub(super) struct RecentRows {
    /// The file's `data_version` when last read.
    pub(super) version: i64,
    /// Every row, by chat; None: not read whole at `version`.
    pub(super) by_chat: Option<HashMap<String, Vec<Event>>>,
    pub(super) used: std::time::Instant,
}

impl RecentRows {
    /// Kept this long after their last use, then dropped.
    pub(super) const KEEP: Duration = Duration::from_secs(10);

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

/// One event row, by a statement whose parameters are [`EVENT_COLUMNS`].
pub(super) fn insert_row(
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
pub(super) fn select_events_of(
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
            *events = crate::store::first_of_each_client_msg_id(std::mem::take(events));
        }
        Ok(out)
    })();
    conn.execute_batch("COMMIT")?;
    read
}
