//! The shipped workflow files (`workflows/`) are valid with the embedded defaults (no receivers
//! configured), pass their own test cases, and `vigil workflows check|test` says so; a mistake makes the
//! command fail with the located line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vigil_healer::config::HealerConfig;
use vigil_healer::workflow::run_tests;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `vigil ARGS...` run from the repository root, as the README's commands are.
fn vigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run vigil: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn shipped_workflow_files_load_with_the_defaults_and_pass_their_own_tests() {
    // What `vigil up` loads with its embedded defaults, run from the repository root.
    let config = HealerConfig { workflows: vec![root().join("workflows")], ..HealerConfig::default() };
    assert!(config.receivers.is_empty(), "the defaults configure no receiver");
    let sets = config.load_workflows().unwrap_or_else(|e| panic!("{e}"));
    let files: Vec<String> =
        sets.iter().map(|s| Path::new(&s.file).file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(files, ["cpu.yaml", "disk-errors.yaml", "memory-errors.yaml"]);
    let mut failures = Vec::new();
    for set in &sets {
        assert!(!set.workflows.is_empty(), "{} has no workflows", set.file);
        assert!(!set.tests.is_empty(), "{} has no test cases", set.file);
        for w in &set.workflows {
            assert!(
                set.tests.iter().any(|t| t.expect.iter().any(|x| x.workflow == w.name)),
                "no test case of {} expects a run of {}",
                set.file,
                w.name
            );
        }
        for outcome in run_tests(set) {
            if let Some(why) = outcome.failure {
                failures.push(format!("{}: {}:\n{why}", outcome.file, outcome.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn vigil_workflows_check_and_test_pass_on_the_shipped_directory() {
    let checked = vigil(&["workflows", "check", "workflows/"]);
    assert!(checked.status.success(), "{}{}", text(&checked.stdout), text(&checked.stderr));
    assert_eq!(
        text(&checked.stdout),
        "ok: workflows/cpu.yaml (2 workflows)\n\
         ok: workflows/disk-errors.yaml (1 workflows)\n\
         ok: workflows/memory-errors.yaml (2 workflows)\n"
    );
    // With no files: the config's `workflows:`, here the embedded default `workflows/`.
    let by_default = vigil(&["workflows", "check"]);
    assert!(by_default.status.success(), "{}", text(&by_default.stderr));
    assert_eq!(text(&by_default.stdout), text(&checked.stdout));

    let tested = vigil(&["workflows", "test", "workflows/"]);
    let out = text(&tested.stdout);
    assert!(tested.status.success(), "{out}{}", text(&tested.stderr));
    assert!(out.lines().all(|l| l.starts_with("ok: workflows/")), "{out}");
    assert!(
        out.contains(
            "ok: workflows/disk-errors.yaml: three I/O errors within a minute start one run for that disk\n"
        ),
        "{out}"
    );
}

#[test]
fn vigil_workflows_fails_on_a_mistake_or_a_failing_case() {
    let dir = std::env::temp_dir().join(format!("vigil-workflows-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bad: PathBuf = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "workflows:\n  - name: w\n    trigger: { manual: true }\n    steps:\n      - { name: a, approve: {}, after: [b] }\n",
    )
    .unwrap();
    let failing = dir.join("failing.yaml");
    std::fs::write(
        &failing,
        "workflows:\n  - name: w2\n    trigger: { hardware: { kind: io_error } }\n    steps:\n      - { name: a, approve: {} }\n\
         tests:\n  - name: expects nothing\n    events: [ { at: 0s, device: sda, kind: io_error } ]\n",
    )
    .unwrap();
    let (bad_s, failing_s) = (bad.display().to_string(), failing.display().to_string());

    let checked = vigil(&["workflows", "check", &bad_s, &failing_s]);
    assert!(!checked.status.success());
    assert_eq!(text(&checked.stdout), format!("ok: {failing_s} (1 workflows)\n"));
    assert_eq!(
        text(&checked.stderr),
        format!(
            "{bad_s}:5:41: workflows[0].steps[0].after[0]: no step is named `b` in this workflow; its steps: a\n\
             vigil: 1 failed\n"
        )
    );

    let tested = vigil(&["workflows", "test", &failing_s]);
    assert!(!tested.status.success());
    assert_eq!(
        text(&tested.stdout),
        format!(
            "FAILED: {failing_s}: expects nothing\nstarted but not expected: at 0s w2 {{device=sda, kind=io_error}} \
             (io_error on sda)\n"
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
