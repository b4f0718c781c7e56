//! The autoscaler through the whole stack, with real processes and real load: a collector, the healer
//! running a `scale:` service (a Python HTTP server whose every request takes 200 ms), and the broker in
//! front; a load generator in the test (closed-loop clients, each one request at a time, bounded in time).
//!
//! Each request carries an id that the instance that served it writes to its own log, so "every request
//! answered exactly once" is checked against what the instances saw, not only against the answers.
//! The scaling dashboard is checked against a real Prometheus after the step. Needs root and
//! /usr/bin/prometheus (`scripts/setup`).

#[path = "../../collector/tests/support/mod.rs"]
mod collector_support;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use collector_support::dashboard::panel_queries;
use collector_support::prometheus::{Prometheus, has_samples};
use serde_json::Value;
use support::load::Load;
use support::stack::{Options, Stack, free_ports};

/// The service: a threading HTTP server; `/work?id=X` takes 200 ms and logs X to `<logs>/<instance>.log`.
const APP: &str = include_str!("support/scale_app.py");

/// The app's script and log directory for a test.
fn app_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-autoscale-app-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).expect("app dir");
    std::fs::write(dir.join("app.py"), APP).expect("app script");
    dir
}

/// The `services:` YAML of the scaled service `api` on `port`, with `scale` as its scale block.
fn service_yaml(app: &Path, port: u16, scale: &str) -> String {
    format!(
        "  - name: api\n    command: [\"{}\", \"{}\", \"{{port}}\", \"{}\"]\n    port: {port}\n    readiness: {{ http: /healthz }}\n    route: /\n    scale: {scale}\n",
        collector_support::workload::python_executable(),
        app.join("app.py").display(),
        app.join("logs").display(),
    )
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn json_body(answer: &str) -> Value {
    answer.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null)
}

fn service(api: SocketAddr) -> Value {
    json_body(&http(api, "GET", "/api/v1/services/api", ""))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(u64::MAX)
}

