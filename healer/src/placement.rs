//! Where instances run, as the kernel sees it, and what workflows put off limits.
//!
//! - [`Cordoned`]: the CPUs and block devices cordoned by workflows. Instances started, restored or woken
//!   afterwards get every online CPU but the cordoned ones (instead of no cpuset restriction), and
//!   `evacuate` moves running ones off them; an instance starting takes the first of its service's
//!   `data_dirs` that is not on a cordoned device ([`choose_data_dir`]).
//! - [`Held`]: instances a workflow's `drain` took out of routing: the broker treats them as not ready
//!   while the run that drained them holds them (it is unfinished or its cordon is in force).
//! - [`on_cpu`] and [`on_device`]: the instances placed on a resource. A CPU: its cgroup's cpuset allows it
//!   (no cpuset: every CPU). A block device: one of its processes has its working directory, or a file
//!   open, on the device (or on a partition of it), or has the device node itself open.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use vigil_cgroup::driver::{CgroupDriver, CpuLimit, InstanceCgroup};
use vigil_core::values::{format_cpu_list, parse_cpu_list};

/// Where the kernel lists CPUs and their `online` switches.
pub const CPU_DIR: &str = "/sys/devices/system/cpu";

/// Block devices by name (`loop3`), each with the `major:minor` numbers of the disk and its partitions.
pub type DeviceNumbers = BTreeMap<String, BTreeSet<(u32, u32)>>;

/// The CPUs and devices no new, restored or woken instance may use. Cheap to clone; clones share the sets.
#[derive(Clone, Debug, Default)]
pub struct Cordoned {
    cpus: Arc<RwLock<BTreeSet<u32>>>,
    devices: Arc<RwLock<DeviceNumbers>>,
    dir: Arc<OnceLock<PathBuf>>,
}

impl Cordoned {
    /// Reading the online CPUs under `dir` instead of [`CPU_DIR`] (tests).
    pub fn with_dir(dir: PathBuf) -> Cordoned {
        let a = Cordoned::default();
        let _ = a.dir.set(dir);
        a
    }

    fn dir(&self) -> &Path {
        self.dir.get().map_or(Path::new(CPU_DIR), PathBuf::as_path)
    }

    /// Replaces the CPUs; answers whether they changed.
    pub fn set(&self, cpus: BTreeSet<u32>) -> bool {
        replace(&self.cpus, cpus)
    }

