//! The chat session domain: participants, transcript events and the
//! waiting → active → closed state machine. Pure data and rules, no I/O, so
//! that the instance, the stores and the gateway agree on one definition.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest accepted message text, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Longest accepted nickname, in bytes.
pub const MAX_NICKNAME_BYTES: usize = 256;
/// Longest accepted `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Waiting,
    Active,
    Closed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Waiting => "waiting",
            SessionState::Active => "active",
            SessionState::Closed => "closed",
        }
    }

    /// The state machine's one transition rule: the state after `event`.
    /// A `closed` event closes the session, an agent joining a waiting one
    /// makes it active; closed is final.
    pub fn after(self, event: &Event) -> SessionState {
        match (self, event.kind) {
            (SessionState::Closed, _) | (_, EventKind::Closed) => SessionState::Closed,
            (_, EventKind::Joined) if event.role == Some(Role::Agent) => SessionState::Active,
            (state, _) => state,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "waiting" => Some(SessionState::Waiting),
            "active" => Some(SessionState::Active),
            "closed" => Some(SessionState::Closed),
            _ => None,
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Message,
    Joined,
    Left,
    Notice,
    Closed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Joined => "joined",
            EventKind::Left => "left",
            EventKind::Notice => "notice",
            EventKind::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "message" => Some(EventKind::Message),
            "joined" => Some(EventKind::Joined),
            "left" => Some(EventKind::Left),
            "notice" => Some(EventKind::Notice),
            "closed" => Some(EventKind::Closed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "customer" => Some(Role::Customer),
            "agent" => Some(Role::Agent),
            _ => None,
        }
    }
}

/// Reasons carried by `joined`, `left`, `notice` and `closed` events.
pub mod reason {
    pub const DISCONNECTED: &str = "disconnected";
    pub const RECONNECTED: &str = "reconnected";
    pub const LEFT: &str = "left";
    pub const CUSTOMER_LEFT: &str = "customer-left";
    pub const AGENT_ENDED: &str = "agent-ended";
    pub const SAVE: &str = "save";
    pub const SAVE_FAIL: &str = "ucs-save-fail";
    pub const SAVE_ERROR_CLOSE: &str = "save-error";
    /// A waiting chat that no agent took within `server.waiting-timeout`.
    pub const NO_AGENT: &str = "no-agent";
    /// The session store lost the chat's records under its owner (they
    /// expired): closed from what the instance holds.
    pub const RECORDS_LOST: &str = "records-lost";
}

/// One transcript event as stored and as served to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    pub participant_id: Option<String>,
    pub nickname: Option<String>,
    pub text: Option<String>,
    pub reason: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Role of the participant in `joined` events (needed to rebuild the
    /// participant list at restoration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

/// The wire shape of an event (docs/public-api.md, "Events"): `at` as RFC 3339.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    pub seq: u64,
    pub kind: EventKind,
    pub participant_id: Option<String>,
    pub nickname: Option<String>,
    pub text: Option<String>,
    pub reason: Option<String>,
    pub at: String,
    /// True for notices that are pushed but not part of the transcript
    /// (transcript save notices).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> Self {
        EventView {
            seq: e.seq,
            kind: e.kind,
            participant_id: e.participant_id.clone(),
            nickname: e.nickname.clone(),
            text: e.text.clone(),
            reason: e.reason.clone(),
            at: format_ms(e.at_ms),
            ephemeral: false,
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn format_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub participant_id: String,
    pub nickname: String,
    pub role: Role,
}

/// Why an operation on a session is refused by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the session is closed")]
    Closed,
    #[error("participant {0} is not in the session")]
    NotParticipant(String),
}

/// A new event, before the owner gives it its sequence number.
#[derive(Debug, Clone)]
pub struct Draft {
    pub kind: EventKind,
    pub participant_id: Option<String>,
    pub nickname: Option<String>,
    pub text: Option<String>,
    pub reason: Option<String>,
    pub role: Option<Role>,
    pub client_msg_id: Option<String>,
}

impl Draft {
    fn of(kind: EventKind, p: Option<&Participant>, reason: Option<&str>) -> Self {
        Draft {
            kind,
            participant_id: p.map(|p| p.participant_id.clone()),
            nickname: p.map(|p| p.nickname.clone()),
            text: None,
            reason: reason.map(str::to_owned),
            role: None,
            client_msg_id: None,
        }
    }

    pub fn joined(p: &Participant, reason: Option<&str>) -> Self {
        Draft {
            role: Some(p.role),
            ..Draft::of(EventKind::Joined, Some(p), reason)
        }
    }

