//! The `main` of every long-running service: load its config, install the
//! tracing subscriber, run until SIGTERM or Ctrl-C, and map the outcome to
//! an exit code (0 stopped, 1 failed, 2 bad configuration; PROTOCOL.md).

use serde::{de::DeserializeOwned, Serialize};

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::telemetry::{self, LogFormat};
use crate::{load_config, Shutdown};

/// What `service_main` needs of a service's config struct.
pub trait ServiceConfig: DeserializeOwned + Serialize + Default {
    /// How log lines are written.
    fn log_format(&self) -> LogFormat;
    /// Checks beyond what deserialisation can express (exit code 2 when it fails).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Loads `C` from `file` and `CHAT_*` overrides, then runs `run(config,
/// shutdown)`. `name` prefixes the messages printed on failure.
pub async fn service_main<C, F, Fut>(name: &str, file: Option<&Path>, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config: C = match load_config(file, "CHAT_") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("{name}: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    telemetry::init(config.log_format());
    let shutdown = Shutdown::on_signals();
    match run(config, shutdown.clone()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Stop whatever the service left running (its admin endpoint).
            shutdown.trigger();
            tracing::error!("{e:#}");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
