use super::contacts::SqliteContactStore;
use super::headers::{KnownHeaders, SESSION_COLUMNS};
use super::recent::partition_of;
use super::registry::SqliteRegistry;
use super::schema::{
    create_events_schema, create_schema, events_path, has_column, open, open_existing,
    EVENTS_PAGE_SIZE, SCHEMA,
};
use super::*;
use super::{unavailable, SqliteOptions, SqliteStore};
use crate::session::Role;
use std::collections::HashMap;

/// A store file's path in a new directory, removed (with the events
/// files and WALs beside it) when this is dropped.
struct TempDb {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TempDb {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.path
    }
}

fn temp_db(name: &str) -> TempDb {
    let dir = tempfile::Builder::new()
        .prefix(&format!("confab-sqlite-{name}-"))
        .tempdir()
        .unwrap();
    TempDb {
        path: dir.path().join("confab.db"),
        _dir: dir,
    }
}

/// Two instances' stores, `a` and `c`, on a new file, and a chat of
/// `a`'s holding one message ("one").
struct TwoInstances {
    options: SqliteOptions,
    a: SqliteStore,
    c: SqliteStore,
    chat: SessionRecord,
    /// Last, so that it is dropped after the stores on it.
    path: TempDb,
}

impl TwoInstances {
    async fn new(name: &str, busy_timeout: Duration) -> Self {
        use crate::store::suite::{message, new_record};
        let path = temp_db(name);
        let options = SqliteOptions {
            busy_timeout,
            ..SqliteOptions::default()
        };
        let a = SqliteStore::open(&path, "a", options).unwrap();
        let c = SqliteStore::open(&path, "c", options).unwrap();
        let chat = new_record("inst-a");
        a.create_session(chat.clone(), vec![message(1, "one", Some("m1"))])
            .await
            .unwrap();
        TwoInstances {
            path,
            options,
            a,
            c,
            chat,
        }
    }
}

/// Appends are checked against headers read once per batch, trusted
/// while the shared file's `data_version` holds: that must change with
/// a commit by any other connection, and the headers read again then.
#[test]
fn known_headers_go_stale_when_another_connection_commits() {
    let path = temp_db("known-headers");
    let options = SqliteOptions::default();
    let mut mine = open(&path, options).unwrap();
    create_schema(&mine).unwrap();
    let other = open(&path, options).unwrap();
    let insert = format!(
        "INSERT INTO sessions ({SESSION_COLUMNS}, events_file) VALUES ('s', 'i', 'a', 1, 'open', '', 0, '', 'a')"
    );
    other.execute_batch(&insert).unwrap();
    let mut known = KnownHeaders::default();
    known.refresh(&mut mine, ["s"].into_iter()).unwrap();
    assert_eq!(known.headers["s"].as_ref().unwrap().record.epoch, 1);
    assert!(known.is_current(&mine).unwrap(), "nothing committed since");
    // A claim elsewhere.
    other
        .execute_batch("UPDATE sessions SET epoch = 2, owner_instance = 'b', claimed_epoch = 2")
        .unwrap();
    assert!(
        !known.is_current(&mine).unwrap(),
        "a commit by another connection"
    );
    assert!(known.headers.is_empty());
    known.refresh(&mut mine, ["s"].into_iter()).unwrap();
    assert_eq!(known.headers["s"].as_ref().unwrap().record.epoch, 2);
    assert!(known.is_current(&mine).unwrap());
}

/// Four threads open the file at `path` at once, each with `open` (given
/// the path and its number); every one must succeed.
fn open_together(
    path: &Path,
    round: usize,
    open: impl Fn(&Path, usize) -> StoreResult<()> + Send + Sync + 'static,
) {
    let (barrier, open) = (Arc::new(std::sync::Barrier::new(4)), Arc::new(open));
    let openers: Vec<_> = (0..4)
        .map(|i| {
            let (path, barrier, open) = (path.to_owned(), barrier.clone(), open.clone());
            std::thread::spawn(move || {
                barrier.wait();
                open(&path, i)
            })
        })
        .collect();
    for opener in openers {
        let result = opener.join().unwrap();
        assert!(result.is_ok(), "round {round}: {:?}", result.err());
    }
}

/// Instances started together (`confab up`) open the same new file at
/// once: every one of them must get the store ("database is locked"
/// stopped one in a loaded test run).
#[tokio::test]
async fn stores_opened_together_on_a_new_file_all_open() {
    for round in 0..20 {
        let path = temp_db(&format!("together-{round}"));
        open_together(&path, round, |path, i| {
            let options = SqliteOptions::default();
            SqliteStore::open(path, &format!("inst-{i}"), options)?;
            SqliteContactStore::open(path, options).map(|_| ())
        });
    }
}

