//! Catching a connection up from history, and the hand-off to live events
//! without a gap or a duplicate.
//!
//! The order (see `connection.rs` for the driver):
//! 1. the connection is registered in the hub before `SessionOpened` is
//!    produced, so every live event routed to it from then on is buffered;
//! 2. on the first `sync`, wait for the router's `SessionRouted` (its
//!    per-partition offsets from which it routes live events to the
//!    session), then until the history projector's progress reached those
//!    offsets ([`wait_for_progress`]): every event the router will not route
//!    to us is then readable from Cassandra;
//! 3. read from Cassandra what the client misses ([`plan`], [`read_chat`])
//!    and send it in per-chat seq order; the [`Cursor`] remembers the last
//!    seq sent per chat (and the chat head read, which the client has);
//! 4. release the buffered live events through [`Cursor::admit`]: a seq
//!    already sent is dropped, a seq beyond `last + 1` is preceded by the
//!    missing events read from Cassandra ([`read_gap`]).

use chat_projectors::store::{MessageRow, StoreError, UserChatRow};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::history::{HistoryReader, HISTORY_PROJECTOR};
use crate::protocol::{ChatSummary, ErrorCode, EventJson};

/// Store reads run this many at a time per request.
const READ_CONCURRENCY: usize = 8;
/// Events per store page.
const PAGE: u32 = 100;

/// What a connection delivered, per chat.
#[derive(Debug, Default)]
pub struct Cursor {
    last: HashMap<Uuid, u64>,
}

/// What to do with a live event.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Send,
    /// Already sent (by sync, history fill or live): drop it.
    Duplicate,
    /// Events `after < seq < before` are missing: read them first.
    Gap { after: u64, before: u64 },
}

impl Cursor {
    /// Decides about a live event of `chat` with `seq`. A chat the
    /// connection knows nothing about yet takes the event as its start.
    pub fn admit(&self, chat: Uuid, seq: u64) -> Admit {
        match self.last.get(&chat) {
            None => Admit::Send,
            Some(&last) if seq <= last => Admit::Duplicate,
            Some(&last) if seq == last + 1 => Admit::Send,
            Some(&last) => Admit::Gap {
                after: last,
                before: seq,
            },
        }
    }

    /// Records that the client has everything of `chat` up to `seq`.
    pub fn advance(&mut self, chat: Uuid, seq: u64) {
        let e = self.last.entry(chat).or_insert(seq);
        if seq > *e {
            *e = seq;
        }
    }

    pub fn last(&self, chat: Uuid) -> Option<u64> {
        self.last.get(&chat).copied()
    }
}

/// The store's error as a protocol error code.
pub fn store_error(e: &StoreError) -> (ErrorCode, String) {
    tracing::warn!(error = %e, "history read failed");
    if e.retryable() {
        (
            ErrorCode::Unavailable,
            "history is unavailable; retry".into(),
        )
    } else {
        (ErrorCode::Internal, "history read failed".into())
    }
}

/// The routers' `SessionRouted` answers for one session, merged: per
/// `chat.events` partition, the offset from which live events of that
/// partition are routed to the session. Each router instance answers for the
/// partitions it owns ([`chat_schemas::UNROUTED_PARTITION`] for the others),
/// and answers again when it is assigned a partition; the barrier waits until
/// every partition has an owner's answer ("unrouted" means wait, never "no
/// constraint"). When two instances answer for a partition (one losing it,
/// one gaining it) the later position is kept: history must hold everything
/// before it, and each of them routes what follows its own position.
#[derive(Debug)]
pub struct RoutedFrom {
    from: Vec<Option<u64>>,
}

impl RoutedFrom {
    pub fn new(partitions: usize) -> Self {
        Self {
            from: vec![None; partitions],
        }
    }

    /// Takes one router's answer into account.
    pub fn merge(&mut self, answer: &[u64]) {
        for (slot, &at) in self.from.iter_mut().zip(answer) {
            if at < chat_schemas::UNROUTED_PARTITION {
                *slot = Some(slot.map_or(at, |s| s.max(at)));
            }
        }
    }

