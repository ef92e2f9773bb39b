//! How to reach Cassandra and how to replicate the keyspace (the `[store]`
//! table of a service's config).

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
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "chat".into(),
            replication: Replication::default(),
            connect_timeout_ms: 5_000,
        }
    }
}

impl StoreConfig {
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

fn is_identifier(s: &str) -> bool {
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
    fn refuses_bad_input() {
        assert!(parse("replication = { class = \"SimpleStrategy\", datacenters = {} }").is_err());
        assert!(parse("keyspaces = \"x\"").is_err());
        let bad_ks = parse("keyspace = \"chat; DROP\"").unwrap();
        assert!(matches!(bad_ks.validate(), Err(StoreError::Config(_))));
        let no_copy = parse("replication = { class = \"SimpleStrategy\", replication_factor = 0 }");
        assert!(no_copy.unwrap().validate().is_err());
    }
}
