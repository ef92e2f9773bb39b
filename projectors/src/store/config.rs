//! How to reach Cassandra and how to replicate the keyspace (the `[store]`
//! table of a service's config).

use chat_runtime::Secret;
use scylla::statement::Consistency as DriverConsistency;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

use super::StoreError;

/// How to reach Cassandra. Every field has a default that matches `make infra-up`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Contact points, `host:port`. The driver discovers the rest of the
    /// cluster from any one that answers. Accepts a list or a comma-separated
    /// string (so `CHAT_STORE__NODES=10.0.0.1:9042,10.0.0.2:9042` works).
    #[serde(deserialize_with = "list_or_csv")]
    pub nodes: Vec<String>,
    /// Keyspace holding every table of the platform. Tests use a unique one
    /// each so they can run in parallel against one node.
    pub keyspace: String,
    /// Replication of the keyspace, used when `migrate` creates it. Changing it
    /// later does not alter an existing keyspace.
    pub replication: Replication,
    /// How long connecting waits for any node before reporting Cassandra unreachable.
    pub connect_timeout_ms: u64,
    /// User name for Cassandra's password authenticator. Unset: no authentication.
    pub username: Option<String>,
    /// Password of `username`; never printed.
    #[serde(skip_serializing)]
    pub password: Option<Secret>,
    /// Consistency level of every read and write of the store: `one`,
    /// `two`, `three`, `quorum`, `all`, `local_quorum`, `each_quorum`,
    /// `local_one` (`any` is refused: it is write-only). `local_quorum` (the
    /// driver's default) survives one lost replica of three and reads what
    /// a quorum write wrote; with one node every level but `two`, `three`
    /// and `all` beyond the replication means the same.
    pub consistency: Consistency,
    /// Encrypt client connections. This build has no TLS for Cassandra
    /// (the driver's TLS needs OpenSSL or rustls, neither is built in):
    /// `true` is refused at start.
    pub tls: bool,
    /// CA certificate(s) of the nodes, PEM file (for `tls`).
    pub tls_ca_location: Option<String>,
    /// Client certificate, PEM file (for `tls` with client authentication).
    pub tls_certificate_location: Option<String>,
    /// Client private key, PEM file.
    pub tls_key_location: Option<String>,
    /// A keyspace alias (`chat-admin switch`): when set, services use the
    /// keyspace this alias names in `control_keyspace` (not `keyspace`),
    /// check it every `alias_poll_ms` and move over when it changes.
    pub keyspace_alias: Option<String>,
    /// Keyspace of the `keyspace_aliases` table.
    pub control_keyspace: String,
    /// How often services following an alias read it.
    pub alias_poll_ms: u64,
}

/// Cassandra consistency levels a store may use for its reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    Any,
    One,
    Two,
    Three,
    Quorum,
    All,
    #[default]
    LocalQuorum,
    EachQuorum,
    LocalOne,
}

impl Consistency {
    /// The driver's value.
    pub fn to_driver(self) -> DriverConsistency {
        match self {
            Consistency::Any => DriverConsistency::Any,
            Consistency::One => DriverConsistency::One,
            Consistency::Two => DriverConsistency::Two,
            Consistency::Three => DriverConsistency::Three,
            Consistency::Quorum => DriverConsistency::Quorum,
            Consistency::All => DriverConsistency::All,
            Consistency::LocalQuorum => DriverConsistency::LocalQuorum,
            Consistency::EachQuorum => DriverConsistency::EachQuorum,
            Consistency::LocalOne => DriverConsistency::LocalOne,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "chat".into(),
            replication: Replication::default(),
            connect_timeout_ms: 5_000,
            username: None,
            password: None,
            consistency: Consistency::LocalQuorum,
            tls: false,
            tls_ca_location: None,
            tls_certificate_location: None,
            tls_key_location: None,
            keyspace_alias: None,
            control_keyspace: "chat_control".into(),
            alias_poll_ms: 1_000,
        }
    }
}

impl StoreConfig {
    /// [`validate`](Self::validate) as the plain message a service's
    /// `ServiceConfig::validate` reports (exit code 2).
    pub fn check(&self) -> Result<(), String> {
        self.validate().map_err(|e| match e {
            StoreError::Config(m) => m,
            e => e.to_string(),
        })
    }

    /// Checks what Cassandra would only refuse later: no nodes, a keyspace
    /// name that is not a plain CQL identifier, an impossible replication.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.nodes.is_empty() {
            return Err(StoreError::Config("store.nodes is empty".into()));
        }
        if !is_identifier(&self.keyspace) {
            return Err(StoreError::Config(format!(
                "store.keyspace {:?} must be a letter then up to 47 letters, digits or _",
                self.keyspace
            )));
        }
        if !is_identifier(&self.control_keyspace) {
            return Err(StoreError::Config(format!(
                "store.control_keyspace {:?} must be a letter then up to 47 letters, digits or _",
                self.control_keyspace
            )));
        }
        if self.alias_poll_ms == 0 {
            return Err(StoreError::Config(
                "store.alias_poll_ms must be at least 1".into(),
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(StoreError::Config(
                "store.username and store.password go together".into(),
            ));
        }
        if self.consistency == Consistency::Any {
            return Err(StoreError::Config(
                "store.consistency = any is write-only: the store also reads".into(),
            ));
        }
        if self.tls {
            return Err(StoreError::Config(
                "store.tls = true: this build has no TLS for Cassandra (the scylla driver's \
                 TLS needs OpenSSL or rustls, neither is built in); use a TLS-terminating \
                 proxy or a private network"
                    .into(),
            ));
        }
        let tls_keys = self.tls_ca_location.is_some()
            || self.tls_certificate_location.is_some()
            || self.tls_key_location.is_some();
        if tls_keys {
            return Err(StoreError::Config(
                "store.tls_* is set but store.tls is false".into(),
            ));
        }
        self.replication.validate()
    }
}

