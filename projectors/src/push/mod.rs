//! The push projector (`chat-push`): `chat.events` -> push tasks on
//! `chat.push`, and `chat.sessions` -> the `push_registrations` table.
//!
//! - **Who can be notified.** Every instance follows all of `chat.sessions`
//!   from its oldest record ([`Devices`]): which devices are connected
//!   (`SessionOpened` / `SessionClosed`, including the closes the presence
//!   service appends when a gateway's heartbeats stop) and each device's push
//!   registration (`PushRegistrationChanged`; `DeviceRevoked` removes it).
//!   Registrations older than `chat.sessions`' retention come from the
//!   `push_registrations` table, overlaid with what the follower read. Before
//!   it makes tasks the projector reads `chat.sessions` up to its end as of
//!   that moment (bounded by `sessions_wait_ms`), so a device that connected
//!   or registered before the flush is seen.
//! - **Registrations table.** A consumer group (`registrations_group_id`) on
//!   `chat.sessions` writes `push_registrations` (`USING TIMESTAMP` of the
//!   record's time; a removal or revocation deletes the row).
//! - **Coalescing.** A consumer group (`group_id`) on `chat.events`. A
//!   `MessageSent` opens a window for its chat (or joins the open one); the
//!   window closes `coalesce_ms` after it opened, and then each recipient gets
//!   one task per registered, unconnected device with the number of messages
//!   (not their own) and the latest text. Other events make no task:
//!   membership, receipts, edits, deletes, reactions.
//! - **What a task knows.** Before a window's tasks are made, the history
//!   projector's progress (`projector_progress`) must pass the window's last
//!   offset (bounded by `history_wait_ms`): then `chat_members`,
//!   `user_chats` (mute, read pointers) and `chats` (last seq) include the
//!   window's messages, and the badge is the recipient's unread total
//!   computed as the `chats` frame does. A muted chat makes no task unless
//!   the task's kind (`direct`, `mention`) is in `always_push`.
//! - **Restart and rebalance.** The committed offset of a partition is the
//!   first offset of its oldest open window (or everything read when none is
//!   open), so a window lost with its process is read again by the next
//!   owner. After a window's tasks are appended (acknowledged by Kafka),
//!   `push_notified` records the chat's last notified seq; messages at or
//!   below it are skipped when read again. Guarantee: no message is left
//!   without a notification; a task is repeated only if the process dies
//!   between appending a window's tasks and writing `push_notified`. The
//!   repeat has the same `dedupe_key` (`<chat>:<latest seq>:<device>`) and
//!   `event_id` when the replay ends the window at the same message (the
//!   usual case: the messages are already in the log); if more messages had
//!   arrived, the repeat covers them too under a new key.

use chat_log::{
    BatchRecord, EventConsumer, EventProducer, HandlerError, LogConfig, Outgoing,
    PartitionedConsumer, SchemaRegistry, TailItem, TailStart, TopicTail, Topics,
};
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{now_ms, Health, Shutdown};
use chat_schemas::{Body, Envelope, MessageKind, PushTask};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::history::HISTORY_PROJECTOR;
use crate::store::{PushRegistration, PushSettings, Store, StoreConfig, StoreError};

/// `chat-push`'s config (TOML file plus `CHAT_*` overrides).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Where `/health` and `/metrics` are served.
    pub listen: SocketAddr,
    /// Consumer group of the push projectors on `chat.events`.
    pub group_id: String,
    /// Consumer group projecting `chat.sessions` into `push_registrations`.
    pub registrations_group_id: String,
    /// A burst of messages in one chat within this window is one notification.
    pub coalesce_ms: u64,
    /// Longest wait for the history projector to pass a window's messages.
    pub history_wait_ms: u64,
    /// Longest wait to read `chat.sessions` up to its end before a flush.
    pub sessions_wait_ms: u64,
    /// Characters of the latest text in `body_preview` (0: no preview).
    pub preview_chars: usize,
    /// Task kinds (`direct`, `mention`) that notify even in a muted chat.
    pub always_push: Vec<String>,
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// Kafka and the schema registry.
    pub log: LogConfig,
    /// Cassandra.
    pub store: StoreConfig,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9106)),
            group_id: "push".into(),
            registrations_group_id: "push-registrations".into(),
            coalesce_ms: 1_000,
            history_wait_ms: 5_000,
            sessions_wait_ms: 2_000,
            preview_chars: 120,
            always_push: Vec::new(),
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

