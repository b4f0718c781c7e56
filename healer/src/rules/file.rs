//! Reading and validating rule files: serde-saphyr for the shape (the first YAML or type error, with its
//! position), then one pass that collects every semantic mistake as `file:line:column: key.path: message`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;
use vigil_core::snapshot::InstanceKind;
use vigil_core::yaml::from_yaml;

use super::{
    Action, AlertCondition, Bounds, Condition, ExpectedAction, Glob, InstanceState, Metric, ReceiverRef,
    Rule, RuleNotify, RuleSet, Selector, TestCase, TestStep, TestValues,
};
use crate::located::{Issues, by_position, label_name_ok, names, unknown_receivers};

/// The most ticks one test case may run (a typo like `every: 1ms` with `until: 1h` would run for long).
const MAX_TEST_TICKS: u128 = 100_000;

/// What is wrong with a rule file.
pub type RulesError = crate::located::FileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    tests: Vec<RawTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    select: RawSelect,
    when: Spanned<Vec<Spanned<RawCondition>>>,
    #[serde(rename = "for")]
    hold_for: Option<Spanned<String>>,
    action: Spanned<String>,
    cooldown: Option<Spanned<String>>,
    max_fraction: Option<Spanned<f64>>,
    notify: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    labels: HashMap<Spanned<String>, Spanned<String>>,
    workflow: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelect {
    service: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
    kind: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    metric: Option<Spanned<String>>,
    state: Option<Vec<Spanned<String>>>,
    above: Option<Spanned<f64>>,
    below: Option<Spanned<f64>>,
    at_least: Option<Spanned<f64>>,
    at_most: Option<Spanned<f64>>,
    alert: Option<Spanned<RawAlertCondition>>,
}

/// An `alert:` condition as written; workflow triggers take the same shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlertCondition {
    name: Option<Spanned<String>>,
    #[serde(default)]
    labels: HashMap<Spanned<String>, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    every: Option<Spanned<String>>,
    until: Option<Spanned<String>>,
    #[serde(default)]
    steps: Vec<RawStep>,
    #[serde(default)]
    expect: Vec<RawExpect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: Spanned<String>,
    #[serde(default)]
    set: HashMap<Spanned<String>, HashMap<Spanned<String>, Spanned<Scalar>>>,
    #[serde(default)]
    remove: Vec<Spanned<String>>,
    alerts: Option<Vec<BTreeMap<String, String>>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(f64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    at: Spanned<String>,
    rule: Spanned<String>,
    instance_id: Spanned<String>,
    action: Spanned<String>,
}

fn kind_from_name(name: &str) -> Option<InstanceKind> {
    KINDS.into_iter().find(|k| k.as_str() == name)
}

const KINDS: [InstanceKind; 5] = [
    InstanceKind::Managed,
    InstanceKind::Kubernetes,
    InstanceKind::Container,
    InstanceKind::SystemdUnit,
    InstanceKind::Other,
];

/// Checks that every receiver `set`'s rules name is one of `known` (the config's `notify.receivers`);
/// the mistakes are located where the rules name them.
pub fn check_receivers(set: &RuleSet, known: &[String]) -> Result<(), RulesError> {
    let issues = unknown_receivers(&set.file, &set.receivers, known);
    if issues.is_empty() { Ok(()) } else { Err(RulesError::Invalid { file: set.file.clone(), issues }) }
}

/// Reads and validates the rule file at `path`.
pub fn check_file(path: &Path) -> Result<RuleSet, RulesError> {
    let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
        what: "rule",
        path: path.to_path_buf(),
        source,
    })?;
    check_str(&text, &path.display().to_string())
}

