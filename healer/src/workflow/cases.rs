//! Running a workflow file's own test cases: each case feeds its hardware events, health changes and
//! alerts, in time order, to a fresh [`Triggers`] and compares the runs started with the expected ones,
//! exactly (each expected run's `at` and workflow, and the parameters it lists).

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ExpectedRun, StartRun, TestCase, Triggers, WorkflowSet, human};
use crate::alerts::AlertFact;
use crate::rules::TestOutcome;

/// Runs every test case of `set`.
pub fn run_tests(set: &WorkflowSet) -> Vec<TestOutcome> {
    set.tests
        .iter()
        .map(|t| TestOutcome { file: set.file.clone(), name: t.name.clone(), failure: run_case(set, t) })
        .collect()
}

/// What happens at one time of a case, in the order it is applied at that time.
enum Input<'c> {
    Event {
        device: &'c str,
        kind: &'c str,
    },
    Health {
        device: &'c str,
        state: super::Health,
    },
    /// The set of firing alerts may have changed.
    Alerts,
}

/// The runs `case` starts, each with its time.
fn started(set: &WorkflowSet, case: &TestCase) -> Vec<(Duration, StartRun)> {
    let mut inputs: Vec<(Duration, u8, usize, Input)> = Vec::new();
    for (k, e) in case.events.iter().enumerate() {
        inputs.push((e.at, 0, k, Input::Event { device: &e.device, kind: &e.kind }));
    }
    for (k, h) in case.health.iter().enumerate() {
        inputs.push((h.at, 1, k, Input::Health { device: &h.device, state: h.state }));
    }
    for (k, a) in case.alerts.iter().enumerate() {
        inputs.push((a.at, 2, k, Input::Alerts));
        if let Some(until) = a.until {
            inputs.push((until, 2, k, Input::Alerts));
        }
    }
    // Stable: at one time, events first, then health, then alerts, each in file order.
    inputs.sort_by_key(|(at, order, k, _)| (*at, *order, *k));
    let mut triggers = Triggers::new(&set.workflows);
    let mut out = Vec::new();
    let mut last_alerts = None;
    for (at, _, _, input) in inputs {
        let runs = match input {
            Input::Event { device, kind } => triggers.on_event(device, kind, at),
            Input::Health { device, state } => triggers.on_health(device, state, at),
            Input::Alerts if last_alerts == Some(at) => continue,
            Input::Alerts => {
                last_alerts = Some(at);
                let firing: Vec<AlertFact> = case
                    .alerts
                    .iter()
                    .filter(|a| a.at <= at && a.until.is_none_or(|u| u > at))
                    .map(|a| AlertFact::from_labels(&a.labels))
                    .collect();
                triggers.on_alerts(&firing, at)
            }
        };
        out.extend(runs.into_iter().map(|r| (at, r)));
    }
    out
}

fn show_params(params: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

fn show_expected(e: &ExpectedRun) -> String {
    format!("at {} {} {}", human(e.at), e.workflow, show_params(&e.params))
}

fn show_started((at, run): &(Duration, StartRun)) -> String {
    format!("at {} {} {} ({})", human(*at), run.workflow, show_params(&run.params), run.reason)
}

fn run_case(set: &WorkflowSet, case: &TestCase) -> Option<String> {
    let got = started(set, case);
    let mut want = case.expect.clone();
    want.sort();
    // Which started runs each expectation accepts; an expectation naming fewer parameters accepts more
    // runs, so expectations are paired with runs as a maximum matching, not first come first served.
    let accepts: Vec<Vec<usize>> = want
        .iter()
        .map(|w| {
            got.iter()
                .enumerate()
                .filter(|(_, (at, run))| {
                    *at == w.at
                        && run.workflow == w.workflow
                        && w.params.iter().all(|(p, v)| run.params.get(p) == Some(v))
                })
                .map(|(k, _)| k)
                .collect()
        })
        .collect();
    let run_of = matching(&accepts, got.len());
    let mut used = vec![false; got.len()];
    let mut missing = Vec::new();
    for (w, run) in want.iter().zip(&run_of) {
        match run {
            Some(k) => used[*k] = true,
            None => missing.push(show_expected(w)),
        }
    }
    let unexpected: Vec<String> =
        got.iter().zip(&used).filter(|(_, used)| !**used).map(|(g, _)| show_started(g)).collect();
    let mut out = Vec::new();
    if !missing.is_empty() {
        out.push(format!("expected but not started: {}", missing.join("; ")));
    }
    if !unexpected.is_empty() {
        out.push(format!("started but not expected: {}", unexpected.join("; ")));
    }
    (!out.is_empty()).then(|| out.join("\n"))
}

/// A maximum matching of expectations to runs (Kuhn's augmenting paths): for each expectation, the run
/// it is paired with. `accepts[i]` lists the runs expectation `i` may take, in order, so an unambiguous
/// case pairs each expectation with the first run it accepts.
fn matching(accepts: &[Vec<usize>], runs: usize) -> Vec<Option<usize>> {
    fn augment(i: usize, accepts: &[Vec<usize>], seen: &mut [bool], owner: &mut [Option<usize>]) -> bool {
        for &k in &accepts[i] {
            if seen[k] {
                continue;
            }
            seen[k] = true;
            if owner[k].is_none_or(|j| augment(j, accepts, seen, owner)) {
                owner[k] = Some(i);
                return true;
            }
        }
        false
    }
    let mut owner: Vec<Option<usize>> = vec![None; runs];
    for i in 0..accepts.len() {
        augment(i, accepts, &mut vec![false; runs], &mut owner);
    }
    let mut run_of = vec![None; accepts.len()];
    for (k, i) in owner.iter().enumerate() {
        if let Some(i) = i {
            run_of[*i] = Some(k);
        }
    }
    run_of
}
