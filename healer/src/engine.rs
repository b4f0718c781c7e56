//! The decision engine: one step per collector tick runs perception (a snapshot and the traffic signals)
//! through the rules, the safety gate and an [`Executor`], and records every decision and its outcome in
//! the [`AuditLog`]. Time is passed in, never read, so the whole step is tested with a recording fake
//! executor and hand-made snapshots; the same code drives the real standby executor and, later, Kubernetes.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vigil_collector::Snapshot;

use crate::audit::{AuditError, AuditLog};
use crate::metrics::EngineMetrics;
use crate::rules::{Action, Evaluator, ProposedAction, Signals};

/// The `rule` of decisions asked for by hand.
pub const MANUAL_RULE: &str = "manual";

/// Carries out actions on instances. Implementations must be idempotent: hibernating a hibernated instance
/// succeeds and changes nothing.
pub trait Executor: Send + Sync {
    fn execute(&self, action: Action, service: &str, instance_id: &str) -> Result<(), String>;

    /// `(instances, in standby or in transition)` of a service, for the gate's standby fraction; `None`
    /// where the executor cannot tell (the fraction is then not enforced).
    fn standby_counts(&self, _service: &str) -> Option<(usize, usize)> {
        None
    }
}

/// Limits applied to every proposal before it reaches an executor.
#[derive(Clone, Debug, PartialEq)]
pub struct GateConfig {
    /// Decide and record, but execute nothing.
    pub dry_run: bool,
    /// At most this many actions in any sliding minute, host-wide.
    pub max_actions_per_minute: usize,
    /// A hibernation is refused when it would put more than this fraction of a service's instances in
    /// standby or in transition (1.0 allows a service to go wholly to standby).
    pub max_standby_fraction: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self { dry_run: false, max_actions_per_minute: 30, max_standby_fraction: 1.0 }
    }
}

/// Why the gate refused a proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The host-wide action rate limit is used up.
    RateLimited,
    /// The instance already has an action in progress.
    InProgress,
    /// Hibernating it would exceed the service's standby fraction.
    StandbyFraction,
}

/// What became of one proposal.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    DryRun,
    Refused { reason: Refusal },
    Succeeded { seconds: f64 },
    Failed { seconds: f64, error: String },
}

/// One audited decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Wall-clock time of the decision, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub rule: String,
    pub action: &'static str,
    pub service: String,
    pub instance_id: String,
    /// How long the rule's conditions had held.
    pub held_seconds: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The safety gate's state: a sliding window of recent executions and the instances being acted on.
#[derive(Debug, Default)]
pub struct Gate {
    config: GateConfig,
    recent: VecDeque<Duration>,
    in_progress: HashSet<String>,
}

impl Gate {
    pub fn new(config: GateConfig) -> Self {
        Self { config, recent: VecDeque::new(), in_progress: HashSet::new() }
    }

    /// Admits a proposal at monotonic time `at`, or says why not. An admitted proposal counts against the
    /// rate limit and marks its instance busy until [`Gate::done`].
    pub fn admit(&mut self, at: Duration, instance_id: &str) -> Result<(), Refusal> {
        while self.recent.front().is_some_and(|t| at.saturating_sub(*t) >= Duration::from_secs(60)) {
            self.recent.pop_front();
        }
        if self.in_progress.contains(instance_id) {
            return Err(Refusal::InProgress);
        }
        if self.recent.len() >= self.config.max_actions_per_minute {
            return Err(Refusal::RateLimited);
        }
        self.recent.push_back(at);
        self.in_progress.insert(instance_id.to_string());
        Ok(())
    }

    pub fn done(&mut self, instance_id: &str) {
        self.in_progress.remove(instance_id);
    }

    pub fn dry_run(&self) -> bool {
        self.config.dry_run
    }

