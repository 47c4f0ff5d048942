//! Real `confab server` processes on the Cassandra store (the kassandra test
//! node over TCP, or CONFAB_TEST_CASSANDRA): kill -9 restoration, fencing of
//! a paused owner, and the availability alarms 59520 / 59521 when the node
//! freezes (connections open, no answers) or dies.

use confab_e2e::cql_proxy::CqlProxy;
use confab_e2e::kassandra::{
    init_keyspace, init_keyspace_with, Node, SecuredNode, TlsIdentity, NO_OUTAGE_COMMANDS,
};
use confab_e2e::{data_dir, run_confab, texts, Gateway, Http, Server, ADMIN_TOKEN};
use std::time::{Duration, Instant};

fn cassandra_sets(node: &Node, keyspace: &str) -> Vec<String> {
    vec![
        "server.store=cassandra".into(),
        format!("cassandra.contact-points={}", node.contact_point()),
        format!("cassandra.keyspace={keyspace}"),
        format!(
            "cassandra.local-dc={}",
            std::env::var("CONFAB_TEST_CASSANDRA_DC").unwrap_or_default()
        ),
        "cassandra.reconnect-timeout=2s".into(),
        format!(
            "cassandra.await-schema-agreement={}",
            confab_e2e::kassandra::schema_agreement()
        ),
    ]
}

/// [`cassandra_sets`] through `proxy`, whose faults the instance sees as
/// timeouts after 1 s.
fn via(proxy: &CqlProxy, node: &Node, keyspace: &str) -> Vec<String> {
    let mut sets = cassandra_sets(node, keyspace);
    sets.retain(|s| {
        !s.starts_with("cassandra.contact-points=")
            && !s.starts_with("cassandra.reconnect-timeout=")
    });
    sets.push(format!(
        "cassandra.contact-points={}",
        proxy.contact_point()
    ));
    sets.push("cassandra.reconnect-timeout=1s".into());
    sets
}

