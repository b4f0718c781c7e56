//! Vigil's kernel probes. They aggregate in the kernel, per cgroup and per CPU, and never emit one event per
//! fault or per context switch: a ring-buffer record per fault nearly doubled a fault-heavy workload's time on
//! these machines (DESIGN.md §3). Every failure is counted in `ERRORS`, never a panic.
//!
//! Offsets of kernel struct fields and the kernel's `vm_event_item` numbers are globals that the loader sets
//! from the kernel's BTF, so nothing kernel-version specific is compiled in (aya has no CO-RE for Rust).
//!
//! The hardware-error programs (block request errors, EDAC memory errors, PCIe AER, machine checks, memory
//! failures) are classic tracepoints: errors are rare, so the cost of the formatted trace record does not
//! matter, and the record's layout is published in tracefs. The loader reads each field's offset from the
//! event's `format` file into the `*_OFF` globals below and attaches only the events this kernel has.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_current_cgroup_id,
    helpers::bpf_probe_read_kernel,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
};
use vigil_common::{
    CpuStats, CpuSwitchState, FaultCounts, HwErrorKey, HwSource, MAX_CGROUPS, MAX_HW_ERROR_KEYS, MemcgCounts,
    PROBE_COUNT, Probe, RUNQ_BUCKETS, log2_bucket,
};

/// `vm_event_item` numbers of PSWPIN, PSWPOUT, PGMAJFAULT and PGFAULT, read from BTF by the loader; -1 matches
/// nothing.
#[unsafe(no_mangle)]
static PSWPIN_ITEM: i32 = -1;
#[unsafe(no_mangle)]
static PSWPOUT_ITEM: i32 = -1;
#[unsafe(no_mangle)]
static PGMAJFAULT_ITEM: i32 = -1;
#[unsafe(no_mangle)]
static PGFAULT_ITEM: i32 = -1;

/// Offsets along `memcg->css.cgroup->kn->id` (the memory cgroup's id as the classic tracepoint reports it),
/// from BTF; -1 until the loader sets them.
#[unsafe(no_mangle)]
static MEMCG_CSS_OFF: i32 = -1;
#[unsafe(no_mangle)]
static CSS_CGROUP_OFF: i32 = -1;
#[unsafe(no_mangle)]
static CGROUP_KN_OFF: i32 = -1;
#[unsafe(no_mangle)]
static KN_ID_OFF: i32 = -1;

/// `offsetof(struct task_struct, pid)` from BTF. The scheduler probes are raw tracepoints (no trace record is
/// built for them, which is what made the classic sched tracepoints expensive) and get `task_struct`
/// pointers; -1 until the loader sets it.
#[unsafe(no_mangle)]
static TASK_PID_OFF: i32 = -1;
/// `offsetof(task_struct, se.sum_exec_runtime)` and `offsetof(task_struct, sched_info.run_delay)`: the
/// kernel's own per-task CPU time and run-queue wait, so the probe agrees with /proc/PID/schedstat.
#[unsafe(no_mangle)]
static TASK_EXEC_RUNTIME_OFF: i32 = -1;
#[unsafe(no_mangle)]
static TASK_RUN_DELAY_OFF: i32 = -1;

/// Offsets of the trace-record fields the hardware programs read, from each event's tracefs `format` file;
/// -1 until the loader sets them (a program whose offsets are unset counts an error and records nothing).
/// `block:block_rq_error`: `dev` (dev_t, 4 bytes) and `error` (int).
#[unsafe(no_mangle)]
static BLK_DEV_OFF: i32 = -1;
#[unsafe(no_mangle)]
static BLK_ERROR_OFF: i32 = -1;
/// `ras:mc_event`: `error_type` (unsigned int) and `mc_index` (u8).
#[unsafe(no_mangle)]
static MC_ERROR_TYPE_OFF: i32 = -1;
#[unsafe(no_mangle)]
static MC_INDEX_OFF: i32 = -1;
/// `ras:aer_event`: `dev_name` (`__data_loc char[]`) and `severity` (u8).
#[unsafe(no_mangle)]
static AER_DEV_NAME_OFF: i32 = -1;
#[unsafe(no_mangle)]
static AER_SEVERITY_OFF: i32 = -1;
/// `mce:mce_record`: `cpu` (u32), `bank` (u8) and `status` (u64, MCi_STATUS).
#[unsafe(no_mangle)]
static MCE_CPU_OFF: i32 = -1;
#[unsafe(no_mangle)]
static MCE_BANK_OFF: i32 = -1;
#[unsafe(no_mangle)]
static MCE_STATUS_OFF: i32 = -1;
/// `ras:memory_failure_event`: `type` and `result` (both int).
#[unsafe(no_mangle)]
static MF_TYPE_OFF: i32 = -1;
#[unsafe(no_mangle)]
static MF_RESULT_OFF: i32 = -1;

