//! The run state machine on hand-built workflows: ordering, retries, on_failure, approval, cancel, and
//! what a restart finds.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::workflow::{Backoff, Step, Trigger};

fn step(name: &str, kind: StepKind, after: &[usize]) -> Step {
    let idempotent = kind.idempotent();
    Step {
        name: Arc::from(name),
        timeout: kind.default_timeout(),
        kind,
        after: after.to_vec(),
        retries: 0,
        backoff: Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(4) },
        on_failure: OnFailure::Abort,
        escalation: false,
        idempotent,
    }
}

fn workflow(steps: Vec<Step>) -> Workflow {
    Workflow {
        name: Arc::from("wf"),
        trigger: Trigger::Manual,
        cooldown: Duration::ZERO,
        params: Default::default(),
        notify: Vec::new(),
        steps,
        file: Arc::from("test.yaml"),
    }
}

fn cordon() -> StepKind {
    StepKind::Cordon { resource: None }
}

fn restart() -> StepKind {
    StepKind::Restart(Default::default())
}

fn run(wf: &Workflow) -> RunRecord {
    RunRecord::new(7, wf, Default::default(), "api", "by hand", false, 1_000)
}

fn states(r: &RunRecord) -> Vec<&'static str> {
    r.steps.iter().map(|s| s.state.as_str()).collect()
}

/// Starts and succeeds whatever is ready until the run waits or ends.
fn drive_ok(r: &mut RunRecord, wf: &Workflow, now: u64) -> Next {
    loop {
        match r.next(wf, now) {
            Next::Start(ready) => {
                for i in ready {
                    r.begin(wf, i, now);
                    if r.steps[i].state == StepState::Running {
                        r.finish(wf, i, Ok(json!({})), now);
                    }
                }
            }
            other => return other,
        }
    }
}

#[test]
fn steps_start_when_everything_they_are_after_has_succeeded() {
    let wf = workflow(vec![
        step("a", cordon(), &[]),
        step("b", cordon(), &[0]),
        step("c", cordon(), &[0]),
        step("d", cordon(), &[1, 2]),
    ]);
    let mut r = run(&wf);
    assert_eq!(r.next(&wf, 1_000), Next::Start(vec![0]));
    r.begin(&wf, 0, 1_000);
    assert_eq!(r.next(&wf, 1_000), Next::Wait, "b and c wait for a");
    r.finish(&wf, 0, Ok(json!({})), 1_100);
    assert_eq!(r.next(&wf, 1_100), Next::Start(vec![1, 2]), "b and c run side by side");
    r.begin(&wf, 1, 1_100);
    r.begin(&wf, 2, 1_100);
    r.finish(&wf, 1, Ok(json!({})), 1_200);
    assert_eq!(r.next(&wf, 1_200), Next::Wait, "d waits for c too");
    r.finish(&wf, 2, Ok(json!({})), 1_300);
    assert_eq!(r.next(&wf, 1_300), Next::Start(vec![3]));
    r.begin(&wf, 3, 1_300);
    r.finish(&wf, 3, Ok(json!({"done": true})), 1_400);
    assert_eq!(r.next(&wf, 1_400), Next::Done);
    assert_eq!(r.state, RunState::Succeeded);
    assert_eq!(r.ended_ms, Some(1_400));
    assert_eq!(r.steps[3].output, Some(json!({"done": true})));
}