/// A file made by a version without `sessions.nickname` is upgraded at
/// open, also by instances that open it at once (one adds the column,
/// the others find it); its sessions read back without a nickname, and
/// an older version's insert (without the column) still works.
#[tokio::test]
async fn a_file_of_an_older_version_gets_the_new_columns_at_open() {
    let old_schema = SCHEMA.replace(",\n    nickname       TEXT\n", "\n");
    assert_ne!(old_schema, SCHEMA, "the old schema lacks the column");
    let old_insert =
        "INSERT INTO sessions (session_id, intx, owner_instance, epoch, state, subject, created_at)
                      VALUES (?1, 'intx', 'inst-old', 1, 'waiting', NULL, ?2)";
    for round in 0..20 {
        let path = temp_db(&format!("upgrade-{round}"));
        {
            let conn = open(&path, SqliteOptions::default()).unwrap();
            conn.execute_batch(&old_schema).unwrap();
            assert!(!has_column(&conn, "sessions", "nickname").unwrap());
            conn.execute(old_insert, params!["old-1", 1]).unwrap();
        }
        open_together(&path, round, |path, i| {
            let options = SqliteOptions::default();
            if i % 2 == 0 {
                SqliteStore::open(path, &format!("inst-{i}"), options).map(|_| ())
            } else {
                SqliteContactStore::open(path, options).map(|_| ())
            }
        });
        let store = SqliteStore::open(&path, "inst-new", SqliteOptions::default()).unwrap();
        let old = store.locate("old-1").await.unwrap().expect("kept");
        assert_eq!(
            (old.owner_instance.as_str(), old.nickname),
            ("inst-old", None)
        );
        // An instance of the older version, still running, inserts.
        store
            .read(move |c| c.execute(old_insert, params!["old-2", 2]))
            .await
            .unwrap();
        assert_eq!(store.locate("old-2").await.unwrap().unwrap().nickname, None);
        let record = crate::store::suite::new_record("inst-new");
        store.create_session(record.clone(), vec![]).await.unwrap();
        let waiting = store
            .list_sessions(Some(SessionState::Waiting), crate::store::Order::Oldest, 10)
            .await
            .unwrap();
        let nicknames: Vec<_> = waiting
            .iter()
            .map(|r| (r.session_id.as_str(), r.nickname.as_deref()))
            .collect();
        assert_eq!(
            nicknames,
            [
                ("old-1", None),
                ("old-2", None),
                (record.session_id.as_str(), record.nickname.as_deref())
            ]
        );
    }
}

#[tokio::test]
async fn sqlite_passes_the_store_suite() {
    let path = temp_db("suite");
    // Rows move from `recent` to `events` every third row: the suite's
    // reads and claims meet both tables, in every mix.
    let options = SqliteOptions {
        max_batch: 64,
        flush_rows: 3,
        ..SqliteOptions::default()
    };
    let open = |id| SqliteStore::open(&path, id, options).unwrap();
    crate::store::suite::run_all(&open("a"), &open("b")).await;
    let contacts = SqliteContactStore::open(&path, options).unwrap();
    crate::store::suite::contact_store(&contacts).await;
    crate::store::suite::registry(&SqliteRegistry::open(&path, options).unwrap()).await;
}

