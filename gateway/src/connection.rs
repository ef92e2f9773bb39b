//! One client connection, from the authenticated upgrade to the last
//! `SessionClosed`.
//!
//! Three tasks per connection, joined by bounded channels:
//! - the reader parses WebSocket frames (fragments reassembled up to
//!   `limits.max_frame_bytes`, UTF-8 checked) and passes whole text
//!   messages to the session; protocol violations close the connection;
//! - the writer writes the outbound queue to the socket;
//! - the session (this module's [`Session`]) parses client frames, produces
//!   commands, tracks their acks, runs sync and history reads, and releases
//!   live events through the sync cursor.
//!
//! Whatever ends the connection (client close, slow consumer, bad frames,
//! expired token, drain, a panic), [`serve`] cleans up: unregisters from the
//! hub, produces `SessionClosed`, closes the socket.

use chat_log::HEADER_GATEWAY_ID;
use chat_projectors::store::MessageRow;
use chat_schemas::{
    Body, ChatCreated, ChatKind, ChatMember, CommandOutcome, Envelope, MemberAdded, MemberRemoved,
    MemberRoleChanged, MessageKind, MessageSent, RemovalReason, Role, SessionClosed, SessionOpened,
};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use futures::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::Identity;
use crate::config::ms;
use crate::fanout::{Closer, ConnHandle, LiveEvent, ResultMsg, GONE};
use crate::masking::{MaskCheck, Unmasked};
use crate::metrics::TypeLabel;
use crate::protocol::{
    self, close, now_ms, About, ClientFrame, ErrorCode, EventJson, FrameId, ServerFrame,
};
use crate::server::Shared;
use crate::sync::{self, Admit, Cursor};

type Io = TokioIo<Upgraded>;
type WsRead = fastwebsockets::WebSocketRead<SharedRead>;
type WsWrite = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<Io>>;

/// The socket's read half, shared between the frame reader and the
/// lingering close (which reads and discards what the client still sends,
/// so closing the socket does not reset it before our close frame arrives).
/// Every byte read passes the [`MaskCheck`]: an unmasked client frame ends
/// the stream with an [`Unmasked`] error (closed with 1002).
#[derive(Clone)]
struct SharedRead(Arc<std::sync::Mutex<(tokio::io::ReadHalf<Io>, MaskCheck)>>);

impl tokio::io::AsyncRead for SharedRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let Ok(mut guard) = self.0.lock() else {
            return Poll::Ready(Err(std::io::Error::other("read half poisoned")));
        };
        let (read, check) = &mut *guard;
        let before = buf.filled().len();
        match std::pin::Pin::new(read).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => match check.feed(&buf.filled()[before..]) {
                Ok(()) => Poll::Ready(Ok(())),
                Err(e) => Poll::Ready(Err(std::io::Error::other(e))),
            },
            other => other,
        }
    }
}

