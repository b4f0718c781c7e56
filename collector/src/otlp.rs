//! OTLP push of the collector's metrics, for hosts whose telemetry goes to an OpenTelemetry collector
//! rather than (or as well as) a Prometheus scrape of `/metrics`.
//!
//! It is switched on by the standard `OTEL_*` environment variables ([`requested`]) and configured by them
//! ([`OtlpConfig::from_env`]): endpoint, headers, timeout, export interval, resource. Every instrument is
//! *observable*: its callback reads the latest [`Snapshot`] from the collector's watch channel at export
//! time, so this module keeps no per-instance state of its own and its memory is bounded by the snapshot
//! (itself bounded by the export cap), exactly like the Prometheus exporter in `export`. Series of an
//! instance that left the snapshot vanish at the next export, because the SDK forgets the attribute sets a
//! callback did not report.
//!
//! Names are the Prometheus names of DESIGN.md §4 without the `_total` suffix, with the same labels
//! (`service`, `instance_id`; never `instance`). The run-queue delay histogram is the exception:
//! OpenTelemetry has no asynchronous histogram, so it goes out as two monotonic counters,
//! `vigil_instance_runqueue_delay_seconds_sum` and `vigil_instance_runqueue_delay_seconds_count`.
//!
//! Transport is gRPC (tonic) only. The SDK's periodic reader exports from its own thread, but the gRPC
//! channel lives on the tokio runtime that was current when [`OtlpMetrics::start`] ran.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{AsyncInstrument, Meter, MeterProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{MetricExporter, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::metrics::{Instrument, PeriodicReader, SdkMeterProvider, Stream};
use vigil_common::Probe;
use vigil_otel::OTEL_EXPORTER_OTLP_TIMEOUT;
pub use vigil_otel::{
    DEFAULT_SERVICE_NAME, EnvError, blocking, env_lookup, env_millis, non_grpc_protocol, resource,
    signal_requested_in,
};

use crate::metrics::{
    COUNTS, FromCounters, GAUGES, Metric, NANOSECOND_TOTALS, PAGE_FAULTS, PAGE_FAULTS_HELP, PRESSURE,
    PRESSURE_HELP, RUNQUEUE_DELAY_HELP, SNAPSHOT_TOTALS, psi_totals, seconds_from_ns,
};
use crate::snapshot::{InstanceSnapshot, Snapshot, SnapshotReceiver};

const OTEL_METRICS_EXPORTER: &str = "OTEL_METRICS_EXPORTER";
const OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
const OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL";
const OTEL_EXPORTER_OTLP_METRICS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT";
const OTEL_METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";

/// The collector's default export cap (`collector.max_instances`); sizes the SDK's per-metric series
/// limit when the caller does not say otherwise.
pub const DEFAULT_MAX_INSTANCES: usize = 2000;

/// Longest [`OtlpMetrics::shutdown`] waits for the final export: the SDK's own, fixed bound.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("{var}={value:?}: Vigil exports OTLP metrics over gRPC only; set it to \"grpc\" or unset it")]
    UnsupportedProtocol { var: &'static str, value: String },
    #[error(transparent)]
    Env(#[from] vigil_otel::EnvError),
    #[error("OTLP export must start inside a tokio runtime: its gRPC channel runs on it")]
    NoRuntime,
    #[error("cannot build the OTLP metric exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP metrics did not shut down cleanly (waited at most {SHUTDOWN_TIMEOUT:?}): {0}")]
    Shutdown(#[source] OTelSdkError),
}

/// True when the standard environment variables ask for OTLP metrics (see [`requested_in`]).
pub fn requested() -> bool {
    requested_in(env_lookup)
}

/// True when the variables that `lookup` returns ask for OTLP metrics: `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set (non-empty), or `OTEL_METRICS_EXPORTER` names `otlp`;
/// never when `OTEL_SDK_DISABLED=true`, or when `OTEL_METRICS_EXPORTER` is set without naming `otlp`
/// (`none`, or only other exporters such as `prometheus`, which `/metrics` already serves).
pub fn requested_in(lookup: impl Fn(&str) -> Option<String>) -> bool {
    signal_requested_in(lookup, OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT)
}

/// How to export. `None` fields are left to the SDK, which then reads its own `OTEL_*` variables
/// (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`, then
/// `http://localhost:4317`; `OTEL_EXPORTER_OTLP_INSECURE`; headers; compression; temporality preference).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    /// gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: Option<String>,
    /// Time between exports (the SDK's default is 60 s).
    pub export_interval: Option<Duration>,
    /// Time one export may take (the SDK's default is 10 s).
    pub timeout: Option<Duration>,
    /// The collector's export cap: sizes the SDK's per-metric series limit so that a full snapshot is
    /// never folded into the SDK's own `otel.metric.overflow` series.
    pub max_instances: usize,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self { endpoint: None, export_interval: None, timeout: None, max_instances: DEFAULT_MAX_INSTANCES }
    }
}

