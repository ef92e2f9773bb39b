//! The router's two loops: the session registry tail and the event router.

use chat_log::{
    deliveries_partition, events_position, BatchRecord, EventProducer, LogConfig, Outgoing,
    PartitionedConsumer, SchemaRegistry, TailItem, TailStart, TopicTail, Topics,
    HEADER_EVENTS_POSITION, HEADER_RECIPIENTS,
};
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{now_ms, Health, Shutdown};
use chat_schemas::{Body, Envelope, SessionRouted};
use chat_sequencer::state::{FoldError, PartitionState, RebuildError};
use chat_sequencer::store::{changelog_records, restore, Applied, RestoreCtx, StateConfig, Store};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

use crate::sessions::Sessions;

/// The router's config (`chat-router --help` lists every key).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Admin endpoint (`/health`, `/metrics`).
    pub listen: SocketAddr,
    /// Consumer group of all router instances on `chat.events`.
    pub group_id: String,
    /// Most events routed per batch.
    pub batch_max: usize,
    /// How long a batch waits for more events after the first, in microseconds.
    pub batch_linger_us: u64,
    /// The membership store (`state.dir`, `state.cache_chats`, ...).
    pub state: StateConfig,
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// Kafka and the registry.
    pub log: LogConfig,
}

impl chat_runtime::ServiceConfig for RouterConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9103)),
            group_id: "router".into(),
            batch_max: 500,
            batch_linger_us: 500,
            state: StateConfig::default(),
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Default)]
struct Metrics {
    events: Counter,
    deliveries: Counter,
    sessions: Gauge,
    restores: prometheus_client::metrics::family::Family<Vec<(String, String)>, Counter>,
    restore_events: Counter,
}

