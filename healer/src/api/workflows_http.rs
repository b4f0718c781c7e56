//! The remediation workflows over REST (issue contract): `GET /api/v1/workflows` (the workflows in force,
//! the cordons and the newest runs with their steps), `POST /api/v1/workflows/{name}/run` (optional body
//! of parameters: `{"device": "sdb"}`, plus `dry_run` and `reason`) answering `{"id": RUN_ID, ...}`,
//! `GET /api/v1/workflows/runs/{id}`, and `POST /api/v1/workflows/runs/{id}/approve` and `/cancel`; and
//! `POST /api/v1/workflows/cordons/{resource}/uncordon` (optional body `{"reason": "..."}`): a person lifts
//! a cordon whose run has ended (a failed run leaves its cordon in force).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{Api, ApiError, Limit};
use crate::workflow::machine::RunRecord;
use crate::workflow::runner::{Runner, RunnerError, StartRequest};
use crate::workflow::{Trigger, Workflow};

/// Runs listed by `GET /api/v1/workflows` unless `limit` says otherwise, and the most it lists.
const DEFAULT_RUNS: usize = 50;
const MAX_RUNS: usize = 1000;

fn error(e: RunnerError) -> ApiError {
    let message = e.to_string();
    match e {
        RunnerError::UnknownWorkflow(_) | RunnerError::UnknownRun(_) | RunnerError::NotCordoned(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
        }
        RunnerError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", message),
        RunnerError::Refused(_) => ApiError::new(StatusCode::CONFLICT, "refused", message),
        RunnerError::Store(_) | RunnerError::Audit(_) | RunnerError::Notify(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
        }
    }
}

fn runner(api: &Api) -> Result<Runner, ApiError> {
    api.workflows.clone().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "remediation workflows do not run here")
    })
}

/// A run as the API shows it: the record, with `id` first.
pub fn run_json(run: &RunRecord) -> Value {
    serde_json::to_value(run).unwrap_or(Value::Null)
}

fn trigger_json(t: &Trigger) -> Value {
    match t {
        Trigger::HardwareEvents { kind, device, at_least, within } => json!({"hardware": {
            "kind": kind.as_ref(), "device": device.as_ref().map(|g| g.as_str()),
            "at_least": at_least, "within_seconds": within.as_secs_f64()}}),
        Trigger::HardwareState { state, device } => json!({"hardware": {
            "state": state.as_str(), "device": device.as_ref().map(|g| g.as_str())}}),
        Trigger::Alert(a) => json!({"alert": {
            "name": a.name.as_ref().map(|g| g.as_str()),
            "labels": a.labels.iter().cloned().collect::<BTreeMap<String, String>>()}}),
        Trigger::Manual => json!({"manual": true}),
    }
}

fn workflow_json(w: &Workflow) -> Value {
    let steps: Vec<Value> = w
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name.as_ref(),
                "kind": s.kind.as_str(),
                "after": s.after.iter().map(|&i| w.steps[i].name.as_ref()).collect::<Vec<_>>(),
                "timeout_seconds": s.timeout.map(|t| t.as_secs_f64()),
                "retries": s.retries,
                "idempotent": s.idempotent,
            })
        })
        .collect();
    json!({
        "name": w.name.as_ref(),
        "file": w.file.as_ref(),
        "trigger": trigger_json(&w.trigger),
        "cooldown_seconds": w.cooldown.as_secs_f64(),
        "params": w.params,
        "steps": steps,
    })
}

impl Api {
    /// The same operations over the workflow runtime. Call it on the `Api` just made, before it is shared.
    pub fn with_workflows(self: Arc<Api>, runner: Runner) -> Arc<Api> {
        let mut api = Arc::into_inner(self).expect("with_workflows is called before the Api is shared");
        api.workflows = Some(runner);
        Arc::new(api)
    }

    /// The workflows in force, the cordons in force, and the newest `limit` runs, newest first.
    pub async fn workflows(&self, limit: Option<usize>) -> Result<Value, ApiError> {
        let runner = runner(self)?;
        let limit = limit.unwrap_or(DEFAULT_RUNS).min(MAX_RUNS);
        let r = runner.clone();
        let runs = tokio::task::spawn_blocking(move || r.runs(limit))
            .await
            .map_err(ApiError::internal)?
            .map_err(error)?;
        let workflows: Vec<Value> = runner.workflows().values().map(|w| workflow_json(w)).collect();
        Ok(json!({
            "workflows": workflows,
            "cordons": runner.cordons(),
            "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
        }))
    }

    /// Starts workflow `name` by hand with the body's parameters.
    pub async fn run_workflow(&self, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let runner = runner(self)?;
        let (params, dry_run, reason) = parse_run_body(body)?;
        let req = StartRequest {
            workflow: name.to_string(),
            params,
            source: "api".into(),
            reason: reason.unwrap_or_else(|| "started through the API".into()),
            dry_run,
            cooldown_key: None,
            device: None,
        };
        let run = tokio::task::spawn_blocking(move || runner.start(req))
            .await
            .map_err(ApiError::internal)?
            .map_err(error)?;
        Ok(run_json(&run))
    }

