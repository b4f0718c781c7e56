//! Managed services against real processes and real cgroups: instances start in their own cgroups and turn
//! active, a killed instance is restarted, a crashing one backs off, shutdown leaves neither processes nor
//! cgroups behind. Needs root (CI is root). Every test uses its own cgroup parents
//! (`/vigil-test-sup-<pid>-<tag>` in each hierarchy) so it never meets a running Vigil or another test, and
//! removes them at the end, also when it fails.

#[path = "../../collector/tests/support/mod.rs"]
mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_cgroup::fs::Layout;
use vigil_healer::cgroup::{CgroupDriver, DriverConfig, InstanceCgroup, driver_for};
use vigil_healer::lifecycle::Request;
use vigil_healer::rules::InstanceState;
use vigil_healer::supervisor::{Hook, NotAccepted, Readiness, ServiceSpec, Supervisor};

fn assert_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
    assert_eq!(uid.split_whitespace().nth(1), Some("0"), "these tests need root");
}

/// `count` consecutive loopback ports that are free right now.
fn free_ports(count: u16) -> u16 {
    for _ in 0..200 {
        let first = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let base = first.local_addr().expect("local addr").port();
        if base.checked_add(count).is_none() {
            continue;
        }
        let rest: Vec<_> = (1..count).map(|i| TcpListener::bind(("127.0.0.1", base + i))).collect();
        if rest.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no {count} consecutive free ports");
}

/// The test's driver and cgroup parents; `Drop` stops the supervisor's leftovers and removes the parents.
struct Fixture {
    driver: Arc<dyn CgroupDriver>,
    parents: Vec<PathBuf>,
    supervisor: Option<Supervisor>,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        assert_root();
        let layout = Layout::detect().expect("cgroup layout");
        let parent = format!("/vigil-test-sup-{}-{tag}", std::process::id());
        let config = DriverConfig { v2_parent: parent.clone(), v1_parent: Some(parent) };
        let driver: Arc<dyn CgroupDriver> = Arc::from(driver_for(&layout, &config).expect("cgroup driver"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        Fixture { driver, parents: Vec::new(), supervisor: None, runtime }
    }

    fn start(&mut self, specs: Vec<ServiceSpec>) -> Supervisor {
        let _guard = self.runtime.enter();
        let supervisor = Supervisor::start(specs, self.driver.clone()).expect("start supervisor");
        for info in supervisor.instances() {
            let cg = supervisor.cgroup(&info.id).expect("instance cgroup");
            // The test parent sits two levels above each instance directory.
            for dir in cgroup_dirs(&cg) {
                if let Some(parent) = dir.parent().and_then(|p| p.parent())
                    && !self.parents.iter().any(|p| p == parent)
                {
                    self.parents.push(parent.to_path_buf());
                }
            }
        }
        self.supervisor = Some(supervisor.clone());
        supervisor
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.take() {
            self.runtime.block_on(supervisor.shutdown(Duration::from_secs(2)));
        }
        for dir in &self.parents {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn cgroup_dirs(cg: &InstanceCgroup) -> Vec<PathBuf> {
    [Some(&cg.v2_dir), cg.memory_v1_dir.as_ref(), cg.cpu_v1_dir.as_ref(), cg.cpuset_v1_dir.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

fn spec(name: &str, command: Vec<String>, port: u16, instances: u32, readiness: Readiness) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        command,
        env: Default::default(),
        port,
        instances,
        readiness,
        pre_hibernate: None,
        post_wake: None,
        route: None,
        host: None,
        version: vigil_healer::supervisor::DEFAULT_VERSION.into(),
        start: Default::default(),
        serves: None,
        ready_timeout: None,
        scale: None,
        data_dirs: Vec::new(),
    }
}

fn http_server_spec(name: &str, port: u16, instances: u32) -> ServiceSpec {
    let command = [
        support::workload::python_executable().as_str(),
        "-m",
        "http.server",
        "{port}",
        "--bind",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    spec(name, command, port, instances, Readiness::Http("/".into()))
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn proc_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn instances_start_in_their_cgroups_restart_after_a_kill_and_shut_down_clean() {
    let mut fx = Fixture::new("http");
    let port = free_ports(2);
    let name = format!("web{}", std::process::id());
    let mut web = http_server_spec(&name, port, 2);
    let marker = std::env::temp_dir().join(format!("vigil-test-sup-{}-hook", std::process::id()));
    web.pre_hibernate = Some(vec!["sh".into(), "-c".into(), format!("echo {{port}} > {}", marker.display())]);
    web.post_wake = Some(vec!["false".into()]);
    let sup = fx.start(vec![web]);
    let driver = fx.driver.clone();
    let ids = [format!("{name}-0"), format!("{name}-1")];

    fx.runtime.block_on(async {
        // (1) Both instances become active, each alone in its own cgroups on its own port.
        for id in &ids {
            sup.wait_ready(id, Duration::from_secs(15)).await.expect("instance ready");
        }
        let infos = eventually(Duration::from_secs(5), || {
            let infos = sup.instances();
            infos.iter().all(|i| i.state == InstanceState::Active && i.main_pid.is_some()).then_some(infos)
        })
        .await
        .unwrap_or_else(|| panic!("instances never all active: {:?}", sup.instances()));
        assert_eq!(infos.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), ids);
        for (n, info) in infos.iter().enumerate() {
            assert_eq!(info.service, name);
            assert_eq!(info.port, port + n as u16);
            assert_eq!(info.restarts, 0);
            let pid = info.main_pid.expect("main pid");
            let cg = sup.cgroup(&info.id).expect("cgroup");
            assert_eq!(info.cgroup, cg.v2_rel);
            assert_eq!(driver.pids(&cg).expect("cgroup pids"), vec![pid]);
            assert_eq!(info.pids, vec![pid]);
            for dir in cgroup_dirs(&cg) {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
                assert_eq!(procs.trim(), pid.to_string(), "{}", dir.display());
            }
            // The child runs the service itself (the holding shell exec'd), in its own process group.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
            let pgid: u32 = after_comm.split(' ').nth(2).expect("pgid").parse().expect("pgid number");
            assert_eq!(pgid, pid);
            assert!(sup.check_ready(&info.id).await);
        }
        assert_eq!(sup.spec(&ids[1]).map(|s| s.instances), Some(2));

        // Hooks: port substituted, failures reported.
        sup.run_hook(&ids[1], Hook::PreHibernate).await.expect("pre_hibernate hook");
        let written = std::fs::read_to_string(&marker).expect("hook output");
        let _ = std::fs::remove_file(&marker);
        assert_eq!(written.trim(), (port + 1).to_string());
        assert!(sup.run_hook(&ids[1], Hook::PostWake).await.is_err());

        // Requests go to the instance's task and are answered at once: hibernate (the CPU part only
        // without swap; the pre-hibernate hook runs), a second request while it runs is busy, then a wake
        // whose post-wake hook fails restarts the instance, which serves again.
        let ticket = sup.request(&ids[1], Request::Hibernate).await.expect("hibernate accepted");
        let answer = sup.request(&ids[1], Request::Hibernate).await.err();
        assert!(
            matches!(answer, Some(NotAccepted::Busy(_) | NotAccepted::AlreadyThere)),
            "a second hibernate is refused at once: {answer:?}"
        );
        let finished = ticket.done.await.expect("hibernate finished");
        assert_eq!((finished.state, finished.failure), (InstanceState::Hibernated, None));
        assert_eq!(sup.request(&ids[1], Request::Hibernate).await.err(), Some(NotAccepted::AlreadyThere));
        let _ = std::fs::remove_file(&marker);
        let pid_before = sup.instance(&ids[1]).and_then(|i| i.main_pid).expect("pid");
        let ticket = sup.request(&ids[1], Request::Wake).await.expect("wake accepted");
        let finished = ticket.done.await.expect("wake finished");
        assert_eq!(finished.state, InstanceState::Active, "restarted after the failed hook");
        assert!(finished.failure.as_deref().is_some_and(|f| f.contains("post_wake")), "{finished:?}");
        let info = sup.instance(&ids[1]).expect("instance");
        assert_eq!(info.restarts, 1);
        assert!(info.main_pid.is_some_and(|p| p != pid_before), "a new process: {info:?}");
        assert!(info.last_failure.as_deref().is_some_and(|f| f.contains("post_wake")));
        assert!(!proc_exists(pid_before), "the old process was stopped and reaped");
        sup.wait_ready(&ids[1], Duration::from_secs(5)).await.expect("the restarted instance serves");
        assert_eq!(sup.request("nope-0", Request::Wake).await.err(), Some(NotAccepted::UnknownInstance));

        // (2) SIGKILL one instance: it is reaped and restarted, active again after the 1 s backoff.
        let old = infos[0].main_pid.expect("main pid");
        let status = Command::new("kill").args(["-KILL", &old.to_string()]).status().expect("kill");
        assert!(status.success());
        let restarted = eventually(Duration::from_secs(10), || {
            sup.instance(&ids[0]).filter(|i| {
                i.restarts == 1 && i.state == InstanceState::Active && i.main_pid.is_some_and(|p| p != old)
            })
        })
        .await
        .unwrap_or_else(|| panic!("instance not restarted: {:?}", sup.instance(&ids[0])));
        assert!(!proc_exists(old), "the killed process was not reaped");
        let new_pid = restarted.main_pid.expect("new pid");
        let cg = sup.cgroup(&ids[0]).expect("cgroup");
        assert_eq!(driver.pids(&cg).expect("cgroup pids"), vec![new_pid]);
        sup.wait_ready(&ids[0], Duration::from_secs(5)).await.expect("restarted instance serves");
        assert_eq!(sup.instance(&ids[1]).map(|i| i.restarts), Some(1), "only its own restart");

        // (3) Shutdown: every process gone and reaped (no /proc entry, so no zombie), cgroups removed.
        let pids = [new_pid, infos[1].main_pid.expect("main pid")];
        let cgs: Vec<InstanceCgroup> = ids.iter().map(|id| sup.cgroup(id).expect("cgroup")).collect();
        sup.shutdown(Duration::from_secs(5)).await;
        for pid in pids {
            assert!(!proc_exists(pid), "process {pid} still exists after shutdown");
        }
        for info in sup.instances() {
            assert_eq!(info.state, InstanceState::Stopped, "{info:?}");
            assert!(info.pids.is_empty());
            assert_eq!(info.main_pid, None);
        }
        for cg in &cgs {
            for dir in cgroup_dirs(cg) {
                assert!(!dir.exists(), "{} still exists", dir.display());
            }
        }
        // A second shutdown is harmless.
        sup.shutdown(Duration::from_secs(1)).await;
    });
}

#[test]
fn a_crashing_instance_fails_and_restarts_with_growing_backoff() {
    let mut fx = Fixture::new("crash");
    let port = free_ports(1);
    let name = format!("crash{}", std::process::id());
    let id = format!("{name}-0");
    let sup = fx.start(vec![spec(&name, vec!["false".into()], port, 1, Readiness::Tcp(true))]);

    fx.runtime.block_on(async {
        let started = Instant::now();
        let mut saw_failed = false;
        let mut restart_times: Vec<Duration> = Vec::new();
        while started.elapsed() < Duration::from_millis(5500) {
            let info = sup.instance(&id).expect("instance");
            assert_ne!(info.state, InstanceState::Active, "a process that exits at once is never ready");
            saw_failed |= info.state == InstanceState::Failed;
            while restart_times.len() < info.restarts as usize {
                restart_times.push(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(saw_failed, "never observed the failed state");
        assert!(restart_times.len() >= 2, "restarts at {restart_times:?}");
        // Backoff 1 s then 2 s: the first restart comes after about a second, the second about two later.
        let first = restart_times[0];
        let second_gap = restart_times[1] - restart_times[0];
        assert!(first >= Duration::from_millis(900), "first restart after {first:?}");
        assert!(second_gap >= Duration::from_millis(1500), "second restart {second_gap:?} after the first");
        assert!(second_gap > first, "backoff did not grow: {restart_times:?}");

        let cg = sup.cgroup(&id).expect("cgroup");
        sup.shutdown(Duration::from_secs(2)).await;
        assert_eq!(sup.instance(&id).map(|i| i.state), Some(InstanceState::Stopped));
        for dir in cgroup_dirs(&cg) {
            assert!(!dir.exists(), "{} still exists", dir.display());
        }
    });
}

/// A previous run killed mid-hibernate left its instance frozen in the standby pool. Starting again must
/// thaw it, lift its limits, stop the leftover process and start the instance afresh: nothing stays frozen.
#[test]
fn restart_after_a_crash_mid_hibernate_leaves_nothing_frozen() {
    let mut fx = Fixture::new("rec");
    let port = free_ports(1);
    let specs = vec![http_server_spec("rec", port, 1)];
    // What the crashed run left: the instance's cgroups holding a process, frozen, CPU squeezed.
    let cg = fx.driver.create("rec", "rec-0").expect("create");
    let mut leftover = Command::new("sleep").arg("300").spawn().expect("spawn leftover");
    fx.driver.add_process(&cg, leftover.id()).expect("join");
    fx.driver
        .set_cpu(&cg, &vigil_healer::cgroup::CpuLimit { cpus: None, quota: Some(0.05) })
        .expect("squeeze");
    fx.driver.set_frozen(&cg, true).expect("freeze");

    let cleaned =
        vigil_healer::run::reconcile(fx.driver.as_ref(), &specs, &Default::default()).expect("reconcile");
    assert_eq!(cleaned, vec!["rec-0".to_string()]);
    let status = leftover.wait().expect("the leftover was killed and is reaped here");
    assert!(!status.success(), "killed, not exited: {status:?}");
    assert!(fx.driver.pids(&cg).expect("pids").is_empty());
    assert_eq!(fx.driver.cpu(&cg).expect("cpu").quota, None, "CPU limits lifted");
    let events = std::fs::read_to_string(cg.v2_dir.join("cgroup.events")).expect("cgroup.events");
    assert!(events.lines().any(|l| l == "frozen 0"), "thawed: {events}");

    // And the instance starts afresh and serves.
    let sup = fx.start(specs.clone());
    let active = fx.runtime.block_on(eventually(Duration::from_secs(20), || {
        sup.instance("rec-0").filter(|i| i.state == InstanceState::Active)
    }));
    assert!(active.is_some(), "rec-0 never became active after reconcile");
}
