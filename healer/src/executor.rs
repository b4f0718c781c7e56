//! The real executor: hibernate and wake Vigil-managed instances with the low-power standby, keeping the
//! instance's lifecycle state and hooks in step. It talks to whoever owns the instances through
//! [`InstanceRegistry`] (the supervisor), so it can be driven by a fake in tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cgroup::{CgroupDriver, InstanceCgroup};
use crate::engine::Executor;
use crate::metrics::StandbyMetrics;
use crate::rules::{Action, InstanceState};
use crate::standby::{self, KernelMemory, MemoryOps, StandbyPolicy, WorkingSet};

/// Hooks a service may declare around standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    PreHibernate,
    PostWake,
}

/// What the executor needs from the owner of the instances. Blocking calls: the executor runs off the
/// async runtime.
pub trait InstanceRegistry: Send + Sync {
    fn cgroup(&self, instance_id: &str) -> Option<InstanceCgroup>;
    fn state(&self, instance_id: &str) -> Option<InstanceState>;
    fn set_state(&self, instance_id: &str, state: InstanceState) -> bool;
    /// Runs the hook if the service declares one.
    fn run_hook(&self, instance_id: &str, hook: Hook) -> Result<(), String>;
    /// Waits until the readiness check passes.
    fn wait_ready(&self, instance_id: &str, timeout: Duration) -> Result<(), String>;
    /// `(instances, in standby or in transition)` of a service.
    fn standby_counts(&self, _service: &str) -> Option<(usize, usize)> {
        None
    }
    /// Requests the instance is serving now (0 where unknown).
    fn inflight(&self, _instance_id: &str) -> usize {
        0
    }
    /// Stops the instance until demand starts it again (services started on demand only).
    fn stop_until_demand(&self, instance_id: &str) -> Result<(), String> {
        Err(format!("{instance_id} cannot be stopped until demand"))
    }
}

/// How long hibernate waits for in-flight requests to finish before it goes ahead anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Standby results kept for the API and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StandbyRecord {
    pub memory_before: u64,
    pub memory_after: u64,
    pub memory_kept_resident: bool,
    pub hibernate_seconds: f64,
    pub wake_seconds: Option<f64>,
    pub prefetch_bytes: u64,
}

pub struct StandbyExecutor<R: InstanceRegistry> {
    registry: Arc<R>,
    driver: Arc<dyn CgroupDriver>,
    memory: Arc<dyn MemoryOps>,
    policy: StandbyPolicy,
    ready_timeout: Duration,
    drain_timeout: Duration,
    /// Working sets of hibernated instances, needed to wake them.
    working_sets: Mutex<HashMap<String, WorkingSet>>,
    records: Mutex<HashMap<String, StandbyRecord>>,
    metrics: StandbyMetrics,
}

impl<R: InstanceRegistry> StandbyExecutor<R> {
    /// On the real kernel.
    pub fn new(registry: Arc<R>, driver: Arc<dyn CgroupDriver>, policy: StandbyPolicy) -> Self {
        Self::with_memory(registry, driver, Arc::new(KernelMemory), policy)
    }

    pub fn with_memory(
        registry: Arc<R>,
        driver: Arc<dyn CgroupDriver>,
        memory: Arc<dyn MemoryOps>,
        policy: StandbyPolicy,
    ) -> Self {
        Self {
            registry,
            driver,
            memory,
            policy,
            ready_timeout: Duration::from_secs(30),
            drain_timeout: DRAIN_TIMEOUT,
            working_sets: Mutex::new(HashMap::new()),
            records: Mutex::new(HashMap::new()),
            metrics: StandbyMetrics::default(),
        }
    }

    pub fn metrics(&self) -> &StandbyMetrics {
        &self.metrics
    }

    pub fn record(&self, instance_id: &str) -> Option<StandbyRecord> {
        self.records.lock().ok()?.get(instance_id).cloned()
    }

