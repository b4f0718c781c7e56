//! What the end-to-end tests of the `vigil` binary share: free ports, child processes that are killed
//! when a test ends (also when an assertion fails), `vigil up` on a config of the test's own, and waiting
//! for a condition instead of sleeping.
#![allow(dead_code)] // each test file uses its own part of it

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_healer::client::{Client, ClientError};

/// The first of `n` consecutive loopback ports free now, below the kernel's ephemeral range (no client
/// connection takes one while a service restarts), starting at a block that depends on the process.
pub fn free_ports(n: u16) -> u16 {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let blocks = (ephemeral_low.saturating_sub(10_000) / n.max(1)).max(1);
    let first = (std::process::id() % u32::from(blocks)) as u16;
    (0..blocks)
        .map(|i| 10_000 + ((first + i) % blocks) * n)
        .find(|&base| (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .unwrap_or_else(|| panic!("no {n} consecutive free ports below {ephemeral_low}"))
}

/// Polls `check` every 50 ms until it gives a value, or panics after `timeout` saying what it waited for.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 15 s) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` with stdout and stderr in `<dir>/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, program: &str, args: &[String]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc { name: name.to_string(), child: Some(child), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it is still running; panics with its log when it exited.
    pub fn assert_running(&mut self) {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
            panic!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for it to exit (SIGKILL after 15 s); returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        self.stop_status().is_some()
    }

    /// SIGKILL: the process gets no chance to clean up (a crash, a power cut for its state).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// [`Proc::stop`], with the exit status when it exited by itself.
    pub fn stop_status(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let pid = rustix::process::Pid::from_raw(child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Debian's Alertmanager on `127.0.0.1:port` with `config` (YAML), its state in `scratch`, clustering off.
pub fn alertmanager(scratch: &Scratch, port: u16, config: &str) -> Proc {
    let file = scratch.write("alertmanager.yaml", config);
    Proc::spawn(
        "alertmanager",
        &scratch.0,
        "/usr/bin/prometheus-alertmanager",
        &[
            format!("--config.file={}", file.display()),
            format!("--storage.path={}", scratch.path("am-data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".to_string(),
        ],
    )
}

/// The signed-webhook receiver (`healer/tests/notify_receiver.py`, verifying with PyPI `standardwebhooks`)
/// on `127.0.0.1:port`, appending each verified message as a JSON line to `out`.
pub fn webhook_receiver(scratch: &Scratch, port: u16, secret: &str, out: &Path) -> Proc {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("healer/tests/notify_receiver.py");
    Proc::spawn(
        "receiver",
        &scratch.0,
        "python3",
        &[
            script.display().to_string(),
            "--port".into(),
            port.to_string(),
            "--secret".into(),
            secret.into(),
            "--out".into(),
            out.display().to_string(),
        ],
    )
}

/// The messages a [`webhook_receiver`] wrote to `out` so far.
pub fn received(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Where the v2 hierarchy is mounted: beside the v1 controllers on a hybrid host, else at the top.
pub fn v2_root() -> &'static Path {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() { hybrid } else { Path::new("/sys/fs/cgroup") }
}

/// The cgroup parent of a test's instances (`healer.cgroup_parent`, `collector.watch.managed_root`),
/// named after the test and the process. Vigil removes its instances' cgroups when it stops; the parent
/// is the test's own and is removed on drop (declare it before the `Vigil`, so that it drops after).
pub struct CgroupParent(pub String);

impl CgroupParent {
    pub fn new(tag: &str) -> CgroupParent {
        CgroupParent(format!("/vigil-test-{tag}-{}", std::process::id()))
    }
}

impl std::fmt::Display for CgroupParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let v1 = ["memory", "cpu", "cpuset", "freezer"].map(|c| Path::new("/sys/fs/cgroup").join(c));
        for root in v1.iter().map(PathBuf::as_path).chain([v2_root()]) {
            let _ = std::fs::remove_dir(root.join(self.0.trim_start_matches('/')));
        }
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vigil-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vigil up` on `config`, and a client of its API.
pub struct Vigil {
    pub proc: Proc,
    pub api: SocketAddr,
    pub client: Client,
}

impl Vigil {
    /// Starts the binary and waits until its API answers.
    pub fn up(dir: &Path, name: &str, config: &Path, api: SocketAddr, token: Option<&str>) -> Vigil {
        let args = vec!["up".to_string(), "--config".to_string(), config.display().to_string()];
        let proc = Proc::spawn(name, dir, env!("CARGO_BIN_EXE_vigil"), &args);
        let client = Client::new(api, token.map(str::to_string));
        let mut v = Vigil { proc, api, client };
        wait_for("the API to answer", Duration::from_secs(60), || {
            v.proc.assert_running();
            v.get("/api/v1/rules").ok()
        });
        v
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.client.call("GET", path)
    }

    /// The instance's pids once it is `active`.
    pub fn active_pids(&mut self, id: &str, timeout: Duration) -> Vec<u64> {
        let what = format!("{id} to be active");
        wait_for(&what, timeout, || {
            self.proc.assert_running();
            let i = self.get(&format!("/api/v1/instances/{id}")).ok()?;
            let pids: Vec<u64> = i["pids"].as_array()?.iter().filter_map(Value::as_u64).collect();
            (i["state"] == "active" && !pids.is_empty()).then_some(pids)
        })
    }

    /// The newest decision matching `pred`.
    pub fn decision(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let d = self.get("/api/v1/decisions?limit=200").ok()?;
        d["decisions"].as_array()?.iter().find(|d| pred(d)).cloned()
    }
}
