//! The per-tick picture of every instance that the collector hands to the healer and the exporters.
//!
//! A [`Snapshot`] is immutable and shared as `Arc<Snapshot>`, so cloning it for many readers costs one
//! reference count. Counters are cumulative since the probes attached (or since the cgroup appeared);
//! rates are per second over the last tick.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vigil_common::{PROBE_COUNT, RUNQ_BUCKETS};

/// What kind of cgroup an instance is, as far as its path tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceKind {
    /// Started by Vigil under its own cgroup.
    Managed,
    /// A container of a Kubernetes pod (or the pod's own cgroup).
    Kubernetes,
    /// A docker / containerd / podman container outside Kubernetes.
    Container,
    /// A systemd service or scope.
    SystemdUnit,
    /// Anything else, named by its path.
    Other,
}

impl InstanceKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            InstanceKind::Managed => "managed",
            InstanceKind::Kubernetes => "kubernetes",
            InstanceKind::Container => "container",
            InstanceKind::SystemdUnit => "systemd",
            InstanceKind::Other => "other",
        }
    }
}

/// Cumulative counters of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Page faults seen by the perf_event probes in the instance's v2 cgroup.
    pub minor_faults: u64,
    pub major_faults: u64,
    /// Pages swapped in / out, as the memory cgroup counts them (`memcg:count_memcg_events`).
    pub swap_in_pages: u64,
    pub swap_out_pages: u64,
    /// Major faults as the memory cgroup counts them (PGMAJFAULT); a cross-check of `major_faults`.
    pub memcg_major_faults: u64,
    /// Nanoseconds on a CPU.
    pub cpu_ns: u64,
    /// Sum and count of run-queue delays, and their log2 histogram (see `vigil_common::RUNQ_BUCKETS`).
    pub runq_delay_ns: u64,
    pub runq_delays: u64,
    pub runq_hist: [u64; RUNQ_BUCKETS],
    /// CFS throttling from cgroupfs `cpu.stat` (0 where the cpu controller is absent).
    pub throttled_periods: u64,
    pub throttled_ns: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            minor_faults: 0,
            major_faults: 0,
            swap_in_pages: 0,
            swap_out_pages: 0,
            memcg_major_faults: 0,
            cpu_ns: 0,
            runq_delay_ns: 0,
            runq_delays: 0,
            runq_hist: [0; RUNQ_BUCKETS],
            throttled_periods: 0,
            throttled_ns: 0,
        }
    }
}

impl Counters {
    /// Element-wise sum, for the overflow series.
    pub fn add(&mut self, other: &Counters) {
        self.minor_faults += other.minor_faults;
        self.major_faults += other.major_faults;
        self.swap_in_pages += other.swap_in_pages;
        self.swap_out_pages += other.swap_out_pages;
        self.memcg_major_faults += other.memcg_major_faults;
        self.cpu_ns += other.cpu_ns;
        self.runq_delay_ns += other.runq_delay_ns;
        self.runq_delays += other.runq_delays;
        for (a, b) in self.runq_hist.iter_mut().zip(other.runq_hist.iter()) {
            *a += b;
        }
        self.throttled_periods += other.throttled_periods;
        self.throttled_ns += other.throttled_ns;
    }
}

/// Per-second rates over the last tick (zero on an instance's first tick).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub minor_faults: f64,
    pub major_faults: f64,
    pub swap_in_pages: f64,
    pub swap_out_pages: f64,
    /// CPU cores in use (CPU seconds per second).
    pub cpu_cores: f64,
    /// Mean run-queue delay of the waits that ended in the tick, in seconds.
    pub runq_delay_mean_seconds: f64,
}

/// Memory from cgroupfs. `None` where the host does not offer it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Memory charged to the cgroup (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    pub resident_bytes: Option<u64>,
    /// Swap used by the cgroup (v2 `memory.swap.current`, v1 `memory.stat` `swap`).
    pub swap_bytes: Option<u64>,
}

/// One line of a PSI file (`some` or `full`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total_us: u64,
}

/// A PSI file: `some` always, `full` where the kernel reports it (not for CPU on older kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// Pressure stall information of the cgroup (v2 `cpu.pressure`, `memory.pressure`, `io.pressure`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    pub cpu: Option<Psi>,
    pub memory: Option<Psi>,
    pub io: Option<Psi>,
}

/// One instance in one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSnapshot {
    pub service: Arc<str>,
    pub instance_id: Arc<str>,
    pub kind: InstanceKind,
    /// The v2 cgroup path relative to the v2 root (e.g. `/system.slice/nginx.service`).
    pub cgroup: Arc<str>,
    /// Inode of the v2 directory: what `bpf_get_current_cgroup_id()` returns for its tasks.
    pub cgroup_id: Option<u64>,
    /// Id of its memory cgroup (the v1 memory directory's inode on hybrid hosts, the v2 one on v2 hosts).
    pub memcg_id: Option<u64>,
    pub counters: Counters,
    pub rates: Rates,
    pub memory: Memory,
    pub pressure: Pressure,
}

/// Everything the collector knows after one tick.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Tick number, from 1.
    pub tick: u64,
    pub taken_at: SystemTime,
    /// Time since the previous tick (the configured interval on the first).
    pub elapsed: Duration,
    /// Instances within the export cap, ordered by (service, instance_id).
    pub instances: Vec<InstanceSnapshot>,
    /// The sum of every instance past the cap, if any are.
    pub overflow: Option<InstanceSnapshot>,
    /// Instances ever folded into the overflow series.
    pub dropped_total: u64,
    /// Errors counted by each probe (indexed like `vigil_common::Probe::ALL`).
    pub probe_errors: [u64; PROBE_COUNT as usize],
}

impl Snapshot {
    /// An empty snapshot (tick 0), the value the stream holds before the first tick.
    pub fn empty() -> Self {
        Self {
            tick: 0,
            taken_at: SystemTime::now(),
            elapsed: Duration::ZERO,
            instances: Vec::new(),
            overflow: None,
            dropped_total: 0,
            probe_errors: [0; PROBE_COUNT as usize],
        }
    }

    /// Every exported series: the instances within the cap, then the overflow sum.
    pub fn exported(&self) -> impl Iterator<Item = &InstanceSnapshot> {
        self.instances.iter().chain(self.overflow.iter())
    }

    /// The instance with this id, if it is within the cap.
    pub fn instance(&self, instance_id: &str) -> Option<&InstanceSnapshot> {
        self.instances.iter().find(|i| &*i.instance_id == instance_id)
    }

    /// The instance whose v2 cgroup path is `cgroup`.
    pub fn by_cgroup(&self, cgroup: &str) -> Option<&InstanceSnapshot> {
        self.instances.iter().find(|i| &*i.cgroup == cgroup)
    }
}
