//! The workflow runtime: starts runs (from triggers, rules and the API) under the storm limits, drives each
//! run's [`RunRecord`] through [`super::machine`] on a task of its own, and writes every transition to the
//! state database before acting on it.
//!
//! - Durability: a step's `running` state is committed before its action starts, and its end (with its
//!   audit record, its notifications and the cordons it placed) in one transaction after. At start,
//!   [`Runner::resume`] hands every unfinished run back to the machine ([`RunRecord::resume`]).
//! - Storm protection: at most `max_concurrent` runs execute at once (the others are `queued`, in order); a
//!   circuit breaker refuses new triggered runs while more than `breaker.max_fraction` of the host's devices
//!   had triggering faults within `breaker.window` (and at least `breaker.min_devices` did); each
//!   trigger key has its workflow's cooldown, kept across restarts.
//! - Steps with external effects go to a [`StepRunner`]; `approve` is the machine's, and `cordon`,
//!   `uncordon` and `notify` are the runtime's own: their whole effect is a write in the step's closing
//!   transaction, so they happen exactly once.
//! - Every step's end is audited as a decision: rule `workflow:NAME`, action = the step's kind, with
//!   `inputs` naming the run, the step, the attempt, the parameters and the output.
//!
//! No lock is held across an await: a run's record sits behind a std mutex taken for pure transitions and
//! the commit that follows them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use super::machine::{Next, RunRecord, RunState, StepState};
use super::store::{Cordon, Store, StoreError};
use super::{StepKind, Workflow};
use crate::audit::{AuditError, AuditLog};
use crate::engine::{BoxFuture, Decision, Outcome};
use crate::notify::{Notice, NoticeKind, NoticeStatus, Notifier, NotifyError};

/// What a step's action needs to know about its run.
#[derive(Clone, Debug)]
pub struct StepCtx {
    pub run_id: u64,
    pub workflow: Arc<str>,
    pub step: Arc<str>,
    pub attempt: u32,
    pub params: BTreeMap<String, String>,
    /// Plan only: describe what would be done, do nothing.
    pub dry_run: bool,
}

