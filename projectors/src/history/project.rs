//! The writes a batch of sequenced events of one partition implies (see the
//! module doc of [`crate::history`] for the contract), and the per-chat
//! membership cache, folded in log order, that decides who gets a
//! `user_changes` marker.

use chat_schemas::{Body, ChatKind, Envelope};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

use crate::store::{change_bucket, ChatRow, MessageRow, Store, StoreError, Write};

/// Chats whose membership is cached per partition; past this the
/// partition's cache is emptied and refilled from `chat_members` on demand
/// (always consistent, see [`Projector`]).
const MAX_CACHED_CHATS: usize = 50_000;

/// Concurrent membership reads of a batch (chats not cached).
const LOAD_CONCURRENCY: usize = 32;

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

/// What [`Projector::project_batch`] did with a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Projected {
    /// The offset after the batch's last event: every event of the
    /// partition before it is written (given earlier batches were).
    pub next_offset: i64,
    /// Events of the batch (malformed ones included).
    pub events: usize,
    /// `user_changes` rows written.
    pub markers: usize,
    /// Events that can never be projected: `(offset, reason)`, for the
    /// dead-letter topic. Nothing was written for them.
    pub malformed: Vec<(i64, String)>,
}

/// Where the projector's writes go: the store, or a fake in tests.
pub trait Sink: Send + Sync + 'static {
    /// The current members of `chat` (from `chat_members`).
    fn members(&self, chat: Uuid) -> BoxFuture<'_, Result<BTreeSet<String>, StoreError>>;
    /// Applies the writes (each idempotent, in any order).
    fn apply(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The store as a [`Sink`], with up to `concurrency` requests in flight per
/// [`Sink::apply`].
#[derive(Clone, Debug)]
pub struct StoreSink {
    pub store: Store,
    pub concurrency: usize,
}

impl Sink for StoreSink {
    fn members(&self, chat: Uuid) -> BoxFuture<'_, Result<BTreeSet<String>, StoreError>> {
        async move {
            let rows = self.store.members(chat).await?;
            Ok(rows.into_iter().map(|(user, _, _)| user).collect())
        }
        .boxed()
    }
    fn apply(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.store.apply(writes, self.concurrency).boxed()
    }
}

#[derive(Clone, Debug, Default)]
struct ChatCache {
    /// Current members, as of the last event projected for the chat.
    members: BTreeSet<String>,
    /// The `change_bucket` of the chat's last projected event: when it is
    /// the bucket of the next event, every member already has a marker
    /// for that bucket.
    marked_bucket: Option<i64>,
}

#[derive(Debug, Default)]
struct PartitionState {
    chats: HashMap<Uuid, ChatCache>,
    /// The offset after the last batch projected.
    next_offset: Option<i64>,
}

/// Projects batches of events into the history tables. Feed it each
/// partition's events in log order, batch after batch (partitions may run
/// concurrently, one batch per partition at a time): the membership cache
/// is folded from them.
///
/// The cache of a chat is filled from `chat_members` when the chat is not in
/// it (after a start, an eviction or a gap), before any write of the batch.
/// Batches of a partition are written one after the other, so that read
/// sees the membership after some event at or after the first one of the
/// batch; for a restart in the middle of a chat, a user removed by a later
/// (already projected) event can only miss markers that the first pass
/// already wrote, and a user added later may get a harmless extra marker.
/// The cache changes only when a batch's writes all succeeded: a failed
/// batch offered again folds from the same state.
///
/// Another consumer may have projected a partition between two batches this
/// one saw (a rebalance moved it away and back): when a batch does not start
/// at the offset after the previous one, the partition's cached chats are
/// forgotten and reloaded. A false alarm (a dead-lettered record in
/// between) only costs reads.
pub struct Projector {
    sink: Arc<dyn Sink>,
    partitions: Mutex<HashMap<i32, PartitionState>>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector").finish_non_exhaustive()
    }
}

/// The writes of a batch, deduplicated where only the last one counts.
#[derive(Default)]
struct Plan {
    /// Rows, members, chats, receipts.
    data: Vec<Write>,
    /// Highest seq per chat (`chats.last_seq`).
    heads: HashMap<Uuid, u64>,
    /// Highest read pointer per (user, chat) from sends.
    reads: HashMap<(String, Uuid), u64>,
    /// Highest explicit receipt per (chat, user, delivered).
    receipts: HashMap<(Uuid, String, bool), u64>,
    /// `user_changes` rows, one per (user, chat, bucket).
    markers: Vec<Write>,
    marked: HashSet<(String, Uuid, i64)>,
}

