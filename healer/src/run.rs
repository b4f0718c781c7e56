//! The healer at run time: starts the managed services, then on every collector tick turns the snapshot,
//! the instances' states and their traffic into signals, evaluates the rules and submits what they
//! propose (`crate::actions`: gate → executor → audit), and serves the REST API. Nothing here waits for
//! an action: the instances' own tasks run them (`crate::instance`), and their outcomes are recorded
//! when they end.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::SnapshotReceiver;
use axum::Router;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vigil_cgroup::fs::{CgroupError, Layout};

use crate::actions::{Actions, Recorded, Status, Submitted};
use crate::alerts::{AlertStore, AlertStoreError};
use crate::api::{self, Api, ApiError, Control, ManagedInstance};
use crate::audit::{AuditError, AuditLog};
use crate::autoscale::scaler::{PinError, ScaledService, Scaler, count_at_start};
use crate::autoscale::signal::LoadSource;
use crate::autoscale::tiers::tiers;
use crate::cgroup::{CgroupDriverError, driver_for};
use crate::config::{HealerConfig, HealerConfigError};
use crate::engine::{BoxFuture, Decision, Engine, Gate, GateConfig, MANUAL_RULE, Outcome, Refusal};
use crate::metrics::StandbyMetrics;
use crate::rules::{self, Action, Evaluator, InstanceState, Signals};
use crate::supervisor::{InstanceInfo, ScaledSlots, Settings, Supervisor, SupervisorError};
use crate::traffic::TrafficSource;
use crate::workflow::remediation::Remediation;

