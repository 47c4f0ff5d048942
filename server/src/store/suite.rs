//! The session-store test suite, written once and run against every backend
//! (SQLite always; Cassandra against the test node or a real cluster).
//!
//! `a` and `b` are two independent handles on the same store, standing for
//! two instances: fencing must hold between them, not only within one.

use super::{
    Append, ContactStore, FinalTranscript, InstanceRegistry, Order, Registration, SessionRecord,
    SessionStore, StoreError,
};
use crate::session::{now_ms, Draft, Event, Participant, Role, SessionState};

const CUSTOMER_NICKNAME: &str = "Анна 李 🙂";

fn customer() -> Participant {
    Participant {
        participant_id: "cust".into(),
        nickname: CUSTOMER_NICKNAME.into(),
        role: Role::Customer,
    }
}

pub(crate) fn new_record(owner: &str) -> SessionRecord {
    SessionRecord {
        session_id: format!("suite-{}", uuid::Uuid::new_v4()),
        intx: format!("intx-{}", uuid::Uuid::new_v4()),
        owner_instance: owner.into(),
        epoch: 1,
        state: SessionState::Waiting,
        subject: Some("billing".into()),
        nickname: Some(CUSTOMER_NICKNAME.into()),
        created_at_ms: now_ms(),
    }
}

pub(crate) fn message(seq: u64, text: &str, client_msg_id: Option<&str>) -> Event {
    Draft::message(&customer(), text.into(), client_msg_id.map(str::to_owned))
        .into_event(seq, now_ms())
}

async fn create(store: &dyn SessionStore, owner: &str) -> SessionRecord {
    let record = new_record(owner);
    let joined = Draft::joined(&customer(), None).into_event(1, now_ms());
    store
        .create_session(record.clone(), vec![joined])
        .await
        .expect("create");
    record
}

/// The texts of `events` (messages only), in order.
pub(crate) fn texts(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| e.text.clone()).collect()
}

pub(crate) fn append(record: &SessionRecord, epoch: u64, events: Vec<Event>) -> Append {
    Append {
        session_id: record.session_id.clone(),
        epoch,
        events,
        state: SessionState::Waiting,
    }
}

pub async fn run_all(a: &dyn SessionStore, b: &dyn SessionStore) {
    create_and_load_round_trip(a, b).await;
    appends_keep_order_and_text_exactly(a).await;
    stale_owner_is_fenced_after_claim(a, b).await;
    stored_events_are_never_overwritten(a).await;
    a_fenced_owner_cannot_overwrite_an_acknowledged_event(a, b).await;
    concurrent_claims_leave_one_owner(a, b).await;
    client_msg_id_counts_once_per_session(a, b).await;
    delete_requires_current_epoch(a, b).await;
    closed_sessions_cannot_be_claimed_or_appended(a, b).await;
    list_by_state_and_unknown_sessions(a).await;
    concurrent_appends_all_land(a).await;
}

pub async fn create_and_load_round_trip(a: &dyn SessionStore, b: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    let (loaded, events) = b
        .load(&record.session_id)
        .await
        .unwrap()
        .expect("visible to b");
    assert_eq!(loaded, record);
    assert_eq!(loaded.nickname.as_deref(), Some(CUSTOMER_NICKNAME));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].nickname.as_deref(), Some(CUSTOMER_NICKNAME));
    assert_eq!(events[0].role, Some(Role::Customer));
    assert_eq!(
        b.create_session(record.clone(), vec![]).await,
        Err(StoreError::AlreadyExists(record.session_id.clone()))
    );
    let located = a.locate(&record.session_id).await.unwrap();
    assert_eq!(
        located.as_ref().and_then(|r| r.nickname.as_deref()),
        Some(CUSTOMER_NICKNAME)
    );
    assert_eq!(located, Some(record));

    // A header without a nickname (stored by an older version) reads back
    // without one.
    let anonymous = SessionRecord {
        nickname: None,
        ..new_record("inst-a")
    };
    a.create_session(anonymous.clone(), vec![]).await.unwrap();
    assert_eq!(
        b.locate(&anonymous.session_id).await.unwrap(),
        Some(anonymous)
    );
}

pub async fn appends_keep_order_and_text_exactly(a: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    let texts = [
        "Привет",
        "你好，世界",
        "emoji 🎉👍🏽",
        "plain ascii",
        "quote ' \" \\ \n newline",
    ];
    for (i, text) in texts.iter().enumerate() {
        let seq = i as u64 + 2;
        a.append_events(append(&record, 1, vec![message(seq, text, None)]))
            .await
            .unwrap();
    }
    let (_, events) = a.load(&record.session_id).await.unwrap().unwrap();
    let got: Vec<_> = events
        .iter()
        .skip(1)
        .map(|e| e.text.clone().unwrap())
        .collect();
    assert_eq!(got, texts);
    let seqs: Vec<_> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
}

