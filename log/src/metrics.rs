//! The metrics every client of the log exports, whatever the service: they
//! live in chat-runtime's [`shared_metrics`](chat_runtime::shared_metrics)
//! registry, so `/metrics` of every service names them the same way.
//!
//! - `chat_kafka_consumer_lag_records{group,topic,partition}`: records of a
//!   partition not yet handed to the service (the partition's end, its last
//!   stable offset for read-committed readers, minus the consumer's
//!   position; before the first record, minus the committed offset). From
//!   librdkafka's statistics every [`STATS_INTERVAL_MS`], for consumer
//!   groups and for group-less tails (`group="tail"`: a gateway's
//!   deliveries and results partitions, restores while they run); a
//!   partition no longer read loses its gauge;
//! - `chat_dlq_records_total{group,topic}`: records this process sent to the
//!   dead-letter topic, by consumer group and origin topic;
//! - `chat_log_records_skipped_total{component,reason}`: records a reader
//!   could not use and, by design, does not dead-letter (a gateway's tails:
//!   what they read is re-derivable, see ARCHITECTURE.md "Dead letters").

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::statistics::Statistics;
use std::sync::OnceLock;

/// `statistics.interval.ms` of the consumers (lag reports).
pub const STATS_INTERVAL_MS: u64 = 5000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DlqLabels {
    pub group: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub component: String,
    pub reason: String,
}

/// The log crate's metrics (one set per process).
#[derive(Clone, Default)]
pub struct LogMetrics {
    pub consumer_lag: Family<LagLabels, Gauge>,
    pub dead_lettered: Family<DlqLabels, Counter>,
    pub skipped: Family<SkipLabels, Counter>,
}

/// The process's log metrics, registered in the shared registry on first use.
pub fn log_metrics() -> &'static LogMetrics {
    static METRICS: OnceLock<LogMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = LogMetrics::default();
        let mut reg = chat_runtime::shared_metrics()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reg.register(
            "chat_kafka_consumer_lag_records",
            "Records of a partition not yet handed to the service (end minus position), by consumer group",
            m.consumer_lag.clone(),
        );
        reg.register(
            "chat_dlq_records",
            "Records sent to the dead-letter topic by this process, by consumer group and origin topic",
            m.dead_lettered.clone(),
        );
        reg.register(
            "chat_log_records_skipped",
            "Records a reader could not use and does not dead-letter by design (re-derivable data), by component and reason",
            m.skipped.clone(),
        );
        m
    })
}

/// Counts a record skipped without dead-lettering (see the module doc).
pub fn count_skipped(component: &str, reason: &str) {
    log_metrics()
        .skipped
        .get_or_create(&SkipLabels {
            component: component.to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

/// Counts a record sent to the dead-letter topic.
pub fn count_dead_lettered(group: &str, topic: &str) {
    log_metrics()
        .dead_lettered
        .get_or_create(&DlqLabels {
            group: group.to_string(),
            topic: topic.to_string(),
        })
        .inc();
}

/// The lag gauges one consumer set: updated from each statistics report,
/// those of partitions it no longer reads removed (after a rebalance), all
/// removed when the consumer is dropped.
#[derive(Default)]
pub(crate) struct LagTracker {
    group: String,
    set: std::sync::Mutex<std::collections::HashSet<LagLabels>>,
}

impl LagTracker {
    pub(crate) fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            set: Default::default(),
        }
    }

    pub(crate) fn report(&self, stats: &Statistics) {
        let now = record_lag(&self.group, stats);
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        for gone in set.difference(&now) {
            log_metrics().consumer_lag.remove(gone);
        }
        *set = now;
    }
}

impl Drop for LagTracker {
    fn drop(&mut self) {
        let set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        for labels in set.iter() {
            log_metrics().consumer_lag.remove(labels);
        }
    }
}

/// Sets the lag gauges of `group` from one librdkafka statistics report;
/// returns the label sets it set.
fn record_lag(group: &str, stats: &Statistics) -> std::collections::HashSet<LagLabels> {
    let m = log_metrics();
    let mut set = std::collections::HashSet::new();
    for (topic, t) in &stats.topics {
        for (&partition, p) in &t.partitions {
            // -1 is librdkafka's internal "unassigned" partition.
            if partition < 0 || !p.desired {
                continue;
            }
            let end = if p.ls_offset >= 0 {
                p.ls_offset
            } else {
                p.hi_offset
            };
            let lag = if p.app_offset >= 0 && end >= 0 {
                (end - p.app_offset).max(0)
            } else if p.consumer_lag >= 0 {
                p.consumer_lag
            } else {
                continue;
            };
            let labels = LagLabels {
                group: group.to_string(),
                topic: topic.clone(),
                partition,
            };
            m.consumer_lag.get_or_create(&labels).set(lag);
            set.insert(labels);
        }
    }
    set
}

/// A consumer context that exports the consumer's lag from librdkafka's
/// statistics under `group`.
pub(crate) struct LagContext {
    pub(crate) lag: LagTracker,
}

impl LagContext {
    pub(crate) fn new(group: impl Into<String>) -> Self {
        Self {
            lag: LagTracker::new(group),
        }
    }
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        self.lag.report(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::{Partition, Topic};

    fn stats(topic: &str, partitions: &[(i32, i64, i64, i64)]) -> Statistics {
        let mut t = Topic::default();
        for &(p, ls, app, committed_lag) in partitions {
            t.partitions.insert(
                p,
                Partition {
                    partition: p,
                    desired: true,
                    ls_offset: ls,
                    hi_offset: ls,
                    app_offset: app,
                    consumer_lag: committed_lag,
                    ..Partition::default()
                },
            );
        }
        // librdkafka's internal "unassigned" partition is never reported.
        t.partitions.insert(-1, Partition::default());
        let mut s = Statistics::default();
        s.topics.insert(topic.to_string(), t);
        s
    }

    /// Whether the gauge exists (removes it: only for absence checks).
    fn present(group: &str, topic: &str, partition: i32) -> bool {
        log_metrics().consumer_lag.remove(&LagLabels {
            group: group.into(),
            topic: topic.into(),
            partition,
        })
    }

    #[test]
    fn lag_is_end_minus_position_and_gauges_of_lost_partitions_go() {
        let tracker = LagTracker::new("g-lag-test");
        // Partition 0: position 90 of 100; partition 1: nothing read yet,
        // committed lag 7; partition 2: nothing known.
        tracker.report(&stats(
            "t",
            &[(0, 100, 90, -1), (1, 50, -1, 7), (2, -1, -1, -1)],
        ));
        let m = log_metrics();
        let get = |p| {
            m.consumer_lag
                .get_or_create(&LagLabels {
                    group: "g-lag-test".into(),
                    topic: "t".into(),
                    partition: p,
                })
                .get()
        };
        assert_eq!(get(0), 10);
        assert_eq!(get(1), 7);
        assert_eq!(
            tracker.set.lock().unwrap().len(),
            2,
            "partition 2 and -1 are not reported"
        );
        // A rebalance took partition 1 away: its gauge is removed.
        tracker.report(&stats("t", &[(0, 100, 100, -1)]));
        assert_eq!(get(0), 0);
        assert!(!present("g-lag-test", "t", 1));
        drop(tracker);
        assert!(!present("g-lag-test", "t", 0), "dropped with its consumer");
    }
}
