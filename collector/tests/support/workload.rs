//! Test cgroups and workloads: a v2 cgroup (plus a v1 memory cgroup nested under this process's own on
//! hybrid hosts) with Python workloads started inside it. `Drop` kills the workloads and removes the cgroups,
//! also when an assertion fails.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use vigil_collector::cgroupfs::Layout;

/// A v2 cgroup (and, on hybrid hosts, a v1 memory cgroup) owned by one test.
pub struct TestCgroup {
    pub rel: String,
    pub v2: PathBuf,
    pub memory: Option<PathBuf>,
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
    pub fn new(tag: &str) -> TestCgroup {
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
    pub fn instance_id(&self) -> String {
        format!("cg:{}", self.rel)
    }

    pub fn set_memory_limit(&self, bytes: u64) {
        match &self.memory {
            Some(m) => std::fs::write(m.join("memory.limit_in_bytes"), bytes.to_string()).unwrap(),
            None => std::fs::write(self.v2.join("memory.max"), bytes.to_string()).unwrap(),
        }
    }

    pub fn memory_stat(&self, key: &str) -> u64 {
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
    pub fn spawn_python(&mut self, script: &str, cpu: Option<u32>) -> Workload {
        let mut join = format!("echo $$ > {}/cgroup.procs", self.v2.display());
        if let Some(m) = &self.memory {
            join.push_str(&format!(" && echo $$ > {}/cgroup.procs", m.display()));
        }
        let pin = cpu.map(|c| format!("taskset -c {c} ")).unwrap_or_default();
        let python = python_executable();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{join} && exec {pin}{python} -u -c \"$0\""))
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

/// The real interpreter, not a version-manager shim: a shim forks helpers inside the cgroup whose faults
/// and CPU would be charged to the workload's cgroup but not to the workload's own /proc counters.
pub fn python_executable() -> String {
    let out =
        Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub struct Workload {
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    /// The next line the workload prints.
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read workload output");
        assert!(!s.is_empty(), "workload exited early");
        s.trim().to_string()
    }

    pub fn proceed(&mut self) {
        if let Some(i) = self.stdin.as_mut() {
            i.write_all(b"go\n").unwrap();
            i.flush().unwrap();
        }
    }

    /// Fields of /proc/PID/stat after the command name.
    pub fn stat_field(&self, index_from_state: usize) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let after = &text[text.rfind(')').unwrap() + 2..];
        after.split(' ').nth(index_from_state).unwrap().parse().unwrap()
    }

    /// Minor faults of the process and of the children it reaped.
    pub fn minflt(&self) -> u64 {
        self.stat_field(7) + self.stat_field(8)
    }

    pub fn majflt(&self) -> u64 {
        self.stat_field(9) + self.stat_field(10)
    }
}
