//! The one boundary to Cassandra: connecting, schema migrations and the typed
//! reads and writes of the projections. No other module uses the driver.
//!
//! Statements name tables fully (`keyspace.table`), so one session could serve
//! several keyspaces and nothing depends on `USE`.

mod batch;
mod chats;
mod config;
mod daily;
mod error;
mod messages;
mod ops;
mod presence;
mod progress;
mod push;
mod receipts;
mod schema;

pub use batch::Write;
pub use chats::{change_bucket, floor_to_second, ChatRow, UserChatRow, CHANGE_BUCKET_MS};
pub use config::{is_identifier, Consistency, Replication, StoreConfig};
pub use daily::DailyRow;
pub use error::StoreError;
pub use messages::{bucket_of, MessageRow, MESSAGES_PER_BUCKET};
pub use ops::{fnv1a64, AliasRow, Digest, TableDigest};
pub use presence::{DeviceRow, PresenceRow};
pub use push::{PushRegistration, PushSettings};
pub use receipts::ReceiptRow;
pub use schema::{Migration, MigrationReport, MIGRATIONS};

use futures::TryStreamExt;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::NewSessionError;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Statement;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// A connected Cassandra session bound to the platform's keyspace. Cheap to
/// clone; clones share the connections and the prepared statements.
#[derive(Clone, Debug)]
pub struct Store {
    session: Arc<Session>,
    keyspace: String,
    prepared: Arc<OnceCell<messages::Prepared>>,
    chats: Arc<OnceCell<chats::Prepared>>,
    progress: Arc<OnceCell<progress::Prepared>>,
    receipts: Arc<OnceCell<receipts::Prepared>>,
    presence: Arc<OnceCell<presence::Prepared>>,
    push: Arc<OnceCell<push::Prepared>>,
    daily: Arc<OnceCell<daily::Prepared>>,
}

/// Connects to the cluster, or fails with [`StoreError::Unreachable`] within
/// `cfg.connect_timeout_ms` when no contact point answers. The keyspace need
/// not exist yet: [`Store::migrate`] creates it.
pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
    cfg.validate()?;
    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let unreachable = |detail: String| StoreError::Unreachable {
        nodes: cfg.nodes.join(","),
        detail,
    };
    // Every statement of the store runs with this profile's consistency
    // (none sets its own).
    let profile = ExecutionProfile::builder()
        .consistency(cfg.consistency.to_driver())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .connection_timeout(timeout)
        .default_execution_profile_handle(profile.into_handle());
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        builder = builder.user(user, password.expose());
    }
    let session = match tokio::time::timeout(timeout, builder.build()).await {
        Ok(Ok(session)) => session,
        Ok(Err(e @ (NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_)))) => {
            return Err(StoreError::Config(e.to_string()))
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {timeout:?}"))),
    };
    tracing::info!(nodes = %cfg.nodes.join(","), keyspace = %cfg.keyspace, consistency = ?cfg.consistency, "connected to cassandra");
    Ok(Store {
        session: Arc::new(session),
        keyspace: cfg.keyspace.clone(),
        prepared: Arc::default(),
        chats: Arc::default(),
        progress: Arc::default(),
        receipts: Arc::default(),
        presence: Arc::default(),
        push: Arc::default(),
        daily: Arc::default(),
    })
}

