//! Workflow files as users write them: what loads, and every mistake's exact `file:line:column: path:
//! message` line; the files' own test cases, passing and failing.

use std::time::Duration;

use super::*;

/// The issue's example, as users will write it.
const DISK_ERRORS: &str = r#"workflows:
  - name: disk-errors
    trigger: { hardware: { kind: io_error, at_least: 3, within: 1m } }
    cooldown: 30m
    steps:
      - { name: cordon, cordon: {} }
      - { name: drain, drain: { timeout: 30s }, after: [cordon] }
      - { name: fix, run: { command: ["/usr/local/bin/fix-disk", "{device}"], timeout: 10m, idempotent: false }, after: [drain] }
      - { name: ok, approve: {}, after: [fix] }
      - { name: check, wait_for: { device_health: healthy, for: 5m }, after: [ok] }
      - { name: back, uncordon: {}, after: [check] }
"#;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The whole error text of `text` as `w.yaml`, one line per mistake.
fn errors(text: &str) -> Vec<String> {
    match check_str(text, "w.yaml") {
        Ok(_) => panic!("expected mistakes in:\n{text}"),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

/// One workflow with a manual trigger and these steps (each a line of flow YAML), for graph mistakes.
fn manual(steps: &[&str]) -> String {
    let mut text = "workflows:\n  - name: w\n    trigger: { manual: true }\n    steps:\n".to_string();
    for s in steps {
        text.push_str("      - ");
        text.push_str(s);
        text.push('\n');
    }
    text
}

#[test]
fn the_issues_example_loads_as_written() {
    let set = check_str(DISK_ERRORS, "disk.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.file, "disk.yaml");
    assert!(set.tests.is_empty() && set.receivers.is_empty());
    let [w] = &set.workflows[..] else { panic!("one workflow: {:?}", set.workflows) };
    assert_eq!(&*w.name, "disk-errors");
    assert_eq!(&*w.file, "disk.yaml");
    assert_eq!(
        w.trigger,
        Trigger::HardwareEvents { kind: "io_error".into(), device: None, at_least: 3, within: secs(60) }
    );
    assert_eq!(w.cooldown, secs(1800));
    let names: Vec<&str> = w.steps.iter().map(|s| &*s.name).collect();
    assert_eq!(names, ["cordon", "drain", "fix", "ok", "check", "back"]);
    let after: Vec<&[usize]> = w.steps.iter().map(|s| &s.after[..]).collect();
    assert_eq!(after, [&[][..], &[0], &[1], &[2], &[3], &[4]]);
    assert_eq!(w.steps[0].kind, StepKind::Cordon { resource: None });
    assert_eq!(w.steps[1].kind, StepKind::Drain { timeout: secs(30), targets: Targets::default() });
    assert_eq!(
        w.steps[2].kind,
        StepKind::Run {
            command: vec!["/usr/local/bin/fix-disk".into(), "{device}".into()],
            timeout: secs(600),
            idempotent: false
        }
    );
    assert!(!w.steps[2].idempotent, "a run step runs again after a crash only when it says so");
    assert_eq!(w.steps[2].timeout, Some(secs(600)), "a run step's own timeout bounds its attempt");
    assert_eq!(w.steps[1].timeout, Some(secs(40)), "a drain gets its drain timeout and a margin");
    assert_eq!(w.steps[3].kind, StepKind::Approve { message: None });
    assert_eq!(w.steps[3].timeout, None, "a person takes as long as they take");
    assert_eq!(
        w.steps[4].kind,
        StepKind::WaitFor {
            condition: WaitCondition::DeviceHealth { state: Health::Healthy, device: None },
            hold: secs(300)
        }
    );
    assert_eq!(w.steps[5].kind, StepKind::Uncordon { resource: None });
    for s in &w.steps {
        assert_eq!(
            (s.retries, s.backoff, &s.on_failure, s.escalation),
            (0, Backoff::default(), &OnFailure::Abort, false)
        );
    }
}

#[test]
fn every_trigger_form_and_step_kind_loads() {
    let text = r#"workflows:
  - name: dead-disk
    trigger: { hardware: { state: failed, device: "sd*" } }
    params: { service: echo, threshold: 3 }
    notify: [ops]
    steps:
      - { name: tell, notify: { message: "{device} is {state}", labels: { severity: page } } }
      - { name: stop, stop: { service: "{service}" }, after: [tell] }
      - { name: sleep, hibernate: { instance_id: "{service}-0" }, after: [tell] }
      - { name: again, restart: {}, after: [stop, sleep], retries: 3, backoff: { initial: 2s, max: 10s }, on_failure: continue }
  - name: disk-alert
    trigger: { alert: { name: "Disk*", labels: { severity: critical } } }
    steps:
      - { name: move, evacuate: { service: "{service}", restart: true }, on_failure: { escalate: tell } }
      - { name: tell, notify: { message: "could not move {instance_id}", receivers: [pager] } }
      - { name: calm, wait_for: { metric: cpu_cores, below: 0.5, service: "{service}", for: 1m }, after: [move] }
  - name: cpu-by-hand
    trigger: { manual: true }
    steps:
      - { name: off, cpu_offline: { cpu: 3 } }
      - { name: "on", cpu_online: { cpu: "{cpu}" }, after: [off], timeout: 5s, idempotent: true }
"#;
    let set = check_str(text, "all.yaml").unwrap_or_else(|e| panic!("{e}"));
    let [dead, alert, cpu] = &set.workflows[..] else { panic!("three workflows") };
    assert_eq!(
        dead.trigger,
        Trigger::HardwareState { state: Health::Failed, device: Some(Glob::new("sd*").unwrap()) }
    );
    assert_eq!(dead.params.get("threshold").map(String::as_str), Some("3"), "numbers are text");
    assert_eq!(dead.steps[3].after, [1, 2]);
    assert_eq!(dead.steps[3].retries, 3);
    assert_eq!(dead.steps[3].backoff, Backoff { initial: secs(2), max: secs(10) });
    assert_eq!(dead.steps[3].on_failure, OnFailure::Continue);
    assert!(!dead.steps[3].idempotent, "restart is not idempotent");
    assert_eq!(
        dead.steps[2].kind,
        StepKind::Hibernate(Targets { service: None, instance_id: Some("{service}-0".into()) })
    );
    assert!(matches!(alert.trigger, Trigger::Alert(_)));
    assert_eq!(alert.steps[0].on_failure, OnFailure::Escalate(1));
    assert!(alert.steps[1].escalation && !alert.steps[0].escalation);
    assert_eq!(
        alert.steps[0].kind,
        StepKind::Evacuate {
            targets: Targets { service: Some("{service}".into()), instance_id: None },
            restart: true
        }
    );
    assert_eq!(cpu.trigger, Trigger::Manual);
    assert_eq!(cpu.steps[0].kind, StepKind::CpuOffline { cpu: Some("3".into()) });
    assert_eq!(cpu.steps[1].timeout, Some(secs(5)));
    let told: Vec<(&str, &str)> = set.receivers.iter().map(|r| (&*r.rule, r.path.as_str())).collect();
    assert_eq!(
        told,
        [
            ("dead-disk", "workflows[0].notify[0]"),
            ("disk-alert", "workflows[1].steps[1].notify.receivers[0]")
        ]
    );
    let kinds: Vec<&str> = set.workflows.iter().flat_map(|w| &w.steps).map(|s| s.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "notify",
            "stop",
            "hibernate",
            "restart",
            "evacuate",
            "notify",
            "wait_for",
            "cpu_offline",
            "cpu_online"
        ]
    );
}

#[test]
fn an_unknown_after_step_is_located_and_lists_the_steps() {
    let text = manual(&["{ name: a, approve: {} }", "{ name: b, approve: {}, after: [a, c] }"]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:6:44: workflows[0].steps[1].after[1]: no step is named `c` in this workflow; its steps: a, b"
        ]
    );
}

#[test]
fn a_cycle_names_its_steps_in_order() {
    let text = manual(&[
        "{ name: start, approve: {} }",
        "{ name: a, approve: {}, after: [start, c] }",
        "{ name: b, approve: {}, after: [a] }",
        "{ name: c, approve: {}, after: [b] }",
    ]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:6:40: workflows[0].steps[1].after: `after:` makes a cycle: a -> c -> b -> a (each is after the next)"
        ]
    );
    let alone = manual(&["{ name: me, approve: {}, after: [me] }"]);
    assert_eq!(
        errors(&alone),
        [
            "w.yaml:5:41: workflows[0].steps[0].after: `after:` makes a cycle: me -> me (each is after the next)"
        ]
    );
}

