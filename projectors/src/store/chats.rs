//! Chat state: `chats`, `chat_members`, `user_chats`, `direct_chats`, and the
//! reconnect-sync markers in `user_changes`.
//!
//! Every write of per-chat state carries `USING TIMESTAMP <seq>` (the seq of
//! the event that caused it; `up_to_seq` for read pointers), so the cell or
//! tombstone of a later event always wins over an earlier one, whatever the
//! order the writes reach Cassandra: replaying the log never moves state back.
//! Nothing else may write these columns without such a timestamp (a wall-clock
//! timestamp, microseconds since 1970, would beat every seq forever). The
//! one exception is `user_chats.muted`, a user setting with no seq, written
//! only by [`Store::set_muted`] with the event's time in microseconds.

use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, MaybeUnset};
use uuid::Uuid;

use super::{cql_seq, Store, StoreError};

/// One row of `chats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRow {
    /// The chat.
    pub chat_id: Uuid,
    /// `direct` or `group` (the Avro symbol of `ChatKind`).
    pub kind: String,
    /// Title of a group chat.
    pub title: Option<String>,
    /// The user who created the chat.
    pub created_by: String,
    /// When the chat was created (sequenced), ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Upper bound on the number of members.
    pub max_members: u32,
    /// The highest seq projected so far (0 when none).
    pub last_seq: u64,
}

/// One row of `user_chats`: a chat of a user, with their per-chat state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserChatRow {
    /// The chat.
    pub chat_id: Uuid,
    /// The user's (last) role in the chat: `admin` or `member`.
    pub role: String,
    /// Seq of the event that (last) made the user a member.
    pub joined_seq: u64,
    /// Seq of the event that removed the user; `None` while they are a member.
    pub left_seq: Option<u64>,
    /// The user's read pointer (0 when nothing was read).
    pub last_read_seq: u64,
    /// Whether the user muted the chat.
    pub muted: bool,
}

/// `ms` floored to a whole second.
pub fn floor_to_second(ms: i64) -> i64 {
    ms.div_euclid(1000) * 1000
}

/// Width of a `user_changes.changed_at` bucket, in ms: the projector writes
/// `changed_at` = the event's `sequenced_ts` floored to it
/// ([`change_bucket`]), once per chat and bucket for all members, and
/// [`Store::changed_chats_since`] reads from the same floor. One constant
/// for the writer and the reader, on purpose not a config key: a reader
/// whose floor is finer than the writer's (the gateway with 1 s, the
/// projector with 60 s) would miss changes, so the two must never be set
/// apart. Changing it is a data-format change: deploy the readers with the
/// larger of the old and new widths (a multiple of both) first.
pub const CHANGE_BUCKET_MS: i64 = 60_000;

/// `ms` floored to its [`CHANGE_BUCKET_MS`] bucket (also before 1970): the
/// `changed_at` of a marker for an event sequenced at `ms`.
pub fn change_bucket(ms: i64) -> i64 {
    ms.div_euclid(CHANGE_BUCKET_MS) * CHANGE_BUCKET_MS
}

#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) insert_chat: PreparedStatement,
    pub(super) insert_member: PreparedStatement,
    pub(super) delete_member: PreparedStatement,
    pub(super) member_role: PreparedStatement,
    pub(super) join_user_chat: PreparedStatement,
    pub(super) leave_user_chat: PreparedStatement,
    pub(super) user_chat_role: PreparedStatement,
    pub(super) read_up_to: PreparedStatement,
    pub(super) set_muted: PreparedStatement,
    pub(super) insert_direct: PreparedStatement,
    pub(super) insert_change: PreparedStatement,
    pub(super) select_chat: PreparedStatement,
    pub(super) select_members: PreparedStatement,
    pub(super) select_user_chats: PreparedStatement,
    pub(super) select_changes: PreparedStatement,
}

type UserChatRaw = (
    Uuid,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
);

type ChatRaw = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<i32>,
    Option<i64>,
);

