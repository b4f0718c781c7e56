//! [`VigilConfig`]: Vigil's one configuration file, every section of it, read once.
//!
//! The pipeline is read → check → build, as in vector: [`VigilConfig::parse`] reads the YAML into a
//! positioned tree, deserializes every section from it (values refuse what they cannot be as they are
//! read, and reading goes on past each refusal), then checks what no single value can know: ranges that
//! depend on another key, duplicates, and agreements between sections (a route served by two services, the
//! healer's cgroup parent and the collector's managed root, one port bound twice). Every mistake from every
//! section comes back together, in file order, each at its real line and column. The collector, the healer
//! and the broker then build their own settings from the sections they use.

pub mod alerts;
pub mod broker;
pub mod collector;
pub mod grpc;
pub mod hardware;
pub mod healer;
pub mod notify;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use self::alerts::AlertsConfig;
pub use self::broker::{
    BrokerConfig, HealthPolicy, HttpTriggerConfig, MAX_FRAME_LEN, QueueConfig, Split, SplitError, Upstream,
    split_mistakes,
};
pub use self::collector::{CollectorConfig, HttpConfig, WatchConfig};
pub use self::grpc::GrpcConfig;
pub use self::hardware::HardwareConfig;
pub use self::healer::{Breaker, HealerSettings, WorkflowLimits};
pub use self::notify::{
    ActionName, AlertmanagerConfig, Matcher, NotifyConfig, OutcomeName, ReceiverConfig, ReceiverKind,
    RetryConfig, Secrets, WebhookConfig, WebhookSecret,
};
use crate::issue::{ConfigError, ConfigIssue};
use crate::service::ServiceSpec;
use crate::yaml::Document;

/// The embedded default configuration, documented; what `vigil up` runs when given no file.
pub const DEFAULT_YAML: &str = "\
# Vigil's embedded defaults. Every key is optional.
data_dir: ./.vigil            # state and audit log
http:
  listen: 127.0.0.1:9750      # /metrics, /healthz, /readyz, /api/v1/; any non-loopback bind needs a token
grpc:                         # vigil.v1.Remediation (the REST API's operations), health, reflection
  enabled: true
  listen: 127.0.0.1:9751      # the token is http.token: any non-loopback bind needs one
collector:
  interval: 1s                # one snapshot per tick
  max_instances: 2000         # instances exported one by one; the rest are summed into one overflow series
  cgroupfs_interval: 10s      # memory, swap, throttling, pressure from cgroupfs: each cgroup read this often
  watch:
    include: [\"/\"]            # v2 cgroup path prefixes to watch
    exclude: []
    managed_root: /vigil      # where Vigil creates its own instances
    max_tracked: 16384        # hard cap on cgroups tracked (memory bound)
broker:
  listen: 127.0.0.1:7878      # RSocket over TCP: instances register in SETUP, requests route by tag
  http:
    listen: 127.0.0.1:8080    # HTTP/1.1 + h2c trigger: services by `route:` (path prefix) or `host:`
  queue:                      # requests held while an instance wakes or starts; beyond: REJECTED / 503
    max_per_service: 1000
    max_total: 10000
    timeout: 30s
notify:                       # where decisions and alerts are sent: durable outbox, retried until delivered
  receivers: []
  # receivers:
  #   - name: ops
  #     webhook: { url: \"http://127.0.0.1:9099/hook\", secret: whsec_... }   # signed, Standard Webhooks; https too
  #     match: { action: [restart], outcome: [failed] }                      # optional: what else it gets
  #   - name: am
  #     alertmanager: { url: \"http://127.0.0.1:9093\" }                       # posts to /api/v2/alerts
  # external_url: http://127.0.0.1:9750   # links sent along; default http://<http.listen>
  retry: { initial: 500ms, max: 1m }      # exponential backoff with jitter
  give_up_after: 24h                      # older undelivered notifications are dropped, counted
  timeout: 10s                            # per attempt
hardware:                     # hardware health: the kernel log and sysfs counters, GET /api/v1/hardware
  enabled: true
  kmsg: /dev/kmsg             # structured kernel log; \"\" turns it off (sysfs is still read)
  kmsg_backlog: true          # at a first start in a boot, read the records since boot; false: only new ones
  sysfs_root: /sys            # EDAC, PCIe AER, carrier changes, thermal throttling, block stat, NVMe state
  poll_interval: 10s          # sysfs counters are read this often
  quiet: 5m                   # a device is healthy again after this long without a warning or worse
  patterns: []                # extra kernel-log pattern files; they extend or override the embedded ones by name
  max_devices: 4096           # devices tracked at most; events about more are counted as dropped
";

/// The whole configuration file. Every key is optional; [`VigilConfig::default`] is [`DEFAULT_YAML`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VigilConfig {
    /// State and the audit log.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub collector: CollectorConfig,
    /// Decide and audit, execute nothing.
    pub dry_run: bool,
    /// Rule files or directories of `*.yaml` rule files.
    pub rules: Vec<PathBuf>,
    /// Workflow files or directories of `*.yaml` workflow files.
    pub workflows: Vec<PathBuf>,
    pub services: Vec<ServiceSpec>,
    pub healer: HealerSettings,
    pub broker: BrokerConfig,
    pub notify: NotifyConfig,
    /// How incoming alerts are taken (`POST /api/v1/alerts`).
    pub alerts: AlertsConfig,
    /// Hardware health: the kernel log and sysfs counters.
    pub hardware: HardwareConfig,
}

