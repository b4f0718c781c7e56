//! Exact hardware error counts, end to end through `vigil up`:
//! - the kernel log: records written as root to `/dev/kmsg` in the block layer's own format, for devices
//!   named after the test, are counted once each by `GET /api/v1/hardware` and by
//!   `vigil_hardware_errors_total`. Counters start at zero in each process (as Prometheus counters do); the
//!   kernel log cursor kept in the data directory decides what a restart reads again: exactly the records
//!   after it, whether Vigil was SIGKILLed once the cursor was saved, SIGKILLed at once (a batch of records
//!   that brought events has its cursor written before the next batch is read, so at most the last batch
//!   is read again), or stopped with SIGTERM (which saves it). Records logged while Vigil was down are read
//!   at the restart.
//! - sysfs: an EDAC fixture tree in the kernel's ABI format (`mc0/ce_count`, `ue_count`, `dimm0/dimm_*`)
//!   whose counters the test raises: the first reading is a baseline, each rise is counted by exactly its
//!   size, a counter that goes down is a new baseline (no event, no negative delta), and corrected errors
//!   make the controller `degraded`, an uncorrected one `failed`, with the reason `health.rs` writes.
//!
//! Needs root (writing /dev/kmsg, the collector's probes).

#[path = "../collector/tests/support/kmsg.rs"]
#[allow(dead_code)]
mod kmsg;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kmsg::Kmsg;
use serde_json::{Value, json};
use support::{CgroupParent, Scratch, Vigil, free_ports, wait_for};
use vigil_healer::client::ClientError;

/// Bound on any one wait: a poll interval is 1 s, and a record is read within milliseconds.
const WAIT: Duration = Duration::from_secs(20);

/// The state file `hardware/src/state.rs` keeps in the data directory.
const STATE_FILE: &str = "hardware-state.json";

/// The block layer's line for a failed read (block/blk-core.c `blk_print_req_error`), which the shipped
/// pattern `block-io-error` matches: kind `io_error`, severity `error`.
fn io_error_line(device: &str, sector: u64) -> String {
    format!("I/O error, dev {device}, sector {sector} op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2")
}

/// The records this test wrote to the kernel log, with the sequence numbers the kernel gave them.
struct KernelLog {
    reader: Kmsg,
    next_sector: u64,
    /// `(seq, device)`, in the order written.
    written: Vec<(u64, String)>,
}

impl KernelLog {
    fn new() -> KernelLog {
        KernelLog {
            reader: Kmsg::open_at_end().unwrap_or_else(|e| panic!("this test reads the kernel log: {e}")),
            next_sector: 8,
            written: Vec::new(),
        }
    }

    /// One `I/O error` record for `device` at KERN_ERR, on a file opened for it alone (the kernel lets one
    /// open file log 10 records per 5 s and drops the rest silently); its sequence number once the kernel
    /// log holds it.
    fn io_error(&mut self, device: &str) -> u64 {
        let line = io_error_line(device, self.next_sector);
        self.next_sector += 8;
        let record = format!("<3>{line}\n");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .unwrap_or_else(|e| panic!("this test writes to /dev/kmsg (root): {e}"));
        let n = file.write(record.as_bytes()).expect("writing to /dev/kmsg");
        assert_eq!(n, record.len(), "/dev/kmsg took {n} of {} bytes", record.len());
        drop(file);
        let seq = self
            .reader
            .wait_for(WAIT, |r| r.text == line)
            .unwrap_or_else(|| panic!("the kernel log never showed {line:?}"))
            .seq;
        self.written.push((seq, device.to_string()));
        seq
    }

    fn io_errors(&mut self, device: &str, n: u64) {
        for _ in 0..n {
            self.io_error(device);
        }
    }

    /// Per device, how many of the test's records came after `cursor`: what a Vigil that kept `cursor`
    /// reads again.
    fn after(&self, cursor: u64) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (seq, device) in &self.written {
            if *seq > cursor {
                *out.entry(device.clone()).or_default() += 1;
            }
        }
        out
    }
}

/// The hardware state Vigil kept in `data`, if it wrote one.
fn kept(data: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(data.join(STATE_FILE)).ok()?).ok()
}

fn kept_cursor(data: &Path) -> Option<u64> {
    kept(data)?["kmsg_seq"].as_u64()
}

