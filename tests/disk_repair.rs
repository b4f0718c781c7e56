//! Hardware faults start repairs, end to end through `vigil up` and the real kernel: a loop disk served by
//! an in-process FUSE filesystem starts answering EIO (collector/tests/support/faultydisk.rs), the kernel
//! prints its own `I/O error, dev loopN` records, Vigil reads them from /dev/kmsg, and the workflow its
//! trigger names runs:
//! - it cordons the disk, drains the instance whose data directory is on it (an ext4 filesystem on the
//!   loop disk; not the other instance), restarts it into its service's next data directory (off the disk),
//!   runs the repair command with the device, waits until the disk has been healthy for a while, and
//!   uncordons;
//! - Vigil SIGKILLed while the drain waits for a request in flight through the broker: the run resumes at
//!   the drain, the instance starts off the cordoned disk, and the run finishes (moving nothing twice) and
//!   notifies a webhook receiver;
//! - with faults on more of the host than the circuit breaker allows, the next run is refused, audited and
//!   counted, and every panel of `dashboards/hardware.json` has data in a real Prometheus.
//!
//! Needs root, /dev/fuse, loop devices and mkfs.ext4 (`scripts/setup`).

#[path = "../collector/tests/support/dashboard.rs"]
#[allow(dead_code)]
mod dashboard;
#[path = "../collector/tests/support/faultydisk.rs"]
#[allow(dead_code)]
mod faultydisk;
#[path = "../collector/tests/support/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;
mod support;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashboard::panel_queries;
use faultydisk::FaultyDisk;
use prometheus::{Prometheus, has_samples};
use serde_json::Value;
use support::{CgroupParent, Scratch, Vigil, free_ports, received, wait_for, webhook_receiver};

const BLOCK: u64 = 4096;
const SIZE: u64 = 16 << 20;
/// A disk with a filesystem on its first half; its second half fails (no filesystem I/O goes there).
const FS_DISK: u64 = 32 << 20;
const FS_SIZE: &str = "16M";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn disk(tag: &str) -> FaultyDisk {
    FaultyDisk::new(tag, SIZE).unwrap_or_else(|e| panic!("this test needs a faulty loop disk: {e}"))
}

fn fs_disk(tag: &str) -> FaultyDisk {
    FaultyDisk::new(tag, FS_DISK).unwrap_or_else(|e| panic!("this test needs a faulty loop disk: {e}"))
}

/// `n` failing O_DIRECT reads of different blocks: one kernel record each (below the 10 per 5 s limit).
fn fail_reads(disk: &FaultyDisk, n: u64) {
    disk.fail(0..SIZE);
    for b in 0..n {
        assert!(disk.read_direct(b * BLOCK, BLOCK as usize).is_err(), "the read of block {b} must fail");
    }
}

/// The disk fails from byte `from` on; failing reads of one block after another there, `at_least` at
/// once and one more every few seconds, until `check` gives a value. The kernel's `I/O error` record is
/// rate limited (10 per 5 s kernel-wide): another test's errors, or another process's, may have used the
/// allowance up, and a read then leaves no record.
fn fail_until<T>(
    disk: &FaultyDisk,
    from: u64,
    at_least: u64,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    disk.fail(from..disk.size());
    let read = |b: u64| {
        let at = from + b * BLOCK;
        assert!(disk.read_direct(at, BLOCK as usize).is_err(), "the read at {at} must fail");
    };
    (0..at_least).for_each(read);
    for b in at_least..at_least + 10 {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if let Some(v) = check() {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        read(b);
    }
    panic!("no {what} after {} failing reads", at_least + 10);
}

/// An ext4 filesystem on the first [`FS_SIZE`] of a disk, mounted at `dir`; unmounted when dropped.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(disk: &FaultyDisk, dir: PathBuf) -> Mounted {
        let sh = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program).args(args).output();
            let out = out.unwrap_or_else(|e| panic!("this test needs {program}: {e}"));
            assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let dev = disk.device().display().to_string();
        sh("mkfs.ext4", &["-q", "-F", &dev, FS_SIZE]);
        std::fs::create_dir_all(&dir).expect("the mount point");
        sh("mount", &["-t", "ext4", &dev, &dir.display().to_string()]);
        Mounted { dir }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let dir = self.dir.display().to_string();
        let ok = std::process::Command::new("umount").arg(&dir).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount").args(["-l", &dir]).status();
        }
    }
}