/// Parses and validates `text`; `file` names it in errors and in the [`RuleSet`].
pub fn check_str(text: &str, file: &str) -> Result<RuleSet, RulesError> {
    let invalid = |issues| RulesError::Invalid { file: file.to_string(), issues };
    if text.trim().is_empty() {
        return Ok(RuleSet {
            file: file.to_string(),
            rules: Vec::new(),
            tests: Vec::new(),
            receivers: Vec::new(),
        });
    }
    let raw: RawFile = from_yaml(text, file).map_err(|issue| invalid(vec![issue]))?;
    let mut issues = Issues::default();
    let (rules, receivers) = validate_rules(&raw.rules, &mut issues);
    let tests = validate_tests(&raw.tests, &rules, &mut issues);
    let issues = issues.finish(file);
    if issues.is_empty() {
        Ok(RuleSet { file: file.to_string(), rules, tests, receivers })
    } else {
        Err(invalid(issues))
    }
}

fn validate_rules(raw: &[RawRule], issues: &mut Issues) -> (Vec<Rule>, Vec<ReceiverRef>) {
    let mut rules = Vec::new();
    let mut receivers = Vec::new();
    let mut seen = HashSet::new();
    for (i, r) in raw.iter().enumerate() {
        let p = format!("rules[{i}]");
        let mut ok = true;
        if r.name.value.trim().is_empty() {
            issues.at(&r.name, format!("{p}.name"), "a rule needs a name");
            ok = false;
        } else if !seen.insert(r.name.value.as_str()) {
            issues.at(
                &r.name,
                format!("{p}.name"),
                format!("`{}` is already the name of a rule", r.name.value),
            );
            ok = false;
        }
        let service = issues.glob(&r.select.service, &format!("{p}.select.service"));
        let instance_id = issues.glob(&r.select.instance_id, &format!("{p}.select.instance_id"));
        ok &= r.select.service.is_none() || service.is_some();
        ok &= r.select.instance_id.is_none() || instance_id.is_some();
        let kinds = r.select.kind.as_ref().map(|kinds| {
            let mut out = Vec::new();
            for (k, s) in kinds.iter().enumerate() {
                match kind_from_name(&s.value) {
                    Some(kind) => out.push(kind),
                    None => {
                        ok = false;
                        issues.at(
                            s,
                            format!("{p}.select.kind[{k}]"),
                            format!(
                                "unknown kind `{}`; expected one of {}",
                                s.value,
                                names(&KINDS, InstanceKind::as_str)
                            ),
                        );
                    }
                }
            }
            out
        });
        if r.when.value.is_empty() {
            ok = false;
            issues.at(&r.when, format!("{p}.when"), "a rule needs at least one condition");
        }
        let mut when = Vec::new();
        for (c, cond) in r.when.value.iter().enumerate() {
            match condition(cond, &format!("{p}.when[{c}]"), issues) {
                Some(cond) => when.push(cond),
                None => ok = false,
            }
        }
        let hold_for = match &r.hold_for {
            Some(s) => issues.duration(s, &format!("{p}.for")),
            None => Some(Duration::ZERO),
        };
        let cooldown = match &r.cooldown {
            Some(s) => issues.duration(s, &format!("{p}.cooldown")),
            None => Some(Duration::ZERO),
        };
        let action = Action::from_name(&r.action.value);
        if action.is_none() {
            issues.at(
                &r.action,
                format!("{p}.action"),
                format!(
                    "unknown action `{}`; expected one of {}",
                    r.action.value,
                    names(&Action::ALL, Action::as_str)
                ),
            );
        }
        let mut max_fraction = None;
        if let Some(f) = &r.max_fraction {
            if f.value > 0.0 && f.value <= 1.0 {
                max_fraction = Some(f.value);
            } else {
                ok = false;
                issues.at(f, format!("{p}.max_fraction"), format!("{} is outside (0, 1]", f.value));
            }
        }
        let mut notify = RuleNotify::default();
        match &r.notify {
            Some(list) => {
                let mut named = HashSet::new();
                for (k, name) in list.value.iter().enumerate() {
                    let np = format!("{p}.notify[{k}]");
                    if name.value.trim().is_empty() {
                        ok = false;
                        issues.at(name, np, "a receiver needs a name");
                    } else if !named.insert(name.value.as_str()) {
                        ok = false;
                        issues.at(name, np, format!("`{}` is named twice", name.value));
                    } else {
                        notify.receivers.push(Arc::from(name.value.as_str()));
                        receivers.push(ReceiverRef {
                            rule: Arc::from(r.name.value.as_str()),
                            name: name.value.clone(),
                            line: name.referenced.line(),
                            column: name.referenced.column(),
                            path: np,
                        });
                    }
                }
                if list.value.is_empty() && action == Some(Action::Notify) {
                    ok = false;
                    issues.at(list, format!("{p}.notify"), "`action: notify` needs at least one receiver");
                }
            }
            None if action == Some(Action::Notify) => {
                ok = false;
                issues.at(
                    &r.action,
                    format!("{p}.notify"),
                    "`action: notify` needs `notify: [receivers]` (names from the config's notify.receivers)",
                );
            }
            None => {}
        }
        let workflow = match (&r.workflow, action) {
            (Some(w), Some(Action::Workflow)) if w.value.trim().is_empty() => {
                ok = false;
                issues.at(w, format!("{p}.workflow"), "a workflow needs a name");
                None
            }
            (Some(w), Some(Action::Workflow)) => Some(Arc::from(w.value.as_str())),
            (None, Some(Action::Workflow)) => {
                ok = false;
                issues.at(
                    &r.action,
                    format!("{p}.workflow"),
                    "`action: workflow` needs `workflow: NAME` (a workflow of the config's workflow files)",
                );
                None
            }
            (Some(w), _) => {
                ok = false;
                issues.at(w, format!("{p}.workflow"), "`workflow:` goes with `action: workflow` only");
                None
            }
            (None, _) => None,
        };
        for (k, v) in by_position(&r.labels) {
            if !label_name_ok(&k.value) {
                ok = false;
                issues.at(
                    k,
                    format!("{p}.labels.{}", k.value),
                    format!("`{}` is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)", k.value),
                );
            } else {
                notify.labels.insert(k.value.clone(), v.value.clone());
            }
        }
        if let (true, Some(hold_for), Some(cooldown), Some(action)) = (ok, hold_for, cooldown, action) {
            rules.push(Rule {
                name: Arc::from(r.name.value.as_str()),
                select: Selector { service, instance_id, kinds },
                when,
                hold_for,
                action,
                cooldown,
                max_fraction,
                notify: Arc::new(notify),
                workflow,
            });
        }
    }
    (rules, receivers)
}

