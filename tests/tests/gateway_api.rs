//! The gateway's public API: every auth failure, the Origin allow-list, the
//! rate limit, size limits, errors, the OpenAPI document and the pages.

use confab_e2e::cluster::TestCluster;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

async fn ws_status(url: &str, origin: Option<&str>) -> u16 {
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(WsError::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("unexpected WebSocket error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_auth_failure_is_refused() {
    let c = TestCluster::start(2, &[]).await;
    let chat = c.create_chat("Ann").await;
    let other = c.create_chat("Eve").await;
    let msg = format!("{}/api/v1/chats/{}/messages", c.gateway, chat.id);
    let body = json!({"text": "hi"});
    let h = &c.http;

    let a = h.post(&msg, &body, None).await;
    assert_eq!((a.status, a.error_code()), (401, "unauthorized"));
    assert_eq!(h.post(&msg, &body, Some("garbage")).await.status, 401);
    // A genuine token for another chat.
    let a = h.post(&msg, &body, Some(&other.token)).await;
    assert_eq!((a.status, a.error_code()), (403, "forbidden"));
    // A forged token: another chat's id with a valid-looking signature.
    let forged = format!(
        "{}.{}",
        other.token.split('.').next().unwrap(),
        chat.token.split('.').nth(1).unwrap()
    );
    assert_eq!(h.post(&msg, &body, Some(&forged)).await.status, 401);
    let transcript = format!("{}/api/v1/chats/{}/transcript", c.gateway, chat.id);
    assert_eq!(h.get(&transcript, None).await.status, 401);
    assert_eq!(h.get(&transcript, Some(&other.token)).await.status, 403);
    let leave = format!("{}/api/v1/chats/{}/leave", c.gateway, chat.id);
    assert_eq!(
        h.post(&leave, &json!({}), Some(&other.token)).await.status,
        403
    );

    let join = format!("{}/api/v1/chats/{}/join", c.gateway, chat.id);
    assert_eq!(
        h.post(&join, &json!({"nickname": "Bob"}), None)
            .await
            .status,
        401
    );
    assert_eq!(
        h.post(&join, &json!({"nickname": "Bob"}), Some("wrong"))
            .await
            .status,
        401
    );
    // A customer token is not an agent credential.
    assert_eq!(
        h.post(&join, &json!({"nickname": "Bob"}), Some(&chat.token))
            .await
            .status,
        401
    );
    let queue = format!("{}/api/v1/queue", c.gateway);
    assert_eq!(h.get(&queue, None).await.status, 401);
    assert_eq!(h.get(&queue, Some(&chat.token)).await.status, 401);

    let ws = c.ws_url(&chat, 0);
    assert_eq!(ws_status(&ws, None).await, 101);
    assert_eq!(
        ws_status(&ws.replace(&chat.token, "garbage"), None).await,
        401
    );
    assert_eq!(
        ws_status(&ws.replace(&chat.token, &other.token), None).await,
        403
    );
    assert_eq!(ws_status(&ws, Some("http://evil.example")).await, 403);
    assert_eq!(
        ws_status(&ws, Some(&c.gateway)).await,
        101,
        "same origin is allowed"
    );

    // Nothing above changed the chat.
    let t = c.transcript(&chat).await;
    assert_eq!(t["events"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowed_origins_come_from_configuration() {
    let c = TestCluster::start(1, &[]).await;
    let chat = c.create_chat("Ann").await;
    // The default allows same-origin pages only.
    assert_eq!(
        ws_status(&c.ws_url(&chat, 0), Some("https://shop.example")).await,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_and_limits_through_the_gateway() {
    let c = TestCluster::start(2, &[]).await;
    let chat = c.create_chat("Ann").await;
    let msg = format!("{}/api/v1/chats/{}/messages", c.gateway, chat.id);
    let h = &c.http;
    let a = h
        .post(
            &msg,
            &json!({"text": "x".repeat(64 * 1024 + 1)}),
            Some(&chat.token),
        )
        .await;
    assert_eq!((a.status, a.error_code()), (413, "too_large"));
    let a = h
        .post_raw(&msg, b"{\"text\":".to_vec(), Some(&chat.token))
        .await;
    assert_eq!((a.status, a.error_code()), (400, "bad_request"));
    let a = h
        .post(&msg, &json!({"txt": "typo"}), Some(&chat.token))
        .await;
    assert_eq!(a.status, 400);
    let huge = vec![b'a'; 2 * 1024 * 1024];
    let a = h.post_raw(&msg, huge, Some(&chat.token)).await;
    assert_eq!((a.status, a.error_code()), (413, "too_large"));
    let a = h
        .post(&format!("{}/api/v1/chats", c.gateway), &json!({}), None)
        .await;
    assert_eq!(a.status, 400);
    let a = h
        .post(
            &format!("{}/api/v1/chats/nosuchchat/messages", c.gateway),
            &json!({"text": "x"}),
            Some(&chat.token),
        )
        .await;
    assert_eq!(a.status, 403, "the token is for another chat");
    let emoji = "привет 你好 🎉";
    c.send(&chat, emoji, None).await.ok();
    let t = c.transcript(&chat).await;
    assert_eq!(t["events"][1]["text"], emoji);
    assert_eq!(
        c.transcript(&chat).await["events"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_follows_the_participant_and_the_client_address() {
    // A slow refill, so that the result does not depend on how fast this
    // machine answers: a burst of 5, then one request a second.
    let c = TestCluster::start(
        1,
        &[
            "--set",
            "gateway.rate-limit-per-second=1",
            "--set",
            "gateway.rate-limit-burst=5",
            "--set",
            "gateway.trusted-proxies=127.0.0.1",
        ],
    )
    .await;
    // Chat creation spends the client address's budget; each customer comes
    // through the trusted proxy (127.0.0.1) with an address of their own
    // (127.0.0.1's own budget went on the harness's start-up polling).
    let create = |nickname: &'static str, client: &'static str| {
        let url = format!("{}/api/v1/chats", c.gateway);
        async move {
            let r = confab_e2e::client()
                .build()
                .unwrap()
                .post(url)
                .header("x-forwarded-for", client)
                .json(&serde_json::json!({"nickname": nickname}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            let b: serde_json::Value = r.json().await.unwrap();
            (
                b["chat_id"].as_str().unwrap().to_owned(),
                b["token"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (ann_id, ann_token) = create("Ann", "198.51.100.1").await;
    let (bea_id, bea_token) = create("Bea", "198.51.100.2").await;
    let addr = c.gateway.trim_start_matches("http://").to_owned();
    let path = format!("/api/v1/chats/{ann_id}/transcript");
    let mut statuses = Vec::new();
    for _ in 0..12 {
        // A new connection each time: the budget is the participant's, not
        // the connection's.
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (status, headers, body) = keep_alive_get(&mut conn, &addr, &path, &ann_token).await;
        if status == 429 {
            assert!(headers.contains("\r\nretry-after: "), "{headers}");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["code"], "rate_limited");
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..5], &[200; 5], "the burst passes");
    assert!(
        statuses[5..].contains(&429),
        "no 429 after the burst: {statuses:?}"
    );
    // Another participant has a budget of their own.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let bea_path = format!("/api/v1/chats/{bea_id}/transcript");
    let (status, _, _) = keep_alive_get(&mut conn, &addr, &bea_path, &bea_token).await;
    assert_eq!(status, 200);

    // Without a token, the address pays, on every route (unknown ones too).
    let client = confab_e2e::client().build().unwrap();
    let mut unknown = Vec::new();
    for _ in 0..6 {
        unknown.push(
            client
                .get(format!("{}/no/such/route", c.gateway))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert!(
        unknown.contains(&429),
        "the address's budget ran out: {unknown:?}"
    );
    // A trusted proxy (here: 127.0.0.1) names other clients, each with its
    // own budget.
    let forwarded = client
        .get(format!("{}/no/such/route", c.gateway))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), 404, "another client behind the proxy");
    // Agents (the agent credential) are not held to one address's budget.
    let queue = client
        .get(format!("{}/api/v1/queue", c.gateway))
        .bearer_auth(&c.agent_credential)
        .send()
        .await
        .unwrap();
    assert_eq!(queue.status(), 200);
}

/// One HTTP/1.1 GET on an open connection, leaving it open: status, the
/// header block (lower-cased) and the body.
async fn keep_alive_get(
    conn: &mut tokio::net::TcpStream,
    host: &str,
    path: &str,
    token: &str,
) -> (u16, String, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(conn, &mut buf).await;
    };
    let headers = String::from_utf8_lossy(&buf[..header_end]).to_lowercase();
    let status: u16 = headers[9..12].parse().unwrap();
    let length: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    while buf.len() < header_end + length {
        read_more(conn, &mut buf).await;
    }
    (
        status,
        headers,
        buf[header_end..header_end + length].to_vec(),
    )
}

/// Append what the connection has to `buf`; it must not be closed.
async fn read_more(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let n = conn.read(&mut chunk).await.unwrap();
    assert!(n > 0, "the gateway closed the connection");
    buf.extend_from_slice(&chunk[..n]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openapi_document_and_pages_are_served() {
    let c = TestCluster::start(1, &[]).await;
    let doc = c
        .http
        .get(&format!("{}/api/v1/openapi.json", c.gateway), None)
        .await
        .ok();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/chats",
        "/api/v1/chats/{chat_id}/messages",
        "/api/v1/chats/{chat_id}/transcript",
        "/api/v1/chats/{chat_id}/ws",
        "/api/v1/chats/{chat_id}/join",
        "/api/v1/chats/{chat_id}/leave",
        "/api/v1/queue",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "missing {path} in the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    for page in ["/", "/agent"] {
        let text = c.http.text(&format!("{}{page}", c.gateway)).await;
        assert!(text.contains("<html") && text.contains("confab"), "{page}");
        assert!(
            text.contains("/assets/chat-common.js"),
            "{page} loads the shared script"
        );
    }
    let js = c
        .http
        .text(&format!("{}/assets/chat-common.js", c.gateway))
        .await;
    assert!(
        js.contains("ConfabChat"),
        "the shared chat script is served"
    );
}

/// The agents' queue names each waiting chat's customer: the nickname is
/// stored with the chat's header, so the listing carries it (every
/// instance's chats, whichever instance answers). A chat an agent joined
/// leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_shows_each_waiting_chats_nickname() {
    let c = TestCluster::start(2, &[]).await;
    let ann = c.create_chat("Ann").await;
    // Trimmed as in the transcript; markup is data, passed on verbatim.
    let bob = c.create_chat("  <b>Bob</b> & Ко 🙂 ").await;
    let queue_url = format!("{}/api/v1/queue", c.gateway);
    let queue = c.http.get(&queue_url, Some(&c.agent_credential)).await.ok();
    let nickname_of = |queue: &serde_json::Value, chat: &str| {
        queue["chats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["chat_id"] == chat)
            .map(|q| q["nickname"].clone())
    };
    assert_eq!(nickname_of(&queue, &ann.id), Some(json!("Ann")), "{queue}");
    assert_eq!(
        nickname_of(&queue, &bob.id),
        Some(json!("<b>Bob</b> & Ко 🙂")),
        "{queue}"
    );
    let first = c.transcript(&bob).await["events"][0]["nickname"].clone();
    assert_eq!(first, json!("<b>Bob</b> & Ко 🙂"), "as in the transcript");

    // Each instance's listing carries it, for its own chats and the other's.
    for id in [&ann.instance_id, &bob.instance_id] {
        let listing = c
            .http
            .get(
                &format!(
                    "{}/internal/v1/sessions?state=waiting",
                    c.instance_url(id).await
                ),
                None,
            )
            .await
            .ok();
        let record = listing["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["session_id"] == ann.id.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{id} does not list {}: {listing}", ann.id));
        assert_eq!(record["nickname"], "Ann", "{record}");
    }

    c.join(&ann, "Agent Carl").await;
    let queue = c.http.get(&queue_url, Some(&c.agent_credential)).await.ok();
    assert_eq!(nickname_of(&queue, &ann.id), None, "joined: {queue}");
    assert_eq!(
        nickname_of(&queue, &bob.id),
        Some(json!("<b>Bob</b> & Ко 🙂"))
    );
}

#[tokio::test]
async fn the_queue_is_read_from_either_end() {
    let c = TestCluster::start(2, &[]).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(c.create_chat(&format!("Customer {i}")).await.id);
        // Creation times are in milliseconds: keep them apart.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let queue = |q: &str| format!("{}/api/v1/queue{q}", c.gateway);
    let ids_of = |v: Value| -> Vec<String> {
        v["chats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["chat_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let cred = Some(c.agent_credential.as_str());
    let all = ids_of(c.http.get(&queue(""), cred).await.ok());
    assert_eq!(all, ids, "oldest first by default");
    let newest = ids_of(c.http.get(&queue("?order=newest&limit=2"), cred).await.ok());
    assert_eq!(newest, [ids[3].clone(), ids[2].clone()]);
    let oldest = ids_of(c.http.get(&queue("?order=oldest&limit=1"), cred).await.ok());
    assert_eq!(oldest, [ids[0].clone()]);
    for bad in ["?order=random", "?limit=0", "?limit=1001", "?limit=x"] {
        let a = c.http.get(&queue(bad), cred).await;
        assert_eq!((a.status, a.error_code()), (400, "bad_request"), "{bad}");
    }
}

/// A closed chat's final transcript is read back through the gateway from
/// the contact store: with the customer's token, as an agent who left
/// early (up to their leaving), and with the agents' credential (the
/// contact history, whole). The credential reads closed chats only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_chats_transcript_is_read_back_with_its_tokens_or_the_agents_credential() {
    let c = TestCluster::start(2, &[]).await;
    let chat = c.create_chat("Ann").await;
    let early = c.join(&chat, "Agent Eve").await;
    let stays = c.join(&chat, "Agent Carl").await;
    c.send(&chat, "hello", None).await.ok();
    let url = format!("{}/api/v1/chats/{}/transcript", c.gateway, chat.id);
    c.leave(&early).await.ok();
    c.send(&stays, "after Eve left", None).await.ok();

    // The open chat: the credential does not read it.
    let open = c.http.get(&url, Some(&c.agent_credential)).await;
    assert_eq!(open.status, 404, "{}", open.body);
    assert!(
        open.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("closed chats"),
        "{}",
        open.body
    );

    c.leave(&chat).await.ok();
    let read = |bearer: String| {
        let (c, url) = (&c, url.clone());
        async move { c.closed_transcript(&url, &bearer).await.ok() }
    };
    let customer = read(chat.token.clone()).await;
    assert_eq!(customer["state"], "closed", "{customer}");
    let texts = confab_e2e::texts(customer["events"].as_array().unwrap());
    assert_eq!(texts, ["hello", "after Eve left"], "{customer}");
    assert_eq!(
        customer["events"].as_array().unwrap().last().unwrap()["kind"],
        "closed"
    );

    let agent = read(c.agent_credential.clone()).await;
    assert_eq!(
        agent["events"], customer["events"],
        "the credential reads it whole"
    );

    let eve = read(early.token.clone()).await;
    let left_at = eve["left_at"].as_u64().expect("left_at");
    assert!(
        eve["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["seq"].as_u64() <= Some(left_at)),
        "{eve}"
    );
    assert_eq!(
        confab_e2e::texts(eve["events"].as_array().unwrap()),
        ["hello"]
    );

    let wrong = c.http.get(&url, Some("not-a-credential")).await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let unknown = c
        .http
        .get(
            &format!("{}/api/v1/chats/no-such-chat/transcript", c.gateway),
            Some(&c.agent_credential),
        )
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}

/// `gateway.agents-read-closed-chats = false`: the agents' credential no
/// longer reads closed chats (401, as any wrong bearer), while the chat's
/// own token still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_reading_closed_chats_can_be_turned_off() {
    let c = TestCluster::start(1, &["--set", "gateway.agents-read-closed-chats=false"]).await;
    let chat = c.create_chat("Ann").await;
    c.send(&chat, "hello", None).await.ok();
    c.leave(&chat).await.ok();
    let url = format!("{}/api/v1/chats/{}/transcript", c.gateway, chat.id);
    let own = c.closed_transcript(&url, &chat.token).await;
    assert_eq!(own.ok()["state"], "closed");
    let agent = c.http.get(&url, Some(&c.agent_credential)).await;
    assert_eq!(agent.status, 401, "{}", agent.body);
}
