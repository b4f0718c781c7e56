//! The collector as people use it: a real Prometheus (Debian's, on 127.0.0.1, started and stopped here)
//! scrapes `/metrics`; the values come back through its query API equal to the collector's own; every panel
//! query of the node dashboard parses and returns data; and `promtool check metrics` accepts the exposition.
//! Needs root (probes) and /usr/bin/prometheus (`scripts/setup`).

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::dashboard::panel_queries;
use support::prometheus::{Prometheus, has_samples, sample_values};
use support::workload::TestCgroup;
use vigil_collector::Collector;
use vigil_collector::config::CollectorConfig;
use vigil_collector::discovery::WatchConfig;

/// Serves the collector's router on a free loopback port from a runtime of its own.
fn serve(collector: &Collector) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let router = collector.router();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });
    (rt, addr)
}

fn get(addr: SocketAddr, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

#[test]
fn prometheus_scrapes_the_collector_and_every_node_panel_has_data() {
    let mut cg = TestCgroup::new("prom");
    let config = CollectorConfig {
        watch: WatchConfig { include: vec![cg.rel.clone()], ..WatchConfig::default() },
        ..CollectorConfig::default()
    };
    let collector = Collector::start(&config).expect("collector starts");
    let (_rt, addr) = serve(&collector);
    let mut w = cg.spawn_python(
        "import mmap,sys\nm=mmap.mmap(-1,20000*4096)\nfor i in range(0,20000*4096,4096): m[i]=1\n\
         print('ready')\nsys.stdin.readline()",
        None,
    );
    assert_eq!(w.line(), "ready");

    // promtool accepts the classic exposition.
    let text = get(addr, "/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs prometheus)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prometheus = Prometheus::start(addr).expect("start prometheus");
    prometheus
        .wait_until_up(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", prometheus.log_tail()));

    // The workload is idle now, so its fault count is settled: Prometheus must return exactly our number.
    let id = cg.instance_id();
    let ours = collector.snapshots().borrow().instance(&id).expect("instance exported").counters.minor_faults;
    assert!(ours >= 20_000, "the workload touched 20000 pages, collector saw {ours} minor faults");
    let q = format!("vigil_instance_page_faults_total{{instance_id=\"{id}\",kind=\"minor\"}}");
    let data = prometheus
        .wait_for(&q, Duration::from_secs(30), |d| sample_values(d) == [ours as f64])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data["result"][0]["metric"]["service"], cg.rel.trim_start_matches('/'));

    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/node.json");
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 8, "node dashboard has only {} queries", queries.len());
    for (title, expr) in queries {
        prometheus
            .wait_for(&expr, Duration::from_secs(60), has_samples)
            .unwrap_or_else(|e| panic!("panel `{title}`: {e}"));
    }
    w.proceed();
}
