//! The healer's settings, built from the one parsed [`VigilConfig`]: `data_dir`, `dry_run`, `rules`,
//! `services` and `healer`. The file is read, and every mistake in every section reported, by
//! `vigil_core::config`; this module only turns the checked sections into what the healer runs with.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use vigil_core::config::{HealerSettings, VigilConfig, default_rules};
use vigil_core::{ConfigError, ServiceSpec};

use crate::cgroup::DriverConfig;
use crate::standby::StandbyPolicy;

#[derive(Debug, thiserror::Error)]
pub enum HealerConfigError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read rules directory {path}: {source}")]
    RulesDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the healer runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct HealerConfig {
    pub data_dir: PathBuf,
    /// Decide and audit, execute nothing.
    pub dry_run: bool,
    /// Rule files or directories of `*.yaml` rule files.
    pub rules: Vec<PathBuf>,
    pub services: Vec<ServiceSpec>,
    pub healer: HealerSettings,
    /// How often the autoscaler decides: `collector.interval`, the tick its windows are checked against.
    pub tick: Duration,
    /// The names of `notify.receivers`, which rules may name.
    pub receivers: Vec<String>,
    /// `notify:`: the receivers of decisions and notify rules.
    pub notify: vigil_core::config::NotifyConfig,
    /// `externalURL` / `generatorURL` of notifications (`notify.external_url`, else the API's address).
    pub external_url: String,
    /// `alerts.secret`: incoming alerts must be signed with one of these.
    pub alerts_secret: Option<vigil_core::config::Secrets>,
}

impl Default for HealerConfig {
    fn default() -> Self {
        Self::from_config(&VigilConfig::default())
    }
}

impl HealerConfig {
    /// The healer's sections of a checked configuration.
    pub fn from_config(config: &VigilConfig) -> HealerConfig {
        HealerConfig {
            data_dir: config.data_dir.clone(),
            dry_run: config.dry_run,
            rules: config.rules.clone(),
            services: config.services.clone(),
            healer: config.healer.clone(),
            tick: config.collector.interval.0,
            receivers: config.notify.receivers.iter().map(|r| r.name.clone()).collect(),
            notify: config.notify.clone(),
            external_url: config.notify.external_url_or(config.http.listen),
            alerts_secret: config.alerts.secret.clone(),
        }
    }

    /// Reads and checks the whole file at `path` (every section), and keeps the healer's.
    pub fn load(path: &Path) -> Result<HealerConfig, HealerConfigError> {
        Ok(Self::from_config(&VigilConfig::load(path)?))
    }

    /// The same for `text`; `file` names it in issues.
    pub fn parse(text: &str, file: &str) -> Result<HealerConfig, HealerConfigError> {
        Ok(Self::from_config(&VigilConfig::parse(text, file)?))
    }

    /// Where the cgroup driver creates instance cgroups.
    pub fn driver_config(&self) -> DriverConfig {
        let parent = self.healer.cgroup_parent.trim_end_matches('/');
        if parent == "/vigil" {
            DriverConfig::default()
        } else {
            // Outside the default, v1 cgroups go below the same relative path as v2.
            DriverConfig { v2_parent: parent.to_string(), v1_parent: Some(parent.to_string()) }
        }
    }

    /// The standby's CPU pool and quota.
    pub fn policy(&self) -> StandbyPolicy {
        let mut p = StandbyPolicy { quota: self.healer.quota.cores(), ..StandbyPolicy::default() };
        if let Some(cpus) = &self.healer.pool_cpus {
            p.pool_cpus = cpus.as_str().to_string();
        }
        p
    }

    /// The rule files named by `rules`: files as given, directories as their `*.yaml` files, sorted. A
    /// missing default directory is not an error (there are simply no rules); a missing named file is.
    pub fn rule_files(&self) -> Result<Vec<PathBuf>, HealerConfigError> {
        let mut out = Vec::new();
        for entry in &self.rules {
            if entry.is_dir() {
                let dir = std::fs::read_dir(entry)
                    .map_err(|source| HealerConfigError::RulesDir { path: entry.clone(), source })?;
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
    fn built_from_its_sections_beside_the_others() {
        let text = "data_dir: /tmp/v\nhttp: { listen: 127.0.0.1:9750 }\ncollector: { interval: 1s }\n\
                    services:\n  - name: echo\n    command: [python3, app.py, --port, \"{port}\"]\n    port: 18080\n\
                    \x20   readiness: { http: /healthz }\nhealer: { quota: 0.1, pool_cpus: 0-1 }\n";
        let c = HealerConfig::parse(text, "v.yaml").unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].name, "echo");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/v"));
        assert!(!c.dry_run);
        assert_eq!(c.policy(), StandbyPolicy { pool_cpus: "0-1".into(), quota: 0.1 });
        assert_eq!(c.driver_config(), DriverConfig::default());
    }

    #[test]
    fn every_mistake_is_reported_with_its_position() {
        let text = "services:\n  - { name: a, command: [x], port: 0 }\n  - { name: a, command: [x], port: 1 }\n\
                    healer: { quota: 0 }\n";
        let err = HealerConfig::parse(text, "v.yaml").unwrap_err().to_string();
        assert_eq!(
            err,
            "v.yaml:2:36: services[0].port: port must be above 0\n\
             v.yaml:3:13: services[1].name: service `a` is declared twice (first as services[0])\n\
             v.yaml:4:18: healer.quota: 0 is not a CPU quota in (0, 64] cores"
        );
    }

    #[test]
    fn a_parent_of_its_own_nests_v1_cgroups_the_same_way() {
        let c = HealerConfig::parse(
            "healer: { cgroup_parent: /mine/ }\ncollector: { watch: { managed_root: /mine } }\n",
            "v.yaml",
        )
        .unwrap();
        assert_eq!(
            c.driver_config(),
            DriverConfig { v2_parent: "/mine".into(), v1_parent: Some("/mine".into()) }
        );
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let err = HealerConfig::parse("servics: []\n", "v.yaml").unwrap_err().to_string();
        assert!(err.starts_with("v.yaml:1:1: servics: unknown field `servics`"), "{err}");
    }
}
