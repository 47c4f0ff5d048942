//! The Cassandra / ScyllaDB session store, through the `scylla` driver.
//!
//! Fencing without lightweight transactions. Cassandra resolves two writes
//! to one primary key by timestamp, so a stale owner writing "event N" could
//! silently replace the new owner's acknowledged event N. Here:
//! - events are keyed by (session, seq, epoch): writers of different epochs
//!   never touch the same row;
//! - ownership is a history of claim rows (session, epoch, owner, cut); the
//!   owner is the claim with the greatest epoch; `cut` is the last seq that
//!   was valid when the claim was made;
//! - an event (seq, epoch) is part of the transcript iff its epoch has a
//!   claim, seq > that claim's cut, and seq <= the next claim's cut;
//! - a claim is written first, then the transcript is read and the cut
//!   recorded; an append writes its events, then reads the claims back and
//!   acknowledges only if its epoch is still the greatest.
//!
//! With QUORUM writes and reads (R + W > RF), an acknowledged append's
//! events were written before its read-back, which preceded any newer
//! claim's completion, which preceded that claimer's transcript read: the
//! newer owner sees every acknowledged event. A stale owner's later write
//! lands above the new cut (not part of the transcript) and is refused by
//! its read-back. Epochs carry a random low part, so two instances claiming
//! at once get distinct epochs and distinct rows.

pub mod consistency;
pub mod contacts;
pub mod cql;
pub mod registry;
#[cfg(test)]
mod sim;

use self::cql::{Cql, Driver, EventRow, NewClaim, NewHeader};
use super::{Append, SessionRecord, SessionStore, StoreError, StoreResult};
use crate::config::{CassandraConfig, Consistency as Level};
use crate::session::{Event, EventKind, Role, SessionState};
use async_trait::async_trait;
use futures_util::TryStreamExt;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::statement::Consistency;
use std::sync::Arc;
use std::time::Duration;

/// The schema scripts (also for cqlsh); `confab.` is replaced by the
/// configured keyspace.
pub const KEYSPACE_SINGLE_NODE_CQL: &str =
    include_str!("../../../cassandra/01-keyspace-single-node.cql");
pub const TABLES_CQL: &str = include_str!("../../../cassandra/02-tables.cql");
pub const TABLES_TTL_CQL: &str = include_str!("../../../cassandra/02-tables-ttl.cql");

/// Low bits of an epoch that name the claiming instance (the rest counts
/// claims): two instances claiming a chat at once draw different epochs.
const EPOCH_OWNER_BITS: u32 = 20;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn level(l: Level) -> Consistency {
    match l {
        Level::Any => Consistency::Any,
        Level::One => Consistency::One,
        Level::Two => Consistency::Two,
        Level::Three => Consistency::Three,
        Level::Quorum => Consistency::Quorum,
        Level::All => Consistency::All,
        Level::LocalQuorum => Consistency::LocalQuorum,
        Level::EachQuorum => Consistency::EachQuorum,
        Level::LocalOne => Consistency::LocalOne,
    }
}