/// What the command being started runs, which decides what a service entry must say. The whole file is
/// checked either way; only `vigil up` (and the healer) runs `services:`, so only then must each name a
/// `command` and a `port`. The broker alone also takes entries that only name a service (and maybe its
/// route), whose instances register over RSocket; the collector alone reads no service at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runs {
    /// Everything, services included (`vigil up`).
    Everything,
    /// One component that runs no service (`vigil collector`, `vigil broker`).
    WithoutServices,
}

/// `rules:` when the file names none.
pub fn default_rules() -> Vec<PathBuf> {
    vec![PathBuf::from("rules/")]
}

/// `workflows:` when the file names none.
pub fn default_workflows() -> Vec<PathBuf> {
    vec![PathBuf::from("workflows/")]
}

impl Default for VigilConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./.vigil"),
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            collector: CollectorConfig::default(),
            dry_run: false,
            rules: default_rules(),
            workflows: default_workflows(),
            services: Vec::new(),
            healer: HealerSettings::default(),
            broker: BrokerConfig::default(),
            notify: NotifyConfig::default(),
            alerts: AlertsConfig::default(),
            hardware: HardwareConfig::default(),
        }
    }
}

impl VigilConfig {
    /// Reads, parses and checks `path`.
    pub fn load(path: &Path) -> Result<VigilConfig, ConfigError> {
        Self::load_for(path, Runs::Everything)
    }

