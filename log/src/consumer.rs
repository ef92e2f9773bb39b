//! The typed consumer: decodes each record into an [`Envelope`], hands it to
//! a handler, and stores the record's offset only after the handler
//! succeeded. Stored offsets are committed every second and on shutdown, so
//! a crash re-reads from the last stored offset: nothing is lost, a few
//! records may be seen twice (handlers are idempotent).
//!
//! A record that cannot be decoded (not Confluent-framed, unknown schema id,
//! wrong shape) goes to the dead-letter topic with its origin in headers
//! (`dlq.topic`, `dlq.partition`, `dlq.offset`, `dlq.error`), then its offset
//! is stored and the consumer goes on.

use chat_schemas::Envelope;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::dlq::redriven_elsewhere;
use crate::error::recv_through_transient;
use crate::metrics::{LagContext, STATS_INTERVAL_MS};
use crate::registry::DecodeFailure;
use crate::topics::{base_client_config, check_brokers};
use crate::{EventProducer, LogConfig, LogError, SchemaRegistry, HEADER_TRACE_ID};

/// One decoded record and where it came from.
#[derive(Clone, Debug)]
pub struct ConsumedEvent {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The trace id from the Kafka header (falls back to the envelope's).
    pub trace_id: String,
    /// The registry id of the writer schema.
    pub schema_id: u32,
    /// Every Kafka header of the record, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub envelope: Envelope,
}

impl ConsumedEvent {
    /// The first header named `key`, as UTF-8 (lossy).
    pub fn header(&self, key: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The raw value of header `key`, if present.
    pub fn header_bytes(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// Every header of a message, owned.
pub(crate) fn owned_headers<M: Message>(msg: &M) -> Vec<(String, Vec<u8>)> {
    msg.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// A record taken off a consumer, owned, so the message is released before
/// the (possibly waiting) decode.
#[derive(Default)]
pub(crate) struct Fetched {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) payload: Vec<u8>,
}

impl Fetched {
    pub(crate) fn of<M: Message>(msg: &M) -> Self {
        Self {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            headers: owned_headers(msg),
            payload: msg.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// What decoding a fetched record gave.
pub(crate) enum Decoded {
    Event(Box<ConsumedEvent>),
    /// Not a valid envelope for any schema we can read: the reason.
    Undecodable(String),
    /// Shutdown fired while the registry was unreachable.
    Stopped,
}

/// Decodes `f`, waiting out registry outages with a capped backoff (and, when
/// given, until `shutdown` fires). Every consumer of the crate decodes here.
pub(crate) async fn decode_fetched(
    registry: &SchemaRegistry,
    f: &Fetched,
    shutdown: Option<&CancellationToken>,
) -> Decoded {
    let mut backoff = Duration::from_millis(50);
    loop {
        match registry.decode(&f.payload).await {
            Ok((schema_id, envelope)) => {
                let trace_id = f
                    .headers
                    .iter()
                    .find(|(k, _)| k == HEADER_TRACE_ID)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_else(|| envelope.trace_id.clone());
                return Decoded::Event(Box::new(ConsumedEvent {
                    topic: f.topic.clone(),
                    partition: f.partition,
                    offset: f.offset,
                    key: f.key.clone(),
                    trace_id,
                    schema_id,
                    headers: f.headers.clone(),
                    envelope,
                }));
            }
            Err(DecodeFailure::Permanent(why)) => return Decoded::Undecodable(why),
            Err(DecodeFailure::Transient(e)) => {
                tracing::warn!(error = %e, "registry unavailable while decoding; retrying");
                let never = CancellationToken::new();
                if sleep_or_shutdown(&mut backoff, shutdown.unwrap_or(&never)).await {
                    return Decoded::Stopped;
                }
            }
        }
    }
}

/// What a handler says about a record it could not process.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A transient failure (store down, timeout): the same record is offered
    /// again after a backoff; its offset is not stored.
    #[error("retry: {0}")]
    Retry(String),
    /// The record can never be processed: it goes to the dead-letter topic and
    /// the consumer goes on.
    #[error("dead-letter: {0}")]
    DeadLetter(String),
    /// Stop consuming now, without storing this record's offset (the next
    /// owner of the partition starts again at this record).
    #[error("fatal: {0}")]
    Fatal(String),
}

/// A consumer-group member reading envelopes from one or more topics.
pub struct EventConsumer {
    inner: Arc<StreamConsumer<LagContext>>,
    producer: EventProducer,
    dlq_topic: String,
    group: String,
}

impl std::fmt::Debug for EventConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventConsumer")
            .field("dlq_topic", &self.dlq_topic)
            .finish_non_exhaustive()
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl EventConsumer {
    /// Joins `group_id` and subscribes to `topics`. The producer is used for
    /// dead-lettering and shares the registry client.
    pub async fn connect(
        config: &LogConfig,
        group_id: &str,
        topics: &[&str],
        producer: EventProducer,
        dlq_topic: &str,
    ) -> Result<Self, LogError> {
        check_brokers(config).await?;
        let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        crate::topics::check_topics_exist(config, &names).await?;
        let inner: StreamConsumer<LagContext> = base_client_config(config)
            .set("group.id", group_id)
            .set("statistics.interval.ms", STATS_INTERVAL_MS.to_string())
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored by us, after the handler succeeded.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
            .set("fetch.min.bytes", config.fetch_min_bytes.to_string())
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(LagContext::new(group_id))?;
        inner.subscribe(topics)?;
        Ok(Self {
            inner: Arc::new(inner),
            producer,
            dlq_topic: dlq_topic.to_string(),
            group: group_id.to_string(),
        })
    }

    /// Consumes until `shutdown` fires or the handler returns
    /// [`HandlerError::Fatal`]; then commits the stored offsets and returns.
    pub async fn run<F, Fut>(
        &self,
        mut handler: F,
        shutdown: CancellationToken,
    ) -> Result<(), LogError>
    where
        F: FnMut(ConsumedEvent) -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        let result = self.consume_loop(&mut handler, &shutdown).await;
        self.commit().await;
        result
    }

    async fn consume_loop<F, Fut>(
        &self,
        handler: &mut F,
        shutdown: &CancellationToken,
    ) -> Result<(), LogError>
    where
        F: FnMut(ConsumedEvent) -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = recv_through_transient(&self.inner) => m?,
            };
            let f = Fetched::of(&msg);
            drop(msg);
            if redriven_elsewhere(&f.headers, &self.group) {
                self.inner.store_offset(&f.topic, f.partition, f.offset)?;
                continue;
            }
            let (topic, partition, offset) = (f.topic.clone(), f.partition, f.offset);
            let event = match decode_fetched(self.producer.registry(), &f, Some(shutdown)).await {
                Decoded::Event(e) => Some(*e),
                Decoded::Undecodable(why) => {
                    self.dead_letter_fetched(&f, &why).await?;
                    None
                }
                Decoded::Stopped => return Ok(()),
            };

            if let Some(event) = event {
                let mut backoff = Duration::from_millis(50);
                loop {
                    match handler(event.clone()).await {
                        Ok(()) => break,
                        Err(HandlerError::Retry(why)) => {
                            tracing::warn!(%topic, partition, offset, %why, "handler asked to retry");
                            if sleep_or_shutdown(&mut backoff, shutdown).await {
                                return Ok(());
                            }
                        }
                        Err(HandlerError::DeadLetter(why)) => {
                            self.dead_letter_fetched(&f, &why).await?;
                            break;
                        }
                        Err(HandlerError::Fatal(why)) => {
                            return Err(LogError::Config(format!(
                                "handler stopped at {topic}[{partition}]@{offset}: {why}"
                            )))
                        }
                    }
                }
            }
            self.inner.store_offset(&topic, partition, offset)?;
        }
    }

    /// Like [`run`](Self::run), but hands the handler batches: every record
    /// already fetched (up to `max_batch`, several partitions, each
    /// partition's records in log order; waiting only for the first). The
    /// batch's offsets are stored only after the handler succeeded for the
    /// whole batch. `Ok` names the records (indices into the batch) to
    /// dead-letter; [`HandlerError::Retry`] offers the same batch again
    /// after a backoff; [`HandlerError::DeadLetter`] dead-letters every
    /// record of the batch; [`HandlerError::Fatal`] stops without storing
    /// the batch's offsets. Undecodable records are dead-lettered before the
    /// handler sees the batch, as with `run`.
    pub async fn run_batches<F, Fut>(
        &self,
        max_batch: usize,
        mut handler: F,
        shutdown: CancellationToken,
    ) -> Result<(), LogError>
    where
        F: FnMut(Arc<Vec<ConsumedEvent>>) -> Fut,
        Fut: Future<Output = Result<Vec<(usize, String)>, HandlerError>>,
    {
        let result = self
            .batch_loop(max_batch.max(1), &mut handler, &shutdown)
            .await;
        self.commit().await;
        result
    }

    async fn batch_loop<F, Fut>(
        &self,
        max_batch: usize,
        handler: &mut F,
        shutdown: &CancellationToken,
    ) -> Result<(), LogError>
    where
        F: FnMut(Arc<Vec<ConsumedEvent>>) -> Fut,
        Fut: Future<Output = Result<Vec<(usize, String)>, HandlerError>>,
    {
        use futures::FutureExt;
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = recv_through_transient(&self.inner) => m?,
            };
            let mut fetched = vec![Fetched::of(&msg)];
            drop(msg);
            // Whatever else is already fetched, without waiting.
            while fetched.len() < max_batch {
                match recv_through_transient(&self.inner).now_or_never() {
                    Some(m) => fetched.push(Fetched::of(&m?)),
                    None => break,
                }
            }
            let mut events = Vec::with_capacity(fetched.len());
            let mut origin = Vec::with_capacity(fetched.len());
            for (i, f) in fetched.iter().enumerate() {
                // Re-driven for another group: that group's business (the
                // offset is still stored below).
                if redriven_elsewhere(&f.headers, &self.group) {
                    continue;
                }
                match decode_fetched(self.producer.registry(), f, Some(shutdown)).await {
                    Decoded::Event(e) => {
                        events.push(*e);
                        origin.push(i);
                    }
                    Decoded::Undecodable(why) => self.dead_letter_fetched(f, &why).await?,
                    Decoded::Stopped => return Ok(()),
                }
            }
            if !events.is_empty() {
                let events = Arc::new(events);
                let mut backoff = Duration::from_millis(50);
                loop {
                    match handler(events.clone()).await {
                        Ok(dead) => {
                            for (i, why) in dead {
                                if let Some(f) = origin.get(i).map(|&o| &fetched[o]) {
                                    self.dead_letter_fetched(f, &why).await?;
                                }
                            }
                            break;
                        }
                        Err(HandlerError::Retry(why)) => {
                            let (first, n) = (&fetched[origin[0]], events.len());
                            tracing::warn!(topic = %first.topic, partition = first.partition, offset = first.offset, records = n, %why, "batch handler asked to retry");
                            if sleep_or_shutdown(&mut backoff, shutdown).await {
                                return Ok(());
                            }
                        }
                        Err(HandlerError::DeadLetter(why)) => {
                            for &o in &origin {
                                self.dead_letter_fetched(&fetched[o], &why).await?;
                            }
                            break;
                        }
                        Err(HandlerError::Fatal(why)) => {
                            let first = &fetched[origin[0]];
                            return Err(LogError::Config(format!(
                                "handler stopped at {}[{}]@{}: {why}",
                                first.topic, first.partition, first.offset
                            )));
                        }
                    }
                }
            }
            let mut last: std::collections::HashMap<(&str, i32), i64> = Default::default();
            for f in &fetched {
                let at = last
                    .entry((f.topic.as_str(), f.partition))
                    .or_insert(f.offset);
                *at = (*at).max(f.offset);
            }
            for ((topic, partition), offset) in last {
                self.inner.store_offset(topic, partition, offset)?;
            }
        }
    }

