//! `chat-admin replay`: rebuild a projection from the log into a keyspace
//! (migrated first), resumable, with progress per partition. The projection
//! code is the live services' ([`crate::replay`]).

use anyhow::Context;
use chat_runtime::Shutdown;
use prometheus_client::registry::Registry;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::AdminConfig;
use crate::daily_stats::DailyStats;
use crate::history::Projector;
use crate::replay::{
    self, HistoryProjection, PresenceTable, Projection, ReplayOptions, ReplayReport, ReplayStatus,
};

/// Which projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProjectionKind {
    /// `chat.events` -> messages, chats, chat_members, user_chats, direct_chats,
    /// user_changes, chat_receipts (progress row `history`).
    History,
    /// `chat.presence` -> presence (progress row `presence`; `user_devices`
    /// is not rebuilt: it comes from the presence service's fold of
    /// `chat.sessions`).
    Presence,
    /// `chat.events` -> chat_daily_stats (progress row `daily_stats`).
    DailyStats,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Progress: one line per interval on stderr (every partition: records done, events/s, ETA).
Resuming: run the same command again after Ctrl-C or kill -9: each partition
continues from the keyspace's projector_progress, not from 0.
Rate: see tests/reports/replay.md (history, 1M events, this 2-core box).
Example: chat-admin replay --projection history --keyspace chat_r1 --json")]
pub struct ReplayArgs {
    /// The projection to rebuild.
    #[arg(long, value_enum)]
    pub projection: ProjectionKind,
    /// Keyspace to project into (created and migrated when missing).
    #[arg(long)]
    pub keyspace: String,
    /// Partitions without recorded progress start at the first record at or
    /// after this time: RFC 3339 (2026-12-01T10:00:00Z) or ms since the epoch.
    #[arg(long)]
    pub from_timestamp: Option<String>,
    /// Keep following the log after the end offsets taken at start.
    #[arg(long)]
    pub follow: bool,
    /// Print a final JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics (chat_replay_events_total{partition},
    /// chat_replay_lag_records{partition}) and /health on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Records per batch at most.
    #[arg(long, default_value_t = 5_000)]
    pub batch_max_events: usize,
    /// Cassandra requests in flight per partition.
    #[arg(long, default_value_t = 16)]
    pub write_concurrency: usize,
    /// Seconds between two progress lines.
    #[arg(long, default_value_t = 2.0)]
    pub progress_interval: f64,
    /// Allow projecting into the configured live keyspace (store.keyspace).
    #[arg(long)]
    pub into_live: bool,
}

/// Parses `--from-timestamp`: ms since the epoch, or RFC 3339.
pub fn parse_timestamp(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || {
        anyhow::anyhow!("--from-timestamp {s:?}: expected ms since the epoch or RFC 3339 (2026-12-01T10:00:00Z)")
    };
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        s.get(r).and_then(|v| v.parse().ok()).ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        let padded = format!("{:0<3}", &digits[..digits.len().min(3)]);
        ms = padded.parse::<i64>().map_err(|_| bad())?;
        rest = &frac[digits.len()..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let hh: i64 = o[1..3].parse().map_err(|_| bad())?;
            let mm: i64 = o[4..6].parse().map_err(|_| bad())?;
            sign * (hh * 60 + mm)
        }
        _ => return Err(bad()),
    };
    anyhow::ensure!(
        (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && sec < 61,
        "{}",
        bad()
    );
    // Days from civil (proleptic Gregorian).
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400 + h * 3_600 + mi * 60 + sec) - offset_min * 60) * 1_000 + ms)
}

