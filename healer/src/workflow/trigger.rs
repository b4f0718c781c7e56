//! Which runs the triggers start: hardware events counted per device over a window, health changes, and
//! incoming alerts as they start firing, each behind its workflow's cooldown. Pure: it is fed facts with
//! the time since start (injected, never read from a clock), and answers the runs to start.
//!
//! Memory stays bounded whatever the host reports: a device's history holds at most `at_least` events and
//! only those within `within`; devices with a history, unhealthy devices, and cooldowns are each capped
//! at [`MAX_KEYS`], the longest untouched dropped first.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::{Health, Trigger, Workflow, human};
use crate::alerts::AlertFact;

/// Entries kept per table (device histories, device health, cooldowns): beyond it, the oldest goes.
pub const MAX_KEYS: usize = 4096;

/// A run a trigger starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRun {
    pub workflow: Arc<str>,
    /// The workflow's `params` defaults, overridden by what the trigger knows: `device`, `cpu` (N for a
    /// device `cpuN`) and `kind` (events) or `state` (health), or the alert's labels.
    pub params: BTreeMap<String, String>,
    /// Why, as a sentence: `3 io_error on loop3 within 1m`.
    pub reason: String,
    /// What the cooldown is kept by: `WORKFLOW/device/DEVICE` or `WORKFLOW/alert/k=v,...`.
    pub key: String,
}

/// What a workflow's trigger needs to decide.
struct Watched {
    name: Arc<str>,
    trigger: Trigger,
    cooldown: Duration,
    params: BTreeMap<String, String>,
}

/// The recent events of one kind on one device, for one workflow.
struct Burst {
    times: VecDeque<Duration>,
    touched: Duration,
}

/// The triggers of a set of workflows, and what they remember.
pub struct Triggers {
    workflows: Vec<Watched>,
    /// (workflow index, device) → its recent events.
    bursts: HashMap<(usize, Arc<str>), Burst>,
    /// Devices not healthy, and since when; a device not here is taken as healthy.
    health: HashMap<Arc<str>, (Health, Duration)>,
    /// Run key → when its last run started (only for workflows with a cooldown).
    started: HashMap<String, Duration>,
    /// Per workflow: the label sets of the matching alerts firing at the last [`Triggers::on_alerts`].
    firing: Vec<BTreeSet<String>>,
}

impl Triggers {
    pub fn new(workflows: &[Workflow]) -> Triggers {
        let workflows: Vec<Watched> = workflows
            .iter()
            .map(|w| Watched {
                name: w.name.clone(),
                trigger: w.trigger.clone(),
                cooldown: w.cooldown,
                params: w.params.clone(),
            })
            .collect();
        let firing = vec![BTreeSet::new(); workflows.len()];
        Triggers {
            workflows,
            bursts: HashMap::new(),
            health: HashMap::new(),
            started: HashMap::new(),
            firing,
        }
    }

