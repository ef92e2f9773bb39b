//! The history projector: `chat.events` -> `messages`, `chats`,
//! `chat_members`, `user_chats`, `direct_chats`, `user_changes`, and its
//! position in `projector_progress`.
//!
//! # Contract
//!
//! - **At-least-once, offsets after writes.** It consumes `chat.events` in
//!   consumer group `group_id` through [`chat_log::EventConsumer::run_batches`]:
//!   a batch is every record already fetched (up to `batch_max_events`), and
//!   its offsets are stored only after every write of every event of the
//!   batch is done. Each partition's events of a batch go to
//!   [`Projector::project_batch`] in log order; the partitions of a batch run
//!   concurrently. A Cassandra failure offers the same events of that
//!   partition again after a backoff (the others go on); nothing is
//!   skipped. A crash re-reads from the last committed offset.
//! - **Batched writes.** A partition's batch is folded in log order into a
//!   list of writes (where only the last one counts: `chats.last_seq` and a
//!   read pointer per user and chat, the highest seq of the batch), written
//!   by [`crate::store::Store::apply`]: statements grouped by Cassandra
//!   partition key into unlogged batches (one mutation each), prepared,
//!   token-aware, `write_concurrency` requests in flight per partition.
//!   Rows and `user_changes` markers go together (a user's read pointers
//!   and markers share a mutation; measured ~20% faster than markers in a
//!   second round): a marker may be visible a moment before the rows of
//!   its event. Harmless: sync relies on markers and rows only for events
//!   before its read barrier (`projector_progress`, which claims a batch
//!   only when all of its writes are done); a later event reaches the
//!   connection live, with the gap fill behind it.
//! - **Idempotent.** Every write is keyed by the event (`messages` by
//!   `(chat, seq)`) or carries `USING TIMESTAMP <seq>` (`chats`,
//!   `chat_members`, `user_chats`, `direct_chats`; the read pointer uses
//!   `up_to_seq`), so replaying the log, whole or from any offset, in order,
//!   in any batching, leaves the same rows and never moves state back: a
//!   replayed `MemberAdded` loses to the later removal's tombstone,
//!   `chats.last_seq` and `user_chats.last_read_seq` only grow. Projecting
//!   the log from offset 0 into an empty keyspace gives the same content as
//!   the live projector.
//! - **Progress.** When a partition's batch is written (every write of
//!   every event in it, and of every earlier event of the partition, since
//!   a partition's batches are written one after the other),
//!   `next_offset = last offset of the batch + 1` is recorded in memory, and
//!   a background task writes it to `projector_progress` (row
//!   [`HISTORY_PROJECTOR`]) at once, then at most every 50 ms while events
//!   keep coming, with `USING TIMESTAMP next_offset` (never moves back). So
//!   a stored `next_offset` never claims an event whose writes are not done
//!   (unit test `a_batch_claims_progress_only_when_all_its_writes_are_done`).
//!   The last record of a partition that could not be decoded
//!   (dead-lettered by the consumer without reaching the projector) is not
//!   counted until the next record of that partition arrives.
//!
//! # Reconnect sync: `user_changes`
//!
//! Markers are bucketed: `B` = [`crate::store::CHANGE_BUCKET_MS`] (60 s, one
//! constant for the projector that writes and the gateway's query that
//! reads, in `projectors/src/store`), `bucket(t) = floor(t / B) * B`. For
//! every sequenced event of chat C at `sequenced_ts` t, each member of C
//! after the event (and, for `MemberRemoved`, the removed user) has a row
//! `(user, changed_at = bucket(t), C)`. Written: every member when the
//! chat's previous projected event was in another bucket (or is unknown:
//! after a start, an eviction, a gap), remembered in the per-chat cache;
//! users whose membership the event changes always; each (user, chat,
//! bucket) once per batch. So a chat costs one row per member per bucket
//! in which it got events (at most one per member per minute, whatever the
//! message rate), not one per member per second. A restart forgets the
//! cache and writes the same rows again (idempotent; the table's 30-day TTL
//! applies as before).
//!
//! Why `changed_at >= bucket(T)` finds every chat changed since T for a
//! user u: take an event e of C at t ≥ T that u should see. If every member
//! was marked for e, or u's membership changed with e, u has the row
//! `(u, bucket(t), C)`. Otherwise the previous event of C was in bucket(t)
//! too, and so were all events back to the last one that marked every
//! member, m (the cache's bucket follows every event, and is cleared
//! whenever the cache is); u was either a member at m (marked then, with
//! `changed_at = bucket(t)`) or joined by an event between m and e, which
//! marked u with the same bucket. bucket is monotonic, so
//! `bucket(t) >= bucket(T)` and the query `changed_at >= bucket(T)` (in
//! [`crate::store::Store::changed_chats_since`]) returns C. It reads only
//! u's partition from `bucket(T)` on: its cost grows with the chats changed
//! since T (plus those changed in the bucket before T), not with the number
//! of chats u is in. The extra chats (changed in `[bucket(T), T)`) are
//! harmless: the gateway's sync asks for each chat's events after the seq
//! the client names, or for a chat the client does not name the newest
//! `sync_bootstrap_events`, which the client deduplicates by (chat, seq).
//!
//! Membership comes from a per-chat cache kept from the events themselves and
//! filled from `chat_members` on a miss (see [`Projector`] on why that is
//! consistent).

mod project;

