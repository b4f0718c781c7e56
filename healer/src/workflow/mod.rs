//! Remediation workflows: multi-step repairs (detect → cordon → drain/evacuate → repair → verify →
//! uncordon) declared in workflow files, started by a hardware event, an incoming alert, a rule or the
//! API, and carried out step by step with every state persisted, so that a run survives Vigil being killed.
//!
//! This module holds the validated shapes ([`Workflow`], [`Step`], [`Trigger`]); `file` reads and checks
//! one workflow file; `load` checks the configured files together; `cases` runs their own test cases.
//! Apart from reading the files, everything here is pure data and logic.
//!
//! # A workflow file
//!
//! ```yaml
//! workflows:
//!   - name: disk-errors                      # unique across the configured files
//!     trigger: { hardware: { kind: io_error, at_least: 3, within: 1m } }
//!     #   or { hardware: { state: failed } }                      a device's health becomes this state
//!     #   or { alert: { name: "Disk*", labels: { severity: critical } } }
//!     #   or { manual: true }                                     only the API and rules start it
//!     cooldown: 30m                          # per trigger and device: no new run before it ends
//!     params: { device: "", service: echo }  # parameters with defaults; the trigger or the API sets them
//!     notify: [ops]                          # receivers told when a run starts, needs a person, ends
//!     steps:
//!       - { name: cordon, cordon: {} }
//!       - { name: drain, drain: { timeout: 30s }, after: [cordon] }
//!       - { name: fix, run: { command: ["/usr/local/bin/fix-disk", "{device}"], timeout: 10m, idempotent: false },
//!           after: [drain], retries: 2, backoff: { initial: 5s, max: 1m }, on_failure: abort }
//!       - { name: ok, approve: {}, after: [fix] }
//!       - { name: check, wait_for: { device_health: healthy, for: 5m }, after: [ok], timeout: 30m }
//!       - { name: back, uncordon: {}, after: [check] }
//! tests:
//!   - name: three I/O errors start a run
//!     events:                                # hardware events, at times from the start of the case
//!       - { at: 0s, device: loop3, kind: io_error }
//!       - { at: 10s, device: loop3, kind: io_error }
//!       - { at: 20s, device: loop3, kind: io_error }
//!     alerts: []                             # incoming alerts: { at, labels }
//!     health: []                             # device health changes: { at, device, state }
//!     expect:                                # exactly the runs started
//!       - { at: 20s, workflow: disk-errors, params: { device: loop3 } }
//! ```
//!
//! Semantics:
//! - Steps form a DAG through `after:` (the steps a step waits for). A step runs when every step it is
//!   after has succeeded (or failed under `on_failure: continue`); unknown names and cycles are errors
//!   when the file is read. Steps with nothing in common run at the same time.
//! - `timeout` bounds one attempt (default per kind: see [`StepKind::default_timeout`]); a failed or
//!   timed-out attempt is retried `retries` times (default 0) after `backoff` (exponential from
//!   `initial`, capped at `max`).
//! - `on_failure` after the last attempt: `abort` (the default: the run fails, nothing more starts),
//!   `continue` (the steps after it run as if it had succeeded), `{ escalate: STEP }` (run STEP in its place:
//!   an escalation step, which is named by no `after:` of its own and runs only when escalated to; the
//!   steps after the failed one wait for it). A bare `escalate` names the next step in the file.
//! - A step runs at most once per attempt across crashes: its state is persisted before it starts and
//!   after it ends. A step found running after a restart runs again only when it is idempotent (every
//!   built-in kind is, except `restart`, `evacuate`, `run` unless `idempotent: true`, and `notify`, whose
//!   message is committed with the step's end); otherwise the run waits for a person with the reason.
//! - `{name}` placeholders in strings take the run's parameters (`{device}`, `{cpu}`, `{service}`,
//!   `{instance_id}`, any `params:` key, `{run_id}`, `{workflow}`); an unknown placeholder is an error at
//!   load time.

mod cases;
mod file;
mod load;
mod trigger;

pub mod host;
pub mod machine;
pub mod remediation;
pub mod runner;
pub mod store;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use cases::run_tests;
pub use file::{
    MAX_AT_LEAST, MAX_RETRIES, MAX_STEPS, MAX_TEST_INPUTS, MAX_WINDOW, WorkflowError, check_file,
    check_receivers, check_str,
};
pub use load::{WorkflowFilesError, check_files, load_files};
pub use trigger::{MAX_KEYS, StartRun, Triggers};
pub use vigil_core::glob::Glob;

use crate::rules::AlertCondition;

/// A device's health as the hardware monitor reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Degraded,
    Failed,
}

impl Health {
    pub const ALL: [Health; 3] = [Health::Healthy, Health::Degraded, Health::Failed];

    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failed => "failed",
        }
    }

    pub fn from_name(name: &str) -> Option<Health> {
        Self::ALL.into_iter().find(|h| h.as_str() == name)
    }
}

