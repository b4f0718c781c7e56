//! Hardware counters from sysfs, in the formats the kernel documents, read below a configurable root (so
//! the readers run on fixture trees in tests):
//!
//! - EDAC (Documentation/ABI/testing/sysfs-devices-edac): `devices/system/edac/mc/mc*/{ce_count,ue_count}`
//!   and per DIMM (or rank) `mc*/dimm*/{dimm_ce_count,dimm_ue_count}`: devices `mc0`, `mc0/dimm1`.
//! - PCIe AER (Documentation/ABI/testing/sysfs-bus-pci-devices-aer):
//!   `bus/pci/devices/*/aer_dev_{correctable,nonfatal,fatal}`, lines `NAME COUNT` ending with
//!   `TOTAL_ERR_COR`, `TOTAL_ERR_NONFATAL` or `TOTAL_ERR_FATAL`: device `0000:03:00.0`.
//! - `class/net/*/carrier_changes` of interfaces backed by a device (a `device` link: veths and bridges flap
//!   by design): device `eth0`.
//! - `devices/system/cpu/cpu*/thermal_throttle/{core,package}_throttle_count`: devices `cpu0` and
//!   `package0` (the package count is the same file under every CPU of the package: read once).
//! - `block/*/stat` (Documentation/block/stat.rst): the I/O latency of each interval, Δ(read ticks + write
//!   ticks) / Δ(reads + writes), a gauge rather than an event.
//! - `class/nvme/nvme*/state`: `dead` is a lost device (critical), `live` → `resetting`/`connecting` a reset.
//!
//! A counter becomes an event when it rose since the last reading, by that much. The first reading of a
//! counter is its baseline; a counter that went down (the device was replaced, the driver reloaded) is a
//! new baseline, never a negative delta. The readings are handed back for [`crate::state`] to keep across a
//! restart (in the same boot), so errors that happened while Vigil was down are reported once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::{HardwareEvent, Kind, Severity, Source};

/// The last readings: counters by key, and NVMe controller states.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readings {
    pub counters: BTreeMap<String, u64>,
    pub states: BTreeMap<String, String>,
}

/// Whether one family of counters exists on this host, and why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub available: bool,
    /// What is read, or why it is not there.
    pub detail: String,
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub events: Vec<HardwareEvent>,
    /// `(block device, seconds per I/O over the last interval; 0 without I/O)`.
    pub latencies: Vec<(String, f64)>,
    pub sources: Vec<SourceStatus>,
    /// Files that exist but could not be read or parsed: `path: why`.
    pub errors: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockStat {
    ios: u64,
    ticks_ms: u64,
}

/// The scanner over one sysfs root, with its last readings.
#[derive(Debug)]
pub struct SysfsScanner {
    root: PathBuf,
    readings: Readings,
    blocks: BTreeMap<String, BlockStat>,
}

/// Entries of `dir` whose names start with `prefix` followed by a digit, sorted (absent dir: none).
fn numbered(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.strip_prefix(prefix).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())))
        .collect();
    names.sort();
    names
}

/// Every entry of `dir`, sorted (absent dir: none).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// A file of one unsigned number.
pub fn parse_count(text: &str) -> Result<u64, String> {
    let t = text.trim();
    t.parse().map_err(|_| format!("{t:?} is not a count"))
}

/// An AER counter file: `NAME COUNT` lines. Returns the `total` line's count and the other lines that are
/// not zero.
pub fn parse_aer(text: &str, total: &str) -> Result<(u64, Vec<(String, u64)>), String> {
    let mut sum = None;
    let mut nonzero = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let (Some(name), Some(count), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("line {line:?} is not `NAME COUNT`"));
        };
        let count: u64 = count.parse().map_err(|_| format!("line {line:?}: {count:?} is not a count"))?;
        if name == total {
            sum = Some(count);
        } else if count > 0 {
            nonzero.push((name.to_string(), count));
        }
    }
    sum.map(|s| (s, nonzero)).ok_or_else(|| format!("no {total} line"))
}

