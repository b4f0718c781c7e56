use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use vigil_core::snapshot::{InstanceKind, InstanceSnapshot, Snapshot};

use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn inst(service: &str, id: &str, cpu: f64) -> InstanceSnapshot {
    let mut i = InstanceSnapshot {
        service: Arc::from(service),
        instance_id: Arc::from(id),
        kind: InstanceKind::Managed,
        cgroup: Arc::from(format!("/vigil/{service}/{id}")),
        cgroup_id: None,
        memcg_id: None,
        counters: Default::default(),
        rates: Default::default(),
        memory: Default::default(),
        pressure: Default::default(),
    };
    i.rates.cpu_cores = cpu;
    i
}

fn snap(instances: Vec<InstanceSnapshot>) -> Snapshot {
    let mut s = Snapshot::empty();
    s.instances = instances;
    s
}

fn idle_rule(hold_for: u64, cooldown: u64, max_fraction: Option<f64>) -> Rule {
    Rule {
        name: Arc::from("idle"),
        select: Selector::default(),
        when: vec![Condition::Metric {
            metric: Metric::CpuCores,
            bounds: Bounds { below: Some(0.01), ..Bounds::default() },
        }],
        hold_for: secs(hold_for),
        action: Action::Hibernate,
        cooldown: secs(cooldown),
        max_fraction,
        notify: Arc::default(),
        workflow: None,
    }
}

fn fired(e: &mut Evaluator, at: u64, s: &Snapshot) -> Vec<String> {
    e.observe(secs(at), s, &Signals::new()).into_iter().map(|p| p.instance_id.to_string()).collect()
}

#[test]
fn acts_once_the_condition_has_held_for_the_window() {
    let mut e = Evaluator::new(vec![idle_rule(300, 600, None)]);
    let idle = snap(vec![inst("echo", "echo-0", 0.001)]);
    for t in (0..300).step_by(10) {
        assert!(fired(&mut e, t, &idle).is_empty(), "at {t}s");
    }
    let p = e.observe(secs(300), &idle, &Signals::new());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].held_for, secs(300));
    assert_eq!((&*p[0].rule, p[0].action, &*p[0].service), ("idle", Action::Hibernate, "echo"));
}

#[test]
fn a_break_restarts_the_window() {
    let mut e = Evaluator::new(vec![idle_rule(60, 0, None)]);
    let idle = snap(vec![inst("echo", "echo-0", 0.0)]);
    let busy = snap(vec![inst("echo", "echo-0", 1.0)]);
    assert!(fired(&mut e, 0, &idle).is_empty());
    assert!(fired(&mut e, 50, &busy).is_empty());
    assert!(fired(&mut e, 60, &idle).is_empty());
    assert!(fired(&mut e, 119, &idle).is_empty());
    assert_eq!(fired(&mut e, 120, &idle), ["echo-0"]);
}

#[test]
fn cooldown_and_window_both_gate_the_next_proposal() {
    let mut e = Evaluator::new(vec![idle_rule(10, 30, None)]);
    let idle = snap(vec![inst("echo", "echo-0", 0.0)]);
    let times: Vec<u64> = (0..=100).filter(|&t| !fired(&mut e, t, &idle).is_empty()).collect();
    assert_eq!(times, [10, 40, 70, 100]);
    // With no cooldown, each proposal still needs a fresh window.
    let mut e = Evaluator::new(vec![idle_rule(10, 0, None)]);
    let times: Vec<u64> = (0..=35).filter(|&t| !fired(&mut e, t, &idle).is_empty()).collect();
    assert_eq!(times, [10, 20, 30]);
}

#[test]
fn max_fraction_limits_a_service_and_rounds_up_to_at_least_one() {
    let mut e = Evaluator::new(vec![idle_rule(0, 60, Some(0.5))]);
    let s = snap(vec![
        inst("api", "api-0", 0.0),
        inst("api", "api-1", 0.0),
        inst("api", "api-2", 0.0),
        inst("solo", "solo-0", 0.0),
    ]);
    // ⌈0.5 × 3⌉ = 2 of api, ⌈0.5 × 1⌉ = 1 of solo.
    assert_eq!(fired(&mut e, 0, &s), ["api-0", "api-1", "solo-0"]);
    assert!(fired(&mut e, 30, &s).is_empty());
    // The budget frees when the cooldown of the earlier proposals ends.
    let again = fired(&mut e, 60, &s);
    assert_eq!(again.iter().filter(|i| i.starts_with("api-")).count(), 2, "{again:?}");
    assert!(again.contains(&"solo-0".to_string()));
}

