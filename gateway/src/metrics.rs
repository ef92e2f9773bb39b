//! The gateway's metrics, registered once at start-up under the
//! `chat_gateway_` prefix and served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric of the gateway. Cheap to share (`Arc`); each field is
/// internally synchronised.
#[derive(Debug)]
pub struct GatewayMetrics {
    pub connections: Gauge,
    pub upgrades_rejected: Family<ReasonLabel, Counter>,
    pub frames_in: Family<TypeLabel, Counter>,
    pub frames_out: Family<TypeLabel, Counter>,
    pub commands: Family<TypeLabel, Counter>,
    pub errors: Family<CodeLabel, Counter>,
    pub closes: Family<CloseLabel, Counter>,
    pub ack_latency: Histogram,
    pub sync_duration: Histogram,
    /// Time reads waited for the history projector (only reads that had to).
    pub read_barrier_wait: Histogram,
    pub sync_events: Counter,
    /// Syncs answered as a full resync (`since` older than the markers).
    pub full_resyncs: Counter,
    pub live_duplicates_dropped: Counter,
    pub gap_fills: Counter,
    pub deliveries: Family<TypeLabel, Counter>,
    pub connection_panics: Counter,
    /// `presence` frames sent to watchers (batched changes).
    pub presence_frames: Counter,
    /// `delivered` frames answered by another frame's append (coalesced).
    pub delivered_coalesced: Counter,
    /// Reads refused because the connection had `max_concurrent_reads`
    /// running.
    pub reads_refused: Counter,
}

impl GatewayMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Gauge::default(),
            upgrades_rejected: Family::default(),
            frames_in: Family::default(),
            frames_out: Family::default(),
            commands: Family::default(),
            errors: Family::default(),
            closes: Family::default(),
            ack_latency: latency_histogram(),
            sync_duration: latency_histogram(),
            read_barrier_wait: latency_histogram(),
            sync_events: Counter::default(),
            full_resyncs: Counter::default(),
            live_duplicates_dropped: Counter::default(),
            presence_frames: Counter::default(),
            gap_fills: Counter::default(),
            deliveries: Family::default(),
            connection_panics: Counter::default(),
            delivered_coalesced: Counter::default(),
            reads_refused: Counter::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "upgrades_rejected",
            "WebSocket upgrades refused before the 101, by reason",
            m.upgrades_rejected.clone(),
        );
        registry.register(
            "frames_in",
            "Client frames received, by type",
            m.frames_in.clone(),
        );
        registry.register(
            "frames_out",
            "Server frames sent, by type",
            m.frames_out.clone(),
        );
        registry.register(
            "commands",
            "Commands produced to chat.commands, by type",
            m.commands.clone(),
        );
        registry.register("errors", "Error frames sent, by code", m.errors.clone());
        registry.register(
            "closes",
            "Connections closed by the gateway, by close code",
            m.closes.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "From a command frame to its ack or rejection",
            m.ack_latency.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "From a sync frame to its synced frame",
            m.sync_duration.clone(),
        );
        registry.register(
            "read_barrier_wait_seconds",
            "How long reads (history, chats, sync, membership checks) waited for the history projector to pass what the connection was sent",
            m.read_barrier_wait.clone(),
        );
        registry.register("sync_events", "Events sent by sync", m.sync_events.clone());
        registry.register(
            "full_resyncs",
            "Syncs whose since was older than the sync markers' retention",
            m.full_resyncs.clone(),
        );
        registry.register(
            "presence_frames",
            "Batched presence frames sent to watching connections",
            m.presence_frames.clone(),
        );
        registry.register(
            "live_duplicates_dropped",
            "Live events not sent because sync or history already had them",
            m.live_duplicates_dropped.clone(),
        );
        registry.register(
            "gap_fills",
            "Live events that needed earlier events read from history first",
            m.gap_fills.clone(),
        );
        registry.register(
            "deliveries",
            "Records read from this gateway's deliveries partition, by kind",
            m.deliveries.clone(),
        );
        registry.register(
            "connection_panics",
            "Connection tasks that panicked (the connection was closed with 1011)",
            m.connection_panics.clone(),
        );
        registry.register(
            "delivered_coalesced",
            "delivered frames not appended themselves: a later frame of the same chat and window carried a higher up_to_seq",
            m.delivered_coalesced.clone(),
        );
        registry.register(
            "reads_refused",
            "Reads answered rate_limited because the connection had limits.max_concurrent_reads running",
            m.reads_refused.clone(),
        );
        registry.register(
            "mailbox_queued_events",
            "Live events queued for sending, summed over the process's connections (each holds at most limits.outbound_queue)",
            crate::fanout::queued_events().clone(),
        );
        registry.register(
            "mailbox_queued_results",
            "Command results queued for sending, summed over the process's connections",
            crate::fanout::queued_results().clone(),
        );
        m
    }

    pub fn error(&self, code: crate::protocol::ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    pub fn frame_out(&self, kind: &'static str) {
        self.frames_out
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    pub fn frame_in(&self, kind: &'static str) {
        self.frames_in
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.upgrades_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}
