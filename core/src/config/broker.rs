//! The broker's section, `broker:`: listeners, the wake-on-demand queue, traffic splits, health policy and
//! upstreams. (What the broker reads of `services:` comes from the same [`crate::service::ServiceSpec`]s.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::service::DEFAULT_VERSION;
use crate::values::{Fraction, HumanDuration, socket_addr};

/// The largest RSocket frame over TCP: its length prefix has 24 bits.
pub const MAX_FRAME_LEN: usize = 0xFF_FFFF;

/// Limits of the wake-on-demand queue: requests held while no instance of their service is ready.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Requests held per service.
    pub max_per_service: usize,
    /// Bytes of request payload held per service.
    pub max_bytes_per_service: usize,
    /// Requests held over all services.
    pub max_total: usize,
    /// How long a request may wait for an instance before it is answered REJECTED / 503.
    pub timeout: HumanDuration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_per_service: 1000,
            max_bytes_per_service: 64 << 20,
            max_total: 10_000,
            timeout: HumanDuration::from_secs(30),
        }
    }
}

/// The HTTP trigger: HTTP/1.1 and HTTP/2 (prior knowledge) requests mapped to services.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTriggerConfig {
    pub enabled: bool,
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// How long a proxied request may take once it reached an instance.
    pub request_timeout: HumanDuration,
    /// Largest request body accepted (it is held in memory while the request waits for a wake).
    pub max_body_bytes: usize,
    /// Worker threads, each serving its share of connections start to end; default one per CPU.
    pub workers: Option<usize>,
}

impl Default for HttpTriggerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_timeout: HumanDuration::from_secs(60),
            max_body_bytes: 16 << 20,
            workers: None,
        }
    }
}

/// A plain HTTP server Vigil does not manage, fronted by the broker like a managed instance.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub service: String,
    #[serde(default = "default_version")]
    pub version: String,
    /// `host:port` of the server.
    #[serde(deserialize_with = "socket_addr")]
    pub address: SocketAddr,
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// HTTP trigger path prefix (if the service has no managed instances that name one).
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
}

fn default_version() -> String {
    DEFAULT_VERSION.to_string()
}

fn default_capacity() -> u32 {
    100
}

/// A traffic split of one service between its versions. `name` is the alias requests use to select it; the
/// split named `default` also applies to requests of the service that name no alias and no version.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub name: String,
    pub service: String,
    /// Version → relative weight. A version with weight 0 gets no traffic, not even by failover (it is
    /// drained). Versions without instances are allowed: they simply cannot serve until one registers.
    pub weights: BTreeMap<String, u32>,
    /// When set, a request carrying a `key` always gets the same version while the weights stand. Only
    /// sticky splits hash the key; other splits choose at random even when a key is present.
    #[serde(default)]
    pub sticky: bool,
}

/// Why a set of splits was refused; the previous splits stay in force.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("split `{name}` of `{service}` has no version with a positive weight")]
    ZeroWeight { service: String, name: String },
    #[error("split `{name}` of `{service}` is defined twice")]
    Duplicate { service: String, name: String },
    #[error("a split of `{service}` has an empty name")]
    EmptyName { service: String },
}

/// Every mistake in a set of splits, each with the index of the split it is about.
pub fn split_mistakes(splits: &[Split]) -> Vec<(usize, SplitError)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, split) in splits.iter().enumerate() {
        if split.name.is_empty() {
            out.push((i, SplitError::EmptyName { service: split.service.clone() }));
            continue;
        }
        if split.weights.values().all(|&w| w == 0) {
            out.push((
                i,
                SplitError::ZeroWeight { service: split.service.clone(), name: split.name.clone() },
            ));
        }
        if !seen.insert((split.service.as_str(), split.name.as_str())) {
            out.push((i, SplitError::Duplicate { service: split.service.clone(), name: split.name.clone() }));
        }
    }
    out
}