impl OtlpConfig {
    /// The configuration the process environment asks for.
    pub fn from_env() -> Result<Self, OtlpError> {
        Self::from_lookup(env_lookup)
    }

    /// The configuration the variables that `lookup` returns ask for. Values the SDK would silently
    /// replace by its default (a malformed interval or timeout) are errors here, naming the value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, OtlpError> {
        if let Some((var, value)) = non_grpc_protocol(&lookup, OTEL_EXPORTER_OTLP_METRICS_PROTOCOL) {
            return Err(OtlpError::UnsupportedProtocol { var, value });
        }
        let millis = |var: &'static str| env_millis(&lookup, var);
        let export_interval = millis(OTEL_METRIC_EXPORT_INTERVAL)?;
        let timeout = match millis(OTEL_EXPORTER_OTLP_METRICS_TIMEOUT)? {
            Some(t) => Some(t),
            None => millis(OTEL_EXPORTER_OTLP_TIMEOUT)?,
        };
        Ok(Self { endpoint: None, export_interval, timeout, max_instances: DEFAULT_MAX_INSTANCES })
    }

    /// The same configuration for a collector whose export cap is `max_instances`.
    pub fn with_max_instances(mut self, max_instances: usize) -> Self {
        self.max_instances = max_instances;
        self
    }
}

/// Series one instance contributes to a metric: the SDK's per-metric limit must leave room for all of
/// them, or a full snapshot would be partly folded into an `otel.metric.overflow` series.
fn series_per_instance(metric: &str) -> usize {
    match metric {
        PAGE_FAULTS => 2,  // kind=minor|major
        PRESSURE => 3 * 2, // resource=cpu|memory|io × kind=some|full
        _ => 1,
    }
}

/// Ceiling of [`series_limit`]: the SDK allocates a map of that capacity up front for every metric, so an
/// absurd export cap must not turn into an absurd allocation (or a capacity overflow).
const MAX_SERIES_LIMIT: usize = 1 << 20;

/// The SDK's series limit for `metric`: every series of a full snapshot plus the overflow series, or
/// `None` for the metrics that are not per instance (they keep the SDK's default of 2000).
fn series_limit(metric: &str, max_instances: usize) -> Option<usize> {
    if !metric.starts_with("vigil_instance_") {
        return None;
    }
    Some(series_per_instance(metric).saturating_mul(max_instances.saturating_add(1)).min(MAX_SERIES_LIMIT))
}

/// A view that applies [`series_limit`] to every instrument.
fn cardinality_view(max_instances: usize) -> impl Fn(&Instrument) -> Option<Stream> + Send + Sync + 'static {
    move |instrument: &Instrument| {
        let limit = series_limit(instrument.name(), max_instances)?;
        Stream::builder().with_cardinality_limit(limit).build().ok()
    }
}

/// Exports the snapshot stream over OTLP/gRPC until [`shutdown`](Self::shutdown) (or drop, which shuts
/// down too, blocking up to [`SHUTDOWN_TIMEOUT`]).
#[derive(Debug)]
pub struct OtlpMetrics {
    provider: SdkMeterProvider,
}

