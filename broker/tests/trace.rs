//! Round trip of the broker's traces: a request's spans go out over OTLP/gRPC to a real receiver
//! (`collector/tests/otlp_receiver.py`, needing the PyPI packages `opentelemetry-proto` and `grpcio`, which
//! `scripts/setup` installs) and must arrive with the right ids, parents, times, attributes and status.
//!
//! Tracing is configured explicitly (`Tracing::with_endpoint`), never through the process environment, so
//! these tests cannot disturb each other or anything else running in this binary.

#[path = "../../collector/tests/support/mod.rs"]
mod collector_support;

use std::sync::Arc;
use std::time::Duration;

use collector_support::otlp::Receiver;
use serde_json::Value;
use vigil_broker::rsocket::metadata::TraceParent;
use vigil_broker::trace::Tracing;
use vigil_collector::snapshot::{Counters, InstanceKind, InstanceSnapshot, Snapshot};

/// Silence after which every export that shutdown flushed is taken to have been read.
const QUIET: Duration = Duration::from_millis(500);

impl Receiver {
    /// Every span received so far. Call after `Tracing::shutdown`, which returns only once the final
    /// export was answered, and the receiver prints a batch before it answers.
    async fn spans(&mut self) -> Vec<Value> {
        let mut spans = Vec::new();
        let mut pending = 0;
        while let Ok(line) = tokio::time::timeout(QUIET, self.lines.next_line()).await {
            let line = line.expect("read receiver stdout").expect("receiver exited early");
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("receiver line {line:?}: {e}"));
            if v["end"] == true {
                assert_eq!(v["spans"].as_u64(), Some(pending), "batch line count");
                pending = 0;
            } else {
                pending += 1;
                spans.push(v);
            }
        }
        assert_eq!(pending, 0, "a batch was cut short: {spans:#?}");
        spans
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one span of `kind` in `spans`.
fn only<'a>(spans: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| s["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind} span in {spans:#?}");
    found[0]
}

fn nanos(span: &Value, field: &str) -> u64 {
    span[field].as_u64().unwrap_or_else(|| panic!("{field} of {span}"))
}

fn echo_snapshot(tick: u64, major_faults: u64, swap_in_pages: u64, runq_delay_ns: u64) -> Arc<Snapshot> {
    let mut s = Snapshot::empty();
    s.tick = tick;
    s.instances.push(InstanceSnapshot {
        service: "echo".into(),
        instance_id: "echo-0".into(),
        kind: InstanceKind::Managed,
        cgroup: "/vigil/echo/echo-0".into(),
        cgroup_id: Some(1),
        memcg_id: Some(1),
        counters: Counters { major_faults, swap_in_pages, runq_delay_ns, ..Counters::default() },
        rates: Default::default(),
        memory: Default::default(),
        pressure: Default::default(),
    });
    Arc::new(s)
}

