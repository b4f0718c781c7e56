//! Vigil's configuration file: parsed with serde-saphyr, then validated as a whole, so a person sees every
//! mistake at once as `file:line:column: key.path: message`. `vigil up` with no `--config` runs on the
//! embedded defaults (`Config::default()`, the same values as `DEFAULT_YAML`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::discovery::WatchConfig;

/// The embedded default configuration, documented; what `vigil up` runs when given no file.
pub const DEFAULT_YAML: &str = "\
# Vigil's embedded defaults. Every key is optional.
data_dir: ./.vigil            # state and audit log
http:
  listen: 127.0.0.1:9750      # /metrics, /healthz, /readyz, /api/v1/; any non-loopback bind needs a token
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
";

/// One configuration mistake, located in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: u64,
    pub column: u64,
    /// Dotted key path (`collector.interval`, `services[0].port`); empty for the document itself.
    pub path: String,
    pub message: String,
}

/// Every mistake found in one file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render_issues(file, issues))]
    Invalid { file: String, issues: Vec<ConfigIssue> },
}

/// One line per issue: `file:line:column: key.path: message`.
pub fn render_issues(file: &str, issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| {
            if i.line == 0 {
                // No position known (a check over a whole list entry): the key path locates it.
                format!("{file}: {}: {}", i.path, i.message)
            } else if i.path.is_empty() {
                format!("{file}:{}:{}: {}", i.line, i.column, i.message)
            } else {
                format!("{file}:{}:{}: {}: {}", i.line, i.column, i.path, i.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A duration written as `500ms`, `1s`, `5m`, `2h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Parses `<number><unit>` with unit ms, s, m or h.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{text}` is not a duration like 500ms, 1s, 5m, 2h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{text}` has no unit: write it as 500ms, 1s, 5m or 2h")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(HumanDuration).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: Spanned<SocketAddr>,
    /// Bearer token; required when `listen` is not a loopback address.
    pub token: Option<String>,
}

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: spanned(SocketAddr::from(([127, 0, 0, 1], 9750))), token: None }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Time between snapshots.
    pub interval: Spanned<HumanDuration>,
    /// Instances exported one by one; the rest are summed into one overflow series.
    pub max_instances: Spanned<usize>,
    /// How often each cgroup's cgroupfs files (memory, swap, throttling, pressure) are read. Reads are spread
    /// over the ticks of this period, since each file costs ~15 µs of kernel time and a host has thousands.
    pub cgroupfs_interval: Spanned<HumanDuration>,
    pub watch: WatchConfig,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            interval: spanned(HumanDuration(Duration::from_secs(1))),
            max_instances: spanned(2000),
            cgroupfs_interval: spanned(HumanDuration(Duration::from_secs(10))),
            watch: WatchConfig::default(),
        }
    }
}

impl CollectorConfig {
    pub fn interval(&self) -> Duration {
        self.interval.value.0
    }
    pub fn max_instances(&self) -> usize {
        self.max_instances.value
    }
    /// Ticks per cgroupfs round: each cgroup's files are read once every this many ticks (at least 1).
    pub fn cgroupfs_every_ticks(&self) -> u64 {
        let ratio = self.cgroupfs_interval.value.0.as_secs_f64() / self.interval().as_secs_f64();
        (ratio.round() as u64).max(1)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub collector: CollectorConfig,
    // The healer's sections, parsed and validated by vigil-healer from the same text.
    #[serde(rename = "dry_run")]
    _dry_run: serde::de::IgnoredAny,
    #[serde(rename = "rules")]
    _rules: serde::de::IgnoredAny,
    #[serde(rename = "services")]
    _services: serde::de::IgnoredAny,
    #[serde(rename = "healer")]
    _healer: serde::de::IgnoredAny,
    // The broker's section, parsed and validated by vigil-broker.
    #[serde(rename = "broker")]
    _broker: serde::de::IgnoredAny,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./.vigil"),
            http: HttpConfig::default(),
            collector: CollectorConfig::default(),
            _dry_run: serde::de::IgnoredAny,
            _rules: serde::de::IgnoredAny,
            _services: serde::de::IgnoredAny,
            _healer: serde::de::IgnoredAny,
            _broker: serde::de::IgnoredAny,
        }
    }
}

fn issue_at<T>(s: &Spanned<T>, path: &str, message: String) -> ConfigIssue {
    ConfigIssue { line: s.referenced.line(), column: s.referenced.column(), path: path.to_string(), message }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let invalid = |issues| ConfigError::Invalid { file: file.to_string(), issues };
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let config: Config = from_yaml(text).map_err(|issue| invalid(vec![issue]))?;
        let issues = config.validate();
        if issues.is_empty() { Ok(config) } else { Err(invalid(issues)) }
    }

    /// Every semantic mistake, in file order.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let interval = self.collector.interval.value.0;
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
            issues.push(issue_at(
                &self.collector.interval,
                "collector.interval",
                format!("{} is outside 100ms..1h", self.collector.interval.value),
            ));
        }
        if self.collector.cgroupfs_interval.value.0 < interval {
            issues.push(issue_at(
                &self.collector.cgroupfs_interval,
                "collector.cgroupfs_interval",
                format!("{} is shorter than collector.interval", self.collector.cgroupfs_interval.value),
            ));
        }
        if self.collector.max_instances.value == 0 {
            issues.push(issue_at(
                &self.collector.max_instances,
                "collector.max_instances",
                "must be at least 1".into(),
            ));
        }
        let listen = self.http.listen.value;
        if !listen.ip().is_loopback() && self.http.token.as_deref().is_none_or(str::is_empty) {
            issues.push(issue_at(
                &self.http.listen,
                "http.listen",
                format!(
                    "{listen} is not a loopback address: set http.token (a bearer token) to expose the API"
                ),
            ));
        }
        issues.sort_by_key(|i| (i.line, i.column));
        issues
    }
}

/// Deserializes a YAML document; the first syntax or type error comes back with its position and key path.
/// Shared by every YAML file Vigil reads (config, rules), so all report mistakes the same way.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigIssue> {
    // serde_path_to_error knows where in the document an error arose; serde-saphyr knows the position.
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| saphyr_issue(std::mem::take(&mut path), &e))
}

fn saphyr_issue(path: String, e: &serde_saphyr::Error) -> ConfigIssue {
    let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
    // The rendered error repeats the position ("line 2 column 3: ...") and may add a source snippet; keep
    // the first line's message only.
    let rendered = e.to_string();
    let first = rendered.lines().next().unwrap_or("").trim().trim_start_matches("error: ");
    let message = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((_, m)) => m,
        None => first,
    };
    // `Spanned<T>` fields add a `value` step of their own to the path (also inside lists).
    let path = if path == "." {
        String::new()
    } else {
        path.split('.').filter(|step| *step != "value").collect::<Vec<_>>().join(".")
    };
    ConfigIssue { line, column, path, message: message.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_to_default() {
        let c = Config::parse(DEFAULT_YAML, "defaults").unwrap();
        let d = Config::default();
        assert_eq!(c.collector.interval(), d.collector.interval());
        assert_eq!(c.collector.max_instances(), d.collector.max_instances());
        assert_eq!(c.collector.cgroupfs_every_ticks(), 10);
        assert_eq!(c.collector.watch, d.collector.watch);
        assert_eq!(c.http.listen.value, d.http.listen.value);
        assert_eq!(c.data_dir, d.data_dir);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn every_semantic_mistake_is_reported_with_position() {
        let text = "http:\n  listen: 0.0.0.0:9750\ncollector:\n  interval: 10ms\n  max_instances: 0\n";
        let err = Config::parse(text, "vigil.yaml").unwrap_err().to_string();
        assert_eq!(
            err,
            "vigil.yaml:2:11: http.listen: 0.0.0.0:9750 is not a loopback address: set http.token (a bearer token) to expose the API\n\
             vigil.yaml:4:13: collector.interval: 10ms is outside 100ms..1h\n\
             vigil.yaml:5:18: collector.max_instances: must be at least 1"
        );
    }

    #[test]
    fn unknown_key_names_its_path_and_position() {
        let err = Config::parse("collector:\n  intervl: 1s\n", "c.yaml").unwrap_err().to_string();
        assert!(err.starts_with("c.yaml:2:3: collector.intervl: unknown field `intervl`"), "{err}");
    }

    #[test]
    fn bad_value_names_its_path() {
        let err = Config::parse("collector:\n  interval: soon\n", "c.yaml").unwrap_err().to_string();
        assert!(err.starts_with("c.yaml:2:13: collector.interval: `soon` is not a duration"), "{err}");
    }
}
