//! The autoscaler at run time. Four times a collector tick, and at once when a request is held for a service with no
//! ready instance (a poke), it measures each scaled service's concurrency (the broker's time averages,
//! and connections that bypass the broker), lets the service's [`Decider`] pick the desired count, and
//! sends the steps the [`tiers`](super::tiers) planner derives through the safety gate, audited as rule
//! [`AUTOSCALE_RULE`] with the inputs that led to them. A count pinned by hand replaces the decider's
//! until it is lifted.
//!
//! Desired counts are written to `<data_dir>/autoscale.json` when they change, so that after a restart
//! Vigil starts the instances a service had (and the decider keeps at least that many until it has a
//! full stable window of data): a restart never scales a busy service down.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::decide::{Decider, Mode, Sample, ScalePolicy};
use super::signal::{LoadSource, ServiceLoad};
use super::tiers::{Member, Step, Tiers, plan, tiers};
use crate::actions::Actions;
use crate::engine::{Outcome, Refusal};
use crate::rules::{Action, InstanceState};
use crate::supervisor::Supervisor;

/// The rule name the autoscaler's steps are audited under.
pub const AUTOSCALE_RULE: &str = "autoscale";
/// The file, in the data directory, that keeps each scaled service's desired count across restarts.
pub const STATE_FILE: &str = "autoscale.json";
/// Decisions per collector tick: a step in load is acted on within a quarter of a tick (250 ms by default),
/// not a whole one. Samples carry their span, so the windows weigh them right.
pub const DECISIONS_PER_TICK: u32 = 4;
/// An unchanged plan whose steps the gate refused (rate limit) is submitted again after this long,
/// not on every tick, so that the audit log does not fill with the same refusal. In dry-run an unchanged
/// plan is not submitted again at all.
const RESUBMIT_AFTER: Duration = Duration::from_secs(5);

/// A service the autoscaler sizes.
#[derive(Clone, Debug)]
pub struct ScaledService {
    /// The managed service's name.
    pub name: String,
    /// The name requests route by (`serves`, or the name).
    pub routed: String,
    pub policy: ScalePolicy,
}

/// What started a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Tick,
    /// A request is held and nothing is ready.
    Request,
    /// A count was pinned or unpinned by hand.
    Manual,
}

/// The last decision for a service, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LastDecision {
    pub unix_ms: u64,
    pub trigger: Trigger,
    pub desired: u32,
    pub mode: Mode,
    pub observed_concurrency: f64,
    /// One readable line: what the averages asked for and what shaped the count.
    pub why: String,
    /// The same, as data.
    pub inputs: serde_json::Value,
}

/// A scaled service as the API and metrics show it.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub desired: u32,
    pub ready: u32,
    pub standby: u32,
    pub stopped: u32,
    /// Meant to serve (ready, or starting / waking on the way).
    pub serving: u32,
    pub observed_concurrency: f64,
    pub mode: Mode,
    /// A count pinned by hand, if any.
    pub pinned: Option<u32>,
    pub min: u32,
    pub max: u32,
    pub last_decision: Option<LastDecision>,
}

/// Why a pin was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("no scaled service `{0}` (only services with a `scale:` block are sized by the autoscaler)")]
    Unknown(String),
    #[error("service `{service}` has at most {max} instances (`scale.max`); {asked} was asked")]
    AboveMax { service: String, asked: u32, max: u32 },
}

struct State {
    service: ScaledService,
    decider: Decider,
    pinned: Option<u32>,
    desired: u32,
    mode: Mode,
    observed: f64,
    last: Option<LastDecision>,
    /// The last plan submitted, and when.
    submitted: Option<(Vec<Step>, Instant)>,
    /// When the previous sample ended.
    last_sample: Duration,
}

struct Inner {
    supervisor: Supervisor,
    actions: Arc<Actions>,
    load: OnceLock<Arc<dyn LoadSource>>,
    states: Mutex<BTreeMap<String, State>>,
    /// Routed name → scaled services routed by it.
    by_route: HashMap<String, Vec<String>>,
    state_file: PathBuf,
    started: Instant,
    pokes: mpsc::UnboundedSender<String>,
    /// Persisted counts, written off the async workers in order.
    persist: Mutex<()>,
}

