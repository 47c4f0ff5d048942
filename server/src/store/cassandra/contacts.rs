//! The contact store on Cassandra: one table of final transcripts that
//! every instance on every host writes to, so a closed chat can be read
//! back through any gateway whichever instance closed it (a SQLite contact
//! store is a file on the closing instance's host).
//!
//! A final transcript is one row, its events as JSON: it is written once
//! and read whole, never appended to or queried by event. "The first save
//! is kept" needs no lightweight transaction: only the owner of a chat's
//! current epoch can close it (the closing append is fenced), so the saves
//! of one chat are that owner's retries of one transcript. A save reads the
//! row first and writes only when it is absent; a retry whose earlier try
//! landed unseen writes the same transcript again.

use super::{prepare_at, unavailable};
use crate::config::CassandraConfig;
use crate::session::Event;
use crate::store::{ContactStore, FinalTranscript, StoreResult};
use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use std::sync::Arc;

pub struct CassandraContactStore {
    session: Arc<Session>,
    insert: PreparedStatement,
    select: PreparedStatement,
}

impl CassandraContactStore {
    /// Prepare the two statements, at the configured levels (the start-up
    /// check makes reads meet writes).
    pub async fn new(
        session: impl Into<Arc<Session>>,
        config: &CassandraConfig,
    ) -> StoreResult<Self> {
        let session = session.into();
        let ks = &config.keyspace;
        let insert = prepare_at(
            &session,
            format!("INSERT INTO {ks}.final_transcripts (session_id, intx, closed_at, events) VALUES (?, ?, ?, ?)"),
            config.write_consistency,
        )
        .await?;
        let select = prepare_at(
            &session,
            format!(
                "SELECT intx, closed_at, events FROM {ks}.final_transcripts WHERE session_id = ?"
            ),
            config.read_consistency,
        )
        .await?;
        Ok(CassandraContactStore {
            session,
            insert,
            select,
        })
    }
}

#[async_trait]
impl ContactStore for CassandraContactStore {
    async fn save_final_transcript(&self, t: FinalTranscript) -> StoreResult<()> {
        if self.final_transcript(&t.session_id).await?.is_some() {
            return Ok(());
        }
        let events = serde_json::to_string(&t.events).map_err(unavailable)?;
        self.session
            .execute_unpaged(
                &self.insert,
                (&t.session_id, &t.intx, t.closed_at_ms, events),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn final_transcript(&self, session_id: &str) -> StoreResult<Option<FinalTranscript>> {
        let rows = self
            .session
            .execute_unpaged(&self.select, (session_id,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        let Some((intx, closed_at, events)) = rows
            .maybe_first_row::<(Option<String>, Option<i64>, Option<String>)>()
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let events: Vec<Event> =
            serde_json::from_str(events.as_deref().unwrap_or("[]")).map_err(|e| {
                crate::store::StoreError::Corrupt(format!(
                    "final transcript of {session_id}: events unreadable: {e}"
                ))
            })?;
        Ok(Some(FinalTranscript {
            session_id: session_id.to_owned(),
            intx: intx.unwrap_or_default(),
            closed_at_ms: closed_at.unwrap_or_default(),
            events,
        }))
    }
}
