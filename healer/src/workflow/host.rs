//! The steps that act on this host ([`HostSteps`], the runtime's [`StepRunner`]):
//!
//! - `restart`, `stop`, `hibernate`: each target instance's action goes through the safety gate and the
//!   executor like a rule's (audited under rule `workflow:NAME`); a refusal or failure fails the step.
//! - `drain`: the target instances leave the broker's routing ([`Held`]) while the run holds them, and the
//!   step waits for the requests the broker has at them to finish.
//! - `evacuate`: for a CPU, every running target instance whose cpuset allows it gets one without it (and
//!   without the cordoned CPUs), the kernel moving its threads; `restart: true` then restarts them. For a
//!   block device (which must be cordoned first), every target instance placed on it is restarted into
//!   its service's next `data_dirs` entry off the cordoned devices, and the step checks that it left the
//!   device; an instance whose service has no `data_dirs` cannot move, and the step fails naming it.
//! - `cpu_offline` / `cpu_online`: `/sys/devices/system/cpu/cpuN/online`; the last online CPU is never
//!   taken offline.
//! - `run`: the command with its arguments filled in, with `VIGIL_*` variables for the run; its exit code,
//!   output (the first 64 KiB of each stream) and duration are the step's output, a non-zero exit fails it.
//! - `wait_for`: a device's health (from the hardware monitor), or a metric of every target instance from
//!   the collector's snapshots, holding for the window without a break.
//!
//! A cordon on a device also takes the instances placed on it out of routing while it holds (and the broker
//! does not wake them for demand).
//!
//! Targets: the step's `instance_id` or `service` (a glob), else the run's `instance_id`, else the
//! instances placed on the run's resource (its `device` or `cpu`: see [`crate::placement`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vigil_cgroup::driver::CpuLimit;
use vigil_core::values::{HumanDuration, format_cpu_list};

use super::runner::{StepCtx, StepRunner};
use super::store::Cordon;
use super::{Glob, Health, StepKind, Targets, WaitCondition};
use crate::SnapshotReceiver;
use crate::actions::Actions;
use crate::engine::{BoxFuture, Outcome};
use crate::instance::blocking;
use crate::placement::{self, Held};
use crate::rules::{Action, InstanceState};
use crate::supervisor::{InstanceInfo, Supervisor};

/// Requests the broker has at an instance now (`None`: the broker does not know it).
pub trait InflightSource: Send + Sync + 'static {
    fn inflight(&self, instance_id: &str) -> Option<u32>;
}

/// A device's health now, with the reason.
pub trait HealthSource: Send + Sync + 'static {
    fn health(&self, device: &str) -> (Health, String);
}

/// Where the kernel's files are (tests point them at fixtures).
#[derive(Clone, Debug)]
pub struct HostPaths {
    pub cpu: PathBuf,
    pub proc: PathBuf,
    pub sys: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths { cpu: placement::CPU_DIR.into(), proc: "/proc".into(), sys: "/sys".into() }
    }
}

type Slot<T> = Arc<RwLock<Option<Arc<T>>>>;

/// The host's side of workflow steps. Cheap to clone.
#[derive(Clone)]
pub struct HostSteps {
    supervisor: Supervisor,
    actions: Arc<Actions>,
    held: Held,
    snapshots: SnapshotReceiver,
    inflight: Slot<dyn InflightSource>,
    health: Slot<dyn HealthSource>,
    paths: HostPaths,
}

/// How often conditions (in-flight requests, health, metrics) are looked at.
const POLL: Duration = Duration::from_millis(100);
/// The most of each output stream of a `run` step that is kept.
const OUTPUT_CAP: usize = 64 * 1024;
/// Instance actions wait this long for their decision (the step's own timeout usually ends them first).
const ACTION_WAIT: Duration = Duration::from_secs(600);

impl HostSteps {
    pub fn new(
        supervisor: Supervisor,
        actions: Arc<Actions>,
        held: Held,
        snapshots: SnapshotReceiver,
        paths: HostPaths,
    ) -> HostSteps {
        HostSteps {
            supervisor,
            actions,
            held,
            snapshots,
            inflight: Arc::default(),
            health: Arc::default(),
            paths,
        }
    }

