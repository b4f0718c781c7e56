//! Tracepoint field offsets read from tracefs `format` files, handed to the probes as globals so the
//! programs follow the running kernel's record layout instead of a compiled-in guess.

use std::path::{Path, PathBuf};

pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("cannot read tracepoint format {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("tracepoint {event} has no field `{field}` in {path}")]
    NoField { event: String, field: String, path: PathBuf },
    #[error("cannot mount tracefs at {path}: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
}

/// The offset of `field` in a tracepoint `format` text (`field:pid_t pid;\toffset:24;\tsize:4;...`).
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // The declaration ends with the field name, possibly followed by an array suffix.
        let name = decl.rsplit(|c: char| c.is_whitespace() || c == '*').next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let off = rest.trim().strip_prefix("offset:")?;
        off.split(';').next()?.trim().parse().ok()
    })
}

/// Offsets of several fields of `category/event`.
pub fn offsets(root: &Path, category: &str, event: &str, fields: &[&str]) -> Result<Vec<u32>, TracefsError> {
    let path = root.join("events").join(category).join(event).join("format");
    let text =
        std::fs::read_to_string(&path).map_err(|source| TracefsError::Read { path: path.clone(), source })?;
    fields
        .iter()
        .map(|f| {
            field_offset(&text, f).ok_or_else(|| TracefsError::NoField {
                event: format!("{category}:{event}"),
                field: (*f).to_string(),
                path: path.clone(),
            })
        })
        .collect()
}

/// Mounts tracefs at its usual place when nothing is there yet (aya looks it up to attach tracepoints).
pub fn ensure_mounted() -> Result<(), TracefsError> {
    let root = Path::new(TRACEFS);
    if root.join("events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .map_err(|source| TracefsError::Mount { path: root.to_path_buf(), source })?;
    if status.success() && root.join("events").exists() {
        Ok(())
    } else {
        Err(TracefsError::Mount {
            path: root.to_path_buf(),
            source: std::io::Error::other(format!("mount -t tracefs exited with {status}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH: &str = "name: sched_switch\nID: 372\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n\
\tfield:__data_loc char[] name;\toffset:64;\tsize:4;\tsigned:0;\n";

    #[test]
    fn finds_offsets() {
        assert_eq!(field_offset(SCHED_SWITCH, "prev_pid"), Some(24));
        assert_eq!(field_offset(SCHED_SWITCH, "prev_state"), Some(32));
        assert_eq!(field_offset(SCHED_SWITCH, "next_pid"), Some(56));
        assert_eq!(field_offset(SCHED_SWITCH, "prev_comm"), Some(8));
        assert_eq!(field_offset(SCHED_SWITCH, "common_pid"), Some(4));
        assert_eq!(field_offset(SCHED_SWITCH, "name"), Some(64));
        assert_eq!(field_offset(SCHED_SWITCH, "pid"), None);
        assert_eq!(field_offset("", "pid"), None);
    }

    #[test]
    fn real_kernel_formats() {
        ensure_mounted().expect("tracefs mountable (tests run as root)");
        let root = Path::new(TRACEFS);
        let o = offsets(root, "sched", "sched_switch", &["prev_pid", "prev_state", "next_pid"]).unwrap();
        assert_eq!(o.len(), 3);
        assert!(o[0] < o[1] && o[1] < o[2]);
        let e = offsets(root, "sched", "sched_switch", &["no_such_field"]).unwrap_err();
        assert!(e.to_string().contains("no field `no_such_field`"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = field_offset(&s, "pid");
        }
    }
}
