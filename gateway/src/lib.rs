//! The WebSocket edge of the platform.
//!
//! What it owns: client connections (authentication at the upgrade, the JSON
//! protocol of PROTOCOL.md), producing client commands to `chat.commands`,
//! and tailing its own partition of `chat.deliveries` to write events to
//! sockets. Today it serves the admin endpoints (`/health`, `/metrics`) and
//! checks that the log is reachable at start; the WebSocket protocol lands
//! with the messaging core.
//!
//! What it does not own: ordering (the sequencer assigns per-chat seqs),
//! storage (the projectors), routing decisions (the delivery router).
#![forbid(unsafe_code)]

pub mod config;

use chat_runtime::{Health, Shutdown};
use prometheus_client::registry::Registry;
use std::sync::Arc;

pub use config::GatewayConfig;

/// Runs the gateway until `shutdown` fires.
pub async fn run(config: GatewayConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let health = Health::new();
    health.not_ready("kafka", "checking");
    health.not_ready("registry", "checking");
    chat_log::topics::check_brokers(&config.log).await?;
    health.ready("kafka");
    let registry = chat_log::SchemaRegistry::new(&config.log)?;
    registry.check_reachable().await?;
    health.ready("registry");

    let mut metrics = Registry::with_prefix("chat_gateway");
    let info = prometheus_client::metrics::info::Info::new(vec![
        ("gateway_id", config.gateway_id.clone()),
        ("version", env!("CARGO_PKG_VERSION").to_string()),
    ]);
    metrics.register("build", "Gateway identity and version", info);

    let (addr, task) =
        chat_runtime::serve_admin(config.listen, health, Arc::new(metrics), shutdown.clone())
            .await?;
    tracing::info!(gateway_id = %config.gateway_id, %addr, "gateway listening");
    task.await?;
    tracing::info!("gateway stopped");
    Ok(())
}
