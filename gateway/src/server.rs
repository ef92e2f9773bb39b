//! Start-up, the HTTP listener and graceful shutdown.
//!
//! One listener serves `GET /ws` (the WebSocket protocol), `POST /dev/login`
//! (when `dev_login = true`), `/health` and `/metrics`. Connections are
//! served by hyper's HTTP/1 server with a header read timeout, so a
//! handshake that never completes does not hold a slot; upgrades are checked
//! (draining, Origin, token, device, connection limit) before the 101.
//!
//! Shutdown (SIGTERM or [`GatewayHandle::stop`]): stop accepting, tell every
//! client `reconnect` and close it with 1001, produce `SessionClosed` for
//! each session, flush the producer, all within `shutdown_grace_ms`.

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chat_log::{deliveries_partition, EventProducer, SchemaRegistry, TailStart, TopicTail, Topics};
use chat_runtime::{Health, Shutdown};
use chat_schemas::{Body as EventBody, Envelope};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::{self, Authenticator};
use crate::config::{ms, GatewayConfig};
use crate::connection;
use crate::fanout::{self, Closer, Hub};
use crate::history::HistoryReader;
use crate::metrics::GatewayMetrics;
use crate::protocol::{close, now_ms};
use crate::ratelimit::RateLimiter;

/// A session this gateway announced with `SessionOpened`.
#[derive(Debug)]
struct SessionEntry {
    user: String,
    device: String,
    closer: Closer,
}

/// State shared by every connection.
pub(crate) struct Shared {
    pub config: GatewayConfig,
    pub topics: Topics,
    pub producer: EventProducer,
    pub history: Arc<dyn HistoryReader>,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub limiter: RateLimiter,
    pub metrics: Arc<GatewayMetrics>,
    /// How far the history projector is known to have come (read barrier).
    pub projected: crate::sync::ProjectedPositions,
    /// Fired at shutdown: no new upgrades; every session says `reconnect`.
    pub drain: CancellationToken,
    pub tracker: TaskTracker,
    sessions: Mutex<HashMap<Uuid, SessionEntry>>,
    conn_ids: AtomicU64,
}

impl Shared {
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn sessions_insert(&self, session: Uuid, user: &str, device: &str, closer: Closer) {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(
                session,
                SessionEntry {
                    user: user.to_string(),
                    device: device.to_string(),
                    closer,
                },
            );
        }
    }

    /// The (user, device) of a session whose connection is still open.
    fn session_open(&self, session: Uuid) -> Option<(String, String)> {
        let s = self.sessions.lock().ok()?;
        let e = s.get(&session)?;
        (!e.closer.is_closed()).then(|| (e.user.clone(), e.device.clone()))
    }

    /// Forgets a session; whoever removes it produces its `SessionClosed`.
    pub fn sessions_remove(&self, session: Uuid) -> Option<(String, String)> {
        self.sessions
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&session))
            .map(|e| (e.user, e.device))
    }

    /// A user-scoped envelope for `chat.sessions`.
    pub fn session_envelope(&self, user: &str, device: &str, body: EventBody) -> Envelope {
        Envelope {
            event_id: Uuid::new_v4(),
            chat_id: None,
            seq: None,
            sender_user: user.to_string(),
            sender_device: device.to_string(),
            client_msg_id: None,
            client_ts: None,
            server_ts: now_ms(),
            sequenced_ts: None,
            trace_id: Uuid::new_v4().simple().to_string(),
            body,
        }
    }

    /// Produces `SessionClosed` (bounded wait; a failure is logged).
    pub async fn produce_session_closed(
        &self,
        user: &str,
        device: &str,
        session: Uuid,
        reason: String,
    ) {
        let body = connection::session_closed(&self.config.gateway_id, device, session, reason);
        let env = self.session_envelope(user, device, body);
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            self.producer.send(&self.topics.sessions, user, &env),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            tracing::warn!(%session, ?sent, "SessionClosed not produced");
        }
    }
}

/// Starts gateways (in-process, e.g. in tests).
#[derive(Debug)]
pub struct Gateway;

