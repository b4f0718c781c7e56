//! REST API v1 (DESIGN.md §4): instances with their state and metrics, hibernate and wake by hand, the
//! decision log and the rules in force. JSON in and out; errors are `{"error": {"code", "message"}}` with a
//! fitting status. A bearer token, when configured, is required on every request (the config refuses a
//! non-loopback bind without one) and compared in constant time ([`vigil_collector::auth`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use vigil_collector::{InstanceSnapshot, SnapshotReceiver, auth};

use crate::audit::AuditLog;
use crate::rules::{Action, InstanceState};

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
}

/// Where the API learns about managed instances and sends manual actions.
pub trait Control: Send + Sync {
    fn managed(&self) -> Vec<ManagedInstance>;
    /// Runs the action through the safety gate and the executor, and audits it. Blocking.
    fn act(&self, action: Action, instance_id: &str) -> Result<Value, ApiError>;
    /// The rules in force and the status of each rule file.
    fn rules(&self) -> Value;
    /// Turns dry-run mode on or off; returns the mode now in force.
    fn set_dry_run(&self, on: bool) -> Result<bool, ApiError>;
}

/// An API error: HTTP status, a stable code and a sentence.
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

struct Api {
    control: Arc<dyn Control>,
    snapshots: SnapshotReceiver,
    audit: Arc<AuditLog>,
    token: Option<String>,
}

fn serde_state(state: InstanceState) -> &'static str {
    state.as_str()
}

/// The JSON of one instance: identity, state, processes, and the latest metrics.
fn instance_json(snap: Option<&InstanceSnapshot>, managed: Option<&ManagedInstance>) -> Value {
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
            "pids": m.pids, "cgroup": m.cgroup, "port": m.port, "restarts": m.restarts, "metrics": metrics,
        }),
        (None, Some(s)) => json!({
            "id": &*s.instance_id, "service": &*s.service, "state": "active", "managed": false,
            "pids": Vec::<u32>::new(), "cgroup": &*s.cgroup, "kind": s.kind.as_str(), "metrics": metrics,
        }),
        (None, None) => Value::Null,
    }
}

impl Api {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else { return Ok(()) };
        if auth::bearer_matches(headers, token) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required"))
        }
    }

    fn instances(&self) -> Vec<Value> {
        let snap = self.snapshots.borrow().clone();
        let managed = self.control.managed();
        let mut out: Vec<Value> = managed
            .iter()
            .map(|m| instance_json(snap.instances.iter().find(|s| *s.cgroup == m.cgroup), Some(m)))
            .collect();
        out.extend(
            snap.instances
                .iter()
                .filter(|s| !managed.iter().any(|m| m.cgroup == *s.cgroup))
                .map(|s| instance_json(Some(s), None)),
        );
        out
    }
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(json!({ "instances": api.instances() })))
}

async fn get_one(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    api.instances()
        .into_iter()
        .find(|i| i["id"] == id.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no instance `{id}`")))
}

async fn act(api: Arc<Api>, headers: HeaderMap, id: String, action: Action) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let control = api.control.clone();
    tokio::task::spawn_blocking(move || control.act(action, &id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map(Json)
}

async fn hibernate(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    act(api, headers, id, Action::Hibernate).await
}

async fn wake(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    act(api, headers, id, Action::Wake).await
}

async fn stop(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    act(api, headers, id, Action::Stop).await
}

async fn decisions(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let audit = api.audit.clone();
    let rows = tokio::task::spawn_blocking(move || audit.recent(limit))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string()))?;
    let decisions: Vec<Value> = rows
        .into_iter()
        .map(|(seq, mut v)| {
            v["seq"] = json!(seq);
            v
        })
        .collect();
    Ok(Json(json!({ "decisions": decisions })))
}

async fn rules(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    Ok(Json(api.control.rules()))
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
    Ok(Json(json!({ "dry_run": api.control.set_dry_run(enabled)? })))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /api/v1/instances")
}

/// The `/api/v1/` routes.
pub fn router(
    control: Arc<dyn Control>,
    snapshots: SnapshotReceiver,
    audit: Arc<AuditLog>,
    token: Option<String>,
) -> Router {
    let api = Arc::new(Api { control, snapshots, audit, token });
    Router::new()
        .route("/api/v1/instances", get(list))
        .route("/api/v1/instances/{id}", get(get_one))
        .route("/api/v1/instances/{id}/hibernate", post(hibernate))
        .route("/api/v1/instances/{id}/wake", post(wake))
        .route("/api/v1/instances/{id}/stop", post(stop))
        .route("/api/v1/decisions", get(decisions))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/dry-run", post(dry_run))
        .route("/api/v1/{*rest}", get(not_found).post(not_found))
        .with_state(api)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Fake {
        acted: Mutex<Vec<(Action, String)>>,
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
            }]
        }
        fn act(&self, action: Action, id: &str) -> Result<Value, ApiError> {
            if id != "echo-0" {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no managed instance `{id}`"),
                ));
            }
            self.acted.lock().unwrap().push((action, id.to_string()));
            Ok(json!({"id": id, "outcome": "succeeded"}))
        }
        fn rules(&self) -> Value {
            json!({"files": []})
        }
        fn set_dry_run(&self, on: bool) -> Result<bool, ApiError> {
            Ok(on)
        }
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
        let dir = std::env::temp_dir().join(format!("vigil-api-{}-{}", std::process::id(), token.is_some()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = Arc::new(AuditLog::open(&dir).unwrap());
        audit.append(&json!({"rule": "idle", "action": "hibernate", "instance_id": "echo-0"})).unwrap();
        let fake = Arc::new(Fake { acted: Mutex::new(Vec::new()) });
        // The receiver keeps the last value after the sender is gone.
        let (_, rx) = tokio::sync::watch::channel(Arc::new(vigil_collector::Snapshot::empty()));
        let app = router(fake.clone(), rx, audit, token);
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
}
