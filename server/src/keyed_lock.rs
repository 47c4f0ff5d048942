//! One task at a time per key: two requests that would restore (or
//! relocate) the same chat at once run one after the other, and the second
//! finds the work done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Mutex;

#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl KeyedLocks {
    /// Run `work` while holding `key`'s lock.
    pub async fn run<T>(&self, key: &str, work: impl Future<Output = T>) -> T {
        let lock = self
            .map
            .lock()
            .await
            .entry(key.to_owned())
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            work.await
        };
        let mut map = self.map.lock().await;
        // Only the map and this task hold it: nobody is waiting.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(key);
        }
        result
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
        assert!(locks.map.lock().await.is_empty());
    }
}
