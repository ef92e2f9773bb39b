//! `chat_daily_stats` (migration 5): per chat and UTC day (of the events'
//! `sequenced_ts`), the messages sent, the events sequenced, and the members
//! who sent a message that day. Written by the daily-stats projection
//! ([`crate::daily_stats`]).
//!
//! A row is the whole state of its day as of `last_seq` (the chat's highest
//! seq counted into it), written with `USING TIMESTAMP last_seq`: a replay
//! or a stale writer writes an older state with a lower timestamp, which
//! loses. The senders are a frozen set (a value, no tombstones).

use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlDate;
use std::collections::BTreeSet;
use uuid::Uuid;

use super::{cql_seq, Store, StoreError};

/// One row of `chat_daily_stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DailyRow {
    pub chat: Uuid,
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub messages: i64,
    pub events: i64,
    /// Users who sent a message that day.
    pub active_members: BTreeSet<String>,
    pub last_seq: u64,
}

#[derive(Debug)]
pub(super) struct Prepared {
    put: PreparedStatement,
    get: PreparedStatement,
    of_chat: PreparedStatement,
}

const EPOCH_DAY: i64 = 1 << 31;

fn cql_date(day: i64) -> CqlDate {
    CqlDate(u32::try_from(day + EPOCH_DAY).unwrap_or(u32::MAX))
}

type Raw = (
    Uuid,
    CqlDate,
    Option<i64>,
    Option<i64>,
    Option<Vec<String>>,
    Option<i64>,
);

fn row((chat, day, messages, events, members, last): Raw) -> DailyRow {
    DailyRow {
        chat,
        day: i64::from(day.0) - EPOCH_DAY,
        messages: messages.unwrap_or(0),
        events: events.unwrap_or(0),
        active_members: members.unwrap_or_default().into_iter().collect(),
        last_seq: last.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
    }
}

impl Store {
    async fn daily_prepared(&self) -> Result<&Prepared, StoreError> {
        let init = || async {
            let ks = &self.keyspace;
            let cols = "chat_id, day, messages, events, active_members, last_seq";
            Ok(Prepared {
                put: self
                    .prepare(format!(
                        "INSERT INTO {ks}.chat_daily_stats ({cols}) VALUES (?, ?, ?, ?, ?, ?) \
                         USING TIMESTAMP ?"
                    ))
                    .await?,
                get: self
                    .prepare(format!(
                        "SELECT {cols} FROM {ks}.chat_daily_stats WHERE chat_id = ? AND day = ?"
                    ))
                    .await?,
                of_chat: self
                    .prepare(format!(
                        "SELECT {cols} FROM {ks}.chat_daily_stats WHERE chat_id = ?"
                    ))
                    .await?,
            })
        };
        self.daily.get_or_try_init(init).await
    }

    /// Writes a day's whole state (never moves back: `USING TIMESTAMP last_seq`).
    pub async fn put_daily(&self, r: &DailyRow) -> Result<(), StoreError> {
        let p = self.daily_prepared().await?;
        let seq = cql_seq(r.last_seq)?;
        let members: Vec<&str> = r.active_members.iter().map(String::as_str).collect();
        let values = (
            r.chat,
            cql_date(r.day),
            r.messages,
            r.events,
            members,
            seq,
            seq,
        );
        self.execute("write daily stats", &p.put, values)
            .await
            .map(drop)
    }

    /// One day of a chat, if any event was counted for it.
    pub async fn daily(&self, chat: Uuid, day: i64) -> Result<Option<DailyRow>, StoreError> {
        let p = self.daily_prepared().await?;
        let rows: Vec<Raw> = self
            .execute_all("read daily stats", &p.get, (chat, cql_date(day)))
            .await?;
        Ok(rows.into_iter().next().map(row))
    }

    /// Every day of a chat, newest first.
    pub async fn daily_of_chat(&self, chat: Uuid) -> Result<Vec<DailyRow>, StoreError> {
        let p = self.daily_prepared().await?;
        let rows: Vec<Raw> = self
            .execute_all("read daily stats", &p.of_chat, (chat,))
            .await?;
        Ok(rows.into_iter().map(row).collect())
    }
}
