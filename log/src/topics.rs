//! Every topic of the platform, named once. Names are public interface
//! (analytics and replay tooling read them): keep them stable.
//!
//! | topic | key | what |
//! |---|---|---|
//! | `chat.commands` | chat id | client commands as the gateway accepted them; the sequencer's input |
//! | `chat.events` | chat id | sequenced events: the source of truth, kept forever |
//! | `chat.sessions` | user id | session opened / closed, the delivery router's registry |
//! | `chat.presence` | user id | presence changes (compacted: the latest per user) |
//! | `chat.user-settings` | user id (hidden) / user id, NUL, device id (revocation) | `PresenceSettingChanged` and `DeviceRevoked` copied from `chat.sessions` by the presence service (compacted, kept forever: outlives `chat.sessions`' 7 days) |
//! | `chat.ephemeral` | chat id | typing indicators: routed to watchers, never stored in history (1 hour) |
//! | `chat.deliveries` | gateway id | events routed to the gateways holding recipients |
//! | `chat.results` | gateway id | the sequencer's `CommandResult`s (acks), apart from deliveries so an open sequencer transaction never holds back live events |
//! | `chat.push` | user id | push tasks for users with no live session |
//! | `chat.dlq` | original key | records that could not be decoded or handled, with their origin in headers |
//! | `chat.dlq-handled` | `<dlq partition>:<dlq offset>` | which dead letters were re-driven or dropped (compacted; JSON, not Avro: see [`crate::dlq`]) |
//! | `chat.sequencer-state` | chat id / `@applied` | the sequencer's state store changelog (compacted; not Avro: see `chat_sequencer::store`) |
//! | `chat.router-state` | chat id / `@applied` | the router's membership store changelog (compacted; not Avro) |

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

use crate::{LogConfig, LogError};

const DAY_MS: i64 = 24 * 3600 * 1000;

/// One topic's name and creation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicSpec {
    /// Full name, prefix included.
    pub name: String,
    pub partitions: i32,
    /// `cleanup.policy`: `delete` or `compact`.
    pub cleanup_policy: &'static str,
    /// `retention.ms`; -1 keeps records forever.
    pub retention_ms: i64,
    /// Carries data a client or service was told is written (commands,
    /// events, sessions, presence, results, push tasks, dead letters): created
    /// with `min.insync.replicas` = [`LogConfig::min_insync_replicas`].
    /// Others (`chat.ephemeral`, `chat.deliveries`, both re-derivable) get
    /// the broker's default.
    pub acknowledged: bool,
}

/// The names of the platform's topics, with the configured prefix applied.
#[derive(Clone, Debug)]
pub struct Topics {
    pub commands: String,
    pub events: String,
    pub sessions: String,
    pub presence: String,
    pub user_settings: String,
    pub ephemeral: String,
    pub deliveries: String,
    pub results: String,
    pub push: String,
    pub dlq: String,
    /// Dead letters re-driven or dropped (see [`crate::dlq`]).
    pub dlq_handled: String,
    /// Changelog of the sequencer's state store (partition = `chat.events` partition).
    pub sequencer_state: String,
    /// Changelog of the router's membership store (partition = `chat.events` partition).
    pub router_state: String,
    chat_partitions: i32,
}

impl Topics {
    pub fn new(config: &LogConfig) -> Self {
        let p = &config.topic_prefix;
        Self {
            commands: format!("{p}chat.commands"),
            events: format!("{p}chat.events"),
            sessions: format!("{p}chat.sessions"),
            presence: format!("{p}chat.presence"),
            user_settings: format!("{p}chat.user-settings"),
            ephemeral: format!("{p}chat.ephemeral"),
            deliveries: format!("{p}chat.deliveries"),
            results: format!("{p}chat.results"),
            push: format!("{p}chat.push"),
            dlq: format!("{p}chat.dlq"),
            dlq_handled: format!("{p}chat.dlq-handled"),
            sequencer_state: format!("{p}chat.sequencer-state"),
            router_state: format!("{p}chat.router-state"),
            chat_partitions: config.chat_partitions,
        }
    }

