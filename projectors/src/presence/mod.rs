//! The presence service (`chat-presence`): `chat.sessions` -> `chat.presence`
//! and the `presence` and `user_devices` tables.
//!
//! - **Aggregator.** A consumer-group member (group `group_id`) on
//!   `chat.sessions`, which is keyed by user, so all sessions of a user are in
//!   one partition. For each partition it owns it folds the partition from
//!   the beginning into a [`PresenceState`] (sessions per user, hidden
//!   flags, gateways and their heartbeats), then for each new record appends
//!   the `PresenceChanged` it implies to `chat.presence` (same partition
//!   number, keyed by user). At-least-once: a repeated presence fact is
//!   harmless (it is a state, not a delta).
//! - **Expiry by log time.** A gateway is expired when the partition's own
//!   records say it was silent for `gateway_ttl_ms`: the fold's log clock
//!   (see [`PresenceState`]) moves only with gateways' heartbeats, as their
//!   own clocks say. So a member that stalls (SIGSTOP, a long rebuild, a
//!   blocked write) reads the heartbeats written meanwhile in order and
//!   expires nobody alive. Once a second the sessions of every gateway the
//!   log clock passed by the TTL are closed by appending `SessionClosed`
//!   (reason `gateway_expired`); the delivery router and this fold then
//!   treat them like any close. A gateway restarting under the same id (new
//!   `instance_id`) gets its earlier sessions closed the same way
//!   (`gateway_restarted`).
//! - **The last gateway.** If no gateway writes heartbeats at all (the only
//!   one died), the log clock stands still. Then, and only then, the wall
//!   clock counts: when the log clock has not moved for more than the TTL of
//!   wall time *and* this member has folded the partition up to its high
//!   watermark asked of the broker at that moment, the wall time since the
//!   clock last moved is added to it. A member that was stopped or slow is
//!   not caught up (the live gateways' heartbeats wait in the partition), so
//!   it never acts on its own stall. A restarted gateway (new instance) or
//!   any other gateway's heartbeats also close the dead one's sessions.
//! - **Wrong closes heal.** Should a live gateway's sessions be expired
//!   anyway (its heartbeats could not be written for the TTL, a clock
//!   stepped), the delivery router forwards each `gateway_expired` close to
//!   that gateway, which re-announces (`SessionOpened`, same session id) the
//!   sessions whose connection is still open: the router and this fold open
//!   them again. Live events routed between the close and the re-open are
//!   caught by the gateway's gap fill, as after any routing race.
//! - **Devices off the fold's path.** `user_devices` writes (device seen,
//!   revoked) are queued to one writer task ([`DeviceWrites`]): the fold
//!   never waits on Cassandra (unless more than `MAX_PENDING_DEVICES`
//!   devices are pending). Offsets are committed when the writes queued
//!   before them are done: at-least-once, idempotent writes.
//! - **Durable settings.** `PresenceSettingChanged` and `DeviceRevoked` are
//!   copied from `chat.sessions` (7-day retention) to the compacted
//!   `chat.user-settings` (same partition number; key: the user for the
//!   hidden flag, user NUL device for a revocation) before the offset is
//!   committed. A rebuild applies `chat.user-settings` first, then the
//!   `chat.sessions` partition, and writes the revocations found there to
//!   `user_devices` again: hidden users stay hidden and revoked devices stay
//!   revoked after the original records expired.
//! - **Projection.** A second consumer (group `table_group_id`) projects
//!   `chat.presence` into `presence`, with `USING TIMESTAMP` of the record
//!   time: replaying the compacted topic rebuilds the table.

mod state;

pub use state::{Effect, PresenceState};

use chat_log::{
    BatchRecord, EventConsumer, EventProducer, HandlerError, LogConfig, Outgoing,
    PartitionedConsumer, SchemaRegistry, TailItem, TailStart, TopicTail, Topics,
};
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{now_ms, Health, Shutdown};
use chat_schemas::{Body, Envelope, PresenceChanged, PresenceStatus, SessionClosed};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use crate::store::{PresenceRow, Store, StoreConfig};

