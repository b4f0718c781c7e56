//! `hardware:`: Vigil's perception of hardware health (the `vigil-hardware` crate). The kernel log is read
//! from `kmsg` (a path, so tests may point it elsewhere; empty turns it off), sysfs counters from below
//! `sysfs_root` every `poll_interval`, and a device is healthy again after `quiet` without warnings or worse.
//! `patterns` are extra pattern files that extend or override the embedded kernel-log patterns by name; they
//! must be readable when the config is loaded (their contents are checked when the monitor starts, where
//! the pattern syntax is known).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::values::HumanDuration;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardwareConfig {
    /// Watch hardware at all.
    pub enabled: bool,
    /// Where sysfs is mounted; fixture trees in tests stand in for it.
    pub sysfs_root: PathBuf,
    /// The kernel log device; an empty path turns the kernel log off.
    pub kmsg: PathBuf,
    /// At a first start in a boot (no cursor kept), read the kernel log's records since boot (`true`), or
    /// only those logged from now on (`false`).
    pub kmsg_backlog: bool,
    /// Time between two readings of the sysfs counters.
    pub poll_interval: HumanDuration,
    /// A device is healthy again after this long without a warning or worse.
    pub quiet: HumanDuration,
    /// Pattern files that extend or override the embedded kernel-log patterns by name.
    pub patterns: Vec<PathBuf>,
    /// Devices tracked at most (memory bound); events about more are counted as dropped.
    pub max_devices: usize,
}

impl Default for HardwareConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sysfs_root: PathBuf::from("/sys"),
            kmsg: PathBuf::from("/dev/kmsg"),
            kmsg_backlog: true,
            poll_interval: HumanDuration::from_secs(10),
            quiet: HumanDuration::from_secs(300),
            patterns: Vec::new(),
            max_devices: 4096,
        }
    }
}

impl HardwareConfig {
    /// The kernel log's path, unless it is turned off (hardware off, or an empty path).
    pub fn kmsg_path(&self) -> Option<&std::path::Path> {
        (self.enabled && !self.kmsg.as_os_str().is_empty()).then_some(self.kmsg.as_path())
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval.0
    }

    pub fn quiet(&self) -> Duration {
        self.quiet.0
    }
}

/// Every mistake of the section, as `(key path below hardware., message)`. `readable` opens a pattern file
/// (injected so the check is testable without files).
pub(super) fn hardware_mistakes(
    h: &HardwareConfig,
    readable: &dyn Fn(&std::path::Path) -> Result<(), String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let poll = h.poll_interval.0;
    if poll < Duration::from_secs(1) || poll > Duration::from_secs(3600) {
        out.push(("poll_interval".to_string(), format!("{} is outside 1s..1h", h.poll_interval)));
    }
    let quiet = h.quiet.0;
    if quiet < Duration::from_secs(1) || quiet > Duration::from_secs(7 * 24 * 3600) {
        out.push(("quiet".to_string(), format!("{} is outside 1s..7d", h.quiet)));
    } else if quiet < poll {
        // A device could turn healthy between two readings that both saw its errors rise.
        out.push((
            "quiet".to_string(),
            format!("{} is shorter than hardware.poll_interval ({})", h.quiet, h.poll_interval),
        ));
    }
    if h.max_devices == 0 || h.max_devices > 1_000_000 {
        out.push(("max_devices".to_string(), format!("{} is not in 1..=1000000", h.max_devices)));
    }
    if h.enabled {
        for (i, path) in h.patterns.iter().enumerate() {
            if let Err(why) = readable(path) {
                out.push((
                    format!("patterns[{i}]"),
                    format!("cannot read pattern file {}: {why}", path.display()),
                ));
            }
        }
    }
    out
}

/// Opens `path` for reading: what a pattern file must allow.
pub(super) fn open_for_reading(path: &std::path::Path) -> Result<(), String> {
    if path.is_dir() {
        return Err("it is a directory; name the files".to_string());
    }
    std::fs::File::open(path).map(drop).map_err(|e| e.to_string())
}
