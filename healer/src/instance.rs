//! One managed instance, driven by a task of its own. The task owns the child process and the instance's
//! [`Lifecycle`]; it takes [`Command`]s from a channel, answers each at once (accepted, already there,
//! busy, refused), and runs the operations the lifecycle picks one at a time, as futures it polls beside
//! the child's exit and the command channel, so a busy instance still answers `busy` immediately and a
//! crash is noticed mid-operation. What it knows is published on the [`Board`] after every change, for
//! the API, the broker and the rules; nobody else writes an instance's state.
//!
//! Blocking work (cgroupfs writes, `process_madvise`, `/proc` reads) runs on the blocking pool; hooks,
//! readiness probes and the child's signals are async. No lock is held across any of it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command as ProcessCommand};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cgroup::{CgroupDriver, CpuLimit, InstanceCgroup};
use crate::lifecycle::{Answer, Event, Goal, Lifecycle, Op, Request};
use crate::metrics::StandbyMetrics;
use crate::rules::InstanceState;
use crate::service::{Readiness, ServiceSpec};
use crate::standby::{self, HibernateReport, MemoryOps, StandbyPolicy, WakeReport, WorkingSet};

/// How often readiness is probed while an instance starts or wakes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One readiness probe (connect, request, status line) gives up after this long.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// A pre-hibernate or post-wake hook that runs longer is killed and reported as failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long hibernate waits for connections to the instance to finish before it goes ahead anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The placeholder in commands, hooks and env values that becomes the instance's port.
pub const PORT_PLACEHOLDER: &str = "{port}";
pub use vigil_core::service::DATA_DIR_PLACEHOLDER;
/// The shell script that holds the child until its cgroups are set: it reads one line from stdin (written
/// after `add_process`), then execs the service with stdin from /dev/null.
const HOLD_SCRIPT: &str = "read _ && exec \"$@\" </dev/null";

/// Hooks a service may declare around standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    PreHibernate,
    PostWake,
}

impl Hook {
    /// The name of the hook as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreHibernate => "pre_hibernate",
            Hook::PostWake => "post_wake",
        }
    }
}

/// Standby results kept for the API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StandbyRecord {
    pub memory_before: u64,
    pub memory_after: u64,
    pub memory_kept_resident: bool,
    pub hibernate_seconds: f64,
    pub wake_seconds: Option<f64>,
    pub prefetch_bytes: u64,
}

/// What the instance's task publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub state: InstanceState,
    /// What the instance should be (the autoscaler counts instances by it: a restarting instance is
    /// `stopping` on its way to serving again).
    pub goal: Goal,
    /// The process was started at least once.
    pub ran: bool,
    /// The process Vigil spawned (the service after exec), while it runs.
    pub main_pid: Option<u32>,
    pub restarts: u32,
    /// An operation (other than waiting out a backoff) is under way.
    pub busy: bool,
    pub last_failure: Option<String>,
    pub standby: Option<StandbyRecord>,
    /// The data directory (one of the service's `data_dirs`) of its last start.
    pub data_dir: Option<String>,
}

impl View {
    fn new(life: &Lifecycle) -> View {
        View {
            state: life.state(),
            goal: life.goal(),
            ran: false,
            main_pid: None,
            restarts: 0,
            busy: false,
            last_failure: None,
            standby: None,
            data_dir: None,
        }
    }
}

/// Where every instance task publishes its [`View`]; readers see a change on [`Board::changes`] at once.
pub struct Board {
    views: Mutex<BTreeMap<String, View>>,
    changes: watch::Sender<u64>,
}

