//! The workflow runtime assembled for `vigil up`: the [`Runner`] over the host's steps ([`HostSteps`]), the
//! drained instances ([`Held`]) rebuilt from the durable runs at start, and the trigger task that turns
//! hardware events, device health and incoming alerts into runs ([`Triggers`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use vigil_core::config::WorkflowLimits;
use vigil_hardware::HardwareHandle;

use super::host::{HealthSource, HostPaths, HostSteps, InflightSource};
use super::runner::{Limits, Runner, RunnerError, StartRequest, WeakRunner};
use super::{Health, StartRun, Triggers, Workflow};
use crate::SnapshotReceiver;
use crate::actions::{Actions, WorkflowStarter};
use crate::alerts::AlertStore;
use crate::audit::AuditLog;
use crate::notify::Notifier;
use crate::placement::{self, Held};
use crate::rules::ProposedAction;
use crate::supervisor::Supervisor;

/// How often device health and the incoming alerts are looked at for triggers.
const TRIGGER_TICK: Duration = Duration::from_secs(1);

/// The runtime, its host steps and its triggers. Cheap to clone.
#[derive(Clone)]
pub struct Remediation {
    runner: Runner,
    host: HostSteps,
    held: Held,
    triggers: Arc<Mutex<Triggers>>,
    alerts: Arc<AlertStore>,
    actions: Arc<Actions>,
}