    pub fn set_dry_run(&mut self, on: bool) {
        self.config.dry_run = on;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("recording a decision: {0}")]
    Audit(#[from] AuditError),
}

/// Rules, gate, executor and audit log, stepped once per tick.
pub struct Engine<E: Executor> {
    evaluator: Evaluator,
    gate: Gate,
    executor: E,
    audit: Arc<AuditLog>,
    metrics: EngineMetrics,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl<E: Executor> Engine<E> {
    pub fn new(evaluator: Evaluator, gate: Gate, executor: E, audit: Arc<AuditLog>) -> Self {
        Self { evaluator, gate, executor, audit, metrics: EngineMetrics::default() }
    }

    /// One tick: evaluates the rules at monotonic time `at` (wall clock `now` for the audit) and acts.
    /// Every proposal ends in the audit log, whatever its outcome; actions run one after another so the
    /// gate's view stays exact.
    pub fn step(
        &mut self,
        at: Duration,
        now: SystemTime,
        snapshot: &Snapshot,
        signals: &Signals,
    ) -> Result<Vec<Decision>, EngineError> {
        let proposals = self.evaluator.observe(at, snapshot, signals);
        proposals.into_iter().map(|p| self.carry_out(at, now, p)).collect()
    }

    /// An action asked for by hand (API, `vigil ctl`): no rule, but the same gate, executor and audit.
    pub fn manual(
        &mut self,
        at: Duration,
        now: SystemTime,
        action: Action,
        service: &str,
        instance_id: &str,
    ) -> Result<Decision, EngineError> {
        self.act(MANUAL_RULE, at, now, action, service, instance_id)
    }

    /// An action asked for by another part of Vigil (the broker's demand), audited under `rule`. Passes the
    /// safety gate like every other.
    pub fn act(
        &mut self,
        rule: &str,
        at: Duration,
        now: SystemTime,
        action: Action,
        service: &str,
        instance_id: &str,
    ) -> Result<Decision, EngineError> {
        let p = ProposedAction {
            rule: Arc::from(rule),
            action,
            service: Arc::from(service),
            instance_id: Arc::from(instance_id),
            at,
            held_for: Duration::ZERO,
        };
        self.carry_out(at, now, p)
    }

    fn carry_out(
        &mut self,
        at: Duration,
        now: SystemTime,
        p: ProposedAction,
    ) -> Result<Decision, EngineError> {
        let outcome = self.decide(at, &p);
        let decision = Decision {
            unix_ms: unix_ms(now),
            rule: p.rule.to_string(),
            action: p.action.as_str(),
            service: p.service.to_string(),
            instance_id: p.instance_id.to_string(),
            held_seconds: p.held_for.as_secs_f64(),
            outcome,
        };
        self.metrics.record(&decision);
        self.audit.append(&decision)?;
        Ok(decision)
    }

    fn decide(&mut self, at: Duration, p: &ProposedAction) -> Outcome {
        if self.gate.dry_run() {
            return Outcome::DryRun;
        }
        if p.action == Action::Hibernate
            && let Some((total, standby)) = self.executor.standby_counts(&p.service)
            && (standby + 1) as f64 > self.gate.config.max_standby_fraction * total as f64
        {
            return Outcome::Refused { reason: Refusal::StandbyFraction };
        }
        if let Err(reason) = self.gate.admit(at, &p.instance_id) {
            return Outcome::Refused { reason };
        }
        let started = Instant::now();
        let result = self.executor.execute(p.action, &p.service, &p.instance_id);
        self.gate.done(&p.instance_id);
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => Outcome::Succeeded { seconds },
            Err(error) => Outcome::Failed { seconds, error },
        }
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// Turns dry-run mode on or off (decide and audit, execute nothing).
    pub fn set_dry_run(&mut self, on: bool) {
        self.gate.set_dry_run(on);
    }

    pub fn dry_run(&self) -> bool {
        self.gate.dry_run()
    }

    /// Puts new rules in force. Their windows start afresh; recent actions' cooldowns are forgotten too.
    pub fn replace_rules(&mut self, rules: Vec<crate::rules::Rule>) {
        self.evaluator = Evaluator::new(rules);
    }

    /// The engine's counters, for a metrics registry.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    pub fn executor(&self) -> &E {
        &self.executor
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vigil_collector::snapshot::{Counters, InstanceKind, InstanceSnapshot, Memory, Pressure, Rates};

    use super::*;
    use crate::rules::{InstanceState, Signal, check_str};

    /// Records every call; fails for instances named in `fail`; reports `counts` for the standby fraction.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<(Action, String)>>>,
        fail: Vec<String>,
        counts: Option<(usize, usize)>,
    }

