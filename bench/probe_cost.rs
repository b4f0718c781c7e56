//! Probe cost: the same workloads with Vigil's probes detached and attached, alternating, in one run.
//! Prints the slowdown of each workload as a ratio (target ≤ 1.03).
//!
//! Workloads:
//! - touch 1 GiB of fresh anonymous memory (262,144 minor faults);
//! - a swap-in pass: this process joins a memory cgroup limited to 256 MiB (with a swapfile made for the run),
//!   writes 768 MiB, then reads it all back, and the read pass (swap-ins and major faults) is timed;
//! - a context-switch-heavy ping-pong of two threads over a socket pair.
//!
//! Run: `cargo bench -p vigil-collector --bench probe_cost` (root).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vigil_collector::probes::Probes;

const ROUNDS: usize = 5;

fn touch_1gib() -> Duration {
    let start = Instant::now();
    let mut v: Vec<u8> = Vec::with_capacity(1 << 30);
    // One byte per 4 KiB page of a fresh mapping: every write is a minor fault. `black_box` keeps the
    // otherwise unread writes from being optimised away.
    let spare = v.spare_capacity_mut();
    for i in (0..spare.len()).step_by(4096) {
        std::hint::black_box(&mut spare[i]).write(1);
    }
    std::hint::black_box(&mut v);
    let elapsed = start.elapsed();
    drop(v);
    elapsed
}

fn ping_pong(rounds: usize) -> Duration {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let start = Instant::now();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 1];
        for _ in 0..rounds {
            if b.read_exact(&mut buf).is_err() || b.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let mut buf = [1u8; 1];
    for _ in 0..rounds {
        a.write_all(&buf).expect("write");
        a.read_exact(&mut buf).expect("read");
    }
    let _ = t.join();
    start.elapsed()
}

/// A swapfile and a memory cgroup holding this process, for the run; `Drop` undoes both.
struct SwapSetup {
    swapfile: std::path::PathBuf,
    cgroup: std::path::PathBuf,
    home: std::path::PathBuf,
}

fn sh(cmd: &str) {
    let ok =
        std::process::Command::new("sh").arg("-c").arg(cmd).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "`{cmd}` failed");
}

impl SwapSetup {
    fn new() -> SwapSetup {
        let pid = std::process::id();
        let swapfile = std::path::PathBuf::from(format!("/var/tmp/vigil-bench-swap-{pid}"));
        sh(&format!(
            "dd if=/dev/zero of={0} bs=1M count=2048 status=none && chmod 600 {0} && mkswap -q {0} && swapon {0}",
            swapfile.display()
        ));
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .unwrap_or_else(|| "/".into());
        let home = std::path::PathBuf::from("/sys/fs/cgroup/memory").join(own.trim_start_matches('/'));
        let cgroup = home.join(format!("vigil-bench-{pid}"));
        std::fs::create_dir(&cgroup).expect("create memory cgroup (v1 memory controller needed)");
        std::fs::write(cgroup.join("memory.limit_in_bytes"), (256u64 << 20).to_string()).expect("limit");
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).expect("join memory cgroup");
        SwapSetup { swapfile, cgroup, home }
    }
}

impl Drop for SwapSetup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::process::Command::new("swapoff").arg(&self.swapfile).status();
        let _ = std::fs::remove_file(&self.swapfile);
    }
}

fn swap_in_pass() -> Duration {
    const LEN: usize = 768 << 20;
    let mut v = vec![0u8; LEN];
    for i in (0..LEN).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&mut v);
    let start = Instant::now();
    let mut sum = 0u64;
    for i in (0..LEN).step_by(4096) {
        sum += u64::from(std::hint::black_box(&v)[i]);
    }
    std::hint::black_box(sum);
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn measure(name: &str, f: impl Fn() -> Duration) {
    let mut off = Vec::new();
    let mut on = Vec::new();
    f(); // warm up allocator and caches
    for _ in 0..ROUNDS {
        off.push(f());
        let probes = Probes::load().expect("load probes (run as root)");
        on.push(f());
        drop(probes);
    }
    let (off, on) = (median(off), median(on));
    println!(
        "{name:<28} detached {:>9.3} ms  attached {:>9.3} ms  ratio {:.4} (target <= 1.03)",
        off.as_secs_f64() * 1e3,
        on.as_secs_f64() * 1e3,
        on.as_secs_f64() / off.as_secs_f64()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("probe cost, median of {ROUNDS} alternating rounds");
    measure("touch 1 GiB (minor faults)", touch_1gib);
    measure("ping-pong 200k (ctx switch)", || ping_pong(200_000));
    let swap = SwapSetup::new();
    measure("swap-in pass, 768 MiB", swap_in_pass);
    drop(swap);
}
