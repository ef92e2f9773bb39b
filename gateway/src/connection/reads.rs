//! Reads: `history`, `chats`, `sync`, `watch`, `receipts`, `devices`, the
//! membership check of `typing`, and the user settings' appends. Each runs
//! as a short-lived task of its own (at most `limits.max_concurrent_reads`
//! per connection, `rate_limited` beyond), so a slow store query or a
//! read barrier wait never holds back the connection's live events, acks
//! or other answers; the answer comes back to the session's loop, which
//! queues it like any frame.
//!
//! The read barrier: a read takes a copy of the connection's positions
//! (`told`) when its frame is handled, so its answer is at least as new as
//! everything the connection was sent before it asked.
//!
//! `sync` is the exception that stays ordered: its answer is the hand-off
//! to live events (the cursor starts from it), so while it runs the live
//! events are held (as before the first sync) and the client's later
//! frames wait (PROTOCOL.md: frames sent while a sync runs are answered
//! after its `synced`). Its store reads still run in a task, so acks and
//! the answers of earlier reads keep flowing.

use chat_schemas::Body;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::task::JoinError;
use uuid::Uuid;

use super::session::{Session, Stop, SyncOut};
use crate::config::ms;
use crate::fanout::ConnHandle;
use crate::protocol::{self, now_ms, About, ErrorCode, FrameId, ServerFrame};
use crate::server::Shared;
use crate::sync::{self, ChatCatchUp};

/// A read to run.
pub(super) enum Read {
    History {
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    },
    Chats,
    Watch {
        chats: Vec<Uuid>,
        generation: u64,
    },
    Receipts {
        chat: Uuid,
    },
    Devices,
    /// `typing`: the membership check unless `known`, then the append.
    Typing {
        chat: Uuid,
        active: bool,
        known: bool,
    },
    /// A user-scoped setting appended to `chat.sessions` (answered `ok`).
    Setting(Box<Body>),
}

/// What a read task hands back.
pub(super) struct ReadDone {
    /// The answer (its `id` set), if any.
    pub frame: Option<ServerFrame>,
    /// Chats the user was found a member of (the `typing` check's cache).
    pub members: Vec<Uuid>,
    /// `typing` of this chat finished, and whether it got past the
    /// membership check (then its rate-limit interval starts now; else no
    /// interval runs, as no indicator left).
    pub typing: Option<(Uuid, bool)>,
}

/// What a sync task hands back.
pub(super) struct SyncDone {
    pub id: FrameId,
    /// The routers' answers, handed back when not every partition had one.
    pub routed: Option<(mpsc::UnboundedReceiver<Vec<u64>>, sync::RoutedFrom)>,
    /// The positions the routers route live events from (first sync).
    pub routed_from: Option<HashMap<i32, i64>>,
    pub answer: Result<(Vec<ChatCatchUp>, i64), (ErrorCode, String)>,
    pub started: Instant,
    /// `since` was older than the sync markers' retention: answered as for
    /// a new device (plus the chats named), `synced.full_resync`.
    pub full_resync: bool,
}

/// How far before the start of its reads a `synced.checkpoint` is set.
pub const SYNC_CHECKPOINT_MARGIN_MS: i64 = 60_000;

/// What a read task needs of its connection.
struct Ctx {
    shared: Arc<Shared>,
    user: String,
    device: String,
    told: HashMap<i32, i64>,
    members: Vec<Uuid>,
}

/// The read barrier: waits until the history projector wrote every event
/// before `told`, so what a read answers is at least as new as what the
/// client already saw (PROTOCOL.md, "Reads").
pub(super) async fn consistent(
    shared: &Shared,
    told: &HashMap<i32, i64>,
) -> Result<(), (ErrorCode, String)> {
    if shared.projected.covers(told) {
        return Ok(());
    }
    let started = Instant::now();
    let timeout = ms(shared.config.timeouts.sync_progress_ms);
    let reached = shared
        .projected
        .wait_for(shared.history.as_ref(), told, timeout)
        .await;
    shared
        .metrics
        .read_barrier_wait
        .observe(started.elapsed().as_secs_f64());
    if reached {
        Ok(())
    } else {
        tracing::warn!(?told, "history projector behind what this connection saw");
        Err((
            ErrorCode::Unavailable,
            "history is catching up with what you were sent; retry".into(),
        ))
    }
}