    /// The workflows changed (a reload). What a workflow with the same name and trigger had seen (its
    /// recent events, its matching alerts) carries over, as do device health and the cooldowns; a new or
    /// changed trigger starts afresh.
    pub fn replace(&mut self, workflows: &[Workflow]) {
        let mut next = Triggers::new(workflows);
        let kept: HashMap<usize, usize> = next
            .workflows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let old = self.workflows.iter().position(|o| o.name == w.name && o.trigger == w.trigger)?;
                Some((old, i))
            })
            .collect();
        for (&old, &i) in &kept {
            next.firing[i] = std::mem::take(&mut self.firing[old]);
        }
        next.bursts = self
            .bursts
            .drain()
            .filter_map(|((old, device), burst)| Some(((*kept.get(&old)?, device), burst)))
            .collect();
        next.health = std::mem::take(&mut self.health);
        next.started = std::mem::take(&mut self.started);
        *self = next;
    }

    /// A hardware event of `kind` on `device` at `at`.
    pub fn on_event(&mut self, device: &str, kind: &str, at: Duration) -> Vec<StartRun> {
        self.on_event_seen(device, kind, at, at)
    }

    /// A hardware event of `kind` on `device` that happened at `at` and is seen at `now` (the kernel log's
    /// backlog at a first start is seen long after): a workflow counts it only while it is within its
    /// window of `now`, so old faults never start a run today.
    pub fn on_event_seen(&mut self, device: &str, kind: &str, at: Duration, now: Duration) -> Vec<StartRun> {
        let mut out = Vec::new();
        for i in 0..self.workflows.len() {
            let Trigger::HardwareEvents { kind: want, device: glob, at_least, within } =
                &self.workflows[i].trigger
            else {
                continue;
            };
            if **want != *kind || !glob.as_ref().is_none_or(|g| g.matches(device)) {
                continue;
            }
            let (at_least, within) = (*at_least as usize, *within);
            if now.saturating_sub(at) > within {
                continue;
            }
            let slot = (i, Arc::<str>::from(device));
            if !self.bursts.contains_key(&slot) {
                self.make_room_for_burst(at);
            }
            let burst =
                self.bursts.entry(slot.clone()).or_insert(Burst { times: VecDeque::new(), touched: at });
            burst.touched = burst.touched.max(at);
            burst.times.push_back(at);
            while burst.times.front().is_some_and(|t| at.saturating_sub(*t) > within) {
                burst.times.pop_front();
            }
            while burst.times.len() > at_least {
                burst.times.pop_front();
            }
            if burst.times.len() < at_least {
                continue;
            }
            let w = &self.workflows[i];
            let key = format!("{}/device/{device}", w.name);
            if !self.cooled(i, &key, at) {
                continue;
            }
            // A run restarts the count: the next one needs `at_least` new events.
            self.bursts.remove(&slot);
            let w = &self.workflows[i];
            let reason = if at_least == 1 {
                format!("{kind} on {device}")
            } else {
                format!("{at_least} {kind} on {device} within {}", human(within))
            };
            let params = device_params(&w.params, device, ("kind", kind));
            out.push(self.start(i, key, params, reason, at));
        }
        out
    }

    /// `device` reports the health `state` at `at`; a run starts only when it enters that state.
    pub fn on_health(&mut self, device: &str, state: Health, at: Duration) -> Vec<StartRun> {
        let was = self.health.get(device).map_or(Health::Healthy, |(h, _)| *h);
        if was == state {
            return Vec::new();
        }
        if state == Health::Healthy {
            self.health.remove(device);
        } else {
            if !self.health.contains_key(device) && self.health.len() >= MAX_KEYS {
                evict_oldest(&mut self.health, |(_, since)| *since);
            }
            self.health.insert(Arc::from(device), (state, at));
        }
        let mut out = Vec::new();
        for i in 0..self.workflows.len() {
            let w = &self.workflows[i];
            let Trigger::HardwareState { state: want, device: glob } = &w.trigger else { continue };
            if *want != state || !glob.as_ref().is_none_or(|g| g.matches(device)) {
                continue;
            }
            let key = format!("{}/device/{device}", w.name);
            if !self.cooled(i, &key, at) {
                continue;
            }
            let w = &self.workflows[i];
            let reason = format!("{device} became {} (was {})", state.as_str(), was.as_str());
            let params = device_params(&w.params, device, ("state", state.as_str()));
            out.push(self.start(i, key, params, reason, at));
        }
        out
    }

    /// The alerts firing at `at` (all of them, each time): a run starts for each matching alert that was
    /// not firing at the last call.
    pub fn on_alerts(&mut self, alerts: &[AlertFact], at: Duration) -> Vec<StartRun> {
        let mut out = Vec::new();
        for i in 0..self.workflows.len() {
            let Trigger::Alert(condition) = &self.workflows[i].trigger else { continue };
            let mut now: BTreeMap<String, &AlertFact> = BTreeMap::new();
            for fact in alerts.iter().filter(|f| condition.matches_alert(f)) {
                now.entry(label_set(&fact.labels)).or_insert(fact);
            }
            let new: Vec<(String, &AlertFact)> = now
                .iter()
                .filter(|(k, _)| !self.firing[i].contains(*k))
                .map(|(k, f)| (k.clone(), *f))
                .collect();
            self.firing[i] = now.keys().cloned().collect();
            for (labels, fact) in new {
                let key = format!("{}/alert/{labels}", self.workflows[i].name);
                if !self.cooled(i, &key, at) {
                    continue;
                }
                let w = &self.workflows[i];
                let mut params = w.params.clone();
                params.extend(fact.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                if let Some(cpu) = params
                    .get("device")
                    .and_then(|d| crate::placement::cpu_number(d))
                    .filter(|_| !fact.labels.contains_key("cpu"))
                {
                    params.insert("cpu".into(), cpu.to_string());
                }
                let about: Vec<String> = fact
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "alertname")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let name = if fact.name.is_empty() {
                    "an alert".to_string()
                } else {
                    format!("alert {}", fact.name)
                };
                let reason = if about.is_empty() {
                    format!("{name} started firing")
                } else {
                    format!("{name} started firing ({})", about.join(", "))
                };
                out.push(self.start(i, key, params, reason, at));
            }
        }
        out
    }

    /// Whether workflow `i` may start a run for `key` at `at`.
    fn cooled(&self, i: usize, key: &str, at: Duration) -> bool {
        let cooldown = self.workflows[i].cooldown;
        cooldown.is_zero() || self.started.get(key).is_none_or(|t| at.saturating_sub(*t) >= cooldown)
    }

    fn start(
        &mut self,
        i: usize,
        key: String,
        params: BTreeMap<String, String>,
        reason: String,
        at: Duration,
    ) -> StartRun {
        let w = &self.workflows[i];
        let cooldown = w.cooldown;
        let run = StartRun { workflow: w.name.clone(), params, reason, key };
        if !cooldown.is_zero() {
            if !self.started.contains_key(&run.key) && self.started.len() >= MAX_KEYS {
                // Cooldowns that have ended say nothing any more; then the oldest goes.
                let longest = self.workflows.iter().map(|w| w.cooldown).max().unwrap_or_default();
                self.started.retain(|_, t| at.saturating_sub(*t) < longest);
                if self.started.len() >= MAX_KEYS {
                    evict_oldest(&mut self.started, |t| *t);
                }
            }
            self.started.insert(run.key.clone(), at);
        }
        run
    }

    /// Before a new device history: drop the histories whose events are all outside their window, then,
    /// if still full, the longest untouched.
    fn make_room_for_burst(&mut self, at: Duration) {
        if self.bursts.len() < MAX_KEYS {
            return;
        }
        let workflows = &self.workflows;
        self.bursts.retain(|(i, _), b| match &workflows[*i].trigger {
            Trigger::HardwareEvents { within, .. } => {
                b.times.back().is_some_and(|t| at.saturating_sub(*t) <= *within)
            }
            _ => false,
        });
        if self.bursts.len() >= MAX_KEYS {
            evict_oldest(&mut self.bursts, |b| b.touched);
        }
    }

    /// How many entries it holds (histories, unhealthy devices, cooldowns), for tests of its bounds.
    pub fn remembered(&self) -> usize {
        self.bursts.len() + self.health.len() + self.started.len()
    }
}

fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, age: impl Fn(&V) -> Duration) {
    if let Some(k) = map.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| k.clone()) {
        map.remove(&k);
    }
}

fn device_params(
    defaults: &BTreeMap<String, String>,
    device: &str,
    (key, value): (&str, &str),
) -> BTreeMap<String, String> {
    let mut params = defaults.clone();
    params.insert("device".into(), device.into());
    if let Some(cpu) = crate::placement::cpu_number(device) {
        params.insert("cpu".into(), cpu.to_string());
    }
    params.insert(key.into(), value.into());
    params
}

/// An alert's identity for its trigger: its labels, sorted, as `k=v,k=v`.
fn label_set(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rules::AlertCondition;
    use crate::workflow::{Backoff, OnFailure, Step, StepKind};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn workflow(name: &str, trigger: Trigger, cooldown: u64) -> Workflow {
        Workflow {
            name: Arc::from(name),
            trigger,
            cooldown: secs(cooldown),
            params: BTreeMap::from([("service".to_string(), "echo".to_string())]),
            notify: Vec::new(),
            steps: vec![Step {
                name: Arc::from("a"),
                kind: StepKind::Approve { message: None },
                after: Vec::new(),
                timeout: None,
                retries: 0,
                backoff: Backoff::default(),
                on_failure: OnFailure::Abort,
                escalation: false,
                idempotent: true,
            }],
            file: Arc::from("t.yaml"),
        }
    }

    fn burst(at_least: u32, within: u64, device: Option<&str>) -> Trigger {
        Trigger::HardwareEvents {
            kind: Arc::from("io_error"),
            device: device.map(|d| crate::workflow::Glob::new(d).unwrap()),
            at_least,
            within: secs(within),
        }
    }

    #[test]
    fn a_burst_starts_a_run_at_the_at_least_th_event_within_the_window() {
        let mut t = Triggers::new(&[workflow("disk", burst(3, 60, Some("loop*")), 0)]);
        assert!(t.on_event("loop3", "io_error", secs(0)).is_empty());
        assert!(t.on_event("loop3", "other", secs(5)).is_empty());
        assert!(t.on_event("sda", "io_error", secs(5)).is_empty(), "not a matching device");
        assert!(t.on_event("loop3", "io_error", secs(30)).is_empty());
        let runs = t.on_event("loop3", "io_error", secs(60));
        assert_eq!(runs.len(), 1, "the first and the last exactly `within` apart count");
        assert_eq!(runs[0].reason, "3 io_error on loop3 within 1m");
        assert_eq!(runs[0].key, "disk/device/loop3");
        assert_eq!(
            runs[0].params,
            BTreeMap::from([
                ("device".into(), "loop3".into()),
                ("kind".into(), "io_error".into()),
                ("service".into(), "echo".into())
            ])
        );
        // The run restarted the count.
        assert!(t.on_event("loop3", "io_error", secs(61)).is_empty());
    }

    #[test]
    fn events_seen_after_their_window_never_start_a_run() {
        let mut t = Triggers::new(&[workflow("disk", burst(2, 60, None), 0)]);
        // A backlog of two errors an hour old, read now: nothing.
        assert!(t.on_event_seen("loop3", "io_error", secs(0), secs(3600)).is_empty());
        assert!(t.on_event_seen("loop3", "io_error", secs(1), secs(3600)).is_empty());
        // One fresh error is one: the old ones were not counted.
        assert!(t.on_event_seen("loop3", "io_error", secs(3600), secs(3600)).is_empty());
        assert_eq!(t.on_event_seen("loop3", "io_error", secs(3601), secs(3601)).len(), 1);
    }

    #[test]
    fn a_reload_keeps_what_an_unchanged_trigger_saw_and_the_cooldowns() {
        let mut t = Triggers::new(&[
            workflow("disk", burst(2, 60, None), 600),
            workflow("old", burst(2, 60, None), 0),
        ]);
        assert!(t.on_event("loop3", "io_error", secs(0)).is_empty());
        assert_eq!(t.on_event("sda", "io_error", secs(1)).len(), 0);
        assert_eq!(t.on_event("sda", "io_error", secs(2)).len(), 2, "both workflows start for sda");
        // `disk` kept as it was (moved to another place in the list), `old` gone, `new` added.
        t.replace(&[workflow("new", burst(2, 60, None), 0), workflow("disk", burst(2, 60, None), 600)]);
        let runs = t.on_event("loop3", "io_error", secs(10));
        assert_eq!(
            runs.iter().map(|r| r.workflow.as_ref()).collect::<Vec<_>>(),
            ["disk"],
            "its first event counted"
        );
        assert!(
            t.on_event("sda", "io_error", secs(20)).is_empty(),
            "disk is cooling down on sda; new saw one"
        );
        // A changed trigger starts afresh.
        t.replace(&[workflow("disk", burst(3, 60, None), 600)]);
        assert!(t.on_event("loop4", "io_error", secs(30)).is_empty());
        assert!(t.on_event("loop4", "io_error", secs(31)).is_empty());
        assert_eq!(t.on_event("loop4", "io_error", secs(32)).len(), 1);
    }

    #[test]
    fn events_older_than_the_window_do_not_count() {
        let mut t = Triggers::new(&[workflow("disk", burst(2, 10, None), 0)]);
        assert!(t.on_event("loop0", "io_error", secs(0)).is_empty());
        assert!(t.on_event("loop0", "io_error", Duration::from_millis(10_001)).is_empty());
        assert_eq!(t.on_event("loop0", "io_error", secs(15)).len(), 1);
    }

    #[test]
    fn the_cooldown_is_per_device() {
        let mut t = Triggers::new(&[workflow("cpu", burst(1, 60, None), 600)]);
        let runs = t.on_event("cpu3", "io_error", secs(0));
        assert_eq!(runs[0].params["cpu"], "3");
        assert_eq!(runs[0].reason, "io_error on cpu3");
        assert!(t.on_event("cpu3", "io_error", secs(599)).is_empty());
        assert_eq!(t.on_event("cpu4", "io_error", secs(599)).len(), 1);
        assert_eq!(t.on_event("cpu3", "io_error", secs(600)).len(), 1);
    }

    #[test]
    fn a_health_trigger_starts_on_entering_the_state_only() {
        let failed = Trigger::HardwareState { state: Health::Failed, device: None };
        let mut t = Triggers::new(&[workflow("dead", failed, 0)]);
        assert!(t.on_health("sda", Health::Degraded, secs(0)).is_empty());
        let runs = t.on_health("sda", Health::Failed, secs(1));
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].reason, "sda became failed (was degraded)");
        assert_eq!(runs[0].params["state"], "failed");
        assert!(t.on_health("sda", Health::Failed, secs(2)).is_empty(), "still failed: not entered again");
        assert!(t.on_health("sda", Health::Healthy, secs(3)).is_empty());
        assert_eq!(t.remembered(), 0, "healthy devices are not remembered");
        assert_eq!(t.on_health("sda", Health::Failed, secs(4)).len(), 1);
        // A device first heard of is taken as healthy: reporting healthy enters nothing.
        let healthy = Trigger::HardwareState { state: Health::Healthy, device: None };
        let mut t = Triggers::new(&[workflow("back", healthy, 0)]);
        assert!(t.on_health("sdb", Health::Healthy, secs(0)).is_empty());
    }

    fn fact(pairs: &[(&str, &str)]) -> AlertFact {
        AlertFact::from_labels(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn an_alert_starts_a_run_when_it_starts_firing() {
        let cond = AlertCondition {
            name: Some(crate::workflow::Glob::new("Disk*").unwrap()),
            labels: vec![("severity".into(), "critical".into())],
        };
        let mut t = Triggers::new(&[workflow("disk", Trigger::Alert(cond), 0)]);
        let full = fact(&[("alertname", "DiskFull"), ("severity", "critical"), ("device", "cpu2")]);
        let warn = fact(&[("alertname", "DiskFull"), ("severity", "warning")]);
        let runs = t.on_alerts(&[full.clone(), warn.clone()], secs(0));
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].reason, "alert DiskFull started firing (device=cpu2, severity=critical)");
        assert_eq!(runs[0].params["service"], "echo");
        assert_eq!(runs[0].params["cpu"], "2");
        assert_eq!(runs[0].params["alertname"], "DiskFull");
        assert!(t.on_alerts(std::slice::from_ref(&full), secs(1)).is_empty(), "already firing");
        assert!(t.on_alerts(&[], secs(2)).is_empty());
        assert_eq!(t.on_alerts(&[full], secs(3)).len(), 1, "resolved, then firing again");
    }

    #[test]
    fn memory_is_bounded_by_the_caps() {
        // A window longer than the whole test: no history expires, so the oldest are evicted.
        let mut t = Triggers::new(&[workflow("disk", burst(2, 100_000, None), 0)]);
        for d in 0..(MAX_KEYS + 100) {
            t.on_event(&format!("loop{d}"), "io_error", secs(d as u64));
        }
        assert_eq!(t.remembered(), MAX_KEYS);
        // The newest histories stayed.
        assert_eq!(t.on_event(&format!("loop{}", MAX_KEYS + 99), "io_error", secs(10_000)).len(), 1);
    }

    #[test]
    fn expired_histories_go_before_live_ones() {
        let mut t = Triggers::new(&[workflow("disk", burst(2, 3600, None), 0)]);
        for d in 0..MAX_KEYS {
            t.on_event(&format!("loop{d}"), "io_error", secs(d as u64));
        }
        // At 5000 s the histories of devices 0..=1399 are outside the hour: all of them go at once.
        t.on_event("new", "io_error", secs(5000));
        assert_eq!(t.remembered(), MAX_KEYS - 1400 + 1);
    }

    proptest! {
        #[test]
        fn runs_respect_the_window_the_count_and_the_cooldown(
            gaps in proptest::collection::vec((0u64..20, 0usize..3), 1..200),
            at_least in 1u32..5,
            within in 1u64..60,
            cooldown in 0u64..120,
        ) {
            let mut t = Triggers::new(&[workflow("w", burst(at_least, within, None), cooldown)]);
            let mut at = 0;
            let mut seen: Vec<(u64, usize)> = Vec::new();
            let mut last_run: HashMap<usize, u64> = HashMap::new();
            for (gap, device) in gaps {
                at += gap;
                seen.push((at, device));
                for run in t.on_event(&format!("d{device}"), "io_error", secs(at)) {
                    prop_assert_eq!(run.key, format!("w/device/d{device}"));
                    // Enough events on the device within the window, this one included.
                    let recent = seen.iter().filter(|(t, d)| *d == device && at - t <= within).count();
                    prop_assert!(recent >= at_least as usize, "{recent} < {at_least} at {at}");
                    if let Some(last) = last_run.insert(device, at) {
                        prop_assert!(cooldown == 0 || at - last >= cooldown, "run at {last} and {at}");
                    }
                }
            }
        }

        #[test]
        fn with_every_event_inside_the_window_runs_come_every_at_least_events(
            n in 1usize..100,
            at_least in 1u32..10,
        ) {
            let mut t = Triggers::new(&[workflow("w", burst(at_least, 3600, None), 0)]);
            let mut runs = 0;
            for k in 0..n {
                let started = t.on_event("d", "io_error", Duration::from_millis(k as u64)).len();
                prop_assert_eq!(started == 1, (k + 1) % at_least as usize == 0, "event {}", k + 1);
                runs += started;
            }
            prop_assert_eq!(runs, n / at_least as usize);
        }
    }
}