#[test]
fn a_duplicate_step_name_is_located_at_the_second() {
    let text = manual(&["{ name: a, approve: {} }", "{ name: a, cordon: {} }"]);
    assert_eq!(
        errors(&text),
        ["w.yaml:6:17: workflows[0].steps[1].name: `a` is already the name of a step in this workflow"]
    );
}

#[test]
fn an_unknown_placeholder_lists_the_known_ones() {
    let text = "workflows:\n  - name: w\n    trigger: { hardware: { kind: io_error } }\n    params: { team: db }\n    steps:\n      - { name: fix, run: { command: [fix, \"{devcie}\", \"{team}\"] } }\n";
    assert_eq!(
        errors(text),
        [
            "w.yaml:6:44: workflows[0].steps[0].run.command[1]: unknown placeholder `{devcie}`; known: cpu, device, \
          instance_id, kind, run_id, service, team, workflow"
        ]
    );
}

#[test]
fn a_bad_duration_says_what_it_read() {
    let text = "workflows:\n  - name: w\n    trigger: { manual: true }\n    cooldown: soon\n    steps:\n      - { name: a, approve: {} }\n";
    assert_eq!(
        errors(text),
        ["w.yaml:4:15: workflows[0].cooldown: `soon` is not a duration like 500ms, 1s, 5m, 2h"]
    );
}

