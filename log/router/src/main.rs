//! `chat-router`: thin binary; the logic lives in the library.

use clap::Parser;
use std::path::PathBuf;

const OPTIONS_HELP: &str = "\
Configuration (TOML keys; override with CHAT_<KEY>, nested keys joined by __):
  listen            admin endpoint /health /metrics              [127.0.0.1:9103]
  group_id          consumer group of all router instances      [router]
  batch_max         most events per batch                       [500]
  batch_linger_us   wait for more events, microseconds          [500]
  log_format        pretty | json                               [pretty]
  log.*             as in chat-gateway --help (brokers, security_protocol,
                    sasl_*, ssl_*, ...)";

#[derive(Parser, Debug)]
#[command(name = "chat-router", version, about = "Routes chat events to the gateways holding recipients", after_help = OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<chat_router::RouterConfig, _, _>(
        "chat-router",
        args.config.as_deref(),
        chat_router::run,
    )
    .await
}
