//! The instances' registry on Cassandra: one small partition that every
//! instance on every host writes its heartbeat to and every gateway reads,
//! so gateways find instances without a list of URLs. A heartbeat is an
//! upsert of the instance's own row: no two writers share a cell.

use super::{prepare_at, unavailable};
use crate::config::CassandraConfig;
use crate::store::{InstanceRegistry, Registration, StoreResult};
use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use std::sync::Arc;

/// The registry's one partition: a cluster has a handful of instances.
const BUCKET: i32 = 0;

pub struct CassandraRegistry {
    session: Arc<Session>,
    insert: PreparedStatement,
    select: PreparedStatement,
}

impl CassandraRegistry {
    pub async fn new(
        session: impl Into<Arc<Session>>,
        config: &CassandraConfig,
    ) -> StoreResult<Self> {
        let session = session.into();
        let ks = &config.keyspace;
        let insert = prepare_at(
            &session,
            format!("INSERT INTO {ks}.instances (bucket, instance_id, url, enabled, heartbeat) VALUES (?, ?, ?, ?, ?)"),
            config.write_consistency,
        )
        .await?;
        let select = prepare_at(
            &session,
            format!(
                "SELECT instance_id, url, enabled, heartbeat FROM {ks}.instances WHERE bucket = ?"
            ),
            config.read_consistency,
        )
        .await?;
        Ok(CassandraRegistry {
            session,
            insert,
            select,
        })
    }
}

#[async_trait]
impl InstanceRegistry for CassandraRegistry {
    async fn register(&self, r: &Registration) -> StoreResult<()> {
        self.session
            .execute_unpaged(
                &self.insert,
                (BUCKET, &r.instance_id, &r.url, r.enabled, r.heartbeat_ms),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn registrations(&self) -> StoreResult<Vec<Registration>> {
        let rows = self
            .session
            .execute_unpaged(&self.select, (BUCKET,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        rows.rows::<(String, Option<String>, Option<bool>, Option<i64>)>()
            .map_err(unavailable)?
            .map(|row| {
                let (instance_id, url, enabled, heartbeat) = row.map_err(unavailable)?;
                Ok(Registration {
                    instance_id,
                    url: url.unwrap_or_default(),
                    enabled: enabled.unwrap_or(false),
                    heartbeat_ms: heartbeat.unwrap_or(0),
                })
            })
            .collect()
    }
}