#[test]
fn a_failed_attempt_is_retried_after_its_backoff_then_the_run_aborts() {
    let mut s = step("fix", restart(), &[]);
    s.retries = 2;
    let wf = workflow(vec![s, step("after", cordon(), &[0])]);
    let mut r = run(&wf);
    assert_eq!(r.next(&wf, 0), Next::Start(vec![0]));
    r.begin(&wf, 0, 0);
    r.finish(&wf, 0, Err("boom 1".into()), 10);
    assert_eq!(r.steps[0].state, StepState::Retrying);
    assert_eq!(r.next(&wf, 10), Next::WakeAt(1_010), "first retry after backoff.initial");
    assert_eq!(r.next(&wf, 1_010), Next::Start(vec![0]));
    r.begin(&wf, 0, 1_010);
    r.finish(&wf, 0, Err("boom 2".into()), 1_020);
    assert_eq!(r.next(&wf, 1_020), Next::WakeAt(3_020), "the second retry waits twice as long");
    r.begin(&wf, 0, 3_020);
    r.finish(&wf, 0, Err("boom 3".into()), 3_030);
    assert_eq!(r.steps[0].attempt, 3);
    assert_eq!(r.next(&wf, 3_030), Next::Done);
    assert_eq!(r.state, RunState::Failed);
    assert_eq!(states(&r), ["failed", "skipped"]);
    assert_eq!(r.message.as_deref(), Some("step \"fix\" failed after 3 attempts: boom 3"));
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(5) };
    let got: Vec<u64> = (2..=6).map(|a| b.before(a).as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 5, 5]);
    assert_eq!(b.before(1000), Duration::from_secs(5), "no overflow on many attempts");
}

#[test]
fn continue_lets_the_steps_after_a_failure_run() {
    let mut s = step("try", restart(), &[]);
    s.on_failure = OnFailure::Continue;
    let wf = workflow(vec![s, step("next", cordon(), &[0])]);
    let mut r = run(&wf);
    r.next(&wf, 0);
    r.begin(&wf, 0, 0);
    r.finish(&wf, 0, Err("no".into()), 1);
    assert_eq!(drive_ok(&mut r, &wf, 2), Next::Done);
    assert_eq!(states(&r), ["failed", "succeeded"]);
    assert_eq!(r.state, RunState::Succeeded, "a failure under continue does not fail the run");
}

#[test]
fn escalation_runs_only_when_escalated_to_and_stands_in_for_the_failed_step() {
    let mut first = step("restart", restart(), &[]);
    first.on_failure = OnFailure::Escalate(2);
    let mut harder = step("reboot", restart(), &[]);
    harder.escalation = true;
    let wf = workflow(vec![first, step("verify", cordon(), &[0]), harder]);

    // Without a failure, the escalation step never runs.
    let mut calm = run(&wf);
    assert_eq!(drive_ok(&mut calm, &wf, 0), Next::Done);
    assert_eq!(states(&calm), ["succeeded", "succeeded", "skipped"]);

    let mut r = run(&wf);
    assert_eq!(r.next(&wf, 0), Next::Start(vec![0]));
    r.begin(&wf, 0, 0);
    r.finish(&wf, 0, Err("still broken".into()), 1);
    assert_eq!(r.steps[0].state, StepState::Escalated);
    assert_eq!(r.next(&wf, 1), Next::Start(vec![2]), "the escalation step, not verify");
    r.begin(&wf, 2, 1);
    r.finish(&wf, 2, Ok(json!({})), 2);
    assert_eq!(drive_ok(&mut r, &wf, 3), Next::Done);
    assert_eq!(states(&r), ["escalated", "succeeded", "succeeded"]);
    assert_eq!(r.state, RunState::Succeeded);

    // An escalation that fails too aborts the run.
    let mut worse = run(&wf);
    worse.next(&wf, 0);
    worse.begin(&wf, 0, 0);
    worse.finish(&wf, 0, Err("a".into()), 1);
    worse.next(&wf, 1);
    worse.begin(&wf, 2, 1);
    worse.finish(&wf, 2, Err("b".into()), 2);
    assert_eq!(worse.next(&wf, 2), Next::Done);
    assert_eq!(states(&worse), ["escalated", "skipped", "failed"]);
    assert_eq!(worse.state, RunState::Failed);
}

#[test]
fn an_approve_step_waits_for_a_person_while_other_branches_go_on() {
    let wf = workflow(vec![
        step("ok", StepKind::Approve { message: Some(Arc::from("disk swapped?")) }, &[]),
        step("after-ok", cordon(), &[0]),
        step("side", cordon(), &[]),
    ]);
    let mut r = run(&wf);
    assert_eq!(r.next(&wf, 0), Next::Start(vec![0, 2]));
    r.begin(&wf, 0, 0);
    r.begin(&wf, 2, 0);
    assert_eq!(r.steps[0].state, StepState::Waiting);
    assert_eq!(r.state, RunState::Waiting);
    assert_eq!(r.message.as_deref(), Some("step \"ok\" waits for approval: disk swapped?"));
    r.finish(&wf, 2, Ok(json!({})), 5);
    assert_eq!(r.next(&wf, 5), Next::Wait);
    assert!(r.approve(9));
    assert_eq!(r.steps[0].state, StepState::Succeeded);
    assert_eq!(drive_ok(&mut r, &wf, 10), Next::Done);
    assert_eq!(r.state, RunState::Succeeded);
    assert!(!r.approve(11), "nothing waits any more");
}

