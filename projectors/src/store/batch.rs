//! Many projection writes at once: [`Store::apply`] takes the writes of a
//! batch of events, groups the statements by Cassandra partition key
//! (keyspace + key: `chats`, `chat_members` and `chat_receipts` share the
//! key `chat_id`; `user_chats` and `user_changes` share `user_id`), sends
//! each group as one unlogged batch (a single mutation on the replicas of
//! that key, routed token-aware by the driver from its first prepared
//! statement), and runs the groups concurrently. Every statement is the
//! same prepared, idempotent statement as the single-write API (keyed by
//! the event or `USING TIMESTAMP <seq>`), so a batch applied twice, or
//! partly and then again, leaves the same rows.

use futures::{StreamExt, TryStreamExt};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, MaybeUnset};
use std::collections::HashMap;
use uuid::Uuid;

use super::chats::change_bucket;
use super::messages::bucket_of;
use super::{cql_seq, ChatRow, MessageRow, Store, StoreError};

/// Statements per unlogged batch at most.
const MAX_STATEMENTS: usize = 24;
/// Approximate bytes per unlogged batch at most (Cassandra warns at 5 KiB).
const MAX_BYTES: usize = 4_000;

/// One write of a projection (see the single-write methods of [`Store`] of
/// the same meaning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// [`Store::put_message`]'s row (without the head, see [`Write::Head`]).
    Message(MessageRow),
    /// `chats.last_seq = seq` with write time `seq`.
    Head { chat: Uuid, seq: u64 },
    /// [`Store::put_chat`].
    Chat { row: ChatRow, seq: u64 },
    /// [`Store::put_member`].
    Member {
        chat: Uuid,
        user: String,
        role: String,
        seq: u64,
        rejoin: bool,
    },
    /// [`Store::remove_member`].
    RemoveMember { chat: Uuid, user: String, seq: u64 },
    /// [`Store::set_member_role`].
    Role {
        chat: Uuid,
        user: String,
        role: String,
        seq: u64,
    },
    /// [`Store::mark_read`].
    Read {
        user: String,
        chat: Uuid,
        up_to: u64,
    },
    /// [`Store::set_muted`].
    Muted {
        user: String,
        chat: Uuid,
        muted: bool,
        at_ms: i64,
    },
    /// [`Store::put_receipt`].
    Receipt {
        chat: Uuid,
        user: String,
        up_to: u64,
        delivered: bool,
    },
    /// [`Store::put_direct_chat`].
    Direct {
        a: String,
        b: String,
        chat: Uuid,
        seq: u64,
    },
    /// [`Store::mark_changed`].
    Changed {
        user: String,
        chat: Uuid,
        at_ms: i64,
    },
}

/// The Cassandra partition a statement writes (keyspace-wide: tables with
/// the same key value share a mutation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Chat(Uuid),
    Messages(Uuid, i32),
    User(String),
    Direct(String, String),
}

type Values = Box<dyn SerializeRow + Send + Sync>;

struct Stmt {
    key: Key,
    statement: PreparedStatement,
    values: Values,
    bytes: usize,
}

