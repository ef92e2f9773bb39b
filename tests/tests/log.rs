//! The typed log against the real Kafka and Apicurio started by `make infra-up`.

use chat_log::{EventConsumer, HandlerError, LogConfig, LogError, SchemaRegistry};
use chat_tests::{consume_n, key_of, one_of_every_kind, TestLog};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn every_event_type_round_trips_through_kafka_with_registry_ids() {
    let log = TestLog::start("roundtrip").await.unwrap();
    let sent = one_of_every_kind();
    for e in &sent {
        log.producer
            .send(&log.topics.events, &key_of(e), e)
            .await
            .unwrap();
    }
    let got = consume_n(&log, "rt", &[&log.topics.events], sent.len(), WAIT)
        .await
        .unwrap();
    assert_eq!(got.len(), sent.len(), "every record comes back");
    let expected_id = log
        .registry
        .register_envelope(&log.topics.events)
        .await
        .unwrap();
    for e in &sent {
        let back = got
            .iter()
            .find(|g| g.envelope.event_id == e.event_id)
            .unwrap_or_else(|| panic!("{} not consumed", e.body.kind()));
        assert_eq!(&back.envelope, e, "{} round-trips", e.body.kind());
        assert_eq!(
            back.schema_id, expected_id,
            "records carry the registry's id"
        );
        assert_eq!(back.trace_id, e.trace_id, "trace id travels in a header");
    }
    let kinds: std::collections::BTreeSet<_> = got.iter().map(|g| g.envelope.body.kind()).collect();
    assert_eq!(kinds.len(), chat_schemas::Body::KINDS.len());
}

#[tokio::test]
async fn registry_sets_backward_transitive_and_rejects_an_incompatible_change() {
    let log = TestLog::start("compat").await.unwrap();
    let subject = format!("{}-value", log.topics.events);
    assert_eq!(
        log.registry.compatibility(&subject).await.unwrap(),
        "BACKWARD_TRANSITIVE"
    );
    // A new required field without a default cannot read earlier data.
    let broken = chat_schemas::envelope_schema_json().replacen(
        r#""fields":["#,
        r#""fields":[{"name":"required_later","type":"string","doc":"test"},"#,
        1,
    );
    assert_ne!(broken, chat_schemas::envelope_schema_json());
    let err = log
        .registry
        .register_schema(
            &log.topics.events,
            SuppliedSchema::new(Some("chat.v1.Envelope".into()), SchemaType::Avro, broken),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, LogError::SchemaRejected { .. }),
        "expected a rejection, got {err}"
    );
    // A compatible change (a new optional field with a default) is accepted.
    let evolved = chat_schemas::envelope_schema_json().replacen(
        r#""fields":["#,
        r#""fields":[{"name":"added_later","type":["null","string"],"default":null,"doc":"test"},"#,
        1,
    );
    let id = log
        .registry
        .register_schema(
            &log.topics.events,
            SuppliedSchema::new(Some("chat.v1.Envelope".into()), SchemaType::Avro, evolved),
        )
        .await
        .unwrap();
    assert_ne!(id, 0);
}

