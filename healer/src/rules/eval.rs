//! The evaluator: tracks, per rule and instance, since when the rule's conditions have held, and proposes
//! actions under each rule's cooldown and max fraction. Time is injected, so it runs on recorded data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use vigil_core::snapshot::{InstanceSnapshot, Psi, Snapshot};

use super::{Action, Condition, InstanceState, Metric, Rule, RuleNotify, Signal};
use crate::alerts::AlertFact;

/// What is fed per instance alongside the snapshot: its state, and the broker's signals.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct InstanceSignals {
    pub state: Option<InstanceState>,
    values: [Option<f64>; Signal::COUNT],
}

impl InstanceSignals {
    pub fn get(&self, signal: Signal) -> Option<f64> {
        self.values[signal.index()]
    }
    pub fn set(&mut self, signal: Signal, value: f64) {
        self.values[signal.index()] = Some(value);
    }
}

/// Per-instance inputs beside the snapshot, keyed by `instance_id`. Entries for instances that are not in
/// the snapshot are ignored.
#[derive(Clone, Debug, Default)]
pub struct Signals {
    instances: HashMap<Arc<str>, InstanceSignals>,
    /// Incoming alerts firing now, host-wide; each condition checks which are about the instance.
    alerts: Arc<Vec<AlertFact>>,
}

impl Signals {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&mut self, instance_id: &str, signal: Signal, value: f64) {
        self.entry(instance_id).set(signal, value);
    }
    pub fn set_state(&mut self, instance_id: &str, state: InstanceState) {
        self.entry(instance_id).state = Some(state);
    }
    pub fn get(&self, instance_id: &str) -> Option<&InstanceSignals> {
        self.instances.get(instance_id)
    }
    /// The incoming alerts firing now.
    pub fn set_alerts(&mut self, alerts: Arc<Vec<AlertFact>>) {
        self.alerts = alerts;
    }
    pub fn alerts(&self) -> &[AlertFact] {
        &self.alerts
    }
    fn entry(&mut self, instance_id: &str) -> &mut InstanceSignals {
        if !self.instances.contains_key(instance_id) {
            self.instances.insert(Arc::from(instance_id), InstanceSignals::default());
        }
        self.instances.get_mut(instance_id).expect("inserted above")
    }
}

/// An action a rule proposes; it still has to pass the safety gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposedAction {
    pub rule: Arc<str>,
    pub action: Action,
    pub service: Arc<str>,
    pub instance_id: Arc<str>,
    /// The time of the tick that proposed it.
    pub at: Duration,
    /// How long the conditions had held.
    pub held_for: Duration,
    /// What led to it beyond the rule's conditions (the autoscaler's observed concurrency, desired count
    /// and mode), kept in the audit log with the decision.
    pub inputs: Option<Arc<serde_json::Value>>,
    /// Who hears of the decision (the rule's receivers and labels; none for the API's and the broker's).
    pub notify: Arc<RuleNotify>,
    /// The workflow an `action: workflow` starts.
    pub workflow: Option<Arc<str>>,
}

/// A `notify` rule's alert whose conditions stopped holding (or whose instance vanished): it resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub rule: Arc<str>,
    pub service: Arc<str>,
    pub instance_id: Arc<str>,
    pub notify: Arc<RuleNotify>,
}

/// An action a rule proposed recently: counts for its cooldown and for its service's fraction.
#[derive(Clone, Debug)]
struct Recent {
    at: Duration,
    service: Arc<str>,
    instance_id: Arc<str>,
}

#[derive(Debug, Default)]
struct RuleState {
    /// Instance id -> the tick from which the conditions have held without a break (or the last proposal).
    holding: HashMap<Arc<str>, Duration>,
    /// Proposals within the rule's cooldown.
    recent: Vec<Recent>,
    /// For a `notify` rule: instance id -> the alert firing for it (proposed, conditions still holding).
    firing: HashMap<Arc<str>, Firing>,
}

/// A `notify` alert that is out.
#[derive(Debug)]
struct Firing {
    service: Arc<str>,
    /// For one carried over from before this evaluator (a restart): ticks it has not been seen in yet. It
    /// ends only once seen not holding, or after [`UNSEEN_TICKS`], so an instance that is still coming up
    /// after a restart does not resolve (and then fire again). `None` once seen.
    unseen: Option<u32>,
}