impl Board {
    pub fn new() -> Board {
        Board { views: Mutex::new(BTreeMap::new()), changes: watch::channel(0).0 }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, View>> {
        // A panic while holding the lock leaves plain data behind, still worth serving.
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn view(&self, id: &str) -> Option<View> {
        self.lock().get(id).cloned()
    }

    pub fn views(&self) -> BTreeMap<String, View> {
        self.lock().clone()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Announces a change that is not in the views (what the broker may route to changed).
    pub fn nudge(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn insert(&self, id: &str, view: View) {
        self.lock().insert(id.to_string(), view);
    }

    fn publish(&self, id: &str, view: View) {
        let changed = {
            let mut views = self.lock();
            let slot = views.entry(id.to_string()).or_insert_with(|| view.clone());
            let changed = *slot != view;
            *slot = view;
            changed
        };
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

/// What every instance task shares: the cgroup driver, the memory operations and the standby policy.
pub struct Context {
    pub driver: Arc<dyn CgroupDriver>,
    pub memory: Arc<dyn MemoryOps>,
    pub policy: StandbyPolicy,
    pub metrics: StandbyMetrics,
    /// SIGTERM → SIGKILL for stops other than shutdown (restart, stop until demand).
    pub stop_grace: Duration,
    /// Readiness after a start or a wake must pass within this long.
    pub ready_timeout: Duration,
    pub board: Arc<Board>,
    /// CPUs cordoned by workflows: instances starting, restored or woken get every other online CPU.
    pub cordoned: crate::placement::Cordoned,
    /// Where each instance last kept its data.
    pub data_dirs: crate::placement::DataDirs,
}

/// A request to an instance's task. `ack` is answered at once; `done` once the instance settles after an
/// accepted request.
pub struct Command {
    pub request: Request,
    pub ack: oneshot::Sender<Answer>,
    pub done: oneshot::Sender<Finished>,
}

/// Where an accepted request left the instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub state: InstanceState,
    /// The first failure on the way, if any (the instance may still have reached its target, e.g. by a
    /// restart after a failed wake).
    pub failure: Option<String>,
    pub standby: Option<StandbyRecord>,
}

/// The outcome of one operation, with what it produced.
enum Done {
    /// The process, and the data directory it was given.
    Spawned(Child, Option<String>),
    Hibernated(HibernateReport),
    Woken(WakeReport),
    Plain(Event),
}

type OpFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// One instance's task.
pub struct InstanceTask {
    pub id: String,
    pub spec: Arc<ServiceSpec>,
    pub port: u16,
    pub cg: InstanceCgroup,
    pub ctx: Arc<Context>,
    /// Starts at once (otherwise it waits parked until demand or the autoscaler starts it).
    pub serve_at_start: bool,
    /// May be stopped until needed (`start: on_demand` and `scale:` services).
    pub stoppable: bool,
}

/// Polls `f` if there is one; never resolves otherwise.
async fn maybe<F: Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn wait_child(child: Option<&mut Child>) -> std::io::Result<ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown was requested, with its grace period.
pub async fn stop_requested(stop: &mut watch::Receiver<Option<Duration>>) -> Duration {
    match stop.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or_default(),
        // The sender lives with the supervisor, which outlives this task; treat its loss as a stop now.
        Err(_) => Duration::ZERO,
    }
}

impl InstanceTask {
    /// Publishes the initial view, so the instance is listed before its task first runs.
    pub fn announce(&self) {
        self.ctx.board.insert(&self.id, View::new(&self.lifecycle()));
    }

    fn lifecycle(&self) -> Lifecycle {
        Lifecycle::with_start(self.serve_at_start, self.stoppable)
    }

    /// The instance's life, until shutdown has stopped it.
    pub async fn run(
        self,
        mut commands: mpsc::Receiver<Command>,
        mut stop: watch::Receiver<Option<Duration>>,
    ) {
        let mut life = self.lifecycle();
        let mut child: Option<Child> = None;
        let mut op: Option<OpFuture> = None;
        let mut working_set = WorkingSet::default();
        let mut record: Option<StandbyRecord> = None;
        let mut data_dir: Option<String> = None;
        let mut waiter: Option<oneshot::Sender<Finished>> = None;
        let mut active_since: Option<Instant> = None;
        let mut grace = self.ctx.stop_grace;
        let mut shutting_down = false;
        loop {
            if life.in_flight().is_none() {
                // Abandoned by the lifecycle (a probe or a backoff): nothing to undo.
                op = None;
            }
            if op.is_none()
                && let Some(next) = life.next_op()
            {
                if let Op::Backoff(delay) = next {
                    tracing::info!(instance_id = %self.id, ?delay, "restarting after backoff");
                }
                // An instance stopped until needed is taken out of service, not cut off: let what is in
                // flight finish first (the broker sends it nothing new once it is `stopping`).
                let drain = life.goal() == Goal::Parked;
                op = Some(self.start(next, &mut child, &mut working_set, data_dir.clone(), grace, drain));
            }
            let state = life.state();
            if state == InstanceState::Active && active_since.is_none() {
                active_since = Some(Instant::now());
            }
            self.ctx.board.publish(
                &self.id,
                View {
                    state,
                    goal: life.goal(),
                    ran: life.ran(),
                    main_pid: child.as_ref().and_then(Child::id),
                    restarts: life.restarts(),
                    busy: !life.settled(),
                    last_failure: life.last_failure().map(str::to_string),
                    standby: record.clone(),
                    data_dir: data_dir.clone(),
                },
            );
            if life.settled()
                && let Some(tx) = waiter.take()
            {
                let _ = tx.send(self.finished(&life, &record));
            }
            if life.goal() == Goal::Shutdown && life.in_flight().is_none() && !life.running() {
                return;
            }
            tokio::select! {
                done = maybe(op.as_mut()) => {
                    op = None;
                    let event = self.absorb(done, &mut child, &mut working_set, &mut record, &mut data_dir, &mut active_since);
                    if let Event::NotReady(reason) | Event::WakeFailed(reason) | Event::HibernateFailed(reason)
                        | Event::HookFailed(reason) | Event::SpawnFailed(reason) | Event::RestoreFailed(reason) = &event
                    {
                        tracing::warn!(instance_id = %self.id, %reason, "operation failed");
                    }
                    if !life.apply(event) {
                        tracing::debug!(instance_id = %self.id, "stale operation outcome ignored");
                    }
                }
                status = wait_child(child.as_mut()) => {
                    let pid = child.take().and_then(|c| c.id());
                    // Whatever the service forked and left behind in its group goes with it.
                    signal_group(pid, Signal::KILL);
                    let status = match status {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("cannot wait for it: {e}"),
                    };
                    tracing::warn!(instance_id = %self.id, %status, "instance exited");
                    let healthy_for = active_since.take().map(|t| t.elapsed()).unwrap_or_default();
                    life.apply(Event::Exited { healthy_for, status });
                }
                Some(command) = commands.recv() => {
                    let answer = life.request(command.request);
                    if answer == Answer::Accepted {
                        tracing::info!(instance_id = %self.id, request = ?command.request, "request accepted");
                        if let Some(previous) = waiter.replace(command.done) {
                            let _ = previous.send(self.finished(&life, &record));
                        }
                    }
                    let _ = command.ack.send(answer);
                }
                g = stop_requested(&mut stop), if !shutting_down => {
                    shutting_down = true;
                    grace = g;
                    life.request(Request::Shutdown);
                }
            }
        }
    }

    fn finished(&self, life: &Lifecycle, record: &Option<StandbyRecord>) -> Finished {
        Finished {
            state: life.state(),
            failure: life.request_failure().map(str::to_string),
            standby: record.clone(),
        }
    }

    /// Turns an operation's outcome into the lifecycle's event, keeping what it produced.
    fn absorb(
        &self,
        done: Done,
        child: &mut Option<Child>,
        working_set: &mut WorkingSet,
        record: &mut Option<StandbyRecord>,
        data_dir: &mut Option<String>,
        active_since: &mut Option<Instant>,
    ) -> Event {
        match done {
            Done::Spawned(c, dir) => {
                tracing::info!(instance_id = %self.id, pid = c.id(), port = self.port, data_dir = dir.as_deref().unwrap_or(""), "instance started");
                *child = Some(c);
                *data_dir = dir;
                *active_since = None;
                Event::Spawned
            }
            Done::Hibernated(report) => {
                if report.memory_kept_resident {
                    tracing::warn!(instance_id = %self.id, "{}", report.message);
                }
                self.ctx
                    .metrics
                    .released_bytes
                    .inc_by(report.memory_before.saturating_sub(report.memory_after));
                *record = Some(StandbyRecord {
                    memory_before: report.memory_before,
                    memory_after: report.memory_after,
                    memory_kept_resident: report.memory_kept_resident,
                    hibernate_seconds: report.seconds,
                    ..StandbyRecord::default()
                });
                *working_set = report.working_set;
                Event::Hibernated
            }
            Done::Woken(report) => {
                let prefetched = report.prefetch.as_ref().map_or(0, |p| p.advised_bytes);
                if let Some(p) = &report.prefetch {
                    self.ctx.metrics.prefetched_bytes.inc_by(p.advised_bytes);
                    self.ctx.metrics.prefetch_seconds.inc_by(p.seconds);
                }
                if let Some(r) = record.as_mut() {
                    r.wake_seconds = Some(report.seconds);
                    r.prefetch_bytes = prefetched;
                }
                Event::Woken
            }
            Done::Plain(event) => event,
        }
    }

    /// Starts `op` as a future the task polls; everything it needs is moved or cloned into it.
    fn start(
        &self,
        op: Op,
        child: &mut Option<Child>,
        working_set: &mut WorkingSet,
        data_dir: Option<String>,
        grace: Duration,
        drain_first: bool,
    ) -> OpFuture {
        let ctx = self.ctx.clone();
        let spec = self.spec.clone();
        let cg = self.cg.clone();
        let id = self.id.clone();
        let port = self.port;
        match op {
            Op::Spawn => Box::pin(async move {
                // Created again (idempotent) in case someone removed it, and reset: a crash may have left
                // it frozen or squeezed.
                let (driver, service, instance) = (ctx.driver.clone(), spec.name.clone(), id.clone());
                let cordoned = ctx.cordoned.clone();
                let dirs = spec.data_dirs.clone();
                let placed = id.clone();
                let kept = ctx.data_dirs.clone();
                let prepared = blocking(move || {
                    let cg = driver
                        .create(&service, &instance)
                        .map_err(|e| format!("cannot prepare its cgroups: {e}"))?;
                    reset_cgroup(driver.as_ref(), &cg, &cordoned.active_limit())
                        .map_err(|e| format!("cannot prepare its cgroups: {e}"))?;
                    let dir = crate::placement::choose_data_dir(
                        &dirs,
                        &placed,
                        &cordoned.devices(),
                        kept.get(&placed).as_deref(),
                    )?;
                    if let Some(d) = &dir {
                        kept.set(&placed, d)?;
                    }
                    Ok((cg, dir))
                })
                .await;
                let (cg, dir) = match prepared {
                    Ok(prepared) => prepared,
                    Err(e) => return Done::Plain(Event::SpawnFailed(e)),
                };
                match spawn_in_cgroup(ctx.driver.as_ref(), &id, &spec, port, dir.as_deref(), &cg).await {
                    Ok(child) => Done::Spawned(child, dir),
                    Err(reason) => Done::Plain(Event::SpawnFailed(reason)),
                }
            }),
            Op::Probe => Box::pin(async move {
                match wait_ready(&spec.readiness, port, ready_timeout(&spec, &ctx)).await {
                    Ok(()) => {
                        tracing::info!(instance_id = %id, "instance ready");
                        Done::Plain(Event::Ready)
                    }
                    Err(reason) => Done::Plain(Event::NotReady(reason)),
                }
            }),
            Op::Hibernate => Box::pin(async move {
                // Let in-flight work finish (bounded) before the instance is frozen under it.
                let _ = blocking(move || {
                    drain(port, DRAIN_TIMEOUT);
                    Ok(())
                })
                .await;
                if let Err(e) = run_hook(&id, &spec, port, data_dir.as_deref(), Hook::PreHibernate).await {
                    return Done::Plain(Event::HookFailed(e));
                }
                let result = blocking(move || {
                    standby::hibernate_with(ctx.driver.as_ref(), ctx.memory.as_ref(), &cg, &ctx.policy)
                        .map_err(|e| e.to_string())
                })
                .await;
                match result {
                    Ok(report) => Done::Hibernated(report),
                    Err(e) => Done::Plain(Event::HibernateFailed(format!("hibernating `{id}`: {e}"))),
                }
            }),
            Op::Wake => {
                let ws = std::mem::take(working_set);
                Box::pin(async move {
                    let memory = ctx.memory.clone();
                    let driver = ctx.driver.clone();
                    let avoid = ctx.cordoned.clone();
                    let report = match blocking(move || {
                        standby::wake_with(driver.as_ref(), memory.as_ref(), &cg, &ws, &avoid.active_limit())
                            .map_err(|e| e.to_string())
                    })
                    .await
                    {
                        Ok(report) => report,
                        Err(e) => return Done::Plain(Event::WakeFailed(format!("waking `{id}`: {e}"))),
                    };
                    if let Err(e) = run_hook(&id, &spec, port, data_dir.as_deref(), Hook::PostWake).await {
                        return Done::Plain(Event::WakeFailed(e));
                    }
                    if let Err(e) = wait_ready(&spec.readiness, port, ready_timeout(&spec, &ctx)).await {
                        return Done::Plain(Event::WakeFailed(format!("`{id}` not ready after wake: {e}")));
                    }
                    Done::Woken(report)
                })
            }
            Op::Restore => Box::pin(async move {
                match blocking(move || reset_cgroup(ctx.driver.as_ref(), &cg, &ctx.cordoned.active_limit()))
                    .await
                {
                    Ok(()) => Done::Plain(Event::Restored),
                    Err(e) => Done::Plain(Event::RestoreFailed(format!("restoring `{id}`: {e}"))),
                }
            }),
            Op::Stop => {
                let taken = child.take();
                Box::pin(async move {
                    if drain_first {
                        let _ = blocking(move || {
                            drain(port, DRAIN_TIMEOUT);
                            Ok(())
                        })
                        .await;
                    }
                    stop_process(&ctx, &id, &cg, taken, grace).await;
                    Done::Plain(Event::Stopped)
                })
            }
            Op::Backoff(delay) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                Done::Plain(Event::BackoffElapsed)
            }),
        }
    }
}

fn ready_timeout(spec: &ServiceSpec, ctx: &Context) -> Duration {
    spec.ready_timeout.map_or(ctx.ready_timeout, |d| d.0)
}

/// Runs blocking work on the blocking pool; a panic there becomes an error.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(format!("the worker panicked: {e}")))
}

/// Thaws the instance and lifts its CPU limits to `active` (no limit, or every CPU but the cordoned ones):
/// what a restore, and every start, begins with.
fn reset_cgroup(driver: &dyn CgroupDriver, cg: &InstanceCgroup, active: &CpuLimit) -> Result<(), String> {
    driver.set_frozen(cg, false).map_err(|e| e.to_string())?;
    driver.set_cpu(cg, active).map_err(|e| e.to_string())
}

/// Waits (bounded) until no established connection to `port` is left.
fn drain(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while crate::tcp::connections_to(port) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The service's env with `{port}` and `{data_dir}` replaced in the values, and Vigil's own variables.
fn env_of<'a>(
    spec: &'a ServiceSpec,
    id: &'a str,
    port: u16,
    data_dir: Option<&'a str>,
) -> impl Iterator<Item = (String, String)> + 'a {
    let own = [
        Some(("VIGIL_INSTANCE_ID".to_string(), id.to_string())),
        Some(("VIGIL_PORT".to_string(), port.to_string())),
        data_dir.map(|d| ("VIGIL_DATA_DIR".to_string(), d.to_string())),
    ];
    spec.env.iter().map(move |(k, v)| (k.clone(), fill(v, port, data_dir))).chain(own.into_iter().flatten())
}

