//! The gateway's chat page as a customer meets it, in headless Chromium: a
//! chat goes on past its first token's lifetime, because the page renews
//! the token before it expires (`POST /api/v1/chats/{id}/token`); and the
//! agent page reads the queue from either end.

use confab_e2e::browser::Browser;
use confab_e2e::cluster::TestCluster;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn the_chat_page_renews_its_token_and_the_chat_goes_on() {
    // Tokens last 3 s here (whole seconds: 2 to 3 s).
    let cluster = TestCluster::start(1, &["--set", "gateway.token-ttl=3s"]).await;
    let browser = Browser::start(1024).await;
    browser.goto(&format!("{}/", cluster.gateway)).await;
    let nickname = browser.find("#nickname").await;
    nickname.send_keys("Ann").await.expect("typing a nickname");
    browser.click("#start").await;
    browser
        .wait_text("#chat-id", Duration::from_secs(10), |t| !t.is_empty())
        .await
        .expect("the chat opened");
    // Twice the token's lifetime: without renewal the next post gets 401.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = browser.find("#text").await;
    text.send_keys("still here after 6 s")
        .await
        .expect("typing");
    browser.click("#send").await;
    let log = browser
        .wait_text("#log", Duration::from_secs(10), |t| {
            t.contains("still here after 6 s")
        })
        .await;
    let shot = browser.screenshot("chat-page-after-token-renewal").await;
    println!("screenshot: {}", shot.display());
    let status = browser.text("#status").await;
    assert!(
        log.is_ok(),
        "the message did not arrive; status {status:?}, log {log:?}"
    );
    assert!(!status.contains("expired"), "{status}");
    assert!(
        browser.console_errors().await.is_empty(),
        "{:?}",
        browser.console_errors().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_page_shows_the_queue_from_either_end() {
    let cluster = TestCluster::start(1, &[]).await;
    cluster.create_chat("First").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    cluster.create_chat("Second").await;
    let browser = Browser::start(1024).await;
    browser.goto(&format!("{}/agent", cluster.gateway)).await;
    let credential = browser.find("#credential").await;
    credential
        .send_keys(&cluster.agent_credential)
        .await
        .expect("typing the credential");
    let order = |first: &'static str, second: &'static str| {
        move |t: &str| match (t.find(first), t.find(second)) {
            (Some(a), Some(b)) => a < b,
            _ => false,
        }
    };
    let oldest = browser
        .wait_text("#queue", Duration::from_secs(10), order("First", "Second"))
        .await;
    assert!(oldest.is_ok(), "oldest first: {oldest:?}");
    browser.click("#queue-order option[value=newest]").await;
    let newest = browser
        .wait_text("#queue", Duration::from_secs(10), order("Second", "First"))
        .await;
    let shot = browser.screenshot("agent-queue-newest-first").await;
    println!("screenshot: {}", shot.display());
    assert!(newest.is_ok(), "newest first: {newest:?}");
    assert!(
        browser.console_errors().await.is_empty(),
        "{:?}",
        browser.console_errors().await
    );
}
