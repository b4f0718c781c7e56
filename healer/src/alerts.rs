//! Incoming alerts: Alertmanager's webhook payload (version 4), as `POST /api/v1/alerts` receives it, kept
//! until Alertmanager says it is resolved, and offered to the rules as facts (`when: - alert: {...}`).
//!
//! - A payload is checked whole before anything is applied: a bad one is refused with the path of the
//!   offending field (`alerts[2].startsAt: ...`) and changes nothing.
//! - Alerts are deduplicated on `groupKey` + `fingerprint` + `startsAt`: Alertmanager re-sends a group at
//!   every `group_interval` change and every `repeat_interval`, and two routes may send the same alert
//!   under two group keys (kept apart: each is resolved by its own route).
//! - A `resolved` alert removes the firing one with the same key. Alertmanager sends those only when the
//!   webhook's `send_resolved` is true (its default); without them an alert stays until the store is full.
//! - The store lives in the redb state beside the audit log, written in one transaction per payload, so a
//!   restart keeps every alert that was firing (Alertmanager would not re-send it before its
//!   `repeat_interval`).
//! - An alert is about an instance when it has an `instance_id` label, about every instance of a service
//!   when it has a `service` label (and no `instance_id`), and about the whole host otherwise.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use vigil_core::time::{format_rfc3339_ms, parse_rfc3339_ms};

/// Key (group key, fingerprint, starts-at, NUL-separated) → the stored alert as JSON.
const ALERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("incoming_alerts");

/// Firing alerts kept at most; a payload that would exceed it is refused whole (Alertmanager retries).
pub const MAX_ACTIVE: usize = 10_000;

/// The one payload version this endpoint reads.
const VERSION: &str = "4";

/// Alertmanager's webhook body. Unknown fields are ignored: Alertmanager may add some.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    version: String,
    group_key: String,
    status: String,
    receiver: String,
    #[serde(default)]
    #[serde(rename = "externalURL")]
    external_url: String,
    alerts: Vec<RawAlert>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAlert {
    status: String,
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    starts_at: String,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default)]
    #[serde(rename = "generatorURL")]
    generator_url: String,
    fingerprint: String,
}

/// What a refused payload got wrong: the field's path and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PayloadError {
    pub path: String,
    pub message: String,
}

fn field(path: impl Into<String>, message: impl Into<String>) -> PayloadError {
    PayloadError { path: path.into(), message: message.into() }
}

#[derive(Debug, thiserror::Error)]
pub enum AlertStoreError {
    #[error("the alert store is full ({MAX_ACTIVE} firing alerts); this payload would add {adding} more")]
    Full { adding: usize },
    #[error("alert store: {0}")]
    Store(Box<redb::Error>),
    #[error("alert store: a stored alert does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

fn store_err(e: impl Into<redb::Error>) -> AlertStoreError {
    AlertStoreError::Store(Box::new(e.into()))
}

/// What an alert is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Instance(String),
    Service(String),
    Host,
}

impl Scope {
    fn of(labels: &BTreeMap<String, String>) -> Scope {
        match (labels.get("instance_id"), labels.get("service")) {
            (Some(id), _) if !id.is_empty() => Scope::Instance(id.clone()),
            (_, Some(s)) if !s.is_empty() => Scope::Service(s.clone()),
            _ => Scope::Host,
        }
    }

    /// Whether the alert is about this instance.
    pub fn covers(&self, service: &str, instance_id: &str) -> bool {
        match self {
            Scope::Instance(id) => id == instance_id,
            Scope::Service(s) => s == service,
            Scope::Host => true,
        }
    }
}

/// A firing alert as Vigil keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredAlert {
    /// The `alertname` label (empty when the alert has none).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub fingerprint: String,
    pub group_key: String,
    /// The Alertmanager receiver that sent it.
    pub receiver: String,
    pub starts_at_ms: i64,
    /// When Alertmanager expects it to end, if it said (the zero time means it did not).
    pub ends_at_ms: Option<i64>,
    pub generator_url: String,
    pub external_url: String,
    pub scope: Scope,
    /// When Vigil first got it, and when last.
    pub received_ms: i64,
    pub updated_ms: i64,
}

