//! Consumer-group members that keep per-partition state built from the log:
//! the sequencer (state of the chats in a partition) and the delivery router
//! (membership of the chats in a partition).
//!
//! [`PartitionedConsumer`] hands out batches of one partition at a time and
//! marks the first batch after the partition was (re)assigned as `fresh`, so
//! the caller rebuilds that partition's state before using it. A caller that
//! fails to process a batch calls [`PartitionedConsumer::rewind`]: the
//! partition is read again from the batch's first offset and the next batch is
//! fresh again.
//!
//! **A record fetched is never dropped.** A record taken off the Kafka
//! consumer has moved the consumer's position past it; if it were lost, the
//! next batch of its partition would start after it and commit past it.
//! [`PartitionedConsumer::next_batch`] is therefore cancel-safe: a record
//! being decoded (which may wait on the registry: cold cache, restart, load)
//! and the records of a batch being collected live in the consumer, not in
//! the future, so a caller may drop the future in a `select!` (the
//! sequencer's failure reports, the presence service's expiry tick) and the
//! next call goes on from them. Its timeouts bound only the wait for a
//! message; a decode always completes (a registry that cannot be asked is
//! retried, never turned into an undecodable record).
//!
//! [`TxnProducer`] is a transactional producer for one input partition
//! (`transactional.id = <prefix>-<partition>`): its `init` fences any earlier
//! owner of that partition (a zombie after a rebalance or a paused process),
//! and [`TxnProducer::commit_batch`] appends the outputs and the input offset
//! atomically. That is how two writers never append to the same partition and
//! how a batch is applied exactly once.
//!
//! librdkafka's transactional calls block until the coordinator answers; they
//! run in `spawn_blocking`.

pub use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::consumer::{decode_fetched, Decoded, Fetched};
use crate::error::recv_through_transient;
use crate::producer::{envelope_headers, Produced};
use crate::topics::{base_client_config, check_brokers, check_topics_exist};
use crate::{ConsumedEvent, LogConfig, LogError, Outgoing, SchemaRegistry};

/// What runs when partitions are revoked, before the revocation completes.
type RevokeHook = Box<dyn Fn(&[i32]) + Send + Sync>;
/// What runs when partitions are assigned: `(partition, offset the member
/// starts from)` (the committed offset; 0 when the group has none).
type AssignHook = Box<dyn Fn(&[(i32, i64)]) + Send + Sync>;

/// Records rebalances so the consumer loop learns which partitions it lost.
#[derive(Default)]
struct Tracking {
    revoked: Mutex<HashSet<i32>>,
    /// Told at once (in the rebalance callback), so state about a lost
    /// partition stops being reported before another member takes it.
    on_revoke: Mutex<Option<RevokeHook>>,
    on_assign: Mutex<Option<AssignHook>>,
    /// The lag gauges, labelled with the consumer group.
    lag: crate::metrics::LagTracker,
}

impl ClientContext for Tracking {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.lag.report(&statistics);
    }
}

impl ConsumerContext for Tracking {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let lost: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            if let Ok(hook) = self.on_revoke.lock() {
                if let Some(hook) = hook.as_ref() {
                    hook(&lost);
                }
            }
            if let Ok(mut r) = self.revoked.lock() {
                r.extend(lost);
            }
            tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions revoked");
        }
    }
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions assigned");
            let Ok(hook) = self.on_assign.lock() else {
                return;
            };
            let Some(hook) = hook.as_ref() else { return };
            // Where this member starts each partition: the committed offset
            // (auto.offset.reset is earliest, so none means 0). Blocks the
            // rebalance for one round trip to the group coordinator.
            let committed = consumer.committed_offsets((*tpl).clone(), Duration::from_secs(10));
            let Ok(committed) = committed else {
                tracing::warn!("committed offsets of assigned partitions unknown");
                return;
            };
            let starts: Vec<(i32, i64)> = committed
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => (e.partition(), o),
                    _ => (e.partition(), 0),
                })
                .collect();
            hook(&starts);
        }
    }
}

/// One record of a batch: decoded, or not (the caller dead-letters it).
#[derive(Clone, Debug)]
pub enum BatchRecord {
    Event(Box<ConsumedEvent>),
    Undecodable {
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        /// The record's headers (kept on its dead letter).
        headers: Vec<(String, Vec<u8>)>,
        error: String,
    },
}

impl BatchRecord {
    pub fn offset(&self) -> i64 {
        match self {
            BatchRecord::Event(e) => e.offset,
            BatchRecord::Undecodable { offset, .. } => *offset,
        }
    }
}

