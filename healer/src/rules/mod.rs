//! The rule language: declarative conditions over each instance's metrics and state, held for a window,
//! selecting instances by service, id and kind, and proposing an action (hibernate, wake, restart, notify, stop,
//! start, or starting a remediation workflow) under per-rule limits (cooldown, max fraction of a service).
//! Rule files carry their own test cases.
//!
//! Everything here is pure logic over data: the files are read once ([`check_file`]), and the
//! [`Evaluator`] is fed snapshots together with the time since start (injected, never read from a clock),
//! so decisions are tested without a kernel or a clock.
//!
//! # A rule file
//!
//! ```yaml
//! rules:
//!   - name: hibernate-idle             # unique in the file
//!     select:                          # optional; every key optional
//!       service: "*"                   # glob: `*`, `?`, `[a-z]`, `[!0-9]`
//!       instance_id: "echo-*"
//!       kind: [managed]                # managed | kubernetes | container | systemd | other
//!     when:                            # all conditions must hold at every tick for `for`
//!       - state: [active]              # the instance's state is one of these
//!       - metric: cpu_cores            # a metric with one or more bounds
//!         below: 0.01                  # above / below are strict; at_least / at_most are not
//!       - metric: requests_per_s
//!         at_most: 0
//!       - alert: { name: "Disk*", labels: { severity: critical } }   # an incoming alert is firing for it
//!     for: 5m                          # default 0s: act on the first tick the conditions hold
//!     action: hibernate                # hibernate | wake | restart | notify | stop | start
//!     cooldown: 10m                    # default 0s
//!     max_fraction: 0.5                # default 1: share of a service's instances affected at once
//!     notify: [ops, am]                # receivers (config `notify.receivers`) told of its decisions;
//!                                      # required for `action: notify`
//!     labels: { severity: page }       # added to its notifications' labels
//! tests:
//!   - name: an idle instance hibernates after five minutes
//!     every: 30s                       # tick interval, default 1s; ticks run from 0s through `until`
//!     until: 6m                        # default: the last `at` in steps and expect
//!     steps:                           # applied at the first tick at or after `at`, in order
//!       - at: 0s
//!         set:                         # instance id -> values; values persist until set again
//!           echo-0: { service: echo, state: active, cpu_cores: 0.001, requests_per_s: 0 }
//!         remove: []                   # instance ids that vanish
//!         alerts:                      # incoming alerts firing from here on (each its label set)
//!           - { alertname: DiskFull, instance_id: echo-0, severity: critical }
//!     expect:                          # exactly the actions proposed during the run
//!       - { at: 5m, rule: hibernate-idle, instance_id: echo-0, action: hibernate }
//! ```
//!
//! Metrics from the collector's snapshot: `cpu_cores`, `minor_faults_per_s`, `major_faults_per_s`,
//! `swap_in_pages_per_s`, `swap_out_pages_per_s`, `runqueue_delay_mean_seconds`, `memory_resident_bytes`,
//! `memory_swap_bytes`, `cpu_pressure_avg10`, `memory_pressure_avg10`, `io_pressure_avg10` (PSI `some`,
//! percent). Signals fed alongside the snapshot (by the broker): `requests_per_s`, `queued_requests`,
//! `inflight_requests`. The instance `state` is fed alongside too ([`Signals`]).
//!
//! Semantics:
//! - A condition over a value that is missing (a signal nobody fed, memory or pressure the host does not
//!   report, an instance with no known state) does not hold. So without the broker feeding
//!   `requests_per_s`, the default idle rule never hibernates anything: an instance whose traffic Vigil
//!   cannot see is never put to sleep, because nothing would wake it.
//! - Only the instances within the collector's export cap are evaluated; the overflow series never is.
//! - A rule proposes its action for an instance once the conditions have held at every tick for `for`.
//!   A proposal restarts the window: the next one needs `for` again, and `cooldown` since the last one.
//! - `max_fraction`: a rule may have acted on at most ⌈max_fraction × n⌉ (and always at least one) of a
//!   service's n current instances within its cooldown (for a zero cooldown: within the tick). Instances
//!   that have held longest go first; the others keep their window and go when the budget frees.
//! - `alert:` holds while an incoming alert (`POST /api/v1/alerts`, [`crate::alerts`]) is firing that is
//!   about the instance: its `instance_id` label names it, or its `service` label names the instance's
//!   service (and it has no `instance_id`), or it has neither (a host-wide alert, about every instance).
//! - `action: notify` is an alert of Vigil's own: it fires once when the conditions have held for `for`,
//!   stays firing (proposing nothing more) while they keep holding, and resolves when they stop holding or
//!   the instance vanishes ([`Evaluator::take_ended`]); its receivers get both. Other actions' decisions
//!   go to the receivers their rule names, whatever the outcome.
//! - When an instance vanishes its window is dropped (memory stays bounded by the live instances). The record
//!   of recent actions is kept until their cooldown ends, so an instance that returns under the same id is
//!   still in cooldown and still counts against its service's fraction.
//!
//! Mistakes are reported all at once as `file:line:column: key.path: message`; a YAML or type error stops
//! at the first one.

