//! One workflow run as data, and the pure transitions that move it: which steps may start now, what an
//! attempt's end does (succeed, retry after backoff, fail, continue, escalate, abort), what a person's
//! approval or cancellation does, and what a restart finds. The runtime (`super::runner`) persists the
//! record before and after every transition, so the record is the run: killing Vigil loses nothing.
//!
//! Time is wall-clock milliseconds passed in (a retry's due time must mean the same after a restart).
//!
//! A run's states: `queued` (for a slot under the concurrency limit), `running` (steps are running or may start), `waiting` (for a person: an `approve` step,
//! or a step a crash interrupted that may not run twice), then one of `succeeded`, `failed`, `cancelled`.
//! A step's: `pending` → `running` → `succeeded`, or → `retrying` (its backoff) → `running` again, or →
//! `failed` (after its last attempt) or `escalated` (failed, and its escalation step took over); an
//! `approve` step is `waiting` until approved; `interrupted` is a non-idempotent step found running after a
//! restart; steps a run never reached end `skipped`, and steps running when it was cancelled `cancelled`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{OnFailure, StepKind, Workflow};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for one of the `max_concurrent` slots.
    Queued,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn ended(self) -> bool {
        matches!(self, RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Waiting => "waiting",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Retrying,
    Waiting,
    Succeeded,
    Failed,
    Escalated,
    Interrupted,
    Skipped,
    Cancelled,
}

impl StepState {
    pub fn ended(self) -> bool {
        matches!(
            self,
            StepState::Succeeded
                | StepState::Failed
                | StepState::Escalated
                | StepState::Skipped
                | StepState::Cancelled
        )
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Retrying => "retrying",
            StepState::Waiting => "waiting",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Escalated => "escalated",
            StepState::Interrupted => "interrupted",
            StepState::Skipped => "skipped",
            StepState::Cancelled => "cancelled",
        }
    }
}

/// One step of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub kind: String,
    pub state: StepState,
    /// Attempts begun (1 for the first).
    pub attempt: u32,
    /// Attempts cut short by a restart and begun again (they do not count against `retries`).
    #[serde(default)]
    pub interrupted: u32,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// When a `retrying` step's next attempt is due.
    pub retry_at_ms: Option<u64>,
    /// What the last attempt produced (a command's exit code and output, the instances touched, ...).
    pub output: Option<serde_json::Value>,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

/// One run of a workflow: the whole durable state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub workflow: String,
    pub params: BTreeMap<String, String>,
    /// What started it: `hardware`, `alert`, `rule`, `api`.
    pub source: String,
    /// Why, as a sentence.
    pub reason: String,
    pub state: RunState,
    /// Why it waits for a person, or why it failed.
    pub message: Option<String>,
    /// Planned only: nothing is executed, every step is shown as it would run.
    pub dry_run: bool,
    pub created_ms: u64,
    pub ended_ms: Option<u64>,
    /// In the workflow's step order.
    pub steps: Vec<StepRecord>,
}

/// What the runtime does next for a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Begin these steps now (indices).
    Start(Vec<usize>),
    /// Nothing can start before this time (a retry's backoff), unless something happens first.
    WakeAt(u64),
    /// Nothing to do until a step ends or a person acts.
    Wait,
    /// The run has ended.
    Done,
}

impl RunRecord {
    /// A new run of `workflow`, every step pending.
    pub fn new(
        id: u64,
        workflow: &Workflow,
        params: BTreeMap<String, String>,
        source: &str,
        reason: &str,
        dry_run: bool,
        now_ms: u64,
    ) -> RunRecord {
        RunRecord {
            id,
            workflow: workflow.name.to_string(),
            params,
            source: source.to_string(),
            reason: reason.to_string(),
            state: RunState::Running,
            message: None,
            dry_run,
            created_ms: now_ms,
            ended_ms: None,
            steps: workflow
                .steps
                .iter()
                .map(|s| StepRecord {
                    name: s.name.to_string(),
                    kind: s.kind.as_str().to_string(),
                    state: StepState::Pending,
                    attempt: 0,
                    interrupted: 0,
                    started_ms: None,
                    ended_ms: None,
                    retry_at_ms: None,
                    output: None,
                    error: None,
                })
                .collect(),
        }
    }

    /// Whether this record belongs to `workflow` as it is now (same steps in the same order). A workflow
    /// edited while a run was under way no longer fits it; the run is then failed rather than guessed at.
    pub fn fits(&self, workflow: &Workflow) -> bool {
        self.steps.len() == workflow.steps.len()
            && self
                .steps
                .iter()
                .zip(&workflow.steps)
                .all(|(r, s)| r.name == *s.name && r.kind == s.kind.as_str())
    }

