//! The notification section, `notify:`: the receivers Vigil sends its decisions and alerts to, and how
//! hard it tries. Delivery itself (the durable outbox, signing, retries) is the healer's `notify` module;
//! this module only reads and checks what the file says.
//!
//! ```yaml
//! notify:
//!   external_url: http://vigil.example:9750    # default http://<http.listen>; links in what is sent
//!   retry: { initial: 500ms, max: 1m }         # exponential backoff with full jitter between attempts
//!   give_up_after: 24h                         # a notification still undelivered then is dropped, counted
//!   timeout: 10s                               # per attempt
//!   receivers:
//!     - name: ops
//!       webhook:
//!         url: http://127.0.0.1:9099/hook
//!         secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw   # or a list: one signature per secret (rotation)
//!         headers: { X-Team: ops }                        # optional, added to every request
//!         # ca_file: /etc/vigil/ca.pem                   # https only: trust these CAs, not the web roots
//!       match: { action: [restart, hibernate, notify], outcome: [succeeded, failed] }   # optional
//!     - name: am
//!       alertmanager: { url: http://127.0.0.1:9093 }      # https:// too; `ca_file` as above
//! ```
//!
//! A receiver's `match` takes a decision when every list it gives contains the decision's value (`rule`
//! and `service` are globs, `action` and `outcome` names); a receiver without `match` gets only what a
//! rule names it for.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::glob::Glob;
use crate::values::{HttpUrl, HumanDuration};

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Headers a receiver's `headers:` may not set: Vigil writes them itself, and a second value would make
/// the request ambiguous or its signature unverifiable.
pub const RESERVED_HEADERS: [&str; 7] = [
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// `notify:`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    pub receivers: Vec<ReceiverConfig>,
    /// Base of the links sent along (`externalURL`, `generatorURL`); `http://<http.listen>` when unset.
    pub external_url: Option<String>,
    pub retry: RetryConfig,
    /// A notification not delivered this long after it was created is dropped (and counted).
    pub give_up_after: HumanDuration,
    /// How long one delivery attempt may take, connecting included.
    pub timeout: HumanDuration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            receivers: Vec::new(),
            external_url: None,
            retry: RetryConfig::default(),
            give_up_after: HumanDuration::from_secs(24 * 3600),
            timeout: HumanDuration::from_secs(10),
        }
    }
}

impl NotifyConfig {
    /// `external_url`, or `http://<listen>` (the API's own address) without one; never with a trailing `/`.
    pub fn external_url_or(&self, listen: SocketAddr) -> String {
        match &self.external_url {
            Some(url) => url.trim().trim_end_matches('/').to_string(),
            None => format!("http://{listen}"),
        }
    }

    /// The receiver called `name`.
    pub fn receiver(&self, name: &str) -> Option<&ReceiverConfig> {
        self.receivers.iter().find(|r| r.name == name)
    }
}

/// Backoff between attempts at one notification: attempt `n` waits a random time in
/// `0..=min(max, initial × 2ⁿ)`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial: HumanDuration(std::time::Duration::from_millis(500)),
            max: HumanDuration::from_secs(60),
        }
    }
}

/// One receiver: a name and exactly one of `webhook:` / `alertmanager:` (checked after reading; see
/// [`ReceiverConfig::kind`]).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub name: String,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    #[serde(default)]
    pub alertmanager: Option<AlertmanagerConfig>,
    #[serde(default, rename = "match")]
    pub matcher: Option<Matcher>,
}

/// What a receiver is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReceiverKind<'a> {
    Webhook(&'a WebhookConfig),
    Alertmanager(&'a AlertmanagerConfig),
}

impl ReceiverConfig {
    /// The receiver's kind; `None` unless exactly one is given, which a loaded config never has.
    pub fn kind(&self) -> Option<ReceiverKind<'_>> {
        match (&self.webhook, &self.alertmanager) {
            (Some(w), None) => Some(ReceiverKind::Webhook(w)),
            (None, Some(a)) => Some(ReceiverKind::Alertmanager(a)),
            _ => None,
        }
    }
}

/// A webhook: an Alertmanager-compatible body, signed with Standard Webhooks.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: HttpUrl,
    pub secret: Secrets,
    /// For an `https://` URL: a PEM file of the CA certificates to trust instead of the built-in web roots
    /// (a receiver with a private CA or a self-signed certificate).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Sent with every request (e.g. an `Authorization` the receiver wants); see [`RESERVED_HEADERS`].
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// An Alertmanager: alerts are posted to `<url>/api/v2/alerts`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    pub url: HttpUrl,
    /// As for a webhook: the CAs to trust for an `https://` URL instead of the built-in web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// One Standard Webhooks signing key: `whsec_` followed by the base64 of 24..=64 random bytes. Its text
