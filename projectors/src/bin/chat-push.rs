//! `chat-push`: chat events -> push tasks on `chat.push` for devices that are
//! not connected, and push registrations -> `push_registrations`. Thin: the
//! logic lives in `chat_projectors::push`.

use chat_projectors::push::{self, PushConfig};
use chat_projectors::store;
use chat_runtime::Shutdown;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "chat-push", version, about = "Turn chat.events into push tasks on chat.push (coalesced, per offline device)", after_help = push::OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<PushConfig, _, _>("chat-push", args.config.as_deref(), run).await
}

async fn run(config: PushConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let store = store::connect(&config.store).await?;
    store.require_migrated().await?;
    push::run(config, store, shutdown).await
}