/// Ticks a carried-over alert waits to see its instance before it resolves.
const UNSEEN_TICKS: u32 = 30;

/// Evaluates rules over a stream of snapshots. Memory is bounded by the live instances and the proposals
/// within each rule's cooldown.
#[derive(Debug)]
pub struct Evaluator {
    rules: Vec<Rule>,
    states: Vec<RuleState>,
    /// Alerts that resolved since the last [`Evaluator::take_ended`].
    ended: Vec<Ended>,
}

fn psi_avg10(p: Option<Psi>) -> Option<f64> {
    p.map(|p| p.some.avg10)
}

/// The value of `metric` for this instance, if known.
pub(super) fn value(
    metric: Metric,
    inst: &InstanceSnapshot,
    signals: Option<&InstanceSignals>,
) -> Option<f64> {
    let r = &inst.rates;
    match metric {
        Metric::CpuCores => Some(r.cpu_cores),
        Metric::MinorFaultsPerS => Some(r.minor_faults),
        Metric::MajorFaultsPerS => Some(r.major_faults),
        Metric::SwapInPagesPerS => Some(r.swap_in_pages),
        Metric::SwapOutPagesPerS => Some(r.swap_out_pages),
        Metric::RunqueueDelayMeanSeconds => Some(r.runq_delay_mean_seconds),
        Metric::MemoryResidentBytes => inst.memory.resident_bytes.map(|b| b as f64),
        Metric::MemorySwapBytes => inst.memory.swap_bytes.map(|b| b as f64),
        Metric::CpuPressureAvg10 => psi_avg10(inst.pressure.cpu),
        Metric::MemoryPressureAvg10 => psi_avg10(inst.pressure.memory),
        Metric::IoPressureAvg10 => psi_avg10(inst.pressure.io),
        Metric::Signal(s) => signals.and_then(|v| v.get(s)),
    }
}

fn holds(
    rule: &Rule,
    inst: &InstanceSnapshot,
    signals: Option<&InstanceSignals>,
    alerts: &[AlertFact],
) -> bool {
    rule.when.iter().all(|c| match c {
        Condition::Metric { metric, bounds } => {
            value(*metric, inst, signals).is_some_and(|v| bounds.holds(v))
        }
        Condition::State(states) => signals.and_then(|s| s.state).is_some_and(|s| states.contains(&s)),
        Condition::Alert(want) => alerts.iter().any(|a| want.matches(a, &inst.service, &inst.instance_id)),
    })
}

/// ⌈fraction × n⌉ with a little slack for binary fractions (0.3 × 10 is 3.0000000000000004), at least 1.
fn budget(max_fraction: Option<f64>, instances: usize) -> usize {
    match max_fraction {
        None => usize::MAX,
        Some(f) => ((f * instances as f64 - 1e-9).ceil() as usize).max(1),
    }
}

impl Evaluator {
    pub fn new(rules: Vec<Rule>) -> Self {
        let states = rules.iter().map(|_| RuleState::default()).collect();
        Self { rules, states, ended: Vec::new() }
    }

    /// Marks `notify` alerts as firing that fired before this evaluator existed (a restart, a reload of the
    /// rules): they resolve when their conditions are next seen not to hold. Returns those whose rule is
    /// gone or no longer notifies: they have ended already.
    pub fn seed_firing(&mut self, firing: impl IntoIterator<Item = Ended>) -> Vec<Ended> {
        let mut gone = Vec::new();
        for f in firing {
            match self.rules.iter().position(|r| r.name == f.rule && r.action == Action::Notify) {
                Some(i) => {
                    self.states[i]
                        .firing
                        .insert(f.instance_id, Firing { service: f.service, unseen: Some(0) });
                }
                None => gone.push(f),
            }
        }
        gone
    }

    /// The `notify` alerts that resolved since the last call.
    pub fn take_ended(&mut self) -> Vec<Ended> {
        std::mem::take(&mut self.ended)
    }

