//! The one path every action takes, whoever asks (a rule, the API, the broker's demand): the engine's
//! gate decides under a short lock, the executor takes the action and answers at once, and the outcome
//! is recorded (metrics, then the durable audit log) when the action ends. Each submission gets an id;
//! its decision can be awaited or looked up later, so the API answers at once (or within a short wait)
//! and a tick of the rules never waits for an action.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::alerting::Alerting;
use crate::audit::AuditLog;
use crate::engine::{Decision, Engine, Executor, Outcome, Refusal, Started};
use crate::metrics::EngineMetrics;
use crate::rules::{Action, ProposedAction};

/// Finished decisions kept for lookup by id.
const KEEP_FINISHED: usize = 1024;
/// Recorded decisions a subscriber may fall behind by before it must catch up from the audit log.
const BROADCAST_BUFFER: usize = 1024;

/// A record as the audit log holds it, with its sequence number: what subscribers see.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub seq: u64,
    pub record: Arc<serde_json::Value>,
}

/// A submitted action: its id, and its decision once final.
#[derive(Clone)]
pub struct Submitted {
    pub id: u64,
    decision: watch::Receiver<Option<Decision>>,
}

impl Submitted {
    /// The decision if it is final.
    pub fn decision(&self) -> Option<Decision> {
        self.decision.borrow().clone()
    }

    /// Waits at most `timeout` for the final decision.
    pub async fn wait(&mut self, timeout: Duration) -> Option<Decision> {
        if let Ok(Ok(d)) = tokio::time::timeout(timeout, self.decision.wait_for(Option::is_some)).await {
            return d.clone();
        }
        self.decision()
    }
}

/// What an action's id says about it.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Running { action: &'static str, instance_id: String },
    Finished(Decision),
}

struct Entry {
    action: &'static str,
    instance_id: String,
    decision: watch::Sender<Option<Decision>>,
}

/// Engine, executor and records.
pub struct Actions {
    engine: Mutex<Engine>,
    executor: Arc<dyn Executor>,
    audit: Arc<AuditLog>,
    metrics: EngineMetrics,
    started: Instant,
    ledger: Mutex<(u64, BTreeMap<u64, Entry>)>,
    recorded: broadcast::Sender<Recorded>,
    /// Where decisions' notifications go (`notify.receivers`); without it decisions are only audited.
    alerting: Option<Arc<Alerting>>,
    /// What `action: workflow` decisions start runs with, once attached.
    workflows: std::sync::OnceLock<Arc<dyn WorkflowStarter>>,
}

/// Starts the workflow an `action: workflow` proposal names, for its instance; answers the run's id or why
/// not. May block on the state database: called off the async workers.
pub trait WorkflowStarter: Send + Sync + 'static {
    fn start(&self, p: &ProposedAction) -> Result<u64, String>;
}

use vigil_core::time::unix_ms;

impl Actions {
    pub fn new(engine: Engine, executor: Arc<dyn Executor>, audit: Arc<AuditLog>) -> Arc<Actions> {
        Arc::new(Actions {
            engine: Mutex::new(engine),
            executor,
            audit,
            metrics: EngineMetrics::default(),
            started: Instant::now(),
            ledger: Mutex::new((0, BTreeMap::new())),
            recorded: broadcast::channel(BROADCAST_BUFFER).0,
            alerting: None,
            workflows: std::sync::OnceLock::new(),
        })
    }

    /// The same, sending each decision's notifications through `alerting`.
    pub fn with_alerting(
        engine: Engine,
        executor: Arc<dyn Executor>,
        audit: Arc<AuditLog>,
        alerting: Arc<Alerting>,
    ) -> Arc<Actions> {
        let mut actions = Arc::into_inner(Self::new(engine, executor, audit)).expect("not shared yet");
        actions.alerting = Some(alerting);
        Arc::new(actions)
    }

