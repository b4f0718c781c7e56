//! Probe cost: the same workloads with Vigil's probes detached and attached, alternating, in one run.
//! Prints the slowdown of each workload as a ratio (target ≤ 1.03).
//!
//! Workloads: touch 1 GiB of fresh anonymous memory (262,144 minor faults), and a context-switch-heavy
//! ping-pong of two threads over a pipe. Run: `cargo bench -p vigil-collector --bench probe_cost` (root).

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
}
