//! `vigil-core`: what every Vigil crate shares and nothing heavy. Vigil's one configuration file is read
//! here, once: YAML that keeps the line and column of every value (`yaml`), values that refuse what they
//! cannot be as they are read (`values`), the declaration of a managed service (`service`), and
//! [`VigilConfig`] with every section, validated as a whole so a person sees every mistake at once as
//! `file:line:column: key.path: message` (`config`, `issue`). The components build their own settings from
//! it. The per-tick snapshot model the collector produces and the healer and broker read lives here too
//! (`snapshot`), so those crates need not depend on the collector. RFC 3339 timestamps, as Alertmanager and
//! Prometheus write them, are read and written by `time`.
//!
//! Shell-style globs (`glob`), which rule selectors and notification matchers share, are here too.
//!
//! Layers, bottom up: `issue`; `yaml`; `glob`; `values`; `scale`; `service`; `config`. `snapshot` and `time`
//! stand alone.

pub mod config;
pub mod glob;
pub mod issue;
pub mod scale;
pub mod service;
pub mod snapshot;
pub mod state_file;
pub mod time;
pub mod values;
pub mod yaml;

pub use config::VigilConfig;
pub use issue::{ConfigError, ConfigIssue, render_issues};
pub use service::ServiceSpec;
