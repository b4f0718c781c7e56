//! The standby against the real kernel: a Python service holding 256 MiB of random data is put into its
//! instance cgroups through the driver, hibernated (memory paged out and given back by the cgroup, CPU
//! moved into the low-power pool) and woken (CPU restored, working set prefetched), and must then still
//! return the right checksum of its data. Needs root (CI is root). Every test creates and removes what it
//! touches — swapfile, cgroups, processes — in `Drop`, also when an assertion fails. The tests take a
//! lock so they never overlap: the swap test turns host swap on while it runs.

#[path = "../../collector/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use support::swap::Swapfile;

use vigil_cgroup::fs::Layout;
use vigil_healer::cgroup::{
    CgroupDriver, CgroupDriverError, CpuLimit, DriverConfig, InstanceCgroup, V2Driver, driver_for,
};
use vigil_healer::standby::{self, StandbyPolicy};

const GIB: f64 = (1u64 << 30) as f64;

/// Serializes the tests of this file even without `--test-threads=1`: the swap test turns host swap on,
/// which would change what the no-swap test sees.
static HOST: Mutex<()> = Mutex::new(());

fn host_lock() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock has already cleaned up in Drop; the next one may go on.
    HOST.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn assert_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t0\t")),
        "these tests need root (CI runs them as root)"
    );
}

/// One instance: its cgroups (through the driver) and the service process in them. `Drop` kills the
/// process, removes the instance cgroups, and the `vigil` parents if this test created them.
struct Instance {
    driver: Box<dyn CgroupDriver>,
    cg: InstanceCgroup,
    child: Option<Child>,
    created_parents: Vec<PathBuf>,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Instance {
    fn new(tag: &str) -> Instance {
        assert_root();
        let layout = Layout::detect().expect("cgroup layout");
        let driver = driver_for(&layout, &DriverConfig::default()).expect("cgroup driver");
        Instance::with_driver(driver, tag)
    }

    fn with_driver(driver: Box<dyn CgroupDriver>, tag: &str) -> Instance {
        let service = format!("vigil-test-{tag}");
        let instance = std::process::id().to_string();
        let cg = driver.create(&service, &instance).expect("create instance cgroups");
        // The `vigil` parent directories are two levels above each instance directory.
        let parents: Vec<PathBuf> =
            [Some(&cg.v2_dir), cg.memory_v1_dir.as_ref(), cg.cpu_v1_dir.as_ref(), cg.cpuset_v1_dir.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|d| d.parent().and_then(|p| p.parent()).map(PathBuf::from))
                .collect();
        let again = driver.create(&service, &instance).expect("create is idempotent");
        assert_eq!(again, cg);
        Instance { driver, cg, child: None, created_parents: parents, pid: 0, stdin: None, stdout: None }
    }

    /// Starts `python3 -u -c script` in the instance: the shell waits until the driver has moved it into
    /// the cgroups, then execs, so everything the service allocates is charged to the instance.
    fn spawn_python(&mut self, script: &str) {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("read _ && exec \"$0\" -u -c \"$1\"")
            .arg(support::workload::python_executable())
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn service");
        self.pid = child.id();
        self.stdin = child.stdin.take();
        self.stdout = child.stdout.take().map(BufReader::new);
        self.child = Some(child);
        self.driver.add_process(&self.cg, self.pid).expect("add the service to its cgroups");
        assert_eq!(self.driver.pids(&self.cg).expect("pids"), vec![self.pid]);
        self.send("go");
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("service stdin");
        stdin.write_all(format!("{line}\n").as_bytes()).expect("write to service");
        stdin.flush().expect("flush service stdin");
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.as_mut().expect("service stdout").read_line(&mut s).expect("read service output");
        assert!(!s.is_empty(), "service exited early");
        s.trim().to_string()
    }

    fn request(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }

    /// A field of /proc/PID/status.
    fn status(&self, key: &str) -> String {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("service is alive");
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("/proc/{}/status has no {key}", self.pid))
    }