#[test]
fn a_step_has_exactly_one_kind() {
    let text = manual(&["{ name: none }", "{ name: two, cordon: {}, drain: {} }"]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:5:9: workflows[0].steps[0]: a step needs a kind: one of cordon, uncordon, drain, evacuate, \
             cpu_offline, cpu_online, restart, stop, hibernate, run, notify, approve, wait_for",
            "w.yaml:6:9: workflows[0].steps[1]: a step has one kind; this one gives cordon and drain",
        ]
    );
}

#[test]
fn an_unknown_key_is_named_with_the_ones_expected() {
    let text = manual(&["{ name: a, approve: {}, aftre: [b] }"]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:5:33: workflows[0].steps[0].aftre: unknown field `aftre`, expected one of name, after, timeout, \
          retries, backoff, on_failure, idempotent, cordon, uncordon, drain, evacuate, cpu_offline, cpu_online, \
          restart, stop, hibernate, run, notify, approve, wait_for"
        ]
    );
}

#[test]
fn retries_are_capped() {
    let text = manual(&[&format!("{{ name: a, approve: {{}}, retries: {} }}", MAX_RETRIES + 1)]);
    assert_eq!(
        errors(&text),
        [format!(
            "w.yaml:5:42: workflows[0].steps[0].retries: {} is more than the limit of {MAX_RETRIES}",
            MAX_RETRIES + 1
        )]
    );
    assert!(
        check_str(&manual(&[&format!("{{ name: a, approve: {{}}, retries: {MAX_RETRIES} }}")]), "w.yaml")
            .is_ok()
    );
}

#[test]
fn escalating_from_the_last_step_has_nothing_to_escalate_to() {
    let text =
        manual(&["{ name: a, approve: {} }", "{ name: b, approve: {}, after: [a], on_failure: escalate }"]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:6:57: workflows[0].steps[1].on_failure: a bare `escalate` names the next step in the file, and \
          this is the last step"
        ]
    );
}

#[test]
fn a_test_case_naming_an_unknown_workflow_lists_the_files_workflows() {
    let text = format!(
        "{DISK_ERRORS}tests:\n  - name: t\n    events: [ {{ at: 0s, device: sda, kind: io_error }} ]\n    expect:\n      - {{ at: 0s, workflow: disk-error }}\n"
    );
    assert_eq!(
        errors(&text),
        ["w.yaml:16:29: tests[0].expect[0].workflow: no workflow is named `disk-error` in this file; its \
          workflows: disk-errors"]
    );
}

