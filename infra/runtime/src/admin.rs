//! The admin endpoint every long-running service serves on its own port:
//! `GET /health` (200 when every component reports ready, 503 with the
//! reasons otherwise) and `GET /metrics` (Prometheus text format).
//!
//! `/metrics` serves the service's own registry (names prefixed by the
//! service, e.g. `chat_router_`) followed by the process-wide
//! [`shared_metrics`] registry, where libraries used by several services
//! (the log crate's consumer lag and dead-letter counters) register metrics
//! under one name for every service (`chat_kafka_consumer_lag_records`).

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::Shutdown;

/// The metric registry of a process. Each crate registers its metrics in
/// its own `metrics.rs` against this at start-up.
pub type Metrics = Arc<Registry>;

/// The process-wide registry of metrics that libraries export under the
/// same name in every service (no service prefix). Served by every admin
/// endpoint after the service's own registry.
pub fn shared_metrics() -> &'static Mutex<Registry> {
    static SHARED: std::sync::OnceLock<Mutex<Registry>> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| Mutex::new(Registry::default()))
}

/// Readiness of a process's components ("kafka", "cassandra", ...).
#[derive(Clone, Debug, Default)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ready(&self, component: &'static str) {
        self.set(component, Ok(()));
    }
    pub fn not_ready(&self, component: &'static str, why: impl Into<String>) {
        self.set(component, Err(why.into()));
    }
    fn set(&self, component: &'static str, state: Result<(), String>) {
        if let Ok(mut map) = self.components.lock() {
            map.insert(component, state);
        }
    }
    /// `(all ready, JSON report)`.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let map = match self.components.lock() {
            Ok(m) => m.clone(),
            Err(_) => return (false, serde_json::json!({"status": "poisoned"})),
        };
        let ok = map.values().all(Result::is_ok);
        let components: serde_json::Map<String, serde_json::Value> = map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Ok(()) => serde_json::json!("ready"),
                    Err(e) => serde_json::json!({ "not_ready": e }),
                };
                (k.to_string(), v)
            })
            .collect();
        let status = if ok { "ready" } else { "not_ready" };
        (
            ok,
            serde_json::json!({ "status": status, "components": components }),
        )
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Metrics,
}

/// The admin routes, for services that mount them on their own listener.
pub fn admin_router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/health", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { health, metrics })
}

/// Serves the admin routes on `addr` until `shutdown` fires. Returns the bound
/// address (useful with port 0 in tests) and the server task.
pub async fn serve_admin(
    addr: SocketAddr,
    health: Health,
    metrics: Metrics,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = admin_router(health, metrics);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    tracing::info!(%bound, "admin endpoint: /health and /metrics");
    Ok((bound, task))
}

async fn health_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let (ok, body) = s.health.report();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let mut out = String::new();
    let encoded = encode_registry(&mut out, &s.metrics)
        .and_then(|()| {
            let shared = shared_metrics().lock().unwrap_or_else(|e| e.into_inner());
            encode_registry(&mut out, &shared)
        })
        .and_then(|()| encode_eof(&mut out));
    match encoded {
        Ok(()) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_ready_only_when_all_components_are() {
        let h = Health::new();
        h.ready("kafka");
        h.not_ready("cassandra", "connecting");
        let (ok, body) = h.report();
        assert!(!ok);
        assert_eq!(body["components"]["cassandra"]["not_ready"], "connecting");
        h.ready("cassandra");
        assert!(h.report().0);
    }
}
