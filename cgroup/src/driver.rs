//! The cgroups Vigil gives each instance it manages, behind one [`CgroupDriver`] trait with two
//! implementations: [`V2Driver`] for pure cgroup v2 hosts (the norm on Kubernetes nodes) and
//! [`HybridDriver`] for hosts that keep memory, cpu and cpuset in v1 hierarchies beside a controller-less
//! cgroup2 tree. [`driver_for`] picks one from the host's [`Layout`].
//!
//! Every instance gets its own v2 directory `<v2_parent>/<service>/<instance>` (default parent `/vigil`,
//! the collector's `managed_root`), because the v2 directory is what the probes' cgroup id names and it
//! carries `cgroup.freeze`, which works even without v2 controllers. On hybrid hosts the instance also gets
//! v1 memory, cpu and cpuset cgroups `<own>/vigil/<service>/<instance>`, where `<own>` is this process's
//! own cgroup in that hierarchy: Vigil creates cgroups only below itself (or below a configured parent) and
//! never touches cgroups it did not create.
//!
//! The pure pieces (cpu list parsing, quota arithmetic, `/proc/self/cgroup` lookup) are plain functions with
//! unit tests; the drivers are thin writes of cgroupfs files, checked by the root-only integration tests.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fs::{CgroupPaths, Layout, parse_flat_keyed};

/// The CFS period Vigil writes with a quota: 100 ms is the kernel default, so a fraction maps to the same
/// numbers an operator would write by hand.
const CFS_PERIOD_US: u64 = 100_000;
/// The kernel refuses CFS quotas below 1 ms.
const MIN_CFS_QUOTA_US: u64 = 1_000;
/// How long `set_frozen` waits for the kernel to report the cgroup frozen or thawed. Freezing waits for
/// every task to reach a safe point; tasks in uninterruptible sleep (I/O) can take a while.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CgroupDriverError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still holds processes {pids:?}; stop them before removing it")]
    NotEmpty { path: PathBuf, pids: Vec<u32> },
    #[error("{path}: {what} did not happen within {timeout:?}")]
    Timeout { path: PathBuf, what: &'static str, timeout: Duration },
    #[error("invalid cgroup name component {name:?}: must be non-empty, without '/', and not . or ..")]
    InvalidName { name: String },
    #[error("invalid cpu list {list:?}: {reason}")]
    InvalidCpuList { list: String, reason: &'static str },
    #[error("invalid CPU quota {quota}: must be a finite fraction of one core above 0")]
    InvalidQuota { quota: f64 },
    #[error("invalid content {content:?} in {path}")]
    Parse { path: PathBuf, content: String },
    #[error("this process has no v1 {controller} cgroup in {path}")]
    NoOwnCgroup { controller: &'static str, path: PathBuf },
    #[error("the host has no v1 {controller} hierarchy, which a hybrid driver needs")]
    MissingHierarchy { controller: &'static str },
}

/// One instance's cgroups, as a driver created them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceCgroup {
    pub service: String,
    pub instance: String,
    /// The instance's v2 path relative to the v2 root (`/vigil/<service>/<instance>`).
    pub v2_rel: String,
    /// The instance's v2 directory.
    pub v2_dir: PathBuf,
    /// The v1 memory cgroup's path relative to its hierarchy's root (hybrid hosts only).
    pub memory_v1_rel: Option<String>,
    pub memory_v1_dir: Option<PathBuf>,
    /// The v1 cpu cgroup (hybrid hosts only).
    pub cpu_v1_rel: Option<String>,
    pub cpu_v1_dir: Option<PathBuf>,
    /// The v1 cpuset cgroup (hybrid hosts only).
    pub cpuset_v1_dir: Option<PathBuf>,
}

impl InstanceCgroup {
    /// The relative paths the collector reads this instance's numbers from.
    pub fn paths(&self) -> CgroupPaths {
        CgroupPaths {
            v2: Some(self.v2_rel.clone()),
            memory_v1: self.memory_v1_rel.clone(),
            cpu_v1: self.cpu_v1_rel.clone(),
        }
    }

    /// Every directory of this instance, v2 first.
    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.v2_dir)
            .chain(self.memory_v1_dir.iter())
            .chain(self.cpu_v1_dir.iter())
            .chain(self.cpuset_v1_dir.iter())
    }
}