    pub fn alerting(&self) -> Option<&Arc<Alerting>> {
        self.alerting.as_ref()
    }

    /// Connects `action: workflow` decisions to the workflow runtime (once).
    pub fn attach_workflows(&self, starter: Arc<dyn WorkflowStarter>) {
        let _ = self.workflows.set(starter);
    }

    /// Every record appended to the audit log from now on, after it is durable. A subscriber that falls
    /// more than [`BROADCAST_BUFFER`] behind is told it lagged and reads the rest from the log.
    pub fn subscribe(&self) -> broadcast::Receiver<Recorded> {
        self.recorded.subscribe()
    }

    /// Tells subscribers of a record the audit log now holds as `seq` (for writers of the log other than
    /// [`Actions::submit`], such as the autoscaler's pins).
    pub fn publish(&self, seq: u64, record: &impl Serialize) {
        // Nobody listening is the common case: skip the encoding.
        if self.recorded.receiver_count() == 0 {
            return;
        }
        match serde_json::to_value(record) {
            Ok(v) => {
                let _ = self.recorded.send(Recorded { seq, record: Arc::new(v) });
            }
            Err(e) => tracing::warn!(error = %e, seq, "cannot announce a recorded decision"),
        }
    }

    /// The engine, for a moment: decisions and settings only; nothing may act while holding it.
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Monotonic time since start, the engine's clock.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// An action that no rule proposed (the API's, the broker's demand), audited under `rule`.
    pub fn proposal(&self, rule: &str, action: Action, service: &str, instance_id: &str) -> ProposedAction {
        ProposedAction {
            rule: Arc::from(rule),
            action,
            service: Arc::from(service),
            instance_id: Arc::from(instance_id),
            at: self.now(),
            held_for: Duration::ZERO,
            inputs: None,
            notify: Arc::default(),
            workflow: None,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, (u64, BTreeMap<u64, Entry>)> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status of a submitted action; `None` for an unknown (or long forgotten) id.
    pub fn status(&self, id: u64) -> Option<Status> {
        let ledger = self.ledger();
        let entry = ledger.1.get(&id)?;
        let decision = entry.decision.borrow().clone();
        Some(match decision {
            Some(d) => Status::Finished(d),
            None => Status::Running { action: entry.action, instance_id: entry.instance_id.clone() },
        })
    }

    /// Decides `p` and, when the gate admits it, hands it to the executor. Returns once the executor has
    /// taken or refused it; the outcome of a taken action is recorded when it ends.
    pub async fn submit(self: &Arc<Self>, mut p: ProposedAction) -> Submitted {
        let (tx, rx) = watch::channel(None);
        let id = {
            let mut ledger = self.ledger();
            ledger.0 += 1;
            let id = ledger.0;
            let entry =
                Entry { action: p.action.as_str(), instance_id: p.instance_id.to_string(), decision: tx };
            ledger.1.insert(id, entry);
            id
        };
        let submitted = Submitted { id, decision: rx };
        let now = SystemTime::now();
        let verdict = self.engine().admit(self.now(), &p, self.executor.as_ref());
        if let Err(outcome) = verdict {
            self.finish(id, &p, now, outcome).await;
            return submitted;
        }
        let began = Instant::now();
        let outcome_of = move |result: Result<(), String>| {
            let seconds = began.elapsed().as_secs_f64();
            match result {
                Ok(()) => Outcome::Succeeded { seconds },
                Err(error) => Outcome::Failed { seconds, error },
            }
        };
        // A notification is not done to the instance: it is the decision itself, sent with its record.
        if p.action == Action::Notify {
            self.finish(id, &p, now, outcome_of(Ok(()))).await;
            return submitted;
        }
        // Nor is a workflow: the decision starts a run, whose steps are audited as they end.
        if p.action == Action::Workflow {
            let result = match self.workflows.get().cloned() {
                None => Err("no workflow runtime runs here".to_string()),
                Some(starter) => {
                    let proposal = p.clone();
                    tokio::task::spawn_blocking(move || starter.start(&proposal))
                        .await
                        .unwrap_or_else(|e| Err(format!("starting the workflow panicked: {e}")))
                }
            };
            let name = p.workflow.as_deref().unwrap_or_default().to_string();
            let result = result.map(|run_id| {
                p.inputs = Some(Arc::new(serde_json::json!({ "workflow": name, "run_id": run_id })));
            });
            self.finish(id, &p, now, outcome_of(result)).await;
            return submitted;
        }
        match self.executor.start(p.action, &p.service, &p.instance_id).await {
            Started::Finished(result) => self.finish(id, &p, now, outcome_of(result)).await,
            Started::Busy => self.finish(id, &p, now, Outcome::Refused { reason: Refusal::InProgress }).await,
            Started::Running(running) => {
                let this = self.clone();
                tokio::spawn(async move {
                    let result = running.await;
                    this.finish(id, &p, now, outcome_of(result)).await;
                });
            }
        }
        submitted
    }

    /// Records the decision (metrics, the audit log off the async workers), then makes it visible: to its
    /// submitter and to subscribers.
    async fn finish(&self, id: u64, p: &ProposedAction, at: SystemTime, outcome: Outcome) {
        let decision = Decision {
            unix_ms: unix_ms(at),
            rule: p.rule.to_string(),
            action: p.action.as_str(),
            service: p.service.to_string(),
            instance_id: p.instance_id.to_string(),
            held_seconds: p.held_for.as_secs_f64(),
            inputs: p.inputs.as_deref().cloned(),
            outcome,
        };
        tracing::info!(rule = %decision.rule, action = decision.action, instance = %decision.instance_id,
            outcome = ?decision.outcome, "decision");
        self.metrics.record(&decision);
        let audit = self.audit.clone();
        let record = decision.clone();
        let alerting = self.alerting.clone();
        let rule = p.notify.clone();
        let recorded = tokio::task::spawn_blocking(move || match alerting {
            Some(a) => a.record(&record, &rule).map_err(|e| e.to_string()),
            None => audit.append(&record).map_err(|e| e.to_string()),
        });
        match recorded.await {
            Ok(Ok(seq)) => self.publish(seq, &decision),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record a decision (and its notifications)"),
            Err(e) => tracing::error!(error = %e, "the audit writer panicked"),
        }
        let mut ledger = self.ledger();
        if let Some(entry) = ledger.1.get(&id) {
            entry.decision.send_replace(Some(decision));
        }
        // Forget the oldest finished decisions beyond the bound; running ones stay.
        let finished: Vec<u64> =
            ledger.1.iter().filter(|(_, e)| e.decision.borrow().is_some()).map(|(id, _)| *id).collect();
        for old in finished.iter().take(finished.len().saturating_sub(KEEP_FINISHED)) {
            ledger.1.remove(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tokio::sync::oneshot;
    use vigil_core::snapshot::Snapshot;
    use vigil_core::snapshot::{Counters, InstanceKind, InstanceSnapshot, Memory, Pressure, Rates};

    use super::*;
    use crate::engine::{BoxFuture, Gate, GateConfig, MANUAL_RULE};
    use crate::rules::{Evaluator, InstanceState, Signal, Signals, check_str};

    /// Records every call; fails for instances named in `fail`; holds actions on instances in `hold`
    /// until released; reports `counts` for the standby fraction.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(Action, String)>>,
        fail: Vec<String>,
        counts: Option<(usize, usize)>,
        busy: Mutex<HashSet<String>>,
        release: Mutex<Vec<oneshot::Sender<()>>>,
        hold: bool,
    }

    impl Executor for Recorder {
        fn start<'a>(&'a self, action: Action, _: &'a str, id: &'a str) -> BoxFuture<'a, Started> {
            Box::pin(async move {
                if self.busy.lock().unwrap().contains(id) {
                    return Started::Busy;
                }
                self.calls.lock().unwrap().push((action, id.to_string()));
                if self.fail.iter().any(|f| f == id) {
                    return Started::Finished(Err(format!("cannot hibernate {id}: no such process")));
                }
                if !self.hold {
                    return Started::Finished(Ok(()));
                }
                self.busy.lock().unwrap().insert(id.to_string());
                let (tx, rx) = oneshot::channel();
                self.release.lock().unwrap().push(tx);
                Started::Running(Box::pin(async move { rx.await.map_err(|_| "dropped".to_string()) }))
            })
        }
        fn standby_counts(&self, _service: &str) -> Option<(usize, usize)> {
            self.counts
        }
        fn busy(&self, id: &str) -> bool {
            self.busy.lock().unwrap().contains(id)
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

    struct Fixture {
        actions: Arc<Actions>,
        exec: Arc<Recorder>,
        dir: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(tag: &str, gate: GateConfig, exec: Recorder) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vigil-actions-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let set = check_str(RULES, "test.yaml").expect("rules parse");
        let exec = Arc::new(exec);
        let engine = Engine::new(Evaluator::new(set.rules), Gate::new(gate));
        let audit = Arc::new(AuditLog::open(&dir).expect("audit"));
        Fixture { actions: Actions::new(engine, exec.clone(), audit), exec, dir }
    }

    /// Steps the rules every second from 0 to `secs` inclusive and submits what they propose; returns the
    /// final decisions.
    async fn run(fx: &Fixture, ids: &[&str], secs: u64) -> Vec<Decision> {
        let (snap, signals) = world(ids);
        let mut out = Vec::new();
        for s in 0..=secs {
            let proposals = fx.actions.engine().evaluate(Duration::from_secs(s), &snap, &signals);
            for p in proposals {
                let mut submitted = fx.actions.submit(p).await;
                out.push(submitted.wait(Duration::from_secs(5)).await.expect("final"));
            }
        }
        out
    }

    async fn manual(fx: &Fixture, action: Action, id: &str) -> Submitted {
        fx.actions.submit(fx.actions.proposal(MANUAL_RULE, action, "echo", id)).await
    }

    #[tokio::test]
    async fn executes_after_the_window_and_audits() {
        let fx = fixture("exec", GateConfig::default(), Recorder::default());
        let d = run(&fx, &["echo-0"], 12).await;
        assert_eq!(d.len(), 1);
        assert!(matches!(d[0].outcome, Outcome::Succeeded { .. }), "{d:?}");
        assert_eq!(d[0].held_seconds, 10.0);
        assert_eq!(*fx.exec.calls.lock().unwrap(), vec![(Action::Hibernate, "echo-0".to_string())]);
        let audited = fx.actions.audit().recent(10).unwrap();
        assert_eq!(audited.len(), 1);
        assert_eq!(audited[0].1["outcome"], "succeeded");
        assert_eq!(audited[0].1["instance_id"], "echo-0");
    }

    #[tokio::test]
    async fn dry_run_decides_and_records_but_never_executes() {
        let gate = GateConfig { dry_run: true, ..GateConfig::default() };
        let fx = fixture("dry", gate, Recorder::default());
        let d = run(&fx, &["echo-0", "echo-1"], 12).await;
        assert_eq!(
            d.iter().map(|d| &d.outcome).collect::<Vec<_>>(),
            vec![&Outcome::DryRun, &Outcome::DryRun]
        );
        assert!(fx.exec.calls.lock().unwrap().is_empty());
        assert_eq!(fx.actions.audit().recent(10).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn rate_limit_refuses_past_the_budget() {
        let gate = GateConfig { max_actions_per_minute: 1, ..GateConfig::default() };
        let fx = fixture("rate", gate, Recorder::default());
        let d = run(&fx, &["echo-0", "echo-1"], 12).await;
        assert!(matches!(d[0].outcome, Outcome::Succeeded { .. }));
        assert_eq!(d[1].outcome, Outcome::Refused { reason: Refusal::RateLimited });
        assert_eq!(fx.exec.calls.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn failures_are_recorded_with_the_error() {
        let fx = fixture(
            "fail",
            GateConfig::default(),
            Recorder { fail: vec!["echo-0".into()], ..Recorder::default() },
        );
        let d = run(&fx, &["echo-0"], 12).await;
        match &d[0].outcome {
            Outcome::Failed { error, .. } => assert_eq!(error, "cannot hibernate echo-0: no such process"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(
            fx.actions.audit().recent(1).unwrap()[0].1["error"],
            "cannot hibernate echo-0: no such process"
        );
    }

    #[tokio::test]
    async fn manual_actions_pass_the_gate_and_are_audited() {
        let gate = GateConfig { max_actions_per_minute: 1, ..GateConfig::default() };
        let fx = fixture("manual", gate, Recorder::default());
        let d = manual(&fx, Action::Wake, "echo-3").await.decision().expect("final at once");
        assert_eq!((d.rule.as_str(), d.action), (MANUAL_RULE, "wake"));
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }));
        let d = manual(&fx, Action::Wake, "echo-4").await.decision().expect("final at once");
        assert_eq!(d.outcome, Outcome::Refused { reason: Refusal::RateLimited });
        assert_eq!(fx.actions.audit().recent(10).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn standby_fraction_is_enforced_for_hibernation_only() {
        // 4 instances, 2 already in standby: a third would be 75 % > 50 %.
        let gate = GateConfig { max_standby_fraction: 0.5, ..GateConfig::default() };
        let fx = fixture("fraction", gate.clone(), Recorder { counts: Some((4, 2)), ..Recorder::default() });
        let d = manual(&fx, Action::Hibernate, "echo-2").await.decision().unwrap();
        assert_eq!(d.outcome, Outcome::Refused { reason: Refusal::StandbyFraction });
        let d = manual(&fx, Action::Wake, "echo-0").await.decision().unwrap();
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }), "waking is never limited: {d:?}");
        drop(fx);
        // 4 instances, 1 in standby: a second is exactly 50 %, allowed.
        let fx = fixture("fraction2", gate, Recorder { counts: Some((4, 1)), ..Recorder::default() });
        let d = manual(&fx, Action::Hibernate, "echo-1").await.decision().unwrap();
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }), "{d:?}");
    }

    #[tokio::test]
    async fn a_long_action_answers_at_once_and_a_second_one_is_refused_in_progress() {
        let fx = fixture("long", GateConfig::default(), Recorder { hold: true, ..Recorder::default() });
        let mut first = manual(&fx, Action::Hibernate, "echo-0").await;
        assert_eq!(first.decision(), None, "still running");
        assert_eq!(
            fx.actions.status(first.id),
            Some(Status::Running { action: "hibernate", instance_id: "echo-0".into() })
        );
        let second = manual(&fx, Action::Hibernate, "echo-0").await.decision().expect("refused at once");
        assert_eq!(second.outcome, Outcome::Refused { reason: Refusal::InProgress });
        // The rules keep deciding meanwhile.
        let (snap, signals) = world(&["echo-1"]);
        assert!(fx.actions.engine().evaluate(Duration::ZERO, &snap, &signals).is_empty());
        for tx in fx.exec.release.lock().unwrap().drain(..) {
            let _ = tx.send(());
        }
        let d = first.wait(Duration::from_secs(5)).await.expect("finished");
        assert!(matches!(d.outcome, Outcome::Succeeded { .. }), "{d:?}");
        assert!(matches!(fx.actions.status(first.id), Some(Status::Finished(_))));
        assert_eq!(fx.actions.audit().recent(10).unwrap().len(), 2);
    }
}
