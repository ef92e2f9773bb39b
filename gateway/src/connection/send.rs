//! Commands: `send`, `create_chat`, the membership commands (`add_member`,
//! `remove_member`, `change_role`, `leave`), `mute`, `read` and
//! `delivered`. Each becomes an envelope appended to `chat.commands` in the
//! order the client sent them (one append in flight at a time, driven by
//! the session's loop, no task of its own), tracked until the sequencer's
//! `CommandResult` arrives (`ack` / `error`) or `ack_ms` passes
//! (`unavailable`).
//!
//! `delivered` frames are coalesced per chat over
//! `timeouts.delivered_coalesce_ms`: only the highest `up_to_seq` of the
//! window is appended, and every frame of the window gets the answer that
//! command got (with its own `id` and `client_msg_id`).

use chat_log::HEADER_GATEWAY_ID;
use chat_schemas::{
    Body, ChatCreated, ChatKind, ChatMember, CommandOutcome, Envelope, MemberAdded, MemberRemoved,
    MemberRoleChanged, MessageKind, MessageSent, RemovalReason, Role,
};
use std::collections::HashMap;
use std::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::session::{Session, Stop};
use crate::config::ms;
use crate::fanout::ResultMsg;
use crate::metrics::TypeLabel;
use crate::protocol::{now_ms, About, ClientFrame, ErrorCode, FrameId, ServerFrame};

/// A frame waiting for the answer of a command.
#[derive(Debug)]
pub(super) struct Waiter {
    pub id: FrameId,
    pub client_msg_id: Option<String>,
    pub server_ts: i64,
}

/// A command waiting for its result.
#[derive(Debug)]
pub(super) struct Pending {
    pub frame: Waiter,
    /// Other frames answered by the same command (coalesced `delivered`).
    pub also: Vec<Waiter>,
    pub chat: Uuid,
    pub started: Instant,
    pub trace_id: String,
}

/// `delivered` frames waiting for their window to end, per chat.
#[derive(Debug, Default)]
pub(super) struct Coalescer {
    chats: HashMap<Uuid, Coalesced>,
}

#[derive(Debug)]
struct Coalesced {
    due: Instant,
    up_to_seq: u64,
    /// The frame with the highest `up_to_seq` (the one appended).
    best: usize,
    frames: Vec<Waiter>,
}

impl Coalescer {
    pub fn next_due(&self) -> Option<Instant> {
        self.chats.values().map(|c| c.due).min()
    }

    /// Frames waiting.
    pub fn waiting(&self) -> usize {
        self.chats.values().map(|c| c.frames.len()).sum()
    }
}

/// The `client_msg_id` the gateway gives a command sent without one: `~`
/// and the command's id (PROTOCOL.md: events show it; acks echo the
/// client's own, null).
fn assigned_client_msg_id(command_id: Uuid) -> String {
    format!("~{}", command_id.simple())
}

