//! The push worker: a consumer group on `chat.push` and one on its retry
//! topic `chat.push-retry` (same prefix), sending every task through its
//! provider.
//!
//! Per task (a batch's tasks run concurrently, at most `push.concurrency`
//! requests in flight):
//! 1. a task whose dedupe key has a sent-marker ([`crate::marker`]) is
//!    skipped: it was settled before a crash or is a duplicate;
//! 2. a task not yet due (`not_before` in the future) goes to the retry
//!    topic; on the retry topic a task waits for its `not_before` (at most
//!    [`HOLD_STEP`] in memory; longer holds are re-appended);
//! 3. the provider's answer decides: sent -> marker; retry (429, 5xx,
//!    transport) -> a new record on the retry topic with `attempt + 1` and
//!    `not_before = now + backoff` ([`crate::retry`]), or the dead-letter
//!    topic after `push.max_attempts`; dead token -> a
//!    `PushRegistrationChanged` with `token = null` and the reason on
//!    `chat.sessions` (keyed by user id), then a marker; refused (other
//!    4xx) -> `chat.dlq` with the provider's status and body in
//!    `dlq.error`.
//!
//! Offsets are stored only after the whole batch is settled, so a crash
//! re-reads the batch and the markers keep what was already sent from
//! being sent again. Guarantee: no task is dropped (at-least-once reading,
//! retries are records); a notification is requested from the provider
//! once, except for the requests in flight when a worker dies (accepted by
//! the provider, marker not yet written): those are resent with the same
//! idempotency key (`apns-id`, `X-Chat-Dedupe-Key`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chat_log::{
    ConsumedEvent, EventConsumer, EventProducer, HandlerError, LogConfig, SchemaRegistry,
    TopicSpec, Topics,
};
use chat_runtime::now_ms;
use chat_schemas::{Body, Envelope, PushRegistrationChanged, PushTask};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::apns::Apns;
use crate::config::{PushConfig, WorkerConfig};
use crate::fcm::Fcm;
use crate::marker::{Markers, REMOVED, SENT};
use crate::webhook::Webhook;
use crate::webpush::WebPush;
use crate::{Notification, Outcome, PushError};

/// Longest a task waits for its `not_before` in memory; a task held longer
/// is re-appended to the retry topic (so a restart loses no held task and
/// no partition is blocked for long).
pub const HOLD_STEP: Duration = Duration::from_secs(30);

/// The retry topic's name for a config.
pub fn retry_topic(log: &LogConfig) -> String {
    format!("{}chat.push-retry", log.topic_prefix)
}

/// The enabled providers.
#[derive(Debug, Default)]
pub struct Providers {
    pub apns: Option<Apns>,
    pub fcm: Option<Fcm>,
    pub webpush: Option<WebPush>,
    pub webhook: Option<Webhook>,
}

impl Providers {
    pub fn from_config(cfg: &PushConfig) -> Result<Self, PushError> {
        let t = Duration::from_millis(cfg.request_timeout_ms);
        Ok(Self {
            apns: cfg
                .apns
                .enabled
                .then(|| Apns::new(&cfg.apns, t))
                .transpose()?,
            fcm: cfg.fcm.enabled.then(|| Fcm::new(&cfg.fcm, t)).transpose()?,
            webpush: cfg
                .webpush
                .enabled
                .then(|| WebPush::new(&cfg.webpush, t))
                .transpose()?,
            webhook: cfg
                .webhook
                .enabled
                .then(|| Webhook::new(&cfg.webhook, t))
                .transpose()?,
        })
    }

    pub fn enabled(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.apns.is_some() {
            v.push("apns");
        }
        if self.fcm.is_some() {
            v.push("fcm");
        }
        if self.webpush.is_some() {
            v.push("webpush");
        }
        if self.webhook.is_some() {
            v.push("webhook");
        }
        v
    }

    /// Sends through the task's provider; a provider this worker does not
    /// have is refused (dead-lettered: no worker of this deployment could send it).
    pub async fn send(&self, n: &Notification) -> Outcome {
        let disabled = || Outcome::Rejected {
            detail: PushError::Disabled(n.provider.clone()).to_string(),
        };
        match n.provider.as_str() {
            "apns" => match &self.apns {
                Some(p) => p.send(n).await,
                None => disabled(),
            },
            "fcm" => match &self.fcm {
                Some(p) => p.send(n).await,
                None => disabled(),
            },
            "webpush" => match &self.webpush {
                Some(p) => p.send(n).await,
                None => disabled(),
            },
            "webhook" => match &self.webhook {
                Some(p) => p.send(n).await,
                None => disabled(),
            },
            other => Outcome::Rejected {
                detail: format!("unknown provider {other:?}"),
            },
        }
    }
}

