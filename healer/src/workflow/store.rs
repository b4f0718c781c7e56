//! Where runs live: a redb table in the healer's state database (beside the audit log), one JSON
//! [`RunRecord`] per run id. Every change to a run is written in the transaction that audits it
//! ([`crate::audit::AuditLog::append_with`]), so the record and its audit trail never disagree; the cordons
//! a run placed are kept here too, so a cordoned resource stays cordoned across restarts.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::machine::RunRecord;

/// Run id → [`RunRecord`] as JSON.
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("workflow_runs");
/// Cordoned resource (`loop3`, `cpu1`) → the JSON `{run_id, since_ms, reason}` that cordoned it.
const CORDONS: TableDefinition<&str, &[u8]> = TableDefinition::new("cordons");
/// Trigger key (`workflow NUL device`) → when its last run started (ms), for cooldowns across restarts.
const COOLDOWNS: TableDefinition<&str, u64> = TableDefinition::new("workflow_cooldowns");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("workflow state: {0}")]
    Db(#[from] Box<redb::Error>),
    #[error("a stored workflow run does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// A cordon as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cordon {
    pub run_id: u64,
    pub since_ms: u64,
    pub reason: String,
}

/// The workflow tables of the state database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    pub fn new(db: Arc<Database>) -> Store {
        Store { db }
    }

    /// Writes `run` in the caller's transaction.
    pub fn put(tx: &WriteTransaction, run: &RunRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(run)?;
        tx.open_table(RUNS).map_err(db_err)?.insert(run.id, bytes.as_slice()).map_err(db_err)?;
        Ok(())
    }

    /// Cordons `resource` (or, with `None`, lifts its cordon) in the caller's transaction.
    pub fn set_cordon(
        tx: &WriteTransaction,
        resource: &str,
        cordon: Option<&Cordon>,
    ) -> Result<(), StoreError> {
        let mut table = tx.open_table(CORDONS).map_err(db_err)?;
        match cordon {
            Some(c) => {
                let bytes = serde_json::to_vec(c)?;
                table.insert(resource, bytes.as_slice()).map_err(db_err)?;
            }
            None => {
                table.remove(resource).map_err(db_err)?;
            }
        }
        Ok(())
    }

    /// Records that a run for trigger `key` started at `ms`, in the caller's transaction.
    pub fn set_cooldown(tx: &WriteTransaction, key: &str, ms: u64) -> Result<(), StoreError> {
        tx.open_table(COOLDOWNS).map_err(db_err)?.insert(key, ms).map_err(db_err)?;
        Ok(())
    }

    /// The id the next run gets: one more than the highest stored.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        self.read(1, |tx| {
            let table = tx.open_table(RUNS).map_err(db_err)?;
            Ok(table.last().map_err(db_err)?.map_or(1, |(k, _)| k.value() + 1))
        })
    }

    fn read<R>(
        &self,
        empty: R,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        match f(&tx) {
            Err(StoreError::Db(e)) if matches!(*e, redb::Error::TableDoesNotExist(_)) => Ok(empty),
            other => other,
        }
    }

    pub fn get(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        self.read(None, |tx| {
            let table = tx.open_table(RUNS).map_err(db_err)?;
            match table.get(id).map_err(db_err)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
                None => Ok(None),
            }
        })
    }

    /// The newest `limit` runs, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        self.read(Vec::new(), |tx| {
            let table = tx.open_table(RUNS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)?.rev().take(limit) {
                let (_, v) = entry.map_err(db_err)?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
    }

    /// Every run that has not ended, oldest first: what a restart resumes.
    pub fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.read(Vec::new(), |tx| {
            let table = tx.open_table(RUNS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (_, v) = entry.map_err(db_err)?;
                let run: RunRecord = serde_json::from_slice(v.value())?;
                if !run.state.ended() {
                    out.push(run);
                }
            }
            Ok(out)
        })
    }

    pub fn cordons(&self) -> Result<BTreeMap<String, Cordon>, StoreError> {
        self.read(BTreeMap::new(), |tx| {
            let table = tx.open_table(CORDONS).map_err(db_err)?;
            let mut out = BTreeMap::new();
            for entry in table.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                out.insert(k.value().to_string(), serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
    }

    pub fn cooldowns(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.read(BTreeMap::new(), |tx| {
            let table = tx.open_table(COOLDOWNS).map_err(db_err)?;
            let mut out = BTreeMap::new();
            for entry in table.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                out.insert(k.value().to_string(), v.value());
            }
            Ok(out)
        })
    }
}
