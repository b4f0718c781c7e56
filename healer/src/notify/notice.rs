//! What is sent: a [`Notice`] is one alert in Alertmanager's sense (labels, annotations, a start and an
//! end), made from a decision ([`Notice::for_decision`]) or from a `notify` rule's condition
//! ([`Notice::firing`], [`Notice::resolved`]). Pure data and conversions; time comes in as arguments,
//! except the creation stamp the constructors take from the wall clock (set it with
//! [`Notice::created_at`] in tests).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::{Decision, Outcome, Refusal};

/// How long a decision, an event without an end of its own, counts as an open alert: Alertmanager shows it
/// (and routes it) for five minutes after the decision and then resolves it by itself.
pub const EVENT_LASTS_MS: u64 = 5 * 60 * 1000;

/// Labels a rule's own labels cannot replace: they say which decision or condition a notice is about, so
/// they make its identity (fingerprint). `severity` is not among them: a rule may set it.
pub const IDENTITY_LABELS: [&str; 6] = ["alertname", "rule", "action", "outcome", "service", "instance_id"];

/// Whether the alert is going on or over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeStatus {
    Firing,
    Resolved,
}

impl NoticeStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            NoticeStatus::Firing => "firing",
            NoticeStatus::Resolved => "resolved",
        }
    }
}

/// What a notice is about: a decision (an event, over after [`EVENT_LASTS_MS`]) or a rule's condition
/// (open until it is resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    Decision,
    Condition,
}

/// One notification, as queued and as sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub status: NoticeStatus,
    pub kind: NoticeKind,
    /// Includes `alertname`.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at_ms: u64,
    /// `None` while a condition is firing (open-ended).
    pub ends_at_ms: Option<u64>,
    /// When the notice was made: the start of its delivery latency and of `give_up_after`.
    pub created_ms: u64,
}

pub(crate) use vigil_core::time::now_unix_ms as now_ms;

/// `outcome` as a label (and a matcher) says it.
pub fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::DryRun => "dry_run",
        Outcome::Refused { .. } => "refused",
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed { .. } => "failed",
    }
}

fn refusal_reason(r: &Refusal) -> &'static str {
    match r {
        Refusal::RateLimited => "the host-wide action rate limit (healer.max_actions_per_minute) is used up",
        Refusal::InProgress => "another action on the instance is in progress",
        Refusal::StandbyFraction => {
            "hibernating it would put more of the service in standby than healer.max_standby_fraction allows"
        }
    }
}

