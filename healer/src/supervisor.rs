//! Managed services: the instances Vigil itself starts from the config's `services:` list (DESIGN §4).
//!
//! [`Supervisor::start`] creates every instance's cgroups through the [`CgroupDriver`] and runs one task
//! per instance ([`crate::instance`]), which owns the child process and the instance's lifecycle. The
//! supervisor is the handle on them: it lists what the tasks publish, routes requests to them
//! ([`Supervisor::request`] answers at once; the outcome follows), and on [`Supervisor::shutdown`] has
//! every task stop its instance gracefully (SIGTERM to its process group, SIGKILL after the grace period)
//! before it removes the cgroups.
//!
//! Each child leads its own process group, so signals reach everything the service forked. Children inherit
//! Vigil's stdout and stderr: a service's own logs stay as the service wrote them. Children are spawned with
//! `kill_on_drop`, so a runtime torn down without `shutdown` still kills (but cannot gracefully stop) them.
//!
//! The pure pieces ([`substitute_port`], [`parse_http_status`], spec validation) are plain functions with
//! unit tests; the process and cgroup handling is checked by `tests/supervisor.rs` (root).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cgroup::{CgroupDriver, CgroupDriverError, InstanceCgroup};
use crate::engine::{BoxFuture, Started};
use crate::instance::{Board, Command, Context, Finished, InstanceTask};
pub use crate::instance::{Hook, PORT_PLACEHOLDER, StandbyRecord, parse_http_status, substitute_port};
use crate::lifecycle::{Answer, Goal, Request};
use crate::metrics::StandbyMetrics;
use crate::rules::{Action, InstanceState};
pub use crate::service::{DEFAULT_VERSION, InvalidService, Readiness, ServiceSpec, StartPolicy};
use crate::standby::{KernelMemory, MemoryOps, StandbyPolicy};

/// How long `shutdown` waits for a stopped instance's cgroups to empty before killing what is left.
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued per instance task; more wait for room (each is answered within one operation step).
const COMMAND_QUEUE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    InvalidSpec(#[from] InvalidService),
    #[error("Supervisor::start must be called within a tokio runtime")]
    NoRuntime,
    #[error("no managed instance {id:?}")]
    UnknownInstance { id: String },
    #[error("instance {id}: cgroups: {source}")]
    Cgroup {
        id: String,
        #[source]
        source: CgroupDriverError,
    },
    #[error("instance {id} did not pass its readiness check within {timeout:?}")]
    NotReady { id: String, timeout: Duration },
    #[error("instance {id}: {hook} hook: {reason}")]
    Hook { id: String, hook: &'static str, reason: String },
}

/// A managed instance as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceInfo {
    /// `<service>-<n>`, `n` from 0.
    pub id: String,
    pub service: String,
    pub state: InstanceState,
    /// Every process in the instance's cgroup (empty once stopped).
    pub pids: Vec<u32>,
    /// The process Vigil spawned (the service after exec), while it runs.
    pub main_pid: Option<u32>,
    pub port: u16,
    /// How often the instance was started again after it exited.
    pub restarts: u32,
    /// The instance's v2 cgroup path, relative to the v2 root.
    pub cgroup: String,
    /// The service the broker routes it under (`serves`, or the service's own name).
    pub serves: String,
    /// The version the broker files it under.
    pub version: String,
    /// The last thing that went wrong (a failed hook, wake, readiness check, an exit), kept after the
    /// instance recovered.
    pub last_failure: Option<String>,
    /// What the last hibernation and wake did.
    pub standby: Option<StandbyRecord>,
    /// The data directory (one of the service's `data_dirs`) of its last start.
    pub data_dir: Option<String>,
}

/// One managed instance as its task last published it, with its place in its service: what the
/// autoscaler plans with (`crate::autoscale::tiers`).
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub id: String,
    /// Its index in the service (`api-3` is 3): ids stay stable, lower ones are used first.
    pub index: u32,
    pub port: u16,
    pub state: InstanceState,
    pub goal: Goal,
    /// An operation is under way: it takes no request now.
    pub busy: bool,
    /// It has run before (a stopped instance that ran is preferred to one that never did: its files
    /// and caches are warm).
    pub ran: bool,
}