/// Spawns `sh` holding on stdin, moves it into the instance's cgroups, then lets it exec the service.
async fn spawn_in_cgroup(
    driver: &dyn CgroupDriver,
    id: &str,
    spec: &ServiceSpec,
    port: u16,
    data_dir: Option<&str>,
    cg: &InstanceCgroup,
) -> Result<Child, String> {
    let mut cmd = ProcessCommand::new("sh");
    cmd.arg("-c")
        .arg(HOLD_SCRIPT)
        .arg("sh")
        .args(substitute(&spec.command, port, data_dir))
        .envs(env_of(spec, id, port, data_dir))
        .stdin(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot spawn {:?}: {e}", spec.command))?;
    let Some(pid) = child.id() else {
        let _ = child.wait().await;
        return Err("the child exited before it could join its cgroups".into());
    };
    let abort = |mut child: Child, reason: String| async move {
        let _ = child.start_kill();
        let _ = child.wait().await;
        Err(reason)
    };
    // One cgroupfs write per hierarchy: short enough to do here rather than hop to the blocking pool.
    if let Err(e) = driver.add_process(cg, pid) {
        return abort(child, format!("cannot move pid {pid} into its cgroups: {e}")).await;
    }
    let Some(mut stdin) = child.stdin.take() else {
        return abort(child, "the child has no stdin".into()).await;
    };
    if let Err(e) = stdin.write_all(b"go\n").await {
        return abort(child, format!("cannot release the child: {e}")).await;
    }
    drop(stdin);
    Ok(child)
}

/// Thaw, SIGTERM to the instance's process group, SIGKILL after `grace`, then reap.
async fn stop_process(ctx: &Context, id: &str, cg: &InstanceCgroup, child: Option<Child>, grace: Duration) {
    // A frozen process cannot act on SIGTERM: thaw first (a no-op for a thawed cgroup).
    let driver = ctx.driver.clone();
    let cg = cg.clone();
    if let Err(e) = blocking(move || driver.set_frozen(&cg, false).map_err(|e| e.to_string())).await {
        tracing::warn!(instance_id = %id, error = %e, "cannot thaw instance before stopping it");
    }
    let Some(mut child) = child else { return };
    let pid = child.id();
    signal_group(pid, Signal::TERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(instance_id = %id, ?grace, "instance ignored SIGTERM; killing it");
            signal_group(pid, Signal::KILL);
            let _ = child.start_kill();
            child.wait().await
        }
    };
    if let Err(e) = status {
        tracing::error!(instance_id = %id, error = %e, "cannot reap instance");
    }
    signal_group(pid, Signal::KILL);
    tracing::info!(instance_id = %id, "instance stopped");
}

