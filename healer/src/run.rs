//! The healer at run time: starts the managed services, then on every collector tick turns the snapshot,
//! the instances' states and their traffic into signals, steps the engine (rules → gate → standby executor
//! → audit) and serves the REST API. Until the broker supplies traffic (issue 4), [`ConnectionTraffic`]
//! reads it from the kernel's TCP table.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vigil_collector::SnapshotReceiver;
use vigil_collector::cgroupfs::{CgroupError, Layout};

use crate::api::{self, ApiError, Control, ManagedInstance};
use crate::audit::{AuditError, AuditLog};
use crate::cgroup::{CgroupDriverError, driver_for};
use crate::config::{HealerConfig, HealerConfigError};
use crate::engine::{Engine, Gate, GateConfig, Outcome, Refusal};
use crate::executor::StandbyExecutor;
use crate::rules::{self, Action, Evaluator, InstanceState, Signal, Signals};
use crate::supervisor::{InstanceInfo, Supervisor, SupervisorError};

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
}

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

/// `(local port, remote address:port)` of every ESTABLISHED connection in a `/proc/net/tcp` text.
pub fn established(text: &str) -> Vec<(u16, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let remote = f.next()?;
            let state = f.next()?;
            if state != "01" {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            Some((port, remote.to_string()))
        })
        .collect()
}

/// Every ESTABLISHED IPv4 and IPv6 connection on the host now.
pub fn established_now() -> Vec<(u16, String)> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| established(&text))
        .collect()
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

type StandbyEngine = Engine<StandbyExecutor<Supervisor>>;

/// The configured rule files and what became of their last load. Files are re-read when one changes
/// (checked every few ticks by modification time); a file with mistakes leaves the last good rules in
/// force, and its errors show in the log and in `GET /api/v1/rules`.
struct RuleFiles {
    config: HealerConfig,
    stamps: Vec<(std::path::PathBuf, Option<SystemTime>)>,
    status: Arc<Mutex<Value>>,
}

impl RuleFiles {
    fn stamps(config: &HealerConfig) -> Vec<(std::path::PathBuf, Option<SystemTime>)> {
        config
            .rule_files()
            .unwrap_or_default()
            .into_iter()
            .map(|f| {
                let t = std::fs::metadata(&f).and_then(|m| m.modified()).ok();
                (f, t)
            })
            .collect()
    }

