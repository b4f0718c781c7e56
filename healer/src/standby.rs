//! The low-power standby ("hibernate"): an idle instance stays alive, its connections and state kept, while
//! it gives back its memory and nearly all of its CPU; waking gives both back.
//!
//! Hibernate freezes the instance's cgroup (so nothing touches memory while it is measured and paged out),
//! records its resident working set from `/proc/PID/smaps`, pages its anonymous memory out with
//! `process_madvise(MADV_PAGEOUT)`, makes the memory cgroup give back the swap cache that leaves behind
//! (pageout alone keeps the pages charged), then moves the instance into the shared low-power cpuset pool
//! with a small CPU quota and thaws it, so it can still answer keepalives slowly. Wake lifts the CPU limits
//! and prefetches the recorded working set with `process_madvise(MADV_WILLNEED)` in large ranges, several
//! threads at once, which is several times faster than letting the instance fault it back page by page.
//!
//! Without swap there is nowhere to page out to: hibernate then does the CPU part only and says that memory
//! stays resident.
//!
//! The parsing and range arithmetic are pure functions; the order of steps is checked against fakes of
//! [`CgroupDriver`] and [`MemoryOps`]; the kernel side is exercised by `tests/standby.rs`.

mod sys;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::cgroup::{CgroupDriver, CgroupDriverError, CpuLimit, InstanceCgroup, parse_cpu_list};

/// `UIO_MAXIOV`: the most iovecs one `process_madvise` call takes.
const IOV_MAX: usize = 1024;
/// Prefetch hands out work in pieces of this size, so one huge range (a heap) is spread over all threads.
const PREFETCH_PIECE: u64 = 64 << 20;
/// Prefetch threads: the advice mostly queues swap reads, so a few threads keep the device busy and more
/// only contend on the page-table locks.
const MAX_PREFETCH_THREADS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Cgroup(#[from] CgroupDriverError),
    #[error("cannot read /proc/{pid}/smaps: {source}")]
    ReadSmaps {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("pidfd_open({pid}): {source}")]
    PidfdOpen {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("process_madvise({advice}) on pid {pid} at {start:#x}+{len:#x}: {source}")]
    Madvise {
        pid: u32,
        advice: &'static str,
        start: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("a prefetch thread panicked")]
    PrefetchThread,
}

/// The resident anonymous memory of one process: address ranges (start, length) in that process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessWorkingSet {
    pub pid: u32,
    /// Sorted, non-overlapping, adjacent mappings merged.
    pub ranges: Vec<(u64, u64)>,
    /// Anonymous bytes resident in those ranges when recorded.
    pub resident_bytes: u64,
}

/// What an instance had resident when it was hibernated, per process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pub processes: Vec<ProcessWorkingSet>,
}

impl WorkingSet {
    /// Total length of the recorded ranges (what pageout and prefetch cover).
    pub fn range_bytes(&self) -> u64 {
        self.processes.iter().flat_map(|p| &p.ranges).map(|r| r.1).sum()
    }

    /// Anonymous bytes that were resident when recorded.
    pub fn resident_bytes(&self) -> u64 {
        self.processes.iter().map(|p| p.resident_bytes).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.iter().all(|p| p.ranges.is_empty())
    }
}

/// One mapping of `/proc/PID/smaps` that hibernate pages out: private, writable, with anonymous pages
/// resident, and not locked, hugetlb or a special (I/O, PFN) mapping that `MADV_PAGEOUT` refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnonMapping {
    pub start: u64,
    pub end: u64,
    pub anonymous_bytes: u64,
}