/// Two writers append to their chats as fast as they can while a
/// third takes over the first one's chats one after the other, with
/// rows moving between the tables all the while. Each claim sees
/// every append acknowledged before it, once and in order; every
/// append after it is fenced. A refused append may show up, once: the
/// one whose owner committed it in its own file before the claim read
/// that file, and found the epoch bumped just after (refused, because
/// the owner cannot tell that from a commit the claim did not see).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_during_full_speed_appends_see_every_acknowledged_event() {
    use crate::store::suite::{append, message, new_record};
    let path = temp_db("claims-under-load");
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        flush_rows: 50,
        ..SqliteOptions::default()
    };
    let [a, b, c] =
        ["a", "b", "c"].map(|id| Arc::new(SqliteStore::open(&path, id, options).unwrap()));
    let mut chats = Vec::new();
    for store in [&a, &b] {
        for _ in 0..20 {
            let record = new_record("writer");
            store.create_session(record.clone(), vec![]).await.unwrap();
            chats.push((store.clone(), record));
        }
    }
    // Per chat: the seqs acknowledged, until the first refusal.
    let writers: Vec<_> = chats
        .iter()
        .map(|(store, record)| {
            let (store, record) = (store.clone(), record.clone());
            tokio::spawn(async move {
                let mut acknowledged = vec![];
                for seq in 2..400u64 {
                    let event = message(seq, &format!("m{seq}"), Some(&format!("c{seq}")));
                    match store.append_events(append(&record, 1, vec![event])).await {
                        Ok(()) => acknowledged.push(seq),
                        Err(StoreError::Fenced { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                (record.session_id, acknowledged)
            })
        })
        .collect();
    let mut claimed = HashMap::new();
    for (_, record) in chats.iter().take(20) {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let (header, events) = c.claim(&record.session_id, "claimant").await.unwrap();
        assert_eq!(header.epoch, 2);
        claimed.insert(record.session_id.clone(), events);
    }
    let (mut cut_short, mut refused_seen) = (0, 0);
    for writer in writers {
        let (id, acknowledged) = writer.await.unwrap();
        cut_short += usize::from(claimed.contains_key(&id) && acknowledged.len() < 398);
        let (_, stored) = c.load(&id).await.unwrap().unwrap();
        let stored: Vec<u64> = stored.iter().map(|e| e.seq).collect();
        match claimed.get(&id) {
            // Claimed: what the claim read is exactly what was
            // acknowledged before it, and all that is stored.
            Some(events) => {
                let seen: Vec<u64> = events.iter().map(|e| e.seq).collect();
                let refused = acknowledged.last().map_or(2, |last| last + 1);
                let with_refused: Vec<u64> =
                    acknowledged.iter().copied().chain([refused]).collect();
                assert!(
                    seen == acknowledged || seen == with_refused,
                    "chat {id}: claim saw {seen:?}, acknowledged {acknowledged:?}"
                );
                assert_eq!(stored, seen, "chat {id}");
                refused_seen += usize::from(seen == with_refused);
            }
            None => {
                assert_eq!(acknowledged, (2..400).collect::<Vec<_>>());
                assert_eq!(stored, acknowledged, "chat {id}");
            }
        }
    }
    println!(
        "{cut_short} of 20 chats claimed while their owner was writing; \
         {refused_seen} claims saw a refused append"
    );
    assert!(cut_short > 0, "no claim met an owner still writing");
}

/// Closing a chat deletes its rows at once, also those still waiting
/// in `recent` (found by the ids this writer kept). Closed by another
/// instance, its rows go at the next sweep of the owner's events file
/// (here, at open).
#[tokio::test]
async fn deleting_a_session_removes_its_rows_from_both_tables() {
    use crate::store::suite::{append, message, new_record};
    let path = temp_db("delete");
    let options = SqliteOptions {
        flush_rows: 8,
        ..SqliteOptions::default()
    };
    let (a, b) = (
        SqliteStore::open(&path, "a", options).unwrap(),
        SqliteStore::open(&path, "b", options).unwrap(),
    );
    async fn count(store: &SqliteStore, table: &'static str, id: String) -> StoreResult<i64> {
        let table = match table {
            "recent" => format!("recent_{}", partition_of(&id)),
            other => other.to_owned(),
        };
        let sql = format!("SELECT count(*) FROM {table} WHERE session_id = ?1");
        let conn =
            open_existing(&store.events_path(), SqliteOptions::default()).map_err(unavailable)?;
        conn.query_row(&sql, [id], |r| r.get::<_, i64>(0))
            .map_err(unavailable)
    }
    for deleter in ["owner", "another writer"] {
        let record = new_record("inst-a");
        let other = new_record("inst-a");
        a.create_session(record.clone(), vec![]).await.unwrap();
        a.create_session(other.clone(), vec![]).await.unwrap();
        a.append_events(append(&other, 1, vec![message(1, "kept", None)]))
            .await
            .unwrap();
        // Until some rows have moved to `events` and the last wait in
        // `recent` (a move takes one of its tables every other row).
        let id = record.session_id.clone();
        for seq in 1..=100 {
            let event = message(seq, "x", None);
            a.append_events(append(&record, 1, vec![event]))
                .await
                .unwrap();
            // A move runs after a batch's answers are out; the next
            // batch waits for it, and one that appends nothing starts
            // no move.
            let barrier = new_record("barrier");
            a.create_session(barrier, vec![]).await.unwrap();
            if count(&a, "recent", id.clone()).await.unwrap() > 0
                && count(&a, "events", id.clone()).await.unwrap() > 0
            {
                break;
            }
        }
        assert!(count(&a, "recent", id.clone()).await.unwrap() > 0);
        assert!(count(&a, "events", id.clone()).await.unwrap() > 0);
        let store = if deleter == "owner" { &a } else { &b };
        store.delete_session(&id, 1).await.unwrap();
        assert_eq!(a.load(&id).await.unwrap(), None, "{deleter}");
        if deleter != "owner" {
            assert!(count(&a, "events", id.clone()).await.unwrap() > 0);
            // The owner's writer sweeps its file at open.
            SqliteStore::open(&path, "a", options).unwrap();
        }
        assert_eq!(
            count(&a, "recent", id.clone()).await.unwrap(),
            0,
            "{deleter}"
        );
        assert_eq!(count(&a, "events", id).await.unwrap(), 0, "{deleter}");
        let (_, kept) = a.load(&other.session_id).await.unwrap().unwrap();
        assert_eq!(kept.len(), 1, "{deleter}: another chat's rows stay");
    }
}

/// An instance frozen in the middle of a save holds its events file's
/// write lock: another instance still takes its chats over, at once
/// (a claim only reads that file), with every acknowledged event, and
/// the frozen one's saves are refused from then on. Its rows left
/// behind go when its writer opens the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_a_chat_from_an_instance_frozen_holding_its_file() {
    use crate::store::suite::{append, message};
    let TwoInstances {
        path,
        options,
        a,
        c,
        chat: record,
    } = TwoInstances::new("frozen", Duration::from_millis(200)).await;
    a.append_events(append(&record, 1, vec![message(2, "two", Some("m2"))]))
        .await
        .unwrap();
    // As if `a`'s writer had stopped inside a transaction.
    let frozen = open_existing(&a.events_path(), options).unwrap();
    frozen.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let (header, events) = c.claim(&record.session_id, "inst-c").await.unwrap();
    let took = started.elapsed();
    assert_eq!(header.epoch, 2);
    let texts: Vec<_> = events
        .iter()
        .map(|e| e.text.clone().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    assert!(
        took < options.busy_timeout,
        "the claim waited {took:?} for the frozen file"
    );
    frozen.execute_batch("ROLLBACK").unwrap();
    let refused = a
        .append_events(append(&record, 1, vec![message(3, "late", Some("m3"))]))
        .await
        .unwrap_err();
    assert!(matches!(refused, StoreError::Fenced { .. }), "{refused}");
    c.append_events(append(&record, 2, vec![message(3, "three", Some("m3"))]))
        .await
        .unwrap();
    let (_, stored) = a.load(&record.session_id).await.unwrap().unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].text.as_deref(), Some("three"));
    // `a`'s copy of the chat goes when its writer opens the file.
    drop(a);
    let has_rows = || {
        let conn = open_existing(&events_path(&path, "a"), options).unwrap();
        let recent = partition_of(&record.session_id);
        conn.query_row(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM events WHERE session_id = ?1)
                     OR EXISTS (SELECT 1 FROM recent_{recent} WHERE session_id = ?1)"
            ),
            params![record.session_id],
            |r| r.get::<_, bool>(0),
        )
        .unwrap()
    };
    assert!(has_rows(), "no rows left in a's file before its sweep");
    SqliteStore::open(&path, "a", options).unwrap();
    assert!(!has_rows(), "rows left in a's file after its sweep");
}