pub use project::{body_json, ProjectError, Projected, Projector, Sink, StoreSink};

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
use std::collections::BTreeMap;
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
    /// Records per batch at most (all partitions together): a batch is
    /// whatever is already fetched, so under a light load it is one or a few
    /// events and under a backlog (a rebuild) up to this many.
    pub batch_max_events: usize,
    /// Cassandra requests in flight per partition of a batch.
    pub write_concurrency: usize,
}

impl chat_runtime::ServiceConfig for HistoryConfig {
    fn log_format(&self) -> chat_runtime::telemetry::LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()?;
        if self.batch_max_events == 0 || self.write_concurrency == 0 {
            return Err("batch_max_events and write_concurrency must be at least 1".into());
        }
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
            batch_max_events: 5_000,
            write_concurrency: 16,
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
  batch_max_events      records per batch at most (all partitions)  [5000]
  write_concurrency     Cassandra requests in flight per partition  [16]
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
  log.linger_ms         producer linger.ms (dead-letter writes)     [0]
  log.fetch_wait_max_ms consumer fetch.wait.max.ms                  [5]
  log.connect_timeout_ms start-up reachability timeout              [5000]
  store.nodes           Cassandra contact points                    [127.0.0.1:9042]
  store.keyspace        keyspace of every table                     [chat]
  store.keyspace_alias  follow this alias instead of store.keyspace (chat-admin switch) [unset]
  store.control_keyspace keyspace of keyspace_aliases              [chat_control]
  store.alias_poll_ms   how often the alias is read                 [1000]
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
    lag_seconds: Family<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>,
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
        registry.register(
            "projection_lag_seconds",
            "per chat.events partition, how old the newest event of the last projected batch was when its writes were done (now - its sequenced_ts); an idle partition keeps its last value",
            self.lag_seconds.clone(),
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

    fn done(&self, partition: i32, next_offset: i64, events: u64) {
        self.events.inc_by(events);
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

    let projector = Projector::new(store.clone(), cfg.write_concurrency);
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
        .run_batches(
            cfg.batch_max_events,
            move |batch| handle_batch(p, pr, st, sd, batch),
            stop.clone(),
        )
        .await;
    flusher_stop.cancel();
    flusher.await?;
    tracing::info!(
        events = status.events_projected(),
        "history projector stopped"
    );
    Ok(consumed?)
}

/// Projects one batch: each partition's events (in log order) as one
/// [`Projector::project_batch`], partitions concurrently. A partition whose
/// writes fail is offered again after a backoff (never skipped) while the
/// others go on; a partition's progress is recorded as soon as its writes
/// are all done. Returns the records to dead-letter.
async fn handle_batch(
    projector: &Projector,
    progress: &Progress,
    status: &HistoryStatus,
    stop: &CancellationToken,
    batch: Arc<Vec<ConsumedEvent>>,
) -> Result<Vec<(usize, String)>, HandlerError> {
    let mut partitions: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, e) in batch.iter().enumerate() {
        partitions.entry(e.partition).or_default().push(i);
    }
    let batch = &batch;
    let results = futures::future::join_all(partitions.into_iter().map(|(partition, indices)| {
        project_partition(projector, progress, status, stop, batch, partition, indices)
    }))
    .await;
    let mut dead = Vec::new();
    for r in results {
        dead.extend(r?);
    }
    Ok(dead)
}

async fn project_partition(
    projector: &Projector,
    progress: &Progress,
    status: &HistoryStatus,
    stop: &CancellationToken,
    batch: &[ConsumedEvent],
    partition: i32,
    indices: Vec<usize>,
) -> Result<Vec<(usize, String)>, HandlerError> {
    let events: Vec<(i64, &chat_schemas::Envelope)> = indices
        .iter()
        .map(|&i| (batch[i].offset, &batch[i].envelope))
        .collect();
    let mut backoff = Duration::from_millis(50);
    loop {
        let outcome = tokio::select! {
            r = projector.project_batch(partition, &events) => r,
            // Abandon a write stuck on a dead node: the events are re-read later.
            _ = stop.cancelled() => return Err(HandlerError::Retry("shutting down".into())),
        };
        match outcome {
            Ok(done) => {
                status.markers.inc_by(done.markers as u64);
                status.dead_lettered.inc_by(done.malformed.len() as u64);
                status.health.ready("cassandra");
                status.done(partition, done.next_offset, done.events as u64);
                if let Some(ts) = events
                    .iter()
                    .rev()
                    .find_map(|(_, e)| e.sequenced_ts.or(Some(e.server_ts)))
                {
                    let labels = vec![("partition".to_string(), partition.to_string())];
                    let age = (chat_runtime::now_ms() - ts).max(0) as f64 / 1000.0;
                    status.lag_seconds.get_or_create(&labels).set(age);
                }
                // Malformed events have nothing to write: they count as done.
                progress.record(partition, done.next_offset);
                let dead = done
                    .malformed
                    .into_iter()
                    .filter_map(|(offset, why)| {
                        let at = events.iter().position(|(o, _)| *o == offset)?;
                        Some((indices[at], why))
                    })
                    .collect();
                return Ok(dead);
            }
            Err(e) => {
                status.retries.inc();
                status.health.not_ready("cassandra", e.to_string());
                if e.retryable() {
                    tracing::warn!(error = %e, partition, offset = events[0].0, events = events.len(), "store write failed; retrying the batch");
                } else {
                    tracing::error!(error = %e, partition, offset = events[0].0, "store refuses a write; retrying until fixed");
                }
                let pause = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return Err(HandlerError::Retry("shutting down".into())),
                }
            }
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