#[map(name = "FAULTS")]
static FAULTS: PerCpuHashMap<u64, FaultCounts> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "MEMCG")]
static MEMCG: PerCpuHashMap<u64, MemcgCounts> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "CPU")]
static CPU: PerCpuHashMap<u64, CpuStats> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "ERRORS")]
static ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_COUNT, 0);

#[map(name = "HW_ERRORS")]
static HW_ERRORS: PerCpuHashMap<HwErrorKey, u64> = PerCpuHashMap::with_max_entries(MAX_HW_ERROR_KEYS, 0);

#[map(name = "SWITCH_STATE")]
static SWITCH_STATE: PerCpuArray<CpuSwitchState> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn global<T: Copy>(v: &'static T) -> T {
    // SAFETY: a read of our own global; volatile so the loader's value is not constant-folded away.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn count_error(probe: Probe) {
    if let Some(slot) = ERRORS.get_ptr_mut(probe as u32) {
        // SAFETY: per-CPU slot, programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

/// The per-CPU value of `key` in `map`, created zeroed on first use.
#[inline(always)]
fn entry<K, V: Default>(map: &PerCpuHashMap<K, V>, key: K, probe: Probe) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(&key) {
        return Some(v);
    }
    if map.insert(&key, &V::default(), 0).is_err() {
        count_error(probe);
        return None;
    }
    let v = map.get_ptr_mut(&key);
    if v.is_none() {
        count_error(probe);
    }
    v
}

/// `count_memcg_events(struct mem_cgroup *memcg, int item, unsigned long val)`.
///
/// It fires in the faulting task for every page fault (PGFAULT, and PGMAJFAULT when the fault needed I/O),
/// which makes it the page-fault probe too: faults are counted for the current task's v2 cgroup, and swap
/// and major-fault events for the memory cgroup named in the arguments. A perf_event program with period 1
/// counted the same faults but nearly doubled the cost of a fault on these machines (bench/probe_cost.rs).
#[raw_tracepoint(tracepoint = "count_memcg_events")]
pub fn memcg_events(ctx: RawTracePointContext) -> i32 {
    if try_memcg_events(&ctx).is_err() {
        count_error(Probe::Memcg);
    }
    0
}

#[inline(always)]
fn read_at<T>(base: *const u8, off: i32) -> Result<T, i64> {
    if off < 0 || base.is_null() {
        return Err(-1);
    }
    // SAFETY: a probe read of kernel memory; failures come back as Err.
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T).map_err(i64::from) }
}

fn try_memcg_events(ctx: &RawTracePointContext) -> Result<(), i64> {
    let item = ctx.arg::<u64>(1) as i32;
    let is_fault = item == global(&PGFAULT_ITEM);
    let is_maj = item == global(&PGMAJFAULT_ITEM);
    let is_in = item == global(&PSWPIN_ITEM);
    let is_out = item == global(&PSWPOUT_ITEM);
    if !(is_fault || is_maj || is_in || is_out) {
        return Ok(());
    }
    let val: u64 = ctx.arg(2);
    if is_fault || is_maj {
        // SAFETY: helper with no arguments; the event is raised in the faulting task.
        let cg = unsafe { bpf_get_current_cgroup_id() };
        if let Some(v) = entry(&FAULTS, cg, Probe::Faults) {
            // SAFETY: per-CPU value.
            unsafe {
                if is_fault {
                    (*v).all += val;
                } else {
                    (*v).major += val;
                }
            }
        }
        if is_fault {
            return Ok(());
        }
    }
    let memcg: *const u8 = ctx.arg(0);
    let css = memcg.wrapping_add(global(&MEMCG_CSS_OFF).max(0) as usize);
    let cgroup: *const u8 = read_at(css, global(&CSS_CGROUP_OFF))?;
    let kn: *const u8 = read_at(cgroup, global(&CGROUP_KN_OFF))?;
    let id: u64 = read_at(kn, global(&KN_ID_OFF))?;
    let v = match entry(&MEMCG, id, Probe::Memcg) {
        Some(v) => v,
        None => return Ok(()),
    };
    // SAFETY: per-CPU value.
    unsafe {
        if is_in {
            (*v).swap_in_pages += val;
        }
        if is_out {
            (*v).swap_out_pages += val;
        }
        if is_maj {
            (*v).major_faults += val;
        }
    }
    Ok(())
}

