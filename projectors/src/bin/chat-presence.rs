//! `chat-presence`: session registry -> presence facts, device list and the
//! expiry of sessions whose gateway died. Thin: the logic lives in
//! `chat_projectors::presence`.

use chat_projectors::presence::{self, PresenceConfig};
use chat_projectors::store;
use chat_runtime::Shutdown;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "chat-presence", version, about = "Fold chat.sessions into presence (chat.presence, presence, user_devices)", after_help = presence::OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<PresenceConfig, _, _>("chat-presence", args.config.as_deref(), run)
        .await
}

async fn run(config: PresenceConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let store = store::connect(&config.store).await?;
    store.require_migrated().await?;
    presence::run(config, store, shutdown).await
}
