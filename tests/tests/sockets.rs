//! Connection scale: an idle chat WebSocket through the gateway costs
//! kilobytes on the gateway and the instances, and with a thousand of them
//! open every acknowledged message reaches its chat's socket exactly once.
//!
//! The bound here is generous (64 KiB per socket; the cost was 274 KiB on
//! the gateway and 150 KiB on the instances before the sockets' read
//! buffers were sized for what their peers send), so that a regression
//! shows without timing noise failing the test; the targets and the
//! figures at 15,000 sockets live in `confab-bench --scenario sockets`.

use confab_e2e::cluster::{Chat, TestCluster};
use confab_e2e::sockets::{self, Book, Subscription};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SOCKETS: usize = 1_000;
const BOUND_KIB: f64 = 64.0;

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_idle_sockets_cost_kilobytes_and_every_message_arrives_once() {
    sockets::raise_descriptor_limit();
    // One address holds every socket here: no per-address cap.
    let c = TestCluster::start(2, &["--set", "http.max-connections-per-address=0"]).await;
    let chats = create_chats(&c, SOCKETS).await;
    let cluster = c.cluster().await;
    let pid_of = |id: &str| {
        cluster["components"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["id"] == id))
            .and_then(|p| p["pid"].as_u64())
            .unwrap_or_else(|| panic!("no pid for {id}: {cluster}")) as u32
    };
    let gateway = pid_of("gateway");
    let instances: Vec<u32> = cluster["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap() as u32)
        .collect();
    let instances_rss = || instances.iter().map(|p| sockets::rss_kib(*p)).sum::<u64>();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (gw_before, inst_before) = (sockets::rss_kib(gateway), instances_rss());
    let fds_before = sockets::descriptors(gateway);
    let subscriptions: Vec<Subscription> = chats
        .iter()
        .map(|chat| Subscription {
            url: format!(
                "{}/api/v1/chats/{}/ws?after=0",
                c.gateway.replacen("http://", "ws://", 1),
                chat.id
            ),
            token: chat.token.clone(),
        })
        .collect();
    let book = Arc::new(Book::default());
    let opened = sockets::open(&subscriptions, &book, 128, Duration::from_secs(60)).await;
    assert_eq!(opened, SOCKETS, "sockets that got their chat's first event");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / SOCKETS as f64;
    let gw = per(sockets::rss_kib(gateway), gw_before);
    let inst = per(instances_rss(), inst_before);
    let fds = (sockets::descriptors(gateway) - fds_before) as f64 / SOCKETS as f64;
    println!("{SOCKETS} idle sockets: gateway {gw:.1} KiB and {fds:.2} descriptors per socket, instances {inst:.1} KiB per socket");
    // One descriptor per participant: streams travel over the gateway's
    // channel to each instance, not a socket of their own.
    assert!(fds < 1.05, "gateway: {fds:.2} descriptors per socket");
    assert!(gw <= BOUND_KIB, "gateway: {gw:.1} KiB per socket");
    assert!(inst <= BOUND_KIB, "instances: {inst:.1} KiB per socket");

    // A fan-out over every chat: each acknowledged message arrives once.
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for (k, chat) in chats.iter().enumerate() {
        let (http, url, token) = (c.http.clone(), c.gateway.clone(), chat.token.clone());
        let (book, id) = (book.clone(), chat.id.clone());
        sends.spawn(async move {
            let a = http
                .post(
                    &format!("{url}/api/v1/chats/{id}/messages"),
                    &serde_json::json!({"text": format!("fan-out {k}"), "client_msg_id": format!("f{k}")}),
                    Some(&token),
                )
                .await;
            assert_eq!(a.status, 200, "{:?}", a.body);
            book.acknowledged(k, a.body["seq"].as_u64().expect("a seq"));
        });
        if sends.len() >= 64 {
            sends.join_next().await;
        }
    }
    while sends.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(20);
    while book.undelivered() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "fan-out of {SOCKETS} messages in {:.2} s: acknowledgement to delivery p50 {:?}, p99 {:?}",
        started.elapsed().as_secs_f64(),
        book.latency(0.5),
        book.latency(0.99)
    );
    assert_eq!(book.acknowledged.load(Ordering::Relaxed), SOCKETS as u64);
    assert_eq!(book.undelivered(), 0, "acknowledged but not delivered");
    assert_eq!(book.delivered.load(Ordering::Relaxed), SOCKETS as u64);
    assert_eq!(
        book.duplicates.load(Ordering::Relaxed),
        0,
        "duplicated or out of order"
    );
    assert_eq!(book.closed(), 0, "sockets closed: {:?}", book.closes.lock());
}

async fn create_chats(c: &TestCluster, n: usize) -> Vec<Chat> {
    let mut chats = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(50) {
        let made = futures_util::future::join_all(
            (batch * 50..((batch + 1) * 50).min(n)).map(|_| c.create_chat("Ann")),
        )
        .await;
        chats.extend(made);
    }
    chats
}