impl Store {
    /// The keyspace every statement of this store names.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Names of the tables in the keyspace, sorted (empty when it does not exist).
    pub async fn tables(&self) -> Result<Vec<String>, StoreError> {
        let cql = "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?";
        let result = self.query("list tables", cql, (&self.keyspace,)).await?;
        let mut names: Vec<String> = rows::<(String,)>("list tables", result)?
            .into_iter()
            .map(|(name,)| name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// The `default_time_to_live` of `table` in seconds (0: none; None: no
    /// such table).
    pub async fn table_default_ttl(&self, table: &str) -> Result<Option<i32>, StoreError> {
        let cql = "SELECT default_time_to_live FROM system_schema.tables \
                   WHERE keyspace_name = ? AND table_name = ?";
        let result = self
            .query("read table options", cql, (&self.keyspace, table))
            .await?;
        Ok(rows::<(Option<i32>,)>("read table options", result)?
            .into_iter()
            .next()
            .map(|(ttl,)| ttl.unwrap_or(0)))
    }

    /// Drops the keyspace with all its data. For tests and local resets only:
    /// a production keyspace is rebuilt by replaying the log, which takes time.
    pub async fn drop_keyspace(&self) -> Result<(), StoreError> {
        let cql = format!("DROP KEYSPACE IF EXISTS {}", self.keyspace);
        self.query("drop keyspace", cql, ()).await?;
        self.agree().await
    }

    /// Every row of `table` as a JSON object (`SELECT JSON *`), sorted: a
    /// full scan, for tests and tooling comparing projections, never for
    /// request paths.
    pub async fn dump_table(&self, table: &str) -> Result<Vec<String>, StoreError> {
        if !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || table.is_empty() {
            return Err(StoreError::Config(format!("not a table name: {table:?}")));
        }
        let what = format!("dump {table}");
        let cql = format!("SELECT JSON * FROM {}.{table}", self.keyspace);
        let pager = self.session.query_iter(cql, ()).await;
        let pager = pager.map_err(|e| StoreError::query(&what, e))?;
        let stream = pager.rows_stream::<(String,)>();
        let stream = stream.map_err(|e| StoreError::query(&what, e))?;
        let mut rows: Vec<String> = stream
            .map_ok(|(json,)| json)
            .try_collect()
            .await
            .map_err(|e| StoreError::query(&what, e))?;
        rows.sort();
        Ok(rows)
    }

    /// Prepares a statement; a failure usually means the schema is not migrated.
    async fn prepare(&self, cql: String) -> Result<PreparedStatement, StoreError> {
        let prepared = self.session.prepare(cql).await;
        prepared.map_err(|e| StoreError::query("prepare statement (was the schema migrated?)", e))
    }

    /// Runs a prepared read and collects every row, page by page.
    async fn execute_all<R>(
        &self,
        what: &str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let pager = self.session.execute_iter(statement.clone(), values).await;
        let pager = pager.map_err(|e| StoreError::query(what, e))?;
        let stream = pager.rows_stream::<R>();
        let stream = stream.map_err(|e| StoreError::query(what, e))?;
        stream
            .try_collect()
            .await
            .map_err(|e| StoreError::query(what, e))
    }

    /// Runs an unprepared statement (DDL, rare reads).
    async fn query(
        &self,
        what: &str,
        cql: impl Into<Statement>,
        values: impl SerializeRow,
    ) -> Result<QueryResult, StoreError> {
        let result = self.session.query_unpaged(cql, values).await;
        result.map_err(|e| StoreError::query(what, e))
    }

    /// Runs a prepared statement.
    async fn execute(
        &self,
        what: &str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryResult, StoreError> {
        let result = self.session.execute_unpaged(statement, values).await;
        result.map_err(|e| StoreError::query(what, e))
    }

    /// Waits until every node reports the same schema version.
    async fn agree(&self) -> Result<(), StoreError> {
        let result = self.session.await_schema_agreement().await;
        result
            .map(drop)
            .map_err(|e| StoreError::query("await schema agreement", e))
    }
}

/// Decodes every row of a result.
fn rows<R: for<'f> DeserializeRow<'f, 'f>>(
    what: &str,
    result: QueryResult,
) -> Result<Vec<R>, StoreError> {
    let result = result
        .into_rows_result()
        .map_err(|e| StoreError::query(what, e))?;
    let iter = result.rows::<R>().map_err(|e| StoreError::query(what, e))?;
    iter.collect::<Result<_, _>>()
        .map_err(|e| StoreError::query(what, e))
}

/// A seq as CQL `bigint` (also used as a write timestamp).
fn cql_seq(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Query {
        what: "encode seq".into(),
        detail: format!("{seq} exceeds the CQL bigint range"),
        retryable: false,
    })
}
