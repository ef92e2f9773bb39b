//! `topics`, `schemas`, `migrate`, `setup`: the idempotent set-up.

use anyhow::Context;
use chat_log::{SchemaRegistry, Topics};

use super::AdminConfig;

/// Which set-up steps to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Topics,
    Schemas,
    Migrate,
    /// All three, in that order.
    All,
}

pub async fn run(step: Step, config: &AdminConfig) -> anyhow::Result<()> {
    let all = step == Step::All;
    let topics = Topics::new(&config.log);
    if all || step == Step::Topics {
        chat_log::topics::ensure_topics(&config.log, &topics.specs()).await?;
        println!("topics: {} present", topics.specs().len());
    }
    if all || step == Step::Schemas {
        let registry = SchemaRegistry::new(&config.log)?;
        registry.check_reachable().await?;
        for topic in topics.envelope_topics() {
            let id = registry
                .register_envelope(&topic)
                .await
                .with_context(|| format!("registering {topic}-value"))?;
            println!(
                "schema: {topic}-value -> id {id} ({})",
                chat_log::registry::COMPATIBILITY
            );
        }
    }
    if all || step == Step::Migrate {
        let store = crate::store::connect(&config.store).await?;
        let report = store.migrate(&config.store.replication).await?;
        println!(
            "cassandra keyspace {}: applied {:?}, already applied {:?}",
            store.keyspace(),
            report.applied,
            report.already
        );
    }
    Ok(())
}
