//! `alerts:`: how `POST /api/v1/alerts` takes Alertmanager's webhook. The API's bearer token
//! (`http.token`) applies to it as to every route; `secret` adds a Standard Webhooks signature check for
//! senders that sign (Alertmanager itself does not: leave it out for Alertmanager).

use serde::Deserialize;

use super::notify::Secrets;

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// When set, a payload must carry a valid `webhook-signature` by one of these secrets (`whsec_...`),
    /// with a `webhook-timestamp` within five minutes of now.
    pub secret: Option<Secrets>,
}