/// Labels made of the identity labels, then the rule's own (which may add to them and set `severity`, but
/// not replace the identity), with `severity` defaulting to `default_severity`.
fn labels_with(
    identity: &[(&str, &str)],
    rule_labels: &BTreeMap<String, String>,
    default_severity: &str,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = rule_labels
        .iter()
        .filter(|(k, _)| !IDENTITY_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in identity {
        labels.insert((*k).to_string(), (*v).to_string());
    }
    labels.entry("severity".into()).or_insert_with(|| default_severity.to_string());
    labels
}

impl Notice {
    /// The notice of a decision. Labels: `alertname` (the rule), `rule`, `action`, `outcome`, `service`,
    /// `instance_id`, `severity` (`critical` for a failed action, else `warning`, unless the rule's labels
    /// set it) and the rule's labels. Annotations: `summary` (one readable sentence), `description` (the
    /// error or the refusal's reason, when there is one) and `decision` (the decision as JSON). A decision
    /// is an event: it ends [`EVENT_LASTS_MS`] after it was made.
    pub fn for_decision(d: &Decision, rule_labels: &BTreeMap<String, String>) -> Notice {
        let outcome = outcome_name(&d.outcome);
        let severity = if matches!(d.outcome, Outcome::Failed { .. }) { "critical" } else { "warning" };
        let labels = labels_with(
            &[
                ("alertname", &d.rule),
                ("rule", &d.rule),
                ("action", d.action),
                ("outcome", outcome),
                ("service", &d.service),
                ("instance_id", &d.instance_id),
            ],
            rule_labels,
            severity,
        );
        let what = format!("{} of {} (service {})", d.action, d.instance_id, d.service);
        let (summary, description) = match &d.outcome {
            _ if d.action == "notify" => {
                (format!("rule {} notifies about {} (service {})", d.rule, d.instance_id, d.service), None)
            }
            Outcome::Succeeded { seconds } => {
                (format!("{what} succeeded in {seconds:.1} s by rule {}", d.rule), None)
            }
            Outcome::Failed { seconds, error } => {
                (format!("{what} failed after {seconds:.1} s by rule {}", d.rule), Some(error.clone()))
            }
            Outcome::Refused { reason } => (
                format!("{what} refused by the safety gate, asked by rule {}", d.rule),
                Some(refusal_reason(reason).to_string()),
            ),
            Outcome::DryRun => (format!("{what} decided by rule {} (dry run: not executed)", d.rule), None),
        };
        let mut annotations = BTreeMap::from([("summary".to_string(), summary)]);
        if let Some(description) = description {
            annotations.insert("description".into(), description);
        }
        // A decision always serializes (its fields are plain data); an empty string would only lose detail.
        annotations.insert("decision".into(), serde_json::to_string(d).unwrap_or_default());
        Notice {
            status: NoticeStatus::Firing,
            kind: NoticeKind::Decision,
            labels,
            annotations,
            starts_at_ms: d.unix_ms,
            ends_at_ms: Some(d.unix_ms.saturating_add(EVENT_LASTS_MS)),
            created_ms: now_ms(),
        }
    }

    fn condition_labels(
        rule: &str,
        service: &str,
        instance_id: &str,
        rule_labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        labels_with(
            &[("alertname", rule), ("rule", rule), ("service", service), ("instance_id", instance_id)],
            rule_labels,
            "warning",
        )
    }

    /// A `notify` rule's condition began to hold for an instance at `started_ms`: an open alert until
    /// [`Notice::resolved`] with the same arguments (hence the same labels and fingerprint). No `action`
    /// or `outcome` label: nothing was done.
    pub fn firing(
        rule: &str,
        service: &str,
        instance_id: &str,
        rule_labels: &BTreeMap<String, String>,
        started_ms: u64,
    ) -> Notice {
        Notice {
            status: NoticeStatus::Firing,
            kind: NoticeKind::Condition,
            labels: Self::condition_labels(rule, service, instance_id, rule_labels),
            annotations: BTreeMap::from([(
                "summary".to_string(),
                format!("rule {rule} holds for {instance_id} (service {service})"),
            )]),
            starts_at_ms: started_ms,
            ends_at_ms: None,
            created_ms: now_ms(),
        }
    }

    /// The condition that began at `started_ms` ended at `ended_ms`.
    pub fn resolved(
        rule: &str,
        service: &str,
        instance_id: &str,
        rule_labels: &BTreeMap<String, String>,
        started_ms: u64,
        ended_ms: u64,
    ) -> Notice {
        Notice {
            status: NoticeStatus::Resolved,
            kind: NoticeKind::Condition,
            labels: Self::condition_labels(rule, service, instance_id, rule_labels),
            annotations: BTreeMap::from([(
                "summary".to_string(),
                format!("rule {rule} no longer holds for {instance_id} (service {service})"),
            )]),
            starts_at_ms: started_ms,
            ends_at_ms: Some(ended_ms),
            created_ms: now_ms(),
        }
    }

    /// The same notice, made at `ms` (for tests and replays).
    pub fn created_at(mut self, ms: u64) -> Notice {
        self.created_ms = ms;
        self
    }

    pub fn alertname(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }

    /// The alert's identity: [`fingerprint`] of its labels.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.labels)
    }
}

/// A stable 16-hex-digit id of a label set: FNV-1a (64 bit) over the labels sorted by name, each name and
/// value followed by a 0xff byte, printed as `{:016x}`. That is Prometheus' and Alertmanager's
/// `LabelSet.Fingerprint`, so the fingerprint in a webhook body is the one Alertmanager shows for the same
/// alert.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut add = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for (k, v) in labels {
        add(k.as_bytes());
        add(&[0xff]);
        add(v.as_bytes());
        add(&[0xff]);
    }
    format!("{h:016x}")
}

/// Alertmanager's "no end": the zero time of Go, as its webhooks write it.
pub const OPEN_END: &str = "0001-01-01T00:00:00Z";