/// Parses `/proc/PID/smaps` text into the mappings worth paging out. Malformed entries are left out.
pub fn parse_smaps(text: &str) -> Vec<AnonMapping> {
    struct Entry {
        start: u64,
        end: u64,
        private_writable: bool,
        anonymous_bytes: u64,
        refused: bool,
    }
    let mut out = Vec::new();
    let mut current: Option<Entry> = None;
    let finish = |entry: Option<Entry>, out: &mut Vec<AnonMapping>| {
        if let Some(e) = entry
            && e.private_writable
            && !e.refused
            && e.anonymous_bytes > 0
        {
            out.push(AnonMapping { start: e.start, end: e.end, anonymous_bytes: e.anonymous_bytes });
        }
    };
    for line in text.lines() {
        if let Some((start, end, perms)) = parse_smaps_header(line) {
            finish(current.take(), &mut out);
            let private_writable =
                perms.as_bytes().get(1) == Some(&b'w') && perms.as_bytes().get(3) == Some(&b'p');
            current = Some(Entry { start, end, private_writable, anonymous_bytes: 0, refused: false });
            continue;
        }
        let Some(entry) = current.as_mut() else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("Anonymous:") {
            entry.anonymous_bytes = parse_kb(rest).unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            // lo: mlocked, ht: hugetlb, pf: PFN map, io: device memory; MADV_PAGEOUT fails with EINVAL on them.
            entry.refused = flags.split_ascii_whitespace().any(|f| matches!(f, "lo" | "ht" | "pf" | "io"));
        }
    }
    finish(current, &mut out);
    out
}

/// `"7f12a000-7f12c000 rw-p ..."` → (start, end, perms). Other smaps lines have a key ending in ':' first.
fn parse_smaps_header(line: &str) -> Option<(u64, u64, &str)> {
    let mut fields = line.split_ascii_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    (end > start && perms.len() == 4).then_some((start, end, perms))
}

/// `"   1234 kB"` → 1234 * 1024.
fn parse_kb(rest: &str) -> Option<u64> {
    let mut fields = rest.split_ascii_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Sorts `(start, len)` ranges and merges overlapping or touching ones, so the kernel gets few large
/// ranges. Ranges with a gap between them stay apart: advice over an unmapped hole fails.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let end = start.saturating_add(len);
        if let Some(last) = merged.last_mut() {
            let last_end = last.0.saturating_add(last.1);
            if start <= last_end {
                last.1 = last_end.max(end) - last.0;
                continue;
            }
        }
        merged.push((start, end - start));
    }
    merged
}

/// Splits ranges into pieces of at most `piece` bytes, for handing out to threads.
pub fn split_ranges(ranges: &[(u64, u64)], piece: u64) -> Vec<(u64, u64)> {
    let piece = piece.max(1);
    let mut out = Vec::new();
    for &(start, len) in ranges {
        let mut offset = 0;
        while offset < len {
            let this = piece.min(len - offset);
            out.push((start + offset, this));
            offset += this;
        }
    }
    out
}

/// Records the resident anonymous ranges of each process. A process that exited meanwhile is left out.
pub fn record_working_set(pids: &[u32]) -> Result<WorkingSet, StandbyError> {
    let mut processes = Vec::with_capacity(pids.len());
    for &pid in pids {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
            Ok(text) => text,
            Err(e) if process_gone(&e) => continue,
            Err(source) => return Err(StandbyError::ReadSmaps { pid, source }),
        };
        let mappings = parse_smaps(&text);
        let resident_bytes = mappings.iter().map(|m| m.anonymous_bytes).sum();
        let ranges = merge_ranges(mappings.iter().map(|m| (m.start, m.end - m.start)).collect());
        processes.push(ProcessWorkingSet { pid, ranges, resident_bytes });
    }
    Ok(WorkingSet { processes })
}

fn process_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// What `page_out` did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PageOutReport {
    /// Bytes of ranges the kernel accepted the advice for (not all of them were resident).
    pub advised_bytes: u64,
    /// Bytes of ranges that had gone (unmapped, process exited) and were skipped.
    pub skipped_bytes: u64,
    pub seconds: f64,
}

/// What `prefetch` did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefetchReport {
    pub advised_bytes: u64,
    pub skipped_bytes: u64,
    pub threads: usize,
    /// Time until every advice call returned. The reads are queued by then but may still be in flight.
    pub seconds: f64,
}