/// Records of one partition, in offset order.
#[derive(Debug)]
pub struct Batch {
    pub partition: i32,
    /// First batch since this member (re)gained the partition, or since a
    /// rewind: the caller must (re)build the partition's state first.
    pub fresh: bool,
    pub records: Vec<BatchRecord>,
}

impl Batch {
    pub fn first_offset(&self) -> i64 {
        self.records.first().map_or(0, BatchRecord::offset)
    }
    /// The offset after the batch (what to commit).
    pub fn next_offset(&self) -> i64 {
        self.records.last().map_or(0, |r| r.offset() + 1)
    }
}

/// A consumer-group member that hands out per-partition batches.
pub struct PartitionedConsumer {
    consumer: Arc<StreamConsumer<Tracking>>,
    registry: Arc<SchemaRegistry>,
    topic: String,
    /// Partitions whose state the caller holds (a batch was handed out since assignment).
    warm: HashSet<i32>,
    /// Records decoded but not handed out yet, with their partitions, in
    /// fetch order: the batch being collected and read-ahead records of
    /// other partitions. Kept here, not in a future, so a cancelled
    /// [`next_batch`](Self::next_batch) loses none of them.
    pending: VecDeque<(i32, BatchRecord)>,
    /// A record taken off the consumer whose decode has not completed (a
    /// cancelled call left it): decoded first by the next call.
    fetched: Option<Fetched>,
}

impl std::fmt::Debug for PartitionedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedConsumer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl PartitionedConsumer {
    /// Joins `group_id` on `topic`. Transactional outputs are read committed;
    /// offsets are never auto-committed (the caller commits them, in a
    /// transaction or with [`commit_offset`](Self::commit_offset)).
    pub async fn connect(
        config: &LogConfig,
        registry: Arc<SchemaRegistry>,
        group_id: &str,
        topic: &str,
    ) -> Result<Self, LogError> {
        check_brokers(config).await?;
        check_topics_exist(config, &[topic.to_string()]).await?;
        let mut client = base_client_config(config);
        client
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
            .set("fetch.min.bytes", config.fetch_min_bytes.to_string())
            // Incremental rebalances: a member joining or leaving moves only
            // the partitions that change owner; the others keep their state
            // and are not revoked.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", "1000")
            .set(
                "statistics.interval.ms",
                crate::metrics::STATS_INTERVAL_MS.to_string(),
            );
        if !config.group_instance_id.is_empty() {
            client.set("group.instance.id", &config.group_instance_id);
        }
        let consumer: StreamConsumer<Tracking> = client.create_with_context(Tracking {
            lag: crate::metrics::LagTracker::new(group_id),
            ..Tracking::default()
        })?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer: Arc::new(consumer),
            registry,
            topic: topic.to_string(),
            warm: HashSet::new(),
            pending: VecDeque::new(),
            fetched: None,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group's metadata, for [`TxnProducer::commit_batch`].
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// Calls `hook` with the partitions this member is assigned and the
    /// offset it starts each from, inside the rebalance.
    pub fn on_assign(&self, hook: impl Fn(&[(i32, i64)]) + Send + Sync + 'static) {
        if let Ok(mut h) = self.consumer.context().on_assign.lock() {
            *h = Some(Box::new(hook));
        }
    }

    /// Calls `hook` with the partitions this member loses, inside the
    /// rebalance (before another member can be assigned them).
    pub fn on_revoke(&self, hook: impl Fn(&[i32]) + Send + Sync + 'static) {
        if let Ok(mut h) = self.consumer.context().on_revoke.lock() {
            *h = Some(Box::new(hook));
        }
    }

    fn forget_revoked(&mut self) {
        let revoked: Vec<i32> = match self.consumer.context().revoked.lock() {
            Ok(mut r) => r.drain().collect(),
            Err(_) => Vec::new(),
        };
        for p in revoked {
            self.warm.remove(&p);
            self.drop_pending(p);
        }
    }

    fn drop_pending(&mut self, partition: i32) {
        self.pending.retain(|(p, _)| *p != partition);
        if self
            .fetched
            .as_ref()
            .is_some_and(|f| f.partition == partition)
        {
            self.fetched = None;
        }
    }

    /// Takes the next record off the consumer (waiting at most `wait`),
    /// decodes it and queues it in `pending`. False when nothing arrived.
    ///
    /// Cancel-safe: the wait owns nothing; a fetched record is kept in
    /// `self.fetched` until its decode completed and it is queued (no await in
    /// between), so dropping this future never loses a record.
    async fn fill(&mut self, wait: Duration) -> Result<bool, LogError> {
        if self.fetched.is_none() {
            let msg = match tokio::time::timeout(wait, recv_through_transient(&self.consumer)).await
            {
                Ok(m) => m?,
                Err(_) => return Ok(false),
            };
            self.fetched = Some(Fetched::of(&msg));
        }
        let Some(f) = self.fetched.as_ref() else {
            return Ok(false);
        };
        let record = match decode_fetched(&self.registry, f, None).await {
            Decoded::Event(e) => BatchRecord::Event(e),
            Decoded::Undecodable(error) => BatchRecord::Undecodable {
                offset: f.offset,
                key: f.key.clone(),
                payload: f.payload.clone(),
                headers: f.headers.clone(),
                error,
            },
            // Only a decode given a shutdown token stops.
            Decoded::Stopped => return Ok(false),
        };
        let partition = f.partition;
        self.fetched = None;
        self.pending.push_back((partition, record));
        Ok(true)
    }

    fn pending_of(&self, partition: i32) -> usize {
        self.pending.iter().filter(|(p, _)| *p == partition).count()
    }

    /// The next batch: records of one partition, up to `max`, collected for at
    /// most `linger` after the first one arrived. None when shutdown fired.
    ///
    /// Cancel-safe: records fetched and not yet handed out stay in this
    /// consumer (see `fill`), so a caller may drop the future
    /// (a `select!` with another branch) and call again without a gap.
    pub async fn next_batch(
        &mut self,
        max: usize,
        linger: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<Batch>, LogError> {
        let max = max.max(1);
        self.forget_revoked();
        // Start with read-ahead records, else wait for one.
        while self.pending.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = self.fill(Duration::from_millis(500)) => {
                    r?;
                    self.forget_revoked();
                }
            }
        }
        let Some(&(partition, _)) = self.pending.front() else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + linger;
        while self.pending_of(partition) < max {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.fill(left).await? {
                break;
            }
        }
        // No await from here on: the batch leaves `pending` whole.
        let mut records = Vec::new();
        let mut rest = VecDeque::with_capacity(self.pending.len());
        for (p, r) in self.pending.drain(..) {
            if p == partition && records.len() < max {
                records.push(r);
            } else {
                rest.push_back((p, r));
            }
        }
        self.pending = rest;
        let fresh = self.warm.insert(partition);
        Ok(Some(Batch {
            partition,
            fresh,
            records,
        }))
    }

