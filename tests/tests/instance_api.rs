//! One real instance: bad input, closing into the contact store, drain, the
//! management endpoints and every `[settings]` option.

use confab_e2e::ws::EventStream;
use confab_e2e::{data_dir, run_confab, texts, Http, Server, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::time::Duration;

/// The events file of the instance `inst-a` whose shared file is `db`.
fn events_file(db: &std::path::Path) -> std::path::PathBuf {
    confab::store::sqlite::events_path(db, "inst-a")
}

/// Events of `chat` in `inst-a`'s events file, in either of its tables
/// (new ones wait in `recent_N` until the writer moves them to `events`).
fn stored_event_count(db: &std::path::Path, chat: &str) -> i64 {
    let conn = rusqlite::Connection::open(events_file(db)).unwrap();
    conn.query_row(
        "SELECT (SELECT count(*) FROM events WHERE session_id = ?1)
              + (SELECT count(*) FROM recent_0 WHERE session_id = ?1)
              + (SELECT count(*) FROM recent_1 WHERE session_id = ?1)
              + (SELECT count(*) FROM recent_2 WHERE session_id = ?1)
              + (SELECT count(*) FROM recent_3 WHERE session_id = ?1)",
        [chat],
        |r| r.get(0),
    )
    .unwrap()
}

fn assert_json_error(a: &confab_e2e::Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{:?}", a.body);
    assert_eq!(a.error_code(), code, "{:?}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{:?}",
        a.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_json_errors_and_changes_nothing() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;
    http.send(&s, &chat, &pid, "first", None).await.ok();
    let url = s.internal(&format!("/sessions/{chat}/messages"));
    let before = stored_event_count(&db, &chat);

    let too_long = "я".repeat(32 * 1024 + 1); // 65,538 bytes of UTF-8
    let a = http
        .post(
            &url,
            &json!({"participant_id": pid, "text": too_long}),
            None,
        )
        .await;
    assert_json_error(&a, 413, "too_large");
    let at_limit = "x".repeat(64 * 1024);
    http.post(
        &url,
        &json!({"participant_id": pid, "text": at_limit}),
        None,
    )
    .await
    .ok();
    let after_ok = stored_event_count(&db, &chat);
    assert_eq!(after_ok, before + 1);

    let mut raw = format!(r#"{{"participant_id": "{pid}", "text": "bad "#).into_bytes();
    raw.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
    assert_json_error(&http.post_raw(&url, raw, None).await, 400, "bad_request");
    assert_json_error(
        &http.post_raw(&url, b"{\"text\": ".to_vec(), None).await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http.post_raw(&url, b"not json".to_vec(), None).await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http.post(&url, &json!({"participant_id": pid}), None).await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http
            .post(&url, &json!({"text": "no participant"}), None)
            .await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http
            .post(&url, &json!({"participant_id": pid, "text": "   "}), None)
            .await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http
            .post(
                &url,
                &json!({"participant_id": pid, "text": "x", "client_msg_id": ""}),
                None,
            )
            .await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http
            .post(
                &url,
                &json!({"participant_id": "stranger", "text": "hi"}),
                None,
            )
            .await,
        403,
        "forbidden",
    );
    assert_json_error(
        &http
            .post(
                &s.internal("/sessions/nosuchchat/messages"),
                &json!({"participant_id": pid, "text": "x"}),
                None,
            )
            .await,
        404,
        "not_found",
    );
    assert_json_error(
        &http
            .get(&s.internal("/sessions/nosuchchat/transcript"), None)
            .await,
        404,
        "not_found",
    );
    assert_json_error(
        &http
            .get(
                &s.internal(&format!("/sessions/{chat}/transcript?after=abc")),
                None,
            )
            .await,
        400,
        "bad_request",
    );
    assert_json_error(
        &http
            .post(&s.internal("/sessions"), &json!({"nickname": ""}), None)
            .await,
        400,
        "bad_request",
    );
    assert_eq!(
        stored_event_count(&db, &chat),
        after_ok,
        "no bad request changed the store"
    );

    http.post(
        &s.internal(&format!("/sessions/{chat}/leave")),
        &json!({"participant_id": pid}),
        None,
    )
    .await
    .ok();
    assert_json_error(
        &http.send(&s, &chat, &pid, "too late", None).await,
        409,
        "chat_closed",
    );
    // A closed chat's transcript is its final transcript, from the contact
    // store (a 409 only while the final save is under way).
    let mut closed = http.transcript(&s, &chat).await;
    for _ in 0..100 {
        if closed.status != 409 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        closed = http.transcript(&s, &chat).await;
    }
    let closed = closed.ok();
    assert_eq!(closed["state"], "closed", "{closed}");
    assert_eq!(
        closed["events"].as_array().unwrap().last().unwrap()["kind"],
        "closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_text_round_trips_exactly_through_the_store() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let mut a = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let b = Server::start(dir.path(), "inst-b", &db, &[]).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&a, "Сергей 王").await;
    let samples = [
        "Здравствуйте! Чем могу помочь?",
        "我的订单还没有到。",
        "注文番号は１２３です",
        "🎉👍🏽 family: 👨‍👩‍👧‍👦",
        "mixed: naïve café — “quotes” \\ \"escaped\" \n newline\ttab",
    ];
    for t in samples {
        http.send(&a, &chat, &pid, t, None).await.ok();
    }
    a.kill();
    http.restore(&b, &chat).await.ok();
    let events = http.events(&b, &chat).await;
    assert_eq!(texts(&events), samples);
    assert_eq!(events[0]["nickname"], "Сергей 王");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_moves_the_transcript_to_the_contact_store_and_logs_59245() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;
    let (other, _) = http.create_session(&s, "Other").await;
    let agent = http
        .post(
            &s.internal(&format!("/sessions/{chat}/join")),
            &json!({"nickname": "Bob"}),
            None,
        )
        .await
        .ok();
    let agent_id = agent["participant_id"].as_str().unwrap();
    assert_eq!(http.transcript(&s, &chat).await.ok()["state"], "active");
    http.send(&s, &chat, &pid, "hello", None).await.ok();
    http.send(&s, &chat, agent_id, "hi, how can I help?", None)
        .await
        .ok();
    let left = http
        .post(
            &s.internal(&format!("/sessions/{chat}/leave")),
            &json!({"participant_id": pid}),
            None,
        )
        .await
        .ok();
    assert_eq!(left["state"], "closed");

    let conn = rusqlite::Connection::open(&db).unwrap();
    let (intx, body): (String, String) = conn
        .query_row(
            "SELECT intx, transcript FROM final_transcripts WHERE session_id = ?1",
            [&chat],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let final_events: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(texts(&final_events), vec!["hello", "hi, how can I help?"]);
    assert_eq!(final_events.last().unwrap()["kind"], "closed");
    assert_eq!(
        stored_event_count(&db, &chat),
        0,
        "intermediate events deleted"
    );
    let sessions: i64 = conn
        .query_row(
            "SELECT count(*) FROM sessions WHERE session_id = ?1",
            [&chat],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(sessions, 0, "intermediate session row deleted");

    let logged = s.events(59245);
    assert_eq!(logged.len(), 1);
    assert_eq!(
        logged[0]["message"],
        format!("deleting session with sid={chat} and intx={intx} (current sessions=1)")
    );
    let kpi = http.kpi(&s).await;
    assert_eq!(kpi["session_created"], 2);
    assert_eq!(kpi["session_closed"], 1);
    let metrics = http.text(&format!("{}/metrics", s.url)).await;
    assert!(
        metrics.contains("confab_sessions_closed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("confab_sessions_active 1"), "{metrics}");
    let _ = other;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_instance_takes_no_new_chats_and_drains() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;

    let disable = format!("{}/admin/disable", s.url);
    assert_eq!(http.post(&disable, &json!({}), None).await.status, 401);
    assert_eq!(
        http.post(&disable, &json!({}), Some("wrong")).await.status,
        401
    );
    http.post(&disable, &json!({}), Some(ADMIN_TOKEN))
        .await
        .ok();

    let refused = http
        .post(&s.internal("/sessions"), &json!({"nickname": "Late"}), None)
        .await;
    assert_json_error(&refused, 503, "instance_disabled");
    let status = http.get(&format!("{}/status", s.url), None).await.ok();
    assert_eq!(status["enabled"], false);
    assert_eq!(status["sessions_active"], 1);
    assert_eq!(
        http.get(&format!("{}/readyz", s.url), None).await.status,
        503
    );
    assert_eq!(
        http.get(&format!("{}/healthz", s.url), None).await.status,
        200
    );

    // The current chat goes on.
    http.send(&s, &chat, &pid, "still here", None).await.ok();
    let kpi = http.kpi(&s).await;
    assert_eq!(
        kpi["session_created"].as_u64().unwrap() - kpi["session_closed"].as_u64().unwrap(),
        1
    );
    http.post(
        &s.internal(&format!("/sessions/{chat}/leave")),
        &json!({"participant_id": pid}),
        None,
    )
    .await
    .ok();
    let kpi = http.kpi(&s).await;
    assert_eq!(
        kpi["session_created"].as_u64().unwrap() - kpi["session_closed"].as_u64().unwrap(),
        0
    );
    assert_eq!(s.events(59611).len(), 1, "drain complete logged");
    assert!(s.events(59245)[0]["message"]
        .as_str()
        .unwrap()
        .ends_with("(current sessions=0)"));

    http.post(
        &format!("{}/admin/enable", s.url),
        &json!({}),
        Some(ADMIN_TOKEN),
    )
    .await
    .ok();
    http.create_session(&s, "Next").await;
}

#[test]
fn an_invalid_option_stops_start_up_naming_option_value_and_choices() {
    let (code, err) = run_confab(&["server", "--set", "settings.transcript-auto-save=7"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value \"7\" for option `settings.transcript-auto-save`: expected one of \"0\", \"1\", \"2\""),
        "{err}"
    );
    let (code, err) = run_confab(
        &["server"],
        &[("CONFAB_SETTINGS_TRANSCRIPT_SAVE_ON_ERROR", "ignore")],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("settings.transcript-save-on-error")
            && err.contains("\"close\", \"continue\""),
        "{err}"
    );
    let dir = data_dir();
    let file = dir.path().join("confab.toml");
    std::fs::write(&file, "[cassandra]\nread-consistency = \"MOSTLY\"\n").unwrap();
    let (code, err) = run_confab(&["server", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cassandra.read-consistency") && err.contains("LOCAL_QUORUM"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_save_off_acknowledges_without_saving_and_refuses_restoration() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(
        dir.path(),
        "inst-a",
        &db,
        &["settings.transcript-auto-save=0"],
    )
    .await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;
    http.send(&s, &chat, &pid, "not saved", None).await.ok();
    assert_eq!(texts(&http.events(&s, &chat).await), vec!["not saved"]);
    assert_eq!(stored_event_count(&db, &chat), 0);
    let r = http.restore(&s, &chat).await;
    assert_json_error(&r, 409, "restoration_disabled");
}

/// A restoration that names the owner that failed (`?from=`, as the
/// gateway asks) takes the chat only from that owner: restored elsewhere
/// since, the answer names where it lives and nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_a_failed_owner_leaves_a_chat_restored_elsewhere_since() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let mut a = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let b = Server::start(dir.path(), "inst-b", &db, &[]).await;
    let c = Server::start(dir.path(), "inst-c", &db, &[]).await;
    let http = Http::default();
    let (chat, _) = http.create_session(&a, "Ann").await;
    a.kill();
    let restore_from = |s: &Server, from: &str| {
        let url = s.internal(&format!("/sessions/{chat}/restore?from={from}"));
        let http = &http;
        async move { http.post(&url, &json!({}), None).await }
    };
    // Where the answer says the chat lives, at which epoch, and whether
    // this restoration moved it.
    let said = |answer: &Value| {
        (
            answer["instance_id"].as_str().map(str::to_owned),
            answer["epoch"].as_u64(),
            answer["restored"].as_bool(),
        )
    };
    let expect = |owner: &str, epoch: u64, restored: bool| {
        (Some(owner.to_owned()), Some(epoch), Some(restored))
    };
    let taken = restore_from(&b, "inst-a").await.ok();
    assert_eq!(said(&taken), expect("inst-b", 2, true));
    // Another gateway still has inst-a as the owner that failed it.
    let elsewhere = restore_from(&c, "inst-a").await.ok();
    assert_eq!(said(&elsewhere), expect("inst-b", 2, false));
    let location = http
        .get(&c.internal(&format!("/sessions/{chat}/location")), None)
        .await
        .ok();
    assert_eq!(location["owner_instance"], "inst-b");
    assert_eq!(location["epoch"], 2);
    assert!(c.events(59603).is_empty(), "inst-c started no restoration");
    // The owner named failed too: taken.
    let taken = restore_from(&c, "inst-b").await.ok();
    assert_eq!(said(&taken), expect("inst-c", 3, true));
    assert_json_error(&restore_from(&c, "no%20such").await, 400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoration_mode_none_refuses_restore() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let mut a = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let b = Server::start(
        dir.path(),
        "inst-b",
        &db,
        &["settings.session-restoration-mode=none"],
    )
    .await;
    let http = Http::default();
    let (chat, _) = http.create_session(&a, "Ann").await;
    a.kill();
    assert_json_error(&http.restore(&b, &chat).await, 409, "restoration_disabled");
    assert_eq!(b.events(59605).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_save_two_notifies_clients_after_each_save() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(
        dir.path(),
        "inst-a",
        &db,
        &["settings.transcript-auto-save=2"],
    )
    .await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;
    let ws_url = format!(
        "ws://127.0.0.1:{}/internal/v1/sessions/{chat}/ws?after=0",
        s.port
    );
    let mut ws = EventStream::connect(&ws_url).await.unwrap();
    assert_eq!(
        ws.next(Duration::from_secs(5)).await.unwrap()["kind"],
        "joined"
    );
    let seq = http.send(&s, &chat, &pid, "saved?", None).await.ok()["seq"]
        .as_u64()
        .unwrap();
    let msg = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(msg["text"], "saved?");
    let notice = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(notice["kind"], "notice");
    assert_eq!(notice["reason"], "save");
    assert_eq!(notice["seq"].as_u64(), Some(seq));
    assert_eq!(notice["ephemeral"], true);
    // The notice is pushed, not stored.
    assert_eq!(http.events(&s, &chat).await.len(), 2);
}

/// Hold the write lock of `inst-a`'s events file from outside, as a stuck
/// writer would.
fn lock_store(db: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(events_file(db)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn
}

const FAILING_SAVES: &[&str] = &[
    "server.sqlite-busy-timeout=50ms",
    "settings.transcript-resend-attempts=2",
    "settings.transcript-resend-delay=100ms",
];

/// An instance whose saves can be made to fail (SQLite's lock held from
/// outside), one chat, and its WebSocket past the customer's `joined`.
struct Watched {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    s: Server,
    http: Http,
    chat: String,
    pid: String,
    ws: EventStream,
}

impl Watched {
    async fn start(extra: &[&str]) -> Watched {
        let dir = data_dir();
        let db = dir.path().join("confab.db");
        let mut sets = FAILING_SAVES.to_vec();
        sets.extend_from_slice(extra);
        let s = Server::start(dir.path(), "inst-a", &db, &sets).await;
        let http = Http::default();
        let (chat, pid) = http.create_session(&s, "Ann").await;
        let url = format!("ws://127.0.0.1:{}/internal/v1/sessions/{chat}/ws", s.port);
        let mut ws = EventStream::connect(&url).await.unwrap();
        assert_eq!(
            ws.next(Duration::from_secs(5)).await.unwrap()["kind"],
            "joined"
        );
        Watched {
            _dir: dir,
            db,
            s,
            http,
            chat,
            pid,
            ws,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_on_error_continue_retries_notifies_and_keeps_the_chat() {
    let Watched {
        _dir,
        db,
        s,
        http,
        chat,
        pid,
        mut ws,
    } = Watched::start(&["settings.transcript-save-on-error=continue"]).await;

    let lock = lock_store(&db);
    let failed = http
        .send(&s, &chat, &pid, "during the outage", Some("m1"))
        .await;
    assert_json_error(&failed, 503, "save_failed");
    assert_eq!(
        s.events(59606).len(),
        3,
        "first try and 2 resend attempts:\n{}",
        s.log_text()
    );
    assert_eq!(s.events(59607).len(), 1);
    let notice = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (notice["kind"].as_str(), notice["reason"].as_str()),
        (Some("notice"), Some("ucs-save-fail"))
    );
    drop(lock);

    // Nothing was acknowledged or stored; the retry with the same id lands once.
    let ok = http
        .send(&s, &chat, &pid, "during the outage", Some("m1"))
        .await
        .ok();
    assert_eq!(ok["seq"], 2);
    assert_eq!(
        texts(&http.events(&s, &chat).await),
        vec!["during the outage"]
    );
    assert_eq!(stored_event_count(&db, &chat), 2);
    let kpi = http.kpi(&s).await;
    assert_eq!(kpi["transcript_save_failed"], 3);
    // Three failed attempts, one save given up (the sender saw 503).
    let metrics = http.text(&format!("{}/metrics", s.url)).await;
    for needle in [
        "confab_transcript_saves_total{result=\"error\"} 3",
        "confab_transcript_save_failures_total 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_on_error_close_closes_the_chat_without_a_final_update() {
    let Watched {
        _dir,
        db,
        s,
        http,
        chat,
        pid,
        mut ws,
    } = Watched::start(&["settings.transcript-save-on-error=close"]).await;

    let lock = lock_store(&db);
    assert_json_error(
        &http.send(&s, &chat, &pid, "lost", None).await,
        503,
        "save_failed",
    );
    let notice = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(notice["reason"], "ucs-save-fail");
    let closed = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (closed["kind"].as_str(), closed["reason"].as_str()),
        (Some("closed"), Some("save-error"))
    );
    assert_eq!(ws.next(Duration::from_secs(2)).await, None);
    assert_eq!(ws.closed_with, Some(1000));
    // Until its closing is stored, the chat answers "closed" here, never
    // "not here" (421), which would make the gateway restore it elsewhere.
    assert_json_error(
        &http.send(&s, &chat, &pid, "meanwhile", None).await,
        409,
        "chat_closed",
    );
    assert_json_error(&http.restore(&s, &chat).await, 409, "chat_closed");
    drop(lock);

    // Once the store answers, the closing is stored, so that no instance
    // restores the chat; no final transcript is written.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = http.send(&s, &chat, &pid, "after", None).await;
        let state: Option<String> = rusqlite::Connection::open(&db)
            .unwrap()
            .query_row(
                "SELECT state FROM sessions WHERE session_id = ?1",
                [&chat],
                |r| r.get(0),
            )
            .ok();
        if a.status == 409 && state.as_deref() == Some("closed") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "closing never stored: {:?} {state:?}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finals: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM final_transcripts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(finals, 0);
    assert_eq!(http.kpi(&s).await["session_closed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_notices_off_sends_no_failure_notice() {
    let Watched {
        _dir,
        db,
        s,
        http,
        chat,
        pid,
        mut ws,
    } = Watched::start(&[
        "settings.transcript-save-on-error=continue",
        "settings.transcript-save-notices=false",
    ])
    .await;
    let lock = lock_store(&db);
    assert_json_error(
        &http.send(&s, &chat, &pid, "x", None).await,
        503,
        "save_failed",
    );
    drop(lock);
    http.send(&s, &chat, &pid, "y", None).await.ok();
    // The next thing pushed is the later message: no notice came between.
    assert_eq!(ws.next(Duration::from_secs(5)).await.unwrap()["text"], "y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_endpoints_tell_the_truth() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let http = Http::default();
    let status = http.get(&format!("{}/status", s.url), None).await.ok();
    assert_eq!(status["instance_id"], "inst-a");
    assert_eq!(status["enabled"], true);
    assert_eq!(
        status["store"],
        json!({"backend": "sqlite", "available": true, "changed_at_ms": null})
    );
    assert!(status["version"].as_str().is_some());
    assert_eq!(status["sessions_waiting"], 0);
    assert!(status["uptime_s"].as_u64().is_some());
    let (chat, pid) = http.create_session(&s, "Ann").await;
    http.send(&s, &chat, &pid, "one", None).await.ok();
    let kpi = http.kpi(&s).await;
    for k in ["session_created", "message_submitted"] {
        assert_eq!(kpi[k], 1, "{k}");
    }
    for k in ["session_closed", "session_restored"] {
        assert_eq!(kpi[k], 0, "{k}");
    }
    let metrics = http.text(&format!("{}/metrics", s.url)).await;
    for needle in [
        "confab_sessions_created_total 1",
        "confab_messages_submitted_total 1",
        "confab_sessions_active 1",
        "confab_instance_enabled 1",
        "confab_store_available{store=\"sqlite\"} 1",
        "confab_transcript_saves_total{result=\"ok\"}",
        "confab_transcript_save_duration_seconds_bucket{le=\"0.02\"}",
        "confab_build_info{version=",
        "confab_http_requests_total{component=\"instance\",route=\"/internal/v1/sessions/{id}/messages\",method=\"POST\",status=\"200\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert!(!metrics.contains(&chat), "no chat id in metric labels");
}

/// The gateway's channel carries the internal API (a real WebSocket client,
/// binary frames), and a browser (any request with an Origin) cannot open it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_channel_serves_the_internal_api_and_refuses_browsers() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Error, Message};
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let url = format!(
        "{}/internal/v1/channel",
        s.url.replacen("http://", "ws://", 1)
    );

    let secret = confab::contract::ClusterSecret::new(confab_e2e::CLUSTER_SECRET);
    let mut browser = secret.websocket_request(&url).unwrap();
    browser
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(browser).await {
        Err(Error::Http(r)) => assert_eq!(r.status().as_u16(), 403),
        other => panic!("a browser opened the channel: {:?}", other.map(|_| ())),
    }

    let (mut ws, _) = tokio_tungstenite::connect_async(secret.websocket_request(&url).unwrap())
        .await
        .unwrap();
    let create = confab::channel::encode_request(
        1,
        &reqwest::Method::POST,
        "/internal/v1/sessions",
        br#"{"nickname":"Ann"}"#,
    );
    let bad =
        confab::channel::encode_request(2, &reqwest::Method::POST, "/internal/v1/sessions", b"{");
    ws.send(Message::Binary(create)).await.unwrap();
    ws.send(Message::Binary(bad)).await.unwrap();
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 2 {
        let Some(Ok(Message::Binary(frame))) = ws.next().await else {
            panic!("the channel closed before answering");
        };
        let (id, status, body) = confab::channel::decode_answer(frame).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        answers.insert(id, (status.as_u16(), body));
    }
    assert_eq!(answers[&1].0, 201, "{:?}", answers[&1]);
    let chat = answers[&1].1["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        answers[&2].0, 400,
        "bad JSON gets its JSON error: {:?}",
        answers[&2]
    );
    assert_eq!(answers[&2].1["error"]["code"], "bad_request");
    // The chat made over the channel is there over HTTP too.
    let http = Http::default();
    let sessions = http.get(&s.internal("/sessions"), None).await.ok();
    assert!(sessions.to_string().contains(&chat), "{sessions}");
}

/// The chat's records vanish from the session store under its owner (as
/// when the TTL tables expire them): the next message is refused (409
/// `chat_closed`), the chat is closed from what the instance holds
/// (`closed`/`records-lost`, event 59618), and its final transcript, with
/// every acknowledged message, is in the contact store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_whose_records_vanish_is_closed_from_memory_with_nothing_lost() {
    let dir = data_dir();
    let db = dir.path().join("confab.db");
    let s = Server::start(dir.path(), "inst-a", &db, &[]).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;
    http.send(&s, &chat, &pid, "first", None).await.ok();
    http.send(&s, &chat, &pid, "second", None).await.ok();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("DELETE FROM sessions WHERE session_id = ?1", [&chat])
        .unwrap();
    let refused = http.send(&s, &chat, &pid, "third", None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.error_code(), "chat_closed");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stored = loop {
        let t: Option<String> = conn
            .query_row(
                "SELECT transcript FROM final_transcripts WHERE session_id = ?1",
                [&chat],
                |r| r.get(0),
            )
            .ok();
        if let Some(t) = t {
            break serde_json::from_str::<Vec<Value>>(&t).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no final transcript");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(texts(&stored), ["first", "second"]);
    let last = stored.last().unwrap();
    assert_eq!(last["kind"], "closed");
    assert_eq!(last["reason"], "records-lost");
    assert_eq!(s.events(59618).len(), 1, "{}", s.log_text());
}
