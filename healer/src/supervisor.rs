//! Managed services: the instances Vigil itself starts from the config's `services:` list (DESIGN §4).
//!
//! [`Supervisor::start`] creates every instance's cgroups through the [`CgroupDriver`] and runs one tokio
//! task per instance. The task owns the child process: it spawns it so that the process joins its cgroups
//! *before* it execs the service (a `sh` wrapper waits on a line from its stdin until the driver has moved
//! it), probes readiness until the instance turns `active`, reaps the child when it exits, and restarts a
//! crashed instance with exponential [`Backoff`] (1 s doubling to 30 s, reset after 60 s healthy). A crash
//! while hibernating or hibernated is restarted the same way. [`Supervisor::shutdown`] stops every instance
//! gracefully (SIGTERM to its process group, SIGKILL after the grace period), reaps it and removes its
//! cgroups.
//!
//! Each child leads its own process group, so signals reach everything the service forked. Children inherit
//! Vigil's stdout and stderr: a service's own logs stay as the service wrote them. Children are spawned with
//! `kill_on_drop`, so a runtime torn down without `shutdown` still kills (but cannot gracefully stop) them.
//!
//! The pure pieces ([`substitute_port`], [`Backoff`], [`parse_http_status`], spec validation) are plain
//! functions with unit tests; the process and cgroup handling is checked by `tests/supervisor.rs` (root).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cgroup::{CgroupDriver, CgroupDriverError, InstanceCgroup};
pub use crate::executor::Hook;
use crate::executor::InstanceRegistry;
use crate::rules::InstanceState;

/// How often a starting instance's readiness check runs.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One readiness probe (connect, request, status line) gives up after this long.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// A pre-hibernate or post-wake hook that runs longer is killed and reported as failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `shutdown` waits for a stopped instance's cgroups to empty before killing what is left.
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The placeholder in commands, hooks and env values that becomes the instance's port.
pub const PORT_PLACEHOLDER: &str = "{port}";

/// The shell script that holds the child until its cgroups are set: it reads one line from stdin (written
/// by the supervisor after `add_process`), then execs the service with stdin from /dev/null.
const HOLD_SCRIPT: &str = "read _ && exec \"$@\" </dev/null";

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("invalid service {service:?}: {reason}")]
    InvalidSpec { service: String, reason: String },
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
    #[error("instance {id}: {hook} hook {command:?} failed: {reason}")]
    Hook { id: String, hook: &'static str, command: Vec<String>, reason: String },
}

/// One managed service, as the config's `services:` list declares it.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// Program and arguments; `{port}` is replaced by the instance's port.
    pub command: Vec<String>,
    /// Extra environment for the service (on top of Vigil's own); `{port}` is replaced in values.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The first instance's port; instance `n` listens on `port + n`.
    pub port: u16,
    #[serde(default = "one")]
    pub instances: u32,
    #[serde(default)]
    pub readiness: Readiness,
    /// Runs before the instance is hibernated (`{port}` substituted).
    #[serde(default)]
    pub pre_hibernate: Option<Vec<String>>,
    /// Runs after the instance has woken (`{port}` substituted).
    #[serde(default)]
    pub post_wake: Option<Vec<String>>,
    /// HTTP trigger path prefix, for the broker.
    #[serde(default)]
    pub route: Option<String>,
    /// HTTP trigger host name (the request's `Host`, without port), for the broker.
    #[serde(default)]
    pub host: Option<String>,
    /// The version the broker files the instances under (for traffic splits between versions).
    #[serde(default = "default_version")]
    pub version: String,
    /// The service the broker routes these instances under (default: `name`). Two managed services that
    /// serve one name with different versions are two versions of it, for splits and canaries.
    #[serde(default)]
    pub serves: Option<String>,
    /// `always` (the default): instances start with Vigil. `on_demand`: they stay stopped (zero running
    /// instances) until the broker has a request for the service, and start then.
    #[serde(default)]
    pub start: StartPolicy,
}

/// When a managed instance first starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPolicy {
    #[default]
    Always,
    OnDemand,
}

/// The version of instances that name none.
pub const DEFAULT_VERSION: &str = "v1";

fn default_version() -> String {
    DEFAULT_VERSION.to_string()
}

fn one() -> u32 {
    1
}

