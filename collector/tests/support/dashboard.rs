//! Reads a Grafana dashboard's PromQL so tests can run every panel's query against a real Prometheus.
//!
//! Grafana variables are replaced by what makes the query runnable as-is: interval variables become a fixed
//! window of 30 s (the harness scrapes every second, so a rate over 30 s always has samples), every other
//! variable (`$service`, `${instance_id}`, `${var:regex}`, `[[var]]`) becomes `.*`, which is what the
//! dashboards' "All" choice means: they only use variables inside `=~` matchers.

use std::fs;
use std::path::Path;

use serde_json::Value;

/// The window substituted for `$__rate_interval`, `$__interval` and `$__range`.
pub const RATE_WINDOW: &str = "30s";

/// Every `targets[].expr` in the dashboard at `path`, nested rows included, as (panel title, expr) with the
/// Grafana variables substituted. Panics with the path and reason if the file is not a dashboard.
pub fn panel_queries(path: &Path) -> Vec<(String, String)> {
    let dashboard = load(path);
    let mut queries = Vec::new();
    let panels = dashboard["panels"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: dashboard has no `panels` array", path.display()));
    collect(panels, &mut queries);
    queries
}

/// The dashboard JSON at `path`; panics with the path and the parse error.
pub fn load(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

fn collect(panels: &[Value], out: &mut Vec<(String, String)>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.to_owned(), substitute_variables(expr)));
            }
        }
        // Collapsed rows keep their panels inside the row.
        if let Some(nested) = panel["panels"].as_array() {
            collect(nested, out);
        }
    }
}

/// Replaces Grafana's variable forms (`$name`, `${name}`, `${name:format}`, `[[name]]`) in `expr`.
pub fn substitute_variables(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(start) = rest.find(['$', '[']) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let (name, consumed) = if let Some(braced) = tail.strip_prefix("${") {
            match braced.find('}') {
                Some(end) => (braced[..end].split(':').next().unwrap_or_default(), end + 3),
                None => ("", 0),
            }
        } else if let Some(bracketed) = tail.strip_prefix("[[") {
            match bracketed.find("]]") {
                Some(end) => (bracketed[..end].split(':').next().unwrap_or_default(), end + 4),
                None => ("", 0),
            }
        } else if let Some(bare) = tail.strip_prefix('$') {
            let len = bare.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(bare.len());
            (&bare[..len], len + 1)
        } else {
            ("", 0)
        };
        if name.is_empty() {
            // Not a variable (a PromQL range `[5m]`, a lone `$`): keep the character and move on.
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        } else {
            out.push_str(variable_value(name));
            rest = &tail[consumed..];
        }
    }
    out.push_str(rest);
    out
}

fn variable_value(name: &str) -> &'static str {
    match name {
        "__rate_interval" | "__interval" | "__range" => RATE_WINDOW,
        "__interval_ms" | "__range_ms" => "30000",
        "__range_s" => "30",
        _ => ".*",
    }
}