/// Runs one router instance until `shutdown`.
pub async fn run(config: RouterConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    health.not_ready("sessions", "reading the session registry");
    let registry = Arc::new(SchemaRegistry::new(&config.log)?);
    registry.check_reachable().await?;
    let topics = Topics::new(&config.log);
    let producer = EventProducer::connect(&config.log, registry.clone()).await?;
    let metrics = Metrics::default();
    let mut reg = Registry::with_prefix("chat_router");
    reg.register("events", "Chat events routed", metrics.events.clone());
    reg.register(
        "deliveries",
        "Delivery records written (one per gateway per event)",
        metrics.deliveries.clone(),
    );
    reg.register(
        "state_restores",
        "Partition memberships restored, by source: local (the store, caught up from the log), changelog, log (offset 0: no changelog yet), empty (nothing to restore)",
        metrics.restores.clone(),
    );
    reg.register(
        "state_restore_events",
        "Events of chat.events read by restores",
        metrics.restore_events.clone(),
    );
    reg.register(
        "sessions_users",
        "Users with at least one known session",
        metrics.sessions.clone(),
    );
    let (_, admin) = chat_runtime::serve_admin(
        config.listen,
        health.clone(),
        Arc::new(reg),
        shutdown.clone(),
    )
    .await?;

    // The registry as it is now, before routing anything.
    let sessions = Arc::new(Mutex::new(Sessions::default()));
    let tail = TopicTail::open(
        &config.log,
        registry.clone(),
        &topics.sessions,
        None,
        TailStart::Beginning,
    )
    .await?;
    tail.read_to_end(|item| {
        apply_session(&sessions, &item);
    })
    .await?;
    health.ready("sessions");
    let sessions_task = tokio::spawn(follow_sessions(
        tail,
        sessions.clone(),
        producer.clone(),
        topics.clone(),
        config.log.chat_partitions,
        metrics.clone(),
        shutdown.clone(),
    ));

    let mut consumer = PartitionedConsumer::connect(
        &config.log,
        registry.clone(),
        &config.group_id,
        &topics.events,
    )
    .await?;
    // A lost partition stops being reported in SessionRouted at once, before
    // its next owner can be assigned it; an assigned one is reported from
    // the offset this instance starts routing it at, even before any event
    // arrives, and the sessions still waiting for an owner of every
    // partition (a gateway's first sync) are answered again.
    {
        let sessions = sessions.clone();
        consumer.on_revoke(move |lost| {
            if let Ok(mut s) = sessions.lock() {
                for p in lost {
                    s.forget_partition(*p);
                }
            }
        });
    }
    {
        let (assigned_tx, mut assigned_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let in_hook = sessions.clone();
        consumer.on_assign(move |starts| {
            if let Ok(mut s) = in_hook.lock() {
                for (p, offset) in starts {
                    s.routed(*p, *offset);
                }
            }
            let _ = assigned_tx.send(());
        });
        let (sessions, producer, topics) = (sessions.clone(), producer.clone(), topics.clone());
        let partitions = config.log.chat_partitions;
        tokio::spawn(async move {
            while assigned_rx.recv().await.is_some() {
                reannounce(&sessions, &producer, &topics, partitions);
            }
        });
    }
    // Shared with the typing router, which uses the membership of the
    // partitions this instance owns.
    let members: Members = Arc::new(Mutex::new(HashMap::new()));
    let ephemeral_task = tokio::spawn(follow_ephemeral(
        config.log.clone(),
        registry.clone(),
        members.clone(),
        sessions.clone(),
        producer.clone(),
        topics.clone(),
        shutdown.clone(),
    ));
    let token = shutdown.token();
    let linger = Duration::from_micros(config.batch_linger_us);
    let restore_ctx = RestoreCtx {
        log: config.log.clone(),
        registry: registry.clone(),
        events_topic: topics.events.clone(),
        changelog_topic: topics.router_state.clone(),
        routing: true,
        window_ms: None,
        catch_up_max_events: config.state.catch_up_max_events,
        cache_chats: config.state.cache_chats,
        who: "router",
    };
    let state_dir = config.state.dir("router");
    // Each partition's store (opened once per process) and the offset its
    // membership is folded up to: a fresh batch that starts there (the
    // partition stayed here through a rebalance) needs no restore.
    let mut stores: HashMap<i32, Arc<Store>> = HashMap::new();
    let mut folded_to: HashMap<i32, Applied> = HashMap::new();
    while let Some(batch) = consumer
        .next_batch(config.batch_max, linger, &token)
        .await?
    {
        let p = batch.partition;
        let known = lock(&members).contains_key(&p);
        let in_place = folded_to
            .get(&p)
            .is_some_and(|a| a.next == batch.first_offset());
        if !known || (batch.fresh && !in_place) {
            let store = match stores.get(&p) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Store::open(
                        &state_dir,
                        &topics.router_state,
                        p,
                        None,
                        config.state.store_cache_mib,
                    )?);
                    stores.insert(p, s.clone());
                    s
                }
            };
            let restored = restore(&restore_ctx, &store, p, Some(batch.first_offset())).await;
            match restored {
                Ok(r) => {
                    metrics
                        .restores
                        .get_or_create(&vec![("source".into(), r.source.label().into())])
                        .inc();
                    metrics.restore_events.inc_by(r.events_read);
                    tracing::info!(
                        partition = p,
                        source = r.source.label(),
                        events_read = r.events_read,
                        changelog_records = r.changelog_records,
                        next_offset = r.applied.next,
                        ms = r.elapsed.as_millis() as u64,
                        "partition membership restored"
                    );
                    let next = r.applied.next;
                    lock(&members).insert(p, r.state);
                    folded_to.insert(p, r.applied);
                    if next > batch.first_offset() {
                        // The store is ahead of the committed offset (a crash
                        // between the two): those events were routed; go on
                        // after them.
                        if let Ok(mut s) = sessions.lock() {
                            s.routed(p, next);
                        }
                        consumer.rewind(p, next).await?;
                        continue;
                    }
                    // After a failed batch (rewound), p is routed again from here.
                    if let Ok(mut s) = sessions.lock() {
                        s.routed(p, batch.first_offset());
                    }
                    reannounce(&sessions, &producer, &topics, config.log.chat_partitions);
                }
                Err(e) => {
                    // A fold refused (logged at error level): route nothing of
                    // the partition from a wrong membership; read it again.
                    if e.downcast_ref::<RebuildError>().is_none() {
                        return Err(e);
                    }
                    unroute(&members, &sessions, p);
                    folded_to.remove(&p);
                    consumer.rewind(p, batch.first_offset()).await?;
                    tokio::time::sleep(REBUILD_RETRY_PAUSE).await;
                    continue;
                }
            }
        }
        let mut out = Vec::new();
        let mut refused = None;
        let mut newest = None;
        {
            let mut guard = lock(&members);
            let Some(state) = guard.get_mut(&p) else {
                continue;
            };
            for rec in &batch.records {
                let ev = match rec {
                    BatchRecord::Event(ev) => ev,
                    // Nobody can read it (the sequencer wrote it, so the
                    // registry lost its schema or the log was written by
                    // something else): dead-lettered below with its origin;
                    // the rest is routed. Membership misses it as every
                    // reader does; restores skip it too (RestoreCtx::routing).
                    BatchRecord::Undecodable { .. } => continue,
                };
                // Re-driven from the DLQ for another consumer group: theirs.
                if chat_log::dlq::redriven_elsewhere(&ev.headers, &config.group_id) {
                    continue;
                }
                metrics.events.inc();
                newest = Some((ev.offset, *ev.envelope.event_id.as_bytes()));
                // A copy re-driven from the DLQ comes after later events of
                // its chat: folded like a replay (an old seq is skipped, not
                // refused), routed all the same.
                let redriven = ev
                    .header_bytes(chat_log::dlq::HEADER_REDRIVEN_FROM)
                    .is_some();
                let routed = route(
                    &ev.envelope,
                    redriven,
                    state,
                    &sessions,
                    p,
                    ev.offset,
                    &topics,
                    config.log.chat_partitions,
                    &mut out,
                );
                if let Err(source) = routed {
                    refused = Some(RebuildError::Fold {
                        partition: p,
                        offset: ev.offset,
                        source,
                    });
                    break;
                }
            }
        }
        if let Some(e) = refused {
            // The membership fold cannot take the partition's next event:
            // send nothing of the batch, rebuild from the log (which fails
            // the same way, loudly, until the log is repaired).
            e.log("router");
            unroute(&members, &sessions, p);
            folded_to.remove(&p);
            consumer.rewind(p, batch.first_offset()).await?;
            tokio::time::sleep(REBUILD_RETRY_PAUSE).await;
            continue;
        }
        // Before the offset is committed (see dead_letter_undecodable).
        let dead = chat_log::dlq::dead_letter_undecodable(
            &producer,
            &topics.dlq,
            &config.group_id,
            &topics.events,
            p,
            &batch.records,
        )
        .await;
        if let Err(e) = dead {
            tracing::warn!(partition = p, error = %e, "dead-lettering failed; retrying the batch");
            unroute(&members, &sessions, p);
            folded_to.remove(&p);
            consumer.rewind(p, batch.first_offset()).await?;
            continue;
        }
        let n = out.len() as u64;
        let mark = Applied {
            next: batch.next_offset(),
            newest: newest.or(folded_to.get(&p).and_then(|a| a.newest)),
        };
        let sent = producer.send_batch(out).await;
        // Delivered: the changed chats and the mark go to the changelog, then
        // to the store, then the offset is committed (a crash in between
        // leaves the store ahead, never behind, of the committed offset).
        let stored = match sent {
            Ok(_) => {
                metrics.deliveries.inc_by(n);
                checkpoint(&members, &stores, &producer, &topics, p, mark, &config).await
            }
            Err(e) => Err(anyhow::anyhow!(e)),
        };
        match stored {
            Ok(()) => {
                folded_to.insert(p, mark);
                consumer.commit_offset_async(p, batch.next_offset())?;
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "routing failed; retrying the batch");
                unroute(&members, &sessions, p);
                folded_to.remove(&p);
                consumer.rewind(p, batch.first_offset()).await?;
            }
        }
    }
    tracing::info!("router stopping");
    drop(lock(&members).drain());
    drop(stores);
    config.state.remove_if_temporary(&state_dir);
    sessions_task.abort();
    ephemeral_task.abort();
    producer.flush(Duration::from_secs(5)).await.ok();
    admin.await.ok();
    Ok(())
}

