//! Dead letters: what a consumer could not handle, kept in `chat.dlq` with
//! its origin, and the operator's tools on them (`chat-admin dlq`).
//!
//! A dead letter is the original record (same key, same bytes, the original
//! headers) with these headers added:
//! `dlq.topic`, `dlq.partition`, `dlq.offset` (where it was read),
//! `dlq.error` (why it was refused), `dlq.group` (the consumer group that
//! refused it).
//!
//! **Handled records.** Kafka cannot delete one record, so handling is
//! recorded beside the DLQ, in the compacted topic `chat.dlq-handled`: one
//! record per handled dead letter, key `<dlq partition>:<dlq offset>`, value
//! a JSON [`Handled`] (`redriven` with where to, or `dropped`). [`list`]
//! hides handled records unless asked.
//!
//! **Redrive, once.** [`redrive`] appends each chosen dead letter to its
//! original topic and partition (same key, original bytes and headers, plus
//! `dlq.redriven_from = <dlq partition>:<dlq offset>` and
//! `dlq.redrive_group = <dlq.group>`) *and* its `chat.dlq-handled` marker in
//! one Kafka transaction, with one fixed `transactional.id` per platform
//! (`<prefix>chat-admin-dlq`). Why that is once:
//! - the record and its marker become visible together or not at all (an
//!   interrupted redrive is aborted: neither; consumers read committed);
//! - the markers are read *after* `init_transactions`, which fences any
//!   other redrive/drop still running (its open transaction is aborted) and
//!   waits for its commit to complete; so a second run sees every record the
//!   first committed as handled and skips it, and two concurrent runs cannot
//!   both commit the same record (the older is fenced at commit).
//!
//! **Back to its consumer.** Consumers skip a re-driven record whose
//! `dlq.redrive_group` is not their group (see [`redriven_elsewhere`]):
//! the other groups of that topic already handled the original (or
//! dead-lettered it themselves, which is another dead letter), so only the
//! group that refused it processes it again.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

use crate::topics::base_client_config;
use crate::{LogConfig, LogError, Topics};

pub const HEADER_TOPIC: &str = "dlq.topic";
pub const HEADER_PARTITION: &str = "dlq.partition";
pub const HEADER_OFFSET: &str = "dlq.offset";
pub const HEADER_ERROR: &str = "dlq.error";
pub const HEADER_GROUP: &str = "dlq.group";
/// On a re-driven record: `<dlq partition>:<dlq offset>` it came from.
pub const HEADER_REDRIVEN_FROM: &str = "dlq.redriven_from";
/// On a re-driven record: the only consumer group that processes it.
pub const HEADER_REDRIVE_GROUP: &str = "dlq.redrive_group";

/// The headers of a dead letter: the original ones (without earlier `dlq.*`
/// headers) and its origin.
pub fn dead_letter_headers(
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
    group: &str,
    original: &[(String, Vec<u8>)],
) -> Vec<(String, Vec<u8>)> {
    let mut h: Vec<(String, Vec<u8>)> = original
        .iter()
        .filter(|(k, _)| !k.starts_with("dlq."))
        .cloned()
        .collect();
    h.push((HEADER_TOPIC.into(), topic.as_bytes().to_vec()));
    h.push((HEADER_PARTITION.into(), partition.to_string().into_bytes()));
    h.push((HEADER_OFFSET.into(), offset.to_string().into_bytes()));
    h.push((HEADER_ERROR.into(), why.as_bytes().to_vec()));
    h.push((HEADER_GROUP.into(), group.as_bytes().to_vec()));
    h
}

/// Kafka headers from owned pairs.
pub fn owned_headers_of(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    )
}

/// True when the record was re-driven for a consumer group other than
/// `group`: `group` must skip it.
pub fn redriven_elsewhere(headers: &[(String, Vec<u8>)], group: &str) -> bool {
    headers
        .iter()
        .find(|(k, _)| k == HEADER_REDRIVE_GROUP)
        .is_some_and(|(_, v)| v.as_slice() != group.as_bytes())
}

