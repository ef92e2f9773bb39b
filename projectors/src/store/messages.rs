//! The `messages` table: every sequenced chat event, keyed by `(chat_id, seq)`
//! and split into buckets of [`MESSAGES_PER_BUCKET`] seqs per partition.

use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, MaybeUnset};
use uuid::Uuid;

use super::{cql_seq, rows, Store, StoreError};

/// Seqs per `messages` partition: a partition never grows past this many rows.
pub const MESSAGES_PER_BUCKET: u64 = 1024;

/// The `messages` partition bucket of a seq.
pub fn bucket_of(seq: u64) -> i32 {
    i32::try_from(seq / MESSAGES_PER_BUCKET).unwrap_or(i32::MAX)
}

/// One sequenced chat event as stored in `messages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    /// The chat the event belongs to.
    pub chat_id: Uuid,
    /// Position in the chat, assigned by the sequencer (dense, from the log).
    pub seq: u64,
    /// Unique id of the event.
    pub event_id: Uuid,
    /// Avro record name of the event: `MessageSent`, `MessageEdited`, `MemberAdded`...
    pub kind: String,
    /// User who caused the event.
    pub sender_user: String,
    /// Device the event came from.
    pub sender_device: String,
    /// The client's id for a sent message (for de-duplication), if any.
    pub client_msg_id: Option<String>,
    /// The event body as JSON.
    pub body: String,
    /// When the gateway accepted the command, ms since the Unix epoch.
    pub server_ts_ms: i64,
    /// When the sequencer assigned `seq`, ms since the Unix epoch.
    pub sequenced_ts_ms: i64,
    /// Trace id carried from the original request.
    pub trace_id: String,
}

const COLUMNS: &str = "chat_id, seq, event_id, kind, sender_user, sender_device, \
                       client_msg_id, body, server_ts, sequenced_ts, trace_id";

type Raw = (
    Uuid,
    i64,
    Uuid,
    String,
    String,
    String,
    Option<String>,
    String,
    CqlTimestamp,
    CqlTimestamp,
    String,
);

impl MessageRow {
    fn from_raw(raw: Raw) -> Self {
        let (chat_id, seq, event_id, kind, sender_user, sender_device, client_msg_id, body) =
            (raw.0, raw.1, raw.2, raw.3, raw.4, raw.5, raw.6, raw.7);
        let (CqlTimestamp(server_ts_ms), CqlTimestamp(sequenced_ts_ms), trace_id) =
            (raw.8, raw.9, raw.10);
        MessageRow {
            chat_id,
            seq: u64::try_from(seq).unwrap_or_default(),
            event_id,
            kind,
            sender_user,
            sender_device,
            client_msg_id,
            body,
            server_ts_ms,
            sequenced_ts_ms,
            trace_id,
        }
    }
}

/// The statements of this table, prepared once per [`Store`] on first use.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) insert: PreparedStatement,
    pub(super) advance_head: PreparedStatement,
    pub(super) head: PreparedStatement,
    pub(super) page_desc: PreparedStatement,
    pub(super) page_asc: PreparedStatement,
    pub(super) count: PreparedStatement,
}

impl Store {
    pub(super) async fn prepared(&self) -> Result<&Prepared, StoreError> {
        self.prepared
            .get_or_try_init(|| self.prepare_messages())
            .await
    }

    async fn prepare_messages(&self) -> Result<Prepared, StoreError> {
        let ks = &self.keyspace;
        let prepare = |cql: String| self.prepare(cql);
        let range = format!(
            "SELECT {COLUMNS} FROM {ks}.messages \
             WHERE chat_id = ? AND bucket = ? AND seq >= ? AND seq <= ?"
        );
        Ok(Prepared {
            insert: prepare(format!(
                "INSERT INTO {ks}.messages (bucket, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            advance_head: prepare(format!(
                "UPDATE {ks}.chats USING TIMESTAMP ? SET last_seq = ? WHERE chat_id = ?"
            ))
            .await?,
            head: prepare(format!("SELECT last_seq FROM {ks}.chats WHERE chat_id = ?")).await?,
            page_desc: prepare(format!("{range} LIMIT ?")).await?,
            page_asc: prepare(format!("{range} ORDER BY seq ASC LIMIT ?")).await?,
            count: prepare(format!(
                "SELECT COUNT(*) FROM {ks}.messages WHERE chat_id = ? AND bucket = ? AND seq <= ?"
            ))
            .await?,
        })
    }

