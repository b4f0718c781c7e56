//! Durable outgoing notifications: decisions and rule conditions sent to the receivers of `notify:`
//! (a signed webhook, or an Alertmanager), at least once, in order, surviving restarts.
//!
//! # Routing
//!
//! A decision goes to the receivers its rule names (always), plus every receiver whose `match` takes it
//! (each list it gives contains the decision's rule, action, outcome or service; see
//! [`vigil_core::config::Matcher`]). A receiver without `match` gets only what rules name it for. Each
//! receiver gets a decision once, however many ways lead to it ([`Notifier::routes`]).
//!
//! # What is sent
//!
//! A [`Notice`]: one alert with labels (`alertname` = the rule, `rule`, `action`, `outcome`, `service`,
//! `instance_id`, `severity`, and the rule's labels) and annotations (`summary`, `description`, `decision`),
//! made by [`Notice::for_decision`]; a decision is an event that ends five minutes after it was made. A
//! `notify` rule's condition is [`Notice::firing`] while it holds and [`Notice::resolved`] when it ends,
//! both with the same labels (so the same fingerprint). Webhooks get an Alertmanager v4 body with one alert
//! per message, signed with Standard Webhooks (`webhook`); Alertmanagers get `POST /api/v2/alerts`, with
//! open alerts re-posted every minute until resolved (`alertmanager`). Both take `http://` and `https://`
//! URLs; https trusts Mozilla's roots (built in) or the receiver's `ca_file` (`http`).
//!
//! # Durability and order
//!
//! A notice is queued in the outbox (`outbox`), tables in the audit log's redb database, either in the
//! transaction of the decision it is about ([`Notifier::enqueue_in`] inside
//! [`crate::audit::AuditLog::append_with`]) or on its own ([`Notifier::enqueue`]); then [`Notifier::wake`].
//! One delivery task per receiver ([`Notifier::spawn`]) sends its queue oldest first, one at a time: the
//! head is retried (exponential backoff with full jitter, `notify.retry`) until it is delivered (2xx), and
//! nothing behind it is sent before it, so a receiver that comes back after an hour gets the whole
//! backlog in order. 408, 429, 5xx, timeouts and connection errors are retried; any other answer drops
//! the notice (logged and counted), as does age beyond `notify.give_up_after`. An entry leaves the
//! outbox only after its delivery, so a stop or a crash at any point loses nothing; it can at worst send
//! one again, with the same `webhook-id` (receivers deduplicate by it).
//!
//! # Use
//!
//! ```ignore
//! let notifier = Notifier::open(audit.clone(), &config.notify, &config.notify.external_url_or(listen))?;
//! let task = notifier.spawn(stop_rx);
//! // on a decision (on the blocking pool):
//! let receivers = notifier.routes(&decision, &rule_receivers);
//! audit.append_with(&decision, |tx, _seq| {
//!     let notice = Notice::for_decision(&decision, &rule_labels);
//!     receivers.iter().try_for_each(|r| notifier.enqueue_in(tx, r, &notice).map(drop))
//! })?;
//! notifier.wake();
//! ```
//!
//! Metrics: see `metrics` ([`NotifyMetrics::register`]).

mod alertmanager;
mod backoff;
mod http;
mod metrics;
mod notice;
pub mod outbox;
mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::{HeaderName, HeaderValue, Uri};
use bytes::Bytes;
use redb::{Database, WriteTransaction};
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tokio::task::JoinHandle;
use vigil_core::config::{Matcher, NotifyConfig, ReceiverKind, Secrets};
use vigil_core::values::HttpUrl;

pub use self::alertmanager::{OPEN_ALERT_LEASE, REFRESH_EVERY};
pub use self::backoff::{ceiling as backoff_ceiling, delay as backoff_delay};
pub use self::http::{Answer, Class, classify};
pub use self::metrics::NotifyMetrics;
pub use self::notice::{
    EVENT_LASTS_MS, IDENTITY_LABELS, Notice, NoticeKind, NoticeStatus, OPEN_END, fingerprint, outcome_name,
    rfc3339,
};
pub use self::outbox::OutboxError;
pub use self::webhook::{body as webhook_body, signature as webhook_signature, verify as verify_webhook};

use self::http::{Poster, Trust};
use self::outbox::Entry;
use crate::audit::{AuditError, AuditLog};
use crate::engine::Decision;

/// Entries read from a queue at once; they are still sent one by one, in order.
const BATCH: usize = 64;

