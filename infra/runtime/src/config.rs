//! Config loading: defaults, then a TOML file, then `CHAT_*` environment overrides.
//!
//! A service declares one `#[serde(deny_unknown_fields)]` struct with defaults.
//! Environment variables override single keys: `CHAT_LOG__BROKERS=...` sets
//! `log.brokers` (a double underscore separates nesting levels; the value is
//! parsed as TOML when it parses, as a string otherwise). Only variables whose
//! first segment names a top-level key of the struct are read, so other
//! `CHAT_*` variables (`CHAT_CONFIG`, the stack's ports) are not config keys;
//! unknown keys in the file are refused.

use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Why a config could not be loaded. Never retryable: the operator must fix the input.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from its serde defaults, the optional file, and the environment
/// variables that start with `prefix` (e.g. `CHAT_`).
pub fn load_config<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
    prefix: &str,
) -> Result<T, ConfigError> {
    let top_level: Vec<String> = match toml::Value::try_from(T::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => toml::Table::new(),
    };
    let vars = std::env::vars().filter(|(k, _)| {
        k.strip_prefix(prefix)
            .and_then(|rest| rest.split("__").next())
            .is_some_and(|first| top_level.iter().any(|t| t.eq_ignore_ascii_case(first)))
    });
    apply_env(&mut table, prefix, vars);
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))
}

fn apply_env(table: &mut toml::Table, prefix: &str, vars: impl Iterator<Item = (String, String)>) {
    for (key, raw) in vars {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let value = parse_env_value(&raw);
        insert_path(table, &path, value);
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `x = <raw>` parses for numbers, booleans, arrays; anything else is a string.
    match format!("x = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("x")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// A secret config value (token keys, passwords): deserialises from a string,
/// never prints its content in `Debug` or logs.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret's content, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Svc {
        #[serde(default)]
        name: String,
        #[serde(default)]
        kafka: Kafka,
    }
    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        #[serde(default)]
        brokers: String,
        #[serde(default)]
        partitions: u32,
    }

    #[test]
    fn env_overrides_nested_keys_and_parses_numbers() {
        let mut t: toml::Table = "name = \"a\"\n[kafka]\nbrokers = \"x:1\"".parse().unwrap();
        let vars = vec![
            ("CHAT_KAFKA__PARTITIONS".to_string(), "12".to_string()),
            (
                "CHAT_KAFKA__BROKERS".to_string(),
                "127.0.0.1:9092".to_string(),
            ),
            ("OTHER".to_string(), "ignored".to_string()),
        ];
        apply_env(&mut t, "CHAT_", vars.into_iter());
        let svc: Svc = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(svc.name, "a");
        assert_eq!(svc.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(svc.kafka.partitions, 12);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let mut t = toml::Table::new();
        apply_env(
            &mut t,
            "CHAT_",
            vec![("CHAT_KAFKA__BROKERZ".into(), "x".into())].into_iter(),
        );
        let r: Result<Svc, _> = toml::Value::Table(t).try_into();
        assert!(r.unwrap_err().to_string().contains("brokerz"));
    }

    #[test]
    fn secret_does_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }
}
