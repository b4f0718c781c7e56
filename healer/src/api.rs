//! The remediation API's operations, each written once (DESIGN.md §4): instances with their state and
//! metrics, manual actions, the decision log (read, and watched as it grows), the rules in force, dry-run
//! mode and the managed services' scale. [`Api`] holds them; the REST routes below and the gRPC service
//! (`crate::grpc`) are thin wrappers that turn their transport's request into one call of it and its
//! answer (or [`ApiError`]) back into their own shape, so the two APIs cannot drift apart.
//!
//! REST: JSON in and out under `/api/v1/`; errors are `{"error": {"code", "message"}}` with a fitting
//! status. A bearer token, when configured, is required on every request (the config refuses a
//! non-loopback bind without one) and compared in constant time ([`vigil_auth`]).
//!
//! Instances Vigil did not start (discovered cgroups) are `observed`: Vigil sees them and reports their
//! processes as the kernel lists them at request time, but it runs none of their lifecycle.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use vigil_auth as auth;
use vigil_cgroup::fs::{self as cgroupfs, Layout};
use vigil_core::snapshot::InstanceSnapshot;

use crate::SnapshotReceiver;

use crate::actions::Recorded;
use crate::alerts::AlertStore;
use crate::audit::AuditLog;
use crate::engine::BoxFuture;
use crate::rules::{Action, InstanceState};
pub use alerts_http::Filter as AlertFilter;

pub mod workflows_http;

/// A Vigil-managed instance as its owner (the supervisor) sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedInstance {
    pub id: String,
    pub service: String,
    pub state: InstanceState,
    pub pids: Vec<u32>,
    /// v2 cgroup path, as the collector names it.
    pub cgroup: String,
    pub port: u16,
    pub restarts: u32,
    /// The last thing that went wrong with it, kept after it recovered.
    pub last_failure: Option<String>,
    /// Its data directory (one of its service's `data_dirs`), if it has one.
    pub data_dir: Option<String>,
}

/// Where the API learns about managed instances and sends manual actions.
pub trait Control: Send + Sync {
    /// Reads the instances' cgroups: call it off the async workers.
    fn managed(&self) -> Vec<ManagedInstance>;
    /// Submits the action (safety gate, executor, audit) and waits at most `wait` for its outcome: 200
    /// with the finished result, or 202 with the action's id while it runs.
    fn act<'a>(
        &'a self,
        action: Action,
        instance_id: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<(StatusCode, Value), ApiError>>;
    /// A submitted action by its id: running, or finished with its decision.
    fn action(&self, id: u64) -> Option<Value>;
    /// The rules in force and the status of each rule file.
    fn rules(&self) -> Value;
    /// Turns dry-run mode on or off; returns the mode now in force.
    fn set_dry_run(&self, on: bool) -> Result<bool, ApiError>;
    /// Every managed service with its instance counts by tier (and, for scaled ones, the autoscaler's
    /// view). Reads nothing from the kernel.
    fn services(&self) -> Vec<Value>;
    /// Pins a scaled service at `count` instances, or (`None`) gives it back to the autoscaler.
    fn scale<'a>(&'a self, service: &'a str, count: Option<u32>) -> BoxFuture<'a, Result<Value, ApiError>>;
    /// Every decision as the audit log records it, from now on (see [`crate::actions::Actions::subscribe`]).
    fn subscribe(&self) -> broadcast::Receiver<Recorded>;
}

/// `POST /api/v1/services/{name}/scale`'s body: `{"instances": N}` pins, `{"scale": "auto"}` lifts the
/// pin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    instances: Option<u32>,
    scale: Option<String>,
}

fn parse_scale_body(body: &[u8]) -> Result<Option<u32>, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let usage = "give {\"instances\": N} to pin a count, or {\"scale\": \"auto\"} to lift the pin";
    let parsed: ScaleBody = serde_json::from_slice(body).map_err(|e| bad(format!("{e}; {usage}")))?;
    match (parsed.instances, parsed.scale.as_deref()) {
        (Some(n), None) => Ok(Some(n)),
        (None, Some("auto")) => Ok(None),
        (None, Some(other)) => Err(bad(format!("`scale` must be \"auto\", got {other:?}; {usage}"))),
        _ => Err(bad(usage.to_string())),
    }
}