/// The store: an HTTP server that keeps its data in `{data_dir}` (its working directory, with a file
/// open there), answers every GET with the directory it uses, and holds `/slow` requests for two minutes.
const STORE: &str = r#"
import http.server, os, sys, time
port, data = int(sys.argv[1]), sys.argv[2]
os.chdir(data)
with open("where", "w") as f:
    f.write(data)
journal = open("journal", "a")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if "slow" in self.path:
            time.sleep(120)
        body = data.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// What `GET path` on 127.0.0.1:`port` answers (the body), if it answers 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: store\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")).then(|| body.to_string())
}

/// The restarts of `id` a workflow decided (the audit log's decisions of rule `workflow:NAME`).
fn workflow_restarts(vigil: &Vigil, id: &str) -> usize {
    let d = vigil.get("/api/v1/decisions?limit=500").expect("decisions");
    d["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| {
            d["rule"].as_str().is_some_and(|r| r.starts_with("workflow:"))
                && d["action"] == "restart"
                && d["instance_id"] == id
        })
        .count()
}

fn metric(vigil: &Vigil, prefix: &str) -> Option<String> {
    let text = vigil.client.call("GET", "/metrics").ok()?;
    text.as_str()?.lines().find(|l| l.starts_with(prefix)).map(str::to_string)
}

/// A Python HTTP server on `port`, holding the device node `hold` open if given.
fn server(port: u16, hold: Option<&str>) -> String {
    let open = hold.map(|d| format!("f = open('{d}', 'rb'); ")).unwrap_or_default();
    format!(
        "[python3, -c, \"{open}import http.server as h; h.ThreadingHTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()\"]"
    )
}

/// The store's entry when it keeps its data on the mounted disk first, then in a spare directory.
fn store_with_data_dirs(scratch: &Scratch, mounted: &Mounted) -> String {
    let app = scratch.write("store.py", STORE);
    format!(
        "command: [python3, {app}, \"{{port}}\", \"{{data_dir}}\"]\n    data_dirs: [\"{m}/{{instance_id}}\", \"{spare}/{{instance_id}}\"]\n    route: /store",
        app = app.display(),
        m = mounted.dir.display(),
        spare = scratch.path("spare").display(),
    )
}

/// The config: two services (`store` as `store` says, and `other`, which uses no disk), hardware
/// watching with a short quiet window and without the kernel log's backlog (earlier tests' errors on a
/// loop device of the same number must not start runs), the workflows in `workflows`, and `extra`
/// (top-level keys; the broker is off unless it says otherwise).
fn config(
    scratch: &Scratch,
    parent: &CgroupParent,
    api: u16,
    apps: (u16, u16),
    store: &str,
    workflows: &str,
    extra: &str,
) -> PathBuf {
    let wf = scratch.write("wf.yaml", workflows);
    let broker = if extra.contains("broker:") { "" } else { "broker: { enabled: false }\n" };
    scratch.write(
        "vigil.yaml",
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\" }}\nrules: []\nworkflows: [{wf}]\nhealer: {{ cgroup_parent: {parent}, stop_grace: 2s, workflows: {{ breaker: {{ window: 5m, max_fraction: 0.01, min_devices: 2 }} }} }}\ncollector: {{ watch: {{ managed_root: {parent} }} }}\n{broker}hardware: {{ enabled: true, quiet: 3s, poll_interval: 1s, kmsg_backlog: false }}\nservices:\n  - name: store\n    {store}\n    port: {a}\n    readiness: {{ tcp: true }}\n  - name: other\n    command: {other}\n    port: {b}\n    readiness: {{ tcp: true }}\n{extra}",
            data = scratch.path("data").display(),
            wf = wf.display(),
            other = server(apps.1, None),
            a = apps.0,
            b = apps.1,
        ),
    )
}