/// Dead-letters the undecodable records of one batch of a
/// [`PartitionedConsumer`](crate::PartitionedConsumer) (read by `group` from
/// `origin_topic`'s `partition`), waiting for each write, and counts them.
/// Call it before committing the batch's offset: a crash re-reads the batch
/// and may write a dead letter twice, never lose one. Returns how many.
pub async fn dead_letter_undecodable(
    producer: &crate::EventProducer,
    dlq_topic: &str,
    group: &str,
    origin_topic: &str,
    partition: i32,
    records: &[crate::BatchRecord],
) -> Result<usize, LogError> {
    let mut n = 0;
    for rec in records {
        let crate::BatchRecord::Undecodable {
            offset,
            key,
            payload,
            headers,
            error,
        } = rec
        else {
            continue;
        };
        tracing::warn!(topic = %origin_topic, partition, offset, %error, %group, "dead-lettering undecodable record");
        let h = dead_letter_headers(origin_topic, partition, *offset, error, group, headers);
        producer
            .send_raw(dlq_topic, key.as_deref(), payload, owned_headers_of(&h))
            .await?;
        crate::metrics::count_dead_lettered(group, origin_topic);
        n += 1;
    }
    Ok(n)
}

/// How a dead letter was handled (the value of its `chat.dlq-handled` record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handled {
    /// `redriven` or `dropped`.
    pub action: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// Where a re-driven record was appended: `topic[partition]@offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// One dead letter as read from `chat.dlq`.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// When it was dead-lettered (ms since the epoch).
    pub timestamp_ms: Option<i64>,
    /// Origin: topic, partition, offset (absent if the headers are missing).
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub error: String,
    /// The consumer group that refused it.
    pub group: Option<String>,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// The original headers (without `dlq.*`).
    #[serde(skip)]
    pub headers: Vec<(String, Vec<u8>)>,
    pub handled: Option<Handled>,
}

