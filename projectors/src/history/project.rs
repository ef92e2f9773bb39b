//! The writes one sequenced event implies (see the module doc of
//! [`crate::history`] for the contract), and the per-chat membership cache
//! that decides who gets a `user_changes` marker.

use chat_schemas::{Body, ChatKind, Envelope};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use uuid::Uuid;

use crate::store::{floor_to_second, ChatRow, MessageRow, Store, StoreError};

/// Chats whose membership is cached; past this the cache is emptied and
/// refilled from `chat_members` on demand (always consistent, see
/// [`Projector`]).
const MAX_CACHED_CHATS: usize = 100_000;

/// Concurrent writes per event (members of a new chat, change markers).
const WRITE_CONCURRENCY: usize = 32;

/// Why an event was not projected.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Cassandra failed: the same event must be offered again (never skipped).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The event can never be projected (e.g. a seq without a chat id).
    #[error("malformed event: {0}")]
    Malformed(String),
}

/// What [`Projector::project`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projected {
    /// The event's writes are done.
    Written {
        /// `user_changes` rows written for it.
        markers: usize,
    },
    /// The event has no seq: nothing to project.
    Unsequenced,
}

#[derive(Clone, Debug, Default)]
struct ChatCache {
    /// The `chat.events` partition the chat's events come from.
    partition: i32,
    /// Current members, as of the last event projected for the chat.
    members: BTreeSet<String>,
    /// The floored second of the last `user_changes` markers written for all members.
    marked_second: Option<i64>,
}

/// Projects events into the history tables. Feed it each partition's events
/// in log order, one at a time: the membership cache is derived from them.
///
/// The cache of a chat is filled from `chat_members` when the chat is not in
/// it (after a start or an eviction). The projector writes members in log
/// order and finishes an event's writes before the next one, so that read
/// sees the membership after some event at or after the one being projected;
/// for a restart in the middle of a chat, a user removed by a later
/// (already projected) event can only miss markers that the first pass
/// already wrote, and a user added later may get a harmless extra marker.
///
/// Another consumer may have projected a partition between two events this
/// one saw (a rebalance moved it away and back): when a partition's offsets
/// are not consecutive, the cached chats of that partition are forgotten and
/// reloaded. A false alarm (a dead-lettered record in between) only costs
/// reads.
#[derive(Debug)]
pub struct Projector {
    store: Store,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    chats: HashMap<Uuid, ChatCache>,
    /// Per partition, the offset of the last event seen.
    last_offset: HashMap<i32, i64>,
}

impl Projector {
    /// A projector writing to `store`, with an empty cache.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            state: Mutex::default(),
        }
    }

    /// Does every write `event` implies. Idempotent: projecting an event
    /// again, or the whole log again in order, writes the same rows. On
    /// [`ProjectError::Store`] some writes may be done and the caller must
    /// offer the same event again; the cache only changes after success.
    ///
    /// `partition` and `offset` say where the event was read.
    pub async fn project(
        &self,
        partition: i32,
        offset: i64,
        event: &Envelope,
    ) -> Result<Projected, ProjectError> {
        self.follow(partition, offset);
        let Some(seq) = event.seq else {
            return self.project_receipt(event).await;
        };
        let chat = event
            .chat_id
            .ok_or_else(|| ProjectError::Malformed(format!("seq {seq} without chat_id")))?;
        let at = event.sequenced_ts.unwrap_or(event.server_ts);
        let second = floor_to_second(at);
        let cached = self.cached(chat);
        let (mut members, marked_second) = match (cached, &event.body) {
            (Some(c), _) => (c.members, c.marked_second),
            (None, Body::ChatCreated(_)) => (BTreeSet::new(), None),
            (None, _) => (self.load_members(chat).await?, None),
        };

        let store = &self.store;
        // Users whose membership this event changes: always marked.
        let mut affected: Vec<String> = Vec::new();
        match &event.body {
            Body::ChatCreated(c) => {
                let row = ChatRow {
                    chat_id: chat,
                    kind: c.kind.symbol().into(),
                    title: c.title.clone(),
                    created_by: event.sender_user.clone(),
                    created_at_ms: at,
                    max_members: c.max_members,
                    last_seq: seq,
                };
                store.put_chat(&row, seq).await?;
                for chunk in c.members.chunks(WRITE_CONCURRENCY) {
                    let writes = chunk
                        .iter()
                        .map(|m| store.put_member(chat, &m.user_id, m.role.symbol(), seq, false));
                    futures::future::try_join_all(writes).await?;
                }
                if c.kind == ChatKind::Direct {
                    match c.members.as_slice() {
                        [a, b] => {
                            store
                                .put_direct_chat(&a.user_id, &b.user_id, chat, seq)
                                .await?
                        }
                        other => {
                            tracing::warn!(%chat, members = other.len(), "direct chat without exactly two members: no direct_chats row")
                        }
                    }
                }
                members = c.members.iter().map(|m| m.user_id.clone()).collect();
                affected.extend(members.iter().cloned());
            }
            Body::MemberAdded(m) => {
                store
                    .put_member(chat, &m.user_id, m.role.symbol(), seq, true)
                    .await?;
                members.insert(m.user_id.clone());
                affected.push(m.user_id.clone());
            }
            Body::MemberRemoved(m) => {
                store.remove_member(chat, &m.user_id, seq).await?;
                members.remove(&m.user_id);
                affected.push(m.user_id.clone());
            }
            Body::MemberRoleChanged(m) => {
                store
                    .set_member_role(chat, &m.user_id, m.role.symbol(), seq)
                    .await?;
            }
            _ => {}
        }
        if matches!(event.body, Body::MessageSent(_) | Body::ChatCreated(_)) {
            // What you send you have read (the sequencer's rule too): the
            // sender's unread count. One write per message; `chat_receipts`
            // holds explicit receipts only (a member who sent seq t has read
            // everything up to t: clients combine the two for read marks).
            store.mark_read(&event.sender_user, chat, seq).await?;
        }
        store
            .put_message(&message_row(event, chat, seq, at))
            .await?;

        // Markers last: a marker a reader sees implies the event's rows are there.
        let targets = marker_targets(&members, &affected, marked_second == Some(second));
        let markers = targets.len();
        let targets: Vec<&str> = targets.into_iter().collect();
        for chunk in targets.chunks(WRITE_CONCURRENCY) {
            let writes = chunk.iter().map(|user| store.mark_changed(user, chat, at));
            futures::future::try_join_all(writes).await?;
        }

        self.remember(
            chat,
            ChatCache {
                partition,
                members,
                marked_second: Some(second),
            },
        );
        Ok(Projected::Written { markers })
    }

    /// A receipt (ordered in the partition, no seq): moves the reader's
    /// pointers. Nothing goes to `messages`: receipts are not history.
    async fn project_receipt(&self, event: &Envelope) -> Result<Projected, ProjectError> {
        if let (Some(chat), Body::MuteChanged(m)) = (event.chat_id, &event.body) {
            let at = event.sequenced_ts.unwrap_or(event.server_ts);
            self.store
                .set_muted(&event.sender_user, chat, m.muted, at)
                .await?;
            return Ok(Projected::Written { markers: 0 });
        }
        let (Some(chat), Some((device, up_to))) = (event.chat_id, event.body.receipt()) else {
            return Ok(Projected::Unsequenced);
        };
        let store = &self.store;
        let user = &event.sender_user;
        if device.is_none() {
            futures::try_join!(
                store.mark_read(user, chat, up_to),
                store.put_receipt(chat, user, up_to, false),
            )?;
        } else {
            store.put_receipt(chat, user, up_to, true).await?;
        }
        Ok(Projected::Written { markers: 0 })
    }

    /// Forgets the cached chats of `partition` unless `offset` follows (or
    /// repeats) the last one seen there.
    fn follow(&self, partition: i32, offset: i64) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let last = state.last_offset.insert(partition, offset);
        // The same offset again is a retry of the same event, not a gap.
        if last.is_some_and(|l| l + 1 != offset && l != offset) {
            tracing::debug!(
                partition,
                offset,
                ?last,
                "offsets not consecutive: reloading the partition's members"
            );
            state.chats.retain(|_, c| c.partition != partition);
        }
    }

    fn cached(&self, chat: Uuid) -> Option<ChatCache> {
        self.state.lock().ok()?.chats.get(&chat).cloned()
    }

    fn remember(&self, chat: Uuid, cache: ChatCache) {
        if let Ok(mut state) = self.state.lock() {
            if state.chats.len() >= MAX_CACHED_CHATS && !state.chats.contains_key(&chat) {
                state.chats.clear();
            }
            state.chats.insert(chat, cache);
        }
    }

    async fn load_members(&self, chat: Uuid) -> Result<BTreeSet<String>, StoreError> {
        let rows = self.store.members(chat).await?;
        Ok(rows.into_iter().map(|(user, _, _)| user).collect())
    }
}

