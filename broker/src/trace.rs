//! Full-link traces of the requests the broker routes, exported over OTLP/gRPC.
//!
//! Every request gets up to three spans: a SERVER span from ingress to the end of the request (a child of
//! the caller's span when the request carried a W3C traceparent, the root of a new trace otherwise), an
//! INTERNAL queue-wait span while it was held because no instance was ready (typically while one woke),
//! and a CLIENT span from the moment an instance was picked. The traceparent sent on to the instance names
//! the CLIENT span as parent, so the instance's own spans join the same trace.
//!
//! Beyond what a generic proxy can say, the CLIENT span carries the instance's state when it was picked
//! (`active`, or `waking` when it was woken for this request) and what the kernel saw it do while the
//! request ran: major faults, swap-ins and run-queue delay, the difference between the collector's latest
//! snapshot when the request was routed and its latest when the request ended. Snapshots tick once per
//! interval (1 s by default), so a request shorter than that usually sees 0 for everything; the attribute
//! `vigil.kernel.snapshot_ticks` says how many ticks the window spanned, and 0 there means "not measured",
//! not "nothing happened". Counters are matched by `instance_id`: the id the instance registered with the
//! broker must be the collector's id for it (true of the instances Vigil starts); an instance the collector
//! does not know (an HTTP upstream, an instance past the export cap) gets no kernel attributes at all.
//!
//! Cost: with tracing off nothing here exists; callers hold an `Option<Arc<Tracing>>`. With it on, spans
//! are built by the OpenTelemetry SDK when each moment happens (so that their ids are known, e.g. for the
//! traceparent) with explicit timestamps, and handed to the SDK's batch processor, which exports from its
//! own thread. Attributes that are only known at the end (outcome, instance, kernel counters) are set just
//! before the spans end, all in [`RequestTrace::end`].
//!
//! A [`RequestTrace`] dropped without [`RequestTrace::end`] (its task was cancelled, the connection went
//! away) still emits its spans, with `vigil.outcome = "cancelled"` and error status: an abandoned request
//! is exactly what a trace should show.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span,
};
use vigil_healer::SnapshotReceiver;
use vigil_otel as otlp;
use vigil_otel::EnvError;

use crate::rsocket::metadata::TraceParent;

const OTEL_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{var}={value:?}: Vigil exports OTLP traces over gRPC only; set it to \"grpc\" or unset it")]
    UnsupportedProtocol { var: &'static str, value: String },
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("OTLP trace export must start inside a tokio runtime: its gRPC channel runs on it")]
    NoRuntime,
    #[error("cannot build the OTLP span exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The broker's trace exporter and the collector's snapshots it reads kernel counters from.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    snapshots: Option<SnapshotReceiver>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").field("snapshots", &self.snapshots.is_some()).finish_non_exhaustive()
    }
}

impl Tracing {
    /// Some when the standard variables ask for OTLP traces: `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or `OTEL_TRACES_EXPORTER` names `otlp`; never with
    /// `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` (the collector's rules for metrics). The SDK
    /// reads the endpoint, headers, sampler (`OTEL_TRACES_SAMPLER`) and batching (`OTEL_BSP_*`) itself;
    /// a non-gRPC protocol or a malformed timeout is an error naming the variable. Needs a tokio runtime.
    pub fn from_env(snapshots: Option<SnapshotReceiver>) -> Result<Option<Arc<Tracing>>, TraceError> {
        let lookup = otlp::env_lookup;
        if !otlp::signal_requested_in(lookup, OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
            return Ok(None);
        }
        if let Some((var, value)) = otlp::non_grpc_protocol(lookup, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) {
            return Err(TraceError::UnsupportedProtocol { var, value });
        }
        let timeout = match otlp::env_millis(lookup, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT)? {
            Some(t) => Some(t),
            None => otlp::env_millis(lookup, OTEL_EXPORTER_OTLP_TIMEOUT)?,
        };
        Self::build(None, timeout, snapshots).map(Some)
    }

