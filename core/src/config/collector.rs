//! The collector's sections, `http:` and `collector:`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::values::{HumanDuration, socket_addr};

/// The HTTP listener of `/metrics`, `/healthz`, `/readyz` and the API.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Bearer token; required when `listen` is not a loopback address.
    pub token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9750)), token: None }
    }
}

impl HttpConfig {
    /// The token, unless it is empty (an empty one counts as none).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Time between snapshots.
    pub interval: HumanDuration,
    /// Instances exported one by one; the rest are summed into one overflow series.
    pub max_instances: usize,
    /// How often each cgroup's cgroupfs files (memory, swap, throttling, pressure) are read. Reads are spread
    /// over the ticks of this period, since each file costs ~15 µs of kernel time and a host has thousands.
    pub cgroupfs_interval: HumanDuration,
    pub watch: WatchConfig,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::from_secs(1),
            max_instances: 2000,
            cgroupfs_interval: HumanDuration::from_secs(10),
            watch: WatchConfig::default(),
        }
    }
}

impl CollectorConfig {
    pub fn interval(&self) -> Duration {
        self.interval.0
    }
    pub fn max_instances(&self) -> usize {
        self.max_instances
    }
    /// Ticks per cgroupfs round: each cgroup's files are read once every this many ticks (at least 1).
    pub fn cgroupfs_every_ticks(&self) -> u64 {
        let ratio = self.cgroupfs_interval.0.as_secs_f64() / self.interval().as_secs_f64();
        (ratio.round() as u64).max(1)
    }
}

/// Which cgroups to watch.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// v2 relative path prefixes to watch (whole components: `/a` covers `/a/b`, not `/ab`).
    pub include: Vec<String>,
    /// Prefixes to skip, with everything below them.
    pub exclude: Vec<String>,
    /// Where Vigil creates its own instances, as `<managed_root>/<service>/<instance>`.
    pub managed_root: String,
    /// Hard cap on cgroups tracked per scan (memory bound); the rest are counted as skipped.
    pub max_tracked: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            include: vec!["/".to_owned()],
            exclude: Vec::new(),
            managed_root: "/vigil".to_owned(),
            max_tracked: 16384,
        }
    }
}
