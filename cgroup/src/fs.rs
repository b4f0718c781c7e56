//! Reading cgroupfs: where the hierarchies are mounted, which cgroups a process belongs to, and the
//! per-cgroup numbers the kernel keeps for free (memory, swap, CFS throttling, pressure stall information).
//!
//! Hosts come in two shapes. Pure v2 hosts have one cgroup2 tree with every controller; hybrid hosts keep
//! the controllers (memory, cpu, ...) in v1 trees and mount a controller-less cgroup2 tree beside them,
//! which still carries per-cgroup PSI files and is what `bpf_get_current_cgroup_id()` reports. [`Layout`]
//! records which shape this host has; [`read_stats`] then reads each number from wherever it lives.
//!
//! The parsers (`from_mountinfo`, `parse_proc_cgroup`, `parse_psi`, `parse_flat_keyed`) are pure functions
//! over text; the few functions that touch the file system are thin wrappers around them. Cgroups appear
//! and vanish at any moment, so reading a cgroup's files never fails: a missing number stays `None` or 0.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use vigil_core::snapshot::{Memory, Pressure, Psi, PsiLine};

const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (according to {mountinfo})")]
    NoCgroup2 { mountinfo: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Mount points of the v1 hierarchies Vigil reads or drives. Co-mounted controllers (`cpu,cpuacct`) share
/// one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Mounts {
    pub memory: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub cpuset: Option<PathBuf>,
    pub freezer: Option<PathBuf>,
}

impl V1Mounts {
    fn is_empty(&self) -> bool {
        self.memory.is_none()
            && self.cpu.is_none()
            && self.cpuacct.is_none()
            && self.cpuset.is_none()
            && self.freezer.is_none()
    }
}

/// Where this host's cgroup hierarchies are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Mount point of the cgroup2 hierarchy (`/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`).
    pub v2_root: PathBuf,
    /// The v1 controller mounts; `None` on pure v2 hosts.
    pub v1: Option<V1Mounts>,
}

impl Layout {
    /// The layout of the cgroup hierarchies as this process sees them.
    pub fn detect() -> Result<Layout, CgroupError> {
        let text = std::fs::read_to_string(MOUNTINFO)
            .map_err(|source| CgroupError::Read { path: MOUNTINFO.into(), source })?;
        parse_mountinfo(&text, Path::new(MOUNTINFO))
    }

    /// The layout described by the text of a `/proc/PID/mountinfo` file.
    pub fn from_mountinfo(text: &str) -> Result<Layout, CgroupError> {
        parse_mountinfo(text, Path::new("<mountinfo text>"))
    }

    /// True when memory is accounted in a v1 hierarchy, so memory cgroup ids are v1 directory inodes.
    pub fn is_hybrid(&self) -> bool {
        self.v1.as_ref().is_some_and(|v1| v1.memory.is_some())
    }

    /// The directory of the v2 cgroup at `rel` (`"/a/b"`, or `"/"` for the root).
    pub fn v2_dir(&self, rel: &str) -> PathBuf {
        join_rel(&self.v2_root, rel)
    }

    /// The directory of the v1 memory cgroup at `rel`, if the host has a v1 memory hierarchy.
    pub fn memory_v1_dir(&self, rel: &str) -> Option<PathBuf> {
        let root = self.v1.as_ref()?.memory.as_ref()?;
        Some(join_rel(root, rel))
    }

    /// The directory of the v1 cpu cgroup at `rel`, if the host has a v1 cpu hierarchy.
    pub fn cpu_v1_dir(&self, rel: &str) -> Option<PathBuf> {
        let root = self.v1.as_ref()?.cpu.as_ref()?;
        Some(join_rel(root, rel))
    }
}

fn join_rel(root: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() { root.to_path_buf() } else { root.join(rel) }
}

/// A cgroup mount seen in mountinfo. Mounts of a subtree (root other than `/`, as in containers with a
/// bind-mounted cgroupfs) are taken only when no mount of the whole hierarchy exists, because
/// `/proc/PID/cgroup` paths are relative to the hierarchy's root, not to the mount.
struct Candidate {
    mount_point: PathBuf,
    whole_hierarchy: bool,
}

