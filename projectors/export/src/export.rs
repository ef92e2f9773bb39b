//! The exporter: reads `chat.events` (group-less, read committed) from the
//! positions the files on disk give, and commits each partition's records
//! as Parquet files.
//!
//! Per Kafka partition one buffer of rows, all of one hour, in offset
//! order. A buffer is written out as one file when the next record belongs
//! to another hour, when it holds `flush_rows` rows, when its oldest row
//! waited `flush_interval_ms`, and on shutdown. Writing a file: a temp name
//! (`.tmp-<name>.partial`) in the hour's directory, fsync, rename to its final name
//! (`part-p<P>-<first>-<last>.parquet`), fsync of the directory; files of a
//! partition are committed one after the other in offset order, so the
//! committed files of a partition always hold a prefix of it. On start the
//! exporter resumes each partition after the highest offset its files hold
//! and deletes uncommitted temp files: kill -9 at any point loses nothing
//! and writes nothing twice.
//!
//! Compaction (see [`crate::compact`]) runs every `compact_interval_ms` for
//! the hours the watermark passed by `compact_grace_ms`. The watermark is
//! now when every partition is read to its end; otherwise the oldest
//! event time among the partitions' last records read.

use chat_log::{LogConfig, SchemaRegistry, TailItem, TailStart, TopicTail, Topics};
use chat_runtime::{now_ms, Health, Shutdown};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compact::{self, CompactReport};
use crate::layout::{self, FileName, Hour, OutLock, TEMP_PREFIX};
use crate::parquet_io;
use crate::row::ExportRow;
use crate::ExportError;

/// The `[export]` table of chat-export's config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSettings {
    /// Root directory of the export (`--out`).
    pub out_dir: PathBuf,
    /// A partition's buffer is written as a file at this many rows.
    pub flush_rows: usize,
    /// ... or once its oldest row waited this long.
    pub flush_interval_ms: u64,
    /// How often closed hours are compacted (continuous mode).
    pub compact_interval_ms: u64,
    /// An hour is closed once the watermark is this far past its end.
    pub compact_grace_ms: u64,
    /// Admin endpoint (`/health`, `/metrics`) of `run`; unset: none.
    pub listen: Option<std::net::SocketAddr>,
}

/// The exporter's metrics (prefix `chat_export_`).
#[derive(Clone, Debug, Default)]
pub struct ExportMetrics {
    /// Records read and buffered (not yet necessarily in a file).
    pub records_read: Counter,
    /// Rows committed in files.
    pub rows_written: Counter,
    pub files_written: Counter,
    pub hours_compacted: Counter,
    pub undecodable: Counter,
    /// 1 while every partition is read to the end offsets last fetched.
    pub caught_up: Gauge,
}

impl ExportMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "records_read",
            "Records read from chat.events and buffered",
            self.records_read.clone(),
        );
        r.register(
            "rows_written",
            "Rows committed in Parquet files",
            self.rows_written.clone(),
        );
        r.register(
            "files_written",
            "Parquet files committed",
            self.files_written.clone(),
        );
        r.register(
            "hours_compacted",
            "Hours whose files were merged",
            self.hours_compacted.clone(),
        );
        r.register(
            "undecodable",
            "Records skipped because they could not be decoded",
            self.undecodable.clone(),
        );
        r.register(
            "caught_up",
            "1 when every partition is read to its end",
            self.caught_up.clone(),
        );
    }
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("export"),
            flush_rows: 10_000,
            flush_interval_ms: 60_000,
            compact_interval_ms: 60_000,
            compact_grace_ms: 600_000,
            listen: None,
        }
    }
}

/// One partition's part of the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    /// The first offset this run read (from the files present; `null`: the
    /// partition's beginning, nothing exported before).
    pub resumed_from: Option<i64>,
    /// `--until-end`: the end offset taken at start.
    pub end: Option<i64>,
    /// The next offset to export after this run (highest exported + 1).
    pub next_offset: Option<i64>,
    pub rows: u64,
    pub files: u64,
}

/// What a run did (printed by `--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    pub topic: String,
    pub out: PathBuf,
    pub mode: &'static str,
    pub rows: u64,
    pub files_written: u64,
    /// Records that could not be decoded (skipped, logged).
    pub undecodable: u64,
    /// Temp files and compaction directories of an interrupted run, deleted at start.
    pub leftovers_discarded: usize,
    /// True when SIGTERM / Ctrl-C ended the run (what was read was written).
    pub interrupted: bool,
    pub elapsed_ms: u64,
    pub partitions: Vec<PartitionReport>,
    pub compaction: CompactReport,
}

struct Buffer {
    hour: Hour,
    rows: Vec<ExportRow>,
    since: Instant,
}