impl StoredAlert {
    fn key(&self) -> String {
        key(&self.group_key, &self.fingerprint, self.starts_at_ms)
    }

    /// The alert as `GET /api/v1/alerts` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let scope = match &self.scope {
            Scope::Instance(id) => serde_json::json!({ "instance_id": id }),
            Scope::Service(s) => serde_json::json!({ "service": s }),
            Scope::Host => serde_json::json!("host"),
        };
        serde_json::json!({
            "name": self.name,
            "status": "firing",
            "labels": self.labels,
            "annotations": self.annotations,
            "fingerprint": self.fingerprint,
            "group_key": self.group_key,
            "receiver": self.receiver,
            "starts_at": format_rfc3339_ms(self.starts_at_ms),
            "ends_at": self.ends_at_ms.map(format_rfc3339_ms),
            "generator_url": self.generator_url,
            "external_url": self.external_url,
            "scope": scope,
            "received_at": format_rfc3339_ms(self.received_ms),
            "updated_at": format_rfc3339_ms(self.updated_ms),
        })
    }
}

fn key(group_key: &str, fingerprint: &str, starts_at_ms: i64) -> String {
    format!("{group_key}\0{fingerprint}\0{starts_at_ms}")
}

/// One alert of a checked payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Incoming {
    pub firing: bool,
    pub alert: StoredAlert,
}

/// Reads and checks a webhook body; `now_ms` stamps what is received.
pub fn parse_payload(body: &[u8], now_ms: i64) -> Result<Vec<Incoming>, PayloadError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let payload: Payload = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "body".to_string() } else { path };
        field(path, e.into_inner().to_string())
    })?;
    if payload.version != VERSION {
        return Err(field(
            "version",
            format!(
                "{:?} is not a version this endpoint reads: Alertmanager's webhook version {VERSION:?} is",
                payload.version
            ),
        ));
    }
    status(&payload.status).map_err(|m| field("status", m))?;
    if payload.group_key.is_empty() {
        return Err(field("groupKey", "must not be empty"));
    }
    let mut out = Vec::with_capacity(payload.alerts.len());
    for (i, a) in payload.alerts.into_iter().enumerate() {
        let at = |f: &str| format!("alerts[{i}].{f}");
        let firing = status(&a.status).map_err(|m| field(at("status"), m))?;
        if a.fingerprint.is_empty() {
            return Err(field(at("fingerprint"), "must not be empty"));
        }
        let starts_at_ms = parse_rfc3339_ms(&a.starts_at).map_err(|m| field(at("startsAt"), m))?;
        let ends_at_ms = match a.ends_at.as_deref() {
            None | Some("") => None,
            Some(text) => {
                let ms = parse_rfc3339_ms(text).map_err(|m| field(at("endsAt"), m))?;
                // Go's zero time: no end was given.
                (ms > 0).then_some(ms)
            }
        };
        let scope = Scope::of(&a.labels);
        out.push(Incoming {
            firing,
            alert: StoredAlert {
                name: a.labels.get("alertname").cloned().unwrap_or_default(),
                labels: a.labels,
                annotations: a.annotations,
                fingerprint: a.fingerprint,
                group_key: payload.group_key.clone(),
                receiver: payload.receiver.clone(),
                starts_at_ms,
                ends_at_ms,
                generator_url: a.generator_url,
                external_url: payload.external_url.clone(),
                scope,
                received_ms: now_ms,
                updated_ms: now_ms,
            },
        });
    }
    Ok(out)
}

fn status(s: &str) -> Result<bool, String> {
    match s {
        "firing" => Ok(true),
        "resolved" => Ok(false),
        other => Err(format!("{other:?} is neither \"firing\" nor \"resolved\"")),
    }
}

/// What one payload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ingested {
    pub received: usize,
    /// Firing alerts not seen before.
    pub new: usize,
    /// Firing alerts seen before whose labels, annotations or end changed.
    pub updated: usize,
    /// Firing alerts seen before, unchanged.
    pub duplicates: usize,
    /// Resolved alerts that ended a firing one.
    pub resolved: usize,
    /// Resolved alerts Vigil had no firing record of (sent before Vigil listened, or twice).
    pub resolved_unknown: usize,
    /// Firing alerts kept after it.
    pub active: usize,
}