impl Store {
    /// Applies `writes` (any order: each is idempotent and carries its own
    /// write time), up to `concurrency` requests at a time. On an error some
    /// writes may be done; applying the same writes again is harmless.
    pub async fn apply(&self, writes: Vec<Write>, concurrency: usize) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut order: Vec<Key> = Vec::new();
        let mut groups: HashMap<Key, Vec<Stmt>> = HashMap::new();
        for w in writes {
            for s in self.statements(w).await? {
                let group = groups.entry(s.key.clone()).or_insert_with(|| {
                    order.push(s.key.clone());
                    Vec::new()
                });
                group.push(s);
            }
        }
        let mut requests: Vec<Vec<Stmt>> = Vec::new();
        for key in order {
            let Some(group) = groups.remove(&key) else {
                continue;
            };
            let mut current: Vec<Stmt> = Vec::new();
            let mut bytes = 0;
            for s in group {
                if !current.is_empty()
                    && (current.len() >= MAX_STATEMENTS || bytes + s.bytes > MAX_BYTES)
                {
                    requests.push(std::mem::take(&mut current));
                    bytes = 0;
                }
                bytes += s.bytes;
                current.push(s);
            }
            requests.push(current);
        }
        futures::stream::iter(requests)
            .map(|r| self.send(r))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<()>()
            .await
    }

    async fn send(&self, mut statements: Vec<Stmt>) -> Result<(), StoreError> {
        if statements.len() == 1 {
            let s = statements.remove(0);
            return self
                .execute("write projection", &s.statement, s.values)
                .await
                .map(drop);
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        let mut values: Vec<Values> = Vec::with_capacity(statements.len());
        for s in statements {
            batch.append_statement(s.statement);
            values.push(s.values);
        }
        let result = self.session.batch(&batch, values).await;
        result
            .map(drop)
            .map_err(|e| StoreError::query("write projection batch", e))
    }

    /// The statements of one write, with their partition keys.
    async fn statements(&self, w: Write) -> Result<Vec<Stmt>, StoreError> {
        let stmt = |key: Key, statement: &PreparedStatement, values: Values, bytes: usize| Stmt {
            key,
            statement: statement.clone(),
            values,
            bytes,
        };
        Ok(match w {
            Write::Message(m) => {
                let p = self.prepared().await?;
                let bytes = 120 + m.body.len() + m.trace_id.len() + m.sender_user.len();
                let bucket = bucket_of(m.seq);
                let client_msg_id = match m.client_msg_id {
                    Some(id) => MaybeUnset::Set(id),
                    None => MaybeUnset::Unset,
                };
                let values = (
                    bucket,
                    m.chat_id,
                    cql_seq(m.seq)?,
                    m.event_id,
                    m.kind,
                    m.sender_user,
                    m.sender_device,
                    client_msg_id,
                    m.body,
                    CqlTimestamp(m.server_ts_ms),
                    CqlTimestamp(m.sequenced_ts_ms),
                    m.trace_id,
                );
                let key = Key::Messages(m.chat_id, bucket);
                vec![stmt(key, &p.insert, Box::new(values), bytes)]
            }
            Write::Head { chat, seq } => {
                let p = self.prepared().await?;
                let seq = cql_seq(seq)?;
                let values = (seq, seq, chat);
                vec![stmt(Key::Chat(chat), &p.advance_head, Box::new(values), 40)]
            }
            Write::Chat { row, seq } => {
                let p = self.chats_prepared().await?;
                let title = match row.title {
                    Some(t) => MaybeUnset::Set(t),
                    None => MaybeUnset::Unset,
                };
                let max = i32::try_from(row.max_members).unwrap_or(i32::MAX);
                let values = (
                    row.chat_id,
                    row.kind,
                    title,
                    row.created_by,
                    CqlTimestamp(row.created_at_ms),
                    max,
                    cql_seq(seq)?,
                );
                vec![stmt(
                    Key::Chat(row.chat_id),
                    &p.insert_chat,
                    Box::new(values),
                    120,
                )]
            }
            Write::Member {
                chat,
                user,
                role,
                seq,
                rejoin,
            } => {
                let p = self.chats_prepared().await?;
                let ts = cql_seq(seq)?;
                let left: MaybeUnset<Option<i64>> = if rejoin {
                    MaybeUnset::Set(None)
                } else {
                    MaybeUnset::Unset
                };
                let member = (chat, user.clone(), role.clone(), ts, ts);
                let mine = (user.clone(), chat, role, ts, left, ts);
                vec![
                    stmt(Key::Chat(chat), &p.insert_member, Box::new(member), 60),
                    stmt(Key::User(user), &p.join_user_chat, Box::new(mine), 60),
                ]
            }
            Write::RemoveMember { chat, user, seq } => {
                let p = self.chats_prepared().await?;
                let ts = cql_seq(seq)?;
                let member = (ts, chat, user.clone());
                let mine = (ts, ts, user.clone(), chat);
                vec![
                    stmt(Key::Chat(chat), &p.delete_member, Box::new(member), 50),
                    stmt(Key::User(user), &p.leave_user_chat, Box::new(mine), 50),
                ]
            }
            Write::Role {
                chat,
                user,
                role,
                seq,
            } => {
                let p = self.chats_prepared().await?;
                let ts = cql_seq(seq)?;
                let member = (ts, role.clone(), chat, user.clone());
                let mine = (ts, role, user.clone(), chat);
                vec![
                    stmt(Key::Chat(chat), &p.member_role, Box::new(member), 50),
                    stmt(Key::User(user), &p.user_chat_role, Box::new(mine), 50),
                ]
            }
            Write::Read { user, chat, up_to } => {
                let p = self.chats_prepared().await?;
                let up_to = cql_seq(up_to)?;
                let values = (up_to, up_to, user.clone(), chat);
                vec![stmt(Key::User(user), &p.read_up_to, Box::new(values), 50)]
            }
            Write::Muted {
                user,
                chat,
                muted,
                at_ms,
            } => {
                let p = self.chats_prepared().await?;
                let values = (at_ms.saturating_mul(1000), muted, user.clone(), chat);
                vec![stmt(Key::User(user), &p.set_muted, Box::new(values), 50)]
            }
            Write::Receipt {
                chat,
                user,
                up_to,
                delivered,
            } => {
                let p = self.receipts_prepared().await?;
                let up_to = cql_seq(up_to)?;
                let statement = if delivered { &p.delivered } else { &p.read };
                let values = (up_to, up_to, chat, user);
                vec![stmt(Key::Chat(chat), statement, Box::new(values), 50)]
            }
            Write::Direct { a, b, chat, seq } => {
                let p = self.chats_prepared().await?;
                let (low, high) = if a <= b { (a, b) } else { (b, a) };
                let key = Key::Direct(low.clone(), high.clone());
                let values = (low, high, chat, cql_seq(seq)?);
                vec![stmt(key, &p.insert_direct, Box::new(values), 60)]
            }
            Write::Changed { user, chat, at_ms } => {
                let p = self.chats_prepared().await?;
                let values = (user.clone(), CqlTimestamp(change_bucket(at_ms)), chat);
                vec![stmt(
                    Key::User(user),
                    &p.insert_change,
                    Box::new(values),
                    40,
                )]
            }
        })
    }
}
