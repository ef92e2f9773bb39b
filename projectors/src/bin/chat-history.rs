//! `chat-history`: the history projector (`chat.events` -> Cassandra). Thin:
//! the logic lives in `chat_projectors::history`.

use chat_projectors::alias;
use chat_projectors::history::{self, HistoryConfig, HistoryStatus};
use chat_runtime::{Health, Shutdown};
use clap::Parser;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "chat-history", version, about = "Project chat.events into the Cassandra history tables", after_help = history::OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<HistoryConfig, _, _>("chat-history", args.config.as_deref(), run)
        .await
}

async fn run(config: HistoryConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    let status = HistoryStatus::new(health.clone());
    let mut metrics = Registry::with_prefix("chat_history");
    status.register(&mut metrics);
    let (addr, admin) =
        chat_runtime::serve_admin(config.listen, health, Arc::new(metrics), shutdown.clone())
            .await?;
    tracing::info!(%addr, "chat-history admin endpoint");
    let (mut store, watch) = alias::connect(&config.store).await?;
    let Some(watch) = watch else {
        history::run_history(&config, store, status, shutdown.clone()).await?;
        shutdown.trigger();
        admin.await?;
        return Ok(());
    };
    // Following a keyspace alias: one consumer group per keyspace
    // (`<group_id>.<keyspace>`), seeded from that keyspace's own
    // `projector_progress`, so moving to a rebuilt keyspace continues where
    // its rebuild got to, not where the old keyspace's group was.
    loop {
        let mut cfg = config.clone();
        cfg.group_id = format!("{}.{}", config.group_id, store.keyspace());
        let progress = store.progress(history::HISTORY_PROJECTOR).await?;
        let topic = chat_log::Topics::new(&cfg.log).events;
        match chat_log::consumer::seed_group_offsets(&cfg.log, &cfg.group_id, &topic, &progress)
            .await
        {
            Ok(true) => {
                tracing::info!(group = %cfg.group_id, ?progress, "new group starts at the keyspace's recorded progress")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, group = %cfg.group_id, "could not seed the group's offsets; it starts from its own or the earliest")
            }
        }
        let inner = Shutdown::new();
        let mover = {
            let (inner, outer, watch, from) = (
                inner.clone(),
                shutdown.clone(),
                watch.clone(),
                store.keyspace().to_string(),
            );
            tokio::spawn(async move {
                let outer = outer.token();
                let to = tokio::select! {
                    to = watch.changed(&from, &outer) => to,
                    _ = inner.wait() => None,
                };
                inner.trigger();
                to
            })
        };
        let ran = history::run_history(&cfg, store.clone(), status.clone(), inner.clone()).await;
        inner.trigger();
        let to = mover.await.ok().flatten();
        ran?;
        match to {
            Some(ks) if !shutdown.is_triggered() => {
                tracing::info!(from = %store.keyspace(), to = %ks, "keyspace alias switched: projecting into the new keyspace");
                store = store.with_keyspace(&ks);
            }
            _ => break,
        }
    }
    shutdown.trigger();
    admin.await?;
    Ok(())
}
