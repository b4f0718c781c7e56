//! Discovery against this host's real cgroupfs. These tests create cgroups, so they need root (CI runs as
//! root); every cgroup and process they create is removed again by a guard, also when an assertion fails.
//! They work on hybrid hosts (v1 memory cgroup nested under this test process's own) and on pure v2 hosts.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vigil_collector::cgroupfs::{self, Layout};
use vigil_collector::discovery::{DiscoveredCgroup, Discovery, WatchConfig};

fn require_root() {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    assert_eq!(
        euid,
        Some("0"),
        "the discovery integration tests create cgroups and must run as root (CI does)"
    );
}

/// `vigil-test-<pid>-<n>`: distinct across parallel tests and concurrent test runs.
fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("vigil-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn join_rel(parent: &str, name: &str) -> String {
    format!("{}/{name}", parent.trim_end_matches('/'))
}

/// Kills the process and removes the cgroups it was given (innermost last in, first out) when dropped.
#[derive(Default)]
struct Cleanup {
    child: Option<Child>,
    dirs: Vec<PathBuf>,
}

impl Cleanup {
    fn mkdir(&mut self, dir: PathBuf) -> PathBuf {
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        self.dirs.push(dir.clone());
        dir
    }

    /// Kills the process and removes every directory, failing the test if that does not work.
    fn remove_all(&mut self) {
        if let Err(e) = self.try_remove_all() {
            panic!("cleaning up: {e}");
        }
    }

    fn try_remove_all(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait()?;
        }
        let mut first_error = Ok(());
        while let Some(dir) = self.dirs.pop() {
            if let Err(e) = rmdir_patiently(&dir) {
                eprintln!("cannot remove {}: {e}", dir.display());
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
        }
        first_error
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.try_remove_all();
    }
}

/// rmdir, retrying while the kernel still counts the just-reaped process (EBUSY).
fn rmdir_patiently(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Starts a shell that waits on stdin, moves it into `cgroups` and lets it exec `sleep 30`, so that the
/// memory `sleep` allocates is charged to the new cgroups (charges do not move with a task).
fn spawn_sleeper_in(cleanup: &mut Cleanup, cgroups: &[&Path]) -> u32 {
    let mut child = Command::new("sh")
        .args(["-c", "read line; exec sleep 30"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("child stdin");
    cleanup.child = Some(child);
    for dir in cgroups {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, format!("{pid}\n")).unwrap_or_else(|e| panic!("write {}: {e}", procs.display()));
    }
    stdin.write_all(b"go\n").expect("release the child");
    drop(stdin);

    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(format!("/proc/{pid}/comm")).ok().as_deref() != Some("sleep\n") {
        assert!(Instant::now() < deadline, "child {pid} did not exec sleep");
        thread::sleep(Duration::from_millis(10));
    }
    pid
}

fn find<'a>(found: &'a [DiscoveredCgroup], v2_path: &str) -> Option<&'a DiscoveredCgroup> {
    found.iter().find(|c| c.paths.v2.as_deref() == Some(v2_path))
}

fn ino(dir: &Path) -> u64 {
    fs::metadata(dir).unwrap_or_else(|e| panic!("stat {}: {e}", dir.display())).ino()
}

/// The v1 memory cgroup of this test process, under which the tests nest theirs.
fn own_memory_cgroup() -> String {
    cgroupfs::pid_cgroups(std::process::id())
        .expect("read own /proc/PID/cgroup")
        .memory_v1
        .expect("a hybrid host lists a memory hierarchy in /proc/self/cgroup")
}

