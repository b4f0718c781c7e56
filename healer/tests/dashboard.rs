//! The hibernation dashboard against the real thing: a collector and a healer running a managed service,
//! one hibernate and one wake through the API, a real Prometheus (Debian's, on 127.0.0.1) scraping
//! `/metrics`, and every panel query of `dashboards/hibernation.json` must parse and return data.
//! Needs root and /usr/bin/prometheus (`scripts/setup`).

#[path = "../../collector/tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::dashboard::panel_queries;
use support::prometheus::{Prometheus, has_samples};
use vigil_collector::Collector;
use vigil_collector::config::CollectorConfig;
use vigil_collector::discovery::WatchConfig;
use vigil_healer::config::HealerConfig;
use vigil_healer::run::Healer;
use vigil_healer::traffic::ConnectionTraffic;

fn post(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    write!(s, "POST {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn every_hibernation_panel_has_data() {
    let parent = format!("/vigil-test-dash-{}", std::process::id());
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let data_dir = std::env::temp_dir().join(format!("vigil-test-dash-{}", std::process::id()));
    let yaml = format!(
        "data_dir: {}\nrules: []\nservices:\n  - name: dash\n    command: [\"{}\", \"-m\", \"http.server\", \"{{port}}\", \"--bind\", \"127.0.0.1\"]\n    port: {port}\n    readiness: {{ http: / }}\nhealer:\n  cgroup_parent: {parent}\n  stop_grace: 2s\ncollector:\n  watch: {{ managed_root: {parent} }}\n",
        data_dir.display(),
        support::workload::python_executable()
    );
    let healer_config = HealerConfig::parse(&yaml, "test.yaml").expect("healer config");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let collector_config = CollectorConfig {
        watch: WatchConfig {
            include: vec![parent.clone()],
            managed_root: parent.clone(),
            ..WatchConfig::default()
        },
        ..CollectorConfig::default()
    };
    let collector = Collector::start(&collector_config).expect("collector starts (root)");
    let healer = runtime.block_on(async {
        Healer::start(&healer_config, collector.snapshots(), Arc::new(ConnectionTraffic::default()))
            .expect("healer")
    });
    let router = collector
        .router_with(vec![healer.metrics_registry()], None)
        .merge(healer.router(collector.snapshots(), None));
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while healer.supervisor().instance("dash-0").map(|i| i.state.as_str()) != Some("active") {
            assert!(Instant::now() < deadline, "dash-0 never became active");
            std::thread::sleep(Duration::from_millis(100));
        }
        let answer = post(addr, "/api/v1/instances/dash-0/hibernate");
        assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");
        let answer = post(addr, "/api/v1/instances/dash-0/wake");
        assert!(answer.contains("\"state\":\"active\""), "{answer}");

        let prometheus = Prometheus::start(addr).expect("start prometheus");
        prometheus.wait_until_up(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/hibernation.json");
        let queries = panel_queries(&dashboard);
        assert!(queries.len() >= 8, "hibernation dashboard has only {} queries", queries.len());
        for (title, expr) in queries {
            prometheus
                .wait_for(&expr, Duration::from_secs(60), has_samples)
                .unwrap_or_else(|e| panic!("panel `{title}`: {e}"));
        }
    }));
    runtime.block_on(healer.shutdown());
    collector.stop();
    let _ = std::fs::remove_dir_all(&data_dir);
    for root in
        ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuset"]
    {
        let _ = std::fs::remove_dir(format!("{root}{parent}"));
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
