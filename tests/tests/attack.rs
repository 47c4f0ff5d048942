//! The trust boundaries, probed as an attacker on the same network would:
//! the instances' internal API and channel refuse callers without the
//! cluster secret (over HTTP, WebSocket and the channel) and change nothing
//! for them; instances take only JSON and no browser; made-up methods and
//! paths cannot grow `/metrics`. Real processes on loopback, and a plain
//! HTTP client that does not carry the harness's cluster secret.

use confab_e2e::cluster::TestCluster;
use confab_e2e::{data_dir, Http, Server, CLUSTER_SECRET, CLUSTER_SECRET_HEADER};
use serde_json::{json, Value};

/// A client with no cluster secret: what anyone on the network has.
fn outsider() -> reqwest::Client {
    confab_e2e::client().build().unwrap()
}

async fn status_and_body(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn the_internal_api_refuses_callers_without_the_cluster_secret() {
    let dir = data_dir();
    let s = Server::start(dir.path(), "inst-a", &dir.path().join("c.db"), &[]).await;
    let http = Http::default();
    let (chat, customer) = http.create_session(&s, "Ann").await;
    http.send(&s, &chat, &customer, "hello", None).await.ok();
    let before = http.events(&s, &chat).await;
    let out = outsider();

    let probes: Vec<(reqwest::RequestBuilder, &str)> = vec![
        (
            out.get(s.internal("/sessions?state=waiting")),
            "list the queue",
        ),
        (
            out.get(s.internal(&format!("/sessions/{chat}/transcript"))),
            "read a transcript",
        ),
        (
            out.post(s.internal(&format!("/sessions/{chat}/messages")))
                .json(&json!({"participant_id": customer, "text": "forged"})),
            "post as the customer",
        ),
        (
            out.post(s.internal(&format!("/sessions/{chat}/join")))
                .json(&json!({"nickname": "fake agent"})),
            "join as an agent",
        ),
        (
            out.post(s.internal(&format!("/sessions/{chat}/restore"))),
            "restore a healthy chat",
        ),
        (
            out.post(s.internal(&format!("/sessions/{chat}/leave")))
                .json(&json!({"participant_id": customer})),
            "close the chat",
        ),
        (
            out.post(s.internal("/sessions"))
                .json(&json!({"nickname": "x"})),
            "create a chat",
        ),
        (
            out.post(s.internal(&format!("/sessions/{chat}/messages")))
                .header(CLUSTER_SECRET_HEADER, "not-the-secret")
                .json(&json!({"participant_id": customer, "text": "forged"})),
            "post with a wrong secret",
        ),
    ];
    for (request, what) in probes {
        let (status, body) = status_and_body(request.send().await.unwrap()).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    }
    assert_eq!(http.events(&s, &chat).await, before, "nothing changed");

    // The per-chat WebSocket and the gateways' channel: refused before the
    // upgrade, with or without a wrong secret.
    let ws = s.url.replacen("http://", "ws://", 1);
    for url in [
        format!("{ws}/internal/v1/sessions/{chat}/ws"),
        format!("{ws}{}", confab::channel::PATH),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 401, "{url}")
            }
            other => panic!("{url}: expected 401, got {:?}", other.map(|_| "a socket")),
        }
    }

    let metrics = http.text(&format!("{}/metrics", s.url)).await;
    let refused: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("confab_internal_auth_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        refused >= 10.0,
        "every refusal counted: {refused}\n{metrics}"
    );
    assert!(
        !s.events(59616).is_empty(),
        "refusals are logged (event 59616):\n{}",
        s.log_text()
    );
    // The management surface Prometheus and load balancers use stays open.
    for path in ["/healthz", "/readyz", "/status", "/kpi", "/metrics"] {
        let r = out.get(format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn instances_take_only_json_and_no_browsers() {
    let dir = data_dir();
    let s = Server::start(dir.path(), "inst-a", &dir.path().join("c.db"), &[]).await;
    let insider = confab_e2e::client().build().unwrap();
    let plain = insider
        .post(s.internal("/sessions"))
        .header(CLUSTER_SECRET_HEADER, CLUSTER_SECRET)
        .header("content-type", "text/plain")
        .body(r#"{"nickname": "Ann"}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(plain).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type")),
        "{body}"
    );
    let browser = insider
        .get(s.internal("/sessions?state=waiting"))
        .header(CLUSTER_SECRET_HEADER, CLUSTER_SECRET)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(browser).await;
    assert_eq!(status, 403, "{body}");
    let listed = Http::default()
        .get(&s.internal("/sessions?state=waiting"), None)
        .await
        .ok();
    assert_eq!(listed["sessions"], json!([]), "nothing was created");
}

#[tokio::test]
async fn made_up_methods_and_paths_do_not_grow_the_metrics() {
    let c = TestCluster::start(1, &[]).await;
    let instance = c.instance_url("inst-1").await;
    let client = outsider();
    for base in [c.gateway.clone(), instance] {
        // Warm up: the series such requests make (a made-up method, an
        // unknown path, the scrape itself) exist from now on; no more may
        // appear.
        for i in 0..3 {
            let method = reqwest::Method::from_bytes(format!("WARM{i}").as_bytes()).unwrap();
            let _ = client.request(method, format!("{base}/x{i}")).send().await;
            let _ = client.get(format!("{base}/warm-{i}")).send().await;
        }
        c.http.text(&format!("{base}/metrics")).await;
        let before = c.http.text(&format!("{base}/metrics")).await;
        for i in 0..300 {
            let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
            let _ = client
                .request(method, format!("{base}/made/up/{i}"))
                .send()
                .await;
            let _ = client.get(format!("{base}/nothing-{i}")).send().await;
        }
        let text = c.http.text(&format!("{base}/metrics")).await;
        // The series that appeared meanwhile: none may be keyed by what a
        // client sent (other components' periodic work, the store probe,
        // say, may add their own on a loaded machine).
        let series = |t: &str| -> std::collections::BTreeSet<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k.to_owned()))
                .collect()
        };
        let new: Vec<String> = series(&text)
            .difference(&series(&before))
            .cloned()
            .collect();
        assert!(
            new.iter()
                .all(|k| !k.contains("method=") && !k.contains("route=") && !k.contains("path=")),
            "{base}: request series appeared: {new:#?}"
        );
        assert!(
            new.len() <= 20,
            "{base}: /metrics grew from {} to {} bytes: {new:#?}",
            before.len(),
            text.len()
        );
        assert!(
            !text.contains("M17X"),
            "{base}: a made-up method became a label"
        );
        assert!(
            !text.contains("nothing-17"),
            "{base}: a made-up path became a label"
        );
        assert!(
            text.contains("method=\"other\""),
            "{base}: unknown methods count as other"
        );
    }
}

