//! The boundary to Kafka and the schema registry. No other crate uses rdkafka
//! or talks to the registry.
//!
//! What this crate owns:
//! - [`topics`]: the names, partition counts and retention of every topic, and
//!   their idempotent creation through the admin API;
//! - [`registry`]: registering the envelope schema per topic (subject
//!   `<topic>-value`, TopicNameStrategy) with `BACKWARD_TRANSITIVE`
//!   compatibility, and Avro encode/decode in Confluent wire format;
//! - [`producer`]: a typed producer (idempotent, `acks=all`) that puts the
//!   trace id and the event kind in Kafka headers;
//! - [`consumer`]: a typed consumer that stores an offset only after its
//!   handler succeeded, and sends records that fail to decode to the
//!   dead-letter topic with their partition and offset;
//! - [`dlq`]: reading the dead-letter topic with filters, re-driving records
//!   to the partition they came from (once), marking them handled;
//! - [`metrics`]: consumer lag and dead-letter counters every service exports.
//!
//! Guarantees: at-least-once consumption (a handler may see a record again
//! after a crash, never miss one); per-partition order as Kafka keeps it;
//! no duplicate produce from librdkafka's internal retries (idempotence);
//! a record taken off a consumer is never dropped: timeouts bound only the
//! wait for a message, a decode waiting on the registry always completes
//! (registry failures are retried, not turned into undecodable records),
//! and the futures of [`TopicTail::next`] and
//! [`PartitionedConsumer::next_batch`] may be cancelled without losing one
//! (see [`tail`] and [`partitioned`]).
//! Not promised here: exactly-once processing; the projections make their
//! writes idempotent instead (keyed by chat and seq).
//!
//! rdkafka runs its own threads; the only blocking calls (flush, commit on
//! close, metadata fetch) are moved to `spawn_blocking`.
#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod metrics;
pub mod partitioned;
pub mod producer;
pub mod registry;
pub mod tail;
pub mod topics;

pub use config::{LogConfig, SecurityProtocol};
pub use consumer::{
    offset_for_time, read_partition_raw, read_raw, ConsumedEvent, EventConsumer, HandlerError,
    RawRecord,
};
pub use error::LogError;
pub use partitioned::{Batch, BatchRecord, OutRecord, PartitionedConsumer, TxnError, TxnProducer};
pub use producer::{EventProducer, Outgoing, Produced};
pub use registry::SchemaRegistry;
pub use tail::{TailItem, TailStart, TopicTail};
pub use topics::{deliveries_partition, PartitionInfo, TopicSpec, Topics};

/// Kafka header that carries the trace id from the socket to the delivery.
pub const HEADER_TRACE_ID: &str = "trace_id";
/// Kafka header with the Avro record name of the envelope's body.
pub const HEADER_EVENT_KIND: &str = "event_kind";
/// Kafka header on `chat.commands` records: the gateway holding the sending
/// device, where the sequencer sends its `CommandResult`.
pub const HEADER_GATEWAY_ID: &str = "gateway_id";
/// Kafka header on `chat.deliveries` records: comma-separated user ids on the
/// target gateway that should receive the event.
pub const HEADER_RECIPIENTS: &str = "recipients";
/// Kafka header on `chat.deliveries` records of chat events:
/// `<partition>:<offset>` of the event in `chat.events`, so a gateway knows
/// how far a projection must have come before it answers a read of a
/// connection the event was sent to.
pub const HEADER_EVENTS_POSITION: &str = "events_position";

/// The value of [`HEADER_EVENTS_POSITION`].
pub fn events_position(partition: i32, offset: i64) -> Vec<u8> {
    format!("{partition}:{offset}").into_bytes()
}

/// Reads a [`HEADER_EVENTS_POSITION`] value.
pub fn parse_events_position(value: &[u8]) -> Option<(i32, i64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (p, o) = text.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

#[cfg(test)]
mod position_tests {
    #[test]
    fn events_position_round_trips() {
        let v = super::events_position(11, 123_456_789_012);
        assert_eq!(
            super::parse_events_position(&v),
            Some((11, 123_456_789_012))
        );
        assert_eq!(super::parse_events_position(b"11"), None);
        assert_eq!(super::parse_events_position(b"x:1"), None);
        assert_eq!(super::parse_events_position(b"1:-"), None);
    }
}