/// A `PushTask` as a [`Notification`], or why it cannot be sent.
pub fn notification(t: &PushTask) -> Result<Notification, String> {
    let need = |v: &Option<String>, name: &str| {
        v.clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("push task without {name}"))
    };
    let device_id = need(&t.device_id, "device_id")?;
    Ok(Notification {
        user_id: t.user_id.clone(),
        provider: need(&t.provider, "provider")?,
        token: need(&t.token, "token")?,
        chat_id: t.chat_id,
        seq: t.seq,
        title: t.title.clone(),
        body: t.body_preview.clone(),
        locale: t.locale.clone(),
        count: t.count.unwrap_or(1).max(1),
        badge: t.badge,
        collapse_key: t
            .collapse_key
            .clone()
            .unwrap_or_else(|| t.chat_id.to_string()),
        dedupe_key: t
            .dedupe_key
            .clone()
            .unwrap_or_else(|| Notification::dedupe_key_of(t.chat_id, t.seq, &device_id)),
        device_id,
        sender_id: t.sender_id.clone(),
        kind: t.kind.clone(),
        created_ts: t.created_ts,
        attempt: t.attempt.max(1),
    })
}

/// The worker's counters (`/metrics`: `push_sent_total`, ...; logged on shutdown).
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: Counter,
    pub retried: Counter,
    pub removed: Counter,
    pub dead: Counter,
    pub skipped: Counter,
}

impl Counters {
    fn register(&self, reg: &mut Registry) {
        reg.register(
            "push_sent",
            "Notifications a provider accepted",
            self.sent.clone(),
        );
        reg.register(
            "push_retried",
            "Attempts re-appended to the retry topic (429, 5xx, transport)",
            self.retried.clone(),
        );
        reg.register(
            "push_removed",
            "Registrations removed because the provider said the token is dead",
            self.removed.clone(),
        );
        reg.register(
            "push_dead",
            "Tasks dead-lettered (refused, or out of attempts)",
            self.dead.clone(),
        );
        reg.register(
            "push_skipped",
            "Tasks skipped: already settled (sent-marker) or twice in a batch",
            self.skipped.clone(),
        );
    }
}

