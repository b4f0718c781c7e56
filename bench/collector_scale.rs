//! Collector cost at scale: 1,000 cgroups watched at the default 1 s tick. Prints the collector's resident
//! memory and CPU use against the targets (≤ 50 MB RSS, ≤ 1 % of one core) as ratios.
//!
//! Run: `cargo bench -p vigil-collector --bench collector_scale` (root). The collector runs in this process,
//! so the figures are the process's own (`/proc/self`), which holds nothing else of size.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vigil_collector::Collector;
use vigil_collector::cgroupfs::Layout;
use vigil_collector::config::CollectorConfig;
use vigil_collector::discovery::WatchConfig;

const CGROUPS: usize = 1000;
const MEASURE: Duration = Duration::from_secs(30);

struct Tree(PathBuf, usize);

impl Drop for Tree {
    fn drop(&mut self) {
        for i in 0..self.1 {
            let _ = std::fs::remove_dir(self.0.join(format!("cg-{i}")));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn cpu_seconds() -> f64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = text.rfind(')').map(|i| &text[i + 2..]).unwrap_or("");
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ
}

fn rss_mb() -> f64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let layout = Layout::detect()?;
    let rel = format!("/vigil-bench-{}", std::process::id());
    let root = layout.v2_dir(&rel);
    std::fs::create_dir(&root)?;
    let mut tree = Tree(root.clone(), 0);
    for i in 0..CGROUPS {
        std::fs::create_dir(root.join(format!("cg-{i}")))?;
        tree.1 = i + 1;
    }
    let config = CollectorConfig {
        watch: WatchConfig { include: vec![rel.clone()], ..WatchConfig::default() },
        ..CollectorConfig::default()
    };
    let collector = Collector::start(&config)?;
    std::thread::sleep(Duration::from_secs(5));
    let seen = collector.snapshots().borrow().instances.len();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    std::thread::sleep(MEASURE);
    let cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let rss = rss_mb();
    println!("collector with {CGROUPS} cgroups ({seen} instances exported), {}s measured", MEASURE.as_secs());
    println!("  RSS {rss:.1} MB       ratio to 50 MB target {:.3} (target <= 1)", rss / 50.0);
    println!("  CPU {:.3}% of a core ratio to 1% target  {:.3} (target <= 1)", cpu * 100.0, cpu * 100.0);
    collector.stop();
    drop(tree);
    Ok(())
}