const INCOMING: TraceParent = TraceParent {
    trace_id: [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
    ],
    parent_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
    flags: 0x01,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_request_continues_the_incoming_trace() {
    let mut receiver = Receiver::start().await;
    let (snapshots_tx, snapshots) = tokio::sync::watch::channel(echo_snapshot(7, 10, 100, 1_000_000));
    let tracing = Tracing::with_endpoint(&receiver.endpoint(), Some(snapshots)).expect("start tracing");

    let mut request = tracing.begin(Some(INCOMING), "echo", "request_response");
    assert_eq!(request.trace_id_hex(), hex(&INCOMING.trace_id));
    request.queued();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = request.routed("echo-0", "v1", "waking");
    // The instance ran while the collector ticked twice.
    snapshots_tx.send(echo_snapshot(9, 13, 164, 251_000_000)).expect("tracing holds a receiver");
    request.end("ok");
    tracing.shutdown();
    tracing.shutdown(); // idempotent

    let spans = receiver.spans().await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    for s in &spans {
        assert_eq!(s["trace_id"], hex(&INCOMING.trace_id), "{s}");
        assert_eq!(s["scope"], "vigil-broker", "{s}");
    }
    let server = only(&spans, "server");
    let queue = only(&spans, "internal");
    let client = only(&spans, "client");
    assert_eq!(server["parent_span_id"], hex(&INCOMING.parent_id), "{server}");
    assert_eq!(queue["parent_span_id"], server["span_id"], "{queue}");
    assert_eq!(client["parent_span_id"], server["span_id"], "{client}");
    assert_eq!(sent.trace_id, INCOMING.trace_id);
    assert_eq!(Value::from(hex(&sent.parent_id)), client["span_id"], "traceparent to the instance");
    assert_eq!(sent.flags, 0x01, "sampled, as the incoming one");

    let queue_wait_ns = nanos(queue, "end_ns") - nanos(queue, "start_ns");
    assert!(queue_wait_ns >= 50_000_000, "queue wait of {queue_wait_ns} ns: {queue}");
    assert_eq!(
        nanos(queue, "end_ns"),
        nanos(client, "start_ns"),
        "routing ends the wait and starts the call"
    );
    assert!(nanos(server, "start_ns") <= nanos(queue, "start_ns"), "{server} {queue}");
    assert!(nanos(client, "end_ns") <= nanos(server, "end_ns"), "{server} {client}");

    for s in [server, queue, client] {
        let a = &s["attributes"];
        assert_eq!(a["rpc.system"], "rsocket", "{s}");
        assert_eq!(a["vigil.service"], "echo", "{s}");
        assert_eq!(a["vigil.version"], "v1", "{s}");
        assert_eq!(a["vigil.instance_id"], "echo-0", "{s}");
        assert_eq!(a["vigil.instance_state"], "waking", "{s}");
        assert_eq!(a["vigil.outcome"], "ok", "{s}");
        let wait = a["vigil.queue_wait_seconds"].as_f64().unwrap_or_else(|| panic!("queue wait in {s}"));
        assert!((0.05..10.0).contains(&wait), "queue wait {wait} in {s}");
        assert_eq!(s["status"]["code"], "unset", "{s}");
    }
    let a = &client["attributes"];
    assert_eq!(a["vigil.kernel.major_faults"], 3, "{client}");
    assert_eq!(a["vigil.kernel.swap_in_pages"], 64, "{client}");
    assert_eq!(a["vigil.kernel.runqueue_delay_seconds"], 0.25, "{client}");
    assert_eq!(a["vigil.kernel.snapshot_ticks"], 2, "{client}");
    assert!(server["attributes"].get("vigil.kernel.major_faults").is_none(), "{server}");
    assert_eq!(server["name"], "request_response echo");

    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_traceparent_starts_a_trace_and_failure_is_an_error() {
    let mut receiver = Receiver::start().await;
    let tracing = Tracing::with_endpoint(&receiver.endpoint(), None).expect("start tracing");

    let mut request = tracing.begin(None, "echo", "http");
    let trace_id = request.trace_id_hex();
    assert_ne!(trace_id, "0".repeat(32));
    let sent = request.routed("echo-1", "v2", "active");
    request.end("failure");

    // Dropped without end(): emitted as cancelled, in a trace of its own.
    let cancelled = tracing.begin(None, "echo", "fire_and_forget");
    let cancelled_id = cancelled.trace_id_hex();
    drop(cancelled);
    tracing.shutdown();

    let spans = receiver.spans().await;
    let (ours, others): (Vec<Value>, Vec<Value>) = spans.into_iter().partition(|s| s["trace_id"] == trace_id);
    assert_eq!(ours.len(), 2, "server and client, no queue wait: {ours:#?}");
    assert_eq!(hex(&sent.trace_id), trace_id);
    assert_eq!(sent.flags & 1, 1, "a new trace is sampled");
    let server = only(&ours, "server");
    let client = only(&ours, "client");
    assert_eq!(server["parent_span_id"], Value::Null, "the server span is the root: {server}");
    assert_eq!(client["parent_span_id"], server["span_id"], "{client}");
    assert_eq!(Value::from(hex(&sent.parent_id)), client["span_id"]);
    for s in [server, client] {
        let a = &s["attributes"];
        assert_eq!(s["status"]["code"], "error", "{s}");
        assert_eq!(s["status"]["message"], "failure", "{s}");
        assert_eq!(a["vigil.outcome"], "failure", "{s}");
        assert_eq!(a["rpc.system"], "http", "{s}");
        assert_eq!(a["vigil.instance_state"], "active", "{s}");
        assert_eq!(a["vigil.queue_wait_seconds"], 0.0, "{s}");
    }
    assert!(client["attributes"].get("vigil.kernel.major_faults").is_none(), "no snapshots: {client}");

    assert_eq!(others.len(), 1, "{others:#?}");
    let c = &others[0];
    assert_eq!(c["trace_id"], cancelled_id);
    assert_eq!(c["kind"], "server");
    assert_eq!(c["attributes"]["vigil.outcome"], "cancelled", "{c}");
    assert_eq!(c["status"]["code"], "error", "{c}");

    receiver.stop().await;
}

#[path = "support/mod.rs"]
mod support;

/// client.py → broker → service.py over real sockets: the broker's server and client spans continue the
/// client's trace, and the traceparent the service receives names the broker's client span as its parent,
/// so the service's own spans would join the same trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_broker_and_instance_share_one_trace() {
    let mut receiver = Receiver::start().await;
    let tracing = Tracing::with_endpoint(&receiver.endpoint(), None).expect("start tracing");
    let yaml = "broker:\n  listen: 127.0.0.1:0\n  http: { enabled: false }\n";
    let file = vigil_broker::config::BrokerFile::parse(yaml, "t.yaml").expect("config");
    let broker = vigil_broker::Broker::start_traced(file, None, Some(tracing.clone())).await.expect("broker");
    let addr = broker.rsocket_addr();
    let _svc = support::Peer::service(addr, "echo", "v1", "echo-0", &[]).await;
    let incoming = INCOMING.to_string();
    let out = support::client(addr, &["echo"], &["rr-traceparent", "hi", &incoming]).await;
    assert_eq!(out.len(), 1, "{out:?}");
    let received: TraceParent =
        out[0]["traceparent"].as_str().unwrap_or_else(|| panic!("{out:?}")).parse().expect("a traceparent");
    broker.shutdown().await;

    let spans = receiver.spans().await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = only(&spans, "server");
    let client = only(&spans, "client");
    for s in [server, client] {
        assert_eq!(s["trace_id"], hex(&INCOMING.trace_id), "{s}");
        assert_eq!(s["attributes"]["vigil.outcome"], "ok", "{s}");
        assert_eq!(s["attributes"]["vigil.instance_id"], "echo-0", "{s}");
    }
    assert_eq!(server["parent_span_id"], hex(&INCOMING.parent_id), "{server}");
    assert_eq!(client["parent_span_id"], server["span_id"], "{client}");
    assert_eq!(received.trace_id, INCOMING.trace_id, "the instance is in the client's trace");
    assert_eq!(
        Value::from(hex(&received.parent_id)),
        client["span_id"],
        "its parent is the broker's client span"
    );
    receiver.stop().await;
}
