//! The one shape every hardware source reports in: a [`HardwareEvent`] names the device, what happened to
//! it ([`Kind`]), how bad that is ([`Severity`]), where Vigil learnt it ([`Source`]), which counter or
//! pattern said so, and by how much that counter rose. Consumers (the health tracker, the metrics, the
//! workflow engine's triggers) read nothing else, so a new source only has to produce these.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a kind name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    #[error("`{name}` is not a kind name: write it in snake_case ([a-z][a-z0-9_]*, at most 64 characters)")]
    NotSnakeCase { name: String },
}

/// What happened to a device, as a snake_case word (`io_error`). The built-in kinds are what Vigil's own
/// sources and patterns produce; pattern files may name new ones, so this is an open, validated name
/// rather than an enum.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Kind(Arc<str>);

macro_rules! builtin_kinds {
    ($($(#[$doc:meta])* $fn_name:ident = $name:literal,)*) => {
        impl Kind {
            /// Every built-in kind's name.
            pub const BUILTIN: &'static [&'static str] = &[$($name),*];
            $(
                $(#[$doc])*
                pub fn $fn_name() -> Kind {
                    Kind(Arc::from($name))
                }
            )*
        }
    };
}

builtin_kinds! {
    /// A corrected memory error (EDAC CE).
    memory_ce = "memory_ce",
    /// An uncorrected memory error (EDAC UE).
    memory_ue = "memory_ue",
    /// A machine check exception or a logged machine check.
    machine_check = "machine_check",
    /// A failed block I/O request.
    io_error = "io_error",
    /// An NVMe controller reset.
    nvme_reset = "nvme_reset",
    /// An NVMe command timeout.
    nvme_timeout = "nvme_timeout",
    /// A device gone: fell off the bus, removed after a failed probe, an NVMe controller dead.
    device_lost = "device_lost",
    /// A CPU core or package throttled for temperature.
    thermal_throttle = "thermal_throttle",
    /// A task blocked in the kernel for longer than the hung-task timeout.
    hung_task = "hung_task",
    /// A process killed by the OOM killer (host-wide or in a memory cgroup).
    oom_kill = "oom_kill",
    /// A PCIe correctable error (AER).
    pcie_correctable = "pcie_correctable",
    /// A PCIe uncorrectable, non-fatal error (AER).
    pcie_nonfatal = "pcie_nonfatal",
    /// A PCIe uncorrectable, fatal error (AER).
    pcie_fatal = "pcie_fatal",
    /// A network link's carrier went down or came up.
    link_flap = "link_flap",
}

impl Kind {
    /// A kind named `name`, if it is snake_case (`[a-z][a-z0-9_]*`, at most 64 characters).
    pub fn new(name: &str) -> Result<Kind, KindError> {
        let mut chars = name.chars();
        let ok = name.len() <= 64
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok { Ok(Kind(Arc::from(name))) } else { Err(KindError::NotSnakeCase { name: name.to_string() }) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kind({})", self.0)
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Kind::new(&name).map_err(serde::de::Error::custom)
    }
}

/// How bad an event is, in rising order. Warning and error make a device degraded, critical makes it
/// failed; info is recorded and counted but leaves the state alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [Severity::Info, Severity::Warning, Severity::Error, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    pub fn from_name(name: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where Vigil learnt of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A kernel log record matched a pattern.
    Kmsg,
    /// A sysfs counter rose (or a state file changed).
    Sysfs,
    /// A tracepoint count rose (the collector's eBPF programs, through [`crate::TracepointSource`]).
    Tracepoint,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Kmsg => "kmsg",
            Source::Sysfs => "sysfs",
            Source::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a kernel log record sits in the log: its sequence number and its syslog facility (0 for the
/// kernel, 1 for user space writing to /dev/kmsg, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsgOrigin {
    pub seq: u64,
    pub facility: u8,
}

/// One thing that happened to one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HardwareEvent {
    /// The device as the kernel names it: `sda`, `nvme0`, `mc0/dimm1`, `0000:03:00.0`, `cpu2`, `eth0`, or
    /// `memory`/`host` when the kernel names none.
    pub device: String,
    pub kind: Kind,
    pub severity: Severity,
    pub source: Source,
    /// Which counter or pattern said so: `kmsg:block-io-error`, `mc0/ce_count`, `eth0/carrier_changes`.
    pub counter: String,
    /// How much the counter rose; 1 for a kernel log record.
    pub delta: u64,
    /// The kernel log line, or a sentence saying what the counter did.
    pub message: String,
    /// When it happened (a kernel log record's own time), in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// For a kernel log record: its sequence number and facility.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kmsg: Option<KmsgOrigin>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_snake_case() {
        for good in ["io_error", "a", "x2", "nvme_reset_2"] {
            assert_eq!(Kind::new(good).map(|k| k.to_string()), Ok(good.to_string()));
        }
        for bad in ["", "IoError", "io-error", "2x", "_x", "io error", &"a".repeat(65)] {
            assert!(Kind::new(bad).is_err(), "{bad:?}");
        }
        for name in Kind::BUILTIN {
            assert!(Kind::new(name).is_ok(), "{name}");
        }
        assert_eq!(Kind::io_error(), Kind::new("io_error").unwrap());
        let e = Kind::new("Disk").unwrap_err().to_string();
        assert!(e.contains("`Disk`"), "{e}");
    }

    #[test]
    fn an_event_serializes_with_its_names() {
        let e = HardwareEvent {
            device: "sda".into(),
            kind: Kind::io_error(),
            severity: Severity::Error,
            source: Source::Kmsg,
            counter: "kmsg:block-io-error".into(),
            delta: 1,
            message: "I/O error, dev sda, sector 8".into(),
            at_unix_ms: 5,
            kmsg: Some(KmsgOrigin { seq: 7, facility: 0 }),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "io_error");
        assert_eq!(v["severity"], "error");
        assert_eq!(v["source"], "kmsg");
        assert_eq!(v["kmsg"]["seq"], 7);
        let k: Kind = serde_json::from_str("\"oom_kill\"").unwrap();
        assert_eq!(k, Kind::oom_kill());
        assert!(serde_json::from_str::<Kind>("\"OOM\"").is_err());
        assert!(Severity::Critical > Severity::Error && Severity::Warning > Severity::Info);
    }
}