impl Session {
    /// Turns a command frame into the chat, `client_msg_id` and body of its
    /// envelope.
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
                let (chat, max_members) = match kind {
                    ChatKind::Direct => (chat_schemas::direct_chat_id(&self.user, &members[0]), 2),
                    // A retry with the same client_msg_id names the same
                    // group, which the sequencer answers as a duplicate.
                    ChatKind::Group => (
                        client_msg_id.as_deref().map_or_else(Uuid::new_v4, |m| {
                            chat_schemas::group_chat_id(&self.user, &self.device, m)
                        }),
                        max_group,
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
                            role: Role::Member,
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

    pub(super) fn on_command(&mut self, id: FrameId, frame: ClientFrame) -> Result<(), Stop> {
        let about = frame.about();
        if let ClientFrame::CreateChat {
            kind: ChatKind::Direct,
            members,
            ..
        } = &frame
        {
            if members.first() == Some(&self.user) {
                return self.bad(
                    id,
                    ErrorCode::Invalid,
                    "a direct chat is with another user",
                    about,
                );
            }
        }
        let waiting = self.coalescer.as_ref().map_or(0, |c| c.waiting());
        if self.pending.len() + waiting >= self.shared.config.limits.max_pending_commands {
            self.error_about(
                id,
                ErrorCode::RateLimited,
                "too many commands waiting for their ack",
                about,
            );
            return Ok(());
        }
        // Receipts are bounded by max_pending_commands and only ever move a
        // pointer forward; they do not use up the user's send budget.
        let is_receipt = matches!(frame, ClientFrame::Receipt { .. });
        if !is_receipt && !self.shared.limiter.try_acquire(&self.user) {
            self.error_about(
                id,
                ErrorCode::RateLimited,
                "too many commands; slow down",
                about,
            );
            return Ok(());
        }
        let window = self.shared.config.timeouts.delivered_coalesce_ms;
        if let ClientFrame::Receipt {
            chat,
            up_to_seq,
            delivered: true,
            client_msg_id,
        } = &frame
        {
            if window > 0 {
                let c = self
                    .coalescer
                    .get_or_insert_with(Box::default)
                    .chats
                    .entry(*chat)
                    .or_insert_with(|| Coalesced {
                        due: Instant::now() + ms(window),
                        up_to_seq: 0,
                        best: 0,
                        frames: Vec::new(),
                    });
                c.frames.push(Waiter {
                    id,
                    client_msg_id: client_msg_id.clone(),
                    server_ts: now_ms(),
                });
                if *up_to_seq >= c.up_to_seq {
                    c.up_to_seq = *up_to_seq;
                    c.best = c.frames.len() - 1;
                }
                return Ok(());
            }
        }
        let Some((chat, client_msg_id, body)) = self.command_body(frame) else {
            self.error_about(id, ErrorCode::Internal, "not a command", about);
            return Ok(());
        };
        let frame = Waiter {
            id,
            client_msg_id,
            server_ts: now_ms(),
        };
        self.submit(chat, body, frame, Vec::new());
        Ok(())
    }

    /// Appends the coalesced `delivered` receipts whose window ended (all
    /// of them with `all`).
    pub(super) fn flush_coalesced(&mut self, all: bool) {
        let Some(c) = self.coalescer.as_mut() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<Uuid> = c
            .chats
            .iter()
            .filter(|(_, w)| all || w.due <= now)
            .map(|(chat, _)| *chat)
            .collect();
        let mut ready = Vec::with_capacity(due.len());
        for chat in due {
            if let Some(w) = c.chats.remove(&chat) {
                ready.push((chat, w));
            }
        }
        if c.chats.is_empty() {
            self.coalescer = None;
        }
        for (chat, mut w) in ready {
            let best = w.frames.remove(w.best);
            let body = Body::DeliveryReceipt(chat_schemas::DeliveryReceipt {
                up_to_seq: w.up_to_seq,
                device: self.device.clone(),
            });
            self.shared
                .metrics
                .delivered_coalesced
                .inc_by(w.frames.len() as u64);
            self.submit(chat, body, best, w.frames);
        }
    }

    /// Queues a command for `chat.commands`; `frame` (and `also`) are
    /// answered with its result.
    fn submit(&mut self, chat: Uuid, body: Body, frame: Waiter, also: Vec<Waiter>) {
        let kind = body.kind();
        let is_receipt = matches!(body, Body::ReadReceipt(_) | Body::DeliveryReceipt(_));
        let command_id = Uuid::new_v4();
        let trace_id = Uuid::new_v4().simple().to_string();
        // Every command enters the log with a client_msg_id, the sequencer's
        // dedupe key, so one read again after a rebalance is not appended
        // twice. Receipts need none: a pointer only moves forward.
        let logged_id = match (&frame.client_msg_id, is_receipt) {
            (None, false) => Some(assigned_client_msg_id(command_id)),
            _ => frame.client_msg_id.clone(),
        };
        let env = Envelope {
            event_id: command_id,
            chat_id: Some(chat),
            seq: None,
            sender_user: self.user.clone(),
            sender_device: self.device.clone(),
            client_msg_id: logged_id,
            client_ts: None,
            server_ts: frame.server_ts,
            sequenced_ts: None,
            trace_id: trace_id.clone(),
            body,
        };
        tracing::debug!(kind, %chat, %trace_id, command = %command_id, "command accepted");
        self.shared.hub.add_pending(command_id, self.handle.clone());
        self.shared
            .metrics
            .commands
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
        self.pending.insert(
            command_id,
            Pending {
                frame,
                also,
                chat,
                started: Instant::now(),
                trace_id,
            },
        );
        self.to_produce.push_back(env);
        self.produce_next();
    }

    /// Starts appending the next queued command if none is in flight.
    pub(super) fn produce_next(&mut self) {
        if self.producing.is_some() {
            return;
        }
        let Some(env) = self.to_produce.pop_front() else {
            if self.to_produce.capacity() > 0 {
                self.to_produce = Default::default();
            }
            return;
        };
        let shared = self.shared.clone();
        self.producing = Some(Box::pin(async move {
            let key = env.chat_id.map(|c| c.to_string()).unwrap_or_default();
            let span = tracing::info_span!("command", kind = env.body.kind(), chat = %key, trace_id = %env.trace_id, command = %env.event_id);
            let sent = tokio::time::timeout(
                ms(shared.config.timeouts.ack_ms),
                shared.producer.send_with(
                    &shared.topics.commands,
                    None,
                    &key,
                    &env,
                    &[(HEADER_GATEWAY_ID, shared.config.gateway_id.as_bytes())],
                ),
            )
            .instrument(span.clone())
            .await;
            let failure = match sent {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out appending the command".to_string()),
            };
            if let Some(message) = &failure {
                span.in_scope(|| tracing::warn!(%message, "command not produced"));
            }
            (env.event_id, failure)
        }));
    }

    /// The commands accepted but not appended yet (the connection ended):
    /// appended by a task of their own, so nothing accepted is lost (their
    /// answers have nobody to go to; a client retrying is deduplicated).
    pub(super) fn finish_commands(&mut self) {
        self.flush_coalesced(true);
        let producing = self.producing.take();
        let rest: Vec<Envelope> = self.to_produce.drain(..).collect();
        if producing.is_none() && rest.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if let Some(p) = producing {
                p.await;
            }
            for env in rest {
                let key = env.chat_id.map(|c| c.to_string()).unwrap_or_default();
                let _ = tokio::time::timeout(
                    ms(shared.config.timeouts.ack_ms),
                    shared.producer.send_with(
                        &shared.topics.commands,
                        None,
                        &key,
                        &env,
                        &[(HEADER_GATEWAY_ID, shared.config.gateway_id.as_bytes())],
                    ),
                )
                .await;
            }
        });
    }

