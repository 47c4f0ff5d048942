//! The shared store suite against the Cassandra store: the kassandra test
//! node over real TCP, or the real cluster named by CONFAB_TEST_CASSANDRA.

use confab::store::cassandra::{connect, CassandraStore};
use confab::store::suite::{self, Capabilities};
use confab_e2e::kassandra::{cassandra_config, init_keyspace, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_passes_the_store_suite() {
    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let config = cassandra_config(&node.contact_point(), &keyspace);
    // Two sessions: two instances.
    let a = CassandraStore::new(connect(&config).await.unwrap(), &config)
        .await
        .unwrap();
    let b = CassandraStore::new(connect(&config).await.unwrap(), &config)
        .await
        .unwrap();
    suite::run_all(
        &a,
        &b,
        Capabilities {
            refuses_duplicate_writes: false,
        },
    )
    .await;
}
