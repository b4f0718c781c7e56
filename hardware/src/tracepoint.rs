//! The seam for tracepoint counts: the collector's eBPF programs (block_rq_error, mce_record, ...) count
//! in the kernel and expose cumulative totals through [`TracepointSource`]; the monitor reads them every
//! poll tick and turns each rise into a [`HardwareEvent`] with [`Source::Tracepoint`], so tracepoints reach
//! the same health, metrics and subscribers as the kernel log and sysfs.

use std::collections::HashMap;

use serde::Serialize;

use crate::event::{HardwareEvent, Kind, Severity, Source};

/// One cumulative count a tracepoint program keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TracepointCount {
    /// `block:block_rq_error`, `mce:mce_record`.
    pub tracepoint: String,
    pub device: String,
    pub kind: Kind,
    pub severity: Severity,
    /// Since the program was attached; it only grows (a total that goes down starts a new count).
    pub total: u64,
}

/// Tracepoint counts, implemented by the collector.
pub trait TracepointSource: Send + Sync {
    /// `(tracepoint, attached, why not)` for each tracepoint the source would use.
    fn report(&self) -> Vec<(String, bool, String)>;
    /// Every count, cumulative. Called once per poll tick, off the async runtime: keep it cheap (a map read).
    fn read(&self) -> Vec<TracepointCount>;
}

/// Turns cumulative totals into events by their rise since the last read. Totals count from the program's
/// attachment, in this process, so a total seen for the first time rose from zero.
#[derive(Debug, Default)]
pub struct TracepointDeltas {
    last: HashMap<(String, String, Kind), u64>,
}

impl TracepointDeltas {
    pub fn events(&mut self, counts: Vec<TracepointCount>, now_ms: u64) -> Vec<HardwareEvent> {
        let mut out = Vec::new();
        for c in counts {
            let key = (c.tracepoint.clone(), c.device.clone(), c.kind.clone());
            let before = self.last.insert(key, c.total).unwrap_or(0);
            if c.total > before {
                let delta = c.total - before;
                out.push(HardwareEvent {
                    message: format!("{}: {delta} {} from tracepoint {}", c.device, c.kind, c.tracepoint),
                    counter: format!("tracepoint:{}", c.tracepoint),
                    device: c.device,
                    kind: c.kind,
                    severity: c.severity,
                    source: Source::Tracepoint,
                    delta,
                    at_unix_ms: now_ms,
                    kmsg: None,
                });
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A source whose totals a test sets.
    #[derive(Default)]
    pub(crate) struct FakeTracepoints(pub Mutex<Vec<TracepointCount>>);

    impl TracepointSource for FakeTracepoints {
        fn report(&self) -> Vec<(String, bool, String)> {
            vec![
                ("block:block_rq_error".into(), true, String::new()),
                ("mce:mce_record".into(), false, "no MCE on this host".into()),
            ]
        }
        fn read(&self) -> Vec<TracepointCount> {
            self.0.lock().unwrap().clone()
        }
    }

    pub(crate) fn count(device: &str, total: u64) -> TracepointCount {
        TracepointCount {
            tracepoint: "block:block_rq_error".into(),
            device: device.into(),
            kind: Kind::io_error(),
            severity: Severity::Error,
            total,
        }
    }

    #[test]
    fn rises_become_events_and_a_drop_starts_over() {
        let mut d = TracepointDeltas::default();
        let e = d.events(vec![count("sda", 2), count("sdb", 0)], 5);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].device.as_str(), e[0].delta, e[0].source), ("sda", 2, Source::Tracepoint));
        assert_eq!(e[0].counter, "tracepoint:block:block_rq_error");
        assert!(d.events(vec![count("sda", 2)], 6).is_empty());
        assert_eq!(d.events(vec![count("sda", 5)], 7)[0].delta, 3);
        assert!(d.events(vec![count("sda", 1)], 8).is_empty(), "reattached: a new count");
        assert_eq!(d.events(vec![count("sda", 4)], 9)[0].delta, 3);
    }
}
