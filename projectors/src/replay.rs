//! Projecting a topic into a keyspace from the projection's own recorded
//! progress: the engine of `chat-admin replay` (a rebuild into a new
//! keyspace) and of projections that run as group-less services (the
//! example `chat-daily-stats`), with the same projection code as the live
//! services.
//!
//! - **Where it starts.** Per partition, at `next_offset` of the
//!   projection's row in the target keyspace's `projector_progress`
//!   (resuming an interrupted run, `kill -9` included), else at the first
//!   offset at or after `from_timestamp_ms`, else at 0. No consumer group:
//!   the keyspace is the position.
//! - **Where it stops.** At the partitions' end offsets taken at start, or
//!   never (`follow`).
//! - **How.** One reader decodes records (whatever is already fetched, up
//!   to `batch_max_events`) and hands each partition's share to that
//!   partition's worker; workers run concurrently, each projecting its
//!   partition's events in log order (whatever queued up, merged, up to
//!   `batch_max_events`) while the reader decodes the next records. After a
//!   worker's batch is written, `projector_progress` gets
//!   `next_offset = last offset + 1` (never moves back; written while the
//!   next batch is projected when there is a backlog, at once otherwise:
//!   a kill loses at most one batch's record, re-projected on resume). A
//!   failed write is
//!   retried with a backoff, never skipped. Records that cannot be decoded
//!   are skipped and counted (the live service dead-lettered them already).
//! - **Projections** implement [`Projection`]: [`HistoryProjection`] (the
//!   live history projector's [`Projector`]), [`PresenceTable`]
//!   (`chat.presence` -> `presence`, the live `chat-presence` table code),
//!   and [`crate::daily_stats::DailyStats`].

use anyhow::Context;
use chat_log::{LogConfig, SchemaRegistry, TailItem, TailStart, TopicTail, Topics};
use chat_schemas::{Body, Envelope, PresenceStatus};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::history::{ProjectError, Projector, HISTORY_PROJECTOR};
use crate::store::{PresenceRow, Store, StoreError};

/// What a projection did with one partition's batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchDone {
    /// The offset after the batch's last event.
    pub next_offset: i64,
    /// Events of the batch.
    pub events: usize,
    /// Events that changed something (the rest were already projected or
    /// not of interest).
    pub counted: usize,
    /// Events that can never be projected (skipped).
    pub malformed: usize,
}

/// A projection the engine can run: a name (its `projector_progress` key),
/// the topic it reads, and the fold of one partition's events in log order
/// into idempotent writes.
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn topic(&self, topics: &Topics) -> String;
    /// Projects `events` (one partition, log order, after the previous batch
    /// of the same partition). A [`ProjectError::Store`] offers the same
    /// events again.
    fn project<'a>(
        &'a self,
        partition: i32,
        events: &'a [(i64, &'a Envelope)],
    ) -> BoxFuture<'a, Result<BatchDone, ProjectError>>;
}

/// The history projection, exactly as the live `chat-history` runs it.
#[derive(Debug)]
pub struct HistoryProjection(pub Projector);

impl Projection for HistoryProjection {
    fn name(&self) -> &'static str {
        HISTORY_PROJECTOR
    }
    fn topic(&self, topics: &Topics) -> String {
        topics.events.clone()
    }
    fn project<'a>(
        &'a self,
        partition: i32,
        events: &'a [(i64, &'a Envelope)],
    ) -> BoxFuture<'a, Result<BatchDone, ProjectError>> {
        async move {
            let done = self.0.project_batch(partition, events).await?;
            for (offset, why) in &done.malformed {
                tracing::warn!(partition, offset, %why, "malformed event skipped");
            }
            Ok(BatchDone {
                next_offset: done.next_offset,
                events: done.events,
                counted: done.events - done.malformed.len(),
                malformed: done.malformed.len(),
            })
        }
        .boxed()
    }
}

/// The `projector_progress` key of the presence table projection.
pub const PRESENCE_PROJECTOR: &str = "presence";

/// `chat.presence` -> `presence`, the write of the live `chat-presence`
/// (`USING TIMESTAMP` of the record time: replays are harmless).
#[derive(Clone, Debug)]
pub struct PresenceTable(pub Store);

/// The `presence` row a `PresenceChanged` implies (None: another event).
pub fn presence_row(e: &Envelope) -> Option<PresenceRow> {
    let Body::PresenceChanged(p) = &e.body else {
        return None;
    };
    Some(PresenceRow {
        user: p.user_id.clone(),
        status: match p.status {
            PresenceStatus::Online => "online".into(),
            PresenceStatus::Offline => "offline".into(),
        },
        last_seen_ms: p.last_seen,
    })
}