    /// OTLP/gRPC to `endpoint` (e.g. `http://127.0.0.1:4317`), for tests and explicit configuration. Needs
    /// a tokio runtime.
    pub fn with_endpoint(
        endpoint: &str,
        snapshots: Option<SnapshotReceiver>,
    ) -> Result<Arc<Tracing>, TraceError> {
        Self::build(Some(endpoint), None, snapshots)
    }

    fn build(
        endpoint: Option<&str>,
        timeout: Option<Duration>,
        snapshots: Option<SnapshotReceiver>,
    ) -> Result<Arc<Tracing>, TraceError> {
        // tonic spawns the channel's worker on the current runtime and would panic without one.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TraceError::NoRuntime);
        }
        let mut exporter = SpanExporter::builder().with_tonic();
        if let Some(endpoint) = endpoint {
            exporter = exporter.with_endpoint(endpoint);
        }
        if let Some(timeout) = timeout {
            exporter = exporter.with_timeout(timeout);
        }
        let exporter = exporter.build().map_err(|source| TraceError::Exporter {
            endpoint: endpoint.unwrap_or("(from the environment)").to_owned(),
            source,
        })?;
        let provider = SdkTracerProvider::builder()
            .with_resource(otlp::resource(otlp::env_lookup))
            .with_span_processor(
                BatchSpanProcessor::builder(exporter).with_batch_config(batch_config()).build(),
            )
            .build();
        let scope =
            InstrumentationScope::builder("vigil-broker").with_version(env!("CARGO_PKG_VERSION")).build();
        let tracer = provider.tracer_with_scope(scope);
        Ok(Arc::new(Tracing { provider, tracer, snapshots }))
    }

    /// Starts the trace of one request at ingress: continues `parent` or starts a new trace. `kind` is
    /// `request_response`, `request_stream`, `request_channel`, `fire_and_forget` or `http`; `service` is
    /// the routed service.
    pub fn begin(
        self: &Arc<Self>,
        parent: Option<TraceParent>,
        service: &str,
        kind: &'static str,
    ) -> RequestTrace {
        let now = SystemTime::now();
        let parent_cx = match &parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.parent_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(format!("{kind} {service}"))
            .with_kind(SpanKind::Server)
            .with_start_time(now);
        let server = self.tracer.build_with_context(builder, &parent_cx);
        let server_cx = Context::new().with_remote_span_context(server.span_context().clone());
        RequestTrace {
            tracing: Arc::clone(self),
            server: Some(server),
            server_cx,
            parent,
            service: service.into(),
            kind,
            queue: None,
            queue_wait: Duration::ZERO,
            client: None,
            routed_to: None,
        }
    }

    /// Flushes what is buffered and stops the exporter; later spans are dropped. Idempotent. Blocks up to
    /// the SDK's export timeout; on a tokio current-thread runtime, call it from `spawn_blocking` (the final
    /// export needs that thread).
    pub fn shutdown(&self) {
        match otlp::blocking(|| self.provider.shutdown()) {
            Ok(()) | Err(OTelSdkError::AlreadyShutdown) => {}
            Err(e) => tracing::warn!(error = %e, "OTLP traces did not shut down cleanly"),
        }
    }

    /// The kernel counters of `instance_id` in the latest snapshot, if the collector knows the instance.
    fn kernel_mark(&self, instance_id: &str) -> Option<KernelMark> {
        let snapshots = self.snapshots.as_ref()?;
        // The Arc is cloned and the watch lock released at once: the collector's next send never waits.
        let snapshot = Arc::clone(&snapshots.borrow());
        let instance = snapshot.instance(instance_id)?;
        Some(KernelMark {
            tick: snapshot.tick,
            major_faults: instance.counters.major_faults,
            swap_in_pages: instance.counters.swap_in_pages,
            runq_delay_ns: instance.counters.runq_delay_ns,
        })
    }
}

/// An instance's cumulative kernel counters at one snapshot.
#[derive(Clone, Copy, Debug)]
struct KernelMark {
    tick: u64,
    major_faults: u64,
    swap_in_pages: u64,
    runq_delay_ns: u64,
}