    /// The broker's in-flight counts, for `drain`.
    pub fn attach_inflight(&self, source: Arc<dyn InflightSource>) {
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The hardware monitor's device health, for `wait_for: { device_health }`.
    pub fn attach_health(&self, source: Arc<dyn HealthSource>) {
        *self.health.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    fn inflight_source(&self) -> Option<Arc<dyn InflightSource>> {
        self.inflight.read().ok().and_then(|s| s.clone())
    }

    fn health_source(&self) -> Option<Arc<dyn HealthSource>> {
        self.health.read().ok().and_then(|s| s.clone())
    }

    /// The instances a step acts on (reads /proc and the cgroups: call it off the async workers).
    fn targets(&self, ctx: &StepCtx, t: &Targets) -> Result<Vec<InstanceInfo>, String> {
        let all = self.supervisor.instances();
        let by_id = |id: String| {
            all.iter()
                .find(|i| i.id == id)
                .cloned()
                .map(|i| vec![i])
                .ok_or_else(|| format!("no managed instance `{id}`"))
        };
        if let Some(id) = &t.instance_id {
            return by_id(ctx.fill(id));
        }
        if let Some(service) = &t.service {
            let glob = Glob::new(&ctx.fill(service))?;
            return Ok(all.iter().filter(|i| glob.matches(&i.service)).cloned().collect());
        }
        if let Some(id) = ctx.params.get("instance_id").filter(|i| !i.is_empty()) {
            return by_id(id.clone());
        }
        let Some(resource) = ctx.resource(None) else {
            return Err("the step names no instances, and the run has no device, cpu or instance_id".into());
        };
        self.placed_on(&resource, all)
    }

    /// The instances (not stopped) placed on `resource`: a CPU (`cpuN`) or a block device.
    fn placed_on(&self, resource: &str, all: Vec<InstanceInfo>) -> Result<Vec<InstanceInfo>, String> {
        let running = all.into_iter().filter(|i| i.state != InstanceState::Stopped);
        if let Some(cpu) = placement::cpu_number(resource) {
            let driver = self.supervisor.driver();
            let mut out = Vec::new();
            for i in running {
                let Some(cg) = self.supervisor.cgroup(&i.id) else { continue };
                let cpus = placement::instance_cpus(driver.as_ref(), &cg, &self.paths.cpu)
                    .map_err(|e| format!("the CPUs of `{}`: {e}", i.id))?;
                if placement::on_cpu(&cpus, cpu) {
                    out.push(i);
                }
            }
            return Ok(out);
        }
        let devs = placement::block_dev_numbers(&self.paths.sys, resource);
        if devs.is_empty() {
            return Err(format!("`{resource}` is neither a CPU (cpuN) nor a block device of this host"));
        }
        Ok(running.filter(|i| self.uses(i, &devs)).collect())
    }

    /// Whether instance `i` is on one of `devs`: its data directory, or its processes' files.
    fn uses(&self, i: &InstanceInfo, devs: &BTreeSet<(u32, u32)>) -> bool {
        i.data_dir.as_deref().is_some_and(|d| placement::path_on(Path::new(d), devs))
            || placement::uses_devices(&self.paths.proc, &i.pids, devs)
    }

    async fn targets_off_runtime(&self, ctx: &StepCtx, t: &Targets) -> Result<Vec<InstanceInfo>, String> {
        let (me, ctx, t) = (self.clone(), ctx.clone(), t.clone());
        blocking(move || me.targets(&ctx, &t)).await
    }

    /// `action` on every target, each through the gate; fails if any is refused or fails.
    async fn instance_action(&self, ctx: &StepCtx, action: Action, t: &Targets) -> Result<Value, String> {
        let targets = self.targets_off_runtime(ctx, t).await?;
        let rule = format!("workflow:{}", ctx.workflow);
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for i in &targets {
            let mut submitted =
                self.actions.submit(self.actions.proposal(&rule, action, &i.service, &i.id)).await;
            let outcome = match submitted.wait(ACTION_WAIT).await {
                None => Err(format!("no decision within {}", HumanDuration(ACTION_WAIT))),
                Some(d) => match d.outcome {
                    Outcome::Succeeded { .. } => Ok("succeeded".to_string()),
                    Outcome::DryRun => Ok("dry_run".to_string()),
                    Outcome::Refused { reason } => Err(format!("refused by the safety gate: {reason:?}")),
                    Outcome::Failed { error, .. } => Err(error),
                },
            };
            match outcome {
                Ok(o) => done.push(json!({"instance_id": i.id, "outcome": o})),
                Err(e) => {
                    done.push(json!({"instance_id": i.id, "outcome": "failed", "error": e}));
                    failed.push(format!("{} of `{}`: {e}", action.as_str(), i.id));
                }
            }
        }
        if failed.is_empty() { Ok(json!({ "instances": done })) } else { Err(failed.join("; ")) }
    }

    async fn drain(&self, ctx: &StepCtx, timeout: Duration, t: &Targets) -> Result<Value, String> {
        let targets = self.targets_off_runtime(ctx, t).await?;
        let ids: Vec<String> = targets.iter().map(|i| i.id.clone()).collect();
        for id in &ids {
            self.held.hold(id, ctx.run_id);
        }
        self.supervisor.nudge();
        let Some(source) = self.inflight_source() else {
            return Ok(
                json!({"held": ids, "broker": false, "note": "no broker runs: Vigil routes nothing to them"}),
            );
        };
        let started = Instant::now();
        loop {
            let left: Vec<(String, u32)> = ids
                .iter()
                .filter_map(|id| source.inflight(id).filter(|n| *n > 0).map(|n| (id.clone(), n)))
                .collect();
            if left.is_empty() {
                return Ok(
                    json!({"held": ids, "broker": true, "waited_seconds": started.elapsed().as_secs_f64()}),
                );
            }
            if started.elapsed() >= timeout {
                let list: Vec<String> = left.iter().map(|(id, n)| format!("{id}: {n}")).collect();
                return Err(format!(
                    "requests still in flight after {} ({}); the instances stay out of routing",
                    HumanDuration(timeout),
                    list.join(", ")
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn evacuate(&self, ctx: &StepCtx, t: &Targets, restart: bool) -> Result<Value, String> {
        let Some(resource) = ctx.resource(None) else {
            return Err("evacuate needs the run's cpu (or device) to move instances off".into());
        };
        match placement::cpu_number(&resource) {
            Some(cpu) => self.evacuate_cpu(ctx, t, restart, cpu).await,
            None => self.evacuate_device(ctx, t, resource).await,
        }
    }

    /// Restarts the target instances on `device` into their next data directory, and checks they left it.
    async fn evacuate_device(&self, ctx: &StepCtx, t: &Targets, device: String) -> Result<Value, String> {
        let (me, c, tt, dev) = (self.clone(), ctx.clone(), t.clone(), device.clone());
        let (targets, devs) = blocking(move || {
            let devs = placement::block_dev_numbers(&me.paths.sys, &dev);
            if devs.is_empty() {
                return Err(format!("`{dev}` is neither a CPU (cpuN) nor a block device of this host"));
            }
            if !me.supervisor.cordoned().devices().contains_key(&dev) {
                return Err(format!(
                    "`{dev}` is not cordoned: cordon it first (a `cordon` step before this one), so that the \
                     instances restart elsewhere"
                ));
            }
            let targets: Vec<InstanceInfo> = me
                .targets(&c, &tt)?
                .into_iter()
                .filter(|i| i.state != InstanceState::Stopped && me.uses(i, &devs))
                .collect();
            for i in &targets {
                if me.supervisor.spec(&i.id).is_none_or(|s| s.data_dirs.is_empty()) {
                    return Err(format!(
                        "`{}` uses {dev}, but its service `{}` has no data_dirs to move to: drain it, then \
                         stop it",
                        i.id, i.service
                    ));
                }
            }
            Ok((targets, devs))
        })
        .await?;
        let mut moved = Vec::new();
        for i in &targets {
            let one = Targets { instance_id: Some(Arc::from(i.id.as_str())), service: None };
            let restart = self.instance_action(ctx, Action::Restart, &one).await?;
            moved.push((i.id.clone(), i.data_dir.clone(), restart));
        }
        let me = self.clone();
        blocking(move || {
            let mut out = Vec::new();
            for (id, from, restart) in moved {
                let now = me.supervisor.instance(&id).ok_or_else(|| format!("`{id}` is gone"))?;
                if me.uses(&now, &devs) {
                    return Err(format!(
                        "`{id}` still uses {device} after its restart (data directory {}): its processes \
                         have files there",
                        now.data_dir.as_deref().unwrap_or("-")
                    ));
                }
                // Off the failing device, it serves again (the drain held it for the device's sake).
                me.held.release(&id);
                out.push(json!({"instance_id": id, "from": from, "to": now.data_dir, "restart": restart}));
            }
            me.supervisor.nudge();
            Ok(json!({"device": device, "moved": out}))
        })
        .await
    }

    /// Moves the target instances' cpusets off `cpu` (and restarts them, with `restart`).
    async fn evacuate_cpu(
        &self,
        ctx: &StepCtx,
        t: &Targets,
        restart: bool,
        cpu: u32,
    ) -> Result<Value, String> {
        let targets = self.targets_off_runtime(ctx, t).await?;
        let (supervisor, paths) = (self.supervisor.clone(), self.paths.clone());
        let moved = blocking(move || {
            let driver = supervisor.driver();
            let avoid = supervisor.cordoned().get();
            let mut moved = Vec::new();
            for i in targets.iter().filter(|i| i.state == InstanceState::Active) {
                let Some(cg) = supervisor.cgroup(&i.id) else { continue };
                let now = driver.cpu(&cg).map_err(|e| format!("the CPUs of `{}`: {e}", i.id))?;
                let cpus = placement::allowed_cpus(&now, &paths.cpu)?;
                if !cpus.contains(&cpu) {
                    continue;
                }
                let allowed: Vec<u32> =
                    cpus.iter().copied().filter(|c| *c != cpu && !avoid.contains(c)).collect();
                if allowed.is_empty() {
                    return Err(format!("`{}` has no CPU left to run on without cpu{cpu}", i.id));
                }
                let list = format_cpu_list(&allowed);
                driver
                    .set_cpu(&cg, &CpuLimit { cpus: Some(list.clone()), quota: now.quota })
                    .map_err(|e| format!("moving `{}` off cpu{cpu}: {e}", i.id))?;
                moved.push((i.id.clone(), i.service.clone(), list));
            }
            Ok(moved)
        })
        .await?;
        let mut out: Vec<Value> =
            moved.iter().map(|(id, _, cpus)| json!({"instance_id": id, "cpus": cpus})).collect();
        if restart && !moved.is_empty() {
            let ids: BTreeSet<&str> = moved.iter().map(|(id, _, _)| id.as_str()).collect();
            for id in ids {
                let one = Targets { instance_id: Some(Arc::from(id)), service: None };
                let r = self.instance_action(ctx, Action::Restart, &one).await?;
                out.push(json!({"instance_id": id, "restart": r}));
            }
        }
        Ok(json!({"cpu": cpu, "moved": out}))
    }

    async fn cpu_online(&self, ctx: &StepCtx, own: Option<&str>, online: bool) -> Result<Value, String> {
        let cpu = match own.map(|c| ctx.fill(c)).or_else(|| ctx.params.get("cpu").cloned()) {
            Some(c) => c
                .trim_start_matches("cpu")
                .parse::<u32>()
                .map_err(|_| format!("`{c}` is not a CPU number"))?,
            None => return Err("the step names no cpu and the run has none".into()),
        };
        let (dir, me) = (self.paths.cpu.clone(), self.clone());
        blocking(move || {
            let path = dir.join(format!("cpu{cpu}/online"));
            let was = std::fs::read_to_string(&path)
                .map_err(|e| format!("cpu{cpu} cannot be switched: {}: {e}", path.display()))?;
            let was_online = was.trim() == "1";
            if was_online == online {
                return Ok(json!({"cpu": cpu, "was_online": was_online, "online": online}));
            }
            if !online {
                let up = placement::online_cpus(&dir)?;
                if up.len() <= 1 {
                    return Err(format!("cpu{cpu} is the last online CPU: it stays online"));
                }
            }
            std::fs::write(&path, if online { "1" } else { "0" })
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            let mut out = json!({"cpu": cpu, "was_online": was_online, "online": online});
            if online {
                out["widened"] = json!(me.cpus_back()?);
            }
            Ok(out)
        })
        .await
    }

    /// A CPU came back: Vigil's cgroup levels get it again (v1 cpusets lost it), and every active
    /// instance gets the CPUs an instance starting now would (every online CPU but the cordoned ones).
    /// Answers the instances widened.
    fn cpus_back(&self) -> Result<Vec<String>, String> {
        let driver = self.supervisor.driver();
        let limit = self.supervisor.cordoned().active_limit();
        let mut widened = Vec::new();
        for i in self.supervisor.instances() {
            let Some(cg) = self.supervisor.cgroup(&i.id) else { continue };
            driver.cpus_back(&cg).map_err(|e| format!("giving the CPU back to `{}`'s cgroups: {e}", i.id))?;
            if i.state != InstanceState::Active {
                continue;
            }
            let now = driver.cpu(&cg).map_err(|e| format!("the CPUs of `{}`: {e}", i.id))?;
            let want = CpuLimit { cpus: limit.cpus.clone(), quota: now.quota };
            driver.set_cpu(&cg, &want).map_err(|e| format!("widening `{}`: {e}", i.id))?;
            widened.push(i.id);
        }
        Ok(widened)
    }

    async fn run_command(&self, ctx: &StepCtx, command: &[Arc<str>]) -> Result<Value, String> {
        let args: Vec<String> = command.iter().map(|a| ctx.fill(a)).collect();
        let Some((program, rest)) = args.split_first() else { return Err("an empty command".into()) };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(rest)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .env("VIGIL_RUN_ID", ctx.run_id.to_string())
            .env("VIGIL_WORKFLOW", &*ctx.workflow)
            .env("VIGIL_STEP", &*ctx.step)
            .env("VIGIL_ATTEMPT", ctx.attempt.to_string());
        for (k, v) in &ctx.params {
            cmd.env(format!("VIGIL_PARAM_{}", env_name(k)), v);
        }
        let started = Instant::now();
        let out = cmd.output().await.map_err(|e| format!("cannot run `{program}`: {e}"))?;
        let (stdout, stderr) = (capped(&out.stdout), capped(&out.stderr));
        let seconds = started.elapsed().as_secs_f64();
        let code = out.status.code();
        let body = json!({"command": args, "exit_code": code, "stdout": stdout, "stderr": stderr, "seconds": seconds});
        if out.status.success() {
            return Ok(body);
        }
        let how = match code {
            Some(c) => format!("exited with {c}"),
            None => "was killed by a signal".to_string(),
        };
        let tail: String = {
            let s = if stderr.trim().is_empty() { &stdout } else { &stderr };
            let t = s.trim_end();
            t.char_indices().rev().nth(499).map_or(t, |(i, _)| &t[i..]).to_string()
        };
        Err(if tail.is_empty() { format!("`{program}` {how}") } else { format!("`{program}` {how}: {tail}") })
    }

    async fn wait_for(
        &self,
        ctx: &StepCtx,
        condition: &WaitCondition,
        hold: Duration,
    ) -> Result<Value, String> {
        let mut since: Option<Instant> = None;
        let started = Instant::now();
        loop {
            let (holds, what) = match condition {
                WaitCondition::DeviceHealth { state, device } => {
                    let device = match device
                        .as_ref()
                        .map(|d| ctx.fill(d))
                        .or_else(|| ctx.params.get("device").cloned())
                    {
                        Some(d) if !d.is_empty() => d,
                        _ => return Err("the step names no device and the run has none".into()),
                    };
                    let Some(source) = self.health_source() else {
                        return Err(
                            "no hardware monitor runs (config hardware:), so device health is unknown".into(),
                        );
                    };
                    let (now, reason) = source.health(&device);
                    (now == *state, json!({"device": device, "health": now.as_str(), "reason": reason}))
                }
                WaitCondition::Metric { metric, bounds, targets } => {
                    let ids: BTreeSet<String> =
                        self.targets_off_runtime(ctx, targets).await?.into_iter().map(|i| i.id).collect();
                    if ids.is_empty() {
                        return Err("no instances to read the metric of".into());
                    }
                    let snapshot = self.snapshots.borrow().clone();
                    let values: BTreeMap<String, Option<f64>> = ids
                        .iter()
                        .map(|id| {
                            let v = snapshot
                                .instances
                                .iter()
                                .find(|s| *s.instance_id == **id)
                                .and_then(|s| crate::rules::metric_value(*metric, s));
                            (id.clone(), v)
                        })
                        .collect();
                    let all = values.values().all(|v| v.is_some_and(|v| bounds.holds(v)));
                    (all, json!({"metric": metric.as_str(), "values": values}))
                }
            };
            if holds {
                let at = *since.get_or_insert_with(Instant::now);
                if at.elapsed() >= hold {
                    return Ok(json!({"held_seconds": at.elapsed().as_secs_f64(),
                        "waited_seconds": started.elapsed().as_secs_f64(), "last": what}));
                }
            } else {
                since = None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl StepRunner for HostSteps {
    fn run(&self, ctx: StepCtx, kind: StepKind) -> BoxFuture<'static, Result<Value, String>> {
        let me = self.clone();
        Box::pin(async move {
            match &kind {
                StepKind::Restart(t) => me.instance_action(&ctx, Action::Restart, t).await,
                StepKind::Stop(t) => me.instance_action(&ctx, Action::Stop, t).await,
                StepKind::Hibernate(t) => me.instance_action(&ctx, Action::Hibernate, t).await,
                StepKind::Drain { timeout, targets } => me.drain(&ctx, *timeout, targets).await,
                StepKind::Evacuate { targets, restart } => me.evacuate(&ctx, targets, *restart).await,
                StepKind::CpuOffline { cpu } => me.cpu_online(&ctx, cpu.as_deref(), false).await,
                StepKind::CpuOnline { cpu } => me.cpu_online(&ctx, cpu.as_deref(), true).await,
                StepKind::Run { command, .. } => me.run_command(&ctx, command).await,
                StepKind::WaitFor { condition, hold } => me.wait_for(&ctx, condition, *hold).await,
                // The runtime carries these out itself; reaching here is a bug in the runtime.
                StepKind::Cordon { .. }
                | StepKind::Uncordon { .. }
                | StepKind::Notify { .. }
                | StepKind::Approve { .. } => {
                    Err(format!("`{}` is the workflow runtime's own step", kind.as_str()))
                }
            }
        })
    }

    fn plan(&self, ctx: StepCtx, kind: StepKind) -> BoxFuture<'static, Result<Value, String>> {
        let me = self.clone();
        Box::pin(async move {
            let mut plan = json!({ "dry_run": true, "would": kind.as_str(), "params": ctx.params });
            let targets = match &kind {
                StepKind::Restart(t) | StepKind::Stop(t) | StepKind::Hibernate(t) => Some(t.clone()),
                StepKind::Drain { targets, .. } | StepKind::Evacuate { targets, .. } => Some(targets.clone()),
                StepKind::WaitFor { condition: WaitCondition::Metric { targets, .. }, .. } => {
                    Some(targets.clone())
                }
                _ => None,
            };
            if let Some(t) = targets {
                // Which instances it would act on now; a mistake here is what the real run would meet.
                let ids: Vec<String> =
                    me.targets_off_runtime(&ctx, &t).await?.into_iter().map(|i| i.id).collect();
                plan["instances"] = json!(ids);
            }
            match &kind {
                StepKind::Run { command, .. } => {
                    plan["command"] = json!(command.iter().map(|a| ctx.fill(a)).collect::<Vec<_>>());
                }
                StepKind::CpuOffline { cpu } | StepKind::CpuOnline { cpu } => {
                    plan["cpu"] =
                        json!(cpu.as_ref().map(|c| ctx.fill(c)).or_else(|| ctx.params.get("cpu").cloned()));
                }
                _ => {}
            }
            Ok(plan)
        })
    }

    fn changed(&self, cordons: &BTreeMap<String, Cordon>) {
        // A few short sysfs reads (no disk behind them): done here, so that the next start sees them.
        self.supervisor.cordoned().set_from(cordons.keys().map(String::as_str), &self.paths.sys);
        // The instances placed on a cordoned device leave routing while the cordon holds (the run that
        // placed it holds them); reading their open files is work for a blocking thread.
        let devices: Vec<(String, u64)> = cordons
            .iter()
            .filter(|(r, _)| placement::cpu_number(r).is_none())
            .map(|(r, c)| (r.clone(), c.run_id))
            .collect();
        if !devices.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let me = self.clone();
            rt.spawn_blocking(move || {
                for (device, run) in devices {
                    match me.placed_on(&device, me.supervisor.instances()) {
                        Ok(placed) => {
                            for i in placed {
                                me.held.hold(&i.id, run);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(device = %device, "cordoned, but its instances are unknown: {e}")
                        }
                    }
                }
                me.supervisor.nudge();
            });
        }
        // Drained instances of runs that let go become routable again.
        self.supervisor.nudge();
    }
}

/// A parameter name as an environment variable's suffix: upper case, anything else `_`.
fn env_name(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// At most [`OUTPUT_CAP`] bytes of `bytes` as text, saying when cut.
fn capped(bytes: &[u8]) -> String {
    if bytes.len() <= OUTPUT_CAP {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut s = String::from_utf8_lossy(&bytes[..OUTPUT_CAP]).into_owned();
    s.push_str(&format!("\n[{} more bytes not kept]", bytes.len() - OUTPUT_CAP));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_environment_names() {
        assert_eq!(env_name("device"), "DEVICE");
        assert_eq!(env_name("alert.name-x"), "ALERT_NAME_X");
    }

    #[test]
    fn output_is_capped_and_says_so() {
        assert_eq!(capped(b"ok\n"), "ok\n");
        let big = vec![b'a'; OUTPUT_CAP + 10];
        let s = capped(&big);
        assert!(s.ends_with("[10 more bytes not kept]"), "{}", &s[s.len() - 40..]);
    }
}
