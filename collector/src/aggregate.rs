//! Joins one tick's inputs (discovered cgroups, probe maps, cgroupfs stats) into a [`Snapshot`], computes
//! rates against the previous tick, and enforces the export cap. Plain data in, data out: no kernel, no
//! clock, so every rule here is unit-tested.
//!
//! The cap: instances are admitted in order of first appearance and keep their place while they live; past
//! `max_instances` an instance is folded into one overflow series (counted once in `dropped_total`). The
//! overflow's counters include instances that have since vanished, so they never go backwards.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cgroupfs::CgroupStats;
use crate::discovery::DiscoveredCgroup;
use crate::probes::ProbeReadout;
use crate::snapshot::{Counters, InstanceKind, InstanceSnapshot, Memory, Pressure, Rates, Snapshot};

/// The `service` and `instance_id` of the overflow series.
pub const OVERFLOW: &str = "_overflow";

type Key = (Arc<str>, Arc<str>);

/// State carried between ticks.
#[derive(Debug, Default)]
pub struct Aggregator {
    tick: u64,
    /// Counters of every live instance at the previous tick, for rates and for the overflow's departed sum.
    previous: HashMap<Key, Counters>,
    admitted: HashSet<Key>,
    overflowed: HashSet<Key>,
    overflow_departed: Counters,
    overflow_previous: Counters,
    dropped_total: u64,
}

/// One cgroup's inputs for a tick.
pub struct TickInput<'a> {
    pub cgroup: &'a DiscoveredCgroup,
    pub stats: CgroupStats,
}

fn counters_of(input: &TickInput<'_>, probes: &ProbeReadout) -> Counters {
    let mut c = Counters::default();
    if let Some(id) = input.cgroup.cgroup_id {
        if let Some(f) = probes.faults.get(&id) {
            c.minor_faults = f.minor();
            c.major_faults = f.major;
        }
        if let Some(s) = probes.cpu.get(&id) {
            c.cpu_ns = s.on_cpu_ns;
            c.runq_delay_ns = s.runq_delay_ns;
            c.runq_delays = s.runq_count;
            c.runq_hist = s.runq_hist;
        }
    }
    if let Some(m) = input.cgroup.memcg_id.and_then(|id| probes.memcg.get(&id)) {
        c.swap_in_pages = m.swap_in_pages;
        c.swap_out_pages = m.swap_out_pages;
        c.memcg_major_faults = m.major_faults;
    }
    c.throttled_periods = input.stats.throttled_periods;
    c.throttled_ns = input.stats.throttled_ns;
    c
}

