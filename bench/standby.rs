//! Standby cost and benefit (issue 3 item 8): one Python service per size holding N MiB of random data is
//! put into its own cgroups through the healer's cgroup driver, hibernated and woken with the healer's
//! `standby` functions, and compared with the alternatives, all in one run. Prints one line per size and
//! metric with the measured value, the target and the ratio.
//!
//! Per size:
//! - cold start: spawn → the service fills its memory, sleeps `VIGIL_BENCH_COLD_START_S` (default 20 s) as
//!   a slow initialisation, listens → its first request is served;
//! - footprint: memory cgroup usage (`CgroupDriver::memory_usage`) active vs hibernated;
//! - wake: from calling `standby::wake` until the first request is answered. A request returns the SHA-256
//!   of all the data, so it touches every page and "served" includes bringing all of them back;
//! - prefetch throughput: after another hibernate, bytes read from the swapfile's block device
//!   (`/sys/dev/block/M:m/stat`, counted on completion) from calling `wake` until 95 % of the paged-out
//!   bytes have been read, with no request running; compared with a sequential read of a fresh file of
//!   the same size on the same filesystem, written right after that hibernate's pageout (so both are as
//!   fresh in a virtual disk's host cache) and read with the page cache dropped first;
//! - lazy: after a third hibernate, only lift the CPU limit and thaw (no prefetch) and time the same first
//!   request, which then faults every page in.
//!
//! Caches are dropped (`/proc/sys/vm/drop_caches`) before each cold measurement. The swapfile (2 × the
//! largest size + 1 GiB, under /var/tmp), the read-rate file, the cgroups (under `/vigil-bench-<pid>` in
//! every hierarchy, never a running Vigil's) and the services are removed at the end by `Drop`, also on
//! an error or a panic.
//!
//! Run: `cargo bench -p vigil-healer --bench standby` (root). Sizes: `VIGIL_BENCH_SIZES_MIB`, default
//! `256,1024,4096`.

#[path = "../collector/tests/support/swap.rs"]
mod swap;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use swap::Swapfile;

use anyhow::{Context, Result, bail, ensure};
use vigil_cgroup::fs::Layout;
use vigil_healer::cgroup::{
    CgroupDriver, CgroupDriverError, CpuLimit, DriverConfig, InstanceCgroup, driver_for,
};
use vigil_healer::standby::{self, StandbyPolicy};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Generous bound on any one request, so a stuck service fails the run instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The service: `argv[1]` MiB of random bytes in a private anonymous mapping, then `argv[2]` seconds of
/// "initialisation", then a TCP server on 127.0.0.1 whose every request line is answered with the SHA-256
/// of all the data. Prints `fill <seconds>` and `port <n>` on stdout.
const SERVICE: &str = "\
import hashlib, mmap, os, socket, sys, time
n = int(sys.argv[1]) << 20
delay = float(sys.argv[2])
t = time.monotonic()
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, n, 1 << 24):
    m[off:off + (1 << 24)] = os.urandom(min(1 << 24, n - off))
print('fill', time.monotonic() - t)
time.sleep(delay)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 0))
s.listen(8)
print('port', s.getsockname()[1])
while True:
    c, _ = s.accept()
    f = c.makefile('rwb')
    while f.readline():
        f.write(hashlib.sha256(m).hexdigest().encode() + b'\\n')
        f.flush()
    f.close()
    c.close()
";

fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().with_context(|| format!("run `{cmd}`"))?;
    ensure!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn drop_caches() -> Result<()> {
    // Dirty pages first, so drop_caches can drop them too.
    sh("sync")?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("write /proc/sys/vm/drop_caches")
}

/// A file of incompressible bytes next to the swapfile, for the disk's sequential read rate.
struct ReadFile(PathBuf);

impl ReadFile {
    fn new(mib: u64) -> Result<ReadFile> {
        let file = ReadFile(PathBuf::from(format!("/var/tmp/vigil-bench-read-{}", std::process::id())));
        let mut out = File::create(&file.0).with_context(|| format!("create {}", file.0.display()))?;
        // xorshift: cheap, and no two blocks alike, so neither the filesystem nor the host can shortcut it.
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
        let mut block = vec![0u8; 16 << 20];
        for _ in 0..mib.div_ceil(16) {
            for word in block.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            out.write_all(&block)?;
        }
        out.sync_all()?;
        Ok(file)
    }