fn offer(slot: &mut Option<Candidate>, mount_point: &Path, whole_hierarchy: bool) {
    let better = match slot {
        None => true,
        Some(current) => !current.whole_hierarchy && whole_hierarchy,
    };
    if better {
        *slot = Some(Candidate { mount_point: mount_point.to_path_buf(), whole_hierarchy });
    }
}

fn parse_mountinfo(text: &str, source: &Path) -> Result<Layout, CgroupError> {
    let mut v2: Option<Candidate> = None;
    let mut memory = None;
    let mut cpu = None;
    let mut cpuacct = None;
    let mut cpuset = None;
    let mut freezer = None;

    for line in text.lines() {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        // id parent major:minor root mount-point options [optional fields...] - fstype source super-options
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if dash < 5 {
            continue;
        }
        let (Some(fstype), Some(super_options)) = (fields.get(dash + 1), fields.get(dash + 3)) else {
            continue;
        };
        let whole_hierarchy = fields[3] == "/";
        let mount_point = PathBuf::from(unescape_mount_field(fields[4]));
        match *fstype {
            "cgroup2" => offer(&mut v2, &mount_point, whole_hierarchy),
            "cgroup" => {
                for option in super_options.split(',') {
                    let slot = match option {
                        "memory" => &mut memory,
                        "cpu" => &mut cpu,
                        "cpuacct" => &mut cpuacct,
                        "cpuset" => &mut cpuset,
                        "freezer" => &mut freezer,
                        // name=systemd and controllers Vigil does not read.
                        _ => continue,
                    };
                    offer(slot, &mount_point, whole_hierarchy);
                }
            }
            _ => {}
        }
    }

    let Some(v2) = v2 else {
        return Err(CgroupError::NoCgroup2 { mountinfo: source.to_path_buf() });
    };
    let v1 = V1Mounts {
        memory: memory.map(|c| c.mount_point),
        cpu: cpu.map(|c| c.mount_point),
        cpuacct: cpuacct.map(|c| c.mount_point),
        cpuset: cpuset.map(|c| c.mount_point),
        freezer: freezer.map(|c| c.mount_point),
    };
    Ok(Layout { v2_root: v2.mount_point, v1: (!v1.is_empty()).then_some(v1) })
}

/// Undoes the octal escapes (`\040` for a space, ...) the kernel writes into mountinfo path fields.
fn unescape_mount_field(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_owned();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = (d[0] - b'0') as u32 * 64 + (d[1] - b'0') as u32 * 8 + (d[2] - b'0') as u32;
                // Values above 0o377 cannot come from the kernel; keep such text as it is.
                match u8::try_from(value) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 4;
                    }
                    Err(_) => {
                        out.push(bytes[i]);
                        i += 1;
                    }
                }
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Relative cgroup paths ("/a/b") of one instance in each hierarchy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupPaths {
    pub v2: Option<String>,
    pub memory_v1: Option<String>,
    pub cpu_v1: Option<String>,
}

/// What cgroupfs says about one cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CgroupStats {
    pub memory: Memory,
    pub pressure: Pressure,
    /// CFS periods in which the cgroup was throttled (0 where the cpu controller is absent).
    pub throttled_periods: u64,
    /// Time the cgroup spent throttled, in nanoseconds.
    pub throttled_ns: u64,
}

/// Reads what cgroupfs offers about the cgroup at `paths`.
///
/// Never fails: a missing/unreadable file leaves that field None/0 (cgroups vanish between scan and read).
pub fn read_stats(layout: &Layout, paths: &CgroupPaths) -> CgroupStats {
    let mut buf = Vec::with_capacity(4096);
    read_stats_with(layout, paths, &mut buf)
}

