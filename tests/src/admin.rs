//! Running `chat-admin` (and other operator binaries) against a test's log
//! and store: the same environment the platform's services get.

use chat_log::LogConfig;
use chat_projectors::store::StoreConfig;
use std::process::Stdio;
use tokio::process::Command;

/// A `chat-admin` command (binary of `profile`) for the test's topics and
/// Cassandra, with `args`. Its stdout is piped; stderr is inherited.
pub fn chat_admin(
    log: &LogConfig,
    store: &StoreConfig,
    profile: &str,
    args: &[&str],
) -> anyhow::Result<Command> {
    command("chat-admin", log, store, profile, args)
}

/// Any operator binary of the workspace with the test's environment.
pub fn command(
    bin: &str,
    log: &LogConfig,
    store: &StoreConfig,
    profile: &str,
    args: &[&str],
) -> anyhow::Result<Command> {
    let exe = crate::platform::binary(bin, profile)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("CHAT_LOG__TOPIC_PREFIX", &log.topic_prefix)
        .env("CHAT_LOG__BROKERS", &log.brokers)
        .env("CHAT_LOG__REGISTRY_URL", &log.registry_url)
        .env("CHAT_LOG__CHAT_PARTITIONS", log.chat_partitions.to_string())
        .env("CHAT_STORE__NODES", store.nodes.join(","))
        .env("CHAT_STORE__KEYSPACE", &store.keyspace)
        .env("CHAT_STORE__CONTROL_KEYSPACE", &store.control_keyspace)
        .env(
            "RUST_LOG",
            std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Runs a command to its end: exit code and stdout.
pub async fn output(mut cmd: Command) -> anyhow::Result<(i32, String)> {
    let out = cmd.output().await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The last line of `stdout` that parses as JSON.
pub fn last_json(stdout: &str) -> anyhow::Result<serde_json::Value> {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| anyhow::anyhow!("no JSON report in: {stdout}"))
}