    /// Every topic with its creation settings.
    pub fn specs(&self) -> Vec<TopicSpec> {
        let chat = self.chat_partitions;
        let spec =
            |name: &String, partitions, cleanup_policy, retention_ms, acknowledged| TopicSpec {
                name: name.clone(),
                partitions,
                cleanup_policy,
                retention_ms,
                acknowledged,
            };
        vec![
            spec(&self.commands, chat, "delete", 7 * DAY_MS, true),
            spec(&self.events, chat, "delete", -1, true),
            spec(&self.sessions, chat, "delete", 7 * DAY_MS, true),
            spec(&self.presence, chat, "compact", -1, true),
            spec(&self.user_settings, chat, "compact", -1, true),
            spec(&self.ephemeral, chat, "delete", 3_600_000, false),
            spec(&self.deliveries, chat, "delete", DAY_MS, false),
            spec(&self.results, chat, "delete", DAY_MS, true),
            spec(&self.push, chat, "delete", 7 * DAY_MS, true),
            spec(&self.dlq, 1, "delete", 30 * DAY_MS, true),
            spec(&self.dlq_handled, 1, "compact", -1, true),
            spec(&self.sequencer_state, chat, "compact", -1, true),
            spec(&self.router_state, chat, "compact", -1, true),
        ]
    }

    /// Topics whose records are [`chat_schemas::Envelope`]s (all but the
    /// state stores' changelogs: the dead-letter topic keeps the original
    /// bytes, which are envelopes too).
    pub fn envelope_topics(&self) -> Vec<String> {
        self.specs()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| {
                *n != self.sequencer_state && *n != self.router_state && *n != self.dlq_handled
            })
            .collect()
    }
}

/// The `chat.deliveries` partition a gateway tails. Producers set the
/// partition explicitly with this function (rather than relying on a client's
/// key partitioner, which differs between librdkafka and Java), so every
/// writer and the gateway agree. Gateways that share a partition filter by key.
pub fn deliveries_partition(gateway_id: &str, partitions: i32) -> i32 {
    // FNV-1a: stable across versions and languages, trivial to reimplement.
    let mut h: u32 = 0x811c_9dc5;
    for b in gateway_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % partitions.max(1) as u32) as i32
}

/// The settings every client of the log shares: brokers, security
/// ([`LogConfig::client_properties`]), timeouts, log level.
pub(crate) fn base_client_config(config: &LogConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (key, value) in config.client_properties() {
        c.set(key, value);
    }
    c.set("socket.connection.setup.timeout.ms", "5000")
        .set("log_level", "3");
    // librdkafka's own debug contexts (e.g. `eos,protocol`), for diagnosis.
    if let Ok(contexts) = std::env::var("CHAT_RDKAFKA_DEBUG") {
        c.set("debug", contexts).set("log_level", "7");
    }
    c
}

/// Fails with [`LogError::BrokerUnreachable`] unless a broker answers a
/// metadata request within `connect_timeout_ms`.
pub async fn check_brokers(config: &LogConfig) -> Result<(), LogError> {
    let admin: AdminClient<DefaultClientContext> = base_client_config(config)
        .create()
        .map_err(LogError::Kafka)?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let brokers = config.brokers.clone();
    // fetch_metadata blocks the calling thread until the broker answers or the timeout.
    tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, timeout))
        .await
        .map_err(|e| LogError::Config(e.to_string()))?
        .map(|_| ())
        .map_err(|e| LogError::BrokerUnreachable {
            brokers,
            detail: e.to_string(),
        })
}

/// Creates every topic that does not exist yet, with
/// `log.replication_factor` replicas and, for the topics that carry
/// acknowledged data, `min.insync.replicas = log.min_insync_replicas`;
/// existing topics are left as they are (their settings are not altered).
pub async fn ensure_topics(config: &LogConfig, specs: &[TopicSpec]) -> Result<(), LogError> {
    config.validate()?;
    check_brokers(config).await?;
    let admin: AdminClient<DefaultClientContext> = base_client_config(config)
        .create()
        .map_err(LogError::Kafka)?;
    let retention: Vec<String> = specs.iter().map(|s| s.retention_ms.to_string()).collect();
    let min_isr = config.min_insync_replicas.to_string();
    let new: Vec<NewTopic> = specs
        .iter()
        .zip(&retention)
        .map(|(s, r)| {
            let topic = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
            .set("cleanup.policy", s.cleanup_policy)
            .set("retention.ms", r);
            if s.acknowledged {
                topic.set("min.insync.replicas", &min_isr)
            } else {
                topic
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(LogError::Config(format!(
                    "cannot create topic {name}: {code}"
                )))
            }
        }
    }
    Ok(())
}