/// Per-second rates from two counter readings `elapsed` apart. A counter that went backwards (a cgroup
/// re-created under the same name) gives 0, not a negative rate.
pub fn rates(now: &Counters, before: Option<&Counters>, elapsed: Duration) -> Rates {
    let Some(b) = before else { return Rates::default() };
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return Rates::default();
    }
    let per_s = |n: u64, p: u64| n.saturating_sub(p) as f64 / secs;
    let delays = now.runq_delays.saturating_sub(b.runq_delays);
    Rates {
        minor_faults: per_s(now.minor_faults, b.minor_faults),
        major_faults: per_s(now.major_faults, b.major_faults),
        swap_in_pages: per_s(now.swap_in_pages, b.swap_in_pages),
        swap_out_pages: per_s(now.swap_out_pages, b.swap_out_pages),
        cpu_cores: per_s(now.cpu_ns, b.cpu_ns) / 1e9,
        runq_delay_mean_seconds: if delays == 0 {
            0.0
        } else {
            now.runq_delay_ns.saturating_sub(b.runq_delay_ns) as f64 / delays as f64 / 1e9
        },
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ticks taken so far.
    pub fn ticks(&self) -> u64 {
        self.tick
    }

    /// Builds the snapshot of this tick.
    pub fn tick(
        &mut self,
        inputs: &[TickInput<'_>],
        probes: &ProbeReadout,
        max_instances: usize,
        elapsed: Duration,
        taken_at: SystemTime,
    ) -> Snapshot {
        self.tick += 1;
        let mut previous = HashMap::with_capacity(inputs.len());
        let mut instances = Vec::with_capacity(inputs.len().min(max_instances));
        let mut live: HashSet<Key> = HashSet::with_capacity(inputs.len());
        let mut overflow_live = Counters::default();
        let mut overflow_memory = Memory::default();
        let mut overflow_count = 0usize;

        // Instances that vanished free their slot before new ones are admitted.
        for input in inputs {
            let id = &input.cgroup.identity;
            live.insert((Arc::from(id.service.as_str()), Arc::from(id.instance_id.as_str())));
        }
        self.admitted.retain(|k| live.contains(k));
        let gone: Vec<Key> = self.overflowed.iter().filter(|k| !live.contains(*k)).cloned().collect();
        for k in gone {
            if let Some(last) = self.previous.get(&k) {
                self.overflow_departed.add(last);
            }
            self.overflowed.remove(&k);
        }

        for input in inputs {
            let id = &input.cgroup.identity;
            let key: Key = (Arc::from(id.service.as_str()), Arc::from(id.instance_id.as_str()));
            let counters = counters_of(input, probes);
            let admitted = self.admitted.contains(&key)
                || (!self.overflowed.contains(&key) && self.admitted.len() < max_instances && {
                    self.admitted.insert(key.clone());
                    true
                });
            if admitted {
                let r = rates(&counters, self.previous.get(&key), elapsed);
                instances.push(InstanceSnapshot {
                    service: key.0.clone(),
                    instance_id: key.1.clone(),
                    kind: id.kind,
                    cgroup: Arc::from(
                        input
                            .cgroup
                            .paths
                            .v2
                            .as_deref()
                            .or(input.cgroup.paths.memory_v1.as_deref())
                            .unwrap_or("/"),
                    ),
                    cgroup_id: input.cgroup.cgroup_id,
                    memcg_id: input.cgroup.memcg_id,
                    counters,
                    rates: r,
                    memory: input.stats.memory,
                    pressure: input.stats.pressure,
                });
            } else {
                if self.overflowed.insert(key.clone()) {
                    self.dropped_total += 1;
                }
                overflow_live.add(&counters);
                overflow_count += 1;
                let m = input.stats.memory;
                overflow_memory.resident_bytes = sum_opt(overflow_memory.resident_bytes, m.resident_bytes);
                overflow_memory.swap_bytes = sum_opt(overflow_memory.swap_bytes, m.swap_bytes);
            }
            previous.insert(key, counters);
        }
        self.previous = previous;
        instances.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));

        let overflow = (overflow_count > 0 || !self.overflow_departed.eq(&Counters::default())).then(|| {
            let mut c = self.overflow_departed;
            c.add(&overflow_live);
            let r = rates(&c, Some(&self.overflow_previous), elapsed);
            self.overflow_previous = c;
            let name: Arc<str> = Arc::from(OVERFLOW);
            InstanceSnapshot {
                service: name.clone(),
                instance_id: name.clone(),
                kind: InstanceKind::Other,
                cgroup: name,
                cgroup_id: None,
                memcg_id: None,
                counters: c,
                rates: r,
                memory: overflow_memory,
                pressure: Pressure::default(),
            }
        });

        Snapshot {
            tick: self.tick,
            taken_at,
            elapsed,
            instances,
            overflow,
            dropped_total: self.dropped_total,
            probe_errors: probes.errors,
        }
    }
}