/// A running gateway.
#[derive(Debug)]
pub struct GatewayHandle {
    addr: SocketAddr,
    gateway_id: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl GatewayHandle {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Starts a graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Waits until the gateway stopped.
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// Shuts down and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown();
        self.stopped().await
    }
}

impl Gateway {
    /// Connects to Kafka, the registry and Cassandra, starts tailing the
    /// deliveries partition and serving. Returns the bound address (use port
    /// 0 in tests) and a handle.
    pub async fn start(config: GatewayConfig) -> anyhow::Result<(SocketAddr, GatewayHandle)> {
        start(config, None, Shutdown::new()).await
    }

    /// Like [`Gateway::start`], reading history from `history` instead of
    /// connecting to Cassandra.
    pub async fn start_with_history(
        config: GatewayConfig,
        history: Arc<dyn HistoryReader>,
    ) -> anyhow::Result<(SocketAddr, GatewayHandle)> {
        start(config, Some(history), Shutdown::new()).await
    }
}

/// Runs the gateway until `shutdown` fires, then drains.
pub async fn run(config: GatewayConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let (_, handle) = start(config, None, shutdown).await?;
    handle.stopped().await
}

async fn start(
    config: GatewayConfig,
    history: Option<Arc<dyn HistoryReader>>,
    shutdown: Shutdown,
) -> anyhow::Result<(SocketAddr, GatewayHandle)> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let health = Health::new();
    for c in ["kafka", "registry", "cassandra", "deliveries", "results"] {
        health.not_ready(c, "checking");
    }
    chat_log::topics::check_brokers(&config.log).await?;
    health.ready("kafka");
    let registry = Arc::new(SchemaRegistry::new(&config.log)?);
    registry.check_reachable().await?;
    health.ready("registry");
    let history: Arc<dyn HistoryReader> = match history {
        Some(h) => h,
        // Follows store.keyspace_alias when one is set (chat-admin switch).
        None => {
            let store =
                chat_projectors::alias::FollowingStore::connect(&config.store, shutdown.token())
                    .await?;
            check_markers_retention(&store.current(), config.limits.sync_markers_retention_ms)
                .await?;
            Arc::new(store)
        }
    };
    health.ready("cassandra");

    let mut prom = Registry::with_prefix("chat_gateway");
    let info = prometheus_client::metrics::info::Info::new(vec![
        ("gateway_id", config.gateway_id.clone()),
        ("version", env!("CARGO_PKG_VERSION").to_string()),
    ]);
    prom.register("build", "Gateway identity and version", info);
    let metrics = Arc::new(GatewayMetrics::register(&mut prom));

    let topics = Topics::new(&config.log);
    let producer = EventProducer::connect(&config.log, registry.clone()).await?;
    let auth = Authenticator::new(&config.auth, config.dev_login)?;

    // Tail this gateway's partitions of chat.deliveries (live events,
    // SessionRouted, ...) and chat.results (the sequencer's answers) from
    // their current ends. Two topics, because chat.results is written in
    // the sequencer's transactions: an open one (a sequencer killed mid-
    // batch) holds back what read_committed consumers see of its partition
    // until the transaction is fenced, and must not hold back live events.
    let partition = deliveries_partition(&config.gateway_id, config.log.chat_partitions);
    let (tail, ends) = own_partition(&config, &registry, &topics.deliveries, partition).await?;
    health.ready("deliveries");
    let (results_tail, _) = own_partition(&config, &registry, &topics.results, partition).await?;
    health.ready("results");
    let hub = Arc::new(Hub::new(&config.gateway_id, metrics.clone()));
    let tail_stop = CancellationToken::new();
    let tail_task = tokio::spawn(fanout::run_tail(
        tail,
        "deliveries",
        hub.clone(),
        health.clone(),
        tail_stop.clone(),
    ));
    let results_task = tokio::spawn(fanout::run_tail(
        results_tail,
        "results",
        hub.clone(),
        health.clone(),
        tail_stop.clone(),
    ));

    // Presence changes of watched users (chat.presence, every partition).
    let presence_tail = TopicTail::open(
        &config.log,
        registry.clone(),
        &topics.presence,
        None,
        TailStart::End,
    )
    .await?;
    tokio::spawn(fanout::run_presence_tail(
        presence_tail,
        hub.clone(),
        ms(config.timeouts.presence_batch_ms),
        tail_stop.clone(),
    ));
    // Announce this instance before any session: the presence service then
    // closes whatever sessions an earlier process with this id left behind.
    let instance = Uuid::new_v4();
    gateway_heartbeat(&producer, &topics, &config, instance).await?;

    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        limiter: RateLimiter::new(config.limits.send_rate_per_s, config.limits.send_burst),
        config,
        topics,
        producer,
        history,
        hub,
        auth,
        metrics,
        projected: crate::sync::ProjectedPositions::default(),
        drain: CancellationToken::new(),
        tracker: TaskTracker::new(),
        sessions: Mutex::default(),
        conn_ids: AtomicU64::new(1),
    });
    let app = router(shared.clone(), health, Arc::new(prom));
    tracing::info!(
        gateway_id = %shared.config.gateway_id,
        %addr,
        deliveries_partition = partition,
        from_offset = ?ends.get(&partition),
        "gateway listening"
    );

    let gateway_id = shared.config.gateway_id.clone();
    let task = tokio::spawn(serve(
        instance,
        shared,
        listener,
        app,
        shutdown.clone(),
        tail_stop,
        vec![tail_task, results_task],
    ));
    Ok((
        addr,
        GatewayHandle {
            addr,
            gateway_id,
            shutdown,
            task,
        },
    ))
}