/// Polls `f` every 50 ms until it returns `Some`, at most `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every id the instances logged, with how often.
fn logged(app: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(app.join("logs")).expect("logs").flatten() {
        for line in std::fs::read_to_string(entry.path()).unwrap_or_default().lines() {
            *seen.entry(line.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// The autoscaler's steps in the audit log, oldest first: `(action, instance_id)`.
fn autoscale_steps(api: SocketAddr) -> Vec<(String, String)> {
    let answer = json_body(&http(api, "GET", "/api/v1/decisions?limit=500", ""));
    let mut steps: Vec<(String, String)> = answer["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["rule"] == "autoscale")
        .map(|d| {
            (
                d["action"].as_str().unwrap_or("").to_string(),
                d["instance_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    steps.reverse();
    steps
}

#[test]
fn a_step_of_40_clients_scales_from_zero_and_back_through_the_standby_tier_and_every_panel_has_data() {
    let app = app_dir("step");
    let scale = "{ min: 0, max: 8, target_concurrency: 10, target_utilization: 0.7, standby: 2, stable_window: 6s, panic_window: 2s, scale_down_delay: 3s, zero_grace: 5s }";
    let stack = Stack::start(Options {
        tag: "scale-step",
        services: service_yaml(&app, free_ports(8), scale),
        ..Options::default()
    });
    let api = stack.api;
    let s = service(api);
    assert_eq!((count(&s, "desired"), count(&s, "ready"), count(&s, "stopped")), (0, 0, 8), "{s}");

    // A step from 0 to 40 concurrent clients, for 10 s.
    let target = Arc::new(Mutex::new(stack.trigger));
    let load = Load::start(target, 40, "step");
    let began = Instant::now();
    let mut peak_desired = 0;
    let mut peak_ready = 0;
    while began.elapsed() < Duration::from_secs(10) {
        let s = service(api);
        peak_desired = peak_desired.max(count(&s, "desired"));
        peak_ready = peak_ready.max(count(&s, "ready"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = load.finish();
    let expected = (40.0_f64 / (10.0 * 0.7)).ceil() as u64;
    assert!(
        peak_desired.abs_diff(expected) <= 1,
        "desired peaked at {peak_desired}, expected {expected} ± 1"
    );
    assert!(peak_ready.abs_diff(expected) <= 1, "ready peaked at {peak_ready}, expected {expected} ± 1");
    assert_eq!(report.unanswered, 0, "requests without an answer");
    let statuses: Vec<u16> = report.answered.keys().copied().collect();
    assert_eq!(statuses, [200], "every request answered 200: {:?}", report.answered.keys());
    let answered: HashSet<&String> = report.answered[&200].iter().collect();
    let seen = logged(&app);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "requests served more than once: {twice:?}");
    let seen_ids: HashSet<&String> = seen.keys().collect();
    assert_eq!(answered, seen_ids, "the answered requests are exactly those the instances served");
    assert!(answered.len() > 400, "only {} requests in 10 s", answered.len());

    // The load stops: instances go to standby (hibernated, up to 2), the rest stop, then zero.
    let settled = wait_for(Duration::from_secs(40), "the service at zero", || {
        let s = service(api);
        (count(&s, "ready") == 0 && count(&s, "serving") == 0).then_some(s)
    });
    assert_eq!((count(&settled, "standby"), count(&settled, "stopped")), (2, 6), "{settled}");
    let steps = autoscale_steps(api);
    let hibernated = steps.iter().filter(|(a, _)| a == "hibernate").count();
    assert_eq!(hibernated, 2, "two instances went to standby: {steps:?}");

    // A new request wakes a standby instance rather than cold-starting one.
    let before = steps.len();
    let answer = http(stack.trigger, "GET", "/work?id=after", "");
    assert!(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"), "{answer}");
    // Steps are audited when they end: the last stop may still have been under way at `before`.
    let after = autoscale_steps(api);
    let new: Vec<&(String, String)> = after[before..].iter().filter(|(a, _)| a != "stop").collect();
    assert_eq!(new.len(), 1, "one step for the request: {after:?}");
    assert_eq!(new[0].0, "wake", "the request woke a standby instance: {after:?}");
    assert!(answer.ends_with(&new[0].1), "answered by the woken instance {}: {answer}", new[0].1);

    // Every panel of the scaling dashboard has data in a real Prometheus.
    let prometheus = Prometheus::start(api).expect("start prometheus");
    prometheus.wait_until_up(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/scaling.json");
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 6, "the scaling dashboard has only {} queries", queries.len());
    for (title, expr) in queries {
        prometheus
            .wait_for(&expr, Duration::from_secs(60), has_samples)
            .unwrap_or_else(|e| panic!("panel `{title}`: {e}"));
    }
    drop(stack);
    let _ = std::fs::remove_dir_all(app);
}

#[test]
fn a_burst_of_four_times_capacity_panics_within_one_panic_window() {
    let app = app_dir("panic");
    let scale = "{ min: 1, max: 8, target_concurrency: 10, target_utilization: 0.7, stable_window: 30s, panic_window: 6s }";
    let stack = Stack::start(Options {
        tag: "scale-panic",
        services: service_yaml(&app, free_ports(8), scale),
        ..Options::default()
    });
    let api = stack.api;
    wait_for(Duration::from_secs(20), "one ready instance", || {
        (count(&service(api), "ready") == 1).then_some(())
    });
    assert_eq!(service(api)["mode"], "stable");
    // Capacity is 1 × 10 × 0.7 = 7 in flight: 28 clients are 4× that.
    let load = Load::start(Arc::new(Mutex::new(stack.trigger)), 28, "burst");
    let began = Instant::now();
    let mut last = Value::Null;
    let panicked = wait_for(Duration::from_secs(20), "panic mode", || {
        let s = service(api);
        if s["mode"] == "panic" {
            return Some(s);
        }
        if last["last_decision"]["why"] != s["last_decision"]["why"] {
            eprintln!("{:?}: {}", began.elapsed(), s["last_decision"]["why"]);
        }
        last = s;
        None
    });
    let took = began.elapsed();
    let metrics = http(api, "GET", "/metrics", "");
    assert!(
        took <= Duration::from_secs(6),
        "panic after {took:?}, more than the 6 s panic window: {panicked}"
    );
    assert!(metrics.contains("vigil_autoscaler_panic{service=\"api\"} 1"), "{metrics}");
    assert!(count(&panicked, "desired") >= 2, "{panicked}");

    let report = load.finish();
    assert_eq!(report.answered.keys().copied().collect::<Vec<_>>(), [200]);
    drop(stack);
    let _ = std::fs::remove_dir_all(app);
}

#[test]
fn vigil_restarted_under_load_does_not_scale_the_service_down() {
    let app = app_dir("restart");
    // Eight instance ports and the trigger's, all bound again after the restart.
    let port = free_ports(9);
    let trigger_port = port + 8;
    let trigger = format!("127.0.0.1:{trigger_port}");
    let scale = "{ min: 0, max: 8, target_concurrency: 10, target_utilization: 0.7, stable_window: 10s, panic_window: 2s, scale_down_delay: 2s }";
    let options = || Options {
        tag: "scale-restart",
        services: service_yaml(&app, port, scale),
        trigger: &trigger,
        keep_data: true,
        ..Options::default()
    };
    let stack = Stack::start(options());
    let api = stack.api;
    let target = Arc::new(Mutex::new(stack.trigger));
    // 20 clients want ceil(20 / 7) = 3 instances.
    let load = Load::start(target.clone(), 20, "restart");
    wait_for(Duration::from_secs(30), "3 ready instances", || {
        (count(&service(api), "ready") == 3).then_some(())
    });
    let data_dir = stack.data_dir.clone();
    drop(stack);
    // The count under load, saved: at least the 3 ready (the burst from zero panics, and a panic's peak is
    // held for a stable window, so it may be more).
    let saved = std::fs::read_to_string(data_dir.join("autoscale.json")).expect("the saved counts");
    let saved = serde_json::from_str::<Value>(&saved).ok().and_then(|v| v["api"].as_u64()).unwrap_or(0);
    assert!(saved >= 3, "saved count {saved}");

    // Vigil again on the same data, under the same load: never below the saved count while the stable
    // window (10 s from the start) fills.
    let stack = Stack::start(options());
    let api = stack.api;
    let began = Instant::now();
    let mut lowest = u64::MAX;
    while began.elapsed() < Duration::from_secs(9) {
        lowest = lowest.min(count(&service(api), "desired"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = wait_for(Duration::from_secs(20), "3 or more ready", || {
        let s = service(api);
        (count(&s, "ready") >= 3).then_some(count(&s, "ready"))
    });
    let report = load.finish();
    assert!(lowest >= saved, "the restarted autoscaler went down to {lowest}, below the saved {saved}");
    assert!(ready >= 3, "{ready} ready");
    assert!(report.answered.get(&200).is_some_and(|ids| ids.len() > 100), "{:?}", report.answered.keys());
    drop(stack);
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_dir_all(app);
}