/// What starts a workflow on its own. Every workflow can also be started by the API and by a rule's
/// `action: workflow`.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// At least `at_least` hardware events of `kind` on one device (matching `device`) within `within`.
    /// The run's `device` parameter is that device (and `cpu` its number for `cpuN` devices).
    HardwareEvents { kind: Arc<str>, device: Option<Glob>, at_least: u32, within: Duration },
    /// A device (matching `device`) enters the health `state`.
    HardwareState { state: Health, device: Option<Glob> },
    /// An incoming alert starts firing; its labels are the run's parameters (`instance_id`, `service`,
    /// `device`, ... as the alert carries them).
    Alert(AlertCondition),
    /// Only the API and rules start it.
    Manual,
}

/// Where an instance step looks for its instances.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    /// Instances of services matching this glob (with `{param}` placeholders); none: the instances
    /// placed on the run's resource (its `device` or `cpu`), or the run's `instance_id` when it has one.
    pub service: Option<Arc<str>>,
    pub instance_id: Option<Arc<str>>,
}

/// A condition the `wait_for` step waits to hold for a window.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitCondition {
    /// The run's device (or `device`) has this health.
    DeviceHealth { state: Health, device: Option<Arc<str>> },
    /// A metric of the rule language (`crate::rules::Metric`) within bounds, on every target instance.
    Metric { metric: crate::rules::Metric, bounds: crate::rules::Bounds, targets: Targets },
}

/// What a step does.
#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    /// Mark the resource (the run's `device`, or `cpu`) cordoned: nothing new is started or woken on
    /// it, and the broker routes around the instances placed on it (a device's).
    Cordon {
        resource: Option<Arc<str>>,
    },
    Uncordon {
        resource: Option<Arc<str>>,
    },
    /// Stop routing new requests to the affected instances, and wait up to `timeout` for the requests in
    /// flight to finish.
    Drain {
        timeout: Duration,
        targets: Targets,
    },
    /// Move the affected instances off the run's CPU: it leaves their cpuset (`restart: true` then
    /// restarts them). Vigil places instances on CPUs only: for a device the step fails.
    Evacuate {
        targets: Targets,
        restart: bool,
    },
    /// Take a CPU offline (`/sys/devices/system/cpu/cpuN/online`); `cpu` defaults to the run's `cpu`.
    CpuOffline {
        cpu: Option<Arc<str>>,
    },
    CpuOnline {
        cpu: Option<Arc<str>>,
    },
    Restart(Targets),
    Stop(Targets),
    Hibernate(Targets),
    /// A command (each argument with placeholders), its exit code and output recorded; a non-zero exit or
    /// the timeout is a failure.
    Run {
        command: Vec<Arc<str>>,
        timeout: Duration,
        idempotent: bool,
    },
    /// A message to receivers (config `notify.receivers`): its own, or the workflow's `notify:` when it
    /// names none (a file where neither names one is refused).
    Notify {
        receivers: Vec<Arc<str>>,
        message: Arc<str>,
        labels: BTreeMap<String, String>,
    },
    /// Wait for a person: `vigil ctl workflows approve RUN`.
    Approve {
        message: Option<Arc<str>>,
    },
    /// Succeeds once `condition` has held for `hold` without a break.
    WaitFor {
        condition: WaitCondition,
        hold: Duration,
    },
}

impl StepKind {
    /// The word the file uses for the kind.
    pub const fn as_str(&self) -> &'static str {
        match self {
            StepKind::Cordon { .. } => "cordon",
            StepKind::Uncordon { .. } => "uncordon",
            StepKind::Drain { .. } => "drain",
            StepKind::Evacuate { .. } => "evacuate",
            StepKind::CpuOffline { .. } => "cpu_offline",
            StepKind::CpuOnline { .. } => "cpu_online",
            StepKind::Restart(_) => "restart",
            StepKind::Stop(_) => "stop",
            StepKind::Hibernate(_) => "hibernate",
            StepKind::Run { .. } => "run",
            StepKind::Notify { .. } => "notify",
            StepKind::Approve { .. } => "approve",
            StepKind::WaitFor { .. } => "wait_for",
        }
    }

    /// Whether running it twice is the same as running it once.
    pub fn idempotent(&self) -> bool {
        match self {
            StepKind::Run { idempotent, .. } => *idempotent,
            StepKind::Restart(_) | StepKind::Evacuate { .. } => false,
            _ => true,
        }
    }

    /// One attempt's time limit when the step gives none.
    pub fn default_timeout(&self) -> Option<Duration> {
        match self {
            // A person or a condition decides; the run waits as long as it takes unless told otherwise.
            StepKind::Approve { .. } | StepKind::WaitFor { .. } => None,
            StepKind::Run { timeout, .. } => Some(*timeout),
            StepKind::Drain { timeout, .. } => Some(*timeout + Duration::from_secs(10)),
            _ => Some(Duration::from_secs(120)),
        }
    }
}

/// What happens when a step has failed its last attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnFailure {
    Abort,
    Continue,
    /// Run this step (its index in [`Workflow::steps`]) in its place.
    Escalate(usize),
}

