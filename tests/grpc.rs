//! The gRPC API end to end: the real `vigil up`, with a token and two managed services (`echo`, started
//! at once, and `lazy`, started on demand), driven by a client in another language (`grpc_client.py`,
//! PyPI `grpcio` with stubs generated from `proto/` by `grpcio-tools`): every operation, the decisions
//! watched while it acts, health, reflection, and the status codes of bad requests.
//!
//! Needs root (the healer creates cgroups), python3 with grpcio, grpcio-tools and grpcio-reflection
//! (scripts/setup installs them). The binary is stopped with SIGTERM whatever happens, so it stops its
//! instances and removes its cgroups.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

const TOKEN: &str = "grpc-test-token";

/// The first of `n` consecutive loopback ports free now, below the ephemeral range (where no client
/// connection takes one meanwhile); the start depends on the process, as tests run in parallel.
fn free_ports(n: u16) -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let blocks = (low.saturating_sub(10_000) / n).max(1);
    let first = (std::process::id() % u32::from(blocks)) as u16;
    (0..blocks)
        .map(|i| 10_000 + ((first + i) % blocks) * n)
        .find(|&base| (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .unwrap_or_else(|| panic!("no {n} consecutive free ports below {low}"))
}

/// A running `vigil up`, stopped with SIGTERM (then SIGKILL after 30 s) when dropped, even when an
/// assertion failed; its data directory is removed then.
struct Vigil {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
    /// The cgroup parent of its instances, removed once it has stopped.
    parent: String,
}

/// Where the v2 hierarchy is mounted: beside the v1 controllers on a hybrid host, else at the top.
fn v2_root() -> &'static Path {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() { hybrid } else { Path::new("/sys/fs/cgroup") }
}

impl Vigil {
    fn start(config: &str, dir: &Path, parent: &str) -> Vigil {
        let file = dir.join("vigil.yaml");
        std::fs::write(&file, config).expect("write the config");
        let log = dir.join("vigil.log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["up", "--config"])
            .arg(&file)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start vigil");
        Vigil { child, data_dir: dir.to_path_buf(), log, parent: parent.to_string() }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it the way an operator does, and waits for it; its exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pid = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw)?;
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().ok();
        None
    }
}

impl Drop for Vigil {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        // The healer removes its instances' cgroups; the parent they were made in is the test's own.
        let roots = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuset"];
        for root in roots.iter().map(Path::new).chain([v2_root()]) {
            let _ = std::fs::remove_dir(root.join(self.parent.trim_start_matches('/')));
        }
    }
}

/// `GET path` with the token; the status and body, or `None` while nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Waits for `condition`, checking every 100 ms; panics with the log after `timeout`.
fn wait_for(vigil: &mut Vigil, what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        if let Ok(Some(status)) = vigil.child.try_wait() {
            panic!("vigil exited ({status}) while waiting for {what}:\n{}", vigil.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}:\n{}", vigil.log());
}

#[test]
fn a_python_grpc_client_calls_every_operation_and_watches_the_decisions() {
    let tag = format!("grpc-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("vigil-test-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    let parent = format!("/vigil-test-{tag}");
    let base = free_ports(6);
    let (http, grpc, broker, trigger, echo, lazy) = (base, base + 1, base + 2, base + 3, base + 4, base + 5);
    let server = r#"["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]"#;
    let config = format!(
        "data_dir: {data}\nrules: []\nhttp: {{ listen: 127.0.0.1:{http}, token: {TOKEN} }}\n\
         grpc: {{ listen: 127.0.0.1:{grpc} }}\n\
         collector:\n  watch: {{ include: [{parent}], managed_root: {parent} }}\n\
         healer: {{ cgroup_parent: {parent}, stop_grace: 2s, max_actions_per_minute: 200 }}\n\
         broker: {{ listen: 127.0.0.1:{broker}, http: {{ listen: 127.0.0.1:{trigger} }} }}\n\
         services:\n\
         \x20 - {{ name: echo, command: {server}, port: {echo}, readiness: {{ http: / }} }}\n\
         \x20 - {{ name: lazy, command: {server}, port: {lazy}, readiness: {{ http: / }}, start: on_demand }}\n",
        data = dir.join("data").display(),
    );
    let mut vigil = Vigil::start(&config, &dir, &parent);
    let api = SocketAddr::from(([127, 0, 0, 1], http));
    wait_for(&mut vigil, "/readyz", Duration::from_secs(30), || {
        get(api, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    wait_for(&mut vigil, "echo-0 active", Duration::from_secs(30), || {
        get(api, "/api/v1/instances/echo-0").is_some_and(|(status, body)| {
            status == 200
                && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["state"] == "active")
        })
    });

    // An incoming alert over REST, for the client's ListAlerts.
    let alert = r#"{"version":"4","groupKey":"{}:{alertname=\"EchoSlow\"}","status":"firing","receiver":"vigil","groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am","alerts":[{"status":"firing","labels":{"alertname":"EchoSlow","instance_id":"echo-0","service":"echo","severity":"critical"},"annotations":{"summary":"echo is slow"},"startsAt":"2026-12-02T05:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prom","fingerprint":"f00d"}]}"#;
    let rest = vigil_healer::client::Client::new(api, Some(TOKEN.to_string()));
    let ingested = rest.call_with("POST", "/api/v1/alerts", alert).expect("POST /api/v1/alerts");
    assert_eq!(ingested["new"], 1, "{ingested}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let client = Command::new("python3")
        .arg(root.join("tests/grpc_client.py"))
        .arg(format!("127.0.0.1:{grpc}"))
        .arg(TOKEN)
        .arg(root.join("proto"))
        .output()
        .expect("run python3 tests/grpc_client.py");
    let out = String::from_utf8_lossy(&client.stdout);
    let err = String::from_utf8_lossy(&client.stderr);
    assert!(
        client.status.success(),
        "the Python gRPC client failed ({}):\n{out}\n{err}\n--- vigil's log ---\n{}",
        client.status,
        vigil.log()
    );
    print!("{out}");

    // A clean stop: the watch streams end, both servers drain, the instances stop and their cgroups go.
    let status = vigil.stop();
    assert!(status.is_some_and(|s| s.success()), "vigil did not stop cleanly ({status:?}):\n{}", vigil.log());
    let instance = v2_root().join(parent.trim_start_matches('/')).join("echo/echo-0");
    assert!(!instance.exists(), "{} was left behind", instance.display());
}
