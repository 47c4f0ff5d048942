//! `--scenario sockets`: what an open chat WebSocket costs, and whether
//! every participant gets every event when there are many of them.
//!
//! 1. `--sockets` chats through one gateway in front of the largest of
//!    `--instances` instances (one SQLite file, as `confab up` runs them);
//! 2. one customer WebSocket per chat through the gateway, idle: resident
//!    memory and descriptors per socket on the gateway and the instances,
//!    against the same processes before the sockets opened;
//! 3. a fan-out: `--fanout-rate` messages/s spread over the chats for
//!    `--duration`, each acknowledged message checked to arrive exactly
//!    once on its chat's socket; acknowledgement-to-delivery p50/p99;
//! 4. kill -9 of the instance with the most chats: the time until every
//!    socket of its chats has its `reconnected` notice (the gateway moved
//!    the chat and resubscribed the socket after its last seq), then a
//!    second fan-out over every chat.

use super::*;
use confab_e2e::sockets::{self as fleet, Book, Subscription};
use std::collections::HashMap;

pub(super) async fn sockets(dir: &Path, args: &BenchArgs, text: &str) -> anyhow::Result<()> {
    let n = args.sockets;
    let limit = fleet::raise_descriptor_limit();
    println!("descriptor limit of the load generator: {limit}");
    if (limit as usize) < n + 1_000 {
        bail!(
            "{n} sockets need a descriptor limit above {n}; this process has {limit} (ulimit -Hn)"
        );
    }
    let instance_count = args.instances.iter().copied().max().unwrap_or(3).max(1);
    let db = dir.join("sockets.db");
    let mut instances = Vec::new();
    for k in 1..=instance_count {
        instances.push(
            ServerProcess::instance(&db, &args.synchronous, &format!("i{k}"), free_port()?).await?,
        );
    }
    let urls: Vec<String> = instances.iter().map(|i| i.url.clone()).collect();
    let gateway = ServerProcess::gateway(&urls, free_port()?).await?;
    let client = client_builder().pool_max_idle_per_host(256).build()?;
    let started = Instant::now();
    let chats = create_chats_at(&client, &gateway.url, n, true).await?;
    println!(
        "{n} chats created through the gateway in {:.1} s ({instance_count} instances)",
        started.elapsed().as_secs_f64()
    );
    let subscriptions: Vec<Subscription> = chats
        .iter()
        .map(|c| Subscription {
            url: format!(
                "{}/ws?after=0",
                c.messages_url
                    .replacen("http://", "ws://", 1)
                    .trim_end_matches("/messages")
            ),
            token: c.token.clone().unwrap_or_default(),
        })
        .collect();

    let rss = |p: &ServerProcess| p.rss_kib();
    let instances_rss = |v: &[ServerProcess]| v.iter().map(rss).sum::<u64>();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (gw_before, inst_before) = (rss(&gateway), instances_rss(&instances));
    let gw_fds_before = fleet::descriptors(gateway.child.id());

    let book = Arc::new(Book::default());
    let started = Instant::now();
    let opened = fleet::open(&subscriptions, &book, 256, Duration::from_secs(300)).await;
    println!(
        "{opened} of {n} sockets open and subscribed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (gw_after, inst_after) = (rss(&gateway), instances_rss(&instances));
    let gw_fds = fleet::descriptors(gateway.child.id()) - gw_fds_before;
    let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / opened.max(1) as f64;
    println!(
        "gateway: {:.1} KiB per socket (RSS {:.0} → {:.0} MiB), {:.2} descriptors per socket",
        per(gw_after, gw_before),
        gw_before as f64 / 1024.0,
        gw_after as f64 / 1024.0,
        gw_fds as f64 / opened.max(1) as f64
    );
    println!(
        "instances together: {:.1} KiB per socket (RSS {:.0} → {:.0} MiB)",
        per(inst_after, inst_before),
        inst_before as f64 / 1024.0,
        inst_after as f64 / 1024.0
    );

    if args.fanout_rate > 0 && opened > 0 {
        fan_out(&client, &chats, &book, args, text).await;
    }
    kill_one(&mut instances, &chats, &book).await;
    if args.fanout_rate > 0 && opened > 0 {
        println!("after the kill:");
        fan_out(&client, &chats, &book, args, text).await;
    }
    let closes = book.closes.lock().clone();
    if !closes.is_empty() {
        println!("sockets closed by the server: {closes:?}");
    }
    Ok(())
}

/// Kill -9 the instance hosting the most chats; report how long until
/// every socket of its chats was resubscribed elsewhere.
async fn kill_one(instances: &mut [ServerProcess], chats: &[Chat], book: &Book) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in chats {
        *counts
            .entry(c.instance.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let Some((victim, moved)) = counts.into_iter().max_by_key(|(_, n)| *n) else {
        return;
    };
    let Some(k) = victim
        .strip_prefix('i')
        .and_then(|k| k.parse::<usize>().ok())
        .filter(|k| (1..=instances.len()).contains(k))
    else {
        println!("kill -9: no instance {victim:?} to kill");
        return;
    };
    let before = book.reconnected.load(Ordering::Relaxed);
    let killed = Instant::now();
    instances[k - 1].stop();
    let deadline = killed + Duration::from_secs(120);
    while book.reconnected.load(Ordering::Relaxed) - before < moved && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = book.reconnected.load(Ordering::Relaxed) - before;
    let last = book
        .last_reconnected
        .lock()
        .map(|t| t.saturating_duration_since(killed))
        .unwrap_or_default();
    println!(
        "kill -9 of {victim} with {moved} subscribed sockets: {done} resubscribed with their reconnected notice, the last {:.2} s after the kill",
        last.as_secs_f64()
    );
}

/// `--fanout-rate` messages/s over the chats, open loop, for
/// `--duration`; then wait up to 10 s for the last deliveries.
async fn fan_out(
    client: &reqwest::Client,
    chats: &[Chat],
    book: &Arc<Book>,
    args: &BenchArgs,
    text: &str,
) {
    let total = (args.fanout_rate as f64 * args.duration.as_secs_f64()) as u64;
    let every = Duration::from_secs_f64(1.0 / args.fanout_rate as f64);
    let nonce = phase_nonce();
    let errors = Arc::new(AtomicU64::new(0));
    book.clear_latencies();
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (acknowledged, delivered, duplicates) = (
        count(&book.acknowledged),
        count(&book.delivered),
        count(&book.duplicates),
    );
    let start = tokio::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let k = (i as usize * 7919) % chats.len();
        let (client, chat, text) = (client.clone(), chats[k].clone(), text.to_owned());
        let (book, errors, cmid) = (book.clone(), errors.clone(), format!("{nonce}-{i}"));
        sends.spawn(async move {
            let seq = match send_answer(&client, &chat, &text, cmid).await {
                Ok(r) if r.status().is_success() => {
                    r.json::<Value>().await.ok().and_then(|v| v["seq"].as_u64())
                }
                _ => None,
            };
            match seq {
                Some(seq) => book.acknowledged(k, seq),
                None => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while sends.join_next().await.is_some() {}
    let sent_for = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while book.undelivered() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "fan-out: {total} messages offered at {} msgs/s over {:.1} s: {} acknowledged, {} errors, {} delivered, {} acknowledged but not delivered, {} duplicated",
        args.fanout_rate,
        sent_for.as_secs_f64(),
        count(&book.acknowledged) - acknowledged,
        count(&errors),
        count(&book.delivered) - delivered,
        book.undelivered(),
        count(&book.duplicates) - duplicates,
    );
    println!(
        "acknowledgement to delivery: p50 {}, p99 {}, max {}",
        ms(book.latency(0.5)),
        ms(book.latency(0.99)),
        ms(book.latency(1.0))
    );
}