/// Replication strategy of the keyspace, as in CQL's `replication` map.
///
/// ```toml
/// replication = { class = "SimpleStrategy", replication_factor = 1 }
/// replication = { class = "NetworkTopologyStrategy", datacenters = { dc1 = 3 } }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "class", deny_unknown_fields)]
pub enum Replication {
    /// One replica set for the whole cluster, ignoring topology (development).
    SimpleStrategy {
        /// Copies of every row.
        replication_factor: u32,
    },
    /// Replicas per datacenter, spread across racks (production).
    NetworkTopologyStrategy {
        /// Copies of every row, by datacenter name.
        datacenters: BTreeMap<String, u32>,
    },
}

impl Default for Replication {
    fn default() -> Self {
        Replication::SimpleStrategy {
            replication_factor: 1,
        }
    }
}

impl Replication {
    /// The CQL map literal, e.g. `{'class': 'SimpleStrategy', 'replication_factor': 1}`.
    pub fn cql_map(&self) -> String {
        match self {
            Replication::SimpleStrategy { replication_factor } => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}")
            }
            Replication::NetworkTopologyStrategy { datacenters } => {
                let dcs: String = datacenters
                    .iter()
                    .map(|(dc, rf)| format!(", '{}': {rf}", dc.replace('\'', "''")))
                    .collect();
                format!("{{'class': 'NetworkTopologyStrategy'{dcs}}}")
            }
        }
    }

    /// Refuses a replication that would store nothing.
    pub fn validate(&self) -> Result<(), StoreError> {
        let ok = match self {
            Replication::SimpleStrategy { replication_factor } => *replication_factor > 0,
            Replication::NetworkTopologyStrategy { datacenters } => {
                datacenters.values().any(|rf| *rf > 0)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::Config(format!(
                "store.replication keeps no copy of the data: {}",
                self.cql_map()
            )))
        }
    }
}

/// A plain CQL identifier (a keyspace or alias name).
pub fn is_identifier(s: &str) -> bool {
    s.len() <= 48
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Nodes {
        Csv(String),
        List(Vec<String>),
    }
    Ok(match Nodes::deserialize(d)? {
        Nodes::List(list) => list,
        Nodes::Csv(csv) => csv
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StoreConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_both_replication_shapes() {
        let c = parse("").unwrap();
        assert_eq!(c.nodes, ["127.0.0.1:9042"]);
        assert_eq!(
            c.replication.cql_map(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        let c = parse(
            "nodes = \"a:9042, b:9042\"\n\
             replication = { class = \"NetworkTopologyStrategy\", datacenters = { dc1 = 3, dc2 = 2 } }",
        )
        .unwrap();
        assert_eq!(c.nodes, ["a:9042", "b:9042"]);
        assert_eq!(
            c.replication.cql_map(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
        c.validate().unwrap();
    }

    #[test]
    fn credentials_consistency_and_tls() {
        let c = parse("").unwrap();
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        assert_eq!(c.consistency.to_driver(), DriverConsistency::LocalQuorum);
        assert!(c.username.is_none() && c.password.is_none() && !c.tls);
        let c =
            parse("username = \"app\"\npassword = \"hunter2\"\nconsistency = \"quorum\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.consistency.to_driver(), DriverConsistency::Quorum);
        assert_eq!(c.password.as_ref().map(|p| p.expose()), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!toml::to_string(&c).unwrap().contains("hunter2"));
        assert_eq!(
            parse("consistency = \"local_one\"")
                .unwrap()
                .consistency
                .to_driver(),
            DriverConsistency::LocalOne
        );
        assert!(parse("consistency = \"most\"").is_err());
        for text in [
            "username = \"app\"",
            "consistency = \"any\"",
            "tls = true",
            "tls_ca_location = \"/ca.pem\"",
        ] {
            assert!(parse(text).unwrap().validate().is_err(), "accepted: {text}");
        }
        let err = parse("tls = true")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no TLS"), "{err}");
    }

    #[test]
    fn refuses_bad_input() {
        assert!(parse("replication = { class = \"SimpleStrategy\", datacenters = {} }").is_err());
        assert!(parse("keyspaces = \"x\"").is_err());
        let bad_ks = parse("keyspace = \"chat; DROP\"").unwrap();
        assert!(matches!(bad_ks.validate(), Err(StoreError::Config(_))));
        let no_copy = parse("replication = { class = \"SimpleStrategy\", replication_factor = 0 }");
        assert!(no_copy.unwrap().validate().is_err());
    }
}
