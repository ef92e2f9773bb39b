//! Schema ids survive a restart of the registry (kafkasql storage keeps them
//! in Kafka). Its own test binary: it restarts the shared registry, which the
//! other binaries' tests must not see happen.

use chat_log::SchemaRegistry;
use chat_tests::{key_of, one_of_every_kind, repo_root, TestLog};
use std::time::Duration;

#[tokio::test]
async fn schema_ids_survive_a_registry_restart() {
    let log = TestLog::start("restart").await.unwrap();
    let sent = one_of_every_kind();
    for e in &sent {
        log.producer
            .send(&log.topics.events, &key_of(e), e)
            .await
            .unwrap();
    }
    let id_before = log
        .registry
        .register_envelope(&log.topics.events)
        .await
        .unwrap();

    let status = std::process::Command::new("bash")
        .arg(repo_root().join("infra/stack.sh"))
        .args(["restart", "registry"])
        .status()
        .expect("run infra/stack.sh");
    assert!(status.success(), "registry restarted");

    // A fresh client (empty caches) gets the same id for the same schema ...
    let fresh = SchemaRegistry::new(&log.config).unwrap();
    fresh.check_reachable().await.unwrap();
    let id_after = fresh.register_envelope(&log.topics.events).await.unwrap();
    assert_eq!(id_before, id_after, "schema id kept across the restart");

    // ... and records written before the restart decode with that client,
    // which must look the writer schema up by id in the restarted registry.
    let raw = chat_log::read_raw(
        &log.config,
        &log.topics.events,
        sent.len(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(raw.len(), sent.len());
    for r in &raw {
        let (id, decoded) = fresh
            .decode(&r.payload)
            .await
            .expect("decodes after restart");
        assert_eq!(id, id_before);
        assert!(sent.contains(&decoded));
    }
}
