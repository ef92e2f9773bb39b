//! The typed producer: envelopes in, Confluent-framed Avro records out.
//!
//! Settings: `enable.idempotence=true` (no duplicates or reordering from
//! librdkafka's own retries), `acks=all`, `linger.ms` from [`LogConfig`]
//! (0 by default: one hop's latency matters more than batch size here).

use chat_schemas::Envelope;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::sync::Arc;
use std::time::Duration;

use crate::error::from_kafka;
use crate::topics::{base_client_config, check_brokers};
use crate::{LogConfig, LogError, SchemaRegistry, HEADER_EVENT_KIND, HEADER_TRACE_ID};

/// The headers every envelope record carries, plus `extra`.
pub(crate) fn envelope_headers(envelope: &Envelope, extra: &[(&str, &[u8])]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: HEADER_TRACE_ID,
            value: Some(envelope.trace_id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_EVENT_KIND,
            value: Some(envelope.body.kind().as_bytes()),
        });
    for (key, value) in extra {
        headers = headers.insert(Header {
            key,
            value: Some(*value),
        });
    }
    headers
}

/// One envelope to append with [`EventProducer::send_batch`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub topic: String,
    /// None: chosen by key.
    pub partition: Option<i32>,
    pub key: String,
    pub envelope: Envelope,
    /// Extra headers besides trace id and event kind.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where a record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

/// Cheap to clone; all clones share one librdkafka producer.
#[derive(Clone)]
pub struct EventProducer {
    inner: FutureProducer,
    registry: Arc<SchemaRegistry>,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer").finish_non_exhaustive()
    }
}

impl EventProducer {
    /// Connects after checking that a broker answers (a clear error otherwise).
    pub async fn connect(
        config: &LogConfig,
        registry: Arc<SchemaRegistry>,
    ) -> Result<Self, LogError> {
        check_brokers(config).await?;
        let inner: FutureProducer = base_client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("message.timeout.ms", "30000")
            .set("compression.type", "none")
            .create()?;
        Ok(Self { inner, registry })
    }

    pub fn registry(&self) -> &Arc<SchemaRegistry> {
        &self.registry
    }

    /// Encodes and appends one envelope; returns once the broker acknowledged
    /// it (all in-sync replicas).
    #[tracing::instrument(
        name = "log.produce",
        skip_all,
        fields(topic, chat = ?envelope.chat_id, seq = ?envelope.seq, trace_id = %envelope.trace_id, kind = envelope.body.kind())
    )]
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        envelope: &Envelope,
    ) -> Result<Produced, LogError> {
        self.send_with(topic, None, key, envelope, &[]).await
    }

    /// Like [`send`](Self::send), to an explicit partition (None: by key) and
    /// with extra headers (e.g. [`crate::HEADER_GATEWAY_ID`] on commands).
    pub async fn send_with(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        envelope: &Envelope,
        extra_headers: &[(&str, &[u8])],
    ) -> Result<Produced, LogError> {
        tracing::Span::current().record("topic", topic);
        let payload = self.registry.encode(topic, envelope).await?;
        let headers = envelope_headers(envelope, extra_headers);
        let mut record = FutureRecord::to(topic)
            .payload(&payload)
            .key(key.as_bytes())
            .headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => Ok(Produced {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((e, _)) => Err(from_kafka(e, topic)),
        }
    }

    /// Appends several envelopes in order: all are encoded first, then
    /// enqueued back to back (so their order within a partition is kept),
    /// then awaited together.
    pub async fn send_batch(&self, records: Vec<Outgoing>) -> Result<Vec<Produced>, LogError> {
        let mut encoded = Vec::with_capacity(records.len());
        for r in &records {
            encoded.push(self.registry.encode(&r.topic, &r.envelope).await?);
        }
        let mut pending = Vec::with_capacity(records.len());
        for (r, payload) in records.iter().zip(&encoded) {
            let extra: Vec<(&str, &[u8])> = r
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let mut record = FutureRecord::to(&r.topic)
                .payload(payload)
                .key(r.key.as_bytes())
                .headers(envelope_headers(&r.envelope, &extra));
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            match self.inner.send_result(record) {
                Ok(f) => pending.push(f),
                Err((e, _)) => return Err(from_kafka(e, &r.topic)),
            }
        }
        let mut out = Vec::with_capacity(pending.len());
        for (f, r) in pending.into_iter().zip(&records) {
            match f.await {
                Ok(Ok(d)) => out.push(Produced {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((e, _))) => return Err(from_kafka(e, &r.topic)),
                Err(_) => return Err(LogError::Config("producer dropped a delivery".into())),
            }
        }
        Ok(out)
    }

    /// Appends pre-encoded bytes (dead-lettering keeps the original bytes).
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<Produced, LogError> {
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => Ok(Produced {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((e, _)) => Err(from_kafka(e, topic)),
        }
    }

    /// Appends `(key, payload)` records to one partition of `topic` and waits
    /// for every acknowledgement (a state store's changelog). In order: the
    /// producer is idempotent.
    pub async fn send_raw_batch(
        &self,
        topic: &str,
        partition: i32,
        records: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), LogError> {
        let mut pending = Vec::with_capacity(records.len());
        for (key, payload) in records {
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload);
            pending.push(self.inner.send(record, Timeout::Never));
        }
        for d in futures::future::join_all(pending).await {
            d.map_err(|(e, _)| from_kafka(e, topic))?;
        }
        Ok(())
    }

    /// Waits until every queued record was acknowledged, up to `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), LogError> {
        let inner = self.inner.clone();
        // flush blocks the calling thread: keep it off the runtime's workers.
        tokio::task::spawn_blocking(move || inner.flush(timeout))
            .await
            .map_err(|e| LogError::Config(e.to_string()))?
            .map_err(LogError::Kafka)
    }
}
