//! The history projector: `chat.events` -> `messages`, `chats`,
//! `chat_members`, `user_chats`, `direct_chats`, `user_changes`, and its
//! position in `projector_progress`.
//!
//! # Contract
//!
//! - **At-least-once, offsets after writes.** It consumes `chat.events` in
//!   consumer group `group_id` through [`chat_log::EventConsumer`], which
//!   stores a record's offset only after [`Projector::project`] finished
//!   every write of that event. A Cassandra failure answers
//!   [`HandlerError::Retry`]: the same event is offered again after a
//!   backoff, nothing is skipped. A crash re-reads from the last committed
//!   offset.
//! - **Idempotent.** Every write is keyed by the event (`messages` by
//!   `(chat, seq)`) or carries `USING TIMESTAMP <seq>` (`chats`,
//!   `chat_members`, `user_chats`, `direct_chats`; the read pointer uses
//!   `up_to_seq`), so replaying the log, whole or from any offset, in order,
//!   leaves the same rows and never moves state back: a replayed `MemberAdded`
//!   loses to the later removal's tombstone, `chats.last_seq` and
//!   `user_chats.last_read_seq` only grow. Projecting the log from offset 0
//!   into an empty keyspace gives the same content as the live projector.
//! - **Progress.** After an event's writes succeeded, its partition's
//!   `next_offset = offset + 1` is recorded in memory, and a background task
//!   writes it to `projector_progress` (row [`HISTORY_PROJECTOR`]) at once,
//!   then at most every 50 ms while events keep coming, with
//!   `USING TIMESTAMP next_offset` (never moves back). So a stored
//!   `next_offset` never claims an event whose writes are not done. The last
//!   record of a partition that could not be decoded (dead-lettered by the
//!   consumer without reaching the projector) is not counted until the next
//!   record of that partition arrives.
//!
//! # Reconnect sync: `user_changes`
//!
//! For every sequenced event of chat C at `sequenced_ts` t, each member of C
//! after the event (and, for `MemberRemoved`, the removed user) gets a row
//! `(user, changed_at = floor_to_second(t), C)`. To keep the write rate at
//! one row per member per chat per second, the members are marked at most
//! once per (chat, second), remembered in memory; users whose membership the
//! event changes are always marked. A restart forgets the map and writes the
//! same rows again (idempotent).
//!
//! Why `changed_at >= floor(T)` finds every chat changed since T for a user:
//! every event at t ≥ T that the user should see has a marker for that user
//! with `changed_at = floor(t)` (either written for it, or written for an
//! earlier event of the same chat in the same second, while the user was
//! already a member), and floor is monotonic, so `floor(t) >= floor(T)`. The
//! query reads only that user's partition from `floor(T)` on: its cost grows
//! with the changes since T, not with the number of chats the user is in. It
//! may also return chats changed in the second before T (harmless: the
//! caller asks for messages after its own seq).
//!
//! Membership comes from a per-chat cache kept from the events themselves and
//! filled from `chat_members` on a miss (see [`Projector`] on why that is
//! consistent).

mod project;

pub use project::{body_json, ProjectError, Projected, Projector};

use chat_log::{
    ConsumedEvent, EventConsumer, EventProducer, HandlerError, LogConfig, SchemaRegistry, Topics,
};
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{Health, Shutdown};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreConfig};

/// The `projector_progress.projector` key of the history projection. It names
/// the projection, not the consumer group: whichever group writes this
/// keyspace, the row says how far its history is complete.
pub const HISTORY_PROJECTOR: &str = "history";

/// Shortest interval between two progress writes of a partition.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// How long the last progress write may take on shutdown.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// `chat-history`'s one config struct (TOML file plus `CHAT_*` overrides).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Where `/health` and `/metrics` are served.
    pub listen: SocketAddr,
    /// Kafka consumer group. A new group re-reads `chat.events` from the
    /// beginning (a rebuild); the keyspace is chosen by `store.keyspace`.
    pub group_id: String,
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// Kafka and the schema registry.
    pub log: LogConfig,
    /// Cassandra.
    pub store: StoreConfig,
}