#[test]
fn budget_counts_binary_fractions_exactly() {
    assert_eq!(eval_budget(Some(0.3), 10), 3);
    assert_eq!(eval_budget(Some(0.5), 4), 2);
    assert_eq!(eval_budget(Some(0.01), 3), 1);
    assert_eq!(eval_budget(Some(1.0), 7), 7);
}

fn eval_budget(f: Option<f64>, n: usize) -> usize {
    // Observed through the evaluator: n idle instances of one service, no window, long cooldown.
    let mut e = Evaluator::new(vec![idle_rule(0, 3600, f)]);
    let s = snap((0..n).map(|i| inst("svc", &format!("i-{i:02}"), 0.0)).collect());
    fired(&mut e, 0, &s).len()
}

#[test]
fn vanished_instances_are_forgotten_but_their_cooldown_is_not() {
    let mut e = Evaluator::new(vec![idle_rule(10, 100, None)]);
    let both = snap(vec![inst("echo", "echo-0", 0.0), inst("echo", "echo-1", 0.0)]);
    let one = snap(vec![inst("echo", "echo-1", 0.0)]);
    assert!(fired(&mut e, 0, &both).is_empty());
    assert_eq!(e.tracked(), 2);
    assert!(fired(&mut e, 5, &one).is_empty());
    assert_eq!(e.tracked(), 1);
    // echo-0 returns: its window starts over.
    assert_eq!(fired(&mut e, 10, &both), ["echo-1"]);
    assert!(fired(&mut e, 19, &both).is_empty());
    assert_eq!(fired(&mut e, 20, &both), ["echo-0"]);
    // echo-1 vanishes and returns within its cooldown: still cooling down.
    assert!(fired(&mut e, 21, &snap(vec![])).is_empty());
    assert_eq!(e.tracked(), 0);
    let times: Vec<u64> =
        (22..=120).filter(|&t| fired(&mut e, t, &both).contains(&"echo-1".into())).collect();
    assert_eq!(times, [110]);
}

#[test]
fn signals_and_state_drive_wake_and_missing_values_never_hold() {
    let wake = Rule {
        name: Arc::from("wake"),
        select: Selector { service: Some(Glob::new("echo").unwrap()), ..Selector::default() },
        when: vec![
            Condition::State(vec![InstanceState::Hibernated]),
            Condition::Metric {
                metric: Metric::Signal(Signal::QueuedRequests),
                bounds: Bounds { above: Some(0.0), ..Bounds::default() },
            },
        ],
        hold_for: Duration::ZERO,
        action: Action::Wake,
        cooldown: secs(5),
        max_fraction: None,
        notify: Arc::default(),
        workflow: None,
    };
    let mut e = Evaluator::new(vec![wake]);
    let s = snap(vec![inst("echo", "echo-0", 0.0), inst("other", "other-0", 0.0)]);
    let mut signals = Signals::new();
    assert!(e.observe(secs(0), &s, &signals).is_empty(), "no state, no signal");
    signals.set_state("echo-0", InstanceState::Hibernated);
    signals.set_state("other-0", InstanceState::Hibernated);
    assert!(e.observe(secs(1), &s, &signals).is_empty(), "no signal");
    signals.set("echo-0", Signal::QueuedRequests, 0.0);
    assert!(e.observe(secs(2), &s, &signals).is_empty(), "nothing queued");
    signals.set("echo-0", Signal::QueuedRequests, 2.0);
    signals.set("other-0", Signal::QueuedRequests, 2.0);
    signals.set("gone-0", Signal::QueuedRequests, 2.0);
    let p = e.observe(secs(3), &s, &signals);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((&*p[0].instance_id, p[0].action), ("echo-0", Action::Wake));
}

