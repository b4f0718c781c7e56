//! The decision engine: one step per collector tick runs perception (a snapshot and the traffic signals)
//! through the rules, and every proposal (from a rule, the API or the broker) through the safety gate.
//! Time is passed in, never read, so the engine is tested with hand-made snapshots. It decides and never
//! acts: admitted actions go to an [`Executor`], which answers at once and reports the outcome later
//! (`crate::actions` carries them out and audits them), so no decision waits for an action.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use vigil_core::snapshot::Snapshot;

use crate::rules::{Action, Ended, Evaluator, ProposedAction, Signals};

/// The `rule` of decisions asked for by hand.
pub const MANUAL_RULE: &str = "manual";

/// A future the executor hands back.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How an executor took an action.
pub enum Started {
    /// Nothing (more) to do: the outcome is known at once.
    Finished(Result<(), String>),
    /// Under way; the future resolves with the outcome.
    Running(BoxFuture<'static, Result<(), String>>),
    /// The instance is busy with another action.
    Busy,
}

/// Carries out actions on instances. Implementations must be idempotent (hibernating a hibernated
/// instance succeeds and changes nothing) and must answer without waiting for the action itself.
pub trait Executor: Send + Sync + 'static {
    fn start<'a>(&'a self, action: Action, service: &'a str, instance_id: &'a str) -> BoxFuture<'a, Started>;

    /// `(instances, in standby or in transition)` of a service, for the gate's standby fraction; `None`
    /// where the executor cannot tell (the fraction is then not enforced).
    fn standby_counts(&self, _service: &str) -> Option<(usize, usize)> {
        None
    }

    /// Whether an action is under way on the instance.
    fn busy(&self, _instance_id: &str) -> bool {
        false
    }
}

/// Limits applied to every proposal before it reaches an executor.
#[derive(Clone, Debug, PartialEq)]
pub struct GateConfig {
    /// Decide and record, but execute nothing.
    pub dry_run: bool,
    /// At most this many actions in any sliding minute, host-wide.
    pub max_actions_per_minute: usize,
    /// A hibernation is refused when it would put more than this fraction of a service's instances in
    /// standby or in transition (1.0 allows a service to go wholly to standby).
    pub max_standby_fraction: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self { dry_run: false, max_actions_per_minute: 30, max_standby_fraction: 1.0 }
    }
}

/// Why the gate refused a proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The host-wide action rate limit is used up.
    RateLimited,
    /// The instance already has an action in progress.
    InProgress,
    /// Hibernating it would exceed the service's standby fraction.
    StandbyFraction,
}

/// What became of one proposal.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    DryRun,
    Refused { reason: Refusal },
    Succeeded { seconds: f64 },
    Failed { seconds: f64, error: String },
}

/// One audited decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Wall-clock time of the decision, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub rule: String,
    pub action: &'static str,
    pub service: String,
    pub instance_id: String,
    /// How long the rule's conditions had held.
    pub held_seconds: f64,
    /// What else led to it (see [`crate::rules::ProposedAction::inputs`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<serde_json::Value>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The safety gate's state: a sliding window of recent executions.
#[derive(Debug, Default)]
pub struct Gate {
    config: GateConfig,
    recent: VecDeque<Duration>,
}

impl Gate {
    pub fn new(config: GateConfig) -> Self {
        Self { config, recent: VecDeque::new() }
    }

    /// Admits a proposal at monotonic time `at` under the rate limit, or says why not. An admitted proposal
    /// counts against it.
    pub fn admit(&mut self, at: Duration) -> Result<(), Refusal> {
        while self.recent.front().is_some_and(|t| at.saturating_sub(*t) >= Duration::from_secs(60)) {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.config.max_actions_per_minute {
            return Err(Refusal::RateLimited);
        }
        self.recent.push_back(at);
        Ok(())
    }

    pub fn dry_run(&self) -> bool {
        self.config.dry_run
    }

    pub fn set_dry_run(&mut self, on: bool) {
        self.config.dry_run = on;
    }
}

/// Rules and gate: what to do, and whether it may be done now.
pub struct Engine {
    evaluator: Evaluator,
    gate: Gate,
    /// `notify` alerts that ended when their rule was removed by a reload.
    ended: Vec<Ended>,
}

impl Engine {
    pub fn new(evaluator: Evaluator, gate: Gate) -> Self {
        Self { evaluator, gate, ended: Vec::new() }
    }

