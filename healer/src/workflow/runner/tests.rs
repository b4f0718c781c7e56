//! The runtime over a real state database, with a recording fake for the host's steps: runs end to end,
//! what a crash leaves and how it is taken up, approvals, cancels, and the storm limits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::workflow::{Backoff, OnFailure, Step, Targets, Trigger};

/// How the fake answers a step, by step name; `Hang` never answers (a step cut off by a crash).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Ok,
    Fail,
    Hang,
}

#[derive(Default)]
struct FakeSteps {
    answers: Mutex<BTreeMap<String, Vec<Answer>>>,
    calls: Mutex<Vec<String>>,
    /// The cordoned resources each `changed` call saw.
    seen_cordons: Mutex<Vec<Vec<String>>>,
}

impl FakeSteps {
    fn answer(&self, step: &str, answers: &[Answer]) {
        self.answers.lock().unwrap().insert(step.to_string(), answers.to_vec());
    }

    fn calls(&self, step: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| *c == step).count()
    }
}

impl StepRunner for FakeSteps {
    fn run(&self, ctx: StepCtx, _kind: StepKind) -> BoxFuture<'static, Result<Value, String>> {
        self.calls.lock().unwrap().push(ctx.step.to_string());
        let answer = {
            let mut answers = self.answers.lock().unwrap();
            let list = answers.entry(ctx.step.to_string()).or_default();
            if list.len() > 1 { list.remove(0) } else { list.first().copied().unwrap_or(Answer::Ok) }
        };
        Box::pin(async move {
            match answer {
                Answer::Ok => Ok(json!({ "did": ctx.step.to_string(), "device": ctx.params.get("device") })),
                Answer::Fail => Err(format!("{} failed", ctx.step)),
                Answer::Hang => std::future::pending().await,
            }
        })
    }

    fn changed(&self, cordons: &BTreeMap<String, Cordon>) {
        self.seen_cordons.lock().unwrap().push(cordons.keys().cloned().collect());
    }
}

fn step(name: &str, kind: StepKind, after: &[usize]) -> Step {
    Step {
        name: Arc::from(name),
        timeout: kind.default_timeout(),
        idempotent: kind.idempotent(),
        kind,
        after: after.to_vec(),
        retries: 0,
        backoff: Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(40) },
        on_failure: OnFailure::Abort,
        escalation: false,
    }
}

fn workflow(name: &str, steps: Vec<Step>) -> Workflow {
    Workflow {
        name: Arc::from(name),
        trigger: Trigger::Manual,
        cooldown: Duration::from_secs(600),
        params: BTreeMap::new(),
        notify: Vec::new(),
        steps,
        file: Arc::from("test.yaml"),
    }
}

fn drain() -> StepKind {
    StepKind::Drain { timeout: Duration::from_secs(5), targets: Targets::default() }
}

fn restart() -> StepKind {
    StepKind::Restart(Targets::default())
}

/// The repair of the issue: cordon, drain, restart, approve, uncordon.
fn repair() -> Workflow {
    workflow(
        "repair",
        vec![
            step("cordon", StepKind::Cordon { resource: None }, &[]),
            step("drain", drain(), &[0]),
            step("restart", restart(), &[1]),
            step("ok", StepKind::Approve { message: None }, &[2]),
            step("back", StepKind::Uncordon { resource: None }, &[3]),
        ],
    )
}

