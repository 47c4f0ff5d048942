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
    reqwest::Client::new()
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
    let insider = reqwest::Client::new();
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
        let size = |text: String| text.len();
        let before = size(c.http.text(&format!("{base}/metrics")).await);
        for i in 0..300 {
            let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
            let _ = client
                .request(method, format!("{base}/made/up/{i}"))
                .send()
                .await;
            let _ = client.get(format!("{base}/nothing-{i}")).send().await;
        }
        let text = c.http.text(&format!("{base}/metrics")).await;
        assert!(
            size(text.clone()) <= before + 200,
            "{base}: /metrics grew from {before} to {} bytes",
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