/// Outlier-ejection and circuit-breaker settings. Durations are whole milliseconds (`*_ms`) so that the
/// configuration file states its unit in the key; the accessor methods return [`Duration`]s.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthPolicy {
    /// Consecutive `Failure` outcomes that eject an instance; 0 disables ejection.
    pub eject_after_failures: u32,
    /// First ejection time; each further ejection doubles it, up to 8×.
    pub eject_base_ms: u64,
    /// Upper bound of the ejected share of a version's instances; at least one instance always stays.
    pub max_ejected_fraction: Fraction,
    /// Length of the rolling window the breaker judges (1-second buckets, rounded up).
    pub breaker_window_ms: u64,
    /// The breaker never opens on fewer requests than this within the window (0 counts as 1).
    pub breaker_min_requests: u32,
    /// Failure share within the window at which the breaker opens.
    pub breaker_failure_ratio: Fraction,
    /// How long an open breaker refuses traffic before it lets a single probe through.
    pub breaker_open_for_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            eject_after_failures: 5,
            eject_base_ms: 30_000,
            max_ejected_fraction: Fraction::HALF,
            breaker_window_ms: 10_000,
            breaker_min_requests: 20,
            breaker_failure_ratio: Fraction::HALF,
            breaker_open_for_ms: 5_000,
        }
    }
}

impl HealthPolicy {
    pub fn eject_base(&self) -> Duration {
        Duration::from_millis(self.eject_base_ms)
    }

    pub fn breaker_window(&self) -> Duration {
        Duration::from_millis(self.breaker_window_ms)
    }

    pub fn breaker_open_for(&self) -> Duration {
        Duration::from_millis(self.breaker_open_for_ms)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub enabled: bool,
    /// RSocket over TCP.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Bearer token required when `listen` or the HTTP trigger is not loopback (kept out of logs).
    pub token: Option<String>,
    pub http: HttpTriggerConfig,
    pub queue: QueueConfig,
    /// Traffic splits between versions; re-read at run time when the config file changes.
    pub splits: Vec<Split>,
    pub health: HealthPolicy,
    /// Capacity (concurrent requests) of a managed HTTP instance.
    pub managed_capacity: u32,
    pub upstreams: Vec<Upstream>,
    /// Largest frame accepted, and the size above which outgoing frames are fragmented.
    pub max_frame_bytes: usize,
    /// Bytes of fragments held per stream and per connection while a frame is reassembled.
    pub max_reassembly_per_stream: usize,
    pub max_reassembly_per_connection: usize,
    /// Bytes queued for a slow peer before its connection is closed.
    pub max_pending_write_bytes: usize,
    /// How long a connection may take to send its SETUP.
    pub setup_timeout: HumanDuration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            token: None,
            http: HttpTriggerConfig::default(),
            queue: QueueConfig::default(),
            splits: Vec::new(),
            health: HealthPolicy::default(),
            managed_capacity: 100,
            upstreams: Vec::new(),
            max_frame_bytes: MAX_FRAME_LEN,
            max_reassembly_per_stream: 16 << 20,
            max_reassembly_per_connection: 64 << 20,
            max_pending_write_bytes: 64 << 20,
            setup_timeout: HumanDuration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(name: &str, service: &str, weights: &[(&str, u32)]) -> Split {
        Split {
            name: name.into(),
            service: service.into(),
            weights: weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
            sticky: false,
        }
    }

    #[test]
    fn every_split_mistake_is_found() {
        let splits = [
            split("d", "svc", &[("v1", 1)]),
            split("z", "svc", &[("v1", 0)]),
            split("d", "svc", &[("v2", 1)]),
            split("", "svc", &[("v1", 1)]),
            // The same name for another service is fine.
            split("d", "x", &[("v1", 1)]),
        ];
        assert_eq!(
            split_mistakes(&splits),
            vec![
                (1, SplitError::ZeroWeight { service: "svc".into(), name: "z".into() }),
                (2, SplitError::Duplicate { service: "svc".into(), name: "d".into() }),
                (3, SplitError::EmptyName { service: "svc".into() }),
            ]
        );
        assert_eq!(split_mistakes(&splits[4..]), Vec::new());
    }
}
