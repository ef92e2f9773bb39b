//! Typed errors of the log boundary. Each says whether retrying can help.

use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot reach Kafka at {brokers}: {detail}. Start the local stack with `make infra-up` (or set log.brokers / CHAT_LOG__BROKERS)")]
    BrokerUnreachable { brokers: String, detail: String },
    #[error("cannot reach the schema registry at {url}: {detail}. Start the local stack with `make infra-up` (or set log.registry_url / CHAT_LOG__REGISTRY_URL)")]
    RegistryUnreachable { url: String, detail: String },
    #[error("topic {topic} does not exist. Create the platform's topics with `chat-admin topics` (run by `make infra-up`)")]
    UnknownTopic { topic: String },
    #[error("the registry refused schema for subject {subject}: {detail}")]
    SchemaRejected { subject: String, detail: String },
    #[error("schema registry error: {detail}")]
    Registry { detail: String, retryable: bool },
    #[error("cannot encode event: {0}")]
    Encode(String),
    #[error("cannot decode record at {topic}[{partition}]@{offset}: {detail}")]
    Decode {
        topic: String,
        partition: i32,
        offset: i64,
        detail: String,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl LogError {
    /// True when the same call may succeed later without any change by an operator.
    pub fn retryable(&self) -> bool {
        match self {
            LogError::BrokerUnreachable { .. } | LogError::RegistryUnreachable { .. } => true,
            LogError::Registry { retryable, .. } => *retryable,
            LogError::Kafka(e) => kafka_retryable(e),
            LogError::UnknownTopic { .. }
            | LogError::SchemaRejected { .. }
            | LogError::Encode(_)
            | LogError::Decode { .. }
            | LogError::Config(_) => false,
        }
    }
}

fn kafka_retryable(e: &KafkaError) -> bool {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::QueueFull
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::NetworkException,
        ) => true,
        Some(_) => false,
        None => true,
    }
}

/// Maps produce/consume errors that name a missing topic to [`LogError::UnknownTopic`].
pub(crate) fn from_kafka(e: KafkaError, topic: &str) -> LogError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            LogError::UnknownTopic {
                topic: topic.to_string(),
            }
        }
        _ => LogError::Kafka(e),
    }
}

/// Consumer errors librdkafka reports while it recovers by itself: a broker
/// that went away (it reconnects, and fetches from the new leader once the
/// metadata says who that is), a coordinator that moved or is loading. They
/// are events, not a broken consumer: a service that stopped on them would
/// die with every broker restart.
pub(crate) fn transient_consume_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
        )
    )
}

/// `consumer.recv()`, logging and skipping [transient](transient_consume_error)
/// errors; any other error is returned.
pub(crate) async fn recv_through_transient<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
) -> Result<BorrowedMessage<'_>, KafkaError> {
    loop {
        match consumer.recv().await {
            Err(e) if transient_consume_error(&e) => {
                tracing::warn!(error = %e, "transient Kafka error; the consumer recovers by itself");
                // The same condition is reported once per broker and state
                // change; a short pause keeps a flapping broker from spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_broker_is_transient_a_bad_topic_is_not() {
        let transient = KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(transient_consume_error(&transient));
        assert!(transient_consume_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown
        )));
        let fatal = KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert!(!transient_consume_error(&fatal));
        assert!(!transient_consume_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
    }
}