pub async fn run(args: ReplayArgs, config: &AdminConfig) -> anyhow::Result<ExitCode> {
    super::check_keyspace(&args.keyspace)?;
    anyhow::ensure!(
        args.into_live || args.keyspace != config.store.keyspace,
        "--keyspace {} is the configured live keyspace (store.keyspace); pass --into-live to project into it",
        args.keyspace
    );
    let from_timestamp_ms = args
        .from_timestamp
        .as_deref()
        .map(parse_timestamp)
        .transpose()?;
    let shutdown = Shutdown::on_signals();
    // Kafka and the registry first: nothing is created when they cannot be reached.
    replay::check_log(&config.log).await?;
    let store = super::connect(&config.store, &args.keyspace).await?;
    let migrated = store
        .migrate(&config.store.replication)
        .await
        .with_context(|| format!("migrating keyspace {}", args.keyspace))?;
    if !migrated.applied.is_empty() {
        eprintln!(
            "keyspace {}: applied migrations {:?}",
            args.keyspace, migrated.applied
        );
    }
    let projection: Arc<dyn Projection> = match args.projection {
        ProjectionKind::History => Arc::new(HistoryProjection(Projector::new(
            store.clone(),
            args.write_concurrency.max(1),
        ))),
        ProjectionKind::Presence => Arc::new(PresenceTable(store.clone())),
        ProjectionKind::DailyStats => Arc::new(DailyStats::new(store.clone())),
    };
    let status = ReplayStatus::default();
    let mut admin = None;
    if let Some(addr) = args.metrics_listen {
        let mut metrics = Registry::with_prefix("chat_replay");
        status.register(&mut metrics);
        let health = chat_runtime::Health::new();
        let (bound, task) =
            chat_runtime::serve_admin(addr, health, Arc::new(metrics), shutdown.clone())
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
        eprintln!("metrics on http://{bound}/metrics");
        admin = Some(task);
    }
    let options = ReplayOptions {
        from_timestamp_ms,
        follow: args.follow,
        batch_max_events: args.batch_max_events.max(1),
    };
    let printer = {
        let (status, stop) = (status.clone(), shutdown.token());
        let interval = Duration::from_secs_f64(args.progress_interval.max(0.1));
        let label = format!("{:?} -> {}", args.projection, args.keyspace).to_lowercase();
        tokio::spawn(async move {
            let mut last = (std::time::Instant::now(), 0u64);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.cancelled() => return,
                }
                last = print_progress(&label, &status, last);
            }
        })
    };
    let report = replay::run(
        &config.log,
        store,
        projection,
        &options,
        status.clone(),
        shutdown.token(),
    )
    .await;
    printer.abort();
    let interrupted = shutdown.is_triggered();
    shutdown.trigger();
    if let Some(task) = admin {
        let _ = task.await;
    }
    let report = report?;
    if args.json {
        super::print_json(&report)?;
    } else {
        print_report(&report);
    }
    if interrupted && !report.complete {
        eprintln!("interrupted: run the same command again to resume from the recorded progress");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

fn eta(remaining: i64, rate: f64) -> String {
    if remaining <= 0 {
        "done".into()
    } else if rate < 1.0 {
        "?".into()
    } else {
        format!("{:.0}s", remaining as f64 / rate)
    }
}

/// One progress line (and a compact per-partition line); returns the
/// sample for the next rate.
fn print_progress(
    label: &str,
    status: &ReplayStatus,
    (at, done_then): (std::time::Instant, u64),
) -> (std::time::Instant, u64) {
    let parts = status.snapshot();
    let done: u64 = parts.iter().map(|p| p.events).sum();
    let total: i64 = parts.iter().map(|p| (p.end - p.start).max(0)).sum();
    let remaining: i64 = parts.iter().map(|p| (p.end - p.next_offset).max(0)).sum();
    let secs = at.elapsed().as_secs_f64().max(0.001);
    let rate = (done - done_then) as f64 / secs;
    let elapsed = status.elapsed().as_secs_f64().max(0.001);
    let pct = if total > 0 {
        100.0 * (total - remaining) as f64 / total as f64
    } else {
        100.0
    };
    let mut line = format!(
        "replay {label}: {pct:5.1}% {done}/{total} records, {rate:.0} events/s now, {:.0} average, ETA {}",
        done as f64 / elapsed,
        eta(remaining, rate)
    );
    let per: Vec<String> = parts
        .iter()
        .map(|p| {
            let r = p.events as f64 / elapsed;
            format!(
                "p{} {}/{} {:.0}/s ETA {}",
                p.partition,
                p.next_offset - p.start,
                p.end - p.start,
                r,
                eta(p.end - p.next_offset, r)
            )
        })
        .collect();
    line.push_str("\n  ");
    line.push_str(&per.join(" | "));
    if std::io::stderr().is_terminal() {
        // Redraw in place: back to the start of the previous two lines.
        static DRAWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if DRAWN.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprint!("\x1b[2F\x1b[J");
        }
    }
    eprintln!("{line}");
    (std::time::Instant::now(), done)
}

fn print_report(r: &ReplayReport) {
    println!(
        "replay {} -> keyspace {} from {}: {} records in {:.1} s = {:.0} events/s ({}; {}{})",
        r.projection,
        r.keyspace,
        r.topic,
        r.events,
        r.elapsed_s,
        r.events_per_s,
        if r.complete {
            "complete"
        } else {
            "NOT complete"
        },
        if r.resumed {
            "resumed"
        } else {
            "from the start"
        },
        if r.undecodable + r.malformed > 0 {
            format!(
                ", {} undecodable, {} malformed skipped",
                r.undecodable, r.malformed
            )
        } else {
            String::new()
        }
    );
    for p in &r.partitions {
        println!(
            "  partition {:>3}: {} -> {} (end {}), {} records",
            p.partition, p.start, p.next_offset, p.end, p.events
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_timestamp;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500
        );
        assert_eq!(
            parse_timestamp("2023-11-15T00:13:20+02:00").unwrap(),
            1_700_000_000_000
        );
        assert!(parse_timestamp("yesterday").is_err());
    }
}
