//! The session: the state of one connection and its one task's loop.
//!
//! [`Session::run`] waits, in one `select!`, for the socket to be readable
//! or writable, for the [`Mailbox`](crate::fanout::Mailbox) (live events
//! and command results from the hub), for the connection's read tasks
//! (`reads.rs`), its sync, a gap fill, the command being appended, and one
//! timer (idle, token expiry, ack timeouts, a stalled writer, the
//! `delivered` coalescing window). Handlers never wait: they queue frames
//! to the [`Writer`] or start a task. Owns the frame ordering: the
//! [`Cursor`] (each seq once, per chat in order, gaps filled from history
//! first), the read barrier's positions (`told`), and holding live events
//! while a sync or a gap fill runs.

use chat_projectors::store::MessageRow;
use chat_schemas::{Body, SessionOpened};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use uuid::Uuid;

use super::io::{self, FrameReader, Message, Outbound, Writer};
use super::reads::{ReadDone, SyncDone};
use super::send::{Coalescer, Pending};
use crate::config::ms;
use crate::fanout::{ConnHandle, LiveEvent, GONE};
use crate::protocol::{self, close, now_ms, About, ErrorCode, EventJson, FrameId, ServerFrame};
use crate::server::Shared;
use crate::sync::{self, Admit, ChatCatchUp, Cursor};

/// Why a handler stops the session (a close frame is queued or the
/// connection is closed).
#[derive(Debug)]
pub(super) struct Stop;

/// A produce of a command to `chat.commands` in flight: resolves to the
/// command id and the failure, if it failed.
pub(super) type Producing = Pin<Box<dyn Future<Output = (Uuid, Option<String>)> + Send>>;

/// A sync answer being written: rows go out as the writer takes them.
pub(super) struct SyncOut {
    pub id: FrameId,
    pub checkpoint: i64,
    pub truncated: Vec<Uuid>,
    pub full_resync: bool,
    pub chats: VecDeque<ChatCatchUp>,
    pub row: usize,
    pub sent: u64,
    pub started: Instant,
}

/// A live event waiting for the events before it (a gap) to be read.
pub(super) struct Gap {
    pub event: LiveEvent,
    pub task: JoinHandle<Option<Vec<MessageRow>>>,
}

pub(super) struct Session {
    pub shared: Arc<Shared>,
    pub user: String,
    pub device: String,
    pub session_id: Uuid,
    pub expires_at: u64,
    pub handle: ConnHandle,
    pub stream: TcpStream,
    pub reader: FrameReader,
    /// Client messages read but not handled yet (while a sync runs).
    pub messages: VecDeque<Message>,
    pub writer: Writer,
    /// Since when the writer has had bytes it could not write.
    pub write_stalled: Option<Instant>,
    /// The socket's read side is done (client close, error).
    pub read_closed: bool,
    /// The session is ending: only the writer runs, until this deadline.
    pub closing: Option<tokio::time::Instant>,
    pub pending: HashMap<Uuid, Pending>,
    /// Commands to append, in order, after the one in flight.
    pub to_produce: VecDeque<chat_schemas::Envelope>,
    pub producing: Option<Producing>,
    pub coalescer: Option<Box<Coalescer>>,
    pub cursor: Cursor,
    /// Live events flow (after the first sync).
    pub live: bool,
    /// The routers' `SessionRouted` answers, until the first sync merged
    /// an answer for every partition.
    pub routed: Option<(mpsc::UnboundedReceiver<Vec<u64>>, sync::RoutedFrom)>,
    pub opened_at: Instant,
    pub bad_in_row: u32,
    /// When the client last sent a frame or was last answered (ms).
    pub last_seen: i64,
    /// Chats this user was found a member of, and when (typing checks).
    pub members: HashMap<Uuid, Instant>,
    /// When this connection last sent `typing` per chat (rate limit).
    pub typing_at: HashMap<Uuid, Instant>,
    /// The `since` and chats of `sync` frames sent with `more: true`.
    pub sync_parts: Option<(Option<i64>, HashMap<Uuid, u64>)>,
    /// Per `chat.events` partition, the offset after the newest event this
    /// connection was told of (an `event` or `receipt` sent, a command
    /// acked). Reads wait until the history projector passed it, so an
    /// answer is never older than what the client already saw.
    pub told: HashMap<i32, i64>,
    /// Reads running (`reads.rs`), each its own task.
    pub reads: Option<JoinSet<ReadDone>>,
    pub syncing: Option<JoinHandle<SyncDone>>,
    pub sync_out: Option<Box<SyncOut>>,
    pub gap: Option<Box<Gap>>,
    /// The sequence number of the newest `watch` frame.
    pub watch_generation: u64,
}

