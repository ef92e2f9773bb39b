//! Schema evolution as a check: every released Envelope schema
//! (`schemas/released/envelope-v<N>.json`, oldest first) is registered under
//! one fresh subject of the real registry with `BACKWARD_TRANSITIVE`, then
//! the schema composed from today's `.avsc` files. A change that cannot read
//! every record ever written fails here, with the registry's list of
//! differences, before it ships.

use chat_log::{LogError, SchemaRegistry};
use chat_tests::log_config;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

fn avro(text: &str) -> SuppliedSchema {
    SuppliedSchema::new(
        Some("chat.v1.Envelope".into()),
        SchemaType::Avro,
        text.to_string(),
    )
}

/// A registry subject holding every released version, in order.
async fn subject_with_released_versions(test: &str) -> (SchemaRegistry, String) {
    let config = log_config(test);
    let registry = SchemaRegistry::new(&config).unwrap();
    let topic = format!("{}released", config.topic_prefix);
    let versions = chat_schemas::released::versions(chat_schemas::released::dir()).unwrap();
    assert!(
        versions.len() >= 2,
        "the released history is in schemas/released"
    );
    for (n, text) in &versions {
        if let Err(e) = registry.register_schema(&topic, avro(text)).await {
            panic!("released version {n} is not compatible with the versions before it: {e}");
        }
    }
    assert_eq!(
        registry
            .compatibility(&format!("{topic}-value"))
            .await
            .unwrap(),
        "BACKWARD_TRANSITIVE"
    );
    (registry, topic)
}

#[tokio::test]
async fn the_current_schema_reads_every_released_version() {
    let (registry, topic) = subject_with_released_versions("compat-current").await;
    if let Err(e) = registry
        .register_schema(&topic, avro(chat_schemas::envelope_schema_json()))
        .await
    {
        panic!(
            "the .avsc files in schemas/avro/ break BACKWARD_TRANSITIVE compatibility with a \
             released version (schemas/README.md, \"Compatibility\", says what may change): {e}"
        );
    }
}

#[tokio::test]
async fn a_change_that_drops_an_event_type_is_refused_against_the_released_versions() {
    // The check can fail: the current schema without one of the union
    // branches of `body` cannot read records written with it.
    let (registry, topic) = subject_with_released_versions("compat-broken").await;
    let mut schema: serde_json::Value =
        serde_json::from_str(chat_schemas::envelope_schema_json()).unwrap();
    let body = schema["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "body")
        .unwrap();
    let branches = body["type"].as_array_mut().unwrap();
    // Not the newest branch: without it, a release that only added one
    // event type equals the previous release, which the registry answers
    // with that version's id (docs do not count). The one before it makes a
    // schema no release had.
    let dropped = branches.remove(branches.len() - 2);
    let err = registry
        .register_schema(&topic, avro(&schema.to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LogError::SchemaRejected { .. }),
        "dropping {} should be refused, got {err}",
        dropped["name"]
    );
}
