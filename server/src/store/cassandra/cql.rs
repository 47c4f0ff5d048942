//! The CQL operations the Cassandra store's protocol is made of, one per
//! statement, behind a trait: [`Driver`] runs them on a cluster through the
//! scylla driver (prepared once, each with its consistency level); a test
//! can run the same protocol (`CassandraStore<C>`) on a model of replicas
//! with lost answers, late writes and skewed clocks, which no CQL node
//! offers on demand.

use super::{level, unavailable};
use crate::config::CassandraConfig;
use crate::session::{Event, Role};
use crate::store::StoreResult;
use async_trait::async_trait;
use futures_util::TryStreamExt;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use tokio::sync::Semaphore;

/// intx, subject, created_at, state, nickname, agent_joined, as stored
/// (nullable)
pub type HeaderRow = (
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<bool>,
);

/// epoch, owner, cut, prev_epoch, prev_owner
pub type ClaimRow = (i64, String, Option<i64>, Option<i64>, Option<String>);

/// seq, epoch, kind, participant_id, nickname, text, reason, role,
/// client_msg_id, at
pub type EventRow = (
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// session_id, state, created_at
pub type IndexRow = (String, Option<String>, Option<i64>);

/// A session's header as written at creation (with its state) or again
/// to renew its TTL (without: only its owner's appends write the state).
pub struct NewHeader<'a> {
    pub intx: &'a str,
    pub subject: Option<&'a str>,
    pub created_at_ms: i64,
    pub state: Option<&'a str>,
    pub nickname: Option<&'a str>,
}

/// One claim row.
pub struct NewClaim<'a> {
    pub epoch: i64,
    pub owner: &'a str,
    pub cut: i64,
    pub prev: Option<(i64, &'a str)>,
}

