//! Every shipped rule file in `rules/` is valid and passes its own test cases.

use std::path::PathBuf;

use vigil_healer::rules::{check_file, run_tests};

#[test]
fn shipped_rule_files_pass_their_own_tests() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files in {}", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let set = match check_file(file) {
            Ok(set) => set,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        assert!(!set.rules.is_empty(), "{} has no rules", file.display());
        assert!(!set.tests.is_empty(), "{} has no test cases", file.display());
        for outcome in run_tests(&set) {
            if let Some(why) = outcome.failure {
                failures.push(format!("{}: {}:\n{why}", outcome.file, outcome.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