/// never appears in `Debug` output or in messages, since configs and their errors end up in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl WebhookSecret {
    /// Reads `whsec_<base64>`; the error says what is wrong without repeating the secret.
    pub fn new(text: &str) -> Result<WebhookSecret, String> {
        let Some(encoded) = text.trim().strip_prefix(SECRET_PREFIX) else {
            return Err(format!(
                "a webhook secret is `{SECRET_PREFIX}` followed by base64 (Standard Webhooks); this one does \
                 not start with `{SECRET_PREFIX}`"
            ));
        };
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("the part of the secret after `{SECRET_PREFIX}` is not base64: {e}"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "the secret decodes to {} bytes; a webhook secret is 24..=64 random bytes",
                key.len()
            ));
        }
        Ok(WebhookSecret { key })
    }

    /// The signing key: the bytes the base64 after `whsec_` stands for.
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret({} bytes, redacted)", self.key.len())
    }
}

/// `secret:` — one secret or a list of them. Every request is signed with each (the `webhook-signature`
/// header then carries one signature per secret), so a receiver can move to a new key while the old
/// one is still accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secrets(Vec<WebhookSecret>);

impl Secrets {
    pub fn new(secrets: Vec<WebhookSecret>) -> Secrets {
        Secrets(secrets)
    }
    pub fn iter(&self) -> impl Iterator<Item = &WebhookSecret> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Secrets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secrets, D::Error> {
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Secrets;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a `whsec_...` secret or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secrets, E> {
                WebhookSecret::new(v).map(|s| Secrets(vec![s])).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Secrets, A::Error> {
                let mut out = Vec::new();
                while let Some(text) = seq.next_element::<String>()? {
                    out.push(WebhookSecret::new(&text).map_err(de::Error::custom)?);
                }
                if out.is_empty() {
                    return Err(de::Error::custom(
                        "an empty list of secrets signs nothing: give at least one",
                    ));
                }
                Ok(Secrets(out))
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

/// An action a matcher can name: the rule language's actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ActionName {
    Hibernate,
    Wake,
    Restart,
    Notify,
    Stop,
    Start,
    Workflow,
}

impl ActionName {
    pub const ALL: [ActionName; 7] = [
        ActionName::Hibernate,
        ActionName::Wake,
        ActionName::Restart,
        ActionName::Notify,
        ActionName::Stop,
        ActionName::Start,
        ActionName::Workflow,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ActionName::Hibernate => "hibernate",
            ActionName::Wake => "wake",
            ActionName::Restart => "restart",
            ActionName::Notify => "notify",
            ActionName::Stop => "stop",
            ActionName::Start => "start",
            ActionName::Workflow => "workflow",
        }
    }
}

/// A decision's outcome as a matcher names it (and as the `outcome` label says it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutcomeName {
    Succeeded,
    Failed,
    Refused,
    DryRun,
}

impl OutcomeName {
    pub const ALL: [OutcomeName; 4] =
        [OutcomeName::Succeeded, OutcomeName::Failed, OutcomeName::Refused, OutcomeName::DryRun];

    pub const fn as_str(self) -> &'static str {
        match self {
            OutcomeName::Succeeded => "succeeded",
            OutcomeName::Failed => "failed",
            OutcomeName::Refused => "refused",
            OutcomeName::DryRun => "dry_run",
        }
    }
}

fn one_of<'de, D: Deserializer<'de>, T: Copy>(
    d: D,
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    all.iter().copied().find(|v| name(*v) == text).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
        de::Error::custom(format!("`{text}` is not {what}: one of {}", names.join(", ")))
    })
}

impl<'de> Deserialize<'de> for ActionName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(d, &ActionName::ALL, ActionName::as_str, "an action")
    }
}

impl<'de> Deserialize<'de> for OutcomeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(d, &OutcomeName::ALL, OutcomeName::as_str, "an outcome")
    }
}

/// `match:` — which decisions a receiver gets besides those its rules name it for. Every list is
/// optional; a decision matches when each list that is given contains it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matcher {
    #[serde(default)]
    pub rule: Option<Vec<Glob>>,
    #[serde(default)]
    pub action: Option<Vec<ActionName>>,
    #[serde(default)]
    pub outcome: Option<Vec<OutcomeName>>,
    #[serde(default)]
    pub service: Option<Vec<Glob>>,
}

impl Matcher {
    /// Whether a decision of `rule` doing `action` to an instance of `service`, ending in `outcome`
    /// (`succeeded`, `failed`, `refused`, `dry_run`), matches.
    pub fn matches(&self, rule: &str, action: &str, outcome: &str, service: &str) -> bool {
        let globs = |list: &Option<Vec<Glob>>, value: &str| {
            list.as_ref().is_none_or(|l| l.iter().any(|g| g.matches(value)))
        };
        globs(&self.rule, rule)
            && globs(&self.service, service)
            && self.action.as_ref().is_none_or(|l| l.iter().any(|a| a.as_str() == action))
            && self.outcome.as_ref().is_none_or(|l| l.iter().any(|o| o.as_str() == outcome))
    }