/// A cloneable handle on the autoscaler.
#[derive(Clone)]
pub struct Scaler {
    inner: Arc<Inner>,
}

use vigil_core::time::now_unix_ms as unix_ms;

/// The desired counts a previous run left in `data_dir`; empty when there are none or the file is
/// unreadable (then the services start at `min`, and a warning says why).
pub fn saved_counts(data_dir: &Path) -> BTreeMap<String, u32> {
    let path = data_dir.join(STATE_FILE);
    vigil_core::state_file::read_json(&path).map(Option::unwrap_or_default).unwrap_or_else(|e| {
        tracing::warn!(file = %path.display(), error = %e, "unreadable autoscaler state; starting at min");
        BTreeMap::new()
    })
}

/// The count a scaled service starts with: what it had before a restart, within `[min, max]`.
pub fn count_at_start(policy: &ScalePolicy, saved: Option<u32>) -> u32 {
    saved.unwrap_or(policy.min).clamp(policy.min, policy.max)
}

/// The autoscaler's metrics, read from its state at scrape time: `vigil_service_desired_instances`,
/// `vigil_service_instances{state}` (ready, starting, standby, stopped), `vigil_service_observed_concurrency`
/// and `vigil_autoscaler_panic`.
pub struct ScalerMetrics(Scaler);

impl std::fmt::Debug for ScalerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScalerMetrics")
    }
}

impl Collector for ScalerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses = self.0.statuses();
        let mut m = enc.encode_descriptor(
            "vigil_service_desired_instances",
            "Instances the autoscaler wants serving",
            None,
            MetricType::Gauge,
        )?;
        for s in &statuses {
            m.encode_family(&[("service", s.name.as_str())])?.encode_gauge(&i64::from(s.desired))?;
        }
        let mut m = enc.encode_descriptor(
            "vigil_service_instances",
            "Instances of a scaled service by tier (ready, starting, standby, stopped)",
            None,
            MetricType::Gauge,
        )?;
        for s in &statuses {
            let starting = s.serving.saturating_sub(s.ready);
            for (state, n) in
                [("ready", s.ready), ("starting", starting), ("standby", s.standby), ("stopped", s.stopped)]
            {
                m.encode_family(&[("service", s.name.as_str()), ("state", state)])?
                    .encode_gauge(&i64::from(n))?;
            }
        }
        let mut m = enc.encode_descriptor(
            "vigil_service_observed_concurrency",
            "Requests in flight and held, time-averaged over the last decision interval",
            None,
            MetricType::Gauge,
        )?;
        for s in &statuses {
            m.encode_family(&[("service", s.name.as_str())])?.encode_gauge(&s.observed_concurrency)?;
        }
        let mut m = enc.encode_descriptor(
            "vigil_autoscaler_panic",
            "1 while the autoscaler is in panic mode for the service",
            None,
            MetricType::Gauge,
        )?;
        for s in &statuses {
            m.encode_family(&[("service", s.name.as_str())])?
                .encode_gauge(&i64::from(s.mode == Mode::Panic))?;
        }
        Ok(())
    }
}

impl Scaler {
    /// Its metrics, for the healer's registry.
    pub fn metrics(&self) -> ScalerMetrics {
        ScalerMetrics(self.clone())
    }