/// [`read_stats`] with a caller-owned scratch buffer, so a tick over many cgroups allocates it once.
pub fn read_stats_with(layout: &Layout, paths: &CgroupPaths, buf: &mut Vec<u8>) -> CgroupStats {
    let mut stats = CgroupStats::default();
    let mut v2_dir = paths.v2.as_deref().map(|rel| layout.v2_dir(rel));

    if let Some(dir) = v2_dir.as_mut() {
        stats.pressure = Pressure {
            cpu: read_in(buf, dir, "cpu.pressure").and_then(parse_psi),
            memory: read_in(buf, dir, "memory.pressure").and_then(parse_psi),
            io: read_in(buf, dir, "io.pressure").and_then(parse_psi),
        };
    }

    let memory_v1_dir = paths.memory_v1.as_deref().and_then(|rel| layout.memory_v1_dir(rel));
    if let Some(mut dir) = memory_v1_dir {
        stats.memory.resident_bytes = read_in(buf, &mut dir, "memory.usage_in_bytes").and_then(parse_u64);
        // `usage_in_bytes` counts the whole subtree, so prefer the hierarchical `total_swap` to match it;
        // either key exists only with swap accounting on.
        stats.memory.swap_bytes = read_in(buf, &mut dir, "memory.stat").and_then(|text| {
            let mut swap = None;
            for (key, value) in parse_flat_keyed(text) {
                match key {
                    "total_swap" => return Some(value),
                    "swap" => swap = Some(value),
                    _ => {}
                }
            }
            swap
        });
    } else if let Some(dir) = v2_dir.as_mut() {
        stats.memory.resident_bytes = read_in(buf, dir, "memory.current").and_then(parse_u64);
        stats.memory.swap_bytes = read_in(buf, dir, "memory.swap.current").and_then(parse_u64);
    }

    let cpu_v1_dir = paths.cpu_v1.as_deref().and_then(|rel| layout.cpu_v1_dir(rel));
    if let Some(mut dir) = cpu_v1_dir {
        if let Some(text) = read_in(buf, &mut dir, "cpu.stat") {
            for (key, value) in parse_flat_keyed(text) {
                match key {
                    "nr_throttled" => stats.throttled_periods = value,
                    "throttled_time" => stats.throttled_ns = value,
                    _ => {}
                }
            }
        }
    } else if let Some(dir) = v2_dir.as_mut()
        && let Some(text) = read_in(buf, dir, "cpu.stat")
    {
        for (key, value) in parse_flat_keyed(text) {
            match key {
                "nr_throttled" => stats.throttled_periods = value,
                "throttled_usec" => stats.throttled_ns = value.saturating_mul(1000),
                _ => {}
            }
        }
    }

    stats
}

/// Reads `dir/name` into `buf` (one open, one read for the small files cgroupfs serves). `dir` is borrowed
/// mutably only to append the name and take it off again, which saves building a new path per file.
fn read_in<'b>(buf: &'b mut Vec<u8>, dir: &mut PathBuf, name: &str) -> Option<&'b str> {
    dir.push(name);
    buf.clear();
    let read = File::open(&*dir).and_then(|mut file| file.read_to_end(buf));
    dir.pop();
    read.ok()?;
    std::str::from_utf8(buf).ok()
}

fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Parses a PSI file (`cpu.pressure`, `memory.pressure`, `io.pressure`):
///
/// ```text
/// some avg10=0.00 avg60=0.00 avg300=0.00 total=0
/// full avg10=0.00 avg60=0.00 avg300=0.00 total=0
/// ```
///
/// `None` without a well-formed `some` line; a malformed `full` line is left out.
pub fn parse_psi(text: &str) -> Option<Psi> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let Some((kind, rest)) = line.split_once(' ') else {
            continue;
        };
        match kind {
            "some" => some = parse_psi_line(rest),
            "full" => full = parse_psi_line(rest),
            _ => {}
        }
    }
    Some(Psi { some: some?, full })
}

fn parse_psi_line(fields: &str) -> Option<PsiLine> {
    let (mut avg10, mut avg60, mut avg300, mut total_us) = (None, None, None, None);
    for field in fields.split_ascii_whitespace() {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "avg10" => avg10 = parse_ratio(value),
            "avg60" => avg60 = parse_ratio(value),
            "avg300" => avg300 = parse_ratio(value),
            "total" => total_us = value.parse().ok(),
            _ => {}
        }
    }
    Some(PsiLine { avg10: avg10?, avg60: avg60?, avg300: avg300?, total_us: total_us? })
}