#[tokio::test]
async fn every_error_is_json_and_the_pages_cannot_be_framed_or_injected() {
    let c = TestCluster::start(1, &[]).await;
    let gw = &c.gateway;
    let instance = c.instance_url("inst-1").await;
    let client = outsider();

    let page = client.get(format!("{gw}/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains("<style>"),
        "no inline code:\n{html}"
    );
    for asset in ["chat-common.js", "chat.js", "agent.js", "pages.css"] {
        let r = client
            .get(format!("{gw}/assets/{asset}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asset}");
    }

    let chat = c.create_chat("Ann").await;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client.delete(format!("{gw}/api/v1/chats")),
            405,
            "method_not_allowed",
        ),
        (
            client.delete(format!("{instance}/status")),
            405,
            "method_not_allowed",
        ),
        (client.get(format!("{gw}/assets/nope.js")), 404, "not_found"),
        (
            client.get(format!(
                "{gw}/api/v1/chats/{}/ws?token={}",
                chat.id, chat.token
            )),
            400,
            "",
        ),
        (
            client.get(format!("{gw}/api/v1/chats/%FF%FE/transcript")),
            0,
            "",
        ),
    ];
    for (request, status, code) in cases {
        let r = request.send().await.unwrap();
        let got = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json")),
            "{got} without JSON: {content_type:?}"
        );
        assert!(body["error"]["message"].is_string(), "{got}: {body}");
        if status != 0 {
            assert_eq!(got, status, "{body}");
        } else {
            assert!((400..500).contains(&got), "{got}: {body}");
        }
        if !code.is_empty() {
            assert_eq!(body["error"]["code"], code, "{body}");
        }
    }

    // A serde message names no type of ours.
    let r = client
        .post(format!("{gw}/api/v1/chats"))
        .json(&json!("text"))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(r).await;
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains("struct"), "{message}");
}

