//! The outbox: notifications waiting for delivery, in tables of the audit log's redb database, so a
//! decision and its notifications are committed together or not at all, and nothing queued is lost by a
//! restart or a crash.
//!
//! Tables:
//! - `notify_outbox`: `(receiver, seq) → {"id", "notice"}` JSON. `seq` is global and only grows, so each
//!   receiver's keys are its queue in order; an entry is removed once delivered (or dropped).
//! - `notify_queued`: `receiver → entries in its queue`, kept in the same transactions (the queued gauge,
//!   correct after a restart without counting the queue).
//! - `notify_meta`: `next_seq`, and `nonce`: a random number drawn when the outbox is first used, part of
//!   every message id, so ids stay unique even if the database is deleted and seq starts again.
//! - `notify_open_alerts`: `(receiver, fingerprint) → notice` JSON: the firing conditions an Alertmanager
//!   receiver re-posts until they are resolved.
//!
//! A message id is `msg_<nonce as 16 hex><seq as 16 hex>`: fixed when queued, the same on every attempt.

use std::collections::BTreeMap;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::notice::{Notice, NoticeKind, NoticeStatus};

const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("notify_outbox");
const QUEUED: TableDefinition<&str, u64> = TableDefinition::new("notify_queued");
const META: TableDefinition<&str, u64> = TableDefinition::new("notify_meta");
const OPEN_ALERTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("notify_open_alerts");

/// Why the outbox could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Store(#[from] Box<redb::Error>),
    #[error("encoding a notification: {0}")]
    Encode(#[from] serde_json::Error),
}

fn store(e: impl Into<redb::Error>) -> OutboxError {
    OutboxError::Store(Box::new(e.into()))
}

#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    notice: Notice,
}

/// One queued notification.
#[derive(Clone, Debug, PartialEq)]
pub struct Queued {
    pub seq: u64,
    /// The `webhook-id`.
    pub id: String,
    pub notice: Notice,
}

/// An entry at the front of a queue: a notification, or bytes that no longer decode as one (they are
/// dropped, or they would block the queue forever).
#[derive(Debug)]
pub enum Entry {
    Notice(Queued),
    Undecodable { seq: u64, error: String },
}

impl Entry {
    pub fn seq(&self) -> u64 {
        match self {
            Entry::Notice(q) => q.seq,
            Entry::Undecodable { seq, .. } => *seq,
        }
    }
}

/// Creates the tables, so that readers never meet a missing one.
pub fn create(db: &Database) -> Result<(), OutboxError> {
    let tx = db.begin_write().map_err(store)?;
    tx.open_table(OUTBOX).map_err(store)?;
    tx.open_table(QUEUED).map_err(store)?;
    tx.open_table(META).map_err(store)?;
    tx.open_table(OPEN_ALERTS).map_err(store)?;
    tx.commit().map_err(store)
}

/// Queues `notice` for `receiver` in `tx`; returns its message id. `keeps_open_alerts`: the receiver
/// re-posts firing conditions (Alertmanager), so a firing condition joins its open set and a resolved one
/// leaves it, in the same transaction.
pub fn push(
    tx: &WriteTransaction,
    receiver: &str,
    notice: &Notice,
    keeps_open_alerts: bool,
) -> Result<String, OutboxError> {
    let (seq, nonce) = {
        let mut meta = tx.open_table(META).map_err(store)?;
        let seq = meta.get("next_seq").map_err(store)?.map_or(1, |v| v.value());
        meta.insert("next_seq", seq + 1).map_err(store)?;
        let stored = meta.get("nonce").map_err(store)?.map(|v| v.value());
        let nonce = match stored {
            Some(n) => n,
            None => {
                let n = rand::random::<u64>();
                meta.insert("nonce", n).map_err(store)?;
                n
            }
        };
        (seq, nonce)
    };
    let id = format!("msg_{nonce:016x}{seq:016x}");
    let bytes = serde_json::to_vec(&Stored { id: id.clone(), notice: notice.clone() })?;
    tx.open_table(OUTBOX).map_err(store)?.insert((receiver, seq), bytes.as_slice()).map_err(store)?;
    {
        let mut queued = tx.open_table(QUEUED).map_err(store)?;
        let n = queued.get(receiver).map_err(store)?.map_or(0, |v| v.value());
        queued.insert(receiver, n + 1).map_err(store)?;
    }
    if keeps_open_alerts && notice.kind == NoticeKind::Condition {
        let fingerprint = notice.fingerprint();
        let mut open = tx.open_table(OPEN_ALERTS).map_err(store)?;
        match notice.status {
            NoticeStatus::Firing => {
                let json = serde_json::to_vec(notice)?;
                open.insert((receiver, fingerprint.as_str()), json.as_slice()).map_err(store)?;
            }
            NoticeStatus::Resolved => {
                open.remove((receiver, fingerprint.as_str())).map_err(store)?;
            }
        }
    }
    Ok(id)
}

