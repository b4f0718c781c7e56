//! The broker's shared state: the balancer over every instance, the wake-on-demand queue, and the healer
//! seam. Every request, from an RSocket connection or the HTTP trigger, is admitted here: it gets an
//! instance at once ([`Admission::Ready`]), or waits in a bounded per-service queue while the healer wakes
//! or starts an instance ([`Admission::Queued`]), or is refused with a reason that maps to REJECTED / 503.
//!
//! The hub holds what requests are sent to only as an [`Upstream`]: sending is the relay's and the
//! trigger's business, so they build on the hub and the hub knows neither of them.
//!
//! Lock order: `queue` before `balancer`; neither is held across an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::balance::{Balancer, NoTarget, Picked, RouteRequest, Split, SplitError};
use crate::config::QueueConfig;
use crate::load::Load;
use crate::metrics::BrokerMetrics;
use crate::outcome::RequestOutcome;
use crate::rsocket::metadata::{Route, TraceParent};
use crate::trace::{RequestTrace, Tracing};
use crate::upstream::Upstream;
#[cfg(test)]
use vigil_core::values::HumanDuration;

/// A managed HTTP instance as the healer reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedEndpoint {
    pub service: String,
    pub version: String,
    pub instance_id: String,
    pub address: SocketAddr,
    /// Serving now (active); hibernated, waking, starting or failed instances are known but not ready.
    pub ready: bool,
    /// The healer's name for its state, for traces.
    pub state: &'static str,
}

/// The healer, as the broker sees it.
pub trait Activator: Send + Sync + 'static {
    /// Requests wait for `service` and none of its instances is ready: wake or start one. Must not block.
    fn demand(&self, service: &str);
    /// The managed HTTP instances now.
    fn endpoints(&self) -> Vec<ManagedEndpoint>;
    /// Changes whenever an instance changes state.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Why a request was not admitted. Every refusal is safe to retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NoTarget(NoTarget),
    #[error("too many requests wait for `{service}` while it wakes; retry later")]
    QueueFull { service: String },
    #[error("no instance of `{service}` became ready within {waited:?}; retry later")]
    Timeout { service: String, waited: Duration },
}

impl Refusal {
    pub fn outcome(&self) -> RequestOutcome {
        match self {
            Refusal::NoTarget(NoTarget::CircuitOpen { .. }) => RequestOutcome::CircuitOpen,
            Refusal::NoTarget(_) => RequestOutcome::NoRoute,
            Refusal::QueueFull { .. } => RequestOutcome::Rejected,
            Refusal::Timeout { .. } => RequestOutcome::Timeout,
        }
    }

    /// Whether the request should be retried later (503 / REJECTED) rather than fixed (404 / INVALID).
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            Refusal::NoTarget(
                NoTarget::UnknownService(_) | NoTarget::UnknownAlias { .. } | NoTarget::UnknownVersion { .. }
            )
        )
    }
}

struct Waiter<U> {
    id: u64,
    route: Route,
    bytes: usize,
    tx: oneshot::Sender<Picked<U>>,
}

struct ServiceQueue<U> {
    waiters: VecDeque<Waiter<U>>,
    bytes: usize,
}

// By hand: a derive would ask for `U: Default`, which upstreams need not be.
impl<U> Default for ServiceQueue<U> {
    fn default() -> Self {
        Self { waiters: VecDeque::new(), bytes: 0 }
    }
}

struct Queue<U> {
    services: HashMap<String, ServiceQueue<U>>,
    total: usize,
    next_id: u64,
    /// When demand was last signalled per service: while requests keep waiting, once a second is plenty.
    demanded: HashMap<String, Instant>,
}

impl<U> Default for Queue<U> {
    fn default() -> Self {
        Self { services: HashMap::new(), total: 0, next_id: 0, demanded: HashMap::new() }
    }
}

/// Requests completed per instance since the healer last looked (for `requests_per_s`).
#[derive(Default)]
struct Completed {
    by_instance: HashMap<Arc<str>, u64>,
}

/// The shared state, over the upstreams `U` that picked requests are sent to.
pub struct Hub<U: Upstream> {
    started: Instant,
    queue_config: QueueConfig,
    balancer: Mutex<Balancer<U>>,
    queue: Mutex<Queue<U>>,
    completed: Mutex<Completed>,
    /// Requests in flight and held per service, as time averages for the autoscaler.
    pub load: Arc<Load>,
    /// Ids of the managed instances the balancer holds (the rest registered over RSocket or are upstreams).
    managed: Mutex<HashMap<String, ManagedEndpoint>>,
    /// The healer, once attached.
    activator: Arc<OnceLock<Arc<dyn Activator>>>,
    /// Concurrent requests a managed HTTP instance takes.
    managed_capacity: u32,
    /// Full-link traces, when OTLP export is configured.
    tracing: Option<Arc<Tracing>>,
    pub metrics: BrokerMetrics,
}

