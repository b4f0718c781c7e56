//! Vigil's kernel probes. They aggregate in the kernel, per cgroup and per CPU, and never emit one event per
//! fault or per context switch: a ring-buffer record per fault nearly doubled a fault-heavy workload's time on
//! these machines (DESIGN.md §3). Every failure is counted in `ERRORS`, never a panic.
//!
//! Offsets of tracepoint fields and the kernel's `vm_event_item` numbers are globals that the loader sets
//! from tracefs formats and from BTF, so nothing kernel-version specific is compiled in.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::{map, perf_event, tracepoint},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{PerfEventContext, TracePointContext},
};
use vigil_common::{
    CpuStats, CpuSwitchState, FaultCounts, MAX_CGROUPS, MemcgCounts, PROBE_COUNT, Probe, RUNQ_BUCKETS,
    log2_bucket,
};

/// `vm_event_item` numbers of PSWPIN, PSWPOUT and PGMAJFAULT, read from BTF by the loader; -1 matches nothing.
#[unsafe(no_mangle)]
static PSWPIN_ITEM: i32 = -1;
#[unsafe(no_mangle)]
static PSWPOUT_ITEM: i32 = -1;
#[unsafe(no_mangle)]
static PGMAJFAULT_ITEM: i32 = -1;

/// Field offsets from `/sys/kernel/tracing/events/*/*/format`, set by the loader (defaults: kernel 6.x).
#[unsafe(no_mangle)]
static MEMCG_ID_OFF: u32 = 8;
#[unsafe(no_mangle)]
static MEMCG_ITEM_OFF: u32 = 16;
#[unsafe(no_mangle)]
static MEMCG_VAL_OFF: u32 = 24;
#[unsafe(no_mangle)]
static SWITCH_PREV_PID_OFF: u32 = 24;
#[unsafe(no_mangle)]
static SWITCH_PREV_STATE_OFF: u32 = 32;
#[unsafe(no_mangle)]
static SWITCH_NEXT_PID_OFF: u32 = 56;
#[unsafe(no_mangle)]
static WAKEUP_PID_OFF: u32 = 24;

/// `prev_state` bits that mean "not runnable" (TASK_REPORT_MAX - 1); a preempted task reports
/// TASK_REPORT_MAX alone and is still on the run queue.
const STATE_NOT_RUNNABLE_MASK: i64 = 0xff;

#[map(name = "FAULTS")]
static FAULTS: PerCpuHashMap<u64, FaultCounts> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "MEMCG")]
static MEMCG: PerCpuHashMap<u64, MemcgCounts> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "CPU")]
static CPU: PerCpuHashMap<u64, CpuStats> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "ERRORS")]
static ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_COUNT, 0);

/// When each runnable task became runnable (by pid). LRU so a task that exits never fills it.
#[map(name = "RUNNABLE_SINCE")]
static RUNNABLE_SINCE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65_536, 0);

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
fn entry<V: Default>(map: &PerCpuHashMap<u64, V>, key: u64, probe: Probe) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(v);
    }
    if map.insert(key, V::default(), 0).is_err() {
        count_error(probe);
        return None;
    }
    let v = map.get_ptr_mut(key);
    if v.is_none() {
        count_error(probe);
    }
    v
}

#[perf_event]
pub fn page_fault_minor(_ctx: PerfEventContext) -> u32 {
    // SAFETY: helper with no arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(v) = entry(&FAULTS, cg, Probe::FaultMinor) {
        // SAFETY: per-CPU value.
        unsafe { (*v).minor += 1 };
    }
    0
}

#[perf_event]
pub fn page_fault_major(_ctx: PerfEventContext) -> u32 {
    // SAFETY: helper with no arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(v) = entry(&FAULTS, cg, Probe::FaultMajor) {
        // SAFETY: per-CPU value.
        unsafe { (*v).major += 1 };
    }
    0
}

#[tracepoint]
pub fn memcg_events(ctx: TracePointContext) -> u32 {
    if try_memcg_events(&ctx).is_err() {
        count_error(Probe::Memcg);
    }
    0
}

fn try_memcg_events(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets come from the tracepoint's own format description.
    let item: i32 = unsafe { ctx.read_at(global(&MEMCG_ITEM_OFF) as usize)? };
    let is_in = item == global(&PSWPIN_ITEM);
    let is_out = item == global(&PSWPOUT_ITEM);
    let is_maj = item == global(&PGMAJFAULT_ITEM);
    if !(is_in || is_out || is_maj) {
        return Ok(());
    }
    // SAFETY: as above.
    let id: u64 = unsafe { ctx.read_at(global(&MEMCG_ID_OFF) as usize)? };
    // SAFETY: as above.
    let val: u64 = unsafe { ctx.read_at(global(&MEMCG_VAL_OFF) as usize)? };
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

#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format description.
    let pid: i32 = match unsafe { ctx.read_at(global(&WAKEUP_PID_OFF) as usize) } {
        Ok(p) => p,
        Err(_) => {
            count_error(Probe::SchedWakeup);
            return 0;
        }
    };
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if RUNNABLE_SINCE.insert(pid as u32, now, 0).is_err() {
        count_error(Probe::SchedWakeup);
    }
    0
}

#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    if try_sched_switch(&ctx).is_err() {
        count_error(Probe::SchedSwitch);
    }
    0
}

fn try_sched_switch(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets from the format description.
    let prev_pid: i32 = unsafe { ctx.read_at(global(&SWITCH_PREV_PID_OFF) as usize)? };
    // SAFETY: as above.
    let prev_state: i64 = unsafe { ctx.read_at(global(&SWITCH_PREV_STATE_OFF) as usize)? };
    // SAFETY: as above.
    let next_pid: i32 = unsafe { ctx.read_at(global(&SWITCH_NEXT_PID_OFF) as usize)? };
    // SAFETY: helpers with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above; `current` is still `prev` here.
    let cg = unsafe { bpf_get_current_cgroup_id() };

    let state = SWITCH_STATE.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: per-CPU slot.
    let state = unsafe { &mut *state };

    let has_pending = state.pending_valid != 0 && state.pending_pid == prev_pid as u32;
    if (state.last_switch_ns != 0 || has_pending)
        && let Some(v) = entry(&CPU, cg, Probe::SchedSwitch)
    {
        // SAFETY: per-CPU value.
        let v = unsafe { &mut *v };
        if state.last_switch_ns != 0 && now > state.last_switch_ns {
            v.on_cpu_ns += now - state.last_switch_ns;
        }
        if has_pending {
            let d = state.pending_delay_ns;
            v.runq_delay_ns += d;
            v.runq_count += 1;
            let b = log2_bucket(d);
            if b < RUNQ_BUCKETS {
                v.runq_hist[b] += 1;
            }
        }
    }
    state.last_switch_ns = now;
    state.pending_valid = 0;

    // A preempted task stays runnable: its wait starts now.
    if prev_pid != 0 && prev_state & STATE_NOT_RUNNABLE_MASK == 0 {
        let _ = RUNNABLE_SINCE.insert(prev_pid as u32, now, 0);
    }
    if next_pid != 0 {
        let key = next_pid as u32;
        // SAFETY: value copied out at once.
        if let Some(since) = unsafe { RUNNABLE_SINCE.get(key) } {
            let since = *since;
            if now >= since {
                state.pending_delay_ns = now - since;
                state.pending_pid = key;
                state.pending_valid = 1;
            }
            let _ = RUNNABLE_SINCE.remove(key);
        }
    }
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
