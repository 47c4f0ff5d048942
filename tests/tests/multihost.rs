//! Across hosts: a cluster spread over test hosts made as network
//! namespaces on this machine (crate::netns): the CQL test node on one
//! host, three instances on three hosts, two gateways on two more, and the
//! load on a client host, all with the real `confab` binary (the instances
//! and the second gateway started as the deployment pack starts them).
//! Chats send continuously through both gateways while a fault happens; one
//! history checker (`confab_e2e::history`) then reads every chat and
//! requires each acknowledged message exactly once, in the order it was
//! acknowledged; no chat may be left with two live owners; then every chat
//! is closed and its final transcript read back through one gateway.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) for the namespaces; without
//! it the test fails with the reason. The session store is the CQL test
//! node (kassandra): a real Cassandra cannot run inside these namespaces.

use confab_e2e::deploy;
use confab_e2e::load::{check, load, Chat};
use confab_e2e::netns::{Host, Net};
use confab_e2e::{confab_bin, CLUSTER_SECRET};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PORT: u16 = 8080;
const CQL_PORT: u16 = 9042;
const AGENT_CREDENTIAL: &str = "multihost-agent";
const ADMIN_TOKEN: &str = "multihost-admin";

struct Hosts {
    /// Every host and process goes when it is dropped.
    net: Net,
    store: Arc<Host>,
    instances: Vec<Arc<Host>>,
    gateways: Vec<Arc<Host>>,
    client: Arc<Host>,
    dir: tempfile::TempDir,
    /// How an instance (or a gateway that discovers) reaches the store.
    store_env: Vec<(&'static str, String)>,
}

fn url(host: &Host) -> String {
    format!("http://{}:{PORT}", host.addr)
}

/// How gateways reach instances.
#[derive(Clone, Copy, PartialEq)]
enum Links {
    Direct,
    /// Through a delaying proxy on each instance's host (50 ms ± 20 ms each
    /// way) with 2 % of the packets between gateway and instance hosts
    /// dropped.
    SlowAndLossy,
}

/// The proxies' port on the instances' hosts.
const PROXY_PORT: u16 = 8081;

/// Start the cluster with direct links and wait until both gateways see
/// three instances.
fn start() -> Hosts {
    start_with(Links::Direct)
}

fn start_with(links: Links) -> Hosts {
    let net = Net::new().unwrap_or_else(|e| panic!("the multi-host tests need their hosts: {e}"));
    let dir = confab_e2e::data_dir();
    let host = |name: &str, last: u8| net.host(name, last).unwrap_or_else(|e| panic!("{e}"));
    let store = host("store", 2);
    let instances: Vec<Arc<Host>> = (1..=3).map(|k| host(&format!("i{k}"), 10 + k)).collect();
    let gateways: Vec<Arc<Host>> = (1..=2).map(|k| host(&format!("g{k}"), 20 + k)).collect();
    let client = host("client", 100);

    store
        .spawn(
            std::path::Path::new(env!("CARGO_BIN_EXE_cql-test-node")),
            &["--listen".into(), format!("{}:{CQL_PORT}", store.addr)],
            &dir.path().join("store.log"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let contact_point = format!("{}:{CQL_PORT}", store.addr);
    let keyspace = client
        .run({
            let contact_point = contact_point.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while tokio::net::TcpStream::connect(&contact_point)
                    .await
                    .is_err()
                {
                    assert!(Instant::now() < deadline, "the CQL test node did not start");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                confab_e2e::kassandra::init_keyspace(&contact_point).await
            }
        })
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));

    let store_env = store_env(&contact_point, &keyspace, dir.path());
    // Where the gateways reach an instance: directly, or through its
    // host's delaying proxy (which its registration then names).
    let reach = |h: &Host| match links {
        Links::Direct => url(h),
        Links::SlowAndLossy => format!("http://{}:{PROXY_PORT}", h.addr),
    };
    for (k, h) in instances.iter().enumerate() {
        spawn_instance(h, k + 1, &reach(h), &store_env, dir.path());
        if links == Links::SlowAndLossy {
            let upstream: std::net::SocketAddr = format!("{}:{PORT}", h.addr).parse().unwrap();
            let listen = format!("{}:{PROXY_PORT}", h.addr);
            let (ready, bound) = std::sync::mpsc::channel();
            // The thread serves the proxy until the test process ends.
            let _proxy = h.run(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .unwrap_or_else(|e| panic!("{listen}: {e}"));
                let _ = ready.send(());
                confab_e2e::slowlink::delay_proxy(
                    listener,
                    upstream,
                    Duration::from_millis(50),
                    Duration::from_millis(20),
                )
                .await
            });
            bound
                .recv_timeout(Duration::from_secs(10))
                .expect("the delaying proxy did not start");
            let peers: Vec<&str> = gateways.iter().map(|g| g.addr.as_str()).collect();
            h.lossy(&peers, 2).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let instance_urls: Vec<String> = instances.iter().map(|h| reach(h)).collect();
    // The first gateway is given the instances' URLs on its command line;
    // the second is started as the deployment pack starts one
    // (`confab-gateway.service`, `gateway.toml`, `gateway.env`): it finds
    // the instances in the session store, and any instance added later.
    let listen = format!("{}:{PORT}", gateways[0].addr);
    let urls: Vec<&str> = instance_urls.iter().map(String::as_str).collect();
    let mut static_args = confab_e2e::gateway_args(&listen, &urls);
    static_args.extend([
        "--set".into(),
        format!("gateway.agent-credential={AGENT_CREDENTIAL}"),
    ]);
    let static_args: Vec<&str> = static_args.iter().map(String::as_str).collect();
    gateways[0]
        .spawn(confab_bin(), &static_args, &dir.path().join("g1.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    let token_secret = dir.path().join("token-secret");
    std::fs::write(&token_secret, confab_e2e::TOKEN_SECRET).unwrap();
    let mut gateway_env: Vec<(&str, String)> = vec![
        (
            "CONFAB_GATEWAY_LISTEN",
            format!("{}:{PORT}", gateways[1].addr),
        ),
        (
            "CONFAB_GATEWAY_TOKEN_SECRET_FILE",
            token_secret.display().to_string(),
        ),
        ("CONFAB_GATEWAY_AGENTS_FILE", String::new()),
        ("CONFAB_GATEWAY_AGENT_CREDENTIAL", AGENT_CREDENTIAL.into()),
        ("CONFAB_GATEWAY_RATE_LIMIT_PER_SECOND", "100000".into()),
        ("CONFAB_GATEWAY_RATE_LIMIT_BURST", "100000".into()),
        ("CONFAB_GATEWAY_HEALTH_INTERVAL", "200ms".into()),
    ];
    gateway_env.extend(store_env.iter().cloned());
    gateways[1]
        .spawn_with_env(
            confab_bin(),
            &deploy::exec_args("confab-gateway.service"),
            &deploy::overlay(deploy::env_file("gateway.env"), &gateway_env),
            &dir.path().join("g2.log"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let gateway_urls: Vec<String> = gateways.iter().map(|h| url(h)).collect();
    client
        .run(async move {
            let http = confab_e2e::client().build().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            for g in &gateway_urls {
                loop {
                    if healthy_instances(&http, g).await == 3 {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{g} does not see three instances"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));
    Hosts {
        net,
        store,
        instances,
        gateways,
        client,
        dir,
        store_env,
    }
}

/// What the tests put over the pack's configuration: the store host's CQL
/// test node and keyspace (one node: no schema agreement, no data centre),
/// and the secrets in files of the test's own.
fn store_env(
    contact_point: &str,
    keyspace: &str,
    dir: &std::path::Path,
) -> Vec<(&'static str, String)> {
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    vec![
        ("CONFAB_CASSANDRA_CONTACT_POINTS", contact_point.to_owned()),
        ("CONFAB_CASSANDRA_KEYSPACE", keyspace.to_owned()),
        ("CONFAB_CASSANDRA_LOCAL_DC", String::new()),
        ("CONFAB_CASSANDRA_AWAIT_SCHEMA_AGREEMENT", "false".into()),
        ("CONFAB_CASSANDRA_RECONNECT_TIMEOUT", "2s".into()),
        (
            "CONFAB_CLUSTER_SECRET_FILE",
            file("cluster-secret", CLUSTER_SECRET),
        ),
        (
            "CONFAB_SERVER_ADMIN_TOKEN_FILE",
            file("admin-token", ADMIN_TOKEN),
        ),
    ]
}

/// Start instance `i<k>` on host `h` as the deployment pack does
/// (`deploy/systemd/confab-instance.service`, `instance.toml`, and
/// `instance.env` with this host's values); its log is `i<k>.log`.
fn spawn_instance(
    h: &Host,
    k: usize,
    advertise: &str,
    store_env: &[(&'static str, String)],
    dir: &std::path::Path,
) {
    let mut host: Vec<(&str, String)> = vec![
        ("CONFAB_SERVER_INSTANCE_ID", format!("i{k}")),
        ("CONFAB_SERVER_LISTEN", format!("{}:{PORT}", h.addr)),
        ("CONFAB_SERVER_ADVERTISE_URL", advertise.to_owned()),
    ];
    host.extend(store_env.iter().cloned());
    let env = deploy::overlay(deploy::env_file("instance.env"), &host);
    h.spawn_with_env(
        confab_bin(),
        &deploy::exec_args("confab-instance.service"),
        &env,
        &dir.join(format!("i{k}.log")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// How many instances the gateway at `g` counts as healthy, seen from the
/// client host.
async fn healthy_instances(http: &reqwest::Client, g: &str) -> usize {
    match http.get(format!("{g}/status")).send().await {
        Ok(r) => r.json::<Value>().await.ok().map_or(0, |s| {
            s["instances"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|i| i["healthy"] == true).count())
        }),
        Err(_) => 0,
    }
}

/// How the chats' owners settled after the load stopped.
struct Settled {
    /// Chats that two instances hosted at the first look.
    doubly_hosted_at_first: usize,
    /// When no chat was hosted by two instances any more.
    after: Duration,
}

/// Wait (up to 15 s) until no chat of `chats` is hosted by two of the
/// instances at `instance_urls` that answer (a fenced old owner lets a chat
/// go when its write is refused or its ownership sweep, every 5 s, finds
/// the chat owned elsewhere); fail if one still is. Asks each instance's
/// `/admin/sessions` with the admin token of the pack's set-up.
async fn one_owner_each(instance_urls: &[String], chats: &[String]) -> Settled {
    let http = confab_e2e::client()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let began = Instant::now();
    let mut first = None;
    loop {
        let mut hosts_of: HashMap<&str, Vec<String>> = HashMap::new();
        for base in instance_urls {
            let mut after = String::new();
            loop {
                let Ok(answer) = http
                    .get(format!("{base}/admin/sessions?limit=500&after={after}"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                else {
                    break; // a dead or cut-off host hosts nothing live
                };
                assert!(answer.status().is_success(), "{base}: {}", answer.status());
                let page: Value = answer.json().await.unwrap_or(Value::Null);
                for s in page["sessions"].as_array().into_iter().flatten() {
                    if let Some(chat) = chats.iter().find(|c| s["session_id"] == c.as_str()) {
                        hosts_of.entry(chat).or_default().push(base.clone());
                    }
                }
                match page["next"].as_str() {
                    Some(next) => after = next.to_owned(),
                    None => break,
                }
            }
        }
        let doubly: Vec<_> = hosts_of.iter().filter(|(_, h)| h.len() > 1).collect();
        let first = *first.get_or_insert(doubly.len());
        if doubly.is_empty() {
            return Settled {
                doubly_hosted_at_first: first,
                after: began.elapsed(),
            };
        }
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "chats with two live owners 15 s after the load stopped: {doubly:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Close every chat (its customer leaves) through `gateway`.
async fn close_all(gateway: String, chats: &[Chat]) {
    let http = confab_e2e::client().build().unwrap();
    for chat in chats {
        let r = http
            .post(format!("{gateway}/api/v1/chats/{}/leave", chat.id))
            .bearer_auth(&chat.token)
            .json(&json!({}))
            .send()
            .await
            .expect("leave");
        assert!(
            r.status().is_success(),
            "{}: leave answered {}",
            chat.id,
            r.status()
        );
    }
}

/// Run the load through both gateways, let `fault` happen 3 s in, go on
/// for 5 s, then check every chat through `read_through` (a gateway that
/// is still up), then run `after`. Returns the messages acknowledged and
/// the longest wait for an acknowledgement.
fn under_load(
    name: &str,
    fault: impl FnOnce(&Hosts),
    read_through: usize,
    after: impl FnOnce(&Hosts),
) -> (usize, Duration) {
    under_load_with(Links::Direct, name, fault, read_through, after)
}

fn under_load_with(
    links: Links,
    name: &str,
    fault: impl FnOnce(&Hosts),
    read_through: usize,
    after: impl FnOnce(&Hosts),
) -> (usize, Duration) {
    let hosts = start_with(links);
    let gateways: Vec<String> = hosts.gateways.iter().map(|h| url(h)).collect();
    let stop = Arc::new(tokio::sync::Notify::new());
    let load = hosts.client.run(load(gateways.clone(), 30, stop.clone()));
    std::thread::sleep(Duration::from_secs(3));
    fault(&hosts);
    std::thread::sleep(Duration::from_secs(5));
    stop.notify_one();
    let (chats, longest) = load
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));
    let acked: usize = chats.iter().map(|c| c.acked.len()).sum();
    let retries: usize = chats.iter().map(|c| c.retries).sum();
    let mut waits: Vec<Duration> = chats.iter().flat_map(|c| c.waits.iter().copied()).collect();
    waits.sort();
    let at = |q: f64| {
        waits
            .get(((waits.len() as f64 * q) as usize).min(waits.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{name}: acknowledgement p50 {:.1} ms, p99 {:.1} ms; {retries} requests failed and were sent again",
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0
    );
    let reader = gateways[read_through].clone();
    let instance_urls: Vec<String> = hosts.instances.iter().map(|h| url(h)).collect();
    let (checked, chats, settled) = hosts
        .client
        .run(async move {
            let checked = check(reader, &chats, None).await;
            let ids: Vec<String> = chats.iter().map(|c| c.id.clone()).collect();
            let settled = one_owner_each(&instance_urls, &ids).await;
            (checked, chats, settled)
        })
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{name}: {acked} messages acknowledged in 30 chats through 2 gateways, {} read back, 0 lost or duplicated; the longest wait for an acknowledgement {:.2} s",
        checked.read,
        longest.as_secs_f64()
    );
    assert!(acked > 100, "too little load: {acked}");
    assert!(checked.problems.is_empty(), "{:#?}", checked.problems);
    // Every chat went on: none waited longer than this for a message.
    assert!(
        longest < Duration::from_secs(10),
        "a chat stalled {longest:?}"
    );
    println!(
        "{name}: {} chats hosted by two instances at once when the load stopped; every chat had one owner {:.2} s later",
        settled.doubly_hosted_at_first,
        settled.after.as_secs_f64()
    );
    // The chats close on the instances that own them, on two or three
    // hosts; every final transcript is then read from one gateway, with
    // the customer's token and with the agents' credential.
    let owners = checked.instances;
    assert!(owners.len() >= 2, "the chats lived on {owners:?} only");
    let reader = gateways[read_through].clone();
    let closed = hosts
        .client
        .run(async move {
            close_all(reader.clone(), &chats).await;
            check(reader, &chats, Some(AGENT_CREDENTIAL)).await
        })
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(closed.problems.is_empty(), "{:#?}", closed.problems);
    assert_eq!(
        closed.read,
        2 * checked.read,
        "final transcripts read twice (customer, agent)"
    );
    println!(
        "{name}: the 30 chats closed on {owners:?}; every final transcript read back through one gateway (answered by {:?})",
        closed.instances
    );
    after(&hosts);
    (acked, longest)
}

#[test]
fn an_instance_host_dies_under_load_and_nothing_acknowledged_is_lost() {
    under_load(
        "an instance's host died",
        |hosts| hosts.instances[0].crash().unwrap_or_else(|e| panic!("{e}")),
        1,
        |_| {},
    );
}

#[test]
fn a_gateway_host_dies_and_its_clients_go_on_through_the_other() {
    under_load(
        "a gateway's host died",
        |hosts| hosts.gateways[0].crash().unwrap_or_else(|e| panic!("{e}")),
        1,
        |_| {},
    );
}

#[test]
fn an_instance_cut_off_from_one_gateway_is_fenced_while_the_other_follows_its_chats() {
    under_load(
        "an instance cut off from one gateway (the other still reached it)",
        |hosts| {
            hosts
                .net
                .cut(&hosts.instances[0], &hosts.gateways[0])
                .unwrap_or_else(|e| panic!("{e}"))
        },
        1,
        |hosts| {
            // The cut-off gateway restored i1's chats elsewhere, and i1,
            // still reached by the other gateway, was fenced: a write
            // refused, or its sweep letting the chats go (59608).
            let log = |name: &str| {
                std::fs::read_to_string(hosts.dir.path().join(name)).unwrap_or_default()
            };
            assert!(
                log("g1.log").contains("\"event_id\":59702"),
                "g1 moved no chat away from the instance it could not reach"
            );
            let fenced = log("i1.log").matches("\"event_id\":59608").count();
            println!("an instance cut off from one gateway: i1 logged 59608 {fenced} times");
            assert!(fenced > 0, "i1 was never fenced");
        },
    );
}

#[test]
fn an_instance_cut_off_from_the_store_has_its_chats_moved() {
    under_load(
        "an instance cut off from the session store",
        |hosts| {
            hosts
                .net
                .cut(&hosts.instances[0], &hosts.store)
                .unwrap_or_else(|e| panic!("{e}"))
        },
        0,
        |hosts| {
            // The link heals: the instance finds its chats claimed
            // elsewhere and lets them go (59608).
            hosts
                .net
                .heal(&hosts.instances[0], &hosts.store)
                .unwrap_or_else(|e| panic!("{e}"));
            let log = hosts.dir.path().join("i1.log");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("\"event_id\":59608") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "i1 did not let its chats go (59608) after the link healed:\n{}",
                    text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        },
    );
}

#[test]
fn the_store_host_frozen_and_thawed_raises_and_clears_the_alarm_and_loses_nothing() {
    under_load(
        "the store host frozen for 4 s, then thawed",
        |hosts| {
            hosts.store.freeze(true);
            let store = hosts.store.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(4));
                store.freeze(false);
            });
        },
        0,
        |hosts| {
            // Every instance raised the alarm (59520) and cleared it (59521).
            for k in 1..=3 {
                let log = hosts.dir.path().join(format!("i{k}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                for id in [59520, 59521] {
                    assert!(
                        text.contains(&format!("\"event_id\":{id}")),
                        "i{k} logged no {id}"
                    );
                }
            }
        },
    );
}

/// Create `n` chats through the gateway at `g`; how many went to `instance`.
async fn chats_on(http: &reqwest::Client, g: &str, instance: &str, n: usize) -> usize {
    let mut on = 0;
    for i in 0..n {
        let r: Value = http
            .post(format!("{g}/api/v1/chats"))
            .json(&json!({"nickname": format!("n{i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(r["chat_id"].is_string(), "{r}");
        on += usize::from(r["instance_id"] == instance);
    }
    on
}

/// The second gateway finds instances only through the session store's
/// registry: an instance started on a new host later is found within
/// seconds and given new chats; once its heartbeat stops (its host cut off
/// from the store host), it is given none (59705 in the gateway's log).
#[test]
fn a_gateway_finds_a_new_instance_in_the_store_and_drops_one_whose_heartbeat_stops() {
    let hosts = start();
    let i4 = hosts.net.host("i4", 14).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    spawn_instance(&i4, 4, &url(&i4), &hosts.store_env, hosts.dir.path());
    let g2 = url(&hosts.gateways[1]);
    let (found, on_i4) = hosts
        .client
        .run({
            let g2 = g2.clone();
            async move {
                let http = confab_e2e::client().build().unwrap();
                while healthy_instances(&http, &g2).await < 4 {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "{g2} did not find the fourth instance"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let found = started.elapsed();
                // The new instance has the fewest chats: the next go there.
                (found, chats_on(&http, &g2, "i4", 6).await)
            }
        })
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "discovery: the fourth instance was found by the discovering gateway {:.2} s after it was started; {on_i4} of 6 new chats went to it",
        found.as_secs_f64()
    );
    assert!(on_i4 > 0, "no new chat went to the discovered instance");

    hosts
        .net
        .cut(&i4, &hosts.store)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = hosts.dir.path().join("g2.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("\"event_id\":59705") && l.contains("i4"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "g2 did not notice i4's heartbeat stop (59705)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let on_i4 = hosts
        .client
        .run(async move {
            let http = confab_e2e::client().build().unwrap();
            chats_on(&http, &g2, "i4", 10).await
        })
        .join()
        .expect("the client host")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(on_i4, 0, "chats went to an instance without a heartbeat");
}

/// The link between the gateways' and the instances' hosts is slow (50 ms
/// ± 20 ms each way, through a proxy on each instance's host: this kernel
/// has no netem) and loses 2 % of its packets (nftables): nothing
/// acknowledged is lost or duplicated, and the latency is reported.
#[test]
fn a_slow_lossy_link_between_gateways_and_instances_loses_nothing() {
    under_load_with(
        Links::SlowAndLossy,
        "a slow (50 ms ± 20 ms each way), lossy (2 %) link between gateways and instances",
        |_| {},
        0,
        |hosts| {
            let dropped: u64 = hosts
                .instances
                .iter()
                .map(|h| h.dropped().unwrap_or_else(|e| panic!("{e}")))
                .sum();
            let downs: usize = ["g1.log", "g2.log"]
                .iter()
                .map(|g| {
                    std::fs::read_to_string(hosts.dir.path().join(g))
                        .unwrap_or_default()
                        .matches("\"event_id\":59700")
                        .count()
                })
                .sum();
            println!("a slow, lossy link: {dropped} packets dropped; the gateways marked an instance down {downs} times");
            assert!(dropped > 0, "the link lost nothing");
        },
    );
}