    pub(super) fn produce_failed(&mut self, command_id: Uuid, message: String) {
        self.shared.hub.remove_pending(command_id);
        let Some(p) = self.pending.remove(&command_id) else {
            return;
        };
        tracing::warn!(trace_id = %p.trace_id, %message, "command failed");
        self.answer_error(
            p,
            ErrorCode::Unavailable,
            "the command could not be stored; retry with the same client_msg_id".into(),
        );
    }

    /// Answers every frame of a command with the same error.
    fn answer_error(&mut self, p: Pending, code: ErrorCode, message: String) {
        for w in std::iter::once(p.frame).chain(p.also) {
            self.frame(ServerFrame::Error {
                id: w.id,
                code: code.as_str(),
                message: message.clone(),
                chat: Some(p.chat),
                client_msg_id: w.client_msg_id,
            });
        }
    }

    pub(super) fn on_result(&mut self, r: ResultMsg) {
        match r {
            ResultMsg::ProduceFailed {
                command_id,
                message,
            } => self.produce_failed(command_id, message),
            ResultMsg::Sequencer(r) => {
                let Some(p) = self.pending.remove(&r.command_event_id) else {
                    return;
                };
                if self.pending.is_empty() && self.pending.capacity() > 0 {
                    self.pending = HashMap::new();
                }
                self.shared
                    .metrics
                    .ack_latency
                    .observe(p.started.elapsed().as_secs_f64());
                match r.outcome {
                    CommandOutcome::Accepted | CommandOutcome::Duplicate => {
                        let position = r
                            .event_partition
                            .and_then(|p| i32::try_from(p).ok())
                            .zip(r.event_offset.and_then(|o| i64::try_from(o).ok()));
                        self.tell(position);
                        for w in std::iter::once(p.frame).chain(p.also) {
                            self.frame(ServerFrame::Ack {
                                id: w.id,
                                chat: p.chat,
                                seq: r.seq,
                                client_msg_id: w.client_msg_id,
                                server_ts: w.server_ts,
                                duplicate: r.outcome == CommandOutcome::Duplicate,
                            });
                        }
                    }
                    CommandOutcome::Rejected => {
                        let code = ErrorCode::from_sequencer(r.code.as_deref());
                        let mut message = r.reason.clone().unwrap_or_else(|| "rejected".into());
                        if let Some(raw) = r.code.as_deref().filter(|c| *c != code.as_str()) {
                            message = format!("{raw}: {message}");
                        }
                        self.answer_error(p, code, message);
                    }
                }
            }
        }
    }

    /// Commands without a result after `ack_ms`: `unavailable`.
    pub(super) fn expire_pending(&mut self) {
        let ack = ms(self.shared.config.timeouts.ack_ms);
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
                self.answer_error(
                    p,
                    ErrorCode::Unavailable,
                    "no answer in time; retry with the same client_msg_id (it is deduplicated)"
                        .into(),
                );
            }
        }
    }

    /// A user-scoped setting (`revoke_device`, `presence_settings`): the
    /// rate limit here, the append in a task of its own (`reads.rs`).
    pub(super) fn on_user_setting(&mut self, id: FrameId, body: Body) -> Result<(), Stop> {
        if !self.shared.limiter.try_acquire(&self.user) {
            self.error(id, ErrorCode::RateLimited, "too many commands; slow down");
            return Ok(());
        }
        self.spawn_read(
            id,
            About::default(),
            super::reads::Read::Setting(Box::new(body)),
        );
        Ok(())
    }
}