/// The state of one run: buffers, per-partition positions and counts.
struct Exporter {
    out: PathBuf,
    topic: String,
    settings: ExportSettings,
    buffers: BTreeMap<i32, Buffer>,
    /// Next offset to accept per partition (records below are already exported).
    next: HashMap<i32, i64>,
    /// Event time of the last record read per partition.
    last_time: HashMap<i32, i64>,
    report: ExportReport,
    parts: BTreeMap<i32, PartitionReport>,
    metrics: ExportMetrics,
}

impl Exporter {
    fn part(&mut self, p: i32) -> &mut PartitionReport {
        self.parts.entry(p).or_insert_with(|| PartitionReport {
            partition: p,
            ..Default::default()
        })
    }

    fn handle(&mut self, item: TailItem) -> Result<(), ExportError> {
        let event = match item {
            TailItem::Event(e) => e,
            TailItem::Undecodable {
                partition,
                offset,
                error,
            } => {
                tracing::warn!(partition, offset, %error, "undecodable record skipped");
                self.report.undecodable += 1;
                self.metrics.undecodable.inc();
                return Ok(());
            }
        };
        let p = event.partition;
        if event.offset < self.next.get(&p).copied().unwrap_or(0) {
            return Ok(());
        }
        let row = ExportRow::of(&event);
        let hour = Hour::of_ms(row.event_time_ms());
        self.last_time.insert(p, row.event_time_ms());
        if self.buffers.get(&p).is_some_and(|b| b.hour != hour) {
            self.flush(p)?;
        }
        let buffer = self.buffers.entry(p).or_insert_with(|| Buffer {
            hour,
            rows: Vec::new(),
            since: Instant::now(),
        });
        buffer.rows.push(row);
        self.metrics.records_read.inc();
        self.next.insert(p, event.offset + 1);
        if buffer.rows.len() >= self.settings.flush_rows.max(1) {
            self.flush(p)?;
        }
        Ok(())
    }

    /// Commits partition `p`'s buffer as one file.
    fn flush(&mut self, p: i32) -> Result<(), ExportError> {
        let Some(buffer) = self.buffers.remove(&p) else {
            return Ok(());
        };
        let (Some(first), Some(last)) = (buffer.rows.first(), buffer.rows.last()) else {
            return Ok(());
        };
        let name = FileName {
            partition: p,
            first: first.kafka_offset,
            last: last.kafka_offset,
        }
        .render();
        let dir = layout::hour_dir(&self.out, &self.topic, buffer.hour);
        std::fs::create_dir_all(&dir).map_err(ExportError::io(&dir))?;
        // Not ending in `.parquet`: no glob of data files matches it.
        let temp = dir.join(format!("{TEMP_PREFIX}{name}.partial"));
        let path = dir.join(&name);
        parquet_io::write_rows(&temp, &self.topic, &buffer.rows)?;
        std::fs::rename(&temp, &path).map_err(ExportError::io(&path))?;
        layout::fsync_dir(&dir)?;
        let n = buffer.rows.len() as u64;
        tracing::debug!(file = %path.display(), rows = n, "file committed");
        self.report.rows += n;
        self.report.files_written += 1;
        self.metrics.rows_written.inc_by(n);
        self.metrics.files_written.inc();
        let last_offset = last.kafka_offset;
        let part = self.part(p);
        part.rows += n;
        part.files += 1;
        part.next_offset = Some(last_offset + 1);
        Ok(())
    }

    fn flush_due(&mut self) -> Result<(), ExportError> {
        let max_wait = Duration::from_millis(self.settings.flush_interval_ms);
        let due: Vec<i32> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.since.elapsed() >= max_wait)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.flush(p)?;
        }
        Ok(())
    }

    fn flush_all(&mut self) -> Result<(), ExportError> {
        let all: Vec<i32> = self.buffers.keys().copied().collect();
        for p in all {
            self.flush(p)?;
        }
        Ok(())
    }

    /// Compacts the hours `watermark_ms` passed by the grace. Rows still
    /// buffered for such an hour (late records) become one more file, which
    /// the next pass merges.
    fn compact_closed(&mut self, watermark_ms: i64) -> Result<(), ExportError> {
        let grace = i64::try_from(self.settings.compact_grace_ms).unwrap_or(i64::MAX);
        let r = compact::compact(&self.out, &self.topic, |h| {
            h.end_ms().saturating_add(grace) <= watermark_ms
        })?;
        self.metrics
            .hours_compacted
            .inc_by(r.hours_compacted.len() as u64);
        let c = &mut self.report.compaction;
        c.hours_compacted.extend(r.hours_compacted);
        c.files_before += r.files_before;
        c.files_after += r.files_after;
        c.rows_merged += r.rows_merged;
        c.hours_open = r.hours_open;
        Ok(())
    }

    fn finish(mut self, started: Instant) -> ExportReport {
        let next: Vec<(i32, i64)> = self.next.iter().map(|(p, o)| (*p, *o)).collect();
        for (p, next) in next {
            self.part(p).next_offset.get_or_insert(next);
        }
        self.report.partitions = self.parts.into_values().collect();
        self.report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.report
    }
}