impl Ctx {
    /// The current members of `chat` if the user is one of them; else the
    /// error to answer (`unknown_chat`, `not_member`, `unavailable`).
    async fn members_of(&mut self, chat: Uuid) -> Result<Vec<String>, (ErrorCode, String)> {
        consistent(&self.shared, &self.told).await?;
        let history = self.shared.history.as_ref();
        let members = history
            .members(chat)
            .await
            .map_err(|e| sync::store_error(&e))?;
        if members.iter().any(|(u, _, _)| *u == self.user) {
            self.members.push(chat);
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
}

type Answer = Result<Option<ServerFrame>, (ErrorCode, String)>;

/// Runs one read; answers with `id` (an error repeats `about`).
async fn run(mut ctx: Ctx, id: FrameId, about: About, read: Read, conn: ConnHandle) -> ReadDone {
    let mut typing = None;
    let answer: Answer = match read {
        Read::History {
            chat,
            before,
            after,
            limit,
        } => history(&ctx, chat, before, after, limit).await,
        Read::Chats => chats(&ctx).await,
        Read::Watch { chats, generation } => watch(&mut ctx, chats, generation, &conn).await,
        Read::Receipts { chat } => receipts(&mut ctx, chat).await,
        Read::Devices => devices(&ctx).await,
        Read::Typing {
            chat,
            active,
            known,
        } => {
            let (answer, member) = on_typing(&mut ctx, chat, active, known).await;
            typing = Some((chat, member));
            answer
        }
        Read::Setting(body) => user_setting(&ctx, *body).await,
    };
    let frame = match answer {
        Ok(Some(mut frame)) => {
            frame.set_id(id);
            Some(frame)
        }
        Ok(None) => None,
        Err((code, message)) => Some(ServerFrame::error_about(id, code, message, about)),
    };
    ReadDone {
        frame,
        members: ctx.members,
        typing,
    }
}

async fn history(
    ctx: &Ctx,
    chat: Uuid,
    before: Option<u64>,
    after: Option<u64>,
    limit: u32,
) -> Answer {
    consistent(&ctx.shared, &ctx.told).await?;
    let (events, has_more) = sync::history_page(
        ctx.shared.history.as_ref(),
        &ctx.user,
        chat,
        before,
        after,
        limit,
    )
    .await?;
    Ok(Some(ServerFrame::History {
        id: None,
        chat,
        events,
        has_more,
    }))
}

async fn chats(ctx: &Ctx) -> Answer {
    consistent(&ctx.shared, &ctx.told).await?;
    let chats = sync::chat_list(ctx.shared.history.as_ref(), &ctx.user)
        .await
        .map_err(|e| sync::store_error(&e))?;
    let unread_total = chats.iter().map(|c| c.unread).sum();
    Ok(Some(ServerFrame::Chats {
        id: None,
        chats,
        unread_total,
    }))
}

/// `watch`: the chats open on this connection. Presence of their other
/// members, typing and receipts of those chats flow to it from now on;
/// the answer is the members' current presence.
async fn watch(ctx: &mut Ctx, chats: Vec<Uuid>, generation: u64, conn: &ConnHandle) -> Answer {
    let mut users: Vec<String> = Vec::new();
    for chat in &chats {
        users.extend(ctx.members_of(*chat).await?);
    }
    users.sort();
    users.dedup();
    users.retain(|u| *u != ctx.user);
    // Watches answered out of order: only the newest frame's set stays.
    let hub = &ctx.shared.hub;
    conn.mailbox.set_watching(
        generation,
        chats.into_iter().collect::<HashSet<_>>(),
        || hub.watch(conn, users.clone()),
    );
    let rows = ctx.shared.history.presence_of(&users).await;
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
    Ok(Some(ServerFrame::Presence { id: None, users }))
}

/// `receipts`: every member's read and delivery pointers in a chat.
async fn receipts(ctx: &mut Ctx, chat: Uuid) -> Answer {
    let members = ctx.members_of(chat).await?;
    let rows = ctx.shared.history.receipts(chat).await;
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
    Ok(Some(ServerFrame::Receipts {
        id: None,
        chat,
        members,
    }))
}

/// `devices`: the user's devices.
async fn devices(ctx: &Ctx) -> Answer {
    let rows = ctx.shared.history.devices(&ctx.user).await;
    let rows = rows.map_err(|e| sync::store_error(&e))?;
    let online = ctx.shared.hub.devices_online(&ctx.user);
    let devices = rows
        .into_iter()
        .map(|d| protocol::DeviceJson {
            online: online.contains(&d.device),
            current: d.device == ctx.device,
            device: d.device,
            first_seen: d.first_seen,
            last_seen: d.last_seen,
            revoked_at: d.revoked_at,
        })
        .collect();
    Ok(Some(ServerFrame::Devices { id: None, devices }))
}

/// `typing`: appended to `chat.ephemeral` (never history) for the router
/// to deliver to the members watching the chat. No answer unless refused.
async fn on_typing(ctx: &mut Ctx, chat: Uuid, active: bool, known: bool) -> (Answer, bool) {
    if !known {
        if let Err(e) = ctx.members_of(chat).await {
            return (Err(e), false);
        }
    }
    let s = &ctx.shared;
    let mut env = s.session_envelope(
        &ctx.user,
        &ctx.device,
        Body::Typing(chat_schemas::Typing {
            active,
            expires_at: now_ms() + s.config.limits.typing_ttl_ms as i64,
        }),
    );
    env.chat_id = Some(chat);
    let key = chat.to_string();
    let sent = tokio::time::timeout(
        ms(s.config.timeouts.ack_ms),
        s.producer.send(&s.topics.ephemeral, &key, &env),
    )
    .await;
    if !matches!(sent, Ok(Ok(_))) {
        return (
            Err((
                ErrorCode::Unavailable,
                "typing could not be sent; retry".into(),
            )),
            true,
        );
    }
    (Ok(None), true)
}

/// Appends a user-scoped setting (`DeviceRevoked`,
/// `PresenceSettingChanged`) to `chat.sessions`; answers `ok`.
async fn user_setting(ctx: &Ctx, body: Body) -> Answer {
    let s = &ctx.shared;
    let env = s.session_envelope(&ctx.user, &ctx.device, body);
    let sent = tokio::time::timeout(
        ms(s.config.timeouts.ack_ms),
        s.producer.send(&s.topics.sessions, &ctx.user, &env),
    )
    .await;
    if matches!(sent, Ok(Ok(_))) {
        Ok(Some(ServerFrame::Ok { id: None }))
    } else {
        Err((ErrorCode::Unavailable, "not stored; retry".into()))
    }
}

/// The first sync waits for an owner's `SessionRouted` answer for every
/// partition (then for the projector to pass those offsets); every sync
/// then reads what the client misses.
#[allow(clippy::too_many_arguments)]
async fn run_sync(
    shared: Arc<Shared>,
    user: String,
    mut told: HashMap<i32, i64>,
    mut routed: Option<(mpsc::UnboundedReceiver<Vec<u64>>, sync::RoutedFrom)>,
    opened_at: Instant,
    id: FrameId,
    since: Option<i64>,
    client: HashMap<Uuid, u64>,
) -> SyncDone {
    let started = Instant::now();
    let mut done = SyncDone {
        id,
        routed: None,
        routed_from: None,
        answer: Err((ErrorCode::Internal, String::new())),
        started,
        full_resync: false,
    };
    // Markers older than their retention may have expired: a checkpoint
    // that old is not trusted (no silent gap); every current chat is sent.
    let retention = shared.config.limits.sync_markers_retention_ms as i64;
    let since = match since {
        Some(s) if s < now_ms() - retention + crate::config::FULL_RESYNC_MARGIN_MS => {
            shared.metrics.full_resyncs.inc();
            done.full_resync = true;
            None
        }
        other => other,
    };
    if let Some((mut answers, mut from)) = routed.take() {
        let t = &shared.config.timeouts;
        let deadline = tokio::time::Instant::now()
            + ms(t.session_routed_ms).saturating_sub(opened_at.elapsed());
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
            done.routed = Some((answers, from));
            done.answer = Err((
                ErrorCode::Unavailable,
                "the routers have not taken up this session yet; send sync again".into(),
            ));
            return done;
        };
        for (p, next) in &offsets {
            if *next > 0 {
                let at = told.entry(*p).or_insert(*next);
                *at = (*at).max(*next);
            }
        }
        done.routed_from = Some(offsets);
    }
    done.answer = async {
        consistent(&shared, &told).await?;
        let history = shared.history.as_ref();
        let read_start = now_ms();
        let plans = sync::plan(history, &user, since, &client)
            .await
            .map_err(|e| sync::store_error(&e))?;
        let l = &shared.config.limits;
        let caught_up = sync::read_chats(
            history,
            &plans,
            l.sync_bootstrap_events,
            l.sync_max_events_per_chat,
        )
        .await
        .map_err(|e| sync::store_error(&e))?;
        // Changes sequenced up to a margin before the reads started are in
        // this answer; the margin covers clock skew and projector lag.
        Ok((caught_up, (read_start - SYNC_CHECKPOINT_MARGIN_MS).max(0)))
    }
    .await;
    done
}

impl Session {
    /// Starts a read as a task of its own, unless the connection has
    /// `max_concurrent_reads` running (`rate_limited`).
    pub(super) fn spawn_read(&mut self, id: FrameId, about: About, read: Read) {
        let max = self.shared.config.limits.max_concurrent_reads;
        if self.reads.as_ref().map_or(0, |r| r.len()) >= max {
            self.shared.metrics.reads_refused.inc();
            if let Read::Typing { chat, .. } = &read {
                self.typing_at.remove(chat);
            }
            self.error_about(
                id,
                ErrorCode::RateLimited,
                format!("at most {max} reads at once per connection; wait for an answer"),
                about,
            );
            return;
        }
        let ctx = Ctx {
            shared: self.shared.clone(),
            user: self.user.clone(),
            device: self.device.clone(),
            told: self.told.clone(),
            members: Vec::new(),
        };
        let conn = self.handle.clone();
        self.reads
            .get_or_insert_with(Default::default)
            .spawn(run(ctx, id, about, read, conn));
    }