impl KernelMark {
    /// What happened between `self` and `later`, as span attributes. Counters that went backwards (the
    /// instance restarted under the same id) count as 0 rather than as a huge wrap-around.
    fn attributes_until(&self, later: &KernelMark) -> [KeyValue; 4] {
        let diff = |a: u64, b: u64| i64::try_from(b.saturating_sub(a)).unwrap_or(i64::MAX);
        [
            KeyValue::new("vigil.kernel.major_faults", diff(self.major_faults, later.major_faults)),
            KeyValue::new("vigil.kernel.swap_in_pages", diff(self.swap_in_pages, later.swap_in_pages)),
            KeyValue::new(
                "vigil.kernel.runqueue_delay_seconds",
                later.runq_delay_ns.saturating_sub(self.runq_delay_ns) as f64 / 1e9,
            ),
            KeyValue::new("vigil.kernel.snapshot_ticks", diff(self.tick, later.tick)),
        ]
    }
}

/// Spans buffered for export, and spans per export. The SDK's defaults (2,048 and 512) leave little room at a
/// broker's request rates: two spans per request at 30,000 requests/s fill 2,048 in 34 ms. 16,384 spans is
/// about 16 MB at most. `OTEL_BSP_MAX_QUEUE_SIZE` and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` still win when set.
const MAX_QUEUED_SPANS: usize = 16_384;
const SPANS_PER_EXPORT: usize = 2_048;

fn batch_config() -> BatchConfig {
    let mut config = BatchConfigBuilder::default();
    if otlp::env_lookup("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        config = config.with_max_queue_size(MAX_QUEUED_SPANS);
    }
    if otlp::env_lookup("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").is_none() {
        config = config.with_max_export_batch_size(SPANS_PER_EXPORT);
    }
    config.build()
}

/// The trace of one request, from [`Tracing::begin`] to [`end`](Self::end) (or drop, which ends it as
/// `cancelled`).
pub struct RequestTrace {
    tracing: Arc<Tracing>,
    /// `None` once the spans were emitted.
    server: Option<Span>,
    /// Parent of the queue-wait and client spans.
    server_cx: Context,
    parent: Option<TraceParent>,
    service: Arc<str>,
    kind: &'static str,
    queue: Option<QueueWait>,
    /// Time spent in the waits that ended; an open wait is added when this is read.
    queue_wait: Duration,
    client: Option<ClientCall>,
    /// The instance of the latest routing, kept after the client span ended.
    routed_to: Option<Instance>,
}

struct QueueWait {
    span: Span,
    started: Instant,
    /// When an instance was picked; `None` while the request still waits.
    ended: Option<(SystemTime, Instant)>,
}

/// The instance a request was routed to.
#[derive(Clone)]
struct Instance {
    id: Arc<str>,
    version: Arc<str>,
    state: Arc<str>,
}

impl Instance {
    fn attributes(&self) -> [KeyValue; 3] {
        [
            KeyValue::new("vigil.version", Arc::clone(&self.version)),
            KeyValue::new("vigil.instance_id", Arc::clone(&self.id)),
            KeyValue::new("vigil.instance_state", Arc::clone(&self.state)),
        ]
    }
}

struct ClientCall {
    span: Span,
    instance: Instance,
    kernel_at_start: Option<KernelMark>,
}

impl RequestTrace {
    /// The trace id, 32 lowercase hex digits (for logs).
    pub fn trace_id_hex(&self) -> String {
        let server = self.server_cx.span().span_context().trace_id();
        match &self.parent {
            // The SDK made no span (it was shut down); the incoming trace still goes on.
            Some(p) if server == TraceId::INVALID => TraceId::from_bytes(p.trace_id).to_string(),
            _ => server.to_string(),
        }
    }