/// Where one partition of a topic lives, from a metadata request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: i32,
    /// Node id of the leader (-1: none right now).
    pub leader: i32,
    pub replicas: Vec<i32>,
    /// The in-sync replicas.
    pub isr: Vec<i32>,
    /// The offset after the newest record (high watermark).
    pub high_watermark: i64,
}

/// Leader, replicas, ISR and high watermark of every partition of `topic`
/// (operations and fault tests: which broker leads the busiest partitions).
pub async fn partitions(config: &LogConfig, topic: &str) -> Result<Vec<PartitionInfo>, LogError> {
    let admin: AdminClient<DefaultClientContext> = base_client_config(config)
        .create()
        .map_err(LogError::Kafka)?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let brokers = config.brokers.clone();
    let name = topic.to_string();
    // Metadata and watermark requests block: off the runtime's workers.
    tokio::task::spawn_blocking(move || {
        let client = admin.inner();
        let md = client.fetch_metadata(Some(&name), timeout).map_err(|e| {
            LogError::BrokerUnreachable {
                brokers,
                detail: e.to_string(),
            }
        })?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .ok_or_else(|| LogError::UnknownTopic {
                topic: name.clone(),
            })?;
        let mut out = Vec::new();
        for p in t.partitions() {
            let (_, high) = client.fetch_watermarks(&name, p.id(), timeout)?;
            out.push(PartitionInfo {
                partition: p.id(),
                leader: p.leader(),
                replicas: p.replicas().to_vec(),
                isr: p.isr().to_vec(),
                high_watermark: high,
            });
        }
        out.sort_by_key(|p| p.partition);
        Ok(out)
    })
    .await
    .map_err(|e| LogError::Config(e.to_string()))?
}

/// Fails with [`LogError::UnknownTopic`] naming the first missing topic.
pub async fn check_topics_exist(config: &LogConfig, names: &[String]) -> Result<(), LogError> {
    let admin: AdminClient<DefaultClientContext> = base_client_config(config)
        .create()
        .map_err(LogError::Kafka)?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let brokers = config.brokers.clone();
    let md = tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, timeout))
        .await
        .map_err(|e| LogError::Config(e.to_string()))?
        .map_err(|e| LogError::BrokerUnreachable {
            brokers,
            detail: e.to_string(),
        })?;
    for name in names {
        let found = md
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
        if !found {
            return Err(LogError::UnknownTopic {
                topic: name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_applies_to_every_topic_and_names_are_unique() {
        let cfg = LogConfig {
            topic_prefix: "t1.".into(),
            ..LogConfig::default()
        };
        let specs = Topics::new(&cfg).specs();
        assert!(specs.iter().all(|s| s.name.starts_with("t1.chat.")));
        let mut names: Vec<_> = specs.iter().map(|s| s.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), specs.len());
    }

    #[test]
    fn deliveries_partition_is_stable_and_in_range() {
        assert_eq!(
            deliveries_partition("gw-1", 12),
            deliveries_partition("gw-1", 12)
        );
        for i in 0..100 {
            let p = deliveries_partition(&format!("gw-{i}"), 12);
            assert!((0..12).contains(&p));
        }
        // FNV-1a of "a" is 0xe40c292c.
        assert_eq!(
            deliveries_partition("a", 1000),
            (0xe40c_292c_u32 % 1000) as i32
        );
    }

    #[test]
    fn user_settings_outlive_the_session_log() {
        let t = Topics::new(&LogConfig::default());
        let s = t
            .specs()
            .into_iter()
            .find(|s| s.name == "chat.user-settings");
        assert_eq!(
            s.map(|s| (s.cleanup_policy, s.retention_ms)),
            Some(("compact", -1))
        );
    }

    #[test]
    fn acknowledged_topics_are_the_ones_that_get_min_insync_replicas() {
        let t = Topics::new(&LogConfig::default());
        let acked: Vec<String> = t
            .specs()
            .into_iter()
            .filter(|s| s.acknowledged)
            .map(|s| s.name)
            .collect();
        assert_eq!(
            acked,
            [
                "chat.commands",
                "chat.events",
                "chat.sessions",
                "chat.presence",
                "chat.user-settings",
                "chat.results",
                "chat.push",
                "chat.dlq",
                "chat.dlq-handled",
                "chat.sequencer-state",
                "chat.router-state"
            ]
        );
    }

    #[test]
    fn the_event_log_is_kept_forever() {
        let t = Topics::new(&LogConfig::default());
        let events = t.specs().into_iter().find(|s| s.name == "chat.events");
        assert_eq!(events.map(|s| s.retention_ms), Some(-1));
    }
}