/// Pages the working set out: `process_madvise(MADV_PAGEOUT)` per process, up to `IOV_MAX` ranges a call.
pub fn page_out(ws: &WorkingSet) -> Result<PageOutReport, StandbyError> {
    let started = Instant::now();
    let mut report = PageOutReport::default();
    for p in &ws.processes {
        let Some(fd) = open_pidfd(p.pid)? else {
            report.skipped_bytes += p.ranges.iter().map(|r| r.1).sum::<u64>();
            continue;
        };
        let (advised, skipped) = advise(&fd, p.pid, &p.ranges, Advice::PageOut)?;
        report.advised_bytes += advised;
        report.skipped_bytes += skipped;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Prefetches the working set with `process_madvise(MADV_WILLNEED)`: the ranges are cut into 64 MiB pieces
/// that a few threads take in turn, so reads for all processes and all parts of a large heap are queued at
/// once.
pub fn prefetch(ws: &WorkingSet) -> Result<PrefetchReport, StandbyError> {
    let started = Instant::now();
    let mut report = PrefetchReport::default();
    let mut fds = Vec::with_capacity(ws.processes.len());
    let mut pieces: Vec<(usize, (u64, u64))> = Vec::new();
    for p in &ws.processes {
        match open_pidfd(p.pid)? {
            Some(fd) => {
                let index = fds.len();
                fds.push((p.pid, fd));
                pieces.extend(split_ranges(&p.ranges, PREFETCH_PIECE).into_iter().map(|r| (index, r)));
            }
            None => report.skipped_bytes += p.ranges.iter().map(|r| r.1).sum::<u64>(),
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, MAX_PREFETCH_THREADS)
        .min(pieces.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let totals = Mutex::new((0u64, 0u64));
    let first_error: Mutex<Option<StandbyError>> = Mutex::new(None);
    let worker = || {
        let (mut advised, mut skipped) = (0, 0);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(index, range)) = pieces.get(i) else {
                break;
            };
            let (pid, fd) = &fds[index];
            match advise(fd, *pid, &[range], Advice::WillNeed) {
                Ok((a, s)) => {
                    advised += a;
                    skipped += s;
                }
                Err(e) => {
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    // Stop every thread: the instance is usable without prefetch, only slower to warm.
                    next.store(pieces.len(), Ordering::Relaxed);
                    break;
                }
            }
        }
        if let Ok(mut t) = totals.lock() {
            t.0 += advised;
            t.1 += skipped;
        }
    };
    let panicked = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
        handles.into_iter().map(|h| h.join()).any(|r| r.is_err())
    });
    if panicked {
        return Err(StandbyError::PrefetchThread);
    }
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let (advised, skipped) = totals.into_inner().unwrap_or_default();
    report.advised_bytes = advised;
    report.skipped_bytes += skipped;
    report.threads = threads;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn open_pidfd(pid: u32) -> Result<Option<OwnedFd>, StandbyError> {
    match sys::pidfd_open(pid) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if process_gone(&e) => Ok(None),
        Err(source) => Err(StandbyError::PidfdOpen { pid, source }),
    }
}

#[derive(Clone, Copy)]
enum Advice {
    PageOut,
    WillNeed,
}

impl Advice {
    fn raw(self) -> libc::c_int {
        match self {
            Advice::PageOut => libc::MADV_PAGEOUT,
            Advice::WillNeed => libc::MADV_WILLNEED,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Advice::PageOut => "MADV_PAGEOUT",
            Advice::WillNeed => "MADV_WILLNEED",
        }
    }
}

