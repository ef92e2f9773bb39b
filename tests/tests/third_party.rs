//! A consumer we did not write reads our log: Python confluent-kafka with its
//! AvroDeserializer against the registry's ccompat API, checked field by field.

use chat_tests::{
    avro_json, one_of_every_kind, repo_root, strip_type_markers, third_party_python, TestLog,
};

#[tokio::test]
async fn python_confluent_kafka_avro_deserializer_reads_every_event_type() {
    let python = third_party_python().unwrap();
    let log = TestLog::start("thirdparty").await.unwrap();
    // One partition key so the reader sees them in the order written.
    let sent = one_of_every_kind();
    for e in &sent {
        log.producer.send(&log.topics.events, "k", e).await.unwrap();
    }
    let out = tokio::process::Command::new(python)
        .arg(repo_root().join("tests/py/read_with_confluent.py"))
        .args(["--brokers", &log.config.brokers])
        .args(["--registry", log.registry.url()])
        .args(["--topic", &log.topics.events])
        .args(["--count", &sent.len().to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), sent.len());
    for (e, mut got) in sent.iter().zip(lines) {
        assert_eq!(
            got["body"]["__type"],
            format!("chat.v1.{}", e.body.kind()),
            "the union branch is named"
        );
        strip_type_markers(&mut got);
        let expected = avro_json(&e.to_avro());
        let (got, expected) = (got.as_object().unwrap(), expected.as_object().unwrap());
        assert_eq!(
            got.len(),
            expected.len(),
            "same fields for {}",
            e.body.kind()
        );
        for (field, value) in expected {
            assert_eq!(got.get(field), Some(value), "{}.{field}", e.body.kind());
        }
    }
}