    /// Partitions no router answered for yet.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.from.len())
            .filter(|p| self.from[*p].is_none())
            .collect()
    }

    /// Once every partition is answered: `partition -> offset` the history
    /// projector must reach before the sync reads.
    pub fn complete(&self) -> Option<HashMap<i32, i64>> {
        self.from
            .iter()
            .enumerate()
            .map(|(p, at)| {
                let at = (*at)?;
                Some((i32::try_from(p).ok()?, i64::try_from(at).ok()?))
            })
            .collect()
    }
}

/// The history projector's progress as last read by this gateway, per
/// `chat.events` partition (only moves forward; shared by every connection),
/// so a read whose positions it already covers costs no store round trip.
#[derive(Debug, Default)]
pub struct ProjectedPositions(std::sync::Mutex<HashMap<i32, i64>>);

impl ProjectedPositions {
    /// True when every `partition -> next offset` of `want` is projected.
    pub fn covers(&self, want: &HashMap<i32, i64>) -> bool {
        let Ok(have) = self.0.lock() else {
            return false;
        };
        want.iter()
            .all(|(p, o)| *o <= 0 || have.get(p).is_some_and(|h| h >= o))
    }

    fn merge(&self, read: &HashMap<i32, i64>) {
        if let Ok(mut have) = self.0.lock() {
            for (p, o) in read {
                let at = have.entry(*p).or_insert(*o);
                *at = (*at).max(*o);
            }
        }
    }