/// Signals the process group led by `pid`; a group that is already gone is fine.
pub fn signal_group(pid: Option<u32>, signal: Signal) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).and_then(Pid::from_raw) else { return };
    if let Err(e) = kill_process_group(pid, signal)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!(pgid = pid.as_raw_nonzero().get(), error = %e, "cannot signal process group");
    }
}

/// Runs the instance's pre-hibernate or post-wake hook (port and data directory substituted, the
/// service's env plus `VIGIL_INSTANCE_ID`, `VIGIL_PORT` and `VIGIL_DATA_DIR`), killed after
/// [`HOOK_TIMEOUT`]. No hook configured is success.
pub async fn run_hook(
    id: &str,
    spec: &ServiceSpec,
    port: u16,
    data_dir: Option<&str>,
    hook: Hook,
) -> Result<(), String> {
    let command = match hook {
        Hook::PreHibernate => &spec.pre_hibernate,
        Hook::PostWake => &spec.post_wake,
    };
    let Some(command) = command else { return Ok(()) };
    let command = substitute(command, port, data_dir);
    let fail = |reason: String| format!("{} hook {command:?} of `{id}` failed: {reason}", hook.name());
    let Some((program, args)) = command.split_first() else { return Err(fail("empty command".into())) };
    let mut cmd = ProcessCommand::new(program);
    cmd.args(args).envs(env_of(spec, id, port, data_dir)).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| fail(format!("cannot start: {e}")))?;
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(fail(format!("exited with {status}"))),
        Ok(Err(e)) => Err(fail(format!("cannot wait for it: {e}"))),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(fail(format!("still running after {HOOK_TIMEOUT:?}; killed")))
        }
    }
}