    /// The request was queued now: no instance was ready. A request queued again after it was routed (a
    /// retry) gets a second queue-wait span.
    pub fn queued(&mut self) {
        let now = SystemTime::now();
        match &self.queue {
            Some(q) if q.ended.is_none() => return,
            Some(_) => {
                if let Some(old) = self.queue.take() {
                    self.finish_queue(old, "retried", now);
                }
            }
            None => {}
        }
        let builder = SpanBuilder::from_name(format!("queue_wait {}", self.service))
            .with_kind(SpanKind::Internal)
            .with_start_time(now);
        let span = self.tracing.tracer.build_with_context(builder, &self.server_cx);
        self.queue = Some(QueueWait { span, started: Instant::now(), ended: None });
    }

    /// An instance was picked now: ends the queue wait, if any, and starts the client span. Returns the
    /// traceparent to send to the instance: this trace, the client span as parent, and the sampled flag of
    /// the incoming traceparent (set for a new trace, unless the sampler configured in the environment
    /// decides otherwise). Routing again (a retry) ends the previous client span as `retried`.
    pub fn routed(&mut self, instance_id: &str, version: &str, instance_state: &str) -> TraceParent {
        let now = SystemTime::now();
        let kernel_at_start = self.tracing.kernel_mark(instance_id);
        if let Some(q) = self.queue.as_mut().filter(|q| q.ended.is_none()) {
            let ended = Instant::now();
            self.queue_wait += ended.saturating_duration_since(q.started);
            q.ended = Some((now, ended));
        }
        if let Some(old) = self.client.take() {
            self.finish_client(old, "retried", now);
        }
        let builder = SpanBuilder::from_name(format!("{} {}", self.kind, self.service))
            .with_kind(SpanKind::Client)
            .with_start_time(now);
        let span = self.tracing.tracer.build_with_context(builder, &self.server_cx);
        let traceparent = self.traceparent_of(span.span_context());
        let instance =
            Instance { id: instance_id.into(), version: version.into(), state: instance_state.into() };
        self.routed_to = Some(instance.clone());
        self.client = Some(ClientCall { span, instance, kernel_at_start });
        traceparent
    }

    /// The request ended: emits the server span, the queue-wait span (if it was queued) and the client span
    /// (if it was routed). Any `outcome` but `ok` sets error status on the server and client spans, and on a
    /// queue wait that never ended in routing.
    pub fn end(mut self, outcome: &str) {
        self.finish(outcome);
    }