async fn start(dir: &std::path::Path, id: &str, sets: &[String]) -> Server {
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    Server::start(dir, id, &dir.join("contacts.db"), &refs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_minus_nine_and_restore_on_the_cassandra_store() {
    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let dir = data_dir();
    let sets = cassandra_sets(&node, &keyspace);
    let mut a = start(dir.path(), "inst-a", &sets).await;
    let b = start(dir.path(), "inst-b", &sets).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&a, "Анна").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let text = format!("сообщение {i} 🙂");
        http.send(&a, &chat, &pid, &text, Some(&format!("c{i}")))
            .await
            .ok();
        acked.push(text);
    }
    a.kill();
    let r = http.restore(&b, &chat).await.ok();
    assert_eq!(r["instance_id"], "inst-b");
    let retry = http
        .send(&b, &chat, &pid, &acked[19], Some("c19"))
        .await
        .ok();
    assert_eq!(retry["duplicate"], true, "idempotent across the kill");
    http.send(&b, &chat, &pid, "after", None).await.ok();
    acked.push("after".into());
    let events = http.events(&b, &chat).await;
    assert_eq!(texts(&events), acked);
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(reasons.contains(&"disconnected") && reasons.contains(&"reconnected"));
    // Closing moves the transcript to the contact store and deletes the rows.
    http.post(
        &b.internal(&format!("/sessions/{chat}/leave")),
        &serde_json::json!({"participant_id": pid}),
        None,
    )
    .await
    .ok();
    assert_eq!(b.events(59245).len(), 1);
    let closed = http.send(&b, &chat, &pid, "late", None).await;
    assert_eq!(closed.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_owner_cannot_write_after_restoration_on_cassandra() {
    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let dir = data_dir();
    let sets = cassandra_sets(&node, &keyspace);
    let a = start(dir.path(), "inst-a", &sets).await;
    let b = start(dir.path(), "inst-b", &sets).await;
    let http = Http::default();
    let (chat, pid, answer) = confab_e2e::paused_owner_writes_after_restore(&http, &a, &b).await;
    assert_eq!(
        answer.status,
        421,
        "the stale owner's write must be refused: {:?}\n--- inst-a log:\n{}\n--- inst-b log:\n{}",
        answer.body,
        a.log_text(),
        b.log_text()
    );
    http.send(&b, &chat, &pid, "and on", None).await.ok();
    let events = http.events(&b, &chat).await;
    assert_eq!(
        texts(&events),
        vec!["before the pause", "new owner", "and on"],
        "{events:#?}\n--- inst-a log:\n{}\n--- inst-b log:\n{}",
        a.log_text(),
        b.log_text()
    );
}

/// `[cassandra] tls-ca-file`, `username` and `password-file` reach a node
/// that requires TLS and a password; each wrong or missing piece stops
/// start-up with a message that says what failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_password_authentication() {
    let dir = data_dir();
    let Some(secured) = SecuredNode::get(dir.path()).await else {
        println!("skipped: set CONFAB_TEST_CASSANDRA_CA_FILE, _USERNAME and _PASSWORD for the real cluster's TLS and credentials");
        return;
    };
    let options = secured.options(dir.path());
    let keyspace = init_keyspace_with(&secured.node.contact_point(), &options).await;
    let mut sets = cassandra_sets(&secured.node, &keyspace);
    sets.extend(options.iter().map(|(o, v)| format!("{o}={v}")));
    let a = start(dir.path(), "inst-a", &sets).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&a, "Ann").await;
    http.send(&a, &chat, &pid, "über TLS 🔒", Some("c1"))
        .await
        .ok();
    assert_eq!(texts(&http.events(&a, &chat).await), vec!["über TLS 🔒"]);
    let status = http.get(&format!("{}/status", a.url), None).await.ok();
    assert_eq!(status["store"]["available"], true, "{status}");

    let wrong_password = dir.path().join("wrong-password");
    std::fs::write(&wrong_password, "not-the-password\n").expect("write");
    let other_ca = dir.path().join("other-ca.pem");
    let other = TlsIdentity::generate().expect("certificate");
    std::fs::write(&other_ca, &other.cert_pem).expect("write");
    let replace = |option: &str, value: Option<String>| -> Vec<String> {
        let mut s: Vec<String> = sets
            .iter()
            .filter(|s| !s.starts_with(&format!("{option}=")))
            .cloned()
            .collect();
        if let Some(v) = value {
            s.push(format!("{option}={v}"));
        }
        s
    };
    let cases = [
        (
            "a wrong password",
            replace(
                "cassandra.password-file",
                Some(wrong_password.display().to_string()),
            ),
            "password",
        ),
        (
            "no credentials",
            replace("cassandra.username", None)
                .into_iter()
                .filter(|s| !s.starts_with("cassandra.password-file="))
                .collect(),
            "Authentication",
        ),
        (
            "a CA that did not sign the node's certificate",
            replace(
                "cassandra.tls-ca-file",
                Some(other_ca.display().to_string()),
            ),
            "certificate verify failed",
        ),
        // The node hangs up on a plain-text client.
        (
            "no TLS",
            replace("cassandra.tls-ca-file", None),
            "onnection",
        ),
    ];
    for (what, sets, expected) in cases {
        let mut args = vec![
            "server".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--sqlite-path".into(),
            dir.path().join("contacts.db").display().to_string(),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s);
        }
        let (code, err) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_confab(&args, &[])
        })
        .await
        .expect("confab run");
        assert_ne!(code, 0, "{what}: start-up must fail:\n{err}");
        assert!(
            err.contains("connecting to Cassandra at") && err.contains(expected),
            "{what}: the error must say why (expected {expected:?}):\n{err}"
        );
        println!("{what}: {}", err.lines().last().unwrap_or_default());
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn gauge(http: &Http, s: &Server) -> String {
    let text = http.text(&format!("{}/metrics", s.url)).await;
    text.lines()
        .find(|l| l.starts_with("confab_store_available{store=\"cassandra\"}"))
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frozen_and_dead_nodes_raise_59520_then_59521_once_each() {
    let node = Node::get().await;
    let Some(outages) = node.outages() else {
        println!("{NO_OUTAGE_COMMANDS}");
        return;
    };
    let keyspace = init_keyspace(&node.contact_point()).await;
    let dir = data_dir();
    let mut sets = cassandra_sets(&node, &keyspace);
    sets.extend([
        "settings.transcript-resend-attempts=1".to_string(),
        "settings.transcript-resend-delay=200ms".to_string(),
        "settings.transcript-save-on-error=continue".to_string(),
    ]);
    let s = start(dir.path(), "inst-a", &sets).await;
    let http = Http::default();
    let (chat, pid) = http.create_session(&s, "Ann").await;
    http.send(&s, &chat, &pid, "before", None).await.ok();
    assert!(gauge(&http, &s).await.ends_with(" 1"));

    // A frozen node: connections stay open, nothing answers.
    outages.freeze();
    wait_for("59520 after the freeze", || s.events(59520).len() == 1).await;
    let e = &s.events(59520)[0];
    assert_eq!(e["message"], "Cassandra status changed to \"UNAVAILABLE\"");
    assert!(gauge(&http, &s).await.ends_with(" 0"));
    let status = http.get(&format!("{}/status", s.url), None).await.ok();
    assert_eq!(status["store"]["available"], false);
    assert_eq!(
        http.get(&format!("{}/readyz", s.url), None).await.status,
        503
    );
    assert_eq!(
        http.get(&format!("{}/healthz", s.url), None).await.status,
        200,
        "alive"
    );
    let refused = http
        .post(
            &s.internal("/sessions"),
            &serde_json::json!({"nickname": "new"}),
            None,
        )
        .await;
    assert_eq!(refused.status, 503, "not ready for new chats");
    let failed = http
        .send(&s, &chat, &pid, "during the outage", Some("m1"))
        .await;
    assert_eq!(
        (failed.status, failed.error_code()),
        (503, "save_failed"),
        "no acknowledgement without a save"
    );
    assert_eq!(s.events(59520).len(), 1, "logged once per transition");

    outages.resume();
    wait_for("59521 after the thaw", || s.events(59521).len() == 1).await;
    assert_eq!(
        s.events(59521)[0]["message"],
        "Cassandra status changed to \"AVAILABLE\""
    );
    assert!(gauge(&http, &s).await.ends_with(" 1"));
    let ok = http
        .send(&s, &chat, &pid, "during the outage", Some("m1"))
        .await
        .ok();
    assert!(ok["seq"].as_u64().is_some(), "the chat continues");

    // A dead node: connections refused.
    outages.kill();
    wait_for("59520 after the kill", || s.events(59520).len() == 2).await;
    outages.restart().await;
    wait_for("59521 after the restart", || s.events(59521).len() == 2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = http
            .send(&s, &chat, &pid, "after the restart", Some("m2"))
            .await;
        if a.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the chat did not continue: {:?}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        texts(&http.events(&s, &chat).await),
        vec!["before", "during the outage", "after the restart"]
    );
    let metrics = http.text(&format!("{}/metrics", s.url)).await;
    assert!(
        metrics.contains(
            "confab_store_status_transitions_total{store=\"cassandra\",status=\"unavailable\"} 2"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confab_up_runs_on_the_cassandra_store() {
    let node = Node::get().await;
    let keyspace = format!(
        "confab_up_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dc = format!(
        "cassandra.local-dc={}",
        std::env::var("CONFAB_TEST_CASSANDRA_DC").unwrap_or_default()
    );
    let ks = format!("cassandra.keyspace={keyspace}");
    let cp = node.contact_point();
    let agreement = format!(
        "cassandra.await-schema-agreement={}",
        confab_e2e::kassandra::schema_agreement()
    );
    let c = confab_e2e::cluster::TestCluster::start(
        2,
        &[
            "--store",
            "cassandra",
            "--cassandra-contact-points",
            &cp,
            "--set",
            &ks,
            "--set",
            &dc,
            "--set",
            &agreement,
        ],
    )
    .await;
    let chat = c.create_chat("Ann").await;
    c.send(&chat, "on cassandra", None).await.ok();
    c.kill(&chat.instance_id).await;
    c.send(&chat, "after the kill", None).await.ok();
    let t = c.transcript(&chat).await;
    assert_ne!(t["instance_id"], chat.instance_id.as_str());
    assert_eq!(
        texts(t["events"].as_array().unwrap()),
        vec!["on cassandra", "after the kill"]
    );
    let status = c
        .http
        .get(
            &format!(
                "{}/status",
                c.instance_url(t["instance_id"].as_str().unwrap()).await
            ),
            None,
        )
        .await
        .ok();
    assert_eq!(status["store"]["backend"], "cassandra");
}

/// Lost answers: instance A reaches the store through a proxy that drops
/// the node's answers while its writes still land. A's save of m4 times
/// out (applied, unacknowledged); instance B takes the chat over; the
/// answers come back and A, which must resend m4 identical before writing
/// anything else, finds itself fenced. Every acknowledged message is in B's
/// transcript exactly once and in order; m4 (stored, never acknowledged)
/// shows once, and the sender's retry of it is answered as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_answers_while_another_instance_takes_over_lose_nothing() {
    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let proxy = CqlProxy::start(&node.contact_point()).await;
    let dir = data_dir();
    let settings = [
        "settings.transcript-resend-attempts=1".to_string(),
        "settings.transcript-resend-delay=100ms".to_string(),
        "settings.transcript-save-on-error=continue".to_string(),
    ];
    let mut through_proxy = via(&proxy, &node, &keyspace);
    through_proxy.extend(settings.iter().cloned());
    let mut direct = cassandra_sets(&node, &keyspace);
    direct.extend(settings.iter().cloned());
    let a = start(dir.path(), "inst-a", &through_proxy).await;
    let b = start(dir.path(), "inst-b", &direct).await;
    let http = Http::default();

    let (chat, pid) = http.create_session(&a, "Ann").await;
    let mut acknowledged = Vec::new();
    for i in 1..=3 {
        let text = format!("m{i}");
        http.send(&a, &chat, &pid, &text, Some(&format!("c{i}")))
            .await
            .ok();
        acknowledged.push(text);
    }
    proxy.drop_answers(true);
    let lost = http.send(&a, &chat, &pid, "m4", Some("c4")).await;
    assert_eq!(
        (lost.status, lost.error_code()),
        (503, "save_failed"),
        "no acknowledgement without an answer: {:?}",
        lost.body
    );
    assert!(proxy.dropped() >= 2, "answers dropped: {}", proxy.dropped());

    let taken = http.restore(&b, &chat).await.ok();
    assert_eq!(taken["instance_id"], "inst-b");
    proxy.drop_answers(false);
    // A resends m4 (its keys are taken) and learns it is no longer the owner.
    let fenced = http.send(&a, &chat, &pid, "m5", Some("c5")).await;
    assert_eq!(fenced.status, 421, "{:?}", fenced.body);

    // The sender retries m4 and m5 on the new owner.
    let retry = http.send(&b, &chat, &pid, "m4", Some("c4")).await.ok();
    assert_eq!(retry["duplicate"], true, "m4 landed before the take-over");
    acknowledged.push("m4".into());
    http.send(&b, &chat, &pid, "m5", Some("c5")).await.ok();
    acknowledged.push("m5".into());
    let events = http.events(&b, &chat).await;
    assert_eq!(texts(&events), acknowledged);
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // What the store holds, read afresh: A takes the chat back.
    let back = http.restore(&a, &chat).await.ok();
    assert_eq!(back["instance_id"], "inst-a");
    assert_eq!(texts(&http.events(&a, &chat).await), acknowledged);
}

/// The end-to-end case: one instance's link to the store loses
/// answers (writes applied, answers dropped), then gets them late, then
/// has its writes applied late, each for 6 s, while 16 chats send through
/// a gateway as fast as they are acknowledged (a failed request retried
/// with the same client_msg_id). Each time the gateway moves that
/// instance's chats to the other one (it cannot reach the store while the
/// other can), which fences it; between the faults the chats are taken
/// back to it. Every acknowledged message is in its chat's transcript
/// once, in order (the history checker).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_losing_its_stores_answers_has_its_chats_moved_and_loses_nothing() {
    use confab_e2e::load::{check, load};
    use std::sync::Arc;

    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let proxy = CqlProxy::start(&node.contact_point()).await;
    let dir = data_dir();
    let a = start(dir.path(), "inst-a", &via(&proxy, &node, &keyspace)).await;
    let b = start(dir.path(), "inst-b", &cassandra_sets(&node, &keyspace)).await;
    let gateway = Gateway::start(dir.path(), &[&a.url, &b.url]).await;
    let stop = Arc::new(tokio::sync::Notify::new());
    let sending = tokio::spawn(load(vec![gateway.url.clone()], 16, stop.clone()));
    let window = Duration::from_secs(6);
    let http = Http::default();
    // Between the faults every chat goes back to inst-a (restored there,
    // as a gateway would), so that each fault meets busy chats; the
    // gateway finds them there when inst-b answers that it lost them.
    let back_to_a = || async {
        let hosted = http
            .get(
                &format!("{}/admin/sessions?limit=500", b.url),
                Some(ADMIN_TOKEN),
            )
            .await
            .ok();
        for s in hosted["sessions"].as_array().into_iter().flatten() {
            if let Some(chat) = s["session_id"].as_str() {
                http.restore(&a, chat).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.drop_answers(true);
    tokio::time::sleep(window).await;
    proxy.drop_answers(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    back_to_a().await;
    proxy.hold_answers(Duration::from_secs(3));
    tokio::time::sleep(window).await;
    proxy.hold_answers(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    back_to_a().await;
    proxy.hold_requests(Duration::from_secs(3));
    tokio::time::sleep(window).await;
    proxy.hold_requests(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.notify_one();
    let (chats, longest) = sending.await.expect("the load");
    let checked = check(gateway.url.clone(), &chats, None).await;
    let moved = gateway
        .metric("confab_gateway_failovers_total{result=\"ok\"}")
        .await;
    let (held_answers, held_requests) = proxy.held();
    let retries: usize = chats.iter().map(|c| c.retries).sum();
    println!(
        "{} acknowledged messages in {} chats checked; {} answers dropped, {held_answers} held, \
         {held_requests} requests held; {moved} chats moved; {retries} client retries; \
         longest wait for an acknowledgement {longest:?}; fenced writes on inst-a: {}",
        checked.read,
        chats.len(),
        proxy.dropped(),
        a.events(59608).len()
    );
    assert!(
        checked.problems.is_empty(),
        "{:#?}\ninst-a:\n{}",
        checked.problems,
        a.log_text()
    );
    assert!(checked.read > 100, "too little traffic: {}", checked.read);
    assert!(proxy.dropped() > 0 && held_answers > 0 && held_requests > 0);
    assert!(moved >= 1.0, "the gateway moved no chat");
    drop(b);
}