    /// The autoscaler of `services`, whose instances `supervisor` runs with `initial` of each serving.
    /// Call [`Scaler::run`] to start deciding.
    pub fn new(
        services: Vec<ScaledService>,
        initial: &BTreeMap<String, u32>,
        supervisor: Supervisor,
        actions: Arc<Actions>,
        data_dir: &Path,
    ) -> (Scaler, mpsc::UnboundedReceiver<String>) {
        let started = Instant::now();
        let mut by_route: HashMap<String, Vec<String>> = HashMap::new();
        let mut states = BTreeMap::new();
        for service in services {
            let current = initial.get(&service.name).copied().unwrap_or(service.policy.min);
            by_route.entry(service.routed.clone()).or_default().push(service.name.clone());
            let decider = Decider::new(service.policy.clone(), Duration::ZERO, current);
            states.insert(
                service.name.clone(),
                State {
                    service,
                    decider,
                    pinned: None,
                    desired: current,
                    mode: Mode::Stable,
                    observed: 0.0,
                    last: None,
                    submitted: None,
                    last_sample: Duration::ZERO,
                },
            );
        }
        let (pokes, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            supervisor,
            actions,
            load: OnceLock::new(),
            states: Mutex::new(states),
            by_route,
            state_file: data_dir.join(STATE_FILE),
            started,
            pokes,
            persist: Mutex::new(()),
        });
        (Scaler { inner }, rx)
    }

    fn states(&self) -> MutexGuard<'_, BTreeMap<String, State>> {
        // Plain data: a panic elsewhere leaves it usable.
        self.inner.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Connects the broker's measurements. Without them only connections that bypass a broker count.
    pub fn attach(&self, load: Arc<dyn LoadSource>) {
        let _ = self.inner.load.set(load);
    }

    /// Whether `service` (the managed name) is sized by the autoscaler.
    pub fn scales(&self, service: &str) -> bool {
        self.states().contains_key(service)
    }

    /// Whether any scaled service is routed by `routed`.
    pub fn scales_route(&self, routed: &str) -> bool {
        self.inner.by_route.contains_key(routed)
    }

    /// A request is held for `routed` and nothing is ready: decide for its services now, not at the next
    /// tick. Returns at once.
    pub fn poke(&self, routed: &str) {
        let _ = self.inner.pokes.send(routed.to_string());
    }

    /// Decides [`DECISIONS_PER_TICK`] times a collector `tick`, and on every poke, until `stop` changes.
    pub async fn run(
        self,
        tick: Duration,
        mut pokes: mpsc::UnboundedReceiver<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let every = (tick / DECISIONS_PER_TICK).max(Duration::from_millis(50));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (names, trigger): (Vec<String>, Trigger) = tokio::select! {
                _ = ticks.tick() => (self.states().keys().cloned().collect(), Trigger::Tick),
                poked = pokes.recv() => match poked {
                    Some(routed) => (self.inner.by_route.get(&routed).cloned().unwrap_or_default(), Trigger::Request),
                    None => return,
                },
                _ = stop.changed() => return,
            };
            for name in names {
                self.step(&name, trigger).await;
            }
        }
    }

    /// Measures, decides and acts for one service.
    async fn step(&self, name: &str, trigger: Trigger) {
        let members = self.inner.supervisor.members(name);
        let t = tiers(&members);
        // A poke for a service that has capacity coming adds nothing: the tick will see the demand.
        if trigger == Trigger::Request && (t.ready > 0 || members.iter().any(starting)) {
            return;
        }
        let ports: Vec<u16> = members.iter().map(|m| m.port).collect();
        let direct = tokio::task::spawn_blocking(move || crate::tcp::foreign_connections_now(&ports))
            .await
            .unwrap_or_default();
        let routed = match self.states().get(name) {
            Some(s) => s.service.routed.clone(),
            None => return,
        };
        let load = self.inner.load.get().map(|l| l.take(&routed)).unwrap_or_default();
        let now = self.now();
        // In dry-run nothing changes, so the same plan comes back every decision: audit it once.
        let dry_run = self.inner.actions.engine().dry_run();
        let (steps, inputs, changed) = {
            let mut states = self.states();
            let Some(state) = states.get_mut(name) else { return };
            let sample = sample_of(&load, &members, &direct, now, state.last_sample);
            state.last_sample = now;
            state.decider.record(sample);
            let decision = state.decider.decide(now, t.ready);
            let desired = state.pinned.unwrap_or(decision.desired);
            let changed = desired != state.desired;
            state.desired = desired;
            state.mode = decision.mode;
            state.observed = sample.concurrency;
            let inputs = json!({
                "trigger": trigger,
                "observed_concurrency": sample.concurrency,
                "desired": desired,
                "pinned": state.pinned,
                "mode": decision.mode,
                "ready": t.ready,
                "serving": t.serving,
                "standby": t.standby,
                "why": decision.why,
            });
            state.last = Some(LastDecision {
                unix_ms: unix_ms(),
                trigger,
                desired,
                mode: decision.mode,
                observed_concurrency: sample.concurrency,
                why: decision.why.to_string(),
                inputs: inputs.clone(),
            });
            let steps = plan(&members, desired, state.service.policy.standby);
            let repeat = state
                .submitted
                .as_ref()
                .is_some_and(|(last, at)| *last == steps && (dry_run || at.elapsed() < RESUBMIT_AFTER));
            if steps.is_empty() || repeat {
                state.submitted = if steps.is_empty() { None } else { state.submitted.take() };
                (Vec::new(), inputs, changed)
            } else {
                state.submitted = Some((steps.clone(), Instant::now()));
                (steps, inputs, changed)
            }
        };
        if changed {
            self.persist().await;
        }
        self.carry_out(name, steps, inputs).await;
    }

    /// Sends `steps` through the gate. A hibernation the standby fraction refuses becomes a stop: the
    /// service still scales down, without a warm instance.
    async fn carry_out(&self, service: &str, steps: Vec<Step>, inputs: serde_json::Value) {
        let inputs = Arc::new(inputs);
        for step in steps {
            let mut p = self.inner.actions.proposal(AUTOSCALE_RULE, step.action, service, &step.id);
            p.inputs = Some(inputs.clone());
            let submitted = self.inner.actions.submit(p).await;
            let fraction = Outcome::Refused { reason: Refusal::StandbyFraction };
            if step.action == Action::Hibernate && submitted.decision().is_some_and(|d| d.outcome == fraction)
            {
                let mut p = self.inner.actions.proposal(AUTOSCALE_RULE, Action::Stop, service, &step.id);
                p.inputs = Some(inputs.clone());
                self.inner.actions.submit(p).await;
            }
        }
    }

    /// Writes every service's desired count (atomically: a temporary file renamed over the old one).
    async fn persist(&self) {
        let counts: BTreeMap<String, u32> =
            self.states().iter().map(|(name, s)| (name.clone(), s.desired)).collect();
        let inner = self.inner.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _order = inner.persist.lock().unwrap_or_else(|e| e.into_inner());
            vigil_core::state_file::write_json(&inner.state_file, &counts)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(file = %self.inner.state_file.display(), error = %e,
                "cannot save the autoscaler's counts; a restart would start at min"),
            Err(e) => tracing::error!(error = %e, "the autoscaler's writer panicked"),
        }
    }

    /// Pins `service` at `count` instances (`None` lifts the pin: the decider sizes it again). Takes
    /// effect at once; audited as a manual decision.
    pub async fn pin(&self, service: &str, count: Option<u32>) -> Result<ServiceStatus, PinError> {
        {
            let mut states = self.states();
            let state = states.get_mut(service).ok_or_else(|| PinError::Unknown(service.to_string()))?;
            if let Some(asked) = count
                && asked > state.service.policy.max
            {
                return Err(PinError::AboveMax {
                    service: service.to_string(),
                    asked,
                    max: state.service.policy.max,
                });
            }
            state.pinned = count;
            state.submitted = None;
        }
        let record = json!({
            "unix_ms": unix_ms(),
            "rule": crate::engine::MANUAL_RULE,
            "action": "scale",
            "service": service,
            "instance_id": "",
            "held_seconds": 0.0,
            "outcome": "succeeded",
            "seconds": 0.0,
            "inputs": { "pinned": count, "scale": if count.is_some() { "pinned" } else { "auto" } },
        });
        let audit = self.inner.actions.audit().clone();
        let announced = record.clone();
        match tokio::task::spawn_blocking(move || audit.append(&record)).await {
            Ok(Ok(seq)) => self.inner.actions.publish(seq, &announced),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record a scale pin in the audit log"),
            Err(e) => tracing::error!(error = %e, "the audit writer panicked"),
        }
        tracing::info!(service, pinned = ?count, "scale pinned by hand");
        self.step(service, Trigger::Manual).await;
        self.status(service).ok_or_else(|| PinError::Unknown(service.to_string()))
    }

    /// Every scaled service's status, by name.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        let names: Vec<String> = self.states().keys().cloned().collect();
        names.iter().filter_map(|n| self.status(n)).collect()
    }

    pub fn status(&self, service: &str) -> Option<ServiceStatus> {
        let t: Tiers = tiers(&self.inner.supervisor.members(service));
        let states = self.states();
        let s = states.get(service)?;
        Some(ServiceStatus {
            name: service.to_string(),
            desired: s.desired,
            ready: t.ready,
            standby: t.standby,
            stopped: t.stopped,
            serving: t.serving,
            observed_concurrency: s.observed,
            mode: s.mode,
            pinned: s.pinned,
            min: s.service.policy.min,
            max: s.service.policy.max,
            last_decision: s.last.clone(),
        })
    }
}