/// The stale-owner hazard (README, "How a message is kept"; for Cassandra,
/// cassandra/README.md): a paused old owner resumes and writes. Its write
/// must be refused, and the new owner's transcript must hold only what was
/// acknowledged to someone.
pub async fn stale_owner_is_fenced_after_claim(a: &dyn SessionStore, b: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    a.append_events(append(
        &record,
        1,
        vec![message(2, "before the pause", Some("m1"))],
    ))
    .await
    .unwrap();

    let (claimed, events) = b.claim(&record.session_id, "inst-b").await.unwrap();
    assert!(claimed.epoch > record.epoch);
    let epoch = claimed.epoch;
    assert_eq!(claimed.owner_instance, "inst-b");
    // A claim changes the owner and the epoch, nothing else of the header.
    assert_eq!(
        claimed,
        SessionRecord {
            owner_instance: "inst-b".into(),
            epoch,
            ..record.clone()
        }
    );
    assert_eq!(events.len(), 2);
    b.append_events(append(
        &record,
        epoch,
        vec![message(3, "new owner", Some("m2"))],
    ))
    .await
    .unwrap();

    // The old owner wakes up and writes the same seq and a later one.
    for seq in [3, 4] {
        let err = a
            .append_events(append(
                &record,
                1,
                vec![message(seq, "stale owner", Some("m3"))],
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::Fenced {
                session_id: record.session_id.clone(),
                attempted: 1,
                current: epoch
            }
        );
    }
    let (now, events) = b.load(&record.session_id).await.unwrap().unwrap();
    assert_eq!(now.owner_instance, "inst-b");
    assert_eq!(texts(&events), vec!["before the pause", "new owner"]);

    // A second claim fences the first claimer too.
    let (again, _) = a.claim(&record.session_id, "inst-a").await.unwrap();
    assert!(again.epoch > epoch);
    let refused = b
        .append_events(append(&record, epoch, vec![message(4, "x", None)]))
        .await;
    assert_eq!(
        refused,
        Err(StoreError::Fenced {
            session_id: record.session_id.clone(),
            attempted: epoch,
            current: again.epoch
        })
    );
    let (_, events) = a.load(&record.session_id).await.unwrap().unwrap();
    assert!(
        !events.iter().any(|e| e.text.as_deref() == Some("x")),
        "a refused write is not in the transcript"
    );
}

pub async fn stored_events_are_never_overwritten(a: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    a.append_events(append(&record, 1, vec![message(2, "original", None)]))
        .await
        .unwrap();
    let err = a
        .append_events(append(&record, 1, vec![message(2, "overwrite", None)]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let (_, events) = a.load(&record.session_id).await.unwrap().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].text.as_deref(), Some("original"));
}

/// The owner's first write of seq 2 landed (acknowledged X); another
/// instance claims the chat; the old owner, whose answer was lost, writes
/// seq 2 at its epoch again with other content (its next message, or the
/// closing event of a save given up). It is refused, and X stays: on
/// Cassandra an insert is an upsert of the same (session, seq, epoch) key,
/// so the refusal must come before the write.
pub async fn a_fenced_owner_cannot_overwrite_an_acknowledged_event(
    a: &dyn SessionStore,
    b: &dyn SessionStore,
) {
    let record = create(a, "inst-a").await;
    a.append_events(append(&record, 1, vec![message(2, "acknowledged X", None)]))
        .await
        .unwrap();
    let (claimed, _) = b.claim(&record.session_id, "inst-b").await.unwrap();
    let err = a
        .append_events(append(&record, 1, vec![message(2, "stale Y", None)]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_) | StoreError::Fenced { .. }),
        "{err:?}"
    );
    let (now, events) = b.load(&record.session_id).await.unwrap().unwrap();
    assert_eq!(now.epoch, claimed.epoch);
    assert_eq!(texts(&events), vec!["acknowledged X"]);
}

