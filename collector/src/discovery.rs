//! Finding the instances on this host. An instance is a cgroup: one Vigil started under its managed root, a
//! Kubernetes or docker container, a systemd unit, or any other cgroup that holds processes of its own.
//!
//! A full walk of the cgroup trees names every instance with [`identify`], a pure function of its path. Each
//! instance carries both ids the probes report: the v2 directory's inode (`bpf_get_current_cgroup_id()`) and
//! its memory cgroup's id (the v1 memory directory's inode on hybrid hosts, found through one of the
//! instance's processes and cached). Walking never fails: cgroups come and go while the walk runs, and a
//! vanished directory is just skipped.
//!
//! Walking a thousand cgroups takes milliseconds, too much for every tick, so [`Discovery::scan`] walks
//! only when inotify says something changed: every walked directory is watched, and a mkdir or rmdir below
//! it, a process moved in by a write to its `cgroup.procs`, or its `cgroup.events` (populated) changing
//! makes the next scan walk again. Otherwise a scan answers from the last walk. Events are queued by the
//! syscall that causes them, so a cgroup created or removed before a scan is in or out of that scan. A
//! walk every [`FULL_SCAN_EVERY_SCANS`] scans catches what no event reports (a non-leaf cgroup gaining its
//! own processes by a fork); without inotify every scan walks.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::Path;

use inotify::{Event, EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::cgroupfs::{self, CgroupPaths, Layout};
use crate::snapshot::InstanceKind;

/// How many scans a process-derived v2 → v1 mapping is trusted before the next walk looks it up again.
/// Processes rarely change cgroups, but re-resolving now and then catches those that do.
const RESOLVE_EVERY_SCANS: u64 = 10;

/// A scan walks the trees at least this often, even when no event said anything changed.
const FULL_SCAN_EVERY_SCANS: u64 = 30;

/// How often instances whose v1 cgroups are still unknown are looked up again between walks: processes
/// joining a v1 hierarchy are not always reported (a fork does not touch `cgroup.procs`).
const RETRY_UNRESOLVED_EVERY_SCANS: u64 = 5;

pub use vigil_core::config::WatchConfig;

/// The name of an instance, as far as its cgroup path tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub service: String,
    pub instance_id: String,
    pub kind: InstanceKind,
}

/// Pure naming of a cgroup by its relative path.
///
/// Instances Vigil did not start keep their path in the id (`cg:/system.slice/nginx.service`); the service
/// is what the path says about the workload: the pod UID, the container id, the systemd unit or, failing
/// all, the last path component.
pub fn identify(path: &str, managed_root: &str) -> Identity {
    if let Some((service, instance)) = managed_parts(path, &normalize_prefix(managed_root)) {
        return Identity {
            service: service.to_owned(),
            instance_id: instance.to_owned(),
            kind: InstanceKind::Managed,
        };
    }

    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let (service, kind) = if let Some(uid) = kubernetes_pod_uid(&components) {
        (format!("pod-{uid}"), InstanceKind::Kubernetes)
    } else if let Some(id) = container_id(&components) {
        (format!("container-{id}"), InstanceKind::Container)
    } else if let Some(last) = components.last() {
        match last.strip_suffix(".service").or_else(|| last.strip_suffix(".scope")) {
            Some(unit) if !unit.is_empty() => (unit.to_owned(), InstanceKind::SystemdUnit),
            _ => ((*last).to_owned(), InstanceKind::Other),
        }
    } else {
        ("root".to_owned(), InstanceKind::Other)
    };
    Identity { service, instance_id: format!("cg:{path}"), kind }
}

/// `(service, instance)` if `path` is exactly `<managed_root>/<service>/<instance>`.
fn managed_parts<'p>(path: &'p str, managed_root: &str) -> Option<(&'p str, &'p str)> {
    let mut rest = relative_to(path, managed_root)?.split('/').filter(|c| !c.is_empty());
    match (rest.next(), rest.next(), rest.next()) {
        (Some(service), Some(instance), None) => Some((service, instance)),
        _ => None,
    }
}

/// How deep `path` lies below `managed_root` (0 for the root itself), if it lies there at all.
fn managed_depth(path: &str, managed_root: &str) -> Option<usize> {
    Some(relative_to(path, managed_root)?.split('/').filter(|c| !c.is_empty()).count())
}

/// The rest of `path` below `prefix` (`""` for the prefix itself), matching whole components.
fn relative_to<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn is_under(path: &str, prefix: &str) -> bool {
    relative_to(path, prefix).is_some()
}

/// `"a/b/"` → `"/a/b"`, `""` → `"/"`: the form cgroup paths have in `/proc/PID/cgroup`.
fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    format!("/{trimmed}")
}

/// The pod UID (with dashes) of a path below a `kubepods` cgroup, for both kubelet cgroup drivers:
/// systemd (`kubepods-burstable-pod<uid with _>.slice`) and cgroupfs (`pod<uid>`).
fn kubernetes_pod_uid(components: &[&str]) -> Option<String> {
    let kubepods = components.iter().position(|c| c.contains("kubepods"))?;
    components[kubepods..].iter().find_map(|component| {
        let uid = match component.strip_suffix(".slice") {
            Some(unit) => unit.rsplit_once('-')?.1.strip_prefix("pod")?,
            None => component.strip_prefix("pod")?,
        };
        let valid = !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
        valid.then(|| uid.replace('_', "-"))
    })
}

/// Container runtimes' cgroup names: the systemd driver's `<runtime>-<id>.scope` and docker's cgroupfs
/// driver `/docker/<id>`.
const CONTAINER_PREFIXES: [&str; 6] =
    ["docker-", "cri-containerd-", "containerd-", "crio-", "libpod-", "nerdctl-"];
const CONTAINER_PARENTS: [&str; 2] = ["docker", "libpod_parent"];
/// Short ids as docker prints them.
const SHORT_ID_LEN: usize = 12;

