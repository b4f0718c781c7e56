//! The healer's Prometheus metrics (DESIGN.md §4): `vigil_decisions_total{rule,action,outcome}`,
//! `vigil_action_duration_seconds{action}` and `vigil_instance_state{service,instance_id,state}` for the
//! managed instances. They are appended to the collector's `/metrics`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{Decision, Outcome};
use crate::rules::InstanceState;

type Labels = Vec<(&'static str, String)>;

fn action_histogram() -> Histogram {
    // 10 ms … ~80 s: a CPU-only hibernate takes milliseconds, paging out GiBs takes seconds.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// Counters the engine feeds with every decision.
#[derive(Clone)]
pub struct EngineMetrics {
    decisions: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            decisions: Family::default(),
            durations: Family::new_with_constructor(action_histogram as fn() -> Histogram),
        }
    }
}

impl EngineMetrics {
    pub fn record(&self, d: &Decision) {
        let (outcome, seconds) = match &d.outcome {
            Outcome::DryRun => ("dry_run", None),
            Outcome::Refused { .. } => ("refused", None),
            Outcome::Succeeded { seconds } => ("succeeded", Some(*seconds)),
            Outcome::Failed { seconds, .. } => ("failed", Some(*seconds)),
        };
        self.decisions
            .get_or_create(&vec![
                ("rule", d.rule.clone()),
                ("action", d.action.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if let Some(s) = seconds {
            self.durations.get_or_create(&vec![("action", d.action.to_string())]).observe(s);
        }
    }
}

/// What hibernations released and wakes brought back, fed by the standby executor.
#[derive(Clone, Default)]
pub struct StandbyMetrics {
    pub released_bytes: Counter,
    pub prefetched_bytes: Counter,
    pub prefetch_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

/// The lifecycle state of managed instances, read from their owner at scrape time.
pub trait StateSource: Send + Sync + 'static {
    /// `(service, instance_id, state)` of every managed instance.
    fn states(&self) -> Vec<(String, String, InstanceState)>;
}

struct States(Arc<dyn StateSource>);

impl std::fmt::Debug for States {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("States")
    }
}

impl Collector for States {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "vigil_instance_state",
            "Lifecycle state of a managed instance (1 for the current state)",
            None,
            MetricType::Gauge,
        )?;
        for (service, id, current) in self.0.states() {
            for state in InstanceState::ALL {
                let labels =
                    [("service", service.as_str()), ("instance_id", id.as_str()), ("state", state.as_str())];
                m.encode_family(&labels)?.encode_gauge(&i64::from(state == current))?;
            }
        }
        Ok(())
    }
}

/// A registry with the engine's and the standby's metrics and the instance states.
pub fn registry(engine: &EngineMetrics, standby: &StandbyMetrics, states: Arc<dyn StateSource>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "vigil_standby_released_bytes",
        "Memory given back by hibernations (memory cgroup usage before minus after)",
        standby.released_bytes.clone(),
    );
    r.register(
        "vigil_standby_prefetched_bytes",
        "Working-set bytes prefetched by wakes",
        standby.prefetched_bytes.clone(),
    );
    r.register(
        "vigil_standby_prefetch_seconds",
        "Time wakes spent issuing prefetches (rate(bytes) / rate(seconds) is the prefetch throughput)",
        standby.prefetch_seconds.clone(),
    );
    r.register("vigil_decisions", "Decisions by rule, action and outcome", engine.decisions.clone());
    r.register(
        "vigil_action_duration_seconds",
        "Time executors took to carry out an action",
        engine.durations.clone(),
    );
    r.register_collector(Box::new(States(states)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl StateSource for Fixed {
        fn states(&self) -> Vec<(String, String, InstanceState)> {
            vec![("echo".into(), "echo-0".into(), InstanceState::Hibernated)]
        }
    }

    #[test]
    fn renders_decisions_durations_and_states() {
        let m = EngineMetrics::default();
        m.record(&Decision {
            unix_ms: 0,
            rule: "idle".into(),
            action: "hibernate",
            service: "echo".into(),
            instance_id: "echo-0".into(),
            held_seconds: 30.0,
            inputs: None,
            outcome: Outcome::Succeeded { seconds: 0.25 },
        });
        let mut text = String::new();
        let standby = StandbyMetrics::default();
        standby.released_bytes.inc_by(1000);
        prometheus_client::encoding::text::encode(&mut text, &registry(&m, &standby, Arc::new(Fixed)))
            .unwrap();
        for line in [
            "vigil_decisions_total{rule=\"idle\",action=\"hibernate\",outcome=\"succeeded\"} 1",
            "vigil_action_duration_seconds_count{action=\"hibernate\"} 1",
            "vigil_instance_state{service=\"echo\",instance_id=\"echo-0\",state=\"hibernated\"} 1",
            "vigil_instance_state{service=\"echo\",instance_id=\"echo-0\",state=\"active\"} 0",
            "vigil_standby_released_bytes_total 1000",
            "vigil_standby_prefetch_seconds_total 0.0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }
}