/// Reads and discards until EOF, at most `limit` bytes or `wait`.
async fn linger(read: SharedRead, wait: Duration, limit: usize) {
    use tokio::io::AsyncReadExt;
    let mut read = read;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0;
    let _ = tokio::time::timeout(wait, async {
        while total < limit {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// What the session sends to the writer.
#[derive(Debug)]
enum Outbound {
    Text(String),
    Shared(Arc<str>),
    Pong(Vec<u8>),
    Close(u16, String),
}

/// What the reader passes to the session.
#[derive(Debug)]
enum Inbound {
    Text(String),
    Binary,
    Close(Option<u16>),
}

/// Runs one upgraded connection to its end. Never panics to its caller.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    who: Identity,
    device: String,
) {
    let session_id = Uuid::new_v4();
    let span =
        tracing::info_span!("conn", user = %who.user, device = %device, session = %session_id);
    async move {
        let ws = match tokio::time::timeout(ms(shared.config.timeouts.upgrade_ms), upgrade).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
            Err(_) => {
                shared.metrics.rejected("upgrade_timeout");
                tracing::debug!("upgrade did not complete in time");
                return;
            }
        };
        let mut ws = ws;
        ws.set_auto_close(false);
        ws.set_auto_pong(true);
        ws.set_writev(false);
        // fastwebsockets refuses a frame whose payload is >= this.
        ws.set_max_message_size(shared.config.limits.max_frame_bytes + 1);
        let slot = std::sync::OnceLock::new();
        let (rd, wr) = ws.split(|io| {
            let (r, w) = tokio::io::split(io);
            let r = SharedRead(Arc::new(std::sync::Mutex::new((r, MaskCheck::default()))));
            let _ = slot.set(r.clone());
            (r, w)
        });
        let Some(raw) = slot.into_inner() else { return };
        run(shared, rd, wr, raw, who, device, session_id).await;
    }
    .instrument(span)
    .await
}

async fn run(
    shared: Arc<Shared>,
    rd: WsRead,
    wr: WsWrite,
    raw: SharedRead,
    who: Identity,
    device: String,
    session_id: Uuid,
) {
    let limits = &shared.config.limits;
    let conn_id = shared.next_conn_id();
    let closer = Closer::new();
    let (out_tx, out_rx) = mpsc::channel::<Outbound>(limits.outbound_queue);
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(16);
    let (ev_tx, ev_rx) = mpsc::channel::<LiveEvent>(limits.outbound_queue);
    let (res_tx, res_rx) = mpsc::channel::<ResultMsg>(limits.max_pending_commands * 2 + 8);
    let (cmd_tx, cmd_rx) = mpsc::channel::<Envelope>(limits.max_pending_commands);
    let last_seen = Arc::new(AtomicI64::new(now_ms()));

    shared.metrics.connections.inc();
    let writer = tokio::spawn(
        guarded(closer.clone(), write_loop(wr, out_rx, closer.clone())).in_current_span(),
    );
    let reader = tokio::spawn(
        guarded(
            closer.clone(),
            read_loop(
                rd,
                in_tx,
                out_tx.clone(),
                closer.clone(),
                limits.max_frame_bytes,
                limits.max_fragments,
                last_seen.clone(),
            ),
        )
        .in_current_span(),
    );
    let producer =
        tokio::spawn(command_pipeline(shared.clone(), cmd_rx, res_tx.clone()).in_current_span());

    let handle = ConnHandle {
        conn_id,
        session_id,
        device: device.clone(),
        watching: Arc::default(),
        events: ev_tx,
        results: res_tx,
        closer: closer.clone(),
    };
    // Buffer live events for this user from now on, before SessionOpened.
    let routed = shared.hub.register(&who.user, handle.clone());
    shared.sessions_insert(session_id, &who.user, &device, closer.clone());

    let mut session = Session {
        shared: shared.clone(),
        user: who.user.clone(),
        device: device.clone(),
        session_id,
        expires_at: who.expires_at,
        handle,
        closer: closer.clone(),
        out: out_tx.clone(),
        cmd_tx,
        pending: HashMap::new(),
        cursor: Cursor::default(),
        live: false,
        routed: Some((
            routed,
            sync::RoutedFrom::new(
                usize::try_from(shared.config.log.chat_partitions).unwrap_or_default(),
            ),
        )),
        opened_at: Instant::now(),
        bad_in_row: 0,
        last_seen,
        members: HashMap::new(),
        typing_at: HashMap::new(),
        sync_parts: None,
        told: HashMap::new(),
    };
    let outcome = AssertUnwindSafe(async {
        if session.open().await {
            session.run(in_rx, ev_rx, res_rx).await;
        }
    })
    .catch_unwind()
    .await;
    if outcome.is_err() {
        shared.metrics.connection_panics.inc();
        tracing::error!("connection task panicked; closing it");
        closer.close(close::INTERNAL, "internal error");
    }
    drop(session);
    shared.hub.unregister(&who.user, conn_id, session_id);
    // The session is over. Unless it was aborted, a close frame is queued
    // behind the last frames: let the writer send them, then stop the rest.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    closer.close(close::NORMAL, "");
    let (code, reason) = closer.reason().unwrap_or((close::NORMAL, String::new()));
    if code != GONE && code != close::NORMAL {
        shared
            .metrics
            .closes
            .get_or_create(&crate::metrics::CloseLabel { code })
            .inc();
    }
    reader.abort();
    producer.abort();
    let _ = reader.await;
    // The session is over for the platform now (presence goes offline without
    // waiting for a dead peer's socket to linger).
    if shared.sessions_remove(session_id).is_some() {
        shared
            .produce_session_closed(&who.user, &device, session_id, close_reason(code, &reason))
            .await;
    }
    if code != GONE {
        // Let our close frame reach the client before the socket goes.
        linger(
            raw,
            Duration::from_secs(1),
            shared.config.limits.max_frame_bytes * 4,
        )
        .await;
    }
    shared.metrics.connections.dec();
    tracing::info!(code, reason = %reason, "connection closed");
}

/// Runs a connection task; a panic in it closes the connection with 1011
/// instead of leaving the other tasks waiting.
async fn guarded(closer: Closer, task: impl std::future::Future<Output = ()>) {
    if AssertUnwindSafe(task).catch_unwind().await.is_err() {
        tracing::error!("connection task panicked; closing it");
        closer.close(close::INTERNAL, "internal error");
    }
}

fn close_reason(code: u16, reason: &str) -> String {
    let what = match code {
        close::NORMAL => "client_closed",
        GONE => "connection_lost",
        close::GOING_AWAY => "shutdown",
        close::AUTH_EXPIRED => "auth_expired",
        close::IDLE => "idle",
        close::SLOW_CONSUMER => "slow_consumer",
        close::TOO_MANY_BAD_FRAMES => "bad_frames",
        close::TOO_BIG => "too_big",
        close::INVALID_PAYLOAD | close::PROTOCOL_ERROR => "protocol_error",
        close::TRY_AGAIN_LATER => "unavailable",
        _ => "error",
    };
    if reason.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {reason}")
    }
}

/// Writes the outbound queue until it ends or the connection is closed.
async fn write_loop(mut wr: WsWrite, mut rx: mpsc::Receiver<Outbound>, closer: Closer) {
    let mut close_sent = false;
    loop {
        let item = tokio::select! {
            biased;
            _ = closer.cancelled() => None,
            m = rx.recv() => m,
        };
        let Some(item) = item else { break };
        let frame = match &item {
            Outbound::Text(s) => Frame::text(Payload::Borrowed(s.as_bytes())),
            Outbound::Shared(s) => Frame::text(Payload::Borrowed(s.as_bytes())),
            Outbound::Pong(p) => Frame::pong(Payload::Borrowed(p)),
            Outbound::Close(code, reason) => Frame::close(*code, reason.as_bytes()),
        };
        let is_close = matches!(item, Outbound::Close(..));
        let written = tokio::select! {
            biased;
            _ = closer.cancelled(), if !is_close => break,
            r = wr.write_frame(frame) => r,
        };
        if written.is_err() {
            closer.close(GONE, "write failed");
            return;
        }
        if is_close {
            close_sent = true;
            break;
        }
    }
    if !close_sent {
        if let Some((code, reason)) = closer.reason() {
            if code != GONE {
                let frame = Frame::close(code, reason.as_bytes());
                let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_frame(frame)).await;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.flush()).await;
}

/// An error reading frames, as the close code to answer with.
fn read_error_code(e: &WebSocketError) -> u16 {
    match e {
        WebSocketError::FrameTooLarge => close::TOO_BIG,
        WebSocketError::InvalidUTF8 => close::INVALID_PAYLOAD,
        WebSocketError::IoError(io) if io.get_ref().is_some_and(|e| e.is::<Unmasked>()) => {
            close::PROTOCOL_ERROR
        }
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => GONE,
        _ => close::PROTOCOL_ERROR,
    }
}

/// Reads frames; reassembles fragmented messages within the size limit.
async fn read_loop(
    mut rd: WsRead,
    tx: mpsc::Sender<Inbound>,
    out: mpsc::Sender<Outbound>,
    closer: Closer,
    max_bytes: usize,
    max_fragments: usize,
    last_seen: Arc<AtomicI64>,
) {
    // (opcode, bytes, fragments) of a message being reassembled.
    let mut partial: Option<(OpCode, Vec<u8>, usize)> = None;
    loop {
        let mut obligated = |f: Frame<'_>| {
            // Pongs to pings: best effort, never blocks the reader. A ping
            // is activity too.
            last_seen.store(now_ms(), Ordering::Relaxed);
            let _ = out.try_send(Outbound::Pong(f.payload.to_vec()));
            std::future::ready(Ok::<(), std::io::Error>(()))
        };
        let frame = tokio::select! {
            _ = closer.cancelled() => return,
            f = rd.read_frame(&mut obligated) => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let code = read_error_code(&e);
                tracing::debug!(error = %e, code, "read failed");
                closer.close(code, if code == GONE { "" } else { "invalid frame" });
                return;
            }
        };
        last_seen.store(now_ms(), Ordering::Relaxed);
        let message = match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if partial.is_some() {
                    closer.close(close::PROTOCOL_ERROR, "new message inside a fragmented one");
                    return;
                }
                if frame.fin {
                    Some((frame.opcode, frame.payload.to_vec()))
                } else {
                    partial = Some((frame.opcode, frame.payload.to_vec(), 1));
                    None
                }
            }
            OpCode::Continuation => {
                let Some((op, mut bytes, n)) = partial.take() else {
                    closer.close(close::PROTOCOL_ERROR, "continuation without a message");
                    return;
                };
                if bytes.len() + frame.payload.len() > max_bytes || n + 1 > max_fragments {
                    closer.close(close::TOO_BIG, "message too big");
                    return;
                }
                bytes.extend_from_slice(&frame.payload);
                if frame.fin {
                    Some((op, bytes))
                } else {
                    partial = Some((op, bytes, n + 1));
                    None
                }
            }
            OpCode::Close => {
                let code = (frame.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                let _ = tx.send(Inbound::Close(code)).await;
                return;
            }
            OpCode::Ping | OpCode::Pong => None,
        };
        let Some((op, bytes)) = message else { continue };
        let inbound = if op == OpCode::Text {
            match String::from_utf8(bytes) {
                Ok(s) => Inbound::Text(s),
                Err(_) => {
                    closer.close(close::INVALID_PAYLOAD, "text is not UTF-8");
                    return;
                }
            }
        } else {
            Inbound::Binary
        };
        let sent = tokio::select! {
            _ = closer.cancelled() => return,
            r = tx.send(inbound) => r,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Appends the connection's commands to `chat.commands` in order.
async fn command_pipeline(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Envelope>,
    results: mpsc::Sender<ResultMsg>,
) {
    let gateway = shared.config.gateway_id.clone();
    let timeout = ms(shared.config.timeouts.ack_ms);
    while let Some(env) = rx.recv().await {
        let key = env.chat_id.map(|c| c.to_string()).unwrap_or_default();
        let span = tracing::info_span!("command", kind = env.body.kind(), chat = %key, trace_id = %env.trace_id, command = %env.event_id);
        let sent = tokio::time::timeout(
            timeout,
            shared.producer.send_with(
                &shared.topics.commands,
                None,
                &key,
                &env,
                &[(HEADER_GATEWAY_ID, gateway.as_bytes())],
            ),
        )
        .instrument(span.clone())
        .await;
        let failure = match sent {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out appending the command".to_string()),
        };
        if let Some(message) = failure {
            span.in_scope(|| tracing::warn!(%message, "command not produced"));
            let _ = results
                .send(ResultMsg::ProduceFailed {
                    command_id: env.event_id,
                    message,
                })
                .await;
        }
    }
}

/// A command waiting for its result.
#[derive(Debug)]
struct Pending {
    id: FrameId,
    chat: Uuid,
    client_msg_id: Option<String>,
    server_ts: i64,
    started: Instant,
    trace_id: String,
}

/// Why the session loop stops.
#[derive(Debug)]
struct Stop;

struct Session {
    shared: Arc<Shared>,
    user: String,
    device: String,
    session_id: Uuid,
    expires_at: u64,
    handle: ConnHandle,
    closer: Closer,
    out: mpsc::Sender<Outbound>,
    cmd_tx: mpsc::Sender<Envelope>,
    pending: HashMap<Uuid, Pending>,
    cursor: Cursor,
    /// Live events flow (after the first sync).
    live: bool,
    /// The routers' `SessionRouted` answers, until the first sync merged
    /// an answer for every partition.
    routed: Option<(mpsc::UnboundedReceiver<Vec<u64>>, sync::RoutedFrom)>,
    opened_at: Instant,
    bad_in_row: u32,
    last_seen: Arc<AtomicI64>,
    /// Chats this user was found a member of, and when (typing checks).
    members: HashMap<Uuid, Instant>,
    /// When this connection last sent `typing` per chat (rate limit).
    typing_at: HashMap<Uuid, Instant>,
    /// The `since` and chats of `sync` frames sent with `more: true`, until
    /// the frame that completes the sync.
    sync_parts: Option<(Option<i64>, HashMap<Uuid, u64>)>,
    /// Per `chat.events` partition, the offset after the newest event this
    /// connection was told of (an `event` or `receipt` sent, a command
    /// acked). Reads wait until the history projector passed it
    /// ([`Session::consistent`]), so an answer is never older than what the
    /// client already saw.
    told: HashMap<i32, i64>,
}

/// The answer to a query frame, or the error code and message to send.
type Answer = Result<ServerFrame, (ErrorCode, String)>;

/// How long a membership check answers `typing` without a new read.
const MEMBER_CACHE: Duration = Duration::from_secs(30);

impl Session {
    /// Produces SessionOpened and sends `hello`. False: the connection is closed.
    async fn open(&mut self) -> bool {
        let s = &self.shared;
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
            let _ = self
                .frame(ServerFrame::error(
                    None,
                    ErrorCode::Unavailable,
                    "the gateway cannot reach the log; retry later",
                ))
                .await;
            self.closer
                .set_reason(close::TRY_AGAIN_LATER, "unavailable");
            if self
                .out
                .try_send(Outbound::Close(
                    close::TRY_AGAIN_LATER,
                    "unavailable".into(),
                ))
                .is_err()
            {
                self.closer.close(close::TRY_AGAIN_LATER, "unavailable");
            }
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
            },
        };
        tracing::info!("connection open");
        self.frame(hello).await.is_ok()
    }

    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut events: mpsc::Receiver<LiveEvent>,
        mut results: mpsc::Receiver<ResultMsg>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Tokens are accepted up to `leeway_s` after `exp`; the connection too.
        let leeway = self.shared.config.auth.leeway_s;
        let exp =
            std::time::UNIX_EPOCH + Duration::from_secs(self.expires_at.saturating_add(leeway));
        let until_exp = exp
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let expiry = tokio::time::sleep(until_exp);
        tokio::pin!(expiry);
        let drain = self.shared.drain.clone();
        loop {
            let step = tokio::select! {
                biased;
                _ = self.closer.cancelled() => Err(Stop),
                _ = drain.cancelled() => {
                    let _ = self.frame(ServerFrame::Reconnect { reason: "draining" }).await;
                    self.close_with(close::GOING_AWAY, "server draining").await;
                    Err(Stop)
                }
                Some(r) = results.recv() => self.on_result(r).await,
                m = inbound.recv() => match m {
                    Some(m) => self.on_inbound(m).await,
                    None => Err(Stop),
                },
                Some(e) = events.recv(), if self.live => self.on_live(e).await,
                _ = tick.tick() => self.on_tick().await,
                _ = &mut expiry => {
                    self.close_with(close::AUTH_EXPIRED, "token expired").await;
                    Err(Stop)
                }
            };
            if step.is_err() {
                break;
            }
        }
    }

    /// Ends the connection with a close frame sent after what is queued.
    async fn close_with(&mut self, code: u16, reason: &str) {
        self.closer.set_reason(code, reason);
        let queued = tokio::time::timeout(
            Duration::from_millis(500),
            self.out.send(Outbound::Close(code, reason.to_string())),
        )
        .await;
        if !matches!(queued, Ok(Ok(()))) {
            self.closer.close(code, reason);
        }
    }

    /// Queues a text frame; a client that does not read for
    /// `slow_consumer_ms` is closed with 4008.
    async fn send_text(&self, item: Outbound, kind: &'static str) -> Result<(), Stop> {
        let wait = ms(self.shared.config.timeouts.slow_consumer_ms);
        match self.out.send_timeout(item, wait).await {
            Ok(()) => {
                self.shared.metrics.frame_out(kind);
                Ok(())
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.closer
                    .close(close::SLOW_CONSUMER, "client does not read");
                Err(Stop)
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Stop),
        }
    }

    async fn frame(&self, f: ServerFrame) -> Result<(), Stop> {
        if let ServerFrame::Error { code, .. } = &f {
            if let Some(c) = ErrorCode::ALL.iter().find(|c| c.as_str() == *code) {
                self.shared.metrics.error(*c);
            }
        }
        let kind = f.kind();
        self.send_text(Outbound::Text(f.to_json()), kind).await
    }

    async fn error(
        &self,
        id: FrameId,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Result<(), Stop> {
        self.error_about(id, code, message, About::default()).await
    }

    /// An `error` that repeats the chat and `client_msg_id` of the frame it
    /// answers.
    async fn error_about(
        &self,
        id: FrameId,
        code: ErrorCode,
        message: impl Into<String>,
        about: About,
    ) -> Result<(), Stop> {
        self.frame(ServerFrame::error_about(id, code, message, about))
            .await
    }

    async fn on_inbound(&mut self, m: Inbound) -> Result<(), Stop> {
        match m {
            Inbound::Close(code) => {
                let echo = code
                    .filter(|c| matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999))
                    .unwrap_or(close::NORMAL);
                self.closer.set_reason(close::NORMAL, "");
                self.close_with(echo, "").await;
                Err(Stop)
            }
            Inbound::Binary => {
                self.shared.metrics.frame_in("binary");
                self.bad(
                    None,
                    ErrorCode::BadFrame,
                    "binary frames are not used; send JSON text",
                    About::default(),
                )
                .await
            }
            Inbound::Text(text) => {
                let limits = protocol::ParseLimits {
                    max_watched_chats: self.shared.config.limits.max_watched_chats,
                    max_text_bytes: self.shared.config.limits.max_text_bytes,
                    max_history_limit: self.shared.config.limits.max_history_limit,
                    max_group_members: self.shared.config.limits.max_group_members,
                    sync_chats_per_frame: protocol::sync_chats_per_frame(
                        self.shared.config.limits.max_frame_bytes,
                    ),
                };
                let (id, parsed) = protocol::parse(&text, &limits);
                match parsed {
                    Err(e) => {
                        self.shared.metrics.frame_in("invalid");
                        self.bad(id, e.code, e.message, e.about).await
                    }
                    Ok(frame) => {
                        self.shared.metrics.frame_in(frame.kind());
                        self.bad_in_row = 0;
                        let answered = self.on_frame(id, frame).await;
                        // The heartbeat TTL measures the client's silence, not
                        // the time the gateway took to answer (a first sync
                        // can wait seconds for the router and the projector).
                        self.last_seen.store(now_ms(), Ordering::Relaxed);
                        answered
                    }
                }
            }
        }
    }

    /// Answers a bad frame; too many in a row close the connection.
    async fn bad(
        &mut self,
        id: FrameId,
        code: ErrorCode,
        message: impl Into<String>,
        about: About,
    ) -> Result<(), Stop> {
        self.error_about(id, code, message, about).await?;
        if code.is_client_fault() {
            self.bad_in_row += 1;
            if self.bad_in_row >= self.shared.config.limits.max_bad_frames {
                self.close_with(close::TOO_MANY_BAD_FRAMES, "too many bad frames")
                    .await;
                return Err(Stop);
            }
        }
        Ok(())
    }

    async fn on_frame(&mut self, id: FrameId, frame: ClientFrame) -> Result<(), Stop> {
        match frame {
            ClientFrame::Ping => self.frame(ServerFrame::Pong { id, ts: now_ms() }).await,
            ClientFrame::Sync { since, chats, more } => {
                self.on_sync_part(id, since, chats, more).await
            }
            ClientFrame::History {
                chat,
                before,
                after,
                limit,
            } => {
                if let Err((code, message)) = self.consistent().await {
                    return self.error_about(id, code, message, About::chat(chat)).await;
                }
                let page = sync::history_page(
                    self.shared.history.as_ref(),
                    &self.user,
                    chat,
                    before,
                    after,
                    limit,
                )
                .await;
                match page {
                    Ok((events, has_more)) => {
                        self.frame(ServerFrame::History {
                            id,
                            chat,
                            events,
                            has_more,
                        })
                        .await
                    }
                    Err((code, message)) => {
                        self.error_about(id, code, message, About::chat(chat)).await
                    }
                }
            }
            ClientFrame::Chats => {
                if let Err((code, message)) = self.consistent().await {
                    return self.error(id, code, message).await;
                }
                match sync::chat_list(self.shared.history.as_ref(), &self.user).await {
                    Ok(chats) => {
                        let unread_total = chats.iter().map(|c| c.unread).sum();
                        self.frame(ServerFrame::Chats {
                            id,
                            chats,
                            unread_total,
                        })
                        .await
                    }
                    Err(e) => {
                        let (code, message) = sync::store_error(&e);
                        self.error(id, code, message).await
                    }
                }
            }
            ClientFrame::Watch { chats } => {
                let answer = self.watch(chats).await;
                self.reply(id, answer).await
            }
            ClientFrame::Typing { chat, active } => self.on_typing(id, chat, active).await,
            ClientFrame::Receipts { chat } => {
                let answer = self.receipts(chat).await;
                self.reply_about(id, answer, About::chat(chat)).await
            }
            ClientFrame::Devices => {
                let answer = self.devices().await;
                self.reply(id, answer).await
            }
            ClientFrame::RevokeDevice { device } => {
                let body = Body::DeviceRevoked(chat_schemas::DeviceRevoked {
                    device_id: device,
                    revoked_at: now_ms(),
                });
                self.user_setting(id, body).await
            }
            ClientFrame::PresenceSettings { hidden } => {
                let body =
                    Body::PresenceSettingChanged(chat_schemas::PresenceSettingChanged { hidden });
                self.user_setting(id, body).await
            }
            command => self.on_command(id, command).await,
        }
    }

    /// Records that the client was told of the `chat.events` record at
    /// `position`.
    fn tell(&mut self, position: Option<(i32, i64)>) {
        if let Some((partition, offset)) = position {
            let next = self.told.entry(partition).or_insert(offset + 1);
            *next = (*next).max(offset + 1);
        }
    }

    /// Requires reads to wait for `positions` (`partition -> next offset`).
    fn tell_all(&mut self, positions: &HashMap<i32, i64>) {
        for (p, next) in positions {
            if *next > 0 {
                self.tell(Some((*p, next - 1)));
            }
        }
    }

    /// The read barrier: waits until the history projector wrote every
    /// event this connection was told of, so what a read answers is at
    /// least as new as what the client has seen (PROTOCOL.md, "Reads").
    async fn consistent(&self) -> Result<(), (ErrorCode, String)> {
        let s = &self.shared;
        if s.projected.covers(&self.told) {
            return Ok(());
        }
        let started = Instant::now();
        let timeout = ms(s.config.timeouts.sync_progress_ms);
        let reached = s
            .projected
            .wait_for(s.history.as_ref(), &self.told, timeout)
            .await;
        s.metrics
            .read_barrier_wait
            .observe(started.elapsed().as_secs_f64());
        if reached {
            Ok(())
        } else {
            tracing::warn!(told = ?self.told, "history projector behind what this connection saw");
            Err((
                ErrorCode::Unavailable,
                "history is catching up with what you were sent; retry".into(),
            ))
        }
    }

    /// The current members of `chat` if the user is one of them; else the
    /// error to answer (`unknown_chat`, `not_member`, `unavailable`).
    async fn members_of(&mut self, chat: Uuid) -> Result<Vec<String>, (ErrorCode, String)> {
        self.consistent().await?;
        let history = self.shared.history.as_ref();
        let members = history
            .members(chat)
            .await
            .map_err(|e| sync::store_error(&e))?;
        if members.iter().any(|(u, _, _)| *u == self.user) {
            self.members.insert(chat, Instant::now());
            return Ok(members.into_iter().map(|(u, _, _)| u).collect());
        }
        match history.chat(chat).await {
            Ok(Some(_)) => Err((
                ErrorCode::NotMember,
                "you are not a member of this chat".into(),
            )),
            Ok(None) => Err((ErrorCode::UnknownChat, "no such chat".into())),
            Err(e) => Err(sync::store_error(&e)),
        }
    }

    /// Sends `answer` with the request's `id`, or the error it failed with.
    async fn reply(&mut self, id: FrameId, answer: Answer) -> Result<(), Stop> {
        self.reply_about(id, answer, About::default()).await
    }

    /// [`Self::reply`] for a frame about `about` (repeated in an error).
    async fn reply_about(&mut self, id: FrameId, answer: Answer, about: About) -> Result<(), Stop> {
        match answer {
            Ok(mut frame) => {
                frame.set_id(id);
                self.frame(frame).await
            }
            Err((code, message)) => self.error_about(id, code, message, about).await,
        }
    }

    /// `watch`: the chats open on this connection. Presence of their other
    /// members, typing and receipts of those chats flow to it from now on;
    /// the answer is the members' current presence.
    async fn watch(&mut self, chats: Vec<Uuid>) -> Answer {
        let mut users: Vec<String> = Vec::new();
        for chat in &chats {
            users.extend(self.members_of(*chat).await?);
        }
        users.sort();
        users.dedup();
        users.retain(|u| *u != self.user);
        if let Ok(mut w) = self.handle.watching.write() {
            *w = chats.into_iter().collect();
        }
        self.shared.hub.watch(&self.handle, users.clone());
        let rows = self.shared.history.presence_of(&users).await;
        let rows = rows.map_err(|e| sync::store_error(&e))?;
        let users = users
            .into_iter()
            .map(|user| {
                let row = rows.iter().find(|r| r.user == user);
                protocol::PresenceJson {
                    status: row.map_or("offline".into(), |r| r.status.clone()),
                    last_seen: row.and_then(|r| r.last_seen_ms),
                    user,
                }
            })
            .collect();
        Ok(ServerFrame::Presence { id: None, users })
    }

    /// `typing`: appended to `chat.ephemeral` (never history) for the router
    /// to deliver to the members watching the chat. No answer unless refused.
    async fn on_typing(&mut self, id: FrameId, chat: Uuid, active: bool) -> Result<(), Stop> {
        let shared = self.shared.clone();
        let limits = &shared.config.limits;
        let interval = ms(limits.typing_interval_ms);
        if self
            .typing_at
            .get(&chat)
            .is_some_and(|t| t.elapsed() < interval)
        {
            return self
                .error_about(
                    id,
                    ErrorCode::RateLimited,
                    format!(
                        "at most one typing frame per chat every {} ms",
                        limits.typing_interval_ms
                    ),
                    About::chat(chat),
                )
                .await;
        }
        let known = self
            .members
            .get(&chat)
            .is_some_and(|t| t.elapsed() < MEMBER_CACHE);
        if !known {
            if let Err((code, message)) = self.members_of(chat).await {
                return self.error_about(id, code, message, About::chat(chat)).await;
            }
        }
        self.typing_at.insert(chat, Instant::now());
        if self.typing_at.len() > 1024 {
            self.typing_at.retain(|_, t| t.elapsed() < interval);
        }
        let s = &self.shared;
        let mut env = s.session_envelope(
            &self.user,
            &self.device,
            Body::Typing(chat_schemas::Typing {
                active,
                expires_at: now_ms() + limits.typing_ttl_ms as i64,
            }),
        );
        env.chat_id = Some(chat);
        let key = chat.to_string();
        let sent = tokio::time::timeout(
            ms(s.config.timeouts.ack_ms),
            s.producer.send(&s.topics.ephemeral, &key, &env),
        )
        .await;
        // The interval runs from when the indicator left, so a slow append
        // (the first one of a topic registers its schema) does not let the
        // next frame through.
        self.typing_at.insert(chat, Instant::now());
        if !matches!(sent, Ok(Ok(_))) {
            return self
                .error_about(
                    id,
                    ErrorCode::Unavailable,
                    "typing could not be sent; retry",
                    About::chat(chat),
                )
                .await;
        }
        Ok(())
    }

    /// `receipts`: every member's read and delivery pointers in a chat.
    async fn receipts(&mut self, chat: Uuid) -> Answer {
        let members = self.members_of(chat).await?;
        let rows = self.shared.history.receipts(chat).await;
        let rows = rows.map_err(|e| sync::store_error(&e))?;
        let members = members
            .into_iter()
            .map(|user| {
                rows.iter().find(|r| r.user == user).cloned().unwrap_or(
                    chat_projectors::store::ReceiptRow {
                        user,
                        read_seq: 0,
                        delivered_seq: 0,
                    },
                )
            })
            .collect();
        Ok(ServerFrame::Receipts {
            id: None,
            chat,
            members,
        })
    }

    /// `devices`: the user's devices.
    async fn devices(&mut self) -> Answer {
        let rows = self.shared.history.devices(&self.user).await;
        let rows = rows.map_err(|e| sync::store_error(&e))?;
        let online = self.shared.hub.devices_online(&self.user);
        let devices = rows
            .into_iter()
            .map(|d| protocol::DeviceJson {
                online: online.contains(&d.device),
                current: d.device == self.device,
                device: d.device,
                first_seen: d.first_seen,
                last_seen: d.last_seen,
                revoked_at: d.revoked_at,
            })
            .collect();
        Ok(ServerFrame::Devices { id: None, devices })
    }

    /// Appends a user-scoped setting (`DeviceRevoked`,
    /// `PresenceSettingChanged`) to `chat.sessions`; answers `ok`.
    async fn user_setting(&mut self, id: FrameId, body: Body) -> Result<(), Stop> {
        if !self.shared.limiter.try_acquire(&self.user) {
            return self
                .error(id, ErrorCode::RateLimited, "too many commands; slow down")
                .await;
        }
        let s = &self.shared;
        let env = s.session_envelope(&self.user, &self.device, body);
        let sent = tokio::time::timeout(
            ms(s.config.timeouts.ack_ms),
            s.producer.send(&s.topics.sessions, &self.user, &env),
        )
        .await;
        if matches!(sent, Ok(Ok(_))) {
            self.frame(ServerFrame::Ok { id }).await
        } else {
            self.error(id, ErrorCode::Unavailable, "not stored; retry")
                .await
        }
    }

    /// Turns a command frame into an envelope for `chat.commands`.
    fn command_body(&self, frame: ClientFrame) -> Option<(Uuid, Option<String>, Body)> {
        let max_group = self.shared.config.limits.max_group_members;
        Some(match frame {
            ClientFrame::Send {
                chat,
                client_msg_id,
                text,
                reply_to,
            } => (
                chat,
                Some(client_msg_id),
                Body::MessageSent(MessageSent {
                    kind: MessageKind::Text,
                    text: Some(text),
                    media: None,
                    reply_to_seq: reply_to,
                }),
            ),
            ClientFrame::CreateChat {
                kind,
                members,
                title,
                client_msg_id,
            } => {
                let (chat, max_members, others_role) = match kind {
                    ChatKind::Direct => (
                        chat_schemas::direct_chat_id(&self.user, &members[0]),
                        2,
                        Role::Member,
                    ),
                    // A retry with the same client_msg_id names the same
                    // group, which the sequencer answers as a duplicate.
                    ChatKind::Group => (
                        client_msg_id.as_deref().map_or_else(Uuid::new_v4, |m| {
                            chat_schemas::group_chat_id(&self.user, &self.device, m)
                        }),
                        max_group,
                        Role::Member,
                    ),
                };
                let creator_role = if kind == ChatKind::Direct {
                    Role::Member
                } else {
                    Role::Admin
                };
                let mut all = vec![ChatMember {
                    user_id: self.user.clone(),
                    role: creator_role,
                }];
                all.extend(
                    members
                        .into_iter()
                        .filter(|m| *m != self.user)
                        .map(|m| ChatMember {
                            user_id: m,
                            role: others_role,
                        }),
                );
                (
                    chat,
                    client_msg_id,
                    Body::ChatCreated(ChatCreated {
                        kind,
                        title,
                        members: all,
                        max_members,
                    }),
                )
            }
            ClientFrame::AddMember {
                chat,
                user,
                role,
                client_msg_id,
            } => (
                chat,
                client_msg_id,
                Body::MemberAdded(MemberAdded {
                    user_id: user,
                    role,
                }),
            ),
            ClientFrame::RemoveMember {
                chat,
                user,
                client_msg_id,
            } => (
                chat,
                client_msg_id,
                Body::MemberRemoved(MemberRemoved {
                    user_id: user,
                    reason: RemovalReason::Removed,
                }),
            ),
            ClientFrame::ChangeRole {
                chat,
                user,
                role,
                client_msg_id,
            } => (
                chat,
                client_msg_id,
                Body::MemberRoleChanged(MemberRoleChanged {
                    user_id: user,
                    role,
                }),
            ),
            ClientFrame::Leave {
                chat,
                client_msg_id,
            } => (
                chat,
                client_msg_id,
                Body::MemberRemoved(MemberRemoved {
                    user_id: self.user.clone(),
                    reason: RemovalReason::Left,
                }),
            ),
            ClientFrame::Mute {
                chat,
                muted,
                client_msg_id,
            } => (
                chat,
                client_msg_id,
                Body::MuteChanged(chat_schemas::MuteChanged { muted }),
            ),
            ClientFrame::Receipt {
                chat,
                up_to_seq,
                delivered,
                client_msg_id,
            } => (
                chat,
                client_msg_id,
                if delivered {
                    Body::DeliveryReceipt(chat_schemas::DeliveryReceipt {
                        up_to_seq,
                        device: self.device.clone(),
                    })
                } else {
                    Body::ReadReceipt(chat_schemas::ReadReceipt { up_to_seq })
                },
            ),
            _ => return None,
        })
    }

    async fn on_command(&mut self, id: FrameId, frame: ClientFrame) -> Result<(), Stop> {
        let kind = frame.kind();
        let about = frame.about();
        if let ClientFrame::CreateChat {
            kind: ChatKind::Direct,
            members,
            ..
        } = &frame
        {
            if members.first() == Some(&self.user) {
                return self
                    .bad(
                        id,
                        ErrorCode::Invalid,
                        "a direct chat is with another user",
                        about,
                    )
                    .await;
            }
        }
        if self.pending.len() >= self.shared.config.limits.max_pending_commands {
            return self
                .error_about(
                    id,
                    ErrorCode::RateLimited,
                    "too many commands waiting for their ack",
                    about,
                )
                .await;
        }
        // Receipts are bounded by max_pending_commands and only ever move a
        // pointer forward; they do not use up the user's send budget.
        let is_receipt = matches!(frame, ClientFrame::Receipt { .. });
        if !is_receipt && !self.shared.limiter.try_acquire(&self.user) {
            return self
                .error_about(
                    id,
                    ErrorCode::RateLimited,
                    "too many commands; slow down",
                    about,
                )
                .await;
        }
        let Some((chat, client_msg_id, body)) = self.command_body(frame) else {
            return self
                .error_about(id, ErrorCode::Internal, "not a command", about)
                .await;
        };
        let command_id = Uuid::new_v4();
        let trace_id = Uuid::new_v4().simple().to_string();
        let server_ts = now_ms();
        // Every command enters the log with a client_msg_id, the sequencer's
        // dedupe key, so one read again after a rebalance is not appended
        // twice. Receipts need none: a pointer only moves forward.
        let logged_id = match (&client_msg_id, is_receipt) {
            (None, false) => Some(assigned_client_msg_id(command_id)),
            _ => client_msg_id.clone(),
        };
        let env = Envelope {
            event_id: command_id,
            chat_id: Some(chat),
            seq: None,
            sender_user: self.user.clone(),
            sender_device: self.device.clone(),
            client_msg_id: logged_id,
            client_ts: None,
            server_ts,
            sequenced_ts: None,
            trace_id: trace_id.clone(),
            body,
        };
        tracing::debug!(kind, %chat, %trace_id, command = %command_id, "command accepted");
        self.shared.hub.add_pending(command_id, self.handle.clone());
        if self.cmd_tx.try_send(env).is_err() {
            self.shared.hub.remove_pending(command_id);
            return self
                .error_about(
                    id,
                    ErrorCode::Unavailable,
                    "command queue full; retry",
                    About {
                        chat: Some(chat),
                        client_msg_id,
                    },
                )
                .await;
        }
        self.shared
            .metrics
            .commands
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
        self.pending.insert(
            command_id,
            Pending {
                id,
                chat,
                client_msg_id,
                server_ts,
                started: Instant::now(),
                trace_id,
            },
        );
        Ok(())
    }

    async fn on_result(&mut self, r: ResultMsg) -> Result<(), Stop> {
        match r {
            ResultMsg::ProduceFailed {
                command_id,
                message,
            } => {
                self.shared.hub.remove_pending(command_id);
                let Some(p) = self.pending.remove(&command_id) else {
                    return Ok(());
                };
                tracing::warn!(trace_id = %p.trace_id, %message, "command failed");
                self.frame(ServerFrame::Error {
                    id: p.id,
                    code: ErrorCode::Unavailable.as_str(),
                    message: "the command could not be stored; retry with the same client_msg_id"
                        .into(),
                    chat: Some(p.chat),
                    client_msg_id: p.client_msg_id,
                })
                .await
            }
            ResultMsg::Sequencer(r) => {
                let Some(p) = self.pending.remove(&r.command_event_id) else {
                    return Ok(());
                };
                self.shared
                    .metrics
                    .ack_latency
                    .observe(p.started.elapsed().as_secs_f64());
                match (r.outcome, r.seq) {
                    (CommandOutcome::Accepted | CommandOutcome::Duplicate, seq) => {
                        let position = r
                            .event_partition
                            .and_then(|p| i32::try_from(p).ok())
                            .zip(r.event_offset.and_then(|o| i64::try_from(o).ok()));
                        self.tell(position);
                        self.frame(ServerFrame::Ack {
                            id: p.id,
                            chat: p.chat,
                            seq,
                            client_msg_id: p.client_msg_id,
                            server_ts: p.server_ts,
                            duplicate: r.outcome == CommandOutcome::Duplicate,
                        })
                        .await
                    }
                    (CommandOutcome::Rejected, _) => {
                        let code = ErrorCode::from_sequencer(r.code.as_deref());
                        let mut message = r.reason.unwrap_or_else(|| "rejected".into());
                        if let Some(raw) = r.code.as_deref().filter(|c| *c != code.as_str()) {
                            message = format!("{raw}: {message}");
                        }
                        self.frame(ServerFrame::Error {
                            id: p.id,
                            code: code.as_str(),
                            message,
                            chat: Some(p.chat),
                            client_msg_id: p.client_msg_id,
                        })
                        .await
                    }
                }
            }
        }
    }

    async fn on_tick(&mut self) -> Result<(), Stop> {
        let t = &self.shared.config.timeouts;
        if t.idle_ms > 0
            && now_ms() - self.last_seen.load(Ordering::Relaxed)
                > i64::try_from(t.idle_ms).unwrap_or(i64::MAX)
        {
            self.close_with(close::IDLE, "idle").await;
            return Err(Stop);
        }
        let ack = ms(t.ack_ms);
        let expired: Vec<Uuid> = self
            .pending
            .iter()
            .filter(|(_, p)| p.started.elapsed() >= ack)
            .map(|(id, _)| *id)
            .collect();
        for command_id in expired {
            self.shared.hub.remove_pending(command_id);
            if let Some(p) = self.pending.remove(&command_id) {
                tracing::warn!(trace_id = %p.trace_id, "no command result in time");
                self.frame(ServerFrame::Error {
                    id: p.id,
                    code: ErrorCode::Unavailable.as_str(),
                    message:
                        "no answer in time; retry with the same client_msg_id (it is deduplicated)"
                            .into(),
                    chat: Some(p.chat),
                    client_msg_id: p.client_msg_id,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// A `sync` frame: with `more`, its chats are kept for the next one;
    /// without, the sync runs with every part's chats.
    async fn on_sync_part(
        &mut self,
        id: FrameId,
        since: Option<i64>,
        chats: HashMap<Uuid, u64>,
        more: bool,
    ) -> Result<(), Stop> {
        let (earlier_since, mut all) = self.sync_parts.take().unwrap_or_default();
        let since = since.or(earlier_since);
        all.extend(chats);
        if all.len() > protocol::MAX_SYNC_CHATS {
            return self
                .bad(
                    id,
                    ErrorCode::TooLarge,
                    format!(
                        "a sync names at most {} chats in all its frames",
                        protocol::MAX_SYNC_CHATS
                    ),
                    About::default(),
                )
                .await;
        }
        if more {
            self.sync_parts = Some((since, all));
            return Ok(());
        }
        self.on_sync(id, since, all).await
    }

    async fn on_sync(
        &mut self,
        id: FrameId,
        since: Option<i64>,
        client: HashMap<Uuid, u64>,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let history = self.shared.history.clone();
        if let Some((mut answers, mut from)) = self.routed.take() {
            // First sync: every event the routers will not send us must be
            // in Cassandra before we read it. Wait for an owner's answer for
            // every partition, then for the projector to pass those offsets.
            let t = &self.shared.config.timeouts;
            let deadline = tokio::time::Instant::now()
                + ms(t.session_routed_ms).saturating_sub(self.opened_at.elapsed());
            let complete = loop {
                if let Some(offsets) = from.complete() {
                    break Some(offsets);
                }
                match tokio::time::timeout_at(deadline, answers.recv()).await {
                    Ok(Some(answer)) => from.merge(&answer),
                    Ok(None) | Err(_) => break None,
                }
            };
            let Some(offsets) = complete else {
                tracing::warn!(missing = ?from.missing(), "no router answered for some partitions in time");
                // Keep waiting for them: the client's next sync continues.
                self.routed = Some((answers, from));
                return self
                    .error(
                        id,
                        ErrorCode::Unavailable,
                        "the routers have not taken up this session yet; send sync again",
                    )
                    .await;
            };
            self.tell_all(&offsets);
        }
        if let Err((code, message)) = self.consistent().await {
            return self.error(id, code, message).await;
        }
        let read_start = now_ms();
        let plans = match sync::plan(history.as_ref(), &self.user, since, &client).await {
            Ok(p) => p,
            Err(e) => {
                let (code, message) = sync::store_error(&e);
                return self.error(id, code, message).await;
            }
        };
        let l = &self.shared.config.limits;
        let caught_up = match sync::read_chats(
            history.as_ref(),
            &plans,
            l.sync_bootstrap_events,
            l.sync_max_events_per_chat,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let (code, message) = sync::store_error(&e);
                return self.error(id, code, message).await;
            }
        };
        let mut truncated = Vec::new();
        let mut sent = 0u64;
        for chat in caught_up {
            if chat.truncated {
                truncated.push(chat.chat);
            }
            sent += self.send_rows(chat.chat, &chat.events).await?;
            self.cursor.advance(chat.chat, chat.head);
        }
        self.shared.metrics.sync_events.inc_by(sent);
        // Changes sequenced up to a margin before the reads started are in
        // this answer; the margin covers clock skew and projector lag.
        let checkpoint = (read_start - SYNC_CHECKPOINT_MARGIN_MS).max(0);
        self.frame(ServerFrame::Synced {
            id,
            checkpoint,
            truncated,
        })
        .await?;
        self.shared
            .metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.live = true;
        Ok(())
    }

    /// Sends the rows of `chat` the connection does not have yet (in seq
    /// order), advancing the cursor; returns how many were sent.
    async fn send_rows(&mut self, chat: Uuid, rows: &[MessageRow]) -> Result<u64, Stop> {
        let mut sent = 0;
        for row in rows {
            if self.cursor.last(chat).is_some_and(|l| row.seq <= l) {
                continue;
            }
            self.send_text(Outbound::Text(EventJson::from_row(row).frame()), "event")
                .await?;
            self.cursor.advance(chat, row.seq);
            sent += 1;
        }
        Ok(sent)
    }

    async fn on_live(&mut self, e: LiveEvent) -> Result<(), Stop> {
        let Some(seq) = e.seq else {
            self.send_text(Outbound::Shared(e.frame), "event").await?;
            self.tell(e.position);
            return Ok(());
        };
        match self.cursor.admit(e.chat, seq) {
            Admit::Duplicate => {
                self.shared.metrics.live_duplicates_dropped.inc();
                return Ok(());
            }
            Admit::Send => {}
            Admit::Gap { after, before } => {
                self.shared.metrics.gap_fills.inc();
                if !self.fill_gap(&e, after, before).await? {
                    // Never step over a hole: the client would record the
                    // later seq and its next sync would start after it.
                    tracing::warn!(chat = %e.chat, after, before, "gap not readable from history; closing so the client syncs");
                    self.close_with(
                        close::TRY_AGAIN_LATER,
                        "cannot deliver a chat in order now; reconnect and sync",
                    )
                    .await;
                    return Err(Stop);
                }
            }
        }
        self.send_text(Outbound::Shared(e.frame), "event").await?;
        self.cursor.advance(e.chat, seq);
        self.tell(e.position);
        Ok(())
    }
}

impl Session {
    /// Sends the events of `e.chat` strictly between `after` and `before`
    /// from history. If history does not have them all yet, waits until the
    /// projector passed the live event's position (every earlier event of
    /// its partition is then written) and reads again. False: they could
    /// not be read (store down, or a gap beyond `sync_max_events_per_chat`).
    async fn fill_gap(&mut self, e: &LiveEvent, after: u64, before: u64) -> Result<bool, Stop> {
        let max = self.shared.config.limits.sync_max_events_per_chat;
        let history = self.shared.history.clone();
        for attempt in 0..2 {
            if attempt == 1 {
                let Some((partition, offset)) = e.position else {
                    return Ok(false);
                };
                let want = HashMap::from([(partition, offset)]);
                let timeout = ms(self.shared.config.timeouts.sync_progress_ms);
                if !self
                    .shared
                    .projected
                    .wait_for(history.as_ref(), &want, timeout)
                    .await
                {
                    return Ok(false);
                }
            }
            let rows = match sync::read_gap(history.as_ref(), e.chat, after, before, max).await {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::warn!(error = %err, chat = %e.chat, "gap fill failed");
                    continue;
                }
            };
            let complete = rows.len() as u64 == before - after - 1
                && rows.iter().zip(after + 1..).all(|(r, seq)| r.seq == seq);
            if !complete {
                continue;
            }
            for row in rows {
                if self.cursor.last(e.chat).is_some_and(|l| row.seq <= l) {
                    continue;
                }
                self.send_text(Outbound::Text(EventJson::from_row(&row).frame()), "event")
                    .await?;
                self.cursor.advance(e.chat, row.seq);
            }
            return Ok(true);
        }
        Ok(false)
    }
}

/// The `client_msg_id` the gateway gives a command sent without one: `~`
/// and the command's id (PROTOCOL.md: events show it; acks echo the
/// client's own, null).
fn assigned_client_msg_id(command_id: Uuid) -> String {
    format!("~{}", command_id.simple())
}

/// How far before the start of its reads a `synced.checkpoint` is set.
pub const SYNC_CHECKPOINT_MARGIN_MS: i64 = 60_000;

impl Drop for Session {
    fn drop(&mut self) {
        for id in self.pending.keys() {
            self.shared.hub.remove_pending(*id);
        }
    }
}

/// The `SessionClosed` body for a session.
pub(crate) fn session_closed(
    gateway_id: &str,
    device: &str,
    session_id: Uuid,
    reason: String,
) -> Body {
    Body::SessionClosed(SessionClosed {
        gateway_id: gateway_id.to_string(),
        device_id: device.to_string(),
        session_id,
        reason,
    })
}