impl Plan {
    fn head(&mut self, chat: Uuid, seq: u64) {
        let h = self.heads.entry(chat).or_insert(seq);
        *h = (*h).max(seq);
    }
    fn read(&mut self, user: &str, chat: Uuid, up_to: u64) {
        let r = self.reads.entry((user.to_string(), chat)).or_insert(up_to);
        *r = (*r).max(up_to);
    }
    fn receipt(&mut self, chat: Uuid, user: &str, up_to: u64, delivered: bool) {
        let key = (chat, user.to_string(), delivered);
        let r = self.receipts.entry(key).or_insert(up_to);
        *r = (*r).max(up_to);
    }
    fn mark(&mut self, user: &str, chat: Uuid, at_ms: i64) {
        if self
            .marked
            .insert((user.to_string(), chat, change_bucket(at_ms)))
        {
            self.markers.push(Write::Changed {
                user: user.to_string(),
                chat,
                at_ms,
            });
        }
    }
    /// Every write of the batch.
    fn into_writes(mut self) -> Vec<Write> {
        let mut data = std::mem::take(&mut self.data);
        data.extend(
            self.heads
                .into_iter()
                .map(|(chat, seq)| Write::Head { chat, seq }),
        );
        data.extend(
            self.reads
                .into_iter()
                .map(|((user, chat), up_to)| Write::Read { user, chat, up_to }),
        );
        data.extend(
            self.receipts
                .into_iter()
                .map(|((chat, user, delivered), up_to)| Write::Receipt {
                    chat,
                    user,
                    up_to,
                    delivered,
                }),
        );
        data.extend(self.markers);
        data
    }
}

impl Projector {
    /// A projector writing to `store` with up to `concurrency` requests in
    /// flight per partition, with an empty cache.
    pub fn new(store: Store, concurrency: usize) -> Self {
        Self::with_sink(Arc::new(StoreSink { store, concurrency }))
    }

    /// A projector writing to `sink`.
    pub fn with_sink(sink: Arc<dyn Sink>) -> Self {
        Self {
            sink,
            partitions: Mutex::default(),
        }
    }

