//! Prometheus text exposition of the latest [`Snapshot`]. The registry holds one custom collector that
//! encodes straight from the snapshot at scrape time, so there is no second copy of per-instance state and
//! memory is bounded by the snapshot (itself bounded by the export cap).

use std::sync::Arc;

use prometheus_client::collector::Collector as PromCollector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vigil_common::{Probe, RUNQ_BUCKETS};

use crate::metrics::{
    COUNTS, GAUGES, Metric, NANOSECOND_TOTALS, PAGE_FAULTS, PAGE_FAULTS_HELP, PRESSURE, PRESSURE_HELP,
    RUNQUEUE_DELAY, RUNQUEUE_DELAY_HELP, SNAPSHOT_TOTALS, psi_totals, seconds_from_ns,
};
use crate::snapshot::{InstanceSnapshot, Snapshot, SnapshotReceiver};

/// Histogram bounds of `vigil_instance_runqueue_delay_seconds`: the probe's log2 buckets from 1 µs up
/// (bucket `i` holds delays below 2^(i+1) ns; finer buckets are folded into the first bound).
const FIRST_EXPORTED_BUCKET: usize = 9; // 2^10 ns ≈ 1 µs

/// `(upper bound, count in that bucket)` pairs from the probe's log2 histogram, ending with +Inf; the
/// encoder accumulates them into Prometheus's cumulative `le` buckets.
pub fn runq_buckets(hist: &[u64; RUNQ_BUCKETS]) -> Vec<(f64, u64)> {
    let upper = |i: usize| (1u64 << (i + 1)) as f64 / 1e9;
    let mut out = Vec::with_capacity(RUNQ_BUCKETS - FIRST_EXPORTED_BUCKET + 1);
    out.push((upper(FIRST_EXPORTED_BUCKET), hist[..=FIRST_EXPORTED_BUCKET].iter().sum()));
    for (i, n) in hist.iter().enumerate().take(RUNQ_BUCKETS - 1).skip(FIRST_EXPORTED_BUCKET + 1) {
        out.push((upper(i), *n));
    }
    // The last probe bucket is open-ended.
    out.push((f64::INFINITY, hist[RUNQ_BUCKETS - 1]));
    out
}

#[derive(Debug)]
struct SnapshotCollector {
    snapshots: SnapshotReceiver,
}