/// `ms` since the Unix epoch as RFC 3339 in UTC with milliseconds (`2023-11-14T22:13:20.000Z`), as
/// Alertmanager writes times; `vigil_core::time` does the calendar.
pub fn rfc3339(ms: u64) -> String {
    vigil_core::time::format_rfc3339_ms(i64::try_from(ms).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn decision(outcome: Outcome) -> Decision {
        Decision {
            unix_ms: 1_700_000_000_000,
            rule: "tell-ops".into(),
            action: "restart",
            service: "echo".into(),
            instance_id: "echo-0".into(),
            held_seconds: 3.0,
            inputs: None,
            outcome,
        }
    }

    #[test]
    fn a_decision_becomes_an_event_with_its_labels_and_a_sentence() {
        let rule_labels = BTreeMap::from([
            ("team".to_string(), "ops".to_string()),
            ("service".to_string(), "x".to_string()),
        ]);
        let n = Notice::for_decision(&decision(Outcome::Succeeded { seconds: 1.23 }), &rule_labels);
        let labels: Vec<(&str, &str)> = n.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            labels,
            [
                ("action", "restart"),
                ("alertname", "tell-ops"),
                ("instance_id", "echo-0"),
                ("outcome", "succeeded"),
                ("rule", "tell-ops"),
                ("service", "echo"),
                ("severity", "warning"),
                ("team", "ops"),
            ],
            "the rule's labels add to the identity but do not replace it"
        );
        assert_eq!(
            n.annotations["summary"],
            "restart of echo-0 (service echo) succeeded in 1.2 s by rule tell-ops"
        );
        assert!(!n.annotations.contains_key("description"));
        let json: serde_json::Value = serde_json::from_str(&n.annotations["decision"]).unwrap();
        assert_eq!(json["outcome"], "succeeded");
        assert_eq!((n.starts_at_ms, n.ends_at_ms), (1_700_000_000_000, Some(1_700_000_300_000)));
        assert_eq!((n.status, n.kind), (NoticeStatus::Firing, NoticeKind::Decision));

        let failed = Notice::for_decision(
            &decision(Outcome::Failed { seconds: 0.5, error: "exit 3".into() }),
            &BTreeMap::new(),
        );
        assert_eq!(failed.labels["severity"], "critical");
        assert_eq!(
            failed.annotations["summary"],
            "restart of echo-0 (service echo) failed after 0.5 s by rule tell-ops"
        );
        assert_eq!(failed.annotations["description"], "exit 3");
        let paged = BTreeMap::from([("severity".to_string(), "page".to_string())]);
        assert_eq!(Notice::for_decision(&decision(Outcome::DryRun), &paged).labels["severity"], "page");
        let refused = Notice::for_decision(
            &decision(Outcome::Refused { reason: Refusal::RateLimited }),
            &BTreeMap::new(),
        );
        assert_eq!(refused.labels["outcome"], "refused");
        assert!(refused.annotations["description"].contains("rate limit"));
    }

    #[test]
    fn firing_and_resolved_share_labels_and_fingerprint() {
        let labels = BTreeMap::from([("team".to_string(), "ops".to_string())]);
        let f = Notice::firing("hot", "echo", "echo-0", &labels, 1000);
        let r = Notice::resolved("hot", "echo", "echo-0", &labels, 1000, 5000);
        assert_eq!(f.labels, r.labels);
        assert_eq!(f.fingerprint(), r.fingerprint());
        assert!(!f.labels.contains_key("outcome") && !f.labels.contains_key("action"));
        assert_eq!((f.ends_at_ms, r.ends_at_ms), (None, Some(5000)));
        assert_eq!(r.status, NoticeStatus::Resolved);
    }

    #[test]
    fn fingerprints_are_alertmanagers() {
        // The empty set is FNV's offset basis, as in Prometheus' model; tests/notify.rs checks a real
        // alert's fingerprint against the one a real Alertmanager computes.
        assert_eq!(fingerprint(&BTreeMap::new()), "cbf29ce484222325");
        let one = BTreeMap::from([("alertname".to_string(), "a".to_string())]);
        let again = BTreeMap::from([("alertname".to_string(), "a".to_string())]);
        assert_eq!(fingerprint(&one), fingerprint(&again));
        assert_ne!(fingerprint(&one), fingerprint(&BTreeMap::from([("alertname".into(), "b".into())])));
        assert_eq!(fingerprint(&one).len(), 16);
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