    pub(super) fn read_done(&mut self, done: Result<ReadDone, JoinError>) -> Result<(), Stop> {
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "read task failed");
                self.shared.metrics.connection_panics.inc();
                self.error(None, ErrorCode::Internal, "a read failed");
                return Ok(());
            }
        };
        let now = Instant::now();
        for chat in done.members {
            self.members.insert(chat, now);
        }
        match done.typing {
            // The interval runs from when the indicator left, so a slow
            // append does not let the next frame through.
            Some((chat, true)) => {
                self.typing_at.insert(chat, now);
            }
            Some((chat, false)) => {
                self.typing_at.remove(&chat);
            }
            None => {}
        }
        if let Some(frame) = done.frame {
            self.frame(frame);
            self.last_seen = now_ms();
        }
        Ok(())
    }

    /// A `sync` frame: with `more`, its chats are kept for the next one;
    /// without, the sync runs with every part's chats.
    pub(super) fn on_sync_part(
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
            return self.bad(
                id,
                ErrorCode::TooLarge,
                format!(
                    "a sync names at most {} chats in all its frames",
                    protocol::MAX_SYNC_CHATS
                ),
                About::default(),
            );
        }
        if more {
            self.sync_parts = Some((since, all));
            return Ok(());
        }
        let task = run_sync(
            self.shared.clone(),
            self.user.clone(),
            self.told.clone(),
            self.routed.take(),
            self.opened_at,
            id,
            since,
            all,
        );
        self.syncing = Some(tokio::spawn(task));
        Ok(())
    }

    pub(super) fn sync_done(&mut self, done: Result<SyncDone, JoinError>) -> Result<(), Stop> {
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "sync task failed");
                self.shared.metrics.connection_panics.inc();
                self.close_with(protocol::close::INTERNAL, "internal error");
                return Err(Stop);
            }
        };
        self.last_seen = now_ms();
        if let Some(routed) = done.routed {
            self.routed = Some(routed);
        }
        if let Some(offsets) = &done.routed_from {
            self.tell_all(offsets);
            self.shared.hub.routed_done(self.session_id);
        }
        match done.answer {
            Ok((chats, checkpoint)) => {
                let mut truncated = Vec::new();
                for c in &chats {
                    if c.truncated {
                        truncated.push(c.chat);
                    }
                }
                self.sync_out = Some(Box::new(SyncOut {
                    id: done.id,
                    checkpoint,
                    truncated,
                    full_resync: done.full_resync,
                    chats: VecDeque::from(chats),
                    row: 0,
                    sent: 0,
                    started: done.started,
                }));
            }
            Err((code, message)) => self.error(done.id, code, message),
        }
        Ok(())
    }
}