mod cases;
mod eval;
mod file;

use std::sync::Arc;
use std::time::Duration;

/// Where a rule names a receiver (shared with the workflow files, which name receivers too).
pub use crate::located::ReceiverRef;
pub use cases::{TestOutcome, run_tests};
pub use eval::{Ended, Evaluator, InstanceSignals, ProposedAction, Signals};
pub(crate) use file::{RawAlertCondition, alert_condition};
pub use file::{RulesError, check_file, check_receivers, check_str};
/// Globs are shared with the notification matchers of the config, so they live in `vigil-core`.
pub use vigil_core::glob::Glob;

use vigil_core::snapshot::InstanceKind;

/// What a rule asks the safety gate to do to an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Hibernate,
    Wake,
    Restart,
    Notify,
    /// Stop an instance of a `start: on_demand` or `scale:` service until it is needed again.
    Stop,
    /// Start a stopped instance of a `start: on_demand` or `scale:` service.
    Start,
    /// Start the remediation workflow the rule names (`workflow: NAME`) for the instance.
    Workflow,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::Hibernate,
        Action::Wake,
        Action::Restart,
        Action::Notify,
        Action::Stop,
        Action::Start,
        Action::Workflow,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Hibernate => "hibernate",
            Action::Wake => "wake",
            Action::Restart => "restart",
            Action::Notify => "notify",
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Workflow => "workflow",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// The lifecycle state of an instance (DESIGN §4), as the healer knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceState {
    Starting,
    Active,
    Hibernating,
    Hibernated,
    Waking,
    Stopping,
    Stopped,
    Failed,
}

impl InstanceState {
    pub const ALL: [InstanceState; 8] = [
        InstanceState::Starting,
        InstanceState::Active,
        InstanceState::Hibernating,
        InstanceState::Hibernated,
        InstanceState::Waking,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Active => "active",
            InstanceState::Hibernating => "hibernating",
            InstanceState::Hibernated => "hibernated",
            InstanceState::Waking => "waking",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
        }
    }

    pub fn from_name(name: &str) -> Option<InstanceState> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A value fed alongside the snapshot, per instance, by whoever sees the traffic (the broker).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Requests completed per second.
    RequestsPerS,
    /// Requests waiting for the instance (held while it wakes, or queued in the broker).
    QueuedRequests,
    /// Requests in flight on the instance.
    InflightRequests,
}

impl Signal {
    pub const COUNT: usize = 3;
    pub const ALL: [Signal; Signal::COUNT] =
        [Signal::RequestsPerS, Signal::QueuedRequests, Signal::InflightRequests];

    pub const fn as_str(self) -> &'static str {
        match self {
            Signal::RequestsPerS => "requests_per_s",
            Signal::QueuedRequests => "queued_requests",
            Signal::InflightRequests => "inflight_requests",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// A number a condition can test: from the snapshot, or a [`Signal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    CpuCores,
    MinorFaultsPerS,
    MajorFaultsPerS,
    SwapInPagesPerS,
    SwapOutPagesPerS,
    RunqueueDelayMeanSeconds,
    MemoryResidentBytes,
    MemorySwapBytes,
    CpuPressureAvg10,
    MemoryPressureAvg10,
    IoPressureAvg10,
    Signal(Signal),
}

impl Metric {
    pub const ALL: [Metric; 14] = [
        Metric::CpuCores,
        Metric::MinorFaultsPerS,
        Metric::MajorFaultsPerS,
        Metric::SwapInPagesPerS,
        Metric::SwapOutPagesPerS,
        Metric::RunqueueDelayMeanSeconds,
        Metric::MemoryResidentBytes,
        Metric::MemorySwapBytes,
        Metric::CpuPressureAvg10,
        Metric::MemoryPressureAvg10,
        Metric::IoPressureAvg10,
        Metric::Signal(Signal::RequestsPerS),
        Metric::Signal(Signal::QueuedRequests),
        Metric::Signal(Signal::InflightRequests),
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Metric::CpuCores => "cpu_cores",
            Metric::MinorFaultsPerS => "minor_faults_per_s",
            Metric::MajorFaultsPerS => "major_faults_per_s",
            Metric::SwapInPagesPerS => "swap_in_pages_per_s",
            Metric::SwapOutPagesPerS => "swap_out_pages_per_s",
            Metric::RunqueueDelayMeanSeconds => "runqueue_delay_mean_seconds",
            Metric::MemoryResidentBytes => "memory_resident_bytes",
            Metric::MemorySwapBytes => "memory_swap_bytes",
            Metric::CpuPressureAvg10 => "cpu_pressure_avg10",
            Metric::MemoryPressureAvg10 => "memory_pressure_avg10",
            Metric::IoPressureAvg10 => "io_pressure_avg10",
            Metric::Signal(s) => s.as_str(),
        }
    }

