//! A real Prometheus (Debian's `prometheus`, started by
//! `confab up --with-prometheus`) scrapes a cluster on the Cassandra store
//! with confab's alert rules. One instance is drained and the other
//! killed, then the CQL test node freezes: ConfabCassandraUnavailable and
//! ConfabInstanceDown fire; the gateway, seeing no usable instance, fires
//! ConfabGatewaySeesNoInstance, and a chat of the dead instance that
//! nothing could take fires ConfabFailoverFailed. The watchdog fires throughout. Bounded by the
//! rules' own `for` durations (1 and 2 minutes).

use confab_e2e::cluster::TestCluster;
use confab_e2e::kassandra::{schema_agreement, Node, NO_OUTAGE_COMMANDS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

async fn alert_states(http: &confab_e2e::Http, prometheus: &str) -> BTreeMap<String, String> {
    let mut states = BTreeMap::new();
    if let Ok(a) = http
        .try_get(&format!("{prometheus}/api/v1/alerts"), None)
        .await
    {
        for alert in a.body["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = alert["labels"]["alertname"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let state = alert["state"].as_str().unwrap_or("").to_owned();
            // "firing" wins over "pending" for alerts with several series.
            if states.get(&name).map(String::as_str) != Some("firing") {
                states.insert(name, state);
            }
        }
    }
    states
}

/// The query of the overview dashboard's "Instance state" panel, with the
/// variables at "All": (instance, value) per series.
async fn instance_state(http: &confab_e2e::Http, prometheus: &str) -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../grafana/dashboards/confab-overview.json"
    );
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panel = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Instance state (down / draining / enabled)")
        .expect("the instance state panel");
    let expr = panel["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .replace("$cluster", ".*")
        .replace("$instance_job", "confab")
        .replace("$instance", ".*");
    let url = reqwest::Url::parse_with_params(
        &format!("{prometheus}/api/v1/query"),
        [("query", expr.as_str())],
    )
    .unwrap();
    let answer = http.get(url.as_str(), None).await;
    answer.body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["metric"]["instance"].as_str().unwrap_or("").to_owned(),
                r["value"][1].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cassandra_unavailable_and_instance_down_alerts_fire_in_a_real_prometheus() {
    let installed = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        installed,
        "no `prometheus` binary: install Debian's prometheus package (README set-up)"
    );
    let node = Node::get().await;
    let Some(outages) = node.outages() else {
        println!("{NO_OUTAGE_COMMANDS}");
        return;
    };
    let prometheus_port = confab_e2e::free_port();
    let cp = node.contact_point();
    let ks = format!(
        "cassandra.keyspace=confab_prom_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let agreement = format!("cassandra.await-schema-agreement={}", schema_agreement());
    let port = prometheus_port.to_string();
    let c = TestCluster::start(
        2,
        &[
            "--store",
            "cassandra",
            "--cassandra-contact-points",
            &cp,
            "--set",
            &ks,
            "--set",
            "cassandra.local-dc=",
            "--set",
            &agreement,
            "--set",
            "cassandra.reconnect-timeout=2s",
            "--with-prometheus",
            "--prometheus-port",
            &port,
        ],
    )
    .await;
    let prometheus = format!("http://127.0.0.1:{prometheus_port}");
    // Prometheus scrapes every component.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = c
            .http
            .try_get(&format!("{prometheus}/api/v1/query?query=up"), None)
            .await
            .map(|a| {
                a.body["data"]["result"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        if up.len() == 3 && up.iter().all(|r| r["value"][1] == "1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped all targets: {up:?}\n{}",
            c.log("prometheus")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Rules are evaluated: the watchdog fires, and nothing else.
    let deadline = Instant::now() + Duration::from_secs(30);
    let states = loop {
        let states = alert_states(&c.http, &prometheus).await;
        if states.contains_key("ConfabWatchdog") || Instant::now() > deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        states.get("ConfabWatchdog").map(String::as_str),
        Some("firing")
    );
    assert!(
        !states
            .iter()
            .any(|(name, s)| s == "firing" && name != "ConfabWatchdog"),
        "alerts firing on a healthy cluster: {states:?}"
    );
    // Chats on both instances (each new chat goes to the least loaded).
    let mut chats = Vec::new();
    for i in 0..4 {
        chats.push(c.create_chat(&format!("Customer {i}")).await);
    }
    let stranded = chats
        .iter()
        .find(|chat| chat.instance_id == "inst-2")
        .expect("a chat on inst-2")
        .clone();

    // inst-1 drained, inst-2 killed: inst-2's chat has nowhere to go.
    let inst_1 = c.instance_url("inst-1").await;
    c.http
        .post(
            &format!("{inst_1}/admin/disable"),
            &serde_json::json!({}),
            Some(&c.admin_token),
        )
        .await
        .ok();
    c.kill("inst-2").await;
    let answer = c.send(&stranded, "anyone there?", None).await;
    assert_eq!(answer.status, 503, "{:?}", answer.body);
    outages.freeze();
    let start = Instant::now();
    let mut fired: BTreeMap<String, u64> = BTreeMap::new();
    let expected = [
        "ConfabCassandraUnavailable",
        "ConfabInstanceDown",
        "ConfabGatewaySeesNoInstance",
        "ConfabFailoverFailed",
    ];
    while fired.len() < expected.len() {
        let states = alert_states(&c.http, &prometheus).await;
        for name in expected {
            if states.get(name).map(String::as_str) == Some("firing") && !fired.contains_key(name) {
                fired.insert(name.into(), start.elapsed().as_secs());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "alerts did not fire in time; states {states:?}, fired {fired:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("fired after (s): {fired:?}");
    // The overview dashboard's instance state, queried as Grafana would:
    // the drained instance shows "draining" (1), the dead one "down" (0)
    // instead of vanishing.
    let state = instance_state(&c.http, &prometheus).await;
    let port_of = |url: &str| url.rsplit(':').next().unwrap_or("").to_owned();
    let inst_2 = c.instance_url("inst-2").await;
    let of = |url: &str| {
        state
            .iter()
            .find(|(instance, _)| port_of(instance) == port_of(url))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(of(&inst_1).as_deref(), Some("1"), "{state:?}");
    assert_eq!(of(&inst_2).as_deref(), Some("0"), "{state:?}");
    let alerts: Value = c
        .http
        .get(&format!("{prometheus}/api/v1/alerts"), None)
        .await
        .ok();
    let cassandra = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "ConfabCassandraUnavailable")
        .cloned()
        .unwrap();
    assert_eq!(cassandra["labels"]["severity"], "critical");
    assert!(cassandra["annotations"]["runbook"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    // `confab up` labels its Prometheus with where the runbooks are.
    let url = cassandra["annotations"]["runbook_url"]
        .as_str()
        .unwrap_or("");
    let file = url
        .strip_prefix("file://")
        .and_then(|u| u.strip_suffix("#confabcassandraunavailable"))
        .unwrap_or_else(|| panic!("runbook_url {url}"));
    let runbooks = std::fs::read_to_string(file).expect("the runbooks confab up wrote");
    assert!(runbooks.contains("### ConfabCassandraUnavailable"));
    outages.resume();
}