/// Claims keep the `recent_N` rows of the file they read from while
/// that file is unchanged (read whole at the second claim that finds
/// it so); a save to it since must be seen by the next claim, whether
/// the rows were kept whole or not.
#[tokio::test]
async fn claims_from_a_file_see_what_was_saved_to_it_since_the_last_claim() {
    use crate::store::suite::{append, message, new_record, texts};
    // `path` bound, so that the file's directory outlives the stores.
    let TwoInstances {
        a,
        c,
        chat,
        path: _path,
        ..
    } = TwoInstances::new("recent-rows", SqliteOptions::default().busy_timeout).await;
    let mut chats = vec![chat];
    for _ in 0..4 {
        let r = new_record("inst-a");
        a.create_session(r.clone(), vec![message(1, "one", Some("m1"))])
            .await
            .unwrap();
        chats.push(r);
    }
    let claim = |r: &SessionRecord| {
        let (c, id) = (&c, r.session_id.clone());
        async move { c.claim(&id, "inst-c").await.unwrap().1 }
    };
    // Claims one after another with nothing saved between them: the
    // second reads the rows whole, the third uses them.
    for r in &chats[..3] {
        assert_eq!(texts(&claim(r).await), ["one"]);
    }
    // Saved since: the rows kept whole are stale.
    a.append_events(append(&chats[3], 1, vec![message(2, "two", Some("m2"))]))
        .await
        .unwrap();
    assert_eq!(texts(&claim(&chats[3]).await), ["one", "two"]);
    // Saved between two claims that did not read the rows whole.
    a.append_events(append(&chats[4], 1, vec![message(2, "two", Some("m2"))]))
        .await
        .unwrap();
    assert_eq!(texts(&claim(&chats[4]).await), ["one", "two"]);
}

