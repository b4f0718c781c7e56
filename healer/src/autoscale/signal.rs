//! What the autoscaler measures: per service, requests in flight at each instance and held waiting for
//! one, as time averages over the interval since the previous look (the broker integrates them, see
//! `vigil_broker::load`), plus the kernel's count of connections that bypass the broker.

use std::collections::HashMap;
use std::time::Duration;

/// One service's traffic over an interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceLoad {
    /// How long the interval was.
    pub span: Duration,
    /// Time-averaged requests in flight per instance over the interval.
    pub inflight_by_instance: HashMap<String, f64>,
    /// Time-averaged requests held (waiting for an instance).
    pub held: f64,
    /// Requests held at the end of the interval.
    pub held_now: u32,
    /// Requests that arrived for the service in the interval (picked at once or held).
    pub arrivals: u64,
}

impl ServiceLoad {
    /// In flight at every instance plus held, averaged over the interval.
    pub fn concurrency(&self) -> f64 {
        self.inflight_by_instance.values().sum::<f64>() + self.held
    }
}

/// Whoever sees the requests (the broker).
pub trait LoadSource: Send + Sync + 'static {
    /// Closes the interval of `service` (the name requests route by) now and says what it held; the next
    /// interval begins now.
    fn take(&self, service: &str) -> ServiceLoad;
}