    /// Does every write the events (`(offset, event)`, consecutive records
    /// of `partition` in log order) imply. Idempotent: projecting a batch again, or the
    /// whole log again in order, writes the same rows. On an error some
    /// writes may be done, the cache is unchanged and the caller must offer
    /// the same events again.
    pub async fn project_batch(
        &self,
        partition: i32,
        events: &[(i64, &Envelope)],
    ) -> Result<Projected, StoreError> {
        let Some(&(first, _)) = events.first() else {
            return Ok(Projected::default());
        };
        let last = events.last().map_or(first, |(o, _)| *o);
        let mut state = self
            .partitions
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&partition))
            .unwrap_or_default();
        if state.next_offset.is_some_and(|n| n != first) {
            tracing::debug!(
                partition,
                first,
                expected = ?state.next_offset,
                "offsets not consecutive: reloading the partition's members"
            );
            state.chats.clear();
        }
        let result = self.fold_and_write(&state, events).await;
        let outcome = match result {
            Ok((touched, projected)) => {
                if state.chats.len() + touched.len() > MAX_CACHED_CHATS {
                    state.chats.clear();
                }
                state.chats.extend(touched);
                state.next_offset = Some(last + 1);
                Ok(Projected {
                    next_offset: last + 1,
                    ..projected
                })
            }
            Err(e) => Err(e),
        };
        if let Ok(mut p) = self.partitions.lock() {
            p.insert(partition, state);
        }
        outcome
    }

    /// Folds the batch over `state` (unchanged: the chats it touches are
    /// returned) and writes it.
    async fn fold_and_write(
        &self,
        state: &PartitionState,
        events: &[(i64, &Envelope)],
    ) -> Result<(HashMap<Uuid, ChatCache>, Projected), StoreError> {
        // Chats to read members of: not cached, first event not a creation.
        let mut seen = HashSet::new();
        let mut to_load = Vec::new();
        for (_, e) in events {
            let (Some(_), Some(chat)) = (e.seq, e.chat_id) else {
                continue;
            };
            if seen.insert(chat)
                && !state.chats.contains_key(&chat)
                && !matches!(e.body, Body::ChatCreated(_))
            {
                to_load.push(chat);
            }
        }
        let sink = &self.sink;
        let mut touched: HashMap<Uuid, ChatCache> = futures::stream::iter(to_load)
            .map(|chat| async move {
                let members = sink.members(chat).await?;
                Ok::<_, StoreError>((
                    chat,
                    ChatCache {
                        members,
                        marked_bucket: None,
                    },
                ))
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;

        let mut plan = Plan::default();
        let mut malformed = Vec::new();
        for (offset, event) in events {
            let cache = |chat: Uuid, touched: &mut HashMap<Uuid, ChatCache>| {
                touched
                    .entry(chat)
                    .or_insert_with(|| state.chats.get(&chat).cloned().unwrap_or_default())
                    .clone()
            };
            match (event.seq, event.chat_id) {
                (Some(seq), None) => malformed.push((
                    *offset,
                    format!("malformed event: seq {seq} without chat_id"),
                )),
                (Some(seq), Some(chat)) => {
                    let mut c = match &event.body {
                        // A creation starts from no members whatever was cached.
                        Body::ChatCreated(_) if !touched.contains_key(&chat) => {
                            ChatCache::default()
                        }
                        _ => cache(chat, &mut touched),
                    };
                    fold_event(&mut plan, &mut c, chat, seq, event);
                    touched.insert(chat, c);
                }
                (None, _) => receipt(&mut plan, event),
            }
        }

        let markers = plan.markers.len();
        // Rows and markers in one go: a user's read pointers and markers
        // share a mutation. Sync trusts rows and markers only behind its
        // read barrier (progress, which moves after this returns), so the
        // order of the writes inside a batch does not matter.
        self.sink.apply(plan.into_writes()).await?;
        Ok((
            touched,
            Projected {
                next_offset: 0,
                events: events.len(),
                markers,
                malformed,
            },
        ))
    }
}

/// The writes of one sequenced event, and its effect on the chat's cache.
fn fold_event(plan: &mut Plan, cache: &mut ChatCache, chat: Uuid, seq: u64, event: &Envelope) {
    let at = event.sequenced_ts.unwrap_or(event.server_ts);
    let bucket = change_bucket(at);
    // Users whose membership this event changes: always marked.
    let mut affected: Vec<String> = Vec::new();
    match &event.body {
        Body::ChatCreated(c) => {
            plan.data.push(Write::Chat {
                row: ChatRow {
                    chat_id: chat,
                    kind: c.kind.symbol().into(),
                    title: c.title.clone(),
                    created_by: event.sender_user.clone(),
                    created_at_ms: at,
                    max_members: c.max_members,
                    last_seq: seq,
                },
                seq,
            });
            for m in &c.members {
                plan.data.push(Write::Member {
                    chat,
                    user: m.user_id.clone(),
                    role: m.role.symbol().into(),
                    seq,
                    rejoin: false,
                });
            }
            if c.kind == ChatKind::Direct {
                match c.members.as_slice() {
                    [a, b] => plan.data.push(Write::Direct {
                        a: a.user_id.clone(),
                        b: b.user_id.clone(),
                        chat,
                        seq,
                    }),
                    other => {
                        tracing::warn!(%chat, members = other.len(), "direct chat without exactly two members: no direct_chats row")
                    }
                }
            }
            cache.members = c.members.iter().map(|m| m.user_id.clone()).collect();
            affected.extend(cache.members.iter().cloned());
        }
        Body::MemberAdded(m) => {
            plan.data.push(Write::Member {
                chat,
                user: m.user_id.clone(),
                role: m.role.symbol().into(),
                seq,
                rejoin: true,
            });
            cache.members.insert(m.user_id.clone());
            affected.push(m.user_id.clone());
        }
        Body::MemberRemoved(m) => {
            plan.data.push(Write::RemoveMember {
                chat,
                user: m.user_id.clone(),
                seq,
            });
            cache.members.remove(&m.user_id);
            affected.push(m.user_id.clone());
        }
        Body::MemberRoleChanged(m) => plan.data.push(Write::Role {
            chat,
            user: m.user_id.clone(),
            role: m.role.symbol().into(),
            seq,
        }),
        _ => {}
    }
    if matches!(event.body, Body::MessageSent(_) | Body::ChatCreated(_)) {
        // What you send you have read (the sequencer's rule too): the
        // sender's unread count. `chat_receipts` holds explicit receipts
        // only (a member who sent seq t has read everything up to t).
        plan.read(&event.sender_user, chat, seq);
    }
    plan.data
        .push(Write::Message(message_row(event, chat, seq, at)));
    plan.head(chat, seq);
    for user in marker_targets(
        &cache.members,
        &affected,
        cache.marked_bucket == Some(bucket),
    ) {
        plan.mark(user, chat, at);
    }
    cache.marked_bucket = Some(bucket);
}

/// A receipt or mute (ordered in the partition, no seq): moves the reader's
/// pointers. Nothing goes to `messages`: receipts are not history.
fn receipt(plan: &mut Plan, event: &Envelope) {
    if let (Some(chat), Body::MuteChanged(m)) = (event.chat_id, &event.body) {
        plan.data.push(Write::Muted {
            user: event.sender_user.clone(),
            chat,
            muted: m.muted,
            at_ms: event.sequenced_ts.unwrap_or(event.server_ts),
        });
        return;
    }
    let (Some(chat), Some((device, up_to))) = (event.chat_id, event.body.receipt()) else {
        return;
    };
    let user = &event.sender_user;
    if device.is_none() {
        plan.read(user, chat, up_to);
        plan.receipt(chat, user, up_to, false);
    } else {
        plan.receipt(chat, user, up_to, true);
    }
}

/// Who gets a `user_changes` marker for an event: every member (after the
/// event) unless the chat's members were already marked in this bucket, and
/// always the users whose membership the event changed (an added user was not
/// among the members marked earlier in the bucket; a removed one must learn
/// of the removal).
fn marker_targets<'a>(
    members: &'a BTreeSet<String>,
    affected: &'a [String],
    already_marked_this_bucket: bool,
) -> BTreeSet<&'a str> {
    let mut targets: BTreeSet<&str> = affected.iter().map(String::as_str).collect();
    if !already_marked_this_bucket {
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
    use chat_schemas::{ChatCreated, ChatMember, MemberAdded, MessageKind, MessageSent, Role};
    use std::sync::atomic::{AtomicBool, Ordering};

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
    fn markers_once_per_bucket_but_always_for_membership_changes() {
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

    /// A sink that records applied writes and fails while `fail` is set.
    #[derive(Default)]
    struct Fake {
        fail: AtomicBool,
        applied: Mutex<Vec<Write>>,
        members: Mutex<HashMap<Uuid, BTreeSet<String>>>,
    }

    impl Sink for Fake {
        fn members(&self, chat: Uuid) -> BoxFuture<'_, Result<BTreeSet<String>, StoreError>> {
            let m = self.members.lock().unwrap().get(&chat).cloned();
            futures::future::ready(Ok(m.unwrap_or_default())).boxed()
        }
        fn apply(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
            if self.fail.load(Ordering::SeqCst) {
                // Some writes done, then a failure: the worst case.
                let half = writes.len() / 2;
                self.applied
                    .lock()
                    .unwrap()
                    .extend(writes.into_iter().take(half));
                return futures::future::ready(Err(StoreError::Query {
                    what: "write".into(),
                    detail: "timeout".into(),
                    retryable: true,
                }))
                .boxed();
            }
            self.applied.lock().unwrap().extend(writes);
            futures::future::ready(Ok(())).boxed()
        }
    }

    const T0: i64 = 1_767_225_600_000;

    fn ev(chat: Uuid, seq: u64, at: i64, sender: &str, body: Body) -> Envelope {
        Envelope {
            event_id: Uuid::new_v4(),
            chat_id: Some(chat),
            seq: Some(seq),
            sender_user: sender.into(),
            sender_device: "d".into(),
            client_msg_id: None,
            client_ts: None,
            server_ts: at,
            sequenced_ts: Some(at),
            trace_id: "t".into(),
            body,
        }
    }

    fn text() -> Body {
        Body::MessageSent(MessageSent {
            kind: MessageKind::Text,
            text: Some("x".into()),
            media: None,
            reply_to_seq: None,
        })
    }

    fn created(members: &[&str]) -> Body {
        Body::ChatCreated(ChatCreated {
            kind: ChatKind::Group,
            title: None,
            members: members
                .iter()
                .map(|u| ChatMember {
                    user_id: (*u).into(),
                    role: Role::Member,
                })
                .collect(),
            max_members: 0,
        })
    }

    fn messages(w: &[Write]) -> Vec<u64> {
        let mut seqs: Vec<u64> = w
            .iter()
            .filter_map(|w| match w {
                Write::Message(m) => Some(m.seq),
                _ => None,
            })
            .collect();
        seqs.sort();
        seqs
    }

    fn markers(w: &[Write]) -> Vec<(String, i64)> {
        let mut m: Vec<(String, i64)> = w
            .iter()
            .filter_map(|w| match w {
                Write::Changed { user, at_ms, .. } => Some((user.clone(), change_bucket(*at_ms))),
                _ => None,
            })
            .collect();
        m.sort();
        m
    }

    #[tokio::test]
    async fn a_batch_claims_progress_only_when_all_its_writes_are_done() {
        let fake = Arc::new(Fake::default());
        let projector = Projector::with_sink(fake.clone());
        let chat = Uuid::new_v4();
        let events = [
            ev(chat, 1, T0, "a", created(&["a", "b"])),
            ev(chat, 2, T0 + 1, "a", text()),
            ev(chat, 3, T0 + 2, "b", text()),
        ];
        let batch: Vec<(i64, &Envelope)> = events.iter().zip(10..).map(|(e, o)| (o, e)).collect();

        fake.fail.store(true, Ordering::SeqCst);
        // Some writes done, the others failed: no progress is claimed (the
        // caller records `next_offset` only from an `Ok`).
        assert!(projector.project_batch(0, &batch).await.is_err());
        assert!(!fake.applied.lock().unwrap().is_empty());
        fake.applied.lock().unwrap().clear();
        // Offered again after the failure: folds from the same (empty) cache
        // and writes everything again.
        fake.fail.store(false, Ordering::SeqCst);
        let done = projector.project_batch(0, &batch).await.unwrap();
        assert_eq!((done.next_offset, done.events), (13, 3));
        let applied = fake.applied.lock().unwrap().clone();
        assert_eq!(messages(&applied), [1, 2, 3], "every event written");
        // One marker per member for the bucket, though three events.
        assert_eq!(markers(&applied), [("a".into(), T0), ("b".into(), T0)]);
        assert_eq!(done.markers, 2);
        // The head written is the batch's highest seq only.
        let heads: Vec<u64> = applied
            .iter()
            .filter_map(|w| match w {
                Write::Head { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(heads, [3]);
    }

    #[tokio::test]
    async fn markers_once_per_bucket_across_batches_and_after_a_gap() {
        let fake = Arc::new(Fake::default());
        let projector = Projector::with_sink(fake.clone());
        let chat = Uuid::new_v4();
        let e1 = [ev(chat, 1, T0, "a", created(&["a", "b"]))];
        let e2 = [
            ev(chat, 2, T0 + 30_000, "a", text()),
            ev(
                chat,
                3,
                T0 + 40_000,
                "a",
                Body::MemberAdded(MemberAdded {
                    user_id: "c".into(),
                    role: Role::Member,
                }),
            ),
            ev(chat, 4, T0 + 61_000, "c", text()),
        ];
        let b1: Vec<(i64, &Envelope)> = vec![(0, &e1[0])];
        let b2: Vec<(i64, &Envelope)> = e2.iter().zip(1..).map(|(e, o)| (o, e)).collect();
        projector.project_batch(0, &b1).await.unwrap();
        projector.project_batch(0, &b2).await.unwrap();
        let applied = fake.applied.lock().unwrap().clone();
        let next = T0 + 60_000;
        assert_eq!(
            markers(&applied),
            [
                ("a".into(), T0),
                ("a".into(), next),
                ("b".into(), T0),
                ("b".into(), next),
                ("c".into(), T0),
                ("c".into(), next)
            ]
        );
        // A batch that does not follow the last one reloads the members
        // (here: the store says only "a") and marks them again.
        fake.applied.lock().unwrap().clear();
        fake.members
            .lock()
            .unwrap()
            .insert(chat, ["a".to_string()].into());
        let e3 = [ev(chat, 9, T0 + 62_000, "a", text())];
        let b3: Vec<(i64, &Envelope)> = vec![(20, &e3[0])];
        projector.project_batch(0, &b3).await.unwrap();
        let applied = fake.applied.lock().unwrap().clone();
        assert_eq!(markers(&applied), [("a".into(), next)]);
    }
}