/// The short (12 hex digit) id of a container outside Kubernetes, from the last path component.
fn container_id(components: &[&str]) -> Option<String> {
    let (last, parents) = components.split_last()?;
    let name = last.strip_suffix(".scope").unwrap_or(last);
    let id = CONTAINER_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .or_else(|| parents.last().filter(|p| CONTAINER_PARENTS.contains(p)).map(|_| name))?;
    // Ids are long hex strings; this keeps e.g. `docker-compose@x.service` a systemd unit.
    let is_id = id.len() >= SHORT_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| id[..SHORT_ID_LEN].to_ascii_lowercase())
}

/// One instance found by a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredCgroup {
    pub identity: Identity,
    pub paths: CgroupPaths,
    /// Inode of the v2 directory; `None` for instances that exist only in the v1 memory tree.
    pub cgroup_id: Option<u64>,
    /// Id of the memory cgroup; `None` while a hybrid host's instance has no process to find it through.
    pub memcg_id: Option<u64>,
}

/// The v1 cgroups of a v2 instance, found through one of its processes.
#[derive(Clone, Debug)]
struct V1Link {
    v2_ino: u64,
    checked_at: u64,
    seen_at: u64,
    /// False while the cgroup had no process to look up.
    resolved: bool,
    /// The cgroup was empty at the last look. Retrying is pointless: a process joining it is reported by
    /// inotify (a `cgroup.procs` write or a `cgroup.events` change), which brings a walk anyway.
    empty: bool,
    memory_v1: Option<String>,
    cpu_v1: Option<String>,
    memcg_id: Option<u64>,
}

/// Where the processes of a v1 memory cgroup sit in the v2 tree.
#[derive(Clone, Debug)]
struct V1Owner {
    ino: u64,
    checked_at: u64,
    seen_at: u64,
    v2: Option<String>,
    cpu_v1: Option<String>,
}

/// A directory met during a walk: its path relative to the hierarchy root, and its inode (the cgroup id).
#[derive(Clone, Debug)]
struct Dir {
    rel: String,
    ino: u64,
}

/// Finds the instances on this host; keep one and call [`Discovery::scan`] every tick.
pub struct Discovery {
    layout: Layout,
    managed_root: String,
    /// Where walks begin, in priority order: the managed root first (when watched), so Vigil's own
    /// instances are never the ones dropped by `max_tracked`.
    starts: Vec<String>,
    /// A subtree walked from `starts` already, skipped when met again below another start.
    prune: Option<String>,
    exclude: Vec<String>,
    max_tracked: usize,
    scans: u64,
    skipped: u64,
    links: HashMap<String, V1Link>,
    owners: HashMap<String, V1Owner>,
    /// `None` once inotify failed: then every scan walks.
    watcher: Option<Watcher>,
    /// What the last walk found, handed out by scans until something changes.
    found: Vec<DiscoveredCgroup>,
    full_scans: u64,
    last_full_scan: u64,
    /// The scan that last looked up unresolved v1 links (a walk or a retry).
    last_resolve: u64,
    /// The inodes of `starts` in the v2 and the v1 memory tree at the last walk (`None`: missing). A start's
    /// own parent is not watched, so its creation or removal is noticed by comparing these.
    v2_starts: Vec<Option<u64>>,
    memory_v1_starts: Vec<Option<u64>>,
}

