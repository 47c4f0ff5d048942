//! End-to-end on `confab up` with 3 instances: the reference's "Run a Test"
//! with a customer and an agent on WebSocket, drain, SIGTERM without
//! draining, two gateways.

use confab_e2e::cluster::{Chat, TestCluster};
use confab_e2e::texts;
use confab_e2e::ws::EventStream;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// A participant's WebSocket and everything it received.
struct Watcher {
    ws: EventStream,
    seen: Vec<Value>,
}

impl Watcher {
    async fn open(c: &TestCluster, chat: &Chat) -> Watcher {
        Watcher {
            ws: EventStream::connect(&c.ws_url(chat, 0)).await.unwrap(),
            seen: Vec::new(),
        }
    }

    /// Read until `done(seen)` holds.
    async fn until(&mut self, done: impl Fn(&[Value]) -> bool) {
        while !done(&self.seen) {
            match self.ws.next(WAIT).await {
                Some(e) => self.seen.push(e),
                None => panic!("timed out; received so far: {:#?}", self.seen),
            }
        }
    }

    fn assert_gapless(&self, who: &str) {
        let seqs: Vec<u64> = self
            .seen
            .iter()
            .filter(|e| e["ephemeral"] != true)
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{who}: every seq once, in order, from 1");
    }
}

fn count(events: &[Value], kind: &str, reason: &str) -> usize {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["reason"] == reason)
        .count()
}