    pub fn get(&self) -> BTreeSet<u32> {
        self.cpus.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// Replaces the devices; answers whether they changed.
    pub fn set_devices(&self, devices: DeviceNumbers) -> bool {
        replace(&self.devices, devices)
    }

    pub fn devices(&self) -> DeviceNumbers {
        self.devices.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Takes the cordoned `resources` (`cpuN`, or a block device's name) as they are now, with each
    /// device's numbers read under `sys`; logs what changed.
    pub fn set_from<'a>(&self, resources: impl IntoIterator<Item = &'a str>, sys: &Path) {
        let (mut cpus, mut devices) = (BTreeSet::new(), DeviceNumbers::new());
        for r in resources {
            match cpu_number(r) {
                Some(c) => {
                    cpus.insert(c);
                }
                None => {
                    devices.insert(r.to_string(), block_dev_numbers(sys, r));
                }
            }
        }
        if self.set(cpus.clone()) {
            let list = format_cpu_list(&cpus.iter().copied().collect::<Vec<_>>());
            tracing::info!(cpus = %list, "cordoned CPUs changed: instances started or woken from now on avoid them");
        }
        let names: Vec<&str> = devices.keys().map(String::as_str).collect();
        let names = names.join(",");
        if self.set_devices(devices) {
            tracing::info!(devices = %names, "cordoned devices changed: instances started from now on keep their data off them");
        }
    }

    /// The CPU limit of an active instance: none, or (while CPUs are avoided) every online CPU but those.
    /// When that would leave no CPU, the avoided ones are allowed again: an instance must run somewhere.
    pub fn active_limit(&self) -> CpuLimit {
        let avoid = self.get();
        if avoid.is_empty() {
            return CpuLimit::unlimited();
        }
        match online_cpus(self.dir()) {
            Ok(online) => {
                let allowed: Vec<u32> = online.difference(&avoid).copied().collect();
                if allowed.is_empty() {
                    tracing::warn!(avoided = %format_cpu_list(&avoid.iter().copied().collect::<Vec<_>>()),
                        "every online CPU is cordoned; instances keep all of them");
                    return CpuLimit::unlimited();
                }
                CpuLimit { cpus: Some(format_cpu_list(&allowed)), quota: None }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the online CPUs; instances keep all of them");
                CpuLimit::unlimited()
            }
        }
    }
}

fn replace<T: PartialEq>(slot: &RwLock<T>, value: T) -> bool {
    let mut held = slot.write().unwrap_or_else(|e| e.into_inner());
    let changed = *held != value;
    *held = value;
    changed
}

/// The data directory of instance `instance_id` (`{instance_id}` in an entry is replaced): the one it
/// used last (`previous`) while that is still one of `dirs` and usable, so that it stays with its data;
/// else the first of `dirs` that exists or can be created and whose filesystem is not on one of the
/// `cordoned` devices. `None` for a service without data directories; an error naming why each entry was
/// passed over when none is left.
pub fn choose_data_dir(
    dirs: &[String],
    instance_id: &str,
    cordoned: &DeviceNumbers,
    previous: Option<&str>,
) -> Result<Option<String>, String> {
    if dirs.is_empty() {
        return Ok(None);
    }
    let filled: Vec<String> = dirs.iter().map(|d| d.replace(INSTANCE_PLACEHOLDER, instance_id)).collect();
    let first = previous.filter(|p| filled.iter().any(|d| d == p)).map(str::to_string);
    let order = first.iter().chain(filled.iter().filter(|d| Some(*d) != first.as_ref()));
    let mut passed = Vec::new();
    for dir in order {
        let dir = dir.clone();
        let meta = std::fs::create_dir_all(&dir).and_then(|()| std::fs::metadata(&dir));
        match meta {
            Ok(m) if !m.is_dir() => passed.push(format!("{dir} (not a directory)")),
            Ok(m) => match cordoned.iter().find(|(_, n)| n.contains(&split_dev(m.dev()))) {
                Some((device, _)) => passed.push(format!("{dir} (on cordoned {device})")),
                None => return Ok(Some(dir)),
            },
            Err(e) => passed.push(format!("{dir} ({e})")),
        }
    }
    Err(format!("no data directory is usable: {}", passed.join(", ")))
}

/// The data directory each instance last started with, kept in a JSON file (`DATA_DIR/data_dirs.json`)
/// so that an instance stays where its data is, across restarts of Vigil too, until its disk is
/// cordoned. Cheap to clone; clones share the map.
#[derive(Clone, Debug, Default)]
pub struct DataDirs {
    file: Option<PathBuf>,
    by_instance: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
}

impl DataDirs {
    /// The map kept in `file`; a missing file is an empty map, an unreadable one too (said in the log).
    pub fn open(file: PathBuf) -> DataDirs {
        let map = vigil_core::state_file::read_json(&file).map(Option::unwrap_or_default).unwrap_or_else(|e| {
            tracing::warn!(file = %file.display(), error = %e, "unreadable record of the instances' data directories; starting afresh");
            BTreeMap::new()
        });
        DataDirs { file: Some(file), by_instance: Arc::new(std::sync::Mutex::new(map)) }
    }

    pub fn get(&self, instance_id: &str) -> Option<String> {
        self.by_instance.lock().ok()?.get(instance_id).cloned()
    }

    /// Records where `instance_id` started; written through (a temporary file, renamed) when it changed.
    pub fn set(&self, instance_id: &str, dir: &str) -> Result<(), String> {
        let mut map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(instance_id).is_some_and(|d| d == dir) {
            return Ok(());
        }
        map.insert(instance_id.to_string(), dir.to_string());
        let Some(file) = &self.file else { return Ok(()) };
        vigil_core::state_file::write_json(file, &*map)
            .map_err(|e| format!("recording the data directory in {}: {e}", file.display()))
    }
}

/// Replaced by the instance's id in `data_dirs` entries.
pub const INSTANCE_PLACEHOLDER: &str = "{instance_id}";

/// How many devices the host has, the circuit breaker's denominator: block devices (`SYS/block`, whole
/// disks), online CPUs, network interfaces backed by a device (`SYS/class/net/*/device`) and memory
/// controllers (`SYS/devices/system/edac/mc/mc*`). At least 1.
pub fn host_devices(sys: &Path) -> usize {
    let count = |dir: PathBuf, keep: &dyn Fn(&std::fs::DirEntry) -> bool| {
        std::fs::read_dir(dir).map(|d| d.flatten().filter(|e| keep(e)).count()).unwrap_or(0)
    };
    let disks = count(sys.join("block"), &|_| true);
    let cpus = online_cpus(&sys.join("devices/system/cpu")).map_or(0, |c| c.len());
    let nics = count(sys.join("class/net"), &|e| e.path().join("device").exists());
    let mcs =
        count(sys.join("devices/system/edac/mc"), &|e| e.file_name().to_string_lossy().starts_with("mc"));
    (disks + cpus + nics + mcs).max(1)
}

/// The online CPUs (`DIR/online`, a kernel cpu list).
pub fn online_cpus(dir: &Path) -> Result<BTreeSet<u32>, String> {
    let path = dir.join("online");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_cpu_list(&text).map(|v| v.into_iter().collect()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The CPUs an instance may run on now: its cgroup's cpuset, or every online CPU.
pub fn instance_cpus(
    driver: &dyn CgroupDriver,
    cg: &InstanceCgroup,
    cpu_dir: &Path,
) -> Result<BTreeSet<u32>, String> {
    allowed_cpus(&driver.cpu(cg).map_err(|e| e.to_string())?, cpu_dir)
}

/// The CPUs a limit allows: its cpuset, or every online CPU.
pub fn allowed_cpus(limit: &CpuLimit, cpu_dir: &Path) -> Result<BTreeSet<u32>, String> {
    match &limit.cpus {
        Some(list) => parse_cpu_list(list).map(|v| v.into_iter().collect()).map_err(|e| e.to_string()),
        None => online_cpus(cpu_dir),
    }
}

/// Whether an instance with these CPUs is placed on `cpu`.
pub fn on_cpu(cpus: &BTreeSet<u32>, cpu: u32) -> bool {
    cpus.contains(&cpu)
}

/// `N` of a resource named `cpuN`.
pub fn cpu_number(resource: &str) -> Option<u32> {
    resource
        .strip_prefix("cpu")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// The device numbers (`major:minor`) of block device `name` and of its partitions, from sysfs
/// (`SYS/class/block/NAME/dev`, and `SYS/class/block/NAME/NAMEpN/dev`). Empty when there is no such device.
pub fn block_dev_numbers(sys: &Path, name: &str) -> BTreeSet<(u32, u32)> {
    let mut out = BTreeSet::new();
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return out;
    }
    let dir = sys.join("class/block").join(name);
    let mut read = |p: PathBuf| {
        if let Some(n) = std::fs::read_to_string(p).ok().as_deref().and_then(parse_dev) {
            out.insert(n);
        }
    };
    read(dir.join("dev"));
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(name) {
                read(e.path().join("dev"));
            }
        }
    }
    out
}

fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// `major:minor` of a Linux `dev_t`.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// Whether the file or directory at `path` is on one of `devs` (false when it cannot be read).
pub fn path_on(path: &Path, devs: &BTreeSet<(u32, u32)>) -> bool {
    std::fs::metadata(path).is_ok_and(|m| devs.contains(&split_dev(m.dev())))
}

/// Whether any of `pids` has its working directory, an open file, or the device node itself on one of
/// `devs`, reading `PROC/PID/{cwd,fd/*}`. Processes that exit meanwhile are skipped.
pub fn uses_devices(proc: &Path, pids: &[u32], devs: &BTreeSet<(u32, u32)>) -> bool {
    if devs.is_empty() {
        return false;
    }
    let on = |meta: &std::fs::Metadata| {
        devs.contains(&split_dev(meta.dev()))
            || (std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type())
                && devs.contains(&split_dev(meta.rdev())))
    };
    pids.iter().any(|pid| {
        let dir = proc.join(pid.to_string());
        if std::fs::metadata(dir.join("cwd")).is_ok_and(|m| on(&m)) {
            return true;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else { return false };
        fds.flatten().any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| on(&m)))
    })
}