/// Who gets a `user_changes` marker for an event: every member (after the
/// event) unless the chat's members were already marked in this second, and
/// always the users whose membership the event changed (an added user was not
/// among the members marked earlier in the second; a removed one must learn
/// of the removal).
fn marker_targets<'a>(
    members: &'a BTreeSet<String>,
    affected: &'a [String],
    already_marked_this_second: bool,
) -> BTreeSet<&'a str> {
    let mut targets: BTreeSet<&str> = affected.iter().map(String::as_str).collect();
    if !already_marked_this_second {
        targets.extend(members.iter().map(String::as_str));
    }
    targets
}

fn message_row(event: &Envelope, chat: Uuid, seq: u64, at: i64) -> MessageRow {
    MessageRow {
        chat_id: chat,
        seq,
        event_id: event.event_id,
        kind: event.body.kind().into(),
        sender_user: event.sender_user.clone(),
        sender_device: event.sender_device.clone(),
        client_msg_id: event.client_msg_id.clone(),
        body: body_json(&event.body),
        server_ts_ms: event.server_ts,
        sequenced_ts_ms: at,
        trace_id: event.trace_id.clone(),
    }
}

/// The JSON of the body's record (not wrapped in the variant name), fields
/// in schema order.
pub fn body_json(body: &Body) -> String {
    body.record_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_schemas::{MemberAdded, MessageKind, MessageSent, Role};

    #[test]
    fn body_json_is_the_inner_record() {
        let body = Body::MessageSent(MessageSent {
            kind: MessageKind::Text,
            text: Some("hi".into()),
            media: None,
            reply_to_seq: None,
        });
        assert_eq!(
            body_json(&body),
            r#"{"kind":"text","text":"hi","media":null,"reply_to_seq":null}"#
        );
        let added = Body::MemberAdded(MemberAdded {
            user_id: "bob".into(),
            role: Role::Admin,
        });
        assert_eq!(body_json(&added), r#"{"user_id":"bob","role":"admin"}"#);
    }

    #[test]
    fn markers_once_per_second_but_always_for_membership_changes() {
        let members: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let added = vec!["c".to_string()];
        let all = marker_targets(&members, &[], false);
        assert_eq!(all.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(marker_targets(&members, &[], true).is_empty());
        let only_added = marker_targets(&members, &added, true);
        assert_eq!(only_added.into_iter().collect::<Vec<_>>(), ["c"]);
        let removed = vec!["z".to_string()];
        let with_removed = marker_targets(&members, &removed, false);
        assert_eq!(with_removed.len(), 4);
    }
}
