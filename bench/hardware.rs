//! Hardware health (issue 11, deliverable 7): how long a fault in the kernel log takes to start a repair,
//! and what watching costs on an idle host. Everything is the real path: `vigil up` as its own process,
//! records written as root to `/dev/kmsg`, read back by Vigil's kernel log thread like any other.
//!
//! Latency (goal ≤ 1 s): one Vigil with hardware watching on and one workflow whose trigger is a single
//! `io_error` on a `vigil-bench*` device, its first step `run: [date, +%s%N]`. Each repetition writes the
//! block layer's `I/O error, dev vigil-bench<pid>x<n>, sector ...` line for a new device (so neither the
//! workflow's cooldown nor the per-device count carries over; the breaker's `max_fraction: 1.0` never
//! opens), taking the wall clock just before the write, and measures until
//! - the hardware API shows the device (`GET /api/v1/hardware?device=`, 1 ms between requests);
//! - the run exists (`created_ms`) and its first step began (`steps[0].started_ms`), as Vigil recorded;
//! - the step's command ran (the nanoseconds `date` printed, from the step's recorded stdout);
//!
//! and, for the kernel's share, until a plain reader of its own (a thread of the bench blocked in
//! `read()` on /dev/kmsg) has the record. The next repetition waits for the run to end. Vigil's times
//! are whole milliseconds.
//!
//! Cost (goal ≤ 0.1 % of a core): two Vigils at once, one with `hardware.enabled: true` and one with
//! `false`, all else equal (defaults: sysfs every 10 s), each in a cgroup v2 directory of its own, so
//! that `cpu.stat` `usage_usec` counts all its threads, also those that ended during the window. Over an
//! idle window: the on-CPU time of the monitor's two threads (`vigil-kmsg`, `vigil-hw-poll`; the first
//! field of `/proc/PID/task/TID/schedstat`, nanoseconds) and both processes' CPU. Then the same under a
//! stream of 100 kernel log records a second that match no pattern, for the cost per record (the records
//! Vigil read are `vigil_hardware_kmsg_records_total`).
//!
//! The kernel lets a /dev/kmsg writer log 10 records per 5 s on one open file (unless
//! `kernel.printk_devkmsg=on`) and drops the rest silently; each open has its own allowance, so the bench
//! opens the device afresh for every 10 records, and checks that Vigil read all it wrote.
//!
//! Run: `cargo bench --bench hardware` (root); `-- --quick` for a short run (10 repetitions, 20 s idle,
//! 10 s of stream). The full run writes about 2,000 records to the kernel log: where its buffer is small
//! (on the machines of DESIGN.md it held about 2,700 short records) that pushes out what was logged before.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use support::{CgroupParent, Proc, Scratch, Vigil, free_ports, v2_root, wait_for};
use vigil_hardware::patterns::Patterns;
use vigil_healer::client::Client;

const GOAL_LATENCY: Duration = Duration::from_secs(1);
/// Percent of one core.
const GOAL_CPU_PERCENT: f64 = 0.1;
/// Bound on any one wait, so a lost record fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);
/// The monitor's threads, as `hardware/src/monitor.rs` names them.
const THREADS: [&str; 2] = ["vigil-kmsg", "vigil-hw-poll"];
/// Records the kernel accepts on one open /dev/kmsg within 5 s.
const PER_OPEN: u32 = 10;
const STREAM_PER_SECOND: u32 = 100;

