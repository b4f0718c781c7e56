//! The durable audit log: every decision and its outcome, appended to an embedded redb database under the
//! data directory, so the record survives restarts and crashes (redb commits are atomic). Other durable
//! state that must commit with a decision (the notification outbox, `crate::notify`) lives in tables of the
//! same database and is written in the decision's own transaction ([`AuditLog::append_with`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::Serialize;

/// Sequence number → the decision as JSON.
const DECISIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("decisions");

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("creating the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("opening the audit log {path}: {source}")]
    Open { path: PathBuf, source: Box<redb::DatabaseError> },
    #[error("audit log {path}: {source}")]
    Store { path: PathBuf, source: Box<redb::Error> },
    #[error("encoding a decision: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An append-only log of JSON records numbered from 1.
pub struct AuditLog {
    db: Arc<Database>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) `<data_dir>/audit.redb`.
    pub fn open(data_dir: &Path) -> Result<AuditLog, AuditError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| AuditError::DataDir { path: data_dir.to_path_buf(), source })?;
        let path = data_dir.join("audit.redb");
        let db = Database::create(&path)
            .map_err(|source| AuditError::Open { path: path.clone(), source: Box::new(source) })?;
        Ok(AuditLog { db: Arc::new(db), path })
    }

    /// The database the log is kept in: the healer's redb state, where other durable tables (incoming
    /// alerts, the notification outbox) live beside it. redb allows one handle per file.
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    fn store_err(&self, e: impl Into<redb::Error>) -> AuditError {
        AuditError::Store { path: self.path.clone(), source: Box::new(e.into()) }
    }

    /// Appends one record durably; returns its sequence number.
    pub fn append<T: Serialize>(&self, record: &T) -> Result<u64, AuditError> {
        self.append_with(record, |_, _| Ok::<(), AuditError>(()))
    }

    /// Appends one record and lets `also` write other tables in the same transaction (given the record's
    /// sequence number): both commit, durably, or neither does. An error from `also` aborts the
    /// transaction, the record included.
    pub fn append_with<T, E, F>(&self, record: &T, also: F) -> Result<u64, E>
    where
        T: Serialize,
        E: From<AuditError>,
        F: FnOnce(&WriteTransaction, u64) -> Result<(), E>,
    {
        let bytes = serde_json::to_vec(record).map_err(AuditError::from)?;
        let tx = self.db.begin_write().map_err(|e| self.store_err(e))?;
        let seq = {
            let mut table = tx.open_table(DECISIONS).map_err(|e| self.store_err(e))?;
            let last = table.last().map_err(|e| self.store_err(e))?.map(|(k, _)| k.value()).unwrap_or(0);
            table.insert(last + 1, bytes.as_slice()).map_err(|e| self.store_err(e))?;
            last + 1
        };
        also(&tx, seq)?;
        tx.commit().map_err(|e| self.store_err(e))?;
        Ok(seq)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `read` over the log's table in one read transaction; an empty log (no table yet) gives `empty`.
    fn read<R>(
        &self,
        empty: R,
        read: impl FnOnce(&redb::ReadOnlyTable<u64, &'static [u8]>) -> Result<R, AuditError>,
    ) -> Result<R, AuditError> {
        let tx = self.db.begin_read().map_err(|e| self.store_err(e))?;
        match tx.open_table(DECISIONS) {
            Ok(table) => read(&table),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(empty),
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// Decodes the records `entries` yields.
    fn decode<'a>(
        &self,
        entries: impl Iterator<
            Item = Result<
                (redb::AccessGuard<'a, u64>, redb::AccessGuard<'a, &'static [u8]>),
                redb::StorageError,
            >,
        >,
    ) -> Result<Vec<(u64, serde_json::Value)>, AuditError> {
        let mut out = Vec::new();
        for entry in entries {
            let (k, v) = entry.map_err(|e| self.store_err(e))?;
            out.push((k.value(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    /// The newest `limit` records, newest first, as JSON values.
    pub fn recent(&self, limit: usize) -> Result<Vec<(u64, serde_json::Value)>, AuditError> {
        self.read(Vec::new(), |table| {
            self.decode(table.iter().map_err(|e| self.store_err(e))?.rev().take(limit))
        })
    }

    /// The sequence number of the newest record; 0 for an empty log.
    pub fn last_seq(&self) -> Result<u64, AuditError> {
        self.read(0, |table| {
            Ok(table.last().map_err(|e| self.store_err(e))?.map(|(k, _)| k.value()).unwrap_or(0))
        })
    }

    /// At most `limit` records from sequence number `from` on (inclusive), oldest first: how a watcher of
    /// the decisions catches up.
    pub fn from_seq(&self, from: u64, limit: usize) -> Result<Vec<(u64, serde_json::Value)>, AuditError> {
        self.read(Vec::new(), |table| {
            self.decode(table.range(from..).map_err(|e| self.store_err(e))?.take(limit))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_from_a_sequence_number_on() {
        let dir = std::env::temp_dir().join(format!("vigil-audit-from-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = AuditLog::open(&dir).unwrap();
        assert_eq!(log.last_seq().unwrap(), 0);
        assert!(log.from_seq(1, 10).unwrap().is_empty(), "an empty log has no table yet");
        for n in 1..=5 {
            log.append(&serde_json::json!({ "n": n })).unwrap();
        }
        assert_eq!(log.last_seq().unwrap(), 5);
        let seqs = |rows: Vec<(u64, serde_json::Value)>| rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(seqs(log.from_seq(2, 2).unwrap()), vec![2, 3]);
        assert_eq!(seqs(log.from_seq(4, 10).unwrap()), vec![4, 5]);
        assert!(log.from_seq(6, 10).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