#[derive(Debug, thiserror::Error)]
pub enum HealerError {
    #[error("{0}")]
    Config(#[from] HealerConfigError),
    #[error("{0}")]
    RuleFiles(String),
    #[error("finding the cgroup hierarchies: {0}")]
    Layout(#[from] CgroupError),
    #[error("preparing Vigil's cgroups: {0}")]
    Driver(#[from] CgroupDriverError),
    #[error("starting the managed services: {0}")]
    Supervisor(#[from] SupervisorError),
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Alerts(#[from] AlertStoreError),
    #[error("notifications: {0}")]
    Notify(#[from] crate::notify::NotifyError),
    #[error("{0}")]
    Alerting(#[from] crate::alerting::AlertingError),
    #[error("workflows: {0}")]
    Workflows(#[from] crate::workflow::runner::RunnerError),
    #[error("{0}")]
    WorkflowFiles(String),
}

/// The configured workflow files' workflows.
fn load_workflows(config: &HealerConfig) -> Result<Vec<crate::workflow::Workflow>, HealerError> {
    let sets = config.load_workflows()?;
    let workflows: Vec<crate::workflow::Workflow> = sets.into_iter().flat_map(|s| s.workflows).collect();
    if !workflows.is_empty() {
        let names: Vec<&str> = workflows.iter().map(|w| &*w.name).collect();
        tracing::info!(workflows = %names.join(", "), "remediation workflows loaded");
    }
    Ok(workflows)
}

/// Every workflow a rule's `action: workflow` names is configured.
fn rules_name_workflows(
    rules: &[rules::Rule],
    workflows: &[crate::workflow::Workflow],
) -> Result<(), HealerError> {
    let known: BTreeSet<String> = workflows.iter().map(|w| w.name.to_string()).collect();
    check_named(&named_workflows(rules), &known).map_err(HealerError::WorkflowFiles)
}

/// The configured rule files and what became of their last load. Files are re-read when one changes
/// (checked every few ticks by modification time); a file with mistakes leaves the last good rules in
/// force, and its errors show in the log and in `GET /api/v1/rules`.
struct RuleFiles {
    config: HealerConfig,
    stamps: Stamps,
    status: Arc<Mutex<Value>>,
    /// `(rule, workflow)` of the rules in force that start workflows.
    named: Vec<(String, String)>,
}

/// Files with their modification times, to see a change.
type Stamps = Vec<(std::path::PathBuf, Option<SystemTime>)>;

fn stamps_of(files: Vec<std::path::PathBuf>) -> Stamps {
    files
        .into_iter()
        .map(|f| {
            let t = std::fs::metadata(&f).and_then(|m| m.modified()).ok();
            (f, t)
        })
        .collect()
}

/// The configured workflow files, re-read like the rule files when one changes. A file with mistakes, or
/// workflows that leave a rule's `workflow:` unknown, leave the workflows in force.
struct WorkflowFiles {
    config: HealerConfig,
    stamps: Stamps,
}

impl WorkflowFiles {
    fn stamps(config: &HealerConfig) -> Stamps {
        stamps_of(config.workflow_files().unwrap_or_default())
    }

    fn changed(&self) -> bool {
        Self::stamps(&self.config) != self.stamps
    }

    fn load(&mut self) -> Result<Vec<crate::workflow::Workflow>, String> {
        self.stamps = Self::stamps(&self.config);
        let sets = self.config.load_workflows().map_err(|e| e.to_string())?;
        Ok(sets.into_iter().flat_map(|s| s.workflows).collect())
    }
}

/// The files the step loop re-reads, and the runtime the workflows go to.
struct Files {
    rules: RuleFiles,
    workflows: WorkflowFiles,
    remediation: Remediation,
}

/// Re-reads the rule and workflow files that changed, and puts them in force when they load and every
/// rule's `workflow:` names a workflow in force.
fn reload_files(files: &mut Files, actions: &Actions) {
    let Files { rules: rule_files, workflows: workflow_files, remediation } = files;
    let (rules_changed, workflows_changed) = (rule_files.changed(), workflow_files.changed());
    let workflows = match workflows_changed.then(|| workflow_files.load()) {
        Some(Err(e)) => {
            tracing::warn!(error = %e, "workflow files changed but have mistakes; the workflows in force stay");
            None
        }
        Some(Ok(w)) => Some(w),
        None => None,
    };
    let rules = match rules_changed.then(|| rule_files.load()) {
        Some(Err(e)) => {
            tracing::warn!(error = %e, "rule files changed but have mistakes; the last good rules stay in force");
            None
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    if workflows.is_none() && rules.is_none() {
        return;
    }
    let known: BTreeSet<String> = match &workflows {
        Some(w) => w.iter().map(|w| w.name.to_string()).collect(),
        None => remediation.runner().workflows().keys().cloned().collect(),
    };
    let named: Vec<(String, String)> = match &rules {
        Some(r) => named_workflows(r),
        None => rule_files.named.clone(),
    };
    if let Err(e) = check_named(&named, &known) {
        tracing::warn!(error = %e, "the changed rule or workflow files do not fit together; the rules and workflows in force stay");
        rule_files.reject(&e);
        return;
    }
    if let Some(w) = workflows {
        let names: Vec<&str> = w.iter().map(|w| &*w.name).collect();
        tracing::info!(workflows = %names.join(", "), "workflow files changed: reloaded");
        remediation.set_workflows(w);
    }
    if let Some(r) = rules {
        tracing::info!(rules = r.len(), "rule files changed: reloaded");
        rule_files.named = named;
        actions.engine().replace_rules(r);
    }
}

/// `(rule, workflow)` for every rule with `action: workflow`.
fn named_workflows(rules: &[rules::Rule]) -> Vec<(String, String)> {
    rules.iter().filter_map(|r| Some((r.name.to_string(), r.workflow.as_ref()?.to_string()))).collect()
}

/// Every workflow a rule names is in `known`.
fn check_named(named: &[(String, String)], known: &BTreeSet<String>) -> Result<(), String> {
    let missing: Vec<String> = named
        .iter()
        .filter(|(_, w)| !known.contains(w))
        .map(|(r, w)| format!("rule `{r}` starts workflow `{w}`, which no workflow file declares"))
        .collect();
    if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) }
}

impl RuleFiles {
    fn stamps(config: &HealerConfig) -> Stamps {
        stamps_of(config.rule_files().unwrap_or_default())
    }

    /// The last load was good but does not fit the workflows: said in the status.
    fn reject(&self, why: &str) {
        if let Ok(mut status) = self.status.lock() {
            status["last_load"] = json!(format!("rejected: the last good rules stay in force: {why}"));
        }
    }

    /// Loads every file; all must be valid. Updates the status either way.
    fn load(&mut self) -> Result<Vec<rules::Rule>, String> {
        self.stamps = Self::stamps(&self.config);
        let mut all = Vec::new();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        let receivers = self.config.receivers.clone();
        for (file, _) in &self.stamps {
            match rules::check_file(file)
                .and_then(|set| rules::check_receivers(&set, &receivers).map(|()| set))
            {
                Ok(set) => {
                    files.push(json!({
                        "file": file.display().to_string(),
                        "status": "ok",
                        "rules": set.rules.iter().map(|r| json!({"name": &*r.name, "action": r.action.as_str()})).collect::<Vec<_>>(),
                    }));
                    all.extend(set.rules);
                }
                Err(e) => {
                    files.push(json!({"file": file.display().to_string(), "status": "error", "error": e.to_string()}));
                    errors.push(e.to_string());
                }
            }
        }
        if let Ok(mut status) = self.status.lock() {
            status["files"] = json!(files);
            status["last_load"] =
                json!(if errors.is_empty() { "ok" } else { "rejected: the last good rules stay in force" });
        }
        if errors.is_empty() { Ok(all) } else { Err(errors.join("\n")) }
    }

    fn changed(&self) -> bool {
        Self::stamps(&self.config) != self.stamps
    }
}

/// The running healer.
pub struct Healer {
    supervisor: Supervisor,
    scaler: Option<Scaler>,
    scaler_task: Option<JoinHandle<()>>,
    actions: Arc<Actions>,
    alerts: Arc<AlertStore>,
    notifier: crate::notify::Notifier,
    notifier_task: JoinHandle<()>,
    alert_secret: Option<vigil_core::config::Secrets>,
    standby_metrics: StandbyMetrics,
    rules: Arc<Mutex<Value>>,
    remediation: Remediation,
    hardware: watch::Sender<Option<vigil_hardware::HardwareHandle>>,
    triggers_task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    grace: Duration,
}

impl Healer {
    /// Loads the rules, starts the services, and begins evaluating on every snapshot. Needs a tokio
    /// runtime.
    pub fn start(
        config: &HealerConfig,
        snapshots: SnapshotReceiver,
        traffic: Arc<dyn TrafficSource>,
    ) -> Result<Healer, HealerError> {
        let status = Arc::new(Mutex::new(json!({ "files": [], "dry_run": config.dry_run })));
        let mut rule_files = RuleFiles {
            config: config.clone(),
            stamps: Vec::new(),
            status: status.clone(),
            named: Vec::new(),
        };
        // At start-up a bad rule file is an error: there are no last good rules to fall back on.
        let rule_list = rule_files.load().map_err(HealerError::RuleFiles)?;
        let workflow_files = WorkflowFiles { config: config.clone(), stamps: WorkflowFiles::stamps(config) };
        let workflows = load_workflows(config)?;
        rules_name_workflows(&rule_list, &workflows)?;
        rule_files.named = named_workflows(&rule_list);
        if rule_files.stamps.is_empty() {
            tracing::warn!("no rule files found; the healer decides nothing until rules are configured");
        }
        let audit = Arc::new(AuditLog::open(&config.data_dir)?);
        let alerts = Arc::new(AlertStore::open(audit.database())?);
        let kept = alerts.facts().len();
        if kept > 0 {
            tracing::info!(alerts = kept, "incoming alerts still firing from before the restart");
        }
        let driver: Arc<dyn crate::cgroup::CgroupDriver> =
            Arc::from(driver_for(&Layout::detect()?, &config.driver_config())?);
        let scaled = scaled_services(&config.services);
        let saved = crate::autoscale::scaler::saved_counts(&config.data_dir);
        let mut initial = BTreeMap::new();
        let mut slots = BTreeMap::new();
        for s in &scaled {
            let count = count_at_start(&s.policy, saved.get(&s.name).copied());
            initial.insert(s.name.clone(), count);
            slots.insert(s.name.clone(), ScaledSlots { max: s.policy.max, serving: count });
        }
        reconcile(driver.as_ref(), &config.services, &slots)?;
        let standby_metrics = StandbyMetrics::default();
        // What workflows cordoned before a restart is off limits from the first start on.
        let cordoned = crate::placement::Cordoned::default();
        let cordons = crate::workflow::store::Store::new(audit.database())
            .cordons()
            .map_err(crate::workflow::runner::RunnerError::from)?;
        let sys = crate::workflow::host::HostPaths::default().sys;
        cordoned.set_from(cordons.keys().map(String::as_str), &sys);
        let settings = Settings {
            policy: config.policy(),
            metrics: standby_metrics.clone(),
            stop_grace: config.healer.stop_grace.0,
            scaled: slots,
            cordoned,
            data_dirs: crate::placement::DataDirs::open(config.data_dir.join("data_dirs.json")),
            ..Settings::default()
        };
        let supervisor = Supervisor::start_with(config.services.clone(), driver, settings)?;
        let gate = Gate::new(GateConfig {
            dry_run: config.dry_run,
            max_actions_per_minute: config.healer.max_actions_per_minute,
            max_standby_fraction: config.healer.max_standby_fraction.get(),
        });
        let mut engine = Engine::new(Evaluator::new(rule_list), gate);
        let (stop, stop_rx) = watch::channel(false);
        let notifier = crate::notify::Notifier::open(audit.clone(), &config.notify, &config.external_url)?;
        let alerting = Arc::new(crate::alerting::Alerting::new(audit.clone(), notifier.clone()));
        let firing = alerting.firing()?;
        if !firing.is_empty() {
            tracing::info!(alerts = firing.len(), "notify alerts still firing from before the restart");
        }
        engine.seed_firing(firing);
        let notifier_task = notifier.spawn(stop_rx.clone());
        let actions = Actions::with_alerting(engine, Arc::new(supervisor.clone()), audit, alerting);
        let remediation = Remediation::start(
            workflows,
            actions.audit().clone(),
            Some(notifier.clone()),
            supervisor.clone(),
            actions.clone(),
            alerts.clone(),
            snapshots.clone(),
            &config.healer.workflows,
        )?;
        let (hardware, hardware_rx) = watch::channel(None);
        let triggers_task = remediation.spawn_triggers(hardware_rx, stop_rx.clone());
        let scaler = if scaled.is_empty() {
            None
        } else {
            for (name, count) in &initial {
                tracing::info!(service = %name, instances = count, "autoscaled service starts");
            }
            let (scaler, pokes) =
                Scaler::new(scaled, &initial, supervisor.clone(), actions.clone(), &config.data_dir);
            let task = tokio::spawn(scaler.clone().run(config.tick, pokes, stop_rx.clone()));
            Some((scaler, task))
        };
        let (scaler, scaler_task) = scaler.unzip();
        let task = tokio::spawn(step_loop(
            snapshots,
            stop_rx,
            actions.clone(),
            supervisor.clone(),
            traffic,
            Files { rules: rule_files, workflows: workflow_files, remediation: remediation.clone() },
            alerts.clone(),
        ));
        Ok(Healer {
            supervisor,
            scaler,
            scaler_task,
            actions,
            alerts,
            notifier,
            notifier_task,
            alert_secret: config.alerts_secret.clone(),
            standby_metrics,
            rules: status,
            remediation,
            hardware,
            triggers_task,
            stop,
            task,
            grace: config.healer.stop_grace.0,
        })
    }

    /// The healer's metrics (decisions, action durations, instance states) for `/metrics`.
    pub fn metrics_registry(&self) -> Arc<prometheus_client::registry::Registry> {
        let mut registry = crate::metrics::registry(
            self.actions.metrics(),
            &self.standby_metrics,
            Arc::new(self.supervisor.clone()),
        );
        if let Some(scaler) = &self.scaler {
            registry.register_collector(Box::new(scaler.metrics()));
        }
        self.alerts.metrics().register(&mut registry);
        self.notifier.metrics().register(&mut registry);
        self.remediation.runner().metrics().register(&mut registry);
        Arc::new(registry)
    }

    /// Connects the hardware monitor: its events and device health start workflows, and `wait_for`
    /// reads device health from it.
    pub fn attach_hardware(&self, hardware: vigil_hardware::HardwareHandle) {
        self.hardware.send_replace(Some(hardware));
    }

    /// Connects the broker's in-flight counts to the workflows' `drain` steps.
    pub fn attach_inflight(&self, source: Arc<dyn crate::workflow::host::InflightSource>) {
        self.remediation.attach_inflight(source);
    }

    /// The remediation workflows' runtime.
    pub fn remediation(&self) -> &Remediation {
        &self.remediation
    }

    /// Connects the broker's measurements of each service's load to the autoscaler.
    pub fn attach_load(&self, load: Arc<dyn LoadSource>) {
        if let Some(scaler) = &self.scaler {
            scaler.attach(load);
        }
    }

    /// The API's operations over this healer, for the REST routes ([`api::router`]) and the gRPC service
    /// (`crate::grpc`) alike; `token`, when set, is required by both.
    pub fn api(&self, snapshots: SnapshotReceiver, token: Option<String>) -> Arc<Api> {
        let control = Arc::new(HealerControl {
            supervisor: self.supervisor.clone(),
            scaler: self.scaler.clone(),
            actions: self.actions.clone(),
            rules: self.rules.clone(),
        });
        Api::new(control, snapshots, self.actions.audit().clone(), token)
            .with_alerts(self.alerts.clone(), self.alert_secret.clone())
            .with_workflows(self.remediation.runner().clone())
            .with_hardware(self.hardware.borrow().clone())
    }

    /// `/api/v1/...`.
    pub fn router(&self, snapshots: SnapshotReceiver, token: Option<String>) -> Router {
        api::router(self.api(snapshots, token))
    }

    /// The incoming alerts firing now.
    pub fn alerts(&self) -> &Arc<AlertStore> {
        &self.alerts
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// A cloneable handle for the broker: instances, their changes, and demand.
    pub fn handle(&self) -> HealerHandle {
        HealerHandle {
            supervisor: self.supervisor.clone(),
            scaler: self.scaler.clone(),
            actions: self.actions.clone(),
            waking: Arc::new(Mutex::new(HashSet::new())),
            held: self.remediation.held().clone(),
        }
    }

    /// Stops deciding, then stops every managed instance and removes its cgroups.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = self.triggers_task.await;
        // Runs are taken up at the next start; their tasks must not outlive the healer (nor keep the state
        // database open).
        self.remediation.runner().stop();
        // The autoscaler ends before the instances stop, so that their stopping is never read as a
        // service that needs fewer of them (its saved counts must stay what they were under load).
        if let Some(task) = self.scaler_task {
            let _ = task.await;
        }
        // Delivery stops between attempts; what is still queued waits in the outbox for the next start.
        let _ = self.notifier_task.await;
        self.supervisor.shutdown(self.grace).await;
    }
}

/// Rolls back what a previous run left behind (a crash, `kill -9`): instance cgroups that still hold
/// processes, possibly frozen or squeezed into the standby pool. They are thawed, their CPU limits lifted
/// and their processes killed, so the supervisor starts every instance afresh and nothing stays frozen.
/// Returns the instances that were cleaned.
pub fn reconcile(
    driver: &dyn crate::cgroup::CgroupDriver,
    services: &[crate::supervisor::ServiceSpec],
    scaled: &BTreeMap<String, ScaledSlots>,
) -> Result<Vec<String>, HealerError> {
    use rustix::process::{Pid, Signal, kill_process};
    let mut cleaned = Vec::new();
    for spec in services {
        let slots = scaled.get(&spec.name).map_or(spec.instances, |s| s.max);
        for n in 0..slots {
            let id = spec.instance_id(n);
            let cg = driver.create(&spec.name, &id)?;
            let pids = driver.pids(&cg)?;
            if pids.is_empty() {
                continue;
            }
            tracing::warn!(instance = %id, pids = ?pids, "left over from a previous run: thawing and stopping it");
            driver.set_frozen(&cg, false)?;
            driver.set_cpu(&cg, &crate::cgroup::CpuLimit::unlimited())?;
            for pid in &pids {
                if let Some(pid) = i32::try_from(*pid).ok().and_then(Pid::from_raw) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !driver.pids(&cg)?.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            cleaned.push(id);
        }
    }
    Ok(cleaned)
}

/// The services with a `scale:` block, as the autoscaler sizes them.
fn scaled_services(services: &[crate::supervisor::ServiceSpec]) -> Vec<ScaledService> {
    services
        .iter()
        .filter_map(|spec| {
            Some(ScaledService {
                name: spec.name.clone(),
                routed: spec.routed_name().to_string(),
                policy: spec.scale.clone()?,
            })
        })
        .collect()
}

/// How often the rule files' modification times are compared.
const RULES_CHECK_EVERY_TICKS: u64 = 5;

async fn step_loop(
    mut snapshots: SnapshotReceiver,
    mut stop: watch::Receiver<bool>,
    actions: Arc<Actions>,
    supervisor: Supervisor,
    traffic: Arc<dyn TrafficSource>,
    mut files: Files,
    alerts: Arc<AlertStore>,
) {
    let mut last = Instant::now();
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
        let snapshot = snapshots.borrow_and_update().clone();
        ticks += 1;
        let reload = ticks.is_multiple_of(RULES_CHECK_EVERY_TICKS);
        let elapsed = last.elapsed();
        last = Instant::now();
        let (sup, traffic_source, engine_actions) = (supervisor.clone(), traffic.clone(), actions.clone());
        let alerts = alerts.clone();
        // Reading the instances' cgroups, /proc/net/tcp and rule and workflow files blocks: off the async
        // workers. The engine's lock is held for the evaluation only.
        let evaluated = tokio::task::spawn_blocking(move || {
            if reload {
                reload_files(&mut files, &engine_actions);
            }
            let instances = sup.instances();
            let mut signals = Signals::new();
            signals.set_alerts(alerts.facts());
            for i in &instances {
                signals.set_state(&i.id, i.state);
            }
            traffic_source.observe(&instances, elapsed, &mut signals);
            let (proposals, ended) = {
                let mut engine = engine_actions.engine();
                let proposals = engine.evaluate(engine_actions.now(), &snapshot, &signals);
                (proposals, engine.take_ended())
            };
            if let Some(alerting) = engine_actions.alerting()
                && let Err(e) = alerting.resolve(&ended)
            {
                tracing::error!(error = %e, "cannot queue the resolution of notify alerts");
            }
            (proposals, files)
        })
        .await;
        let proposals = match evaluated {
            Ok((proposals, returned)) => {
                files = returned;
                proposals
            }
            Err(e) => {
                tracing::error!(error = %e, "healer step panicked; stopping the rules");
                return;
            }
        };
        for p in proposals {
            // Returns once the instance has taken or refused the action, never after the action itself.
            actions.submit(p).await;
        }
    }
}

/// The rule name under which wakes asked for by the broker are audited.
pub const DEMAND_RULE: &str = "broker-demand";

/// What the broker needs of the healer: the managed instances, word of every change of their state, and a
/// way to ask for an instance when requests wait for a service that has none ready.
#[derive(Clone)]
pub struct HealerHandle {
    supervisor: Supervisor,
    scaler: Option<Scaler>,
    actions: Arc<Actions>,
    /// Services for which a demanded wake is under way: further demand until it ends adds nothing.
    waking: Arc<Mutex<HashSet<String>>>,
    /// Instances a workflow's drain took out of routing.
    held: crate::placement::Held,
}

impl HealerHandle {
    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.supervisor.instances()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.supervisor.changes()
    }

    /// Whether the broker may route to `instance_id` when it is ready: no workflow drained it.
    pub fn routable(&self, instance_id: &str) -> bool {
        !self.held.held(instance_id)
    }

    /// Requests wait for `service` and none of its instances is ready: wake a hibernated one, unless one is
    /// already starting or waking, or start a parked one. Returns at once; the wake passes the safety gate
    /// and is audited under [`DEMAND_RULE`]. Instances that are starting, or restarting after a failure,
    /// become ready by themselves.
    pub fn demand(&self, service: &str) {
        // Scaled services are sized by the autoscaler: it decides at once, and wakes or starts as many
        // instances as the held requests need.
        let scaled = |name: &str| self.scaler.as_ref().is_some_and(|s| s.scales(name));
        if let Some(s) = self.scaler.as_ref().filter(|s| s.scales_route(service)) {
            s.poke(service);
        }
        // Instances a workflow drained or cordoned are not woken or started for traffic.
        let instances: Vec<(String, String, InstanceState)> = self
            .supervisor
            .states()
            .into_iter()
            .filter(|(id, name, serves, _)| serves == service && !scaled(name) && self.routable(id))
            .map(|(id, name, _, state)| (id, name, state))
            .collect();
        if instances.is_empty() {
            return;
        }
        let coming = |s: InstanceState| {
            matches!(s, InstanceState::Active | InstanceState::Waking | InstanceState::Starting)
        };
        if instances.iter().any(|(_, _, s)| coming(*s)) {
            return;
        }
        let first = self.waking.lock().map(|mut w| w.insert(service.to_string())).unwrap_or(false);
        if !first {
            return;
        }
        let (handle, service) = (self.clone(), service.to_string());
        tokio::spawn(async move {
            handle.satisfy(&service, &instances).await;
            if let Ok(mut w) = handle.waking.lock() {
                w.remove(&service);
            }
        });
    }

    async fn satisfy(&self, service: &str, instances: &[(String, String, InstanceState)]) {
        if let Some((id, name, _)) = instances.iter().find(|(_, _, s)| *s == InstanceState::Hibernated) {
            tracing::info!(service, instance_id = %id, "requests wait: waking");
            let mut submitted =
                self.actions.submit(self.actions.proposal(DEMAND_RULE, Action::Wake, name, id)).await;
            // The broker watches the states; this wait only keeps further demand out until the wake ends.
            let decision = submitted.wait(Duration::from_secs(120)).await;
            tracing::info!(instance_id = %id, outcome = ?decision.map(|d| d.outcome), "demanded wake");
            return;
        }
        // Zero running instances: start one that waits for demand.
        for (id, _, _) in instances {
            if self.supervisor.start_on_demand(id).await {
                tracing::info!(service, instance_id = %id, "requests wait: starting an instance");
                return;
            }
        }
        tracing::debug!(service, "demand, but no instance can be woken or started");
    }
}

struct HealerControl {
    supervisor: Supervisor,
    scaler: Option<Scaler>,
    actions: Arc<Actions>,
    rules: Arc<Mutex<Value>>,
}

/// The API's answer for a finished action: the decision, the instance's state and standby record, or the
/// error that fits the outcome.
fn finished_answer(supervisor: &Supervisor, id: u64, d: &Decision) -> Result<Value, ApiError> {
    let instance = supervisor.instance(&d.instance_id);
    let state = instance.as_ref().map(|i| i.state.as_str()).unwrap_or("stopped");
    let standby = instance.as_ref().and_then(|i| i.standby.as_ref()).map(|r| {
        json!({
            "memory_before_bytes": r.memory_before,
            "memory_after_bytes": r.memory_after,
            "memory_kept_resident": r.memory_kept_resident,
            "hibernate_seconds": r.hibernate_seconds,
            "wake_seconds": r.wake_seconds,
            "prefetch_bytes": r.prefetch_bytes,
        })
    });
    let body = json!({
        "action_id": id, "status": "finished", "id": d.instance_id, "action": d.action, "state": state,
        "decision": d, "standby": standby,
    });
    let instance_id = &d.instance_id;
    match &d.outcome {
        Outcome::Succeeded { .. } | Outcome::DryRun => Ok(body),
        Outcome::Refused { reason: Refusal::RateLimited } => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "the host-wide action rate limit is used up; try again later",
        )),
        Outcome::Refused { reason: Refusal::StandbyFraction } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "standby_fraction",
            format!("hibernating `{instance_id}` would exceed healer.max_standby_fraction for its service"),
        )),
        Outcome::Refused { reason: Refusal::InProgress } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_progress",
            format!("`{instance_id}` is busy with another action ({state}); try again when it ends"),
        )),
        Outcome::Failed { error, .. } => {
            Err(ApiError::new(StatusCode::CONFLICT, "action_failed", error.clone()))
        }
    }
}

/// The API's answer for an action still running: its id and the instance's state now.
fn running_answer(supervisor: &Supervisor, id: u64, action: &str, instance_id: &str) -> Value {
    json!({
        "action_id": id, "status": "running", "id": instance_id, "action": action,
        "state": supervisor.state(instance_id).map(InstanceState::as_str),
    })
}

impl Control for HealerControl {
    fn managed(&self) -> Vec<ManagedInstance> {
        self.supervisor
            .instances()
            .into_iter()
            .map(|i| ManagedInstance {
                id: i.id,
                service: i.service,
                state: i.state,
                pids: i.pids,
                cgroup: i.cgroup,
                port: i.port,
                restarts: i.restarts,
                last_failure: i.last_failure,
                data_dir: i.data_dir,
            })
            .collect()
    }