    /// The `notify` alerts that resolved since the last call (conditions no longer holding, instance
    /// gone, rule removed).
    pub fn take_ended(&mut self) -> Vec<Ended> {
        let mut out = std::mem::take(&mut self.ended);
        out.extend(self.evaluator.take_ended());
        out
    }

    /// Carries `notify` alerts that fired before (in an earlier run) into the evaluator.
    pub fn seed_firing(&mut self, firing: Vec<Ended>) {
        let gone = self.evaluator.seed_firing(firing);
        self.ended.extend(gone);
    }

    /// One tick: the rules' proposals at monotonic time `at`.
    pub fn evaluate(&mut self, at: Duration, snapshot: &Snapshot, signals: &Signals) -> Vec<ProposedAction> {
        self.evaluator.observe(at, snapshot, signals)
    }

    /// Passes one proposal through the gate at monotonic time `at`: `Ok` means carry it out; otherwise the
    /// outcome is final (dry run, or refused and why).
    pub fn admit(&mut self, at: Duration, p: &ProposedAction, fleet: &dyn Executor) -> Result<(), Outcome> {
        if self.gate.dry_run() {
            return Err(Outcome::DryRun);
        }
        // A notification changes nothing on the instance, so an action under way does not stand in its
        // way. A busy instance is refused before anything is counted.
        if !matches!(p.action, Action::Notify | Action::Workflow) && fleet.busy(&p.instance_id) {
            return Err(Outcome::Refused { reason: Refusal::InProgress });
        }
        // A notification is not an action on an instance: it spends none of the budget that keeps
        // Vigil from doing too much to the host at once (receivers and Alertmanager do their own grouping).
        // Nor is starting a workflow: each of its steps that acts passes this gate itself, and the
        // workflows have their own storm limits.
        if matches!(p.action, Action::Notify | Action::Workflow) {
            return Ok(());
        }
        if p.action == Action::Hibernate
            && let Some((total, standby)) = fleet.standby_counts(&p.service)
            && (standby + 1) as f64 > self.gate.config.max_standby_fraction * total as f64
        {
            return Err(Outcome::Refused { reason: Refusal::StandbyFraction });
        }
        self.gate.admit(at).map_err(|reason| Outcome::Refused { reason })
    }

    /// Turns dry-run mode on or off (decide and audit, execute nothing).
    pub fn set_dry_run(&mut self, on: bool) {
        self.gate.set_dry_run(on);
    }

    pub fn dry_run(&self) -> bool {
        self.gate.dry_run()
    }

    /// Puts new rules in force. Their windows start afresh; recent actions' cooldowns are forgotten too.
    /// Firing `notify` alerts stay firing under a rule of the same name, and resolve when it is gone.
    pub fn replace_rules(&mut self, rules: Vec<crate::rules::Rule>) {
        let firing = self.evaluator.firing();
        self.evaluator = Evaluator::new(rules);
        self.seed_firing(firing);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::AuditLog;

    #[test]
    fn gate_window_slides() {
        let mut g = Gate::new(GateConfig { max_actions_per_minute: 2, ..GateConfig::default() });
        assert_eq!(g.admit(Duration::from_secs(0)), Ok(()));
        assert_eq!(g.admit(Duration::from_secs(1)), Ok(()));
        assert_eq!(g.admit(Duration::from_secs(30)), Err(Refusal::RateLimited));
        assert_eq!(g.admit(Duration::from_secs(60)), Ok(()), "the first action left the window");
    }

    #[test]
    fn audit_log_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("vigil-engine-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dir: &Path = &dir;
        {
            let log = AuditLog::open(dir).unwrap();
            assert_eq!(log.append(&serde_json::json!({"n": 1})).unwrap(), 1);
            assert_eq!(log.append(&serde_json::json!({"n": 2})).unwrap(), 2);
        }
        let log = AuditLog::open(dir).unwrap();
        let recent = log.recent(10).unwrap();
        assert_eq!(
            recent.iter().map(|(k, v)| (*k, v["n"].as_u64().unwrap())).collect::<Vec<_>>(),
            vec![(2, 2), (1, 1)]
        );
        assert_eq!(log.append(&serde_json::json!({"n": 3})).unwrap(), 3);
        let _ = std::fs::remove_dir_all(dir);
    }
}