impl DeadLetter {
    fn from_raw(dlq_partition: i32, r: crate::RawRecord) -> Self {
        let get = |k: &str| {
            r.headers
                .iter()
                .find(|(h, _)| h == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        Self {
            dlq_partition,
            dlq_offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            topic: get(HEADER_TOPIC),
            partition: get(HEADER_PARTITION).and_then(|v| v.parse().ok()),
            offset: get(HEADER_OFFSET).and_then(|v| v.parse().ok()),
            error: get(HEADER_ERROR).unwrap_or_default(),
            group: get(HEADER_GROUP),
            key: r.key,
            payload: r.payload,
            headers: r
                .headers
                .into_iter()
                .filter(|(k, _)| !k.starts_with("dlq."))
                .collect(),
            handled: None,
        }
    }

    /// The key of its `chat.dlq-handled` marker.
    pub fn marker_key(&self) -> String {
        format!("{}:{}", self.dlq_partition, self.dlq_offset)
    }
}

/// Which dead letters a command applies to. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Origin topic: the full name or the name without the prefix
    /// (`chat.events`).
    pub topic: Option<String>,
    /// A substring of `dlq.error`.
    pub error: Option<String>,
    /// Dead-lettered at or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Dead-lettered before (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Only these DLQ offsets (of any partition).
    pub offsets: Vec<i64>,
    /// Include records already re-driven or dropped.
    pub include_handled: bool,
}

impl Filter {
    fn matches(&self, d: &DeadLetter, prefix: &str) -> bool {
        if let Some(t) = &self.topic {
            let origin = d.topic.as_deref().unwrap_or("");
            if origin != t && origin.strip_prefix(prefix) != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(e) = &self.error {
            if !d.error.contains(e.as_str()) {
                return false;
            }
        }
        let ts = d.timestamp_ms.unwrap_or(0);
        if self.since_ms.is_some_and(|s| ts < s) || self.until_ms.is_some_and(|u| ts >= u) {
            return false;
        }
        if !self.offsets.is_empty() && !self.offsets.contains(&d.dlq_offset) {
            return false;
        }
        self.include_handled || d.handled.is_none()
    }
}

/// The dead letters matching `filter`, in DLQ order, each with how it was
/// handled (if it was).
pub async fn list(
    config: &LogConfig,
    topics: &Topics,
    filter: &Filter,
) -> Result<Vec<DeadLetter>, LogError> {
    let handled = read_markers(config, topics).await?;
    read_dead_letters(config, topics, filter, &handled).await
}

async fn read_dead_letters(
    config: &LogConfig,
    topics: &Topics,
    filter: &Filter,
    handled: &HashMap<String, Handled>,
) -> Result<Vec<DeadLetter>, LogError> {
    let mut out = Vec::new();
    for p in crate::topics::partitions(config, &topics.dlq).await? {
        let start = match filter.since_ms {
            Some(since) => {
                match crate::offset_for_time(config, &topics.dlq, p.partition, since).await? {
                    Some(o) => Some(o),
                    None => continue,
                }
            }
            None => None,
        };
        let mut records = Vec::new();
        crate::read_partition_raw(config, &topics.dlq, p.partition, start, |r| records.push(r))
            .await?;
        for r in records {
            let mut d = DeadLetter::from_raw(p.partition, r);
            d.handled = handled.get(&d.marker_key()).cloned();
            if filter.matches(&d, &config.topic_prefix) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

/// Every `chat.dlq-handled` marker (the latest per key), read committed.
async fn read_markers(
    config: &LogConfig,
    topics: &Topics,
) -> Result<HashMap<String, Handled>, LogError> {
    let mut out = HashMap::new();
    for p in crate::topics::partitions(config, &topics.dlq_handled).await? {
        crate::read_partition_raw(config, &topics.dlq_handled, p.partition, None, |r| {
            let (Some(key), Ok(h)) = (r.key, serde_json::from_slice::<Handled>(&r.payload)) else {
                return;
            };
            out.insert(String::from_utf8_lossy(&key).into_owned(), h);
        })
        .await?;
    }
    Ok(out)
}

/// What [`redrive`] or [`drop`] did with one dead letter.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// `redriven`, `dropped`, or `skipped` (with `why`).
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// The fenced transactional producer of the DLQ tools (see the module doc).
async fn txn_producer(config: &LogConfig) -> Result<FutureProducer, LogError> {
    crate::topics::check_brokers(config).await?;
    let producer: FutureProducer = base_client_config(config)
        .set(
            "transactional.id",
            format!("{}chat-admin-dlq", config.topic_prefix),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        // A run killed mid-transaction holds back read-committed readers of
        // the partitions it wrote to until the next run fences it or this.
        .set("transaction.timeout.ms", "15000")
        .create()?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(TXN_TIMEOUT))
        .await
        .map_err(|e| LogError::Config(e.to_string()))??;
    Ok(producer)
}

async fn blocking_txn(
    p: &FutureProducer,
    f: impl FnOnce(&FutureProducer) -> Result<(), rdkafka::error::KafkaError> + Send + 'static,
) -> Result<(), LogError> {
    let p = p.clone();
    tokio::task::spawn_blocking(move || f(&p))
        .await
        .map_err(|e| LogError::Config(e.to_string()))?
        .map_err(LogError::Kafka)
}

/// Appends the dead letters matching `filter` (not yet handled) to their
/// original topic and partition, once (see the module doc).
pub async fn redrive(
    config: &LogConfig,
    topics: &Topics,
    filter: &Filter,
) -> Result<Vec<Outcome>, LogError> {
    handle(config, topics, filter, true).await
}

/// Marks the dead letters matching `filter` (not yet handled) as dropped:
/// [`list`] hides them and [`redrive`] skips them.
pub async fn drop(
    config: &LogConfig,
    topics: &Topics,
    filter: &Filter,
) -> Result<Vec<Outcome>, LogError> {
    handle(config, topics, filter, false).await
}

async fn handle(
    config: &LogConfig,
    topics: &Topics,
    filter: &Filter,
    redrive: bool,
) -> Result<Vec<Outcome>, LogError> {
    let producer = txn_producer(config).await?;
    // After init_transactions: every earlier run's markers are settled.
    let handled = read_markers(config, topics).await?;
    let only_new = Filter {
        include_handled: false,
        ..filter.clone()
    };
    let chosen = read_dead_letters(config, topics, &only_new, &handled).await?;
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    blocking_txn(&producer, |p| p.begin_transaction()).await?;
    match append(&producer, topics, &chosen, redrive).await {
        Ok(outcomes) => {
            blocking_txn(&producer, |p| p.commit_transaction(TXN_TIMEOUT)).await?;
            Ok(outcomes)
        }
        Err(e) => {
            let _ = blocking_txn(&producer, |p| p.abort_transaction(TXN_TIMEOUT)).await;
            Err(e)
        }
    }
}

/// Inside the open transaction: the re-driven records, then the markers.
async fn append(
    producer: &FutureProducer,
    topics: &Topics,
    chosen: &[DeadLetter],
    redrive: bool,
) -> Result<Vec<Outcome>, LogError> {
    let now = chat_runtime::now_ms();
    let mut outcomes = Vec::with_capacity(chosen.len());
    for d in chosen {
        let mut outcome = Outcome {
            dlq_partition: d.dlq_partition,
            dlq_offset: d.dlq_offset,
            action: if redrive { "redriven" } else { "dropped" }.into(),
            to: None,
            why: None,
        };
        if redrive {
            let (Some(topic), Some(partition)) = (&d.topic, d.partition) else {
                outcome.action = "skipped".into();
                outcome.why = Some("no dlq.topic/dlq.partition header: origin unknown".into());
                outcomes.push(outcome);
                continue;
            };
            let mut headers = d.headers.clone();
            headers.push((HEADER_REDRIVEN_FROM.into(), d.marker_key().into_bytes()));
            if let Some(g) = &d.group {
                headers.push((HEADER_REDRIVE_GROUP.into(), g.as_bytes().to_vec()));
            }
            let mut record = FutureRecord::to(topic)
                .partition(partition)
                .payload(&d.payload)
                .headers(owned_headers_of(&headers));
            if let Some(k) = &d.key {
                record = record.key(k);
            }
            let (p, o) = producer
                .send(record, Timeout::After(Duration::from_secs(10)))
                .await
                .map(|delivery| (delivery.partition, delivery.offset))
                .map_err(|(e, _)| LogError::Kafka(e))?;
            outcome.to = Some(format!("{topic}[{p}]@{o}"));
        }
        let marker = Handled {
            action: outcome.action.clone(),
            at_ms: now,
            to: outcome.to.clone(),
        };
        let value = serde_json::to_vec(&marker).map_err(|e| LogError::Config(e.to_string()))?;
        if outcome.action != "skipped" {
            let key = d.marker_key();
            producer
                .send(
                    FutureRecord::to(&topics.dlq_handled)
                        .key(&key)
                        .payload(&value),
                    Timeout::After(Duration::from_secs(10)),
                )
                .await
                .map_err(|(e, _)| LogError::Kafka(e))?;
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_keep_the_original_ones_and_name_the_origin() {
        let original = vec![
            ("trace_id".to_string(), b"t1".to_vec()),
            ("dlq.error".to_string(), b"an earlier one".to_vec()),
        ];
        let h = dead_letter_headers("chat.events", 2, 41, "bad", "history", &original);
        let keys: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "trace_id",
                "dlq.topic",
                "dlq.partition",
                "dlq.offset",
                "dlq.error",
                "dlq.group"
            ]
        );
        assert_eq!(h[4].1, b"bad");
    }

    #[test]
    fn only_the_redrive_group_processes_a_redriven_record() {
        let h = vec![(HEADER_REDRIVE_GROUP.to_string(), b"history".to_vec())];
        assert!(!redriven_elsewhere(&h, "history"));
        assert!(redriven_elsewhere(&h, "router"));
        assert!(!redriven_elsewhere(&[], "router"));
    }

    #[test]
    fn filters_by_topic_error_time_and_handled() {
        let d = DeadLetter {
            dlq_partition: 0,
            dlq_offset: 7,
            timestamp_ms: Some(1000),
            topic: Some("t.x.chat.events".into()),
            partition: Some(1),
            offset: Some(3),
            error: "unknown schema id 99".into(),
            group: Some("history".into()),
            key: None,
            payload: vec![],
            headers: vec![],
            handled: None,
        };
        let f = |f: Filter| f.matches(&d, "t.x.");
        assert!(f(Filter::default()));
        assert!(f(Filter {
            topic: Some("chat.events".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            topic: Some("chat.commands".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            error: Some("schema id".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            error: Some("timeout".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            since_ms: Some(1000),
            until_ms: Some(1001),
            ..Default::default()
        }));
        assert!(!f(Filter {
            since_ms: Some(1001),
            ..Default::default()
        }));
        assert!(!f(Filter {
            offsets: vec![8],
            ..Default::default()
        }));
        let handled = DeadLetter {
            handled: Some(Handled {
                action: "dropped".into(),
                at_ms: 1,
                to: None,
            }),
            ..d.clone()
        };
        assert!(!Filter::default().matches(&handled, "t.x."));
        assert!(Filter {
            include_handled: true,
            ..Default::default()
        }
        .matches(&handled, "t.x."));
    }
}
