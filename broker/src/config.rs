//! The broker's setup, built from the one parsed [`VigilConfig`]: its `broker:` section and the routes of
//! the managed services (`services:`). The file is read, and every mistake in every section reported as
//! `file:line:column: key.path: message`, by `vigil_core::config`; the section types live there too and are
//! re-exported here under their old paths.

use std::path::Path;

pub use vigil_core::config::{
    BrokerConfig, HealthPolicy, HttpTriggerConfig, QueueConfig, Runs, Split, SplitError, Upstream,
    VigilConfig,
};
use vigil_core::{ConfigError, ServiceSpec};

/// Why the broker's setup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BrokerConfigError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What the broker reads of a managed service: a view of its [`ServiceSpec`], not a second declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRoute {
    pub name: String,
    pub route: Option<String>,
    pub host: Option<String>,
    pub version: String,
    /// The service the broker routes these instances under (default: `name`).
    pub serves: Option<String>,
}

impl From<&ServiceSpec> for ServiceRoute {
    fn from(s: &ServiceSpec) -> Self {
        ServiceRoute {
            name: s.name.clone(),
            route: s.route.clone(),
            host: s.host.clone(),
            version: s.version.clone(),
            serves: s.serves.clone(),
        }
    }
}

impl ServiceRoute {
    pub fn routed_name(&self) -> &str {
        self.serves.as_deref().unwrap_or(&self.name)
    }
}

/// Everything the broker runs with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerFile {
    pub broker: BrokerConfig,
    pub services: Vec<ServiceRoute>,
}

/// Where the HTTP trigger sends a request: a path prefix and/or a host name, to a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoute {
    pub prefix: Option<String>,
    pub host: Option<String>,
    pub service: String,
}

impl BrokerFile {
    /// The broker's section and the service routes of a checked configuration.
    pub fn from_config(config: &VigilConfig) -> BrokerFile {
        BrokerFile {
            broker: config.broker.clone(),
            services: config.services.iter().map(ServiceRoute::from).collect(),
        }
    }

    /// Reads and checks the whole file at `path` (every section) for the broker alone, where a service
    /// entry may only name a service whose instances register themselves; keeps what the broker needs.
    pub fn load(path: &Path) -> Result<BrokerFile, BrokerConfigError> {
        Ok(Self::from_config(&VigilConfig::load_for(path, Runs::WithoutServices)?))
    }

    /// The same for `text`; `file` names it in issues.
    pub fn parse(text: &str, file: &str) -> Result<BrokerFile, BrokerConfigError> {
        Ok(Self::from_config(&VigilConfig::parse_for(text, file, Runs::WithoutServices)?))
    }

    /// The HTTP trigger's routes: managed services first, then upstreams, longest prefix first. (The
    /// configuration check refuses a route that leads to two services, so none is shadowed here.)
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
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_embedded_default_yaml_is_the_default() {
        let f = BrokerFile::parse(vigil_core::config::DEFAULT_YAML, "default").unwrap();
        assert_eq!(f.broker, BrokerConfig::default());
    }

    #[test]
    fn the_frame_limit_is_the_codec_s() {
        assert_eq!(vigil_core::config::MAX_FRAME_LEN, crate::rsocket::frame::MAX_FRAME_LEN);
        assert_eq!(BrokerConfig::default().max_frame_bytes, crate::rsocket::frame::MAX_FRAME_LEN);
    }

    #[test]
    fn defaults_are_loopback() {
        let f = BrokerFile::parse("", "v.yaml").unwrap();
        assert_eq!(f.broker.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(f.broker.http.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn reads_its_section_and_service_routes_beside_the_others() {
        let text = "data_dir: /tmp/v\nhttp: { listen: 127.0.0.1:9750 }\n\
                    broker:\n  queue: { timeout: 5s, max_per_service: 3 }\n  upstreams:\n    - { service: ext, address: 127.0.0.1:9000, route: /ext }\n\
                    services:\n  - name: echo\n    command: [python3]\n    port: 18080\n    route: /echo\n";
        let f = BrokerFile::parse(text, "v.yaml").unwrap();
        assert_eq!(f.broker.queue.timeout.0, Duration::from_secs(5));
        assert_eq!(f.broker.queue.max_per_service, 3);
        assert_eq!(
            f.services,
            vec![ServiceRoute {
                name: "echo".into(),
                route: Some("/echo".into()),
                host: None,
                version: "v1".into(),
                serves: None
            }]
        );
        let routes = f.http_routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].service, "echo");
        assert_eq!(routes[1].service, "ext");
    }

    #[test]
    fn reports_every_mistake() {
        let text = "broker:\n  listen: 0.0.0.0:7878\n  queue: { max_total: 0 }\n  max_frame_bytes: 10\n\
                    services:\n  - { name: a, command: [x], port: 1, route: nope }\n";
        let err = BrokerFile::parse(text, "v.yaml").unwrap_err().to_string();
        assert_eq!(
            err,
            "v.yaml:2:11: broker.listen: 0.0.0.0:7878 is not a loopback address: set broker.token to expose the \
             broker\n\
             v.yaml:3:23: broker.queue.max_total: must be at least 1\n\
             v.yaml:4:20: broker.max_frame_bytes: 10 is not in 64..=16777215\n\
             v.yaml:6:46: services[0].route: \"nope\" must start with '/'"
        );
    }

    #[test]
    fn unknown_broker_key_is_located() {
        let err = BrokerFile::parse("broker:\n  lisen: 1\n", "v.yaml").unwrap_err().to_string();
        assert!(err.starts_with("v.yaml:2:3: broker.lisen: unknown field `lisen`"), "{err}");
    }
}