    async fn dead_letter_fetched(&self, f: &Fetched, why: &str) -> Result<(), LogError> {
        tracing::warn!(topic = %f.topic, partition = f.partition, offset = f.offset, %why, dlq = %self.dlq_topic, group = %self.group, "dead-lettering record");
        let headers = crate::dlq::dead_letter_headers(
            &f.topic,
            f.partition,
            f.offset,
            why,
            &self.group,
            &f.headers,
        );
        self.producer
            .send_raw(
                &self.dlq_topic,
                f.key.as_deref(),
                &f.payload,
                crate::dlq::owned_headers_of(&headers),
            )
            .await?;
        crate::metrics::count_dead_lettered(&self.group, &f.topic);
        Ok(())
    }

    /// Commits the stored offsets synchronously (on shutdown).
    pub async fn commit(&self) {
        let inner = self.inner.clone();
        // A synchronous commit blocks until the coordinator answers.
        let res =
            tokio::task::spawn_blocking(move || inner.commit_consumer_state(CommitMode::Sync))
                .await;
        match res {
            Ok(Ok(())) => {}
            // Nothing stored yet is not a failure.
            Ok(Err(e)) => tracing::debug!(error = %e, "commit on shutdown"),
            Err(e) => tracing::warn!(error = %e, "commit task failed"),
        }
    }
}