/// How the supervisor runs instances: the standby's memory operations and policy, stop grace, readiness
/// timeout.
pub struct Settings {
    pub memory: Arc<dyn MemoryOps>,
    pub policy: StandbyPolicy,
    pub metrics: StandbyMetrics,
    pub stop_grace: Duration,
    pub ready_timeout: Duration,
    /// Services the autoscaler sizes, by name: their instances replace the fixed `instances` count.
    pub scaled: BTreeMap<String, ScaledSlots>,
    /// CPUs cordoned by workflows (shared with the workflow runtime).
    pub cordoned: crate::placement::Cordoned,
    /// Where each instance last kept its data.
    pub data_dirs: crate::placement::DataDirs,
}

/// The instances of a service the autoscaler sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaledSlots {
    /// Instances `0..max` exist (ids stay stable); those not needed wait stopped.
    pub max: u32,
    /// The first `serving` start at once.
    pub serving: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            memory: Arc::new(KernelMemory),
            policy: StandbyPolicy::default(),
            metrics: StandbyMetrics::default(),
            stop_grace: Duration::from_secs(10),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            scaled: BTreeMap::new(),
            cordoned: crate::placement::Cordoned::default(),
            data_dirs: crate::placement::DataDirs::default(),
        }
    }
}

/// Readiness after a start or a wake must pass within this long, unless a service says otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request an instance accepted: its outcome arrives on `done` once the instance settles.
pub struct Ticket {
    pub done: oneshot::Receiver<Finished>,
}

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotAccepted {
    UnknownInstance,
    /// Already in the requested state: nothing to do.
    AlreadyThere,
    Busy(InstanceState),
    Refused(String),
}

/// A cloneable handle on the managed instances.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<Context>,
    /// Fixed at start: the instances and their tasks' command channels.
    slots: BTreeMap<String, Slot>,
    /// `Some(grace)` once shutdown began; every instance task watches it.
    stop: watch::Sender<Option<Duration>>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Instances whose cgroups shutdown removed.
    removed: std::sync::Mutex<BTreeSet<String>>,
}

struct Slot {
    spec: Arc<ServiceSpec>,
    index: u32,
    port: u16,
    cg: InstanceCgroup,
    commands: mpsc::Sender<Command>,
}

impl Supervisor {
    /// [`Supervisor::start_with`] with the default settings (the real kernel's memory operations).
    pub fn start(
        specs: Vec<ServiceSpec>,
        driver: Arc<dyn CgroupDriver>,
    ) -> Result<Supervisor, SupervisorError> {
        Self::start_with(specs, driver, Settings::default())
    }

