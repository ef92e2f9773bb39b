//! `chat-push-worker`: consumes `chat.push` (and its retry topic) and sends
//! each task through APNs, FCM, Web Push or a signed webhook. See
//! `chat_push_send::worker` for the guarantees and README.md "Push
//! notifications" for the configuration.

use chat_push_send::config::WorkerConfig;
use chat_runtime::Shutdown;
use clap::Parser;
use std::path::PathBuf;

const OPTIONS_HELP: &str = "\
Configuration (TOML keys; CHAT_<KEY> overrides, nested keys joined by __,
e.g. CHAT_PUSH__APNS__BASE_URL=http://127.0.0.1:9443):
  log.*, store.*             as in chat-admin --help (store: the sent-markers, table push_sent)
  listen                     host:port of /health and /metrics      [unset: not served]
  push.group_id              consumer group                         [chat-push-worker]
  push.max_batch, push.concurrency, push.max_attempts               [256, 64, 12]
  push.retry_base_ms, push.retry_max_ms                             [1000, 300000]
  push.request_timeout_ms                                           [10000]
  push.apns.{enabled,base_url,team_id,key_id,key,topic,token_refresh_secs}
  push.fcm.{enabled,base_url,token_url,project_id,service_account}
  push.webpush.{enabled,vapid_private_key,vapid_subject,ttl_secs}
  push.webhook.{enabled,secret}
  Keys (push.apns.key, push.fcm.service_account, push.webpush.vapid_private_key)
  are given inline or as @/path/to/file.";

#[derive(Parser, Debug)]
#[command(name = "chat-push-worker", version, about = "Send push tasks through the providers", after_help = OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chat_runtime::service_main::<WorkerConfig, _, _>(
        "chat-push-worker",
        args.config.as_deref(),
        run,
    )
    .await
}

async fn run(config: WorkerConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    chat_push_send::worker::run(config, shutdown).await
}
