//! Round trip of the OTLP exporter: hand-built snapshots go out over gRPC to a real receiver
//! (`otlp_receiver.py`, needing the PyPI packages `opentelemetry-proto` and `grpcio`, which
//! `scripts/setup` installs) and the exact values, attributes and kinds must arrive.
//!
//! The exporter is configured explicitly (endpoint, interval), never through the process environment,
//! so these tests cannot disturb each other or anything else running in this binary.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::otlp::Receiver;
use vigil_collector::otlp::{OtlpConfig, OtlpMetrics};
use vigil_collector::snapshot::{
    Counters, InstanceKind, InstanceSnapshot, Memory, Pressure, Psi, PsiLine, Rates, Snapshot,
};

/// Longest wait for an export to show what the test expects.
const DEADLINE: Duration = Duration::from_secs(20);

impl Receiver {
    /// The next complete export: all its data points, or `None` once `until` has passed.
    async fn next_batch(&mut self, until: Instant) -> Option<Vec<Value>> {
        let mut points = Vec::new();
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let line = match tokio::time::timeout(left, self.lines.next_line()).await {
                Err(_) => return None,
                Ok(line) => line.expect("read receiver stdout").expect("receiver exited early"),
            };
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("receiver line {line:?}: {e}"));
            if v["end"] == true {
                assert_eq!(v["points"].as_u64(), Some(points.len() as u64), "batch line count");
                return Some(points);
            }
            points.push(v);
        }
    }

    /// The first export within [`DEADLINE`] that satisfies `done`; panics with the last one seen.
    async fn wait_for(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let until = Instant::now() + DEADLINE;
        let mut last = None;
        while let Some(batch) = self.next_batch(until).await {
            if done(&batch) {
                return batch;
            }
            last = Some(batch);
        }
        panic!("no export with {what} within {DEADLINE:?}; last export: {last:#?}");
    }
}

/// The data point of `name` whose attributes are exactly `attrs`.
fn point<'a>(batch: &'a [Value], name: &str, attrs: &[(&str, &str)]) -> Option<&'a Value> {
    let want: BTreeMap<&str, &str> = attrs.iter().copied().collect();
    batch.iter().find(|p| {
        p["name"] == name
            && p["attributes"].as_object().is_some_and(|a| {
                a.len() == want.len()
                    && want.iter().all(|(k, v)| a.get(*k).and_then(Value::as_str) == Some(*v))
            })
    })
}

/// `point` that must exist, for asserting on it.
fn must<'a>(batch: &'a [Value], name: &str, attrs: &[(&str, &str)]) -> &'a Value {
    point(batch, name, attrs).unwrap_or_else(|| panic!("no {name} {attrs:?} in {batch:#?}"))
}

fn assert_counter(batch: &[Value], name: &str, attrs: &[(&str, &str)], value: Value) {
    let p = must(batch, name, attrs);
    assert_eq!(p["value"], value, "{name} {attrs:?}: {p}");
    assert_eq!(p["kind"], "sum", "{name} is a sum: {p}");
    assert_eq!(p["monotonic"], true, "{name} is monotonic: {p}");
    assert_eq!(p["temporality"], "cumulative", "{name} is cumulative: {p}");
}

fn assert_gauge(batch: &[Value], name: &str, attrs: &[(&str, &str)], value: Value) {
    let p = must(batch, name, attrs);
    assert_eq!(p["value"], value, "{name} {attrs:?}: {p}");
    assert_eq!(p["kind"], "gauge", "{name} is a gauge: {p}");
}

fn instance(
    service: &str,
    id: &str,
    counters: Counters,
    memory: Memory,
    pressure: Pressure,
) -> InstanceSnapshot {
    InstanceSnapshot {
        service: service.into(),
        instance_id: id.into(),
        kind: InstanceKind::Managed,
        cgroup: format!("/vigil/{service}/{id}").into(),
        cgroup_id: Some(1),
        memcg_id: Some(1),
        counters,
        rates: Rates::default(),
        memory,
        pressure,
    }
}

fn echo_counters() -> Counters {
    Counters {
        minor_faults: 123,
        major_faults: 4,
        swap_in_pages: 5,
        swap_out_pages: 6,
        memcg_major_faults: 3,
        cpu_ns: 2_500_000_000,
        runq_delay_ns: 3_000_000,
        runq_delays: 7,
        throttled_ns: 250_000_000,
        ..Counters::default()
    }
}

fn first_snapshot() -> Snapshot {
    let mut s = Snapshot::empty();
    s.tick = 9;
    s.dropped_total = 3;
    s.probe_errors[vigil_common::Probe::Memcg as usize] = 2;
    let cpu_psi = Psi { some: PsiLine { total_us: 1_500_000, ..PsiLine::default() }, full: None };
    s.instances.push(instance(
        "echo",
        "echo-0",
        echo_counters(),
        Memory { resident_bytes: Some(4096), swap_bytes: None },
        Pressure { cpu: Some(cpu_psi), ..Pressure::default() },
    ));
    s.overflow = Some(instance(
        "_overflow",
        "_overflow",
        Counters { minor_faults: 10, cpu_ns: 500_000_000, ..Counters::default() },
        Memory { resident_bytes: Some(8192), swap_bytes: Some(0) },
        Pressure::default(),
    ));
    s
}

const ECHO: [(&str, &str); 2] = [("service", "echo"), ("instance_id", "echo-0")];
const OVERFLOW: [(&str, &str); 2] = [("service", "_overflow"), ("instance_id", "_overflow")];