/// A state database and the fake, outliving the runners made over them: a second runner over the same
/// database is Vigil after a restart (redb allows one handle per file, so they share it).
struct Fixture {
    dir: std::path::PathBuf,
    audit: Arc<AuditLog>,
    steps: Arc<FakeSteps>,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vigil-wf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = Arc::new(AuditLog::open(&dir).unwrap());
        Fixture { dir, audit, steps: Arc::new(FakeSteps::default()) }
    }

    fn runner(&self, workflows: Vec<Workflow>, limits: Limits) -> (Runner, Arc<AuditLog>) {
        let audit = self.audit.clone();
        let runner =
            Runner::new(workflows, audit.clone(), None, self.steps.clone(), limits, Box::new(|| 10)).unwrap();
        (runner, audit)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(workflow: &str, device: &str) -> StartRequest {
    StartRequest {
        workflow: workflow.to_string(),
        params: BTreeMap::from([("device".to_string(), device.to_string())]),
        source: "api".into(),
        reason: "by hand".into(),
        dry_run: false,
        cooldown_key: None,
        device: None,
    }
}

async fn until(runner: &Runner, id: u64, what: &str, done: impl Fn(&RunRecord) -> bool) -> RunRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = runner.get(id).unwrap();
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; the run is {r:#?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn states(r: &RunRecord) -> Vec<&'static str> {
    r.steps.iter().map(|s| s.state.as_str()).collect()
}

#[tokio::test]
async fn a_run_cordons_acts_waits_for_approval_and_uncordons() {
    let fx = Fixture::new("e2e");
    let (runner, audit) = fx.runner(vec![repair()], Limits::default());
    let run = runner.start(request("repair", "loop3")).unwrap();
    let waiting = until(&runner, run.id, "the approval", |r| r.state == RunState::Waiting).await;
    assert_eq!(states(&waiting), ["succeeded", "succeeded", "succeeded", "waiting", "pending"]);
    assert!(runner.cordoned("loop3"), "cordoned while the repair runs");
    assert_eq!(waiting.steps[2].output, Some(json!({"did": "restart", "device": "loop3"})));
    runner.approve(run.id).unwrap();
    let done = until(&runner, run.id, "the end", |r| r.state.ended()).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    assert!(!runner.cordoned("loop3"), "uncordoned at the end");
    assert_eq!((fx.steps.calls("drain"), fx.steps.calls("restart")), (1, 1));
    // Every step's end is audited as a decision of rule workflow:repair, and the approval too.
    let audited: Vec<(String, String)> = audit
        .recent(20)
        .unwrap()
        .into_iter()
        .rev()
        .map(|(_, v)| (v["action"].as_str().unwrap().to_string(), v["outcome"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        audited,
        [
            ("cordon", "succeeded"),
            ("drain", "succeeded"),
            ("restart", "succeeded"),
            ("approve", "succeeded"),
            ("uncordon", "succeeded")
        ]
        .map(|(a, o)| (a.to_string(), o.to_string()))
    );
    assert_eq!(audit.recent(1).unwrap()[0].1["rule"], "workflow:repair");
    // And the record is durable.
    drop(runner);
    let again = Store::new(audit.database()).get(run.id).unwrap().unwrap();
    assert_eq!(again.state, RunState::Succeeded);
}

/// Runs `f` on a runtime of its own and then drops that runtime: every task of it dies mid-await, as
/// they would if Vigil were killed.
fn then_crash<T>(f: impl std::future::Future<Output = T>) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let out = rt.block_on(f);
    rt.shutdown_background();
    out
}

#[test]
fn killed_during_the_drain_it_resumes_there_and_never_repeats_the_restart() {
    let fx = Fixture::new("crash-drain");
    fx.steps.answer("drain", &[Answer::Hang, Answer::Ok]);
    let id = then_crash(async {
        let (runner, _) = fx.runner(vec![repair()], Limits::default());
        let run = runner.start(request("repair", "loop3")).unwrap();
        until(&runner, run.id, "the drain", |r| r.steps[1].state == StepState::Running).await;
        run.id
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (runner, _) = fx.runner(vec![repair()], Limits::default());
        assert!(runner.cordoned("loop3"), "the cordon survived the crash");
        assert_eq!(runner.resume().unwrap(), 1);
        let waiting = until(&runner, id, "the approval", |r| r.state == RunState::Waiting).await;
        assert_eq!(waiting.steps[1].interrupted, 1, "the drain was cut off once and ran again");
        runner.approve(id).unwrap();
        let done = until(&runner, id, "the end", |r| r.state.ended()).await;
        assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    });
    assert_eq!(fx.steps.calls("drain"), 2, "the idempotent drain ran again");
    assert_eq!(fx.steps.calls("restart"), 1, "the restart ran once");
}

#[test]
fn killed_during_the_restart_it_waits_for_a_person_who_may_run_it_again() {
    let fx = Fixture::new("crash-restart");
    fx.steps.answer("restart", &[Answer::Hang, Answer::Ok]);
    let id = then_crash(async {
        let (runner, _) = fx.runner(vec![repair()], Limits::default());
        let run = runner.start(request("repair", "loop3")).unwrap();
        until(&runner, run.id, "the restart", |r| r.steps[2].state == StepState::Running).await;
        run.id
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (runner, _) = fx.runner(vec![repair()], Limits::default());
        runner.resume().unwrap();
        let held = until(&runner, id, "the hold", |r| r.state == RunState::Waiting).await;
        assert_eq!(held.steps[2].state, StepState::Interrupted);
        assert!(held.message.as_deref().unwrap().contains("\"restart\""), "{:?}", held.message);
        assert_eq!(fx.steps.calls("restart"), 1, "not run again by itself");
        runner.approve(id).unwrap();
        until(&runner, id, "the approval step", |r| r.steps[3].state == StepState::Waiting).await;
        assert_eq!(fx.steps.calls("restart"), 2, "the person's approval ran it again");
        runner.cancel(id).unwrap();
        let done = until(&runner, id, "the end", |r| r.state.ended()).await;
        assert_eq!(done.state, RunState::Cancelled);
        assert_eq!(states(&done), ["succeeded", "succeeded", "succeeded", "cancelled", "skipped"]);
        assert!(runner.cordoned("loop3"), "a cancelled run leaves its cordon for a person to lift");
    });
}

#[tokio::test]
async fn a_failing_step_is_retried_then_aborts_the_run() {
    let fx = Fixture::new("retry");
    let mut wf = repair();
    wf.steps[2].retries = 2;
    fx.steps.answer("restart", &[Answer::Fail, Answer::Fail, Answer::Fail]);
    let (runner, _) = fx.runner(vec![wf], Limits::default());
    let run = runner.start(request("repair", "loop4")).unwrap();
    let done = until(&runner, run.id, "the end", |r| r.state.ended()).await;
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(states(&done), ["succeeded", "succeeded", "failed", "skipped", "skipped"]);
    assert_eq!(done.steps[2].attempt, 3);
    assert_eq!(done.message.as_deref(), Some("step \"restart\" failed after 3 attempts: restart failed"));
}

#[tokio::test]
async fn a_step_that_outlives_its_timeout_fails() {
    let fx = Fixture::new("timeout");
    let mut wf = repair();
    wf.steps[1].timeout = Some(Duration::from_millis(50));
    fx.steps.answer("drain", &[Answer::Hang]);
    let (runner, _) = fx.runner(vec![wf], Limits::default());
    let run = runner.start(request("repair", "loop5")).unwrap();
    let done = until(&runner, run.id, "the end", |r| r.state.ended()).await;
    assert_eq!(done.steps[1].error.as_deref(), Some("timed out after 50ms"));
}

#[tokio::test]
async fn runs_beyond_the_concurrency_limit_queue_in_order() {
    let fx = Fixture::new("queue");
    let (runner, _) = fx.runner(vec![repair()], Limits { max_concurrent: 1, ..Limits::default() });
    let first = runner.start(request("repair", "loop1")).unwrap();
    until(&runner, first.id, "the first to wait", |r| r.state == RunState::Waiting).await;
    let second = runner.start(request("repair", "loop2")).unwrap();
    tokio::task::yield_now().await;
    assert_eq!(runner.get(second.id).unwrap().state, RunState::Queued);
    assert_eq!(fx.steps.calls("drain"), 1);
    runner.approve(first.id).unwrap();
    until(&runner, second.id, "the second to wait", |r| r.state == RunState::Waiting).await;
    assert_eq!(fx.steps.calls("drain"), 2);
}

#[tokio::test]
async fn cooldowns_hold_per_key_and_survive_a_restart() {
    let fx = Fixture::new("cooldown");
    let keyed = |device: &str| StartRequest {
        cooldown_key: Some(format!("repair\0{device}")),
        source: "hardware".into(),
        ..request("repair", device)
    };
    {
        let (runner, _) = fx.runner(vec![repair()], Limits::default());
        runner.start(keyed("loop1")).unwrap();
        let again = runner.start(keyed("loop1")).unwrap_err().to_string();
        assert!(again.starts_with("workflow \"repair\" is in its cooldown"), "{again}");
        runner.start(keyed("loop2")).unwrap();
        runner.start(request("repair", "loop1")).expect("a run asked by hand has no cooldown");
    }
    let (runner, _) = fx.runner(vec![repair()], Limits::default());
    assert!(runner.start(keyed("loop1")).is_err(), "still in cooldown after a restart");
}

#[tokio::test]
async fn the_breaker_opens_when_too_many_devices_fault_at_once() {
    let fx = Fixture::new("breaker");
    let limits = Limits { breaker_max_fraction: 0.2, breaker_min_devices: 3, ..Limits::default() };
    let (runner, audit) = fx.runner(vec![repair()], limits);
    let hw = |device: &str| StartRequest { device: Some(device.to_string()), ..request("repair", device) };
    runner.start(hw("loop1")).unwrap();
    runner.start(hw("loop2")).unwrap();
    let refused = runner.start(hw("loop3")).unwrap_err().to_string();
    assert_eq!(
        refused,
        "circuit breaker open: 3 of 10 devices (30 %) had faults within 300s, more than 20 %: no new runs until \
         fewer do"
    );
    assert!(runner.start(hw("loop4")).is_err());
    let last = &audit.recent(1).unwrap()[0].1;
    assert_eq!((last["action"].as_str(), last["outcome"].as_str()), (Some("workflow"), Some("failed")));
}

#[tokio::test]
async fn a_dry_run_plans_every_step_and_changes_nothing() {
    let fx = Fixture::new("dry");
    let (runner, _) = fx.runner(vec![repair()], Limits::default());
    let run = runner.start(StartRequest { dry_run: true, ..request("repair", "loop3") }).unwrap();
    let done = until(&runner, run.id, "the end", |r| r.state.ended()).await;
    assert_eq!(done.state, RunState::Succeeded);
    assert!(!runner.cordoned("loop3"));
    assert_eq!(fx.steps.calls("restart"), 0);
    assert_eq!(
        done.steps[2].output,
        Some(json!({"dry_run": true, "would": "restart", "params": {"device": "loop3"}}))
    );
}

#[test]
fn placeholders_take_the_run_parameters() {
    let ctx = StepCtx {
        run_id: 9,
        workflow: Arc::from("disk"),
        step: Arc::from("fix"),
        attempt: 1,
        params: BTreeMap::from([("device".into(), "loop3".into()), ("cpu".into(), "".into())]),
        dry_run: false,
    };
    assert_eq!(
        ctx.fill("fix {device} for {workflow}#{run_id} {unknown} {"),
        "fix loop3 for disk#9 {unknown} {"
    );
    assert_eq!(ctx.resource(None).as_deref(), Some("loop3"));
    assert_eq!(ctx.resource(Some("cpu{device}")).as_deref(), Some("cpuloop3"));
}

#[tokio::test]
async fn a_run_holds_what_it_took_until_it_ends_and_its_cordon_is_lifted() {
    let fx = Fixture::new("holds");
    let (runner, _) = fx.runner(vec![repair()], Limits::default());
    runner.resume().unwrap();
    let run = runner.start(request("repair", "loop3")).unwrap();
    until(&runner, run.id, "the approval", |r| r.state == RunState::Waiting).await;
    assert!(runner.holds(run.id), "unfinished");
    runner.cancel(run.id).unwrap();
    until(&runner, run.id, "the cancel", |r| r.state.ended()).await;
    assert!(runner.holds(run.id), "ended, but its cordon is still in force");
    assert!(!runner.holds(run.id + 1), "no such run holds nothing");
    // The host saw the cordons at the start (none), when loop3 was cordoned, and when the run ended.
    let seen = fx.steps.seen_cordons.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&Vec::<String>::new()), "{seen:?}");
    assert!(seen.contains(&vec!["loop3".to_string()]), "{seen:?}");

    let second = runner.start(request("repair", "loop4")).unwrap();
    until(&runner, second.id, "the approval", |r| r.state == RunState::Waiting).await;
    runner.approve(second.id).unwrap();
    until(&runner, second.id, "the end", |r| r.state.ended()).await;
    assert!(!runner.holds(second.id), "ended and uncordoned: it holds nothing");
    let last = fx.steps.seen_cordons.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last, vec!["loop3".to_string()], "loop4's cordon is lifted, loop3's stays");
}

