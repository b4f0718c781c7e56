//! Vigil's kernel probes. They aggregate in the kernel, per cgroup and per CPU, and never emit one event per
//! fault or per context switch: a ring-buffer record per fault nearly doubled a fault-heavy workload's time on
//! these machines (DESIGN.md §3). Every failure is counted in `ERRORS`, never a panic.
//!
//! Offsets of kernel struct fields and the kernel's `vm_event_item` numbers are globals that the loader sets
//! from the kernel's BTF, so nothing kernel-version specific is compiled in (aya has no CO-RE for Rust).
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::RawTracePointContext,
};
use vigil_common::{
    CpuStats, CpuSwitchState, FaultCounts, MAX_CGROUPS, MemcgCounts, PROBE_COUNT, Probe, RUNQ_BUCKETS,
    log2_bucket,
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

/// `sched_wakeup(struct task_struct *p)` and `sched_wakeup_new`: the task is runnable from now.
#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup(ctx: RawTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let pid = match task_pid(task) {
        Ok(p) => p,
        Err(_) => {
            count_error(Probe::SchedWakeup);
            return 0;
        }
    };
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if RUNNABLE_SINCE.insert(pid, now, 0).is_err() {
        count_error(Probe::SchedWakeup);
    }
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)`.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    if try_sched_switch(&ctx).is_err() {
        count_error(Probe::SchedSwitch);
    }
    0
}

fn try_sched_switch(ctx: &RawTracePointContext) -> Result<(), i64> {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    let prev_pid = task_pid(prev)?;
    let next_pid = task_pid(next)?;
    // SAFETY: helpers with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above; `current` is still `prev` here.
    let cg = unsafe { bpf_get_current_cgroup_id() };

    let state = SWITCH_STATE.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: per-CPU slot.
    let state = unsafe { &mut *state };

    let has_pending = state.pending_valid != 0 && state.pending_pid == prev_pid;
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

    // A preempted (or yielding, state TASK_RUNNING) task stays runnable: its wait starts now.
    if prev_pid != 0 && (preempt & 1 != 0 || prev_state as u32 == 0) {
        let _ = RUNNABLE_SINCE.insert(prev_pid, now, 0);
    }
    if next_pid != 0 {
        let key = next_pid;
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