/// Where an instance may run and how much of a core it may use.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuLimit {
    /// A kernel cpu list (`"3"`, `"0-2,5"`); `None` lets the instance use every CPU its parent has.
    pub cpus: Option<String>,
    /// CPU time per wall time as a fraction of one core (`0.05` = 5 % of a core); `None` means no quota.
    pub quota: Option<f64>,
}

impl CpuLimit {
    /// No cpuset restriction and no quota: what an active instance gets, and what `wake` restores.
    pub fn unlimited() -> CpuLimit {
        CpuLimit { cpus: None, quota: None }
    }

    /// Checks the cpu list and quota so a driver never writes half a limit.
    pub fn validate(&self) -> Result<(), CgroupDriverError> {
        if let Some(cpus) = &self.cpus {
            parse_cpu_list(cpus)?;
        }
        if let Some(quota) = self.quota {
            cfs_quota_us(quota)?;
        }
        Ok(())
    }
}

/// Manages the cgroups of the instances Vigil runs. Every method is idempotent where that makes sense, so a
/// reconcile loop can repeat it after a crash.
pub trait CgroupDriver: Send + Sync {
    /// Creates the instance's cgroups (and their parents) if missing and returns their paths.
    fn create(&self, service: &str, instance: &str) -> Result<InstanceCgroup, CgroupDriverError>;
    /// Moves `pid` (a whole process) into every cgroup of the instance.
    fn add_process(&self, cg: &InstanceCgroup, pid: u32) -> Result<(), CgroupDriverError>;
    /// The processes in the instance's cgroup.
    fn pids(&self, cg: &InstanceCgroup) -> Result<Vec<u32>, CgroupDriverError>;
    /// Freezes or thaws the instance and waits (bounded) until the kernel reports it done.
    fn set_frozen(&self, cg: &InstanceCgroup, frozen: bool) -> Result<(), CgroupDriverError>;
    /// Sets the cpuset and CPU quota; [`CpuLimit::unlimited`] restores the defaults.
    fn set_cpu(&self, cg: &InstanceCgroup, limit: &CpuLimit) -> Result<(), CgroupDriverError>;
    /// The instance's current CPU limit, as read back from cgroupfs: `cpus` is `None` when the instance may
    /// use every CPU of its parent, `quota` is `None` without a quota.
    fn cpu(&self, cg: &InstanceCgroup) -> Result<CpuLimit, CgroupDriverError>;
    /// Makes the memory cgroup give back what it can: pages already written to swap leave the swap cache,
    /// and the rest is reclaimed (v1 `memory.force_empty`, v2 `memory.reclaim`).
    fn reclaim_memory(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError>;
    /// Bytes charged to the instance's memory cgroup.
    fn memory_usage(&self, cg: &InstanceCgroup) -> Result<u64, CgroupDriverError>;
    /// Removes the instance's cgroups (and the service's, once empty). Kills nothing: fails with
    /// [`CgroupDriverError::NotEmpty`] while processes remain.
    fn remove(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError>;
    /// After a CPU came back online: the levels Vigil made above the instance (its parent and the
    /// service's directory) get their parents' CPUs again, so that [`CpuLimit::unlimited`] means every
    /// CPU once more. v1 cpusets lose an offlined CPU for good; v2 ones get it back by themselves, so this
    /// does nothing there.
    fn cpus_back(&self, _cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
        Ok(())
    }
}

/// Where a driver creates instance cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// Parent of all instance cgroups in the v2 hierarchy, relative to the v2 root. Default `/vigil`, the
    /// collector's `managed_root`.
    pub v2_parent: String,
    /// Parent in each v1 hierarchy, relative to its root. `None` (default): this process's own cgroup in
    /// that hierarchy, then `vigil`.
    pub v1_parent: Option<String>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig { v2_parent: "/vigil".into(), v1_parent: None }
    }
}

