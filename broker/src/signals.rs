//! What the broker tells the healer each tick: per managed instance, requests in flight at it, requests
//! completed per second, and requests queued for its service. The kernel's view of connections to each
//! instance's port (traffic that bypasses the broker) is merged in: in-flight and queued take the larger
//! of the two, rates add up.

use std::sync::Arc;
use std::time::Duration;

use vigil_healer::rules::{Signal, Signals};
use vigil_healer::supervisor::InstanceInfo;
use vigil_healer::traffic::{ConnectionTraffic, TrafficSource};

use crate::hub::Hub;

pub struct BrokerTraffic {
    hub: Arc<Hub>,
    direct: ConnectionTraffic,
}

impl BrokerTraffic {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, direct: ConnectionTraffic::default() }
    }
}

impl TrafficSource for BrokerTraffic {
    fn observe(&self, instances: &[InstanceInfo], elapsed: Duration, signals: &mut Signals) {
        self.direct.observe(instances, elapsed, signals);
        let completed = self.hub.take_completed();
        let queued = self.hub.queued();
        let inflight: std::collections::HashMap<String, u32> = self.hub.with_balancer(|b| {
            b.instances().into_iter().map(|v| (v.instance_id.to_string(), v.inflight)).collect()
        });
        let secs = elapsed.as_secs_f64().max(0.001);
        for inst in instances {
            let current = |s: Signal| signals.get(&inst.id).and_then(|v| v.get(s)).unwrap_or(0.0);
            let n = f64::from(inflight.get(&inst.id).copied().unwrap_or(0));
            let rate = completed.get(inst.id.as_str()).copied().unwrap_or(0) as f64 / secs;
            let q = queued.get(&inst.serves).copied().unwrap_or(0) as f64;
            let (cur_inflight, cur_rate, cur_queued) = (
                current(Signal::InflightRequests),
                current(Signal::RequestsPerS),
                current(Signal::QueuedRequests),
            );
            signals.set(&inst.id, Signal::InflightRequests, cur_inflight.max(n));
            signals.set(&inst.id, Signal::RequestsPerS, cur_rate + rate);
            signals.set(&inst.id, Signal::QueuedRequests, cur_queued.max(q));
        }
    }
}