/// The config: no services, rules or workflows, no broker or gRPC listener; hardware watching with a 1 s
/// poll over `sysfs_root` (a fixture tree, never the host's /sys), and `kmsg` as given.
fn config(scratch: &Scratch, parent: &CgroupParent, api: u16, sysfs_root: &Path, kmsg: &str) -> PathBuf {
    scratch.write(
        "vigil.yaml",
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\" }}\ngrpc: {{ enabled: false }}\nrules: []\nworkflows: []\nhealer: {{ cgroup_parent: {parent}, stop_grace: 2s }}\ncollector: {{ watch: {{ managed_root: {parent} }} }}\nbroker: {{ enabled: false }}\nhardware: {{ enabled: true, kmsg: \"{kmsg}\", kmsg_backlog: false, sysfs_root: {sys}, poll_interval: 1s }}\n",
            data = scratch.path("data").display(),
            sys = sysfs_root.display(),
        ),
    )
}

/// `GET /api/v1/hardware?device=NAME`'s one device, once Vigil has seen it.
fn device(vigil: &Vigil, name: &str) -> Option<Value> {
    let answer = vigil.get(&format!("/api/v1/hardware?device={}", name.replace('/', "%2F"))).ok()?;
    answer["devices"].as_array()?.first().cloned()
}

/// The devices `is_ours` accepts, with their error counts by kind, as `GET /api/v1/hardware` has them.
fn api_errors(vigil: &Vigil, is_ours: impl Fn(&str) -> bool) -> BTreeMap<String, Value> {
    let answer = vigil.get("/api/v1/hardware").expect("GET /api/v1/hardware");
    let devices = answer["devices"].as_array().cloned().unwrap_or_default();
    devices
        .into_iter()
        .filter_map(|d| {
            let name = d["device"].as_str()?.to_string();
            is_ours(&name).then(|| (name, d["errors"].clone()))
        })
        .collect()
}

/// Every `vigil_hardware_errors_total` series of the devices `is_ours` accepts, `(device, kind, severity)`
/// to its value; and the whole exposition, for messages.
fn metric_errors(
    vigil: &Vigil,
    is_ours: impl Fn(&str) -> bool,
) -> (BTreeMap<(String, String, String), u64>, String) {
    let text = vigil.client.call("GET", "/metrics").expect("GET /metrics");
    let text = text.as_str().expect("/metrics is text").to_string();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("vigil_hardware_errors_total{") else { continue };
        let (labels, value) = rest.split_once("} ").unwrap_or_else(|| panic!("unreadable line {line:?}"));
        let label = |key: &str| -> String {
            let start = format!("{key}=\"");
            let from = labels.find(&start).unwrap_or_else(|| panic!("no {key} in {line:?}")) + start.len();
            labels[from..].split('"').next().unwrap_or_default().to_string()
        };
        let device = label("device");
        if is_ours(&device) {
            let value: u64 = value.parse().unwrap_or_else(|_| panic!("{value:?} is not a count in {line:?}"));
            out.insert((device, label("kind"), label("severity")), value);
        }
    }
    (out, text)
}

/// The test's disk and its fences (`DISK-fenceN`): devices no other test names.
fn is_ours(disk: &str) -> impl Fn(&str) -> bool + '_ {
    move |d: &str| d == disk || d.strip_prefix(disk).is_some_and(|rest| rest.starts_with("-fence"))
}

/// Writes a fence record (a device of its own) and waits until Vigil has read it: one reader thread takes
/// the log in order, so every record before it has been counted by then.
fn fence(vigil: &mut Vigil, log: &mut KernelLog, disk: &str, n: u32) -> String {
    let name = format!("{disk}-fence{n}");
    log.io_error(&name);
    wait_for(&format!("Vigil to read the fence record of {name}"), WAIT, || {
        vigil.proc.assert_running();
        device(vigil, &name)
    });
    name
}