    /// Bytes per second reading the first `mib` MiB sequentially from disk (page cache dropped first).
    fn read_rate(&self, mib: u64) -> Result<f64> {
        drop_caches()?;
        let mut f = File::open(&self.0)?;
        let mut buf = vec![0u8; 8 << 20];
        let want = mib * MIB;
        let mut done = 0u64;
        let started = Instant::now();
        while done < want {
            let n = f.read(&mut buf)?;
            ensure!(n > 0, "{} is shorter than {mib} MiB", self.0.display());
            done += n as u64;
        }
        Ok(done as f64 / started.elapsed().as_secs_f64())
    }
}

impl Drop for ReadFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bytes read so far from the block device holding `path` (`/sys/dev/block/M:m/stat`, third field,
/// counted as requests complete).
struct DiskReads(PathBuf);

impl DiskReads {
    fn for_path(path: &std::path::Path) -> Result<DiskReads> {
        let dev = std::fs::metadata(path)?.dev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let stat = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat"));
        ensure!(stat.exists(), "no block device statistics at {} for {}", stat.display(), path.display());
        Ok(DiskReads(stat))
    }

    fn bytes(&self) -> Result<u64> {
        let text = std::fs::read_to_string(&self.0)?;
        let sectors: u64 = text
            .split_ascii_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("sectors read in {}", self.0.display()))?;
        Ok(sectors * 512)
    }
}

/// The real interpreter, not a version-manager shim that would fork helpers inside the cgroup.
fn python_executable() -> Result<String> {
    let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output()?;
    ensure!(out.status.success(), "python3 not found");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The bench's cgroup parents (`/vigil-bench-<pid>` in the v2 tree and each v1 hierarchy); `Drop` removes
/// them once the instances are gone.
struct BenchParents(Vec<PathBuf>);

impl Drop for BenchParents {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// One service process in its instance cgroups. `Drop` thaws and kills it and removes the cgroups.
struct Service<'d> {
    driver: &'d dyn CgroupDriver,
    cg: InstanceCgroup,
    child: Child,
    /// Kept open: the shell waits on it for the go-ahead, and the service must not see EOF on it.
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
    fill_seconds: f64,
}

impl<'d> Service<'d> {
    /// Spawns the service in `cg`: the shell waits until the driver has moved it into the cgroups, then
    /// execs, so everything the service allocates is charged to the instance.
    fn spawn(
        driver: &'d dyn CgroupDriver,
        cg: InstanceCgroup,
        python: &str,
        mib: u64,
        delay_s: f64,
    ) -> Result<Service<'d>> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("read _ && exec \"$0\" -u -c \"$1\" \"$2\" \"$3\"")
            .arg(python)
            .arg(SERVICE)
            .arg(mib.to_string())
            .arg(delay_s.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn service")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("service without pipes");
        };
        let mut service =
            Service { driver, cg, child, stdin, stdout: BufReader::new(stdout), port: 0, fill_seconds: 0.0 };
        driver.add_process(&service.cg, service.child.id())?;
        service.stdin.write_all(b"go\n")?;
        service.stdin.flush()?;
        service.fill_seconds = service.expect_line("fill")?;
        service.port = service.expect_line("port")? as u16;
        Ok(service)
    }

    fn expect_line(&mut self, key: &str) -> Result<f64> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let value =
            line.trim().strip_prefix(key).map(str::trim).with_context(|| {
                format!("service said {:?}, expected {key:?} (did it exit?)", line.trim())
            })?;
        value.parse().with_context(|| format!("{key} value {value:?}"))
    }

    /// One request on a fresh connection; returns the digest.
    fn request(&self) -> Result<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        conn.write_all(b"sum\n")?;
        let mut answer = String::new();
        BufReader::new(conn).read_line(&mut answer)?;
        let digest = answer.trim().to_string();
        ensure!(digest.len() == 64, "bad answer {answer:?}");
        Ok(digest)
    }

    fn usage(&self) -> Result<u64> {
        Ok(self.driver.memory_usage(&self.cg)?)
    }
}