    impl Executor for Recorder {
        fn execute(&self, action: Action, _service: &str, instance_id: &str) -> Result<(), String> {
            self.calls.lock().map_err(|e| e.to_string())?.push((action, instance_id.to_string()));
            if self.fail.iter().any(|f| f == instance_id) {
                return Err(format!("cannot hibernate {instance_id}: no such process"));
            }
            Ok(())
        }
        fn standby_counts(&self, _service: &str) -> Option<(usize, usize)> {
            self.counts
        }
    }

    const RULES: &str = "rules:\n  - name: idle\n    when:\n      - state: [active]\n      - metric: cpu_cores\n        below: 0.01\n      - metric: requests_per_s\n        at_most: 0\n    for: 10s\n    action: hibernate\n    cooldown: 1m\n";

    fn instance(id: &str) -> InstanceSnapshot {
        InstanceSnapshot {
            service: "echo".into(),
            instance_id: id.into(),
            kind: InstanceKind::Managed,
            cgroup: format!("/vigil/echo/{id}").into(),
            cgroup_id: Some(1),
            memcg_id: Some(1),
            counters: Counters::default(),
            rates: Rates { cpu_cores: 0.001, ..Rates::default() },
            memory: Memory::default(),
            pressure: Pressure::default(),
        }
    }

    fn world(ids: &[&str]) -> (Snapshot, Signals) {
        let mut snap = Snapshot::empty();
        let mut signals = Signals::new();
        for id in ids {
            snap.instances.push(instance(id));
            signals.set(id, Signal::RequestsPerS, 0.0);
            signals.set_state(id, InstanceState::Active);
        }
        (snap, signals)
    }