impl StepCtx {
    /// `text` with every `{name}` replaced by the run's parameter (and `{run_id}`, `{workflow}`); an
    /// unknown name stays as written (the file check refuses those).
    pub fn fill(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after.find('}') {
                Some(close) => {
                    let name = &after[..close];
                    match name {
                        "run_id" => out.push_str(&self.run_id.to_string()),
                        "workflow" => out.push_str(&self.workflow),
                        _ => match self.params.get(name) {
                            Some(v) => out.push_str(v),
                            None => {
                                out.push('{');
                                out.push_str(name);
                                out.push('}');
                            }
                        },
                    }
                    rest = &after[close + 1..];
                }
                None => {
                    out.push_str(&rest[open..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// The resource a cordon or an evacuation is about: the step's own, else the run's `device`, else
    /// `cpu{cpu}`.
    pub fn resource(&self, own: Option<&str>) -> Option<String> {
        own.map(|r| self.fill(r))
            .or_else(|| self.params.get("device").filter(|d| !d.is_empty()).cloned())
            .or_else(|| self.params.get("cpu").filter(|c| !c.is_empty()).map(|c| format!("cpu{c}")))
    }
}

/// Carries out the steps that act on the host: instances, CPUs, commands, waiting for conditions. Answers
/// with the step's output (recorded) or why it failed. Must not block the async workers.
pub trait StepRunner: Send + Sync + 'static {
    fn run(&self, ctx: StepCtx, kind: StepKind) -> BoxFuture<'static, Result<Value, String>>;

    /// What the step would do, for a dry run: nothing may change. By default its kind and parameters.
    fn plan(&self, ctx: StepCtx, kind: StepKind) -> BoxFuture<'static, Result<Value, String>> {
        let plan = json!({ "dry_run": true, "would": kind.as_str(), "params": ctx.params });
        Box::pin(async move { Ok(plan) })
    }

    /// The cordons in force (after a change, after a run ended, and once at [`Runner::resume`]): what
    /// instances may use and what may be routed to may have changed. Must not block.
    fn changed(&self, _cordons: &BTreeMap<String, Cordon>) {}
}

/// The storm limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_concurrent: usize,
    pub breaker_window: Duration,
    pub breaker_max_fraction: f64,
    pub breaker_min_devices: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent: 4,
            breaker_window: Duration::from_secs(300),
            breaker_max_fraction: 0.5,
            breaker_min_devices: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("no workflow {0:?} is configured")]
    UnknownWorkflow(String),
    #[error("no workflow run {0}")]
    UnknownRun(u64),
    #[error("run {id} is {state}: {what}")]
    Conflict { id: u64, state: &'static str, what: &'static str },
    #[error("{0:?} is not cordoned")]
    NotCordoned(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Notify(#[from] NotifyError),
}

/// Who asked for a run.
#[derive(Clone, Debug)]
pub struct StartRequest {
    pub workflow: String,
    pub params: BTreeMap<String, String>,
    /// `hardware`, `alert`, `rule`, `api`.
    pub source: String,
    pub reason: String,
    pub dry_run: bool,
    /// The trigger key its cooldown is kept under (`None` for runs asked by hand: no cooldown).
    pub cooldown_key: Option<String>,
    /// The device whose fault triggered it, for the breaker (`None`: not a hardware trigger).
    pub device: Option<String>,
}

/// The circuit breaker's memory: which devices triggered within the window.
#[derive(Debug, Default)]
struct Breaker {
    seen: VecDeque<(u64, String)>,
}

impl Breaker {
    /// Notes that `device` triggered at `now`; answers why new runs are refused, if they are.
    fn check(&mut self, device: &str, now: u64, known_devices: usize, limits: &Limits) -> Option<String> {
        let window = u64::try_from(limits.breaker_window.as_millis()).unwrap_or(u64::MAX);
        while self.seen.front().is_some_and(|(t, _)| now.saturating_sub(*t) > window) {
            self.seen.pop_front();
        }
        self.seen.retain(|(_, d)| d != device);
        self.seen.push_back((now, device.to_string()));
        let affected = self.seen.len();
        let total = known_devices.max(affected);
        let fraction = affected as f64 / total as f64;
        (affected >= limits.breaker_min_devices && fraction > limits.breaker_max_fraction).then(|| {
            format!(
                "circuit breaker open: {affected} of {total} devices ({:.0} %) had faults within {}, more than \
                 {:.0} %: no new runs until fewer do",
                fraction * 100.0,
                vigil_core::values::HumanDuration(limits.breaker_window),
                limits.breaker_max_fraction * 100.0
            )
        })
    }
}

/// A run in memory: its record (the durable one's copy) and a way to poke its task.
struct Live {
    record: Mutex<RunRecord>,
    poke: Notify,
}

type Labels = Vec<(&'static str, String)>;
type Counters =
    prometheus_client::metrics::family::Family<Labels, prometheus_client::metrics::counter::Counter>;
type Histograms = prometheus_client::metrics::family::Family<
    Labels,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

/// Metrics of the runs.
#[derive(Clone)]
pub struct RunMetrics {
    runs: Counters,
    steps: Histograms,
    refused: Counters,
}

fn step_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new([
        0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
    ])
}

impl RunMetrics {
    fn new() -> RunMetrics {
        RunMetrics {
            runs: Default::default(),
            steps: prometheus_client::metrics::family::Family::new_with_constructor(step_histogram),
            refused: Default::default(),
        }
    }

    /// A step ended after `took_ms`.
    fn step_ended(&self, workflow: &str, step: &super::machine::StepRecord, took_ms: u64) {
        self.steps
            .get_or_create(&vec![
                ("workflow", workflow.to_string()),
                ("step", step.name.clone()),
                ("kind", step.kind.clone()),
                ("state", step.state.as_str().to_string()),
            ])
            .observe(took_ms as f64 / 1000.0);
    }

    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "vigil_workflow_runs",
            "Workflow runs that ended, by workflow and state (succeeded, failed, cancelled)",
            self.runs.clone(),
        );
        registry.register(
            "vigil_workflow_step_duration_seconds",
            "Time from a workflow step's start to its end, by workflow, step, kind and state",
            self.steps.clone(),
        );
        registry.register(
            "vigil_workflow_runs_refused",
            "Workflow runs not started, by workflow and reason (breaker, cooldown)",
            self.refused.clone(),
        );
    }
}

struct Inner {
    workflows: RwLock<Arc<BTreeMap<String, Arc<Workflow>>>>,
    store: Store,
    audit: Arc<AuditLog>,
    notifier: Option<Notifier>,
    steps: Arc<dyn StepRunner>,
    limits: Limits,
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<u64, Arc<Live>>>,
    /// Each live run's task, to stop them all at shutdown.
    tasks: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_id: Mutex<u64>,
    breaker: Mutex<Breaker>,
    cooldowns: Mutex<BTreeMap<String, u64>>,
    cordons: RwLock<BTreeMap<String, Cordon>>,
    /// How many devices the host has, for the breaker.
    devices: Box<dyn Fn() -> usize + Send + Sync>,
    metrics: RunMetrics,
    now: fn() -> u64,
}

/// The workflow runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

/// A [`Runner`] that does not keep it alive, for what the runtime itself holds (its steps' host side holds
/// the actions, which start runs): a strong reference there would be a cycle, and the state database would
/// never close.
#[derive(Clone)]
pub struct WeakRunner(std::sync::Weak<Inner>);

impl WeakRunner {
    /// The runtime, while it exists.
    pub fn upgrade(&self) -> Option<Runner> {
        self.0.upgrade().map(|inner| Runner { inner })
    }
}

impl Runner {
    /// A runtime over the state database `audit` lives in. `devices` counts the host's devices (the
    /// breaker's denominator). Call [`Runner::resume`] once, on the runtime, to take up unfinished runs.
    pub fn new(
        workflows: Vec<Workflow>,
        audit: Arc<AuditLog>,
        notifier: Option<Notifier>,
        steps: Arc<dyn StepRunner>,
        limits: Limits,
        devices: Box<dyn Fn() -> usize + Send + Sync>,
    ) -> Result<Runner, RunnerError> {
        let store = Store::new(audit.database());
        let next_id = store.next_id()?;
        let cooldowns = store.cooldowns()?;
        let cordons = store.cordons()?;
        Ok(Runner {
            inner: Arc::new(Inner {
                workflows: RwLock::new(Arc::new(by_name(workflows))),
                store,
                audit,
                notifier,
                steps,
                slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
                limits,
                live: Mutex::new(HashMap::new()),
                tasks: Mutex::new(HashMap::new()),
                next_id: Mutex::new(next_id),
                breaker: Mutex::new(Breaker::default()),
                cooldowns: Mutex::new(cooldowns),
                cordons: RwLock::new(cordons),
                devices,
                metrics: RunMetrics::new(),
                now: vigil_core::time::now_unix_ms,
            }),
        })
    }