fn seq_of(v: Option<i64>) -> u64 {
    v.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)
}

impl Store {
    pub(super) async fn chats_prepared(&self) -> Result<&Prepared, StoreError> {
        self.chats.get_or_try_init(|| self.prepare_chats()).await
    }

    async fn prepare_chats(&self) -> Result<Prepared, StoreError> {
        let ks = &self.keyspace;
        let p = |cql: String| self.prepare(cql);
        Ok(Prepared {
            insert_chat: p(format!(
                "INSERT INTO {ks}.chats (chat_id, kind, title, created_by, created_at, max_members) \
                 VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            insert_member: p(format!(
                "INSERT INTO {ks}.chat_members (chat_id, user_id, role, joined_seq) \
                 VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            delete_member: p(format!(
                "DELETE FROM {ks}.chat_members USING TIMESTAMP ? WHERE chat_id = ? AND user_id = ?"
            ))
            .await?,
            member_role: p(format!(
                "UPDATE {ks}.chat_members USING TIMESTAMP ? SET role = ? WHERE chat_id = ? AND user_id = ?"
            ))
            .await?,
            join_user_chat: p(format!(
                "INSERT INTO {ks}.user_chats (user_id, chat_id, role, joined_seq, left_seq) \
                 VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            leave_user_chat: p(format!(
                "UPDATE {ks}.user_chats USING TIMESTAMP ? SET left_seq = ? WHERE user_id = ? AND chat_id = ?"
            ))
            .await?,
            user_chat_role: p(format!(
                "UPDATE {ks}.user_chats USING TIMESTAMP ? SET role = ? WHERE user_id = ? AND chat_id = ?"
            ))
            .await?,
            read_up_to: p(format!(
                "UPDATE {ks}.user_chats USING TIMESTAMP ? SET last_read_seq = ? \
                 WHERE user_id = ? AND chat_id = ?"
            ))
            .await?,
            set_muted: p(format!(
                "UPDATE {ks}.user_chats USING TIMESTAMP ? SET muted = ? \
                 WHERE user_id = ? AND chat_id = ?"
            ))
            .await?,
            insert_direct: p(format!(
                "INSERT INTO {ks}.direct_chats (user_low, user_high, chat_id) VALUES (?, ?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            insert_change: p(format!(
                "INSERT INTO {ks}.user_changes (user_id, changed_at, chat_id) VALUES (?, ?, ?)"
            ))
            .await?,
            select_chat: p(format!(
                "SELECT kind, title, created_by, created_at, max_members, last_seq \
                 FROM {ks}.chats WHERE chat_id = ?"
            ))
            .await?,
            select_members: p(format!(
                "SELECT user_id, role, joined_seq FROM {ks}.chat_members WHERE chat_id = ?"
            ))
            .await?,
            select_user_chats: p(format!(
                "SELECT chat_id, role, joined_seq, left_seq, last_read_seq, muted \
                 FROM {ks}.user_chats WHERE user_id = ?"
            ))
            .await?,
            select_changes: p(format!(
                "SELECT chat_id FROM {ks}.user_changes WHERE user_id = ? AND changed_at >= ?"
            ))
            .await?,
        })
    }