#[tokio::test]
async fn undecodable_record_goes_to_the_dead_letter_topic_and_the_consumer_goes_on() {
    let log = TestLog::start("dlq").await.unwrap();
    let topic = log.topics.events.clone();
    let garbage = b"\x00\x00\x00\x00\x01not avro at all".to_vec();
    let bad = log
        .producer
        .send_raw(&topic, Some(b"k"), &garbage, Default::default())
        .await
        .unwrap();
    let also_bad = log
        .producer
        .send_raw(&topic, Some(b"k"), b"plain text", Default::default())
        .await
        .unwrap();
    let good = &one_of_every_kind()[0];
    log.producer.send(&topic, "k", good).await.unwrap();

    let got = consume_n(&log, "dlq", &[&topic], 1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].envelope, good);

    let dead = chat_log::read_raw(&log.config, &log.topics.dlq, 2, WAIT)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "both bad records are dead-lettered");
    let header = |r: &chat_log::RawRecord, k: &str| {
        r.headers
            .iter()
            .find(|(hk, _)| hk == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let mut offsets: Vec<i64> = dead
        .iter()
        .map(|r| header(r, "dlq.offset").parse().unwrap())
        .collect();
    offsets.sort();
    assert_eq!(offsets, vec![bad.offset, also_bad.offset]);
    for r in &dead {
        assert_eq!(header(r, "dlq.topic"), topic);
        assert_eq!(header(r, "dlq.partition"), bad.partition.to_string());
        assert!(!header(r, "dlq.error").is_empty());
    }
    assert!(
        dead.iter().any(|r| r.payload == garbage),
        "original bytes kept"
    );
}

#[tokio::test]
async fn a_consumer_that_crashes_mid_batch_rereads_from_the_last_stored_offset() {
    let log = TestLog::start("crash").await.unwrap();
    let topic = log.topics.events.clone();
    // One key: every record lands in one partition, in order.
    let mut sent = Vec::new();
    for i in 0..20u64 {
        let mut e = one_of_every_kind().remove(0);
        e.seq = Some(i + 1);
        let at = log.producer.send(&topic, "one-chat", &e).await.unwrap();
        sent.push((at.offset, e));
    }

    // First member handles 7 records, then dies on the 8th.
    let first = EventConsumer::connect(
        &log.config,
        "g",
        &[&topic],
        log.producer.clone(),
        &log.topics.dlq,
    )
    .await
    .unwrap();
    let mut handled = Vec::new();
    let crashed = first
        .run(
            |ev| {
                let crash = handled.len() == 7;
                if !crash {
                    handled.push(ev.offset);
                }
                async move {
                    if crash {
                        Err(HandlerError::Fatal("simulated crash".into()))
                    } else {
                        Ok(())
                    }
                }
            },
            CancellationToken::new(),
        )
        .await;
    assert!(crashed.is_err());
    assert_eq!(handled.len(), 7);
    drop(first);

    // The next member of the group starts exactly at the unhandled record.
    let rest = consume_n(&log, "g", &[&topic], 13, WAIT).await.unwrap();
    assert_eq!(rest.len(), 13, "nothing after the crash is lost");
    assert_eq!(
        rest[0].offset, sent[7].0,
        "re-reads from the last stored offset"
    );
    let seqs: Vec<u64> = rest.iter().map(|r| r.envelope.seq.unwrap()).collect();
    assert_eq!(seqs, (8..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn kafka_down_is_a_clear_error_not_a_hang() {
    let cfg = LogConfig {
        brokers: "127.0.0.1:1".into(),
        connect_timeout_ms: 2_000,
        ..LogConfig::default()
    };
    let started = std::time::Instant::now();
    let err = chat_log::topics::check_brokers(&cfg).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(matches!(err, LogError::BrokerUnreachable { .. }));
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:1") && text.contains("make infra-up"),
        "{text}"
    );
    assert!(err.retryable());
}

#[tokio::test]
async fn registry_unreachable_is_a_clear_error() {
    let cfg = LogConfig {
        registry_url: "http://127.0.0.1:1/apis/ccompat/v7".into(),
        connect_timeout_ms: 2_000,
        ..LogConfig::default()
    };
    let reg = SchemaRegistry::new(&cfg).unwrap();
    let err = reg.check_reachable().await.unwrap_err();
    assert!(matches!(err, LogError::RegistryUnreachable { .. }));
    assert!(err.to_string().contains("make infra-up"), "{err}");
    let err = reg.register_envelope("chat.events").await.unwrap_err();
    assert!(
        matches!(
            err,
            LogError::RegistryUnreachable { .. } | LogError::Registry { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_topic_is_named_in_the_error() {
    let log = TestLog::start("unknown").await.unwrap();
    let missing = format!("{}no.such.topic", log.config.topic_prefix);
    let err = EventConsumer::connect(
        &log.config,
        "g",
        &[&missing],
        log.producer.clone(),
        &log.topics.dlq,
    )
    .await
    .unwrap_err();
    match &err {
        LogError::UnknownTopic { topic } => assert_eq!(topic, &missing),
        other => panic!("expected UnknownTopic, got {other}"),
    }
    assert!(err.to_string().contains(&missing));
}
