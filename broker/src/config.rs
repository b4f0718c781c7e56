//! The `broker:` section of Vigil's config file, and the parts of `services:` the broker reads (route, host,
//! version, port). Loopback addresses by default; every mistake is reported at once as
//! `file:line:column: key.path: message`, like the rest of the config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use vigil_collector::config::{ConfigIssue, HumanDuration, from_yaml, render_issues};

use crate::balance::{HealthPolicy, Split};

#[derive(Debug, thiserror::Error)]
pub enum BrokerConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_issues(file, issues))]
    Invalid { file: String, issues: Vec<ConfigIssue> },
}

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
            timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// The HTTP trigger: HTTP/1.1 and HTTP/2 (prior knowledge) requests mapped to services.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTriggerConfig {
    pub enabled: bool,
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
            request_timeout: HumanDuration(Duration::from_secs(60)),
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
    vigil_healer::supervisor::DEFAULT_VERSION.to_string()
}

fn default_capacity() -> u32 {
    100
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub enabled: bool,
    /// RSocket over TCP.
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
            max_frame_bytes: crate::rsocket::frame::MAX_FRAME_LEN,
            max_reassembly_per_stream: 16 << 20,
            max_reassembly_per_connection: 64 << 20,
            max_pending_write_bytes: 64 << 20,
            setup_timeout: HumanDuration(Duration::from_secs(10)),
        }
    }
}

/// The parts of a managed service the broker needs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ServiceRoute {
    pub name: String,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_version")]
    pub version: String,
    /// The service the broker routes these instances under (default: `name`).
    #[serde(default)]
    pub serves: Option<String>,
    // Everything else belongs to the healer.
    #[serde(flatten)]
    _rest: std::collections::BTreeMap<String, IgnoredAny>,
}

impl ServiceRoute {
    pub fn routed_name(&self) -> &str {
        self.serves.as_deref().unwrap_or(&self.name)
    }
}

/// The whole file as the broker sees it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct BrokerFile {
    pub broker: BrokerConfig,
    pub services: Vec<ServiceRoute>,
    #[serde(flatten)]
    _rest: std::collections::BTreeMap<String, IgnoredAny>,
}

/// Where the HTTP trigger sends a request: a path prefix and/or a host name, to a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoute {
    pub prefix: Option<String>,
    pub host: Option<String>,
    pub service: String,
}

impl BrokerFile {
    pub fn load(path: &Path) -> Result<BrokerFile, BrokerConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BrokerConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<BrokerFile, BrokerConfigError> {
        let invalid = |issues| BrokerConfigError::Invalid { file: file.to_string(), issues };
        if text.trim().is_empty() {
            return Ok(BrokerFile::default());
        }
        let parsed: BrokerFile = from_yaml(text).map_err(|issue| invalid(vec![issue]))?;
        let issues = parsed.validate();
        if issues.is_empty() { Ok(parsed) } else { Err(invalid(issues)) }
    }

    /// Every mistake serde cannot see.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let b = &self.broker;
        let mut issues = Vec::new();
        let mut at = |path: &str, message: String| {
            issues.push(ConfigIssue { line: 0, column: 0, path: path.to_string(), message })
        };
        let needs_token =
            !b.listen.ip().is_loopback() || (b.http.enabled && !b.http.listen.ip().is_loopback());
        if needs_token && b.token.as_deref().is_none_or(str::is_empty) {
            at("broker.token", "a non-loopback broker address needs a token".into());
        }
        if b.queue.max_per_service == 0 || b.queue.max_total == 0 {
            at("broker.queue", "max_per_service and max_total must be at least 1".into());
        }
        if b.queue.timeout.0.is_zero() {
            at("broker.queue.timeout", "must be above 0".into());
        }
        if !(64..=crate::rsocket::frame::MAX_FRAME_LEN).contains(&b.max_frame_bytes) {
            at(
                "broker.max_frame_bytes",
                format!("{} is not in 64..={}", b.max_frame_bytes, crate::rsocket::frame::MAX_FRAME_LEN),
            );
        }
        if b.max_reassembly_per_stream > b.max_reassembly_per_connection {
            at("broker.max_reassembly_per_stream", "must not exceed max_reassembly_per_connection".into());
        }
        if b.managed_capacity == 0 {
            at("broker.managed_capacity", "must be at least 1".into());
        }
        for (i, u) in b.upstreams.iter().enumerate() {
            if u.service.is_empty() {
                at(&format!("broker.upstreams[{i}].service"), "must not be empty".into());
            }
            if u.capacity == 0 {
                at(&format!("broker.upstreams[{i}].capacity"), "must be at least 1".into());
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            if let Some(r) = &s.route
                && !r.starts_with('/')
            {
                at(&format!("services[{i}].route"), format!("{r:?} must start with '/'"));
            }
        }
        if let Err(e) = crate::balance::Balancer::<()>::new(b.health.clone()).set_splits(b.splits.clone()) {
            at("broker.splits", e.to_string());
        }
        issues
    }