#[test]
fn every_mistake_in_a_file_is_reported_at_once_in_file_order() {
    let text = r#"workflows:
  - name: a
    trigger: { hardware: { kind: IoError, within: 0s } }
    cooldown: 1 hour
    steps:
      - { name: x, drain: { timeout: 5 minutes } }
      - { name: y, approve: {}, after: [z], retries: 1000 }
  - name: a
    trigger: { manual: false }
    steps: []
tests:
  - name: t
    expect: [ { at: 1s, workflow: b } ]
"#;
    assert_eq!(
        errors(text),
        [
            "w.yaml:3:34: workflows[0].trigger.hardware.kind: `IoError` is not an event kind (snake_case: \
             [a-z][a-z0-9_]*)",
            "w.yaml:3:51: workflows[0].trigger.hardware.within: must be longer than 0s",
            "w.yaml:4:15: workflows[0].cooldown: `1 hour` has no unit: write it as 500ms, 1s, 5m or 2h",
            "w.yaml:6:38: workflows[0].steps[0].drain.timeout: `5 minutes` has no unit: write it as 500ms, 1s, \
             5m or 2h",
            "w.yaml:7:41: workflows[0].steps[1].after[0]: no step is named `z` in this workflow; its steps: x, y",
            "w.yaml:7:54: workflows[0].steps[1].retries: 1000 is more than the limit of 100",
            "w.yaml:8:11: workflows[1].name: `a` is already the name of a workflow in this file",
            "w.yaml:9:24: workflows[1].trigger.manual: `manual: false` starts nothing: write `manual: true`",
            "w.yaml:10:12: workflows[1].steps: a workflow needs at least one step",
            "w.yaml:13:35: tests[0].expect[0].workflow: no workflow is named `b` in this file; its workflows: a",
        ]
    );
}

#[test]
fn a_passing_case_and_a_failing_case_are_told_apart_readably() {
    let text = format!(
        r#"{DISK_ERRORS}tests:
  - name: three errors within a minute start a run
    events:
      - {{ at: 0s, device: sdb, kind: io_error }}
      - {{ at: 10s, device: sdb, kind: io_error }}
      - {{ at: 20s, device: sdb, kind: io_error }}
      - {{ at: 30s, device: sdb, kind: io_error }}
    expect:
      - {{ at: 20s, workflow: disk-errors, params: {{ device: sdb, kind: io_error }} }}
  - name: wrongly expects two errors to be enough
    events:
      - {{ at: 0s, device: sdb, kind: io_error }}
      - {{ at: 10s, device: sdb, kind: io_error }}
      - {{ at: 70s, device: sdb, kind: io_error }}
      - {{ at: 80s, device: sdb, kind: io_error }}
      - {{ at: 90s, device: sdb, kind: io_error }}
    expect:
      - {{ at: 10s, workflow: disk-errors }}
"#
    );
    let set = check_str(&text, "disk.yaml").unwrap_or_else(|e| panic!("{e}"));
    let outcomes = run_tests(&set);
    assert_eq!(outcomes.len(), 2);
    assert_eq!(
        (outcomes[0].file.as_str(), outcomes[0].name.as_str()),
        ("disk.yaml", "three errors within a minute start a run")
    );
    assert_eq!(outcomes[0].failure, None, "the fourth error is inside the cooldown");
    assert_eq!(
        outcomes[1].failure.as_deref(),
        Some(
            "expected but not started: at 10s disk-errors {}\n\
             started but not expected: at 90s disk-errors {device=sdb, kind=io_error} (3 io_error on sdb within 1m)"
        )
    );
}

#[test]
fn a_test_case_about_a_workflow_with_a_mistake_reports_only_that_mistake() {
    let text = "workflows:\n  - name: w\n    trigger: { manual: true }\n    cooldown: soon\n    steps:\n      - { name: a, approve: {} }\ntests:\n  - name: t\n    expect: [ { at: 0s, workflow: w } ]\n  - name: u\n    expect: [ { at: 0s, workflow: v } ]\n";
    assert_eq!(
        errors(text),
        [
            "w.yaml:4:15: workflows[0].cooldown: `soon` is not a duration like 500ms, 1s, 5m, 2h",
            "w.yaml:11:35: tests[1].expect[0].workflow: no workflow is named `v` in this file; its workflows: w",
        ]
    );
    assert_eq!(
        errors("tests:\n  - name: t\n    expect: [ { at: 0s, workflow: v } ]\n"),
        ["w.yaml:3:35: tests[0].expect[0].workflow: no workflow is named `v` in this file; it has none"]
    );
}

#[test]
fn a_notify_step_must_tell_someone() {
    let text = manual(&[
        "{ name: a, notify: { message: hi } }",
        "{ name: b, notify: { message: hi, receivers: [] } }",
    ]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:5:28: workflows[0].steps[0].notify: tells no one: give it `receivers`, or the workflow `notify:`",
            "w.yaml:6:28: workflows[0].steps[1].notify: tells no one: give it `receivers`, or the workflow `notify:`",
        ]
    );
    // The workflow's receivers are a notify step's when it names none.
    let told = text.replace("    trigger:", "    notify: [ops]\n    trigger:");
    let set = check_str(&told, "w.yaml").unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = set.receivers.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ops"]);
}

