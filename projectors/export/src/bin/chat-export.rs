//! `chat-export`: the analytics export of `chat.events` to Parquet.
//!
//!   chat-export run [--until-end]      export (continuously, or up to the end offsets taken at start)
//!   chat-export compact [--include-open]  merge the small files of closed hours
//!   chat-export status                 what the files hold, and the lag behind Kafka
//!
//! Exit codes: 0 done, 1 failed (Kafka or the registry unreachable, a file
//! error, the directory locked by another run), 2 bad configuration or usage.

use anyhow::Context;
use chat_export::export::{self, ExportMetrics, ExportSettings};
use chat_log::{LogConfig, Topics};
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{Health, Shutdown};
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "chat-export",
    version,
    about = "Export chat.events to Hive-partitioned Parquet files (exactly once per record), and compact them per hour",
    after_help = OPTIONS_HELP
)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Output directory (overrides export.out_dir).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Print the report (and errors, on stderr) as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Export chat.events, resuming each partition after the files present.
    /// Runs until SIGTERM/Ctrl-C (flushing what it read), compacting closed hours as it goes.
    Run {
        /// Export up to the end offsets taken at start, compact the closed hours, print a report, exit.
        #[arg(long)]
        until_end: bool,
    },
    /// Merge the files of each closed hour into one file per partition (atomic swap of the hour directory).
    Compact {
        /// Also compact hours that are not closed yet (the current one).
        #[arg(long)]
        include_open: bool,
    },
    /// Per partition: the next offset to export (from the files) and the lag behind Kafka's end
    /// (in offsets: the sequencer's transaction markers take one each, so a caught-up partition may show 1).
    Status,
}

/// chat-export's config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct ExportConfig {
    /// Log line format: `pretty` or `json`.
    log_format: LogFormat,
    /// Kafka and the schema registry.
    log: LogConfig,
    /// The export.
    export: ExportSettings,
}

const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by CHAT_<KEY>, nested
keys joined by a double underscore, e.g. CHAT_EXPORT__OUT_DIR=/data/export):
  log.*                      as in chat-gateway --help (brokers, registry_url, topic_prefix, security)
  export.out_dir             root of the export (--out)                       [export]
  export.flush_rows          a partition's rows per file, at most (memory: rows buffered per partition) [10000]
  export.flush_interval_ms   a row waits at most this long before its file is written [60000]
  export.compact_interval_ms how often closed hours are compacted (run)       [60000]
  export.compact_grace_ms    an hour is closed this long after its end        [600000]
  export.listen              admin address of `run` (/health, /metrics)       [unset: none]
  log_format                 pretty | json                                    [pretty]

Layout: <out>/topic=<topic>/date=YYYY-MM-DD/hour=HH/part-p<P>-<first>-<last>.parquet
(UTC hour of sequenced_ts; names starting with . or _ are not data). Columns and
reading rules: schemas/README.md, \"Analytics contract\".

Exit codes: 0 done, 1 failed (Kafka or registry unreachable, file error, output
directory locked by another run), 2 bad configuration or usage.";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let fail = |code: u8, message: String| {
        if json {
            let e = serde_json::json!({"error": message, "exit": code});
            eprintln!("{e}");
        } else {
            eprintln!("chat-export: {message}");
        }
        ExitCode::from(code)
    };
    let mut config: ExportConfig = match chat_runtime::load_config(args.config.as_deref(), "CHAT_")
    {
        Ok(c) => c,
        Err(e) => return fail(2, e.to_string()),
    };
    if let Some(out) = args.out {
        config.export.out_dir = out;
    }
    if let Err(e) = config.log.check() {
        return fail(2, format!("invalid configuration: {e}"));
    }
    chat_runtime::telemetry::init(config.log_format);
    match run(args.command, &config, json).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, format!("{e:#}")),
    }
}

fn print(json: bool, value: &impl Serialize, human: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{human}");
    }
    Ok(())
}

async fn run(command: Command, config: &ExportConfig, json: bool) -> anyhow::Result<()> {
    let out = &config.export.out_dir;
    match command {
        Command::Run { until_end } => {
            let shutdown = Shutdown::on_signals();
            let (metrics, health) = (ExportMetrics::default(), Health::new());
            let admin = match config.export.listen {
                Some(listen) => {
                    let mut registry = Registry::with_prefix("chat_export");
                    metrics.register(&mut registry);
                    let (_, task) = chat_runtime::serve_admin(
                        listen,
                        health.clone(),
                        Arc::new(registry),
                        shutdown.clone(),
                    )
                    .await
                    .with_context(|| format!("admin endpoint on {listen}"))?;
                    Some(task)
                }
                None => None,
            };
            let result = export::run(
                &config.log,
                &config.export,
                until_end,
                shutdown.clone(),
                metrics,
                health,
            )
            .await;
            shutdown.trigger();
            if let Some(task) = admin {
                let _ = task.await;
            }
            let report = result?;
            let human = format!(
                "exported {} rows in {} files to {} ({} partitions, {} undecodable skipped, {} leftovers discarded); compacted {} hours",
                report.rows,
                report.files_written,
                report.out.display(),
                report.partitions.len(),
                report.undecodable,
                report.leftovers_discarded,
                report.compaction.hours_compacted.len()
            );
            print(json, &report, human)
        }
        Command::Compact { include_open } => {
            let (report, discarded) = export::compact_now(
                &config.log,
                out,
                config.export.compact_grace_ms,
                include_open,
            )?;
            let human = format!(
                "compacted {} hours: {} files -> {} ({} rows merged); {} hours still open; {} leftovers discarded",
                report.hours_compacted.len(),
                report.files_before,
                report.files_after,
                report.rows_merged,
                report.hours_open,
                discarded
            );
            let value = serde_json::json!({
                "out": out,
                "leftovers_discarded": discarded,
                "compaction": report,
            });
            print(json, &value, human)
        }
        Command::Status => {
            let scan = export::status(&config.log, out)?;
            let topic = Topics::new(&config.log).events;
            chat_log::topics::check_brokers(&config.log).await?;
            let positions = scan.resume_positions();
            let mut parts = Vec::new();
            let mut lines = Vec::new();
            for info in chat_log::topics::partitions(&config.log, &topic).await? {
                let p = info.partition;
                let end = chat_log::consumer::high_watermark(&config.log, &topic, p).await?;
                let next = positions.get(&p).copied();
                let files = scan.files.iter().filter(|f| f.name.partition == p).count();
                let lag = end - next.unwrap_or(0);
                lines.push(format!(
                    "partition {p}: {files} files, next offset {}, end {end}, lag {lag} offsets (transaction markers count)",
                    next.map_or("-".to_string(), |n| n.to_string())
                ));
                parts.push(serde_json::json!({
                    "partition": p, "files": files, "next_offset": next, "end": end, "lag": lag,
                }));
            }
            let value = serde_json::json!({
                "topic": topic,
                "out": out,
                "files": scan.files.len(),
                "leftovers": scan.leftovers.len(),
                "partitions": parts,
            });
            print(json, &value, lines.join("\n"))
        }
    }
}