    pub fn left(p: &Participant, reason: &str) -> Self {
        Draft::of(EventKind::Left, Some(p), Some(reason))
    }

    pub fn closed(reason: &str) -> Self {
        Draft::of(EventKind::Closed, None, Some(reason))
    }

    pub fn message(p: &Participant, text: String, client_msg_id: Option<String>) -> Self {
        Draft {
            text: Some(text),
            client_msg_id,
            ..Draft::of(EventKind::Message, Some(p), None)
        }
    }

    pub fn into_event(self, seq: u64, at_ms: i64) -> Event {
        Event {
            seq,
            kind: self.kind,
            participant_id: self.participant_id,
            nickname: self.nickname,
            text: self.text,
            reason: self.reason,
            at_ms,
            role: self.role,
            client_msg_id: self.client_msg_id,
        }
    }
}

/// The in-memory image of one session's transcript and membership, rebuilt
/// from stored events at restoration. Holds the rules; callers decide when to
/// persist.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub state: SessionState,
    pub events: Vec<Event>,
    /// Participants present now, by id.
    pub present: BTreeMap<String, Participant>,
    /// Everyone who ever joined (a token outlives a disconnect).
    pub known: BTreeMap<String, Participant>,
    /// client_msg_id → seq of the message it created.
    pub client_ids: std::collections::HashMap<String, u64>,
    /// Bytes of message text in the transcript (its cap is checked
    /// against this).
    pub text_bytes: usize,
}

impl Transcript {
    pub fn new() -> Self {
        Transcript {
            state: SessionState::Waiting,
            events: Vec::new(),
            present: BTreeMap::new(),
            known: BTreeMap::new(),
            client_ids: Default::default(),
            text_bytes: 0,
        }
    }

    /// Rebuild from stored events (in seq order) and the stored state.
    /// The events win over a state column left behind: the state is the
    /// stored one carried through every event (a `closed` event the
    /// owner died before marking; an agent's join whose state change the
    /// store kept waiting for its shared file's lock when the chat was
    /// claimed away). The transition rule only moves forward, so a stored
    /// state ahead of the events stays.
    pub fn replay(state: SessionState, events: Vec<Event>) -> Self {
        let mut t = Transcript::new();
        t.state = state;
        for e in &events {
            t.apply(e);
            t.state = t.state.after(e);
        }
        t.events = events;
        t
    }

    pub fn next_seq(&self) -> u64 {
        self.events.last().map(|e| e.seq + 1).unwrap_or(1)
    }

    pub fn last_seq(&self) -> u64 {
        self.events.last().map(|e| e.seq).unwrap_or(0)
    }

    /// Validate that `participant_id` may act in this session now.
    pub fn check_participant(&self, participant_id: &str) -> Result<&Participant, StateError> {
        if self.state == SessionState::Closed {
            return Err(StateError::Closed);
        }
        self.known
            .get(participant_id)
            .ok_or_else(|| StateError::NotParticipant(participant_id.to_owned()))
    }

    /// How far `participant_id` may read this chat: `None` for all of it;
    /// `Some(seq)` for an agent who left while it went on, whose view ends
    /// at their leaving (and at the closing right after it when they ended
    /// the chat). A customer's leaving closes the chat, so a customer reads
    /// the whole of it.
    pub fn read_limit(&self, participant_id: &str) -> Result<Option<u64>, StateError> {
        let p = self
            .known
            .get(participant_id)
            .ok_or_else(|| StateError::NotParticipant(participant_id.to_owned()))?;
        if p.role == Role::Customer || self.present.contains_key(participant_id) {
            return Ok(None);
        }
        let Some(left) = self
            .events
            .iter()
            .rev()
            .find(|e| {
                e.kind == EventKind::Left && e.participant_id.as_deref() == Some(participant_id)
            })
            .map(|e| e.seq)
        else {
            return Ok(None);
        };
        let ended_by_them = self
            .after(left)
            .first()
            .is_some_and(|e| e.seq == left + 1 && e.kind == EventKind::Closed);
        Ok(Some(if ended_by_them { left + 1 } else { left }))
    }

    pub fn check_open(&self) -> Result<(), StateError> {
        if self.state == SessionState::Closed {
            Err(StateError::Closed)
        } else {
            Ok(())
        }
    }

    /// Record an event that has been durably saved (or that is accepted
    /// without saving when auto-save is off).
    pub fn push(&mut self, event: Event) {
        self.apply(&event);
        self.state = self.state.after(&event);
        self.events.push(event);
    }