    /// The `notify` alerts firing now.
    pub fn firing(&self) -> Vec<Ended> {
        let mut out = Vec::new();
        for (rule, state) in self.rules.iter().zip(&self.states) {
            for (id, f) in &state.firing {
                out.push(Ended {
                    rule: rule.name.clone(),
                    service: f.service.clone(),
                    instance_id: id.clone(),
                    notify: rule.notify.clone(),
                });
            }
        }
        out
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Instances whose window is open for some rule (for tests of bounded memory).
    pub fn tracked(&self) -> usize {
        self.states.iter().map(|s| s.holding.len()).sum()
    }

    /// Evaluates one tick taken at `at` (time since start; it should not go backwards, and nothing breaks
    /// if it does). Returns the proposals in rule order, then longest-held first.
    pub fn observe(&mut self, at: Duration, snapshot: &Snapshot, signals: &Signals) -> Vec<ProposedAction> {
        let mut per_service: HashMap<&str, usize> = HashMap::new();
        for inst in &snapshot.instances {
            *per_service.entry(&inst.service).or_default() += 1;
        }
        let mut proposals = Vec::new();
        for (rule, state) in self.rules.iter().zip(self.states.iter_mut()) {
            state.recent.retain(|r| at < r.at.saturating_add(rule.cooldown));
            let mut holding = HashMap::with_capacity(state.holding.len());
            let mut ready = Vec::new();
            for inst in &snapshot.instances {
                if !rule.select.matches(&inst.service, &inst.instance_id, inst.kind)
                    || !holds(rule, inst, signals.get(&inst.instance_id), signals.alerts())
                {
                    continue;
                }
                let since = state.holding.get(&inst.instance_id).copied().unwrap_or(at);
                holding.insert(inst.instance_id.clone(), since);
                if state.firing.contains_key(&inst.instance_id) {
                    // Its alert is out already and stays so while the conditions hold.
                    continue;
                }
                let in_cooldown = state.recent.iter().any(|r| r.instance_id == inst.instance_id);
                if at.saturating_sub(since) >= rule.hold_for && !in_cooldown {
                    ready.push((since, inst));
                }
            }
            ready.sort_by(|a, b| {
                (a.0, &a.1.service, &a.1.instance_id).cmp(&(b.0, &b.1.service, &b.1.instance_id))
            });
            for (since, inst) in ready {
                let n = per_service.get(&*inst.service).copied().unwrap_or(0);
                let affected = state.recent.iter().filter(|r| r.service == inst.service).count();
                if affected >= budget(rule.max_fraction, n) {
                    continue;
                }
                state.recent.push(Recent {
                    at,
                    service: inst.service.clone(),
                    instance_id: inst.instance_id.clone(),
                });
                holding.insert(inst.instance_id.clone(), at);
                if rule.action == Action::Notify {
                    state.firing.insert(
                        inst.instance_id.clone(),
                        Firing { service: inst.service.clone(), unseen: None },
                    );
                }
                proposals.push(ProposedAction {
                    rule: rule.name.clone(),
                    action: rule.action,
                    service: inst.service.clone(),
                    instance_id: inst.instance_id.clone(),
                    at,
                    held_for: at.saturating_sub(since),
                    inputs: None,
                    notify: rule.notify.clone(),
                    workflow: rule.workflow.clone(),
                });
            }
            // An alert whose conditions no longer hold (or whose instance is gone) resolves.
            let mut ended = Vec::new();
            for (id, f) in state.firing.iter_mut() {
                if holding.contains_key(id) {
                    f.unseen = None;
                    continue;
                }
                let present = snapshot.instances.iter().any(|i| i.instance_id == *id);
                match &mut f.unseen {
                    Some(n) if !present && *n < UNSEEN_TICKS => *n += 1,
                    _ => ended.push(id.clone()),
                }
            }
            for id in ended {
                if let Some(Firing { service, .. }) = state.firing.remove(&id) {
                    self.ended.push(Ended {
                        rule: rule.name.clone(),
                        service,
                        instance_id: id,
                        notify: rule.notify.clone(),
                    });
                }
            }
            state.holding = holding;
        }
        proposals
    }
}
