//! `vigil-otel`: what every OpenTelemetry exporter of Vigil reads the same way. The collector's OTLP
//! metrics and the broker's OTLP traces are both switched on and tuned by the standard `OTEL_*`
//! environment variables; the rules for reading them (when a signal is asked for, gRPC only, timeouts in
//! milliseconds named when malformed, the resource and its `service.name`) live here once.

use std::time::Duration;

use opentelemetry_sdk::Resource;

pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// `service.name` of the resource unless the environment names one.
pub const DEFAULT_SERVICE_NAME: &str = "vigil";

/// A variable set to what Vigil cannot use, named with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("{var}={value:?}: {reason}")]
    Invalid { var: &'static str, value: String, reason: &'static str },
}

/// [`requested_in`] for any signal: `exporter_var` is its `OTEL_<SIGNAL>_EXPORTER` and `endpoint_var` its
/// `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` (the collector's metrics use the `METRICS` variables, the broker's traces the `TRACES` ones).
pub fn signal_requested_in(
    lookup: impl Fn(&str) -> Option<String>,
    exporter_var: &str,
    endpoint_var: &str,
) -> bool {
    let get = |var: &str| lookup(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    if get(OTEL_SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    if let Some(exporters) = get(exporter_var) {
        // A comma-separated list by the spec; `none` wins over anything listed beside it.
        let names: Vec<&str> = exporters.split(',').map(str::trim).collect();
        return !names.iter().any(|n| n.eq_ignore_ascii_case("none"))
            && names.iter().any(|n| n.eq_ignore_ascii_case("otlp"));
    }
    get(OTEL_EXPORTER_OTLP_ENDPOINT).is_some() || get(endpoint_var).is_some()
}

/// Reads a variable the way the SDK does, but keeps a non-UTF-8 value (lossily) so that it is reported
/// as invalid instead of silently ignored.
pub fn env_lookup(var: &str) -> Option<String> {
    std::env::var_os(var).map(|v| v.to_string_lossy().into_owned())
}

/// The protocol variable and its value when it asks for anything but gRPC: `signal_var` (e.g.
/// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`) takes precedence over the generic `OTEL_EXPORTER_OTLP_PROTOCOL`.
pub fn non_grpc_protocol(
    lookup: impl Fn(&str) -> Option<String>,
    signal_var: &'static str,
) -> Option<(&'static str, String)> {
    let get = |var: &str| lookup(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    for var in [signal_var, OTEL_EXPORTER_OTLP_PROTOCOL] {
        if let Some(value) = get(var) {
            return (value != "grpc").then_some((var, value));
        }
    }
    None
}

/// A positive number of milliseconds in `var`, or `None` when unset; a malformed value is an error
/// naming it (where the SDK would silently fall back to its default).
pub fn env_millis(
    lookup: impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<Duration>, EnvError> {
    let Some(value) = lookup(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms))),
        _ => Err(EnvError::Invalid { var, value, reason: "expected a positive number of milliseconds" }),
    }
}

/// True when the variables name a `service.name`, which then must not be overridden by ours.
pub fn env_names_service(lookup: impl Fn(&str) -> Option<String>) -> bool {
    if lookup(OTEL_SERVICE_NAME).is_some_and(|v| !v.trim().is_empty()) {
        return true;
    }
    // Parsed like the SDK's resource detector does: `k=v` pairs split on commas, keys trimmed.
    lookup(OTEL_RESOURCE_ATTRIBUTES).is_some_and(|attrs| {
        attrs
            .split_terminator(',')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == "service.name"))
    })
}

/// Runs `f`, which blocks on an OpenTelemetry SDK thread (a flush or shutdown). On a multi-thread tokio
/// runtime the runtime may move other tasks off this worker meanwhile; elsewhere it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread) {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// The resource every Vigil signal goes out with: the SDK's detectors (`OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`), with [`DEFAULT_SERVICE_NAME`] instead of `unknown_service`.
pub fn resource(lookup: impl Fn(&str) -> Option<String>) -> Resource {
    // `Resource::builder()` runs the SDK's detectors, which read OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES themselves; we only replace their `unknown_service` fallback.
    let builder = Resource::builder();
    if env_names_service(lookup) {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |var| vars.iter().find(|(k, _)| *k == var).map(|(_, v)| v.to_string())
    }

    #[test]
    fn service_name_from_env_is_kept() {
        assert!(!env_names_service(lookup(&[])));
        assert!(!env_names_service(lookup(&[(OTEL_SERVICE_NAME, " ")])));
        assert!(env_names_service(lookup(&[(OTEL_SERVICE_NAME, "edge")])));
        assert!(env_names_service(lookup(&[(OTEL_RESOURCE_ATTRIBUTES, "a=b, service.name = edge")])));
        assert!(!env_names_service(lookup(&[(
            OTEL_RESOURCE_ATTRIBUTES,
            "service.namespace=x,a=service.name"
        )])));
    }

    #[test]
    fn malformed_milliseconds_are_named() {
        assert_eq!(env_millis(lookup(&[]), OTEL_EXPORTER_OTLP_TIMEOUT), Ok(None));
        assert_eq!(
            env_millis(lookup(&[(OTEL_EXPORTER_OTLP_TIMEOUT, "250")]), OTEL_EXPORTER_OTLP_TIMEOUT),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(
            env_millis(lookup(&[(OTEL_EXPORTER_OTLP_TIMEOUT, "1s")]), OTEL_EXPORTER_OTLP_TIMEOUT)
                .unwrap_err()
                .to_string(),
            "OTEL_EXPORTER_OTLP_TIMEOUT=\"1s\": expected a positive number of milliseconds"
        );
    }

    #[test]
    fn only_grpc_is_spoken() {
        let vars = [(OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf")];
        assert_eq!(
            non_grpc_protocol(lookup(&vars), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            Some((OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf".to_string()))
        );
        let vars = [(OTEL_EXPORTER_OTLP_PROTOCOL, "grpc")];
        assert_eq!(non_grpc_protocol(lookup(&vars), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), None);
    }
}