    /// The traceparent naming `span` as parent. When the SDK made no valid span (the exporter was shut
    /// down) the instance still gets a usable one: the incoming trace, or a new one, not sampled.
    fn traceparent_of(&self, span: &SpanContext) -> TraceParent {
        if span.is_valid() {
            return TraceParent {
                trace_id: span.trace_id().to_bytes(),
                parent_id: span.span_id().to_bytes(),
                flags: span.trace_flags().to_u8(),
            };
        }
        let parent_id = loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                break id;
            }
        };
        match &self.parent {
            Some(p) => TraceParent { trace_id: p.trace_id, parent_id, flags: p.flags },
            None => {
                TraceParent { trace_id: rand::random::<u128>().max(1).to_be_bytes(), parent_id, flags: 0 }
            }
        }
    }

    /// Attributes every span of this request carries.
    fn common_attributes(&self, outcome: &str) -> Vec<KeyValue> {
        let mut attrs = Vec::with_capacity(9);
        let rpc_system = if self.kind == "http" { "http" } else { "rsocket" };
        attrs.push(KeyValue::new("rpc.system", rpc_system));
        attrs.push(KeyValue::new("vigil.service", Arc::clone(&self.service)));
        attrs.push(KeyValue::new("vigil.interaction", self.kind));
        attrs.push(KeyValue::new("vigil.outcome", outcome.to_owned()));
        if let Some(instance) = &self.routed_to {
            attrs.extend(instance.attributes());
        }
        attrs
    }

    fn queue_wait_seconds(&self) -> KeyValue {
        let open = self.queue.as_ref().filter(|q| q.ended.is_none()).map(|q| q.started.elapsed());
        KeyValue::new("vigil.queue_wait_seconds", (self.queue_wait + open.unwrap_or_default()).as_secs_f64())
    }

    fn finish_queue(&self, mut q: QueueWait, outcome: &str, now: SystemTime) {
        let (end, wait) = match q.ended {
            Some((end, ended)) => (end, ended.saturating_duration_since(q.started)),
            None => (now, q.started.elapsed()),
        };
        let mut attrs = self.common_attributes(outcome);
        attrs.push(KeyValue::new("vigil.queue_wait_seconds", wait.as_secs_f64()));
        q.span.set_attributes(attrs);
        // A wait that ended in routing did its job; the request failing later is the client span's story.
        if q.ended.is_none() && outcome != "ok" {
            q.span.set_status(Status::error(Cow::Owned(outcome.to_owned())));
        }
        q.span.end_with_timestamp(end);
    }

    fn finish_client(&self, mut c: ClientCall, outcome: &str, now: SystemTime) {
        let mut attrs = self.common_attributes(outcome);
        // The instance of *this* attempt, which a retry may already have replaced in `routed_to`.
        attrs.retain(|kv| {
            !matches!(kv.key.as_str(), "vigil.version" | "vigil.instance_id" | "vigil.instance_state")
        });
        attrs.extend(c.instance.attributes());
        attrs.push(self.queue_wait_seconds());
        if let Some(start) = &c.kernel_at_start
            && let Some(end) = self.tracing.kernel_mark(&c.instance.id)
        {
            attrs.extend(start.attributes_until(&end));
        }
        c.span.set_attributes(attrs);
        if outcome != "ok" {
            c.span.set_status(Status::error(Cow::Owned(outcome.to_owned())));
        }
        c.span.end_with_timestamp(now);
    }

    fn finish(&mut self, outcome: &str) {
        let Some(mut server) = self.server.take() else { return };
        let now = SystemTime::now();
        if let Some(c) = self.client.take() {
            self.finish_client(c, outcome, now);
        }
        let queue_wait = self.queue_wait_seconds();
        if let Some(q) = self.queue.take() {
            self.finish_queue(q, outcome, now);
        }
        let mut attrs = self.common_attributes(outcome);
        attrs.push(queue_wait);
        server.set_attributes(attrs);
        if outcome != "ok" {
            server.set_status(Status::error(Cow::Owned(outcome.to_owned())));
        }
        server.end_with_timestamp(now);
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(tick: u64, major_faults: u64, swap_in_pages: u64, runq_delay_ns: u64) -> KernelMark {
        KernelMark { tick, major_faults, swap_in_pages, runq_delay_ns }
    }

    fn values(attrs: &[KeyValue]) -> Vec<(String, String)> {
        attrs.iter().map(|kv| (kv.key.to_string(), kv.value.to_string())).collect()
    }

    #[test]
    fn kernel_attributes_are_the_difference_between_snapshots() {
        let attrs = mark(3, 10, 100, 1_000_000).attributes_until(&mark(5, 12, 164, 501_000_000));
        let want = [
            ("vigil.kernel.major_faults", "2"),
            ("vigil.kernel.swap_in_pages", "64"),
            ("vigil.kernel.runqueue_delay_seconds", "0.5"),
            ("vigil.kernel.snapshot_ticks", "2"),
        ];
        assert_eq!(values(&attrs), want.map(|(k, v)| (k.to_owned(), v.to_owned())));
    }

    #[test]
    fn counters_that_went_backwards_count_as_zero() {
        // The instance restarted under the same id between the two snapshots.
        let attrs = mark(3, 10, 100, 9_000_000).attributes_until(&mark(4, 1, 0, 0));
        let got = values(&attrs);
        assert_eq!(got[0].1, "0");
        assert_eq!(got[1].1, "0");
        assert_eq!(got[2].1, "0");
        assert_eq!(got[3].1, "1");
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error_not_a_panic() {
        let err = Tracing::with_endpoint("http://127.0.0.1:4317", None).expect_err("no runtime");
        assert!(matches!(err, TraceError::NoRuntime), "{err}");
    }
}
