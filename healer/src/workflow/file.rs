//! Reading and validating workflow files: serde-saphyr for the shape (the first YAML or type error, with its
//! position), then one pass that collects every semantic mistake as `file:line:column: key.path: message`:
//! names, triggers, each step's kind and arguments, placeholders, and the graph the steps form (unknown
//! `after:` names, cycles, escalation steps), the last with petgraph.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;
use vigil_core::yaml::from_yaml;

use super::{
    Backoff, ExpectedRun, Glob, Health, OnFailure, Step, StepKind, Targets, TestAlert, TestCase, TestEvent,
    TestHealth, Trigger, WaitCondition, Workflow, WorkflowSet, Written, placeholders,
};
use crate::located::{Issues, ReceiverRef, by_position, label_name_ok, names, unknown_receivers};
use crate::rules::{Bounds, Metric, RawAlertCondition, alert_condition};

/// Steps in one workflow: a repair is a handful of steps; hundreds would be a generated file gone wrong.
pub const MAX_STEPS: usize = 100;
/// Retries of one step: beyond this a step is better split or given a longer timeout.
pub const MAX_RETRIES: u32 = 100;
/// The longest `within` of a hardware trigger and `for` of a `wait_for`: a day.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The most events a burst trigger counts (`at_least`): each device's history holds at most this many.
pub const MAX_AT_LEAST: u32 = 10_000;
/// Inputs (events, health changes, alerts) of one test case, to keep `vigil workflows test` fast.
pub const MAX_TEST_INPUTS: usize = 10_000;

/// The placeholders every workflow may use, whatever starts it.
const ALWAYS_KNOWN: [&str; 6] = ["cpu", "device", "instance_id", "run_id", "service", "workflow"];
/// Parameters Vigil sets itself, which `params:` cannot declare.
const SET_BY_VIGIL: [&str; 2] = ["run_id", "workflow"];

/// What is wrong with a workflow file.
pub type WorkflowError = crate::located::FileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    workflows: Vec<RawWorkflow>,
    #[serde(default)]
    tests: Vec<RawTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: Spanned<String>,
    trigger: Option<Spanned<RawTrigger>>,
    cooldown: Option<Spanned<String>>,
    #[serde(default)]
    params: HashMap<Spanned<String>, Spanned<Text>>,
    notify: Option<Spanned<Vec<Spanned<String>>>>,
    steps: Option<Spanned<Vec<Spanned<RawStep>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    hardware: Option<Spanned<RawHardware>>,
    alert: Option<Spanned<RawAlertCondition>>,
    manual: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHardware {
    kind: Option<Spanned<String>>,
    state: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    at_least: Option<Spanned<u32>>,
    within: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    after: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    backoff: Option<Spanned<RawBackoff>>,
    on_failure: Option<Spanned<RawOnFailure>>,
    idempotent: Option<Spanned<bool>>,
    cordon: Option<Spanned<RawResource>>,
    uncordon: Option<Spanned<RawResource>>,
    drain: Option<Spanned<RawDrain>>,
    evacuate: Option<Spanned<RawEvacuate>>,
    cpu_offline: Option<Spanned<RawCpu>>,
    cpu_online: Option<Spanned<RawCpu>>,
    restart: Option<Spanned<RawTargets>>,
    stop: Option<Spanned<RawTargets>>,
    hibernate: Option<Spanned<RawTargets>>,
    run: Option<Spanned<RawRun>>,
    notify: Option<Spanned<RawNotify>>,
    approve: Option<Spanned<RawApprove>>,
    wait_for: Option<Spanned<RawWaitFor>>,
}

/// The kind keys of a step, in the order the file format documents them.
const KINDS: [&str; 13] = [
    "cordon",
    "uncordon",
    "drain",
    "evacuate",
    "cpu_offline",
    "cpu_online",
    "restart",
    "stop",
    "hibernate",
    "run",
    "notify",
    "approve",
    "wait_for",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Option<Spanned<String>>,
    max: Option<Spanned<String>>,
}

/// `on_failure:` as written: a word, or `{ escalate: STEP }`.
enum RawOnFailure {
    Word(String),
    Escalate(String),
}

