//! Load balancing and routing for the broker, as pure logic: which instance of which version of a service
//! gets the next request. The broker keeps, per service, versions and, per version, instances; each
//! instance advertises a capacity and carries a readiness flag (a hibernated instance is registered but not
//! ready), an in-flight count, a latency EWMA and health state. Version choice follows weighted splits
//! (optionally sticky by a request key), failing over from a version that cannot serve to the other versions
//! of the split; instance choice is power-of-two-choices on load. Consecutive transport failures eject an
//! instance for an exponentially growing time, and a rolling failure ratio opens a per-version circuit
//! breaker. Nothing here reads a clock or an entropy source: `now` (time since an arbitrary start) and a
//! random-number closure are passed in, so every decision is reproducible in tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Name of the split that applies to requests naming neither an alias nor a version.
pub const DEFAULT_SPLIT: &str = "default";

/// Smoothing factor of the latency EWMA: the newest sample weighs 20 %.
const EWMA_ALPHA: f64 = 0.2;
/// The ejection time doubles per earlier ejection, up to this multiple of the base.
const MAX_EJECTION_MULTIPLIER: u32 = 8;
/// Width of a circuit-breaker bucket; the window is a ring of these.
const BUCKET: Duration = Duration::from_secs(1);

// The configuration shapes of splits and health policy are declared with the rest of the config.
pub use vigil_core::config::{HealthPolicy, Split, SplitError};

/// What a request asks for. `version` wins over `alias` when both are given, since it is more specific.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteRequest<'a> {
    pub service: &'a str,
    pub alias: Option<&'a str>,
    pub version: Option<&'a str>,
    pub key: Option<&'a str>,
}

/// The instance chosen for a request. Its in-flight count has been incremented; the caller must report the
/// request's end with [`Balancer::finish`].
#[derive(Clone, Debug)]
pub struct Picked<H> {
    pub instance_id: Arc<str>,
    pub service: Arc<str>,
    pub version: Arc<str>,
    pub handle: H,
}

/// Why no instance was picked, most actionable first when several reasons apply: `NotReady` (wake an
/// instance), `AtCapacity` (queue), `CircuitOpen`, `NoInstances` (start one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoTarget {
    /// The service never had instances, was never declared and no split mentions it.
    #[error("no service `{0}`")]
    UnknownService(String),
    #[error("service `{service}` has no split `{alias}`")]
    UnknownAlias { service: String, alias: String },
    /// The version never had instances and no split of the service mentions it.
    #[error("service `{service}` has no version `{version}`")]
    UnknownVersion { service: String, version: String },
    /// Instances exist but none is ready: the caller queues the request and wakes one.
    #[error("every instance of `{service}` is waking or hibernated")]
    NotReady { service: String },
    /// The service is known but has no instance now: the caller queues the request and starts one.
    #[error("service `{service}` has no instances")]
    NoInstances { service: String },
    /// The only versions with ready instances have an open breaker (or a half-open one whose probe is out).
    #[error("circuit of `{service}` version `{version}` is open")]
    CircuitOpen { service: String, version: String },
    /// Every ready instance is at its advertised capacity: the caller queues the request.
    #[error("every ready instance of `{service}` is at capacity")]
    AtCapacity { service: String },
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The instance answered with an error: it is alive, so this counts as a success for health.
    ApplicationError,
    /// Transport failure, reset, timeout, instance gone: counts against the instance and its version.
    Failure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// One instance as seen by signals, metrics and the API.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceView {
    pub instance_id: Arc<str>,
    pub service: Arc<str>,
    pub version: Arc<str>,
    pub capacity: u32,
    pub inflight: u32,
    pub ready: bool,
    pub ejected: bool,
    /// 0 until the first answer arrives.
    pub latency_ewma_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerView {
    pub service: Arc<str>,
    pub version: Arc<str>,
    pub state: BreakerState,
}

struct Instance<H> {
    service: Arc<str>,
    version: Arc<str>,
    capacity: u32,
    ready: bool,
    handle: H,
    inflight: u32,
    ewma_seconds: Option<f64>,
    consecutive_failures: u32,
    /// Ejections since the last success; drives the exponential ejection time.
    ejections: u32,
    ejected_until: Option<Duration>,
}

impl<H> Instance<H> {
    fn ejected(&self, now: Duration) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    fn below_capacity(&self) -> bool {
        self.inflight < self.capacity
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Index of the second this bucket counts (`now / BUCKET`).
    second: u64,
    requests: u32,
    failures: u32,
}

#[derive(Clone, Debug)]
enum Phase {
    Closed,
    Open {
        until: Duration,
    },
    /// `probe` is the instance carrying the single trial request and when it was sent.
    HalfOpen {
        probe: Option<(Arc<str>, Duration)>,
    },
}

#[derive(Clone, Debug)]
struct Breaker {
    phase: Phase,
    buckets: Vec<Bucket>,
}

impl Breaker {
    fn new(policy: &HealthPolicy) -> Self {
        let n = policy.breaker_window_ms.div_ceil(BUCKET.as_millis() as u64).max(1);
        Breaker { phase: Phase::Closed, buckets: vec![Bucket::default(); n as usize] }
    }

    fn reset_window(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = Bucket::default());
    }

    /// Moves an expired open breaker to half-open.
    fn advance(&mut self, now: Duration) {
        if let Phase::Open { until } = self.phase
            && now >= until
        {
            self.phase = Phase::HalfOpen { probe: None };
        }
    }

    /// The state as of `now`, without mutating (an open breaker whose time is up is already half-open).
    fn state(&self, now: Duration) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go to this version now. A probe that never reported back (its outcome lost)
    /// must not keep the breaker shut forever, so after `open_for` another probe is allowed.
    fn admits(&self, now: Duration, open_for: Duration) -> bool {
        match &self.phase {
            Phase::Closed => true,
            Phase::Open { until } => now >= *until,
            Phase::HalfOpen { probe: None } => true,
            Phase::HalfOpen { probe: Some((_, since)) } => now >= since.saturating_add(open_for),
        }
    }

    fn record(&mut self, now: Duration, failed: bool, policy: &HealthPolicy) {
        let second = now.as_secs() / BUCKET.as_secs();
        let n = self.buckets.len() as u64;
        let slot = &mut self.buckets[(second % n) as usize];
        if slot.second != second || slot.requests == 0 {
            *slot = Bucket { second, requests: 0, failures: 0 };
        }
        slot.requests = slot.requests.saturating_add(1);
        slot.failures = slot.failures.saturating_add(u32::from(failed));
        let (requests, failures) = self
            .buckets
            .iter()
            .filter(|b| b.requests > 0 && b.second <= second && second - b.second < n)
            .fold((0u64, 0u64), |(r, f), b| (r + u64::from(b.requests), f + u64::from(b.failures)));
        // `failures > 0` keeps a misconfigured ratio of 0 from opening on a clean record.
        if requests >= u64::from(policy.breaker_min_requests.max(1))
            && failures > 0
            && failures as f64 >= policy.breaker_failure_ratio.get() * requests as f64
        {
            self.phase = Phase::Open { until: now.saturating_add(policy.breaker_open_for()) };
            self.reset_window();
        }
    }
}

/// Why a group of versions could not serve; folded over every version tried.
#[derive(Default)]
struct Blocked {
    waking: bool,
    at_capacity: bool,
    circuit_open: Option<Arc<str>>,
}

impl Blocked {
    fn into_error(self, service: &str) -> NoTarget {
        let service = service.to_owned();
        if self.waking {
            NoTarget::NotReady { service }
        } else if self.at_capacity {
            NoTarget::AtCapacity { service }
        } else if let Some(version) = self.circuit_open {
            NoTarget::CircuitOpen { service, version: version.to_string() }
        } else {
            NoTarget::NoInstances { service }
        }
    }
}

