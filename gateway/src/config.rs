//! The gateway's one config struct: a TOML file (`--config`) plus `CHAT_*`
//! environment overrides (`CHAT_LISTEN=0.0.0.0:8080`, `CHAT_LOG__BROKERS=...`,
//! `CHAT_AUTH__HS256_SECRET=...`, `CHAT_DEV_LOGIN=true`).
//!
//! Every limit a client can run into is here and is reported to the client in
//! the `hello` frame (see PROTOCOL.md).

use chat_log::LogConfig;
use chat_projectors::store::StoreConfig;
use chat_runtime::telemetry::LogFormat;
use chat_runtime::Secret;
use serde::{Deserialize, Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// How to reach Cassandra (history reads for `sync`, `history`, `chats`).
    pub store: StoreConfig,
    /// How client tokens are checked.
    pub auth: AuthConfig,
    /// Serve `POST /dev/login` (mints tokens for any user). Development only.
    pub dev_login: bool,
    /// Browser origins allowed to open `/ws`. A request without an `Origin`
    /// header (a non-browser client) is always allowed; `*` allows every
    /// origin (development). Empty: no browser origin. A list or a
    /// comma-separated string.
    #[serde(deserialize_with = "list_or_csv")]
    pub allowed_origins: Vec<String>,
    /// Per-connection and per-user limits.
    pub limits: Limits,
    /// Timeouts of the connection life cycle.
    pub timeouts: Timeouts,
    /// How long a graceful shutdown (SIGTERM) may take in total.
    pub shutdown_grace_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_id: "gw-1".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            dev_login: false,
            allowed_origins: Vec::new(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            shutdown_grace_ms: 10_000,
        }
    }
}