impl Discovery {
    pub fn new(layout: Layout, watch: WatchConfig) -> Self {
        let managed_root = normalize_prefix(&watch.managed_root);
        let exclude: Vec<String> = watch.exclude.iter().map(|p| normalize_prefix(p)).collect();
        let excluded = |path: &str| exclude.iter().any(|e| is_under(path, e));

        let normalized: Vec<String> = watch.include.iter().map(|p| normalize_prefix(p)).collect();
        // Overlapping prefixes would walk (and count) the same cgroups twice: keep the outermost.
        let mut includes: Vec<String> = Vec::with_capacity(normalized.len());
        for (i, prefix) in normalized.iter().enumerate() {
            let covered = normalized
                .iter()
                .enumerate()
                .any(|(j, other)| j != i && is_under(prefix, other) && (prefix != other || j < i));
            if !covered && !excluded(prefix) {
                includes.push(prefix.clone());
            }
        }

        let managed_first = managed_root != "/"
            && !excluded(&managed_root)
            && includes.iter().any(|p| is_under(&managed_root, p) && *p != managed_root);
        let (starts, prune) = if managed_first {
            let mut starts = vec![managed_root.clone()];
            starts.extend(includes);
            (starts, Some(managed_root.clone()))
        } else {
            (includes, None)
        };

        let watcher = match Watcher::new() {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "cannot use inotify; walking the cgroup trees every tick instead");
                None
            }
        };

        Self {
            layout,
            managed_root,
            starts,
            prune,
            exclude,
            max_tracked: watch.max_tracked,
            scans: 0,
            skipped: 0,
            links: HashMap::new(),
            owners: HashMap::new(),
            watcher,
            found: Vec::new(),
            full_scans: 0,
            last_full_scan: 0,
            last_resolve: 0,
            v2_starts: Vec::new(),
            memory_v1_starts: Vec::new(),
        }
    }

    /// The instances now. Cgroups created since the last scan appear, removed ones are gone; the trees are
    /// walked again only if something may have changed since the last walk.
    pub fn scan(&mut self) -> Vec<DiscoveredCgroup> {
        self.scans += 1;
        if self.walk_due() || (self.retry_due() && self.retry_unresolved()) {
            self.full_scan();
        }
        self.found.clone()
    }

    /// Cgroups skipped in the last scan because max_tracked was reached.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// How often the trees were walked; every other scan was answered from the last walk.
    pub fn full_scans(&self) -> u64 {
        self.full_scans
    }

    /// Whether this scan must walk: first of all, it reads every queued event, so that a walk is not
    /// followed by another for the changes it already saw.
    fn walk_due(&mut self) -> bool {
        let Some(watcher) = self.watcher.as_mut() else {
            return true;
        };
        let changed = match watcher.drain() {
            Ok(changed) => changed,
            Err(error) => {
                self.stop_watching(&error);
                return true;
            }
        };
        changed
            || self.full_scans == 0
            || self.scans - self.last_full_scan >= FULL_SCAN_EVERY_SCANS
            || self.starts_changed()
    }

    /// Whether a start appeared, vanished or was re-created since the last walk.
    fn starts_changed(&self) -> bool {
        let changed = |root: &Path, recorded: &[Option<u64>]| {
            self.starts.iter().zip(recorded).any(|(start, &ino)| start_inode(root, start) != ino)
        };
        if changed(&self.layout.v2_root, &self.v2_starts) {
            return true;
        }
        match self.layout.v1.as_ref().and_then(|v1| v1.memory.as_deref()) {
            Some(memory_root) if self.layout.is_hybrid() => changed(memory_root, &self.memory_v1_starts),
            _ => false,
        }
    }

    fn retry_due(&self) -> bool {
        self.scans - self.last_resolve >= RETRY_UNRESOLVED_EVERY_SCANS
    }

    /// Looks up the v1 cgroups of the instances that had no process to find them through at their last
    /// look. True if one of them was found now: then the cached result is out of date.
    fn retry_unresolved(&mut self) -> bool {
        let scans = self.scans;
        self.last_resolve = scans;
        let mut resolved_any = false;
        for (rel, link) in self.links.iter_mut().filter(|(_, link)| !link.resolved && !link.empty) {
            let fresh = resolve_link(&self.layout, rel, link.v2_ino, scans);
            if fresh.resolved {
                *link = fresh;
                resolved_any = true;
            }
        }
        resolved_any
    }

    fn stop_watching(&mut self, error: &io::Error) {
        if let Some(watcher) = self.watcher.take() {
            tracing::warn!(
                %error,
                watched = watcher.len(),
                "cannot watch the cgroup trees with inotify (fs.inotify.max_user_watches?); \
                 walking them every tick instead"
            );
        }
    }

    /// Walks the trees now, watching every directory walked and no other.
    fn full_scan(&mut self) {
        self.full_scans += 1;
        self.last_full_scan = self.scans;
        self.last_resolve = self.scans;
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.begin_walk();
        }
        let cap = self.max_tracked;
        let mut skipped = 0u64;

        let mut v2_instances: Vec<Dir> = Vec::new();
        let managed_root = self.managed_root.as_str();
        let watcher = &mut self.watcher;
        self.v2_starts = walk(
            &self.layout.v2_root,
            &self.starts,
            &self.exclude,
            self.prune.as_deref(),
            |dir, abs| {
                if let Some(watcher) = watcher.as_mut() {
                    watcher.watch(Tree::V2, dir, abs);
                }
            },
            |dir, abs, has_children| {
                let role =
                    classify_v2(&dir.rel, managed_root, has_children, || cgroupfs::first_pid(abs).is_some());
                if role.instance {
                    if v2_instances.len() < cap {
                        v2_instances.push(dir.clone());
                    } else {
                        skipped += 1;
                    }
                }
                role.descend
            },
        );

        let hybrid = self.layout.is_hybrid();
        let has_v1 = self.layout.v1.is_some();
        let mut found = Vec::with_capacity(v2_instances.len());
        for dir in v2_instances {
            let (memory_v1, cpu_v1, memcg_id) = if has_v1 {
                let link = self.link(&dir);
                let memcg_id = if hybrid { link.memcg_id } else { Some(dir.ino) };
                (link.memory_v1.clone(), link.cpu_v1.clone(), memcg_id)
            } else {
                (None, None, Some(dir.ino))
            };
            found.push(DiscoveredCgroup {
                identity: identify(&dir.rel, &self.managed_root),
                paths: CgroupPaths { v2: Some(dir.rel), memory_v1, cpu_v1 },
                cgroup_id: Some(dir.ino),
                memcg_id,
            });
        }
        let scans = self.scans;
        self.links.retain(|_, link| link.seen_at == scans);

        if hybrid {
            skipped += self.add_v1_only(&mut found);
        }
        self.skipped = skipped;
        self.found = found;

        if let Some(error) = self.watcher.as_mut().and_then(Watcher::end_walk) {
            self.stop_watching(&error);
        }
    }

    /// The v1 cgroups of the v2 instance `dir`, from the cache while it is fresh.
    fn link(&mut self, dir: &Dir) -> &V1Link {
        let scans = self.scans;
        let layout = &self.layout;
        let link = match self.links.entry(dir.rel.clone()) {
            Entry::Occupied(entry) => {
                let link = entry.into_mut();
                // A re-created cgroup has a new inode and maybe new processes.
                let fresh = link.v2_ino == dir.ino
                    && link.resolved
                    && scans.saturating_sub(link.checked_at) < RESOLVE_EVERY_SCANS;
                if !fresh {
                    *link = resolve_link(layout, &dir.rel, dir.ino, scans);
                }
                link
            }
            Entry::Vacant(entry) => entry.insert(resolve_link(layout, &dir.rel, dir.ino, scans)),
        };
        link.seen_at = scans;
        link
    }

    /// Adds the v1 memory cgroups whose processes sit in the v2 root, which no v2 instance covers. Returns
    /// how many did not fit under `max_tracked`.
    fn add_v1_only(&mut self, found: &mut Vec<DiscoveredCgroup>) -> u64 {
        let Some(memory_root) = self.layout.v1.as_ref().and_then(|v1| v1.memory.clone()) else {
            return 0;
        };
        let scans = self.scans;
        let owner_cap = self.max_tracked;
        let owners = &mut self.owners;
        let watcher = &mut self.watcher;
        let mut candidates: Vec<(Dir, Option<String>)> = Vec::new();
        let enter = |dir: &Dir, abs: &Path| {
            if let Some(watcher) = watcher.as_mut() {
                watcher.watch(Tree::MemoryV1, dir, abs);
            }
        };
        let (starts, exclude, prune) = (&self.starts, &self.exclude, self.prune.as_deref());
        let start_inodes = walk(&memory_root, starts, exclude, prune, enter, |dir, abs, _| {
            if dir.rel == "/" {
                return true;
            }
            let cached = owners.get_mut(&dir.rel).filter(|owner| {
                owner.ino == dir.ino && scans.saturating_sub(owner.checked_at) < RESOLVE_EVERY_SCANS
            });
            let owner = match cached {
                Some(owner) => {
                    owner.seen_at = scans;
                    owner.clone()
                }
                None => {
                    let Some(owner) = resolve_owner(abs, dir.ino, scans) else {
                        owners.remove(&dir.rel);
                        return true;
                    };
                    // Bounded like the instances themselves; past it, owners are looked up every walk.
                    if owners.len() < owner_cap || owners.contains_key(&dir.rel) {
                        owners.insert(dir.rel.clone(), owner.clone());
                    }
                    owner
                }
            };
            if owner.v2.as_deref() == Some("/") {
                candidates.push((dir.clone(), owner.cpu_v1));
            }
            true
        });
        self.memory_v1_starts = start_inodes;
        owners.retain(|_, owner| owner.seen_at == scans);

        if candidates.is_empty() {
            return 0;
        }
        let by_v2_path: HashMap<String, usize> =
            found.iter().enumerate().filter_map(|(i, c)| Some((c.paths.v2.clone()?, i))).collect();
        let mut skipped = 0;
        for (dir, cpu_v1) in candidates {
            // A v2 cgroup of the same path would carry the same instance id: complete it instead.
            if let Some(&i) = by_v2_path.get(&dir.rel) {
                let same = &mut found[i];
                if same.paths.memory_v1.is_none() {
                    same.paths.memory_v1 = Some(dir.rel);
                    same.paths.cpu_v1 = same.paths.cpu_v1.take().or(cpu_v1);
                    same.memcg_id = Some(dir.ino);
                }
                continue;
            }
            if found.len() >= self.max_tracked {
                skipped += 1;
                continue;
            }
            found.push(DiscoveredCgroup {
                identity: identify(&dir.rel, &self.managed_root),
                paths: CgroupPaths { v2: None, memory_v1: Some(dir.rel), cpu_v1 },
                cgroup_id: None,
                memcg_id: Some(dir.ino),
            });
        }
        skipped
    }
}