/// Two gateways restore the same chat at once on two instances: whatever
/// the interleaving, at most one of them acknowledges a write afterwards,
/// the transcript holds what was acknowledged exactly once (a write that
/// landed but was refused may show too: its sender got an error), and a
/// third instance can take the chat over afterwards. Twice: with two
/// ordinary instance ids, and with two whose ids give the Cassandra store
/// the same epoch (their FNV-1a hashes share the low 20 bits), the tie the
/// store must see and step back from.
pub async fn concurrent_claims_leave_one_owner(a: &dyn SessionStore, b: &dyn SessionStore) {
    for (owner_a, owner_b) in [("inst-a", "inst-b"), ("inst-768", "inst-4746")] {
        for _ in 0..10 {
            let record = create(a, "inst-0").await;
            let id = record.session_id.as_str();
            let (claimed_a, claimed_b) = tokio::join!(a.claim(id, owner_a), b.claim(id, owner_b));
            let mut acknowledged = Vec::new();
            for (store, claimed, text) in [(a, claimed_a, "from a"), (b, claimed_b, "from b")] {
                let Ok((rec, events)) = claimed else {
                    continue;
                };
                let seq = events.len() as u64 + 1;
                let write = append(&record, rec.epoch, vec![message(seq, text, None)]);
                if store.append_events(write).await.is_ok() {
                    acknowledged.push(text.to_owned());
                }
            }
            assert!(
                acknowledged.len() <= 1,
                "two owners acknowledged: {acknowledged:?} ({owner_a}, {owner_b})"
            );
            let (taken, events) = b.claim(id, "inst-c").await.unwrap();
            let texts = texts(&events);
            for text in &acknowledged {
                assert_eq!(
                    texts.iter().filter(|t| *t == text).count(),
                    1,
                    "{text} in {texts:?} ({owner_a}, {owner_b})"
                );
            }
            let next = events.len() as u64 + 1;
            b.append_events(append(
                &record,
                taken.epoch,
                vec![message(next, "from c", None)],
            ))
            .await
            .unwrap();
            let (_, events) = a.load(id).await.unwrap().unwrap();
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=next).collect::<Vec<_>>(), "{owner_a}, {owner_b}");
        }
    }
}

/// A reused client_msg_id (an owner's bug, or a write whose refusal was
/// lost) never shows twice: the first event with it is the one read, by
/// the writer and by a claimant, before and after rows move between the
/// store's tables.
pub async fn client_msg_id_counts_once_per_session(a: &dyn SessionStore, b: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    a.append_events(append(
        &record,
        1,
        vec![message(2, "once", Some("retry-me"))],
    ))
    .await
    .unwrap();
    // Refused or stored: either way not read.
    let _ = a
        .append_events(append(
            &record,
            1,
            vec![message(3, "twice", Some("retry-me"))],
        ))
        .await;
    let (_, events) = a.load(&record.session_id).await.unwrap().unwrap();
    assert_eq!(events.len(), 2, "the duplicate is not in the transcript");
    assert_eq!(events[1].text.as_deref(), Some("once"));
    assert_eq!(events[1].client_msg_id.as_deref(), Some("retry-me"));
    let (_, claimed) = b.claim(&record.session_id, "inst-b").await.unwrap();
    assert_eq!(claimed, events, "a claim reads what a load reads");

    let other = create(a, "inst-a").await;
    a.append_events(append(
        &other,
        1,
        vec![message(2, "same id elsewhere", Some("retry-me"))],
    ))
    .await
    .expect("ids are unique per session only");
}