fn runs(vigil: &Vigil) -> Vec<Value> {
    vigil.get("/api/v1/workflows").ok().and_then(|w| w["runs"].as_array().cloned()).unwrap_or_default()
}

#[test]
fn kernel_io_errors_start_a_repair_that_moves_the_disks_instance_off_it_and_uncordons_once_healthy() {
    let scratch = Scratch::new("disk-repair");
    let base = free_ports(3);
    let (api, apps) = (base, (base + 1, base + 2));
    let parent = CgroupParent::new("disk-repair");
    let disk = fs_disk("repair");
    let mounted = Mounted::new(&disk, scratch.path("mnt"));
    let device = disk.name();
    let marker = scratch.path("repaired");
    let workflows = format!(
        "workflows:\n  - name: disk-repair\n    trigger: {{ hardware: {{ kind: io_error, device: \"{device}\", at_least: 2, within: 1m }} }}\n    cooldown: 1h\n    steps:\n      - {{ name: cordon, cordon: {{}} }}\n      - {{ name: drain, drain: {{ timeout: 5s }}, after: [cordon] }}\n      - {{ name: move, evacuate: {{}}, after: [drain] }}\n      - {{ name: fix, run: {{ command: [sh, -c, \"echo {{device}} > {m}\"], timeout: 10s }}, after: [move] }}\n      - {{ name: check, wait_for: {{ device_health: healthy, for: 1s }}, after: [fix] }}\n      - {{ name: back, uncordon: {{}}, after: [check] }}\n",
        m = marker.display()
    );
    let store = store_with_data_dirs(&scratch, &mounted);
    let config = config(&scratch, &parent, api, apps, &store, &workflows, "");
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    let first_pid = vigil.active_pids("store-0", Duration::from_secs(60));
    vigil.active_pids("other-0", Duration::from_secs(60));
    let on_disk = format!("{}/store-0", mounted.dir.display());
    let spare = format!("{}/store-0", scratch.path("spare").display());
    assert_eq!(vigil.get("/api/v1/instances/store-0").unwrap()["data_dir"], on_disk.as_str());
    let served = wait_for("the store to serve", Duration::from_secs(30), || http_get(apps.0, "/"));
    assert_eq!(served, on_disk);

    let faulted = now_ms();
    let run = fail_until(&disk, FS_DISK / 2, 2, "run of disk-repair", || {
        vigil.proc.assert_running();
        runs(&vigil).into_iter().find(|r| r["workflow"] == "disk-repair")
    });
    let id = run["id"].as_u64().unwrap();
    let started = run["created_ms"].as_u64().unwrap();
    assert!(started >= faulted, "the run started {} ms before the fault", faulted - started);
    eprintln!("kernel I/O error → run started: {} ms", started - faulted);
    assert_eq!(
        (run["source"].as_str(), run["params"]["device"].as_str()),
        (Some("hardware"), Some(&*device))
    );

    // While the disk fails, the run holds at its health check: cordoned, the disk's instance (its data
    // directory is there) drained, then restarted into its spare data directory, where it serves again.
    let run = wait_for("the fix to run", Duration::from_secs(60), || {
        vigil.proc.assert_running();
        let r = vigil.get(&format!("/api/v1/workflows/runs/{id}")).ok()?;
        (r["steps"][3]["state"] == "succeeded").then_some(r)
    });
    assert_eq!(run["steps"][1]["output"]["held"], serde_json::json!(["store-0"]), "{run:#}");
    let moved = &run["steps"][2]["output"];
    assert_eq!(moved["device"], device.as_str(), "{run:#}");
    assert_eq!(
        (&moved["moved"][0]["instance_id"], &moved["moved"][0]["from"], &moved["moved"][0]["to"]),
        (&serde_json::json!("store-0"), &serde_json::json!(on_disk), &serde_json::json!(spare)),
        "{run:#}"
    );
    assert_eq!(moved["moved"].as_array().map(Vec::len), Some(1), "only the store moves: {run:#}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), device);
    let now = vigil.get("/api/v1/instances/store-0").unwrap();
    assert_eq!((&now["state"], &now["data_dir"]), (&serde_json::json!("active"), &serde_json::json!(spare)));
    assert_ne!(vigil.active_pids("store-0", Duration::from_secs(10)), first_pid, "a new process");
    assert_eq!(http_get(apps.0, "/").as_deref(), Some(spare.as_str()), "it serves from the spare directory");
    assert_eq!(workflow_restarts(&vigil, "store-0"), 1);
    assert_eq!(workflow_restarts(&vigil, "other-0"), 0);
    let listed = vigil.get("/api/v1/workflows").unwrap();
    assert_eq!(listed["cordons"][&device]["run_id"], id, "{listed:#}");
    // The hardware view agrees: the disk is not healthy, for its I/O errors.
    // The kernel log's records count as io_error, the block_rq_error tracepoint's events as their own kind
    // (the same failures, not counted twice).
    let hw = wait_for("the tracepoint's count", Duration::from_secs(30), || {
        let hw = vigil.get(&format!("/api/v1/hardware?device={device}")).ok()?;
        (hw["devices"][0]["errors"]["block_rq_error"].as_u64()? >= 2).then_some(hw)
    });
    let d = &hw["devices"][0];
    assert_ne!(d["state"], "healthy", "{hw:#}");
    assert!(d["errors"]["io_error"].as_u64().unwrap_or(0) >= 2, "{hw:#}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["ctl", "--api", &format!("127.0.0.1:{api}"), "hardware"])
        .output()
        .expect("vigil ctl hardware");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains(&device) && table.contains("kmsg"), "{table}");

    disk.heal();
    let run = wait_for("the run to end", Duration::from_secs(60), || {
        vigil.proc.assert_running();
        let r = vigil.get(&format!("/api/v1/workflows/runs/{id}")).ok()?;
        matches!(r["state"].as_str(), Some("succeeded" | "failed" | "cancelled")).then_some(r)
    });
    assert_eq!(run["state"], "succeeded", "{run:#}");
    assert_eq!(vigil.get("/api/v1/workflows").unwrap()["cordons"], serde_json::json!({}));
    assert_eq!(
        metric(&vigil, "vigil_workflow_runs_total{workflow=\"disk-repair\",state=\"succeeded\"}").as_deref(),
        Some("vigil_workflow_runs_total{workflow=\"disk-repair\",state=\"succeeded\"} 1")
    );
    // Uncordoned, the store stays with its data: a restart keeps the spare directory.
    vigil.client.call("POST", "/api/v1/instances/store-0/restart?wait=60s").expect("restart");
    assert_eq!(vigil.get("/api/v1/instances/store-0").unwrap()["data_dir"], spare.as_str());
    assert_eq!(http_get(apps.0, "/").as_deref(), Some(spare.as_str()));
}

#[test]
fn vigil_killed_during_the_drain_resumes_it_moves_the_instance_once_and_notifies() {
    let scratch = Scratch::new("disk-kill");
    let base = free_ports(6);
    let (api, apps, rsocket, trigger, hook) = (base, (base + 1, base + 2), base + 3, base + 4, base + 5);
    let parent = CgroupParent::new("disk-kill");
    let disk = fs_disk("kill");
    let mounted = Mounted::new(&disk, scratch.path("mnt"));
    let device = disk.name();
    let workflows = format!(
        "workflows:\n  - name: disk-move\n    trigger: {{ hardware: {{ kind: io_error, device: \"{device}\", at_least: 2, within: 1m }} }}\n    cooldown: 1h\n    steps:\n      - {{ name: cordon, cordon: {{}} }}\n      - {{ name: drain, drain: {{ timeout: 5m }}, after: [cordon] }}\n      - {{ name: move, evacuate: {{}}, after: [drain] }}\n      - {{ name: serves, run: {{ command: [curl, -sf, \"http://127.0.0.1:{port}/\"], timeout: 10s }}, retries: 60, backoff: {{ initial: 250ms, max: 1s }}, after: [move] }}\n      - {{ name: tell, notify: {{ receivers: [ops], message: \"{{device}}: instances moved off\" }}, after: [serves] }}\n      - {{ name: back, uncordon: {{}}, after: [tell] }}\n",
        port = apps.0
    );
    let store = store_with_data_dirs(&scratch, &mounted);
    let extra = format!(
        "broker: {{ listen: \"127.0.0.1:{rsocket}\", http: {{ listen: \"127.0.0.1:{trigger}\" }} }}\nnotify:\n  retry: {{ initial: 200ms, max: 1s }}\n  receivers:\n    - name: ops\n      webhook: {{ url: \"http://127.0.0.1:{hook}/hook\", secret: {SECRET} }}\n"
    );
    let config = config(&scratch, &parent, api, apps, &store, &workflows, &extra);
    let out = scratch.path("received.jsonl");
    let _receiver = webhook_receiver(&scratch, hook, SECRET, &out);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("store-0", Duration::from_secs(60));
    let on_disk = format!("{}/store-0", mounted.dir.display());
    let spare = format!("{}/store-0", scratch.path("spare").display());
    let served = wait_for("the store to serve through the broker", Duration::from_secs(30), || {
        http_get(trigger, "/store/")
    });
    assert_eq!(served, on_disk);
    // A request the store holds: the drain waits for it.
    let slow = std::thread::spawn(move || http_get(trigger, "/store/slow"));
    wait_for("the request in flight", Duration::from_secs(30), || {
        let m = vigil.client.call("GET", "/metrics").ok()?;
        m.as_str()?.lines().any(|l| l.starts_with("vigil_broker_inflight") && l.ends_with(" 1")).then_some(())
    });

    let run = fail_until(&disk, FS_DISK / 2, 2, "run of disk-move", || {
        vigil.proc.assert_running();
        runs(&vigil).into_iter().find(|r| r["workflow"] == "disk-move")
    });
    let id = run["id"].as_u64().unwrap();
    wait_for("the drain to wait", Duration::from_secs(30), || {
        let r = vigil.get(&format!("/api/v1/workflows/runs/{id}")).ok()?;
        (r["steps"][1]["state"] == "running").then_some(())
    });
    vigil.proc.kill();
    let _ = slow.join();
    disk.heal();

    let mut vigil = Vigil::up(&scratch.0, "vigil-again", &config, ([127, 0, 0, 1], api).into(), None);
    let run = wait_for("the run to end", Duration::from_secs(90), || {
        vigil.proc.assert_running();
        let r = vigil.get(&format!("/api/v1/workflows/runs/{id}")).ok()?;
        matches!(r["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "waiting")).then_some(r)
    });
    assert_eq!(run["state"], "succeeded", "{run:#}");
    let step =
        |name: &str| run["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    assert_eq!(step("drain")["interrupted"], 1, "the drain was cut off once, then ran again: {run:#}");
    assert_eq!(step("cordon")["attempt"], 1, "what had ended did not run again: {run:#}");
    // The cordon held across the restart: the store started in its spare directory at once, so the
    // evacuation had nothing left to move, and no workflow restarted it.
    let now = vigil.get("/api/v1/instances/store-0").unwrap();
    assert_eq!(now["data_dir"], spare.as_str(), "{now:#}");
    assert_eq!(step("move")["output"]["moved"], serde_json::json!([]), "{run:#}");
    assert_eq!(step("serves")["output"]["stdout"], spare.as_str(), "{run:#}");
    assert_eq!(workflow_restarts(&vigil, "store-0"), 0);
    assert_eq!(http_get(trigger, "/store/").as_deref(), Some(spare.as_str()), "routed to again");
    // The notify step reached the receiver, signed (the receiver verifies it), once.
    let got = wait_for("the notification", Duration::from_secs(30), || {
        let got: Vec<Value> = received(&out)
            .into_iter()
            .filter(|m: &Value| {
                m["body"]["alerts"][0]["annotations"]["summary"] == format!("{device}: instances moved off")
            })
            .collect();
        (!got.is_empty()).then_some(got)
    });
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["body"]["alerts"][0]["labels"]["device"], device.as_str());
}

#[test]
fn faults_on_too_much_of_the_host_open_the_breaker() {
    let scratch = Scratch::new("disk-storm");
    let base = free_ports(3);
    let (api, apps) = (base, (base + 1, base + 2));
    let parent = CgroupParent::new("disk-storm");
    let (a, b) = (disk("storm-a"), disk("storm-b"));
    // One workflow per disk (the kernel log may hold old errors of other loop devices); the breaker counts
    // devices across workflows.
    let workflows = format!(
        "workflows:\n  - name: disk-repair\n    trigger: {{ hardware: {{ kind: io_error, device: \"{a}\" }} }}\n    steps:\n      - {{ name: ok, approve: {{}} }}\n  - name: disk-repair-b\n    trigger: {{ hardware: {{ kind: io_error, device: \"{b}\" }} }}\n    steps:\n      - {{ name: ok, approve: {{}} }}\n",
        a = a.name(),
        b = b.name()
    );
    let store = format!("command: {}", server(apps.0, Some(&format!("/dev/{}", a.name()))));
    let config = config(&scratch, &parent, api, apps, &store, &workflows, "");
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("store-0", Duration::from_secs(60));

    let prometheus = Prometheus::start(([127, 0, 0, 1], api).into()).expect("start prometheus");
    prometheus.wait_until_up(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));

    // One device with faults is below min_devices: the run starts.
    fail_reads(&a, 1);
    let first = wait_for("the first run", Duration::from_secs(30), || {
        vigil.proc.assert_running();
        runs(&vigil).into_iter().find(|r| r["params"]["device"] == a.name())
    });
    // A second one is more than 1 % of the host's devices: refused, audited, counted.
    fail_reads(&b, 1);
    let refusal = wait_for("the breaker's refusal", Duration::from_secs(30), || {
        vigil.decision(|d| d["rule"] == "workflow:disk-repair-b" && d["instance_id"] == b.name())
    });
    let error = refusal["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("circuit breaker open: 2 of "), "{refusal}");
    assert!(runs(&vigil).iter().all(|r| r["params"]["device"] != b.name()), "no run for the second disk");
    assert_eq!(
        metric(&vigil, "vigil_workflow_runs_refused_total{workflow=\"disk-repair-b\",reason=\"breaker\"}")
            .as_deref(),
        Some("vigil_workflow_runs_refused_total{workflow=\"disk-repair-b\",reason=\"breaker\"} 1")
    );
    // The first run ends once approved; then every panel of the hardware dashboard has data.
    let id = first["id"].as_u64().unwrap();
    vigil.client.call("POST", &format!("/api/v1/workflows/runs/{id}/approve")).expect("approve");
    wait_for("the first run to end", Duration::from_secs(30), || {
        let r = vigil.get(&format!("/api/v1/workflows/runs/{id}")).ok()?;
        (r["state"] == "succeeded").then_some(())
    });
    let dashboard = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/hardware.json");
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 8, "the hardware dashboard has only {} queries", queries.len());
    for (title, expr) in queries {
        prometheus
            .wait_for(&expr, Duration::from_secs(60), has_samples)
            .unwrap_or_else(|e| panic!("panel `{title}`: {e}"));
    }
}