/// The driver for this host's layout: [`HybridDriver`] when memory lives in a v1 hierarchy, else
/// [`V2Driver`].
pub fn driver_for(
    layout: &Layout,
    config: &DriverConfig,
) -> Result<Box<dyn CgroupDriver>, CgroupDriverError> {
    if layout.is_hybrid() {
        Ok(Box::new(HybridDriver::new(layout, config)?))
    } else {
        Ok(Box::new(V2Driver::new(layout, config)))
    }
}

/// Pure cgroup v2: one directory per instance with the memory, cpu and cpuset controllers enabled above it.
#[derive(Clone, Debug)]
pub struct V2Driver {
    v2_root: PathBuf,
    parent_rel: String,
}

impl V2Driver {
    pub fn new(layout: &Layout, config: &DriverConfig) -> V2Driver {
        V2Driver { v2_root: layout.v2_root.clone(), parent_rel: normalize_rel(&config.v2_parent) }
    }

    /// Enables `controllers` in `subtree_control` of `dir`, leaving out those the kernel does not offer there
    /// (then the files that need them are missing and their writes fail with a clear path).
    fn enable_controllers(dir: &Path, controllers: &[&str]) -> Result<(), CgroupDriverError> {
        let available = read_trimmed(&dir.join("cgroup.controllers"))?;
        let enabled = read_trimmed(&dir.join("cgroup.subtree_control"))?;
        let wanted: Vec<String> = controllers
            .iter()
            .filter(|c| available.split(' ').any(|a| a == **c) && !enabled.split(' ').any(|e| e == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        write_file(&dir.join("cgroup.subtree_control"), &wanted.join(" "))
    }
}

const V2_CONTROLLERS: [&str; 3] = ["cpu", "cpuset", "memory"];

impl CgroupDriver for V2Driver {
    fn create(&self, service: &str, instance: &str) -> Result<InstanceCgroup, CgroupDriverError> {
        check_name(service)?;
        check_name(instance)?;
        let v2_rel = format!("{}/{service}/{instance}", self.parent_rel.trim_end_matches('/'));
        // Controllers must be enabled in every ancestor's subtree_control, from the configured parent's own
        // parent down to the service directory; the instance directory is a leaf and holds the processes.
        let parent_dir = join_rel(&self.v2_root, &self.parent_rel);
        let mut levels =
            vec![parent_dir.parent().map(Path::to_path_buf).unwrap_or_else(|| self.v2_root.clone())];
        levels.push(parent_dir.clone());
        levels.push(parent_dir.join(service));
        let v2_dir = parent_dir.join(service).join(instance);
        create_chain(&self.v2_root, &v2_dir, |_| Ok(()))?;
        for level in levels.iter().filter(|l| l.starts_with(&self.v2_root)) {
            V2Driver::enable_controllers(level, &V2_CONTROLLERS)?;
        }
        Ok(InstanceCgroup {
            service: service.into(),
            instance: instance.into(),
            v2_rel,
            v2_dir,
            memory_v1_rel: None,
            memory_v1_dir: None,
            cpu_v1_rel: None,
            cpu_v1_dir: None,
            cpuset_v1_dir: None,
        })
    }

    fn add_process(&self, cg: &InstanceCgroup, pid: u32) -> Result<(), CgroupDriverError> {
        write_file(&cg.v2_dir.join("cgroup.procs"), &pid.to_string())
    }

    fn pids(&self, cg: &InstanceCgroup) -> Result<Vec<u32>, CgroupDriverError> {
        read_pids(&cg.v2_dir)
    }

    fn set_frozen(&self, cg: &InstanceCgroup, frozen: bool) -> Result<(), CgroupDriverError> {
        v2_set_frozen(&cg.v2_dir, frozen)
    }

    fn set_cpu(&self, cg: &InstanceCgroup, limit: &CpuLimit) -> Result<(), CgroupDriverError> {
        limit.validate()?;
        // An empty cpuset.cpus makes a v2 cpuset inherit its parent's CPUs.
        write_file(&cg.v2_dir.join("cpuset.cpus"), limit.cpus.as_deref().unwrap_or(""))?;
        let max = match limit.quota {
            Some(q) => format!("{} {CFS_PERIOD_US}", cfs_quota_us(q)?),
            None => format!("max {CFS_PERIOD_US}"),
        };
        write_file(&cg.v2_dir.join("cpu.max"), &max)
    }

    fn cpu(&self, cg: &InstanceCgroup) -> Result<CpuLimit, CgroupDriverError> {
        let cpus = read_trimmed(&cg.v2_dir.join("cpuset.cpus"))?;
        let path = cg.v2_dir.join("cpu.max");
        let max = read_trimmed(&path)?;
        let quota = parse_cpu_max(&max).ok_or(CgroupDriverError::Parse { path, content: max })?;
        Ok(CpuLimit { cpus: (!cpus.is_empty()).then_some(cpus), quota })
    }

    fn reclaim_memory(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
        let usage = self.memory_usage(cg)?;
        if usage == 0 {
            return Ok(());
        }
        // Asking for everything: the kernel reclaims what it can and answers EAGAIN when it falls short,
        // which is the expected outcome for a live (frozen) instance, not a failure.
        let path = cg.v2_dir.join("memory.reclaim");
        match fs::write(&path, usage.to_string()) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
            Err(source) => Err(CgroupDriverError::Write { path, value: usage.to_string(), source }),
        }
    }

    fn memory_usage(&self, cg: &InstanceCgroup) -> Result<u64, CgroupDriverError> {
        read_u64(&cg.v2_dir.join("memory.current"))
    }

    fn remove(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
        remove_instance(self, cg)
    }
}

/// Hybrid hosts: memory, cpu and cpuset in v1 cgroups nested under Vigil's own, freezing and the cgroup id
/// through the controller-less v2 tree.
#[derive(Clone, Debug)]
pub struct HybridDriver {
    v2_root: PathBuf,
    v2_parent_rel: String,
    memory: V1Hierarchy,
    cpu: V1Hierarchy,
    cpuset: V1Hierarchy,
}

/// One v1 hierarchy: its mount point and the parent of instance cgroups in it.
#[derive(Clone, Debug)]
struct V1Hierarchy {
    mount: PathBuf,
    parent_rel: String,
}

impl V1Hierarchy {
    fn rel(&self, service: &str, instance: &str) -> String {
        format!("{}/{service}/{instance}", self.parent_rel.trim_end_matches('/'))
    }
}

impl HybridDriver {
    /// Resolves each v1 parent: the configured one, or this process's own cgroup plus `vigil`.
    pub fn new(layout: &Layout, config: &DriverConfig) -> Result<HybridDriver, CgroupDriverError> {
        let v1 = layout.v1.as_ref();
        let own_text = if config.v1_parent.is_none() {
            Some(
                fs::read_to_string("/proc/self/cgroup")
                    .map_err(|source| CgroupDriverError::Read { path: "/proc/self/cgroup".into(), source })?,
            )
        } else {
            None
        };
        let hierarchy = |controller: &'static str, mount: Option<&PathBuf>| {
            let mount = mount.cloned().ok_or(CgroupDriverError::MissingHierarchy { controller })?;
            let parent_rel = match &config.v1_parent {
                Some(parent) => normalize_rel(parent),
                None => {
                    let own = own_v1_cgroup(own_text.as_deref().unwrap_or(""), controller).ok_or(
                        CgroupDriverError::NoOwnCgroup { controller, path: "/proc/self/cgroup".into() },
                    )?;
                    format!("{}/vigil", own.trim_end_matches('/'))
                }
            };
            Ok::<_, CgroupDriverError>(V1Hierarchy { mount, parent_rel })
        };
        Ok(HybridDriver {
            v2_root: layout.v2_root.clone(),
            v2_parent_rel: normalize_rel(&config.v2_parent),
            memory: hierarchy("memory", v1.and_then(|v| v.memory.as_ref()))?,
            cpu: hierarchy("cpu", v1.and_then(|v| v.cpu.as_ref()))?,
            cpuset: hierarchy("cpuset", v1.and_then(|v| v.cpuset.as_ref()))?,
        })
    }

