//! The `tracing` subscriber: human-readable for a terminal, JSON lines for
//! log shippers. The filter comes from `RUST_LOG` (default `info`).

use serde::Deserialize;
use tracing_subscriber::{fmt, EnvFilter};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Multi-field human-readable lines.
    #[default]
    Pretty,
    /// One JSON object a line, with the span fields (chat, seq, trace id).
    Json,
}

/// Installs the global subscriber once; later calls are ignored (tests call it often).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,scylla=warn,rdkafka=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