/// `block/*/stat`: reads + writes completed, and the milliseconds they took (fields 1, 4, 5 and 8 of
/// Documentation/block/stat.rst; kernels write 11, 15 or 17 fields).
fn parse_block_stat(text: &str) -> Result<BlockStat, String> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| f.parse::<u64>().map_err(|_| format!("{f:?} is not a count")))
        .collect::<Result<_, _>>()?;
    if fields.len() < 8 {
        return Err(format!("{} fields, expected at least 8", fields.len()));
    }
    Ok(BlockStat { ios: fields[0].saturating_add(fields[4]), ticks_ms: fields[3].saturating_add(fields[7]) })
}

/// What rising by `delta` means, for the event's sentence.
struct Rise<'a> {
    device: &'a str,
    kind: Kind,
    severity: Severity,
    counter: String,
    what: &'a str,
}

impl SysfsScanner {
    pub fn new(root: impl Into<PathBuf>, readings: Readings) -> SysfsScanner {
        SysfsScanner { root: root.into(), readings, blocks: BTreeMap::new() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The readings to keep across a restart.
    pub fn readings(&self) -> &Readings {
        &self.readings
    }

    /// Reads every counter once; `now_ms` stamps the events.
    pub fn scan(&mut self, now_ms: u64) -> Scan {
        let mut scan = Scan::default();
        let mut seen = BTreeSet::new();
        self.edac(now_ms, &mut scan, &mut seen);
        self.aer(now_ms, &mut scan, &mut seen);
        self.net(now_ms, &mut scan, &mut seen);
        self.thermal(now_ms, &mut scan, &mut seen);
        self.block(&mut scan);
        self.nvme(now_ms, &mut scan, &mut seen);
        // Counters of devices that are gone are forgotten: one that comes back starts from a new baseline.
        self.readings.counters.retain(|k, _| seen.contains(k));
        self.readings.states.retain(|k, _| seen.contains(k));
        scan
    }

    fn read(&self, path: &Path, scan: &mut Scan) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                scan.errors.push(format!("{}: {e}", path.display()));
                None
            }
        }
    }

    /// Reads a one-number file; `None` when absent or unreadable (then counted as an error).
    fn read_count(&self, path: &Path, scan: &mut Scan) -> Option<u64> {
        let text = self.read(path, scan)?;
        parse_count(&text).map_err(|why| scan.errors.push(format!("{}: {why}", path.display()))).ok()
    }

    /// Records `value` for `key`; the rise since the last reading, when it rose.
    fn rise(&mut self, key: &str, value: u64, seen: &mut BTreeSet<String>) -> Option<(u64, u64)> {
        seen.insert(key.to_string());
        let previous = self.readings.counters.insert(key.to_string(), value)?;
        (value > previous).then_some((previous, value))
    }

    fn counter(
        &mut self,
        key: String,
        value: u64,
        rise: Rise<'_>,
        now_ms: u64,
        scan: &mut Scan,
        seen: &mut BTreeSet<String>,
    ) {
        if let Some((before, after)) = self.rise(&key, value, seen) {
            let delta = after - before;
            scan.events.push(HardwareEvent {
                device: rise.device.to_string(),
                kind: rise.kind,
                severity: rise.severity,
                source: Source::Sysfs,
                message: format!(
                    "{}: {delta} {} ({} {before} -> {after})",
                    rise.device, rise.what, rise.counter
                ),
                counter: rise.counter,
                delta,
                at_unix_ms: now_ms,
                kmsg: None,
            });
        }
    }

    fn edac(&mut self, now_ms: u64, scan: &mut Scan, seen: &mut BTreeSet<String>) {
        let dir = self.root.join("devices/system/edac/mc");
        let mcs = numbered(&dir, "mc");
        scan.sources.push(if dir.is_dir() {
            SourceStatus {
                name: "edac".into(),
                available: true,
                detail: format!("{} memory controllers under {}", mcs.len(), dir.display()),
            }
        } else {
            SourceStatus {
                name: "edac".into(),
                available: false,
                detail: format!("no EDAC: {} absent", dir.display()),
            }
        });
        for mc in mcs {
            let mc_dir = dir.join(&mc);
            let mut units = vec![(mc.clone(), mc_dir.clone(), "ce_count", "ue_count")];
            for unit in numbered(&mc_dir, "dimm").into_iter().chain(numbered(&mc_dir, "rank")) {
                units.push((format!("{mc}/{unit}"), mc_dir.join(&unit), "dimm_ce_count", "dimm_ue_count"));
            }
            for (device, unit_dir, ce, ue) in units {
                for (file, kind, severity, what) in [
                    (ce, Kind::memory_ce(), Severity::Warning, "corrected memory errors"),
                    (ue, Kind::memory_ue(), Severity::Critical, "uncorrected memory errors"),
                ] {
                    if let Some(value) = self.read_count(&unit_dir.join(file), scan) {
                        let counter = format!("{device}/{file}");
                        let rise = Rise { device: &device, kind, severity, counter: counter.clone(), what };
                        self.counter(format!("edac/{counter}"), value, rise, now_ms, scan, seen);
                    }
                }
            }
        }
    }

    fn aer(&mut self, now_ms: u64, scan: &mut Scan, seen: &mut BTreeSet<String>) {
        let dir = self.root.join("bus/pci/devices");
        let mut reporting = 0;
        for bdf in entries(&dir) {
            let mut any = false;
            for (file, total, kind, severity, what) in [
                (
                    "aer_dev_correctable",
                    "TOTAL_ERR_COR",
                    Kind::pcie_correctable(),
                    Severity::Warning,
                    "correctable",
                ),
                (
                    "aer_dev_nonfatal",
                    "TOTAL_ERR_NONFATAL",
                    Kind::pcie_nonfatal(),
                    Severity::Error,
                    "non-fatal",
                ),
                ("aer_dev_fatal", "TOTAL_ERR_FATAL", Kind::pcie_fatal(), Severity::Critical, "fatal"),
            ] {
                let path = dir.join(&bdf).join(file);
                let Some(text) = self.read(&path, scan) else { continue };
                any = true;
                match parse_aer(&text, total) {
                    Ok((sum, nonzero)) => {
                        let counter = format!("{bdf}/{file}");
                        let listed =
                            nonzero.iter().map(|(n, c)| format!("{n} {c}")).collect::<Vec<_>>().join(", ");
                        let what = if listed.is_empty() {
                            format!("PCIe {what} errors")
                        } else {
                            format!("PCIe {what} errors; so far: {listed}")
                        };
                        let rise =
                            Rise { device: &bdf, kind, severity, counter: counter.clone(), what: &what };
                        self.counter(format!("aer/{counter}"), sum, rise, now_ms, scan, seen);
                    }
                    Err(why) => scan.errors.push(format!("{}: {why}", path.display())),
                }
            }
            reporting += usize::from(any);
        }
        scan.sources.push(SourceStatus {
            name: "pcie_aer".into(),
            available: reporting > 0,
            detail: if reporting > 0 {
                format!("{reporting} PCI devices with AER counters under {}", dir.display())
            } else {
                format!("no PCIe AER counters: no device under {} has aer_dev_* files", dir.display())
            },
        });
    }

    fn net(&mut self, now_ms: u64, scan: &mut Scan, seen: &mut BTreeSet<String>) {
        let dir = self.root.join("class/net");
        let mut watched = 0;
        for iface in entries(&dir) {
            let iface_dir = dir.join(&iface);
            if !iface_dir.join("device").exists() {
                continue;
            }
            if let Some(value) = self.read_count(&iface_dir.join("carrier_changes"), scan) {
                watched += 1;
                let counter = format!("{iface}/carrier_changes");
                let rise = Rise {
                    device: &iface,
                    kind: Kind::link_flap(),
                    severity: Severity::Warning,
                    counter: counter.clone(),
                    what: "carrier changes",
                };
                self.counter(format!("net/{counter}"), value, rise, now_ms, scan, seen);
            }
        }
        scan.sources.push(SourceStatus {
            name: "net_carrier".into(),
            available: watched > 0,
            detail: if watched > 0 {
                format!("{watched} interfaces backed by a device under {}", dir.display())
            } else {
                format!("no network interface backed by a device under {}", dir.display())
            },
        });
    }

    fn thermal(&mut self, now_ms: u64, scan: &mut Scan, seen: &mut BTreeSet<String>) {
        let dir = self.root.join("devices/system/cpu");
        let mut watched = 0;
        let mut packages_read = BTreeSet::new();
        for cpu in numbered(&dir, "cpu") {
            let tt = dir.join(&cpu).join("thermal_throttle");
            if !tt.is_dir() {
                continue;
            }
            watched += 1;
            if let Some(value) = self.read_count(&tt.join("core_throttle_count"), scan) {
                let counter = format!("{cpu}/core_throttle_count");
                let rise = Rise {
                    device: &cpu,
                    kind: Kind::thermal_throttle(),
                    severity: Severity::Warning,
                    counter: counter.clone(),
                    what: "core thermal throttling events",
                };
                self.counter(format!("thermal/{counter}"), value, rise, now_ms, scan, seen);
            }
            let package = self
                .read_count(&dir.join(&cpu).join("topology/physical_package_id"), scan)
                .map_or_else(|| cpu.clone(), |id| format!("package{id}"));
            if !packages_read.insert(package.clone()) {
                continue;
            }
            if let Some(value) = self.read_count(&tt.join("package_throttle_count"), scan) {
                let counter = format!("{package}/package_throttle_count");
                let rise = Rise {
                    device: &package,
                    kind: Kind::thermal_throttle(),
                    severity: Severity::Warning,
                    counter: counter.clone(),
                    what: "package thermal throttling events",
                };
                self.counter(format!("thermal/{counter}"), value, rise, now_ms, scan, seen);
            }
        }
        scan.sources.push(SourceStatus {
            name: "thermal_throttle".into(),
            available: watched > 0,
            detail: if watched > 0 {
                format!("{watched} CPUs with thermal_throttle counters under {}", dir.display())
            } else {
                format!("no thermal throttle counters: no {}/cpu*/thermal_throttle", dir.display())
            },
        });
    }

    fn block(&mut self, scan: &mut Scan) {
        let dir = self.root.join("block");
        let mut live = BTreeSet::new();
        for dev in entries(&dir) {
            let path = dir.join(&dev).join("stat");
            let Some(text) = self.read(&path, scan) else { continue };
            let now = match parse_block_stat(&text) {
                Ok(s) => s,
                Err(why) => {
                    scan.errors.push(format!("{}: {why}", path.display()));
                    continue;
                }
            };
            // A device that never did I/O (most loop and ram devices) has no latency to show.
            if now.ios == 0 {
                continue;
            }
            live.insert(dev.clone());
            if let Some(before) = self.blocks.insert(dev.clone(), now) {
                let ios = now.ios.saturating_sub(before.ios);
                let ticks = now.ticks_ms.saturating_sub(before.ticks_ms);
                let seconds =
                    if ios == 0 || now.ios < before.ios { 0.0 } else { ticks as f64 / ios as f64 / 1000.0 };
                scan.latencies.push((dev, seconds));
            }
        }
        self.blocks.retain(|d, _| live.contains(d));
        scan.sources.push(SourceStatus {
            name: "block_stat".into(),
            available: dir.is_dir(),
            detail: if dir.is_dir() {
                format!("I/O latency of {} block devices with I/O under {}", live.len(), dir.display())
            } else {
                format!("no block devices: {} absent", dir.display())
            },
        });
    }

    fn nvme(&mut self, now_ms: u64, scan: &mut Scan, seen: &mut BTreeSet<String>) {
        let dir = self.root.join("class/nvme");
        let controllers = numbered(&dir, "nvme");
        for ctrl in &controllers {
            let path = dir.join(ctrl).join("state");
            let Some(text) = self.read(&path, scan) else { continue };
            let state = text.trim().to_string();
            let key = format!("nvme/{ctrl}/state");
            seen.insert(key.clone());
            let before = self.readings.states.insert(key, state.clone());
            let event = |kind, severity, message: String| HardwareEvent {
                device: ctrl.clone(),
                kind,
                severity,
                source: Source::Sysfs,
                counter: format!("{ctrl}/state"),
                delta: 1,
                message,
                at_unix_ms: now_ms,
                kmsg: None,
            };
            let was = before.as_deref();
            if state == "dead" && was != Some("dead") {
                let from = was.map(|w| format!(" (was {w})")).unwrap_or_default();
                scan.events.push(event(
                    Kind::device_lost(),
                    Severity::Critical,
                    format!("{ctrl}: controller dead{from}"),
                ));
            } else if was == Some("live") && matches!(state.as_str(), "resetting" | "connecting") {
                scan.events.push(event(
                    Kind::nvme_reset(),
                    Severity::Warning,
                    format!("{ctrl}: controller state live -> {state}"),
                ));
            }
        }
        scan.sources.push(if dir.is_dir() {
            SourceStatus {
                name: "nvme_state".into(),
                available: true,
                detail: format!("{} NVMe controllers under {}", controllers.len(), dir.display()),
            }
        } else {
            SourceStatus {
                name: "nvme_state".into(),
                available: false,
                detail: format!("no NVMe controllers: {} absent", dir.display()),
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory removed on drop: the fixture trees' root.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("vigil-hw-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// Writes `text` at `rel`, creating its directories.
        pub(crate) fn write(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }

        pub(crate) fn remove(&self, rel: &str) {
            std::fs::remove_dir_all(self.0.join(rel)).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An AER file as the kernel writes it (aer_stats_attrs: one `NAME COUNT` line per error bit).
    fn aer_correctable(bad_tlp: u64, rx: u64) -> String {
        format!(
            "RxErr {rx}\nBadTLP {bad_tlp}\nBadDLLP 0\nRollover 0\nTimeout 0\nNonFatalErr 0\nCorrIntErr 0\n\
             HeaderOF 0\nTOTAL_ERR_COR {}\n",
            bad_tlp + rx
        )
    }

    /// Counter values of [`host`]: mc0 CE, mc0 UE, mc0/dimm1 CE, AER (BadTLP, RxErr), eth0 carrier changes,
    /// throttle counts, nvme0 state.
    struct Counts(u64, u64, u64, (u64, u64), u64, u64, &'static str);

    /// A host with one of everything.
    fn host(t: &TempDir, Counts(ce, ue, dimm_ce, aer, carrier, throttle, nvme): Counts) {
        t.write("devices/system/edac/mc/mc0/ce_count", &format!("{ce}\n"));
        t.write("devices/system/edac/mc/mc0/ue_count", &format!("{ue}\n"));
        t.write("devices/system/edac/mc/mc0/dimm1/dimm_ce_count", &format!("{dimm_ce}\n"));
        t.write("devices/system/edac/mc/mc0/dimm1/dimm_ue_count", "0\n");
        t.write("bus/pci/devices/0000:03:00.0/aer_dev_correctable", &aer_correctable(aer.0, aer.1));
        t.write(
            "bus/pci/devices/0000:03:00.0/aer_dev_nonfatal",
            "Undefined 0\nDLP 0\nTOTAL_ERR_NONFATAL 0\n",
        );
        t.write("bus/pci/devices/0000:03:00.0/aer_dev_fatal", "Undefined 0\nDLP 0\nTOTAL_ERR_FATAL 0\n");
        t.write("bus/pci/devices/0000:00:00.0/vendor", "0x8086\n");
        t.write("class/net/eth0/carrier_changes", &format!("{carrier}\n"));
        t.write("class/net/eth0/device/vendor", "0x1af4\n");
        t.write("class/net/veth1/carrier_changes", "99\n");
        for cpu in ["cpu0", "cpu1"] {
            t.write(
                &format!("devices/system/cpu/{cpu}/thermal_throttle/core_throttle_count"),
                &format!("{throttle}\n"),
            );
            t.write(
                &format!("devices/system/cpu/{cpu}/thermal_throttle/package_throttle_count"),
                &format!("{throttle}\n"),
            );
            t.write(&format!("devices/system/cpu/{cpu}/topology/physical_package_id"), "0\n");
        }
        t.write("class/nvme/nvme0/state", &format!("{nvme}\n"));
    }

    fn summary(scan: &Scan) -> Vec<(String, String, String, u64)> {
        scan.events
            .iter()
            .map(|e| (e.device.clone(), e.kind.to_string(), e.counter.clone(), e.delta))
            .collect()
    }

    fn s(device: &str, kind: &str, counter: &str, delta: u64) -> (String, String, String, u64) {
        (device.into(), kind.into(), counter.into(), delta)
    }

    #[test]
    fn the_first_reading_is_a_baseline_and_rises_are_events() {
        let t = TempDir::new("delta");
        host(&t, Counts(0, 0, 0, (0, 0), 2, 0, "live"));
        let mut scanner = SysfsScanner::new(&t.0, Readings::default());
        let first = scanner.scan(1000);
        assert_eq!(summary(&first), [], "a baseline");
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert!(first.sources.iter().all(|s| s.available || s.name == "block_stat"), "{:?}", first.sources);

        host(&t, Counts(2, 1, 2, (3, 1), 4, 5, "resetting"));
        let second = scanner.scan(2000);
        assert_eq!(
            summary(&second),
            [
                s("mc0", "memory_ce", "mc0/ce_count", 2),
                s("mc0", "memory_ue", "mc0/ue_count", 1),
                s("mc0/dimm1", "memory_ce", "mc0/dimm1/dimm_ce_count", 2),
                s("0000:03:00.0", "pcie_correctable", "0000:03:00.0/aer_dev_correctable", 4),
                s("eth0", "link_flap", "eth0/carrier_changes", 2),
                s("cpu0", "thermal_throttle", "cpu0/core_throttle_count", 5),
                s("package0", "thermal_throttle", "package0/package_throttle_count", 5),
                s("cpu1", "thermal_throttle", "cpu1/core_throttle_count", 5),
                s("nvme0", "nvme_reset", "nvme0/state", 1),
            ]
        );
        let ue = &second.events[1];
        assert_eq!((ue.severity, ue.source, ue.at_unix_ms), (Severity::Critical, Source::Sysfs, 2000));
        assert_eq!(ue.message, "mc0: 1 uncorrected memory errors (mc0/ue_count 0 -> 1)");
        assert_eq!(
            second.events[3].message,
            "0000:03:00.0: 4 PCIe correctable errors; so far: RxErr 1, BadTLP 3 \
             (0000:03:00.0/aer_dev_correctable 0 -> 4)"
        );
        // Nothing new: nothing reported.
        assert_eq!(summary(&scanner.scan(3000)), []);
    }

    #[test]
    fn readings_kept_across_a_restart_report_what_happened_meanwhile_once() {
        let t = TempDir::new("restart");
        host(&t, Counts(1, 0, 0, (0, 0), 0, 0, "live"));
        let mut scanner = SysfsScanner::new(&t.0, Readings::default());
        scanner.scan(1);
        let kept = serde_json::to_string(scanner.readings()).unwrap();
        drop(scanner);
        // Down while two more corrected errors happened.
        host(&t, Counts(3, 0, 0, (0, 0), 0, 0, "live"));
        let mut scanner = SysfsScanner::new(&t.0, serde_json::from_str(&kept).unwrap());
        assert_eq!(summary(&scanner.scan(2)), [s("mc0", "memory_ce", "mc0/ce_count", 2)]);
        assert_eq!(summary(&scanner.scan(3)), []);
    }

    #[test]
    fn a_counter_that_goes_down_is_a_new_baseline() {
        let t = TempDir::new("reset");
        host(&t, Counts(5, 0, 0, (0, 0), 10, 0, "live"));
        let mut scanner = SysfsScanner::new(&t.0, Readings::default());
        scanner.scan(1);
        // The NIC was replaced, the memory controller's driver reloaded: counters start again.
        host(&t, Counts(0, 0, 0, (0, 0), 1, 0, "live"));
        assert_eq!(summary(&scanner.scan(2)), []);
        host(&t, Counts(1, 0, 0, (0, 0), 2, 0, "live"));
        assert_eq!(
            summary(&scanner.scan(3)),
            [s("mc0", "memory_ce", "mc0/ce_count", 1), s("eth0", "link_flap", "eth0/carrier_changes", 1)]
        );
        // A device that disappears is forgotten; when it comes back its first reading is a baseline again.
        t.remove("class/net/eth0");
        scanner.scan(4);
        host(&t, Counts(1, 0, 0, (0, 0), 7, 0, "live"));
        assert_eq!(summary(&scanner.scan(5)), []);
    }

    #[test]
    fn a_dead_controller_is_a_lost_device_once() {
        let t = TempDir::new("nvme");
        t.write("class/nvme/nvme0/state", "dead\n");
        t.write("class/nvme/nvme1/state", "live\n");
        let mut scanner = SysfsScanner::new(&t.0, Readings::default());
        let scan = scanner.scan(1);
        assert_eq!(summary(&scan), [s("nvme0", "device_lost", "nvme0/state", 1)], "dead from the start");
        assert_eq!(scan.events[0].severity, Severity::Critical);
        t.write("class/nvme/nvme1/state", "connecting\n");
        assert_eq!(summary(&scanner.scan(2)), [s("nvme1", "nvme_reset", "nvme1/state", 1)]);
        t.write("class/nvme/nvme1/state", "dead\n");
        let scan = scanner.scan(3);
        assert_eq!(summary(&scan), [s("nvme1", "device_lost", "nvme1/state", 1)]);
        assert_eq!(scan.events[0].message, "nvme1: controller dead (was connecting)");
        assert_eq!(summary(&scanner.scan(4)), []);
    }

    #[test]
    fn io_latency_comes_from_the_stat_counters() {
        let t = TempDir::new("block");
        // Documentation/block/stat.rst's 17 fields.
        t.write("block/sda/stat", "100 0 800 50 100 0 800 150 0 90 200 0 0 0 0 0 0\n");
        t.write("block/loop0/stat", "0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n");
        let mut scanner = SysfsScanner::new(&t.0, Readings::default());
        assert!(scanner.scan(1).latencies.is_empty(), "no interval yet");
        // 20 more I/Os taking 100 ms more: 5 ms each.
        t.write("block/sda/stat", "110 0 880 80 110 0 880 220 0 95 300 0 0 0 0 0 0\n");
        assert_eq!(scanner.scan(2).latencies, [("sda".to_string(), 0.005)]);
        assert_eq!(scanner.scan(3).latencies, [("sda".to_string(), 0.0)], "no I/O in the interval");
        t.write("block/sda/stat", "110 0 880\n");
        let scan = scanner.scan(4);
        assert!(scan.errors.iter().any(|e| e.contains("block/sda/stat: 3 fields")), "{:?}", scan.errors);
    }

    #[test]
    fn missing_families_say_why_and_bad_files_are_errors() {
        let t = TempDir::new("empty");
        t.write("devices/system/edac/mc/mc0/ce_count", "lots\n");
        let scan = SysfsScanner::new(&t.0, Readings::default()).scan(1);
        let by_name: BTreeMap<_, _> = scan.sources.iter().map(|s| (s.name.as_str(), s)).collect();
        assert!(by_name["edac"].available);
        let nvme = by_name["nvme_state"];
        assert!(
            !nvme.available
                && nvme.detail.starts_with("no NVMe controllers: ")
                && nvme.detail.ends_with("class/nvme absent")
        );
        assert!(!by_name["pcie_aer"].available);
        assert!(
            scan.errors.iter().any(|e| e.contains("mc0/ce_count: \"lots\" is not a count")),
            "{:?}",
            scan.errors
        );
    }

    #[test]
    fn aer_files_parse_as_documented() {
        assert_eq!(
            parse_aer(&aer_correctable(2, 0), "TOTAL_ERR_COR"),
            Ok((2, vec![("BadTLP".to_string(), 2)]))
        );
        assert!(parse_aer("RxErr 0\n", "TOTAL_ERR_COR").unwrap_err().contains("no TOTAL_ERR_COR"));
        assert!(parse_aer("RxErr x\nTOTAL_ERR_COR 0\n", "TOTAL_ERR_COR").is_err());
        assert!(parse_aer("one two three\n", "TOTAL_ERR_COR").is_err());
    }
}
