//! The sequencer's state for one partition, and its decisions. Pure: no I/O,
//! so the rules are unit- and property-tested here.
//!
//! The state is a fold of `chat.events` (one partition): for every chat its
//! kind, members with roles, last seq and member limit, and every
//! (chat, sender, device, client message id) sequenced within the dedupe
//! window with its seq.
//!
//! The delivery router folds the same events with [`PartitionState::apply`]
//! to know each chat's members at each seq ([`PartitionState::for_routing`]:
//! no read/delivery pointers, no dedupe index).
//!
//! **Bounded memory.** The maps here are a cache over a [`Backing`] store
//! (`crate::store`): a chat or dedupe entry not in memory is loaded from it
//! before a command or event touches it. What a fold changes is marked
//! dirty until [`PartitionState::take_changes`] hands it to the store;
//! [`PartitionState::evict`] then drops clean entries past the cache's size.
//! Without a backing (tests, tools) everything stays in memory.
//!
//! The fold refuses what cannot be a gap-free log: an event whose `seq` is
//! not its chat's `last_seq + 1` (a `ChatCreated` of a new chat is seq 1;
//! receipts and mute changes carry no seq and are exempt). A refused event
//! leaves the state unchanged and returns a [`FoldError`]; a rebuild that
//! gets one must stop, not go on: a state with a `last_seq` too low would
//! hand out a seq that exists (the history row overwritten, clients
//! dropping the new message as a repeat).

use chat_schemas::{
    direct_chat_id, Body, ChatCreated, ChatKind, ChatMember, CommandOutcome, Envelope,
    RemovalReason, Role,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

/// Limits the sequencer enforces (the gateway checks sizes too; this is the
/// authority).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most members a group may have (creator included).
    pub max_group_members: u32,
    /// Largest message text, in bytes of UTF-8.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_group_members: 1000,
            max_text_bytes: 16 * 1024,
        }
    }
}

/// One chat as the log says it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatState {
    pub kind: ChatKind,
    pub members: HashMap<String, Role>,
    pub last_seq: u64,
    pub max_members: u32,
    /// Read pointer of each member: the highest seq they read (their own
    /// messages count as read). Only moves forward.
    pub read: HashMap<String, u64>,
    /// Delivery pointer of each (member, device): the highest seq the device
    /// received. Only moves forward.
    pub delivered: HashMap<(String, String), u64>,
}

impl ChatState {
    /// The read pointer of `user` (0: nothing read).
    pub fn read_of(&self, user: &str) -> u64 {
        self.read.get(user).copied().unwrap_or(0)
    }
}

/// (chat, sender user, sender device, client message id).
pub type DedupeKey = (Uuid, String, String, String);

/// What the dedupe index keeps of a sequenced command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deduped {
    /// The seq it got.
    pub seq: u64,
    /// The event id of the command (a replay after a rebalance has the same).
    pub event_id: Uuid,
    /// When it was sequenced (ms since the epoch): the window is counted from here.
    pub at_ms: i64,
}

/// Where chats and dedupe entries not in memory are read from.
/// A failure to read is an error, never "absent": a chat read as absent
/// could be created a second time.
pub trait Backing: Send + Sync + std::fmt::Debug {
    fn chat(&self, chat: &Uuid) -> Result<Option<ChatState>, String>;
    fn dedupe(&self, key: &DedupeKey) -> Result<Option<Deduped>, String>;
}

/// What a fold changed since the last [`PartitionState::take_changes`].
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub chats: Vec<(Uuid, ChatState)>,
    pub dedupe: Vec<(DedupeKey, Deduped)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.chats.is_empty() && self.dedupe.is_empty()
    }
}

/// The fold of one partition of `chat.events`.
#[derive(Clone, Debug, Default)]
pub struct PartitionState {
    chats: HashMap<Uuid, ChatState>,
    /// Per dedupe key: the seq, the event id of the command that got it, when.
    dedupe: HashMap<DedupeKey, Deduped>,
    backing: Option<Arc<dyn Backing>>,
    /// Only what routing needs: no pointers, no dedupe index.
    routing: bool,
    /// How long a client message id dedupes (None: forever).
    dedupe_window_ms: Option<i64>,
    dirty: HashSet<Uuid>,
    new_dedupe: Vec<(DedupeKey, Deduped)>,
    /// The backing store could not be read: nothing decided since counts.
    failed: Option<String>,
}

/// Why [`PartitionState::apply`] refused an event: the events folded so far
/// are not the chat's gap-free log (a record was skipped or repeated).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    /// The event's seq is not the chat's last seq + 1.
    #[error("chat {chat}: expected seq {expected}, found {found} ({kind})")]
    SeqGap {
        chat: Uuid,
        expected: u64,
        found: u64,
        kind: &'static str,
    },
    /// The chat's first event (seq 1) is not its `ChatCreated`.
    #[error("chat {chat}: its first event is {kind}, not ChatCreated")]
    NotCreated { chat: Uuid, kind: &'static str },
    /// A second `ChatCreated` for a chat that exists.
    #[error("chat {chat}: ChatCreated with seq {found} for a chat whose last seq is {last_seq}")]
    CreatedTwice {
        chat: Uuid,
        found: u64,
        last_seq: u64,
    },
    /// The chat's state could not be read from the state store.
    #[error("chat {chat}: the state store cannot be read: {error}")]
    Store { chat: Uuid, error: String },
}

impl FoldError {
    pub fn chat(&self) -> Uuid {
        match self {
            FoldError::SeqGap { chat, .. }
            | FoldError::NotCreated { chat, .. }
            | FoldError::CreatedTwice { chat, .. }
            | FoldError::Store { chat, .. } => *chat,
        }
    }

    /// The seq the chat's next event must have (1 for a chat not created).
    pub fn expected(&self) -> u64 {
        match self {
            FoldError::SeqGap { expected, .. } => *expected,
            FoldError::NotCreated { .. } | FoldError::Store { .. } => 1,
            FoldError::CreatedTwice { last_seq, .. } => last_seq + 1,
        }
    }

    /// The seq the refused event carries.
    pub fn found(&self) -> u64 {
        match self {
            FoldError::SeqGap { found, .. } | FoldError::CreatedTwice { found, .. } => *found,
            FoldError::NotCreated { .. } | FoldError::Store { .. } => 1,
        }
    }
}

/// Why a rebuild of a partition's fold stopped: the partition of
/// `chat.events` does not read as a gap-free log. Going on would leave a
/// state that hands out seqs that exist, so the rebuild fails and its caller
/// retries (rewind, rebuild) and stays failed until the log is repaired.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RebuildError {
    #[error("chat.events[{partition}]@{offset}: {source}")]
    Fold {
        partition: i32,
        offset: i64,
        #[source]
        source: FoldError,
    },
    /// A record of the partition cannot be decoded (the registry answered:
    /// it is not a failure to reach it), so what it did to its chat is
    /// unknown.
    #[error("chat.events[{partition}]@{offset} cannot be decoded: {error}")]
    Undecodable {
        partition: i32,
        offset: i64,
        error: String,
    },
}

