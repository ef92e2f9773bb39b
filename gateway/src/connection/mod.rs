//! One client connection, from the authenticated upgrade to the last
//! `SessionClosed`: **one task per connection**.
//!
//! - [`io`]: the socket (WebSocket framing over the upgraded `TcpStream`,
//!   cancel-safe reads, a write queue; no buffer held while idle);
//! - [`session`]: the connection's state and its loop (live events through
//!   the cursor, the read barrier's positions, timers, closing);
//! - [`send`]: commands to `chat.commands` and their acks, `delivered`
//!   coalescing;
//! - [`reads`]: `history`, `chats`, `sync`, `watch`, `receipts`, `devices`,
//!   settings: each a short-lived task answering through the session, so a
//!   slow read never delays live events;
//! - [`presence`]: `watch` and `typing` on the session side.
//!
//! Whatever ends the connection (client close, slow consumer, bad frames,
//! expired token, drain, a panic), [`serve`] cleans up: unregisters from the
//! hub, produces `SessionClosed`, closes the socket.
//!
//! Memory: an idle connection holds its task (the session's state and the
//! loop's futures), one [`Mailbox`](crate::fanout::Mailbox) shared with the
//! hub, and its entries in the hub's tables; queues, buffers and maps are
//! allocated when used and released when drained (ARCHITECTURE.md,
//! "Measured: gateway memory").

mod io;
mod presence;
mod reads;
mod send;
mod session;

use chat_schemas::{Body, SessionClosed};
use futures::FutureExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::Identity;
use crate::config::ms;
use crate::fanout::{Closer, ConnHandle, Mailbox, GONE};
use crate::protocol::{close, now_ms, About, ClientFrame, FrameId, ServerFrame};
use crate::server::Shared;
use crate::sync::{self, Cursor};
use reads::Read;
use session::{Session, Stop};
use std::future::Future;

pub use reads::SYNC_CHECKPOINT_MARGIN_MS;

/// Runs one upgraded connection to its end. Never panics to its caller.
pub(crate) async fn serve(shared: Arc<Shared>, upgrade: OnUpgrade, who: Identity, device: String) {
    let session_id = Uuid::new_v4();
    let span =
        tracing::info_span!("conn", user = %who.user, device = %device, session = %session_id);
    async move {
        let upgraded =
            match tokio::time::timeout(ms(shared.config.timeouts.upgrade_ms), upgrade).await {
                Ok(Ok(u)) => u,
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
        // The raw socket: hyper's buffers are released with the upgrade
        // (bytes the client sent after its request are kept and read first).
        let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => parts,
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                return;
            }
        };
        // hyper's read buffer (8 KiB) comes with the bytes read past the
        // request: copy those out and free it now, not when this future
        // ends with the connection.
        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
        let early = read_buf.to_vec();
        drop(read_buf);
        let stream = io.into_inner();
        Box::pin(run(shared, stream, early, who, device, session_id)).await;
    }
    .instrument(span)
    .await
}

async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    early: Vec<u8>,
    who: Identity,
    device: String,
    session_id: Uuid,
) {
    let limits = &shared.config.limits;
    let conn_id = shared.next_conn_id();
    let closer = Closer::new();
    let mailbox = Arc::new(Mailbox::new(
        limits.outbound_queue,
        limits.max_pending_commands * 2 + 8,
    ));
    shared.metrics.connections.inc();
    let handle = ConnHandle {
        conn_id,
        session_id,
        device: device.clone(),
        mailbox,
        closer: closer.clone(),
    };
    // Buffer live events for this user from now on, before SessionOpened.
    let routed = shared.hub.register(&who.user, handle.clone());
    shared.sessions_insert(session_id, &who.user, &device, closer.clone());

    let mut reader = io::FrameReader::new(limits.max_frame_bytes, limits.max_fragments);
    let mut messages = VecDeque::new();
    let early_error = if early.is_empty() {
        None
    } else {
        reader.feed(&early, &mut messages).err()
    };
    drop(early);
    let mut session = Session {
        shared: shared.clone(),
        user: who.user.clone(),
        device: device.clone(),
        session_id,
        expires_at: who.expires_at,
        handle,
        stream,
        reader,
        messages,
        writer: io::Writer::default(),
        write_stalled: None,
        read_closed: false,
        closing: None,
        pending: HashMap::new(),
        to_produce: VecDeque::new(),
        producing: None,
        coalescer: None,
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
        last_seen: now_ms(),
        members: HashMap::new(),
        typing_at: HashMap::new(),
        sync_parts: None,
        told: HashMap::new(),
        reads: None,
        syncing: None,
        sync_out: None,
        gap: None,
        watch_generation: 0,
    };
    if let Some((code, reason)) = early_error {
        closer.close(code, reason);
    }
    let outcome = AssertUnwindSafe(async {
        // Boxed: what only runs once does not take room in the idle state.
        let opened = boxed(session.open()).await;
        session.run().await;
        opened
    })
    .catch_unwind()
    .await;
    if outcome.is_err() {
        shared.metrics.connection_panics.inc();
        tracing::error!("connection task panicked; closing it");
        closer.close(close::INTERNAL, "internal error");
        // The loop is gone: tell the client (unless a frame was half
        // written, which a close frame would corrupt).
        if session.writer.at_frame_boundary() {
            io::try_close(&session.stream, close::INTERNAL, "internal error");
        }
    }
    session.finish_commands();
    for id in session.pending.keys() {
        shared.hub.remove_pending(*id);
    }
    if let Some(reads) = session.reads.as_mut() {
        reads.abort_all();
    }
    if let Some(sync) = &session.syncing {
        sync.abort();
    }
    if let Some(gap) = &session.gap {
        gap.task.abort();
    }
    shared.hub.unregister(&who.user, conn_id, session_id);
    closer.close(close::NORMAL, "");
    let (code, reason) = closer.reason().unwrap_or((close::NORMAL, String::new()));
    if code != GONE && code != close::NORMAL {
        shared
            .metrics
            .closes
            .get_or_create(&crate::metrics::CloseLabel { code })
            .inc();
    }
    let Session { stream, .. } = session;
    boxed(finish(
        shared, stream, who.user, device, session_id, code, reason,
    ))
    .await;
}

type BoxedFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn boxed<'a, T>(f: impl Future<Output = T> + Send + 'a) -> BoxedFuture<'a, T> {
    Box::pin(f)
}

async fn finish(
    shared: Arc<Shared>,
    stream: TcpStream,
    user: String,
    device: String,
    session_id: Uuid,
    code: u16,
    reason: String,
) {
    // The session is over for the platform now (presence goes offline without
    // waiting for a dead peer's socket to linger).
    if shared.sessions_remove(session_id).is_some() {
        shared
            .produce_session_closed(&user, &device, session_id, close_reason(code, &reason))
            .await;
    }
    if code != GONE {
        // Let our close frame reach the client before the socket goes.
        io::linger(
            &stream,
            Duration::from_secs(1),
            shared.config.limits.max_frame_bytes * 4,
        )
        .await;
    }
    shared.metrics.connections.dec();
    tracing::info!(code, reason = %reason, "connection closed");
}

impl Session {
    /// Dispatches a client frame to its family.
    fn on_frame(&mut self, id: FrameId, frame: ClientFrame) -> Result<(), Stop> {
        match frame {
            ClientFrame::Ping => {
                self.frame(ServerFrame::Pong { id, ts: now_ms() });
                Ok(())
            }
            ClientFrame::Sync { since, chats, more } => self.on_sync_part(id, since, chats, more),
            ClientFrame::History {
                chat,
                before,
                after,
                limit,
            } => {
                let read = Read::History {
                    chat,
                    before,
                    after,
                    limit,
                };
                self.spawn_read(id, About::chat(chat), read);
                Ok(())
            }
            ClientFrame::Chats => {
                self.spawn_read(id, About::default(), Read::Chats);
                Ok(())
            }
            ClientFrame::Watch { chats } => self.on_watch(id, chats),
            ClientFrame::Typing { chat, active } => self.on_typing(id, chat, active),
            ClientFrame::Receipts { chat } => {
                self.spawn_read(id, About::chat(chat), Read::Receipts { chat });
                Ok(())
            }
            ClientFrame::Devices => {
                self.spawn_read(id, About::default(), Read::Devices);
                Ok(())
            }
            ClientFrame::RevokeDevice { device } => {
                let body = Body::DeviceRevoked(chat_schemas::DeviceRevoked {
                    device_id: device,
                    revoked_at: now_ms(),
                });
                self.on_user_setting(id, body)
            }
            ClientFrame::PushRegister {
                provider,
                token,
                locale,
            } => {
                let body = Body::PushRegistrationChanged(chat_schemas::PushRegistrationChanged {
                    device_id: self.device.clone(),
                    provider,
                    token: Some(token),
                    locale,
                    reason: Some("client".into()),
                    provider_detail: None,
                });
                self.on_user_setting(id, body)
            }
            ClientFrame::PushUnregister => {
                let body = Body::PushRegistrationChanged(chat_schemas::PushRegistrationChanged {
                    device_id: self.device.clone(),
                    provider: String::new(),
                    token: None,
                    locale: None,
                    reason: Some("client".into()),
                    provider_detail: None,
                });
                self.on_user_setting(id, body)
            }
            ClientFrame::PushSettings {
                time_zone,
                dnd,
                allowed_chats,
            } => {
                let body = Body::PushSettingsChanged(chat_schemas::PushSettingsChanged {
                    time_zone,
                    dnd_start_minute: dnd.map(|d| d.0),
                    dnd_end_minute: dnd.map(|d| d.1),
                    allowed_chats,
                });
                self.on_user_setting(id, body)
            }
            ClientFrame::PresenceSettings { hidden } => {
                let body =
                    Body::PresenceSettingChanged(chat_schemas::PresenceSettingChanged { hidden });
                self.on_user_setting(id, body)
            }
            command => self.on_command(id, command),
        }
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
