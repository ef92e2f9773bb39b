//! The gateway's one config struct: a TOML file (`--config`) plus `CHAT_*`
//! environment overrides (`CHAT_LISTEN=0.0.0.0:8080`, `CHAT_LOG__BROKERS=...`).

use chat_log::LogConfig;
use chat_runtime::telemetry::LogFormat;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This process's id: names its delivery partition and its sessions.
    /// Unique per running gateway.
    pub gateway_id: String,
    /// Where clients and the admin endpoints are served.
    pub listen: SocketAddr,
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// How to reach Kafka and the schema registry.
    pub log: LogConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_id: "gw-1".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
        }
    }
}

/// Every option, for `--help`.
pub const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by an environment
variable CHAT_<KEY>, nested keys joined by a double underscore):
  gateway_id            this process's id, unique per gateway      [gw-1]
  listen                address served (clients, /health, /metrics) [127.0.0.1:8080]
  log_format            pretty | json                               [pretty]
  log.brokers           Kafka bootstrap servers                     [127.0.0.1:9092]
  log.registry_url      schema registry (Confluent API) base URL    [http://127.0.0.1:8081/apis/ccompat/v7]
  log.topic_prefix      prefix before every topic name              []
  log.chat_partitions   partitions of chat.commands / chat.events   [12]
  log.replication_factor replication of created topics              [1]
  log.linger_ms         producer linger.ms                          [0]
  log.fetch_wait_max_ms consumer fetch.wait.max.ms                  [5]
  log.connect_timeout_ms start-up reachability timeout              [5000]
Example: CHAT_LISTEN=0.0.0.0:8080 CHAT_LOG__BROKERS=kafka:9092 chat-gateway";
