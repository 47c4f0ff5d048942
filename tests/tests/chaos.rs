//! A bounded chaos test: chats send messages through the gateway while
//! instances are killed with SIGKILL and restarted at random. At the end
//! every acknowledged message is in its transcript exactly once, in order.
//! `CHAOS_SECONDS` (default 30) bounds the run; `CHAOS_SEED` repeats one.

use confab_e2e::cluster::{Chat, TestCluster};
use confab_e2e::texts;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

async fn send_until_acked(
    c: &TestCluster,
    chat: &Chat,
    text: &str,
    cmid: &str,
    give_up: Instant,
) -> Option<u64> {
    let url = format!("{}/api/v1/chats/{}/messages", c.gateway, chat.id);
    let body = json!({"text": text, "client_msg_id": cmid});
    let mut delay = Duration::from_millis(50);
    while Instant::now() < give_up {
        match c.http.try_post(&url, &body, Some(&chat.token)).await {
            Ok(a) if a.status == 200 => return a.body["seq"].as_u64(),
            Ok(a) if a.status < 500 && a.status != 429 => {
                panic!("message refused: {} {}", a.status, a.body)
            }
            _ => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(800));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_survive_random_kills_exactly_once_in_order() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("chaos: seed {seed}, {seconds} s");
    let c =
        Arc::new(TestCluster::start(3, &["--set", "settings.transcript-resend-delay=200ms"]).await);
    let mut chats = Vec::new();
    for i in 0..8 {
        chats.push(c.create_chat(&format!("chaos {i}")).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for chat in chats.clone() {
        let (c, stop, total) = (c.clone(), stop.clone(), total.clone());
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("{}-{i}", &chat.id[..8]);
                let give_up = Instant::now() + Duration::from_secs(60);
                let seq = send_until_acked(&c, &chat, &text, &format!("m{i}"), give_up)
                    .await
                    .unwrap_or_else(|| panic!("message {text} never acknowledged"));
                acked.push((seq, text));
                total.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (chat, acked)
        }));
    }

    let mut rng = Rng(seed);
    let ids = ["inst-1", "inst-2", "inst-3"];
    let mut dead: Vec<&str> = Vec::new();
    let mut kills = 0;
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(800 + rng.next(1200))).await;
        if !dead.is_empty() && rng.next(2) == 0 {
            let id = dead.remove(rng.next(dead.len() as u64) as usize);
            c.restart(id).await;
            continue;
        }
        let alive: Vec<&str> = ids.iter().copied().filter(|i| !dead.contains(i)).collect();
        if alive.len() > 1 {
            let victim = alive[rng.next(alive.len() as u64) as usize];
            c.kill(victim).await;
            dead.push(victim);
            kills += 1;
        }
    }
    for id in dead {
        c.restart(id).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut checked = 0;
    for s in senders {
        let (chat, acked) = s.await.unwrap();
        let t = c.transcript(&chat).await;
        let events = t["events"].as_array().unwrap();
        let expected: Vec<String> = acked.iter().map(|(_, t)| t.clone()).collect();
        assert_eq!(
            texts(events),
            expected,
            "chat {}: acknowledged messages exactly once, in order",
            chat.id
        );
        for (seq, text) in &acked {
            let e = events
                .iter()
                .find(|e| e["seq"].as_u64() == Some(*seq))
                .unwrap();
            assert_eq!(e["text"].as_str(), Some(text.as_str()));
        }
        checked += acked.len();
    }
    println!(
        "chaos: {checked} acknowledged messages in 8 chats checked after {kills} kills (seed {seed}, {} failovers)",
        c.metric(&c.gateway, "confab_gateway_failovers_total").await
    );
    assert!(kills >= 3, "the run killed too little to mean anything");
}