    pub fn metrics(&self) -> &RunMetrics {
        &self.inner.metrics
    }

    pub fn downgrade(&self) -> WeakRunner {
        WeakRunner(Arc::downgrade(&self.inner))
    }

    /// Replaces the workflows in force (a reload). Runs under way keep going if their workflow still fits
    /// them; one whose workflow is gone or changed fails at its next transition, saying so.
    pub fn set_workflows(&self, workflows: Vec<Workflow>) {
        if let Ok(mut w) = self.inner.workflows.write() {
            *w = Arc::new(by_name(workflows));
        }
        for live in self.lives() {
            live.poke.notify_one();
        }
    }

    pub fn workflows(&self) -> Arc<BTreeMap<String, Arc<Workflow>>> {
        self.inner.workflows.read().map(|w| w.clone()).unwrap_or_default()
    }

    fn lives(&self) -> Vec<Arc<Live>> {
        self.inner.live.lock().map(|l| l.values().cloned().collect()).unwrap_or_default()
    }

    /// The resources cordoned now, with the run that cordoned each.
    pub fn cordons(&self) -> BTreeMap<String, Cordon> {
        self.inner.cordons.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// Whether `resource` (a device such as `loop3`, or `cpuN`) is cordoned.
    pub fn cordoned(&self, resource: &str) -> bool {
        self.inner.cordons.read().is_ok_and(|c| c.contains_key(resource))
    }

    /// Whether run `id` still holds what it took (the instances it drained): it has not ended, or a
    /// cordon it placed is in force.
    pub fn holds(&self, id: u64) -> bool {
        let live = self.inner.live.lock().ok().and_then(|l| l.get(&id).cloned());
        if live.is_some_and(|l| l.record.lock().is_ok_and(|r| !r.state.ended())) {
            return true;
        }
        self.inner.cordons.read().is_ok_and(|c| c.values().any(|c| c.run_id == id))
    }

    /// Takes up every run that had not ended when Vigil stopped. Needs the tokio runtime.
    pub fn resume(&self) -> Result<usize, RunnerError> {
        self.inner.steps.changed(&self.cordons());
        let runs = self.inner.store.unfinished()?;
        let n = runs.len();
        for mut run in runs {
            let now = (self.inner.now)();
            if let Some(wf) = self.workflows().get(&run.workflow).cloned()
                && run.fits(&wf)
            {
                run.resume(&wf, now);
            }
            let tx_run = run.clone();
            self.inner.commit(&tx_run, None, |_| Ok(()))?;
            tracing::info!(run = run.id, workflow = %run.workflow, state = run.state.as_str(), "workflow run resumed");
            self.spawn(run);
        }
        Ok(n)
    }

    /// Starts a run (or, refused by the breaker or a cooldown, says why). Blocking on the database: call
    /// it off the async workers or accept a short commit.
    pub fn start(&self, req: StartRequest) -> Result<RunRecord, RunnerError> {
        let inner = &self.inner;
        let wf = self
            .workflows()
            .get(&req.workflow)
            .cloned()
            .ok_or_else(|| RunnerError::UnknownWorkflow(req.workflow.clone()))?;
        let now = (inner.now)();
        if let Some(key) = &req.cooldown_key {
            let last = inner.cooldowns.lock().ok().and_then(|c| c.get(key).copied());
            let cooldown = u64::try_from(wf.cooldown.as_millis()).unwrap_or(u64::MAX);
            if let Some(last) = last.filter(|&t| now.saturating_sub(t) < cooldown) {
                inner.refused(&wf.name, "cooldown");
                return Err(RunnerError::Refused(format!(
                    "workflow {:?} is in its cooldown for {key:?} ({} since the last run, cooldown {})",
                    wf.name,
                    vigil_core::values::HumanDuration(Duration::from_millis(now.saturating_sub(last))),
                    vigil_core::values::HumanDuration(wf.cooldown)
                )));
            }
        }
        if let Some(device) = &req.device {
            let known = (inner.devices)();
            let open = inner.breaker.lock().ok().and_then(|mut b| b.check(device, now, known, &inner.limits));
            if let Some(why) = open {
                inner.refused(&wf.name, "breaker");
                let refusal = Decision {
                    unix_ms: now,
                    rule: format!("workflow:{}", wf.name),
                    action: "workflow",
                    service: req.params.get("service").cloned().unwrap_or_default(),
                    instance_id: device.clone(),
                    held_seconds: 0.0,
                    inputs: Some(json!({"params": req.params, "source": req.source, "reason": req.reason})),
                    outcome: Outcome::Failed { seconds: 0.0, error: why.clone() },
                };
                inner.audit.append(&refusal)?;
                tracing::warn!(workflow = %wf.name, device = %device, "{why}");
                return Err(RunnerError::Refused(why));
            }
        }
        let mut params = wf.params.clone();
        params.extend(req.params.clone());
        let id = {
            let mut next = inner.next_id.lock().map_err(|_| RunnerError::Refused("poisoned".into()))?;
            let id = *next;
            *next += 1;
            id
        };
        let mut run = RunRecord::new(id, &wf, params, &req.source, &req.reason, req.dry_run, now);
        run.state = RunState::Queued;
        let key = req.cooldown_key.clone();
        inner.commit(&run, None, |tx| match &key {
            Some(k) => Ok(Store::set_cooldown(tx, k, now)?),
            None => Ok(()),
        })?;
        if let (Some(k), Ok(mut c)) = (key, inner.cooldowns.lock()) {
            c.insert(k, now);
        }
        inner.announce(&wf, &run, "started");
        tracing::info!(run = id, workflow = %wf.name, source = %req.source, reason = %req.reason, "workflow run started");
        self.spawn(run.clone());
        Ok(run)
    }

    /// A run by id: live or from the store.
    pub fn get(&self, id: u64) -> Result<RunRecord, RunnerError> {
        if let Some(live) = self.inner.live.lock().ok().and_then(|l| l.get(&id).cloned())
            && let Ok(r) = live.record.lock()
        {
            return Ok(r.clone());
        }
        self.inner.store.get(id)?.ok_or(RunnerError::UnknownRun(id))
    }

    /// The newest `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, RunnerError> {
        let mut runs = self.inner.store.recent(limit)?;
        for r in &mut runs {
            if let Some(live) = self.inner.live.lock().ok().and_then(|l| l.get(&r.id).cloned())
                && let Ok(rec) = live.record.lock()
            {
                *r = rec.clone();
            }
        }
        Ok(runs)
    }