impl ServiceSpec {
    /// The port of instance `index` (from 0).
    pub fn port_of(&self, index: u32) -> u16 {
        self.port.saturating_add(u16::try_from(index).unwrap_or(u16::MAX))
    }

    /// The service name requests use to reach these instances.
    pub fn routed_name(&self) -> &str {
        self.serves.as_deref().unwrap_or(&self.name)
    }

    /// The id of instance `index`: `<service>-<index>`.
    pub fn instance_id(&self, index: u32) -> String {
        format!("{}-{index}", self.name)
    }

    /// Checks what serde cannot: names usable as cgroup directories, a command, ports that fit.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        let invalid = |reason: String| SupervisorError::InvalidSpec { service: self.name.clone(), reason };
        if self.name.is_empty()
            || self.name == "."
            || self.name == ".."
            || self.name.contains(['/', '\0'])
            || self.name.chars().any(char::is_whitespace)
        {
            return Err(invalid("name must be non-empty, without '/' or whitespace".into()));
        }
        if self.command.first().is_none_or(|p| p.is_empty()) {
            return Err(invalid("command must name a program".into()));
        }
        if self.instances == 0 {
            return Err(invalid("instances must be at least 1".into()));
        }
        if self.port == 0 {
            return Err(invalid("port must be above 0".into()));
        }
        let last = u32::from(self.port) + self.instances - 1;
        if last > u32::from(u16::MAX) {
            return Err(invalid(format!("ports {}..={last} do not fit below 65536", self.port)));
        }
        for (hook, cmd) in [("pre_hibernate", &self.pre_hibernate), ("post_wake", &self.post_wake)] {
            if cmd.as_ref().is_some_and(|c| c.first().is_none_or(|p| p.is_empty())) {
                return Err(invalid(format!("{hook} must name a program")));
            }
        }
        match &self.readiness {
            Readiness::Http(path) if !path.starts_with('/') => {
                Err(invalid(format!("readiness http path {path:?} must start with '/'")))
            }
            Readiness::Tcp(false) => {
                Err(invalid("readiness tcp: false is not a check; use tcp: true".into()))
            }
            _ => Ok(()),
        }
    }
}

/// How Vigil decides that a started instance serves: YAML `{ http: /healthz }` (a GET on the instance's port
/// answers 2xx) or `{ tcp: true }` (the port accepts a connection, the default).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Readiness {
    Http(String),
    Tcp(bool),
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::Tcp(true)
    }
}

/// The name of a hook as the config spells it.
fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::PreHibernate => "pre_hibernate",
        Hook::PostWake => "post_wake",
    }
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
}