    /// Validates `specs`, creates every instance's cgroups and spawns one task per instance. Must be called
    /// within a tokio runtime. On a cgroup error, the cgroups created so far are removed again.
    pub fn start_with(
        specs: Vec<ServiceSpec>,
        driver: Arc<dyn CgroupDriver>,
        settings: Settings,
    ) -> Result<Supervisor, SupervisorError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SupervisorError::NoRuntime)?;
        let mut names = BTreeSet::new();
        for spec in &specs {
            spec.validate()?;
            if !names.insert(spec.name.clone()) {
                return Err(
                    InvalidService { service: spec.name.clone(), reason: "declared twice".into() }.into()
                );
            }
        }
        let ctx = Arc::new(Context {
            driver: driver.clone(),
            memory: settings.memory,
            policy: settings.policy,
            metrics: settings.metrics,
            stop_grace: settings.stop_grace,
            ready_timeout: settings.ready_timeout,
            board: Arc::new(Board::new()),
            cordoned: settings.cordoned,
            data_dirs: settings.data_dirs,
        });
        let mut created: Vec<(String, Arc<ServiceSpec>, u32, InstanceCgroup)> = Vec::new();
        for spec in specs {
            let spec = Arc::new(spec);
            let slots = settings.scaled.get(&spec.name).map_or(spec.instances, |s| s.max);
            for index in 0..slots {
                let id = spec.instance_id(index);
                match driver.create(&spec.name, &id) {
                    Ok(cg) => created.push((id, spec.clone(), index, cg)),
                    Err(source) => {
                        for (_, _, _, cg) in &created {
                            let _ = driver.remove(cg);
                        }
                        return Err(SupervisorError::Cgroup { id, source });
                    }
                }
            }
        }
        let (stop, _) = watch::channel(None);
        let mut slots = BTreeMap::new();
        let mut handles = Vec::new();
        for (id, spec, index, cg) in created {
            let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
            let (serve_at_start, stoppable) = match settings.scaled.get(&spec.name) {
                Some(scaled) => (index < scaled.serving, true),
                None => {
                    let on_demand = spec.start == StartPolicy::OnDemand;
                    (!on_demand, on_demand)
                }
            };
            let port = spec.port_of(index);
            let task = InstanceTask {
                id: id.clone(),
                spec: spec.clone(),
                port,
                cg: cg.clone(),
                ctx: ctx.clone(),
                serve_at_start,
                stoppable,
            };
            task.announce();
            handles.push(runtime.spawn(task.run(rx, stop.subscribe())));
            slots.insert(id, Slot { spec, index, port, cg, commands });
        }
        let inner = Arc::new(Inner {
            ctx,
            slots,
            stop,
            tasks: tokio::sync::Mutex::new(handles),
            removed: std::sync::Mutex::new(BTreeSet::new()),
        });
        Ok(Supervisor { inner })
    }

    /// Every managed instance, ordered by id. Reads each instance's `cgroup.procs`: call it off the async
    /// runtime's workers.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let views = self.inner.ctx.board.views();
        self.inner
            .slots
            .iter()
            .filter_map(|(id, slot)| Some(self.info(id, slot, views.get(id)?.clone())))
            .collect()
    }

    pub fn instance(&self, id: &str) -> Option<InstanceInfo> {
        let slot = self.inner.slots.get(id)?;
        Some(self.info(id, slot, self.inner.ctx.board.view(id)?))
    }

    /// The state of an instance as its task last published it; reads nothing from the kernel.
    pub fn state(&self, id: &str) -> Option<InstanceState> {
        self.inner.ctx.board.view(id).map(|v| v.state)
    }

    /// Whether an operation is under way on the instance.
    pub fn busy(&self, id: &str) -> bool {
        self.inner.ctx.board.view(id).is_some_and(|v| v.busy)
    }

    /// `(id, service, serves, state)` of every instance, without reading the kernel.
    pub fn states(&self) -> Vec<(String, String, String, InstanceState)> {
        let views = self.inner.ctx.board.views();
        self.inner
            .slots
            .iter()
            .filter_map(|(id, s)| {
                let state = views.get(id)?.state;
                Some((id.clone(), s.spec.name.clone(), s.spec.routed_name().to_string(), state))
            })
            .collect()
    }

    /// The instances of managed service `service` (its name, not the name it is routed by), for the
    /// autoscaler, without reading the kernel.
    pub fn members(&self, service: &str) -> Vec<Member> {
        let views = self.inner.ctx.board.views();
        self.inner
            .slots
            .iter()
            .filter(|(_, s)| s.spec.name == service)
            .filter_map(|(id, s)| {
                let v = views.get(id)?;
                Some(Member {
                    id: id.clone(),
                    index: s.index,
                    port: s.port,
                    state: v.state,
                    goal: v.goal,
                    busy: v.busy,
                    ran: v.ran,
                })
            })
            .collect()
    }

    fn info(&self, id: &str, slot: &Slot, view: crate::instance::View) -> InstanceInfo {
        let removed = self.inner.removed.lock().map(|r| r.contains(id)).unwrap_or(false);
        let pids =
            if removed { Vec::new() } else { self.inner.ctx.driver.pids(&slot.cg).unwrap_or_default() };
        InstanceInfo {
            id: id.to_owned(),
            service: slot.spec.name.clone(),
            state: view.state,
            pids,
            main_pid: view.main_pid,
            port: slot.port,
            restarts: view.restarts,
            cgroup: slot.cg.v2_rel.clone(),
            serves: slot.spec.routed_name().to_string(),
            version: slot.spec.version.clone(),
            last_failure: view.last_failure,
            standby: view.standby,
            data_dir: view.data_dir,
        }
    }

    /// Asks an instance's task for `request`. Answers as soon as the task has looked at it: a ticket for
    /// the outcome when accepted, otherwise why not. Never waits for an operation.
    pub async fn request(&self, id: &str, request: Request) -> Result<Ticket, NotAccepted> {
        let slot = self.inner.slots.get(id).ok_or(NotAccepted::UnknownInstance)?;
        let (ack, ack_rx) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        let gone =
            || NotAccepted::Refused(format!("`{id}` is no longer supervised (Vigil is shutting down)"));
        slot.commands.send(Command { request, ack, done }).await.map_err(|_| gone())?;
        match ack_rx.await.map_err(|_| gone())? {
            Answer::Accepted => Ok(Ticket { done: done_rx }),
            Answer::AlreadyThere => Err(NotAccepted::AlreadyThere),
            Answer::Busy(state) => Err(NotAccepted::Busy(state)),
            Answer::Refused(reason) => Err(NotAccepted::Refused(format!("`{id}`: {reason}"))),
        }
    }

    /// Starts an on-demand instance that is parked. Returns false for an unknown id or an instance that
    /// is not waiting to start.
    pub async fn start_on_demand(&self, id: &str) -> bool {
        self.request(id, Request::Start).await.is_ok()
    }

    /// A receiver that sees a change whenever any instance's state (or process) changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.ctx.board.changes()
    }

    /// Tells [`Supervisor::changes`] readers that what they may route to changed (a drain, a cordon).
    pub fn nudge(&self) {
        self.inner.ctx.board.nudge();
    }

    /// The cgroup driver the instances run under.
    pub fn driver(&self) -> &Arc<dyn CgroupDriver> {
        &self.inner.ctx.driver
    }

    /// The CPUs cordoned by workflows, which starts, restores and wakes leave out.
    pub fn cordoned(&self) -> &crate::placement::Cordoned {
        &self.inner.ctx.cordoned
    }

    pub fn cgroup(&self, id: &str) -> Option<InstanceCgroup> {
        self.inner.slots.get(id).map(|s| s.cg.clone())
    }

    pub fn spec(&self, id: &str) -> Option<ServiceSpec> {
        self.inner.slots.get(id).map(|s| (*s.spec).clone())
    }

    /// `(instances, in standby or in transition)` of a service.
    pub fn standby_counts(&self, service: &str) -> (usize, usize) {
        let states: Vec<InstanceState> =
            self.states().into_iter().filter(|(_, s, _, _)| s == service).map(|(_, _, _, st)| st).collect();
        let standby = states
            .iter()
            .filter(|s| {
                matches!(s, InstanceState::Hibernating | InstanceState::Hibernated | InstanceState::Waking)
            })
            .count();
        (states.len(), standby)
    }

    /// Runs the readiness check every 100 ms until it passes or `timeout` elapses.
    pub async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let slot =
            self.inner.slots.get(id).ok_or_else(|| SupervisorError::UnknownInstance { id: id.to_owned() })?;
        crate::instance::wait_ready(&slot.spec.readiness, slot.port, timeout)
            .await
            .map_err(|_| SupervisorError::NotReady { id: id.to_owned(), timeout })
    }

    /// One readiness probe now; false for an unknown id.
    pub async fn check_ready(&self, id: &str) -> bool {
        match self.inner.slots.get(id) {
            Some(slot) => crate::instance::probe(&slot.spec.readiness, slot.port).await,
            None => false,
        }
    }

    /// Runs the instance's pre-hibernate or post-wake hook (see [`crate::instance::run_hook`]).
    pub async fn run_hook(&self, id: &str, hook: Hook) -> Result<(), SupervisorError> {
        let slot =
            self.inner.slots.get(id).ok_or_else(|| SupervisorError::UnknownInstance { id: id.to_owned() })?;
        let data_dir = self.inner.ctx.board.view(id).and_then(|v| v.data_dir);
        crate::instance::run_hook(id, &slot.spec, slot.port, data_dir.as_deref(), hook)
            .await
            .map_err(|reason| SupervisorError::Hook { id: id.to_owned(), hook: hook.name(), reason })
    }

    /// Stops every instance (SIGTERM to its process group, SIGKILL after `grace`), reaps it and removes its
    /// cgroups. Idempotent; the first call's grace wins.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stop.send_if_modified(|stop| {
            if stop.is_none() {
                *stop = Some(grace);
                true
            } else {
                false
            }
        });
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *self.inner.tasks.lock().await);
        for handle in handles {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "instance task ended abnormally");
            }
        }
        let removed = self.inner.removed.lock().map(|r| r.clone()).unwrap_or_default();
        for (id, slot) in self.inner.slots.iter().filter(|(id, _)| !removed.contains(*id)) {
            let driver = self.inner.ctx.driver.clone();
            let cg = slot.cg.clone();
            match tokio::task::spawn_blocking(move || remove_cgroups(&*driver, &cg)).await {
                Ok(Ok(())) => {
                    if let Ok(mut r) = self.inner.removed.lock() {
                        r.insert(id.clone());
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(instance_id = %id, error = %e, "cannot remove instance cgroups")
                }
                Err(e) => tracing::error!(instance_id = %id, error = %e, "cgroup removal panicked"),
            }
        }
    }
}

