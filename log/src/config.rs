//! Connection and tuning settings for Kafka and the schema registry, shared by
//! every service's config struct (as its `[log]` table).

use chat_runtime::Secret;
use serde::{Deserialize, Serialize};

use crate::LogError;

/// How to reach the log. Every field has a default that matches `make infra-up`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Kafka bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Base URL of the Confluent-compatible schema registry API.
    pub registry_url: String,
    /// Prefix put before every topic name: tests use a unique one per test so
    /// they can run in parallel against one broker. Empty in production.
    pub topic_prefix: String,
    /// Partitions of the per-chat topics (`chat.commands`, `chat.events`).
    /// Ordering is per chat, so more partitions means more parallel sequencers.
    pub chat_partitions: i32,
    /// Replication factor for created topics (1 on a single dev broker).
    pub replication_factor: i32,
    /// Topic config `min.insync.replicas` of the topics that carry
    /// acknowledged data (`chat.commands`, `chat.events`, `chat.sessions`,
    /// `chat.presence`, `chat.user-settings`, `chat.results`, `chat.push`,
    /// `chat.dlq` and the state changelogs), set when
    /// `chat-admin topics` creates them: with `acks=all` a write is
    /// acknowledged only once this many replicas have it, and refused
    /// (`NOT_ENOUGH_REPLICAS`) while fewer are in sync. 1 on a single dev
    /// broker; 2 with replication 3. At most `replication_factor`.
    pub min_insync_replicas: i32,
    /// How clients talk to the brokers: `plaintext`, `ssl`, `sasl_plaintext`
    /// or `sasl_ssl` (librdkafka `security.protocol`).
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism (`sasl.mechanisms`): `PLAIN`, `SCRAM-SHA-256`,
    /// `SCRAM-SHA-512`, ... Unset: librdkafka's default (`GSSAPI`).
    pub sasl_mechanism: Option<String>,
    /// SASL user name (`sasl.username`).
    pub sasl_username: Option<String>,
    /// SASL password (`sasl.password`); never printed.
    #[serde(skip_serializing)]
    pub sasl_password: Option<Secret>,
    /// CA certificate(s) that sign the brokers' certificates, PEM file
    /// (`ssl.ca.location`). Unset: the system's CA store.
    pub ssl_ca_location: Option<String>,
    /// The client's certificate, PEM file (`ssl.certificate.location`), for
    /// brokers that require client certificates.
    pub ssl_certificate_location: Option<String>,
    /// The client's private key, PEM file (`ssl.key.location`).
    pub ssl_key_location: Option<String>,
    /// Producer `linger.ms` of the non-transactional producers (gateway
    /// commands and sessions, router deliveries, presence): how long a batch
    /// may wait for more records. 0 sends at once. Measured (ARCHITECTURE.md
    /// "Measured"): 5 ms saved the router ~1.5 CPU s per 30 s run, but the
    /// router awaits each produce before its next batch, so deliveries fell
    /// behind (send->deliver p50 0.4 s -> 2.5-4.4 s at 300 msg/s).
    pub linger_ms: u32,
    /// `linger.ms` of the sequencer's transactional producers. Each phase of
    /// a transaction is produced at once and awaited, so a linger only
    /// delays it.
    pub txn_linger_ms: u32,
    /// Consumer `fetch.wait.max.ms`: how long the broker may hold a fetch
    /// when no data is there. The broker answers as soon as data arrives, so
    /// this does not add latency (measured: same p50 at 5 and 100 ms); low
    /// values only add idle fetch requests and CPU.
    pub fetch_wait_max_ms: u32,
    /// Consumer `fetch.min.bytes`: the broker holds a fetch (at most
    /// `fetch_wait_max_ms`) until this much data is there. 1 answers at once
    /// (lowest latency, one fetch request per consumer per round trip under
    /// load); larger values trade up to `fetch_wait_max_ms` of latency per hop
    /// for fewer, fuller fetches.
    pub fetch_min_bytes: u32,
    /// How long a start-up check waits for Kafka or the registry before it
    /// reports them unreachable.
    pub connect_timeout_ms: u64,
    /// Static membership of the partitioned consumer groups (sequencer,
    /// router): this instance's `group.instance.id`, stable across its
    /// restarts and unique among the instances of one service (e.g. the
    /// pod's name). A restarted member gets its partitions back without a
    /// rebalance if it rejoins within `session_timeout_ms`; meanwhile they
    /// wait for it. Empty: dynamic membership (a stop hands the partitions
    /// over at once).
    pub group_instance_id: String,
    /// Consumer `session.timeout.ms` of the partitioned consumer groups: how
    /// long a member that stopped heartbeating (killed, partitioned) keeps
    /// its partitions, i.e. how long the chats of a killed sequencer wait
    /// (the fault suite: ~9 s of no acks at 10 s). Not lower: a broker crash
    /// that takes the group coordinator needs several seconds to move it,
    /// and a member whose session times out meanwhile is revoked and
    /// rejoins (measured at 6 s: a broker kill stalled writes 17 s instead
    /// of 5-8 s). With static membership, make it longer than a restart.
    pub session_timeout_ms: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            registry_url: "http://127.0.0.1:8081/apis/ccompat/v7".into(),
            topic_prefix: String::new(),
            chat_partitions: 12,
            replication_factor: 1,
            min_insync_replicas: 1,
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            linger_ms: 0,
            txn_linger_ms: 0,
            fetch_wait_max_ms: 100,
            fetch_min_bytes: 1,
            connect_timeout_ms: 5_000,
            group_instance_id: String::new(),
            session_timeout_ms: 10_000,
        }
    }
}