    /// A person approves run `id`: its waiting `approve` steps succeed, an interrupted step runs again.
    pub fn approve(&self, id: u64) -> Result<RunRecord, RunnerError> {
        self.act_on(id, "approve", "has nothing waiting for approval", |r, now| r.approve(now))
    }

    /// A person cancels run `id`.
    pub fn cancel(&self, id: u64) -> Result<RunRecord, RunnerError> {
        self.act_on(id, "cancel", "has already ended", |r, now| r.cancel("cancelled by a person", now))
    }

    /// A person lifts the cordon on `resource` (e.g. after the run that placed it failed): audited as a
    /// decision of the run's workflow (`workflow:NAME`, action `uncordon`). Refused while that run is still
    /// under way: it may lift the cordon itself, and needs it until then (cancel it first).
    pub fn uncordon(&self, resource: &str, reason: &str) -> Result<Cordon, RunnerError> {
        let inner = &self.inner;
        let cordon =
            self.cordons().get(resource).cloned().ok_or_else(|| RunnerError::NotCordoned(resource.into()))?;
        let live = inner.live.lock().ok().and_then(|l| l.get(&cordon.run_id).cloned());
        if let Some(state) = live.and_then(|l| l.record.lock().ok().map(|r| r.state)).filter(|s| !s.ended()) {
            return Err(RunnerError::Conflict {
                id: cordon.run_id,
                state: state.as_str(),
                what: "it placed this cordon and is still under way: cancel it first",
            });
        }
        let workflow = inner.store.get(cordon.run_id)?.map(|r| r.workflow).unwrap_or_default();
        let now = (inner.now)();
        let decision = Decision {
            unix_ms: now,
            rule: format!("workflow:{workflow}"),
            action: "uncordon",
            service: String::new(),
            instance_id: resource.to_string(),
            held_seconds: now.saturating_sub(cordon.since_ms) as f64 / 1000.0,
            inputs: Some(json!({ "run_id": cordon.run_id, "by": "api", "reason": reason })),
            outcome: Outcome::Succeeded { seconds: 0.0 },
        };
        inner.audit.append_with(&decision, |tx, _| -> Result<(), RunnerError> {
            Ok(Store::set_cordon(tx, resource, None)?)
        })?;
        let now = match inner.cordons.write() {
            Ok(mut cordons) => {
                cordons.remove(resource);
                cordons.clone()
            }
            Err(_) => return Ok(cordon),
        };
        tracing::info!(resource, run = cordon.run_id, reason, "cordon lifted by a person");
        inner.steps.changed(&now);
        Ok(cordon)
    }