impl chat_runtime::ServiceConfig for PushConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()?;
        if let Some(k) = self
            .always_push
            .iter()
            .find(|k| !matches!(k.as_str(), "direct" | "mention"))
        {
            return Err(format!("always_push: {k:?} is not direct or mention"));
        }
        self.store.check()
    }
}

/// Every option of `chat-push`, for `--help`.
pub const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by an environment
variable CHAT_<KEY>, nested keys joined by a double underscore):
  listen                 admin address (/health, /metrics)          [127.0.0.1:9106]
  group_id               consumer group on chat.events              [push]
  registrations_group_id consumer group writing push_registrations  [push-registrations]
  coalesce_ms            burst window per chat                      [1000]
  history_wait_ms        wait for the history projector at most     [5000]
  sessions_wait_ms       wait to read chat.sessions to its end      [2000]
  preview_chars          characters of text in body_preview         [120]
  always_push            kinds that notify in muted chats: direct, mention [[]]
  log_format             pretty | json                              [pretty]
  log.*                  Kafka and registry (see chat-gateway --help)
  store.*                Cassandra (see chat-gateway --help)";

#[derive(Clone, Default)]
struct Metrics {
    tasks: Counter,
    windows: Counter,
    coalesced: Counter,
    muted: Counter,
    online: Counter,
    held: Counter,
    open: Gauge,
}

/// Runs the projector and the registrations table until `shutdown`.
pub async fn run(config: PushConfig, store: Store, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    let metrics = Metrics::default();
    let mut reg = Registry::with_prefix("chat_push");
    reg.register("tasks", "PushTasks appended", metrics.tasks.clone());
    reg.register(
        "windows",
        "Coalescing windows flushed",
        metrics.windows.clone(),
    );
    reg.register(
        "coalesced_messages",
        "Messages folded into flushed windows",
        metrics.coalesced.clone(),
    );
    reg.register(
        "skipped_muted",
        "Recipients not notified: chat muted",
        metrics.muted.clone(),
    );
    reg.register(
        "skipped_online",
        "Registered devices not notified: connected",
        metrics.online.clone(),
    );
    reg.register(
        "open_windows",
        "Windows not flushed yet",
        metrics.open.clone(),
    );
    reg.register(
        "held_dnd",
        "Tasks held back by do-not-disturb (not_before at its end)",
        metrics.held.clone(),
    );
    let (addr, admin) = chat_runtime::serve_admin(
        config.listen,
        health.clone(),
        Arc::new(reg),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "chat-push admin endpoint");
    let registry = Arc::new(SchemaRegistry::new(&config.log)?);
    registry.check_reachable().await?;
    let producer = EventProducer::connect(&config.log, registry.clone()).await?;
    let topics = Topics::new(&config.log);
    chat_log::topics::check_topics_exist(&config.log, std::slice::from_ref(&topics.push)).await?;

    let devices = Arc::new(Devices::open(&config.log, registry.clone(), &topics).await?);
    let follower = tokio::spawn(devices.clone().follow(shutdown.clone()));
    let table = tokio::spawn(project_registrations(
        config.clone(),
        store.clone(),
        producer.clone(),
        topics.clone(),
        shutdown.clone(),
    ));
    let result = project(
        &config, registry, &producer, &topics, &store, &devices, &metrics, &shutdown,
    )
    .await;
    shutdown.trigger();
    table.await.ok();
    follower.await.ok();
    producer.flush(Duration::from_secs(5)).await.ok();
    admin.await.ok();
    result
}

/// Connected devices and push registrations, folded from all of
/// `chat.sessions`.
pub struct Devices {
    tail: TopicTail,
    state: Mutex<DeviceState>,
}

#[derive(Default)]
struct DeviceState {
    /// (user, device) -> open sessions.
    sessions: HashMap<(String, String), HashSet<Uuid>>,
    /// user -> device -> registration read from the log (None: removed).
    regs: HashMap<String, HashMap<String, Option<PushRegistration>>>,
    /// user -> do-not-disturb settings read from the log.
    settings: HashMap<String, PushSettings>,
}

fn settings_of(s: &chat_schemas::PushSettingsChanged) -> PushSettings {
    PushSettings {
        time_zone: s.time_zone.clone(),
        dnd: s.dnd_start_minute.zip(s.dnd_end_minute),
        allowed_chats: s.allowed_chats.clone(),
    }
}