/// Exponential backoff between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before attempt `attempt` (2 is the first retry).
    pub fn before(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(32);
        self.initial.saturating_mul(1u32 << doublings.min(31)).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

/// One validated step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: Arc<str>,
    pub kind: StepKind,
    /// Indices of the steps it waits for.
    pub after: Vec<usize>,
    /// One attempt's limit; `None`: no limit.
    pub timeout: Option<Duration>,
    /// Attempts after the first.
    pub retries: u32,
    pub backoff: Backoff,
    pub on_failure: OnFailure,
    /// Runs only when a failed step escalates to it.
    pub escalation: bool,
    /// Whether it may run again after a crash interrupted it ([`StepKind::idempotent`], or the file said).
    pub idempotent: bool,
}

/// A validated workflow.
#[derive(Clone, Debug, PartialEq)]
pub struct Workflow {
    pub name: Arc<str>,
    pub trigger: Trigger,
    /// Per trigger key (the workflow and its device, alert or `manual`): no new run before it has passed
    /// since the last one started.
    pub cooldown: Duration,
    /// Parameters and their defaults.
    pub params: BTreeMap<String, String>,
    /// Receivers told about its runs.
    pub notify: Vec<Arc<str>>,
    /// In file order; `after` indices point into it. Acyclic.
    pub steps: Vec<Step>,
    /// The file it came from.
    pub file: Arc<str>,
}

/// A hardware event in a test case.
#[derive(Clone, Debug, PartialEq)]
pub struct TestEvent {
    pub at: Duration,
    pub device: String,
    pub kind: String,
}

/// A device's health change in a test case.
#[derive(Clone, Debug, PartialEq)]
pub struct TestHealth {
    pub at: Duration,
    pub device: String,
    pub state: Health,
}

/// An incoming alert in a test case, firing from `at` on (until `until`, when given).
#[derive(Clone, Debug, PartialEq)]
pub struct TestAlert {
    pub at: Duration,
    /// When it resolves; `None`: it fires to the end of the case.
    pub until: Option<Duration>,
    pub labels: BTreeMap<String, String>,
}

/// A run a test case expects to start.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedRun {
    pub at: Duration,
    pub workflow: Arc<str>,
    /// Parameters the run must have (others are not checked).
    pub params: BTreeMap<String, String>,
}

/// A workflow file's own test case: what triggers, fed over time, start which runs.
#[derive(Clone, Debug, PartialEq)]
pub struct TestCase {
    pub name: String,
    pub events: Vec<TestEvent>,
    pub health: Vec<TestHealth>,
    pub alerts: Vec<TestAlert>,
    pub expect: Vec<ExpectedRun>,
}

/// A validated workflow file.
#[derive(Clone, Debug)]
pub struct WorkflowSet {
    pub file: String,
    pub workflows: Vec<Workflow>,
    pub tests: Vec<TestCase>,
    /// Receivers named (workflow `notify:` and `notify` steps), where, for checking against the config.
    pub receivers: Vec<crate::rules::ReceiverRef>,
    /// Where each of `workflows` is named (same order), for mistakes only seen across files.
    pub named_at: Vec<Written>,
}

/// Where a file writes something: its position and key path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub line: u64,
    pub column: u64,
    pub path: String,
}

/// The `{name}` placeholders of `text`, in order. A placeholder is a name (`[a-zA-Z_][a-zA-Z0-9_]*`) in
/// braces; any other brace is text (`{"json": 1}` in a command's argument stays as written).
pub fn placeholders(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    scan(text, |piece| {
        if let Piece::Placeholder(name) = piece {
            out.push(name);
        }
    });
    out
}

/// `text` with each placeholder replaced by its parameter; a placeholder without one stays as written.
pub fn substitute(text: &str, params: &BTreeMap<String, String>) -> String {
    fill(text, |name| params.get(name).map(String::as_str))
}

/// `text` with each placeholder replaced by what `value` says for it (kept as written for `None`).
pub(crate) fn fill<'v>(text: &str, value: impl Fn(&str) -> Option<&'v str>) -> String {
    let mut out = String::with_capacity(text.len());
    scan(text, |piece| match piece {
        Piece::Text(t) => out.push_str(t),
        Piece::Placeholder(name) => match value(name) {
            Some(v) => out.push_str(v),
            None => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        },
    });
    out
}

enum Piece<'t> {
    Text(&'t str),
    Placeholder(&'t str),
}

fn scan<'t>(text: &'t str, mut piece: impl FnMut(Piece<'t>)) {
    let is_name = |n: &str| {
        let mut chars = n.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}').map(|close| &after[..close]).filter(|n| is_name(n)) {
            Some(name) => {
                piece(Piece::Text(&rest[..open]));
                piece(Piece::Placeholder(name));
                rest = &after[name.len() + 1..];
            }
            None => {
                piece(Piece::Text(&rest[..=open]));
                rest = after;
            }
        }
    }
    piece(Piece::Text(rest));
}

/// A duration as a file writes it: `1m`, `30s`, `1500ms`, `2h`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}