    fn cpuset_dir<'a>(&self, cg: &'a InstanceCgroup) -> Result<&'a PathBuf, CgroupDriverError> {
        cg.cpuset_v1_dir.as_ref().ok_or(CgroupDriverError::MissingHierarchy { controller: "cpuset" })
    }

    fn cpu_dir<'a>(&self, cg: &'a InstanceCgroup) -> Result<&'a PathBuf, CgroupDriverError> {
        cg.cpu_v1_dir.as_ref().ok_or(CgroupDriverError::MissingHierarchy { controller: "cpu" })
    }

    fn memory_dir<'a>(&self, cg: &'a InstanceCgroup) -> Result<&'a PathBuf, CgroupDriverError> {
        cg.memory_v1_dir.as_ref().ok_or(CgroupDriverError::MissingHierarchy { controller: "memory" })
    }
}

impl CgroupDriver for HybridDriver {
    fn create(&self, service: &str, instance: &str) -> Result<InstanceCgroup, CgroupDriverError> {
        check_name(service)?;
        check_name(instance)?;
        let v2_rel = format!("{}/{service}/{instance}", self.v2_parent_rel.trim_end_matches('/'));
        let v2_dir = join_rel(&self.v2_root, &v2_rel);
        create_chain(&self.v2_root, &v2_dir, |_| Ok(()))?;

        let memory_rel = self.memory.rel(service, instance);
        let memory_dir = join_rel(&self.memory.mount, &memory_rel);
        create_chain(&self.memory.mount, &memory_dir, |_| Ok(()))?;

        let cpu_rel = self.cpu.rel(service, instance);
        let cpu_dir = join_rel(&self.cpu.mount, &cpu_rel);
        create_chain(&self.cpu.mount, &cpu_dir, |_| Ok(()))?;

        // A new v1 cpuset starts with empty cpus and mems and refuses tasks until both are set; copying the
        // parent's makes each level as wide as its parent (cgroup.clone_children would do the same, but
        // setting it would modify a cgroup Vigil did not create).
        let cpuset_dir = join_rel(&self.cpuset.mount, &self.cpuset.rel(service, instance));
        create_chain(&self.cpuset.mount, &cpuset_dir, |dir| {
            let parent = dir.parent().unwrap_or(dir);
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if read_trimmed(&dir.join(file))?.is_empty() {
                    write_file(&dir.join(file), &read_trimmed(&parent.join(file))?)?;
                }
            }
            Ok(())
        })?;

