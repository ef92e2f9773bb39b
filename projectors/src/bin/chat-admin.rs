//! `chat-admin`: the operator's set-up tool. Every command is idempotent.
//!
//!   chat-admin topics    create the platform's Kafka topics
//!   chat-admin schemas   register the envelope schema on every topic (BACKWARD_TRANSITIVE)
//!   chat-admin migrate   create the Cassandra keyspace and tables
//!   chat-admin setup     all three, in that order
//!   chat-admin dlq       dead letters: list, show, redrive, drop

use anyhow::Context;
use chat_log::{LogConfig, SchemaRegistry, Topics};
use chat_projectors::store::{self, StoreConfig};
use chat_runtime::telemetry::LogFormat;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "chat-admin", version, about = "Create the platform's topics, schemas and tables (idempotent)", after_help = OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create every Kafka topic that does not exist yet.
    Topics,
    /// Register the envelope schema under every topic's value subject.
    Schemas,
    /// Create the Cassandra keyspace and apply pending migrations.
    Migrate,
    /// topics, schemas and migrate, in that order.
    Setup,
    /// Dead letters: list, show, redrive, drop (`chat-admin dlq --help`).
    Dlq(chat_projectors::admin::dlq::DlqArgs),
}

/// chat-admin's config: how to reach the log and the store.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct AdminConfig {
    /// Log line format: `pretty` or `json`.
    log_format: LogFormat,
    /// Kafka and the schema registry.
    log: LogConfig,
    /// Cassandra.
    store: StoreConfig,
}

const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by CHAT_<KEY>, nested
keys joined by a double underscore, e.g. CHAT_STORE__KEYSPACE=chat):
  log.*                 as in chat-gateway --help (brokers, registry_url, topic_prefix, ...)
  log.replication_factor replication of created topics               [1]
  log.min_insync_replicas min.insync.replicas of the topics carrying acknowledged
                        data (commands, events, sessions, presence, results,
                        push, dlq); set when a topic is created      [1]
  log.security_protocol, log.sasl_*, log.ssl_*: as in chat-gateway --help
  store.nodes           Cassandra contact points                     [127.0.0.1:9042]
  store.keyspace        keyspace of every table                      [chat]
  store.replication     { class = \"SimpleStrategy\", replication_factor = 1 } or
                        { class = \"NetworkTopologyStrategy\", datacenters = { dc1 = 3 } }
  store.connect_timeout_ms                                           [5000]
  store.username        Cassandra user (password authenticator)     [unset]
  store.password        its password (secret, never printed)        [unset]
  store.consistency     one|two|three|quorum|all|local_quorum|each_quorum|local_one [local_quorum]
  store.tls             TLS to Cassandra: not in this build, true is refused [false]
  store.tls_ca_location, store.tls_certificate_location, store.tls_key_location [unset]
  log_format            pretty | json                                [pretty]";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config: AdminConfig = match chat_runtime::load_config(args.config.as_deref(), "CHAT_") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-admin: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = config.log.check().and_then(|()| config.store.check()) {
        eprintln!("chat-admin: invalid configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    chat_runtime::telemetry::init(config.log_format);
    match run(args.command, &config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-admin: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: &AdminConfig) -> anyhow::Result<()> {
    if let Command::Dlq(args) = command {
        return chat_projectors::admin::dlq::run(args, &config.log).await;
    }
    let all = matches!(command, Command::Setup);
    let topics = Topics::new(&config.log);
    if all || matches!(command, Command::Topics) {
        chat_log::topics::ensure_topics(&config.log, &topics.specs()).await?;
        println!("topics: {} present", topics.specs().len());
    }
    if all || matches!(command, Command::Schemas) {
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
    if all || matches!(command, Command::Migrate) {
        let store = store::connect(&config.store).await?;
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