/// An alert as a rule condition sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertFact {
    pub name: Arc<str>,
    pub labels: Arc<BTreeMap<String, String>>,
    pub scope: Scope,
}

impl AlertFact {
    /// An alert that is only its labels (a rule file's test step).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> AlertFact {
        AlertFact {
            name: Arc::from(labels.get("alertname").map_or("", String::as_str)),
            labels: Arc::new(labels.clone()),
            scope: Scope::of(labels),
        }
    }
}

/// The firing alerts: in memory for the rules and the API, in redb for restarts.
pub struct AlertStore {
    db: Option<Arc<Database>>,
    alerts: Mutex<BTreeMap<String, StoredAlert>>,
    facts: Mutex<Arc<Vec<AlertFact>>>,
    metrics: AlertMetrics,
}

impl AlertStore {
    /// The store kept in `db` (the audit log's database), with what it held before.
    pub fn open(db: Arc<Database>) -> Result<AlertStore, AlertStoreError> {
        let mut alerts = BTreeMap::new();
        {
            let tx = db.begin_read().map_err(store_err)?;
            match tx.open_table(ALERTS) {
                Ok(table) => {
                    for entry in table.iter().map_err(store_err)? {
                        let (k, v) = entry.map_err(store_err)?;
                        alerts.insert(k.value().to_string(), serde_json::from_slice(v.value())?);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        let store = AlertStore {
            db: Some(db),
            alerts: Mutex::new(alerts),
            facts: Mutex::new(Arc::new(Vec::new())),
            metrics: AlertMetrics::default(),
        };
        store.refresh_facts(&store.alerts());
        Ok(store)
    }

    /// A store kept in memory only (rule tests).
    pub fn in_memory() -> AlertStore {
        AlertStore {
            db: None,
            alerts: Mutex::new(BTreeMap::new()),
            facts: Mutex::new(Arc::new(Vec::new())),
            metrics: AlertMetrics::default(),
        }
    }

    fn alerts(&self) -> MutexGuard<'_, BTreeMap<String, StoredAlert>> {
        self.alerts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refresh_facts(&self, alerts: &BTreeMap<String, StoredAlert>) {
        let facts: Vec<AlertFact> = alerts.values().map(|a| AlertFact::from_labels(&a.labels)).collect();
        self.metrics.active.set(facts.len() as i64);
        *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(facts);
    }

    /// The firing alerts as the rules see them (cheap: shared until the next change).
    pub fn facts(&self) -> Arc<Vec<AlertFact>> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The firing alerts, oldest first.
    pub fn list(&self) -> Vec<StoredAlert> {
        let mut all: Vec<StoredAlert> = self.alerts().values().cloned().collect();
        all.sort_by(|a, b| {
            (a.starts_at_ms, &a.name, &a.fingerprint).cmp(&(b.starts_at_ms, &b.name, &b.fingerprint))
        });
        all
    }

    pub fn metrics(&self) -> &AlertMetrics {
        &self.metrics
    }

    /// Applies a checked payload: all of it, durably, or (on a store error or when it would overflow the
    /// store) none of it. Blocks on the database: call it off the async workers.
    pub fn ingest(&self, incoming: Vec<Incoming>) -> Result<Ingested, AlertStoreError> {
        let mut alerts = self.alerts();
        let mut next = alerts.clone();
        let mut report = Ingested { received: incoming.len(), ..Ingested::default() };
        let mut writes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for Incoming { firing, mut alert } in incoming {
            let k = alert.key();
            if !firing {
                if next.remove(&k).is_some() {
                    report.resolved += 1;
                    writes.push((k, None));
                } else {
                    report.resolved_unknown += 1;
                }
                continue;
            }
            match next.get(&k) {
                Some(old) => {
                    alert.received_ms = old.received_ms;
                    let same = old.labels == alert.labels
                        && old.annotations == alert.annotations
                        && old.ends_at_ms == alert.ends_at_ms;
                    if same {
                        report.duplicates += 1;
                    } else {
                        report.updated += 1;
                    }
                }
                None => report.new += 1,
            }
            writes.push((k.clone(), Some(serde_json::to_vec(&alert)?)));
            next.insert(k, alert);
        }
        if next.len() > MAX_ACTIVE && next.len() > alerts.len() {
            return Err(AlertStoreError::Full { adding: next.len() - alerts.len() });
        }
        if let Some(db) = &self.db {
            let tx = db.begin_write().map_err(store_err)?;
            {
                let mut table = tx.open_table(ALERTS).map_err(store_err)?;
                for (k, v) in &writes {
                    match v {
                        Some(bytes) => {
                            table.insert(k.as_str(), bytes.as_slice()).map_err(store_err)?;
                        }
                        None => {
                            table.remove(k.as_str()).map_err(store_err)?;
                        }
                    }
                }
            }
            tx.commit().map_err(store_err)?;
        }
        report.active = next.len();
        self.metrics.record(&report);
        *alerts = next;
        self.refresh_facts(&alerts);
        Ok(report)
    }
}

/// Incoming alerts (`POST /api/v1/alerts`): `vigil_alerts_received_total{status}` and `vigil_alerts_active`.
#[derive(Clone, Default)]
pub struct AlertMetrics {
    received: Family<Vec<(&'static str, String)>, Counter>,
    pub active: prometheus_client::metrics::gauge::Gauge,
}

impl AlertMetrics {
    /// Counts what one payload brought.
    pub fn record(&self, r: &Ingested) {
        let firing = (r.new + r.updated + r.duplicates) as u64;
        let resolved = (r.resolved + r.resolved_unknown) as u64;
        self.received.get_or_create(&vec![("status", "firing".to_string())]).inc_by(firing);
        self.received.get_or_create(&vec![("status", "resolved".to_string())]).inc_by(resolved);
    }

    /// Adds them to `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "vigil_alerts_received",
            "Alerts received from Alertmanager, by status",
            self.received.clone(),
        );
        r.register("vigil_alerts_active", "Incoming alerts firing now", self.active.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(alerts: &str) -> String {
        format!(
            r#"{{"version":"4","groupKey":"{{}}:{{alertname=\"HighRunQueue\"}}","truncatedAlerts":0,"status":"firing","receiver":"vigil","groupLabels":{{"alertname":"HighRunQueue"}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am:9093","alerts":[{alerts}]}}"#
        )
    }

    fn alert(status: &str, fp: &str, labels: &str, starts: &str) -> String {
        format!(
            r#"{{"status":"{status}","labels":{labels},"annotations":{{"summary":"slow"}},"startsAt":"{starts}","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prom/graph","fingerprint":"{fp}"}}"#
        )
    }

    const T0: &str = "2026-12-02T05:00:00.000Z";

    #[test]
    fn a_payload_is_read_with_its_scope() {
        let labels = r#"{"alertname":"HighRunQueue","instance_id":"echo-0","severity":"critical"}"#;
        let b = body(
            &[
                alert("firing", "a1", labels, T0),
                alert("firing", "b2", r#"{"alertname":"Disk","service":"echo"}"#, T0),
                alert("firing", "c3", r#"{"alertname":"Host"}"#, T0),
            ]
            .join(","),
        );
        let got = parse_payload(b.as_bytes(), 7).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].firing);
        assert_eq!(got[0].alert.name, "HighRunQueue");
        assert_eq!(got[0].alert.scope, Scope::Instance("echo-0".into()));
        assert_eq!(got[0].alert.ends_at_ms, None, "Go's zero time is no end");
        assert_eq!(got[0].alert.starts_at_ms, parse_rfc3339_ms(T0).unwrap());
        assert_eq!(got[1].alert.scope, Scope::Service("echo".into()));
        assert_eq!(got[2].alert.scope, Scope::Host);
        assert!(Scope::Host.covers("any", "thing"));
        assert!(!Scope::Service("echo".into()).covers("web", "web-0"));
    }

    #[test]
    fn a_bad_payload_names_the_field() {
        let ok = alert("firing", "a1", r#"{"alertname":"X"}"#, T0);
        let cases = [
            ("nonsense".to_string(), "body"),
            (body(&ok).replace(r#""version":"4""#, r#""version":"3""#), "version"),
            (
                body(&ok).replace(r#""status":"firing","receiver""#, r#""status":"burning","receiver""#),
                "status",
            ),
            (body(&ok).replace(r#""groupKey":"{}:{alertname=\"HighRunQueue\"}","#, ""), "body"),
            (
                body(&[ok.clone(), alert("firing", "b", r#"{"alertname":"X"}"#, "yesterday")].join(",")),
                "alerts[1].startsAt",
            ),
            (body(&alert("firing", "", r#"{"alertname":"X"}"#, T0)), "alerts[0].fingerprint"),
            (body(&alert("firing", "a", r#"{"alertname":7}"#, T0)), "alerts[0].labels.alertname"),
            (body(&alert("pending", "a", r#"{"alertname":"X"}"#, T0)), "alerts[0].status"),
        ];
        for (text, path) in cases {
            let e = parse_payload(text.as_bytes(), 0).expect_err(&text);
            assert_eq!(e.path, path, "{e} for {text}");
        }
    }

    #[test]
    fn alerts_deduplicate_update_resolve_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("vigil-alerts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        let labels = r#"{"alertname":"HighRunQueue","instance_id":"echo-0"}"#;
        {
            let store = AlertStore::open(Arc::new(Database::create(&path).unwrap())).unwrap();
            let firing = body(&alert("firing", "a1", labels, T0));
            let r = store.ingest(parse_payload(firing.as_bytes(), 1).unwrap()).unwrap();
            assert_eq!((r.new, r.duplicates, r.active), (1, 0, 1));
            let r = store.ingest(parse_payload(firing.as_bytes(), 2).unwrap()).unwrap();
            assert_eq!((r.new, r.duplicates, r.active), (0, 1, 1), "a re-sent group adds nothing");
            let changed = firing.replace(r#""summary":"slow""#, r#""summary":"slower""#);
            let r = store.ingest(parse_payload(changed.as_bytes(), 3).unwrap()).unwrap();
            assert_eq!((r.updated, r.active), (1, 1));
            let again = body(&alert("firing", "a1", labels, "2026-12-02T06:00:00Z"));
            let r = store.ingest(parse_payload(again.as_bytes(), 4).unwrap()).unwrap();
            assert_eq!((r.new, r.active), (1, 2), "a new startsAt is a new alert");
            let list = store.list();
            assert_eq!(list[0].annotations["summary"], "slower");
            assert_eq!((list[0].received_ms, list[0].updated_ms), (1, 3));
            assert_eq!(store.facts().len(), 2);
        }
        let store = AlertStore::open(Arc::new(Database::create(&path).unwrap())).unwrap();
        assert_eq!(store.list().len(), 2, "kept across a restart");
        let resolved = body(&alert("resolved", "a1", labels, T0));
        let r = store.ingest(parse_payload(resolved.as_bytes(), 5).unwrap()).unwrap();
        assert_eq!((r.resolved, r.resolved_unknown, r.active), (1, 0, 1));
        let r = store.ingest(parse_payload(resolved.as_bytes(), 6).unwrap()).unwrap();
        assert_eq!((r.resolved, r.resolved_unknown, r.active), (0, 1, 1));
        assert_eq!(store.facts().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_overflowing_payload_changes_nothing() {
        let store = AlertStore::in_memory();
        let many: Vec<String> =
            (0..=MAX_ACTIVE).map(|i| alert("firing", &format!("f{i}"), r#"{"alertname":"X"}"#, T0)).collect();
        let b = body(&many.join(","));
        let err = store.ingest(parse_payload(b.as_bytes(), 0).unwrap()).unwrap_err();
        assert!(matches!(err, AlertStoreError::Full { adding } if adding == MAX_ACTIVE + 1), "{err}");
        assert!(store.list().is_empty());
    }
}