    /// Reads `partition` again from `offset`; the next batch of it is fresh.
    /// A partition this member lost meanwhile (a rebalance: the usual reason a
    /// transaction failed) cannot be sought; that is not an error, its new
    /// owner resumes from the committed offset.
    /// The group's committed offset of `partition` (the next record to
    /// process), or None when nothing was committed yet.
    pub async fn committed_offset(&self, partition: i32) -> Result<Option<i64>, LogError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        // committed_offsets blocks until the group coordinator answers.
        let committed = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            consumer.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|e| LogError::Config(e.to_string()))??;
        Ok(committed.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }))
    }

    pub async fn rewind(&mut self, partition: i32, offset: i64) -> Result<(), LogError> {
        self.warm.remove(&partition);
        self.drop_pending(partition);
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        // seek blocks until the fetcher accepted the new position.
        let sought = tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .await
        .map_err(|e| LogError::Config(e.to_string()))?;
        if let Err(e) = sought {
            let still_ours = self
                .consumer
                .assignment()
                .map(|a| a.find_partition(&self.topic, partition).is_some())
                .unwrap_or(true);
            if still_ours {
                // Going on would skip the batch: stop instead; a restart
                // resumes from the committed offset.
                return Err(LogError::Kafka(e));
            }
            tracing::info!(partition, offset, error = %e, "not rewound: the partition is not assigned here any more");
        }
        Ok(())
    }

    /// Whether `partition` is assigned to this member now.
    pub fn owns(&self, partition: i32) -> bool {
        self.consumer
            .assignment()
            .map(|a| a.find_partition(&self.topic, partition).is_some())
            .unwrap_or(true)
    }

    /// The high watermark of `partition` as the broker says it now (the
    /// offset the next record will get). Blocks a worker thread for up to
    /// `timeout`.
    pub async fn high_watermark(&self, partition: i32, timeout: Duration) -> Result<i64, LogError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition, timeout))
            .await
            .map_err(|e| LogError::Config(e.to_string()))?
            .map(|(_, high)| high)
            .map_err(LogError::Kafka)
    }

    /// Queues a commit of `next_offset` for `partition` without waiting for
    /// the coordinator (for at-least-once callers on the hot path: a crash
    /// re-reads at most the last few batches).
    pub fn commit_offset_async(&self, partition: i32, next_offset: i64) -> Result<(), LogError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset))?;
        self.consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Async)
            .map_err(LogError::Kafka)
    }

    /// Commits `next_offset` for `partition` (for callers without transactions).
    pub async fn commit_offset(&self, partition: i32, next_offset: i64) -> Result<(), LogError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset))?;
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        })
        .await
        .map_err(|e| LogError::Config(e.to_string()))?
        .map_err(LogError::Kafka)
    }
}