    fn apply(&mut self, e: &Event) {
        match e.kind {
            EventKind::Joined => {
                if let (Some(id), Some(nick)) = (&e.participant_id, &e.nickname) {
                    let p = Participant {
                        participant_id: id.clone(),
                        nickname: nick.clone(),
                        role: e.role.unwrap_or(Role::Agent),
                    };
                    self.known.insert(id.clone(), p.clone());
                    self.present.insert(id.clone(), p);
                }
            }
            EventKind::Left => {
                if let Some(id) = &e.participant_id {
                    self.present.remove(id);
                }
            }
            EventKind::Message => {
                if let Some(cid) = &e.client_msg_id {
                    self.client_ids.insert(cid.clone(), e.seq);
                }
                self.text_bytes += e.text.as_ref().map_or(0, String::len);
            }
            EventKind::Notice | EventKind::Closed => {}
        }
    }

    /// Events with seq greater than `after`.
    pub fn after(&self, after: u64) -> &[Event] {
        let idx = self.events.partition_point(|e| e.seq <= after);
        &self.events[idx..]
    }

    /// A page of the events after `after`: at most `limit` events, ending
    /// once their texts reach `max_bytes` (one event at least, so a page
    /// always moves on); and whether more follow.
    pub fn page(&self, after: u64, limit: usize, max_bytes: usize) -> (&[Event], bool) {
        let rest = self.after(after);
        let mut bytes = 0;
        let mut n = 0;
        for e in rest.iter().take(limit.max(1)) {
            if n > 0 && bytes >= max_bytes {
                break;
            }
            bytes += e.text.as_ref().map_or(0, String::len);
            n += 1;
        }
        (&rest[..n], n < rest.len())
    }

    /// Drafts a restoring owner appends: for each present participant a
    /// `left`/disconnected and a `joined`/reconnected, as the reference shows
    /// users.
    pub fn restoration_drafts(&self) -> Vec<Draft> {
        let mut drafts = Vec::with_capacity(self.present.len() * 2);
        for p in self.present.values() {
            drafts.push(Draft::left(p, reason::DISCONNECTED));
        }
        for p in self.present.values() {
            drafts.push(Draft::joined(p, Some(reason::RECONNECTED)));
        }
        drafts
    }
}

impl Default for Transcript {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer() -> Participant {
        Participant {
            participant_id: "c1".into(),
            nickname: "Ann".into(),
            role: Role::Customer,
        }
    }

    fn agent() -> Participant {
        Participant {
            participant_id: "a1".into(),
            nickname: "Bob".into(),
            role: Role::Agent,
        }
    }

    fn push(t: &mut Transcript, d: Draft) -> u64 {
        let seq = t.next_seq();
        t.push(d.into_event(seq, 0));
        seq
    }