/// An API error: HTTP status, a stable code and a sentence. gRPC maps the code to its own status codes
/// (`crate::grpc::code_of`).
#[derive(Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }

    fn audit(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

/// The API's operations over the healer ([`Control`]), the collector's latest snapshot and the audit log.
/// Shared by the REST routes and the gRPC service.
pub struct Api {
    control: Arc<dyn Control>,
    snapshots: SnapshotReceiver,
    audit: Arc<AuditLog>,
    token: Option<String>,
    /// Where the v2 hierarchy is mounted, to list a discovered instance's processes; `None` when it could
    /// not be found, and then they list none.
    layout: Option<Layout>,
    /// Incoming alerts (`POST /api/v1/alerts`).
    alerts: Arc<AlertStore>,
    /// `alerts.secret`: when set, incoming alerts must be signed (Standard Webhooks).
    alert_secret: Option<vigil_core::config::Secrets>,
    /// The remediation workflows' runtime (`/api/v1/workflows`).
    workflows: Option<crate::workflow::runner::Runner>,
    /// The hardware monitor, for gRPC's `GetHardware` (REST's `/api/v1/hardware` is served beside it).
    hardware: Option<vigil_hardware::HardwareHandle>,
}

/// The state of an instance Vigil did not start: it is seen, not run, so none of the managed lifecycle
/// states (`active`, `hibernated`, ...) would be true of it.
pub const OBSERVED: &str = "observed";

fn serde_state(state: InstanceState) -> &'static str {
    state.as_str()
}

/// The JSON of one instance: identity, state, processes, and the latest metrics. For a discovered instance
/// this reads its `cgroup.procs`, so it blocks (briefly) on the file system.
fn instance_json(
    snap: Option<&InstanceSnapshot>,
    managed: Option<&ManagedInstance>,
    layout: Option<&Layout>,
) -> Value {
    let metrics = snap.map(|s| {
        json!({
            "cpu_cores": s.rates.cpu_cores,
            "minor_faults_per_s": s.rates.minor_faults,
            "major_faults_per_s": s.rates.major_faults,
            "swap_in_pages_per_s": s.rates.swap_in_pages,
            "swap_out_pages_per_s": s.rates.swap_out_pages,
            "runqueue_delay_mean_seconds": s.rates.runq_delay_mean_seconds,
            "memory_resident_bytes": s.memory.resident_bytes,
            "memory_swap_bytes": s.memory.swap_bytes,
        })
    });
    match (managed, snap) {
        (Some(m), _) => json!({
            "id": m.id, "service": m.service, "state": serde_state(m.state), "managed": true,
            "pids": m.pids, "cgroup": m.cgroup, "port": m.port, "restarts": m.restarts,
            "last_failure": m.last_failure, "data_dir": m.data_dir, "metrics": metrics,
        }),
        (None, Some(s)) => {
            // Read now rather than at the last tick: the snapshot does not carry pids, and a cgroup gone
            // since then simply lists none.
            let pids = layout.map(|l| cgroupfs::procs(&l.v2_dir(&s.cgroup))).unwrap_or_default();
            json!({
                "id": &*s.instance_id, "service": &*s.service, "state": OBSERVED, "managed": false,
                "pids": pids, "cgroup": &*s.cgroup, "kind": s.kind.as_str(), "metrics": metrics,
            })
        }
        (None, None) => Value::Null,
    }
}

/// How long an action request waits for the outcome by default before answering that it runs.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The longest `wait` a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(120);

/// An action request's `wait` (REST `?wait=`, gRPC `ActionRequest.wait`): a duration like `10s`, at most
/// [`MAX_WAIT`]; none waits [`DEFAULT_WAIT`].
pub fn parse_wait(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text else { return Ok(DEFAULT_WAIT) };
    let d = vigil_core::values::parse_duration(text)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("`wait`: {e}")))?;
    if d > MAX_WAIT {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("`wait` may be at most {}s", MAX_WAIT.as_secs()),
        ));
    }
    Ok(d)
}

/// Decisions read from the audit log at a time while a watcher catches up.
const WATCH_BATCH: usize = 256;
/// Decisions a watcher holds for its client before it stops reading (it resumes from the audit log).
const WATCH_BUFFER: usize = 64;
/// `decisions(limit)` when no limit is given, and the largest limit.
const DEFAULT_DECISIONS: usize = 100;
const MAX_DECISIONS: usize = 10_000;