/// A non-durable removal is followed by a durable commit at least this often, which bounds what a crash
/// can send twice.
const DURABLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification outbox in {path}: {source}")]
    Outbox { path: PathBuf, source: OutboxError },
    #[error("no receiver `{name}` in notify.receivers")]
    UnknownReceiver { name: String },
    #[error("receiver `{name}`: {reason}")]
    Receiver { name: String, reason: String },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the outbox's blocking task failed: {0}")]
    Blocking(String),
}

enum Target {
    /// Signed Alertmanager-style webhook; the extra headers are the configured ones.
    Webhook {
        secrets: Secrets,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Alertmanager,
}

struct Receiver {
    name: String,
    /// Its own client: receivers may trust different CAs.
    poster: Poster,
    target: Target,
    matcher: Option<Matcher>,
    uri: Uri,
    /// Told after a commit that queued something for this receiver.
    wake: Notify,
    /// Alertmanager: one post at a time, so a re-post of an open alert read before its resolution cannot
    /// land after the resolution's delivery.
    posting: AsyncMutex<()>,
}

struct Inner {
    audit: Arc<AuditLog>,
    receivers: Vec<Receiver>,
    external_url: String,
    retry_initial: Duration,
    retry_max: Duration,
    give_up_after: Duration,
    metrics: NotifyMetrics,
}

/// The notification outbox and its delivery. Cheap to clone (shared).
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

fn uri_of(name: &str, url: &HttpUrl) -> Result<Uri, NotifyError> {
    let text = url.full();
    text.parse().map_err(|e| NotifyError::Receiver { name: name.into(), reason: format!("URL {text}: {e}") })
}

/// The receivers of `receivers` (name, matcher) a decision goes to: those in `named`, and those whose
/// matcher takes it; each once, in the order of `receivers`.
pub fn route<'a>(
    receivers: impl IntoIterator<Item = (&'a str, Option<&'a Matcher>)>,
    d: &Decision,
    named: &[&str],
) -> Vec<String> {
    let outcome = outcome_name(&d.outcome);
    receivers
        .into_iter()
        .filter(|(name, matcher)| {
            named.contains(name) || matcher.is_some_and(|m| m.matches(&d.rule, d.action, outcome, &d.service))
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

impl Notifier {
    /// The receivers of `config`, their queues in `audit`'s database (created if new). Blocking (it
    /// reads and may write the database). `external_url` is the base of the links sent along.
    pub fn open(
        audit: Arc<AuditLog>,
        config: &NotifyConfig,
        external_url: &str,
    ) -> Result<Notifier, NotifyError> {
        let mut receivers = Vec::new();
        for r in &config.receivers {
            let (target, url, ca_file) = match r.kind() {
                Some(ReceiverKind::Webhook(w)) => {
                    let mut headers = Vec::new();
                    for (k, v) in &w.headers {
                        let bad = |e: &dyn std::fmt::Display| NotifyError::Receiver {
                            name: r.name.clone(),
                            reason: format!("header {k}: {e}"),
                        };
                        let name = HeaderName::try_from(k.as_str()).map_err(|e| bad(&e))?;
                        let value = HeaderValue::try_from(v.as_str()).map_err(|e| bad(&e))?;
                        headers.push((name, value));
                    }
                    (Target::Webhook { secrets: w.secret.clone(), headers }, w.url.clone(), &w.ca_file)
                }
                Some(ReceiverKind::Alertmanager(a)) => {
                    (Target::Alertmanager, a.url.join("/api/v2/alerts"), &a.ca_file)
                }
                None => {
                    return Err(NotifyError::Receiver {
                        name: r.name.clone(),
                        reason: "is neither a webhook nor an alertmanager".into(),
                    });
                }
            };
            let trust = ca_file.clone().map_or(Trust::WebRoots, Trust::CaFile);
            let poster = Poster::new(config.timeout.0, &trust)
                .map_err(|reason| NotifyError::Receiver { name: r.name.clone(), reason })?;
            receivers.push(Receiver {
                name: r.name.clone(),
                poster,
                uri: uri_of(&r.name, &url)?,
                target,
                matcher: r.matcher.clone(),
                wake: Notify::new(),
                posting: AsyncMutex::new(()),
            });
        }
        let inner = Inner {
            receivers,
            external_url: external_url.trim_end_matches('/').to_string(),
            retry_initial: config.retry.initial.0,
            retry_max: config.retry.max.0,
            give_up_after: config.give_up_after.0,
            metrics: NotifyMetrics::default(),
            audit,
        };
        let db = inner.audit.database();
        outbox::create(&db).map_err(|e| inner.outbox_err(e))?;
        for r in &inner.receivers {
            inner.metrics.declare(&r.name);
        }
        for (name, n) in outbox::counts(&db).map_err(|e| inner.outbox_err(e))? {
            if inner.receiver(&name).is_none() {
                // Kept, not dropped: the receiver may be back in the next config.
                tracing::warn!(receiver = %name, queued = n, "notifications queued for a receiver no longer configured");
            }
            inner.metrics.set_queued(&name, n);
        }
        Ok(Notifier { inner: Arc::new(inner) })
    }

    /// The configured receivers' names, in config order.
    pub fn receivers(&self) -> Vec<&str> {
        self.inner.receivers.iter().map(|r| r.name.as_str()).collect()
    }

    /// The receivers decision `d` goes to: those its rule names (`named`), and those whose `match` takes
    /// it; each once, in config order. A named receiver that is not configured is left out (and logged).
    pub fn routes(&self, d: &Decision, named: &[&str]) -> Vec<String> {
        for name in named {
            if self.inner.receiver(name).is_none() {
                tracing::warn!(rule = %d.rule, receiver = %name, "a rule names a receiver that is not configured");
            }
        }
        route(self.inner.receivers.iter().map(|r| (r.name.as_str(), r.matcher.as_ref())), d, named)
    }

    /// Queues `notice` for `receiver` in the caller's transaction (typically the decision's own, in
    /// [`AuditLog::append_with`]); returns its message id. Call [`Notifier::wake`] after the commit.
    pub fn enqueue_in(
        &self,
        tx: &WriteTransaction,
        receiver: &str,
        notice: &Notice,
    ) -> Result<String, NotifyError> {
        let r = self
            .inner
            .receiver(receiver)
            .ok_or_else(|| NotifyError::UnknownReceiver { name: receiver.into() })?;
        let keeps_open = matches!(r.target, Target::Alertmanager);
        outbox::push(tx, receiver, notice, keeps_open).map_err(|e| self.inner.outbox_err(e))
    }

    /// Queues each `(receiver, notice)` in one transaction of its own, durably, then wakes the delivery
    /// tasks; returns the message ids. Blocking: call it on the blocking pool.
    pub fn enqueue(&self, items: &[(String, Notice)]) -> Result<Vec<String>, NotifyError> {
        let db = self.inner.audit.database();
        let tx = db.begin_write().map_err(|e| self.inner.store_err(e))?;
        let mut ids = Vec::with_capacity(items.len());
        for (receiver, notice) in items {
            ids.push(self.enqueue_in(&tx, receiver, notice)?);
        }
        tx.commit().map_err(|e| self.inner.store_err(e))?;
        self.wake();
        Ok(ids)
    }

    /// Tells the delivery tasks to look at their queues now (after a commit that queued something).
    pub fn wake(&self) {
        for r in &self.inner.receivers {
            // `notify_one` keeps a permit when the task is busy, so a wake is never lost.
            r.wake.notify_one();
        }
    }

    /// Starts one delivery task per receiver (and, for an Alertmanager, the re-posting of its open alerts).
    /// They run until `stop` turns true (or its sender is dropped); the handle ends when all have, after a
    /// durable commit of the last deliveries.
    pub fn spawn(&self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let mut tasks = Vec::new();
        for i in 0..self.inner.receivers.len() {
            tasks.push(tokio::spawn(deliver(self.inner.clone(), i, stop.clone())));
            if matches!(self.inner.receivers[i].target, Target::Alertmanager) {
                tasks.push(tokio::spawn(refresh_open_alerts(self.inner.clone(), i, stop.clone())));
            }
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            for t in tasks {
                if let Err(e) = t.await {
                    tracing::error!(error = %e, "a notification task failed");
                }
            }
            if let Err(e) = inner.blocking(outbox::flush).await {
                tracing::error!(error = %e, "cannot flush the notification outbox");
            }
        })
    }

    /// Notifications waiting, per configured receiver (0 included), read from the outbox now; blocking (a
    /// read transaction). On a read error: the delivery tasks' latest counts.
    pub fn queued(&self) -> BTreeMap<String, usize> {
        let counts = outbox::counts(&self.inner.audit.database()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the outbox's counts");
            self.inner.metrics.queued()
        });
        let mut out: BTreeMap<String, usize> =
            self.inner.receivers.iter().map(|r| (r.name.clone(), 0)).collect();
        for (name, n) in counts {
            out.insert(name, usize::try_from(n).unwrap_or(usize::MAX));
        }
        out
    }

    /// The notification metrics (register them with [`NotifyMetrics::register`]).
    pub fn metrics(&self) -> &NotifyMetrics {
        &self.inner.metrics
    }
}

impl Inner {
    fn receiver(&self, name: &str) -> Option<&Receiver> {
        self.receivers.iter().find(|r| r.name == name)
    }

    fn outbox_err(&self, source: OutboxError) -> NotifyError {
        NotifyError::Outbox { path: self.audit.path().to_path_buf(), source }
    }

    fn store_err(&self, e: impl Into<redb::Error>) -> NotifyError {
        self.outbox_err(OutboxError::Store(Box::new(e.into())))
    }

    /// Runs `f` on the database on the blocking pool.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Database) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, NotifyError> {
        let inner = self.clone();
        match tokio::task::spawn_blocking(move || f(&inner.audit.database()).map_err(|e| inner.outbox_err(e)))
            .await
        {
            Ok(result) => result,
            Err(e) => Err(NotifyError::Blocking(e.to_string())),
        }
    }
}

