//! End-to-end checks of the probes against the kernel's own counters. Each test makes its own v2 cgroup
//! and a v1 memory cgroup nested under this process's own (hybrid hosts), runs a workload with a known
//! effect inside them, and compares what the collector reports with what the kernel reports. Needs root
//! (CI is root); everything created is removed by `Drop`, also when an assertion fails.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_collector::cgroupfs::Layout;
use vigil_collector::config::CollectorConfig;
use vigil_collector::discovery::WatchConfig;
use vigil_collector::{Collector, InstanceSnapshot, Snapshot};

/// A v2 cgroup (and, on hybrid hosts, a v1 memory cgroup) owned by one test.
struct TestCgroup {
    rel: String,
    v2: PathBuf,
    memory: Option<PathBuf>,
    children: Vec<Child>,
}

fn own_v1_memory_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _ = parts.next();
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
    })
}

impl TestCgroup {
    fn new(tag: &str) -> TestCgroup {
        assert!(
            std::fs::read_to_string("/proc/self/status").unwrap().lines().any(|l| l.starts_with("Uid:\t0\t")),
            "these tests need root (CI runs them as root)"
        );
        let layout = Layout::detect().expect("cgroup layout");
        let name = format!("vigil-test-{tag}-{}", std::process::id());
        let rel = format!("/{name}");
        let v2 = layout.v2_dir(&rel);
        let _ = std::fs::remove_dir(&v2);
        std::fs::create_dir(&v2).expect("create v2 cgroup");
        let memory = layout.v1.as_ref().and_then(|v1| v1.memory.clone()).map(|root| {
            let own = own_v1_memory_cgroup().unwrap_or_else(|| "/".into());
            let dir = root.join(own.trim_start_matches('/')).join(&name);
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir).expect("create v1 memory cgroup");
            dir
        });
        TestCgroup { rel, v2, memory, children: Vec::new() }
    }

    /// The instance id the collector gives this cgroup.
    fn instance_id(&self) -> String {
        format!("cg:{}", self.rel)
    }

    fn set_memory_limit(&self, bytes: u64) {
        match &self.memory {
            Some(m) => std::fs::write(m.join("memory.limit_in_bytes"), bytes.to_string()).unwrap(),
            None => std::fs::write(self.v2.join("memory.max"), bytes.to_string()).unwrap(),
        }
    }

    fn memory_stat(&self, key: &str) -> u64 {
        let dir = self.memory.as_ref().unwrap_or(&self.v2);
        let text = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("memory.stat has no {key}"))
    }

    /// Starts `python3 -c script` inside the cgroups: a shell joins them, then execs, so the workload's every
    /// fault and cycle is charged here.
    fn spawn_python(&mut self, script: &str, cpu: Option<u32>) -> Workload {
        let mut join = format!("echo $$ > {}/cgroup.procs", self.v2.display());
        if let Some(m) = &self.memory {
            join.push_str(&format!(" && echo $$ > {}/cgroup.procs", m.display()));
        }
        let pin = cpu.map(|c| format!("taskset -c {c} ")).unwrap_or_default();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{join} && exec {pin}python3 -u -c \"$0\"",))
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn workload");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let pid = child.id();
        self.children.push(child);
        Workload { pid, stdin, stdout }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for dir in [Some(self.v2.clone()), self.memory.clone()].into_iter().flatten() {
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

struct Workload {
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    /// The next line the workload prints.
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read workload output");
        assert!(!s.is_empty(), "workload exited early");
        s.trim().to_string()
    }

    fn proceed(&mut self) {
        if let Some(i) = self.stdin.as_mut() {
            i.write_all(b"go\n").unwrap();
            i.flush().unwrap();
        }
    }

    /// Fields of /proc/PID/stat after the command name.
    fn stat_field(&self, index_from_state: usize) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let after = &text[text.rfind(')').unwrap() + 2..];
        after.split(' ').nth(index_from_state).unwrap().parse().unwrap()
    }

    fn minflt(&self) -> u64 {
        self.stat_field(7)
    }

    fn majflt(&self) -> u64 {
        self.stat_field(9)
    }
}

fn start_collector(cg: &TestCgroup) -> Collector {
    let mut config = CollectorConfig::default();
    config.interval.value = vigil_collector::config::HumanDuration(Duration::from_millis(250));
    config.watch = WatchConfig { include: vec![cg.rel.clone()], ..WatchConfig::default() };
    Collector::start(&config).expect("collector starts (root, probes load)")
}

