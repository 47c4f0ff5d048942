//! Where the Cassandra tests run: the CQL test node ([`crate::cql_node`],
//! kassandra over real TCP) or a real cluster.
//!
//! With `CONFAB_TEST_CASSANDRA=host:port` the tests use that real cluster
//! instead. The outage tests (a frozen node, a dead node) then run the
//! commands that freeze, resume, kill and restart it, given in
//! `CONFAB_TEST_CASSANDRA_FREEZE`, `_RESUME`, `_KILL` and `_RESTART` (for a
//! node in Docker: `docker pause cassandra`, `docker unpause cassandra`,
//! `docker kill cassandra`, `docker start cassandra`).

pub use crate::cql_node::{Security, TestNode, TlsIdentity};
use std::path::{Path, PathBuf};

/// Where Cassandra tests run: a real cluster named by
/// `CONFAB_TEST_CASSANDRA=host:port`, else a fresh test node.
pub enum Node {
    Real(String),
    Test(TestNode),
}

impl Node {
    pub async fn get() -> Node {
        match std::env::var("CONFAB_TEST_CASSANDRA") {
            Ok(addr) if !addr.is_empty() => {
                println!(
                    "Cassandra tests against the real cluster at {addr} (CONFAB_TEST_CASSANDRA)"
                );
                Node::Real(addr)
            }
            _ => {
                let node = TestNode::start().await;
                println!("Cassandra tests against the kassandra test node at {} (set CONFAB_TEST_CASSANDRA=host:port for a real cluster)", node.addr);
                Node::Test(node)
            }
        }
    }

    pub fn contact_point(&self) -> String {
        match self {
            Node::Real(a) => a.clone(),
            Node::Test(n) => n.contact_point(),
        }
    }

    pub fn test_node(&self) -> Option<&TestNode> {
        match self {
            Node::Test(n) => Some(n),
            Node::Real(_) => None,
        }
    }

    /// How to take this node down and bring it back; None for a real
    /// cluster without the `CONFAB_TEST_CASSANDRA_*` outage commands (the
    /// caller says the test was not run, and why).
    pub fn outages(&self) -> Option<Outages<'_>> {
        match self {
            Node::Test(n) => Some(Outages::Test(n)),
            Node::Real(_) => {
                let var = |n: &str| {
                    std::env::var(format!("CONFAB_TEST_CASSANDRA_{n}"))
                        .ok()
                        .filter(|c| !c.is_empty())
                };
                let commands = OutageCommands {
                    freeze: var("FREEZE")?,
                    resume: var("RESUME")?,
                    kill: var("KILL")?,
                    restart: var("RESTART")?,
                };
                Some(Outages::Real(commands))
            }
        }
    }
}

/// Shell commands that take a real node down and bring it back.
pub struct OutageCommands {
    freeze: String,
    resume: String,
    kill: String,
    restart: String,
}

/// Outages of the node under test: the test node acts on itself, a real
/// node through its [`OutageCommands`].
pub enum Outages<'a> {
    Test(&'a TestNode),
    Real(OutageCommands),
}

/// What to print when a real cluster has no outage commands.
pub const NO_OUTAGE_COMMANDS: &str = "not run against this real cluster: set CONFAB_TEST_CASSANDRA_FREEZE, _RESUME, _KILL and _RESTART to commands that freeze, resume, kill and restart its node (e.g. docker pause/unpause/kill/start)";

impl Outages<'_> {
    /// Connections stay open, nothing answers.
    pub fn freeze(&self) {
        match self {
            Outages::Test(n) => n.freeze(),
            Outages::Real(c) => run(&c.freeze),
        }
    }

    pub fn resume(&self) {
        match self {
            Outages::Test(n) => n.resume(),
            Outages::Real(c) => run(&c.resume),
        }
    }

    /// Connections refused.
    pub fn kill(&self) {
        match self {
            Outages::Test(n) => n.kill(),
            Outages::Real(c) => run(&c.kill),
        }
    }

    /// Back on the same address with its data.
    pub async fn restart(&self) {
        match self {
            Outages::Test(n) => n.restart().await,
            Outages::Real(c) => run(&c.restart),
        }
    }
}

fn run(command: &str) {
    let status = std::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .unwrap_or_else(|e| panic!("could not run `{command}`: {e}"));
    assert!(status.success(), "`{command}` failed: {status}");
}

/// Create a throwaway keyspace with confab's schema; its name.
pub async fn init_keyspace(contact_point: &str) -> String {
    init_keyspace_with(contact_point, &[]).await
}