    /// The HTTP trigger's routes: managed services first, then upstreams, longest prefix first.
    pub fn http_routes(&self) -> Vec<HttpRoute> {
        let mut routes: Vec<HttpRoute> = Vec::new();
        let mut add = |prefix: &Option<String>, host: &Option<String>, service: &str| {
            if (prefix.is_some() || host.is_some())
                && !routes.iter().any(|r| r.prefix == *prefix && r.host == *host)
            {
                routes.push(HttpRoute {
                    prefix: prefix.clone(),
                    host: host.clone(),
                    service: service.into(),
                });
            }
        };
        for s in &self.services {
            add(&s.route, &s.host, s.routed_name());
        }
        for u in &self.broker.upstreams {
            add(&u.route, &u.host, &u.service);
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.as_ref().map_or(0, String::len)));
        routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_yaml_is_the_default() {
        let f = BrokerFile::parse(vigil_collector::config::DEFAULT_YAML, "default").unwrap();
        assert_eq!(f.broker, BrokerConfig::default());
    }

    #[test]
    fn defaults_are_loopback() {
        let f = BrokerFile::parse("", "v.yaml").unwrap();
        assert_eq!(f.broker.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(f.broker.http.listen.to_string(), "127.0.0.1:8080");
        assert!(f.validate().is_empty());
    }

    #[test]
    fn reads_its_section_and_service_routes_beside_the_others() {
        let text = "data_dir: /tmp/v\nhttp: { listen: 127.0.0.1:9750 }\n\
                    broker:\n  queue: { timeout: 5s, max_per_service: 3 }\n  upstreams:\n    - { service: ext, address: 127.0.0.1:9000, route: /ext }\n\
                    services:\n  - name: echo\n    command: [python3]\n    port: 18080\n    route: /echo\n";
        let f = BrokerFile::parse(text, "v.yaml").unwrap();
        assert_eq!(f.broker.queue.timeout.0, Duration::from_secs(5));
        assert_eq!(f.broker.queue.max_per_service, 3);
        assert_eq!(f.services[0].route.as_deref(), Some("/echo"));
        assert_eq!(f.services[0].version, "v1");
        let routes = f.http_routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].service, "echo");
    }

    #[test]
    fn reports_every_mistake() {
        let text = "broker:\n  listen: 0.0.0.0:7878\n  queue: { max_total: 0 }\n  max_frame_bytes: 10\n\
                    services:\n  - { name: a, route: nope }\n";
        let err = BrokerFile::parse(text, "v.yaml").unwrap_err().to_string();
        assert_eq!(err.lines().count(), 4, "{err}");
        assert!(err.contains("v.yaml: broker.token: a non-loopback broker address needs a token"), "{err}");
        assert!(err.contains("services[0].route: \"nope\" must start with '/'"), "{err}");
    }

    #[test]
    fn unknown_broker_key_is_located() {
        let err = BrokerFile::parse("broker:\n  lisen: 1\n", "v.yaml").unwrap_err().to_string();
        assert!(err.starts_with("v.yaml:2:3: broker.lisen: unknown field `lisen`"), "{err}");
    }
}
