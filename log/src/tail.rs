//! A group-less reader of chosen partitions: for state that must be built
//! from a whole partition (the sequencer rebuilding a chat's state, the
//! router reading every session), and for a gateway tailing its own
//! deliveries partition from "now".
//!
//! Nothing is committed: the caller decides where to start each time.
//! Reads only committed transactional data (`isolation.level=read_committed`).
//!
//! **A record fetched is never dropped.** Once a record is taken off the
//! Kafka consumer, its position is past it: losing it there loses it for
//! good (a fold built from the partition silently misses it). So:
//! - [`TopicTail::read_until`] puts its poll timeout around the wait for a
//!   message only; the decode of a fetched record (which may wait on the
//!   registry: a cold schema cache, a registry restart, load) always runs to
//!   the end, and a registry that cannot be asked is retried, never turned
//!   into an undecodable record;
//! - [`TopicTail::next`] is cancel-safe: when its future is dropped (a
//!   `select!`, a `timeout`) while a fetched record is being decoded, the
//!   record is kept and the next call returns it first;
//! - a record at or past the end given to `read_until` (another partition
//!   may still be catching up) is kept, undecoded, for the next `next` or
//!   `read_until`, not thrown away.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::consumer::{decode_fetched, Decoded, Fetched};
use crate::error::recv_through_transient;
use crate::metrics::{LagContext, STATS_INTERVAL_MS};
use crate::topics::{base_client_config, check_topics_exist};
use crate::{ConsumedEvent, LogConfig, LogError, SchemaRegistry};

/// Where a tail starts in each partition.
#[derive(Clone, Debug)]
pub enum TailStart {
    /// The oldest retained record.
    Beginning,
    /// After the last record written so far: only new records.
    End,
    /// Per partition offsets (the next offset to read); partitions not listed start at the beginning.
    Offsets(HashMap<i32, i64>),
}

/// One record read by a tail.
#[derive(Clone, Debug)]
pub enum TailItem {
    Event(Box<ConsumedEvent>),
    /// The record is not a valid envelope; the caller decides (skip, dead-letter).
    Undecodable {
        partition: i32,
        offset: i64,
        error: String,
    },
}

/// Reads the assigned partitions of one topic.
pub struct TopicTail {
    consumer: Arc<StreamConsumer<LagContext>>,
    registry: Arc<SchemaRegistry>,
    topic: String,
    partitions: Vec<i32>,
    config: LogConfig,
    /// Records taken off the consumer but not handed out yet, in the order
    /// they were fetched: handed out before anything new is fetched.
    held: Mutex<VecDeque<Fetched>>,
}