/// Resolves when `stop` turns true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What one entry's delivery ended in.
enum Done {
    /// It left the queue (delivered or dropped).
    Removed,
    /// The outbox could not be written: read the queue again after a pause.
    StoreFailed,
    Stopped,
}

/// One receiver's delivery task: its queue, oldest first, strictly one after another.
async fn deliver(inner: Arc<Inner>, index: usize, mut stop: watch::Receiver<bool>) {
    let r = &inner.receivers[index];
    let mut last_durable = Instant::now();
    let mut store_failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let name = r.name.clone();
        let entries = match inner.blocking(move |db| outbox::front(db, &name, BATCH)).await {
            Ok((entries, queued)) => {
                inner.metrics.set_queued(&r.name, queued);
                store_failures = 0;
                entries
            }
            Err(e) => {
                // The database is unusable for now: read again after a growing pause.
                tracing::error!(receiver = %r.name, error = %e, "cannot read the notification outbox");
                store_failures = store_failures.saturating_add(1);
                let pause = backoff::ceiling(store_failures, inner.retry_initial, inner.retry_max);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopped(&mut stop) => return,
                }
                continue;
            }
        };
        if entries.is_empty() {
            tokio::select! {
                _ = r.wake.notified() => {}
                _ = stopped(&mut stop) => return,
            }
            continue;
        }
        for entry in entries {
            match deliver_one(&inner, r, entry, &mut stop, &mut last_durable).await {
                Done::Removed => {}
                Done::Stopped => return,
                Done::StoreFailed => {
                    tokio::select! {
                        _ = tokio::time::sleep(inner.retry_initial) => {}
                        _ = stopped(&mut stop) => return,
                    }
                    break;
                }
            }
        }
    }
}