/// Takes the output directory's lock, discards what an interrupted run
/// left, and returns the resume position of each partition.
pub fn prepare(
    out: &Path,
    topic: &str,
) -> Result<(OutLock, BTreeMap<i32, i64>, usize), ExportError> {
    let lock = OutLock::acquire(out)?;
    let mut scan = layout::scan(out, topic)?;
    for f in &scan.foreign {
        tracing::warn!(path = %f.display(), "not an export file; left alone");
    }
    let discarded = scan.discard_leftovers()?;
    Ok((lock, scan.resume_positions(), discarded))
}

/// Checks Kafka and the registry, then opens the tail at `positions`.
async fn open_tail(
    config: &LogConfig,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
) -> Result<TopicTail, ExportError> {
    chat_log::topics::check_brokers(config).await?;
    let registry = Arc::new(SchemaRegistry::new(config)?);
    registry.check_reachable().await?;
    let start = TailStart::Offsets(positions.iter().map(|(p, o)| (*p, *o)).collect());
    Ok(TopicTail::open(config, registry, topic, None, start).await?)
}

/// Exports `chat.events` into `settings.out_dir`: with `until_end`, up to
/// the end offsets taken at start, then compacts the closed hours and
/// returns; otherwise until `shutdown`. Either way what was read is
/// written before returning.
pub async fn run(
    config: &LogConfig,
    settings: &ExportSettings,
    until_end: bool,
    shutdown: Shutdown,
    metrics: ExportMetrics,
    health: Health,
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let topic = Topics::new(config).events;
    let out = settings.out_dir.clone();
    health.not_ready("kafka", "connecting");
    let (_lock, positions, discarded) = prepare(&out, &topic)?;
    let tail = open_tail(config, &topic, &positions).await?;
    health.ready("kafka");
    let mut ex = Exporter {
        out: out.clone(),
        topic: topic.clone(),
        settings: settings.clone(),
        buffers: BTreeMap::new(),
        next: positions.iter().map(|(p, o)| (*p, *o)).collect(),
        last_time: HashMap::new(),
        report: ExportReport {
            topic: topic.clone(),
            out: out.clone(),
            mode: if until_end { "until_end" } else { "continuous" },
            leftovers_discarded: discarded,
            ..Default::default()
        },
        parts: BTreeMap::new(),
        metrics,
    };
    for p in tail.partitions() {
        ex.part(*p).resumed_from = positions.get(p).copied();
    }
    tracing::info!(%topic, out = %out.display(), ?positions, "export starting");
    if until_end {
        let mut ends = tail.high_watermarks().await?;
        for (p, end) in &ends {
            ex.part(*p).end = Some(*end);
        }
        // A partition with nothing after its resume position is done: the
        // consumer reports no position for it until it fetched something.
        ends.retain(|p, end| *end > ex.next.get(p).copied().unwrap_or(0));
        let mut failed = None;
        let read = tail.read_until(&ends, |item| {
            if failed.is_none() {
                if let Err(e) = ex.handle(item) {
                    failed = Some(e);
                }
            }
        });
        let finished = tokio::select! {
            r = read => { r?; true }
            _ = shutdown.wait() => false,
        };
        if let Some(e) = failed {
            return Err(e);
        }
        ex.report.interrupted = !finished;
        ex.flush_all()?;
        if finished {
            // Every partition was read to the ends taken at start.
            ex.compact_closed(now_ms())?;
        }
    } else {
        let tick = Duration::from_millis(settings.flush_interval_ms.clamp(100, 1_000));
        let mut ticker = tokio::time::interval(tick);
        let compact_every = Duration::from_millis(settings.compact_interval_ms.max(1_000));
        let mut last_compact = Instant::now();
        let mut was_caught_up = false;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                item = tail.next() => ex.handle(item?)?,
                _ = ticker.tick() => {
                    ex.flush_due()?;
                    if last_compact.elapsed() >= compact_every {
                        last_compact = Instant::now();
                        // Kafka briefly unreachable: no compaction this time.
                        let ends = match tail.high_watermarks().await {
                            Ok(ends) => ends,
                            Err(e) => {
                                tracing::warn!(error = %e, "end offsets unavailable; compaction skipped");
                                continue;
                            }
                        };
                        let reached = caught_up(&tail, &ends, &ex.next)?;
                        ex.metrics.caught_up.set(i64::from(reached));
                        if reached && !was_caught_up {
                            tracing::info!(?ends, "caught up with the log");
                        }
                        was_caught_up = reached;
                        let watermark = if reached {
                            Some(now_ms())
                        } else {
                            ex.last_time.values().min().copied()
                        };
                        if let Some(w) = watermark {
                            ex.compact_closed(w)?;
                        }
                    }
                }
            }
        }
        ex.report.interrupted = true;
        ex.flush_all()?;
    }
    let report = ex.finish(started);
    tracing::info!(
        rows = report.rows,
        files = report.files_written,
        "export stopped"
    );
    Ok(report)
}

