//! `chat-sequencer`: thin binary; the logic lives in the library.

use clap::Parser;
use std::path::PathBuf;

const OPTIONS_HELP: &str = "\
Configuration (TOML keys; override with CHAT_<KEY>, nested keys joined by __):
  listen                      admin endpoint /health /metrics     [127.0.0.1:9102]
  group_id                    consumer group of all instances     [sequencer]
  transactional_prefix        per-partition transactional id prefix [chat-sequencer]
  batch_max                   most commands per transaction       [500]
  batch_linger_us             wait for more commands, microseconds [500]
  limits.max_group_members    largest group                       [1000]
  limits.max_text_bytes       largest message text                [16384]
  log_format                  pretty | json                       [pretty]
  log.txn_linger_ms           linger.ms of the transactional producers [0]
  log.*                       as in chat-gateway --help (brokers, security_protocol,
                              sasl_*, ssl_*, ...)";

#[derive(Parser, Debug)]
#[command(name = "chat-sequencer", version, about = "Validates, dedupes and sequences chat commands", after_help = OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<chat_sequencer::SequencerConfig, _, _>(
        "chat-sequencer",
        args.config.as_deref(),
        chat_sequencer::run,
    )
    .await
}