impl Projection for PresenceTable {
    fn name(&self) -> &'static str {
        PRESENCE_PROJECTOR
    }
    fn topic(&self, topics: &Topics) -> String {
        topics.presence.clone()
    }
    fn project<'a>(
        &'a self,
        _partition: i32,
        events: &'a [(i64, &'a Envelope)],
    ) -> BoxFuture<'a, Result<BatchDone, ProjectError>> {
        async move {
            // Latest record per user first: same result, fewer writes.
            let mut latest: HashMap<String, (PresenceRow, i64)> = HashMap::new();
            for (_, e) in events {
                if let Some(row) = presence_row(e) {
                    latest.insert(row.user.clone(), (row, e.server_ts));
                }
            }
            let counted = latest.len();
            futures::stream::iter(latest.into_values())
                .map(|(row, ts)| async move { self.0.put_presence(&row, ts).await })
                .buffer_unordered(32)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(BatchDone {
                next_offset: events.last().map_or(0, |(o, _)| o + 1),
                events: events.len(),
                counted,
                malformed: 0,
            })
        }
        .boxed()
    }
}

/// How to run.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// Partitions without recorded progress start at the first record at
    /// or after this time (ms); None: at offset 0.
    pub from_timestamp_ms: Option<i64>,
    /// Keep going past the end offsets taken at start (a service).
    pub follow: bool,
    /// Records per reader batch and per partition batch at most.
    pub batch_max_events: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            from_timestamp_ms: None,
            follow: false,
            batch_max_events: 5_000,
        }
    }
}

/// Where one partition stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionProgress {
    pub partition: i32,
    /// Where this run started.
    pub start: i64,
    /// The end offset taken at start (refreshed while following).
    pub end: i64,
    /// Every record before it is projected.
    pub next_offset: i64,
    /// Records projected by this run.
    pub events: u64,
    pub undecodable: u64,
    pub malformed: u64,
}

/// A running replay's state, shared with its progress printer and metrics
/// (`<prefix>_events_total{partition}`, `<prefix>_lag_records{partition}`).
#[derive(Clone, Debug)]
pub struct ReplayStatus {
    partitions: Arc<Mutex<BTreeMap<i32, PartitionProgress>>>,
    events: Family<Vec<(String, String)>, Counter>,
    lag: Family<Vec<(String, String)>, Gauge>,
    started: Arc<Mutex<Instant>>,
}

impl Default for ReplayStatus {
    fn default() -> Self {
        Self {
            partitions: Arc::default(),
            events: Family::default(),
            lag: Family::default(),
            started: Arc::new(Mutex::new(Instant::now())),
        }
    }
}

fn labels(partition: i32) -> Vec<(String, String)> {
    vec![("partition".to_string(), partition.to_string())]
}

impl ReplayStatus {
    /// Registers `events` (counter, `_total`) and `lag_records` (gauge).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events",
            "records projected by this run, per partition",
            self.events.clone(),
        );
        registry.register(
            "lag_records",
            "records between the partition's end and the projected offset",
            self.lag.clone(),
        );
    }

    /// Every partition's progress.
    pub fn snapshot(&self) -> Vec<PartitionProgress> {
        let p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        p.values().copied().collect()
    }

    /// Time since the run started.
    pub fn elapsed(&self) -> Duration {
        self.started.lock().map(|s| s.elapsed()).unwrap_or_default()
    }

    /// True when every partition reached its end.
    pub fn caught_up(&self) -> bool {
        let p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        !p.is_empty() && p.values().all(|p| p.next_offset >= p.end)
    }

    fn with(&self, partition: i32, f: impl FnOnce(&mut PartitionProgress)) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let at = p.entry(partition).or_insert(PartitionProgress {
            partition,
            ..Default::default()
        });
        f(at);
        self.lag
            .get_or_create(&labels(partition))
            .set((at.end - at.next_offset).max(0));
    }

    fn done(
        &self,
        partition: i32,
        next_offset: i64,
        events: u64,
        malformed: u64,
        undecodable: u64,
    ) {
        self.events.get_or_create(&labels(partition)).inc_by(events);
        self.with(partition, |p| {
            p.next_offset = p.next_offset.max(next_offset);
            p.events += events;
            p.malformed += malformed;
            p.undecodable += undecodable;
        });
    }

    fn set_end(&self, partition: i32, end: i64) {
        self.with(partition, |p| p.end = p.end.max(end));
    }
}

/// What a replay did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayReport {
    pub projection: String,
    pub keyspace: String,
    pub topic: String,
    /// Some partition had recorded progress at start: this run resumed.
    pub resumed: bool,
    /// Every partition reached its end offset.
    pub complete: bool,
    pub events: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    pub undecodable: u64,
    pub malformed: u64,
    pub partitions: Vec<PartitionProgress>,
}

