//! `vigil-common`: the `#[repr(C)]` values that Vigil's eBPF probes write into their maps and that the
//! collector reads back. Both sides compile this one definition, so a field added here reaches both; the
//! `user` feature adds the `aya::Pod` markers user space needs to read them.
#![no_std]

/// Page faults taken by the tasks of one v2 cgroup (per CPU; user space sums the CPUs): every fault
/// (PGFAULT) and the major ones among them (PGMAJFAULT); minor = all − major.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub all: u64,
    pub major: u64,
}

impl FaultCounts {
    pub const fn minor(&self) -> u64 {
        self.all.saturating_sub(self.major)
    }
}

/// Memory-cgroup events counted from the `memcg:count_memcg_events` tracepoint, keyed by the memory
/// cgroup's id (on hybrid hosts the inode of the v1 memory directory, not the v2 one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemcgCounts {
    pub swap_in_pages: u64,
    pub swap_out_pages: u64,
    pub major_faults: u64,
}

/// Buckets of the run-queue delay histogram: bucket `i` counts delays in `[2^i, 2^(i+1))` nanoseconds,
/// the last one everything from 2^31 ns (~2.1 s) up.
pub const RUNQ_BUCKETS: usize = 32;

/// Scheduler accounting of one cgroup (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStats {
    /// Nanoseconds its tasks spent on a CPU.
    pub on_cpu_ns: u64,
    /// Sum of the delays between a task becoming runnable and running, in nanoseconds.
    pub runq_delay_ns: u64,
    /// Number of delays summed in `runq_delay_ns`.
    pub runq_count: u64,
    pub runq_hist: [u64; RUNQ_BUCKETS],
}

impl Default for CpuStats {
    fn default() -> Self {
        Self { on_cpu_ns: 0, runq_delay_ns: 0, runq_count: 0, runq_hist: [0; RUNQ_BUCKETS] }
    }
}

/// What the sched_switch probe remembers about one CPU between two switches: which task it switched in, and
/// that task's `sum_exec_runtime` and `sched_info.run_delay` at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSwitchState {
    pub exec_runtime_ns: u64,
    pub run_delay_ns: u64,
    pub pid: u32,
    pub valid: u32,
}

/// Index of each probe in the per-CPU `ERRORS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Faults = 0,
    Memcg = 1,
    SchedSwitch = 2,
    BlockRqError = 3,
    McEvent = 4,
    AerEvent = 5,
    MceRecord = 6,
    MemoryFailure = 7,
}

pub const PROBE_COUNT: u32 = 8;

impl Probe {
    pub const ALL: [Probe; PROBE_COUNT as usize] = [
        Probe::Faults,
        Probe::Memcg,
        Probe::SchedSwitch,
        Probe::BlockRqError,
        Probe::McEvent,
        Probe::AerEvent,
        Probe::MceRecord,
        Probe::MemoryFailure,
    ];

    /// The `probe` label of `vigil_probe_errors_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Probe::Faults => "page_faults",
            Probe::Memcg => "memcg_events",
            Probe::SchedSwitch => "sched_switch",
            Probe::BlockRqError => "block_rq_error",
            Probe::McEvent => "mc_event",
            Probe::AerEvent => "aer_event",
            Probe::MceRecord => "mce_record",
            Probe::MemoryFailure => "memory_failure_event",
        }
    }
}

/// Which hardware-error tracepoint counted an entry of `HW_ERRORS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwSource {
    /// `block:block_rq_error`: a block request completed with an error.
    BlockRqError = 0,
    /// `ras:mc_event`: a memory controller (EDAC) reported a memory error.
    McEvent = 1,
    /// `ras:aer_event`: a PCIe device reported an AER error.
    AerEvent = 2,
    /// `mce:mce_record`: an x86 machine check.
    MceRecord = 3,
    /// `ras:memory_failure_event`: the kernel handled a poisoned page.
    MemoryFailure = 4,
}

impl HwSource {
    pub const fn from_u32(v: u32) -> Option<HwSource> {
        match v {
            0 => Some(HwSource::BlockRqError),
            1 => Some(HwSource::McEvent),
            2 => Some(HwSource::AerEvent),
            3 => Some(HwSource::MceRecord),
            4 => Some(HwSource::MemoryFailure),
            _ => None,
        }
    }
}

/// Bytes of a device name kept in [`HwErrorKey::name`] (PCI names such as `0000:00:1c.0` are 12).
pub const HW_NAME_LEN: usize = 32;

/// One counter of `HW_ERRORS` (the value is a per-CPU `u64` count). One key type for all hardware
/// tracepoints keeps the loader to one map; what each field holds depends on `source`:
///
/// | source         | `unit`                              | `code`                    | `flags`           | `name`   |
/// |----------------|-------------------------------------|---------------------------|-------------------|----------|
/// | BlockRqError   | `dev` as the record has it (maj<<20 \| min) | `error` (a negative errno) | 0              | zeros    |
/// | McEvent        | `mc_index`                          | `error_type` (0 CE, 1 UE, 2 fatal, 3 info) | 0 | zeros    |
/// | AerEvent       | 0                                   | `severity` (0 nonfatal, 1 fatal, 2 correctable) | 0 | `dev_name` |
/// | MceRecord      | `cpu`                               | `bank`                    | 1 if MCi_STATUS.UC | zeros   |
/// | MemoryFailure  | `type` (enum mf_action_page_type)   | `result` (enum mf_result) | 0                 | zeros    |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HwErrorKey {
    pub source: u32,
    pub unit: u32,
    pub code: i32,
    pub flags: u32,
    pub name: [u8; HW_NAME_LEN],
}

impl HwErrorKey {
    pub const fn new(source: HwSource, unit: u32, code: i32) -> HwErrorKey {
        HwErrorKey { source: source as u32, unit, code, flags: 0, name: [0; HW_NAME_LEN] }
    }

    /// `name` up to its first NUL.
    pub fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(HW_NAME_LEN);
        &self.name[..end]
    }
}

/// Capacity of `HW_ERRORS`: distinct (device, error) pairs, far more than a host has; an insert past it is
/// counted as a probe error.
pub const MAX_HW_ERROR_KEYS: u32 = 4096;

/// Map names, shared so a rename cannot split the two sides.
pub mod maps {
    pub const FAULTS: &str = "FAULTS";
    pub const MEMCG: &str = "MEMCG";
    pub const CPU: &str = "CPU";
    pub const ERRORS: &str = "ERRORS";
    pub const HW_ERRORS: &str = "HW_ERRORS";
}

/// Capacity of the per-cgroup maps; an insert past it is counted as a probe error.
pub const MAX_CGROUPS: u32 = 16_384;

/// Bucket index for a delay: floor(log2(ns)), clamped to the histogram. Written as a fixed binary
/// search because the verifier wants bounded, loop-free code.
#[inline(always)]
pub const fn log2_bucket(ns: u64) -> usize {
    let mut v = ns;
    let mut r = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    if r >= RUNQ_BUCKETS { RUNQ_BUCKETS - 1 } else { r }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with no padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::FaultCounts {}
    unsafe impl aya::Pod for super::MemcgCounts {}
    unsafe impl aya::Pod for super::CpuStats {}
    unsafe impl aya::Pod for super::CpuSwitchState {}
    unsafe impl aya::Pod for super::HwErrorKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_bucket_boundaries() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket((1 << 31) - 1), 30);
        assert_eq!(log2_bucket(1 << 31), 31);
        assert_eq!(log2_bucket(u64::MAX), 31);
        for i in 0..31 {
            assert_eq!(log2_bucket(1u64 << i), i as usize);
        }
    }
}