/// Waits for a snapshot taken after `since` that contains the instance, and returns both.
fn instance_after(c: &Collector, id: &str, since: Instant) -> (Arc<Snapshot>, InstanceSnapshot) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let rx = c.snapshots();
    // Two full ticks after `since`, so the reading covers everything that happened before it.
    let start_tick = rx.borrow().tick;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let s = rx.borrow().clone();
        if s.tick >= start_tick + 2 && Instant::now() > since {
            if let Some(i) = s.instance(id) {
                let i = i.clone();
                return (s, i);
            }
        }
    }
    panic!(
        "instance {id} never appeared; last snapshot: {:?}",
        rx.borrow().instances.iter().map(|i| &i.instance_id).collect::<Vec<_>>()
    );
}

#[test]
fn minor_faults_match_proc_stat() {
    let mut cg = TestCgroup::new("minor");
    let collector = start_collector(&cg);
    const PAGES: usize = 50_000; // ~200 MiB
    let mut w = cg.spawn_python(
        &format!(
            "import mmap,sys\nm=mmap.mmap(-1,{PAGES}*4096)\nfor i in range(0,{PAGES}*4096,4096): m[i]=1\nprint('ready')\nsys.stdin.readline()"
        ),
        None,
    );
    assert_eq!(w.line(), "ready");
    let (_, inst) = instance_after(&collector, &cg.instance_id(), Instant::now());
    let minflt = w.minflt();
    let ours = inst.counters.minor_faults;
    assert!(minflt >= PAGES as u64, "workload touched {PAGES} pages but minflt is {minflt}");
    let diff = ours.abs_diff(minflt) as f64 / minflt as f64;
    assert!(diff <= 0.01, "minor faults {ours} vs /proc minflt {minflt}: {:.3}% apart", diff * 100.0);
    w.proceed();
}

#[test]
fn major_faults_match_memcg_pgmajfault() {
    let mut cg = TestCgroup::new("major");
    let file = std::env::temp_dir().join(format!("vigil-test-major-{}", std::process::id()));
    std::fs::write(&file, vec![7u8; 64 << 20]).unwrap();
    let _cleanup = scopeguard(file.clone());
    let collector = start_collector(&cg);
    // Drop the file from the page cache, then touch every page through a mapping: each miss is a major fault.
    let mut w = cg.spawn_python(
        &format!(
            "import mmap,os,sys\nf=open('{}','rb')\nos.posix_fadvise(f.fileno(),0,0,os.POSIX_FADV_DONTNEED)\n\
             m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nm.madvise(mmap.MADV_RANDOM)\ns=0\n\
             for i in range(0,len(m),4096): s+=m[i]\nprint('ready')\nsys.stdin.readline()",
            file.display()
        ),
        None,
    );
    assert_eq!(w.line(), "ready");
    let (_, inst) = instance_after(&collector, &cg.instance_id(), Instant::now());
    let memcg = cg.memory_stat("pgmajfault");
    assert!(memcg >= 1000, "the workload should take thousands of major faults, memcg says {memcg}");
    assert_eq!(inst.counters.memcg_major_faults, memcg, "memcg tracepoint vs memory.stat pgmajfault");
    assert_eq!(inst.counters.major_faults, w.majflt(), "perf major faults vs /proc majflt");
    assert_eq!(inst.counters.major_faults, memcg, "perf major faults vs memory.stat pgmajfault");
    w.proceed();
}

struct FileGuard(PathBuf);
fn scopeguard(p: PathBuf) -> FileGuard {
    FileGuard(p)
}
impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn cpu_seconds_of_a_pinned_busy_loop() {
    let mut cg = TestCgroup::new("cpu");
    let collector = start_collector(&cg);
    let secs = 4.0;
    let mut w = cg.spawn_python(
        &format!("import time,sys\nend=time.time()+{secs}\nwhile time.time()<end: pass\nprint('done')\nsys.stdin.readline()"),
        Some(1),
    );
    assert_eq!(w.line(), "done");
    let (_, inst) = instance_after(&collector, &cg.instance_id(), Instant::now());
    let cpu = inst.counters.cpu_ns as f64 / 1e9;
    assert!((cpu - secs).abs() <= secs * 0.02, "busy loop of {secs} s measured {cpu:.3} s of CPU");
    w.proceed();
}