    fn act<'a>(
        &'a self,
        action: Action,
        instance_id: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<(StatusCode, Value), ApiError>> {
        Box::pin(async move {
            let Some(info) = self.supervisor.spec(instance_id) else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no managed instance `{instance_id}`"),
                ));
            };
            let p = self.actions.proposal(MANUAL_RULE, action, &info.name, instance_id);
            let mut submitted: Submitted = self.actions.submit(p).await;
            match submitted.wait(wait).await {
                Some(d) => {
                    let supervisor = self.supervisor.clone();
                    let id = submitted.id;
                    // Reading the instance's cgroup for its state: off the async workers.
                    let answer = tokio::task::spawn_blocking(move || finished_answer(&supervisor, id, &d))
                        .await
                        .map_err(|e| {
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                        })?;
                    answer.map(|body| (StatusCode::OK, body))
                }
                None => Ok((
                    StatusCode::ACCEPTED,
                    running_answer(&self.supervisor, submitted.id, action.as_str(), instance_id),
                )),
            }
        })
    }

    fn action(&self, id: u64) -> Option<Value> {
        Some(match self.actions.status(id)? {
            Status::Running { action, instance_id } => {
                running_answer(&self.supervisor, id, action, &instance_id)
            }
            Status::Finished(d) => match finished_answer(&self.supervisor, id, &d) {
                Ok(body) => body,
                Err(e) => json!({
                    "action_id": id, "status": "finished", "id": d.instance_id, "action": d.action,
                    "decision": d, "error": {"code": e.code, "message": e.message},
                }),
            },
        })
    }

    fn rules(&self) -> Value {
        let mut v = self.rules.lock().map(|v| v.clone()).unwrap_or(Value::Null);
        v["dry_run"] = json!(self.actions.engine().dry_run());
        v
    }

    fn set_dry_run(&self, on: bool) -> Result<bool, ApiError> {
        let mut engine = self.actions.engine();
        engine.set_dry_run(on);
        tracing::warn!(dry_run = on, "dry-run mode changed through the API");
        Ok(engine.dry_run())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Recorded> {
        self.actions.subscribe()
    }

    fn services(&self) -> Vec<Value> {
        let names: BTreeSet<String> =
            self.supervisor.states().into_iter().map(|(_, name, _, _)| name).collect();
        names.iter().map(|name| service_json(&self.supervisor, self.scaler.as_ref(), name)).collect()
    }

    fn scale<'a>(&'a self, service: &'a str, count: Option<u32>) -> BoxFuture<'a, Result<Value, ApiError>> {
        Box::pin(async move {
            let known = self.supervisor.states().iter().any(|(_, name, _, _)| name == service);
            let Some(scaler) = self.scaler.as_ref().filter(|s| s.scales(service)) else {
                return Err(if known {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "not_scaled",
                        format!("service `{service}` has a fixed count; give it a `scale:` block to size it"),
                    )
                } else {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no managed service `{service}`"),
                    )
                });
            };
            match scaler.pin(service, count).await {
                Ok(_) => Ok(service_json(&self.supervisor, Some(scaler), service)),
                Err(e @ PinError::AboveMax { .. }) => {
                    Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
                }
                Err(e @ PinError::Unknown(_)) => {
                    Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()))
                }
            }
        })
    }
}