/// Looks up the v1 cgroups of the v2 cgroup `rel` (inode `ino`) through its first process.
fn resolve_link(layout: &Layout, rel: &str, ino: u64, scans: u64) -> V1Link {
    let mut link = V1Link {
        v2_ino: ino,
        checked_at: scans,
        seen_at: scans,
        resolved: false,
        empty: false,
        memory_v1: None,
        cpu_v1: None,
        memcg_id: None,
    };
    let Some(pid) = cgroupfs::first_pid(&layout.v2_dir(rel)) else {
        link.empty = true;
        return link;
    };
    let Some(paths) = cgroupfs::pid_cgroups(pid).ok() else {
        return link;
    };
    link.resolved = true;
    // A process in a v1 root would map the instance to the whole machine's memory and its memcg id to
    // every root process's events: leave such an instance without a v1 cgroup instead.
    link.memory_v1 = paths.memory_v1.filter(|p| p != "/");
    link.cpu_v1 = paths.cpu_v1.filter(|p| p != "/");
    link.memcg_id = link
        .memory_v1
        .as_deref()
        .and_then(|rel| layout.memory_v1_dir(rel))
        .and_then(|dir| fs::symlink_metadata(dir).ok())
        .map(|meta| meta.ino());
    if link.memory_v1.is_some() && link.memcg_id.is_none() {
        // The v1 cgroup vanished after the process was read: unresolved, so it is tried again soon.
        link.memory_v1 = None;
        link.resolved = false;
    }
    link
}

/// Where the first process of the v1 memory cgroup at `abs` sits; `None` while it has none.
fn resolve_owner(abs: &Path, ino: u64, scans: u64) -> Option<V1Owner> {
    let paths = cgroupfs::pid_cgroups(cgroupfs::first_pid(abs)?).ok()?;
    Some(V1Owner {
        ino,
        checked_at: scans,
        seen_at: scans,
        v2: paths.v2,
        cpu_v1: paths.cpu_v1.filter(|p| p != "/"),
    })
}

/// What a scan does with one v2 cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Role {
    instance: bool,
    descend: bool,
}

/// Whether the v2 cgroup `rel` is an instance, and whether its children are worth a look. `has_processes`
/// costs a read, so it is asked only of cgroups with children.
fn classify_v2(
    rel: &str,
    managed_root: &str,
    has_children: bool,
    has_processes: impl FnOnce() -> bool,
) -> Role {
    const ORGANISATIONAL: Role = Role { instance: false, descend: true };
    if rel == "/" {
        return ORGANISATIONAL;
    }
    match managed_depth(rel, managed_root) {
        Some(0 | 1) => ORGANISATIONAL,
        // Whatever a managed instance does below itself belongs to it.
        Some(2) => Role { instance: true, descend: false },
        Some(_) => Role { instance: false, descend: false },
        None => Role { instance: !has_children || has_processes(), descend: true },
    }
}