impl Api {
    /// The operations on this host's cgroup layout.
    pub fn new(
        control: Arc<dyn Control>,
        snapshots: SnapshotReceiver,
        audit: Arc<AuditLog>,
        token: Option<String>,
    ) -> Arc<Api> {
        let layout = match Layout::detect() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "discovered instances will list no pids");
                None
            }
        };
        Self::with_layout(control, snapshots, audit, token, layout)
    }

    /// The operations, reading discovered instances' processes under `layout`'s v2 root.
    pub fn with_layout(
        control: Arc<dyn Control>,
        snapshots: SnapshotReceiver,
        audit: Arc<AuditLog>,
        token: Option<String>,
        layout: Option<Layout>,
    ) -> Arc<Api> {
        // An empty token is no token, as in the config's check and on the other routes of the listener.
        let token = token.filter(|t| !t.is_empty());
        Arc::new(Api {
            control,
            snapshots,
            audit,
            token,
            layout,
            alerts: Arc::new(AlertStore::in_memory()),
            alert_secret: None,
            workflows: None,
            hardware: None,
        })
    }

    /// The same operations over the healer's alert store (by default an empty one kept in memory). Call it
    /// on the `Api` just made, before it is shared.
    /// With `secret`, a payload must carry a Standard Webhooks signature by one of its keys.
    /// The hardware monitor's reports. Call it on the `Api` just made, before it is shared.
    pub fn with_hardware(self: Arc<Api>, hardware: Option<vigil_hardware::HardwareHandle>) -> Arc<Api> {
        let mut api = Arc::into_inner(self).expect("with_hardware is called before the Api is shared");
        api.hardware = hardware;
        Arc::new(api)
    }

    /// The hardware report as `GET /api/v1/hardware[?device=]` answers it.
    pub async fn hardware(&self, device: Option<String>) -> Result<Value, ApiError> {
        let Some(h) = self.hardware.clone() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no hardware monitor runs here (config hardware.enabled)",
            ));
        };
        // The report reads the monitor's state under its lock: short, but not on the async workers.
        let report = tokio::task::spawn_blocking(move || h.report()).await.map_err(ApiError::internal)?;
        report.to_json(device.as_deref()).map_err(|m| ApiError::new(StatusCode::NOT_FOUND, "not_found", m))
    }

    pub fn with_alerts(
        self: Arc<Api>,
        alerts: Arc<AlertStore>,
        secret: Option<vigil_core::config::Secrets>,
    ) -> Arc<Api> {
        let mut api = Arc::into_inner(self).expect("with_alerts is called before the Api is shared");
        api.alerts = alerts;
        api.alert_secret = secret;
        Arc::new(api)
    }

    /// The incoming alerts firing now, oldest first; a filter keeps those whose `instance_id` / `service`
    /// label has that value.
    pub fn alerts(&self, filter: &AlertFilter) -> Vec<Value> {
        alerts_http::list(&self.alerts, filter)
    }

    /// Takes an Alertmanager webhook body (version 4): what it did, or a 400 naming the field (401 when
    /// `alerts.secret` is set and the signature does not verify).
    pub async fn ingest_alerts(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
        if let Some(secret) = &self.alert_secret {
            let now = vigil_core::time::now_unix_ms() / 1000;
            crate::notify::verify_webhook(secret, headers, body, now).map_err(|why| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "bad_signature",
                    format!("alerts.secret is set: {why}"),
                )
            })?;
        }
        alerts_http::ingest(self.alerts.clone(), body).await
    }

    /// The one token rule of both APIs: with a token configured, the request's `authorization` header (an
    /// HTTP header, or gRPC metadata) must be `Bearer <token>`.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else { return Ok(()) };
        if auth::bearer_matches(headers, token) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required"))
        }
    }

    /// Every instance, or only the one with id `only`: managed ones first, then the discovered ones.
    /// Blocking (see [`instance_json`]); the filter comes before any file is read.
    fn instances_now(&self, only: Option<&str>) -> Vec<Value> {
        let snap = self.snapshots.borrow().clone();
        let managed = self.control.managed();
        let layout = self.layout.as_ref();
        let mut out: Vec<Value> = managed
            .iter()
            .filter(|m| only.is_none_or(|id| m.id == id))
            .map(|m| instance_json(snap.instances.iter().find(|s| *s.cgroup == m.cgroup), Some(m), layout))
            .collect();
        out.extend(
            snap.instances
                .iter()
                .filter(|s| !managed.iter().any(|m| m.cgroup == *s.cgroup))
                .filter(|s| only.is_none_or(|id| *s.instance_id == *id))
                .map(|s| instance_json(Some(s), None, layout)),
        );
        out
    }

    /// [`Api::instances_now`] off the async runtime's workers.
    async fn instances_blocking(self: &Arc<Self>, only: Option<String>) -> Result<Vec<Value>, ApiError> {
        let api = self.clone();
        tokio::task::spawn_blocking(move || api.instances_now(only.as_deref()))
            .await
            .map_err(ApiError::internal)
    }

    /// Every instance: managed ones first, then the discovered ones.
    pub async fn instances(self: &Arc<Self>) -> Result<Vec<Value>, ApiError> {
        self.instances_blocking(None).await
    }

    /// One instance by id.
    pub async fn instance(self: &Arc<Self>, id: &str) -> Result<Value, ApiError> {
        self.instances_blocking(Some(id.to_string()))
            .await?
            .into_iter()
            .find(|i| i["id"] == id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no instance `{id}`")))
    }

    /// A manual action on a managed instance, waiting at most `wait` (see [`parse_wait`]) for its outcome:
    /// 200 with the finished answer, 202 with the action's id while it runs, or the error its outcome
    /// fits (refused, failed).
    pub async fn act(
        &self,
        action: Action,
        instance_id: &str,
        wait: Option<&str>,
    ) -> Result<(StatusCode, Value), ApiError> {
        let wait = parse_wait(wait)?;
        self.control.act(action, instance_id, wait).await
    }

    /// A submitted action by its id: running, or finished with its decision.
    pub async fn action(&self, id: u64) -> Result<Value, ApiError> {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || control.action(id))
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no action `{id}`")))
    }

    /// The newest `limit` decisions (default 100, at most 10 000), newest first, each with its `seq`.
    pub async fn decisions(&self, limit: Option<usize>) -> Result<Vec<Value>, ApiError> {
        let limit = limit.unwrap_or(DEFAULT_DECISIONS).min(MAX_DECISIONS);
        let audit = self.audit.clone();
        let rows = tokio::task::spawn_blocking(move || audit.recent(limit))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::audit)?;
        Ok(rows.into_iter().map(|(seq, v)| with_seq(seq, v)).collect())
    }

    /// The rules in force, the status of each rule file and dry-run mode.
    pub fn rules(&self) -> Value {
        self.control.rules()
    }

    /// Turns dry-run mode on or off; returns the mode now in force.
    pub fn set_dry_run(&self, on: bool) -> Result<bool, ApiError> {
        self.control.set_dry_run(on)
    }

    /// Every managed service.
    pub fn services(&self) -> Vec<Value> {
        self.control.services()
    }

    /// One managed service by name.
    pub fn service(&self, name: &str) -> Result<Value, ApiError> {
        self.control.services().into_iter().find(|s| s["name"] == name).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no managed service `{name}`"))
        })
    }

    /// Pins a scaled service at `count` instances, or (`None`) gives it back to the autoscaler.
    pub async fn scale(&self, name: &str, count: Option<u32>) -> Result<Value, ApiError> {
        self.control.scale(name, count).await
    }

    /// Every decision as it is recorded, in `seq` order, each once and none skipped: with `since`, first
    /// those the audit log holds after it, then the live ones; without, only those recorded from now on.
    /// The feed ends when `stop` turns true (or its sender is gone), when the receiver is dropped, or after
    /// an error it sends.
    ///
    /// The live feed is a broadcast: a watcher subscribes before it reads the log, so nothing recorded
    /// after the read is missed, and it sends a live decision only when it is the next `seq`. Anything else
    /// (a decision recorded out of broadcast order, one written by another writer of the log, or a
    /// broadcast the watcher fell behind on while its client read slowly) is read from the audit log,
    /// which holds every `seq`: a slow client is refilled, never cut off.
    pub async fn watch_decisions(
        self: &Arc<Self>,
        since: Option<u64>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<Result<Value, ApiError>>, ApiError> {
        // Subscribed before the log is read: whatever is recorded after the read is broadcast to us.
        let mut live = self.control.subscribe();
        let audit = self.audit.clone();
        let mut next = match since {
            Some(seq) => seq,
            None => {
                let audit = audit.clone();
                tokio::task::spawn_blocking(move || audit.last_seq())
                    .await
                    .map_err(ApiError::internal)?
                    .map_err(ApiError::audit)?
            }
        }
        .saturating_add(1);
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let feed = async move {
            if since.is_some() && !catch_up(&audit, &tx, &mut next).await {
                return;
            }
            loop {
                let received = tokio::select! {
                    r = live.recv() => r,
                    _ = tx.closed() => return,
                };
                let sent = match received {
                    Ok(r) if r.seq == next => {
                        next += 1;
                        tx.send(Ok(with_seq(r.seq, (*r.record).clone()))).await.is_ok()
                    }
                    Ok(r) if r.seq < next => true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        catch_up(&audit, &tx, &mut next).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !sent {
                    return;
                }
            }
        };
        // Also while a send waits for a slow client: a server shutting down does not wait for it.
        tokio::spawn(async move {
            tokio::select! {
                _ = feed => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
        Ok(rx)
    }
}

/// A decision from the audit log with its place in it.
fn with_seq(seq: u64, mut v: Value) -> Value {
    if let Value::Object(map) = &mut v {
        map.insert("seq".into(), json!(seq));
    }
    v
}

/// Sends every decision the audit log holds from `next` on, and moves `next` past them. False when the
/// watch is over (the receiver is gone, or reading failed and the error was sent).
async fn catch_up(audit: &Arc<AuditLog>, tx: &mpsc::Sender<Result<Value, ApiError>>, next: &mut u64) -> bool {
    loop {
        let (audit, from) = (audit.clone(), *next);
        let batch = match tokio::task::spawn_blocking(move || audit.from_seq(from, WATCH_BATCH)).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                let _ = tx.send(Err(ApiError::audit(e))).await;
                return false;
            }
            Err(e) => {
                let _ = tx.send(Err(ApiError::internal(e))).await;
                return false;
            }
        };
        let full = batch.len() == WATCH_BATCH;
        for (seq, v) in batch {
            *next = seq.saturating_add(1);
            if tx.send(Ok(with_seq(seq, v))).await.is_err() {
                return false;
            }
        }
        if !full {
            return true;
        }
    }
}

// --- REST: each route parses its request, calls one operation and shapes the answer. ------------------

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

#[derive(Deserialize)]
struct Wait {
    wait: Option<String>,
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(json!({ "instances": api.instances().await? })))
}

async fn get_one(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    api.instance(&id).await.map(Json)
}

/// `POST /api/v1/instances/{id}/{action}`: hibernate, wake, restart, stop, start.
async fn act(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<Wait>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    api.authorize(&headers)?;
    let action = Action::from_name(&action)
        .filter(|a| !matches!(a, Action::Notify | Action::Workflow))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no action `{action}`; instances take hibernate, wake, restart, stop, start"),
            )
        })?;
    let (status, body) = api.act(action, &id, q.wait.as_deref()).await?;
    Ok((status, Json(body)))
}