pub async fn delete_requires_current_epoch(a: &dyn SessionStore, b: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    let (claimed, _) = b.claim(&record.session_id, "inst-b").await.unwrap();
    assert!(matches!(
        a.delete_session(&record.session_id, 1).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(a.locate(&record.session_id).await.unwrap().is_some());
    b.delete_session(&record.session_id, claimed.epoch)
        .await
        .unwrap();
    assert_eq!(a.locate(&record.session_id).await.unwrap(), None);
    assert_eq!(a.load(&record.session_id).await.unwrap(), None);
}

pub async fn closed_sessions_cannot_be_claimed_or_appended(
    a: &dyn SessionStore,
    b: &dyn SessionStore,
) {
    let record = create(a, "inst-a").await;
    let closed = Draft::closed("customer-left").into_event(2, now_ms());
    a.append_events(Append {
        state: SessionState::Closed,
        ..append(&record, 1, vec![closed])
    })
    .await
    .unwrap();
    assert_eq!(
        a.locate(&record.session_id).await.unwrap().map(|r| r.state),
        Some(SessionState::Closed)
    );
    assert_eq!(
        b.claim(&record.session_id, "inst-b").await.unwrap_err(),
        StoreError::Closed(record.session_id.clone())
    );
    assert_eq!(
        a.append_events(append(&record, 1, vec![message(3, "late", None)]))
            .await
            .unwrap_err(),
        StoreError::Closed(record.session_id.clone())
    );
    // Closing is followed by deleting the intermediate records.
    a.delete_session(&record.session_id, 1).await.unwrap();
    assert_eq!(b.load(&record.session_id).await.unwrap(), None);
}

pub async fn list_by_state_and_unknown_sessions(a: &dyn SessionStore) {
    let record = create(a, "inst-a").await;
    let waiting = a
        .list_sessions(Some(SessionState::Waiting), Order::Oldest, 100_000)
        .await
        .unwrap();
    assert!(waiting.iter().any(|r| r.session_id == record.session_id));
    // The listing (the agents' queue) carries the whole header, the
    // customer's nickname included.
    let listed = waiting
        .iter()
        .find(|r| r.session_id == record.session_id)
        .unwrap();
    assert_eq!(listed.nickname.as_deref(), Some(CUSTOMER_NICKNAME));
    assert_eq!(listed, &record);
    let all = a.list_sessions(None, Order::Oldest, 100_000).await.unwrap();
    assert_eq!(
        all.iter().find(|r| r.session_id == record.session_id),
        Some(&record)
    );
    let active = a
        .list_sessions(Some(SessionState::Active), Order::Oldest, 100_000)
        .await
        .unwrap();
    assert!(!active.iter().any(|r| r.session_id == record.session_id));
    // Either end of the queue first: three chats created a second apart.
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = SessionRecord {
            created_at_ms: record.created_at_ms + 1_000 * (i + 1),
            ..new_record("inst-a")
        };
        ids.push(r.session_id.clone());
        let joined = Draft::joined(&customer(), None).into_event(1, r.created_at_ms);
        a.create_session(r, vec![joined]).await.unwrap();
    }
    for (order, expected) in [
        (Order::Oldest, ids.clone()),
        (Order::Newest, ids.iter().rev().cloned().collect()),
    ] {
        let listed: Vec<String> = a
            .list_sessions(Some(SessionState::Waiting), order, 100_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.session_id)
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(listed, expected, "{order:?}");
    }
    let newest = a
        .list_sessions(Some(SessionState::Waiting), Order::Newest, 1)
        .await
        .unwrap();
    assert_eq!(newest.len(), 1);
    assert!(newest[0].created_at_ms >= record.created_at_ms + 3_000);
    assert_eq!(a.locate("no-such-session").await.unwrap(), None);
    assert_eq!(
        a.claim("no-such-session", "inst-a").await.unwrap_err(),
        StoreError::NotFound("no-such-session".into())
    );
    assert!(matches!(
        a.append_events(Append {
            session_id: "no-such-session".into(),
            epoch: 1,
            events: vec![message(2, "x", None)],
            state: SessionState::Waiting,
        })
        .await,
        Err(StoreError::NotFound(_))
    ));
    a.ping().await.unwrap();
}

/// Many sessions appending at once (group commit): every append lands.
pub async fn concurrent_appends_all_land(a: &dyn SessionStore) {
    let mut records = Vec::new();
    for _ in 0..20 {
        records.push(create(a, "inst-a").await);
    }
    let writes = records.iter().map(|r| async move {
        for seq in 2..12 {
            a.append_events(append(
                r,
                1,
                vec![message(seq, &format!("m{seq}"), Some(&format!("c{seq}")))],
            ))
            .await
            .unwrap();
        }
    });
    futures_util::future::join_all(writes).await;
    for r in &records {
        let (_, events) = a.load(&r.session_id).await.unwrap().unwrap();
        let seqs: Vec<_> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..12).collect::<Vec<_>>());
    }
}

pub async fn contact_store(c: &dyn ContactStore) {
    let id = format!("suite-final-{}", uuid::Uuid::new_v4());
    let t = FinalTranscript {
        session_id: id.clone(),
        intx: "intx-1".into(),
        closed_at_ms: now_ms(),
        events: vec![message(1, "Спасибо 🙏", None)],
    };
    c.save_final_transcript(t.clone()).await.unwrap();
    let again = FinalTranscript {
        events: vec![],
        ..t.clone()
    };
    c.save_final_transcript(again).await.unwrap();
    assert_eq!(
        c.final_transcript(&id).await.unwrap(),
        Some(t),
        "the first save is kept"
    );
    assert_eq!(c.final_transcript("none").await.unwrap(), None);
}

/// The instance registry: a registration is written, overwritten by the
/// next heartbeat, and listed with the others.
pub async fn registry(r: &dyn InstanceRegistry) {
    let id = format!("suite-inst-{}", uuid::Uuid::new_v4());
    let other = format!("{id}-b");
    let first = Registration {
        instance_id: id.clone(),
        url: "http://10.0.0.1:7001".into(),
        enabled: true,
        heartbeat_ms: 1_000,
    };
    r.register(&first).await.unwrap();
    let next = Registration {
        enabled: false,
        heartbeat_ms: 2_000,
        ..first.clone()
    };
    r.register(&next).await.unwrap();
    r.register(&Registration {
        instance_id: other.clone(),
        url: "https://chat-2.example:7001".into(),
        ..first.clone()
    })
    .await
    .unwrap();
    let listed = r.registrations().await.unwrap();
    let mine: Vec<&Registration> = listed
        .iter()
        .filter(|x| x.instance_id.starts_with(&id))
        .collect();
    assert_eq!(mine.len(), 2, "{listed:?}");
    assert!(
        mine.contains(&&next),
        "the heartbeat overwrote the first: {mine:?}"
    );
    assert!(mine
        .iter()
        .any(|x| x.instance_id == other && x.url == "https://chat-2.example:7001"));
}