/// New events files get small pages; one an earlier version created
/// keeps its 4 KiB pages (SQLite cannot change them in WAL mode), and
/// claims read across files of both sizes.
#[tokio::test]
async fn a_new_events_file_gets_small_pages_and_an_earlier_one_keeps_its_own() {
    use crate::store::suite::{append, message, new_record, texts};
    let path = temp_db("page-size");
    let page_size = |id: &str| -> i64 {
        let conn = open_existing(&events_path(&path, id), SqliteOptions::default()).unwrap();
        conn.query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    // The file of instance `a`, as an earlier version created it.
    let old = open(&events_path(&path, "a"), SqliteOptions::default()).unwrap();
    create_events_schema(&old).unwrap();
    drop(old);
    let a = SqliteStore::open(&path, "a", SqliteOptions::default()).unwrap();
    let c = SqliteStore::open(&path, "c", SqliteOptions::default()).unwrap();
    assert_eq!((page_size("a"), page_size("c")), (4096, EVENTS_PAGE_SIZE));

    let (from_a, from_c) = (new_record("inst-a"), new_record("inst-c"));
    a.create_session(from_a.clone(), vec![message(1, "a1", Some("a1"))])
        .await
        .unwrap();
    c.create_session(from_c.clone(), vec![message(1, "c1", Some("c1"))])
        .await
        .unwrap();
    // Each claims the other's chat: 4 KiB pages into 1 KiB, and back.
    let (claimed, events) = c.claim(&from_a.session_id, "inst-c").await.unwrap();
    assert_eq!(texts(&events), ["a1"]);
    let more = vec![message(2, "a2", Some("a2"))];
    c.append_events(append(&claimed, claimed.epoch, more))
        .await
        .unwrap();
    let (_, events) = a.claim(&from_c.session_id, "inst-a").await.unwrap();
    assert_eq!(texts(&events), ["c1"]);
    let (_, events) = a.claim(&from_a.session_id, "inst-a").await.unwrap();
    assert_eq!(texts(&events), ["a1", "a2"]);
}

/// An instance of a version before the events files, still running
/// on the file during an N+1 upgrade, claims with this statement. It
/// must be refused a chat stored in an events file (it would restore
/// it without its transcript), and still take a chat of its own
/// layout; this version's claims are unchanged.
#[tokio::test]
async fn an_older_version_cannot_claim_a_chat_stored_in_an_events_file() {
    let old_claim = "UPDATE sessions SET epoch = ?2, owner_instance = ?3 WHERE session_id = ?1";
    let TwoInstances {
        path,
        options,
        a,
        c,
        chat: record,
    } = TwoInstances::new("older-claims", SqliteOptions::default().busy_timeout).await;
    let old = open_existing(&path, options).unwrap();
    let refused = old
        .execute(old_claim, params![record.session_id, 2, "inst-old"])
        .unwrap_err();
    assert!(refused.to_string().contains("newer version"), "{refused}");
    let header = a.locate(&record.session_id).await.unwrap().unwrap();
    assert_eq!(
        (header.epoch, header.owner_instance.as_str()),
        (1, "inst-a")
    );
    // Claims of this version go on, from the older one's chats too.
    let (claimed, events) = c.claim(&record.session_id, "inst-c").await.unwrap();
    assert_eq!((claimed.epoch, events.len()), (2, 1));
    old.execute(
        "INSERT INTO sessions (session_id, intx, owner_instance, epoch, state, subject, created_at)
         VALUES ('old-1', 'intx', 'inst-old', 1, 'waiting', NULL, 0)",
        [],
    )
    .unwrap();
    old.execute(old_claim, params!["old-1", 2, "inst-old-2"])
        .unwrap();
    let (claimed, _) = c.claim("old-1", "inst-c").await.unwrap();
    assert_eq!(claimed.epoch, 3);
    let refused = old
        .execute(old_claim, params!["old-1", 4, "inst-old"])
        .unwrap_err();
    assert!(refused.to_string().contains("newer version"), "{refused}");
}

/// A state change waits in the writer's memory while another process
/// holds the shared file's lock; a claim in that window reads the old
/// state from the header. The restored chat must still have the state
/// its events reached, the header must get it from the claimant, and
/// the old owner's late write must not undo it.
#[tokio::test]
async fn a_state_change_kept_waiting_for_the_lock_survives_a_claim() {
    use crate::session::{Draft, Participant, Transcript};
    use crate::store::suite::{append, message, new_record};
    let TwoInstances {
        path,
        options,
        a,
        c: b,
        chat: record,
    } = TwoInstances::new("late-state", Duration::from_millis(100)).await;
    let agent = Participant {
        participant_id: "agent".into(),
        nickname: "Bob".into(),
        role: Role::Agent,
    };
    let joined = Draft::joined(&agent, None).into_event(2, crate::session::now_ms());
    let active = Append {
        state: SessionState::Active,
        ..append(&record, 1, vec![joined])
    };
    let holder = open_existing(&path, options).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    a.append_events(active).await.unwrap();
    holder.execute_batch("ROLLBACK").unwrap();
    let (header, events) = b.claim(&record.session_id, "inst-b").await.unwrap();
    assert_eq!(header.state, SessionState::Waiting, "the header is stale");
    let mut restored = Transcript::replay(header.state, events);
    assert_eq!(restored.state, SessionState::Active);
    b.append_events(Append {
        state: restored.state,
        ..append(&record, 2, vec![message(3, "back", Some("m3"))])
    })
    .await
    .unwrap();
    let located = b.locate(&record.session_id).await.unwrap().unwrap();
    assert_eq!(located.state, SessionState::Active, "the claimant's save");
    // The new owner closes the chat; then `a`'s next batch writes the
    // state it kept (active), under the old epoch: it must not reopen it.
    let closed = Draft::closed(crate::session::reason::CUSTOMER_LEFT)
        .into_event(4, crate::session::now_ms());
    restored.push(closed.clone());
    b.append_events(Append {
        state: restored.state,
        ..append(&record, 2, vec![closed])
    })
    .await
    .unwrap();
    let other = new_record("inst-a");
    a.create_session(other, vec![message(1, "x", None)])
        .await
        .unwrap();
    let located = a.locate(&record.session_id).await.unwrap().unwrap();
    assert_eq!((located.epoch, located.state), (2, SessionState::Closed));
}

/// Saves without a pause must not grow the WAL without bound: the
/// side checkpointer alone never catches up with a busy writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_continuous_saves() {
    use crate::store::suite::{append, message, new_record};
    use std::sync::atomic::{AtomicI64, Ordering};
    let path = temp_db("wal");
    let limit = 1024 * 1024;
    let store = Arc::new(
        SqliteStore::open(
            &path,
            "test",
            SqliteOptions {
                synchronous: Synchronous::Normal,
                wal_limit_bytes: limit,
                ..SqliteOptions::default()
            },
        )
        .unwrap(),
    );
    let mut records = Vec::new();
    for _ in 0..200 {
        let record = new_record("test");
        store.create_session(record.clone(), vec![]).await.unwrap();
        records.push(record);
    }
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let largest = Arc::new(AtomicI64::new(0));
    let watching = {
        let (wal, largest) = (wal.clone(), largest.clone());
        tokio::spawn(async move {
            loop {
                let size = std::fs::metadata(&wal).map(|m| m.len() as i64).unwrap_or(0);
                largest.fetch_max(size, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Each session's messages in order; all sessions at once.
    let writers: Vec<_> = records
        .iter()
        .map(|record| {
            let (store, record) = (store.clone(), record.clone());
            tokio::spawn(async move {
                for seq in 1..=150u64 {
                    let event = message(seq, &"x".repeat(200), None);
                    store
                        .append_events(append(&record, 1, vec![event]))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    watching.abort();
    // 30,000 saves' worth of pages went through the WAL (over 100 MB);
    // it may overshoot the limit by a few group commits, not by the
    // whole run.
    let largest = largest.load(Ordering::Relaxed);
    assert!(
        largest < 16 * limit,
        "the WAL grew to {largest} bytes with a limit of {limit}"
    );
    println!("largest WAL: {largest} bytes, limit {limit}");
    let (_, events) = store.load(&records[7].session_id).await.unwrap().unwrap();
    assert_eq!(events.len(), 150);
}
