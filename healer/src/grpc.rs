//! The gRPC API (DESIGN.md §4): service `vigil.v1.Remediation` from `proto/vigil/v1/remediation.proto`,
//! served with tonic on `grpc.listen` beside the standard health service (`grpc.health.v1.Health`) and
//! server reflection (v1 and v1alpha). Every method is a thin wrapper over one operation of
//! [`crate::api::Api`], the same one the REST routes call: it turns the request into that call's
//! arguments, the JSON answer into the typed message, and an [`ApiError`] into a gRPC status
//! ([`code_of`]). The token rule is the REST one: with `http.token` set, every Remediation call needs the
//! metadata `authorization: Bearer <token>`; health and reflection stay open, as a load balancer's probe
//! and a tool's discovery carry no secret.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

use crate::api::{Api, ApiError};
use crate::rules::Action;

/// The code generated from the proto (`build.rs`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("vigil.v1");
}

use pb::remediation_server::{Remediation, RemediationServer};

/// The encoded descriptor set of `vigil.v1`, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/remediation_descriptor.bin"));

/// The metadata key that carries the REST error code (`not_found`, `in_progress`, ...) beside the status,
/// so a client can tell apart causes that share one gRPC code.
pub const ERROR_CODE_KEY: &str = "vigil-error-code";

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot listen on {addr} (grpc.listen): {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the gRPC listener has no local address: {0}")]
    LocalAddr(std::io::Error),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server on {addr} failed: {source}")]
    Serve { addr: SocketAddr, source: tonic::transport::Error },
}

/// The gRPC code for an API error: by its stable code first, then by its HTTP status for codes added
/// later.
///
/// `in_progress` is ABORTED rather than FAILED_PRECONDITION: the request was fine and the instance is in
/// a fit state, only another action holds it; retrying when that one ends succeeds, which is what ABORTED
/// tells a client (FAILED_PRECONDITION says not to retry until the system changes).
pub fn code_of(e: &ApiError) -> Code {
    match e.code {
        "not_found" => Code::NotFound,
        "bad_request" => Code::InvalidArgument,
        "unauthorized" => Code::Unauthenticated,
        "rate_limited" => Code::ResourceExhausted,
        "in_progress" => Code::Aborted,
        "standby_fraction" | "not_scaled" | "action_failed" => Code::FailedPrecondition,
        "internal" | "audit" => Code::Internal,
        _ => match e.status {
            StatusCode::BAD_REQUEST => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::CONFLICT => Code::FailedPrecondition,
            StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
            s if s.is_server_error() => Code::Internal,
            _ => Code::Unknown,
        },
    }
}

/// The status for an API error: its code ([`code_of`]), its message, and the REST code as metadata.
pub fn status_of(e: ApiError) -> Status {
    let code = code_of(&e);
    let mut metadata = MetadataMap::new();
    metadata.insert(ERROR_CODE_KEY, MetadataValue::from_static(e.code));
    Status::with_metadata(code, e.message, metadata)
}

// --- JSON answers (the REST bodies) to messages. A missing or null key is the field's default. --------

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

fn opt_text(v: &Value, key: &str) -> Option<String> {
    v[key].as_str().map(str::to_string)
}

fn uint(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn opt_u32(v: &Value, key: &str) -> Option<u32> {
    v[key].as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn uint32(v: &Value, key: &str) -> u32 {
    opt_u32(v, key).unwrap_or(0)
}

fn float(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

/// A free-form value as JSON text; empty when absent.
fn json_text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The object at `key`, if there is one.
fn object<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    Some(&v[key]).filter(|o| o.is_object())
}

fn array<'v>(v: &'v Value, key: &str) -> impl Iterator<Item = &'v Value> {
    v[key].as_array().into_iter().flatten()
}