    /// Reads, parses and checks `path` for a command that runs `runs`.
    pub fn load_for(path: &Path, runs: Runs) -> Result<VigilConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse_for(&text, &path.display().to_string(), runs)
    }

    /// The file at `path`, or the embedded defaults without one.
    pub fn load_or_default(path: Option<&Path>, runs: Runs) -> Result<VigilConfig, ConfigError> {
        path.map_or_else(|| Ok(VigilConfig::default()), |p| Self::load_for(p, runs))
    }

    /// Parses and checks `text` for `vigil up`; `file` names it in issues. Every mistake of every section
    /// is reported.
    pub fn parse(text: &str, file: &str) -> Result<VigilConfig, ConfigError> {
        Self::parse_for(text, file, Runs::Everything)
    }

    /// Parses and checks `text` for a command that runs `runs`.
    pub fn parse_for(text: &str, file: &str, runs: Runs) -> Result<VigilConfig, ConfigError> {
        let doc =
            Document::parse(text, file).map_err(|issue| ConfigError::Invalid { issues: vec![issue] })?;
        if doc.is_empty() {
            return Ok(VigilConfig::default());
        }
        let (config, mut issues) = doc.deserialize::<VigilConfig>();
        if let Some(config) = &config {
            issues.extend(config.mistakes(&doc, runs));
        }
        issues.sort_by_key(|i| (i.line, i.column));
        issues.dedup();
        match config {
            Some(config) if issues.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid { issues }),
        }
    }

    /// Every mistake no single value can see, located in `doc`: per section, then across sections.
    pub fn mistakes(&self, doc: &Document, runs: Runs) -> Vec<ConfigIssue> {
        let mut out = Mistakes { doc, issues: Vec::new() };
        self.collector_mistakes(&mut out);
        self.grpc_mistakes(&mut out);
        self.healer_mistakes(&mut out, runs);
        self.broker_mistakes(&mut out);
        let written = |path: &str| out.doc.has(&format!("notify.{path}"));
        for (path, message) in notify::notify_mistakes(&self.notify, &written) {
            out.at(&format!("notify.{path}"), message);
        }
        for (path, message) in hardware::hardware_mistakes(&self.hardware, &hardware::open_for_reading) {
            out.at(&format!("hardware.{path}"), message);
        }
        self.cross_section_mistakes(&mut out, runs);
        out.issues
    }

    fn collector_mistakes(&self, out: &mut Mistakes) {
        let c = &self.collector;
        let interval = c.interval.0;
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
            out.at("collector.interval", format!("{} is outside 100ms..1h", c.interval));
        }
        if c.cgroupfs_interval.0 < interval {
            out.at(
                "collector.cgroupfs_interval",
                format!("{} is shorter than collector.interval ({})", c.cgroupfs_interval, c.interval),
            );
        }
        if c.max_instances == 0 {
            out.at("collector.max_instances", "must be at least 1");
        }
        if c.watch.max_tracked == 0 {
            out.at("collector.watch.max_tracked", "must be at least 1");
        }
        if !c.watch.managed_root.starts_with('/') {
            out.at("collector.watch.managed_root", format!("{:?} must start with '/'", c.watch.managed_root));
        }
        let listen = self.http.listen;
        if !listen.ip().is_loopback() && self.http.token().is_none() {
            out.at(
                "http.listen",
                format!(
                    "{listen} is not a loopback address: set http.token (a bearer token) to expose the API"
                ),
            );
        }
    }

    /// The gRPC API shares the REST API's token, so it has the same rule for leaving loopback.
    fn grpc_mistakes(&self, out: &mut Mistakes) {
        let listen = self.grpc.listen;
        if self.grpc.enabled && !listen.ip().is_loopback() && self.http.token().is_none() {
            out.at(
                "grpc.listen",
                format!(
                    "{listen} is not a loopback address: set http.token (a bearer token, the gRPC API's too) \
                     to expose the API"
                ),
            );
        }
    }

    fn healer_mistakes(&self, out: &mut Mistakes, runs: Runs) {
        let mut first_by_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            for (field, message) in s.mistakes() {
                if runs == Runs::WithoutServices && matches!(field, "command" | "port") {
                    continue;
                }
                out.at(&format!("services[{i}].{field}"), message);
            }
            if let Some(scale) = &s.scale {
                for (field, message) in scale.problems(self.collector.interval.0) {
                    out.at(&format!("services[{i}].scale.{field}"), message);
                }
                // A scaled service's count is the autoscaler's: a fixed count or a start policy beside
                // it would say something the service then does not do.
                if out.has(&format!("services[{i}].instances")) {
                    out.at(
                        &format!("services[{i}].instances"),
                        "a service with `scale:` has no fixed count: use scale.min and scale.max",
                    );
                }
                if out.has(&format!("services[{i}].start")) {
                    out.at(
                        &format!("services[{i}].start"),
                        "a service with `scale:` starts as the autoscaler decides: use scale.min: 0 to start at zero",
                    );
                }
            }
            if let Some(first) = first_by_name.get(s.name.as_str()) {
                out.at(
                    &format!("services[{i}].name"),
                    format!("service `{}` is declared twice (first as services[{first}])", s.name),
                );
            } else {
                first_by_name.insert(&s.name, i);
            }
        }
        let h = &self.healer;
        if h.max_standby_fraction.get() == 0.0 {
            out.at("healer.max_standby_fraction", "0 allows no standby at all: it must be above 0");
        }
        if h.max_actions_per_minute == 0 {
            out.at("healer.max_actions_per_minute", "must be at least 1");
        }
        if !h.cgroup_parent.starts_with('/') {
            out.at("healer.cgroup_parent", format!("{:?} must start with '/'", h.cgroup_parent));
        }
        if h.workflows.max_concurrent == 0 {
            out.at("healer.workflows.max_concurrent", "must be at least 1");
        }
        if h.workflows.breaker.window.0.is_zero() {
            out.at("healer.workflows.breaker.window", "must be longer than 0s");
        }
        if h.workflows.breaker.max_fraction.get() == 0.0 {
            out.at("healer.workflows.breaker.max_fraction", "0 would refuse every run: it must be above 0");
        }
    }

    fn broker_mistakes(&self, out: &mut Mistakes) {
        let b = &self.broker;
        if b.token.as_deref().is_none_or(str::is_empty) {
            if !b.listen.ip().is_loopback() {
                out.at(
                    "broker.listen",
                    format!("{} is not a loopback address: set broker.token to expose the broker", b.listen),
                );
            }
            if b.http.enabled && !b.http.listen.ip().is_loopback() {
                out.at(
                    "broker.http.listen",
                    format!(
                        "{} is not a loopback address: set broker.token to expose the broker",
                        b.http.listen
                    ),
                );
            }
        }
        if b.queue.max_per_service == 0 {
            out.at("broker.queue.max_per_service", "must be at least 1");
        }
        if b.queue.max_total == 0 {
            out.at("broker.queue.max_total", "must be at least 1");
        }
        if b.queue.timeout.0.is_zero() {
            out.at("broker.queue.timeout", "must be above 0");
        }
        if !(64..=MAX_FRAME_LEN).contains(&b.max_frame_bytes) {
            out.at("broker.max_frame_bytes", format!("{} is not in 64..={MAX_FRAME_LEN}", b.max_frame_bytes));
        }
        if b.max_reassembly_per_stream > b.max_reassembly_per_connection {
            out.at(
                "broker.max_reassembly_per_stream",
                format!(
                    "{} exceeds max_reassembly_per_connection ({})",
                    b.max_reassembly_per_stream, b.max_reassembly_per_connection
                ),
            );
        }
        if b.managed_capacity == 0 {
            out.at("broker.managed_capacity", "must be at least 1");
        }
        if b.http.workers == Some(0) {
            out.at("broker.http.workers", "must be at least 1");
        }
        for (i, u) in b.upstreams.iter().enumerate() {
            if u.service.is_empty() {
                out.at(&format!("broker.upstreams[{i}].service"), "must not be empty");
            }
            if u.capacity == 0 {
                out.at(&format!("broker.upstreams[{i}].capacity"), "must be at least 1");
            }
            if let Some(route) = &u.route
                && !route.starts_with('/')
            {
                out.at(&format!("broker.upstreams[{i}].route"), format!("{route:?} must start with '/'"));
            }
        }
        for (i, e) in split_mistakes(&b.splits) {
            let field = match e {
                SplitError::ZeroWeight { .. } => "weights",
                SplitError::Duplicate { .. } | SplitError::EmptyName { .. } => "name",
            };
            out.at(&format!("broker.splits[{i}].{field}"), e.to_string());
        }
    }

    fn cross_section_mistakes(&self, out: &mut Mistakes, runs: Runs) {
        // Instances are named by their place below the managed root; elsewhere they would be strangers.
        let parent = self.healer.cgroup_parent.trim_end_matches('/');
        let root = self.collector.watch.managed_root.trim_end_matches('/');
        if parent != root {
            // At whichever of the two the file wrote (the other is its default).
            let (at, value, other, other_value) =
                if out.doc.has("healer.cgroup_parent") || !out.doc.has("collector.watch.managed_root") {
                    ("healer.cgroup_parent", parent, "collector.watch.managed_root", root)
                } else {
                    ("collector.watch.managed_root", root, "healer.cgroup_parent", parent)
                };
            out.at(
                at,
                format!(
                    "{value:?} differs from {other} {other_value:?}: instances must be created where the \
                     collector looks for them"
                ),
            );
        }

        // One HTTP trigger route leads to one service (two managed versions of one service may share it).
        let mut routes: BTreeMap<(&str, Option<&str>), (&str, String)> = BTreeMap::new();
        let services =
            self.services.iter().enumerate().map(|(i, s)| {
                (format!("services[{i}]"), s.route.as_deref(), s.host.as_deref(), s.routed_name())
            });
        let upstreams = self.broker.upstreams.iter().enumerate().map(|(i, u)| {
            (format!("broker.upstreams[{i}]"), u.route.as_deref(), u.host.as_deref(), u.service.as_str())
        });
        for (path, route, host, target) in services.chain(upstreams) {
            let Some(route) = route else { continue };
            match routes.get(&(route, host)) {
                Some((other, first)) if *other != target => {
                    let host = host.map(|h| format!(" with host {h:?}")).unwrap_or_default();
                    out.at(
                        &format!("{path}.route"),
                        format!(
                            "route {route:?}{host} already leads to `{other}` ({first}), not to `{target}`"
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    routes.insert((route, host), (target, path));
                }
            }
        }

        // One port, one listener.
        let mut listeners: Vec<(&str, SocketAddr)> = vec![("http.listen", self.http.listen)];
        if self.grpc.enabled {
            listeners.push(("grpc.listen", self.grpc.listen));
        }
        if self.broker.enabled {
            listeners.push(("broker.listen", self.broker.listen));
            if self.broker.http.enabled {
                listeners.push(("broker.http.listen", self.broker.http.listen));
            }
        }
        for (i, (path, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((first, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                let at = if out.doc.has(path) || !out.doc.has(first) { path } else { first };
                out.at(at, format!("{addr} is bound twice: {first} and {path}"));
            }
        }

        // Managed instances listen on `port`, `port + 1`, ...: two services must not share one.
        let run_services = if runs == Runs::Everything { &self.services[..] } else { &[] };
        for (i, s) in run_services.iter().enumerate() {
            let range = |s: &ServiceSpec| u32::from(s.port)..u32::from(s.port) + s.slots();
            let mine = range(s);
            if let Some((j, other)) = self.services[..i].iter().enumerate().find(|(_, o)| {
                let theirs = range(o);
                mine.start < theirs.end && theirs.start < mine.end
            }) {
                out.at(
                    &format!("services[{i}].port"),
                    format!(
                        "ports {}..={} overlap those of `{}` (services[{j}]: {}..={})",
                        mine.start,
                        mine.end.saturating_sub(1),
                        other.name,
                        other.port,
                        (u32::from(other.port) + other.slots()).saturating_sub(1)
                    ),
                );
            }
        }
    }
}

/// Mistakes found after parsing, each located by its key path.
struct Mistakes<'d> {
    doc: &'d Document,
    issues: Vec<ConfigIssue>,
}

impl Mistakes<'_> {
    fn at(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(self.doc.issue(path, message));
    }

    /// Whether the file writes `path`.
    fn has(&self, path: &str) -> bool {
        self.doc.has(path)
    }
}

#[cfg(test)]
mod tests;