/// `chat-presence`'s config (TOML file plus `CHAT_*` overrides).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Where `/health` and `/metrics` are served.
    pub listen: SocketAddr,
    /// Consumer group of the aggregators on `chat.sessions`.
    pub group_id: String,
    /// Consumer group of the `presence` table projection on `chat.presence`.
    pub table_group_id: String,
    /// A gateway whose heartbeats stop for this long has its sessions closed.
    pub gateway_ttl_ms: u64,
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// Kafka and the schema registry.
    pub log: LogConfig,
    /// Cassandra.
    pub store: StoreConfig,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9104)),
            group_id: "presence".into(),
            table_group_id: "presence-table".into(),
            gateway_ttl_ms: 15_000,
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

impl chat_runtime::ServiceConfig for PresenceConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()?;
        self.store.check()
    }
}

/// Every option of `chat-presence`, for `--help`.
pub const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by an environment
variable CHAT_<KEY>, nested keys joined by a double underscore):
  listen                admin address (/health, /metrics)           [127.0.0.1:9104]
  group_id              consumer group on chat.sessions             [presence]
  table_group_id        consumer group projecting chat.presence     [presence-table]
  gateway_ttl_ms        silent gateway -> its sessions closed        [15000]
  log_format            pretty | json                               [pretty]
  log.*                 Kafka and registry (brokers, security_protocol, sasl_*,
                        ssl_*, ...: see chat-gateway --help)
  store.*               Cassandra (nodes, keyspace, username, password,
                        consistency, tls: see chat-gateway --help)";

#[derive(Clone, Default)]
struct Metrics {
    changes: Counter,
    expired: Counter,
    online: Gauge,
}

/// Runs the aggregator and the table projection until `shutdown`.
pub async fn run(config: PresenceConfig, store: Store, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    let metrics = Metrics::default();
    let mut reg = Registry::with_prefix("chat_presence");
    reg.register(
        "changes",
        "PresenceChanged records appended",
        metrics.changes.clone(),
    );
    reg.register(
        "expired_sessions",
        "Sessions closed because their gateway stopped or restarted",
        metrics.expired.clone(),
    );
    reg.register(
        "online_users",
        "Users with an open session in the owned partitions",
        metrics.online.clone(),
    );
    let (addr, admin) = chat_runtime::serve_admin(
        config.listen,
        health.clone(),
        Arc::new(reg),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "chat-presence admin endpoint");
    let registry = Arc::new(SchemaRegistry::new(&config.log)?);
    registry.check_reachable().await?;
    let producer = EventProducer::connect(&config.log, registry.clone()).await?;
    let topics = Topics::new(&config.log);
    // The durable home of the settings must exist (`chat-admin topics`).
    chat_log::topics::check_topics_exist(&config.log, std::slice::from_ref(&topics.user_settings))
        .await?;

    let table = tokio::spawn(project_table(
        config.clone(),
        store.clone(),
        producer.clone(),
        topics.clone(),
        shutdown.clone(),
    ));
    let result = aggregate(
        &config,
        registry,
        producer.clone(),
        &topics,
        &store,
        &metrics,
        &shutdown,
    )
    .await;
    shutdown.trigger();
    table.await.ok();
    producer.flush(Duration::from_secs(5)).await.ok();
    admin.await.ok();
    result
}