#[test]
fn instance_with_a_process_carries_both_ids_and_goes_away() {
    require_root();
    let layout = Layout::detect().expect("detect cgroup layout");
    let mut cleanup = Cleanup::default();
    let name = unique_name();
    let v2_rel = format!("/{name}");
    let v2_dir = cleanup.mkdir(layout.v2_dir(&v2_rel));

    let v1 = layout.is_hybrid().then(|| {
        let v1_rel = join_rel(&own_memory_cgroup(), &name);
        let dir = layout.memory_v1_dir(&v1_rel).expect("hybrid layout has a memory mount");
        (v1_rel, cleanup.mkdir(dir))
    });
    let mut cgroups = vec![v2_dir.as_path()];
    if let Some((_, dir)) = &v1 {
        cgroups.push(dir.as_path());
    }
    spawn_sleeper_in(&mut cleanup, &cgroups);

    let mut discovery = Discovery::new(layout.clone(), WatchConfig::default());
    let found = discovery.scan();
    let instance = find(&found, &v2_rel).unwrap_or_else(|| panic!("{v2_rel} not discovered in {found:#?}"));
    assert_eq!(instance.identity.instance_id, format!("cg:/{name}"));
    assert_eq!(instance.identity.service, name);
    assert_eq!(instance.cgroup_id, Some(ino(&v2_dir)));
    match &v1 {
        Some((v1_rel, v1_dir)) => {
            assert_eq!(instance.memcg_id, Some(ino(v1_dir)));
            assert_eq!(instance.paths.memory_v1.as_deref(), Some(v1_rel.as_str()));
        }
        None => assert_eq!(instance.memcg_id, instance.cgroup_id),
    }

    let stats = cgroupfs::read_stats(&layout, &instance.paths);
    assert!(
        stats.memory.resident_bytes.is_some_and(|bytes| bytes > 0),
        "no resident memory for {v2_rel}: {stats:?}"
    );
    if fs::read(layout.v2_dir("/").join("cpu.pressure")).is_ok() {
        assert!(stats.pressure.cpu.is_some(), "no cpu pressure for {v2_rel}: {stats:?}");
    }

    let memcg_id = instance.memcg_id;
    cleanup.remove_all();
    let found = discovery.scan();
    assert!(find(&found, &v2_rel).is_none(), "{v2_rel} still discovered after removal");
    assert!(
        !found.iter().any(|c| c.memcg_id == memcg_id),
        "memcg {memcg_id:?} still discovered after removal"
    );
}

#[test]
fn cgroup_created_between_scans_appears_in_the_next() {
    require_root();
    let layout = Layout::detect().expect("detect cgroup layout");
    let mut cleanup = Cleanup::default();
    let name = unique_name();
    let v2_rel = format!("/{name}");
    let mut discovery = Discovery::new(layout.clone(), WatchConfig::default());

    assert!(find(&discovery.scan(), &v2_rel).is_none());

    let v2_dir = cleanup.mkdir(layout.v2_dir(&v2_rel));
    let found = discovery.scan();
    // An empty leaf is an instance: processes may join it later.
    let instance = find(&found, &v2_rel).unwrap_or_else(|| panic!("{v2_rel} not discovered after creation"));
    assert_eq!(instance.cgroup_id, Some(ino(&v2_dir)));
    assert_eq!(instance.identity.instance_id, format!("cg:{v2_rel}"));
    if layout.is_hybrid() {
        assert_eq!(instance.memcg_id, None, "no process, so no memory cgroup yet");
    }

    cleanup.remove_all();
    assert!(find(&discovery.scan(), &v2_rel).is_none());
}