    /// Applies a person's `action` (audited as a decision of rule `workflow:NAME`) to a live run.
    fn act_on(
        &self,
        id: u64,
        action: &'static str,
        what: &'static str,
        f: impl FnOnce(&mut RunRecord, u64) -> bool,
    ) -> Result<RunRecord, RunnerError> {
        let live = self.inner.live.lock().ok().and_then(|l| l.get(&id).cloned());
        let Some(live) = live else {
            let stored = self.inner.store.get(id)?.ok_or(RunnerError::UnknownRun(id))?;
            return Err(RunnerError::Conflict { id, state: stored.state.as_str(), what });
        };
        let now = (self.inner.now)();
        let out = {
            let mut rec = live.record.lock().map_err(|_| RunnerError::UnknownRun(id))?;
            let before = rec.clone();
            if !f(&mut rec, now) {
                return Err(RunnerError::Conflict { id, state: rec.state.as_str(), what });
            }
            let decision = Decision {
                unix_ms: now,
                rule: format!("workflow:{}", rec.workflow),
                action,
                service: rec.params.get("service").cloned().unwrap_or_default(),
                instance_id: rec
                    .params
                    .get("instance_id")
                    .or_else(|| rec.params.get("device"))
                    .cloned()
                    .unwrap_or_default(),
                held_seconds: 0.0,
                inputs: Some(json!({ "run_id": id, "by": "api" })),
                outcome: Outcome::Succeeded { seconds: 0.0 },
            };
            if let Err(e) = self.inner.commit(&rec, Some(&decision), |_| Ok(())) {
                *rec = before;
                return Err(e);
            }
            // The steps a person ended (approvals) count in the step durations like the others.
            for (was, step) in before.steps.iter().zip(&rec.steps) {
                if was.state != step.state && step.state == StepState::Succeeded {
                    let took = step.ended_ms.unwrap_or(now).saturating_sub(step.started_ms.unwrap_or(now));
                    self.inner.metrics.step_ended(&rec.workflow, step, took);
                }
            }
            rec.clone()
        };
        live.poke.notify_one();
        Ok(out)
    }

    fn spawn(&self, run: RunRecord) {
        let id = run.id;
        let live = Arc::new(Live { record: Mutex::new(run), poke: Notify::new() });
        if let Ok(mut l) = self.inner.live.lock() {
            l.insert(id, live.clone());
        }
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            drive(inner.clone(), live).await;
            if let Ok(mut l) = inner.live.lock() {
                l.remove(&id);
            }
            if let Ok(mut t) = inner.tasks.lock() {
                t.remove(&id);
            }
        });
        if let Ok(mut t) = self.inner.tasks.lock()
            && !task.is_finished()
        {
            t.insert(id, task.abort_handle());
        }
    }

    /// Stops every run's task where it is (Vigil is stopping): the runs stay recorded as they were, and
    /// the next start takes them up like after a crash (a step cut off that is not idempotent waits for a
    /// person). Their commands are killed with them.
    pub fn stop(&self) {
        let tasks: Vec<_> =
            self.inner.tasks.lock().map(|mut t| t.drain().map(|(_, h)| h).collect()).unwrap_or_default();
        for t in tasks {
            t.abort();
        }
        if let Ok(mut l) = self.inner.live.lock() {
            l.clear();
        }
    }
}

fn by_name(workflows: Vec<Workflow>) -> BTreeMap<String, Arc<Workflow>> {
    workflows.into_iter().map(|w| (w.name.to_string(), Arc::new(w))).collect()
}

/// What a step's closing commit also writes.
enum Effect {
    None,
    Cordon(String, Option<Cordon>),
    Notices(Vec<(String, Notice)>),
}

impl Inner {
    fn refused(&self, workflow: &str, why: &str) {
        self.metrics
            .refused
            .get_or_create(&vec![("workflow", workflow.to_string()), ("reason", why.to_string())])
            .inc();
    }

    /// Writes `run` (and, with `audited`, its audit record) and whatever `also` writes, in one
    /// transaction.
    fn commit(
        &self,
        run: &RunRecord,
        audited: Option<&Decision>,
        also: impl FnOnce(&redb::WriteTransaction) -> Result<(), RunnerError>,
    ) -> Result<(), RunnerError> {
        match audited {
            Some(d) => {
                self.audit.append_with(d, |tx, _| -> Result<(), RunnerError> {
                    Store::put(tx, run)?;
                    also(tx)?;
                    Ok(())
                })?;
            }
            None => {
                let db = self.audit.database();
                let tx = db.begin_write().map_err(|e| StoreError::Db(Box::new(e.into())))?;
                Store::put(&tx, run)?;
                also(&tx)?;
                tx.commit().map_err(|e| StoreError::Db(Box::new(e.into())))?;
            }
        }
        Ok(())
    }

