//! The Alertmanager receiver's request: `POST <url>/api/v2/alerts` with `[{labels, annotations, startsAt,
//! endsAt, generatorURL}]`. Alertmanager resolves an alert by itself once its `endsAt` has passed, so:
//! - a decision (an event) is sent with `endsAt` = its start + five minutes;
//! - a firing condition is sent with `endsAt` = now + [`OPEN_ALERT_LEASE`], computed at each delivery, and
//!   re-posted every [`REFRESH_EVERY`] while it stays open (the set of open alerts is kept in the redb
//!   outbox, so that survives a restart; the re-posts are best effort, not queued);
//! - a resolved condition is sent with `endsAt` = when it ended, and leaves the open set.
//!
//! Pure functions; the caller supplies the clock.

use std::time::Duration;

use serde_json::json;

use super::notice::{Notice, rfc3339};
use super::webhook::generator_url;

/// How far ahead an open alert's `endsAt` is set at each post.
pub const OPEN_ALERT_LEASE: Duration = Duration::from_secs(4 * 60);

/// How often open alerts are re-posted: well inside the lease, so one missed post does not resolve them.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// `endsAt` of `notice` when posted at `now_ms`.
pub fn ends_at_ms(notice: &Notice, now_ms: u64) -> u64 {
    // Only a firing condition has no end of its own.
    notice.ends_at_ms.unwrap_or_else(|| now_ms.saturating_add(OPEN_ALERT_LEASE.as_millis() as u64))
}

/// The body of one post of `notices` at `now_ms`.
pub fn body(notices: &[&Notice], external_url: &str, now_ms: u64) -> Vec<u8> {
    let alerts: Vec<serde_json::Value> = notices
        .iter()
        .map(|n| {
            json!({
                "labels": n.labels,
                "annotations": n.annotations,
                "startsAt": rfc3339(n.starts_at_ms),
                "endsAt": rfc3339(ends_at_ms(n, now_ms)),
                "generatorURL": generator_url(external_url, n),
            })
        })
        .collect();
    // A `Value` of strings and maps always serializes.
    serde_json::to_vec(&alerts).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::Outcome;

    #[test]
    fn ends_are_leased_for_open_alerts_and_fixed_otherwise() {
        let labels = BTreeMap::new();
        let open = Notice::firing("hot", "echo", "echo-0", &labels, 1_000);
        assert_eq!(ends_at_ms(&open, 10_000), 10_000 + 240_000);
        let done = Notice::resolved("hot", "echo", "echo-0", &labels, 1_000, 5_000);
        assert_eq!(ends_at_ms(&done, 10_000), 5_000);
        let d = crate::engine::Decision {
            unix_ms: 1_000,
            rule: "r".into(),
            action: "restart",
            service: "s".into(),
            instance_id: "s-0".into(),
            held_seconds: 0.0,
            inputs: None,
            outcome: Outcome::DryRun,
        };
        let event = Notice::for_decision(&d, &labels);
        assert_eq!(ends_at_ms(&event, 10_000_000), 1_000 + 300_000, "an event's end does not move");
    }

    #[test]
    fn body_is_a_list_of_postable_alerts() {
        let open = Notice::firing("hot", "echo", "echo-0", &BTreeMap::new(), 1_700_000_000_000);
        let v: serde_json::Value =
            serde_json::from_slice(&body(&[&open], "http://127.0.0.1:9750", 1_700_000_000_000)).unwrap();
        assert_eq!(
            v,
            json!([{
                "labels": open.labels,
                "annotations": open.annotations,
                "startsAt": "2023-11-14T22:13:20.000Z",
                "endsAt": "2023-11-14T22:17:20.000Z",
                "generatorURL": "http://127.0.0.1:9750/api/v1/rules",
            }])
        );
    }
}