#[test]
fn a_file_with_several_mistakes_reports_them_all() {
    let text = "\
rules:
  - name: idle
    select: { service: \"echo-[0-9\" }
    when:
      - metric: cpu_core
        below: 0.01
      - metric: cpu_cores
    for: 5 minutes
    action: sleep
    max_fraction: 1.5
  - name: idle
    when: []
    action: wake
tests:
  - name: case
    steps:
      - at: 0s
        set:
          echo-0: { cpu_cores: 0, colour: blue }
    expect:
      - { at: 1s, rule: nope, instance_id: echo-0, action: wake }
";
    let err = check_str(text, "bad.yaml").unwrap_err().to_string();
    let m = "cpu_cores, minor_faults_per_s, major_faults_per_s, swap_in_pages_per_s, swap_out_pages_per_s, \
             runqueue_delay_mean_seconds, memory_resident_bytes, memory_swap_bytes, cpu_pressure_avg10, \
             memory_pressure_avg10, io_pressure_avg10, requests_per_s, queued_requests, inflight_requests";
    assert_eq!(
        err,
        format!(
            "bad.yaml:3:24: rules[0].select.service: unclosed `[` in glob `echo-[0-9`\n\
             bad.yaml:5:17: rules[0].when[0].metric: unknown metric `cpu_core`; expected one of {m}\n\
             bad.yaml:7:9: rules[0].when[1]: give at least one of above, below, at_least, at_most\n\
             bad.yaml:8:10: rules[0].for: `5 minutes` has no unit: write it as 500ms, 1s, 5m or 2h\n\
             bad.yaml:9:13: rules[0].action: unknown action `sleep`; expected one of hibernate, wake, restart, notify, stop, start, workflow\n\
             bad.yaml:10:19: rules[0].max_fraction: 1.5 is outside (0, 1]\n\
             bad.yaml:11:11: rules[1].name: `idle` is already the name of a rule\n\
             bad.yaml:12:11: rules[1].when: a rule needs at least one condition\n\
             bad.yaml:19:11: tests[0].steps[0].set.echo-0: instance `echo-0` appears here first and needs a `service`\n\
             bad.yaml:19:35: tests[0].steps[0].set.echo-0.colour: unknown key `colour`; expected service, state or a metric ({m})\n\
             bad.yaml:21:25: tests[0].expect[0].rule: no rule is named `nope` in this file"
        )
    );
}

#[test]
fn a_type_error_stops_at_the_first_with_its_position() {
    let err =
        check_str("rules:\n  - name: x\n    when: []\n    action: wake\n    max_fraction: half\n", "t.yaml")
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("t.yaml:5:19: rules[0].max_fraction: "), "{err}");
    let err = check_str("rules:\n  - name: x\n    actoin: wake\n", "t.yaml").unwrap_err().to_string();
    assert!(err.starts_with("t.yaml:3:5: rules[0].actoin: unknown field `actoin`"), "{err}");
}

