//! The configured workflow files checked together: each file alone ([`check_file`]), then what only the
//! whole set shows: a workflow name used in two files (runs, cooldowns and the API know a workflow by
//! name), and the receivers named against the config's `notify.receivers`.

use std::collections::HashMap;
use std::path::PathBuf;

use vigil_core::ConfigIssue;

use super::{WorkflowError, WorkflowSet, check_file, check_receivers};

/// Every mistake of the workflow files, file by file.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct WorkflowFilesError(pub Vec<WorkflowError>);

/// Checks each of `files`, in order; with `receivers`, also the receivers each names. A workflow whose
/// name an earlier file already uses is a mistake of the later file, located where it is named.
pub fn check_files(
    files: &[PathBuf],
    receivers: Option<&[String]>,
) -> Vec<Result<WorkflowSet, WorkflowError>> {
    // Name → the first file that declares it (one whose only mistakes are its receivers counts).
    let mut first: HashMap<String, String> = HashMap::new();
    files
        .iter()
        .map(|path| {
            let set = check_file(path)?;
            let mut issues: Vec<ConfigIssue> = Vec::new();
            if let Some(known) = receivers
                && let Err(WorkflowError::Invalid { issues: unknown, .. }) = check_receivers(&set, known)
            {
                issues.extend(unknown);
            }
            for (w, at) in set.workflows.iter().zip(&set.named_at) {
                match first.get(&*w.name) {
                    Some(other) => issues.push(ConfigIssue {
                        file: set.file.clone(),
                        line: at.line,
                        column: at.column,
                        path: at.path.clone(),
                        message: format!("`{}` is already the name of a workflow in {other}", w.name),
                    }),
                    None => {
                        first.insert(w.name.to_string(), set.file.clone());
                    }
                }
            }
            if issues.is_empty() {
                Ok(set)
            } else {
                issues.sort_by_key(|i| (i.line, i.column));
                Err(WorkflowError::Invalid { file: set.file.clone(), issues })
            }
        })
        .collect()
}

/// Every set of `files` when all are valid ([`check_files`] with `receivers`, the config's
/// `notify.receivers`), else every mistake of every file.
pub fn load_files(files: &[PathBuf], receivers: &[String]) -> Result<Vec<WorkflowSet>, WorkflowFilesError> {
    let mut sets = Vec::new();
    let mut errors = Vec::new();
    for checked in check_files(files, Some(receivers)) {
        match checked {
            Ok(set) => sets.push(set),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(sets) } else { Err(WorkflowFilesError(errors)) }
}