fn runq_delay_of(loops: usize, tag: &str) -> f64 {
    let mut cg = TestCgroup::new(tag);
    let collector = start_collector(&cg);
    let script = "import time,sys\nend=time.time()+2\nwhile time.time()<end: pass\nprint('done')\nsys.stdin.readline()";
    let mut ws: Vec<Workload> = (0..loops).map(|_| cg.spawn_python(script, Some(1))).collect();
    for w in &mut ws {
        assert_eq!(w.line(), "done");
    }
    let (_, inst) = instance_after(&collector, &cg.instance_id(), Instant::now());
    for w in &mut ws {
        w.proceed();
    }
    inst.counters.runq_delay_ns as f64 / 1e9
}

#[test]
fn runqueue_delay_when_sharing_a_cpu() {
    let alone = runq_delay_of(1, "rq1");
    let shared = runq_delay_of(2, "rq2");
    // Two loops on one CPU for 2 s each wait about half the time: ~1 s of delay each.
    assert!(shared >= 1.0, "two busy loops sharing a CPU waited only {shared:.3} s in total");
    assert!(alone <= 0.1, "a busy loop alone on its CPU waited {alone:.3} s");
}

#[test]
fn cgroups_appear_and_vanish_within_a_tick() {
    let anchor = TestCgroup::new("disc");
    let collector = start_collector(&anchor);
    let rx = collector.snapshots();
    let wait_tick = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.borrow().tick < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        rx.borrow().clone()
    };
    let t0 = wait_tick(1).tick;
    let child_rel = format!("{}/late", anchor.rel);
    let child = anchor.v2.join("late");
    std::fs::create_dir(&child).unwrap();
    let created_at = rx.borrow().tick;
    // The first tick that starts after the mkdir must have it.
    let s = wait_tick(created_at + 2);
    assert!(
        s.by_cgroup(&child_rel).is_some(),
        "created at tick {created_at} (start {t0}), missing at {}",
        s.tick
    );
    std::fs::remove_dir(&child).unwrap();
    let removed_at = rx.borrow().tick;
    let s = wait_tick(removed_at + 2);
    assert!(s.by_cgroup(&child_rel).is_none(), "removed at tick {removed_at}, still there at {}", s.tick);
}

/// A swapfile that exists for one test; `Drop` turns it off and removes it.
struct Swapfile(PathBuf);

impl Swapfile {
    fn new(mib: u64) -> Swapfile {
        let path = PathBuf::from(format!("/var/tmp/vigil-test-swap-{}", std::process::id()));
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run swap setup command");
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let _ = Command::new("swapoff").arg(&path).output();
        run(Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", &format!("count={mib}")])
            .arg(format!("of={}", path.display())));
        run(Command::new("chmod").arg("600").arg(&path));
        let swap = Swapfile(path);
        run(Command::new("mkswap").arg(&swap.0));
        run(Command::new("swapon").arg(&swap.0));
        swap
    }
}

impl Drop for Swapfile {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).output();
        let _ = std::fs::remove_file(&self.0);
    }
}

fn vmstat(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("/proc/vmstat has no {key}"))
}

#[test]
fn swap_traffic_matches_the_kernel() {
    let _swap = Swapfile::new(512);
    let mut cg = TestCgroup::new("swap");
    cg.set_memory_limit(64 << 20);
    let collector = start_collector(&cg);
    let (in0, out0) = (vmstat("pswpin"), vmstat("pswpout"));
    // 160 MiB through a 64 MiB limit: most of it goes to swap, and reading it back brings it in again.
    let mut w = cg.spawn_python(
        "import sys\nn=160*1024*1024\nb=bytearray(n)\nfor i in range(0,n,4096): b[i]=1\n\
         s=0\nfor i in range(0,n,4096): s+=b[i]\nprint('ready')\nsys.stdin.readline()",
        None,
    );
    assert_eq!(w.line(), "ready");
    let (_, inst) = instance_after(&collector, &cg.instance_id(), Instant::now());
    let (swapped_in, swapped_out) = (vmstat("pswpin") - in0, vmstat("pswpout") - out0);
    // Only this test's cgroup has a limit and this is the host's only swap, so the host-wide counters are
    // this cgroup's counters.
    assert!(swapped_out >= 20_000, "expected ≥ 80 MiB swapped out, the kernel counted {swapped_out} pages");
    assert!(swapped_in > 0, "expected swap-ins, the kernel counted none");
    assert_eq!(inst.counters.swap_out_pages, swapped_out, "swap-out pages vs /proc/vmstat pswpout");
    assert_eq!(inst.counters.swap_in_pages, swapped_in, "swap-in pages vs /proc/vmstat pswpin");
    w.proceed();
}
