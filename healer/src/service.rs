//! One managed service as the config's `services:` list declares it. Declared once, in `vigil-core`, where
//! the broker reads its routes from the same specs; re-exported here so the healer's modules and users keep
//! their paths.

pub use vigil_core::service::{DEFAULT_VERSION, InvalidService, Readiness, ServiceSpec, StartPolicy};
