//! The sequencer's consume-sequence-produce loop over Kafka transactions.

use chat_log::{
    deliveries_partition, BatchRecord, LogConfig, OutRecord, Outgoing, PartitionedConsumer,
    SchemaRegistry, Topics, TxnProducer, HEADER_GATEWAY_ID, HEADER_RECIPIENTS,
};
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{now_ms, Health, Shutdown};
use chat_schemas::{Body, CommandResult, Envelope};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use crate::state::{Decision, Limits, PartitionState, RebuildError};
use crate::store::{changelog_records, restore, Applied, RestoreCtx, StateConfig, Store};

/// The sequencer's config (`chat-sequencer --help` lists every key).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequencerConfig {
    /// Admin endpoint (`/health`, `/metrics`).
    pub listen: SocketAddr,
    /// Consumer group of all sequencer instances.
    pub group_id: String,
    /// Prefix of the per-partition transactional ids; the same for every instance.
    pub transactional_prefix: String,
    /// Most commands in one transaction.
    pub batch_max: usize,
    /// How long a batch waits for more commands after the first, in microseconds.
    pub batch_linger_us: u64,
    /// Group size and text limits.
    pub limits: Limits,
    /// How long a `client_msg_id` dedupes, in seconds (PROTOCOL.md: a retry
    /// within the window is answered `duplicate`; after it, it is a new
    /// command). 0: forever. Default 7 days.
    pub dedupe_window_secs: u64,
    /// The state store (`state.dir`, `state.cache_chats`, ...).
    pub state: StateConfig,
    /// Log line format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// Kafka and the registry.
    pub log: LogConfig,
}

impl chat_runtime::ServiceConfig for SequencerConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()
    }
}

impl SequencerConfig {
    /// The dedupe window in ms (None: forever).
    pub fn dedupe_window_ms(&self) -> Option<i64> {
        match self.dedupe_window_secs {
            0 => None,
            s => Some(
                i64::try_from(s)
                    .unwrap_or(i64::MAX / 1000)
                    .saturating_mul(1000),
            ),
        }
    }
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9102)),
            group_id: "sequencer".into(),
            transactional_prefix: "chat-sequencer".into(),
            batch_max: 500,
            batch_linger_us: 500,
            limits: Limits::default(),
            dedupe_window_secs: 7 * 24 * 3600,
            state: StateConfig::default(),
            log_format: LogFormat::Pretty,
            log: LogConfig::default(),
        }
    }
}

/// Counters of the sequencer, by outcome and code.
#[derive(Clone)]
struct Metrics {
    commands: Family<Vec<(String, String)>, Counter>,
    rebuilds: Counter,
    restores: Family<Vec<(String, String)>, Counter>,
    restore_events: Counter,
    restore_seconds: Histogram,
    failed_rebuilds: Counter,
    aborted: Counter,
    replays: Counter,
    commit_seconds: Histogram,
    batch_commands: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            commands: Family::default(),
            rebuilds: Counter::default(),
            restores: Family::default(),
            restore_events: Counter::default(),
            restore_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            failed_rebuilds: Counter::default(),
            aborted: Counter::default(),
            replays: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
}

impl Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "commands",
            "Commands handled, by outcome and error code",
            self.commands.clone(),
        );
        r.register(
            "replays",
            "Commands read again after a rebalance and skipped (already sequenced and answered)",
            self.replays.clone(),
        );
        r.register(
            "rebuilds",
            "Partition states rebuilt from chat.events offset 0 (no state store, no changelog)",
            self.rebuilds.clone(),
        );
        r.register(
            "state_restores",
            "Partition states restored, by source: local (the store, caught up from the log), changelog, log (offset 0: no changelog yet), empty (nothing to restore)",
            self.restores.clone(),
        );
        r.register(
            "state_restore_events",
            "Events of chat.events read by restores",
            self.restore_events.clone(),
        );
        r.register(
            "state_restore_seconds",
            "Time to restore a partition's state",
            self.restore_seconds.clone(),
        );
        r.register(
            "failed_rebuilds",
            "Partition rebuilds refused because chat.events is not a gap-free log there (logged at error level)",
            self.failed_rebuilds.clone(),
        );
        r.register(
            "batch_commit_seconds",
            "Time to append a batch and commit its transaction",
            self.commit_seconds.clone(),
        );
        r.register(
            "batch_commands",
            "Commands per batch (one transaction each)",
            self.batch_commands.clone(),
        );
        r.register(
            "aborted_transactions",
            "Batches whose transaction aborted (retried)",
            self.aborted.clone(),
        );
    }
}

