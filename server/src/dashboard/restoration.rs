//! The restoration test on a button: the reference's "Run a Test", done
//! through the gateway as customers and an agent would, with a real kill -9.
//!
//! 1. start N chats as customers;
//! 2. an agent joins each;
//! 3. a message each way;
//! 4. kill -9 the instance carrying the most of them (through the `confab
//!    up` supervisor, or the instance's opt-in `/admin/kill`);
//! 5. send again in every chat until it goes on on another instance,
//!    timing each from the kill;
//! 6. the agent answers;
//! 7. read every transcript whole: each acknowledged message exactly once,
//!    at the sequence number it was acknowledged with, and the
//!    disconnected/reconnected notices in every moved chat;
//! 8. restart the killed instance (supervisor only);
//! 9. close the test chats.
//!
//! Each step is shown as it runs; the run ends PASSED or FAILED with the
//! reason, and is kept in the history (a file in `dashboard.state-dir`, so
//! a dashboard restart keeps it).
//!
//! Every message carries a `client_msg_id`, so a send retried after an
//! ambiguous failure can never count twice.

use super::cluster::Cluster;
use confab_dashboard::model::{ResumeTimes, TestRun, TestStep, Verdict};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MAX_CHATS: u32 = 1000;
/// Requests to the gateway at once.
const PARALLEL: usize = 16;
/// A moved chat must go on within this long after the kill.
const RESUME_LIMIT: Duration = Duration::from_secs(60);
const HISTORY_KEPT: usize = 100;

/// The running test and the finished ones.
#[derive(Default)]
pub struct Tests {
    pub running: Option<TestRun>,
    pub history: Vec<TestRun>,
    next_id: u64,
    /// The rolling restart running or last run (crate::dashboard::rolling).
    pub rolling: Option<TestRun>,
    pub rolling_active: bool,
}

impl Tests {
    /// The history kept in `dir`, if any.
    pub fn load(dir: Option<&PathBuf>) -> Tests {
        let history: Vec<TestRun> = dir
            .and_then(|d| std::fs::read_to_string(d.join(HISTORY_FILE)).ok())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Tests {
            next_id: history.iter().map(|r| r.id).max().unwrap_or(0) + 1,
            history,
            ..Default::default()
        }
    }
}

const HISTORY_FILE: &str = "restoration-tests.json";

/// One chat of the test: the customer's and the agent's tokens, and what
/// was acknowledged in it (text → seq).
struct TestChat {
    id: String,
    instance: String,
    customer: String,
    agent: Option<String>,
    acked: Vec<(String, u64)>,
}

/// Starts a run in the background; Err when one runs already or it cannot.
pub fn start(cluster: &Arc<Cluster>, chats: u32) -> Result<u64, String> {
    if !(1..=MAX_CHATS).contains(&chats) {
        return Err(format!("chats must be 1 to {MAX_CHATS}, got {chats}"));
    }
    if let Some(why) = cluster.test_blocked() {
        return Err(why);
    }
    let id = {
        let mut tests = cluster.tests.lock();
        if tests.running.is_some() {
            return Err("a restoration test is running already".into());
        }
        if tests.rolling_active {
            return Err("a rolling restart is running: wait for it to end".into());
        }
        let id = tests.next_id;
        tests.next_id += 1;
        tests.running = Some(TestRun {
            id,
            started_ms: crate::session::now_ms() as u64,
            chats,
            ..Default::default()
        });
        id
    };
    cluster.poke.notify_one();
    let run = Run::new(cluster.clone(), cluster.client.clone());
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let verdict = match run {
            Ok(run) => run.go(chats).await,
            Err(reason) => Verdict {
                passed: false,
                reason,
            },
        };
        finish(&cluster, verdict);
    });
    Ok(id)
}

fn finish(cluster: &Cluster, verdict: Verdict) {
    let history = {
        let mut tests = cluster.tests.lock();
        let Some(mut run) = tests.running.take() else {
            return;
        };
        tracing::info!(
            test = run.id,
            passed = verdict.passed,
            reason = %verdict.reason,
            "restoration test finished"
        );
        run.verdict = Some(verdict);
        tests.history.insert(0, run);
        tests.history.truncate(HISTORY_KEPT);
        tests.history.clone()
    };
    if let Some(dir) = &cluster.state_dir {
        let saved = crate::supervisor::data_dir::private_dir(dir).and_then(|()| {
            crate::supervisor::data_dir::write_private(
                &dir.join(HISTORY_FILE),
                &serde_json::to_string_pretty(&history).unwrap_or_default(),
            )
        });
        if let Err(e) = saved {
            tracing::warn!(dir = %dir.display(), error = %e, "could not keep the restoration test history");
        }
    }
    cluster.poke.notify_one();
}