/// CQL statements of a script: full-line `--` comments dropped, split on `;`.
pub fn statements(script: &str, keyspace: &str) -> Vec<String> {
    let text: String = script
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(|s| {
            s.trim()
                .replace("confab.", &format!("{keyspace}."))
                .replace("EXISTS confab ", &format!("EXISTS {keyspace} "))
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Connect with the `[cassandra]` options.
pub async fn connect(config: &CassandraConfig) -> StoreResult<Session> {
    // `local-dc = ""`: no preference (a single-DC cluster).
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if !config.local_dc.is_empty() {
        policy = policy
            .prefer_datacenter(config.local_dc.clone())
            .permit_dc_failover(false);
    }
    let policy = policy.build();
    let profile = ExecutionProfile::builder()
        .consistency(level(config.write_consistency))
        .request_timeout(Some(config.reconnect_timeout.max(Duration::from_secs(1))))
        .retry_policy(Arc::new(DefaultRetryPolicy::new()))
        .load_balancing_policy(policy)
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(config.reconnect_timeout)
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .auto_await_schema_agreement(config.await_schema_agreement);
    if !config.username.is_empty() {
        builder = builder.user(
            config.username.clone(),
            config.password.clone().unwrap_or_default(),
        );
    }
    if let Some(ca) = &config.tls_ca_file {
        let mut tls = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls())
            .map_err(unavailable)?;
        tls.set_ca_file(ca)
            .map_err(|e| unavailable(format!("cassandra.tls-ca-file {}: {e}", ca.display())))?;
        builder = builder.tls_context(Some(scylla::client::session::OpenSsl010Config::new(tls)));
    }
    builder.build().await.map_err(unavailable)
}

/// Columns added to the tables since their first version: (table, column,
/// type). `CREATE TABLE IF NOT EXISTS` leaves a table made by an older
/// version as it is; `init_schema` adds these to it.
pub const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("sessions", "nickname", "text"),
    ("sessions", "agent_joined", "boolean"),
    ("session_claims", "prev_epoch", "bigint"),
    ("session_claims", "prev_owner", "text"),
];

/// Create the keyspace (single-node replication; production keyspaces are
/// made by the operator from `cassandra/01-keyspace-production.cql`) and
/// the tables, optionally with the TTL variant, then add to tables made by
/// an older version the columns they lack ([`ADDED_COLUMNS`]).
pub async fn init_schema(session: &Session, keyspace: &str, ttl: bool) -> StoreResult<()> {
    let tables = if ttl { TABLES_TTL_CQL } else { TABLES_CQL };
    for stmt in statements(KEYSPACE_SINGLE_NODE_CQL, keyspace)
        .into_iter()
        .chain(statements(tables, keyspace))
    {
        session
            .query_unpaged(stmt.as_str(), ())
            .await
            .map_err(unavailable)?;
    }
    add_missing_columns(session, keyspace).await
}

/// (table, column) of every column of `keyspace`, from `system_schema`.
/// The whole (node-local, small) table is read and filtered here: the CQL
/// test node answers `WHERE keyspace_name = ?` on it with no rows.
async fn columns(
    session: &Session,
    keyspace: &str,
) -> StoreResult<std::collections::HashSet<(String, String)>> {
    let mut query = scylla::statement::unprepared::Statement::new(
        "SELECT keyspace_name, table_name, column_name FROM system_schema.columns",
    );
    // The schema tables are local to each node.
    query.set_consistency(Consistency::One);
    let rows: Vec<(String, String, String)> = session
        .query_iter(query, ())
        .await
        .map_err(unavailable)?
        .rows_stream()
        .map_err(unavailable)?
        .try_collect()
        .await
        .map_err(unavailable)?;
    // confab names the keyspace unquoted: Cassandra stores it lowercased.
    let lowercase = keyspace.to_ascii_lowercase();
    Ok(rows
        .into_iter()
        .filter(|(ks, _, _)| ks == keyspace || *ks == lowercase)
        .map(|(_, table, column)| (table, column))
        .collect())
}

/// `ALTER TABLE … ADD` for each of [`ADDED_COLUMNS`] that `keyspace`'s
/// table lacks: nothing on a keyspace made by this version (nor on the CQL
/// test node, which has no `ALTER TABLE`). Two `init`s at once may both
/// find a column missing; the second `ALTER` is refused (the column exists)
/// and the column is then found on looking again.
async fn add_missing_columns(session: &Session, keyspace: &str) -> StoreResult<()> {
    let present = columns(session, keyspace).await?;
    let has = |present: &std::collections::HashSet<(String, String)>, table: &str, column: &str| {
        present.contains(&(table.to_owned(), column.to_owned()))
    };
    for (table, column, ty) in ADDED_COLUMNS {
        if has(&present, table, column) {
            continue;
        }
        let alter = format!("ALTER TABLE {keyspace}.{table} ADD {column} {ty}");
        tracing::info!(
            keyspace,
            table,
            column,
            "adding a column to a table made by an older version"
        );
        if let Err(e) = session.query_unpaged(alter.as_str(), ()).await {
            // Another init added it meanwhile: look again once the nodes
            // agree on the schema.
            let _ = session.await_schema_agreement().await;
            if !has(&columns(session, keyspace).await?, table, column) {
                return Err(unavailable(format!("{alter}: {e}")));
            }
        }
    }
    Ok(())
}

/// Connect to the cluster an instance or a gateway uses, and check that
/// its read and write levels meet (crate::store::cassandra::consistency).
pub async fn open_session(config: &CassandraConfig) -> anyhow::Result<Arc<Session>> {
    use anyhow::Context;
    let session = connect(config).await.with_context(|| {
        format!(
            "connecting to Cassandra at {}",
            config.contact_points.join(",")
        )
    })?;
    consistency::enforce(&session, config).await?;
    Ok(Arc::new(session))
}

/// Prepare `cql` at consistency `level`, idempotent (every statement of
/// the stores is: upserts and reads).
pub(crate) async fn prepare_at(
    session: &Session,
    cql: String,
    level: Level,
) -> StoreResult<scylla::statement::prepared::PreparedStatement> {
    let mut ps = session.prepare(cql).await.map_err(unavailable)?;
    ps.set_consistency(self::level(level));
    ps.set_is_idempotent(true);
    Ok(ps)
}

/// Connect and create the keyspace and tables (idempotent): what
/// `confab cassandra init`, `confab up --store cassandra` and the benchmark
/// do before instances start.
pub async fn connect_and_init(config: &CassandraConfig, ttl: bool) -> StoreResult<Session> {
    let session = connect(config).await?;
    init_schema(&session, &config.keyspace, ttl).await?;
    Ok(session)
}

/// The session store on Cassandra: the protocol of `cassandra/README.md`
/// over the statements of [`Cql`], on a cluster through [`Driver`].
pub struct CassandraStore<C: Cql = Driver> {
    cql: C,
    attempted: std::sync::Mutex<std::collections::HashMap<String, Attempted>>,
    /// How often the owner of a live session writes all its rows again, so
    /// that with the TTL tables (`default_time_to_live`, a day in
    /// `02-tables-ttl.cql`) no row of a chat that goes on expires:
    /// [`REFRESH_EVERY`].
    refresh_every: std::time::Duration,
}

/// The rows of a live session are written again at its first append an
/// hour after they last were (or after the session was taken over): a TTL
/// of three hours or more never expires a row of a chat that is written to
/// at least every TTL minus an hour.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// How many times a refresh tries a row whose write failed.
const REWRITE_ATTEMPTS: usize = 3;

/// One row of a live session that a refresh writes again, as read.
enum Rewrite<'a> {
    /// The header's fixed columns (never `state`).
    Header,
    Joined,
    Claim(&'a Claim, &'a str),
    Event(i64, &'a Event),
    Index,
}

/// What this handle last tried to write to a session it owns. Inserts are
/// upserts and a write whose answer was lost may have landed, so a (seq,
/// epoch) key once tried is never given other content: at or below
/// `last_seq`, only the events of the last `batch` may be written again,
/// identical (a resend until the outcome is known, possibly with events
/// after them). Anything else is refused with `Conflict`
/// before it is written, and the owner must claim the chat again (which
/// reads whatever landed). SQLite refuses the same from its stored last
/// seq; here no lightweight transaction is needed, since only the owner of
/// an epoch writes its keys.
#[derive(Debug, Clone)]
struct Attempted {
    epoch: i64,
    /// The instance this handle writes the epoch for, when it created or
    /// claimed the session itself: compared with the epoch, so that a tie
    /// of epochs never passes for ownership.
    owner: Option<String>,
    last_seq: u64,
    batch: Vec<Event>,
    /// When this handle last wrote every row of the session again (their
    /// TTL starts over), ms on [`Cql::now_ms`]; None: not since it took the
    /// session over.
    refreshed: Option<i64>,
    /// This handle found the session's records gone and closes it: its
    /// closing claim's write may have landed with its answer lost.
    lost: bool,
}

#[derive(Debug, Clone)]
struct Claim {
    epoch: i64,
    cut: i64,
    /// The completed claim whose history this one took over (epoch,
    /// owner); none for the creation and for claims of older versions.
    prev: Option<(i64, String)>,
}

/// The stored header of a session.
struct Header {
    intx: String,
    subject: Option<String>,
    nickname: Option<String>,
    created_at_ms: i64,
    state: SessionState,
}

impl CassandraStore<Driver> {
    /// Prepare every statement once, with its consistency level.
    pub async fn new(
        session: impl Into<Arc<Session>>,
        config: &CassandraConfig,
    ) -> StoreResult<Self> {
        Ok(Self::over(Driver::prepare(session.into(), config).await?))
    }
}

impl<C: Cql> CassandraStore<C> {
    /// Write a live session's rows again this often instead of
    /// [`REFRESH_EVERY`] (tests).
    pub fn refreshing_every(mut self, every: std::time::Duration) -> Self {
        self.refresh_every = every;
        self
    }

    /// The store's protocol over any implementation of its statements.
    pub fn over(cql: C) -> Self {
        CassandraStore {
            cql,
            attempted: Default::default(),
            refresh_every: REFRESH_EVERY,
        }
    }

    async fn header(&self, session_id: &str) -> StoreResult<Option<Header>> {
        let rows = self.cql.select_session(session_id).await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|(intx, subject, created, state, nickname, joined)| {
                // Only appends write the state (a refresh does not): one
                // that has expired was the creation's `waiting`.
                let state = state
                    .as_deref()
                    .and_then(SessionState::parse)
                    .unwrap_or(SessionState::Waiting);
                Some(Header {
                    intx: intx?,
                    subject,
                    nickname,
                    created_at_ms: created.unwrap_or(0),
                    // A join is never undone: `waiting` written later by a
                    // clock that runs ahead does not count.
                    state: match (state, joined) {
                        (SessionState::Waiting, Some(true)) => SessionState::Active,
                        (state, _) => state,
                    },
                })
            }))
    }

    /// Claims in (epoch, owner) order, with their owners: the last one owns.
    async fn claims(&self, session_id: &str) -> StoreResult<Vec<(Claim, String)>> {
        let mut rows = self.cql.select_claims(session_id).await?;
        rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(rows
            .into_iter()
            .map(|(epoch, owner, cut, prev_epoch, prev_owner)| {
                (
                    Claim {
                        epoch,
                        cut: cut.unwrap_or(-1),
                        prev: prev_epoch.zip(prev_owner),
                    },
                    owner,
                )
            })
            .collect())
    }

    /// Every event the claims make valid ([`stored_history`]).
    async fn history(
        &self,
        session_id: &str,
        claims: &[(Claim, String)],
    ) -> StoreResult<Vec<Event>> {
        let rows = self.cql.select_events(session_id).await?;
        stored_history(claims, rows)
            .map_err(|why| StoreError::Corrupt(format!("session {session_id}: {why}")))
    }

    async fn record(
        &self,
        session_id: &str,
    ) -> StoreResult<Option<(SessionRecord, Vec<(Claim, String)>)>> {
        let (header, claims) = tokio::try_join!(self.header(session_id), self.claims(session_id))?;
        let Some(header) = header else {
            return Ok(None);
        };
        let Some((current, owner)) = claims.last().cloned() else {
            return Ok(None);
        };
        // Closing is a claim too, the last there can be: whatever a late
        // write put in the header, the chat is closed.
        let state = if current.epoch == TERMINAL_EPOCH {
            SessionState::Closed
        } else {
            header.state
        };
        Ok(Some((
            SessionRecord {
                session_id: session_id.to_owned(),
                intx: header.intx,
                owner_instance: owner,
                epoch: current.epoch as u64,
                state,
                subject: header.subject,
                nickname: header.nickname,
                created_at_ms: header.created_at_ms,
            },
            claims,
        )))
    }

    async fn set_state(
        &self,
        session_id: &str,
        state: SessionState,
        created_at_ms: Option<i64>,
    ) -> StoreResult<()> {
        self.cql.update_state(session_id, state.as_str()).await?;
        if state == SessionState::Closed {
            self.cql.delete_index(session_id).await
        } else {
            let created = match created_at_ms {
                Some(c) => c,
                None => self
                    .header(session_id)
                    .await?
                    .map(|h| h.created_at_ms)
                    .unwrap_or(0),
            };
            self.cql
                .insert_index(session_id, state.as_str(), created)
                .await
        }
    }

    /// Refuse `events` if they would give a key this handle has tried
    /// before other content; otherwise remember them as tried. `true` when
    /// every one of them was tried before (a resend).
    fn fresh_keys(&self, session_id: &str, epoch: i64, events: &[Event]) -> StoreResult<bool> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(false);
        };
        let (first, last) = (first.seq, last.seq);
        let mut attempted = self.attempted.lock().unwrap_or_else(|p| p.into_inner());
        let entry = attempted
            .entry(session_id.to_owned())
            .or_insert_with(|| Attempted {
                epoch,
                owner: None,
                last_seq: 0,
                batch: Vec::new(),
                refreshed: None,
                lost: false,
            });
        let tried_before = |e: &Event| entry.batch.iter().any(|b| b == e);
        let resend = entry.epoch == epoch && events.iter().all(tried_before);
        if entry.epoch == epoch
            && events
                .iter()
                .any(|e| e.seq <= entry.last_seq && !tried_before(e))
        {
            return Err(StoreError::Conflict(format!(
                "session {session_id} seq {first} at epoch {epoch} may already be stored (tried up to {}): claim the session again",
                entry.last_seq
            )));
        }
        if entry.epoch != epoch {
            *entry = Attempted {
                epoch,
                owner: None,
                last_seq: 0,
                batch: Vec::new(),
                refreshed: None,
                lost: false,
            };
        }
        entry.last_seq = entry.last_seq.max(last);
        entry.batch = events.to_vec();
        Ok(resend)
    }

    /// This handle now writes `epoch` of the session for `owner`, whose
    /// rows are up to `rows_age` old (zero at creation; a taken-over
    /// chat's age): they are written again once that reaches
    /// [`REFRESH_EVERY`], at once if it has.
    fn owns(&self, session_id: &str, epoch: i64, owner: &str, rows_age: std::time::Duration) {
        let refreshed = (rows_age < self.refresh_every)
            .then(|| self.cql.now_ms() - rows_age.as_millis() as i64);
        self.attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                session_id.to_owned(),
                Attempted {
                    epoch,
                    owner: Some(owner.to_owned()),
                    last_seq: 0,
                    batch: Vec::new(),
                    refreshed,
                    lost: false,
                },
            );
    }

    /// Whether the latest claim is `epoch`, and (when this handle knows
    /// for whom it writes the epoch) that owner's.
    fn still_owns(&self, session_id: &str, epoch: i64, latest: Option<&(Claim, String)>) -> bool {
        let Some((claim, owner)) = latest else {
            return false;
        };
        // A closing claim is still the epoch's that wrote it (its closing
        // resends, the deletes after the final transcript).
        let (claim_epoch, claim_owner) = match (&claim.prev, claim.epoch) {
            (Some((e, o)), TERMINAL_EPOCH) => (*e, o),
            (None, TERMINAL_EPOCH) => return false,
            _ => (claim.epoch, owner),
        };
        let known = self.owner_of(session_id, epoch);
        claim_epoch == epoch && known.is_none_or(|k| &k == claim_owner)
    }

    /// Whether the session's rows are due to be written again, and if so,
    /// count them as written now.
    fn refresh_due(&self, session_id: &str) -> bool {
        let mut attempted = self.attempted.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = attempted.get_mut(session_id) else {
            return false;
        };
        let now = self.cql.now_ms();
        // A clock set back counts as due, so as not to wait out the step.
        let due = entry
            .refreshed
            .is_none_or(|at| now - at >= self.refresh_every.as_millis() as i64 || now < at);
        if due {
            entry.refreshed = Some(now);
        }
        due
    }

    /// The refresh failed: try again at the next append.
    fn refresh_failed(&self, session_id: &str) {
        if let Some(entry) = self
            .attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(session_id)
        {
            entry.refreshed = None;
        }
    }

    /// Write every row the session's transcript depends on again, as read
    /// (the header's fixed columns and `agent_joined`, the claims on the
    /// chain, the events of the history under their epochs, its index
    /// entry), so that their TTL starts over. Identical content, and no
    /// `state`: nothing newer is overwritten. Done before an append's
    /// read-back, so that an append acknowledged after it proves every
    /// rewrite landed before any later claim (and closing) began; nothing
    /// is written once another claim is seen. Pending and abandoned claims
    /// and unacknowledged rows are left to expire.
    async fn refresh(&self, session_id: &str, epoch: i64) -> StoreResult<()> {
        let (header, claims) = tokio::try_join!(self.header(session_id), self.claims(session_id))?;
        let Some(header) = header else {
            return Ok(());
        };
        if !self.still_owns(session_id, epoch, claims.last()) || self.closed_by_claim(&claims) {
            return Ok(());
        }
        let corrupt = |why: String| StoreError::Corrupt(format!("session {session_id}: {why}"));
        let rows = self.cql.select_events(session_id).await?;
        let history = history_rows(&claims, rows).map_err(corrupt)?;
        let chain = chain(&claims).map_err(corrupt)?;
        // The header first: it then expires before the rows it heads (a
        // claim checks it after reading the history). The other rows are
        // written at once, each tried again on its own if it fails: a
        // refresh that stopped at its first failed write seldom got
        // through a long chat, and one left half done waits for a save
        // that may not come before the rest expires.
        self.rewrite(session_id, &header, vec![Rewrite::Header])
            .await?;
        let mut rows = Vec::new();
        if header.state == SessionState::Active {
            rows.push(Rewrite::Joined);
        }
        rows.extend(chain.iter().map(|(c, o)| Rewrite::Claim(c, o)));
        rows.extend(history.iter().map(|(epoch, e)| Rewrite::Event(*epoch, e)));
        if header.state != SessionState::Closed {
            rows.push(Rewrite::Index);
        }
        self.rewrite(session_id, &header, rows).await
    }

    /// Write `rows` of the session again, at once; those whose write
    /// failed are tried again, up to [`REWRITE_ATTEMPTS`] times in all.
    async fn rewrite(
        &self,
        session_id: &str,
        header: &Header,
        mut rows: Vec<Rewrite<'_>>,
    ) -> StoreResult<()> {
        let mut last = Ok(());
        for _ in 0..REWRITE_ATTEMPTS {
            let writes = rows
                .iter()
                .map(|row| self.rewrite_one(session_id, header, row));
            let outcomes = futures_util::future::join_all(writes).await;
            rows = rows
                .into_iter()
                .zip(outcomes)
                .filter_map(|(row, outcome)| outcome.map_err(|e| last = Err(e)).err().map(|_| row))
                .collect();
            if rows.is_empty() {
                return Ok(());
            }
        }
        last
    }

    async fn rewrite_one(&self, id: &str, header: &Header, row: &Rewrite<'_>) -> StoreResult<()> {
        match row {
            Rewrite::Header => {
                let fixed = NewHeader {
                    intx: &header.intx,
                    subject: header.subject.as_deref(),
                    created_at_ms: header.created_at_ms,
                    state: None,
                    nickname: header.nickname.as_deref(),
                };
                self.cql.insert_session(id, fixed).await
            }
            Rewrite::Joined => self.cql.set_joined(id).await,
            Rewrite::Claim(c, owner) => {
                let claim = NewClaim {
                    epoch: c.epoch,
                    owner,
                    cut: c.cut,
                    prev: c.prev.as_ref().map(|(e, o)| (*e, o.as_str())),
                };
                self.cql.insert_claim(id, claim).await
            }
            Rewrite::Event(epoch, e) => self.cql.insert_event(id, *epoch, e).await,
            Rewrite::Index => {
                self.cql
                    .insert_index(id, header.state.as_str(), header.created_at_ms)
                    .await
            }
        }
    }

    /// Whether the latest claim is a closing one.
    fn closed_by_claim(&self, claims: &[(Claim, String)]) -> bool {
        claims
            .last()
            .is_some_and(|(c, _)| c.epoch == TERMINAL_EPOCH)
    }

    /// The closing claim of the session, which `epoch` of `owner` closes.
    async fn write_closing_claim(
        &self,
        session_id: &str,
        epoch: i64,
        owner: &str,
    ) -> StoreResult<()> {
        self.cql
            .insert_claim(
                session_id,
                NewClaim {
                    epoch: TERMINAL_EPOCH,
                    owner,
                    cut: -1,
                    prev: Some((epoch, owner)),
                },
            )
            .await
    }

    /// The records of a session this handle owns are gone or no longer
    /// whole (expired): its owner closes it from what it holds. The
    /// closing claim goes first (when this handle knows the owner), so that
    /// nobody takes over what is left, not even through a replica that
    /// still has a row the others lost; then NotFound. If that write fails,
    /// its error, and the owner's next save comes back here (a closing
    /// save, which skips the refresh, finds the records gone at its
    /// read-back, or closes the chat: either way from what it holds).
    async fn records_lost(&self, session_id: &str, epoch: i64) -> StoreError {
        if let Some(owner) = self.owner_of(session_id, epoch) {
            self.set_lost(session_id, true);
            if let Err(e) = self.write_closing_claim(session_id, epoch, &owner).await {
                self.refresh_failed(session_id);
                return e;
            }
        }
        self.forget(session_id);
        StoreError::NotFound(session_id.to_owned())
    }

    /// The instance this handle writes `epoch` of the session for, if it
    /// created or claimed it itself and has not let it go.
    fn owner_of(&self, session_id: &str, epoch: i64) -> Option<String> {
        self.attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session_id)
            .filter(|a| a.epoch == epoch)
            .and_then(|a| a.owner.clone())
    }

    /// Mark that this handle found the session's records gone (or, once a
    /// read-back shows them whole again, that it did not).
    fn set_lost(&self, session_id: &str, lost: bool) {
        if let Some(a) = self
            .attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(session_id)
        {
            a.lost = lost;
        }
    }

    /// Whether this handle found the session's records gone.
    fn found_lost(&self, session_id: &str) -> bool {
        self.attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session_id)
            .is_some_and(|a| a.lost)
    }

    /// This handle no longer writes the session (moved, closed, deleted).
    fn forget(&self, session_id: &str) {
        self.attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session_id);
    }

    async fn write_events(
        &self,
        session_id: &str,
        epoch: i64,
        events: &[Event],
    ) -> StoreResult<()> {
        let writes = events
            .iter()
            .map(|e| self.cql.insert_event(session_id, epoch, e));
        futures_util::future::try_join_all(writes).await?;
        Ok(())
    }
}