/// Runs one sequencer instance until `shutdown`.
pub async fn run(config: SequencerConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    health.not_ready("kafka", "starting");
    let registry = Arc::new(SchemaRegistry::new(&config.log)?);
    registry.check_reachable().await?;
    let topics = Topics::new(&config.log);
    let mut consumer = PartitionedConsumer::connect(
        &config.log,
        registry.clone(),
        &config.group_id,
        &topics.commands,
    )
    .await?;
    health.ready("kafka");
    let metrics = Metrics::default();
    let mut reg = Registry::with_prefix("chat_sequencer");
    metrics.register(&mut reg);
    let (_, admin) =
        chat_runtime::serve_admin(config.listen, health, Arc::new(reg), shutdown.clone()).await?;

    // One task per owned partition: partitions commit their transactions
    // concurrently, each in order. A task that fails reports the offset to
    // read its partition again from, and the next batch of it starts a new
    // task (fence, rebuild).
    let restore_ctx = RestoreCtx {
        log: config.log.clone(),
        registry: registry.clone(),
        events_topic: topics.events.clone(),
        changelog_topic: topics.sequencer_state.clone(),
        routing: false,
        window_ms: config.dedupe_window_ms(),
        catch_up_max_events: config.state.catch_up_max_events,
        cache_chats: config.state.cache_chats,
        who: "sequencer",
    };
    let ctx = Arc::new(PartitionCtx {
        config: config.clone(),
        registry,
        topics,
        metrics,
        restore: restore_ctx,
        state_dir: config.state.dir("sequencer"),
        stores: std::sync::Mutex::new(HashMap::new()),
    });
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel::<Failed>();
    let mut workers: HashMap<i32, Worker> = HashMap::new();
    let mut generation = 0u64;
    let token = shutdown.token();
    let linger = Duration::from_micros(config.batch_linger_us);
    loop {
        let batch = tokio::select! {
            Some(failed) = fail_rx.recv() => {
                // Only the current task of a partition rewinds it: a task
                // replaced meanwhile failed because its successor fenced it,
                // and the successor reads from before its batch anyway.
                // Rewinding for it would fence the successor in turn (two
                // tasks of one partition fencing each other in a loop).
                let current = workers
                    .get(&failed.partition)
                    .is_some_and(|w| w.generation == failed.generation);
                if current {
                    workers.remove(&failed.partition);
                    if token.is_cancelled() {
                        // Stopping: the next owner resumes from the
                        // committed offset; nothing to read again here.
                        break;
                    }
                    consumer.rewind(failed.partition, failed.offset).await?;
                }
                continue;
            }
            b = consumer.next_batch(config.batch_max, linger, &token) => match b? {
                Some(b) => b,
                None => break,
            },
        };
        let p = batch.partition;
        if batch.fresh || !workers.contains_key(&p) {
            // The partition was (re)assigned or rewound: let the task that
            // held it finish its transaction before a new one fences it.
            if let Some(old) = workers.remove(&p) {
                old.finish().await;
            }
            // A new task starts exactly at the committed offset: a batch that
            // begins later would skip commands whose transaction was aborted
            // (seen after a rebalance that left the partition here: the
            // consumer went on from where it had fetched).
            let committed = consumer.committed_offset(p).await?.unwrap_or(0);
            if batch.first_offset() > committed {
                tracing::warn!(
                    partition = p,
                    from = batch.first_offset(),
                    committed,
                    "a fresh batch starts after the committed offset; reading from there"
                );
                consumer.rewind(p, committed).await?;
                continue;
            }
            generation += 1;
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let task = tokio::spawn(partition_task(
                ctx.clone(),
                p,
                generation,
                rx,
                fail_tx.clone(),
            ));
            workers.insert(
                p,
                Worker {
                    generation,
                    work: tx,
                    task,
                },
            );
        }
        let Some(group) = consumer.group_metadata() else {
            continue;
        };
        if let Some(w) = workers.get(&p) {
            // A closed channel means the task failed; its report rewinds p.
            let _ = w.work.send(Work { batch, group }).await;
        }
    }
    tracing::info!("sequencer stopping");
    // Closing the channels lets every task finish its batch and exit.
    for (_, w) in workers.drain() {
        w.finish().await;
    }
    // Closes the stores (their last writes made durable).
    ctx.stores.lock().unwrap_or_else(|e| e.into_inner()).clear();
    config.state.remove_if_temporary(&ctx.state_dir);
    admin.await.ok();
    Ok(())
}

