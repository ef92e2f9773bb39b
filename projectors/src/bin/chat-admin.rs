//! `chat-admin`: the operator's tool. A thin dispatcher: each command
//! family lives in `chat_projectors::admin::<module>`.
//!
//!   chat-admin topics | schemas | migrate | setup   idempotent set-up
//!   chat-admin replay          rebuild a projection from the log into a keyspace
//!   chat-admin verify          compare a rebuilt projection with the live one
//!   chat-admin switch          move a keyspace alias (services follow it)
//!   chat-admin drop-keyspace   drop a keyspace no alias names
//!   chat-admin dlq             dead letters: list, show, redrive, drop

use chat_projectors::admin::{self, replay, setup, switch, verify, AdminConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "chat-admin", version, about = "Operate the platform: set-up, replay, verify, switch, dead letters", after_help = admin::OPTIONS_HELP)]
struct Args {
    /// TOML config file; environment variables CHAT_* override its keys.
    #[arg(long, env = "CHAT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create every Kafka topic that does not exist yet.
    Topics,
    /// Register the envelope schema under every topic's value subject.
    Schemas,
    /// Create the Cassandra keyspace and apply pending migrations.
    Migrate,
    /// topics, schemas and migrate, in that order.
    Setup,
    /// Rebuild a projection from the log into a keyspace (resumable).
    Replay(replay::ReplayArgs),
    /// Compare a rebuilt projection with the live one (exit 3 on a difference).
    Verify(verify::VerifyArgs),
    /// Point a keyspace alias at another keyspace; services following it move over.
    Switch(switch::SwitchArgs),
    /// Drop a keyspace that no alias names.
    DropKeyspace(switch::DropArgs),
    /// Dead letters: list, show, redrive, drop (`chat-admin dlq --help`).
    Dlq(admin::dlq::DlqArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config: AdminConfig = match chat_runtime::load_config(args.config.as_deref(), "CHAT_") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-admin: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = config.log.check().and_then(|()| config.store.check()) {
        eprintln!("chat-admin: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    chat_runtime::telemetry::init(config.log_format);
    let done = match args.command {
        Command::Topics => setup::run(setup::Step::Topics, &config)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Schemas => setup::run(setup::Step::Schemas, &config)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Migrate => setup::run(setup::Step::Migrate, &config)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Setup => setup::run(setup::Step::All, &config)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Replay(a) => replay::run(a, &config).await,
        Command::Verify(a) => verify::run(a, &config).await,
        Command::Switch(a) => switch::run(a, &config).await,
        Command::DropKeyspace(a) => switch::drop_keyspace(a, &config).await,
        Command::Dlq(a) => admin::dlq::run(a, &config.log)
            .await
            .map(|()| ExitCode::SUCCESS),
    };
    match done {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chat-admin: {e:#}");
            ExitCode::FAILURE
        }
    }
}