struct Run {
    cluster: Arc<Cluster>,
    client: reqwest::Client,
    gateway: String,
    agent_credential: String,
    chats: Vec<TestChat>,
}

/// A step's value and the detail shown beside it, or why it failed.
pub type Step<T> = Result<(T, String), String>;

/// Shows a run's progress: each step as it starts and ends.
pub struct Recorder {
    cluster: Arc<Cluster>,
    slot: fn(&mut Tests) -> &mut Option<TestRun>,
}

impl Recorder {
    /// Shows progress in the running restoration test.
    pub fn test(cluster: Arc<Cluster>) -> Self {
        Recorder {
            cluster,
            slot: |t| &mut t.running,
        }
    }

    /// Shows progress in the rolling restart.
    pub fn rolling(cluster: Arc<Cluster>) -> Self {
        Recorder {
            cluster,
            slot: |t| &mut t.rolling,
        }
    }

    /// Run `f` as a shown step, timed.
    pub async fn step<T, F>(&self, name: String, f: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Step<T>>,
    {
        let index = self.update(|run| {
            run.steps.push(TestStep {
                name: name.clone(),
                ..Default::default()
            });
            run.steps.len() - 1
        });
        let started = Instant::now();
        let result = f.await;
        let ms = started.elapsed().as_millis() as u64;
        self.update(|run| {
            if let Some(step) = run.steps.get_mut(index) {
                step.ms = Some(ms);
                step.ok = Some(result.is_ok());
                step.detail = match &result {
                    Ok((_, d)) | Err(d) => d.clone(),
                };
            }
        });
        result.map(|(t, _)| t).map_err(|e| format!("{name}: {e}"))
    }

    pub fn update<T>(&self, f: impl FnOnce(&mut TestRun) -> T) -> T {
        let t = {
            let mut tests = self.cluster.tests.lock();
            let run = (self.slot)(&mut tests).get_or_insert_with(TestRun::default);
            f(run)
        };
        self.cluster.poke.notify_one();
        t
    }
}

impl Run {
    async fn go(mut self, n: u32) -> Verdict {
        let result = self.steps(n).await;
        if result.is_err() {
            // Whatever happened, the test's chats end.
            self.close_chats().await;
        }
        match result {
            Ok(reason) => Verdict {
                passed: true,
                reason,
            },
            Err(reason) => Verdict {
                passed: false,
                reason,
            },
        }
    }

    async fn steps(&mut self, n: u32) -> Result<String, String> {
        let rec = Recorder::test(self.cluster.clone());
        let plural = if n == 1 { "chat" } else { "chats" };
        self.chats = rec
            .step(format!("Start {n} {plural} as a customer"), self.create(n))
            .await?;
        rec.step("An agent joins".into(), self.join()).await?;
        rec.step("A message each way".into(), self.converse("1"))
            .await?;
        let victim = self.victim();
        let killed_at = rec
            .step(format!("kill -9 {victim}"), self.kill(&victim))
            .await?;
        rec.update(|run| run.instance_killed = Some(victim.clone()));
        let resume = rec
            .step(
                "Chats go on on another instance".into(),
                self.resume(&victim, killed_at),
            )
            .await?;
        rec.update(|run| run.resume = Some(resume.clone()));
        rec.step("The agent answers".into(), self.agent_says("2"))
            .await?;
        rec.step(
            "Every transcript whole".into(),
            self.check_transcripts(&victim),
        )
        .await?;
        rec.step(format!("Restart {victim}"), self.restart(&victim))
            .await?;
        self.close_chats().await;
        Ok(format!(
            "every acknowledged message exactly once; {} chat(s) moved off {victim}, resumed in p50 {} ms, p99 {} ms, max {} ms",
            resume.moved, resume.p50_ms, resume.p99_ms, resume.max_ms
        ))
    }