    /// Writes one event row, then advances the chat's `last_seq` (never moving
    /// it back). Idempotent: writing the same `(chat_id, seq)` again leaves one
    /// identical row, so replaying the log is harmless.
    pub async fn put_message(&self, m: &MessageRow) -> Result<(), StoreError> {
        let p = self.prepared().await?;
        let seq = cql_seq(m.seq)?;
        let client_msg_id = match &m.client_msg_id {
            Some(id) => MaybeUnset::Set(id.as_str()),
            None => MaybeUnset::Unset, // no tombstone for an absent value
        };
        let values = (
            bucket_of(m.seq),
            m.chat_id,
            seq,
            m.event_id,
            &m.kind,
            &m.sender_user,
            &m.sender_device,
            client_msg_id,
            &m.body,
            CqlTimestamp(m.server_ts_ms),
            CqlTimestamp(m.sequenced_ts_ms),
            &m.trace_id,
        );
        self.execute("write message", &p.insert, values).await?;
        // Write time = seq: the highest seq wins whatever the order of writes.
        let head = (seq, seq, m.chat_id);
        self.execute("advance chat last_seq", &p.advance_head, head)
            .await
            .map(drop)
    }

    /// The highest seq written for a chat, if any.
    pub async fn last_seq(&self, chat_id: Uuid) -> Result<Option<u64>, StoreError> {
        let p = self.prepared().await?;
        let what = "read chat last_seq";
        let result = self.execute(what, &p.head, (chat_id,)).await?;
        let head = rows::<(Option<i64>,)>(what, result)?;
        Ok(head
            .first()
            .and_then(|(seq,)| *seq)
            .and_then(|s| u64::try_from(s).ok()))
    }

    /// Up to `limit` events of a chat with `after_seq < seq < before_seq`, in
    /// ascending seq order. With `after_seq` the page starts right after it
    /// (sync: "what did I miss"); otherwise it ends right before `before_seq`,
    /// or at the newest event when both are `None` (scrolling back).
    pub async fn messages_page(
        &self,
        chat_id: Uuid,
        before_seq: Option<u64>,
        after_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<MessageRow>, StoreError> {
        let Some(head) = self.last_seq(chat_id).await? else {
            return Ok(Vec::new());
        };
        let lo = after_seq.map_or(0, |a| a.saturating_add(1));
        let hi = match before_seq {
            Some(0) => return Ok(Vec::new()),
            Some(b) => head.min(b - 1),
            None => head,
        };
        if limit == 0 || lo > hi {
            return Ok(Vec::new());
        }
        let p = self.prepared().await?;
        let ascending = after_seq.is_some();
        let statement = if ascending { &p.page_asc } else { &p.page_desc };
        let (first, last) = (bucket_of(lo), bucket_of(hi));
        let (lo, hi) = (cql_seq(lo)?, cql_seq(hi)?);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut page = Vec::new();
        for step in 0..=(last - first) {
            let bucket = if ascending { first + step } else { last - step };
            let want = i32::try_from(limit - page.len()).unwrap_or(i32::MAX);
            let what = "read messages page";
            let result = self
                .execute(what, statement, (chat_id, bucket, lo, hi, want))
                .await?;
            page.extend(
                rows::<Raw>(what, result)?
                    .into_iter()
                    .map(MessageRow::from_raw),
            );
            if page.len() >= limit {
                break;
            }
        }
        if !ascending {
            page.reverse();
        }
        Ok(page)
    }

    /// How many events of a chat have `seq <= max_seq` (one query per bucket).
    pub async fn count_messages(&self, chat_id: Uuid, max_seq: u64) -> Result<u64, StoreError> {
        let p = self.prepared().await?;
        let what = "count messages";
        let mut total = 0;
        for bucket in 0..=bucket_of(max_seq) {
            let values = (chat_id, bucket, cql_seq(max_seq)?);
            let result = self.execute(what, &p.count, values).await?;
            let counted = rows::<(i64,)>(what, result)?;
            total += counted
                .first()
                .map_or(0, |(n,)| u64::try_from(*n).unwrap_or(0));
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_every_1024_seqs() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1023), 0);
        assert_eq!(bucket_of(1024), 1);
        assert_eq!(bucket_of(u64::MAX), i32::MAX);
    }
}