/// Live events taken from the mailbox per turn of the loop at most (the
/// loop then writes and reads before taking more).
const EVENTS_PER_TURN: usize = 64;

impl Session {
    /// Produces SessionOpened and sends `hello`. False: the connection is closed.
    pub async fn open(&mut self) -> bool {
        let s = self.shared.clone();
        let env = s.session_envelope(
            &self.user,
            &self.device,
            Body::SessionOpened(SessionOpened {
                gateway_id: s.config.gateway_id.clone(),
                device_id: self.device.clone(),
                session_id: self.session_id,
                opened_at: now_ms(),
            }),
        );
        let produced = tokio::time::timeout(
            ms(s.config.timeouts.ack_ms),
            s.producer.send(&s.topics.sessions, &self.user, &env),
        )
        .await;
        if !matches!(produced, Ok(Ok(_))) {
            tracing::warn!(?produced, "SessionOpened not produced; closing");
            s.sessions_remove(self.session_id);
            self.frame(ServerFrame::error(
                None,
                ErrorCode::Unavailable,
                "the gateway cannot reach the log; retry later",
            ));
            self.close_with(close::TRY_AGAIN_LATER, "unavailable");
            return false;
        }
        self.opened_at = Instant::now();
        let l = &s.config.limits;
        let hello = ServerFrame::Hello {
            v: protocol::PROTOCOL_VERSION,
            user: self.user.clone(),
            device: self.device.clone(),
            gateway: s.config.gateway_id.clone(),
            session: self.session_id,
            limits: protocol::HelloLimits {
                max_frame_bytes: l.max_frame_bytes,
                max_text_bytes: l.max_text_bytes,
                max_history_limit: l.max_history_limit,
                max_group_members: l.max_group_members,
                max_pending_commands: l.max_pending_commands,
                send_rate_per_s: l.send_rate_per_s,
                send_burst: l.send_burst,
                idle_timeout_ms: s.config.timeouts.idle_ms,
                ack_timeout_ms: s.config.timeouts.ack_ms,
                heartbeat_interval_ms: s.config.timeouts.heartbeat_interval_ms,
                max_watched_chats: l.max_watched_chats,
                typing_interval_ms: l.typing_interval_ms,
                typing_ttl_ms: l.typing_ttl_ms,
                sync_chats_per_frame: protocol::sync_chats_per_frame(l.max_frame_bytes),
                max_sync_chats: protocol::MAX_SYNC_CHATS,
                max_concurrent_reads: l.max_concurrent_reads,
            },
        };
        tracing::info!("connection open");
        self.frame(hello);
        true
    }

