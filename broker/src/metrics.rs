//! The broker's Prometheus metrics (DESIGN.md §4): `vigil_broker_requests_total{service,version,outcome}`,
//! `vigil_broker_request_duration_seconds{service}`, `vigil_broker_inflight{service}`,
//! `vigil_broker_queued{service}`, plus the wake-on-demand waits, connections, instances and breaker
//! states and `vigil_broker_config_reloads_total{outcome}`. Appended to the collector's `/metrics`.
//!
//! The hub records into [`BrokerMetrics`] as requests move; the instance and breaker states are read at
//! scrape time from a [`BalancerSnapshot`] the registry is given a way to take. So this module builds on
//! the request outcomes and the balancer's views only, and the hub can own its metrics.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::balance::{BreakerState, BreakerView, InstanceView};
use crate::outcome::RequestOutcome;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~26 s: a broker hop is tens of microseconds, a request held through a wake seconds.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

fn wait_histogram() -> Histogram {
    // 1 ms … ~65 s: how long requests waited for an instance to wake or start.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

#[derive(Clone)]
pub struct BrokerMetrics {
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    inflight: Family<Labels, Gauge>,
    queued: Family<Labels, Gauge>,
    queue_waits: Family<Labels, Histogram, fn() -> Histogram>,
    pub connections: Family<Labels, Gauge<i64, AtomicI64>>,
    reloads: Family<Labels, Counter>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            inflight: Family::default(),
            queued: Family::default(),
            queue_waits: Family::new_with_constructor(wait_histogram as fn() -> Histogram),
            connections: Family::default(),
            reloads: Family::default(),
        }
    }
}

fn service(s: &str) -> Labels {
    vec![("service", s.to_string())]
}

impl BrokerMetrics {
    /// One request ended; `latency` is known once it reached an instance.
    pub fn request(&self, svc: &str, version: &str, outcome: RequestOutcome, latency: Option<Duration>) {
        self.requests
            .get_or_create(&vec![
                ("service", svc.to_string()),
                ("version", version.to_string()),
                ("outcome", outcome.as_str().to_string()),
            ])
            .inc();
        if let Some(l) = latency {
            self.durations.get_or_create(&service(svc)).observe(l.as_secs_f64());
        }
    }

    pub fn inflight_add(&self, svc: &str, delta: i64) {
        self.inflight.get_or_create(&service(svc)).inc_by(delta);
    }

    pub fn set_queued(&self, svc: &str, n: usize) {
        self.queued.get_or_create(&service(svc)).set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn queue_wait(&self, svc: &str, waited: Duration) {
        self.queue_waits.get_or_create(&service(svc)).observe(waited.as_secs_f64());
    }

    /// The config file changed and its splits were `applied` or `rejected` (mistakes; the old ones stay).
    pub fn config_reload(&self, outcome: &'static str) {
        self.reloads.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
    }

    pub fn connection(&self, role: &'static str, delta: i64) {
        self.connections.get_or_create(&vec![("role", role.to_string())]).inc_by(delta);
    }
}

/// The balancer's instances and breakers at one moment.
pub struct BalancerSnapshot {
    pub instances: Vec<InstanceView>,
    pub breakers: Vec<BreakerView>,
}

/// Takes a [`BalancerSnapshot`] now.
type TakeSnapshot = Box<dyn Fn() -> BalancerSnapshot + Send + Sync>;

/// Instances and breakers, read from the balancer at scrape time.
struct BalancerState(TakeSnapshot);

impl std::fmt::Debug for BalancerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BalancerState")
    }
}

impl Collector for BalancerState {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let BalancerSnapshot { instances, breakers } = (self.0)();
        {
            let mut m = enc.encode_descriptor(
                "vigil_broker_instance_ready",
                "Instances the broker routes to, 1 when ready, 0 while hibernated, waking or ejected",
                None,
                MetricType::Gauge,
            )?;
            for i in &instances {
                let labels =
                    [("service", &*i.service), ("version", &*i.version), ("instance_id", &*i.instance_id)];
                m.encode_family(&labels)?.encode_gauge(&i64::from(i.ready && !i.ejected))?;
            }
        }
        let mut m = enc.encode_descriptor(
            "vigil_broker_breaker_state",
            "Circuit breaker state per service version (1 for the current state)",
            None,
            MetricType::Gauge,
        )?;
        for b in &breakers {
            for (state, name) in [
                (BreakerState::Closed, "closed"),
                (BreakerState::Open, "open"),
                (BreakerState::HalfOpen, "half_open"),
            ] {
                let labels = [("service", &*b.service), ("version", &*b.version), ("state", name)];
                m.encode_family(&labels)?.encode_gauge(&i64::from(b.state == state))?;
            }
        }
        Ok(())
    }
}

/// A registry with every broker metric: those recorded in `m`, and the instance and breaker states of
/// `balancer`'s snapshot at each scrape.
pub fn registry(
    m: BrokerMetrics,
    balancer: impl Fn() -> BalancerSnapshot + Send + Sync + 'static,
) -> Registry {
    let mut r = Registry::default();
    r.register("vigil_broker_requests", "Requests by service, version and outcome", m.requests);
    r.register(
        "vigil_broker_request_duration_seconds",
        "Time from routing a request to an instance until its end",
        m.durations,
    );
    r.register("vigil_broker_inflight", "Requests at instances now", m.inflight);
    r.register("vigil_broker_queued", "Requests waiting for an instance to wake or start", m.queued);
    r.register(
        "vigil_broker_queue_wait_seconds",
        "How long queued requests waited for an instance (wake-on-demand)",
        m.queue_waits,
    );
    r.register("vigil_broker_connections", "Open RSocket connections by role", m.connections);
    r.register(
        "vigil_broker_config_reloads",
        "Changes of the config file seen, by whether their splits were applied or rejected",
        m.reloads,
    );
    r.register_collector(Box::new(BalancerState(Box::new(balancer))));
    r
}
