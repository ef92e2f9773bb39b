//! Service plumbing shared by every long-running process of the platform.
//!
//! What this crate owns:
//! - [`config`]: loading a service's one config struct from a TOML file plus
//!   `CHAT_*` environment overrides, with unknown keys refused;
//! - [`telemetry`]: the `tracing` subscriber (pretty or JSON lines);
//! - [`admin`]: the admin HTTP endpoint every service serves: `/health` and
//!   Prometheus `/metrics`;
//! - [`service`]: the shared `main` of every service (config, tracing, exit codes);
//! - [`shutdown`]: one cancellation signal fired by SIGTERM or Ctrl-C that
//!   every long-running loop watches.
//!
//! What it does not: it knows nothing of Kafka, Cassandra or the protocol.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use admin::{serve_admin, shared_metrics, Health, Metrics};
pub use config::{load_config, Secret};
pub use service::{service_main, ServiceConfig};
pub use shutdown::Shutdown;

/// Milliseconds since the Unix epoch (the unit of every timestamp on the log).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