/// Depth-first walk of the cgroup directories below `root`, starting at each of `starts` (relative paths),
/// skipping `exclude`d subtrees and `prune`. `enter` gets each directory and its absolute path before its
/// entries are read (so a watch it adds sees every later change); `visit` gets it after, with whether it
/// has child cgroups, and says whether to descend into them. Symlinks are never followed; directories that
/// vanish mid-walk are skipped. Returns the inode of each start (`None` where there is no directory).
fn walk(
    root: &Path,
    starts: &[String],
    exclude: &[String],
    prune: Option<&str>,
    mut enter: impl FnMut(&Dir, &Path),
    mut visit: impl FnMut(&Dir, &Path, bool) -> bool,
) -> Vec<Option<u64>> {
    let mut stack: Vec<Dir> = Vec::new();
    let mut children: Vec<Dir> = Vec::new();
    let mut start_inodes = Vec::with_capacity(starts.len());
    for start in starts {
        let ino = start_inode(root, start);
        start_inodes.push(ino);
        let Some(ino) = ino else { continue };
        stack.push(Dir { rel: start.clone(), ino });

        while let Some(dir) = stack.pop() {
            let abs = root.join(dir.rel.trim_start_matches('/'));
            enter(&dir, &abs);
            let entries = match fs::read_dir(&abs) {
                Ok(entries) => entries,
                Err(e) => {
                    log_unexpected(&abs, &e);
                    continue;
                }
            };
            children.clear();
            let mut has_children = false;
            for entry in entries {
                // An error here means the directory went away under the walk.
                let Ok(entry) = entry else { break };
                // The d_type from readdir: no stat, and a symlink is not a directory.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                has_children = true;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    tracing::debug!(dir = %abs.display(), ?name, "skipping a cgroup whose name is not UTF-8");
                    continue;
                };
                let rel = if dir.rel == "/" { format!("/{name}") } else { format!("{}/{name}", dir.rel) };
                if prune == Some(rel.as_str()) || exclude.iter().any(|e| is_under(&rel, e)) {
                    continue;
                }
                children.push(Dir { rel, ino: entry.ino() });
            }
            if visit(&dir, &abs, has_children) {
                // Name order, so that which cgroups fall past `max_tracked` does not change between scans.
                children.sort_unstable_by(|a, b| b.rel.cmp(&a.rel));
                stack.append(&mut children);
            }
        }
    }
    start_inodes
}

/// The inode of the directory `start` below `root`; `None` if there is none (or a symlink).
fn start_inode(root: &Path, start: &str) -> Option<u64> {
    let abs = root.join(start.trim_start_matches('/'));
    match fs::symlink_metadata(&abs) {
        Ok(meta) if meta.is_dir() => Some(meta.ino()),
        Ok(_) => None,
        Err(e) => {
            log_unexpected(&abs, &e);
            None
        }
    }
}

/// The hierarchy a watched directory belongs to: the same relative path can exist in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tree {
    V2,
    MemoryV1,
}

/// What makes a watched directory worth walking again: a child cgroup made, removed or renamed (v1), a
/// write to a file below, the directory itself going away.
const DIR_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);

/// The files whose modification can change which cgroups are instances or what their processes say:
/// `populated` in `cgroup.events`, processes (threads, in v1 `tasks`) moved in by a write. Writes to any
/// other file (limits Vigil or systemd set) change nothing a walk sees.
const MEMBERSHIP_FILES: [&str; 4] = ["cgroup.events", "cgroup.procs", "cgroup.threads", "tasks"];

/// One buffer holds at least one event with the longest name (16 + 256 bytes); a few hundred usually.
const EVENT_BUFFER_BYTES: usize = 4096;

/// An inotify watch on every walked directory, which tells [`Discovery::scan`] whether a walk could find
/// anything new.
struct Watcher {
    inotify: Inotify,
    buffer: Vec<u8>,
    v2: HashMap<String, Watched>,
    memory_v1: HashMap<String, Watched>,
    /// The directory watches held now; events from any other (one just removed, a pin) say nothing new.
    live: HashSet<i32>,
    /// Counts walks, to find the watches of directories the last walk did not meet.
    walk: u64,
    /// The first error adding a watch met during this walk, other than the directory having vanished.
    failed: Option<io::Error>,
}

struct Watched {
    ino: u64,
    dir: WatchDescriptor,
    /// A watch on the directory's `cgroup.events` (v2), held only to keep the file's inode in memory: the
    /// kernel reports a change of `populated` (kernfs_notify) only for a file inode it has in memory, and
    /// then also to the directory's watch, which is where it is read. It listens for an event kernfs never
    /// sends, so it adds nothing to the queue.
    pin: Option<WatchDescriptor>,
    walk: u64,
}

impl Watcher {
    fn new() -> io::Result<Self> {
        Ok(Self {
            inotify: Inotify::init()?,
            buffer: vec![0; EVENT_BUFFER_BYTES],
            v2: HashMap::new(),
            memory_v1: HashMap::new(),
            live: HashSet::new(),
            walk: 0,
            failed: None,
        })
    }

    /// How many directories are watched.
    fn len(&self) -> usize {
        self.v2.len() + self.memory_v1.len()
    }