impl DeviceState {
    fn apply(&mut self, ev: &Envelope) {
        let user = &ev.sender_user;
        match &ev.body {
            Body::SessionOpened(o) => {
                self.sessions
                    .entry((user.clone(), o.device_id.clone()))
                    .or_default()
                    .insert(o.session_id);
            }
            Body::SessionClosed(c) => {
                let key = (user.clone(), c.device_id.clone());
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.remove(&c.session_id);
                    if s.is_empty() {
                        self.sessions.remove(&key);
                    }
                }
            }
            Body::PushRegistrationChanged(r) => {
                let reg = r.token.clone().map(|token| PushRegistration {
                    device: r.device_id.clone(),
                    provider: r.provider.clone(),
                    token,
                    locale: r.locale.clone(),
                    updated_at: Some(ev.server_ts),
                });
                self.regs
                    .entry(user.clone())
                    .or_default()
                    .insert(r.device_id.clone(), reg);
            }
            Body::DeviceRevoked(r) => {
                self.regs
                    .entry(user.clone())
                    .or_default()
                    .insert(r.device_id.clone(), None);
            }
            Body::PushSettingsChanged(s) => {
                self.settings.insert(user.clone(), settings_of(s));
            }
            _ => {}
        }
    }
}

impl Devices {
    async fn open(
        config: &LogConfig,
        registry: Arc<SchemaRegistry>,
        topics: &Topics,
    ) -> anyhow::Result<Self> {
        let tail = TopicTail::open(
            config,
            registry,
            &topics.sessions,
            None,
            TailStart::Beginning,
        )
        .await?;
        Ok(Self {
            tail,
            state: Mutex::default(),
        })
    }