fn labels(i: &InstanceSnapshot) -> [(&'static str, &str); 2] {
    [("service", &*i.service), ("instance_id", &*i.instance_id)]
}

impl PromCollector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap: Arc<Snapshot> = self.snapshots.borrow().clone();
        let all: Vec<&InstanceSnapshot> = snap.exported().collect();

        let mut m = enc.encode_descriptor(PAGE_FAULTS, PAGE_FAULTS_HELP, None, MetricType::Counter)?;
        for i in &all {
            let [s, id] = labels(i);
            for (kind, v) in [("minor", i.counters.minor_faults), ("major", i.counters.major_faults)] {
                m.encode_family(&[s, id, ("kind", kind)])?.encode_counter::<NoLabelSet, _, f64>(&v, None)?;
            }
        }
        for Metric { name, help, get, .. } in COUNTS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for i in &all {
                m.encode_family(&labels(i))?.encode_counter::<NoLabelSet, _, f64>(&get(&i.counters), None)?;
            }
        }
        for Metric { name, help, get, .. } in NANOSECOND_TOTALS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for i in &all {
                m.encode_family(&labels(i))?
                    .encode_counter::<NoLabelSet, _, f64>(&seconds_from_ns(get(&i.counters)), None)?;
            }
        }

        let mut m =
            enc.encode_descriptor(RUNQUEUE_DELAY, RUNQUEUE_DELAY_HELP, None, MetricType::Histogram)?;
        for i in &all {
            let c = &i.counters;
            m.encode_family(&labels(i))?.encode_histogram::<NoLabelSet>(
                seconds_from_ns(c.runq_delay_ns),
                c.runq_delays,
                &runq_buckets(&c.runq_hist),
                None,
            )?;
        }

        for Metric { name, help, get, .. } in GAUGES {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for i in &all {
                if let Some(v) = get(i) {
                    m.encode_family(&labels(i))?.encode_gauge(&(v as i64))?;
                }
            }
        }

        let mut m = enc.encode_descriptor(PRESSURE, PRESSURE_HELP, None, MetricType::Counter)?;
        for i in &snap.instances {
            let [s, id] = labels(i);
            for (resource, psi) in
                [("cpu", &i.pressure.cpu), ("memory", &i.pressure.memory), ("io", &i.pressure.io)]
            {
                for (kind, us) in psi_totals(psi) {
                    m.encode_family(&[s, id, ("resource", resource), ("kind", kind)])?
                        .encode_counter::<NoLabelSet, _, f64>(&(us as f64 / 1e6), None)?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "vigil_instances",
            "Instances exported one by one (the overflow series not included)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(snap.instances.len() as i64))?;
        for Metric { name, help, get, .. } in SNAPSHOT_TOTALS {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, f64>(&get(&snap), None)?;
        }
        let mut m = enc.encode_descriptor(
            "vigil_probe_errors",
            "Errors counted inside the kernel probes (map full, failed reads)",
            None,
            MetricType::Counter,
        )?;
        for (p, v) in Probe::ALL.iter().zip(snap.probe_errors.iter()) {
            m.encode_family(&[("probe", p.name())])?.encode_counter::<NoLabelSet, _, f64>(v, None)?;
        }
        Ok(())
    }
}

/// A registry exposing the snapshot stream.
pub fn registry(snapshots: SnapshotReceiver) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector { snapshots }));
    registry
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(64 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Converts OpenMetrics text to the classic Prometheus text format (0.0.4), for scrapers and tools that ask
/// for it (`promtool check metrics`, older agents): counter families are named with their `_total` suffix,
/// and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
pub fn openmetrics_to_classic(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut counter_help: Option<&str> = None;
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held back until the TYPE line says whether the family is a counter.
            if let Some(prev) = counter_help.replace(rest) {
                out.push_str("# HELP ");
                out.push_str(prev);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(help) = counter_help.take() {
                let (hname, htext) = help.split_once(' ').unwrap_or((help, ""));
                out.push_str(&format!("# HELP {hname}{suffix} {htext}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Counters, InstanceKind, Memory, Pressure, Psi, PsiLine, Rates};

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::empty();
        let mut c = Counters {
            minor_faults: 7,
            major_faults: 2,
            cpu_ns: 1_500_000_000,
            runq_delays: 3,
            ..Default::default()
        };
        c.runq_delay_ns = 6_000;
        c.runq_hist[3] = 1; // 8..16 ns
        c.runq_hist[11] = 2; // 2048..4096 ns
        s.tick = 4;
        s.instances.push(InstanceSnapshot {
            service: "echo".into(),
            instance_id: "echo-0".into(),
            kind: InstanceKind::Managed,
            cgroup: "/vigil/echo/echo-0".into(),
            cgroup_id: Some(1),
            memcg_id: Some(2),
            counters: c,
            rates: Rates::default(),
            memory: Memory { resident_bytes: Some(4096), swap_bytes: None },
            pressure: Pressure {
                cpu: Some(Psi { some: PsiLine { total_us: 2_000_000, ..Default::default() }, full: None }),
                ..Default::default()
            },
        });
        s
    }

    #[test]
    fn renders_names_and_values() {
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(snapshot()));
        let text = render(&registry(rx));
        for line in [
            "vigil_instance_page_faults_total{service=\"echo\",instance_id=\"echo-0\",kind=\"minor\"} 7",
            "vigil_instance_page_faults_total{service=\"echo\",instance_id=\"echo-0\",kind=\"major\"} 2",
            "vigil_instance_cpu_seconds_total{service=\"echo\",instance_id=\"echo-0\"} 1.5",
            "vigil_instance_memory_resident_bytes{service=\"echo\",instance_id=\"echo-0\"} 4096",
            "vigil_instance_runqueue_delay_seconds_count{service=\"echo\",instance_id=\"echo-0\"} 3",
            "vigil_instance_runqueue_delay_seconds_bucket{le=\"0.000001024\",service=\"echo\",instance_id=\"echo-0\"} 1",
            "vigil_instance_runqueue_delay_seconds_bucket{le=\"0.000004096\",service=\"echo\",instance_id=\"echo-0\"} 3",
            "vigil_instance_runqueue_delay_seconds_bucket{le=\"+Inf\",service=\"echo\",instance_id=\"echo-0\"} 3",
            "vigil_instance_pressure_seconds_total{service=\"echo\",instance_id=\"echo-0\",resource=\"cpu\",kind=\"some\"} 2.0",
            "vigil_instances 1",
            "vigil_instances_dropped_total 0",
            "vigil_probe_errors_total{probe=\"sched_switch\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(!text.contains("vigil_instance_memory_swap_bytes{"), "absent swap is not reported as 0");
    }

    #[test]
    fn classic_text_names_counters_with_total() {
        let om = "# HELP a_b Some help.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\n# UNIT g bytes\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_classic(om),
            "# HELP a_b_total Some help.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn buckets_fold_small_delays_and_end_at_infinity() {
        let mut h = [0u64; RUNQ_BUCKETS];
        h[0] = 5;
        h[9] = 1;
        h[20] = 1;
        h[31] = 4;
        let b = runq_buckets(&h);
        assert_eq!(
            b.first(),
            Some(&(1024.0 / 1e9, 6)),
            "everything below 1.024 µs lands in the first bucket"
        );
        assert_eq!(b.last(), Some(&(f64::INFINITY, 4)));
        assert!(b.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(
            b.iter().map(|x| x.1).sum::<u64>(),
            h.iter().sum::<u64>(),
            "no delay lost or counted twice"
        );
        assert_eq!(b.iter().find(|x| x.0 == (1u64 << 21) as f64 / 1e9).map(|x| x.1), Some(1));
    }
}