/// Advises all `ranges`, `IOV_MAX` at a time. The kernel stops at the first range that fails and returns
/// the bytes advised before it; a range that fails with ENOMEM (no longer mapped) is skipped and the rest
/// continue. Returns (advised, skipped) bytes.
fn advise(fd: &OwnedFd, pid: u32, ranges: &[(u64, u64)], advice: Advice) -> Result<(u64, u64), StandbyError> {
    let (mut advised, mut skipped) = (0u64, 0u64);
    for chunk in ranges.chunks(IOV_MAX) {
        let mut rest: Vec<(u64, u64)> = chunk.to_vec();
        let mut interrupted = 0;
        while !rest.is_empty() {
            match sys::process_madvise(fd, &rest, advice.raw()) {
                Ok(n) => {
                    let total: u64 = rest.iter().map(|r| r.1).sum();
                    let n = n as u64;
                    advised += n.min(total);
                    if n >= total {
                        break;
                    }
                    consume_front(&mut rest, n);
                    if n == 0
                        && let Some(first) = rest.first().copied()
                    {
                        // No progress and no error: the kernel declined the first range; skip it.
                        skipped += first.1;
                        rest.remove(0);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && interrupted < 10 => interrupted += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    skipped += rest.iter().map(|r| r.1).sum::<u64>();
                    rest.clear();
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    // The first remaining range is (partly) unmapped: the process changed its mappings.
                    if let Some(first) = rest.first().copied() {
                        skipped += first.1;
                        rest.remove(0);
                    }
                }
                Err(source) => {
                    let (start, len) = rest.first().copied().unwrap_or_default();
                    return Err(StandbyError::Madvise { pid, advice: advice.name(), start, len, source });
                }
            }
        }
    }
    Ok((advised, skipped))
}

/// Drops the first `bytes` bytes of `ranges`: whole ranges, then the front of a partly advised one.
fn consume_front(ranges: &mut Vec<(u64, u64)>, mut bytes: u64) {
    let mut whole = 0;
    for r in ranges.iter_mut() {
        if bytes >= r.1 {
            bytes -= r.1;
            whole += 1;
        } else {
            r.0 += bytes;
            r.1 -= bytes;
            break;
        }
    }
    ranges.drain(..whole);
}

/// True when the host has free swap, so paged-out anonymous memory has somewhere to go.
pub fn swap_available() -> bool {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| meminfo_bytes(&t, "SwapFree")).unwrap_or(0) > 0
}

/// A `Key:  123 kB` value of `/proc/meminfo`, in bytes.
pub fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(':').and_then(parse_kb))
}

/// The memory half of hibernate and wake, behind a trait so the order of steps can be tested with a fake.
pub trait MemoryOps: Send + Sync {
    fn swap_available(&self) -> bool;
    fn record_working_set(&self, pids: &[u32]) -> Result<WorkingSet, StandbyError>;
    fn page_out(&self, ws: &WorkingSet) -> Result<PageOutReport, StandbyError>;
    fn prefetch(&self, ws: &WorkingSet) -> Result<PrefetchReport, StandbyError>;
}

/// [`MemoryOps`] on the real kernel: the free functions of this module.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelMemory;

impl MemoryOps for KernelMemory {
    fn swap_available(&self) -> bool {
        swap_available()
    }
    fn record_working_set(&self, pids: &[u32]) -> Result<WorkingSet, StandbyError> {
        record_working_set(pids)
    }
    fn page_out(&self, ws: &WorkingSet) -> Result<PageOutReport, StandbyError> {
        page_out(ws)
    }
    fn prefetch(&self, ws: &WorkingSet) -> Result<PrefetchReport, StandbyError> {
        prefetch(ws)
    }
}

/// Where hibernated instances run.
#[derive(Clone, Debug, PartialEq)]
pub struct StandbyPolicy {
    /// The shared low-power cpuset pool (a kernel cpu list). Default: the host's last online CPU, since
    /// the first ones tend to take the interrupts and housekeeping work.
    pub pool_cpus: String,
    /// CPU quota of each hibernated instance as a fraction of one core. Default 0.05.
    pub quota: f64,
}

impl Default for StandbyPolicy {
    fn default() -> Self {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
        let last = parse_cpu_list(&online).ok().and_then(|cpus| cpus.into_iter().max()).unwrap_or(0);
        StandbyPolicy { pool_cpus: last.to_string(), quota: 0.05 }
    }
}

