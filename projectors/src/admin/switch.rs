//! `chat-admin switch` and `drop-keyspace`: services move between keyspaces
//! through an alias, without downtime; the old keyspace stays until it is
//! dropped explicitly.
//!
//! `switch --alias A --to K` checks that K is migrated and, unless
//! `--force`, that K's history projection has caught up with the keyspace
//! A names now (every partition's `projector_progress` at least what the
//! current keyspace had when the command started; it waits up to
//! `--catch-up-timeout` for a follower such as `replay --follow`), then
//! moves A to K with a lightweight transaction (conditional on A still
//! naming the keyspace checked). Services following A move within
//! `store.alias_poll_ms` (ARCHITECTURE.md, "Replay, verify, switch").

use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::AdminConfig;
use crate::history::HISTORY_PROJECTOR;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
First use: `chat-admin switch --alias chat --to chat` creates the alias; then run the
services with store.keyspace_alias = \"chat\" (CHAT_STORE__KEYSPACE_ALIAS=chat).
A rebuild: `chat-admin replay --projection history --keyspace chat_v2 --follow` (leave it
running), `chat-admin verify ...`, `chat-admin switch --alias chat --to chat_v2`, stop the
replay once the services moved, and later `chat-admin drop-keyspace --keyspace chat`.")]
pub struct SwitchArgs {
    /// The alias the services name (store.keyspace_alias).
    #[arg(long)]
    pub alias: String,
    /// The keyspace it should name from now on.
    #[arg(long)]
    pub to: Option<String>,
    /// Only show where the alias points.
    #[arg(long)]
    pub show: bool,
    /// Switch even if the target's history progress is behind.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the target to catch up, in seconds.
    #[arg(long, default_value_t = 30)]
    pub catch_up_timeout: u64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DropArgs {
    /// The keyspace to drop (refused while an alias names it).
    #[arg(long)]
    pub keyspace: String,
    /// Confirm: the data is gone for good (rebuildable only by a replay).
    #[arg(long)]
    pub yes: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct SwitchReport {
    alias: String,
    keyspace: Option<String>,
    previous: Option<String>,
    switched: bool,
}

pub async fn run(args: SwitchArgs, config: &AdminConfig) -> anyhow::Result<ExitCode> {
    super::check_keyspace(&args.alias)?;
    let control_ks = &config.store.control_keyspace;
    let control = super::connect(&config.store, control_ks).await?;
    control
        .ensure_control(&config.store.replication)
        .await
        .map_err(|e| anyhow::anyhow!("creating {control_ks}.keyspace_aliases: {e}"))?;
    let now = control.alias(&args.alias).await?;
    let Some(to) = args.to.clone().filter(|_| !args.show) else {
        let report = SwitchReport {
            alias: args.alias.clone(),
            keyspace: now.as_ref().map(|r| r.keyspace.clone()),
            previous: now.as_ref().and_then(|r| r.previous.clone()),
            switched: false,
        };
        if args.json {
            super::print_json(&report)?;
        } else {
            match &now {
                Some(r) => println!(
                    "alias {} -> {} (previous: {})",
                    r.alias,
                    r.keyspace,
                    r.previous.as_deref().unwrap_or("none")
                ),
                None => println!("alias {} is not set", args.alias),
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    super::check_keyspace(&to)?;
    let target = control.with_keyspace(&to);
    target
        .require_migrated()
        .await
        .map_err(|e| anyhow::anyhow!("target keyspace {to}: {e}"))?;
    // Services fall back to store.keyspace while the alias is unset.
    let current = now
        .as_ref()
        .map_or(config.store.keyspace.clone(), |r| r.keyspace.clone());
    {
        if current == to {
            anyhow::bail!("alias {} already names {to}", args.alias);
        }
        if !args.force && control.keyspace_exists(&current).await? {
            let source = control.with_keyspace(&current);
            let want = source.progress(HISTORY_PROJECTOR).await?;
            let deadline = Instant::now() + Duration::from_secs(args.catch_up_timeout);
            loop {
                let have = target.progress(HISTORY_PROJECTOR).await?;
                let behind: Vec<(i32, i64, i64)> = want
                    .iter()
                    .filter(|(p, o)| have.get(p).copied().unwrap_or(0) < **o)
                    .map(|(p, o)| (*p, have.get(p).copied().unwrap_or(0), *o))
                    .collect();
                if behind.is_empty() {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{to} is behind {current} (partition, {to}, {current}): {behind:?}; keep `chat-admin replay --follow` running into {to}, or pass --force"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let expected = now.as_ref().map(|r| r.keyspace.as_str());
    let applied = control
        .set_alias(&args.alias, &to, expected, chat_runtime::now_ms())
        .await?;
    anyhow::ensure!(
        applied,
        "alias {} changed while switching (someone else switched it); look again with --show",
        args.alias
    );
    let report = SwitchReport {
        alias: args.alias.clone(),
        keyspace: Some(to.clone()),
        previous: Some(current.clone()),
        switched: true,
    };
    if args.json {
        super::print_json(&report)?;
    } else {
        println!(
            "alias {} -> {to} (was {current}); services following it move within store.alias_poll_ms; the old keyspace is kept until `chat-admin drop-keyspace`",
            args.alias
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drop_keyspace(args: DropArgs, config: &AdminConfig) -> anyhow::Result<ExitCode> {
    super::check_keyspace(&args.keyspace)?;
    anyhow::ensure!(
        args.yes,
        "dropping {} deletes its data: pass --yes",
        args.keyspace
    );
    anyhow::ensure!(
        args.keyspace != config.store.control_keyspace,
        "{} is the control keyspace",
        args.keyspace
    );
    let control = super::connect(&config.store, &config.store.control_keyspace).await?;
    if control
        .keyspace_exists(&config.store.control_keyspace)
        .await?
    {
        let aliases = control.aliases().await?;
        if let Some(a) = aliases.iter().find(|a| a.keyspace == args.keyspace) {
            anyhow::bail!("alias {} names {}: switch it first", a.alias, args.keyspace);
        }
    }
    control
        .with_keyspace(&args.keyspace)
        .drop_keyspace()
        .await?;
    if args.json {
        super::print_json(&serde_json::json!({"dropped": args.keyspace}))?;
    } else {
        println!("dropped keyspace {}", args.keyspace);
    }
    Ok(ExitCode::SUCCESS)
}