/// Probes every [`PROBE_INTERVAL`] until the readiness check passes or `timeout` elapses.
pub async fn wait_ready(readiness: &Readiness, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if probe(readiness, port).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("readiness check on port {port} did not pass within {timeout:?}"));
        }
        tokio::time::sleep_until((tokio::time::Instant::now() + PROBE_INTERVAL).min(deadline)).await;
    }
}

/// One readiness probe on 127.0.0.1:`port`, bounded by [`PROBE_TIMEOUT`].
pub async fn probe(readiness: &Readiness, port: u16) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, probe_unbounded(readiness, port)).await.unwrap_or(false)
}

async fn probe_unbounded(readiness: &Readiness, port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let path = match readiness {
        Readiness::Tcp(_) => return true,
        Readiness::Http(path) => path,
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // The status line is all that matters; read until it is complete (or the peer closes).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    parse_http_status(&buf).is_some_and(|code| (200..300).contains(&code))
}

/// Replaces every `{port}` in `args` with `port`.
pub fn substitute_port(args: &[String], port: u16) -> Vec<String> {
    substitute(args, port, None)
}

/// Replaces every `{port}` in `args` with `port`, and every `{data_dir}` with `data_dir` when there is one.
pub fn substitute(args: &[String], port: u16, data_dir: Option<&str>) -> Vec<String> {
    args.iter().map(|a| fill(a, port, data_dir)).collect()
}

fn fill(text: &str, port: u16, data_dir: Option<&str>) -> String {
    let text = text.replace(PORT_PLACEHOLDER, &port.to_string());
    match data_dir {
        Some(d) => text.replace(DATA_DIR_PLACEHOLDER, d),
        None => text,
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.0 200 OK`).
pub fn parse_http_status(response: &[u8]) -> Option<u16> {
    let line_end = response.iter().position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&response[..line_end]).ok()?;
    let mut parts = line.trim_end().split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_substitution() {
        let args: Vec<String> = ["app", "--port={port}", "{port}", "x{port}{port}", "none"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(substitute_port(&args, 18081), ["app", "--port=18081", "18081", "x1808118081", "none"]);
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(parse_http_status(b"HTTP/1.0 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(parse_http_status(b"HTTP/1.1 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_http_status(b"HTTP/1.1 200 OK"), None);
        assert_eq!(parse_http_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_http_status(b"HTTP/1.1 20 OK\r\n"), None);
    }
}