/// Asserts that the API and `/metrics` count exactly `expected` `io_error`s (severity `error`) for the
/// test's devices, and nothing for any other of them.
fn assert_io_errors(vigil: &Vigil, disk: &str, expected: &BTreeMap<String, u64>, when: &str) {
    let api: BTreeMap<String, Value> =
        expected.iter().map(|(d, n)| (d.clone(), json!({ "io_error": n }))).collect();
    assert_eq!(api_errors(vigil, is_ours(disk)), api, "{when}: the API's counts");
    let metrics: BTreeMap<(String, String, String), u64> =
        expected.iter().map(|(d, n)| ((d.clone(), "io_error".into(), "error".into()), *n)).collect();
    // The API's tracker and the counter are updated one after the other: the fence's may lag by a moment.
    let mut last = (BTreeMap::new(), String::new());
    let equal = wait_for_or_last(Duration::from_secs(5), || {
        last = metric_errors(vigil, is_ours(disk));
        last.0 == metrics
    });
    assert!(
        equal,
        "{when}: vigil_hardware_errors_total is {:?}, expected {metrics:?}; /metrics:\n{}",
        last.0, last.1
    );
}

/// Polls `check` every 50 ms until it holds (true) or `timeout` passed (false), for assertions that show
/// what was last seen.
fn wait_for_or_last(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(d, n)| (d.to_string(), *n)).collect()
}

#[test]
fn kernel_log_records_are_counted_once_and_a_restart_reads_exactly_those_after_the_kept_cursor() {
    let scratch = Scratch::new("hw-counts-kmsg");
    let api = free_ports(1);
    let parent = CgroupParent::new("hw-counts-kmsg");
    let sysfs = scratch.path("sys");
    std::fs::create_dir_all(&sysfs).expect("the empty sysfs fixture");
    let config = config(&scratch, &parent, api, &sysfs, "/dev/kmsg");
    let data = scratch.path("data");
    let disk = format!("vigiltest-{}", std::process::id());
    let mut log = KernelLog::new();
    let up = |name: &str| Vigil::up(&scratch.0, name, &config, ([127, 0, 0, 1], api).into(), None);

    // First start in this data directory, without the backlog: only records logged from now on count.
    let mut vigil = up("vigil-1");
    let report = vigil.get("/api/v1/hardware").expect("GET /api/v1/hardware");
    let kmsg_source =
        report["sources"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "kmsg")).cloned();
    assert_eq!(kmsg_source, Some(json!({"name": "kmsg", "available": true, "detail": "reading /dev/kmsg"})));
    log.io_errors(&disk, 7);
    let last_line = io_error_line(&disk, log.next_sector - 8);
    let f1 = fence(&mut vigil, &mut log, &disk, 1);
    assert_io_errors(&vigil, &disk, &counts(&[(&disk, 7), (&f1, 1)]), "7 records");
    let d = device(&vigil, &disk).expect("the disk is known");
    assert_eq!(d["state"], "degraded", "{d}");
    assert_eq!(d["reason"], format!("7 io_error in the last 5m; last: {last_line}").as_str(), "{d}");
    let m = vigil.client.call("GET", "/metrics").expect("GET /metrics");
    let health = format!("vigil_hardware_device_health{{device=\"{disk}\",state=\"degraded\"}} 1");
    assert!(m.as_str().is_some_and(|t| t.lines().any(|l| l == health)), "no `{health}` in /metrics");

    // SIGKILL once the cursor through the fence is saved (the next poll tick at the latest): a restart
    // reads the 4 records logged while Vigil was down, and none of the 7 again.
    let f1_seq = log.written.last().expect("the fence").0;
    wait_for("the kernel log cursor to be saved", WAIT, || kept_cursor(&data).filter(|&s| s >= f1_seq));
    vigil.proc.kill();
    drop(vigil);
    // Records of others may have moved it further since.
    let saved = kept_cursor(&data).expect("a cursor was saved");
    assert!(saved >= f1_seq, "the cursor went back from {f1_seq} to {saved}");
    log.io_errors(&disk, 4);
    let mut vigil = up("vigil-2");
    let f2 = fence(&mut vigil, &mut log, &disk, 2);
    let expected = counts(&[(&disk, 4), (&f2, 1)]);
    assert_eq!(log.after(saved), expected, "the test's own bookkeeping");
    assert_io_errors(&vigil, &disk, &expected, "after a SIGKILL with the cursor saved");

    // SIGKILL at once after 5 more records, each written once Vigil counted the one before (so each is a
    // batch of its own, and the reader saved its cursor before it read the next): the restart reads again
    // exactly the records after the cursor on disk, and that is at most the last batch, the fence's, whose
    // save the kill may have interrupted; none of the disk's records.
    for total in 5..=9 {
        log.io_error(&disk);
        wait_for(&format!("Vigil to count {total} records of {disk}"), WAIT, || {
            vigil.proc.assert_running();
            device(&vigil, &disk).filter(|d| d["errors"]["io_error"] == total)
        });
    }
    let f3 = fence(&mut vigil, &mut log, &disk, 3);
    assert_io_errors(
        &vigil,
        &disk,
        &counts(&[(&disk, 9), (&f2, 1), (&f3, 1)]),
        "9 records in the second run",
    );
    vigil.proc.kill();
    drop(vigil);
    let cursor = kept_cursor(&data).expect("a cursor was saved");
    assert!(cursor >= saved, "the cursor went back from {saved} to {cursor}");
    let mut vigil = up("vigil-3");
    let f4 = fence(&mut vigil, &mut log, &disk, 4);
    let expected = log.after(cursor);
    eprintln!("killed at once: the cursor was {cursor}; read again: {expected:?}");
    assert_io_errors(&vigil, &disk, &expected, "after a SIGKILL at once");
    assert!(
        expected.keys().all(|d| *d == f3 || *d == f4),
        "a crash read again more than the batch whose save it interrupted: {expected:?}"
    );

    // SIGTERM: the stop saves the cursor through the last record read, so the restart reads only the 3
    // records logged while Vigil was down.
    let f4_seq = log.written.last().expect("the fence").0;
    let status = vigil.proc.stop_status().expect("vigil exits on SIGTERM");
    assert!(status.success(), "vigil exited with {status} on SIGTERM:\n{}", vigil.proc.log_text());
    drop(vigil);
    let stopped = kept_cursor(&data).expect("a cursor was saved");
    assert!(stopped >= f4_seq, "the stop saved the cursor {stopped}, before the last record read ({f4_seq})");
    log.io_errors(&disk, 3);
    let mut vigil = up("vigil-4");
    let f5 = fence(&mut vigil, &mut log, &disk, 5);
    let expected = counts(&[(&disk, 3), (&f5, 1)]);
    assert_eq!(log.after(stopped), expected, "the test's own bookkeeping");
    assert_io_errors(&vigil, &disk, &expected, "after a SIGTERM");
}