/// The requests at each instance, for the workflows' `drain` steps.
impl<U: Upstream> vigil_healer::workflow::host::InflightSource for Hub<U> {
    fn inflight(&self, instance_id: &str) -> Option<u32> {
        lock(&self.balancer).inflight(instance_id)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind every lock here; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<U: Upstream> Hub<U> {
    pub fn new(
        balancer: Balancer<U>,
        queue_config: QueueConfig,
        managed_capacity: u32,
        activator: Arc<OnceLock<Arc<dyn Activator>>>,
        tracing: Option<Arc<Tracing>>,
    ) -> Arc<Hub<U>> {
        Arc::new(Hub {
            started: Instant::now(),
            queue_config,
            balancer: Mutex::new(balancer),
            queue: Mutex::new(Queue::default()),
            completed: Mutex::new(Completed::default()),
            load: Arc::new(Load::default()),
            managed: Mutex::new(HashMap::new()),
            activator,
            managed_capacity,
            tracing,
            metrics: BrokerMetrics::default(),
        })
    }

    /// Begins the trace of a request arriving at the broker, if tracing is on.
    pub fn begin_trace(
        &self,
        parent: Option<TraceParent>,
        service: &str,
        kind: &'static str,
    ) -> Option<RequestTrace> {
        self.tracing.as_ref().map(|t| t.begin(parent, service, kind))
    }

    pub fn tracing(&self) -> Option<&Arc<Tracing>> {
        self.tracing.as_ref()
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Admits one request of `bytes` payload bytes for `route`.
    pub fn admit(self: &Arc<Self>, route: &Route, bytes: usize) -> Result<Admission<U>, Refusal> {
        self.load.arrived(&route.service);
        let mut queue = lock(&self.queue);
        let picked = self.pick(route);
        let reason = match picked {
            Ok(p) => return Ok(Admission::Ready(self.lease(p))),
            Err(e) => e,
        };
        let wake = match &reason {
            NoTarget::NotReady { .. } | NoTarget::NoInstances { .. } => true,
            NoTarget::AtCapacity { .. } => false,
            _ => {
                drop(queue);
                self.refused(route, RequestOutcome::NoRoute);
                let refusal = Refusal::NoTarget(reason);
                return Err(refusal);
            }
        };
        let service = route.service.clone();
        let limits = &self.queue_config;
        let sq = queue.services.entry(service.clone()).or_default();
        if sq.waiters.len() >= limits.max_per_service
            || sq.bytes.saturating_add(bytes) > limits.max_bytes_per_service
            || queue.total >= limits.max_total
        {
            drop(queue);
            self.refused(route, RequestOutcome::Rejected);
            return Err(Refusal::QueueFull { service });
        }
        let (tx, rx) = oneshot::channel();
        queue.next_id += 1;
        let id = queue.next_id;
        let sq = queue.services.entry(service.clone()).or_default();
        sq.waiters.push_back(Waiter { id, route: route.clone(), bytes, tx });
        sq.bytes += bytes;
        let queued = sq.waiters.len();
        queue.total += 1;
        self.load.held(&service, true);
        // The first request to wait asks at once; a flood behind it asks once a second at most.
        let demand = wake
            && (queued == 1
                || queue.demanded.get(&service).is_none_or(|t| t.elapsed() >= Duration::from_secs(1)));
        if demand {
            queue.demanded.insert(service.clone(), Instant::now());
        }
        drop(queue);
        self.metrics.set_queued(&service, queued);
        if demand && let Some(a) = self.activator.get() {
            a.demand(&service);
        }
        Ok(Admission::Queued(QueueTicket {
            hub: self.clone(),
            service,
            id,
            rx: Some(rx),
            since: Instant::now(),
            timeout: self.queue_config.timeout.0,
        }))
    }

    fn refused(&self, route: &Route, outcome: RequestOutcome) {
        self.metrics.request(&route.service, "none", outcome, None);
    }

    fn pick(&self, route: &Route) -> Result<Picked<U>, NoTarget> {
        let req = RouteRequest {
            service: &route.service,
            alias: route.alias.as_deref(),
            version: route.version.as_deref(),
            key: route.key.as_deref(),
        };
        let now = self.now();
        let mut rng = || rand::random::<u64>();
        lock(&self.balancer).pick(&req, now, &mut rng)
    }

    fn lease(self: &Arc<Self>, picked: Picked<U>) -> Lease<U> {
        self.metrics.inflight_add(&picked.service, 1);
        self.load.inflight(&picked.service, &picked.instance_id, true);
        Lease { hub: self.clone(), picked, started: Instant::now(), done: false }
    }

    /// Hands queued requests of `service` to instances that can take them now, in arrival order.
    pub fn drain(self: &Arc<Self>, service: &str) {
        let mut queue = lock(&self.queue);
        let Some(sq) = queue.services.get_mut(service) else { return };
        let mut served = 0usize;
        let mut i = 0;
        while i < sq.waiters.len() {
            let constrained = sq.waiters[i].route.version.is_some() || sq.waiters[i].route.alias.is_some();
            match self.pick(&sq.waiters[i].route) {
                Ok(p) => {
                    let Some(w) = sq.waiters.remove(i) else { break };
                    sq.bytes -= w.bytes;
                    served += 1;
                    self.load.held(service, false);
                    self.metrics.inflight_add(&p.service, 1);
                    self.load.inflight(&p.service, &p.instance_id, true);
                    if let Err(p) = w.tx.send(p) {
                        // The ticket is gone (its drop takes the queue lock first, so this is rare).
                        self.release(&p, RequestOutcome::Cancelled, Duration::ZERO);
                    }
                }
                // A request pinned to a version or alias may wait while plain ones can go.
                Err(_) if constrained => i += 1,
                Err(_) => break,
            }
        }
        let left = sq.waiters.len();
        queue.total -= served;
        if left == 0 {
            queue.services.remove(service);
        }
        drop(queue);
        if served > 0 {
            self.metrics.set_queued(service, left);
        }
    }

    /// Drains every service that has requests waiting.
    pub fn drain_all(self: &Arc<Self>) {
        let services: Vec<String> = lock(&self.queue).services.keys().cloned().collect();
        for s in services {
            self.drain(&s);
        }
    }

    fn release(&self, picked: &Picked<U>, outcome: RequestOutcome, latency: Duration) {
        lock(&self.balancer).finish(&picked.instance_id, outcome.health(), latency, self.now());
        self.metrics.inflight_add(&picked.service, -1);
        self.load.inflight(&picked.service, &picked.instance_id, false);
    }

    fn finish(self: &Arc<Self>, picked: &Picked<U>, outcome: RequestOutcome, latency: Duration) {
        self.release(picked, outcome, latency);
        self.metrics.request(&picked.service, &picked.version, outcome, Some(latency));
        *lock(&self.completed).by_instance.entry(picked.instance_id.clone()).or_default() += 1;
        let waiting = lock(&self.queue).services.contains_key(&*picked.service);
        if waiting {
            self.drain(&picked.service);
        }
    }

    /// An RSocket instance connected (or a managed/upstream one appeared): route to it, serve its queue.
    pub fn add_instance(
        self: &Arc<Self>,
        service: &str,
        version: &str,
        instance_id: &str,
        capacity: u32,
        ready: bool,
        target: U,
    ) {
        lock(&self.balancer).add(service, version, instance_id, capacity, ready, target);
        tracing::info!(service, version, instance_id, capacity, ready, "instance registered");
        if ready {
            self.drain(service);
        }
    }

    pub fn remove_instance(&self, instance_id: &str) {
        if lock(&self.balancer).remove(instance_id) {
            tracing::info!(instance_id, "instance deregistered");
        }
    }

    /// Deregisters an RSocket instance when its connection `conn_id` ends, unless the instance has since
    /// registered again on another connection.
    pub fn remove_instance_if(&self, instance_id: &str, conn_id: u64) {
        let mut balancer = lock(&self.balancer);
        let current = balancer.handle(instance_id).and_then(U::connection_id);
        if current == Some(conn_id) && balancer.remove(instance_id) {
            tracing::info!(instance_id, "instance deregistered: its connection ended");
        }
    }

    pub fn known_service(&self, service: &str) {
        lock(&self.balancer).known_service(service);
    }

    pub fn set_splits(&self, splits: Vec<Split>) -> Result<(), SplitError> {
        lock(&self.balancer).set_splits(splits)
    }

    /// Brings the managed HTTP instances in line with the healer's view; serves queues that can now go.
    pub fn sync_managed(self: &Arc<Self>, endpoints: Vec<ManagedEndpoint>) {
        let mut managed = lock(&self.managed);
        let mut changed = HashSet::new();
        {
            let mut balancer = lock(&self.balancer);
            let ids: HashSet<&str> = endpoints.iter().map(|e| e.instance_id.as_str()).collect();
            managed.retain(|id, e| {
                let keep = ids.contains(id.as_str());
                if !keep {
                    balancer.remove(id);
                    changed.insert(e.service.clone());
                }
                keep
            });
            for e in endpoints {
                match managed.get(&e.instance_id) {
                    Some(old) if old == &e => continue,
                    Some(old) if old.address == e.address && old.version == e.version => {
                        balancer.set_ready(&e.instance_id, e.ready);
                    }
                    _ => balancer.add(
                        &e.service,
                        &e.version,
                        &e.instance_id,
                        self.managed_capacity,
                        e.ready,
                        U::http(e.address),
                    ),
                }
                changed.insert(e.service.clone());
                managed.insert(e.instance_id.clone(), e);
            }
        }
        drop(managed);
        for s in changed {
            self.drain(&s);
            // Requests still wait (say, they came while the instance was going into hibernation, when
            // there was nothing to wake yet): ask again now that the state moved on.
            let waiting = lock(&self.queue).services.contains_key(&s);
            if waiting && let Some(a) = self.activator.get() {
                a.demand(&s);
            }
        }
    }

    /// The state of a managed instance (for traces), or `active` for RSocket and upstream instances.
    pub fn instance_state(&self, instance_id: &str) -> &'static str {
        lock(&self.managed).get(instance_id).map_or("active", |e| e.state)
    }

    /// Requests waiting per service.
    pub fn queued(&self) -> HashMap<String, usize> {
        lock(&self.queue).services.iter().map(|(s, q)| (s.clone(), q.waiters.len())).collect()
    }

    pub fn with_balancer<R>(&self, f: impl FnOnce(&Balancer<U>) -> R) -> R {
        f(&lock(&self.balancer))
    }

    /// Requests completed per instance since the last call.
    pub fn take_completed(&self) -> HashMap<Arc<str>, u64> {
        std::mem::take(&mut lock(&self.completed).by_instance)
    }

    fn dequeue(&self, service: &str, id: u64) -> bool {
        let mut queue = lock(&self.queue);
        let Some(sq) = queue.services.get_mut(service) else { return false };
        let Some(pos) = sq.waiters.iter().position(|w| w.id == id) else { return false };
        let Some(w) = sq.waiters.remove(pos) else { return false };
        sq.bytes -= w.bytes;
        let left = sq.waiters.len();
        if left == 0 {
            queue.services.remove(service);
        }
        queue.total -= 1;
        self.load.held(service, false);
        drop(queue);
        self.metrics.set_queued(service, left);
        true
    }
}

/// What admission gave a request.
pub enum Admission<U: Upstream> {
    Ready(Lease<U>),
    Queued(QueueTicket<U>),
}

/// A request's claim on an instance: counted in flight until finished (or dropped, which counts as
/// cancelled).
pub struct Lease<U: Upstream> {
    hub: Arc<Hub<U>>,
    picked: Picked<U>,
    started: Instant,
    done: bool,
}

impl<U: Upstream> Lease<U> {
    pub fn target(&self) -> &U {
        &self.picked.handle
    }
    pub fn service(&self) -> &Arc<str> {
        &self.picked.service
    }
    pub fn version(&self) -> &Arc<str> {
        &self.picked.version
    }
    pub fn instance_id(&self) -> &Arc<str> {
        &self.picked.instance_id
    }
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
    pub fn hub(&self) -> &Arc<Hub<U>> {
        &self.hub
    }
    pub fn finish(mut self, outcome: RequestOutcome) {
        self.done = true;
        self.hub.finish(&self.picked, outcome, self.started.elapsed());
    }
}

impl<U: Upstream> Drop for Lease<U> {
    fn drop(&mut self) {
        if !self.done {
            self.hub.finish(&self.picked, RequestOutcome::Cancelled, self.started.elapsed());
        }
    }
}

/// A place in a service's queue. Dropping it (the request was cancelled) leaves the queue.
pub struct QueueTicket<U: Upstream> {
    hub: Arc<Hub<U>>,
    service: String,
    id: u64,
    rx: Option<oneshot::Receiver<Picked<U>>>,
    since: Instant,
    timeout: Duration,
}

impl<U: Upstream> QueueTicket<U> {
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Waits for an instance, at most the configured queue timeout from when the request was queued.
    pub async fn wait(mut self) -> Result<Lease<U>, Refusal> {
        let Some(mut rx) = self.rx.take() else {
            return Err(Refusal::Timeout { service: self.service.clone(), waited: Duration::ZERO });
        };
        let remaining = self.timeout.saturating_sub(self.since.elapsed());
        let picked = match tokio::time::timeout(remaining, &mut rx).await {
            Ok(Ok(p)) => Some(p),
            _ => {
                // Timed out: leave the queue, unless an instance was handed over in the meantime.
                if self.hub.dequeue(&self.service, self.id) { None } else { rx.try_recv().ok() }
            }
        };
        let waited = self.since.elapsed();
        self.hub.metrics.queue_wait(&self.service, waited);
        match picked {
            Some(p) => Ok(Lease { hub: self.hub.clone(), picked: p, started: Instant::now(), done: false }),
            None => {
                self.hub.metrics.request(&self.service, "none", RequestOutcome::Timeout, None);
                Err(Refusal::Timeout { service: self.service.clone(), waited })
            }
        }
    }
}

impl<U: Upstream> Drop for QueueTicket<U> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        if !self.hub.dequeue(&self.service, self.id)
            && let Ok(p) = rx.try_recv()
        {
            self.hub.release(&p, RequestOutcome::Cancelled, Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::HealthPolicy;

    /// An upstream that is only a name: the hub never sends anything.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum FakeUpstream {
        Connection(u64),
        Http(SocketAddr),
    }

    impl Upstream for FakeUpstream {
        fn http(address: SocketAddr) -> Self {
            FakeUpstream::Http(address)
        }
        fn connection_id(&self) -> Option<u64> {
            match self {
                FakeUpstream::Connection(id) => Some(*id),
                FakeUpstream::Http(_) => None,
            }
        }
    }

    /// The healer's seam, recording demand.
    #[derive(Default)]
    struct Recorder {
        demanded: Mutex<Vec<String>>,
        endpoints: Mutex<Vec<ManagedEndpoint>>,
        changes: Mutex<Option<watch::Sender<u64>>>,
    }

    impl Activator for Recorder {
        fn demand(&self, service: &str) {
            lock(&self.demanded).push(service.to_string());
        }
        fn endpoints(&self) -> Vec<ManagedEndpoint> {
            lock(&self.endpoints).clone()
        }
        fn changes(&self) -> watch::Receiver<u64> {
            let (tx, rx) = watch::channel(0);
            *lock(&self.changes) = Some(tx);
            rx
        }
    }

    fn hub(queue: QueueConfig) -> (Arc<Hub<FakeUpstream>>, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let activator: Arc<OnceLock<Arc<dyn Activator>>> = Arc::new(OnceLock::new());
        let _ = activator.set(recorder.clone());
        let mut balancer = Balancer::new(HealthPolicy::default());
        balancer.known_service("svc");
        (Hub::new(balancer, queue, 10, activator, None), recorder)
    }

    fn route(service: &str) -> Route {
        Route { service: service.into(), ..Route::default() }
    }

    fn endpoint(ready: bool) -> ManagedEndpoint {
        ManagedEndpoint {
            service: "svc".into(),
            version: "v1".into(),
            instance_id: "svc-0".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 9)),
            ready,
            state: if ready { "active" } else { "hibernated" },
        }
    }

