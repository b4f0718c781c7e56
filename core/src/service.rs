//! One managed service as the config's `services:` list declares it: what to run, on which ports, how
//! readiness is checked, which hooks run around standby, and how the broker routes to it. Declared here once:
//! the healer runs these specs and the broker builds its routes from the same ones.

use std::collections::BTreeMap;

use crate::scale::ScalePolicy;
use crate::values::HumanDuration;

/// A service entry that cannot be run as written.
#[derive(Debug, thiserror::Error)]
#[error("invalid service {service:?}: {reason}")]
pub struct InvalidService {
    pub service: String,
    pub reason: String,
}

/// One managed service, as the config's `services:` list declares it.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// Program and arguments; `{port}` is replaced by the instance's port. Required where Vigil runs the
    /// service (`vigil up`); `vigil broker` alone also reads entries without it, naming services whose
    /// instances register themselves.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment for the service (on top of Vigil's own); `{port}` is replaced in values.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The first instance's port; instance `n` listens on `port + n`. Required where Vigil runs the service.
    #[serde(default)]
    pub port: u16,
    #[serde(default = "one")]
    pub instances: u32,
    #[serde(default)]
    pub readiness: Readiness,
    /// Runs before the instance is hibernated (`{port}` substituted).
    #[serde(default)]
    pub pre_hibernate: Option<Vec<String>>,
    /// Runs after the instance has woken (`{port}` substituted).
    #[serde(default)]
    pub post_wake: Option<Vec<String>>,
    /// HTTP trigger path prefix, for the broker.
    #[serde(default)]
    pub route: Option<String>,
    /// HTTP trigger host name (the request's `Host`, without port), for the broker.
    #[serde(default)]
    pub host: Option<String>,
    /// The version the broker files the instances under (for traffic splits between versions).
    #[serde(default = "default_version")]
    pub version: String,
    /// The service the broker routes these instances under (default: `name`). Two managed services that
    /// serve one name with different versions are two versions of it, for splits and canaries.
    #[serde(default)]
    pub serves: Option<String>,
    /// How long readiness may take after a start or a wake before the instance is restarted (default
    /// 60s).
    #[serde(default)]
    pub ready_timeout: Option<HumanDuration>,
    /// `always` (the default): instances start with Vigil. `on_demand`: they stay stopped (zero running
    /// instances) until the broker has a request for the service, and start then.
    #[serde(default)]
    pub start: StartPolicy,
    /// Follow the traffic between `scale.min` and `scale.max` instances instead of a fixed `instances`
    /// count (see `vigil_healer::autoscale`).
    #[serde(default)]
    pub scale: Option<ScalePolicy>,
    /// Where the instances keep their data, in order of preference (absolute paths; `{instance_id}` is
    /// replaced). Each start takes the first one that is not on a disk a workflow cordoned, creating it if
    /// missing; `{data_dir}` in the command, the env values and the hooks, and `VIGIL_DATA_DIR`, name it.
    /// A workflow's `evacuate` off a disk restarts the instances there into the next one.
    #[serde(default)]
    pub data_dirs: Vec<String>,
}

/// Replaced by the instance's data directory (one of `data_dirs`) in commands, env values and hooks.
pub const DATA_DIR_PLACEHOLDER: &str = "{data_dir}";

/// When a managed instance first starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPolicy {
    #[default]
    Always,
    OnDemand,
}

/// The version of instances that name none.
pub const DEFAULT_VERSION: &str = "v1";

fn default_version() -> String {
    DEFAULT_VERSION.to_string()
}

fn one() -> u32 {
    1
}

impl ServiceSpec {
    /// The port of instance `index` (from 0).
    pub fn port_of(&self, index: u32) -> u16 {
        self.port.saturating_add(u16::try_from(index).unwrap_or(u16::MAX))
    }

    /// The service name requests use to reach these instances.
    pub fn routed_name(&self) -> &str {
        self.serves.as_deref().unwrap_or(&self.name)
    }

    /// How many instances the service has ids and ports for: `scale.max` when it scales, else `instances`.
    pub fn slots(&self) -> u32 {
        self.scale.as_ref().map_or(self.instances, |s| s.max)
    }