/// What one worker shares between its two consumers.
pub struct Worker {
    cfg: PushConfig,
    providers: Providers,
    markers: Markers,
    producer: EventProducer,
    sessions_topic: String,
    retry_topic: String,
    permits: Semaphore,
    pub counters: Counters,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// What became of one task in a batch.
enum Settled {
    Done,
    Dead(String),
}

impl Worker {
    /// Sends one task and settles it. `Err`: stop without storing offsets.
    async fn settle(
        &self,
        event: &ConsumedEvent,
        task: &PushTask,
        from_retry: bool,
        shutdown: &CancellationToken,
    ) -> Result<Settled, String> {
        let n = match notification(task) {
            Ok(n) => n,
            Err(why) => return Ok(Settled::Dead(why)),
        };
        // Not due yet: wait (retry topic, up to HOLD_STEP) or move it to the retry topic.
        let wait = Duration::from_millis(u64::try_from(task.not_before - now_ms()).unwrap_or(0));
        if !wait.is_zero() {
            if !from_retry || wait > HOLD_STEP {
                if from_retry {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(HOLD_STEP) => {}
                    }
                }
                self.append_retry(event, task.clone()).await?;
                return Ok(Settled::Done);
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.append_retry(event, task.clone()).await?;
                    return Ok(Settled::Done);
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // The permit is held until the outcome is recorded (marker written,
        // retry or removal appended): requests accepted but not yet marked
        // (the resend window of a crash) never exceed `push.concurrency`.
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let outcome = self.providers.send(&n).await;
        match outcome {
            Outcome::Sent { id, .. } => {
                self.mark(&n.dedupe_key, SENT, id.as_deref(), shutdown)
                    .await?;
                self.counters.sent.inc_by(1);
                tracing::debug!(key = %n.dedupe_key, provider = %n.provider, attempt = n.attempt, "push sent");
                Ok(Settled::Done)
            }
            Outcome::Retry { after, detail } => {
                if n.attempt >= self.cfg.max_attempts {
                    self.counters.dead.inc_by(1);
                    return Ok(Settled::Dead(format!(
                        "{} after {} attempts: {detail}",
                        n.provider, n.attempt
                    )));
                }
                let delay = crate::retry::delay(
                    n.attempt,
                    Duration::from_millis(self.cfg.retry_base_ms),
                    Duration::from_millis(self.cfg.retry_max_ms),
                    after,
                    crate::retry::unit(),
                );
                tracing::info!(key = %n.dedupe_key, provider = %n.provider, attempt = n.attempt, ?delay, %detail, "push retry scheduled");
                let mut next = task.clone();
                next.attempt = n.attempt + 1;
                next.not_before =
                    now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                self.append_retry(event, next).await?;
                self.counters.retried.inc_by(1);
                Ok(Settled::Done)
            }
            Outcome::Unregistered { reason, detail } => {
                tracing::info!(key = %n.dedupe_key, provider = %n.provider, reason, %detail, "push token dead: removing the registration");
                let body = Body::PushRegistrationChanged(PushRegistrationChanged {
                    device_id: n.device_id.clone(),
                    provider: n.provider.clone(),
                    token: None,
                    locale: n.locale.clone(),
                    reason: Some(reason.to_string()),
                    provider_detail: Some(detail),
                });
                let env = envelope(&event.envelope, &n.user_id, body);
                self.producer
                    .send(&self.sessions_topic, &n.user_id, &env)
                    .await
                    .map_err(|e| format!("append PushRegistrationChanged: {e}"))?;
                self.mark(&n.dedupe_key, REMOVED, None, shutdown).await?;
                self.counters.removed.inc_by(1);
                Ok(Settled::Done)
            }
            Outcome::Rejected { detail } => {
                self.counters.dead.inc_by(1);
                Ok(Settled::Dead(format!("{} refused: {detail}", n.provider)))
            }
        }
    }

    /// Writes a marker, retrying while Cassandra is unavailable.
    async fn mark(
        &self,
        key: &str,
        outcome: &str,
        id: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.markers.mark(key, outcome, id).await {
                Ok(()) => return Ok(()),
                Err(e) if shutdown.is_cancelled() => return Err(e.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, key, "cannot write the sent-marker; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn append_retry(&self, event: &ConsumedEvent, task: PushTask) -> Result<(), String> {
        let user = task.user_id.clone();
        let env = envelope(&event.envelope, &user, Body::PushTask(task));
        self.producer
            .send(&self.retry_topic, &user, &env)
            .await
            .map(drop)
            .map_err(|e| format!("append to {}: {e}", self.retry_topic))
    }

    /// Settles a batch; `Ok` names the records to dead-letter.
    async fn handle(
        &self,
        batch: Arc<Vec<ConsumedEvent>>,
        from_retry: bool,
        shutdown: CancellationToken,
    ) -> Result<Vec<(usize, String)>, HandlerError> {
        let mut dead = Vec::new();
        let mut work = Vec::new();
        let mut seen = HashSet::new();
        for (i, e) in batch.iter().enumerate() {
            match &e.envelope.body {
                Body::PushTask(t) => {
                    let key = t.dedupe_key.clone().unwrap_or_else(|| {
                        Notification::dedupe_key_of(
                            t.chat_id,
                            t.seq,
                            t.device_id.as_deref().unwrap_or(""),
                        )
                    });
                    // The same task twice in one batch (a retry and its original): once.
                    if seen.insert(key.clone()) {
                        work.push((i, key, t));
                    } else {
                        self.counters.skipped.inc_by(1);
                    }
                }
                other => dead.push((i, format!("not a push task: {}", other.kind()))),
            }
        }
        let keys: Vec<String> = work.iter().map(|(_, k, _)| k.clone()).collect();
        let settled = self
            .markers
            .settled(&keys)
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        let todo: Vec<_> = work
            .into_iter()
            .filter(|(_, k, _)| !settled.contains(k))
            .collect();
        self.counters
            .skipped
            .inc_by((keys.len() - todo.len()) as u64);
        let results: Vec<(usize, Result<Settled, String>)> = futures::stream::iter(todo)
            .map(|(i, _, t)| {
                let shutdown = shutdown.clone();
                let batch = &batch;
                async move { (i, self.settle(&batch[i], t, from_retry, &shutdown).await) }
            })
            .buffer_unordered(self.cfg.concurrency.max(1) * 2)
            .collect()
            .await;
        for (i, r) in results {
            match r {
                Ok(Settled::Done) => {}
                Ok(Settled::Dead(why)) => dead.push((i, why)),
                Err(why) => return Err(HandlerError::Fatal(why)),
            }
        }
        Ok(dead)
    }
}

/// An envelope for a record the worker appends (user-scoped, no chat).
fn envelope(cause: &Envelope, user: &str, body: Body) -> Envelope {
    Envelope {
        event_id: Uuid::now_v7(),
        chat_id: None,
        seq: None,
        sender_user: user.to_string(),
        sender_device: "chat-push-worker".into(),
        client_msg_id: None,
        client_ts: None,
        server_ts: now_ms(),
        sequenced_ts: None,
        trace_id: cause.trace_id.clone(),
        body,
    }
}

/// Runs the worker until `shutdown`: both consumers, then a final commit.
pub async fn run(config: WorkerConfig, shutdown: chat_runtime::Shutdown) -> anyhow::Result<()> {
    let health = chat_runtime::Health::new();
    let counters = Counters::default();
    if let Some(addr) = config.listen {
        let mut reg = Registry::default();
        counters.register(&mut reg);
        chat_runtime::serve_admin(addr, health.clone(), Arc::new(reg), shutdown.clone())
            .await
            .with_context(|| format!("cannot serve /health and /metrics on {addr}"))?;
    }
    health.not_ready("push-worker", "starting");
    let shutdown = shutdown.token();
    use anyhow::Context;
    let log = &config.log;
    let topics = Topics::new(log);
    let retry = retry_topic(log);
    chat_log::topics::ensure_topics(
        log,
        &[TopicSpec {
            name: retry.clone(),
            partitions: log.chat_partitions,
            cleanup_policy: "delete",
            retention_ms: 7 * 24 * 3600 * 1000,
            acknowledged: true,
        }],
    )
    .await
    .with_context(|| format!("Kafka at {} unreachable (creating {retry})", log.brokers))?;
    let registry = Arc::new(SchemaRegistry::new(log)?);
    registry
        .register_envelope(&retry)
        .await
        .with_context(|| format!("schema registry at {} unreachable", log.registry_url))?;
    let producer = EventProducer::connect(log, registry.clone())
        .await
        .with_context(|| format!("Kafka at {} unreachable", log.brokers))?;
    let markers = Markers::connect(&config.store).await?;
    let providers = Providers::from_config(&config.push)?;
    tracing::info!(providers = ?providers.enabled(), retry_topic = %retry, "push worker starting");
    let group = config.push.group_id.clone();
    let main =
        EventConsumer::connect(log, &group, &[&topics.push], producer.clone(), &topics.dlq).await?;
    let retries = EventConsumer::connect(
        log,
        &format!("{group}-retry"),
        &[&retry],
        producer.clone(),
        &topics.dlq,
    )
    .await?;
    let worker = Arc::new(Worker {
        permits: Semaphore::new(config.push.concurrency.max(1)),
        cfg: config.push.clone(),
        providers,
        markers,
        producer,
        sessions_topic: topics.sessions.clone(),
        retry_topic: retry,
        counters,
    });
    health.ready("push-worker");
    let max_batch = config.push.max_batch;
    let w1 = worker.clone();
    let s1 = shutdown.clone();
    let a = main.run_batches(
        max_batch,
        move |b| {
            let (w, s) = (w1.clone(), s1.clone());
            async move { w.handle(b, false, s).await }
        },
        shutdown.clone(),
    );
    let w2 = worker.clone();
    let s2 = shutdown.clone();
    let b = retries.run_batches(
        max_batch,
        move |batch| {
            let (w, s) = (w2.clone(), s2.clone());
            async move { w.handle(batch, true, s).await }
        },
        shutdown.clone(),
    );
    let (ra, rb) = tokio::join!(a, b);
    let c = &worker.counters;
    tracing::info!(
        sent = c.sent.get(),
        retried = c.retried.get(),
        removed = c.removed.get(),
        dead = c.dead.get(),
        skipped = c.skipped.get(),
        "push worker stopped"
    );
    ra.context("chat.push consumer")?;
    rb.context("retry consumer")?;
    Ok(())
}