fn has_text(events: &[Value], text: &str) -> bool {
    events.iter().any(|e| e["text"] == text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_a_test_kill_minus_nine_with_customer_and_agent_on_websocket() {
    let c = TestCluster::start(3, &[]).await;
    let customer = c.create_chat("Анна").await;
    let queue = c
        .http
        .get(
            &format!("{}/api/v1/queue", c.gateway),
            Some(&c.agent_credential),
        )
        .await
        .ok();
    assert!(queue["chats"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["chat_id"] == customer.id.as_str()));
    let agent = c.join(&customer, "Agent Bob").await;

    let mut cw = Watcher::open(&c, &customer).await;
    let mut aw = Watcher::open(&c, &agent).await;
    c.send(&customer, "my order is late", Some("c-1"))
        .await
        .ok();
    c.send(&agent, "let me check", Some("a-1")).await.ok();
    for w in [&mut cw, &mut aw] {
        w.until(|s| has_text(s, "let me check")).await;
    }

    // Kill -9 the instance carrying the chat.
    let owner = c.transcript(&customer).await["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.kill(&owner).await;

    // The gateway reconnects both participants by itself: they see the
    // disconnected / reconnected notices without sending anything.
    for w in [&mut cw, &mut aw] {
        w.until(|s| count(s, "joined", "reconnected") == 2).await;
        assert_eq!(count(&w.seen, "left", "disconnected"), 2);
    }
    // The chat goes on.
    c.send(&customer, "are you still there?", Some("c-2"))
        .await
        .ok();
    c.send(&agent, "yes, it ships today", Some("a-2"))
        .await
        .ok();
    for w in [&mut cw, &mut aw] {
        w.until(|s| has_text(s, "yes, it ships today")).await;
    }
    cw.assert_gapless("customer");
    aw.assert_gapless("agent");

    let t = c.transcript(&customer).await;
    assert_ne!(
        t["instance_id"],
        owner.as_str(),
        "the chat lives elsewhere now"
    );
    assert_eq!(
        texts(t["events"].as_array().unwrap()),
        vec![
            "my order is late",
            "let me check",
            "are you still there?",
            "yes, it ships today"
        ]
    );
    assert!(c.metric(&c.gateway, "confab_gateway_failovers_total").await >= 1.0);
    let gw_log = c.log("gateway");
    assert!(
        gw_log.contains("\"event_id\":59702"),
        "failover logged:\n{gw_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_in_flight_during_the_kill_is_stored_once() {
    let c = TestCluster::start(3, &[]).await;
    let chat = c.create_chat("Ann").await;
    c.send(&chat, "before", Some("m-0")).await.ok();
    let owner = chat.instance_id.clone();
    // Pause the owner so the next message hangs in flight, then kill it.
    c.act(&owner, "pause").await;
    let sender = {
        let http = c.http.clone();
        let url = format!("{}/api/v1/chats/{}/messages", c.gateway, chat.id);
        let token = chat.token.clone();
        tokio::spawn(async move {
            http.post(
                &url,
                &json!({"text": "in flight", "client_msg_id": "m-1"}),
                Some(&token),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(&owner).await;
    let answer = sender.await.unwrap();
    assert_eq!(
        answer.status, 200,
        "the sender sees one success: {:?}",
        answer.body
    );
    // The client's own retry (it never saw an answer, say) adds nothing.
    let again = c.send(&chat, "in flight", Some("m-1")).await.ok();
    assert_eq!(again["seq"], answer.body["seq"]);
    let t = c.transcript(&chat).await;
    assert_eq!(
        texts(t["events"].as_array().unwrap()),
        vec!["before", "in flight"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_takes_no_new_chats_and_reaches_zero() {
    let c = TestCluster::start(3, &[]).await;
    let chat = c.create_chat("Ann").await;
    let drained = chat.instance_id.clone();
    let url = c.instance_url(&drained).await;
    assert_eq!(
        c.http
            .post(&format!("{url}/admin/disable"), &json!({}), None)
            .await
            .status,
        401
    );
    c.http
        .post(
            &format!("{url}/admin/disable"),
            &json!({}),
            Some(&c.admin_token),
        )
        .await
        .ok();
    // The gateway skips it at once for new chats.
    for i in 0..6 {
        let other = c.create_chat(&format!("new {i}")).await;
        assert_ne!(
            other.instance_id, drained,
            "a disabled instance got a new chat"
        );
    }
    c.send(&chat, "still served", None).await.ok();
    assert_eq!(c.transcript(&chat).await["instance_id"], drained.as_str());
    let kpi = c.http.get(&format!("{url}/kpi"), None).await.ok();
    assert_eq!(
        kpi["session_created"].as_u64().unwrap() - kpi["session_closed"].as_u64().unwrap(),
        1
    );
    c.http
        .post(
            &format!("{}/api/v1/chats/{}/leave", c.gateway, chat.id),
            &json!({}),
            Some(&chat.token),
        )
        .await
        .ok();
    let kpi = c.http.get(&format!("{url}/kpi"), None).await.ok();
    assert_eq!(
        kpi["session_created"].as_u64().unwrap() - kpi["session_closed"].as_u64().unwrap(),
        0
    );
    assert!(c.log(&drained).contains("(current sessions=0)"));
    let closed = c.send(&chat, "after close", None).await;
    assert_eq!(closed.status, 409, "{:?}", closed.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_stopped_without_draining_moves_its_chats() {
    let c = TestCluster::start(3, &[]).await;
    let chat = c.create_chat("Ann").await;
    let mut w = Watcher::open(&c, &chat).await;
    c.send(&chat, "one", None).await.ok();
    w.until(|s| has_text(s, "one")).await;
    c.act(&chat.instance_id, "stop").await; // SIGTERM
    w.until(|s| count(s, "joined", "reconnected") == 1).await;
    assert_eq!(count(&w.seen, "left", "disconnected"), 1);
    c.send(&chat, "two", None).await.ok();
    w.until(|s| has_text(s, "two")).await;
    w.assert_gapless("customer");
    assert_ne!(
        c.transcript(&chat).await["instance_id"],
        chat.instance_id.as_str()
    );
}

/// The supervisor's `kill` answers once the exit is recorded, so a
/// `start` right after it (the chaos test's last step) never finds the
/// killed process still counted as running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_can_be_started_at_once() {
    let mut c = TestCluster::start(2, &[]).await;
    for _ in 0..3 {
        let killed = c.act("inst-2", "kill").await;
        assert_eq!(killed["exited"], true, "{killed}");
        let started = c.act("inst-2", "start").await;
        assert_ne!(started["pid"], killed["pid"], "{started}");
    }
    c.wait_gateway_sees(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_serve_the_same_chats_and_a_restarted_gateway_loses_nothing() {
    let mut c = TestCluster::start(2, &[]).await;
    let cluster = c.cluster().await;
    let instances: Vec<String> = cluster["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["url"].as_str().unwrap().to_owned())
        .collect();
    let port = confab_e2e::free_port();
    let second = format!("http://127.0.0.1:{port}");
    let mut gw2 = std::process::Command::new(confab_e2e::confab_bin())
        .args([
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--instance",
            &instances.join(","),
        ])
        .arg("--set")
        .arg(format!(
            "gateway.token-secret-file={}",
            c.token_secret_file.display()
        ))
        .arg("--set")
        .arg(format!("cluster.secret={}", confab_e2e::CLUSTER_SECRET))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while c
        .http
        .try_get(&format!("{second}/healthz"), None)
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let chat = c.create_chat("Ann").await;
    c.send(&chat, "via the first", None).await.ok();
    let a = c
        .send_via(&second, &chat, "via the second", None)
        .await
        .ok();
    assert_eq!(a["seq"], 3);
    c.act("gateway", "restart").await;
    c.wait_gateway_sees(2).await;
    c.send(&chat, "via the restarted first", None).await.ok();
    let t = c.transcript(&chat).await;
    assert_eq!(
        texts(t["events"].as_array().unwrap()),
        vec!["via the first", "via the second", "via the restarted first"]
    );
    let _ = gw2.kill();
    let _ = gw2.wait();
}

/// The gateway reaches instances over the channel by default, and over
/// plain HTTP with `gateway.instance-channel = false`; a chat fails over
/// after kill -9 either way, its transcript whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_works_over_the_channel_and_over_plain_http() {
    for channel in [true, false] {
        let setting = format!("gateway.instance-channel={channel}");
        let c = TestCluster::start(2, &["--set", &setting]).await;
        let chat = c.create_chat("Ann").await;
        assert_eq!(c.send(&chat, "one", Some("m1")).await.status, 200);
        let status = c
            .http
            .get(&format!("{}/status", c.gateway), None)
            .await
            .ok();
        let carrying = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["instance_id"] == chat.instance_id.as_str())
            .cloned()
            .unwrap();
        assert_eq!(carrying["channel"], channel, "{status}");
        c.kill(&chat.instance_id).await;
        assert_eq!(c.send(&chat, "two", Some("m2")).await.status, 200);
        let events = c.transcript(&chat).await["events"]
            .as_array()
            .unwrap()
            .clone();
        let messages: Vec<&str> = events
            .iter()
            .filter(|e| e["kind"] == "message")
            .filter_map(|e| e["text"].as_str())
            .collect();
        assert_eq!(messages, ["one", "two"], "channel {channel}: {events:?}");
    }
}