#[test]
fn expectations_are_matched_to_runs_whichever_order_they_are_written_in() {
    // Two runs at the same time; the expectation that names no device must not take the one that the
    // expectation naming it needs.
    let text = "workflows:\n  - name: w\n    trigger: { hardware: { kind: io_error } }\n    steps:\n      - { name: a, approve: {} }\n\
                tests:\n  - name: both disks\n    events:\n      - { at: 0s, device: sdb, kind: io_error }\n      - { at: 0s, device: sdc, kind: io_error }\n    expect:\n      - { at: 0s, workflow: w }\n      - { at: 0s, workflow: w, params: { device: sdb } }\n";
    let set = check_str(text, "w.yaml").unwrap_or_else(|e| panic!("{e}"));
    let outcomes = run_tests(&set);
    assert_eq!(outcomes[0].failure, None);
}

#[test]
fn escalation_mistakes_are_located() {
    let text = manual(&[
        "{ name: a, approve: {}, on_failure: { escalate: nope } }",
        "{ name: b, approve: {}, on_failure: { escalate: c } }",
        "{ name: c, approve: {}, after: [a], on_failure: { escalate: b } }",
        "{ name: d, approve: {}, on_failure: { escalate: d } }",
    ]);
    assert_eq!(
        errors(&text),
        [
            "w.yaml:5:45: workflows[0].steps[0].on_failure.escalate: no step is named `nope` in this workflow; \
             its steps: a, b, c, d",
            "w.yaml:6:45: workflows[0].steps[1].on_failure: escalations make a cycle: b -> c -> b (each \
             escalates to the next)",
            "w.yaml:7:40: workflows[0].steps[2].after: `c` is an escalation step (`b` escalates to it): it runs \
             only in place of a failed step, so it takes no `after:`",
            "w.yaml:8:45: workflows[0].steps[3].on_failure: a step cannot escalate to itself",
        ]
    );
}

proptest::proptest! {
    /// Whatever an edit does to a valid file, reading it answers (a set or located mistakes), never panics,
    /// and every mistake points into the text.
    #[test]
    fn any_edit_of_a_valid_file_is_answered_with_located_mistakes(
        edits in proptest::collection::vec((0usize..2000, proptest::sample::select(vec![
            "", " ", "\n", ":", "-", "{", "}", "[", "]", ",", "after: [x]", "{device}", "{nope}", "0s", "name: a",
            "retries: 101", "escalate", "cordon: {}", "\"", "#",
        ])), 1..6),
        cut in proptest::option::of(0usize..2000),
    ) {
        let mut text = DISK_ERRORS.to_string();
        for (at, piece) in edits {
            let at = at % (text.len() + 1);
            if text.is_char_boundary(at) {
                text.insert_str(at, piece);
            }
        }
        if let Some(cut) = cut.map(|c| c % (text.len() + 1)).filter(|c| text.is_char_boundary(*c)) {
            text.truncate(cut);
        }
        let lines = text.lines().count() as u64 + 1;
        match check_str(&text, "w.yaml") {
            Ok(set) => proptest::prop_assert_eq!(set.workflows.len(), set.named_at.len()),
            Err(WorkflowError::Invalid { issues, .. }) => {
                proptest::prop_assert!(!issues.is_empty());
                for i in &issues {
                    proptest::prop_assert!(i.line <= lines, "{i} beyond the text's {lines} lines");
                }
            }
            Err(e) => proptest::prop_assert!(false, "{e}"),
        }
    }
}

#[test]
fn wait_for_reads_the_kernels_metrics_not_the_brokers_signals() {
    let text = manual(&["{ name: calm, wait_for: { metric: requests_per_s, below: 1, for: 1m } }"]);
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("w.yaml:5:43: workflows[0].steps[0].wait_for.metric: unknown metric `requests_per_s`; expected one of cpu_cores,"), "{e:?}");
    assert!(e[0].ends_with("io_pressure_avg10"), "{e:?}");
    let ok = manual(&["{ name: calm, wait_for: { metric: cpu_cores, below: 1, for: 1m } }"]);
    assert!(check_str(&ok, "w.yaml").is_ok());
}