/// Exponential restart delay: 1 s, doubling to at most 30 s, back to 1 s once an instance ran healthy for
/// 60 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);
    /// An instance that stayed active this long earns a fresh backoff.
    pub const HEALTHY_RESET: Duration = Duration::from_secs(60);

    pub fn new() -> Backoff {
        Backoff { next: Backoff::INITIAL }
    }

    /// The delay before the next restart; each call doubles the following one up to [`Backoff::MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        delay
    }

    /// Records how long the instance was healthy (active) before it exited.
    pub fn record_healthy(&mut self, healthy_for: Duration) {
        if healthy_for >= Backoff::HEALTHY_RESET {
            self.next = Backoff::INITIAL;
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// Replaces every `{port}` in `args` with `port`.
pub fn substitute_port(args: &[String], port: u16) -> Vec<String> {
    args.iter().map(|a| a.replace(PORT_PLACEHOLDER, &port.to_string())).collect()
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

/// A cloneable handle on the managed instances.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    /// The runtime the instance tasks run on; the blocking [`InstanceRegistry`] calls enter it.
    runtime: tokio::runtime::Handle,
    driver: Arc<dyn CgroupDriver>,
    slots: Mutex<BTreeMap<String, Slot>>,
    /// `Some(grace)` once shutdown began; every instance task watches it.
    stop: watch::Sender<Option<Duration>>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Counts every change of an instance's state, so watchers (the broker) react at once, without polling.
    changes: watch::Sender<u64>,
}

struct Slot {
    spec: Arc<ServiceSpec>,
    port: u16,
    cg: InstanceCgroup,
    state: InstanceState,
    main_pid: Option<u32>,
    restarts: u32,
    /// Set once `shutdown` removed the cgroups.
    removed: bool,
    /// Lets an on-demand instance start.
    start: Arc<tokio::sync::Notify>,
    /// Stops a running on-demand instance until demand starts it again.
    park: Arc<tokio::sync::Notify>,
}

impl Supervisor {
    /// Validates `specs`, creates every instance's cgroups and spawns one task per instance. Must be called
    /// within a tokio runtime. On a cgroup error, the cgroups created so far are removed again.
    pub fn start(
        specs: Vec<ServiceSpec>,
        driver: Arc<dyn CgroupDriver>,
    ) -> Result<Supervisor, SupervisorError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SupervisorError::NoRuntime)?;
        let mut names = BTreeSet::new();
        for spec in &specs {
            spec.validate()?;
            if !names.insert(spec.name.clone()) {
                return Err(SupervisorError::InvalidSpec {
                    service: spec.name.clone(),
                    reason: "declared twice".into(),
                });
            }
        }
        let mut slots = BTreeMap::new();
        for spec in specs {
            let spec = Arc::new(spec);
            for index in 0..spec.instances {
                let id = spec.instance_id(index);
                let cg = match driver.create(&spec.name, &id) {
                    Ok(cg) => cg,
                    Err(source) => {
                        for slot in slots.values() {
                            let slot: &Slot = slot;
                            let _ = driver.remove(&slot.cg);
                        }
                        return Err(SupervisorError::Cgroup { id, source });
                    }
                };
                let slot = Slot {
                    spec: spec.clone(),
                    port: spec.port_of(index),
                    cg,
                    state: InstanceState::Starting,
                    main_pid: None,
                    restarts: 0,
                    removed: false,
                    start: Arc::new(tokio::sync::Notify::new()),
                    park: Arc::new(tokio::sync::Notify::new()),
                };
                slots.insert(id, slot);
            }
        }
        let ids: Vec<String> = slots.keys().cloned().collect();
        let (stop, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            runtime: runtime.clone(),
            driver,
            slots: Mutex::new(slots),
            stop,
            tasks: tokio::sync::Mutex::new(Vec::new()),
            changes: watch::channel(0).0,
        });
        let handles: Vec<JoinHandle<()>> = ids
            .into_iter()
            .map(|id| {
                let stop = inner.stop.subscribe();
                runtime.spawn(run_instance(inner.clone(), id, stop))
            })
            .collect();
        // Nobody else holds the lock yet.
        if let Ok(mut tasks) = inner.tasks.try_lock() {
            *tasks = handles;
        }
        Ok(Supervisor { inner })
    }

    /// Every managed instance, ordered by id.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let slots = self.inner.lock();
        slots.iter().map(|(id, slot)| self.info(id, slot)).collect()
    }

    pub fn instance(&self, id: &str) -> Option<InstanceInfo> {
        let slots = self.inner.lock();
        slots.get(id).map(|slot| self.info(id, slot))
    }

    fn info(&self, id: &str, slot: &Slot) -> InstanceInfo {
        let pids =
            if slot.removed { Vec::new() } else { self.inner.driver.pids(&slot.cg).unwrap_or_default() };
        InstanceInfo {
            id: id.to_owned(),
            service: slot.spec.name.clone(),
            state: slot.state,
            pids,
            main_pid: slot.main_pid,
            port: slot.port,
            restarts: slot.restarts,
            cgroup: slot.cg.v2_rel.clone(),
            serves: slot.spec.routed_name().to_string(),
            version: slot.spec.version.clone(),
        }
    }

    /// Starts an on-demand instance that has not started yet. Returns false for an unknown id or an instance
    /// that is not waiting to start.
    pub fn start_on_demand(&self, id: &str) -> bool {
        let mut slots = self.inner.lock();
        match slots.get_mut(id) {
            Some(slot)
                if slot.spec.start == StartPolicy::OnDemand && slot.state == InstanceState::Stopped =>
            {
                // Starting from here on, so a second demand before the task wakes adds no start.
                slot.state = InstanceState::Starting;
                slot.start.notify_one();
                drop(slots);
                self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
                true
            }
            _ => false,
        }
    }

    /// Stops a running instance of an on-demand service; it starts again on the next demand. Returns once it
    /// has stopped (or `timeout` passed).
    pub async fn stop_until_demand(&self, id: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let invalid =
            |reason: &str| SupervisorError::InvalidSpec { service: id.to_owned(), reason: reason.into() };
        {
            let slots = self.inner.lock();
            let slot = slots.get(id).ok_or_else(|| SupervisorError::UnknownInstance { id: id.to_owned() })?;
            if slot.spec.start != StartPolicy::OnDemand {
                return Err(invalid("only instances of `start: on_demand` services stop until demand"));
            }
            if slot.state != InstanceState::Active {
                return Err(invalid("only an active instance can be stopped until demand"));
            }
            slot.park.notify_one();
        }
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        while self.instance(id).is_some_and(|i| i.state != InstanceState::Stopped) {
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return Err(invalid("did not stop in time"));
            }
        }
        Ok(())
    }

    /// A receiver that sees a change whenever any instance's state (or process) changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Sets the state for the standby executor (hibernating, hibernated, waking, active). Returns false for
    /// an unknown id.
    pub fn set_state(&self, id: &str, state: InstanceState) -> bool {
        self.inner.set_state(id, state)
    }

    pub fn cgroup(&self, id: &str) -> Option<InstanceCgroup> {
        self.inner.lock().get(id).map(|s| s.cg.clone())
    }

    pub fn spec(&self, id: &str) -> Option<ServiceSpec> {
        self.inner.lock().get(id).map(|s| (*s.spec).clone())
    }

    /// Runs the readiness check every 100 ms until it passes or `timeout` elapses.
    pub async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let (readiness, port) = self.readiness_of(id)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if probe(&readiness, port).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SupervisorError::NotReady { id: id.to_owned(), timeout });
            }
            tokio::time::sleep_until((tokio::time::Instant::now() + PROBE_INTERVAL).min(deadline)).await;
        }
    }

    /// One readiness probe now; false for an unknown id.
    pub async fn check_ready(&self, id: &str) -> bool {
        match self.readiness_of(id) {
            Ok((readiness, port)) => probe(&readiness, port).await,
            Err(_) => false,
        }
    }

    fn readiness_of(&self, id: &str) -> Result<(Readiness, u16), SupervisorError> {
        let slots = self.inner.lock();
        let slot = slots.get(id).ok_or_else(|| SupervisorError::UnknownInstance { id: id.to_owned() })?;
        Ok((slot.spec.readiness.clone(), slot.port))
    }

    /// Runs the instance's pre-hibernate or post-wake hook (port substituted, the service's env plus
    /// `VIGIL_INSTANCE_ID` and `VIGIL_PORT`), killed after [`HOOK_TIMEOUT`]. No hook configured is success.
    pub async fn run_hook(&self, id: &str, hook: Hook) -> Result<(), SupervisorError> {
        let (command, env, port) = {
            let slots = self.inner.lock();
            let slot = slots.get(id).ok_or_else(|| SupervisorError::UnknownInstance { id: id.to_owned() })?;
            let command = match hook {
                Hook::PreHibernate => slot.spec.pre_hibernate.clone(),
                Hook::PostWake => slot.spec.post_wake.clone(),
            };
            (command, slot.spec.env.clone(), slot.port)
        };
        let Some(command) = command else { return Ok(()) };
        let command = substitute_port(&command, port);
        let fail = |reason: String| {
            tracing::warn!(instance_id = id, hook = hook_name(hook), ?command, %reason, "hook failed");
            SupervisorError::Hook {
                id: id.to_owned(),
                hook: hook_name(hook),
                command: command.clone(),
                reason,
            }
        };
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..])
            .envs(env.iter().map(|(k, v)| (k, v.replace(PORT_PLACEHOLDER, &port.to_string()))))
            .env("VIGIL_INSTANCE_ID", id)
            .env("VIGIL_PORT", port.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
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
        let pending: Vec<(String, InstanceCgroup)> = {
            let slots = self.inner.lock();
            slots.iter().filter(|(_, s)| !s.removed).map(|(id, s)| (id.clone(), s.cg.clone())).collect()
        };
        for (id, cg) in pending {
            let driver = self.inner.driver.clone();
            let removed = tokio::task::spawn_blocking(move || remove_cgroups(&*driver, &cg)).await;
            match removed {
                Ok(Ok(())) => {
                    if let Some(slot) = self.inner.lock().get_mut(&id) {
                        slot.removed = true;
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

/// The standby executor's view. These calls block: call them off the runtime (from a plain thread or
/// `spawn_blocking`), never from async code, where blocking on the runtime would panic.
impl InstanceRegistry for Supervisor {
    fn cgroup(&self, instance_id: &str) -> Option<InstanceCgroup> {
        Supervisor::cgroup(self, instance_id)
    }

    fn inflight(&self, instance_id: &str) -> usize {
        let Some(port) = self.instance(instance_id).map(|i| i.port) else { return 0 };
        crate::run::established_now().iter().filter(|(p, _)| *p == port).count()
    }

    fn standby_counts(&self, service: &str) -> Option<(usize, usize)> {
        let instances: Vec<InstanceInfo> =
            self.instances().into_iter().filter(|i| i.service == service).collect();
        let standby = instances
            .iter()
            .filter(|i| {
                matches!(
                    i.state,
                    InstanceState::Hibernating | InstanceState::Hibernated | InstanceState::Waking
                )
            })
            .count();
        Some((instances.len(), standby))
    }

    fn state(&self, instance_id: &str) -> Option<InstanceState> {
        self.inner.lock().get(instance_id).map(|s| s.state)
    }

    fn set_state(&self, instance_id: &str, state: InstanceState) -> bool {
        Supervisor::set_state(self, instance_id, state)
    }

    fn run_hook(&self, instance_id: &str, hook: Hook) -> Result<(), String> {
        self.inner.runtime.block_on(Supervisor::run_hook(self, instance_id, hook)).map_err(|e| e.to_string())
    }

    fn wait_ready(&self, instance_id: &str, timeout: Duration) -> Result<(), String> {
        self.inner
            .runtime
            .block_on(Supervisor::wait_ready(self, instance_id, timeout))
            .map_err(|e| e.to_string())
    }

    fn stop_until_demand(&self, instance_id: &str) -> Result<(), String> {
        self.inner
            .runtime
            .block_on(Supervisor::stop_until_demand(self, instance_id, PARK_GRACE + Duration::from_secs(5)))
            .map_err(|e| e.to_string())
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

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding the lock leaves plain data behind, still worth serving.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, id: &str, state: InstanceState) -> bool {
        let found = match self.lock().get_mut(id) {
            Some(slot) => {
                slot.state = state;
                true
            }
            None => false,
        };
        if found {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        found
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Slot)) {
        if let Some(slot) = self.lock().get_mut(id) {
            f(slot);
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What ended one run of an instance.
enum RunEnd {
    Exited {
        healthy_for: Duration,
    },
    Stopped,
    /// Stopped until demand (scale to zero).
    Parked,
}

/// How long an instance stopped until demand has to exit after SIGTERM.
const PARK_GRACE: Duration = Duration::from_secs(10);

/// The life of one instance: start, watch, restart with backoff, until shutdown.
async fn run_instance(inner: Arc<Inner>, id: String, mut stop: watch::Receiver<Option<Duration>>) {
    let mut backoff = Backoff::new();
    let mut first = true;
    let on_demand =
        inner.lock().get(&id).filter(|s| s.spec.start == StartPolicy::OnDemand).map(|s| s.start.clone());
    if let Some(start) = on_demand {
        inner.set_state(&id, InstanceState::Stopped);
        tokio::select! {
            () = start.notified() => tracing::info!(instance_id = %id, "starting on demand"),
            _ = stop_requested(&mut stop) => return,
        }
    }
    loop {
        if !first {
            let delay = backoff.next_delay();
            tracing::info!(instance_id = %id, ?delay, "restarting after backoff");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut stop) => break,
            }
            inner.update(&id, |s| s.restarts += 1);
        }
        first = false;
        if stop.borrow().is_some() {
            break;
        }
        inner.set_state(&id, InstanceState::Starting);
        match run_once(&inner, &id, &mut stop).await {
            RunEnd::Exited { healthy_for } => {
                backoff.record_healthy(healthy_for);
                inner.update(&id, |s| {
                    s.state = InstanceState::Failed;
                    s.main_pid = None;
                });
            }
            RunEnd::Stopped => return,
            RunEnd::Parked => {
                let Some(start) = inner.lock().get(&id).map(|s| s.start.clone()) else { return };
                tokio::select! {
                    () = start.notified() => tracing::info!(instance_id = %id, "starting on demand"),
                    _ = stop_requested(&mut stop) => return,
                }
                first = true;
                backoff = Backoff::new();
            }
        }
    }
    inner.update(&id, |s| {
        s.state = InstanceState::Stopped;
        s.main_pid = None;
    });
}

/// Resolves once shutdown was requested, with its grace period.
async fn stop_requested(stop: &mut watch::Receiver<Option<Duration>>) -> Duration {
    match stop.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or_default(),
        // The sender lives in `Inner`, which this task holds; treat its loss as an immediate stop.
        Err(_) => Duration::ZERO,
    }
}

/// Starts the instance once and watches it until it exits or shutdown stops it.
async fn run_once(inner: &Arc<Inner>, id: &str, stop: &mut watch::Receiver<Option<Duration>>) -> RunEnd {
    let Some((spec, port, cg, park)) =
        inner.lock().get(id).map(|s| (s.spec.clone(), s.port, s.cg.clone(), s.park.clone()))
    else {
        return RunEnd::Stopped;
    };
    let mut child = match spawn_in_cgroup(inner, id, &spec, port, &cg).await {
        Ok(child) => child,
        Err(reason) => {
            tracing::error!(instance_id = %id, %reason, "cannot start instance");
            return RunEnd::Exited { healthy_for: Duration::ZERO };
        }
    };
    let pid = child.id();
    inner.update(id, |s| s.main_pid = pid);
    tracing::info!(instance_id = %id, pid, port, "instance started");

    let mut active_since: Option<Instant> = None;
    let mut probe_tick = tokio::time::interval(PROBE_INTERVAL);
    probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            grace = stop_requested(stop) => {
                stop_child(inner, id, &cg, &mut child, pid, grace).await;
                return RunEnd::Stopped;
            }
            () = park.notified() => {
                stop_child(inner, id, &cg, &mut child, pid, PARK_GRACE).await;
                return RunEnd::Parked;
            }
            _ = probe_tick.tick(), if active_since.is_none() => {
                if probe(&spec.readiness, port).await {
                    active_since = Some(Instant::now());
                    inner.update(id, |s| {
                        // The standby executor may already own the state; only a starting instance turns active.
                        if s.state == InstanceState::Starting {
                            s.state = InstanceState::Active;
                        }
                    });
                    tracing::info!(instance_id = %id, "instance ready");
                }
            }
        }
    };
    log_exit(id, &status);
    // Whatever the service forked and left behind in its group goes with it.
    signal_group(pid, Signal::KILL);
    RunEnd::Exited { healthy_for: active_since.map(|t| t.elapsed()).unwrap_or_default() }
}

fn log_exit(id: &str, status: &std::io::Result<ExitStatus>) {
    match status {
        Ok(status) => tracing::warn!(instance_id = %id, %status, "instance exited"),
        Err(e) => tracing::error!(instance_id = %id, error = %e, "cannot wait for instance"),
    }
}

/// Spawns `sh` holding on stdin, moves it into the instance's cgroups, then lets it exec the service.
async fn spawn_in_cgroup(
    inner: &Inner,
    id: &str,
    spec: &ServiceSpec,
    port: u16,
    cg: &InstanceCgroup,
) -> Result<Child, String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(HOLD_SCRIPT)
        .arg("sh")
        .args(substitute_port(&spec.command, port))
        .envs(spec.env.iter().map(|(k, v)| (k, v.replace(PORT_PLACEHOLDER, &port.to_string()))))
        .env("VIGIL_INSTANCE_ID", id)
        .env("VIGIL_PORT", port.to_string())
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
    if let Err(e) = inner.driver.add_process(cg, pid) {
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

/// SIGTERM to the instance's process group, SIGKILL after `grace`, then reap.
async fn stop_child(
    inner: &Inner,
    id: &str,
    cg: &InstanceCgroup,
    child: &mut Child,
    pid: Option<u32>,
    grace: Duration,
) {
    inner.set_state(id, InstanceState::Stopping);
    // A frozen process cannot act on SIGTERM: thaw first (a no-op for a thawed cgroup).
    if let Err(e) = inner.driver.set_frozen(cg, false) {
        tracing::warn!(instance_id = %id, error = %e, "cannot thaw instance before stopping it");
    }
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
    inner.update(id, |s| {
        s.state = InstanceState::Stopped;
        s.main_pid = None;
    });
    tracing::info!(instance_id = %id, "instance stopped");
}

/// Signals the process group led by `pid`; a group that is already gone is fine.
fn signal_group(pid: Option<u32>, signal: Signal) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).and_then(Pid::from_raw) else { return };
    if let Err(e) = kill_process_group(pid, signal)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!(pgid = pid.as_raw_nonzero().get(), error = %e, "cannot signal process group");
    }
}

/// One readiness probe on 127.0.0.1:`port`, bounded by [`PROBE_TIMEOUT`].
async fn probe(readiness: &Readiness, port: u16) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_yaml(readiness: &str) -> String {
        format!("name: echo\ncommand: [python3, app.py, --port, \"{{port}}\"]\nport: 18080\n{readiness}")
    }

    #[test]
    fn port_substitution() {
        let args: Vec<String> = ["app", "--port={port}", "{port}", "x{port}{port}", "none"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(substitute_port(&args, 18081), ["app", "--port=18081", "18081", "x1808118081", "none"]);
    }

    #[test]
    fn backoff_doubles_to_30s_and_resets_after_a_healthy_minute() {
        let mut b = Backoff::new();
        let secs: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.record_healthy(Duration::from_secs(59));
        assert_eq!(b.next_delay(), Duration::from_secs(30));
        b.record_healthy(Duration::from_secs(60));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }

    #[test]
    fn readiness_from_yaml() {
        let spec: ServiceSpec =
            serde_saphyr::from_str(&spec_yaml("readiness: { http: /healthz }\n")).unwrap();
        assert_eq!(spec.readiness, Readiness::Http("/healthz".into()));
        assert_eq!(spec.instances, 1);
        assert!(spec.validate().is_ok());
        let spec: ServiceSpec = serde_saphyr::from_str(&spec_yaml("readiness: { tcp: true }\n")).unwrap();
        assert_eq!(spec.readiness, Readiness::Tcp(true));
        let spec: ServiceSpec = serde_saphyr::from_str(&spec_yaml("")).unwrap();
        assert_eq!(spec.readiness, Readiness::Tcp(true));
        assert!(serde_saphyr::from_str::<ServiceSpec>(&spec_yaml("readiness: { grpc: x }\n")).is_err());
        assert!(serde_saphyr::from_str::<ServiceSpec>(&spec_yaml("bogus: 1\n")).is_err());
    }

    #[test]
    fn full_spec_from_yaml() {
        let yaml = "\
name: echo
command: [python3, app.py]
env: { PORT: \"{port}\" }
port: 18080
instances: 2
pre_hibernate: [curl, \"http://127.0.0.1:{port}/flush\"]
post_wake: [true]
route: /echo
";
        let spec: ServiceSpec = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(spec.instances, 2);
        assert_eq!(spec.port_of(1), 18081);
        assert_eq!(spec.instance_id(1), "echo-1");
        assert_eq!(spec.env.get("PORT").map(String::as_str), Some("{port}"));
        assert_eq!(spec.post_wake, Some(vec!["true".to_string()]));
        assert_eq!(spec.route.as_deref(), Some("/echo"));
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn validation() {
        let base: ServiceSpec = serde_saphyr::from_str(&spec_yaml("")).unwrap();
        let bad = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut s = base.clone();
            f(&mut s);
            s.validate().is_err()
        };
        assert!(bad(&|s| s.name = "a/b".into()));
        assert!(bad(&|s| s.name = String::new()));
        assert!(bad(&|s| s.command.clear()));
        assert!(bad(&|s| s.instances = 0));
        assert!(bad(&|s| s.port = 0));
        assert!(bad(&|s| {
            s.port = 65535;
            s.instances = 2;
        }));
        assert!(bad(&|s| s.readiness = Readiness::Http("healthz".into())));
        assert!(bad(&|s| s.readiness = Readiness::Tcp(false)));
        assert!(bad(&|s| s.pre_hibernate = Some(Vec::new())));
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