/// One record to append in a transaction.
#[derive(Debug)]
pub enum OutRecord {
    Envelope(Box<Outgoing>),
    /// Bytes kept as they were (dead-lettering), with headers.
    Raw {
        topic: String,
        /// `None`: the producer's partitioner picks (by key).
        partition: Option<i32>,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    },
}

/// Why a transactional commit failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Another owner took over the partition (or the transaction could not
    /// complete): nothing of the batch is visible; rebuild and retry.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The transactional producer of one input partition.
pub struct TxnProducer {
    inner: FutureProducer,
    registry: Arc<SchemaRegistry>,
    input_topic: String,
    partition: i32,
}

impl std::fmt::Debug for TxnProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnProducer")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

impl TxnProducer {
    /// Creates the producer `<prefix>-<partition>` and fences earlier owners.
    pub async fn init(
        config: &LogConfig,
        registry: Arc<SchemaRegistry>,
        transactional_prefix: &str,
        input_topic: &str,
        partition: i32,
    ) -> Result<Self, LogError> {
        let inner: FutureProducer = base_client_config(config)
            .set(
                "transactional.id",
                format!("{transactional_prefix}-{partition}"),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.txn_linger_ms.to_string())
            .set("transaction.timeout.ms", "60000")
            // A record the new leader never acknowledges (a broker killed
            // mid-request) fails after 10 s instead of librdkafka's default
            // 300 s: the batch then aborts and is redone, instead of the
            // partition standing still until the group evicts this member
            // (measured with a SIGKILLed leader: 331 s without it).
            .set("message.timeout.ms", "10000")
            // A transaction begun right after the previous commit is refused
            // with CONCURRENT_TRANSACTIONS until the broker wrote the markers
            // (a few ms); with the default 100 ms backoff every batch would
            // wait 100 ms. Measured: batch commit p50 106 ms -> see README.
            .set("retry.backoff.ms", "2")
            .set("retry.backoff.max.ms", "50")
            .create()?;
        let p = inner.clone();
        // init_transactions blocks until the coordinator fenced the older producer.
        tokio::task::spawn_blocking(move || p.init_transactions(TXN_TIMEOUT))
            .await
            .map_err(|e| LogError::Config(e.to_string()))??;
        Ok(Self {
            inner,
            registry,
            input_topic: input_topic.to_string(),
            partition,
        })
    }