    #[test]
    fn a_session_waits_until_an_agent_joins_and_closes_on_closed() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        assert_eq!(t.state, SessionState::Waiting);
        push(&mut t, Draft::joined(&agent(), None));
        assert_eq!(t.state, SessionState::Active);
        push(&mut t, Draft::closed(reason::CUSTOMER_LEFT));
        assert_eq!(t.state, SessionState::Closed);
        assert_eq!(t.check_open(), Err(StateError::Closed));
        assert_eq!(t.check_participant("c1").err(), Some(StateError::Closed));
    }

    #[test]
    fn sequence_numbers_start_at_one_and_increase() {
        let mut t = Transcript::new();
        assert_eq!(push(&mut t, Draft::joined(&customer(), None)), 1);
        assert_eq!(
            push(&mut t, Draft::message(&customer(), "hi".into(), None)),
            2
        );
        assert_eq!(t.after(1).len(), 1);
        assert_eq!(t.after(0).len(), 2);
        assert_eq!(t.after(2).len(), 0);
    }

    #[test]
    fn unknown_participants_are_refused() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        assert!(t.check_participant("c1").is_ok());
        assert_eq!(
            t.check_participant("zz").err(),
            Some(StateError::NotParticipant("zz".into()))
        );
    }

    #[test]
    fn replay_rebuilds_membership_state_and_client_ids() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        push(&mut t, Draft::joined(&agent(), None));
        push(
            &mut t,
            Draft::message(&customer(), "hello".into(), Some("m-1".into())),
        );
        push(&mut t, Draft::left(&agent(), reason::LEFT));
        let r = Transcript::replay(t.state, t.events.clone());
        assert_eq!(r.state, SessionState::Active);
        assert_eq!(r.present.len(), 1);
        assert_eq!(r.known.len(), 2);
        assert_eq!(r.client_ids.get("m-1"), Some(&3));
        assert_eq!(r.next_seq(), 5);
    }

    #[test]
    fn replay_takes_the_state_the_events_reached_over_a_stale_stored_one() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        push(&mut t, Draft::joined(&agent(), None));
        let stale = Transcript::replay(SessionState::Waiting, t.events.clone());
        assert_eq!(stale.state, SessionState::Active);
        push(&mut t, Draft::closed(reason::CUSTOMER_LEFT));
        let closing = Transcript::replay(SessionState::Active, t.events.clone());
        assert_eq!(closing.state, SessionState::Closed);
        // Ahead of the events: the stored state stays.
        let closed = Transcript::replay(SessionState::Closed, t.events[..1].to_vec());
        assert_eq!(closed.state, SessionState::Closed);
    }

    #[test]
    fn an_agent_who_left_reads_up_to_their_leaving_and_the_customer_reads_all() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        push(&mut t, Draft::joined(&agent(), None));
        // A restoration's disconnected/reconnected is not a leaving.
        for d in t.restoration_drafts() {
            push(&mut t, d);
        }
        assert_eq!(t.read_limit("a1"), Ok(None));
        push(&mut t, Draft::left(&agent(), reason::LEFT));
        let left = t.last_seq();
        push(&mut t, Draft::message(&customer(), "after".into(), None));
        assert_eq!(t.read_limit("a1"), Ok(Some(left)));
        assert_eq!(t.read_limit("c1"), Ok(None));
        assert_eq!(
            t.read_limit("zz"),
            Err(StateError::NotParticipant("zz".into()))
        );
        // An agent who ended the chat sees its closing.
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        push(&mut t, Draft::joined(&agent(), None));
        push(&mut t, Draft::left(&agent(), reason::LEFT));
        push(&mut t, Draft::closed(reason::AGENT_ENDED));
        assert_eq!(t.read_limit("a1"), Ok(Some(t.last_seq())));
    }

    #[test]
    fn restoration_disconnects_then_reconnects_everyone_present() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        push(&mut t, Draft::joined(&agent(), None));
        let drafts = t.restoration_drafts();
        let kinds: Vec<_> = drafts
            .iter()
            .map(|d| (d.kind, d.reason.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (EventKind::Left, "disconnected".to_string()),
                (EventKind::Left, "disconnected".to_string()),
                (EventKind::Joined, "reconnected".to_string()),
                (EventKind::Joined, "reconnected".to_string()),
            ]
        );
        // Reconnected participants keep their roles: the state stays active.
        for d in drafts {
            push(&mut t, d);
        }
        assert_eq!(t.state, SessionState::Active);
        assert_eq!(t.present.len(), 2);
    }

    #[test]
    fn a_stored_closed_event_makes_the_replayed_session_closed() {
        let mut t = Transcript::new();
        push(&mut t, Draft::joined(&customer(), None));
        push(&mut t, Draft::closed(reason::CUSTOMER_LEFT));
        let r = Transcript::replay(SessionState::Waiting, t.events.clone());
        assert_eq!(r.state, SessionState::Closed);
    }

    #[test]
    fn event_view_formats_time_as_rfc3339() {
        let e = Draft::message(&customer(), "x".into(), None).into_event(1, 1_700_000_000_123);
        let v = EventView::from(&e);
        assert_eq!(v.at, "2023-11-14T22:13:20.123Z");
        assert_eq!(
            serde_json::to_value(&v).unwrap()["kind"],
            serde_json::json!("message")
        );
    }

    #[test]
    fn pages_are_bounded_by_count_and_bytes_and_always_move_on() {
        let mut t = Transcript::new();
        let c = customer();
        push(&mut t, Draft::joined(&c, None));
        for i in 0..10 {
            push(&mut t, Draft::message(&c, "x".repeat(100 * (i + 1)), None));
        }
        assert_eq!(t.text_bytes, (1..=10).map(|i| 100 * i).sum::<usize>());
        let (page, more) = t.page(0, 4, usize::MAX);
        assert_eq!((page.len(), more), (4, true));
        let (page, more) = t.page(0, 100, 250);
        // joined (0 bytes), 100, 200: 300 >= 250, stop.
        assert_eq!((page.len(), more), (3, true));
        let (page, more) = t.page(10, 100, 1);
        assert_eq!((page.len(), more), (1, false), "one event at least");
        let (page, more) = t.page(11, 100, 1);
        assert_eq!((page.len(), more), (0, false));
    }
}
