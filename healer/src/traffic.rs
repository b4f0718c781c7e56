//! Per-instance traffic signals for the rules, from whoever sees the traffic: the broker when it runs,
//! otherwise [`ConnectionTraffic`], which reads the kernel's TCP table.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::rules::{InstanceState, Signal, Signals};
use crate::supervisor::InstanceInfo;
use crate::tcp::established_now;

/// Per-instance traffic, until the broker reports it.
pub trait TrafficSource: Send + Sync {
    /// Adds what it knows about `instances` to `signals`.
    fn observe(&self, instances: &[InstanceInfo], elapsed: Duration, signals: &mut Signals);
}

/// Traffic from `/proc/net/tcp{,6}`: established connections to an instance's port. On an active instance
/// they are in-flight requests and new ones give the request rate; on a hibernated one the kernel has
/// accepted them on the instance's behalf, so they are requests waiting for it: wake on demand.
#[derive(Default)]
pub struct ConnectionTraffic {
    seen: Mutex<HashMap<u16, HashSet<String>>>,
}

impl TrafficSource for ConnectionTraffic {
    fn observe(&self, instances: &[InstanceInfo], elapsed: Duration, signals: &mut Signals) {
        let conns = established_now();
        let Ok(mut seen) = self.seen.lock() else { return };
        let secs = elapsed.as_secs_f64().max(0.001);
        for inst in instances {
            let now: HashSet<String> =
                conns.iter().filter(|(p, _)| *p == inst.port).map(|(_, r)| r.clone()).collect();
            let before = seen.get(&inst.port);
            let new = now.iter().filter(|r| before.is_none_or(|b| !b.contains(*r))).count();
            let count = now.len() as f64;
            if inst.state == InstanceState::Hibernated {
                signals.set(&inst.id, Signal::QueuedRequests, count);
                signals.set(&inst.id, Signal::InflightRequests, 0.0);
            } else {
                signals.set(&inst.id, Signal::QueuedRequests, 0.0);
                signals.set(&inst.id, Signal::InflightRequests, count);
            }
            signals.set(&inst.id, Signal::RequestsPerS, new as f64 / secs);
            seen.insert(inst.port, now);
        }
    }
}