/// Maps a 64-bit value onto `[0, total)` proportionally, so that a change of the total moves only about the
/// changed share of sticky keys (a modulo would reshuffle them all).
fn scale(x: u64, total: u64) -> u64 {
    ((u128::from(x) * u128::from(total)) >> 64) as u64
}

/// FNV-1a, 64-bit: stable across processes and releases, unlike std's randomly seeded hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A sticky key's stable position. FNV-1a alone mixes poorly into its high bits when keys differ only in
/// their last bytes (`user-1`, `user-2`, …), and [`scale`] reads the high bits, so MurmurHash3's 64-bit
/// finalizer spreads it first.
fn key_point(key: &str) -> u64 {
    let mut h = fnv1a(key.as_bytes());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Index in `0..n` from a 64-bit random value.
fn index(x: u64, n: usize) -> usize {
    scale(x, n as u64) as usize
}

/// version → instance ids.
type VersionIds = BTreeMap<Arc<str>, BTreeSet<Arc<str>>>;

/// The balancer's state. `H` is the per-instance handle handed back with a pick.
pub struct Balancer<H: Clone> {
    policy: HealthPolicy,
    instances: BTreeMap<Arc<str>, Instance<H>>,
    /// service → version → instance ids, kept in step with `instances`. Ordered maps make iteration, and
    /// so every choice for a given random sequence, deterministic.
    topology: BTreeMap<Arc<str>, VersionIds>,
    /// Declared services and every version that ever had an instance: they answer `NoInstances` rather
    /// than `Unknown*` once empty.
    known: BTreeMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// service → split name → split.
    splits: BTreeMap<String, BTreeMap<String, Split>>,
    /// service → version → breaker; exists while the version has instances.
    breakers: BTreeMap<Arc<str>, BTreeMap<Arc<str>, Breaker>>,
    /// The latest `now` seen; the views, which take no time, judge ejection and breaker expiry by it.
    clock: Duration,
}

impl<H: Clone> Balancer<H> {
    pub fn new(policy: HealthPolicy) -> Self {
        Balancer {
            policy,
            instances: BTreeMap::new(),
            topology: BTreeMap::new(),
            known: BTreeMap::new(),
            splits: BTreeMap::new(),
            breakers: BTreeMap::new(),
            clock: Duration::ZERO,
        }
    }

    /// Declares a configured service, so that it answers `NoInstances` (start one) while it has none.
    pub fn known_service(&mut self, service: &str) {
        if !self.known.contains_key(service) {
            self.known.insert(service.into(), BTreeSet::new());
        }
    }

    /// Registers an instance, replacing one with the same id. A replacement is a new connection, so its
    /// health (failures, ejection, latency) starts afresh, but it keeps the in-flight count: those requests
    /// will still be reported through [`Balancer::finish`] and must find something to decrement. A capacity
    /// of 0 is taken as 1.
    pub fn add(
        &mut self,
        service: &str,
        version: &str,
        instance_id: &str,
        capacity: u32,
        ready: bool,
        handle: H,
    ) {
        let inflight = match self.remove_entry(instance_id, Some((service, version))) {
            Some(old) => old.inflight,
            None => 0,
        };
        let service = self.intern_service(service);
        let version = self.intern_version(&service, version);
        let id: Arc<str> = instance_id.into();
        self.topology
            .entry(service.clone())
            .or_default()
            .entry(version.clone())
            .or_default()
            .insert(id.clone());
        let policy = &self.policy;
        self.breakers
            .entry(service.clone())
            .or_default()
            .entry(version.clone())
            .or_insert_with(|| Breaker::new(policy));
        self.instances.insert(
            id,
            Instance {
                service,
                version,
                capacity: capacity.max(1),
                ready,
                handle,
                inflight,
                ewma_seconds: None,
                consecutive_failures: 0,
                ejections: 0,
                ejected_until: None,
            },
        );
    }

    /// Unregisters an instance; later `finish` calls for it are ignored. Returns whether it existed.
    pub fn remove(&mut self, instance_id: &str) -> bool {
        self.remove_entry(instance_id, None).is_some()
    }

    pub fn set_ready(&mut self, instance_id: &str, ready: bool) -> bool {
        match self.instances.get_mut(instance_id) {
            Some(instance) => {
                instance.ready = ready;
                true
            }
            None => false,
        }
    }

    /// Replaces every split at once. Only version choice of later picks changes: in-flight counts and
    /// health state belong to instances and are untouched.
    pub fn set_splits(&mut self, splits: Vec<Split>) -> Result<(), SplitError> {
        if let Some((_, e)) = vigil_core::config::split_mistakes(&splits).into_iter().next() {
            return Err(e);
        }
        let mut by_service: BTreeMap<String, BTreeMap<String, Split>> = BTreeMap::new();
        for split in splits {
            by_service.entry(split.service.clone()).or_default().insert(split.name.clone(), split);
        }
        self.splits = by_service;
        Ok(())
    }

    /// Chooses an instance for a request and counts it in flight.
    pub fn pick(
        &mut self,
        req: &RouteRequest,
        now: Duration,
        rng: &mut impl FnMut() -> u64,
    ) -> Result<Picked<H>, NoTarget> {
        self.clock = self.clock.max(now);
        let service = req.service;
        let splits = self.splits.get(service);
        if !self.known.contains_key(service) && splits.is_none() {
            return Err(NoTarget::UnknownService(service.to_owned()));
        }
        let chosen = if let Some(version) = req.version {
            let in_split = splits.is_some_and(|s| s.values().any(|s| s.weights.contains_key(version)));
            let seen = self.known.get(service).is_some_and(|v| v.contains(version));
            if !in_split && !seen {
                return Err(NoTarget::UnknownVersion {
                    service: service.to_owned(),
                    version: version.to_owned(),
                });
            }
            self.choose_in(service, &[version], now, rng)
        } else {
            let split = match req.alias {
                Some(alias) => Some(splits.and_then(|s| s.get(alias)).ok_or_else(|| {
                    NoTarget::UnknownAlias { service: service.to_owned(), alias: alias.to_owned() }
                })?),
                None => splits.and_then(|s| s.get(DEFAULT_SPLIT)),
            };
            match split {
                Some(split) => self.choose_by_split(split, req.key, now, rng),
                None => {
                    // No split: every version of the service shares the traffic.
                    let versions: Vec<&str> = self
                        .topology
                        .get(service)
                        .map(|versions| versions.keys().map(|v| &**v).collect())
                        .unwrap_or_default();
                    self.choose_in(service, &versions, now, rng)
                }
            }
        };
        let id = chosen.map_err(|blocked| blocked.into_error(service))?;
        let (picked, version) = {
            let Some(instance) = self.instances.get_mut(&id) else {
                // choose_in only returns ids it found in `instances`.
                return Err(NoTarget::NoInstances { service: service.to_owned() });
            };
            instance.inflight = instance.inflight.saturating_add(1);
            let picked = Picked {
                instance_id: id.clone(),
                service: instance.service.clone(),
                version: instance.version.clone(),
                handle: instance.handle.clone(),
            };
            (picked, instance.version.clone())
        };
        if let Some(breaker) = self.breakers.get_mut(service).and_then(|b| b.get_mut(&*version)) {
            breaker.advance(now);
            if let Phase::HalfOpen { .. } = breaker.phase {
                breaker.phase = Phase::HalfOpen { probe: Some((id, now)) };
            }
        }
        Ok(picked)
    }

    /// Reports the end of a picked request. Unknown ids (the instance was removed meanwhile) are ignored.
    /// A half-open breaker is decided by the first outcome from its probe's instance: without a per-request
    /// ticket, an older request finishing on that instance first cannot be told apart from the probe.
    pub fn finish(&mut self, instance_id: &str, outcome: Outcome, latency: Duration, now: Duration) {
        self.clock = self.clock.max(now);
        let Some(instance) = self.instances.get_mut(instance_id) else {
            return;
        };
        instance.inflight = instance.inflight.saturating_sub(1);
        let failed = outcome == Outcome::Failure;
        let (service, version) = (instance.service.clone(), instance.version.clone());
        if failed {
            instance.consecutive_failures = instance.consecutive_failures.saturating_add(1);
            let threshold = self.policy.eject_after_failures;
            if threshold > 0 && instance.consecutive_failures >= threshold && !instance.ejected(now) {
                self.try_eject(instance_id, &service, &version, now);
            }
        } else {
            let sample = latency.as_secs_f64();
            instance.ewma_seconds = Some(match instance.ewma_seconds {
                Some(old) => old + EWMA_ALPHA * (sample - old),
                None => sample,
            });
            instance.consecutive_failures = 0;
            instance.ejections = 0;
        }
        let policy = &self.policy;
        let Some(breaker) = self.breakers.get_mut(&service).and_then(|b| b.get_mut(&version)) else {
            return;
        };
        breaker.advance(now);
        match &breaker.phase {
            Phase::Closed => breaker.record(now, failed, policy),
            // Outcomes of requests sent before the breaker opened say nothing new.
            Phase::Open { .. } => {}
            Phase::HalfOpen { probe } => {
                let is_probe = probe.as_ref().is_some_and(|(id, _)| &**id == instance_id);
                if is_probe {
                    if failed {
                        breaker.phase = Phase::Open { until: now.saturating_add(policy.breaker_open_for()) };
                    } else {
                        breaker.phase = Phase::Closed;
                        breaker.reset_window();
                    }
                }
            }
        }
    }

    /// The handle registered for an instance, e.g. to check which connection it came on.
    pub fn handle(&self, instance_id: &str) -> Option<&H> {
        self.instances.get(instance_id).map(|i| &i.handle)
    }

    pub fn inflight(&self, instance_id: &str) -> Option<u32> {
        self.instances.get(instance_id).map(|i| i.inflight)
    }

    pub fn service_inflight(&self, service: &str) -> u32 {
        self.ids_of(service).filter_map(|id| self.instances.get(id)).map(|i| i.inflight).sum()
    }

    /// Every instance, ordered by id; ejection judged at the latest `now` seen.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.instances
            .iter()
            .map(|(id, i)| InstanceView {
                instance_id: id.clone(),
                service: i.service.clone(),
                version: i.version.clone(),
                capacity: i.capacity,
                inflight: i.inflight,
                ready: i.ready,
                ejected: i.ejected(self.clock),
                latency_ewma_seconds: i.ewma_seconds.unwrap_or(0.0),
            })
            .collect()
    }

    /// Every (service, version) with instances and its breaker state at the latest `now` seen.
    pub fn breakers(&self) -> Vec<BreakerView> {
        self.breakers
            .iter()
            .flat_map(|(service, versions)| {
                versions.iter().map(|(version, b)| BreakerView {
                    service: service.clone(),
                    version: version.clone(),
                    state: b.state(self.clock),
                })
            })
            .collect()
    }

    /// Whether any instance of the service is ready, regardless of ejection, breaker or load: it answers
    /// "does the service need waking", not "would a pick succeed".
    pub fn has_ready(&self, service: &str) -> bool {
        self.ids_of(service).filter_map(|id| self.instances.get(id)).any(|i| i.ready)
    }

    fn ids_of<'s>(&'s self, service: &str) -> impl Iterator<Item = &'s Arc<str>> + 's {
        self.topology.get(service).into_iter().flat_map(|versions| versions.values().flatten())
    }

    fn intern_service(&mut self, service: &str) -> Arc<str> {
        match self.known.get_key_value(service) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = service.into();
                self.known.insert(k.clone(), BTreeSet::new());
                k
            }
        }
    }

    fn intern_version(&mut self, service: &Arc<str>, version: &str) -> Arc<str> {
        let versions = self.known.entry(service.clone()).or_default();
        match versions.get(version) {
            Some(v) => v.clone(),
            None => {
                let v: Arc<str> = version.into();
                versions.insert(v.clone());
                v
            }
        }
    }

    /// Takes an instance out of every index. `replaced_by` names the service and version of a replacement
    /// with the same id, whose version keeps its breaker even if this was its last instance: a reconnect
    /// must not wipe the record of a failing version.
    fn remove_entry(&mut self, instance_id: &str, replaced_by: Option<(&str, &str)>) -> Option<Instance<H>> {
        let instance = self.instances.remove(instance_id)?;
        let (service, version) = (&instance.service, &instance.version);
        let mut version_gone = false;
        if let Some(versions) = self.topology.get_mut(service) {
            if let Some(ids) = versions.get_mut(version) {
                ids.remove(instance_id);
                version_gone = ids.is_empty();
            }
            if version_gone {
                versions.remove(version);
            }
            if versions.is_empty() {
                self.topology.remove(service);
            }
        }
        if let Some(of_service) = self.breakers.get_mut(service) {
            if version_gone && replaced_by != Some((service, version)) {
                // A version redeployed from nothing starts with a clean record.
                of_service.remove(version);
            } else if let Some(breaker) = of_service.get_mut(version)
                && let Phase::HalfOpen { probe: Some((probe, _)) } = &breaker.phase
                && &**probe == instance_id
            {
                // The probe's outcome will never arrive; let another one through.
                breaker.phase = Phase::HalfOpen { probe: None };
            }
            if of_service.is_empty() {
                self.breakers.remove(service);
            }
        }
        Some(instance)
    }

    /// Ejects the instance unless that would push the version's ejected share past the policy's bound
    /// (never all of them). If refused, the failure count stands and the next failure tries again.
    fn try_eject(&mut self, instance_id: &str, service: &str, version: &str, now: Duration) {
        let Some(ids) = self.topology.get(service).and_then(|v| v.get(version)) else {
            return;
        };
        let total = ids.len();
        let ejected = ids.iter().filter_map(|id| self.instances.get(id)).filter(|i| i.ejected(now)).count();
        let fraction = self.policy.max_ejected_fraction.get();
        let allowed = ((fraction * total as f64).floor() as usize).min(total.saturating_sub(1));
        if ejected >= allowed {
            return;
        }
        let base = self.policy.eject_base();
        let Some(instance) = self.instances.get_mut(instance_id) else {
            return;
        };
        let multiplier =
            1u32.checked_shl(instance.ejections).unwrap_or(u32::MAX).min(MAX_EJECTION_MULTIPLIER);
        instance.ejected_until = Some(now.saturating_add(base.saturating_mul(multiplier)));
        instance.ejections = instance.ejections.saturating_add(1);
        instance.consecutive_failures = 0;
    }

    /// Picks a version of the split by weight, then fails over to the others by weight while the chosen one
    /// cannot serve. Versions of weight 0 are drained and never tried.
    fn choose_by_split(
        &self,
        split: &Split,
        key: Option<&str>,
        now: Duration,
        rng: &mut impl FnMut() -> u64,
    ) -> Result<Arc<str>, Blocked> {
        let mut remaining: Vec<(&str, u64)> =
            split.weights.iter().filter(|(_, w)| **w > 0).map(|(v, w)| (v.as_str(), u64::from(*w))).collect();
        let mut blocked = Blocked::default();
        // Sticky: the key's hash is the same point for every round of failover, so failover is stable too.
        let hash = key.filter(|_| split.sticky).map(key_point);
        while !remaining.is_empty() {
            let total: u64 = remaining.iter().map(|(_, w)| w).sum();
            let mut point = scale(hash.unwrap_or_else(&mut *rng), total);
            let mut at = remaining.len() - 1;
            for (i, (_, w)) in remaining.iter().enumerate() {
                if point < *w {
                    at = i;
                    break;
                }
                point -= w;
            }
            let (version, _) = remaining.remove(at);
            match self.choose_in(&split.service, &[version], now, rng) {
                Ok(id) => return Ok(id),
                Err(b) => {
                    blocked.waking |= b.waking;
                    blocked.at_capacity |= b.at_capacity;
                    blocked.circuit_open = blocked.circuit_open.or(b.circuit_open);
                }
            }
        }
        Err(blocked)
    }

    /// Power of two choices among the serving instances of the given versions: two distinct candidates at
    /// random, the less loaded (in-flight over capacity) wins, then the faster. Ejected instances are left
    /// out unless nothing else could serve, so that ejection never takes a version down.
    fn choose_in(
        &self,
        service: &str,
        versions: &[&str],
        now: Duration,
        rng: &mut impl FnMut() -> u64,
    ) -> Result<Arc<str>, Blocked> {
        let mut blocked = Blocked::default();
        let mut candidates: Vec<(&Arc<str>, &Instance<H>)> = Vec::new();
        let open_for = self.policy.breaker_open_for();
        let Some(of_service) = self.topology.get(service) else {
            return Err(blocked);
        };
        for &version in versions {
            let Some(ids) = of_service.get(version) else {
                continue;
            };
            let admitted = self
                .breakers
                .get(service)
                .and_then(|b| b.get(version))
                .is_none_or(|b| b.admits(now, open_for));
            for id in ids {
                let Some(instance) = self.instances.get(id) else {
                    continue;
                };
                if !instance.ready {
                    blocked.waking = true;
                } else if !admitted {
                    if blocked.circuit_open.is_none() {
                        blocked.circuit_open = Some(instance.version.clone());
                    }
                } else if !instance.below_capacity() {
                    blocked.at_capacity = true;
                } else {
                    candidates.push((id, instance));
                }
            }
        }
        if candidates.iter().any(|(_, i)| !i.ejected(now)) {
            candidates.retain(|(_, i)| !i.ejected(now));
        }
        let chosen = match candidates.len() {
            0 => return Err(blocked),
            1 => candidates[0].0,
            n => {
                let a = index(rng(), n);
                let mut b = index(rng(), n - 1);
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (candidates[a].1, candidates[b].1);
                // Compare inflight/capacity exactly by cross-multiplying.
                let load_a = u64::from(ia.inflight) * u64::from(ib.capacity);
                let load_b = u64::from(ib.inflight) * u64::from(ia.capacity);
                let lat_a = ia.ewma_seconds.unwrap_or(0.0);
                let lat_b = ib.ewma_seconds.unwrap_or(0.0);
                if load_b < load_a || (load_b == load_a && lat_b < lat_a) {
                    candidates[b].0
                } else {
                    candidates[a].0
                }
            }
        };
        Ok(chosen.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    /// SplitMix64: a deterministic, well-mixed sequence for reproducible picks.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    fn req(service: &str) -> RouteRequest<'_> {
        RouteRequest { service, ..RouteRequest::default() }
    }

    fn split(name: &str, service: &str, weights: &[(&str, u32)], sticky: bool) -> Split {
        Split {
            name: name.into(),
            service: service.into(),
            weights: weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
            sticky,
        }
    }

    fn policy() -> HealthPolicy {
        HealthPolicy {
            eject_after_failures: 3,
            eject_base_ms: 1_000,
            max_ejected_fraction: vigil_core::values::Fraction::HALF,
            breaker_window_ms: 10_000,
            breaker_min_requests: 20,
            breaker_failure_ratio: vigil_core::values::Fraction::HALF,
            breaker_open_for_ms: 5_000,
        }
    }

    /// Service `svc` with versions `v1` (instances a1, a2) and `v2` (instance b1), all ready, with room for
    /// every request a test leaves in flight.
    fn two_versions() -> Balancer<u32> {
        let mut b = Balancer::new(policy());
        b.add("svc", "v1", "a1", 1_000_000, true, 1);
        b.add("svc", "v1", "a2", 1_000_000, true, 2);
        b.add("svc", "v2", "b1", 1_000_000, true, 3);
        b
    }

    fn pick_id(
        b: &mut Balancer<u32>,
        r: &RouteRequest,
        now: Duration,
        rng: &mut impl FnMut() -> u64,
    ) -> String {
        match b.pick(r, now, rng) {
            Ok(p) => p.instance_id.to_string(),
            Err(e) => panic!("pick failed: {e}"),
        }
    }

    fn view(b: &Balancer<u32>, id: &str) -> InstanceView {
        match b.instances().into_iter().find(|v| &*v.instance_id == id) {
            Some(v) => v,
            None => panic!("no instance {id}"),
        }
    }

    fn breaker(b: &Balancer<u32>, version: &str) -> BreakerState {
        match b.breakers().into_iter().find(|v| &*v.version == version) {
            Some(v) => v.state,
            None => panic!("no breaker for {version}"),
        }
    }

    #[test]
    fn default_split_90_10_within_bounds() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 90), ("v2", 10)], false)]).unwrap();
        let mut r = rng(7);
        let mut v2 = 0;
        for _ in 0..10_000 {
            let p = b.pick(&req("svc"), Duration::ZERO, &mut r).unwrap();
            if &*p.version == "v2" {
                v2 += 1;
            }
            b.finish(&p.instance_id, Outcome::Success, MS, Duration::ZERO);
        }
        assert!((850..=1150).contains(&v2), "v2 got {v2} of 10000");
        assert_eq!(b.service_inflight("svc"), 0);
    }

    #[test]
    fn alias_split_50_50_and_unknown_alias() {
        let mut b = two_versions();
        b.set_splits(vec![split("half", "svc", &[("v1", 1), ("v2", 1)], false)]).unwrap();
        let mut r = rng(11);
        let r_half = RouteRequest { alias: Some("half"), ..req("svc") };
        let v2 = (0..10_000)
            .filter(|_| &*b.pick(&r_half, Duration::ZERO, &mut r).unwrap().version == "v2")
            .count();
        assert!((4850..=5150).contains(&v2), "v2 got {v2}");
        let r_bad = RouteRequest { alias: Some("nope"), ..req("svc") };
        assert_eq!(
            b.pick(&r_bad, Duration::ZERO, &mut r).unwrap_err(),
            NoTarget::UnknownAlias { service: "svc".into(), alias: "nope".into() }
        );
    }

    #[test]
    fn without_split_all_versions_are_pooled() {
        let mut b = two_versions();
        let mut r = rng(3);
        let mut seen = BTreeSet::new();
        for _ in 0..300 {
            seen.insert(pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a1", "a2", "b1"]);
    }

    #[test]
    fn sticky_keys_are_stable_and_weight_change_moves_the_delta() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 90), ("v2", 10)], true)]).unwrap();
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let mut before = Vec::new();
        let mut r = rng(1);
        for key in &keys {
            let kr = RouteRequest { key: Some(key), ..req("svc") };
            let first = b.pick(&kr, Duration::ZERO, &mut r).unwrap().version;
            // Whatever the random sequence, the same key lands on the same version.
            let mut other = rng(99);
            assert_eq!(b.pick(&kr, Duration::ZERO, &mut other).unwrap().version, first);
            before.push(first);
        }
        let v2 = before.iter().filter(|v| &***v == "v2").count();
        assert!((850..=1150).contains(&v2), "v2 got {v2}");

        // Same total, v2 grows by 10 points: exactly v2's gain moves, about 10 % of keys. Then a change of
        // the total (90/20: v2 grows to 18.2 %): still only about the delta, 8.2 %, moves.
        for (weights, expected) in
            [([("v1", 80), ("v2", 20)], 850..=1150), ([("v1", 90), ("v2", 20)], 670..=970)]
        {
            b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &weights, true)]).unwrap();
            let mut moved = 0;
            for (key, old) in keys.iter().zip(&before) {
                let kr = RouteRequest { key: Some(key), ..req("svc") };
                let new = b.pick(&kr, Duration::ZERO, &mut r).unwrap().version;
                if new != *old {
                    assert_eq!((&**old, &*new), ("v1", "v2"), "only v1 keys move, to the grown v2");
                    moved += 1;
                }
            }
            assert!(expected.contains(&moved), "{weights:?}: moved {moved} keys");
        }
    }

    #[test]
    fn non_sticky_split_ignores_the_key() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 1), ("v2", 1)], false)]).unwrap();
        let kr = RouteRequest { key: Some("same"), ..req("svc") };
        let mut r = rng(5);
        let versions: BTreeSet<_> =
            (0..100).map(|_| b.pick(&kr, Duration::ZERO, &mut r).unwrap().version).collect();
        assert_eq!(versions.len(), 2);
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn version_tag_is_exact() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 100), ("v3", 1)], false)]).unwrap();
        let mut r = rng(2);
        let vr = RouteRequest { version: Some("v2"), alias: Some("ignored"), ..req("svc") };
        for _ in 0..1000 {
            assert_eq!(pick_id(&mut b, &vr, Duration::ZERO, &mut r), "b1");
        }
        let unknown = RouteRequest { version: Some("v9"), ..req("svc") };
        assert_eq!(
            b.pick(&unknown, Duration::ZERO, &mut r).unwrap_err(),
            NoTarget::UnknownVersion { service: "svc".into(), version: "v9".into() }
        );
        // Mentioned by a split but without instances: known, just empty.
        let v3 = RouteRequest { version: Some("v3"), ..req("svc") };
        assert_eq!(
            b.pick(&v3, Duration::ZERO, &mut r).unwrap_err(),
            NoTarget::NoInstances { service: "svc".into() }
        );
        // A version that had instances stays known after they left.
        assert!(b.remove("b1"));
        let v2 = RouteRequest { version: Some("v2"), ..req("svc") };
        assert_eq!(
            b.pick(&v2, Duration::ZERO, &mut r).unwrap_err(),
            NoTarget::NoInstances { service: "svc".into() }
        );
    }

    #[test]
    fn p2c_prefers_the_less_loaded_relative_to_capacity() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "small", 2, true, 0);
        b.add("svc", "v1", "big", 8, true, 0);
        let mut r = rng(4);
        // With two candidates both are always sampled, so the lower inflight/capacity always wins:
        // the big one takes 4 of every 5 requests.
        for _ in 0..10 {
            pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r);
        }
        assert_eq!((b.inflight("small"), b.inflight("big")), (Some(2), Some(8)));
        assert!(b.pick(&req("svc"), Duration::ZERO, &mut r).is_err());
    }

    #[test]
    fn p2c_keeps_equal_instances_within_one_request() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 100, true, 0);
        b.add("svc", "v1", "y", 100, true, 0);
        let mut r = rng(8);
        for _ in 0..51 {
            pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r);
            let (x, y) = (b.inflight("x").unwrap(), b.inflight("y").unwrap());
            assert!(x.abs_diff(y) <= 1, "x={x} y={y}");
        }
    }

    #[test]
    fn p2c_breaks_load_ties_by_latency() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "slow", 10, true, 0);
        b.add("svc", "v1", "fast", 10, true, 0);
        let mut r = rng(6);
        b.pick(&RouteRequest { version: Some("v1"), ..req("svc") }, Duration::ZERO, &mut r).unwrap();
        b.finish("slow", Outcome::Success, Duration::from_millis(500), Duration::ZERO);
        b.finish("fast", Outcome::Success, Duration::from_millis(10), Duration::ZERO);
        for _ in 0..20 {
            let id = pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r);
            assert_eq!(id, "fast");
            b.finish(&id, Outcome::Success, Duration::from_millis(10), Duration::ZERO);
        }
    }

    #[test]
    fn latency_ewma_uses_alpha_0_2_and_skips_failures() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 10, true, 0);
        b.finish("x", Outcome::Success, Duration::from_millis(1000), Duration::ZERO);
        assert!((view(&b, "x").latency_ewma_seconds - 1.0).abs() < 1e-12);
        b.finish("x", Outcome::ApplicationError, Duration::ZERO, Duration::ZERO);
        assert!((view(&b, "x").latency_ewma_seconds - 0.8).abs() < 1e-12);
        b.finish("x", Outcome::Failure, Duration::from_secs(30), Duration::ZERO);
        assert!((view(&b, "x").latency_ewma_seconds - 0.8).abs() < 1e-12);
    }

    #[test]
    fn capacity_is_respected() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 2, true, 0);
        let mut r = rng(1);
        pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r);
        pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r);
        assert_eq!(
            b.pick(&req("svc"), Duration::ZERO, &mut r).unwrap_err(),
            NoTarget::AtCapacity { service: "svc".into() }
        );
        assert_eq!(b.inflight("x"), Some(2));
        b.finish("x", Outcome::Success, MS, Duration::ZERO);
        assert_eq!(pick_id(&mut b, &req("svc"), Duration::ZERO, &mut r), "x");
        // Capacity 0 is taken as 1.
        b.add("svc", "v1", "z", 0, true, 0);
        assert_eq!(view(&b, "z").capacity, 1);
    }

    fn fail(b: &mut Balancer<u32>, id: &str, times: u32, now: Duration) {
        for _ in 0..times {
            b.finish(id, Outcome::Failure, MS, now);
        }
    }

    #[test]
    fn ejection_after_consecutive_failures_returns_after_time_and_backs_off() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "bad", 100, true, 0);
        b.add("svc", "v1", "good", 100, true, 0);
        let mut r = rng(9);
        fail(&mut b, "bad", 2, Duration::ZERO);
        assert!(!view(&b, "bad").ejected);
        fail(&mut b, "bad", 1, Duration::ZERO);
        assert!(view(&b, "bad").ejected);
        for _ in 0..50 {
            let id = pick_id(&mut b, &req("svc"), 999 * MS, &mut r);
            assert_eq!(id, "good");
            b.finish(&id, Outcome::Success, MS, 999 * MS);
        }
        // Back after eject_base (1 s): two picks left in flight land one on each (a success would reset the
        // back-off this test goes on to check).
        let back: BTreeSet<_> = (0..2).map(|_| pick_id(&mut b, &req("svc"), S, &mut r)).collect();
        assert_eq!(back.into_iter().collect::<Vec<_>>(), ["bad", "good"]);
        assert!(!view(&b, "bad").ejected);
        // Second ejection (no success in between): 2 s, then 4 s, then capped at 8 s.
        let mut t = 2 * S;
        for expected in [2, 4, 8, 8] {
            fail(&mut b, "bad", 3, t);
            b.pick(&req("svc"), t + expected * S - MS, &mut r).unwrap();
            assert!(view(&b, "bad").ejected, "still ejected just before {expected}s");
            b.pick(&req("svc"), t + expected * S, &mut r).unwrap();
            assert!(!view(&b, "bad").ejected, "back at {expected}s");
            t += expected * S;
        }
    }

    #[test]
    fn success_resets_failures_and_backoff() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 10, true, 0);
        b.add("svc", "v1", "y", 10, true, 0);
        fail(&mut b, "x", 2, Duration::ZERO);
        b.finish("x", Outcome::Success, MS, Duration::ZERO);
        fail(&mut b, "x", 2, Duration::ZERO);
        assert!(!view(&b, "x").ejected);
        fail(&mut b, "x", 1, Duration::ZERO);
        assert!(view(&b, "x").ejected);
        b.finish("x", Outcome::Success, MS, 2 * S);
        // The success cleared the multiplier: the next ejection is 1 s again.
        fail(&mut b, "x", 3, 2 * S);
        b.pick(&req("svc"), 3 * S - MS, &mut rng(1)).unwrap();
        assert!(view(&b, "x").ejected);
        b.pick(&req("svc"), 3 * S, &mut rng(1)).unwrap();
        assert!(!view(&b, "x").ejected);
    }

    #[test]
    fn ejection_respects_max_fraction_and_never_ejects_all() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "only", 10, true, 0);
        fail(&mut b, "only", 10, Duration::ZERO);
        assert!(!view(&b, "only").ejected, "a lone instance is never ejected");

        let mut b: Balancer<u32> = Balancer::new(policy());
        for id in ["i1", "i2", "i3", "i4"] {
            b.add("svc", "v1", id, 10, true, 0);
        }
        // Another version's ejections do not count against v1's budget.
        b.add("svc", "v2", "other", 10, true, 0);
        for id in ["i1", "i2", "i3", "i4"] {
            fail(&mut b, id, 3, Duration::ZERO);
        }
        let ejected: Vec<_> =
            ["i1", "i2", "i3", "i4"].into_iter().filter(|id| view(&b, id).ejected).collect();
        assert_eq!(ejected, ["i1", "i2"], "at most half of four");
        // i3 keeps its failure count: once i1 is back, its next failure ejects it.
        fail(&mut b, "i3", 1, S);
        assert!(view(&b, "i3").ejected);
    }

    #[test]
    fn ejected_instances_serve_when_nothing_else_can() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 10, true, 0);
        b.add("svc", "v1", "y", 10, true, 0);
        fail(&mut b, "x", 3, Duration::ZERO);
        assert!(view(&b, "x").ejected);
        b.set_ready("y", false);
        assert_eq!(pick_id(&mut b, &req("svc"), Duration::ZERO, &mut rng(1)), "x");
    }

    #[test]
    fn application_errors_never_eject_or_trip() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 10, true, 0);
        b.add("svc", "v1", "y", 10, true, 0);
        for i in 0..200 {
            b.finish("x", Outcome::ApplicationError, MS, i * 10 * MS);
        }
        assert!(!view(&b, "x").ejected);
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
        // And they break a run of failures.
        fail(&mut b, "x", 2, 2 * S);
        b.finish("x", Outcome::ApplicationError, MS, 2 * S);
        fail(&mut b, "x", 2, 2 * S);
        assert!(!view(&b, "x").ejected);
    }

    fn breaker_policy() -> HealthPolicy {
        HealthPolicy { eject_after_failures: 0, ..policy() }
    }

    #[test]
    fn breaker_opens_exactly_at_min_requests_and_ratio() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        let t = Duration::ZERO;
        // 19 failures: below the minimum of 20 requests.
        fail(&mut b, "x", 19, t);
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
        fail(&mut b, "x", 1, t);
        assert_eq!(breaker(&b, "v1"), BreakerState::Open);

        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        for _ in 0..11 {
            b.finish("x", Outcome::Success, MS, t);
        }
        fail(&mut b, "x", 10, t);
        // 10 of 21 < 0.5
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
        fail(&mut b, "x", 1, t);
        // 11 of 22 = 0.5
        assert_eq!(breaker(&b, "v1"), BreakerState::Open);
        let vr = RouteRequest { version: Some("v1"), ..req("svc") };
        assert_eq!(
            b.pick(&vr, t, &mut rng(1)).unwrap_err(),
            NoTarget::CircuitOpen { service: "svc".into(), version: "v1".into() }
        );
    }

    #[test]
    fn breaker_window_forgets_old_failures() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        fail(&mut b, "x", 15, Duration::ZERO);
        // 10 s later the first second has left the 10-second window.
        fail(&mut b, "x", 15, 10 * S);
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
        fail(&mut b, "x", 5, 19 * S);
        assert_eq!(breaker(&b, "v1"), BreakerState::Open);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_closes_on_success() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        b.add("svc", "v1", "y", 100, true, 0);
        fail(&mut b, "x", 20, Duration::ZERO);
        let mut r = rng(3);
        assert!(matches!(b.pick(&req("svc"), 4999 * MS, &mut r), Err(NoTarget::CircuitOpen { .. })));
        let t = 5 * S;
        let probe = pick_id(&mut b, &req("svc"), t, &mut r);
        assert_eq!(breaker(&b, "v1"), BreakerState::HalfOpen);
        for _ in 0..5 {
            assert!(matches!(b.pick(&req("svc"), t, &mut r), Err(NoTarget::CircuitOpen { .. })));
        }
        // A late outcome from another instance does not decide.
        let other = if probe == "x" { "y" } else { "x" };
        b.finish(other, Outcome::Success, MS, t);
        assert_eq!(breaker(&b, "v1"), BreakerState::HalfOpen);
        b.finish(&probe, Outcome::Success, MS, t);
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
        for _ in 0..5 {
            pick_id(&mut b, &req("svc"), t, &mut r);
        }
        // The window was reset: a few failures do not reopen it.
        fail(&mut b, "x", 5, t);
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
    }

    #[test]
    fn half_open_probe_failure_reopens() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        fail(&mut b, "x", 20, Duration::ZERO);
        let mut r = rng(3);
        pick_id(&mut b, &req("svc"), 5 * S, &mut r);
        b.finish("x", Outcome::Failure, MS, 6 * S);
        assert_eq!(breaker(&b, "v1"), BreakerState::Open);
        assert!(b.pick(&req("svc"), 10 * S, &mut r).is_err());
        assert!(b.pick(&req("svc"), 11 * S, &mut r).is_ok());
    }

    #[test]
    fn late_outcomes_while_open_do_not_extend_it() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        fail(&mut b, "x", 20, Duration::ZERO);
        // Requests sent before it opened keep failing in: they do not restart the open period.
        fail(&mut b, "x", 20, 4 * S);
        assert!(b.pick(&req("svc"), 5 * S, &mut rng(1)).is_ok());
        assert_eq!(breaker(&b, "v1"), BreakerState::HalfOpen);
    }

    #[test]
    fn lost_probe_is_replaced() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        b.add("svc", "v1", "y", 100, true, 0);
        fail(&mut b, "x", 20, Duration::ZERO);
        let mut r = rng(3);
        let probe = pick_id(&mut b, &req("svc"), 5 * S, &mut r);
        assert!(b.pick(&req("svc"), 5 * S, &mut r).is_err());
        // Its instance leaves: another probe may go.
        b.remove(&probe);
        assert!(b.pick(&req("svc"), 5 * S, &mut r).is_ok());
        // That one never reports: after open_for yet another may go.
        assert!(b.pick(&req("svc"), 9 * S, &mut r).is_err());
        assert!(b.pick(&req("svc"), 10 * S, &mut r).is_ok());
    }

    #[test]
    fn broken_canary_fails_over_to_stable() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 10), ("v2", 90)], false)]).unwrap();
        fail(&mut b, "b1", 20, Duration::ZERO);
        assert_eq!(breaker(&b, "v2"), BreakerState::Open);
        let mut r = rng(12);
        for _ in 0..1000 {
            let p = b.pick(&req("svc"), S, &mut r).unwrap();
            assert_eq!(&*p.version, "v1");
        }
        // Likewise when the canary is hibernated or gone, and for sticky keys.
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 10), ("v2", 90)], true)]).unwrap();
        b.set_ready("b1", false);
        for i in 0..100 {
            let key = format!("k{i}");
            let kr = RouteRequest { key: Some(&key), ..req("svc") };
            assert_eq!(&*b.pick(&kr, S, &mut r).unwrap().version, "v1");
        }
        b.remove("b1");
        assert_eq!(&*b.pick(&req("svc"), S, &mut r).unwrap().version, "v1");
    }

    #[test]
    fn drained_version_takes_no_failover() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 1), ("v2", 0)], false)]).unwrap();
        b.set_ready("a1", false);
        b.set_ready("a2", false);
        assert_eq!(
            b.pick(&req("svc"), S, &mut rng(1)).unwrap_err(),
            NoTarget::NotReady { service: "svc".into() }
        );
    }

    #[test]
    fn unknown_service_vs_no_instances_vs_not_ready() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        let mut r = rng(1);
        assert_eq!(b.pick(&req("svc"), S, &mut r).unwrap_err(), NoTarget::UnknownService("svc".into()));
        assert!(!b.has_ready("svc"));
        b.known_service("svc");
        assert_eq!(
            b.pick(&req("svc"), S, &mut r).unwrap_err(),
            NoTarget::NoInstances { service: "svc".into() }
        );
        b.add("svc", "v1", "x", 1, false, 0);
        assert_eq!(b.pick(&req("svc"), S, &mut r).unwrap_err(), NoTarget::NotReady { service: "svc".into() });
        assert!(!b.has_ready("svc"));
        assert!(b.set_ready("x", true));
        assert!(b.has_ready("svc"));
        assert_eq!(pick_id(&mut b, &req("svc"), S, &mut r), "x");
        assert!(b.remove("x"));
        assert!(!b.remove("x"));
        assert!(!b.set_ready("x", true));
        assert_eq!(
            b.pick(&req("svc"), S, &mut r).unwrap_err(),
            NoTarget::NoInstances { service: "svc".into() }
        );
        // A service that had instances stays known without being declared.
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("other", "v1", "o", 1, true, 0);
        b.remove("o");
        assert_eq!(
            b.pick(&req("other"), S, &mut r).unwrap_err(),
            NoTarget::NoInstances { service: "other".into() }
        );
        // As does one a split mentions.
        b.set_splits(vec![split("canary", "third", &[("v1", 1)], false)]).unwrap();
        assert_eq!(
            b.pick(&req("third"), S, &mut r).unwrap_err(),
            NoTarget::NoInstances { service: "third".into() }
        );
    }

    #[test]
    fn error_priority_when_several_reasons_apply() {
        let mut r = rng(1);
        // Waking beats capacity and open circuits.
        let mut b = two_versions();
        b.set_ready("a1", false);
        b.add("svc", "v1", "a2", 1, true, 2);
        pick_id(&mut b, &RouteRequest { version: Some("v1"), ..req("svc") }, S, &mut r);
        fail(&mut b, "b1", 20, S);
        assert_eq!(b.pick(&req("svc"), S, &mut r).unwrap_err(), NoTarget::NotReady { service: "svc".into() });
        // Capacity beats an open circuit.
        b.remove("a1");
        assert_eq!(
            b.pick(&req("svc"), S, &mut r).unwrap_err(),
            NoTarget::AtCapacity { service: "svc".into() }
        );
        // Only an open circuit left.
        b.remove("a2");
        assert_eq!(
            b.pick(&req("svc"), S, &mut r).unwrap_err(),
            NoTarget::CircuitOpen { service: "svc".into(), version: "v2".into() }
        );
    }

    #[test]
    fn set_splits_at_runtime_keeps_inflight_accounting() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v1", 1)], false)]).unwrap();
        let mut r = rng(1);
        let p = b.pick(&req("svc"), S, &mut r).unwrap();
        assert_eq!(&*p.version, "v1");
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v2", 1)], false)]).unwrap();
        assert_eq!(pick_id(&mut b, &req("svc"), S, &mut r), "b1");
        assert_eq!(b.service_inflight("svc"), 2);
        b.finish(&p.instance_id, Outcome::Success, MS, S);
        assert_eq!(b.inflight(&p.instance_id), Some(0));
        b.finish("b1", Outcome::Success, MS, S);
        assert_eq!(b.service_inflight("svc"), 0);
        b.set_splits(Vec::new()).unwrap();
        assert_eq!(b.breakers().len(), 2);
    }

    #[test]
    fn set_splits_validates_and_keeps_the_old_ones_on_error() {
        let mut b = two_versions();
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v2", 1)], false)]).unwrap();
        assert_eq!(
            b.set_splits(vec![split("z", "svc", &[("v1", 0), ("v2", 0)], false)]),
            Err(SplitError::ZeroWeight { service: "svc".into(), name: "z".into() })
        );
        assert_eq!(
            b.set_splits(vec![split("z", "svc", &[], false)]),
            Err(SplitError::ZeroWeight { service: "svc".into(), name: "z".into() })
        );
        assert_eq!(
            b.set_splits(vec![
                split("d", "svc", &[("v1", 1)], false),
                split("d", "svc", &[("v2", 1)], false)
            ]),
            Err(SplitError::Duplicate { service: "svc".into(), name: "d".into() })
        );
        assert_eq!(
            b.set_splits(vec![split("", "svc", &[("v1", 1)], false)]),
            Err(SplitError::EmptyName { service: "svc".into() })
        );
        // Same name for different services is fine.
        assert!(
            b.set_splits(vec![split("d", "svc", &[("v1", 1)], false), split("d", "x", &[("v1", 1)], false)])
                .is_ok()
        );
        b.set_splits(vec![split(DEFAULT_SPLIT, "svc", &[("v2", 1)], false)]).unwrap();
        let _ = b.set_splits(vec![split("z", "svc", &[("v1", 0)], false)]);
        assert_eq!(pick_id(&mut b, &req("svc"), S, &mut rng(1)), "b1");
    }

    #[test]
    fn readd_keeps_inflight_but_resets_health() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.add("svc", "v1", "x", 10, true, 1);
        b.add("svc", "v1", "y", 10, true, 1);
        let mut r = rng(1);
        b.set_ready("y", false);
        assert_eq!(pick_id(&mut b, &req("svc"), S, &mut r), "x");
        b.set_ready("y", true);
        fail(&mut b, "x", 3, S);
        assert!(view(&b, "x").ejected);
        assert_eq!(b.inflight("x"), Some(0));
        assert_eq!(pick_id(&mut b, &req("svc"), S, &mut r), "y");
        assert_eq!(pick_id(&mut b, &req("svc"), S, &mut r), "y");
        // y re-registers (a reconnect) under a new version with a new handle and capacity: its two requests
        // are still in flight, its record is fresh.
        fail(&mut b, "y", 2, S);
        b.pick(&req("svc"), S, &mut r).unwrap();
        b.pick(&req("svc"), S, &mut r).unwrap();
        assert_eq!(b.inflight("y"), Some(2));
        b.add("svc", "v2", "y", 5, true, 42);
        let v = view(&b, "y");
        assert_eq!((&*v.version, v.capacity, v.ejected, v.inflight), ("v2", 5, false, 2));
        // Its two earlier failures are forgotten: one more does not eject it.
        fail(&mut b, "y", 1, S);
        assert!(!view(&b, "y").ejected);
        let p = b.pick(&RouteRequest { version: Some("v2"), ..req("svc") }, S, &mut r).unwrap();
        assert_eq!(p.handle, 42);
        assert_eq!(b.handle("y"), Some(&42));
        assert_eq!(b.handle("ghost"), None);
        b.finish("y", Outcome::Success, MS, S);
        b.finish("y", Outcome::Success, MS, S);
        assert_eq!(b.inflight("y"), Some(0));
        let versions: Vec<_> = b.breakers().into_iter().map(|v| v.version.to_string()).collect();
        assert_eq!(versions, ["v1", "v2"]);
    }

    #[test]
    fn reconnect_keeps_the_version_breaker_but_redeploy_resets_it() {
        let mut b: Balancer<u32> = Balancer::new(breaker_policy());
        b.add("svc", "v1", "x", 100, true, 0);
        fail(&mut b, "x", 20, Duration::ZERO);
        b.add("svc", "v1", "x", 100, true, 0);
        assert_eq!(breaker(&b, "v1"), BreakerState::Open);
        b.remove("x");
        assert!(b.breakers().is_empty());
        b.add("svc", "v1", "x", 100, true, 0);
        assert_eq!(breaker(&b, "v1"), BreakerState::Closed);
    }

    #[test]
    fn finish_for_unknown_or_idle_instance_is_harmless() {
        let mut b: Balancer<u32> = Balancer::new(policy());
        b.finish("ghost", Outcome::Failure, MS, S);
        b.add("svc", "v1", "x", 10, true, 0);
        b.finish("x", Outcome::Success, MS, S);
        assert_eq!(b.inflight("x"), Some(0));
        assert_eq!(b.inflight("ghost"), None);
        assert_eq!(b.service_inflight("nothing"), 0);
    }

    #[test]
    fn health_policy_deserializes_with_defaults_and_rejects_unknown_fields() {
        let p: HealthPolicy = serde_json::from_str(r#"{"eject_after_failures": 7}"#).unwrap();
        assert_eq!(p, HealthPolicy { eject_after_failures: 7, ..HealthPolicy::default() });
        assert_eq!(p.eject_base(), Duration::from_secs(30));
        assert_eq!(p.breaker_window(), Duration::from_secs(10));
        assert_eq!(p.breaker_open_for(), Duration::from_secs(5));
        assert!(serde_json::from_str::<HealthPolicy>(r#"{"eject_base": 3}"#).is_err());
        let s: Split =
            serde_json::from_str(r#"{"name":"c","service":"s","weights":{"v1":9,"v2":1}}"#).unwrap();
        assert_eq!(s, split("c", "s", &[("v1", 9), ("v2", 1)], false));
        assert!(serde_json::from_str::<Split>(r#"{"name":"c","service":"s","weights":{},"x":1}"#).is_err());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add { id: u8, version: u8, capacity: u32, ready: bool },
        Remove(u8),
        SetReady(u8, bool),
        Pick { version: Option<u8>, alias: bool, key: Option<u8> },
        Finish { nth: usize, outcome: u8, latency_ms: u64 },
        FinishUnknown(u8),
        Splits(u32, u32, bool),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u8..3, 0u32..4, any::<bool>()).prop_map(|(id, version, capacity, ready)| Op::Add {
                id,
                version,
                capacity,
                ready
            }),
            (0u8..6).prop_map(Op::Remove),
            (0u8..6, any::<bool>()).prop_map(|(i, r)| Op::SetReady(i, r)),
            (proptest::option::of(0u8..3), any::<bool>(), proptest::option::of(0u8..20))
                .prop_map(|(version, alias, key)| Op::Pick { version, alias, key }),
            (any::<usize>(), 0u8..3, 0u64..2000).prop_map(|(nth, outcome, latency_ms)| Op::Finish {
                nth,
                outcome,
                latency_ms
            }),
            (0u8..6).prop_map(Op::FinishUnknown),
            (0u32..5, 0u32..5, any::<bool>()).prop_map(|(a, b, s)| Op::Splits(a, b, s)),
            (0u64..3000).prop_map(Op::Tick),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn inflight_equals_picks_minus_finishes(ops in proptest::collection::vec(op(), 1..200), seed: u64) {
            let small = HealthPolicy {
                eject_after_failures: 2,
                eject_base_ms: 500,
                breaker_min_requests: 3,
                breaker_window_ms: 2000,
                breaker_open_for_ms: 700,
                ..HealthPolicy::default()
            };
            let mut b: Balancer<u8> = Balancer::new(small);
            b.known_service("svc");
            let mut r = rng(seed);
            let mut now = Duration::ZERO;
            // Outstanding picks by instance id, in pick order.
            let mut outstanding: Vec<String> = Vec::new();
            let ids: Vec<String> = (0..6).map(|i| format!("i{i}")).collect();
            for op in ops {
                match op {
                    Op::Add { id, version, capacity, ready } => {
                        b.add("svc", &format!("v{version}"), &ids[id as usize], capacity, ready, id);
                    }
                    Op::Remove(id) => {
                        let id = &ids[id as usize];
                        b.remove(id);
                        // Their finishes will be ignored; the model forgets them.
                        outstanding.retain(|o| o != id);
                    }
                    Op::SetReady(id, ready) => {
                        b.set_ready(&ids[id as usize], ready);
                    }
                    Op::Pick { version, alias, key } => {
                        let version = version.map(|v| format!("v{v}"));
                        let key = key.map(|k| format!("k{k}"));
                        let rq = RouteRequest {
                            service: "svc",
                            alias: alias.then_some("canary"),
                            version: version.as_deref(),
                            key: key.as_deref(),
                        };
                        if let Ok(p) = b.pick(&rq, now, &mut r) {
                            let v = view_of(&b, &p.instance_id);
                            prop_assert!(v.ready);
                            prop_assert!(v.inflight <= v.capacity);
                            if let Some(version) = &version {
                                prop_assert_eq!(&*p.version, version.as_str());
                            }
                            outstanding.push(p.instance_id.to_string());
                        }
                    }
                    Op::Finish { nth, outcome, latency_ms } => {
                        if !outstanding.is_empty() {
                            let id = outstanding.remove(nth % outstanding.len());
                            let outcome = [Outcome::Success, Outcome::ApplicationError, Outcome::Failure]
                                [outcome as usize];
                            b.finish(&id, outcome, Duration::from_millis(latency_ms), now);
                        }
                    }
                    Op::FinishUnknown(i) => b.finish(&format!("ghost{i}"), Outcome::Failure, MS, now),
                    Op::Splits(w0, w1, sticky) => {
                        let splits = vec![
                            split(DEFAULT_SPLIT, "svc", &[("v0", w0), ("v1", w1)], sticky),
                            split("canary", "svc", &[("v1", 1), ("v2", w0)], sticky),
                        ];
                        let res = b.set_splits(splits);
                        prop_assert_eq!(res.is_ok(), w0 + w1 > 0);
                    }
                    Op::Tick(ms) => now += Duration::from_millis(ms),
                }
                let mut total = 0;
                for id in &ids {
                    let expected = outstanding.iter().filter(|o| *o == id).count() as u32;
                    match b.inflight(id) {
                        Some(n) => prop_assert_eq!(n, expected, "instance {}", id),
                        None => prop_assert_eq!(expected, 0),
                    }
                    total += expected;
                }
                prop_assert_eq!(b.service_inflight("svc"), total);
            }
        }
    }

    fn view_of(b: &Balancer<u8>, id: &str) -> InstanceView {
        match b.instances().into_iter().find(|v| &*v.instance_id == id) {
            Some(v) => v,
            None => panic!("no instance {id}"),
        }
    }
}
