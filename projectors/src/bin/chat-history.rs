//! `chat-history`: the history projector (`chat.events` -> Cassandra). Thin:
//! the logic lives in `chat_projectors::history`.

use chat_projectors::history::{self, HistoryConfig, HistoryStatus};
use chat_projectors::store;
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
    let store = store::connect(&config.store).await?;
    history::run_history(&config, store, status, shutdown.clone()).await?;
    shutdown.trigger();
    admin.await?;
    Ok(())
}
