//! Operating projections: one session over several keyspaces
//! ([`Store::with_keyspace`]), full-table scans folded into per-partition
//! checksums (what `chat-admin verify` compares), and keyspace aliases in
//! the control keyspace (what `chat-admin switch` moves and the services
//! follow).
//!
//! # Keyspace aliases
//!
//! Table `<control keyspace>.keyspace_aliases (alias PRIMARY KEY, target,
//! previous, switched_at)` (`target`: the keyspace): services configured with `store.keyspace_alias`
//! read the keyspace the alias names at start and every
//! `store.alias_poll_ms`, and move over when it changes. `previous` keeps
//! the keyspace switched away from (kept until an explicit drop).

use futures::TryStreamExt;
use scylla::value::CqlTimestamp;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::{rows, Store, StoreError};

/// Rows and an order-independent checksum of the rows of one partition key
/// (or of a whole table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Digest {
    pub rows: u64,
    /// Wrapping sum of FNV-1a 64 of each row's JSON (`SELECT JSON *`).
    pub checksum: u64,
}

impl Digest {
    fn add(&mut self, row_hash: u64) {
        self.rows += 1;
        self.checksum = self.checksum.wrapping_add(row_hash);
    }
}

/// A table scanned: per partition key (its columns' JSON values, joined)
/// the rows and their checksum.
#[derive(Clone, Debug, Default)]
pub struct TableDigest {
    pub total: Digest,
    pub partitions: BTreeMap<String, Digest>,
}

/// FNV-1a, 64 bits: stable across builds and platforms.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One row of `keyspace_aliases`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AliasRow {
    pub alias: String,
    pub keyspace: String,
    pub previous: Option<String>,
    pub switched_at_ms: Option<i64>,
}

impl Store {
    /// The same session (connections, pool) naming another keyspace; nothing
    /// is prepared yet for it.
    pub fn with_keyspace(&self, keyspace: &str) -> Store {
        Store {
            session: self.session.clone(),
            keyspace: keyspace.to_string(),
            prepared: Arc::default(),
            chats: Arc::default(),
            progress: Arc::default(),
            receipts: Arc::default(),
            presence: Arc::default(),
            push: Arc::default(),
            daily: Arc::default(),
        }
    }

    /// The partition key columns of `table`, in key order.
    pub async fn partition_key(&self, table: &str) -> Result<Vec<String>, StoreError> {
        let what = format!("read the key of {table}");
        let cql = "SELECT column_name, kind, position FROM system_schema.columns \
                   WHERE keyspace_name = ? AND table_name = ?";
        let result = self.query(&what, cql, (&self.keyspace, table)).await?;
        let mut key: Vec<(i32, String)> = rows::<(String, String, i32)>(&what, result)?
            .into_iter()
            .filter(|(_, kind, _)| kind == "partition_key")
            .map(|(name, _, pos)| (pos, name))
            .collect();
        key.sort();
        Ok(key.into_iter().map(|(_, n)| n).collect())
    }

    /// Scans `table` whole (`SELECT JSON *`, paged) and folds each row into
    /// the digest of its partition key. Columns in `skip` are left out of
    /// the row's hash (wall-clock columns). A full scan: for tooling only.
    pub async fn digest_table(
        &self,
        table: &str,
        skip: &[&str],
    ) -> Result<TableDigest, StoreError> {
        if !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || table.is_empty() {
            return Err(StoreError::Config(format!("not a table name: {table:?}")));
        }
        let key = self.partition_key(table).await?;
        let what = format!("scan {}.{table}", self.keyspace);
        let cql = format!("SELECT JSON * FROM {}.{table}", self.keyspace);
        let pager = self.session.query_iter(cql, ()).await;
        let pager = pager.map_err(|e| StoreError::query(&what, e))?;
        let mut stream = pager
            .rows_stream::<(String,)>()
            .map_err(|e| StoreError::query(&what, e))?;
        let mut out = TableDigest::default();
        while let Some((json,)) = stream
            .try_next()
            .await
            .map_err(|e| StoreError::query(&what, e))?
        {
            let hash = if skip.is_empty() {
                fnv1a64(json.as_bytes())
            } else {
                let mut v: serde_json::Value =
                    serde_json::from_str(&json).map_err(|e| StoreError::Query {
                        what: what.clone(),
                        detail: e.to_string(),
                        retryable: false,
                    })?;
                if let Some(o) = v.as_object_mut() {
                    for c in skip {
                        o.remove(*c);
                    }
                }
                fnv1a64(v.to_string().as_bytes())
            };
            let pk = partition_of(&json, &key);
            out.partitions.entry(pk).or_default().add(hash);
            out.total.add(hash);
        }
        Ok(out)
    }

