//! One task at a time per key: two requests that would restore (or
//! relocate) the same chat at once run one after the other, and the second
//! finds the work done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

type Slot = Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
pub struct KeyedLocks {
    map: Arc<parking_lot::Mutex<HashMap<String, Slot>>>,
}

/// Removes a key's slot when its last user is done, even if the work was
/// cancelled (a dropped request).
struct Release {
    map: Arc<parking_lot::Mutex<HashMap<String, Slot>>>,
    key: String,
    slot: Slot,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        // Only the map and this user hold it: nobody is waiting.
        if Arc::strong_count(&self.slot) <= 2 {
            map.remove(&self.key);
        }
    }
}

impl KeyedLocks {
    /// Run `work` while holding `key`'s lock.
    pub async fn run<T>(&self, key: &str, work: impl Future<Output = T>) -> T {
        let slot = self.map.lock().entry(key.to_owned()).or_default().clone();
        let release = Release {
            map: self.map.clone(),
            key: key.to_owned(),
            slot,
        };
        let _one_at_a_time = release.slot.lock().await;
        work.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn work_on_one_key_never_overlaps_and_the_map_empties() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                tokio::spawn(async move {
                    locks
                        .run("chat", async {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                            tokio::task::yield_now().await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(locks.map.lock().is_empty());
    }
}
