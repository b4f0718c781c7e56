//! The health of each device, from its events alone (pure: every question takes `now`). The worst
//! severity a device had within the quiet window decides: critical → failed, warning or error → degraded,
//! nothing (or info only) → healthy; a device is healthy again once `quiet` has passed without a warning or
//! worse. The reason is a sentence with the counts and the last message, e.g. `3 io_error in the last 5m;
//! last: I/O error, dev loop3, sector 8 ...`.
//!
//! The history is bounded in memory: per device the events of the last [`HealthTracker::history`] (at least
//! an hour, at most [`MAX_EVENTS_PER_DEVICE`] of them), for at most `max_devices` devices. Events about a
//! device beyond that are counted as dropped, never stored. What consumers ask of it: how many events of a
//! kind (on one device or any) in the last W ([`HealthTracker::count`]), a device's state and since when
//! ([`HealthTracker::health`]), and how long it has been healthy ([`HealthTracker::healthy_for`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::event::{HardwareEvent, Kind, Severity};

/// Events kept per device at most, whatever their age.
pub const MAX_EVENTS_PER_DEVICE: usize = 1024;

/// A device's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Healthy,
    Degraded,
    Failed,
}

impl State {
    pub const ALL: [State; 3] = [State::Healthy, State::Degraded, State::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Degraded => "degraded",
            State::Failed => "failed",
        }
    }

    pub fn from_name(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One device's health as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceHealth {
    pub device: String,
    pub state: State,
    pub reason: String,
    /// Since when the device has been in `state`, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// Events by kind since Vigil started watching the device (sums of deltas).
    pub errors: BTreeMap<String, u64>,
}

#[derive(Clone, Debug)]
struct Entry {
    at_ms: u64,
    kind: Kind,
    severity: Severity,
    delta: u64,
}

#[derive(Clone, Debug, Default)]
struct Device {
    /// Oldest first (by arrival; times are those of the events).
    events: VecDeque<Entry>,
    totals: BTreeMap<Kind, u64>,
    /// The latest warning-or-worse event's time and message.
    last_bad: Option<(u64, String)>,
    /// Start of the current run of warning-or-worse events (none more than `quiet` apart).
    bad_since: Option<u64>,
    last_critical: Option<u64>,
    critical_since: Option<u64>,
    first_seen_ms: u64,
}

/// Extends a run of events that are at most `quiet` apart: `since` is where the run began, `last` its
/// latest event.
fn extend_run(since: &mut Option<u64>, last: Option<u64>, at: u64, quiet: u64) {
    match (*since, last) {
        (Some(s), Some(l)) if at <= l.saturating_add(quiet) => {
            // An older event (the kernel log read late) may start the run earlier.
            if at < s && at.saturating_add(quiet) >= s {
                *since = Some(at);
            }
        }
        _ => *since = Some(at),
    }
}

/// Per-device health and a bounded history of events.
#[derive(Debug)]
pub struct HealthTracker {
    quiet_ms: u64,
    history_ms: u64,
    max_devices: usize,
    devices: HashMap<String, Device>,
    dropped: u64,
    started_ms: u64,
}