    /// The instance carrying the most test chats.
    fn victim(&self) -> String {
        let mut per: HashMap<&str, usize> = HashMap::new();
        for chat in &self.chats {
            *per.entry(&chat.instance).or_default() += 1;
        }
        let first = self.chats.first().map(|c| c.instance.as_str());
        per.into_iter()
            .max_by_key(|&(id, n)| (n, Some(id) == first))
            .map(|(id, _)| id.to_owned())
            .unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/chats{path}", self.gateway)
    }

    async fn create(&self, n: u32) -> Step<Vec<TestChat>> {
        let chats: Vec<Result<TestChat, String>> = bounded(
            (0..n)
                .map(|i| async move {
                let body = json!({"nickname": "restoration test", "subject": format!("test chat {i}")});
                let a = post(&self.client, &self.url(""), None, &body).await?;
                let field = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
                Ok(TestChat {
                    id: field("chat_id"),
                    instance: field("instance_id"),
                    customer: field("token"),
                    agent: None,
                    acked: Vec::new(),
                })
            })
                .collect(),
            PARALLEL,
        )
        .await;
        let chats: Vec<TestChat> = chats.into_iter().collect::<Result<_, _>>()?;
        let mut per: HashMap<&str, u32> = HashMap::new();
        for chat in &chats {
            *per.entry(&chat.instance).or_default() += 1;
        }
        let mut spread: Vec<String> = per.iter().map(|(i, k)| format!("{i}: {k}")).collect();
        spread.sort();
        let detail = format!("on {}", spread.join(", "));
        Ok((chats, detail))
    }

    async fn join(&mut self) -> Step<()> {
        let this = &*self;
        let tokens: Vec<Result<String, String>> = bounded(
            this.chats
                .iter()
                .map(|chat| async move {
                    let a = post(
                        &this.client,
                        &this.url(&format!("/{}/join", chat.id)),
                        Some(&this.agent_credential),
                        &json!({"nickname": "test agent"}),
                    )
                    .await?;
                    Ok(a["token"].as_str().unwrap_or_default().to_owned())
                })
                .collect(),
            PARALLEL,
        )
        .await;
        for (chat, token) in self.chats.iter_mut().zip(tokens) {
            chat.agent = Some(token?);
        }
        Ok(((), format!("{} chat(s) active", self.chats.len())))
    }

    /// The customer and then the agent send message `n` in every chat.
    async fn converse(&mut self, n: &str) -> Step<()> {
        self.say(true, n).await?;
        self.say(false, n).await?;
        Ok((
            (),
            format!("{} message(s) acknowledged", self.chats.len() * 2),
        ))
    }

    async fn agent_says(&mut self, n: &str) -> Step<()> {
        self.say(false, n).await?;
        Ok(((), format!("{} message(s) acknowledged", self.chats.len())))
    }

    async fn say(&mut self, customer: bool, n: &str) -> Result<(), String> {
        let this = &*self;
        let who = if customer { "customer" } else { "agent" };
        let text = format!("{who} message {n}");
        let seqs: Vec<Result<u64, String>> = bounded(
            this.chats
                .iter()
                .map(|chat| {
                    let text = text.clone();
                    async move {
                        let token = if customer {
                            Some(chat.customer.as_str())
                        } else {
                            chat.agent.as_deref()
                        };
                        send(
                            &this.client,
                            &this.url(&format!("/{}/messages", chat.id)),
                            token,
                            &text,
                        )
                        .await
                    }
                })
                .collect(),
            PARALLEL,
        )
        .await;
        for (chat, seq) in self.chats.iter_mut().zip(seqs) {
            chat.acked.push((text.clone(), seq?));
        }
        Ok(())
    }

    async fn kill(&self, victim: &str) -> Step<Instant> {
        self.cluster.kill(victim).await?;
        Ok((Instant::now(), "SIGKILL".into()))
    }

