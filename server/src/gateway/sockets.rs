//! How many WebSockets each participant holds open through this gateway,
//! capped (`gateway.max-sockets-per-participant`): a token is a bearer
//! credential, and without a cap one token could open thousands of sockets,
//! each costing the gateway and the instance memory and descriptors.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct SocketCount {
    open: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One open socket; counted out when dropped.
pub struct Held {
    open: Arc<Mutex<HashMap<String, usize>>>,
    participant: String,
}

impl SocketCount {
    pub fn new(max: usize) -> Self {
        SocketCount {
            open: Default::default(),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Count one more socket for `participant`, unless they hold the
    /// maximum already.
    pub fn hold(&self, participant: &str) -> Option<Held> {
        let mut open = self.open.lock();
        let n = open.entry(participant.to_owned()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Held {
            open: self.open.clone(),
            participant: participant.to_owned(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&self.participant) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.participant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_participant_holds_at_most_max_and_a_closed_socket_frees_its_place() {
        let count = SocketCount::new(2);
        let a = count.hold("p").unwrap();
        let _b = count.hold("p").unwrap();
        assert!(count.hold("p").is_none());
        assert!(count.hold("q").is_some(), "others are not affected");
        drop(a);
        assert!(count.hold("p").is_some());
    }
}