impl OtlpMetrics {
    /// Starts exporting, configured by the standard `OTEL_*` variables. Must run inside a tokio runtime.
    pub fn start(snapshots: SnapshotReceiver) -> Result<OtlpMetrics, OtlpError> {
        Self::start_with(snapshots, OtlpConfig::from_env()?)
    }

    /// Starts exporting with an explicit configuration (what `config` leaves `None` the SDK still reads
    /// from the environment). Must run inside a tokio runtime.
    pub fn start_with(snapshots: SnapshotReceiver, config: OtlpConfig) -> Result<OtlpMetrics, OtlpError> {
        // tonic spawns the channel's worker on the current runtime and would panic without one.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(OtlpError::NoRuntime);
        }
        let mut exporter = MetricExporter::builder().with_tonic();
        if let Some(endpoint) = config.endpoint {
            exporter = exporter.with_endpoint(endpoint);
        }
        if let Some(timeout) = config.timeout {
            exporter = exporter.with_timeout(timeout);
        }
        let exporter = exporter.build()?;
        let mut reader = PeriodicReader::builder(exporter);
        if let Some(interval) = config.export_interval {
            reader = reader.with_interval(interval);
        }
        let provider = SdkMeterProvider::builder()
            .with_resource(resource(env_lookup))
            .with_view(cardinality_view(config.max_instances))
            .with_reader(reader.build())
            .build();
        let scope =
            InstrumentationScope::builder("vigil-collector").with_version(env!("CARGO_PKG_VERSION")).build();
        register_instruments(&provider.meter_with_scope(scope), &snapshots);
        Ok(OtlpMetrics { provider })
    }

    /// Exports one last time and shuts down, waiting at most [`SHUTDOWN_TIMEOUT`]. On a tokio
    /// current-thread runtime the final export cannot progress while this blocks (its channel needs that
    /// thread) and ends in the timeout: call it from `spawn_blocking` there.
    pub fn shutdown(self) -> Result<(), OtlpError> {
        blocking(|| self.provider.shutdown()).map_err(OtlpError::Shutdown)
    }
}

/// The latest snapshot. The Arc is cloned and the watch lock released at once, so an export never holds
/// up the collector's next send.
fn latest(snapshots: &SnapshotReceiver) -> Arc<Snapshot> {
    Arc::clone(&snapshots.borrow())
}

fn instance_attrs(i: &InstanceSnapshot) -> [KeyValue; 2] {
    [
        KeyValue::new("service", Arc::clone(&i.service)),
        KeyValue::new("instance_id", Arc::clone(&i.instance_id)),
    ]
}