/// The alert condition written at `{p}.alert`, or `None` with its mistakes in `issues`.
pub(crate) fn alert_condition(
    a: &Spanned<RawAlertCondition>,
    p: &str,
    issues: &mut Issues,
) -> Option<AlertCondition> {
    let raw = &a.value;
    let name = match &raw.name {
        Some(n) => Some(Glob::new(&n.value).map_err(|m| issues.at(n, format!("{p}.alert.name"), m)).ok()?),
        None => None,
    };
    let mut labels = Vec::new();
    let mut ok = true;
    for (k, v) in by_position(&raw.labels) {
        if label_name_ok(&k.value) {
            labels.push((k.value.clone(), v.value.clone()));
        } else {
            ok = false;
            issues.at(
                k,
                format!("{p}.alert.labels.{}", k.value),
                format!("`{}` is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)", k.value),
            );
        }
    }
    if name.is_none() && labels.is_empty() {
        issues.at(a, format!("{p}.alert"), "give a `name` or `labels` (or both) to say which alerts");
        return None;
    }
    ok.then_some(AlertCondition { name, labels })
}

fn condition(c: &Spanned<RawCondition>, p: &str, issues: &mut Issues) -> Option<Condition> {
    let raw = &c.value;
    let bounds = Bounds {
        above: issues.finite(&raw.above, &format!("{p}.above")),
        below: issues.finite(&raw.below, &format!("{p}.below")),
        at_least: issues.finite(&raw.at_least, &format!("{p}.at_least")),
        at_most: issues.finite(&raw.at_most, &format!("{p}.at_most")),
    };
    let given = [&raw.above, &raw.below, &raw.at_least, &raw.at_most].iter().filter(|b| b.is_some()).count();
    let finite = [bounds.above, bounds.below, bounds.at_least, bounds.at_most].iter().flatten().count();
    if let Some(alert) = &raw.alert {
        if raw.metric.is_some() || raw.state.is_some() || given > 0 {
            issues.at(
                c,
                p,
                "an `alert` condition stands alone: give `metric`, `state` or `alert` in each entry",
            );
            return None;
        }
        return alert_condition(alert, p, issues).map(Condition::Alert);
    }
    match (&raw.metric, &raw.state) {
        (Some(_), Some(_)) => {
            issues.at(c, p, "give either `metric` or `state`, not both");
            None
        }
        (None, None) => {
            issues.at(c, p, "give `metric` (with a bound), `state` or `alert`");
            None
        }
        (None, Some(states)) => {
            if given > 0 {
                issues.at(c, p, "above, below, at_least and at_most apply to a `metric`, not to `state`");
                return None;
            }
            let mut out = Vec::new();
            for (k, s) in states.iter().enumerate() {
                match InstanceState::from_name(&s.value) {
                    Some(state) => out.push(state),
                    None => issues.at(
                        s,
                        format!("{p}.state[{k}]"),
                        format!(
                            "unknown state `{}`; expected one of {}",
                            s.value,
                            names(&InstanceState::ALL, InstanceState::as_str)
                        ),
                    ),
                }
            }
            (out.len() == states.len() && !out.is_empty()).then_some(Condition::State(out))
        }
        (Some(metric), None) => {
            let m = Metric::from_name(&metric.value);
            if m.is_none() {
                issues.at(
                    metric,
                    format!("{p}.metric"),
                    format!(
                        "unknown metric `{}`; expected one of {}",
                        metric.value,
                        names(&Metric::ALL, Metric::as_str)
                    ),
                );
            }
            if given == 0 {
                issues.at(c, p, "give at least one of above, below, at_least, at_most");
                return None;
            }
            (finite == given).then_some(())?;
            Some(Condition::Metric { metric: m?, bounds })
        }
    }
}