    /// Appends `outputs`, then what `then` makes of their positions, and
    /// commits the input offset `next_offset`, all in one transaction.
    /// Returns the positions of `outputs`.
    ///
    /// The two phases let the second carry the offsets of the first (the
    /// sequencer's `CommandResult`s name the offsets of their events) at the
    /// cost of one more produce round trip inside the transaction.
    pub async fn commit_batch(
        &self,
        outputs: Vec<OutRecord>,
        then: impl FnOnce(&[Produced]) -> Vec<OutRecord>,
        next_offset: i64,
        group: ConsumerGroupMetadata,
    ) -> Result<Vec<Produced>, TxnError> {
        // Encode first (may ask the registry) so nothing awaits the registry
        // while the transaction is open.
        let first = self.encode(outputs).await?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.input_topic,
            self.partition,
            Offset::Offset(next_offset),
        )
        .map_err(LogError::Kafka)?;
        let p = self.inner.clone();
        let positions = tokio::task::spawn_blocking(move || -> Result<Vec<Produced>, String> {
            p.begin_transaction().map_err(|e| e.to_string())?;
            send_all(&p, &first)
        })
        .await
        .map_err(|e| TxnError::Aborted(e.to_string()))?
        .map_err(TxnError::Aborted)?;
        // Encoding the second phase normally hits the schema cache; if it
        // fails, nothing of the batch may stay.
        let second = match self.encode(then(&positions)).await {
            Ok(s) => s,
            Err(e) => {
                let p = self.inner.clone();
                let _ = tokio::task::spawn_blocking(move || p.abort_transaction(TXN_TIMEOUT)).await;
                return Err(e);
            }
        };
        let p = self.inner.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), String> {
            send_all(&p, &second)?;
            let commit = p
                .send_offsets_to_transaction(&tpl, &group, TXN_TIMEOUT)
                .and_then(|_| p.commit_transaction(TXN_TIMEOUT));
            if let Err(e) = commit {
                let _ = p.abort_transaction(TXN_TIMEOUT);
                return Err(e.to_string());
            }
            Ok(())
        })
        .await
        .map_err(|e| TxnError::Aborted(e.to_string()))?;
        done.map_err(TxnError::Aborted)?;
        Ok(positions)
    }

    /// Fault injection for tests: appends `outputs` in a transaction and
    /// leaves it open, as a process killed in the middle of a batch does.
    /// Until [`Self::abort`] (or the transaction timeout), read-committed
    /// consumers of the partitions it touched see nothing past its records.
    pub async fn append_uncommitted(
        &self,
        outputs: Vec<OutRecord>,
    ) -> Result<Vec<Produced>, TxnError> {
        let records = self.encode(outputs).await?;
        let p = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<Produced>, String> {
            p.begin_transaction().map_err(|e| e.to_string())?;
            send_all(&p, &records)
        })
        .await
        .map_err(|e| TxnError::Aborted(e.to_string()))?
        .map_err(TxnError::Aborted)
    }

    /// Aborts the open transaction, if any.
    pub async fn abort(&self) -> Result<(), TxnError> {
        let p = self.inner.clone();
        tokio::task::spawn_blocking(move || p.abort_transaction(TXN_TIMEOUT))
            .await
            .map_err(|e| TxnError::Aborted(e.to_string()))?
            .map_err(|e| TxnError::Aborted(e.to_string()))
    }

    async fn encode(&self, outputs: Vec<OutRecord>) -> Result<Vec<Encoded>, TxnError> {
        let mut encoded = Vec::with_capacity(outputs.len());
        for out in outputs {
            encoded.push(match out {
                OutRecord::Envelope(out) => {
                    let Outgoing {
                        topic,
                        partition,
                        key,
                        envelope,
                        headers,
                    } = *out;
                    let payload = self.registry.encode(&topic, &envelope).await?;
                    let extra: Vec<(&str, &[u8])> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_slice()))
                        .collect();
                    let h = envelope_headers(&envelope, &extra);
                    (topic, partition, Some(key.into_bytes()), payload, h)
                }
                OutRecord::Raw {
                    topic,
                    partition,
                    key,
                    payload,
                    headers,
                } => {
                    let mut h = rdkafka::message::OwnedHeaders::new();
                    for (k, v) in &headers {
                        h = h.insert(rdkafka::message::Header {
                            key: k,
                            value: Some(v),
                        });
                    }
                    (topic, partition, key, payload, h)
                }
            });
        }
        Ok(encoded)
    }
}

/// A record ready to produce: topic, partition, key, payload, headers.
type Encoded = (
    String,
    Option<i32>,
    Option<Vec<u8>>,
    Vec<u8>,
    rdkafka::message::OwnedHeaders,
);

/// Produces `records` in the open transaction and waits for every
/// acknowledgement (blocking: call from `spawn_blocking`); aborts the
/// transaction on a failure. rust-rdkafka's commit flushes first, and a
/// flush that finds records in flight polls for up to 100 ms (measured:
/// every batch took ~105 ms before waiting here; now a few ms).
fn send_all(p: &FutureProducer, records: &[Encoded]) -> Result<Vec<Produced>, String> {
    let mut deliveries = Vec::with_capacity(records.len());
    for (topic, partition, key, payload, headers) in records {
        let mut rec = FutureRecord::to(topic)
            .payload(payload)
            .headers(headers.clone());
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(part) = partition {
            rec = rec.partition(*part);
        }
        match p.send_result(rec) {
            Ok(d) => deliveries.push(d),
            Err((e, _)) => {
                let _ = p.abort_transaction(TXN_TIMEOUT);
                return Err(e.to_string());
            }
        }
    }
    let mut positions = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        match futures::executor::block_on(d) {
            Ok(Ok(delivery)) => positions.push(Produced {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Err((e, _))) => {
                let _ = p.abort_transaction(TXN_TIMEOUT);
                return Err(e.to_string());
            }
            Err(_) => {
                let _ = p.abort_transaction(TXN_TIMEOUT);
                return Err("producer dropped a delivery".into());
            }
        }
    }
    Ok(positions)
}