#[inline(always)]
fn task_pid(task: *const u8) -> Result<u32, i64> {
    read_at::<i32>(task, global(&TASK_PID_OFF)).map(|p| p as u32)
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)`.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    if try_sched_switch(&ctx).is_err() {
        count_error(Probe::SchedSwitch);
    }
    0
}

/// The slice that ends here belongs to `prev` (still `current`, so `bpf_get_current_cgroup_id()` names its
/// cgroup). What `prev` ran and waited for is the growth of its own `sum_exec_runtime` and
/// `sched_info.run_delay` since it was switched in on this CPU, when the values were stashed; the kernel
/// adds the wait before a slice to `run_delay` just after this tracepoint, at the switch-in.
fn try_sched_switch(ctx: &RawTracePointContext) -> Result<(), i64> {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_pid = task_pid(prev)?;
    let state = SWITCH_STATE.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: per-CPU slot; programs do not nest on one CPU.
    let state = unsafe { &mut *state };

    if state.valid != 0 && state.pid == prev_pid {
        let exec: u64 = read_at(prev, global(&TASK_EXEC_RUNTIME_OFF))?;
        let delay: u64 = read_at(prev, global(&TASK_RUN_DELAY_OFF))?;
        // SAFETY: helper with no arguments.
        let cg = unsafe { bpf_get_current_cgroup_id() };
        if let Some(v) = entry(&CPU, cg, Probe::SchedSwitch) {
            // SAFETY: per-CPU value.
            let v = unsafe { &mut *v };
            v.on_cpu_ns += exec.saturating_sub(state.exec_runtime_ns);
            let waited = delay.saturating_sub(state.run_delay_ns);
            v.runq_delay_ns += waited;
            v.runq_count += 1;
            let b = log2_bucket(waited);
            if b < RUNQ_BUCKETS {
                v.runq_hist[b] += 1;
            }
        }
    }

    state.valid = 0;
    let next_pid = task_pid(next)?;
    // The idle task (pid 0) is not accounted like a task; nothing to stash.
    if next_pid != 0 {
        state.exec_runtime_ns = read_at(next, global(&TASK_EXEC_RUNTIME_OFF))?;
        state.run_delay_ns = read_at(next, global(&TASK_RUN_DELAY_OFF))?;
        state.pid = next_pid;
        state.valid = 1;
    }
    Ok(())
}

/// A field of the trace record at an offset the loader read from the event's `format` file.
#[inline(always)]
fn record_field<T>(ctx: &TracePointContext, off: i32) -> Result<T, i64> {
    if off < 0 {
        return Err(-1);
    }
    // SAFETY: a probe read inside the trace record; a bad offset fails the read, it does not fault.
    unsafe { ctx.read_at::<T>(off as usize).map_err(i64::from) }
}

/// Adds one to the hardware-error counter `key` (this CPU's slot).
#[inline(always)]
fn count_hw(key: HwErrorKey, probe: Probe) {
    if let Some(v) = entry(&HW_ERRORS, key, probe) {
        // SAFETY: per-CPU value. A tracepoint program cannot be re-entered on its CPU (the kernel skips a
        // BPF program that would nest inside another on the same CPU), so a plain add is not torn.
        unsafe { *v += 1 };
    }
}

/// `block:block_rq_error`: a request that completed with an error; counted per (device, errno).
#[tracepoint(category = "block", name = "block_rq_error")]
pub fn block_rq_error(ctx: TracePointContext) -> u32 {
    if try_block_rq_error(&ctx).is_err() {
        count_error(Probe::BlockRqError);
    }
    0
}

fn try_block_rq_error(ctx: &TracePointContext) -> Result<(), i64> {
    let dev: u32 = record_field(ctx, global(&BLK_DEV_OFF))?;
    let error: i32 = record_field(ctx, global(&BLK_ERROR_OFF))?;
    count_hw(HwErrorKey::new(HwSource::BlockRqError, dev, error), Probe::BlockRqError);
    Ok(())
}

/// `ras:mc_event`: an EDAC memory-controller error; counted per (controller, error type).
#[tracepoint(category = "ras", name = "mc_event")]
pub fn mc_event(ctx: TracePointContext) -> u32 {
    if try_mc_event(&ctx).is_err() {
        count_error(Probe::McEvent);
    }
    0
}

fn try_mc_event(ctx: &TracePointContext) -> Result<(), i64> {
    let error_type: u32 = record_field(ctx, global(&MC_ERROR_TYPE_OFF))?;
    let mc_index: u8 = record_field(ctx, global(&MC_INDEX_OFF))?;
    count_hw(HwErrorKey::new(HwSource::McEvent, u32::from(mc_index), error_type as i32), Probe::McEvent);
    Ok(())
}

/// `ras:aer_event`: a PCIe AER error; counted per (device name, severity).
#[tracepoint(category = "ras", name = "aer_event")]
pub fn aer_event(ctx: TracePointContext) -> u32 {
    if try_aer_event(&ctx).is_err() {
        count_error(Probe::AerEvent);
    }
    0
}

fn try_aer_event(ctx: &TracePointContext) -> Result<(), i64> {
    let severity: u8 = record_field(ctx, global(&AER_SEVERITY_OFF))?;
    // A `__data_loc` field holds the string's place in the record: offset in the low 16 bits.
    let loc: u32 = record_field(ctx, global(&AER_DEV_NAME_OFF))?;
    let mut key = HwErrorKey::new(HwSource::AerEvent, 0, i32::from(severity));
    let name = (ctx.as_ptr() as *const u8).wrapping_add((loc & 0xffff) as usize);
    // SAFETY: a probe read of a NUL-terminated string inside the record, bounded by the key's buffer; a
    // name that does not fit is truncated (the last byte stays NUL).
    unsafe { bpf_probe_read_kernel_str_bytes(name, &mut key.name[..vigil_common::HW_NAME_LEN - 1]) }
        .map_err(i64::from)?;
    count_hw(key, Probe::AerEvent);
    Ok(())
}

/// `mce:mce_record`: an x86 machine check; counted per (CPU, bank, uncorrected).
#[tracepoint(category = "mce", name = "mce_record")]
pub fn mce_record(ctx: TracePointContext) -> u32 {
    if try_mce_record(&ctx).is_err() {
        count_error(Probe::MceRecord);
    }
    0
}

/// MCi_STATUS.UC: the error was not corrected.
const MCI_STATUS_UC: u64 = 1 << 61;

fn try_mce_record(ctx: &TracePointContext) -> Result<(), i64> {
    let cpu: u32 = record_field(ctx, global(&MCE_CPU_OFF))?;
    let bank: u8 = record_field(ctx, global(&MCE_BANK_OFF))?;
    let status: u64 = record_field(ctx, global(&MCE_STATUS_OFF))?;
    let mut key = HwErrorKey::new(HwSource::MceRecord, cpu, i32::from(bank));
    key.flags = u32::from(status & MCI_STATUS_UC != 0);
    count_hw(key, Probe::MceRecord);
    Ok(())
}

/// `ras:memory_failure_event`: the kernel handled a hardware-poisoned page; counted per (page type, result).
#[tracepoint(category = "ras", name = "memory_failure_event")]
pub fn memory_failure_event(ctx: TracePointContext) -> u32 {
    if try_memory_failure_event(&ctx).is_err() {
        count_error(Probe::MemoryFailure);
    }
    0
}

fn try_memory_failure_event(ctx: &TracePointContext) -> Result<(), i64> {
    let page_type: i32 = record_field(ctx, global(&MF_TYPE_OFF))?;
    let result: i32 = record_field(ctx, global(&MF_RESULT_OFF))?;
    count_hw(HwErrorKey::new(HwSource::MemoryFailure, page_type as u32, result), Probe::MemoryFailure);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