fn validate_tests(raw: &[RawTest], rules: &[Rule], issues: &mut Issues) -> Vec<TestCase> {
    let rule_names: HashSet<&str> = rules.iter().map(|r| &*r.name).collect();
    let mut tests = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        let p = format!("tests[{i}]");
        let before = issues.len();
        let every = match &t.every {
            Some(s) => issues.duration(s, &format!("{p}.every")),
            None => Some(Duration::from_secs(1)),
        };
        if let (Some(s), Some(Duration::ZERO)) = (&t.every, every) {
            issues.at(s, format!("{p}.every"), "the tick interval must be longer than 0s");
        }
        let mut steps = Vec::new();
        let mut known: HashSet<&str> = HashSet::new();
        let mut last_at = Duration::ZERO;
        for (s, step) in t.steps.iter().enumerate() {
            let sp = format!("{p}.steps[{s}]");
            let Some(at) = issues.duration(&step.at, &format!("{sp}.at")) else { continue };
            if at < last_at {
                issues.at(&step.at, format!("{sp}.at"), "steps must be in time order");
            }
            last_at = last_at.max(at);
            let mut set = Vec::new();
            let mut entries: Vec<_> = step.set.iter().collect();
            entries.sort_by_key(|(k, _)| (k.referenced.line(), k.referenced.column()));
            for (id, values) in entries {
                let vp = format!("{sp}.set.{}", id.value);
                let v = test_values(values, &vp, issues);
                if v.service.is_none() && !known.contains(id.value.as_str()) {
                    issues.at(
                        id,
                        vp.clone(),
                        format!("instance `{}` appears here first and needs a `service`", id.value),
                    );
                }
                known.insert(&id.value);
                set.push((Arc::from(id.value.as_str()), v));
            }
            let mut remove = Vec::new();
            for r in &step.remove {
                known.remove(r.value.as_str());
                remove.push(Arc::from(r.value.as_str()));
            }
            steps.push(TestStep { at, set, remove, alerts: step.alerts.clone() });
        }
        let mut expect = Vec::new();
        for (e, x) in t.expect.iter().enumerate() {
            let ep = format!("{p}.expect[{e}]");
            let at = issues.duration(&x.at, &format!("{ep}.at"));
            if !rule_names.contains(x.rule.value.as_str()) {
                issues.at(
                    &x.rule,
                    format!("{ep}.rule"),
                    format!("no rule is named `{}` in this file", x.rule.value),
                );
            }
            let action = Action::from_name(&x.action.value);
            if action.is_none() {
                issues.at(
                    &x.action,
                    format!("{ep}.action"),
                    format!(
                        "unknown action `{}`; expected one of {}",
                        x.action.value,
                        names(&Action::ALL, Action::as_str)
                    ),
                );
            }
            if let (Some(at), Some(action)) = (at, action) {
                if let Some(every) = every.filter(|e| !e.is_zero())
                    && at.as_nanos() % every.as_nanos() != 0
                {
                    issues.at(
                        &x.at,
                        format!("{ep}.at"),
                        format!("{:?} is not a tick: ticks fall every {every:?}", at),
                    );
                }
                expect.push(ExpectedAction {
                    at,
                    rule: Arc::from(x.rule.value.as_str()),
                    instance_id: Arc::from(x.instance_id.value.as_str()),
                    action,
                });
            }
        }
        let last = steps.iter().map(|s| s.at).chain(expect.iter().map(|e| e.at)).max().unwrap_or_default();
        let until = match &t.until {
            Some(s) => issues.duration(s, &format!("{p}.until")),
            None => Some(last),
        };
        if let (Some(every), Some(until)) = (every.filter(|e| !e.is_zero()), until)
            && until.as_nanos() / every.as_nanos() >= MAX_TEST_TICKS
        {
            let at = t.until.as_ref().or(t.every.as_ref()).unwrap_or(&t.name);
            issues.at(at, p.clone(), format!("runs more than {MAX_TEST_TICKS} ticks; raise `every`"));
        }
        if let (true, Some(every), Some(until)) = (issues.len() == before, every, until) {
            tests.push(TestCase { name: t.name.value.clone(), every, until, steps, expect });
        }
    }
    tests
}