    fn queued(a: Result<Admission<FakeUpstream>, Refusal>) -> QueueTicket<FakeUpstream> {
        match a {
            Ok(Admission::Queued(t)) => t,
            Ok(Admission::Ready(_)) => panic!("admitted at once"),
            Err(e) => panic!("refused: {e}"),
        }
    }

    #[tokio::test]
    async fn a_request_waits_for_the_wake_and_gets_the_instance_once_it_is_ready() {
        let (hub, recorder) = hub(QueueConfig::default());
        hub.sync_managed(vec![endpoint(false)]);
        let ticket = queued(hub.admit(&route("svc"), 10));
        assert_eq!(*lock(&recorder.demanded), vec!["svc".to_string()]);
        assert_eq!(hub.queued().get("svc"), Some(&1));
        // A second request within the second adds no demand.
        let second = queued(hub.admit(&route("svc"), 10));
        assert_eq!(lock(&recorder.demanded).len(), 1);

        hub.sync_managed(vec![endpoint(true)]);
        let lease = ticket.wait().await.expect("an instance");
        assert_eq!(&**lease.instance_id(), "svc-0");
        assert!(matches!(lease.target(), FakeUpstream::Http(_)));
        let other = second.wait().await.expect("an instance");
        assert_eq!(hub.with_balancer(|b| b.inflight("svc-0")), Some(2));
        assert!(hub.queued().is_empty());
        lease.finish(RequestOutcome::Ok);
        drop(other); // counts as cancelled
        assert_eq!(hub.with_balancer(|b| b.inflight("svc-0")), Some(0));
        assert_eq!(hub.take_completed().get("svc-0").copied(), Some(2));
    }