    pub fn from_name(name: &str) -> Option<Metric> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

/// The value of `metric` for `inst` from its snapshot alone (the broker's signals are not in it: `None`).
pub fn metric_value(metric: Metric, inst: &vigil_core::snapshot::InstanceSnapshot) -> Option<f64> {
    eval::value(metric, inst, None)
}

/// Bounds on a metric; every bound given must hold. A NaN value never holds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bounds {
    pub above: Option<f64>,
    pub below: Option<f64>,
    pub at_least: Option<f64>,
    pub at_most: Option<f64>,
}

impl Bounds {
    pub fn holds(&self, v: f64) -> bool {
        !v.is_nan()
            && self.above.is_none_or(|b| v > b)
            && self.below.is_none_or(|b| v < b)
            && self.at_least.is_none_or(|b| v >= b)
            && self.at_most.is_none_or(|b| v <= b)
    }
}

/// An incoming alert a rule waits for: firing, about the instance (its `instance_id`, its service, or the
/// whole host), named like `name` (a glob on `alertname`; any name when absent) and carrying every label
/// given with exactly that value.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertCondition {
    pub name: Option<Glob>,
    pub labels: Vec<(String, String)>,
}

impl AlertCondition {
    pub fn matches(&self, fact: &crate::alerts::AlertFact, service: &str, instance_id: &str) -> bool {
        fact.scope.covers(service, instance_id) && self.matches_alert(fact)
    }

    /// Whether the alert is one of those meant, whatever it is about (a workflow's alert trigger).
    pub fn matches_alert(&self, fact: &crate::alerts::AlertFact) -> bool {
        self.name.as_ref().is_none_or(|g| g.matches(&fact.name))
            && self.labels.iter().all(|(k, v)| fact.labels.get(k) == Some(v))
    }
}

/// One condition of a rule's `when`.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    Metric { metric: Metric, bounds: Bounds },
    State(Vec<InstanceState>),
    Alert(AlertCondition),
}

/// Who hears of a rule's decisions, and the labels its notifications carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleNotify {
    /// Receivers (`notify.receivers[].name` in the config) the rule sends to.
    pub receivers: Vec<Arc<str>>,
    /// Labels added to its notifications (`severity`, `team`, ... for Alertmanager's routing).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Which instances a rule looks at. `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub service: Option<Glob>,
    pub instance_id: Option<Glob>,
    pub kinds: Option<Vec<InstanceKind>>,
}

impl Selector {
    pub fn matches(&self, service: &str, instance_id: &str, kind: InstanceKind) -> bool {
        self.service.as_ref().is_none_or(|g| g.matches(service))
            && self.instance_id.as_ref().is_none_or(|g| g.matches(instance_id))
            && self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }
}

/// A validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub select: Selector,
    pub when: Vec<Condition>,
    /// How long the conditions must hold (`for`).
    pub hold_for: Duration,
    pub action: Action,
    pub cooldown: Duration,
    /// Share of a service's instances the rule may affect at once, in (0, 1]; `None` is no limit.
    pub max_fraction: Option<f64>,
    /// Its receivers and notification labels (`notify:`, `labels:`).
    pub notify: Arc<RuleNotify>,
    /// The workflow `action: workflow` starts (`workflow:`).
    pub workflow: Option<Arc<str>>,
}

/// One instance's values in a test step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TestValues {
    pub service: Option<Arc<str>>,
    pub state: Option<InstanceState>,
    pub metrics: Vec<(Metric, f64)>,
}

/// A step of a test case: at `at`, set these instances' values and remove those instances.
#[derive(Clone, Debug, PartialEq)]
pub struct TestStep {
    pub at: Duration,
    pub set: Vec<(Arc<str>, TestValues)>,
    pub remove: Vec<Arc<str>>,
    /// When given, the incoming alerts firing from this step on (each a label set), replacing the last.
    pub alerts: Option<Vec<std::collections::BTreeMap<String, String>>>,
}

/// A proposal a test case expects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedAction {
    pub at: Duration,
    pub rule: Arc<str>,
    pub instance_id: Arc<str>,
    pub action: Action,
}

/// A test case carried by a rule file.
#[derive(Clone, Debug, PartialEq)]
pub struct TestCase {
    pub name: String,
    pub every: Duration,
    pub until: Duration,
    pub steps: Vec<TestStep>,
    pub expect: Vec<ExpectedAction>,
}

/// A validated rule file.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// The file name, as given to [`check_file`].
    pub file: String,
    pub rules: Vec<Rule>,
    pub tests: Vec<TestCase>,
    /// Every receiver the rules name, where they name it (checked against the config by the healer).
    pub receivers: Vec<ReceiverRef>,
}

#[cfg(test)]
mod tests;