#[test]
fn a_valid_file_parses_to_rules_and_tests() {
    let text = "\
rules:
  - name: restart-thrashing
    select: { service: \"api-*\", instance_id: \"*\", kind: [managed, systemd] }
    when:
      - metric: major_faults_per_s
        at_least: 100
      - metric: memory_pressure_avg10
        above: 20
    for: 1m
    action: restart
    cooldown: 15m
    max_fraction: 0.25
";
    let set = check_str(text, "ok.yaml").unwrap();
    assert_eq!(set.rules.len(), 1);
    let r = &set.rules[0];
    assert_eq!(
        (&*r.name, r.action, r.hold_for, r.cooldown),
        ("restart-thrashing", Action::Restart, secs(60), secs(900))
    );
    assert_eq!(r.max_fraction, Some(0.25));
    assert!(r.select.matches("api-eu", "x", InstanceKind::SystemdUnit));
    assert!(!r.select.matches("api-eu", "x", InstanceKind::Container));
    assert!(!r.select.matches("web", "x", InstanceKind::Managed));
    assert!(set.tests.is_empty());
}

#[test]
fn a_failing_case_says_what_differed() {
    let text = "\
rules:
  - name: idle
    when: [{ metric: cpu_cores, below: 0.01 }]
    for: 10s
    action: hibernate
tests:
  - name: wrong
    until: 12s
    steps:
      - at: 0s
        set: { a: { service: s, cpu_cores: 0 } }
    expect:
      - { at: 11s, rule: idle, instance_id: a, action: hibernate }
";
    let set = check_str(text, "f.yaml").unwrap();
    let outcomes = run_tests(&set);
    assert_eq!(
        outcomes[0].failure.as_deref(),
        Some(
            "expected but not proposed: 11s idle a hibernate\nproposed but not expected: 10s idle a hibernate"
        )
    );
}

proptest! {
    /// Whatever the inputs, the evaluator does not panic, and every proposal comes after the condition has
    /// held at every observed tick for at least `for`, outside the cooldown and within the fraction.
    #[test]
    fn proposals_respect_window_cooldown_and_fraction(
        hold_for in 0u64..20,
        cooldown in 0u64..20,
        fraction in prop::option::of(0.05f64..=1.0),
        ticks in prop::collection::vec(
            (1u64..5, prop::collection::vec(prop::option::of(prop_oneof![Just(0.0), Just(0.5), Just(f64::NAN), 0.0f64..0.02]), 4)),
            1..80,
        ),
    ) {
        let mut e = Evaluator::new(vec![idle_rule(hold_for, cooldown, fraction)]);
        let mut at = 0u64;
        // instance -> start of its current run of holding ticks
        let mut run_start: [Option<u64>; 4] = [None; 4];
        let mut last_proposal: [Option<u64>; 4] = [None; 4];
        let mut recent: Vec<(u64, usize)> = Vec::new();
        for (step, cpus) in ticks {
            at += step;
            let mut instances = Vec::new();
            for (i, cpu) in cpus.iter().enumerate() {
                match cpu {
                    Some(cpu) => {
                        instances.push(inst("svc", &format!("i-{i}"), *cpu));
                        if *cpu < 0.01 {
                            run_start[i].get_or_insert(at);
                        } else {
                            run_start[i] = None;
                        }
                    }
                    None => run_start[i] = None,
                }
            }
            let proposals = e.observe(secs(at), &snap(instances), &Signals::new());
            recent.retain(|&(t, _)| at < t + cooldown);
            for p in proposals {
                let i: usize = p.instance_id.trim_start_matches("i-").parse().unwrap();
                let start = run_start[i].expect("proposed for an instance whose condition does not hold");
                prop_assert!(at - start >= hold_for, "held {}s < for {}s", at - start, hold_for);
                if let Some(last) = last_proposal[i] {
                    prop_assert!(at - last >= cooldown && at - last >= hold_for, "again after {}s", at - last);
                }
                last_proposal[i] = Some(at);
                recent.push((at, i));
            }
            if let Some(f) = fraction {
                let present = cpus.iter().filter(|c| c.is_some()).count();
                let limit = ((f * present as f64 - 1e-9).ceil() as usize).max(1);
                let in_window = recent.iter().filter(|&&(t, _)| t == at).count();
                prop_assert!(in_window <= limit);
            }
            prop_assert!(e.tracked() <= 4);
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn an_alert_condition_holds_for_the_instances_the_alert_is_about() {
    let text = "rules:\n  - name: slow\n    when:\n      - alert: { name: \"HighRun*\", labels: { severity: critical } }\n    action: restart\n";
    let set = check_str(text, "a.yaml").unwrap();
    let mut e = Evaluator::new(set.rules);
    let world =
        snap(vec![inst("echo", "echo-0", 0.5), inst("echo", "echo-1", 0.5), inst("web", "web-0", 0.5)]);
    let mut fire = |alerts: Vec<std::collections::BTreeMap<String, String>>, at: u64| {
        let mut signals = Signals::new();
        signals.set_alerts(Arc::new(alerts.iter().map(crate::alerts::AlertFact::from_labels).collect()));
        let mut got: Vec<String> =
            e.observe(secs(at), &world, &signals).into_iter().map(|p| p.instance_id.to_string()).collect();
        got.sort();
        got
    };
    let crit = |extra: &[(&str, &str)]| {
        let mut l = labels(&[("alertname", "HighRunQueueDelay"), ("severity", "critical")]);
        l.extend(labels(extra));
        l
    };
    assert_eq!(fire(vec![crit(&[("instance_id", "echo-1")])], 0), vec!["echo-1"]);
    assert_eq!(fire(vec![crit(&[("service", "web")])], 1), vec!["web-0"]);
    assert_eq!(fire(vec![crit(&[])], 2), vec!["echo-0", "echo-1", "web-0"], "a host-wide alert");
    let warning =
        labels(&[("alertname", "HighRunQueueDelay"), ("severity", "warning"), ("instance_id", "echo-0")]);
    assert!(fire(vec![warning], 3).is_empty(), "every label must match");
    let other = labels(&[("alertname", "DiskFull"), ("severity", "critical")]);
    assert!(fire(vec![other], 4).is_empty(), "the name must match");
    assert!(fire(vec![], 5).is_empty());
}

fn notify_rule() -> Rule {
    let text = "rules:\n  - name: tell\n    when:\n      - metric: cpu_cores\n        above: 0.9\n    for: 2s\n    action: notify\n    notify: [ops]\n    labels: { severity: page }\n";
    check_str(text, "n.yaml").unwrap().rules.remove(0)
}

#[test]
fn a_notify_rule_fires_once_stays_firing_and_resolves_when_the_conditions_end() {
    let rule = notify_rule();
    assert_eq!(&*rule.notify.receivers, &[Arc::from("ops")]);
    assert_eq!(rule.notify.labels, labels(&[("severity", "page")]));
    let mut e = Evaluator::new(vec![rule]);
    let hot = snap(vec![inst("echo", "echo-0", 1.0)]);
    let cool = snap(vec![inst("echo", "echo-0", 0.1)]);
    assert!(fired(&mut e, 0, &hot).is_empty());
    assert!(fired(&mut e, 1, &hot).is_empty());
    assert_eq!(fired(&mut e, 2, &hot), vec!["echo-0"]);
    for t in 3..20 {
        assert!(fired(&mut e, t, &hot).is_empty(), "still firing at {t}s: nothing more to say");
    }
    assert!(e.take_ended().is_empty());
    assert_eq!(e.firing().len(), 1);
    assert!(fired(&mut e, 20, &cool).is_empty());
    let ended = e.take_ended();
    assert_eq!(ended.len(), 1);
    assert_eq!((&*ended[0].rule, &*ended[0].instance_id, &*ended[0].service), ("tell", "echo-0", "echo"));
    assert!(e.take_ended().is_empty(), "taken once");
    // It fires again after a new window, and vanishing resolves it too.
    assert!(fired(&mut e, 21, &hot).is_empty());
    assert_eq!(fired(&mut e, 23, &hot), vec!["echo-0"]);
    assert!(fired(&mut e, 24, &snap(vec![])).is_empty());
    assert_eq!(e.take_ended().len(), 1);
}

#[test]
fn firing_alerts_carry_over_into_new_rules_and_end_with_their_rule() {
    let mut e = Evaluator::new(vec![notify_rule()]);
    let hot = snap(vec![inst("echo", "echo-0", 1.0)]);
    for t in 0..=2 {
        fired(&mut e, t, &hot);
    }
    let firing = e.firing();
    let mut next = Evaluator::new(vec![notify_rule()]);
    assert!(next.seed_firing(firing.clone()).is_empty());
    assert!(fired(&mut next, 3, &hot).is_empty(), "already firing: not proposed again");
    assert!(fired(&mut next, 10, &hot).is_empty());
    let mut without = Evaluator::new(vec![idle_rule(0, 0, None)]);
    let gone = without.seed_firing(firing.clone());
    assert_eq!(gone.len(), 1, "its rule is gone: it has ended");
    // After a restart the instance may take a while to appear: it is waited for, then seen not holding.
    let mut restarted = Evaluator::new(vec![notify_rule()]);
    restarted.seed_firing(firing.clone());
    for t in 0..30 {
        fired(&mut restarted, t, &snap(vec![]));
        assert!(restarted.take_ended().is_empty(), "still waiting for echo-0 at tick {t}");
    }
    fired(&mut restarted, 30, &snap(vec![inst("echo", "echo-0", 0.1)]));
    assert_eq!(restarted.take_ended().len(), 1, "seen, not holding: resolved");
    let mut never = Evaluator::new(vec![notify_rule()]);
    never.seed_firing(firing);
    for t in 0..=30 {
        fired(&mut never, t, &snap(vec![]));
    }
    assert_eq!(never.take_ended().len(), 1, "never seen: resolved after the grace");
}

#[test]
fn notify_and_alert_mistakes_are_located() {
    let text = "rules:\n  - name: a\n    when:\n      - alert: {}\n    action: notify\n  - name: b\n    when:\n      - alert: { name: x, labels: { 9bad: y } }\n        metric: cpu_cores\n    action: restart\n    notify: [ops, ops]\n    labels: { \"bad-name\": v }\n  - name: c\n    when:\n      - state: [active]\n    action: notify\n    notify: []\n";
    let err = check_str(text, "m.yaml").unwrap_err().to_string();
    assert_eq!(
        err,
        "m.yaml:4:16: rules[0].when[0].alert: give a `name` or `labels` (or both) to say which alerts\n\
         m.yaml:5:13: rules[0].notify: `action: notify` needs `notify: [receivers]` (names from the config's notify.receivers)\n\
         m.yaml:8:9: rules[1].when[0]: an `alert` condition stands alone: give `metric`, `state` or `alert` in each entry\n\
         m.yaml:11:19: rules[1].notify[1]: `ops` is named twice\n\
         m.yaml:12:15: rules[1].labels.bad-name: `bad-name` is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)\n\
         m.yaml:17:13: rules[2].notify: `action: notify` needs at least one receiver"
    );
}

#[test]
fn test_cases_can_set_incoming_alerts() {
    let text = "rules:\n  - name: slow\n    when:\n      - alert: { name: HighRunQueueDelay }\n    for: 2s\n    action: restart\n    cooldown: 1m\ntests:\n  - name: restarts after the alert fired for two seconds\n    steps:\n      - at: 0s\n        set: { echo-0: { service: echo, state: active } }\n      - at: 3s\n        alerts: [ { alertname: HighRunQueueDelay, instance_id: echo-0 } ]\n      - at: 10s\n        alerts: []\n    until: 12s\n    expect:\n      - { at: 5s, rule: slow, instance_id: echo-0, action: restart }\n";
    let set = check_str(text, "t.yaml").unwrap();
    let outcomes = run_tests(&set);
    assert!(outcomes.iter().all(TestOutcome::passed), "{outcomes:?}");
}

#[test]
fn receivers_the_config_does_not_know_are_located() {
    let text = "rules:\n  - name: tell\n    when:\n      - state: [failed]\n    action: notify\n    notify: [ops, pager]\n";
    let set = check_str(text, "r.yaml").unwrap();
    assert!(check_receivers(&set, &["ops".into(), "pager".into()]).is_ok());
    let err = check_receivers(&set, &["ops".into(), "am".into()]).unwrap_err().to_string();
    assert_eq!(
        err,
        "r.yaml:6:19: rules[0].notify[1]: no receiver `pager` in the config's notify.receivers (configured: ops, am)"
    );
    let err = check_receivers(&set, &[]).unwrap_err().to_string();
    assert!(err.ends_with("(none is configured)"), "{err}");
}

#[test]
fn a_workflow_rule_names_its_workflow_and_mistakes_are_located() {
    let ok = "rules:\n  - name: disk\n    when:\n      - state: [active]\n    action: workflow\n    workflow: disk-errors\n";
    let rule = check_str(ok, "w.yaml").unwrap().rules.remove(0);
    assert_eq!(rule.action, Action::Workflow);
    assert_eq!(rule.workflow.as_deref(), Some("disk-errors"));
    let text = "rules:\n  - name: a\n    when:\n      - state: [active]\n    action: workflow\n  - name: b\n    when:\n      - state: [active]\n    action: restart\n    workflow: disk-errors\n  - name: c\n    when:\n      - state: [active]\n    action: workflow\n    workflow: \" \"\n";
    let err = check_str(text, "w.yaml").unwrap_err().to_string();
    assert_eq!(
        err,
        "w.yaml:5:13: rules[0].workflow: `action: workflow` needs `workflow: NAME` (a workflow of the config's workflow files)\n\
         w.yaml:10:15: rules[1].workflow: `workflow:` goes with `action: workflow` only\n\
         w.yaml:15:15: rules[2].workflow: a workflow needs a name"
    );
}