/// Removes entry `seq` from `r`'s queue (durably at least every [`DURABLE_EVERY`]).
async fn remove(inner: &Arc<Inner>, r: &Receiver, seq: u64, last_durable: &mut Instant) -> Done {
    let durable = last_durable.elapsed() >= DURABLE_EVERY;
    let name = r.name.clone();
    match inner.blocking(move |db| outbox::remove(db, &name, seq, durable)).await {
        Ok(left) => {
            if durable {
                *last_durable = Instant::now();
            }
            inner.metrics.set_queued(&r.name, left);
            Done::Removed
        }
        Err(e) => {
            tracing::error!(receiver = %r.name, seq, error = %e, "cannot remove a delivered notification");
            Done::StoreFailed
        }
    }
}

/// One attempt at `q` for `r`.
async fn attempt(inner: &Inner, r: &Receiver, q: &outbox::Queued, webhook_body: &Bytes) -> Answer {
    let now = notice::now_ms();
    match &r.target {
        Target::Webhook { secrets, headers } => {
            let timestamp = now / 1000;
            let mut all = Vec::with_capacity(headers.len() + 3);
            let signature = webhook::signature(secrets, &q.id, timestamp, webhook_body);
            for (name, value) in [
                ("webhook-id", q.id.clone()),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signature),
            ] {
                // Ids, digits and base64 are always valid header values.
                if let Ok(v) = HeaderValue::try_from(value) {
                    all.push((HeaderName::from_static(name), v));
                }
            }
            all.extend(headers.iter().cloned());
            r.poster.post(&r.uri, &all, webhook_body.clone()).await
        }
        Target::Alertmanager => {
            let _one_at_a_time = r.posting.lock().await;
            let body = alertmanager::body(&[&q.notice], &inner.external_url, now);
            r.poster.post(&r.uri, &[], Bytes::from(body)).await
        }
    }
}

