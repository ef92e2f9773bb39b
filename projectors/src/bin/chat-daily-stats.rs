//! `chat-daily-stats`: the example backfill projection as a service
//! (`chat.events` -> `chat_daily_stats`). It starts from its own
//! `projector_progress` rows (offset 0 the first time), catches up and
//! follows live: [`chat_projectors::replay::run`] with `follow`. The
//! template a team copies for a new projection (see
//! `chat_projectors::daily_stats`).

use chat_projectors::daily_stats::DailyStats;
use chat_projectors::replay::{self, ReplayOptions, ReplayStatus};
use chat_projectors::store::StoreConfig;
use chat_runtime::telemetry::LogFormat;
use chat_runtime::{Health, Shutdown};
use clap::Parser;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

const OPTIONS_HELP: &str = "\
Configuration (TOML file keys; each can be overridden by an environment
variable CHAT_<KEY>, nested keys joined by a double underscore):
  listen                admin address (/health, /metrics)           [127.0.0.1:9105]
  log_format            pretty | json                               [pretty]
  batch_max_events      records per batch at most                   [5000]
  log.*                 Kafka and the registry, as in chat-history --help
  store.*               Cassandra, as in chat-history --help (store.keyspace_alias:
                        follow an alias, see chat-admin switch --help)
Metrics: chat_daily_stats_events_total{partition}, chat_daily_stats_lag_records{partition}.
The table must exist (chat-admin migrate); the service migrates nothing.
Rebuild into another keyspace: chat-admin replay --projection daily-stats --keyspace K";

#[derive(Parser, Debug)]
#[command(name = "chat-daily-stats", version, about = "Project chat.events into chat_daily_stats (per chat and day): backfill from offset 0, then follow live", after_help = OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct DailyStatsConfig {
    listen: SocketAddr,
    log_format: LogFormat,
    log: chat_log::LogConfig,
    store: StoreConfig,
    batch_max_events: usize,
}

impl Default for DailyStatsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9105)),
            log_format: LogFormat::Pretty,
            log: chat_log::LogConfig::default(),
            store: StoreConfig::default(),
            batch_max_events: 5_000,
        }
    }
}

impl chat_runtime::ServiceConfig for DailyStatsConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.log.check()?;
        if self.batch_max_events == 0 {
            return Err("batch_max_events must be at least 1".into());
        }
        self.store.check()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<DailyStatsConfig, _, _>(
        "chat-daily-stats",
        args.config.as_deref(),
        run,
    )
    .await
}

async fn run(config: DailyStatsConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    health.not_ready("cassandra", "connecting");
    health.not_ready("kafka", "connecting");
    let status = ReplayStatus::default();
    let mut metrics = Registry::with_prefix("chat_daily_stats");
    status.register(&mut metrics);
    let (addr, admin) = chat_runtime::serve_admin(
        config.listen,
        health.clone(),
        Arc::new(metrics),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "chat-daily-stats admin endpoint");
    let (mut store, watch) = chat_projectors::alias::connect(&config.store).await?;
    let options = ReplayOptions {
        follow: true,
        batch_max_events: config.batch_max_events,
        ..ReplayOptions::default()
    };
    loop {
        store.require_migrated().await?;
        health.ready("cassandra");
        // Stops on shutdown, or when the alias moves to another keyspace.
        let stop = shutdown.token().child_token();
        let moved = watch.clone().map(|w| {
            let (stop, from) = (stop.clone(), store.keyspace().to_string());
            tokio::spawn(async move {
                let to = w.changed(&from, &stop).await;
                stop.cancel();
                to
            })
        });
        health.ready("kafka");
        tracing::info!(keyspace = %store.keyspace(), "daily stats projection: catching up, then following");
        let projection = Arc::new(DailyStats::new(store.clone()));
        let report = replay::run(
            &config.log,
            store.clone(),
            projection,
            &options,
            status.clone(),
            stop.clone(),
        )
        .await;
        stop.cancel();
        let to = match moved {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        let report = report?;
        tracing::info!(events = report.events, "daily stats projection stopped");
        match to {
            Some(ks) if !shutdown.is_triggered() => {
                tracing::info!(from = %store.keyspace(), to = %ks, "keyspace alias switched: moving over");
                store = store.with_keyspace(&ks);
            }
            _ => break,
        }
    }
    shutdown.trigger();
    admin.await?;
    Ok(())
}