/// The first `limit` entries of `receiver`'s queue, oldest first, and the length of the queue.
pub fn front(db: &Database, receiver: &str, limit: usize) -> Result<(Vec<Entry>, u64), OutboxError> {
    let tx = db.begin_read().map_err(store)?;
    let queued = tx.open_table(QUEUED).map_err(store)?.get(receiver).map_err(store)?.map_or(0, |v| v.value());
    let table = tx.open_table(OUTBOX).map_err(store)?;
    let mut out = Vec::new();
    for item in table.range((receiver, 0u64)..=(receiver, u64::MAX)).map_err(store)?.take(limit) {
        let (key, value) = item.map_err(store)?;
        let seq = key.value().1;
        out.push(match serde_json::from_slice::<Stored>(value.value()) {
            Ok(s) => Entry::Notice(Queued { seq, id: s.id, notice: s.notice }),
            Err(e) => Entry::Undecodable { seq, error: e.to_string() },
        });
    }
    Ok((out, queued))
}

/// The length of `receiver`'s queue.
pub fn count(db: &Database, receiver: &str) -> Result<u64, OutboxError> {
    let tx = db.begin_read().map_err(store)?;
    let queued = tx.open_table(QUEUED).map_err(store)?.get(receiver).map_err(store)?.map_or(0, |v| v.value());
    Ok(queued)
}

/// Removes entry `seq` from `receiver`'s queue; returns how many remain. A non-`durable` removal is made
/// durable by the next durable commit to the database: a crash before then delivers it again, which
/// at-least-once delivery allows (receivers deduplicate by message id), and it spares a disk flush per
/// delivery.
pub fn remove(db: &Database, receiver: &str, seq: u64, durable: bool) -> Result<u64, OutboxError> {
    let mut tx = db.begin_write().map_err(store)?;
    if !durable {
        tx.set_durability(Durability::None).map_err(store)?;
    }
    let left = {
        let removed = tx.open_table(OUTBOX).map_err(store)?.remove((receiver, seq)).map_err(store)?.is_some();
        let mut queued = tx.open_table(QUEUED).map_err(store)?;
        let n = queued.get(receiver).map_err(store)?.map_or(0, |v| v.value());
        let left = if removed { n.saturating_sub(1) } else { n };
        queued.insert(receiver, left).map_err(store)?;
        left
    };
    tx.commit().map_err(store)?;
    Ok(left)
}

/// A durable empty commit: makes every earlier non-durable one durable.
pub fn flush(db: &Database) -> Result<(), OutboxError> {
    db.begin_write().map_err(store)?.commit().map_err(store)
}

/// Entries queued per receiver (receivers with none are left out).
pub fn counts(db: &Database) -> Result<BTreeMap<String, u64>, OutboxError> {
    let tx = db.begin_read().map_err(store)?;
    let table = tx.open_table(QUEUED).map_err(store)?;
    let mut out = BTreeMap::new();
    for item in table.iter().map_err(store)? {
        let (k, v) = item.map_err(store)?;
        if v.value() > 0 {
            out.insert(k.value().to_string(), v.value());
        }
    }
    Ok(out)
}

/// Entries in the whole outbox (for tests and checks).
pub fn total(db: &Database) -> Result<u64, OutboxError> {
    let tx = db.begin_read().map_err(store)?;
    tx.open_table(OUTBOX).map_err(store)?.len().map_err(store)
}

