//! `chat_receipts`: per chat and member, the read pointer and the highest
//! delivery pointer of any of their devices, for the sender's delivered/read
//! marks. Each cell is written `USING TIMESTAMP <up_to_seq>`, so a replay or
//! a late write never moves a pointer back.

use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use super::{cql_seq, Store, StoreError};

/// One member's pointers in a chat (0: nothing yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiptRow {
    pub user: String,
    pub read_seq: u64,
    pub delivered_seq: u64,
}

#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) read: PreparedStatement,
    pub(super) delivered: PreparedStatement,
    pub(super) select: PreparedStatement,
}

impl Store {
    pub(super) async fn receipts_prepared(&self) -> Result<&Prepared, StoreError> {
        let init = || async {
            let ks = &self.keyspace;
            let update = |col: &str| {
                format!(
                    "UPDATE {ks}.chat_receipts USING TIMESTAMP ? SET {col} = ? \
                     WHERE chat_id = ? AND user_id = ?"
                )
            };
            Ok(Prepared {
                read: self.prepare(update("read_seq")).await?,
                delivered: self.prepare(update("delivered_seq")).await?,
                select: self
                    .prepare(format!(
                        "SELECT user_id, read_seq, delivered_seq FROM {ks}.chat_receipts \
                         WHERE chat_id = ?"
                    ))
                    .await?,
            })
        };
        self.receipts.get_or_try_init(init).await
    }

    /// Moves `user`'s read (`delivered == false`) or delivery pointer in
    /// `chat_id` to `up_to_seq`; never back.
    pub async fn put_receipt(
        &self,
        chat_id: Uuid,
        user: &str,
        up_to_seq: u64,
        delivered: bool,
    ) -> Result<(), StoreError> {
        let p = self.receipts_prepared().await?;
        let up_to = cql_seq(up_to_seq)?;
        let (what, statement) = if delivered {
            ("write delivery pointer", &p.delivered)
        } else {
            ("write read pointer of the chat", &p.read)
        };
        self.execute(what, statement, (up_to, up_to, chat_id, user))
            .await
            .map(drop)
    }

    /// Every member's pointers in `chat_id`, by user id. Members with no
    /// receipt yet are absent.
    pub async fn receipts(&self, chat_id: Uuid) -> Result<Vec<ReceiptRow>, StoreError> {
        let p = self.receipts_prepared().await?;
        let rows: Vec<(String, Option<i64>, Option<i64>)> = self
            .execute_all("read receipts", &p.select, (chat_id,))
            .await?;
        let n = |v: Option<i64>| v.and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
        Ok(rows
            .into_iter()
            .map(|(user, read, delivered)| ReceiptRow {
                user,
                read_seq: n(read),
                delivered_seq: n(delivered),
            })
            .collect())
    }
}