    /// The id of instance `index`: `<service>-<index>`.
    pub fn instance_id(&self, index: u32) -> String {
        format!("{}-{index}", self.name)
    }

    /// Every mistake serde cannot see, each with the field it is about (`""` for the entry as a whole):
    /// names usable as cgroup directories, a command, ports that fit, hooks and readiness that can run.
    pub fn mistakes(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.name.is_empty()
            || self.name == "."
            || self.name == ".."
            || self.name.contains(['/', '\0'])
            || self.name.chars().any(char::is_whitespace)
        {
            out.push((
                "name",
                format!("{:?}: a name must be non-empty, without '/' or whitespace", self.name),
            ));
        }
        if self.command.first().is_none_or(|p| p.is_empty()) {
            out.push(("command", "command must name a program".into()));
        }
        if self.instances == 0 {
            out.push(("instances", "instances must be at least 1".into()));
        }
        if self.port == 0 {
            out.push(("port", "port must be above 0".into()));
        } else if self.slots() > 0 {
            let last = u32::from(self.port) + self.slots() - 1;
            if last > u32::from(u16::MAX) {
                let field = if self.scale.is_some() { "scale.max" } else { "instances" };
                out.push((field, format!("ports {}..={last} do not fit below 65536", self.port)));
            }
        }
        for (hook, cmd) in [("pre_hibernate", &self.pre_hibernate), ("post_wake", &self.post_wake)] {
            if cmd.as_ref().is_some_and(|c| c.first().is_none_or(|p| p.is_empty())) {
                out.push((hook, format!("{hook} must name a program")));
            }
        }
        match &self.readiness {
            Readiness::Http(path) if !path.starts_with('/') => {
                out.push(("readiness.http", format!("readiness http path {path:?} must start with '/'")))
            }
            Readiness::Tcp(false) => {
                out.push(("readiness.tcp", "readiness tcp: false is not a check; use tcp: true".into()))
            }
            _ => {}
        }
        if let Some(route) = &self.route
            && !route.starts_with('/')
        {
            out.push(("route", format!("{route:?} must start with '/'")));
        }
        for d in &self.data_dirs {
            if !d.starts_with('/') {
                out.push(("data_dirs", format!("{d:?} must be an absolute path")));
            }
        }
        if self.data_dirs.is_empty() {
            let hooks = self.pre_hibernate.iter().chain(&self.post_wake).flatten();
            let mut texts = self.command.iter().chain(self.env.values()).chain(hooks);
            if texts.any(|t| t.contains(DATA_DIR_PLACEHOLDER)) {
                out.push((
                    "data_dirs",
                    format!("{DATA_DIR_PLACEHOLDER} is used, but data_dirs names no directory"),
                ));
            }
        }
        out
    }

    /// The first of [`ServiceSpec::mistakes`], for a spec that did not come from a config file.
    pub fn validate(&self) -> Result<(), InvalidService> {
        match self.mistakes().into_iter().next() {
            None => Ok(()),
            Some((_, reason)) => Err(InvalidService { service: self.name.clone(), reason }),
        }
    }
}