/// Whether a run still holds what it drained.
type Holding = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// Instances a `drain` took out of routing, each with the run that did. Cheap to clone.
#[derive(Clone, Default)]
pub struct Held {
    by_instance: Arc<RwLock<BTreeMap<String, u64>>>,
    holding: Arc<OnceLock<Holding>>,
}

impl Held {
    /// Sets how to tell whether a run still holds what it drained (once; the workflow runtime's answer).
    pub fn holding_by(&self, f: Holding) {
        let _ = self.holding.set(f);
    }

    pub fn hold(&self, instance_id: &str, run_id: u64) {
        self.by_instance.write().unwrap_or_else(|e| e.into_inner()).insert(instance_id.to_string(), run_id);
    }

    /// Lets `instance_id` go (it was moved off what its run drained it for).
    pub fn release(&self, instance_id: &str) {
        self.by_instance.write().unwrap_or_else(|e| e.into_inner()).remove(instance_id);
    }

    /// Whether `instance_id` is out of routing now. Entries of runs that let go are dropped here.
    pub fn held(&self, instance_id: &str) -> bool {
        let run = self.by_instance.read().ok().and_then(|m| m.get(instance_id).copied());
        let Some(run) = run else { return false };
        let still = self.holding.get().is_none_or(|f| f(run));
        if !still && let Ok(mut m) = self.by_instance.write() {
            m.remove(instance_id);
        }
        still
    }