/// Token verification. At least one key source must be configured (or
/// `dev_login`, which then generates a random HS256 secret per process).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 shared secret (development, and `/dev/login` tokens).
    #[serde(skip_serializing)]
    pub hs256_secret: Option<Secret>,
    /// A JWKS file (`{"keys":[...]}`) with the RS256 / ES256 public keys of
    /// the identity provider (production). Keys are chosen by `kid`.
    pub jwks_path: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` / `nbf`, seconds.
    pub leeway_s: u64,
    /// Lifetime of tokens minted by `/dev/login`, seconds.
    pub dev_token_ttl_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_path: None,
            issuer: None,
            audience: None,
            leeway_s: 30,
            dev_token_ttl_s: 86_400,
        }
    }
}

/// Limits a client can run into.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket message accepted (all fragments together), bytes.
    /// Larger: close 1009.
    pub max_frame_bytes: usize,
    /// Most fragments one message may be split into. More: close 1009.
    pub max_fragments: usize,
    /// Longest `text` of a `send`, bytes of UTF-8.
    pub max_text_bytes: usize,
    /// Frames queued for one connection (outbound, and live events waiting
    /// for it). Full: close 4008 (slow consumer).
    pub outbound_queue: usize,
    /// Commands of one connection waiting for their ack. More: `rate_limited`.
    pub max_pending_commands: usize,
    /// Malformed or invalid frames in a row before close 4009.
    pub max_bad_frames: u32,
    /// Sustained commands per second per user (token bucket refill).
    pub send_rate_per_s: f64,
    /// Commands a user may send in a burst (token bucket size).
    pub send_burst: f64,
    /// Largest `limit` of a `history` request.
    pub max_history_limit: u32,
    /// Events per chat sent by `sync` to a device that does not know the
    /// chat yet (and when more than `sync_max_events_per_chat` were missed).
    pub sync_bootstrap_events: u32,
    /// Most events per chat `sync` sends after a known position; beyond it
    /// the newest `sync_bootstrap_events` are sent and the chat is listed in
    /// `synced.truncated`.
    pub sync_max_events_per_chat: u64,
    /// How long the reconnect-sync markers (`user_changes`) are kept: the
    /// table's `default_time_to_live` (30 days). A `sync` whose `since` is
    /// older (less [`FULL_RESYNC_MARGIN_MS`]) is answered as a full resync
    /// (`synced.full_resync`), never from markers that may have expired.
    /// At start the gateway refuses a value above the table's TTL.
    pub sync_markers_retention_ms: u64,
    /// Members of a new group, the creator included.
    pub max_group_members: u32,
    /// Open connections per gateway; more get 503 at the upgrade.
    pub max_connections: usize,
    /// Chats one connection may `watch` at once (presence and typing).
    pub max_watched_chats: usize,
    /// Shortest interval between two `typing` frames of a connection for
    /// one chat; faster: `rate_limited`.
    pub typing_interval_ms: u64,
    /// How long a typing indicator shows unless renewed (`expires_at`).
    pub typing_ttl_ms: u64,
    /// Reads (`history`, `chats`, `watch`, `receipts`, `devices`, `typing`,
    /// the user settings) one connection may have running at once, each
    /// its own task; more: `rate_limited`.
    pub max_concurrent_reads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_fragments: 64,
            max_text_bytes: 4096,
            outbound_queue: 1024,
            max_pending_commands: 64,
            max_bad_frames: 10,
            send_rate_per_s: 10.0,
            send_burst: 20.0,
            max_history_limit: 100,
            sync_bootstrap_events: 50,
            sync_max_events_per_chat: 1000,
            sync_markers_retention_ms: 30 * 24 * 3600 * 1000,
            max_group_members: 256,
            max_connections: 10_000,
            max_watched_chats: 16,
            typing_interval_ms: 1_000,
            typing_ttl_ms: 6_000,
            max_concurrent_reads: 8,
        }
    }
}

/// A `sync` whose `since` lies within this margin of the markers'
/// retention is already answered as a full resync (markers expire by their
/// write time, which may be a bucket earlier than the change).
pub const FULL_RESYNC_MARGIN_MS: i64 = 3_600_000;

/// Timeouts, milliseconds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// HTTP request headers must arrive within this (slowloris).
    pub header_read_ms: u64,
    /// The WebSocket upgrade must complete within this after the 101.
    pub upgrade_ms: u64,
    /// A command without a result from the sequencer after this gets
    /// `error unavailable`.
    pub ack_ms: u64,
    /// How long (from the connection's start) a first sync waits for an
    /// owner's `SessionRouted` answer for every `chat.events` partition
    /// before it is answered `unavailable` (the next sync keeps waiting).
    pub session_routed_ms: u64,
    /// How long a read (sync, history, chats, membership checks, a gap fill)
    /// waits for the history projector to pass what the connection was
    /// told before it is answered `unavailable` (a gap fill: close 1013).
    pub sync_progress_ms: u64,
    /// The heartbeat TTL: no frame (not even a ping) from the client for
    /// this long: close 4002, and the session ends (the user goes offline
    /// when it was their last). 0 disables.
    pub idle_ms: u64,
    /// How often clients should send `ping` (announced in `hello`; 5 to 30 s).
    pub heartbeat_interval_ms: u64,
    /// How often this gateway writes `GatewayHeartbeat` to every
    /// `chat.sessions` partition (the presence service expires the sessions
    /// of a gateway that stops).
    pub gateway_heartbeat_ms: u64,
    /// Presence changes of watched users are batched over this window.
    pub presence_batch_ms: u64,
    /// A frame that cannot be queued for this long (the client does not
    /// read): close 4008.
    pub slow_consumer_ms: u64,
    /// `delivered` frames of one chat on one connection within this window
    /// are appended as one receipt (the highest `up_to_seq`); 0: each on
    /// its own.
    pub delivered_coalesce_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read_ms: 10_000,
            upgrade_ms: 10_000,
            ack_ms: 10_000,
            session_routed_ms: 10_000,
            sync_progress_ms: 5_000,
            idle_ms: 45_000,
            heartbeat_interval_ms: 15_000,
            gateway_heartbeat_ms: 3_000,
            presence_batch_ms: 500,
            slow_consumer_ms: 5_000,
            delivered_coalesce_ms: 1000,
        }
    }
}

/// Milliseconds as a [`Duration`].
pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl GatewayConfig {
    /// Refuses values that cannot work (checked before anything connects).
    pub fn validate(&self) -> Result<(), String> {
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        self.log.check()?;
        self.store.check()?;
        if self.gateway_id.is_empty() || self.gateway_id.contains(',') {
            return Err("gateway_id must be non-empty and contain no comma".into());
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 {
            return Err("limits.max_frame_bytes must be at least 1024".into());
        }
        if l.max_text_bytes == 0 || l.max_text_bytes >= l.max_frame_bytes {
            return Err("limits.max_text_bytes must be > 0 and < limits.max_frame_bytes".into());
        }
        if l.max_concurrent_reads == 0 {
            return Err("limits.max_concurrent_reads must be > 0".into());
        }
        if l.sync_markers_retention_ms <= 2 * FULL_RESYNC_MARGIN_MS as u64 {
            return Err("limits.sync_markers_retention_ms must be more than 2 hours".into());
        }
        if l.outbound_queue < 16 || l.max_pending_commands == 0 || l.max_fragments == 0 {
            return Err(
                "limits.outbound_queue must be >= 16; max_pending_commands and max_fragments > 0"
                    .into(),
            );
        }
        if !(l.send_rate_per_s > 0.0 && l.send_burst >= 1.0) {
            return Err("limits.send_rate_per_s must be > 0 and limits.send_burst >= 1".into());
        }
        if l.max_history_limit == 0 || l.max_group_members < 2 {
            return Err(
                "limits.max_history_limit must be > 0, limits.max_group_members >= 2".into(),
            );
        }
        let t = &self.timeouts;
        if !(5_000..=30_000).contains(&t.heartbeat_interval_ms) {
            return Err("timeouts.heartbeat_interval_ms must be 5000 to 30000".into());
        }
        if t.gateway_heartbeat_ms == 0 || t.presence_batch_ms == 0 || l.typing_ttl_ms == 0 {
            return Err(
                "timeouts.gateway_heartbeat_ms, timeouts.presence_batch_ms and limits.typing_ttl_ms must be > 0"
                    .into(),
            );
        }
        if self.auth.hs256_secret.is_none() && self.auth.jwks_path.is_none() && !self.dev_login {
            return Err("auth: set auth.hs256_secret (development) or auth.jwks_path (production), or dev_login = true".into());
        }
        if let Some(s) = &self.auth.hs256_secret {
            if s.expose().len() < 16 {
                return Err("auth.hs256_secret must be at least 16 bytes".into());
            }
        }
        Ok(())
    }
}

fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Items {
        Csv(String),
        List(Vec<String>),
    }
    Ok(match Items::deserialize(d)? {
        Items::List(list) => list,
        Items::Csv(csv) => csv
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// Every option, for `--help`.
pub const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by an environment
variable CHAT_<KEY>, nested keys joined by a double underscore):
  gateway_id            this process's id, unique per gateway      [gw-1]
  listen                address served (/ws, /dev/login, /health, /metrics) [127.0.0.1:8080]
  log_format            pretty | json                               [pretty]
  dev_login             serve POST /dev/login (development only)    [false]
  allowed_origins       browser origins allowed on /ws; * = any     [] (none; non-browser clients always)
  shutdown_grace_ms     total time a graceful shutdown may take     [10000]
  auth.hs256_secret     HS256 secret (>= 16 bytes; development)     [unset; random when dev_login]
  auth.jwks_path        JWKS file with RS256/ES256 public keys      [unset]
  auth.issuer           required iss claim                          [unset]
  auth.audience         required aud claim                          [unset]
  auth.leeway_s         clock skew tolerated on exp/nbf             [30]
  auth.dev_token_ttl_s  lifetime of /dev/login tokens               [86400]
  limits.max_frame_bytes        largest client message              [65536]
  limits.max_fragments          fragments per message               [64]
  limits.max_text_bytes         longest send text                   [4096]
  limits.outbound_queue         frames queued per connection        [1024]
  limits.max_pending_commands   unacked commands per connection     [64]
  limits.max_bad_frames         bad frames in a row before 4009     [10]
  limits.send_rate_per_s        commands per second per user        [10]
  limits.send_burst             command burst per user              [20]
  limits.max_history_limit      largest history page                [100]
  limits.sync_bootstrap_events  events per new chat on sync         [50]
  limits.sync_max_events_per_chat events per known chat on sync     [1000]
  limits.sync_markers_retention_ms user_changes TTL; older since -> full resync [2592000000]
  limits.max_group_members      members of a new group              [256]
  limits.max_connections        connections per gateway             [10000]
  limits.max_watched_chats      chats watched per connection        [16]
  limits.typing_interval_ms     shortest typing interval per chat   [1000]
  limits.typing_ttl_ms          typing indicator lifetime           [6000]
  limits.max_concurrent_reads   reads running at once per connection [8]
  timeouts.header_read_ms       HTTP headers must arrive within     [10000]
  timeouts.upgrade_ms           WebSocket upgrade completes within  [10000]
  timeouts.ack_ms               command result wait                 [10000]
  timeouts.session_routed_ms    first sync: wait for every partition's router [10000]
  timeouts.sync_progress_ms     reads: wait for the history projector         [5000]
  timeouts.idle_ms              heartbeat TTL: close silent clients [45000]
  timeouts.heartbeat_interval_ms ping interval told to clients      [15000]
  timeouts.gateway_heartbeat_ms GatewayHeartbeat interval           [3000]
  timeouts.presence_batch_ms    presence batching window            [500]
  timeouts.slow_consumer_ms     close clients that do not read      [5000]
  timeouts.delivered_coalesce_ms one delivered receipt per chat per window [1000]
  log.brokers           Kafka bootstrap servers                     [127.0.0.1:9092]
  log.registry_url      schema registry (Confluent API) base URL    [http://127.0.0.1:8081/apis/ccompat/v7]
  log.topic_prefix      prefix before every topic name              []
  log.chat_partitions   partitions of the chat topics               [12]
  log.replication_factor replication of created topics              [1]
  log.min_insync_replicas min.insync.replicas of acknowledged topics [1]
  log.security_protocol plaintext | ssl | sasl_plaintext | sasl_ssl [plaintext]
  log.sasl_mechanism    PLAIN, SCRAM-SHA-256, ... (sasl.mechanisms) [unset]
  log.sasl_username     SASL user                                   [unset]
  log.sasl_password     SASL password (secret, never printed)       [unset]
  log.ssl_ca_location   CA file of the brokers' certificates        [unset]
  log.ssl_certificate_location client certificate (PEM)             [unset]
  log.ssl_key_location  client private key (PEM)                    [unset]
  log.linger_ms         producer linger.ms                          [0]
  log.fetch_min_bytes   consumer fetch.min.bytes                    [1]
  log.fetch_wait_max_ms consumer fetch.wait.max.ms                  [100]
  log.connect_timeout_ms start-up reachability timeout              [5000]
  store.nodes           Cassandra contact points                    [127.0.0.1:9042]
  store.keyspace        keyspace                                    [chat]
  store.keyspace_alias  follow this alias instead of store.keyspace (chat-admin switch) [unset]
  store.control_keyspace keyspace of keyspace_aliases              [chat_control]
  store.alias_poll_ms   how often the alias is read                 [1000]
  store.connect_timeout_ms                                          [5000]
  store.username        Cassandra user (password authenticator)     [unset]
  store.password        its password (secret, never printed)        [unset]
  store.consistency     one|two|three|quorum|all|local_quorum|each_quorum|local_one [local_quorum]
  store.tls             TLS to Cassandra: not in this build, true is refused [false]
  store.tls_ca_location, store.tls_certificate_location, store.tls_key_location [unset]
Example: CHAT_LISTEN=0.0.0.0:8080 CHAT_DEV_LOGIN=true CHAT_ALLOWED_ORIGINS='*' chat-gateway";

impl chat_runtime::ServiceConfig for GatewayConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_key_source() {
        let c = GatewayConfig::default();
        assert!(c.validate().unwrap_err().contains("auth"));
        let c = GatewayConfig {
            dev_login: true,
            ..GatewayConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn origins_accept_a_list_or_csv() {
        let c: GatewayConfig =
            toml::from_str("allowed_origins = \"https://a.example, *\"").unwrap();
        assert_eq!(c.allowed_origins, ["https://a.example", "*"]);
        let c: GatewayConfig = toml::from_str("allowed_origins = [\"https://b\"]").unwrap();
        assert_eq!(c.allowed_origins, ["https://b"]);
    }

    #[test]
    fn short_secrets_are_refused() {
        let c: GatewayConfig = toml::from_str("[auth]\nhs256_secret = \"short\"").unwrap();
        assert!(c.validate().unwrap_err().contains("16"));
    }
}
