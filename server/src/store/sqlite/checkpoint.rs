//! Copying the WAL back into the events file, beside the writer rather
//! than inside its commits.

use super::SqliteOptions;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the WAL is copied back into the database file. Each
/// checkpoint writes every page changed since the last one, and the tail
/// pages of `recent`, the internal pages above them, the chats' last
/// pages in `events` and page 1 change again and again in between: the
/// longer the interval, the more of those rewrites one copy serves.
/// Measured with `confab-bench --scenario cluster` (bytes written per
/// message, one instance / three, the checkpoints' part in brackets; two
/// runs each, alternating): 200 ms 2.1 (0.7) / 3.2 (1.0) KB; 1 s 1.8
/// (0.4) / 2.6 (0.4) KB; 3 s (one run) no better. The WAL is no larger for it:
/// under steady saves it grows until the writer finishes a checkpoint at
/// `wal_limit_bytes` whatever the interval, and when saves stop it starts
/// over after the next checkpoint.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// WAL size that triggers a checkpoint (SQLite's own default is ~4 MB).
const CHECKPOINT_WAL_BYTES: u64 = 4 * 1024 * 1024;

/// The name of the thread that copies the WAL back into the events file
/// (the benchmark reports its disk writes apart).
pub const CHECKPOINT_THREAD: &str = "sqlite-checkpoint";

/// A passive checkpoint: copy back what no reader still needs. The
/// number of frames in the WAL.
pub(super) fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

/// The WAL of the file at `path`.
pub(super) fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Start the thread that checkpoints the events file at `path` through
/// `conn`, every [`CHECKPOINT_INTERVAL`] while `alive` says so.
pub(super) fn start(
    conn: Connection,
    path: &Path,
    options: SqliteOptions,
    alive: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<()> {
    let wal = wal_path(path);
    let wal_limit = options.wal_limit();
    let checkpoint_bytes = CHECKPOINT_WAL_BYTES.min(wal_limit / 4);
    std::thread::Builder::new()
        .name(CHECKPOINT_THREAD.into())
        .spawn(move || {
            while alive() {
                // Only when the WAL has grown: a checkpoint holds locks
                // that other instances' writers may wait on (for the
                // busy timeout, if this process is frozen meanwhile).
                // Above the limit the writer finishes the checkpoint;
                // ours would only hold the lock it needs.
                let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                if (checkpoint_bytes..=wal_limit).contains(&size) {
                    let _ = checkpoint(&conn);
                }
                std::thread::sleep(CHECKPOINT_INTERVAL);
            }
        })?;
    Ok(())
}
