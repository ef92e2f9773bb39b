//! Deliveries: this gateway's partitions of `chat.deliveries` and
//! `chat.results`, and the local fan-out of what they carry.
//!
//! One task per topic tails partition `deliveries_partition(gateway_id,
//! partitions)` from where it stood at start-up, keeps the records keyed
//! with this gateway's id, and hands each to the [`Hub`]:
//! - `CommandResult` (from `chat.results`) → the connection that produced
//!   the command (by the command's event id);
//! - `SessionRouted` → the connection waiting for it (by session id);
//! - `SessionClosed` (`gateway_expired`, forwarded by the router) → the
//!   session re-announcer ([`Hub::on_expired`]);
//! - any chat event → every local connection of every user in the record's
//!   `recipients` header.
//!
//! Nothing here ever waits on a connection: each connection has a
//! [`Mailbox`] (live events and command results, bounded, allocated only
//! while something waits in it); a full one closes that connection with
//! 4008 (slow consumer); other connections are not affected.

use chat_log::{
    parse_events_position, ConsumedEvent, TailItem, TopicTail, HEADER_EVENTS_POSITION,
    HEADER_RECIPIENTS,
};
use chat_schemas::{Body, CommandResult};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{GatewayMetrics, TypeLabel};
use crate::protocol::{close, EventJson, PresenceJson, ServerFrame};

/// Closes one connection: the first reason wins; every task of the
/// connection watches [`Closer::cancelled`].
#[derive(Clone, Debug, Default)]
pub struct Closer {
    token: CancellationToken,
    reason: Arc<Mutex<Option<(u16, String)>>>,
}

/// Internal close code: the peer is gone, nothing is sent.
pub const GONE: u16 = 1006;