/// Checks that Kafka and the schema registry answer (each error names
/// which, and where); returns the registry client.
pub async fn check_log(log: &LogConfig) -> anyhow::Result<Arc<SchemaRegistry>> {
    chat_log::topics::check_brokers(log).await?;
    let registry = Arc::new(SchemaRegistry::new(log)?);
    registry.check_reachable().await?;
    Ok(registry)
}

/// How long the reader waits for a record before it checks whether it is done.
const POLL: Duration = Duration::from_millis(200);
/// Chunks queued per partition worker: the worker merges what queued up
/// (up to `batch_max_events`) while its previous batch was written.
const QUEUE: usize = 16;

type Chunk = Vec<(i64, Option<Envelope>)>;

/// Projects `projection`'s topic into `store` (see the module doc) until the
/// end offsets taken at start (or `stop`, or forever with `follow`).
/// `store` must be migrated. Reports what it did; an interrupted run
/// reports `complete: false` (run it again to resume).
pub async fn run(
    log: &LogConfig,
    store: Store,
    projection: Arc<dyn Projection>,
    options: &ReplayOptions,
    status: ReplayStatus,
    stop: CancellationToken,
) -> anyhow::Result<ReplayReport> {
    let topics = Topics::new(log);
    let topic = projection.topic(&topics);
    let name = projection.name();
    let registry = check_log(log).await?;
    let partitions: Vec<i32> = chat_log::topics::partitions(log, &topic)
        .await
        .with_context(|| format!("reading the partitions of {topic}"))?
        .iter()
        .map(|p| p.partition)
        .collect();
    let recorded = store
        .progress(name)
        .await
        .with_context(|| format!("reading {name} progress in keyspace {}", store.keyspace()))?;
    let resumed = !recorded.is_empty();
    let mut starts = HashMap::new();
    let mut ends = HashMap::new();
    for &p in &partitions {
        let end = chat_log::consumer::high_watermark(log, &topic, p).await?;
        let start = match (recorded.get(&p), options.from_timestamp_ms) {
            (Some(o), _) => *o,
            (None, Some(ts)) => chat_log::offset_for_time(log, &topic, p, ts)
                .await?
                .unwrap_or(end),
            (None, None) => 0,
        };
        starts.insert(p, start);
        ends.insert(p, end);
    }
    if let Ok(mut s) = status.started.lock() {
        *s = Instant::now();
    }
    for &p in &partitions {
        status.with(p, |pp| {
            pp.start = starts[&p];
            pp.next_offset = starts[&p];
            pp.end = ends[&p];
        });
    }
    tracing::info!(projection = name, %topic, keyspace = %store.keyspace(), resumed, ?starts, ?ends, "replay starting");
    // Partitions already at their end count as reached (their position is
    // unknown until a record is read).
    let reach: HashMap<i32, i64> = ends
        .iter()
        .map(|(p, e)| (*p, if starts[p] >= *e { 0 } else { *e }))
        .collect();
    let tail = TopicTail::open(
        log,
        registry,
        &topic,
        Some(partitions.clone()),
        TailStart::Offsets(starts.clone()),
    )
    .await?;

    let max = options.batch_max_events.max(1);
    let mut senders: HashMap<i32, mpsc::Sender<Chunk>> = HashMap::new();
    let mut workers = Vec::new();
    for &p in &partitions {
        let (tx, rx) = mpsc::channel::<Chunk>(QUEUE);
        senders.insert(p, tx);
        workers.push(tokio::spawn(worker(
            p,
            rx,
            projection.clone(),
            store.clone(),
            status.clone(),
            stop.clone(),
            max,
        )));
    }
    let read = read_loop(
        &tail, &senders, &reach, options, &status, log, &topic, max, &stop,
    )
    .await;
    drop(senders);
    for w in workers {
        w.await.context("replay worker panicked")?;
    }
    read?;

    let snapshot = status.snapshot();
    let events: u64 = snapshot.iter().map(|p| p.events).sum();
    let elapsed = status.elapsed().as_secs_f64();
    let complete = snapshot.iter().all(|p| p.next_offset >= ends[&p.partition]);
    Ok(ReplayReport {
        projection: name.to_string(),
        keyspace: store.keyspace().to_string(),
        topic,
        resumed,
        complete,
        events,
        elapsed_s: elapsed,
        events_per_s: events as f64 / elapsed.max(0.001),
        undecodable: snapshot.iter().map(|p| p.undecodable).sum(),
        malformed: snapshot.iter().map(|p| p.malformed).sum(),
        partitions: snapshot,
    })
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    tail: &TopicTail,
    senders: &HashMap<i32, mpsc::Sender<Chunk>>,
    reach: &HashMap<i32, i64>,
    options: &ReplayOptions,
    status: &ReplayStatus,
    log: &LogConfig,
    topic: &str,
    max: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut refreshed = Instant::now();
    let mut caught_up = false;
    loop {
        if options.follow && !caught_up && status.caught_up() {
            caught_up = true;
            tracing::info!(
                topic,
                "caught up with the end offsets taken at start; following live"
            );
        }
        if stop.is_cancelled() {
            return Ok(());
        }
        if !options.follow && tail.reached(reach)? {
            return Ok(());
        }
        if options.follow && refreshed.elapsed() > Duration::from_secs(2) {
            refreshed = Instant::now();
            for &p in tail.partitions() {
                if let Ok(end) = chat_log::consumer::high_watermark(log, topic, p).await {
                    status.set_end(p, end);
                }
            }
        }
        let first = tokio::select! {
            r = tokio::time::timeout(POLL, tail.next()) => match r {
                Ok(item) => item?,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return Ok(()),
        };
        let mut items = vec![first];
        // Whatever else is fetched already (each `next` is cancel-safe: a
        // record whose decode would wait stays in the tail).
        while items.len() < max {
            match tail.next().now_or_never() {
                Some(item) => items.push(item?),
                None => break,
            }
        }
        let mut chunks: BTreeMap<i32, Chunk> = BTreeMap::new();
        for item in items {
            let (p, o, e) = match item {
                TailItem::Event(e) => (e.partition, e.offset, Some(e.envelope)),
                TailItem::Undecodable {
                    partition,
                    offset,
                    error,
                } => {
                    tracing::warn!(partition, offset, %error, "undecodable record skipped");
                    (partition, offset, None)
                }
            };
            chunks.entry(p).or_default().push((o, e));
        }
        for (p, chunk) in chunks {
            let Some(tx) = senders.get(&p) else { continue };
            tokio::select! {
                r = tx.send(chunk) => if r.is_err() { return Ok(()) },
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }
}

/// A batch whose writes are done and whose progress is not recorded yet:
/// `(next_offset, records, malformed, undecodable)`.
type Unrecorded = (i64, u64, u64, u64);

async fn worker(
    partition: i32,
    mut rx: mpsc::Receiver<Chunk>,
    projection: Arc<dyn Projection>,
    store: Store,
    status: ReplayStatus,
    stop: CancellationToken,
    max: usize,
) {
    let name = projection.name();
    // Records progress (never moves back) once the batch's writes are done.
    let record = |done: Option<Unrecorded>| {
        let (store, status, stop) = (&store, &status, &stop);
        async move {
            let Some((next, records, malformed, undecodable)) = done else {
                return Some(());
            };
            retry(stop, partition, "record progress", || {
                async move {
                    store
                        .put_progress(name, partition, next)
                        .await
                        .map_err(ProjectError::Store)
                }
                .boxed()
            })
            .await?;
            status.done(partition, next, records, malformed, undecodable);
            Some(())
        }
    };
    let mut unrecorded: Option<Unrecorded> = None;
    loop {
        // With a backlog, the previous batch's progress is written while
        // this one is projected; before waiting for more, it is written.
        let mut chunk = match rx.try_recv() {
            Ok(c) => c,
            Err(_) => {
                if record(unrecorded.take()).await.is_none() {
                    return;
                }
                match rx.recv().await {
                    Some(c) => c,
                    None => return,
                }
            }
        };
        while chunk.len() < max {
            match rx.try_recv() {
                Ok(more) => chunk.extend(more),
                Err(_) => break,
            }
        }
        let Some(next) = chunk.last().map(|(o, _)| o + 1) else {
            continue;
        };
        let undecodable = chunk.iter().filter(|(_, e)| e.is_none()).count() as u64;
        let events: Vec<(i64, &Envelope)> = chunk
            .iter()
            .filter_map(|(o, e)| Some((*o, e.as_ref()?)))
            .collect();
        let project = async {
            if events.is_empty() {
                return Some(0);
            }
            retry(&stop, partition, "project", || {
                projection.project(partition, &events)
            })
            .await
            .map(|d| d.malformed as u64)
        };
        let (projected, recorded) = tokio::join!(project, record(unrecorded.take()));
        let (Some(malformed), Some(())) = (projected, recorded) else {
            return; // stopped
        };
        unrecorded = Some((next, chunk.len() as u64, malformed, undecodable));
    }
}

/// Runs `f` until it succeeds (a store failure is retried with a capped
/// backoff; a malformed batch cannot happen here: projections report
/// malformed events in their result). None: `stop` fired.
async fn retry<'a, T>(
    stop: &CancellationToken,
    partition: i32,
    what: &str,
    mut f: impl FnMut() -> BoxFuture<'a, Result<T, ProjectError>>,
) -> Option<T> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let r = tokio::select! {
            r = f() => r,
            _ = stop.cancelled() => return None,
        };
        match r {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, partition, what, "replay write failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A [`StoreError`] as a projection error (for callers building projections).
pub fn store_error(e: StoreError) -> ProjectError {
    ProjectError::Store(e)
}
