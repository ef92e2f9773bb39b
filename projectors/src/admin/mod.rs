//! `chat-admin`'s commands, one module per command family; the binary
//! (`src/bin/chat-admin.rs`) only parses arguments and dispatches here.
//!
//! - [`setup`]: `topics`, `schemas`, `migrate`, `setup` (idempotent set-up);
//! - [`replay`]: `replay` (rebuild a projection from the log into a keyspace);
//! - [`verify`]: `verify` (compare two keyspaces' projections);
//! - [`switch`]: `switch` and `drop-keyspace` (move services between
//!   keyspaces through an alias; drop the old one explicitly);
//! - [`dlq`]: `dlq list|show|redrive|drop`, the operator's tools on dead
//!   letters.
//!
//! Every command explains at this edge what could not be reached (Kafka,
//! Cassandra, the registry) and, with `--json`, prints one JSON report on
//! stdout (human progress goes to stderr).

pub mod dlq;
pub mod replay;
pub mod setup;
pub mod switch;
pub mod verify;

use chat_log::LogConfig;
use chat_runtime::telemetry::LogFormat;
use serde::{Deserialize, Serialize};

use crate::store::{self, Store, StoreConfig};

/// chat-admin's config: how to reach the log and the store.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// Kafka and the schema registry.
    pub log: LogConfig,
    /// Cassandra.
    pub store: StoreConfig,
}

/// Every option of `chat-admin`, for `--help`.
pub const OPTIONS_HELP: &str = "\
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
  store.control_keyspace keyspace of the keyspace_aliases table (switch) [chat_control]
  log_format            pretty | json                                [pretty]

Exit codes: 0 done; 1 failed (the message says what could not be reached);
2 invalid configuration; 3 verify found differences; 130 interrupted
(replay: run the same command again to resume).";

/// Connects to Cassandra for `keyspace`, explaining a failure.
pub async fn connect(cfg: &StoreConfig, keyspace: &str) -> anyhow::Result<Store> {
    let mut cfg = cfg.clone();
    cfg.keyspace = keyspace.to_string();
    // The error names the nodes and what to do.
    Ok(store::connect(&cfg).await?)
}

/// Refuses a keyspace name that is not a plain CQL identifier.
pub fn check_keyspace(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        store::is_identifier(name),
        "keyspace {name:?} must be a letter then up to 47 letters, digits or _"
    );
    Ok(())
}

/// Prints `value` as one line of JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