    /// The receivers a run's own news (started, waiting, ended) goes to.
    fn announce(&self, wf: &Workflow, run: &RunRecord, what: &str) {
        let Some(notifier) = &self.notifier else { return };
        if wf.notify.is_empty() {
            return;
        }
        let notice = run_notice(wf, run, what, None, (self.now)());
        let items: Vec<(String, Notice)> =
            wf.notify.iter().map(|r| (r.to_string(), notice.clone())).collect();
        if let Err(e) = notifier.enqueue(&items) {
            tracing::warn!(run = run.id, "workflow notification not queued: {e}");
        }
    }
}

/// A notice about a run (its start, a wait for a person, its end) or from a `notify` step (`message`).
fn run_notice(wf: &Workflow, run: &RunRecord, what: &str, message: Option<&str>, now: u64) -> Notice {
    let mut labels = BTreeMap::from([
        ("alertname".to_string(), format!("workflow:{}", wf.name)),
        ("workflow".to_string(), wf.name.to_string()),
        ("run_id".to_string(), run.id.to_string()),
        ("event".to_string(), what.to_string()),
        ("severity".to_string(), if what == "failed" { "critical" } else { "warning" }.to_string()),
    ]);
    for key in ["device", "service", "instance_id", "cpu"] {
        if let Some(v) = run.params.get(key).filter(|v| !v.is_empty()) {
            labels.insert(key.to_string(), v.clone());
        }
    }
    let summary = match message {
        Some(m) => m.to_string(),
        None => match what {
            "started" => format!("workflow {} run {} started: {}", wf.name, run.id, run.reason),
            "waiting" => format!(
                "workflow {} run {} waits for a person: {}",
                wf.name,
                run.id,
                run.message.as_deref().unwrap_or("")
            ),
            _ => format!(
                "workflow {} run {} {what}{}",
                wf.name,
                run.id,
                run.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
            ),
        },
    };
    Notice {
        status: NoticeStatus::Firing,
        kind: NoticeKind::Decision,
        labels,
        annotations: BTreeMap::from([
            ("summary".to_string(), summary),
            ("run".to_string(), serde_json::to_string(run).unwrap_or_default()),
        ]),
        starts_at_ms: now,
        ends_at_ms: Some(now.saturating_add(crate::notify::EVENT_LASTS_MS)),
        created_ms: now,
    }
}

/// The audit record of step `i`'s end.
fn step_decision(run: &RunRecord, wf: &Workflow, i: usize, now: u64) -> Decision {
    let rec = &run.steps[i];
    let seconds = rec.started_ms.map_or(0.0, |s| now.saturating_sub(s) as f64 / 1000.0);
    let outcome = if run.dry_run {
        Outcome::DryRun
    } else {
        match rec.state {
            StepState::Succeeded => Outcome::Succeeded { seconds },
            _ => Outcome::Failed {
                seconds,
                error: rec.error.clone().unwrap_or_else(|| rec.state.as_str().into()),
            },
        }
    };
    Decision {
        unix_ms: now,
        rule: format!("workflow:{}", wf.name),
        action: wf.steps[i].kind.as_str(),
        service: run.params.get("service").cloned().unwrap_or_default(),
        instance_id: run
            .params
            .get("instance_id")
            .or_else(|| run.params.get("device"))
            .cloned()
            .unwrap_or_default(),
        held_seconds: 0.0,
        inputs: Some(json!({
            "run_id": run.id,
            "step": rec.name,
            "state": rec.state.as_str(),
            "attempt": rec.attempt,
            "params": run.params,
            "output": rec.output,
        })),
        outcome,
    }
}

fn ctx_of(run: &RunRecord, wf: &Workflow, i: usize) -> StepCtx {
    StepCtx {
        run_id: run.id,
        workflow: wf.name.clone(),
        step: wf.steps[i].name.clone(),
        attempt: run.steps[i].attempt,
        params: run.params.clone(),
        dry_run: run.dry_run,
    }
}