    fn rss_bytes(&self) -> u64 {
        let kb = self.status("VmRSS");
        kb.trim_end_matches("kB").trim().parse::<u64>().expect("VmRSS in kB") * 1024
    }

    fn major_faults(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("service is alive");
        let after = &text[text.rfind(')').expect("stat has a command name") + 2..];
        after.split(' ').nth(9).and_then(|f| f.parse().ok()).expect("majflt field")
    }

    fn usage(&self) -> u64 {
        self.driver.memory_usage(&self.cg).expect("memory usage")
    }

    /// The CPUs of the instance's parent: what "unlimited" means for its cpuset.
    fn parent_cpus(&self) -> String {
        let dir = self.cg.cpuset_v1_dir.as_ref().unwrap_or(&self.cg.v2_dir);
        let file = if self.cg.cpuset_v1_dir.is_some() { "cpuset.cpus" } else { "cpuset.cpus.effective" };
        let parent = dir.parent().expect("instance cgroup has a parent");
        std::fs::read_to_string(parent.join(file)).expect("parent cpus").trim().to_string()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Thawed first: a frozen process cannot die.
        let _ = self.driver.set_frozen(&self.cg, false);
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.driver.remove(&self.cg) {
                Ok(()) => break,
                Err(CgroupDriverError::NotEmpty { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    eprintln!("cannot remove test cgroups: {e}");
                    break;
                }
            }
        }
        // The `vigil` parents go too when nothing else (a running Vigil, another test) uses them.
        for dir in &self.created_parents {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// 256 MiB of random bytes in a private anonymous mapping; answers `ping` and `sum` (SHA-256 of the data,
/// which touches every page) on stdin/stdout.
const SERVICE: &str = "\
import hashlib, mmap, os, sys
n = 256 << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, n, 1 << 24):
    m[off:off + (1 << 24)] = os.urandom(1 << 24)
print('ready', hashlib.sha256(m).hexdigest())
while True:
    cmd = sys.stdin.readline().strip()
    if cmd == 'ping':
        print('pong')
    elif cmd == 'sum':
        print(hashlib.sha256(m).hexdigest())
    else:
        break
";

#[test]
fn hibernate_pages_out_and_wake_restores_a_live_service() {
    let _host = host_lock();
    let _swap = Swapfile::new("healer-test", 768);
    let mut inst = Instance::new("standby");
    inst.spawn_python(SERVICE);
    let ready = inst.line();
    let digest = ready.strip_prefix("ready ").expect("service says ready").to_string();
    assert_eq!(inst.request("ping"), "pong");

    let rss_before = inst.rss_bytes();
    let usage_before = inst.usage();
    assert!(rss_before >= 256 << 20, "service should hold ≥ 256 MiB, VmRSS is {rss_before}");

    let policy = StandbyPolicy::default();
    let hib = standby::hibernate(inst.driver.as_ref(), &inst.cg, &policy).expect("hibernate");
    let rss_after = inst.rss_bytes();
    let usage_after = inst.usage();
    let page_out = hib.page_out.clone().expect("paged out, since there is swap");
    let paged_gib = hib.working_set.resident_bytes() as f64 / GIB;
    println!(
        "hibernate: VmRSS {rss_before} → {rss_after} bytes, cgroup {usage_before} → {usage_after} bytes; \
         page-out {:.3} s for {:.3} GiB = {:.2} s/GiB; whole hibernate {:.3} s; {}",
        page_out.seconds,
        paged_gib,
        page_out.seconds / paged_gib,
        hib.seconds,
        hib.message
    );
    assert!(!hib.memory_kept_resident);
    assert!(
        hib.working_set.resident_bytes() >= 256 << 20,
        "working set {:?}",
        hib.working_set.resident_bytes()
    );
    assert!(rss_after * 10 <= rss_before, "VmRSS {rss_before} → {rss_after}: more than 10 % left");
    let rss_drop = rss_before - rss_after;
    let usage_drop = usage_before.saturating_sub(usage_after);
    assert!(
        usage_drop as f64 >= 0.9 * rss_drop as f64,
        "cgroup usage fell {usage_drop} bytes ({usage_before} → {usage_after}), RSS fell {rss_drop}"
    );
    let state = inst.status("State");
    assert!(!state.starts_with('Z') && !state.starts_with('X'), "the service must stay alive: {state}");
    let events = std::fs::read_to_string(inst.cg.v2_dir.join("cgroup.events")).expect("cgroup.events");
    assert!(events.lines().any(|l| l == "frozen 0"), "thawed after hibernate: {events}");
    let pool = CpuLimit { cpus: Some(policy.pool_cpus.clone()), quota: Some(policy.quota) };
    assert_eq!(inst.driver.cpu(&inst.cg).expect("cpu limit"), pool);
    assert_eq!(inst.status("Cpus_allowed_list"), policy.pool_cpus, "the service runs in the pool");
    // Hibernated, not stopped: it still answers, slowly.
    assert_eq!(inst.request("ping"), "pong");

    let faults_before = inst.major_faults();
    let woke = standby::wake(inst.driver.as_ref(), &inst.cg, &hib.working_set).expect("wake");
    let prefetch = woke.prefetch.clone().expect("prefetched");
    // The advice queues the reads; the memory cgroup is charged as each page enters the swap cache, which
    // is when its read is queued, so this wait bounds queuing, not completion (the read after it shows that).
    let wait_start = Instant::now();
    let target = usage_before - usage_drop / 10;
    while inst.usage() < target && wait_start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let landed = prefetch.seconds + wait_start.elapsed().as_secs_f64();
    let prefetch_gib = prefetch.advised_bytes as f64 / GIB;
    println!(
        "wake: prefetch advice {:.3} s over {:.3} GiB with {} threads; cgroup charge back to {} bytes \
         after {:.3} s = {:.2} s/GiB; whole wake call {:.3} s",
        prefetch.seconds,
        prefetch_gib,
        prefetch.threads,
        inst.usage(),
        landed,
        landed / paged_gib,
        woke.seconds
    );
    assert!(prefetch.advised_bytes >= hib.working_set.resident_bytes());
    assert_eq!(inst.driver.cpu(&inst.cg).expect("cpu limit"), CpuLimit::unlimited(), "CPU limits lifted");
    assert_eq!(inst.status("Cpus_allowed_list"), inst.parent_cpus(), "the service may use every CPU again");

    let started = Instant::now();
    assert_eq!(inst.request("sum"), digest, "the service's data survived hibernation");
    let sum_seconds = started.elapsed().as_secs_f64();
    let major = inst.major_faults() - faults_before;
    let pages = (256u64 << 20) / 4096;
    println!("wake: first full read of the data took {sum_seconds:.3} s with {major} major faults");
    assert!(
        major * 10 <= pages,
        "prefetch should leave < 10 % of {pages} pages to major faults, saw {major}"
    );
    let rss_woken = inst.rss_bytes();
    assert!(
        rss_woken as f64 >= 0.9 * rss_before as f64,
        "VmRSS after wake {rss_woken} vs before {rss_before}"
    );
}

#[test]
fn without_swap_hibernate_limits_cpu_and_keeps_memory_resident() {
    let _host = host_lock();
    if standby::swap_available() {
        // Swap configured on this host by someone else: the kernel path with swap is the other test's.
        println!("skipped: the host has swap, so the no-swap path cannot be exercised here");
        return;
    }
    let mut inst = Instance::new("noswap");
    inst.spawn_python(
        "import sys\nb = bytearray(32 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ready')\n\
         while sys.stdin.readline().strip() == 'ping': print('pong')",
    );
    assert_eq!(inst.line(), "ready");
    let rss_before = inst.rss_bytes();
    let policy = StandbyPolicy::default();
    let hib = standby::hibernate(inst.driver.as_ref(), &inst.cg, &policy).expect("hibernate");
    println!("{}", hib.message);
    assert!(hib.memory_kept_resident);
    assert!(hib.message.contains("memory stays resident"), "{}", hib.message);
    assert!(hib.page_out.is_none() && hib.working_set.is_empty());
    assert!(inst.rss_bytes() as f64 >= 0.9 * rss_before as f64, "memory must stay resident");
    let pool = CpuLimit { cpus: Some(policy.pool_cpus.clone()), quota: Some(policy.quota) };
    assert_eq!(inst.driver.cpu(&inst.cg).expect("cpu limit"), pool);
    assert_eq!(inst.request("ping"), "pong");

    let woke = standby::wake(inst.driver.as_ref(), &inst.cg, &hib.working_set).expect("wake");
    assert!(woke.prefetch.is_none());
    assert_eq!(inst.driver.cpu(&inst.cg).expect("cpu limit"), CpuLimit::unlimited());
    assert_eq!(inst.request("ping"), "pong");
}

#[test]
fn driver_freezes_and_refuses_to_remove_a_cgroup_with_processes() {
    let _host = host_lock();
    let mut inst = Instance::new("driver");
    inst.spawn_python(
        "import sys\nprint('ready')\nwhile sys.stdin.readline().strip() == 'ping': print('pong')",
    );
    assert_eq!(inst.line(), "ready");

    inst.driver.set_frozen(&inst.cg, true).expect("freeze");
    let events = std::fs::read_to_string(inst.cg.v2_dir.join("cgroup.events")).expect("cgroup.events");
    assert!(events.lines().any(|l| l == "frozen 1"), "{events}");
    inst.send("ping");
    inst.driver.set_frozen(&inst.cg, false).expect("thaw");
    // Sent while frozen, answered after the thaw.
    assert_eq!(inst.line(), "pong");

    match inst.driver.remove(&inst.cg) {
        Err(CgroupDriverError::NotEmpty { pids, .. }) => assert_eq!(pids, vec![inst.pid]),
        other => panic!("remove with a live process should fail with NotEmpty, got {other:?}"),
    }
    assert!(inst.cg.v2_dir.exists(), "a failed remove leaves the cgroup");
    assert_eq!(inst.request("ping"), "pong", "and kills nothing");
}

/// The v2 driver on whatever v2 tree the host has. On a pure v2 host this is the whole driver; on a hybrid
/// host the v2 tree has no controllers, so only creating, joining, freezing and removing are checked there.
#[test]
fn v2_driver_lifecycle() {
    let _host = host_lock();
    let layout = Layout::detect().expect("cgroup layout");
    let driver = V2Driver::new(&layout, &DriverConfig::default());
    let mut inst = Instance::with_driver(Box::new(driver), "v2driver");
    assert!(inst.cg.memory_v1_dir.is_none() && inst.cg.cpu_v1_dir.is_none());
    assert_eq!(inst.cg.paths().v2.as_deref(), Some(inst.cg.v2_rel.as_str()));
    inst.spawn_python(
        "import sys\nprint('ready')\nwhile sys.stdin.readline().strip() == 'ping': print('pong')",
    );
    assert_eq!(inst.line(), "ready");
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", inst.pid)).expect("service cgroup");
    assert!(own.lines().any(|l| l == format!("0::{}", inst.cg.v2_rel)), "{own}");

    inst.driver.set_frozen(&inst.cg, true).expect("freeze");
    inst.driver.set_frozen(&inst.cg, false).expect("thaw");
    assert_eq!(inst.request("ping"), "pong");

    if !layout.is_hybrid() {
        assert!(inst.usage() > 0, "memory.current of a live service");
        let policy = StandbyPolicy::default();
        let pool = CpuLimit { cpus: Some(policy.pool_cpus.clone()), quota: Some(policy.quota) };
        inst.driver.set_cpu(&inst.cg, &pool).expect("set cpu");
        assert_eq!(inst.driver.cpu(&inst.cg).expect("cpu"), pool);
        assert_eq!(inst.status("Cpus_allowed_list"), policy.pool_cpus);
        inst.driver.set_cpu(&inst.cg, &CpuLimit::unlimited()).expect("restore cpu");
        assert_eq!(inst.driver.cpu(&inst.cg).expect("cpu"), CpuLimit::unlimited());
        inst.driver.reclaim_memory(&inst.cg).expect("memory.reclaim");
        assert_eq!(inst.request("ping"), "pong");
    }
}