/// Writes `value` to the fixture file `rel` under `root` at once (a temporary file renamed over it), so the
/// poll never reads half a write.
fn set(root: &Path, rel: &str, value: u64) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("the fixture's directories");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{value}\n")).expect("the fixture file");
    std::fs::rename(&tmp, &path).expect("the fixture file");
}

const MC: &str = "devices/system/edac/mc/mc0";

/// Sets the controller's and its one DIMM's counters (on real EDAC the controller's count is the sum of
/// its DIMMs'), then waits for the poll tick that read them: the readings are saved after that tick's
/// events were counted.
fn edac(vigil: &mut Vigil, sys: &Path, data: &Path, ce: u64, ue: u64) {
    set(sys, &format!("{MC}/ce_count"), ce);
    set(sys, &format!("{MC}/ue_count"), ue);
    set(sys, &format!("{MC}/dimm0/dimm_ce_count"), ce);
    set(sys, &format!("{MC}/dimm0/dimm_ue_count"), ue);
    let readings = json!({
        "edac/mc0/ce_count": ce,
        "edac/mc0/ue_count": ue,
        "edac/mc0/dimm0/dimm_ce_count": ce,
        "edac/mc0/dimm0/dimm_ue_count": ue,
    });
    wait_for(&format!("a poll of ce {ce}, ue {ue}"), WAIT, || {
        vigil.proc.assert_running();
        kept(data).filter(|k| k["readings"]["counters"] == readings)
    });
}