/// How long a partition whose membership could not be folded waits before
/// the next attempt (every attempt reads the partition from the start).
const REBUILD_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Forgets partition `p`'s membership and routing position (before a rewind).
fn unroute(members: &Members, sessions: &Mutex<Sessions>, p: i32) {
    lock(members).remove(&p);
    if let Ok(mut s) = sessions.lock() {
        s.forget_partition(p);
    }
}

/// Membership of the `chat.events` partitions this instance owns.
type Members = Arc<Mutex<HashMap<i32, PartitionState>>>;

fn lock(members: &Members) -> std::sync::MutexGuard<'_, HashMap<i32, PartitionState>> {
    // A panic while holding it leaves consistent maps (no partial updates).
    members.lock().unwrap_or_else(|e| e.into_inner())
}

/// Routes typing indicators (`chat.ephemeral`, keyed by chat like
/// `chat.events`, so a chat has the same partition number in both) to the
/// gateways holding the chat's members. Every instance reads every
/// partition and routes those whose `chat.events` partition it owns; during
/// a rebalance an indicator may be dropped or routed twice (it is ephemeral).
/// Stale ones (past `expires_at`) and ones from non-members are dropped.
async fn follow_ephemeral(
    config: LogConfig,
    registry: Arc<SchemaRegistry>,
    members: Members,
    sessions: Arc<Mutex<Sessions>>,
    producer: EventProducer,
    topics: Topics,
    shutdown: Shutdown,
) {
    let tail = match TopicTail::open(&config, registry, &topics.ephemeral, None, TailStart::End)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot read chat.ephemeral: typing indicators are not routed");
            return;
        }
    };
    loop {
        let item = tokio::select! {
            _ = shutdown.wait() => return,
            i = tail.next() => i,
        };
        let ev = match item {
            Ok(TailItem::Event(ev)) => ev,
            // Typing indicators expire within seconds: not worth a dead
            // letter (and every router instance reads every partition).
            Ok(_) => {
                chat_log::metrics::count_skipped("router-ephemeral", "undecodable");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "chat.ephemeral read failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let e = &ev.envelope;
        let (Some(chat), Body::Typing(t)) = (e.chat_id, &e.body) else {
            continue;
        };
        if t.expires_at < now_ms() {
            continue;
        }
        let recipients: Vec<String> = {
            let mut guard = lock(&members);
            let Some(state) = guard
                .get_mut(&ev.partition)
                .and_then(|s| s.load_chat(&chat))
            else {
                continue;
            };
            if !state.members.contains_key(&e.sender_user) {
                continue;
            }
            state.members.keys().cloned().collect()
        };
        let targets = match sessions.lock() {
            Ok(s) => s.gateways_of(&recipients),
            Err(_) => continue,
        };
        let out: Vec<Outgoing> = targets
            .into_iter()
            .map(|(gateway, users)| Outgoing {
                topic: topics.deliveries.clone(),
                partition: Some(deliveries_partition(&gateway, config.chat_partitions)),
                key: gateway,
                envelope: e.clone(),
                headers: vec![(HEADER_RECIPIENTS.into(), users.join(",").into_bytes())],
            })
            .collect();
        if let Err(err) = producer.send_batch(out).await {
            tracing::debug!(error = %err, "typing indicator not routed");
        }
    }
}

/// Appends the delivery records of one event to `out`.
#[allow(clippy::too_many_arguments)]
fn route(
    ev: &Envelope,
    redriven: bool,
    state: &mut PartitionState,
    sessions: &Mutex<Sessions>,
    partition: i32,
    offset: i64,
    topics: &Topics,
    partitions: i32,
    out: &mut Vec<Outgoing>,
) -> Result<(), FoldError> {
    let Some(chat) = ev.chat_id else {
        return Ok(());
    };
    if redriven {
        state.apply_again(ev)?;
    } else {
        state.apply(ev)?;
    }
    let mut recipients: BTreeSet<String> = state
        .chat(&chat)
        .map(|c| c.members.keys().cloned().collect())
        .unwrap_or_default();
    if let Body::MemberRemoved(m) = &ev.body {
        recipients.insert(m.user_id.clone());
    }
    if let Body::MuteChanged(_) = &ev.body {
        // A member's own setting: only their devices hear of it.
        recipients = BTreeSet::from([ev.sender_user.clone()]);
    }
    let span = tracing::debug_span!("route", %chat, seq = ?ev.seq, trace_id = %ev.trace_id);
    let _g = span.enter();
    let Ok(mut s) = sessions.lock() else {
        return Ok(());
    };
    let targets = s.gateways_of(&recipients);
    s.routed(partition, offset + 1);
    drop(s);
    for (gateway, users) in targets {
        out.push(Outgoing {
            topic: topics.deliveries.clone(),
            partition: Some(deliveries_partition(&gateway, partitions)),
            key: gateway,
            envelope: ev.clone(),
            headers: vec![
                (HEADER_RECIPIENTS.into(), users.join(",").into_bytes()),
                (
                    HEADER_EVENTS_POSITION.into(),
                    events_position(partition, offset),
                ),
            ],
        });
    }
    Ok(())
}

/// Writes what the batch changed in partition `p`'s membership to the
/// changelog and the store, with the mark `mark`.
async fn checkpoint(
    members: &Members,
    stores: &HashMap<i32, Arc<Store>>,
    producer: &EventProducer,
    topics: &Topics,
    p: i32,
    mark: Applied,
    config: &RouterConfig,
) -> anyhow::Result<()> {
    let Some(store) = stores.get(&p) else {
        anyhow::bail!("partition {p} has no store");
    };
    let records = {
        let guard = lock(members);
        let Some(state) = guard.get(&p) else {
            anyhow::bail!("partition {p} has no membership");
        };
        if let Some(e) = state.store_failure() {
            anyhow::bail!("state store: {e}");
        }
        changelog_records(state.dirty_chats(), Some(mark))
    };
    producer
        .send_raw_batch(&topics.router_state, p, &records)
        .await?;
    let mut guard = lock(members);
    let Some(state) = guard.get_mut(&p) else {
        anyhow::bail!("partition {p} has no membership");
    };
    if !store.write(&state.take_changes(), mark)? {
        anyhow::bail!("partition {p}: the store is ahead of this batch");
    }
    state.evict(config.state.cache_chats);
    Ok(())
}

/// What a session-registry record asks of the router besides updating it.
enum SessionAction {
    /// A new session: answer `SessionRouted` to its gateway.
    Opened {
        session_id: Uuid,
        gateway: String,
        user: String,
    },
    /// A device was revoked: tell the gateways holding the user.
    Revoked { gateways: Vec<String>, user: String },
    /// The presence service closed a session because its gateway looked
    /// dead: tell that gateway, which re-announces it if it is in fact open.
    Expired { gateway: String, user: String },
}

fn apply_session(sessions: &Mutex<Sessions>, item: &TailItem) -> Option<SessionAction> {
    let TailItem::Event(ev) = item else {
        // Every router reads all of chat.sessions without a group: the
        // presence service's consumer group dead-letters it; here, counted.
        chat_log::metrics::count_skipped("router-sessions", "undecodable");
        return None;
    };
    let e = &ev.envelope;
    let mut s = sessions.lock().ok()?;
    match &e.body {
        Body::SessionOpened(o) => {
            s.open(&e.sender_user, o.session_id, &o.gateway_id);
            Some(SessionAction::Opened {
                session_id: o.session_id,
                gateway: o.gateway_id.clone(),
                user: e.sender_user.clone(),
            })
        }
        Body::SessionClosed(c) => {
            s.close(&e.sender_user, &c.session_id);
            (c.reason == "gateway_expired").then(|| SessionAction::Expired {
                gateway: c.gateway_id.clone(),
                user: e.sender_user.clone(),
            })
        }
        Body::DeviceRevoked(_) => {
            let users = [e.sender_user.clone()];
            Some(SessionAction::Revoked {
                gateways: s.gateways_of(&users).into_iter().map(|(g, _)| g).collect(),
                user: e.sender_user.clone(),
            })
        }
        _ => None,
    }
}

async fn follow_sessions(
    tail: TopicTail,
    sessions: Arc<Mutex<Sessions>>,
    producer: EventProducer,
    topics: Topics,
    partitions: i32,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    loop {
        let item = tokio::select! {
            _ = shutdown.wait() => return,
            i = tail.next() => i,
        };
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "session registry read failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let action = apply_session(&sessions, &item);
        let offsets = sessions.lock().map(|s| {
            metrics.sessions.set(s.users() as i64);
            s.offsets(partitions)
        });
        let (Some(action), Ok(router_offsets), TailItem::Event(ev)) = (action, offsets, &item)
        else {
            continue;
        };
        let out = match action {
            SessionAction::Opened {
                session_id,
                gateway,
                user,
            } => vec![session_routed(
                &topics,
                partitions,
                session_id,
                gateway,
                &user,
                Some(&ev.envelope),
                router_offsets,
            )],
            SessionAction::Revoked { gateways, user } => gateways
                .into_iter()
                .map(|g| to_gateway(&topics, partitions, g, &user, ev.envelope.clone()))
                .collect(),
            SessionAction::Expired { gateway, user } => {
                vec![to_gateway(
                    &topics,
                    partitions,
                    gateway,
                    &user,
                    ev.envelope.clone(),
                )]
            }
        };
        // Not awaited: in a reconnect storm the answers go out together
        // (the producer batches them) instead of one round trip each.
        answer(&producer, out);
    }
}

/// A record for `gateway`'s partition of `chat.deliveries`, for `user`.
fn to_gateway(
    topics: &Topics,
    partitions: i32,
    gateway: String,
    user: &str,
    envelope: Envelope,
) -> Outgoing {
    Outgoing {
        topic: topics.deliveries.clone(),
        partition: Some(deliveries_partition(&gateway, partitions)),
        key: gateway,
        envelope,
        headers: vec![(HEADER_RECIPIENTS.into(), user.as_bytes().to_vec())],
    }
}

/// The `SessionRouted` answer to `session` (built on the `SessionOpened`
/// envelope when there is one, so the trace id follows).
fn session_routed(
    topics: &Topics,
    partitions: i32,
    session_id: Uuid,
    gateway: String,
    user: &str,
    opened: Option<&Envelope>,
    router_offsets: Vec<u64>,
) -> Outgoing {
    let mut envelope = match opened {
        Some(e) => e.clone(),
        None => Envelope {
            event_id: Uuid::nil(),
            chat_id: None,
            seq: None,
            sender_user: user.to_string(),
            sender_device: String::new(),
            client_msg_id: None,
            client_ts: None,
            server_ts: now_ms(),
            sequenced_ts: None,
            trace_id: Uuid::new_v4().simple().to_string(),
            body: Body::SessionRouted(SessionRouted {
                session_id,
                router_offsets: Vec::new(),
            }),
        },
    };
    envelope.event_id = Uuid::new_v4();
    envelope.body = Body::SessionRouted(SessionRouted {
        session_id,
        router_offsets,
    });
    to_gateway(topics, partitions, gateway, user, envelope)
}

/// Answers again every session opened lately with this instance's current
/// positions.
fn reannounce(
    sessions: &Mutex<Sessions>,
    producer: &EventProducer,
    topics: &Topics,
    partitions: i32,
) {
    let Some((recent, offsets)) = sessions
        .lock()
        .ok()
        .map(|s| (s.recent(), s.offsets(partitions)))
    else {
        return;
    };
    let out = recent
        .into_iter()
        .map(|(_, session, gateway, user)| {
            session_routed(
                topics,
                partitions,
                session,
                gateway,
                &user,
                None,
                offsets.clone(),
            )
        })
        .collect();
    answer(producer, out);
}

/// Sends `out` in the background; a failure is logged (the gateway's first
/// sync then waits for another answer or reports `unavailable`).
fn answer(producer: &EventProducer, out: Vec<Outgoing>) {
    if out.is_empty() {
        return;
    }
    let producer = producer.clone();
    tokio::spawn(async move {
        if let Err(e) = producer.send_batch(out).await {
            tracing::warn!(error = %e, "could not write to a gateway's deliveries");
        }
    });
}