/// Delivers (or drops) one entry, retrying it until then.
async fn deliver_one(
    inner: &Arc<Inner>,
    r: &Receiver,
    entry: Entry,
    stop: &mut watch::Receiver<bool>,
    last_durable: &mut Instant,
) -> Done {
    let q = match entry {
        Entry::Notice(q) => q,
        Entry::Undecodable { seq, error } => {
            tracing::error!(receiver = %r.name, seq, error = %error, "dropping an outbox entry that does not decode");
            inner.metrics.dropped(&r.name, "undecodable");
            return remove(inner, r, seq, last_durable).await;
        }
    };
    let webhook_body = match r.target {
        Target::Webhook { .. } => Bytes::from(webhook::body(&r.name, &q.notice, &inner.external_url)),
        Target::Alertmanager => Bytes::new(),
    };
    let mut failures = 0u32;
    loop {
        let age_ms = notice::now_ms().saturating_sub(q.notice.created_ms);
        if age_ms > inner.give_up_after.as_millis() as u64 {
            tracing::error!(receiver = %r.name, id = %q.id, alert = q.notice.alertname(), age_s = age_ms / 1000,
                failures, "dropping a notification older than notify.give_up_after");
            inner.metrics.dropped(&r.name, "expired");
            return remove(inner, r, q.seq, last_durable).await;
        }
        // A stop during the attempt abandons it: the entry stays queued (it may have arrived: then it is
        // sent again after the restart, with the same id).
        let answer = tokio::select! {
            a = attempt(inner, r, &q, &webhook_body) => a,
            _ = stopped(stop) => return Done::Stopped,
        };
        match answer {
            Answer::Delivered { .. } => {
                let seconds = notice::now_ms().saturating_sub(q.notice.created_ms) as f64 / 1000.0;
                inner.metrics.sent(&r.name, seconds);
                return remove(inner, r, q.seq, last_durable).await;
            }
            Answer::Rejected { status, body } => {
                inner.metrics.failed(&r.name);
                inner.metrics.dropped(&r.name, "rejected");
                tracing::error!(receiver = %r.name, id = %q.id, alert = q.notice.alertname(), status,
                    body = %body.trim(), "the receiver refused a notification; dropping it");
                return remove(inner, r, q.seq, last_durable).await;
            }
            Answer::Retry { reason } => {
                inner.metrics.failed(&r.name);
                let wait =
                    backoff::delay(failures, inner.retry_initial, inner.retry_max, rand::random::<f64>());
                tracing::warn!(receiver = %r.name, id = %q.id, attempt = failures + 1, %reason,
                    retry_in_ms = wait.as_millis() as u64, "notification not delivered; will retry");
                failures = failures.saturating_add(1);
                let until = tokio::time::Instant::now() + wait;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        // New entries behind the head: only the gauge changes; the head keeps its backoff.
                        _ = r.wake.notified() => {
                            let name = r.name.clone();
                            if let Ok(n) = inner.blocking(move |db| outbox::count(db, &name)).await {
                                inner.metrics.set_queued(&r.name, n);
                            }
                        }
                        _ = stopped(stop) => return Done::Stopped,
                    }
                }
            }
        }
    }
}

/// Re-posts an Alertmanager receiver's open alerts every [`REFRESH_EVERY`] (and once at the start, which
/// after a restart renews what was open before it), best effort: a failure waits for the next round.
async fn refresh_open_alerts(inner: Arc<Inner>, index: usize, mut stop: watch::Receiver<bool>) {
    let r = &inner.receivers[index];
    let mut every = tokio::time::interval(REFRESH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let _one_at_a_time = r.posting.lock().await;
        let name = r.name.clone();
        let open = match inner.blocking(move |db| outbox::open_alerts(db, &name)).await {
            Ok(open) if open.is_empty() => continue,
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(receiver = %r.name, error = %e, "cannot read the open alerts");
                continue;
            }
        };
        let body =
            alertmanager::body(&open.iter().collect::<Vec<_>>(), &inner.external_url, notice::now_ms());
        let answer = tokio::select! {
            a = r.poster.post(&r.uri, &[], Bytes::from(body)) => a,
            _ = stopped(&mut stop) => return,
        };
        match answer {
            Answer::Delivered { .. } => {
                tracing::debug!(receiver = %r.name, alerts = open.len(), "open alerts renewed")
            }
            other => {
                tracing::warn!(receiver = %r.name, alerts = open.len(), answer = ?other, "cannot renew open alerts")
            }
        }
    }
}

#[cfg(test)]
mod tests;