    /// Reads every queued event without blocking; true if any of them may change what a walk finds.
    fn drain(&mut self) -> io::Result<bool> {
        let mut changed = false;
        loop {
            match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => {
                    for event in events {
                        changed |= is_change(&event, &self.live);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(changed),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn begin_walk(&mut self) {
        self.walk += 1;
    }

    /// Watches `dir` (at `abs`) unless it is watched already. Called before the walk reads the directory.
    fn watch(&mut self, tree: Tree, dir: &Dir, abs: &Path) {
        if self.failed.is_some() {
            return;
        }
        let walk = self.walk;
        let watched = match tree {
            Tree::V2 => &mut self.v2,
            Tree::MemoryV1 => &mut self.memory_v1,
        };
        match watched.get_mut(&dir.rel) {
            Some(known) if known.ino == dir.ino => {
                known.walk = walk;
                return;
            }
            // Re-created under the same name: a new inode, which the old watch does not see.
            Some(_) => {
                if let Some(old) = watched.remove(&dir.rel) {
                    unwatch(&self.inotify, &mut self.live, &old);
                }
            }
            None => {}
        }

        let mut watches = self.inotify.watches();
        let dir_watch = match watches.add(abs, DIR_EVENTS) {
            Ok(wd) => wd,
            // Gone since it was listed: its parent's watch (a start's inode check) reports that.
            Err(e) if vanished(&e) => return,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        let pin = match tree {
            Tree::V2 => match watches.add(abs.join("cgroup.events"), WatchMask::DELETE_SELF) {
                Ok(wd) => Some(wd),
                // The root cgroup has no cgroup.events.
                Err(e) if vanished(&e) => None,
                Err(e) => {
                    let _ = watches.remove(dir_watch);
                    self.failed = Some(e);
                    return;
                }
            },
            Tree::MemoryV1 => None,
        };
        self.live.insert(dir_watch.get_watch_descriptor_id());
        watched.insert(dir.rel.clone(), Watched { ino: dir.ino, dir: dir_watch, pin, walk });
    }

    /// Drops the watches of directories this walk did not meet (removed, or no longer walked). Returns the
    /// error that stopped a watch from being added, if one did: the caller gives up on inotify then.
    fn end_walk(&mut self) -> Option<io::Error> {
        let walk = self.walk;
        let (inotify, live) = (&self.inotify, &mut self.live);
        for watched in [&mut self.v2, &mut self.memory_v1] {
            watched.retain(|_, w| {
                let met = w.walk == walk;
                if !met {
                    unwatch(inotify, live, w);
                }
                met
            });
        }
        self.failed.take()
    }
}

/// Removes the watches of one directory. The kernel may have removed them already (an unmount); and a
/// removed cgroup's watch lingers until removed here, as kernfs reports no IN_DELETE_SELF.
fn unwatch(inotify: &Inotify, live: &mut HashSet<i32>, watched: &Watched) {
    live.remove(&watched.dir.get_watch_descriptor_id());
    let mut watches = inotify.watches();
    let _ = watches.remove(watched.dir.clone());
    if let Some(pin) = &watched.pin {
        let _ = watches.remove(pin.clone());
    }
}

/// Whether an inotify event may change what a walk finds. Events of watches no longer `live` are about
/// directories the last walk did not meet, or the IN_IGNORED that follows removing a watch.
fn is_change(event: &Event<&OsStr>, live: &HashSet<i32>) -> bool {
    let mask = event.mask;
    if mask.contains(EventMask::Q_OVERFLOW) {
        // Events were lost: only a walk knows what they said.
        return true;
    }
    if !live.contains(&event.wd.get_watch_descriptor_id()) {
        return false;
    }
    if mask.intersects(EventMask::CREATE | EventMask::DELETE | EventMask::MOVED_FROM | EventMask::MOVED_TO) {
        return mask.contains(EventMask::ISDIR);
    }
    if mask.contains(EventMask::MODIFY) {
        return event.name.is_some_and(|name| MEMBERSHIP_FILES.iter().any(|file| name == *file));
    }
    // The directory itself went away or moved, or the kernel dropped the watch (IN_IGNORED, unmount).
    mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED | EventMask::UNMOUNT)
}

/// Whether adding a watch failed because the path is gone (or was replaced by a non-directory).
fn vanished(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

fn log_unexpected(path: &Path, error: &io::Error) {
    // Vanishing is what cgroups do; anything else (EACCES, ...) is worth a line when debugging.
    if error.kind() != io::ErrorKind::NotFound {
        tracing::debug!(path = %path.display(), %error, "cannot read cgroup directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service: &str, instance_id: &str, kind: InstanceKind) -> Identity {
        Identity { service: service.to_owned(), instance_id: instance_id.to_owned(), kind }
    }

    #[test]
    fn managed_instances() {
        assert_eq!(identify("/vigil/echo/echo-0", "/vigil"), id("echo", "echo-0", InstanceKind::Managed));
        assert_eq!(identify("/vigil/echo/echo-0", "/vigil/"), id("echo", "echo-0", InstanceKind::Managed));
        assert_eq!(
            identify("/opt.slice/vigil/api/3", "opt.slice/vigil"),
            id("api", "3", InstanceKind::Managed)
        );
        // The managed root and a service's directory are not instances; named like anything else.
        assert_eq!(identify("/vigil", "/vigil"), id("vigil", "cg:/vigil", InstanceKind::Other));
        assert_eq!(identify("/vigil/echo", "/vigil"), id("echo", "cg:/vigil/echo", InstanceKind::Other));
        assert_eq!(
            identify("/vigil/echo/echo-0/sub", "/vigil"),
            id("sub", "cg:/vigil/echo/echo-0/sub", InstanceKind::Other)
        );
        // Whole components only.
        assert_eq!(identify("/vigilant/a/b", "/vigil"), id("b", "cg:/vigilant/a/b", InstanceKind::Other));
    }

    #[test]
    fn kubernetes_systemd_driver() {
        let pod = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        let service = "pod-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        for runtime in ["cri-containerd", "crio", "docker"] {
            let path = format!(
                "{pod}/{runtime}-4f2a9c0e7d1b3a5c6e8f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d.scope"
            );
            assert_eq!(
                identify(&path, "/vigil"),
                id(service, &format!("cg:{path}"), InstanceKind::Kubernetes)
            );
        }
        assert_eq!(identify(pod, "/vigil"), id(service, &format!("cg:{pod}"), InstanceKind::Kubernetes));

        let besteffort = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11112222_3333_4444_5555_666677778888.slice/crio-abc.scope";
        assert_eq!(
            identify(besteffort, "/vigil"),
            id(
                "pod-11112222-3333-4444-5555-666677778888",
                &format!("cg:{besteffort}"),
                InstanceKind::Kubernetes
            )
        );
        // Guaranteed pods sit directly under kubepods.slice.
        let guaranteed = "/kubepods.slice/kubepods-podaaaabbbb_cccc_dddd_eeee_ffff00001111.slice/cri-containerd-0123456789ab.scope";
        assert_eq!(
            identify(guaranteed, "/vigil"),
            id(
                "pod-aaaabbbb-cccc-dddd-eeee-ffff00001111",
                &format!("cg:{guaranteed}"),
                InstanceKind::Kubernetes
            )
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let path = "/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/4f2a9c0e7d1b3a5c6e8f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d";
        assert_eq!(
            identify(path, "/vigil"),
            id("pod-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", &format!("cg:{path}"), InstanceKind::Kubernetes)
        );
        let guaranteed = "/kubepods/pod12345678-90ab-cdef-1234-567890abcdef/0123456789abcdef";
        assert_eq!(identify(guaranteed, "/vigil").service, "pod-12345678-90ab-cdef-1234-567890abcdef");
        // QoS cgroups name no pod.
        assert_eq!(
            identify("/kubepods/burstable", "/vigil"),
            id("burstable", "cg:/kubepods/burstable", InstanceKind::Other)
        );
        // A "pod..." outside kubepods is nothing special.
        assert_eq!(identify("/podcast", "/vigil").kind, InstanceKind::Other);
    }

    #[test]
    fn containers_outside_kubernetes() {
        let hex = "4f2a9c0e7d1b3a5c6e8f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d";
        for path in [
            format!("/system.slice/docker-{hex}.scope"),
            format!("/docker/{hex}"),
            format!("/system.slice/containerd-{hex}.scope"),
            format!("/machine.slice/libpod-{hex}.scope"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{hex}.scope"),
            format!("/libpod_parent/libpod-{hex}"),
        ] {
            assert_eq!(
                identify(&path, "/vigil"),
                id("container-4f2a9c0e7d1b", &format!("cg:{path}"), InstanceKind::Container),
                "{path}"
            );
        }
        // Upper-case hex is folded so one container has one name.
        assert_eq!(identify("/docker/ABCDEF0123456789", "/vigil").service, "container-abcdef012345");
    }

    #[test]
    fn systemd_units() {
        assert_eq!(
            identify("/system.slice/nginx.service", "/vigil"),
            id("nginx", "cg:/system.slice/nginx.service", InstanceKind::SystemdUnit)
        );
        assert_eq!(
            identify("/user.slice/user-1000.slice/user@1000.service", "/vigil"),
            id("user@1000", "cg:/user.slice/user-1000.slice/user@1000.service", InstanceKind::SystemdUnit)
        );
        assert_eq!(
            identify("/user.slice/user-1000.slice/session-3.scope", "/vigil"),
            id("session-3", "cg:/user.slice/user-1000.slice/session-3.scope", InstanceKind::SystemdUnit)
        );
        assert_eq!(identify("/system.slice/getty@tty1.service", "/vigil").service, "getty@tty1");
        assert_eq!(
            identify("/init.scope", "/vigil"),
            id("init", "cg:/init.scope", InstanceKind::SystemdUnit)
        );
        // Not container ids: short or not hex.
        assert_eq!(
            identify("/system.slice/docker-compose@app.service", "/vigil"),
            id(
                "docker-compose@app",
                "cg:/system.slice/docker-compose@app.service",
                InstanceKind::SystemdUnit
            )
        );
        assert_eq!(
            identify("/system.slice/docker.service", "/vigil"),
            id("docker", "cg:/system.slice/docker.service", InstanceKind::SystemdUnit)
        );
        assert_eq!(identify("/system.slice/containerd.service", "/vigil").service, "containerd");
    }

    #[test]
    fn other_cgroups() {
        assert_eq!(
            identify("/process_api/00a9f8fd7e5f636414c0749f6e213935", "/vigil"),
            id(
                "00a9f8fd7e5f636414c0749f6e213935",
                "cg:/process_api/00a9f8fd7e5f636414c0749f6e213935",
                InstanceKind::Other
            )
        );
        assert_eq!(
            identify("/system.slice", "/vigil"),
            id("system.slice", "cg:/system.slice", InstanceKind::Other)
        );
        assert_eq!(identify("/a/.service", "/vigil"), id(".service", "cg:/a/.service", InstanceKind::Other));
        assert_eq!(identify("/", "/vigil"), id("root", "cg:/", InstanceKind::Other));
    }

    #[test]
    fn which_cgroups_are_instances() {
        let never = || panic!("processes need not be read");
        let instance = Role { instance: true, descend: true };
        let organisational = Role { instance: false, descend: true };
        assert_eq!(classify_v2("/", "/vigil", true, never), organisational);
        // A leaf is an instance even while empty; a node with children only if it has processes.
        assert_eq!(classify_v2("/a", "/vigil", false, never), instance);
        assert_eq!(classify_v2("/a", "/vigil", true, || true), instance);
        assert_eq!(classify_v2("/a", "/vigil", true, || false), organisational);
        // Vigil's own tree: root and service directories never, instances always, below them never.
        assert_eq!(classify_v2("/vigil", "/vigil", false, never), organisational);
        assert_eq!(classify_v2("/vigil/echo", "/vigil", false, never), organisational);
        assert_eq!(
            classify_v2("/vigil/echo/0", "/vigil", true, never),
            Role { instance: true, descend: false }
        );
        assert_eq!(
            classify_v2("/vigil/echo/0/x", "/vigil", false, never),
            Role { instance: false, descend: false }
        );
    }

    #[test]
    fn prefixes() {
        assert_eq!(normalize_prefix("/"), "/");
        assert_eq!(normalize_prefix(""), "/");
        assert_eq!(normalize_prefix("a/b/"), "/a/b");
        assert!(is_under("/a/b", "/a"));
        assert!(is_under("/a", "/a"));
        assert!(is_under("/a", "/"));
        assert!(!is_under("/ab", "/a"));
        assert!(!is_under("/a", "/a/b"));
    }

    fn pure_v2() -> Layout {
        Layout { v2_root: "/nonexistent-vigil-test".into(), v1: None }
    }

    #[test]
    fn walk_plan() {
        let plan = |include: &[&str], exclude: &[&str], managed: &str| {
            let d = Discovery::new(
                pure_v2(),
                WatchConfig {
                    include: include.iter().map(|s| s.to_string()).collect(),
                    exclude: exclude.iter().map(|s| s.to_string()).collect(),
                    managed_root: managed.to_owned(),
                    max_tracked: 10,
                },
            );
            (d.starts, d.prune)
        };
        assert_eq!(plan(&["/"], &[], "/vigil"), (vec!["/vigil".into(), "/".into()], Some("/vigil".into())));
        assert_eq!(
            plan(&["/system.slice", "/", "/system.slice/x", "/"], &[], "/vigil"),
            (vec!["/vigil".into(), "/".into()], Some("/vigil".into()))
        );
        assert_eq!(plan(&["/a", "/b/"], &[], "/vigil"), (vec!["/a".into(), "/b".into()], None));
        assert_eq!(plan(&["/"], &["/vigil"], "/vigil"), (vec!["/".into()], None));
        assert_eq!(plan(&["/a"], &["/"], "/vigil"), (vec![], None));
        assert_eq!(plan(&["/vigil"], &[], "/vigil"), (vec!["/vigil".into()], None));
    }

    #[test]
    fn scanning_a_missing_hierarchy_finds_nothing() {
        let mut discovery = Discovery::new(pure_v2(), WatchConfig::default());
        assert_eq!(discovery.scan(), vec![]);
        assert_eq!(discovery.skipped(), 0);
    }

    #[test]
    fn scan_of_a_fake_tree() {
        // Any directory tree will do for the walk; `cgroup.procs` files stand in for processes.
        let root = std::env::temp_dir().join(format!("vigil-discovery-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for dir in [
            "system.slice/nginx.service",
            "system.slice/empty.service",
            "busy/child",
            "vigil/echo/echo-0/inner",
            "vigil/echo/echo-1",
            "skipped/x",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join("busy/cgroup.procs"), "1\n").unwrap();
        std::os::unix::fs::symlink(root.join("system.slice"), root.join("link")).unwrap();

        let layout = Layout { v2_root: root.clone(), v1: None };
        let watch = WatchConfig { exclude: vec!["/skipped".into()], ..WatchConfig::default() };
        let mut discovery = Discovery::new(layout.clone(), watch.clone());
        let found = discovery.scan();
        let paths: Vec<_> = found.iter().filter_map(|c| c.paths.v2.as_deref()).collect();
        assert_eq!(
            paths,
            [
                "/vigil/echo/echo-0",
                "/vigil/echo/echo-1",
                "/busy",
                "/busy/child",
                "/system.slice/empty.service",
                "/system.slice/nginx.service",
            ]
        );
        let echo0 = &found[0];
        let ino = fs::metadata(root.join("vigil/echo/echo-0")).unwrap().ino();
        assert_eq!(echo0.cgroup_id, Some(ino));
        assert_eq!(echo0.memcg_id, Some(ino));
        assert_eq!(echo0.identity, id("echo", "echo-0", InstanceKind::Managed));
        assert_eq!(discovery.skipped(), 0);

        // The cap keeps Vigil's own instances first and counts the rest.
        let mut capped = Discovery::new(layout, WatchConfig { max_tracked: 3, ..watch });
        let found = capped.scan();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].identity.instance_id, "echo-0");
        assert_eq!(found[1].identity.instance_id, "echo-1");
        assert_eq!(capped.skipped(), 3);

        fs::remove_dir_all(&root).unwrap();
        assert_eq!(capped.scan(), vec![]);
        assert_eq!(capped.skipped(), 0);
    }

    #[test]
    fn scans_walk_again_only_after_a_change() {
        let root = std::env::temp_dir().join(format!("vigil-discovery-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for dir in ["a", "b/c"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let paths = |found: &[DiscoveredCgroup]| -> Vec<String> {
            found.iter().filter_map(|c| c.paths.v2.clone()).collect()
        };
        let layout = Layout { v2_root: root.clone(), v1: None };
        let mut discovery = Discovery::new(layout, WatchConfig::default());
        assert!(discovery.watcher.is_some(), "inotify is available");

        let found = discovery.scan();
        assert_eq!(paths(&found), ["/a", "/b/c"]);
        for _ in 0..5 {
            assert_eq!(discovery.scan(), found);
        }
        assert_eq!(discovery.full_scans(), 1, "nothing changed, so nothing was walked again");

        fs::create_dir(root.join("b/d")).unwrap();
        let found = discovery.scan();
        assert_eq!(paths(&found), ["/a", "/b/c", "/b/d"]);
        assert_eq!(discovery.scan(), found);
        assert_eq!(discovery.full_scans(), 2, "a mkdir makes exactly one walk");

        // A limit written changes nothing a walk sees; a process moved in may.
        fs::write(root.join("a/memory.high"), "1\n").unwrap();
        discovery.scan();
        assert_eq!(discovery.full_scans(), 2);
        fs::write(root.join("a/cgroup.procs"), "1\n").unwrap();
        discovery.scan();
        assert_eq!(discovery.full_scans(), 3);

        fs::remove_dir(root.join("b/c")).unwrap();
        fs::remove_dir(root.join("b/d")).unwrap();
        let found = discovery.scan();
        assert_eq!(paths(&found), ["/a", "/b"], "an emptied parent is a leaf, so an instance");
        assert_eq!(discovery.scan(), found, "removing the watches of removed directories is no change");
        assert_eq!(discovery.full_scans(), 4);

        // The safety net: a walk every FULL_SCAN_EVERY_SCANS scans, events or not (one scan since the last).
        let before = discovery.full_scans();
        for _ in 2..FULL_SCAN_EVERY_SCANS {
            discovery.scan();
        }
        assert_eq!(discovery.full_scans(), before);
        discovery.scan();
        assert_eq!(discovery.full_scans(), before + 1);

        // No watch sees the root go (its parent is not watched); its inode is checked every scan.
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(discovery.scan(), vec![]);
        fs::create_dir_all(root.join("e")).unwrap();
        assert_eq!(paths(&discovery.scan()), ["/e"]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn without_inotify_every_scan_walks() {
        let mut discovery = Discovery::new(pure_v2(), WatchConfig::default());
        discovery.watcher = None;
        for _ in 0..3 {
            assert_eq!(discovery.scan(), vec![]);
        }
        assert_eq!(discovery.full_scans(), 3);
    }

    #[test]
    fn watch_config_defaults_and_strictness() {
        let config: WatchConfig = serde_json::from_str(r#"{"exclude": ["/user.slice"]}"#).unwrap();
        assert_eq!(config, WatchConfig { exclude: vec!["/user.slice".into()], ..WatchConfig::default() });
        assert_eq!(WatchConfig::default().include, vec!["/".to_owned()]);
        assert!(serde_json::from_str::<WatchConfig>(r#"{"includes": []}"#).is_err());
    }
}
