//! The healer's section, `healer:`: the safety gate and the standby. (`dry_run`, `rules` and `services`
//! are top-level keys of [`super::VigilConfig`].)

use serde::Deserialize;

use crate::values::{CpuList, CpuQuota, Fraction, HumanDuration};

/// Tuning of the healer: the safety gate and the standby.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealerSettings {
    /// Host-wide limit on executed actions per sliding minute.
    pub max_actions_per_minute: usize,
    /// At most this fraction of a service's instances in standby or in transition (1.0: a service may go
    /// wholly to standby, the zero-instance case).
    pub max_standby_fraction: Fraction,
    /// CPUs hibernated instances share (cpuset list); default: the last online CPU.
    pub pool_cpus: Option<CpuList>,
    /// CPU quota of a hibernated instance, in cores.
    pub quota: CpuQuota,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    pub stop_grace: HumanDuration,
    /// Where instance cgroups are created, in the v2 hierarchy (and below this process's own v1 cgroups on
    /// hybrid hosts). Must equal the collector's `watch.managed_root` so instances keep their names.
    pub cgroup_parent: String,
    /// Storm protection of remediation workflows.
    pub workflows: WorkflowLimits,
}

/// `healer.workflows`: how many remediation runs at once, and the circuit breaker that stops new ones when
/// faults spread over too much of the host.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowLimits {
    /// Runs executing at once; more wait, queued in order.
    pub max_concurrent: usize,
    pub breaker: Breaker,
}

impl Default for WorkflowLimits {
    fn default() -> Self {
        WorkflowLimits { max_concurrent: 4, breaker: Breaker::default() }
    }
}

/// `healer.workflows.breaker`: new triggered runs are refused while more than `max_fraction` of the host's
/// devices (block devices, online CPUs, NICs, memory controllers) had triggering faults within `window`, and
/// at least `min_devices` did.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Breaker {
    pub window: HumanDuration,
    pub max_fraction: Fraction,
    pub min_devices: usize,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker { window: HumanDuration::from_secs(300), max_fraction: Fraction::HALF, min_devices: 3 }
    }
}

impl Default for HealerSettings {
    fn default() -> Self {
        Self {
            max_actions_per_minute: 30,
            max_standby_fraction: Fraction::ONE,
            pool_cpus: None,
            quota: CpuQuota::STANDBY,
            stop_grace: HumanDuration::from_secs(10),
            cgroup_parent: "/vigil".into(),
            workflows: WorkflowLimits::default(),
        }
    }
}