impl HealthTracker {
    /// A tracker whose devices turn healthy after `quiet`; `started_ms` is when watching began (devices never
    /// seen have been healthy since then).
    pub fn new(quiet: Duration, max_devices: usize, started_ms: u64) -> HealthTracker {
        let quiet_ms = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX);
        HealthTracker {
            quiet_ms,
            history_ms: quiet_ms.max(3_600_000),
            max_devices: max_devices.max(1),
            devices: HashMap::new(),
            dropped: 0,
            started_ms,
        }
    }

    /// How far back [`HealthTracker::count`] can see.
    pub fn history(&self) -> Duration {
        Duration::from_millis(self.history_ms)
    }

    pub fn quiet(&self) -> Duration {
        Duration::from_millis(self.quiet_ms)
    }

    /// Events about devices beyond `max_devices`, not recorded.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Records `event`; false when it was dropped (too many devices).
    pub fn record(&mut self, event: &HardwareEvent, now_ms: u64) -> bool {
        if !self.devices.contains_key(&event.device) && self.devices.len() >= self.max_devices {
            self.forget_idle(now_ms);
            if self.devices.len() >= self.max_devices {
                self.dropped += 1;
                return false;
            }
        }
        let quiet = self.quiet_ms;
        let d = self
            .devices
            .entry(event.device.clone())
            .or_insert_with(|| Device { first_seen_ms: now_ms, ..Device::default() });
        let at = event.at_unix_ms;
        d.events.push_back(Entry {
            at_ms: at,
            kind: event.kind.clone(),
            severity: event.severity,
            delta: event.delta,
        });
        while d.events.len() > MAX_EVENTS_PER_DEVICE {
            d.events.pop_front();
        }
        *d.totals.entry(event.kind.clone()).or_default() += event.delta;
        if event.severity >= Severity::Warning {
            extend_run(&mut d.bad_since, d.last_bad.as_ref().map(|(t, _)| *t), at, quiet);
            if d.last_bad.as_ref().is_none_or(|(t, _)| at >= *t) {
                d.last_bad = Some((at, event.message.clone()));
            }
        }
        if event.severity == Severity::Critical {
            extend_run(&mut d.critical_since, d.last_critical, at, quiet);
            d.last_critical = Some(d.last_critical.map_or(at, |t| t.max(at)));
        }
        true
    }

    /// Drops events older than the history, and devices that are healthy with no event left.
    pub fn prune(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.history_ms);
        for d in self.devices.values_mut() {
            d.events.retain(|e| e.at_ms >= oldest);
        }
    }

    /// Forgets healthy devices without events in the history, to make room.
    fn forget_idle(&mut self, now_ms: u64) {
        self.prune(now_ms);
        let quiet = self.quiet_ms;
        self.devices.retain(|_, d| {
            !d.events.is_empty() || d.last_bad.as_ref().is_some_and(|(t, _)| t.saturating_add(quiet) > now_ms)
        });
    }

    /// Events of `kind` (sums of deltas) on `device`, or on any device, in the last `within`.
    pub fn count(&self, kind: &Kind, device: Option<&str>, within: Duration, now_ms: u64) -> u64 {
        let since = now_ms.saturating_sub(u64::try_from(within.as_millis()).unwrap_or(u64::MAX));
        let count = |d: &Device| -> u64 {
            d.events
                .iter()
                .filter(|e| &e.kind == kind && e.at_ms >= since && e.at_ms <= now_ms)
                .map(|e| e.delta)
                .sum()
        };
        match device {
            Some(name) => self.devices.get(name).map_or(0, count),
            None => self.devices.values().map(count).sum(),
        }
    }

    fn state_of(&self, d: &Device, now_ms: u64) -> (State, u64) {
        let quiet = self.quiet_ms;
        let active = |last: u64| last.saturating_add(quiet) > now_ms;
        match (d.last_critical, &d.last_bad) {
            (Some(c), _) if active(c) => (State::Failed, d.critical_since.unwrap_or(c)),
            (c, Some((b, _))) if active(*b) => {
                let since = d.bad_since.unwrap_or(*b);
                // Back from failed to degraded when the last critical event left the window.
                let since = c.map_or(since, |c| since.max(c.saturating_add(quiet)));
                (State::Degraded, since)
            }
            (_, Some((b, _))) => (State::Healthy, b.saturating_add(quiet)),
            (_, None) => (State::Healthy, d.first_seen_ms.min(self.started_ms)),
        }
    }

    fn describe(&self, name: &str, d: &Device, now_ms: u64) -> DeviceHealth {
        let (state, since) = self.state_of(d, now_ms);
        let window_start = now_ms.saturating_sub(self.quiet_ms);
        let mut recent: BTreeMap<&str, u64> = BTreeMap::new();
        for e in d.events.iter().filter(|e| e.severity >= Severity::Warning && e.at_ms >= window_start) {
            *recent.entry(e.kind.as_str()).or_default() += e.delta;
        }
        let window = human(self.quiet_ms);
        let reason = match (state, &d.last_bad) {
            (State::Healthy, None) => "no warnings or errors seen".to_string(),
            (State::Healthy, Some(_)) => format!("no warnings or errors in the last {window}"),
            (_, last) => {
                let counts = recent.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
                let counts = if counts.is_empty() { "errors".to_string() } else { counts };
                let last = last.as_ref().map(|(_, m)| m.as_str()).unwrap_or("");
                format!("{counts} in the last {window}; last: {last}")
            }
        };
        DeviceHealth {
            device: name.to_string(),
            state,
            reason,
            since_unix_ms: since,
            errors: d.totals.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        }
    }

    /// `device`'s health; a device never seen is healthy since watching began.
    pub fn health(&self, device: &str, now_ms: u64) -> DeviceHealth {
        match self.devices.get(device) {
            Some(d) => self.describe(device, d, now_ms),
            None => DeviceHealth {
                device: device.to_string(),
                state: State::Healthy,
                reason: "no warnings or errors seen".to_string(),
                since_unix_ms: self.started_ms,
                errors: BTreeMap::new(),
            },
        }
    }

    /// Every device seen, by name.
    pub fn devices(&self, now_ms: u64) -> Vec<DeviceHealth> {
        let mut out: Vec<DeviceHealth> =
            self.devices.iter().map(|(n, d)| self.describe(n, d, now_ms)).collect();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        out
    }

    /// How long `device` has been healthy; `None` while it is not.
    pub fn healthy_for(&self, device: &str, now_ms: u64) -> Option<Duration> {
        let h = self.health(device, now_ms);
        (h.state == State::Healthy).then(|| Duration::from_millis(now_ms.saturating_sub(h.since_unix_ms)))
    }
}