    fn hibernate(&self, id: &str) -> Result<(), String> {
        match self.registry.state(id) {
            None => return Err(format!("no managed instance `{id}`")),
            Some(InstanceState::Hibernated) => return Ok(()),
            Some(InstanceState::Active) => {}
            Some(other) => {
                return Err(format!("instance `{id}` is {} and cannot hibernate now", other.as_str()));
            }
        }
        let cg = self.registry.cgroup(id).ok_or_else(|| format!("instance `{id}` has no cgroup"))?;
        self.registry.set_state(id, InstanceState::Hibernating);
        // Let in-flight work finish (bounded) before the instance is frozen under it.
        let deadline = std::time::Instant::now() + self.drain_timeout;
        while self.registry.inflight(id) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = self.registry.run_hook(id, Hook::PreHibernate) {
            self.registry.set_state(id, InstanceState::Active);
            return Err(format!("pre-hibernate hook of `{id}` failed: {e}"));
        }
        match standby::hibernate_with(self.driver.as_ref(), self.memory.as_ref(), &cg, &self.policy) {
            Ok(report) => {
                if report.memory_kept_resident {
                    tracing::warn!(instance = id, "{}", report.message);
                }
                let record = StandbyRecord {
                    memory_before: report.memory_before,
                    memory_after: report.memory_after,
                    memory_kept_resident: report.memory_kept_resident,
                    hibernate_seconds: report.seconds,
                    ..StandbyRecord::default()
                };
                self.metrics.released_bytes.inc_by(report.memory_before.saturating_sub(report.memory_after));
                if let Ok(mut m) = self.working_sets.lock() {
                    m.insert(id.to_string(), report.working_set);
                }
                if let Ok(mut m) = self.records.lock() {
                    m.insert(id.to_string(), record);
                }
                self.registry.set_state(id, InstanceState::Hibernated);
                Ok(())
            }
            Err(e) => {
                // standby::hibernate thaws on failure; the instance keeps serving.
                self.registry.set_state(id, InstanceState::Active);
                Err(format!("hibernating `{id}`: {e}"))
            }
        }
    }

    fn wake(&self, id: &str) -> Result<(), String> {
        match self.registry.state(id) {
            None => return Err(format!("no managed instance `{id}`")),
            Some(InstanceState::Active) => return Ok(()),
            Some(InstanceState::Hibernated) => {}
            Some(other) => return Err(format!("instance `{id}` is {} and cannot wake now", other.as_str())),
        }
        let cg = self.registry.cgroup(id).ok_or_else(|| format!("instance `{id}` has no cgroup"))?;
        self.registry.set_state(id, InstanceState::Waking);
        let ws = self.working_sets.lock().ok().and_then(|mut m| m.remove(id)).unwrap_or_default();
        let report =
            standby::wake_with(self.driver.as_ref(), self.memory.as_ref(), &cg, &ws).map_err(|e| {
                self.registry.set_state(id, InstanceState::Failed);
                format!("waking `{id}`: {e}")
            })?;
        if let Ok(mut m) = self.records.lock()
            && let Some(r) = m.get_mut(id)
        {
            r.wake_seconds = Some(report.seconds);
            r.prefetch_bytes = report.prefetch.as_ref().map_or(0, |p| p.advised_bytes);
        }
        if let Some(p) = &report.prefetch {
            self.metrics.prefetched_bytes.inc_by(p.advised_bytes);
            self.metrics.prefetch_seconds.inc_by(p.seconds);
        }
        self.registry
            .run_hook(id, Hook::PostWake)
            .map_err(|e| format!("post-wake hook of `{id}` failed: {e}"))?;
        self.registry
            .wait_ready(id, self.ready_timeout)
            .map_err(|e| format!("`{id}` not ready after wake: {e}"))?;
        self.registry.set_state(id, InstanceState::Active);
        Ok(())
    }
}

impl<R: InstanceRegistry> Executor for StandbyExecutor<R> {
    fn execute(&self, action: Action, _service: &str, instance_id: &str) -> Result<(), String> {
        match action {
            Action::Hibernate => self.hibernate(instance_id),
            Action::Wake => self.wake(instance_id),
            Action::Notify => {
                tracing::warn!(instance = instance_id, "rule notification");
                Ok(())
            }
            Action::Restart => Err("restart is not implemented by the standby executor yet".into()),
            Action::Stop => self.registry.stop_until_demand(instance_id),
        }
    }

