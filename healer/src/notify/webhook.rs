//! The webhook receiver's request: an Alertmanager webhook (version 4) body with one alert per message,
//! signed with the Standard Webhooks scheme. Pure functions; the caller supplies the clock.
//!
//! Body:
//! `{"version":"4","groupKey":"{}:{alertname=\"<rule>\"}","truncatedAlerts":0,"status":"firing|resolved",
//! "receiver":<receiver>,"groupLabels":{"alertname":<rule>},"commonLabels":<labels>,
//! "commonAnnotations":<annotations>,"externalURL":<external_url>,"alerts":[{"status","labels",
//! "annotations","startsAt","endsAt","generatorURL","fingerprint"}]}`; times are RFC 3339 UTC with
//! milliseconds, and an open alert's `endsAt` is `0001-01-01T00:00:00Z`, as Alertmanager writes them.
//! One alert per message keeps each message the unit of delivery and retry: it is delivered (and
//! deduplicated by its `webhook-id`) or not, and the order of messages is the order of decisions.
//!
//! Signature: `webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`,
//! where the key is the base64-decoded part of the secret after `whsec_` and the timestamp is Unix seconds
//! at the attempt; with several secrets, one `v1,<sig>` per secret, space-separated.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use vigil_core::config::Secrets;

use super::notice::{Notice, NoticeKind, OPEN_END, rfc3339};

/// Where a notice's alert links to: the decisions for a decision, the rules for a rule's condition.
pub fn generator_url(external_url: &str, notice: &Notice) -> String {
    match notice.kind {
        NoticeKind::Decision => format!("{external_url}/api/v1/decisions"),
        NoticeKind::Condition => format!("{external_url}/api/v1/rules"),
    }
}

/// The JSON body sent to webhook receiver `receiver` for `notice`.
pub fn body(receiver: &str, notice: &Notice, external_url: &str) -> Vec<u8> {
    let alertname = notice.alertname();
    let ends_at = notice.ends_at_ms.map_or_else(|| OPEN_END.to_string(), rfc3339);
    let value = json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname={alertname:?}}}"),
        "truncatedAlerts": 0,
        "status": notice.status.as_str(),
        "receiver": receiver,
        "groupLabels": { "alertname": alertname },
        "commonLabels": notice.labels,
        "commonAnnotations": notice.annotations,
        "externalURL": external_url,
        "alerts": [{
            "status": notice.status.as_str(),
            "labels": notice.labels,
            "annotations": notice.annotations,
            "startsAt": rfc3339(notice.starts_at_ms),
            "endsAt": ends_at,
            "generatorURL": generator_url(external_url, notice),
            "fingerprint": notice.fingerprint(),
        }],
    });
    // A `Value` of strings and maps always serializes.
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The `webhook-signature` header's value for message `id` sent at `timestamp` (Unix seconds).
pub fn signature(secrets: &Secrets, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut out = Vec::with_capacity(secrets.len());
    for secret in secrets.iter() {
        // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.key()) else { continue };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        out.push(format!("v1,{sig}"));
    }
    out.join(" ")
}

/// How far a `webhook-timestamp` may be from now, either way (Standard Webhooks' replay window).
pub const TOLERANCE_SECS: u64 = 300;

