//! Located mistakes in the files Vigil reads with serde-saphyr's `Spanned` values (rule files, workflow
//! files): one collector of `file:line:column: key.path: message` issues, the small checks both languages
//! share, and the receivers they name, checked against the config's `notify.receivers` in one place.
//!
//! The shape of a file (YAML syntax, unknown keys, types) is serde's and stops at the first mistake; what
//! this module collects is everything after that, so a file's semantic mistakes come back all at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;
use vigil_core::{ConfigIssue, render_issues};

/// What is wrong with a rule or workflow file: it cannot be read, or its located mistakes.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {what} file {path}: {source}")]
    Read { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("{}", render_issues(issues))]
    Invalid { file: String, issues: Vec<ConfigIssue> },
}
use vigil_core::glob::Glob;
use vigil_core::values::parse_duration;

/// Collects issues with their positions; the file name is filled in by [`Issues::finish`].
#[derive(Default)]
pub(crate) struct Issues(pub(crate) Vec<ConfigIssue>);

impl Issues {
    pub(crate) fn at<T>(&mut self, s: &Spanned<T>, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            file: String::new(),
            line: s.referenced.line(),
            column: s.referenced.column(),
            path: path.into(),
            message: message.into(),
        });
    }

    /// How many have been collected: a caller compares before and after to know whether a part was clean.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn duration(&mut self, s: &Spanned<String>, path: &str) -> Option<Duration> {
        parse_duration(&s.value).map_err(|m| self.at(s, path, m.to_string())).ok()
    }

    pub(crate) fn finite(&mut self, s: &Option<Spanned<f64>>, path: &str) -> Option<f64> {
        let s = s.as_ref()?;
        if s.value.is_finite() {
            Some(s.value)
        } else {
            self.at(s, path, format!("{} is not a finite number", s.value));
            None
        }
    }

    pub(crate) fn glob(&mut self, s: &Option<Spanned<String>>, path: &str) -> Option<Glob> {
        let s = s.as_ref()?;
        Glob::new(&s.value).map_err(|m| self.at(s, path, m)).ok()
    }

    /// The issues in file order, each naming `file`.
    pub(crate) fn finish(self, file: &str) -> Vec<ConfigIssue> {
        let mut issues = self.0;
        issues.sort_by_key(|i| (i.line, i.column));
        for issue in &mut issues {
            issue.file = file.to_string();
        }
        issues
    }
}

/// `a, b, c`: the names of every value of a closed set, for "expected one of" messages.
pub(crate) fn names<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> String {
    all.iter().map(|&x| name(x)).collect::<Vec<_>>().join(", ")
}

/// A map's entries in the order the file writes them (a `HashMap` of spanned keys has no order).
pub(crate) fn by_position<V>(map: &HashMap<Spanned<String>, V>) -> Vec<(&Spanned<String>, &V)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by_key(|(k, _)| (k.referenced.line(), k.referenced.column()));
    entries
}

/// Prometheus' label names: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub(crate) fn label_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where a rule or a workflow names a receiver, so that a name the config does not know is reported there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverRef {
    /// The rule or workflow that names it.
    pub rule: Arc<str>,
    pub name: String,
    pub line: u64,
    pub column: u64,
    pub path: String,
}

/// The receivers of `refs` that are not in `known` (the config's `notify.receivers`), located in `file`
/// where they are named.
pub(crate) fn unknown_receivers(file: &str, refs: &[ReceiverRef], known: &[String]) -> Vec<ConfigIssue> {
    let configured = if known.is_empty() {
        "none is configured".to_string()
    } else {
        format!("configured: {}", known.join(", "))
    };
    refs.iter()
        .filter(|r| !known.contains(&r.name))
        .map(|r| ConfigIssue {
            file: file.to_string(),
            line: r.line,
            column: r.column,
            path: r.path.clone(),
            message: format!("no receiver `{}` in the config's notify.receivers ({configured})", r.name),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_are_prometheus_ones() {
        assert!(label_name_ok("severity") && label_name_ok("_x9"));
        assert!(!label_name_ok("") && !label_name_ok("9x") && !label_name_ok("a-b"));
    }
}