    /// Creates the control keyspace and its `keyspace_aliases` table (idempotent).
    pub async fn ensure_control(&self, replication: &super::Replication) -> Result<(), StoreError> {
        let ks = &self.keyspace;
        self.query(
            "create control keyspace",
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
                replication.cql_map()
            ),
            (),
        )
        .await?;
        self.query(
            "create keyspace_aliases",
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.keyspace_aliases (alias text PRIMARY KEY, \
                 target text, previous text, switched_at timestamp) \
                 WITH comment = 'alias -> keyspace the services use (chat-admin switch)'"
            ),
            (),
        )
        .await?;
        self.agree().await
    }

    /// The alias's row (this store's keyspace is the control keyspace).
    pub async fn alias(&self, alias: &str) -> Result<Option<AliasRow>, StoreError> {
        let what = "read keyspace alias";
        let cql = format!(
            "SELECT alias, target, previous, switched_at FROM {}.keyspace_aliases WHERE alias = ?",
            self.keyspace
        );
        let result = self.query(what, cql, (alias,)).await?;
        type Raw = (String, Option<String>, Option<String>, Option<CqlTimestamp>);
        Ok(rows::<Raw>(what, result)?
            .into_iter()
            .next()
            .and_then(|(alias, ks, previous, at)| {
                Some(AliasRow {
                    alias,
                    keyspace: ks?,
                    previous,
                    switched_at_ms: at.map(|t| t.0),
                })
            }))
    }

    /// Points `alias` at `keyspace`, if it still points at `expected` (None:
    /// the alias does not exist yet). A lightweight transaction, so two
    /// operators never switch over each other. Returns whether it applied.
    pub async fn set_alias(
        &self,
        alias: &str,
        keyspace: &str,
        expected: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let what = "switch keyspace alias";
        let ks = &self.keyspace;
        let result = match expected {
            None => {
                let cql = format!(
                    "INSERT INTO {ks}.keyspace_aliases (alias, target, switched_at) \
                     VALUES (?, ?, ?) IF NOT EXISTS"
                );
                self.query(what, cql, (alias, keyspace, CqlTimestamp(now_ms)))
                    .await?
            }
            Some(old) => {
                let cql = format!(
                    "UPDATE {ks}.keyspace_aliases SET target = ?, previous = ?, switched_at = ? \
                     WHERE alias = ? IF target = ?"
                );
                self.query(what, cql, (keyspace, old, CqlTimestamp(now_ms), alias, old))
                    .await?
            }
        };
        let result = result
            .into_rows_result()
            .map_err(|e| StoreError::query(what, e))?;
        let applied = result
            .rows::<(bool,)>()
            .ok()
            .and_then(|mut r| r.next())
            .and_then(Result::ok)
            .map(|(a,)| a);
        // The first column of an LWT answer is `[applied]`; other columns follow.
        match applied {
            Some(a) => Ok(a),
            None => {
                let first = result
                    .rows::<(bool, Option<String>)>()
                    .ok()
                    .and_then(|mut r| r.next())
                    .and_then(Result::ok)
                    .map(|(a, _)| a);
                Ok(first.unwrap_or(false))
            }
        }
    }

    /// Every alias (this store's keyspace is the control keyspace).
    pub async fn aliases(&self) -> Result<Vec<AliasRow>, StoreError> {
        let what = "read keyspace aliases";
        let cql = format!(
            "SELECT alias, target, previous, switched_at FROM {}.keyspace_aliases",
            self.keyspace
        );
        let result = self.query(what, cql, ()).await?;
        type Raw = (String, Option<String>, Option<String>, Option<CqlTimestamp>);
        Ok(rows::<Raw>(what, result)?
            .into_iter()
            .filter_map(|(alias, ks, previous, at)| {
                Some(AliasRow {
                    alias,
                    keyspace: ks?,
                    previous,
                    switched_at_ms: at.map(|t| t.0),
                })
            })
            .collect())
    }

    /// Whether a keyspace exists.
    pub async fn keyspace_exists(&self, keyspace: &str) -> Result<bool, StoreError> {
        let what = "look up keyspace";
        let cql = "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?";
        let result = self.query(what, cql, (keyspace,)).await?;
        Ok(!rows::<(String,)>(what, result)?.is_empty())
    }
}

/// The partition key of a `SELECT JSON *` row: its key columns' JSON
/// values, joined by `/`.
fn partition_of(json: &str, key: &[String]) -> String {
    let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(json) else {
        return String::new();
    };
    key.iter()
        .map(|k| match o.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn partition_key_of_a_row() {
        let key = vec!["chat_id".to_string(), "bucket".to_string()];
        let row = r#"{"chat_id": "c1", "bucket": 0, "seq": 5}"#;
        assert_eq!(super::partition_of(row, &key), "c1/0");
        assert_ne!(super::fnv1a64(b"a"), super::fnv1a64(b"b"));
    }
}