/// A managed service as `GET /api/v1/services` shows it: counts by tier, and for a scaled service the
/// autoscaler's view (desired count, observed concurrency, mode, the last decision and why).
fn service_json(supervisor: &Supervisor, scaler: Option<&Scaler>, name: &str) -> Value {
    if let Some(s) = scaler.and_then(|s| s.status(name)) {
        let mut v = json!(s);
        v["scale"] = json!(if s.pinned.is_some() { "pinned" } else { "auto" });
        return v;
    }
    let t = tiers(&supervisor.members(name));
    json!({
        "name": name, "desired": t.serving, "ready": t.ready, "standby": t.standby, "stopped": t.stopped,
        "serving": t.serving, "observed_concurrency": null, "mode": null, "pinned": null, "scale": "fixed",
        "last_decision": null,
    })
}

impl crate::metrics::StateSource for Supervisor {
    fn states(&self) -> Vec<(String, String, InstanceState)> {
        Supervisor::states(self).into_iter().map(|(id, service, _, state)| (service, id, state)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_files_reload_and_a_bad_edit_keeps_the_last_good_rules() {
        let dir = std::env::temp_dir().join(format!("vigil-rules-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.yaml");
        let good = "rules:\n  - name: n\n    when:\n      - metric: cpu_cores\n        below: 1\n    action: restart\n";
        std::fs::write(&file, good).unwrap();
        let config = HealerConfig { rules: vec![dir.clone()], ..HealerConfig::default() };
        let status = Arc::new(Mutex::new(json!({})));
        let mut files = RuleFiles { config, stamps: Vec::new(), status: status.clone(), named: Vec::new() };
        assert_eq!(files.load().unwrap().len(), 1);
        assert!(!files.changed());

        // A later modification time, as an editor's save gives.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, "rules:\n  - name: n\n    when: []\n    action: nap\n").unwrap();
        assert!(files.changed());
        let err = files.load().unwrap_err();
        assert!(err.contains("unknown action `nap`"), "{err}");
        let s = status.lock().unwrap().clone();
        assert_eq!(s["files"][0]["status"], "error");
        assert_eq!(s["last_load"], "rejected: the last good rules stay in force");

        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, good).unwrap();
        assert!(files.changed());
        assert_eq!(files.load().unwrap().len(), 1);
        assert_eq!(status.lock().unwrap()["last_load"], "ok");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