/// Registers every instrument; the meter provider keeps the callbacks, so nothing is returned.
fn register_instruments(meter: &Meter, snapshots: &SnapshotReceiver) {
    let rx = snapshots.clone();
    meter
        .u64_observable_counter(PAGE_FAULTS)
        .with_description(PAGE_FAULTS_HELP)
        .with_unit("{fault}")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| {
            let snap = latest(&rx);
            for i in snap.exported() {
                let [service, id] = instance_attrs(i);
                for (kind, v) in [("minor", i.counters.minor_faults), ("major", i.counters.major_faults)] {
                    o.observe(v, &[service.clone(), id.clone(), KeyValue::new("kind", kind)]);
                }
            }
        })
        .build();

    // OpenTelemetry has no asynchronous histogram: the run-queue delay goes out as its `_sum` and `_count`.
    let runq_count: Metric<FromCounters> = Metric {
        name: "vigil_instance_runqueue_delay_seconds_count",
        help: RUNQUEUE_DELAY_HELP,
        unit: "{wait}",
        get: |c| c.runq_delays,
    };
    let runq_sum: Metric<FromCounters> = Metric {
        name: "vigil_instance_runqueue_delay_seconds_sum",
        help: RUNQUEUE_DELAY_HELP,
        unit: "s",
        get: |c| c.runq_delay_ns,
    };
    let counts = COUNTS.into_iter().chain(std::iter::once(runq_count));
    for Metric { name, help, unit, get } in counts {
        let rx = snapshots.clone();
        meter
            .u64_observable_counter(name)
            .with_description(help)
            .with_unit(unit)
            .with_callback(move |o: &dyn AsyncInstrument<u64>| {
                let snap = latest(&rx);
                for i in snap.exported() {
                    o.observe(get(&i.counters), &instance_attrs(i));
                }
            })
            .build();
    }

    let nanosecond_totals = NANOSECOND_TOTALS.into_iter().chain(std::iter::once(runq_sum));
    for Metric { name, help, unit, get } in nanosecond_totals {
        let rx = snapshots.clone();
        meter
            .f64_observable_counter(name)
            .with_description(help)
            .with_unit(unit)
            .with_callback(move |o: &dyn AsyncInstrument<f64>| {
                let snap = latest(&rx);
                for i in snap.exported() {
                    o.observe(seconds_from_ns(get(&i.counters)), &instance_attrs(i));
                }
            })
            .build();
    }

    for Metric { name, help, unit, get } in GAUGES {
        let rx = snapshots.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_unit(unit)
            .with_callback(move |o: &dyn AsyncInstrument<u64>| {
                let snap = latest(&rx);
                // Absent means the host does not offer it, which must not read as 0 bytes.
                for i in snap.exported() {
                    if let Some(v) = get(i) {
                        o.observe(v, &instance_attrs(i));
                    }
                }
            })
            .build();
    }

    let rx = snapshots.clone();
    meter
        .f64_observable_counter(PRESSURE)
        .with_description(PRESSURE_HELP)
        .with_unit("s")
        .with_callback(move |o: &dyn AsyncInstrument<f64>| {
            let snap = latest(&rx);
            // Instances only, like /metrics: stall times summed over unrelated cgroups mean nothing.
            for i in &snap.instances {
                let [service, id] = instance_attrs(i);
                let p = &i.pressure;
                for (resource, psi) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
                    for (kind, us) in psi_totals(psi) {
                        let attrs = [
                            service.clone(),
                            id.clone(),
                            KeyValue::new("resource", resource),
                            KeyValue::new("kind", kind),
                        ];
                        o.observe(us as f64 / 1e6, &attrs);
                    }
                }
            }
        })
        .build();

    let rx = snapshots.clone();
    meter
        .u64_observable_gauge("vigil_instances")
        .with_description("Instances exported one by one (the overflow series not included)")
        .with_unit("{instance}")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| {
            o.observe(latest(&rx).instances.len() as u64, &[]);
        })
        .build();

    for Metric { name, help, unit, get } in SNAPSHOT_TOTALS {
        let rx = snapshots.clone();
        meter
            .u64_observable_counter(name)
            .with_description(help)
            .with_unit(unit)
            .with_callback(move |o: &dyn AsyncInstrument<u64>| {
                o.observe(get(&latest(&rx)), &[]);
            })
            .build();
    }

    let rx = snapshots.clone();
    meter
        .u64_observable_counter("vigil_probe_errors")
        .with_description("Errors counted inside the kernel probes (map full, failed reads)")
        .with_unit("{error}")
        .with_callback(move |o: &dyn AsyncInstrument<u64>| {
            let snap = latest(&rx);
            for (probe, v) in Probe::ALL.iter().zip(snap.probe_errors.iter()) {
                o.observe(*v, &[KeyValue::new("probe", probe.name())]);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    use vigil_otel::{OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SDK_DISABLED};

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn requested_by_either_endpoint() {
        assert!(!requested_in(lookup(&[])));
        assert!(requested_in(lookup(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317")])));
        assert!(requested_in(lookup(&[(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, "http://c:4317")])));
        // Set but empty (or blank) is unset.
        assert!(!requested_in(lookup(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, ""),
            (OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, " ")
        ])));
        // Endpoints of other signals do not ask for metrics.
        assert!(!requested_in(lookup(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")])));
    }

    #[test]
    fn disabled_sdk_or_exporter_none_wins() {
        let endpoint = (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317");
        assert!(!requested_in(lookup(&[endpoint, (OTEL_SDK_DISABLED, "true")])));
        assert!(!requested_in(lookup(&[endpoint, (OTEL_SDK_DISABLED, "TRUE")])));
        assert!(requested_in(lookup(&[endpoint, (OTEL_SDK_DISABLED, "false")])));
        assert!(!requested_in(lookup(&[endpoint, (OTEL_METRICS_EXPORTER, "none")])));
        assert!(!requested_in(lookup(&[endpoint, (OTEL_METRICS_EXPORTER, "otlp, none")])));
        assert!(!requested_in(lookup(&[endpoint, (OTEL_METRICS_EXPORTER, "prometheus")])));
        assert!(requested_in(lookup(&[endpoint, (OTEL_METRICS_EXPORTER, "prometheus,otlp")])));
        // Naming otlp explicitly asks for it even at the default endpoint.
        assert!(requested_in(lookup(&[(OTEL_METRICS_EXPORTER, "otlp")])));
        assert!(requested_in(lookup(&[endpoint, (OTEL_METRICS_EXPORTER, "")])));
    }

    #[test]
    fn config_reads_interval_and_timeout() {
        let c = OtlpConfig::from_lookup(lookup(&[])).expect("empty env");
        assert_eq!(c, OtlpConfig::default());
        let c = OtlpConfig::from_lookup(lookup(&[
            (OTEL_METRIC_EXPORT_INTERVAL, "250"),
            (OTEL_EXPORTER_OTLP_TIMEOUT, "3000"),
            (OTEL_EXPORTER_OTLP_METRICS_TIMEOUT, "1500"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
        ]))
        .expect("valid env");
        assert_eq!(c.export_interval, Some(Duration::from_millis(250)));
        assert_eq!(c.timeout, Some(Duration::from_millis(1500)), "the metrics variable wins");
        assert_eq!(c.endpoint, None, "left to the SDK");
        let c = OtlpConfig::from_lookup(lookup(&[(OTEL_EXPORTER_OTLP_TIMEOUT, "3000")])).expect("valid env");
        assert_eq!(c.timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn config_rejects_bad_values_naming_them() {
        for (var, value) in [(OTEL_METRIC_EXPORT_INTERVAL, "1s"), (OTEL_EXPORTER_OTLP_TIMEOUT, "0")] {
            let err = OtlpConfig::from_lookup(lookup(&[(var, value)])).expect_err(value);
            let text = err.to_string();
            assert!(text.contains(var) && text.contains(value), "{text}");
        }
        let err = OtlpConfig::from_lookup(lookup(&[(OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf")]))
            .expect_err("http is not built in");
        assert!(err.to_string().contains("http/protobuf"), "{err}");
        // The metrics-specific protocol overrides the generic one, in both directions.
        assert!(
            OtlpConfig::from_lookup(lookup(&[
                (OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf"),
                (OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, "grpc"),
            ]))
            .is_ok()
        );
        assert!(
            OtlpConfig::from_lookup(lookup(&[
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
                (OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, "http/json"),
            ]))
            .is_err()
        );
    }

    #[test]
    fn series_limit_covers_a_full_snapshot() {
        assert_eq!(series_limit(PAGE_FAULTS, 2000), Some(4002));
        assert_eq!(series_limit(PRESSURE, 2000), Some(12_006));
        assert_eq!(series_limit("vigil_instance_cpu_seconds", 2000), Some(2001));
        assert_eq!(series_limit("vigil_probe_errors", 2000), None);
        // Extreme caps must not produce a limit the SDK rejects.
        assert_eq!(series_limit(PAGE_FAULTS, usize::MAX), Some(MAX_SERIES_LIMIT));
        assert!(Stream::builder().with_cardinality_limit(MAX_SERIES_LIMIT).build().is_ok());
    }

    #[test]
    fn start_outside_a_runtime_is_an_error_not_a_panic() {
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::empty()));
        let err = OtlpMetrics::start_with(rx, OtlpConfig::default()).expect_err("no runtime");
        assert!(matches!(err, OtlpError::NoRuntime), "{err}");
    }
}