    /// Waits until the history projector wrote every event before `want`
    /// (`partition -> next offset`), polling `projector_progress`, at most
    /// `timeout`. Returns whether it got there.
    pub async fn wait_for(
        &self,
        history: &dyn HistoryReader,
        want: &HashMap<i32, i64>,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if self.covers(want) {
                return true;
            }
            match history.progress(HISTORY_PROJECTOR).await {
                Ok(read) => {
                    self.merge(&read);
                    if self.covers(want) {
                        return true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading projector progress failed"),
            }
            if Instant::now() + pause > deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

/// What to send for one chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatPlan {
    pub chat: Uuid,
    /// Events after this seq (exclusive) ...
    pub after: u64,
    /// ... up to this one (inclusive): the user left here.
    pub upto: Option<u64>,
    /// The client named this chat with its position.
    pub known: bool,
}

/// Which chats a `sync` covers: every current chat of the user for a new
/// device (`since` = None); otherwise the chats changed since `since` plus
/// the chats the client named. Chats the user never belonged to are skipped.
pub async fn plan(
    history: &dyn HistoryReader,
    user: &str,
    since: Option<i64>,
    client: &HashMap<Uuid, u64>,
) -> Result<Vec<ChatPlan>, StoreError> {
    let rows: HashMap<Uuid, UserChatRow> = history
        .user_chats(user)
        .await?
        .into_iter()
        .map(|r| (r.chat_id, r))
        .collect();
    let mut targets: Vec<Uuid> = Vec::new();
    let mut seen = HashSet::new();
    match since {
        None => {
            let mut current: Vec<&UserChatRow> =
                rows.values().filter(|r| r.left_seq.is_none()).collect();
            current.sort_by_key(|r| r.chat_id);
            targets.extend(current.iter().map(|r| r.chat_id));
            seen.extend(targets.iter().copied());
        }
        Some(since) => {
            // Markers are bucketed (`store::CHANGE_BUCKET_MS`, the store
            // floors `since` the same way): chats changed up to a bucket
            // before `since` come back too. Harmless: a chat the client
            // names is read after its seq, one it does not gets its newest
            // events, which the client deduplicates by (chat, seq).
            for c in history.changed_chats_since(user, since).await? {
                if seen.insert(c) {
                    targets.push(c);
                }
            }
        }
    }
    // Chats the client names (also left ones) still get their tail.
    let mut named: Vec<Uuid> = client
        .keys()
        .copied()
        .filter(|c| !seen.contains(c))
        .collect();
    named.sort();
    targets.extend(named);
    Ok(targets
        .into_iter()
        .filter_map(|chat| {
            let row = rows.get(&chat)?;
            let floor = row.joined_seq.saturating_sub(1);
            let known = client.get(&chat).copied();
            Some(ChatPlan {
                chat,
                after: known.unwrap_or(0).max(floor),
                upto: row.left_seq,
                known: known.is_some(),
            })
        })
        .collect())
}

/// The events of one planned chat, and the head the client has after them.
#[derive(Debug)]
pub struct ChatCatchUp {
    pub chat: Uuid,
    pub events: Vec<MessageRow>,
    /// The last seq the client has once `events` are sent.
    pub head: u64,
    /// Older events were skipped (page back with `history`).
    pub truncated: bool,
}

/// Reads what the client misses of one chat. A known chat gets every event
/// after its position, up to `max_events`; beyond that, and for a chat new
/// to the client, the newest `bootstrap` events.
pub async fn read_chat(
    history: &dyn HistoryReader,
    plan: &ChatPlan,
    bootstrap: u32,
    max_events: u64,
) -> Result<ChatCatchUp, StoreError> {
    let head = match history.chat(plan.chat).await? {
        Some(c) => c.last_seq,
        // No chat row (yet): the newest stored event is the head.
        None => history
            .messages_page(plan.chat, None, None, 1)
            .await?
            .last()
            .map_or(0, |r| r.seq),
    };
    let head = plan.upto.map_or(head, |u| head.min(u));
    let mut out = ChatCatchUp {
        chat: plan.chat,
        events: Vec::new(),
        head: head.max(plan.after),
        truncated: false,
    };
    if head <= plan.after {
        return Ok(out);
    }
    let missing = head - plan.after;
    if plan.known && missing <= max_events {
        let mut after = plan.after;
        while after < head {
            let page = history
                .messages_page(plan.chat, Some(head + 1), Some(after), PAGE)
                .await?;
            let Some(last) = page.last().map(|r| r.seq) else {
                break;
            };
            after = last;
            out.events.extend(page);
        }
    } else {
        let page = history
            .messages_page(plan.chat, Some(head + 1), None, bootstrap)
            .await?;
        out.events = page.into_iter().filter(|r| r.seq > plan.after).collect();
        out.truncated = missing > u64::from(bootstrap);
    }
    // The client has what was sent, not the head the chat row announced: a
    // row can be ahead of the messages readable yet, and live events between
    // the two must not be taken for duplicates.
    out.head = out
        .events
        .iter()
        .map(|r| r.seq)
        .max()
        .unwrap_or(plan.after)
        .max(plan.after);
    Ok(out)
}

/// Reads every planned chat, [`READ_CONCURRENCY`] at a time, in plan order.
pub async fn read_chats(
    history: &dyn HistoryReader,
    plans: &[ChatPlan],
    bootstrap: u32,
    max_events: u64,
) -> Result<Vec<ChatCatchUp>, StoreError> {
    let mut out = Vec::with_capacity(plans.len());
    for chunk in plans.chunks(READ_CONCURRENCY) {
        let mut reads = Vec::with_capacity(chunk.len());
        for p in chunk {
            reads.push(read_chat(history, p, bootstrap, max_events));
        }
        for r in futures::future::join_all(reads).await {
            out.push(r?);
        }
    }
    Ok(out)
}

/// The events `after < seq < before` of a chat (a gap before a live event),
/// at most `max` of them, as history holds them now (the caller waits for
/// the projector when they are not all there yet).
pub async fn read_gap(
    history: &dyn HistoryReader,
    chat: Uuid,
    after: u64,
    before: u64,
    max: u64,
) -> Result<Vec<MessageRow>, StoreError> {
    let want = (before - after - 1).min(max);
    let mut out: Vec<MessageRow> = Vec::new();
    let mut from = after;
    while (out.len() as u64) < want {
        let limit = u32::try_from((want - out.len() as u64).min(u64::from(PAGE))).unwrap_or(PAGE);
        let page = history
            .messages_page(chat, Some(before), Some(from), limit)
            .await?;
        let Some(last) = page.last().map(|r| r.seq) else {
            break;
        };
        from = last;
        out.extend(page);
    }
    Ok(out)
}

/// Why a `history` request was refused.
pub fn membership_error(code: ErrorCode) -> (ErrorCode, String) {
    let msg = match code {
        ErrorCode::UnknownChat => "no such chat",
        ErrorCode::NotMember => "you are not a member of this chat",
        _ => "history is unavailable",
    };
    (code, msg.to_string())
}

/// A page of a chat's history for `user`, limited to the user's membership
/// (from the event that made them a member to the one that removed them).
pub async fn history_page(
    history: &dyn HistoryReader,
    user: &str,
    chat: Uuid,
    before: Option<u64>,
    after: Option<u64>,
    limit: u32,
) -> Result<(Vec<EventJson>, bool), (ErrorCode, String)> {
    let rows = history
        .user_chats(user)
        .await
        .map_err(|e| store_error(&e))?;
    let Some(row) = rows.into_iter().find(|r| r.chat_id == chat) else {
        let exists = history
            .chat(chat)
            .await
            .map_err(|e| store_error(&e))?
            .is_some();
        return Err(membership_error(if exists {
            ErrorCode::NotMember
        } else {
            ErrorCode::UnknownChat
        }));
    };
    let low = row.joined_seq.max(1); // lowest visible seq
    let before = match (before, row.left_seq) {
        (Some(b), Some(l)) => Some(b.min(l + 1)),
        (b, Some(l)) => b.or(Some(l + 1)),
        (b, None) => b,
    };
    let after = after.map(|a| a.max(low - 1));
    let want = limit.saturating_add(1);
    let mut page = history
        .messages_page(chat, before, after, want)
        .await
        .map_err(|e| store_error(&e))?;
    let has_more;
    if after.is_some() {
        has_more = page.len() > limit as usize;
        page.truncate(limit as usize);
    } else {
        page.retain(|r| r.seq >= low);
        has_more = page.len() > limit as usize;
        if has_more {
            page.drain(..page.len() - limit as usize);
        }
    }
    Ok((page.iter().map(EventJson::from_row).collect(), has_more))
}

/// The user's chats with their state, for the `chats` frame.
pub async fn chat_list(
    history: &dyn HistoryReader,
    user: &str,
) -> Result<Vec<ChatSummary>, StoreError> {
    let rows = history.user_chats(user).await?;
    let mut chats = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(READ_CONCURRENCY) {
        let mut reads = Vec::with_capacity(chunk.len());
        for r in chunk {
            reads.push(history.chat(r.chat_id));
        }
        chats.extend(futures::future::join_all(reads).await);
    }
    rows.iter()
        .zip(chats)
        .map(|(r, chat)| {
            let chat = chat?;
            let end = r
                .left_seq
                .or(chat.as_ref().map(|c| c.last_seq))
                .unwrap_or(0);
            let read_from = r.last_read_seq.max(r.joined_seq.saturating_sub(1));
            Ok(ChatSummary {
                unread: end.saturating_sub(read_from),
                chat: r.chat_id,
                kind: chat.as_ref().map(|c| c.kind.clone()),
                title: chat.as_ref().and_then(|c| c.title.clone()),
                role: Some(r.role.clone()).filter(|s| !s.is_empty()),
                joined_seq: Some(r.joined_seq),
                left_seq: r.left_seq,
                last_seq: chat.as_ref().map(|c| c.last_seq),
                last_read_seq: Some(r.last_read_seq),
                muted: r.muted,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{text_row, MemoryHistory};

    #[tokio::test]
    async fn the_cursor_ends_at_what_was_sent_not_at_an_announced_head() {
        let h = MemoryHistory::new();
        let chat = chat_with(&h, "bob", 11);
        h.announce_head(chat, 20);
        let plan = ChatPlan {
            chat,
            after: 1,
            upto: None,
            known: true,
        };
        let got = read_chat(&h, &plan, 50, 1000).await.unwrap();
        assert_eq!(
            got.events.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (2..=11).collect::<Vec<_>>()
        );
        assert_eq!(got.head, 11, "live events 12..=20 must still be admitted");
    }

    #[test]
    fn a_partition_no_router_answered_for_holds_up_sync() {
        let unrouted = chat_schemas::UNROUTED_PARTITION;
        let mut r = RoutedFrom::new(3);
        r.merge(&[5, unrouted, unrouted]);
        assert_eq!(r.missing(), vec![1, 2]);
        assert!(r.complete().is_none(), "unrouted means wait");
        // The other instance owns 1 and 2; an instance gaining partition 0
        // answers again with a later position, which wins.
        r.merge(&[unrouted, 0, 9]);
        r.merge(&[7, unrouted, unrouted]);
        r.merge(&[6, unrouted, unrouted]);
        assert!(r.missing().is_empty());
        assert_eq!(
            r.complete().unwrap(),
            HashMap::from([(0, 7), (1, 0), (2, 9)])
        );
    }

    fn chat_with(h: &MemoryHistory, user: &str, n: u64) -> Uuid {
        let chat = Uuid::new_v4();
        h.join(user, chat, 1, 1_000);
        for seq in 1..=n {
            h.put(text_row(chat, seq, "bob", &format!("m{seq}")));
        }
        chat
    }

    #[test]
    fn cursor_drops_duplicates_and_finds_gaps() {
        let mut c = Cursor::default();
        let chat = Uuid::new_v4();
        assert_eq!(c.admit(chat, 7), Admit::Send, "unknown chat: take it");
        c.advance(chat, 5);
        assert_eq!(c.admit(chat, 5), Admit::Duplicate);
        assert_eq!(c.admit(chat, 3), Admit::Duplicate);
        assert_eq!(c.admit(chat, 6), Admit::Send);
        assert_eq!(
            c.admit(chat, 9),
            Admit::Gap {
                after: 5,
                before: 9
            }
        );
        c.advance(chat, 4);
        assert_eq!(c.last(chat), Some(5), "never moves back");
    }

    #[tokio::test]
    async fn a_new_device_gets_the_newest_events_of_current_chats() {
        let h = MemoryHistory::new();
        let busy = chat_with(&h, "alice", 80);
        let quiet = chat_with(&h, "alice", 3);
        let left = chat_with(&h, "alice", 5);
        h.leave("alice", left, 4);
        let _other = chat_with(&h, "zed", 5);
        let plans = plan(&h, "alice", None, &HashMap::new()).await.unwrap();
        let chats: HashSet<Uuid> = plans.iter().map(|p| p.chat).collect();
        assert_eq!(chats, HashSet::from([busy, quiet]));
        let got = read_chats(&h, &plans, 50, 1000).await.unwrap();
        let busy_got = got.iter().find(|c| c.chat == busy).unwrap();
        assert_eq!(busy_got.events.len(), 50);
        assert_eq!(busy_got.events.first().unwrap().seq, 31);
        assert_eq!(busy_got.events.last().unwrap().seq, 80);
        assert!(busy_got.truncated);
        assert_eq!(busy_got.head, 80);
        let quiet_got = got.iter().find(|c| c.chat == quiet).unwrap();
        assert_eq!(
            quiet_got.events.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(!quiet_got.truncated);
    }

    #[tokio::test]
    async fn a_known_device_gets_everything_after_its_positions() {
        let h = MemoryHistory::new();
        let a = chat_with(&h, "alice", 250);
        let b = chat_with(&h, "alice", 10);
        let c = chat_with(&h, "alice", 10);
        // b changed recently; c did not change and the client is up to date.
        h.mark_changed("alice", b, 50_000);
        let client = HashMap::from([(a, 20), (c, 10)]);
        let plans = plan(&h, "alice", Some(40_000), &client).await.unwrap();
        let by_chat: HashMap<Uuid, &ChatPlan> = plans.iter().map(|p| (p.chat, p)).collect();
        assert!(by_chat[&a].known && by_chat[&a].after == 20);
        assert!(!by_chat[&b].known, "b is new to the client");
        let got = read_chats(&h, &plans, 5, 1000).await.unwrap();
        let a_got = got.iter().find(|x| x.chat == a).unwrap();
        let seqs: Vec<u64> = a_got.events.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (21..=250).collect::<Vec<_>>(),
            "in order, no gap, across pages"
        );
        let c_got = got.iter().find(|x| x.chat == c).unwrap();
        assert!(c_got.events.is_empty());
        assert_eq!(c_got.head, 10);
        // Too far behind: the newest events only, flagged.
        let got = read_chats(&h, &plans, 5, 100).await.unwrap();
        let a_got = got.iter().find(|x| x.chat == a).unwrap();
        assert_eq!(
            a_got.events.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [246, 247, 248, 249, 250]
        );
        assert!(a_got.truncated);
    }

    #[tokio::test]
    async fn gaps_are_read_and_history_respects_membership() {
        let h = MemoryHistory::new();
        let chat = Uuid::new_v4();
        for seq in 1..=30 {
            h.put(text_row(chat, seq, "bob", "x"));
        }
        h.join("alice", chat, 10, 1_000);
        let gap = read_gap(&h, chat, 12, 20, 100).await.unwrap();
        assert_eq!(
            gap.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (13..20).collect::<Vec<_>>()
        );
        let (events, more) = history_page(&h, "alice", chat, None, None, 5)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            [26, 27, 28, 29, 30]
        );
        assert!(more);
        let (events, more) = history_page(&h, "alice", chat, Some(14), None, 10)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            [10, 11, 12, 13],
            "nothing before joining"
        );
        assert!(!more);
        let (events, more) = history_page(&h, "alice", chat, None, Some(25), 3)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            [26, 27, 28]
        );
        assert!(more);
        h.leave("alice", chat, 27);
        let (events, more) = history_page(&h, "alice", chat, None, None, 5)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            [23, 24, 25, 26, 27],
            "nothing after leaving"
        );
        assert!(more);
        assert_eq!(
            history_page(&h, "bob", chat, None, None, 5)
                .await
                .unwrap_err()
                .0,
            ErrorCode::NotMember
        );
        assert_eq!(
            history_page(&h, "alice", Uuid::new_v4(), None, None, 5)
                .await
                .unwrap_err()
                .0,
            ErrorCode::UnknownChat
        );
        h.set_failing(true);
        assert_eq!(
            history_page(&h, "alice", chat, None, None, 5)
                .await
                .unwrap_err()
                .0,
            ErrorCode::Unavailable
        );
    }

    #[tokio::test]
    async fn progress_wait_is_bounded() {
        let h = MemoryHistory::new();
        h.set_progress(HISTORY_PROJECTOR, 0, 10);
        let p = ProjectedPositions::default();
        let want = |pairs: &[(i32, i64)]| pairs.iter().copied().collect::<HashMap<i32, i64>>();
        assert!(
            p.wait_for(&h, &want(&[(0, 10), (1, 0)]), Duration::from_millis(50))
                .await
        );
        let t0 = Instant::now();
        assert!(
            !p.wait_for(&h, &want(&[(0, 11)]), Duration::from_millis(100))
                .await
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(
            !p.wait_for(&h, &want(&[(1, 1)]), Duration::from_millis(30))
                .await,
            "a partition never written"
        );
        // What was read once answers later waits without a read.
        h.set_failing(true);
        assert!(p.covers(&want(&[(0, 10)])));
    }
}