impl RebuildError {
    /// Logs the failure at error level with the chat, the expected and found
    /// seq, the partition and the offset.
    pub fn log(&self, who: &str) {
        match self {
            RebuildError::Fold {
                partition,
                offset,
                source,
            } => tracing::error!(
                who,
                chat = %source.chat(),
                expected_seq = source.expected(),
                found_seq = source.found(),
                partition,
                offset,
                error = %source,
                "chat.events is not a gap-free log here: the partition's state is not rebuilt and the partition waits"
            ),
            RebuildError::Undecodable {
                partition,
                offset,
                error,
            } => tracing::error!(
                who,
                partition,
                offset,
                %error,
                "an event of chat.events cannot be decoded: the partition's state is not rebuilt and the partition waits"
            ),
        }
    }
}

/// What to do with a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Append this event (the command with its seq assigned).
    Append(Box<Envelope>),
    /// Already sequenced: answer with the original seq, append nothing.
    Duplicate { seq: u64 },
    /// Refused; `code` is a stable error code (PROTOCOL.md).
    Reject { code: &'static str, reason: String },
}

impl Decision {
    pub fn outcome(&self) -> CommandOutcome {
        match self {
            Decision::Append(_) => CommandOutcome::Accepted,
            Decision::Duplicate { .. } => CommandOutcome::Duplicate,
            Decision::Reject { .. } => CommandOutcome::Rejected,
        }
    }
}

fn reject(code: &'static str, reason: impl Into<String>) -> Decision {
    Decision::Reject {
        code,
        reason: reason.into(),
    }
}

fn dedupe_key(e: &Envelope) -> Option<DedupeKey> {
    Some((
        e.chat_id?,
        e.sender_user.clone(),
        e.sender_device.clone(),
        e.client_msg_id.clone()?,
    ))
}

impl PartitionState {
    /// A state whose chats and dedupe entries live in `backing`, cached here.
    pub fn backed(backing: Arc<dyn Backing>, dedupe_window_ms: Option<i64>) -> Self {
        Self {
            backing: Some(backing),
            dedupe_window_ms,
            ..Self::default()
        }
    }

    /// The router's fold: members, kind and last seq only.
    pub fn for_routing(backing: Option<Arc<dyn Backing>>) -> Self {
        Self {
            backing,
            routing: true,
            ..Self::default()
        }
    }

    /// The chat as the state holds it, if it is in memory (see [`Self::load_chat`]).
    pub fn chat(&self, chat: &Uuid) -> Option<&ChatState> {
        self.chats.get(chat)
    }

    /// The chat, loaded from the backing store if it is not in memory.
    pub fn load_chat(&mut self, chat: &Uuid) -> Option<&ChatState> {
        self.load(Some(*chat), None);
        self.chats.get(chat)
    }

    /// Chats in memory (all of them without a backing store).
    pub fn chats(&self) -> usize {
        self.chats.len()
    }