/// What every partition task shares.
struct PartitionCtx {
    config: SequencerConfig,
    registry: Arc<SchemaRegistry>,
    topics: Topics,
    metrics: Metrics,
    restore: RestoreCtx,
    state_dir: std::path::PathBuf,
    /// Each partition's store, opened once per process (a file is opened
    /// by one handle at a time).
    stores: std::sync::Mutex<HashMap<i32, Arc<Store>>>,
}

impl PartitionCtx {
    fn store(&self, p: i32) -> anyhow::Result<Arc<Store>> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stores.get(&p) {
            return Ok(s.clone());
        }
        let s = Arc::new(Store::open(
            &self.state_dir,
            &self.topics.sequencer_state,
            p,
            self.config.dedupe_window_ms(),
            self.config.state.store_cache_mib,
        )?);
        stores.insert(p, s.clone());
        Ok(s)
    }
}

/// The task that owns a partition, and which one it is.
struct Worker {
    /// Tells a task's failure report from an earlier task's of the same
    /// partition.
    generation: u64,
    work: tokio::sync::mpsc::Sender<Work>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Lets the task finish what it holds (its channel closes) and waits
    /// for it, at most a transaction's timeout.
    async fn finish(self) {
        drop(self.work);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// A partition task's failure: read `partition` again from `offset`.
struct Failed {
    partition: i32,
    generation: u64,
    offset: i64,
}

/// One batch for a partition task.
struct Work {
    batch: chat_log::Batch,
    group: chat_log::partitioned::ConsumerGroupMetadata,
}

/// Owns partition `p`: fences the previous owner, rebuilds the state, then
/// sequences and commits each batch in order. On any failure it reports the
/// failed batch's first offset and exits.
async fn partition_task(
    ctx: Arc<PartitionCtx>,
    p: i32,
    generation: u64,
    mut rx: tokio::sync::mpsc::Receiver<Work>,
    fail: tokio::sync::mpsc::UnboundedSender<Failed>,
) {
    let mut owned: Option<Owned> = None;
    let most = ctx.config.batch_max.max(1) * 4;
    while let Some(Work {
        mut batch,
        mut group,
    }) = rx.recv().await
    {
        // Batches that queued up while the last transaction committed join
        // this one: under load, transactions grow instead of queueing.
        while batch.records.len() < most {
            match rx.try_recv() {
                Ok(more) => {
                    batch.records.extend(more.batch.records);
                    group = more.group;
                }
                Err(_) => break,
            }
        }
        let first = batch.first_offset();
        match sequence_and_commit(&ctx, p, &mut owned, batch, group).await {
            Ok(()) => {}
            Err(e) => {
                if e.downcast_ref::<RebuildError>().is_some() {
                    // Logged at error level by `rebuild`. Every retry reads the
                    // whole partition again: pause first, dropping the batches
                    // that queue meanwhile (the rewind reads them again).
                    ctx.metrics.failed_rebuilds.inc();
                    let pause = async { while rx.recv().await.is_some() {} };
                    let _ = tokio::time::timeout(REBUILD_RETRY_PAUSE, pause).await;
                } else {
                    tracing::warn!(partition = p, error = %e, "batch not committed; rebuilding and retrying");
                    ctx.metrics.aborted.inc();
                }
                let _ = fail.send(Failed {
                    partition: p,
                    generation,
                    offset: first,
                });
                return;
            }
        }
    }
}

/// How long a partition whose state could not be rebuilt waits before the
/// next attempt.
const REBUILD_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// What a partition task holds while it owns its partition.
struct Owned {
    producer: TxnProducer,
    state: PartitionState,
    store: Arc<Store>,
    /// How far the state has folded the partition; the offset of its newest
    /// event is what a duplicate's answer names (the original event is at
    /// or before it).
    applied: Applied,
}

async fn sequence_and_commit(
    ctx: &PartitionCtx,
    p: i32,
    owned: &mut Option<Owned>,
    batch: chat_log::Batch,
    group: chat_log::partitioned::ConsumerGroupMetadata,
) -> anyhow::Result<()> {
    let (config, topics, metrics) = (&ctx.config, &ctx.topics, &ctx.metrics);
    if owned.is_none() {
        // Fence the previous owner first, then read what it committed.
        let producer = TxnProducer::init(
            &config.log,
            ctx.registry.clone(),
            &config.transactional_prefix,
            &topics.commands,
            p,
        )
        .await?;
        let store = ctx.store(p)?;
        let r = restore(&ctx.restore, &store, p, None).await?;
        if r.source == crate::store::Source::Log {
            metrics.rebuilds.inc();
        }
        metrics
            .restores
            .get_or_create(&vec![("source".into(), r.source.label().into())])
            .inc();
        metrics.restore_events.inc_by(r.events_read);
        metrics.restore_seconds.observe(r.elapsed.as_secs_f64());
        tracing::info!(
            partition = p,
            source = r.source.label(),
            events_read = r.events_read,
            changelog_records = r.changelog_records,
            next_offset = r.applied.next,
            ms = r.elapsed.as_millis() as u64,
            "partition state restored"
        );
        *owned = Some(Owned {
            producer,
            state: r.state,
            store,
            applied: r.applied,
        });
    }
    let Some(Owned {
        producer,
        state,
        store,
        applied,
    }) = owned.as_mut()
    else {
        anyhow::bail!("partition {p} has no state");
    };
    let Sequenced {
        outputs,
        results,
        last_event,
    } = sequence_batch(&batch.records, state, config, topics, p, metrics);
    if let Some(e) = state.store_failure() {
        let e = anyhow::anyhow!("state store: {e}");
        *owned = None;
        return Err(e);
    }
    // The chats the batch changed go to the changelog in the same
    // transaction, with the mark of the batch's last event.
    let changed = changelog_records(state.dirty_chats(), None);
    let last_event_id = last_event.and_then(|i| match &outputs[i] {
        OutRecord::Envelope(o) => Some(*o.envelope.event_id.as_bytes()),
        OutRecord::Raw { .. } => None,
    });
    let changelog = topics.sequencer_state.clone();
    let n = batch.records.len();
    let t0 = std::time::Instant::now();
    let before = applied.newest_offset();
    let mut mark = *applied;
    let committed = producer
        .commit_batch(
            outputs,
            |positions| {
                let mut out = place_results(results, positions, before, p);
                let last = last_event.and_then(|i| positions.get(i));
                if let (Some(at), Some(id)) = (last, last_event_id) {
                    mark = Applied {
                        next: at.offset + 1,
                        newest: Some((at.offset, id)),
                    };
                    let records = changed
                        .into_iter()
                        .chain(changelog_records(std::iter::empty(), Some(mark)));
                    out.extend(records.map(|(key, payload)| OutRecord::Raw {
                        topic: changelog.clone(),
                        partition: Some(p),
                        key: Some(key),
                        payload,
                        headers: Vec::new(),
                    }));
                }
                out
            },
            batch.next_offset(),
            group,
        )
        .await;
    metrics.commit_seconds.observe(t0.elapsed().as_secs_f64());
    metrics.batch_commands.observe(n as f64);
    tracing::debug!(
        partition = p,
        records = n,
        ms = t0.elapsed().as_millis() as u64,
        "batch committed"
    );
    // On failure the state already holds the batch's decisions: drop it
    // (the caller rewinds and a new task rebuilds from the log).
    // (A failed batch is undone by dropping the state: the store holds only
    // committed batches, and the next task restores from it.)
    if let Err(e) = committed {
        *owned = None;
        return Err(anyhow::anyhow!(e));
    }
    let stored = store.write(&state.take_changes(), mark);
    match stored {
        Ok(true) => {
            *applied = mark;
            state.evict(config.state.cache_chats);
            Ok(())
        }
        Ok(false) => {
            *owned = None;
            anyhow::bail!(
                "partition {p}: the state store is ahead of this task (it lost the partition)"
            )
        }
        Err(e) => {
            *owned = None;
            Err(e.into())
        }
    }
}

/// What a batch appends: events (and dead letters) first, then the results,
/// which learn their events' offsets from the first phase.
struct Sequenced {
    outputs: Vec<OutRecord>,
    results: Vec<PendingResult>,
    /// Index in `outputs` of the batch's last event.
    last_event: Option<usize>,
}

/// A `CommandResult` waiting for the offset of its event.
struct PendingResult {
    record: Outgoing,
    at: ResultAt,
}

/// Which offset a result names.
enum ResultAt {
    /// Its own event: `outputs[i]`.
    Own(usize),
    /// A duplicate: the newest event when it was answered (`outputs[i]`, or
    /// the partition's newest before the batch when `None`).
    Newest(Option<usize>),
    /// A rejection: none.
    Nowhere,
}

/// Fills each result's `event_partition` / `event_offset` from the
/// positions of the first phase.
fn place_results(
    results: Vec<PendingResult>,
    positions: &[chat_log::Produced],
    before: Option<i64>,
    partition: i32,
) -> Vec<OutRecord> {
    results
        .into_iter()
        .map(|PendingResult { mut record, at }| {
            let position = match at {
                ResultAt::Own(i) | ResultAt::Newest(Some(i)) => {
                    positions.get(i).map(|at| (at.partition, at.offset))
                }
                ResultAt::Newest(None) => before.map(|o| (partition, o)),
                ResultAt::Nowhere => None,
            };
            if let Body::CommandResult(r) = &mut record.envelope.body {
                r.event_partition = position.and_then(|(p, _)| u32::try_from(p).ok());
                r.event_offset = position.and_then(|(_, o)| u64::try_from(o).ok());
            }
            OutRecord::Envelope(Box::new(record))
        })
        .collect()
}

fn sequence_batch(
    records: &[BatchRecord],
    state: &mut PartitionState,
    config: &SequencerConfig,
    topics: &Topics,
    p: i32,
    metrics: &Metrics,
) -> Sequenced {
    let now = now_ms();
    let mut out = Vec::with_capacity(records.len());
    let mut results = Vec::with_capacity(records.len());
    let mut last_event = None;
    for rec in records {
        let ev = match rec {
            BatchRecord::Event(ev) => ev,
            BatchRecord::Undecodable {
                offset,
                key,
                payload,
                headers,
                error,
            } => {
                tracing::warn!(partition = p, offset, %error, "undecodable command dead-lettered");
                out.push(OutRecord::Raw {
                    topic: topics.dlq.clone(),
                    partition: None,
                    key: key.clone(),
                    payload: payload.clone(),
                    headers: chat_log::dlq::dead_letter_headers(
                        &topics.commands,
                        p,
                        *offset,
                        error,
                        &config.group_id,
                        headers,
                    ),
                });
                // Counted here: the transaction may still abort and redo the batch.
                chat_log::metrics::count_dead_lettered(&config.group_id, &topics.commands);
                continue;
            }
        };
        let cmd = &ev.envelope;
        let span = tracing::info_span!("sequence", chat = ?cmd.chat_id, trace_id = %cmd.trace_id, kind = cmd.body.kind());
        let _g = span.enter();
        if state.is_replay(cmd) {
            tracing::debug!("command read again after a rebalance; already answered");
            metrics.replays.inc();
            continue;
        }
        let decision = state.sequence(cmd, &config.limits, now);
        let (seq, code, reason, at) = match &decision {
            Decision::Append(event) => {
                tracing::debug!(seq = ?event.seq, "appended");
                last_event = Some(out.len());
                out.push(OutRecord::Envelope(Box::new(Outgoing {
                    topic: topics.events.clone(),
                    partition: Some(p),
                    key: cmd.chat_id.map(|c| c.to_string()).unwrap_or_default(),
                    envelope: (**event).clone(),
                    headers: Vec::new(),
                })));
                let own = ResultAt::Own(out.len() - 1);
                (crate::state::result_seq(event), None, None, own)
            }
            Decision::Duplicate { seq } => (Some(*seq), None, None, ResultAt::Newest(last_event)),
            Decision::Reject { code, reason } => {
                tracing::debug!(code, %reason, "rejected");
                let (code, reason) = (Some(code.to_string()), Some(reason.clone()));
                (None, code, reason, ResultAt::Nowhere)
            }
        };
        let code_label = code.clone().unwrap_or_default();
        metrics
            .commands
            .get_or_create(&vec![
                ("outcome".into(), decision.outcome().symbol().into()),
                ("code".into(), code_label),
            ])
            .inc();
        if let Some(gateway) = ev.header(HEADER_GATEWAY_ID) {
            results.push(PendingResult {
                record: Outgoing {
                    topic: topics.results.clone(),
                    partition: Some(deliveries_partition(&gateway, config.log.chat_partitions)),
                    key: gateway,
                    envelope: result_envelope(cmd, decision.outcome(), seq, code, reason, now),
                    headers: vec![(
                        HEADER_RECIPIENTS.into(),
                        cmd.sender_user.clone().into_bytes(),
                    )],
                },
                at,
            });
        }
    }
    Sequenced {
        outputs: out,
        results,
        last_event,
    }
}

fn result_envelope(
    cmd: &Envelope,
    outcome: chat_schemas::CommandOutcome,
    seq: Option<u64>,
    code: Option<String>,
    reason: Option<String>,
    now: i64,
) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4(),
        chat_id: cmd.chat_id,
        seq: None,
        sender_user: cmd.sender_user.clone(),
        sender_device: cmd.sender_device.clone(),
        client_msg_id: cmd.client_msg_id.clone(),
        client_ts: cmd.client_ts,
        server_ts: cmd.server_ts,
        sequenced_ts: Some(now),
        trace_id: cmd.trace_id.clone(),
        body: Body::CommandResult(CommandResult {
            command_event_id: cmd.event_id,
            outcome,
            seq,
            code,
            reason,
            // Set by `place_results` once the events are appended.
            event_partition: None,
            event_offset: None,
        }),
    }
}