fn router(shared: Arc<Shared>, health: Health, metrics: chat_runtime::Metrics) -> Router {
    let mut app = Router::new().route("/ws", get(ws_handler));
    if shared.config.dev_login {
        app = app.route("/dev/login", post(dev_login));
    }
    app.with_state(shared)
        .merge(crate::web::router())
        .merge(chat_runtime::admin::admin_router(health, metrics))
}

/// Writes `GatewayHeartbeat` to every `chat.sessions` partition: the
/// presence service expires the sessions of a gateway whose heartbeats stop.
async fn gateway_heartbeat(
    producer: &EventProducer,
    topics: &Topics,
    config: &GatewayConfig,
    instance: Uuid,
) -> anyhow::Result<()> {
    let body = chat_schemas::GatewayHeartbeat {
        gateway_id: config.gateway_id.clone(),
        instance_id: instance,
        interval_ms: config.timeouts.gateway_heartbeat_ms,
    };
    let env = Envelope {
        event_id: Uuid::new_v4(),
        chat_id: None,
        seq: None,
        sender_user: String::new(),
        sender_device: String::new(),
        client_msg_id: None,
        client_ts: None,
        server_ts: now_ms(),
        sequenced_ts: None,
        trace_id: Uuid::new_v4().simple().to_string(),
        body: EventBody::GatewayHeartbeat(body),
    };
    let sends = (0..config.log.chat_partitions)
        .map(|p| producer.send_with(&topics.sessions, Some(p), &config.gateway_id, &env, &[]));
    futures::future::try_join_all(sends).await?;
    Ok(())
}