fn sum_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroupfs::CgroupPaths;
    use crate::discovery::Identity;
    use vigil_common::{CpuStats, FaultCounts, MemcgCounts};

    fn cg(name: &str, id: u64, memcg: u64) -> DiscoveredCgroup {
        DiscoveredCgroup {
            identity: Identity {
                service: name.to_string(),
                instance_id: format!("cg:/{name}"),
                kind: InstanceKind::Other,
            },
            paths: CgroupPaths { v2: Some(format!("/{name}")), ..Default::default() },
            cgroup_id: Some(id),
            memcg_id: Some(memcg),
        }
    }

    fn readout(entries: &[(u64, u64, u64, u64)]) -> ProbeReadout {
        // (cgroup id, minor faults, memcg id, swap-in pages)
        let mut r = ProbeReadout::default();
        for &(id, minor, memcg, swapin) in entries {
            r.faults.insert(id, FaultCounts { all: minor + 1, major: 1 });
            r.memcg.insert(memcg, MemcgCounts { swap_in_pages: swapin, swap_out_pages: 0, major_faults: 1 });
            r.cpu.insert(id, CpuStats { on_cpu_ns: minor * 1_000_000, ..Default::default() });
        }
        r
    }

    fn inputs(cgs: &[DiscoveredCgroup]) -> Vec<TickInput<'_>> {
        cgs.iter().map(|c| TickInput { cgroup: c, stats: CgroupStats::default() }).collect()
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn joins_v2_and_memcg_ids_and_computes_rates() {
        let cgs = vec![cg("a", 10, 100)];
        let mut agg = Aggregator::new();
        let s1 = agg.tick(&inputs(&cgs), &readout(&[(10, 5, 100, 7)]), 10, SEC, SystemTime::UNIX_EPOCH);
        let a = &s1.instances[0];
        assert_eq!((a.counters.minor_faults, a.counters.swap_in_pages, a.counters.cpu_ns), (5, 7, 5_000_000));
        assert_eq!(a.rates, Rates::default(), "no rate on the first tick");
        let s2 = agg.tick(&inputs(&cgs), &readout(&[(10, 25, 100, 9)]), 10, 2 * SEC, SystemTime::UNIX_EPOCH);
        let a = &s2.instances[0];
        assert_eq!(a.rates.minor_faults, 10.0);
        assert_eq!(a.rates.swap_in_pages, 1.0);
        assert_eq!(a.rates.cpu_cores, 0.01);
        assert_eq!(s2.tick, 2);
    }

    #[test]
    fn cap_folds_the_rest_into_a_monotonic_overflow() {
        let cgs = vec![cg("a", 1, 1), cg("b", 2, 2), cg("c", 3, 3)];
        let mut agg = Aggregator::new();
        let s = agg.tick(
            &inputs(&cgs),
            &readout(&[(1, 1, 1, 0), (2, 2, 2, 0), (3, 4, 3, 0)]),
            1,
            SEC,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(s.instances.len(), 1);
        assert_eq!(&*s.instances[0].service, "a");
        let o = s.overflow.as_ref().unwrap();
        assert_eq!(o.counters.minor_faults, 6);
        assert_eq!(s.dropped_total, 2);
        // "c" vanishes: its faults stay in the overflow sum; dropped_total does not move.
        let cgs2 = vec![cg("a", 1, 1), cg("b", 2, 2)];
        let s =
            agg.tick(&inputs(&cgs2), &readout(&[(1, 1, 1, 0), (2, 3, 2, 0)]), 1, SEC, SystemTime::UNIX_EPOCH);
        assert_eq!(s.overflow.as_ref().unwrap().counters.minor_faults, 7);
        assert_eq!(s.dropped_total, 2);
        // "a" vanishes: its slot goes to the next new instance, not to one already overflowed.
        let cgs3 = vec![cg("b", 2, 2), cg("d", 4, 4)];
        let s =
            agg.tick(&inputs(&cgs3), &readout(&[(2, 3, 2, 0), (4, 1, 4, 0)]), 1, SEC, SystemTime::UNIX_EPOCH);
        assert_eq!(s.instances.iter().map(|i| &*i.service).collect::<Vec<_>>(), vec!["d"]);
        assert_eq!(s.overflow.as_ref().unwrap().counters.minor_faults, 7);
    }

    #[test]
    fn counters_going_backwards_give_zero_rate() {
        let before = Counters { minor_faults: 10, ..Default::default() };
        let now = Counters { minor_faults: 3, ..Default::default() };
        assert_eq!(rates(&now, Some(&before), SEC).minor_faults, 0.0);
    }

    #[test]
    fn memory_only_instances_have_no_probe_counters() {
        let mut c = cg("m", 0, 50);
        c.cgroup_id = None;
        let mut agg = Aggregator::new();
        let s = agg.tick(&inputs(&[c]), &readout(&[(0, 9, 50, 4)]), 10, SEC, SystemTime::UNIX_EPOCH);
        assert_eq!(s.instances[0].counters.minor_faults, 0);
        assert_eq!(s.instances[0].counters.swap_in_pages, 4);
    }
}
