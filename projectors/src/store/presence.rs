//! `presence` (the latest presence of each user, projected from
//! `chat.presence`) and `user_devices` (each user's devices, projected from
//! `chat.sessions`: first and last seen, revocation).
//!
//! Writes carry `USING TIMESTAMP <the log record's time in microseconds>`,
//! so replaying a topic writes the same cells and never moves a row back to
//! an older state.

use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;

use super::{Store, StoreError};

/// One row of `presence`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceRow {
    pub user: String,
    /// `online` or `offline`.
    pub status: String,
    /// When the user was last online (ms); `None` while online, hidden, or never seen.
    pub last_seen_ms: Option<i64>,
}

/// One row of `user_devices`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRow {
    pub device: String,
    pub first_seen: Option<i64>,
    pub last_seen: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug)]
pub(super) struct Prepared {
    put_presence: PreparedStatement,
    select_presence: PreparedStatement,
    device_first_seen: PreparedStatement,
    device_seen: PreparedStatement,
    device_revoked: PreparedStatement,
    select_devices: PreparedStatement,
    select_device: PreparedStatement,
}

fn micros(ms: i64) -> i64 {
    ms.saturating_mul(1000)
}

type DeviceRaw = (
    String,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
);

fn device_row((device, first, last, revoked): DeviceRaw) -> DeviceRow {
    DeviceRow {
        device,
        first_seen: first.map(|t| t.0),
        last_seen: last.map(|t| t.0),
        revoked_at: revoked.map(|t| t.0),
    }
}

impl Store {
    async fn presence_prepared(&self) -> Result<&Prepared, StoreError> {
        let init = || async {
            let ks = &self.keyspace;
            let p = |cql: String| self.prepare(cql);
            Ok(Prepared {
                put_presence: p(format!(
                    "INSERT INTO {ks}.presence (user_id, status, last_seen) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
                select_presence: p(format!(
                    "SELECT user_id, status, last_seen FROM {ks}.presence WHERE user_id IN ?"
                ))
                .await?,
                // first_seen: the earliest write wins, so it is written with a
                // timestamp that decreases with time.
                device_first_seen: p(format!(
                    "UPDATE {ks}.user_devices USING TIMESTAMP ? SET first_seen = ? \
                     WHERE user_id = ? AND device_id = ?"
                ))
                .await?,
                device_seen: p(format!(
                    "UPDATE {ks}.user_devices USING TIMESTAMP ? SET last_seen = ? \
                     WHERE user_id = ? AND device_id = ?"
                ))
                .await?,
                device_revoked: p(format!(
                    "UPDATE {ks}.user_devices USING TIMESTAMP ? SET revoked_at = ? \
                     WHERE user_id = ? AND device_id = ?"
                ))
                .await?,
                select_devices: p(format!(
                    "SELECT device_id, first_seen, last_seen, revoked_at FROM {ks}.user_devices \
                     WHERE user_id = ?"
                ))
                .await?,
                select_device: p(format!(
                    "SELECT device_id, first_seen, last_seen, revoked_at FROM {ks}.user_devices \
                     WHERE user_id = ? AND device_id = ?"
                ))
                .await?,
            })
        };
        self.presence.get_or_try_init(init).await
    }

    /// Writes a user's presence as of `at_ms` (the presence record's time).
    pub async fn put_presence(&self, row: &PresenceRow, at_ms: i64) -> Result<(), StoreError> {
        let p = self.presence_prepared().await?;
        let values = (
            &row.user,
            &row.status,
            row.last_seen_ms.map(CqlTimestamp),
            micros(at_ms),
        );
        self.execute("write presence", &p.put_presence, values)
            .await
            .map(drop)
    }

    /// The presence rows of `users` (users never seen are absent).
    pub async fn presence_of(&self, users: &[String]) -> Result<Vec<PresenceRow>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.presence_prepared().await?;
        type Raw = (String, Option<String>, Option<CqlTimestamp>);
        let rows: Vec<Raw> = self
            .execute_all("read presence", &p.select_presence, (users,))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(user, status, last_seen)| PresenceRow {
                user,
                status: status.unwrap_or_else(|| "offline".into()),
                last_seen_ms: last_seen.map(|t| t.0),
            })
            .collect())
    }

    /// Records that `device` of `user` was connected at `at_ms`.
    pub async fn device_seen(
        &self,
        user: &str,
        device: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.presence_prepared().await?;
        let at = CqlTimestamp(at_ms);
        let first = self.execute(
            "write device first seen",
            &p.device_first_seen,
            (i64::MAX - micros(at_ms), at, user, device),
        );
        let last = self.execute(
            "write device last seen",
            &p.device_seen,
            (micros(at_ms), at, user, device),
        );
        futures::try_join!(first, last).map(drop)
    }

    /// Records that `device` of `user` was revoked at `at_ms`.
    pub async fn device_revoked(
        &self,
        user: &str,
        device: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.presence_prepared().await?;
        let values = (micros(at_ms), CqlTimestamp(at_ms), user, device);
        self.execute("write device revoked", &p.device_revoked, values)
            .await
            .map(drop)
    }

    /// The devices of `user`, by device id.
    pub async fn devices(&self, user: &str) -> Result<Vec<DeviceRow>, StoreError> {
        let p = self.presence_prepared().await?;
        let rows: Vec<DeviceRaw> = self
            .execute_all("read devices", &p.select_devices, (user,))
            .await?;
        Ok(rows.into_iter().map(device_row).collect())
    }

    /// One device of `user`, if it was ever seen or revoked.
    pub async fn device(&self, user: &str, device: &str) -> Result<Option<DeviceRow>, StoreError> {
        let p = self.presence_prepared().await?;
        let rows: Vec<DeviceRaw> = self
            .execute_all("read device", &p.select_device, (user, device))
            .await?;
        Ok(rows.into_iter().next().map(device_row))
    }
}
