//! Running a rule file's own test cases: each case drives a fresh [`Evaluator`] through synthetic snapshots
//! and compares the proposals with the expected ones, exactly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vigil_core::snapshot::{InstanceKind, InstanceSnapshot, Snapshot};

use super::{Evaluator, ExpectedAction, Metric, RuleSet, Signals, TestCase, TestValues};

/// The result of one test case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    pub file: String,
    pub name: String,
    /// `None` when it passed; otherwise what differed.
    pub failure: Option<String>,
}

impl TestOutcome {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Runs every test case of `set`.
pub fn run_tests(set: &RuleSet) -> Vec<TestOutcome> {
    set.tests
        .iter()
        .map(|t| TestOutcome { file: set.file.clone(), name: t.name.clone(), failure: run_case(set, t) })
        .collect()
}

fn instance(id: &Arc<str>, values: &TestValues) -> InstanceSnapshot {
    let service = values.service.clone().unwrap_or_else(|| Arc::from(""));
    let mut inst = InstanceSnapshot {
        cgroup: Arc::from(format!("/vigil/{service}/{id}")),
        service,
        instance_id: id.clone(),
        kind: InstanceKind::Managed,
        cgroup_id: None,
        memcg_id: None,
        counters: Default::default(),
        rates: Default::default(),
        memory: Default::default(),
        pressure: Default::default(),
    };
    let psi = |v: f64| {
        let mut p = vigil_core::snapshot::Psi::default();
        p.some.avg10 = v;
        Some(p)
    };
    for &(metric, v) in &values.metrics {
        match metric {
            Metric::CpuCores => inst.rates.cpu_cores = v,
            Metric::MinorFaultsPerS => inst.rates.minor_faults = v,
            Metric::MajorFaultsPerS => inst.rates.major_faults = v,
            Metric::SwapInPagesPerS => inst.rates.swap_in_pages = v,
            Metric::SwapOutPagesPerS => inst.rates.swap_out_pages = v,
            Metric::RunqueueDelayMeanSeconds => inst.rates.runq_delay_mean_seconds = v,
            Metric::MemoryResidentBytes => inst.memory.resident_bytes = Some(v.max(0.0) as u64),
            Metric::MemorySwapBytes => inst.memory.swap_bytes = Some(v.max(0.0) as u64),
            Metric::CpuPressureAvg10 => inst.pressure.cpu = psi(v),
            Metric::MemoryPressureAvg10 => inst.pressure.memory = psi(v),
            Metric::IoPressureAvg10 => inst.pressure.io = psi(v),
            Metric::Signal(_) => {}
        }
    }
    inst
}

fn merge(into: &mut TestValues, from: &TestValues) {
    if from.service.is_some() {
        into.service = from.service.clone();
    }
    if from.state.is_some() {
        into.state = from.state;
    }
    for &(m, v) in &from.metrics {
        match into.metrics.iter_mut().find(|(k, _)| *k == m) {
            Some(slot) => slot.1 = v,
            None => into.metrics.push((m, v)),
        }
    }
}

fn show(a: &ExpectedAction) -> String {
    format!("{:?} {} {} {}", a.at, a.rule, a.instance_id, a.action.as_str())
}

fn run_case(set: &RuleSet, case: &TestCase) -> Option<String> {
    let mut evaluator = Evaluator::new(set.rules.clone());
    let mut live: BTreeMap<Arc<str>, TestValues> = BTreeMap::new();
    let mut steps = case.steps.iter().peekable();
    let mut got = Vec::new();
    let mut tick = 0u64;
    let mut at = Duration::ZERO;
    let mut alerts = Arc::new(Vec::new());
    while at <= case.until {
        while let Some(step) = steps.next_if(|s| s.at <= at) {
            if let Some(list) = &step.alerts {
                alerts = Arc::new(list.iter().map(crate::alerts::AlertFact::from_labels).collect());
            }
            for (id, values) in &step.set {
                merge(live.entry(id.clone()).or_default(), values);
            }
            for id in &step.remove {
                live.remove(id);
            }
        }
        let mut snapshot = Snapshot::empty();
        tick += 1;
        snapshot.tick = tick;
        snapshot.elapsed = case.every;
        let mut signals = Signals::new();
        signals.set_alerts(alerts.clone());
        for (id, values) in &live {
            snapshot.instances.push(instance(id, values));
            if let Some(state) = values.state {
                signals.set_state(id, state);
            }
            for &(metric, v) in &values.metrics {
                if let Metric::Signal(s) = metric {
                    signals.set(id, s, v);
                }
            }
        }
        snapshot.instances.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
        for p in evaluator.observe(at, &snapshot, &signals) {
            got.push(ExpectedAction { at: p.at, rule: p.rule, instance_id: p.instance_id, action: p.action });
        }
        at += case.every;
    }
    let mut want = case.expect.clone();
    want.sort();
    got.sort();
    if want == got {
        return None;
    }
    let missing: Vec<String> = want.iter().filter(|w| !got.contains(w)).map(show).collect();
    let unexpected: Vec<String> = got.iter().filter(|g| !want.contains(g)).map(show).collect();
    let mut out = Vec::new();
    if !missing.is_empty() {
        out.push(format!("expected but not proposed: {}", missing.join("; ")));
    }
    if !unexpected.is_empty() {
        out.push(format!("proposed but not expected: {}", unexpected.join("; ")));
    }
    if out.is_empty() {
        out.push("the same actions were proposed a different number of times".into());
    }
    Some(out.join("\n"))
}