/// The runtime's own steps: their effect is a write in the step's closing transaction.
fn own_effect(inner: &Inner, ctx: &StepCtx, kind: &StepKind) -> Option<Result<(Value, Effect), String>> {
    let resource = |own: &Option<Arc<str>>| {
        ctx.resource(own.as_deref()).ok_or_else(|| {
            "no resource: the step names none and the run has no `device` or `cpu` parameter".to_string()
        })
    };
    Some(match kind {
        StepKind::Cordon { resource: own } => resource(own).map(|r| {
            let out = json!({ "cordoned": r, "dry_run": ctx.dry_run });
            if ctx.dry_run {
                return (out, Effect::None);
            }
            let c = Cordon {
                run_id: ctx.run_id,
                since_ms: (inner.now)(),
                reason: format!("workflow {} run {}", ctx.workflow, ctx.run_id),
            };
            (out, Effect::Cordon(r, Some(c)))
        }),
        StepKind::Uncordon { resource: own } => resource(own).map(|r| {
            let out = json!({ "uncordoned": r, "dry_run": ctx.dry_run });
            if ctx.dry_run { (out, Effect::None) } else { (out, Effect::Cordon(r, None)) }
        }),
        StepKind::Notify { receivers, message, labels } => {
            let text = ctx.fill(message);
            let named: Vec<String> = receivers.iter().map(|r| ctx.fill(r)).collect();
            let out = json!({ "receivers": named, "message": text, "dry_run": ctx.dry_run });
            if ctx.dry_run || inner.notifier.is_none() {
                return Some(Ok((out, Effect::None)));
            }
            let wf = inner.workflows.read().ok().and_then(|w| w.get(&*ctx.workflow).cloned());
            let Some(wf) = wf else { return Some(Err("the workflow is no longer configured".into())) };
            let to: Vec<String> =
                if named.is_empty() { wf.notify.iter().map(|r| r.to_string()).collect() } else { named };
            let mut run = RunRecord::new(ctx.run_id, &wf, ctx.params.clone(), "", "", false, 0);
            run.steps.clear();
            let mut notice = run_notice(&wf, &run, "notify", Some(&text), (inner.now)());
            notice.annotations.remove("run");
            for (k, v) in labels {
                notice.labels.entry(k.clone()).or_insert_with(|| ctx.fill(v));
            }
            Ok((
                json!({ "receivers": to, "message": text }),
                Effect::Notices(to.into_iter().map(|r| (r, notice.clone())).collect()),
            ))
        }
        _ => return None,
    })
}

/// One run's task: asks the machine what to do, does it, records what happened, until the run ends.
async fn drive(inner: Arc<Inner>, live: Arc<Live>) {
    let queued = live.record.lock().is_ok_and(|r| r.state == RunState::Queued);
    let _permit = match inner.slots.clone().acquire_owned().await {
        Ok(p) => p,
        Err(_) => return,
    };
    if queued {
        let started = live.record.lock().ok().map(|mut r| {
            if r.state == RunState::Queued {
                r.state = RunState::Running;
            }
            r.clone()
        });
        if let Some(r) = started
            && let Err(e) = inner.commit(&r, None, |_| Ok(()))
        {
            tracing::error!(run = r.id, "workflow run not recorded: {e}");
        }
    }
    let mut tasks: JoinSet<(usize, Result<Value, String>)> = JoinSet::new();
    let mut handles: HashMap<usize, tokio::task::AbortHandle> = HashMap::new();
    let mut announced_wait = false;
    loop {
        let now = (inner.now)();
        let wf = {
            let name = live.record.lock().map(|r| r.workflow.clone()).unwrap_or_default();
            inner.workflows.read().ok().and_then(|w| w.get(&name).cloned())
        };
        // The machine's decision and its commit, under the run's lock.
        let decided = {
            let Ok(mut rec) = live.record.lock() else { return };
            let fits = wf.as_ref().is_some_and(|w| rec.fits(w));
            if !fits && !rec.state.ended() {
                let why = match &wf {
                    None => "its workflow is no longer configured",
                    Some(_) => "its workflow was changed while it ran (the steps differ)",
                };
                rec.cancel(&format!("stopped: {why}"), now);
                rec.state = RunState::Failed;
            }
            let next = match &wf {
                Some(w) if fits => rec.next(w, now),
                _ => Next::Done,
            };
            let mut begun = Vec::new();
            if let (Next::Start(ready), Some(w)) = (&next, &wf) {
                for &i in ready {
                    rec.begin(w, i, now);
                    begun.push((i, rec.steps[i].state, ctx_of(&rec, w, i)));
                }
            }
            if let Err(e) = inner.commit(&rec, None, |_| Ok(())) {
                // Acting on a step that is not recorded as running would break the promise of no repeat.
                tracing::error!(run = rec.id, "workflow run not recorded, it stops here: {e}");
                return;
            }
            (next, begun, rec.clone())
        };
        let (next, begun, snapshot) = decided;
        let Some(wf) = wf else {
            finish_run(&inner, None, &snapshot);
            return;
        };
        if snapshot.state == RunState::Waiting && !announced_wait {
            announced_wait = true;
            inner.announce(&wf, &snapshot, "waiting");
        } else if snapshot.state != RunState::Waiting {
            announced_wait = false;
        }
        if snapshot.state == RunState::Cancelled {
            for (_, h) in handles.drain() {
                h.abort();
            }
        }
        match next {
            Next::Done => {
                finish_run(&inner, Some(&wf), &snapshot);
                return;
            }
            Next::Start(_) => {
                for (i, state, ctx) in begun {
                    if state != StepState::Running {
                        continue;
                    }
                    let step = wf.steps[i].clone();
                    if let Some(result) = own_effect(&inner, &ctx, &step.kind) {
                        record_end(&inner, &live, &wf, i, result);
                        continue;
                    }
                    let fut = if ctx.dry_run {
                        inner.steps.plan(ctx, step.kind.clone())
                    } else {
                        inner.steps.run(ctx, step.kind.clone())
                    };
                    let limit = step.timeout;
                    let h = tasks.spawn(async move {
                        let result = match limit {
                            Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
                                Err(format!("timed out after {}", vigil_core::values::HumanDuration(t)))
                            }),
                            None => fut.await,
                        };
                        (i, result)
                    });
                    handles.insert(i, h);
                }
            }
            Next::WakeAt(at) => {
                let wait = Duration::from_millis(at.saturating_sub((inner.now)()));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = live.poke.notified() => {}
                    Some(joined) = tasks.join_next(), if !tasks.is_empty() => ended(&inner, &live, &wf, &mut handles, joined),
                }
            }
            Next::Wait => {
                tokio::select! {
                    () = live.poke.notified() => {}
                    Some(joined) = tasks.join_next(), if !tasks.is_empty() => ended(&inner, &live, &wf, &mut handles, joined),
                }
            }
        }
    }
}

