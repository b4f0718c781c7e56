//! The healer's settings, built from the one parsed [`VigilConfig`]: `data_dir`, `dry_run`, `rules`,
//! `workflows`, `services` and `healer`. The file is read, and every mistake in every section reported, by
//! `vigil_core::config`; this module only turns the checked sections into what the healer runs with.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use vigil_core::config::{HealerSettings, VigilConfig, default_rules, default_workflows};
use vigil_core::{ConfigError, ServiceSpec};

use crate::cgroup::DriverConfig;
use crate::standby::StandbyPolicy;
use crate::workflow::{WorkflowFilesError, WorkflowSet, load_files};

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
    #[error("cannot read workflows directory {path}: {source}")]
    WorkflowsDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Workflows(#[from] WorkflowFilesError),
}

/// What the healer runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct HealerConfig {
    pub data_dir: PathBuf,
    /// Decide and audit, execute nothing.
    pub dry_run: bool,
    /// Rule files or directories of `*.yaml` rule files.
    pub rules: Vec<PathBuf>,
    /// Workflow files or directories of `*.yaml` workflow files.
    pub workflows: Vec<PathBuf>,
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
            workflows: config.workflows.clone(),
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
        yaml_files(&self.rules, &default_rules())
            .map_err(|(path, source)| HealerConfigError::RulesDir { path, source })
    }

    /// The workflow files named by `workflows`, found the same way as [`HealerConfig::rule_files`].
    pub fn workflow_files(&self) -> Result<Vec<PathBuf>, HealerConfigError> {
        yaml_files(&self.workflows, &default_workflows())
            .map_err(|(path, source)| HealerConfigError::WorkflowsDir { path, source })
    }

    /// Every workflow file, checked ([`load_files`]): each alone, names unique across them, and the
    /// receivers they name against `notify.receivers`.
    pub fn load_workflows(&self) -> Result<Vec<WorkflowSet>, HealerConfigError> {
        Ok(load_files(&self.workflow_files()?, &self.receivers)?)
    }
}

/// `entries` as files: files as given, directories as their `*.yaml` / `*.yml` files, sorted. When
/// `entries` is `default`, a missing entry is skipped (nothing configured yet); otherwise it is kept, so
/// reading it reports it missing. The error is the directory that could not be listed.
fn yaml_files(entries: &[PathBuf], default: &[PathBuf]) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut out = Vec::new();
    for entry in entries {
        if entry.is_dir() {
            let dir = std::fs::read_dir(entry).map_err(|source| (entry.clone(), source))?;
            let mut files: Vec<PathBuf> = dir
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            files.sort();
            out.extend(files);
        } else if entry.exists() || entries != default {
            out.push(entry.clone());
        }
    }
    Ok(out)
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

    const ONE: &str = "workflows:\n  - name: disk\n    trigger: { manual: true }\n    notify: [ops]\n    steps:\n      - { name: a, approve: {} }\n";

    /// A fresh directory for one test, removed first if a previous run left it.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vigil-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn workflow_files_are_found_like_rule_files() {
        let dir = scratch("workflow-files");
        std::fs::write(dir.join("b.yaml"), ONE).unwrap();
        std::fs::write(dir.join("a.yml"), "").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a workflow file").unwrap();
        let c = HealerConfig { workflows: vec![dir.clone()], ..HealerConfig::default() };
        assert_eq!(c.workflow_files().unwrap(), [dir.join("a.yml"), dir.join("b.yaml")]);
        // The default directory may be missing: no workflows yet. A file named in the config may not.
        let default = HealerConfig { workflows: default_workflows(), ..HealerConfig::default() };
        assert_eq!(default.workflows, [PathBuf::from("workflows/")]);
        let missing = dir.join("gone.yaml");
        let named = HealerConfig { workflows: vec![missing.clone()], ..HealerConfig::default() };
        assert_eq!(named.workflow_files().unwrap(), std::slice::from_ref(&missing));
        let err = named.load_workflows().unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot read workflow file {}: ", missing.display())), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn workflows_load_with_names_unique_across_files_and_known_receivers() {
        let dir = scratch("workflows-load");
        std::fs::write(dir.join("a.yaml"), ONE).unwrap();
        let mut c = HealerConfig { workflows: vec![dir.clone()], ..HealerConfig::default() };
        c.receivers = vec!["ops".into()];
        let sets = c.load_workflows().unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(&*sets[0].workflows[0].name, "disk");

        // The same name in a second file, and a receiver the config does not have.
        std::fs::write(dir.join("b.yaml"), format!("{ONE}  - name: other\n    trigger: {{ manual: true }}\n    steps:\n      - {{ name: a, notify: {{ message: hi, receivers: [pager] }} }}\n")).unwrap();
        let (a, b) = (dir.join("a.yaml").display().to_string(), dir.join("b.yaml").display().to_string());
        assert_eq!(
            c.load_workflows().unwrap_err().to_string(),
            format!(
                "{b}:2:11: workflows[0].name: `disk` is already the name of a workflow in {a}\n\
                 {b}:10:55: workflows[1].steps[0].notify.receivers[0]: no receiver `pager` in the config's \
                 notify.receivers (configured: ops)"
            )
        );
        // Every file's mistakes come back, each file's own way.
        c.receivers.clear();
        let err = c.load_workflows().unwrap_err().to_string();
        assert!(err.starts_with(&format!("{a}:4:14: workflows[0].notify[0]: no receiver `ops`")), "{err}");
        assert_eq!(err.lines().count(), 4, "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let err = HealerConfig::parse("servics: []\n", "v.yaml").unwrap_err().to_string();
        assert!(err.starts_with("v.yaml:1:1: servics: unknown field `servics`"), "{err}");
    }
}