impl Closer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the connection to close now with `code` (the first reason wins):
    /// every task stops; the writer sends a close frame with the reason.
    pub fn close(&self, code: u16, reason: &str) {
        self.set_reason(code, reason);
        self.token.cancel();
    }

    /// Records why the connection ends (the first reason wins) without
    /// stopping anything yet: used when a close frame is queued behind other
    /// frames.
    pub fn set_reason(&self, code: u16, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                *r = Some((code, reason.to_string()));
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// The code and reason the connection was closed with, if it was.
    pub fn reason(&self) -> Option<(u16, String)> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// A live event ready for the sockets: its position and its `event` frame.
#[derive(Clone, Debug)]
pub struct LiveEvent {
    pub chat: Uuid,
    pub seq: Option<u64>,
    pub frame: Arc<str>,
    /// `(partition, offset)` of the event in `chat.events` (the router's
    /// `events_position` header): once sent, the connection's reads wait
    /// for projections to pass it.
    pub position: Option<(i32, i64)>,
}

/// What the hub forwards to a connection about its commands.
#[derive(Clone, Debug)]
pub enum ResultMsg {
    /// The sequencer's answer (boxed: a queued result costs a pointer).
    Sequencer(Box<CommandResult>),
    /// The command could not be appended to `chat.commands`.
    ProduceFailed { command_id: Uuid, message: String },
}

/// What the hub hands to one connection: its live events (held until the
/// first sync is answered) and the results of its commands. One allocation
/// per connection; the queues take memory only while they hold something
/// (they are released when drained), so an idle connection costs the
/// struct alone. The connection's task waits on [`Mailbox::notified`].
#[derive(Debug)]
pub struct Mailbox {
    queues: Mutex<Queues>,
    notify: tokio::sync::Notify,
    /// Live events held at most (`limits.outbound_queue`); more: 4008.
    events_cap: usize,
    /// Results held at most; more: 4008.
    results_cap: usize,
    /// The chats the connection watches (`watch`) and the generation of the
    /// `watch` frame that set them: typing and other members' receipts of
    /// these chats are delivered to it.
    watching: RwLock<Watching>,
}

#[derive(Debug, Default)]
struct Queues {
    events: VecDeque<LiveEvent>,
    results: VecDeque<ResultMsg>,
}

/// The chats a connection watches, as set by its newest applied `watch`.
#[derive(Debug, Default)]
pub struct Watching {
    /// The sequence number of the `watch` frame that set `chats` (a later
    /// frame's answer may be ready first; an older one never overwrites it).
    pub generation: u64,
    pub chats: HashSet<Uuid>,
}

/// Queues drained with more capacity than this are released.
const KEEP_CAPACITY: usize = 8;

impl Mailbox {
    pub fn new(events_cap: usize, results_cap: usize) -> Self {
        Self {
            queues: Mutex::default(),
            notify: tokio::sync::Notify::new(),
            events_cap,
            results_cap,
            watching: RwLock::default(),
        }
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a live event; false when the queue is full.
    pub fn push_event(&self, e: LiveEvent) -> bool {
        {
            let mut q = self.queues();
            if q.events.len() >= self.events_cap {
                return false;
            }
            q.events.push_back(e);
        }
        self.notify.notify_one();
        true
    }

    /// Queues a command result; false when the queue is full.
    pub fn push_result(&self, r: ResultMsg) -> bool {
        {
            let mut q = self.queues();
            if q.results.len() >= self.results_cap {
                return false;
            }
            q.results.push_back(r);
        }
        self.notify.notify_one();
        true
    }

    /// The oldest live event.
    pub fn pop_event(&self) -> Option<LiveEvent> {
        let mut q = self.queues();
        let e = q.events.pop_front();
        if q.events.is_empty() && q.events.capacity() > KEEP_CAPACITY {
            q.events = VecDeque::new();
        }
        e
    }

    /// The oldest command result.
    pub fn pop_result(&self) -> Option<ResultMsg> {
        let mut q = self.queues();
        let r = q.results.pop_front();
        if q.results.is_empty() && q.results.capacity() > KEEP_CAPACITY {
            q.results = VecDeque::new();
        }
        r
    }

    pub fn has_events(&self) -> bool {
        !self.queues().events.is_empty()
    }

    pub fn has_results(&self) -> bool {
        !self.queues().results.is_empty()
    }

    /// Resolves after something was queued (a permit is kept when nobody
    /// waits, so nothing queued between a check and the wait is missed).
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Whether the connection watches `chat`.
    pub fn watches(&self, chat: &Uuid) -> bool {
        self.watching.read().is_ok_and(|w| w.chats.contains(chat))
    }

    /// Sets the watched chats if `generation` is newer than the applied
    /// one, running `apply` (the hub's presence index) under the same lock,
    /// so concurrent `watch` answers end with the newest frame's set.
    pub fn set_watching(
        &self,
        generation: u64,
        chats: HashSet<Uuid>,
        apply: impl FnOnce(),
    ) -> bool {
        let Ok(mut w) = self.watching.write() else {
            return false;
        };
        if generation <= w.generation {
            return false;
        }
        w.generation = generation;
        w.chats = chats;
        apply();
        true
    }
}

/// How the hub reaches one connection.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub conn_id: u64,
    pub session_id: Uuid,
    /// The connection's device.
    pub device: String,
    pub mailbox: Arc<Mailbox>,
    pub closer: Closer,
}

/// The local routing tables.
#[derive(Debug)]
pub struct Hub {
    gateway_id: String,
    users: RwLock<HashMap<String, Vec<ConnHandle>>>,
    pending: Mutex<HashMap<Uuid, ConnHandle>>,
    /// Sessions waiting for the routers' `SessionRouted` answers (one per
    /// router instance, and again when a router is assigned a partition).
    routed: Mutex<HashMap<Uuid, mpsc::UnboundedSender<Vec<u64>>>>,
    /// Presence watchers: watched user -> connections watching them.
    watchers: RwLock<HashMap<String, HashMap<u64, ConnHandle>>>,
    /// Per connection, the users it watches (to undo a watch).
    watched: Mutex<HashMap<u64, Vec<String>>>,
    /// Where sessions of this gateway closed by the presence service go
    /// (user, session, the close's event id).
    expired: Mutex<Option<mpsc::Sender<(String, Uuid, Uuid)>>>,
    pub(crate) metrics: Arc<GatewayMetrics>,
}

impl Hub {
    pub fn new(gateway_id: &str, metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            gateway_id: gateway_id.to_string(),
            users: RwLock::default(),
            pending: Mutex::default(),
            routed: Mutex::default(),
            watchers: RwLock::default(),
            watched: Mutex::default(),
            expired: Mutex::default(),
            metrics,
        }
    }

    /// Sends the sessions of this gateway that the presence service closed
    /// (`gateway_expired`) to `tx`: (user, session, close event id).
    pub fn on_expired(&self, tx: mpsc::Sender<(String, Uuid, Uuid)>) {
        if let Ok(mut e) = self.expired.lock() {
            *e = Some(tx);
        }
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Starts buffering live events for `user` into `conn` (call before
    /// producing SessionOpened) and returns the receiver of the router's
    /// `SessionRouted` for this session.
    pub fn register(&self, user: &str, conn: ConnHandle) -> mpsc::UnboundedReceiver<Vec<u64>> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut r) = self.routed.lock() {
            r.insert(conn.session_id, tx);
        }
        if let Ok(mut users) = self.users.write() {
            // Most users have one connection here: no room for four.
            users
                .entry(user.to_string())
                .or_insert_with(|| Vec::with_capacity(1))
                .push(conn);
        }
        rx
    }

    /// The session no longer waits for `SessionRouted` (its first sync
    /// merged an answer for every partition): its channel is released.
    pub fn routed_done(&self, session_id: Uuid) {
        if let Ok(mut r) = self.routed.lock() {
            r.remove(&session_id);
        }
    }

    /// Forgets a connection and everything routed to it.
    pub fn unregister(&self, user: &str, conn_id: u64, session_id: Uuid) {
        if let Ok(mut users) = self.users.write() {
            if let Some(list) = users.get_mut(user) {
                list.retain(|c| c.conn_id != conn_id);
                if list.is_empty() {
                    users.remove(user);
                }
            }
        }
        if let Ok(mut p) = self.pending.lock() {
            p.retain(|_, c| c.conn_id != conn_id);
        }
        if let Ok(mut r) = self.routed.lock() {
            r.remove(&session_id);
        }
        self.unwatch(conn_id);
    }

    /// Makes `conn` watch the presence of `users` (replacing what it watched).
    pub fn watch(&self, conn: &ConnHandle, users: Vec<String>) {
        self.unwatch(conn.conn_id);
        if let Ok(mut w) = self.watchers.write() {
            for u in &users {
                w.entry(u.clone())
                    .or_default()
                    .insert(conn.conn_id, conn.clone());
            }
        }
        if let Ok(mut w) = self.watched.lock() {
            w.insert(conn.conn_id, users);
        }
    }

    fn unwatch(&self, conn_id: u64) {
        let Some(users) = self
            .watched
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&conn_id))
        else {
            return;
        };
        if let Ok(mut w) = self.watchers.write() {
            for u in users {
                if let Some(conns) = w.get_mut(&u) {
                    conns.remove(&conn_id);
                    if conns.is_empty() {
                        w.remove(&u);
                    }
                }
            }
        }
    }

    /// Delivers a window's presence changes: one `presence` frame per
    /// watching connection with the changes of the users it watches. Users
    /// nobody here watches cost nothing. Returns the frames sent.
    pub fn presence_batch(&self, changes: &[PresenceJson]) -> usize {
        let mut per_conn: HashMap<u64, (ConnHandle, Vec<PresenceJson>)> = HashMap::new();
        if let Ok(w) = self.watchers.read() {
            for change in changes {
                for (id, conn) in w.get(&change.user).into_iter().flatten() {
                    per_conn
                        .entry(*id)
                        .or_insert_with(|| (conn.clone(), Vec::new()))
                        .1
                        .push(change.clone());
                }
            }
        }
        let n = per_conn.len();
        for (conn, users) in per_conn.into_values() {
            let frame = ServerFrame::Presence { id: None, users }.to_json();
            self.offer(&conn, Uuid::nil(), frame.into(), None);
        }
        n
    }

    /// Whether `user` has a connection from `device` here.
    pub fn devices_online(&self, user: &str) -> HashSet<String> {
        self.users
            .read()
            .map(|u| {
                u.get(user)
                    .into_iter()
                    .flatten()
                    .map(|c| c.device.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Closes every connection of `user`'s `device` (it was revoked).
    pub fn close_device(&self, user: &str, device: &str) -> usize {
        let Ok(users) = self.users.read() else {
            return 0;
        };
        let mut n = 0;
        for conn in users.get(user).into_iter().flatten() {
            if conn.device == device {
                conn.closer.close(close::DEVICE_REVOKED, "device revoked");
                n += 1;
            }
        }
        n
    }

    /// Queues a frame without a seq for one connection (4008 when full).
    fn offer(&self, conn: &ConnHandle, chat: Uuid, frame: Arc<str>, position: Option<(i32, i64)>) {
        self.offer_event(
            conn,
            LiveEvent {
                chat,
                seq: None,
                frame,
                position,
            },
        );
    }

    /// Queues a live event for one connection (4008 when its queue is full).
    fn offer_event(&self, conn: &ConnHandle, live: LiveEvent) {
        if !conn.mailbox.push_event(live) && !conn.closer.is_closed() {
            conn.closer.close(close::SLOW_CONSUMER, "event queue full");
        }
    }

    /// Routes the result of `command_id` to `conn`.
    pub fn add_pending(&self, command_id: Uuid, conn: ConnHandle) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(command_id, conn);
        }
    }

    pub fn remove_pending(&self, command_id: Uuid) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&command_id);
        }
    }

    /// Connections of `user` on this gateway.
    pub fn connections_of(&self, user: &str) -> usize {
        self.users
            .read()
            .map(|u| u.get(user).map_or(0, Vec::len))
            .unwrap_or(0)
    }

    /// Handles one record of the deliveries partition.
    pub fn dispatch(&self, record: &ConsumedEvent) {
        if record.key.as_deref() != Some(self.gateway_id.as_bytes()) {
            return; // another gateway sharing the partition
        }
        let envelope = &record.envelope;
        let kind = envelope.body.kind();
        self.metrics
            .deliveries
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
        match &envelope.body {
            Body::CommandResult(r) => {
                let conn = self
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(&r.command_event_id));
                if let Some(conn) = conn {
                    if !conn
                        .mailbox
                        .push_result(ResultMsg::Sequencer(Box::new(r.clone())))
                        && !conn.closer.is_closed()
                    {
                        conn.closer.close(close::SLOW_CONSUMER, "result queue full");
                    }
                }
            }
            Body::SessionRouted(r) => {
                let waiter = self
                    .routed
                    .lock()
                    .ok()
                    .and_then(|w| w.get(&r.session_id).cloned());
                if let Some(tx) = waiter {
                    let _ = tx.send(r.router_offsets.clone());
                }
            }
            Body::DeviceRevoked(r) => {
                let n = self.close_device(&envelope.sender_user, &r.device_id);
                tracing::info!(user = %envelope.sender_user, device = %r.device_id, connections = n, "device revoked");
            }
            Body::Typing(_) | Body::ReadReceipt(_) | Body::DeliveryReceipt(_) => {
                self.fan_out_signal(record)
            }
            Body::MuteChanged(m) => {
                let Some(chat) = envelope.chat_id else { return };
                let frame: Arc<str> = ServerFrame::Muted {
                    chat,
                    muted: m.muted,
                }
                .to_json()
                .into();
                if let Ok(users) = self.users.read() {
                    for conn in users.get(&envelope.sender_user).into_iter().flatten() {
                        self.offer(conn, chat, frame.clone(), position(record));
                    }
                }
            }
            Body::SessionClosed(c) if c.gateway_id == self.gateway_id => {
                let tx = self.expired.lock().ok().and_then(|e| e.clone());
                if let Some(tx) = tx {
                    let item = (
                        envelope.sender_user.clone(),
                        c.session_id,
                        envelope.event_id,
                    );
                    if tx.try_send(item).is_err() {
                        tracing::warn!(session = %c.session_id, "re-announce queue full; session stays closed");
                    }
                }
            }
            Body::SessionOpened(_)
            | Body::SessionClosed(_)
            | Body::PushTask(_)
            | Body::GatewayHeartbeat(_)
            | Body::PresenceSettingChanged(_)
            | Body::PushRegistrationChanged(_)
            | Body::PresenceChanged(_) => {}
            _ => self.fan_out(record),
        }
    }

    /// Typing indicators and receipts: not chat history (no seq). Typing
    /// goes to the recipients' connections watching the chat (not back to
    /// the typing device); a receipt to every device of its author (their
    /// unread counts) and to the other members' connections watching the
    /// chat (delivered/read marks).
    fn fan_out_signal(&self, record: &ConsumedEvent) {
        let e = &record.envelope;
        let (Some(chat), Some(recipients)) = (e.chat_id, record.header(HEADER_RECIPIENTS)) else {
            return;
        };
        let (frame, is_typing) = match &e.body {
            Body::Typing(t) => (
                ServerFrame::Typing {
                    chat,
                    user: e.sender_user.clone(),
                    device: e.sender_device.clone(),
                    active: t.active,
                    expires_at: t.expires_at,
                },
                true,
            ),
            body => {
                let Some((device, up_to_seq)) = body.receipt() else {
                    return;
                };
                (
                    ServerFrame::Receipt {
                        chat,
                        user: e.sender_user.clone(),
                        device: device.unwrap_or(&e.sender_device).to_string(),
                        kind: if device.is_some() {
                            "delivered"
                        } else {
                            "read"
                        },
                        up_to_seq,
                        ts: e.sequenced_ts.unwrap_or(e.server_ts),
                    },
                    false,
                )
            }
        };
        let frame: Arc<str> = frame.to_json().into();
        let Ok(users) = self.users.read() else {
            return;
        };
        for user in recipient_list(&recipients) {
            let own = user == e.sender_user;
            for conn in users.get(user).into_iter().flatten() {
                let watching = conn.mailbox.watches(&chat);
                let wanted = if is_typing {
                    watching && !(own && conn.device == e.sender_device)
                } else {
                    own || watching
                };
                if wanted {
                    self.offer(conn, chat, frame.clone(), position(record));
                }
            }
        }
    }

    fn fan_out(&self, record: &ConsumedEvent) {
        let Some(recipients) = record.header(HEADER_RECIPIENTS) else {
            tracing::warn!(
                offset = record.offset,
                "delivery without a recipients header; dropped"
            );
            return;
        };
        let Some(event) = EventJson::from_envelope(&record.envelope) else {
            tracing::debug!(
                kind = record.envelope.body.kind(),
                "delivery without a chat; not sent to clients"
            );
            return;
        };
        let live = LiveEvent {
            chat: event.chat,
            seq: event.seq,
            frame: Arc::from(event.frame()),
            position: position(record),
        };
        let Ok(users) = self.users.read() else {
            return;
        };
        for user in recipient_list(&recipients) {
            for conn in users.get(user).into_iter().flatten() {
                self.offer_event(conn, live.clone());
            }
        }
    }
}