/// `300000` ms as `5m`, `90000` as `90s`.
fn human(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 && ms > 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 && ms > 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Source;

    const MIN: u64 = 60_000;

    fn ev(device: &str, kind: Kind, severity: Severity, at: u64, message: &str) -> HardwareEvent {
        HardwareEvent {
            device: device.into(),
            kind,
            severity,
            source: Source::Kmsg,
            counter: "kmsg:test".into(),
            delta: 1,
            message: message.into(),
            at_unix_ms: at,
            kmsg: None,
        }
    }

    fn tracker() -> HealthTracker {
        HealthTracker::new(Duration::from_secs(300), 4096, 0)
    }

    #[test]
    fn errors_degrade_and_quiet_heals() {
        let mut t = tracker();
        assert_eq!(t.health("loop3", 0).state, State::Healthy);
        for (i, at) in [10 * MIN, 11 * MIN, 12 * MIN].into_iter().enumerate() {
            t.record(
                &ev(
                    "loop3",
                    Kind::io_error(),
                    Severity::Error,
                    at,
                    &format!("I/O error, dev loop3, sector {i}"),
                ),
                at,
            );
        }
        let h = t.health("loop3", 12 * MIN);
        assert_eq!((h.state, h.since_unix_ms), (State::Degraded, 10 * MIN));
        assert_eq!(h.reason, "3 io_error in the last 5m; last: I/O error, dev loop3, sector 2");
        assert_eq!(h.errors, BTreeMap::from([("io_error".to_string(), 3)]));
        assert_eq!(t.healthy_for("loop3", 12 * MIN), None);
        // Still degraded just before 5 minutes after the last error; healthy from then on.
        assert_eq!(t.health("loop3", 17 * MIN - 1).state, State::Degraded);
        let h = t.health("loop3", 17 * MIN);
        assert_eq!((h.state, h.since_unix_ms), (State::Healthy, 17 * MIN));
        assert_eq!(h.reason, "no warnings or errors in the last 5m");
        assert_eq!(t.healthy_for("loop3", 20 * MIN), Some(Duration::from_secs(180)));
    }

    #[test]
    fn critical_fails_then_degrades_then_heals() {
        let mut t = tracker();
        t.record(&ev("nvme0", Kind::nvme_timeout(), Severity::Error, MIN, "timeout"), MIN);
        t.record(&ev("nvme0", Kind::device_lost(), Severity::Critical, 2 * MIN, "controller dead"), 2 * MIN);
        t.record(&ev("nvme0", Kind::nvme_timeout(), Severity::Error, 5 * MIN, "timeout again"), 5 * MIN);
        let h = t.health("nvme0", 5 * MIN);
        assert_eq!((h.state, h.since_unix_ms), (State::Failed, 2 * MIN));
        assert_eq!(h.reason, "1 device_lost, 2 nvme_timeout in the last 5m; last: timeout again");
        // The critical event left the window at 7m; the last error at 5m keeps it degraded until 10m.
        let h = t.health("nvme0", 8 * MIN);
        assert_eq!((h.state, h.since_unix_ms), (State::Degraded, 7 * MIN));
        assert_eq!(h.reason, "1 nvme_timeout in the last 5m; last: timeout again");
        assert_eq!(t.health("nvme0", 10 * MIN).state, State::Healthy);
    }

    #[test]
    fn info_is_counted_but_leaves_the_state_alone() {
        let mut t = tracker();
        t.record(&ev("memory", Kind::oom_kill(), Severity::Info, MIN, "Memory cgroup out of memory"), MIN);
        let h = t.health("memory", MIN);
        assert_eq!((h.state, h.reason.as_str()), (State::Healthy, "no warnings or errors seen"));
        assert_eq!(t.count(&Kind::oom_kill(), Some("memory"), Duration::from_secs(60), MIN), 1);
    }

    #[test]
    fn a_run_of_errors_keeps_its_start() {
        let mut t = tracker();
        // Every 4 minutes for 20 minutes: never 5 quiet minutes, so degraded since the first.
        for at in (0..=5).map(|i| MIN + i * 4 * MIN) {
            t.record(&ev("sda", Kind::io_error(), Severity::Error, at, "e"), at);
        }
        assert_eq!(t.health("sda", 21 * MIN).since_unix_ms, MIN);
        // An old event read late (the kernel log's backlog at first start) does not make a device unhealthy.
        let mut t = tracker();
        t.record(&ev("sdb", Kind::io_error(), Severity::Error, MIN, "old"), 60 * MIN);
        assert_eq!(t.health("sdb", 60 * MIN).state, State::Healthy);
        assert_eq!(t.health("sdb", 60 * MIN).since_unix_ms, 6 * MIN);
    }

    #[test]
    fn counts_by_kind_device_and_window() {
        let mut t = tracker();
        t.record(&ev("sda", Kind::io_error(), Severity::Error, MIN, "a"), MIN);
        t.record(&ev("sdb", Kind::io_error(), Severity::Error, 2 * MIN, "b"), 2 * MIN);
        let mut big = ev("sdb", Kind::io_error(), Severity::Error, 3 * MIN, "c");
        big.delta = 5;
        t.record(&big, 3 * MIN);
        t.record(&ev("sdb", Kind::link_flap(), Severity::Warning, 3 * MIN, "d"), 3 * MIN);
        let io = Kind::io_error();
        assert_eq!(t.count(&io, None, Duration::from_secs(600), 3 * MIN), 7);
        assert_eq!(t.count(&io, Some("sdb"), Duration::from_secs(600), 3 * MIN), 6);
        assert_eq!(t.count(&io, Some("sdb"), Duration::from_secs(30), 3 * MIN), 5);
        assert_eq!(t.count(&io, Some("nope"), Duration::from_secs(600), 3 * MIN), 0);
        // Beyond the history, events are gone.
        t.prune(3 * MIN + 2 * 3_600_000);
        assert_eq!(t.count(&io, None, Duration::from_secs(100_000), 3 * MIN + 2 * 3_600_000), 0);
        assert_eq!(t.health("sdb", 3 * MIN + 2 * 3_600_000).errors["io_error"], 6, "totals stay");
    }

    #[test]
    fn devices_and_history_are_bounded() {
        let mut t = HealthTracker::new(Duration::from_secs(300), 2, 0);
        assert!(t.record(&ev("a", Kind::io_error(), Severity::Error, MIN, "x"), MIN));
        assert!(t.record(&ev("b", Kind::io_error(), Severity::Error, MIN, "x"), MIN));
        assert!(!t.record(&ev("c", Kind::io_error(), Severity::Error, MIN, "x"), MIN));
        assert!(t.record(&ev("a", Kind::io_error(), Severity::Error, MIN, "x"), MIN), "known devices go on");
        assert_eq!(t.dropped(), 1);
        // Hours later a and b are healthy with nothing in the history: room is made.
        let later = 3 * 3_600_000;
        assert!(t.record(&ev("c", Kind::io_error(), Severity::Error, later, "x"), later));
        assert_eq!(t.devices(later).len(), 1);
        let mut t = tracker();
        for i in 0..(MAX_EVENTS_PER_DEVICE as u64 + 10) {
            t.record(&ev("sda", Kind::io_error(), Severity::Error, MIN, "x"), MIN + i);
        }
        assert_eq!(
            t.count(&Kind::io_error(), Some("sda"), Duration::from_secs(60), MIN),
            MAX_EVENTS_PER_DEVICE as u64
        );
    }

    #[test]
    fn windows_read_as_people_write_them() {
        assert_eq!(human(300_000), "5m");
        assert_eq!(human(90_000), "90s");
        assert_eq!(human(7_200_000), "2h");
        assert_eq!(human(1500), "1500ms");
    }
}