/// Asserts the controller's and the DIMM's counts (corrected, uncorrected) in the API and `/metrics`, and
/// the controller's state and reason.
fn assert_edac(vigil: &Vigil, ce: u64, ue: u64, state: &str, reason: &str) {
    let is_mc0 = |d: &str| d == "mc0" || d == "mc0/dimm0";
    let mut errors = json!({ "memory_ce": ce });
    if ue > 0 {
        errors["memory_ue"] = json!(ue);
    }
    let api: BTreeMap<String, Value> =
        [("mc0".to_string(), errors.clone()), ("mc0/dimm0".to_string(), errors)].into();
    assert_eq!(api_errors(vigil, is_mc0), api, "ce {ce}, ue {ue}: the API's counts");
    let mut metrics = BTreeMap::new();
    for d in ["mc0", "mc0/dimm0"] {
        metrics.insert((d.to_string(), "memory_ce".to_string(), "warning".to_string()), ce);
        if ue > 0 {
            metrics.insert((d.to_string(), "memory_ue".to_string(), "critical".to_string()), ue);
        }
    }
    let (seen, text) = metric_errors(vigil, is_mc0);
    assert_eq!(seen, metrics, "ce {ce}, ue {ue}: vigil_hardware_errors_total; /metrics:\n{text}");
    let health = format!("vigil_hardware_device_health{{device=\"mc0\",state=\"{state}\"}} 1");
    assert!(text.lines().any(|l| l == health), "no `{health}` in /metrics:\n{text}");
    let d = device(vigil, "mc0").expect("mc0 is known");
    assert_eq!((d["state"].as_str(), d["reason"].as_str()), (Some(state), Some(reason)), "{d}");
}

#[test]
fn edac_counters_in_a_sysfs_fixture_are_counted_by_their_rises_and_a_reset_is_a_new_baseline() {
    let scratch = Scratch::new("hw-counts-sysfs");
    let api = free_ports(1);
    let parent = CgroupParent::new("hw-counts-sysfs");
    let sys = scratch.path("sys");
    let data = scratch.path("data");
    for file in ["ce_count", "ue_count", "dimm0/dimm_ce_count", "dimm0/dimm_ue_count"] {
        set(&sys, &format!("{MC}/{file}"), 0);
    }
    // The kernel log off: only the fixture counts.
    let config = config(&scratch, &parent, api, &sys, "");
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    let report = vigil.get("/api/v1/hardware").expect("GET /api/v1/hardware");
    let source =
        |name: &str| report["sources"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name)).cloned();
    assert_eq!(
        source("kmsg"),
        Some(
            json!({"name": "kmsg", "available": false, "detail": "the kernel log is turned off (hardware.kmsg is empty)"})
        )
    );
    let edac_detail = format!("1 memory controllers under {}", sys.join("devices/system/edac/mc").display());
    assert_eq!(source("edac"), Some(json!({"name": "edac", "available": true, "detail": edac_detail})));

    // The first reading is the baseline: no event, the controller unknown to the API.
    edac(&mut vigil, &sys, &data, 0, 0);
    assert_eq!(api_errors(&vigil, |d| d.starts_with("mc0")), BTreeMap::new());
    match vigil.get("/api/v1/hardware?device=mc0") {
        Err(ClientError::Api { status, code, .. }) => assert_eq!((status, code.as_str()), (404, "not_found")),
        other => panic!("mc0 before any rise: {other:?}"),
    }

    edac(&mut vigil, &sys, &data, 5, 0);
    let why = "5 memory_ce in the last 5m; last: mc0: 5 corrected memory errors (mc0/ce_count 0 -> 5)";
    assert_edac(&vigil, 5, 0, "degraded", why);
    edac(&mut vigil, &sys, &data, 12, 0);
    let why = "12 memory_ce in the last 5m; last: mc0: 7 corrected memory errors (mc0/ce_count 5 -> 12)";
    assert_edac(&vigil, 12, 0, "degraded", why);
    // The counters go down (the driver was reloaded): a new baseline, nothing counted.
    edac(&mut vigil, &sys, &data, 2, 0);
    assert_edac(&vigil, 12, 0, "degraded", why);
    edac(&mut vigil, &sys, &data, 4, 0);
    let why = "14 memory_ce in the last 5m; last: mc0: 2 corrected memory errors (mc0/ce_count 2 -> 4)";
    assert_edac(&vigil, 14, 0, "degraded", why);
    // One uncorrected error: critical, so failed.
    edac(&mut vigil, &sys, &data, 4, 1);
    let why = "14 memory_ce, 1 memory_ue in the last 5m; last: mc0: 1 uncorrected memory errors (mc0/ue_count 0 -> 1)";
    assert_edac(&vigil, 14, 1, "failed", why);
}
