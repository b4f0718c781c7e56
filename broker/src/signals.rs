//! What the broker tells the healer each tick: per managed instance, requests in flight at it, requests
//! completed per second, and requests queued for its service. The kernel's view of connections to each
//! instance's port (traffic that bypasses the broker) is merged in: in-flight and queued take the larger
//! of the two, rates add up.
//!
//! The broker's side arrives as a [`Traffic`] snapshot taken once per tick by whoever builds
//! [`BrokerTraffic`] (the broker, from its hub), so the merging is a plain function over data and this
//! module does not reach into the hub.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use vigil_healer::rules::{Signal, Signals};
use vigil_healer::supervisor::InstanceInfo;
use vigil_healer::traffic::{ConnectionTraffic, TrafficSource};

/// The broker's traffic at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Requests completed per instance since the previous snapshot.
    pub completed_by_instance: HashMap<Arc<str>, u64>,
    /// Requests waiting per service.
    pub queued_by_service: HashMap<String, usize>,
    /// Requests at each instance now.
    pub inflight_by_instance: HashMap<String, u32>,
}

/// Takes a [`Traffic`] snapshot now.
type TakeTraffic = Box<dyn Fn() -> Traffic + Send + Sync>;

pub struct BrokerTraffic {
    take: TakeTraffic,
    direct: ConnectionTraffic,
}

impl BrokerTraffic {
    /// `take` is called once per tick; what it reports as completed must not be reported again.
    pub fn new(take: impl Fn() -> Traffic + Send + Sync + 'static) -> Self {
        Self { take: Box::new(take), direct: ConnectionTraffic::default() }
    }
}

impl TrafficSource for BrokerTraffic {
    fn observe(&self, instances: &[InstanceInfo], elapsed: Duration, signals: &mut Signals) {
        self.direct.observe(instances, elapsed, signals);
        let traffic = (self.take)();
        for inst in instances {
            merge(signals, &traffic, &inst.id, &inst.serves, elapsed);
        }
    }
}

/// Merges the broker's view of `instance_id`, routed as `service`, over `elapsed` into what `signals`
/// already hold for it.
fn merge(signals: &mut Signals, traffic: &Traffic, instance_id: &str, service: &str, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(0.001);
    let current = |s: Signal| signals.get(instance_id).and_then(|v| v.get(s)).unwrap_or(0.0);
    let inflight = f64::from(traffic.inflight_by_instance.get(instance_id).copied().unwrap_or(0));
    let rate = traffic.completed_by_instance.get(instance_id).copied().unwrap_or(0) as f64 / secs;
    let queued = traffic.queued_by_service.get(service).copied().unwrap_or(0) as f64;
    let (cur_inflight, cur_rate, cur_queued) =
        (current(Signal::InflightRequests), current(Signal::RequestsPerS), current(Signal::QueuedRequests));
    signals.set(instance_id, Signal::InflightRequests, cur_inflight.max(inflight));
    signals.set(instance_id, Signal::RequestsPerS, cur_rate + rate);
    signals.set(instance_id, Signal::QueuedRequests, cur_queued.max(queued));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_view_merges_with_the_kernel_view() {
        let traffic = Traffic {
            completed_by_instance: HashMap::from([(Arc::from("svc-0"), 20)]),
            queued_by_service: HashMap::from([("svc".to_string(), 3)]),
            inflight_by_instance: HashMap::from([("svc-0".to_string(), 2)]),
        };
        let mut signals = Signals::new();
        // The kernel saw 5 connections (more than the broker's 2 in flight), 1 request/s and nothing queued.
        signals.set("svc-0", Signal::InflightRequests, 5.0);
        signals.set("svc-0", Signal::RequestsPerS, 1.0);
        merge(&mut signals, &traffic, "svc-0", "svc", Duration::from_secs(2));
        merge(&mut signals, &traffic, "svc-1", "svc", Duration::from_secs(2));

        let got = |id: &str, s: Signal| signals.get(id).and_then(|v| v.get(s));
        assert_eq!(got("svc-0", Signal::InflightRequests), Some(5.0));
        assert_eq!(got("svc-0", Signal::RequestsPerS), Some(11.0));
        assert_eq!(got("svc-0", Signal::QueuedRequests), Some(3.0));
        // An instance the broker has not routed to yet still sees its service's queue.
        assert_eq!(got("svc-1", Signal::InflightRequests), Some(0.0));
        assert_eq!(got("svc-1", Signal::RequestsPerS), Some(0.0));
        assert_eq!(got("svc-1", Signal::QueuedRequests), Some(3.0));
    }
}
