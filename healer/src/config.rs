//! The healer's part of Vigil's configuration file: `dry_run`, `rules`, `services` and `healer`. The file
//! is one document; the collector parses its own sections from the same text and skips these, and this
//! module does the reverse, so each crate owns and validates its part.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use vigil_collector::config::{ConfigIssue, HumanDuration, from_yaml, render_issues};

use crate::standby::StandbyPolicy;
use crate::supervisor::ServiceSpec;

#[derive(Debug, thiserror::Error)]
pub enum HealerConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render_issues(file, issues))]
    Invalid { file: String, issues: Vec<ConfigIssue> },
}

/// Tuning of the healer: the safety gate and the standby.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealerSettings {
    /// Host-wide limit on executed actions per sliding minute.
    pub max_actions_per_minute: usize,
    /// At most this fraction of a service's instances in standby or in transition (1.0: a service may go
    /// wholly to standby, the zero-instance case).
    pub max_standby_fraction: f64,
    /// CPUs hibernated instances share (cpuset list); default: the last online CPU.
    pub pool_cpus: Option<String>,
    /// CPU quota of a hibernated instance, in cores.
    pub quota: f64,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    pub stop_grace: HumanDuration,
    /// Where instance cgroups are created, in the v2 hierarchy (and below this process's own v1 cgroups on
    /// hybrid hosts). Must equal the collector's `watch.managed_root` so instances keep their names.
    pub cgroup_parent: String,
}

impl Default for HealerSettings {
    fn default() -> Self {
        Self {
            max_actions_per_minute: 30,
            max_standby_fraction: 1.0,
            pool_cpus: None,
            quota: StandbyPolicy::default().quota,
            stop_grace: HumanDuration(Duration::from_secs(10)),
            cgroup_parent: "/vigil".into(),
        }
    }
}

impl HealerSettings {
    pub fn driver_config(&self) -> crate::cgroup::DriverConfig {
        let parent = self.cgroup_parent.trim_end_matches('/');
        if parent == "/vigil" {
            crate::cgroup::DriverConfig::default()
        } else {
            // Outside the default, v1 cgroups go below the same relative path as v2.
            crate::cgroup::DriverConfig { v2_parent: parent.to_string(), v1_parent: Some(parent.to_string()) }
        }
    }

    pub fn policy(&self) -> StandbyPolicy {
        let mut p = StandbyPolicy { quota: self.quota, ..StandbyPolicy::default() };
        if let Some(cpus) = &self.pool_cpus {
            p.pool_cpus = cpus.clone();
        }
        p
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./.vigil")
}

fn default_rules() -> Vec<PathBuf> {
    vec![PathBuf::from("rules/")]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealerConfig {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Decide and audit, execute nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Rule files or directories of `*.yaml` rule files.
    #[serde(default = "default_rules")]
    pub rules: Vec<PathBuf>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub healer: HealerSettings,
    // The collector's sections.
    #[serde(default, rename = "http")]
    _http: IgnoredAny,
    #[serde(default, rename = "collector")]
    _collector: IgnoredAny,
    // The broker's section, parsed by vigil-broker.
    #[serde(default, rename = "broker")]
    _broker: IgnoredAny,
}

impl Default for HealerConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            dry_run: false,
            rules: default_rules(),
            services: Vec::new(),
            healer: HealerSettings::default(),
            _http: IgnoredAny,
            _collector: IgnoredAny,
            _broker: IgnoredAny,
        }
    }
}

impl HealerConfig {
    pub fn load(path: &Path) -> Result<HealerConfig, HealerConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| HealerConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<HealerConfig, HealerConfigError> {
        let invalid = |issues| HealerConfigError::Invalid { file: file.to_string(), issues };
        if text.trim().is_empty() {
            return Ok(HealerConfig::default());
        }
        let config: HealerConfig = from_yaml(text).map_err(|issue| invalid(vec![issue]))?;
        let issues = config.validate();
        if issues.is_empty() { Ok(config) } else { Err(invalid(issues)) }
    }

    /// Every mistake serde cannot see. Services are located by their index (line 0: no position).
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let at = |path: String, message: String| ConfigIssue { line: 0, column: 0, path, message };
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            if let Err(e) = s.validate() {
                issues.push(at(format!("services[{i}]"), e.to_string()));
            }
            if !names.insert(s.name.as_str()) {
                issues.push(at(
                    format!("services[{i}].name"),
                    format!("service `{}` is declared twice", s.name),
                ));
            }
        }
        if !(self.healer.quota > 0.0 && self.healer.quota <= 64.0) {
            issues.push(at(
                "healer.quota".into(),
                format!("{} is not a CPU quota in (0, 64] cores", self.healer.quota),
            ));
        }
        if !(self.healer.max_standby_fraction > 0.0 && self.healer.max_standby_fraction <= 1.0) {
            issues.push(at(
                "healer.max_standby_fraction".into(),
                format!("{} is not a fraction in (0, 1]", self.healer.max_standby_fraction),
            ));
        }
        if self.healer.max_actions_per_minute == 0 {
            issues.push(at("healer.max_actions_per_minute".into(), "must be at least 1".into()));
        }
        issues
    }

    /// The rule files named by `rules`: files as given, directories as their `*.yaml` files, sorted. A
    /// missing default directory is not an error (there are simply no rules); a missing named file is.
    pub fn rule_files(&self) -> Result<Vec<PathBuf>, HealerConfigError> {
        let mut out = Vec::new();
        for entry in &self.rules {
            if entry.is_dir() {
                let dir = std::fs::read_dir(entry)
                    .map_err(|source| HealerConfigError::Read { path: entry.clone(), source })?;
                let mut files: Vec<PathBuf> = dir
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                    .collect();
                files.sort();
                out.extend(files);
            } else if entry.exists() || self.rules != default_rules() {
                out.push(entry.clone());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_next_to_collector_sections() {
        let text = "data_dir: /tmp/v\nhttp: { listen: 127.0.0.1:9750 }\ncollector: { interval: 1s }\n\
                    services:\n  - name: echo\n    command: [python3, app.py, --port, \"{port}\"]\n    port: 18080\n\
                    \x20   readiness: { http: /healthz }\n";
        let c = HealerConfig::parse(text, "v.yaml").unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].name, "echo");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/v"));
        assert!(!c.dry_run);
    }

    #[test]
    fn reports_every_service_mistake() {
        let text = "services:\n  - { name: a, command: [x], port: 0 }\n  - { name: a, command: [x], port: 1 }\n\
                    healer: { quota: 0 }\n";
        let err = HealerConfig::parse(text, "v.yaml").unwrap_err().to_string();
        assert_eq!(err.lines().count(), 3, "{err}");
        assert!(err.contains("services[0]"), "{err}");
        assert!(err.contains("services[1].name: service `a` is declared twice"), "{err}");
        assert!(err.contains("healer.quota: 0 is not a CPU quota"), "{err}");
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let err = HealerConfig::parse("servics: []\n", "v.yaml").unwrap_err().to_string();
        assert!(err.starts_with("v.yaml:1:1: servics: unknown field `servics`"), "{err}");
    }
}