/// Checks a signed request as a Standard Webhooks receiver does: `webhook-id`, `webhook-timestamp`
/// (within [`TOLERANCE_SECS`] of `now_secs`) and a `webhook-signature` holding at least one `v1,`
/// signature made with one of `secrets` (compared in constant time). The error says what is missing or
/// wrong, never the expected signature.
pub fn verify(
    secrets: &Secrets,
    headers: &http::HeaderMap,
    body: &[u8],
    now_secs: u64,
) -> Result<(), String> {
    let header = |name: &str| -> Result<&str, String> {
        headers
            .get(name)
            .ok_or_else(|| format!("the `{name}` header is missing"))?
            .to_str()
            .map_err(|_| format!("the `{name}` header is not text"))
    };
    let id = header("webhook-id")?;
    let timestamp: u64 = header("webhook-timestamp")?
        .trim()
        .parse()
        .map_err(|_| "`webhook-timestamp` is not unix seconds".to_string())?;
    if timestamp.abs_diff(now_secs) > TOLERANCE_SECS {
        return Err(format!(
            "`webhook-timestamp` {timestamp} is more than {TOLERANCE_SECS} s from now ({now_secs})"
        ));
    }
    let presented = header("webhook-signature")?;
    let expected = signature(secrets, id, timestamp, body);
    let matched = presented
        .split_whitespace()
        .any(|p| expected.split_whitespace().any(|e| vigil_auth::same_secret(p.as_bytes(), e.as_bytes())));
    if matched { Ok(()) } else { Err("no `webhook-signature` matches a configured secret".to_string()) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vigil_core::config::WebhookSecret;

    use super::*;
    use crate::notify::notice::NoticeStatus;

    fn secrets(texts: &[&str]) -> Secrets {
        Secrets::new(texts.iter().map(|t| WebhookSecret::new(t).unwrap()).collect())
    }

    #[test]
    fn signature_matches_the_standard_webhooks_reference() {
        // Computed with PyPI `standardwebhooks`:
        // Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        //   .sign("msg_0123456789abcdef0000000000000001", datetime.fromtimestamp(1700000000, utc), '{"version":"4"}')
        let one = secrets(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let sig =
            signature(&one, "msg_0123456789abcdef0000000000000001", 1_700_000_000, br#"{"version":"4"}"#);
        assert_eq!(sig, "v1,dMU7GENzSqLchzCVcZFw4bkpDvOmYhN3dggfU/Uyj0g=");
        let two = secrets(&[
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ]);
        let sigs =
            signature(&two, "msg_0123456789abcdef0000000000000001", 1_700_000_000, br#"{"version":"4"}"#);
        let parts: Vec<&str> = sigs.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], sig, "each secret signs; the rotated-in one sits beside the old");
        assert_ne!(parts[0], sig);
    }

    #[test]
    fn body_is_an_alertmanager_v4_message_with_one_alert() {
        let labels = BTreeMap::from([("team".to_string(), "ops".to_string())]);
        let n = Notice::firing("hot", "echo", "echo-0", &labels, 1_700_000_000_000).created_at(0);
        let v: serde_json::Value = serde_json::from_slice(&body("ops", &n, "http://127.0.0.1:9750")).unwrap();
        assert_eq!(v["version"], "4");
        assert_eq!(v["groupKey"], "{}:{alertname=\"hot\"}");
        assert_eq!(v["truncatedAlerts"], 0);
        assert_eq!(v["status"], "firing");
        assert_eq!(v["receiver"], "ops");
        assert_eq!(v["groupLabels"], json!({"alertname": "hot"}));
        assert_eq!(v["commonLabels"]["team"], "ops");
        assert_eq!(v["commonLabels"]["alertname"], "hot");
        assert_eq!(v["commonAnnotations"]["summary"], "rule hot holds for echo-0 (service echo)");
        assert_eq!(v["externalURL"], "http://127.0.0.1:9750");
        let alerts = v["alerts"].as_array().unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(a["status"], "firing");
        assert_eq!(a["labels"], v["commonLabels"]);
        assert_eq!(a["annotations"], v["commonAnnotations"]);
        assert_eq!(a["startsAt"], "2023-11-14T22:13:20.000Z");
        assert_eq!(a["endsAt"], OPEN_END);
        assert_eq!(a["generatorURL"], "http://127.0.0.1:9750/api/v1/rules");
        assert_eq!(a["fingerprint"], n.fingerprint());

        let r = Notice::resolved("hot", "echo", "echo-0", &labels, 1_700_000_000_000, 1_700_000_060_000);
        let v: serde_json::Value = serde_json::from_slice(&body("ops", &r, "http://x")).unwrap();
        assert_eq!(v["status"], NoticeStatus::Resolved.as_str());
        assert_eq!(v["alerts"][0]["endsAt"], "2023-11-14T22:14:20.000Z");
        assert_eq!(v["alerts"][0]["fingerprint"], n.fingerprint());
    }

    #[test]
    fn verification_takes_the_reference_signature_and_refuses_the_rest() {
        let one = secrets(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let other = secrets(&["whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]);
        let body = br#"{"version":"4"}"#;
        let headers = |sig: &str, ts: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("webhook-id", "msg_0123456789abcdef0000000000000001".parse().unwrap());
            h.insert("webhook-timestamp", ts.parse().unwrap());
            h.insert("webhook-signature", sig.parse().unwrap());
            h
        };
        // The signature PyPI `standardwebhooks` made (above), alone or beside one by an unknown key.
        let good = "v1,dMU7GENzSqLchzCVcZFw4bkpDvOmYhN3dggfU/Uyj0g=";
        assert_eq!(verify(&one, &headers(good, "1700000000"), body, 1_700_000_100), Ok(()));
        let rotated = format!("v1,AAAA{} {good}", &good[7..]);
        assert_eq!(verify(&one, &headers(&rotated, "1700000000"), body, 1_700_000_000), Ok(()));
        let refused = [
            verify(&other, &headers(good, "1700000000"), body, 1_700_000_000),
            verify(&one, &headers(good, "1700000000"), br#"{"version":"3"}"#, 1_700_000_000),
            verify(&one, &headers(good, "1700000000"), body, 1_700_000_301),
            verify(&one, &headers(good, "soon"), body, 1_700_000_000),
            verify(&one, &http::HeaderMap::new(), body, 1_700_000_000),
        ];
        let messages: Vec<String> = refused.into_iter().map(|r| r.unwrap_err()).collect();
        assert_eq!(
            messages,
            [
                "no `webhook-signature` matches a configured secret",
                "no `webhook-signature` matches a configured secret",
                "`webhook-timestamp` 1700000000 is more than 300 s from now (1700000301)",
                "`webhook-timestamp` is not unix seconds",
                "the `webhook-id` header is missing",
            ]
        );
    }
}