struct Plan {
    repetitions: usize,
    idle: Duration,
    stream: Duration,
    /// From both Vigils answering to the first window: past their start (probes, first scans).
    settle: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                repetitions: 10,
                idle: Duration::from_secs(20),
                stream: Duration::from_secs(10),
                settle: Duration::from_secs(5),
            }
        } else {
            Plan {
                repetitions: 30,
                idle: Duration::from_secs(60),
                stream: Duration::from_secs(20),
                settle: Duration::from_secs(5),
            }
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The block layer's line (block/blk-core.c `blk_print_req_error`) for `device`.
fn fault_line(device: &str, sector: u64) -> String {
    format!("I/O error, dev {device}, sector {sector} op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2")
}

fn chatter_line(i: u64) -> String {
    format!("vigil bench: unrelated record {i}, matching no hardware pattern")
}

/// Writes records to /dev/kmsg at level 3 (err), opening it afresh every [`PER_OPEN`] records.
struct KmsgWriter {
    file: Option<File>,
    written_on_file: u32,
    written: u64,
}

impl KmsgWriter {
    fn new() -> KmsgWriter {
        KmsgWriter { file: None, written_on_file: 0, written: 0 }
    }

    /// Makes sure the next write goes to an open file with allowance left (call it before taking the time).
    fn ready(&mut self) -> Result<()> {
        if self.file.is_none() || self.written_on_file >= PER_OPEN {
            self.file = Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/kmsg")
                    .context("opening /dev/kmsg for writing (root?)")?,
            );
            self.written_on_file = 0;
        }
        Ok(())
    }

    /// One record: one write(2), as the kernel takes each write as one record.
    fn write(&mut self, message: &str) -> Result<()> {
        self.ready()?;
        let record = format!("<3>{message}\n");
        let file = self.file.as_mut().context("no open /dev/kmsg")?;
        let n = file.write(record.as_bytes()).context("writing to /dev/kmsg")?;
        ensure!(n == record.len(), "/dev/kmsg took {n} of {} bytes", record.len());
        self.written_on_file += 1;
        self.written += 1;
        Ok(())
    }
}

/// A cgroup v2 directory for one Vigil, so that its `cpu.stat` counts every thread it ever had.
/// Removed on drop (after the process in it: declare it before the process, or after it in a struct).
struct CpuCgroup(PathBuf);