impl Remediation {
    /// Opens the runtime over the state database and takes up the runs that had not ended. Needs the
    /// tokio runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        workflows: Vec<Workflow>,
        audit: Arc<AuditLog>,
        notifier: Option<Notifier>,
        supervisor: Supervisor,
        actions: Arc<Actions>,
        alerts: Arc<AlertStore>,
        snapshots: SnapshotReceiver,
        limits: &WorkflowLimits,
    ) -> Result<Remediation, RunnerError> {
        let held = Held::default();
        let paths = HostPaths::default();
        let host = HostSteps::new(supervisor, actions.clone(), held.clone(), snapshots, paths.clone());
        let limits = Limits {
            max_concurrent: limits.max_concurrent,
            breaker_window: limits.breaker.window.0,
            breaker_max_fraction: limits.breaker.max_fraction.get(),
            breaker_min_devices: limits.breaker.min_devices,
        };
        let sys: PathBuf = paths.sys.clone();
        let triggers = Arc::new(Mutex::new(Triggers::new(&workflows)));
        let runner = Runner::new(
            workflows,
            audit,
            notifier,
            Arc::new(host.clone()),
            limits,
            Box::new(move || placement::host_devices(&sys)),
        )?;
        // Weak: the runtime holds the host's steps, which hold `held` and the actions.
        let r = runner.downgrade();
        held.holding_by(Box::new(move |id| r.upgrade().is_some_and(|r| r.holds(id))));
        actions.attach_workflows(Arc::new(runner.downgrade()));
        let resumed = runner.resume()?;
        if resumed > 0 {
            tracing::info!(runs = resumed, "workflow runs taken up where they were");
        }
        // What unfinished (or still cordoning) runs drained stays out of routing across the restart.
        for run in runner.runs(1000)? {
            if !runner.holds(run.id) {
                continue;
            }
            // Those an evacuation moved off the run's device serve again.
            let moved: Vec<&str> = run
                .steps
                .iter()
                .filter(|s| s.kind == "evacuate")
                .filter_map(|s| {
                    s.output.as_ref().filter(|o| o.get("device").is_some())?.get("moved")?.as_array()
                })
                .flatten()
                .filter_map(|m| m.get("instance_id")?.as_str())
                .collect();
            for step in run.steps.iter().filter(|s| s.kind == "drain") {
                let ids = step.output.as_ref().and_then(|o| o.get("held")).and_then(|h| h.as_array());
                for id in
                    ids.into_iter().flatten().filter_map(|v| v.as_str()).filter(|id| !moved.contains(id))
                {
                    held.hold(id, run.id);
                }
            }
        }
        Ok(Remediation { runner, host, held, triggers, alerts, actions })
    }

    /// Puts reloaded workflows in force: new runs and triggers use them; runs under way go on if their
    /// workflow still fits them (see [`Runner::set_workflows`]).
    pub fn set_workflows(&self, workflows: Vec<Workflow>) {
        self.lock_triggers().replace(&workflows);
        self.runner.set_workflows(workflows);
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// The instances drains took out of routing.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// The broker's in-flight counts, for `drain`.
    pub fn attach_inflight(&self, source: Arc<dyn InflightSource>) {
        self.host.attach_inflight(source);
    }

    /// Starts the trigger task: hardware events and device health from the monitor `hardware` holds (once
    /// one is attached), and the incoming alerts, until `stop`.
    pub fn spawn_triggers(
        &self,
        hardware: watch::Receiver<Option<HardwareHandle>>,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(self.clone().trigger_loop(hardware, stop))
    }

    async fn trigger_loop(
        self,
        mut attached: watch::Receiver<Option<HardwareHandle>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut hardware: Option<HardwareHandle> = None;
        let mut events: Option<broadcast::Receiver<vigil_hardware::HardwareEvent>> = None;
        let mut tick = tokio::time::interval(TRIGGER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        attached.mark_changed();
        loop {
            let started: Vec<(StartRun, &'static str, Option<String>)> = tokio::select! {
                _ = stop.changed() => return,
                changed = attached.changed() => {
                    if changed.is_err() {
                        // The healer is going away; the stop follows.
                        std::future::pending::<()>().await;
                    }
                    hardware = attached.borrow_and_update().clone();
                    if let Some(h) = &hardware {
                        self.host.attach_health(Arc::new(h.clone()));
                    }
                    events = hardware.as_ref().map(HardwareHandle::subscribe);
                    Vec::new()
                }
                event = recv(&mut events) => match event {
                    Some(Ok(e)) => {
                        let at = Duration::from_millis(e.at_unix_ms);
                        let now = Duration::from_millis(vigil_core::time::now_unix_ms());
                        let runs = self.lock_triggers().on_event_seen(&e.device, e.kind.as_str(), at, now);
                        runs.into_iter().map(|r| (r, "hardware", Some(e.device.clone()))).collect()
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                        tracing::warn!(missed = n, "workflow triggers fell behind the hardware events; some were not counted");
                        Vec::new()
                    }
                    Some(Err(broadcast::error::RecvError::Closed)) | None => {
                        events = None;
                        Vec::new()
                    }
                },
                _ = tick.tick() => {
                    let at = Duration::from_millis(vigil_core::time::now_unix_ms());
                    let mut out = Vec::new();
                    if let Some(h) = &hardware {
                        for d in h.devices() {
                            let state = health_of(d.state);
                            for r in self.lock_triggers().on_health(&d.device, state, at) {
                                out.push((r, "hardware", Some(d.device.clone())));
                            }
                        }
                    }
                    let facts = self.alerts.facts();
                    for r in self.lock_triggers().on_alerts(&facts, at) {
                        out.push((r, "alert", None));
                    }
                    out
                }
            };
            for (run, source, device) in started {
                self.start_triggered(run, source, device).await;
            }
        }
    }

    fn lock_triggers(&self) -> std::sync::MutexGuard<'_, Triggers> {
        self.triggers.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn start_triggered(&self, run: StartRun, source: &'static str, device: Option<String>) {
        let req = StartRequest {
            workflow: run.workflow.to_string(),
            params: run.params,
            source: source.to_string(),
            reason: run.reason,
            dry_run: self.actions.engine().dry_run(),
            cooldown_key: Some(run.key),
            device,
        };
        let runner = self.runner.clone();
        let workflow = req.workflow.clone();
        match tokio::task::spawn_blocking(move || runner.start(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(RunnerError::Refused(why))) => {
                tracing::info!(workflow = %workflow, "workflow run not started: {why}")
            }
            Ok(Err(e)) => tracing::error!(workflow = %workflow, "workflow run not started: {e}"),
            Err(e) => tracing::error!(workflow = %workflow, "workflow start panicked: {e}"),
        }
    }
}

/// `action: workflow` decisions: a run for the rule's instance, its `instance_id` and `service` the
/// parameters (the rule's own cooldown spaces them).
impl WorkflowStarter for WeakRunner {
    fn start(&self, p: &ProposedAction) -> Result<u64, String> {
        let Some(runner) = self.upgrade() else { return Err("the workflow runtime has stopped".into()) };
        let Some(workflow) = &p.workflow else { return Err("the rule names no workflow".into()) };
        let params = BTreeMap::from([
            ("instance_id".to_string(), p.instance_id.to_string()),
            ("service".to_string(), p.service.to_string()),
        ]);
        let req = StartRequest {
            workflow: workflow.to_string(),
            params,
            source: "rule".into(),
            reason: format!("rule {} on {}", p.rule, p.instance_id),
            dry_run: false,
            cooldown_key: None,
            device: None,
        };
        runner.start(req).map(|run| run.id).map_err(|e| e.to_string())
    }
}

async fn recv<T: Clone>(
    rx: &mut Option<broadcast::Receiver<T>>,
) -> Option<Result<T, broadcast::error::RecvError>> {
    match rx {
        Some(rx) => Some(rx.recv().await),
        None => std::future::pending().await,
    }
}

fn health_of(s: vigil_hardware::State) -> Health {
    match s {
        vigil_hardware::State::Healthy => Health::Healthy,
        vigil_hardware::State::Degraded => Health::Degraded,
        vigil_hardware::State::Failed => Health::Failed,
    }
}

impl HealthSource for HardwareHandle {
    fn health(&self, device: &str) -> (Health, String) {
        let h = HardwareHandle::health(self, device);
        (health_of(h.state), h.reason)
    }
}