fn with(
    base: [(&'static str, &'static str); 2],
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    base.iter().chain(extra).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_values_reach_an_otlp_receiver() {
    let mut receiver = Receiver::start().await;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(first_snapshot()));
    let config = OtlpConfig {
        endpoint: Some(receiver.endpoint()),
        export_interval: Some(Duration::from_millis(200)),
        timeout: Some(Duration::from_secs(5)),
        ..OtlpConfig::default()
    };
    let otlp = OtlpMetrics::start_with(rx, config).expect("start OTLP export");

    let minor = with(ECHO, &[("kind", "minor")]);
    let batch = receiver
        .wait_for("echo-0's page faults", |b| point(b, "vigil_instance_page_faults", &minor).is_some())
        .await;

    assert_counter(&batch, "vigil_instance_page_faults", &minor, 123.into());
    assert_counter(&batch, "vigil_instance_page_faults", &with(ECHO, &[("kind", "major")]), 4.into());
    assert_counter(&batch, "vigil_instance_swap_in_pages", &ECHO, 5.into());
    assert_counter(&batch, "vigil_instance_swap_out_pages", &ECHO, 6.into());
    assert_counter(&batch, "vigil_instance_memcg_major_faults", &ECHO, 3.into());
    assert_counter(&batch, "vigil_instance_cpu_seconds", &ECHO, 2.5.into());
    assert_counter(&batch, "vigil_instance_cpu_throttled_seconds", &ECHO, 0.25.into());
    assert_counter(&batch, "vigil_instance_runqueue_delay_seconds_sum", &ECHO, 0.003.into());
    assert_counter(&batch, "vigil_instance_runqueue_delay_seconds_count", &ECHO, 7.into());
    assert_counter(
        &batch,
        "vigil_instance_pressure_seconds",
        &with(ECHO, &[("resource", "cpu"), ("kind", "some")]),
        1.5.into(),
    );
    assert_gauge(&batch, "vigil_instance_memory_resident_bytes", &ECHO, 4096.into());
    assert!(point(&batch, "vigil_instance_memory_swap_bytes", &ECHO).is_none(), "absent swap is not 0");

    assert_counter(&batch, "vigil_instance_page_faults", &with(OVERFLOW, &[("kind", "minor")]), 10.into());
    assert_counter(&batch, "vigil_instance_cpu_seconds", &OVERFLOW, 0.5.into());
    assert_gauge(&batch, "vigil_instance_memory_resident_bytes", &OVERFLOW, 8192.into());
    assert_gauge(&batch, "vigil_instance_memory_swap_bytes", &OVERFLOW, 0.into());

    assert_gauge(&batch, "vigil_instances", &[], 1.into());
    assert_counter(&batch, "vigil_instances_dropped", &[], 3.into());
    assert_counter(&batch, "vigil_collector_ticks", &[], 9.into());
    assert_counter(&batch, "vigil_probe_errors", &[("probe", "memcg_events")], 2.into());
    assert_counter(&batch, "vigil_probe_errors", &[("probe", "sched_switch")], 0.into());

    assert_eq!(must(&batch, "vigil_instance_cpu_seconds", &ECHO)["unit"], "s");
    assert_eq!(must(&batch, "vigil_instance_memory_resident_bytes", &ECHO)["unit"], "By");
    for p in &batch {
        assert!(
            p["attributes"].get("instance").is_none(),
            "`instance` is reserved for the scrape target: {p}"
        );
        assert_eq!(p["scope"], "vigil-collector", "{p}");
        assert!(p["name"].as_str().is_some_and(|n| !n.ends_with("_total")), "no Prometheus suffix: {p}");
    }
    let env_names_service = ["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if !env_names_service {
        assert_eq!(batch[0]["resource"]["service.name"], "vigil", "{}", batch[0]);
    }

    // Exports read the latest snapshot, and series that left it leave the export too.
    let mut second = first_snapshot();
    second.tick = 10;
    second.overflow = None;
    second.instances[0].counters.minor_faults = 200;
    second.instances[0].memory.resident_bytes = None;
    tx.send(Arc::new(second)).expect("the exporter holds a receiver");
    let batch = receiver
        .wait_for("echo-0's minor faults at 200", |b| {
            point(b, "vigil_instance_page_faults", &minor).is_some_and(|p| p["value"] == 200)
        })
        .await;
    assert_counter(&batch, "vigil_collector_ticks", &[], 10.into());
    assert_counter(&batch, "vigil_instance_cpu_seconds", &ECHO, 2.5.into());
    assert!(point(&batch, "vigil_instance_memory_resident_bytes", &ECHO).is_none(), "{batch:#?}");
    assert!(
        !batch.iter().any(|p| p["attributes"]["instance_id"] == "_overflow"),
        "the overflow series left the snapshot: {batch:#?}"
    );

    otlp.shutdown().expect("clean shutdown");
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_nothing_listens() {
    // A port that was free a moment ago: connections are refused.
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(first_snapshot()));
    let config = OtlpConfig {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        export_interval: Some(Duration::from_secs(60)),
        timeout: Some(Duration::from_secs(1)),
        ..OtlpConfig::default()
    };
    let otlp = OtlpMetrics::start_with(rx, config).expect("start OTLP export");
    let started = Instant::now();
    let result = otlp.shutdown();
    // The final export fails; what matters is that shutdown returns, well within the SDK's 5 s bound.
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}: {result:?}", started.elapsed());
}