/// The executor of the healer's actions on managed instances: each becomes a request to the instance's
/// task, answered at once; the outcome arrives when the instance settles.
impl crate::engine::Executor for Supervisor {
    fn start<'a>(&'a self, action: Action, _service: &'a str, id: &'a str) -> BoxFuture<'a, Started> {
        Box::pin(async move {
            let request = match action {
                Action::Hibernate => Request::Hibernate,
                Action::Wake => Request::Wake,
                Action::Restart => Request::Restart,
                Action::Stop => Request::Stop,
                Action::Start => Request::Start,
                // Sent with the decision's record (`crate::actions`), never asked of an instance.
                Action::Notify => {
                    return Started::Finished(Err(format!(
                        "notify is sent to the rule's receivers, not done to `{id}`"
                    )));
                }
                // Started by the workflow runtime (`crate::actions`), never asked of an instance.
                Action::Workflow => {
                    return Started::Finished(Err(format!(
                        "a workflow is started by the workflow runtime, not done to `{id}`"
                    )));
                }
            };
            match self.request(id, request).await {
                Ok(ticket) => {
                    let id = id.to_string();
                    Started::Running(Box::pin(async move {
                        let finished =
                            ticket.done.await.map_err(|_| format!("`{id}` stopped being supervised"))?;
                        let reached = finished.state == request.target();
                        match (finished.failure, reached) {
                            (None, true) => Ok(()),
                            (Some(failure), true) => Err(format!(
                                "{failure} (recovered: `{id}` is {} now)",
                                finished.state.as_str()
                            )),
                            (Some(failure), false) => {
                                Err(format!("{failure} (`{id}` is {} now)", finished.state.as_str()))
                            }
                            (None, false) => Err(format!(
                                "`{id}` ended {} instead of {}",
                                finished.state.as_str(),
                                request.target().as_str()
                            )),
                        }
                    }))
                }
                Err(NotAccepted::AlreadyThere) => Started::Finished(Ok(())),
                Err(NotAccepted::Busy(_)) => Started::Busy,
                Err(NotAccepted::UnknownInstance) => {
                    Started::Finished(Err(format!("no managed instance `{id}`")))
                }
                Err(NotAccepted::Refused(reason)) => Started::Finished(Err(reason)),
            }
        })
    }

    fn standby_counts(&self, service: &str) -> Option<(usize, usize)> {
        Some(Supervisor::standby_counts(self, service))
    }

    fn busy(&self, instance_id: &str) -> bool {
        Supervisor::busy(self, instance_id)
    }
}

/// Removes the cgroups of a stopped instance, killing stragglers that left the process group (daemonized
/// grandchildren) once the drain timeout passed.
fn remove_cgroups(driver: &dyn CgroupDriver, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
    let deadline = Instant::now() + CGROUP_DRAIN_TIMEOUT;
    let mut killed = false;
    loop {
        match driver.remove(cg) {
            Err(CgroupDriverError::NotEmpty { pids, .. }) if Instant::now() < deadline || !killed => {
                if Instant::now() >= deadline {
                    for pid in &pids {
                        if let Some(pid) = i32::try_from(*pid).ok().and_then(Pid::from_raw) {
                            let _ = kill_process(pid, Signal::KILL);
                        }
                    }
                    killed = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