/// How Vigil decides that a started instance serves: YAML `{ http: /healthz }` (a GET on the instance's port
/// answers 2xx) or `{ tcp: true }` (the port accepts a connection, the default).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Readiness {
    Http(String),
    Tcp(bool),
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::Tcp(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_yaml(readiness: &str) -> String {
        format!("name: echo\ncommand: [python3, app.py, --port, \"{{port}}\"]\nport: 18080\n{readiness}")
    }

    #[test]
    fn readiness_from_yaml() {
        let spec: ServiceSpec =
            serde_saphyr::from_str(&spec_yaml("readiness: { http: /healthz }\n")).unwrap();
        assert_eq!(spec.readiness, Readiness::Http("/healthz".into()));
        assert_eq!(spec.instances, 1);
        assert!(spec.validate().is_ok());
        let spec: ServiceSpec = serde_saphyr::from_str(&spec_yaml("readiness: { tcp: true }\n")).unwrap();
        assert_eq!(spec.readiness, Readiness::Tcp(true));
        let spec: ServiceSpec = serde_saphyr::from_str(&spec_yaml("")).unwrap();
        assert_eq!(spec.readiness, Readiness::Tcp(true));
        assert!(serde_saphyr::from_str::<ServiceSpec>(&spec_yaml("readiness: { grpc: x }\n")).is_err());
        assert!(serde_saphyr::from_str::<ServiceSpec>(&spec_yaml("bogus: 1\n")).is_err());
    }

    #[test]
    fn full_spec_from_yaml() {
        let yaml = "\
name: echo
command: [python3, app.py]
env: { PORT: \"{port}\" }
port: 18080
instances: 2
pre_hibernate: [curl, \"http://127.0.0.1:{port}/flush\"]
post_wake: [true]
route: /echo
";
        let spec: ServiceSpec = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(spec.instances, 2);
        assert_eq!(spec.port_of(1), 18081);
        assert_eq!(spec.instance_id(1), "echo-1");
        assert_eq!(spec.env.get("PORT").map(String::as_str), Some("{port}"));
        assert_eq!(spec.post_wake, Some(vec!["true".to_string()]));
        assert_eq!(spec.route.as_deref(), Some("/echo"));
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn validation() {
        let base: ServiceSpec = serde_saphyr::from_str(&spec_yaml("")).unwrap();
        let bad = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut s = base.clone();
            f(&mut s);
            s.validate().is_err()
        };
        assert!(bad(&|s| s.name = "a/b".into()));
        assert!(bad(&|s| s.name = String::new()));
        assert!(bad(&|s| s.command.clear()));
        assert!(bad(&|s| s.instances = 0));
        assert!(bad(&|s| s.port = 0));
        assert!(bad(&|s| {
            s.port = 65535;
            s.instances = 2;
        }));
        assert!(bad(&|s| s.readiness = Readiness::Http("healthz".into())));
        assert!(bad(&|s| s.readiness = Readiness::Tcp(false)));
        assert!(bad(&|s| s.pre_hibernate = Some(Vec::new())));
    }

    #[test]
    fn every_mistake_names_its_field() {
        let mut s: ServiceSpec = serde_saphyr::from_str(&spec_yaml("")).unwrap();
        assert_eq!(s.mistakes(), Vec::new());
        s.name = "a b".into();
        s.command = vec![String::new()];
        s.port = 65535;
        s.instances = 2;
        s.post_wake = Some(Vec::new());
        s.readiness = Readiness::Http("healthz".into());
        s.route = Some("echo".into());
        assert_eq!(
            s.mistakes(),
            vec![
                ("name", "\"a b\": a name must be non-empty, without '/' or whitespace".to_string()),
                ("command", "command must name a program".to_string()),
                ("instances", "ports 65535..=65536 do not fit below 65536".to_string()),
                ("post_wake", "post_wake must name a program".to_string()),
                ("readiness.http", "readiness http path \"healthz\" must start with '/'".to_string()),
                ("route", "\"echo\" must start with '/'".to_string()),
            ]
        );
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "invalid service \"a b\": \"a b\": a name must be non-empty, without '/' or whitespace"
        );
    }

    #[test]
    fn data_dirs_are_absolute_and_the_placeholder_needs_them() {
        let mut s: ServiceSpec =
            serde_saphyr::from_str(&spec_yaml("data_dirs: [\"/srv/a/{instance_id}\"]\n")).unwrap();
        assert_eq!(s.data_dirs, vec!["/srv/a/{instance_id}".to_string()]);
        s.command.push("--data={data_dir}".into());
        assert_eq!(s.mistakes(), Vec::new());
        s.data_dirs.push("srv/b".into());
        assert_eq!(s.mistakes(), vec![("data_dirs", "\"srv/b\" must be an absolute path".to_string())]);
        s.data_dirs.clear();
        assert_eq!(
            s.mistakes(),
            vec![("data_dirs", "{data_dir} is used, but data_dirs names no directory".to_string())]
        );
    }
}