async fn action_status(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no action `{id}`")))?;
    api.action(n).await.map(Json)
}

async fn decisions(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(json!({ "decisions": api.decisions(q.limit).await? })))
}

async fn rules(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(api.rules()))
}

async fn dry_run(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let enabled = match q.get("enabled").map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("`enabled` must be true or false, got {other:?}"),
            ));
        }
    };
    Ok(Json(json!({ "dry_run": api.set_dry_run(enabled)? })))
}

async fn services(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(Value::Array(api.services())))
}

async fn service(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    api.service(&name).map(Json)
}

async fn scale(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let count = parse_scale_body(&body)?;
    Ok(Json(api.scale(&name, count).await?))
}

async fn list_alerts(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    filter: Result<Query<AlertFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let Query(filter) =
        filter.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    Ok(Json(json!({ "alerts": api.alerts(&filter) })))
}

async fn post_alerts(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(api.ingest_alerts(&headers, &body).await?))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /api/v1/instances")
}

/// The `/api/v1/` routes over `api`.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/v1/instances", get(list))
        .route("/api/v1/instances/{id}", get(get_one))
        .route("/api/v1/instances/{id}/{action}", post(act))
        .route("/api/v1/actions/{id}", get(action_status))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/services/{name}/scale", post(scale))
        .route("/api/v1/decisions", get(decisions))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/dry-run", post(dry_run))
        .route("/api/v1/alerts", get(list_alerts).post(post_alerts))
        .route("/api/v1/workflows", get(workflows_http::list))
        .route("/api/v1/workflows/{name}/run", post(workflows_http::run))
        .route("/api/v1/workflows/runs/{id}", get(workflows_http::get_run))
        .route("/api/v1/workflows/runs/{id}/{action}", post(workflows_http::decide))
        .route("/api/v1/workflows/cordons/{resource}/uncordon", post(workflows_http::uncordon))
        .route("/api/v1/{*rest}", get(not_found).post(not_found))
        .with_state(api)
}

