//! The presence service (`chat-presence`): `chat.sessions` -> `chat.presence`
//! and the `presence` and `user_devices` tables.
//!
//! - **Aggregator.** A consumer-group member (group `group_id`) on
//!   `chat.sessions`, which is keyed by user, so all sessions of a user are in
//!   one partition. For each partition it owns it folds the partition from
//!   the beginning into a [`PresenceState`] (sessions per user, hidden
//!   flags, gateways and their heartbeats), then for each new record appends
//!   the `PresenceChanged` it implies to `chat.presence` (same partition
//!   number, keyed by user) and records devices in `user_devices`. Offsets
//!   are committed after those writes: at-least-once; a repeated presence
//!   fact is harmless (it is a state, not a delta).
//! - **Expiry.** Once a second, the sessions of every gateway whose
//!   `GatewayHeartbeat` has not been seen for `gateway_ttl_ms` are closed by
//!   appending `SessionClosed` (reason `gateway_expired`) to `chat.sessions`:
//!   the delivery router and this fold then treat them like any close. A
//!   gateway restarting under the same id (new `instance_id`) gets its
//!   earlier sessions closed the same way (`gateway_restarted`).
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
    let mut states: HashMap<i32, PresenceState> = HashMap::new();
    let token = shutdown.token();
    let ttl = config.gateway_ttl_ms as i64;
    let mut last_expiry = now_ms();
    // Wake at least once a second to expire silent gateways: cancelling the
    // wait for a first record loses nothing. One timer a second, not one per
    // batch.
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
                let state = rebuild(
                    &config.log,
                    registry.clone(),
                    &topics.sessions,
                    p,
                    batch.first_offset(),
                )
                .await?;
                states.insert(p, state);
            }
            let Some(state) = states.get_mut(&p) else {
                continue;
            };
            let mut effects = Vec::new();
            for rec in &batch.records {
                if let BatchRecord::Event(ev) = rec {
                    effects.extend(state.apply(&ev.envelope, now_ms()));
                }
            }
            match carry_out(effects, p, &producer, topics, store, metrics).await {
                Ok(()) => consumer.commit_offset_async(p, batch.next_offset())?,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "presence effects failed; retrying the batch");
                    states.remove(&p);
                    consumer.rewind(p, batch.first_offset()).await?;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let now = now_ms();
        if now - last_expiry >= 1000 {
            last_expiry = now;
            for (p, state) in states.iter_mut() {
                let effects = state.expire(now, ttl);
                if !effects.is_empty() {
                    tracing::info!(
                        partition = p,
                        sessions = effects.len(),
                        "closing sessions of silent gateways"
                    );
                    if let Err(e) = carry_out(effects, *p, &producer, topics, store, metrics).await
                    {
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

/// The fold of partition `p` of `chat.sessions` before offset `until`. Record
/// times stand in for the clock, so gateways silent since before the rebuild
/// expire at the first check after it.
async fn rebuild(
    config: &LogConfig,
    registry: Arc<SchemaRegistry>,
    topic: &str,
    p: i32,
    until: i64,
) -> anyhow::Result<PresenceState> {
    let tail =
        TopicTail::open(config, registry, topic, Some(vec![p]), TailStart::Beginning).await?;
    let mut state = PresenceState::default();
    tail.read_until(&HashMap::from([(p, until)]), |item| {
        if let TailItem::Event(ev) = item {
            state.apply(&ev.envelope, ev.envelope.server_ts);
        }
    })
    .await?;
    Ok(state)
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

async fn carry_out(
    effects: Vec<Effect>,
    p: i32,
    producer: &EventProducer,
    topics: &Topics,
    store: &Store,
    metrics: &Metrics,
) -> anyhow::Result<()> {
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
            Effect::DeviceSeen { user, device, at } => writes.push((user, device, at, false)),
            Effect::DeviceRevoked { user, device, at } => writes.push((user, device, at, true)),
        }
    }
    for chunk in writes.chunks(32) {
        let chunk = chunk.iter().map(|(user, device, at, revoked)| async move {
            if *revoked {
                store.device_revoked(user, device, *at).await
            } else {
                store.device_seen(user, device, *at).await
            }
        });
        futures::future::try_join_all(chunk).await?;
    }
    if !out.is_empty() {
        producer.send_batch(out).await?;
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