/// Every statement of the store. Writes are upserts; reads return rows as
/// stored. Errors are `StoreError::Unavailable` (timeouts included: the
/// write may have been applied).
#[async_trait]
pub trait Cql: Send + Sync + 'static {
    async fn insert_session(&self, id: &str, h: NewHeader<'_>) -> StoreResult<()>;
    async fn select_session(&self, id: &str) -> StoreResult<Vec<HeaderRow>>;
    /// Write the state; `active` also sets `agent_joined`, which nothing
    /// unsets, so that a clock running ahead on the creating instance
    /// cannot turn a joined chat back into a waiting one.
    async fn update_state(&self, id: &str, state: &str) -> StoreResult<()>;
    /// `agent_joined` alone, set again (its TTL renewed).
    async fn set_joined(&self, id: &str) -> StoreResult<()>;
    async fn insert_claim(&self, id: &str, c: NewClaim<'_>) -> StoreResult<()>;
    async fn select_claims(&self, id: &str) -> StoreResult<Vec<ClaimRow>>;
    async fn insert_event(&self, id: &str, epoch: i64, e: &Event) -> StoreResult<()>;
    async fn select_events(&self, id: &str) -> StoreResult<Vec<EventRow>>;
    async fn insert_index(&self, id: &str, state: &str, created_at_ms: i64) -> StoreResult<()>;
    async fn select_index(&self) -> StoreResult<Vec<IndexRow>>;
    async fn delete_index(&self, id: &str) -> StoreResult<()>;
    async fn delete_events(&self, id: &str) -> StoreResult<()>;
    async fn delete_session(&self, id: &str) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
    /// This instance's clock, in ms since the Unix epoch: when the rows of
    /// a live session are due to be written again. The simulation's own
    /// clock, so that its runs let rows expire deterministically.
    fn now_ms(&self) -> i64 {
        crate::session::now_ms()
    }
}

/// Requests in flight at once, per instance.
const MAX_IN_FLIGHT: usize = 512;

/// The statements on a cluster, through the scylla driver.
pub struct Driver {
    session: std::sync::Arc<Session>,
    st: Statements,
    in_flight: Semaphore,
}

struct Statements {
    ins_session: PreparedStatement,
    ins_header: PreparedStatement,
    set_joined: PreparedStatement,
    sel_session: PreparedStatement,
    upd_state: PreparedStatement,
    upd_joined: PreparedStatement,
    ins_claim: PreparedStatement,
    sel_claims: PreparedStatement,
    ins_event: PreparedStatement,
    sel_events: PreparedStatement,
    ins_index: PreparedStatement,
    sel_index: PreparedStatement,
    del_events: PreparedStatement,
    del_session: PreparedStatement,
    del_index: PreparedStatement,
    ping: PreparedStatement,
}

impl Driver {
    /// Prepare every statement once, with its consistency level.
    pub async fn prepare(
        session: std::sync::Arc<Session>,
        config: &CassandraConfig,
    ) -> StoreResult<Self> {
        let ks = &config.keyspace;
        let (read, write) = (
            level(config.read_consistency),
            level(config.write_consistency),
        );
        let prepare = |cql: String, c: Consistency| {
            let session = &session;
            async move {
                let mut ps = session.prepare(cql).await.map_err(unavailable)?;
                ps.set_consistency(c);
                ps.set_is_idempotent(true);
                StoreResult::Ok(ps)
            }
        };
        let st = Statements {
            ins_session: prepare(format!("INSERT INTO {ks}.sessions (session_id, intx, subject, created_at, state, nickname) VALUES (?, ?, ?, ?, ?, ?)"), write).await?,
            ins_header: prepare(format!("INSERT INTO {ks}.sessions (session_id, intx, subject, created_at, nickname) VALUES (?, ?, ?, ?, ?)"), write).await?,
            set_joined: prepare(format!("INSERT INTO {ks}.sessions (session_id, agent_joined) VALUES (?, ?)"), write).await?,
            sel_session: prepare(format!("SELECT intx, subject, created_at, state, nickname, agent_joined FROM {ks}.sessions WHERE session_id = ?"), read).await?,
            upd_state: prepare(format!("INSERT INTO {ks}.sessions (session_id, state) VALUES (?, ?)"), write).await?,
            upd_joined: prepare(format!("INSERT INTO {ks}.sessions (session_id, state, agent_joined) VALUES (?, ?, ?)"), write).await?,
            ins_claim: prepare(format!("INSERT INTO {ks}.session_claims (session_id, epoch, owner, cut, prev_epoch, prev_owner) VALUES (?, ?, ?, ?, ?, ?)"), write).await?,
            sel_claims: prepare(format!("SELECT epoch, owner, cut, prev_epoch, prev_owner FROM {ks}.session_claims WHERE session_id = ?"), read).await?,
            ins_event: prepare(
                format!("INSERT INTO {ks}.events (session_id, seq, epoch, kind, participant_id, nickname, text, reason, role, client_msg_id, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                write,
            )
            .await?,
            sel_events: prepare(
                format!("SELECT seq, epoch, kind, participant_id, nickname, text, reason, role, client_msg_id, at FROM {ks}.events WHERE session_id = ?"),
                read,
            )
            .await?,
            ins_index: prepare(format!("INSERT INTO {ks}.session_index (bucket, session_id, state, created_at) VALUES (?, ?, ?, ?)"), write).await?,
            sel_index: prepare(format!("SELECT session_id, state, created_at FROM {ks}.session_index WHERE bucket = ?"), read).await?,
            del_events: prepare(format!("DELETE FROM {ks}.events WHERE session_id = ?"), write).await?,
            del_session: prepare(format!("DELETE FROM {ks}.sessions WHERE session_id = ?"), write).await?,
            del_index: prepare(format!("DELETE FROM {ks}.session_index WHERE bucket = ? AND session_id = ?"), write).await?,
            ping: prepare("SELECT release_version FROM system.local".to_owned(), Consistency::One).await?,
        };
        Ok(Driver {
            session,
            st,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    async fn exec(
        &self,
        ps: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> StoreResult<()> {
        let _p = self.in_flight.acquire().await.map_err(unavailable)?;
        self.session
            .execute_unpaged(ps, values)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// All rows of a query, across pages (partitions can be long).
    async fn rows<R>(
        &self,
        ps: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        let _p = self.in_flight.acquire().await.map_err(unavailable)?;
        let pager = self
            .session
            .execute_iter(ps.clone(), values)
            .await
            .map_err(unavailable)?;
        pager
            .rows_stream::<R>()
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)
    }
}

/// The one partition of `session_index`.
const BUCKET: i32 = 0;

#[async_trait]
impl Cql for Driver {
    async fn insert_session(&self, id: &str, h: NewHeader<'_>) -> StoreResult<()> {
        match h.state {
            Some(state) => {
                self.exec(
                    &self.st.ins_session,
                    (id, h.intx, h.subject, h.created_at_ms, state, h.nickname),
                )
                .await
            }
            None => {
                self.exec(
                    &self.st.ins_header,
                    (id, h.intx, h.subject, h.created_at_ms, h.nickname),
                )
                .await
            }
        }
    }

    async fn set_joined(&self, id: &str) -> StoreResult<()> {
        self.exec(&self.st.set_joined, (id, true)).await
    }

    async fn select_session(&self, id: &str) -> StoreResult<Vec<HeaderRow>> {
        self.rows(&self.st.sel_session, (id,)).await
    }

    async fn update_state(&self, id: &str, state: &str) -> StoreResult<()> {
        if state == crate::session::SessionState::Active.as_str() {
            self.exec(&self.st.upd_joined, (id, state, true)).await
        } else {
            self.exec(&self.st.upd_state, (id, state)).await
        }
    }

    async fn insert_claim(&self, id: &str, c: NewClaim<'_>) -> StoreResult<()> {
        self.exec(
            &self.st.ins_claim,
            (
                id,
                c.epoch,
                c.owner,
                c.cut,
                c.prev.map(|p| p.0),
                c.prev.map(|p| p.1),
            ),
        )
        .await
    }

    async fn select_claims(&self, id: &str) -> StoreResult<Vec<ClaimRow>> {
        self.rows(&self.st.sel_claims, (id,)).await
    }

    async fn insert_event(&self, id: &str, epoch: i64, e: &Event) -> StoreResult<()> {
        self.exec(
            &self.st.ins_event,
            (
                id,
                e.seq as i64,
                epoch,
                e.kind.as_str(),
                e.participant_id.as_deref(),
                e.nickname.as_deref(),
                e.text.as_deref(),
                e.reason.as_deref(),
                e.role.map(Role::as_str),
                e.client_msg_id.as_deref(),
                e.at_ms,
            ),
        )
        .await
    }

    async fn select_events(&self, id: &str) -> StoreResult<Vec<EventRow>> {
        self.rows(&self.st.sel_events, (id,)).await
    }

    async fn insert_index(&self, id: &str, state: &str, created_at_ms: i64) -> StoreResult<()> {
        self.exec(&self.st.ins_index, (BUCKET, id, state, created_at_ms))
            .await
    }

    async fn select_index(&self) -> StoreResult<Vec<IndexRow>> {
        self.rows(&self.st.sel_index, (BUCKET,)).await
    }

    async fn delete_index(&self, id: &str) -> StoreResult<()> {
        self.exec(&self.st.del_index, (BUCKET, id)).await
    }

    async fn delete_events(&self, id: &str) -> StoreResult<()> {
        self.exec(&self.st.del_events, (id,)).await
    }

    async fn delete_session(&self, id: &str) -> StoreResult<()> {
        self.exec(&self.st.del_session, (id,)).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.exec(&self.st.ping, ()).await
    }
}