fn instance_of(v: &Value) -> pb::Instance {
    pb::Instance {
        id: text(v, "id"),
        service: text(v, "service"),
        state: text(v, "state"),
        managed: v["managed"].as_bool().unwrap_or(false),
        pids: array(v, "pids").filter_map(Value::as_u64).filter_map(|p| u32::try_from(p).ok()).collect(),
        cgroup: text(v, "cgroup"),
        port: uint32(v, "port"),
        restarts: uint32(v, "restarts"),
        last_failure: opt_text(v, "last_failure"),
        kind: text(v, "kind"),
        metrics: object(v, "metrics").map(|m| pb::Metrics {
            cpu_cores: float(m, "cpu_cores"),
            minor_faults_per_s: float(m, "minor_faults_per_s"),
            major_faults_per_s: float(m, "major_faults_per_s"),
            swap_in_pages_per_s: float(m, "swap_in_pages_per_s"),
            swap_out_pages_per_s: float(m, "swap_out_pages_per_s"),
            runqueue_delay_mean_seconds: float(m, "runqueue_delay_mean_seconds"),
            memory_resident_bytes: m["memory_resident_bytes"].as_u64(),
            memory_swap_bytes: m["memory_swap_bytes"].as_u64(),
        }),
    }
}

/// A decision as the audit log records it (with `seq` when it came from the log).
fn decision_of(v: &Value) -> pb::Decision {
    pb::Decision {
        seq: uint(v, "seq"),
        unix_ms: uint(v, "unix_ms"),
        rule: text(v, "rule"),
        action: text(v, "action"),
        service: text(v, "service"),
        instance_id: text(v, "instance_id"),
        held_seconds: float(v, "held_seconds"),
        outcome: text(v, "outcome"),
        reason: text(v, "reason"),
        error: text(v, "error"),
        seconds: float(v, "seconds"),
        inputs_json: json_text(v, "inputs"),
    }
}

/// An action answer: running, finished, or (from GetAction) finished with the error of its outcome.
fn action_of(v: &Value) -> pb::ActionReply {
    pb::ActionReply {
        action_id: uint(v, "action_id"),
        status: text(v, "status"),
        instance_id: text(v, "id"),
        action: text(v, "action"),
        state: text(v, "state"),
        decision: object(v, "decision").map(decision_of),
        standby: object(v, "standby").map(|s| pb::Standby {
            memory_before_bytes: uint(s, "memory_before_bytes"),
            memory_after_bytes: uint(s, "memory_after_bytes"),
            memory_kept_resident: s["memory_kept_resident"].as_bool().unwrap_or(false),
            hibernate_seconds: float(s, "hibernate_seconds"),
            wake_seconds: s["wake_seconds"].as_f64(),
            prefetch_bytes: uint(s, "prefetch_bytes"),
        }),
        error: object(v, "error").map(|e| pb::Error { code: text(e, "code"), message: text(e, "message") }),
    }
}

fn rules_of(v: &Value) -> pb::Rules {
    pb::Rules {
        files: array(v, "files")
            .map(|f| pb::RuleFile {
                file: text(f, "file"),
                status: text(f, "status"),
                rules: array(f, "rules")
                    .map(|r| pb::Rule { name: text(r, "name"), action: text(r, "action") })
                    .collect(),
                error: text(f, "error"),
            })
            .collect(),
        last_load: text(v, "last_load"),
        dry_run: v["dry_run"].as_bool().unwrap_or(false),
    }
}

fn service_of(v: &Value) -> pb::Service {
    pb::Service {
        name: text(v, "name"),
        desired: uint32(v, "desired"),
        ready: uint32(v, "ready"),
        standby: uint32(v, "standby"),
        stopped: uint32(v, "stopped"),
        serving: uint32(v, "serving"),
        scale: text(v, "scale"),
        observed_concurrency: v["observed_concurrency"].as_f64(),
        mode: opt_text(v, "mode"),
        pinned: opt_u32(v, "pinned"),
        min: opt_u32(v, "min"),
        max: opt_u32(v, "max"),
        last_decision: object(v, "last_decision").map(|d| pb::ScaleDecision {
            unix_ms: uint(d, "unix_ms"),
            trigger: text(d, "trigger"),
            desired: uint32(d, "desired"),
            mode: text(d, "mode"),
            observed_concurrency: float(d, "observed_concurrency"),
            why: text(d, "why"),
            inputs_json: json_text(d, "inputs"),
        }),
    }
}