/// `init_keyspace` with extra `[cassandra]` options (TLS, credentials).
pub async fn init_keyspace_with(contact_point: &str, extra: &[(String, String)]) -> String {
    let keyspace = format!(
        "confab_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let config = cassandra_config_with(contact_point, &keyspace, extra);
    confab::store::cassandra::connect_and_init(&config, false)
        .await
        .expect("connect to the CQL node and create the schema");
    keyspace
}

/// A node that requires client-to-node TLS and a password, with what a
/// client needs to reach it.
pub struct SecuredNode {
    pub node: Node,
    pub ca_file: PathBuf,
    pub username: String,
    pub password: String,
}

impl SecuredNode {
    /// The test node with TLS (a fresh self-signed certificate, written to
    /// `dir` as the CA file) and `PasswordAuthenticator`; or, with
    /// `CONFAB_TEST_CASSANDRA` set, that cluster as described by
    /// `CONFAB_TEST_CASSANDRA_CA_FILE`, `_USERNAME` and `_PASSWORD` (None if
    /// they are not all set: the test says it was skipped).
    pub async fn get(dir: &Path) -> Option<SecuredNode> {
        if let Ok(addr) = std::env::var("CONFAB_TEST_CASSANDRA") {
            if !addr.is_empty() {
                let var = |n: &str| std::env::var(format!("CONFAB_TEST_CASSANDRA_{n}")).ok();
                let (ca, username, password) =
                    (var("CA_FILE")?, var("USERNAME")?, var("PASSWORD")?);
                println!("TLS and authentication against the real cluster at {addr}");
                return Some(SecuredNode {
                    node: Node::Real(addr),
                    ca_file: ca.into(),
                    username,
                    password,
                });
            }
        }
        let tls = TlsIdentity::generate().expect("a self-signed certificate");
        let ca_file = dir.join("cql-ca.pem");
        std::fs::write(&ca_file, &tls.cert_pem).expect("write the CA file");
        let (username, password) = ("confab".to_owned(), "s3cret-pw".to_owned());
        let security = Security {
            tls: Some(tls),
            credentials: Some((username.clone(), password.clone())),
        };
        let node =
            TestNode::start_secured(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), security)
                .await
                .expect("bind the CQL test node");
        println!(
            "TLS and authentication against the kassandra test node at {} (TLS and PasswordAuthenticator added by confab's test node)",
            node.addr
        );
        Some(SecuredNode {
            node: Node::Test(node),
            ca_file,
            username,
            password,
        })
    }

    /// The `[cassandra]` options that reach it; the password goes through
    /// a `password-file` written to `dir`.
    pub fn options(&self, dir: &Path) -> Vec<(String, String)> {
        let password_file = dir.join("cql-password");
        std::fs::write(&password_file, format!("{}\n", self.password)).expect("password file");
        vec![
            (
                "cassandra.tls-ca-file".into(),
                self.ca_file.display().to_string(),
            ),
            ("cassandra.username".into(), self.username.clone()),
            (
                "cassandra.password-file".into(),
                password_file.display().to_string(),
            ),
        ]
    }
}

/// Test set-up for kassandra's known gap: its system.peers is empty, so the
/// driver's automatic schema-agreement wait is off against the test node
/// (a real cluster, CONFAB_TEST_CASSANDRA, keeps it on).
pub fn schema_agreement() -> &'static str {
    match std::env::var("CONFAB_TEST_CASSANDRA") {
        Ok(a) if !a.is_empty() => "true",
        _ => "false",
    }
}

pub fn cassandra_config(contact_point: &str, keyspace: &str) -> confab::config::CassandraConfig {
    cassandra_config_with(contact_point, keyspace, &[])
}

pub fn cassandra_config_with(
    contact_point: &str,
    keyspace: &str,
    extra: &[(String, String)],
) -> confab::config::CassandraConfig {
    let mut layers = confab::config::Layers::default()
        .with("cassandra.contact-points", contact_point)
        .and_then(|l| l.with("cassandra.keyspace", keyspace))
        .and_then(|l| l.with("cassandra.reconnect-timeout", "2s"))
        .and_then(|l| l.with("cassandra.await-schema-agreement", schema_agreement()))
        .and_then(|l| {
            l.with(
                "cassandra.local-dc",
                std::env::var("CONFAB_TEST_CASSANDRA_DC").unwrap_or_default(),
            )
        });
    for (option, value) in extra {
        layers = layers.and_then(|l| l.with(option, value.as_str()));
    }
    layers
        .and_then(|l| l.resolve())
        .expect("test Cassandra configuration")
        .cassandra
}