#[test]
fn v1_memory_cgroup_of_processes_in_the_v2_root_is_an_instance() {
    require_root();
    let layout = Layout::detect().expect("detect cgroup layout");
    if !layout.is_hybrid() {
        // Pure v2 hosts have no v1 memory tree; the other tests cover them.
        return;
    }
    let mut cleanup = Cleanup::default();
    let v1_rel = join_rel(&own_memory_cgroup(), &unique_name());
    let v1_dir = cleanup.mkdir(layout.memory_v1_dir(&v1_rel).expect("memory mount"));
    let pid = spawn_sleeper_in(&mut cleanup, &[v1_dir.as_path()]);
    let v2_of_child = cgroupfs::pid_cgroups(pid).expect("child cgroups").v2;
    assert_eq!(v2_of_child.as_deref(), Some("/"), "the child should sit in the v2 root");

    let mut discovery = Discovery::new(layout.clone(), WatchConfig::default());
    let found = discovery.scan();
    let instance = found
        .iter()
        .find(|c| c.paths.memory_v1.as_deref() == Some(v1_rel.as_str()))
        .unwrap_or_else(|| panic!("{v1_rel} not discovered in {found:#?}"));
    assert_eq!(instance.paths.v2, None);
    assert_eq!(instance.cgroup_id, None);
    assert_eq!(instance.memcg_id, Some(ino(&v1_dir)));
    assert_eq!(instance.identity.instance_id, format!("cg:{v1_rel}"));
    let stats = cgroupfs::read_stats(&layout, &instance.paths);
    assert!(stats.memory.resident_bytes.is_some_and(|bytes| bytes > 0), "{stats:?}");

    cleanup.remove_all();
    let found = discovery.scan();
    assert!(!found.iter().any(|c| c.paths.memory_v1.as_deref() == Some(v1_rel.as_str())));
}

#[test]
fn scans_walk_again_only_when_cgroups_change() {
    require_root();
    let layout = Layout::detect().expect("detect cgroup layout");
    let mut cleanup = Cleanup::default();
    // A tree of its own, so that the other tests' cgroups are no change to it.
    let top_rel = format!("/{}", unique_name());
    cleanup.mkdir(layout.v2_dir(&top_rel));
    let a_rel = join_rel(&top_rel, "a");
    let a = cleanup.mkdir(layout.v2_dir(&a_rel));
    let watch = WatchConfig { include: vec![top_rel.clone()], ..WatchConfig::default() };
    let mut discovery = Discovery::new(layout.clone(), watch);

    let found = discovery.scan();
    assert!(find(&found, &a_rel).is_some(), "{a_rel} not discovered in {found:#?}");
    for _ in 0..4 {
        assert_eq!(discovery.scan(), found);
    }
    assert_eq!(discovery.full_scans(), 1, "nothing changed, so nothing was walked again");

    let b_rel = join_rel(&top_rel, "b");
    let b = cleanup.mkdir(layout.v2_dir(&b_rel));
    let found = discovery.scan();
    assert!(find(&found, &b_rel).is_some(), "{b_rel} not discovered after creation");
    assert_eq!(discovery.scan(), found);
    assert_eq!(discovery.full_scans(), 2, "a mkdir makes exactly one walk");

    // A process moved in: a write to cgroup.procs, and `populated` in cgroup.events, which the kernel
    // reports from a work queue a moment later.
    spawn_sleeper_in(&mut cleanup, &[a.as_path()]);
    thread::sleep(Duration::from_millis(100));
    discovery.scan();
    discovery.scan();
    assert_eq!(discovery.full_scans(), 3, "a process moving in makes one walk");

    // A process exiting touches no file: only `populated` in cgroup.events says the cgroup emptied.
    let mut child = cleanup.child.take().expect("the sleeper");
    child.kill().expect("kill the sleeper");
    child.wait().expect("reap the sleeper");
    // Fewer scans than FULL_SCAN_EVERY_SCANS, so the walk is not the periodic one.
    for _ in 0..20 {
        if discovery.full_scans() > 3 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
        discovery.scan();
    }
    assert_eq!(discovery.full_scans(), 4, "the cgroup emptying made no walk");

    rmdir_patiently(&b).expect("remove b");
    let found = discovery.scan();
    assert!(find(&found, &b_rel).is_none(), "{b_rel} still discovered after removal");
    assert_eq!(discovery.scan(), found);
    assert_eq!(discovery.full_scans(), 5, "an rmdir makes exactly one walk");

    // The start itself has no watched parent: its removal is seen by its inode, in the next scan.
    cleanup.remove_all();
    assert_eq!(discovery.scan(), vec![]);
}