/// The epoch of the claim that closes a session: greater than any other,
/// so that it stays the latest claim. It is never completed (no cut), so
/// it changes no transcript; it fences every owner (their epochs are not
/// the latest) and tells every reader the chat is closed, whatever a write
/// carrying a clock that runs ahead leaves in the header or the events
/// after the deletes. Its rows stay: the TTL tables expire them.
const TERMINAL_EPOCH: i64 = i64::MAX;

/// The low part of the epochs `owner` claims: FNV-1a of its id, so it is
/// the same in every version and on every host.
fn owner_bits(owner: &str) -> i64 {
    let hash = owner.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash & ((1 << EPOCH_OWNER_BITS) - 1)) as i64
}

/// The epoch `owner` claims after `current`: one more claim, its own low
/// part. Two instances claiming at once draw different epochs unless their
/// ids share the 20-bit hash; the claim then sees the tie and steps back
/// (`claim`), and owners are compared with epochs everywhere.
fn next_epoch(current: i64, owner: &str) -> i64 {
    (((current >> EPOCH_OWNER_BITS) + 1) << EPOCH_OWNER_BITS) | owner_bits(owner)
}

/// The claims a reader trusts, oldest first: the latest completed claim
/// (the greatest (epoch, owner) with a recorded cut) and the claims its
/// `prev` links lead back through. A claim not on this chain (abandoned
/// before its cut was recorded, however late that cut lands, or the loser
/// of a tie) says nothing about the transcript. Claims written before
/// `prev` existed (no link) follow the completed claim before them.
fn chain(claims: &[(Claim, String)]) -> Result<Vec<&(Claim, String)>, String> {
    let completed: Vec<&(Claim, String)> = claims.iter().filter(|(c, _)| c.cut >= 0).collect();
    let Some(mut at) = completed.last().copied() else {
        return Ok(Vec::new());
    };
    let mut chain = vec![at];
    loop {
        let key = |x: &(Claim, String)| (x.0.epoch, x.1.clone());
        let parent = match &at.0.prev {
            Some((epoch, owner)) => Some(
                claims
                    .iter()
                    .find(|(c, o)| c.epoch == *epoch && o == owner)
                    .ok_or_else(|| {
                        format!(
                            "claim {} of {} names a previous claim {epoch} of {owner} that is not stored",
                            at.0.epoch, at.1
                        )
                    })?,
            ),
            None => completed
                .iter()
                .rev()
                .find(|x| key(x) < key(at))
                .copied(),
        };
        let Some(parent) = parent else {
            break;
        };
        if key(parent) >= key(at) || parent.0.cut < 0 || parent.0.cut > at.0.cut {
            return Err(format!(
                "claim {} of {} (cut {}) follows claim {} of {} (cut {}): not an earlier, completed, shorter history",
                at.0.epoch, at.1, at.0.cut, parent.0.epoch, parent.1, parent.0.cut
            ));
        }
        chain.push(parent);
        at = parent;
    }
    chain.reverse();
    Ok(chain)
}