async fn aggregate(
    config: &PresenceConfig,
    registry: Arc<SchemaRegistry>,
    producer: EventProducer,
    topics: &Topics,
    store: &Store,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut consumer = PartitionedConsumer::connect(
        &config.log,
        registry.clone(),
        &config.group_id,
        &topics.sessions,
    )
    .await?;
    let token = shutdown.token();
    let devices = DeviceWrites::spawn(store.clone(), token.clone());
    let mut states: HashMap<i32, PresenceState> = HashMap::new();
    // Per partition: the offset after the last record folded.
    let mut folded: HashMap<i32, i64> = HashMap::new();
    // Per partition: the log clock and the wall time it last moved.
    let mut moved: HashMap<i32, (i64, i64)> = HashMap::new();
    let ttl = config.gateway_ttl_ms as i64;
    let mut last_expiry = now_ms();
    // Wake at least once a second to check expiry and commit offsets:
    // cancelling the wait for a first record loses nothing.
    let arm = |tick: &tokio_util::sync::CancellationToken| {
        let tick = tick.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tick.cancel();
        })
    };
    let mut tick = token.child_token();
    let mut waker = arm(&tick);
    loop {
        if tick.is_cancelled() {
            tick = token.child_token();
            waker = arm(&tick);
        }
        let batch = consumer
            .next_batch(500, Duration::from_millis(2), &tick)
            .await?;
        if token.is_cancelled() {
            break;
        }
        if let Some(batch) = batch {
            let p = batch.partition;
            if batch.fresh || !states.contains_key(&p) {
                let (state, revoked) = rebuild(
                    &config.log,
                    registry.clone(),
                    topics,
                    p,
                    batch.first_offset(),
                )
                .await?;
                // Revocations older than chat.sessions' retention are only
                // in chat.user-settings: write them again (idempotent), so a
                // rebuilt user_devices table has them too.
                devices.queue(None, revoked).await;
                moved.insert(p, (state.clock(), now_ms()));
                states.insert(p, state);
            }
            let Some(state) = states.get_mut(&p) else {
                continue;
            };
            let mut effects = Vec::new();
            let mut settings = Vec::new();
            // What nobody can read goes to chat.dlq before the offset moves
            // past it (a failure retries the batch like a failed produce).
            let dead = chat_log::dlq::dead_letter_undecodable(
                &producer,
                &topics.dlq,
                &config.group_id,
                &topics.sessions,
                p,
                &batch.records,
            )
            .await;
            if let Err(e) = dead {
                tracing::warn!(partition = p, error = %e, "dead-lettering failed; retrying the batch");
                states.remove(&p);
                consumer.rewind(p, batch.first_offset()).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            for rec in &batch.records {
                if let BatchRecord::Event(ev) = rec {
                    // Re-driven from the DLQ for another consumer group.
                    if chat_log::dlq::redriven_elsewhere(&ev.headers, &config.group_id) {
                        continue;
                    }
                    effects.extend(state.apply(&ev.envelope));
                    if let Some(copy) = setting_copy(&ev.envelope, p, topics) {
                        settings.push(copy);
                    }
                }
            }
            let (out, writes) = split(effects, p, topics, metrics);
            match produce(out, settings, &producer).await {
                Ok(()) => {
                    // The offset is committed once the device writes of
                    // this batch (and of every batch before) are done.
                    devices.queue(Some((p, batch.next_offset())), writes).await;
                    folded.insert(p, batch.next_offset());
                    let clock = state.clock();
                    if moved.get(&p).is_none_or(|(c, _)| *c != clock) {
                        moved.insert(p, (clock, now_ms()));
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "presence effects failed; retrying the batch");
                    states.remove(&p);
                    consumer.rewind(p, batch.first_offset()).await?;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        for (p, offset) in devices.done() {
            // Only partitions still folded here (a lost one is its new
            // owner's to commit).
            if states.contains_key(&p) {
                if let Err(e) = consumer.commit_offset_async(p, offset) {
                    tracing::warn!(partition = p, error = %e, "offset commit failed");
                }
            }
        }
        let now = now_ms();
        if now - last_expiry >= 1000 {
            last_expiry = now;
            // Forget partitions lost in a rebalance: their new owner expires
            // their gateways (a gained one is rebuilt at its first batch).
            states.retain(|p, _| consumer.owns(*p));
            for (p, state) in states.iter_mut() {
                let idle = match moved.get(p) {
                    Some((_, at)) if now - at > ttl => {
                        caught_up_idle(&consumer, &config.log, *p, &folded, now - at).await
                    }
                    _ => 0,
                };
                let effects = state.expire(ttl, idle);
                if !effects.is_empty() {
                    tracing::info!(
                        partition = p,
                        sessions = effects.len(),
                        log_clock = state.clock(),
                        idle_ms = idle,
                        "closing sessions of silent gateways"
                    );
                    let (out, _) = split(effects, *p, topics, metrics);
                    if let Err(e) = produce(out, Vec::new(), &producer).await {
                        tracing::warn!(error = %e, "could not close expired sessions; the next heartbeat check retries");
                    }
                }
            }
            metrics
                .online
                .set(states.values().map(|s| s.online_users() as i64).sum());
        }
    }
    waker.abort();
    tracing::info!("presence aggregator stopping");
    Ok(())
}

/// The wall-clock fallback: when no heartbeat moved partition `p`'s log
/// clock for `idle` ms, that time counts for expiry only if this member has
/// folded everything the partition holds *now* (asked of the broker now, so
/// a member that was stopped or slow sees its backlog first and waits).
/// Then no gateway wrote a heartbeat for `idle` ms: the last one died.
async fn caught_up_idle(
    consumer: &PartitionedConsumer,
    log: &LogConfig,
    p: i32,
    folded: &HashMap<i32, i64>,
    idle: i64,
) -> i64 {
    let timeout = Duration::from_millis(log.connect_timeout_ms);
    match consumer.high_watermark(p, timeout).await {
        Ok(high) if folded.get(&p).is_some_and(|f| *f >= high) => idle,
        Ok(_) => 0,
        Err(e) => {
            tracing::debug!(partition = p, error = %e, "high watermark unknown; no idle expiry");
            0
        }
    }
}

/// The fold of partition `p` of `chat.sessions` before offset `until`, on
/// top of the partition's settings in `chat.user-settings` (hidden flags and
/// revocations older than `chat.sessions`' retention); also returns the
/// revocations found there. The settings are applied first, then the
/// sessions log in order: a setting still in `chat.sessions` is applied
/// again in its place, so the latest one wins.
async fn rebuild(
    config: &LogConfig,
    registry: Arc<SchemaRegistry>,
    topics: &Topics,
    p: i32,
    until: i64,
) -> anyhow::Result<(PresenceState, Vec<Effect>)> {
    let mut state = PresenceState::default();
    let mut revoked = Vec::new();
    let settings = TopicTail::open(
        config,
        registry.clone(),
        &topics.user_settings,
        Some(vec![p]),
        TailStart::Beginning,
    )
    .await?;
    settings
        .read_to_end(|item| {
            if let TailItem::Event(ev) = item {
                for effect in state.apply(&ev.envelope) {
                    if matches!(effect, Effect::DeviceRevoked { .. }) {
                        revoked.push(effect);
                    }
                }
            }
        })
        .await?;
    drop(settings);
    let tail = TopicTail::open(
        config,
        registry,
        &topics.sessions,
        Some(vec![p]),
        TailStart::Beginning,
    )
    .await?;
    tail.read_until(&HashMap::from([(p, until)]), |item| {
        if let TailItem::Event(ev) = item {
            state.apply(&ev.envelope);
        }
    })
    .await?;
    Ok((state, revoked))
}

/// The `chat.user-settings` key of a setting: the user for the hidden flag,
/// the user and the device (NUL between) for a revocation.
pub fn setting_key(ev: &Envelope) -> Option<String> {
    match &ev.body {
        Body::PresenceSettingChanged(_) => Some(ev.sender_user.clone()),
        Body::DeviceRevoked(r) => Some(format!("{}\u{0}{}", ev.sender_user, r.device_id)),
        _ => None,
    }
}

/// A user setting of `chat.sessions`, copied as it is to the same partition
/// of the compacted `chat.user-settings`.
fn setting_copy(ev: &Envelope, p: i32, topics: &Topics) -> Option<Outgoing> {
    Some(Outgoing {
        topic: topics.user_settings.clone(),
        partition: Some(p),
        key: setting_key(ev)?,
        envelope: ev.clone(),
        headers: Vec::new(),
    })
}

fn envelope(user: &str, body: Body) -> Envelope {
    let id = Uuid::new_v4();
    Envelope {
        event_id: id,
        chat_id: None,
        seq: None,
        sender_user: user.to_string(),
        sender_device: "presence".into(),
        client_msg_id: None,
        client_ts: None,
        server_ts: now_ms(),
        sequenced_ts: None,
        trace_id: id.simple().to_string(),
        body,
    }
}

/// Splits effects into records to append and `user_devices` writes.
fn split(
    effects: Vec<Effect>,
    p: i32,
    topics: &Topics,
    metrics: &Metrics,
) -> (Vec<Outgoing>, Vec<Effect>) {
    let mut out = Vec::new();
    let mut writes = Vec::new();
    for effect in effects {
        match effect {
            Effect::Presence {
                user,
                status,
                last_seen,
            } => {
                metrics.changes.inc();
                out.push(Outgoing {
                    topic: topics.presence.clone(),
                    partition: Some(p),
                    key: user.clone(),
                    envelope: envelope(
                        &user,
                        Body::PresenceChanged(PresenceChanged {
                            user_id: user.clone(),
                            status,
                            last_seen,
                        }),
                    ),
                    headers: Vec::new(),
                });
            }
            Effect::Close {
                user,
                session,
                gateway,
                device,
                reason,
            } => {
                metrics.expired.inc();
                out.push(Outgoing {
                    topic: topics.sessions.clone(),
                    partition: Some(p),
                    key: user.clone(),
                    envelope: envelope(
                        &user,
                        Body::SessionClosed(SessionClosed {
                            gateway_id: gateway,
                            device_id: device,
                            session_id: session,
                            reason: reason.into(),
                        }),
                    ),
                    headers: Vec::new(),
                });
            }
            w @ (Effect::DeviceSeen { .. } | Effect::DeviceRevoked { .. }) => writes.push(w),
        }
    }
    (out, writes)
}

async fn produce(
    out: Vec<Outgoing>,
    settings: Vec<Outgoing>,
    producer: &EventProducer,
) -> anyhow::Result<()> {
    let mut all = settings;
    all.extend(out);
    if !all.is_empty() {
        producer.send_batch(all).await?;
    }
    Ok(())
}

/// Most distinct devices with a `user_devices` write pending; past it the
/// fold waits for the writer (a long Cassandra outage). Waiting is harmless
/// to sessions: expiry follows log time, not how fast the fold goes.
const MAX_PENDING_DEVICES: usize = 100_000;

/// `user_devices` writes, off the fold's path. The fold queues them (no
/// I/O) with the offset the batch ends at; one task writes everything
/// queued, retrying until Cassandra answers, and only then hands the
/// offsets back for commit: at-least-once, and the writes are idempotent
/// (`USING TIMESTAMP` of the record time). Writes to one device coalesce
/// (earliest and latest `seen`, latest revocation), so a backlog costs
/// memory per device, not per record.
struct DeviceWrites {
    pending: std::sync::Mutex<Pending>,
    done: std::sync::Mutex<HashMap<i32, i64>>,
    wake: tokio::sync::Notify,
}

/// (user, device) -> (earliest seen, latest seen, latest revocation)
type DeviceCells = HashMap<(String, String), (Option<i64>, Option<i64>, Option<i64>)>;

#[derive(Default)]
struct Pending {
    writes: DeviceCells,
    /// partition -> offset to commit once the writes queued before are done
    marks: HashMap<i32, i64>,
}

impl Pending {
    fn add(&mut self, effect: Effect) {
        let (user, device, seen, revoked) = match effect {
            Effect::DeviceSeen { user, device, at } => (user, device, Some(at), None),
            Effect::DeviceRevoked { user, device, at } => (user, device, None, Some(at)),
            _ => return,
        };
        let w = self.writes.entry((user, device)).or_default();
        let min = |a: Option<i64>, b: Option<i64>| a.into_iter().chain(b).min();
        let max = |a: Option<i64>, b: Option<i64>| a.into_iter().chain(b).max();
        *w = (min(w.0, seen), max(w.1, seen), max(w.2, revoked));
    }

    fn merge(&mut self, older: Pending) {
        for ((user, device), (first, last, revoked)) in older.writes {
            for at in [first, last].into_iter().flatten() {
                self.add(Effect::DeviceSeen {
                    user: user.clone(),
                    device: device.clone(),
                    at,
                });
            }
            if let Some(at) = revoked {
                self.add(Effect::DeviceRevoked {
                    user: user.clone(),
                    device: device.clone(),
                    at,
                });
            }
        }
        // Marks queued since are later and now also wait for these writes.
        for (p, o) in older.marks {
            self.marks.entry(p).or_insert(o);
        }
    }
}

impl DeviceWrites {
    fn spawn(store: Store, stop: tokio_util::sync::CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self {
            pending: Default::default(),
            done: Default::default(),
            wake: tokio::sync::Notify::new(),
        });
        tokio::spawn(me.clone().run(store, stop));
        me
    }

    /// Queues `writes`, then `mark` (partition, offset to commit after them).
    /// Waits only while more than [`MAX_PENDING_DEVICES`] are pending.
    async fn queue(&self, mark: Option<(i32, i64)>, writes: Vec<Effect>) {
        loop {
            let full = self
                .pending
                .lock()
                .map(|p| p.writes.len() >= MAX_PENDING_DEVICES)
                .unwrap_or(false);
            if !full {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Ok(mut p) = self.pending.lock() {
            for w in writes {
                p.add(w);
            }
            if let Some((partition, offset)) = mark {
                p.marks.insert(partition, offset);
            }
        }
        self.wake.notify_one();
    }

    /// Offsets whose writes are all done, to commit.
    fn done(&self) -> Vec<(i32, i64)> {
        self.done
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default()
    }

    async fn run(self: Arc<Self>, store: Store, stop: tokio_util::sync::CancellationToken) {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let batch = self
                .pending
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default();
            if batch.writes.is_empty() && batch.marks.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            match write_devices(&store, &batch.writes).await {
                Ok(()) => {
                    failures = 0;
                    if let Ok(mut d) = self.done.lock() {
                        d.extend(batch.marks);
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, devices = batch.writes.len(), "user_devices writes failed; retrying");
                    if let Ok(mut p) = self.pending.lock() {
                        p.merge(batch);
                    }
                    let backoff = 200u64 << failures.min(5);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(backoff)) => {}
                    }
                }
            }
        }
    }
}

async fn write_devices(store: &Store, writes: &DeviceCells) -> anyhow::Result<()> {
    let all: Vec<_> = writes.iter().collect();
    for chunk in all.chunks(32) {
        let chunk = chunk
            .iter()
            .map(|((user, device), (first, last, revoked))| async move {
                for at in [*first, *last].into_iter().flatten() {
                    store.device_seen(user, device, at).await?;
                    if first == last {
                        break;
                    }
                }
                if let Some(at) = revoked {
                    store.device_revoked(user, device, *at).await?;
                }
                Ok::<_, crate::store::StoreError>(())
            });
        futures::future::try_join_all(chunk).await?;
    }
    Ok(())
}

/// `chat.presence` -> `presence`.
async fn project_table(
    config: PresenceConfig,
    store: Store,
    producer: EventProducer,
    topics: Topics,
    shutdown: Shutdown,
) {
    let consumer = match EventConsumer::connect(
        &config.log,
        &config.table_group_id,
        &[&topics.presence],
        producer,
        &topics.dlq,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "presence table projection could not start");
            shutdown.trigger();
            return;
        }
    };
    let handler = |ev: chat_log::ConsumedEvent| {
        let store = store.clone();
        async move {
            let Body::PresenceChanged(p) = &ev.envelope.body else {
                return Ok(());
            };
            let row = PresenceRow {
                user: p.user_id.clone(),
                status: match p.status {
                    PresenceStatus::Online => "online".into(),
                    PresenceStatus::Offline => "offline".into(),
                },
                last_seen_ms: p.last_seen,
            };
            store
                .put_presence(&row, ev.envelope.server_ts)
                .await
                .map_err(|e| HandlerError::Retry(e.to_string()))
        }
    };
    if let Err(e) = consumer.run(handler, shutdown.token()).await {
        tracing::error!(error = %e, "presence table projection stopped");
        shutdown.trigger();
    }
}