fn alert_of(v: &Value) -> pb::Alert {
    use pb::alert::Scope;
    let map = |key: &str| strings(v, key);
    let scope = match &v["scope"] {
        Value::Object(o) => match (o.get("instance_id"), o.get("service")) {
            (Some(id), _) => Some(Scope::ScopeInstanceId(id.as_str().unwrap_or_default().to_string())),
            (None, Some(s)) => Some(Scope::ScopeService(s.as_str().unwrap_or_default().to_string())),
            (None, None) => None,
        },
        _ => Some(Scope::ScopeHost(true)),
    };
    pb::Alert {
        name: text(v, "name"),
        labels: map("labels"),
        annotations: map("annotations"),
        fingerprint: text(v, "fingerprint"),
        group_key: text(v, "group_key"),
        receiver: text(v, "receiver"),
        starts_at: text(v, "starts_at"),
        ends_at: opt_text(v, "ends_at"),
        generator_url: text(v, "generator_url"),
        external_url: text(v, "external_url"),
        scope,
        received_at: text(v, "received_at"),
        updated_at: text(v, "updated_at"),
    }
}

/// The string values of the object at `key`.
fn strings(v: &Value, key: &str) -> std::collections::HashMap<String, String> {
    v[key]
        .as_object()
        .map(|o| o.iter().map(|(k, x)| (k.clone(), x.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

fn workflow_of(v: &Value) -> pb::Workflow {
    pb::Workflow {
        name: text(v, "name"),
        file: text(v, "file"),
        trigger_json: json_text(v, "trigger"),
        cooldown_seconds: float(v, "cooldown_seconds"),
        params: strings(v, "params"),
        steps: array(v, "steps")
            .map(|s| pb::WorkflowStep {
                name: text(s, "name"),
                kind: text(s, "kind"),
                after: array(s, "after").filter_map(|a| a.as_str().map(str::to_string)).collect(),
                timeout_seconds: s["timeout_seconds"].as_f64(),
                retries: uint32(s, "retries"),
                idempotent: s["idempotent"].as_bool().unwrap_or(false),
            })
            .collect(),
    }
}

fn cordon_of(resource: &str, c: &Value) -> pb::Cordon {
    pb::Cordon {
        resource: resource.to_string(),
        run_id: uint(c, "run_id"),
        since_ms: uint(c, "since_ms"),
        reason: text(c, "reason"),
    }
}

fn run_of(v: &Value) -> pb::WorkflowRun {
    pb::WorkflowRun {
        id: uint(v, "id"),
        workflow: text(v, "workflow"),
        params: strings(v, "params"),
        source: text(v, "source"),
        reason: text(v, "reason"),
        state: text(v, "state"),
        message: opt_text(v, "message"),
        dry_run: v["dry_run"].as_bool().unwrap_or(false),
        created_ms: uint(v, "created_ms"),
        ended_ms: v["ended_ms"].as_u64(),
        steps: array(v, "steps")
            .map(|s| pb::WorkflowRunStep {
                name: text(s, "name"),
                kind: text(s, "kind"),
                state: text(s, "state"),
                attempt: uint32(s, "attempt"),
                interrupted: uint32(s, "interrupted"),
                started_ms: s["started_ms"].as_u64(),
                ended_ms: s["ended_ms"].as_u64(),
                retry_at_ms: s["retry_at_ms"].as_u64(),
                output_json: json_text(s, "output"),
                error: opt_text(s, "error"),
            })
            .collect(),
    }
}

fn hardware_of(v: &Value) -> pb::Hardware {
    pb::Hardware {
        devices: array(v, "devices")
            .map(|d| pb::HardwareDevice {
                device: text(d, "device"),
                state: text(d, "state"),
                reason: text(d, "reason"),
                since_unix_ms: uint(d, "since_unix_ms"),
                errors: d["errors"]
                    .as_object()
                    .map(|o| o.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect())
                    .unwrap_or_default(),
            })
            .collect(),
        sources: array(v, "sources")
            .map(|s| pb::HardwareSource {
                name: text(s, "name"),
                available: s["available"].as_bool().unwrap_or(false),
                detail: text(s, "detail"),
            })
            .collect(),
        dropped_events: uint(v, "dropped_events"),
        quiet_seconds: uint(v, "quiet_seconds"),
    }
}

/// A scale request's target: `Some(n)` pins, `None` gives the service back to the autoscaler.
fn scale_target(target: Option<pb::scale_request::Target>) -> Result<Option<u32>, ApiError> {
    use pb::scale_request::Target;
    match target {
        Some(Target::Instances(n)) => Ok(Some(n)),
        Some(Target::Auto(true)) => Ok(None),
        Some(Target::Auto(false)) | None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "give `instances: N` to pin a count, or `auto: true` to lift the pin",
        )),
    }
}

/// A run request as the REST body it stands for (so both are checked alike).
fn run_body(r: &pb::RunWorkflowRequest) -> Vec<u8> {
    let mut body: serde_json::Map<String, Value> =
        r.params.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    if r.dry_run {
        body.insert("dry_run".into(), Value::Bool(true));
    }
    if !r.reason.is_empty() {
        body.insert("reason".into(), Value::String(r.reason.clone()));
    }
    Value::Object(body).to_string().into_bytes()
}

/// `vigil.v1.Remediation` over the API's operations.
struct RemediationService {
    api: Arc<Api>,
    /// Turns true when the server shuts down: decision watches end then.
    stopping: watch::Receiver<bool>,
}

impl RemediationService {
    async fn act(
        &self,
        action: Action,
        request: Request<pb::ActionRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        let r = request.into_inner();
        // An empty string is proto3's "not set": the default wait, as REST without `?wait=`.
        let wait = Some(r.wait.as_str()).filter(|w| !w.is_empty());
        let (_, body) = self.api.act(action, &r.instance_id, wait).await.map_err(status_of)?;
        Ok(Response::new(action_of(&body)))
    }
}

type DecisionStream = Pin<Box<dyn Stream<Item = Result<pb::Decision, Status>> + Send>>;

#[tonic::async_trait]
impl Remediation for RemediationService {
    async fn list_instances(
        &self,
        _: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let all = self.api.instances().await.map_err(status_of)?;
        Ok(Response::new(pb::ListInstancesResponse { instances: all.iter().map(instance_of).collect() }))
    }

    async fn get_instance(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let one = self.api.instance(&request.get_ref().id).await.map_err(status_of)?;
        Ok(Response::new(instance_of(&one)))
    }

    async fn hibernate(
        &self,
        request: Request<pb::ActionRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        self.act(Action::Hibernate, request).await
    }

    async fn wake(&self, request: Request<pb::ActionRequest>) -> Result<Response<pb::ActionReply>, Status> {
        self.act(Action::Wake, request).await
    }

    async fn stop(&self, request: Request<pb::ActionRequest>) -> Result<Response<pb::ActionReply>, Status> {
        self.act(Action::Stop, request).await
    }

    async fn start(&self, request: Request<pb::ActionRequest>) -> Result<Response<pb::ActionReply>, Status> {
        self.act(Action::Start, request).await
    }

    async fn restart(
        &self,
        request: Request<pb::ActionRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        self.act(Action::Restart, request).await
    }

    async fn get_action(
        &self,
        request: Request<pb::GetActionRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        let body = self.api.action(request.get_ref().action_id).await.map_err(status_of)?;
        Ok(Response::new(action_of(&body)))
    }

    async fn list_decisions(
        &self,
        request: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        // 0 is proto3's "not set": the default limit, as REST without `?limit=`.
        let limit = Some(request.get_ref().limit).filter(|n| *n > 0).map(|n| n as usize);
        let rows = self.api.decisions(limit).await.map_err(status_of)?;
        Ok(Response::new(pb::ListDecisionsResponse { decisions: rows.iter().map(decision_of).collect() }))
    }

    type WatchDecisionsStream = DecisionStream;

    async fn watch_decisions(
        &self,
        request: Request<pb::WatchDecisionsRequest>,
    ) -> Result<Response<Self::WatchDecisionsStream>, Status> {
        let feed = self
            .api
            .watch_decisions(request.get_ref().since_seq, self.stopping.clone())
            .await
            .map_err(status_of)?;
        let stream = ReceiverStream::new(feed).map(|item| item.map(|v| decision_of(&v)).map_err(status_of));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_rules(&self, _: Request<pb::GetRulesRequest>) -> Result<Response<pb::Rules>, Status> {
        Ok(Response::new(rules_of(&self.api.rules())))
    }

    async fn set_dry_run(
        &self,
        request: Request<pb::SetDryRunRequest>,
    ) -> Result<Response<pb::SetDryRunResponse>, Status> {
        let dry_run = self.api.set_dry_run(request.get_ref().enabled).map_err(status_of)?;
        Ok(Response::new(pb::SetDryRunResponse { dry_run }))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        Ok(Response::new(pb::ListServicesResponse {
            services: self.api.services().iter().map(service_of).collect(),
        }))
    }

    async fn get_service(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        let one = self.api.service(&request.get_ref().name).map_err(status_of)?;
        Ok(Response::new(service_of(&one)))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Result<Response<pb::Service>, Status> {
        let r = request.into_inner();
        let count = scale_target(r.target).map_err(status_of)?;
        let service = self.api.scale(&r.name, count).await.map_err(status_of)?;
        Ok(Response::new(service_of(&service)))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let r = request.into_inner();
        let given = |s: String| (!s.is_empty()).then_some(s);
        let filter = crate::api::AlertFilter { instance_id: given(r.instance_id), service: given(r.service) };
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: self.api.alerts(&filter).iter().map(alert_of).collect(),
        }))
    }

    async fn list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let limit = request.get_ref().limit;
        let limit = (limit > 0).then_some(limit as usize);
        let v = self.api.workflows(limit).await.map_err(status_of)?;
        Ok(Response::new(pb::ListWorkflowsResponse {
            workflows: array(&v, "workflows").map(workflow_of).collect(),
            cordons: v["cordons"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(resource, c)| cordon_of(resource, c))
                .collect(),
            runs: array(&v, "runs").map(run_of).collect(),
        }))
    }

    async fn run_workflow(
        &self,
        request: Request<pb::RunWorkflowRequest>,
    ) -> Result<Response<pb::WorkflowRun>, Status> {
        let r = request.into_inner();
        let run = self.api.run_workflow(&r.name, &run_body(&r)).await.map_err(status_of)?;
        Ok(Response::new(run_of(&run)))
    }

    async fn get_workflow_run(
        &self,
        request: Request<pb::WorkflowRunRequest>,
    ) -> Result<Response<pb::WorkflowRun>, Status> {
        let run = self.api.workflow_run(request.get_ref().id).await.map_err(status_of)?;
        Ok(Response::new(run_of(&run)))
    }

    async fn approve_workflow_run(
        &self,
        request: Request<pb::WorkflowRunRequest>,
    ) -> Result<Response<pb::WorkflowRun>, Status> {
        let run = self.api.decide_run(request.get_ref().id, true).await.map_err(status_of)?;
        Ok(Response::new(run_of(&run)))
    }

    async fn cancel_workflow_run(
        &self,
        request: Request<pb::WorkflowRunRequest>,
    ) -> Result<Response<pb::WorkflowRun>, Status> {
        let run = self.api.decide_run(request.get_ref().id, false).await.map_err(status_of)?;
        Ok(Response::new(run_of(&run)))
    }

    async fn uncordon(
        &self,
        request: Request<pb::UncordonRequest>,
    ) -> Result<Response<pb::UncordonResponse>, Status> {
        let r = request.into_inner();
        let body = if r.reason.is_empty() {
            Vec::new()
        } else {
            serde_json::json!({ "reason": r.reason }).to_string().into_bytes()
        };
        let v = self.api.uncordon(&r.resource, &body).await.map_err(status_of)?;
        Ok(Response::new(pb::UncordonResponse {
            resource: text(&v, "uncordoned"),
            cordon: Some(cordon_of(&r.resource, &v["cordon"])),
        }))
    }

    async fn get_hardware(
        &self,
        request: Request<pb::GetHardwareRequest>,
    ) -> Result<Response<pb::Hardware>, Status> {
        let device = Some(request.into_inner().device).filter(|d| !d.is_empty());
        let v = self.api.hardware(device).await.map_err(status_of)?;
        Ok(Response::new(hardware_of(&v)))
    }
}