impl CpuCgroup {
    fn new(tag: &str) -> Result<CpuCgroup> {
        let dir = v2_root().join(format!("vigil-bench-hw-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(CpuCgroup(dir))
    }

    fn usage_ns(&self) -> Result<u64> {
        let path = self.0.join("cpu.stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let usec = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
            .with_context(|| format!("no usage_usec in {}", path.display()))?;
        Ok(usec * 1000)
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `vigil up` in a cgroup of its own (fields drop in order: the process before its cgroups).
struct Instance {
    vigil: Vigil,
    cgroup: CpuCgroup,
    _parent: CgroupParent,
}

impl Instance {
    /// Starts `vigil up` on `config` (the healer's cgroup parent is `parent`) inside a new cgroup, through
    /// a shell that moves itself there and then execs Vigil, so that Vigil's first thread already counts.
    fn start(
        scratch: &Scratch,
        tag: &str,
        config: &Path,
        api: u16,
        parent: CgroupParent,
    ) -> Result<Instance> {
        let cgroup = CpuCgroup::new(tag)?;
        let script = format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", cgroup.0.display());
        let args = [
            "-c".to_string(),
            script,
            env!("CARGO_BIN_EXE_vigil").to_string(),
            "up".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ];
        let proc = Proc::spawn(tag, &scratch.0, "/bin/sh", &args);
        let addr = ([127, 0, 0, 1], api).into();
        let mut vigil = Vigil { proc, api: addr, client: Client::new(addr, None) };
        wait_for(&format!("{tag}'s API to answer"), Duration::from_secs(60), || {
            vigil.proc.assert_running();
            vigil.get("/api/v1/rules").ok()
        });
        Ok(Instance { vigil, cgroup, _parent: parent })
    }

    fn pid(&self) -> u32 {
        self.vigil.proc.pid()
    }

    /// The monitor's threads by name, with their thread ids.
    fn hardware_threads(&self) -> Result<BTreeMap<String, u32>> {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            let entry = entry?;
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
            let comm = comm.trim();
            if THREADS.contains(&comm) {
                let tid = entry.file_name().to_string_lossy().parse()?;
                out.insert(comm.to_string(), tid);
            }
        }
        Ok(out)
    }

    /// Nanoseconds thread `tid` has been on a CPU.
    fn thread_ns(&self, tid: u32) -> Result<u64> {
        let path = format!("/proc/{}/task/{tid}/schedstat", self.pid());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: {text:?}"))
    }

    /// `vigil_hardware_kmsg_records_total`.
    fn kmsg_records(&self) -> Result<u64> {
        let text = self.vigil.client.call("GET", "/metrics").context("GET /metrics")?;
        let text = text.as_str().unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("vigil_hardware_kmsg_records_total ")?.trim().parse().ok())
            .context("no vigil_hardware_kmsg_records_total in /metrics")
    }
}

/// The config of one Vigil: loopback API, no gRPC, no broker, no services, no rules.
fn config(
    scratch: &Scratch,
    tag: &str,
    api: u16,
    parent: &CgroupParent,
    hardware: &str,
    workflows: &str,
) -> PathBuf {
    scratch.write(
        &format!("{tag}.yaml"),
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\" }}\ngrpc: {{ enabled: false }}\nbroker: {{ enabled: false }}\n\
             rules: []\nworkflows: {workflows}\nservices: []\n\
             healer: {{ cgroup_parent: {parent}, workflows: {{ breaker: {{ max_fraction: 1.0 }} }} }}\n\
             collector: {{ watch: {{ managed_root: {parent} }} }}\nhardware: {hardware}\n",
            data = scratch.path(&format!("{tag}-data")).display(),
        ),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// From `t0_ns` to `later_ns`; a later time that reads earlier (Vigil's times are whole milliseconds,
/// cut down) counts as no time.
fn since(t0_ns: u64, later_ns: u64) -> Duration {
    Duration::from_nanos(later_ns.saturating_sub(t0_ns))
}

/// A thread blocked in `read()` on /dev/kmsg from its end: each new record's message, with the wall
/// clock when the read returned it. The kernel wakes every reader the same way, so this is the kernel's
/// share of the latency. The thread ends when the receiver is dropped and the next record arrives, or
/// with the process.
fn plain_reader() -> Result<mpsc::Receiver<(String, u64)>> {
    let mut file = File::open("/dev/kmsg").context("opening /dev/kmsg for reading")?;
    file.seek(std::io::SeekFrom::End(0)).context("seeking to the end of /dev/kmsg")?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("bench-kmsg".into()).spawn(move || {
        let mut buf = vec![0u8; vigil_hardware::kmsg::RECORD_BUFFER];
        loop {
            match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let at = now_ns();
                    let Ok(record) = vigil_hardware::kmsg::parse_record(&buf[..n]) else { continue };
                    if tx.send((record.message, at)).is_err() {
                        return;
                    }
                }
                // Records were overwritten before this read: go on with the oldest left.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })?;
    Ok(rx)
}

#[derive(Default)]
struct Latencies {
    /// A plain reader of /dev/kmsg has the record.
    reader: Vec<Duration>,
    api: Vec<Duration>,
    /// How long the request that first showed the device took: the device showed at most that much
    /// earlier than `api` says.
    api_request: Vec<Duration>,
    created: Vec<Duration>,
    step_started: Vec<Duration>,
    command_ran: Vec<Duration>,
    /// The host's CPUs busy over the repetitions, in cores.
    host_busy_cores: f64,
}

fn latency(plan: &Plan, patterns: &Patterns) -> Result<Latencies> {
    let scratch = Scratch::new("bench-hw-latency");
    let api = free_ports(1);
    let parent = CgroupParent::new("bench-hw-latency");
    let wf = scratch.write(
        "wf.yaml",
        "workflows:\n  - name: bench-disk\n    trigger: { hardware: { kind: io_error, device: \"vigil-bench*\", at_least: 1, within: 1m } }\n    cooldown: 0s\n    steps:\n      - { name: mark, run: { command: [date, \"+%s%N\"], timeout: 10s } }\n",
    );
    let cfg = config(
        &scratch,
        "latency",
        api,
        &parent,
        "{ enabled: true, kmsg_backlog: false }",
        &format!("[{}]", wf.display()),
    );
    let vigil = Instance::start(&scratch, "latency", &cfg, api, parent)?;
    let client = &vigil.vigil.client;
    let mut kmsg = KmsgWriter::new();
    let mut out = Latencies::default();
    let tag = std::process::id();
    let reader = plain_reader()?;
    let host_before = host_cpu()?;
    for i in 0..plan.repetitions {
        let device = format!("vigil-bench{tag}x{i}");
        let line = fault_line(&device, 2048 + 8 * i as u64);
        let m = patterns.find(&line).context("the fault line matches no pattern")?;
        ensure!(m.kind.as_str() == "io_error" && m.device == device, "the fault line matched {m:?}");

        kmsg.ready()?;
        let t0 = now_ns();
        kmsg.write(&line)?;
        let query = format!("/api/v1/hardware?device={device}");
        let deadline = Instant::now() + WAIT;
        let (seen, request) = loop {
            let asked = Instant::now();
            if client.call("GET", &query).is_ok() {
                break (now_ns(), asked.elapsed());
            }
            ensure!(Instant::now() < deadline, "{device} did not show in the hardware API within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(1));
        };
        let id = wait_for(&format!("a run for {device}"), WAIT, || {
            let w = client.call("GET", "/api/v1/workflows").ok()?;
            w["runs"].as_array()?.iter().find(|r| r["params"]["device"] == device.as_str())?["id"].as_u64()
        });
        let run = wait_for(&format!("run {id} to end"), WAIT, || {
            let r = client.call("GET", &format!("/api/v1/workflows/runs/{id}")).ok()?;
            matches!(r["state"].as_str(), Some("succeeded" | "failed" | "cancelled")).then_some(r)
        });
        ensure!(run["state"] == "succeeded", "run {id} did not succeed: {run:#}");
        let field =
            |v: &Value, what: &str| v.as_u64().with_context(|| format!("run {id} has no {what}: {run:#}"));
        let created = field(&run["created_ms"], "created_ms")?;
        let started = field(&run["steps"][0]["started_ms"], "steps[0].started_ms")?;
        let ran: u64 = run["steps"][0]["output"]["stdout"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("run {id}'s step printed no time: {run:#}"))?;
        let deadline = Instant::now() + WAIT;
        let read = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match reader.recv_timeout(left) {
                Ok((message, at)) if message == line => break at,
                Ok(_) => {}
                Err(e) => bail!("the bench's own reader did not get the record for {device}: {e}"),
            }
        };
        out.reader.push(since(t0, read));
        out.api.push(since(t0, seen));
        out.api_request.push(request);
        out.created.push(since(t0, created * 1_000_000));
        out.step_started.push(since(t0, started * 1_000_000));
        out.command_ran.push(since(t0, ran));
        eprintln!(
            "  {device}: plain reader {:.1} ms, api {:.1} ms, run created {:.1} ms, step started {:.1} ms, command ran {:.1} ms",
            ms(since(t0, read)),
            ms(since(t0, seen)),
            ms(since(t0, created * 1_000_000)),
            ms(since(t0, started * 1_000_000)),
            ms(since(t0, ran)),
        );
    }
    let host_after = host_cpu()?;
    out.host_busy_cores = busy_cores(host_before, host_after);
    let read = vigil.kmsg_records()?;
    ensure!(read >= kmsg.written, "Vigil read {read} kernel log records, the bench wrote {}", kmsg.written);
    Ok(out)
}

/// CPU over one window: nanoseconds on a CPU.
struct Window {
    wall: Duration,
    /// Hardware watching on: the monitor's threads, and the whole process.
    threads: BTreeMap<String, u64>,
    enabled_ns: u64,
    /// Hardware watching off: the whole process.
    disabled_ns: u64,
    /// Kernel log records the enabled Vigil read, and the bench wrote, during the window.
    records_read: u64,
    records_written: u64,
    /// The whole host's CPUs busy over the window (everything but idle and iowait), in cores.
    host_busy_cores: f64,
}

impl Window {
    fn percent(&self, ns: u64) -> f64 {
        ns as f64 / self.wall.as_nanos() as f64 * 100.0
    }
}

/// Measures `on` and `off` over `length`, writing `per_second` unrelated records meanwhile.
fn window(
    on: &Instance,
    off: &Instance,
    length: Duration,
    per_second: u32,
    patterns: &Patterns,
) -> Result<Window> {
    let threads = on.hardware_threads()?;
    ensure!(
        threads.len() == THREADS.len(),
        "the hardware monitor's threads are {threads:?}, expected {THREADS:?}"
    );
    let mut kmsg = KmsgWriter::new();
    let records_before = on.kmsg_records()?;
    let thread_ns = |inst: &Instance| -> Result<BTreeMap<String, u64>> {
        threads.iter().map(|(name, &tid)| Ok((name.clone(), inst.thread_ns(tid)?))).collect()
    };
    let start = Instant::now();
    let host_before = host_cpu()?;
    let (t_before, on_before, off_before) = (thread_ns(on)?, on.cgroup.usage_ns()?, off.cgroup.usage_ns()?);
    if per_second == 0 {
        std::thread::sleep(length);
    } else {
        let every = Duration::from_secs(1) / per_second;
        let mut i = 0u64;
        while start.elapsed() < length {
            let line = chatter_line(i);
            ensure!(patterns.find(&line).is_none(), "the chatter line matches a pattern");
            kmsg.write(&line)?;
            i += 1;
            if let Some(wait) = (every * i as u32).checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let (t_after, on_after, off_after) = (thread_ns(on)?, on.cgroup.usage_ns()?, off.cgroup.usage_ns()?);
    let host_after = host_cpu()?;
    let wall = start.elapsed();
    // The records are read as they come; wait for the last (a condition, not a time).
    let records_read = wait_for("Vigil to read the records written", WAIT, || {
        let n = on.kmsg_records().ok()?.saturating_sub(records_before);
        (n >= kmsg.written).then_some(n)
    });
    let threads = t_after.iter().map(|(name, after)| (name.clone(), after - t_before[name])).collect();
    Ok(Window {
        wall,
        threads,
        enabled_ns: on_after - on_before,
        disabled_ns: off_after - off_before,
        records_read,
        records_written: kmsg.written,
        host_busy_cores: busy_cores(host_before, host_after),
    })
}

/// The host's CPU time from `/proc/stat`: (busy, total) in clock ticks, and the number of CPUs.
fn host_cpu() -> Result<(u64, u64, usize)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut lines = text.lines();
    let all: Vec<u64> = lines
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = all.iter().sum();
    let idle = all.get(3).copied().unwrap_or(0) + all.get(4).copied().unwrap_or(0);
    let cpus = lines.filter(|l| l.starts_with("cpu")).count();
    Ok((total - idle, total, cpus))
}

/// Cores busy on average between two [`host_cpu`] readings.
fn busy_cores(before: (u64, u64, usize), after: (u64, u64, usize)) -> f64 {
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64 * after.2 as f64
}

fn cost(plan: &Plan, patterns: &Patterns) -> Result<(Window, Window)> {
    let scratch = Scratch::new("bench-hw-cost");
    let base = free_ports(2);
    let (parent_on, parent_off) = (CgroupParent::new("bench-hw-on"), CgroupParent::new("bench-hw-off"));
    let cfg_on = config(&scratch, "hw-on", base, &parent_on, "{ enabled: true, kmsg_backlog: false }", "[]");
    let cfg_off = config(&scratch, "hw-off", base + 1, &parent_off, "{ enabled: false }", "[]");
    let on = Instance::start(&scratch, "hw-on", &cfg_on, base, parent_on)?;
    let off = Instance::start(&scratch, "hw-off", &cfg_off, base + 1, parent_off)?;
    // The monitor is up once its report lists the sysfs sources of its first poll.
    wait_for("the first sysfs poll", WAIT, || {
        let r = on.vigil.client.call("GET", "/api/v1/hardware").ok()?;
        (r["sources"].as_array()?.len() > 1).then_some(())
    });
    std::thread::sleep(plan.settle);
    eprintln!("idle window: {:?}", plan.idle);
    let idle = window(&on, &off, plan.idle, 0, patterns)?;
    eprintln!("stream window: {:?} at {STREAM_PER_SECOND} records/s", plan.stream);
    let stream = window(&on, &off, plan.stream, STREAM_PER_SECOND, patterns)?;
    for inst in [&on, &off] {
        if !std::fs::read_to_string(format!("/proc/{}/comm", inst.pid())).is_ok_and(|c| c.trim() == "vigil") {
            bail!("process {} is not Vigil any more", inst.pid());
        }
    }
    Ok((idle, stream))
}

fn row_latency(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let max = *samples.last().unwrap_or(&Duration::ZERO);
    println!(
        "| {what} | {:.1} ms | {:.1} ms | {:.1} ms | ≤ {} ms | {:.3} |",
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.9)),
        ms(max),
        GOAL_LATENCY.as_millis(),
        max.as_secs_f64() / GOAL_LATENCY.as_secs_f64()
    );
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = Plan::new(quick);
    ensure!(rustix::process::geteuid().is_root(), "the hardware bench needs root (it writes to /dev/kmsg)");
    let patterns = Patterns::load(&[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let began = Instant::now();

    eprintln!("latency: {} repetitions", plan.repetitions);
    let mut l = latency(&plan, &patterns)?;
    let (idle, stream) = cost(&plan, &patterns)?;

    println!();
    println!(
        "hardware bench{}: {} repetitions, {:.0} s idle, {:.0} s of {STREAM_PER_SECOND} records/s, took {:.0} s",
        if quick { " (quick)" } else { "" },
        plan.repetitions,
        idle.wall.as_secs_f64(),
        stream.wall.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    println!(
        "the host's CPUs were busy {:.2} cores on average during the repetitions, {:.2} during the idle \
         window, {:.2} during the stream (everything, Vigil and the bench included)",
        l.host_busy_cores, idle.host_busy_cores, stream.host_busy_cores
    );
    println!();
    println!("| from the write to /dev/kmsg to | median | p90 | max | goal | ratio (max / goal) |");
    println!("|---|---|---|---|---|---|");
    row_latency("a plain reader of /dev/kmsg (a thread of the bench) has the record", &mut l.reader);
    row_latency("the hardware API shows the device", &mut l.api);
    row_latency("the run is recorded (`created_ms`)", &mut l.created);
    row_latency("its first step began (`started_ms`)", &mut l.step_started);
    row_latency("the step's command ran (`date +%s%N`)", &mut l.command_ran);
    l.api_request.sort();
    println!(
        "\n(the hardware API was polled with 1 ms between requests; the request that first showed the device took a median {:.1} ms)",
        ms(percentile(&l.api_request, 0.5))
    );
    println!();

    let idle_threads: u64 = idle.threads.values().sum();
    let per_thread = |w: &Window| {
        w.threads.iter().map(|(n, ns)| format!("{n} {:.4} %", w.percent(*ns))).collect::<Vec<_>>()
    };
    println!("| cost of watching | measured | goal | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| idle, the monitor's threads ({}; {} records read) | {:.4} % of a core | ≤ {GOAL_CPU_PERCENT} % | {:.3} |",
        per_thread(&idle).join(", "),
        idle.records_read,
        idle.percent(idle_threads),
        idle.percent(idle_threads) / GOAL_CPU_PERCENT
    );
    let diff = idle.percent(idle.enabled_ns) - idle.percent(idle.disabled_ns);
    println!(
        "| idle, whole process: hardware on vs off (same window) | {:.3} % vs {:.3} % = {diff:+.3} % | ≤ {GOAL_CPU_PERCENT} % | {:.2} |",
        idle.percent(idle.enabled_ns),
        idle.percent(idle.disabled_ns),
        diff / GOAL_CPU_PERCENT
    );
    let stream_threads: u64 = stream.threads.values().sum();
    println!(
        "| {STREAM_PER_SECOND} unrelated records/s ({} read, {} written), the monitor's threads | {:.4} % of a core | reported | — |",
        stream.records_read,
        stream.records_written,
        stream.percent(stream_threads),
    );
    // Per record: what the stream window cost beyond the idle window's rate, over the records read.
    let records = stream.records_read.max(1) as f64;
    let extra = |stream_ns: u64, idle_ns: u64| {
        let idle_rate = idle_ns as f64 / idle.wall.as_nanos() as f64;
        (stream_ns as f64 - idle_rate * stream.wall.as_nanos() as f64) / records / 1000.0
    };
    let kmsg = |w: &Window| w.threads.get("vigil-kmsg").copied().unwrap_or(0);
    let process_on = extra(stream.enabled_ns, idle.enabled_ns);
    let process_off = extra(stream.disabled_ns, idle.disabled_ns);
    println!(
        "| per record, beyond the idle rate: the kmsg thread; whole process on minus off | {:.1} µs; {:.1} − {:.1} = {:.1} µs | reported | — |",
        extra(kmsg(&stream), kmsg(&idle)),
        process_on,
        process_off,
        process_on - process_off
    );
    Ok(())
}
