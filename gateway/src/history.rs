//! The Cassandra reads the gateway needs (sync, history, chat list,
//! projector progress), behind a small trait so the sync logic can be tested
//! without Cassandra. Production: [`chat_projectors::store::Store`]. Tests
//! and tools: [`MemoryHistory`].

use chat_projectors::alias::FollowingStore;
use chat_projectors::store::{
    ChatRow, DeviceRow, MessageRow, PresenceRow, ReceiptRow, Store, StoreError, UserChatRow,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use uuid::Uuid;

/// The projector whose progress a first sync waits for.
pub const HISTORY_PROJECTOR: &str = "history";

pub type StoreResult<T> = Result<T, StoreError>;

/// Read access to the history projection.
pub trait HistoryReader: Send + Sync + 'static {
    /// Every chat the user is or was in.
    fn user_chats<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<UserChatRow>>>;
    /// A chat's row (None: unknown or not projected yet).
    fn chat(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Option<ChatRow>>>;
    /// Chats with an event for `user` sequenced at or after `since_ms`.
    fn changed_chats_since<'a>(
        &'a self,
        user: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<Uuid>>>;
    /// Events with `after < seq < before`, ascending; the page starts right
    /// after `after` when it is given, else it ends right before `before`
    /// (or at the newest event).
    fn messages_page(
        &self,
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'_, StoreResult<Vec<MessageRow>>>;
    /// `chat.events` partition -> next offset fully projected by `projector`.
    fn progress<'a>(&'a self, projector: &'a str) -> BoxFuture<'a, StoreResult<HashMap<i32, i64>>>;
    /// The current members of a chat as `(user, role, joined_seq)`.
    fn members(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<(String, String, u64)>>>;
    /// Members' read and delivery pointers in a chat.
    fn receipts(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<ReceiptRow>>>;
    /// The latest presence of each of `users` that has one.
    fn presence_of<'a>(
        &'a self,
        users: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Vec<PresenceRow>>>;
    /// The devices of `user`.
    fn devices<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<DeviceRow>>>;
    /// One device of `user`.
    fn device<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<DeviceRow>>>;
}

impl HistoryReader for Store {
    fn user_chats<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<UserChatRow>>> {
        Store::user_chats(self, user).boxed()
    }
    fn chat(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Option<ChatRow>>> {
        Store::chat(self, chat).boxed()
    }
    fn changed_chats_since<'a>(
        &'a self,
        user: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<Uuid>>> {
        Store::changed_chats_since(self, user, since_ms).boxed()
    }
    fn messages_page(
        &self,
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'_, StoreResult<Vec<MessageRow>>> {
        Store::messages_page(self, chat, before, after, limit).boxed()
    }
    fn progress<'a>(&'a self, projector: &'a str) -> BoxFuture<'a, StoreResult<HashMap<i32, i64>>> {
        Store::progress(self, projector).boxed()
    }
    fn members(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<(String, String, u64)>>> {
        Store::members(self, chat).boxed()
    }
    fn receipts(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<ReceiptRow>>> {
        Store::receipts(self, chat).boxed()
    }
    fn presence_of<'a>(
        &'a self,
        users: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Vec<PresenceRow>>> {
        Store::presence_of(self, users).boxed()
    }
    fn devices<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<DeviceRow>>> {
        Store::devices(self, user).boxed()
    }
    fn device<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<DeviceRow>>> {
        Store::device(self, user, device).boxed()
    }
}

/// A store following a keyspace alias (`store.keyspace_alias`): each read
/// goes to the keyspace the alias names as of the last poll; reads in
/// flight finish on the keyspace they started on.
impl HistoryReader for FollowingStore {
    fn user_chats<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<UserChatRow>>> {
        let s = self.current();
        async move { s.user_chats(user).await }.boxed()
    }
    fn chat(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Option<ChatRow>>> {
        let s = self.current();
        async move { s.chat(chat).await }.boxed()
    }
    fn changed_chats_since<'a>(
        &'a self,
        user: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<Uuid>>> {
        let s = self.current();
        async move { s.changed_chats_since(user, since_ms).await }.boxed()
    }
    fn messages_page(
        &self,
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'_, StoreResult<Vec<MessageRow>>> {
        let s = self.current();
        async move { s.messages_page(chat, before, after, limit).await }.boxed()
    }
    fn progress<'a>(&'a self, projector: &'a str) -> BoxFuture<'a, StoreResult<HashMap<i32, i64>>> {
        let s = self.current();
        async move { s.progress(projector).await }.boxed()
    }
    fn members(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<(String, String, u64)>>> {
        let s = self.current();
        async move { s.members(chat).await }.boxed()
    }
    fn receipts(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<ReceiptRow>>> {
        let s = self.current();
        async move { s.receipts(chat).await }.boxed()
    }
    fn presence_of<'a>(
        &'a self,
        users: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Vec<PresenceRow>>> {
        let s = self.current();
        async move { s.presence_of(users).await }.boxed()
    }
    fn devices<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<DeviceRow>>> {
        let s = self.current();
        async move { s.devices(user).await }.boxed()
    }
    fn device<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<DeviceRow>>> {
        let s = self.current();
        async move { s.device(user, device).await }.boxed()
    }
}

/// An in-memory history with the same semantics as the store's reads, for
/// tests. Fill it with [`MemoryHistory::put`] and friends.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    messages: HashMap<Uuid, BTreeMap<u64, MessageRow>>,
    chats: HashMap<Uuid, ChatRow>,
    user_chats: HashMap<String, BTreeMap<Uuid, UserChatRow>>,
    changes: Vec<(String, i64, Uuid)>,
    progress: HashMap<String, HashMap<i32, i64>>,
    fail: bool,
    /// How long each `messages_page` takes (a slow store, in tests).
    page_delay: std::time::Duration,
}

impl MemoryHistory {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Stores an event and advances the chat's `last_seq`.
    pub fn put(&self, row: MessageRow) {
        let mut m = self.lock();
        let chat = m.chats.entry(row.chat_id).or_insert_with(|| ChatRow {
            chat_id: row.chat_id,
            kind: "group".into(),
            title: None,
            created_by: row.sender_user.clone(),
            created_at_ms: row.sequenced_ts_ms,
            max_members: 256,
            last_seq: 0,
        });
        chat.last_seq = chat.last_seq.max(row.seq);
        m.messages
            .entry(row.chat_id)
            .or_default()
            .insert(row.seq, row);
    }

    /// Sets a chat row's `last_seq` ahead of its readable messages, as
    /// Cassandra can show it while the projector's writes land (tests).
    pub fn announce_head(&self, chat: Uuid, last_seq: u64) {
        if let Some(c) = self.lock().chats.get_mut(&chat) {
            c.last_seq = last_seq;
        }
    }

    /// Makes `user` a member of `chat` (as of `joined_seq`), changed at `at_ms`.
    pub fn join(&self, user: &str, chat: Uuid, joined_seq: u64, at_ms: i64) {
        let mut m = self.lock();
        m.user_chats.entry(user.to_string()).or_default().insert(
            chat,
            UserChatRow {
                chat_id: chat,
                role: "member".into(),
                joined_seq,
                left_seq: None,
                last_read_seq: 0,
                muted: false,
            },
        );
        m.changes.push((user.to_string(), at_ms, chat));
    }

    /// Sets `left_seq` of `user` in `chat`.
    pub fn leave(&self, user: &str, chat: Uuid, left_seq: u64) {
        let mut m = self.lock();
        if let Some(r) = m.user_chats.get_mut(user).and_then(|c| c.get_mut(&chat)) {
            r.left_seq = Some(left_seq);
        }
    }

    /// Records a change of `chat` for `user` at `at_ms`.
    pub fn mark_changed(&self, user: &str, chat: Uuid, at_ms: i64) {
        self.lock().changes.push((user.to_string(), at_ms, chat));
    }

    pub fn set_progress(&self, projector: &str, partition: i32, next_offset: i64) {
        self.lock()
            .progress
            .entry(projector.to_string())
            .or_default()
            .insert(partition, next_offset);
    }

    /// Makes every `messages_page` read (history, sync, gap fills) take
    /// `delay` (a slow store).
    pub fn set_page_delay(&self, delay: std::time::Duration) {
        self.lock().page_delay = delay;
    }

    /// Makes every read fail (a Cassandra outage).
    pub fn set_failing(&self, fail: bool) {
        self.lock().fail = fail;
    }

    fn check(&self) -> StoreResult<()> {
        if self.lock().fail {
            return Err(StoreError::Query {
                what: "read".into(),
                detail: "memory history set to fail".into(),
                retryable: true,
            });
        }
        Ok(())
    }

    fn page(
        &self,
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> Vec<MessageRow> {
        let m = self.lock();
        let Some(rows) = m.messages.get(&chat) else {
            return Vec::new();
        };
        let lo = after.map_or(0, |a| a.saturating_add(1));
        let hi = match before {
            Some(0) => return Vec::new(),
            Some(b) => b - 1,
            None => u64::MAX,
        };
        if lo > hi {
            return Vec::new();
        }
        let range = rows.range(lo..=hi).map(|(_, r)| r.clone());
        let limit = limit as usize;
        if after.is_some() {
            range.take(limit).collect()
        } else {
            let mut v: Vec<MessageRow> = range.rev().take(limit).collect();
            v.reverse();
            v
        }
    }
}

impl HistoryReader for MemoryHistory {
    fn user_chats<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<UserChatRow>>> {
        let r = self.check().map(|()| {
            self.lock()
                .user_chats
                .get(user)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default()
        });
        futures::future::ready(r).boxed()
    }
    fn chat(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Option<ChatRow>>> {
        let r = self.check().map(|()| self.lock().chats.get(&chat).cloned());
        futures::future::ready(r).boxed()
    }
    fn changed_chats_since<'a>(
        &'a self,
        user: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, StoreResult<Vec<Uuid>>> {
        let r = self.check().map(|()| {
            let floor = since_ms.div_euclid(1000) * 1000;
            let mut out: Vec<Uuid> = Vec::new();
            for (u, at, chat) in self.lock().changes.iter().rev() {
                if u == user && *at >= floor && !out.contains(chat) {
                    out.push(*chat);
                }
            }
            out
        });
        futures::future::ready(r).boxed()
    }
    fn messages_page(
        &self,
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> BoxFuture<'_, StoreResult<Vec<MessageRow>>> {
        let delay = self.lock().page_delay;
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.check().map(|()| self.page(chat, before, after, limit))
        }
        .boxed()
    }
    fn progress<'a>(&'a self, projector: &'a str) -> BoxFuture<'a, StoreResult<HashMap<i32, i64>>> {
        let r = self.check().map(|()| {
            self.lock()
                .progress
                .get(projector)
                .cloned()
                .unwrap_or_default()
        });
        futures::future::ready(r).boxed()
    }
    fn members(&self, chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<(String, String, u64)>>> {
        let r = self.check().map(|()| {
            let mut out: Vec<(String, String, u64)> = Vec::new();
            for (user, chats) in &self.lock().user_chats {
                if let Some(row) = chats.get(&chat).filter(|r| r.left_seq.is_none()) {
                    out.push((user.clone(), row.role.clone(), row.joined_seq));
                }
            }
            out.sort();
            out
        });
        futures::future::ready(r).boxed()
    }
    fn receipts(&self, _chat: Uuid) -> BoxFuture<'_, StoreResult<Vec<ReceiptRow>>> {
        futures::future::ready(self.check().map(|()| Vec::new())).boxed()
    }
    fn presence_of<'a>(
        &'a self,
        _users: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Vec<PresenceRow>>> {
        futures::future::ready(self.check().map(|()| Vec::new())).boxed()
    }
    fn devices<'a>(&'a self, _user: &'a str) -> BoxFuture<'a, StoreResult<Vec<DeviceRow>>> {
        futures::future::ready(self.check().map(|()| Vec::new())).boxed()
    }
    fn device<'a>(
        &'a self,
        _user: &'a str,
        _device: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<DeviceRow>>> {
        futures::future::ready(self.check().map(|()| None)).boxed()
    }
}

/// A stored event row, for tests: a text message.
pub fn text_row(chat: Uuid, seq: u64, sender: &str, text: &str) -> MessageRow {
    MessageRow {
        chat_id: chat,
        seq,
        event_id: Uuid::new_v4(),
        kind: "MessageSent".into(),
        sender_user: sender.into(),
        sender_device: "d".into(),
        client_msg_id: Some(format!("m{seq}")),
        body: serde_json::json!({"kind":"text","text":text,"media":null,"reply_to_seq":null})
            .to_string(),
        server_ts_ms: 1_000 + seq as i64,
        sequenced_ts_ms: 1_000 + seq as i64,
        trace_id: "t".into(),
    }
}