impl chat_runtime::ServiceConfig for HistoryConfig {
    fn log_format(&self) -> chat_runtime::telemetry::LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()?;
        self.store.check()
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
            group_id: "history".into(),
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

/// Every option of `chat-history`, for `--help`.
pub const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by an environment
variable CHAT_<KEY>, nested keys joined by a double underscore):
  listen                admin address (/health, /metrics)           [127.0.0.1:9101]
  group_id              Kafka consumer group                        [history]
  log_format            pretty | json                               [pretty]
  log.brokers           Kafka bootstrap servers                     [127.0.0.1:9092]
  log.registry_url      schema registry (Confluent API) base URL    [http://127.0.0.1:8081/apis/ccompat/v7]
  log.topic_prefix      prefix before every topic name              []
  log.chat_partitions   partitions of chat.commands / chat.events   [12]
  log.replication_factor replication of created topics              [1]
  log.min_insync_replicas min.insync.replicas of acknowledged topics [1]
  log.security_protocol plaintext | ssl | sasl_plaintext | sasl_ssl [plaintext]
  log.sasl_mechanism    PLAIN, SCRAM-SHA-256, ... (sasl.mechanisms) [unset]
  log.sasl_username     SASL user                                   [unset]
  log.sasl_password     SASL password (secret, never printed)       [unset]
  log.ssl_ca_location   CA file of the brokers' certificates        [unset]
  log.ssl_certificate_location client certificate (PEM)             [unset]
  log.ssl_key_location  client private key (PEM)                    [unset]
  log.linger_ms         producer linger.ms (dead-letter writes)     [5]
  log.fetch_wait_max_ms consumer fetch.wait.max.ms                  [5]
  log.connect_timeout_ms start-up reachability timeout              [5000]
  store.nodes           Cassandra contact points                    [127.0.0.1:9042]
  store.keyspace        keyspace of every table                     [chat]
  store.replication     used by chat-admin migrate only             [SimpleStrategy, 1]
  store.connect_timeout_ms                                          [5000]
  store.username        Cassandra user (password authenticator)     [unset]
  store.password        its password (secret, never printed)        [unset]
  store.consistency     one|two|three|quorum|all|local_quorum|each_quorum|local_one [local_quorum]
  store.tls             TLS to Cassandra: not in this build, true is refused [false]
  store.tls_ca_location, store.tls_certificate_location, store.tls_key_location [unset]
The tables must exist (chat-admin migrate); the projector migrates nothing.
Example: CHAT_STORE__KEYSPACE=chat CHAT_GROUP_ID=history chat-history";

/// What a running projector reports: readiness and metrics. Clones share
/// state, so a caller keeps one to watch the projector it passed it to.
#[derive(Clone, Debug, Default)]
pub struct HistoryStatus {
    health: Health,
    events: Counter,
    markers: Counter,
    retries: Counter,
    dead_lettered: Counter,
    next_offset: Family<Vec<(String, String)>, Gauge>,
    positions: Arc<Mutex<HashMap<i32, i64>>>,
}

impl HistoryStatus {
    /// Reports readiness (`kafka`, `cassandra`) to `health`.
    pub fn new(health: Health) -> Self {
        Self {
            health,
            ..Self::default()
        }
    }

    /// Registers the metrics (prefix them with the registry's own prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_projected",
            "chat.events records whose writes are done",
            self.events.clone(),
        );
        registry.register(
            "change_markers_written",
            "user_changes rows written",
            self.markers.clone(),
        );
        registry.register(
            "store_retries",
            "events offered again after a Cassandra failure",
            self.retries.clone(),
        );
        registry.register(
            "dead_lettered",
            "events that can never be projected, sent to chat.dlq",
            self.dead_lettered.clone(),
        );
        registry.register(
            "next_offset",
            "per chat.events partition, the offset after the last projected event",
            self.next_offset.clone(),
        );
    }

    /// Per partition, the offset after the last event projected by this
    /// process (in memory; `projector_progress` follows within ~50 ms).
    pub fn positions(&self) -> HashMap<i32, i64> {
        self.positions.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Events projected by this process.
    pub fn events_projected(&self) -> u64 {
        self.events.get()
    }

    fn done(&self, partition: i32, next_offset: i64) {
        self.events.inc();
        if let Ok(mut p) = self.positions.lock() {
            let at = p.entry(partition).or_insert(next_offset);
            *at = (*at).max(next_offset);
        }
        let labels = vec![("partition".to_string(), partition.to_string())];
        self.next_offset.get_or_create(&labels).set(next_offset);
    }
}

/// Projects `chat.events` of `cfg.log` into `store` until `shutdown` fires,
/// then commits the consumed offsets, writes the last progress and returns.
/// Fails at start when the store is not migrated or Kafka / the registry /
/// the topics are missing.
pub async fn run_history(
    cfg: &HistoryConfig,
    store: Store,
    status: HistoryStatus,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let health = &status.health;
    health.not_ready("cassandra", "checking schema");
    health.not_ready("kafka", "connecting");
    store.require_migrated().await?;
    health.ready("cassandra");

    let topics = Topics::new(&cfg.log);
    let registry = Arc::new(SchemaRegistry::new(&cfg.log)?);
    registry.check_reachable().await?;
    let producer = EventProducer::connect(&cfg.log, registry).await?;
    let events = [topics.events.as_str()];
    let consumer =
        EventConsumer::connect(&cfg.log, &cfg.group_id, &events, producer, &topics.dlq).await?;
    health.ready("kafka");
    tracing::info!(group = %cfg.group_id, topic = %topics.events, keyspace = %store.keyspace(), "history projector consuming");

    let projector = Projector::new(store.clone());
    let progress = Arc::new(Progress::default());
    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(flush_progress(
        store,
        progress.clone(),
        status.clone(),
        flusher_stop.clone(),
    ));
    let stop = shutdown.token();
    let (p, pr, st, sd) = (&projector, &*progress, &status, &stop);
    let consumed = consumer
        .run(move |event| handle(p, pr, st, sd, event), stop.clone())
        .await;
    flusher_stop.cancel();
    flusher.await?;
    tracing::info!(
        events = status.events_projected(),
        "history projector stopped"
    );
    Ok(consumed?)
}