    /// The keys whose list is given but empty: such a matcher matches nothing, which is never meant.
    pub fn empty_lists(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.rule.as_ref().is_some_and(Vec::is_empty) {
            out.push("rule");
        }
        if self.action.as_ref().is_some_and(Vec::is_empty) {
            out.push("action");
        }
        if self.outcome.as_ref().is_some_and(Vec::is_empty) {
            out.push("outcome");
        }
        if self.service.as_ref().is_some_and(Vec::is_empty) {
            out.push("service");
        }
        out
    }
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Every mistake in `notify:` that no single value can see, as `(key path below notify, message)`.
/// `written(path)` tells whether the file writes that key (below `notify`): a value refused as it was
/// read is left out and reported already, so what its absence would imply is not reported again.
pub fn notify_mistakes(n: &NotifyConfig, written: &dyn Fn(&str) -> bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut at = |path: String, message: String| out.push((path, message));
    if n.retry.initial.0.is_zero() {
        at("retry.initial".into(), "must be above 0".into());
    }
    if n.retry.max < n.retry.initial {
        at(
            "retry.max".into(),
            format!("{} is shorter than notify.retry.initial ({})", n.retry.max, n.retry.initial),
        );
    }
    if n.timeout.0.is_zero() {
        at("timeout".into(), "must be above 0".into());
    }
    if n.give_up_after.0.is_zero() {
        at("give_up_after".into(), "must be above 0".into());
    }
    if let Some(url) = &n.external_url {
        let u = url.trim();
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|s| u.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)) && u.len() > s.len());
        if !scheme_ok || u.chars().any(char::is_whitespace) {
            at("external_url".into(), format!("{url:?} is not a URL like http://vigil.example:9750"));
        }
    }
    let mut first_by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, r) in n.receivers.iter().enumerate() {
        let p = format!("receivers[{i}]");
        if r.name.is_empty() || r.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            at(
                format!("{p}.name"),
                format!("{:?}: a receiver name must be non-empty, without whitespace", r.name),
            );
        } else if let Some(first) = first_by_name.get(r.name.as_str()) {
            at(
                format!("{p}.name"),
                format!("receiver `{}` is declared twice (first as notify.receivers[{first}])", r.name),
            );
        } else {
            first_by_name.insert(&r.name, i);
        }
        match (&r.webhook, &r.alertmanager) {
            (None, None) if !written(&format!("{p}.webhook")) && !written(&format!("{p}.alertmanager")) => {
                at(p.clone(), "a receiver needs one of `webhook:` or `alertmanager:`".into())
            }
            (Some(_), Some(_)) => at(
                format!("{p}.alertmanager"),
                "a receiver is either `webhook:` or `alertmanager:`, not both: declare two receivers".into(),
            ),
            _ => {}
        }
        let urls = [
            r.webhook.as_ref().map(|w| ("webhook", &w.url, &w.ca_file)),
            r.alertmanager.as_ref().map(|a| ("alertmanager", &a.url, &a.ca_file)),
        ];
        for (kind, url, ca_file) in urls.into_iter().flatten() {
            if ca_file.is_some() && !url.is_https() {
                at(
                    format!("{p}.{kind}.ca_file"),
                    format!("a CA file is for https:// URLs; `{url}` is plain http"),
                );
            }
        }
        if let Some(w) = &r.webhook {
            for (name, value) in &w.headers {
                let path = format!("{p}.webhook.headers.{name}");
                if !is_header_name(name) {
                    at(path, format!("{name:?} is not an HTTP header name"));
                } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                    at(path, format!("`{name}` is set by Vigil itself and cannot be configured"));
                } else if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                    at(path, format!("the value of `{name}` has control characters"));
                }
            }
        }
        if let Some(m) = &r.matcher {
            // A list whose every item was refused reads as empty; the items are reported already.
            let refused_items = |key: &str| written(&format!("{p}.match.{key}[0]"));
            for key in m.empty_lists().into_iter().filter(|k| !refused_items(k)) {
                at(
                    format!("{p}.match.{key}"),
                    format!("an empty list matches nothing: leave `{key}` out to match every {key}"),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_read_and_refuse_without_repeating_themselves() {
        let s = WebhookSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(s.key().len(), 24);
        assert_eq!(format!("{s:?}"), "WebhookSecret(24 bytes, redacted)");
        let short = WebhookSecret::new("whsec_c2hvcnQ=").unwrap_err();
        assert_eq!(short, "the secret decodes to 5 bytes; a webhook secret is 24..=64 random bytes");
        assert!(!WebhookSecret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err().contains("MfKQ"));
        assert!(WebhookSecret::new("whsec_!!!!").unwrap_err().starts_with("the part of the secret after"));
    }

    #[test]
    fn a_matcher_takes_what_every_given_list_contains() {
        let m = Matcher {
            rule: Some(vec![Glob::new("tell-*").unwrap()]),
            action: Some(vec![ActionName::Restart]),
            outcome: None,
            service: None,
        };
        assert!(m.matches("tell-ops", "restart", "failed", "echo"));
        assert!(!m.matches("tell-ops", "hibernate", "failed", "echo"));
        assert!(!m.matches("idle", "restart", "failed", "echo"));
        assert!(Matcher::default().matches("any", "wake", "dry_run", "x"));
        let by_outcome = Matcher { outcome: Some(vec![OutcomeName::DryRun]), ..Matcher::default() };
        assert!(by_outcome.matches("r", "wake", "dry_run", "s"));
        assert!(!by_outcome.matches("r", "wake", "succeeded", "s"));
    }
}
