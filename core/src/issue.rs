//! A configuration mistake, located in its file, and the one way Vigil prints them:
//! `file:line:column: key.path: message`, one line each, all of them at once.

use std::fmt;
use std::path::PathBuf;

/// One mistake, located in the file. Lines and columns count from 1.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigIssue {
    pub file: String,
    pub line: u64,
    pub column: u64,
    /// Dotted key path (`collector.interval`, `services[0].port`); empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// One line per issue: `file:line:column: key.path: message`.
pub fn render_issues(issues: &[ConfigIssue]) -> String {
    issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every mistake found in the file, in file order.
    #[error("{}", render_issues(issues))]
    Invalid { issues: Vec<ConfigIssue> },
}

impl ConfigError {
    /// The mistakes, if that is why (none for a file that could not be read).
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Invalid { issues } => issues,
            ConfigError::Read { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(path: &str) -> ConfigIssue {
        ConfigIssue { file: "v.yaml".into(), line: 3, column: 7, path: path.into(), message: "bad".into() }
    }

    #[test]
    fn renders_file_line_column_path_message() {
        assert_eq!(issue("collector.interval").to_string(), "v.yaml:3:7: collector.interval: bad");
        assert_eq!(issue("").to_string(), "v.yaml:3:7: bad");
        assert_eq!(render_issues(&[issue("a"), issue("b")]), "v.yaml:3:7: a: bad\nv.yaml:3:7: b: bad");
    }
}