#[tokio::test]
async fn a_person_lifts_the_cordon_of_an_ended_run_but_not_of_one_under_way() {
    let fx = Fixture::new("uncordon");
    let (runner, audit) = fx.runner(vec![repair()], Limits::default());
    runner.resume().unwrap();
    let run = runner.start(request("repair", "loop3")).unwrap();
    until(&runner, run.id, "the approval", |r| r.state == RunState::Waiting).await;
    let refused = runner.uncordon("loop3", "by hand").unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!("run {} is waiting: it placed this cordon and is still under way: cancel it first", run.id)
    );
    assert!(runner.cordoned("loop3"));
    runner.cancel(run.id).unwrap();
    until(&runner, run.id, "the cancel", |r| r.state.ended()).await;

    let lifted = runner.uncordon("loop3", "disk replaced").unwrap();
    assert_eq!(lifted.run_id, run.id);
    assert!(!runner.cordoned("loop3") && !runner.holds(run.id), "lifted: the run holds nothing any more");
    let last = fx.steps.seen_cordons.lock().unwrap().last().cloned().unwrap();
    assert!(last.is_empty(), "the host was told: {last:?}");
    assert_eq!(runner.uncordon("loop3", "again").unwrap_err().to_string(), "\"loop3\" is not cordoned");
    let (_, d) = audit.recent(1).unwrap().pop().unwrap();
    assert_eq!(
        (&d["rule"], &d["action"], &d["instance_id"]),
        (&json!("workflow:repair"), &json!("uncordon"), &json!("loop3"))
    );
    assert_eq!(d["inputs"]["reason"], "disk replaced");

    // Lifted for good: a runtime over the same database after a restart has no cordon either.
    drop(runner);
    let (again, _) = fx.runner(vec![repair()], Limits::default());
    assert!(again.cordons().is_empty());
}
