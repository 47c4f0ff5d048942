//! Where the Cassandra tests run: the CQL test node (`confab`'s
//! `store::test_node`, kassandra over real TCP) or a real cluster.
//!
//! With `CONFAB_TEST_CASSANDRA=host:port` the tests use that real cluster
//! instead (freeze/kill tests then need a node they may stop, and are run
//! only against the test node).

pub use confab::store::test_node::TestNode;

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
}

/// Create a throwaway keyspace with confab's schema; its name.
pub async fn init_keyspace(contact_point: &str) -> String {
    let keyspace = format!(
        "confab_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let config = cassandra_config(contact_point, &keyspace);
    let session = confab::store::cassandra::connect(&config)
        .await
        .expect("connect to the CQL node");
    confab::store::cassandra::init_schema(&session, &keyspace, false)
        .await
        .expect("create the schema");
    keyspace
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
    confab::config::Layers::default()
        .with("cassandra.contact-points", contact_point)
        .and_then(|l| l.with("cassandra.keyspace", keyspace))
        .and_then(|l| l.with("cassandra.reconnect-timeout", "2s"))
        .and_then(|l| l.with("cassandra.await-schema-agreement", schema_agreement()))
        .and_then(|l| {
            l.with(
                "cassandra.local-dc",
                std::env::var("CONFAB_TEST_CASSANDRA_DC").unwrap_or_default(),
            )
        })
        .and_then(|l| l.resolve())
        .expect("test Cassandra configuration")
        .cassandra
}
