//! The identity of the probe sources: a SHA-256 over every file the eBPF object is built from. build.rs
//! records it next to the committed prebuilt object, and a test fails when the sources move on without the
//! object, so a machine without the eBPF toolchain never runs a stale probe silently.
//!
//! This file is also compiled into build.rs (`#[path]`), so it depends on nothing but std and sha2.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Directories (relative to the workspace root) whose files make up the probe object.
pub const SOURCE_DIRS: [&str; 2] = ["ebpf/common", "ebpf/probes"];
/// The committed object and the hash of the sources it was built from.
pub const PREBUILT_OBJECT: &str = "ebpf/prebuilt/vigil-probes.o";
pub const PREBUILT_HASH: &str = "ebpf/prebuilt/vigil-probes.sha256";

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" {
                collect(&path, out)?;
            }
        } else if name.ends_with(".rs") || name == "Cargo.toml" {
            out.push(path);
        }
    }
    Ok(())
}

/// The source files, relative to `workspace`, sorted.
pub fn source_files(workspace: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        collect(&workspace.join(dir), &mut files)?;
    }
    let mut rel: Vec<PathBuf> =
        files.into_iter().filter_map(|p| p.strip_prefix(workspace).ok().map(Path::to_path_buf)).collect();
    rel.sort();
    Ok(rel)
}

/// Hex SHA-256 over (path, length, contents) of every source file.
pub fn sources_hash(workspace: &Path) -> io::Result<String> {
    let mut h = Sha256::new();
    for rel in source_files(workspace)? {
        let data = std::fs::read(workspace.join(&rel))?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
    }

    #[test]
    fn prebuilt_object_matches_probe_sources() {
        let ws = workspace();
        let recorded =
            std::fs::read_to_string(ws.join(PREBUILT_HASH)).expect("ebpf/prebuilt/vigil-probes.sha256");
        let current = sources_hash(&ws).expect("hash probe sources");
        assert_eq!(
            recorded.trim(),
            current,
            "the eBPF sources changed but ebpf/prebuilt/ was not rebuilt: run scripts/build-probes and commit"
        );
        assert!(ws.join(PREBUILT_OBJECT).is_file());
    }

    #[test]
    fn hash_covers_every_source_file() {
        let files = source_files(&workspace()).unwrap();
        for f in ["ebpf/probes/src/main.rs", "ebpf/common/src/lib.rs", "ebpf/probes/Cargo.toml"] {
            assert!(files.iter().any(|p| p == Path::new(f)), "{f} missing from {files:?}");
        }
    }
}
