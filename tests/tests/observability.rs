//! Every metric the dashboards and alert rules use is exported by a running
//! cluster, every panel query and rule parses as PromQL, and each
//! component's /metrics passes `promtool check metrics`.

use confab_e2e::cluster::TestCluster;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Metric names in a PromQL expression (confab's, and `up`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut token = String::new();
    let mut in_string = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch == '"' {
            in_string = !in_string;
            token.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            token.push(ch);
        } else {
            if token.starts_with("confab_") || token == "up" {
                names.push(token.clone());
            }
            token.clear();
        }
    }
    names
}

fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(v: &Value, file: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "expr" {
                        if let Some(e) = v.as_str() {
                            out.push((file.to_owned(), e.to_owned()));
                        }
                    } else if k == "query" && m.contains_key("definition") {
                        // Template variable queries (label_values) are Grafana's, not PromQL.
                    } else {
                        walk(v, file, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, file, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        walk(&v, &path.display().to_string(), &mut out);
    }
    assert!(
        out.len() >= 10,
        "too few panel queries found: {}",
        out.len()
    );
    out
}

fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("alerts/confab-rules.yml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for g in v["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap_or("?")
                .to_owned();
            out.push((name, r["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// Grafana's variables replaced by concrete values, as Grafana would.
fn substitute(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$cluster", ".*")
        .replace("$instance_job", "confab")
        .replace("$instance", ".*")
        .replace("$gateway_job", "confab-gateway")
        .replace("$gateway", ".*");
    assert!(!e.contains('$'), "unknown Grafana variable in {expr}");
    e
}

fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

fn promtool_check_metrics(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboards_and_alerts_use_only_exported_metrics_and_valid_promql() {
    let c = TestCluster::start(2, &[]).await;
    // Some traffic so that every labelled series exists.
    let chat = c.create_chat("Ann").await;
    c.send(&chat, "hello", None).await.ok();
    c.kill(&chat.instance_id).await;
    c.send(&chat, "after", None).await.ok();

    let cluster = c.cluster().await;
    let mut urls: Vec<String> = cluster["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["running"] == true)
        .map(|i| i["url"].as_str().unwrap().to_owned())
        .collect();
    urls.push(c.gateway.clone());
    let mut names = BTreeSet::from(["up".to_string()]);
    for url in &urls {
        let text = c.http.text(&format!("{url}/metrics")).await;
        let problems = promtool_check_metrics(&text);
        assert!(
            problems.trim().is_empty(),
            "promtool check metrics on {url}:\n{problems}"
        );
        names.extend(exported(&text));
    }

    let mut exprs = dashboard_exprs();
    exprs.extend(rule_exprs());
    let mut missing = BTreeSet::new();
    for (_, expr) in &exprs {
        for n in metric_names(expr) {
            if !names.contains(&n) {
                missing.insert(n);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "used in grafana/ or alerts/ but not exported: {missing:?}\nexported: {names:?}"
    );

    assert_promql_parses(&exprs);
    println!(
        "{} queries over {} metric names checked",
        exprs.len(),
        names.len()
    );
}

/// Every query parses as PromQL: promtool checks them as recording rules.
fn assert_promql_parses(exprs: &[(String, String)]) {
    let dir = confab_e2e::data_dir();
    let mut rules = String::from("groups:\n  - name: parse-check\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let e = substitute(expr);
        rules.push_str(&format!(
            "      - record: parse_check_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = dir.path().join("parse-check.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (Debian's prometheus package)");
    assert!(
        out.status.success(),
        "a panel query or rule does not parse:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The dashboards as Grafana would load them: every panel, query and
/// annotation reads the `datasource` variable (no data source is forced),
/// every query parses, every `$variable` used is defined, a per-second
/// panel has a per-second unit, and counts per step use non-overlapping
/// windows (`increase(...[$__interval])`, not `$__rate_interval`).
#[test]
fn dashboards_are_consistent() {
    let variable_ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.display().to_string();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let variables: BTreeSet<String> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect();
        for name in [
            "datasource",
            "cluster",
            "instance_job",
            "instance",
            "gateway_job",
            "gateway",
        ] {
            assert!(variables.contains(name), "{file}: no variable {name}");
        }
        // Every $variable in the whole dashboard is defined (or Grafana's own $__...).
        let text = d.to_string();
        for (i, _) in text.match_indices('$') {
            let rest = text[i + 1..].trim_start_matches('{');
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() || name.starts_with("__") {
                continue;
            }
            assert!(
                variables.contains(&name),
                "{file}: undefined variable ${name}"
            );
        }
        for a in d["annotations"]["list"].as_array().unwrap() {
            if a["builtIn"] != 1 {
                assert_eq!(
                    a["datasource"], variable_ds,
                    "{file}: annotation {}",
                    a["name"]
                );
            }
        }
        let mut exprs = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap_or("?");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"], variable_ds, "{file}: panel {title}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: panel {title} has no query");
            for t in targets {
                assert_eq!(t["datasource"], variable_ds, "{file}: panel {title}");
                let e = t["expr"].as_str().unwrap();
                assert!(
                    !(e.contains("increase(") && e.contains("[$__rate_interval]")),
                    "{file}: panel {title} counts events over overlapping windows: {e}"
                );
                exprs.push((title.to_owned(), e.to_owned()));
            }
            let per_second = targets.iter().any(|t| {
                let e = t["expr"].as_str().unwrap();
                e.contains("rate(") && !e.contains("histogram_quantile") && !e.contains(" / ")
            });
            let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
            if per_second {
                assert!(
                    unit.ends_with("ps") || unit == "percentunit",
                    "{file}: panel {title} shows a rate in unit {unit:?}"
                );
            }
            checked += 1;
        }
        assert_promql_parses(&exprs);
    }
    assert!(checked >= 40, "panels checked: {checked}");
}

#[test]
fn metric_name_extraction_skips_label_values() {
    assert_eq!(
        metric_names(
            r#"sum(rate(confab_transcript_saves_total{result="error", x="confab_fake"}[5m])) / up"#
        ),
        vec!["confab_transcript_saves_total", "up"]
    );
}

/// Dashboards and alerts see every metric of the instance's contract from
/// start-up, at zero, not "no data" until the first save or restore.
#[tokio::test]
async fn every_instance_metric_is_exported_from_start_up() {
    use confab::telemetry::metrics as m;
    let dir = confab_e2e::data_dir();
    let s = confab_e2e::Server::start(dir.path(), "inst-a", &dir.path().join("c.db"), &[]).await;
    let text = confab_e2e::Http::default()
        .text(&format!("{}/metrics", s.url))
        .await;
    let series = |name: &str| text.lines().any(|l| l.starts_with(name));
    for name in [
        m::SESSIONS_CREATED,
        m::SESSIONS_CLOSED,
        m::SESSIONS_RESTORED,
        m::SESSIONS_ACTIVE,
        m::MESSAGES_SUBMITTED,
        m::TRANSCRIPT_SAVES,
        m::TRANSCRIPT_SAVE_FAILURES,
        m::RESTORE_FAILURES,
        m::STORE_AVAILABLE,
        m::INSTANCE_ENABLED,
        m::BUILD_INFO,
        m::INTERNAL_AUTH_FAILURES,
        m::WEBSOCKET_CONNECTIONS,
        m::HTTP_CONNECTIONS_OPEN,
        m::HTTP_CONNECTIONS_REFUSED,
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(series(name), "{name} missing at start-up:\n{text}");
    }
    for histogram in [
        m::TRANSCRIPT_SAVE_DURATION,
        m::RESTORE_DURATION,
        m::MESSAGE_ACK_DURATION,
        m::STORE_GROUP_COMMIT_OPERATIONS,
    ] {
        assert!(
            series(&format!("{histogram}_bucket{{le=\"+Inf\"}} 0")),
            "{histogram} missing (or not zero) at start-up:\n{text}"
        );
    }
}