impl<'de> Deserialize<'de> for RawOnFailure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawOnFailure;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`abort`, `continue`, `escalate` or `{ escalate: STEP }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawOnFailure, E> {
                Ok(RawOnFailure::Word(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawOnFailure, A::Error> {
                let mut step = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "escalate" {
                        return Err(de::Error::unknown_field(&key, &["escalate"]));
                    }
                    step = Some(map.next_value::<String>()?);
                }
                step.map(RawOnFailure::Escalate).ok_or_else(|| de::Error::missing_field("escalate"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A scalar read as text, so `cpu: 3` and `cpu: "3"` (or a number among a command's arguments) are the same.
#[derive(Clone, Debug, PartialEq)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    resource: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargets {
    service: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    timeout: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvacuate {
    service: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
    restart: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCpu {
    cpu: Option<Spanned<Text>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    command: Option<Spanned<Vec<Spanned<Text>>>>,
    timeout: Option<Spanned<String>>,
    idempotent: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    receivers: Option<Spanned<Vec<Spanned<String>>>>,
    message: Option<Spanned<String>>,
    #[serde(default)]
    labels: HashMap<Spanned<String>, Spanned<Text>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprove {
    message: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWaitFor {
    device_health: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    metric: Option<Spanned<String>>,
    above: Option<Spanned<f64>>,
    below: Option<Spanned<f64>>,
    at_least: Option<Spanned<f64>>,
    at_most: Option<Spanned<f64>>,
    service: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
    #[serde(rename = "for")]
    hold: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    #[serde(default)]
    events: Vec<RawEvent>,
    #[serde(default)]
    health: Vec<RawHealthChange>,
    #[serde(default)]
    alerts: Vec<RawTestAlert>,
    #[serde(default)]
    expect: Vec<RawExpect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: Spanned<String>,
    device: Spanned<String>,
    kind: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthChange {
    at: Spanned<String>,
    device: Spanned<String>,
    state: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestAlert {
    at: Spanned<String>,
    until: Option<Spanned<String>>,
    labels: Spanned<HashMap<Spanned<String>, Spanned<Text>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    at: Spanned<String>,
    workflow: Spanned<String>,
    #[serde(default)]
    params: BTreeMap<String, Text>,
}

/// Reads and validates the workflow file at `path`.
pub fn check_file(path: &Path) -> Result<WorkflowSet, WorkflowError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkflowError::Read {
        what: "workflow",
        path: path.to_path_buf(),
        source,
    })?;
    check_str(&text, &path.display().to_string())
}

/// Parses and validates `text`; `file` names it in errors and in the [`WorkflowSet`].
pub fn check_str(text: &str, file: &str) -> Result<WorkflowSet, WorkflowError> {
    let invalid = |issues| WorkflowError::Invalid { file: file.to_string(), issues };
    let empty = || WorkflowSet {
        file: file.to_string(),
        workflows: Vec::new(),
        tests: Vec::new(),
        receivers: Vec::new(),
        named_at: Vec::new(),
    };
    if text.trim().is_empty() {
        return Ok(empty());
    }
    let raw: RawFile = from_yaml(text, file).map_err(|issue| invalid(vec![issue]))?;
    let mut issues = Issues::default();
    let mut set = empty();
    let mut seen = HashSet::new();
    for (i, w) in raw.workflows.iter().enumerate() {
        let p = format!("workflows[{i}]");
        if w.name.value.trim().is_empty() {
            issues.at(&w.name, format!("{p}.name"), "a workflow needs a name");
        } else if !seen.insert(w.name.value.as_str()) {
            issues.at(
                &w.name,
                format!("{p}.name"),
                format!("`{}` is already the name of a workflow in this file", w.name.value),
            );
        }
        if let Some(valid) = workflow(w, &p, file, &mut issues, &mut set.receivers) {
            set.workflows.push(valid);
            set.named_at.push(Written {
                line: w.name.referenced.line(),
                column: w.name.referenced.column(),
                path: format!("{p}.name"),
            });
        }
    }
    // Against every name written: a case about a workflow with a mistake is not about an unknown one.
    let mut written: Vec<&str> = Vec::new();
    for name in raw.workflows.iter().map(|w| w.name.value.as_str()) {
        if !name.trim().is_empty() && !written.contains(&name) {
            written.push(name);
        }
    }
    set.tests = tests(&raw.tests, &written, &mut issues);
    let issues = issues.finish(file);
    if issues.is_empty() { Ok(set) } else { Err(invalid(issues)) }
}

/// Checks that every receiver `set`'s workflows name is one of `known` (the config's `notify.receivers`);
/// the mistakes are located where the workflows name them.
pub fn check_receivers(set: &WorkflowSet, known: &[String]) -> Result<(), WorkflowError> {
    let issues = unknown_receivers(&set.file, &set.receivers, known);
    if issues.is_empty() { Ok(()) } else { Err(WorkflowError::Invalid { file: set.file.clone(), issues }) }
}

/// The placeholders a workflow's strings may use.
enum Known {
    /// An alert trigger: its labels are the parameters, and any label may be there.
    Any,
    Names(BTreeSet<String>),
}

impl Known {
    /// Reports each placeholder of `s` that is not known.
    fn check(&self, s: &Spanned<String>, path: &str, issues: &mut Issues) -> bool {
        self.check_text(s, &s.value, path, issues)
    }

    fn check_text<T>(&self, at: &Spanned<T>, text: &str, path: &str, issues: &mut Issues) -> bool {
        let Known::Names(known) = self else { return true };
        let mut ok = true;
        for name in placeholders(text) {
            if !known.contains(name) {
                ok = false;
                let list = known.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
                issues.at(at, path, format!("unknown placeholder `{{{name}}}`; known: {list}"));
            }
        }
        ok
    }
}

fn duration_or(
    s: &Option<Spanned<String>>,
    path: &str,
    default: Duration,
    issues: &mut Issues,
) -> Option<Duration> {
    match s {
        Some(s) => issues.duration(s, path),
        None => Some(default),
    }
}

/// A duration that must be above 0 (and at most `max`, when given).
fn positive(s: &Spanned<String>, path: &str, max: Option<Duration>, issues: &mut Issues) -> Option<Duration> {
    let d = issues.duration(s, path)?;
    if d.is_zero() {
        issues.at(s, path, "must be longer than 0s");
        return None;
    }
    if let Some(max) = max.filter(|m| d > *m) {
        issues.at(s, path, format!("{} is longer than the limit of {}", s.value, super::human(max)));
        return None;
    }
    Some(d)
}

/// `kind` of a hardware event: snake_case, as the hardware monitor names them (`io_error`, `memory_ce`).
fn kind_name_ok(kind: &str) -> bool {
    let mut chars = kind.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn health(s: &Spanned<String>, path: &str, issues: &mut Issues) -> Option<Health> {
    let h = Health::from_name(&s.value);
    if h.is_none() {
        issues.at(
            s,
            path,
            format!("unknown health `{}`; expected one of {}", s.value, names(&Health::ALL, Health::as_str)),
        );
    }
    h
}

/// The trigger, and the parameters it sets (beyond [`ALWAYS_KNOWN`]); `None` for alert triggers, which
/// set whatever labels the alert carries.
fn trigger(
    t: &Spanned<RawTrigger>,
    p: &str,
    issues: &mut Issues,
) -> Option<(Trigger, Option<Vec<&'static str>>)> {
    let raw = &t.value;
    let p = format!("{p}.trigger");
    let given = raw.hardware.is_some() as u8 + raw.alert.is_some() as u8 + raw.manual.is_some() as u8;
    if given != 1 {
        issues.at(t, &p, "give exactly one of `hardware`, `alert` or `manual: true`");
        return None;
    }
    if let Some(m) = &raw.manual {
        if !m.value {
            issues.at(m, format!("{p}.manual"), "`manual: false` starts nothing: write `manual: true`");
            return None;
        }
        return Some((Trigger::Manual, Some(Vec::new())));
    }
    if let Some(a) = &raw.alert {
        return alert_condition(a, &p, issues).map(|c| (Trigger::Alert(c), None));
    }
    let h = raw.hardware.as_ref()?;
    let hp = format!("{p}.hardware");
    let hw = &h.value;
    let before = issues.len();
    let device = issues.glob(&hw.device, &format!("{hp}.device"));
    match (&hw.kind, &hw.state) {
        (Some(_), Some(_)) | (None, None) => {
            issues.at(h, &hp, "give either `kind` (a burst of events) or `state` (a health change)");
            None
        }
        (None, Some(state)) => {
            let message = "`at_least` and `within` count events of a `kind`, not a `state`";
            if let Some(s) = &hw.at_least {
                issues.at(s, format!("{hp}.at_least"), message);
            } else if let Some(s) = &hw.within {
                issues.at(s, format!("{hp}.within"), message);
            }
            let state = health(state, &format!("{hp}.state"), issues);
            (issues.len() == before).then_some(())?;
            Some((Trigger::HardwareState { state: state?, device }, Some(vec!["state"])))
        }
        (Some(kind), None) => {
            if !kind_name_ok(&kind.value) {
                issues.at(
                    kind,
                    format!("{hp}.kind"),
                    format!("`{}` is not an event kind (snake_case: [a-z][a-z0-9_]*)", kind.value),
                );
            }
            let at_least = hw.at_least.as_ref().map_or(1, |s| s.value);
            if let Some(s) = &hw.at_least
                && !(1..=MAX_AT_LEAST).contains(&s.value)
            {
                issues.at(s, format!("{hp}.at_least"), format!("{} is outside 1..={MAX_AT_LEAST}", s.value));
            }
            let within = match &hw.within {
                Some(s) => positive(s, &format!("{hp}.within"), Some(MAX_WINDOW), issues),
                None => Some(Duration::from_secs(60)),
            };
            (issues.len() == before).then_some(())?;
            Some((
                Trigger::HardwareEvents {
                    kind: Arc::from(kind.value.as_str()),
                    device,
                    at_least,
                    within: within?,
                },
                Some(vec!["kind"]),
            ))
        }
    }
}

fn workflow(
    w: &RawWorkflow,
    p: &str,
    file: &str,
    issues: &mut Issues,
    receivers: &mut Vec<ReceiverRef>,
) -> Option<Workflow> {
    let before = issues.len();
    let name: Arc<str> = Arc::from(w.name.value.as_str());
    let trigger = match &w.trigger {
        Some(t) => trigger(t, p, issues),
        None => {
            issues.at(
                &w.name,
                format!("{p}.trigger"),
                "a workflow needs a `trigger`: hardware, alert or manual: true",
            );
            None
        }
    };
    let cooldown = duration_or(&w.cooldown, &format!("{p}.cooldown"), Duration::ZERO, issues);
    let mut params = BTreeMap::new();
    for (k, v) in by_position(&w.params) {
        let kp = format!("{p}.params.{}", k.value);
        if !label_name_ok(&k.value) {
            issues.at(k, kp, format!("`{}` is not a parameter name ([a-zA-Z_][a-zA-Z0-9_]*)", k.value));
        } else if SET_BY_VIGIL.contains(&k.value.as_str()) {
            issues.at(k, kp, format!("`{}` is set by Vigil for each run; it is not a parameter", k.value));
        } else {
            params.insert(k.value.clone(), v.value.0.clone());
        }
    }
    let known = match trigger.as_ref().map(|(_, set)| set) {
        Some(None) => Known::Any,
        Some(Some(extra)) => Known::Names(
            ALWAYS_KNOWN.iter().chain(extra).map(|s| s.to_string()).chain(params.keys().cloned()).collect(),
        ),
        // The trigger is wrong already: placeholders are not checked against a guess.
        None => Known::Any,
    };
    let notify = receiver_list(&w.notify, &format!("{p}.notify"), &name, issues, receivers);
    let steps = match &w.steps {
        Some(steps) if steps.value.is_empty() => {
            issues.at(steps, format!("{p}.steps"), "a workflow needs at least one step");
            None
        }
        Some(steps) if steps.value.len() > MAX_STEPS => {
            issues.at(
                steps,
                format!("{p}.steps"),
                format!("{} steps are more than the limit of {MAX_STEPS}", steps.value.len()),
            );
            None
        }
        Some(steps) => self::steps(steps, p, &name, &known, issues, receivers),
        None => {
            issues.at(&w.name, format!("{p}.steps"), "a workflow needs `steps:`");
            None
        }
    };
    // A `notify` step without receivers tells the workflow's; with neither it would tell no one.
    if notify.as_ref().is_none_or(Vec::is_empty)
        && let Some(list) = &w.steps
    {
        for (i, s) in list.value.iter().enumerate() {
            if let Some(n) = &s.value.notify
                && n.value.receivers.as_ref().is_none_or(|r| r.value.is_empty())
            {
                issues.at(
                    n,
                    format!("{p}.steps[{i}].notify"),
                    "tells no one: give it `receivers`, or the workflow `notify:`",
                );
            }
        }
    }
    let (trigger, cooldown, steps) = (trigger?.0, cooldown?, steps?);
    (issues.len() == before).then(|| Workflow {
        name,
        trigger,
        cooldown,
        params,
        notify: notify.unwrap_or_default(),
        steps,
        file: Arc::from(file),
    })
}

/// A list of receiver names (`notify:`), each recorded where it is written.
fn receiver_list(
    list: &Option<Spanned<Vec<Spanned<String>>>>,
    p: &str,
    workflow: &Arc<str>,
    issues: &mut Issues,
    receivers: &mut Vec<ReceiverRef>,
) -> Option<Vec<Arc<str>>> {
    let list = list.as_ref()?;
    let mut named = HashSet::new();
    let mut out = Vec::new();
    for (k, name) in list.value.iter().enumerate() {
        let np = format!("{p}[{k}]");
        if name.value.trim().is_empty() {
            issues.at(name, np, "a receiver needs a name");
        } else if !named.insert(name.value.as_str()) {
            issues.at(name, np, format!("`{}` is named twice", name.value));
        } else {
            out.push(Arc::from(name.value.as_str()));
            receivers.push(ReceiverRef {
                rule: workflow.clone(),
                name: name.value.clone(),
                line: name.referenced.line(),
                column: name.referenced.column(),
                path: np,
            });
        }
    }
    Some(out)
}

/// A target glob or name with placeholders: the placeholders must be known, and what is left a glob.
fn pattern(s: &Option<Spanned<String>>, path: &str, known: &Known, issues: &mut Issues) -> Option<Arc<str>> {
    let s = s.as_ref()?;
    if known.check(s, path, issues) {
        let sample = super::fill(&s.value, |_| Some("x"));
        if let Err(m) = Glob::new(&sample) {
            issues.at(s, path, m);
        }
    }
    Some(Arc::from(s.value.as_str()))
}

fn targets(
    service: &Option<Spanned<String>>,
    instance_id: &Option<Spanned<String>>,
    p: &str,
    known: &Known,
    issues: &mut Issues,
) -> Targets {
    Targets {
        service: pattern(service, &format!("{p}.service"), known, issues),
        instance_id: pattern(instance_id, &format!("{p}.instance_id"), known, issues),
    }
}

/// A placeholder-bearing string (a resource, a device, a message).
fn text(s: &Option<Spanned<String>>, path: &str, known: &Known, issues: &mut Issues) -> Option<Arc<str>> {
    let s = s.as_ref()?;
    known.check(s, path, issues);
    Some(Arc::from(s.value.as_str()))
}

fn cpu(raw: &Spanned<RawCpu>, p: &str, known: &Known, issues: &mut Issues) -> Option<Arc<str>> {
    let s = raw.value.cpu.as_ref()?;
    let path = format!("{p}.cpu");
    let value = &s.value.0;
    if placeholders(value).is_empty() {
        if value.parse::<u32>().is_err() {
            issues.at(s, &path, format!("`{value}` is not a CPU number (or a placeholder like {{cpu}})"));
        }
    } else {
        known.check_text(s, value, &path, issues);
    }
    Some(Arc::from(value.as_str()))
}

/// The one kind a step gives, with its arguments.
fn step_kind(
    s: &Spanned<RawStep>,
    p: &str,
    wf: &Arc<str>,
    known: &Known,
    issues: &mut Issues,
    receivers: &mut Vec<ReceiverRef>,
) -> Option<StepKind> {
    let r = &s.value;
    let given: Vec<&str> = [
        r.cordon.is_some(),
        r.uncordon.is_some(),
        r.drain.is_some(),
        r.evacuate.is_some(),
        r.cpu_offline.is_some(),
        r.cpu_online.is_some(),
        r.restart.is_some(),
        r.stop.is_some(),
        r.hibernate.is_some(),
        r.run.is_some(),
        r.notify.is_some(),
        r.approve.is_some(),
        r.wait_for.is_some(),
    ]
    .iter()
    .zip(KINDS)
    .filter_map(|(given, k)| given.then_some(k))
    .collect();
    match given.len() {
        0 => {
            issues.at(s, p, format!("a step needs a kind: one of {}", KINDS.join(", ")));
            return None;
        }
        1 => {}
        _ => {
            issues.at(s, p, format!("a step has one kind; this one gives {}", given.join(" and ")));
            return None;
        }
    }
    let before = issues.len();
    let kp = format!("{p}.{}", given[0]);
    let kind = if let Some(c) = &r.cordon {
        StepKind::Cordon { resource: text(&c.value.resource, &format!("{kp}.resource"), known, issues) }
    } else if let Some(c) = &r.uncordon {
        StepKind::Uncordon { resource: text(&c.value.resource, &format!("{kp}.resource"), known, issues) }
    } else if let Some(d) = &r.drain {
        let timeout =
            duration_or(&d.value.timeout, &format!("{kp}.timeout"), Duration::from_secs(30), issues)?;
        StepKind::Drain {
            timeout,
            targets: targets(&d.value.service, &d.value.instance_id, &kp, known, issues),
        }
    } else if let Some(e) = &r.evacuate {
        StepKind::Evacuate {
            targets: targets(&e.value.service, &e.value.instance_id, &kp, known, issues),
            restart: e.value.restart.unwrap_or(false),
        }
    } else if let Some(c) = &r.cpu_offline {
        StepKind::CpuOffline { cpu: cpu(c, &kp, known, issues) }
    } else if let Some(c) = &r.cpu_online {
        StepKind::CpuOnline { cpu: cpu(c, &kp, known, issues) }
    } else if let Some(t) = &r.restart {
        StepKind::Restart(targets(&t.value.service, &t.value.instance_id, &kp, known, issues))
    } else if let Some(t) = &r.stop {
        StepKind::Stop(targets(&t.value.service, &t.value.instance_id, &kp, known, issues))
    } else if let Some(t) = &r.hibernate {
        StepKind::Hibernate(targets(&t.value.service, &t.value.instance_id, &kp, known, issues))
    } else if let Some(run) = &r.run {
        run_kind(run, &kp, known, issues)?
    } else if let Some(n) = &r.notify {
        let receivers = receiver_list(&n.value.receivers, &format!("{kp}.receivers"), wf, issues, receivers);
        let message = match &n.value.message {
            Some(m) => {
                known.check(m, &format!("{kp}.message"), issues);
                Some(Arc::from(m.value.as_str()))
            }
            None => {
                issues.at(n, &kp, "a `notify` step needs a `message`");
                None
            }
        };
        let mut labels = BTreeMap::new();
        for (k, v) in by_position(&n.value.labels) {
            let lp = format!("{kp}.labels.{}", k.value);
            if label_name_ok(&k.value) {
                known.check_text(v, &v.value.0, &lp, issues);
                labels.insert(k.value.clone(), v.value.0.clone());
            } else {
                issues.at(k, lp, format!("`{}` is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)", k.value));
            }
        }
        StepKind::Notify { receivers: receivers.unwrap_or_default(), message: message?, labels }
    } else if let Some(a) = &r.approve {
        StepKind::Approve { message: text(&a.value.message, &format!("{kp}.message"), known, issues) }
    } else if let Some(w) = &r.wait_for {
        wait_for(w, &kp, known, issues)?
    } else {
        return None;
    };
    (issues.len() == before).then_some(kind)
}

fn run_kind(run: &Spanned<RawRun>, kp: &str, known: &Known, issues: &mut Issues) -> Option<StepKind> {
    let r = &run.value;
    let timeout = match &r.timeout {
        Some(t) => positive(t, &format!("{kp}.timeout"), None, issues),
        None => Some(Duration::from_secs(300)),
    };
    let command = match &r.command {
        Some(c) if c.value.is_empty() || c.value[0].value.0.trim().is_empty() => {
            issues.at(c, format!("{kp}.command"), "a command needs a program: [program, args...]");
            None
        }
        Some(c) => {
            let mut out = Vec::new();
            for (k, arg) in c.value.iter().enumerate() {
                known.check_text(arg, &arg.value.0, &format!("{kp}.command[{k}]"), issues);
                out.push(Arc::from(arg.value.0.as_str()));
            }
            Some(out)
        }
        None => {
            issues.at(run, kp, "a `run` step needs a `command`: [program, args...]");
            None
        }
    };
    Some(StepKind::Run {
        command: command?,
        timeout: timeout?,
        idempotent: r.idempotent.as_ref().is_some_and(|i| i.value),
    })
}

fn wait_for(w: &Spanned<RawWaitFor>, kp: &str, known: &Known, issues: &mut Issues) -> Option<StepKind> {
    let r = &w.value;
    let hold = match &r.hold {
        Some(h) => {
            let d = issues.duration(h, &format!("{kp}.for"));
            if let Some(d) = d.filter(|d| *d > MAX_WINDOW) {
                issues.at(
                    h,
                    format!("{kp}.for"),
                    format!("{} is longer than the limit of {}", super::human(d), super::human(MAX_WINDOW)),
                );
                None
            } else {
                d
            }
        }
        None => {
            issues.at(
                w,
                kp,
                "`wait_for` needs `for`: how long the condition must hold (0s: as soon as it does)",
            );
            None
        }
    };
    let bounds = Bounds {
        above: issues.finite(&r.above, &format!("{kp}.above")),
        below: issues.finite(&r.below, &format!("{kp}.below")),
        at_least: issues.finite(&r.at_least, &format!("{kp}.at_least")),
        at_most: issues.finite(&r.at_most, &format!("{kp}.at_most")),
    };
    let given = [&r.above, &r.below, &r.at_least, &r.at_most].iter().filter(|b| b.is_some()).count();
    let condition = match (&r.device_health, &r.metric) {
        (Some(_), Some(_)) | (None, None) => {
            issues.at(w, kp, "give either `device_health` or `metric` (with a bound)");
            None
        }
        (Some(state), None) => {
            if given > 0 || r.service.is_some() || r.instance_id.is_some() {
                issues.at(
                    w,
                    kp,
                    "above, below, at_least, at_most, service and instance_id go with a `metric`, not `device_health`",
                );
            }
            let state = health(state, &format!("{kp}.device_health"), issues);
            let device = text(&r.device, &format!("{kp}.device"), known, issues);
            state.map(|state| WaitCondition::DeviceHealth { state, device })
        }
        (None, Some(metric)) => {
            if r.device.is_some() {
                issues.at(w, kp, "`device` goes with `device_health`; a metric is about instances: use service or instance_id");
            }
            // The broker's signals (requests_per_s, ...) are not in the collector's snapshots that
            // `wait_for` reads: only the kernel's metrics are offered.
            let kernel: Vec<Metric> =
                Metric::ALL.into_iter().filter(|m| !matches!(m, Metric::Signal(_))).collect();
            let m = Metric::from_name(&metric.value).filter(|m| kernel.contains(m));
            if m.is_none() {
                issues.at(
                    metric,
                    format!("{kp}.metric"),
                    format!(
                        "unknown metric `{}`; expected one of {}",
                        metric.value,
                        names(&kernel, Metric::as_str)
                    ),
                );
            }
            if given == 0 {
                issues.at(w, kp, "give at least one of above, below, at_least, at_most");
            }
            let targets = targets(&r.service, &r.instance_id, kp, known, issues);
            m.map(|metric| WaitCondition::Metric { metric, bounds, targets })
        }
    };
    Some(StepKind::WaitFor { condition: condition?, hold: hold? })
}

/// A step as checked alone; the graph (`after`, escalations) is resolved once every name is known.
struct Partial<'r> {
    raw: &'r Spanned<RawStep>,
    path: String,
    step: Option<Step>,
}

fn steps(
    raw: &Spanned<Vec<Spanned<RawStep>>>,
    p: &str,
    wf: &Arc<str>,
    known: &Known,
    issues: &mut Issues,
    receivers: &mut Vec<ReceiverRef>,
) -> Option<Vec<Step>> {
    let before = issues.len();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut partial = Vec::new();
    for (i, s) in raw.value.iter().enumerate() {
        let sp = format!("{p}.steps[{i}]");
        let name = &s.value.name;
        if name.value.trim().is_empty() {
            issues.at(name, format!("{sp}.name"), "a step needs a name");
        } else if index.contains_key(name.value.as_str()) {
            issues.at(
                name,
                format!("{sp}.name"),
                format!("`{}` is already the name of a step in this workflow", name.value),
            );
        } else {
            index.insert(&name.value, i);
        }
        let step = step(s, &sp, wf, known, issues, receivers);
        partial.push(Partial { raw: s, path: sp, step });
    }
    let all: Vec<&str> = raw.value.iter().map(|s| s.value.name.value.as_str()).collect();
    let listed = all.join(", ");
    let resolve = |s: &Spanned<String>, path: String, issues: &mut Issues| -> Option<usize> {
        let found = index.get(s.value.as_str()).copied();
        if found.is_none() {
            issues.at(
                s,
                path,
                format!("no step is named `{}` in this workflow; its steps: {listed}", s.value),
            );
        }
        found
    };
    // Resolve `after:` and escalation targets by name.
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); partial.len()];
    let mut escalate: Vec<Option<usize>> = vec![None; partial.len()];
    for (i, ps) in partial.iter().enumerate() {
        if let Some(list) = &ps.raw.value.after {
            let mut seen = HashSet::new();
            for (k, a) in list.value.iter().enumerate() {
                let ap = format!("{}.after[{k}]", ps.path);
                if !seen.insert(a.value.as_str()) {
                    issues.at(a, ap, format!("`{}` is named twice", a.value));
                } else if let Some(j) = resolve(a, ap, issues) {
                    after[i].push(j);
                }
            }
        }
        if let Some(of) = &ps.raw.value.on_failure {
            let fp = format!("{}.on_failure", ps.path);
            let target = match &of.value {
                RawOnFailure::Word(w) if w == "escalate" => {
                    match partial.get(i + 1) {
                        Some(_) => Some(i + 1),
                        None => {
                            issues.at(of, &fp, "a bare `escalate` names the next step in the file, and this is the last step");
                            None
                        }
                    }
                }
                RawOnFailure::Word(_) => None,
                RawOnFailure::Escalate(name) => {
                    let at = Spanned { value: name.clone(), referenced: of.referenced, defined: of.defined };
                    resolve(&at, format!("{fp}.escalate"), issues)
                }
            };
            if target == Some(i) {
                issues.at(of, &fp, "a step cannot escalate to itself");
            } else {
                escalate[i] = target;
            }
        }
    }
    // An escalation step runs only in place of a failed step: nothing waits for it, and it waits for nothing.
    let mut escalated_by: Vec<Option<usize>> = vec![None; partial.len()];
    for (i, t) in escalate.iter().enumerate() {
        if let Some(t) = *t {
            escalated_by[t].get_or_insert(i);
        }
    }
    for (i, ps) in partial.iter().enumerate() {
        let Some(by) = escalated_by[i] else { continue };
        let name = all[i];
        let by = all[by];
        if let Some(list) = &ps.raw.value.after {
            issues.at(
                list,
                format!("{}.after", ps.path),
                format!("`{name}` is an escalation step (`{by}` escalates to it): it runs only in place of a failed step, so it takes no `after:`"),
            );
        }
        for (j, other) in partial.iter().enumerate() {
            let Some(list) = &other.raw.value.after else { continue };
            for (k, a) in list.value.iter().enumerate() {
                if index.get(a.value.as_str()) == Some(&i) && after[j].contains(&i) {
                    issues.at(
                        a,
                        format!("{}.after[{k}]", other.path),
                        format!("`{name}` is an escalation step (`{by}` escalates to it): nothing waits for it; wait for `{by}`, whose place it takes"),
                    );
                }
            }
        }
    }
    if escalated_by.iter().all(Option::is_some) {
        issues.at(raw, format!("{p}.steps"), "every step is an escalation step: nothing would run");
    }
    cycles(&partial, &after, "after", "`after:` makes a cycle", "each is after the next", issues);
    let chains: Vec<Vec<usize>> = escalate.iter().map(|t| t.iter().copied().collect()).collect();
    cycles(&partial, &chains, "on_failure", "escalations make a cycle", "each escalates to the next", issues);
    if issues.len() != before {
        return None;
    }
    let mut out = Vec::new();
    for (i, ps) in partial.into_iter().enumerate() {
        let mut step = ps.step?;
        step.after = std::mem::take(&mut after[i]);
        if let Some(t) = escalate[i] {
            step.on_failure = OnFailure::Escalate(t);
        }
        step.escalation = escalated_by[i].is_some();
        out.push(step);
    }
    Some(out)
}

/// Reports each cycle of `edges` (step → the steps it points to) once, as the steps in order from the
/// earliest in the file, located at that step's `key`.
fn cycles(
    partial: &[Partial],
    edges: &[Vec<usize>],
    key: &str,
    what: &str,
    reading: &str,
    issues: &mut Issues,
) {
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..edges.len()).map(|i| graph.add_node(i)).collect();
    for (i, to) in edges.iter().enumerate() {
        for &j in to {
            graph.add_edge(nodes[i], nodes[j], ());
        }
    }
    if toposort(&graph, None).is_ok() {
        return;
    }
    let mut found: Vec<Vec<usize>> = Vec::new();
    for scc in tarjan_scc(&graph) {
        let members: HashSet<usize> = scc.iter().map(|n| graph[*n]).collect();
        let Some(&start) = members.iter().min() else { continue };
        if members.len() == 1 && !edges[start].contains(&start) {
            continue;
        }
        found.push(cycle_from(start, edges, &members));
    }
    found.sort();
    for cycle in found {
        let start = cycle[0];
        let names: Vec<&str> =
            cycle.iter().chain([&start]).map(|&i| partial[i].raw.value.name.value.as_str()).collect();
        let message = format!("{what}: {} ({reading})", names.join(" -> "));
        let path = format!("{}.{key}", partial[start].path);
        let r = &partial[start].raw.value;
        match (key, &r.after, &r.on_failure) {
            ("after", Some(list), _) => issues.at(list, path, message),
            (_, _, Some(of)) => issues.at(of, path, message),
            _ => issues.at(partial[start].raw, path, message),
        }
    }
}

/// The shortest path from `start` back to itself inside one strongly connected component, from `start`.
fn cycle_from(start: usize, edges: &[Vec<usize>], members: &HashSet<usize>) -> Vec<usize> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut seen = HashSet::from([start]);
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(at) = queue.pop_front() {
        for &next in &edges[at] {
            if next == start {
                let mut path = vec![at];
                let mut cur = at;
                while let Some(&p) = parent.get(&cur) {
                    path.push(p);
                    cur = p;
                }
                path.reverse();
                return path;
            }
            if members.contains(&next) && seen.insert(next) {
                parent.insert(next, at);
                queue.push_back(next);
            }
        }
    }
    vec![start]
}

fn step(
    s: &Spanned<RawStep>,
    sp: &str,
    wf: &Arc<str>,
    known: &Known,
    issues: &mut Issues,
    receivers: &mut Vec<ReceiverRef>,
) -> Option<Step> {
    let r = &s.value;
    let before = issues.len();
    let kind = step_kind(s, sp, wf, known, issues, receivers);
    let timeout = match &r.timeout {
        Some(t) => positive(t, &format!("{sp}.timeout"), None, issues).map(Some),
        None => Some(kind.as_ref().and_then(StepKind::default_timeout)),
    };
    let retries = r.retries.as_ref().map_or(0, |s| s.value);
    if let Some(s) = r.retries.as_ref().filter(|s| s.value > MAX_RETRIES) {
        issues.at(s, format!("{sp}.retries"), format!("{} is more than the limit of {MAX_RETRIES}", s.value));
    }
    let backoff = match &r.backoff {
        None => Some(Backoff::default()),
        Some(b) => {
            let bp = format!("{sp}.backoff");
            let initial = match &b.value.initial {
                Some(s) => positive(s, &format!("{bp}.initial"), None, issues),
                None => Some(Backoff::default().initial),
            };
            let max = duration_or(&b.value.max, &format!("{bp}.max"), Backoff::default().max, issues);
            match (initial, max) {
                (Some(initial), Some(max)) if initial > max => {
                    let at = b.value.initial.as_ref().or(b.value.max.as_ref());
                    let message =
                        format!("initial {} is longer than max {}", super::human(initial), super::human(max));
                    match at {
                        Some(at) => issues.at(at, format!("{bp}.initial"), message),
                        None => issues.at(b, bp, message),
                    }
                    None
                }
                (Some(initial), Some(max)) => Some(Backoff { initial, max }),
                _ => None,
            }
        }
    };
    let on_failure = match r.on_failure.as_ref().map(|s| (s, &s.value)) {
        None => OnFailure::Abort,
        Some((_, RawOnFailure::Word(w))) if w == "abort" => OnFailure::Abort,
        Some((_, RawOnFailure::Word(w))) if w == "continue" => OnFailure::Continue,
        // Resolved with the graph.
        Some((_, RawOnFailure::Word(w))) if w == "escalate" => OnFailure::Abort,
        Some((_, RawOnFailure::Escalate(_))) => OnFailure::Abort,
        Some((s, RawOnFailure::Word(w))) => {
            issues.at(
                s,
                format!("{sp}.on_failure"),
                format!(
                    "unknown on_failure `{w}`; expected abort, continue, escalate or {{ escalate: STEP }}"
                ),
            );
            OnFailure::Abort
        }
    };
    let kind = kind?;
    let run_says = match &r.run {
        Some(run) => run.value.idempotent.as_ref(),
        None => None,
    };
    if let (Some(step_says), Some(run_says)) = (&r.idempotent, run_says)
        && step_says.value != run_says.value
    {
        issues.at(
            step_says,
            format!("{sp}.idempotent"),
            format!("says {} but run.idempotent says {}: say it once", step_says.value, run_says.value),
        );
    }
    let idempotent = r.idempotent.as_ref().map_or_else(|| kind.idempotent(), |s| s.value);
    let (timeout, backoff) = (timeout?, backoff?);
    (issues.len() == before).then(|| Step {
        name: Arc::from(r.name.value.as_str()),
        kind,
        after: Vec::new(),
        timeout,
        retries,
        backoff,
        on_failure,
        escalation: false,
        idempotent,
    })
}

fn tests(raw: &[RawTest], workflows: &[&str], issues: &mut Issues) -> Vec<TestCase> {
    let names: HashSet<&str> = workflows.iter().copied().collect();
    let mut out = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        let p = format!("tests[{i}]");
        let before = issues.len();
        let inputs = t.events.len() + t.health.len() + t.alerts.len();
        if inputs > MAX_TEST_INPUTS {
            issues.at(
                &t.name,
                &p,
                format!(
                    "{inputs} events, health changes and alerts are more than the limit of {MAX_TEST_INPUTS}"
                ),
            );
        }
        let mut case = TestCase {
            name: t.name.value.clone(),
            events: Vec::new(),
            health: Vec::new(),
            alerts: Vec::new(),
            expect: Vec::new(),
        };
        for (k, e) in t.events.iter().enumerate() {
            let ep = format!("{p}.events[{k}]");
            let at = issues.duration(&e.at, &format!("{ep}.at"));
            if e.device.value.is_empty() {
                issues.at(&e.device, format!("{ep}.device"), "an event needs a device");
            }
            if !kind_name_ok(&e.kind.value) {
                issues.at(
                    &e.kind,
                    format!("{ep}.kind"),
                    format!("`{}` is not an event kind (snake_case: [a-z][a-z0-9_]*)", e.kind.value),
                );
            }
            if let Some(at) = at {
                case.events.push(TestEvent {
                    at,
                    device: e.device.value.clone(),
                    kind: e.kind.value.clone(),
                });
            }
        }
        for (k, h) in t.health.iter().enumerate() {
            let hp = format!("{p}.health[{k}]");
            let at = issues.duration(&h.at, &format!("{hp}.at"));
            if h.device.value.is_empty() {
                issues.at(&h.device, format!("{hp}.device"), "a health change needs a device");
            }
            let state = health(&h.state, &format!("{hp}.state"), issues);
            if let (Some(at), Some(state)) = (at, state) {
                case.health.push(TestHealth { at, device: h.device.value.clone(), state });
            }
        }
        for (k, a) in t.alerts.iter().enumerate() {
            let ap = format!("{p}.alerts[{k}]");
            let at = issues.duration(&a.at, &format!("{ap}.at"));
            let until = match &a.until {
                Some(u) => issues.duration(u, &format!("{ap}.until")).map(Some),
                None => Some(None),
            };
            if let (Some(at), Some(Some(until)), Some(u)) = (at, until, &a.until)
                && until <= at
            {
                issues.at(
                    u,
                    format!("{ap}.until"),
                    format!(
                        "the alert resolves at {} before it fires at {}",
                        super::human(until),
                        super::human(at)
                    ),
                );
            }
            let mut labels = BTreeMap::new();
            for (name, v) in by_position(&a.labels.value) {
                if label_name_ok(&name.value) {
                    labels.insert(name.value.clone(), v.value.0.clone());
                } else {
                    issues.at(
                        name,
                        format!("{ap}.labels.{}", name.value),
                        format!("`{}` is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)", name.value),
                    );
                }
            }
            if a.labels.value.is_empty() {
                issues.at(&a.labels, format!("{ap}.labels"), "an alert needs labels (at least `alertname`)");
            }
            if let (Some(at), Some(until)) = (at, until) {
                case.alerts.push(TestAlert { at, until, labels });
            }
        }
        for (k, x) in t.expect.iter().enumerate() {
            let xp = format!("{p}.expect[{k}]");
            let at = issues.duration(&x.at, &format!("{xp}.at"));
            if !names.contains(x.workflow.value.as_str()) {
                let listed = if workflows.is_empty() {
                    "it has none".to_string()
                } else {
                    format!("its workflows: {}", workflows.join(", "))
                };
                issues.at(
                    &x.workflow,
                    format!("{xp}.workflow"),
                    format!("no workflow is named `{}` in this file; {listed}", x.workflow.value),
                );
            }
            if let Some(at) = at {
                case.expect.push(ExpectedRun {
                    at,
                    workflow: Arc::from(x.workflow.value.as_str()),
                    params: x.params.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect(),
                });
            }
        }
        if issues.len() == before {
            out.push(case);
        }
    }
    out
}
