//! Checks the Grafana dashboards statically: they parse, carry their identity, and every panel query
//! reads a Vigil metric with Grafana's variables substituted. The end-to-end test runs the same queries
//! against a real Prometheus.

mod support;

use std::path::{Path, PathBuf};

use support::dashboard::{load, panel_queries, substitute_variables};
use support::prometheus::Prometheus;

fn node_dashboard() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/node.json")
}

#[test]
fn node_dashboard_has_its_identity_and_variables() {
    let dashboard = load(&node_dashboard());
    assert_eq!(dashboard["title"], "Vigil / Node");
    assert_eq!(dashboard["uid"], "vigil-node");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    for name in ["datasource", "service", "instance_id"] {
        assert!(variables.contains(&name), "variable ${name} missing: {variables:?}");
    }
}

#[test]
fn node_dashboard_queries_read_vigil_metrics() {
    let queries = panel_queries(&node_dashboard());
    assert!(queries.len() >= 8, "only {} queries: {queries:?}", queries.len());
    for (title, expr) in &queries {
        assert!(expr.contains("vigil_"), "panel {title:?} reads no vigil_ metric: {expr}");
        assert!(!expr.contains('$'), "panel {title:?} has an unsubstituted variable: {expr}");
        assert!(!expr.contains("instance="), "panel {title:?} uses the reserved `instance` label: {expr}");
    }
    let titles: Vec<&str> = queries.iter().map(|(title, _)| title.as_str()).collect();
    for title in ["CPU per instance", "Run-queue delay", "Page faults", "Probe errors"] {
        assert!(titles.contains(&title), "panel {title:?} missing: {titles:?}");
    }
}

#[test]
fn node_dashboard_queries_are_unique_per_panel() {
    let queries = panel_queries(&node_dashboard());
    let mut seen = std::collections::HashSet::new();
    for query in &queries {
        assert!(seen.insert(query), "duplicate query {query:?}");
    }
}

#[test]
fn grafana_variables_become_runnable_promql() {
    assert_eq!(
        substitute_variables(
            r#"rate(m{service=~"$service",instance_id=~"${instance_id}"}[$__rate_interval])"#
        ),
        r#"rate(m{service=~".*",instance_id=~".*"}[30s])"#
    );
    assert_eq!(
        substitute_variables("m{a=~\"${a:regex}\",b=~\"[[b]]\"}[${__interval}]"),
        "m{a=~\".*\",b=~\".*\"}[30s]"
    );
    assert_eq!(substitute_variables("rate(m[5m:1m])[$__range] $"), "rate(m[5m:1m])[30s] $");
    assert_eq!(substitute_variables("sum(m) / 1"), "sum(m) / 1");
}

#[test]
fn node_dashboard_queries_are_valid_promql() {
    // Syntax and type errors only: whether each query finds data is the end-to-end test's job.
    let prometheus = Prometheus::start_self().expect("start prometheus");
    for (title, expr) in panel_queries(&node_dashboard()) {
        if let Err(error) = prometheus.query(&expr) {
            panic!("panel {title:?}: {error}");
        }
    }
}