    async fn follow(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            let item = tokio::select! {
                _ = shutdown.wait() => return,
                i = self.tail.next() => i,
            };
            match item {
                Ok(TailItem::Event(ev)) => {
                    if let Ok(mut s) = self.state.lock() {
                        s.apply(&ev.envelope);
                    }
                }
                Ok(TailItem::Undecodable { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading chat.sessions failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Waits (at most `wait`) until everything appended to `chat.sessions`
    /// before this call was folded. False when the wait ran out.
    async fn catch_up(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let Ok(ends) = self.tail.high_watermarks().await else {
            return false;
        };
        while Instant::now() < deadline {
            // `reached` is the fetch position; a record fetched is folded
            // right after `next` returns it (no await in between), so
            // wait a little more once reached.
            if self.tail.reached(&ends).unwrap_or(false) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn connected(&self, user: &str, device: &str) -> bool {
        self.state
            .lock()
            .map(|s| {
                s.sessions
                    .contains_key(&(user.to_string(), device.to_string()))
            })
            .unwrap_or(false)
    }

    /// `user`'s do-not-disturb settings: the log's, else the table's.
    async fn settings(
        &self,
        store: &Store,
        user: &str,
    ) -> Result<Option<PushSettings>, StoreError> {
        let known = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.settings.get(user).cloned());
        match known {
            Some(s) => Ok(Some(s)),
            None => store.push_settings(user).await,
        }
    }

    /// `user`'s registrations: the table's, overlaid with the log's newer ones.
    async fn registrations(
        &self,
        store: &Store,
        user: &str,
    ) -> Result<Vec<PushRegistration>, StoreError> {
        let mut by_device: HashMap<String, PushRegistration> = store
            .push_registrations(user)
            .await?
            .into_iter()
            .map(|r| (r.device.clone(), r))
            .collect();
        if let Some(known) = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.regs.get(user).cloned())
        {
            for (device, reg) in known {
                match reg {
                    Some(r) => by_device.insert(device, r),
                    None => by_device.remove(&device),
                };
            }
        }
        let mut regs: Vec<_> = by_device.into_values().collect();
        regs.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(regs)
    }
}

/// `chat.sessions` -> `push_registrations`.
async fn project_registrations(
    config: PushConfig,
    store: Store,
    producer: EventProducer,
    topics: Topics,
    shutdown: Shutdown,
) {
    let consumer = match EventConsumer::connect(
        &config.log,
        &config.registrations_group_id,
        &[&topics.sessions],
        producer,
        &topics.dlq,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "push registrations projection could not start");
            shutdown.trigger();
            return;
        }
    };
    let handler = |ev: chat_log::ConsumedEvent| {
        let store = store.clone();
        async move {
            let env = &ev.envelope;
            let user = &env.sender_user;
            let done = match &env.body {
                Body::PushRegistrationChanged(r) => match &r.token {
                    Some(token) => {
                        let reg = PushRegistration {
                            device: r.device_id.clone(),
                            provider: r.provider.clone(),
                            token: token.clone(),
                            locale: r.locale.clone(),
                            updated_at: Some(env.server_ts),
                        };
                        store.put_push_registration(user, &reg, env.server_ts).await
                    }
                    None => {
                        store
                            .delete_push_registration(user, &r.device_id, env.server_ts)
                            .await
                    }
                },
                Body::DeviceRevoked(r) => {
                    let at = env.server_ts.max(r.revoked_at);
                    store.delete_push_registration(user, &r.device_id, at).await
                }
                Body::PushSettingsChanged(s) => {
                    store
                        .put_push_settings(user, &settings_of(s), env.server_ts)
                        .await
                }
                _ => return Ok(()),
            };
            done.map_err(|e| HandlerError::Retry(e.to_string()))
        }
    };
    if let Err(e) = consumer.run(handler, shutdown.token()).await {
        tracing::error!(error = %e, "push registrations projection stopped");
        shutdown.trigger();
    }
}

/// One message of a window.
#[derive(Clone, Debug)]
struct Msg {
    seq: u64,
    sender: String,
    text: Option<String>,
    media: bool,
}

/// The open coalescing window of one chat.
#[derive(Debug)]
struct Window {
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    opened: Instant,
    msgs: Vec<Msg>,
}

#[allow(clippy::too_many_arguments)]
async fn project(
    config: &PushConfig,
    registry: Arc<SchemaRegistry>,
    producer: &EventProducer,
    topics: &Topics,
    store: &Store,
    devices: &Devices,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut consumer =
        PartitionedConsumer::connect(&config.log, registry, &config.group_id, &topics.events)
            .await?;
    let token = shutdown.token();
    let coalesce = Duration::from_millis(config.coalesce_ms);
    let mut windows: HashMap<Uuid, Window> = HashMap::new();
    // Per partition: the offset after the last record read.
    let mut read: HashMap<i32, i64> = HashMap::new();
    let mut committed: HashMap<i32, i64> = HashMap::new();
    // Per chat: messages at or below are notified (from push_notified).
    let mut notified: HashMap<Uuid, u64> = HashMap::new();
    let mut failures = 0u32;
    loop {
        // Wake in time for the oldest window's end.
        let next_due = windows
            .values()
            .map(|w| w.opened + coalesce)
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(500))
            .clamp(Duration::from_millis(10), Duration::from_millis(500));
        let tick = token.child_token();
        let waker = {
            let tick = tick.clone();
            tokio::spawn(async move {
                tokio::time::sleep(next_due).await;
                tick.cancel();
            })
        };
        let batch = consumer
            .next_batch(500, Duration::from_millis(2), &tick)
            .await?;
        waker.abort();
        if token.is_cancelled() {
            break;
        }
        if let Some(batch) = batch {
            let p = batch.partition;
            if batch.fresh {
                // Read again from the committed offset: forget what was
                // collected of this partition before.
                windows.retain(|_, w| w.partition != p);
                committed.remove(&p);
            }
            for rec in &batch.records {
                let BatchRecord::Event(ev) = rec else {
                    continue;
                };
                let env = &ev.envelope;
                let (Some(chat), Some(seq), Body::MessageSent(m)) =
                    (env.chat_id, env.seq, &env.body)
                else {
                    continue;
                };
                let done = match notified.get(&chat) {
                    Some(s) => *s,
                    None => {
                        let s = retry_store(|| store.push_notified(chat), &token).await?;
                        if notified.len() > 100_000 {
                            notified.clear();
                        }
                        notified.insert(chat, s);
                        s
                    }
                };
                if seq <= done {
                    continue;
                }
                let w = windows.entry(chat).or_insert_with(|| Window {
                    partition: p,
                    first_offset: ev.offset,
                    last_offset: ev.offset,
                    opened: Instant::now(),
                    msgs: Vec::new(),
                });
                w.last_offset = ev.offset;
                w.msgs.push(Msg {
                    seq,
                    sender: env.sender_user.clone(),
                    text: m.text.clone(),
                    media: m.kind == MessageKind::Media,
                });
            }
            read.insert(p, batch.next_offset());
        }
        // Partitions lost in a rebalance: their new owner reads them again.
        windows.retain(|_, w| consumer.owns(w.partition));
        read.retain(|p, _| consumer.owns(*p));

        let now = Instant::now();
        let due: Vec<Uuid> = windows
            .iter()
            .filter(|(_, w)| now.duration_since(w.opened) >= coalesce)
            .map(|(c, _)| *c)
            .collect();
        if !due.is_empty() {
            if !devices
                .catch_up(Duration::from_millis(config.sessions_wait_ms))
                .await
            {
                tracing::warn!("chat.sessions not read to its end in time; using what was read");
            }
            for chat in due {
                let Some(w) = windows.get(&chat) else {
                    continue;
                };
                match flush(config, producer, topics, store, devices, metrics, chat, w).await {
                    Ok(()) => {
                        failures = 0;
                        metrics.windows.inc();
                        metrics.coalesced.inc_by(w.msgs.len() as u64);
                        let last = w.msgs.last().map_or(0, |m| m.seq);
                        notified.insert(chat, last);
                        windows.remove(&chat);
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(%chat, error = %e, "push tasks not made; retrying");
                        let backoff = 100u64 << failures.min(6);
                        tokio::select! {
                            _ = token.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(backoff)) => {}
                        }
                        break;
                    }
                }
            }
        }
        metrics.open.set(windows.len() as i64);
        // Commit up to the oldest open window of each partition.
        for (p, next) in &read {
            let target = windows
                .values()
                .filter(|w| w.partition == *p)
                .map(|w| w.first_offset)
                .min()
                .unwrap_or(*next);
            if committed.get(p).is_none_or(|c| *c < target) {
                match consumer.commit_offset_async(*p, target) {
                    Ok(()) => {
                        committed.insert(*p, target);
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "offset commit failed"),
                }
            }
        }
    }
    tracing::info!(open_windows = windows.len(), "push projector stopping");
    Ok(())
}