#[tokio::test]
async fn control_characters_and_a_reused_client_msg_id_are_refused() {
    let c = TestCluster::start(1, &[]).await;
    let gw = &c.gateway;
    for nickname in ["evil\u{202E}gnp.exe", "bell\u{7}", "esc\u{1b}[2J"] {
        let a = c
            .http
            .post(
                &format!("{gw}/api/v1/chats"),
                &json!({"nickname": nickname}),
                None,
            )
            .await;
        assert_eq!(a.status, 400, "{nickname:?}: {:?}", a.body);
    }
    let chat = c.create_chat("Ann").await;
    let agent = c.join(&chat, "Bob").await;
    for text in ["nul\u{0}", "esc\u{1b}[31mred"] {
        let a = c.send(&chat, text, None).await;
        assert_eq!(a.status, 400, "{text:?}: {:?}", a.body);
    }
    assert_eq!(
        c.send(&chat, "two\nlines\tand a tab", None).await.status,
        200
    );

    // The customer's message with id "1"; the agent's own "1" is another
    // message: refused with 409, never taken as a retry and dropped.
    let first = c.send(&chat, "my order is late", Some("1")).await.ok();
    let again = c.send(&chat, "my order is late", Some("1")).await.ok();
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["duplicate"], true);
    let agents = c.send(&agent, "refund approved", Some("1")).await;
    assert_eq!(agents.status, 409, "{:?}", agents.body);
    assert_eq!(agents.body["error"]["code"], "client_msg_id_reused");
    let other_text = c.send(&chat, "something else", Some("1")).await;
    assert_eq!(other_text.status, 409, "{:?}", other_text.body);
    let texts = confab_e2e::texts(c.transcript(&chat).await["events"].as_array().unwrap());
    assert_eq!(texts, vec!["two\nlines\tand a tab", "my order is late"]);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_chat_refuses_more_and_its_reads_come_in_bounded_pages() {
    let dir = data_dir();
    let s = Server::start(
        dir.path(),
        "inst-a",
        &dir.path().join("c.db"),
        &[
            "server.max-transcript-bytes=2200000",
            "server.max-transcript-events=200",
        ],
    )
    .await;
    let http = Http::default();
    let (chat, customer) = http.create_session(&s, "Ann").await;
    let big = "x".repeat(64 * 1024);
    let mut accepted = 0;
    let refused = loop {
        let a = http.send(&s, &chat, &customer, &big, None).await;
        if a.status != 200 {
            break a;
        }
        accepted += 1;
        assert!(accepted < 100, "no cap");
    };
    assert_eq!(accepted, 33, "2,200,000 bytes hold 33 texts of 64 KiB");
    assert_eq!(
        (refused.status, refused.error_code()),
        (409, "transcript_full"),
        "{:?}",
        refused.body
    );
    // Small messages still fit under the byte cap, up to the event cap.
    let mut small = 0;
    loop {
        let a = http.send(&s, &chat, &customer, "hi", None).await;
        if a.status != 200 {
            assert_eq!(a.error_code(), "transcript_full");
            break;
        }
        small += 1;
    }
    assert_eq!(
        1 + accepted + small,
        200,
        "the event cap counts every event"
    );

    // A read answers a bounded page; following `more` gets everything once.
    let url = s.internal(&format!("/sessions/{chat}/transcript"));
    let first = confab_e2e::client()
        .build()
        .unwrap()
        .get(&url)
        .header(CLUSTER_SECRET_HEADER, CLUSTER_SECRET)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(first.len() < 1_300_000, "a page of {} bytes", first.len());
    let first: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(first["more"], true);
    let all = http.events(&s, &chat).await;
    assert_eq!(all.len(), 200);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let limited = http.get(&format!("{url}?after=0&limit=2"), None).await.ok();
    assert_eq!(limited["events"].as_array().unwrap().len(), 2);
    let bad = http.get(&format!("{url}?limit=5000"), None).await;
    assert_eq!(bad.status, 400);

    // Nothing breaks for the others, nor for this chat's closing.
    let (other, other_customer) = http.create_session(&s, "Bea").await;
    http.send(&s, &other, &other_customer, "fine here", None)
        .await
        .ok();
    let left = http
        .post(
            &s.internal(&format!("/sessions/{chat}/leave")),
            &json!({"participant_id": customer}),
            None,
        )
        .await;
    assert_eq!(
        left.status, 200,
        "a full chat still closes: {:?}",
        left.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_read_cost_an_instance_little() {
    let dir = data_dir();
    let s = Server::start(dir.path(), "inst-a", &dir.path().join("c.db"), &[]).await;
    let http = Http::default();
    let (chat, customer) = http.create_session(&s, "Ann").await;
    let big = "x".repeat(64 * 1024);
    // 8 MiB of text, the default cap.
    for _ in 0..127 {
        http.send(&s, &chat, &customer, &big, None).await.ok();
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = rss_kib(s.pid());
    let secret = confab::contract::ClusterSecret::new(CLUSTER_SECRET);
    let url = format!(
        "{}/internal/v1/sessions/{chat}/ws",
        s.url.replacen("http://", "ws://", 1)
    );
    let mut sockets = Vec::new();
    for _ in 0..30 {
        let (socket, _) = tokio_tungstenite::connect_async(secret.websocket_request(&url).unwrap())
            .await
            .unwrap();
        sockets.push(socket); // never read
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = rss_kib(s.pid());
    let grown = after.saturating_sub(before) / 1024;
    println!("30 non-reading sockets on an 8 MiB chat: instance RSS {before} -> {after} KiB");
    // Each reader holds at most a page of the backlog (~256 KiB of text)
    // while its socket is full; a copy of the whole backlog each would be
    // 30 x 8 MiB and more.
    assert!(
        grown < 64,
        "30 non-reading sockets grew the instance by {grown} MiB ({before} -> {after} KiB)"
    );
    drop(sockets);
}

#[tokio::test]
async fn one_participant_holds_a_bounded_number_of_sockets() {
    let c = TestCluster::start(1, &["--set", "gateway.max-sockets-per-participant=3"]).await;
    let chat = c.create_chat("Ann").await;
    let url = c.ws_url(&chat, 0);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(tokio_tungstenite::connect_async(&url).await.unwrap().0);
    }
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("a fourth socket: {:?}", other.map(|_| "opened")),
    }
    let mut one = open.pop().unwrap();
    one.close(None).await.unwrap();
    let mut reopened = false;
    for _ in 0..50 {
        // The relay notices the close on its next read.
        if tokio_tungstenite::connect_async(&url).await.is_ok() {
            reopened = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reopened, "a closed socket frees its place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_chats_from_one_address_neither_hides_others_nor_stays() {
    let c = TestCluster::start(
        2,
        &[
            "--set",
            "gateway.rate-limit-per-second=20",
            "--set",
            "gateway.rate-limit-burst=40",
            "--set",
            "gateway.trusted-proxies=127.0.0.1",
            "--set",
            "server.waiting-timeout=3s",
        ],
    )
    .await;
    let client = outsider();
    let create = |from: &'static str, nickname: String| {
        let request = client
            .post(format!("{}/api/v1/chats", c.gateway))
            .header("x-forwarded-for", from)
            .json(&json!({"nickname": nickname}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut created = 0;
    let mut limited = 0;
    for i in 0..200 {
        match create("203.0.113.66", format!("flood {i}")).await {
            201 => created += 1,
            429 => limited += 1,
            other => panic!("flood: {other}"),
        }
    }
    assert!(
        limited >= 100 && created <= 100,
        "one address is throttled: {created} created, {limited} limited"
    );
    assert_eq!(create("198.51.100.20", "Real customer".into()).await, 201);
    let queue = |c: &TestCluster| {
        let url = format!("{}/api/v1/queue", c.gateway);
        let token = c.agent_credential.clone();
        let http = c.http.clone();
        async move { http.get(&url, Some(&token)).await.ok() }
    };
    let waiting = queue(&c).await;
    let names: Vec<&str> = waiting["chats"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ch| ch["nickname"].as_str())
        .collect();
    assert!(
        names.contains(&"Real customer"),
        "visible to agents: {names:?}"
    );
    // Nobody takes them: after server.waiting-timeout they are closed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = queue(&c).await["chats"].as_array().unwrap().len();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} chats still waiting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let closed = c.log("inst-1") + &c.log("inst-2");
    assert!(
        closed.contains("waiting chat closed: no agent took it"),
        "{closed}"
    );
}

#[tokio::test]
async fn a_participant_who_left_cannot_post_or_read_on_and_tokens_stay_out_of_urls() {
    use futures_util::StreamExt;
    let c = TestCluster::start(1, &[]).await;
    let chat = c.create_chat("Ann").await;
    let agent = c.join(&chat, "Bob").await;
    c.send(&agent, "hello, Bob here", None).await.ok();
    // The agent's socket, open while they leave, ends after their leaving.
    let (mut agent_socket, _) = tokio_tungstenite::connect_async(c.ws_url(&agent, 0))
        .await
        .unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), agent_socket.next())
        .await
        .expect("the backlog")
        .unwrap()
        .unwrap();
    assert!(first.is_text(), "{first:?}");
    let left = c
        .http
        .post(
            &format!("{}/api/v1/chats/{}/leave", c.gateway, chat.id),
            &json!({"end_chat": false}),
            Some(&agent.token),
        )
        .await;
    assert_eq!(left.status, 200, "{:?}", left.body);
    let after_leaving = c.send(&agent, "still here?", None).await;
    assert_eq!(
        (after_leaving.status, after_leaving.error_code()),
        (403, "participant_left"),
        "{:?}",
        after_leaving.body
    );
    assert_eq!(
        c.send(&chat, "the customer goes on", None).await.status,
        200
    );
    let (seen, code) = read_until_close(&mut agent_socket).await;
    assert_eq!(code, Some(4001), "the left agent's socket: {seen:?}");
    let last = seen.last().expect("events before the close");
    assert_eq!(
        (last["kind"].as_str(), last["participant_id"].as_str()),
        (Some("left"), Some(agent.participant_id.as_str())),
        "{seen:?}"
    );
    // Reading again: the transcript ends at their leaving…
    let theirs = c.transcript(&agent).await;
    let texts = confab_e2e::texts(theirs["events"].as_array().unwrap());
    assert!(
        !texts.iter().any(|t| t == "the customer goes on"),
        "{texts:?}"
    );
    assert_eq!(theirs["left_at"], last["seq"], "{theirs}");
    // …while the customer's goes on.
    let customers = c.transcript(&chat).await;
    assert!(confab_e2e::texts(customers["events"].as_array().unwrap())
        .iter()
        .any(|t| t == "the customer goes on"));
    // A new socket is closed with 4001 at once, and the token is not renewed.
    let (mut again, _) = tokio_tungstenite::connect_async(c.ws_url(&agent, 0))
        .await
        .unwrap();
    let (seen, code) = read_until_close(&mut again).await;
    assert_eq!((seen.len(), code), (0, Some(4001)), "{seen:?}");
    let renewed = c
        .http
        .post(
            &format!("{}/api/v1/chats/{}/token", c.gateway, chat.id),
            &json!({}),
            Some(&agent.token),
        )
        .await;
    assert_eq!(
        (renewed.status, renewed.error_code()),
        (403, "participant_left"),
        "{:?}",
        renewed.body
    );

    // The token as a subprotocol: no token in the URL, the protocol echoed.
    let url = format!(
        "{}/api/v1/chats/{}/ws?after=0",
        c.gateway.replacen("http://", "ws://", 1),
        chat.id
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            url.as_str(),
        )
        .unwrap();
    let protocol = format!("confab.token.{}", chat.token);
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        protocol.as_str()
    );
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    let event: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(event["seq"], 1, "{event}");
    // Neither the subprotocol nor the query: 401 in JSON.
    let bare = format!(
        "{}/api/v1/chats/{}/ws",
        c.gateway.replacen("http://", "ws://", 1),
        chat.id
    );
    match tokio_tungstenite::connect_async(bare.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("{:?}", other.map(|_| "opened")),
    }
}

#[tokio::test]
async fn an_oversized_frame_gets_close_1009_not_a_reset() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let c = TestCluster::start(1, &[]).await;
    let chat = c.create_chat("Ann").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(c.ws_url(&chat, 0))
        .await
        .unwrap();
    socket
        .send(Message::Text("x".repeat(70 * 1024).into()))
        .await
        .unwrap();
    let (_, code) = read_until_close(&mut socket).await;
    assert_eq!(code, Some(1009));
}

/// The events a socket receives until it is closed, and the close code.
async fn read_until_close(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (Vec<Value>, Option<u16>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return (seen, frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(Message::Text(t)))) => seen.push(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => {}
            other => panic!("the socket ended without a close frame: {other:?} after {seen:?}"),
        }
    }
}

/// Connect to `base` (`http://host:port`) with a raw TCP socket.
async fn raw(base: &str) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Wait until the server closes `stream` (or answers and closes): the
/// bytes it sent, and how long after `since` that happened; None if it
/// was still open at `limit`.
async fn closed_by_server(
    mut stream: tokio::net::TcpStream,
    trickle: &'static [u8],
    since: std::time::Instant,
    limit: std::time::Duration,
) -> Option<(String, std::time::Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut trickled = 0;
    while since.elapsed() < limit {
        match tokio::time::timeout(std::time::Duration::from_millis(200), stream.read(&mut buf))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((String::from_utf8_lossy(&got).into_owned(), since.elapsed()))
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {
                // Still open: one more byte, as slowloris does.
                if !trickle.is_empty() {
                    let byte = &trickle[trickled % trickle.len()..][..1];
                    trickled += 1;
                    if stream.write_all(byte).await.is_err() {
                        return Some((String::from_utf8_lossy(&got).into_owned(), since.elapsed()));
                    }
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_dropped_within_the_timeouts_while_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let c = TestCluster::start(
        1,
        &[
            "--set",
            "http.header-timeout=1s",
            "--set",
            "http.body-timeout=2s",
        ],
    )
    .await;
    let start = std::time::Instant::now();
    let limit = std::time::Duration::from_secs(8);
    let mut slow = tokio::task::JoinSet::new();
    // Slowloris: a header that never ends, a byte every 200 ms.
    for _ in 0..100 {
        let mut s = raw(&c.gateway).await;
        s.write_all(b"POST /api/v1/chats HTTP/1.1\r\nhost: x\r\nx-a: ")
            .await
            .unwrap();
        slow.spawn(async move { ("header", closed_by_server(s, b"a", start, limit).await) });
    }
    // Bodies trickled a byte every 200 ms.
    for _ in 0..20 {
        let mut s = raw(&c.gateway).await;
        s.write_all(
            b"POST /api/v1/chats HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
        slow.spawn(async move { ("body", closed_by_server(s, b" ", start, limit).await) });
    }
    // Idle: connected, nothing sent.
    for _ in 0..20 {
        let s = raw(&c.gateway).await;
        slow.spawn(async move { ("idle", closed_by_server(s, b"", start, limit).await) });
    }
    // Meanwhile a real customer is served.
    for i in 0..10 {
        let a = c
            .http
            .post(
                &format!("{}/api/v1/chats", c.gateway),
                &json!({"nickname": format!("real {i}")}),
                None,
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
    }
    let mut latest = std::time::Duration::ZERO;
    while let Some(r) = slow.join_next().await {
        let (kind, outcome) = r.unwrap();
        let (answer, after) = outcome
            .unwrap_or_else(|| panic!("a slow {kind} connection was still open after {limit:?}"));
        latest = latest.max(after);
        if kind == "body" {
            assert!(
                answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
                "a trickled body got: {answer}"
            );
        }
    }
    println!("every slow connection was closed within {latest:?}");
    // Header 1 s, body 2 s: closed by ~3 s at the latest (a generous bound
    // for a loaded machine is the 8 s limit above).
    assert!(latest < limit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_a_bounded_number_of_connections() {
    use tokio::io::AsyncReadExt;
    let c = TestCluster::start(1, &["--set", "http.max-connections-per-address=40"]).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        let mut s = raw(&c.gateway).await;
        let mut buf = vec![0u8; 1024];
        match tokio::time::timeout(std::time::Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                assert!(
                    answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"),
                    "{answer}"
                );
                refused += 1;
            }
            _ => held.push(s),
        }
    }
    // The harness's own client and the dashboard's polls share the address.
    assert!(
        (20..=60).contains(&refused),
        "{refused} of 60 connections refused with a cap of 40"
    );
    assert!(held.len() <= 40, "{} connections held", held.len());
    assert!(
        c.metric(
            &c.gateway,
            "confab_http_connections_refused_total{component=\"gateway\",reason=\"per_address\"}"
        )
        .await
            >= 20.0
    );
    drop(held);
    // The places come back as the connections close.
    let mut served = false;
    for _ in 0..50 {
        if let Ok(a) = c
            .http
            .try_post(
                &format!("{}/api/v1/chats", c.gateway),
                &json!({"nickname": "after"}),
                None,
            )
            .await
        {
            if a.status == 201 {
                served = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "the gateway did not serve again after the connections closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_answers_no_pings_is_closed_and_one_that_does_stays() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let c = TestCluster::start(1, &["--set", "gateway.ws-ping-interval=500ms"]).await;
    let chat = c.create_chat("Ann").await;
    let url = c.ws_url(&chat, 0);
    let (mut silent, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut live = confab_e2e::ws::EventStream::connect(&url).await.unwrap();
    // The silent client reads nothing (so answers no ping) for 3 s; the
    // live one reads all along (tungstenite answers pings as it reads).
    assert!(live.next(std::time::Duration::from_secs(3)).await.is_some());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut pings = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let closed = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent socket was still open after {pings} pings"
        );
        match tokio::time::timeout(std::time::Duration::from_secs(5), silent.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            // The pong the client owes fails on the closed connection
            // before the close frame is read.
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the silent socket was still open"),
        }
    };
    assert!(matches!(closed, None | Some(1001)), "{closed:?}");
    assert!(pings >= 1, "no ping before the close");
    assert!(live.closed_with.is_none(), "the live socket was closed");
    assert_eq!(c.send(&chat, "still here", None).await.status, 200);
    assert!(live
        .until(std::time::Duration::from_secs(5), |e| e["text"]
            == "still here")
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_unless_renewed_and_a_revoked_agent_is_locked_out() {
    let dir = data_dir();
    let agents = dir.path().join("agents");
    let add = |id: &str| {
        let out = std::process::Command::new(confab_e2e::confab_bin())
            .args(["agents", "add", id, "--file", agents.to_str().unwrap()])
            .output()
            .expect("confab agents add");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (ann, bob) = (add("ann"), add("bob"));
    let file = format!("gateway.agents-file={}", agents.display());
    let c = TestCluster::start(
        1,
        &[
            "--set",
            "gateway.token-ttl=4s",
            "--set",
            file.as_str(),
            "--set",
            "gateway.ws-ping-interval=500ms",
        ],
    )
    .await;
    let msg = |chat: &str| format!("{}/api/v1/chats/{chat}/messages", c.gateway);
    let renew = |chat: &str| format!("{}/api/v1/chats/{chat}/token", c.gateway);
    let chat = c.create_chat("Customer").await;
    let join = |who: &str| {
        let url = format!("{}/api/v1/chats/{}/join", c.gateway, chat.id);
        let who = who.to_owned();
        let http = c.http.clone();
        async move {
            http.post(&url, &json!({"nickname": "Agent"}), Some(&who))
                .await
        }
    };
    let ann_joined = join(&ann).await;
    let bob_joined = join(&bob).await;
    assert_eq!((ann_joined.status, bob_joined.status), (200, 200));
    assert!(ann_joined.body["token_expires_at"].as_str().is_some());
    let ann_token = ann_joined.body["token"].as_str().unwrap().to_owned();
    let bob_token = bob_joined.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        join("not-an-agent").await.error_code(),
        "unauthorized",
        "an unknown agent secret"
    );

    // Renewed in time, the customer's token goes on; the old one expires.
    // Expiry is in whole seconds: a 4 s token lasts 3 to 4 s.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let renewed = c
        .http
        .post(&renew(&chat.id), &json!({}), Some(&chat.token))
        .await
        .ok();
    let fresh = renewed["token"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(2_600)).await;
    let old = c
        .http
        .post(
            &msg(&chat.id),
            &json!({"text": "old token"}),
            Some(&chat.token),
        )
        .await;
    assert_eq!((old.status, old.error_code()), (401, "token_expired"));
    let refused = c
        .http
        .post(&renew(&chat.id), &json!({}), Some(&chat.token))
        .await;
    assert_eq!(refused.status, 401, "an expired token cannot be renewed");
    let ok = c
        .http
        .post(
            &msg(&chat.id),
            &json!({"text": "fresh token"}),
            Some(&fresh),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);

    // Revoke ann: delete her line. Her secret and her chat token stop
    // working; bob goes on.
    let ann_token = c
        .http
        .post(&renew(&chat.id), &json!({}), Some(&ann_token))
        .await;
    assert_eq!(ann_token.status, 401, "ann's first token has expired too");
    let ann_joined = join(&ann).await.ok();
    let ann_token = ann_joined["token"].as_str().unwrap().to_owned();
    let bob_token = {
        let r = c
            .http
            .post(&renew(&chat.id), &json!({}), Some(&bob_token))
            .await;
        assert_eq!(r.status, 401);
        join(&bob).await.ok()["token"].as_str().unwrap().to_owned()
    };
    // ann watches the chat: her open socket must end with her access.
    let ann_ws = confab::tls::websocket_url(
        &c.gateway,
        &format!("/api/v1/chats/{}/ws?token={ann_token}", chat.id),
    );
    let mut ann_events = confab_e2e::ws::EventStream::connect(&ann_ws).await.unwrap();
    assert!(ann_events
        .next(std::time::Duration::from_secs(3))
        .await
        .is_some());
    let text = std::fs::read_to_string(&agents).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("ann "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&agents, kept).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let a = c
        .http
        .post(
            &msg(&chat.id),
            &json!({"text": "from ann"}),
            Some(&ann_token),
        )
        .await;
    assert_eq!(a.status, 401, "a revoked agent's token: {:?}", a.body);
    // Her open socket was closed (policy), within a ping or two.
    while ann_events
        .next(std::time::Duration::from_secs(3))
        .await
        .is_some()
    {}
    assert_eq!(
        ann_events.closed_with,
        Some(1008),
        "ann's socket after revocation"
    );
    // A token of an earlier gateway (no expiry) cannot be renewed into one
    // that looks new.
    let secret = std::fs::read_to_string(&c.token_secret_file).unwrap();
    let v1 = confab::gateway::tokens::TokenKey::new(secret.trim().as_bytes()).issue(
        &confab::gateway::tokens::Claims {
            chat_id: chat.id.clone(),
            participant_id: chat.participant_id.clone(),
            role: confab::session::Role::Customer,
            expires_at: None,
            agent: None,
        },
    );
    let r = c.http.post(&renew(&chat.id), &json!({}), Some(&v1)).await;
    assert_eq!((r.status, r.error_code()), (409, "token_not_renewable"));
    let queue = c
        .http
        .get(&format!("{}/api/v1/queue", c.gateway), Some(&ann))
        .await;
    assert_eq!(queue.status, 401, "a revoked agent's secret");
    let b = c
        .http
        .post(
            &msg(&chat.id),
            &json!({"text": "from bob"}),
            Some(&bob_token),
        )
        .await;
    assert_eq!(b.status, 200, "{:?}", b.body);
    let reader = confab_e2e::cluster::Chat {
        token: bob_token.clone(),
        ..chat.clone()
    };
    let texts: Vec<String> = c.transcript(&reader).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        texts,
        ["fresh token", "from bob"],
        "nothing refused was stored"
    );
}