        Ok(InstanceCgroup {
            service: service.into(),
            instance: instance.into(),
            v2_rel,
            v2_dir,
            memory_v1_rel: Some(memory_rel),
            memory_v1_dir: Some(memory_dir),
            cpu_v1_rel: Some(cpu_rel),
            cpu_v1_dir: Some(cpu_dir),
            cpuset_v1_dir: Some(cpuset_dir),
        })
    }

    fn add_process(&self, cg: &InstanceCgroup, pid: u32) -> Result<(), CgroupDriverError> {
        // Memory first, so nothing the process allocates from here on is charged elsewhere.
        for dir in [self.memory_dir(cg)?, self.cpuset_dir(cg)?, self.cpu_dir(cg)?, &cg.v2_dir] {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn pids(&self, cg: &InstanceCgroup) -> Result<Vec<u32>, CgroupDriverError> {
        read_pids(&cg.v2_dir)
    }

    fn set_frozen(&self, cg: &InstanceCgroup, frozen: bool) -> Result<(), CgroupDriverError> {
        v2_set_frozen(&cg.v2_dir, frozen)
    }

    fn set_cpu(&self, cg: &InstanceCgroup, limit: &CpuLimit) -> Result<(), CgroupDriverError> {
        limit.validate()?;
        let cpuset = self.cpuset_dir(cg)?;
        let cpus = match &limit.cpus {
            Some(cpus) => cpus.clone(),
            // v1 has no "inherit": unlimited means the parent's CPUs, which are the CPUs Vigil may hand out.
            None => read_trimmed(&cpuset.parent().unwrap_or(cpuset).join("cpuset.cpus"))?,
        };
        write_file(&cpuset.join("cpuset.cpus"), &cpus)?;
        let cpu = self.cpu_dir(cg)?;
        match limit.quota {
            Some(q) => {
                // Period before quota: the kernel checks the quota against the period in force.
                write_file(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                write_file(&cpu.join("cpu.cfs_quota_us"), &cfs_quota_us(q)?.to_string())
            }
            None => write_file(&cpu.join("cpu.cfs_quota_us"), "-1"),
        }
    }

    fn cpu(&self, cg: &InstanceCgroup) -> Result<CpuLimit, CgroupDriverError> {
        let cpuset = self.cpuset_dir(cg)?;
        let cpus = read_trimmed(&cpuset.join("cpuset.cpus"))?;
        let parent_cpus = read_trimmed(&cpuset.parent().unwrap_or(cpuset).join("cpuset.cpus"))?;
        let cpu = self.cpu_dir(cg)?;
        let quota_path = cpu.join("cpu.cfs_quota_us");
        let quota_text = read_trimmed(&quota_path)?;
        let quota_us: i64 = quota_text
            .parse()
            .map_err(|_| CgroupDriverError::Parse { path: quota_path, content: quota_text })?;
        let period_us = read_u64(&cpu.join("cpu.cfs_period_us"))?;
        let quota = (quota_us >= 0 && period_us > 0).then(|| quota_us as f64 / period_us as f64);
        Ok(CpuLimit { cpus: (cpus != parent_cpus).then_some(cpus), quota })
    }

    fn reclaim_memory(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
        write_file(&self.memory_dir(cg)?.join("memory.force_empty"), "0")
    }

    fn memory_usage(&self, cg: &InstanceCgroup) -> Result<u64, CgroupDriverError> {
        read_u64(&self.memory_dir(cg)?.join("memory.usage_in_bytes"))
    }

    fn remove(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
        remove_instance(self, cg)
    }

    fn cpus_back(&self, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
        let top = join_rel(&self.cpuset.mount, &self.cpuset.parent_rel);
        if top == self.cpuset.mount {
            // The hierarchy's root follows the online CPUs itself, and is not Vigil's.
            return Ok(());
        }
        for dir in [top.clone(), top.join(&cg.service)] {
            let parent = dir.parent().unwrap_or(&dir).to_path_buf();
            let wide = read_trimmed(&parent.join("cpuset.cpus"))?;
            if read_trimmed(&dir.join("cpuset.cpus"))? != wide {
                write_file(&dir.join("cpuset.cpus"), &wide)?;
            }
        }
        Ok(())
    }
}

/// Removes every directory of `cg`, then its service directory where that is empty. Parents Vigil did not
/// create (above the configured parent) are left alone.
fn remove_instance(driver: &dyn CgroupDriver, cg: &InstanceCgroup) -> Result<(), CgroupDriverError> {
    let pids = driver.pids(cg)?;
    if !pids.is_empty() {
        return Err(CgroupDriverError::NotEmpty { path: cg.v2_dir.clone(), pids });
    }
    for dir in cg.dirs() {
        // On hybrid hosts a process may sit in a v1 cgroup after leaving the v2 one.
        if dir != &cg.v2_dir {
            let pids = read_pids(dir).unwrap_or_default();
            if !pids.is_empty() {
                return Err(CgroupDriverError::NotEmpty { path: dir.clone(), pids });
            }
        }
        remove_dir(dir)?;
        // The service directory goes once its last instance has; another instance keeps it (ENOTEMPTY or
        // EBUSY), which is fine.
        if let Some(service_dir) = dir.parent() {
            let _ = fs::remove_dir(service_dir);
        }
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<(), CgroupDriverError> {
    // An exiting task leaves the cgroup a moment after it disappears from cgroup.procs, so EBUSY is
    // retried briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(CgroupDriverError::Remove { path: dir.to_path_buf(), source }),
        }
    }
}

/// Writes `cgroup.freeze` and waits until `cgroup.events` says `frozen` matches.
fn v2_set_frozen(dir: &Path, frozen: bool) -> Result<(), CgroupDriverError> {
    write_file(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let events = dir.join("cgroup.events");
    let want = u64::from(frozen);
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    loop {
        let text = fs::read_to_string(&events)
            .map_err(|source| CgroupDriverError::Read { path: events.clone(), source })?;
        if parse_flat_keyed(&text).any(|(k, v)| k == "frozen" && v == want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let what = if frozen { "freezing" } else { "thawing" };
            return Err(CgroupDriverError::Timeout { path: events, what, timeout: FREEZE_TIMEOUT });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Creates `target` and each missing directory between `root` and it, calling `init` on every directory of
/// the chain below `root` (new or not, so an interrupted earlier create is completed).
fn create_chain(
    root: &Path,
    target: &Path,
    init: impl Fn(&Path) -> Result<(), CgroupDriverError>,
) -> Result<(), CgroupDriverError> {
    let Ok(below) = target.strip_prefix(root) else {
        return Err(CgroupDriverError::Create {
            path: target.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("not below {}", root.display())),
        });
    };
    let mut dir = root.to_path_buf();
    for part in below.components() {
        dir.push(part);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupDriverError::Create { path: dir, source }),
        }
        init(&dir)?;
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), CgroupDriverError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(CgroupDriverError::InvalidName { name: name.into() });
    }
    Ok(())
}

/// `"vigil/"` → `"/vigil"`, `""` → `"/"`.
fn normalize_rel(rel: &str) -> String {
    let trimmed = rel.trim_matches('/');
    format!("/{trimmed}")
}

fn join_rel(root: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() { root.to_path_buf() } else { root.join(rel) }
}

fn read_trimmed(path: &Path) -> Result<String, CgroupDriverError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| CgroupDriverError::Read { path: path.to_path_buf(), source })
}