    /// Whether step `i` counts as done for the steps after it: it succeeded, it failed under `continue`,
    /// or it escalated and its escalation step counts as done.
    fn satisfied(&self, wf: &Workflow, i: usize, depth: usize) -> bool {
        if depth > wf.steps.len() {
            return false;
        }
        match self.steps[i].state {
            StepState::Succeeded => true,
            StepState::Failed => wf.steps[i].on_failure == OnFailure::Continue,
            StepState::Escalated => match wf.steps[i].on_failure {
                OnFailure::Escalate(to) => self.satisfied(wf, to, depth + 1),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether an escalation step has been escalated to.
    fn escalated_to(&self, wf: &Workflow, target: usize) -> bool {
        wf.steps.iter().enumerate().any(|(i, s)| {
            s.on_failure == OnFailure::Escalate(target) && self.steps[i].state == StepState::Escalated
        })
    }

    /// What to do now. Ends the run (and skips what it never reached) when nothing more can happen.
    pub fn next(&mut self, wf: &Workflow, now_ms: u64) -> Next {
        if self.state.ended() {
            return Next::Done;
        }
        // A step a crash interrupted holds the whole run: what it did is unknown until a person looks.
        if self.steps.iter().any(|s| s.state == StepState::Interrupted) {
            self.state = RunState::Waiting;
            return Next::Wait;
        }
        // Waiting for an approval holds only the steps after it; other branches go on.
        if self.steps.iter().any(|s| s.state == StepState::Waiting) {
            self.state = RunState::Waiting;
        } else if self.state == RunState::Waiting {
            self.state = RunState::Running;
            self.message = None;
        }
        let aborted = self.aborted(wf);
        let mut start = Vec::new();
        let mut wake: Option<u64> = None;
        if !aborted {
            for (i, step) in wf.steps.iter().enumerate() {
                let rec = &self.steps[i];
                match rec.state {
                    StepState::Pending => {
                        let reachable = if step.escalation {
                            self.escalated_to(wf, i)
                        } else {
                            step.after.iter().all(|&d| self.satisfied(wf, d, 0))
                        };
                        if reachable {
                            start.push(i);
                        }
                    }
                    StepState::Retrying => match rec.retry_at_ms {
                        Some(at) if at > now_ms => wake = Some(wake.map_or(at, |w: u64| w.min(at))),
                        _ => start.push(i),
                    },
                    _ => {}
                }
            }
        }
        if !start.is_empty() {
            return Next::Start(start);
        }
        let busy = self
            .steps
            .iter()
            .any(|s| matches!(s.state, StepState::Running | StepState::Waiting | StepState::Interrupted));
        if busy {
            return wake.map_or(Next::Wait, Next::WakeAt);
        }
        if let Some(at) = wake {
            return Next::WakeAt(at);
        }
        // Nothing runs, nothing can start: the run is over.
        for s in &mut self.steps {
            if matches!(s.state, StepState::Pending | StepState::Retrying) {
                s.state = StepState::Skipped;
            }
        }
        self.state = if aborted { RunState::Failed } else { RunState::Succeeded };
        if aborted && self.message.is_none() {
            self.message = Some(self.failure_sentence(wf));
        }
        self.ended_ms = Some(now_ms);
        Next::Done
    }

    /// Whether a step failed in a way that stops the run.
    fn aborted(&self, wf: &Workflow) -> bool {
        self.steps.iter().zip(&wf.steps).any(|(r, s)| {
            r.state == StepState::Failed && s.on_failure == OnFailure::Abort
                || r.state == StepState::Escalated && !matches!(s.on_failure, OnFailure::Escalate(_))
        })
    }

    fn failure_sentence(&self, wf: &Workflow) -> String {
        self.steps
            .iter()
            .zip(&wf.steps)
            .find(|(r, s)| r.state == StepState::Failed && s.on_failure == OnFailure::Abort)
            .map_or_else(
                || "a step failed".to_string(),
                |(r, _)| {
                    format!(
                        "step {:?} failed after {} attempt{}: {}",
                        r.name,
                        r.attempt,
                        if r.attempt == 1 { "" } else { "s" },
                        r.error.as_deref().unwrap_or("no reason given")
                    )
                },
            )
    }

    /// Step `i` begins an attempt (an `approve` step begins waiting for its person instead).
    pub fn begin(&mut self, wf: &Workflow, i: usize, now_ms: u64) {
        let approve = matches!(wf.steps[i].kind, StepKind::Approve { .. });
        let rec = &mut self.steps[i];
        rec.attempt += 1;
        rec.state = if approve && !self.dry_run { StepState::Waiting } else { StepState::Running };
        rec.started_ms.get_or_insert(now_ms);
        rec.retry_at_ms = None;
        rec.error = None;
        if approve && !self.dry_run {
            self.state = RunState::Waiting;
            self.message = Some(match &wf.steps[i].kind {
                StepKind::Approve { message: Some(m) } => {
                    format!("step {:?} waits for approval: {m}", rec.name)
                }
                _ => format!("step {:?} waits for approval", rec.name),
            });
        }
    }

    /// Step `i`'s attempt ended with `result` (its output, or why it failed).
    pub fn finish(
        &mut self,
        wf: &Workflow,
        i: usize,
        result: Result<serde_json::Value, String>,
        now_ms: u64,
    ) {
        let step = &wf.steps[i];
        let rec = &mut self.steps[i];
        if rec.state != StepState::Running {
            // Cancelled meanwhile, or a duplicate report: the record already says what happened.
            return;
        }
        rec.ended_ms = Some(now_ms);
        match result {
            Ok(output) => {
                rec.state = StepState::Succeeded;
                rec.output = Some(output);
            }
            Err(error) => {
                rec.error = Some(error);
                let counted = rec.attempt.saturating_sub(rec.interrupted);
                if counted <= step.retries {
                    rec.state = StepState::Retrying;
                    rec.retry_at_ms = Some(now_ms.saturating_add(
                        u64::try_from(step.backoff.before(counted + 1).as_millis()).unwrap_or(u64::MAX),
                    ));
                } else {
                    rec.state = match step.on_failure {
                        OnFailure::Escalate(_) => StepState::Escalated,
                        _ => StepState::Failed,
                    };
                }
            }
        }
    }

    /// A person approved: every waiting `approve` step succeeds, and an interrupted step runs again.
    /// Returns whether anything was waiting.
    pub fn approve(&mut self, now_ms: u64) -> bool {
        if self.state.ended()
            || !self.steps.iter().any(|s| matches!(s.state, StepState::Waiting | StepState::Interrupted))
        {
            return false;
        }
        for rec in &mut self.steps {
            match rec.state {
                StepState::Waiting => {
                    rec.state = StepState::Succeeded;
                    rec.ended_ms = Some(now_ms);
                    rec.output = Some(serde_json::json!({ "approved_ms": now_ms }));
                }
                StepState::Interrupted => {
                    rec.state = StepState::Retrying;
                    rec.retry_at_ms = Some(now_ms);
                    // The interrupted attempt does not count: the person chose to run it again.
                    rec.interrupted += 1;
                }
                _ => {}
            }
        }
        self.state = RunState::Running;
        self.message = None;
        true
    }

    /// A person cancelled: nothing more starts; steps still running are cancelled.
    pub fn cancel(&mut self, why: &str, now_ms: u64) -> bool {
        if self.state.ended() {
            return false;
        }
        for rec in &mut self.steps {
            rec.state = match rec.state {
                StepState::Pending | StepState::Retrying => StepState::Skipped,
                StepState::Running | StepState::Waiting | StepState::Interrupted => {
                    rec.ended_ms = Some(now_ms);
                    StepState::Cancelled
                }
                s => s,
            };
        }
        self.state = RunState::Cancelled;
        self.message = Some(why.to_string());
        self.ended_ms = Some(now_ms);
        true
    }

    /// Vigil restarted and found this run unfinished. A step that was running runs again if it is
    /// idempotent; otherwise the run waits for a person, told what was interrupted.
    pub fn resume(&mut self, wf: &Workflow, now_ms: u64) {
        if self.state.ended() {
            return;
        }
        let mut interrupted = Vec::new();
        for (rec, step) in self.steps.iter_mut().zip(&wf.steps) {
            if rec.state != StepState::Running {
                continue;
            }
            if step.idempotent || self.dry_run {
                rec.state = StepState::Retrying;
                rec.retry_at_ms = Some(now_ms);
                rec.interrupted += 1;
            } else {
                rec.state = StepState::Interrupted;
                interrupted.push(rec.name.clone());
            }
        }
        if !interrupted.is_empty() {
            self.state = RunState::Waiting;
            self.message = Some(format!(
                "Vigil stopped while step{} {} ran; {} not idempotent, so {} not run again by itself: check \
                 its effect, then approve the run to run it again, or cancel it",
                if interrupted.len() == 1 { "" } else { "s" },
                interrupted.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
                if interrupted.len() == 1 { "it is" } else { "they are" },
                if interrupted.len() == 1 { "it is" } else { "they are" },
            ));
        }
    }

    /// Indices of the steps running now (the runtime's tasks for them are gone after a restart).
    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        self.steps.iter().enumerate().filter(|(_, s)| s.state == StepState::Running).map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests;