/// Heals a wrong close: the presence service closed a session of this
/// gateway as expired (`gateway_expired`, forwarded by the router) while its
/// connection is open here. The session is announced again with the same
/// id, so the router routes to it and presence counts it again. A close
/// seen twice (several router instances) is re-announced once.
async fn reannounce_expired(shared: Arc<Shared>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(65_536);
    shared.hub.on_expired(tx);
    let mut seen: std::collections::VecDeque<Uuid> = std::collections::VecDeque::new();
    while let Some((user, session, close_id)) = rx.recv().await {
        if seen.contains(&close_id) {
            continue;
        }
        seen.push_back(close_id);
        if seen.len() > 1024 {
            seen.pop_front();
        }
        let Some((owner, device)) = shared.session_open(session) else {
            continue; // closed here too: the close was right
        };
        if owner != user {
            continue;
        }
        let body = EventBody::SessionOpened(chat_schemas::SessionOpened {
            gateway_id: shared.config.gateway_id.clone(),
            device_id: device.clone(),
            session_id: session,
            opened_at: now_ms(),
        });
        let env = shared.session_envelope(&user, &device, body);
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            shared.producer.send(&shared.topics.sessions, &user, &env),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                tracing::warn!(%session, %user, "session expired by presence while open here; announced again")
            }
            other => tracing::warn!(%session, ?other, "session not announced again"),
        }
        // The connection may have ended (and produced its SessionClosed)
        // while this was being sent: close it again after the re-announce.
        if shared.session_open(session).is_none() {
            shared
                .produce_session_closed(&user, &device, session, "closed".into())
                .await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    instance: Uuid,
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: Shutdown,
    tail_stop: CancellationToken,
    tail_tasks: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let header_timeout = ms(shared.config.timeouts.header_read_ms);
    let heartbeats = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ms(shared.config.timeouts.gateway_heartbeat_ms));
            tick.tick().await;
            loop {
                tick.tick().await;
                let beat =
                    gateway_heartbeat(&shared.producer, &shared.topics, &shared.config, instance);
                if let Err(e) = beat.await {
                    tracing::warn!(error = %e, "gateway heartbeat not written");
                }
            }
        })
    };
    let reannounce = tokio::spawn(reannounce_expired(shared.clone()));
    let limiter_sweep = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                shared.limiter.sweep();
            }
        })
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => break,
            a = listener.accept() => a,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let drain = shared.drain.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
                _ = drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
    drop(listener);
    limiter_sweep.abort();
    heartbeats.abort();
    reannounce.abort();

    // Drain: every session sends `reconnect`, closes with 1001 and produces
    // its SessionClosed; leftovers are closed here.
    let grace = ms(shared.config.shutdown_grace_ms);
    let deadline = Instant::now() + grace;
    let open = shared.metrics.connections.get();
    tracing::info!(open, "draining");
    shared.drain.cancel();
    shared.tracker.close();
    let budget = grace
        .saturating_sub(Duration::from_millis(1500))
        .max(Duration::from_millis(200));
    if tokio::time::timeout(budget, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the end of the grace period; closing them");
    }
    let leftovers: Vec<(Uuid, SessionEntry)> = shared
        .sessions
        .lock()
        .map(|mut s| s.drain().collect())
        .unwrap_or_default();
    let closing = leftovers.into_iter().map(|(id, e)| {
        e.closer.close(close::GOING_AWAY, "server draining");
        let shared = shared.clone();
        async move {
            shared
                .produce_session_closed(&e.user, &e.device, id, "shutdown".into())
                .await
        }
    });
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = tokio::time::timeout(
        left.max(Duration::from_millis(200)),
        futures::future::join_all(closing),
    )
    .await;
    tail_stop.cancel();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(200));
    if let Err(e) = shared.producer.flush(left).await {
        tracing::warn!(error = %e, "producer flush at shutdown failed");
    }
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let _ = tokio::time::timeout(left, futures::future::join_all(tail_tasks)).await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Opens a tail of `topic`'s `partition` at its current end. The end is read
/// first and the tail opened at that offset, so nothing written after
/// start-up (a SessionRouted, a result) can be skipped. Returns the tail and
/// the offset it starts from.
async fn own_partition(
    config: &GatewayConfig,
    registry: &Arc<SchemaRegistry>,
    topic: &str,
    partition: i32,
) -> anyhow::Result<(TopicTail, HashMap<i32, i64>)> {
    let probe = TopicTail::open(
        &config.log,
        registry.clone(),
        topic,
        Some(vec![partition]),
        TailStart::End,
    )
    .await?;
    let ends = probe.high_watermarks().await?;
    drop(probe);
    let tail = TopicTail::open(
        &config.log,
        registry.clone(),
        topic,
        Some(vec![partition]),
        TailStart::Offsets(ends.clone()),
    )
    .await?;
    Ok((tail, ends))
}