impl StandbyPolicy {
    pub fn cpu_limit(&self) -> CpuLimit {
        CpuLimit { cpus: Some(self.pool_cpus.clone()), quota: Some(self.quota) }
    }
}

/// What hibernate did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HibernateReport {
    /// What was resident; `wake` prefetches it. Empty when memory was kept resident.
    pub working_set: WorkingSet,
    pub page_out: Option<PageOutReport>,
    /// Bytes charged to the memory cgroup before and after.
    pub memory_before: u64,
    pub memory_after: u64,
    /// True when nothing was paged out (no swap on the host); `message` says why.
    pub memory_kept_resident: bool,
    pub message: String,
    pub seconds: f64,
}

/// What wake did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WakeReport {
    pub prefetch: Option<PrefetchReport>,
    pub seconds: f64,
}

/// Hibernates the instance in `cg` on the real kernel: see [`hibernate_with`].
pub fn hibernate(
    driver: &dyn CgroupDriver,
    cg: &InstanceCgroup,
    policy: &StandbyPolicy,
) -> Result<HibernateReport, StandbyError> {
    hibernate_with(driver, &KernelMemory, cg, policy)
}

/// Freeze → record the working set → page out → reclaim the cgroup → CPU into the pool → thaw. Without
/// swap only the CPU part runs and the report says memory stays resident. If a step fails after the
/// freeze, the instance is thawed (with whatever CPU limit it has) before the error is returned, so a
/// failed hibernate never leaves it stopped.
pub fn hibernate_with(
    driver: &dyn CgroupDriver,
    memory: &dyn MemoryOps,
    cg: &InstanceCgroup,
    policy: &StandbyPolicy,
) -> Result<HibernateReport, StandbyError> {
    let started = Instant::now();
    let limit = policy.cpu_limit();
    limit.validate()?;
    let memory_before = driver.memory_usage(cg)?;

    if !memory.swap_available() {
        driver.set_cpu(cg, &limit)?;
        let memory_after = driver.memory_usage(cg)?;
        return Ok(HibernateReport {
            memory_before,
            memory_after,
            memory_kept_resident: true,
            message: format!(
                "no swap on this host: CPU limited to cpus {} at {:.1} % of a core, but memory stays resident \
                 ({memory_after} bytes charged to {})",
                policy.pool_cpus,
                policy.quota * 100.0,
                cg.v2_rel
            ),
            seconds: started.elapsed().as_secs_f64(),
            ..HibernateReport::default()
        });
    }

    driver.set_frozen(cg, true)?;
    let frozen_part = || -> Result<(WorkingSet, PageOutReport), StandbyError> {
        let pids = driver.pids(cg)?;
        let working_set = memory.record_working_set(&pids)?;
        let page_out = memory.page_out(&working_set)?;
        driver.reclaim_memory(cg)?;
        driver.set_cpu(cg, &limit)?;
        Ok((working_set, page_out))
    };
    let result = frozen_part();
    let thawed = driver.set_frozen(cg, false);
    let (working_set, page_out) = match (result, thawed) {
        (Ok(done), Ok(())) => done,
        (Err(e), thawed) => {
            if let Err(thaw_error) = thawed {
                tracing::error!(cgroup = %cg.v2_rel, error = %thaw_error, "cannot thaw after a failed hibernate");
            }
            return Err(e);
        }
        (Ok(_), Err(e)) => return Err(e.into()),
    };
    let memory_after = driver.memory_usage(cg)?;
    let message = format!(
        "paged out {} bytes of resident anonymous memory in {:.2} s; cgroup memory {memory_before} → \
         {memory_after} bytes; CPU limited to cpus {} at {:.1} % of a core",
        working_set.resident_bytes(),
        page_out.seconds,
        policy.pool_cpus,
        policy.quota * 100.0
    );
    Ok(HibernateReport {
        working_set,
        page_out: Some(page_out),
        memory_before,
        memory_after,
        memory_kept_resident: false,
        message,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Wakes the instance in `cg` on the real kernel: see [`wake_with`].
pub fn wake(
    driver: &dyn CgroupDriver,
    cg: &InstanceCgroup,
    ws: &WorkingSet,
) -> Result<WakeReport, StandbyError> {
    wake_with(driver, &KernelMemory, cg, ws, &CpuLimit::unlimited())
}

/// Thaw (in case a hibernate was interrupted) → lift the CPU limits to `active` (no limit, or every CPU but
/// the cordoned ones) → prefetch the working set. CPU comes first so the instance can serve at full speed
/// while its memory streams back in.
pub fn wake_with(
    driver: &dyn CgroupDriver,
    memory: &dyn MemoryOps,
    cg: &InstanceCgroup,
    ws: &WorkingSet,
    active: &CpuLimit,
) -> Result<WakeReport, StandbyError> {
    let started = Instant::now();
    driver.set_frozen(cg, false)?;
    driver.set_cpu(cg, active)?;
    let prefetch = if ws.is_empty() { None } else { Some(memory.prefetch(ws)?) };
    Ok(WakeReport { prefetch, seconds: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d4c8a00000-55d4c8a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  40 kB
Anonymous:            40 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              262144 kB
Anonymous:        262144 kB
VmFlags: rd wr mr mw me ac sd
7f0010000000-7f0010001000 rw-p 00000000 00:00 0
Size:                  4 kB
Rss:                   4 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me ac sd
7f0020000000-7f0020004000 r--p 00000000 fd:00 1234                       /usr/lib/libc.so.6
Size:                 16 kB
Rss:                  16 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0020004000-7f0020006000 rw-p 00004000 fd:00 1234                       /usr/lib/libc.so.6
Size:                  8 kB
Rss:                   8 kB
Anonymous:             8 kB
VmFlags: rd wr mr mw me ac sd
7f0030000000-7f0030001000 rw-p 00000000 00:00 0
Size:                  4 kB
Rss:                   4 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me lo ac sd
7f0040000000-7f0040001000 rw-s 00000000 00:01 99                         /dev/shm/x
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms sd
7f0050000000-7f0050010000 rw-p 00000000 00:00 0
Size:                 64 kB
Rss:                   0 kB
Anonymous:             0 kB
VmFlags: rd wr mr mw me ac sd
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
Anonymous:            12 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn smaps_keeps_resident_private_writable_anonymous_memory() {
        let maps = parse_smaps(SMAPS);
        let starts: Vec<u64> = maps.iter().map(|m| m.start).collect();
        assert_eq!(
            starts,
            vec![0x55d4c8a00000, 0x7f0000000000, 0x7f0010000000, 0x7f0020004000, 0x7ffc00000000],
            "read-only, shared, locked and non-resident mappings are left out"
        );
        assert_eq!(maps[1].anonymous_bytes, 256 << 20);
        assert_eq!(maps.iter().map(|m| m.anonymous_bytes).sum::<u64>(), (40 + 262144 + 4 + 8 + 12) << 10);
    }

    #[test]
    fn smaps_tolerates_garbage() {
        assert!(parse_smaps("").is_empty());
        assert!(parse_smaps("Anonymous: 4 kB\nzz-yy rw-p\n").is_empty());
        let truncated = "7f0000000000-7f0000001000 rw-p 0 00:00 0\nAnonymous: 4 kB";
        assert_eq!(parse_smaps(truncated).len(), 1);
    }

    #[test]
    fn adjacent_mappings_merge_into_one_range() {
        let maps = parse_smaps(SMAPS);
        let merged = merge_ranges(maps.iter().map(|m| (m.start, m.end - m.start)).collect());
        assert_eq!(merged[1], (0x7f0000000000, 0x10001000), "the 256 MiB mapping and the page after it");
        assert_eq!(merged.len(), 4);
    }

    #[test]
    fn merge_handles_overlap_order_and_empty() {
        assert_eq!(
            merge_ranges(vec![(100, 10), (0, 50), (40, 20), (60, 0), (110, 5)]),
            vec![(0, 60), (100, 15)]
        );
        assert_eq!(merge_ranges(vec![(0, 10), (2, 3)]), vec![(0, 10)]);
        assert!(merge_ranges(vec![]).is_empty());
    }

    #[test]
    fn split_and_consume() {
        assert_eq!(split_ranges(&[(0, 10), (100, 4)], 4), vec![(0, 4), (4, 4), (8, 2), (100, 4)]);
        let mut r = vec![(0, 10), (100, 10), (200, 10)];
        consume_front(&mut r, 15);
        assert_eq!(r, vec![(105, 5), (200, 10)]);
        consume_front(&mut r, 5);
        assert_eq!(r, vec![(200, 10)]);
    }

    #[test]
    fn meminfo_values() {
        let text = "MemTotal:       24684092 kB\nSwapTotal:             0 kB\nSwapFree:         524284 kB\n";
        assert_eq!(meminfo_bytes(text, "SwapFree"), Some(524284 * 1024));
        assert_eq!(meminfo_bytes(text, "SwapTotal"), Some(0));
        assert_eq!(meminfo_bytes(text, "Swap"), None);
    }

    /// Records every driver and memory call in order.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        swap: bool,
        fail_page_out: bool,
    }

    impl Recorder {
        fn log(&self, call: impl Into<String>) {
            self.calls.lock().unwrap().push(call.into());
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl CgroupDriver for Recorder {
        fn create(&self, _: &str, _: &str) -> Result<InstanceCgroup, CgroupDriverError> {
            unimplemented!("not used by hibernate")
        }
        fn add_process(&self, _: &InstanceCgroup, _: u32) -> Result<(), CgroupDriverError> {
            unimplemented!("not used by hibernate")
        }
        fn pids(&self, _: &InstanceCgroup) -> Result<Vec<u32>, CgroupDriverError> {
            self.log("pids");
            Ok(vec![42])
        }
        fn set_frozen(&self, _: &InstanceCgroup, frozen: bool) -> Result<(), CgroupDriverError> {
            self.log(if frozen { "freeze" } else { "thaw" });
            Ok(())
        }
        fn set_cpu(&self, _: &InstanceCgroup, limit: &CpuLimit) -> Result<(), CgroupDriverError> {
            self.log(format!("set_cpu {:?} {:?}", limit.cpus, limit.quota));
            Ok(())
        }
        fn cpu(&self, _: &InstanceCgroup) -> Result<CpuLimit, CgroupDriverError> {
            Ok(CpuLimit::unlimited())
        }
        fn reclaim_memory(&self, _: &InstanceCgroup) -> Result<(), CgroupDriverError> {
            self.log("reclaim");
            Ok(())
        }
        fn memory_usage(&self, _: &InstanceCgroup) -> Result<u64, CgroupDriverError> {
            Ok(1 << 30)
        }
        fn remove(&self, _: &InstanceCgroup) -> Result<(), CgroupDriverError> {
            unimplemented!("not used by hibernate")
        }
    }

    impl MemoryOps for Recorder {
        fn swap_available(&self) -> bool {
            self.swap
        }
        fn record_working_set(&self, pids: &[u32]) -> Result<WorkingSet, StandbyError> {
            self.log("record");
            Ok(WorkingSet {
                processes: pids
                    .iter()
                    .map(|&pid| ProcessWorkingSet {
                        pid,
                        ranges: vec![(0x1000, 0x2000)],
                        resident_bytes: 0x2000,
                    })
                    .collect(),
            })
        }
        fn page_out(&self, ws: &WorkingSet) -> Result<PageOutReport, StandbyError> {
            self.log("page_out");
            if self.fail_page_out {
                return Err(StandbyError::Madvise {
                    pid: 42,
                    advice: "MADV_PAGEOUT",
                    start: 0x1000,
                    len: 0x2000,
                    source: io::Error::from_raw_os_error(libc::EPERM),
                });
            }
            Ok(PageOutReport { advised_bytes: ws.range_bytes(), ..PageOutReport::default() })
        }
        fn prefetch(&self, ws: &WorkingSet) -> Result<PrefetchReport, StandbyError> {
            self.log("prefetch");
            Ok(PrefetchReport { advised_bytes: ws.range_bytes(), ..PrefetchReport::default() })
        }
    }

    fn cg() -> InstanceCgroup {
        InstanceCgroup {
            service: "echo".into(),
            instance: "0".into(),
            v2_rel: "/vigil/echo/0".into(),
            v2_dir: "/sys/fs/cgroup/vigil/echo/0".into(),
            memory_v1_rel: None,
            memory_v1_dir: None,
            cpu_v1_rel: None,
            cpu_v1_dir: None,
            cpuset_v1_dir: None,
        }
    }

    fn policy() -> StandbyPolicy {
        StandbyPolicy { pool_cpus: "3".into(), quota: 0.05 }
    }

    #[test]
    fn hibernate_with_swap_freezes_pages_out_reclaims_then_thaws_into_the_pool() {
        let fake = Recorder { swap: true, ..Recorder::default() };
        let report = hibernate_with(&fake, &fake, &cg(), &policy()).unwrap();
        assert_eq!(
            fake.calls(),
            ["freeze", "pids", "record", "page_out", "reclaim", "set_cpu Some(\"3\") Some(0.05)", "thaw"]
        );
        assert!(!report.memory_kept_resident);
        assert_eq!(report.working_set.range_bytes(), 0x2000);

        let fake_wake = Recorder::default();
        let woke =
            wake_with(&fake_wake, &fake_wake, &cg(), &report.working_set, &CpuLimit::unlimited()).unwrap();
        assert_eq!(fake_wake.calls(), ["thaw", "set_cpu None None", "prefetch"]);
        assert_eq!(woke.prefetch.map(|p| p.advised_bytes), Some(0x2000));
    }

    #[test]
    fn hibernate_without_swap_only_limits_cpu_and_says_memory_stays() {
        let fake = Recorder { swap: false, ..Recorder::default() };
        let report = hibernate_with(&fake, &fake, &cg(), &policy()).unwrap();
        assert_eq!(fake.calls(), ["set_cpu Some(\"3\") Some(0.05)"], "no freeze, no pageout, no reclaim");
        assert!(report.memory_kept_resident);
        assert!(report.working_set.is_empty());
        assert!(report.page_out.is_none());
        assert!(report.message.contains("no swap") && report.message.contains("memory stays resident"));

        // Waking it only restores CPU: there is nothing to prefetch.
        let fake_wake = Recorder::default();
        let woke =
            wake_with(&fake_wake, &fake_wake, &cg(), &report.working_set, &CpuLimit::unlimited()).unwrap();
        assert_eq!(fake_wake.calls(), ["thaw", "set_cpu None None"]);
        assert!(woke.prefetch.is_none());
    }

    #[test]
    fn a_failed_hibernate_thaws_before_reporting() {
        let fake = Recorder { swap: true, fail_page_out: true, ..Recorder::default() };
        let err = hibernate_with(&fake, &fake, &cg(), &policy()).unwrap_err();
        assert!(err.to_string().contains("pid 42"), "{err}");
        assert_eq!(fake.calls(), ["freeze", "pids", "record", "page_out", "thaw"]);
    }

    #[test]
    fn an_invalid_policy_changes_nothing() {
        let fake = Recorder { swap: true, ..Recorder::default() };
        let bad = StandbyPolicy { pool_cpus: "x".into(), quota: 0.05 };
        assert!(hibernate_with(&fake, &fake, &cg(), &bad).is_err());
        assert!(fake.calls().is_empty());
    }
}
