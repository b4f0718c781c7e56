//! The collector's part of Vigil's configuration file, `http:` and `collector:`, built from the one parsed
//! [`VigilConfig`] (see `vigil_core::config`: the file is read, and every mistake in it reported, there).
//! `vigil up` with no `--config` runs on the embedded defaults ([`DEFAULT_YAML`]).

use std::path::Path;

pub use vigil_core::config::{CollectorConfig, DEFAULT_YAML, HttpConfig, Runs, VigilConfig};
pub use vigil_core::values::{HumanDuration, parse_duration};
pub use vigil_core::{ConfigError, ConfigIssue, render_issues};

/// What the collector and its HTTP listener run with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub http: HttpConfig,
    pub collector: CollectorConfig,
}

impl Config {
    /// The collector's sections of a checked configuration.
    pub fn from_config(config: &VigilConfig) -> Config {
        Config { http: config.http.clone(), collector: config.collector.clone() }
    }

    /// Reads and checks the whole file at `path` (every section) for the collector alone, and keeps the
    /// collector's sections.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        VigilConfig::load_for(path, Runs::WithoutServices).map(|c| Config::from_config(&c))
    }

    /// The same for `text`; `file` names it in issues.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        VigilConfig::parse_for(text, file, Runs::WithoutServices).map(|c| Config::from_config(&c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_build_the_default() {
        let c = Config::parse(DEFAULT_YAML, "defaults").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.collector.cgroupfs_every_ticks(), 10);
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9750");
    }

    #[test]
    fn a_mistake_in_another_section_stops_the_collector_too() {
        let err = Config::parse("collector:\n  interval: 2s\nhealer:\n  quota: 0\n", "v.yaml").unwrap_err();
        assert_eq!(err.to_string(), "v.yaml:4:10: healer.quota: 0 is not a CPU quota in (0, 64] cores");
    }

    #[test]
    fn built_from_its_sections() {
        let c = Config::parse(
            "collector:\n  interval: 2s\n  watch: { managed_root: /v }\nhealer: { cgroup_parent: /v }\n",
            "v.yaml",
        )
        .unwrap();
        assert_eq!(c.collector.interval(), std::time::Duration::from_secs(2));
        assert_eq!(c.collector.watch.managed_root, "/v");
    }
}