fn parse_ratio(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The `key value` lines of a flat-keyed cgroupfs file (`cpu.stat`, `memory.stat`). Lines that are not a key,
/// one space and an unsigned integer are left out.
pub fn parse_flat_keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let (key, value) = line.split_once(' ')?;
        Some((key, value.trim_end().parse().ok()?))
    })
}

/// The relative path of `pid`'s cgroup in the v2 hierarchy and in the v1 `memory` and `cpu` hierarchies, from /proc/PID/cgroup.
pub fn pid_cgroups(pid: u32) -> Result<CgroupPaths, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(parse_proc_cgroup(&text)),
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

/// Parses `/proc/PID/cgroup`: `0::/x` is the v2 hierarchy, `4:memory:/y` and `1:cpu,cpuacct:/z` are v1.
/// Entries for a cgroup that was removed under the process (` (deleted)`) are left out.
pub fn parse_proc_cgroup(text: &str) -> CgroupPaths {
    let mut paths = CgroupPaths::default();
    for line in text.lines() {
        // A cgroup name may itself contain ':', so only the first two separate fields.
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        // Only the v2 hierarchy has no controller list; named v1 hierarchies say `name=...`.
        if controllers.is_empty() {
            paths.v2 = Some(path.to_owned());
            continue;
        }
        for controller in controllers.split(',') {
            match controller {
                "memory" => paths.memory_v1 = Some(path.to_owned()),
                "cpu" => paths.cpu_v1 = Some(path.to_owned()),
                _ => {}
            }
        }
    }
    paths
}

/// Every process listed in `dir/cgroup.procs`, in the kernel's order. A cgroup that is gone (or was never
/// there) lists none: cgroups vanish at any moment, and that is not an error to whoever asked.
pub fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs")).map(|text| parse_procs(&text)).unwrap_or_default()
}

