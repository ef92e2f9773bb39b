//! `chat-presence`: session registry -> presence facts, device list and the
//! expiry of sessions whose gateway died. Thin: the logic lives in
//! `chat_projectors::presence`.

use chat_projectors::alias;
use chat_projectors::presence::{self, PresenceConfig};
use chat_projectors::replay::PRESENCE_PROJECTOR;
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
    let (mut store, watch) = alias::connect(&config.store).await?;
    let Some(watch) = watch else {
        store.require_migrated().await?;
        return presence::run(config, store, shutdown).await;
    };
    // Following a keyspace alias: on a switch the service stops its loops
    // and starts again on the new keyspace (the aggregator's group is kept:
    // it rebuilds its partitions' state from the log as after any restart;
    // the table projection uses one group per keyspace, seeded from the
    // keyspace's `presence` progress written by `chat-admin replay`).
    loop {
        store.require_migrated().await?;
        let mut cfg = config.clone();
        cfg.table_group_id = format!("{}.{}", config.table_group_id, store.keyspace());
        let progress = store.progress(PRESENCE_PROJECTOR).await?;
        let topic = chat_log::Topics::new(&cfg.log).presence;
        if let Err(e) =
            chat_log::consumer::seed_group_offsets(&cfg.log, &cfg.table_group_id, &topic, &progress)
                .await
        {
            tracing::warn!(error = %e, "could not seed the table group's offsets");
        }
        let inner = Shutdown::new();
        let mover = {
            let (inner, outer, watch, from) = (
                inner.clone(),
                shutdown.clone(),
                watch.clone(),
                store.keyspace().to_string(),
            );
            tokio::spawn(async move {
                let outer = outer.token();
                let to = tokio::select! {
                    to = watch.changed(&from, &outer) => to,
                    _ = inner.wait() => None,
                };
                inner.trigger();
                to
            })
        };
        let ran = presence::run(cfg, store.clone(), inner.clone()).await;
        inner.trigger();
        let to = mover.await.ok().flatten();
        ran?;
        match to {
            Some(ks) if !shutdown.is_triggered() => {
                tracing::info!(from = %store.keyspace(), to = %ks, "keyspace alias switched: presence moves over");
                store = store.with_keyspace(&ks);
            }
            _ => return Ok(()),
        }
    }
}
