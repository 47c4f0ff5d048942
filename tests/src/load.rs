//! A chat load through gateways, and its check: chats that each send one
//! message after another, retrying a failed request (same
//! `client_msg_id`) through the next gateway, then every acknowledged
//! message looked for in the transcripts ([`crate::history`]). Used by the
//! fault tests (multi-host, lost store answers).

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A chat of the load: its id, customer token and the texts acknowledged.
pub struct Chat {
    pub id: String,
    pub token: String,
    pub acked: Vec<String>,
    /// From the first try to the acknowledgement, per message.
    pub waits: Vec<Duration>,
    /// Requests that failed and were sent again.
    pub retries: usize,
}

/// The load, run on the client host: `chats` chats, each sending one
/// message after another, half of them through each gateway, until `stop`;
/// a message whose request failed is sent again through the other gateway
/// with the same `client_msg_id` (a client's retry), so an acknowledged
/// message can be duplicated only by the server. Returns the chats, their
/// acknowledged texts, and the longest time a chat went without an
/// acknowledgement.
pub async fn load(
    gateways: Vec<String>,
    chats: usize,
    stop: Arc<tokio::sync::Notify>,
) -> (Vec<Chat>, Duration) {
    // A client gives up on a request after 2 s and sends it again through
    // the other gateway (with the same client_msg_id): a host that died
    // answers nothing, not even a reset.
    let http = crate::client()
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut made = Vec::new();
    for i in 0..chats {
        let g = &gateways[i % gateways.len()];
        let r: Value = http
            .post(format!("{g}/api/v1/chats"))
            .json(&json!({"nickname": format!("c{i}")}))
            .send()
            .await
            .expect("create a chat")
            .json()
            .await
            .unwrap();
        made.push(Chat {
            id: r["chat_id"].as_str().unwrap().to_owned(),
            token: r["token"].as_str().unwrap().to_owned(),
            acked: Vec::new(),
            waits: Vec::new(),
            retries: 0,
        });
    }
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (stop, stopped) = (stop.clone(), stopped.clone());
        tokio::spawn(async move {
            stop.notified().await;
            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let mut tasks = Vec::new();
    for (c, mut chat) in made.into_iter().enumerate() {
        let (http, gateways, stopped) = (http.clone(), gateways.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            let mut n = 0u64;
            // Half the chats start on each gateway; a chat moves to the
            // other one when a request fails.
            let mut through = c;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let text = format!("chat {c} message {n}");
                let cmid = format!("m{n}");
                let began = Instant::now();
                loop {
                    let g = &gateways[through % gateways.len()];
                    let r = http
                        .post(format!("{g}/api/v1/chats/{}/messages", chat.id))
                        .bearer_auth(&chat.token)
                        .json(&json!({"text": text, "client_msg_id": cmid}))
                        .send()
                        .await;
                    if matches!(&r, Ok(r) if r.status().is_success()) {
                        break;
                    }
                    through += 1;
                    chat.retries += 1;
                    assert!(
                        began.elapsed() < Duration::from_secs(30),
                        "chat {c}: message {n} not acknowledged in 30 s: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                longest = longest.max(began.elapsed());
                chat.waits.push(began.elapsed());
                chat.acked.push(text);
                n += 1;
            }
            (chat, longest)
        }));
    }
    let mut done = Vec::new();
    let mut longest = Duration::ZERO;
    for t in tasks {
        let (chat, l) = t.await.expect("a chat's sender");
        longest = longest.max(l);
        done.push(chat);
    }
    (done, longest)
}

/// What [`check`] read: messages, the problems found, and the instances
/// that answered (the chats' owners, or the readers of closed chats).
pub struct Checked {
    pub read: usize,
    pub problems: Vec<String>,
    pub instances: std::collections::BTreeSet<String>,
}

/// Every acknowledged message exactly once in its chat's transcript, in
/// the order acknowledged, read through `gateway` with the chat's token or,
/// once closed (`closed_with` the agents' credential), also with that
/// credential (the contact history); a closed chat's pages must say so.
pub async fn check(gateway: String, chats: &[Chat], closed_with: Option<&str>) -> Checked {
    let closed = closed_with.is_some();
    let http = crate::client().build().unwrap();
    let mut checked = Checked {
        read: 0,
        problems: Vec::new(),
        instances: Default::default(),
    };
    let readers: Vec<Option<&str>> = if closed {
        vec![None, closed_with]
    } else {
        vec![None]
    };
    for chat in chats {
        for reader in &readers {
            let bearer = reader.unwrap_or(&chat.token);
            let mut texts = Vec::new();
            let mut after = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let answer = http
                    .get(format!(
                        "{gateway}/api/v1/chats/{}/transcript?after={after}",
                        chat.id
                    ))
                    .bearer_auth(bearer)
                    .send()
                    .await
                    .expect("a transcript");
                let status = answer.status();
                let page: Value = answer.json().await.unwrap();
                // A closing still under way has no final transcript yet.
                if closed && status == 409 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                assert!(status.is_success(), "{}: {status} {page}", chat.id);
                if closed && page["state"] != "closed" {
                    checked
                        .problems
                        .push(format!("{}: not closed: {}", chat.id, page["state"]));
                }
                if let Some(i) = page["instance_id"].as_str() {
                    checked.instances.insert(i.to_owned());
                }
                let events = page["events"].as_array().cloned().unwrap_or_default();
                after = events
                    .last()
                    .and_then(|e| e["seq"].as_u64())
                    .unwrap_or(after);
                texts.extend(crate::texts(&events));
                if page["more"] != true {
                    break;
                }
            }
            checked.read += texts.len();
            let whose = if reader.is_some() { " (agent)" } else { "" };
            checked.problems.extend(crate::history::problems(
                &format!("{}{whose}", chat.id),
                &chat.acked,
                &texts,
            ));
        }
    }
    checked
}