    /// Loads every file; all must be valid. Updates the status either way.
    fn load(&mut self) -> Result<Vec<rules::Rule>, String> {
        self.stamps = Self::stamps(&self.config);
        let mut all = Vec::new();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for (file, _) in &self.stamps {
            match rules::check_file(file) {
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
    engine: Arc<Mutex<StandbyEngine>>,
    audit: Arc<AuditLog>,
    rules: Arc<Mutex<Value>>,
    started: Instant,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    grace: Duration,
}

impl Healer {
    /// Loads the rules, starts the services, and begins stepping on every snapshot. Needs a tokio runtime.
    pub fn start(
        config: &HealerConfig,
        snapshots: SnapshotReceiver,
        traffic: Arc<dyn TrafficSource>,
    ) -> Result<Healer, HealerError> {
        let status = Arc::new(Mutex::new(json!({ "files": [], "dry_run": config.dry_run })));
        let mut rule_files = RuleFiles { config: config.clone(), stamps: Vec::new(), status: status.clone() };
        // At start-up a bad rule file is an error: there are no last good rules to fall back on.
        let rule_list = rule_files.load().map_err(HealerError::RuleFiles)?;
        if rule_files.stamps.is_empty() {
            tracing::warn!("no rule files found; the healer decides nothing until rules are configured");
        }
        let audit = Arc::new(AuditLog::open(&config.data_dir)?);
        let driver: Arc<dyn crate::cgroup::CgroupDriver> =
            Arc::from(driver_for(&Layout::detect()?, &config.healer.driver_config())?);
        reconcile(driver.as_ref(), &config.services)?;
        let supervisor = Supervisor::start(config.services.clone(), driver.clone())?;
        let executor = StandbyExecutor::new(Arc::new(supervisor.clone()), driver, config.healer.policy());
        let gate = Gate::new(GateConfig {
            dry_run: config.dry_run,
            max_actions_per_minute: config.healer.max_actions_per_minute,
            max_standby_fraction: config.healer.max_standby_fraction,
        });
        let engine =
            Arc::new(Mutex::new(Engine::new(Evaluator::new(rule_list), gate, executor, audit.clone())));
        let (stop, stop_rx) = watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(step_loop(
            snapshots,
            stop_rx,
            engine.clone(),
            supervisor.clone(),
            traffic,
            started,
            rule_files,
        ));
        Ok(Healer {
            supervisor,
            engine,
            audit,
            rules: status,
            started,
            stop,
            task,
            grace: config.healer.stop_grace.0,
        })
    }

    /// The healer's metrics (decisions, action durations, instance states) for `/metrics`.
    pub fn metrics_registry(&self) -> Arc<prometheus_client::registry::Registry> {
        let engine = match self.engine.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::new(crate::metrics::registry(
            engine.metrics(),
            engine.executor().metrics(),
            Arc::new(self.supervisor.clone()),
        ))
    }

    /// `/api/v1/...`.
    pub fn router(&self, snapshots: SnapshotReceiver, token: Option<String>) -> Router {
        let control = Arc::new(HealerControl {
            supervisor: self.supervisor.clone(),
            engine: self.engine.clone(),
            started: self.started,
            rules: self.rules.clone(),
        });
        api::router(control, snapshots, self.audit.clone(), token)
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// A cloneable handle for the broker: instances, their changes, and demand.
    pub fn handle(&self) -> HealerHandle {
        HealerHandle {
            supervisor: self.supervisor.clone(),
            engine: self.engine.clone(),
            started: self.started,
            waking: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Stops deciding, then stops every managed instance and removes its cgroups.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
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
) -> Result<Vec<String>, HealerError> {
    use rustix::process::{Pid, Signal, kill_process};
    let mut cleaned = Vec::new();
    for spec in services {
        for n in 0..spec.instances {
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

/// How often the rule files' modification times are compared.
const RULES_CHECK_EVERY_TICKS: u64 = 5;

async fn step_loop(
    mut snapshots: SnapshotReceiver,
    mut stop: watch::Receiver<bool>,
    engine: Arc<Mutex<StandbyEngine>>,
    supervisor: Supervisor,
    traffic: Arc<dyn TrafficSource>,
    started: Instant,
    mut rule_files: RuleFiles,
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
        if ticks.is_multiple_of(RULES_CHECK_EVERY_TICKS) && rule_files.changed() {
            match rule_files.load() {
                Ok(new_rules) => {
                    tracing::info!(rules = new_rules.len(), "rule files changed: reloaded");
                    if let Ok(mut e) = engine.lock() {
                        e.replace_rules(new_rules);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rule files changed but have mistakes; the last good rules stay in force")
                }
            }
        }
        let elapsed = last.elapsed();
        last = Instant::now();
        let engine = engine.clone();
        let supervisor = supervisor.clone();
        let traffic = traffic.clone();
        // Executors block (cgroupfs, madvise): off the runtime.
        let result = tokio::task::spawn_blocking(move || {
            let instances = supervisor.instances();
            let mut signals = Signals::new();
            for i in &instances {
                signals.set_state(&i.id, i.state);
            }
            traffic.observe(&instances, elapsed, &mut signals);
            let mut engine = engine.lock().map_err(|_| "engine lock poisoned".to_string())?;
            engine.step(started.elapsed(), SystemTime::now(), &snapshot, &signals).map_err(|e| e.to_string())
        })
        .await;
        match result {
            Ok(Ok(decisions)) => {
                for d in decisions {
                    tracing::info!(rule = %d.rule, action = d.action, instance = %d.instance_id, outcome = ?d.outcome, "decision");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "healer step failed"),
            Err(e) => tracing::error!(error = %e, "healer step panicked"),
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
    engine: Arc<Mutex<StandbyEngine>>,
    started: Instant,
    /// Services for which a demanded wake is under way: further demand until it ends adds nothing.
    waking: Arc<Mutex<HashSet<String>>>,
}

impl HealerHandle {
    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.supervisor.instances()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.supervisor.changes()
    }

    /// Requests wait for `service` and none of its instances is ready: wake a hibernated one, unless one is
    /// already starting or waking. Returns at once; the wake runs on a blocking thread and passes the safety
    /// gate, and its decision is audited under [`DEMAND_RULE`]. Instances that are starting, or restarting
    /// after a failure, become ready by themselves.
    pub fn demand(&self, service: &str) {
        let instances: Vec<InstanceInfo> =
            self.supervisor.instances().into_iter().filter(|i| i.serves == service).collect();
        let busy = |s: InstanceState| {
            matches!(s, InstanceState::Active | InstanceState::Waking | InstanceState::Starting)
        };
        if instances.iter().any(|i| busy(i.state)) {
            return;
        }
        let Some(target) = instances.iter().find(|i| i.state == InstanceState::Hibernated) else {
            // Zero running instances: start one that waits for demand.
            match instances.iter().find(|i| self.supervisor.start_on_demand(&i.id)) {
                Some(i) => {
                    tracing::info!(service, instance_id = %i.id, "requests wait: starting an instance")
                }
                None => tracing::debug!(service, "demand, but no instance can be woken or started"),
            }
            return;
        };
        let first = self.waking.lock().map(|mut w| w.insert(service.to_string())).unwrap_or(false);
        if !first {
            return;
        }
        let (engine, waking) = (self.engine.clone(), self.waking.clone());
        let (service, id, at) = (service.to_string(), target.id.clone(), self.started.elapsed());
        tracing::info!(service = %service, instance_id = %id, "requests wait: waking");
        tokio::task::spawn_blocking(move || {
            let decision = engine.lock().map_err(|_| "engine lock poisoned".to_string()).and_then(|mut e| {
                e.act(DEMAND_RULE, at, SystemTime::now(), Action::Wake, &service, &id)
                    .map_err(|e| e.to_string())
            });
            match decision {
                Ok(d) => tracing::info!(instance_id = %id, outcome = ?d.outcome, "demanded wake"),
                Err(e) => tracing::error!(instance_id = %id, error = %e, "demanded wake failed"),
            }
            if let Ok(mut w) = waking.lock() {
                w.remove(&service);
            }
        });
    }
}

struct HealerControl {
    supervisor: Supervisor,
    engine: Arc<Mutex<StandbyEngine>>,
    started: Instant,
    rules: Arc<Mutex<Value>>,
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
            })
            .collect()
    }

    fn act(&self, action: Action, instance_id: &str) -> Result<Value, ApiError> {
        let info = self.supervisor.instance(instance_id).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no managed instance `{instance_id}`"))
        })?;
        let mut engine = self.engine.lock().map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "engine lock poisoned")
        })?;
        let d = engine
            .manual(self.started.elapsed(), SystemTime::now(), action, &info.service, instance_id)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string()))?;
        let state = self.supervisor.instance(instance_id).map(|i| i.state.as_str()).unwrap_or("stopped");
        let standby = engine.executor().record(instance_id).map(|r| {
            json!({
                "memory_before_bytes": r.memory_before,
                "memory_after_bytes": r.memory_after,
                "memory_kept_resident": r.memory_kept_resident,
                "hibernate_seconds": r.hibernate_seconds,
                "wake_seconds": r.wake_seconds,
                "prefetch_bytes": r.prefetch_bytes,
            })
        });
        let body = json!({ "id": instance_id, "action": d.action, "state": state, "decision": d, "standby": standby });
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
                format!(
                    "hibernating `{instance_id}` would exceed healer.max_standby_fraction for its service"
                ),
            )),
            Outcome::Refused { reason: Refusal::InProgress } => {
                Err(ApiError::new(StatusCode::CONFLICT, "in_progress", format!("`{instance_id}` is busy")))
            }
            Outcome::Failed { error, .. } => {
                Err(ApiError::new(StatusCode::CONFLICT, "action_failed", error.clone()))
            }
        }
    }

    fn rules(&self) -> Value {
        let mut v = self.rules.lock().map(|v| v.clone()).unwrap_or(Value::Null);
        if let Ok(e) = self.engine.lock() {
            v["dry_run"] = json!(e.dry_run());
        }
        v
    }

    fn set_dry_run(&self, on: bool) -> Result<bool, ApiError> {
        let mut e = self.engine.lock().map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "engine lock poisoned")
        })?;
        e.set_dry_run(on);
        tracing::warn!(dry_run = on, "dry-run mode changed through the API");
        Ok(e.dry_run())
    }
}

impl crate::metrics::StateSource for Supervisor {
    fn states(&self) -> Vec<(String, String, InstanceState)> {
        self.instances().into_iter().map(|i| (i.service, i.id, i.state)).collect()
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
        let good = "rules:\n  - name: n\n    when:\n      - metric: cpu_cores\n        below: 1\n    action: notify\n";
        std::fs::write(&file, good).unwrap();
        let mut config = HealerConfig::default();
        config.rules = vec![dir.clone()];
        let status = Arc::new(Mutex::new(json!({})));
        let mut files = RuleFiles { config, stamps: Vec::new(), status: status.clone() };
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

    #[test]
    fn established_connections_by_local_port() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:46A0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:46A0 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n\
   2: 0100007F:D2F0 0100007F:46A0 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            established(text),
            vec![(18080, "0100007F:D2F0".to_string()), (54000, "0100007F:46A0".to_string())]
        );
        assert!(established("garbage\nx y z\n").is_empty());
    }
}