    /// Every held instance with its run, as recorded (some may have been let go since).
    pub fn all(&self) -> BTreeMap<String, u64> {
        self.by_instance.read().map(|m| m.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_split_like_the_kernels_macros() {
        // makedev(7, 3) and makedev(259, 65536) as glibc builds them.
        let dev = |major: u64, minor: u64| {
            ((major & 0xffff_f000) << 32)
                | ((major & 0xfff) << 8)
                | ((minor & 0xffff_ff00) << 12)
                | (minor & 0xff)
        };
        assert_eq!(split_dev(dev(7, 3)), (7, 3));
        assert_eq!(split_dev(dev(259, 65536)), (259, 65536));
    }

    #[test]
    fn active_limit_leaves_out_avoided_cpus_but_never_all() {
        let dir = std::env::temp_dir().join(format!("vigil-placement-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("online"), "0-3\n").unwrap();
        let a = Cordoned::with_dir(dir.clone());
        assert_eq!(a.active_limit(), CpuLimit::unlimited());
        assert!(a.set(BTreeSet::from([1])));
        assert!(!a.set(BTreeSet::from([1])));
        assert_eq!(a.active_limit().cpus.as_deref(), Some("0,2-3"));
        a.set(BTreeSet::from([0, 1, 2, 3]));
        assert_eq!(a.active_limit(), CpuLimit::unlimited());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_data_dir_on_a_cordoned_device_is_passed_over() {
        let root = std::env::temp_dir().join(format!("vigil-data-dirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dirs = vec![format!("{}/a/{{instance_id}}", root.display()), format!("{}/b", root.display())];
        let first = format!("{}/a/db-0", root.display());
        assert_eq!(choose_data_dir(&dirs, "db-0", &DeviceNumbers::new(), None), Ok(Some(first.clone())));
        // It stays where it was, while that is usable; a directory no longer configured is not used.
        let second = format!("{}/b", root.display());
        assert_eq!(
            choose_data_dir(&dirs, "db-0", &DeviceNumbers::new(), Some(&second)),
            Ok(Some(second.clone()))
        );
        assert_eq!(
            choose_data_dir(&dirs, "db-0", &DeviceNumbers::new(), Some("/elsewhere")),
            Ok(Some(first.clone()))
        );
        assert!(Path::new(&first).is_dir(), "created");
        // The temp directory's filesystem, cordoned: both entries are on it.
        let dev = split_dev(std::fs::metadata(&root).unwrap().dev());
        let cordoned = DeviceNumbers::from([("sdz".to_string(), BTreeSet::from([dev]))]);
        assert_eq!(
            choose_data_dir(&dirs, "db-0", &cordoned, Some(&second)),
            Err(format!(
                "no data directory is usable: {second} (on cordoned sdz), {first} (on cordoned sdz)"
            ))
        );
        std::fs::write(root.join("file"), "").unwrap();
        let file = vec![format!("{}/file", root.display()), dirs[1].clone()];
        assert_eq!(choose_data_dir(&file, "db-0", &DeviceNumbers::new(), None), Ok(Some(dirs[1].clone())));
        assert_eq!(choose_data_dir(&[], "db-0", &cordoned, None), Ok(None));
        // Kept across a restart (a new map over the same file).
        let kept = root.join("data_dirs.json");
        DataDirs::open(kept.clone()).set("db-0", &second).unwrap();
        assert_eq!(DataDirs::open(kept).get("db-0"), Some(second.clone()));
        assert!(path_on(&root, &BTreeSet::from([dev])) && !path_on(&root, &BTreeSet::new()));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_host_has_its_cpus_and_disks_as_devices() {
        let cpus = online_cpus(Path::new(CPU_DIR)).unwrap().len();
        let disks = std::fs::read_dir("/sys/block").unwrap().count();
        assert!(host_devices(Path::new("/sys")) >= cpus + disks);
        assert_eq!(host_devices(Path::new("/nonexistent")), 1);
    }

    #[test]
    fn cpu_resources_are_cpu_and_a_number() {
        assert_eq!(cpu_number("cpu12"), Some(12));
        assert_eq!(cpu_number("cpu"), None);
        assert_eq!(cpu_number("cpux"), None);
        assert_eq!(cpu_number("loop0"), None);
    }

    #[test]
    fn a_process_with_its_working_directory_on_a_device_uses_it() {
        // This test process: its working directory is on some device; find it and ask.
        let me = std::process::id();
        let cwd = std::fs::metadata("/proc/self/cwd").unwrap();
        let dev = BTreeSet::from([split_dev(cwd.dev())]);
        assert!(uses_devices(Path::new("/proc"), &[me], &dev));
        assert!(!uses_devices(Path::new("/proc"), &[me], &BTreeSet::from([(4095, 4095)])));
        assert!(!uses_devices(Path::new("/proc"), &[me], &BTreeSet::new()));
    }

    #[test]
    fn held_instances_are_let_go_when_their_run_does() {
        let held = Held::default();
        let holding = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = holding.clone();
        held.holding_by(Box::new(move |run| run == 7 && h.load(std::sync::atomic::Ordering::SeqCst)));
        held.hold("web-0", 7);
        assert!(held.held("web-0"));
        assert!(!held.held("web-1"));
        holding.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(!held.held("web-0"));
        assert!(held.all().is_empty());
    }
}
