//! Hardware faults start repairs, end to end through `vigil up` and the real kernel: a loop disk served by
//! an in-process FUSE filesystem starts answering EIO (collector/tests/support/faultydisk.rs), the kernel
//! prints its own `I/O error, dev loopN` records, Vigil reads them from /dev/kmsg, and the workflow its
//! trigger names runs: it cordons the disk, drains the instance whose process has the disk open (and not
//! the other one), runs the repair command with the device, waits until the disk has been healthy for a
//! while, and uncordons. With faults on more of the host than the circuit breaker allows, the next run is
//! refused, audited and counted, and every panel of `dashboards/hardware.json` has data in a real Prometheus.
//!
//! Needs root, /dev/fuse and loop devices (`scripts/setup`).

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

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashboard::panel_queries;
use faultydisk::FaultyDisk;
use prometheus::{Prometheus, has_samples};
use serde_json::Value;
use support::{CgroupParent, Scratch, Vigil, free_ports, wait_for};

const BLOCK: u64 = 4096;
const SIZE: u64 = 16 << 20;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn disk(tag: &str) -> FaultyDisk {
    FaultyDisk::new(tag, SIZE).unwrap_or_else(|e| panic!("this test needs a faulty loop disk: {e}"))
}

/// `n` failing O_DIRECT reads of different blocks: one kernel record each (below the 10 per 5 s limit).
fn fail_reads(disk: &FaultyDisk, n: u64) {
    disk.fail(0..SIZE);
    for b in 0..n {
        assert!(disk.read_direct(b * BLOCK, BLOCK as usize).is_err(), "the read of block {b} must fail");
    }
}

fn metric(vigil: &Vigil, prefix: &str) -> Option<String> {
    let text = vigil.client.call("GET", "/metrics").ok()?;
    text.as_str()?.lines().find(|l| l.starts_with(prefix)).map(str::to_string)
}

/// The config: two services (one holds the disk open), hardware watching with a short quiet window and
/// without the kernel log's backlog (earlier tests' errors on a loop device of the same number must not
/// start runs), and the workflows in `workflows`.
fn config(
    scratch: &Scratch,
    parent: &CgroupParent,
    api: u16,
    apps: (u16, u16),
    device: &str,
    workflows: &str,
) -> std::path::PathBuf {
    let wf = scratch.write("wf.yaml", workflows);
    let serve = |port: u16, hold: Option<&str>| {
        let open = hold.map(|d| format!("f = open('{d}', 'rb'); ")).unwrap_or_default();
        format!(
            "[python3, -c, \"{open}import http.server as h; h.ThreadingHTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()\"]"
        )
    };
    scratch.write(
        "vigil.yaml",
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\" }}\nrules: []\nworkflows: [{wf}]\nhealer: {{ cgroup_parent: {parent}, stop_grace: 2s, workflows: {{ breaker: {{ window: 5m, max_fraction: 0.01, min_devices: 2 }} }} }}\ncollector: {{ watch: {{ managed_root: {parent} }} }}\nbroker: {{ enabled: false }}\nhardware: {{ enabled: true, quiet: 3s, poll_interval: 1s, kmsg_backlog: false }}\nservices:\n  - name: store\n    command: {store}\n    port: {a}\n    readiness: {{ tcp: true }}\n  - name: other\n    command: {other}\n    port: {b}\n    readiness: {{ tcp: true }}\n",
            data = scratch.path("data").display(),
            wf = wf.display(),
            store = serve(apps.0, Some(device)),
            other = serve(apps.1, None),
            a = apps.0,
            b = apps.1,
        ),
    )
}

fn runs(vigil: &Vigil) -> Vec<Value> {
    vigil.get("/api/v1/workflows").ok().and_then(|w| w["runs"].as_array().cloned()).unwrap_or_default()
}

#[test]
fn kernel_io_errors_start_a_repair_that_drains_the_disks_instance_and_uncordons_once_healthy() {
    let scratch = Scratch::new("disk-repair");
    let base = free_ports(3);
    let (api, apps) = (base, (base + 1, base + 2));
    let parent = CgroupParent::new("disk-repair");
    let disk = disk("repair");
    let device = disk.name();
    let marker = scratch.path("repaired");
    let workflows = format!(
        "workflows:\n  - name: disk-repair\n    trigger: {{ hardware: {{ kind: io_error, device: \"{device}\", at_least: 2, within: 1m }} }}\n    cooldown: 1h\n    steps:\n      - {{ name: cordon, cordon: {{}} }}\n      - {{ name: drain, drain: {{ timeout: 5s }}, after: [cordon] }}\n      - {{ name: fix, run: {{ command: [sh, -c, \"echo {{device}} > {m}\"], timeout: 10s }}, after: [drain] }}\n      - {{ name: check, wait_for: {{ device_health: healthy, for: 1s }}, after: [fix] }}\n      - {{ name: back, uncordon: {{}}, after: [check] }}\n",
        m = marker.display()
    );
    let config = config(&scratch, &parent, api, apps, &format!("/dev/{device}"), &workflows);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("store-0", Duration::from_secs(60));
    vigil.active_pids("other-0", Duration::from_secs(60));

    let faulted = now_ms();
    fail_reads(&disk, 2);
    let run = wait_for("a run of disk-repair", Duration::from_secs(30), || {
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

    // While the disk fails, the run holds at its health check: cordoned, the disk's instance drained.
    let run = wait_for("the fix to run", Duration::from_secs(30), || {
        let r = vigil.get(&format!("/api/v1/workflows/runs/{id}")).ok()?;
        (r["steps"][2]["state"] == "succeeded").then_some(r)
    });
    assert_eq!(run["steps"][1]["output"]["held"], serde_json::json!(["store-0"]), "{run:#}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), device);
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
    let config = config(&scratch, &parent, api, apps, &format!("/dev/{}", a.name()), &workflows);
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
