//! The catalogue of per-instance metrics: one row per metric with its name, help text, unit and how to read
//! it from a snapshot. The Prometheus exposition (`export`) and OTLP (`otlp`) both walk these tables, so
//! the two can never disagree on a name or a meaning. Names are the Prometheus family names (counters get
//! `_total` appended in the Prometheus text, nothing in OTLP).

use crate::snapshot::{Counters, InstanceSnapshot, Psi, Snapshot};

/// One metric of the catalogue.
pub struct Metric<Get> {
    pub name: &'static str,
    pub help: &'static str,
    /// UCUM unit, as OTLP carries it.
    pub unit: &'static str,
    /// A plain `fn`, so every row of a table has the same type.
    pub get: Get,
}

pub type FromCounters = fn(&Counters) -> u64;
pub type FromInstance = fn(&InstanceSnapshot) -> Option<u64>;
pub type FromSnapshot = fn(&Snapshot) -> u64;

pub const PAGE_FAULTS: &str = "vigil_instance_page_faults";
pub const PAGE_FAULTS_HELP: &str = "Page faults taken by the instance's tasks (perf software events, exact)";
pub const RUNQUEUE_DELAY: &str = "vigil_instance_runqueue_delay_seconds";
pub const RUNQUEUE_DELAY_HELP: &str = "Time the instance's tasks waited runnable before running";
pub const PRESSURE: &str = "vigil_instance_pressure_seconds";
pub const PRESSURE_HELP: &str = "Pressure stall time of the instance's cgroup (PSI totals)";

/// Counters of events, exported as they are.
pub const COUNTS: [Metric<FromCounters>; 3] = [
    Metric {
        name: "vigil_instance_swap_in_pages",
        help: "Pages swapped in for the instance's memory cgroup",
        unit: "{page}",
        get: |c| c.swap_in_pages,
    },
    Metric {
        name: "vigil_instance_swap_out_pages",
        help: "Pages swapped out of the instance's memory cgroup",
        unit: "{page}",
        get: |c| c.swap_out_pages,
    },
    Metric {
        name: "vigil_instance_memcg_major_faults",
        help: "Major faults as the memory cgroup counts them (PGMAJFAULT)",
        unit: "{fault}",
        get: |c| c.memcg_major_faults,
    },
];

/// Counters kept in nanoseconds, exported in seconds.
pub const NANOSECOND_TOTALS: [Metric<FromCounters>; 2] = [
    Metric {
        name: "vigil_instance_cpu_seconds",
        help: "CPU time of the instance's tasks (the kernel's per-task sum_exec_runtime, read at sched_switch)",
        unit: "s",
        get: |c| c.cpu_ns,
    },
    Metric {
        name: "vigil_instance_cpu_throttled_seconds",
        help: "Time the instance was throttled by its CPU quota",
        unit: "s",
        get: |c| c.throttled_ns,
    },
];

/// Gauges read from cgroupfs; absent (not 0) where the host does not offer them.
pub const GAUGES: [Metric<FromInstance>; 2] = [
    Metric {
        name: "vigil_instance_memory_resident_bytes",
        help: "Memory charged to the instance's cgroup",
        unit: "By",
        get: |i| i.memory.resident_bytes,
    },
    Metric {
        name: "vigil_instance_memory_swap_bytes",
        help: "Swap used by the instance's cgroup",
        unit: "By",
        get: |i| i.memory.swap_bytes,
    },
];

/// Counters of the collector itself.
pub const SNAPSHOT_TOTALS: [Metric<FromSnapshot>; 2] = [
    Metric {
        name: "vigil_instances_dropped",
        help: "Instances folded into the overflow series because the export cap was reached",
        unit: "{instance}",
        get: |s| s.dropped_total,
    },
    Metric {
        name: "vigil_collector_ticks",
        help: "Snapshots taken by the collector",
        unit: "{tick}",
        get: |s| s.tick,
    },
];

/// Seconds from a nanosecond counter.
pub fn seconds_from_ns(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// `(kind, total stall µs)` of a PSI file: `some`, and `full` where the kernel reports it.
pub fn psi_totals(psi: &Option<Psi>) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    psi.iter()
        .flat_map(|p| std::iter::once(("some", p.some.total_us)).chain(p.full.map(|f| ("full", f.total_us))))
}