async fn handle(
    projector: &Projector,
    progress: &Progress,
    status: &HistoryStatus,
    stop: &CancellationToken,
    event: ConsumedEvent,
) -> Result<(), HandlerError> {
    let outcome = tokio::select! {
        r = projector.project(event.partition, event.offset, &event.envelope) => r,
        // Abandon a write stuck on a dead node: the event is re-read later.
        _ = stop.cancelled() => return Err(HandlerError::Retry("shutting down".into())),
    };
    let next = event.offset + 1;
    match outcome {
        Ok(projected) => {
            if let Projected::Written { markers } = projected {
                status.markers.inc_by(markers as u64);
            }
            status.health.ready("cassandra");
            status.done(event.partition, next);
            progress.record(event.partition, next);
            Ok(())
        }
        Err(ProjectError::Store(e)) => {
            status.retries.inc();
            status.health.not_ready("cassandra", e.to_string());
            if !e.retryable() {
                tracing::error!(error = %e, partition = event.partition, offset = event.offset, "store refuses a write; retrying until fixed");
            }
            Err(HandlerError::Retry(e.to_string()))
        }
        Err(e @ ProjectError::Malformed(_)) => {
            // Nothing to write for it: it counts as done once dead-lettered.
            status.dead_lettered.inc();
            status.done(event.partition, next);
            progress.record(event.partition, next);
            Err(HandlerError::DeadLetter(e.to_string()))
        }
    }
}

/// Positions whose writes are done, and those already in `projector_progress`.
#[derive(Debug, Default)]
struct Progress {
    done: Mutex<HashMap<i32, i64>>,
    written: Mutex<HashMap<i32, i64>>,
    wake: Notify,
}

impl Progress {
    fn record(&self, partition: i32, next_offset: i64) {
        if let Ok(mut done) = self.done.lock() {
            let at = done.entry(partition).or_insert(next_offset);
            *at = (*at).max(next_offset);
        }
        self.wake.notify_one();
    }

    /// Writes every position not written yet; true when all are written.
    async fn flush(&self, store: &Store, status: &HistoryStatus) -> bool {
        let pending: Vec<(i32, i64)> = {
            let done = self.done.lock().map(|d| d.clone()).unwrap_or_default();
            let written = self.written.lock().map(|w| w.clone()).unwrap_or_default();
            done.into_iter()
                .filter(|(p, o)| written.get(p).is_none_or(|w| w < o))
                .collect()
        };
        let mut clean = true;
        for (partition, next) in pending {
            match store.put_progress(HISTORY_PROJECTOR, partition, next).await {
                Ok(()) => {
                    if let Ok(mut w) = self.written.lock() {
                        w.insert(partition, next);
                    }
                }
                Err(e) => {
                    clean = false;
                    status.health.not_ready("cassandra", e.to_string());
                    tracing::warn!(error = %e, partition, "cannot write projector progress; retrying");
                }
            }
        }
        clean
    }
}

/// Writes progress as soon as an event is done, then at most every
/// [`PROGRESS_INTERVAL`]; a last time when `stop` fires.
async fn flush_progress(
    store: Store,
    progress: Arc<Progress>,
    status: HistoryStatus,
    stop: CancellationToken,
) {
    let mut clean = true;
    loop {
        if clean {
            tokio::select! {
                _ = progress.wake.notified() => {}
                _ = stop.cancelled() => break,
            }
        }
        clean = progress.flush(&store, &status).await;
        let pause = if clean {
            PROGRESS_INTERVAL
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => break,
        }
    }
    let last = tokio::time::timeout(FINAL_FLUSH_TIMEOUT, progress.flush(&store, &status)).await;
    if !matches!(last, Ok(true)) {
        tracing::warn!("last projector progress not written; the next run catches up");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: HistoryConfig = toml::from_str("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9101");
        assert_eq!(c.group_id, "history");
        assert!(toml::from_str::<HistoryConfig>("group = \"x\"").is_err());
        let c: HistoryConfig = toml::from_str("[store]\nkeyspace = \"k\"").unwrap();
        assert_eq!(c.store.keyspace, "k");
    }
}