/// The firing conditions `receiver` keeps open.
pub fn open_alerts(db: &Database, receiver: &str) -> Result<Vec<Notice>, OutboxError> {
    let tx = db.begin_read().map_err(store)?;
    let table = tx.open_table(OPEN_ALERTS).map_err(store)?;
    let mut out = Vec::new();
    for item in table.range((receiver, "")..).map_err(store)? {
        let (k, v) = item.map_err(store)?;
        if k.value().0 != receiver {
            break;
        }
        // One that no longer decodes cannot be re-posted; the others still are.
        if let Ok(n) = serde_json::from_slice(v.value()) {
            out.push(n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) fn temp_db(name: &str) -> (std::path::PathBuf, Database) {
        let dir = std::env::temp_dir().join(format!("vigil-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("audit.redb")).unwrap();
        create(&db).unwrap();
        (dir, db)
    }

    fn notice(n: u64) -> Notice {
        Notice::firing("r", "s", &format!("s-{n}"), &BTreeMap::new(), n).created_at(n)
    }

    fn push_all(db: &Database, items: &[(&str, u64)]) -> Vec<String> {
        let tx = db.begin_write().unwrap();
        let ids = items.iter().map(|(r, n)| push(&tx, r, &notice(*n), false).unwrap()).collect();
        tx.commit().unwrap();
        ids
    }

    fn starts(entries: &[Entry]) -> Vec<u64> {
        entries
            .iter()
            .map(|e| match e {
                Entry::Notice(q) => q.notice.starts_at_ms,
                Entry::Undecodable { .. } => panic!("undecodable"),
            })
            .collect()
    }

    #[test]
    fn queues_are_per_receiver_in_order_and_survive_reopening() {
        let (dir, db) = temp_db("order");
        let ids = push_all(&db, &[("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]);
        assert!(ids.iter().all(|id| id.starts_with("msg_") && id.len() == 36), "{ids:?}");
        assert_eq!(ids.iter().collect::<std::collections::BTreeSet<_>>().len(), 5, "ids are unique");
        assert_eq!(starts(&front(&db, "a", 10).unwrap().0), [1, 3, 4]);
        assert_eq!(starts(&front(&db, "b", 1).unwrap().0), [2]);
        let first_a = front(&db, "a", 1).unwrap().0.remove(0).seq();
        assert_eq!(remove(&db, "a", first_a, false).unwrap(), 2);
        assert_eq!(remove(&db, "a", first_a, false).unwrap(), 2, "removing twice changes nothing");
        flush(&db).unwrap();
        drop(db);

        let db = Database::create(dir.join("audit.redb")).unwrap();
        create(&db).unwrap();
        assert_eq!(starts(&front(&db, "a", 10).unwrap().0), [3, 4]);
        assert_eq!(counts(&db).unwrap(), BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 2)]));
        let Entry::Notice(q) = &front(&db, "a", 1).unwrap().0[0] else { panic!() };
        assert_eq!(q.id, ids[2], "an id is the one it was queued with");
        let more = push_all(&db, &[("a", 6)]);
        assert!(more[0] > ids[4], "seq goes on after a restart: {} vs {}", more[0], ids[4]);
        assert_eq!(starts(&front(&db, "a", 10).unwrap().0), [3, 4, 6]);
        assert_eq!(total(&db).unwrap(), 5);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn open_alerts_follow_firing_and_resolved() {
        let (dir, db) = temp_db("open");
        let labels = BTreeMap::new();
        let tx = db.begin_write().unwrap();
        push(&tx, "am", &Notice::firing("hot", "s", "s-0", &labels, 1), true).unwrap();
        push(&tx, "am", &Notice::firing("hot", "s", "s-1", &labels, 1), true).unwrap();
        push(&tx, "hook", &Notice::firing("hot", "s", "s-0", &labels, 1), false).unwrap();
        tx.commit().unwrap();
        assert_eq!(open_alerts(&db, "am").unwrap().len(), 2);
        assert!(open_alerts(&db, "hook").unwrap().is_empty());
        let tx = db.begin_write().unwrap();
        push(&tx, "am", &Notice::resolved("hot", "s", "s-0", &labels, 1, 2), true).unwrap();
        tx.commit().unwrap();
        let open = open_alerts(&db, "am").unwrap();
        assert_eq!(open.iter().map(|n| n.labels["instance_id"].as_str()).collect::<Vec<_>>(), ["s-1"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