fn reject(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": code, "message": message.into() });
    (status, Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct WsQuery {
    token: Option<String>,
    device: Option<String>,
}

/// `GET /ws`: every check before the 101, then the upgrade.
async fn ws_handler(State(shared): State<Arc<Shared>>, mut req: Request) -> Response {
    let m = &shared.metrics;
    if shared.drain.is_cancelled() {
        m.rejected("draining");
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this gateway is shutting down; reconnect",
        );
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    if !auth::origin_allowed(origin, &shared.config.allowed_origins) {
        m.rejected("origin");
        return reject(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not connect",
        );
    }
    let query = match Query::<WsQuery>::try_from_uri(req.uri()) {
        Ok(Query(q)) => q,
        Err(e) => {
            m.rejected("bad_request");
            return reject(StatusCode::BAD_REQUEST, "bad_request", e.body_text());
        }
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = auth::token_from(authorization, query.token.as_deref()) else {
        m.rejected("missing_token");
        return reject(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            auth::AuthError::Missing.to_string(),
        );
    };
    let who = match shared.auth.verify(&token) {
        Ok(who) => who,
        Err(e) => {
            m.rejected(e.code());
            return reject(StatusCode::UNAUTHORIZED, e.code(), e.to_string());
        }
    };
    let device = match auth::resolve_device(who.device.as_deref(), query.device.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            m.rejected("invalid_device");
            return reject(StatusCode::BAD_REQUEST, "invalid_device", e);
        }
    };
    match shared.history.device(&who.user, &device).await {
        Ok(Some(d)) => {
            if let Some(revoked_at) = d.revoked_at {
                let issued_ms = who.issued_at.map(|s| (s as i64).saturating_mul(1000));
                if issued_ms.is_none_or(|t| t <= revoked_at) {
                    m.rejected("device_revoked");
                    return reject(
                        StatusCode::UNAUTHORIZED,
                        "device_revoked",
                        "this device was revoked; sign in again to get a new token",
                    );
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "device check failed");
            m.rejected("unavailable");
            return reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the device check failed; retry",
            );
        }
    }
    if m.connections.get()
        >= i64::try_from(shared.config.limits.max_connections).unwrap_or(i64::MAX)
    {
        m.rejected("capacity");
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "this gateway is full; try another",
        );
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        m.rejected("not_websocket");
        return reject(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket",
        );
    }
    // The connection takes the raw upgraded socket (connection/io.rs);
    // fastwebsockets only checks the handshake and builds the 101.
    let upgrade = hyper::upgrade::on(&mut req);
    let (response, _) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(u) => u,
        Err(e) => {
            m.rejected("bad_upgrade");
            return reject(StatusCode::BAD_REQUEST, "bad_upgrade", e.to_string());
        }
    };
    let task_shared = shared.clone();
    shared
        .tracker
        .spawn(async move { connection::serve(task_shared, upgrade, who, device).await });
    response.map(Body::new)
}

#[derive(Debug, Deserialize)]
struct LoginRequest {
    user: String,
    #[serde(default)]
    device: Option<String>,
}

/// `POST /dev/login {"user","device"}` → `{"token","expires_at"}` (development).
async fn dev_login(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: LoginRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{\"user\":...,\"device\":...}}: {e}"),
            )
        }
    };
    if let Err(e) = auth::validate_user_id(&req.user) {
        return reject(StatusCode::BAD_REQUEST, "invalid_user", e);
    }
    if let Some(d) = &req.device {
        if let Err(e) = auth::validate_device(d) {
            return reject(StatusCode::BAD_REQUEST, "invalid_device", e);
        }
    }
    match shared.auth.mint(&req.user, req.device.as_deref()) {
        Ok((token, exp)) => Json(serde_json::json!({
            "token": token,
            "user": req.user,
            "device": req.device,
            "expires_at": exp,
        }))
        .into_response(),
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Refuses a `limits.sync_markers_retention_ms` above the TTL of
/// `user_changes`: a sync would then trust markers that already expired.
async fn check_markers_retention(
    store: &chat_projectors::store::Store,
    retention_ms: u64,
) -> anyhow::Result<()> {
    match store.table_default_ttl("user_changes").await? {
        Some(ttl) if ttl > 0 && retention_ms > ttl as u64 * 1000 => anyhow::bail!(
            "limits.sync_markers_retention_ms = {retention_ms} exceeds the user_changes TTL \
             ({ttl} s) in keyspace {}: lower the setting or ALTER the table's \
             default_time_to_live",
            store.keyspace()
        ),
        _ => Ok(()),
    }
}