    #[tokio::test]
    async fn limits_refuse_cleanly_and_a_dropped_ticket_leaves_the_queue() {
        let limits = QueueConfig {
            max_per_service: 2,
            max_bytes_per_service: 100,
            max_total: 3,
            ..QueueConfig::default()
        };
        let (hub, _) = hub(limits);
        hub.sync_managed(vec![endpoint(false)]);
        let a = queued(hub.admit(&route("svc"), 60));
        assert_eq!(hub.admit(&route("svc"), 60).err(), Some(Refusal::QueueFull { service: "svc".into() }));
        let b = queued(hub.admit(&route("svc"), 40));
        assert!(matches!(hub.admit(&route("svc"), 0), Err(Refusal::QueueFull { .. })));
        drop(a);
        assert_eq!(hub.queued().get("svc"), Some(&1));
        let _c = queued(hub.admit(&route("svc"), 60));
        drop(b);
        assert_eq!(hub.queued().get("svc"), Some(&1));
        assert!(matches!(
            hub.admit(&route("nowhere"), 0),
            Err(Refusal::NoTarget(NoTarget::UnknownService(_)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waits_too_long_is_refused_and_leaves_the_queue() {
        let limits = QueueConfig { timeout: HumanDuration(Duration::from_secs(5)), ..QueueConfig::default() };
        let (hub, _) = hub(limits);
        hub.sync_managed(vec![endpoint(false)]);
        let ticket = queued(hub.admit(&route("svc"), 1));
        let refusal = ticket.wait().await.err().expect("timed out");
        assert!(matches!(refusal, Refusal::Timeout { .. }), "{refusal}");
        assert!(refusal.retryable());
        assert!(hub.queued().is_empty());
        // The instance comes later: nothing is handed to the gone request.
        hub.sync_managed(vec![endpoint(true)]);
        assert_eq!(hub.with_balancer(|b| b.inflight("svc-0")), Some(0));
    }

    #[tokio::test]
    async fn the_first_request_to_wait_always_asks_even_right_after_another_wait() {
        let (hub, recorder) = hub(QueueConfig::default());
        hub.sync_managed(vec![endpoint(false)]);
        drop(queued(hub.admit(&route("svc"), 1)));
        // Within the same second, the queue empty again: a new first waiter must ask (the instance may
        // have been stopped again meanwhile).
        let _ticket = queued(hub.admit(&route("svc"), 1));
        assert_eq!(lock(&recorder.demanded).len(), 2);
    }

    #[tokio::test]
    async fn an_instance_leaves_with_the_connection_it_registered_on_not_an_older_one() {
        let (hub, _) = hub(QueueConfig::default());
        hub.add_instance("svc", "v1", "rs-1", 1, true, FakeUpstream::Connection(1));
        // It registered again on connection 2 before connection 1 was seen to end.
        hub.add_instance("svc", "v1", "rs-1", 1, true, FakeUpstream::Connection(2));
        hub.remove_instance_if("rs-1", 1);
        assert_eq!(hub.with_balancer(|b| b.handle("rs-1").cloned()), Some(FakeUpstream::Connection(2)));
        hub.remove_instance_if("rs-1", 2);
        assert_eq!(hub.with_balancer(|b| b.handle("rs-1").cloned()), None);
    }

    #[tokio::test]
    async fn requests_still_waiting_after_a_state_change_ask_again() {
        let (hub, recorder) = hub(QueueConfig::default());
        hub.sync_managed(vec![endpoint(false)]);
        let _ticket = queued(hub.admit(&route("svc"), 1));
        let mut e = endpoint(false);
        e.state = "waking";
        hub.sync_managed(vec![e]);
        assert_eq!(lock(&recorder.demanded).len(), 2, "asked again after the change");
    }
}