#[test]
fn cancel_skips_what_has_not_started_and_cancels_what_runs() {
    let wf = workflow(vec![step("a", cordon(), &[]), step("b", cordon(), &[0])]);
    let mut r = run(&wf);
    r.next(&wf, 0);
    r.begin(&wf, 0, 0);
    assert!(r.cancel("cancelled by a person", 3));
    assert_eq!(states(&r), ["cancelled", "skipped"]);
    assert_eq!(r.state, RunState::Cancelled);
    r.finish(&wf, 0, Ok(json!({})), 4);
    assert_eq!(r.steps[0].state, StepState::Cancelled, "a late end does not revive a cancelled step");
    assert_eq!(r.next(&wf, 5), Next::Done);
    assert!(!r.cancel("again", 6));
}

#[test]
fn a_restart_reruns_an_idempotent_step_and_holds_a_non_idempotent_one_for_a_person() {
    let wf = workflow(vec![step("drain", cordon(), &[]), step("restart", restart(), &[])]);
    let mut r = run(&wf);
    assert_eq!(r.next(&wf, 0), Next::Start(vec![0, 1]));
    r.begin(&wf, 0, 0);
    r.begin(&wf, 1, 0);
    // Vigil dies here; the record says both were running.
    let mut back: RunRecord = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
    back.resume(&wf, 100);
    assert_eq!(states(&back), ["retrying", "interrupted"]);
    assert_eq!(back.state, RunState::Waiting);
    assert_eq!(
        back.message.as_deref(),
        Some(
            "Vigil stopped while step \"restart\" ran; it is not idempotent, so it is not run again by \
             itself: check its effect, then approve the run to run it again, or cancel it"
        )
    );
    assert_eq!(back.next(&wf, 100), Next::Wait, "nothing starts while a person must look");
    assert!(back.approve(200));
    assert_eq!(back.next(&wf, 200), Next::Start(vec![0, 1]), "approval runs the restart again");
    back.begin(&wf, 0, 200);
    back.begin(&wf, 1, 200);
    back.finish(&wf, 0, Err("x".into()), 201);
    assert_eq!(
        back.steps[0].state,
        StepState::Failed,
        "the interrupted attempt does not count against retries, the new one does"
    );
}

#[test]
fn a_record_fits_only_the_workflow_it_was_made_from() {
    let wf = workflow(vec![step("a", cordon(), &[]), step("b", restart(), &[0])]);
    let r = run(&wf);
    assert!(r.fits(&wf));
    let edited = workflow(vec![step("a", cordon(), &[]), step("b", cordon(), &[0])]);
    assert!(!r.fits(&edited));
    assert!(!r.fits(&workflow(vec![step("a", cordon(), &[])])));
}

#[test]
fn a_dry_run_passes_approvals_and_reruns_anything_after_a_restart() {
    let wf = workflow(vec![step("ok", StepKind::Approve { message: None }, &[]), step("r", restart(), &[0])]);
    let mut r = RunRecord::new(1, &wf, Default::default(), "api", "plan", true, 0);
    assert_eq!(r.next(&wf, 0), Next::Start(vec![0]));
    r.begin(&wf, 0, 0);
    assert_eq!(r.steps[0].state, StepState::Running, "a dry run does not wait for a person");
    r.finish(&wf, 0, Ok(json!({})), 1);
    r.next(&wf, 1);
    r.begin(&wf, 1, 1);
    r.resume(&wf, 2);
    assert_eq!(r.steps[1].state, StepState::Retrying, "nothing was done, so it may be planned again");
}