    /// Writes a chat's creation metadata (everything but `last_seq`, which
    /// [`Store::put_message`] owns) with write time `seq`.
    pub async fn put_chat(&self, chat: &ChatRow, seq: u64) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let title = match &chat.title {
            Some(t) => MaybeUnset::Set(t.as_str()),
            None => MaybeUnset::Unset,
        };
        let max = i32::try_from(chat.max_members).unwrap_or(i32::MAX);
        let values = (
            chat.chat_id,
            &chat.kind,
            title,
            &chat.created_by,
            CqlTimestamp(chat.created_at_ms),
            max,
            cql_seq(seq)?,
        );
        self.execute("write chat", &p.insert_chat, values)
            .await
            .map(drop)
    }

    /// Makes `user` a member of `chat_id` as of `seq` (`chat_members` and
    /// `user_chats`). `rejoin` also clears a `left_seq` of an earlier
    /// membership (pass false for the members of a new chat: no tombstone).
    pub async fn put_member(
        &self,
        chat_id: Uuid,
        user: &str,
        role: &str,
        seq: u64,
        rejoin: bool,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let ts = cql_seq(seq)?;
        let left: MaybeUnset<Option<i64>> = if rejoin {
            MaybeUnset::Set(None)
        } else {
            MaybeUnset::Unset
        };
        let member = self.execute(
            "write chat member",
            &p.insert_member,
            (chat_id, user, role, ts, ts),
        );
        let mine = self.execute(
            "write user chat",
            &p.join_user_chat,
            (user, chat_id, role, ts, left, ts),
        );
        futures::try_join!(member, mine).map(drop)
    }

    /// Removes `user` from `chat_id` as of `seq`: deletes the `chat_members`
    /// row and sets `user_chats.left_seq`.
    pub async fn remove_member(
        &self,
        chat_id: Uuid,
        user: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let ts = cql_seq(seq)?;
        let member = self.execute("delete chat member", &p.delete_member, (ts, chat_id, user));
        let mine = self.execute(
            "write user chat left_seq",
            &p.leave_user_chat,
            (ts, ts, user, chat_id),
        );
        futures::try_join!(member, mine).map(drop)
    }

    /// Sets a member's role as of `seq` in `chat_members` and `user_chats`.
    pub async fn set_member_role(
        &self,
        chat_id: Uuid,
        user: &str,
        role: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let ts = cql_seq(seq)?;
        let member = self.execute(
            "write member role",
            &p.member_role,
            (ts, role, chat_id, user),
        );
        let mine = self.execute(
            "write user chat role",
            &p.user_chat_role,
            (ts, role, user, chat_id),
        );
        futures::try_join!(member, mine).map(drop)
    }

    /// Moves `user`'s read pointer in `chat_id` to `up_to_seq`, never back
    /// (write time = `up_to_seq`).
    pub async fn mark_read(
        &self,
        user: &str,
        chat_id: Uuid,
        up_to_seq: u64,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let up_to = cql_seq(up_to_seq)?;
        let values = (up_to, up_to, user, chat_id);
        self.execute("write read pointer", &p.read_up_to, values)
            .await
            .map(drop)
    }

    /// Mutes or unmutes `chat_id` for `user` as of `at_ms` (the event's
    /// sequencing time; write time in microseconds, so the latest wins).
    pub async fn set_muted(
        &self,
        user: &str,
        chat_id: Uuid,
        muted: bool,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let values = (at_ms.saturating_mul(1000), muted, user, chat_id);
        self.execute("write muted", &p.set_muted, values)
            .await
            .map(drop)
    }

    /// Records the 1:1 chat of two users (in either order) with write time `seq`.
    pub async fn put_direct_chat(
        &self,
        a: &str,
        b: &str,
        chat_id: Uuid,
        seq: u64,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        let values = (low, high, chat_id, cql_seq(seq)?);
        self.execute("write direct chat", &p.insert_direct, values)
            .await
            .map(drop)
    }

    /// Records that `chat_id` changed for `user` at `at_ms` (stored floored to
    /// its [`change_bucket`]; idempotent; expires after the table's 30-day TTL).
    pub async fn mark_changed(
        &self,
        user: &str,
        chat_id: Uuid,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let p = self.chats_prepared().await?;
        let values = (user, CqlTimestamp(change_bucket(at_ms)), chat_id);
        self.execute("write user change", &p.insert_change, values)
            .await
            .map(drop)
    }

    /// The chat's row, or `None` when its creation was not projected (yet).
    pub async fn chat(&self, chat_id: Uuid) -> Result<Option<ChatRow>, StoreError> {
        let p = self.chats_prepared().await?;
        let what = "read chat";
        let rows: Vec<ChatRaw> = self.execute_all(what, &p.select_chat, (chat_id,)).await?;
        let Some((Some(kind), title, created_by, created_at, max, last_seq)) =
            rows.into_iter().next()
        else {
            return Ok(None);
        };
        Ok(Some(ChatRow {
            chat_id,
            kind,
            title,
            created_by: created_by.unwrap_or_default(),
            created_at_ms: created_at.map_or(0, |t| t.0),
            max_members: max.and_then(|m| u32::try_from(m).ok()).unwrap_or(0),
            last_seq: seq_of(last_seq),
        }))
    }

    /// The current members of a chat as `(user_id, role, joined_seq)`,
    /// ordered by user id.
    pub async fn members(&self, chat_id: Uuid) -> Result<Vec<(String, String, u64)>, StoreError> {
        let p = self.chats_prepared().await?;
        let rows: Vec<(String, Option<String>, Option<i64>)> = self
            .execute_all("read chat members", &p.select_members, (chat_id,))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(user, role, joined)| (user, role.unwrap_or_default(), seq_of(joined)))
            .collect())
    }

    /// Every chat `user` is or was in (a left chat keeps its row with
    /// `left_seq` set), ordered by chat id.
    pub async fn user_chats(&self, user: &str) -> Result<Vec<UserChatRow>, StoreError> {
        let p = self.chats_prepared().await?;
        let rows: Vec<UserChatRaw> = self
            .execute_all("read user chats", &p.select_user_chats, (user,))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(chat_id, role, joined, left, read, muted)| UserChatRow {
                chat_id,
                role: role.unwrap_or_default(),
                joined_seq: seq_of(joined),
                left_seq: left.and_then(|s| u64::try_from(s).ok()),
                last_read_seq: seq_of(read),
                muted: muted.unwrap_or(false),
            })
            .collect())
    }

    /// The distinct chats with a change for `user` at or after
    /// `change_bucket(since_ms)`, most recently changed first. Finds every
    /// chat that got an event (while the user was a member, or that removed
    /// them) sequenced at or after `since_ms`, within the 30-day TTL; may
    /// also name chats that changed up to [`CHANGE_BUCKET_MS`] earlier
    /// (callers ask for events after their own seq, so extras cost a read).
    pub async fn changed_chats_since(
        &self,
        user: &str,
        since_ms: i64,
    ) -> Result<Vec<Uuid>, StoreError> {
        let p = self.chats_prepared().await?;
        let since = CqlTimestamp(change_bucket(since_ms));
        let rows: Vec<(Uuid,)> = self
            .execute_all("read user changes", &p.select_changes, (user, since))
            .await?;
        let mut seen = std::collections::HashSet::new();
        Ok(rows
            .into_iter()
            .map(|(c,)| c)
            .filter(|c| seen.insert(*c))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{change_bucket, floor_to_second, CHANGE_BUCKET_MS};

    #[test]
    fn change_buckets_floor_to_the_bucket_also_before_1970() {
        assert_eq!(CHANGE_BUCKET_MS, 60_000);
        let b = 1_767_225_600_000; // a multiple of 60 s
        assert_eq!(change_bucket(b), b);
        assert_eq!(change_bucket(b + 59_999), b);
        assert_eq!(change_bucket(b + 60_000), b + 60_000);
        assert_eq!(change_bucket(b - 1), b - 60_000);
        assert_eq!(change_bucket(-1), -60_000);
        // Monotonic: t >= T implies bucket(t) >= bucket(T) (the sync proof).
        for (t, big_t) in [(b + 1, b), (b + 60_001, b + 59_999), (b, b)] {
            assert!(t >= big_t && change_bucket(t) >= change_bucket(big_t));
        }
    }

    #[test]
    fn floors_to_the_second_also_before_1970() {
        assert_eq!(floor_to_second(1_700_000_000_999), 1_700_000_000_000);
        assert_eq!(floor_to_second(1_700_000_000_000), 1_700_000_000_000);
        assert_eq!(floor_to_second(-1), -1000);
    }
}
