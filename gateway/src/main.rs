//! `chat-gateway`: thin binary; the logic lives in the library.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "chat-gateway", version, about = "The chat platform's WebSocket gateway", after_help = chat_gateway::config::OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<chat_gateway::GatewayConfig, _, _>(
        "chat-gateway",
        args.config.as_deref(),
        chat_gateway::run,
    )
    .await
}