    fn standby_counts(&self, service: &str) -> Option<(usize, usize)> {
        self.registry.standby_counts(service)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cgroup::{CgroupDriverError, CpuLimit};
    use crate::standby::{PageOutReport, PrefetchReport, ProcessWorkingSet, StandbyError};

    #[derive(Default)]
    struct Registry {
        states: Mutex<HashMap<String, InstanceState>>,
        log: Mutex<Vec<String>>,
        hook_fails: bool,
        /// In-flight requests reported, one fewer each time asked.
        inflight: Mutex<usize>,
    }

    impl InstanceRegistry for Registry {
        fn cgroup(&self, id: &str) -> Option<InstanceCgroup> {
            Some(InstanceCgroup {
                service: "echo".into(),
                instance: id.into(),
                v2_rel: format!("/vigil/echo/{id}"),
                v2_dir: PathBuf::from("/nonexistent"),
                memory_v1_rel: None,
                memory_v1_dir: None,
                cpu_v1_rel: None,
                cpu_v1_dir: None,
                cpuset_v1_dir: None,
            })
        }
        fn state(&self, id: &str) -> Option<InstanceState> {
            self.states.lock().unwrap().get(id).copied()
        }
        fn set_state(&self, id: &str, state: InstanceState) -> bool {
            self.log.lock().unwrap().push(format!("state {}", state.as_str()));
            self.states.lock().unwrap().insert(id.into(), state).is_some()
        }
        fn run_hook(&self, _id: &str, hook: Hook) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("hook {hook:?}"));
            if self.hook_fails { Err("exit status 1".into()) } else { Ok(()) }
        }
        fn wait_ready(&self, _id: &str, _timeout: Duration) -> Result<(), String> {
            self.log.lock().unwrap().push("ready".into());
            Ok(())
        }
        fn inflight(&self, _id: &str) -> usize {
            let mut n = self.inflight.lock().unwrap();
            let now = *n;
            *n = n.saturating_sub(1);
            now
        }
    }

    /// A driver that accepts everything and reports fixed memory: 100 before, 5 after a reclaim.
    #[derive(Default)]
    struct Driver {
        reclaimed: Mutex<bool>,
    }

    impl CgroupDriver for Driver {
        fn create(&self, _: &str, _: &str) -> Result<InstanceCgroup, CgroupDriverError> {
            unimplemented!("not used by the executor")
        }
        fn add_process(&self, _: &InstanceCgroup, _: u32) -> Result<(), CgroupDriverError> {
            Ok(())
        }
        fn pids(&self, _: &InstanceCgroup) -> Result<Vec<u32>, CgroupDriverError> {
            Ok(vec![42])
        }
        fn set_frozen(&self, _: &InstanceCgroup, _: bool) -> Result<(), CgroupDriverError> {
            Ok(())
        }
        fn set_cpu(&self, _: &InstanceCgroup, _: &CpuLimit) -> Result<(), CgroupDriverError> {
            Ok(())
        }
        fn cpu(&self, _: &InstanceCgroup) -> Result<CpuLimit, CgroupDriverError> {
            Ok(CpuLimit::unlimited())
        }
        fn reclaim_memory(&self, _: &InstanceCgroup) -> Result<(), CgroupDriverError> {
            *self.reclaimed.lock().unwrap() = true;
            Ok(())
        }
        fn memory_usage(&self, _: &InstanceCgroup) -> Result<u64, CgroupDriverError> {
            Ok(if *self.reclaimed.lock().unwrap() { 5 } else { 100 })
        }
        fn remove(&self, _: &InstanceCgroup) -> Result<(), CgroupDriverError> {
            Ok(())
        }
    }

    struct Memory;

    impl MemoryOps for Memory {
        fn swap_available(&self) -> bool {
            true
        }
        fn record_working_set(&self, pids: &[u32]) -> Result<WorkingSet, StandbyError> {
            Ok(WorkingSet {
                processes: pids
                    .iter()
                    .map(|&pid| ProcessWorkingSet { pid, ranges: vec![(4096, 8192)], resident_bytes: 8192 })
                    .collect(),
            })
        }
        fn page_out(&self, _: &WorkingSet) -> Result<PageOutReport, StandbyError> {
            Ok(PageOutReport::default())
        }
        fn prefetch(&self, ws: &WorkingSet) -> Result<PrefetchReport, StandbyError> {
            Ok(PrefetchReport {
                advised_bytes: ws.processes.iter().map(|p| p.resident_bytes).sum(),
                ..Default::default()
            })
        }
    }

    fn executor(registry: Arc<Registry>) -> StandbyExecutor<Registry> {
        StandbyExecutor::with_memory(
            registry,
            Arc::new(Driver::default()),
            Arc::new(Memory),
            StandbyPolicy::default(),
        )
    }

    #[test]
    fn hibernate_then_wake_walks_the_states_and_hooks_in_order() {
        let reg = Arc::new(Registry::default());
        reg.states.lock().unwrap().insert("echo-0".into(), InstanceState::Active);
        let ex = executor(reg.clone());
        ex.execute(Action::Hibernate, "echo", "echo-0").unwrap();
        assert_eq!(reg.state("echo-0"), Some(InstanceState::Hibernated));
        let r = ex.record("echo-0").unwrap();
        assert_eq!((r.memory_before, r.memory_after, r.memory_kept_resident), (100, 5, false));
        // Idempotent: hibernating a hibernated instance changes nothing.
        ex.execute(Action::Hibernate, "echo", "echo-0").unwrap();
        ex.execute(Action::Wake, "echo", "echo-0").unwrap();
        assert_eq!(reg.state("echo-0"), Some(InstanceState::Active));
        assert_eq!(ex.record("echo-0").unwrap().prefetch_bytes, 8192);
        assert_eq!(
            *reg.log.lock().unwrap(),
            vec![
                "state hibernating",
                "hook PreHibernate",
                "state hibernated",
                "state waking",
                "hook PostWake",
                "ready",
                "state active"
            ]
        );
        ex.execute(Action::Wake, "echo", "echo-0").unwrap();
        assert_eq!(reg.log.lock().unwrap().len(), 7, "waking an active instance does nothing");
    }

    #[test]
    fn hibernate_waits_for_in_flight_requests() {
        let reg = Arc::new(Registry { inflight: Mutex::new(3), ..Registry::default() });
        reg.states.lock().unwrap().insert("echo-0".into(), InstanceState::Active);
        let ex = executor(reg.clone());
        ex.execute(Action::Hibernate, "echo", "echo-0").unwrap();
        assert_eq!(*reg.inflight.lock().unwrap(), 0, "asked until the requests drained");
        assert_eq!(reg.state("echo-0"), Some(InstanceState::Hibernated));
    }

    #[test]
    fn a_failing_pre_hibernate_hook_leaves_the_instance_active() {
        let reg = Arc::new(Registry { hook_fails: true, ..Registry::default() });
        reg.states.lock().unwrap().insert("echo-0".into(), InstanceState::Active);
        let ex = executor(reg.clone());
        let err = ex.execute(Action::Hibernate, "echo", "echo-0").unwrap_err();
        assert_eq!(err, "pre-hibernate hook of `echo-0` failed: exit status 1");
        assert_eq!(reg.state("echo-0"), Some(InstanceState::Active));
    }

    #[test]
    fn unknown_and_busy_instances_are_refused_with_reasons() {
        let reg = Arc::new(Registry::default());
        reg.states.lock().unwrap().insert("echo-1".into(), InstanceState::Starting);
        let ex = executor(reg);
        assert_eq!(ex.execute(Action::Hibernate, "echo", "nope").unwrap_err(), "no managed instance `nope`");
        assert_eq!(
            ex.execute(Action::Hibernate, "echo", "echo-1").unwrap_err(),
            "instance `echo-1` is starting and cannot hibernate now"
        );
    }
}