fn read_u64(path: &Path) -> Result<u64, CgroupDriverError> {
    let text = read_trimmed(path)?;
    text.parse().map_err(|_| CgroupDriverError::Parse { path: path.to_path_buf(), content: text })
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupDriverError> {
    fs::write(path, value).map_err(|source| CgroupDriverError::Write {
        path: path.to_path_buf(),
        value: value.into(),
        source,
    })
}

fn read_pids(dir: &Path) -> Result<Vec<u32>, CgroupDriverError> {
    let path = dir.join("cgroup.procs");
    let text = read_trimmed(&path)?;
    text.lines()
        .map(|l| {
            l.trim().parse().map_err(|_| CgroupDriverError::Parse { path: path.clone(), content: l.into() })
        })
        .collect()
}

/// The CFS quota in microseconds per [`CFS_PERIOD_US`] for a fraction of one core, at least the kernel's
/// minimum of 1 ms.
pub fn cfs_quota_us(fraction: f64) -> Result<u64, CgroupDriverError> {
    if !fraction.is_finite() || fraction <= 0.0 || fraction > 1e6 {
        return Err(CgroupDriverError::InvalidQuota { quota: fraction });
    }
    Ok(((fraction * CFS_PERIOD_US as f64).round() as u64).max(MIN_CFS_QUOTA_US))
}

/// Parses v2 `cpu.max` (`"max 100000"` or `"5000 100000"`) into a fraction of a core; `Some(None)` is
/// unlimited.
pub fn parse_cpu_max(text: &str) -> Option<Option<f64>> {
    let (quota, period) = text.trim().split_once(' ')?;
    let period: u64 = period.parse().ok().filter(|p| *p > 0)?;
    if quota == "max" {
        return Some(None);
    }
    let quota: u64 = quota.parse().ok()?;
    Some(Some(quota as f64 / period as f64))
}

/// Parses a kernel cpu list (`"0-3,5"`) into CPU numbers, in order (the config's `pool_cpus` is read by
/// the same parser).
pub fn parse_cpu_list(list: &str) -> Result<Vec<u32>, CgroupDriverError> {
    vigil_core::values::parse_cpu_list(list).map_err(|e| match e {
        vigil_core::values::ValueError::NotACpuList { list, reason } => {
            CgroupDriverError::InvalidCpuList { list, reason }
        }
        _ => {
            CgroupDriverError::InvalidCpuList { list: list.into(), reason: "expected CPU numbers like 0-3,5" }
        }
    })
}

/// The path of this process's cgroup in the v1 hierarchy of `controller`, from `/proc/self/cgroup` text.
pub fn own_v1_cgroup(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let _id = fields.next()?;
        let controllers = fields.next()?;
        let path = fields.next()?;
        (controllers.split(',').any(|c| c == controller) && path.starts_with('/')).then(|| path.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
        assert_eq!(parse_cpu_list("0-2,5\n").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("1,,2").is_err());
    }

    #[test]
    fn quotas() {
        assert_eq!(cfs_quota_us(0.05).unwrap(), 5_000);
        assert_eq!(cfs_quota_us(2.0).unwrap(), 200_000);
        // Below the kernel's 1 ms minimum.
        assert_eq!(cfs_quota_us(0.001).unwrap(), 1_000);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(cfs_quota_us(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpu_max("max 100000\n"), Some(None));
        assert_eq!(parse_cpu_max("5000 100000"), Some(Some(0.05)));
        assert_eq!(parse_cpu_max("5000 0"), None);
        assert_eq!(parse_cpu_max("x"), None);
    }

    #[test]
    fn own_cgroup_lookup() {
        let text = "9:name=systemd:/\n4:memory:/process_api/7f52\n3:cpuset:/\n1:cpu,cpuacct:/a:b\n0::/\n";
        assert_eq!(own_v1_cgroup(text, "memory").as_deref(), Some("/process_api/7f52"));
        assert_eq!(own_v1_cgroup(text, "cpuset").as_deref(), Some("/"));
        assert_eq!(own_v1_cgroup(text, "cpu").as_deref(), Some("/a:b"));
        assert_eq!(own_v1_cgroup(text, "freezer"), None);
    }

    #[test]
    fn names_and_paths() {
        assert!(check_name("echo").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_rel("vigil/"), "/vigil");
        assert_eq!(normalize_rel(""), "/");
        assert_eq!(join_rel(Path::new("/sys/fs/cgroup"), "/"), PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn hybrid_driver_nests_under_its_own_cgroups() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw
32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        let layout = Layout::from_mountinfo(mountinfo).unwrap();
        let config = DriverConfig { v2_parent: "/vigil".into(), v1_parent: Some("/ops/vigil".into()) };
        let driver = HybridDriver::new(&layout, &config).unwrap();
        assert_eq!(driver.memory.rel("echo", "0"), "/ops/vigil/echo/0");
        assert_eq!(driver.cpuset.mount, PathBuf::from("/sys/fs/cgroup/cpuset"));
    }
}
