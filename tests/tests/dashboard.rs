//! The operator dashboard, as an operator meets it: a real `confab up`
//! cluster, its dashboard in headless Chromium, clicked through (sign-in,
//! live counts, drain to "safe to stop", enable); and its sign-in wall
//! probed over HTTP. Screenshots go to `target/screenshots/`.

use confab_e2e::browser::Browser;
use confab_e2e::cluster::TestCluster;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Up to this long for the page to follow a change (the view is polled
/// once a second and pushed at once).
const LIVE: Duration = Duration::from_secs(6);

async fn sign_in(browser: &Browser, cluster: &TestCluster, token: &str) {
    browser.goto(&format!("{}/", cluster.dashboard)).await;
    let field = browser.find("input#token").await;
    field.send_keys(token).await.expect("typing the token");
    browser.click("button[type=submit]").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_signs_in_watches_chats_arrive_and_drains_an_instance() {
    let cluster = TestCluster::start(3, &[]).await;
    let browser = Browser::start(1280).await;

    // A wrong token is refused, with a message.
    sign_in(&browser, &cluster, "not-the-token").await;
    let refused = browser.text("#signin-error").await;
    assert!(refused.contains("Wrong admin token"), "{refused}");

    sign_in(&browser, &cluster, &cluster.admin_token).await;
    browser.find("body[data-hydrated]").await;
    for id in ["inst-1", "inst-2", "inst-3"] {
        let row = browser.text(&format!("tr[data-instance='{id}']")).await;
        assert!(row.contains("serving"), "{id}: {row}");
    }
    assert_eq!(browser.text("#instances-up").await, "3 of 3");
    assert_eq!(browser.text("#chats-active").await, "0");

    // Chats created through the gateway show up without a reload.
    let first = cluster.create_chat("ana").await;
    let second = cluster.create_chat("ben").await;
    browser
        .wait_text("#chats-active", LIVE, |t| t == "2")
        .await
        .expect("the chat count follows");
    browser
        .wait_text("#chats-waiting", LIVE, |t| t == "2")
        .await
        .expect("both wait for an agent");

    // Its instance lists it; a click shows its transcript.
    cluster.send(&first, "hello from ana", None).await.ok();
    browser
        .click(&format!(
            "tr[data-instance='{}'] button.id",
            first.instance_id
        ))
        .await;
    browser
        .click(&format!("#sessions tr[data-chat='{}'] button", first.id))
        .await;
    let transcript = browser
        .wait_text("#transcript", LIVE, |t| t.contains("hello from ana"))
        .await
        .expect("the transcript opens");
    assert!(transcript.contains("ana"), "{transcript}");
    let listed = browser.text("#sessions table.sessions").await;
    assert!(
        listed.contains("ana (customer)") && listed.contains("waiting"),
        "{listed}"
    );
    browser.screenshot("dashboard-chats").await;

    // Drain the instance that carries the first chat: it keeps the chat…
    let row = format!("tr[data-instance='{}']", first.instance_id);
    browser.click(&format!("{row} button.action")).await;
    let confirm = browser.text(".confirm").await;
    assert!(
        confirm.contains(&format!("Drain {}?", first.instance_id)),
        "{confirm}"
    );
    browser.click("#confirm").await;
    browser
        .wait_text(&row, LIVE, |t| t.contains("draining"))
        .await
        .expect("the row says draining while it has a chat");
    browser.screenshot("dashboard-draining").await;
    // …until its chats end (the gateway may have placed both there); then
    // it is safe to stop.
    for chat in [&first, &second] {
        if chat.instance_id == first.instance_id {
            let left = cluster.leave(chat).await;
            assert_eq!(left.status, 200, "{:?}", left.body);
        }
    }
    let drained = browser
        .wait_text(&row, LIVE, |t| t.contains("safe to stop"))
        .await
        .expect("the row says safe to stop at 0 chats");
    assert!(drained.contains("Enable"), "{drained}");
    browser.screenshot("dashboard-drained").await;
    let status = cluster
        .http
        .get(
            &format!("{}/status", cluster.instance_url(&first.instance_id).await),
            None,
        )
        .await
        .ok();
    assert_eq!(status["enabled"], false, "the instance itself was drained");

    // Enable it again.
    browser.click(&format!("{row} button.action")).await;
    browser.click("#confirm").await;
    browser
        .wait_text(&row, LIVE, |t| t.contains("serving"))
        .await
        .expect("enabled again");

    // The restoration test: one click, PASSED with its timings.
    browser.click("#run-test").await;
    let verdict = browser
        .wait_text("#test-verdict", Duration::from_secs(60), |t| {
            t == "PASSED" || t == "FAILED"
        })
        .await
        .expect("the restoration test ends");
    let run = browser.text("#test-run").await;
    assert_eq!(verdict, "PASSED", "{run}");
    for step in [
        "Start 1 chat as a customer",
        "An agent joins",
        "kill -9 ",
        "Chats go on on another instance",
        "Every transcript whole",
        "Restart ",
    ] {
        assert!(run.contains(step), "no step {step:?} in:\n{run}");
    }
    assert!(run.contains(" ms"), "steps carry timings:\n{run}");
    let history = browser.text("table.history tbody").await;
    assert!(history.contains("PASSED"), "{history}");
    browser.screenshot("dashboard-restoration-test").await;
    // The restoration shows in the events, filtered by id.
    let filter = browser.find("#event-id").await;
    filter.send_keys("59604").await.expect("typing a filter");
    let restored = browser
        .wait_text("table.events tbody", LIVE, |t| t.contains("59604"))
        .await
        .expect("the new owner's 59604 (restoration done) is listed");
    assert!(
        !restored.contains("59600"),
        "the filter hides other ids:\n{restored}"
    );
    // The gateway's own events are there too: its failover (59702).
    filter.clear().await.expect("clearing the filter");
    filter.send_keys("59702").await.expect("typing a filter");
    let moved = browser
        .wait_text("table.events tbody", LIVE, |t| t.contains("59702"))
        .await
        .expect("the gateway's 59702 (chat moved) is listed");
    assert!(moved.contains("gateway"), "{moved}");
    // The killed instance was started again.
    browser
        .wait_text("#instances-up", LIVE, |t| t == "3 of 3")
        .await
        .expect("the killed instance serves again");

    // (The wrong token's 401 is the one expected error.)
    let errors: Vec<String> = browser
        .console_errors()
        .await
        .into_iter()
        .filter(|e| !e.contains("/signin - "))
        .collect();
    assert!(errors.is_empty(), "browser console errors: {errors:?}");

    // The history survives a restart of the dashboard (sign-ins do not:
    // sessions live in the dashboard's memory).
    cluster.act("dashboard", "restart").await;
    sign_in(&browser, &cluster, &cluster.admin_token).await;
    let kept = browser.text("table.history tbody").await;
    assert!(kept.contains("PASSED"), "history after a restart: {kept}");

    // Usable on a phone: the same page at 390 px.
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("resizing");
    browser.find("tr[data-instance='inst-1']").await;
    browser.screenshot("dashboard-390px").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn everything_but_sign_in_is_behind_it() {
    let cluster = TestCluster::start(1, &[]).await;
    let http = confab_e2e::client()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let d = &cluster.dashboard;

    // Anyone: liveness, status, the sign-in page and the browser half.
    let status: serde_json::Value = http
        .get(format!("{d}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["component"], "dashboard");
    let wasm = http
        .get(format!("{d}/pkg/confab_dashboard_bg.wasm"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(wasm.status(), 200);
    assert_eq!(wasm.headers()["content-type"], "application/wasm");
    assert_eq!(wasm.headers()["content-encoding"], "gzip");

    // The gateway's events are behind the cluster secret.
    let events = http
        .get(format!("{}/internal/v1/events", cluster.gateway))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 401);

    // Without a session: pages go to the sign-in, the rest is refused.
    let page = http
        .get(format!("{d}/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "/signin");
    for (method, path) in [
        ("GET", "/live"),
        ("POST", "/api/instance-enabled"),
        ("POST", "/api/cluster"),
        ("POST", "/signout"),
    ] {
        let req = http.request(method.parse().unwrap(), format!("{d}{path}"));
        let a = req.send().await.unwrap();
        assert_eq!(a.status(), 401, "{method} {path}");
        let body: serde_json::Value = a.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
    }

    // Signed in: the cookie is HttpOnly and SameSite=Strict.
    let signed = http
        .post(format!("{d}/signin"))
        .form(&[("token", cluster.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{d}/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let html = page.text().await.unwrap();
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("the page's CSP has a nonce: {csp}"));
    assert!(
        html.contains(&format!("nonce=\"{nonce}\"")),
        "the loader carries it"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let live = http
        .get(format!("{d}/live"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    assert!(live.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(live);

    // An action from another site's page is refused, and changes nothing.
    let cross = http
        .post(format!("{d}/api/instance-enabled"))
        .header("cookie", &session)
        .header("origin", "https://evil.example")
        .form(&[("instance", "inst-1"), ("enabled", "false")])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let instance = cluster.instance_url("inst-1").await;
    let s = cluster
        .http
        .get(&format!("{instance}/status"), None)
        .await
        .ok();
    assert_eq!(s["enabled"], true, "a refused action changes nothing");

    // The same action from the dashboard's own page works; two operators
    // draining the same instance at once both succeed, and it is drained.
    let drain = || {
        http.post(format!("{d}/api/instance-enabled"))
            .header("cookie", &session)
            .header("origin", d.as_str())
            .form(&[("instance", "inst-1"), ("enabled", "false")])
            .send()
    };
    let (one, two) = tokio::join!(drain(), drain());
    for own in [one.unwrap(), two.unwrap()] {
        assert_eq!(own.status(), 200, "{:?}", own.text().await);
    }
    let s = cluster
        .http
        .get(&format!("{instance}/status"), None)
        .await
        .ok();
    assert_eq!(s["enabled"], false);

    // Signing out ends the session.
    let out = http
        .post(format!("{d}/signout"))
        .header("cookie", &session)
        .header("origin", d.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = http
        .get(format!("{d}/live"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);

    // Failed sign-ins: five a minute per address, then 429, logged.
    for _ in 0..5 {
        let a = http
            .post(format!("{d}/signin"))
            .form(&[("token", "guess")])
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), 401);
    }
    let limited = http
        .post(format!("{d}/signin"))
        .form(&[("token", cluster.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429, "even the right token waits");
    assert!(limited.headers().contains_key("retry-after"));
    let log = cluster.log("dashboard");
    assert_eq!(
        log.matches("dashboard sign-in refused").count(),
        5,
        "each failed sign-in is logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_from_the_dashboard_keeps_every_chat_going() {
    let cluster = Arc::new(TestCluster::start(3, &[]).await);
    let pids_before = cluster.cluster().await["instances"].clone();
    // Chats that send all along, each message retried with its
    // client_msg_id until acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for i in 0..6 {
        let chat = cluster.create_chat(&format!("customer {i}")).await;
        let (cluster, stop) = (cluster.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let text = format!("message {n}");
                loop {
                    let a = cluster.send(&chat, &text, Some(&text)).await;
                    if a.status == 200 {
                        acked.push((text.clone(), a.body["seq"].as_u64().unwrap()));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (chat, acked)
        }));
    }

    let browser = Browser::start(1280).await;
    sign_in(&browser, &cluster, &cluster.admin_token).await;
    browser.find("body[data-hydrated]").await;
    let limit = browser.find("#drain-limit").await;
    limit.clear().await.expect("clearing the limit");
    limit.send_keys("2").await.expect("typing the limit");
    browser.click("#rolling-restart").await;
    browser.click("#confirm-rolling").await;
    let verdict = browser
        .wait_text("#rolling-verdict", Duration::from_secs(120), |t| {
            t == "PASSED" || t == "FAILED"
        })
        .await
        .expect("the rolling restart ends");
    let steps = browser.text("#rolling-run").await;
    assert_eq!(verdict, "PASSED", "{steps}");
    for id in ["inst-1", "inst-2", "inst-3"] {
        for step in ["Drain", "Stop", "Start", "Enable"] {
            assert!(
                steps.contains(&format!("{step} {id}")),
                "no {step} {id}:\n{steps}"
            );
        }
    }
    browser.screenshot("dashboard-rolling-restart").await;

    stop.store(true, Ordering::Relaxed);
    let pids_after = cluster.cluster().await["instances"].clone();
    for i in 0..3 {
        assert_ne!(
            pids_before[i]["pid"], pids_after[i]["pid"],
            "every instance is a new process"
        );
    }
    let mut total = 0;
    for sender in senders {
        let (chat, acked) = sender.await.unwrap();
        let transcript = cluster.transcript(&chat).await;
        let messages: Vec<(String, u64)> = transcript["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "message")
            .map(|e| {
                (
                    e["text"].as_str().unwrap().to_owned(),
                    e["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            messages, acked,
            "chat {}: every acknowledged message exactly once, in order",
            chat.id
        );
        total += acked.len();
    }
    assert!(total > 30, "the chats kept sending: {total} messages");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_cassandra_node_raises_the_alarm_on_the_dashboard() {
    use confab_e2e::kassandra::{init_keyspace, Node, NO_OUTAGE_COMMANDS};
    let node = Node::get().await;
    let Some(outages) = node.outages() else {
        println!("{NO_OUTAGE_COMMANDS}");
        return;
    };
    let keyspace = init_keyspace(&node.contact_point()).await;
    let cp = node.contact_point();
    let sets = [
        format!("cassandra.keyspace={keyspace}"),
        format!(
            "cassandra.local-dc={}",
            std::env::var("CONFAB_TEST_CASSANDRA_DC").unwrap_or_default()
        ),
        format!(
            "cassandra.await-schema-agreement={}",
            confab_e2e::kassandra::schema_agreement()
        ),
        "cassandra.reconnect-timeout=2s".to_owned(),
    ];
    let mut args = vec!["--store", "cassandra", "--cassandra-contact-points", &cp];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let cluster = TestCluster::start(2, &args).await;
    let browser = Browser::start(1280).await;
    sign_in(&browser, &cluster, &cluster.admin_token).await;
    let row = "tr[data-instance='inst-1']";
    let ok = browser.text(row).await;
    assert!(ok.contains("cassandra") && ok.contains("available"), "{ok}");

    outages.freeze();
    let alarm = browser
        .wait_text(row, Duration::from_secs(30), |t| t.contains("UNAVAILABLE"))
        .await;
    let events = browser
        .wait_text("table.events tbody", LIVE, |t| t.contains("59520"))
        .await;
    browser.screenshot("dashboard-cassandra-alarm").await;
    outages.resume();
    let alarm = alarm.expect("the row shows the store UNAVAILABLE");
    assert!(
        alarm.contains("since"),
        "with the time of the change: {alarm}"
    );
    let events = events.expect("59520 is in the events");
    assert!(events.contains("UNAVAILABLE"), "{events}");

    browser
        .wait_text(row, Duration::from_secs(30), |t| {
            t.contains("available") && !t.contains("UNAVAILABLE")
        })
        .await
        .expect("the alarm clears");
    browser
        .wait_text("table.events tbody", LIVE, |t| t.contains("59521"))
        .await
        .expect("59521 is in the events");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_instance_shows_as_down_and_never_holds_up_the_page() {
    let cluster = TestCluster::start(2, &[]).await;
    let browser = Browser::start(1280).await;
    sign_in(&browser, &cluster, &cluster.admin_token).await;
    browser.find("body[data-hydrated]").await;

    // SIGSTOP: its port still accepts connections, nothing answers.
    cluster.act("inst-2", "pause").await;
    let frozen = browser
        .wait_text("tr[data-instance='inst-2']", LIVE, |t| t.contains("down"))
        .await
        .expect("a frozen instance shows as down");
    assert!(frozen.contains("no answer in time"), "{frozen}");
    // Meanwhile the page keeps following the others (once the gateway,
    // too, has stopped sending chats to the frozen one).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster
            .http
            .get(&format!("{}/status", cluster.gateway), None)
            .await
            .ok();
        let frozen_healthy = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["instance_id"] == "inst-2" && i["healthy"] == true);
        if !frozen_healthy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway still sends to inst-2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chat = cluster.create_chat("cy").await;
    assert_eq!(chat.instance_id, "inst-1");
    browser
        .wait_text("#chats-active", LIVE, |t| t == "1")
        .await
        .expect("the page follows inst-1 while inst-2 is frozen");
    assert_eq!(browser.text("#instances-up").await, "1 of 2");
    browser.screenshot("dashboard-frozen-instance").await;

    cluster.act("inst-2", "resume").await;
    browser
        .wait_text("tr[data-instance='inst-2']", LIVE, |t| {
            t.contains("serving")
        })
        .await
        .expect("it serves again");
}

/// `confab dashboard` on its own, on a deployment without a supervisor:
/// the restoration test kills through the instance's opt-in `/admin/kill`.
#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_dashboard_runs_the_restoration_test_through_admin_kill() {
    let cluster = TestCluster::start(2, &["--set", "server.admin-kill-enabled=true"]).await;
    let (one, two) = (
        cluster.instance_url("inst-1").await,
        cluster.instance_url("inst-2").await,
    );
    let port = confab_e2e::free_port();
    let d = format!("http://127.0.0.1:{port}");
    let mut dashboard = std::process::Command::new(confab_e2e::confab_bin())
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--instance", &format!("{one},{two}")])
        .args(["--gateway", &cluster.gateway])
        .args(["--admin-token", &cluster.admin_token])
        .args([
            "--set",
            &format!("dashboard.agent-credential={}", cluster.agent_credential),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting confab dashboard");
    let http = confab_e2e::client()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http.get(format!("{d}/status")).send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let signed = http
        .post(format!("{d}/signin"))
        .form(&[("token", cluster.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    let session = signed.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let call = |path: &'static str, form: Vec<(&'static str, String)>| {
        http.post(format!("{d}{path}"))
            .header("cookie", &session)
            .header("origin", d.as_str())
            .form(&form)
            .send()
    };
    // Once the dashboard has seen both instances, the test may run.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let view: serde_json::Value = call("/api/cluster", vec![])
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["test_blocked"].is_null() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "blocked: {}",
            view["test_blocked"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = call("/api/restoration-test", vec![("chats", "1".into())])
        .await
        .unwrap();
    assert_eq!(started.status(), 200, "{:?}", started.text().await);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let run = loop {
        let view: serde_json::Value = call("/api/cluster", vec![])
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(run) = view["test_history"].as_array().and_then(|h| h.first()) {
            break run.clone();
        }
        assert!(std::time::Instant::now() < deadline, "the test never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    assert_eq!(run["verdict"]["passed"], true, "{run:#}");
    let killed = run["instance_killed"].as_str().unwrap();
    let restart = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == format!("Restart {killed}"))
        .expect("a restart step");
    assert!(
        restart["detail"]
            .as_str()
            .unwrap()
            .contains("no supervisor"),
        "{restart}"
    );
    // The instance really died: through its own /admin/kill.
    let dead = cluster
        .http
        .try_get(
            &format!("{}/status", cluster.instance_url(killed).await),
            None,
        )
        .await;
    assert!(dead.is_err(), "{killed} is gone");
}