    /// Every chat sends until it is served again; the moved ones are timed
    /// from the kill.
    async fn resume(&mut self, victim: &str, killed_at: Instant) -> Step<ResumeTimes> {
        let this = &*self;
        let text = "customer message 2".to_owned();
        let results: Vec<Result<(u64, Duration), String>> = bounded(
            this.chats
                .iter()
                .map(|chat| {
                    let text = text.clone();
                    async move {
                        let url = this.url(&format!("/{}/messages", chat.id));
                        let deadline = killed_at + RESUME_LIMIT;
                        loop {
                            match send(&this.client, &url, Some(&chat.customer), &text).await {
                                Ok(seq) => return Ok((seq, killed_at.elapsed())),
                                Err(e) if Instant::now() > deadline => {
                                    return Err(format!(
                                        "chat {} did not go on within {}s: {e}",
                                        chat.id,
                                        RESUME_LIMIT.as_secs()
                                    ))
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            }
                        }
                    }
                })
                .collect(),
            PARALLEL.max(this.chats.len().min(MAX_CHATS as usize)),
        )
        .await;
        let mut moved = Vec::new();
        for (chat, r) in self.chats.iter_mut().zip(results) {
            let (seq, took) = r?;
            chat.acked.push((text.clone(), seq));
            if chat.instance == victim {
                moved.push(took.as_millis() as u64);
            }
        }
        moved.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * moved.len() as f64).ceil() as usize).clamp(1, moved.len().max(1));
            moved.get(rank - 1).copied().unwrap_or(0)
        };
        let times = ResumeTimes {
            moved: moved.len() as u32,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: moved.last().copied().unwrap_or(0),
        };
        let detail = format!(
            "{} moved chat(s) resumed: p50 {} ms, p99 {} ms, max {} ms after the kill",
            times.moved, times.p50_ms, times.p99_ms, times.max_ms
        );
        Ok((times, detail))
    }

    async fn check_transcripts(&self, victim: &str) -> Step<()> {
        let problems: Vec<Result<(), String>> = bounded(
            self.chats
                .iter()
                .map(|chat| async move {
                    let events = transcript(
                        &self.client,
                        &self.url(&format!("/{}/transcript", chat.id)),
                        &chat.customer,
                    )
                    .await?;
                    check_transcript(chat, &events, chat.instance == victim)
                })
                .collect(),
            PARALLEL,
        )
        .await;
        for p in problems {
            p?;
        }
        let messages: usize = self.chats.iter().map(|c| c.acked.len()).sum();
        Ok((
            (),
            format!("{messages} acknowledged message(s), each exactly once; notices present"),
        ))
    }

    async fn restart(&self, victim: &str) -> Step<()> {
        match self.cluster.restart(victim).await? {
            true => Ok(((), "serving again".into())),
            false => Ok((
                (),
                "no supervisor here: restart it the way it is deployed".into(),
            )),
        }
    }

    /// Customers leave: the test chats close (their final transcripts go
    /// to the contact store like any chat's).
    async fn close_chats(&self) {
        let _: Vec<()> = bounded(
            self.chats
                .iter()
                .map(|chat| async move {
                    let _ = post(
                        &self.client,
                        &self.url(&format!("/{}/leave", chat.id)),
                        Some(&chat.customer),
                        &json!({}),
                    )
                    .await;
                })
                .collect(),
            PARALLEL,
        )
        .await;
    }
}

/// Each acknowledged message exactly once at its seq, nothing else from
/// the test twice, and for a moved chat both participants' notices.
fn check_transcript(chat: &TestChat, events: &[Value], moved: bool) -> Result<(), String> {
    let messages: Vec<(&str, u64)> = events
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["text"].as_str().unwrap_or(""),
                e["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for (text, seq) in &chat.acked {
        let found: Vec<u64> = messages
            .iter()
            .filter(|(t, _)| t == text)
            .map(|&(_, s)| s)
            .collect();
        if found != [*seq] {
            return Err(format!(
                "chat {}: {text:?} acknowledged as seq {seq}, found at {found:?}",
                chat.id
            ));
        }
    }
    if messages.len() != chat.acked.len() {
        return Err(format!(
            "chat {}: {} messages in the transcript, {} acknowledged",
            chat.id,
            messages.len(),
            chat.acked.len()
        ));
    }
    if moved {
        let count = |kind: &str, reason: &str| {
            events
                .iter()
                .filter(|e| e["kind"] == kind && e["reason"] == reason)
                .count()
        };
        let (gone, back) = (
            count("left", "disconnected"),
            count("joined", "reconnected"),
        );
        if gone < 2 || back < 2 {
            return Err(format!(
                "chat {}: {gone} disconnected and {back} reconnected notices, expected 2 each",
                chat.id
            ));
        }
    }
    Ok(())
}

