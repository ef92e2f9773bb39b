//! Sent-markers: one Cassandra row per dedupe key that a provider accepted
//! (or that was settled for good: token removed, dead-lettered), written
//! before the task's offset is committed. A worker that restarts skips
//! every task whose marker exists, so only the requests in flight at a
//! crash (accepted by the provider, marker not yet written) can be sent
//! twice; those carry the same provider idempotency key (`apns-id`,
//! `X-Chat-Dedupe-Key`) on the resend.
//!
//! Table `<keyspace>.push_sent` (created here, `IF NOT EXISTS`, kept 30
//! days by TTL: longer than `chat.push`'s 7-day retention, so no task can
//! outlive its marker).

use chat_projectors::store::StoreConfig;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// What went wrong talking to Cassandra.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("Cassandra at {nodes} unreachable: {detail}")]
    Unreachable { nodes: String, detail: String },
    #[error("Cassandra {what}: {detail}")]
    Query { what: &'static str, detail: String },
}

fn q(what: &'static str) -> impl Fn(scylla::errors::ExecutionError) -> MarkerError {
    move |e| MarkerError::Query {
        what,
        detail: e.to_string(),
    }
}

/// The sent-marker table.
#[derive(Clone)]
pub struct Markers {
    session: Arc<Session>,
    get: PreparedStatement,
    put: PreparedStatement,
}

impl std::fmt::Debug for Markers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Markers").finish_non_exhaustive()
    }
}

/// How a task was settled (stored with its marker, for operators).
pub const SENT: &str = "sent";
pub const REMOVED: &str = "removed";
pub const DEAD: &str = "dead";

impl Markers {
    /// Connects, creates the keyspace (if missing) and the table.
    pub async fn connect(cfg: &StoreConfig) -> Result<Self, MarkerError> {
        let nodes = cfg.nodes.join(",");
        let timeout = Duration::from_millis(cfg.connect_timeout_ms);
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
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(MarkerError::Unreachable {
                    nodes,
                    detail: e.to_string(),
                })
            }
            Err(_) => {
                return Err(MarkerError::Unreachable {
                    nodes,
                    detail: format!("no answer within {timeout:?}"),
                })
            }
        };
        let ks = &cfg.keyspace;
        session
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
                    cfg.replication.cql_map()
                ),
                (),
            )
            .await
            .map_err(q("create keyspace"))?;
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.push_sent (dedupe_key text PRIMARY KEY, outcome text, \
                     provider_id text, sent_at timestamp) WITH default_time_to_live = 2592000"
                ),
                (),
            )
            .await
            .map_err(q("create table push_sent"))?;
        let _ = session.await_schema_agreement().await;
        let get = session
            .prepare(format!(
                "SELECT dedupe_key FROM {ks}.push_sent WHERE dedupe_key IN ?"
            ))
            .await
            .map_err(|e| MarkerError::Query {
                what: "prepare",
                detail: e.to_string(),
            })?;
        let put = session
            .prepare(format!(
                "INSERT INTO {ks}.push_sent (dedupe_key, outcome, provider_id, sent_at) VALUES (?, ?, ?, toTimestamp(now()))"
            ))
            .await
            .map_err(|e| MarkerError::Query { what: "prepare", detail: e.to_string() })?;
        Ok(Self {
            session: Arc::new(session),
            get,
            put,
        })
    }

    /// Which of `keys` already have a marker.
    pub async fn settled(&self, keys: &[String]) -> Result<HashSet<String>, MarkerError> {
        let mut out = HashSet::new();
        for chunk in keys.chunks(100) {
            let result = self
                .session
                .execute_unpaged(&self.get, (chunk.to_vec(),))
                .await
                .map_err(q("read push_sent"))?;
            let rows = result.into_rows_result().map_err(|e| MarkerError::Query {
                what: "read push_sent",
                detail: e.to_string(),
            })?;
            for row in rows.rows::<(String,)>().map_err(|e| MarkerError::Query {
                what: "read push_sent",
                detail: e.to_string(),
            })? {
                let (k,) = row.map_err(|e| MarkerError::Query {
                    what: "read push_sent",
                    detail: e.to_string(),
                })?;
                out.insert(k);
            }
        }
        Ok(out)
    }

    /// Records that `key` is settled (`outcome`: [`SENT`], [`REMOVED`], [`DEAD`]).
    pub async fn mark(
        &self,
        key: &str,
        outcome: &str,
        provider_id: Option<&str>,
    ) -> Result<(), MarkerError> {
        self.session
            .execute_unpaged(&self.put, (key, outcome, provider_id))
            .await
            .map(drop)
            .map_err(q("write push_sent"))
    }
}
