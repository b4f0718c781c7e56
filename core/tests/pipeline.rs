//! The whole pipeline on one file with mistakes in three sections: every one is reported together, each at
//! its real line and column with its key path, and nothing stops at the first.

use std::path::Path;

use vigil_core::{ConfigError, VigilConfig};

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

#[test]
fn every_mistake_of_every_section_is_reported_at_once() {
    let path = data("mistakes.yaml");
    let err = VigilConfig::load(&path).unwrap_err();
    let ConfigError::Invalid { issues } = &err else { panic!("{err}") };
    let found: Vec<(u64, u64, &str)> = issues.iter().map(|i| (i.line, i.column, i.path.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (4, 13, "collector.interval"),
            (5, 18, "collector.max_instances"),
            (8, 25, "healer.max_standby_fraction"),
            (10, 15, "healer.stop_grace"),
            (19, 12, "services[1].route"),
            (20, 20, "services[1].ready_timeout"),
            (22, 26, "broker.queue.max_totl"),
        ]
    );
    let file = path.display().to_string();
    let expected = [
        "collector.interval: 50ms is outside 100ms..1h",
        "collector.max_instances: must be at least 1",
        "healer.max_standby_fraction: 1.5 is not a fraction in 0..=1",
        "healer.stop_grace: `ten` is not a duration like 500ms, 1s, 5m, 2h",
        "services[1].route: route \"/echo\" already leads to `echo` (services[0]), not to `other`",
        "services[1].ready_timeout: `60` has no unit: write it as 500ms, 1s, 5m or 2h",
        "broker.queue.max_totl: unknown field `max_totl`, expected one of `max_per_service`, \
         `max_bytes_per_service`, `max_total`, `timeout`",
    ];
    let rendered: Vec<String> = issues
        .iter()
        .zip(&found)
        .zip(expected)
        .map(|((_, (l, c, _)), m)| format!("{file}:{l}:{c}: {m}"))
        .collect();
    assert_eq!(err.to_string(), rendered.join("\n"));
}

#[test]
fn a_cross_section_mistake_is_located_where_it_is_written() {
    let text = "\
collector:
  watch:
    managed_root: /vigil
healer:
  cgroup_parent: /elsewhere
";
    let err = VigilConfig::parse(text, "cross.yaml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "cross.yaml:5:18: healer.cgroup_parent: \"/elsewhere\" differs from collector.watch.managed_root \
         \"/vigil\": instances must be created where the collector looks for them"
    );
}

#[test]
fn the_example_configs_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/echo.yaml");
    let config = VigilConfig::load(&examples).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.services[0].route.as_deref(), Some("/echo"));
}

#[test]
fn a_missing_file_is_a_read_error() {
    let err = VigilConfig::load(&data("absent.yaml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(err.to_string().starts_with("cannot read config "), "{err}");
}