/// POST JSON; the answer's body, or a short reason. Waits out 429s.
async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut req = client.post(url).json(body).timeout(Duration::from_secs(10));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let answer = req.send().await.map_err(|e| e.to_string())?;
        let status = answer.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS && Instant::now() < deadline {
            let wait = answer
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait.clamp(1, 5))).await;
            continue;
        }
        let body: Value = answer.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let why = body["error"]["message"].as_str().unwrap_or("");
            return Err(format!("{status} {why}"));
        }
        return Ok(body);
    }
}

/// Send `text`, its `client_msg_id` derived from it, so a retry after an
/// ambiguous failure is the same message.
async fn send(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    text: &str,
) -> Result<u64, String> {
    let id = text.replace(' ', "-");
    let a = post(
        client,
        url,
        token,
        &json!({"text": text, "client_msg_id": id}),
    )
    .await?;
    a["seq"]
        .as_u64()
        .ok_or_else(|| "no seq in the answer".into())
}

async fn transcript(
    client: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<Vec<Value>, String> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let answer = client
            .get(format!("{url}?after={after}"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status().is_success() {
            return Err(format!("transcript: {}", answer.status()));
        }
        let page: Value = answer.json().await.map_err(|e| e.to_string())?;
        let batch = page["events"].as_array().cloned().unwrap_or_default();
        after = batch
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(after);
        let more = page["more"].as_bool().unwrap_or(false) && !batch.is_empty();
        events.extend(batch);
        if !more {
            return Ok(events);
        }
    }
}

impl Run {
    pub fn new(cluster: Arc<Cluster>, client: reqwest::Client) -> Result<Run, String> {
        Ok(Run {
            gateway: cluster
                .gateways
                .first()
                .cloned()
                .ok_or("no gateway configured")?,
            agent_credential: cluster
                .agent_credential
                .clone()
                .ok_or("no agent credential configured")?,
            cluster,
            client,
            chats: Vec::new(),
        })
    }
}

/// Run `futures`, at most `parallel` at once, their outputs in order.
async fn bounded<F: Future>(futures: Vec<F>, parallel: usize) -> Vec<F::Output> {
    stream::iter(futures).buffered(parallel).collect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(acked: &[(&str, u64)]) -> TestChat {
        TestChat {
            id: "c".into(),
            instance: "inst-1".into(),
            customer: "t".into(),
            agent: None,
            acked: acked.iter().map(|&(t, s)| (t.to_owned(), s)).collect(),
        }
    }

    fn message(seq: u64, text: &str) -> Value {
        json!({"seq": seq, "kind": "message", "text": text})
    }

    fn notices() -> Vec<Value> {
        vec![
            json!({"kind": "left", "reason": "disconnected"}),
            json!({"kind": "left", "reason": "disconnected"}),
            json!({"kind": "joined", "reason": "reconnected"}),
            json!({"kind": "joined", "reason": "reconnected"}),
        ]
    }

    #[test]
    fn a_whole_transcript_passes() {
        let c = chat(&[("a", 2), ("b", 3)]);
        let mut events = vec![message(2, "a"), message(3, "b")];
        assert!(check_transcript(&c, &events, false).is_ok());
        events.extend(notices());
        assert!(check_transcript(&c, &events, true).is_ok());
    }

    #[test]
    fn a_lost_duplicated_or_moved_message_fails() {
        let c = chat(&[("a", 2), ("b", 3)]);
        let lost = check_transcript(&c, &[message(2, "a")], false);
        assert!(lost
            .unwrap_err()
            .contains("\"b\" acknowledged as seq 3, found at []"));
        let twice = [message(2, "a"), message(3, "b"), message(4, "b")];
        assert!(check_transcript(&c, &twice, false).is_err());
        let elsewhere = [message(2, "a"), message(4, "b")];
        assert!(check_transcript(&c, &elsewhere, false).is_err());
        let extra = [message(2, "a"), message(3, "b"), message(4, "z")];
        assert!(check_transcript(&c, &extra, false)
            .unwrap_err()
            .contains("3 messages"));
    }

    #[test]
    fn a_moved_chat_needs_its_notices() {
        let c = chat(&[("a", 2)]);
        let mut events = vec![message(2, "a")];
        events.extend(notices().into_iter().take(3));
        let err = check_transcript(&c, &events, true).unwrap_err();
        assert!(err.contains("1 reconnected"), "{err}");
    }

    /// A fake cluster on one port: two instances (`/inst-1`, `/inst-2`),
    /// a gateway (`/api/v1`) and a supervisor (`/instances`). Chats on a
    /// killed instance refuse one message (as a gateway mid-failover
    /// would), then go on with the disconnected/reconnected notices.
    /// `lose` drops one acknowledged message from the transcript.
    mod fake {
        use axum::extract::{Path, Query, State};
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, post};
        use axum::{Json, Router};
        use parking_lot::Mutex;
        use serde_json::{json, Value};
        use std::collections::HashMap;
        use std::sync::Arc;

        #[derive(Default)]
        pub struct Fake {
            pub lose: bool,
            pub chats: Mutex<HashMap<String, Chat>>,
            pub killed: Mutex<Option<String>>,
            pub started: Mutex<Vec<String>>,
        }

        pub struct Chat {
            instance: String,
            events: Vec<Value>,
            ids: HashMap<String, u64>,
            moved: bool,
        }

        type S = State<Arc<Fake>>;

        fn push(chat: &mut Chat, mut e: Value) -> u64 {
            let seq = chat.events.len() as u64 + 1;
            e["seq"] = json!(seq);
            chat.events.push(e);
            seq
        }

        async fn status(Path(inst): Path<String>) -> Json<Value> {
            Json(json!({
                "instance_id": inst, "enabled": true, "sessions_active": 0,
                "store": {"backend": "sqlite", "available": true},
                "version": "0", "pid": 1,
            }))
        }

        async fn create(State(f): S) -> (StatusCode, Json<Value>) {
            let mut chats = f.chats.lock();
            let id = format!("c{}", chats.len());
            let instance = if chats.len() % 2 == 0 {
                "inst-1"
            } else {
                "inst-2"
            };
            let mut chat = Chat {
                instance: instance.into(),
                events: vec![],
                ids: HashMap::new(),
                moved: false,
            };
            push(&mut chat, json!({"kind": "joined"}));
            chats.insert(id.clone(), chat);
            (
                StatusCode::CREATED,
                Json(json!({"chat_id": id, "token": id, "instance_id": instance})),
            )
        }

        async fn join(State(f): S, Path(id): Path<String>) -> Json<Value> {
            if let Some(chat) = f.chats.lock().get_mut(&id) {
                push(chat, json!({"kind": "joined"}));
            }
            Json(json!({"token": format!("agent-{id}")}))
        }

        async fn send(
            State(f): S,
            Path(id): Path<String>,
            Json(body): Json<Value>,
        ) -> (StatusCode, Json<Value>) {
            let killed = f.killed.lock().clone();
            let mut chats = f.chats.lock();
            let Some(chat) = chats.get_mut(&id) else {
                return (StatusCode::NOT_FOUND, Json(json!({})));
            };
            if Some(&chat.instance) == killed.as_ref() && !chat.moved {
                chat.moved = true;
                for (kind, reason) in [
                    ("left", "disconnected"),
                    ("left", "disconnected"),
                    ("joined", "reconnected"),
                    ("joined", "reconnected"),
                ] {
                    push(chat, json!({"kind": kind, "reason": reason}));
                }
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": {"message": "moving"}})),
                );
            }
            let key = body["client_msg_id"].as_str().unwrap_or("").to_owned();
            if let Some(&seq) = chat.ids.get(&key) {
                return (StatusCode::OK, Json(json!({"seq": seq})));
            }
            let text = body["text"].clone();
            let seq = if f.lose && text == "customer message 2" {
                chat.events.len() as u64 + 1000
            } else {
                push(chat, json!({"kind": "message", "text": text}))
            };
            chat.ids.insert(key, seq);
            (StatusCode::OK, Json(json!({"seq": seq})))
        }

        async fn transcript(
            State(f): S,
            Path(id): Path<String>,
            Query(q): Query<HashMap<String, u64>>,
        ) -> Json<Value> {
            let after = q.get("after").copied().unwrap_or(0);
            let events: Vec<Value> = f
                .chats
                .lock()
                .get(&id)
                .map(|c| {
                    c.events
                        .iter()
                        .filter(|e| e["seq"].as_u64() > Some(after))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            Json(json!({"events": events, "more": false}))
        }

        async fn supervise(
            State(f): S,
            Path((id, action)): Path<(String, String)>,
            _: HeaderMap,
        ) -> Json<Value> {
            match action.as_str() {
                "kill" => *f.killed.lock() = Some(id),
                "start" => f.started.lock().push(id),
                _ => {}
            }
            Json(json!({}))
        }

        pub async fn serve(fake: Arc<Fake>) -> String {
            let app = Router::new()
                .route("/{inst}/status", get(status))
                .route("/{inst}/kpi", get(|| async { Json(json!({"session_created": 0, "session_closed": 0, "session_restored": 0, "message_submitted": 0, "transcript_saved": 0, "transcript_save_failed": 0, "sessions_active": 0})) }))
                .route("/{inst}/metrics", get(|| async { "" }))
                .route("/{inst}/admin/events", get(|| async { Json(json!({"events": [], "next": 0})) }))
                .route("/api/v1/chats", post(create))
                .route("/api/v1/chats/{id}/join", post(join))
                .route("/api/v1/chats/{id}/messages", post(send))
                .route("/api/v1/chats/{id}/transcript", get(transcript))
                .route("/api/v1/chats/{id}/leave", post(|| async { Json(json!({})) }))
                .route("/instances/{id}/{action}", post(supervise))
                .with_state(fake);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        }
    }

    async fn run_against(fake: Arc<fake::Fake>, chats: u32) -> TestRun {
        let url = fake::serve(fake).await;
        let cluster = Cluster::new(
            crate::tls::reqwest_builder().build().unwrap(),
            super::super::cluster::Settings {
                instances: vec![format!("{url}/inst-1"), format!("{url}/inst-2")],
                gateways: vec![url.clone()],
                supervisor: Some(url),
                admin_token: "admin".into(),
                agent_credential: Some("agent".into()),
                state_dir: None,
                cluster_secret: None,
                timeout: Duration::from_secs(2),
            },
        );
        cluster.poll().await;
        assert_eq!(cluster.test_blocked(), None);
        start(&cluster, chats).expect("the test starts");
        assert!(start(&cluster, 1).is_err(), "one test at a time");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(run) = cluster.tests.lock().history.first() {
                return run.clone();
            }
            assert!(Instant::now() < deadline, "the test never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_runner_passes_a_cluster_that_keeps_every_message() {
        let fake = Arc::new(fake::Fake::default());
        let run = run_against(fake.clone(), 4).await;
        let verdict = run.verdict.clone().unwrap();
        assert!(verdict.passed, "{verdict:?}\n{run:#?}");
        assert_eq!(
            run.instance_killed.as_deref(),
            Some("inst-1"),
            "the first chat's, on a tie"
        );
        let resume = run.resume.clone().unwrap();
        assert_eq!(resume.moved, 2, "chats c0 and c2 were on inst-1");
        assert!(run
            .steps
            .iter()
            .all(|s| s.ok == Some(true) && s.ms.is_some()));
        assert_eq!(run.steps.len(), 8, "{:#?}", run.steps);
        assert_eq!(*fake.started.lock(), vec!["inst-1".to_owned()], "restarted");
    }

    #[tokio::test]
    async fn the_runner_fails_a_cluster_that_loses_an_acknowledged_message() {
        let fake = Arc::new(fake::Fake {
            lose: true,
            ..Default::default()
        });
        let run = run_against(fake, 2).await;
        let verdict = run.verdict.clone().unwrap();
        assert!(!verdict.passed);
        assert!(
            verdict.reason.starts_with("Every transcript whole:")
                && verdict.reason.contains("\"customer message 2\""),
            "{}",
            verdict.reason
        );
        let failed = run.steps.iter().find(|s| s.ok == Some(false)).unwrap();
        assert_eq!(failed.name, "Every transcript whole");
    }

    #[test]
    fn the_history_is_read_back_and_numbering_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let runs = vec![TestRun {
            id: 7,
            chats: 3,
            verdict: Some(Verdict {
                passed: true,
                reason: "ok".into(),
            }),
            ..Default::default()
        }];
        std::fs::write(
            dir.path().join(HISTORY_FILE),
            serde_json::to_string(&runs).unwrap(),
        )
        .unwrap();
        let tests = Tests::load(Some(&dir.path().to_path_buf()));
        assert_eq!(tests.history, runs);
        assert_eq!(tests.next_id, 8);
        assert!(Tests::load(None).history.is_empty());
    }
}
