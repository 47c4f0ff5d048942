//! `confab up` as a test fixture: the real supervisor, real instance
//! processes, the real gateway, on free loopback ports.

use crate::{confab_bin, free_port, test_log, Answer, Http};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub gateway: String,
    pub dashboard: String,
    pub supervisor: String,
    pub admin_token: String,
    pub agent_credential: String,
    pub token_secret_file: PathBuf,
    pub http: Http,
    child: Child,
}

impl TestCluster {
    pub async fn start(instances: u16, extra: &[&str]) -> TestCluster {
        Self::start_with(instances, extra, Http::default()).await
    }

    /// [`TestCluster::start`] with a client of one's own (one that trusts
    /// a test CA, say).
    // The child is reaped in Drop.
    #[allow(clippy::zombie_processes)]
    pub async fn start_with(instances: u16, extra: &[&str], http: Http) -> TestCluster {
        let dir = crate::data_dir();
        let ports = UpPorts::free(instances);
        let sup = ports.supervisor;
        let mut cmd = ports.command(dir.path());
        cmd.args(extra)
            .args([
                "--set",
                &format!("cluster.secret={}", crate::CLUSTER_SECRET),
            ])
            .stdin(Stdio::null());
        // Test clients share a few keep-alive connections among many chats;
        // only the rate-limit test keeps the per-connection default.
        if !extra.iter().any(|a| a.contains("rate-limit")) {
            cmd.args([
                "--set",
                "gateway.rate-limit-per-second=100000",
                "--set",
                "gateway.rate-limit-burst=100000",
            ]);
        }
        if !test_log() {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.spawn().expect("starting confab up");
        let cluster_json = dir.path().join("cluster.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&cluster_json) {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let token = v["admin_token"].as_str().unwrap_or("").to_owned();
                let supervisor = v["supervisor"].as_str().unwrap_or("").to_owned();
                assert!(
                    supervisor.ends_with(&format!("127.0.0.1:{sup}")),
                    "{supervisor}"
                );
                if let Ok(a) = http
                    .try_get(&format!("{supervisor}/cluster"), Some(&token))
                    .await
                {
                    if a.status == 200 {
                        let mut c = TestCluster {
                            gateway: v["gateway"].as_str().unwrap().to_owned(),
                            dashboard: v["dashboard"].as_str().unwrap().to_owned(),
                            supervisor,
                            admin_token: token,
                            agent_credential: v["agent_credential"].as_str().unwrap().to_owned(),
                            token_secret_file: PathBuf::from(
                                v["token_secret_file"].as_str().unwrap(),
                            ),
                            http,
                            child,
                            dir,
                        };
                        c.wait_gateway_sees(instances as usize).await;
                        return c;
                    }
                }
            }
            assert!(Instant::now() < deadline, "confab up did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub async fn cluster(&self) -> Value {
        self.http
            .get(
                &format!("{}/cluster", self.supervisor),
                Some(&self.admin_token),
            )
            .await
            .ok()
    }

    pub async fn instance_url(&self, id: &str) -> String {
        let c = self.cluster().await;
        c["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .and_then(|i| i["url"].as_str())
            .unwrap_or_else(|| panic!("no instance {id}"))
            .to_owned()
    }

    /// The last lines of every component's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) else {
            return out;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}\n", path.display()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Wait until the gateway reports `n` usable instances.
    pub async fn wait_gateway_sees(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = self
                .http
                .try_get(&format!("{}/status", self.gateway), None)
                .await
            {
                let usable = a.body["instances"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter(|i| i["healthy"] == true && i["enabled"] == true)
                            .count()
                    })
                    .unwrap_or(0);
                if usable >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway never saw {n} usable instances\n{}",
                self.logs_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn act(&self, id: &str, action: &str) -> Value {
        self.http
            .post(
                &format!("{}/instances/{id}/{action}", self.supervisor),
                &json!({}),
                Some(&self.admin_token),
            )
            .await
            .ok()
    }

    pub async fn kill(&self, id: &str) {
        self.act(id, "kill").await;
    }

    pub async fn restart(&self, id: &str) {
        self.act(id, "restart").await;
    }

    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.path().join("logs").join(format!("{component}.log")))
            .unwrap_or_default()
    }

    // The public API.

    pub async fn create_chat(&self, nickname: &str) -> Chat {
        let a = self
            .http
            .post(
                &format!("{}/api/v1/chats", self.gateway),
                &json!({"nickname": nickname}),
                None,
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        Chat {
            id: a.body["chat_id"].as_str().unwrap().to_owned(),
            participant_id: a.body["participant_id"].as_str().unwrap().to_owned(),
            token: a.body["token"].as_str().unwrap().to_owned(),
            instance_id: a.body["instance_id"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn join(&self, chat: &Chat, nickname: &str) -> Chat {
        let a = self
            .http
            .post(
                &format!("{}/api/v1/chats/{}/join", self.gateway, chat.id),
                &json!({"nickname": nickname}),
                Some(&self.agent_credential),
            )
            .await
            .ok();
        Chat {
            id: chat.id.clone(),
            participant_id: a["participant_id"].as_str().unwrap().to_owned(),
            token: a["token"].as_str().unwrap().to_owned(),
            instance_id: a["instance_id"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn send(&self, chat: &Chat, text: &str, client_msg_id: Option<&str>) -> Answer {
        self.send_via(&self.gateway, chat, text, client_msg_id)
            .await
    }

    pub async fn send_via(
        &self,
        gateway: &str,
        chat: &Chat,
        text: &str,
        client_msg_id: Option<&str>,
    ) -> Answer {
        let mut body = json!({"text": text});
        if let Some(c) = client_msg_id {
            body["client_msg_id"] = json!(c);
        }
        self.http
            .post(
                &format!("{gateway}/api/v1/chats/{}/messages", chat.id),
                &body,
                Some(&chat.token),
            )
            .await
    }

    /// `who` leaves their chat (a customer's leaving closes it).
    pub async fn leave(&self, who: &Chat) -> Answer {
        self.http
            .post(
                &format!("{}/api/v1/chats/{}/leave", self.gateway, who.id),
                &json!({}),
                Some(&who.token),
            )
            .await
    }

    /// A closed chat's transcript page at `url`, read with `bearer`: asked
    /// again for up to 5 s while the final save that follows the closing is
    /// under way (409).
    pub async fn closed_transcript(&self, url: &str, bearer: &str) -> Answer {
        let mut answer = self.http.get(url, Some(bearer)).await;
        for _ in 0..100 {
            if answer.status != 409 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer = self.http.get(url, Some(bearer)).await;
        }
        answer
    }

    /// The whole transcript, read page by page.
    pub async fn transcript(&self, chat: &Chat) -> Value {
        self.http
            .all_pages(
                &format!("{}/api/v1/chats/{}/transcript", self.gateway, chat.id),
                Some(&chat.token),
            )
            .await
    }

    pub fn ws_url(&self, chat: &Chat, after: u64) -> String {
        confab::tls::websocket_url(
            &self.gateway,
            &format!(
                "/api/v1/chats/{}/ws?token={}&after={after}",
                chat.id, chat.token
            ),
        )
    }

    pub async fn metric(&self, base_url: &str, name: &str) -> f64 {
        self.http.metric(base_url, name).await
    }

    /// Read a counter until it reaches `at_least` or 10 s pass; its last
    /// value. For counts the server makes after the client has already seen
    /// the outcome (a TLS handshake the client aborted is counted when the
    /// server reads the client's alert).
    pub async fn metric_reaching(&self, base_url: &str, name: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(base_url, name).await;
            if value >= at_least || Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The ports of one `confab up`, free when chosen.
#[derive(Debug, Clone, Copy)]
pub struct UpPorts {
    pub instances: u16,
    pub instance_base: u16,
    pub gateway: u16,
    pub supervisor: u16,
    pub dashboard: u16,
}

impl UpPorts {
    pub fn free(instances: u16) -> UpPorts {
        UpPorts {
            instances,
            instance_base: crate::free_ports(instances),
            gateway: free_port(),
            supervisor: free_port(),
            dashboard: free_port(),
        }
    }

    /// `confab up` on these ports with `dir` as its data directory.
    pub fn command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(confab_bin());
        cmd.arg("up")
            .arg("--instances")
            .arg(self.instances.to_string())
            .arg("--data-dir")
            .arg(dir)
            .arg("--instance-base-port")
            .arg(self.instance_base.to_string())
            .arg("--gateway-port")
            .arg(self.gateway.to_string())
            .arg("--supervisor-port")
            .arg(self.supervisor.to_string())
            .arg("--dashboard-port")
            .arg(self.dashboard.to_string());
        cmd
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // SIGTERM: the supervisor stops its children.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

#[derive(Debug, Clone)]
pub struct Chat {
    pub id: String,
    pub participant_id: String,
    pub token: String,
    pub instance_id: String,
}