fn ended(
    inner: &Inner,
    live: &Live,
    wf: &Workflow,
    handles: &mut HashMap<usize, tokio::task::AbortHandle>,
    joined: Result<(usize, Result<Value, String>), tokio::task::JoinError>,
) {
    match joined {
        Ok((i, result)) => {
            handles.remove(&i);
            record_end(inner, live, wf, i, result.map(|v| (v, Effect::None)));
        }
        // Aborted by a cancel (the record says so already), or a panic in a step: find which.
        Err(e) => {
            let id = e.id();
            let which = handles.iter().find(|(_, h)| h.id() == id).map(|(&i, _)| i);
            if let Some(i) = which {
                handles.remove(&i);
                if e.is_panic() {
                    record_end(inner, live, wf, i, Err("the step's action panicked".into()));
                }
            }
        }
    }
}

/// Records step `i`'s end (with its effect) in one transaction.
fn record_end(inner: &Inner, live: &Live, wf: &Workflow, i: usize, result: Result<(Value, Effect), String>) {
    let now = (inner.now)();
    let Ok(mut rec) = live.record.lock() else { return };
    if rec.steps[i].state != StepState::Running {
        return;
    }
    let before = rec.clone();
    let (result, effect) = match result {
        Ok((v, effect)) => (Ok(v), effect),
        Err(e) => (Err(e), Effect::None),
    };
    rec.finish(wf, i, result, now);
    let decision = step_decision(&rec, wf, i, now);
    let started = rec.steps[i].started_ms.unwrap_or(now);
    let committed = inner.commit(&rec, Some(&decision), |tx| match &effect {
        Effect::None => Ok(()),
        Effect::Cordon(r, c) => Ok(Store::set_cordon(tx, r, c.as_ref())?),
        Effect::Notices(items) => {
            if let Some(n) = &inner.notifier {
                for (receiver, notice) in items {
                    n.enqueue_in(tx, receiver, notice)?;
                }
            }
            Ok(())
        }
    });
    match committed {
        Ok(()) => {
            if let (Effect::Notices(_), Some(n)) = (&effect, &inner.notifier) {
                n.wake();
            }
            if let Effect::Cordon(r, c) = effect
                && let Ok(mut cordons) = inner.cordons.write()
            {
                match c {
                    Some(c) => cordons.insert(r, c),
                    None => cordons.remove(&r),
                };
                let now = cordons.clone();
                drop(cordons);
                inner.steps.changed(&now);
            }
            inner.metrics.step_ended(&wf.name, &rec.steps[i], now.saturating_sub(started));
            tracing::info!(
                run = rec.id,
                workflow = %wf.name,
                step = %wf.steps[i].name,
                state = rec.steps[i].state.as_str(),
                error = rec.steps[i].error.as_deref().unwrap_or(""),
                "workflow step ended"
            );
        }
        Err(e) => {
            tracing::error!(run = rec.id, "workflow step end not recorded; the run stops here: {e}");
            *rec = before;
        }
    }
}

fn finish_run(inner: &Inner, wf: Option<&Workflow>, run: &RunRecord) {
    let state = run.state.as_str();
    inner
        .metrics
        .runs
        .get_or_create(&vec![("workflow", run.workflow.clone()), ("state", state.to_string())])
        .inc();
    tracing::info!(run = run.id, workflow = %run.workflow, state, message = run.message.as_deref().unwrap_or(""), "workflow run ended");
    if let Some(wf) = wf {
        inner.announce(wf, run, state);
    }
    let cordons = inner.cordons.read().map(|c| c.clone()).unwrap_or_default();
    inner.steps.changed(&cordons);
}

#[cfg(test)]
mod tests;
