//! `push_registrations` (each device's push token, projected from
//! `chat.sessions` by `chat-push`) and `push_notified` (per chat, the
//! highest seq whose push tasks are on `chat.push`).
//!
//! Registration writes and deletes carry `USING TIMESTAMP <the log record's
//! time in microseconds>`, so replaying `chat.sessions` never brings back a
//! removed registration. `notified_seq` is written `USING TIMESTAMP <seq>`:
//! it never moves back.

use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use uuid::Uuid;

use super::{cql_seq, Store, StoreError};

/// One row of `push_registrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRegistration {
    pub device: String,
    /// `apns`, `fcm`, `webpush` or `webhook`.
    pub provider: String,
    /// The provider token, or the Web Push subscription JSON.
    pub token: String,
    pub locale: Option<String>,
    /// When it was registered (ms).
    pub updated_at: Option<i64>,
}

/// One row of `push_settings`: a user's do-not-disturb schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushSettings {
    /// IANA time zone.
    pub time_zone: String,
    /// (start, end) minutes after local midnight; None: no do-not-disturb.
    pub dnd: Option<(u32, u32)>,
    /// Chats that notify during do-not-disturb.
    pub allowed_chats: Vec<Uuid>,
}

#[derive(Debug)]
pub(super) struct Prepared {
    put_settings: PreparedStatement,
    select_settings: PreparedStatement,
    put: PreparedStatement,
    delete: PreparedStatement,
    select: PreparedStatement,
    put_notified: PreparedStatement,
    select_notified: PreparedStatement,
}

fn micros(ms: i64) -> i64 {
    ms.saturating_mul(1000)
}

impl Store {
    async fn push_prepared(&self) -> Result<&Prepared, StoreError> {
        let init = || async {
            let ks = &self.keyspace;
            let p = |cql: String| self.prepare(cql);
            Ok(Prepared {
                put_settings: p(format!(
                    "INSERT INTO {ks}.push_settings \
                     (user_id, time_zone, dnd_start_minute, dnd_end_minute, allowed_chats) \
                     VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
                select_settings: p(format!(
                    "SELECT time_zone, dnd_start_minute, dnd_end_minute, allowed_chats \
                     FROM {ks}.push_settings WHERE user_id = ?"
                ))
                .await?,
                put: p(format!(
                    "INSERT INTO {ks}.push_registrations \
                     (user_id, device_id, provider, push_token, locale, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
                delete: p(format!(
                    "DELETE FROM {ks}.push_registrations USING TIMESTAMP ? \
                     WHERE user_id = ? AND device_id = ?"
                ))
                .await?,
                select: p(format!(
                    "SELECT device_id, provider, push_token, locale, updated_at \
                     FROM {ks}.push_registrations WHERE user_id = ?"
                ))
                .await?,
                put_notified: p(format!(
                    "UPDATE {ks}.push_notified USING TIMESTAMP ? SET notified_seq = ? \
                     WHERE chat_id = ?"
                ))
                .await?,
                select_notified: p(format!(
                    "SELECT notified_seq FROM {ks}.push_notified WHERE chat_id = ?"
                ))
                .await?,
            })
        };
        self.push.get_or_try_init(init).await
    }

    /// Sets the push registration of `user`'s device as of `at_ms` (the
    /// record's time).
    pub async fn put_push_registration(
        &self,
        user: &str,
        reg: &PushRegistration,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.push_prepared().await?;
        let values = (
            user,
            &reg.device,
            &reg.provider,
            &reg.token,
            &reg.locale,
            CqlTimestamp(at_ms),
            micros(at_ms),
        );
        self.execute("write push registration", &p.put, values)
            .await
            .map(drop)
    }

    /// Removes the push registration of `user`'s `device` as of `at_ms`.
    pub async fn delete_push_registration(
        &self,
        user: &str,
        device: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.push_prepared().await?;
        self.execute(
            "delete push registration",
            &p.delete,
            (micros(at_ms), user, device),
        )
        .await
        .map(drop)
    }

    /// The push registrations of `user`, by device id.
    pub async fn push_registrations(
        &self,
        user: &str,
    ) -> Result<Vec<PushRegistration>, StoreError> {
        let p = self.push_prepared().await?;
        type Raw = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<CqlTimestamp>,
        );
        let rows: Vec<Raw> = self
            .execute_all("read push registrations", &p.select, (user,))
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(device, provider, token, locale, at)| {
                Some(PushRegistration {
                    device,
                    provider: provider?,
                    token: token?,
                    locale,
                    updated_at: at.map(|t| t.0),
                })
            })
            .collect())
    }

    /// Records that every message of `chat` up to `seq` has its push tasks
    /// on `chat.push`. Never moves back.
    pub async fn put_push_notified(&self, chat: Uuid, seq: u64) -> Result<(), StoreError> {
        let p = self.push_prepared().await?;
        let s = cql_seq(seq)?;
        self.execute("write push progress", &p.put_notified, (s, s, chat))
            .await
            .map(drop)
    }

    /// The highest seq of `chat` whose push tasks are on `chat.push` (0: none).
    pub async fn push_notified(&self, chat: Uuid) -> Result<u64, StoreError> {
        let p = self.push_prepared().await?;
        let rows: Vec<(Option<i64>,)> = self
            .execute_all("read push progress", &p.select_notified, (chat,))
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|(s,)| s)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0))
    }

    /// Sets `user`'s do-not-disturb schedule as of `at_ms` (the record's time).
    pub async fn put_push_settings(
        &self,
        user: &str,
        settings: &PushSettings,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.push_prepared().await?;
        let values = (
            user,
            &settings.time_zone,
            settings.dnd.map(|d| d.0 as i32),
            settings.dnd.map(|d| d.1 as i32),
            &settings.allowed_chats,
            micros(at_ms),
        );
        self.execute("write push settings", &p.put_settings, values)
            .await
            .map(drop)
    }

    /// `user`'s do-not-disturb schedule, if they ever set one.
    pub async fn push_settings(&self, user: &str) -> Result<Option<PushSettings>, StoreError> {
        let p = self.push_prepared().await?;
        type Raw = (Option<String>, Option<i32>, Option<i32>, Option<Vec<Uuid>>);
        let rows: Vec<Raw> = self
            .execute_all("read push settings", &p.select_settings, (user,))
            .await?;
        Ok(rows.into_iter().next().map(|(tz, start, end, allowed)| {
            let minute = |m: Option<i32>| m.and_then(|m| u32::try_from(m).ok());
            PushSettings {
                time_zone: tz.unwrap_or_else(|| "UTC".into()),
                dnd: minute(start).zip(minute(end)),
                allowed_chats: allowed.unwrap_or_default(),
            }
        }))
    }
}