    fn engine(gate: GateConfig, exec: Recorder, dir: &Path) -> Engine<Recorder> {
        let set = check_str(RULES, "test.yaml").expect("rules parse");
        Engine::new(
            Evaluator::new(set.rules),
            Gate::new(gate),
            exec,
            Arc::new(AuditLog::open(dir).expect("audit")),
        )
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vigil-engine-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    use std::path::Path;

    /// Steps every second from 0 to `secs` inclusive; returns all decisions.
    fn run(e: &mut Engine<Recorder>, ids: &[&str], secs: u64) -> Vec<Decision> {
        let (snap, signals) = world(ids);
        (0..=secs)
            .flat_map(|s| e.step(Duration::from_secs(s), UNIX_EPOCH, &snap, &signals).expect("step"))
            .collect()
    }

    #[test]
    fn executes_after_the_window_and_audits() {
        let dir = temp_dir("exec");
        let exec = Recorder::default();
        let mut e = engine(GateConfig::default(), exec.clone(), &dir);
        let d = run(&mut e, &["echo-0"], 12);
        assert_eq!(d.len(), 1);
        assert!(matches!(d[0].outcome, Outcome::Succeeded { .. }), "{d:?}");
        assert_eq!(d[0].held_seconds, 10.0);
        assert_eq!(*exec.calls.lock().unwrap(), vec![(Action::Hibernate, "echo-0".to_string())]);
        let audited = e.audit().recent(10).unwrap();
        assert_eq!(audited.len(), 1);
        assert_eq!(audited[0].1["outcome"], "succeeded");
        assert_eq!(audited[0].1["instance_id"], "echo-0");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dry_run_decides_and_records_but_never_executes() {
        let dir = temp_dir("dry");
        let exec = Recorder::default();
        let mut e = engine(GateConfig { dry_run: true, ..GateConfig::default() }, exec.clone(), &dir);
        let d = run(&mut e, &["echo-0", "echo-1"], 12);
        assert_eq!(
            d.iter().map(|d| &d.outcome).collect::<Vec<_>>(),
            vec![&Outcome::DryRun, &Outcome::DryRun]
        );
        assert!(exec.calls.lock().unwrap().is_empty());
        assert_eq!(e.audit().recent(10).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limit_refuses_past_the_budget() {
        let dir = temp_dir("rate");
        let exec = Recorder::default();
        let mut e =
            engine(GateConfig { max_actions_per_minute: 1, ..GateConfig::default() }, exec.clone(), &dir);
        let d = run(&mut e, &["echo-0", "echo-1"], 12);
        let outcomes: Vec<_> = d.iter().map(|d| d.outcome.clone()).collect();
        assert!(matches!(outcomes[0], Outcome::Succeeded { .. }));
        assert_eq!(outcomes[1], Outcome::Refused { reason: Refusal::RateLimited });
        assert_eq!(exec.calls.lock().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failures_are_recorded_with_the_error() {
        let dir = temp_dir("fail");
        let exec = Recorder { fail: vec!["echo-0".into()], ..Recorder::default() };
        let mut e = engine(GateConfig::default(), exec, &dir);
        let d = run(&mut e, &["echo-0"], 12);
        match &d[0].outcome {
            Outcome::Failed { error, .. } => assert_eq!(error, "cannot hibernate echo-0: no such process"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(e.audit().recent(1).unwrap()[0].1["error"], "cannot hibernate echo-0: no such process");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn manual_actions_pass_the_gate_and_are_audited() {
        let dir = temp_dir("manual");
        let exec = Recorder::default();
        let mut e =
            engine(GateConfig { max_actions_per_minute: 1, ..GateConfig::default() }, exec.clone(), &dir);
        let d = e.manual(Duration::ZERO, UNIX_EPOCH, Action::Wake, "echo", "echo-3").unwrap();
        assert_eq!((d.rule.as_str(), d.action), (MANUAL_RULE, "wake"));
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }));
        let d = e.manual(Duration::from_secs(1), UNIX_EPOCH, Action::Wake, "echo", "echo-4").unwrap();
        assert_eq!(d.outcome, Outcome::Refused { reason: Refusal::RateLimited });
        assert_eq!(e.audit().recent(10).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn standby_fraction_is_enforced_for_hibernation_only() {
        let dir = temp_dir("fraction");
        // 4 instances, 2 already in standby: a third would be 75 % > 50 %.
        let exec = Recorder { counts: Some((4, 2)), ..Recorder::default() };
        let gate = GateConfig { max_standby_fraction: 0.5, ..GateConfig::default() };
        let mut e = engine(gate, exec.clone(), &dir);
        let d = e.manual(Duration::ZERO, UNIX_EPOCH, Action::Hibernate, "echo", "echo-2").unwrap();
        assert_eq!(d.outcome, Outcome::Refused { reason: Refusal::StandbyFraction });
        let d = e.manual(Duration::ZERO, UNIX_EPOCH, Action::Wake, "echo", "echo-0").unwrap();
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }), "waking is never limited: {d:?}");
        drop(e);
        // 4 instances, 1 in standby: a second is exactly 50 %, allowed.
        let exec = Recorder { counts: Some((4, 1)), ..Recorder::default() };
        let mut e = engine(gate_with_fraction(0.5), exec, &dir);
        let d = e.manual(Duration::ZERO, UNIX_EPOCH, Action::Hibernate, "echo", "echo-1").unwrap();
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }), "{d:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn gate_with_fraction(f: f64) -> GateConfig {
        GateConfig { max_standby_fraction: f, ..GateConfig::default() }
    }

    #[test]
    fn gate_window_slides() {
        let mut g = Gate::new(GateConfig { max_actions_per_minute: 2, ..GateConfig::default() });
        assert_eq!(g.admit(Duration::from_secs(0), "a"), Ok(()));
        assert_eq!(g.admit(Duration::from_secs(1), "a"), Err(Refusal::InProgress));
        g.done("a");
        assert_eq!(g.admit(Duration::from_secs(1), "b"), Ok(()));
        g.done("b");
        assert_eq!(g.admit(Duration::from_secs(30), "c"), Err(Refusal::RateLimited));
        assert_eq!(g.admit(Duration::from_secs(60), "c"), Ok(()), "the first action left the window");
    }

    #[test]
    fn audit_log_survives_reopening() {
        let dir = temp_dir("reopen");
        {
            let log = AuditLog::open(&dir).unwrap();
            assert_eq!(log.append(&serde_json::json!({"n": 1})).unwrap(), 1);
            assert_eq!(log.append(&serde_json::json!({"n": 2})).unwrap(), 2);
        }
        let log = AuditLog::open(&dir).unwrap();
        let recent = log.recent(10).unwrap();
        assert_eq!(
            recent.iter().map(|(k, v)| (*k, v["n"].as_u64().unwrap())).collect::<Vec<_>>(),
            vec![(2, 2), (1, 1)]
        );
        assert_eq!(log.append(&serde_json::json!({"n": 3})).unwrap(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