impl Drop for Service<'_> {
    fn drop(&mut self) {
        // Thawed first: a frozen process cannot die.
        let _ = self.driver.set_frozen(&self.cg, false);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.driver.remove(&self.cg) {
                Ok(()) => break,
                Err(CgroupDriverError::NotEmpty { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    eprintln!("cannot remove bench cgroups: {e}");
                    break;
                }
            }
        }
    }
}

fn report(mib: u64, metric: &str, measured: &str, target: &str, ratio: f64, met: bool) {
    println!(
        "{mib:>5} MiB  {metric:<38} {measured:<50} target {target:<10} ratio {ratio:>7.3} ({})",
        if met { "met" } else { "missed" }
    );
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T> {
    match std::env::var(key) {
        Ok(v) => v.trim().parse().ok().with_context(|| format!("{key}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

fn hibernate(svc: &Service<'_>, policy: &StandbyPolicy) -> Result<standby::HibernateReport> {
    let hib = standby::hibernate(svc.driver, &svc.cg, policy)?;
    ensure!(!hib.memory_kept_resident, "hibernate kept memory resident: {}", hib.message);
    Ok(hib)
}

fn bench_size(
    driver: &dyn CgroupDriver,
    python: &str,
    mib: u64,
    cold_start_s: f64,
    disk: &DiskReads,
) -> Result<()> {
    let size_started = Instant::now();
    let gib = (mib * MIB) as f64 / GIB;
    let cg = driver.create("standby", &format!("{mib}m"))?;
    let policy = StandbyPolicy::default();

    // Cold start: spawn until the first request is served.
    let started = Instant::now();
    let svc = Service::spawn(driver, cg, python, mib, cold_start_s)?;
    let digest = svc.request()?;
    let cold = started.elapsed().as_secs_f64();
    let started = Instant::now();
    ensure!(svc.request()? == digest, "digest changed between two warm requests");
    let warm = started.elapsed().as_secs_f64();

    // Footprint.
    let active = svc.usage()?;
    let hib = hibernate(&svc, &policy)?;
    let standby_usage = svc.usage()?;
    let paged = hib.working_set.resident_bytes();
    let footprint = standby_usage as f64 / active as f64;
    report(
        mib,
        "standby footprint / active",
        &format!("{:.1} MiB / {:.1} MiB", standby_usage as f64 / MIB as f64, active as f64 / MIB as f64),
        "<= 0.10",
        footprint,
        footprint <= 0.10,
    );

    // Wake until the first request is served.
    drop_caches()?;
    let started = Instant::now();
    let woke = standby::wake(driver, &svc.cg, &hib.working_set)?;
    ensure!(svc.request()? == digest, "data changed across hibernate and wake");
    let wake = started.elapsed().as_secs_f64();
    let wake_per_gib = wake / gib;
    report(
        mib,
        "wake until first request served",
        &format!("{wake:.3} s = {wake_per_gib:.3} s/GiB (wake call {:.3} s)", woke.seconds),
        "<= 1 s/GiB",
        wake_per_gib,
        wake_per_gib <= 1.0,
    );

    // Prefetch throughput vs the disk's sequential read rate, one right after the other.
    // The file is written right after the pageout wrote the swap, so both are equally fresh: on a virtual
    // disk the host's cache makes recently written data read faster than old data.
    let hib = hibernate(&svc, &policy)?;
    let read_file = ReadFile::new(mib)?;
    let disk_rate = read_file.read_rate(mib)?;
    drop(read_file);
    drop_caches()?;
    let reads_before = disk.bytes()?;
    let want = hib.working_set.resident_bytes() * 95 / 100;
    let started = Instant::now();
    let woke = standby::wake(driver, &svc.cg, &hib.working_set)?;
    let threads = woke.prefetch.as_ref().map_or(0, |p| p.threads);
    loop {
        let read = disk.bytes()?.saturating_sub(reads_before);
        if read >= want {
            break;
        }
        ensure!(
            started.elapsed() < REQUEST_TIMEOUT,
            "prefetch read only {read} of {want} bytes in {REQUEST_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let landed = started.elapsed().as_secs_f64();
    let prefetch_rate = want as f64 / landed;
    let started = Instant::now();
    ensure!(svc.request()? == digest, "data changed across hibernate and wake");
    let after_prefetch = started.elapsed().as_secs_f64();
    let rate_ratio = prefetch_rate / disk_rate;
    report(
        mib,
        "prefetch throughput / disk seq. read",
        &format!("{:.0} MB/s / {:.0} MB/s ({threads} threads)", prefetch_rate / 1e6, disk_rate / 1e6),
        ">= 0.8",
        rate_ratio,
        rate_ratio >= 0.8,
    );

    // Lazy: CPU back and thawed, no prefetch; the first request faults every page in.
    let _ = hibernate(&svc, &policy)?;
    drop_caches()?;
    let started = Instant::now();
    driver.set_cpu(&svc.cg, &CpuLimit::unlimited())?;
    driver.set_frozen(&svc.cg, false)?;
    ensure!(svc.request()? == digest, "data changed across hibernate and a lazy wake");
    let lazy = started.elapsed().as_secs_f64();
    let lazy_ratio = lazy / wake;
    report(
        mib,
        "lazy faulting / prefetch wake",
        &format!("{lazy:.3} s / {wake:.3} s"),
        ">= 3",
        lazy_ratio,
        lazy_ratio >= 3.0,
    );

    let cold_ratio = cold / wake;
    report(
        mib,
        "cold start / prefetch wake",
        &format!("{cold:.3} s / {wake:.3} s (fill {:.1} s, init {cold_start_s} s)", svc.fill_seconds),
        ">= 20",
        cold_ratio,
        cold_ratio >= 20.0,
    );
    println!(
        "{mib:>5} MiB  notes: {:.0} MiB paged out; warm request {warm:.3} s; request right after the prefetch \
         landed {after_prefetch:.3} s; this size took {:.1} s",
        paged as f64 / MIB as f64,
        size_started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    ensure!(status.lines().any(|l| l.starts_with("Uid:\t0\t")), "the standby bench needs root");
    let sizes: Vec<u64> = std::env::var("VIGIL_BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
        .collect::<Option<_>>()
        .context("VIGIL_BENCH_SIZES_MIB must be a comma-separated list of MiB counts")?;
    let cold_start_s: f64 = env_or("VIGIL_BENCH_COLD_START_S", 20.0)?;
    ensure!(cold_start_s.is_finite() && cold_start_s >= 0.0, "VIGIL_BENCH_COLD_START_S must be >= 0");
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let python = python_executable()?;

    let setup = Instant::now();
    let swap = Swapfile::new("bench", 2 * largest + 1024);
    let disk = DiskReads::for_path(&swap.0)?;

    let layout = Layout::detect()?;
    let parent = format!("/vigil-bench-{}", std::process::id());
    let config = DriverConfig { v2_parent: parent.clone(), v1_parent: Some(parent.clone()) };
    let driver = driver_for(&layout, &config)?;
    let mut parents = vec![layout.v2_root.join(parent.trim_start_matches('/'))];
    if let Some(v1) = layout.v1.as_ref() {
        for mount in [v1.memory.as_ref(), v1.cpu.as_ref(), v1.cpuset.as_ref()].into_iter().flatten() {
            parents.push(mount.join(parent.trim_start_matches('/')));
        }
    }
    let _parents = BenchParents(parents);
    println!(
        "standby bench: sizes {sizes:?} MiB, cold start with a {cold_start_s} s initialisation, swapfile {} MiB; \
         setup {:.1} s",
        2 * largest + 1024,
        setup.elapsed().as_secs_f64()
    );
    for &mib in &sizes {
        bench_size(driver.as_ref(), &python, mib, cold_start_s, &disk)?;
    }
    Ok(())
}