/// What `POST /api/v1/alerts` (Alertmanager's webhook) and `GET /api/v1/alerts` do, for `crate::api`'s
/// REST routes and gRPC service alike.
pub mod alerts_http {
    use std::sync::Arc;

    use axum::http::StatusCode;
    use serde::Deserialize;
    use serde_json::{Value, json};

    use super::ApiError;
    use crate::alerts::{AlertStore, AlertStoreError, parse_payload};

    /// Which alerts to list: those about this instance, or this service.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Filter {
        pub instance_id: Option<String>,
        pub service: Option<String>,
    }

    /// The firing alerts as the API shows them, oldest first; a filter keeps those whose `instance_id` /
    /// `service` label has that value. One implementation for REST and gRPC.
    pub fn list(store: &AlertStore, filter: &Filter) -> Vec<Value> {
        let label_is = |a: &crate::alerts::StoredAlert, name: &str, want: &Option<String>| {
            want.as_ref().is_none_or(|w| a.labels.get(name) == Some(w))
        };
        store
            .list()
            .into_iter()
            .filter(|a| {
                label_is(a, "instance_id", &filter.instance_id) && label_is(a, "service", &filter.service)
            })
            .map(|a| a.to_json())
            .collect()
    }

    /// Checks and applies one webhook body: the report, or the error with the field path.
    pub async fn ingest(store: Arc<AlertStore>, body: &[u8]) -> Result<Value, ApiError> {
        let incoming = parse_payload(body, vigil_core::time::now_unix_ms() as i64)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
        let applied = tokio::task::spawn_blocking(move || store.ingest(incoming))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        match applied {
            Ok(report) => Ok(json!(report)),
            Err(e @ AlertStoreError::Full { .. }) => {
                Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "alert_store_full", e.to_string()))
            }
            Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "alert_store", e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Fake {
        acted: Mutex<Vec<(Action, String)>>,
        recorded: broadcast::Sender<Recorded>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake { acted: Mutex::new(Vec::new()), recorded: broadcast::channel(4).0 }
        }
    }

    impl Control for Fake {
        fn managed(&self) -> Vec<ManagedInstance> {
            vec![ManagedInstance {
                id: "echo-0".into(),
                service: "echo".into(),
                state: InstanceState::Hibernated,
                pids: vec![42],
                cgroup: "/vigil/echo/echo-0".into(),
                port: 18080,
                restarts: 0,
                last_failure: None,
                data_dir: None,
            }]
        }
        fn act<'a>(
            &'a self,
            action: Action,
            id: &'a str,
            wait: Duration,
        ) -> BoxFuture<'a, Result<(StatusCode, Value), ApiError>> {
            Box::pin(async move {
                if id != "echo-0" {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no managed instance `{id}`"),
                    ));
                }
                self.acted.lock().unwrap().push((action, id.to_string()));
                if wait.is_zero() {
                    return Ok((StatusCode::ACCEPTED, json!({"action_id": 7, "status": "running"})));
                }
                Ok((StatusCode::OK, json!({"id": id, "outcome": "succeeded"})))
            })
        }
        fn action(&self, id: u64) -> Option<Value> {
            (id == 7).then(|| json!({"action_id": 7, "status": "finished"}))
        }
        fn rules(&self) -> Value {
            json!({"files": []})
        }
        fn set_dry_run(&self, on: bool) -> Result<bool, ApiError> {
            Ok(on)
        }
        fn services(&self) -> Vec<Value> {
            vec![
                json!({"name": "echo", "desired": 1}),
                json!({"name": "api", "desired": 3, "mode": "stable"}),
            ]
        }
        fn subscribe(&self) -> broadcast::Receiver<Recorded> {
            self.recorded.subscribe()
        }
        fn scale<'a>(
            &'a self,
            service: &'a str,
            count: Option<u32>,
        ) -> BoxFuture<'a, Result<Value, ApiError>> {
            Box::pin(async move {
                if service != "api" {
                    return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "not scaled"));
                }
                Ok(json!({"name": service, "pinned": count}))
            })
        }
    }

    #[tokio::test]
    async fn services_and_pinning_a_count() {
        let (addr, _fake, dir) = serve_on(None, vigil_collector::Snapshot::empty(), None, "services").await;
        let (code, body) = request(addr, "GET /api/v1/services HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body[1]["name"].as_str()), (200, Some("api")));
        let (code, body) = request(addr, "GET /api/v1/services/api HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["desired"].as_u64()), (200, Some(3)));
        let (code, _) = request(addr, "GET /api/v1/services/nope HTTP/1.0\r\n\r\n").await;
        assert_eq!(code, 404);
        let post = |body: &str| {
            format!(
                "POST /api/v1/services/api/scale HTTP/1.0\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let (code, body) = request(addr, &post(r#"{"instances": 2}"#)).await;
        assert_eq!((code, body["pinned"].as_u64()), (200, Some(2)));
        let (code, body) = request(addr, &post(r#"{"scale": "auto"}"#)).await;
        assert_eq!((code, body["pinned"].is_null()), (200, true));
        for bad in [
            r#"{"scale": "manual"}"#,
            r#"{"instances": -1}"#,
            r#"{}"#,
            "nonsense",
            r#"{"instances": 1, "scale": "auto"}"#,
        ] {
            let (code, body) = request(addr, &post(bad)).await;
            assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")), "{bad}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn request(addr: std::net::SocketAddr, raw: &str) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status: u16 = buf[9..12].parse().unwrap();
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    async fn serve(token: Option<String>) -> (std::net::SocketAddr, Arc<Fake>, std::path::PathBuf) {
        serve_on(token, vigil_core::snapshot::Snapshot::empty(), None, "").await
    }

    async fn serve_on(
        token: Option<String>,
        snapshot: vigil_core::snapshot::Snapshot,
        layout: Option<Layout>,
        name: &str,
    ) -> (std::net::SocketAddr, Arc<Fake>, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("vigil-api-{}-{}{name}", std::process::id(), token.is_some()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = Arc::new(AuditLog::open(&dir).unwrap());
        audit.append(&json!({"rule": "idle", "action": "hibernate", "instance_id": "echo-0"})).unwrap();
        let fake = Arc::new(Fake::new());
        // The receiver keeps the last value after the sender is gone.
        let (_, rx) = tokio::sync::watch::channel(Arc::new(snapshot));
        let app = router(Api::with_layout(fake.clone(), rx, audit, token, layout));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, fake, dir)
    }

    #[tokio::test]
    async fn instances_actions_decisions_and_errors() {
        let (addr, fake, dir) = serve(None).await;
        let (code, body) = request(addr, "GET /api/v1/instances HTTP/1.0\r\n\r\n").await;
        assert_eq!(code, 200);
        let i = &body["instances"][0];
        assert_eq!(
            (i["id"].as_str(), i["state"].as_str(), i["managed"].as_bool()),
            (Some("echo-0"), Some("hibernated"), Some(true))
        );
        assert_eq!(i["pids"], json!([42]));
        let (code, body) = request(addr, "GET /api/v1/instances/nope HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["error"]["code"].as_str()), (404, Some("not_found")));
        let (code, body) = request(addr, "POST /api/v1/instances/echo-0/wake HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["outcome"].as_str()), (200, Some("succeeded")));
        assert_eq!(*fake.acted.lock().unwrap(), vec![(Action::Wake, "echo-0".to_string())]);
        let (code, body) =
            request(addr, "POST /api/v1/instances/echo-0/restart?wait=0s HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["action_id"].as_u64()), (202, Some(7)));
        let (code, body) = request(addr, "GET /api/v1/actions/7 HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["status"].as_str()), (200, Some("finished")));
        let (code, body) = request(addr, "GET /api/v1/actions/8 HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["error"]["code"].as_str()), (404, Some("not_found")));
        let (code, body) = request(addr, "POST /api/v1/instances/echo-0/wake?wait=1h HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")));
        let (code, body) = request(addr, "POST /api/v1/instances/echo-0/wake?wait= HTTP/1.0\r\n\r\n").await;
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "an empty wait is no duration"
        );
        let (code, body) = request(addr, "GET /api/v1/decisions?limit=5 HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["decisions"][0]["seq"].as_u64()), (200, Some(1)));
        let (code, body) = request(addr, "POST /api/v1/dry-run?enabled=true HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["dry_run"].as_bool()), (200, Some(true)));
        let (code, body) = request(addr, "POST /api/v1/dry-run?enabled=maybe HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")));
        let (code, body) = request(addr, "GET /api/v1/nothing HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["error"]["code"].as_str()), (404, Some("not_found")));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn token_is_required_when_configured() {
        let (addr, _fake, dir) = serve(Some("s3cret".into())).await;
        let (code, body) = request(addr, "GET /api/v1/instances HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, body["error"]["code"].as_str()), (401, Some("unauthorized")));
        let (code, _) =
            request(addr, "GET /api/v1/instances HTTP/1.0\r\nAuthorization: Bearer s3cret\r\n\r\n").await;
        assert_eq!(code, 200);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A snapshot with the managed `echo-0` and two cgroups Vigil did not start.
    fn snapshot_with_discovered() -> vigil_core::snapshot::Snapshot {
        use vigil_core::snapshot::InstanceKind;
        let mut snap = vigil_core::snapshot::Snapshot::empty();
        snap.tick = 1;
        let instance = |id: &str, cgroup: &str, kind| InstanceSnapshot {
            service: "svc".into(),
            instance_id: id.into(),
            kind,
            cgroup: cgroup.into(),
            cgroup_id: None,
            memcg_id: None,
            counters: Default::default(),
            rates: Default::default(),
            memory: Default::default(),
            pressure: Default::default(),
        };
        snap.instances.push(instance("echo-0", "/vigil/echo/echo-0", InstanceKind::Managed));
        snap.instances.push(instance("cg:/system.slice/x", "/system.slice/x", InstanceKind::SystemdUnit));
        snap.instances.push(instance("cg:/gone", "/gone", InstanceKind::SystemdUnit));
        snap
    }

    #[tokio::test]
    async fn discovered_instances_are_observed_with_their_current_pids() {
        // A directory laid out like a v2 mount: `/system.slice/x` lists two processes, `/gone` vanished
        // after the snapshot was taken.
        let root = std::env::temp_dir().join(format!("vigil-api-v2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("system.slice/x")).unwrap();
        std::fs::write(root.join("system.slice/x/cgroup.procs"), "4242\n4243\n").unwrap();
        let layout = Layout { v2_root: root.clone(), v1: None };
        let (addr, _fake, dir) = serve_on(None, snapshot_with_discovered(), Some(layout), "-observed").await;

        let (code, body) = request(addr, "GET /api/v1/instances HTTP/1.0\r\n\r\n").await;
        assert_eq!(code, 200);
        let all = body["instances"].as_array().unwrap();
        assert_eq!(all.len(), 3, "{body}");
        let managed = &all[0];
        assert_eq!((managed["id"].as_str(), managed["state"].as_str()), (Some("echo-0"), Some("hibernated")));
        assert_eq!(managed["pids"], json!([42]), "a managed instance keeps its supervisor's pids");
        let x = all.iter().find(|i| i["id"] == "cg:/system.slice/x").unwrap();
        assert_eq!((x["state"].as_str(), x["managed"].as_bool()), (Some("observed"), Some(false)));
        assert_eq!(x["pids"], json!([4242, 4243]));
        let gone = all.iter().find(|i| i["id"] == "cg:/gone").unwrap();
        assert_eq!((gone["state"].as_str(), &gone["pids"]), (Some("observed"), &json!([])));

        // The pids are read at request time, not at the last tick.
        std::fs::write(root.join("system.slice/x/cgroup.procs"), "4243\n").unwrap();
        let (code, x) = request(addr, "GET /api/v1/instances/cg:%2Fsystem.slice%2Fx HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, x["state"].as_str()), (200, Some("observed")), "{x}");
        assert_eq!(x["pids"], json!([4243]));
        std::fs::remove_dir_all(root.join("system.slice")).unwrap();
        let (code, x) = request(addr, "GET /api/v1/instances/cg:%2Fsystem.slice%2Fx HTTP/1.0\r\n\r\n").await;
        assert_eq!((code, &x["pids"]), (200, &json!([])), "a vanished cgroup lists no pids: {x}");

        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn token_is_compared_whole() {
        let (addr, _fake, dir) =
            serve_on(Some("s3cret".into()), vigil_core::snapshot::Snapshot::empty(), None, "-whole").await;
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Bearer ", "Basic s3cret"] {
            let (code, body) =
                request(addr, &format!("GET /api/v1/rules HTTP/1.0\r\nAuthorization: {wrong}\r\n\r\n")).await;
            assert_eq!((code, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{wrong}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An [`Api`] over the fake, with an empty audit log in a fresh directory.
    fn bare_api(name: &str) -> (Arc<Api>, Arc<Fake>, Arc<AuditLog>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("vigil-api-watch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = Arc::new(AuditLog::open(&dir).unwrap());
        let fake = Arc::new(Fake::new());
        let (_, rx) = tokio::sync::watch::channel(Arc::new(vigil_core::snapshot::Snapshot::empty()));
        (Api::with_layout(fake.clone(), rx, audit.clone(), None, None), fake, audit, dir)
    }

    /// Appends a decision numbered `n` and, when `announce`, broadcasts it as `finish` does.
    fn record(audit: &AuditLog, fake: &Fake, n: u64, announce: bool) -> u64 {
        let v = json!({ "rule": "idle", "action": "hibernate", "instance_id": format!("echo-{n}") });
        let seq = audit.append(&v).unwrap();
        if announce {
            let _ = fake.recorded.send(Recorded { seq, record: Arc::new(v) });
        }
        seq
    }

    async fn next_seq(rx: &mut mpsc::Receiver<Result<Value, ApiError>>) -> u64 {
        let item = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a decision in time");
        item.expect("the feed is open").expect("no error")["seq"].as_u64().expect("a seq")
    }

    #[tokio::test]
    async fn watching_replays_then_follows_without_gaps_or_duplicates() {
        let (api, fake, audit, dir) = bare_api("replay");
        for n in 1..=3 {
            record(&audit, &fake, n, false);
        }
        let (stop_tx, stop) = watch::channel(false);
        let mut rx = api.watch_decisions(Some(1), stop).await.unwrap();
        assert_eq!((next_seq(&mut rx).await, next_seq(&mut rx).await), (2, 3), "the replay after seq 1");
        record(&audit, &fake, 4, true);
        assert_eq!(next_seq(&mut rx).await, 4, "a live decision");
        // A broadcast seen again (already sent) is skipped; one missing from the broadcast (another writer
        // of the log, or out of order) is read from the log before the next live one.
        let _ = fake.recorded.send(Recorded { seq: 4, record: Arc::new(json!({})) });
        record(&audit, &fake, 5, false);
        record(&audit, &fake, 6, true);
        assert_eq!((next_seq(&mut rx).await, next_seq(&mut rx).await), (5, 6));
        // More than the broadcast holds while the watcher does not run: it lags, and catches up from the
        // log.
        for n in 7..=20 {
            record(&audit, &fake, n, true);
        }
        for want in 7..=20 {
            assert_eq!(next_seq(&mut rx).await, want);
        }
        stop_tx.send_replace(true);
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("ends in time");
        assert!(end.is_none(), "the feed ends when the server stops");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn watching_without_since_sees_only_new_decisions() {
        let (api, fake, audit, dir) = bare_api("live");
        record(&audit, &fake, 1, false);
        let (stop_tx, stop) = watch::channel(false);
        let mut rx = api.watch_decisions(None, stop).await.unwrap();
        record(&audit, &fake, 2, true);
        assert_eq!(next_seq(&mut rx).await, 2);
        let mut all = api.watch_decisions(Some(0), stop_tx.subscribe()).await.unwrap();
        assert_eq!((next_seq(&mut all).await, next_seq(&mut all).await), (1, 2), "since 0: the whole log");
        let _ = std::fs::remove_dir_all(dir);
    }
}
