//! Vigil's own alerts, out: which notifications a decision makes and who gets them, and the `notify`
//! rules' alerts kept from firing to resolved.
//!
//! - Every decision is recorded in the audit log together with its notifications, in one redb transaction
//!   ([`Alerting::record`]): a decision is never audited without its notifications queued, nor the reverse.
//! - Who gets a decision ([`crate::notify::Notifier::routes`]): the receivers its rule names, and every
//!   receiver whose `match` takes it. What they get is the decision as an event
//!   ([`Notice::for_decision`]), except for a `notify` rule that succeeded: that is its condition's alert,
//!   [`Notice::firing`], recorded as firing (table `notify_firing`, beside the outbox) with the receivers
//!   it went to. A `notify` decision that did not go out (dry run) reaches only the receivers whose `match`
//!   takes it, as an event.
//! - When the rule's conditions end ([`crate::rules::Ended`]), [`Alerting::resolve`] sends
//!   [`Notice::resolved`] (the same labels, so the same fingerprint, and the same start) to the receivers
//!   that got it firing, and forgets it.
//! - The firing alerts survive a restart: [`Alerting::firing`] hands them back to the rule engine, which
//!   resolves them when their conditions are seen not to hold, or their rule is gone.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditError, AuditLog};
use crate::engine::{Decision, Outcome};
use crate::notify::{Notice, Notifier, NotifyError};
use crate::rules::{Action, Ended, RuleNotify};

/// `rule NUL instance_id` → [`FiringRecord`] as JSON.
const FIRING: TableDefinition<&str, &[u8]> = TableDefinition::new("notify_firing");

#[derive(Debug, thiserror::Error)]
pub enum AlertingError {
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Notify(#[from] NotifyError),
    #[error("the firing notify alerts ({path}): {source}")]
    Store { path: String, source: Box<redb::Error> },
    #[error("a firing notify alert does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A `notify` rule's alert that went out and has not resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct FiringRecord {
    rule: String,
    service: String,
    instance_id: String,
    started_ms: u64,
    /// Who got it firing, and so gets its resolution.
    receivers: Vec<String>,
    /// The rule's labels when it fired (the resolution must carry the same).
    labels: BTreeMap<String, String>,
}

fn key(rule: &str, instance_id: &str) -> String {
    format!("{rule}\0{instance_id}")
}

/// The decisions' and the notify rules' way out to the receivers.
pub struct Alerting {
    audit: Arc<AuditLog>,
    notifier: Notifier,
}

impl Alerting {
    pub fn new(audit: Arc<AuditLog>, notifier: Notifier) -> Alerting {
        Alerting { audit, notifier }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    fn store_err(&self, e: impl Into<redb::Error>) -> AlertingError {
        AlertingError::Store { path: self.audit.path().display().to_string(), source: Box::new(e.into()) }
    }

    /// Records `decision` in the audit log with the notifications it makes, in one transaction; returns its
    /// sequence number. Blocks on the database.
    pub fn record(&self, decision: &Decision, rule: &RuleNotify) -> Result<u64, AlertingError> {
        let fired = decision.action == Action::Notify.as_str()
            && matches!(decision.outcome, Outcome::Succeeded { .. });
        let named: Vec<&str> = if decision.action == Action::Notify.as_str() && !fired {
            Vec::new()
        } else {
            rule.receivers.iter().map(|r| &**r).collect()
        };
        let receivers = self.notifier.routes(decision, &named);
        let notice = if fired {
            Notice::firing(
                &decision.rule,
                &decision.service,
                &decision.instance_id,
                &rule.labels,
                decision.unix_ms,
            )
        } else {
            Notice::for_decision(decision, &rule.labels)
        };
        let seq =
            self.audit.append_with(decision, |tx: &WriteTransaction, _seq| -> Result<(), AlertingError> {
                if fired {
                    let mut table = tx.open_table(FIRING).map_err(|e| self.store_err(e))?;
                    let k = key(&decision.rule, &decision.instance_id);
                    if table.get(k.as_str()).map_err(|e| self.store_err(e))?.is_some() {
                        // Still firing from before (a restart or a reload proposed it again): said already.
                        return Ok(());
                    }
                    let record = FiringRecord {
                        rule: decision.rule.clone(),
                        service: decision.service.clone(),
                        instance_id: decision.instance_id.clone(),
                        started_ms: decision.unix_ms,
                        receivers: receivers.clone(),
                        labels: rule.labels.clone(),
                    };
                    let bytes = serde_json::to_vec(&record)?;
                    table.insert(k.as_str(), bytes.as_slice()).map_err(|e| self.store_err(e))?;
                }
                for r in &receivers {
                    self.notifier.enqueue_in(tx, r, &notice)?;
                }
                Ok(())
            })?;
        if !receivers.is_empty() {
            self.notifier.wake();
        }
        Ok(seq)
    }

    /// Sends the resolution of each ended alert that went out, and forgets it. Blocks on the database.
    pub fn resolve(&self, ended: &[Ended]) -> Result<usize, AlertingError> {
        if ended.is_empty() {
            return Ok(0);
        }
        let known = self.notifier.receivers().into_iter().map(str::to_string).collect::<Vec<_>>();
        let db = self.audit.database();
        let tx = db.begin_write().map_err(|e| self.store_err(e))?;
        let mut resolved = 0;
        {
            let mut table = tx.open_table(FIRING).map_err(|e| self.store_err(e))?;
            let now = vigil_core::time::now_unix_ms();
            for e in ended {
                let removed =
                    table.remove(key(&e.rule, &e.instance_id).as_str()).map_err(|e| self.store_err(e))?;
                let Some(bytes) = removed else { continue };
                let record: FiringRecord = serde_json::from_slice(bytes.value())?;
                drop(bytes);
                let notice = Notice::resolved(
                    &record.rule,
                    &record.service,
                    &record.instance_id,
                    &record.labels,
                    record.started_ms,
                    now.max(record.started_ms),
                );
                for r in record.receivers.iter().filter(|r| known.contains(r)) {
                    self.notifier.enqueue_in(&tx, r, &notice)?;
                }
                resolved += 1;
            }
        }
        tx.commit().map_err(|e| self.store_err(e))?;
        if resolved > 0 {
            self.notifier.wake();
        }
        Ok(resolved)
    }

    /// The notify alerts that went out and have not resolved, for the rule engine at start.
    pub fn firing(&self) -> Result<Vec<Ended>, AlertingError> {
        let db = self.audit.database();
        let tx = db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match tx.open_table(FIRING) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.store_err(e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.store_err(e))? {
            let (_, v) = entry.map_err(|e| self.store_err(e))?;
            let r: FiringRecord = serde_json::from_slice(v.value())?;
            out.push(Ended {
                rule: Arc::from(r.rule.as_str()),
                service: Arc::from(r.service.as_str()),
                instance_id: Arc::from(r.instance_id.as_str()),
                notify: Arc::new(RuleNotify {
                    receivers: r.receivers.iter().map(|x| Arc::from(x.as_str())).collect(),
                    labels: r.labels,
                }),
            });
        }
        Ok(out)
    }
}