fn test_values(raw: &HashMap<Spanned<String>, Spanned<Scalar>>, p: &str, issues: &mut Issues) -> TestValues {
    let mut out = TestValues::default();
    let mut entries: Vec<_> = raw.iter().collect();
    entries.sort_by_key(|(k, _)| (k.referenced.line(), k.referenced.column()));
    for (key, value) in entries {
        let kp = format!("{p}.{}", key.value);
        match (key.value.as_str(), &value.value) {
            ("service", Scalar::Text(s)) => out.service = Some(Arc::from(s.as_str())),
            ("state", Scalar::Text(s)) => match InstanceState::from_name(s) {
                Some(state) => out.state = Some(state),
                None => issues.at(
                    value,
                    kp,
                    format!(
                        "unknown state `{s}`; expected one of {}",
                        names(&InstanceState::ALL, InstanceState::as_str)
                    ),
                ),
            },
            ("service" | "state", Scalar::Number(n)) => {
                issues.at(value, kp, format!("expected a name, not {n}"))
            }
            (name, v) => match (Metric::from_name(name), v) {
                (Some(m), Scalar::Number(n)) => out.metrics.push((m, *n)),
                (Some(_), Scalar::Text(s)) => issues.at(value, kp, format!("expected a number, not `{s}`")),
                (None, _) => issues.at(
                    key,
                    kp,
                    format!(
                        "unknown key `{name}`; expected service, state or a metric ({})",
                        names(&Metric::ALL, Metric::as_str)
                    ),
                ),
            },
        }
    }
    out
}