/// Binds `grpc.listen`; the error names the key.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GrpcError> {
    TcpListener::bind(addr).await.map_err(|source| GrpcError::Bind { addr, source })
}

/// Serves Remediation (behind the token rule), health and reflection on `listener` until `shutdown`
/// completes; then ends every decision watch, and returns once the open calls have drained.
pub async fn serve(
    api: Arc<Api>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let addr = listener.local_addr().map_err(GrpcError::LocalAddr)?;
    let (stop, stopping) = watch::channel(false);
    let guard = api.clone();
    let remediation = RemediationServer::with_interceptor(
        RemediationService { api, stopping },
        move |request: Request<()>| {
            // The REST check, on the call's metadata as HTTP headers.
            guard.authorize(&request.metadata().clone().into_headers()).map_err(status_of)?;
            Ok(request)
        },
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RemediationServer<RemediationService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let signal = async move {
        shutdown.await;
        // Probes see the server leave before its listener closes.
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        health.set_not_serving::<RemediationServer<RemediationService>>().await;
        stop.send_replace(true);
    };
    tracing::info!(%addr, "serving gRPC: vigil.v1.Remediation, grpc.health.v1.Health, reflection");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(remediation)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), signal)
        .await
        .map_err(|source| GrpcError::Serve { addr, source })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use tokio::sync::broadcast;
    use tonic::transport::Channel;

    use super::*;
    use crate::actions::Recorded;
    use crate::api::{Control, ManagedInstance};
    use crate::audit::AuditLog;
    use crate::engine::BoxFuture;
    use crate::rules::InstanceState;

    fn err(status: StatusCode, code: &'static str) -> ApiError {
        ApiError::new(status, code, format!("a {code} error"))
    }

    #[test]
    fn every_api_code_has_its_grpc_code() {
        let cases = [
            (StatusCode::NOT_FOUND, "not_found", Code::NotFound),
            (StatusCode::BAD_REQUEST, "bad_request", Code::InvalidArgument),
            (StatusCode::UNAUTHORIZED, "unauthorized", Code::Unauthenticated),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited", Code::ResourceExhausted),
            (StatusCode::CONFLICT, "in_progress", Code::Aborted),
            (StatusCode::CONFLICT, "standby_fraction", Code::FailedPrecondition),
            (StatusCode::CONFLICT, "not_scaled", Code::FailedPrecondition),
            (StatusCode::CONFLICT, "action_failed", Code::FailedPrecondition),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal", Code::Internal),
            (StatusCode::INTERNAL_SERVER_ERROR, "audit", Code::Internal),
            // Codes this mapping does not know yet fall back on their HTTP status.
            (StatusCode::CONFLICT, "some_new_conflict", Code::FailedPrecondition),
            (StatusCode::BAD_GATEWAY, "upstream", Code::Internal),
            (StatusCode::IM_A_TEAPOT, "teapot", Code::Unknown),
        ];
        for (status, code, want) in cases {
            assert_eq!(code_of(&err(status, code)), want, "{code}");
        }
    }

    #[test]
    fn a_status_carries_the_message_and_the_rest_code() {
        let s = status_of(ApiError::new(StatusCode::CONFLICT, "in_progress", "`echo-0` is busy"));
        assert_eq!((s.code(), s.message()), (Code::Aborted, "`echo-0` is busy"));
        assert_eq!(s.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()), Some("in_progress"));
    }

    #[test]
    fn a_scale_target_is_a_count_or_auto() {
        use pb::scale_request::Target;
        assert_eq!(scale_target(Some(Target::Instances(2))), Ok(Some(2)));
        assert_eq!(scale_target(Some(Target::Auto(true))), Ok(None));
        for bad in [None, Some(Target::Auto(false))] {
            assert_eq!(scale_target(bad).map_err(|e| e.code), Err("bad_request"));
        }
    }

    #[test]
    fn rest_bodies_become_messages() {
        let managed = json!({
            "id": "echo-0", "service": "echo", "state": "active", "managed": true, "pids": [42, 43],
            "cgroup": "/vigil/echo/echo-0", "port": 18080, "restarts": 2, "last_failure": null,
            "metrics": {"cpu_cores": 0.5, "minor_faults_per_s": 1.0, "major_faults_per_s": 0.0,
                "swap_in_pages_per_s": 0.0, "swap_out_pages_per_s": 0.0, "runqueue_delay_mean_seconds": 0.001,
                "memory_resident_bytes": 1024, "memory_swap_bytes": null},
        });
        let i = instance_of(&managed);
        assert_eq!(
            (i.id.as_str(), i.state.as_str(), i.managed, i.pids),
            ("echo-0", "active", true, vec![42, 43])
        );
        assert_eq!((i.port, i.restarts, i.last_failure, i.kind.as_str()), (18080, 2, None, ""));
        let m = i.metrics.expect("metrics");
        assert_eq!((m.cpu_cores, m.memory_resident_bytes, m.memory_swap_bytes), (0.5, Some(1024), None));
        let observed = json!({"id": "cg:/x", "service": "x", "state": "observed", "managed": false, "pids": [],
            "cgroup": "/x", "kind": "systemd", "metrics": null});
        let o = instance_of(&observed);
        assert_eq!((o.kind.as_str(), o.port, o.metrics), ("systemd", 0, None));

        let refused = json!({"seq": 7, "unix_ms": 1000, "rule": "manual", "action": "hibernate", "service": "echo",
            "instance_id": "echo-0", "held_seconds": 0.0, "outcome": "refused", "reason": "in_progress"});
        let d = decision_of(&refused);
        assert_eq!(
            (d.seq, d.outcome.as_str(), d.reason.as_str(), d.inputs_json.as_str()),
            (7, "refused", "in_progress", "")
        );
        let failed = json!({"outcome": "failed", "seconds": 1.5, "error": "boom", "inputs": {"cpu": 0.1}});
        let d = decision_of(&failed);
        assert_eq!((d.seconds, d.error.as_str(), d.inputs_json.as_str()), (1.5, "boom", r#"{"cpu":0.1}"#));

        let finished = json!({"action_id": 3, "status": "finished", "id": "echo-0", "action": "hibernate",
            "state": "hibernated", "decision": {"outcome": "succeeded", "seconds": 0.2},
            "standby": {"memory_before_bytes": 10, "memory_after_bytes": 2, "memory_kept_resident": false,
                "hibernate_seconds": 0.2, "wake_seconds": null, "prefetch_bytes": 0}});
        let a = action_of(&finished);
        assert_eq!((a.action_id, a.instance_id.as_str(), a.state.as_str()), (3, "echo-0", "hibernated"));
        assert_eq!(a.decision.map(|d| d.outcome), Some("succeeded".into()));
        assert_eq!(a.standby.map(|s| (s.memory_before_bytes, s.wake_seconds)), Some((10, None)));
        let running =
            json!({"action_id": 4, "status": "running", "id": "echo-0", "action": "wake", "state": null});
        let a = action_of(&running);
        assert_eq!((a.status.as_str(), a.state.as_str(), a.decision, a.error), ("running", "", None, None));
        let errored =
            json!({"action_id": 5, "status": "finished", "error": {"code": "action_failed", "message": "x"}});
        assert_eq!(action_of(&errored).error.map(|e| e.code), Some("action_failed".into()));

        let rules = json!({"files": [
            {"file": "a.yaml", "status": "ok", "rules": [{"name": "idle", "action": "hibernate"}]},
            {"file": "b.yaml", "status": "error", "error": "b.yaml:1:1: nope"}],
            "last_load": "ok", "dry_run": true});
        let r = rules_of(&rules);
        assert_eq!(
            (r.files.len(), r.files[0].rules[0].name.as_str(), r.files[1].error.as_str()),
            (2, "idle", "b.yaml:1:1: nope")
        );
        assert!(r.dry_run);

        let fixed = json!({"name": "echo", "desired": 1, "ready": 1, "standby": 0, "stopped": 0, "serving": 1,
            "observed_concurrency": null, "mode": null, "pinned": null, "scale": "fixed", "last_decision": null});
        let s = service_of(&fixed);
        assert_eq!((s.scale.as_str(), s.mode, s.min, s.last_decision), ("fixed", None, None, None));
        let scaled = json!({"name": "api", "desired": 3, "ready": 2, "standby": 0, "stopped": 1, "serving": 3,
            "observed_concurrency": 2.5, "mode": "panic", "pinned": 3, "min": 0, "max": 5, "scale": "pinned",
            "last_decision": {"unix_ms": 9, "trigger": "manual", "desired": 3, "mode": "panic",
                "observed_concurrency": 2.5, "why": "pinned", "inputs": {"pinned": 3}}});
        let s = service_of(&scaled);
        assert_eq!((s.pinned, s.min, s.max, s.mode.as_deref()), (Some(3), Some(0), Some(5), Some("panic")));
        assert_eq!(s.last_decision.map(|d| d.inputs_json), Some(r#"{"pinned":3}"#.into()));
    }

    /// One managed instance, `echo-0`; actions on it succeed at once.
    struct Fake {
        recorded: broadcast::Sender<Recorded>,
    }

    impl Control for Fake {
        fn managed(&self) -> Vec<ManagedInstance> {
            vec![ManagedInstance {
                id: "echo-0".into(),
                service: "echo".into(),
                state: InstanceState::Active,
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
            _: Duration,
        ) -> BoxFuture<'a, Result<(StatusCode, Value), ApiError>> {
            Box::pin(async move {
                if id != "echo-0" {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no managed instance `{id}`"),
                    ));
                }
                let body = json!({"action_id": 1, "status": "finished", "id": id, "action": action.as_str(),
                    "state": "active", "decision": {"outcome": "succeeded", "seconds": 0.0}});
                Ok((StatusCode::OK, body))
            })
        }
        fn action(&self, _: u64) -> Option<Value> {
            None
        }
        fn rules(&self) -> Value {
            json!({"files": [], "dry_run": false})
        }
        fn set_dry_run(&self, on: bool) -> Result<bool, ApiError> {
            Ok(on)
        }
        fn services(&self) -> Vec<Value> {
            vec![json!({"name": "echo", "desired": 1, "scale": "fixed"})]
        }
        fn scale<'a>(&'a self, service: &'a str, _: Option<u32>) -> BoxFuture<'a, Result<Value, ApiError>> {
            Box::pin(async move {
                Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_scaled",
                    format!("service `{service}` has a fixed count"),
                ))
            })
        }
        fn subscribe(&self) -> broadcast::Receiver<Recorded> {
            self.recorded.subscribe()
        }
    }

    fn with_token<T>(message: T, token: &str) -> Request<T> {
        let mut r = Request::new(message);
        let value = format!("Bearer {token}").parse().expect("ascii");
        r.metadata_mut().insert("authorization", value);
        r
    }

    #[tokio::test]
    async fn serves_remediation_behind_the_token_and_health_without() {
        use pb::remediation_client::RemediationClient;
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

        let dir = std::env::temp_dir().join(format!("vigil-grpc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = Arc::new(AuditLog::open(&dir).unwrap());
        audit.append(&json!({"rule": "idle", "action": "hibernate", "instance_id": "echo-0", "outcome": "dry_run"})).unwrap();
        let fake = Arc::new(Fake { recorded: broadcast::channel(8).0 });
        let (_, snapshots) = watch::channel(Arc::new(vigil_core::snapshot::Snapshot::empty()));
        let api = Api::with_layout(fake.clone(), snapshots, audit, Some("s3cret".into()), None);
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (down, down_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(api, listener, async move {
            let _ = down_rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = RemediationClient::new(channel.clone());

        let refused = client.list_instances(pb::ListInstancesRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        let wrong =
            client.list_instances(with_token(pb::ListInstancesRequest {}, "s3cre")).await.unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated, "the token is compared whole");

        let all = client.list_instances(with_token(pb::ListInstancesRequest {}, "s3cret")).await.unwrap();
        assert_eq!(all.get_ref().instances[0].pids, vec![42]);
        let missing =
            client.get_instance(with_token(pb::GetInstanceRequest { id: "nope".into() }, "s3cret")).await;
        assert_eq!(missing.unwrap_err().code(), Code::NotFound);
        let bad_wait = pb::ActionRequest { instance_id: "echo-0".into(), wait: "soon".into() };
        let bad = client.hibernate(with_token(bad_wait, "s3cret")).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        let ok = pb::ActionRequest { instance_id: "echo-0".into(), wait: String::new() };
        let woke = client.wake(with_token(ok, "s3cret")).await.unwrap();
        assert_eq!((woke.get_ref().action.as_str(), woke.get_ref().status.as_str()), ("wake", "finished"));
        let fixed =
            pb::ScaleRequest { name: "echo".into(), target: Some(pb::scale_request::Target::Instances(2)) };
        let fixed = client.scale(with_token(fixed, "s3cret")).await.unwrap_err();
        assert_eq!(fixed.code(), Code::FailedPrecondition);
        assert_eq!(fixed.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()), Some("not_scaled"));

        let mut watch = client
            .watch_decisions(with_token(pb::WatchDecisionsRequest { since_seq: Some(0) }, "s3cret"))
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap();
        assert_eq!(first.map(|d| (d.seq, d.outcome)), Some((1, "dry_run".to_string())));

        // Health answers without the token.
        let mut health = HealthClient::new(channel);
        for service in ["", "vigil.v1.Remediation"] {
            let answer = health.check(HealthCheckRequest { service: service.into() }).await.unwrap();
            assert_eq!(answer.get_ref().status(), ServingStatus::Serving, "{service:?}");
        }

        // Shutting down ends the open watch, and the server returns.
        let _ = down.send(());
        let end =
            tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("the watch ends");
        assert!(matches!(end, Ok(None)), "{end:?}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