impl std::fmt::Debug for TopicTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicTail")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl TopicTail {
    /// Assigns `partitions` of `topic` (None: all of them) starting at `start`.
    pub async fn open(
        config: &LogConfig,
        registry: Arc<SchemaRegistry>,
        topic: &str,
        partitions: Option<Vec<i32>>,
        start: TailStart,
    ) -> Result<Self, LogError> {
        check_topics_exist(config, &[topic.to_string()]).await?;
        let consumer: StreamConsumer<LagContext> = base_client_config(config)
            // A group id is required by librdkafka even without subscribing; nothing is committed.
            .set("group.id", format!("tail-{}", uuid::Uuid::new_v4()))
            .set("statistics.interval.ms", STATS_INTERVAL_MS.to_string())
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
            .set("fetch.min.bytes", config.fetch_min_bytes.to_string())
            .create_with_context(LagContext::new("tail"))?;
        let consumer = Arc::new(consumer);
        let partitions = match partitions {
            Some(p) => p,
            None => partition_ids(consumer.clone(), topic, config).await?,
        };
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let offset = match &start {
                TailStart::Beginning => Offset::Beginning,
                TailStart::End => Offset::End,
                TailStart::Offsets(m) => m.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o)),
            };
            tpl.add_partition_offset(topic, *p, offset)?;
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            registry,
            topic: topic.to_string(),
            partitions,
            config: config.clone(),
            held: Mutex::new(VecDeque::new()),
        })
    }

    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// The next record (waits for one).
    ///
    /// Cancel-safe: if the returned future is dropped while a fetched record
    /// is being decoded, the record is kept and the next call returns it.
    pub async fn next(&self) -> Result<TailItem, LogError> {
        let f = match self.take_held() {
            Some(f) => f,
            None => self.fetch().await?,
        };
        self.decode(f).await
    }

    /// Waits for the next record off the consumer. Cancelling the wait loses
    /// nothing: the message is owned (and the position moves) only when
    /// `recv` returns, and nothing awaits between that and the return.
    async fn fetch(&self) -> Result<Fetched, LogError> {
        let msg = recv_through_transient(&self.consumer).await?;
        Ok(Fetched::of(&msg))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, VecDeque<Fetched>> {
        // Only push and pop under the lock: a poisoned queue is still whole.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_held(&self) -> Option<Fetched> {
        self.held().pop_front()
    }

    /// Decodes `f` to the end, retrying while the registry cannot be asked.
    /// Until the decode finished, `f` is parked in a guard that gives it back
    /// to the front of the held queue if this future is dropped.
    async fn decode(&self, f: Fetched) -> Result<TailItem, LogError> {
        let mut parked = Parked {
            slot: &self.held,
            record: f,
            released: false,
        };
        let decoded = decode_fetched(&self.registry, &parked.record, None).await;
        let f = parked.release();
        Ok(match decoded {
            Decoded::Event(e) => TailItem::Event(e),
            Decoded::Undecodable(error) => TailItem::Undecodable {
                partition: f.partition,
                offset: f.offset,
                error,
            },
            // Only a decode given a shutdown token stops.
            Decoded::Stopped => return Err(LogError::Config("decode stopped".into())),
        })
    }

    /// The current end (next offset to be written) of each assigned partition.
    pub async fn high_watermarks(&self) -> Result<HashMap<i32, i64>, LogError> {
        let mut out = HashMap::new();
        for p in &self.partitions {
            let (_, high) = self.watermarks(*p).await?;
            out.insert(*p, high);
        }
        Ok(out)
    }

    async fn watermarks(&self, partition: i32) -> Result<(i64, i64), LogError> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        // fetch_watermarks blocks until the broker answers.
        tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition, timeout))
            .await
            .map_err(|e| LogError::Config(e.to_string()))?
            .map_err(LogError::Kafka)
    }

    /// True when every assigned partition's read position reached `ends`.
    pub fn reached(&self, ends: &HashMap<i32, i64>) -> Result<bool, LogError> {
        let position = self.consumer.position()?;
        Ok(self.partitions.iter().all(|p| {
            let end = ends.get(p).copied().unwrap_or(0);
            let at = position
                .find_partition(&self.topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            end <= 0 || at.is_some_and(|o| o >= end)
        }))
    }

    /// Reads every record written before this call and hands it to `f`;
    /// returns when every assigned partition is caught up to that point.
    pub async fn read_to_end(&self, f: impl FnMut(TailItem)) -> Result<(), LogError> {
        let ends = self.high_watermarks().await?;
        self.read_until(&ends, f).await
    }

    /// Reads records and hands them to `f` until every assigned partition's
    /// position reached `ends` (records at or past an end are not handed out
    /// here; they are kept for the next [`next`](Self::next) or `read_until`).
    ///
    /// Every record before the ends is handed out exactly once, in partition
    /// order: the poll timeout (which lets the loop see a position moved by
    /// control records alone) cancels only the wait for a message, never the
    /// decode of one already fetched.
    pub async fn read_until(
        &self,
        ends: &HashMap<i32, i64>,
        mut f: impl FnMut(TailItem),
    ) -> Result<(), LogError> {
        let before_end =
            |r: &Fetched| r.offset < ends.get(&r.partition).copied().unwrap_or(i64::MAX);
        // Records held from an earlier call come before anything fetched now
        // (taken one at a time, so a cancelled call loses none of them).
        loop {
            let earlier = {
                let mut held = self.held();
                held.iter()
                    .position(before_end)
                    .and_then(|i| held.remove(i))
            };
            match earlier {
                Some(r) => f(self.decode(r).await?),
                None => break,
            }
        }
        while !self.reached(ends)? {
            let r = match tokio::time::timeout(POLL, self.fetch()).await {
                Ok(r) => r?,
                Err(_) => continue,
            };
            if before_end(&r) {
                f(self.decode(r).await?);
            } else {
                self.held().push_back(r);
            }
        }
        Ok(())
    }
}

/// How long [`TopicTail::read_until`] waits for a message before it checks
/// the positions again.
const POLL: Duration = Duration::from_millis(200);

/// A fetched record being decoded: given back to the front of the tail's
/// held queue when dropped before [`Parked::release`] (the decode completed).
struct Parked<'a> {
    slot: &'a Mutex<VecDeque<Fetched>>,
    record: Fetched,
    released: bool,
}

impl Parked<'_> {
    fn release(&mut self) -> Fetched {
        self.released = true;
        std::mem::take(&mut self.record)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if !self.released {
            let f = std::mem::take(&mut self.record);
            self.slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_front(f);
        }
    }
}

async fn partition_ids(
    consumer: Arc<StreamConsumer<LagContext>>,
    topic: &str,
    config: &LogConfig,
) -> Result<Vec<i32>, LogError> {
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let name = topic.to_string();
    // fetch_metadata blocks until the broker answers.
    let md = tokio::task::spawn_blocking(move || consumer.fetch_metadata(Some(&name), timeout))
        .await
        .map_err(|e| LogError::Config(e.to_string()))??;
    let ids: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if ids.is_empty() {
        return Err(LogError::UnknownTopic {
            topic: topic.to_string(),
        });
    }
    Ok(ids)
}