/// librdkafka's `security.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    fn uses_ssl(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl LogConfig {
    /// [`validate`](Self::validate) as the plain message a service's
    /// `ServiceConfig::validate` reports (exit code 2).
    pub fn check(&self) -> Result<(), String> {
        self.validate().map_err(|e| match e {
            LogError::Config(m) => m,
            e => e.to_string(),
        })
    }

    /// The librdkafka properties of the connection and security keys, in
    /// the order they are set (`bootstrap.servers` first). The password is
    /// in it: never log the result.
    pub(crate) fn client_properties(&self) -> Vec<(&'static str, String)> {
        let mut props = vec![
            ("bootstrap.servers", self.brokers.clone()),
            ("security.protocol", self.security_protocol.as_str().into()),
        ];
        let optional = [
            ("sasl.mechanisms", self.sasl_mechanism.clone()),
            ("sasl.username", self.sasl_username.clone()),
            (
                "sasl.password",
                self.sasl_password.as_ref().map(|s| s.expose().to_string()),
            ),
            ("ssl.ca.location", self.ssl_ca_location.clone()),
            (
                "ssl.certificate.location",
                self.ssl_certificate_location.clone(),
            ),
            ("ssl.key.location", self.ssl_key_location.clone()),
        ];
        props.extend(
            optional
                .into_iter()
                .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v))),
        );
        props
    }

    /// Refuses settings that cannot work, before anything connects: a
    /// replication or minimum ISR that no write could meet, SASL or SSL
    /// keys that do not fit the protocol, and a protocol or mechanism this
    /// build of librdkafka cannot speak (it is built without OpenSSL and
    /// Cyrus SASL: `ssl`, `sasl_ssl` and `GSSAPI` are refused by it).
    pub fn validate(&self) -> Result<(), LogError> {
        let bad = |m: String| Err(LogError::Config(m));
        if self.brokers.trim().is_empty() {
            return bad("log.brokers is empty".into());
        }
        if self.replication_factor < 1 || self.chat_partitions < 1 {
            return bad("log.replication_factor and log.chat_partitions must be at least 1".into());
        }
        if self.min_insync_replicas < 1 || self.min_insync_replicas > self.replication_factor {
            return bad(format!(
                "log.min_insync_replicas must be 1..=log.replication_factor ({}), got {}: \
                 with more, every acks=all write would be refused",
                self.replication_factor, self.min_insync_replicas
            ));
        }
        let sasl_keys = self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some();
        if sasl_keys && !self.security_protocol.uses_sasl() {
            return bad(format!(
                "log.sasl_* is set but log.security_protocol is {}: use sasl_plaintext or sasl_ssl",
                self.security_protocol.as_str()
            ));
        }
        if self.security_protocol.uses_sasl()
            && (self.sasl_username.is_none() != self.sasl_password.is_none())
        {
            return bad("log.sasl_username and log.sasl_password go together".into());
        }
        let ssl_keys = self.ssl_ca_location.is_some()
            || self.ssl_certificate_location.is_some()
            || self.ssl_key_location.is_some();
        if ssl_keys && !self.security_protocol.uses_ssl() {
            return bad(format!(
                "log.ssl_* is set but log.security_protocol is {}: use ssl or sasl_ssl",
                self.security_protocol.as_str()
            ));
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return bad("log.ssl_certificate_location and log.ssl_key_location go together".into());
        }
        // librdkafka checks every value against what it was built with when
        // it is set on a native config: an SSL protocol without OpenSSL, a
        // SASL mechanism without its library.
        let native = crate::topics::base_client_config(self)
            .create_native_config()
            .map_err(|e| {
                LogError::Config(format!(
                    "log.security_protocol = {}{}: this build of librdkafka ({}) cannot \
                     use it: {e}",
                    self.security_protocol.as_str(),
                    self.sasl_mechanism
                        .as_deref()
                        .map(|m| format!(", log.sasl_mechanism = {m}"))
                        .unwrap_or_default(),
                    rdkafka::util::get_rdkafka_version().1
                ))
            })?;
        // A SASL mechanism is only checked when a client is created: ask
        // which ones were built in (e.g. SCRAM needs OpenSSL).
        if self.security_protocol.uses_sasl() {
            let mechanism = self.sasl_mechanism.as_deref().unwrap_or("GSSAPI");
            let feature = match mechanism.to_ascii_uppercase().as_str() {
                "GSSAPI" => "sasl_gssapi",
                "PLAIN" => "sasl_plain",
                m if m.starts_with("SCRAM-") => "sasl_scram",
                "OAUTHBEARER" => "sasl_oauthbearer",
                _ => return bad(format!("log.sasl_mechanism {mechanism:?} is not a SASL mechanism librdkafka knows (GSSAPI, PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER)")),
            };
            let features = native.get("builtin.features").unwrap_or_default();
            if !features.split(',').any(|f| f == feature) {
                return bad(format!(
                    "log.sasl_mechanism = {mechanism}: this build of librdkafka ({}) cannot \
                     use it (built-in features: {features})",
                    rdkafka::util::get_rdkafka_version().1
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> LogConfig {
        toml::from_str(text).unwrap()
    }

    fn prop<'a>(props: &'a [(&str, String)], key: &str) -> Option<&'a str> {
        props
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn defaults_are_plaintext_with_nothing_else_set() {
        let c = LogConfig::default();
        c.validate().unwrap();
        let props = c.client_properties();
        assert_eq!(
            props,
            vec![
                ("bootstrap.servers", "127.0.0.1:9092".to_string()),
                ("security.protocol", "plaintext".to_string()),
            ]
        );
        let native = crate::topics::base_client_config(&c);
        assert_eq!(native.get("security.protocol"), Some("plaintext"));
        assert_eq!(native.get("sasl.password"), None);
    }

    #[test]
    fn every_security_key_maps_to_its_librdkafka_property() {
        let c = parse(
            "security_protocol = \"sasl_ssl\"\n\
             sasl_mechanism = \"SCRAM-SHA-512\"\n\
             sasl_username = \"svc\"\n\
             sasl_password = \"hunter2\"\n\
             ssl_ca_location = \"/etc/ca.pem\"\n\
             ssl_certificate_location = \"/etc/c.pem\"\n\
             ssl_key_location = \"/etc/k.pem\"",
        );
        let props = c.client_properties();
        assert_eq!(prop(&props, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(prop(&props, "sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(prop(&props, "sasl.username"), Some("svc"));
        assert_eq!(prop(&props, "sasl.password"), Some("hunter2"));
        assert_eq!(prop(&props, "ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(prop(&props, "ssl.certificate.location"), Some("/etc/c.pem"));
        assert_eq!(prop(&props, "ssl.key.location"), Some("/etc/k.pem"));
        let native = crate::topics::base_client_config(&c);
        assert_eq!(native.get("sasl.username"), Some("svc"));
        // The password never shows in the config's Debug or its serialised form.
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!toml::to_string(&c).unwrap().contains("hunter2"));
    }

    #[test]
    fn each_protocol_name_parses() {
        for (text, p) in [
            ("plaintext", SecurityProtocol::Plaintext),
            ("ssl", SecurityProtocol::Ssl),
            ("sasl_plaintext", SecurityProtocol::SaslPlaintext),
            ("sasl_ssl", SecurityProtocol::SaslSsl),
        ] {
            let c = parse(&format!("security_protocol = \"{text}\""));
            assert_eq!(c.security_protocol, p);
            assert_eq!(p.as_str(), text);
        }
        assert!(toml::from_str::<LogConfig>("security_protocol = \"tls\"").is_err());
    }

    #[test]
    fn protocols_this_build_cannot_speak_are_configuration_errors() {
        // rdkafka is built without OpenSSL: ssl is refused by librdkafka
        // itself, as a configuration error (not a panic, not at connect).
        for text in ["security_protocol = \"ssl\"", "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\nsasl_password = \"p\""] {
            let err = parse(text).validate().unwrap_err();
            assert!(matches!(err, LogError::Config(_)), "{err}");
            assert!(err.to_string().contains("this build of librdkafka"), "{err}");
        }
        // SCRAM needs OpenSSL too; librdkafka only says so at client creation.
        let scram = parse(
            "security_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n\
             sasl_username = \"u\"\nsasl_password = \"p\"",
        );
        let err = scram.validate().unwrap_err().to_string();
        assert!(err.contains("this build of librdkafka"), "{err}");
        // SASL/PLAIN over plaintext needs no extra library.
        parse(
            "security_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"PLAIN\"\n\
             sasl_username = \"u\"\nsasl_password = \"p\"",
        )
        .validate()
        .unwrap();
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        for text in [
            "sasl_username = \"u\"",
            "ssl_ca_location = \"/ca.pem\"",
            "min_insync_replicas = 2",
            "min_insync_replicas = 0",
            "replication_factor = 3\nmin_insync_replicas = 4",
            "security_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"",
        ] {
            assert!(parse(text).validate().is_err(), "accepted: {text}");
        }
        parse("replication_factor = 3\nmin_insync_replicas = 2")
            .validate()
            .unwrap();
    }
}
