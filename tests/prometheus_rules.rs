//! Vigil's own Prometheus alerting rules (`rules/prometheus/vigil.rules.yaml`) are valid for the installed
//! Prometheus and pass their unit tests (`promtool test rules`). promtool comes with Debian's `prometheus`,
//! which `scripts/setup` installs; without it this test fails rather than skipping.

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/prometheus");
    let out =
        Command::new("promtool").args(args).current_dir(&dir).output().unwrap_or_else(|e| {
            panic!("cannot run promtool (scripts/setup installs Debian's prometheus): {e}")
        });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

#[test]
fn vigil_alerting_rules_are_valid_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "vigil.rules.yaml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "vigil.rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
