//! The hardware metrics, appended to `/metrics`: `vigil_hardware_errors_total{device,kind,severity}`
//! (incremented by each event's delta), `vigil_hardware_device_health{device,state}` (1 for the current
//! state, read from the health tracker at scrape time), `vigil_hardware_io_latency_seconds{device}`,
//! `vigil_hardware_kmsg_records_total`, `vigil_hardware_kmsg_lost_total`,
//! `vigil_hardware_source_errors_total{source}` and `vigil_hardware_events_dropped_total`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::event::HardwareEvent;
use crate::health::State;

type Labels = Vec<(&'static str, String)>;

/// The counters and gauges the sources feed.
#[derive(Clone, Default)]
pub struct HardwareMetrics {
    errors: Family<Labels, Counter>,
    io_latency: Family<Labels, Gauge<f64, AtomicU64>>,
    pub kmsg_records: Counter,
    pub kmsg_lost: Counter,
    source_errors: Family<Labels, Counter>,
    pub dropped: Counter,
}

impl HardwareMetrics {
    pub fn event(&self, e: &HardwareEvent) {
        self.errors
            .get_or_create(&vec![
                ("device", e.device.clone()),
                ("kind", e.kind.to_string()),
                ("severity", e.severity.to_string()),
            ])
            .inc_by(e.delta);
    }

    pub fn io_latency(&self, device: &str, seconds: f64) {
        self.io_latency.get_or_create(&vec![("device", device.to_string())]).set(seconds);
    }

    pub fn source_error(&self, source: &str, n: u64) {
        self.source_errors.get_or_create(&vec![("source", source.to_string())]).inc_by(n);
    }
}

/// Where the health gauge reads the devices' states at scrape time.
pub trait DeviceStates: Send + Sync + 'static {
    fn states(&self) -> Vec<(String, State)>;
}

struct Health(Arc<dyn DeviceStates>);

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Health")
    }
}

impl Collector for Health {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "vigil_hardware_device_health",
            "Health of a hardware device (1 for the current state)",
            None,
            MetricType::Gauge,
        )?;
        for (device, current) in self.0.states() {
            for state in State::ALL {
                let labels = [("device", device.as_str()), ("state", state.as_str())];
                m.encode_family(&labels)?.encode_gauge(&i64::from(state == current))?;
            }
        }
        Ok(())
    }
}

/// A registry with every hardware metric.
pub fn registry(m: &HardwareMetrics, states: Arc<dyn DeviceStates>) -> Registry {
    let mut r = Registry::default();
    r.register("vigil_hardware_errors", "Hardware errors by device, kind and severity", m.errors.clone());
    r.register(
        "vigil_hardware_io_latency_seconds",
        "Mean time per completed block I/O over the last poll interval (0 without I/O)",
        m.io_latency.clone(),
    );
    r.register("vigil_hardware_kmsg_records", "Kernel log records read", m.kmsg_records.clone());
    r.register(
        "vigil_hardware_kmsg_lost",
        "Kernel log records overwritten before Vigil read them",
        m.kmsg_lost.clone(),
    );
    r.register(
        "vigil_hardware_source_errors",
        "Failures to read or parse a hardware source, by source",
        m.source_errors.clone(),
    );
    r.register(
        "vigil_hardware_events_dropped",
        "Events about devices beyond hardware.max_devices, not tracked",
        m.dropped.clone(),
    );
    r.register_collector(Box::new(Health(states)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Severity, Source};

    struct Fixed;
    impl DeviceStates for Fixed {
        fn states(&self) -> Vec<(String, State)> {
            vec![("sda".into(), State::Degraded)]
        }
    }

    #[test]
    fn renders_every_metric() {
        let m = HardwareMetrics::default();
        m.event(&HardwareEvent {
            device: "sda".into(),
            kind: Kind::io_error(),
            severity: Severity::Error,
            source: Source::Kmsg,
            counter: "kmsg:block-io-error".into(),
            delta: 3,
            message: String::new(),
            at_unix_ms: 0,
            kmsg: None,
        });
        m.io_latency("sda", 0.005);
        m.kmsg_records.inc_by(7);
        m.kmsg_lost.inc();
        m.source_error("sysfs", 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry(&m, Arc::new(Fixed))).unwrap();
        for line in [
            "vigil_hardware_errors_total{device=\"sda\",kind=\"io_error\",severity=\"error\"} 3",
            "vigil_hardware_device_health{device=\"sda\",state=\"degraded\"} 1",
            "vigil_hardware_device_health{device=\"sda\",state=\"healthy\"} 0",
            "vigil_hardware_io_latency_seconds{device=\"sda\"} 0.005",
            "vigil_hardware_kmsg_records_total 7",
            "vigil_hardware_kmsg_lost_total 1",
            "vigil_hardware_source_errors_total{source=\"sysfs\"} 2",
            "vigil_hardware_events_dropped_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }
}