    /// The loop: runs until the connection ends (its close frame written,
    /// or the peer gone).
    pub async fn run(&mut self) {
        let drain = self.shared.drain.clone();
        let closer = self.handle.closer.clone();
        let mailbox = self.handle.mailbox.clone();
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        loop {
            if self.closing.is_none() && self.pump().is_err() {
                self.stopping();
            }
            if let Some(deadline) = self.closing {
                if self.writer.is_empty() || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            let deadline = self.next_deadline();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let open = self.closing.is_none();
            let can_read = open && !self.read_closed && self.messages.is_empty();
            let wants_write = !self.writer.is_empty();
            let more = open && self.has_work();
            tokio::select! {
                biased;
                _ = closer.cancelled(), if open => {
                    if !self.closed_from_outside() {
                        break;
                    }
                }
                _ = drain.cancelled(), if open => {
                    self.frame(ServerFrame::Reconnect { reason: "draining" });
                    self.close_with(close::GOING_AWAY, "server draining");
                }
                r = self.stream.writable(), if wants_write => {
                    if r.is_err() || !self.write() {
                        closer.close(GONE, "write failed");
                        break;
                    }
                }
                r = self.stream.readable(), if can_read => {
                    if r.is_err() {
                        closer.close(GONE, "");
                        break;
                    }
                    if self.read().is_err() {
                        self.stopping();
                    }
                }
                () = std::future::ready(()), if more => {}
                _ = mailbox.notified(), if open => {}
                Some(done) = join_next(&mut self.reads), if open => {
                    if self.read_done(done).is_err() {
                        self.stopping();
                    }
                }
                done = join(&mut self.syncing), if open && self.syncing.is_some() => {
                    self.syncing = None;
                    if self.sync_done(done).is_err() {
                        self.stopping();
                    }
                }
                done = join_gap(&mut self.gap), if open && self.gap.is_some() => {
                    if self.gap_done(done).is_err() {
                        self.stopping();
                    }
                }
                (command_id, failure) = produced(&mut self.producing), if self.producing.is_some() => {
                    self.producing = None;
                    if let Some(message) = failure {
                        self.produce_failed(command_id, message);
                    }
                    self.produce_next();
                }
                () = &mut timer => {
                    if self.on_tick().is_err() {
                        self.stopping();
                    }
                }
            }
            if self.reads.as_ref().is_some_and(JoinSet::is_empty) {
                self.reads = None;
            }
        }
    }

    /// A handler stopped the session: unless a close frame is queued (or
    /// the connection was closed), close normally.
    fn stopping(&mut self) {
        if self.closing.is_some() {
            return;
        }
        if self.handle.closer.is_closed() {
            if !self.closed_from_outside() {
                self.closing = Some(tokio::time::Instant::now());
            }
            return;
        }
        self.close_with(close::NORMAL, "");
    }

    /// The closer fired (slow consumer, device revoked, a failed write,
    /// drain leftovers): the close frame goes out now, ahead of what is
    /// queued. False: the peer is gone, stop at once.
    fn closed_from_outside(&mut self) -> bool {
        let Some((code, reason)) = self.handle.closer.reason() else {
            return false;
        };
        if code == GONE {
            return false;
        }
        self.writer.clear_queue();
        self.writer.push(Outbound::Close(code, reason));
        self.closing = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        true
    }

    /// Ends the connection with a close frame sent after what is queued.
    pub fn close_with(&mut self, code: u16, reason: &str) {
        self.handle.closer.set_reason(code, reason);
        self.writer.push(Outbound::Close(code, reason.to_string()));
        if self.closing.is_none() {
            self.closing = Some(tokio::time::Instant::now() + Duration::from_secs(2));
        }
    }

    /// Writes what the socket takes. False: the write failed.
    fn write(&mut self) -> bool {
        match self.writer.write_some(&self.stream) {
            Ok(progress) => {
                if self.writer.is_empty() {
                    self.write_stalled = None;
                } else if progress || self.write_stalled.is_none() {
                    self.write_stalled = Some(Instant::now());
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Queues a frame for the socket.
    pub fn push(&mut self, item: Outbound, kind: &'static str) {
        if self.writer.is_empty() {
            self.write_stalled = Some(Instant::now());
        }
        self.writer.push(item);
        self.shared.metrics.frame_out(kind);
    }

    pub fn frame(&mut self, f: ServerFrame) {
        if let ServerFrame::Error { code, .. } = &f {
            if let Some(c) = ErrorCode::ALL.iter().find(|c| c.as_str() == *code) {
                self.shared.metrics.error(*c);
            }
        }
        let kind = f.kind();
        self.push(Outbound::Text(f.to_json()), kind);
    }

    pub fn error(&mut self, id: FrameId, code: ErrorCode, message: impl Into<String>) {
        self.error_about(id, code, message, About::default())
    }

    /// An `error` that repeats the chat and `client_msg_id` of the frame it
    /// answers.
    pub fn error_about(
        &mut self,
        id: FrameId,
        code: ErrorCode,
        message: impl Into<String>,
        about: About,
    ) {
        self.frame(ServerFrame::error_about(id, code, message, about))
    }

    /// Answers a bad frame; too many in a row close the connection.
    pub fn bad(
        &mut self,
        id: FrameId,
        code: ErrorCode,
        message: impl Into<String>,
        about: About,
    ) -> Result<(), Stop> {
        self.error_about(id, code, message, about);
        if code.is_client_fault() {
            self.bad_in_row += 1;
            if self.bad_in_row >= self.shared.config.limits.max_bad_frames {
                self.close_with(close::TOO_MANY_BAD_FRAMES, "too many bad frames");
                return Err(Stop);
            }
        }
        Ok(())
    }

    /// Whether the mailbox or the parsed messages have work the loop can
    /// do now.
    fn has_work(&self) -> bool {
        let room = self.writer.queued() < self.shared.config.limits.outbound_queue;
        (self.handle.mailbox.has_results())
            || (self.releasing() && room && self.handle.mailbox.has_events())
            || (self.sync_out.is_some() && room)
            || (!self.sync_running() && !self.messages.is_empty())
    }

    /// A sync is being read or its answer written: the client's next
    /// frames wait for its `synced`.
    fn sync_running(&self) -> bool {
        self.syncing.is_some() || self.sync_out.is_some()
    }

    /// Live events are released (not held by a sync or a gap fill).
    fn releasing(&self) -> bool {
        self.live && self.syncing.is_none() && self.sync_out.is_none() && self.gap.is_none()
    }

    /// Does the work that is ready: results, a sync answer's rows, live
    /// events (while the writer has room), client messages read earlier.
    fn pump(&mut self) -> Result<(), Stop> {
        while let Some(r) = self.handle.mailbox.pop_result() {
            self.on_result(r);
        }
        let cap = self.shared.config.limits.outbound_queue;
        if self.sync_out.is_some() {
            self.write_sync_rows(cap);
        }
        let mut taken = 0;
        while self.releasing() && self.writer.queued() < cap && taken < EVENTS_PER_TURN {
            let Some(e) = self.handle.mailbox.pop_event() else {
                break;
            };
            taken += 1;
            self.on_live(e);
        }
        while !self.sync_running() && self.closing.is_none() {
            let Some(m) = self.messages.pop_front() else {
                break;
            };
            self.on_message(m)?;
        }
        if self.messages.is_empty() && self.messages.capacity() > 0 {
            self.messages = VecDeque::new();
        }
        Ok(())
    }

    /// Reads what the socket has and handles the messages in it.
    fn read(&mut self) -> Result<(), Stop> {
        match io::read_some(&self.stream, &mut self.reader, &mut self.messages) {
            Ok(_) => {}
            Err((code, reason)) => {
                self.read_closed = true;
                tracing::debug!(code, reason, "read failed");
                // Messages before the failure are still handled.
                self.pump()?;
                if code == GONE {
                    self.handle.closer.close(GONE, "");
                } else {
                    self.handle.closer.set_reason(code, reason);
                    self.writer.clear_queue();
                    self.close_with(code, reason);
                }
                return Err(Stop);
            }
        }
        self.pump()
    }

    fn on_message(&mut self, m: Message) -> Result<(), Stop> {
        self.last_seen = now_ms();
        match m {
            Message::Ping(payload) => {
                // A WebSocket-level pong: not a protocol frame (no metric).
                if self.writer.is_empty() {
                    self.write_stalled = Some(Instant::now());
                }
                self.writer.push(Outbound::Pong(payload));
                Ok(())
            }
            Message::Pong => Ok(()),
            Message::Close(code) => {
                self.read_closed = true;
                let echo = code
                    .filter(|c| matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999))
                    .unwrap_or(close::NORMAL);
                self.handle.closer.set_reason(close::NORMAL, "");
                self.close_with(echo, "");
                Err(Stop)
            }
            Message::Binary => {
                self.shared.metrics.frame_in("binary");
                self.bad(
                    None,
                    ErrorCode::BadFrame,
                    "binary frames are not used; send JSON text",
                    About::default(),
                )
            }
            Message::Text(text) => {
                let l = &self.shared.config.limits;
                let limits = protocol::ParseLimits {
                    max_watched_chats: l.max_watched_chats,
                    max_text_bytes: l.max_text_bytes,
                    max_history_limit: l.max_history_limit,
                    max_group_members: l.max_group_members,
                    sync_chats_per_frame: protocol::sync_chats_per_frame(l.max_frame_bytes),
                };
                let (id, parsed) = protocol::parse(&text, &limits);
                match parsed {
                    Err(e) => {
                        self.shared.metrics.frame_in("invalid");
                        self.bad(id, e.code, e.message, e.about)
                    }
                    Ok(frame) => {
                        self.shared.metrics.frame_in(frame.kind());
                        self.bad_in_row = 0;
                        self.on_frame(id, frame)
                    }
                }
            }
        }
    }

    /// The timer: the next moment something is due.
    fn next_deadline(&self) -> tokio::time::Instant {
        let now = Instant::now();
        let t = &self.shared.config.timeouts;
        let mut at = now + Duration::from_secs(3600);
        if t.idle_ms > 0 && !self.sync_running() {
            let idle_for = (now_ms() - self.last_seen).max(0) as u64;
            at = at.min(now + ms(t.idle_ms.saturating_sub(idle_for) + 1));
        }
        let leeway = self.shared.config.auth.leeway_s;
        let exp =
            std::time::UNIX_EPOCH + Duration::from_secs(self.expires_at.saturating_add(leeway));
        let until_exp = exp
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        at = at.min(now + until_exp);
        let ack = ms(t.ack_ms);
        if let Some(first) = self.pending.values().map(|p| p.started).min() {
            at = at.min(first + ack);
        }
        if let Some(stalled) = self.write_stalled {
            at = at.min(stalled + ms(t.slow_consumer_ms));
        }
        if let Some(c) = &self.coalescer {
            if let Some(d) = c.next_due() {
                at = at.min(d);
            }
        }
        if let Some(d) = self.closing {
            at = at.min(d.into_std());
        }
        tokio::time::Instant::from_std(at)
    }

    fn on_tick(&mut self) -> Result<(), Stop> {
        let t = &self.shared.config.timeouts;
        if t.idle_ms > 0
            && !self.sync_running()
            && now_ms() - self.last_seen > i64::try_from(t.idle_ms).unwrap_or(i64::MAX)
        {
            self.close_with(close::IDLE, "idle");
            return Err(Stop);
        }
        let leeway = self.shared.config.auth.leeway_s;
        let exp =
            std::time::UNIX_EPOCH + Duration::from_secs(self.expires_at.saturating_add(leeway));
        if std::time::SystemTime::now() >= exp {
            self.close_with(close::AUTH_EXPIRED, "token expired");
            return Err(Stop);
        }
        if self
            .write_stalled
            .is_some_and(|s| s.elapsed() >= ms(t.slow_consumer_ms))
            && !self.writer.is_empty()
        {
            self.handle
                .closer
                .close(close::SLOW_CONSUMER, "client does not read");
            return Ok(());
        }
        self.expire_pending();
        self.flush_coalesced(false);
        Ok(())
    }

    /// Records that the client was told of the `chat.events` record at
    /// `position`.
    pub fn tell(&mut self, position: Option<(i32, i64)>) {
        if let Some((partition, offset)) = position {
            let next = self.told.entry(partition).or_insert(offset + 1);
            *next = (*next).max(offset + 1);
        }
    }

    /// Requires reads to wait for `positions` (`partition -> next offset`).
    pub fn tell_all(&mut self, positions: &HashMap<i32, i64>) {
        for (p, next) in positions {
            if *next > 0 {
                self.tell(Some((*p, next - 1)));
            }
        }
    }

    fn on_live(&mut self, e: LiveEvent) {
        let Some(seq) = e.seq else {
            self.push(Outbound::Shared(e.frame), "event");
            self.tell(e.position);
            return;
        };
        match self.cursor.admit(e.chat, seq) {
            Admit::Duplicate => {
                self.shared.metrics.live_duplicates_dropped.inc();
            }
            Admit::Send => {
                self.push(Outbound::Shared(e.frame), "event");
                self.cursor.advance(e.chat, seq);
                self.tell(e.position);
            }
            Admit::Gap { after, before } => {
                // Live events wait until the missing ones are read (the
                // order of a chat is the promise); everything else goes on.
                self.shared.metrics.gap_fills.inc();
                let task = tokio::spawn(fill_gap(
                    self.shared.clone(),
                    e.chat,
                    e.position,
                    after,
                    before,
                ));
                self.gap = Some(Box::new(Gap { event: e, task }));
            }
        }
    }

    fn gap_done(&mut self, rows: Option<Vec<MessageRow>>) -> Result<(), Stop> {
        let Some(gap) = self.gap.take() else {
            return Ok(());
        };
        let e = gap.event;
        let Some(rows) = rows else {
            // Never step over a hole: the client would record the later
            // seq and its next sync would start after it.
            tracing::warn!(chat = %e.chat, "gap not readable from history; closing so the client syncs");
            self.close_with(
                close::TRY_AGAIN_LATER,
                "cannot deliver a chat in order now; reconnect and sync",
            );
            return Err(Stop);
        };
        self.send_rows(e.chat, &rows);
        self.on_live(e);
        Ok(())
    }

    /// Sends the rows of `chat` the connection does not have yet (in seq
    /// order), advancing the cursor; returns how many were sent.
    fn send_rows(&mut self, chat: Uuid, rows: &[MessageRow]) -> u64 {
        let mut sent = 0;
        for row in rows {
            if self.cursor.last(chat).is_some_and(|l| row.seq <= l) {
                continue;
            }
            self.push(Outbound::Text(EventJson::from_row(row).frame()), "event");
            self.cursor.advance(chat, row.seq);
            sent += 1;
        }
        sent
    }

    /// Writes the rows of the sync answer while the writer has room; then
    /// `synced`, and live events flow.
    fn write_sync_rows(&mut self, cap: usize) {
        let Some(mut out) = self.sync_out.take() else {
            return;
        };
        while self.writer.queued() < cap {
            let Some(chat) = out.chats.front() else {
                break;
            };
            let (id, head) = (chat.chat, chat.head);
            let last = self.cursor.last(id);
            let row = chat.events.get(out.row).map(|r| {
                let fresh = last.is_none_or(|l| r.seq > l);
                (r.seq, fresh.then(|| EventJson::from_row(r).frame()))
            });
            match row {
                Some((seq, frame)) => {
                    out.row += 1;
                    if let Some(frame) = frame {
                        self.push(Outbound::Text(frame), "event");
                        self.cursor.advance(id, seq);
                        out.sent += 1;
                    }
                }
                None => {
                    self.cursor.advance(id, head);
                    out.chats.pop_front();
                    out.row = 0;
                }
            }
        }
        if !out.chats.is_empty() {
            self.sync_out = Some(out);
            return;
        }
        self.shared.metrics.sync_events.inc_by(out.sent);
        self.frame(ServerFrame::Synced {
            id: out.id,
            checkpoint: out.checkpoint,
            truncated: out.truncated,
            full_resync: out.full_resync,
        });
        self.shared
            .metrics
            .sync_duration
            .observe(out.started.elapsed().as_secs_f64());
        self.live = true;
        self.last_seen = now_ms();
    }
}

/// Reads the events of `chat` strictly between `after` and `before`. If
/// history does not have them all yet, waits until the projector passed
/// the live event's position (every earlier event of its partition is then
/// written) and reads again. None: they could not be read (store down, or a
/// gap beyond `sync_max_events_per_chat`).
async fn fill_gap(
    shared: Arc<Shared>,
    chat: Uuid,
    position: Option<(i32, i64)>,
    after: u64,
    before: u64,
) -> Option<Vec<MessageRow>> {
    let max = shared.config.limits.sync_max_events_per_chat;
    let history = shared.history.clone();
    for attempt in 0..2 {
        if attempt == 1 {
            let (partition, offset) = position?;
            let want = HashMap::from([(partition, offset)]);
            let timeout = ms(shared.config.timeouts.sync_progress_ms);
            if !shared
                .projected
                .wait_for(history.as_ref(), &want, timeout)
                .await
            {
                return None;
            }
        }
        let rows = match sync::read_gap(history.as_ref(), chat, after, before, max).await {
            Ok(rows) => rows,
            Err(err) => {
                tracing::warn!(error = %err, %chat, "gap fill failed");
                continue;
            }
        };
        let complete = rows.len() as u64 == before - after - 1
            && rows.iter().zip(after + 1..).all(|(r, seq)| r.seq == seq);
        if complete {
            return Some(rows);
        }
    }
    None
}

async fn join_next<T: 'static>(set: &mut Option<JoinSet<T>>) -> Option<Result<T, JoinError>> {
    match set {
        Some(s) if !s.is_empty() => s.join_next().await,
        _ => std::future::pending().await,
    }
}

async fn join<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn join_gap(g: &mut Option<Box<Gap>>) -> Option<Vec<MessageRow>> {
    match g {
        Some(g) => (&mut g.task).await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn produced(p: &mut Option<Producing>) -> (Uuid, Option<String>) {
    match p {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