/// The pids of a `cgroup.procs` text, one a line.
pub fn parse_procs(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The first process listed in `dir/cgroup.procs`, if any. Reads only the first bytes, as a busy cgroup
/// can list thousands of processes.
pub fn first_pid(dir: &Path) -> Option<u32> {
    let mut file = File::open(dir.join("cgroup.procs")).ok()?;
    let mut buf = [0u8; 32];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if buf[..len].contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// This machine's /proc/self/mountinfo (kernel 6.18, hybrid cgroups).
    const HYBRID_MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334492k,nr_inodes=3083623,mode=755
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684092k
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534
29 26 0:26 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684092k
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:13 / /sys/kernel/tracing rw,relatime - tracefs nodev rw
";

    /// A systemd host in the usual unified mode (Kubernetes node).
    const PURE_V2_MOUNTINFO: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 22 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:14 - proc proc rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 24 0:27 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:10 - pstore pstore rw
";

    #[test]
    fn hybrid_mountinfo() {
        let layout = Layout::from_mountinfo(HYBRID_MOUNTINFO).unwrap();
        assert_eq!(
            layout,
            Layout {
                v2_root: "/sys/fs/cgroup/unified".into(),
                v1: Some(V1Mounts {
                    memory: Some("/sys/fs/cgroup/memory".into()),
                    cpu: Some("/sys/fs/cgroup/cpu".into()),
                    cpuacct: Some("/sys/fs/cgroup/cpuacct".into()),
                    cpuset: Some("/sys/fs/cgroup/cpuset".into()),
                    freezer: Some("/sys/fs/cgroup/freezer".into()),
                }),
            }
        );
        assert!(layout.is_hybrid());
        assert_eq!(layout.v2_dir("/"), PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(layout.v2_dir("/a/b"), PathBuf::from("/sys/fs/cgroup/unified/a/b"));
        assert_eq!(
            layout.memory_v1_dir("/process_api/x"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/x"))
        );
        assert_eq!(layout.cpu_v1_dir("/"), Some(PathBuf::from("/sys/fs/cgroup/cpu")));
    }

    #[test]
    fn pure_v2_mountinfo() {
        let layout = Layout::from_mountinfo(PURE_V2_MOUNTINFO).unwrap();
        assert_eq!(layout, Layout { v2_root: "/sys/fs/cgroup".into(), v1: None });
        assert!(!layout.is_hybrid());
        assert_eq!(
            layout.v2_dir("/system.slice/x.service"),
            PathBuf::from("/sys/fs/cgroup/system.slice/x.service")
        );
        assert_eq!(layout.memory_v1_dir("/x"), None);
    }

    #[test]
    fn co_mounted_v1_controllers_share_a_path() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
31 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 24 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 24 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
        let v1 = Layout::from_mountinfo(text).unwrap().v1.unwrap();
        assert_eq!(v1.cpu, Some("/sys/fs/cgroup/cpu,cpuacct".into()));
        assert_eq!(v1.cpuacct, Some("/sys/fs/cgroup/cpu,cpuacct".into()));
        assert_eq!(v1.memory, Some("/sys/fs/cgroup/memory".into()));
        assert_eq!(v1.cpuset, None);
        assert_eq!(v1.freezer, None);
    }

    #[test]
    fn whole_hierarchy_mount_beats_an_earlier_subtree_mount() {
        let text = "\
40 24 0:26 /kubepods /var/lib/x rw - cgroup2 cgroup2 rw
41 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
42 24 0:26 / /mnt/other rw - cgroup2 cgroup2 rw
";
        assert_eq!(Layout::from_mountinfo(text).unwrap().v2_root, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn escaped_mount_points() {
        let text = "41 24 0:26 / /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(Layout::from_mountinfo(text).unwrap().v2_root, PathBuf::from("/mnt/with space"));
        assert_eq!(unescape_mount_field("a\\134b\\9"), "a\\b\\9");
    }

    #[test]
    fn no_cgroup2_is_an_error() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert!(matches!(Layout::from_mountinfo(text), Err(CgroupError::NoCgroup2 { .. })));
    }

    #[test]
    fn psi_with_and_without_full() {
        let psi = parse_psi(
            "some avg10=0.60 avg60=0.80 avg300=1.80 total=11746329\nfull avg10=0.00 avg60=0.13 avg300=0.35 total=2777669\n",
        )
        .unwrap();
        assert_eq!(psi.some, PsiLine { avg10: 0.60, avg60: 0.80, avg300: 1.80, total_us: 11746329 });
        assert_eq!(psi.full, Some(PsiLine { avg10: 0.0, avg60: 0.13, avg300: 0.35, total_us: 2777669 }));

        let cpu_only_some = parse_psi("some avg10=1.00 avg60=2.00 avg300=3.00 total=4\n").unwrap();
        assert_eq!(cpu_only_some.full, None);
        assert_eq!(cpu_only_some.some.total_us, 4);
    }

    #[test]
    fn malformed_psi() {
        assert_eq!(parse_psi(""), None);
        assert_eq!(parse_psi("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"), None);
        assert_eq!(parse_psi("some avg10=0.00 avg60=0.00 total=0\n"), None);
        assert_eq!(parse_psi("some avg10=x avg60=0.00 avg300=0.00 total=0\n"), None);
        assert_eq!(parse_psi("some avg10=NaN avg60=0.00 avg300=0.00 total=0\n"), None);
        let bad_full = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\nfull total=-1\n").unwrap();
        assert_eq!(bad_full.some.total_us, 7);
        assert_eq!(bad_full.full, None);
    }

    #[test]
    fn proc_cgroup_hybrid() {
        let text = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/00a9f8fd7e5f636414c0749f6e213935
2:cpuacct:/
1:cpu:/
0::/
";
        assert_eq!(
            parse_proc_cgroup(text),
            CgroupPaths {
                v2: Some("/".into()),
                memory_v1: Some("/process_api/00a9f8fd7e5f636414c0749f6e213935".into()),
                cpu_v1: Some("/".into()),
            }
        );
    }

    #[test]
    fn proc_cgroup_co_mounted_and_pure_v2() {
        let text = "5:cpu,cpuacct:/system.slice/a.service\n3:memory:/system.slice/a.service\n0::/system.slice/a.service\n";
        let paths = parse_proc_cgroup(text);
        assert_eq!(paths.cpu_v1.as_deref(), Some("/system.slice/a.service"));
        assert_eq!(paths.memory_v1.as_deref(), Some("/system.slice/a.service"));
        assert_eq!(paths.v2.as_deref(), Some("/system.slice/a.service"));

        assert_eq!(
            parse_proc_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n"),
            CgroupPaths {
                v2: Some("/user.slice/user-1000.slice/session-2.scope".into()),
                ..CgroupPaths::default()
            }
        );
    }

    #[test]
    fn proc_cgroup_odd_lines() {
        assert_eq!(parse_proc_cgroup(""), CgroupPaths::default());
        assert_eq!(parse_proc_cgroup("garbage\n1:cpu\n"), CgroupPaths::default());
        // Colons inside the path are part of the path.
        assert_eq!(parse_proc_cgroup("0::/a:b\n").v2.as_deref(), Some("/a:b"));
        // A cgroup removed under a zombie process.
        assert_eq!(parse_proc_cgroup("0::/gone (deleted)\n").v2, None);
    }

    #[test]
    fn flat_keyed() {
        let text = "usage_usec 146572592\nnr_throttled 3\nthrottled_usec 1500\nbad line\nneg -1\n\nempty \n";
        let pairs: Vec<_> = parse_flat_keyed(text).collect();
        assert_eq!(pairs, vec![("usage_usec", 146572592), ("nr_throttled", 3), ("throttled_usec", 1500)]);
    }

    #[test]
    fn stats_of_a_missing_cgroup_are_empty() {
        let layout = Layout::from_mountinfo(HYBRID_MOUNTINFO).unwrap();
        let paths = CgroupPaths {
            v2: Some("/vigil-does-not-exist/x".into()),
            memory_v1: Some("/vigil-does-not-exist/x".into()),
            cpu_v1: Some("/vigil-does-not-exist/x".into()),
        };
        assert_eq!(read_stats(&layout, &paths), CgroupStats::default());
    }

    #[test]
    fn first_pid_reads_the_first_line() {
        let dir = std::env::temp_dir().join(format!("vigil-cgroupfs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "4194303\n17\n").unwrap();
        assert_eq!(first_pid(&dir), Some(4194303));
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert_eq!(first_pid(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(first_pid(&dir), None);
    }

    #[test]
    fn procs_lists_every_pid_and_nothing_for_a_vanished_cgroup() {
        let dir = std::env::temp_dir().join(format!("vigil-cgroupfs-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "4194303\n17\n").unwrap();
        assert_eq!(procs(&dir), vec![4194303, 17]);
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert_eq!(procs(&dir), Vec::<u32>::new());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(procs(&dir), Vec::<u32>::new());
        assert_eq!(parse_procs("1\n\nx\n 2 \n"), vec![1, 2]);
    }

    proptest! {
        #[test]
        fn parse_psi_never_panics(text in "\\PC*") {
            let _ = parse_psi(&text);
        }

        #[test]
        fn parse_psi_of_psi_like_text_never_panics(
            text in "((some|full)( (avg10|avg60|avg300|total)=[-0-9.eEinfNa]{0,8}){0,5}\n?){0,3}"
        ) {
            let _ = parse_psi(&text);
        }

        #[test]
        fn parse_proc_cgroup_never_panics(text in "\\PC*") {
            let _ = parse_proc_cgroup(&text);
        }

        #[test]
        fn parse_proc_cgroup_of_cgroup_like_text_never_panics(text in "([0-9]{0,2}:[a-z,=]{0,12}:[/a-z:(). ]{0,12}\n?){0,4}") {
            let _ = parse_proc_cgroup(&text);
        }

        #[test]
        fn parse_flat_keyed_never_panics(text in "\\PC*") {
            let _ = parse_flat_keyed(&text).count();
        }

        #[test]
        fn from_mountinfo_never_panics(text in "([0-9 /a-z\\\\-]{0,40}\n?){0,4}") {
            let _ = Layout::from_mountinfo(&text);
        }
    }
}
