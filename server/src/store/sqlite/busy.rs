//! Waiting for another process's write lock. SQLite's own busy handler
//! sleeps too long for locks held a millisecond at a time.

use std::cell::Cell;
use std::time::Duration;

pub(super) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
    )
}

/// `f` again while SQLite answers busy or locked, until `deadline`.
pub(super) fn retry_busy<T>(
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

thread_local! {
    /// How long the writer waits for another process's write lock.
    pub(super) static BUSY_TIMEOUT: Cell<Duration> = const { Cell::new(Duration::from_secs(5)) };
    /// When the current wait for the lock began.
    pub(super) static BUSY_SINCE: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
    /// Whether this thread had to wait for the lock since it last looked.
    pub(super) static CONTENDED: Cell<bool> = const { Cell::new(false) };
}

/// Poll interval while another process holds the write lock, and the
/// pause a writer that found the lock contended leaves before taking it
/// again.
pub(super) const HAND_OFF: Duration = Duration::from_micros(100);

/// The writer's busy handler. SQLite's own sleeps 1, 2, 5, 10 … up to 100
/// ms between tries, while a group commit holds the lock for a millisecond
/// or two: three processes on one file spent most of their time asleep
/// beside a free lock (throughput fell 2.4× from one instance to three).
/// This one tries again every 100 µs, until the busy timeout.
pub(super) fn busy_wait(count: i32) -> bool {
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