    /// Brings `chat` and `key` into memory from the backing store.
    fn load(&mut self, chat: Option<Uuid>, key: Option<&DedupeKey>) {
        use std::collections::hash_map::Entry;
        let Some(backing) = &self.backing else { return };
        let mut failed = None;
        if let Some(c) = chat {
            if let Entry::Vacant(slot) = self.chats.entry(c) {
                match backing.chat(&c) {
                    Ok(Some(state)) => {
                        slot.insert(state);
                    }
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
        }
        if let Some(k) = key {
            if !self.dedupe.contains_key(k) {
                match backing.dedupe(k) {
                    Ok(Some(d)) => {
                        self.dedupe.insert(k.clone(), d);
                    }
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
        }
        if failed.is_some() {
            self.failed = failed;
        }
    }

    /// Why the backing store could not be read, if it could not: whatever
    /// was decided since must not be committed.
    pub fn store_failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn load_for(&mut self, ev: &Envelope) {
        if self.backing.is_none() {
            return;
        }
        let key = if self.routing { None } else { dedupe_key(ev) };
        self.load(ev.chat_id, key.as_ref());
    }

    /// Whether a fold changed anything not handed out yet.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.new_dedupe.is_empty()
    }

    /// The chats changed since the last [`Self::take_changes`], as they are now.
    pub fn dirty_chats(&self) -> impl Iterator<Item = (&Uuid, &ChatState)> {
        self.dirty
            .iter()
            .filter_map(|c| self.chats.get(c).map(|s| (c, s)))
    }

    /// Hands out (and forgets) what changed: the store writes it.
    pub fn take_changes(&mut self) -> Changes {
        let chats = self
            .dirty
            .drain()
            .filter_map(|c| self.chats.get(&c).map(|s| (c, s.clone())))
            .collect();
        Changes {
            chats,
            dedupe: std::mem::take(&mut self.new_dedupe),
        }
    }

    /// With a backing store, drops unchanged chats once more than
    /// `max_chats` are in memory, and unchanged dedupe entries once more
    /// than `max_chats` of those are (a retry is rare: its lookup reads the
    /// store).
    pub fn evict(&mut self, max_chats: usize) {
        if self.backing.is_none() {
            return;
        }
        if self.chats.len() > max_chats {
            let dirty = &self.dirty;
            self.chats.retain(|c, _| dirty.contains(c));
        }
        if self.dedupe.len() > max_chats {
            let fresh: HashSet<&DedupeKey> = self.new_dedupe.iter().map(|(k, _)| k).collect();
            self.dedupe.retain(|k, _| fresh.contains(k));
        }
    }

    /// Records only the dedupe entry of `ev` (restoring the window's entries
    /// after the chats came from a changelog).
    pub fn note_dedupe(&mut self, ev: &Envelope) {
        if self.routing {
            return;
        }
        if let (Some(key), Some(seq)) = (dedupe_key(ev), ev.seq) {
            let d = Deduped {
                seq,
                event_id: ev.event_id,
                at_ms: ev.sequenced_ts.unwrap_or(ev.server_ts),
            };
            self.dedupe.insert(key.clone(), d);
            self.new_dedupe.push((key, d));
        }
    }

    /// Whether a dedupe entry still dedupes at `now_ms`.
    fn in_window(&self, d: &Deduped, now_ms: i64) -> bool {
        self.dedupe_window_ms
            .is_none_or(|w| d.at_ms >= now_ms.saturating_sub(w))
    }

    /// Folds one event of `chat.events` into the state: a sequenced event,
    /// or a receipt (receipts are ordered in the partition but take no seq,
    /// so unread counts are `last_seq - read pointer`).
    ///
    /// Refuses (and leaves the state as it was) an event whose seq is not
    /// its chat's `last_seq + 1`, a first event that is not a `ChatCreated`
    /// with seq 1, and a `ChatCreated` of a chat that exists. Events without
    /// a chat or a seq (receipts, mute changes) are never refused.
    pub fn apply(&mut self, ev: &Envelope) -> Result<(), FoldError> {
        let Some(chat) = ev.chat_id else {
            return Ok(());
        };
        self.load_for(ev);
        if let Some(error) = &self.failed {
            return Err(FoldError::Store {
                chat,
                error: error.clone(),
            });
        }
        if let Some((device, up_to)) = ev.body.receipt() {
            if self.routing {
                return Ok(());
            }
            if let Some(state) = self.chats.get_mut(&chat) {
                self.dirty.insert(chat);
                let pointer = match device {
                    None => state.read.entry(ev.sender_user.clone()).or_default(),
                    Some(d) => state
                        .delivered
                        .entry((ev.sender_user.clone(), d.to_string()))
                        .or_default(),
                };
                *pointer = (*pointer).max(up_to);
            }
            return Ok(());
        }
        let Some(seq) = ev.seq else { return Ok(()) };
        self.check(chat, seq, &ev.body)?;
        self.note_dedupe(ev);
        if let Body::ChatCreated(c) = &ev.body {
            self.chats.entry(chat).or_insert_with(|| ChatState {
                kind: c.kind,
                members: c
                    .members
                    .iter()
                    .map(|m| (m.user_id.clone(), m.role))
                    .collect(),
                last_seq: 0,
                max_members: c.max_members,
                read: HashMap::new(),
                delivered: HashMap::new(),
            });
        }
        let Some(state) = self.chats.get_mut(&chat) else {
            return Ok(());
        };
        self.dirty.insert(chat);
        state.last_seq = seq;
        match &ev.body {
            Body::MessageSent(_) | Body::ChatCreated(_) if self.routing => {}
            Body::MessageSent(_) | Body::ChatCreated(_) => {
                // What you send (or create) you have read.
                let read = state.read.entry(ev.sender_user.clone()).or_default();
                *read = (*read).max(seq);
            }
            Body::MemberAdded(m) => {
                state.members.insert(m.user_id.clone(), m.role);
            }
            Body::MemberRemoved(m) => {
                state.members.remove(&m.user_id);
            }
            Body::MemberRoleChanged(m) => {
                if let Some(r) = state.members.get_mut(&m.user_id) {
                    *r = m.role;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Like [`Self::apply`], but an event its chat already folded (seq at or
    /// below the chat's last seq) is skipped, not refused: the router's
    /// changelog is written outside a transaction, so after a crash a chat's
    /// record may be ahead of the changelog's `@applied` mark.
    pub fn apply_again(&mut self, ev: &Envelope) -> Result<(), FoldError> {
        if let (Some(chat), Some(seq)) = (ev.chat_id, ev.seq) {
            self.load_for(ev);
            if self.chats.get(&chat).is_some_and(|c| seq <= c.last_seq) {
                return Ok(());
            }
        }
        self.apply(ev)
    }

    /// Whether an event with `seq` and `body` may follow what the state holds
    /// of `chat`.
    fn check(&self, chat: Uuid, seq: u64, body: &Body) -> Result<(), FoldError> {
        let created = matches!(body, Body::ChatCreated(_));
        match self.chats.get(&chat) {
            Some(state) if created => Err(FoldError::CreatedTwice {
                chat,
                found: seq,
                last_seq: state.last_seq,
            }),
            Some(state) if seq != state.last_seq + 1 => Err(FoldError::SeqGap {
                chat,
                expected: state.last_seq + 1,
                found: seq,
                kind: body.kind(),
            }),
            Some(_) => Ok(()),
            None if seq != 1 => Err(FoldError::SeqGap {
                chat,
                expected: 1,
                found: seq,
                kind: body.kind(),
            }),
            None if !created => Err(FoldError::NotCreated {
                chat,
                kind: body.kind(),
            }),
            None => Ok(()),
        }
    }

    /// Decides what to do with `cmd`; when it is appended, the state already
    /// includes it on return.
    pub fn sequence(&mut self, cmd: &Envelope, limits: &Limits, now_ms: i64) -> Decision {
        self.load_for(cmd);
        if let Some(e) = &self.failed {
            return reject(
                "unavailable",
                format!("the state store cannot be read: {e}"),
            );
        }
        let decision = self.decide(cmd, limits, now_ms);
        if let Decision::Append(ev) = &decision {
            // `decide` appends the chat's last seq + 1 (1 for a new chat), so
            // the fold takes it; if they ever disagreed, nothing is appended.
            if let Err(e) = self.apply(ev) {
                return reject("internal", format!("the fold refused the event: {e}"));
            }
        }
        decision
    }

    /// Whether `cmd` is the very record (same event id) that an appended
    /// event came from: the command was read again after a rebalance (its
    /// transaction committed after the new owner fetched the offsets), and
    /// its result was already sent. A client's retry has a new event id.
    pub fn is_replay(&mut self, cmd: &Envelope) -> bool {
        self.load_for(cmd);
        dedupe_key(cmd)
            .and_then(|k| self.dedupe.get(&k))
            .is_some_and(|d| d.event_id == cmd.event_id)
    }

    /// Decides without changing the state (from what is in memory: call
    /// [`Self::sequence`], which loads what `cmd` needs).
    pub fn decide(&self, cmd: &Envelope, limits: &Limits, now_ms: i64) -> Decision {
        let Some(chat_id) = cmd.chat_id else {
            return reject("invalid", "a command needs a chat id");
        };
        let deduped = dedupe_key(cmd).and_then(|k| self.dedupe.get(&k));
        if let Some(d) = deduped.filter(|d| self.in_window(d, now_ms)) {
            return Decision::Duplicate { seq: d.seq };
        }
        let append = |body: Body, seq: u64| {
            let mut ev = cmd.clone();
            ev.body = body;
            ev.seq = Some(seq);
            ev.sequenced_ts = Some(now_ms);
            Decision::Append(Box::new(ev))
        };
        if let Body::ChatCreated(c) = &cmd.body {
            return match self.chats.get(&chat_id) {
                Some(existing)
                    if existing.kind == ChatKind::Direct
                        && existing.members.contains_key(&cmd.sender_user) =>
                {
                    Decision::Duplicate { seq: 1 }
                }
                Some(_) => reject("chat_exists", "a chat with this id exists"),
                None => match create(chat_id, &cmd.sender_user, c, limits) {
                    Ok(body) => append(Body::ChatCreated(body), 1),
                    Err(d) => d,
                },
            };
        }
        let Some(chat) = self.chats.get(&chat_id) else {
            return reject("unknown_chat", "no such chat");
        };
        let sender_role = match chat.members.get(&cmd.sender_user) {
            Some(r) => *r,
            None => return reject("not_member", "you are not a member of this chat"),
        };
        let next = chat.last_seq + 1;
        let is_admin = sender_role == Role::Admin;
        let is_group = chat.kind == ChatKind::Group;
        let target_ok = |t: u64| (1..=chat.last_seq).contains(&t);
        match &cmd.body {
            Body::MessageSent(m) => {
                let text_len = m.text.as_deref().map_or(0, str::len);
                if text_len > limits.max_text_bytes {
                    return reject(
                        "too_large",
                        format!("text is over {} bytes", limits.max_text_bytes),
                    );
                }
                if m.text.as_deref().is_none_or(str::is_empty) && m.media.is_none() {
                    return reject("invalid", "a message needs text or media");
                }
                if m.reply_to_seq.is_some_and(|t| !target_ok(t)) {
                    return reject("invalid", "reply_to_seq does not exist");
                }
            }
            Body::MessageEdited(m) if !target_ok(m.target_seq) => {
                return reject("invalid", "target_seq does not exist")
            }
            Body::MessageEdited(m) if m.text.len() > limits.max_text_bytes => {
                return reject("too_large", "text too large")
            }
            Body::MessageDeleted(m) if !target_ok(m.target_seq) => {
                return reject("invalid", "target_seq does not exist")
            }
            Body::ReactionChanged(r) if !target_ok(r.target_seq) => {
                return reject("invalid", "target_seq does not exist")
            }
            Body::ReadReceipt(_) | Body::DeliveryReceipt(_) => {
                return decide_receipt(cmd, chat, now_ms);
            }
            Body::MuteChanged(_) => {
                // The member's own setting: ordered, but no seq.
                let mut ev = cmd.clone();
                ev.seq = None;
                ev.sequenced_ts = Some(now_ms);
                return Decision::Append(Box::new(ev));
            }
            Body::MessageEdited(_) | Body::MessageDeleted(_) | Body::ReactionChanged(_) => {}
            Body::MemberAdded(m) => {
                if !is_group || !is_admin {
                    return reject("forbidden", "only a group's admins add members");
                }
                if chat.members.contains_key(&m.user_id) {
                    return reject("invalid", "already a member");
                }
                if chat.members.len() as u32 >= chat.max_members {
                    return reject(
                        "group_full",
                        format!("the group has its {} members", chat.max_members),
                    );
                }
            }
            Body::MemberRemoved(m) => {
                if !chat.members.contains_key(&m.user_id) {
                    return reject("invalid", "not a member");
                }
                let allowed = is_group
                    && match m.reason {
                        RemovalReason::Left => m.user_id == cmd.sender_user,
                        RemovalReason::Removed => is_admin,
                    };
                if !allowed {
                    return reject("forbidden", "you may not remove this member");
                }
            }
            Body::MemberRoleChanged(m) => {
                if !is_group || !is_admin {
                    return reject("forbidden", "only a group's admins change roles");
                }
                if !chat.members.contains_key(&m.user_id) {
                    return reject("invalid", "not a member");
                }
            }
            other => {
                return reject("invalid", format!("{} is not a chat command", other.kind()));
            }
        }
        append(cmd.body.clone(), next)
    }
}

/// A receipt moves a pointer forward or is refused; it takes no seq.
fn decide_receipt(cmd: &Envelope, chat: &ChatState, now_ms: i64) -> Decision {
    let Some((device, up_to)) = cmd.body.receipt() else {
        return reject("invalid", "not a receipt");
    };
    if device.is_some_and(|d| d != cmd.sender_device) {
        return reject("invalid", "a delivery receipt names the sending device");
    }
    if !(1..=chat.last_seq).contains(&up_to) {
        return reject(
            "seq_out_of_range",
            format!(
                "up_to_seq {up_to} does not exist (the chat's last seq is {})",
                chat.last_seq
            ),
        );
    }
    let current = match device {
        None => chat.read_of(&cmd.sender_user),
        Some(d) => chat
            .delivered
            .get(&(cmd.sender_user.clone(), d.to_string()))
            .copied()
            .unwrap_or(0),
    };
    match up_to.cmp(&current) {
        std::cmp::Ordering::Greater => {
            let mut ev = cmd.clone();
            ev.seq = None;
            ev.sequenced_ts = Some(now_ms);
            Decision::Append(Box::new(ev))
        }
        std::cmp::Ordering::Equal => Decision::Duplicate { seq: current },
        std::cmp::Ordering::Less => reject(
            "stale_receipt",
            format!("the pointer is already at {current}; it only moves forward"),
        ),
    }
}

/// The seq a command's result carries: the event's seq, or for a receipt the
/// pointer it moved to.
pub fn result_seq(ev: &Envelope) -> Option<u64> {
    ev.seq.or_else(|| ev.body.receipt().map(|(_, up_to)| up_to))
}

/// Validates and normalises a create: the creator is a member (an admin of a
/// group), members are unique, the limit is the sequencer's.
fn create(
    chat_id: Uuid,
    sender: &str,
    c: &ChatCreated,
    limits: &Limits,
) -> Result<ChatCreated, Decision> {
    let mut users: Vec<String> = Vec::new();
    for m in &c.members {
        if !users.contains(&m.user_id) {
            users.push(m.user_id.clone());
        }
    }
    if !users.iter().any(|u| u == sender) {
        users.insert(0, sender.to_string());
    }
    if users.iter().any(|u| u.is_empty()) {
        return Err(reject("invalid", "empty user id"));
    }
    match c.kind {
        ChatKind::Direct => {
            if users.len() != 2 {
                return Err(reject("invalid", "a direct chat has exactly two members"));
            }
            if direct_chat_id(&users[0], &users[1]) != chat_id {
                return Err(reject(
                    "invalid",
                    "a direct chat's id is direct_chat_id(a, b)",
                ));
            }
            Ok(ChatCreated {
                kind: ChatKind::Direct,
                title: None,
                members: users
                    .into_iter()
                    .map(|user_id| ChatMember {
                        user_id,
                        role: Role::Member,
                    })
                    .collect(),
                max_members: 2,
            })
        }
        ChatKind::Group => {
            let max = match c.max_members {
                0 => limits.max_group_members,
                n => n.min(limits.max_group_members),
            };
            if users.len() as u32 > max {
                return Err(reject(
                    "group_full",
                    format!("a group has at most {max} members"),
                ));
            }
            let members = users
                .into_iter()
                .map(|user_id| {
                    let admin = user_id == sender
                        || c.members
                            .iter()
                            .any(|m| m.user_id == user_id && m.role == Role::Admin);
                    ChatMember {
                        user_id,
                        role: if admin { Role::Admin } else { Role::Member },
                    }
                })
                .collect();
            Ok(ChatCreated {
                kind: ChatKind::Group,
                title: c.title.clone(),
                members,
                max_members: max,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_schemas::{MemberAdded, MemberRemoved, MessageKind, MessageSent};

    fn cmd(chat: Uuid, user: &str, msg_id: &str, body: Body) -> Envelope {
        Envelope {
            event_id: Uuid::new_v4(),
            chat_id: Some(chat),
            seq: None,
            sender_user: user.into(),
            sender_device: format!("{user}-d"),
            client_msg_id: Some(msg_id.into()),
            client_ts: None,
            server_ts: 1,
            sequenced_ts: None,
            trace_id: "t".into(),
            body,
        }
    }
    fn text(t: &str) -> Body {
        Body::MessageSent(MessageSent {
            kind: MessageKind::Text,
            text: Some(t.into()),
            media: None,
            reply_to_seq: None,
        })
    }
    fn group(members: &[&str]) -> Body {
        Body::ChatCreated(ChatCreated {
            kind: ChatKind::Group,
            title: Some("g".into()),
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
    fn seq_of(d: &Decision) -> u64 {
        match d {
            Decision::Append(e) => e.seq.unwrap(),
            Decision::Duplicate { seq } => *seq,
            Decision::Reject { code, .. } => panic!("rejected: {code}"),
        }
    }
    fn code_of(d: &Decision) -> &'static str {
        match d {
            Decision::Reject { code, .. } => code,
            other => panic!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn seqs_are_gap_free_per_chat_and_retries_get_the_original_seq() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            seq_of(&s.sequence(&cmd(a, "u", "c0", group(&["v"])), &l, 1)),
            1
        );
        assert_eq!(
            seq_of(&s.sequence(&cmd(b, "u", "c0", group(&[])), &l, 1)),
            1
        );
        for i in 1..=5 {
            assert_eq!(
                seq_of(&s.sequence(&cmd(a, "v", &format!("m{i}"), text("hi")), &l, 2)),
                i + 1
            );
        }
        let retry = s.sequence(&cmd(a, "v", "m3", text("hi")), &l, 3);
        assert_eq!(retry, Decision::Duplicate { seq: 4 });
        assert_eq!(seq_of(&s.sequence(&cmd(b, "u", "x", text("hi")), &l, 3)), 2);
        assert_eq!(s.chat(&a).unwrap().last_seq, 6);
    }

    #[test]
    fn the_same_client_id_from_another_device_is_a_new_message() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let a = Uuid::new_v4();
        s.sequence(&cmd(a, "u", "c0", group(&[])), &l, 1);
        let mut other = cmd(a, "u", "m1", text("x"));
        assert_eq!(seq_of(&s.sequence(&other, &l, 1)), 2);
        other.sender_device = "u-laptop".into();
        assert_eq!(seq_of(&s.sequence(&other, &l, 1)), 3);
    }

    #[test]
    fn non_members_and_unknown_chats_are_refused() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let a = Uuid::new_v4();
        s.sequence(&cmd(a, "u", "c0", group(&["v"])), &l, 1);
        assert_eq!(
            code_of(&s.sequence(&cmd(a, "eve", "m", text("x")), &l, 1)),
            "not_member"
        );
        assert_eq!(
            code_of(&s.sequence(&cmd(Uuid::new_v4(), "u", "m", text("x")), &l, 1)),
            "unknown_chat"
        );
    }

    #[test]
    fn only_admins_manage_members_and_removed_members_stop_sending() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let a = Uuid::new_v4();
        s.sequence(&cmd(a, "admin", "c0", group(&["m"])), &l, 1);
        let add = |by: &str, who: &str| {
            cmd(
                a,
                by,
                &format!("add-{who}-{by}"),
                Body::MemberAdded(MemberAdded {
                    user_id: who.into(),
                    role: Role::Member,
                }),
            )
        };
        assert_eq!(code_of(&s.sequence(&add("m", "x"), &l, 1)), "forbidden");
        assert_eq!(seq_of(&s.sequence(&add("admin", "x"), &l, 1)), 2);
        let remove = cmd(
            a,
            "admin",
            "rm",
            Body::MemberRemoved(MemberRemoved {
                user_id: "x".into(),
                reason: RemovalReason::Removed,
            }),
        );
        assert_eq!(seq_of(&s.sequence(&remove, &l, 1)), 3);
        assert_eq!(
            code_of(&s.sequence(&cmd(a, "x", "late", text("x")), &l, 1)),
            "not_member"
        );
        let leave = cmd(
            a,
            "m",
            "bye",
            Body::MemberRemoved(MemberRemoved {
                user_id: "admin".into(),
                reason: RemovalReason::Left,
            }),
        );
        assert_eq!(
            code_of(&s.sequence(&leave, &l, 1)),
            "forbidden",
            "one leaves only oneself"
        );
    }

    #[test]
    fn groups_are_bounded() {
        let mut s = PartitionState::default();
        let l = Limits {
            max_group_members: 3,
            ..Limits::default()
        };
        let a = Uuid::new_v4();
        assert_eq!(
            code_of(&s.decide(&cmd(a, "u", "c", group(&["a", "b", "c"])), &l, 1)),
            "group_full"
        );
        s.sequence(&cmd(a, "u", "c", group(&["a", "b"])), &l, 1);
        let add = cmd(
            a,
            "u",
            "add",
            Body::MemberAdded(MemberAdded {
                user_id: "d".into(),
                role: Role::Member,
            }),
        );
        assert_eq!(code_of(&s.sequence(&add, &l, 1)), "group_full");
    }

    #[test]
    fn a_direct_chat_is_unique_per_pair() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let id = direct_chat_id("ann", "bob");
        // The creator is added by the sequencer; the body names the other user.
        let with = |other: &str| {
            Body::ChatCreated(ChatCreated {
                kind: ChatKind::Direct,
                title: None,
                members: vec![ChatMember {
                    user_id: other.into(),
                    role: Role::Member,
                }],
                max_members: 0,
            })
        };
        assert_eq!(
            seq_of(&s.sequence(&cmd(id, "ann", "c1", with("bob")), &l, 1)),
            1
        );
        assert_eq!(
            s.sequence(&cmd(id, "bob", "c2", with("ann")), &l, 1),
            Decision::Duplicate { seq: 1 }
        );
        let wrong = cmd(Uuid::new_v4(), "ann", "c3", with("bob"));
        assert_eq!(code_of(&s.sequence(&wrong, &l, 1)), "invalid");
    }

    #[test]
    fn rebuilding_from_the_appended_events_gives_the_same_decisions() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let a = Uuid::new_v4();
        let mut log = Vec::new();
        for c in [
            cmd(a, "u", "c0", group(&["v"])),
            cmd(a, "v", "m1", text("x")),
            cmd(a, "u", "m2", text("y")),
        ] {
            if let Decision::Append(ev) = s.sequence(&c, &l, 1) {
                log.push(ev);
            }
        }
        let mut rebuilt = PartitionState::default();
        log.iter().for_each(|e| rebuilt.apply(e).unwrap());
        let next = cmd(a, "v", "m3", text("z"));
        assert_eq!(
            seq_of(&rebuilt.decide(&next, &l, 1)),
            seq_of(&s.decide(&next, &l, 1))
        );
        assert_eq!(
            rebuilt.decide(&cmd(a, "v", "m1", text("x")), &l, 1),
            Decision::Duplicate { seq: 2 }
        );
    }

    proptest::proptest! {
        /// Any interleaving of sends and retries over a few chats: per chat the
        /// appended seqs are exactly 1..=n, and a retry never appends.
        #[test]
        fn appended_seqs_are_gap_free(ops in proptest::collection::vec((0usize..3, 0usize..4, 0u8..20), 1..200)) {
            let (mut s, l) = (PartitionState::default(), Limits::default());
            let chats: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
            let users = ["a", "b", "c", "d"];
            let mut appended: HashMap<Uuid, Vec<u64>> = HashMap::new();
            for c in &chats {
                if let Decision::Append(e) = s.sequence(&cmd(*c, "a", "create", group(&["b", "c"])), &l, 1) {
                    appended.entry(*c).or_default().push(e.seq.unwrap());
                }
            }
            let mut seen: HashMap<(Uuid, usize, u8), u64> = HashMap::new();
            for (ci, ui, mid) in ops {
                let c = chats[ci];
                let d = s.sequence(&cmd(c, users[ui], &format!("m{mid}"), text("x")), &l, 1);
                match d {
                    Decision::Append(e) => {
                        proptest::prop_assert!(seen.insert((c, ui, mid), e.seq.unwrap()).is_none());
                        appended.entry(c).or_default().push(e.seq.unwrap());
                    }
                    Decision::Duplicate { seq } => proptest::prop_assert_eq!(seen.get(&(c, ui, mid)), Some(&seq)),
                    Decision::Reject { code, .. } => proptest::prop_assert_eq!((code, ui), ("not_member", 3)),
                }
            }
            for seqs in appended.values() {
                let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
                proptest::prop_assert_eq!(seqs, &expected);
            }
        }
    }

    #[test]
    fn a_command_read_again_is_a_replay_but_a_client_retry_is_not() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let c = Uuid::new_v4();
        s.sequence(&cmd(c, "a", "g", group(&["b"])), &l, 1);
        let m = cmd(c, "a", "m1", text("x"));
        assert!(!s.is_replay(&m));
        s.sequence(&m, &l, 1);
        assert!(s.is_replay(&m), "the same record again");
        let mut retry = m.clone();
        retry.event_id = Uuid::new_v4();
        assert!(!s.is_replay(&retry), "a retry is answered");
        assert_eq!(s.sequence(&retry, &l, 1), Decision::Duplicate { seq: 2 });
    }

    fn receipt(chat: Uuid, user: &str, device: &str, up_to: u64, read: bool) -> Envelope {
        let body = if read {
            Body::ReadReceipt(chat_schemas::ReadReceipt { up_to_seq: up_to })
        } else {
            Body::DeliveryReceipt(chat_schemas::DeliveryReceipt {
                up_to_seq: up_to,
                device: device.into(),
            })
        };
        let mut e = cmd(chat, user, "r", body);
        e.client_msg_id = None;
        e.sender_device = device.into();
        e
    }

    #[test]
    fn receipts_take_no_seq_and_only_move_forward() {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let c = Uuid::new_v4();
        s.sequence(&cmd(c, "a", "g", group(&["b"])), &l, 1);
        for i in 0..3 {
            s.sequence(&cmd(c, "a", &format!("m{i}"), text("x")), &l, 1);
        }
        // b read up to 3: appended without a seq; the chat's last seq stays 4.
        match s.sequence(&receipt(c, "b", "p", 3, true), &l, 1) {
            Decision::Append(e) => {
                assert_eq!(e.seq, None);
                assert_eq!(result_seq(&e), Some(3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.chat(&c).unwrap().last_seq, 4);
        assert_eq!(s.chat(&c).unwrap().read_of("b"), 3);
        // Backward: refused; the same pointer again: a duplicate.
        let back = s.sequence(&receipt(c, "b", "p", 2, true), &l, 1);
        assert_eq!(code_of(&back), "stale_receipt");
        assert_eq!(
            s.sequence(&receipt(c, "b", "p", 3, true), &l, 1),
            Decision::Duplicate { seq: 3 }
        );
        // Not yet existing, zero, non-member, unknown chat.
        assert_eq!(
            code_of(&s.sequence(&receipt(c, "b", "p", 5, true), &l, 1)),
            "seq_out_of_range"
        );
        assert_eq!(
            code_of(&s.sequence(&receipt(c, "b", "p", 0, false), &l, 1)),
            "seq_out_of_range"
        );
        assert_eq!(
            code_of(&s.sequence(&receipt(c, "z", "p", 1, true), &l, 1)),
            "not_member"
        );
        assert_eq!(
            code_of(&s.sequence(&receipt(Uuid::new_v4(), "b", "p", 1, true), &l, 1)),
            "unknown_chat"
        );
        // Delivery pointers are per device and must name the sending device.
        assert!(matches!(
            s.sequence(&receipt(c, "b", "p", 4, false), &l, 1),
            Decision::Append(_)
        ));
        assert!(matches!(
            s.sequence(&receipt(c, "b", "q", 2, false), &l, 1),
            Decision::Append(_)
        ));
        let mut forged = receipt(c, "b", "q", 3, false);
        forged.sender_device = "p".into();
        assert_eq!(code_of(&s.sequence(&forged, &l, 1)), "invalid");
        // The sender's own message moves their read pointer.
        s.sequence(&cmd(c, "b", "mb", text("y")), &l, 1);
        assert_eq!(s.chat(&c).unwrap().read_of("b"), 5);
    }

    proptest::proptest! {
        /// Any interleaving of sends by two users and read receipts from two
        /// devices of one user, delivered out of order: the read pointer
        /// never moves back, every accepted receipt moves it strictly
        /// forward, and the unread count (`last_seq - read`) equals the
        /// number of events after the highest read seq the user saw
        /// accepted, whatever device reads it.
        #[test]
        fn read_pointers_only_move_forward_and_unread_is_exact(
            ops in proptest::collection::vec((0u8..4, 0u64..40), 1..150)
        ) {
            let (mut s, l) = (PartitionState::default(), Limits::default());
            let c = Uuid::new_v4();
            s.sequence(&cmd(c, "a", "g", group(&["b"])), &l, 1);
            let mut model_read = 0u64; // b's pointer in the model
            let mut last = 1u64;
            for (i, (op, n)) in ops.into_iter().enumerate() {
                let before = s.chat(&c).unwrap().read_of("b");
                match op {
                    0 => { s.sequence(&cmd(c, "a", &format!("a{i}"), text("x")), &l, 1); last += 1; }
                    1 => {
                        s.sequence(&cmd(c, "b", &format!("b{i}"), text("x")), &l, 1);
                        last += 1;
                        model_read = last;
                    }
                    _ => {
                        let device = if op == 2 { "phone" } else { "laptop" };
                        let d = s.sequence(&receipt(c, "b", device, n, true), &l, 1);
                        match d {
                            Decision::Append(_) => {
                                proptest::prop_assert!(n > before && n <= last);
                                model_read = n;
                            }
                            Decision::Duplicate { seq } => proptest::prop_assert_eq!(seq, before),
                            Decision::Reject { code, .. } => proptest::prop_assert!(
                                (code == "stale_receipt" && n < before)
                                    || (code == "seq_out_of_range" && (n == 0 || n > last))
                            ),
                        }
                    }
                }
                let chat = s.chat(&c).unwrap();
                proptest::prop_assert!(chat.read_of("b") >= before);
                proptest::prop_assert_eq!(chat.read_of("b"), model_read);
                proptest::prop_assert_eq!(chat.last_seq, last);
            }
        }
    }

    /// A partition's log as the sequencer appends it: a group, messages by
    /// its members, a read receipt and a mute change (no seq).
    fn appended_log(c: Uuid) -> Vec<Envelope> {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let mut log = Vec::new();
        let mute = Body::MuteChanged(chat_schemas::MuteChanged { muted: true });
        for cmd in [
            cmd(c, "a", "g", group(&["b"])),
            cmd(c, "a", "m1", text("x")),
            cmd(c, "b", "m2", text("y")),
            receipt(c, "a", "p", 3, true),
            cmd(c, "b", "mute", mute),
            cmd(c, "a", "m3", text("z")),
        ] {
            match s.sequence(&cmd, &l, 1) {
                Decision::Append(e) => log.push(*e),
                other => panic!("{other:?}"),
            }
        }
        log
    }

    #[test]
    fn the_fold_takes_the_appended_log_and_refuses_a_skipped_or_repeated_seq() {
        let c = Uuid::new_v4();
        let log = appended_log(c);
        let seqs: Vec<Option<u64>> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [Some(1), Some(2), Some(3), None, None, Some(4)]);
        let mut whole = PartitionState::default();
        for e in &log {
            whole.apply(e).unwrap();
        }
        assert_eq!(whole.chat(&c).unwrap().last_seq, 4);

        // seq 2 skipped (a record lost by a rebuild): seq 3 is refused and
        // the state stays as it was.
        let mut s = PartitionState::default();
        s.apply(&log[0]).unwrap();
        let before = s.chat(&c).cloned();
        let err = s.apply(&log[2]).unwrap_err();
        assert_eq!(
            err,
            FoldError::SeqGap {
                chat: c,
                expected: 2,
                found: 3,
                kind: "MessageSent"
            }
        );
        assert_eq!((err.chat(), err.expected(), err.found()), (c, 2, 3));
        assert_eq!(
            s.chat(&c).cloned(),
            before,
            "a refused event changes nothing"
        );
        assert!(
            !matches!(
                s.decide(&cmd(c, "b", "m2", text("y")), &Limits::default(), 1),
                Decision::Duplicate { .. }
            ),
            "a refused event is not remembered for dedupe"
        );

        // The same event twice.
        s.apply(&log[1]).unwrap();
        assert_eq!(
            s.apply(&log[1]).unwrap_err(),
            FoldError::SeqGap {
                chat: c,
                expected: 3,
                found: 2,
                kind: "MessageSent"
            }
        );

        // A second ChatCreated, even with the next seq.
        let mut again = log[0].clone();
        again.seq = Some(3);
        assert_eq!(
            s.apply(&again).unwrap_err(),
            FoldError::CreatedTwice {
                chat: c,
                found: 3,
                last_seq: 2
            }
        );

        // A chat whose ChatCreated was skipped.
        let mut fresh = PartitionState::default();
        assert_eq!(
            fresh.apply(&log[1]).unwrap_err(),
            FoldError::SeqGap {
                chat: c,
                expected: 1,
                found: 2,
                kind: "MessageSent"
            }
        );
        let mut first = log[1].clone();
        first.seq = Some(1);
        let err = fresh.apply(&first).unwrap_err();
        assert_eq!(
            err,
            FoldError::NotCreated {
                chat: c,
                kind: "MessageSent"
            }
        );
        assert_eq!((err.expected(), err.found()), (1, 1));
        assert_eq!(fresh.chats(), 0);

        // Receipts and mute changes carry no seq: never refused, even for a
        // chat the state does not know.
        fresh.apply(&log[3]).unwrap();
        fresh.apply(&log[4]).unwrap();
        assert_eq!(fresh.chats(), 0);
    }

    /// Sequences random commands over a few chats (messages, retries,
    /// receipts), returning the appended log and the sequencer's state.
    fn random_log(
        chats: &[Uuid],
        ops: &[(usize, usize, u8, bool)],
    ) -> (Vec<Envelope>, PartitionState) {
        let (mut s, l) = (PartitionState::default(), Limits::default());
        let users = ["a", "b", "c"];
        let mut log = Vec::new();
        let mut cmds: Vec<Envelope> = chats
            .iter()
            .map(|c| cmd(*c, "a", "create", group(&["b", "c"])))
            .collect();
        for (i, (ci, ui, mid, is_receipt)) in ops.iter().enumerate() {
            let c = chats[*ci % chats.len()];
            cmds.push(if *is_receipt {
                let mut r = receipt(c, users[*ui % 3], "p", u64::from(*mid) + 1, true);
                r.client_msg_id = Some(format!("r{i}"));
                r
            } else {
                cmd(c, users[*ui % 3], &format!("m{mid}"), text("x"))
            });
        }
        for c in &cmds {
            if let Decision::Append(e) = s.sequence(c, &l, 1) {
                log.push(*e);
            }
        }
        (log, s)
    }

    fn fold(log: &[Envelope]) -> Result<PartitionState, (usize, FoldError)> {
        let mut s = PartitionState::default();
        for (i, e) in log.iter().enumerate() {
            s.apply(e).map_err(|err| (i, err))?;
        }
        Ok(s)
    }

    proptest::proptest! {
        /// The log the sequencer appends always folds back into its own
        /// state; a log with one seq-carrying event skipped is refused
        /// exactly when a later event of the same chat carries a seq (at
        /// that event, naming the skipped seq as the expected one); a log
        /// with one event repeated is always refused at the repeat.
        #[test]
        fn a_rebuild_refuses_a_skipped_or_repeated_event(
            ops in proptest::collection::vec((0usize..3, 0usize..3, 0u8..12, proptest::bool::ANY), 0..80),
            pick in 0usize..1000,
        ) {
            let chats: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
            let (log, live) = random_log(&chats, &ops);
            let whole = fold(&log).map_err(|(i, e)| proptest::test_runner::TestCaseError::fail(format!("{i}: {e}")))?;
            for c in &chats {
                proptest::prop_assert_eq!(whole.chat(c), live.chat(c));
            }

            let sequenced: Vec<usize> = (0..log.len()).filter(|i| log[*i].seq.is_some()).collect();
            let i = sequenced[pick % sequenced.len()];
            let (chat, seq) = (log[i].chat_id.unwrap(), log[i].seq.unwrap());
            let later = log[i + 1..].iter().position(|e| e.chat_id == Some(chat) && e.seq.is_some());
            let mut skipped = log.clone();
            skipped.remove(i);
            match (fold(&skipped), later) {
                (Ok(_), None) => {}
                (Err((at, err)), Some(k)) => {
                    proptest::prop_assert_eq!(at, i + k, "refused at the chat's next sequenced event");
                    proptest::prop_assert_eq!((err.chat(), err.expected(), err.found()), (chat, seq, seq + 1));
                }
                (other, later) => proptest::prop_assert!(false, "skipped {} (later {:?}): {:?}", i, later, other.map(|_| ())),
            }

            let mut repeated = log.clone();
            repeated.insert(i + 1, log[i].clone());
            let (at, err) = match fold(&repeated) {
                Ok(_) => return Err(proptest::test_runner::TestCaseError::fail("a repeated event was taken")),
                Err(x) => x,
            };
            proptest::prop_assert_eq!(at, i + 1);
            proptest::prop_assert_eq!(err.chat(), chat);
            proptest::prop_assert_eq!(err.found(), seq);
        }
    }

    /// A store in memory, written with what `take_changes` hands out.
    #[derive(Debug, Default)]
    struct MemStore {
        chats: std::sync::Mutex<HashMap<Uuid, ChatState>>,
        dedupe: std::sync::Mutex<HashMap<DedupeKey, Deduped>>,
    }

    impl Backing for MemStore {
        fn chat(&self, chat: &Uuid) -> Result<Option<ChatState>, String> {
            Ok(self.chats.lock().unwrap().get(chat).cloned())
        }
        fn dedupe(&self, key: &DedupeKey) -> Result<Option<Deduped>, String> {
            Ok(self.dedupe.lock().unwrap().get(key).copied())
        }
    }

    impl MemStore {
        fn write(&self, c: Changes) {
            self.chats.lock().unwrap().extend(c.chats);
            self.dedupe.lock().unwrap().extend(c.dedupe);
        }
    }

    #[test]
    fn a_retry_dedupes_within_the_window_only() {
        let chat = Uuid::new_v4();
        let l = Limits::default();
        let store = Arc::new(MemStore::default());
        let mut s = PartitionState::backed(store, Some(1_000));
        s.sequence(&cmd(chat, "a", "c", group(&["b"])), &l, 10_000);
        assert!(matches!(
            s.sequence(&cmd(chat, "a", "m1", text("x")), &l, 10_000),
            Decision::Append(_)
        ));
        assert_eq!(
            s.sequence(&cmd(chat, "a", "m1", text("x")), &l, 10_999),
            Decision::Duplicate { seq: 2 }
        );
        match s.sequence(&cmd(chat, "a", "m1", text("x")), &l, 11_001) {
            Decision::Append(e) => assert_eq!(e.seq, Some(3)),
            other => panic!("past the window a retry is a new command: {other:?}"),
        }
    }

    #[test]
    fn a_store_that_cannot_be_read_refuses_instead_of_guessing() {
        #[derive(Debug)]
        struct Broken;
        impl Backing for Broken {
            fn chat(&self, _: &Uuid) -> Result<Option<ChatState>, String> {
                Err("disk gone".into())
            }
            fn dedupe(&self, _: &DedupeKey) -> Result<Option<Deduped>, String> {
                Err("disk gone".into())
            }
        }
        let chat = Uuid::new_v4();
        let mut s = PartitionState::backed(Arc::new(Broken), None);
        let d = s.sequence(&cmd(chat, "a", "c", group(&["b"])), &Limits::default(), 1);
        assert!(
            matches!(
                d,
                Decision::Reject {
                    code: "unavailable",
                    ..
                }
            ),
            "{d:?}"
        );
        assert!(s.store_failure().is_some());
    }

    proptest::proptest! {
        /// A state kept in a store and evicted from memory after every
        /// command decides exactly as one kept whole in memory, and folds
        /// the same chats.
        #[test]
        fn a_state_evicted_after_every_command_decides_like_one_in_memory(
            ops in proptest::collection::vec((0usize..3, 0usize..3, 0u8..12, proptest::bool::ANY), 0..80),
        ) {
            let chats: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
            let (log, live) = random_log(&chats, &ops);
            let store = Arc::new(MemStore::default());
            let mut backed = PartitionState::backed(store.clone(), None);
            for e in &log {
                backed.apply(e).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
                store.write(backed.take_changes());
                backed.evict(0);
                proptest::prop_assert_eq!(backed.chats(), 0);
            }
            let l = Limits::default();
            let mut whole = live.clone();
            for (i, e) in log.iter().enumerate() {
                // A retry of each logged command, and a new one after it.
                let mut retry = e.clone();
                retry.event_id = Uuid::new_v4();
                retry.seq = None;
                let fresh = cmd(e.chat_id.unwrap(), &e.sender_user, &format!("new{i}"), text("y"));
                for c in [retry, fresh] {
                    let (a, b) = (whole.sequence(&c, &l, 2), backed.sequence(&c, &l, 2));
                    proptest::prop_assert_eq!(a, b);
                    store.write(backed.take_changes());
                    backed.evict(0);
                }
            }
            for c in &chats {
                proptest::prop_assert_eq!(backed.load_chat(c).cloned(), whole.chat(c).cloned());
            }
        }
    }
}
