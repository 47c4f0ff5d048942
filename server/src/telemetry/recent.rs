//! The last numbered events of this process, kept in memory for the
//! dashboard (`GET /admin/events?after=CURSOR`): a tracing layer that copies
//! every event carrying an `event_id` field into a ring of
//! [`CAPACITY`] entries, each with a cursor that only grows, so that a
//! reader following the cursor sees each event once.

use crate::contract::RecentEvent;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

pub const CAPACITY: usize = 4000;

struct Ring {
    next: u64,
    events: VecDeque<RecentEvent>,
}

static RING: Mutex<Ring> = Mutex::new(Ring {
    next: 1,
    events: VecDeque::new(),
});

/// Events after `cursor`, oldest first, at most `limit`; and the cursor to
/// ask from next time.
pub fn since(cursor: u64, limit: usize) -> (Vec<RecentEvent>, u64) {
    let ring = RING.lock();
    let events: Vec<RecentEvent> = ring
        .events
        .iter()
        .filter(|e| e.cursor > cursor)
        .take(limit)
        .cloned()
        .collect();
    let next = events.last().map(|e| e.cursor).unwrap_or(cursor);
    (events, next)
}

fn push(mut event: RecentEvent) {
    let mut ring = RING.lock();
    event.cursor = ring.next;
    ring.next += 1;
    if ring.events.len() == CAPACITY {
        ring.events.pop_front();
    }
    ring.events.push_back(event);
}

/// The layer; add it to the subscriber.
pub struct RecentEvents;

#[derive(Default)]
struct Fields {
    event_id: Option<u64>,
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "event_id" {
            self.event_id = Some(value);
        } else {
            let _ = write!(self.rest, "{}={value} ", field.name());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "event_id" && value >= 0 {
            self.event_id = Some(value as u64);
        } else {
            let _ = write!(self.rest, "{}={value} ", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            let _ = write!(self.rest, "{}={value} ", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            let _ = write!(self.rest, "{}={value:?} ", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for RecentEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(event_id) = fields.event_id else {
            return;
        };
        push(RecentEvent {
            cursor: 0,
            at_ms: crate::session::now_ms() as u64,
            level: event.metadata().level().to_string(),
            event_id: event_id as u32,
            message: fields.message,
            fields: fields.rest.trim_end().to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn numbered_events_are_kept_in_order_and_followed_by_cursor() {
        let subscriber = tracing_subscriber::registry().with(RecentEvents);
        let before = RING.lock().next - 1;
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not numbered: not kept");
            tracing::warn!(
                event_id = 59520u32,
                store = "cassandra",
                "Cassandra status changed to \"UNAVAILABLE\""
            );
            tracing::info!(
                event_id = 59521u32,
                "Cassandra status changed to \"AVAILABLE\""
            );
        });
        let (events, next) = since(before, 10);
        let ours: Vec<&RecentEvent> = events.iter().filter(|e| e.event_id >= 59520).collect();
        assert_eq!(ours.len(), 2);
        assert_eq!(ours[0].event_id, 59520);
        assert_eq!(ours[0].level, "WARN");
        assert_eq!(ours[0].fields, "store=cassandra");
        assert!(ours[0].message.contains("UNAVAILABLE"));
        assert!(ours[0].cursor < ours[1].cursor);
        let (again, _) = since(next, 10);
        assert!(again.iter().all(|e| e.cursor > next), "nothing twice");
    }
}
