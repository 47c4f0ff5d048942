//! The shared store suite against the Cassandra store: the kassandra test
//! node over real TCP, or the real cluster named by CONFAB_TEST_CASSANDRA.

use confab::store::cassandra::contacts::CassandraContactStore;
use confab::store::cassandra::registry::CassandraRegistry;
use confab::store::cassandra::{connect, CassandraStore};
use confab::store::suite;
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
    suite::run_all(&a, &b).await;
}

/// The contact store's case of the suite on the shared final-transcripts
/// table (the first save kept, an unknown chat answered with none), and the
/// instances' registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_passes_the_contact_store_suite() {
    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let config = cassandra_config(&node.contact_point(), &keyspace);
    let contacts = CassandraContactStore::new(connect(&config).await.unwrap(), &config)
        .await
        .unwrap();
    suite::contact_store(&contacts).await;
    let registry = CassandraRegistry::new(connect(&config).await.unwrap(), &config)
        .await
        .unwrap();
    suite::registry(&registry).await;
}

/// `init` on a keyspace it made already changes nothing (it finds every
/// column, so it alters nothing: the test node has no `ALTER TABLE`); on a
/// keyspace made by a version whose `sessions` had no `nickname` it adds
/// the column, and the store then reads old rows without one and new rows
/// with theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_adds_the_columns_an_older_keyspace_lacks() {
    use confab::session::SessionState;
    use confab::store::cassandra::{init_schema, statements, KEYSPACE_SINGLE_NODE_CQL, TABLES_CQL};
    use confab::store::{SessionRecord, SessionStore};

    let node = Node::get().await;
    let keyspace = init_keyspace(&node.contact_point()).await;
    let config = cassandra_config(&node.contact_point(), &keyspace);
    let session = connect(&config).await.unwrap();
    init_schema(&session, &keyspace, false)
        .await
        .expect("init again on the same keyspace");

    // The older scripts: `sessions` without `nickname` (and `agent_joined`).
    let old_tables = TABLES_CQL.replace(
        "    state text,\n    nickname text,\n    agent_joined boolean\n",
        "    state text\n",
    );
    assert_ne!(old_tables, TABLES_CQL);
    let old = format!("{}_old", &keyspace);
    for stmt in statements(KEYSPACE_SINGLE_NODE_CQL, &old)
        .into_iter()
        .chain(statements(&old_tables, &old))
    {
        session.query_unpaged(stmt, ()).await.unwrap();
    }
    session
        .query_unpaged(
            format!("INSERT INTO {old}.sessions (session_id, intx, subject, created_at, state) VALUES ('old-1', 'intx', NULL, 1, 'waiting')"),
            (),
        )
        .await
        .unwrap();
    session
        .query_unpaged(
            format!("INSERT INTO {old}.session_claims (session_id, epoch, owner, cut) VALUES ('old-1', 1, 'inst-old', 0)"),
            (),
        )
        .await
        .unwrap();
    let upgraded = init_schema(&session, &old, false).await;
    if node.test_node().is_some() {
        // kassandra parses no ALTER TABLE: init saw the column missing and
        // says which statement it could not run.
        let err = upgraded.expect_err("the test node cannot alter a table");
        let alter = format!("ALTER TABLE {old}.sessions ADD nickname text");
        assert!(err.to_string().contains(&alter), "{err}");
        println!("the upgrade itself was not run: the kassandra test node has no ALTER TABLE (set CONFAB_TEST_CASSANDRA=host:port for a real cluster)");
        return;
    }
    upgraded.expect("init adds the column");
    init_schema(&session, &old, false)
        .await
        .expect("and then finds it");
    let config = cassandra_config(&node.contact_point(), &old);
    let store = CassandraStore::new(connect(&config).await.unwrap(), &config)
        .await
        .expect("the statements prepare on the upgraded keyspace");
    let before = store.locate("old-1").await.unwrap().expect("kept");
    assert_eq!(
        (before.owner_instance.as_str(), before.nickname),
        ("inst-old", None)
    );
    let record = SessionRecord {
        session_id: format!("new-{}", uuid::Uuid::new_v4().simple()),
        intx: "intx".into(),
        owner_instance: "inst-new".into(),
        epoch: 1,
        state: SessionState::Waiting,
        subject: None,
        nickname: Some("Ann".into()),
        created_at_ms: 2,
    };
    store.create_session(record.clone(), vec![]).await.unwrap();
    assert_eq!(
        store.locate(&record.session_id).await.unwrap(),
        Some(record)
    );
}

/// Start-up reads the keyspace's replication from `system_schema` and
/// refuses levels whose reads and writes may miss each other (R + W <= RF)
/// unless `cassandra.unsafe-consistency` says otherwise. The test node
/// keeps one replica (every read meets every write, so ONE passes); a real
/// cluster (CONFAB_TEST_CASSANDRA) with RF >= 2 must refuse ONE for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_enforces_that_reads_meet_writes() {
    use confab::store::cassandra::consistency::{enforce, replication};
    use confab_e2e::kassandra::cassandra_config_with;

    let node = Node::get().await;
    let cp = node.contact_point();
    let keyspace = init_keyspace(&cp).await;
    let config = cassandra_config(&cp, &keyspace);
    let session = connect(&config).await.unwrap();
    enforce(&session, &config)
        .await
        .expect("QUORUM for both always passes");
    let rep = replication(&session, &keyspace).await.unwrap();
    let with = |extra: &[(&str, &str)]| {
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cassandra_config_with(&cp, &keyspace, &extra)
    };
    let one = [
        ("cassandra.read-consistency", "ONE"),
        ("cassandra.write-consistency", "ONE"),
    ];
    let weak = enforce(&session, &with(&one)).await;
    if rep.total() >= 2 {
        let why = weak
            .expect_err("ONE for both on several replicas")
            .to_string();
        assert!(why.contains("unsafe-consistency"), "{why}");
        let mut overridden = one.to_vec();
        overridden.push(("cassandra.unsafe-consistency", "true"));
        enforce(&session, &with(&overridden))
            .await
            .expect("overridden");
    } else {
        weak.expect("one replica: ONE reads meet ONE writes");
    }
    let missing = cassandra_config(&cp, "no_such_keyspace");
    let err = enforce(&session, &missing).await.unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
}
