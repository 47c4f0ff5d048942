//! TLS end to end: `confab up` given a certificate signed by a CA the test
//! makes serves every listener over HTTPS (instances, gateway, dashboard,
//! supervisor), the gateway reaches the instances over `https://` and its
//! channel over `wss://`, a chat survives kill -9 of its instance over TLS,
//! and clients that speak plain HTTP or do not trust the CA get nothing.

use confab_e2e::cluster::TestCluster;
use confab_e2e::tls::TestCa;
use confab_e2e::ws::EventStream;
use confab_e2e::Http;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_serves_chats_fails_over_and_refuses_plain_http() {
    let certs = tempfile::tempdir().expect("a temporary directory");
    let ca = TestCa::generate(certs.path());
    let sets = ca.sets();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let c = TestCluster::start_with(2, &sets, Http::trusting(&ca.ca_pem)).await;
    for url in [&c.gateway, &c.dashboard, &c.supervisor] {
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    }
    let cluster = c.cluster().await;
    let instances = cluster["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2);
    for i in instances {
        assert!(
            i["url"].as_str().unwrap_or("").starts_with("https://"),
            "{i}"
        );
    }

    // The dashboard reaches both instances over https://: its live view
    // (after signing in, over TLS too) shows them up.
    let up = dashboard_sees_instances_up(&c, &ca).await;
    assert_eq!(up, 2, "instances the dashboard sees up over TLS");

    let chat = c.create_chat("Customer").await;
    let agent = c.join(&chat, "Agent").await;
    let mut events = EventStream::connect_with(&c.ws_url(&chat, 0), Some(ca.ws_connector()))
        .await
        .expect("a wss:// stream through the gateway");
    assert_eq!(
        c.send(&chat, "hello over TLS", Some("m1")).await.status,
        200
    );
    let seen = |text: &'static str| move |e: &Value| e["text"] == text;
    assert!(
        events
            .until(Duration::from_secs(5), seen("hello over TLS"))
            .await
            .is_some(),
        "the message did not come back over wss://"
    );
    // The gateway reached the chat's instance over its channel (wss://).
    let status = c
        .http
        .get(&format!("{}/status", c.gateway), None)
        .await
        .ok();
    let member = status["instances"]
        .as_array()
        .expect("the gateway's instances")
        .iter()
        .find(|m| m["instance_id"] == chat.instance_id.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(member["channel"], true, "{status}");

    // kill -9 of the chat's instance: it goes on elsewhere, over TLS.
    c.kill(&chat.instance_id).await;
    let after = c.send(&agent, "after the kill", Some("m2")).await;
    assert_eq!(after.status, 200, "{:?}\n{}", after.body, c.logs_tail());
    assert!(
        events
            .until(Duration::from_secs(10), seen("after the kill"))
            .await
            .is_some(),
        "the stream did not follow the chat to its new instance"
    );
    let transcript = c.transcript(&chat).await;
    let texts: Vec<&str> = transcript["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["text"].as_str())
        .filter(|t| t.contains("TLS") || t.contains("kill"))
        .collect();
    assert_eq!(texts, ["hello over TLS", "after the kill"]);

    // Plain HTTP to a TLS port, and TLS without trusting the CA: refused.
    let plain = confab_e2e::client().build().expect("a client");
    let gateway_plain = c.gateway.replacen("https://", "http://", 1);
    assert!(plain
        .get(format!("{gateway_plain}/healthz"))
        .send()
        .await
        .is_err());
    assert!(
        plain
            .get(format!("{}/healthz", c.gateway))
            .send()
            .await
            .is_err(),
        "a client that does not trust the test CA was served"
    );
    let refused = c
        .metric_reaching(
            &c.gateway,
            "confab_http_connections_refused_total{component=\"gateway\",reason=\"tls_handshake\"}",
            2.0,
        )
        .await;
    assert!(refused >= 2.0, "tls_handshake refusals: {refused}");
    // The dashboard serves HTTPS and reaches the instances over it.
    let a = c.http.get(&format!("{}/healthz", c.dashboard), None).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

/// Sign in to the dashboard and read its live view until every instance
/// shows up (at most 10 s); how many did.
async fn dashboard_sees_instances_up(c: &TestCluster, ca: &TestCa) -> usize {
    let http = confab_e2e::client()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca.ca_pem).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = http
        .post(format!("{}/signin", c.dashboard))
        .form(&[("token", c.admin_token.as_str())])
        .send()
        .await
        .expect("signing in over https");
    assert_eq!(signed.status(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_owned();
    let session = cookie.split(';').next().unwrap().to_owned();
    let mut live = http
        .get(format!("{}/live", c.dashboard))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut text, mut up) = (String::new(), 0);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, live.chunk()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                let view: Value = serde_json::from_str(data.trim()).unwrap_or_default();
                up = view["instances"]
                    .as_array()
                    .map(|l| l.iter().filter(|i| i["up"] == true).count())
                    .unwrap_or(0);
            }
            if up == 2 {
                return up;
            }
        }
    }
    up
}