/// True when every partition was read up to `ends`: its next offset is
/// there, or (transaction markers after its last record) the consumer's
/// position is.
fn caught_up(
    tail: &TopicTail,
    ends: &HashMap<i32, i64>,
    next: &HashMap<i32, i64>,
) -> Result<bool, ExportError> {
    for (p, end) in ends {
        if *end <= next.get(p).copied().unwrap_or(0) {
            continue;
        }
        if !tail.reached(&HashMap::from([(*p, *end)]))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Compacts the export of `config`'s `chat.events` under `out`: the hours
/// closed `grace_ms` ago by the wall clock, or every hour with `include_open`.
pub fn compact_now(
    config: &LogConfig,
    out: &Path,
    grace_ms: u64,
    include_open: bool,
) -> Result<(CompactReport, usize), ExportError> {
    let topic = Topics::new(config).events;
    let (_lock, _, discarded) = prepare(out, &topic)?;
    let grace = i64::try_from(grace_ms).unwrap_or(i64::MAX);
    let now = now_ms();
    let report = compact::compact(out, &topic, |h| {
        include_open || h.end_ms().saturating_add(grace) <= now
    })?;
    Ok((report, discarded))
}

/// What the files under `out` hold: per partition the next offset to export.
pub fn status(config: &LogConfig, out: &Path) -> Result<layout::Scan, ExportError> {
    layout::scan(out, &Topics::new(config).events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_log::ConsumedEvent;
    use chat_schemas::{Body, Envelope, ReadReceipt};

    fn item(partition: i32, offset: i64, at_ms: i64) -> TailItem {
        let envelope = Envelope {
            event_id: uuid::Uuid::new_v4(),
            chat_id: Some(uuid::Uuid::new_v4()),
            seq: None,
            sender_user: "ann".into(),
            sender_device: "d".into(),
            client_msg_id: None,
            client_ts: None,
            server_ts: at_ms,
            sequenced_ts: Some(at_ms),
            trace_id: "t".into(),
            body: Body::ReadReceipt(ReadReceipt { up_to_seq: 1 }),
        };
        TailItem::Event(Box::new(ConsumedEvent {
            topic: "chat.events".into(),
            partition,
            offset,
            key: None,
            trace_id: "t".into(),
            schema_id: 1,
            headers: vec![],
            envelope,
        }))
    }

    #[test]
    fn a_file_holds_one_hour_of_one_partition_and_replays_are_skipped() {
        let out = std::env::temp_dir().join(format!("chat-export-ex-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let mut ex = Exporter {
            out: out.clone(),
            topic: "chat.events".into(),
            settings: ExportSettings {
                flush_rows: 3,
                ..Default::default()
            },
            buffers: BTreeMap::new(),
            next: HashMap::from([(0, 10)]),
            last_time: HashMap::new(),
            report: ExportReport::default(),
            parts: BTreeMap::new(),
            metrics: ExportMetrics::default(),
        };
        let h = 1_800_000_000_000_i64 / 3_600_000 * 3_600_000;
        // Already exported (below the resume position): skipped.
        ex.handle(item(0, 9, h)).unwrap();
        for o in 10..15 {
            ex.handle(item(0, o, h + o)).unwrap();
        }
        ex.handle(item(0, 15, h + 3_600_000)).unwrap();
        ex.handle(item(0, 16, h + 5)).unwrap();
        ex.handle(item(1, 0, h)).unwrap();
        ex.handle(TailItem::Undecodable {
            partition: 1,
            offset: 1,
            error: "bad".into(),
        })
        .unwrap();
        assert_eq!(ex.report.undecodable, 1);
        ex.flush_all().unwrap();
        let scan = layout::scan(&out, "chat.events").unwrap();
        let names: Vec<(i64, i32, i64, i64)> = scan
            .files
            .iter()
            .map(|f| {
                (
                    f.hour.0 - Hour::of_ms(h).0,
                    f.name.partition,
                    f.name.first,
                    f.name.last,
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (0, 0, 10, 12),
                (0, 0, 13, 14),
                (0, 0, 16, 16),
                (0, 1, 0, 0),
                (1, 0, 15, 15),
            ]
        );
        assert_eq!(ex.report.rows, 8);
        assert_eq!(ex.metrics.records_read.get(), 8);
        assert_eq!(scan.resume_positions(), BTreeMap::from([(0, 17), (1, 1)]));
        std::fs::remove_dir_all(&out).unwrap();
    }
}