async fn retry_store<T, F, Fut>(
    mut f: F,
    token: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut failures = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && !token.is_cancelled() => {
                failures += 1;
                tracing::warn!(error = %e, "Cassandra read failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << failures.min(6))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until the history projector wrote every event of `partition` up
/// to `offset` (at most `wait`). False when the wait ran out.
async fn history_barrier(
    store: &Store,
    partition: i32,
    offset: i64,
    wait: Duration,
) -> Result<bool, StoreError> {
    let deadline = Instant::now() + wait;
    loop {
        let progress = store.progress(HISTORY_PROJECTOR).await?;
        if progress.get(&partition).is_some_and(|n| *n > offset) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Makes and appends the tasks of one window.
#[allow(clippy::too_many_arguments)]
async fn flush(
    config: &PushConfig,
    producer: &EventProducer,
    topics: &Topics,
    store: &Store,
    devices: &Devices,
    metrics: &Metrics,
    chat: Uuid,
    w: &Window,
) -> anyhow::Result<()> {
    if !history_barrier(
        store,
        w.partition,
        w.last_offset,
        Duration::from_millis(config.history_wait_ms),
    )
    .await?
    {
        tracing::warn!(%chat, "history projector behind; badge and members may be stale");
    }
    let Some(last) = w.msgs.last() else {
        return Ok(());
    };
    let chat_row = store.chat(chat).await?;
    let direct = chat_row.as_ref().is_some_and(|c| c.kind == "direct");
    let title = chat_row.as_ref().and_then(|c| c.title.clone());
    let now = now_ms();
    let mut out = Vec::new();
    for (user, _role, joined_seq) in store.members(chat).await? {
        let mine: Vec<&Msg> = w
            .msgs
            .iter()
            .filter(|m| m.sender != user && m.seq >= joined_seq)
            .collect();
        let Some(latest) = mine.last() else { continue };
        let regs = devices.registrations(store, &user).await?;
        let offline: Vec<_> = regs
            .into_iter()
            .filter(|r| {
                let on = devices.connected(&user, &r.device);
                if on {
                    metrics.online.inc();
                }
                !on
            })
            .collect();
        if offline.is_empty() {
            continue;
        }
        let mention = format!("@{user}");
        let kind = if direct {
            "direct"
        } else if mine
            .iter()
            .any(|m| m.text.as_deref().is_some_and(|t| t.contains(&mention)))
        {
            "mention"
        } else {
            "message"
        };
        let (muted, badge) = badge(store, &user, chat, last.seq).await?;
        let always = config.always_push.iter().any(|k| k == kind);
        if muted && !always {
            metrics.muted.inc();
            continue;
        }
        // Do-not-disturb holds the task back until it ends (the workers
        // honour not_before), except for allowed chats and always_push kinds.
        let not_before = match devices.settings(store, &user).await? {
            Some(s) if !always && !s.allowed_chats.contains(&chat) => {
                dnd_until(&s, now).unwrap_or(now)
            }
            _ => now,
        };
        if not_before > now {
            metrics.held.inc();
        }
        let preview = preview(latest, config.preview_chars);
        for reg in offline {
            let dedupe_key = format!("{chat}:{}:{}", latest.seq, reg.device);
            let task = PushTask {
                user_id: user.clone(),
                chat_id: chat,
                seq: latest.seq,
                title: if direct {
                    latest.sender.clone()
                } else {
                    title.clone().unwrap_or_else(|| latest.sender.clone())
                },
                body_preview: preview.clone(),
                attempt: 1,
                not_before,
                device_id: Some(reg.device.clone()),
                provider: Some(reg.provider.clone()),
                token: Some(reg.token.clone()),
                locale: reg.locale.clone(),
                count: Some(mine.len() as u32),
                badge: Some(badge),
                collapse_key: Some(chat.to_string()),
                dedupe_key: Some(dedupe_key.clone()),
                sender_id: Some(latest.sender.clone()),
                kind: Some(kind.into()),
                created_ts: Some(now),
            };
            let id = Uuid::new_v5(&Uuid::NAMESPACE_OID, dedupe_key.as_bytes());
            out.push(Outgoing {
                topic: topics.push.clone(),
                partition: None,
                key: user.clone(),
                envelope: Envelope {
                    event_id: id,
                    chat_id: Some(chat),
                    seq: Some(latest.seq),
                    sender_user: latest.sender.clone(),
                    sender_device: "push".into(),
                    client_msg_id: None,
                    client_ts: None,
                    server_ts: now,
                    sequenced_ts: None,
                    trace_id: id.simple().to_string(),
                    body: Body::PushTask(task),
                },
                headers: Vec::new(),
            });
        }
    }
    let n = out.len() as u64;
    if !out.is_empty() {
        producer.send_batch(out).await?;
    }
    metrics.tasks.inc_by(n);
    store.put_push_notified(chat, last.seq).await?;
    tracing::debug!(%chat, tasks = n, messages = w.msgs.len(), "window flushed");
    Ok(())
}

/// Whether `user` muted `chat`, and their unread total over all chats
/// (as the `chats` frame counts it), `chat` counted up to at least `seq`.
async fn badge(store: &Store, user: &str, chat: Uuid, seq: u64) -> Result<(bool, u32), StoreError> {
    let rows = store.user_chats(user).await?;
    let mut muted = false;
    let mut total = 0u64;
    for r in rows {
        let last_seq = store.chat(r.chat_id).await?.map_or(0, |c| c.last_seq);
        let last_seq = if r.chat_id == chat {
            muted = r.muted;
            last_seq.max(seq)
        } else {
            last_seq
        };
        let end = r.left_seq.unwrap_or(last_seq);
        let read_from = r.last_read_seq.max(r.joined_seq.saturating_sub(1));
        total += end.saturating_sub(read_from);
    }
    Ok((muted, u32::try_from(total).unwrap_or(u32::MAX)))
}

/// When `settings`' do-not-disturb ends (ms since the epoch), if it is on
/// at `now_ms` in the user's time zone; None when it is off. An unknown
/// time zone counts as UTC. A schedule ending in a skipped local hour (DST)
/// ends at the first valid instant after.
pub fn dnd_until(settings: &PushSettings, now_ms: i64) -> Option<i64> {
    use chrono::{Duration as Days, TimeZone, Timelike};
    let (start, end) = settings.dnd?;
    let tz: chrono_tz::Tz = settings.time_zone.parse().unwrap_or(chrono_tz::UTC);
    let local = tz.timestamp_millis_opt(now_ms).single()?;
    let minute = local.hour() * 60 + local.minute();
    let on = if start < end {
        minute >= start && minute < end
    } else {
        minute >= start || minute < end
    };
    if !on {
        return None;
    }
    let mut day = local.date_naive();
    if minute >= end {
        day += Days::days(1);
    }
    let mut at = day.and_hms_opt(end / 60, end % 60, 0)?;
    for _ in 0..4 {
        if let Some(t) = tz.from_local_datetime(&at).earliest() {
            return Some(t.timestamp_millis());
        }
        at += Days::minutes(30);
    }
    None
}

fn preview(m: &Msg, chars: usize) -> Option<String> {
    if chars == 0 {
        return None;
    }
    let text: String = m
        .text
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(chars)
        .collect();
    Some(match (m.media, text.is_empty()) {
        (true, true) => "[media]".into(),
        (true, false) => format!("[media] {text}"),
        _ => text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(user: &str, body: Body) -> Envelope {
        Envelope {
            event_id: Uuid::new_v4(),
            chat_id: None,
            seq: None,
            sender_user: user.into(),
            sender_device: "d".into(),
            client_msg_id: None,
            client_ts: None,
            server_ts: 1,
            sequenced_ts: None,
            trace_id: "t".into(),
            body,
        }
    }

    #[test]
    fn sessions_and_registrations_fold() {
        let mut s = DeviceState::default();
        let sid = Uuid::new_v4();
        s.apply(&env(
            "bob",
            Body::SessionOpened(chat_schemas::SessionOpened {
                gateway_id: "g".into(),
                device_id: "phone".into(),
                session_id: sid,
                opened_at: 1,
            }),
        ));
        assert!(s.sessions.contains_key(&("bob".into(), "phone".into())));
        s.apply(&env(
            "bob",
            Body::SessionClosed(chat_schemas::SessionClosed {
                gateway_id: "g".into(),
                device_id: "phone".into(),
                session_id: sid,
                reason: "gateway_expired".into(),
            }),
        ));
        assert!(s.sessions.is_empty());
        s.apply(&env(
            "bob",
            Body::PushRegistrationChanged(chat_schemas::PushRegistrationChanged {
                device_id: "phone".into(),
                provider: "fcm".into(),
                token: Some("tok".into()),
                locale: None,
                reason: Some("client".into()),
                provider_detail: None,
            }),
        ));
        let reg = |s: &DeviceState| s.regs["bob"]["phone"].clone();
        assert_eq!(reg(&s).map(|r| r.token), Some("tok".to_string()));
        s.apply(&env(
            "bob",
            Body::DeviceRevoked(chat_schemas::DeviceRevoked {
                device_id: "phone".into(),
                revoked_at: 2,
            }),
        ));
        assert!(reg(&s).is_none());
    }

    #[test]
    fn dnd_holds_until_its_end_in_the_users_time_zone() {
        // 2026-01-10 23:30 in Kolkata (UTC+5:30) = 18:00 UTC.
        let now = 1_768_068_000_000;
        let s = |tz: &str, dnd| PushSettings {
            time_zone: tz.into(),
            dnd,
            allowed_chats: Vec::new(),
        };
        // 22:00-07:00 local: on; ends 07:00 the next local day = 01:30 UTC.
        assert_eq!(
            dnd_until(&s("Asia/Kolkata", Some((1320, 420))), now),
            Some(now + 7 * 3_600_000 + 30 * 60_000)
        );
        // The same schedule in UTC: 18:00 is outside it.
        assert_eq!(dnd_until(&s("UTC", Some((1320, 420))), now), None);
        // 12:00-20:00 UTC: on, ends at 20:00 the same day.
        assert_eq!(
            dnd_until(&s("UTC", Some((720, 1200))), now),
            Some(now + 2 * 3_600_000)
        );
        assert_eq!(dnd_until(&s("UTC", None), now), None);
    }

    #[test]
    fn preview_truncates_and_marks_media() {
        let m = Msg {
            seq: 1,
            sender: "a".into(),
            text: Some("héllo world".into()),
            media: false,
        };
        assert_eq!(preview(&m, 5).as_deref(), Some("héllo"));
        assert_eq!(preview(&m, 0), None);
        let m = Msg {
            media: true,
            text: None,
            ..m
        };
        assert_eq!(preview(&m, 5).as_deref(), Some("[media]"));
    }
}
