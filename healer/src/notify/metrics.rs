//! The notification metrics: `vigil_notifications_sent_total{receiver}`,
//! `vigil_notifications_failed_total{receiver}` (failed attempts, each retry counted),
//! `vigil_notifications_dropped_total{receiver,reason}` (`expired`: older than `give_up_after`;
//! `rejected`: a permanent refusal such as 400; `undecodable`: an outbox entry that no longer reads),
//! `vigil_notifications_queued{receiver}` (the outbox's count, so it is right after a restart) and
//! `vigil_notification_delivery_seconds{receiver}` (created → delivered).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn delivery_histogram() -> Histogram {
    // 5 ms … ~6 h: a receiver that is up answers in milliseconds; one that was down gets its backlog hours late.
    Histogram::new(exponential_buckets(0.005, 4.0, 12))
}

/// Counters and gauges fed by the delivery tasks; cheap to clone (shared).
#[derive(Clone)]
pub struct NotifyMetrics {
    sent: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    dropped: Family<Labels, Counter>,
    queued: Family<Labels, Gauge>,
    delivery: Family<Labels, Histogram, fn() -> Histogram>,
    queued_now: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Default for NotifyMetrics {
    fn default() -> Self {
        Self {
            sent: Family::default(),
            failed: Family::default(),
            dropped: Family::default(),
            queued: Family::default(),
            delivery: Family::new_with_constructor(delivery_histogram as fn() -> Histogram),
            queued_now: Arc::default(),
        }
    }
}

fn receiver(name: &str) -> Labels {
    vec![("receiver", name.to_string())]
}

impl NotifyMetrics {
    /// Makes every receiver's series exist from the start (a 0 is information; a missing series is not).
    pub(crate) fn declare(&self, name: &str) {
        let _ = self.sent.get_or_create(&receiver(name));
        let _ = self.failed.get_or_create(&receiver(name));
        self.set_queued(name, 0);
    }

    pub(crate) fn sent(&self, name: &str, delivery_seconds: f64) {
        self.sent.get_or_create(&receiver(name)).inc();
        self.delivery.get_or_create(&receiver(name)).observe(delivery_seconds);
    }

    pub(crate) fn failed(&self, name: &str) {
        self.failed.get_or_create(&receiver(name)).inc();
    }

    pub(crate) fn dropped(&self, name: &str, reason: &'static str) {
        self.dropped
            .get_or_create(&vec![("receiver", name.to_string()), ("reason", reason.to_string())])
            .inc();
    }

    pub(crate) fn set_queued(&self, name: &str, n: u64) {
        self.queued.get_or_create(&receiver(name)).set(i64::try_from(n).unwrap_or(i64::MAX));
        self.queued_now.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), n);
    }

    /// The queue lengths as of the delivery tasks' latest look at the outbox.
    pub fn queued(&self) -> BTreeMap<String, u64> {
        self.queued_now.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Registers the notification metrics with `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_notifications_sent",
            "Notifications delivered (answered 2xx), by receiver",
            self.sent.clone(),
        );
        registry.register(
            "vigil_notifications_failed",
            "Failed delivery attempts (each retry counts), by receiver",
            self.failed.clone(),
        );
        registry.register(
            "vigil_notifications_dropped",
            "Notifications given up on, by receiver and reason (expired, rejected, undecodable)",
            self.dropped.clone(),
        );
        registry.register(
            "vigil_notifications_queued",
            "Notifications in the outbox waiting for delivery, by receiver",
            self.queued.clone(),
        );
        registry.register(
            "vigil_notification_delivery_seconds",
            "Time from a notification's creation to its delivery, by receiver",
            self.delivery.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let m = NotifyMetrics::default();
        m.declare("ops");
        m.sent("ops", 0.01);
        m.failed("ops");
        m.dropped("ops", "expired");
        m.set_queued("ops", 3);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "vigil_notifications_sent_total{receiver=\"ops\"} 1",
            "vigil_notifications_failed_total{receiver=\"ops\"} 1",
            "vigil_notifications_dropped_total{receiver=\"ops\",reason=\"expired\"} 1",
            "vigil_notifications_queued{receiver=\"ops\"} 3",
            "vigil_notification_delivery_seconds_count{receiver=\"ops\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert_eq!(m.queued()["ops"], 3);
    }
}