/// Sleeps for the backoff (doubling it up to [`MAX_BACKOFF`]); true when shutdown fired instead.
async fn sleep_or_shutdown(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// A record as stored, for tooling that must see bytes and headers undecoded
/// (dead-letter inspection, replay checks).
#[derive(Clone, Debug)]
pub struct RawRecord {
    pub partition: i32,
    /// The record's timestamp (ms since the epoch), when it has one.
    pub timestamp_ms: Option<i64>,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads up to `max` records of `topic` from the beginning without joining a
/// consumer group, returning what arrived within `timeout`.
pub async fn read_raw(
    config: &LogConfig,
    topic: &str,
    max: usize,
    timeout: Duration,
) -> Result<Vec<RawRecord>, LogError> {
    crate::topics::check_topics_exist(config, &[topic.to_string()]).await?;
    let consumer: StreamConsumer = base_client_config(config)
        .set("group.id", format!("raw-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", config.fetch_min_bytes.to_string())
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < max {
        let msg = match tokio::time::timeout_at(deadline, recv_through_transient(&consumer)).await {
            Ok(m) => m?,
            Err(_) => break,
        };
        let headers = owned_headers(&msg);
        out.push(RawRecord {
            partition: msg.partition(),
            timestamp_ms: msg.timestamp().to_millis(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    Ok(out)
}

/// Reads partition `partition` of `topic` (committed records only) from
/// `from` (`None`: its beginning) up to its end as of this call, handing each
/// record to `f` in offset order. Returns that end (the next offset to be
/// written). No consumer group is joined and nothing is committed: this is
/// how a state store is restored from its changelog.
pub async fn read_partition_raw(
    config: &LogConfig,
    topic: &str,
    partition: i32,
    from: Option<i64>,
    mut f: impl FnMut(RawRecord),
) -> Result<i64, LogError> {
    use rdkafka::{Offset, TopicPartitionList};
    crate::topics::check_topics_exist(config, &[topic.to_string()]).await?;
    let consumer: StreamConsumer = base_client_config(config)
        .set("group.id", format!("raw-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", config.fetch_min_bytes.to_string())
        .create()?;
    let consumer = Arc::new(consumer);
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let end = {
        let (c, t) = (consumer.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, partition, timeout))
            .await
            .map_err(|e| LogError::Config(e.to_string()))?
            .map_err(LogError::Kafka)?
            .1
    };
    let mut tpl = TopicPartitionList::new();
    let start = from.map_or(Offset::Beginning, Offset::Offset);
    tpl.add_partition_offset(topic, partition, start)?;
    consumer.assign(&tpl)?;
    let reached = |c: &StreamConsumer| -> Result<bool, LogError> {
        let position = c.position()?;
        Ok(position
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .is_some_and(|o| o >= end))
    };
    if end <= from.unwrap_or(0) {
        return Ok(end);
    }
    loop {
        // Only the wait is bounded: a message is owned once `recv` returns.
        let wait = Duration::from_millis(200);
        match tokio::time::timeout(wait, recv_through_transient(&consumer)).await {
            Ok(msg) => {
                let msg = msg?;
                if msg.offset() >= end {
                    return Ok(end);
                }
                f(RawRecord {
                    partition: msg.partition(),
                    timestamp_ms: msg.timestamp().to_millis(),
                    offset: msg.offset(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers: owned_headers(&msg),
                });
                if msg.offset() + 1 >= end {
                    return Ok(end);
                }
            }
            // Control records (transaction markers) move the position
            // without a message.
            Err(_) if reached(&consumer)? => return Ok(end),
            Err(_) => {}
        }
    }
}

/// The earliest offset of `topic`'s `partition` whose record timestamp is at
/// or after `ts_ms` (`None`: no such record, i.e. the partition's end).
pub async fn offset_for_time(
    config: &LogConfig,
    topic: &str,
    partition: i32,
    ts_ms: i64,
) -> Result<Option<i64>, LogError> {
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: StreamConsumer = base_client_config(config)
        .set("group.id", format!("raw-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(ts_ms))?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let found = tokio::task::spawn_blocking(move || consumer.offsets_for_times(tpl, timeout))
        .await
        .map_err(|e| LogError::Config(e.to_string()))?
        .map_err(LogError::Kafka)?;
    Ok(found
        .find_partition(topic, partition)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }))
}

/// The end (next offset to be written) of `topic`'s `partition` now.
pub async fn high_watermark(
    config: &LogConfig,
    topic: &str,
    partition: i32,
) -> Result<i64, LogError> {
    let consumer: StreamConsumer = base_client_config(config)
        .set("group.id", format!("raw-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&t, partition, timeout))
        .await
        .map_err(|e| LogError::Config(e.to_string()))?
        .map(|(_, high)| high)
        .map_err(LogError::Kafka)
}

/// Gives consumer group `group_id` committed offsets on `topic` (partition
/// -> next offset to read), unless it already has a committed offset on any
/// of them. For a new group that must start where a projection's own
/// recorded progress says (a projector moving to another keyspace), not at
/// the beginning. Returns whether it committed. Commit while no member is
/// in the group (the broker refuses a commit from outside an active group).
pub async fn seed_group_offsets(
    config: &LogConfig,
    group_id: &str,
    topic: &str,
    offsets: &std::collections::HashMap<i32, i64>,
) -> Result<bool, LogError> {
    use rdkafka::{Offset, TopicPartitionList};
    if offsets.is_empty() {
        return Ok(false);
    }
    let consumer: StreamConsumer = base_client_config(config)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    tokio::task::spawn_blocking(move || {
        let committed = consumer.committed_offsets(tpl.clone(), timeout)?;
        let any = committed
            .elements()
            .iter()
            .any(|e| matches!(e.offset(), Offset::Offset(_)));
        if any {
            return Ok(false);
        }
        consumer.commit(&tpl, CommitMode::Sync)?;
        Ok(true)
    })
    .await
    .map_err(|e| LogError::Config(e.to_string()))?
    .map_err(LogError::Kafka)
}