    pub async fn workflow_run(&self, id: u64) -> Result<Value, ApiError> {
        let runner = runner(self)?;
        let run = tokio::task::spawn_blocking(move || runner.get(id))
            .await
            .map_err(ApiError::internal)?
            .map_err(error)?;
        Ok(run_json(&run))
    }

    /// `approve` or `cancel` run `id`.
    pub async fn decide_run(&self, id: u64, approve: bool) -> Result<Value, ApiError> {
        let runner = runner(self)?;
        let run =
            tokio::task::spawn_blocking(move || if approve { runner.approve(id) } else { runner.cancel(id) })
                .await
                .map_err(ApiError::internal)?
                .map_err(error)?;
        Ok(run_json(&run))
    }

    /// A person lifts the cordon on `resource`; answers the cordon that was in force.
    pub async fn uncordon(&self, resource: &str, body: &[u8]) -> Result<Value, ApiError> {
        let runner = runner(self)?;
        let reason = parse_reason(body)?.unwrap_or_else(|| "lifted through the API".into());
        let resource = resource.to_string();
        let r = resource.clone();
        let cordon = tokio::task::spawn_blocking(move || runner.uncordon(&r, &reason))
            .await
            .map_err(ApiError::internal)?
            .map_err(error)?;
        Ok(json!({ "uncordoned": resource, "cordon": cordon }))
    }
}

/// An optional `{"reason": "..."}` body.
fn parse_reason(body: &[u8]) -> Result<Option<String>, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let usage = "give no body, or {\"reason\": \"...\"}";
    match serde_json::from_slice::<Value>(body).map_err(|e| bad(format!("{e}; {usage}")))? {
        Value::Object(map) if map.keys().all(|k| k == "reason") => match map.get("reason") {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad("`reason` must be a string".into())),
        },
        _ => Err(bad(usage.to_string())),
    }
}

/// A run's parameters, whether it is a dry run, and why it was asked for.
type RunBody = (BTreeMap<String, String>, bool, Option<String>);

/// `{"device": "sdb", "cpu": 2, "dry_run": true, "reason": "..."}`: string and number values are the run's
/// parameters; an empty body is no parameters.
fn parse_run_body(body: &[u8]) -> Result<RunBody, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((BTreeMap::new(), false, None));
    }
    let usage = "give a JSON object of parameters, e.g. {\"device\": \"sdb\"}, with optional \"dry_run\": true \
                 and \"reason\"";
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("{e}; {usage}")))?;
    let Value::Object(map) = v else { return Err(bad(usage.to_string())) };
    let (mut params, mut dry_run, mut reason) = (BTreeMap::new(), false, None);
    for (k, v) in map {
        match (k.as_str(), v) {
            ("dry_run", Value::Bool(b)) => dry_run = b,
            ("dry_run", _) => return Err(bad("`dry_run` must be true or false".into())),
            ("reason", Value::String(s)) => reason = Some(s),
            ("reason", _) => return Err(bad("`reason` must be a string".into())),
            ("run_id" | "workflow", _) => {
                return Err(bad(format!("`{k}` is set by Vigil, not by the caller")));
            }
            (_, Value::String(s)) => {
                params.insert(k, s);
            }
            (_, Value::Number(n)) => {
                params.insert(k, n.to_string());
            }
            (_, other) => {
                return Err(bad(format!("parameter `{k}` must be a string or a number, not {other}")));
            }
        }
    }
    Ok((params, dry_run, reason))
}

fn run_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no workflow run `{id}`")))
}

pub(super) async fn list(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    api.workflows(q.limit).await.map(Json)
}

pub(super) async fn run(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    api.authorize(&headers)?;
    api.run_workflow(&name, &body).await.map(|v| (StatusCode::ACCEPTED, Json(v)))
}

pub(super) async fn get_run(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    api.workflow_run(run_id(&id)?).await.map(Json)
}

pub(super) async fn uncordon(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(resource): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    api.uncordon(&resource, &body).await.map(Json)
}

pub(super) async fn decide(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, what)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    api.authorize(&headers)?;
    let approve = match what.as_str() {
        "approve" => true,
        "cancel" => false,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no action `{what}` on workflow runs: approve or cancel"),
            ));
        }
    };
    api.decide_run(run_id(&id)?, approve).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_bodies_are_parameters_with_dry_run_and_reason() {
        let (p, dry, why) =
            parse_run_body(br#"{"device": "sdb", "cpu": 2, "dry_run": true, "reason": "x"}"#).unwrap();
        assert_eq!(p, BTreeMap::from([("cpu".into(), "2".into()), ("device".into(), "sdb".into())]));
        assert!(dry);
        assert_eq!(why.as_deref(), Some("x"));
        assert_eq!(parse_run_body(b"").unwrap().0, BTreeMap::new());
        for (body, message) in [
            (&br#"[1]"#[..], "give a JSON object"),
            (br#"{"dry_run": 1}"#, "`dry_run` must be true or false"),
            (br#"{"run_id": "3"}"#, "`run_id` is set by Vigil"),
            (br#"{"device": ["a"]}"#, "parameter `device` must be a string or a number"),
        ] {
            let e = parse_run_body(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.starts_with(message), "{}", e.message);
        }
    }
}
