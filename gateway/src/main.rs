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
    let config: chat_gateway::GatewayConfig =
        match chat_runtime::load_config(args.config.as_deref(), "CHAT_") {
            Ok(c) => c,
            Err(e) => {
                eprintln!("chat-gateway: {e}");
                return std::process::ExitCode::from(2);
            }
        };
    if let Err(e) = config.validate() {
        eprintln!("chat-gateway: invalid configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    chat_runtime::telemetry::init(config.log_format);
    let shutdown = chat_runtime::Shutdown::on_signals();
    match chat_gateway::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("chat-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
