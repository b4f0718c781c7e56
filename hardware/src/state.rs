//! What survives a restart: the last kernel log record processed (its sequence number) and the last
//! sysfs readings, both only meaningful in the boot they were taken in, so the boot id
//! (`/proc/sys/kernel/random/boot_id`) is kept beside them. After a restart in the same boot, records up to
//! the cursor are skipped and counters rise from their last readings; after a reboot everything starts
//! over (the whole kernel log is read again, counters take a new baseline). The file is small JSON in the
//! data directory, written atomically (temporary file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sysfs::Readings;

/// The state file's name in the data directory.
pub const FILE_NAME: &str = "hardware-state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the boot id {path}: {source}")]
    BootId { path: String, source: std::io::Error },
    #[error("cannot write the hardware state {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The kept state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub boot_id: String,
    /// The last kernel log record processed.
    pub kmsg_seq: Option<u64>,
    pub readings: Readings,
}

/// This boot's id.
pub fn boot_id() -> Result<String, StateError> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    std::fs::read_to_string(PATH)
        .map(|s| s.trim().to_string())
        .map_err(|source| StateError::BootId { path: PATH.to_string(), source })
}

/// The state of this boot in `text` (a state file's contents): what it kept when it is of `boot_id`, a
/// fresh state otherwise. The note says why the kept state was not used, when there was one.
pub fn of_boot(text: Option<&str>, boot_id: &str) -> (Persisted, Option<String>) {
    let fresh = Persisted { boot_id: boot_id.to_string(), ..Persisted::default() };
    let Some(text) = text else { return (fresh, None) };
    match serde_json::from_str::<Persisted>(text) {
        Ok(kept) if kept.boot_id == boot_id => (kept, None),
        Ok(_) => (fresh, Some("kept from an earlier boot: starting over".to_string())),
        Err(e) => (fresh, Some(format!("unreadable ({e}): starting over"))),
    }
}

/// Reads the state file at `path` for `boot_id` (see [`of_boot`]).
pub fn load(path: &Path, boot_id: &str) -> (Persisted, Option<String>) {
    match std::fs::read_to_string(path) {
        Ok(text) => of_boot(Some(&text), boot_id),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => of_boot(None, boot_id),
        Err(e) => {
            let (fresh, _) = of_boot(None, boot_id);
            (fresh, Some(format!("unreadable ({e}): starting over")))
        }
    }
}

/// Writes `state` to `path` atomically: a crash leaves the old file or the new one, never half of one.
pub fn save(path: &Path, state: &Persisted) -> Result<(), StateError> {
    vigil_core::state_file::write_json(path, state)
        .map_err(|source| StateError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::tests::TempDir;

    #[test]
    fn kept_state_is_used_in_its_own_boot_only() {
        let dir = TempDir::new("state");
        let path = dir.0.join(FILE_NAME);
        assert_eq!(load(&path, "b1"), (Persisted { boot_id: "b1".into(), ..Persisted::default() }, None));
        let mut state = Persisted { boot_id: "b1".into(), kmsg_seq: Some(42), readings: Readings::default() };
        state.readings.counters.insert("edac/mc0/ce_count".into(), 3);
        save(&path, &state).unwrap();
        assert!(!path.with_extension("json.tmp").exists());
        assert_eq!(load(&path, "b1"), (state.clone(), None));
        let (fresh, note) = load(&path, "b2");
        assert_eq!((fresh.kmsg_seq, fresh.boot_id.as_str()), (None, "b2"));
        assert!(note.unwrap().contains("earlier boot"));
        std::fs::write(&path, "{not json").unwrap();
        let (fresh, note) = load(&path, "b1");
        assert_eq!(fresh.kmsg_seq, None);
        assert!(note.unwrap().starts_with("unreadable"));
    }

    #[test]
    fn the_boot_id_is_read() {
        let id = boot_id().unwrap();
        assert_eq!(id.len(), 36, "{id}");
    }

    #[test]
    fn an_unwritable_place_is_named() {
        let e = save(Path::new("/nonexistent/dir/hardware-state.json"), &Persisted::default()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/hardware-state.json"), "{e}");
    }
}
