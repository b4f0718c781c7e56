//! Hardware health in `vigil up` and `vigil collector`: the monitor (`vigil-hardware`) over the kernel log,
//! sysfs and the collector's hardware-error tracepoints, its `GET /api/v1/hardware`, and `vigil ctl
//! hardware`'s table.

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use vigil_collector::Collector;
use vigil_collector::hwtrace::HwTracepoints;
use vigil_core::config::HardwareConfig;
use vigil_hardware::{Hardware, HardwareHandle, Kind, Severity, TracepointCount, TracepointSource};

/// The collector's tracepoint counts as the monitor reads them. The kernel logs most of the same failures
/// (a failed block request is both an `I/O error, dev ...` record and a `block:block_rq_error` event), so
/// each tracepoint's counts are their own kind, named after the event (`block_rq_error`, `mc_event`,
/// `aer_event`, `mce_record`, `memory_failure_event`), with the collector's severity: the kernel log's
/// kinds (`io_error`, `memory_ce`, ...) count each failure once, and the tracepoint kinds also show what
/// the kernel's print rate limit left out of the log.
struct Tracepoints(Arc<HwTracepoints>);

impl TracepointSource for Tracepoints {
    fn report(&self) -> Vec<(String, bool, String)> {
        self.0.report()
    }

    fn read(&self) -> Vec<TracepointCount> {
        self.0
            .read()
            .into_iter()
            .filter_map(|c| {
                // An event name is a kind's word already, and the collector names severities with the
                // monitor's words; anything else is a bug there, dropped with a trace rather than miscounted.
                let event = c.tracepoint.rsplit(':').next().unwrap_or(c.tracepoint);
                let kind = Kind::new(event).ok();
                let severity = Severity::from_name(&c.severity);
                if kind.is_none() || severity.is_none() {
                    tracing::debug!(tracepoint = c.tracepoint, severity = %c.severity, "tracepoint count not understood");
                }
                Some(TracepointCount {
                    tracepoint: c.tracepoint.to_string(),
                    device: c.device,
                    kind: kind?,
                    severity: severity?,
                    total: c.total,
                })
            })
            .collect()
    }
}

/// Starts the monitor as `config` says (none when `hardware.enabled` is false), its state in `data_dir`.
/// A source the host lacks is reported and skipped; a mistake in the configured pattern files stops here.
pub fn start(
    config: &HardwareConfig,
    data_dir: &Path,
    collector: &Collector,
) -> anyhow::Result<Option<Hardware>> {
    if !config.enabled {
        tracing::info!("hardware health is off (hardware.enabled: false)");
        return Ok(None);
    }
    let tracepoints =
        collector.hardware_tracepoints().map(|t| Arc::new(Tracepoints(t)) as Arc<dyn TracepointSource>);
    let hardware = Hardware::start_with(config, data_dir, tracepoints)
        .map_err(|e| anyhow::anyhow!("starting the hardware monitor: {e}"))?;
    for s in hardware.report().sources {
        if s.available {
            tracing::info!(source = %s.name, detail = %s.detail, "hardware source in use");
        } else {
            tracing::info!(source = %s.name, reason = %s.detail, "hardware source not used");
        }
    }
    Ok(Some(hardware))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceQuery {
    device: Option<String>,
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

async fn report(
    State(h): State<HardwareHandle>,
    q: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "the only parameter is `device`".into());
    };
    // The report reads the monitor's state under its lock: short, but not on the async workers.
    let r = match tokio::task::spawn_blocking(move || h.report()).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    match r.to_json(q.device.as_deref()) {
        Ok(body) => Json(body).into_response(),
        Err(message) => error(StatusCode::NOT_FOUND, "not_found", message),
    }
}

/// `GET /api/v1/hardware[?device=NAME]`, behind the listener's bearer token.
pub fn router(hardware: HardwareHandle, token: Option<&str>) -> axum::Router {
    let router =
        axum::Router::new().route("/api/v1/hardware", axum::routing::get(report)).with_state(hardware);
    vigil_auth::require_bearer(router, token)
}

/// `vigil ctl hardware`: the devices with their health, then the sources.
pub fn print(answer: &Value) {
    let devices = answer["devices"].as_array().cloned().unwrap_or_default();
    if devices.is_empty() {
        println!("no hardware errors seen: every device is healthy as far as Vigil knows");
    } else {
        println!("{:<16} {:<9} {:<14} {:<28} REASON", "DEVICE", "STATE", "SINCE", "ERRORS");
        for d in &devices {
            let errors: Vec<String> =
                d["errors"].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
            let since = crate::workflows_ctl::when(&d["since_unix_ms"]);
            println!(
                "{:<16} {:<9} {:<14} {:<28} {}",
                d["device"].as_str().unwrap_or("?"),
                d["state"].as_str().unwrap_or("?"),
                since,
                errors.join(" "),
                d["reason"].as_str().unwrap_or("")
            );
        }
    }
    println!();
    println!("{:<32} {:<6} DETAIL", "SOURCE", "IN USE");
    for s in answer["sources"].as_array().into_iter().flatten() {
        println!(
            "{:<32} {:<6} {}",
            s["name"].as_str().unwrap_or("?"),
            if s["available"] == true { "yes" } else { "no" },
            s["detail"].as_str().unwrap_or("")
        );
    }
}