/// Whether an instance is on its way to serving (its readiness is coming).
fn starting(m: &Member) -> bool {
    matches!(m.state, InstanceState::Starting | InstanceState::Waking)
}

/// One sample from the broker's interval and the kernel's connections: per instance the larger of the
/// broker's time-averaged in-flight count and the connections that bypass the broker (a point count;
/// the kernel has no integral), plus the requests held.
fn sample_of(
    load: &ServiceLoad,
    members: &[Member],
    direct: &HashMap<u16, usize>,
    now: Duration,
    previous: Duration,
) -> Sample {
    let mut concurrency = load.held;
    for m in members {
        let brokered = load.inflight_by_instance.get(&m.id).copied().unwrap_or(0.0);
        let kernel = direct.get(&m.port).copied().unwrap_or(0);
        concurrency += brokered.max(kernel as f64);
    }
    // Arrivals are the broker's: a connection that bypasses it shows in `concurrency`, which is activity
    // enough for the zero grace.
    Sample {
        end: now,
        // Without a broker (no interval of its own) the sample covers the time since the previous one.
        span: if load.span.is_zero() { now.saturating_sub(previous) } else { load.span.min(now) },
        concurrency,
        arrivals: load.arrivals,
        held: load.held_now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Goal;

    fn member(index: u32, state: InstanceState) -> Member {
        Member {
            id: format!("api-{index}"),
            index,
            port: 18080 + index as u16,
            state,
            goal: Goal::Serve,
            busy: false,
            ran: true,
        }
    }

    #[test]
    fn a_sample_takes_the_larger_of_the_broker_and_the_kernel_per_instance_plus_held() {
        let load = ServiceLoad {
            span: Duration::from_secs(1),
            inflight_by_instance: HashMap::from([("api-0".into(), 2.5), ("api-1".into(), 0.5)]),
            held: 1.25,
            held_now: 1,
            arrivals: 7,
        };
        let members = [member(0, InstanceState::Active), member(1, InstanceState::Active)];
        // api-1 also has 3 clients that bypass the broker.
        let direct = HashMap::from([(18080, 0), (18081, 3)]);
        let s = sample_of(&load, &members, &direct, Duration::from_secs(10), Duration::from_secs(9));
        assert_eq!(s.concurrency, 2.5 + 3.0 + 1.25);
        assert_eq!(
            (s.arrivals, s.held, s.span, s.end),
            (7, 1, Duration::from_secs(1), Duration::from_secs(10))
        );
    }

    #[test]
    fn the_count_at_start_is_the_saved_one_within_min_and_max() {
        let policy = ScalePolicy { min: 1, max: 4, ..ScalePolicy::default() };
        assert_eq!(count_at_start(&policy, None), 1);
        assert_eq!(count_at_start(&policy, Some(3)), 3);
        assert_eq!(count_at_start(&policy, Some(9)), 4);
        assert_eq!(count_at_start(&policy, Some(0)), 1);
    }

    #[test]
    fn saved_counts_round_trip_and_a_broken_file_is_no_counts() {
        let dir = std::env::temp_dir().join(format!("vigil-autoscale-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(saved_counts(&dir).is_empty());
        std::fs::write(dir.join(STATE_FILE), br#"{"api": 5}"#).unwrap();
        assert_eq!(saved_counts(&dir), BTreeMap::from([("api".to_string(), 5)]));
        std::fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        assert!(saved_counts(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
