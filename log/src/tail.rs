//! A group-less reader of chosen partitions: for state that must be built
//! from a whole partition (the sequencer rebuilding a chat's state, the
//! router reading every session), and for a gateway tailing its own
//! deliveries partition from "now".
//!
//! Nothing is committed: the caller decides where to start each time.
//! Reads only committed transactional data (`isolation.level=read_committed`).

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::consumer::{decode_fetched, Decoded, Fetched};
use crate::error::recv_through_transient;
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
    consumer: Arc<StreamConsumer>,
    registry: Arc<SchemaRegistry>,
    topic: String,
    partitions: Vec<i32>,
    config: LogConfig,
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
        let consumer: StreamConsumer = base_client_config(config)
            // A group id is required by librdkafka even without subscribing; nothing is committed.
            .set("group.id", format!("tail-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
            .create()?;
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
        })
    }

    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// The next record (waits for one).
    pub async fn next(&self) -> Result<TailItem, LogError> {
        let msg = recv_through_transient(&self.consumer).await?;
        let f = Fetched::of(&msg);
        drop(msg);
        Ok(match decode_fetched(&self.registry, &f, None).await {
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
    /// position reached `ends` (records at or past an end are not handed out).
    pub async fn read_until(
        &self,
        ends: &HashMap<i32, i64>,
        mut f: impl FnMut(TailItem),
    ) -> Result<(), LogError> {
        while !self.reached(ends)? {
            match tokio::time::timeout(Duration::from_millis(200), self.next()).await {
                Ok(item) => {
                    let item = item?;
                    let (p, o) = match &item {
                        TailItem::Event(e) => (e.partition, e.offset),
                        TailItem::Undecodable {
                            partition, offset, ..
                        } => (*partition, *offset),
                    };
                    if o < ends.get(&p).copied().unwrap_or(i64::MAX) {
                        f(item);
                    }
                }
                Err(_) => continue,
            }
        }
        Ok(())
    }
}

async fn partition_ids(
    consumer: Arc<StreamConsumer>,
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