/// The transcript as the claims define it: each epoch on the [`chain`]
/// wrote the seqs after its cut up to the next claim's cut, the latest
/// completed claim's epoch everything after its cut (its open tail). Every
/// seq up to that cut must be there: a gap below a completed cut is
/// corruption (history rewritten: a lost or expired row), and an error.
/// Every stored row, repeated client_msg_ids included: a claim's cut is
/// taken over seqs, before they are dropped.
fn stored_history(claims: &[(Claim, String)], rows: Vec<EventRow>) -> Result<Vec<Event>, String> {
    Ok(history_rows(claims, rows)?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

/// [`stored_history`] with each event's epoch (the key it is stored under).
fn history_rows(
    claims: &[(Claim, String)],
    rows: Vec<EventRow>,
) -> Result<Vec<(i64, Event)>, String> {
    let chain = chain(claims)?;
    let bounds: Vec<(i64, i64, i64)> = chain
        .iter()
        .enumerate()
        .map(|(i, (c, _))| {
            let upper = chain.get(i + 1).map_or(i64::MAX, |(next, _)| next.cut);
            (c.epoch, c.cut, upper)
        })
        .collect();
    let mut events: Vec<(i64, Event)> = rows
        .into_iter()
        .filter(|row| {
            let (seq, epoch) = (row.0, row.1);
            bounds
                .iter()
                .any(|(e, lower, upper)| *e == epoch && seq > *lower && seq <= *upper)
        })
        .map(
            |(
                seq,
                epoch,
                kind,
                participant_id,
                nickname,
                text,
                reason,
                role,
                client_msg_id,
                at,
            )| {
                (
                    epoch,
                    Event {
                        seq: seq as u64,
                        kind: kind
                            .as_deref()
                            .and_then(EventKind::parse)
                            .unwrap_or(EventKind::Notice),
                        participant_id,
                        nickname,
                        text,
                        reason,
                        role: role.as_deref().and_then(Role::parse),
                        client_msg_id,
                        at_ms: at.unwrap_or(0),
                    },
                )
            },
        )
        .collect();
    // The epochs' ranges are disjoint: one row per seq.
    events.sort_by_key(|(_, e)| e.seq);
    events.dedup_by_key(|(_, e)| e.seq);
    let closed_cut = chain.last().map_or(0, |(c, _)| c.cut).max(0) as u64;
    if let Some(missing) =
        (1..=closed_cut).find(|seq| events.get(*seq as usize - 1).map(|(_, e)| e.seq) != Some(*seq))
    {
        return Err(format!(
            "seq {missing} is missing below the cut {closed_cut} of the latest completed claim"
        ));
    }
    Ok(events)
}

/// The events up to the first gap in seq: an append writes its events in
/// parallel, so a claim may see seq N+1 of an unfinished (never
/// acknowledged) append without N. Applies to the open epoch's tail only:
/// below the latest completed cut a gap is corruption ([`valid_events`]).
fn contiguous_prefix(mut events: Vec<Event>) -> Vec<Event> {
    let len = events
        .iter()
        .enumerate()
        .take_while(|(i, e)| e.seq == *i as u64 + 1)
        .count();
    events.truncate(len);
    events
}

#[async_trait]
impl<C: Cql> SessionStore for CassandraStore<C> {
    fn backend(&self) -> &'static str {
        "cassandra"
    }

    fn failed_writes_may_land(&self) -> bool {
        true
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "cassandra", op = "create_session", chat_id = %record.session_id))]
    async fn create_session(&self, record: SessionRecord, events: Vec<Event>) -> StoreResult<()> {
        if self.header(&record.session_id).await?.is_some() {
            return Err(StoreError::AlreadyExists(record.session_id));
        }
        let id = record.session_id.as_str();
        let header = NewHeader {
            intx: &record.intx,
            subject: record.subject.as_deref(),
            created_at_ms: record.created_at_ms,
            state: Some(record.state.as_str()),
            nickname: record.nickname.as_deref(),
        };
        self.cql.insert_session(id, header).await?;
        let creation = NewClaim {
            epoch: record.epoch as i64,
            owner: &record.owner_instance,
            cut: 0,
            prev: None,
        };
        self.cql.insert_claim(id, creation).await?;
        self.cql
            .insert_index(id, record.state.as_str(), record.created_at_ms)
            .await?;
        self.owns(
            id,
            record.epoch as i64,
            &record.owner_instance,
            std::time::Duration::ZERO,
        );
        let _ = self.fresh_keys(id, record.epoch as i64, &events)?;
        self.write_events(id, record.epoch as i64, &events).await
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "cassandra", op = "append_events", chat_id = %a.session_id))]
    async fn append_events(&self, a: Append) -> StoreResult<()> {
        let id = a.session_id.as_str();
        let epoch = a.epoch as i64;
        let resend = self.fresh_keys(id, epoch, &a.events)?;
        self.write_events(id, epoch, &a.events).await?;
        // Rows due to be written again are, before the read-back (see
        // `refresh`). The append does not depend on it: a failed refresh
        // is tried again at the next append.
        if a.state != SessionState::Closed && self.refresh_due(id) {
            match self.refresh(id, epoch).await {
                Ok(()) => {}
                // Rows below the owner's cut are gone (expired: nothing was
                // written for longer than the TTL allows): no other instance
                // could take the chat over, so its owner, which holds all of
                // it, closes it from memory as when every row is gone.
                Err(StoreError::Corrupt(why)) => {
                    tracing::warn!(sid = %id, %why, "the stored history of a live session is no longer whole");
                    return Err(self.records_lost(id, epoch).await);
                }
                Err(e) => {
                    tracing::warn!(sid = %id, error = %e, "rows of a live session not written again; retried at its next save");
                    self.refresh_failed(id);
                }
            }
        }
        let changes_state = a.events.iter().any(|e| {
            e.kind == EventKind::Closed
                || (e.kind == EventKind::Joined && e.role == Some(Role::Agent))
        });
        // Read back: acknowledged only if this epoch still owns the session.
        let (header, claims) = tokio::try_join!(self.header(id), self.claims(id))?;
        let current = claims.last().map(|(c, _)| c.epoch).unwrap_or(-1);
        // No claim left, or no header (it expires first): the records
        // expired (TTL), and nobody can take the chat over. If the head of
        // the chain (the latest completed claim) is ours, we own what is
        // left, even when a claim that found the records gone left its
        // pending row after it (it would fence us): we close the chat from
        // what we hold. Under another owner's head we are fenced: that
        // owner holds the chat. (Also when another owner closed and
        // deleted it: its closing claim fences us.)
        let ours = self.still_owns(id, epoch, claims.last());
        let head = claims
            .iter()
            .rfind(|(c, _)| c.cut >= 0 && c.epoch != TERMINAL_EPOCH);
        if claims.is_empty() || (header.is_none() && self.still_owns(id, epoch, head)) {
            return Err(self.records_lost(id, epoch).await);
        }
        if !ours {
            self.forget(id);
            return Err(StoreError::Fenced {
                session_id: a.session_id,
                attempted: a.epoch,
                current: current.max(0) as u64,
            });
        }
        let Some(header) = header else {
            return Err(self.records_lost(id, epoch).await);
        };
        // Our own closing claim, written when this handle found the
        // records gone (its answer lost): they still are.
        if self.closed_by_claim(&claims) && self.found_lost(id) {
            return Err(self.records_lost(id, epoch).await);
        }
        self.set_lost(id, false);
        if header.state == SessionState::Closed || self.closed_by_claim(&claims) {
            // The resend of a closing whose first try closed the session but
            // lost its answer (or failed after it): it is done; finish what
            // may be missing. Anything else on a closed session: no.
            if resend && a.state == SessionState::Closed {
                self.write_closing_claim(id, epoch, &claims[claims.len() - 1].1)
                    .await?;
                self.set_state(id, a.state, Some(header.created_at_ms))
                    .await?;
                return Ok(());
            }
            return Err(StoreError::Closed(a.session_id));
        }
        if a.state == SessionState::Closed {
            // The closing claim first: from now on the chat reads closed
            // whatever the header's state says (a `waiting` from a clock
            // ahead cannot reopen it) and every owner is fenced.
            let owner = claims[claims.len() - 1].1.clone();
            self.write_closing_claim(id, epoch, &owner).await?;
        }
        if changes_state && header.state != a.state {
            self.set_state(id, a.state, Some(header.created_at_ms))
                .await?;
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "cassandra", op = "claim", chat_id = %session_id))]
    async fn claim(
        &self,
        session_id: &str,
        new_owner: &str,
    ) -> StoreResult<(SessionRecord, Vec<Event>)> {
        let Some((record, claims_before)) = self.record(session_id).await? else {
            return Err(StoreError::NotFound(session_id.to_owned()));
        };
        if record.state == SessionState::Closed {
            return Err(StoreError::Closed(session_id.to_owned()));
        }
        // A corrupt history is refused before writing anything: a pending
        // claim would fence the owner that still holds the chat in memory.
        self.history(session_id, &claims_before).await?;
        let epoch = next_epoch(record.epoch as i64, new_owner);
        // 1. the claim (cut unknown yet)
        let pending = NewClaim {
            epoch,
            owner: new_owner,
            cut: -1,
            prev: None,
        };
        self.cql.insert_claim(session_id, pending).await?;
        // 2. the transcript as of now, under the claims as of now
        let claims_now = self.claims(session_id).await?;
        let latest = claims_now.last().map(|(c, _)| c.epoch).unwrap_or(epoch);
        let ours = |(c, o): &&(Claim, String)| c.epoch == epoch && o == new_owner;
        let tie = claims_now
            .iter()
            .any(|(c, o)| c.epoch == epoch && o != new_owner);
        if !claims_now.last().is_some_and(|l| ours(&l)) || tie {
            // Another instance claimed after us (it owns the session), or
            // drew the same epoch (its events would share our keys): step
            // back; the gateway tries again.
            return Err(StoreError::Fenced {
                session_id: session_id.to_owned(),
                attempted: epoch as u64,
                current: latest as u64,
            });
        }
        // Every chat has a completed claim (its creation's, at least): none
        // left means its rows expired meanwhile (TTL; an idle chat). This
        // claim stays without a cut and expires with them.
        if !claims_now.iter().any(|(c, _)| c.cut >= 0) {
            return Err(StoreError::NotFound(session_id.to_owned()));
        }
        // A gap below the latest completed cut refuses the claim (Corrupt):
        // this claim stays without a cut, so it changes nothing.
        let stored = contiguous_prefix(self.history(session_id, &claims_now).await?);
        // 3. the cut: what was valid when this claim took over, and whose
        // history it continues (the latest completed claim it read).
        let cut = stored.last().map(|e| e.seq as i64).unwrap_or(0);
        let events = super::first_of_each_client_msg_id(stored);
        let has_agent_join = events
            .iter()
            .any(|e| e.kind == EventKind::Joined && e.role == Some(Role::Agent));
        let prev = claims_now
            .iter()
            .rfind(|(c, _)| c.cut >= 0)
            .map(|(c, o)| (c.epoch, o.as_str()));
        let completed = NewClaim {
            epoch,
            owner: new_owner,
            cut,
            prev,
        };
        self.cql.insert_claim(session_id, completed).await?;
        // A claim that overtook this one meanwhile owns the chat: step back
        // before acknowledging anything from what this one read (a retry
        // answered as a duplicate from it could be missing there).
        let (header, after) = tokio::try_join!(self.header(session_id), self.claims(session_id))?;
        // The header is written before a chat's other rows (at creation and
        // at each refresh), so it expires first: gone now, the history read
        // above may have lost rows to the TTL while this claim ran (an idle
        // chat).
        let Some(header) = header else {
            return Err(StoreError::NotFound(session_id.to_owned()));
        };
        if let Some((c, o)) = after
            .last()
            .filter(|(c, o)| (c.epoch, o.as_str()) > (epoch, new_owner))
        {
            return Err(StoreError::Fenced {
                session_id: session_id.to_owned(),
                attempted: epoch as u64,
                current: c.epoch as u64,
            })
            .inspect_err(|_| tracing::debug!(sid = %session_id, overtaken_by = %o, "claim overtaken; stepping back"));
        }
        // A new epoch: its keys are fresh, whatever the old one tried.
        let age = u64::try_from(self.cql.now_ms() - record.created_at_ms).unwrap_or(0);
        self.owns(
            session_id,
            epoch,
            new_owner,
            std::time::Duration::from_millis(age),
        );
        Ok((
            SessionRecord {
                owner_instance: new_owner.to_owned(),
                epoch: epoch as u64,
                // As read after the history, or active if that history has
                // an agent's join: one acknowledged while this claim ran
                // is in the history even if its state write (after the
                // owner's read-back) is not yet.
                state: match header.state {
                    SessionState::Waiting if has_agent_join => SessionState::Active,
                    state => state,
                },
                ..record
            },
            events,
        ))
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "cassandra", op = "locate", chat_id = %session_id))]
    async fn locate(&self, session_id: &str) -> StoreResult<Option<SessionRecord>> {
        Ok(self.record(session_id).await?.map(|(r, _)| r))
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "cassandra", op = "load", chat_id = %session_id))]
    async fn load(&self, session_id: &str) -> StoreResult<Option<(SessionRecord, Vec<Event>)>> {
        let Some((record, claims)) = self.record(session_id).await? else {
            return Ok(None);
        };
        let events = super::first_of_each_client_msg_id(self.history(session_id, &claims).await?);
        Ok(Some((record, events)))
    }

    #[tracing::instrument(
        level = "debug",
        name = "store",
        skip_all,
        fields(backend = "cassandra", op = "list_sessions")
    )]
    async fn list_sessions(
        &self,
        state: Option<SessionState>,
        order: super::Order,
        limit: usize,
    ) -> StoreResult<Vec<SessionRecord>> {
        let mut rows = self.cql.select_index().await?;
        rows.retain(|(_, s, _)| state.is_none_or(|want| s.as_deref() == Some(want.as_str())));
        rows.sort_by_key(|r| r.2.unwrap_or(0));
        if order == super::Order::Newest {
            rows.reverse();
        }
        // Stale index rows (a closed chat whose entry a late write brought
        // back) are passed over, not counted against the limit.
        let mut out = Vec::with_capacity(limit.min(rows.len()));
        for (id, _, _) in rows {
            if out.len() >= limit {
                break;
            }
            if let Some(r) = self.locate(&id).await? {
                if state.is_none_or(|s| s == r.state) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    #[tracing::instrument(level = "debug", name = "store", skip_all, fields(backend = "cassandra", op = "delete_session", chat_id = %session_id))]
    async fn delete_session(&self, session_id: &str, epoch: u64) -> StoreResult<()> {
        let claims = self.claims(session_id).await?;
        let Some((current, _)) = claims.last() else {
            return Err(StoreError::NotFound(session_id.to_owned()));
        };
        if !self.still_owns(session_id, epoch as i64, claims.last()) {
            return Err(StoreError::Fenced {
                session_id: session_id.to_owned(),
                attempted: epoch,
                current: current.epoch as u64,
            });
        }
        self.forget(session_id);
        // The closing claim, if the closing append did not write it (a
        // session closed by an earlier version): idempotent.
        if !self.closed_by_claim(&claims) {
            let owner = claims.last().map(|(_, o)| o.as_str()).unwrap_or_default();
            self.write_closing_claim(session_id, current.epoch, owner)
                .await?;
        }
        self.cql.delete_index(session_id).await?;
        self.cql.delete_events(session_id).await?;
        self.cql.delete_session(session_id).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.cql.ping().await
    }

    fn release(&self, session_id: &str) {
        self.forget(session_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::texts;

    /// The transcript a reader serves: a client_msg_id counted once.
    fn valid_events(claims: &[(Claim, String)], rows: Vec<EventRow>) -> Result<Vec<Event>, String> {
        stored_history(claims, rows).map(crate::store::first_of_each_client_msg_id)
    }

    fn row(seq: i64, epoch: i64, text: &str, cmid: Option<&str>) -> EventRow {
        (
            seq,
            epoch,
            Some("message".into()),
            None,
            None,
            Some(text.into()),
            None,
            None,
            cmid.map(str::to_owned),
            Some(0),
        )
    }

    /// A claim as older versions wrote it (no `prev`), or a creation.
    fn claim(epoch: i64, cut: i64) -> (Claim, String) {
        (
            Claim {
                epoch,
                cut,
                prev: None,
            },
            format!("owner-{epoch}"),
        )
    }

    /// A claim that took over the history of claim `prev`.
    fn after(prev: i64, epoch: i64, cut: i64) -> (Claim, String) {
        (
            Claim {
                epoch,
                cut,
                prev: Some((prev, format!("owner-{prev}"))),
            },
            format!("owner-{epoch}"),
        )
    }

    fn valid(claims: &[(Claim, String)], rows: Vec<EventRow>) -> Vec<String> {
        texts(&valid_events(claims, rows).expect("a consistent history"))
    }

    #[test]
    fn a_late_cut_of_an_abandoned_claim_does_not_rewrite_history() {
        // Claim 2's cut write timed out (it reached one replica) and claim 2
        // was abandoned; claim 3 saw it without a cut, took over epoch 1's
        // seqs up to 4 and acknowledged seq 5. Then claim 2's cut (2) lands.
        // Bounding epoch 1 by "the next completed claim" would end it at 2,
        // leave a gap at 3 and lose 3..5; the chain goes 3 -> 1.
        let claims = [claim(1, 0), after(1, 2, 2), after(1, 3, 4)];
        let rows = vec![
            row(1, 1, "joined", None),
            row(2, 1, "two", None),
            row(3, 1, "three", None),
            row(4, 1, "four", None),
            row(5, 3, "acknowledged by claim 3", None),
        ];
        assert_eq!(
            valid(&claims, rows),
            ["joined", "two", "three", "four", "acknowledged by claim 3"]
        );
    }

    #[test]
    fn a_gap_below_a_completed_cut_is_corruption() {
        let claims = [claim(1, 0), after(1, 2, 3)];
        let rows = vec![
            row(1, 1, "joined", None),
            row(3, 1, "three", None),
            row(4, 2, "four", None),
        ];
        let why = valid_events(&claims, rows).unwrap_err();
        assert!(why.contains("seq 2 is missing below the cut 3"), "{why}");
        // A link to a claim that is not stored is corruption too.
        let claims = [claim(1, 0), after(7, 2, 1)];
        let why = valid_events(&claims, vec![row(1, 1, "joined", None)]).unwrap_err();
        assert!(why.contains("not stored"), "{why}");
    }

    #[test]
    fn a_tie_of_epochs_keeps_the_writers_events_whichever_claim_sorts_first() {
        // Two instances drew epoch 2: "a" saw the tie and stepped back
        // before recording a cut; "b" did not, and wrote seqs 3 and 4 after
        // its cut 2. Claims sort by (epoch, owner), "a" first.
        let claims = [
            claim(1, 0),
            (
                Claim {
                    epoch: 2,
                    cut: -1,
                    prev: None,
                },
                "a".to_owned(),
            ),
            (
                Claim {
                    epoch: 2,
                    cut: 2,
                    prev: Some((1, "owner-1".into())),
                },
                "b".to_owned(),
            ),
        ];
        let rows = vec![
            row(1, 1, "joined", None),
            row(2, 1, "before", None),
            row(3, 2, "b's first", None),
            row(4, 2, "b's second", None),
        ];
        assert_eq!(
            valid(&claims, rows),
            ["joined", "before", "b's first", "b's second"]
        );
    }

    #[test]
    fn a_stale_epoch_above_the_new_cut_is_not_in_the_transcript() {
        for claims in [[claim(1, 0), claim(2, 2)], [claim(1, 0), after(1, 2, 2)]] {
            let rows = vec![
                row(1, 1, "a", None),
                row(2, 1, "b", None),
                row(3, 1, "stale write after the claim", None),
                row(3, 2, "new owner", None),
            ];
            assert_eq!(valid(&claims, rows), ["a", "b", "new owner"]);
        }
    }

    #[test]
    fn an_abandoned_claim_does_not_unbound_the_stale_epoch() {
        // Claim 2 never recorded its cut; claim 3 took over at cut 2 and
        // acknowledged seq 3. The stale epoch-1 owner's later seq 3 stays out.
        let claims = [claim(1, 0), claim(2, -1), after(1, 3, 2)];
        let rows = vec![
            row(1, 1, "a", None),
            row(2, 1, "b", None),
            row(3, 1, "stale", None),
            row(3, 3, "acknowledged by the new owner", None),
        ];
        assert_eq!(
            valid(&claims, rows),
            ["a", "b", "acknowledged by the new owner"]
        );
    }

    #[test]
    fn a_claim_takes_over_only_up_to_the_first_gap_of_the_open_tail() {
        let claims = [claim(1, 0)];
        let rows = vec![
            row(1, 1, "a", None),
            row(2, 1, "b", None),
            row(4, 1, "half an append", None),
        ];
        let prefix = contiguous_prefix(valid_events(&claims, rows).unwrap());
        assert_eq!(texts(&prefix), ["a", "b"]);
    }

    #[test]
    fn a_claim_whose_cut_is_unknown_does_not_hide_earlier_events() {
        let claims = [claim(1, 0), claim(2, -1)];
        let rows = vec![row(1, 1, "a", None), row(2, 1, "b", None)];
        assert_eq!(valid(&claims, rows), ["a", "b"]);
    }

    #[test]
    fn events_of_unknown_epochs_and_repeated_client_ids_are_dropped() {
        let claims = [claim(1, 0)];
        let rows = vec![
            row(1, 1, "first", Some("m1")),
            row(2, 1, "retry", Some("m1")),
            row(3, 9, "no such claim", None),
        ];
        assert_eq!(valid(&claims, rows), ["first"]);
    }

    #[test]
    fn a_repeated_client_msg_id_does_not_cut_the_history_short() {
        // Seqs 2 and 3 share an id (a store that took the repeat); seq 4
        // was acknowledged. The claim's contiguous prefix is taken over
        // seqs, so its cut is 4, not 2.
        let claims = [claim(1, 0)];
        let rows = vec![
            row(1, 1, "joined", None),
            row(2, 1, "first", Some("m1")),
            row(3, 1, "repeat", Some("m1")),
            row(4, 1, "acknowledged", None),
        ];
        let stored = contiguous_prefix(stored_history(&claims, rows).unwrap());
        assert_eq!(stored.last().map(|e| e.seq), Some(4));
        assert_eq!(
            texts(&crate::store::first_of_each_client_msg_id(stored)),
            ["joined", "first", "acknowledged"]
        );
    }

    #[test]
    fn epochs_increase_and_differ_between_concurrent_claims() {
        let e1 = next_epoch(1, "inst-a");
        let e2 = next_epoch(1, "inst-b");
        assert!(e1 > 1 && e2 > 1);
        assert_ne!(e1, e2, "two instances claiming at once");
        assert_eq!(e1 >> EPOCH_OWNER_BITS, e2 >> EPOCH_OWNER_BITS);
        assert!(next_epoch(e1, "inst-a") > e1.max(e2));
        assert_eq!(next_epoch(1, "inst-a"), e1, "the same in every process");
    }

    #[test]
    fn scripts_split_into_statements_for_any_keyspace() {
        let ks = statements(KEYSPACE_SINGLE_NODE_CQL, "other_ks");
        assert_eq!(ks.len(), 1);
        assert!(
            ks[0].starts_with("CREATE KEYSPACE IF NOT EXISTS other_ks "),
            "{}",
            ks[0]
        );
        let tables = statements(TABLES_CQL, "other_ks");
        assert_eq!(tables.len(), 6);
        assert!(tables
            .iter()
            .all(|t| t.starts_with("CREATE TABLE IF NOT EXISTS other_ks.")));
        assert!(statements(TABLES_TTL_CQL, "k")
            .iter()
            .all(|t| t.contains("default_time_to_live")));
    }
}