/// The `chat.events` position a delivery record carries (none on typing
/// indicators, which are not in `chat.events`).
fn position(record: &ConsumedEvent) -> Option<(i32, i64)> {
    record
        .header_bytes(HEADER_EVENTS_POSITION)
        .and_then(parse_events_position)
}

/// The users of a `recipients` header (comma-separated).
fn recipient_list(header: &str) -> impl Iterator<Item = &str> {
    header.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// Tails `chat.presence` (every partition, from its end) and delivers each
/// window's changes to the connections watching those users
/// ([`Hub::presence_batch`]): within a window only a user's latest state
/// counts.
pub async fn run_presence_tail(
    tail: TopicTail,
    hub: Arc<Hub>,
    window: std::time::Duration,
    stop: CancellationToken,
) {
    let mut batch: HashMap<String, PresenceJson> = HashMap::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let flush_at = deadline;
        let item = tokio::select! {
            _ = stop.cancelled() => break,
            _ = async { tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)).await }, if flush_at.is_some() => {
                let changes: Vec<PresenceJson> = batch.drain().map(|(_, p)| p).collect();
                let frames = hub.presence_batch(&changes);
                hub.metrics.presence_frames.inc_by(frames as u64);
                deadline = None;
                continue;
            }
            item = tail.next() => item,
        };
        match item {
            Ok(TailItem::Event(record)) => {
                if let Body::PresenceChanged(p) = &record.envelope.body {
                    let status = match p.status {
                        chat_schemas::PresenceStatus::Online => "online",
                        chat_schemas::PresenceStatus::Offline => "offline",
                    };
                    batch.insert(
                        p.user_id.clone(),
                        PresenceJson {
                            user: p.user_id.clone(),
                            status: status.into(),
                            last_seen: p.last_seen,
                        },
                    );
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + window);
                }
            }
            Ok(TailItem::Undecodable { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading chat.presence failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

/// Tails one of this gateway's partitions (`component`: `deliveries` or
/// `results`, also its name in `/health`) into `hub` until `stop` fires.
pub async fn run_tail(
    tail: TopicTail,
    component: &'static str,
    hub: Arc<Hub>,
    health: chat_runtime::Health,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let item = tokio::select! {
            _ = stop.cancelled() => break,
            item = tail.next() => item,
        };
        match item {
            Ok(TailItem::Event(record)) => {
                if failing {
                    failing = false;
                    health.ready(component);
                }
                hub.dispatch(&record);
            }
            Ok(TailItem::Undecodable {
                partition,
                offset,
                error,
            }) => {
                tracing::warn!(component, partition, offset, %error, "undecodable record skipped");
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    health.not_ready(component, e.to_string());
                }
                tracing::warn!(component, error = %e, "reading this gateway's partition failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_schemas::{CommandOutcome, Envelope, MessageKind, MessageSent, SessionRouted};
    use prometheus_client::registry::Registry;

    fn hub() -> Hub {
        Hub::new(
            "gw-a",
            Arc::new(GatewayMetrics::register(&mut Registry::default())),
        )
    }

    fn conn(id: u64, cap: usize) -> (ConnHandle, Arc<Mailbox>) {
        let mailbox = Arc::new(Mailbox::new(cap, cap));
        (
            ConnHandle {
                conn_id: id,
                session_id: Uuid::new_v4(),
                device: "d".into(),
                mailbox: mailbox.clone(),
                closer: Closer::new(),
            },
            mailbox,
        )
    }

    fn watch(c: &ConnHandle, chat: Uuid) {
        let gen = c.mailbox.watching.read().unwrap().generation + 1;
        assert!(c.mailbox.set_watching(gen, HashSet::from([chat]), || {}));
    }

    fn record(key: &str, body: Body, recipients: Option<&str>) -> ConsumedEvent {
        let mut headers = Vec::new();
        if let Some(r) = recipients {
            headers.push((HEADER_RECIPIENTS.to_string(), r.as_bytes().to_vec()));
        }
        ConsumedEvent {
            topic: "chat.deliveries".into(),
            partition: 0,
            offset: 0,
            key: Some(key.as_bytes().to_vec()),
            trace_id: "t".into(),
            schema_id: 1,
            headers,
            envelope: Envelope {
                event_id: Uuid::new_v4(),
                chat_id: Some(Uuid::nil()),
                seq: Some(1),
                sender_user: "alice".into(),
                sender_device: "d".into(),
                client_msg_id: None,
                client_ts: None,
                server_ts: 1,
                sequenced_ts: Some(2),
                trace_id: "t".into(),
                body,
            },
        }
    }

    fn msg() -> Body {
        Body::MessageSent(MessageSent {
            kind: MessageKind::Text,
            text: Some("hi".into()),
            media: None,
            reply_to_seq: None,
        })
    }

    #[test]
    fn typing_goes_to_watchers_only_and_receipts_to_the_author_and_watchers() {
        let h = hub();
        // record() sends as alice from device "d".
        let (alice_same, alice_same_rx) = conn(1, 8);
        let (mut alice_other, alice_other_rx) = conn(2, 8);
        alice_other.device = "phone".into();
        let (bob_watching, bob_w_rx) = conn(3, 8);
        let (bob_idle, bob_i_rx) = conn(4, 8);
        let chat = Uuid::nil();
        for c in [&alice_same, &alice_other, &bob_watching] {
            watch(c, chat);
        }
        drop(h.register("alice", alice_same));
        drop(h.register("alice", alice_other));
        drop(h.register("bob", bob_watching));
        drop(h.register("bob", bob_idle));
        let typing = Body::Typing(chat_schemas::Typing {
            active: true,
            expires_at: 10,
        });
        h.dispatch(&record("gw-a", typing, Some("alice,bob")));
        let frame = bob_w_rx.pop_event().unwrap();
        assert!(
            frame.frame.contains(r#""type":"typing""#),
            "{}",
            frame.frame
        );
        assert!(
            alice_other_rx.pop_event().is_some(),
            "the author's other device"
        );
        assert!(alice_same_rx.pop_event().is_none(), "not the typing device");
        assert!(
            bob_i_rx.pop_event().is_none(),
            "not a connection without the chat open"
        );

        let read = Body::ReadReceipt(chat_schemas::ReadReceipt { up_to_seq: 3 });
        h.dispatch(&record("gw-a", read, Some("alice,bob")));
        assert!(
            alice_same_rx.pop_event().is_some(),
            "every device of the author"
        );
        assert!(alice_other_rx.pop_event().is_some());
        let r = bob_w_rx.pop_event().unwrap();
        assert!(
            r.frame.contains(r#""kind":"read""#) && r.seq.is_none(),
            "{}",
            r.frame
        );
        assert!(
            bob_i_rx.pop_event().is_none(),
            "others only where the chat is open"
        );
    }

    #[test]
    fn events_reach_every_connection_of_each_recipient_only() {
        let h = hub();
        let (a1, a1_rx) = conn(1, 8);
        let (a2, a2_rx) = conn(2, 8);
        let (b, b_rx) = conn(3, 8);
        let (c, c_rx) = conn(4, 8);
        drop(h.register("alice", a1));
        drop(h.register("alice", a2));
        drop(h.register("bob", b));
        drop(h.register("carol", c));
        h.dispatch(&record("gw-a", msg(), Some("alice,bob")));
        assert!(a1_rx.pop_event().is_some());
        assert!(a2_rx.pop_event().is_some());
        assert!(b_rx.pop_event().is_some());
        assert!(c_rx.pop_event().is_none());
        // Another gateway's record on a shared partition is ignored.
        h.dispatch(&record("gw-b", msg(), Some("alice")));
        assert!(a1_rx.pop_event().is_none());
    }

    #[test]
    fn a_full_queue_closes_only_that_connection() {
        let h = hub();
        let (slow, _slow_rx) = conn(1, 1);
        let (fast, fast_rx) = conn(2, 8);
        let (slow_closer, fast_closer) = (slow.closer.clone(), fast.closer.clone());
        drop(h.register("alice", slow));
        drop(h.register("bob", fast));
        for _ in 0..3 {
            h.dispatch(&record("gw-a", msg(), Some("alice,bob")));
        }
        assert_eq!(
            slow_closer.reason().map(|r| r.0),
            Some(close::SLOW_CONSUMER)
        );
        assert!(!fast_closer.is_closed());
        assert_eq!(std::iter::from_fn(|| fast_rx.pop_event()).count(), 3);
    }

    #[tokio::test]
    async fn results_and_routing_reach_their_connection() {
        let h = hub();
        let (a, rrx) = conn(1, 8);
        let session = a.session_id;
        let mut routed = h.register("alice", a.clone());
        let cmd = Uuid::new_v4();
        h.add_pending(cmd, a);
        let result = Body::CommandResult(CommandResult {
            command_event_id: cmd,
            outcome: CommandOutcome::Accepted,
            seq: Some(5),
            code: None,
            reason: None,
            event_partition: Some(3),
            event_offset: Some(41),
        });
        h.dispatch(&record("gw-a", result.clone(), None));
        assert!(matches!(rrx.pop_result(), Some(ResultMsg::Sequencer(r)) if r.seq == Some(5)));
        h.dispatch(&record("gw-a", result, None));
        assert!(rrx.pop_result().is_none(), "a result is delivered once");
        let body = Body::SessionRouted(SessionRouted {
            session_id: session,
            router_offsets: vec![3, 4],
        });
        h.dispatch(&record("gw-a", body.clone(), None));
        assert_eq!(routed.recv().await.unwrap(), vec![3, 4]);
        // Every router instance answers, and again after an assignment.
        h.dispatch(&record("gw-a", body, None));
        assert_eq!(routed.recv().await.unwrap(), vec![3, 4]);
        h.unregister("alice", 1, session);
        assert_eq!(h.connections_of("alice"), 0);
    }
}
