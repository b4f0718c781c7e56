//! Small JSON state files Vigil keeps in its data directory (the autoscaler's counts, the kernel log
//! cursor, the instances' data directories): read back at start, written so that a crash leaves the old
//! file or the new one, never half of one.

use std::io::Write;
use std::path::Path;

/// Writes `value` as JSON to `path`: a temporary file beside it, synced, renamed over the old one, and
/// the directory synced so that the rename survives a crash too.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// The JSON at `path`: `Ok(None)` when there is no such file, an error saying why it cannot be read or
/// decoded otherwise.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn written_files_read_back_and_leave_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("vigil-state-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert_eq!(read_json::<BTreeMap<String, u32>>(&path), Ok(None));
        write_json(&path, &BTreeMap::from([("a".to_string(), 1u32)])).unwrap();
        write_json(&path, &BTreeMap::from([("b".to_string(), 2u32)])).unwrap();
        assert_eq!(read_json(&path), Ok(Some(BTreeMap::from([("b".to_string(), 2u32)]))));
        assert!(!dir.join("state.json.tmp").exists());
        std::fs::write(&path, "{").unwrap();
        assert!(read_json::<BTreeMap<String, u32>>(&path).unwrap_err().contains("EOF"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
