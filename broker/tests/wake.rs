//! Wake-on-demand through the whole stack, then the broker dashboard against a real Prometheus.
//!
//! A collector, a healer managing one HTTP service, and the broker in front of it: the instance is
//! hibernated through the API; an HTTP request through the trigger is held, the broker's demand wakes the
//! instance (audited as `broker-demand`), and the request is answered once. Then a real Prometheus
//! (Debian's, on 127.0.0.1) scrapes `/metrics` and every panel query of `dashboards/broker.json` must
//! return data. Needs root and /usr/bin/prometheus (`scripts/setup`).

#[path = "../../collector/tests/support/mod.rs"]
mod collector_support;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use collector_support::dashboard::panel_queries;
use collector_support::prometheus::{Prometheus, has_samples};
use support::stack::{Options, Stack};
use vigil_healer::run::Healer;

/// One HTTP/1.0 exchange; returns the whole response.
fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n").expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn wait_state(healer: &Healer, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while healer.supervisor().instance(id).map(|i| i.state.as_str()) != Some(state) {
        assert!(Instant::now() < deadline, "{id} never became {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Collector, healer and broker with one managed HTTP service `wk` (python http.server) routed at `/`.
/// `service_extra` follows `wk`'s keys (and may add services); `broker_extra` follows the broker's.
fn start(tag: &str, service_extra: &str, broker_extra: &str) -> Stack {
    start_with_rules(tag, service_extra, broker_extra, "[]")
}

/// The same, with `rules` (a YAML list of rule files) in force.
fn start_with_rules(tag: &str, service_extra: &str, broker_extra: &str, rules: &str) -> Stack {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let services = format!(
        "  - name: wk\n    command: [\"{}\", \"-m\", \"http.server\", \"{{port}}\", \"--bind\", \"127.0.0.1\"]\n    port: {port}\n    readiness: {{ http: / }}\n    route: /\n{service_extra}",
        collector_support::workload::python_executable()
    );
    Stack::start(Options { tag, services, broker_extra, rules, ..Options::default() })
}

fn ok(answer: &str) -> bool {
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

#[test]
fn a_request_to_a_hibernated_instance_wakes_it_and_every_broker_panel_has_data() {
    let stack = start("wake", "", "");
    let (api, trigger) = (stack.api, stack.trigger);
    wait_state(stack.healer(), "wk-0", "active");
    let answer = http(trigger, "GET", "/");
    assert!(ok(&answer), "{answer}");

    let answer = http(api, "POST", "/api/v1/instances/wk-0/hibernate");
    assert!(answer.contains("\"state\":\"hibernated\""), "{answer}");
    let metrics = support::metric(stack.broker());
    assert!(
        metrics.contains("vigil_broker_instance_ready{service=\"wk\",version=\"v1\",instance_id=\"wk-0\"} 0"),
        "{metrics}"
    );

    // Held while the broker's demand wakes the instance, then answered once.
    let started = Instant::now();
    let answer = http(trigger, "GET", "/");
    assert!(ok(&answer), "{answer}");
    let held = started.elapsed();
    wait_state(stack.healer(), "wk-0", "active");
    // Audited when the wake's outcome is known, which may be just after the request was answered.
    let wake = demanded_wake(api);
    assert_eq!(wake["outcome"], "succeeded", "{wake}");
    let metrics = support::metric(stack.broker());
    assert!(metrics.contains("vigil_broker_queue_wait_seconds_count{service=\"wk\"} 1"), "{metrics}");
    assert!(
        metrics.contains("vigil_broker_requests_total{service=\"wk\",version=\"v1\",outcome=\"ok\"} 2"),
        "{metrics}"
    );
    eprintln!("held through the wake for {held:?}");

    // Errors for the error panel; one RSocket requester for the connections panel; then every panel must
    // have data.
    let answer = http(trigger, "GET", "/nothing-here");
    assert!(answer.contains(" 404 "), "{answer}");
    let _requester = stack.runtime.block_on(support::requester(stack.broker().rsocket_addr()));
    let prometheus = Prometheus::start(api).expect("start prometheus");
    prometheus.wait_until_up(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/broker.json");
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 8, "broker dashboard has only {} queries", queries.len());
    let keep_busy = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until {
            let _ = http(trigger, "GET", "/");
            let _ = http(trigger, "GET", "/nothing-here");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    for (title, expr) in queries {
        prometheus
            .wait_for(&expr, Duration::from_secs(60), has_samples)
            .unwrap_or_else(|e| panic!("panel `{title}`: {e}"));
    }
    let _ = keep_busy.join();
}

#[test]
fn a_service_with_zero_running_instances_starts_one_for_the_first_request() {
    let stack = start("zero", "    start: on_demand\n", "");
    std::thread::sleep(Duration::from_millis(500));
    let info = stack.healer().supervisor().instance("wk-0").expect("wk-0");
    assert_eq!((info.state.as_str(), info.pids.len()), ("stopped", 0), "nothing runs before demand");

    let started = Instant::now();
    let answer = http(stack.trigger, "GET", "/");
    assert!(ok(&answer), "{answer}");
    eprintln!("started from zero and answered in {:?}", started.elapsed());
    let info = stack.healer().supervisor().instance("wk-0").expect("wk-0");
    assert_eq!(info.state.as_str(), "active");
    let metrics = support::metric(stack.broker());
    assert!(metrics.contains("vigil_broker_queue_wait_seconds_count{service=\"wk\"} 1"), "{metrics}");
    assert!(
        metrics.contains("vigil_broker_requests_total{service=\"wk\",version=\"v1\",outcome=\"ok\"} 1\n"),
        "{metrics}"
    );

    // Back to zero (the `stop` action, here through the API), and up again for the next request.
    let first_pid = info.main_pid;
    let answer = http(stack.api, "POST", "/api/v1/instances/wk-0/stop");
    assert!(answer.contains("\"state\":\"stopped\""), "{answer}");
    let info = stack.healer().supervisor().instance("wk-0").expect("wk-0");
    assert_eq!((info.state.as_str(), info.pids.len()), ("stopped", 0), "nothing runs after stop");
    let answer = http(stack.trigger, "GET", "/");
    assert!(ok(&answer), "{answer}");
    let info = stack.healer().supervisor().instance("wk-0").expect("wk-0");
    assert_eq!(info.state.as_str(), "active");
    assert_ne!(info.main_pid, first_pid, "a new process");
    let metrics = support::metric(stack.broker());
    assert!(metrics.contains("vigil_broker_queue_wait_seconds_count{service=\"wk\"} 2"), "{metrics}");
}

/// Two managed services serving one name as two versions: the split sends traffic to both, and the version
/// header pins one.
#[test]
fn two_managed_services_are_two_versions_of_one_service() {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let v2 = format!(
        "    version: v1\n  - name: wk-next\n    serves: wk\n    version: v2\n    command: [\"{}\", \"-m\", \"http.server\", \"{{port}}\", \"--bind\", \"127.0.0.1\"]\n    port: {port}\n    readiness: {{ http: / }}\n",
        collector_support::workload::python_executable()
    );
    let split = "  splits: [{ name: default, service: wk, weights: { v1: 50, v2: 50 } }]\n";
    let stack = start("versions", &v2, split);
    wait_state(stack.healer(), "wk-0", "active");
    wait_state(stack.healer(), "wk-next-0", "active");
    for _ in 0..40 {
        assert!(ok(&http(stack.trigger, "GET", "/")));
    }
    let metrics = support::metric(stack.broker());
    let count = |version: &str| -> u64 {
        let prefix =
            format!("vigil_broker_requests_total{{service=\"wk\",version=\"{version}\",outcome=\"ok\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let (v1, v2) = (count("v1"), count("v2"));
    // Binomial(40, 0.5): both versions serve; 40 in all.
    assert_eq!(v1 + v2, 40, "{metrics}");
    assert!((8..=32).contains(&v2), "v2 served {v2} of 40");
}

/// A scratch directory for a test's own files (rule files, scripts), removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vigil-test-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The newest audited decisions, parsed.
fn decisions(api: SocketAddr) -> Vec<serde_json::Value> {
    let answer = http(api, "GET", "/api/v1/decisions?limit=1000");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    v["decisions"].as_array().cloned().unwrap_or_default()
}

/// Hibernates wk-0 through the API and waits for the answer.
fn hibernate(stack: &Stack) {
    let answer = http(stack.api, "POST", "/api/v1/instances/wk-0/hibernate");
    assert!(answer.contains("\"state\":\"hibernated\""), "{answer}");
}

/// The demanded wake's decision, once audited (it is recorded when the wake's outcome is known, which
/// may be just after the request was answered).
fn demanded_wake(api: SocketAddr) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found =
            decisions(api).into_iter().find(|d| d["rule"] == "broker-demand" && d["action"] == "wake");
        match found {
            Some(d) => return d,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("no broker-demand wake in {:?}", decisions(api)),
        }
    }
}

/// The post-wake hook fails: the wake that a held request asked for fails, the instance is restarted, and
/// the request is still answered within the queue's timeout.
#[test]
fn a_failed_post_wake_hook_restarts_the_instance_and_the_held_request_is_answered() {
    let stack = start("hookfail", "    post_wake: [\"false\"]\n", "  queue: { timeout: 20s }\n");
    wait_state(stack.healer(), "wk-0", "active");
    hibernate(&stack);
    let before = stack.healer().supervisor().instance("wk-0").expect("wk-0");

    let started = Instant::now();
    let answer = http(stack.trigger, "GET", "/");
    let took = started.elapsed();
    assert!(ok(&answer), "{answer}");
    assert!(took < Duration::from_secs(20), "answered within the queue timeout: {took:?}");
    let after = stack.healer().supervisor().instance("wk-0").expect("wk-0");
    assert_eq!((after.state.as_str(), after.restarts), ("active", before.restarts + 1), "{after:?}");
    assert_ne!(after.main_pid, before.main_pid, "a new process");
    assert!(after.last_failure.as_deref().is_some_and(|f| f.contains("post_wake")), "{after:?}");
    let wake = demanded_wake(stack.api);
    assert_eq!(wake["outcome"], "failed", "{wake}");
    assert!(
        wake["error"].as_str().is_some_and(|e| e.contains("post_wake") && e.contains("recovered")),
        "{wake}"
    );
    eprintln!("failed wake, restart, answer in {took:?}");
}

/// Readiness fails after the wake: the instance is restarted (its readiness passes again in a new
/// process), and the held request is answered.
#[test]
fn a_readiness_failure_after_wake_restarts_the_instance_and_the_held_request_is_answered() {
    let scratch = Scratch::new("notready");
    let flag = scratch.0.join("sick");
    // Healthy unless the flag file exists; a new process removes the flag as it starts.
    let script = scratch.write(
        "app.py",
        "import http.server, os, sys\n\
         flag = sys.argv[2]\n\
         if os.path.exists(flag):\n    os.remove(flag)\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       code = 503 if self.path == '/healthz' and os.path.exists(flag) else 200\n\
         \x20       self.send_response(code)\n\
         \x20       self.send_header('Content-Length', '2')\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(b'ok')\n\
         \x20   def log_message(self, *args):\n        pass\n\
         http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n",
    );
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let rd = format!(
        "  - name: rd\n    command: [\"{}\", \"{}\", \"{{port}}\", \"{}\"]\n    port: {port}\n    readiness: {{ http: /healthz }}\n    ready_timeout: 2s\n    route: /rd\n",
        collector_support::workload::python_executable(),
        script.display(),
        flag.display()
    );
    let stack = start("notready", &rd, "  queue: { timeout: 20s }\n");
    wait_state(stack.healer(), "rd-0", "active");
    let answer = http(stack.api, "POST", "/api/v1/instances/rd-0/hibernate");
    assert!(answer.contains("\"state\":\"hibernated\""), "{answer}");
    let before = stack.healer().supervisor().instance("rd-0").expect("rd-0");
    std::fs::write(&flag, "").expect("make it sick");

    let started = Instant::now();
    let answer = http(stack.trigger, "GET", "/rd");
    let took = started.elapsed();
    assert!(ok(&answer), "{answer}");
    assert!(took >= Duration::from_secs(2), "waited out the readiness timeout: {took:?}");
    assert!(took < Duration::from_secs(20), "answered within the queue timeout: {took:?}");
    let after = stack.healer().supervisor().instance("rd-0").expect("rd-0");
    assert_eq!((after.state.as_str(), after.restarts), ("active", before.restarts + 1), "{after:?}");
    assert!(!flag.exists(), "the new process cleared the flag");
    let wake = demanded_wake(stack.api);
    assert_eq!(wake["outcome"], "failed", "{wake}");
    assert!(wake["error"].as_str().is_some_and(|e| e.contains("not ready after wake")), "{wake}");
    eprintln!("readiness failure after wake, restart, answer in {took:?}");
}

/// A pre-hibernate hook that takes 8 s: meanwhile the API and /metrics answer at once, the rules keep
/// ticking, and a second hibernate of the same instance is refused `in_progress` at once.
#[test]
fn a_slow_hibernate_blocks_neither_the_api_nor_the_rules() {
    let scratch = Scratch::new("slowhook");
    // Proposes on every tick while wk-0 hibernates, and is refused `in_progress` (the instance is busy):
    // each tick leaves a decision in the audit log. (A notify rule would fire once and stay firing.)
    let rules = scratch.write(
        "tick.yaml",
        "rules:\n  - name: tick-probe\n    select: { instance_id: wk-0 }\n    when:\n      - state: [hibernating]\n    action: wake\n",
    );
    let stack = start_with_rules(
        "slowhook",
        "    pre_hibernate: [\"sleep\", \"8\"]\n",
        "",
        &format!("[\"{}\"]", rules.display()),
    );
    wait_state(stack.healer(), "wk-0", "active");
    let answer = http(stack.api, "POST", "/api/v1/instances/wk-0/hibernate?wait=0s");
    assert!(answer.starts_with("HTTP/1.0 202") || answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(answer.contains("\"status\":\"running\""), "{answer}");
    let action_id = answer
        .split("\"action_id\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no action id: {answer}"));
    let hook_started = Instant::now();
    wait_state(stack.healer(), "wk-0", "hibernating");

    let mut slowest = Duration::ZERO;
    let mut second = String::new();
    while hook_started.elapsed() < Duration::from_secs(6) {
        for path in ["/api/v1/rules", "/metrics"] {
            let t = Instant::now();
            let answer = http(stack.api, "GET", path);
            slowest = slowest.max(t.elapsed());
            assert!(ok(&answer), "{path}: {answer}");
        }
        let t = Instant::now();
        second = http(stack.api, "POST", "/api/v1/instances/wk-0/hibernate");
        slowest = slowest.max(t.elapsed());
        assert!(second.contains(" 409 ") && second.contains("\"in_progress\""), "{second}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(slowest < Duration::from_millis(100), "slowest answer during the hook: {slowest:?}\n{second}");
    // The rules ticked all along (one refused wake a tick, ~1 s apart), none held up by the hibernate.
    let ticks: Vec<u64> = decisions(stack.api)
        .iter()
        .filter(|d| d["rule"] == "tick-probe" && d["outcome"] == "refused" && d["reason"] == "in_progress")
        .filter_map(|d| d["unix_ms"].as_u64())
        .collect();
    assert!(ticks.len() >= 5, "only {} rule ticks acted during the hook: {ticks:?}", ticks.len());
    let mut sorted = ticks.clone();
    sorted.sort_unstable();
    let widest = sorted.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(widest < 2_000, "a rule tick waited {widest} ms: {sorted:?}");

    // The hibernate still finishes, and its id says so.
    wait_state(stack.healer(), "wk-0", "hibernated");
    let status = http(stack.api, "GET", &format!("/api/v1/actions/{action_id}"));
    assert!(
        status.contains("\"status\":\"finished\"") && status.contains("\"outcome\":\"succeeded\""),
        "{status}"
    );
    eprintln!("slowest API answer during an 8 s hook: {slowest:?}; {} rule ticks", ticks.len());
}
